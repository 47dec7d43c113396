//! The component contract. Each component builds its part of a snapshot from the loaded configuration
//! without side effects: it returns its routes, the stages it puts in front of routes, its background
//! tasks, its admin endpoints and what to activate once the snapshot is committed, or every configuration
//! problem it found. Resources that outlive a snapshot (connection pools) stay inside the component,
//! which reuses them while their settings are unchanged.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use futures::future::BoxFuture;
use http::{Method, Request};

use super::config::Loaded;
use super::endpoint::Route;
use super::health::Health;
use super::metrics::Metrics;
use super::net::{Clients, Overrides};
use super::ports::Ports;
use super::stage::{Phase, Stage};
use super::task::TaskSpec;
use super::telemetry::Traces;

/// What every build shares: process-wide handles and options.
#[derive(Clone)]
pub struct Env {
    pub metrics: Metrics,
    pub health: Health,
    pub traces: Option<Arc<Traces>>,
    pub clients: Clients,
    /// `--resolve`.
    pub overrides: Overrides,
    /// `--in-process-backends`: every backend is the in-process one.
    pub in_process: bool,
    /// The pod's name (`UMW_POD_NAME`), or a name drawn once per process outside a cluster.
    pub instance: String,
}

impl Env {
    pub fn new(metrics: Metrics, health: Health, traces: Option<Arc<Traces>>, overrides: Overrides) -> Self {
        let instance = std::env::var("UMW_POD_NAME")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("{:08x}", fastrand::u32(..)));
        Self { metrics, health, traces, clients: Clients::new(), overrides, in_process: false, instance }
    }

    pub fn in_process(mut self, in_process: bool) -> Self {
        self.in_process = in_process;
        self
    }

    /// Whether `UMW_POD_NAME` named the instance (the data plane runs as a pod).
    pub fn in_cluster() -> bool {
        std::env::var("UMW_POD_NAME").is_ok_and(|p| !p.is_empty())
    }
}

/// What a build gets besides the configuration.
pub struct BuildCx<'a> {
    pub env: &'a Env,
    pub ports: &'a mut Ports,
}

/// Which routes match first. Within one precedence, routes keep the order their components are registered
/// in and the order each component returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precedence {
    /// Exact paths the gateway serves itself (event ingest, commands): ahead of any configured route, which
    /// the shared validation keeps from taking the same path.
    Endpoint,
    /// `spec.routes`, in their order.
    Configured,
    /// Routes reached only through another component (a command's handler): listed, never matched first.
    Internal,
}

pub struct RouteEntry {
    pub precedence: Precedence,
    pub route: Arc<Route>,
}

/// Picks the stage for one route at build time, or none (then the route's pipeline skips it). Called
/// with `None` for requests no route takes.
pub type StageFor = Arc<dyn Fn(Option<&Route>) -> Option<Arc<dyn Stage>> + Send + Sync>;

pub struct StageEntry {
    pub phase: Phase,
    pub stage_for: StageFor,
}

impl StageEntry {
    /// The same stage in front of every route (and of requests no route takes).
    pub fn everywhere(phase: Phase, stage: Arc<dyn Stage>) -> Self {
        Self { phase, stage_for: Arc::new(move |_| Some(stage.clone())) }
    }
}

pub type AdminHandler = Arc<dyn Fn(Request<Body>) -> BoxFuture<'static, Response> + Send + Sync>;

/// An endpoint of the admin listener.
pub struct AdminRoute {
    pub method: Method,
    pub path: &'static str,
    pub handler: AdminHandler,
}

/// Something to do once the snapshot is committed (show a new resource's health, keep a pool).
pub type OnCommit = Box<dyn FnOnce() + Send>;

/// A component's part of a snapshot.
#[derive(Default)]
pub struct Built {
    pub routes: Vec<RouteEntry>,
    pub stages: Vec<StageEntry>,
    pub tasks: Vec<TaskSpec>,
    pub admin: Vec<AdminRoute>,
    pub on_commit: Vec<OnCommit>,
}

impl Built {
    pub fn route(&mut self, precedence: Precedence, route: Route) -> Arc<Route> {
        let route = Arc::new(route);
        self.routes.push(RouteEntry { precedence, route: route.clone() });
        route
    }

    pub fn on_commit(&mut self, action: impl FnOnce() + Send + 'static) {
        self.on_commit.push(Box::new(action));
    }
}

/// A part of the data plane.
pub trait Component: Send + Sync + 'static {
    /// Its name in logs and in task keys.
    fn name(&self) -> &'static str;
    /// Builds this component's part of the next snapshot; see the module's documentation.
    fn build(&self, config: &Loaded, cx: &mut BuildCx<'_>) -> Result<Built, Vec<String>>;
}
