//! Test support: a real upstream (an HTTP/1.1 and h2c server on loopback that counts what it gets), the
//! gateway running in-process on loopback with its admin listener and reload watcher, and a small client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::any;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use umw_dataplane::app::{App, Options};
use umw_dataplane::config;
use umw_dataplane::kernel::net::Overrides;
use umw_dataplane::runtime::Runtime;
use umw_dataplane::telemetry::LogControl;

/// An address on loopback that refuses connections for as long as the returned socket lives: the socket is
/// bound but never listens, so the port is neither served nor given to anyone else meanwhile (a listener
/// bound to port 0 and dropped frees its port for the next `bind(0)` on the machine).
pub fn closed_address() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("binding a loopback port");
    let address = socket.local_addr().expect("the bound address");
    (socket, address)
}

/// A test upstream. Every request is counted; `/echo` answers with what arrived.
pub struct Upstream {
    pub address: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct UpstreamState {
    name: &'static str,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn start(name: &'static str) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let state = UpstreamState { name, hits: hits.clone() };
        let app = Router::new()
            .route("/status/{code}", any(status))
            .route("/slow/{ms}", any(slow))
            .route("/flaky/{failures}", any(flaky))
            .route("/bytes/{n}", any(bytes_out))
            .route("/upload", any(upload))
            .route("/respond", any(respond))
            .fallback(echo)
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(serve_h1_and_h2c(listener, app));
        Self { address, hits, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves a router with HTTP/1.1 and h2c on one port, as the gateway does.
pub async fn serve_h1_and_h2c(listener: tokio::net::TcpListener, app: Router) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn echo(
    State(state): State<UpstreamState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::Json<Value> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let headers: serde_json::Map<String, Value> =
        headers.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_str().unwrap_or("").to_string()))).collect();
    axum::Json(json!({
        "upstream": state.name,
        "method": method.as_str(),
        "uri": uri.to_string(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
}

async fn status(State(state): State<UpstreamState>, Path(code): Path<u16>) -> StatusCode {
    state.hits.fetch_add(1, Ordering::SeqCst);
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
}

async fn slow(State(state): State<UpstreamState>, Path(ms): Path<u64>) -> &'static str {
    state.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "slow\n"
}

/// Fails with 503 for the first `failures` requests (counted over the upstream's life), then answers 200.
async fn flaky(State(state): State<UpstreamState>, Path(failures): Path<usize>) -> StatusCode {
    let n = state.hits.fetch_add(1, Ordering::SeqCst);
    if n < failures { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }
}

/// Streams `n` bytes in 64 KiB chunks.
async fn bytes_out(State(state): State<UpstreamState>, Path(n): Path<usize>) -> Body {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let chunks = (0..n.div_ceil(65536)).map(move |i| {
        let len = (n - i * 65536).min(65536);
        Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; len]))
    });
    Body::from_stream(futures::stream::iter(chunks))
}

/// Answers with the status and headers the query asks for (`?status=404&cache-control=max-age%3D5`), a
/// body naming the upstream and the hit number, and `Vary` when asked.
async fn respond(
    State(state): State<UpstreamState>,
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> axum::response::Response {
    let n = state.hits.fetch_add(1, Ordering::SeqCst) + 1;
    let mut response = axum::response::Response::new(Body::from(format!(
        "{} #{n} lang={}",
        state.name,
        headers.get("accept-language").and_then(|v| v.to_str().ok()).unwrap_or("")
    )));
    for (name, value) in query {
        if name == "status" {
            *response.status_mut() = StatusCode::from_u16(value.parse().unwrap_or(200)).unwrap_or(StatusCode::OK);
        } else if name == "sleep" {
            tokio::time::sleep(Duration::from_millis(value.parse().unwrap_or(0))).await;
        } else if let (Ok(name), Ok(value)) =
            (http::HeaderName::try_from(name.as_str()), http::HeaderValue::try_from(value.as_str()))
        {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// Counts the bytes of a streamed upload.
async fn upload(State(state): State<UpstreamState>, body: Body) -> String {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let mut stream = body.into_data_stream();
    let mut total = 0usize;
    use futures::StreamExt as _;
    while let Some(Ok(chunk)) = stream.next().await {
        total += chunk.len();
    }
    total.to_string()
}

/// The gateway, in-process on loopback, reading its configuration from a file in a temp directory.
pub struct Gateway {
    pub address: SocketAddr,
    pub admin: SocketAddr,
    pub config_file: PathBuf,
    pub runtime: Arc<Runtime>,
    dir: PathBuf,
    app: App,
}

/// A Middleware document with these routes (YAML list items, indented by four spaces) and extra spec.
pub fn middleware(routes: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: test, namespace: gw}}\nspec:\n  routes:\n{routes}{extra_spec}"
    )
}

impl Gateway {
    pub async fn start(yaml: &str) -> Self {
        Self::start_with(yaml, Overrides::default()).await
    }

    pub async fn start_with(yaml: &str, overrides: Overrides) -> Self {
        Self::start_inner(yaml, overrides, false, 0).await
    }

    /// Serving the traffic port on `threads` threads of its own, as `--worker-threads` does.
    #[allow(dead_code)]
    pub async fn start_threads(yaml: &str, threads: usize) -> Self {
        Self::start_inner(yaml, Overrides::default(), false, threads).await
    }

    /// With the in-process backends (memory cache, in-process event bus), as `--in-process-backends`.
    #[allow(dead_code)]
    pub async fn start_in_process(yaml: &str) -> Self {
        Self::start_inner(yaml, Overrides::default(), true, 0).await
    }

    async fn start_inner(yaml: &str, overrides: Overrides, in_process: bool, threads: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("umw-gw-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let config_file = dir.join("config.yaml");
        std::fs::write(&config_file, yaml).unwrap();
        let (files, loaded) = config::load(&config_file).unwrap_or_else(|e| panic!("test configuration: {e}"));
        // The process's own wiring (listeners, reload watcher, warm-up, supervisor), on loopback.
        let options = Options {
            http_address: Some("127.0.0.1:0".parse().unwrap()),
            admin_address: Some("127.0.0.1:0".parse().unwrap()),
            overrides,
            in_process,
            reload_interval: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(5),
            traffic_threads: threads,
            ..Options::new(config_file.clone())
        };
        let app = App::start(options, files, loaded, LogControl::disabled()).await.unwrap_or_else(|e| panic!("{e:#}"));
        Self { address: app.http, admin: app.admin, config_file, runtime: app.runtime.clone(), dir, app }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Replaces the configuration file (the watcher picks it up within ~100 ms).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.join(".config.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config_file).unwrap();
    }

    pub async fn status(&self) -> Value {
        let response = send(Method::GET, &format!("http://{}/status", self.admin), &[], Bytes::new()).await;
        serde_json::from_slice(&response.body).unwrap()
    }

    pub async fn metrics(&self) -> String {
        let response = send(Method::GET, &format!("http://{}/metrics", self.admin), &[], Bytes::new()).await;
        String::from_utf8_lossy(&response.body).to_string()
    }

    /// The value of one sample of `/metrics`, e.g. `umw_upstream_requests_total{outcome="5xx",upstream="..."}`
    /// given as the name and label fragments that must all appear on the line.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.app.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A response, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Bytes) -> Reply {
    send_with(&client(), method, url, headers, body).await
}

pub async fn send_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut request = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(body)).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
        .await
        .expect("the gateway answers within 20s")
        .expect("the request reaches the gateway");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

pub async fn get(url: &str) -> Reply {
    send(Method::GET, url, &[], Bytes::new()).await
}

/// Polls until `check` holds or fails after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
