//! The `umw-dataplane` binary as an operator or a user runs it: `check`, JSON logs with trace ids, and
//! graceful shutdown on SIGTERM.

mod support;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use support::{Upstream, eventually, get, middleware, send};

/// This crate's directory: the one `cargo test` names when it runs the test (a binary reused from a
/// shared target directory may have been compiled in a clone elsewhere), else the one compiled in.
fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

const BIN: &str = env!("CARGO_BIN_EXE_umw-dataplane");

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("umw-process-{name}-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Running {
    child: Child,
    http: String,
    admin: String,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Running {
    fn start(config: &std::path::Path, extra: &[&str]) -> Self {
        Self::start_with_env(config, extra, &[])
    }

    /// Starts the binary on port 0 for both listeners (no port picked here and released for it to take,
    /// which a parallel test could take first) and reads the bound addresses from its `serving` line.
    fn start_with_env(config: &std::path::Path, extra: &[&str], env: &[(String, String)]) -> Self {
        let any = "127.0.0.1:0";
        let mut child = Command::new(BIN)
            .args(["--config", &config.to_string_lossy(), "--http-address", any, "--admin-address", any])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (http, admin) = loop {
            let serving = stderr.lock().unwrap().iter().find_map(|line| {
                let line: serde_json::Value = serde_json::from_str(line).ok()?;
                (line["message"] == "serving")
                    .then(|| Some((line["http"].as_str()?.to_string(), line["admin"].as_str()?.to_string())))?
            });
            if let Some(addresses) = serving {
                break addresses;
            }
            assert!(Instant::now() < deadline, "the data plane never logged `serving`: {:#?}", stderr.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        };
        Self { child, http, admin, stderr }
    }

    async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.admin);
        eventually("the data plane to be ready", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                let client = support::client();
                let request = http::Request::get(&url).body(http_body_util::Full::new(Bytes::new())).unwrap();
                matches!(client.request(request).await, Ok(r) if r.status() == 200)
            }
        })
        .await;
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn log(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn check_accepts_the_examples_and_reports_every_problem_of_a_broken_configuration() {
    let examples = crate_dir().join("../examples/shop");
    let out = Command::new(BIN).args(["check", "--config", &examples.to_string_lossy()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Middleware default/shop with 2 route(s)"), "{stdout}");
    assert!(stdout.contains("note: AuthPolicy shop-auth is accepted but not enforced"), "{stdout}");
    assert!(!stdout.contains("EventRoute shop-orders"), "the example's event route is enforced: {stdout}");
    assert!(!stdout.contains("CachePolicy shop-cache"), "the example's cache policy is enforced: {stdout}");

    let dir = temp_dir("check");
    std::fs::write(
        dir.join("10-middleware.yaml"),
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: shop}\nspec:\n  routes:\n    - name: a\n      timout: 5s\n      upstream: {url: 'http://x', service: {name: s, port: 80}}\n    - name: b\n      upstream: {url: 'http://x'}\n      requestSchema: {type: 12}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("20-policies.yaml"),
        "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: c}\nspec: {targetRefs: [{name: shop, sectionName: missing}], rules: [{ttl: 1s}]}\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["check", "--config", &dir.to_string_lossy()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("10-middleware.yaml, document 1: unknown field spec.routes[0].timout"), "{stderr}");
    assert!(stderr.contains("10-middleware.yaml, document 1 (Middleware/shop): spec.routes[0].upstream: upstream needs exactly one of service or url"), "{stderr}");
    assert!(stderr.contains("20-policies.yaml, document 1 (CachePolicy/c): spec.targetRefs[0].sectionName: Middleware \"shop\" has no route \"missing\""), "{stderr}");

    // A schema that does not compile is reported with its place, like every other rule.
    std::fs::write(dir.join("20-policies.yaml"), "").unwrap();
    std::fs::write(
        dir.join("10-middleware.yaml"),
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: shop}\nspec:\n  routes:\n    - name: b\n      upstream: {url: 'http://x'}\n      requestSchema: {type: 12}\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["check", "--config", &dir.to_string_lossy()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "10-middleware.yaml, document 1 (Middleware/shop): spec.routes[0].requestSchema: not a valid JSON Schema"
        ),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_data_plane_that_cannot_start_writes_why_to_the_termination_log_when_the_kubelet_made_one() {
    let dir = temp_dir("termination");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: shop}\nspec:\n  routes:\n    - name: b\n      upstream: {url: 'http://x:99999'}\n",
    )
    .unwrap();
    let log = dir.join("termination-log");
    std::fs::write(&log, "").unwrap();
    let run = |log: &std::path::Path| {
        Command::new(BIN)
            .args(["--config", &config.to_string_lossy(), "--termination-log", &log.to_string_lossy()])
            .output()
            .unwrap()
    };
    let out = run(&log);
    assert_eq!(out.status.code(), Some(1));
    let message = std::fs::read_to_string(&log).unwrap();
    assert!(message.contains("spec.routes[0].upstream.url"), "{message}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(message.trim()), "the same words as the log");
    // Outside a kubelet there is no such file, and none is made.
    let absent = dir.join("absent");
    assert_eq!(run(&absent).status.code(), Some(1));
    assert!(!absent.exists());
    // `check` answers its caller only.
    std::fs::write(&log, "").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config", &config.to_string_lossy(), "--termination-log", &log.to_string_lossy()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_unreachable_postgres_is_logged_and_reported_without_its_password() {
    let dir = temp_dir("redact");
    let config = dir.join("config.yaml");
    // Nothing listens on port 1: the data plane keeps retrying and says so.
    std::fs::write(
        &config,
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: shop}\nspec:\n  connections:\n    postgres: {url: {value: 'postgres://app@127.0.0.1:1/shop?sslmode=disable&password=canary-pg-1'}}\n    kafka: {bootstrapServers: {value: '127.0.0.1:1'}}\n  commands:\n  - {name: place-order, event: {topic: orders, type: order.placed}}\n",
    )
    .unwrap();
    let running = Running::start(&config, &[]);
    let status_url = format!("http://{}/status", running.admin);
    let mut status = String::new();
    eventually("the PostgreSQL retry warning", Duration::from_secs(20), || {
        let lines = running.log();
        async move { lines.iter().any(|l| l.contains("cannot reach PostgreSQL")) }
    })
    .await;
    let client = support::client();
    let request = http::Request::get(&status_url).body(http_body_util::Full::new(Bytes::new())).unwrap();
    if let Ok(response) = client.request(request).await {
        use http_body_util::BodyExt as _;
        status = String::from_utf8_lossy(&response.into_body().collect().await.unwrap().to_bytes()).into_owned();
    }
    let log = running.log().join("\n");
    assert!(log.contains("password=***"), "the URL is still recognisable: {log}");
    assert!(!log.contains("canary-pg-1"), "the password reached the log: {log}");
    assert!(!status.is_empty() && !status.contains("canary-pg-1"), "the password reached /status: {status}");
    drop(running);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sigterm_turns_readiness_off_finishes_requests_in_flight_and_exits() {
    let upstream = Upstream::start("up").await;
    let dir = temp_dir("sigterm");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        middleware(&format!("    - name: all\n      match: {{}}\n      upstream: {{url: '{}'}}\n", upstream.url()), ""),
    )
    .unwrap();
    let mut dp = Running::start(&config, &["--shutdown-delay", "1s", "--drain-timeout", "10s"]);
    dp.wait_ready().await;
    let unknown = get(&format!("http://{}/statu", dp.admin)).await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.text().contains("GET /statu") && unknown.text().contains("/readyz"), "{}", unknown.text());
    let metrics = get(&format!("http://{}/metrics", dp.admin)).await.text();
    assert!(metrics.contains("umw_admin_unknown_requests_total 1"), "{metrics}");

    let url = format!("http://{}/slow/2500", dp.http);
    let in_flight = tokio::spawn(async move { get(&url).await.status });
    // The request has reached the upstream: it is in flight when the signal comes.
    eventually("the request in flight", Duration::from_secs(5), || async { upstream.hits() == 1 }).await;
    dp.signal("-TERM");
    let readyz_url = format!("http://{}/readyz", dp.admin);
    eventually("readiness off", Duration::from_secs(5), || async { get(&readyz_url).await.status == 503 }).await;
    let readyz = get(&readyz_url).await;
    assert_eq!(readyz.status, 503, "unready during the shutdown delay");
    assert!(readyz.text().contains("shutting down"));
    assert_eq!(get(&format!("http://{}/x", dp.http)).await.status, 200, "still serving during the delay");

    assert_eq!(in_flight.await.unwrap(), 200, "the request in flight completes");
    let status = tokio::task::spawn_blocking(move || {
        let status = dp.wait_exit(Duration::from_secs(15));
        (status, dp)
    })
    .await
    .unwrap();
    let (status, dp) = status;
    assert!(status.is_some_and(|s| s.success()), "exits 0 after draining: {status:?}\n{:#?}", dp.log());
    assert!(std::net::TcpStream::connect(&dp.http).is_err(), "no longer accepting");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn json_logs_carry_the_trace_and_request_ids() {
    let (_closed, closed) = support::closed_address();
    let dir = temp_dir("logs");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        middleware(
            &format!("    - name: broken\n      match: {{}}\n      upstream: {{url: 'http://{closed}'}}\n"),
            "  observability: {logFormat: json}\n",
        ),
    )
    .unwrap();
    let dp = Running::start(&config, &[]);
    dp.wait_ready().await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let reply = send(
        Method::GET,
        &format!("http://{}/x", dp.http),
        &[("traceparent", &format!("00-{trace}-b7ad6b7169203331-01")), ("x-request-id", "abc-1")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 502);
    eventually("the warning in the log", Duration::from_secs(5), || {
        let lines = dp.log();
        async move { lines.iter().any(|l| l.contains("upstream request failed")) }
    })
    .await;
    let line = dp.log().into_iter().find(|l| l.contains("upstream request failed")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(json["trace_id"], trace, "{line}");
    assert_eq!(json["request_id"], "abc-1", "{line}");
    assert_eq!(json["route"], "broken");
    assert_eq!(json["level"], "WARN");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A webhook receiver on loopback that keeps the `Authorization` header of every request.
async fn receiver() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    let app = axum::Router::new().fallback(move |headers: http::HeaderMap| {
        let keep = keep.clone();
        async move {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            keep.lock().unwrap().push(auth);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(support::serve_h1_and_h2c(listener, app));
    (address, seen)
}

#[tokio::test]
async fn webhook_headers_from_secrets_reach_the_webhook_and_nothing_else() {
    let (webhook, seen) = receiver().await;
    let dir = temp_dir("headers-from");
    let config = dir.join("config.yaml");
    let yaml = format!(
        "{}---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {{name: hooks}}\nspec:\n  targetRefs: [{{name: test}}]\n  source: {{http: {{path: /events/in}}}}\n  destination: {{http: {{url: 'http://{webhook}/hook', headers: {{x-plain: shown}}, headersFrom: {{authorization: {{name: hooks-token, key: header}}}}}}}}\n",
        middleware(
            "    - name: all\n      match: {pathPrefix: /nothing}\n      upstream: {url: 'http://127.0.0.1:9'}\n",
            ""
        )
    );
    std::fs::write(&config, yaml).unwrap();
    // The Secret's value, as the operator hands it to the pod.
    let canary = format!("Bearer canary-{:016x}", fastrand::u64(..));
    let var =
        umw_crds::config::secret_env_var(&umw_crds::SecretKeyRef { name: "hooks-token".into(), key: "header".into() });
    let dp = Running::start_with_env(&config, &[], &[(var, canary.clone())]);
    dp.wait_ready().await;
    let event = r#"{"specversion": "1.0", "id": "e-1", "type": "order.placed", "source": "/shop", "data": {"n": 1}}"#;
    let reply = send(
        Method::POST,
        &format!("http://{}/events/in", dp.http),
        &[("content-type", "application/cloudevents+json")],
        Bytes::from_static(event.as_bytes()),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(*seen.lock().unwrap(), vec![canary.clone()], "the webhook got the Secret's value");
    let status = get(&format!("http://{}/status", dp.admin)).await.text();
    let metrics = get(&format!("http://{}/metrics", dp.admin)).await.text();
    let secret = canary.trim_start_matches("Bearer ");
    assert!(!status.contains(secret), "not in /status: {status}");
    assert!(!metrics.contains(secret), "not in /metrics");
    assert!(!dp.log().join("\n").contains(secret), "not in the logs: {:#?}", dp.log());
    std::fs::remove_dir_all(&dir).unwrap();
}
