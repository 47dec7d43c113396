//! `POST /commands/{name}` and `GET /commands/{id}`.
//!
//! By the time a command reaches [`Command::handle`], the chain has authenticated, rate-limited and
//! authorized the request and checked its body against the command's JSON Schema. Here: the idempotency
//! key (a replay returns the original response; the same key with another body is a `409`), the optional
//! handler upstream, then one transaction writing the command and its event, then `202`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::response::{IntoResponse as _, Response};
use futures::future::BoxFuture;
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use sha2::Digest as _;
use umw_crds::template::{self, Part};

use super::kinds;
use super::{CommandRecord, NewCommand, OutboxStore, Record, Recorded, StoreError};
use crate::kernel::context::RequestInfo;
use crate::kernel::endpoint::Endpoint;
use crate::kernel::metrics::Metrics;
use crate::kernel::problem::Problem;
use crate::kernel::telemetry::Traces;

/// Calls the command's handler upstream: a route of the proxy's (through the `Forward` port).
pub type Handler = Arc<crate::kernel::endpoint::Route>;

/// The header that marks a replayed response.
pub const REPLAYED: &str = "idempotent-replayed";

/// Longest idempotency key accepted.
const MAX_KEY: usize = 255;
/// Largest handler answer kept as the command's result.
const MAX_RESULT: usize = 64 * 1024;

/// A command of the configuration.
pub struct Command {
    pub name: String,
    pub event_type: String,
    pub topic: String,
    pub source: String,
    pub key: Option<Vec<Part>>,
    pub idempotency_header: HeaderName,
    pub idempotency_required: bool,
    pub ttl: Duration,
    pub handler: Option<Handler>,
    pub store: Arc<dyn OutboxStore>,
    pub metrics: Metrics,
    pub traces: Option<Arc<Traces>>,
}

/// A command is an endpoint behind `Arc`, so that its request future owns what it needs.
pub struct CommandEndpoint(pub Arc<Command>);

impl Endpoint for CommandEndpoint {
    fn call(&self, request: Request<Body>, info: RequestInfo) -> BoxFuture<'static, Response> {
        let command = self.0.clone();
        Box::pin(async move { command.handle(request, info).await })
    }

    fn target(&self) -> String {
        "commands".to_string()
    }

    fn schema_owner(&self) -> Option<String> {
        Some(format!("command {}", self.0.name))
    }

    fn invalid_body(&self) {
        self.0.count("invalid");
    }
}

impl Command {
    fn count(&self, outcome: &str) {
        self.metrics.commands.with_label_values(&[&self.name, outcome]).inc();
    }

    fn unavailable(&self, error: &StoreError, outcome: &str) -> Response {
        self.count(outcome);
        self.metrics.postgres_errors.with_label_values(&["command"]).inc();
        tracing::warn!(command = %self.name, %error, "a command could not be recorded");
        let detail = match error {
            StoreError::Unavailable(_) => "the command store is unavailable; nothing was recorded, send it again",
            StoreError::Failed(_) => "the command store refused to record the command; nothing was recorded",
        };
        Problem::new(kinds::COMMANDS_UNAVAILABLE, detail).retry_after(2).into_response()
    }

    /// The original response for a retry with the same key and body, a `409` for another body.
    fn replay(&self, existing: CommandRecord, hash: &[u8]) -> Response {
        if existing.request_hash != hash {
            self.count("conflict");
            return Problem::new(
                kinds::IDEMPOTENCY_CONFLICT,
                "this idempotency key was already used with a different body; use a new key for a new request",
            )
            .into_response();
        }
        self.count("replayed");
        let mut response =
            json(StatusCode::from_u16(existing.status).unwrap_or(StatusCode::ACCEPTED), &existing.response);
        response.headers_mut().insert(HeaderName::from_static(REPLAYED), HeaderValue::from_static("true"));
        location(&mut response, existing.id);
        response
    }

    /// Handles `POST /commands/{name}`.
    pub async fn handle(&self, request: Request<Body>, info: RequestInfo) -> Response {
        let (parts, body) = request.into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                self.count("invalid");
                return crate::kernel::body::body_error(error).problem(&self.name).into_response();
            }
        };
        let data: serde_json::Value = match serde_json::from_slice(&bytes) {
            Ok(data) => data,
            Err(error) => {
                self.count("invalid");
                return Problem::new(kinds::INVALID_COMMAND, format!("the body is not JSON: {error}")).into_response();
            }
        };
        let key = match parts.headers.get(&self.idempotency_header) {
            Some(value) => match value.to_str() {
                Ok(key) if !key.is_empty() && key.len() <= MAX_KEY && key.bytes().all(|b| b.is_ascii_graphic()) => {
                    Some(key.to_string())
                }
                _ => {
                    self.count("invalid");
                    return Problem::new(
                        kinds::INVALID_COMMAND,
                        format!(
                            "the {} header must be 1 to {MAX_KEY} visible ASCII characters",
                            self.idempotency_header
                        ),
                    )
                    .into_response();
                }
            },
            None if self.idempotency_required => {
                self.count("invalid");
                return Problem::new(
                    kinds::INVALID_COMMAND,
                    format!("command {} needs an {} header", self.name, self.idempotency_header),
                )
                .into_response();
            }
            None => None,
        };
        let hash = sha2::Sha256::digest(&bytes).to_vec();
        if let Some(key) = &key {
            let started = SystemTime::now();
            let found = self.store.find_by_key(&self.name, key).await;
            self.span(&info, "SELECT umw_commands", started, found.is_err());
            match found {
                Ok(Some(existing)) => return self.replay(existing, &hash),
                Ok(None) => {}
                Err(error) => return self.unavailable(&error, "unavailable"),
            }
        }

        let id = uuid::Uuid::now_v7();
        let mut result = None;
        let mut rejected = None;
        if let Some(handler) = &self.handler {
            let mut forward = Request::builder().method(parts.method.clone()).uri(parts.uri.clone());
            if let Some(headers) = forward.headers_mut() {
                *headers = parts.headers.clone();
                if let Ok(value) = HeaderValue::try_from(id.to_string()) {
                    headers.insert(HeaderName::from_static("umw-command-id"), value);
                }
            }
            let Ok(forward) = forward.body(Body::from(bytes.clone())) else {
                self.count("failed");
                return Problem::new(kinds::INVALID_COMMAND, "the request cannot be sent to the handler")
                    .into_response();
            };
            // The handler's route, with the command's deadline: its endpoint forwards to the upstream.
            let mut through = info.clone();
            through.route = Some(handler.clone());
            let response = handler.endpoint.call(forward, through).await;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let body = http_body_util::Limited::new(response.into_body(), MAX_RESULT).collect().await;
            let body = body.map(|b| b.to_bytes()).unwrap_or_default();
            let answer = serde_json::from_slice::<serde_json::Value>(&body)
                .unwrap_or_else(|_| serde_json::json!({ "detail": String::from_utf8_lossy(&body) }));
            if status.is_success() {
                result = (!body.is_empty()).then_some(answer);
            } else if status.is_client_error()
                && status != StatusCode::REQUEST_TIMEOUT
                && status != StatusCode::TOO_MANY_REQUESTS
            {
                rejected = Some((status, answer));
            } else {
                self.count("handler_failed");
                // The gateway's own problem (unreachable, timed out, breaker open) or the handler's answer.
                let own = answer["type"].as_str().is_some_and(|t| t.starts_with("https://umw.dev/problems/"));
                let detail = if own {
                    format!(
                        "the handler of command {} could not be used ({}); nothing was recorded, send it again",
                        self.name,
                        answer["detail"].as_str().unwrap_or("unavailable")
                    )
                } else {
                    format!(
                        "the handler of command {} answered {status}; nothing was recorded, send it again",
                        self.name
                    )
                };
                return Problem::new(kinds::HANDLER_FAILED, detail)
                    .retry_after(retry_after.unwrap_or(1))
                    .into_response();
            }
        }

        let (state, status, response, events) = match rejected {
            Some((status, answer)) => ("rejected", status, answer, Vec::new()),
            None => {
                let event = self.event(id, &data, &bytes, &info);
                let mut response = serde_json::json!({
                    "id": id.to_string(),
                    "command": self.name,
                    "state": "accepted",
                    "statusUrl": format!("/commands/{id}"),
                    "events": [{"id": event.id, "topic": event.topic}],
                });
                if let Some(result) = result {
                    response["result"] = result;
                }
                ("accepted", StatusCode::ACCEPTED, response, vec![event])
            }
        };
        let record = CommandRecord {
            id,
            command: self.name.clone(),
            request_hash: hash.clone(),
            state: state.into(),
            status: status.as_u16(),
            response: response.clone(),
            created_at: String::new(),
        };
        let started = SystemTime::now();
        let recorded = self.store.record(NewCommand { record, idempotency_key: key, ttl: self.ttl, events }).await;
        self.span(&info, "INSERT umw_commands umw_outbox", started, recorded.is_err());
        match recorded {
            Ok(Recorded::Done) => {
                self.count(state);
                let mut response = json(status, &response);
                // A rejected command has a record too: its state is there to read.
                location(&mut response, id);
                response
            }
            Ok(Recorded::KeyTaken(existing)) => self.replay(existing, &hash),
            Err(error) => self.unavailable(&error, "unavailable"),
        }
    }

    /// The command's event: a CloudEvent whose data is the command body, continuing the request's trace.
    fn event(&self, command: uuid::Uuid, data: &serde_json::Value, bytes: &[u8], info: &RequestInfo) -> Record {
        let key = self
            .key
            .as_ref()
            .map(|parts| {
                template::render(parts, |source, name| match (source, name) {
                    ("data", Some(path)) => {
                        let pointer = format!("/{}", path.replace('.', "/"));
                        data.pointer(&pointer).and_then(|v| match v {
                            serde_json::Value::String(s) => Some(s.clone()),
                            // A null value falls back to the command id (no shared "null" key).
                            serde_json::Value::Null => None,
                            other => Some(other.to_string()),
                        })
                    }
                    ("id", None) => Some(command.to_string()),
                    _ => None,
                })
            })
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| command.to_string());
        let mut extensions = Vec::new();
        if let Ok(traceparent) = info.trace.traceparent(info.trace.span_id).to_str() {
            extensions.push(("traceparent".to_string(), traceparent.to_string()));
        }
        Record {
            id: uuid::Uuid::now_v7().to_string(),
            topic: self.topic.clone(),
            key: Some(key),
            ty: self.event_type.clone(),
            source: self.source.clone(),
            subject: None,
            time: None,
            data: bytes.to_vec(),
            content_type: Some("application/json".into()),
            extensions,
            headers: Vec::new(),
        }
    }

    /// A client span for a database call, when the request is sampled.
    fn span(&self, info: &RequestInfo, name: &str, started: SystemTime, error: bool) {
        let Some(traces) = &self.traces else { return };
        if !info.trace.sampled {
            return;
        }
        traces.child_span(
            info.trace.trace_id,
            info.trace.span_id,
            crate::kernel::trace::new_span_id(),
            name.to_string(),
            SpanKind::Client,
            started,
            vec![
                KeyValue::new("db.system.name", "postgresql"),
                KeyValue::new("db.operation.name", name.split(' ').next().unwrap_or("").to_string()),
                KeyValue::new("umw.command", self.name.clone()),
            ],
            error,
        );
    }
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = Response::new(Body::from(serde_json::to_vec(body).unwrap_or_default()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn location(response: &mut Response, id: uuid::Uuid) {
    if let Ok(value) = HeaderValue::try_from(format!("/commands/{id}")) {
        response.headers_mut().insert(header::LOCATION, value);
    }
}

/// `GET /commands/{id}`: a command's state and its events'.
pub struct Status {
    pub store: Arc<dyn OutboxStore>,
    pub metrics: Metrics,
}

impl Endpoint for Status {
    fn call(&self, request: Request<Body>, _info: RequestInfo) -> BoxFuture<'static, Response> {
        let status = Status { store: self.store.clone(), metrics: self.metrics.clone() };
        Box::pin(async move { status.handle(request).await })
    }

    fn target(&self) -> String {
        "commands".to_string()
    }
}

impl Status {
    pub async fn handle(&self, request: Request<Body>) -> Response {
        let path = request.uri().path();
        let id = path.strip_prefix("/commands/").unwrap_or("");
        let not_found = || self.metrics.gateway_errors.with_label_values(&["commands-status", "not_found"]).inc();
        let Ok(id) = id.parse::<uuid::Uuid>() else {
            not_found();
            return Problem::new(kinds::COMMAND_NOT_FOUND, format!("{id:?} is not a command id")).into_response();
        };
        match self.store.get(id).await {
            Ok(Some((record, events))) => {
                let state = if record.state == "rejected" {
                    "rejected"
                } else if events.iter().any(|e| e.state == "failed") {
                    "failed"
                } else if events.iter().all(|e| e.state == "published") {
                    "published"
                } else {
                    "accepted"
                };
                let mut body = serde_json::json!({
                    "id": record.id.to_string(),
                    "command": record.command,
                    "state": state,
                    "createdAt": record.created_at,
                    "events": events,
                });
                if record.state == "rejected" {
                    body["response"] = record.response;
                } else if let Some(result) = record.response.get("result") {
                    body["result"] = result.clone();
                }
                json(StatusCode::OK, &body)
            }
            Ok(None) => {
                not_found();
                Problem::new(
                    kinds::COMMAND_NOT_FOUND,
                    format!("no command {id} (unknown, or older than its idempotency ttl)"),
                )
                .into_response()
            }
            Err(error) => {
                self.metrics.postgres_errors.with_label_values(&["status"]).inc();
                tracing::warn!(%error, "a command's state could not be read");
                Problem::new(kinds::COMMANDS_UNAVAILABLE, "the command store is unavailable; try again")
                    .retry_after(2)
                    .into_response()
            }
        }
    }
}
