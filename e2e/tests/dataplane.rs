//! The operator and the data plane together against a real control plane: the process kubelet runs the
//! data-plane pods that the real controller-manager creates, and the operator reads their health.
//!
//! The tests run on a multi-threaded runtime: the kubelet is a task of the test, and blocking calls such as
//! `kubectl wait` must not starve it.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use umw_crds::conditions::{self, types};
use umw_crds::{CachePolicy, EventRoute, Middleware, Policy};
use umw_e2e::{Operator, TestNamespace, TestUpstream, control_plane, eventually, http, http_host, kubelet, post_json};

const WAIT: Duration = Duration::from_secs(90);

async fn client() -> Client {
    control_plane().client().await
}

fn middleware_yaml(replicas: u32, routes: &str) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata:\n  name: shop\nspec:\n  replicas: {replicas}\n  routes:\n{routes}"
    )
}

fn route(name: &str, prefix: &str, upstream: &str) -> String {
    format!("  - name: {name}\n    match: {{pathPrefix: {prefix}}}\n    upstream: {{url: '{upstream}'}}\n")
}

/// Waits for a Middleware condition with this status whose message satisfies `message`.
async fn middleware_condition(
    api: &Api<Middleware>,
    type_: &str,
    status: &str,
    message: impl Fn(&str) -> bool,
) -> Middleware {
    eventually(&format!("Middleware shop {type_}={status}"), WAIT, || async {
        let mw = api.get_opt("shop").await.ok().flatten()?;
        let condition = conditions::find(&mw.status.as_ref()?.conditions, type_)?;
        (condition.status == status && message(&condition.message)).then_some(mw.clone())
    })
    .await
}

/// The running pods of the Middleware with their addresses (`ip:8080`) and admin addresses.
async fn pods(namespace: &str) -> Vec<(String, String, String)> {
    let api: Api<Pod> = Api::namespaced(client().await, namespace);
    let list = api.list(&ListParams::default().labels("app.kubernetes.io/instance=shop")).await.unwrap();
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((p.name_any(), format!("{ip}:8080"), format!("{ip}:9901")))
        })
        .collect()
}

async fn ready_and_applied(api: &Api<Middleware>) -> Middleware {
    eventually("Middleware shop Ready on its current configuration", WAIT, || async {
        let mw = api.get_opt("shop").await.ok().flatten()?;
        let status = mw.status.as_ref()?;
        let ready = conditions::is_true(&status.conditions, types::READY);
        (ready && status.applied_config_hash.is_some() && status.applied_config_hash == status.config_hash)
            .then_some(mw.clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_middleware_goes_ready_end_to_end_and_its_pods_proxy_to_the_upstream() {
    let ns = TestNamespace::new("dp-ready");
    let upstream = TestUpstream::start("orders").await;
    let _kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    ns.must_apply(&middleware_yaml(2, &route("orders", "/orders", &upstream.url())));

    let out = ns.kubectl(&["wait", "--for=condition=Ready", "middleware/shop", "--timeout=90s"]);
    assert!(out.status.success(), "kubectl wait Ready: {}", String::from_utf8_lossy(&out.stderr));
    let api: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    let mw = ready_and_applied(&api).await;
    let status = mw.status.unwrap();
    assert_eq!(status.ready_replicas, Some(2));
    assert!(status.components.iter().any(|c| c.name == "config" && c.state == "Up"), "{:?}", status.components);
    assert!(conditions::find(&status.conditions, types::DEGRADED).is_some_and(|c| c.status == "False"));

    let pods = pods(&ns.name).await;
    assert_eq!(pods.len(), 2);
    for (pod, address, _) in &pods {
        let (code, body) = http("GET", address, "/orders/42").await.unwrap_or_else(|| panic!("{pod} answers"));
        assert_eq!(code, 200, "{pod}: {body}");
        assert!(body.contains("\"upstream\":\"orders\"") && body.contains("/orders/42"), "{body}");
    }
    assert_eq!(upstream.hits(), 2);
    let (code, body) = http("GET", &pods[0].1, "/elsewhere").await.unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no-route"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_route_reloads_the_running_processes_without_a_restart() {
    let ns = TestNamespace::new("dp-reload");
    let first = TestUpstream::start("first").await;
    let second = TestUpstream::start("second").await;
    let kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    ns.must_apply(&middleware_yaml(2, &route("a", "/a", &first.url())));
    let api: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    let before = ready_and_applied(&api).await;
    let before_hash = before.status.as_ref().unwrap().config_hash.clone().unwrap();
    let pods_before = pods(&ns.name).await;
    let pids_before: Vec<Option<u32>> = pods_before.iter().map(|(p, _, _)| kubelet.pid(&ns.name, p)).collect();
    assert!(pids_before.iter().all(Option::is_some));
    assert_eq!(http("GET", &pods_before[0].1, "/b/1").await.unwrap().0, 404);

    ns.must_apply(&middleware_yaml(2, &[route("a", "/a", &first.url()), route("b", "/b", &second.url())].concat()));
    let after = eventually("the new configuration applied by every pod", WAIT, || async {
        let mw = api.get_opt("shop").await.ok().flatten()?;
        let status = mw.status.as_ref()?;
        let hash = status.config_hash.clone()?;
        (hash != before_hash && status.applied_config_hash.as_deref() == Some(hash.as_str())).then_some(mw.clone())
    })
    .await;
    assert!(conditions::is_true(&after.status.as_ref().unwrap().conditions, types::READY));

    let pods_after = pods(&ns.name).await;
    let names = |p: &[(String, String, String)]| p.iter().map(|(n, _, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&pods_after), names(&pods_before), "the same pods: no rollout");
    let pids_after: Vec<Option<u32>> = pods_after.iter().map(|(p, _, _)| kubelet.pid(&ns.name, p)).collect();
    assert_eq!(pids_after, pids_before, "the same processes: reloaded in place");
    for (pod, address, admin) in &pods_after {
        let (code, body) = http("GET", address, "/b/1").await.unwrap();
        assert_eq!(code, 200, "{pod}: {body}");
        assert!(body.contains("\"upstream\":\"second\""), "{body}");
        let (_, metrics) = http("GET", admin, "/metrics").await.unwrap();
        assert!(metrics.contains("umw_config_reloads_total{outcome=\"applied\"} 1"), "{pod} reloaded once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_makes_the_middleware_unready_naming_the_pod_until_it_is_back() {
    let ns = TestNamespace::new("dp-kill");
    let upstream = TestUpstream::start("up").await;
    let kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    ns.must_apply(&middleware_yaml(2, &route("all", "/", &upstream.url())));
    let api: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    ready_and_applied(&api).await;

    let (victim, _, _) = pods(&ns.name).await.remove(0);
    let pid = kubelet.pid(&ns.name, &victim).expect("the pod's process runs");
    assert!(std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let unready = middleware_condition(&api, types::READY, "False", |m| m.contains(&victim)).await;
    let ready = conditions::find(&unready.status.as_ref().unwrap().conditions, types::READY).unwrap();
    assert!(ready.message.contains(&victim), "{}", ready.message);

    // The kubelet restarts the process; the Middleware recovers by itself.
    ready_and_applied(&api).await;
    let restarted = kubelet.pid(&ns.name, &victim).expect("running again");
    assert_ne!(restarted, pid);
    let pod: Pod = Api::namespaced(client().await, &ns.name).get(&victim).await.unwrap();
    let restarts = pod.status.unwrap().container_statuses.unwrap()[0].restart_count;
    assert_eq!(restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_cannot_start_stalls_the_middleware_in_the_data_planes_own_words_until_it_can() {
    let ns = TestNamespace::new("dp-crash");
    let upstream = TestUpstream::start("up").await;
    let _kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    // What no validation can see: a Secret's value. The data plane refuses it when it starts.
    ns.must_apply("apiVersion: v1\nkind: Secret\nmetadata: {name: redis}\nstringData: {url: 'not a url'}\n");
    let connections = "  connections:\n    redis:\n      url: {secretKeyRef: {name: redis, key: url}}\n";
    ns.must_apply(&format!("{}{connections}", middleware_yaml(1, &route("products", "/products", &upstream.url()))));
    ns.must_apply(
        "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: products}\nspec:\n  targetRefs: [{name: shop}]\n  backend: redis\n  rules: [{ttl: 60s}]\n",
    );
    let api: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    let stalled = middleware_condition(&api, types::STALLED, "True", |m| m.contains("spec.connections.redis")).await;
    let status = stalled.status.as_ref().unwrap();
    let condition = conditions::find(&status.conditions, types::STALLED).unwrap();
    assert_eq!(condition.reason, "PodsFailing", "{}", condition.message);
    let (pod, _, _) = pods(&ns.name).await.remove(0);
    assert!(condition.message.contains(&format!("pod {pod}")), "names the pod: {}", condition.message);
    assert!(condition.message.contains("exit code 1"), "{}", condition.message);
    let ready = conditions::find(&status.conditions, types::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "PodsFailing"), "{}", ready.message);
    // The kubelet shows the data plane's termination message on the pod, as the operator quotes it.
    let pods_api: Api<Pod> = Api::namespaced(client().await, &ns.name);
    let container = pods_api.get(&pod).await.unwrap().status.unwrap().container_statuses.unwrap().remove(0);
    let message = container.last_state.unwrap().terminated.unwrap().message.unwrap_or_default();
    assert!(message.contains("spec.connections.redis"), "{message}");

    // Fixed, the next restart starts; the Middleware recovers by itself.
    ns.must_apply("apiVersion: v1\nkind: Secret\nmetadata: {name: redis}\nstringData: {url: 'redis://127.0.0.1:1'}\n");
    middleware_condition(&api, types::STALLED, "False", |_| true).await;
}

/// Waits until kstatus computes `want` for OBJECT; returns its message.
async fn kstatus_is(ns: &TestNamespace, object: &str, want: &str) -> String {
    let mut last = (String::new(), String::new());
    for _ in 0..600 {
        last = ns.kstatus(object);
        if last.0 == want {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    panic!("kstatus of {object}: {} ({}), not {want}", last.0, last.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kstatus_reads_every_kind_in_every_state_as_intended() {
    let ns = TestNamespace::new("dp-kstatus");
    let upstream = TestUpstream::start("up").await;
    let _kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    ns.must_apply(&middleware_yaml(1, &route("products", "/products", &upstream.url())));
    // Rolling out, then serving.
    kstatus_is(&ns, "middleware/shop", "InProgress").await;
    kstatus_is(&ns, "middleware/shop", "Current").await;

    let policy = |kind: &str, name: &str, target: &str, spec: &str| {
        format!(
            "apiVersion: umw.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n  targetRefs: [{{name: {target}}}]\n{spec}"
        )
    };
    let rules = "  rules: [{ttl: 30s}]\n";
    ns.must_apply(&policy("CachePolicy", "enforced", "shop", rules));
    kstatus_is(&ns, "cachepolicy/enforced", "Current").await;
    // Conflicted (the older policy wins) and invalid: a person must act.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ns.must_apply(&policy("CachePolicy", "later", "shop", rules));
    let message = kstatus_is(&ns, "cachepolicy/later", "Failed").await;
    assert!(message.contains("\"enforced\""), "names the owner: {message}");
    ns.must_apply(&policy("CachePolicy", "bad", "shop", "  backend: redis\n  rules: [{ttl: 30s}]\n"));
    let message = kstatus_is(&ns, "cachepolicy/bad", "Failed").await;
    assert!(message.contains("spec.connections.redis"), "{message}");
    // A missing target may yet be created (GitOps applies in any order): still in progress.
    ns.must_apply(&policy("CachePolicy", "orphan", "nowhere-else", rules));
    let message = kstatus_is(&ns, "cachepolicy/orphan", "InProgress").await;
    assert!(message.contains("nowhere-else"), "{message}");
    ns.must_apply(&policy(
        "EventRoute",
        "elsewhere",
        "nowhere",
        "  source: {http: {path: /in}}\n  destination: {kafka: {topic: t}}\n",
    ));
    kstatus_is(&ns, "eventroute/elsewhere", "InProgress").await;
    ns.must_apply(&policy(
        "EventRoute",
        "needs-kafka",
        "shop",
        "  source: {http: {path: /in}}\n  destination: {kafka: {topic: t}}\n",
    ));
    let message = kstatus_is(&ns, "eventroute/needs-kafka", "Failed").await;
    assert!(message.to_lowercase().contains("kafka"), "{message}");
    // Accepted, but this data-plane version does not enforce it: not Current.
    ns.must_apply(&policy("AuthPolicy", "limits", "shop", "  rateLimits: [{name: all, requests: 10, period: 1s}]\n"));
    let message = kstatus_is(&ns, "authpolicy/limits", "Failed").await;
    assert!(message.contains("not enforced"), "{message}");
    // The Middleware is still Current: none of the above is its own failure.
    assert_eq!(ns.kstatus("middleware/shop").0, "Current");

    // A Middleware that cannot be rendered.
    ns.must_apply(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: locked}\nspec:\n  connections:\n    redis:\n      url: {secretKeyRef: {name: absent, key: url}}\n",
    );
    let message = kstatus_is(&ns, "middleware/locked", "Failed").await;
    assert!(message.contains("absent"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_gets_problems_fast_opens_the_breaker_and_degrades_the_middleware() {
    let ns = TestNamespace::new("dp-down");
    let (_closed, closed) = umw_e2e::closed_address();
    let _kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    let routes = format!(
        "  - name: gone\n    match: {{pathPrefix: /}}\n    timeout: 5s\n    upstream:\n      url: 'http://{closed}'\n      circuitBreaker: {{consecutiveFailures: 2, openFor: 30s}}\n"
    );
    ns.must_apply(&middleware_yaml(1, &routes));
    let api: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    ready_and_applied(&api).await;
    let (_, address, admin) = pods(&ns.name).await.remove(0);

    let started = std::time::Instant::now();
    let mut codes = Vec::new();
    for _ in 0..3 {
        let (code, body) = http("GET", &address, "/x").await.expect("an answer, not a hang");
        assert!(body.contains("application/problem+json") || body.contains("https://umw.dev/problems/"), "{body}");
        codes.push(code);
    }
    assert_eq!(codes, [502, 502, 503], "unreachable twice, then the breaker answers");
    assert!(started.elapsed() < Duration::from_secs(5), "no hang: {:?}", started.elapsed());
    let (_, metrics) = http("GET", &admin, "/metrics").await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("umw_circuit_breaker_state{") && l.ends_with(" 1")), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("umw_circuit_breaker_rejections_total{") && l.ends_with(" 1")));

    let degraded = middleware_condition(&api, types::DEGRADED, "True", |m| m.contains("circuit breaker open")).await;
    let condition = conditions::find(&degraded.status.as_ref().unwrap().conditions, types::DEGRADED).unwrap();
    assert!(condition.message.contains(&format!("upstream http://{closed}")), "{}", condition.message);
    assert!(conditions::is_true(&degraded.status.as_ref().unwrap().conditions, types::READY), "degraded, still ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_policy_becomes_enforced_and_the_running_pods_answer_from_redis() {
    let ns = TestNamespace::new("dp-cache");
    // Redis over TLS (a private authority) with a password; both come from a Secret.
    let redis = umw_tests::RedisServer::start_tls("e2e-redis-password");
    let upstream = TestUpstream::start("up").await;
    let _kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    let ca: String = redis.ca_cert.as_deref().unwrap().lines().map(|l| format!("    {l}\n")).collect();
    ns.must_apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: redis}}\nstringData:\n  password: e2e-redis-password\n  ca: |\n{ca}"
    ));
    let connections = format!(
        "  connections:\n    redis:\n      url: {{value: '{}'}}\n      password: {{secretKeyRef: {{name: redis, key: password}}}}\n      caCert: {{secretKeyRef: {{name: redis, key: ca}}}}\n",
        redis.url()
    );
    ns.must_apply(&format!("{}{connections}", middleware_yaml(2, &route("products", "/products", &upstream.url()))));
    let api: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    ready_and_applied(&api).await;
    let (_, address, _) = pods(&ns.name).await.remove(0);
    let (_, before) = http("GET", &address, "/products/1").await.unwrap();
    assert!(!before.contains("cache-status"), "no caching before the policy: {before}");

    ns.must_apply(
        "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata:\n  name: products\nspec:\n  targetRefs:\n  - name: shop\n    sectionName: products\n  rules:\n  - ttl: 60s\n",
    );
    let out = ns.kubectl(&["wait", "--for=condition=Enforced", "cachepolicy/products", "--timeout=90s"]);
    assert!(out.status.success(), "kubectl wait Enforced: {}", String::from_utf8_lossy(&out.stderr));
    let policies: Api<CachePolicy> = Api::namespaced(client().await, &ns.name);
    let policy = policies.get("products").await.unwrap();
    let enforced = conditions::find(&policy.policy_status().unwrap().conditions, types::ENFORCED).unwrap().clone();
    assert_eq!(enforced.reason, "Enforced", "{}", enforced.message);

    // Every pod now caches in the one Redis: the first request fills it, the others are hits.
    let hits_before = upstream.hits();
    let mut statuses = Vec::new();
    for (pod, address, _) in pods(&ns.name).await.iter().chain(pods(&ns.name).await.iter()) {
        let (code, raw) =
            http_host("GET", address, "shop.example", "/products/7").await.unwrap_or_else(|| panic!("{pod} answers"));
        assert_eq!(code, 200);
        let status =
            raw.lines().find(|l| l.to_ascii_lowercase().starts_with("cache-status:")).unwrap_or("").to_string();
        statuses.push(status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(upstream.hits() - hits_before, 1, "one upstream request for four requests over two pods: {statuses:?}");
    assert!(
        statuses[0].contains("fwd=miss; stored") && statuses[1..].iter().all(|s| s.contains("hit")),
        "{statuses:?}"
    );
    let keys: Vec<String> = redis::cmd("KEYS").arg("umw:*").query(&mut redis.connection()).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");

    // A policy that needs what the Middleware lacks is refused, saying what to add: invalidation by events
    // needs the Kafka connection.
    ns.must_apply(
        "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata:\n  name: products\nspec:\n  targetRefs:\n  - name: shop\n    sectionName: products\n  rules:\n  - ttl: 60s\n  invalidation:\n    events:\n    - {topic: products, keyTemplate: 'GET:/products/{{ data.id }}'}\n",
    );
    eventually("Accepted=False naming the missing Kafka connection", WAIT, || async {
        let policy = policies.get_opt("products").await.ok().flatten()?;
        let accepted = conditions::find(&policy.policy_status()?.conditions, types::ACCEPTED)?.clone();
        (accepted.status == "False" && accepted.message.contains("spec.connections.kafka")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_route_becomes_enforced_and_the_running_pods_publish_to_kafka() {
    let ns = TestNamespace::new("dp-events");
    let kafka = tokio::task::spawn_blocking(umw_tests::KafkaBroker::start).await.unwrap();
    kafka.create_topic("orders", 3);
    let upstream = TestUpstream::start("up").await;
    let _kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    // The broker's address comes from a Secret, as it would in a cluster.
    ns.must_apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: kafka}}\nstringData:\n  bootstrap: '{}'\n",
        kafka.bootstrap()
    ));
    let connections =
        "  connections:\n    kafka:\n      bootstrapServers: {secretKeyRef: {name: kafka, key: bootstrap}}\n";
    ns.must_apply(&format!("{}{connections}", middleware_yaml(2, &route("products", "/products", &upstream.url()))));
    let api: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    ready_and_applied(&api).await;

    ns.must_apply(
        "apiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata:\n  name: orders-in\nspec:\n  targetRefs:\n  - name: shop\n  source: {http: {path: /events/orders}}\n  destination: {kafka: {topic: orders, keyTemplate: '{{ data.customer }}'}}\n",
    );
    let out = ns.kubectl(&["wait", "--for=condition=Enforced", "eventroute/orders-in", "--timeout=90s"]);
    assert!(out.status.success(), "kubectl wait Enforced: {}", String::from_utf8_lossy(&out.stderr));
    let routes: Api<EventRoute> = Api::namespaced(client().await, &ns.name);
    let route = routes.get("orders-in").await.unwrap();
    let enforced = conditions::find(&route.policy_status().unwrap().conditions, types::ENFORCED).unwrap().clone();
    assert_eq!(enforced.reason, "Enforced", "{}", enforced.message);

    // Every pod publishes: one event through each.
    let mut ids = Vec::new();
    for (pod, address, _) in pods(&ns.name).await {
        let (status, body) = post_json(&address, "/events/orders", &format!(r#"{{"customer": "{pod}"}}"#))
            .await
            .unwrap_or_else(|| panic!("{pod} answers"));
        assert_eq!(status, 202, "{pod}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        ids.push(answer["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 2);
    let records = tokio::task::spawn_blocking(move || kafka.read("orders", 2, Duration::from_secs(30))).await.unwrap();
    let mut found: Vec<String> = records.iter().filter_map(|r| r.header("ce_id")).collect();
    found.sort();
    ids.sort();
    assert_eq!(found, ids, "both events in the topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_a_middleware_are_recorded_in_postgres_and_relayed_to_kafka_by_the_running_pods() {
    let ns = TestNamespace::new("dp-commands");
    let pg = tokio::task::spawn_blocking(umw_tests::PostgresServer::start);
    let kafka = tokio::task::spawn_blocking(umw_tests::KafkaBroker::start);
    let (pg, kafka) = (pg.await.unwrap(), kafka.await.unwrap());
    kafka.create_topic("orders", 3);
    let upstream = TestUpstream::start("up").await;
    let _kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    // Credentials come from Secrets, as they would in a cluster.
    ns.must_apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: backends}}\nstringData:\n  bootstrap: '{}'\n  postgres: '{}'\n",
        kafka.bootstrap(),
        pg.url()
    ));
    let spec = "  connections:\n    kafka:\n      bootstrapServers: {secretKeyRef: {name: backends, key: bootstrap}}\n    postgres:\n      url: {secretKeyRef: {name: backends, key: postgres}}\n  commands:\n  - name: place-order\n    schema: {type: object, required: [orderId]}\n    event: {type: com.example.order.placed, topic: orders, keyTemplate: '{{ data.orderId }}'}\n";
    ns.must_apply(&format!("{}{spec}", middleware_yaml(2, &route("products", "/products", &upstream.url()))));
    let api: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    let mw = ready_and_applied(&api).await;
    let ready = conditions::find(&mw.status.as_ref().unwrap().conditions, types::READY).unwrap().clone();
    assert!(!ready.message.contains("spec.commands"), "commands are not reported as not enforced: {}", ready.message);

    // Every pod records commands in the shared database; the relays publish each event once.
    let mut ids = Vec::new();
    let pods = pods(&ns.name).await;
    assert_eq!(pods.len(), 2);
    for (pod, address, _) in &pods {
        let (status, body) = post_json(address, "/commands/place-order", &format!(r#"{{"orderId": "{pod}"}}"#))
            .await
            .unwrap_or_else(|| panic!("{pod} answers"));
        assert_eq!(status, 202, "{pod}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        ids.push(answer["id"].as_str().unwrap().to_string());
        let (status, body) = post_json(address, "/commands/place-order", r#"{"no": "order id"}"#).await.unwrap();
        assert_eq!(status, 422, "{pod}: {body}");
    }
    let records = tokio::task::spawn_blocking(move || kafka.read("orders", 3, Duration::from_secs(20))).await.unwrap();
    let mut found: Vec<String> = records.iter().filter_map(|r| r.header("ce_commandid")).collect();
    found.sort();
    ids.sort();
    assert_eq!(found, ids, "both commands' events in the topic, once each");
    assert_eq!(pg.sql("SELECT count(*) FROM umw_commands"), "2");
    // Either pod answers for a command recorded through the other.
    let (_, address, _) = &pods[0];
    for id in &ids {
        let state = eventually("the command published", WAIT, || async {
            let (status, body) = http("GET", address, &format!("/commands/{id}")).await?;
            (status == 200 && body.contains(r#""state":"published""#)).then_some(body)
        })
        .await;
        assert!(state.contains(id.as_str()), "{state}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_secret_values_appear_in_no_log_status_config_map_condition_or_event() {
    let ns = TestNamespace::new("dp-canary");
    let upstream = TestUpstream::start("up").await;
    let _kubelet = kubelet(&ns.name).await;
    let _operator = Operator::start(&ns.name, &["--health-interval", "1s"]);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let canary = format!("canary{nanos:x}");
    // Credentials of servers that are not there (closed ports): every client fails, retries and reports.
    ns.must_apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: creds}}\nstringData:\n  redis: r-{canary}\n  kafka: k-{canary}\n  postgres: 'postgres://shop@127.0.0.1:1/shop?password=p-{canary}'\n  hook: 'Bearer h-{canary}'\n  outbox: o-{canary}\n  cache: c-{canary}\n"
    ));
    let secret = |key: &str| format!("{{secretKeyRef: {{name: creds, key: {key}}}}}");
    let spec = format!(
        "  connections:\n    redis: {{url: {{value: 'redis://127.0.0.1:1'}}, password: {}}}\n    kafka:\n      bootstrapServers: {{value: '127.0.0.1:1'}}\n      sasl: {{mechanism: PLAIN, username: {{value: shop}}, password: {}}}\n    postgres: {{url: {}}}\n  commands:\n  - {{name: order, event: {{type: order.placed, topic: orders}}}}\n  outbox: {{adminToken: {}}}\n",
        secret("redis"),
        secret("kafka"),
        secret("postgres"),
        secret("outbox")
    );
    ns.must_apply(&format!("{}{spec}", middleware_yaml(1, &route("products", "/products", &upstream.url()))));
    ns.must_apply(&format!(
        "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: products}}\nspec:\n  targetRefs: [{{name: shop}}]\n  backend: redis\n  rules: [{{ttl: 60s}}]\n  invalidation: {{adminApi: true, adminToken: {}}}\n---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {{name: hooks}}\nspec:\n  targetRefs: [{{name: shop}}]\n  source: {{http: {{path: /events/in}}}}\n  destination: {{http: {{url: 'http://127.0.0.1:1/hook', headersFrom: {{authorization: {{name: creds, key: hook}}}}}}}}\n  retry: {{maxAttempts: 2}}\n",
        secret("cache")
    ));
    let api: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    ready_and_applied(&api).await;
    // The scenario of the report: PostgreSQL is unreachable, and its URL carries the password.
    middleware_condition(&api, types::DEGRADED, "True", |m| m.contains("postgres")).await;
    let (pod, address, admin) = pods(&ns.name).await.remove(0);
    // Failing deliveries and commands: every error path logs.
    let event = r#"{"specversion": "1.0", "id": "e-1", "type": "t", "source": "/s", "data": {}}"#;
    let _ = post_json(&address, "/events/in", event).await;
    let _ = post_json(&address, "/commands/order", "{}").await;
    let status = http("GET", &admin, "/status").await.map(|(_, body)| body).unwrap_or_default();
    assert!(status.contains("postgres"), "the pod reports: {status}");

    let log = control_plane().dir.join("pods").join(format!("{}_{pod}", ns.name)).join("dataplane.log");
    // The warning that used to print the whole URL (after the first connection attempt times out).
    let text = eventually("the PostgreSQL warning logged", WAIT, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("cannot reach PostgreSQL").then_some(text)
    })
    .await;
    let status = http("GET", &admin, "/status").await.map(|(_, body)| body).unwrap_or(status);
    let mut places = vec![("the pod's /status".to_string(), status)];
    places.push((format!("the pod's log {}", log.display()), text));
    for kind in ["configmaps", "middlewares", "cachepolicies", "eventroutes", "events", "pods"] {
        let out = ns.kubectl(&["get", kind, "-o", "yaml"]);
        places.push((format!("kubectl get {kind}"), String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    assert!(places[1].1.contains("cannot reach PostgreSQL"), "the log was read: {}", places[1].1);
    for (place, text) in &places {
        assert!(!text.contains(&canary), "a Secret's value in {place}:\n{text}");
    }
}
