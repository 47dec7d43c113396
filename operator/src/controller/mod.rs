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
use crate::shared::{Subscription, Watch};

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
    /// Reconciles running at once, per controller.
    pub max_concurrent_reconciles: u16,
    /// Triggers of one object that arrive within this of each other make one reconcile (0: none merged).
    pub reconcile_debounce: Duration,
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

    fn forget_keys(&self, namespace: &str, name: &str) {
        if let Ok(mut cache) = self.keys.lock() {
            cache.remove(&(namespace.to_string(), name.to_string()));
        }
    }

    /// Forgets the Secret uses of Middlewares that no longer exist.
    fn forget_users_except(&self, exists: impl Fn(&str, &str) -> bool) {
        if let Ok(mut users) = self.users.lock() {
            users.retain(|(namespace, _), names| {
                names.retain(|mw| exists(namespace, mw));
                !names.is_empty()
            });
        }
    }

    pub fn remember_keys(&self, namespace: &str, name: &str, version: String, keys: BTreeSet<String>) {
        if let Ok(mut cache) = self.keys.lock() {
            cache.insert((namespace.to_string(), name.to_string()), (version, keys));
        }
    }
}

/// Mapper for the Middleware controller: a Secret event triggers the Middlewares that use the Secret.
fn secret_users(
    secrets: Arc<Secrets>,
    store: Store<PartialObjectMeta<Secret>>,
) -> impl Fn(PartialObjectMeta<Secret>) -> Vec<ObjectRef<Middleware>> {
    move |secret: PartialObjectMeta<Secret>| {
        let namespace = secret.namespace().unwrap_or_default();
        // Deleted (gone from the store, which is updated first): its keys are no longer worth keeping.
        if store.get(&ObjectRef::from_obj(&secret)).is_none() {
            secrets.forget_keys(&namespace, &secret.name_any());
        }
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

    /// Drops what is remembered about objects that no longer exist: a Middleware deleted while failing, or
    /// after it used Secrets.
    fn sweep(&self) {
        let middlewares = &self.stores.middlewares;
        let exists = |namespace: &str, name: &str| middlewares.get(&ObjectRef::new(name).within(namespace)).is_some();
        self.secrets.forget_users_except(exists);
        let stores = &self.stores;
        if let Ok(mut failures) = self.failures.lock() {
            failures.retain(|key, _| {
                let mut parts = key.splitn(3, '/');
                let (Some(kind), Some(namespace), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                    return false;
                };
                match kind {
                    "Middleware" => stores.middlewares.get(&ObjectRef::new(name).within(namespace)).is_some(),
                    "CachePolicy" => stores.cache_policies.get(&ObjectRef::new(name).within(namespace)).is_some(),
                    "EventRoute" => stores.event_routes.get(&ObjectRef::new(name).within(namespace)).is_some(),
                    "AuthPolicy" => stores.auth_policies.get(&ObjectRef::new(name).within(namespace)).is_some(),
                    _ => false,
                }
            });
        }
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
/// A policy that is gone from the store (the event was its deletion) is forgotten once handled.
struct TargetMemory<P: Resource<DynamicType = ()> + 'static> {
    memory: Mutex<HashMap<(String, String), Vec<String>>>,
    store: Store<P>,
}

impl<P: Policy + Resource<DynamicType = ()> + Clone + 'static> TargetMemory<P> {
    fn new(store: Store<P>) -> Self {
        Self { memory: Mutex::new(HashMap::new()), store }
    }

    /// The names of the Middlewares the policy targets now or targeted before.
    fn now_and_before(&self, policy: &P) -> Vec<String> {
        let key = (policy.namespace().unwrap_or_default(), policy.name_any());
        let now: Vec<String> = policy.target_refs().iter().map(|t| t.name.clone()).collect();
        // The store is updated before the event is handed on: absent now means deleted.
        let deleted = self.store.get(&ObjectRef::from_obj(policy)).is_none();
        let mut all = match self.memory.lock() {
            Ok(mut memory) if deleted => memory.remove(&key).unwrap_or_default(),
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
fn target_middlewares<P: Policy + Resource<DynamicType = ()> + Clone + Send + Sync + 'static>(
    store: Store<P>,
) -> impl Fn(P) -> Vec<ObjectRef<Middleware>> + Send + Sync + 'static {
    let memory = TargetMemory::new(store);
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

    let watch = |config: &watcher::Config| config.clone();
    let mut middlewares = Watch::new(api::<Middleware>(&client, ns), watch(&all), m());
    let mut cache_policies = Watch::new(api::<CachePolicy>(&client, ns), watch(&all), m());
    let mut event_routes = Watch::new(api::<EventRoute>(&client, ns), watch(&all), m());
    let mut auth_policies = Watch::new(api::<AuthPolicy>(&client, ns), watch(&all), m());
    let mut config_maps = Watch::new(api::<ConfigMap>(&client, ns), watch(&owned), m());
    let mut service_accounts = Watch::new(api::<ServiceAccount>(&client, ns), watch(&owned), m());
    let mut services = Watch::new(api::<Service>(&client, ns), watch(&owned), m());
    let mut deployments = Watch::new(api::<Deployment>(&client, ns), watch(&owned), m());
    let mut disruption_budgets = Watch::new(api::<PodDisruptionBudget>(&client, ns), watch(&owned), m());
    let mut autoscalers = Watch::new(api::<HorizontalPodAutoscaler>(&client, ns), watch(&owned), m());
    // Pods are read, never triggered on: the health poller notices what matters about them.
    let pods = Watch::new(api::<Pod>(&client, ns), watch(&owned), m());
    // Secrets: metadata only, so that one created, changed or deleted reaches its Middlewares in seconds.
    let mut secrets = Watch::new(api::<PartialObjectMeta<Secret>>(&client, ns), watch(&all), m());

    // Who is triggered by what.
    let middleware_triggers = MiddlewareTriggers {
        middlewares: middlewares.subscribe(),
        config_maps: config_maps.subscribe(),
        service_accounts: service_accounts.subscribe(),
        services: services.subscribe(),
        deployments: deployments.subscribe(),
        disruption_budgets: disruption_budgets.subscribe(),
        autoscalers: autoscalers.subscribe(),
        cache_policies: cache_policies.subscribe(),
        event_routes: event_routes.subscribe(),
        auth_policies: auth_policies.subscribe(),
        secrets: secrets.subscribe(),
    };
    let cache_triggers = PolicyTriggers::of(&mut cache_policies, &mut middlewares);
    let event_triggers = PolicyTriggers::of(&mut event_routes, &mut middlewares);
    let auth_triggers = PolicyTriggers::of(&mut auth_policies, &mut middlewares);

    let stores = Stores {
        middlewares: middlewares.start(slim::resource),
        cache_policies: cache_policies.start(slim::resource),
        event_routes: event_routes.start(slim::resource),
        auth_policies: auth_policies.start(slim::resource),
        config_maps: config_maps.start(slim::config_map),
        service_accounts: service_accounts.start(slim::service_account),
        services: services.start(slim::service),
        deployments: deployments.start(slim::deployment),
        disruption_budgets: disruption_budgets.start(slim::disruption_budget),
        autoscalers: autoscalers.start(slim::autoscaler),
        pods: pods.start(slim::pod),
        // Annotations go at once: `kubectl apply` keeps a Secret's whole manifest, data included, in one.
        secrets: secrets.start(|secret| {
            secret.metadata.annotations = None;
            secret.metadata.managed_fields = None;
        }),
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
    let sweeper = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                ticks.tick().await;
                ctx.sweep();
            }
        })
    };
    let poller = tokio::spawn(crate::health::poll(
        stores.middlewares.clone(),
        stores.pods.clone(),
        health,
        poll_settings,
        health_changed,
        metrics,
    ));

    let t = middleware_triggers;
    let middleware_controller = Controller::for_stream(t.middlewares.stream(), stores.middlewares.clone())
        .owns_stream(t.config_maps.stream())
        .owns_stream(t.service_accounts.stream())
        .owns_stream(t.services.stream())
        .owns_stream(t.deployments.stream())
        .owns_stream(t.disruption_budgets.stream())
        .owns_stream(t.autoscalers.stream())
        .watches_stream(t.cache_policies.stream(), target_middlewares(stores.cache_policies.clone()))
        .watches_stream(t.event_routes.stream(), target_middlewares(stores.event_routes.clone()))
        .watches_stream(t.auth_policies.stream(), target_middlewares(stores.auth_policies.clone()))
        .watches_stream(t.secrets.stream(), secret_users(secret_index.clone(), stores.secrets.clone()))
        // The health poller asks for a reconcile when a Middleware's pods report something new.
        .reconcile_on(futures::stream::unfold(health_triggers, |mut rx| async move {
            rx.recv().await.map(|object| (object, rx))
        }))
        .with_config(controller_config(ctx.config.max_concurrent_reconciles, ctx.config.reconcile_debounce))
        .graceful_shutdown_on(shutdown.clone())
        .run(middleware::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let cache_controller =
        policy_controller(cache_triggers, stores.cache_policies.clone(), ctx.clone(), shutdown.clone());
    let event_controller =
        policy_controller(event_triggers, stores.event_routes.clone(), ctx.clone(), shutdown.clone());
    let auth_controller = policy_controller(auth_triggers, stores.auth_policies.clone(), ctx.clone(), shutdown.clone());

    futures::join!(middleware_controller, cache_controller, event_controller, auth_controller);
    poller.abort();
    sweeper.abort();
}

/// How often memory about deleted objects is dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The Middleware controller's subscriptions: its own kind, the children it owns, the policies and the
/// Secrets that point at Middlewares.
struct MiddlewareTriggers {
    middlewares: Subscription<Middleware>,
    config_maps: Subscription<ConfigMap>,
    service_accounts: Subscription<ServiceAccount>,
    services: Subscription<Service>,
    deployments: Subscription<Deployment>,
    disruption_budgets: Subscription<PodDisruptionBudget>,
    autoscalers: Subscription<HorizontalPodAutoscaler>,
    cache_policies: Subscription<CachePolicy>,
    event_routes: Subscription<EventRoute>,
    auth_policies: Subscription<AuthPolicy>,
    secrets: Subscription<PartialObjectMeta<Secret>>,
}

/// A policy controller's subscriptions: the policy, its peers (a deleted or changed peer can resolve a
/// conflict) and the Middlewares it targets (a created target resolves `TargetNotFound`).
struct PolicyTriggers<P: Resource<DynamicType = ()>> {
    own: Subscription<P>,
    peers: Subscription<P>,
    targets: Subscription<Middleware>,
}

impl<P> PolicyTriggers<P>
where
    P: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    fn of(policies: &mut Watch<P>, middlewares: &mut Watch<Middleware>) -> Self {
        Self { own: policies.subscribe(), peers: policies.subscribe(), targets: middlewares.subscribe() }
    }
}

/// Reconciles running at once, per controller: bounds the memory of a burst (an operator start over
/// thousands of objects) without slowing a steady state.
fn controller_config(concurrency: u16, debounce: Duration) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(concurrency).debounce(debounce)
}

/// What the stores keep of each kind: what the reconcilers read, and no more. A watch event still carries
/// the whole object; the store, which lives as long as the process, holds this much.
mod slim {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
    use kube::Resource;

    use super::FIELD_MANAGER;

    /// `kubectl apply`'s copy of the whole manifest.
    const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

    /// Every kind: no managed fields, no copy of the last applied manifest.
    pub fn resource<K: Resource>(object: &mut K) {
        let meta = object.meta_mut();
        meta.managed_fields = None;
        if let Some(annotations) = meta.annotations.as_mut() {
            annotations.remove(LAST_APPLIED);
        }
    }

    /// Children are compared by their render hash and owner: their content is not read.
    pub fn config_map(object: &mut ConfigMap) {
        resource(object);
        object.data = None;
        object.binary_data = None;
    }

    pub fn service_account(object: &mut ServiceAccount) {
        resource(object);
        object.secrets = None;
        object.image_pull_secrets = None;
    }

    pub fn service(object: &mut Service) {
        resource(object);
        object.spec = None;
        object.status = None;
    }

    pub fn disruption_budget(object: &mut PodDisruptionBudget) {
        resource(object);
        object.spec = None;
        object.status = None;
    }

    pub fn autoscaler(object: &mut HorizontalPodAutoscaler) {
        resource(object);
        object.spec = Default::default();
        object.status = None;
    }

    /// The status and `spec.replicas` are read (rollout progress, the hand-over to an autoscaler), and
    /// whether the operator's field manager owns `spec.replicas`; the pod template is not.
    pub fn deployment(object: &mut Deployment) {
        let owns_replicas = object.metadata.managed_fields.iter().flatten().any(|entry| {
            entry.manager.as_deref() == Some(FIELD_MANAGER)
                && entry
                    .fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.get("f:spec").and_then(|s| s.get("f:replicas")).is_some())
        });
        let ours = object
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .find(|entry| entry.manager.as_deref() == Some(FIELD_MANAGER))
            .cloned();
        resource(object);
        object.metadata.managed_fields = ours.map(|mut entry| {
            entry.fields_v1 = owns_replicas.then(|| FieldsV1(serde_json::json!({"f:spec": {"f:replicas": {}}})));
            vec![entry]
        });
        object.spec.template = Default::default();
    }

    /// The health poller reads the pod's labels, owners, address, conditions and container states.
    pub fn pod(object: &mut Pod) {
        resource(object);
        object.spec = None;
    }
}

/// A controller for one policy kind: triggered by the policy, by its peers (a deleted or changed peer can
/// resolve a conflict) and by the Middlewares it targets (a created target resolves `TargetNotFound`).
async fn policy_controller<P>(
    triggers: PolicyTriggers<P>,
    store: Store<P>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) where
    P: policy::PolicyKind + DeserializeOwned + Debug,
{
    let PolicyTriggers { own, peers, targets } = triggers;
    let (concurrency, debounce) = (ctx.config.max_concurrent_reconciles, ctx.config.reconcile_debounce);
    let by_target = store.clone();
    let by_peer = store.clone();
    let memory = TargetMemory::new(store.clone());
    Controller::for_stream(own.stream(), store)
        .watches_stream(targets.stream(), move |mw: Middleware| {
            let (namespace, name) = (mw.namespace(), mw.name_any());
            by_target
                .state()
                .into_iter()
                .filter(|p| p.namespace() == namespace && p.target_refs().iter().any(|t| t.name == name))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(peers.stream(), move |changed: P| {
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
        .with_config(controller_config(concurrency, debounce))
        .graceful_shutdown_on(shutdown)
        .run(policy::reconcile::<P>, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;

    fn policy(name: &str, target: &str) -> CachePolicy {
        let mut policy: CachePolicy = serde_yaml::from_str(&format!(
            "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{targetRefs: [{{name: {target}}}], rules: [{{ttl: 1s}}]}}\n"
        ))
        .unwrap();
        policy.metadata.resource_version = Some("1".into());
        policy
    }

    #[test]
    fn a_deleted_policy_triggers_its_last_targets_once_and_is_forgotten() {
        let (store, mut writer) = reflector::store::<CachePolicy>();
        let memory = TargetMemory::new(store);
        let first = policy("p", "a");
        writer.apply_watcher_event(&watcher::Event::Apply(first.clone()));
        assert_eq!(memory.now_and_before(&first), ["a"]);
        let moved = policy("p", "b");
        writer.apply_watcher_event(&watcher::Event::Apply(moved.clone()));
        assert_eq!(memory.now_and_before(&moved), ["a", "b"], "the target it left, and the new one");
        writer.apply_watcher_event(&watcher::Event::Delete(moved.clone()));
        assert_eq!(memory.now_and_before(&moved), ["b"]);
        assert!(memory.memory.lock().unwrap().is_empty(), "nothing kept about a deleted policy");
    }

    #[test]
    fn secret_uses_of_deleted_middlewares_are_forgotten() {
        let secrets = Secrets::default();
        secrets.record("ns", "kept", &BTreeSet::from(["s".to_string()]));
        secrets.record("ns", "deleted", &BTreeSet::from(["s".to_string(), "t".to_string()]));
        secrets.forget_users_except(|_, mw| mw == "kept");
        assert_eq!(secrets.users("ns", "s"), ["kept"]);
        assert!(secrets.users("ns", "t").is_empty());
        assert!(!secrets.users.lock().unwrap().contains_key(&("ns".to_string(), "t".to_string())));
        secrets.remember_keys("ns", "s", "1".into(), BTreeSet::new());
        secrets.forget_keys("ns", "s");
        assert!(secrets.keys_at("ns", "s", "1").is_none());
    }
}
