//! The controllers: one for Middlewares, one per policy kind. They share one watch per kind
//! ([`crate::shared`]) and one [`Context`].

mod middleware;
mod policy;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use umw_crds::{AuthPolicy, CachePolicy, EventRoute, Middleware, Policy};

use crate::metrics::Metrics;
use crate::render::{MANAGED_BY, Settings};
use crate::shared::{self, trigger};

/// The one field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "umw-operator";

/// Operator-wide configuration of the controllers.
#[derive(Clone, Debug)]
pub struct Config {
    pub render: Settings,
    /// Namespace to watch; `None` watches all namespaces.
    pub namespace: Option<String>,
    /// Deadline of every API call.
    pub api_timeout: Duration,
    /// Reconcile every object at least this often, even without a change.
    pub resync: Duration,
    /// Retry interval of a stalled Middleware (a safety net: the Secrets it uses are watched).
    pub stall_retry: Duration,
    /// How long writing a Middleware's children may keep failing with an error worth retrying before the
    /// Middleware says so (`Stalled`, `ApplyFailing`, with the API server's message).
    pub apply_stall_after: Duration,
    /// Name of this replica, for Events.
    pub instance: String,
    /// How the data-plane pods' health is read.
    pub health: crate::health::PollSettings,
}

/// Read-only caches of every kind the controllers read.
#[derive(Clone)]
pub struct Stores {
    pub middlewares: Store<Middleware>,
    pub cache_policies: Store<CachePolicy>,
    pub event_routes: Store<EventRoute>,
    pub auth_policies: Store<AuthPolicy>,
    pub config_maps: Store<ConfigMap>,
    pub service_accounts: Store<ServiceAccount>,
    pub services: Store<Service>,
    pub deployments: Store<Deployment>,
    pub disruption_budgets: Store<PodDisruptionBudget>,
    pub autoscalers: Store<HorizontalPodAutoscaler>,
    pub pods: Store<Pod>,
    /// Secrets' metadata only (names and resourceVersions; their data stays on the API server).
    pub secrets: Store<PartialObjectMeta<Secret>>,
}

/// Which Middlewares use which Secrets, as their last reconcile found, so that a Secret created, changed
/// or deleted triggers exactly those; and the keys each Secret version has, so that a reconcile reads a
/// Secret from the API server only when its resourceVersion is new.
#[derive(Default)]
pub struct Secrets {
    /// (namespace, Secret) → Middlewares using it.
    users: Mutex<HashMap<SecretKey, BTreeSet<String>>>,
    /// (namespace, Secret) → (resourceVersion, its keys).
    keys: Mutex<HashMap<SecretKey, (String, BTreeSet<String>)>>,
}

/// A Secret by namespace and name.
type SecretKey = (String, String);

impl Secrets {
    /// Records the Secrets Middleware `mw` of `namespace` uses now, forgetting those it no longer uses.
    pub fn record(&self, namespace: &str, mw: &str, secrets: &BTreeSet<String>) {
        let Ok(mut users) = self.users.lock() else { return };
        users.retain(|(ns, secret), names| {
            if ns == namespace && !secrets.contains(secret) {
                names.remove(mw);
            }
            !names.is_empty()
        });
        for secret in secrets {
            users.entry((namespace.to_string(), secret.clone())).or_default().insert(mw.to_string());
        }
    }

    /// The Middlewares that use Secret `name` of `namespace`.
    fn users(&self, namespace: &str, name: &str) -> Vec<String> {
        let Ok(users) = self.users.lock() else { return Vec::new() };
        users.get(&(namespace.to_string(), name.to_string())).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// The keys of Secret `name` at `version`, when they were read before.
    pub fn keys_at(&self, namespace: &str, name: &str, version: &str) -> Option<BTreeSet<String>> {
        let keys = self.keys.lock().ok()?;
        let (seen, keys) = keys.get(&(namespace.to_string(), name.to_string()))?;
        (seen == version).then(|| keys.clone())
    }

    pub fn remember_keys(&self, namespace: &str, name: &str, version: String, keys: BTreeSet<String>) {
        if let Ok(mut cache) = self.keys.lock() {
            cache.insert((namespace.to_string(), name.to_string()), (version, keys));
        }
    }
}

/// Mapper for the Middleware controller: a Secret event triggers the Middlewares that use the Secret.
fn secret_users(secrets: Arc<Secrets>) -> impl Fn(PartialObjectMeta<Secret>) -> Vec<ObjectRef<Middleware>> {
    move |secret: PartialObjectMeta<Secret>| {
        let namespace = secret.namespace().unwrap_or_default();
        secrets
            .users(&namespace, &secret.name_any())
            .into_iter()
            .map(|mw| ObjectRef::new(&mw).within(&namespace))
            .collect()
    }
}

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub config: Config,
    /// What the data-plane pods last reported.
    pub health: crate::health::HealthCache,
    /// Who uses which Secret, and the keys of the Secret versions read.
    pub secrets: Arc<Secrets>,
    /// Consecutive failures per object, for per-object backoff.
    failures: Mutex<HashMap<String, Failures>>,
}

/// An object's reconciles failing in a row.
struct Failures {
    count: u32,
    since: std::time::Instant,
}

/// Errors of a reconcile. Problems the user must fix are not errors: they become conditions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {kind} {name}: {source}")]
    Apply { kind: String, name: String, source: kube::Error },
    #[error("deleting {kind} {name}: {source}")]
    Delete { kind: String, name: String, source: kube::Error },
    #[error("writing the status of {kind} {name}: {source}")]
    WriteStatus { kind: String, name: String, source: kube::Error },
    #[error("reading Secret {name}: {source}")]
    ReadSecret { name: String, source: kube::Error },
    #[error("{operation}: the API server did not answer within {timeout:?}")]
    Timeout { operation: String, timeout: Duration },
    #[error(transparent)]
    Render(#[from] crate::render::RenderError),
}

impl Error {
    /// Error class for the `error` metric label.
    pub fn class(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::WriteStatus { .. } => "write_status",
            Error::ReadSecret { .. } => "read_secret",
            Error::Timeout { .. } => "timeout",
            Error::Render(_) => "render",
        }
    }
}

impl Context {
    /// Runs an API call under the configured deadline.
    pub async fn call<T>(
        &self,
        operation: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, kube::Error>>,
        on_error: impl FnOnce(kube::Error) -> Error,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.config.api_timeout, fut).await {
            Ok(result) => result.map_err(on_error),
            Err(_) => Err(Error::Timeout { operation: operation(), timeout: self.config.api_timeout }),
        }
    }

    /// Publishes a Kubernetes Event about `object`; failures are logged, never fatal.
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        let reference = object.object_ref(&());
        self.metrics.api_writes.with_label_values(&["Event", "create"]).inc();
        match tokio::time::timeout(self.config.api_timeout, self.recorder.publish(&event, &reference)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, reason, "could not publish an Event"),
            Err(_) => tracing::warn!(reason, "publishing an Event timed out"),
        }
    }

    fn succeeded(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }

    /// How long the object's reconciles have been failing in a row (`None`: the last one succeeded). A
    /// failure counts from the first of the row.
    fn failing_for(&self, key: &str) -> Option<Duration> {
        self.failures.lock().ok()?.get(key).map(|f| f.since.elapsed())
    }

    /// Exponential backoff per object: 1s, 2s, 4s, ... up to 5 minutes.
    fn backoff(&self, key: &str) -> Duration {
        let attempt = match self.failures.lock() {
            Ok(mut failures) => {
                let entry = failures
                    .entry(key.to_string())
                    .or_insert_with(|| Failures { count: 0, since: std::time::Instant::now() });
                entry.count = entry.count.saturating_add(1);
                entry.count
            }
            Err(_) => 1,
        };
        let seconds = 1u64.checked_shl(attempt.saturating_sub(1).min(9)).unwrap_or(512).min(300);
        Duration::from_secs(seconds)
    }
}

/// Shared error policy: log, count, back off per object.
fn error_policy<K: Resource<DynamicType = ()> + ResourceExt>(
    object: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let controller = K::kind(&()).to_lowercase();
    let key = format!("{}/{}/{}", K::kind(&()), object.namespace().unwrap_or_default(), object.name_any());
    let delay = ctx.backoff(&key);
    ctx.metrics.reconcile_errors.with_label_values(&[&controller, error.class()]).inc();
    tracing::warn!(%error, object = %key, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Remembers the targets each policy had when last seen, so that a policy moved to another Middleware (or
/// deleted) also triggers the one it left: that one must drop it from its configuration, and a policy that
/// conflicted with it there may now win.
#[derive(Default)]
struct TargetMemory(Mutex<HashMap<(String, String), Vec<String>>>);

impl TargetMemory {
    /// The names of the Middlewares the policy targets now or targeted before.
    fn now_and_before<P: Policy>(&self, policy: &P) -> Vec<String> {
        let key = (policy.namespace().unwrap_or_default(), policy.name_any());
        let now: Vec<String> = policy.target_refs().iter().map(|t| t.name.clone()).collect();
        let mut all = match self.0.lock() {
            Ok(mut memory) => memory.insert(key, now.clone()).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        all.extend(now);
        all.sort();
        all.dedup();
        all
    }
}

/// Mapper for the Middleware controller: a policy event triggers every Middleware it targets or targeted.
fn target_middlewares<P: Policy>() -> impl Fn(P) -> Vec<ObjectRef<Middleware>> + Send + Sync + 'static {
    let memory = TargetMemory::default();
    move |policy: P| {
        let namespace = policy.namespace().unwrap_or_default();
        memory.now_and_before(&policy).iter().map(|name| ObjectRef::new(name).within(&namespace)).collect()
    }
}

/// Runs every controller until `shutdown` resolves; calls `synced` once the caches are filled.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
    synced: impl FnOnce(),
) {
    let shutdown = shutdown.shared();
    let all = watcher::Config::default().any_semantic();
    let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")).any_semantic();
    let ns = &config.namespace;
    let m = || metrics.clone();

    // Subscribers: the Middleware controller, then one per policy controller.
    let mut middlewares = shared::watch(api::<Middleware>(&client, ns), all.clone(), 4, m());
    // Subscribers: the policy's own controller, its peers, the Middleware controller.
    let mut cache_policies = shared::watch(api::<CachePolicy>(&client, ns), all.clone(), 3, m());
    let mut event_routes = shared::watch(api::<EventRoute>(&client, ns), all.clone(), 3, m());
    let mut auth_policies = shared::watch(api::<AuthPolicy>(&client, ns), all.clone(), 3, m());
    let mut config_maps = shared::watch(api::<ConfigMap>(&client, ns), owned.clone(), 1, m());
    let mut service_accounts = shared::watch(api::<ServiceAccount>(&client, ns), owned.clone(), 1, m());
    let mut services = shared::watch(api::<Service>(&client, ns), owned.clone(), 1, m());
    let mut deployments = shared::watch(api::<Deployment>(&client, ns), owned.clone(), 1, m());
    let mut disruption_budgets = shared::watch(api::<PodDisruptionBudget>(&client, ns), owned.clone(), 1, m());
    let mut autoscalers = shared::watch(api::<HorizontalPodAutoscaler>(&client, ns), owned.clone(), 1, m());
    // Pods are read, never triggered on: the health poller notices what matters about them.
    let pods = shared::watch(api::<Pod>(&client, ns), owned, 0, m());
    // Secrets: metadata only, so that one created, changed or deleted reaches its Middlewares in seconds.
    // Annotations go at once: `kubectl apply` keeps a Secret's whole manifest, data included, in one.
    let mut secrets =
        shared::watch_with(api::<PartialObjectMeta<Secret>>(&client, ns), all.clone(), 1, m(), |secret| {
            secret.metadata.annotations = None;
            secret.metadata.managed_fields = None;
        });

    let stores = Stores {
        middlewares: middlewares.store.clone(),
        cache_policies: cache_policies.store.clone(),
        event_routes: event_routes.store.clone(),
        auth_policies: auth_policies.store.clone(),
        config_maps: config_maps.store.clone(),
        service_accounts: service_accounts.store.clone(),
        services: services.store.clone(),
        deployments: deployments.store.clone(),
        disruption_budgets: disruption_budgets.store.clone(),
        autoscalers: autoscalers.store.clone(),
        pods: pods.store.clone(),
        secrets: secrets.store.clone(),
    };
    let secret_index = Arc::new(Secrets::default());
    let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(config.instance.clone()) };
    let health = crate::health::HealthCache::default();
    let (health_changed, health_triggers) = tokio::sync::mpsc::channel(1024);
    let poll_settings = config.health.clone();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        stores: stores.clone(),
        metrics: metrics.clone(),
        config,
        health: health.clone(),
        secrets: secret_index.clone(),
        failures: Mutex::new(HashMap::new()),
    });

    // Wait for every cache to be filled before deciding anything from it.
    let all_ready = futures::future::join_all([
        stores.middlewares.wait_until_ready().boxed(),
        stores.cache_policies.wait_until_ready().boxed(),
        stores.event_routes.wait_until_ready().boxed(),
        stores.auth_policies.wait_until_ready().boxed(),
        stores.config_maps.wait_until_ready().boxed(),
        stores.service_accounts.wait_until_ready().boxed(),
        stores.services.wait_until_ready().boxed(),
        stores.deployments.wait_until_ready().boxed(),
        stores.disruption_budgets.wait_until_ready().boxed(),
        stores.autoscalers.wait_until_ready().boxed(),
        stores.pods.wait_until_ready().boxed(),
        stores.secrets.wait_until_ready().boxed(),
    ]);
    tokio::select! {
        _ = all_ready => {}
        _ = shutdown.clone() => return,
    }
    synced();
    tracing::info!("caches synced; reconciling");
    let poller = tokio::spawn(crate::health::poll(
        stores.middlewares.clone(),
        stores.pods.clone(),
        health,
        poll_settings,
        health_changed,
        metrics,
    ));

    let mut mw_triggers = middlewares.triggers.drain(..);
    let middleware_controller =
        Controller::for_stream(trigger(take_next(&mut mw_triggers)), stores.middlewares.clone())
            .owns_stream(trigger(take(&mut config_maps.triggers)))
            .owns_stream(trigger(take(&mut service_accounts.triggers)))
            .owns_stream(trigger(take(&mut services.triggers)))
            .owns_stream(trigger(take(&mut deployments.triggers)))
            .owns_stream(trigger(take(&mut disruption_budgets.triggers)))
            .owns_stream(trigger(take(&mut autoscalers.triggers)))
            .watches_stream(trigger(cache_policies.triggers.remove(2)), target_middlewares::<CachePolicy>())
            .watches_stream(trigger(event_routes.triggers.remove(2)), target_middlewares::<EventRoute>())
            .watches_stream(trigger(auth_policies.triggers.remove(2)), target_middlewares::<AuthPolicy>())
            .watches_stream(trigger(take(&mut secrets.triggers)), secret_users(secret_index))
            // The health poller asks for a reconcile when a Middleware's pods report something new.
            .reconcile_on(futures::stream::unfold(health_triggers, |mut rx| async move {
                rx.recv().await.map(|object| (object, rx))
            }))
            .graceful_shutdown_on(shutdown.clone())
            .run(middleware::reconcile, error_policy, ctx.clone())
            .for_each(|_| futures::future::ready(()));

    let cache_controller = policy_controller(
        cache_policies,
        stores.cache_policies.clone(),
        take_next(&mut mw_triggers),
        ctx.clone(),
        shutdown.clone(),
    );
    let event_controller = policy_controller(
        event_routes,
        stores.event_routes.clone(),
        take_next(&mut mw_triggers),
        ctx.clone(),
        shutdown.clone(),
    );
    let auth_controller = policy_controller(
        auth_policies,
        stores.auth_policies.clone(),
        take_next(&mut mw_triggers),
        ctx.clone(),
        shutdown.clone(),
    );

    futures::join!(middleware_controller, cache_controller, event_controller, auth_controller);
    poller.abort();
}

fn take<T>(triggers: &mut Vec<T>) -> T {
    // Each watch was created with one trigger per controller that takes one; see `run`.
    triggers.remove(0)
}

fn take_next<T>(iter: &mut impl Iterator<Item = T>) -> T {
    // `run` creates exactly as many subscribers as it takes; running out is a programming error caught by
    // every e2e test, so this cannot fail at run time.
    iter.next().expect("a trigger per subscriber")
}

/// A controller for one policy kind: triggered by the policy, by its peers (a deleted or changed peer can
/// resolve a conflict) and by the Middlewares it targets (a created target resolves `TargetNotFound`).
async fn policy_controller<P>(
    mut shared: shared::Shared<P>,
    store: Store<P>,
    middlewares: tokio::sync::mpsc::Receiver<Middleware>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) where
    P: policy::PolicyKind + DeserializeOwned + Debug,
{
    let own = shared.triggers.remove(0);
    let peers = shared.triggers.remove(0);
    let by_target = store.clone();
    let by_peer = store.clone();
    let memory = TargetMemory::default();
    Controller::for_stream(trigger(own), store)
        .watches_stream(trigger(middlewares), move |mw: Middleware| {
            let (namespace, name) = (mw.namespace(), mw.name_any());
            by_target
                .state()
                .into_iter()
                .filter(|p| p.namespace() == namespace && p.target_refs().iter().any(|t| t.name == name))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(trigger(peers), move |changed: P| {
            let namespace = changed.namespace();
            let targets = memory.now_and_before(&changed);
            by_peer
                .state()
                .into_iter()
                .filter(|p| p.namespace() == namespace && p.name_any() != changed.name_any())
                .filter(|p| p.target_refs().iter().any(|t| targets.contains(&t.name)))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(policy::reconcile::<P>, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}
