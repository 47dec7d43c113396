//! The proxy handler: sends a routed request to its upstream and streams the answer back, with retries of
//! idempotent requests inside a retry budget, a circuit breaker per upstream, and the headers a proxy owes
//! both sides.

pub mod budget;
pub mod component;
pub mod headers;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::future::BoxFuture;
use http::request::Parts;
use http::{HeaderValue, Method, Request, StatusCode, Uri, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use opentelemetry::KeyValue;

use crate::kernel::body::{BodyError, is_length_limit};
use crate::kernel::breaker::Admission;
use crate::kernel::context::RequestInfo;
use crate::kernel::endpoint::{Endpoint, Route};
use crate::kernel::metrics::status_class;
use crate::kernel::net::Clients;
use crate::kernel::problem::{Problem, kinds};
use crate::kernel::trace::{TRACEPARENT, new_span_id};
use upstream::{Protocol, Upstream};

/// Bodies up to this size are kept so that a retry can send them again; larger ones are streamed once.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// Why the proxy answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("circuit breaker open for {upstream}")]
    BreakerOpen { upstream: String, retry_after: Duration },
    #[error("cannot reach {upstream}: {source}")]
    Unreachable { upstream: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("{upstream} did not answer within the route's timeout")]
    Timeout { upstream: String },
    #[error("the request body is larger than the route allows")]
    BodyTooLarge,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("reading the request body failed: {0}")]
    BodyUnreadable(String),
    #[error("the request cannot be sent upstream: {0}")]
    BadRequest(String),
}

impl ProxyError {
    /// The metric label of the error.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::BreakerOpen { .. } => "breaker_open",
            ProxyError::Unreachable { .. } => "upstream_unreachable",
            ProxyError::Timeout { .. } => "upstream_timeout",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::BodyUnreadable(_) => "body_unreadable",
            ProxyError::BadRequest(_) => "bad_request",
        }
    }

    /// What the client is told: the kind of failure, never addresses or error chains.
    pub fn problem(&self, route: &str) -> Problem {
        match self {
            ProxyError::BreakerOpen { retry_after, .. } => Problem::new(
                kinds::UPSTREAM_UNAVAILABLE,
                format!(
                    "the upstream of route {route} is failing, so the gateway is not sending it requests for a while"
                ),
            )
            .retry_after(retry_after.as_secs_f64().ceil() as u64),
            ProxyError::Unreachable { .. } => {
                Problem::new(kinds::UPSTREAM_UNREACHABLE, format!("the upstream of route {route} could not be reached"))
            }
            ProxyError::Timeout { .. } => Problem::new(
                kinds::UPSTREAM_TIMEOUT,
                format!("the upstream of route {route} did not answer within the route's timeout"),
            ),
            ProxyError::BodyTooLarge => {
                Problem::new(kinds::BODY_TOO_LARGE, format!("the request body exceeds the limit of route {route}"))
            }
            ProxyError::BodyTimeout => {
                Problem::new(kinds::BODY_TIMEOUT, "the request body did not arrive in time").close_connection()
            }
            ProxyError::BodyUnreadable(_) => {
                Problem::new(kinds::BODY_UNREADABLE, "the request body ended early or could not be read")
            }
            ProxyError::BadRequest(_) => Problem::new(kinds::BAD_REQUEST, "the request cannot be forwarded as it is"),
        }
    }
}

fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// Retries of a route.
#[derive(Clone, Debug)]
pub struct Retry {
    pub attempts: u32,
    pub backoff: Duration,
    pub on_statuses: Vec<StatusCode>,
}

/// The end of a proxied route: its upstream, retries and the pooled clients.
pub struct Proxied {
    pub upstream: Arc<Upstream>,
    pub retry: Option<Retry>,
    pub clients: Clients,
}

impl Endpoint for Proxied {
    fn call(&self, request: Request<Body>, info: RequestInfo) -> BoxFuture<'static, Response> {
        let upstream = self.upstream.clone();
        let retry = self.retry.clone();
        let clients = self.clients.clone();
        Box::pin(async move {
            let Some(route) = info.route.clone() else {
                return Problem::new(kinds::NO_ROUTE, "no route").into_response();
            };
            let proxied = Proxied { upstream, retry, clients };
            match forward(request, &info, &route, &proxied).await {
                Ok(response) => response,
                Err(error) => error_response(error, &info, &route),
            }
        })
    }

    fn target(&self) -> String {
        self.upstream.label.clone()
    }
}

/// Sends `request` to the route's upstream and returns its response, or the error to answer with.
pub async fn forward(
    request: Request<Body>,
    info: &RequestInfo,
    route: &Route,
    proxied: &Proxied,
) -> Result<Response, ProxyError> {
    let upstream = &proxied.upstream;
    let (mut parts, body) = request.into_parts();
    let deadline = info.deadline.unwrap_or_else(|| Instant::now() + route.timeout);
    let retry = proxied.retry.as_ref().filter(|_| idempotent(&parts.method));

    // A body is replayable when it is small and of known size; otherwise it is streamed once.
    let mut body = Some(body);
    let replay: Option<Bytes> = match (retry, body.as_ref().map(|b| b.size_hint().exact())) {
        (Some(_), Some(Some(len))) if len <= MAX_REPLAY_BODY => {
            let collected = body.take().map(|b| b.collect());
            match collected {
                Some(fut) => Some(fut.await.map_err(body_error)?.to_bytes()),
                None => None,
            }
        }
        _ => None,
    };
    let max_retries = match (retry, &replay) {
        (Some(retry), Some(_)) => retry.attempts,
        _ => 0,
    };

    upstream.budget.record_request(Instant::now());
    let mut attempt = 0u32;
    loop {
        let trial = match upstream.admit() {
            Admission::Allowed { trial } => trial,
            Admission::Rejected { retry_after } => {
                return Err(ProxyError::BreakerOpen { upstream: upstream.label.clone(), retry_after });
            }
        };
        let attempt_body = match (&replay, body.take()) {
            (Some(bytes), _) => Body::from(bytes.clone()),
            (None, Some(body)) => body,
            // Only replayable bodies are retried, so the streaming body is taken at most once.
            (None, None) => Body::empty(),
        };
        let span_id = new_span_id();
        // The headers are moved into the only attempt, or copied when another may follow.
        let headers = if max_retries == 0 { std::mem::take(&mut parts.headers) } else { parts.headers.clone() };
        let outbound = upstream_request(&parts, headers, info, upstream, span_id, attempt_body)?;
        let started = (Instant::now(), SystemTime::now());
        let deadline_at = tokio::time::Instant::from_std(deadline);
        let sent: Result<Result<Response, Box<dyn std::error::Error + Send + Sync>>, _> =
            match (&upstream.pool, upstream.target.protocol) {
                (Some(pool), _) => {
                    tokio::time::timeout_at(deadline_at, pool.send(outbound)).await.map(|r| r.map_err(Into::into))
                }
                (None, Protocol::Http1) => {
                    tokio::time::timeout_at(deadline_at, proxied.clients.http1.request(outbound))
                        .await
                        .map(|r| r.map(|response| response.map(Body::new)).map_err(Into::into))
                }
                (None, Protocol::H2c) => tokio::time::timeout_at(deadline_at, proxied.clients.h2c.request(outbound))
                    .await
                    .map(|r| r.map(|response| response.map(Body::new)).map_err(Into::into)),
            };
        let elapsed = started.0.elapsed();
        let metrics = upstream.metrics();
        upstream.counters.duration.observe(elapsed.as_secs_f64());

        let outcome: Result<Response, ProxyError> = match sent {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(classify(error, &upstream.label)),
            // The client was still sending its body at the deadline: its wait, not the upstream's.
            Err(_)
                if parts
                    .extensions
                    .get::<crate::kernel::inbound::BodyProgress>()
                    .is_some_and(|b| b.waiting_on_client()) =>
            {
                route.metrics.http_refused.with_label_values(&[crate::kernel::inbound::reasons::BODY_TIMEOUT]).inc();
                Err(ProxyError::BodyTimeout)
            }
            Err(_) => Err(ProxyError::Timeout { upstream: upstream.label.clone() }),
        };
        let (label, failed) = match &outcome {
            Ok(response) => {
                let status = response.status();
                (status_class(status), matches!(status.as_u16(), 502..=504))
            }
            Err(ProxyError::Timeout { .. }) => ("timeout", true),
            Err(ProxyError::Unreachable { .. }) => ("connect_error", true),
            // The client's body failed, not the upstream.
            Err(_) => ("client_error", false),
        };
        upstream.counters.outcome(metrics, label);
        if !matches!(label, "client_error") {
            upstream.record(trial, !failed);
        }
        if let Some(traces) = &route.traces {
            let mut attributes = vec![
                KeyValue::new("http.request.method", parts.method.to_string()),
                KeyValue::new("server.address", upstream.target.connect.clone()),
                KeyValue::new("url.path", parts.uri.path().to_string()),
            ];
            if let Ok(response) = &outcome {
                attributes.push(KeyValue::new("http.response.status_code", i64::from(response.status().as_u16())));
            }
            if attempt > 0 {
                attributes.push(KeyValue::new("http.request.resend_count", i64::from(attempt)));
            }
            traces.client_span(
                &info.trace,
                span_id,
                format!("{} {}", parts.method, route.name),
                started.1,
                attributes,
                failed,
            );
        }

        let retryable = match (&outcome, retry) {
            (Ok(response), Some(retry)) => retry.on_statuses.contains(&response.status()),
            (Err(ProxyError::Unreachable { .. }), Some(_)) => true,
            _ => false,
        };
        if !retryable || attempt >= max_retries {
            return outcome.map(finish_response);
        }
        let Some(retry) = retry else { return outcome.map(finish_response) };
        if !upstream.budget.try_retry(Instant::now()) {
            metrics.retry_budget_exhausted.with_label_values(&[&upstream.label]).inc();
            return outcome.map(finish_response);
        }
        // Exponential backoff with full jitter, never past the deadline.
        let ceiling = retry.backoff.saturating_mul(1 << attempt.min(16));
        let pause = ceiling.mul_f64(fastrand::f64());
        if Instant::now() + pause >= deadline {
            return outcome.map(finish_response);
        }
        tracing::debug!(
            upstream = %upstream.label,
            attempt = attempt + 1,
            trace_id = %info.trace.trace_id_hex(),
            "retrying"
        );
        drop(outcome);
        tokio::time::sleep(pause).await;
        metrics.upstream_retries.with_label_values(&[&upstream.label]).inc();
        attempt += 1;
    }
}

/// The error for a request body that could not be read.
pub fn body_error(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ProxyError {
    crate::kernel::body::body_error(error).into()
}

impl From<BodyError> for ProxyError {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::TooLarge => ProxyError::BodyTooLarge,
            BodyError::Timeout => ProxyError::BodyTimeout,
            BodyError::Unreadable(e) => ProxyError::BodyUnreadable(e),
        }
    }
}

fn classify(error: Box<dyn std::error::Error + Send + Sync>, upstream: &str) -> ProxyError {
    if is_length_limit(error.as_ref()) {
        return ProxyError::BodyTooLarge;
    }
    if crate::kernel::inbound::is_body_timeout(error.as_ref()) {
        return ProxyError::BodyTimeout;
    }
    // A failure of the client's own body surfaces as a body error inside hyper's error.
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = current {
        if e.is::<axum::Error>() {
            return ProxyError::BodyUnreadable(e.to_string());
        }
        current = e.source();
    }
    ProxyError::Unreachable { upstream: upstream.to_string(), source: error }
}

/// The request as the upstream gets it.
fn upstream_request(
    parts: &Parts,
    original: http::HeaderMap,
    info: &RequestInfo,
    upstream: &Upstream,
    span_id: [u8; 8],
    body: Body,
) -> Result<Request<Body>, ProxyError> {
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut path = String::with_capacity(upstream.target.base_path.len() + path_and_query.len());
    path.push_str(&upstream.target.base_path);
    path.push_str(path_and_query);
    // The pool writes the URI as it is: origin-form. The other clients pick the connection by its authority.
    let uri = if upstream.pool.is_some() {
        Uri::try_from(path).map_err(http::Error::from)
    } else {
        Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query(path)
            .build()
    }
    .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = match upstream.target.protocol {
        Protocol::Http1 => Version::HTTP_11,
        Protocol::H2c => Version::HTTP_2,
    };
    let headers = request.headers_mut();
    *headers = original;
    headers::strip_hop_by_hop(headers);
    // HTTP/2 clients send the authority instead of Host.
    let original_host = headers
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::try_from(a.as_str()).ok()));
    headers::add_forwarded(headers, info.client, original_host.as_ref(), "http");
    match (&upstream.host, original_host) {
        (Some(host), _) => {
            headers.insert(header::HOST, host.clone());
        }
        (None, Some(host)) => {
            headers.insert(header::HOST, host);
        }
        // An HTTP/1.0 client may send no Host; HTTP/1.1 needs one.
        (None, None) => {
            if let Ok(host) = HeaderValue::try_from(upstream.authority.as_str()) {
                headers.insert(header::HOST, host);
            }
        }
    }
    if upstream.target.protocol == Protocol::H2c {
        // HTTP/2 carries the authority (the upstream's address) in the request itself; a Host header that
        // differs from it may be refused (RFC 9113 §8.3.1). The client's host stays in X-Forwarded-Host.
        headers.remove(header::HOST);
    }
    headers.insert(TRACEPARENT, info.trace.traceparent(span_id));
    Ok(request)
}

/// The upstream's response as the client gets it.
fn finish_response(mut response: Response) -> Response {
    headers::strip_hop_by_hop(response.headers_mut());
    response
}

/// Answers a proxy error as a problem and counts it.
pub fn error_response(error: ProxyError, info: &RequestInfo, route: &Route) -> Response {
    route.metrics.gateway_errors.with_label_values(&[&route.name, error.kind()]).inc();
    match &error {
        ProxyError::BodyTooLarge | ProxyError::BodyUnreadable(_) | ProxyError::BadRequest(_) => {
            tracing::debug!(route = %route.name, request_id = info.id.to_str().unwrap_or(""), trace_id = %info.trace.trace_id_hex(), %error, "request refused")
        }
        _ => {
            tracing::warn!(route = %route.name, request_id = info.id.to_str().unwrap_or(""), trace_id = %info.trace.trace_id_hex(), %error, "upstream request failed")
        }
    }
    error.problem(&route.name).into_response()
}
