#![forbid(unsafe_code)]
//! Data-plane integration tests against real backends. This library starts them: a private
//! `redis-server` per test on a loopback port reserved for it ([`ports`]) (Debian's `redis-server`; `make test` installs it when
//! missing), a private Apache Kafka broker ([`KafkaBroker`]) and a private PostgreSQL ([`PostgresServer`]). A test that needs a server it cannot
//! start fails, naming the command to run.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod idp;
pub mod kafka;
pub mod ports;
pub mod postgres;
pub use idp::IdentityProvider;
pub use kafka::KafkaBroker;
pub use postgres::PostgresServer;

/// A private Redis on loopback (or another address of this machine); stopped when dropped.
pub struct RedisServer {
    /// The address it listens on: 127.0.0.1 unless started with [`RedisServer::start_on`].
    pub host: String,
    pub port: u16,
    /// Keeps `port` for this server (restarts included).
    _port: ports::Port,
    child: Option<Child>,
    dir: std::path::PathBuf,
    /// Extra server arguments, kept for restarts (TLS, password).
    extra: Vec<String>,
    /// With TLS: the authority's certificate (PEM) that signed the server's.
    pub ca_cert: Option<String>,
    pub password: Option<String>,
}

/// A private authority and a server certificate for 127.0.0.1 signed by it, made with `openssl` in `dir`:
/// `ca.crt`, `server.crt`, `server.key` (unencrypted PKCS#8).
pub fn make_certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): install it with `apt-get install openssl` (make test does)")
        });
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-days", "1", "-subj", "/CN=umw test CA", "-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"]);
    openssl(&csr);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("the extension file");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1")
    }

    /// A server listening on `host`, an address of this machine (e.g. the real node's bridge address,
    /// which pods reach).
    pub fn start_on(host: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("umw-redis-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).expect("a temp directory");
        let port = ports::reserve_on(host);
        let mut server = Self {
            host: host.to_string(),
            port: port.get(),
            _port: port,
            child: None,
            dir,
            extra: Vec::new(),
            ca_cert: None,
            password: None,
        };
        server.spawn();
        server
    }

    /// A server that only speaks TLS (a certificate for 127.0.0.1 signed by a private authority made with
    /// `openssl`) and requires this password.
    pub fn start_tls(password: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("umw-redis-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).expect("a temp directory");
        make_certificates(&dir);
        let ca_cert = std::fs::read_to_string(dir.join("ca.crt")).expect("the CA certificate");
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let extra = vec![
            "--tls-port".into(),
            String::new(), // the port, set below
            "--tls-cert-file".into(),
            path("server.crt"),
            "--tls-key-file".into(),
            path("server.key"),
            "--tls-ca-cert-file".into(),
            path("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
            "--requirepass".into(),
            password.into(),
        ];
        let port = ports::reserve();
        let mut server = Self {
            host: "127.0.0.1".into(),
            port: port.get(),
            _port: port,
            child: None,
            dir,
            extra,
            ca_cert: Some(ca_cert),
            password: Some(password.into()),
        };
        server.extra[1] = server.port.to_string();
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let extra: Vec<String> = self.extra.clone();
        self.spawn_with(&extra.iter().map(String::as_str).collect::<Vec<_>>());
    }

    fn spawn_with(&mut self, extra: &[&str]) {
        // With TLS, the plain port is off and the TLS port is the server's port.
        let plain = if self.ca_cert.is_some() { "0".to_string() } else { self.port.to_string() };
        let child = Command::new("redis-server")
            .args(["--port", &plain, "--bind", &self.host, "--save", "", "--appendonly", "no"])
            // Clients from other addresses (pods) need no password: the server binds a test address only.
            .args(["--protected-mode", "no"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install it with `apt-get install redis-server` (make test does)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(client) = self.client()
                && let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_millis(200))
                && redis::cmd("PING").query::<String>(&mut connection).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server on port {} did not answer PING within 10 s", self.port);
    }

    pub fn url(&self) -> String {
        match self.ca_cert {
            Some(_) => format!("rediss://{}:{}", self.host, self.port),
            None => format!("redis://{}:{}", self.host, self.port),
        }
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(self.url())?;
        if let Some(password) = &self.password {
            let settings = info.redis_settings().clone().set_password(password.clone());
            info = info.set_redis_settings(settings);
        }
        match &self.ca_cert {
            Some(ca) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates { client_tls: None, root_cert: Some(ca.as_bytes().to_vec()) },
            ),
            None => redis::Client::open(info),
        }
    }

    /// Kills the server (SIGKILL, as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A synchronous connection for looking at what the data plane stored.
    pub fn connection(&self) -> redis::Connection {
        self.client().and_then(|c| c.get_connection()).expect("a connection to the test Redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private three-master Redis Cluster on loopback (no replicas); stopped when dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let dir = std::env::temp_dir().join(format!("umw-redis-{}-{}", std::process::id(), fastrand::u32(..)));
                std::fs::create_dir_all(&dir).expect("a temp directory");
                let port = ports::reserve();
                let mut node = RedisServer {
                    host: "127.0.0.1".into(),
                    port: port.get(),
                    _port: port,
                    child: None,
                    dir,
                    extra: Vec::new(),
                    ca_cert: None,
                    password: None,
                };
                node.spawn_with(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]);
                node
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): install redis-tools (make test does)"));
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = cluster.nodes.iter().all(|n| {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut n.connection()).unwrap_or_default();
                info.contains("cluster_state:ok")
            });
            if ok {
                return cluster;
            }
            assert!(Instant::now() < deadline, "the cluster did not reach cluster_state:ok within 20 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The URL of one node: the others are discovered.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Keys on each node.
    pub fn keys_per_node(&self, pattern: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| {
                redis::cmd("KEYS").arg(pattern).query::<Vec<String>>(&mut n.connection()).map(|k| k.len()).unwrap_or(0)
            })
            .collect()
    }
}

/// The data-plane binary, built next to the tests (`make test` builds it first).
pub fn dataplane_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe.parent().and_then(|deps| deps.parent()).map(|dir| dir.join("umw-dataplane")).expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p umw-dataplane`; make test does)",
        bin.display()
    );
    bin
}

/// A data-plane process on loopback ports it binds itself at its first start (read from its `serving` log
/// line; a restart keeps them), logging to `log`.
pub struct DataPlaneProcess {
    pub http: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl DataPlaneProcess {
    pub fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut process =
            Self { http: any, admin: any, config: config.to_path_buf(), log: log.to_path_buf(), child: None };
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("the log file");
        let offset = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let child = Command::new(dataplane_binary())
            .args(["--config", &self.config.to_string_lossy()])
            .args(["--http-address", &self.http.to_string(), "--admin-address", &self.admin.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting umw-dataplane");
        self.child = Some(child);
        if self.http.port() == 0 || self.admin.port() == 0 {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let text = std::fs::read_to_string(&self.log).unwrap_or_default();
                let serving = text.get(offset..).unwrap_or("").lines().find_map(|line| {
                    let line: serde_json::Value = serde_json::from_str(line).ok()?;
                    (line["message"] == "serving").then_some(())?;
                    Some((line["http"].as_str()?.parse().ok()?, line["admin"].as_str()?.parse().ok()?))
                });
                if let Some((http, admin)) = serving {
                    (self.http, self.admin) = (http, admin);
                    break;
                }
                assert!(Instant::now() < deadline, "the data plane never logged `serving`: {}", self.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// SIGKILL, as a crash would: nothing is flushed or committed on the way out.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same configuration and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DataPlaneProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
