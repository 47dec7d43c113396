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
use umw_crds::conditions::{self, reasons, status, types};
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
    let new_status = status_of(policy.as_ref(), &verdicts, &now);
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

/// Status from the verdicts. Pure.
pub fn status_of<P: Policy>(policy: &P, verdicts: &[Verdict], now: &Time) -> PolicyStatus {
    let generation = policy.meta().generation;
    let condition = |type_: &str, status: &str, reason: &str, message: String| {
        conditions::new(type_, status, reason, message, generation, now)
    };
    let unenforced = policy.not_enforced_fields();
    let pending = if unenforced.is_empty() {
        "accepted; waiting for the data plane to confirm the configuration".to_string()
    } else {
        format!(
            "accepted, but this data-plane version does not enforce {} yet, so enforcement stays pending",
            unenforced.join(", ")
        )
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
                    condition(types::ENFORCED, status::UNKNOWN, reasons::PENDING, pending.clone()),
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
        None => vec![
            condition(
                types::ACCEPTED,
                status::TRUE,
                reasons::ACCEPTED,
                format!("accepted on all {} target(s)", verdicts.len()),
            ),
            condition(types::ENFORCED, status::UNKNOWN, reasons::PENDING, pending),
        ],
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
    let existing: &[Condition] = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    PolicyStatus { observed_generation: generation, conditions: conditions::merge(existing, summary), targets }
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
    use umw_crds::common::PolicyTargetRef;
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
        let status = status_of(&policy, &verdicts, &now);
        let accepted = conditions::find(&status.conditions, types::ACCEPTED).unwrap();
        assert_eq!((accepted.status.as_str(), accepted.reason.as_str()), (status::FALSE, reasons::TARGET_NOT_FOUND));
        assert!(accepted.message.contains("no b"));
        assert_eq!(accepted.observed_generation, Some(4));
        assert!(conditions::is_true(&status.targets[0].conditions, types::ACCEPTED));
        let enforced = conditions::find(&status.targets[0].conditions, types::ENFORCED).unwrap();
        assert_eq!((enforced.status.as_str(), enforced.reason.as_str()), (status::UNKNOWN, reasons::PENDING));
        assert!(enforced.message.contains("spec.source"), "{}", enforced.message);
    }
}
