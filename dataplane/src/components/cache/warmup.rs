//! Warm-up: the paths of `spec.warmup` are fetched through the gateway's own chain (so they are stored like
//! any response) once at start, before `/readyz` turns true, and again every `interval`, refreshing the
//! entries (`Cache-Control: no-cache`). A path is `/products/1` (host `localhost`) or an absolute URL, whose
//! host becomes the request's `Host` and so part of the key.

use std::time::Duration;

use axum::body::Body;
use http::{HeaderValue, Request, header};
use http_body_util::BodyExt as _;

use crate::kernel::context::ClientAddr;
use crate::kernel::health::State;
use crate::kernel::metrics::Metrics;
use crate::kernel::ports::Loopback;
use crate::kernel::task::{Aborting, TaskCx};

/// The warm-up component in `/status`.
pub const COMPONENT: &str = "cache warm-up";

/// How long the body of one warm-up response may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a configuration asks to warm.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub paths: Vec<String>,
    pub interval: Option<Duration>,
}

/// Warms now, then every interval, until stopped. On the process's first snapshot readiness waits for the
/// first round; after that the pod is ready whatever warm-up finds.
pub fn start(plan: Plan, cx: &TaskCx) -> Aborting {
    let health = cx.health.handle(COMPONENT, cx.first);
    health.set(State::Starting, "fetching the warm-up paths");
    health.activate();
    let (loopback, metrics) = (cx.loopback.clone(), cx.metrics.clone());
    Aborting(tokio::spawn(async move {
        let mut refresh = false;
        loop {
            let (ok, failed) = warm(&loopback, &plan, refresh, &metrics).await;
            let message = match failed.first() {
                None => format!("{ok} path(s) fetched"),
                Some(first) => format!("{ok} path(s) fetched, {} failed (first: {first})", failed.len()),
            };
            health.set(if failed.is_empty() { State::Up } else { State::Degraded }, message);
            let Some(interval) = plan.interval else { return std::future::pending().await };
            tokio::time::sleep(interval).await;
            // The first warm-up of a configuration fills the cache; later ones refresh it.
            refresh = true;
        }
    }))
}

async fn warm(loopback: &Loopback, plan: &Plan, refresh: bool, metrics: &Metrics) -> (usize, Vec<String>) {
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
        let response = loopback.send(request).await;
        let status = response.status();
        // The route's timeout ends with the response head; a body that trickles must not hold warm-up.
        let _ = tokio::time::timeout(BODY_TIMEOUT, response.into_body().collect()).await;
        if status.is_success() {
            ok += 1;
            metrics.cache_warmups.with_label_values(&["ok"]).inc();
        } else {
            failed.push(format!("{path}: {status}"));
            metrics.cache_warmups.with_label_values(&["error"]).inc();
        }
    }
    (ok, failed)
}
