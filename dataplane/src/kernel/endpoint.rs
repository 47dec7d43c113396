//! Routes and what answers them. A component builds a [`Route`] with its own [`Endpoint`] (the proxy, an
//! event ingest, a command); the runtime puts the stages that apply to it in front.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use futures::future::BoxFuture;
use http::Request;

use super::context::RequestInfo;
use super::metrics::{Metrics, RouteCounters};
use super::routing::Matcher;
use super::telemetry::Traces;

/// Default route timeout, as documented on `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default body limit, as documented on `maxBodyBytes`.
pub const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;

/// What answers a route's requests at the end of its pipeline.
pub trait Endpoint: Send + Sync + 'static {
    /// Answers a request; `info.route` is the route it came through.
    fn call(&self, request: Request<Body>, info: RequestInfo) -> BoxFuture<'static, Response>;
    /// What `/status` shows as the route's target (an upstream's label, `events`, `commands`).
    fn target(&self) -> String;
    /// Whose schema the route's `schema` is, in messages, when not the route's own (`command orders`).
    fn schema_owner(&self) -> Option<String> {
        None
    }
    /// A request body failed the schema before reaching the endpoint (for the endpoint's own counters).
    fn invalid_body(&self) {}
}

/// A compiled route.
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    pub timeout: Duration,
    pub max_body: u64,
    /// Checked by the validation phase when set.
    pub schema: Option<Arc<jsonschema::Validator>>,
    pub traces: Option<Arc<Traces>>,
    pub metrics: Metrics,
    pub request_duration: prometheus::Histogram,
    pub requests: RouteCounters,
    pub endpoint: Arc<dyn Endpoint>,
}

impl Route {
    /// A route with the documented defaults.
    pub fn new(
        name: impl Into<String>,
        matcher: Matcher,
        endpoint: Arc<dyn Endpoint>,
        metrics: &Metrics,
        traces: &Option<Arc<Traces>>,
    ) -> Self {
        let name = name.into();
        Self {
            request_duration: metrics.request_duration.with_label_values(&[&name]),
            requests: RouteCounters::new(&name),
            name,
            matcher,
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            schema: None,
            traces: traces.clone(),
            metrics: metrics.clone(),
            endpoint,
        }
    }

    /// What serves the route, as `/status` shows it.
    pub fn target_label(&self) -> String {
        self.endpoint.target()
    }
}
