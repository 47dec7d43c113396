//! Checks of a configuration beyond its types: the rules the CRD schema states as CEL
//! (`x-kubernetes-validations`) and patterns, so that a configuration that never went through an API
//! server (`umw-dataplane --config examples/`) is held to the same standard, plus the cross-resource rules
//! of a bundle (policies name this Middleware and its routes).

use std::collections::BTreeSet;

use kube::ResourceExt;

use crate::Policy;
use crate::common::parse_duration;
use crate::config::Bundle;
use crate::middleware::{Route, Upstream};

/// One problem: the resource (`Kind/name`), the field path inside it, and what to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub resource: String,
    pub path: String,
    pub message: String,
}

struct Collector<'a> {
    resource: &'a str,
    out: Vec<Violation>,
}

impl Collector<'_> {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(Violation { resource: self.resource.to_string(), path: path.into(), message: message.into() });
    }

    fn duration(&mut self, path: String, value: Option<&crate::Duration>) {
        if let Some(value) = value
            && let Err(error) = value.parse()
        {
            self.push(path, error.to_string());
        }
    }
}

/// Every violation in the bundle, Middleware first.
pub fn validate(bundle: &Bundle) -> Vec<Violation> {
    let mw = &bundle.middleware;
    let resource = format!("Middleware/{}", mw.name_any());
    let mut c = Collector { resource: &resource, out: Vec::new() };
    let spec = &mw.spec;

    let listeners = &spec.listeners;
    if listeners.http.port == listeners.admin_port {
        c.push("spec.listeners", "http.port and adminPort must differ");
    }
    if let Some(grpc) = &listeners.grpc
        && (grpc.port == listeners.http.port || grpc.port == listeners.admin_port)
    {
        c.push("spec.listeners.grpc.port", "must differ from http.port and adminPort");
    }
    for (port, path) in
        [(listeners.http.port, "spec.listeners.http.port"), (listeners.admin_port, "spec.listeners.adminPort")]
    {
        if port < 1024 {
            c.push(path, "must be 1024 or above (the data plane runs without privileges)");
        }
    }
    let http = &listeners.http;
    if let Some(bytes) = http.max_header_bytes
        && !(8192..=1_048_576).contains(&bytes)
    {
        c.push("spec.listeners.http.maxHeaderBytes", "must be between 8192 and 1048576");
    }
    if let Some(count) = http.max_headers
        && !(1..=1000).contains(&count)
    {
        c.push("spec.listeners.http.maxHeaders", "must be between 1 and 1000");
    }
    if let Some(count) = http.max_connections
        && !(1..=1_000_000).contains(&count)
    {
        c.push("spec.listeners.http.maxConnections", "must be between 1 and 1000000");
    }
    c.duration("spec.listeners.http.headerReadTimeout".into(), http.header_read_timeout.as_ref());
    c.duration("spec.listeners.http.bodyReadTimeout".into(), http.body_read_timeout.as_ref());
    if let Some(tls) = &http.tls {
        tls_rules(&mut c, tls);
    }
    if let Some(ws) = &listeners.websocket
        && !ws.path.starts_with('/')
    {
        c.push("spec.listeners.websocket.path", "must start with /");
    }

    let mut names = BTreeSet::new();
    for (i, route) in spec.routes.iter().enumerate() {
        let at = format!("spec.routes[{i}]");
        if !names.insert(route.name.as_str()) {
            c.push(format!("{at}.name"), format!("route name {:?} is used twice; names must be unique", route.name));
        }
        if !is_dns_label(&route.name) {
            c.push(format!("{at}.name"), "must be lower-case letters, digits and '-', at most 63 characters");
        }
        route_rules(&mut c, &at, route);
    }
    let mut commands = BTreeSet::new();
    for (i, command) in spec.commands.iter().enumerate() {
        if !commands.insert(command.name.as_str()) {
            c.push(format!("spec.commands[{i}].name"), format!("command name {:?} is used twice", command.name));
        }
        let at = format!("spec.commands[{i}]");
        if let Some(schema) = &command.schema
            && let Err(message) = json_schema(schema)
        {
            c.push(format!("{at}.schema"), message);
        }
        if let Some(handler) = &command.handler {
            upstream_rules(&mut c, &format!("{at}.handler"), handler);
        }
        if let Some(key) = &command.event.key_template
            && let Err(e) = crate::template::check(key, &["data", "id"])
        {
            c.push(format!("{at}.event.keyTemplate"), e);
        }
        if let Some(idempotency) = &command.idempotency {
            c.duration(format!("{at}.idempotency.ttl"), idempotency.ttl.as_ref());
            if let Some(header) = &idempotency.header
                && http_token(header).is_none()
            {
                c.push(format!("{at}.idempotency.header"), format!("{header:?} is not a valid header name"));
            }
        }
    }
    if !spec.commands.is_empty() {
        // `POST /commands/{name}` and `GET /commands/{id}` are served by the commands: a route there would
        // never be reached.
        for (i, route) in spec.routes.iter().enumerate() {
            for (field, value) in [("pathPrefix", &route.matches.path_prefix), ("path", &route.matches.path)] {
                if let Some(value) = value
                    && under_commands(value)
                {
                    c.push(
                        format!("spec.routes[{i}].match.{field}"),
                        format!(
                            "{value:?} is under /commands, which spec.commands serves; give the route another path"
                        ),
                    );
                }
            }
        }
        for (connection, set) in
            [("postgres", spec.connections.postgres.is_some()), ("kafka", spec.connections.kafka.is_some())]
        {
            if !set {
                c.push(
                    "spec.commands",
                    format!(
                        "commands are recorded in PostgreSQL and relayed to Kafka: set spec.connections.{connection}"
                    ),
                );
            }
        }
    }
    let connections = &spec.connections;
    let mut sources: Vec<(&str, Option<&crate::ValueSource>)> = Vec::new();
    if let Some(redis) = &connections.redis {
        sources.extend([
            ("spec.connections.redis.url", Some(&redis.url)),
            ("spec.connections.redis.password", redis.password.as_ref()),
            ("spec.connections.redis.caCert", redis.ca_cert.as_ref()),
        ]);
    }
    if let Some(kafka) = &connections.kafka {
        sources.extend([
            ("spec.connections.kafka.bootstrapServers", Some(&kafka.bootstrap_servers)),
            ("spec.connections.kafka.caCert", kafka.ca_cert.as_ref()),
        ]);
        if let Some(sasl) = &kafka.sasl {
            sources.extend([
                ("spec.connections.kafka.sasl.username", Some(&sasl.username)),
                ("spec.connections.kafka.sasl.password", Some(&sasl.password)),
            ]);
        }
    }
    if let Some(postgres) = &connections.postgres {
        sources.extend([
            ("spec.connections.postgres.url", Some(&postgres.url)),
            ("spec.connections.postgres.caCert", postgres.ca_cert.as_ref()),
        ]);
    }
    for (path, source) in sources {
        if let Some(source) = source
            && let Err(message) = value_source(source)
        {
            c.push(path, message);
        }
    }
    if let Some(url) = spec.connections.redis.as_ref().and_then(|r| r.url.value.as_deref())
        && let Err(message) = redis_url(url)
    {
        c.push("spec.connections.redis.url", message);
    }
    if let Some(level) = &spec.observability.log_level
        && let Err(message) = log_filter(level)
    {
        c.push("spec.observability.logLevel", message);
    }
    if let Some(postgres) = &spec.connections.postgres {
        c.duration("spec.connections.postgres.statementTimeout".into(), postgres.statement_timeout.as_ref());
        c.duration("spec.connections.postgres.connectTimeout".into(), postgres.connect_timeout.as_ref());
    }
    c.duration("spec.outbox.pollInterval".into(), spec.outbox.poll_interval.as_ref());
    c.duration("spec.outbox.retention".into(), spec.outbox.retention.as_ref());
    if let Some(token) = &spec.outbox.admin_token {
        match (value_source(token), token.value.as_deref()) {
            (Err(message), _) => c.push("spec.outbox.adminToken", message),
            (Ok(()), Some("")) => c.push("spec.outbox.adminToken.value", "empty"),
            _ => {}
        }
    }
    if let Some(redis) = &spec.connections.redis {
        c.duration("spec.connections.redis.timeout".into(), redis.timeout.as_ref());
    }
    if let Some(kafka) = &spec.connections.kafka {
        c.duration("spec.connections.kafka.producer.linger".into(), kafka.producer.linger.as_ref());
        c.duration("spec.connections.kafka.producer.deliveryTimeout".into(), kafka.producer.delivery_timeout.as_ref());
    }
    if let Some(ratio) = spec.observability.sampling_ratio
        && !(0.0..=1.0).contains(&ratio)
    {
        c.push("spec.observability.samplingRatio", "must lie between 0 and 1");
    }
    if let Some(endpoint) = &spec.observability.otlp_endpoint {
        let rest = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://"));
        if rest.is_none_or(|r| r.split('/').next().is_none_or(|a| a.is_empty() || a.contains('@'))) {
            c.push("spec.observability.otlpEndpoint", "must be an http:// or https:// URL without credentials");
        }
    }
    let mut out = c.out;

    let routes: BTreeSet<&str> = spec.routes.iter().map(|r| r.name.as_str()).collect();
    policies(&bundle.cache_policies, mw, &routes, &mut out);
    policies(&bundle.event_routes, mw, &routes, &mut out);
    policies(&bundle.auth_policies, mw, &routes, &mut out);
    // What the API server's schema checks, for a configuration that comes from files.
    schema(&mut out, "Middleware", &resource, mw);
    for p in &bundle.cache_policies {
        schema(&mut out, "CachePolicy", &format!("CachePolicy/{}", p.name_any()), p);
    }
    for p in &bundle.event_routes {
        schema(&mut out, "EventRoute", &format!("EventRoute/{}", p.name_any()), p);
    }
    for p in &bundle.auth_policies {
        schema(&mut out, "AuthPolicy", &format!("AuthPolicy/{}", p.name_any()), p);
    }
    out
}

/// The first route of `mw`, short of a catch-all, that would take `POST path`: an exact `path`, or a
/// `pathPrefix` other than `/` that covers it on segment boundaries, allowing POST. A catch-all (no path,
/// or the prefix `/`) is the default for what nothing else serves, so it owns no particular path.
pub fn route_taking_post<'a>(mw: &'a crate::Middleware, path: &str) -> Option<&'a Route> {
    mw.spec.routes.iter().find(|route| {
        let m = &route.matches;
        let methods = m.methods.is_empty() || m.methods.contains(&crate::middleware::HttpMethod::Post);
        let covers = match (&m.path, &m.path_prefix) {
            (Some(exact), _) => exact == path,
            (None, Some(prefix)) => {
                let prefix = prefix.trim_end_matches('/');
                !prefix.is_empty()
                    && path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            (None, None) => false,
        };
        methods && covers
    })
}

/// Whether `path` lies under `/commands`, which a Middleware's commands serve once it defines any.
pub(crate) fn under_commands(path: &str) -> bool {
    path.trim_end_matches('/') == "/commands" || path.starts_with("/commands/")
}

fn route_rules(c: &mut Collector<'_>, at: &str, route: &Route) {
    let m = &route.matches;
    if m.path.is_some() && m.path_prefix.is_some() {
        c.push(format!("{at}.match"), "set at most one of pathPrefix and path");
    }
    for (field, value) in [("pathPrefix", &m.path_prefix), ("path", &m.path)] {
        if let Some(value) = value
            && !value.starts_with('/')
        {
            c.push(format!("{at}.match.{field}"), "must start with /");
        }
    }
    for (i, host) in m.hosts.iter().enumerate() {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        if bare.is_empty() || !bare.split('.').all(is_host_label) {
            c.push(
                format!("{at}.match.hosts[{i}]"),
                format!("{host:?} is not a host name (a wildcard is `*.` in front)"),
            );
        }
    }
    for (i, header) in m.headers.iter().enumerate() {
        if http_token(&header.name).is_none() {
            c.push(format!("{at}.match.headers[{i}].name"), format!("{:?} is not a header name", header.name));
        }
        if let Err(message) = header_value(&header.value) {
            c.push(format!("{at}.match.headers[{i}].value"), message);
        }
    }
    upstream_rules(c, &format!("{at}.upstream"), &route.upstream);
    c.duration(format!("{at}.timeout"), route.timeout.as_ref());
    if let Some(retry) = &route.retry {
        c.duration(format!("{at}.retry.backoff"), retry.backoff.as_ref());
        if retry.attempts > 10 {
            c.push(format!("{at}.retry.attempts"), "must be at most 10");
        }
        if let Some(status) = retry.on_statuses.iter().find(|s| !(400..=599).contains(*s)) {
            c.push(format!("{at}.retry.onStatuses"), format!("{status} is not an error status (400 to 599)"));
        }
    }
    if route.max_body_bytes.is_some_and(|n| n < 0) {
        c.push(format!("{at}.maxBodyBytes"), "must not be negative");
    }
    if let Some(schema) = &route.request_schema
        && let Err(message) = json_schema(schema)
    {
        c.push(format!("{at}.requestSchema"), message);
    }
}

fn tls_rules(c: &mut Collector<'_>, tls: &crate::middleware::ListenerTls) {
    let at = "spec.listeners.http.tls";
    if !(1..=16).contains(&tls.certificates.len()) {
        c.push(format!("{at}.certificates"), "needs 1 to 16 certificates");
    }
    for (i, certificate) in tls.certificates.iter().enumerate() {
        let files = (certificate.cert_file.as_deref(), certificate.key_file.as_deref());
        match (certificate.secret_name.as_deref(), files) {
            (Some(name), (None, None)) => {
                if !is_dns_subdomain(name) {
                    c.push(format!("{at}.certificates[{i}].secretName"), "must be a Secret's name");
                }
            }
            (None, (Some(cert), Some(key))) => {
                if cert.is_empty() || key.is_empty() {
                    c.push(format!("{at}.certificates[{i}]"), "certFile and keyFile must not be empty");
                }
            }
            _ => c.push(
                format!("{at}.certificates[{i}]"),
                "a certificate needs exactly one of secretName or certFile with keyFile",
            ),
        }
    }
    if let Some(clients) = &tls.client_certificates {
        match (clients.ca_secret_name.as_deref(), clients.ca_file.as_deref()) {
            (Some(name), None) if !is_dns_subdomain(name) => {
                c.push(format!("{at}.clientCertificates.caSecretName"), "must be a Secret's name");
            }
            (None, Some("")) => c.push(format!("{at}.clientCertificates.caFile"), "must not be empty"),
            (Some(_), None) | (None, Some(_)) => {}
            _ => c.push(
                format!("{at}.clientCertificates"),
                "clientCertificates needs exactly one of caSecretName or caFile",
            ),
        }
    }
}

/// A Kubernetes object name: lower-case DNS labels joined by dots, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn upstream_rules(c: &mut Collector<'_>, at: &str, upstream: &Upstream) {
    match (&upstream.service, &upstream.url) {
        (Some(_), Some(_)) | (None, None) => c.push(at.to_string(), "upstream needs exactly one of service or url"),
        (Some(service), None) => {
            if !is_dns_label(&service.name) {
                c.push(format!("{at}.service.name"), format!("{:?} is not a Service name", service.name));
            }
            if service.port == 0 {
                c.push(format!("{at}.service.port"), "must lie between 1 and 65535");
            }
        }
        (None, Some(url)) => {
            if let Err(message) = HttpUrl::parse(url) {
                c.push(format!("{at}.url"), message);
            }
        }
    }
    if let Some(breaker) = &upstream.circuit_breaker {
        c.duration(format!("{at}.circuitBreaker.openFor"), breaker.open_for.as_ref());
        if breaker.consecutive_failures == 0 {
            c.push(format!("{at}.circuitBreaker.consecutiveFailures"), "must be at least 1");
        }
    }
}

fn policies<P: Policy>(policies: &[P], mw: &crate::Middleware, routes: &BTreeSet<&str>, out: &mut Vec<Violation>) {
    for policy in policies {
        let resource = format!("{}/{}", P::kind(&()), policy.name_any());
        let mut c = Collector { resource: &resource, out: Vec::new() };
        // A policy may target several Middlewares; this configuration is about this one only.
        let own: Vec<(usize, &crate::PolicyTargetRef)> =
            policy.target_refs().iter().enumerate().filter(|(_, t)| t.name == mw.name_any()).collect();
        if own.is_empty() {
            c.push(
                "spec.targetRefs",
                format!("names no target of this configuration's Middleware {:?}", mw.name_any()),
            );
        }
        for (i, target) in own {
            if let Some(section) = &target.section_name
                && !routes.contains(section.as_str())
            {
                c.push(
                    format!("spec.targetRefs[{i}].sectionName"),
                    format!("Middleware {:?} has no route {section:?}", mw.name_any()),
                );
            }
        }
        for (field, message) in policy.rule_violations() {
            c.push(field, message);
        }
        if let Err(message) = policy.validate() {
            c.push("spec", message);
        }
        if let Err(message) = policy.validate_against(mw) {
            c.push("spec", message);
        } else if let Some(message) = policy.conflicts_with(mw) {
            c.push("spec", message);
        }
        out.extend(c.out);
    }
}

fn schema<T: serde::Serialize>(out: &mut Vec<Violation>, kind: &str, resource: &str, object: &T) {
    let Ok(document) = serde_json::to_value(object) else { return };
    for (path, message) in crate::config::schema_violations(kind, &document) {
        // Fields the rules above check with a clearer message.
        if out.iter().any(|v| v.resource == resource && v.path == path) {
            continue;
        }
        out.push(Violation { resource: resource.to_string(), path, message });
    }
}

/// An absolute `http://` or `https://` URL without credentials, as the data plane connects to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub scheme: &'static str,
    /// The authority as written (`host[:port]`), for the `Host` header.
    pub authority: String,
    pub host: String,
    /// The port written, or the scheme's default.
    pub port: u16,
    /// The path, without a trailing `/` (empty for the root).
    pub base_path: String,
}

impl HttpUrl {
    /// Parses `url`, refusing what the data plane could not connect to: another scheme, credentials, no
    /// host, a port outside 1..=65535.
    pub fn parse(url: &str) -> Result<Self, String> {
        let shown = crate::redact::url(url);
        let bad =
            |why: &str| format!("{shown:?} is not an absolute http:// or https:// URL without credentials: {why}");
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let scheme = match uri.scheme_str() {
            Some("http") => "http",
            Some("https") => "https",
            Some(_) => return Err(bad("the scheme must be http or https")),
            None => return Err(bad("no scheme")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials belong in a Secret, not in the URL"));
        }
        if authority.host().is_empty() {
            return Err(bad("no host"));
        }
        // (After the last `:` outside an IPv6 literal's brackets.)
        let port = match authority.as_str().rsplit_once(':').map(|(_, p)| p).filter(|p| !p.contains(']')) {
            None if scheme == "https" => 443,
            None => 80,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("the port must lie between 1 and 65535"))?,
        };
        Ok(Self {
            scheme,
            authority: authority.as_str().to_string(),
            host: authority.host().to_string(),
            port,
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// A JSON Schema the data plane can compile.
pub(crate) fn json_schema(schema: &crate::common::JsonDocument) -> Result<(), String> {
    jsonschema::validator_for(&serde_json::Value::Object(schema.0.clone()))
        .map(|_| ())
        .map_err(|error| format!("not a valid JSON Schema: {error}"))
}

/// A header value as HTTP allows it: no control characters (CR, LF, NUL…) but tab.
pub(crate) fn header_value(value: &str) -> Result<(), String> {
    match value.bytes().find(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        Some(_) => Err(format!("{value:?} is not a header value: it holds a control character")),
        None => Ok(()),
    }
}

/// Exactly one of `value` and `secretKeyRef` (the CRD's CEL rule, for files).
pub(crate) fn value_source(source: &crate::ValueSource) -> Result<(), String> {
    match (&source.value, &source.secret_key_ref) {
        (Some(_), None) | (None, Some(_)) => Ok(()),
        _ => Err("set exactly one of value or secretKeyRef".to_string()),
    }
}

/// A Redis URL as the Redis client reads one: `redis://`, `rediss://` (TLS), `valkey://`, `valkeys://`, or a
/// Unix socket (`redis+unix://`, `unix://`).
pub(crate) fn redis_url(url: &str) -> Result<(), String> {
    const SCHEMES: [&str; 6] = ["redis", "rediss", "valkey", "valkeys", "redis+unix", "unix"];
    // A password in the URL stays out of the message, which conditions and Events carry.
    let shown = crate::redact::url(url);
    let bad = |why: &str| format!("{shown:?} is not a Redis URL such as redis://redis:6379/0: {why}");
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    if !SCHEMES.contains(&scheme) {
        return Err(bad("the scheme must be redis, rediss, valkey, valkeys, redis+unix or unix"));
    }
    if scheme.ends_with("unix") {
        return if rest.starts_with('/') { Ok(()) } else { Err(bad("a socket URL names an absolute path")) };
    }
    let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    if let Some(port) =
        authority.as_str().rsplit_once(':').map(|(_, p)| p).filter(|p| !p.contains(']') && !p.contains('@'))
        && port.parse::<u16>().ok().filter(|&p| p != 0).is_none()
    {
        return Err(bad("the port must lie between 1 and 65535"));
    }
    Ok(())
}

/// A log filter: comma-separated directives, each a level, a target, or `target=level` (the subset of
/// the `RUST_LOG` syntax this field takes).
pub(crate) fn log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let target =
        |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':' || b == b'-');
    for directive in filter.split(',') {
        let ok = match directive.split_once('=') {
            Some((t, level)) => target(t) && LEVELS.contains(&level.to_ascii_lowercase().as_str()),
            None => target(directive),
        };
        if !ok {
            return Err(format!(
                "{directive:?} is not a log directive: write a level (info), a target (umw_dataplane) or target=level, separated by commas"
            ));
        }
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_host_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `Some` when `s` is an HTTP token (a valid header name).
pub(crate) fn http_token(s: &str) -> Option<&str> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    ok.then_some(s)
}

/// Parses a duration field that [`validate`] has accepted, falling back to `default` when it is absent.
pub fn duration_or(value: Option<&crate::Duration>, default: std::time::Duration) -> std::time::Duration {
    value.and_then(|v| parse_duration(&v.0).ok()).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(yaml: &str) -> Bundle {
        Bundle::from_yaml(yaml).unwrap()
    }

    #[test]
    fn the_cel_rules_hold_without_an_api_server() {
        let b = bundle(
            "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: shop}\nspec:\n  listeners: {http: {port: 9901}}\n  routes:\n    - name: a\n      match: {path: /x, pathPrefix: /y, headers: [{name: 'bad header', value: v}]}\n      upstream: {url: http://x, service: {name: s, port: 80}}\n      timeout: 0s\n    - name: a\n      upstream: {url: 'ftp://x'}\n      requestSchema: {type: 12}\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: c}\nspec: {targetRefs: [{name: other, sectionName: elsewhere}, {name: shop, sectionName: nope}], rules: [{ttl: 1s}]}\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: d}\nspec: {targetRefs: [{name: other}], rules: [{ttl: 1s}]}\n",
        );
        let found: Vec<String> =
            validate(&b).iter().map(|v| format!("{} {}: {}", v.resource, v.path, v.message)).collect();
        for expected in [
            "Middleware/shop spec.listeners: http.port and adminPort must differ",
            "Middleware/shop spec.routes[0].match: set at most one of pathPrefix and path",
            "Middleware/shop spec.routes[0].match.headers[0].name:",
            "Middleware/shop spec.routes[0].upstream: upstream needs exactly one of service or url",
            "Middleware/shop spec.routes[0].timeout: duration \"0s\" must be greater than zero",
            "Middleware/shop spec.routes[1].name: route name \"a\" is used twice",
            "Middleware/shop spec.routes[1].upstream.url:",
            "Middleware/shop spec.routes[1].requestSchema: not a valid JSON Schema",
            "CachePolicy/d spec.targetRefs: names no target of this configuration's Middleware \"shop\"",
            "CachePolicy/c spec.targetRefs[1].sectionName: Middleware \"shop\" has no route \"nope\"",
        ] {
            assert!(found.iter().any(|f| f.starts_with(expected)), "missing {expected:?} in {found:#?}");
        }
        assert_eq!(found.len(), 10, "{found:#?}");
    }

    #[test]
    fn tls_certificates_name_a_secret_or_two_files() {
        let tls = |tls: &str| {
            let b = bundle(&format!(
                "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop}}\nspec:\n  listeners: {{http: {{tls: {tls}}}}}\n"
            ));
            validate(&b).iter().map(|v| format!("{}: {}", v.path, v.message)).collect::<Vec<_>>()
        };
        assert_eq!(
            tls("{certificates: [{secretName: shop-tls}, {certFile: a.crt, keyFile: a.key}]}"),
            Vec::<String>::new()
        );
        assert_eq!(
            tls("{certificates: [{secretName: shop-tls, certFile: a.crt, keyFile: a.key}, {certFile: a.crt}, {}]}"),
            [0, 1, 2].map(|i| format!(
                "spec.listeners.http.tls.certificates[{i}]: a certificate needs exactly one of secretName or certFile with keyFile"
            ))
        );
        assert_eq!(tls("{certificates: []}"), ["spec.listeners.http.tls.certificates: needs 1 to 16 certificates"]);
        assert_eq!(
            tls("{certificates: [{secretName: Shop_TLS}], clientCertificates: {caSecretName: ca, caFile: ca.crt}}"),
            [
                "spec.listeners.http.tls.certificates[0].secretName: must be a Secret's name",
                "spec.listeners.http.tls.clientCertificates: clientCertificates needs exactly one of caSecretName or caFile"
            ]
        );
    }

    #[test]
    fn an_ingest_path_a_route_serves_is_a_conflict_and_a_catch_all_owns_nothing() {
        let yaml = |route_match: &str, path: &str| {
            format!(
                "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop}}\nspec:\n  connections:\n    kafka: {{bootstrapServers: {{value: 127.0.0.1:9092}}}}\n  routes:\n    - {{name: all, match: {{pathPrefix: /}}, upstream: {{url: 'http://x'}}}}\n    - {{name: orders, match: {route_match}, upstream: {{url: 'http://x'}}}}\n---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {{name: e}}\nspec:\n  targetRefs: [{{name: shop}}]\n  source: {{http: {{path: {path}}}}}\n  destination: {{kafka: {{topic: orders}}}}\n"
            )
        };
        let conflicts = |route_match: &str, path: &str| {
            validate(&bundle(&yaml(route_match, path))).iter().any(|v| v.message.contains("already served by route"))
        };
        assert!(conflicts("{path: /orders}", "/orders"));
        assert!(conflicts("{pathPrefix: /orders}", "/orders/in"));
        assert!(conflicts("{pathPrefix: /orders/, methods: [GET, POST]}", "/orders"));
        assert!(!conflicts("{pathPrefix: /orders}", "/ordersx"), "segment boundaries");
        assert!(!conflicts("{path: /orders, methods: [GET]}", "/orders"), "the route does not take POST");
        assert!(!conflicts("{path: /other}", "/events/orders"), "only the catch-all covers it");
    }

    #[test]
    fn routes_under_commands_are_refused_when_commands_are_defined() {
        let yaml = |commands: &str| {
            format!(
                "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop}}\nspec:\n  connections:\n    postgres: {{url: {{value: 'postgres://x'}}}}\n    kafka: {{bootstrapServers: {{value: 127.0.0.1:9092}}}}\n  routes:\n    - {{name: a, match: {{pathPrefix: /commands}}, upstream: {{url: 'http://x'}}}}\n    - {{name: b, match: {{path: /commands/place-order}}, upstream: {{url: 'http://x'}}}}\n    - {{name: c, match: {{pathPrefix: /commandsx}}, upstream: {{url: 'http://x'}}}}\n    - {{name: d, match: {{pathPrefix: /}}, upstream: {{url: 'http://x'}}}}\n{commands}"
            )
        };
        let ingest = "---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {name: e}\nspec:\n  targetRefs: [{name: shop}]\n  source: {http: {path: /commands/place-order}}\n  destination: {kafka: {topic: orders}}\n";
        let commands = "  commands:\n    - {name: place-order, event: {topic: orders, type: order.placed}}\n";
        let found: Vec<String> = validate(&bundle(&(yaml(commands) + ingest)))
            .iter()
            .map(|v| format!("{} {}: {}", v.resource, v.path, v.message))
            .collect();
        assert_eq!(
            found,
            [
                "Middleware/shop spec.routes[0].match.pathPrefix: \"/commands\" is under /commands, which spec.commands serves; give the route another path",
                "Middleware/shop spec.routes[1].match.path: \"/commands/place-order\" is under /commands, which spec.commands serves; give the route another path",
                "EventRoute/e spec: spec.source.http.path: \"/commands/place-order\" is under /commands, which the commands of Middleware \"shop\" serve; give the route another path",
            ]
        );
        assert_eq!(validate(&bundle(&yaml(""))), vec![], "without commands the paths are the routes'");
        let without_commands = validate(&bundle(&(yaml("") + ingest)));
        assert_eq!(without_commands.len(), 1, "{without_commands:?}");
        assert!(without_commands[0].message.contains("already served by route \"a\""), "{without_commands:?}");
    }

    #[test]
    fn redis_urls_are_what_the_redis_client_reads() {
        for good in ["redis://redis:6379/0", "rediss://:pw@r.example:6380", "redis://r", "unix:///run/redis.sock"] {
            assert_eq!(redis_url(good), Ok(()), "{good}");
        }
        for bad in ["not a url", "http://redis:6379", "redis://", "redis://r:99999", "unix://relative"] {
            assert!(redis_url(bad).is_err(), "{bad}");
        }
        let message = redis_url("redis://:s3cret@r:99999").unwrap_err();
        assert!(!message.contains("s3cret") && message.contains("redis://:***@r:99999"), "{message}");
    }

    #[test]
    fn upstream_urls_are_parsed_as_the_data_plane_connects_to_them() {
        let url = HttpUrl::parse("https://api.example.com/v1/").unwrap();
        assert_eq!(
            (url.scheme, url.host.as_str(), url.port, url.base_path.as_str()),
            ("https", "api.example.com", 443, "/v1")
        );
        let url = HttpUrl::parse("http://[::1]:9000").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.authority.as_str()), ("[::1]", 9000, "[::1]:9000"));
        assert_eq!(HttpUrl::parse("http://[::1]").unwrap().port, 80);
        for (url, why) in [
            ("http://127.0.0.1:99999", "the port must lie between 1 and 65535"),
            ("http://127.0.0.1:0", "the port must lie between 1 and 65535"),
            ("http://127.0.0.1:", "the port must lie between 1 and 65535"),
            ("http://[::1", "invalid"),
            ("http://user:pw@127.0.0.1", "credentials belong in a Secret"),
            ("ftp://x", "the scheme must be http or https"),
            ("/relative", "no scheme"),
            ("http://x y", "invalid"),
        ] {
            let error = HttpUrl::parse(url).expect_err(url);
            assert!(error.contains(why), "{url}: {error}");
        }
    }

    #[test]
    fn values_the_data_plane_cannot_use_are_refused_with_their_field() {
        let b = bundle(
            "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: shop}\nspec:\n  routes:\n    - name: a\n      match: {headers: [{name: x-tenant, value: \"a\\r\\nb\"}]}\n      upstream: {url: 'http://127.0.0.1:99999'}\n  connections:\n    redis: {url: {}}\n    postgres: {url: {value: 'postgres://x'}}\n    kafka: {bootstrapServers: {value: 127.0.0.1:9092}}\n  commands:\n    - {name: c, schema: {type: 5}, event: {topic: t, type: x}}\n  observability: {logLevel: ' '}\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: c}\nspec: {targetRefs: [{name: shop}], rules: [{ttl: 1s, key: {headers: ['bad header']}}], invalidation: {adminApi: true, adminToken: {value: ''}}}\n---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {name: e}\nspec:\n  targetRefs: [{name: shop}]\n  source: {kafka: {topic: t}}\n  destination: {http: {url: 'http://[::1', headers: {x-a: \"a\\nb\"}}}\n  schema: {type: nope}\n",
        );
        let found: Vec<String> = validate(&b).iter().map(|v| format!("{} {}", v.resource, v.path)).collect();
        for expected in [
            "Middleware/shop spec.routes[0].match.headers[0].value",
            "Middleware/shop spec.routes[0].upstream.url",
            "Middleware/shop spec.connections.redis.url",
            "Middleware/shop spec.commands[0].schema",
            "Middleware/shop spec.observability.logLevel",
            "CachePolicy/c spec.rules[0].key.headers[0]",
            "CachePolicy/c spec.invalidation.adminToken.value",
            "EventRoute/e spec.schema",
            "EventRoute/e spec.destination.http.url",
            "EventRoute/e spec.destination.http.headers.x-a",
        ] {
            assert!(found.iter().any(|f| f == expected), "missing {expected:?} in {found:#?}");
        }
    }

    #[test]
    fn log_filters_take_levels_targets_and_target_levels() {
        for good in ["info", "warn,umw_dataplane=debug", "umw_dataplane::proxy=TRACE,off"] {
            assert_eq!(log_filter(good), Ok(()), "{good}");
        }
        for bad in ["", " ", "info,", "x=loud", "a b"] {
            assert!(log_filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_good_configuration_has_no_violations() {
        let b = bundle(
            "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: shop}\nspec:\n  routes:\n    - name: a\n      match: {pathPrefix: /a, hosts: ['*.example.com'], headers: [{name: x-tenant, value: t}]}\n      upstream: {url: 'http://127.0.0.1:9000/base', circuitBreaker: {openFor: 5s}}\n      timeout: 2s\n      retry: {attempts: 2, backoff: 10ms}\n",
        );
        assert_eq!(validate(&b), vec![]);
    }
}
