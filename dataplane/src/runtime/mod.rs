//! The runtime: builds every registered component from a configuration, assembles their parts into one
//! snapshot, swaps it in atomically and hands the snapshot's tasks to the [`Supervisor`].
//!
//! A snapshot is immutable. A request loads the current one once, at the start of the chain, and keeps it
//! to the end, so a reload never changes the rules under a request in flight. Builds have no side
//! effects: a configuration that is rejected leaves nothing behind (no health entry, no task), and what a
//! component must do once its part is live runs only after the swap.

pub mod supervisor;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{Method, Request};
use kube::ResourceExt as _;
use umw_crds::config::Bundle;

use crate::kernel::component::{AdminRoute, BuildCx, Built, Component, Env, OnCommit, RouteEntry, StageEntry};
use crate::kernel::config::{Invalid, Loaded};
use crate::kernel::context::RequestInfo;
use crate::kernel::endpoint::Route;
use crate::kernel::health::{Health, State};
use crate::kernel::metrics::Metrics;
pub use crate::kernel::policy::{PolicyState, policy_states};
use crate::kernel::ports::{Loopback, Ports};
use crate::kernel::stage::{Handle, Next, Phase, Stage};
use crate::kernel::task::{TaskCx, TaskSpec};
use crate::kernel::telemetry::{self, LogControl, Traces};
use supervisor::Supervisor;

/// One configuration, built.
pub struct Snapshot {
    pub hash: String,
    pub middleware: String,
    pub bundle: Bundle,
    /// In match order, each with its pipeline (its stages in phase order, then its endpoint).
    pub routes: Vec<(Arc<Route>, Next)>,
    /// For requests no route takes: the stages that apply everywhere, then a 404.
    pub fallback: Next,
    pub sampling_ratio: f64,
    pub traces: Option<Arc<Traces>>,
    pub policies: Vec<PolicyState>,
    pub metrics: Metrics,
    pub admin: Vec<AdminRoute>,
}

impl Snapshot {
    /// The first route whose match takes the request, with its pipeline.
    pub fn route_for<B>(&self, request: &Request<B>) -> Option<&(Arc<Route>, Next)> {
        self.routes.iter().find(|(route, _)| route.matcher.matches(request))
    }

    pub fn admin_route(&self, method: &Method, path: &str) -> Option<&AdminRoute> {
        self.admin.iter().find(|a| a.path == path && a.method == method)
    }
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied { hash: String },
    Unchanged,
    Rejected(String),
}

/// A snapshot with what its commit starts.
struct Assembled {
    snapshot: Snapshot,
    tasks: Vec<TaskSpec>,
    on_commit: Vec<OnCommit>,
}

/// Everything that outlives a snapshot.
pub struct Runtime {
    current: ArcSwap<Snapshot>,
    components: Vec<Arc<dyn Component>>,
    env: Env,
    supervisor: Supervisor,
    loopback: Loopback,
    log: LogControl,
    /// Serializes builds and commits (the reload watcher and tests may race).
    applying: std::sync::Mutex<()>,
    started: AtomicBool,
    pub health: Health,
    pub metrics: Metrics,
}

impl Runtime {
    /// Builds the first snapshot from `components` (in this order: a component may use the ports of those
    /// before it) and commits it. Fails with every problem found. Needs a Tokio runtime.
    pub fn new(
        loaded: &Loaded,
        components: Vec<Arc<dyn Component>>,
        env: Env,
        log: LogControl,
    ) -> Result<Self, Invalid> {
        let runtime = Self {
            current: ArcSwap::from_pointee(empty(&env)),
            components,
            health: env.health.clone(),
            metrics: env.metrics.clone(),
            env,
            supervisor: Supervisor::default(),
            loopback: Loopback::default(),
            log,
            applying: std::sync::Mutex::new(()),
            started: AtomicBool::new(false),
        };
        let assembled = runtime.build(loaded)?;
        runtime.commit(assembled, loaded);
        Ok(runtime)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Where tasks send requests through the gateway's own chain; the listener sets it.
    pub fn loopback(&self) -> &Loopback {
        &self.loopback
    }

    /// The keys of the running tasks.
    pub fn tasks(&self) -> Vec<crate::kernel::task::TaskKey> {
        self.supervisor.keys()
    }

    /// Builds a snapshot from `loaded` and swaps it in; on any problem the running one stays, and nothing
    /// of the new one remains.
    pub fn apply(&self, loaded: &Loaded) -> Outcome {
        let Ok(_applying) = self.applying.lock() else { return Outcome::Rejected("internal state poisoned".into()) };
        if self.current.load().hash == loaded.hash {
            return Outcome::Unchanged;
        }
        match self.build(loaded) {
            Ok(assembled) => {
                if let Err(message) = self.log.apply(loaded.bundle.middleware.spec.observability.log_level.as_deref()) {
                    tracing::warn!(%message, "the log level of the new configuration is not valid; keeping the old one");
                }
                self.commit(assembled, loaded);
                Outcome::Applied { hash: loaded.hash.clone() }
            }
            Err(invalid) => Outcome::Rejected(invalid.to_string()),
        }
    }

    fn build(&self, loaded: &Loaded) -> Result<Assembled, Invalid> {
        let bundle = &loaded.bundle;
        let mut problems = Vec::new();
        if let Some(level) = &bundle.middleware.spec.observability.log_level
            && let Err(error) = tracing_subscriber::EnvFilter::try_new(level)
        {
            let at = loaded.origin(&format!("Middleware/{}", bundle.middleware.name_any()));
            problems.push(format!("{at}: spec.observability.logLevel: {error}"));
        }
        let mut ports = Ports::default();
        let mut parts = Vec::new();
        for component in &self.components {
            let mut cx = BuildCx { env: &self.env, ports: &mut ports };
            match component.build(loaded, &mut cx) {
                Ok(built) => parts.push(built),
                Err(more) => problems.extend(more),
            }
        }
        if !problems.is_empty() {
            return Err(Invalid { problems });
        }
        let mut snapshot = empty(&self.env);
        snapshot.hash = loaded.hash.clone();
        snapshot.middleware = loaded.middleware();
        snapshot.bundle = bundle.clone();
        snapshot.sampling_ratio = telemetry::sampling_ratio(&bundle.middleware.spec.observability);
        snapshot.policies = policy_states(bundle);
        Ok(assemble(snapshot, parts))
    }

    fn commit(&self, assembled: Assembled, loaded: &Loaded) {
        let Assembled { snapshot, tasks, on_commit } = assembled;
        self.current.store(Arc::new(snapshot));
        for action in on_commit {
            action();
        }
        let first = !self.started.swap(true, Ordering::SeqCst);
        let cx = TaskCx {
            health: self.health.clone(),
            metrics: self.metrics.clone(),
            loopback: self.loopback.clone(),
            first,
        };
        self.supervisor.reconcile(tasks, &cx);
        self.health.set("config", State::Up, format!("configuration {} applied", loaded.hash), true);
    }

    /// Stops every task (consumers commit, relays finish their batch, producers flush) by `deadline`.
    pub async fn shutdown(&self, deadline: Instant) {
        self.supervisor.shutdown(deadline).await;
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
        let message = format!("a new configuration was rejected, still serving {running}: {reason}");
        self.health.set("config", State::Degraded, message, true);
    }
}

fn empty(env: &Env) -> Snapshot {
    Snapshot {
        hash: String::new(),
        middleware: String::new(),
        bundle: Bundle::default(),
        routes: Vec::new(),
        fallback: Next::new(Arc::new(NoRoute(env.metrics.clone()))),
        sampling_ratio: 0.0,
        traces: env.traces.clone(),
        policies: Vec::new(),
        metrics: env.metrics.clone(),
        admin: Vec::new(),
    }
}

/// Merges the components' parts: routes by precedence (stable: registration order, then each component's
/// order), and one pipeline per route with the stages that apply to it in phase order.
fn assemble(mut snapshot: Snapshot, parts: Vec<Built>) -> Assembled {
    let mut routes: Vec<RouteEntry> = Vec::new();
    let mut stages: Vec<StageEntry> = Vec::new();
    let mut tasks = Vec::new();
    let mut on_commit = Vec::new();
    for built in parts {
        routes.extend(built.routes);
        stages.extend(built.stages);
        tasks.extend(built.tasks);
        snapshot.admin.extend(built.admin);
        on_commit.extend(built.on_commit);
    }
    routes.sort_by_key(|entry| entry.precedence);
    stages.sort_by_key(|entry| entry.phase);
    let pipeline = |route: Option<&Route>, end: Next| {
        let mut chosen: Vec<(Phase, Arc<dyn Stage>)> =
            stages.iter().filter_map(|e| (e.stage_for)(route).map(|stage| (e.phase, stage))).collect();
        // The route's schema is checked in the validation phase: after authorization, before the cache.
        if route.is_some_and(|r| r.schema.is_some()) {
            chosen.push((Phase::Validate, Arc::new(crate::kernel::validate::Validate)));
        }
        chosen.sort_by_key(|(phase, _)| *phase);
        chosen.into_iter().rev().fold(end, |next, (_, stage)| next.with(stage))
    };
    snapshot.fallback = pipeline(None, Next::new(Arc::new(NoRoute(snapshot.metrics.clone()))));
    let metrics = snapshot.metrics.clone();
    snapshot.routes = routes
        .into_iter()
        .map(|entry| {
            let end = Next::new(Arc::new(EndpointCall(metrics.clone())));
            let next = pipeline(Some(&entry.route), end);
            (entry.route, next)
        })
        .collect();
    Assembled { snapshot, tasks, on_commit }
}

/// The end of a route's pipeline: its endpoint.
struct EndpointCall(Metrics);

impl Handle for EndpointCall {
    fn handle(
        &self,
        request: Request<axum::body::Body>,
    ) -> futures::future::BoxFuture<'static, axum::response::Response> {
        let info = RequestInfo::of(&request).cloned();
        match info.and_then(|info| info.route.clone().map(|route| (info, route))) {
            Some((info, route)) => route.endpoint.call(request, info),
            None => NoRoute(self.0.clone()).handle(request),
        }
    }
}

/// The end of the pipeline of requests no route takes.
struct NoRoute(Metrics);

impl Handle for NoRoute {
    fn handle(
        &self,
        request: Request<axum::body::Body>,
    ) -> futures::future::BoxFuture<'static, axum::response::Response> {
        use crate::kernel::problem::{Problem, kinds};
        use axum::response::IntoResponse as _;
        self.0.gateway_errors.with_label_values(&["none", "no_route"]).inc();
        let detail = format!("no route of this gateway takes {} {}", request.method(), request.uri().path());
        Box::pin(async move { Problem::new(kinds::NO_ROUTE, detail).into_response() })
    }
}
