//! The data plane's precondition is `umw_crds::validate`: whatever a configuration passes there, the data
//! plane builds. Checked on mutations of a configuration that uses every kind of field: each case changes
//! one to three places (a value replaced by a hostile one, an object or a list replaced, a field removed),
//! and whenever the validation finds nothing wrong with the result, the runtime must build it (with the
//! in-process backends, as `umw-dataplane check` does). Deterministic: the seeds are fixed, and a failure
//! prints the mutations and the build's error.

use serde_json::{Value, json};
use umw_dataplane::config::{self, Files};
use umw_dataplane::health::Health;
use umw_dataplane::kernel::component::Env;
use umw_dataplane::metrics::Metrics;
use umw_dataplane::proxy::upstream::Overrides;
use umw_dataplane::telemetry::LogControl;

/// Every kind of resource with most of its optional fields set.
const BASE: &str = r#"
apiVersion: umw.dev/v1alpha1
kind: Middleware
metadata: {name: shop, namespace: shop}
spec:
  listeners:
    http: {port: 8080}
    grpc: {port: 8081}
    websocket: {path: /ws}
  routes:
    - name: products
      match:
        pathPrefix: /products
        methods: [GET, HEAD]
        hosts: [shop.example.com, "*.shop.example.com"]
        headers: [{name: x-tenant, value: acme}]
      upstream:
        url: http://127.0.0.1:9000/base
        circuitBreaker: {consecutiveFailures: 3, openFor: 5s}
      timeout: 5s
      retry: {attempts: 2, backoff: 25ms, onStatuses: [502, 503]}
    - name: orders
      match: {path: /orders}
      upstream: {service: {name: shop-api, port: 8080}, protocol: H2C}
      maxBodyBytes: 65536
      requestSchema:
        type: object
        required: [sku]
        properties: {sku: {type: string, minLength: 1}}
  connections:
    redis: {url: {value: "redis://127.0.0.1:6379"}, timeout: 200ms}
    kafka:
      bootstrapServers: {value: "127.0.0.1:9092"}
      producer: {linger: 5ms, deliveryTimeout: 30s}
    postgres:
      url: {value: "postgres://shop:pw@127.0.0.1:5432/shop"}
      statementTimeout: 5s
      connectTimeout: 2s
  commands:
    - name: place-order
      schema: {type: object, required: [orderId], properties: {orderId: {type: string}}}
      event: {type: com.example.order.placed, topic: shop.orders, keyTemplate: "{{ data.orderId }}"}
      idempotency: {ttl: 24h, header: idempotency-key}
  outbox: {pollInterval: 500ms, retention: 24h}
  observability: {samplingRatio: 0.1, logFormat: json, logLevel: info}
---
apiVersion: umw.dev/v1alpha1
kind: CachePolicy
metadata: {name: shop-cache, namespace: shop}
spec:
  targetRefs: [{name: shop, sectionName: products}]
  rules:
    - match: {pathPrefix: /products, methods: [GET]}
      ttl: 30s
      jitterPercent: 10
      negativeTtl: 5s
      negativeStatuses: [404]
      staleWhileRevalidate: 10s
      staleIfError: 1m
      key: {queryParams: [page], headers: [accept-language]}
      maxEntryBytes: 1048576
      tags: [products]
  invalidation:
    adminApi: true
    adminToken: {value: secret-token}
    events: [{topic: shop.products, eventType: product.changed, keyTemplate: "/products/{{ data.id }}"}]
  warmup: {paths: [/products], interval: 5m}
---
apiVersion: umw.dev/v1alpha1
kind: EventRoute
metadata: {name: shop-orders, namespace: shop}
spec:
  targetRefs: [{name: shop}]
  source: {http: {path: /events/orders}}
  destination: {kafka: {topic: shop.orders, keyTemplate: "{{ data.orderId }}"}}
  schema: {type: object, required: [orderId]}
---
apiVersion: umw.dev/v1alpha1
kind: EventRoute
metadata: {name: shop-webhook, namespace: shop}
spec:
  targetRefs: [{name: shop}]
  source: {kafka: {topic: shop.orders, group: shop-webhook}}
  destination: {http: {url: "http://127.0.0.1:9000/hook", timeout: 2s, headers: {x-source: umw}}}
  filter: {types: [com.example.order.placed], data: [{pointer: /sku, equals: '"kettle"'}]}
  retry: {maxAttempts: 3, initialBackoff: 100ms, maxBackoff: 2s}
  deadLetter: {topic: shop.orders.dlq}
---
apiVersion: umw.dev/v1alpha1
kind: AuthPolicy
metadata: {name: shop-auth, namespace: shop}
spec:
  targetRefs: [{name: shop, sectionName: orders}]
  jwt:
    issuers: [{issuer: "https://auth.example.com/", audiences: [shop]}]
  rateLimits: [{name: per-client, requests: 100, period: 1s, burst: 50}]
"#;

/// Values a user (or a typo) could put anywhere.
fn hostile_values() -> Vec<Value> {
    let mut values: Vec<Value> = [
        "",
        " ",
        "x",
        "-",
        "/",
        "//",
        "*",
        "/products",
        "/events/orders",
        "/commands/x",
        "a\r\nb",
        "bad header",
        "x-ok",
        "http://[::1",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://user@127.0.0.1",
        "https://",
        "ftp://x",
        "http://x y",
        "not a url",
        "redis://",
        "redis://127.0.0.1:99999",
        "postgres://",
        "0s",
        "-1s",
        "1x",
        "10ms",
        "999999999h",
        "{{ data.",
        "{{ nope }}",
        "{{ data.id }}",
        "topic with spaces",
        "a..b",
        "héllo",
        "GET",
        "H2C",
        "trace,foo=[",
    ]
    .into_iter()
    .map(Value::from)
    .collect();
    values.push(Value::from("x".repeat(300)));
    values.extend([json!(0), json!(-1), json!(1), json!(65535), json!(65536), json!(99999), json!(1e12), json!(0.5)]);
    values.extend([json!(true), json!(null), json!([]), json!({}), json!({"type": 5}), json!({"type": "nope"})]);
    values.extend([json!({"value": "x"}), json!(["", "bad header"]), json!({"pattern": "("})]);
    values
}

/// The JSON pointer of every node below the root.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let path = format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
                out.push(path.clone());
                pointers(child, path, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let path = format!("{at}/{i}");
                out.push(path.clone());
                pointers(child, path, out);
            }
        }
        _ => {}
    }
}

fn mutate(document: &mut Value, rng: &mut fastrand::Rng, hostile: &[Value]) -> Option<String> {
    let mut all = Vec::new();
    pointers(document, String::new(), &mut all);
    // Leave the identities alone: a renamed resource is a different configuration, not a broken one.
    all.retain(|p| !p.starts_with("/apiVersion") && !p.starts_with("/kind") && !p.starts_with("/metadata"));
    if all.is_empty() {
        return None;
    }
    let at = all[rng.usize(..all.len())].clone();
    let (parent, key) = at.rsplit_once('/')?;
    if rng.u8(..10) == 0 {
        let removed = match document.pointer_mut(parent)? {
            Value::Object(map) => map.remove(&key.replace("~1", "/").replace("~0", "~")).is_some(),
            Value::Array(items) if items.len() > 1 => key.parse::<usize>().ok().map(|i| items.remove(i)).is_some(),
            _ => false,
        };
        return removed.then(|| format!("removed {at}"));
    }
    let value = hostile[rng.usize(..hostile.len())].clone();
    let description = format!("{at} = {value}");
    *document.pointer_mut(&at)? = value;
    Some(description)
}

fn documents() -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(BASE).map(|d| Value::deserialize(d).expect("the base is YAML")).collect()
}

fn files(documents: &[Value]) -> Files {
    let text: Vec<String> = documents.iter().map(|d| serde_yaml::to_string(d).expect("serialises")).collect();
    Files { files: vec![("mutated.yaml".into(), text.join("---\n"))] }
}

fn build(loaded: &config::Loaded) -> Result<(), String> {
    let metrics = Metrics::new().map_err(|e| e.to_string())?;
    let env = Env::new(metrics, Health::default(), None, Overrides::default()).in_process(true);
    umw_dataplane::app::runtime(loaded, env, LogControl::disabled()).map(|_| ()).map_err(|invalid| invalid.to_string())
}

/// Replaces the node at `at` with `value`.
fn replaced(base: &[Value], doc: usize, at: &str, value: &Value) -> Vec<Value> {
    let mut mutated = base.to_vec();
    if let Some(node) = mutated[doc].pointer_mut(at) {
        *node = value.clone();
    }
    mutated
}

fn kind(document: &Value) -> &str {
    document["kind"].as_str().unwrap_or("?")
}

#[tokio::test]
async fn whatever_the_validation_accepts_the_data_plane_builds() {
    let base = documents();
    let loaded = config::parse(&files(&base)).expect("the base configuration is valid");
    build(&loaded).expect("the base configuration builds");
    let hostile = hostile_values();
    let (mut cases, mut accepted, mut failures) = (0, 0, Vec::new());
    let mut check = |mutated: &[Value], changes: String| {
        cases += 1;
        // Parsed once: what the validation accepts is what the build is given.
        let Ok(loaded) = config::parse(&files(mutated)) else { return };
        accepted += 1;
        if let Err(error) = build(&loaded) {
            failures.push(format!("{changes}\n    -> {error}"));
        }
    };
    // Every field, one at a time, given every hostile value of its kind (a string for a string, a number
    // for a number, anything for an object or a list).
    for (doc, document) in base.iter().enumerate() {
        let mut all = Vec::new();
        pointers(document, String::new(), &mut all);
        for at in all.iter().filter(|p| p.starts_with("/spec")) {
            let current = document.pointer(at).expect("listed");
            for value in hostile.iter().filter(|v| match current {
                Value::String(_) => v.is_string(),
                Value::Number(_) => v.is_number(),
                Value::Bool(_) => v.is_boolean(),
                _ => true,
            }) {
                check(&replaced(&base, doc, at, value), format!("{}{at} = {value}", kind(document)));
            }
        }
    }
    // Then combinations: two or three random changes at once (removals too).
    for seed in 0..600u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut mutated = base.clone();
        let mut changes = Vec::new();
        for _ in 0..rng.usize(2..=3) {
            let doc = rng.usize(..mutated.len());
            if let Some(change) = mutate(&mut mutated[doc], &mut rng, &hostile) {
                changes.push(format!("{}{change}", kind(&mutated[doc])));
            }
        }
        check(&mutated, format!("seed {seed}: {}", changes.join(", ")));
    }
    // One example per field the build refused.
    let mut by_field = std::collections::BTreeMap::new();
    for failure in &failures {
        let field = failure.split("-> ").nth(1).and_then(|e| e.split(": ").nth(1)).unwrap_or(failure);
        by_field.entry(field.to_string()).or_insert(failure);
    }
    assert!(
        failures.is_empty(),
        "{} of {accepted} configurations that the validation accepts (of {cases} tried) do not build; one per field:\n{}",
        failures.len(),
        by_field.values().map(|f| f.as_str()).collect::<Vec<_>>().join("\n")
    );
    assert!(accepted > 300, "too few mutations pass the validation ({accepted} of {cases}) for the test to mean much");
}
