//! The admin listener: `/healthz` (the process runs), `/readyz` (it should get traffic), `/status` (what
//! the operator reads: version, applied configuration, components, policies) and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;

use crate::kernel::health::Component;
use crate::runtime::{PolicyState, Runtime};

pub struct Admin {
    pub runtime: Arc<Runtime>,
    /// Set on SIGTERM: the pod leaves the Service's endpoints while it drains.
    pub shutting_down: AtomicBool,
    pub config_path: String,
}

/// The `/status` document. The operator reads it (see `umw-operator`'s health polling).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub version: &'static str,
    pub middleware: String,
    pub config_hash: String,
    pub config_path: String,
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ready_reason: Option<String>,
    pub components: Vec<Component>,
    pub policies: Vec<PolicyState>,
    pub routes: Vec<RouteStatus>,
}

#[derive(Serialize)]
pub struct RouteStatus {
    pub name: String,
    pub upstream: String,
}

impl Admin {
    fn readiness(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        self.runtime.health.readiness()
    }

    pub fn status(&self) -> Status {
        let snapshot = self.runtime.snapshot();
        let readiness = self.readiness();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            middleware: snapshot.middleware.clone(),
            config_hash: snapshot.hash.clone(),
            config_path: self.config_path.clone(),
            ready: readiness.is_ok(),
            not_ready_reason: readiness.err(),
            components: self.runtime.health.components(),
            policies: snapshot.policies.clone(),
            routes: snapshot
                .routes
                .iter()
                .map(|r| RouteStatus { name: r.name.clone(), upstream: r.target_label() })
                .collect(),
        }
    }
}

pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(admin): State<Arc<Admin>>| async move {
                match admin.readiness() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
                }
            }),
        )
        .route("/status", get(|State(admin): State<Arc<Admin>>| async move { axum::Json(admin.status()) }))
        .route("/cache/invalidate", axum::routing::post(invalidate))
        .route("/outbox/dead", get(dead_letters))
        .route(
            "/metrics",
            get(|State(admin): State<Arc<Admin>>| async move {
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], admin.runtime.metrics.render())
                    .into_response()
            }),
        )
        .with_state(admin)
}

/// `POST /cache/invalidate` with `Authorization: Bearer <adminToken>` and a JSON body
/// `{"keys": [...], "prefixes": [...], "tags": [...]}`; answers `{"deleted": N}`.
async fn invalidate(
    State(admin): State<Arc<Admin>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use crate::kernel::problem::{Kind, Problem, kinds};
    const UNAUTHORIZED: Kind =
        Kind { slug: "unauthorized", title: "A valid admin token is needed", status: StatusCode::UNAUTHORIZED };
    const NO_ADMIN_API: Kind =
        Kind { slug: "no-admin-api", title: "No CachePolicy enables the admin API", status: StatusCode::NOT_FOUND };
    let snapshot = admin.runtime.snapshot();
    let Some(invalidator) = snapshot.invalidator.clone().filter(|i| !i.tokens.is_empty()) else {
        return Problem::new(NO_ADMIN_API, "set spec.invalidation.adminApi and adminToken on a CachePolicy")
            .into_response();
    };
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    if !invalidator.accepts(token) {
        admin.runtime.metrics.gateway_errors.with_label_values(&["admin", "unauthorized"]).inc();
        return Problem::new(UNAUTHORIZED, "present the CachePolicy's adminToken as a bearer token").into_response();
    }
    let bad_request = || admin.runtime.metrics.gateway_errors.with_label_values(&["admin", "bad_request"]).inc();
    let what: crate::components::cache::Invalidation = match serde_json::from_slice(&body) {
        Ok(what) => what,
        Err(error) => {
            bad_request();
            return Problem::new(
                kinds::BAD_REQUEST,
                format!("expected {{\"keys\": [], \"prefixes\": [], \"tags\": []}}: {error}"),
            )
            .into_response();
        }
    };
    if what.keys.is_empty() && what.prefixes.is_empty() && what.tags.is_empty() {
        bad_request();
        return Problem::new(kinds::BAD_REQUEST, "name at least one of keys, prefixes and tags").into_response();
    }
    if what.prefixes.iter().any(String::is_empty) {
        bad_request();
        return Problem::new(
            kinds::BAD_REQUEST,
            "an empty prefix would delete every entry; name a prefix (every entry of a path: \"GET:host/path\")",
        )
        .into_response();
    }
    match invalidator.invalidate(&what).await {
        Ok(deleted) => {
            tracing::info!(
                keys = what.keys.len(),
                prefixes = what.prefixes.len(),
                tags = what.tags.len(),
                deleted,
                "cache invalidated"
            );
            axum::Json(serde_json::json!({ "deleted": deleted })).into_response()
        }
        Err(error) => {
            admin.runtime.metrics.gateway_errors.with_label_values(&["admin", "cache_unavailable"]).inc();
            tracing::warn!(%error, "cache invalidation failed");
            Problem::new(kinds::UPSTREAM_UNAVAILABLE, format!("the cache could not be invalidated: {}", error.kind()))
                .into_response()
        }
    }
}

/// `GET /outbox/dead?limit=N`: the outbox rows that failed for good (newest first, at most 1000), with the
/// table they came from and the last error.
async fn dead_letters(
    State(admin): State<Arc<Admin>>,
    query: axum::extract::Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    use crate::kernel::problem::{Kind, Problem, kinds};
    const NO_OUTBOX: Kind =
        Kind { slug: "no-outbox", title: "This Middleware defines no commands", status: StatusCode::NOT_FOUND };
    let Some(store) = admin.runtime.snapshot().outbox.clone() else {
        admin.runtime.metrics.gateway_errors.with_label_values(&["admin", "no_outbox"]).inc();
        return Problem::new(NO_OUTBOX, "the outbox exists once spec.commands is set").into_response();
    };
    let limit = match query.get("limit").map(|l| l.parse::<u32>()) {
        None => 100,
        Some(Ok(limit)) if (1..=1000).contains(&limit) => limit,
        Some(_) => {
            admin.runtime.metrics.gateway_errors.with_label_values(&["admin", "bad_request"]).inc();
            return Problem::new(kinds::BAD_REQUEST, "limit must be a number from 1 to 1000").into_response();
        }
    };
    match store.dead(limit).await {
        Ok(rows) => axum::Json(serde_json::json!({ "rows": rows })).into_response(),
        Err(error) => {
            admin.runtime.metrics.gateway_errors.with_label_values(&["admin", "outbox_unavailable"]).inc();
            tracing::warn!(%error, "the dead-letter table could not be read");
            Problem::new(kinds::UPSTREAM_UNAVAILABLE, "the outbox store is unavailable").into_response()
        }
    }
}

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Arc<Admin>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(admin)).with_graceful_shutdown(shutdown).await
}

/// The address the admin listener binds by default.
pub fn default_address(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}
