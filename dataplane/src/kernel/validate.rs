//! The validation phase: a route's JSON Schema on the request body, answered 422 with every violation.

use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse as _, Response};
use futures::future::BoxFuture;
use http::{Method, Request};
use http_body::Body as _;
use http_body_util::{BodyExt as _, Limited};

use super::context::RequestInfo;
use super::endpoint::Route;
use super::problem::{FieldProblem, Problem, kinds};
use super::stage::{Next, Stage};

/// Largest body checked against a route's schema (larger ones are refused with 413).
const MAX_VALIDATED_BODY: usize = 1024 * 1024;

/// Most violations listed in one response.
const MAX_SCHEMA_ERRORS: usize = 50;

/// Bodies larger than this are parsed off the request threads.
pub(crate) const BLOCKING_ABOVE: usize = 64 * 1024;

/// The stage the runtime puts in the pipeline of a route with a schema.
pub struct Validate;

impl Stage for Validate {
    fn call(&self, request: Request<Body>, next: Next) -> BoxFuture<'static, Response> {
        Box::pin(validate(request, next))
    }
}

async fn validate(request: Request<Body>, next: Next) -> Response {
    let Some(route) = RequestInfo::of(&request).and_then(|i| i.route.clone()) else { return next.run(request).await };
    let Some(schema) = route.schema.clone() else { return next.run(request).await };
    if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE)
        && request.body().size_hint().exact() == Some(0)
    {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    // A body checked against a schema is held in memory whole: at most MAX_VALIDATED_BODY of it.
    let bytes = match Limited::new(body, MAX_VALIDATED_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            let error = super::body::body_error(error);
            route.metrics.gateway_errors.with_label_values(&[&route.name, error.kind()]).inc();
            return error.problem(&route.name).into_response();
        }
    };
    let check = {
        let bytes = bytes.clone();
        move || -> Result<Vec<FieldProblem>, String> {
            let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            Ok(schema
                .iter_errors(&value)
                .take(MAX_SCHEMA_ERRORS)
                .map(|e| FieldProblem { pointer: e.instance_path().to_string(), detail: e.to_string() })
                .collect())
        }
    };
    // Large bodies are parsed and checked off the request threads, so that one does not stall the others.
    let checked = if bytes.len() > BLOCKING_ABOVE {
        tokio::task::spawn_blocking(check).await.unwrap_or_else(|_| Err("the check failed".into()))
    } else {
        check()
    };
    match checked {
        Ok(errors) if errors.is_empty() => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(errors) => {
            // A command's schema is the command's, not that of the route the data plane made for it.
            let of = route.endpoint.schema_owner().unwrap_or_else(|| format!("route {}", route.name));
            invalid(&route, format!("{} violation(s) of the schema of {of}", errors.len()), errors)
        }
        Err(error) => invalid(
            &route,
            format!("the body is not JSON ({error})"),
            vec![FieldProblem { pointer: String::new(), detail: "not JSON".into() }],
        ),
    }
}

fn invalid(route: &Arc<Route>, detail: String, errors: Vec<FieldProblem>) -> Response {
    route.metrics.gateway_errors.with_label_values(&[&route.name, "invalid_body"]).inc();
    route.endpoint.invalid_body();
    Problem::new(kinds::INVALID_BODY, detail).with_errors(errors).into_response()
}
