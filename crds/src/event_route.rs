//! `EventRoute`: where events come from, where they go, filters, retries and the dead-letter topic.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Duration, JsonDocument, PolicyTargetRef};
use crate::policy::{Policy, PolicyStatus};

/// Routes events from one source to one destination through a Middleware.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "umw.dev",
    version = "v1alpha1",
    kind = "EventRoute",
    plural = "eventroutes",
    singular = "eventroute",
    shortname = "evroute",
    category = "umw",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Routes events through a Middleware: from one source (HTTP ingest, a Kafka topic, an outbox table) to one destination (a Kafka topic, an HTTP webhook, a WebSocket room), with filters, retries and a dead-letter topic. WebSocket rooms are accepted but not enforced yet; the Enforced condition says so.",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source", priority = 1),
    printcolumn(name = "Accepted", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(name = "Enforced", type_ = "string", json_path = ".status.conditions[?(@.type==\"Enforced\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.targetRefs.all(t, self.targetRefs.exists_one(o, o.name == t.name && (has(o.sectionName) ? o.sectionName : '') == (has(t.sectionName) ? t.sectionName : '')))",
        "message": "targetRefs must not name the same target twice"
    },
    {
        "rule": "self.targetRefs.all(t, !has(t.sectionName))",
        "message": "event routes attach to a whole Middleware: remove targetRefs[].sectionName"
    }
]))]
pub struct EventRouteSpec {
    /// The Middlewares that run this route. `sectionName` is not used by event routes.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<PolicyTargetRef>,
    /// Where events come from: exactly one of `http`, `kafka`, `outbox`.
    pub source: EventSource,
    /// Where events go: exactly one of `kafka`, `http`, `websocket`.
    pub destination: EventDestination,
    /// Only events that pass every given condition are delivered; others are acknowledged and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<EventFilter>,
    /// Delivery retries before the dead-letter topic.
    #[serde(default)]
    pub retry: EventRetry,
    /// Kafka topic that receives events whose delivery failed after all retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
    /// CloudEvents mode on Kafka: `structured` (JSON envelope) or `binary` (`ce_*` headers). Defaults to
    /// `binary`.
    #[serde(default)]
    pub format: EventFormat,
    /// JSON Schema that the event `data` must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<JsonDocument>,
}

/// Event source: exactly one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.http) ? 1 : 0) + (has(self.kafka) ? 1 : 0) + (has(self.outbox) ? 1 : 0) == 1",
    "message": "source needs exactly one of http, kafka and outbox"
}]))]
pub struct EventSource {
    /// `POST` to a path of the HTTP listener publishes an event (`202` once the broker acknowledged it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// A Kafka topic read by a consumer group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSource>,
    /// Rows of an application-owned outbox table, relayed to the Kafka destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxSource>,
}

/// HTTP ingest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// Path, e.g. `/events/orders`.
    #[schemars(length(min = 1, max = 256), extend("pattern" = "^/"))]
    pub path: String,
}

/// A Kafka topic and consumer group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSource {
    /// Topic.
    #[schemars(length(min = 1, max = 249), extend("pattern" = "^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
    /// Consumer group. Defaults to `umw.<namespace>.<event route name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// An application-owned outbox table (Debezium's layout by default), in the database of the Middleware's
/// `connections.postgres`. Each row becomes one event on the destination topic, keyed by the aggregate
/// id; published rows are deleted (or marked, with `columns.publishedAt`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxSource {
    /// The connection the table is read through. Only `postgres` (the Middleware's
    /// `connections.postgres`) exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["postgres"]))]
    pub connection: Option<String>,
    /// Schema of the table. Defaults to `public`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub schema: Option<String>,
    /// Table name.
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub table: String,
    /// Column names; the defaults are Debezium's outbox columns.
    #[serde(default)]
    pub columns: OutboxColumns,
}

/// Which column holds what. Names are lower-case SQL identifiers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxColumns {
    /// Unique event id, the CloudEvents `id`. Defaults to `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub id: Option<String>,
    /// Aggregate type, the CloudEvents `source` (`/<aggregate type>`). Defaults to `aggregatetype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub aggregate_type: Option<String>,
    /// Aggregate id: the Kafka key and the CloudEvents `subject`. Defaults to `aggregateid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub aggregate_id: Option<String>,
    /// Event type, the CloudEvents `type`. Defaults to `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub type_: Option<String>,
    /// Payload (`jsonb`, `json`, `text` or `bytea`), the event data. Defaults to `payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub payload: Option<String>,
    /// A `jsonb` object of extra Kafka headers. None by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub headers: Option<String>,
    /// Column giving the insertion order (a `bigserial` or a timestamp); events of one aggregate are
    /// published in this order. Defaults to the id column, which keeps order only if ids increase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub position: Option<String>,
    /// A nullable timestamp column the relay sets when a row is published; published rows are then
    /// deleted after `spec.outbox.retention` of the Middleware. Without it, rows are deleted once
    /// published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = "^[a-z_][a-z0-9_]*$"))]
    pub published_at: Option<String>,
}

/// Event destination: exactly one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.kafka) ? 1 : 0) + (has(self.http) ? 1 : 0) + (has(self.websocket) ? 1 : 0) == 1",
    "message": "destination needs exactly one of kafka, http and websocket"
}]))]
pub struct EventDestination {
    /// A Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaDestination>,
    /// An HTTP webhook, called with CloudEvents headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpDestination>,
    /// A WebSocket room. Not enforced yet: lands with the WebSocket hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<WebSocketDestination>,
}

/// A Kafka topic to publish to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaDestination {
    /// Topic.
    #[schemars(length(min = 1, max = 249), extend("pattern" = "^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
    /// Message key, a template over the event, e.g. `{{ data.customerId }}`. Without it, the event id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_template: Option<String>,
}

/// A webhook.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpDestination {
    /// `http://` or `https://` URL.
    #[schemars(extend("pattern" = "^https?://[^/\\s]+(/.*)?$"), length(max = 2048))]
    pub url: String,
    /// Deadline of one delivery attempt. Defaults to 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Extra request headers. Values here are stored in the EventRoute and the data plane's ConfigMap: put
    /// credentials in `headersFrom`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Extra request headers whose values are Secret keys (`Authorization: Bearer ...`), read at run time;
    /// a header may not be in both maps.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers_from: BTreeMap<String, crate::SecretKeyRef>,
}

/// A WebSocket room.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebSocketDestination {
    /// Room name; a template over the event, e.g. `orders-{{ data.customerId }}`.
    #[schemars(length(min = 1, max = 256))]
    pub room: String,
}

/// Event filter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventFilter {
    /// CloudEvents `type` values let through. Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// CloudEvents `source` values let through. Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// Conditions on the event data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<DataMatch>,
}

/// A condition on the event data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataMatch {
    /// JSON Pointer into `data`, e.g. `/status`.
    #[schemars(extend("pattern" = "^(/[^/]*)+$"))]
    pub pointer: String,
    /// The value, compared as JSON text (`"paid"`, `42`, `true`).
    pub equals: String,
}

/// Delivery retries: exponential backoff with full jitter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventRetry {
    /// Attempts in all, the first included. Defaults to 5.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// First backoff. Defaults to 100ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff: Option<Duration>,
    /// Largest backoff. Defaults to 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<Duration>,
}

impl Default for EventRetry {
    fn default() -> Self {
        Self { max_attempts: default_attempts(), initial_backoff: None, max_backoff: None }
    }
}

fn default_attempts() -> u32 {
    5
}

/// The dead-letter topic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Kafka topic. Its messages carry the original topic, partition, offset, error and attempt count as
    /// headers.
    #[schemars(length(min = 1, max = 249), extend("pattern" = "^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
}

/// CloudEvents mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EventFormat {
    #[default]
    Binary,
    Structured,
}

/// The consumer group of a Kafka source without one: `umw.<namespace>.<event route name>`.
pub fn default_group(route: &EventRoute) -> String {
    use kube::ResourceExt;
    format!("umw.{}.{}", route.namespace().unwrap_or_default(), route.name_any())
}

impl Policy for EventRoute {
    fn target_refs(&self) -> &[PolicyTargetRef] {
        &self.spec.target_refs
    }

    fn set_target_refs(&mut self, refs: Vec<PolicyTargetRef>) {
        self.spec.target_refs = refs;
    }

    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }

    /// Two event routes conflict when they claim the same ingest path or the same topic and group.
    fn conflict_key(&self, _target: &PolicyTargetRef) -> String {
        let source = &self.spec.source;
        if let Some(http) = &source.http {
            format!("http:{}", http.path)
        } else if let Some(kafka) = &source.kafka {
            let group = kafka.group.clone().unwrap_or_else(|| default_group(self));
            format!("kafka:{}:{group}", kafka.topic)
        } else if let Some(outbox) = &source.outbox {
            format!("outbox:{}.{}", outbox.schema.as_deref().unwrap_or("public"), outbox.table)
        } else {
            String::new()
        }
    }

    fn secret_key_refs(&self) -> Vec<(&'static str, &crate::SecretKeyRef)> {
        let webhook = self.spec.destination.http.as_ref();
        webhook
            .into_iter()
            .flat_map(|w| w.headers_from.values())
            .map(|r| ("spec.destination.http.headersFrom", r))
            .collect()
    }

    fn not_enforced_fields(&self) -> Vec<&'static str> {
        // WebSocket rooms land with the hub.
        let mut fields = Vec::new();
        if self.spec.destination.websocket.is_some() {
            fields.push("spec.destination.websocket");
        }
        fields
    }

    fn conflicts_with(&self, middleware: &crate::Middleware) -> Option<String> {
        let http = self.spec.source.http.as_ref()?;
        let route = crate::validate::route_taking_post(middleware, &http.path)?;
        Some(format!(
            "spec.source.http.path: POST {} is already served by route {:?} of Middleware {:?}; \
             the Middleware's routes own their paths: give the ingest another path, or narrow the route",
            http.path,
            route.name,
            kube::ResourceExt::name_any(middleware)
        ))
    }

    fn validate_against(&self, middleware: &crate::Middleware) -> Result<(), String> {
        let connections = &middleware.spec.connections;
        let spec = &self.spec;
        let kafka = spec.source.kafka.is_some() || spec.destination.kafka.is_some() || spec.dead_letter.is_some();
        if kafka && connections.kafka.is_none() {
            return Err(crate::policy::needs_connection(
                "a Kafka source, destination or dead-letter topic",
                "kafka",
                middleware,
            ));
        }
        if spec.source.outbox.is_some() && connections.postgres.is_none() {
            return Err(crate::policy::needs_connection("an outbox source", "postgres", middleware));
        }
        if let Some(http) = &spec.source.http
            && !middleware.spec.commands.is_empty()
            && crate::validate::under_commands(&http.path)
        {
            return Err(format!(
                "spec.source.http.path: {:?} is under /commands, which the commands of Middleware {:?} serve; give the route another path",
                http.path,
                kube::ResourceExt::name_any(middleware)
            ));
        }
        Ok(())
    }

    fn rule_violations(&self) -> Vec<(String, String)> {
        use crate::validate::{HttpUrl, header_value, http_token, json_schema};
        let spec = &self.spec;
        let mut out = Vec::new();
        if let Some(schema) = &spec.schema
            && let Err(message) = json_schema(schema)
        {
            out.push(("spec.schema".to_string(), message));
        }
        if let Some(webhook) = &spec.destination.http {
            if let Err(message) = HttpUrl::parse(&webhook.url) {
                out.push(("spec.destination.http.url".to_string(), message));
            }
            for (name, value) in &webhook.headers {
                if http_token(name).is_none() {
                    out.push((
                        format!("spec.destination.http.headers.{name}"),
                        format!("{name:?} is not a header name"),
                    ));
                }
                if let Err(message) = header_value(value) {
                    out.push((format!("spec.destination.http.headers.{name}"), message));
                }
            }
            for name in webhook.headers_from.keys() {
                if http_token(name).is_none() {
                    out.push((
                        format!("spec.destination.http.headersFrom.{name}"),
                        format!("{name:?} is not a header name"),
                    ));
                }
                if webhook.headers.keys().any(|h| h.eq_ignore_ascii_case(name)) {
                    out.push((
                        format!("spec.destination.http.headersFrom.{name}"),
                        "also in headers: set a header in one of the two".to_string(),
                    ));
                }
            }
        }
        out
    }

    fn validate(&self) -> Result<(), String> {
        let spec = &self.spec;
        if let Some(section) = spec.target_refs.iter().find_map(|t| t.section_name.as_ref()) {
            return Err(format!(
                "targetRefs[].sectionName ({section:?}) does not apply to an EventRoute: event routes attach to a whole Middleware; remove it"
            ));
        }
        if let Some(key) = spec.destination.kafka.as_ref().and_then(|k| k.key_template.as_deref()) {
            crate::template::check(key, &["data", "id", "type", "source", "subject", "ext"])
                .map_err(|e| format!("spec.destination.kafka.keyTemplate: {e}"))?;
        }
        for (field, value) in [
            ("spec.retry.initialBackoff", spec.retry.initial_backoff.as_ref()),
            ("spec.retry.maxBackoff", spec.retry.max_backoff.as_ref()),
            ("spec.destination.http.timeout", spec.destination.http.as_ref().and_then(|h| h.timeout.as_ref())),
        ] {
            if let Some(value) = value {
                value.parse().map_err(|e| format!("{field}: {e}"))?;
            }
        }
        if spec.dead_letter.is_some() && spec.source.http.is_some() && spec.destination.kafka.is_some() {
            return Err("spec.deadLetter: events ingested over HTTP into Kafka are acknowledged by the broker or refused to the caller (503), never dead-lettered; remove deadLetter (it applies to Kafka sources and to webhook destinations)".into());
        }
        if spec.source.outbox.is_some() {
            if spec.destination.kafka.is_none() {
                return Err(
                    "spec.destination: an outbox source is relayed to a Kafka topic; set destination.kafka".into()
                );
            }
            if let Some(outbox) = &spec.source.outbox
                && outbox.table.starts_with("umw_")
            {
                return Err(format!(
                    "spec.source.outbox.table: {} is the data plane's own table (commands' events are relayed without an EventRoute); name an application's table",
                    outbox.table
                ));
            }
            for (field, set) in [
                ("spec.filter", spec.filter.is_some()),
                ("spec.schema (the event route's JSON Schema)", spec.schema.is_some()),
                ("spec.deadLetter", spec.dead_letter.is_some()),
                (
                    "spec.destination.kafka.keyTemplate (the key is the aggregate id)",
                    spec.destination.kafka.as_ref().is_some_and(|k| k.key_template.is_some()),
                ),
                ("spec.retry (retries follow spec.outbox of the Middleware)", spec.retry != EventRetry::default()),
            ] {
                if set {
                    return Err(format!(
                        "{field} does not apply to an outbox source: every committed row is relayed, and rows that keep failing move to the table umw_outbox_dead; remove it"
                    ));
                }
            }
        }
        if let Some(filter) = &spec.filter {
            for (i, m) in filter.data.iter().enumerate() {
                serde_json::from_str::<serde_json::Value>(&m.equals).map_err(|e| {
                    format!(
                        "spec.filter.data[{i}].equals: {:?} is not JSON text (write strings quoted: '\"paid\"'): {e}",
                        m.equals
                    )
                })?;
            }
        }
        Ok(())
    }
}
