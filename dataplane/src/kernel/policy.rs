//! Whether this data plane enforces each policy of a configuration, as `/status` reports it.

use serde::Serialize;
use umw_crds::Policy;
use umw_crds::config::Bundle;

/// Whether this data plane enforces a policy, as `/status` reports it to the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyState {
    pub kind: String,
    pub name: String,
    pub enforced: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What this data-plane version does with each policy of the configuration: a policy is enforced when
/// no field of it is one this version does not act on (the kinds say which, in
/// [`Policy::not_enforced_fields`]).
pub fn policy_states(bundle: &Bundle) -> Vec<PolicyState> {
    fn of<P: Policy>(policies: &[P]) -> Vec<PolicyState> {
        policies
            .iter()
            .map(|p| {
                let fields = p.not_enforced_fields();
                PolicyState {
                    kind: P::kind(&()).to_string(),
                    name: p.name_any(),
                    enforced: fields.is_empty(),
                    message: if fields.is_empty() {
                        String::new()
                    } else {
                        format!("this data-plane version does not enforce {} yet", fields.join(", "))
                    },
                }
            })
            .collect()
    }
    let mut all = of(&bundle.cache_policies);
    all.extend(of(&bundle.event_routes));
    all.extend(of(&bundle.auth_policies));
    all
}
