//! The policy reconciler, generic over the three kinds: computes `Accepted` and `Enforced` per target
//! with [`crate::attach`] and writes them when they changed.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::Serialize;
use tracing::instrument;
use umw_crds::common::PolicyTargetRef;
use umw_crds::conditions::{self, reasons, status, types};
use umw_crds::middleware::AttachedPolicy;
use umw_crds::policy::PolicyTargetStatus;
use umw_crds::{AuthPolicy, CachePolicy, EventRoute, Policy, PolicyStatus};

use super::{Context, Error, FIELD_MANAGER, Stores};
use crate::attach::{Rejection, Verdict, evaluate};

/// A policy kind the operator reconciles.
pub trait PolicyKind: Policy + Serialize + serde::de::DeserializeOwned + std::fmt::Debug {
    fn store(stores: &Stores) -> &Store<Self>;
}

impl PolicyKind for CachePolicy {
    fn store(stores: &Stores) -> &Store<Self> {
        &stores.cache_policies
    }
}

impl PolicyKind for EventRoute {
    fn store(stores: &Stores) -> &Store<Self> {
        &stores.event_routes
    }
}

impl PolicyKind for AuthPolicy {
    fn store(stores: &Stores) -> &Store<Self> {
        &stores.auth_policies
    }
}

#[instrument(skip_all, fields(kind = %P::kind(&()), namespace = policy.namespace().unwrap_or_default(), policy = policy.name_any()))]
pub async fn reconcile<P: PolicyKind>(policy: Arc<P>, ctx: Arc<Context>) -> Result<Action, Error> {
    let controller = P::kind(&()).to_lowercase();
    let timer = ctx.metrics.reconcile_duration.with_label_values(&[&controller]).start_timer();
    if policy.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = policy.namespace().unwrap_or_default();
    let middlewares = &ctx.stores.middlewares;
    let verdicts = evaluate(
        policy.as_ref(),
        |name| middlewares.get(&ObjectRef::new(name).within(&namespace)),
        &P::store(&ctx.stores).state(),
    );
    let now = Time(Timestamp::now());
    let kind = P::kind(&()).to_string();
    let name = policy.name_any();
    let enforcement = |target: &PolicyTargetRef| {
        let mw = middlewares.get(&ObjectRef::new(&target.name).within(&namespace))?;
        let status = mw.status.as_ref()?;
        status.policies.iter().find(|p| p.kind == kind && p.name == name).cloned()
    };
    let new_status = status_of(policy.as_ref(), &verdicts, &enforcement, &now);
    write_status(policy.as_ref(), new_status, &ctx).await?;
    ctx.succeeded(&format!("{}/{namespace}/{}", P::kind(&()), policy.name_any()));
    timer.observe_duration();
    Ok(Action::requeue(ctx.config.resync))
}

fn rejection(outcome: &Result<(), Rejection>) -> Option<(&'static str, &str)> {
    match outcome {
        Ok(()) => None,
        Err(Rejection::TargetNotFound(m)) => Some((reasons::TARGET_NOT_FOUND, m)),
        Err(Rejection::Invalid(m)) => Some((reasons::INVALID, m)),
        Err(Rejection::Conflicted(m)) => Some((reasons::CONFLICTED, m)),
    }
}

/// Enforcement of a policy on one target, as the target Middleware's status reports it.
pub type EnforcementOf<'a> = dyn Fn(&PolicyTargetRef) -> Option<AttachedPolicy> + 'a;

/// Status from the verdicts and from what each target Middleware reports about the policy. Pure.
pub fn status_of<P: Policy>(
    policy: &P,
    verdicts: &[Verdict],
    enforcement: &EnforcementOf<'_>,
    now: &Time,
) -> PolicyStatus {
    let generation = policy.meta().generation;
    let condition = |type_: &str, status: &str, reason: &str, message: String| {
        conditions::new(type_, status, reason, message, generation, now)
    };
    let enforced_on = |target: &PolicyTargetRef| -> Condition {
        match enforcement(target) {
            Some(AttachedPolicy { enforced: Some(true), message, .. }) => condition(
                types::ENFORCED,
                status::TRUE,
                reasons::ENFORCED,
                format!("{target}: {}", message.unwrap_or_default()),
            ),
            Some(AttachedPolicy { enforced: Some(false), message, .. }) => condition(
                types::ENFORCED,
                status::FALSE,
                reasons::PENDING,
                format!("{target}: not enforced: {}", message.unwrap_or_default()),
            ),
            Some(AttachedPolicy { enforced: None, message, .. }) => condition(
                types::ENFORCED,
                status::UNKNOWN,
                reasons::PENDING,
                format!("{target}: {}", message.unwrap_or_else(|| "waiting for the data plane".into())),
            ),
            None => condition(
                types::ENFORCED,
                status::UNKNOWN,
                reasons::PENDING,
                format!("{target}: accepted; waiting for the Middleware to render the policy into its configuration"),
            ),
        }
    };
    let old = policy.policy_status();
    let targets: Vec<PolicyTargetStatus> = verdicts
        .iter()
        .map(|verdict| {
            let desired = match rejection(&verdict.outcome) {
                None => vec![
                    condition(
                        types::ACCEPTED,
                        status::TRUE,
                        reasons::ACCEPTED,
                        format!("attached to {}", verdict.target),
                    ),
                    enforced_on(&verdict.target),
                ],
                Some((reason, message)) => vec![
                    condition(types::ACCEPTED, status::FALSE, reason, message.to_string()),
                    condition(
                        types::ENFORCED,
                        status::FALSE,
                        reasons::PENDING,
                        "not enforced: the policy is not accepted on this target".into(),
                    ),
                ],
            };
            let existing = old
                .and_then(|s| s.targets.iter().find(|t| t.target_ref == verdict.target))
                .map(|t| t.conditions.as_slice())
                .unwrap_or_default();
            PolicyTargetStatus { target_ref: verdict.target.clone(), conditions: conditions::merge(existing, desired) }
        })
        .collect();

    let rejected: Vec<(&'static str, String)> = verdicts
        .iter()
        .filter_map(|v| rejection(&v.outcome).map(|(reason, message)| (reason, format!("{}: {message}", v.target))))
        .collect();
    let summary = match rejected.first() {
        None => {
            // Enforced overall only when enforced on every target; else the first target that is not.
            let per_target: Vec<Condition> =
                targets.iter().filter_map(|t| conditions::find(&t.conditions, types::ENFORCED).cloned()).collect();
            let enforced = match per_target.iter().find(|c| c.status != status::TRUE) {
                Some(first) => condition(types::ENFORCED, &first.status, &first.reason, first.message.clone()),
                None => condition(
                    types::ENFORCED,
                    status::TRUE,
                    reasons::ENFORCED,
                    format!("enforced on all {} target(s)", verdicts.len()),
                ),
            };
            vec![
                condition(
                    types::ACCEPTED,
                    status::TRUE,
                    reasons::ACCEPTED,
                    format!("accepted on all {} target(s)", verdicts.len()),
                ),
                enforced,
            ]
        }
        Some((reason, _)) => {
            let message = rejected.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; ");
            vec![
                condition(types::ACCEPTED, status::FALSE, reason, message),
                condition(
                    types::ENFORCED,
                    status::FALSE,
                    reasons::PENDING,
                    "not enforced on every target: see Accepted".into(),
                ),
            ]
        }
    };
    let mut summary = summary;
    summary.extend(progress(&targets, &condition));
    let existing: &[Condition] = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    PolicyStatus { observed_generation: generation, conditions: conditions::merge(existing, summary), targets }
}

/// `Reconciling` and `Stalled` from each target's `Accepted` and `Enforced`, as kstatus reads them: a target
/// where the policy is invalid or conflicted (a person must change something), or refused by the data
/// plane: `Stalled`; otherwise a missing target (which may yet be created, e.g. later in the same sync) or
/// a configuration still rolling out: `Reconciling`; enforced everywhere: neither.
fn progress(
    targets: &[PolicyTargetStatus],
    condition: &dyn Fn(&str, &str, &str, String) -> Condition,
) -> [Condition; 2] {
    let mut stalled: Option<(String, String)> = None;
    let mut reconciling: Option<(String, String)> = None;
    for target in targets {
        let accepted = conditions::find(&target.conditions, types::ACCEPTED);
        let enforced = conditions::find(&target.conditions, types::ENFORCED);
        let on = |c: &Condition| format!("{}: {}", target.target_ref, c.message);
        match (accepted, enforced) {
            (Some(a), _) if a.status != status::TRUE && a.reason == reasons::TARGET_NOT_FOUND => {
                reconciling.get_or_insert((a.reason.clone(), on(a)));
            }
            (Some(a), _) if a.status != status::TRUE => {
                stalled.get_or_insert((a.reason.clone(), on(a)));
            }
            (_, Some(e)) if e.status == status::TRUE => {}
            (_, Some(e)) if e.status == status::FALSE => {
                stalled.get_or_insert((reasons::NOT_ENFORCED.to_string(), e.message.clone()));
            }
            (_, Some(e)) => {
                reconciling.get_or_insert((e.reason.clone(), e.message.clone()));
            }
            (_, None) => {
                reconciling.get_or_insert((reasons::PENDING.to_string(), "waiting for the data plane".into()));
            }
        }
    }
    if targets.is_empty() {
        reconciling = Some((reasons::PENDING.to_string(), "no target".into()));
    }
    let reconciling = match (&stalled, reconciling) {
        (None, Some((reason, message))) => condition(types::RECONCILING, status::TRUE, &reason, message),
        _ => condition(types::RECONCILING, status::FALSE, reasons::AS_EXPECTED, String::new()),
    };
    let stalled = match stalled {
        Some((reason, message)) => condition(types::STALLED, status::TRUE, &reason, message),
        None => condition(types::STALLED, status::FALSE, reasons::AS_EXPECTED, String::new()),
    };
    [reconciling, stalled]
}

async fn write_status<P: PolicyKind>(policy: &P, new_status: PolicyStatus, ctx: &Context) -> Result<(), Error> {
    let old = policy.policy_status().cloned().unwrap_or_default();
    if old == new_status {
        return Ok(());
    }
    let kind = P::kind(&()).to_string();
    let name = policy.name_any();
    let namespace = policy.namespace().unwrap_or_default();
    let api: Api<P> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": P::api_version(&()),
        "kind": P::kind(&()),
        "status": new_status,
    });
    ctx.call(
        || format!("writing the status of {kind} {namespace}/{name}"),
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)),
        |source| Error::WriteStatus { kind: kind.clone(), name: name.clone(), source },
    )
    .await?;
    ctx.metrics.api_writes.with_label_values(&[&kind, "status"]).inc();

    // An Event when the overall Accepted condition changes.
    let before = conditions::find(&old.conditions, types::ACCEPTED);
    if let Some(after) = conditions::find(&new_status.conditions, types::ACCEPTED)
        && before.is_none_or(|b| b.status != after.status || b.reason != after.reason)
    {
        let event_type = if after.status == status::TRUE { EventType::Normal } else { EventType::Warning };
        ctx.publish(policy, event_type, &after.reason, after.message.clone()).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use umw_crds::event_route::{EventDestination, EventRouteSpec, EventSource, HttpSource, KafkaDestination};

    fn route() -> EventRoute {
        let mut route = EventRoute::new(
            "orders",
            EventRouteSpec {
                target_refs: vec![PolicyTargetRef::middleware("a"), PolicyTargetRef::middleware("b")],
                source: EventSource { http: Some(HttpSource { path: "/events".into() }), ..Default::default() },
                destination: EventDestination {
                    kafka: Some(KafkaDestination { topic: "orders".into(), key_template: None }),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        route.metadata.generation = Some(4);
        route
    }

    #[test]
    fn accepted_only_when_every_target_is() {
        let policy = route();
        let now = Time(Timestamp::from_second(5).unwrap());
        let verdicts = vec![
            Verdict { target: PolicyTargetRef::middleware("a"), outcome: Ok(()) },
            Verdict {
                target: PolicyTargetRef::middleware("b"),
                outcome: Err(Rejection::TargetNotFound("no b".into())),
            },
        ];
        let enforcement = |target: &PolicyTargetRef| {
            (target.name == "a").then(|| AttachedPolicy {
                kind: "EventRoute".into(),
                name: "orders".into(),
                enforced: Some(false),
                message: Some("pod p: event routing is not implemented".into()),
            })
        };
        let status = status_of(&policy, &verdicts, &enforcement, &now);
        let accepted = conditions::find(&status.conditions, types::ACCEPTED).unwrap();
        assert_eq!((accepted.status.as_str(), accepted.reason.as_str()), (status::FALSE, reasons::TARGET_NOT_FOUND));
        assert!(accepted.message.contains("no b"));
        assert_eq!(accepted.observed_generation, Some(4));
        assert!(conditions::is_true(&status.targets[0].conditions, types::ACCEPTED));
        let enforced = conditions::find(&status.targets[0].conditions, types::ENFORCED).unwrap();
        assert_eq!((enforced.status.as_str(), enforced.reason.as_str()), (status::FALSE, reasons::PENDING));
        assert!(enforced.message.contains("not implemented"), "{}", enforced.message);
    }

    #[test]
    fn enforced_when_every_target_reports_it() {
        let policy = route();
        let now = Time(Timestamp::from_second(5).unwrap());
        let verdicts: Vec<Verdict> =
            ["a", "b"].iter().map(|t| Verdict { target: PolicyTargetRef::middleware(*t), outcome: Ok(()) }).collect();
        let reports = |b_enforced: Option<bool>| {
            move |target: &PolicyTargetRef| {
                Some(AttachedPolicy {
                    kind: "EventRoute".into(),
                    name: "orders".into(),
                    enforced: if target.name == "a" { Some(true) } else { b_enforced },
                    message: Some("m".into()),
                })
            }
        };
        let status = status_of(&policy, &verdicts, &reports(Some(true)), &now);
        assert!(conditions::is_true(&status.conditions, types::ENFORCED));
        let status = status_of(&policy, &verdicts, &reports(None), &now);
        let enforced = conditions::find(&status.conditions, types::ENFORCED).unwrap();
        assert_eq!((enforced.status.as_str(), enforced.message.as_str()), (status::UNKNOWN, "Middleware/b: m"));
    }

    #[test]
    fn reconciling_and_stalled_say_what_kstatus_should_read() {
        let policy = route();
        let now = Time(Timestamp::from_second(5).unwrap());
        let target = PolicyTargetRef::middleware("a");
        let abnormal = |outcome: Result<(), Rejection>, enforced: Option<bool>| {
            let verdicts = vec![Verdict { target: target.clone(), outcome }];
            let report = move |_: &PolicyTargetRef| {
                Some(AttachedPolicy {
                    kind: "EventRoute".into(),
                    name: "orders".into(),
                    enforced,
                    message: Some("m".into()),
                })
            };
            let status = status_of(&policy, &verdicts, &report, &now);
            let true_of = |type_: &str| {
                let c = conditions::find(&status.conditions, type_).unwrap();
                (c.status == status::TRUE).then(|| c.reason.clone())
            };
            (true_of(types::RECONCILING), true_of(types::STALLED))
        };
        assert_eq!(abnormal(Ok(()), Some(true)), (None, None), "enforced: Current");
        assert_eq!(abnormal(Ok(()), None), (Some("Pending".into()), None), "rolling out: InProgress");
        assert_eq!(abnormal(Ok(()), Some(false)), (None, Some("NotEnforced".into())), "refused: Failed");
        assert_eq!(abnormal(Err(Rejection::Invalid("x".into())), None), (None, Some("Invalid".into())));
        assert_eq!(abnormal(Err(Rejection::Conflicted("x".into())), None), (None, Some("Conflicted".into())));
        assert_eq!(
            abnormal(Err(Rejection::TargetNotFound("x".into())), None),
            (Some("TargetNotFound".into()), None),
            "a target may yet be created: InProgress"
        );

        // Over several targets, one that needs a person wins over one that may yet appear.
        let verdicts = vec![
            Verdict {
                target: PolicyTargetRef::middleware("missing"),
                outcome: Err(Rejection::TargetNotFound("x".into())),
            },
            Verdict { target: PolicyTargetRef::middleware("shop"), outcome: Err(Rejection::Conflicted("y".into())) },
        ];
        let status = status_of(&policy, &verdicts, &|_: &PolicyTargetRef| None, &now);
        let stalled = conditions::find(&status.conditions, types::STALLED).unwrap();
        assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", "Conflicted"));
        assert!(stalled.message.contains("shop"), "{}", stalled.message);
        assert_eq!(conditions::find(&status.conditions, types::RECONCILING).unwrap().status, "False");
    }
}
