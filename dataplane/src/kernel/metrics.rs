//! The data plane's Prometheus metrics, registered once. Labels carry only bounded values: route and
//! upstream names come from the configuration, methods are folded into a fixed set, statuses into classes.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for request and upstream durations, in seconds: from 250µs to 30s.
const LATENCY_BUCKETS: &[f64] =
    &[0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Requests answered, by route, method and status class.
    pub requests: IntCounterVec,
    /// Time from the request head to the response head, by route.
    pub request_duration: HistogramVec,
    /// Requests being handled now.
    pub in_flight: IntGauge,
    /// Requests the gateway answered itself with a problem, by route and problem kind.
    pub gateway_errors: IntCounterVec,
    /// Upstream attempts by upstream and outcome (a status class, `connect_error`, `timeout`).
    pub upstream_requests: IntCounterVec,
    /// Duration of upstream attempts, by upstream.
    pub upstream_duration: HistogramVec,
    /// Retries sent, by upstream.
    pub upstream_retries: IntCounterVec,
    /// Connections opened to plain HTTP/1 upstreams, by upstream: against requests, how well the pool reuses.
    pub upstream_connections: IntCounterVec,
    /// Retries not sent because the retry budget was spent, by upstream.
    pub retry_budget_exhausted: IntCounterVec,
    /// Circuit-breaker state by upstream: 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGaugeVec,
    /// Circuit-breaker transitions by upstream and new state.
    pub breaker_transitions: IntCounterVec,
    /// Requests refused at once because the upstream's breaker was open, by upstream.
    pub breaker_rejections: IntCounterVec,
    /// Configuration reloads by outcome (`applied`, `rejected`).
    pub config_reloads: IntCounterVec,
    /// Cache lookups by route and result (`hit`, `miss`, `stale`, `bypass`, `coalesced`).
    pub cache_requests: IntCounterVec,
    /// Responses the cache kept or did not, by route and outcome (`stored`, `too_large`, `not_cacheable`).
    pub cache_stores: IntCounterVec,
    /// Duration of cache backend operations, by backend and operation.
    pub cache_backend_duration: HistogramVec,
    /// Failed cache backend operations, by backend, operation and kind (`timeout`, `unavailable`, ...).
    pub cache_backend_errors: IntCounterVec,
    /// Invalidations asked for, by what they name (`key`, `prefix`, `tag`).
    pub cache_invalidations: IntCounterVec,
    /// Warm-up fetches, by outcome (`ok`, `error`).
    pub cache_warmups: IntCounterVec,
    /// Events published to Kafka, by topic and outcome (`ok`, `error`, `full`, `unavailable`).
    pub events_published: IntCounterVec,
    /// Time from handing an event to the producer to the broker's acknowledgement, by topic.
    pub events_publish_duration: HistogramVec,
    /// Events handed to the producer and not yet acknowledged.
    pub events_in_flight: IntGauge,
    /// Events received by ingest or consumers, by event route and outcome (`delivered`, `filtered`,
    /// `dead_lettered`, `invalid`, `failed`).
    pub events_handled: IntCounterVec,
    /// Delivery attempts to a destination, by event route and outcome (`ok`, `error`).
    pub events_deliveries: IntCounterVec,
    /// Consumer lag (messages behind the partitions' ends), by event route.
    pub events_consumer_lag: IntGaugeVec,
    /// Consumer group rebalances seen, by event route and kind (`assign`, `revoke`).
    pub events_rebalances: IntCounterVec,
    /// Partitions paused because their worker fell behind, by event route.
    pub events_paused: IntCounterVec,
    /// Commands by command and outcome (`accepted`, `rejected`, `replayed`, `conflict`, `invalid`,
    /// `handler_failed`, `unavailable`).
    pub commands: IntCounterVec,
    /// Outbox rows published, by table.
    pub outbox_published: IntCounterVec,
    /// Failed publish attempts of outbox rows, by table and kind (`unavailable`, `failed`, `refused`).
    pub outbox_failures: IntCounterVec,
    /// Outbox rows moved to the dead-letter table, by table.
    pub outbox_dead: IntCounterVec,
    /// Unpublished outbox rows, by table.
    pub outbox_depth: IntGaugeVec,
    /// Age in seconds of the oldest unpublished outbox row, by table.
    pub outbox_oldest_age: prometheus::GaugeVec,
    /// Time from the commit of an outbox row to the broker's acknowledgement, by table.
    pub outbox_latency: HistogramVec,
    /// Published rows and expired commands deleted by cleanup, by table.
    pub outbox_cleaned: IntCounterVec,
    /// Failed PostgreSQL operations, by operation.
    pub postgres_errors: IntCounterVec,
    /// Requests to the admin listener for a path it does not serve.
    pub admin_unknown: IntCounter,
    /// Connections accepted on the traffic listener.
    pub connections_accepted: IntCounter,
    /// Open connections on the traffic listener.
    pub connections_open: IntGauge,
    /// Requests and connections refused before routing, by reason (see [`crate::kernel::inbound::reasons`]).
    pub http_refused: IntCounterVec,
    /// Background tasks started, stopped, replaced or failed to start, by component, kind and event.
    pub tasks: IntCounterVec,
    /// Authentication decisions, by policy, kind (`jwt`) and outcome (`allowed`, `anonymous`, `missing`,
    /// `invalid`).
    pub auth_decisions: IntCounterVec,
    /// Tokens refused, by policy and reason (the auth component's `jwt::Reject`).
    pub auth_jwt_rejections: IntCounterVec,
    /// JWKS and discovery fetches, by issuer and outcome (`ok`, `error`).
    pub auth_jwks_fetches: IntCounterVec,
    /// TLS handshakes on the traffic listener, by outcome (see [`tls_outcomes`]).
    pub tls_handshakes: IntCounterVec,
    /// Rotations of the listener's certificates, by outcome (`applied`, `rejected`).
    pub tls_reloads: IntCounterVec,
    /// When each served certificate expires, in Unix seconds, by certificate (its Secret or file).
    pub tls_certificate_expiry: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| -> Result<HistogramVec, prometheus::Error> {
            let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let metrics = Self {
            requests: counter_vec(
                "umw_http_requests_total",
                "HTTP requests answered, by route, method and status class",
                &["route", "method", "status"],
            )?,
            request_duration: histogram_vec(
                "umw_http_request_duration_seconds",
                "Time from request head to response head, by route",
                &["route"],
            )?,
            in_flight: gauge("umw_http_requests_in_flight", "HTTP requests being handled")?,
            gateway_errors: counter_vec(
                "umw_gateway_errors_total",
                "Requests the gateway answered itself with a problem response, by route and kind",
                &["route", "kind"],
            )?,
            upstream_requests: counter_vec(
                "umw_upstream_requests_total",
                "Upstream attempts by upstream and outcome (status class, connect_error, timeout)",
                &["upstream", "outcome"],
            )?,
            upstream_duration: histogram_vec(
                "umw_upstream_request_duration_seconds",
                "Duration of upstream attempts until the response head, by upstream",
                &["upstream"],
            )?,
            upstream_retries: counter_vec("umw_upstream_retries_total", "Retries sent, by upstream", &["upstream"])?,
            upstream_connections: counter_vec(
                "umw_upstream_connections_opened_total",
                "Connections opened to plain HTTP/1 upstreams, by upstream",
                &["upstream"],
            )?,
            retry_budget_exhausted: counter_vec(
                "umw_upstream_retry_budget_exhausted_total",
                "Retries not sent because the upstream's retry budget was spent",
                &["upstream"],
            )?,
            breaker_state: {
                let metric = IntGaugeVec::new(
                    Opts::new("umw_circuit_breaker_state", "Circuit-breaker state: 0 closed, 1 open, 2 half-open"),
                    &["upstream"],
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            breaker_transitions: counter_vec(
                "umw_circuit_breaker_transitions_total",
                "Circuit-breaker transitions, by upstream and the state entered",
                &["upstream", "state"],
            )?,
            breaker_rejections: counter_vec(
                "umw_circuit_breaker_rejections_total",
                "Requests refused because the upstream's circuit breaker was open",
                &["upstream"],
            )?,
            config_reloads: counter_vec(
                "umw_config_reloads_total",
                "Configuration reloads by outcome (applied, rejected)",
                &["outcome"],
            )?,
            cache_requests: counter_vec(
                "umw_cache_requests_total",
                "Cache lookups by route and result (hit, miss, stale, bypass, coalesced)",
                &["route", "result"],
            )?,
            cache_stores: counter_vec(
                "umw_cache_stores_total",
                "Responses stored or not, by route and outcome (stored, too_large, not_cacheable, unavailable)",
                &["route", "outcome"],
            )?,
            cache_backend_duration: histogram_vec(
                "umw_cache_backend_duration_seconds",
                "Duration of cache backend operations, by backend and operation",
                &["backend", "op"],
            )?,
            cache_backend_errors: counter_vec(
                "umw_cache_backend_errors_total",
                "Failed cache backend operations, by backend, operation and kind",
                &["backend", "op", "kind"],
            )?,
            cache_invalidations: counter_vec(
                "umw_cache_invalidations_total",
                "Invalidations asked for, by what they name (key, prefix, tag)",
                &["by"],
            )?,
            cache_warmups: counter_vec(
                "umw_cache_warmups_total",
                "Warm-up fetches by outcome (ok, error)",
                &["outcome"],
            )?,
            auth_decisions: counter_vec(
                "umw_auth_decisions_total",
                "Authentication decisions, by policy, kind and outcome (allowed, anonymous, missing, invalid)",
                &["policy", "kind", "outcome"],
            )?,
            auth_jwt_rejections: counter_vec(
                "umw_auth_jwt_rejections_total",
                "Bearer tokens refused, by policy and reason",
                &["policy", "reason"],
            )?,
            auth_jwks_fetches: counter_vec(
                "umw_auth_jwks_fetches_total",
                "Fetches of an issuer's keys (discovery and JWKS), by issuer and outcome (ok, error)",
                &["issuer", "outcome"],
            )?,
            commands: counter_vec("umw_commands_total", "Commands by command and outcome", &["command", "outcome"])?,
            outbox_published: counter_vec("umw_outbox_published_total", "Outbox rows published, by table", &["table"])?,
            outbox_failures: counter_vec(
                "umw_outbox_publish_failures_total",
                "Failed publish attempts of outbox rows, by table and kind (unavailable, failed, refused)",
                &["table", "kind"],
            )?,
            outbox_dead: counter_vec(
                "umw_outbox_dead_lettered_total",
                "Outbox rows moved to the dead-letter table umw_outbox_dead, by table",
                &["table"],
            )?,
            outbox_depth: {
                let metric =
                    IntGaugeVec::new(Opts::new("umw_outbox_depth", "Unpublished outbox rows, by table"), &["table"])?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            outbox_oldest_age: {
                let metric = prometheus::GaugeVec::new(
                    Opts::new("umw_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row, by table"),
                    &["table"],
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            outbox_latency: histogram_vec(
                "umw_outbox_relay_latency_seconds",
                "Time from the commit of an outbox row to the broker's acknowledgement, by table",
                &["table"],
            )?,
            outbox_cleaned: counter_vec(
                "umw_outbox_cleaned_total",
                "Published outbox rows and expired command records deleted, by table",
                &["table"],
            )?,
            postgres_errors: counter_vec(
                "umw_postgres_errors_total",
                "Failed PostgreSQL operations, by operation",
                &["operation"],
            )?,
            events_published: counter_vec(
                "umw_events_published_total",
                "Events published to Kafka, by topic and outcome (ok, error, full, unavailable)",
                &["topic", "outcome"],
            )?,
            events_publish_duration: histogram_vec(
                "umw_events_publish_duration_seconds",
                "Time from handing an event to the producer to the broker's acknowledgement, by topic",
                &["topic"],
            )?,
            events_in_flight: gauge("umw_events_in_flight", "Events handed to the producer and not yet acknowledged")?,
            events_handled: counter_vec(
                "umw_events_handled_total",
                "Events received by ingest or consumers, by event route and outcome",
                &["event_route", "outcome"],
            )?,
            events_deliveries: counter_vec(
                "umw_events_deliveries_total",
                "Delivery attempts to a destination, by event route and outcome (ok, error)",
                &["event_route", "outcome"],
            )?,
            events_consumer_lag: {
                let metric = IntGaugeVec::new(
                    Opts::new("umw_events_consumer_lag", "Messages behind the partitions' ends, by event route"),
                    &["event_route"],
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            events_rebalances: counter_vec(
                "umw_events_rebalances_total",
                "Consumer group rebalances seen, by event route and kind (assign, revoke)",
                &["event_route", "kind"],
            )?,
            events_paused: counter_vec(
                "umw_events_partitions_paused_total",
                "Partitions paused because their worker fell behind (resumed when it catches up), by event route",
                &["event_route"],
            )?,
            admin_unknown: {
                let metric = IntCounter::new(
                    "umw_admin_unknown_requests_total",
                    "Requests to the admin listener for an endpoint it does not serve",
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            connections_accepted: {
                let metric =
                    IntCounter::new("umw_connections_accepted_total", "Connections accepted on the traffic listener")?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            connections_open: gauge("umw_connections_open", "Open connections on the traffic listener")?,
            http_refused: {
                let family = counter_vec(
                    "umw_http_refused_total",
                    "Requests and connections refused before routing, by reason",
                    &["reason"],
                )?;
                for reason in crate::kernel::inbound::reasons::ALL {
                    family.with_label_values(&[reason]);
                }
                family
            },
            tls_handshakes: {
                let family = counter_vec(
                    "umw_tls_handshakes_total",
                    "TLS handshakes on the traffic listener, by outcome",
                    &["outcome"],
                )?;
                for outcome in tls_outcomes::ALL {
                    family.with_label_values(&[outcome]);
                }
                family
            },
            tls_reloads: counter_vec(
                "umw_tls_reloads_total",
                "Rotations of the traffic listener's certificates, by outcome (applied, rejected)",
                &["outcome"],
            )?,
            tls_certificate_expiry: {
                let metric = IntGaugeVec::new(
                    Opts::new(
                        "umw_tls_certificate_expiry_timestamp_seconds",
                        "When each certificate the traffic listener serves expires, in Unix seconds",
                    ),
                    &["certificate"],
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            tasks: counter_vec(
                "umw_tasks_total",
                "Background tasks (consumers, relays, warm-up, producer flushes) by component, kind and event (started, stopped, replaced, failed)",
                &["component", "kind", "event"],
            )?,
            registry,
        };
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        metrics.registry.register(Box::new(PANICS.clone()))?;
        Ok(metrics)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec only fails on metric families that the registry itself refused.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Counters of one route by method and status class, resolved on first use and then lock-free: the
/// request path does not hash label values.
pub struct RouteCounters {
    route: String,
    counters: Vec<std::sync::OnceLock<IntCounter>>,
}

const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl RouteCounters {
    pub fn new(route: &str) -> Self {
        Self {
            route: route.to_string(),
            counters: (0..METHODS.len() * CLASSES.len()).map(|_| Default::default()).collect(),
        }
    }

    pub fn inc(&self, metrics: &Metrics, method: &http::Method, status: http::StatusCode) {
        let m = method_index(method);
        let c = usize::from((status.as_u16() / 100).clamp(1, 5) - 1);
        let counter = self.counters[m * CLASSES.len() + c]
            .get_or_init(|| metrics.requests.with_label_values(&[&self.route, METHODS[m], CLASSES[c]]));
        counter.inc();
    }
}

fn method_index(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::PATCH => 4,
        http::Method::DELETE => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Counters of one upstream by outcome, resolved on first use.
pub struct UpstreamCounters {
    upstream: String,
    outcomes: Vec<(&'static str, std::sync::OnceLock<IntCounter>)>,
    pub duration: prometheus::Histogram,
}

impl UpstreamCounters {
    pub fn new(metrics: &Metrics, upstream: &str) -> Self {
        let outcomes = ["1xx", "2xx", "3xx", "4xx", "5xx", "timeout", "connect_error", "client_error"]
            .into_iter()
            .map(|o| (o, std::sync::OnceLock::new()))
            .collect();
        Self {
            upstream: upstream.to_string(),
            outcomes,
            duration: metrics.upstream_duration.with_label_values(&[upstream]),
        }
    }

    pub fn outcome(&self, metrics: &Metrics, outcome: &str) {
        if let Some((label, cell)) = self.outcomes.iter().find(|(o, _)| *o == outcome) {
            cell.get_or_init(|| metrics.upstream_requests.with_label_values(&[self.upstream.as_str(), label])).inc();
        }
    }
}

/// Request handlers that panicked (each answered 500). Process-wide: a panic is a bug, not a route's
/// behaviour, and the counter must exist before any configuration does.
pub static PANICS: std::sync::LazyLock<IntCounter> = std::sync::LazyLock::new(|| {
    // The name and help are constants; creating the counter cannot fail.
    IntCounter::new("umw_panics_total", "Request handlers that panicked").unwrap_or_else(|_| unreachable!())
});

/// The method label: the standard methods as they are, anything else as `OTHER`.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// `2xx`, `4xx`, ...
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Outcomes of a handshake, the `outcome` label of `umw_tls_handshakes_total`.
pub mod tls_outcomes {
    pub const FULL: &str = "full";
    pub const RESUMED: &str = "resumed";
    pub const TIMEOUT: &str = "timeout";
    pub const CLIENT_CERTIFICATE_MISSING: &str = "client_certificate_missing";
    pub const CLIENT_CERTIFICATE_EXPIRED: &str = "client_certificate_expired";
    pub const CLIENT_CERTIFICATE_INVALID: &str = "client_certificate_invalid";
    /// The client refused the server's certificate (an alert naming the certificate).
    pub const REFUSED_BY_CLIENT: &str = "refused_by_client";
    /// No protocol version, cipher suite or ALPN protocol in common.
    pub const INCOMPATIBLE: &str = "incompatible";
    /// Anything else: not TLS, a broken message, the connection closed mid-handshake.
    pub const ERROR: &str = "error";
    pub const ALL: &[&str] = &[
        FULL,
        RESUMED,
        TIMEOUT,
        CLIENT_CERTIFICATE_MISSING,
        CLIENT_CERTIFICATE_EXPIRED,
        CLIENT_CERTIFICATE_INVALID,
        REFUSED_BY_CLIENT,
        INCOMPATIBLE,
        ERROR,
    ];
}
