//! The real-node lane: the images built from `Dockerfile.operator` and `Dockerfile.dataplane` (`make
//! images`), run by a real kubelet on containerd and runc (`e2e/testenv/node.sh`), installed with
//! `helm install`, serving `examples/shop/` as applied by a user, with Kafka, Redis and PostgreSQL
//! reachable from the pods through Services and cluster DNS.
//!
//! What the process-kubelet lane cannot show, this one does: the images start; the rendered
//! securityContext, volumes and probes work under a real runtime; the kubelet's own ConfigMap updates and
//! Secret volumes reach the containers.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use umw_crds::Middleware;
use umw_crds::conditions::{self, types};
use umw_e2e::node::{Process, images, real_node};
use umw_e2e::{TestNamespace, TestUpstream, eventually, http, http_raw, https_get, post_json, repo_root};
use umw_tests::{KafkaBroker, PostgresServer, RedisServer};

const WAIT: Duration = Duration::from_secs(180);

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A certificate authority and server certificates for `shop.test`, made with `openssl`.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("umw-node-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl").args(args).current_dir(&self.dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    }

    fn authority(&self) {
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let out = ["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=shop-test-ca"];
        self.openssl(&[&["req", "-x509"][..], &ec, &out].concat());
    }

    fn server(&self, name: &str) {
        let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        std::fs::write(self.dir.join("server.ext"), "subjectAltName=DNS:shop.test\nextendedKeyUsage=serverAuth\n")
            .unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        self.openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", "/CN=shop.test"]].concat());
        let ca = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "server.ext"];
        self.openssl(&[&["x509", "-req", "-in", &csr, "-out", &crt][..], &ca].concat());
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap()
    }

    fn der(&self, name: &str) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::from_pem_slice(&self.read(&format!("{name}.crt"))).unwrap().to_vec()
    }

    /// A `kubernetes.io/tls` Secret holding `name`'s certificate and key.
    fn tls_secret(&self, secret: &str, name: &str) -> String {
        let text = |f: String| String::from_utf8(self.read(&f)).unwrap();
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": text(format!("{name}.crt")), "tls.key": text(format!("{name}.key"))},
        })
        .to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each image, started by containerd and runc as a user would run it (`docker run IMAGE`): with the
/// image's own user and entrypoint, a read-only root file system and no Kubernetes settings.
#[test]
fn the_images_start_as_a_non_root_user_with_every_library_they_need() {
    let cp = real_node();
    let node = cp.node();
    let images = images();

    // The libraries each binary links against are in its image, and its user is not root.
    let out = Command::new("bash").arg(repo_root().join("e2e/testenv/images.sh")).arg("check").output().unwrap();
    assert!(out.status.success(), "images.sh check:\n{}", text(&out));

    // The operator's binary runs to completion in its image (the chart's pods below use its entrypoint).
    let id = format!("umw-image-operator-{}", std::process::id());
    let out = node.ctr(&["run", "--rm", "--read-only", &images.operator, &id, "/usr/local/bin/umw-operator", "crds"]);
    assert!(out.status.success(), "umw-operator crds in {}: {}", images.operator, text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kind: CustomResourceDefinition"), "{}", text(&out));

    // The data plane serves examples/shop/ (in-process backends) from its image, as its image's user.
    let (http_port, admin_port) = (umw_tests::ports::reserve(), umw_tests::ports::reserve());
    let id = format!("umw-image-dataplane-{}", std::process::id());
    let config = repo_root().join("examples/shop");
    let mount = format!("type=bind,src={},dst=/etc/umw,options=rbind:ro", config.display());
    let out = node.ctr(&[
        "run",
        "-d",
        "--read-only",
        "--net-host",
        "--mount",
        &mount,
        &images.dataplane,
        &id,
        "/usr/local/bin/umw-dataplane",
        "--config",
        "/etc/umw",
        "--in-process-backends",
        "--http-address",
        &format!("127.0.0.1:{http_port}"),
        "--admin-address",
        &format!("127.0.0.1:{admin_port}"),
    ]);
    assert!(out.status.success(), "ctr run {}: {}", images.dataplane, text(&out));
    let cleanup = || {
        let _ = node.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
        std::thread::sleep(Duration::from_millis(500));
        let _ = node.ctr(&["tasks", "delete", "-f", &id]);
        let _ = node.ctr(&["containers", "delete", &id]);
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let answer = umw_e2e::http_get(admin_port.get(), "/readyz");
        if answer.as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 200")) || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let pid = node.container_pid(&id);
    let uid = pid.and_then(|pid| Process { pid }.status_field("Uid"));
    cleanup();
    assert!(ready.as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 200")), "the data plane in its image: {ready:?}");
    let uid = uid.expect("the data plane's process");
    assert!(uid.split_whitespace().all(|id| id == "65532"), "the data plane runs as 65532, not {uid}");
}

/// The running data-plane pods of the Middleware `shop` in `namespace`: name, pod IP, container id.
async fn shop_pods(client: &Client, namespace: &str) -> Vec<(String, String, String)> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&ListParams::default().labels("app.kubernetes.io/instance=shop")).await.unwrap();
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            let ip = status.pod_ip.clone()?;
            let container = status.container_statuses.as_ref()?.first()?.container_id.clone()?;
            Some((p.name_any(), ip, container.trim_start_matches("containerd://").to_string()))
        })
        .collect()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.restart_count)
        .unwrap_or_default()
}

/// Waits until the Middleware is Ready with every pod on the current configuration, the given
/// components Up, and returns it.
async fn ready_with(api: &Api<Middleware>, components: &[&str]) -> Middleware {
    eventually(&format!("Middleware shop Ready, applied, with {components:?} Up"), WAIT, || async {
        let mw = api.get_opt("shop").await.ok().flatten()?;
        let status = mw.status.as_ref()?;
        let ready = conditions::is_true(&status.conditions, types::READY);
        let applied = status.applied_config_hash.is_some() && status.applied_config_hash == status.config_hash;
        let up = components.iter().all(|name| status.components.iter().any(|c| c.name == *name && c.state == "Up"));
        (ready && applied && up && status.ready_replicas == Some(2)).then_some(mw.clone())
    })
    .await
}

/// A Service without a selector and its EndpointSlice: `name.namespace.svc:port` reaches `ip:target`.
fn external_service(name: &str, port: u16, ip: &str, target: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: main, port: {port}, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: main, port: {target}, protocol: TCP}}]\nendpoints: [{{addresses: ['{ip}']}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_and_the_shop_example_on_a_real_node() {
    let cp = real_node();
    let node = cp.node().clone();
    let node_ip = node.ip.to_string();
    let client = cp.client().await;
    let images = images();

    // The backends the example names (redis.shop.svc, kafka.shop.svc, postgres.shop.svc and the shop
    // API), on the node's address, behind Services in the namespace the example expects.
    let redis = RedisServer::start_on(&node_ip);
    let kafka = KafkaBroker::start_on(&node_ip);
    kafka.create_topic("shop.orders", 3);
    let postgres = PostgresServer::start_on(&node_ip, &node.subnet);
    postgres.sql("CREATE ROLE shop LOGIN PASSWORD 'change-me'");
    postgres.sql("CREATE DATABASE shop OWNER shop");
    let shop_api = TestUpstream::start_on("shop-api", node.ip).await;

    let backends = TestNamespace::named("shop");
    backends.must_apply(&external_service("redis", 6379, &node_ip, redis.port));
    backends.must_apply(&external_service("kafka", 9092, &node_ip, kafka.port));
    backends.must_apply(&external_service("postgres", 5432, &node_ip, postgres.port));

    // The chart, with the images built here, as a user installs it from their registry.
    let system = TestNamespace::new("umw-system");
    let chart = repo_root().join("charts/umw");
    let (operator_repository, operator_tag) = images.operator.rsplit_once(':').unwrap();
    let (dataplane_repository, dataplane_tag) = images.dataplane.rsplit_once(':').unwrap();
    let out = cp.tool(
        "helm",
        &[
            "install",
            "umw",
            &chart.to_string_lossy(),
            "--namespace",
            &system.name,
            "--set",
            &format!("image.repository={operator_repository},image.tag={operator_tag}"),
            "--set",
            &format!("dataplane.image.repository={dataplane_repository},dataplane.image.tag={dataplane_tag}"),
            // A rotated Secret is noticed at the next resync: make that quick for the test.
            "--set",
            "resync=15s",
            "--wait",
            "--timeout",
            "3m",
        ],
        None,
    );
    assert!(out.status.success(), "helm install: {}\n{}", text(&out), operator_logs(&system.name));

    // examples/shop/ as it is, in a namespace of its own.
    let app = TestNamespace::new("shop-app");
    app.must_apply(&external_service("shop-api", 8080, &node_ip, shop_api.address.port()));
    let out = app.kubectl(&["apply", "-f", &repo_root().join("examples/shop").to_string_lossy()]);
    assert!(out.status.success(), "kubectl apply -f examples/shop/: {}", text(&out));
    let out = app.kubectl(&["wait", "--for=condition=Ready", "middleware/shop", "--timeout=180s"]);
    assert!(out.status.success(), "Middleware shop Ready: {}\n{}", text(&out), operator_logs(&system.name));
    let api: Api<Middleware> = Api::namespaced(client.clone(), &app.name);
    let mw = ready_with(&api, &["redis", "kafka", "postgres"]).await;
    let first_hash = mw.status.as_ref().unwrap().applied_config_hash.clone().unwrap();

    // Requests through each pod's IP: the upstream by its Service name, the cache in Redis, an event
    // into Kafka, a command through PostgreSQL's outbox into Kafka.
    let pods = shop_pods(&client, &app.name).await;
    assert_eq!(pods.len(), 2, "{pods:?}");
    for (pod, ip, _) in &pods {
        let (code, body) = http("GET", &format!("{ip}:8080"), "/products?page=1").await.unwrap();
        assert_eq!(code, 200, "{pod}: {body}");
        assert!(body.contains("\"upstream\":\"shop-api\""), "{pod}: {body}");
    }
    let address = format!("{}:8080", pods[0].1);
    let (_, head) = http_raw("GET", &address, "/products?page=1").await.unwrap();
    assert!(head.to_ascii_lowercase().contains("cache-status:"), "{head}");
    let mut redis_keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut redis.connection()).unwrap();
    redis_keys.sort();
    assert!(!redis_keys.is_empty(), "the cache wrote to Redis");
    let (code, body) = post_json(&address, "/events/orders", r#"{"orderId": "o-1"}"#).await.unwrap();
    assert_eq!(code, 202, "{body}");
    let (code, body) =
        post_json(&address, "/commands/place-order", r#"{"orderId": "o-2", "sku": "kettle", "quantity": 1}"#)
            .await
            .unwrap();
    assert_eq!(code, 202, "{body}");
    let records = kafka.read("shop.orders", 2, Duration::from_secs(60));
    let keys: Vec<String> =
        records.iter().filter_map(|r| r.key.clone()).map(|k| String::from_utf8_lossy(&k).into()).collect();
    assert!(keys.contains(&"o-1".to_string()) && keys.contains(&"o-2".to_string()), "{keys:?}");

    // Through the Middleware's Service (a ClusterIP that kube-proxy translates to a pod).
    let service_ip = app.jsonpath("service/umw-shop", "{.spec.clusterIP}");
    let (code, body) = http("GET", &format!("{service_ip}:8080"), "/products").await.unwrap();
    assert_eq!(code, 200, "through the Service {service_ip}: {body}");

    // What the container looks like: the rendered securityContext, as runc applied it.
    let process = Process { pid: node.container_pid(&pods[0].2).expect("the data plane's pid") };
    let uid = process.status_field("Uid");
    assert_eq!(uid.as_deref().and_then(|u| u.split_whitespace().next()), Some("65532"), "runAsUser: {uid:?}");
    assert_eq!(process.status_field("CapEff").as_deref(), Some("0000000000000000"), "capabilities: drop ALL");
    assert_eq!(process.status_field("NoNewPrivs").as_deref(), Some("1"), "allowPrivilegeEscalation: false");
    assert_eq!(process.status_field("Seccomp").as_deref(), Some("2"), "seccompProfile RuntimeDefault: a filter");
    assert!(process.mount_options("/").is_some_and(|o| o.starts_with("ro")), "{:?}", process.mount_options("/"));
    let data_link = |p: &Process| std::fs::read_link(p.path("/etc/umw/..data")).ok();
    let config_before = data_link(&process).expect("the ConfigMap volume as the kubelet writes it (..data)");

    // A route added to the Middleware: the kubelet updates the ConfigMap volume in place and the
    // running processes reload it, with no restart.
    let pod_names: Vec<String> = pods.iter().map(|p| p.0.clone()).collect();
    let out = app.kubectl(&[
        "patch",
        "middleware",
        "shop",
        "--type",
        "json",
        "-p",
        r#"[{"op": "add", "path": "/spec/routes/-", "value": {"name": "catalog", "match": {"pathPrefix": "/catalog"}, "upstream": {"service": {"name": "shop-api", "port": 8080}}}}]"#,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for (pod, ip, _) in &pods {
        eventually(&format!("{pod} serving the new route"), Duration::from_secs(90), || async {
            let (code, _) = http("GET", &format!("{ip}:8080"), "/catalog/1").await?;
            (code == 200).then_some(())
        })
        .await;
    }
    let mw = ready_with(&api, &["redis", "kafka", "postgres"]).await;
    assert_ne!(mw.status.as_ref().unwrap().applied_config_hash.as_deref(), Some(first_hash.as_str()));
    let config_after = data_link(&process).expect("..data after the update");
    assert_ne!(config_before, config_after, "the kubelet swapped the ConfigMap volume's ..data link");
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &app.name);
    for name in &pod_names {
        let pod = pod_api.get(name).await.expect("the same pods");
        assert_eq!(restarts(&pod), 0, "{name} reloaded without a restart");
    }

    // Probes, as the kubelet runs them: a hung process (SIGSTOP) fails its readiness probe and its pod
    // leaves the Service's ready endpoints, and comes back when it resumes; left hung, its liveness
    // probe fails and the kubelet restarts it. (Readiness fails after 2 probes 5 s apart, liveness after
    // 3 probes 10 s apart: the process resumes once it is unready, some 8 s before liveness would give up.
    // The restart waits out the pod's 40 s grace period: the stopped process ignores SIGTERM.)
    let (hung, hung_ip, _) = pods[0].clone();
    let endpoint_ready = |ip: String| {
        let out = app.kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=umw-shop",
            "-o",
            "jsonpath={range .items[*].endpoints[*]}{.addresses[0]}={.conditions.ready}{\"\\n\"}{end}",
        ]);
        let prefix = format!("{ip}=");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.strip_prefix(&prefix)?.parse::<bool>().ok())
    };
    assert_eq!(endpoint_ready(hung_ip.clone()), Some(true), "{hung} is a ready endpoint of the Service");
    let stopped = Instant::now();
    process.signal("STOP");
    eventually(&format!("{hung} unready while hung"), Duration::from_secs(60), || async {
        let pod = pod_api.get(&hung).await.ok()?;
        (!pod_ready(&pod)).then_some(())
    })
    .await;
    let unready_after = stopped.elapsed();
    eventually(&format!("{hung} out of the Service's ready endpoints"), Duration::from_secs(30), || async {
        (endpoint_ready(hung_ip.clone()) == Some(false)).then_some(())
    })
    .await;
    process.signal("CONT");
    let resumed_after = stopped.elapsed();
    eventually(&format!("{hung} ready again once resumed"), Duration::from_secs(60), || async {
        let pod = pod_api.get(&hung).await.ok()?;
        pod_ready(&pod).then_some(())
    })
    .await;
    assert_eq!(
        restarts(&pod_api.get(&hung).await.unwrap()),
        0,
        "readiness alone restarts nothing (unready {unready_after:?} after SIGSTOP, resumed after \
         {resumed_after:?}; liveness gives up 20 s after SIGSTOP at the earliest)"
    );
    process.signal("STOP");
    eventually(&format!("{hung} restarted by its liveness probe"), Duration::from_secs(120), || async {
        let pod = pod_api.get(&hung).await.ok()?;
        (restarts(&pod) >= 1 && pod_ready(&pod)).then_some(())
    })
    .await;
    ready_with(&api, &["redis", "kafka", "postgres"]).await;

    // An API-key Secret, mounted whole under /etc/umw/secrets/ (nested in the ConfigMap's volume).
    app.must_apply(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: shop-api-keys}\nstringData: {mobile-app: k-123}\n---\napiVersion: umw.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {name: shop-keys}\nspec:\n  targetRefs: [{name: shop, sectionName: products}]\n  apiKeys: {secretName: shop-api-keys}\n",
    );
    let with_keys = eventually("pods with the API-key Secret mounted", WAIT, || async {
        let pods = shop_pods(&client, &app.name).await;
        let mounted: Vec<_> = pods
            .iter()
            .filter_map(|(name, _, container)| {
                let process = Process { pid: node.container_pid(container)? };
                let key = std::fs::read_to_string(process.path("/etc/umw/secrets/shop-api-keys/mobile-app")).ok()?;
                Some((name.clone(), key, process.mount_options("/etc/umw/secrets/shop-api-keys")))
            })
            .collect();
        (mounted.len() == 2 && pods.len() == 2).then_some(mounted)
    })
    .await;
    for (pod, key, options) in &with_keys {
        assert_eq!(key, "k-123", "{pod}");
        assert!(options.as_deref().is_some_and(|o| o.starts_with("ro")), "{pod}: {options:?}");
    }
    ready_with(&api, &["redis", "kafka", "postgres"]).await;

    // A rotated Secret: PostgreSQL's password changes, and so does the Secret that holds it. The
    // operator rolls the pods, and the new ones connect with the new password.
    let before: Vec<String> = shop_pods(&client, &app.name).await.into_iter().map(|p| p.0).collect();
    postgres.sql("ALTER ROLE shop PASSWORD 'rotated'");
    let url = "postgres://shop:rotated@postgres.shop.svc:5432/shop";
    app.must_apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-postgres}}\nstringData: {{url: '{url}'}}\n"
    ));
    eventually("new pods after the Secret rotation", WAIT, || async {
        let now: Vec<String> = shop_pods(&client, &app.name).await.into_iter().map(|p| p.0).collect();
        (now.len() == 2 && now.iter().all(|p| !before.contains(p))).then_some(())
    })
    .await;
    ready_with(&api, &["redis", "kafka", "postgres"]).await;
    let address = format!("{}:8080", shop_pods(&client, &app.name).await[0].1);
    let (code, body) =
        post_json(&address, "/commands/place-order", r#"{"orderId": "o-3", "sku": "mug"}"#).await.unwrap();
    assert_eq!(code, 202, "a command through a pod with the rotated password: {body}");

    // HTTPS from a Secret: turning TLS on rolls the pods once (new mounts); a renewed certificate written
    // to the same Secret reaches the running pods through the kubelet's volume update, without a restart.
    let pki = Pki::new();
    pki.authority();
    pki.server("first");
    pki.server("renewed");
    app.must_apply(&pki.tls_secret("shop-tls", "first"));
    let before: Vec<String> = shop_pods(&client, &app.name).await.into_iter().map(|p| p.0).collect();
    let out = app.kubectl(&[
        "patch",
        "middleware",
        "shop",
        "--type",
        "merge",
        "-p",
        r#"{"spec": {"listeners": {"http": {"tls": {"certificates": [{"secretName": "shop-tls"}]}}}}}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let ca = pki.read("ca.crt");
    let tls_pods = eventually("new pods serving HTTPS", WAIT, || async {
        let now = shop_pods(&client, &app.name).await;
        if now.len() != 2 || now.iter().any(|p| before.contains(&p.0)) {
            return None;
        }
        for (_, ip, _) in &now {
            let (code, served) = https_get(&format!("{ip}:8080"), "shop.test", &ca, "/products").await?;
            (code == 200 && served == pki.der("first")).then_some(())?;
        }
        Some(now)
    })
    .await;
    ready_with(&api, &["redis", "kafka", "postgres"]).await;
    app.must_apply(&pki.tls_secret("shop-tls", "renewed"));
    for (pod, ip, _) in &tls_pods {
        eventually(&format!("{pod} serving the renewed certificate"), WAIT, || async {
            let (code, served) = https_get(&format!("{ip}:8080"), "shop.test", &ca, "/products").await?;
            (code == 200 && served == pki.der("renewed")).then_some(())
        })
        .await;
    }
    let now: Vec<String> = shop_pods(&client, &app.name).await.into_iter().map(|p| p.0).collect();
    assert_eq!(now, tls_pods.iter().map(|p| p.0.clone()).collect::<Vec<_>>(), "the same pods");
    for name in &now {
        assert_eq!(restarts(&pod_api.get(name).await.unwrap()), 0, "{name} rotated without a restart");
    }

    // kubectl delete: the Middleware's children and pods go, and so do their containers on the node.
    assert!(!node.containers_in(&app.name).is_empty(), "the example's containers run on the node");
    let out = app.kubectl(&["delete", "-f", &repo_root().join("examples/shop").to_string_lossy(), "--wait=true"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = app.kubectl(&["wait", "--for=delete", "pod", "-l", "app.kubernetes.io/instance=shop", "--timeout=120s"]);
    assert!(out.status.success(), "the pods went: {}", text(&out));
    eventually("no container of the example left on the node", Duration::from_secs(60), || async {
        node.containers_in(&app.name).is_empty().then_some(())
    })
    .await;
    let out = app.kubectl(&[
        "get",
        "deployment,service,configmap,serviceaccount",
        "-l",
        "app.kubernetes.io/instance=shop",
        "-o",
        "name",
    ]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "children left: {}",
        text(&out)
    );
    let out = cp.tool("helm", &["uninstall", "umw", "--namespace", &system.name, "--wait"], None);
    assert!(out.status.success(), "helm uninstall: {}", text(&out));
}

/// The operator pods' logs, for failure messages.
fn operator_logs(namespace: &str) -> String {
    let out = real_node().kubectl(&[
        "logs",
        "-n",
        namespace,
        "-l",
        "app.kubernetes.io/name=umw-operator",
        "--tail=60",
        "--prefix",
    ]);
    format!("==== operator logs ====\n{}", text(&out))
}
