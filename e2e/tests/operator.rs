//! The operator against a real kube-apiserver and kube-controller-manager.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, Resource, ResourceExt};
use umw_crds::conditions::{self, reasons, status, types};
use umw_crds::{AuthPolicy, CachePolicy, EventRoute, Middleware};
use umw_e2e::{Operator, TestNamespace, control_plane, eventually, operator_writes};

const WAIT: Duration = Duration::from_secs(60);

async fn client() -> Client {
    control_plane().client().await
}

fn middleware_yaml(name: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata:\n  name: {name}\nspec:\n  routes:\n  - name: api\n    upstream:\n      url: http://api.example:8080\n  - name: web\n    upstream:\n      service: {{name: web, port: 80}}\n{extra_spec}"
    )
}

fn cache_policy_yaml(name: &str, target: &str, section: Option<&str>) -> String {
    let section = section.map(|s| format!("\n    sectionName: {s}")).unwrap_or_default();
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata:\n  name: {name}\nspec:\n  targetRefs:\n  - name: {target}{section}\n  rules:\n  - ttl: 30s\n"
    )
}

fn auth_policy_yaml(name: &str, target: &str) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: AuthPolicy\nmetadata:\n  name: {name}\nspec:\n  targetRefs:\n  - name: {target}\n  rateLimits:\n  - name: all\n    requests: 10\n    period: 1s\n"
    )
}

async fn get<K>(api: &Api<K>, name: &str) -> Option<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.ok().flatten()
}

fn condition_of<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(&'a str, &'a str)> {
    conditions::find(conditions, type_).map(|c| (c.status.as_str(), c.reason.as_str()))
}

async fn policy_accepted<K>(api: &Api<K>, name: &str, want: (&str, &str)) -> K
where
    K: umw_crds::Policy + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(&format!("{} {name} Accepted={want:?}", K::kind(&())), WAIT, || async {
        let policy = get(api, name).await?;
        let status = policy.policy_status()?;
        (condition_of(&status.conditions, types::ACCEPTED) == Some(want)).then_some(policy.clone())
    })
    .await
}

#[tokio::test]
async fn a_middleware_gets_its_children_with_owner_references_and_a_replicaset() {
    let ns = TestNamespace::new("children");
    let _operator = Operator::start(&ns.name, &[]);
    ns.must_apply(&middleware_yaml("shop", ""));
    let client = client().await;
    let mws: Api<Middleware> = Api::namespaced(client.clone(), &ns.name);
    let mw = eventually("Middleware status", WAIT, || async {
        let mw = get(&mws, "shop").await?;
        (mw.status.as_ref()?.observed_generation == Some(1)).then_some(mw)
    })
    .await;
    let uid = mw.uid().expect("a stored object has a uid");

    fn owned<K: Resource>(object: &K, uid: &str) -> bool {
        object.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true) && o.kind == "Middleware")
    }
    let cm = eventually("ConfigMap", WAIT, || async {
        get(&Api::<ConfigMap>::namespaced(client.clone(), &ns.name), "umw-shop-config").await
    })
    .await;
    assert!(owned(&cm, &uid));
    assert!(cm.data.as_ref().unwrap()["config.yaml"].contains("kind: Middleware"));
    let sa = eventually("ServiceAccount", WAIT, || async {
        get(&Api::<ServiceAccount>::namespaced(client.clone(), &ns.name), "umw-shop").await
    })
    .await;
    assert!(owned(&sa, &uid));
    let svc = eventually("Service", WAIT, || async {
        get(&Api::<Service>::namespaced(client.clone(), &ns.name), "umw-shop").await
    })
    .await;
    assert!(owned(&svc, &uid));
    let deployment = eventually("Deployment", WAIT, || async {
        get(&Api::<Deployment>::namespaced(client.clone(), &ns.name), "umw-shop").await
    })
    .await;
    assert!(owned(&deployment, &uid));

    // The real controller-manager turns the Deployment into a ReplicaSet.
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    let rs = eventually("ReplicaSet from kube-controller-manager", WAIT, || async {
        rs_api
            .list(&ListParams::default().labels("app.kubernetes.io/instance=shop"))
            .await
            .ok()?
            .items
            .into_iter()
            .next()
    })
    .await;
    assert!(rs.owner_references().iter().any(|o| o.kind == "Deployment" && o.name == "umw-shop"));

    // Status: generation observed, config hash reported, not ready (no kubelet runs the pods).
    let mw = eventually("Ready=False/PodsNotReady", WAIT, || async {
        let mw = get(&mws, "shop").await?;
        (condition_of(&mw.status.as_ref()?.conditions, types::READY) == Some((status::FALSE, reasons::PODS_NOT_READY)))
            .then_some(mw)
    })
    .await;
    let status = mw.status.unwrap();
    assert_eq!(status.config_hash.as_deref().map(str::len), Some(16));
    assert!(conditions::is_true(&status.conditions, types::RECONCILING));
    assert_eq!(condition_of(&status.conditions, types::STALLED), Some((status::FALSE, reasons::AS_EXPECTED)));
}

#[tokio::test]
async fn spec_changes_update_children_and_removing_autoscaling_deletes_the_hpa() {
    let ns = TestNamespace::new("update");
    let _operator = Operator::start(&ns.name, &[]);
    let autoscaling = "  autoscaling:\n    minReplicas: 2\n    maxReplicas: 4\n";
    ns.must_apply(&middleware_yaml("shop", autoscaling));
    let client = client().await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let hpa = eventually("HPA", WAIT, || async { get(&hpas, "umw-shop").await }).await;
    assert_eq!(hpa.spec.max_replicas, 4);
    let first = eventually("Deployment", WAIT, || async { get(&deployments, "umw-shop").await }).await;
    let template = |d: &Deployment| serde_json::to_string(&d.spec.template).unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let config = |c: &ConfigMap| c.data.as_ref().unwrap()["config.yaml"].clone();
    let first_config = eventually("ConfigMap", WAIT, || async { get(&config_maps, "umw-shop-config").await }).await;

    ns.must_apply(&middleware_yaml("shop", "  replicas: 3\n"));
    eventually("HPA deleted", WAIT, || async { get(&hpas, "umw-shop").await.is_none().then_some(()) }).await;
    let updated = eventually("Deployment with 3 replicas", WAIT, || async {
        get(&deployments, "umw-shop").await.filter(|d| d.spec.replicas == Some(3))
    })
    .await;
    assert_eq!(template(&first), template(&updated), "scaling does not roll the pods");
    assert_eq!(config(&first_config), config(&get(&config_maps, "umw-shop-config").await.unwrap()));
    ns.must_apply(&middleware_yaml("shop", "  replicas: 3\n  listeners:\n    websocket: {path: /ws}\n"));
    eventually("a configuration change updates the ConfigMap", WAIT, || async {
        get(&config_maps, "umw-shop-config").await.filter(|c| config(c) != config(&first_config))
    })
    .await;
    let after = get(&deployments, "umw-shop").await.unwrap();
    assert_eq!(template(&after), template(&first), "the pods reload the configuration in place: no rollout");
    let mws: Api<Middleware> = Api::namespaced(client.clone(), &ns.name);
    eventually("observedGeneration 3", WAIT, || async {
        let mw = get(&mws, "shop").await?;
        let status = mw.status?;
        (status.observed_generation == Some(3) && status.conditions.iter().all(|c| c.observed_generation == Some(3)))
            .then_some(())
    })
    .await;

    // Switching autoscaling on hands the replica count to the HPA without dropping it to 1 on the way.
    ns.must_apply(&middleware_yaml(
        "shop",
        "  autoscaling: {minReplicas: 2, maxReplicas: 5}\n  listeners:\n    websocket: {path: /ws}\n",
    ));
    eventually("HPA back", WAIT, || async { get(&hpas, "umw-shop").await }).await;
    for _ in 0..8 {
        let deployment = get(&deployments, "umw-shop").await.expect("the Deployment stays");
        assert_eq!(deployment.spec.replicas, Some(3), "the live replica count survives the hand-over");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn deleting_the_middleware_garbage_collects_its_children() {
    let ns = TestNamespace::new("gc");
    let _operator = Operator::start(&ns.name, &[]);
    ns.must_apply(&middleware_yaml("shop", ""));
    let client = client().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    eventually("Deployment", WAIT, || async { get(&deployments, "umw-shop").await }).await;
    let mws: Api<Middleware> = Api::namespaced(client.clone(), &ns.name);
    mws.delete("shop", &DeleteParams::background()).await.expect("deleting the Middleware");
    eventually("children garbage-collected", Duration::from_secs(90), || async {
        let gone = get(&deployments, "umw-shop").await.is_none()
            && get(&config_maps, "umw-shop-config").await.is_none()
            && get(&Api::<Service>::namespaced(client.clone(), &ns.name), "umw-shop").await.is_none()
            && get(&Api::<ServiceAccount>::namespaced(client.clone(), &ns.name), "umw-shop").await.is_none();
        gone.then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_policy_without_its_target_is_target_not_found_until_the_target_exists() {
    let ns = TestNamespace::new("target");
    let _operator = Operator::start(&ns.name, &[]);
    ns.must_apply(&cache_policy_yaml("cache", "later", Some("api")));
    let client = client().await;
    let policies: Api<CachePolicy> = Api::namespaced(client.clone(), &ns.name);
    let policy = policy_accepted(&policies, "cache", (status::FALSE, reasons::TARGET_NOT_FOUND)).await;
    let message = conditions::find(&policy.status.unwrap().conditions, types::ACCEPTED).unwrap().message.clone();
    assert!(message.contains("\"later\" does not exist"), "{message}");

    ns.must_apply(&middleware_yaml("later", ""));
    let policy = policy_accepted(&policies, "cache", (status::TRUE, reasons::ACCEPTED)).await;
    let status = policy.status.unwrap();
    assert_eq!(condition_of(&status.conditions, types::ENFORCED), Some((status::UNKNOWN, reasons::PENDING)));
    assert_eq!(condition_of(&status.targets[0].conditions, types::ACCEPTED), Some((status::TRUE, reasons::ACCEPTED)));

    // The accepted policy is in the rendered configuration and listed on the Middleware.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    eventually("policy in the ConfigMap", WAIT, || async {
        let cm = get(&config_maps, "umw-later-config").await?;
        cm.data?.get("config.yaml")?.contains("kind: CachePolicy").then_some(())
    })
    .await;
    let mws: Api<Middleware> = Api::namespaced(client.clone(), &ns.name);
    eventually("policy listed on the Middleware", WAIT, || async {
        let mw = get(&mws, "later").await?;
        mw.status?.policies.iter().any(|p| p.kind == "CachePolicy" && p.name == "cache").then_some(())
    })
    .await;
    // And the transitions were announced as Kubernetes Events.
    eventually("Events for TargetNotFound and Accepted", WAIT, || async {
        let events = ns.kubectl(&["get", "events.events.k8s.io", "-o", "jsonpath={.items[*].reason}"]);
        let seen = String::from_utf8_lossy(&events.stdout).to_string();
        (seen.contains("TargetNotFound") && seen.contains("Accepted")).then_some(())
    })
    .await;

    // A policy that needs a connection the Middleware lacks is Invalid, and says which.
    ns.must_apply(
        "apiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata:\n  name: to-kafka\nspec:\n  targetRefs: [{name: later}]\n  source:\n    http: {path: /events}\n  destination:\n    kafka: {topic: orders}\n",
    );
    let routes: Api<umw_crds::EventRoute> = Api::namespaced(client.clone(), &ns.name);
    let route = policy_accepted(&routes, "to-kafka", (status::FALSE, reasons::INVALID)).await;
    let message = conditions::find(&route.status.unwrap().conditions, types::ACCEPTED).unwrap().message.clone();
    assert!(message.contains("spec.connections.kafka"), "{message}");

    // A policy the data plane would refuse is Invalid, naming the field; its Middleware is not stalled by it
    // and its configuration leaves it out.
    ns.must_apply(
        "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata:\n  name: bad-key\nspec:\n  targetRefs: [{name: later, sectionName: web}]\n  rules:\n  - ttl: 30s\n  invalidation: {adminApi: true, adminToken: {value: ''}}\n",
    );
    let bad = policy_accepted(&policies, "bad-key", (status::FALSE, reasons::INVALID)).await;
    let message = conditions::find(&bad.status.unwrap().conditions, types::ACCEPTED).unwrap().message.clone();
    assert!(message.contains("spec.invalidation.adminToken.value"), "{message}");
    // (The Middleware is reconciled after a policy change: give it the time to, had the policy reached it.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mw = get(&mws, "later").await.expect("the Middleware exists");
    let conditions = mw.status.map(|s| s.conditions).unwrap_or_default();
    assert_ne!(
        condition_of(&conditions, types::STALLED),
        Some((status::TRUE, reasons::INVALID_SPEC)),
        "{conditions:?}"
    );
    let config = get(&config_maps, "umw-later-config").await.and_then(|cm| cm.data?.get("config.yaml").cloned());
    assert!(config.as_deref().is_some_and(|c| !c.contains("bad-key")), "{config:?}");

    // Moving the cache policy to another Middleware takes it out of the first one's configuration.
    ns.must_apply(&middleware_yaml("other", ""));
    ns.must_apply(&cache_policy_yaml("cache", "other", None));
    eventually("the moved policy leaves the old configuration", WAIT, || async {
        let old = get(&config_maps, "umw-later-config").await?.data?.get("config.yaml")?.clone();
        let new = get(&config_maps, "umw-other-config").await?.data?.get("config.yaml")?.clone();
        (!old.contains("kind: CachePolicy") && new.contains("kind: CachePolicy")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn of_two_conflicting_policies_the_older_wins() {
    let ns = TestNamespace::new("conflict");
    let _operator = Operator::start(&ns.name, &[]);
    ns.must_apply(&middleware_yaml("shop", ""));
    ns.must_apply(&auth_policy_yaml("first", "shop"));
    let client = client().await;
    let policies: Api<AuthPolicy> = Api::namespaced(client.clone(), &ns.name);
    policy_accepted(&policies, "first", (status::TRUE, reasons::ACCEPTED)).await;
    // Creation timestamps have one-second resolution: make the second policy clearly newer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ns.must_apply(&auth_policy_yaml("second", "shop"));
    let second = policy_accepted(&policies, "second", (status::FALSE, reasons::CONFLICTED)).await;
    let message = conditions::find(&second.status.unwrap().conditions, types::ACCEPTED).unwrap().message.clone();
    assert!(message.contains("\"first\""), "the message names the winner: {message}");
    policy_accepted(&policies, "first", (status::TRUE, reasons::ACCEPTED)).await;

    // Once the winner goes, the other one takes its place.
    policies.delete("first", &DeleteParams::default()).await.expect("deleting the winner");
    policy_accepted(&policies, "second", (status::TRUE, reasons::ACCEPTED)).await;
}

#[tokio::test]
async fn an_ingest_path_a_route_serves_is_conflicted_naming_the_route_and_kstatus_reads_failed() {
    let ns = TestNamespace::new("paths");
    let _operator = Operator::start(&ns.name, &[]);
    let kafka = "  connections:\n    kafka:\n      bootstrapServers: {value: 'kafka:9092'}\n";
    ns.must_apply(&format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata:\n  name: shop\nspec:\n  routes:\n  - name: orders\n    match: {{pathPrefix: /orders}}\n    upstream: {{url: 'http://orders:8080'}}\n    requestSchema: {{type: object, required: [sku]}}\n  - name: rest\n    upstream: {{url: 'http://web:8080'}}\n{kafka}"
    ));
    let ingest = |name: &str, path: &str| {
        format!(
            "apiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {{name: {name}}}\nspec:\n  targetRefs: [{{name: shop}}]\n  source: {{http: {{path: {path}}}}}\n  destination: {{kafka: {{topic: orders}}}}\n"
        )
    };
    ns.must_apply(&ingest("shadowing", "/orders/new"));
    ns.must_apply(&ingest("beside", "/events/orders"));
    let client = client().await;
    let routes: Api<EventRoute> = Api::namespaced(client.clone(), &ns.name);
    let shadowing = policy_accepted(&routes, "shadowing", (status::FALSE, reasons::CONFLICTED)).await;
    let message = conditions::find(&shadowing.status.unwrap().conditions, types::ACCEPTED).unwrap().message.clone();
    assert!(message.contains("route \"orders\"") && message.contains("POST /orders/new"), "{message}");
    // The catch-all route `rest` owns no particular path.
    policy_accepted(&routes, "beside", (status::TRUE, reasons::ACCEPTED)).await;
    let (state, message) = ns.kstatus("eventroute/shadowing");
    assert_eq!(state, "Failed", "{message}");
    assert!(message.contains("route \"orders\""), "{message}");
    // Only the accepted one reaches the configuration.
    let config = eventually("the rendered configuration", WAIT, || async {
        let out = ns.kubectl(&["get", "configmap", "umw-shop-config", "-o", "jsonpath={.data}"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains("beside")).then_some(text)
    })
    .await;
    assert!(!config.contains("shadowing"), "{config}");
}

#[tokio::test]
async fn a_missing_secret_stalls_the_middleware_until_it_exists() {
    let ns = TestNamespace::new("secret");
    let _operator = Operator::start(&ns.name, &["--stall-retry", "2s"]);
    let redis = "  connections:\n    redis:\n      url:\n        secretKeyRef: {name: redis, key: url}\n";
    ns.must_apply(&middleware_yaml("shop", redis));
    let client = client().await;
    let mws: Api<Middleware> = Api::namespaced(client.clone(), &ns.name);
    let mw = eventually("Stalled=True/SecretNotFound", WAIT, || async {
        let mw = get(&mws, "shop").await?;
        (condition_of(&mw.status.as_ref()?.conditions, types::STALLED)
            == Some((status::TRUE, reasons::SECRET_NOT_FOUND)))
        .then_some(mw)
    })
    .await;
    let message = conditions::find(&mw.status.unwrap().conditions, types::STALLED).unwrap().message.clone();
    assert!(
        message.contains("Secret \"redis\" does not exist") && message.contains("spec.connections.redis.url"),
        "{message}"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(get(&deployments, "umw-shop").await.is_none(), "nothing is rolled out that could not start");

    ns.must_apply("apiVersion: v1\nkind: Secret\nmetadata:\n  name: redis\nstringData:\n  url: redis://redis:6379\n");
    let deployment =
        eventually("Deployment after the Secret appeared", WAIT, || async { get(&deployments, "umw-shop").await })
            .await;
    let env = deployment.spec.template.spec.unwrap().containers[0].env.clone().unwrap();
    let secret_env =
        env.iter().find(|e| e.name.starts_with("UMW_SECRET_REDIS_URL_")).expect("the Secret is passed as an env var");
    assert!(secret_env.value.is_none() && secret_env.value_from.is_some(), "never the value itself");
    eventually("Stalled=False", WAIT, || async {
        let mw = get(&mws, "shop").await?;
        (condition_of(&mw.status.as_ref()?.conditions, types::STALLED) == Some((status::FALSE, reasons::AS_EXPECTED)))
            .then_some(())
    })
    .await;
}

/// The sum of an operator metric's samples.
fn operator_metric(operator: &Operator, name: &str) -> f64 {
    operator
        .metrics()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn secrets_are_watched_created_and_deleted_ones_are_acted_on_in_seconds_and_read_once_per_version() {
    let ns = TestNamespace::new("secret-watch");
    // No retry could explain what follows: only the watch.
    let operator = Operator::start(&ns.name, &["--stall-retry", "10m"]);
    let redis = "  connections:\n    redis:\n      url:\n        secretKeyRef: {name: redis, key: url}\n";
    ns.must_apply(&middleware_yaml("shop", redis));
    let client = client().await;
    let mws: Api<Middleware> = Api::namespaced(client.clone(), &ns.name);
    let stalled = |want: (&'static str, &'static str)| {
        let mws = mws.clone();
        async move {
            eventually(&format!("Stalled={want:?}"), Duration::from_secs(20), || async {
                let mw = get(&mws, "shop").await?;
                (condition_of(&mw.status.as_ref()?.conditions, types::STALLED) == Some(want)).then_some(mw)
            })
            .await
        }
    };
    stalled((status::TRUE, reasons::SECRET_NOT_FOUND)).await;
    ns.must_apply("apiVersion: v1\nkind: Secret\nmetadata:\n  name: redis\nstringData:\n  url: redis://redis:6379\n");
    stalled((status::FALSE, reasons::AS_EXPECTED)).await;
    let reads = operator_metric(&operator, "umw_operator_secret_reads_total");
    assert!(reads >= 1.0, "the keys were read");
    // More reconciles of the same Secret version read nothing more.
    for i in 0..3 {
        let out = ns.kubectl(&["annotate", "--overwrite", "middleware/shop", &format!("touch=t{i}")]);
        assert!(out.status.success());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(operator_metric(&operator, "umw_operator_secret_reads_total"), reads, "once per version");
    // A key removed: the new version is read, and the Middleware says which key is missing.
    let out = ns.kubectl(&["patch", "secret", "redis", "--type=json", "-p", r#"[{"op":"remove","path":"/data/url"}]"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mw = stalled((status::TRUE, reasons::SECRET_NOT_FOUND)).await;
    let message = conditions::find(&mw.status.unwrap().conditions, types::STALLED).unwrap().message.clone();
    assert!(message.contains("has no key \"url\""), "{message}");
    // Deleted: reported at once, not at the next retry.
    ns.must_apply("apiVersion: v1\nkind: Secret\nmetadata:\n  name: redis\nstringData:\n  url: redis://redis:6379\n");
    stalled((status::FALSE, reasons::AS_EXPECTED)).await;
    let out = ns.kubectl(&["delete", "secret", "redis"]);
    assert!(out.status.success());
    let mw = stalled((status::TRUE, reasons::SECRET_NOT_FOUND)).await;
    let message = conditions::find(&mw.status.unwrap().conditions, types::STALLED).unwrap().message.clone();
    assert!(message.contains("Secret \"redis\" does not exist"), "{message}");
}

#[tokio::test]
async fn a_tls_secret_must_hold_its_keys_and_a_renewed_one_does_not_roll_the_pods() {
    let ns = TestNamespace::new("tls-secret");
    let _operator = Operator::start(&ns.name, &["--stall-retry", "2s"]);
    let tls = "  listeners:\n    http:\n      tls:\n        certificates: [{secretName: shop-tls}]\n        clientCertificates: {caSecretName: clients}\n";
    ns.must_apply(&middleware_yaml("shop", tls));
    let client = client().await;
    let mws: Api<Middleware> = Api::namespaced(client.clone(), &ns.name);
    let message =
        |mw: Middleware| conditions::find(&mw.status.unwrap().conditions, types::STALLED).unwrap().message.clone();
    let mw = stalled_with(&mws, "shop", (status::TRUE, reasons::SECRET_NOT_FOUND)).await;
    let text = message(mw);
    assert!(
        text.contains("Secret \"clients\" does not exist")
            && text.contains("spec.listeners.http.tls.clientCertificates.caSecretName"),
        "{text}"
    );
    ns.must_apply("apiVersion: v1\nkind: Secret\nmetadata: {name: clients}\nstringData: {ca.crt: pem}\n");
    // A Secret without its private key is named with the key it lacks.
    ns.must_apply("apiVersion: v1\nkind: Secret\nmetadata: {name: shop-tls}\nstringData: {tls.crt: pem}\n");
    let mw = eventually("the missing key reported", WAIT, || async {
        let mw = get(&mws, "shop").await?;
        let stalled = conditions::find(&mw.status.as_ref()?.conditions, types::STALLED)?;
        stalled.message.contains("has no key \"tls.key\"").then_some(mw)
    })
    .await;
    assert!(message(mw).contains("spec.listeners.http.tls.certificates[0].secretName"));
    ns.must_apply(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: shop-tls}\nstringData: {tls.crt: pem, tls.key: pem}\n",
    );
    stalled_with(&mws, "shop", (status::FALSE, reasons::AS_EXPECTED)).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let deployment = eventually("the Deployment", WAIT, || async { get(&deployments, "umw-shop").await }).await;
    let pod = deployment.spec.template.spec.clone().unwrap();
    let mounts: Vec<String> = pod.containers[0].volume_mounts.iter().flatten().map(|m| m.mount_path.clone()).collect();
    assert!(mounts.contains(&"/etc/umw/tls/shop-tls".to_string()), "{mounts:?}");
    assert!(mounts.contains(&"/etc/umw/tls/clients".to_string()), "{mounts:?}");
    let generation = deployment.metadata.generation;

    // A renewed certificate (cert-manager writes the same Secret): the pods read it in place.
    ns.must_apply(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: shop-tls}\nstringData: {tls.crt: renewed, tls.key: renewed}\n",
    );
    let out = ns.kubectl(&["annotate", "--overwrite", "middleware/shop", "touch=after-renewal"]);
    assert!(out.status.success());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = get(&deployments, "umw-shop").await.unwrap();
    assert_eq!(after.metadata.generation, generation, "the Deployment was not changed by the renewal");
}

/// Waits until the Middleware `name` has `Stalled` with this status and reason, and returns it.
async fn stalled_with(api: &Api<Middleware>, name: &str, want: (&'static str, &'static str)) -> Middleware {
    eventually(&format!("{name}: Stalled={want:?}"), WAIT, || async {
        let mw = get(api, name).await?;
        (condition_of(&mw.status.as_ref()?.conditions, types::STALLED) == Some(want)).then_some(mw)
    })
    .await
}

#[tokio::test]
async fn a_child_the_api_server_refuses_stalls_the_middleware_with_its_message() {
    let ns = TestNamespace::new("refused");
    let _operator = Operator::start(&ns.name, &[]);
    // The schema cannot check label syntax; the API server refuses the Deployment.
    ns.must_apply(&middleware_yaml("shop", "  pod:\n    labels: {\"not a label\": x}\n"));
    let mws: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    let mw = stalled_with(&mws, "shop", (status::TRUE, reasons::APPLY_FAILED)).await;
    let message = conditions::find(&mw.status.unwrap().conditions, types::STALLED).unwrap().message.clone();
    assert!(message.contains("not a label") && message.contains("correct the Middleware spec"), "{message}");

    ns.must_apply(&middleware_yaml("shop", "  pod:\n    labels: {team: a}\n"));
    stalled_with(&mws, "shop", (status::FALSE, reasons::AS_EXPECTED)).await;
}

/// A cluster-scoped object deleted when dropped.
struct ClusterObject(&'static str, String);

impl Drop for ClusterObject {
    fn drop(&mut self) {
        let _ = control_plane().kubectl(&["delete", self.0, &self.1, "--ignore-not-found", "--wait=false"]);
    }
}

#[tokio::test]
async fn writes_that_keep_failing_with_a_server_error_show_on_the_status_and_clear_when_they_pass() {
    let ns = TestNamespace::new("failing");
    let _operator = Operator::start(&ns.name, &["--apply-stall-after", "3s"]);
    // A validating webhook for this namespace's Services that is down (a port that refuses connections):
    // the API server answers every Service write 500 "failed calling webhook", as it would with a full
    // Service IP range or an admission controller that is unreachable.
    let (_closed, closed) = umw_e2e::closed_address();
    let webhook = ClusterObject("validatingwebhookconfiguration", format!("umw-test-down-{}", ns.name));
    let config = format!(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\nmetadata:\n  name: {name}\nwebhooks:\n- name: down.umw.test\n  clientConfig: {{url: 'https://{closed}/validate'}}\n  rules: [{{operations: [CREATE, UPDATE], apiGroups: [''], apiVersions: [v1], resources: [services]}}]\n  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}\n  failurePolicy: Fail\n  sideEffects: None\n  admissionReviewVersions: [v1]\n  timeoutSeconds: 2\n",
        name = webhook.1,
        ns = ns.name,
    );
    let out = control_plane().kubectl_stdin(&["apply", "-f", "-"], Some(&config));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    ns.must_apply(&middleware_yaml("shop", ""));
    let mws: Api<Middleware> = Api::namespaced(client().await, &ns.name);
    let mw = stalled_with(&mws, "shop", (status::TRUE, reasons::APPLY_FAILING)).await;
    let status = mw.status.unwrap();
    let message = &conditions::find(&status.conditions, types::STALLED).unwrap().message;
    assert!(message.contains("failed calling webhook") && message.contains("keeps retrying"), "{message}");
    let ready = conditions::find(&status.conditions, types::READY).unwrap();
    assert_eq!(ready.status, status::FALSE, "{ready:?}");

    // The webhook gone, the next retry writes the Service and the condition clears.
    drop(webhook);
    stalled_with(&mws, "shop", (status::FALSE, reasons::AS_EXPECTED)).await;
    let services: Api<Service> = Api::namespaced(client().await, &ns.name);
    assert!(get(&services, "umw-shop").await.is_some(), "the Service was written");
}

#[tokio::test]
async fn restarting_the_operator_converges_without_duplicates_and_a_steady_state_writes_nothing() {
    let ns = TestNamespace::new("restart");
    let mut operator = Operator::start(&ns.name, &["--resync", "2s"]);
    ns.must_apply(&middleware_yaml(
        "one",
        "  autoscaling: {minReplicas: 1, maxReplicas: 3}\n  disruptionBudget: {minAvailable: 1}\n",
    ));
    ns.must_apply(&cache_policy_yaml("cache", "one", None));
    let client = client().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually("first Deployment", WAIT, || async { get(&deployments, "umw-one").await }).await;

    // Kill it hard while a second Middleware is being created, then start it again.
    ns.must_apply(&middleware_yaml("two", ""));
    operator.kill();
    ns.must_apply(&middleware_yaml("three", ""));
    operator.restart();

    let mws: Api<Middleware> = Api::namespaced(client.clone(), &ns.name);
    eventually("all three Middlewares reconciled", WAIT, || async {
        for name in ["one", "two", "three"] {
            let mw = get(&mws, name).await?;
            let status = mw.status?;
            (status.observed_generation == Some(1) && status.conditions.len() == 4).then_some(())?;
            get(&deployments, &format!("umw-{name}")).await?;
        }
        Some(())
    })
    .await;
    let owned = |kind: &str| {
        let out = ns.kubectl(&["get", kind, "-l", "app.kubernetes.io/managed-by=umw-operator", "-o", "name"]);
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(owned("deployments"), 3);
    assert_eq!(owned("configmaps"), 3);
    assert_eq!(owned("services"), 3);
    assert_eq!(owned("serviceaccounts"), 3);
    assert_eq!(owned("hpa"), 1);
    assert_eq!(owned("pdb"), 1);

    // Let the last status updates land, then watch a quiet period: resyncs every 2s, a restart (which
    // relists and reconciles everything), and no write at all.
    eventually("a quiet period of 5s", WAIT, || async {
        let start = SystemTime::now() - Duration::from_secs(5);
        operator_writes(&ns.name, start).is_empty().then_some(())
    })
    .await;
    let since = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    operator.restart_gracefully();
    // The window must really cover reconciles of everything by the new process: it counts them.
    let reconciles = |op: &Operator, controller: &str| {
        let key = format!("umw_operator_reconcile_duration_seconds_count{{controller=\"{controller}\"}} ");
        op.metrics()?.lines().find_map(|l| l.strip_prefix(key.as_str()).and_then(|n| n.parse::<u64>().ok()))
    };
    eventually("the restarted operator reconciles everything at start and on two resyncs", WAIT, || async {
        (reconciles(&operator, "middleware")? >= 9 && reconciles(&operator, "cachepolicy")? >= 3).then_some(())
    })
    .await;
    let writes = operator_writes(&ns.name, since);
    assert!(writes.is_empty(), "steady state must not write, but the operator sent: {writes:#?}");
}

#[tokio::test]
async fn invalid_resources_are_refused_with_a_readable_message() {
    let ns = TestNamespace::new("invalid");
    let mw =
        |spec: &str| format!("apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata:\n  name: bad\nspec:\n{spec}");
    let cases: Vec<(&str, String, &str)> = vec![
        ("upstream with service and url", mw("  routes:\n  - name: a\n    upstream:\n      url: http://x\n      service: {name: s, port: 80}\n"), "upstream needs exactly one of service or url"),
        ("upstream with neither", mw("  routes:\n  - name: a\n    upstream: {}\n"), "upstream needs exactly one of service or url"),
        ("unparsable duration", mw("  routes:\n  - name: a\n    timeout: soon\n    upstream: {url: http://x}\n"), "spec.routes[0].timeout"),
        ("zero duration", mw("  routes:\n  - name: a\n    timeout: 0s\n    upstream: {url: http://x}\n"), "must be a positive duration"),
        ("duplicate route names", mw("  routes:\n  - name: a\n    upstream: {url: http://x}\n  - name: a\n    upstream: {url: http://y}\n"), "route names must be unique"),
        ("port out of range", mw("  listeners:\n    http: {port: 70000}\n"), "spec.listeners.http.port"),
        ("privileged port", mw("  listeners:\n    http: {port: 80}\n"), "should be greater than or equal to 1024"),
        ("budget above 100%", mw("  disruptionBudget: {maxUnavailable: \"150%\"}\n"), "a percentage from 0% to 100%"),
        ("clashing ports", mw("  listeners:\n    http: {port: 9901}\n"), "http.port and adminPort must differ"),
        ("min above max replicas", mw("  autoscaling: {minReplicas: 5, maxReplicas: 2}\n"), "minReplicas must not exceed maxReplicas"),
        ("both budget fields", mw("  disruptionBudget: {minAvailable: 1, maxUnavailable: 1}\n"), "set exactly one of minAvailable and maxUnavailable"),
        ("secret and value", mw("  connections:\n    redis:\n      url: {value: redis://x, secretKeyRef: {name: s, key: k}}\n"), "set exactly one of value or secretKeyRef"),
        ("unknown field", mw("  replica: 2\n"), "unknown field \"spec.replica\""),
        ("bad method", mw("  routes:\n  - name: a\n    match: {methods: [FETCH]}\n    upstream: {url: http://x}\n"), "Unsupported value: \"FETCH\""),
        (
            "event route with two sources",
            "apiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata:\n  name: bad\nspec:\n  targetRefs: [{name: shop}]\n  source:\n    http: {path: /e}\n    kafka: {topic: t}\n  destination:\n    kafka: {topic: out}\n".into(),
            "source needs exactly one of http, kafka and outbox",
        ),
        (
            "event route without destination",
            "apiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata:\n  name: bad\nspec:\n  targetRefs: [{name: shop}]\n  source:\n    http: {path: /e}\n  destination: {}\n".into(),
            "destination needs exactly one of kafka, http and websocket",
        ),
        (
            "event route on a route",
            "apiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata:\n  name: bad\nspec:\n  targetRefs: [{name: shop, sectionName: api}]\n  source:\n    http: {path: /e}\n  destination:\n    kafka: {topic: out}\n".into(),
            "event routes attach to a whole Middleware",
        ),
        (
            "the same target twice",
            "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata:\n  name: bad\nspec:\n  targetRefs: [{name: shop}, {name: shop}]\n  rules:\n  - ttl: 1m\n".into(),
            "targetRefs must not name the same target twice",
        ),
        (
            "policy without targets",
            "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata:\n  name: bad\nspec:\n  targetRefs: []\n  rules:\n  - ttl: 1m\n".into(),
            "spec.targetRefs: Invalid value",
        ),
        (
            "empty auth policy",
            "apiVersion: umw.dev/v1alpha1\nkind: AuthPolicy\nmetadata:\n  name: bad\nspec:\n  targetRefs: [{name: shop}]\n".into(),
            "an AuthPolicy needs at least one of jwt, oidc, apiKeys, rateLimits and authorization",
        ),
        (
            "uncacheable method",
            "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata:\n  name: bad\nspec:\n  targetRefs: [{name: shop}]\n  rules:\n  - ttl: 1m\n    match: {methods: [POST]}\n".into(),
            "Unsupported value: \"POST\"",
        ),
    ];
    let mut failures = Vec::new();
    for (what, yaml, fragment) in &cases {
        let out = ns.apply(yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{what}: accepted, expected a refusal containing {fragment:?}"));
        } else if !stderr.contains(fragment) {
            failures.push(format!("{what}: refused, but the message lacks {fragment:?}:\n{stderr}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[tokio::test]
async fn kubectl_wait_works_on_each_kind_and_get_umw_reads_well() {
    let ns = TestNamespace::new("wait");
    let _operator = Operator::start(&ns.name, &[]);
    // Zero replicas: ready without a kubelet.
    ns.must_apply(&middleware_yaml(
        "shop",
        "  replicas: 0\n  connections:\n    kafka:\n      bootstrapServers: {value: kafka:9092}\n",
    ));
    ns.must_apply(&cache_policy_yaml("cache", "shop", Some("api")));
    ns.must_apply(&auth_policy_yaml("auth", "shop"));
    ns.must_apply(
        "apiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata:\n  name: events\nspec:\n  targetRefs: [{name: shop}]\n  source:\n    http: {path: /events}\n  destination:\n    kafka: {topic: orders}\n",
    );
    for (object, condition) in [
        ("middleware/shop", "condition=Ready"),
        ("cachepolicy/cache", "condition=Accepted"),
        ("authpolicy/auth", "condition=Accepted"),
        ("eventroute/events", "condition=Accepted"),
        ("mw/shop", "condition=Stalled=False"),
        ("cachepol/cache", "condition=Enforced=Unknown"),
    ] {
        let out = ns.kubectl(&["wait", &format!("--for={condition}"), object, "--timeout=60s"]);
        assert!(
            out.status.success(),
            "kubectl wait --for={condition} {object}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = ns.kubectl(&["get", "umw"]);
    let table = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "middleware.umw.dev/shop",
        "cachepolicy.umw.dev/cache",
        "authpolicy.umw.dev/auth",
        "eventroute.umw.dev/events",
        "READY",
        "REASON",
        "ACCEPTED",
        "ENFORCED",
        "ScaledToZero",
    ] {
        assert!(table.contains(expected), "`kubectl get umw` lacks {expected:?}:\n{table}");
    }
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_hand_over_on_shutdown() {
    let ns = TestNamespace::new("leader");
    let mut first = Operator::start(&ns.name, &[]);
    let leader_of = |op: &Operator| op.metrics().is_some_and(|m| m.lines().any(|l| l == "umw_operator_leader 1"));
    eventually("first replica leads", WAIT, || async { leader_of(&first).then_some(()) }).await;
    let holder = ns.jsonpath("lease/umw-operator-leader", "{.spec.holderIdentity}");
    assert!(!holder.is_empty(), "the leader holds the lease");
    let mut second = Operator::start(&ns.name, &[]);
    eventually("the standby's admin endpoints", WAIT, || async { second.metrics().map(|_| ()) }).await;
    // Watched for longer than one lease duration (15 s): a standby that took over when the lease came up
    // for renewal would show here.
    let until = std::time::Instant::now() + Duration::from_secs(17);
    while std::time::Instant::now() < until {
        assert!(!leader_of(&second), "only one replica leads");
        assert_eq!(ns.jsonpath("lease/umw-operator-leader", "{.spec.holderIdentity}"), holder, "the lease stays");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let status = first.terminate().expect("the leader exits on SIGTERM");
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    eventually("the standby takes over", Duration::from_secs(30), || async { leader_of(&second).then_some(()) }).await;
    ns.must_apply(&middleware_yaml("shop", ""));
    let deployments: Api<Deployment> = Api::namespaced(client().await, &ns.name);
    eventually("the new leader reconciles", WAIT, || async { get(&deployments, "umw-shop").await }).await;
    second.kill();
}

#[tokio::test]
async fn a_leader_that_loses_its_lease_stops_and_exits() {
    let ns = TestNamespace::new("lost-lease");
    let mut operator = Operator::start(&ns.name, &[]);
    let leader = |op: &Operator| op.metrics().is_some_and(|m| m.lines().any(|l| l == "umw_operator_leader 1"));
    eventually("the operator leads", WAIT, || async { leader(&operator).then_some(()) }).await;

    // Another candidate takes the lease over (as after a network partition).
    let now = k8s_openapi::jiff::Timestamp::now();
    let now = format!("{}.{:06}Z", now.strftime("%Y-%m-%dT%H:%M:%S"), now.subsec_microsecond());
    let patch = format!(r#"{{"spec":{{"holderIdentity":"intruder","renewTime":"{now}","leaseDurationSeconds":60}}}}"#);
    let out = ns.kubectl(&["patch", "lease", "umw-operator-leader", "--type=merge", "-p", &patch]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let status =
        operator.wait_exit(Duration::from_secs(30)).expect("the operator exits once it sees the lease is gone");
    assert!(!status.success(), "losing the lease is an error exit, so that the pod restarts: {status}");
    assert!(operator.log().contains("another replica holds the lease"), "{}", operator.log());
}

#[tokio::test]
async fn the_examples_apply_and_every_policy_in_them_is_accepted() {
    let ns = TestNamespace::new("examples");
    let _operator = Operator::start(&ns.name, &[]);
    let examples = umw_e2e::repo_root().join("examples/shop");
    let out = ns.kubectl(&["apply", "-f", &examples.to_string_lossy()]);
    assert!(out.status.success(), "kubectl apply -f examples/shop/: {}", String::from_utf8_lossy(&out.stderr));
    for object in ["cachepolicy/shop-cache", "eventroute/shop-orders", "authpolicy/shop-auth"] {
        let out = ns.kubectl(&["wait", "--for=condition=Accepted", object, "--timeout=60s"]);
        assert!(out.status.success(), "{object}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // No kubelet runs the pods, so the example Middleware is rolling out rather than ready.
    let out = ns.kubectl(&["wait", "--for=condition=Reconciling", "middleware/shop", "--timeout=60s"]);
    assert!(out.status.success(), "middleware/shop: {}", String::from_utf8_lossy(&out.stderr));
    let out = ns.kubectl(&["get", "deployment/umw-shop", "pdb/umw-shop", "configmap/umw-shop-config", "-o", "name"]);
    assert!(out.status.success(), "the example's children: {}", String::from_utf8_lossy(&out.stderr));
}
