//! The authenticate stage of one AuthPolicy: establishes the request's principal from a bearer token, or
//! answers `401` (RFC 6750: `WWW-Authenticate: Bearer`, with `error="invalid_token"` when a token was
//! sent and refused).

use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse as _, Response};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use http::{HeaderName, HeaderValue, Request, header};
use serde_json::Value;

use super::jwt::{self, Trusted};
use crate::kernel::context::{Principal, RequestInfo};
use crate::kernel::metrics::Metrics;
use crate::kernel::problem::{Kind, Problem};
use crate::kernel::stage::{Next, Stage};

pub const UNAUTHENTICATED: Kind =
    Kind { slug: "unauthenticated", title: "Authentication required", status: http::StatusCode::UNAUTHORIZED };

/// JWT authentication as one policy configures it.
pub struct JwtAuth {
    pub trusted: Vec<Trusted>,
    pub optional: bool,
    pub claims_to_headers: Vec<(String, HeaderName)>,
}

/// One policy's authentication.
pub struct AuthStage {
    pub policy: String,
    pub jwt: JwtAuth,
    pub metrics: Metrics,
}

impl Stage for Arc<AuthStage> {
    fn call(&self, request: Request<Body>, next: Next) -> BoxFuture<'static, Response> {
        let stage = self.clone();
        async move { stage.handle(request, next).await }.boxed()
    }
}

impl AuthStage {
    async fn handle(&self, mut request: Request<Body>, next: Next) -> Response {
        let jwt = &self.jwt;
        // Headers the gateway sets from claims are never the client's to send.
        for (_, name) in &jwt.claims_to_headers {
            request.headers_mut().remove(name);
        }
        let mut authorizations = request.headers().get_all(header::AUTHORIZATION).iter();
        let (first, second) = (authorizations.next(), authorizations.next());
        let token = match (first, second) {
            (None, _) => None,
            (Some(value), None) => match bearer(value) {
                // Another scheme (Basic): no bearer token was sent.
                None => None,
                Some("") => {
                    self.refused(&request, jwt::Reject::Malformed);
                    return self.unauthenticated(true);
                }
                Some(token) => Some(token.to_string()),
            },
            // Two Authorization headers: not one credential.
            (Some(_), Some(_)) => {
                self.refused(&request, jwt::Reject::Malformed);
                return self.unauthenticated(true);
            }
        };
        let Some(token) = token else {
            if jwt.optional {
                self.count("anonymous");
                return next.run(request).await;
            }
            self.count("missing");
            return self.unauthenticated(false);
        };
        let claims = match jwt::verify(&jwt.trusted, &token).await {
            Ok(claims) => claims,
            Err(reason) => {
                self.refused(&request, reason);
                return self.unauthenticated(true);
            }
        };
        for (claim, name) in &jwt.claims_to_headers {
            let value = match claims.get(claim) {
                None | Some(Value::Null) => continue,
                Some(Value::String(text)) => HeaderValue::from_str(text),
                Some(other) => HeaderValue::from_str(&other.to_string()),
            };
            match value {
                Ok(value) => {
                    request.headers_mut().insert(name.clone(), value);
                }
                Err(_) => {
                    tracing::info!(policy = %self.policy, claim, "claim not copied to {name}: not a header value")
                }
            }
        }
        let subject = claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_string();
        let principal = Arc::new(Principal { subject, scheme: "jwt", claims });
        if let Some(info) = RequestInfo::of_mut(&mut request) {
            info.principal = Some(principal);
        }
        self.count("allowed");
        next.run(request).await
    }

    fn count(&self, outcome: &str) {
        self.metrics.auth_decisions.with_label_values(&[self.policy.as_str(), "jwt", outcome]).inc();
    }

    fn refused(&self, request: &Request<Body>, reason: jwt::Reject) {
        self.count("invalid");
        self.metrics.auth_jwt_rejections.with_label_values(&[self.policy.as_str(), reason.label()]).inc();
        let id = RequestInfo::of(request).and_then(|i| i.id.to_str().ok()).unwrap_or_default();
        tracing::info!(policy = %self.policy, request_id = id, reason = reason.label(), "bearer token refused");
    }

    fn unauthenticated(&self, invalid: bool) -> Response {
        let (detail, challenge) = if invalid {
            ("The bearer token is not valid.", HeaderValue::from_static("Bearer error=\"invalid_token\""))
        } else {
            ("This route needs a bearer token (Authorization: Bearer <token>).", HeaderValue::from_static("Bearer"))
        };
        let mut response = Problem::new(UNAUTHENTICATED, detail).into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
        response
    }
}

/// The token of an `Authorization` value with the Bearer scheme; `None` for another scheme.
fn bearer(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
