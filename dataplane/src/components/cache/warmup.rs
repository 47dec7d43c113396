//! Warm-up: the paths of `spec.warmup` are fetched through the gateway's own chain (so they are stored like
//! any response) once at start, before `/readyz` turns true, and again every `interval`, refreshing the
//! entries (`Cache-Control: no-cache`). A path is `/products/1` (host `localhost`) or an absolute URL, whose
//! host becomes the request's `Host` and so part of the key.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderValue, Request, header};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use crate::chain::{Chain, ClientAddr};
use crate::kernel::health::State;
use crate::runtime::Runtime;

/// The warm-up component in `/status`.
pub const COMPONENT: &str = "cache warm-up";

/// What a configuration asks to warm.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub paths: Vec<String>,
    pub interval: Option<Duration>,
}

/// Marks readiness as waiting for the first warm-up, when the configuration has one.
pub fn announce(runtime: &Runtime) {
    if !runtime.snapshot().warmup.paths.is_empty() {
        runtime.health.set(COMPONENT, State::Starting, "fetching the warm-up paths", true);
    }
}

/// Warms at start, then on each plan's interval, following reloads. Runs until dropped.
pub async fn run(runtime: Arc<Runtime>, chain: Chain) {
    let mut hash = String::new();
    let mut next: Option<tokio::time::Instant> = None;
    loop {
        let snapshot = runtime.snapshot();
        let plan = snapshot.warmup.clone();
        let changed = snapshot.hash != hash;
        let due = next.is_some_and(|at| tokio::time::Instant::now() >= at);
        if changed || due {
            hash = snapshot.hash.clone();
            if plan.paths.is_empty() {
                runtime.health.retain(|name| name != COMPONENT);
                next = None;
            } else {
                // The first warm-up of a configuration fills the cache; later ones refresh it.
                let refresh = due && !changed;
                let (ok, failed) = warm(&chain, &plan, refresh, &runtime).await;
                let message = match failed.first() {
                    None => format!("{ok} path(s) fetched"),
                    Some(first) => format!("{ok} path(s) fetched, {} failed (first: {first})", failed.len()),
                };
                let state = if failed.is_empty() { State::Up } else { State::Degraded };
                // Warm-up decides readiness once, at start: after that the pod is ready whatever happens.
                runtime.health.set(COMPONENT, state, message, false);
                next = plan.interval.map(|i| tokio::time::Instant::now() + i);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn warm(chain: &Chain, plan: &Plan, refresh: bool, runtime: &Runtime) -> (usize, Vec<String>) {
    let mut ok = 0;
    let mut failed = Vec::new();
    for path in &plan.paths {
        let (host, target) = match path.split_once("://").map(|(_, rest)| rest.split_once('/').unwrap_or((rest, ""))) {
            Some((host, rest)) => (host.to_string(), format!("/{rest}")),
            None => ("localhost".to_string(), path.clone()),
        };
        let mut request = match Request::get(&target).body(Body::empty()) {
            Ok(request) => request,
            Err(error) => {
                failed.push(format!("{path}: {error}"));
                continue;
            }
        };
        if let Ok(host) = HeaderValue::try_from(host) {
            request.headers_mut().insert(header::HOST, host);
        }
        if refresh {
            request.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
        request.extensions_mut().insert(ClientAddr(std::net::SocketAddr::from(([127, 0, 0, 1], 0))));
        let response = match chain.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        let _ = response.into_body().collect().await;
        if status.is_success() {
            ok += 1;
            runtime.metrics.cache_warmups.with_label_values(&["ok"]).inc();
        } else {
            failed.push(format!("{path}: {status}"));
            runtime.metrics.cache_warmups.with_label_values(&["error"]).inc();
        }
    }
    (ok, failed)
}
