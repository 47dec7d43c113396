//! The cache stage of the chain: CachePolicy rules applied to requests.
//!
//! For a request a rule covers: look the key up (a miss when the backend fails or is slow: fail open);
//! serve a fresh entry, or a stale one within `staleWhileRevalidate` while one background request
//! refreshes it; on a miss, let one request per key go upstream (single-flight) while the others wait for
//! its result; store what may be stored; serve a stale entry within `staleIfError` when the upstream
//! fails. Every response a rule covers says what happened in `Cache-Status` (RFC 9211).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;

use super::entry::now_ms;
use super::{Cache, CacheError, Entry};
use crate::kernel::context::RequestInfo;
use crate::kernel::metrics::Metrics;
use crate::kernel::stage::{Next, Stage};

/// The `Cache-Status` header (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// One compiled CachePolicy rule.
#[derive(Clone)]
pub struct Rule {
    /// Routes the rule applies to; `None`: every route of the Middleware.
    pub routes: Option<Vec<String>>,
    pub path_prefix: Option<String>,
    pub head_too: bool,
    pub get: bool,
    pub ttl: Duration,
    pub jitter_percent: u8,
    pub negative_ttl: Option<Duration>,
    pub negative_statuses: Vec<u16>,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Query parameters in the key; empty: the whole query string.
    pub query_params: Vec<String>,
    pub key_headers: Vec<HeaderName>,
    pub max_entry_bytes: usize,
    pub single_flight: bool,
    /// Single-flight across replicas, through a lock in the cache backend.
    pub distributed: bool,
    pub lock_timeout: Duration,
    /// Tags of each stored entry, templates over the request.
    pub tags: Vec<Vec<umw_crds::template::Part>>,
    /// Where this rule's entries live.
    pub cache: Arc<dyn Cache>,
}

/// A tag template's values: `path.N` (the Nth segment, from 0), `query.NAME`, `header.NAME`, `host`.
fn render_tags(rule: &Rule, request: &Request<Body>) -> Vec<String> {
    if rule.tags.is_empty() {
        return Vec::new();
    }
    let segments: Vec<&str> = request.uri().path().split('/').filter(|s| !s.is_empty()).collect();
    let query = request.uri().query().unwrap_or("");
    rule.tags
        .iter()
        .map(|parts| {
            umw_crds::template::render(parts, |source, name| match (source, name) {
                ("path", Some(n)) => n.parse::<usize>().ok().and_then(|i| segments.get(i)).map(|s| s.to_string()),
                ("query", Some(n)) => query.split('&').find_map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k == n).then(|| v.to_string())
                }),
                ("header", Some(n)) => request.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string),
                ("host", None) => crate::kernel::routing::host_of(request),
                _ => None,
            })
        })
        .filter(|t| !t.is_empty())
        .collect()
}

impl Rule {
    fn covers(&self, route: &str, method: &Method, path: &str) -> bool {
        let method_ok = (*method == Method::GET && self.get) || (*method == Method::HEAD && self.head_too);
        let route_ok = self.routes.as_ref().is_none_or(|routes| routes.iter().any(|r| r == route));
        let path_ok = self.path_prefix.as_deref().is_none_or(|prefix| {
            let prefix = prefix.trim_end_matches('/');
            prefix.is_empty()
                || (path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
        });
        method_ok && route_ok && path_ok
    }
}

/// The cache stage of one configuration.
pub struct CacheStage {
    inner: Arc<Inner>,
}

struct Inner {
    rules: Vec<Arc<Rule>>,
    /// The request counters of the route this stage serves, resolved once (see [`CacheStage::for_route`]).
    counts: Option<Counts>,
    /// Prefix of every key: `umw:<namespace>/<middleware>:`.
    prefix: String,
    flights: Flights,
    metrics: Metrics,
    /// Places for background stores.
    stores: Arc<tokio::sync::Semaphore>,
}

/// Most responses being stored in the background at once, per configuration.
pub const MAX_PENDING_STORES: usize = 1024;

/// `umw_cache_requests_total` of one route, by result.
struct Counts {
    hit: prometheus::IntCounter,
    stale: prometheus::IntCounter,
    miss: prometheus::IntCounter,
    bypass: prometheus::IntCounter,
    coalesced: prometheus::IntCounter,
}

impl Counts {
    fn of(metrics: &Metrics, route: &str) -> Self {
        let counter = |result: &str| metrics.cache_requests.with_label_values(&[route, result]);
        Self {
            hit: counter("hit"),
            stale: counter("stale"),
            miss: counter("miss"),
            bypass: counter("bypass"),
            coalesced: counter("coalesced"),
        }
    }

    fn get(&self, result: &str) -> Option<&prometheus::IntCounter> {
        Some(match result {
            "hit" => &self.hit,
            "stale" => &self.stale,
            "miss" => &self.miss,
            "bypass" => &self.bypass,
            "coalesced" => &self.coalesced,
            _ => return None,
        })
    }
}

impl CacheStage {
    pub fn new(rules: Vec<Rule>, prefix: String, flights: Flights, metrics: Metrics) -> Self {
        let stores = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_STORES));
        let rules = rules.into_iter().map(Arc::new).collect();
        Self { inner: Arc::new(Inner { rules, counts: None, prefix, flights, metrics, stores }) }
    }

    /// The stage for one route: only the rules that name it (or every route), or `None` when no rule
    /// does, so that the route's pipeline has no cache stage at all.
    pub fn for_route(&self, route: &str) -> Option<Self> {
        let rules: Vec<Arc<Rule>> = self
            .inner
            .rules
            .iter()
            .filter(|r| r.routes.as_ref().is_none_or(|routes| routes.iter().any(|r| r == route)))
            .cloned()
            .collect();
        if rules.is_empty() {
            return None;
        }
        let inner = &self.inner;
        let (prefix, flights, metrics, stores) =
            (inner.prefix.clone(), inner.flights.clone(), inner.metrics.clone(), inner.stores.clone());
        let counts = Some(Counts::of(&metrics, route));
        Some(Self { inner: Arc::new(Inner { rules, counts, prefix, flights, metrics, stores }) })
    }
}

impl Stage for CacheStage {
    fn call(&self, request: Request<Body>, next: Next) -> BoxFuture<'static, Response> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.handle(request, next).await })
    }
}

/// Requests in flight per key, shared by the snapshots of one runtime: concurrent misses of a key wait
/// for the first one's result.
#[derive(Clone, Default)]
pub struct Flights(Arc<Mutex<HashMap<String, Outcome>>>);

/// A flight's result: `None` while in flight; then the entry, or `None` when the response was not kept.
type Outcome = tokio::sync::watch::Receiver<Option<Option<Arc<Entry>>>>;

enum Flight {
    /// This request goes upstream; it reports the result through the guard.
    Leader(FlightGuard),
    /// Another request is upstream for this key.
    Follower(Outcome),
}

/// Ends a flight when dropped; followers of a flight whose leader went away without a result go upstream.
struct FlightGuard {
    flights: Flights,
    key: String,
    sender: tokio::sync::watch::Sender<Option<Option<Arc<Entry>>>>,
    /// The lock shared with other replicas, when single-flight is distributed: released with the flight.
    remote: Option<(Arc<dyn Cache>, String, String)>,
}

impl FlightGuard {
    fn finish(self, entry: Option<Arc<Entry>>) {
        let _ = self.sender.send(Some(entry));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Ok(mut flights) = self.flights.0.lock() {
            flights.remove(&self.key);
        }
        if let Some((cache, lock, token)) = self.remote.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                // A lock that cannot be released expires by itself after lockTimeout.
                let _ = cache.unlock(&lock, &token).await;
            });
        }
    }
}

impl Flights {
    fn join(&self, key: &str) -> Flight {
        let Ok(mut flights) = self.0.lock() else {
            // A poisoned lock only loses coalescing: go upstream.
            let (sender, _) = tokio::sync::watch::channel(None);
            return Flight::Leader(FlightGuard { flights: self.clone(), key: String::new(), sender, remote: None });
        };
        if let Some(receiver) = flights.get(key) {
            return Flight::Follower(receiver.clone());
        }
        let (sender, receiver) = tokio::sync::watch::channel(None);
        flights.insert(key.to_string(), receiver);
        Flight::Leader(FlightGuard { flights: self.clone(), key: key.to_string(), sender, remote: None })
    }
}

/// A client span for a cache operation of a sampled request (exported when traces are).
fn span(info: &RequestInfo, rule: &Rule, op: &str, started: std::time::SystemTime, result: &str) {
    let Some(traces) = info.route.as_ref().and_then(|r| r.traces.as_ref()) else { return };
    if !info.trace.sampled {
        return;
    }
    let attributes = vec![
        opentelemetry::KeyValue::new(
            "db.system.name",
            if rule.cache.backend() == "memory" { "memory" } else { "redis" },
        ),
        opentelemetry::KeyValue::new("db.operation.name", op.to_string()),
        opentelemetry::KeyValue::new("umw.cache.backend", rule.cache.backend()),
        opentelemetry::KeyValue::new("umw.cache.result", result.to_string()),
    ];
    traces.client_span(
        &info.trace,
        crate::kernel::trace::new_span_id(),
        format!("cache {op}"),
        started,
        attributes,
        false,
    );
}

/// What came of asking for the lock shared with other replicas.
enum Lock {
    Taken,
    /// Another replica stored the entry while this one waited.
    Served(Arc<Entry>),
    /// Not taken (backend down, or the holder took too long): go upstream.
    Unavailable,
}

/// Cache-Control directives, lower-case names.
fn directives(headers: &HeaderMap) -> HashMap<String, Option<String>> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|d| {
            let d = d.trim();
            if d.is_empty() {
                return None;
            }
            Some(match d.split_once('=') {
                Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim().trim_matches('"').to_string())),
                None => (d.to_ascii_lowercase(), None),
            })
        })
        .collect()
}

fn seconds(value: &Option<String>) -> Option<Duration> {
    value.as_deref().and_then(|v| v.parse::<u64>().ok()).map(Duration::from_secs)
}

/// Statuses cached with the rule's TTL (RFC 9111 §3: heuristically cacheable, minus the errors).
const POSITIVE: [u16; 6] = [200, 203, 204, 300, 301, 308];

impl Inner {
    async fn handle(self: Arc<Self>, request: Request<Body>, next: Next) -> Response {
        let Some(info) = request.extensions().get::<RequestInfo>().cloned() else { return next.run(request).await };
        let Some(route) = info.route.clone() else { return next.run(request).await };
        let route = route.name.as_str();
        let Some(rule) = self.rules.iter().find(|r| r.covers(route, request.method(), request.uri().path())).cloned()
        else {
            return next.run(request).await;
        };
        let count = |result: &str| match self.counts.as_ref().and_then(|c| c.get(result)) {
            Some(counter) => counter.inc(),
            None => self.metrics.cache_requests.with_label_values(&[route, result]).inc(),
        };
        let asked = if request.headers().contains_key(header::CACHE_CONTROL) {
            directives(request.headers())
        } else {
            HashMap::new()
        };
        // A shared cache keeps nothing for a request that asked it not to, or that carries credentials
        // (an Authorization header, or a principal an authentication stage established).
        if asked.contains_key("no-store")
            || request.headers().contains_key(header::AUTHORIZATION)
            || info.principal.is_some()
        {
            count("bypass");
            return with_status(next.run(request).await, "umw; fwd=bypass");
        }
        let key = self.key(&rule, &request);
        let revalidate =
            asked.contains_key("no-cache") || asked.get("max-age").is_some_and(|v| v.as_deref() == Some("0"));
        let now = now_ms();
        let started = std::time::SystemTime::now();
        let found = if revalidate { None } else { self.lookup(&rule, &key, request.headers()).await };
        if !revalidate {
            span(&info, &rule, "get", started, found.as_ref().map_or("miss", |_| "found"));
        }
        if let Some(entry) = &found {
            if now < entry.fresh_until_ms {
                count("hit");
                let ttl = (entry.fresh_until_ms - now) / 1000;
                return respond(entry, request.method(), dynamic_status(format!("umw; hit; ttl={ttl}")));
            }
            if now < entry.stored_ms.max(entry.fresh_until_ms) + rule.stale_while_revalidate.as_millis() as u64 {
                count("stale");
                self.clone().refresh(rule.clone(), key.clone(), &request, next);
                let age = (now - entry.fresh_until_ms) / 1000;
                return respond(
                    entry,
                    request.method(),
                    dynamic_status(format!("umw; hit; ttl=-{age}; detail=stale-while-revalidate")),
                );
            }
        }
        // HEAD is answered from a GET's entry, never stored: it has no body to keep.
        if *request.method() == Method::HEAD {
            count("miss");
            return with_status(next.run(request).await, "umw; fwd=miss");
        }
        let stale = found.filter(|e| now < e.fresh_until_ms + rule.stale_if_error.as_millis() as u64);
        if rule.single_flight {
            match self.flights.join(&key) {
                Flight::Follower(mut receiver) => {
                    // One deadline for the whole wait, however it goes.
                    let deadline = tokio::time::Instant::now() + rule.lock_timeout;
                    let shared: Option<Option<Arc<Entry>>> =
                        match tokio::time::timeout_at(deadline, receiver.wait_for(Option::is_some)).await {
                            Ok(Ok(result)) => result.clone(),
                            _ => None,
                        };
                    match shared {
                        Some(Some(entry)) => {
                            count("coalesced");
                            return respond(
                                &entry,
                                request.method(),
                                HeaderValue::from_static("umw; fwd=miss; collapsed"),
                            );
                        }
                        // The leader's response varies with request headers (or was not kept): once its flight
                        // ends, with the entry stored, the cache may hold this request's variant.
                        Some(None) => {
                            let ended = async { while receiver.changed().await.is_ok() {} };
                            let _ = tokio::time::timeout_at(deadline, ended).await;
                            if let Some(entry) = self.lookup(&rule, &key, request.headers()).await
                                && now_ms() < entry.fresh_until_ms
                            {
                                count("hit");
                                return respond(&entry, request.method(), HeaderValue::from_static("umw; hit"));
                            }
                        }
                        None => {}
                    }
                    count("miss");
                    return self.fetch(&rule, key, request, next, stale, None).await;
                }
                Flight::Leader(mut guard) => {
                    // Another flight may have stored the key between this request's lookup and now (unless the
                    // request asked to go upstream anyway).
                    if !revalidate
                        && let Some(entry) = self.lookup(&rule, &key, request.headers()).await
                        && now_ms() < entry.fresh_until_ms
                    {
                        count("hit");
                        let response = respond(&entry, request.method(), HeaderValue::from_static("umw; hit"));
                        guard.finish(Some(entry));
                        return response;
                    }
                    if rule.distributed && !revalidate {
                        match self.lock_across_replicas(&rule, &key, &mut guard, request.headers()).await {
                            Lock::Taken | Lock::Unavailable => {}
                            Lock::Served(entry) => {
                                count("coalesced");
                                let response = respond(
                                    &entry,
                                    request.method(),
                                    HeaderValue::from_static("umw; fwd=miss; collapsed"),
                                );
                                guard.finish(Some(entry));
                                return response;
                            }
                        }
                    }
                    count("miss");
                    return self.fetch(&rule, key, request, next, stale, Some(guard)).await;
                }
            }
        }
        count("miss");
        self.fetch(&rule, key, request, next, stale, None).await
    }

    /// Takes the key's lock shared with the other replicas; when another replica holds it, waits for its
    /// entry to appear (up to `lockTimeout`, then goes upstream anyway).
    async fn lock_across_replicas(&self, rule: &Rule, key: &str, guard: &mut FlightGuard, headers: &HeaderMap) -> Lock {
        let lock = format!("{key}|lock");
        match rule.cache.lock(&lock, rule.lock_timeout).await {
            Ok(Some(token)) => {
                guard.remote = Some((rule.cache.clone(), lock, token));
                Lock::Taken
            }
            Ok(None) => {
                let deadline = tokio::time::Instant::now() + rule.lock_timeout;
                let mut round = 0u32;
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Some(entry) = self.lookup(rule, key, headers).await
                        && now_ms() < entry.fresh_until_ms
                    {
                        return Lock::Served(entry);
                    }
                    // A holder that died leaves its lock to expire: take it then rather than wait it out.
                    round += 1;
                    if round.is_multiple_of(5)
                        && let Ok(Some(token)) = rule.cache.lock(&lock, rule.lock_timeout).await
                    {
                        guard.remote = Some((rule.cache.clone(), lock, token));
                        return Lock::Taken;
                    }
                }
                Lock::Unavailable
            }
            Err(error) => {
                self.backend_error(rule, "lock", &error);
                Lock::Unavailable
            }
        }
    }

    /// The key: prefix, method (HEAD shares GET's), host, path, the selected query and headers.
    fn key(&self, rule: &Rule, request: &Request<Body>) -> String {
        let mut key = String::with_capacity(128);
        key.push_str(&self.prefix);
        key.push_str("GET:");
        key.push_str(&crate::kernel::routing::host_of(request).unwrap_or_default());
        key.push_str(request.uri().path());
        if let Some(query) = request.uri().query() {
            if rule.query_params.is_empty() {
                key.push('?');
                key.push_str(query);
            } else {
                let mut pairs: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let name = pair.split('=').next().unwrap_or("");
                        rule.query_params.iter().any(|p| p == name)
                    })
                    .collect();
                pairs.sort_unstable();
                if !pairs.is_empty() {
                    key.push('?');
                    key.push_str(&pairs.join("&"));
                }
            }
        }
        for name in &rule.key_headers {
            key.push('|');
            key.push_str(name.as_str());
            key.push('=');
            key.push_str(&joined(request.headers(), name));
        }
        key
    }

    /// Looks the key up, following a `Vary` marker to the variant; failures are misses, and counted.
    async fn lookup(&self, rule: &Rule, key: &str, headers: &HeaderMap) -> Option<Arc<Entry>> {
        let entry = self.get(rule, key).await?;
        if entry.status != 0 {
            return Some(entry);
        }
        // A marker: the response varies by these headers; the variant has its own key.
        let variant = variant_key(key, &entry.vary, headers);
        self.get(rule, &variant).await
    }

    async fn get(&self, rule: &Rule, key: &str) -> Option<Arc<Entry>> {
        match rule.cache.get(key).await {
            Ok(entry) => entry,
            Err(error) => {
                self.backend_error(rule, "get", &error);
                None
            }
        }
    }

    fn backend_error(&self, rule: &Rule, op: &str, error: &CacheError) {
        self.metrics.cache_backend_errors.with_label_values(&[rule.cache.backend(), op, error.kind()]).inc();
        tracing::debug!(backend = rule.cache.backend(), op, %error, "cache operation failed; going on without it");
    }

    /// Sends the request upstream, keeps the response if it may, answers with it.
    async fn fetch(
        self: Arc<Self>,
        rule: &Rule,
        key: String,
        request: Request<Body>,
        next: Next,
        stale: Option<Arc<Entry>>,
        flight: Option<FlightGuard>,
    ) -> Response {
        let method = request.method().clone();
        let vary_source = request.headers().clone();
        let tags = render_tags(rule, &request);
        let info = request.extensions().get::<RequestInfo>().cloned();
        let route = request
            .extensions()
            .get::<RequestInfo>()
            .and_then(|i| i.route.as_ref().map(|r| r.name.clone()))
            .unwrap_or_default();
        let response = next.run(request).await;
        if response.status().is_server_error()
            && let Some(stale) = &stale
        {
            let age = now_ms().saturating_sub(stale.fresh_until_ms) / 1000;
            self.metrics.cache_requests.with_label_values(&[&route, "stale"]).inc();
            if let Some(flight) = flight {
                flight.finish(None);
            }
            return respond(stale, &method, dynamic_status(format!("umw; hit; ttl=-{age}; detail=stale-if-error")));
        }
        let Some(keep) = storable(rule, &response) else {
            self.metrics.cache_stores.with_label_values(&[&route, "not_cacheable"]).inc();
            if let Some(flight) = flight {
                flight.finish(None);
            }
            return with_status(response, "umw; fwd=miss; detail=not-cacheable");
        };
        let (parts, body) = response.into_parts();
        let (body, complete) = read_up_to(body, rule.max_entry_bytes).await;
        let Some(bytes) = complete else {
            self.metrics.cache_stores.with_label_values(&[&route, "too_large"]).inc();
            if let Some(flight) = flight {
                flight.finish(None);
            }
            return with_status(Response::from_parts(parts, body), "umw; fwd=miss; detail=too-large");
        };
        let now = now_ms();
        let fresh_until_ms = now + keep.as_millis() as u64;
        let stale_window = rule.stale_while_revalidate.max(rule.stale_if_error);
        let vary: Vec<String> = vary_names(&parts.headers);
        let entry = Entry {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .filter(|(name, _)| *name != CACHE_STATUS && *name != header::AGE)
                // A copy: the value read from the upstream shares the connection's whole read buffer.
                .filter_map(|(name, value)| Some((name.clone(), HeaderValue::from_bytes(value.as_bytes()).ok()?)))
                .collect(),
            body: bytes.clone(),
            stored_ms: now,
            fresh_until_ms,
            stale_until_ms: fresh_until_ms + stale_window.as_millis() as u64,
            vary: vary.clone(),
        };
        let entry = Arc::new(entry);
        // Waiters get the entry now; the flight itself ends once the entry is stored, so that requests
        // arriving meanwhile wait for it rather than miss in the cache and go upstream again.
        if let Some(flight) = &flight {
            // Waiters with other Vary values than this request cannot use its response.
            let _ = flight.sender.send(Some(vary.is_empty().then(|| entry.clone())));
        }
        // A backend known to be down is not written to (the waiters above still share the response).
        if !rule.cache.available() {
            self.metrics.cache_stores.with_label_values(&[&route, "unavailable"]).inc();
            drop(flight);
            let mut response = Response::from_parts(parts, Body::from(bytes));
            response
                .headers_mut()
                .insert(CACHE_STATUS, HeaderValue::from_static("umw; fwd=miss; detail=cache-unavailable"));
            return response;
        }
        // Stored in the background: the client does not wait for the cache. The stores in flight are
        // bounded (each holds its entry): past the bound, a response is served without being kept.
        let Ok(permit) = self.stores.clone().try_acquire_owned() else {
            self.metrics.cache_stores.with_label_values(&[&route, "backlog"]).inc();
            drop(flight);
            let mut response = Response::from_parts(parts, Body::from(bytes));
            response
                .headers_mut()
                .insert(CACHE_STATUS, HeaderValue::from_static("umw; fwd=miss; detail=store-backlog"));
            return response;
        };
        self.metrics.cache_stores.with_label_values(&[&route, "stored"]).inc();
        let store = {
            let inner = self.clone();
            let rule = rule.clone();
            let entry = entry.clone();
            async move {
                let keep = Duration::from_millis(entry.stale_until_ms.saturating_sub(now_ms()).max(1));
                let target = if entry.vary.is_empty() {
                    key
                } else {
                    let marker = Entry {
                        status: 0,
                        headers: HeaderMap::new(),
                        body: Bytes::new(),
                        vary: entry.vary.clone(),
                        ..entry.as_ref().clone()
                    };
                    if let Err(error) = rule.cache.put(&key, &marker, keep).await {
                        inner.backend_error(&rule, "set", &error);
                    }
                    let variant = variant_key(&key, &entry.vary, &vary_source);
                    // Invalidating the key finds its variants here.
                    if let Err(error) = rule.cache.tag(&super::Invalidator::variants_key(&key), &variant, keep).await {
                        inner.backend_error(&rule, "tag", &error);
                    }
                    variant
                };
                let started = std::time::SystemTime::now();
                let stored = rule.cache.put(&target, &entry, keep).await;
                if let Some(info) = &info {
                    span(info, &rule, "set", started, if stored.is_ok() { "stored" } else { "failed" });
                }
                if let Err(error) = stored {
                    inner.backend_error(&rule, "set", &error);
                }
                for tag in tags {
                    let tag_key = super::Invalidator::tag_key(&inner.prefix, &tag);
                    if let Err(error) = rule.cache.tag(&tag_key, &target, keep).await {
                        inner.backend_error(&rule, "tag", &error);
                    }
                }
                drop(flight);
                drop(permit);
            }
        };
        tokio::spawn(store);
        let mut response = Response::from_parts(parts, Body::from(bytes));
        response.headers_mut().insert(CACHE_STATUS, HeaderValue::from_static("umw; fwd=miss; stored"));
        response
    }

    /// Refreshes a stale entry in the background, once per key at a time.
    fn refresh(self: Arc<Self>, rule: Arc<Rule>, key: String, request: &Request<Body>, next: Next) {
        let Flight::Leader(guard) = self.flights.join(&key) else { return };
        let mut copy = Request::new(Body::empty());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        tokio::spawn(async move {
            let response = self.clone().fetch(&rule, key, copy, next, None, Some(guard)).await;
            // Drain the body so that the connection goes back to the pool.
            let _ = response.into_body().collect().await;
        });
    }
}

/// How long a response may be kept fresh, or `None` when it may not be stored.
fn storable(rule: &Rule, response: &Response) -> Option<Duration> {
    let status = response.status().as_u16();
    let headers = response.headers();
    let said = directives(headers);
    if said.contains_key("no-store") || said.contains_key("private") || said.contains_key("no-cache") {
        return None;
    }
    // Never keep one client's cookie for the next.
    if headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    if headers.get_all(header::VARY).iter().any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|n| n.trim() == "*"))) {
        return None;
    }
    let base = if POSITIVE.contains(&status) {
        rule.ttl
    } else if rule.negative_statuses.contains(&status) {
        rule.negative_ttl?
    } else {
        return None;
    };
    // The upstream's own freshness wins over the rule's: s-maxage (for shared caches), then max-age.
    let keep = seconds(said.get("s-maxage").unwrap_or(&None)).or_else(|| seconds(said.get("max-age").unwrap_or(&None)));
    let keep = match keep {
        Some(keep) => keep,
        // Jitter spreads expiries of entries stored together: up to jitter_percent more.
        None => base.mul_f64(1.0 + f64::from(rule.jitter_percent) / 100.0 * fastrand::f64()),
    };
    (!keep.is_zero()).then_some(keep)
}

/// Reads at most `limit` bytes. Returns the body to send on (unchanged content) and the bytes when the
/// whole body fit.
async fn read_up_to(mut body: Body, limit: usize) -> (Body, Option<Bytes>) {
    let mut buffer = BytesMut::new();
    loop {
        match body.frame().await {
            None => {
                let bytes = buffer.freeze();
                return (Body::from(bytes.clone()), Some(bytes));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buffer.extend_from_slice(&data);
                    if buffer.len() > limit {
                        // Too large to keep: send what was read, then the rest as it comes.
                        let head =
                            futures::stream::once(futures::future::ready(Ok::<Bytes, axum::Error>(buffer.freeze())));
                        let rest = body.into_data_stream();
                        return (Body::from_stream(futures::StreamExt::chain(head, rest)), None);
                    }
                }
            }
            Some(Err(error)) => {
                let head = futures::stream::iter([Ok(buffer.freeze()), Err(error)]);
                return (Body::from_stream(head), None);
            }
        }
    }
}

fn vary_names(headers: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn variant_key(key: &str, vary: &[String], headers: &HeaderMap) -> String {
    let mut variant = String::from(key);
    variant.push_str("|vary");
    for name in vary {
        variant.push('|');
        variant.push_str(name);
        variant.push('=');
        if let Ok(name) = HeaderName::try_from(name.as_str()) {
            variant.push_str(&joined(headers, &name));
        }
    }
    variant
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> String {
    headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",")
}

fn with_status(mut response: Response, status: &'static str) -> Response {
    response.headers_mut().insert(CACHE_STATUS, HeaderValue::from_static(status));
    response
}

/// A `Cache-Status` value made per response (it carries a TTL or an age).
fn dynamic_status(text: String) -> HeaderValue {
    HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static("umw"))
}

/// A response from an entry, with its age: the entry's parsed headers copied as they are (their
/// values are shared, not parsed again).
fn respond(entry: &Entry, method: &Method, cache_status: HeaderValue) -> Response {
    let body = if *method == Method::HEAD { Body::empty() } else { Body::from(entry.body.clone()) };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    *headers = entry.headers.clone();
    headers.insert(header::AGE, HeaderValue::from(now_ms().saturating_sub(entry.stored_ms) / 1000));
    headers.insert(CACHE_STATUS, cache_status);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> Rule {
        Rule {
            routes: Some(vec!["products".into()]),
            path_prefix: Some("/products".into()),
            head_too: true,
            get: true,
            ttl: Duration::from_secs(10),
            jitter_percent: 20,
            negative_ttl: Some(Duration::from_secs(2)),
            negative_statuses: vec![404],
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            query_params: vec!["page".into(), "sort".into()],
            key_headers: vec![HeaderName::from_static("accept-language")],
            max_entry_bytes: 1024,
            single_flight: true,
            distributed: false,
            lock_timeout: Duration::from_secs(1),
            tags: vec![umw_crds::template::parse("product:{{ path.1 }}").unwrap()],
            cache: Arc::new(super::super::memory::MemoryCache::new(1 << 20)),
        }
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> Response {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            r.headers_mut().append(HeaderName::try_from(*k).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        r
    }

    #[test]
    fn rules_cover_their_routes_methods_and_paths() {
        let r = rule();
        assert!(r.covers("products", &Method::GET, "/products/1"));
        assert!(r.covers("products", &Method::HEAD, "/products"));
        assert!(!r.covers("products", &Method::POST, "/products"));
        assert!(!r.covers("orders", &Method::GET, "/products"));
        assert!(!r.covers("products", &Method::GET, "/productsx"));
    }

    #[test]
    fn keys_take_the_selected_query_in_a_stable_order_and_the_key_headers() {
        let inner = Inner {
            rules: vec![],
            counts: None,
            prefix: "umw:ns/shop:".into(),
            flights: Flights::default(),
            metrics: Metrics::new().unwrap(),
            stores: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        let r = rule();
        let request = |uri: &str, lang: &str| {
            Request::get(uri)
                .header("host", "Shop.Example:8080")
                .header("accept-language", lang)
                .body(Body::empty())
                .unwrap()
        };
        let a = inner.key(&r, &request("/products?sort=asc&utm=x&page=2", "en"));
        let b = inner.key(&r, &request("/products?page=2&sort=asc", "en"));
        assert_eq!(a, b, "ignored parameters and order do not split the key");
        assert_eq!(a, "umw:ns/shop:GET:shop.example/products?page=2&sort=asc|accept-language=en");
        assert_ne!(a, inner.key(&r, &request("/products?page=2&sort=asc", "de")));
    }

    #[test]
    fn tags_render_from_the_request() {
        let request = Request::get("/products/42?x=1").body(Body::empty()).unwrap();
        assert_eq!(render_tags(&rule(), &request), ["product:42"]);
        let short = Request::get("/products").body(Body::empty()).unwrap();
        assert_eq!(render_tags(&rule(), &short), ["product:"], "a missing value renders empty");
    }

    #[test]
    fn what_may_be_stored_and_for_how_long() {
        let r = rule();
        let ttl = storable(&r, &response(200, &[])).unwrap();
        assert!(ttl >= Duration::from_secs(10) && ttl <= Duration::from_secs(12), "jitter within 20 %: {ttl:?}");
        assert_eq!(
            storable(&r, &response(200, &[("cache-control", "public, s-maxage=3, max-age=60")])),
            Some(Duration::from_secs(3))
        );
        assert_eq!(storable(&r, &response(200, &[("cache-control", "max-age=60")])), Some(Duration::from_secs(60)));
        let negative = storable(&r, &response(404, &[])).unwrap();
        assert!(negative >= Duration::from_secs(2) && negative <= Duration::from_millis(2400), "{negative:?}");
        for refused in [
            response(200, &[("cache-control", "no-store")]),
            response(200, &[("cache-control", "private, max-age=60")]),
            response(200, &[("set-cookie", "a=b")]),
            response(200, &[("vary", "*")]),
            response(500, &[]),
            response(410, &[]),
            response(200, &[("cache-control", "max-age=0")]),
        ] {
            assert_eq!(storable(&r, &refused), None, "{:?}", refused.headers());
        }
    }

    #[tokio::test]
    async fn a_hit_carries_the_stored_headers_its_age_and_its_cache_status() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.append("set-cookie-like", HeaderValue::from_static("a"));
        headers.append("set-cookie-like", HeaderValue::from_static("b"));
        let entry = Entry {
            status: 203,
            headers,
            body: Bytes::from_static(b"{}"),
            stored_ms: now_ms() - 5_000,
            fresh_until_ms: now_ms() + 60_000,
            stale_until_ms: now_ms() + 60_000,
            vary: Vec::new(),
        };
        let response = respond(&entry, &Method::GET, HeaderValue::from_static("umw; hit"));
        assert_eq!(response.status(), StatusCode::NON_AUTHORITATIVE_INFORMATION);
        let got = response.headers();
        assert_eq!(got[header::CONTENT_TYPE], "application/json");
        assert_eq!(got.get_all("set-cookie-like").iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(got[CACHE_STATUS], "umw; hit");
        let age: u64 = got[header::AGE].to_str().unwrap().parse().unwrap();
        assert!((4..=6).contains(&age), "age {age}");
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "{}");
        let head = respond(&entry, &Method::HEAD, dynamic_status("umw; hit; ttl=60".into()));
        assert_eq!(head.headers()[CACHE_STATUS], "umw; hit; ttl=60");
        assert!(head.into_body().collect().await.unwrap().to_bytes().is_empty());
    }

    #[tokio::test]
    async fn large_bodies_pass_through_whole_without_being_kept() {
        let (body, kept) = read_up_to(Body::from(vec![7u8; 4096]), 1024).await;
        assert!(kept.is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 4096);
        let (_, kept) = read_up_to(Body::from(vec![7u8; 100]), 1024).await;
        assert_eq!(kept.unwrap().len(), 100);
    }
}
