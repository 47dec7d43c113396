//! The Middleware reconciler: read → validate → render → apply → prune → status.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::instrument;
use umw_crds::conditions::{self, reasons, status, types};
use umw_crds::config::Bundle;
use umw_crds::middleware::{AttachedPolicy, MiddlewareStatus};
use umw_crds::{Middleware, Policy};

use super::{Context, Error, FIELD_MANAGER};
use crate::attach::accepted_for;
use crate::health::{self, PodHealth};
use crate::render::{self, Desired, MAX_NAME_LEN, RENDER_HASH_ANNOTATION, SecretUse, child_name};

/// A problem only the user can fix: the Middleware is `Stalled` until they do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    pub reason: &'static str,
    pub message: String,
}

#[instrument(skip_all, fields(namespace = mw.namespace().unwrap_or_default(), middleware = mw.name_any()))]
pub async fn reconcile(mw: Arc<Middleware>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timer = ctx.metrics.reconcile_duration.with_label_values(&["middleware"]).start_timer();
    let namespace = mw.namespace().unwrap_or_default();
    if mw.meta().deletion_timestamp.is_some() {
        // Children go with the garbage collector through their owner references.
        ctx.secrets.record(&namespace, &mw.name_any(), &Default::default());
        return Ok(Action::await_change());
    }
    let key = format!("Middleware/{namespace}/{}", mw.name_any());

    let bundle = Bundle {
        middleware: mw.as_ref().clone(),
        cache_policies: accepted_for(&mw, &ctx.stores.cache_policies.state()),
        event_routes: accepted_for(&mw, &ctx.stores.event_routes.state()),
        auth_policies: accepted_for(&mw, &ctx.stores.auth_policies.state()),
    };
    let (mut stall, secret_versions) = check(&bundle, &ctx).await?;
    let desired = render::render(&bundle, &ctx.config.render, &secret_versions)?;

    if stall.is_none() && !mw.spec.paused {
        match apply_children(&mw, &desired, &ctx).await {
            Ok(()) => {}
            Err(error) => match refused(&error) {
                // The API server refused what we rendered from the spec (e.g. an invalid pod label): only
                // the user can fix that, so it is a condition, not an error to retry.
                Some(message) => stall = Some(Stall { reason: reasons::APPLY_FAILED, message }),
                None => {
                    // Worth retrying (a 5xx, a timeout), and retried with backoff; but one that goes on
                    // (a full Service IP range, a webhook that is down) must show where users look.
                    // The message names the bound, not the time so far: a retry that fails alike writes nothing.
                    let bound = ctx.config.apply_stall_after;
                    if ctx.failing_for(&key).is_some_and(|failing| failing >= bound) {
                        let stall = Stall {
                            reason: reasons::APPLY_FAILING,
                            message: format!(
                                "writing this Middleware's children has failed for more than {bound:?}: {error}; the operator keeps retrying"
                            ),
                        };
                        ctx.metrics.reconcile_stalled.with_label_values(&[stall.reason]).inc();
                        // Best effort: the reconcile fails and is retried either way.
                        if let Err(error) = report(&mw, &bundle, &desired, Some(&stall), &ctx).await {
                            tracing::warn!(%error, "could not report the failing writes on the Middleware's status");
                        }
                    }
                    return Err(error);
                }
            },
        }
    }

    if let Some(stall) = &stall {
        ctx.metrics.reconcile_stalled.with_label_values(&[stall.reason]).inc();
        tracing::info!(reason = stall.reason, message = %stall.message, "stalled until the user acts");
    }
    report(&mw, &bundle, &desired, stall.as_ref(), &ctx).await?;

    ctx.succeeded(&key);
    timer.observe_duration();
    Ok(match stall {
        // The Secrets it uses are watched; looking again now and then is a safety net.
        Some(_) => Action::requeue(ctx.config.stall_retry),
        None => Action::requeue(ctx.config.resync),
    })
}

/// Writes the Middleware's status from what it has now: its Deployment, its pods and the stall, if any.
async fn report(
    mw: &Middleware,
    bundle: &Bundle,
    desired: &Desired,
    stall: Option<&Stall>,
    ctx: &Context,
) -> Result<(), Error> {
    let namespace = mw.namespace().unwrap_or_default();
    let deployment = ctx.stores.deployments.get(&ObjectRef::new(&child_name(mw)).within(&namespace));
    let now = Time(Timestamp::now());
    let pods = health::current(mw, &ctx.stores.pods.state(), ctx.health.get(&namespace, &mw.name_any()));
    let mut status = status_of(mw, deployment.as_deref(), desired, stall, &pods, &now);
    status.policies = attached(bundle, &pods, &desired.config_hash);
    write_status(mw, status, ctx).await
}

/// When the API server refused a child for a reason the user must fix, the message to show them.
fn refused(error: &Error) -> Option<String> {
    let Error::Apply { kind, name, source: kube::Error::Api(status) } = error else { return None };
    match status.code {
        // A ResourceQuota and an admission webhook also answer 403: neither is a missing permission.
        403 if status.message.contains("exceeded quota") => Some(format!(
            "the namespace's ResourceQuota refused {kind} {name}: {}; raise the quota or ask for less in the Middleware",
            status.message
        )),
        403 if status.message.contains("admission webhook") => Some(format!(
            "an admission webhook refused {kind} {name}, rendered from this Middleware: {}",
            status.message
        )),
        403 => Some(format!(
            "the operator may not write {kind} {name}: {}; grant it the permissions of the Helm chart's ClusterRole",
            status.message
        )),
        400 | 404 | 422 => Some(format!(
            "the API server refused {kind} {name}, rendered from this Middleware: {}; correct the Middleware spec",
            status.message
        )),
        _ => None,
    }
}

/// Semantic checks beyond the CRD schema, and that every Secret the pods need exists (with the key they
/// need). Returns the Secrets' resourceVersions, which roll the pods when a Secret changes.
async fn check(bundle: &Bundle, ctx: &Context) -> Result<(Option<Stall>, BTreeMap<String, String>), Error> {
    let mw = &bundle.middleware;
    let mut versions = BTreeMap::new();
    let name = mw.name_any();
    if name.len() > MAX_NAME_LEN {
        let stall = Stall {
            reason: reasons::INVALID_SPEC,
            message: format!(
                "the name is {} characters long; Middleware names may have at most {MAX_NAME_LEN} so that the names of its children stay valid; recreate it with a shorter name",
                name.len()
            ),
        };
        return Ok((Some(stall), versions));
    }
    // The rules a data plane checks when it loads the configuration; a configuration it would refuse is
    // never rolled out (new pods could not start with it).
    let violations = umw_crds::validate::validate(bundle);
    if !violations.is_empty() {
        let problems: Vec<String> =
            violations.iter().map(|v| format!("{} {}: {}", v.resource, v.path, v.message)).collect();
        let stall = Stall {
            reason: reasons::INVALID_SPEC,
            message: format!("the data plane would refuse this configuration: {}", problems.join("; ")),
        };
        return Ok((Some(stall), versions));
    }
    let namespace = mw.namespace().unwrap_or_default();
    let uses = render::secret_uses(bundle);
    // Recorded first, so that a Secret that is missing now triggers this Middleware when it appears.
    let names: std::collections::BTreeSet<String> = uses.iter().map(|(_, u)| u.secret_name().to_string()).collect();
    ctx.secrets.record(&namespace, &mw.name_any(), &names);
    for (field, secret_use) in uses {
        let secret_name = secret_use.secret_name().to_string();
        // Existence and version from the watched metadata; the keys are read once per version.
        let version = ctx
            .stores
            .secrets
            .get(&ObjectRef::new(&secret_name).within(&namespace))
            .and_then(|meta| meta.metadata.resource_version.clone());
        let missing = match (&version, &secret_use) {
            (None, _) => Some(format!("Secret {secret_name:?} does not exist in namespace {namespace:?}")),
            (Some(version), SecretUse::Key(reference)) => {
                let keys = secret_keys(ctx, &namespace, &secret_name, version).await?;
                match keys {
                    None => Some(format!("Secret {secret_name:?} does not exist in namespace {namespace:?}")),
                    Some(keys) if !keys.contains(&reference.key) => {
                        Some(format!("Secret {secret_name:?} has no key {:?}", reference.key))
                    }
                    Some(_) => None,
                }
            }
            (Some(version), SecretUse::Watched { keys: needed, .. }) => {
                match secret_keys(ctx, &namespace, &secret_name, version).await? {
                    None => Some(format!("Secret {secret_name:?} does not exist in namespace {namespace:?}")),
                    Some(keys) => needed
                        .iter()
                        .find(|key| !keys.contains(**key as &str))
                        .map(|key| format!("Secret {secret_name:?} has no key {key:?}")),
                }
            }
            (Some(_), SecretUse::Whole(_)) => None,
        };
        if let Some(missing) = missing {
            let stall = Stall {
                reason: reasons::SECRET_NOT_FOUND,
                message: format!("{missing} (named by {field}); create it or correct the reference"),
            };
            return Ok((Some(stall), versions));
        }
        // A watched Secret's new version is read by the pods in place; it does not roll them.
        if let Some(version) = version.filter(|_| !matches!(secret_use, SecretUse::Watched { .. })) {
            versions.insert(secret_name, version);
        }
    }
    Ok((None, versions))
}

/// The keys of Secret `name` at resourceVersion `version`: from the cache, or read once from the API server
/// (only the key names are kept). `None` when the Secret is gone.
async fn secret_keys(
    ctx: &Context,
    namespace: &str,
    name: &str,
    version: &str,
) -> Result<Option<std::collections::BTreeSet<String>>, Error> {
    if let Some(keys) = ctx.secrets.keys_at(namespace, name, version) {
        return Ok(Some(keys));
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = ctx
        .call(
            || format!("reading Secret {namespace}/{name}"),
            api.get_opt(name),
            |source| Error::ReadSecret { name: name.to_string(), source },
        )
        .await?;
    ctx.metrics.secret_reads.inc();
    let Some(secret) = secret else { return Ok(None) };
    let keys: std::collections::BTreeSet<String> = secret
        .data
        .iter()
        .flat_map(|d| d.keys())
        .chain(secret.string_data.iter().flat_map(|d| d.keys()))
        .cloned()
        .collect();
    let read_version = secret.metadata.resource_version.unwrap_or_else(|| version.to_string());
    ctx.secrets.remember_keys(namespace, name, read_version, keys.clone());
    Ok(Some(keys))
}

/// Applies every rendered child whose render hash differs from the cached one, and deletes owned children
/// that were not rendered this time.
async fn apply_children(mw: &Middleware, desired: &Desired, ctx: &Context) -> Result<(), Error> {
    let stores = &ctx.stores;
    sync(mw, ctx, &stores.service_accounts, vec![desired.service_account.clone()]).await?;
    sync(mw, ctx, &stores.config_maps, vec![desired.config_map.clone()]).await?;
    sync(mw, ctx, &stores.services, vec![desired.service.clone()]).await?;
    hand_replicas_over(mw, desired, ctx).await?;
    sync(mw, ctx, &stores.deployments, vec![desired.deployment.clone()]).await?;
    sync(mw, ctx, &stores.disruption_budgets, desired.disruption_budget.clone().into_iter().collect()).await?;
    sync(mw, ctx, &stores.autoscalers, desired.autoscaler.clone().into_iter().collect()).await?;
    Ok(())
}

/// Field manager that keeps `spec.replicas` when autoscaling takes over.
const HANDOVER_MANAGER: &str = "umw-operator-handover";

/// When autoscaling is switched on, the rendered Deployment stops setting `spec.replicas`. Dropping a field
/// from a server-side apply removes it, which would reset the Deployment to 1 replica until the HPA acts;
/// so the live value is first applied under a second field manager, which keeps it in place.
async fn hand_replicas_over(mw: &Middleware, desired: &Desired, ctx: &Context) -> Result<(), Error> {
    if desired.deployment.spec.replicas.is_some() {
        return Ok(());
    }
    let namespace = mw.namespace().unwrap_or_default();
    let name = desired.deployment.name_any();
    let Some(live) = ctx.stores.deployments.get(&ObjectRef::new(&name).within(&namespace)) else { return Ok(()) };
    let Some(replicas) = live.spec.replicas else { return Ok(()) };
    let ours = live.metadata.managed_fields.iter().flatten().any(|entry| {
        entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry.fields_v1.as_ref().is_some_and(|f| f.0.get("f:spec").and_then(|s| s.get("f:replicas")).is_some())
    });
    if !ours {
        return Ok(());
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": Deployment::api_version(&()),
        "kind": Deployment::kind(&()),
        "metadata": { "name": name },
        "spec": { "replicas": replicas },
    });
    ctx.call(
        || format!("handing replicas of Deployment {namespace}/{name} over to the autoscaler"),
        api.patch(&name, &PatchParams::apply(HANDOVER_MANAGER).force(), &Patch::Apply(&patch)),
        |source| Error::Apply { kind: "Deployment".into(), name: name.clone(), source },
    )
    .await?;
    ctx.metrics.api_writes.with_label_values(&["Deployment", "apply"]).inc();
    Ok(())
}

fn render_hash<K: Resource>(object: &K) -> Option<&String> {
    object.meta().annotations.as_ref().and_then(|a| a.get(RENDER_HASH_ANNOTATION))
}

fn owned_by<K: Resource>(object: &K, mw: &Middleware) -> bool {
    let uid = mw.uid();
    object.meta().owner_references.iter().flatten().any(|owner| Some(&owner.uid) == uid.as_ref())
}

/// Makes the children of one kind exactly `desired`: server-side apply of what changed, delete of what
/// is owned but not desired.
async fn sync<K>(mw: &Middleware, ctx: &Context, store: &Store<K>, desired: Vec<K>) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + Serialize + DeserializeOwned + Debug,
{
    let namespace = mw.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let kind = K::kind(&()).to_string();
    for object in &desired {
        let name = object.name_any();
        let cached = store.get(&ObjectRef::new(&name).within(&namespace));
        if cached.as_deref().is_some_and(|c| render_hash(c) == render_hash(object)) {
            continue;
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        ctx.call(
            || format!("applying {kind} {namespace}/{name}"),
            api.patch(&name, &params, &Patch::Apply(object)),
            |source| Error::Apply { kind: kind.clone(), name: name.clone(), source },
        )
        .await?;
        ctx.metrics.api_writes.with_label_values(&[&kind, "apply"]).inc();
        tracing::info!(kind, name, "applied");
    }
    let wanted: Vec<String> = desired.iter().map(|o| o.name_any()).collect();
    for stale in store.state() {
        let name = stale.name_any();
        if stale.namespace().as_deref() != Some(namespace.as_str())
            || !owned_by(stale.as_ref(), mw)
            || wanted.contains(&name)
        {
            continue;
        }
        match ctx
            .call(
                || format!("deleting {kind} {namespace}/{name}"),
                api.delete(&name, &DeleteParams::background()),
                |source| Error::Delete { kind: kind.clone(), name: name.clone(), source },
            )
            .await
        {
            Ok(_) => {}
            // Already gone: what we wanted.
            Err(Error::Delete { source: kube::Error::Api(status), .. }) if status.code == 404 => {}
            Err(error) => return Err(error),
        }
        ctx.metrics.api_writes.with_label_values(&[&kind, "delete"]).inc();
        tracing::info!(kind, name, "deleted, no longer rendered");
    }
    Ok(())
}

/// The policies in the configuration, each with whether the pods enforce it.
fn attached(bundle: &Bundle, pods: &[PodHealth], desired_hash: &str) -> Vec<AttachedPolicy> {
    fn of<'a, P: Policy>(
        policies: &'a [P],
        pods: &'a [PodHealth],
        desired_hash: &'a str,
    ) -> impl Iterator<Item = AttachedPolicy> + 'a {
        policies.iter().map(move |p| {
            let kind = P::kind(&()).to_string();
            let (enforced, message) = match health::enforcement(pods, desired_hash, &kind, &p.name_any()) {
                health::Enforcement::Enforced(m) => (Some(true), m),
                health::Enforcement::Refused(m) => (Some(false), m),
                health::Enforcement::Waiting(m) => (None, m),
            };
            AttachedPolicy { name: p.name_any(), enforced, message: Some(message), kind }
        })
    }
    let mut all: Vec<AttachedPolicy> = of(&bundle.cache_policies, pods, desired_hash)
        .chain(of(&bundle.event_routes, pods, desired_hash))
        .chain(of(&bundle.auth_policies, pods, desired_hash))
        .collect();
    all.sort();
    all
}

/// Fields set on the Middleware that this version's data plane does not act on yet.
pub fn not_enforced(mw: &Middleware) -> Vec<&'static str> {
    let spec = &mw.spec;
    let mut fields = Vec::new();
    if spec.listeners.grpc.is_some() {
        fields.push("spec.listeners.grpc");
    }
    if spec.listeners.websocket.is_some() {
        fields.push("spec.listeners.websocket");
    }
    fields
}

/// Computes the status from the Middleware, its Deployment, its pods' health reports and the outcome of
/// the checks. Pure.
pub fn status_of(
    mw: &Middleware,
    deployment: Option<&Deployment>,
    desired: &Desired,
    stall: Option<&Stall>,
    pods: &[PodHealth],
    now: &Time,
) -> MiddlewareStatus {
    let generation = mw.metadata.generation;
    let condition = |type_: &str, status: &str, reason: &str, message: String| {
        conditions::new(type_, status, reason, message, generation, now)
    };
    let mut rollout = Rollout::of(deployment, desired, mw.spec.desired_replicas());
    if !rollout.done {
        let unready: Vec<&str> = pods.iter().filter(|p| !p.ready).map(|p| p.pod.as_str()).collect();
        if !unready.is_empty() {
            rollout.message = format!("{}; not ready: {}", rollout.message, unready.join(", "));
        }
    }
    let health = health::summarize(pods, &desired.config_hash);
    let mut note = String::new();
    let unenforced = not_enforced(mw);
    if !unenforced.is_empty() {
        note = format!(" Not enforced by this data-plane version yet: {}.", unenforced.join(", "));
    }

    let (stalled, reconciling, ready) = match stall {
        Some(stall) => (
            condition(types::STALLED, status::TRUE, stall.reason, stall.message.clone()),
            condition(types::RECONCILING, status::FALSE, stall.reason, "stalled until the problem is fixed".into()),
            condition(types::READY, status::FALSE, stall.reason, stall.message.clone()),
        ),
        None => {
            let config_pending = rollout.done
                && rollout.target > 0
                && matches!(health.not_ready, Some((reason, _)) if reason == reasons::CONFIG_PENDING);
            // A pod that refused the configuration will not take it by waiting: stalled until the spec changes
            // (the operator checks what it can before rendering, so this is a data plane of another version).
            let rejected =
                rollout.done && matches!(&health.not_ready, Some((reason, _)) if *reason == reasons::CONFIG_REJECTED);
            // A pod whose container crash-loops or cannot be created will not recover by waiting either.
            let failing: Vec<&str> = pods.iter().filter_map(|p| p.failure.as_deref()).collect();
            let failure = (!failing.is_empty()).then(|| failing.join("; "));
            let stalled = match (&health.not_ready, rejected, &failure) {
                (_, _, Some(failure)) => {
                    condition(types::STALLED, status::TRUE, reasons::PODS_FAILING, failure.clone())
                }
                (Some((reason, message)), true, None) => {
                    condition(types::STALLED, status::TRUE, reason, message.clone())
                }
                _ => condition(types::STALLED, status::FALSE, reasons::AS_EXPECTED, String::new()),
            };
            let reconciling = if mw.spec.paused {
                condition(
                    types::RECONCILING,
                    status::FALSE,
                    reasons::PAUSED,
                    "spec.paused is true: children are left as they are".into(),
                )
            } else if failure.is_some() {
                condition(
                    types::RECONCILING,
                    status::FALSE,
                    reasons::PODS_FAILING,
                    "stalled until the pods can run: see Stalled".into(),
                )
            } else if !rollout.done {
                condition(types::RECONCILING, status::TRUE, rollout.reason, rollout.message.clone())
            } else if config_pending {
                let message = health.not_ready.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
                condition(types::RECONCILING, status::TRUE, reasons::CONFIG_PENDING, message)
            } else {
                condition(types::RECONCILING, status::FALSE, reasons::RECONCILED, String::new())
            };
            let ready = if rollout.done && rollout.target == 0 {
                condition(
                    types::READY,
                    status::TRUE,
                    reasons::SCALED_TO_ZERO,
                    format!("scaled to zero replicas.{note}"),
                )
            } else if let Some(failure) = failure.as_ref().filter(|_| !rollout.done || health.not_ready.is_some()) {
                condition(types::READY, status::FALSE, reasons::PODS_FAILING, format!("{failure}.{note}"))
            } else if !rollout.done {
                condition(types::READY, status::FALSE, rollout.reason, format!("{}.{note}", rollout.message))
            } else if let Some((reason, message)) = &health.not_ready {
                condition(types::READY, status::FALSE, reason, format!("{message}.{note}"))
            } else if pods.iter().any(|p| p.ready && p.read) {
                let message = format!(
                    "{}, all on configuration {}.{note}",
                    rollout.message,
                    health.applied.as_deref().unwrap_or(&desired.config_hash)
                );
                condition(types::READY, status::TRUE, reasons::AVAILABLE, message)
            } else {
                condition(
                    types::READY,
                    status::FALSE,
                    reasons::HEALTH_UNKNOWN,
                    format!("{}, but no pod has reported its health yet.{note}", rollout.message),
                )
            };
            // kstatus reads only Reconciling and Stalled: a Middleware that is not ready, not stalled and not
            // paused is still converging, whatever the reason Ready gives.
            let reconciling = if ready.status != status::TRUE
                && stalled.status != status::TRUE
                && reconciling.status != status::TRUE
                && !mw.spec.paused
            {
                condition(types::RECONCILING, status::TRUE, &ready.reason, ready.message.clone())
            } else {
                reconciling
            };
            (stalled, reconciling, ready)
        }
    };
    let degraded = match &health.degraded {
        None => condition(
            types::DEGRADED,
            status::UNKNOWN,
            reasons::HEALTH_NOT_REPORTED,
            "no data-plane pod has reported its health yet".into(),
        ),
        Some((true, message)) => condition(types::DEGRADED, status::TRUE, reasons::COMPONENT_DEGRADED, message.clone()),
        Some((false, _)) => condition(types::DEGRADED, status::FALSE, reasons::AS_EXPECTED, String::new()),
    };
    let existing = mw.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let dep_status = deployment.and_then(|d| d.status.as_ref());
    MiddlewareStatus {
        observed_generation: generation,
        conditions: conditions::merge(existing, vec![ready, reconciling, stalled, degraded]),
        replicas: Some(dep_status.and_then(|s| s.replicas).unwrap_or(0)),
        ready_replicas: Some(dep_status.and_then(|s| s.ready_replicas).unwrap_or(0)),
        updated_replicas: Some(dep_status.and_then(|s| s.updated_replicas).unwrap_or(0)),
        selector: Some(render::selector_string(mw)),
        config_hash: Some(desired.config_hash.clone()),
        applied_config_hash: health.applied.clone(),
        policies: Vec::new(),
        components: health
            .components
            .into_iter()
            .map(|(name, state, message)| umw_crds::middleware::ComponentStatus { name, state, message })
            .collect(),
    }
}

/// Progress of the Deployment towards the rendered one.
struct Rollout {
    done: bool,
    target: i32,
    reason: &'static str,
    message: String,
}

impl Rollout {
    fn of(deployment: Option<&Deployment>, desired: &Desired, fallback_replicas: i32) -> Self {
        let Some(deployment) = deployment else {
            return Self {
                done: false,
                target: fallback_replicas,
                reason: reasons::PROGRESSING,
                message: "creating the Deployment".into(),
            };
        };
        let target = deployment.spec.replicas.unwrap_or(fallback_replicas);
        let current = render_hash(deployment) == render_hash(&desired.deployment);
        let status = deployment.status.clone().unwrap_or_default();
        let observed = status.observed_generation >= deployment.metadata.generation;
        let updated = status.updated_replicas.unwrap_or(0);
        let available = status.available_replicas.unwrap_or(0);
        let total = status.replicas.unwrap_or(0);
        if !current || !observed {
            return Self {
                done: false,
                target,
                reason: reasons::PROGRESSING,
                message: "the Deployment is being updated".into(),
            };
        }
        if updated < target || total > target {
            return Self {
                done: false,
                target,
                reason: reasons::PROGRESSING,
                message: format!("rolling out: {updated} of {target} pods updated, {total} pods in all"),
            };
        }
        if available < target {
            return Self {
                done: false,
                target,
                reason: reasons::PODS_NOT_READY,
                message: format!(
                    "{available} of {target} pods available; see `kubectl describe deployment {}`",
                    deployment.name_any()
                ),
            };
        }
        Self {
            done: true,
            target,
            reason: reasons::AVAILABLE,
            message: format!("{available} of {target} pods available"),
        }
    }
}

/// Writes the status when it differs from the cached one, and publishes Events on transitions.
async fn write_status(mw: &Middleware, new_status: MiddlewareStatus, ctx: &Context) -> Result<(), Error> {
    let old = mw.status.clone().unwrap_or_default();
    if old == new_status {
        return Ok(());
    }
    let name = mw.name_any();
    let namespace = mw.namespace().unwrap_or_default();
    let api: Api<Middleware> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": Middleware::api_version(&()),
        "kind": Middleware::kind(&()),
        "status": new_status,
    });
    ctx.call(
        || format!("writing the status of Middleware {namespace}/{name}"),
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)),
        |source| Error::WriteStatus { kind: "Middleware".into(), name: name.clone(), source },
    )
    .await?;
    ctx.metrics.api_writes.with_label_values(&["Middleware", "status"]).inc();

    for (type_, event_type) in [(types::STALLED, EventType::Warning), (types::READY, EventType::Normal)] {
        let before = conditions::find(&old.conditions, type_);
        let after = conditions::find(&new_status.conditions, type_);
        if let Some(after) =
            after.filter(|a| a.status == status::TRUE && before.is_none_or(|b| b.status != status::TRUE))
        {
            publish_condition(mw, ctx, event_type, after).await;
        }
    }
    if old.config_hash.is_some() && old.config_hash != new_status.config_hash {
        let note = format!("data-plane configuration is now {}", new_status.config_hash.as_deref().unwrap_or(""));
        ctx.publish(mw, EventType::Normal, "ConfigUpdated", note).await;
    }
    Ok(())
}

async fn publish_condition(mw: &Middleware, ctx: &Context, event_type: EventType, condition: &Condition) {
    let note = if condition.message.is_empty() { condition.type_.clone() } else { condition.message.clone() };
    ctx.publish(mw, event_type, &condition.reason, note).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{Settings, render};

    #[test]
    fn a_refusal_names_its_cause_rbac_quota_webhook_or_spec() {
        let refusal = |code: u16, message: &str| {
            let status = kube::core::Status { code, message: message.into(), ..Default::default() };
            let error = Error::Apply {
                kind: "Service".into(),
                name: "shop".into(),
                source: kube::Error::Api(Box::new(status)),
            };
            refused(&error)
        };
        let rbac = refusal(403, "services \"shop\" is forbidden: User \"umw\" cannot patch resource").unwrap();
        assert!(rbac.contains("ClusterRole"), "{rbac}");
        let quota = refusal(403, "services \"shop\" is forbidden: exceeded quota: q, requested: services=1").unwrap();
        assert!(quota.contains("ResourceQuota") && !quota.contains("ClusterRole"), "{quota}");
        let webhook = refusal(403, "admission webhook \"policy.example\" denied the request: no").unwrap();
        assert!(webhook.contains("admission webhook") && !webhook.contains("ClusterRole"), "{webhook}");
        assert!(refusal(422, "spec.ports: Invalid value").unwrap().contains("correct the Middleware spec"));
        assert_eq!(refusal(500, "etcdserver: request timed out"), None, "a server error is retried");
    }
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use umw_crds::MiddlewareSpec;

    fn now() -> Time {
        Time(Timestamp::from_second(1_000).unwrap())
    }

    fn fixture(replicas: i32) -> (Middleware, Desired) {
        let mut mw = Middleware::new("shop", MiddlewareSpec { replicas: Some(replicas), ..MiddlewareSpec::default() });
        mw.metadata.namespace = Some("ns".into());
        mw.metadata.generation = Some(3);
        let desired = render(
            &Bundle { middleware: mw.clone(), ..Bundle::default() },
            &Settings { dataplane_image: "x".into() },
            &BTreeMap::new(),
        )
        .unwrap();
        (mw, desired)
    }

    fn rolled_out(desired: &Desired, ready: i32) -> Deployment {
        let mut deployment = desired.deployment.clone();
        deployment.metadata.generation = Some(1);
        deployment.status = Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(2),
            updated_replicas: Some(2),
            ready_replicas: Some(ready),
            available_replicas: Some(ready),
            ..DeploymentStatus::default()
        });
        deployment
    }

    fn condition<'a>(status: &'a MiddlewareStatus, type_: &str) -> &'a Condition {
        conditions::find(&status.conditions, type_).unwrap()
    }

    fn healthy(desired: &Desired, names: &[&str]) -> Vec<PodHealth> {
        names
            .iter()
            .map(|name| PodHealth {
                pod: (*name).into(),
                ready: true,
                read: true,
                report: Ok(health::Report {
                    config_hash: desired.config_hash.clone(),
                    ready: true,
                    not_ready_reason: None,
                    components: vec![health::Component {
                        name: "config".into(),
                        state: "Up".into(),
                        message: String::new(),
                        required: true,
                    }],
                    policies: Vec::new(),
                }),
                failure: None,
            })
            .collect()
    }

    #[test]
    fn ready_when_every_pod_is_available_on_the_current_configuration() {
        let (mw, desired) = fixture(2);
        let pods = healthy(&desired, &["a", "b"]);
        let status = status_of(&mw, Some(&rolled_out(&desired, 2)), &desired, None, &pods, &now());
        assert_eq!(condition(&status, types::READY).status, status::TRUE);
        assert_eq!(condition(&status, types::RECONCILING).status, status::FALSE);
        assert_eq!(condition(&status, types::READY).observed_generation, Some(3));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.ready_replicas, Some(2));
        assert_eq!(status.applied_config_hash.as_deref(), Some(desired.config_hash.as_str()));
        assert_eq!(condition(&status, types::DEGRADED).status, status::FALSE);
    }

    #[test]
    fn a_pod_on_an_old_configuration_or_unreachable_keeps_it_unready_naming_the_pod() {
        let (mw, desired) = fixture(2);
        let mut pods = healthy(&desired, &["a", "b"]);
        if let Ok(report) = &mut pods[1].report {
            report.config_hash = "old".into();
        }
        let status = status_of(&mw, Some(&rolled_out(&desired, 2)), &desired, None, &pods, &now());
        let ready = condition(&status, types::READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), (status::FALSE, reasons::CONFIG_PENDING));
        assert!(ready.message.contains("pod b runs configuration old"), "{}", ready.message);
        assert_eq!(condition(&status, types::RECONCILING).status, status::TRUE);
        pods[1].report = Err("cannot read /status: connection refused".into());
        let status = status_of(&mw, Some(&rolled_out(&desired, 2)), &desired, None, &pods, &now());
        let ready = condition(&status, types::READY);
        assert_eq!(ready.reason, reasons::HEALTH_UNKNOWN);
        assert!(ready.message.starts_with("pod b: cannot read /status"), "{}", ready.message);
    }

    #[test]
    fn a_degraded_component_sets_degraded_with_the_pod_and_component() {
        let (mw, desired) = fixture(1);
        let mut pods = healthy(&desired, &["a"]);
        if let Ok(report) = &mut pods[0].report {
            report.components.push(health::Component {
                name: "upstream http://x:80".into(),
                state: "Degraded".into(),
                message: "circuit breaker open".into(),
                required: false,
            });
        }
        let mut deployment = rolled_out(&desired, 1);
        deployment.status.as_mut().unwrap().replicas = Some(1);
        deployment.status.as_mut().unwrap().updated_replicas = Some(1);
        let status = status_of(&mw, Some(&deployment), &desired, None, &pods, &now());
        let degraded = condition(&status, types::DEGRADED);
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), (status::TRUE, reasons::COMPONENT_DEGRADED));
        assert!(degraded.message.contains("pod a: circuit breaker open"), "{}", degraded.message);
        assert_eq!(condition(&status, types::READY).status, status::TRUE, "degraded still serves");
        assert!(status.components.iter().any(|c| c.state == "Degraded"));
    }

    #[test]
    fn reconciling_while_pods_are_not_ready() {
        let (mw, desired) = fixture(2);
        let mut pods = healthy(&desired, &["a", "b"]);
        pods[1].ready = false;
        let status = status_of(&mw, Some(&rolled_out(&desired, 1)), &desired, None, &pods, &now());
        let ready = condition(&status, types::READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), (status::FALSE, reasons::PODS_NOT_READY));
        assert!(ready.message.contains("not ready: b"), "the unready pod is named: {}", ready.message);
        assert_eq!(condition(&status, types::RECONCILING).status, status::TRUE);
        let status = status_of(&mw, None, &desired, None, &[], &now());
        assert_eq!(condition(&status, types::RECONCILING).reason, reasons::PROGRESSING);
    }

    #[test]
    fn a_crash_looping_pod_stalls_the_middleware_with_its_reason() {
        let (mw, desired) = fixture(2);
        let mut pods = healthy(&desired, &["a", "b"]);
        pods[1].ready = false;
        pods[1].failure = Some("pod b: CrashLoopBackOff (2 restart(s)); last exit code 1: bad".into());
        let status = status_of(&mw, Some(&rolled_out(&desired, 1)), &desired, None, &pods, &now());
        let stalled = condition(&status, "Stalled");
        assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", "PodsFailing"));
        assert!(stalled.message.contains("pod b: CrashLoopBackOff") && stalled.message.contains("bad"));
        let ready = condition(&status, "Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "PodsFailing"), "not a bare PodsNotReady");
        assert_eq!(condition(&status, "Reconciling").status, "False");
        pods[1].failure = None;
        let status = status_of(&mw, Some(&rolled_out(&desired, 1)), &desired, None, &pods, &now());
        assert_eq!(condition(&status, "Stalled").status, "False");
    }

    #[test]
    fn stalled_says_what_to_fix() {
        let (mw, desired) = fixture(1);
        let stall = Stall { reason: reasons::SECRET_NOT_FOUND, message: "Secret \"x\" does not exist".into() };
        let status = status_of(&mw, None, &desired, Some(&stall), &[], &now());
        let stalled = condition(&status, types::STALLED);
        assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), (status::TRUE, reasons::SECRET_NOT_FOUND));
        assert_eq!(condition(&status, types::READY).status, status::FALSE);
        assert_eq!(condition(&status, types::RECONCILING).status, status::FALSE);
    }

    #[test]
    fn unchanged_inputs_give_an_equal_status() {
        let (mut mw, desired) = fixture(2);
        let deployment = rolled_out(&desired, 2);
        let pods = healthy(&desired, &["a", "b"]);
        let first = status_of(&mw, Some(&deployment), &desired, None, &pods, &now());
        mw.status = Some(first.clone());
        let later = Time(Timestamp::from_second(2_000).unwrap());
        assert_eq!(status_of(&mw, Some(&deployment), &desired, None, &pods, &later), first);
    }
}
