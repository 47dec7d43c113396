//! The HTTP middleware chain: the fixed steps every request takes, then the pipeline the snapshot compiled
//! for the request's route.
//!
//! ```text
//! request id → trace → route → metrics → timeout → body limit → the route's pipeline:
//!     authentication → rate limit → authorization → request validation → cache → endpoint (proxy, ...)
//! ```
//!
//! `route` (selecting the route once, so that metrics, timeouts and limits can be per route) is the one
//! step the design's list leaves implicit. A route's pipeline holds only the stages that apply to it, in
//! [`Phase`](crate::kernel::stage::Phase) order: a phase no component fills costs nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use http::{HeaderValue, Method, Request};
use http_body::Body as _;
use http_body_util::Limited;
use opentelemetry::KeyValue;

use crate::kernel::endpoint::Route;
use crate::kernel::metrics::{method_label, status_class};
use crate::kernel::problem::{Problem, kinds};
use crate::kernel::stage::Handle;
use crate::kernel::trace::TraceContext;
use crate::runtime::Runtime;

pub use crate::kernel::context::{ClientAddr, REQUEST_ID, RequestInfo};
pub use crate::kernel::stage::Next;

/// The chain as a service.
pub type Chain = Next;

/// Builds the chain over the runtime's current snapshot. The fixed steps are one function: a request costs
/// them one boxed future, and its route's pipeline one per stage it holds and one for the endpoint.
pub fn build(runtime: Arc<Runtime>) -> Chain {
    Next::new(Arc::new(Fixed(runtime)))
}

struct Fixed(Arc<Runtime>);

impl Handle for Fixed {
    fn handle(&self, request: Request<Body>) -> BoxFuture<'static, Response> {
        Box::pin(guard(self.0.clone(), request))
    }
}

/// A bug that panics answers 500 with a problem and is counted, instead of dropping the connection;
/// requests no route could serve safely (CONNECT, paths with dot-segments or encoded separators, which
/// upstreams would resolve differently from the route match) are refused here.
async fn guard(runtime: Arc<Runtime>, request: Request<Body>) -> Response {
    if request.method() == Method::CONNECT {
        return Problem::new(kinds::METHOD_NOT_ALLOWED, "CONNECT is not served by this gateway").into_response();
    }
    if let Some(reason) = unsafe_path(request.uri().path()) {
        return Problem::new(kinds::BAD_REQUEST, format!("the request path {reason}")).into_response();
    }
    match std::panic::AssertUnwindSafe(serve(runtime, request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let what =
                panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            tracing::error!(panic = what.as_deref().unwrap_or("(no message)"), "a request handler panicked");
            crate::kernel::metrics::PANICS.inc();
            Problem::new(kinds::INTERNAL, "the gateway failed to handle this request").into_response()
        }
    }
}

/// Why a path is refused, if it is: dot-segments (`/a/../b`) and percent-encoded dots or slashes would be
/// resolved by the upstream after the gateway matched the raw path, so a request could reach a route other
/// than the one whose policies were applied.
fn unsafe_path(path: &str) -> Option<&'static str> {
    if path.split('/').any(|segment| segment == "." || segment == "..") {
        return Some("contains a dot-segment (/./ or /../)");
    }
    let lower = path.as_bytes();
    let encoded = lower.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && matches!(w[2], b'e' | b'E' | b'f' | b'F'))
                || (w[1] == b'5' && matches!(w[2], b'c' | b'C')))
    });
    encoded.then_some("contains an encoded dot, slash or backslash")
}

/// The fixed steps around the route's pipeline, in this order (each one's work after the pipeline in the
/// reverse order):
///
/// 1. Request id: keep the caller's `X-Request-Id` (if sane) or make one; it goes upstream and back.
/// 2. Trace: continue the caller's W3C trace or start one; export the server span when sampled.
/// 3. Route: the first route that matches; everything after may depend on it.
/// 4. Metrics: rate, errors and duration per route, requests in flight.
/// 5. Timeout: the route's deadline for the whole exchange, answered 504.
/// 6. Body limit: the route's maximum body, answered 413, checked before anything reads the body.
async fn serve(runtime: Arc<Runtime>, mut request: Request<Body>) -> Response {
    let id = request_id(&mut request);
    let snapshot = runtime.snapshot();
    if let Some(reason) = crate::kernel::inbound::host_problem(&request) {
        snapshot.metrics.http_refused.with_label_values(&[crate::kernel::inbound::reasons::HOST]).inc();
        let mut response = Problem::new(kinds::BAD_REQUEST, reason).into_response();
        response.headers_mut().insert(REQUEST_ID, id);
        return response;
    }
    let trace = TraceContext::from_headers(request.headers(), snapshot.sampling_ratio);
    let span = snapshot.traces.as_ref().filter(|_| trace.sampled).map(|traces| ServerSpan {
        traces,
        started: SystemTime::now(),
        method: request.method().clone(),
        path: request.uri().path().to_string(),
    });
    let (route, pipeline) = match snapshot.route_for(&request) {
        Some((route, pipeline)) => (Some(route), pipeline.clone()),
        None => (None, snapshot.fallback.clone()),
    };
    let method = request.method().clone();
    let client = request.extensions().get::<ClientAddr>().map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
    // Durations are bounded by validation; a deadline past the clock's range means none.
    let started = Instant::now();
    let deadline = route.and_then(|route| started.checked_add(route.timeout));
    request.extensions_mut().insert(RequestInfo {
        id: id.clone(),
        client,
        trace,
        route: route.cloned(),
        deadline,
        principal: None,
    });
    // Counts the request as in flight until the future ends, however it ends: a client that goes away
    // drops it, and the gauge must not drift.
    let in_flight = InFlight::new(&snapshot.metrics);
    let mut response = match (route, deadline) {
        (Some(route), Some(deadline)) => {
            let body = request.extensions().get::<crate::kernel::inbound::BodyProgress>().cloned();
            within(route, deadline, body, limit_body(route, request, pipeline)).await
        }
        (Some(route), None) => limit_body(route, request, pipeline).await,
        (None, _) => pipeline.run(request).await,
    };
    drop(in_flight);
    match route {
        Some(route) => {
            route.requests.inc(&snapshot.metrics, &method, response.status());
            route.request_duration.observe(started.elapsed().as_secs_f64());
        }
        None => {
            let labels = ["none", method_label(&method), status_class(response.status())];
            snapshot.metrics.requests.with_label_values(&labels).inc();
        }
    }
    if let Some(span) = span {
        span.end(&trace, route.map(|r| r.name.as_str()), response.status());
    }
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// The caller's request id if it is sane, else a new one (set on the request).
fn request_id(request: &mut Request<Body>) -> HeaderValue {
    match request.headers().get(&REQUEST_ID) {
        Some(v) if v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic()) => v.clone(),
        _ => {
            let id = format!("{:032x}", fastrand::u128(..));
            // Hex digits are always a valid header value.
            let id = HeaderValue::try_from(id).unwrap_or_else(|_| HeaderValue::from_static("0"));
            request.headers_mut().insert(REQUEST_ID, id.clone());
            id
        }
    }
}

/// The server span of a sampled request, exported when it ends.
struct ServerSpan<'a> {
    traces: &'a Arc<crate::kernel::telemetry::Traces>,
    started: SystemTime,
    method: Method,
    path: String,
}

impl ServerSpan<'_> {
    fn end(self, trace: &TraceContext, route: Option<&str>, status: http::StatusCode) {
        let mut attributes = vec![
            KeyValue::new("http.request.method", self.method.to_string()),
            KeyValue::new("url.path", self.path),
            KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
        ];
        if let Some(route) = route {
            attributes.push(KeyValue::new("http.route", route.to_string()));
        }
        let name = match route {
            Some(route) => format!("{} {route}", self.method),
            None => self.method.to_string(),
        };
        self.traces.server_span(trace, name, self.started, attributes, status.is_server_error());
    }
}

/// The in-flight gauge, incremented while alive.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn new(metrics: &crate::kernel::metrics::Metrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The exchange under the route's deadline, answered 504 when it passes.
async fn within(
    route: &Route,
    deadline: Instant,
    body: Option<crate::kernel::inbound::BodyProgress>,
    exchange: impl Future<Output = Response>,
) -> Response {
    match tokio::time::timeout_at(deadline.into(), exchange).await {
        Ok(response) => response,
        // The body's reader is waiting for the client: the wait is the client's, not the upstream's.
        Err(_) if body.is_some_and(|body| body.waiting_on_client()) => {
            route.metrics.gateway_errors.with_label_values(&[&route.name, "body_timeout"]).inc();
            route.metrics.http_refused.with_label_values(&[crate::kernel::inbound::reasons::BODY_TIMEOUT]).inc();
            crate::kernel::body::BodyError::Timeout.problem(&route.name).into_response()
        }
        Err(_) => {
            route.metrics.gateway_errors.with_label_values(&[&route.name, "timeout"]).inc();
            Problem::new(
                kinds::UPSTREAM_TIMEOUT,
                format!("route {} did not answer within {:?}", route.name, route.timeout),
            )
            .into_response()
        }
    }
}

/// The route's body limit, then its pipeline.
fn limit_body(route: &Route, request: Request<Body>, pipeline: Next) -> BoxFuture<'static, Response> {
    // A declared length (Content-Length, or a body of known size) is checked at once.
    if request.body().size_hint().lower() > route.max_body {
        route.metrics.gateway_errors.with_label_values(&[&route.name, "body_too_large"]).inc();
        let problem = Problem::new(
            kinds::BODY_TOO_LARGE,
            format!("the request body exceeds the limit of route {} ({} bytes)", route.name, route.max_body),
        );
        return Box::pin(std::future::ready(problem.into_response()));
    }
    // Bodies without a declared length are counted as they stream.
    let limit = usize::try_from(route.max_body).unwrap_or(usize::MAX);
    pipeline.run(request.map(|body| Body::new(Limited::new(body, limit))))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::components::proxy::component::Proxy;
    use crate::kernel::component::{BuildCx, Built, Component, Env, StageEntry};
    use crate::kernel::config;
    use crate::kernel::health::Health;
    use crate::kernel::metrics::Metrics;
    use crate::kernel::net::Overrides;
    use crate::kernel::stage::{Phase, Stage};
    use crate::kernel::telemetry::LogControl;
    use tower::ServiceExt as _;

    /// The stages of each phase, for every route.
    #[derive(Default)]
    struct Stages {
        authentication: Option<Arc<dyn Stage>>,
        rate_limit: Option<Arc<dyn Stage>>,
        authorization: Option<Arc<dyn Stage>>,
        cache: Option<Arc<dyn Stage>>,
    }

    impl Component for Stages {
        fn name(&self) -> &'static str {
            "test"
        }

        fn build(&self, _: &config::Loaded, _: &mut BuildCx<'_>) -> Result<Built, Vec<String>> {
            let phases = [
                (Phase::Authenticate, &self.authentication),
                (Phase::RateLimit, &self.rate_limit),
                (Phase::Authorize, &self.authorization),
                (Phase::Cache, &self.cache),
            ];
            let stages = phases
                .into_iter()
                .filter_map(|(phase, stage)| stage.clone().map(|stage| StageEntry::everywhere(phase, stage)))
                .collect();
            Ok(Built { stages, ..Built::default() })
        }
    }

    /// A stage that records its name and then answers, or passes on.
    struct Recorder {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        answer: Option<http::StatusCode>,
    }

    impl Stage for Recorder {
        fn call(&self, request: Request<Body>, next: Next) -> futures::future::BoxFuture<'static, Response> {
            let info = request.extensions().get::<RequestInfo>();
            let seen = format!(
                "{}(id={},route={},deadline={})",
                self.name,
                info.is_some(),
                info.and_then(|i| i.route.as_ref()).map_or("-", |r| r.name.as_str()),
                info.is_some_and(|i| i.deadline.is_some())
            );
            self.log.lock().unwrap().push(seen);
            let answer = self.answer;
            Box::pin(async move {
                match answer {
                    Some(status) => {
                        let mut response = Response::new(Body::empty());
                        *response.status_mut() = status;
                        response
                    }
                    None => next.run(request).await,
                }
            })
        }
    }

    fn runtime(stages: impl Fn(&Arc<Mutex<Vec<String>>>) -> Stages, log: &Arc<Mutex<Vec<String>>>) -> Arc<Runtime> {
        // The upstream is a closed port: requests that get through the chain end in a 502.
        let yaml = "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: t}\nspec:\n  routes:\n    - name: orders\n      match: {pathPrefix: /orders}\n      upstream: {url: 'http://127.0.0.1:9'}\n      maxBodyBytes: 16\n      requestSchema: {type: object, required: [sku]}\n";
        let files = config::Files { files: vec![("t.yaml".into(), yaml.into())] };
        let loaded = config::parse(&files).unwrap();
        let env = Env::new(Metrics::new().unwrap(), Health::default(), None, Overrides::default());
        let components: Vec<Arc<dyn Component>> = vec![Arc::new(Proxy::default()), Arc::new(stages(log))];
        Arc::new(Runtime::new(&loaded, components, env, LogControl::disabled()).unwrap())
    }

    fn recorder(
        log: &Arc<Mutex<Vec<String>>>,
        name: &'static str,
        answer: Option<http::StatusCode>,
    ) -> Option<Arc<dyn Stage>> {
        Some(Arc::new(Recorder { name, log: log.clone(), answer }))
    }

    async fn send(chain: &Chain, request: Request<Body>) -> Response {
        chain.clone().oneshot(request).await.unwrap()
    }

    fn post(body: &'static str) -> Request<Body> {
        Request::post("/orders")
            .header("host", "shop")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    }

    #[tokio::test]
    async fn slots_run_in_the_designed_order_after_routing_timeout_and_body_limit() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let chain = build(runtime(
            |log| Stages {
                authentication: recorder(log, "authentication", None),
                rate_limit: recorder(log, "rate_limit", None),
                authorization: recorder(log, "authorization", None),
                cache: recorder(log, "cache", None),
            },
            &log,
        ));
        let response = send(&chain, post(r#"{"sku":"a"}"#)).await;
        assert_eq!(response.status(), http::StatusCode::BAD_GATEWAY, "the closed upstream answers at the end");
        assert!(response.headers().contains_key(&REQUEST_ID));
        let seen = log.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "authentication(id=true,route=orders,deadline=true)",
                "rate_limit(id=true,route=orders,deadline=true)",
                "authorization(id=true,route=orders,deadline=true)",
                "cache(id=true,route=orders,deadline=true)",
            ]
        );
    }

    #[tokio::test]
    async fn the_body_limit_comes_before_authentication_and_validation_after_authorization() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let chain = build(runtime(
            |log| Stages {
                authentication: recorder(log, "authentication", None),
                authorization: recorder(log, "authorization", None),
                cache: recorder(log, "cache", None),
                ..Stages::default()
            },
            &log,
        ));
        // Too large: refused before any slot runs.
        let response = send(&chain, post(r#"{"sku":"aaaaaaaaaaaaaaaaaaaaaa"}"#)).await;
        assert_eq!(response.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
        // Invalid: authentication and authorization ran, the cache and the upstream did not.
        let response = send(&chain, post(r#"{"x":1}"#)).await;
        assert_eq!(response.status(), http::StatusCode::UNPROCESSABLE_ENTITY);
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].starts_with("authentication") && seen[1].starts_with("authorization"), "{seen:?}");
    }

    #[tokio::test]
    async fn a_slot_that_answers_ends_the_chain_there() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let chain = build(runtime(
            |log| Stages {
                authentication: recorder(log, "authentication", Some(http::StatusCode::UNAUTHORIZED)),
                cache: recorder(log, "cache", None),
                ..Stages::default()
            },
            &log,
        ));
        // Even an invalid body is answered by authentication first: validation comes later.
        let response = send(&chain, post(r#"{"x":1}"#)).await;
        assert_eq!(response.status(), http::StatusCode::UNAUTHORIZED);
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn unmatched_requests_get_a_problem_and_no_slot_runs_with_a_route() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let chain = build(runtime(|log| Stages { cache: recorder(log, "cache", None), ..Stages::default() }, &log));
        let response =
            send(&chain, Request::get("/elsewhere").header("host", "shop").body(Body::empty()).unwrap()).await;
        assert_eq!(response.status(), http::StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[http::header::CONTENT_TYPE], crate::kernel::problem::CONTENT_TYPE);
        assert_eq!(log.lock().unwrap().clone(), ["cache(id=true,route=-,deadline=false)"]);
    }
}
