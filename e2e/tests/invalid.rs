//! A table of invalid manifests applied to a Ready Middleware whose pods serve traffic: each is refused at
//! `kubectl apply` naming the field, or reported by the operator (the Middleware `Stalled`, a policy
//! `Accepted=False`) naming the field; and none of them makes the Middleware lose a replica or stop serving.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use umw_crds::conditions::{self, types};
use umw_crds::{CachePolicy, EventRoute, Middleware, Policy};
use umw_e2e::{Operator, TestNamespace, TestUpstream, control_plane, eventually, http, kubelet};

const WAIT: Duration = Duration::from_secs(90);

async fn client() -> Client {
    control_plane().client().await
}

/// The Middleware the table is applied to, with `extra` appended to its spec and `route` to its route.
fn shop(upstream: &str, route: &str, extra: &str) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop}}\nspec:\n  replicas: 2\n  connections:\n    kafka:\n      bootstrapServers: {{value: '127.0.0.1:1'}}\n  routes:\n  - name: orders\n    match: {{pathPrefix: /orders}}\n    upstream: {{url: '{upstream}'}}\n{route}{extra}"
    )
}

fn policy(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n  targetRefs: [{{name: shop}}]\n{spec}"
    )
}

/// One invalid manifest: what it is, the YAML, and a fragment that the refusal or the report must contain
/// (the field, in the words of the API server or of the operator).
struct Case {
    what: &'static str,
    yaml: String,
    names: &'static str,
}

fn cases(up: &str) -> Vec<Case> {
    let mw = |route: &str, extra: &str| shop(up, route, extra);
    let case = |what: &'static str, yaml: String, names: &'static str| Case { what, yaml, names };
    let cache = |spec: &str| policy("CachePolicy", "bad-cache", spec);
    let events = |spec: &str| policy("EventRoute", "bad-events", spec);
    let auth = |spec: &str| policy("AuthPolicy", "bad-auth", spec);
    let ingest = "  source: {http: {path: /events/in}}\n";
    let to_kafka = "  destination: {kafka: {topic: orders}}\n";
    vec![
        // The Middleware: routes.
        case("route name not a DNS label", mw("", "").replace("name: orders", "name: Orders"), "spec.routes[0].name"),
        case(
            "route names twice",
            mw(&format!("  - name: orders\n    upstream: {{url: '{up}'}}\n"), ""),
            "spec.routes[].name",
        ),
        case("timeout not a duration", mw("    timeout: 5 seconds\n", ""), "spec.routes[0].timeout"),
        case("timeout zero", mw("    timeout: 0s\n", ""), "spec.routes[0].timeout"),
        case(
            "upstream port out of range",
            mw("", "").replace(up, "http://127.0.0.1:99999"),
            "spec.routes[0].upstream.url",
        ),
        case("upstream URL without host", mw("", "").replace(up, "http://"), "spec.routes[0].upstream.url"),
        case("upstream URL that does not parse", mw("", "").replace(up, "http://[::1"), "spec.routes[0].upstream.url"),
        case("upstream scheme ftp", mw("", "").replace(up, "ftp://files:21"), "spec.routes[0].upstream.url"),
        case(
            "upstream URL with credentials",
            mw("", "").replace(up, "http://u:p@orders:8080"),
            "spec.routes[0].upstream.url",
        ),
        case(
            "upstream with url and service",
            mw("", "")
                .replace(&format!("{{url: '{up}'}}"), &format!("{{url: '{up}', service: {{name: s, port: 80}}}}")),
            "spec.routes[0].upstream",
        ),
        case("upstream with neither", mw("", "").replace(&format!("{{url: '{up}'}}"), "{}"), "spec.routes[0].upstream"),
        case(
            "service port 0",
            mw("", "").replace(&format!("{{url: '{up}'}}"), "{service: {name: s, port: 0}}"),
            "spec.routes[0].upstream.service.port",
        ),
        case(
            "path prefix without slash",
            mw("", "").replace("pathPrefix: /orders", "pathPrefix: orders"),
            "spec.routes[0].match.pathPrefix",
        ),
        case(
            "path and pathPrefix",
            mw("", "").replace("pathPrefix: /orders", "pathPrefix: /orders, path: /orders/1"),
            "spec.routes[0].match",
        ),
        case(
            "unknown method",
            mw("", "").replace("pathPrefix: /orders", "pathPrefix: /orders, methods: [FETCH]"),
            "spec.routes[0].match.methods[0]",
        ),
        case(
            "header value with CR LF",
            mw("", "")
                .replace("pathPrefix: /orders", "pathPrefix: /orders, headers: [{name: x-a, value: \"a\\r\\nb\"}]"),
            "spec.routes[0].match.headers[0].value",
        ),
        case(
            "header name with a space",
            mw("", "").replace("pathPrefix: /orders", "pathPrefix: /orders, headers: [{name: 'x a', value: b}]"),
            "spec.routes[0].match.headers[0].name",
        ),
        case(
            "request schema that does not compile",
            mw("    requestSchema: {type: 5}\n", ""),
            "spec.routes[0].requestSchema",
        ),
        case("negative body limit", mw("    maxBodyBytes: -1\n", ""), "spec.routes[0].maxBodyBytes"),
        case("retry attempts out of range", mw("    retry: {attempts: 100}\n", ""), "spec.routes[0].retry.attempts"),
        case(
            "retry on a status that is no server error",
            mw("    retry: {onStatuses: [200]}\n", ""),
            "spec.routes[0].retry.onStatuses",
        ),
        case("retry backoff not a duration", mw("    retry: {backoff: soon}\n", ""), "spec.routes[0].retry.backoff"),
        case(
            "breaker that never opens",
            mw("", "").replace(
                &format!("{{url: '{up}'}}"),
                &format!("{{url: '{up}', circuitBreaker: {{consecutiveFailures: 0}}}}"),
            ),
            "consecutiveFailures",
        ),
        // The Middleware: listeners, observability, connections, scale.
        case("privileged HTTP port", mw("", "  listeners: {http: {port: 80}}\n"), "spec.listeners.http.port"),
        case("HTTP port equal to the admin port", mw("", "  listeners: {http: {port: 9901}}\n"), "spec.listeners"),
        case(
            "head limit below 8 KiB",
            mw("", "  listeners: {http: {maxHeaderBytes: 100}}\n"),
            "spec.listeners.http.maxHeaderBytes",
        ),
        case(
            "no header fields allowed",
            mw("", "  listeners: {http: {maxHeaders: 0}}\n"),
            "spec.listeners.http.maxHeaders",
        ),
        case(
            "header read timeout not a duration",
            mw("", "  listeners: {http: {headerReadTimeout: soon}}\n"),
            "spec.listeners.http.headerReadTimeout",
        ),
        case(
            "body read timeout zero",
            mw("", "  listeners: {http: {bodyReadTimeout: 0s}}\n"),
            "spec.listeners.http.bodyReadTimeout",
        ),
        case(
            "WebSocket path without slash",
            mw("", "  listeners: {websocket: {path: ws}}\n"),
            "spec.listeners.websocket.path",
        ),
        case(
            "log level that is no filter",
            mw("", "  observability: {logLevel: 'info,=debug='}\n"),
            "spec.observability.logLevel",
        ),
        case(
            "sampling ratio above 1",
            mw("", "  observability: {samplingRatio: 2}\n"),
            "spec.observability.samplingRatio",
        ),
        case("log format yaml", mw("", "  observability: {logFormat: yaml}\n"), "spec.observability.logFormat"),
        case(
            "connection value and secretKeyRef both",
            mw("", "").replace("{value: '127.0.0.1:1'}", "{value: '127.0.0.1:1', secretKeyRef: {name: k, key: b}}"),
            "spec.connections.kafka.bootstrapServers",
        ),
        case(
            "connection with neither value nor secretKeyRef",
            mw("", "").replace("{value: '127.0.0.1:1'}", "{}"),
            "spec.connections.kafka.bootstrapServers",
        ),
        case(
            "Redis URL that is no URL",
            mw("", "").replace("  connections:\n", "  connections:\n    redis: {url: {value: 'not a url'}}\n"),
            "spec.connections.redis.url",
        ),
        case("negative replicas", mw("", "").replace("replicas: 2", "replicas: -1"), "spec.replicas"),
        case(
            "autoscaling min above max",
            mw("", "  autoscaling: {minReplicas: 5, maxReplicas: 2}\n"),
            "spec.autoscaling",
        ),
        case(
            "commands without PostgreSQL",
            mw("", "  commands:\n  - {name: place-order, event: {topic: orders, type: order.placed}}\n"),
            "spec.connections.postgres",
        ),
        case(
            "command name not a DNS label",
            mw("", "  commands:\n  - {name: Place Order, event: {topic: orders, type: order.placed}}\n"),
            "spec.commands[0].name",
        ),
        // Policies.
        case("cache TTL not a duration", cache("  rules: [{ttl: forever}]\n"), "spec.rules[0].ttl"),
        case("cache policy without rules", cache("  rules: []\n"), "spec.rules"),
        case(
            "cache key header that is no header name",
            cache("  rules: [{ttl: 30s, key: {headers: ['a b']}}]\n"),
            "spec.rules[0].key.headers[0]",
        ),
        case("Redis backend without a Redis connection", cache("  backend: redis\n  rules: [{ttl: 30s}]\n"), "redis"),
        case(
            "cache policy on a route that does not exist",
            policy("CachePolicy", "bad-cache", "  rules: [{ttl: 30s}]\n")
                .replace("[{name: shop}]", "[{name: shop, sectionName: nowhere}]"),
            "nowhere",
        ),
        case(
            "cache policy without targets",
            cache("  rules: [{ttl: 30s}]\n").replace("[{name: shop}]", "[]"),
            "spec.targetRefs",
        ),
        case(
            "admin token with neither value nor secretKeyRef",
            cache("  rules: [{ttl: 30s}]\n  invalidation: {adminApi: true, adminToken: {}}\n"),
            "spec.invalidation.adminToken",
        ),
        case("event route without a source", events(to_kafka), "spec.source"),
        case(
            "event route with two sources",
            events(&format!("  source: {{http: {{path: /e}}, kafka: {{topic: t}}}}\n{to_kafka}")),
            "spec.source",
        ),
        case(
            "ingest path without slash",
            events(&format!("  source: {{http: {{path: events}}}}\n{to_kafka}")),
            "spec.source.http.path",
        ),
        case(
            "event schema that does not compile",
            events(&format!("{ingest}{to_kafka}  schema: {{type: 5}}\n")),
            "spec.schema",
        ),
        case(
            "webhook URL that is no URL",
            events(&format!("{ingest}  destination: {{http: {{url: 'not a url'}}}}\n")),
            "spec.destination.http.url",
        ),
        case(
            "webhook header value with CR LF",
            events(&format!(
                "{ingest}  destination: {{http: {{url: 'http://hook:8080', headers: {{x-a: \"a\\r\\nb\"}}}}}}\n"
            )),
            "spec.destination.http.headers",
        ),
        case(
            "ingest path a route serves",
            events(&format!("  source: {{http: {{path: /orders/new}}}}\n{to_kafka}")),
            "route \"orders\"",
        ),
        case(
            "event route without a destination",
            events(&format!("{ingest}  destination: {{}}\n")),
            "spec.destination",
        ),
        case(
            "event key template that does not parse",
            events(&format!("{ingest}  destination: {{kafka: {{topic: orders, keyTemplate: '{{{{ data.'}}}}\n")),
            "keyTemplate",
        ),
        case(
            "rate limit of zero requests",
            auth("  rateLimits: [{name: all, requests: 0, period: 1s}]\n"),
            "spec.rateLimits[0].requests",
        ),
        case(
            "rate limit period not a duration",
            auth("  rateLimits: [{name: all, requests: 10, period: often}]\n"),
            "spec.rateLimits[0].period",
        ),
        case(
            "OIDC client secret with neither value nor secretKeyRef",
            auth("  oidc: {issuer: 'https://id.example', clientId: shop, clientSecret: {}}\n"),
            "spec.oidc.clientSecret",
        ),
        case(
            "policy target of another kind",
            cache("  rules: [{ttl: 30s}]\n").replace("[{name: shop}]", "[{name: shop, kind: Service}]"),
            "spec.targetRefs[0].kind",
        ),
    ]
}

/// How a case came out: refused by the API server, or reported on a resource by the operator.
#[derive(Debug)]
enum Outcome {
    Refused(String),
    Reported(String),
}

/// The message a Stalled Middleware or a refused policy carries, once there is one.
async fn report(namespace: &str, yaml: &str) -> Option<String> {
    let kind = yaml.lines().find_map(|l| l.strip_prefix("kind: "))?.trim().to_string();
    let client = client().await;
    let message = |conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition], type_: &str| {
        conditions::find(conditions, type_).filter(|c| c.status == "False").map(|c| c.message.clone())
    };
    match kind.as_str() {
        "Middleware" => {
            let mw = Api::<Middleware>::namespaced(client, namespace).get("shop").await.ok()?;
            let status = mw.status?;
            // Only a report about the current generation counts.
            let stalled = conditions::find(&status.conditions, types::STALLED)?;
            (stalled.observed_generation == mw.metadata.generation && stalled.status == "True")
                .then(|| stalled.message.clone())
        }
        "CachePolicy" => {
            let p = Api::<CachePolicy>::namespaced(client, namespace).get("bad-cache").await.ok()?;
            message(&p.policy_status()?.conditions, types::ACCEPTED)
        }
        "EventRoute" => {
            let p = Api::<EventRoute>::namespaced(client, namespace).get("bad-events").await.ok()?;
            message(&p.policy_status()?.conditions, types::ACCEPTED)
        }
        "AuthPolicy" => {
            let p = Api::<umw_crds::AuthPolicy>::namespaced(client, namespace).get("bad-auth").await.ok()?;
            message(&p.policy_status()?.conditions, types::ACCEPTED)
        }
        _ => None,
    }
}

/// Every pod of the Middleware answers through its route, and the Deployment has both replicas ready.
async fn still_served(namespace: &str, what: &str) {
    let client = client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client, namespace);
    eventually(&format!("both replicas serving after {what:?}"), WAIT, || async {
        let deployment = deployments.get("umw-shop").await.ok()?;
        let ready = deployment.status.as_ref()?.ready_replicas.unwrap_or(0);
        if ready < 2 {
            return None;
        }
        let list = pods.list(&ListParams::default().labels("app.kubernetes.io/instance=shop")).await.ok()?;
        let running: Vec<String> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .collect();
        if running.len() < 2 {
            return None;
        }
        for ip in &running {
            let (code, _) = http("GET", &format!("{ip}:8080"), "/orders/1").await?;
            if code != 200 {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_invalid_manifest_takes_a_serving_middleware_down_and_each_names_its_field() {
    let ns = TestNamespace::new("invalid");
    let upstream = TestUpstream::start("orders").await;
    let kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    let good = shop(&upstream.url(), "", "");
    ns.must_apply(&good);
    let out = ns.kubectl(&["wait", "--for=condition=Ready", "middleware/shop", "--timeout=90s"]);
    assert!(out.status.success(), "Ready: {}", String::from_utf8_lossy(&out.stderr));
    still_served(&ns.name, "the start").await;

    let cases = cases(&upstream.url());
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut failures = Vec::new();
    let mut outcomes = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let out = ns.apply(&case.yaml);
        let outcome = if out.status.success() {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut found = None;
            while std::time::Instant::now() < deadline {
                if let Some(message) = report(&ns.name, &case.yaml).await
                    && message.contains(case.names)
                {
                    found = Some(message);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            match found {
                Some(message) => Outcome::Reported(message),
                None => {
                    failures.push(format!(
                        "{i} {}: accepted and not reported naming {:?} (last report: {:?})",
                        case.what,
                        case.names,
                        report(&ns.name, &case.yaml).await
                    ));
                    Outcome::Reported(String::new())
                }
            }
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if !stderr.contains(case.names) {
                failures.push(format!("{i} {}: refused without naming {:?}: {stderr}", case.what, case.names));
            }
            Outcome::Refused(stderr)
        };
        outcomes.push((case.what, outcome));
        // Halfway, one pod restarts while an invalid edit is in place: it starts on the last good
        // configuration, which is the only one rendered.
        if i == cases.len() / 2 {
            let list = Api::<Pod>::namespaced(client().await, &ns.name)
                .list(&ListParams::default().labels("app.kubernetes.io/instance=shop"))
                .await
                .unwrap();
            let victim = list.items[0].name_any();
            let pid = kubelet.pid(&ns.name, &victim).expect("the pod's process runs");
            assert!(std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        still_served(&ns.name, case.what).await;
        // Back to the good state for the next case.
        if case.yaml.contains("kind: Middleware") {
            ns.must_apply(&good);
        } else {
            let _ = control_plane()
                .kubectl_stdin(&["delete", "-n", &ns.name, "--ignore-not-found", "-f", "-"], Some(&case.yaml));
        }
    }
    for (what, outcome) in &outcomes {
        let (layer, message) = match outcome {
            Outcome::Refused(message) => ("refused by the API server", message),
            Outcome::Reported(message) => ("reported by the operator", message),
        };
        eprintln!("{what}: {layer}: {}", message.lines().next().unwrap_or_default());
    }
    let refused = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Refused(_))).count();
    eprintln!("{refused} refused at kubectl apply, {} reported by the operator", outcomes.len() - refused);
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), cases.len(), failures.join("\n"));
    let out = ns.kubectl(&["wait", "--for=condition=Ready", "middleware/shop", "--timeout=90s"]);
    assert!(out.status.success(), "Ready at the end: {}", String::from_utf8_lossy(&out.stderr));
}
