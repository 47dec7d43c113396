//! `Middleware`: one data-plane deployment with its listeners, routes, connections and commands.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Duration, JsonDocument, ValueSource};

/// A data-plane deployment: the gateway in front of one or more upstream services.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "umw.dev",
    version = "v1alpha1",
    kind = "Middleware",
    plural = "middlewares",
    singular = "middleware",
    shortname = "mw",
    category = "umw",
    namespaced,
    status = "MiddlewareStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A Universal Middleware data-plane deployment: listeners, routes to upstream services, connections to Redis, Kafka and PostgreSQL, commands, observability and pod settings. Policies (CachePolicy, EventRoute, AuthPolicy) attach to it through their targetRefs.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Available", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Config", type_ = "string", json_path = ".status.configHash", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.autoscaling) || !has(self.replicas) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)",
        "message": "replicas must lie within autoscaling.minReplicas..maxReplicas, or be left out when autoscaling is set"
    },
    {
        "rule": "!has(self.routes) || self.routes.all(r, self.routes.exists_one(o, o.name == r.name))",
        "message": "route names must be unique: two of spec.routes[].name are the same",
        "fieldPath": ".routes"
    },
    {
        "rule": "!has(self.commands) || self.commands.all(c, self.commands.exists_one(o, o.name == c.name))",
        "message": "command names must be unique"
    }
]))]
pub struct MiddlewareSpec {
    /// Number of data-plane pods. Defaults to 1; leave it out when `autoscaling` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,

    /// Container image of the data plane. Defaults to the image the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// When true the operator stops changing this Middleware's children (they keep running as they are)
    /// and reports `Reconciling=False` with reason `Paused`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,

    /// Ports and paths the data plane listens on.
    #[serde(default)]
    pub listeners: Listeners,

    /// Routes to upstream services, matched in order; the first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub routes: Vec<Route>,

    /// Connections to the backends that policies and commands use: Redis (caching), Kafka (events),
    /// PostgreSQL (commands and the outbox). Referenced Secrets must exist.
    #[serde(default)]
    pub connections: Connections,

    /// Commands accepted over HTTP (`POST /commands/<name>`), validated and recorded with their event in
    /// one PostgreSQL transaction (the transactional outbox); a relay publishes the events to Kafka. Needs
    /// `connections.postgres` and `connections.kafka`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub commands: Vec<Command>,

    /// The outbox relay and cleanup.
    #[serde(default, skip_serializing_if = "is_default")]
    pub outbox: OutboxSettings,

    /// Traces, logs and metrics.
    #[serde(default)]
    pub observability: Observability,

    /// Settings of the data-plane pods.
    #[serde(default)]
    pub pod: PodOverrides,

    /// A HorizontalPodAutoscaler for the data plane. Leave `replicas` out when this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,

    /// A PodDisruptionBudget for the data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudget>,
}

impl MiddlewareSpec {
    /// Replicas the Deployment asks for (the HPA decides when autoscaling is set).
    pub fn desired_replicas(&self) -> i32 {
        match (&self.autoscaling, self.replicas) {
            (Some(autoscaling), _) => autoscaling.min_replicas,
            (None, Some(replicas)) => replicas,
            (None, None) => 1,
        }
    }
}

fn default_http_port() -> u16 {
    8080
}

fn default_admin_port() -> u16 {
    9901
}

/// The data plane's listeners.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.http) && has(self.http.port) ? self.http.port : 8080) != (has(self.adminPort) ? self.adminPort : 9901)",
        "message": "http.port and adminPort must differ"
    },
    {
        "rule": "!has(self.grpc) || (self.grpc.port != (has(self.http) && has(self.http.port) ? self.http.port : 8080) && self.grpc.port != (has(self.adminPort) ? self.adminPort : 9901))",
        "message": "grpc.port must differ from http.port and adminPort"
    }
]))]
pub struct Listeners {
    /// The HTTP listener (HTTP/1.1 and h2c).
    #[serde(default)]
    pub http: HttpListener,
    /// An optional gRPC listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcListener>,
    /// WebSocket upgrades on a path of the HTTP listener.
    /// Not enforced yet: the WebSocket hub lands in a later version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<WebSocketListener>,
    /// Port of the admin listener (`/healthz`, `/readyz`, `/status`, `/metrics`), 1024 or above. Defaults
    /// to 9901.
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub admin_port: u16,
}

impl Default for Listeners {
    fn default() -> Self {
        Self { http: HttpListener::default(), grpc: None, websocket: None, admin_port: default_admin_port() }
    }
}

/// The HTTP listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpListener {
    /// Port, 1024 or above (the data plane runs without privileges). Defaults to 8080.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
    /// Largest request head (request line and header fields together) in bytes, 8192 to 1048576; a larger
    /// one is answered `431`. Defaults to 32768 (nginx allows four 8 KiB header buffers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8192, max = 1048576))]
    pub max_header_bytes: Option<u32>,
    /// Most header fields one request may carry, 1 to 1000; more are answered `431`. Defaults to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_headers: Option<u16>,
    /// Longest a client may take to send a request head, counted from the connection's start or the end
    /// of the previous response; then the connection is closed. Defaults to 30s (nginx: 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_read_timeout: Option<Duration>,
    /// Longest the gateway waits for the next part of a request body once it reads it; the request is then
    /// answered `408`, as is one whose route's timeout ends while the gateway waits for the client.
    /// Defaults to 60s, as nginx's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_read_timeout: Option<Duration>,
    /// Most connections a pod keeps open at once, 1 to 1000000; one more is closed as it is accepted.
    /// Defaults to 10000. A connection counts whatever it carries (HTTP/1 keeps one request at a time, an
    /// HTTP/2 connection up to 256 concurrent streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: Option<u32>,
    /// TLS on this listener: with it, the port speaks HTTPS only (HTTP/2 and HTTP/1.1 chosen by ALPN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

/// TLS termination. Certificates are read from files that are watched: a renewed certificate (a Secret
/// updated by cert-manager, a file replaced in place) is served from the next handshake on, without a
/// restart, and one that cannot be used is refused while the previous one stays in service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// Certificates with their keys, 1 to 16. A client that names a host (SNI) gets the first certificate
    /// whose subject alternative names cover it; one that names none, or a host no certificate covers,
    /// gets the first.
    #[schemars(length(min = 1, max = 16))]
    pub certificates: Vec<TlsCertificate>,
    /// Oldest protocol version accepted: `TLS12` (default) or `TLS13`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub min_version: TlsVersion,
    /// Client certificates (mutual TLS), verified against a certificate authority. The verified
    /// certificate's subject, names and hash are passed on to the upstream in `x-forwarded-client-cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<ClientCertificates>,
}

/// A certificate chain and its private key, in PEM: a `kubernetes.io/tls` Secret in the Middleware's
/// namespace (keys `tls.crt` and `tls.key`), or two files (standalone use). Exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.secretName) != (has(self.certFile) && has(self.keyFile)) && has(self.certFile) == has(self.keyFile)",
    "message": "a certificate needs exactly one of secretName or certFile with keyFile"
}]))]
pub struct TlsCertificate {
    /// A `kubernetes.io/tls` Secret in the Middleware's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// Path of the certificate chain (PEM, the server's certificate first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub cert_file: Option<String>,
    /// Path of the private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub key_file: Option<String>,
}

/// A TLS protocol version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "TLS12")]
    Tls12,
    #[serde(rename = "TLS13")]
    Tls13,
}

/// Which clients must show a certificate, and who signs them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.caSecretName) != has(self.caFile)",
    "message": "clientCertificates needs exactly one of caSecretName or caFile"
}]))]
pub struct ClientCertificates {
    /// A Secret in the Middleware's namespace whose key `ca.crt` holds the authority's certificates (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret_name: Option<String>,
    /// Path of the authority's certificates (PEM), for standalone use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub ca_file: Option<String>,
    /// `Require` (default): a client without a valid certificate fails the handshake. `Optional`: a client
    /// may show none, but one it shows must be valid.
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: ClientCertificateMode,
}

/// Whether a client certificate is required.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ClientCertificateMode {
    #[default]
    Require,
    Optional,
}

impl TlsCertificate {
    /// A certificate from a `kubernetes.io/tls` Secret.
    pub fn secret(name: impl Into<String>) -> Self {
        Self { secret_name: Some(name.into()), ..Self::default() }
    }
}

/// Secret keys of a `kubernetes.io/tls` Secret and of a CA bundle Secret.
pub mod tls_keys {
    pub const CERT: &str = "tls.crt";
    pub const KEY: &str = "tls.key";
    pub const CA: &str = "ca.crt";
}

impl ListenerTls {
    /// Every Secret the listener reads, with the field that names it.
    pub fn secret_names(&self) -> Vec<(String, &str)> {
        let mut out: Vec<(String, &str)> = self
            .certificates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.secret_name.as_deref().map(|n| (format!("spec.listeners.http.tls.certificates[{i}].secretName"), n))
            })
            .collect();
        if let Some(name) = self.client_certificates.as_ref().and_then(|c| c.ca_secret_name.as_deref()) {
            out.push(("spec.listeners.http.tls.clientCertificates.caSecretName".into(), name));
        }
        out
    }
}

impl Default for HttpListener {
    fn default() -> Self {
        Self {
            port: default_http_port(),
            max_header_bytes: None,
            max_headers: None,
            header_read_timeout: None,
            body_read_timeout: None,
            max_connections: None,
            tls: None,
        }
    }
}

impl HttpListener {
    /// [`HttpListener::max_header_bytes`] when absent.
    pub const DEFAULT_MAX_HEADER_BYTES: u32 = 32 * 1024;
    /// [`HttpListener::max_headers`] when absent.
    pub const DEFAULT_MAX_HEADERS: u16 = 100;
    /// [`HttpListener::header_read_timeout`] when absent.
    pub const DEFAULT_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
    /// [`HttpListener::body_read_timeout`] when absent.
    pub const DEFAULT_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
    /// [`HttpListener::max_connections`] when absent.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
}

/// The gRPC listener.
/// Not enforced yet: the data plane serves gRPC in a later version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrpcListener {
    /// Port of the gRPC listener, 1024 or above.
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
}

/// WebSocket upgrades on the HTTP listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebSocketListener {
    /// Path on which upgrades are accepted, e.g. `/ws`.
    #[schemars(length(min = 1, max = 256), extend("pattern" = "^/"))]
    pub path: String,
}

/// A route: which requests it takes and where they go.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Name of the route, unique in the Middleware; policies target it with `sectionName`.
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Which requests the route takes. Without it, every request.
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Where matched requests are sent.
    pub upstream: Upstream,
    /// Deadline for the whole upstream exchange. Defaults to 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retries of idempotent requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Largest accepted request body, in bytes. Defaults to 10 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_body_bytes: Option<i64>,
    /// JSON Schema (draft 2020-12) that request bodies must satisfy. A request whose body is not JSON or
    /// does not satisfy it is answered `422` with every violation and its JSON pointer, and never reaches
    /// the upstream. Requests without a body (GET, HEAD, ...) are not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_schema: Option<JsonDocument>,
}

/// Request matching. All given conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.pathPrefix) && has(self.path))",
    "message": "set at most one of pathPrefix and path"
}]))]
pub struct RouteMatch {
    /// Host names (the `Host` header without port); `*.example.com` matches one label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub hosts: Vec<String>,
    /// Path prefix, matched on segment boundaries (`/api` matches `/api` and `/api/x`, not `/apix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^/"))]
    pub path_prefix: Option<String>,
    /// Exact path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^/"))]
    pub path: Option<String>,
    /// HTTP methods, upper case. Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    /// Headers that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
}

/// An HTTP method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

/// A header condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    #[schemars(length(min = 1, max = 256), extend("pattern" = crate::common::HEADER_NAME_PATTERN))]
    pub name: String,
    /// Exact value (no control characters).
    #[schemars(extend("pattern" = crate::common::HEADER_VALUE_PATTERN))]
    pub value: String,
}

/// An upstream: a Service in the Middleware's namespace, or a URL. Exactly one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.service) != has(self.url)",
    "message": "upstream needs exactly one of service or url"
}]))]
pub struct Upstream {
    /// A Service in the Middleware's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// An absolute `http://` or `https://` URL. A path in it is put in front of the request's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^https?://[^/\\s]+(/.*)?$"), length(max = 2048))]
    pub url: Option<String>,
    /// Protocol spoken to the upstream: `HTTP1` (default) or `H2C` (HTTP/2 without TLS, e.g. for gRPC
    /// services). `https://` upstreams negotiate HTTP/2 or HTTP/1.1 with ALPN.
    #[serde(default, skip_serializing_if = "is_default")]
    pub protocol: UpstreamProtocol,
    /// When to stop sending requests to a failing upstream for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Protocol to an upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with pooled keep-alive connections.
    #[default]
    #[serde(rename = "HTTP1")]
    Http1,
    /// HTTP/2 over cleartext, multiplexed on few connections.
    #[serde(rename = "H2C")]
    H2c,
}

/// A circuit breaker: after `consecutiveFailures` failed requests in a row (connection errors, timeouts,
/// `502`, `503`, `504`) the upstream gets no requests for `openFor`; then one trial request decides whether
/// it closes again. While open, requests are answered `503` at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Failures in a row that open the breaker. Defaults to 5.
    #[serde(default = "default_consecutive_failures")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: u32,
    /// How long the breaker stays open before a trial request. Defaults to 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<Duration>,
}

fn default_consecutive_failures() -> u32 {
    5
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self { consecutive_failures: default_consecutive_failures(), open_for: None }
    }
}

/// A Service and port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Service name.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Service port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

/// Retries of idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE), bounded by a retry budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts after the first one. Defaults to 2.
    #[serde(default = "default_retry_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// Delay before the first retry, doubled for each next one, with jitter. Defaults to 25ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
    /// Upstream statuses that are retried, besides connection errors: error statuses, 400 to 599 (e.g. 429,
    /// 503). Defaults to 502, 503 and 504.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(range(min = 400, max = 599)))]
    pub on_statuses: Vec<u16>,
}

fn default_retry_attempts() -> u32 {
    2
}

/// Connections to backends. Each setting is inline or from a Secret key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Connections {
    /// Redis: the cache and sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConnection>,
    /// Kafka: events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaConnection>,
    /// PostgreSQL: commands and the outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresConnection>,
}

impl Connections {
    /// Every value in the connections, with its field path, for Secret checks and env wiring.
    pub fn values(&self) -> Vec<(&'static str, &ValueSource)> {
        let mut out = Vec::new();
        if let Some(redis) = &self.redis {
            out.push(("spec.connections.redis.url", &redis.url));
            if let Some(password) = &redis.password {
                out.push(("spec.connections.redis.password", password));
            }
            if let Some(ca) = &redis.ca_cert {
                out.push(("spec.connections.redis.caCert", ca));
            }
        }
        if let Some(kafka) = &self.kafka {
            out.push(("spec.connections.kafka.bootstrapServers", &kafka.bootstrap_servers));
            if let Some(sasl) = &kafka.sasl {
                out.push(("spec.connections.kafka.sasl.username", &sasl.username));
                out.push(("spec.connections.kafka.sasl.password", &sasl.password));
            }
            if let Some(ca) = &kafka.ca_cert {
                out.push(("spec.connections.kafka.caCert", ca));
            }
        }
        if let Some(postgres) = &self.postgres {
            out.push(("spec.connections.postgres.url", &postgres.url));
            if let Some(ca) = &postgres.ca_cert {
                out.push(("spec.connections.postgres.caCert", ca));
            }
        }
        out
    }
}

/// Redis deployment mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
}

/// A Redis connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisConnection {
    /// `redis://` or `rediss://` URL; for a Cluster, any node (others are discovered).
    pub url: ValueSource,
    /// Password, when not in the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<ValueSource>,
    /// PEM certificate(s) of the authority that signed the server's certificate, for `rediss://` to a
    /// Redis whose certificate is not signed by a public authority (the system's roots are used otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<ValueSource>,
    /// `standalone` (default) or `cluster`.
    #[serde(default)]
    pub mode: RedisMode,
    /// Deadline of one Redis operation; a slower Redis is treated as a miss (requests go to the upstream).
    /// Defaults to 250ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// A Kafka connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaConnection {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: ValueSource,
    /// SASL authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaSasl>,
    /// Use TLS to the brokers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// PEM certificate(s) of the authority that signed the brokers' certificates, when it is not a public
    /// one (the system's roots are used otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<ValueSource>,
    /// How events are produced.
    #[serde(default, skip_serializing_if = "KafkaProducer::is_default")]
    pub producer: KafkaProducer,
}

/// Producer settings. The producer is idempotent (no duplicates or reordering from its own retries) unless
/// `acks` is weakened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaProducer {
    /// `all` (default: every in-sync replica has the event before it counts as delivered), `leader`, or
    /// `none`. Anything but `all` turns idempotence off.
    #[serde(default)]
    pub acks: KafkaAcks,
    /// How long the producer waits to fill a batch. Defaults to 5ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linger: Option<Duration>,
    /// Largest batch per partition, in bytes. Defaults to 1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub batch_bytes: Option<u32>,
    /// `none` (default), `gzip`, `snappy` or `lz4`.
    #[serde(default)]
    pub compression: KafkaCompression,
    /// Events a pod may have waiting for the broker's acknowledgement; beyond it, ingest answers `503` with
    /// `Retry-After`. Defaults to 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_in_flight: Option<u32>,
    /// How long an event may wait for the broker's acknowledgement (retries included) before it counts as
    /// failed. Defaults to 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_timeout: Option<Duration>,
}

impl KafkaProducer {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Acknowledgements the producer waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum KafkaAcks {
    #[default]
    All,
    Leader,
    None,
}

/// Compression of produced batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum KafkaCompression {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
}

/// SASL mechanism.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SaslMechanism {
    #[default]
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

/// Kafka SASL settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[serde(default)]
    pub mechanism: SaslMechanism,
    /// User name.
    pub username: ValueSource,
    /// Password; use a `secretKeyRef`.
    pub password: ValueSource,
}

/// A PostgreSQL connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresConnection {
    /// `postgres://user:password@host:port/database` URL; use a `secretKeyRef`. `sslmode` in the URL is
    /// honoured (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`).
    pub url: ValueSource,
    /// Connections per pod: two command writers (one below 6) and a pool with the rest, at least 4 (the
    /// relay's listener and its two loops, and one for lookups and cleanup); each application outbox table
    /// relayed needs 2 more. Defaults to 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_connections: Option<u32>,
    /// PEM certificate of a private authority that signed the server's certificate. With it the
    /// connection requires TLS and verifies the server's name (`verify-full`) unless the URL's `sslmode`
    /// says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<ValueSource>,
    /// Longest a statement may run before the server cancels it (`statement_timeout`). Defaults to 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_timeout: Option<Duration>,
    /// Longest a request waits for a connection from the pool, and a connection attempt may take.
    /// Defaults to 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
}

/// The transactional outbox: how committed events are relayed to Kafka and how long published rows stay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxSettings {
    /// Rows claimed per relay transaction. Defaults to 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: Option<u32>,
    /// Publish attempts before a row moves to the dead-letter table `umw_outbox_dead`. Defaults to 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: Option<u32>,
    /// How often the relay looks for rows when no notification arrives (`LISTEN/NOTIFY` wakes it at
    /// once). Defaults to 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<Duration>,
    /// How long published outbox rows are kept before they are deleted. Defaults to 24h. (Command records are
    /// kept for their command's `idempotency.ttl`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
    /// The bearer token the admin endpoint `/outbox/dead` requires (the dead-lettered rows carry business
    /// data). Without it, `/outbox/dead` answers `404`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<ValueSource>,
}

/// A command: an HTTP request validated against a JSON Schema and recorded, with its event, in the outbox.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Command {
    /// Name, unique in the Middleware; served at `POST /commands/<name>`.
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// JSON Schema the command body must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<JsonDocument>,
    /// The event recorded for an accepted command.
    pub event: CommandEvent,
    /// Upstream called with the command (`POST`, same body and headers) before the event is recorded: a
    /// `2xx` answer accepts the command (a JSON answer becomes its `result`), a `4xx` rejects it (the
    /// answer is returned and remembered for idempotent replays), anything else records nothing (`502`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<Upstream>,
    /// Deduplication of retried commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
    /// Largest accepted body in bytes. Defaults to 900 KiB: the event carries the body, and Kafka producers
    /// refuse records over 1,000,000 bytes by default (such an event goes to the dead-letter table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub max_body_bytes: Option<u64>,
}

/// The event of a command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandEvent {
    /// CloudEvents `type`, e.g. `com.example.order.placed`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 256))]
    pub type_: String,
    /// Kafka topic.
    #[schemars(length(min = 1, max = 249), extend("pattern" = "^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
    /// Message key, a template over the body, e.g. `{{ data.orderId }}`. Events of one key are published
    /// in the order their commands were recorded. Defaults to the command id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_template: Option<String>,
    /// CloudEvents `source`. Defaults to `/commands/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub source: Option<String>,
}

/// Idempotency of commands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Idempotency {
    /// Request header that carries the key. Defaults to `Idempotency-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// How long a key (and the command record) is remembered. Defaults to 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Refuse commands without the header (`400`). Defaults to false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
}

/// Log format of the data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// Traces, logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Observability {
    /// OTLP/gRPC endpoint for traces, e.g. `http://otel-collector:4317`. Without it no traces are exported
    /// (the standard `OTEL_*` variables still apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^https?://"))]
    pub otlp_endpoint: Option<String>,
    /// Fraction of traces sampled, 0 to 1. Defaults to 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: Option<f64>,
    /// `json` (default) or `text`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `info,umw_dataplane=debug`. Defaults to `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

/// Pod settings of the data plane.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Compute resources of the data-plane container. Defaults to requests of 100m CPU and 64Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra annotations on the pods (e.g. for a service mesh or a log shipper).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra labels on the pods. Labels under `umw.dev/` and `app.kubernetes.io/` are the operator's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Priority class of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// A HorizontalPodAutoscaler on CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "minReplicas must not exceed maxReplicas"
}]))]
pub struct Autoscaling {
    /// Lower bound. Defaults to 1.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Upper bound.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation to aim for, in percent of the CPU request. Defaults to 80.
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: i32,
}

fn one() -> i32 {
    1
}

fn default_cpu_target() -> i32 {
    80
}

/// A PodDisruptionBudget: exactly one of `minAvailable` and `maxUnavailable`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.minAvailable) != has(self.maxUnavailable)",
        "message": "set exactly one of minAvailable and maxUnavailable"
    },
    {
        "rule": "!has(self.minAvailable) || (type(self.minAvailable) == int ? self.minAvailable >= 0 : string(self.minAvailable).matches('^([0-9]|[1-9][0-9]|100)%$'))",
        "message": "minAvailable is a number of pods (0 or more) or a percentage from 0% to 100%"
    },
    {
        "rule": "!has(self.maxUnavailable) || (type(self.maxUnavailable) == int ? self.maxUnavailable >= 0 : string(self.maxUnavailable).matches('^([0-9]|[1-9][0-9]|100)%$'))",
        "message": "maxUnavailable is a number of pods (0 or more) or a percentage from 0% to 100%"
    }
]))]
pub struct DisruptionBudget {
    /// Pods that must stay available, a number or a percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
    /// Pods that may be unavailable, a number or a percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

/// Observed state of a Middleware.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MiddlewareStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Data-plane pods that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Data-plane pods that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Data-plane pods that run the current pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,
    /// Label selector of the data-plane pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Hash of the data-plane configuration rendered for the current generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Hash of the configuration that every ready data-plane pod reports it runs; absent while they
    /// differ (during a reload) or none reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_config_hash: Option<String>,
    /// Policies attached to this Middleware, by kind and name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<AttachedPolicy>,
    /// Health of each data-plane component as the pods report it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentStatus>,
}

/// A policy in the rendered configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachedPolicy {
    /// `CachePolicy`, `EventRoute` or `AuthPolicy`.
    pub kind: String,
    /// Name of the policy.
    pub name: String,
    /// True when every ready pod runs the current configuration and reports that it enforces the policy;
    /// false when a pod running it reports that it does not; absent while waiting for the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced: Option<bool>,
    /// Why the policy is not enforced (yet), as the pods report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Health of one data-plane component, the worst over the pods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Component, e.g. `cache`, `events`.
    pub name: String,
    /// `Up`, `Degraded`, `Down` or `Starting`.
    pub state: String,
    /// What is wrong, with the pod that reports it, when not `Up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
