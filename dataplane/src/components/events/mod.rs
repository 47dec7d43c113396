//! Events: `EventRoute`s take CloudEvents from a source (HTTP ingest, a Kafka topic) to a destination (a
//! Kafka topic, an HTTP webhook), with filters, retries with backoff and jitter, and a dead-letter topic.
//!
//! Ingest answers `202` only once the broker acknowledged the event; consumers commit an offset only
//! once its message was delivered, dead-lettered, or filtered out, so nothing acknowledged is lost and a
//! crash replays at most what was in hand.

pub mod build;
pub mod bus;
pub mod component;
pub mod envelope;
pub mod kafka;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse as _, Response};
use cloudevents::Event;
use cloudevents::event::AttributesReader as _;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt as _;
use umw_crds::event_route::{EventFormat, EventRoute};
use umw_crds::template::{self, Part};

use self::bus::Publisher;
use self::envelope::{Defaults, Format, Wire};
use self::kafka::{Incoming, PublishError};
use crate::kernel::metrics::Metrics;
use crate::kernel::net::Clients;
use crate::kernel::problem::{FieldProblem, Kind, Problem};

/// Problems of event ingest.
pub mod kinds {
    use super::Kind;
    use http::StatusCode;

    pub const EVENTS_UNAVAILABLE: Kind = Kind {
        slug: "events-unavailable",
        title: "The event could not be published now",
        status: StatusCode::SERVICE_UNAVAILABLE,
    };
    pub const EVENT_NOT_DELIVERED: Kind =
        Kind { slug: "event-not-delivered", title: "The event was not delivered", status: StatusCode::BAD_GATEWAY };
    pub const INVALID_EVENT: Kind =
        Kind { slug: "invalid-event", title: "The request is not a valid event", status: StatusCode::BAD_REQUEST };
    pub const EVENT_SCHEMA: Kind = Kind {
        slug: "invalid-event-data",
        title: "The event data does not satisfy the event route's schema",
        status: StatusCode::UNPROCESSABLE_ENTITY,
    };
}

/// Default webhook attempt deadline, as documented on `timeout`.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default retry backoffs, as documented on `retry`.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where a route's events go.
pub enum Destination {
    Kafka { producer: Arc<dyn Publisher>, topic: String, key: Option<Vec<Part>>, format: Format },
    Webhook { url: http::Uri, timeout: Duration, headers: Vec<(http::HeaderName, HeaderValue)>, clients: Box<Clients> },
}

/// A dead-letter topic.
pub struct DeadLetter {
    pub producer: Arc<dyn Publisher>,
    pub topic: String,
}

/// One EventRoute, compiled.
pub struct EventRouteRuntime {
    pub name: String,
    pub destination: Destination,
    pub types: Vec<String>,
    pub sources: Vec<String>,
    /// JSON pointer and the JSON value it must equal.
    pub data: Vec<(String, serde_json::Value)>,
    pub schema: Option<Arc<jsonschema::Validator>>,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub dead_letter: Option<DeadLetter>,
    pub defaults: Defaults,
    pub metrics: Metrics,
    /// Where spans go (when the Middleware has an OTLP endpoint).
    pub traces: Option<Arc<crate::kernel::telemetry::Traces>>,
}

/// Why one delivery attempt failed.
#[derive(Debug)]
pub struct DeliveryError {
    pub message: String,
    /// Worth another attempt (a timeout, a 5xx, an unavailable broker), or not (a 4xx).
    pub retryable: bool,
}

impl EventRouteRuntime {
    /// Compiles an EventRoute; the caller has checked it against the Middleware.
    pub fn new(
        route: &EventRoute,
        destination: Destination,
        dead_letter: Option<DeadLetter>,
        metrics: Metrics,
        traces: Option<Arc<crate::kernel::telemetry::Traces>>,
    ) -> Result<Self, String> {
        use kube::ResourceExt as _;
        let spec = &route.spec;
        let filter = spec.filter.clone().unwrap_or_default();
        let data = filter
            .data
            .iter()
            .map(|m| {
                serde_json::from_str(&m.equals)
                    .map(|v| (m.pointer.clone(), v))
                    .map_err(|e| format!("spec.filter.data: {:?} is not a JSON value ({e})", m.equals))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let schema = match &spec.schema {
            Some(schema) => Some(Arc::new(
                jsonschema::validator_for(&serde_json::Value::Object(schema.0.clone()))
                    .map_err(|e| format!("spec.schema: not a valid JSON Schema: {e}"))?,
            )),
            None => None,
        };
        let duration = |d: Option<&umw_crds::Duration>, default| umw_crds::validate::duration_or(d, default);
        Ok(Self {
            name: route.name_any(),
            destination,
            types: filter.types,
            sources: filter.sources,
            data,
            schema,
            max_attempts: spec.retry.max_attempts.max(1),
            initial_backoff: duration(spec.retry.initial_backoff.as_ref(), DEFAULT_INITIAL_BACKOFF),
            max_backoff: duration(spec.retry.max_backoff.as_ref(), DEFAULT_MAX_BACKOFF),
            dead_letter,
            defaults: Defaults {
                ty: route.name_any(),
                source: format!("/{}/{}", route.namespace().unwrap_or_else(|| "default".into()), route.name_any()),
            },
            metrics,
            traces,
        })
    }

    fn count(&self, outcome: &str) {
        self.metrics.events_handled.with_label_values(&[&self.name, outcome]).inc();
    }

    /// Whether the event passes the filter.
    pub fn passes(&self, event: &Event) -> bool {
        if !self.types.is_empty() && !self.types.iter().any(|t| t == event.ty()) {
            return false;
        }
        if !self.sources.is_empty() && !self.sources.iter().any(|s| s == event.source()) {
            return false;
        }
        if self.data.is_empty() {
            return true;
        }
        let Some(data) = envelope::json_data(event) else { return false };
        self.data.iter().all(|(pointer, value)| data.pointer(pointer) == Some(value))
    }

    /// Schema violations of the event's data (none without a schema).
    pub fn violations(&self, event: &Event) -> Vec<FieldProblem> {
        let Some(schema) = &self.schema else { return Vec::new() };
        let Some(data) = envelope::json_data(event) else {
            return vec![FieldProblem { pointer: String::new(), detail: "the event data is not JSON".into() }];
        };
        schema
            .iter_errors(&data)
            .take(20)
            .map(|e| FieldProblem { pointer: e.instance_path().to_string(), detail: e.to_string() })
            .collect()
    }

    /// One delivery attempt; `traceparent` is the W3C trace context to send with it (a webhook gets it as
    /// the `traceparent` header besides the event's own `ce-traceparent`).
    pub async fn deliver_once(&self, event: &Event, traceparent: Option<&str>) -> Result<(), DeliveryError> {
        match &self.destination {
            Destination::Kafka { producer, topic, key, format } => {
                publish_event(producer.as_ref(), topic, key.as_deref(), *format, event)
                    .await
                    .map(|_| ())
                    .map_err(|e| DeliveryError { retryable: e.retryable(), message: e.to_string() })
            }
            Destination::Webhook { url, timeout, headers, clients } => {
                let wire = envelope::to_http(event).map_err(|message| DeliveryError { message, retryable: false })?;
                let mut request = Request::post(url.clone());
                for (name, value) in &wire.headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                if let Some(traceparent) = traceparent {
                    request = request.header(crate::kernel::trace::TRACEPARENT, traceparent);
                }
                let request = request
                    .body(Body::from(wire.body))
                    .map_err(|e| DeliveryError { message: e.to_string(), retryable: false })?;
                let attempt = async {
                    let response = clients
                        .http1
                        .request(request)
                        .await
                        .map_err(|e| DeliveryError { message: format!("{url}: {}", chain(&e)), retryable: true })?;
                    let status = response.status();
                    // Read the (small) answer so that the connection goes back to the pool.
                    let _ = tokio::time::timeout(Duration::from_secs(1), response.into_body().collect()).await;
                    if status.is_success() {
                        Ok(())
                    } else {
                        let retryable = status.is_server_error()
                            || status == StatusCode::TOO_MANY_REQUESTS
                            || status == StatusCode::REQUEST_TIMEOUT;
                        Err(DeliveryError { message: format!("{url} answered {status}"), retryable })
                    }
                };
                match tokio::time::timeout(*timeout, attempt).await {
                    Ok(result) => result,
                    Err(_) => Err(DeliveryError {
                        message: format!("{url} did not answer within {timeout:?}"),
                        retryable: true,
                    }),
                }
            }
        }
    }

    /// Delivers with retries (exponential backoff, full jitter). Gives up early when `stopping` is set.
    /// The whole delivery is a span continuing the event's trace (`traceparent` extension), when sampled.
    pub async fn deliver(&self, event: &Event, stopping: &AtomicBool) -> Result<u32, (DeliveryError, u32)> {
        let started = std::time::SystemTime::now();
        let parent = envelope::attribute(event, envelope::TRACEPARENT).and_then(|t| crate::kernel::trace::parse(&t));
        let span_id = crate::kernel::trace::new_span_id();
        let traceparent = parent.map(|(trace_id, _, flags)| {
            let context =
                crate::kernel::trace::TraceContext { trace_id, span_id, parent_span_id: None, sampled: flags & 1 == 1 };
            context.traceparent(span_id).to_str().unwrap_or_default().to_string()
        });
        let result = self.deliver_attempts(event, stopping, traceparent.as_deref()).await;
        if let (Some(traces), Some((trace_id, parent_span, flags))) = (&self.traces, parent)
            && flags & 1 == 1
        {
            let (kind, name) = match &self.destination {
                Destination::Kafka { topic, .. } => {
                    (opentelemetry::trace::SpanKind::Producer, format!("publish {topic}"))
                }
                Destination::Webhook { url, .. } => {
                    (opentelemetry::trace::SpanKind::Client, format!("deliver {}", url.host().unwrap_or("")))
                }
            };
            let attributes = vec![
                opentelemetry::KeyValue::new("umw.event_route", self.name.clone()),
                opentelemetry::KeyValue::new("messaging.message.id", event.id().to_string()),
                opentelemetry::KeyValue::new(
                    "umw.attempts",
                    i64::from(match &result {
                        Ok(n) | Err((_, n)) => *n,
                    }),
                ),
            ];
            traces.child_span(trace_id, parent_span, span_id, name, kind, started, attributes, result.is_err());
        }
        result
    }

    async fn deliver_attempts(
        &self,
        event: &Event,
        stopping: &AtomicBool,
        traceparent: Option<&str>,
    ) -> Result<u32, (DeliveryError, u32)> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.deliver_once(event, traceparent).await {
                Ok(()) => {
                    self.metrics.events_deliveries.with_label_values(&[&self.name, "ok"]).inc();
                    return Ok(attempt);
                }
                Err(error) => {
                    self.metrics.events_deliveries.with_label_values(&[&self.name, "error"]).inc();
                    if !error.retryable || attempt >= self.max_attempts || stopping.load(Ordering::Relaxed) {
                        return Err((error, attempt));
                    }
                    tracing::debug!(route = %self.name, attempt, error = %error.message, "delivery failed; retrying");
                    let ceiling =
                        self.initial_backoff.saturating_mul(2u32.saturating_pow(attempt - 1)).min(self.max_backoff);
                    let pause = ceiling.mul_f64(fastrand::f64());
                    let deadline = tokio::time::Instant::now() + pause;
                    while tokio::time::Instant::now() < deadline {
                        if stopping.load(Ordering::Relaxed) {
                            return Err((error, attempt));
                        }
                        tokio::time::sleep(Duration::from_millis(50).min(pause)).await;
                    }
                }
            }
        }
    }
}

/// Writes the event to a Kafka destination: in the route's format, keyed by the key template (the event id
/// without one, or when it renders empty), acknowledged by the broker.
async fn publish_event(
    producer: &dyn Publisher,
    topic: &str,
    key: Option<&[Part]>,
    format: Format,
    event: &Event,
) -> Result<kafka::Delivered, PublishError> {
    let wire = envelope::to_kafka(event, format).map_err(PublishError::Refused)?;
    let key = key.map(|parts| render_event(parts, event)).filter(|k| !k.is_empty());
    let key = key.unwrap_or_else(|| event.id().to_string());
    producer.publish(topic, Some(key.as_bytes()), &wire).await
}

/// Renders a key or room template over an event (`data.<field>`, `id`, `type`, `source`, `subject`, or an
/// extension as `ext.<name>`).
pub fn render_event(parts: &[Part], event: &Event) -> String {
    let data = envelope::json_data(event);
    template::render(parts, |source, name| match (source, name) {
        ("data", Some(path)) => {
            let pointer = format!("/{}", path.replace('.', "/"));
            data.as_ref().and_then(|d| d.pointer(&pointer)).map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        }
        ("ext", Some(name)) => envelope::attribute(event, name),
        (attribute, None) => envelope::attribute(event, attribute),
        _ => None,
    })
}

/// The sources a key template may use.
pub const TEMPLATE_SOURCES: &[&str] = &["data", "id", "type", "source", "subject", "ext"];

/// The event format of a route.
pub fn format_of(format: EventFormat) -> Format {
    match format {
        EventFormat::Binary => Format::Binary,
        EventFormat::Structured => Format::Structured,
    }
}

/// HTTP ingest of one event route: `POST` its path with an event (structured, binary, or a plain JSON
/// body) → `202` once delivered.
pub struct Ingest {
    pub route: Arc<EventRouteRuntime>,
}

impl crate::kernel::endpoint::Endpoint for Ingest {
    fn call(&self, request: Request<Body>, info: crate::kernel::context::RequestInfo) -> BoxFuture<'static, Response> {
        let route = self.route.clone();
        Box::pin(async move { Ingest { route }.handle(request, &info.trace).await })
    }

    fn target(&self) -> String {
        "events".to_string()
    }
}

impl Ingest {
    /// Publishes the request's event(s). The events continue the request's trace from a producer span
    /// (exported when the request is sampled), so that consumers continue it in turn.
    pub async fn handle(&self, request: Request<Body>, trace: &crate::kernel::trace::TraceContext) -> Response {
        let route = &self.route;
        let started = std::time::SystemTime::now();
        let producer_span = crate::kernel::trace::new_span_id();
        let traceparent = trace.traceparent(producer_span).to_str().ok().map(str::to_string);
        let response = self.handle_inner(request, traceparent).await;
        if let Some(traces) = &route.traces
            && trace.sampled
        {
            let name = match &route.destination {
                Destination::Kafka { topic, .. } => format!("publish {topic}"),
                Destination::Webhook { url, .. } => format!("deliver {}", url.host().unwrap_or("")),
            };
            let attributes = vec![
                opentelemetry::KeyValue::new("umw.event_route", route.name.clone()),
                opentelemetry::KeyValue::new("http.response.status_code", i64::from(response.status().as_u16())),
            ];
            traces.child_span(
                trace.trace_id,
                trace.span_id,
                producer_span,
                name,
                opentelemetry::trace::SpanKind::Producer,
                started,
                attributes,
                !response.status().is_success(),
            );
        }
        response
    }

    async fn handle_inner(&self, request: Request<Body>, trace: Option<String>) -> Response {
        let route = &self.route;
        let (parts, body) = request.into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            // Not an event: the body did not arrive (counted with the listener's refusals when it timed out).
            Err(error) => return crate::kernel::body::body_error(error).problem(&route.name).into_response(),
        };
        let batch = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(envelope::BATCH));
        if batch {
            return self.handle_batch(bytes, trace).await;
        }
        let mut event = match envelope::from_http(&parts.headers, bytes.to_vec(), &route.defaults) {
            Ok(event) => event,
            Err(error) => {
                route.count("invalid");
                return Problem::new(kinds::INVALID_EVENT, error).into_response();
            }
        };
        let nonconformities = envelope::nonconformities(&event);
        if !nonconformities.is_empty() {
            route.count("invalid");
            return nonconforming(nonconformities.into_iter().map(|(a, r)| attribute_problem("", &a, &r)).collect());
        }
        if event.extension(envelope::TRACEPARENT).is_none()
            && let Some(traceparent) = trace
        {
            event.set_extension(envelope::TRACEPARENT, traceparent);
        }
        let violations = route.violations(&event);
        if !violations.is_empty() {
            route.count("invalid");
            return Problem::new(
                kinds::EVENT_SCHEMA,
                format!("{} violation(s) of the schema of event route {}", violations.len(), route.name),
            )
            .with_errors(violations)
            .into_response();
        }
        let id = event.id().to_string();
        if !route.passes(&event) {
            route.count("filtered");
            return accepted(serde_json::json!({"id": id, "delivered": false, "reason": "filtered out"}));
        }
        match &route.destination {
            Destination::Kafka { producer, topic, key, format } => {
                match publish_event(producer.as_ref(), topic, key.as_deref(), *format, &event).await {
                    Ok(delivered) => {
                        route.count("delivered");
                        accepted(serde_json::json!({
                            "id": id, "topic": topic, "partition": delivered.partition, "offset": delivered.offset
                        }))
                    }
                    Err(error) => {
                        route.count("failed");
                        let problem = match &error {
                            PublishError::Full(_) => Problem::new(kinds::EVENTS_UNAVAILABLE, error.to_string()).retry_after(1),
                            PublishError::TimedOut(_) => Problem::new(
                                kinds::EVENTS_UNAVAILABLE,
                                format!("{error}; the event may have been written if the broker went away after receiving it: send it again with the same id (ce-id {id})"),
                            )
                            .retry_after(5),
                            PublishError::Unavailable(_) => Problem::new(kinds::EVENTS_UNAVAILABLE, error.to_string()).retry_after(5),
                            PublishError::Failed(_) => Problem::new(kinds::EVENTS_UNAVAILABLE, error.to_string()).retry_after(5),
                            PublishError::Refused(_) => Problem::new(kinds::INVALID_EVENT, error.to_string()),
                        };
                        problem.into_response()
                    }
                }
            }
            Destination::Webhook { .. } => {
                let stopping = AtomicBool::new(false);
                match route.deliver(&event, &stopping).await {
                    Ok(_) => {
                        route.count("delivered");
                        accepted(serde_json::json!({"id": id, "delivered": true}))
                    }
                    Err((error, attempts)) if route.dead_letter.is_some() => {
                        let message = ingested(&event, &route.name);
                        if dead_letter(route, &message, &error.message, attempts, &stopping, true).await {
                            accepted(serde_json::json!({"id": id, "delivered": false, "deadLettered": true}))
                        } else {
                            Problem::new(
                                kinds::EVENTS_UNAVAILABLE,
                                "the event was not delivered and could not be dead-lettered",
                            )
                            .retry_after(5)
                            .into_response()
                        }
                    }
                    Err((error, attempts)) => {
                        route.count("failed");
                        Problem::new(
                            kinds::EVENT_NOT_DELIVERED,
                            format!("after {attempts} attempt(s): {}", error.message),
                        )
                        .into_response()
                    }
                }
            }
        }
    }
}

/// An ingested event as the record a dead-letter topic gets (binary mode; no original topic).
fn ingested(event: &Event, route: &str) -> Incoming {
    let wire = envelope::to_kafka(event, Format::Binary).unwrap_or_default();
    Incoming {
        topic: format!("http:{route}"),
        partition: -1,
        offset: -1,
        key: Some(event.id().as_bytes().to_vec()),
        headers: wire.headers.into_iter().map(|(n, v)| (n, v.into_bytes())).collect(),
        payload: Some(wire.body),
    }
}

/// An error with its causes, `a: b: c`.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        out.push_str(": ");
        out.push_str(&e.to_string());
        current = e.source();
    }
    out
}

/// Events one batch request may carry.
pub const MAX_BATCH: usize = 1000;

impl Ingest {
    /// `application/cloudevents-batch+json`: a JSON array of structured events, published together (to
    /// Kafka concurrently, so that they share the producer's batches). `202` with each event's partition
    /// and offset when every one was acknowledged; otherwise a `503` naming the events to send again (the
    /// others are in Kafka).
    async fn handle_batch(&self, body: bytes::Bytes, trace: Option<String>) -> Response {
        let route = &self.route;
        // A large batch is parsed and checked off the request threads, so that it does not stall the others.
        let parsed = if body.len() > crate::kernel::validate::BLOCKING_ABOVE {
            let route = route.clone();
            match tokio::task::spawn_blocking(move || parse_batch(&route, &body, trace.as_deref())).await {
                Ok(parsed) => parsed,
                // A panic while reading it (or a runtime shutting down): the gateway's failure, not the client's.
                Err(error) => {
                    tracing::error!(%error, route = %self.route.name, "reading a batch failed");
                    crate::kernel::metrics::PANICS.inc();
                    return Problem::new(
                        crate::kernel::problem::kinds::INTERNAL,
                        "the gateway failed to read this batch",
                    )
                    .into_response();
                }
            }
        } else {
            parse_batch(route, &body, trace.as_deref())
        };
        let events = match parsed {
            Ok(events) => events,
            Err(problem) => {
                route.count("invalid");
                return problem.into_response();
            }
        };
        let results = futures::future::join_all(events.iter().map(|event| async move {
            if !route.passes(event) {
                route.count("filtered");
                return Ok(serde_json::json!({"id": event.id(), "delivered": false, "reason": "filtered out"}));
            }
            let stopping = AtomicBool::new(false);
            match &route.destination {
                Destination::Kafka { producer, topic, key, format } => {
                    publish_event(producer.as_ref(), topic, key.as_deref(), *format, event)
                        .await
                        .map(|d| serde_json::json!({"id": event.id(), "partition": d.partition, "offset": d.offset}))
                        .map_err(|e| (event.id().to_string(), e.to_string()))
                }
                Destination::Webhook { .. } => route
                    .deliver(event, &stopping)
                    .await
                    .map(|_| serde_json::json!({"id": event.id(), "delivered": true}))
                    .map_err(|(e, _)| (event.id().to_string(), e.message)),
            }
        }))
        .await;
        let mut accepted_events = Vec::new();
        let mut failed = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(value) => {
                    if value.get("delivered") != Some(&serde_json::Value::Bool(false)) {
                        route.count("delivered");
                    }
                    accepted_events.push(value);
                }
                Err((id, error)) => {
                    route.count("failed");
                    failed.push(FieldProblem { pointer: format!("/{i}"), detail: format!("event {id}: {error}") });
                }
            }
        }
        if failed.is_empty() {
            return accepted(serde_json::json!({"events": accepted_events}));
        }
        Problem::new(
            kinds::EVENTS_UNAVAILABLE,
            format!(
                "{} of {} events were not acknowledged; send those again with the same ids",
                failed.len(),
                failed.len() + accepted_events.len()
            ),
        )
        .with_errors(failed)
        .retry_after(1)
        .into_response()
    }
}

/// A batch's events, each a valid CloudEvent 1.0 passing the route's schema and carrying the trace
/// context, or the problem that refuses the whole batch. The array is split without parsing its elements
/// into a tree first; each element is read as an event directly.
fn parse_batch(route: &EventRouteRuntime, body: &[u8], trace: Option<&str>) -> Result<Vec<Event>, Box<Problem>> {
    let elements = match serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(body) {
        Ok(elements) if elements.len() > MAX_BATCH => {
            return Err(Problem::new(
                kinds::INVALID_EVENT,
                format!("{} events in one batch; at most {MAX_BATCH}", elements.len()),
            )
            .into());
        }
        Ok(elements) => elements,
        Err(error) => {
            return Err(
                Problem::new(kinds::INVALID_EVENT, format!("a batch is a JSON array of CloudEvents: {error}")).into()
            );
        }
    };
    let mut events = Vec::with_capacity(elements.len());
    let mut problems = Vec::new();
    let mut not_events = Vec::new();
    for (i, element) in elements.into_iter().enumerate() {
        match serde_json::from_str::<Event>(element.get()) {
            Ok(mut event) => {
                for (attribute, reason) in envelope::nonconformities(&event) {
                    not_events.push(attribute_problem(&format!("/{i}"), &attribute, &reason));
                }
                if event.extension(envelope::TRACEPARENT).is_none()
                    && let Some(traceparent) = trace
                {
                    event.set_extension(envelope::TRACEPARENT, traceparent.to_string());
                }
                for mut violation in route.violations(&event) {
                    violation.pointer = format!("/{i}/data{}", violation.pointer);
                    problems.push(violation);
                }
                events.push(event);
            }
            Err(error) => {
                not_events.push(FieldProblem { pointer: format!("/{i}"), detail: format!("not a CloudEvent: {error}") })
            }
        }
    }
    if !not_events.is_empty() {
        return Err(Problem::new(
            kinds::INVALID_EVENT,
            format!(
                "{} problem(s) make elements of the batch invalid CloudEvents 1.0; nothing was published",
                not_events.len()
            ),
        )
        .with_errors(not_events)
        .into());
    }
    if !problems.is_empty() {
        return Err(Problem::new(
            kinds::EVENT_SCHEMA,
            format!("{} problem(s) in the batch; nothing was published", problems.len()),
        )
        .with_errors(problems)
        .into());
    }
    Ok(events)
}

/// A problem with one attribute of an event, at `<prefix>/<attribute>`.
fn attribute_problem(prefix: &str, attribute: &str, reason: &str) -> FieldProblem {
    FieldProblem { pointer: format!("{prefix}/{attribute}"), detail: format!("attribute `{attribute}` {reason}") }
}

/// `400` for an event that breaks the CloudEvents 1.0 specification, naming each attribute.
fn nonconforming(problems: Vec<FieldProblem>) -> Response {
    let detail = format!(
        "not a valid CloudEvent 1.0: {}",
        problems.iter().map(|p| p.detail.as_str()).collect::<Vec<_>>().join("; ")
    );
    Problem::new(kinds::INVALID_EVENT, detail).with_errors(problems).into_response()
}

fn accepted(body: serde_json::Value) -> Response {
    let mut response = axum::Json(body).into_response();
    *response.status_mut() = StatusCode::ACCEPTED;
    response
}

/// Handles the messages of a Kafka source.
pub struct KafkaSourceHandler {
    pub route: Arc<EventRouteRuntime>,
}

impl kafka::Handler for KafkaSourceHandler {
    fn handle(&self, message: Incoming, stopping: Arc<AtomicBool>) -> BoxFuture<'static, bool> {
        let route = self.route.clone();
        async move { handle_message(&route, message, &stopping).await }.boxed()
    }
}

async fn handle_message(route: &EventRouteRuntime, message: Incoming, stopping: &AtomicBool) -> bool {
    let event = match envelope::from_kafka(message.headers.clone(), message.payload.clone()) {
        Ok(event) => Ok(event),
        // A plain record (no CloudEvent): an event around it, with an id stable across redeliveries.
        Err(_) if !message.headers.iter().any(|(n, _)| n.starts_with("ce_")) => wrap_plain(route, &message),
        Err(error) => Err(format!("not a CloudEvent: {error}")),
    };
    let event = match event {
        Ok(event) => event,
        Err(error) => {
            route.count("invalid");
            return dead_letter(route, &message, &error, 0, stopping, false).await;
        }
    };
    let violations = route.violations(&event);
    if !violations.is_empty() {
        route.count("invalid");
        let error = format!(
            "schema: {}",
            violations.iter().map(|v| format!("{} {}", v.pointer, v.detail)).collect::<Vec<_>>().join("; ")
        );
        return dead_letter(route, &message, &error, 0, stopping, false).await;
    }
    if !route.passes(&event) {
        route.count("filtered");
        return true;
    }
    match route.deliver(&event, stopping).await {
        Ok(_) => {
            route.count("delivered");
            true
        }
        Err(_) if stopping.load(Ordering::Relaxed) => false,
        Err((error, attempts)) => dead_letter(route, &message, &error.message, attempts, stopping, false).await,
    }
}

fn wrap_plain(route: &EventRouteRuntime, message: &Incoming) -> Result<Event, String> {
    envelope::plain(message, &route.defaults.ty)
}

/// Headers of a dead-lettered message, next to the original ones.
pub mod dead_letter_headers {
    pub const TOPIC: &str = "umw_original_topic";
    pub const PARTITION: &str = "umw_original_partition";
    pub const OFFSET: &str = "umw_original_offset";
    pub const ERROR: &str = "umw_error";
    pub const ATTEMPTS: &str = "umw_attempts";
    pub const ROUTE: &str = "umw_event_route";
}

/// Sends the original record to the dead-letter topic, retrying until it is there (or, with `once`,
/// trying once; or the consumer stops); without a dead-letter topic, the message is dropped with an
/// error log.
async fn dead_letter(
    route: &EventRouteRuntime,
    message: &Incoming,
    error: &str,
    attempts: u32,
    stopping: &AtomicBool,
    once: bool,
) -> bool {
    let Some(dead_letter) = &route.dead_letter else {
        route.count("dropped");
        tracing::error!(
            route = %route.name, topic = %message.topic, partition = message.partition, offset = message.offset, %error,
            "event not delivered and no dead-letter topic: dropped"
        );
        return true;
    };
    use dead_letter_headers as h;
    let mut headers: Vec<(String, String)> = message
        .headers
        .iter()
        .filter(|(n, _)| !n.starts_with("umw_"))
        .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    headers.push((h::TOPIC.into(), message.topic.clone()));
    headers.push((h::PARTITION.into(), message.partition.to_string()));
    headers.push((h::OFFSET.into(), message.offset.to_string()));
    headers.push((h::ERROR.into(), error.chars().take(1000).collect()));
    headers.push((h::ATTEMPTS.into(), attempts.to_string()));
    headers.push((h::ROUTE.into(), route.name.clone()));
    let wire = Wire { headers, body: message.payload.clone().unwrap_or_default() };
    let mut pause = Duration::from_millis(200);
    loop {
        match dead_letter.producer.publish(&dead_letter.topic, message.key.as_deref(), &wire).await {
            Ok(_) => {
                route.count("dead_lettered");
                tracing::warn!(route = %route.name, topic = %message.topic, partition = message.partition, offset = message.offset, %error, attempts, "event dead-lettered");
                return true;
            }
            Err(publish) => {
                if once || stopping.load(Ordering::Relaxed) {
                    tracing::warn!(route = %route.name, error = %publish, "cannot write to the dead-letter topic");
                    return false;
                }
                tracing::warn!(route = %route.name, error = %publish, "cannot write to the dead-letter topic; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}
