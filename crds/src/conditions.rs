//! Condition vocabulary (types and reasons as constants) and the one helper that merges conditions.
//!
//! The conventions are kstatus's: `Ready` is the summary, `Reconciling` and `Stalled` are the abnormal-true
//! pair, and every condition carries `observedGeneration`. Policies use Gateway-API style `Accepted` and
//! `Enforced`, and carry `Reconciling` and `Stalled` beside them, so that kstatus (Flux, kpt, `kubectl wait`
//! with cli-utils) reads a rejected policy as `Failed`, one still waiting as `InProgress`, and an enforced
//! one as `Current`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types.
pub mod types {
    /// The Middleware serves traffic with the current specification.
    pub const READY: &str = "Ready";
    /// The operator or the Deployment is still converging on the current specification.
    pub const RECONCILING: &str = "Reconciling";
    /// Progress is impossible until the user changes something (the message says what).
    pub const STALLED: &str = "Stalled";
    /// The Middleware serves, but a component it needs is down.
    pub const DEGRADED: &str = "Degraded";
    /// The policy is valid and attached to its target.
    pub const ACCEPTED: &str = "Accepted";
    /// The data plane runs a configuration that contains the policy.
    pub const ENFORCED: &str = "Enforced";
}

/// Condition reasons: one CamelCase word each.
pub mod reasons {
    // Middleware
    pub const AVAILABLE: &str = "Available";
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    pub const PROGRESSING: &str = "Progressing";
    pub const PODS_NOT_READY: &str = "PodsNotReady";
    pub const RECONCILED: &str = "Reconciled";
    pub const PAUSED: &str = "Paused";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// Writing a child has failed for longer than the operator's `--apply-stall-after` with an error the
    /// API server may get over (a 5xx, a timeout); the operator keeps retrying.
    pub const APPLY_FAILING: &str = "ApplyFailing";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const HEALTH_NOT_REPORTED: &str = "HealthNotReported";
    pub const HEALTH_UNKNOWN: &str = "HealthUnknown";
    pub const CONFIG_PENDING: &str = "ConfigPending";
    pub const CONFIG_REJECTED: &str = "ConfigRejected";
    pub const COMPONENT_DEGRADED: &str = "ComponentDegraded";
    pub const COMPONENTS_DOWN: &str = "ComponentsDown";
    /// A data-plane pod cannot run: its container crash-loops, exits with an error or cannot be created.
    pub const PODS_FAILING: &str = "PodsFailing";
    // Policies: Accepted
    pub const ACCEPTED: &str = "Accepted";
    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    pub const INVALID: &str = "Invalid";
    pub const CONFLICTED: &str = "Conflicted";
    // Policies: Enforced
    pub const ENFORCED: &str = "Enforced";
    pub const PENDING: &str = "Pending";
    pub const OVERRIDDEN: &str = "Overridden";
    pub const DEGRADED: &str = "Degraded";
    /// The data plane running the policy's configuration says it does not enforce it (the message says why).
    pub const NOT_ENFORCED: &str = "NotEnforced";
}

/// Condition status values.
pub mod status {
    pub const TRUE: &str = "True";
    pub const FALSE: &str = "False";
    pub const UNKNOWN: &str = "Unknown";
}

/// Builds a condition; its `lastTransitionTime` is `now` until [`merge`] keeps an older one.
pub fn new(
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// `True` or `False`.
pub fn bool_status(value: bool) -> &'static str {
    if value { status::TRUE } else { status::FALSE }
}

/// Merges freshly computed conditions with the ones already on the object: a condition whose status did
/// not flip keeps its old `lastTransitionTime`; conditions not computed any more are dropped. The result
/// is in the order of `desired`, so that equal inputs give equal outputs (and no status write).
pub fn merge(existing: &[Condition], desired: Vec<Condition>) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|mut condition| {
            if let Some(old) = existing.iter().find(|old| old.type_ == condition.type_)
                && old.status == condition.status
            {
                condition.last_transition_time = old.last_transition_time.clone();
            }
            condition
        })
        .collect()
}

/// The condition of a type, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of a type is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == status::TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn merge_keeps_transition_time_unless_status_flips() {
        let old = vec![
            new(types::READY, status::TRUE, reasons::AVAILABLE, "up", Some(1), &at(100)),
            new(types::STALLED, status::FALSE, reasons::RECONCILED, "", Some(1), &at(100)),
        ];
        let desired = vec![
            new(types::READY, status::TRUE, reasons::AVAILABLE, "still up", Some(2), &at(200)),
            new(types::STALLED, status::TRUE, reasons::SECRET_NOT_FOUND, "create it", Some(2), &at(200)),
        ];
        let merged = merge(&old, desired);
        assert_eq!(merged[0].last_transition_time, at(100), "Ready did not flip");
        assert_eq!(merged[0].message, "still up");
        assert_eq!(merged[0].observed_generation, Some(2));
        assert_eq!(merged[1].last_transition_time, at(200), "Stalled flipped");
    }

    #[test]
    fn merge_drops_conditions_no_longer_computed_and_is_idempotent() {
        let old = vec![new(types::DEGRADED, status::TRUE, reasons::DEGRADED, "", None, &at(1))];
        let desired = vec![new(types::READY, status::TRUE, reasons::AVAILABLE, "", None, &at(2))];
        let merged = merge(&old, desired.clone());
        assert_eq!(merged.len(), 1);
        assert_eq!(merge(&merged, desired), merged);
        assert!(is_true(&merged, types::READY));
        assert!(!is_true(&merged, types::DEGRADED));
    }
}
