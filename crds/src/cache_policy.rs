//! `CachePolicy`: response caching for routes of a Middleware.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Duration, PolicyTargetRef};
use crate::policy::{Policy, PolicyStatus, section_key};

/// Response caching for the routes of one or more Middlewares.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "umw.dev",
    version = "v1alpha1",
    kind = "CachePolicy",
    plural = "cachepolicies",
    singular = "cachepolicy",
    shortname = "cachepol",
    category = "umw",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Response caching for routes of a Middleware: TTL with jitter, negative caching, stale-while-revalidate, cache keys, single-flight, invalidation and warm-up.",
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
#[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.targetRefs.all(t, self.targetRefs.exists_one(o, o.name == t.name && (has(o.sectionName) ? o.sectionName : '') == (has(t.sectionName) ? t.sectionName : '')))",
        "message": "targetRefs must not name the same target twice"
    }]))]
pub struct CachePolicySpec {
    /// The Middlewares (and optionally routes) this policy applies to.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<PolicyTargetRef>,
    /// Where entries live. Defaults to `redis` when the Middleware has a Redis connection, else `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<CacheBackend>,
    /// Caching rules, matched in order; the first match decides.
    #[schemars(length(min = 1, max = 64))]
    pub rules: Vec<CacheRule>,
    /// How entries are removed before they expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidation: Option<Invalidation>,
    /// Paths fetched at start (before the pod reports ready) and on an interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Warmup>,
}

/// Where cache entries live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CacheBackend {
    /// In the pod only: fast, lost on restart, not shared between replicas.
    Memory,
    /// Redis, shared by all replicas.
    Redis,
    /// A small in-pod tier in front of Redis, kept coherent through Redis pub/sub.
    Tiered,
}

/// One caching rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheRule {
    /// Which requests the rule covers. Without it, every GET and HEAD.
    #[serde(default, rename = "match")]
    pub matches: CacheMatch,
    /// How long a response is fresh.
    pub ttl: Duration,
    /// Random spread added to `ttl`, in percent, so entries written together do not expire together.
    /// Defaults to 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub jitter_percent: Option<u8>,
    /// TTL of cached negative responses (see `negativeStatuses`). Without it they are not cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_ttl: Option<Duration>,
    /// Statuses cached as negative responses (400 to 599). Defaults to 404 and 410.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 400, max = 599)))]
    pub negative_statuses: Vec<u16>,
    /// After expiry, serve the stale entry for this long while one request refreshes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate: Option<Duration>,
    /// After expiry, serve the stale entry for this long when the upstream fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error: Option<Duration>,
    /// What goes into the cache key besides method, host and path.
    #[serde(default)]
    pub key: CacheKey,
    /// Largest response body that is cached, in bytes. Defaults to 1 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_entry_bytes: Option<i64>,
    /// Coalescing of concurrent misses for one key.
    #[serde(default)]
    pub single_flight: SingleFlight,
    /// Tags stored with each entry, for invalidation by tag; templates over the request, e.g.
    /// `product:{{ path.1 }}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Requests a cache rule covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheMatch {
    /// Path prefix, on segment boundaries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = "^/"))]
    pub path_prefix: Option<String>,
    /// Methods; only GET and HEAD are cacheable. Defaults to both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub methods: Vec<CacheableMethod>,
}

/// A cacheable HTTP method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum CacheableMethod {
    Get,
    Head,
}

/// Parts of the request in the cache key. `Vary` response headers are always honoured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheKey {
    /// Query parameters in the key; others are ignored. Empty means the whole query string.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<String>,
    /// Request headers in the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = crate::common::HEADER_NAME_PATTERN)))]
    pub headers: Vec<String>,
}

/// Coalescing of concurrent misses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SingleFlight {
    /// One upstream request per key at a time in a pod. Defaults to true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Also across pods, through a short Redis lock.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub distributed: bool,
    /// Longest wait for another request's result before going upstream anyway. Defaults to 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_timeout: Option<Duration>,
}

impl Default for SingleFlight {
    fn default() -> Self {
        Self { enabled: true, distributed: false, lock_timeout: None }
    }
}

fn yes() -> bool {
    true
}

/// Removal of entries before they expire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.adminApi) || !self.adminApi || has(self.adminToken)",
    "message": "adminApi needs an adminToken"
}]))]
pub struct Invalidation {
    /// Serve the admin API (`POST /cache/invalidate` on the admin port) for invalidation by key, prefix and
    /// tag, for callers that present `adminToken` as a bearer token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin_api: bool,
    /// The bearer token of the admin API; use a `secretKeyRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<crate::ValueSource>,
    /// Events that invalidate entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<InvalidationEvent>,
}

/// Events from a Kafka topic that invalidate entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.keyTemplate) || has(self.tagTemplate) || has(self.prefixTemplate)",
    "message": "set at least one of keyTemplate, prefixTemplate and tagTemplate"
}]))]
pub struct InvalidationEvent {
    /// Kafka topic.
    #[schemars(length(min = 1, max = 249))]
    pub topic: String,
    /// Only events of this CloudEvents type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Key to drop, a template over the event, e.g. `GET:/products/{{ data.id }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_template: Option<String>,
    /// Key prefix to drop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_template: Option<String>,
    /// Tag whose entries are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_template: Option<String>,
}

/// Warm-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Warmup {
    /// Paths fetched through the gateway.
    #[schemars(length(min = 1, max = 1000))]
    pub paths: Vec<String>,
    /// Refetch interval. Without it, only at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
}

impl Policy for CachePolicy {
    fn target_refs(&self) -> &[PolicyTargetRef] {
        &self.spec.target_refs
    }

    fn set_target_refs(&mut self, refs: Vec<PolicyTargetRef>) {
        self.spec.target_refs = refs;
    }

    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }

    fn conflict_key(&self, target: &PolicyTargetRef) -> String {
        section_key(target)
    }

    fn validate_against(&self, middleware: &crate::Middleware) -> Result<(), String> {
        if self.spec.invalidation.as_ref().is_some_and(|i| !i.events.is_empty())
            && middleware.spec.connections.kafka.is_none()
        {
            return Err(crate::policy::needs_connection("invalidation by events", "kafka", middleware));
        }
        if middleware.spec.connections.redis.is_some() {
            return Ok(());
        }
        if let Some(backend @ (CacheBackend::Redis | CacheBackend::Tiered)) = self.spec.backend {
            return Err(crate::policy::needs_connection(&format!("backend {backend:?}"), "redis", middleware));
        }
        if self.spec.rules.iter().any(|r| r.single_flight.distributed) {
            return Err(crate::policy::needs_connection("distributed single-flight", "redis", middleware));
        }
        Ok(())
    }

    fn rule_violations(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(invalidation) = &self.spec.invalidation
            && invalidation.admin_api
            && invalidation.admin_token.is_none()
        {
            out.push(("spec.invalidation".to_string(), "adminApi needs an adminToken".to_string()));
        }
        if self.spec.rules.is_empty() {
            out.push(("spec.rules".to_string(), "needs at least one rule".to_string()));
        }
        for (i, rule) in self.spec.rules.iter().enumerate() {
            for (j, header) in rule.key.headers.iter().enumerate() {
                if crate::validate::http_token(header).is_none() {
                    out.push((format!("spec.rules[{i}].key.headers[{j}]"), format!("{header:?} is not a header name")));
                }
            }
        }
        if let Some(token) = self.spec.invalidation.as_ref().and_then(|i| i.admin_token.as_ref())
            && let Err(message) = crate::validate::value_source(token)
        {
            out.push(("spec.invalidation.adminToken".to_string(), message));
        }
        if let Some(token) = self.spec.invalidation.as_ref().and_then(|i| i.admin_token.as_ref()?.value.as_ref())
            && token.is_empty()
        {
            out.push(("spec.invalidation.adminToken.value".to_string(), "must not be empty".to_string()));
        }
        if let Some(invalidation) = &self.spec.invalidation {
            for (i, event) in invalidation.events.iter().enumerate() {
                for (name, template) in [
                    ("keyTemplate", &event.key_template),
                    ("prefixTemplate", &event.prefix_template),
                    ("tagTemplate", &event.tag_template),
                ] {
                    if let Some(template) = template
                        && let Err(message) =
                            crate::template::check(template, &["data", "id", "type", "source", "subject", "ext"])
                    {
                        out.push((format!("spec.invalidation.events[{i}].{name}"), message));
                    }
                }
            }
        }
        let mut duration = |field: String, value: Option<&crate::Duration>| {
            if let Some(value) = value
                && let Err(error) = value.parse()
            {
                out.push((field, error.to_string()));
            }
        };
        if let Some(warmup) = &self.spec.warmup {
            duration("spec.warmup.interval".into(), warmup.interval.as_ref());
        }
        for (i, rule) in self.spec.rules.iter().enumerate() {
            duration(format!("spec.rules[{i}].ttl"), Some(&rule.ttl));
            duration(format!("spec.rules[{i}].negativeTtl"), rule.negative_ttl.as_ref());
            duration(format!("spec.rules[{i}].staleWhileRevalidate"), rule.stale_while_revalidate.as_ref());
            duration(format!("spec.rules[{i}].staleIfError"), rule.stale_if_error.as_ref());
            duration(format!("spec.rules[{i}].singleFlight.lockTimeout"), rule.single_flight.lock_timeout.as_ref());
        }
        for (i, rule) in self.spec.rules.iter().enumerate() {
            if rule.jitter_percent.is_some_and(|j| j > 100) {
                out.push((format!("spec.rules[{i}].jitterPercent"), "must be 0 to 100".to_string()));
            }
            if rule.max_entry_bytes.is_some_and(|n| n < 1) {
                out.push((format!("spec.rules[{i}].maxEntryBytes"), "must be at least 1".to_string()));
            }
            for (j, tag) in rule.tags.iter().enumerate() {
                if let Err(message) = crate::template::check(tag, &["path", "query", "header", "host"]) {
                    out.push((format!("spec.rules[{i}].tags[{j}]"), message));
                } else if let Ok(parts) = crate::template::parse(tag)
                    && parts.iter().any(|p| {
                        matches!(p, crate::template::Part::Value { source, name } if source == "path" && name.as_deref().is_none_or(|n| n.parse::<usize>().is_err()))
                    })
                {
                    out.push((
                        format!("spec.rules[{i}].tags[{j}]"),
                        format!("{tag:?}: path takes a segment number, e.g. {{{{ path.1 }}}} for 42 in /products/42"),
                    ));
                }
            }
        }
        out
    }

    fn secret_key_refs(&self) -> Vec<(&'static str, &crate::SecretKeyRef)> {
        let token = self.spec.invalidation.as_ref().and_then(|i| i.admin_token.as_ref());
        token.and_then(|t| t.secret_key_ref.as_ref()).map(|r| ("spec.invalidation.adminToken", r)).into_iter().collect()
    }

    fn not_enforced_fields(&self) -> Vec<&'static str> {
        Vec::new()
    }
}
