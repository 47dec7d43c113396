//! Which policies attach to which Middleware: pure functions over plain values, shared by the policy
//! controllers (which write the verdicts into policy status) and the Middleware controller (which renders
//! the accepted policies into the data-plane configuration), so the two can never disagree.
//!
//! Rules, per target of a policy:
//! 1. the policy must pass its own checks ([`Policy::validate`]), else `Invalid`;
//! 2. the Middleware must exist in the policy's namespace, and the route named by `sectionName` in it,
//!    else `TargetNotFound`;
//! 3. the policy must not take over what the Middleware itself owns ([`Policy::conflicts_with`]: an
//!    EventRoute ingest path that one of its routes serves), else `Conflicted`, naming the route;
//! 4. among policies of the same kind with the same conflict key on that Middleware that pass 1 to 3,
//!    the oldest (creation time, then name) wins; the others are `Conflicted`, naming the winner.

use std::sync::Arc;

use kube::ResourceExt;
use umw_crds::{Middleware, Policy, PolicyTargetRef};

/// Why a policy is not accepted on a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    TargetNotFound(String),
    Invalid(String),
    Conflicted(String),
}

/// The outcome for one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub target: PolicyTargetRef,
    pub outcome: Result<(), Rejection>,
}

/// Checks 1 and 2 for one target, given the Middleware it names (if it exists).
fn resolve<P: Policy>(policy: &P, target: &PolicyTargetRef, mw: Option<&Middleware>) -> Result<(), Rejection> {
    policy.validate().map_err(Rejection::Invalid)?;
    // What the data plane would refuse in this policy: refused here, so that the policy is the one that
    // reports it and its Middleware keeps serving without it.
    let violations = policy.rule_violations();
    if !violations.is_empty() {
        let problems: Vec<String> = violations.iter().map(|(field, message)| format!("{field}: {message}")).collect();
        return Err(Rejection::Invalid(problems.join("; ")));
    }
    let namespace = policy.namespace().unwrap_or_default();
    let Some(mw) = mw else {
        return Err(Rejection::TargetNotFound(format!(
            "Middleware {:?} does not exist in namespace {namespace:?}; create it or correct spec.targetRefs",
            target.name
        )));
    };
    if let Some(section) = &target.section_name
        && !mw.spec.routes.iter().any(|route| &route.name == section)
    {
        let routes: Vec<&str> = mw.spec.routes.iter().map(|r| r.name.as_str()).collect();
        return Err(Rejection::TargetNotFound(format!(
            "Middleware {:?} has no route {section:?} (its routes: {}); correct sectionName",
            target.name,
            if routes.is_empty() { "none".to_string() } else { routes.join(", ") }
        )));
    }
    policy.validate_against(mw).map_err(Rejection::Invalid)?;
    if let Some(owner) = policy.conflicts_with(mw) {
        return Err(Rejection::Conflicted(owner));
    }
    Ok(())
}

fn age_key<P: Policy>(policy: &P) -> (i64, i32, String) {
    // Policies without a creation time (only in tests) sort last.
    let created = policy.meta().creation_timestamp.as_ref().map(|t| t.0);
    let (seconds, nanos) = created.map_or((i64::MAX, 0), |ts| (ts.as_second(), ts.subsec_nanosecond()));
    (seconds, nanos, policy.name_any())
}

/// The verdict for one target. `peers` are the policies of the same kind in the policy's namespace (the
/// policy itself may be among them); `mw` is the Middleware the target names, if it exists.
pub fn evaluate_target<P: Policy>(
    policy: &P,
    target: &PolicyTargetRef,
    mw: Option<&Middleware>,
    peers: &[Arc<P>],
) -> Verdict {
    let outcome = resolve(policy, target, mw).and_then(|()| {
        let key = policy.conflict_key(target);
        let winner = peers
            .iter()
            .filter(|peer| peer.namespace() == policy.namespace())
            .filter(|peer| {
                peer.target_refs().iter().any(|other| {
                    other.name == target.name
                        && peer.conflict_key(other) == key
                        && resolve(peer.as_ref(), other, mw).is_ok()
                })
            })
            .map(|peer| peer.as_ref())
            .chain(std::iter::once(policy))
            .min_by_key(|candidate| age_key(*candidate))
            .map(|winner| winner.name_any());
        match winner {
            Some(winner) if winner != policy.name_any() => Err(Rejection::Conflicted(format!(
                "{kind} {winner:?} already applies to {target} and is older; the older policy wins. \
                 Merge the two, or point this one at another route",
                kind = P::kind(&()),
            ))),
            _ => Ok(()),
        }
    });
    Verdict { target: target.clone(), outcome }
}

/// Verdicts for every target of a policy; `middleware` looks a Middleware up by name in the policy's
/// namespace.
pub fn evaluate<P: Policy>(
    policy: &P,
    middleware: impl Fn(&str) -> Option<Arc<Middleware>>,
    peers: &[Arc<P>],
) -> Vec<Verdict> {
    policy
        .target_refs()
        .iter()
        .map(|target| {
            let mw = middleware(&target.name);
            evaluate_target(policy, target, mw.as_deref(), peers)
        })
        .collect()
}

/// The policies of one kind that are accepted on at least one target naming `mw`, each reduced to the
/// targets accepted on `mw`: the data plane of one Middleware neither knows nor checks the others.
pub fn accepted_for<P: Policy>(mw: &Middleware, peers: &[Arc<P>]) -> Vec<P> {
    let name = mw.name_any();
    let mut accepted: Vec<P> = peers
        .iter()
        .filter(|policy| policy.namespace() == mw.namespace())
        .filter_map(|policy| {
            let targets: Vec<_> = policy
                .target_refs()
                .iter()
                .filter(|target| target.name == name)
                .filter(|target| evaluate_target(policy.as_ref(), target, Some(mw), peers).outcome.is_ok())
                .cloned()
                .collect();
            (!targets.is_empty()).then(|| {
                let mut policy = policy.as_ref().clone();
                policy.set_target_refs(targets);
                policy
            })
        })
        .collect();
    accepted.sort_by_key(|p| p.name_any());
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use umw_crds::cache_policy::{CachePolicy, CachePolicySpec, CacheRule};
    use umw_crds::middleware::{Route, Upstream};
    use umw_crds::{Duration, MiddlewareSpec};

    fn mw(routes: &[&str]) -> Middleware {
        let routes = routes
            .iter()
            .map(|name| Route {
                name: name.to_string(),
                upstream: Upstream { url: Some("http://u".into()), ..Upstream::default() },
                ..Route::default()
            })
            .collect();
        let mut mw = Middleware::new("shop", MiddlewareSpec { routes, ..MiddlewareSpec::default() });
        mw.metadata.namespace = Some("ns".into());
        mw
    }

    fn policy(name: &str, created: i64, target: PolicyTargetRef) -> Arc<CachePolicy> {
        let mut p = CachePolicy::new(
            name,
            CachePolicySpec {
                target_refs: vec![target],
                rules: vec![CacheRule {
                    matches: Default::default(),
                    ttl: Duration::new("30s"),
                    jitter_percent: None,
                    negative_ttl: None,
                    negative_statuses: vec![],
                    stale_while_revalidate: None,
                    stale_if_error: None,
                    key: Default::default(),
                    max_entry_bytes: None,
                    single_flight: Default::default(),
                    tags: vec![],
                }],
                ..CachePolicySpec::default()
            },
        );
        p.metadata.namespace = Some("ns".into());
        p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        Arc::new(p)
    }

    #[test]
    fn missing_middleware_or_route_is_target_not_found() {
        let p = policy("p", 1, PolicyTargetRef::middleware("shop"));
        let verdicts = evaluate(p.as_ref(), |_| None, std::slice::from_ref(&p));
        assert!(matches!(&verdicts[0].outcome, Err(Rejection::TargetNotFound(m)) if m.contains("does not exist")));

        let p = policy("p", 1, PolicyTargetRef::middleware("shop").with_section("nope"));
        let m = Arc::new(mw(&["api"]));
        let verdicts = evaluate(p.as_ref(), |_| Some(m.clone()), std::slice::from_ref(&p));
        assert!(
            matches!(&verdicts[0].outcome, Err(Rejection::TargetNotFound(msg)) if msg.contains("no route \"nope\"") && msg.contains("api"))
        );
    }

    #[test]
    fn the_oldest_of_conflicting_policies_wins() {
        let older = policy("zz-older", 1, PolicyTargetRef::middleware("shop"));
        let newer = policy("aa-newer", 2, PolicyTargetRef::middleware("shop"));
        let peers = [older.clone(), newer.clone()];
        let m = Arc::new(mw(&[]));
        assert_eq!(evaluate(older.as_ref(), |_| Some(m.clone()), &peers)[0].outcome, Ok(()));
        let verdict = &evaluate(newer.as_ref(), |_| Some(m.clone()), &peers)[0];
        assert!(matches!(&verdict.outcome, Err(Rejection::Conflicted(msg)) if msg.contains("zz-older")), "{verdict:?}");
        let accepted = accepted_for(&m, &peers);
        assert_eq!(accepted.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["zz-older"]);
    }

    #[test]
    fn each_middleware_gets_the_policy_with_its_own_accepted_targets_only() {
        let mut both = policy("both", 1, PolicyTargetRef::middleware("shop"));
        Arc::make_mut(&mut both).spec.target_refs = vec![
            PolicyTargetRef::middleware("other").with_section("x"),
            PolicyTargetRef::middleware("shop"),
            PolicyTargetRef::middleware("shop").with_section("missing"),
        ];
        let m = Arc::new(mw(&[]));
        let accepted = accepted_for(&m, &[both]);
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0].spec.target_refs, vec![PolicyTargetRef::middleware("shop")]);
        // What the operator renders, the data plane accepts.
        let bundle = umw_crds::config::Bundle { middleware: mw(&[]), cache_policies: accepted, ..Default::default() };
        assert_eq!(umw_crds::validate::validate(&bundle), vec![]);
    }

    #[test]
    fn a_policy_the_data_plane_would_refuse_is_invalid_and_left_out_of_the_configuration() {
        let mut bad = policy("bad", 1, PolicyTargetRef::middleware("shop"));
        Arc::make_mut(&mut bad).spec.rules[0].key.headers = vec!["bad header".into()];
        let m = Arc::new(mw(&[]));
        let verdicts = evaluate(bad.as_ref(), |_| Some(m.clone()), &[]);
        assert!(
            matches!(&verdicts[0].outcome, Err(Rejection::Invalid(msg)) if msg.contains("spec.rules[0].key.headers[0]")),
            "{verdicts:?}"
        );
        assert!(accepted_for(&m, &[bad]).is_empty(), "the Middleware keeps serving without it");
    }

    #[test]
    fn a_policy_that_fails_its_own_checks_is_invalid_on_every_target() {
        use umw_crds::event_route::{
            EventDestination, EventRoute, EventRouteSpec, EventSource, HttpSource, KafkaDestination,
        };
        let mut route = EventRoute::new(
            "events",
            EventRouteSpec {
                target_refs: vec![PolicyTargetRef::middleware("shop").with_section("api")],
                source: EventSource { http: Some(HttpSource { path: "/e".into() }), ..Default::default() },
                destination: EventDestination {
                    kafka: Some(KafkaDestination { topic: "t".into(), key_template: None }),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        route.metadata.namespace = Some("ns".into());
        let m = Arc::new(mw(&["api"]));
        let verdicts = evaluate(&route, |_| Some(m.clone()), &[]);
        assert!(
            matches!(&verdicts[0].outcome, Err(Rejection::Invalid(msg)) if msg.contains("sectionName")),
            "{verdicts:?}"
        );
    }

    #[test]
    fn different_routes_do_not_conflict_and_broken_peers_do_not_win() {
        let m = Arc::new(mw(&["a", "b"]));
        let on_a = policy("on-a", 1, PolicyTargetRef::middleware("shop").with_section("a"));
        let on_b = policy("on-b", 2, PolicyTargetRef::middleware("shop").with_section("b"));
        let broken_older = policy("broken", 0, PolicyTargetRef::middleware("shop").with_section("missing"));
        let peers = [on_a.clone(), on_b.clone(), broken_older];
        for p in [&on_a, &on_b] {
            assert_eq!(evaluate(p.as_ref(), |_| Some(m.clone()), &peers)[0].outcome, Ok(()));
        }
        assert_eq!(accepted_for(&m, &peers).len(), 2);
    }
}
