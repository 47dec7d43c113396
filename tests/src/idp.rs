//! A real OpenID provider for the auth tests: `oidc-provider` from npm (tests/idp/op.mjs, installed by
//! `make testenv` with `npm ci` from the committed lockfile), on a reserved loopback port, with signing
//! keys made by tests/idp/keys.mjs. Restarting it with another key set is how key rotation is tested.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ports;

/// The directory of the provider's script and its `node_modules`.
fn idp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("idp")
}

fn node() -> Command {
    Command::new("node")
}

/// A signing key made by tests/idp/keys.mjs.
pub struct SigningKey {
    pub kid: String,
    /// The private JWK, as the provider reads it.
    pub private_jwk: PathBuf,
    /// The public JWK (JSON).
    pub public_jwk: serde_json::Value,
    /// The private key as PKCS#8 DER, for tokens a test signs itself.
    pub pkcs8: Vec<u8>,
}

/// The kind of key to make.
#[derive(Clone, Copy)]
pub enum KeyType {
    Rsa,
    /// RSA with a 1024-bit modulus: too weak to be trusted.
    Rsa1024,
    EcP256,
}

/// Makes a key in `dir` with `node tests/idp/keys.mjs`.
pub fn make_key(dir: &Path, kid: &str, kind: KeyType) -> SigningKey {
    let kind_arg = match kind {
        KeyType::Rsa => "rsa",
        KeyType::Rsa1024 => "rsa1024",
        KeyType::EcP256 => "ec",
    };
    let out = node()
        .arg(idp_dir().join("keys.mjs"))
        .args([dir.to_str().expect("a UTF-8 path"), kid, kind_arg])
        .output()
        .unwrap_or_else(|e| panic!("cannot run node ({e}): install Node.js 20 or later (make testenv does)"));
    assert!(out.status.success(), "keys.mjs {kid}: {}", String::from_utf8_lossy(&out.stderr));
    let read = |suffix: &str| std::fs::read(dir.join(format!("{kid}{suffix}"))).expect("a key file");
    SigningKey {
        kid: kid.to_string(),
        private_jwk: dir.join(format!("{kid}.jwk")),
        public_jwk: serde_json::from_slice(&read(".pub.jwk")).expect("a JWK"),
        pkcs8: read(".der"),
    }
}

/// The provider, stopped when dropped.
pub struct IdentityProvider {
    pub port: u16,
    _port: ports::Port,
    child: Option<Child>,
}

impl IdentityProvider {
    /// Starts the provider signing with the first of `keys` and publishing all of them.
    pub fn start(keys: &[&SigningKey]) -> Self {
        let port = ports::reserve();
        let mut idp = Self { port: port.get(), _port: port, child: None };
        idp.spawn(keys);
        idp
    }

    /// The issuer identifier (no trailing slash, as the provider names itself).
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the provider and starts it again on the same port with another key set.
    pub fn restart(&mut self, keys: &[&SigningKey]) {
        self.stop();
        self.spawn(keys);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self, keys: &[&SigningKey]) {
        let dir = idp_dir();
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "{}/node_modules has no oidc-provider: run `make testenv` (it runs `npm ci` there)",
            dir.display()
        );
        let files: Vec<String> = keys.iter().map(|k| k.private_jwk.to_string_lossy().into_owned()).collect();
        let mut child = node()
            .arg(dir.join("op.mjs"))
            .env("OP_PORT", self.port.to_string())
            .env("OP_KEYS", files.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run node ({e}): install Node.js 20 or later (make testenv does)"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let ready = lines.by_ref().map_while(Result::ok).any(|l| l.starts_with("ready "));
            let _ = tx.send(ready);
            // Keep reading so that the provider never blocks on a full pipe.
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(true) => {}
            _ => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("the OpenID provider on port {} did not start (exit: {status:?})", self.port);
            }
        }
        self.child = Some(child);
    }

    /// A JWT access token for the client `svc` (client-credentials grant, audience `urn:umw:api`).
    pub async fn client_token(&self) -> String {
        use http_body_util::BodyExt as _;
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let form = "grant_type=client_credentials&scope=api%3Aread&resource=urn%3Aumw%3Aapi";
        let request = http::Request::post(format!("{}/token", self.issuer()))
            // svc:svc-secret
            .header(http::header::AUTHORIZATION, "Basic c3ZjOnN2Yy1zZWNyZXQ=")
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(form.as_bytes())))
            .expect("a request");
        let response = client.request(request).await.expect("the provider answers");
        let status = response.status();
        let body = response.into_body().collect().await.expect("a body").to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, http::StatusCode::OK, "token request: {body}");
        let reply: serde_json::Value = serde_json::from_str(&body).expect("a JSON token response");
        reply["access_token"].as_str().expect("an access token").to_string()
    }
}

impl Drop for IdentityProvider {
    fn drop(&mut self) {
        self.stop();
    }
}
