//! Upstreams: where a route's requests go, with the state that outlives a configuration reload (pooled
//! connections, the circuit breaker, the retry budget).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use http::HeaderValue;
use http::uri::{Authority, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use umw_crds::middleware::{Upstream as UpstreamSpec, UpstreamProtocol};
use umw_crds::validate::duration_or;

use super::budget::RetryBudget;
use crate::kernel::breaker::{Admission, Breaker, BreakerState};
use crate::kernel::health::{Health, State};
use crate::kernel::metrics::Metrics;

/// Default of `circuitBreaker.openFor`.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(10);
/// Default of `circuitBreaker.consecutiveFailures`.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The connection pools, one per protocol, shared by every upstream and kept across reloads.
#[derive(Clone)]
pub struct Clients {
    pub http1: Client<HttpsConnector, Body>,
    pub h2c: Client<HttpConnector, Body>,
}

impl Clients {
    pub fn new() -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        // TCP keep-alive finds pooled connections whose peer vanished without a reset.
        http.set_keepalive(Some(Duration::from_secs(30)));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_native_roots() {
            Ok(builder) => builder,
            Err(error) => {
                tracing::warn!(%error, "no system CA certificates; https:// upstreams will fail verification");
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config_without_roots())
            }
        };
        let https = builder.https_or_http().enable_http1().enable_http2().wrap_connector(http.clone());
        let http1 = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(https);
        // HTTP/2 multiplexes on few connections, so a dead one would take every request with it: pings find
        // it within 30 s.
        let h2c = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .build(http);
        Self { http1, h2c }
    }
}

impl Default for Clients {
    fn default() -> Self {
        Self::new()
    }
}

/// A TLS configuration that trusts nothing: https:// upstreams fail with a verification error (which the
/// log explains) instead of the process failing to start.
fn config_without_roots() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth())
        // The ring provider supports the default protocol versions; this branch is unreachable in practice.
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth()
        })
}

/// `--resolve NAME:PORT=ADDRESS`: connect to ADDRESS for an upstream named NAME:PORT (a Service name and
/// port, or a URL's host and port), as curl's `--resolve` does. For running the data plane outside a
/// cluster against upstreams that are Services inside one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides(pub BTreeMap<String, SocketAddr>);

impl std::str::FromStr for Overrides {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, address) =
                item.split_once('=').ok_or_else(|| format!("{item:?} is not NAME:PORT=ADDRESS:PORT"))?;
            let address: SocketAddr =
                address.parse().map_err(|_| format!("{address:?} in {item:?} is not an IP address and port"))?;
            if !name.contains(':') {
                return Err(format!("{name:?} in {item:?} needs a port (NAME:PORT)"));
            }
            map.insert(name.to_ascii_lowercase(), address);
        }
        Ok(Self(map))
    }
}

/// Where and how to reach one upstream.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub scheme: String,
    /// host:port that is connected to.
    pub connect: String,
    /// `Host` sent upstream; `None` keeps the client's (Service upstreams).
    pub host: Option<String>,
    /// Path put in front of the request's path (no trailing slash).
    pub base_path: String,
    pub protocol: Protocol,
    pub breaker: (u32, Duration),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Http1,
    H2c,
}

/// Why an upstream cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    BadUrl(String),
    #[error("H2C needs an http:// upstream; {0:?} is https:// (which negotiates HTTP/2 by itself)")]
    H2cOverTls(String),
    #[error("upstream needs exactly one of service or url")]
    NeitherOrBoth,
}

impl Target {
    /// Resolves a route's upstream spec. Services are `<name>.<namespace>.svc:<port>`.
    pub fn from_spec(spec: &UpstreamSpec, namespace: &str, overrides: &Overrides) -> Result<Self, UpstreamError> {
        let breaker = spec.circuit_breaker.as_ref().map_or((DEFAULT_CONSECUTIVE_FAILURES, DEFAULT_OPEN_FOR), |b| {
            (b.consecutive_failures, duration_or(b.open_for.as_ref(), DEFAULT_OPEN_FOR))
        });
        let protocol = match spec.protocol {
            UpstreamProtocol::Http1 => Protocol::Http1,
            UpstreamProtocol::H2c => Protocol::H2c,
        };
        let (scheme, connect, host, base_path, name) = match (&spec.service, &spec.url) {
            (Some(service), None) => {
                let connect = format!("{}.{namespace}.svc:{}", service.name, service.port);
                let name = format!("{}:{}", service.name, service.port);
                ("http".to_string(), connect, None, String::new(), name)
            }
            (None, Some(url)) => {
                let url = umw_crds::validate::HttpUrl::parse(url).map_err(UpstreamError::BadUrl)?;
                let connect = format!("{}:{}", url.host, url.port);
                let name = connect.clone();
                (url.scheme.to_string(), connect, Some(url.authority), url.base_path, name)
            }
            _ => return Err(UpstreamError::NeitherOrBoth),
        };
        if protocol == Protocol::H2c && scheme == "https" {
            return Err(UpstreamError::H2cOverTls(spec.url.clone().unwrap_or_default()));
        }
        let connect = match overrides
            .0
            .get(&name.to_ascii_lowercase())
            .or_else(|| overrides.0.get(&connect.to_ascii_lowercase()))
        {
            Some(address) => address.to_string(),
            None => connect,
        };
        Ok(Self { scheme, connect, host, base_path, protocol, breaker })
    }

    /// The label of this upstream in metrics and `/status`: bounded by the configuration.
    pub fn label(&self) -> String {
        format!("{}://{}{}", self.scheme, self.connect, self.base_path)
    }
}

/// One upstream, shared by the routes that name it.
pub struct Upstream {
    pub target: Target,
    pub label: String,
    pub scheme: Scheme,
    pub authority: Authority,
    pub host: Option<HeaderValue>,
    pub breaker: Breaker,
    pub budget: RetryBudget,
    pub counters: crate::kernel::metrics::UpstreamCounters,
    /// Set when a reload drops the upstream: requests still in flight finish, but its state no longer
    /// shows in `/status` or the breaker gauge.
    retired: std::sync::atomic::AtomicBool,
    health: Health,
    metrics: Metrics,
}

impl Upstream {
    pub fn new(target: Target, health: Health, metrics: Metrics) -> Result<Self, UpstreamError> {
        let label = target.label();
        let bad = || UpstreamError::BadUrl(format!("upstream {label:?} is not an address to connect to"));
        let scheme = Scheme::try_from(target.scheme.as_str()).map_err(|_| bad())?;
        let authority = Authority::try_from(target.connect.as_str()).map_err(|_| bad())?;
        let host = target.host.as_deref().map(HeaderValue::try_from).transpose().map_err(|_| bad())?;
        let breaker = Breaker::new(target.breaker.0, target.breaker.1);
        let counters = crate::kernel::metrics::UpstreamCounters::new(&metrics, &label);
        Ok(Self {
            target,
            label,
            scheme,
            authority,
            host,
            breaker,
            budget: RetryBudget::default(),
            counters,
            retired: std::sync::atomic::AtomicBool::new(false),
            health,
            metrics,
        })
    }

    /// Asks the breaker; counts refusals.
    pub fn admit(&self) -> Admission {
        let (admission, transition) = self.breaker.admit(Instant::now());
        if let Some(state) = transition {
            self.transition(state);
        }
        if matches!(admission, Admission::Rejected { .. }) {
            self.metrics.breaker_rejections.with_label_values(&[&self.label]).inc();
        }
        admission
    }

    /// Reports an attempt's outcome to the breaker.
    pub fn record(&self, success: bool) {
        if let Some(state) = self.breaker.record(success, Instant::now()) {
            self.transition(state);
        }
    }

    /// Puts the upstream into `/status` and the breaker gauge: when its configuration is swapped in.
    pub fn activate(&self) {
        self.metrics.breaker_state.with_label_values(&[&self.label]).set(self.breaker.state().gauge());
        let name = component_name(&self.label);
        match self.breaker.state() {
            BreakerState::Closed => self.health.set(&name, State::Up, "", false),
            _ => self.health.set(&name, State::Degraded, "circuit breaker open", false),
        }
    }

    /// Takes the upstream out of `/status` and the metrics: a reload dropped it.
    pub fn retire(&self) {
        self.retired.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.metrics.breaker_state.remove_label_values(&[&self.label]);
    }

    fn transition(&self, state: BreakerState) {
        self.metrics.breaker_transitions.with_label_values(&[&self.label, state.label()]).inc();
        if self.retired.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        self.metrics.breaker_state.with_label_values(&[&self.label]).set(state.gauge());
        let name = component_name(&self.label);
        match state {
            BreakerState::Closed => {
                tracing::info!(upstream = %self.label, "circuit breaker closed: the upstream answers again");
                self.health.set(&name, State::Up, "", false);
            }
            BreakerState::Open => {
                tracing::warn!(upstream = %self.label, "circuit breaker open: the upstream keeps failing");
                self.health.set(
                    &name,
                    State::Degraded,
                    format!("circuit breaker open after {} failures in a row", self.target.breaker.0),
                    false,
                );
            }
            BreakerState::HalfOpen => {
                tracing::info!(upstream = %self.label, "circuit breaker half-open: sending a trial request");
            }
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Name of an upstream in `/status`.
pub fn component_name(label: &str) -> String {
    format!("upstream {label}")
}

/// Upstreams of the running configuration, by target; a reload reuses the ones it keeps.
#[derive(Default)]
pub struct Upstreams(pub BTreeMap<Target, Arc<Upstream>>);

#[cfg(test)]
mod tests {
    use super::*;
    use umw_crds::middleware::ServiceRef;

    #[test]
    fn services_urls_and_overrides() {
        let none = Overrides::default();
        let service = UpstreamSpec {
            service: Some(ServiceRef { name: "shop-api".into(), port: 8080 }),
            ..UpstreamSpec::default()
        };
        let t = Target::from_spec(&service, "shop", &none).unwrap();
        assert_eq!((t.connect.as_str(), t.host.as_deref()), ("shop-api.shop.svc:8080", None));
        let overrides: Overrides = "shop-api:8080=127.0.0.1:9000".parse().unwrap();
        assert_eq!(Target::from_spec(&service, "shop", &overrides).unwrap().connect, "127.0.0.1:9000");

        let url = UpstreamSpec { url: Some("https://api.example.com/v2/".into()), ..UpstreamSpec::default() };
        let t = Target::from_spec(&url, "shop", &none).unwrap();
        assert_eq!(t.connect, "api.example.com:443");
        assert_eq!(t.host.as_deref(), Some("api.example.com"));
        assert_eq!(t.base_path, "/v2");
        assert_eq!(t.label(), "https://api.example.com:443/v2");

        let h2c_tls = UpstreamSpec { protocol: UpstreamProtocol::H2c, ..url };
        assert!(matches!(Target::from_spec(&h2c_tls, "shop", &none), Err(UpstreamError::H2cOverTls(_))));
        assert!("nope".parse::<Overrides>().is_err());
        assert!("a=127.0.0.1:1".parse::<Overrides>().is_err(), "a port is needed on the name");
    }
}
