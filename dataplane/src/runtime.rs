//! The runtime: builds every component from a configuration snapshot, wires them together, and swaps the
//! whole snapshot atomically on reload.
//!
//! A snapshot is immutable. Requests load the current one once, at the start of the chain, and keep it to
//! the end, so a reload never changes the rules under a request in flight. State that must survive a
//! reload (connection pools, circuit breakers, retry budgets) lives in the runtime and is handed to each new
//! snapshot; an upstream that a reload removes is dropped with it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::response::Response;
use futures::future::BoxFuture;
use http::{Request, StatusCode};
use kube::ResourceExt as _;
use serde::Serialize;
use umw_crds::Policy;
use umw_crds::config::Bundle;
use umw_crds::middleware::Route as RouteSpec;
use umw_crds::validate::duration_or;

use crate::chain::Next;
use crate::kernel::config::{Invalid, Loaded};
use crate::kernel::health::{Health, State};
use crate::kernel::metrics::Metrics;
use crate::components::proxy::upstream::{Clients, Overrides, Target, Upstream, Upstreams, component_name};
use crate::kernel::routing::Matcher;
use crate::kernel::telemetry::{self, LogControl, Traces};

/// Default route timeout, as documented on `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default body limit, as documented on `maxBodyBytes`.
pub const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;
/// Default first retry delay, as documented on `retry.backoff`.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// A stage of the chain that a component fills (authentication, rate limiting, authorization, caching).
/// It gets the request and the rest of the chain, and either answers itself or calls `next`.
pub trait Stage: Send + Sync + 'static {
    fn call(&self, request: Request<Body>, next: Next) -> BoxFuture<'static, Response>;
}

/// The chain's slots for this snapshot; empty slots pass requests on.
#[derive(Clone, Default)]
pub struct Stages {
    pub authentication: Option<Arc<dyn Stage>>,
    pub rate_limit: Option<Arc<dyn Stage>>,
    pub authorization: Option<Arc<dyn Stage>>,
    pub cache: Option<Arc<dyn Stage>>,
}

/// Retries of a route.
#[derive(Clone, Debug)]
pub struct Retry {
    pub attempts: u32,
    pub backoff: Duration,
    pub on_statuses: Vec<StatusCode>,
}

/// A compiled route.
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    /// Where the proxy sends requests; `None` for routes an endpoint answers.
    pub upstream: Option<Arc<Upstream>>,
    /// What answers instead of the proxy (event ingest, commands).
    pub endpoint: Option<Endpoint>,
    pub timeout: Duration,
    pub retry: Option<Retry>,
    pub max_body: u64,
    pub schema: Option<Arc<jsonschema::Validator>>,
    pub clients: Clients,
    pub traces: Option<Arc<Traces>>,
    pub metrics: Metrics,
    pub request_duration: prometheus::Histogram,
    pub requests: crate::kernel::metrics::RouteCounters,
}

impl Route {
    /// What serves the route, as `/status` shows it: the upstream's label, `events` or `commands`.
    pub fn target_label(&self) -> String {
        match (&self.upstream, &self.endpoint) {
            (Some(upstream), _) => upstream.label.clone(),
            (None, Some(Endpoint::Command(_) | Endpoint::CommandStatus(_))) => "commands".to_string(),
            (None, _) => "events".to_string(),
        }
    }
}

/// What answers a route's requests instead of the proxy.
#[derive(Clone)]
pub enum Endpoint {
    /// Event ingest: publishes the request's event(s).
    Ingest(Arc<crate::components::events::Ingest>),
    /// `POST /commands/{name}`.
    Command(Arc<crate::components::outbox::commands::Command>),
    /// `GET /commands/{id}`.
    CommandStatus(Arc<crate::components::outbox::commands::Status>),
}

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

/// One configuration, built.
pub struct Snapshot {
    pub hash: String,
    pub middleware: String,
    pub bundle: Bundle,
    pub routes: Vec<Arc<Route>>,
    pub stages: Stages,
    pub sampling_ratio: f64,
    pub traces: Option<Arc<Traces>>,
    pub policies: Vec<PolicyState>,
    pub metrics: Metrics,
    /// Invalidation of this configuration's caches (admin API, events); `None` without CachePolicies.
    pub invalidator: Option<Arc<crate::components::cache::Invalidator>>,
    /// Paths to fetch into the cache.
    pub warmup: crate::components::cache::warmup::Plan,
    /// The Kafka consumers this configuration runs.
    pub consumers: Vec<crate::components::events::build::ConsumerPlan>,
    /// The outbox relays this configuration runs.
    pub relays: Vec<RelayPlan>,
    /// Where commands are kept (for the admin view of dead-lettered rows); `None` without PostgreSQL
    /// and commands.
    pub outbox: Option<Arc<dyn crate::components::outbox::OutboxStore>>,
}

/// An outbox relay the configuration asks for; `key` changes whenever anything it depends on does.
#[derive(Clone)]
pub struct RelayPlan {
    pub key: String,
    pub source: Arc<dyn crate::components::outbox::relay::Source>,
    pub sink: Arc<dyn crate::components::outbox::Sink>,
    pub settings: crate::components::outbox::relay::Settings,
}

impl Snapshot {
    /// The first route whose match takes the request.
    pub fn route_for<B>(&self, request: &Request<B>) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matcher.matches(request))
    }
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied { hash: String },
    Unchanged,
    Rejected(String),
}

/// Everything that outlives a snapshot.
pub struct Runtime {
    current: ArcSwap<Snapshot>,
    upstreams: Mutex<Upstreams>,
    caches: Mutex<Caches>,
    events: Mutex<EventsState>,
    outbox: Mutex<OutboxState>,
    clients: Clients,
    pub health: Health,
    pub metrics: Metrics,
    overrides: Overrides,
    traces: Option<Arc<Traces>>,
    log: LogControl,
    flights: crate::components::cache::stage::Flights,
    bus: Arc<crate::components::events::bus::InProcessBus>,
    memory: Arc<crate::components::outbox::memory::MemoryStore>,
    in_process: bool,
}

/// Where cache entries live, by backend; kept across reloads (a memory cache keeps its entries, Redis its
/// connections).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum CacheBackendKey {
    Memory,
    Redis(crate::components::cache::redis::RedisSettings),
    Tiered(crate::components::cache::redis::RedisSettings),
}

/// Kafka clients, kept across reloads.
#[derive(Default)]
struct EventsState {
    producers: crate::components::events::build::Producers,
    consumers: std::collections::HashMap<String, RunningConsumer>,
}

/// PostgreSQL pools and outbox relays, kept across reloads; the in-process store for standalone use.
#[derive(Default)]
struct OutboxState {
    databases: Databases,
    relays: std::collections::HashMap<String, crate::components::outbox::relay::Relay>,
}

type Databases = std::collections::HashMap<crate::components::outbox::postgres::PgSettings, Arc<crate::components::outbox::postgres::Database>>;

enum RunningConsumer {
    Kafka(crate::components::events::kafka::Consumer),
    Bus(#[allow(dead_code)] crate::components::events::bus::BusConsumer),
}

#[derive(Default)]
struct Caches(std::collections::HashMap<CacheBackendKey, Arc<dyn crate::components::cache::Cache>>);

/// What building a snapshot needs besides the configuration.
struct Parts<'a> {
    clients: &'a Clients,
    health: &'a Health,
    metrics: &'a Metrics,
    overrides: &'a Overrides,
    traces: &'a Option<Arc<Traces>>,
    flights: &'a crate::components::cache::stage::Flights,
    bus: &'a Arc<crate::components::events::bus::InProcessBus>,
    memory: &'a Arc<crate::components::outbox::memory::MemoryStore>,
    in_process: bool,
}

impl Runtime {
    /// Builds the first snapshot. Fails with every problem found.
    pub fn new(
        loaded: &Loaded,
        metrics: Metrics,
        health: Health,
        overrides: Overrides,
        traces: Option<Arc<Traces>>,
        log: LogControl,
    ) -> Result<Self, Invalid> {
        Self::with_options(loaded, metrics, health, overrides, traces, log, false)
    }

    /// Like [`Runtime::new`]; with `in_process`, every backend is the in-process one (memory cache), for
    /// running on a laptop without Redis, Kafka or PostgreSQL.
    #[allow(clippy::too_many_arguments)]
    pub fn with_options(
        loaded: &Loaded,
        metrics: Metrics,
        health: Health,
        overrides: Overrides,
        traces: Option<Arc<Traces>>,
        log: LogControl,
        in_process: bool,
    ) -> Result<Self, Invalid> {
        let clients = Clients::new();
        let flights = crate::components::cache::stage::Flights::default();
        let bus = Arc::new(crate::components::events::bus::InProcessBus::default());
        let memory = Arc::new(crate::components::outbox::memory::MemoryStore::default());
        let mut upstreams = Upstreams::default();
        let mut caches = Caches::default();
        let mut events = EventsState::default();
        let mut outbox = OutboxState::default();
        let parts = Parts {
            clients: &clients,
            health: &health,
            metrics: &metrics,
            overrides: &overrides,
            traces: &traces,
            flights: &flights,
            bus: &bus,
            memory: &memory,
            in_process,
        };
        let snapshot =
            build(loaded, &mut upstreams, &mut caches, &mut events.producers, &mut outbox.databases, &parts)?;
        for upstream in upstreams.0.values() {
            upstream.activate();
        }
        reconcile_consumers(&mut events, &snapshot.consumers, &bus, &health, &metrics);
        reconcile_relays(&mut outbox, &snapshot.relays, &health, &metrics);
        health.set("config", State::Up, format!("configuration {} applied", loaded.hash), true);
        Ok(Self {
            current: ArcSwap::from_pointee(snapshot),
            upstreams: Mutex::new(upstreams),
            caches: Mutex::new(caches),
            events: Mutex::new(events),
            outbox: Mutex::new(outbox),
            clients,
            health,
            metrics,
            overrides,
            traces,
            log,
            flights,
            bus,
            memory,
            in_process,
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Fills the chain's slots of the running snapshot (components do this as they come up).
    pub fn set_stages(&self, stages: Stages) {
        self.current.rcu(|current| {
            Arc::new(Snapshot {
                hash: current.hash.clone(),
                middleware: current.middleware.clone(),
                bundle: current.bundle.clone(),
                routes: current.routes.clone(),
                stages: stages.clone(),
                sampling_ratio: current.sampling_ratio,
                traces: current.traces.clone(),
                policies: current.policies.clone(),
                metrics: current.metrics.clone(),
                invalidator: current.invalidator.clone(),
                warmup: current.warmup.clone(),
                consumers: current.consumers.clone(),
                relays: current.relays.clone(),
                outbox: current.outbox.clone(),
            })
        });
    }

    /// Builds a snapshot from `loaded` and swaps it in; on any problem the running one stays.
    pub fn apply(&self, loaded: &Loaded) -> Outcome {
        if self.current.load().hash == loaded.hash {
            return Outcome::Unchanged;
        }
        let built = {
            let Ok(mut upstreams) = self.upstreams.lock() else {
                return Outcome::Rejected("internal state poisoned".into());
            };
            let Ok(mut caches) = self.caches.lock() else {
                return Outcome::Rejected("internal state poisoned".into());
            };
            let Ok(mut events) = self.events.lock() else {
                return Outcome::Rejected("internal state poisoned".into());
            };
            let Ok(mut outbox) = self.outbox.lock() else {
                return Outcome::Rejected("internal state poisoned".into());
            };
            let mut next = Upstreams(upstreams.0.clone());
            let mut next_caches = Caches(caches.0.clone());
            let mut next_producers = events.producers.clone();
            let mut next_databases = outbox.databases.clone();
            let parts = Parts {
                clients: &self.clients,
                health: &self.health,
                metrics: &self.metrics,
                overrides: &self.overrides,
                traces: &self.traces,
                flights: &self.flights,
                bus: &self.bus,
                memory: &self.memory,
                in_process: self.in_process,
            };
            let built = build(loaded, &mut next, &mut next_caches, &mut next_producers, &mut next_databases, &parts);
            if let Ok(snapshot) = &built {
                outbox.databases = next_databases;
                reconcile_relays(&mut outbox, &snapshot.relays, &self.health, &self.metrics);
                if outbox.databases.is_empty() {
                    self.health.retain(|name| name != crate::components::outbox::COMPONENT);
                }
                let tables: Vec<String> = snapshot
                    .relays
                    .iter()
                    .map(|r| format!("{}{}", crate::components::outbox::relay::COMPONENT_PREFIX, r.source.name()))
                    .collect();
                self.health.retain(|name| {
                    !name.starts_with(crate::components::outbox::relay::COMPONENT_PREFIX) || tables.iter().any(|t| t == name)
                });
                events.producers = next_producers;
                reconcile_consumers(&mut events, &snapshot.consumers, &self.bus, &self.health, &self.metrics);
                if events.producers.is_empty() && events.consumers.is_empty() {
                    self.health.retain(|name| name != crate::components::events::kafka::COMPONENT);
                }
            }
            if built.is_ok() {
                *caches = next_caches;
                if !caches.0.keys().any(|k| matches!(k, CacheBackendKey::Redis(_) | CacheBackendKey::Tiered(_))) {
                    self.health.retain(|name| name != crate::components::cache::redis::COMPONENT);
                }
            }
            if built.is_ok() {
                // Keep only the upstreams the new configuration names; retire the others first (a kept
                // label may belong to a new upstream), then show the new ones.
                let wanted: Vec<Target> = built
                    .as_ref()
                    .map(|s| s.routes.iter().filter_map(|r| r.upstream.as_ref()).map(|u| u.target.clone()).collect())
                    .unwrap_or_default();
                next.0.retain(|target, _| wanted.contains(target));
                for (target, upstream) in &upstreams.0 {
                    if !next.0.contains_key(target) {
                        upstream.retire();
                    }
                }
                for (target, upstream) in &next.0 {
                    if !upstreams.0.contains_key(target) {
                        upstream.activate();
                    }
                }
                *upstreams = next;
            }
            built
        };
        match built {
            Ok(snapshot) => {
                if let Err(message) = self.log.apply(loaded.bundle.middleware.spec.observability.log_level.as_deref()) {
                    tracing::warn!(%message, "the log level of the new configuration is not valid; keeping the old one");
                }
                let labels: Vec<String> = snapshot
                    .routes
                    .iter()
                    .filter_map(|r| r.upstream.as_ref())
                    .map(|u| component_name(&u.label))
                    .collect();
                self.health.retain(|name| !name.starts_with("upstream ") || labels.iter().any(|l| l == name));
                self.current.store(Arc::new(snapshot));
                self.health.set("config", State::Up, format!("configuration {} applied", loaded.hash), true);
                Outcome::Applied { hash: loaded.hash.clone() }
            }
            Err(invalid) => Outcome::Rejected(invalid.to_string()),
        }
    }

    /// Graceful stop of the event clients: consumers finish the messages in hand and commit, producers
    /// wait (up to a few seconds) for their events' acknowledgements. Blocks; call it off the async threads.
    pub fn stop_events(&self) {
        if let Ok(mut outbox) = self.outbox.lock() {
            // Relays stop after the batch in hand; what they did not mark published is published again
            // by the next relay.
            outbox.relays.clear();
        }
        let Ok(mut events) = self.events.lock() else { return };
        for (_, consumer) in events.consumers.drain() {
            if let RunningConsumer::Kafka(consumer) = consumer {
                consumer.stop();
            }
        }
        for producer in events.producers.values() {
            if let Err(error) = producer.flush(crate::components::events::build::FLUSH_TIMEOUT) {
                tracing::warn!(%error, "events still unacknowledged at shutdown");
            }
        }
    }

    /// The configuration on disk is the running one again after a rejection.
    pub fn recovered(&self) {
        let running = self.current.load().hash.clone();
        tracing::info!(hash = %running, "the configuration on disk is valid again (unchanged from the running one)");
        self.health.set("config", State::Up, format!("configuration {running} applied"), true);
    }

    /// Records a configuration that could not be read or built: the old one keeps serving.
    pub fn rejected(&self, reason: &str) {
        let running = self.current.load().hash.clone();
        self.health.set(
            "config",
            State::Degraded,
            format!("a new configuration was rejected, still serving {running}: {reason}"),
            true,
        );
    }
}

fn build(
    loaded: &Loaded,
    upstreams: &mut Upstreams,
    caches: &mut Caches,
    producers: &mut crate::components::events::build::Producers,
    databases: &mut Databases,
    parts: &Parts<'_>,
) -> Result<Snapshot, Invalid> {
    let Parts { clients, health, metrics, overrides, traces, .. } = *parts;
    let bundle = &loaded.bundle;
    let at = loaded.origin(&format!("Middleware/{}", bundle.middleware.name_any()));
    let mut problems = Vec::new();
    let mut routes = Vec::new();
    for (i, spec) in bundle.middleware.spec.routes.iter().enumerate() {
        match route(spec, loaded.namespace(), upstreams, clients, health, metrics, overrides, traces) {
            Ok(route) => routes.push(Arc::new(route)),
            Err((field, message)) => problems.push(format!("{at}: spec.routes[{i}]{field}: {message}")),
        }
    }
    if let Some(level) = &bundle.middleware.spec.observability.log_level
        && let Err(error) = tracing_subscriber::EnvFilter::try_new(level)
    {
        problems.push(format!("{at}: spec.observability.logLevel: {error}"));
    }
    let (cache, invalidator) = match cache_stage(loaded, caches, parts) {
        Ok(built) => built,
        Err(more) => {
            problems.extend(more);
            (None, None)
        }
    };
    let previous_producers = producers.clone();
    let events = match crate::components::events::build::build(
        loaded,
        producers,
        parts.bus,
        clients,
        health,
        metrics,
        traces,
        parts.in_process,
    ) {
        Ok(events) => events,
        Err(more) => {
            problems.extend(more);
            crate::components::events::build::Built::default()
        }
    };
    let mut events = events;
    if let Some(invalidator) = &invalidator {
        events.consumers.extend(invalidation_consumers(loaded, invalidator, events.kafka.as_ref(), parts.in_process));
    }
    // Ingest routes come first: their exact POST paths win over a catch-all route (the shared validation
    // refuses an ingest path that any other route serves).
    let outbox = match outbox_parts(loaded, &events, producers, &previous_producers, databases, upstreams, parts) {
        Ok(outbox) => outbox,
        Err(more) => {
            problems.extend(more);
            OutboxParts::default()
        }
    };
    let mut ingest_routes = Vec::new();
    ingest_routes.extend(outbox.routes);
    for (name, path, ingest) in events.ingests {
        match crate::components::events::build::ingest_matcher(&path) {
            Ok(matcher) => ingest_routes.push(Arc::new(Route {
                name: format!("events-{name}"),
                matcher,
                upstream: None,
                endpoint: Some(Endpoint::Ingest(ingest)),
                timeout: DEFAULT_TIMEOUT,
                retry: None,
                max_body: DEFAULT_MAX_BODY,
                schema: None,
                clients: clients.clone(),
                traces: traces.clone(),
                request_duration: metrics.request_duration.with_label_values(&[&format!("events-{name}")]),
                requests: crate::kernel::metrics::RouteCounters::new(&format!("events-{name}")),
                metrics: metrics.clone(),
            })),
            Err(e) => {
                problems.push(format!("{}: spec.source.http.path: {e}", loaded.origin(&format!("EventRoute/{name}"))))
            }
        }
    }
    ingest_routes.extend(routes);
    ingest_routes.extend(outbox.handlers);
    let routes = ingest_routes;
    if !problems.is_empty() {
        return Err(Invalid { problems });
    }
    let policies = policy_states(bundle);
    Ok(Snapshot {
        hash: loaded.hash.clone(),
        middleware: loaded.middleware(),
        routes,
        stages: Stages { cache, ..Stages::default() },
        sampling_ratio: telemetry::sampling_ratio(&bundle.middleware.spec.observability),
        traces: traces.clone(),
        policies,
        metrics: metrics.clone(),
        invalidator,
        warmup: warmup_plan(bundle),
        consumers: events.consumers,
        relays: outbox.relays,
        outbox: outbox.store,
        bundle: bundle.clone(),
    })
}

#[allow(clippy::too_many_arguments)]
fn route(
    spec: &RouteSpec,
    namespace: &str,
    upstreams: &mut Upstreams,
    clients: &Clients,
    health: &Health,
    metrics: &Metrics,
    overrides: &Overrides,
    traces: &Option<Arc<Traces>>,
) -> Result<Route, (&'static str, String)> {
    let matcher = Matcher::compile(&spec.matches).map_err(|e| (".match", e.to_string()))?;
    let target = Target::from_spec(&spec.upstream, namespace, overrides).map_err(|e| (".upstream", e.to_string()))?;
    let upstream = match upstreams.0.get(&target) {
        Some(existing) => existing.clone(),
        None => {
            let upstream = Arc::new(
                Upstream::new(target.clone(), health.clone(), metrics.clone())
                    .map_err(|e| (".upstream", e.to_string()))?,
            );
            upstreams.0.insert(target, upstream.clone());
            upstream
        }
    };
    let retry = spec.retry.as_ref().map(|r| Retry {
        attempts: r.attempts,
        backoff: duration_or(r.backoff.as_ref(), DEFAULT_BACKOFF),
        on_statuses: if r.on_statuses.is_empty() {
            vec![StatusCode::BAD_GATEWAY, StatusCode::SERVICE_UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT]
        } else {
            r.on_statuses.iter().filter_map(|s| StatusCode::from_u16(*s).ok()).collect()
        },
    });
    let schema = match &spec.request_schema {
        Some(schema) => {
            let value = serde_json::Value::Object(schema.0.clone());
            Some(Arc::new(
                jsonschema::validator_for(&value)
                    .map_err(|e| (".requestSchema", format!("not a valid JSON Schema: {e}")))?,
            ))
        }
        None => None,
    };
    Ok(Route {
        name: spec.name.clone(),
        matcher,
        upstream: Some(upstream),
        endpoint: None,
        timeout: duration_or(spec.timeout.as_ref(), DEFAULT_TIMEOUT),
        retry,
        max_body: spec.max_body_bytes.map_or(DEFAULT_MAX_BODY, |n| u64::try_from(n).unwrap_or(0)),
        schema,
        clients: clients.clone(),
        traces: traces.clone(),
        request_duration: metrics.request_duration.with_label_values(&[&spec.name]),
        requests: crate::kernel::metrics::RouteCounters::new(&spec.name),
        metrics: metrics.clone(),
    })
}

/// One consumer per CachePolicy topic of `spec.invalidation.events`. Every pod reads every event (a group
/// of its own, from the topic's end, nothing committed that matters later): an in-process cache is the
/// pod's own, and deleting from a shared Redis twice is harmless.
fn invalidation_consumers(
    loaded: &Loaded,
    invalidator: &Arc<crate::components::cache::Invalidator>,
    kafka: Option<&crate::components::events::kafka::KafkaSettings>,
    in_process: bool,
) -> Vec<crate::components::events::build::ConsumerPlan> {
    use crate::components::events::build::{ConsumerPlan, PlanSource};
    let mut plans = Vec::new();
    let pod = std::env::var("UMW_POD_NAME").unwrap_or_else(|_| format!("{:08x}", fastrand::u32(..)));
    for policy in &loaded.bundle.cache_policies {
        let Some(invalidation) = &policy.spec.invalidation else { continue };
        let mut topics: Vec<&str> = invalidation.events.iter().map(|e| e.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            let rules: Vec<InvalidationRule> = invalidation
                .events
                .iter()
                .filter(|e| e.topic == topic)
                .map(|e| {
                    let parse = |t: &Option<String>| t.as_deref().and_then(|t| umw_crds::template::parse(t).ok());
                    InvalidationRule {
                        event_type: e.event_type.clone(),
                        key: parse(&e.key_template),
                        prefix: parse(&e.prefix_template),
                        tag: parse(&e.tag_template),
                    }
                })
                .collect();
            let name = format!("cache-{}", policy.name_any());
            let handler: Arc<dyn crate::components::events::kafka::Handler> =
                Arc::new(InvalidationHandler { policy: name.clone(), rules, invalidator: invalidator.clone() });
            let spec = serde_json::to_string(&invalidation.events).unwrap_or_default();
            let plan = if in_process {
                ConsumerPlan {
                    key: format!("bus|{name}|{topic}|{spec}|{}", invalidator.prefix),
                    route: name,
                    source: PlanSource::Bus(topic.to_string()),
                    handler,
                }
            } else {
                let Some(connection) = kafka else { continue };
                let group = format!("umw.{}.{}.invalidation.{pod}", loaded.namespace(), policy.name_any());
                ConsumerPlan {
                    key: format!("{name}|{topic}|{group}|{spec}|{connection:?}|{}", invalidator.prefix),
                    route: name.clone(),
                    source: PlanSource::Kafka(Box::new(crate::components::events::kafka::ConsumerSettings {
                        connection: connection.clone(),
                        topic: topic.to_string(),
                        group,
                        route: name,
                        from_latest: true,
                    })),
                    handler,
                }
            };
            plans.push(plan);
        }
    }
    plans
}

struct InvalidationRule {
    event_type: Option<String>,
    key: Option<Vec<umw_crds::template::Part>>,
    prefix: Option<Vec<umw_crds::template::Part>>,
    tag: Option<Vec<umw_crds::template::Part>>,
}

/// Turns events into cache invalidations (the glue between the event consumer and the cache).
struct InvalidationHandler {
    policy: String,
    rules: Vec<InvalidationRule>,
    invalidator: Arc<crate::components::cache::Invalidator>,
}

impl crate::components::events::kafka::Handler for InvalidationHandler {
    fn handle(
        &self,
        message: crate::components::events::kafka::Incoming,
        _stopping: Arc<std::sync::atomic::AtomicBool>,
    ) -> BoxFuture<'static, bool> {
        use cloudevents::AttributesReader as _;
        let event = crate::components::events::envelope::from_kafka(message.headers.clone(), message.payload.clone())
            .or_else(|_| crate::components::events::envelope::plain(&message, "invalidation"));
        let mut what = crate::components::cache::Invalidation::default();
        if let Ok(event) = &event {
            for rule in &self.rules {
                if rule.event_type.as_deref().is_some_and(|t| t != event.ty()) {
                    continue;
                }
                let render = |parts: &Option<Vec<umw_crds::template::Part>>| {
                    parts.as_ref().map(|p| crate::components::events::render_event(p, event)).filter(|v| !v.is_empty())
                };
                what.keys.extend(render(&rule.key));
                what.prefixes.extend(render(&rule.prefix));
                what.tags.extend(render(&rule.tag));
            }
        } else {
            tracing::warn!(policy = %self.policy, topic = %message.topic, offset = message.offset, "an invalidation event could not be read; skipped");
            self.invalidator.metrics.events_handled.with_label_values(&[&self.policy, "invalid"]).inc();
        }
        let invalidator = self.invalidator.clone();
        let policy = self.policy.clone();
        Box::pin(async move {
            if what.keys.is_empty() && what.prefixes.is_empty() && what.tags.is_empty() {
                return true;
            }
            // A cache that cannot be reached now keeps the entries until their TTL: logged, not retried.
            let outcome = match invalidator.invalidate(&what).await {
                Ok(deleted) => {
                    tracing::debug!(%policy, deleted, "cache invalidated by an event");
                    "delivered"
                }
                Err(error) => {
                    tracing::warn!(%policy, %error, "cache invalidation by an event failed");
                    "failed"
                }
            };
            invalidator.metrics.events_handled.with_label_values(&[&policy, outcome]).inc();
            true
        })
    }
}

/// Starts the consumers the snapshot asks for and stops the others; unchanged ones keep running.
fn reconcile_consumers(
    events: &mut EventsState,
    plans: &[crate::components::events::build::ConsumerPlan],
    bus: &crate::components::events::bus::InProcessBus,
    health: &Health,
    metrics: &Metrics,
) {
    use crate::components::events::build::PlanSource;
    // Kafka consumers that go, by route: a replacement waits for its predecessor to leave the group.
    let mut leaving: std::collections::HashMap<String, crate::components::events::kafka::Consumer> =
        std::collections::HashMap::new();
    let gone: Vec<String> =
        events.consumers.keys().filter(|key| !plans.iter().any(|p| &p.key == *key)).cloned().collect();
    for key in gone {
        if let Some(RunningConsumer::Kafka(consumer)) = events.consumers.remove(&key) {
            let route = key.split('|').next().unwrap_or_default().to_string();
            leaving.insert(route, consumer);
        }
    }
    for plan in plans {
        if events.consumers.contains_key(&plan.key) {
            continue;
        }
        let started = match &plan.source {
            PlanSource::Bus(topic) => {
                Ok(RunningConsumer::Bus(crate::components::events::bus::BusConsumer::start(bus, topic, plan.handler.clone())))
            }
            PlanSource::Kafka(settings) => crate::components::events::kafka::Consumer::start(
                settings,
                plan.handler.clone(),
                health.clone(),
                metrics.clone(),
                leaving.remove(&plan.route),
            )
            .map(RunningConsumer::Kafka),
        };
        match started {
            Ok(consumer) => {
                tracing::info!(route = %plan.route, "consumer started");
                events.consumers.insert(plan.key.clone(), consumer);
            }
            Err(error) => {
                tracing::error!(route = %plan.route, %error, "cannot start the consumer");
                health.set(
                    crate::components::events::kafka::COMPONENT,
                    State::Down,
                    format!("consumer of event route {}: {error}", plan.route),
                    false,
                );
            }
        }
    }
}

/// The cache stage for the configuration's CachePolicies, with their backends (reused from `caches` when
/// the settings did not change). `None` without CachePolicies.
/// The warm-up of every CachePolicy, together; the shortest interval wins.
fn warmup_plan(bundle: &Bundle) -> crate::components::cache::warmup::Plan {
    let mut plan = crate::components::cache::warmup::Plan::default();
    for warmup in bundle.cache_policies.iter().filter_map(|p| p.spec.warmup.as_ref()) {
        plan.paths.extend(warmup.paths.iter().cloned());
        if let Some(interval) = &warmup.interval {
            let interval = duration_or(Some(interval), Duration::from_secs(300));
            plan.interval = Some(plan.interval.map_or(interval, |i| i.min(interval)));
        }
    }
    plan
}

type CacheParts = (Option<Arc<dyn Stage>>, Option<Arc<crate::components::cache::Invalidator>>);

fn cache_stage(loaded: &Loaded, caches: &mut Caches, parts: &Parts<'_>) -> Result<CacheParts, Vec<String>> {
    use umw_crds::cache_policy::{CacheBackend, CacheableMethod};
    let bundle = &loaded.bundle;
    let mut used = Caches::default();
    let mut problems = Vec::new();
    let mut rules = Vec::new();
    let mut tokens = Vec::new();
    let mw_name = bundle.middleware.name_any();
    let redis = &bundle.middleware.spec.connections.redis;
    for policy in &bundle.cache_policies {
        let at = loaded.origin(&format!("CachePolicy/{}", policy.name_any()));
        let spec = &policy.spec;
        let wanted = match (spec.backend, redis, parts.in_process) {
            (_, _, true) | (Some(CacheBackend::Memory), _, _) | (None, None, _) => CacheBackendKey::Memory,
            (_, Some(redis), false) => {
                let url = umw_crds::config::resolve(&redis.url);
                let password = redis.password.as_ref().map(umw_crds::config::resolve).transpose();
                let ca_cert = redis.ca_cert.as_ref().map(umw_crds::config::resolve).transpose();
                match (url, password, ca_cert) {
                    (Ok(url), Ok(password), Ok(ca_cert)) => {
                        let settings = crate::components::cache::redis::RedisSettings {
                            url,
                            password,
                            ca_cert,
                            cluster: redis.mode == umw_crds::middleware::RedisMode::Cluster,
                            timeout: duration_or(redis.timeout.as_ref(), crate::components::cache::redis::OPERATION_TIMEOUT),
                        };
                        if spec.backend == Some(CacheBackend::Tiered) {
                            CacheBackendKey::Tiered(settings)
                        } else {
                            CacheBackendKey::Redis(settings)
                        }
                    }
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                        problems.push(format!("{at}: spec.connections.redis of Middleware {mw_name}: {e}"));
                        continue;
                    }
                }
            }
            (Some(_), None, false) => {
                problems.push(format!("{at}: spec.backend: needs spec.connections.redis on Middleware {mw_name}"));
                continue;
            }
        };
        let cache = match caches.0.get(&wanted).or_else(|| used.0.get(&wanted)) {
            Some(cache) => cache.clone(),
            None => {
                let cache: Arc<dyn crate::components::cache::Cache> = match &wanted {
                    CacheBackendKey::Memory => {
                        Arc::new(crate::components::cache::memory::MemoryCache::new(crate::components::cache::memory::DEFAULT_MAX_BYTES))
                    }
                    CacheBackendKey::Redis(settings) => {
                        match crate::components::cache::redis::RedisCache::new(
                            settings,
                            parts.health.clone(),
                            parts.metrics.clone(),
                        ) {
                            Ok(cache) => Arc::new(cache),
                            Err(error) => {
                                problems.push(format!("{at}: spec.connections.redis: {error}"));
                                continue;
                            }
                        }
                    }
                    CacheBackendKey::Tiered(settings) => {
                        let channel = format!("umw:{}:l1", loaded.middleware());
                        let tiered =
                            crate::components::cache::redis::RedisCache::new(settings, parts.health.clone(), parts.metrics.clone())
                                .map_err(|e| e.to_string())
                                .and_then(|redis| {
                                    crate::components::cache::tiered::TieredCache::new(Arc::new(redis), channel)
                                        .map_err(|e| e.to_string())
                                });
                        match tiered {
                            Ok(cache) => Arc::new(cache),
                            Err(error) => {
                                problems.push(format!("{at}: spec.connections.redis: {error}"));
                                continue;
                            }
                        }
                    }
                };
                cache
            }
        };
        used.0.insert(wanted, cache.clone());
        if let Some(invalidation) = spec.invalidation.as_ref().filter(|i| i.admin_api)
            && let Some(token) = &invalidation.admin_token
        {
            match umw_crds::config::resolve(token) {
                Ok(token) if !token.is_empty() => tokens.push(token),
                Ok(_) => problems.push(format!("{at}: spec.invalidation.adminToken: empty")),
                Err(e) => problems.push(format!("{at}: spec.invalidation.adminToken: {e}")),
            }
        }
        let own: Vec<_> = spec.target_refs.iter().filter(|t| t.name == mw_name).collect();
        let routes = if own.iter().any(|t| t.section_name.is_none()) {
            None
        } else {
            Some(own.iter().filter_map(|t| t.section_name.clone()).collect())
        };
        for (i, rule) in spec.rules.iter().enumerate() {
            let methods = &rule.matches.methods;
            let key_headers: Result<Vec<http::HeaderName>, _> =
                rule.key.headers.iter().map(|h| http::HeaderName::try_from(h.as_str())).collect();
            let Ok(key_headers) = key_headers else {
                problems.push(format!("{at}: spec.rules[{i}].key.headers: not a header name"));
                continue;
            };
            rules.push(crate::components::cache::stage::Rule {
                routes: routes.clone(),
                path_prefix: rule.matches.path_prefix.clone(),
                get: methods.is_empty() || methods.contains(&CacheableMethod::Get),
                head_too: methods.is_empty() || methods.contains(&CacheableMethod::Head),
                ttl: duration_or(Some(&rule.ttl), Duration::from_secs(60)),
                jitter_percent: rule.jitter_percent.unwrap_or(10),
                negative_ttl: rule.negative_ttl.as_ref().map(|d| duration_or(Some(d), Duration::from_secs(5))),
                negative_statuses: if rule.negative_statuses.is_empty() {
                    vec![404, 410]
                } else {
                    rule.negative_statuses.clone()
                },
                stale_while_revalidate: rule
                    .stale_while_revalidate
                    .as_ref()
                    .map_or(Duration::ZERO, |d| duration_or(Some(d), Duration::ZERO)),
                stale_if_error: rule
                    .stale_if_error
                    .as_ref()
                    .map_or(Duration::ZERO, |d| duration_or(Some(d), Duration::ZERO)),
                query_params: rule.key.query_params.clone(),
                key_headers,
                max_entry_bytes: rule.max_entry_bytes.map_or(1024 * 1024, |n| usize::try_from(n).unwrap_or(usize::MAX)),
                single_flight: rule.single_flight.enabled || rule.single_flight.distributed,
                distributed: rule.single_flight.distributed,
                lock_timeout: duration_or(rule.single_flight.lock_timeout.as_ref(), Duration::from_secs(5)),
                tags: rule.tags.iter().filter_map(|t| umw_crds::template::parse(t).ok()).collect(),
                cache: cache.clone(),
            });
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    if rules.is_empty() {
        *caches = used;
        return Ok((None, None));
    }
    let prefix = format!("umw:{}:", loaded.middleware());
    let invalidator = crate::components::cache::Invalidator {
        prefix: prefix.clone(),
        caches: used.0.values().cloned().collect(),
        tokens,
        metrics: parts.metrics.clone(),
    };
    *caches = used;
    let stage = crate::components::cache::stage::CacheStage::new(rules, prefix, parts.flights.clone(), parts.metrics.clone());
    Ok((Some(Arc::new(stage)), Some(Arc::new(invalidator))))
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

/// Routes by name, for tests and `/status`.
pub fn route_names(snapshot: &Snapshot) -> BTreeMap<String, String> {
    snapshot.routes.iter().map(|r| (r.name.clone(), r.target_label())).collect()
}

/// What commands and outbox sources add to a snapshot.
#[derive(Default)]
struct OutboxParts {
    /// `POST /commands/<name>` routes and `GET /commands/{id}`; they come before the proxy routes.
    routes: Vec<Arc<Route>>,
    /// The routes of command handlers (after every other route: reached only through their command).
    handlers: Vec<Arc<Route>>,
    relays: Vec<RelayPlan>,
    store: Option<Arc<dyn crate::components::outbox::OutboxStore>>,
}

/// Where commands are kept and relayed to: the store, its database, the publisher, and a description of
/// the connections (part of the relays' keys).
type Backends = (
    Arc<dyn crate::components::outbox::OutboxStore>,
    Option<Arc<crate::components::outbox::postgres::Database>>,
    Arc<dyn crate::components::events::bus::Publisher>,
    String,
);

/// The outbox relay publishes through the event producer: this adapts one to the other.
struct EventSink {
    publisher: Arc<dyn crate::components::events::bus::Publisher>,
    format: crate::components::events::envelope::Format,
}

impl crate::components::outbox::Sink for EventSink {
    fn publish<'a>(&'a self, record: &'a crate::components::outbox::Record) -> BoxFuture<'a, Result<(), crate::components::outbox::SinkError>> {
        use crate::components::events::kafka::PublishError;
        use crate::components::outbox::SinkError;
        use cloudevents::{EventBuilder as _, EventBuilderV10};
        Box::pin(async move {
            let mut builder = EventBuilderV10::new().id(&record.id).ty(&record.ty).source(record.source.as_str());
            if let Some(subject) = &record.subject {
                builder = builder.subject(subject.as_str());
            }
            if let Some(time) = record.time.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) {
                builder = builder.time(time.with_timezone(&chrono::Utc));
            }
            for (name, value) in &record.extensions {
                builder = builder.extension(name, value.as_str());
            }
            let content_type = record.content_type.as_deref().unwrap_or("application/octet-stream");
            builder = builder.data(content_type, record.data.clone());
            let event = builder.build().map_err(|e| SinkError::Refused(format!("not a valid CloudEvent: {e}")))?;
            let mut wire = crate::components::events::envelope::to_kafka(&event, self.format).map_err(SinkError::Refused)?;
            wire.headers.extend(record.headers.iter().cloned());
            let key = record.key.as_deref().map(str::as_bytes);
            match self.publisher.publish(&record.topic, key, &wire).await {
                Ok(_) => Ok(()),
                Err(PublishError::Refused(e)) => Err(SinkError::Refused(e)),
                Err(PublishError::Failed(e)) if !e.contains("timed out") => Err(SinkError::Failed(e)),
                // A timeout is the broker going away with the record in flight, not the record's fault.
                Err(error) => Err(SinkError::Unavailable(error.to_string())),
            }
        })
    }
}

/// The PostgreSQL connection of the Middleware, with its Secrets resolved.
fn pg_settings(loaded: &Loaded) -> Result<Option<crate::components::outbox::postgres::PgSettings>, String> {
    use crate::components::outbox::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_STATEMENT_TIMEOUT};
    use umw_crds::config::resolve;
    let Some(pg) = &loaded.bundle.middleware.spec.connections.postgres else { return Ok(None) };
    let field = |name: &str, e: String| format!("spec.connections.postgres.{name}: {e}");
    Ok(Some(crate::components::outbox::postgres::PgSettings {
        url: resolve(&pg.url).map_err(|e| field("url", e))?,
        ca_cert: pg.ca_cert.as_ref().map(resolve).transpose().map_err(|e| field("caCert", e))?,
        max_connections: pg.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        statement_timeout: duration_or(pg.statement_timeout.as_ref(), DEFAULT_STATEMENT_TIMEOUT),
        connect_timeout: duration_or(pg.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT),
    }))
}

/// Builds the commands of the configuration (routes and their store) and the relays of the outbox tables:
/// the commands' own, and every EventRoute with an `outbox` source. Pools are shared by equal settings
/// and kept across reloads in `databases`; the relays publish through the Middleware's Kafka producer.
#[allow(clippy::too_many_arguments)]
fn outbox_parts(
    loaded: &Loaded,
    events: &crate::components::events::build::Built,
    producers: &mut crate::components::events::build::Producers,
    previous_producers: &crate::components::events::build::Producers,
    databases: &mut Databases,
    upstreams: &mut Upstreams,
    parts: &Parts<'_>,
) -> Result<OutboxParts, Vec<String>> {
    use crate::components::outbox::{self, commands, postgres, relay};
    let bundle = &loaded.bundle;
    let spec = &bundle.middleware.spec;
    let outbox_routes: Vec<_> = bundle.event_routes.iter().filter(|r| r.spec.source.outbox.is_some()).collect();
    let mut built = OutboxParts::default();
    if spec.commands.is_empty() && outbox_routes.is_empty() {
        *databases = Databases::new();
        return Ok(built);
    }
    let at = loaded.origin(&format!("Middleware/{}", bundle.middleware.name_any()));
    let mut problems = Vec::new();
    let settings = relay::Settings {
        batch: spec.outbox.batch_size.unwrap_or(outbox::DEFAULT_BATCH),
        max_attempts: spec.outbox.max_attempts.unwrap_or(outbox::DEFAULT_MAX_ATTEMPTS),
        poll_interval: duration_or(spec.outbox.poll_interval.as_ref(), outbox::DEFAULT_POLL_INTERVAL),
        retention: duration_or(spec.outbox.retention.as_ref(), outbox::DEFAULT_RETENTION),
    };

    // The store and the sink: in memory and the in-process bus, or PostgreSQL and Kafka.
    let (store, database, publisher, connection): Backends = if parts.in_process {
        *databases = Databases::new();
        (parts.memory.clone(), None, parts.bus.clone(), "in-process".into())
    } else {
        let pg = match pg_settings(loaded) {
            Ok(Some(pg)) => pg,
            Ok(None) => return Err(vec![format!("{at}: commands and outbox sources need spec.connections.postgres")]),
            Err(e) => return Err(vec![format!("{at}: {e}")]),
        };
        let database = match databases.get(&pg) {
            Some(existing) => existing.clone(),
            None => match postgres::Database::new(&pg, parts.health.clone(), parts.metrics.clone()) {
                Ok(database) => database,
                Err(e) => return Err(vec![format!("{at}: {e}")]),
            },
        };
        *databases = Databases::from([(pg.clone(), database.clone())]);
        let Some(kafka) = events.kafka.clone() else {
            return Err(vec![format!(
                "{at}: commands and outbox sources are relayed to Kafka: set spec.connections.kafka"
            )]);
        };
        let producer = match producers.get(&kafka).or_else(|| previous_producers.get(&kafka)) {
            Some(existing) => existing.clone(),
            None => match crate::components::events::kafka::Producer::new(&kafka, parts.health.clone(), parts.metrics.clone()) {
                Ok(producer) => Arc::new(producer),
                Err(e) => return Err(vec![format!("{at}: {e}")]),
            },
        };
        producers.insert(kafka.clone(), producer.clone());
        let connection = format!("{}|{:?}", postgres::redact(&pg.url), kafka);
        let writers = postgres::writers(pg.max_connections);
        let store: Arc<dyn outbox::OutboxStore> = Arc::new(postgres::PgStore::new(database.clone(), writers));
        (store, Some(database), producer, connection)
    };
    let binary = |format| Arc::new(EventSink { publisher: publisher.clone(), format }) as Arc<dyn outbox::Sink>;

    if !spec.commands.is_empty() {
        built.relays.push(RelayPlan {
            key: format!("commands|{connection}|{settings:?}"),
            source: store.source(),
            sink: binary(crate::components::events::envelope::Format::Binary),
            settings: settings.clone(),
        });
        built.store = Some(store.clone());
    }
    for (i, command) in spec.commands.iter().enumerate() {
        let field = format!("{at}: spec.commands[{i}]");
        let name = format!("command-{}", command.name);
        let path = format!("/commands/{}", command.name);
        let key = match command.event.key_template.as_deref().map(umw_crds::template::parse).transpose() {
            Ok(key) => key,
            Err(e) => {
                problems.push(format!("{field}.event.keyTemplate: {e}"));
                continue;
            }
        };
        let schema = match &command.schema {
            Some(schema) => match jsonschema::validator_for(&serde_json::Value::Object(schema.0.clone())) {
                Ok(validator) => Some(Arc::new(validator)),
                Err(e) => {
                    problems.push(format!("{field}.schema: not a valid JSON Schema: {e}"));
                    continue;
                }
            },
            None => None,
        };
        let idempotency = command.idempotency.clone().unwrap_or_default();
        let header = idempotency.header.as_deref().unwrap_or("Idempotency-Key");
        let Ok(idempotency_header) = http::HeaderName::try_from(header) else {
            problems.push(format!("{field}.idempotency.header: {header:?} is not a header name"));
            continue;
        };
        let max_body = command.max_body_bytes.unwrap_or(outbox::DEFAULT_MAX_BODY);
        let matches = umw_crds::middleware::RouteMatch {
            path: Some(path.clone()),
            methods: vec![umw_crds::middleware::HttpMethod::Post],
            ..Default::default()
        };
        let handler = match &command.handler {
            Some(upstream) => {
                let spec = RouteSpec {
                    name: format!("{name}-handler"),
                    matches: matches.clone(),
                    upstream: upstream.clone(),
                    max_body_bytes: i64::try_from(max_body).ok(),
                    ..RouteSpec::default()
                };
                match route(
                    &spec,
                    loaded.namespace(),
                    upstreams,
                    parts.clients,
                    parts.health,
                    parts.metrics,
                    parts.overrides,
                    parts.traces,
                ) {
                    Ok(handler) => {
                        let handler = Arc::new(handler);
                        built.handlers.push(handler.clone());
                        let call: commands::Handler = Arc::new(move |request, info| {
                            let handler = handler.clone();
                            Box::pin(async move {
                                match crate::components::proxy::forward(request, &info, &handler).await {
                                    Ok(response) => response,
                                    Err(error) => crate::components::proxy::error_response(error, &info, &handler),
                                }
                            })
                        });
                        Some(call)
                    }
                    Err((sub, e)) => {
                        problems.push(format!("{field}.handler{}: {e}", sub.trim_start_matches(".upstream")));
                        continue;
                    }
                }
            }
            None => None,
        };
        let endpoint = commands::Command {
            name: command.name.clone(),
            event_type: command.event.type_.clone(),
            topic: command.event.topic.clone(),
            source: command.event.source.clone().unwrap_or_else(|| path.clone()),
            key,
            idempotency_header,
            idempotency_required: idempotency.required,
            ttl: duration_or(idempotency.ttl.as_ref(), outbox::DEFAULT_IDEMPOTENCY_TTL),
            handler,
            store: store.clone(),
            metrics: parts.metrics.clone(),
            traces: parts.traces.clone(),
        };
        let matcher = match Matcher::compile(&matches) {
            Ok(matcher) => matcher,
            Err(e) => {
                problems.push(format!("{field}.name: {e}"));
                continue;
            }
        };
        built.routes.push(Arc::new(endpoint_route(
            &name,
            matcher,
            Endpoint::Command(Arc::new(endpoint)),
            max_body,
            schema,
            parts,
        )));
    }
    if !spec.commands.is_empty() {
        let matches = umw_crds::middleware::RouteMatch {
            path_prefix: Some("/commands".into()),
            methods: vec![umw_crds::middleware::HttpMethod::Get],
            ..Default::default()
        };
        match Matcher::compile(&matches) {
            Ok(matcher) => built.routes.push(Arc::new(endpoint_route(
                "commands-status",
                matcher,
                Endpoint::CommandStatus(Arc::new(commands::Status { store, metrics: parts.metrics.clone() })),
                0,
                None,
                parts,
            ))),
            Err(e) => problems.push(format!("{at}: spec.commands: {e}")),
        }
    }

    for route in outbox_routes {
        let (Some(source), Some(destination)) = (&route.spec.source.outbox, &route.spec.destination.kafka) else {
            continue;
        };
        let format = crate::components::events::format_of(route.spec.format);
        let Some(database) = &database else {
            // Application tables live in PostgreSQL; the in-process backends (and `check`) have none.
            tracing::warn!(
                event_route = %route.name_any(),
                "application outbox tables are relayed from PostgreSQL only: not relayed with the in-process backends"
            );
            continue;
        };
        let c = &source.columns;
        let columns = postgres::AppColumns {
            id: c.id.clone().unwrap_or_else(|| "id".into()),
            aggregate_type: c.aggregate_type.clone().unwrap_or_else(|| "aggregatetype".into()),
            aggregate_id: c.aggregate_id.clone().unwrap_or_else(|| "aggregateid".into()),
            ty: c.type_.clone().unwrap_or_else(|| "type".into()),
            payload: c.payload.clone().unwrap_or_else(|| "payload".into()),
            headers: c.headers.clone(),
            position: c.position.clone().or_else(|| c.id.clone()).unwrap_or_else(|| "id".into()),
            published_at: c.published_at.clone(),
        };
        let schema = source.schema.clone().unwrap_or_else(|| "public".into());
        let table = postgres::AppTable::new(database.clone(), &schema, &source.table, &columns, &destination.topic);
        built.relays.push(RelayPlan {
            key: format!(
                "table|{}|{schema}.{}|{columns:?}|{}|{format:?}|{connection}|{settings:?}",
                route.name_any(),
                source.table,
                destination.topic
            ),
            source: Arc::new(postgres::AppSource(Arc::new(table))),
            sink: binary(format),
            settings: settings.clone(),
        });
    }
    if problems.is_empty() { Ok(built) } else { Err(problems) }
}

/// A route answered by an endpoint rather than the proxy.
fn endpoint_route(
    name: &str,
    matcher: Matcher,
    endpoint: Endpoint,
    max_body: u64,
    schema: Option<Arc<jsonschema::Validator>>,
    parts: &Parts<'_>,
) -> Route {
    Route {
        name: name.to_string(),
        matcher,
        upstream: None,
        endpoint: Some(endpoint),
        timeout: DEFAULT_TIMEOUT,
        retry: None,
        max_body,
        schema,
        clients: parts.clients.clone(),
        traces: parts.traces.clone(),
        request_duration: parts.metrics.request_duration.with_label_values(&[name]),
        requests: crate::kernel::metrics::RouteCounters::new(name),
        metrics: parts.metrics.clone(),
    }
}

/// Starts the relays the configuration asks for and stops the others; a relay whose plan did not change
/// keeps running.
fn reconcile_relays(outbox: &mut OutboxState, plans: &[RelayPlan], health: &Health, metrics: &Metrics) {
    outbox.relays.retain(|key, _| plans.iter().any(|p| &p.key == key));
    for plan in plans {
        if outbox.relays.contains_key(&plan.key) {
            continue;
        }
        tracing::info!(table = %plan.source.name(), "outbox relay started");
        let relay = crate::components::outbox::relay::Relay::start(
            plan.source.clone(),
            plan.sink.clone(),
            plan.settings.clone(),
            metrics.clone(),
            health.clone(),
        );
        outbox.relays.insert(plan.key.clone(), relay);
    }
}
