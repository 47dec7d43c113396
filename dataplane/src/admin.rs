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
                .map(|(r, _)| RouteStatus { name: r.name.clone(), upstream: r.target_label() })
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
        .route(
            "/metrics",
            get(|State(admin): State<Arc<Admin>>| async move {
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], admin.runtime.metrics.render())
                    .into_response()
            }),
        )
        .fallback(component_route)
        .with_state(admin)
}

/// The admin endpoints the components of the running snapshot add (`/cache/invalidate`, `/outbox/dead`).
async fn component_route(State(admin): State<Arc<Admin>>, request: axum::extract::Request) -> axum::response::Response {
    let snapshot = admin.runtime.snapshot();
    match snapshot.admin_route(request.method(), request.uri().path()) {
        Some(route) => (route.handler)(request).await,
        None => {
            admin.runtime.metrics.admin_unknown.inc();
            let message = format!(
                "no such admin endpoint: {} {}; this listener serves GET /healthz, /readyz, /status and /metrics, \
                 and the endpoints of the configured components (see docs/dataplane.md)\n",
                request.method(),
                request.uri().path()
            );
            (StatusCode::NOT_FOUND, message).into_response()
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
