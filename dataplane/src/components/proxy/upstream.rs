//! Upstreams: where a route's requests go, with the state that outlives a configuration reload (pooled
//! connections, the circuit breaker, the retry budget).

use std::time::{Duration, Instant};

use http::HeaderValue;
use http::uri::{Authority, Scheme};
use umw_crds::middleware::{Upstream as UpstreamSpec, UpstreamProtocol};
use umw_crds::validate::duration_or;

use super::budget::RetryBudget;
use crate::kernel::breaker::{Admission, Breaker, BreakerState, Trial};
use crate::kernel::health::{Health, HealthHandle, State};
use crate::kernel::metrics::Metrics;
pub use crate::kernel::net::{Clients, Overrides};
use crate::kernel::pool::Http1Pool;

/// Default of `circuitBreaker.openFor`.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(10);
/// Default of `circuitBreaker.consecutiveFailures`.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;

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
    /// The per-thread connection pool of a plain `http://` HTTP/1 upstream; the others use [`Clients`].
    pub pool: Option<Http1Pool>,
    /// Set when a reload drops the upstream: requests still in flight finish, but its state no longer
    /// shows in `/status` or the breaker gauge.
    health: HealthHandle,
    metrics: Metrics,
}

impl Upstream {
    /// An upstream that reports to `health` once activated.
    pub fn new(target: Target, health: &Health, metrics: Metrics) -> Result<Self, UpstreamError> {
        let label = target.label();
        let health = health.handle(component_name(&label), false);
        let bad = || UpstreamError::BadUrl(format!("upstream {label:?} is not an address to connect to"));
        let scheme = Scheme::try_from(target.scheme.as_str()).map_err(|_| bad())?;
        let authority = Authority::try_from(target.connect.as_str()).map_err(|_| bad())?;
        let host = target.host.as_deref().map(HeaderValue::try_from).transpose().map_err(|_| bad())?;
        let breaker = Breaker::new(target.breaker.0, target.breaker.1);
        let counters = crate::kernel::metrics::UpstreamCounters::new(&metrics, &label);
        let pool = (target.scheme == "http" && target.protocol == Protocol::Http1)
            .then(|| Http1Pool::new(target.connect.clone(), metrics.upstream_connections.with_label_values(&[&label])));
        Ok(Self {
            target,
            label,
            scheme,
            authority,
            host,
            breaker,
            budget: RetryBudget::default(),
            counters,
            pool,
            health,
            metrics,
        })
    }

    /// Asks the breaker; counts refusals.
    pub fn admit(&self) -> Admission {
        if self.breaker.is_healthy() {
            return Admission::Allowed { trial: None };
        }
        let (admission, transition) = self.breaker.admit(Instant::now());
        if let Some(state) = transition {
            self.transition(state);
        }
        if matches!(admission, Admission::Rejected { .. }) {
            self.metrics.breaker_rejections.with_label_values(&[&self.label]).inc();
        }
        admission
    }

    /// Reports an attempt's outcome to the breaker, with the trial its admission carried.
    pub fn record(&self, trial: Option<Trial>, success: bool) {
        if success && trial.is_none() && self.breaker.is_healthy() {
            return;
        }
        if let Some(state) = self.breaker.record(trial, success, Instant::now()) {
            self.transition(state);
        }
    }

    /// Puts the upstream into `/status` and the breaker gauge: when its configuration is swapped in.
    pub fn activate(&self) {
        if self.health.is_active() {
            return;
        }
        self.metrics.breaker_state.with_label_values(&[&self.label]).set(self.breaker.state().gauge());
        match self.breaker.state() {
            BreakerState::Closed => self.health.set(State::Up, ""),
            _ => self.health.set(State::Degraded, "circuit breaker open"),
        }
        self.health.activate();
    }

    /// Takes the upstream out of `/status` and the metrics: a reload dropped it.
    pub fn retire(&self) {
        self.health.retire();
        let _ = self.metrics.breaker_state.remove_label_values(&[&self.label]);
    }

    fn transition(&self, state: BreakerState) {
        self.metrics.breaker_transitions.with_label_values(&[&self.label, state.label()]).inc();
        if self.health.is_active() {
            self.metrics.breaker_state.with_label_values(&[&self.label]).set(state.gauge());
        }
        match state {
            BreakerState::Closed => {
                tracing::info!(upstream = %self.label, "circuit breaker closed: the upstream answers again");
                self.health.set(State::Up, "");
            }
            BreakerState::Open => {
                tracing::warn!(upstream = %self.label, "circuit breaker open: the upstream keeps failing");
                self.health.set(
                    State::Degraded,
                    format!("circuit breaker open after {} failures in a row", self.target.breaker.0),
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
