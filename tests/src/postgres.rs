//! A private PostgreSQL server on loopback: Debian's `postgresql` binaries, a fresh cluster made with
//! `initdb` in a temporary directory, a password-protected user `umw` and a database `umw`. The server
//! refuses to run as root, so as root the cluster belongs to (and the server runs as) the `postgres` user.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "umw";
pub const PASSWORD: &str = "umw-test-password";

pub struct PostgresServer {
    /// The address it listens on: 127.0.0.1 unless started with [`PostgresServer::start_on`].
    pub host: String,
    pub port: u16,
    /// Keeps `port` for this server (restarts included).
    _port: crate::ports::Port,
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    /// `(uid, gid)` the server runs as, when started by root.
    owner: Option<(u32, u32)>,
    /// Extra `-c name=value` settings, kept for restarts.
    settings: Vec<String>,
    /// With TLS: the authority's certificate (PEM) that signed the server's.
    pub ca_cert: Option<String>,
}

/// The directory of the PostgreSQL server binaries: `UMW_PG_BIN`, or the newest Debian installation.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("UMW_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("no PostgreSQL server found under /usr/lib/postgresql: install it with `apt-get install postgresql` (make test does), or set UMW_PG_BIN")
    })
}

fn id_of(user: &str, flag: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, user]).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

impl PostgresServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server listening on `host`, an address of this machine (e.g. the real node's bridge address),
    /// that also accepts password logins from `clients` (a CIDR: the node's pods).
    pub fn start_on(host: &str, clients: &str) -> Self {
        Self::start_inner(&[], false, host, Some(clients))
    }

    /// A server that accepts only TLS connections, with a certificate for 127.0.0.1 signed by a private
    /// authority (made with `openssl`; its certificate is [`PostgresServer::ca_cert`]).
    pub fn start_tls() -> Self {
        Self::start_inner(&[], true, "127.0.0.1", None)
    }

    /// A server with extra settings (`name=value`, as for `postgres -c`).
    pub fn start_with(settings: &[&str]) -> Self {
        Self::start_inner(settings, false, "127.0.0.1", None)
    }

    fn start_inner(settings: &[&str], tls: bool, host: &str, clients: Option<&str>) -> Self {
        let dir = std::env::temp_dir().join(format!("umw-pg-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).expect("a temp directory");
        let owner = if is_root() {
            let uid = id_of("postgres", "-u")
                .expect("as root, the server runs as the user postgres: install postgresql (it creates the user)");
            let gid = id_of("postgres", "-g").expect("the group of the user postgres");
            Some((uid, gid))
        } else {
            None
        };
        let port = crate::ports::reserve_on(host);
        let mut server = Self {
            host: host.to_string(),
            port: port.get(),
            _port: port,
            dir,
            bin: bin_dir(),
            child: None,
            owner,
            settings: settings.iter().map(|s| s.to_string()).collect(),
            ca_cert: None,
        };
        server.init();
        if let Some(clients) = clients {
            let hba = server.data().join("pg_hba.conf");
            let mut rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
            rules.push_str(&format!("host all all {clients} scram-sha-256\n"));
            std::fs::write(&hba, rules).expect("pg_hba.conf");
        }
        if tls {
            server.enable_tls();
        }
        server.spawn();
        server.wait_ready();
        server.sql(&format!("CREATE DATABASE {USER} OWNER {USER}"));
        server
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command.current_dir(&self.dir).env("LC_ALL", "C.UTF-8").env_remove("PGDATA");
        command
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn init(&self) {
        let password_file = self.dir.join("password");
        std::fs::write(&password_file, PASSWORD).expect("the password file");
        if let Some((uid, gid)) = self.owner {
            chown(&self.dir, uid, gid);
            chown(&password_file, uid, gid);
        }
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data())
            .args(["-U", USER, "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .arg(format!("--pwfile={}", password_file.display()))
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Certificates in the cluster's directory, `ssl = on`, and a `pg_hba.conf` that refuses plain TCP.
    fn enable_tls(&mut self) {
        let certs = self.dir.join("certs");
        std::fs::create_dir_all(&certs).expect("a certificate directory");
        crate::make_certificates(&certs);
        let data = self.data();
        for file in ["server.crt", "server.key"] {
            std::fs::copy(certs.join(file), data.join(file)).expect("copying the certificate");
            if let Some((uid, gid)) = self.owner {
                chown(&data.join(file), uid, gid);
            }
        }
        let status = Command::new("chmod").arg("600").arg(data.join("server.key")).status().expect("chmod");
        assert!(status.success());
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 0.0.0.0/0 reject\n",
        )
        .expect("pg_hba.conf");
        self.settings.extend(["ssl=on".into(), "ssl_cert_file=server.crt".into(), "ssl_key_file=server.key".into()]);
        self.ca_cert = Some(std::fs::read_to_string(certs.join("ca.crt")).expect("the authority's certificate"));
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("server.log")).expect("the log file");
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-c", &format!("listen_addresses={}", self.host)])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "max_connections=200", "-c", "shared_buffers=128MB"]);
        for setting in &self.settings {
            command.arg("-c").arg(setting);
        }
        let child = command.stdout(Stdio::null()).stderr(log).spawn().expect("starting postgres");
        self.child = Some(child);
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", &self.host, "-p", &self.port.to_string(), "-U", USER, "-d", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start on port {}: {}",
                self.port,
                std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `postgres://` URL of the database `umw`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}:{PASSWORD}@{}:{}/{USER}", self.host, self.port)
    }

    /// Runs SQL with `psql` against the database `postgres` (or `umw` once created) and returns its
    /// unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in(if sql.starts_with("CREATE DATABASE") { "postgres" } else { USER }, sql)
    }

    fn sql_in(&self, database: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", &self.host, "-p", &self.port.to_string(), "-U", USER, "-d", database])
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .expect("running psql (install postgresql-client)");
        assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`: no checkpoint, recovery on start).
    pub fn crash(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_ready();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .is_some_and(|s| s.trim() == "0")
}

fn chown(path: &Path, uid: u32, gid: u32) {
    let status = Command::new("chown").arg(format!("{uid}:{gid}")).arg(path).status().expect("running chown");
    assert!(status.success(), "chown {}", path.display());
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.crash();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
