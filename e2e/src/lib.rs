#![forbid(unsafe_code)]
//! The e2e harness: one real control plane (etcd, kube-apiserver, kube-controller-manager) per test
//! binary, a fresh namespace per test with its own operator process, and a dump of what the test saw
//! when it fails.
//!
//! The control plane comes from `e2e/testenv/up.sh` (which starts every real dependency), with binaries built by
//! `e2e/testenv/build-tools.sh` (`make testenv`). It stops by itself when the test binary exits.

pub mod kubelet;
pub mod node;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The repository root. `cargo test` sets CARGO_MANIFEST_DIR when it runs a test binary; the value
/// compiled in is only the fallback, as a binary reused from a shared target directory may have been
/// built from a clone somewhere else.
pub fn repo_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().expect("e2e/ sits in the repository").to_path_buf()
}

/// The running control plane of this test binary.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub bin: PathBuf,
    /// The real node joined to it, in the real-node lane ([`node::real_node`]).
    pub node: Option<node::Node>,
}

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();

fn tool_bin_dir() -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .arg(repo_root().join("e2e/testenv/build-tools.sh"))
        .arg("--print")
        .output()
        .context("running e2e/testenv/build-tools.sh --print")?;
    if !out.status.success() {
        bail!(
            "e2e/testenv/build-tools.sh --print failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Starts the control plane on first use; later calls return the same one (with its node, when the
/// real-node lane started it).
pub fn control_plane() -> &'static ControlPlane {
    CONTROL_PLANE.get_or_init(|| match start_control_plane(false) {
        Ok(cp) => cp,
        Err(error) => panic!(
            "no test control plane: {error:#}\n\
             The e2e tests need the real kube-apiserver, etcd and kube-controller-manager: run `make testenv` \
             (or `make test`, which does it) to build them, then run the tests again."
        ),
    })
}

fn start_control_plane(with_node: bool) -> anyhow::Result<ControlPlane> {
    let bin = tool_bin_dir()?;
    for tool in ["etcd", "kube-apiserver", "kube-controller-manager", "kubectl"] {
        if !bin.join(tool).exists() {
            bail!("{} is missing", bin.join(tool).display());
        }
    }
    let dir = std::env::temp_dir().join(format!("umw-e2e-{}", std::process::id()));
    let mut up = Command::new("bash");
    up.arg(repo_root().join("e2e/testenv/up.sh"))
        .args([&dir.to_string_lossy(), "--owner-pid", &std::process::id().to_string()])
        // The directory goes when the test binary exits, unless a failing test marks it to keep.
        .env("UMW_TESTENV_REMOVE", "1");
    if with_node {
        up.arg("--node");
    }
    let status = up.status().context("running e2e/testenv/up.sh")?;
    if !status.success() {
        bail!("e2e/testenv/up.sh failed ({status}); see the logs in {}", dir.display());
    }
    let node = if with_node { Some(read_node(&dir)?) } else { None };
    let cp = ControlPlane { dir, bin, node };
    let out =
        cp.kubectl(&["apply", "--server-side", "-f", &repo_root().join("crds/manifests/crds.yaml").to_string_lossy()]);
    if !out.status.success() {
        bail!("installing the CRDs failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // `kubectl wait` fails at once ("accessor error: <nil>") on a CRD whose status is not written yet:
    // ask again until every CRD has one.
    let mut attempts = 0;
    loop {
        let out = cp.kubectl(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"]);
        if out.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        attempts += 1;
        if !stderr.contains("accessor error") || attempts >= 30 {
            bail!("the CRDs were not established: {stderr}");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    Ok(cp)
}

/// The node's address and containerd socket, from the `UMW_NODE_*` lines `node.sh` wrote to DIR/env.
fn read_node(dir: &Path) -> anyhow::Result<node::Node> {
    let env = std::fs::read_to_string(dir.join("env")).context("reading the control plane's env file")?;
    let value = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(str::to_string)
            .with_context(|| format!("{name} is not in {}", dir.join("env").display()))
    };
    Ok(node::Node {
        ip: value("UMW_NODE_IP")?.parse().context("UMW_NODE_IP")?,
        subnet: value("UMW_NODE_SUBNET")?,
        containerd: value("UMW_NODE_CONTAINERD")?.into(),
    })
}

impl ControlPlane {
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Credentials of user `umw-operator`, whose every request the audit log records.
    pub fn operator_kubeconfig(&self) -> PathBuf {
        self.dir.join("operator.kubeconfig")
    }

    /// A kubeconfig that authenticates with a ServiceAccount token.
    pub fn token_kubeconfig(&self, namespace: &str, service_account: &str) -> PathBuf {
        let out = self.kubectl(&["create", "token", service_account, "-n", namespace, "--duration=1h"]);
        assert!(out.status.success(), "kubectl create token: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let admin = std::fs::read_to_string(self.kubeconfig()).expect("the admin kubeconfig");
        let server = admin.lines().find_map(|l| l.trim().strip_prefix("server: ")).expect("a server line").to_string();
        let path = self.dir.join(format!("{namespace}-{service_account}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            self.dir.join("pki/ca.crt").display()
        );
        std::fs::write(&path, text).expect("writing a kubeconfig");
        path
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// Runs the control plane's kubectl as the admin user.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.tool("kubectl", args, stdin)
    }

    pub fn tool(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new(self.bin.join(tool));
        command.args(args).env("KUBECONFIG", self.kubeconfig()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = command.spawn().unwrap_or_else(|e| panic!("running {tool}: {e}"));
        if let Some(input) = stdin {
            use std::io::Write;
            let _ = child.stdin.take().expect("stdin is piped").write_all(input.as_bytes());
        }
        child.wait_with_output().unwrap_or_else(|e| panic!("waiting for {tool}: {e}"))
    }

    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).expect("the control plane wrote a kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("the kubeconfig is valid");
        Client::try_from(config).expect("a client from the kubeconfig")
    }
}

/// Keeps the control plane's directory (logs, audit log, data-plane logs) after the test binary exits.
pub fn keep_logs() {
    let dir = &control_plane().dir;
    let _ = std::fs::write(dir.join("keep"), "a test failed; its logs are here\n");
    eprintln!("==== logs kept in {} ====", dir.display());
}

/// A fresh namespace for one test. When the test panics, everything in it is printed before it goes.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn new(prefix: &str) -> Self {
        let cp = control_plane();
        let suffix = format!(
            "{:x}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()
        );
        let name = format!("{prefix}-{suffix}");
        let out = cp.kubectl(&["create", "namespace", &name]);
        assert!(out.status.success(), "creating namespace {name}: {}", String::from_utf8_lossy(&out.stderr));
        Self { name }
    }

    /// A namespace with exactly this name (e.g. one an example refers to).
    pub fn named(name: &str) -> Self {
        let out = control_plane().kubectl(&["create", "namespace", name]);
        assert!(out.status.success(), "creating namespace {name}: {}", String::from_utf8_lossy(&out.stderr));
        Self { name: name.to_string() }
    }

    /// `kubectl get OBJECT -o jsonpath=PATH` in this namespace.
    pub fn jsonpath(&self, object: &str, path: &str) -> String {
        let out = self.kubectl(&["get", object, "-o", &format!("jsonpath={path}")]);
        assert!(out.status.success(), "kubectl get {object}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// What kstatus (the library Flux and kpt read health with) computes for OBJECT in this namespace:
    /// `(status, message)`, e.g. `("Failed", "...")`.
    pub fn kstatus(&self, object: &str) -> (String, String) {
        let out = self.kubectl(&["get", object, "-o", "json"]);
        assert!(out.status.success(), "kubectl get {object}: {}", String::from_utf8_lossy(&out.stderr));
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        let out = control_plane().tool("umw-kstatus", &[], Some(&json));
        assert!(out.status.success(), "umw-kstatus: {}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string();
        let rest = line.split_once(' ').map(|(_, rest)| rest).unwrap_or_default();
        let (status, message) = rest.split_once(' ').unwrap_or((rest, ""));
        (status.to_string(), message.to_string())
    }

    /// `kubectl apply` of a YAML document in this namespace; returns the output.
    pub fn apply(&self, yaml: &str) -> Output {
        control_plane().kubectl_stdin(&["apply", "-n", &self.name, "-f", "-"], Some(yaml))
    }

    /// Like [`apply`](Self::apply), panicking on failure.
    pub fn must_apply(&self, yaml: &str) {
        let out = self.apply(yaml);
        assert!(out.status.success(), "kubectl apply failed: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        control_plane().kubectl(&all)
    }

    fn dump(&self) {
        let all = self.kubectl(&[
            "get",
            "umw,deployments,replicasets,services,serviceaccounts,pdb,hpa,events,leases",
            "-o",
            "yaml",
        ]);
        let config =
            self.kubectl(&["get", "configmaps", "-l", "app.kubernetes.io/managed-by=umw-operator", "-o", "yaml"]);
        eprintln!(
            "==== objects in namespace {} ====\n{}{}",
            self.name,
            String::from_utf8_lossy(&all.stdout),
            String::from_utf8_lossy(&config.stdout)
        );
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
            keep_logs();
        }
        let _ = control_plane().kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// A `umw-operator` process watching one namespace, as user `umw-operator`.
pub struct Operator {
    child: Option<Child>,
    pub namespace: String,
    pub admin_port: u16,
    extra: Vec<String>,
    log: PathBuf,
    kubeconfig: PathBuf,
}

/// The data-plane binary next to the test binary.
pub fn dataplane_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe.parent().and_then(Path::parent).expect("tests run from target/<profile>/deps");
    let binary = dir.join("umw-dataplane");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p umw-dataplane` (make test does) first",
        binary.display()
    );
    binary
}

/// A process kubelet for one test namespace: data-plane pods there run as local processes.
pub async fn kubelet(namespace: &str) -> kubelet::Kubelet {
    let cp = control_plane();
    let settings = kubelet::Settings {
        namespace: Some(namespace.to_string()),
        node: "umw-e2e-node".into(),
        dataplane: dataplane_binary(),
        work_dir: cp.dir.join("pods"),
        extra_env: vec![("UMW_RELOAD_INTERVAL".into(), "500ms".into()), ("RUST_LOG".into(), "info".into())],
        sync_interval: Duration::from_millis(500),
        restart_backoff: Duration::from_secs(3),
    };
    kubelet::Kubelet::start(cp.client().await, settings).await.expect("starting the process kubelet")
}

/// A test upstream on loopback: answers every request with JSON naming itself and echoing the path, and
/// counts what it gets.
pub struct TestUpstream {
    pub address: std::net::SocketAddr,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start(name: &'static str) -> Self {
        Self::start_on(name, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// Like [`start`](Self::start), listening on `ip` (e.g. the real node's address, which pods reach).
    pub async fn start_on(name: &'static str, ip: std::net::Ipv4Addr) -> Self {
        use std::sync::atomic::Ordering;
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                axum::Json(serde_json::json!({ "upstream": name, "path": uri.path() }))
            }
        });
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("a port on the test address");
        let address = listener.local_addr().expect("an address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { address, hits, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain HTTP/1.1 request to an address, returning the status and body.
pub async fn http(method: &str, address: &str, path: &str) -> Option<(u16, String)> {
    let (status, raw) = http_raw(method, address, path).await?;
    Some((status, raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// Like [`http`], with the whole response (head and body).
pub async fn http_raw(method: &str, address: &str, path: &str) -> Option<(u16, String)> {
    http_host(method, address, address, path).await
}

/// Like [`http_raw`], with this `Host` header (as a Service address would give, whichever pod answers).
pub async fn http_host(method: &str, address: &str, host: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).to_string();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        Some((status, text))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.ok().flatten()
}

/// `GET path` over HTTPS (HTTP/1.1) to `address`, asking for `sni` and trusting only the authorities in
/// `ca_pem`: the status and the DER of the certificate the server showed.
pub async fn https_get(address: &str, sni: &str, ca_pem: &[u8], path: &str) -> Option<(u16, Vec<u8>)> {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.ok()?).ok()?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(address).await.ok()?;
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).ok()?;
        let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.ok()?;
        let served = stream.get_ref().1.peer_certificates()?.first()?.to_vec();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        // A TLS peer may close without close_notify; what was read is enough.
        let _ = stream.read_to_end(&mut response).await;
        let text = String::from_utf8_lossy(&response).to_string();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        Some((status, served))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.ok().flatten()
}

/// `POST path` with a JSON body; the status and the body of the answer.
pub async fn post_json(address: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).to_string();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        Some((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
    };
    tokio::time::timeout(Duration::from_secs(20), attempt).await.ok().flatten()
}

/// The operator binary next to the test binary (`cargo build -p umw-operator` puts it there).
pub fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe.parent().and_then(Path::parent).expect("tests run from target/<profile>/deps");
    let binary = dir.join("umw-operator");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p umw-operator` (make test does) first",
        binary.display()
    );
    binary
}

/// An address on loopback that refuses connections for as long as the returned socket lives: the socket is
/// bound but never listens, so the port is neither served nor given to anyone else meanwhile (a listener
/// bound to port 0 and dropped frees its port for the next `bind(0)` on the machine).
pub fn closed_address() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).expect("binding a loopback port");
    let address = socket.local_addr().expect("the bound address");
    (socket, address)
}

impl Operator {
    pub fn start(namespace: &str, extra: &[&str]) -> Self {
        Self::start_as(control_plane().operator_kubeconfig(), namespace, extra)
    }

    /// Like [`start`](Self::start), with other credentials (e.g. the chart's ServiceAccount).
    pub fn start_as(kubeconfig: PathBuf, namespace: &str, extra: &[&str]) -> Self {
        let mut op = Self {
            kubeconfig,
            child: None,
            namespace: namespace.to_string(),
            // Bound by the operator itself at its first start (a restart keeps it).
            admin_port: 0,
            extra: if extra.iter().any(|a| a.starts_with("--lease-namespace")) {
                extra.iter().map(|s| s.to_string()).collect()
            } else {
                [&["--lease-namespace", namespace][..], extra].concat().iter().map(|s| s.to_string()).collect()
            },
            log: control_plane().dir.join(format!("operator-{namespace}.log")),
        };
        op.spawn();
        op
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("operator log file");
        let offset = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let child = Command::new(operator_binary())
            .args(["--namespace", &self.namespace])
            .args(["--admin-address", &format!("127.0.0.1:{}", self.admin_port)])
            .args(["--dataplane-image", "umw-dataplane:e2e"])
            .args(&self.extra)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting umw-operator");
        self.child = Some(child);
        if self.admin_port == 0 {
            self.admin_port = self.bound_admin_port(offset);
        }
    }

    /// The admin port from the `admin endpoints listening` line logged after `offset`; 0 if the process
    /// exits (or 60 s pass) first.
    fn bound_admin_port(&mut self, offset: usize) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let port = text.get(offset..).unwrap_or("").lines().find_map(|line| {
                let (_, rest) = line.split_once("admin endpoints listening")?;
                let address = rest.split_once("address=")?.1;
                let address: String =
                    address.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
                address.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
            });
            if let Some(port) = port {
                return port;
            }
            if self.child.as_mut().is_none_or(|c| c.try_wait().is_ok_and(|s| s.is_some())) {
                return 0;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        0
    }

    /// Kills the process (SIGKILL: no graceful shutdown, as a crash or eviction would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill and start again: the new process waits for the old lease to expire, as after a crash.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGTERM and start again: the old process hands the lease over on its way out.
    pub fn restart_gracefully(&mut self) {
        let _ = self.terminate();
        self.spawn();
    }

    /// The operator's `/metrics` text, if it answers.
    pub fn metrics(&self) -> Option<String> {
        http_get(self.admin_port, "/metrics")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("==== operator log ({}) ====\n{}", self.namespace, self.log());
        }
        self.kill();
    }
}

/// A plain HTTP/1.1 GET on loopback, enough for the admin endpoints.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Polls `check` until it returns `Some`, or fails the test after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Write requests (create, update, patch, delete) that user `umw-operator` made in `namespace` since
/// `since`, from the API server's audit log, as `verb resource/name` lines. Lease renewals are left out:
/// holding the leader lease is a write by design.
pub fn operator_writes(namespace: &str, since: std::time::SystemTime) -> Vec<String> {
    let text = std::fs::read_to_string(control_plane().audit_log()).unwrap_or_default();
    let since: k8s_openapi::jiff::Timestamp = since.try_into().expect("a representable time");
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["user"]["username"] == "umw-operator")
        .filter(|event| matches!(event["verb"].as_str(), Some("create" | "update" | "patch" | "delete")))
        .filter(|event| event["objectRef"]["namespace"] == namespace)
        .filter(|event| event["objectRef"]["resource"] != "leases")
        .filter(|event| {
            event["requestReceivedTimestamp"]
                .as_str()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .is_some_and(|t| t >= since)
        })
        .map(|event| {
            format!(
                "{} {}/{}{}",
                event["verb"].as_str().unwrap_or(""),
                event["objectRef"]["resource"].as_str().unwrap_or(""),
                event["objectRef"]["name"].as_str().unwrap_or(""),
                event["objectRef"]["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default()
            )
        })
        .collect()
}
