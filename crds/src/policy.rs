//! What the three policy kinds share: targets, status and the [`Policy`] trait the operator works with.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::PolicyTargetRef;

/// Observed state of a policy, overall and per target (Gateway-API style).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` and `Enforced` summed up over all targets: true only when true for every target, so that
    /// `kubectl wait --for=condition=Accepted` works; and `Reconciling` and `Stalled`, so that kstatus (Flux,
    /// kpt) reads an enforced policy as Current, a waiting one as InProgress and a refused one as Failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `Accepted` and `Enforced` for each target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<PolicyTargetStatus>,
}

/// Conditions of a policy on one of its targets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetStatus {
    /// The target, as written in `spec.targetRefs`.
    pub target_ref: PolicyTargetRef,
    /// `Accepted` and `Enforced`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl Default for PolicyTargetRef {
    fn default() -> Self {
        PolicyTargetRef::middleware("")
    }
}

/// The operations the operator needs on every policy kind.
pub trait Policy:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + ResourceExt + Clone + Send + Sync + 'static
{
    /// The targets named in `spec.targetRefs`.
    fn target_refs(&self) -> &[PolicyTargetRef];

    /// Replaces the targets (the operator renders each Middleware's copy with its own targets only).
    fn set_target_refs(&mut self, refs: Vec<PolicyTargetRef>);

    /// The status, if any.
    fn policy_status(&self) -> Option<&PolicyStatus>;

    /// Two policies of one kind conflict on a Middleware when they have the same key there; the older
    /// one wins. Cache and auth policies conflict per route (`sectionName`), event routes per source.
    fn conflict_key(&self, target: &PolicyTargetRef) -> String;

    /// Fields that are set on this policy but that the data plane of this version does not enforce yet.
    fn not_enforced_fields(&self) -> Vec<&'static str>;

    /// Checks the operator makes beyond the CRD schema; `Err` carries a message that says what to fix.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// Rules the CRD schema states as CEL, checked again for configurations read from files, as
    /// (field, message) pairs.
    fn rule_violations(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Checks against the Middleware the policy attaches to (e.g. that the connections it needs exist).
    fn validate_against(&self, _middleware: &crate::Middleware) -> Result<(), String> {
        Ok(())
    }

    /// What the Middleware already owns that this policy would take over (e.g. an ingest path one of its
    /// routes serves): the policy is then `Conflicted`, and the message names the owner.
    fn conflicts_with(&self, _middleware: &crate::Middleware) -> Option<String> {
        None
    }

    /// Secret keys the data plane needs for this policy, with the field that names each.
    fn secret_key_refs(&self) -> Vec<(&'static str, &crate::SecretKeyRef)> {
        Vec::new()
    }

    /// Whole Secrets the data plane needs for this policy (mounted as files), with the field that names each.
    fn secret_names(&self) -> Vec<(&'static str, &str)> {
        Vec::new()
    }
}

/// The message for a policy that needs a connection its Middleware does not have.
pub fn needs_connection(what: &str, connection: &str, middleware: &crate::Middleware) -> String {
    use kube::ResourceExt;
    format!(
        "{what} needs a {connection} connection, but Middleware {:?} has no spec.connections.{connection}; add one or change the policy",
        middleware.name_any()
    )
}

/// The route part of a conflict key: the route name or `*` for the whole Middleware.
pub fn section_key(target: &PolicyTargetRef) -> String {
    target.section_name.clone().unwrap_or_else(|| "*".to_string())
}
