//! The one error format of everything the gateway answers itself: `application/problem+json` (RFC 9457).
//!
//! A problem says what went wrong in the client's terms and never carries internals (addresses, error
//! chains, stack traces): those go to the log, next to the request id that the response also carries.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// Media type of problem responses.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// What kind of problem: a stable slug (the end of the `type` URI) and a short title.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub slug: &'static str,
    pub title: &'static str,
    pub status: StatusCode,
}

/// The kinds the gateway answers with. Later components add theirs next to their code.
pub mod kinds {
    use super::Kind;
    use http::StatusCode;

    pub const NO_ROUTE: Kind =
        Kind { slug: "no-route", title: "No route matches the request", status: StatusCode::NOT_FOUND };
    pub const BODY_TOO_LARGE: Kind =
        Kind { slug: "body-too-large", title: "Request body too large", status: StatusCode::PAYLOAD_TOO_LARGE };
    pub const BODY_UNREADABLE: Kind =
        Kind { slug: "body-unreadable", title: "The request body could not be read", status: StatusCode::BAD_REQUEST };
    pub const INVALID_BODY: Kind = Kind {
        slug: "invalid-body",
        title: "The request body does not satisfy the route's schema",
        status: StatusCode::UNPROCESSABLE_ENTITY,
    };
    pub const UPSTREAM_TIMEOUT: Kind = Kind {
        slug: "upstream-timeout",
        title: "The upstream did not answer in time",
        status: StatusCode::GATEWAY_TIMEOUT,
    };
    pub const UPSTREAM_UNREACHABLE: Kind = Kind {
        slug: "upstream-unreachable",
        title: "The upstream could not be reached",
        status: StatusCode::BAD_GATEWAY,
    };
    pub const UPSTREAM_UNAVAILABLE: Kind = Kind {
        slug: "upstream-unavailable",
        title: "The upstream is unavailable",
        status: StatusCode::SERVICE_UNAVAILABLE,
    };
    pub const BODY_TIMEOUT: Kind = Kind {
        slug: "body-timeout",
        title: "The request body did not arrive in time",
        status: StatusCode::REQUEST_TIMEOUT,
    };
    pub const BAD_REQUEST: Kind =
        Kind { slug: "bad-request", title: "Malformed request", status: StatusCode::BAD_REQUEST };
    pub const METHOD_NOT_ALLOWED: Kind =
        Kind { slug: "method-not-allowed", title: "Method not allowed", status: StatusCode::METHOD_NOT_ALLOWED };
    pub const INTERNAL: Kind =
        Kind { slug: "internal", title: "Internal error", status: StatusCode::INTERNAL_SERVER_ERROR };
}

/// One problem response.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub kind: Kind,
    /// What happened to this request, for the client; never internals.
    pub detail: String,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub retry_after: Option<u64>,
    /// Itemised violations (e.g. each schema error with its JSON pointer).
    pub errors: Vec<FieldProblem>,
    /// Whether the connection is closed after the response (`Connection: close`), e.g. when the rest of the
    /// request cannot be read.
    pub close: bool,
}

/// One violation inside a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldProblem {
    /// JSON pointer into the request body (`""` is the whole body).
    pub pointer: String,
    pub detail: String,
}

#[derive(Serialize)]
struct Body_<'a> {
    #[serde(rename = "type")]
    type_: String,
    title: &'static str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[FieldProblem]>::is_empty")]
    errors: &'a [FieldProblem],
}

impl Problem {
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        Self { kind, detail: detail.into(), retry_after: None, errors: Vec::new(), close: false }
    }

    pub fn close_connection(mut self) -> Self {
        self.close = true;
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    pub fn with_errors(mut self, errors: Vec<FieldProblem>) -> Self {
        self.errors = errors;
        self
    }

    /// The `type` URI of a kind.
    pub fn type_uri(kind: &Kind) -> String {
        format!("https://umw.dev/problems/{}", kind.slug)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = Body_ {
            type_: Problem::type_uri(&self.kind),
            title: self.kind.title,
            status: self.kind.status.as_u16(),
            detail: &self.detail,
            errors: &self.errors,
        };
        // Serialising plain strings and numbers cannot fail; fall back to an empty object regardless.
        let text = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = Response::new(Body::from(text));
        *response.status_mut() = self.kind.status;
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.close {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_problem_is_rfc_9457_json_with_retry_after() {
        let response = Problem::new(kinds::UPSTREAM_UNAVAILABLE, "circuit open").retry_after(7).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["type"], "https://umw.dev/problems/upstream-unavailable");
        assert_eq!(json["status"], 503);
        assert_eq!(json["detail"], "circuit open");
        assert!(json.get("errors").is_none());
    }
}
