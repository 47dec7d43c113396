//! TLS termination on the traffic listener, with certificates made by `openssl` as an operator makes them:
//! ALPN (h2, http/1.1), TLS 1.2 and 1.3, session resumption, SNI over several certificates, rotation of
//! the files without a restart, client certificates (required, optional, expired, from another authority)
//! and certificates that cannot be used.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde_json::Value;
use support::{Gateway, Upstream, eventually, middleware};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A scratch directory of PEM files made with `openssl`.
struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out =
        Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("umw-tls-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap()
    }

    /// A self-signed authority `<name>.crt`, `<name>.key`.
    fn authority(&self, name: &str) {
        let (crt, key, subject) = (format!("{name}.crt"), format!("{name}.key"), format!("/CN={name}"));
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &crt,
                "-days",
                "30",
                "-subj",
                &subject,
            ],
        );
    }

    /// A key and a certificate signed by `ca`, valid for `days` (negative: expired), with these extensions.
    fn issue(&self, name: &str, ca: &str, subject: &str, days: i32, extensions: &str) {
        let (key, csr, crt, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        std::fs::write(self.dir.join(&ext), extensions).unwrap();
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                subject,
            ],
        );
        let (ca_crt, ca_key, days) = (format!("{ca}.crt"), format!("{ca}.key"), days.to_string());
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                &days,
                "-extfile",
                &ext,
            ],
        );
    }

    fn server(&self, name: &str, ca: &str, dns: &[&str]) {
        let names: Vec<String> = dns.iter().map(|d| format!("DNS:{d}")).collect();
        let ext = format!("subjectAltName={}\nextendedKeyUsage=serverAuth\n", names.join(","));
        self.issue(name, ca, &format!("/CN={}", dns[0]), 30, &ext);
    }

    fn client(&self, name: &str, ca: &str, days: i32) {
        self.issue(
            name,
            ca,
            "/O=shop/CN=orders",
            days,
            "extendedKeyUsage=clientAuth\nsubjectAltName=URI:spiffe://shop/orders\n",
        );
    }

    /// Replaces `to.crt`/`to.key` with `from`'s, each by a rename, as a Secret volume update lands.
    fn replace(&self, from: &str, to: &str) {
        for ext in ["key", "crt"] {
            let tmp = self.dir.join(format!(".{to}.{ext}.tmp"));
            std::fs::copy(self.dir.join(format!("{from}.{ext}")), &tmp).unwrap();
            std::fs::rename(&tmp, self.dir.join(format!("{to}.{ext}"))).unwrap();
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An authority `ca` and the server certificate `served` (for `shop.test`) under it.
fn pki() -> Pki {
    let pki = Pki::new();
    pki.authority("ca");
    pki.server("served", "ca", &["shop.test"]);
    pki
}

fn config(upstream: &str, tls: &str) -> String {
    let routes = format!("    - name: all\n      upstream: {{url: '{upstream}'}}\n");
    middleware(&routes, &format!("  listeners:\n    http:\n      tls: {tls}\n"))
}

fn certificate(pki: &Pki, name: &str) -> String {
    format!("{{certFile: '{}', keyFile: '{}'}}", pki.path(&format!("{name}.crt")), pki.path(&format!("{name}.key")))
}

/// A client that trusts `ca`, speaks `alpn`, and shows `identity` (`<name>.crt`/`.key`) when given.
fn client_config(
    pki: &Pki,
    ca: &str,
    alpn: &[&str],
    identity: Option<&str>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pki.read(&format!("{ca}.crt"))) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain = CertificateDer::pem_slice_iter(&pki.read(&format!("{name}.crt")))
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(&pki.read(&format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

const BOTH: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

async fn connect(
    gw: &Gateway,
    config: Arc<ClientConfig>,
    sni: &str,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(gw.address).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("the handshake ends in time")
}

/// One GET over a fresh connection, in the protocol ALPN chose: status, version and the echoed request.
async fn get(
    gw: &Gateway,
    config: Arc<ClientConfig>,
    sni: &str,
    headers: &[(&str, &str)],
) -> Result<(http::Version, Value), String> {
    let stream = connect(gw, config, sni).await.map_err(|e| format!("handshake: {e}"))?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let mut request = http::Request::builder().uri(format!("https://{sni}/echo"));
    if !h2 {
        request = request.header("host", sni);
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Empty::<Bytes>::new()).unwrap();
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(connection);
        sender.send_request(request).await
    } else {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("http/1.1: {e}"))?;
        tokio::spawn(connection);
        sender.send_request(request).await
    }
    .map_err(|e| format!("request: {e}"))?;
    let version = response.version();
    let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok((version, serde_json::from_slice(&body).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&body)))?))
}

async fn handshakes(gw: &Gateway, outcome: &str) -> f64 {
    gw.metric("umw_tls_handshakes_total", &[&format!("outcome=\"{outcome}\"")]).await
}

#[tokio::test]
async fn https_speaks_h2_and_http1_by_alpn_over_tls12_and_tls13_and_resumes_sessions() {
    let pki = pki();
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up.url(), &format!("{{certificates: [{}]}}", certificate(&pki, "served")))).await;

    let h2 = client_config(&pki, "ca", &["h2", "http/1.1"], None, BOTH);
    let (version, echo) = get(&gw, h2.clone(), "shop.test", &[]).await.unwrap();
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(echo["uri"], "/echo");
    let http1 = client_config(&pki, "ca", &["http/1.1"], None, TLS12);
    let (version, _) = get(&gw, http1.clone(), "shop.test", &[]).await.unwrap();
    assert_eq!(version, http::Version::HTTP_11);
    let stream = connect(&gw, http1.clone(), "shop.test").await.unwrap();
    assert_eq!(stream.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    let stream = connect(&gw, h2.clone(), "shop.test").await.unwrap();
    assert_eq!(stream.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    drop(stream);

    // The clients kept their sessions (a TLS 1.3 ticket, a TLS 1.2 session): the next handshakes resume.
    let resumed_before = handshakes(&gw, "resumed").await;
    for config in [h2, http1] {
        get(&gw, config.clone(), "shop.test", &[]).await.unwrap();
        let stream = connect(&gw, config, "shop.test").await.unwrap();
        assert_eq!(stream.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    }
    assert!(handshakes(&gw, "resumed").await >= resumed_before + 2.0);
    assert!(handshakes(&gw, "full").await >= 2.0);

    // Plain HTTP on the HTTPS port is not served, and counted.
    let mut plain = tokio::net::TcpStream::connect(gw.address).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    plain.write_all(b"GET /echo HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"), "{answer:?}");
    eventually("the plain request counted as a failed handshake", Duration::from_secs(5), || async {
        handshakes(&gw, "error").await >= 1.0
    })
    .await;
    let status = gw.status().await;
    let tls = status["components"].as_array().unwrap().iter().find(|c| c["name"] == "tls").unwrap().clone();
    assert_eq!(tls["state"], "Up", "{tls}");
    assert!(tls["message"].as_str().unwrap().contains("shop.test, expires 20"), "{tls}");
    assert!(gw.metric("umw_tls_certificate_expiry_timestamp_seconds", &[]).await > 1.7e9);
}

#[tokio::test]
async fn a_minimum_of_tls13_refuses_tls12_clients() {
    let pki = pki();
    let up = Upstream::start("up").await;
    let tls = format!("{{minVersion: TLS13, certificates: [{}]}}", certificate(&pki, "served"));
    let gw = Gateway::start(&config(&up.url(), &tls)).await;
    let error = get(&gw, client_config(&pki, "ca", &["http/1.1"], None, TLS12), "shop.test", &[]).await.unwrap_err();
    assert!(error.starts_with("handshake:"), "{error}");
    assert_eq!(handshakes(&gw, "incompatible").await, 1.0);
    get(&gw, client_config(&pki, "ca", &["http/1.1"], None, BOTH), "shop.test", &[]).await.unwrap();
}

/// Accepts any server certificate and keeps the one it was shown.
#[derive(Debug, Default)]
struct Recorder(Mutex<Option<Vec<u8>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// The end-entity certificate the gateway shows to a client that asks for `sni`.
async fn served_to(gw: &Gateway, sni: &str) -> Vec<u8> {
    let recorder = Arc::new(Recorder::default());
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(BOTH)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    let _stream = connect(gw, Arc::new(config), sni).await.unwrap();
    let served = recorder.0.lock().unwrap().clone();
    served.expect("a certificate was shown")
}

fn der(pki: &Pki, name: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(&pki.read(&format!("{name}.crt"))).unwrap().to_vec()
}

#[tokio::test]
async fn sni_picks_the_certificate_that_covers_the_name_and_the_first_otherwise() {
    let pki = pki();
    pki.server("api", "ca", &["*.api.test", "api.test"]);
    let up = Upstream::start("up").await;
    let tls = format!("{{certificates: [{}, {}]}}", certificate(&pki, "served"), certificate(&pki, "api"));
    let gw = Gateway::start(&config(&up.url(), &tls)).await;
    assert_eq!(served_to(&gw, "shop.test").await, der(&pki, "served"));
    assert_eq!(served_to(&gw, "orders.api.test").await, der(&pki, "api"));
    assert_eq!(served_to(&gw, "API.test").await, der(&pki, "api"), "names are case-insensitive");
    assert_eq!(served_to(&gw, "a.b.api.test").await, der(&pki, "served"), "a wildcard covers one label");
    assert_eq!(served_to(&gw, "elsewhere.test").await, der(&pki, "served"));
    // A verifying client accepts each for its name.
    get(&gw, client_config(&pki, "ca", &["h2"], None, BOTH), "orders.api.test", &[]).await.unwrap();
}

#[tokio::test]
async fn renewed_certificates_are_served_without_a_restart_and_unusable_ones_are_refused() {
    let pki = pki();
    pki.server("renewed", "ca", &["shop.test", "www.shop.test"]);
    pki.server("other", "ca", &["other.test"]);
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up.url(), &format!("{{certificates: [{}]}}", certificate(&pki, "served")))).await;
    let first = der(&pki, "served");
    assert_eq!(served_to(&gw, "shop.test").await, first);

    pki.replace("renewed", "served");
    let renewed = der(&pki, "renewed");
    eventually("the renewed certificate is served", Duration::from_secs(10), || async {
        served_to(&gw, "shop.test").await == renewed
    })
    .await;
    assert_eq!(gw.metric("umw_tls_reloads_total", &["outcome=\"applied\""]).await, 1.0);
    get(&gw, client_config(&pki, "ca", &["h2"], None, BOTH), "www.shop.test", &[]).await.unwrap();

    // A key that does not belong to the certificate: refused, the renewed one stays.
    std::fs::copy(pki.dir.join("other.key"), pki.dir.join("served.key")).unwrap();
    eventually("the mismatched key is refused", Duration::from_secs(10), || async {
        gw.metric("umw_tls_reloads_total", &["outcome=\"rejected\""]).await == 1.0
    })
    .await;
    assert_eq!(served_to(&gw, "shop.test").await, renewed);
    let status = gw.status().await;
    let tls = status["components"].as_array().unwrap().iter().find(|c| c["name"] == "tls").unwrap().clone();
    assert_eq!(tls["state"], "Degraded", "{tls}");
    let message = tls["message"].as_str().unwrap();
    assert!(message.contains("served.key: the private key does not belong to the certificate in"), "{message}");
    assert!(message.contains("serving the previous ones"), "{message}");
    // Readiness does not depend on it: the listener still serves.
    assert_eq!(status["ready"], true, "{status}");

    // Fixing the key recovers.
    pki.replace("renewed", "served");
    eventually("the fixed pair is applied", Duration::from_secs(10), || async {
        gw.metric("umw_tls_reloads_total", &["outcome=\"applied\""]).await == 2.0
    })
    .await;
    let status = gw.status().await;
    let tls = status["components"].as_array().unwrap().iter().find(|c| c["name"] == "tls").unwrap().clone();
    assert_eq!(tls["state"], "Up", "{tls}");
}

#[tokio::test]
async fn client_certificates_are_required_verified_and_passed_on_to_the_upstream() {
    let pki = pki();
    pki.client("orders", "ca", 30);
    pki.client("expired", "ca", -1);
    pki.authority("elsewhere");
    pki.client("stranger", "elsewhere", 30);
    let up = Upstream::start("up").await;
    let tls = format!(
        "{{certificates: [{}], clientCertificates: {{caFile: '{}'}}}}",
        certificate(&pki, "served"),
        pki.path("ca.crt")
    );
    let gw = Gateway::start(&config(&up.url(), &tls)).await;

    let spoof = [("x-forwarded-client-cert", "Subject=\"CN=admin\"")];
    let (_, echo) =
        get(&gw, client_config(&pki, "ca", &["h2"], Some("orders"), BOTH), "shop.test", &spoof).await.unwrap();
    let xfcc = echo["headers"]["x-forwarded-client-cert"].as_str().unwrap();
    assert!(xfcc.starts_with("Hash="), "{xfcc}");
    assert!(xfcc.contains(";Subject=\"CN=orders,O=shop\";URI=spiffe://shop/orders"), "{xfcc}");
    assert!(!xfcc.contains("admin"), "{xfcc}");

    for (identity, outcome) in [
        (None, "client_certificate_missing"),
        (Some("expired"), "client_certificate_expired"),
        (Some("stranger"), "client_certificate_invalid"),
    ] {
        let before = up.hits();
        // TLS 1.2: the server's refusal ends the client's handshake. Under TLS 1.3 the client finishes
        // first and learns of it on its first read.
        for versions in [TLS12, BOTH] {
            let result = get(&gw, client_config(&pki, "ca", &["http/1.1"], identity, versions), "shop.test", &[]).await;
            assert!(result.is_err(), "{identity:?} over {versions:?} was let in: {result:?}");
        }
        assert_eq!(up.hits(), before, "{identity:?} reached the upstream");
        assert_eq!(handshakes(&gw, outcome).await, 2.0, "{outcome}");
    }
}

#[tokio::test]
async fn optional_client_certificates_let_anonymous_clients_in_without_a_claimed_identity() {
    let pki = pki();
    pki.client("orders", "ca", 30);
    pki.client("expired", "ca", -1);
    let up = Upstream::start("up").await;
    let tls = format!(
        "{{certificates: [{}], clientCertificates: {{caFile: '{}', mode: Optional}}}}",
        certificate(&pki, "served"),
        pki.path("ca.crt")
    );
    let gw = Gateway::start(&config(&up.url(), &tls)).await;
    let spoof = [("x-forwarded-client-cert", "Subject=\"CN=admin\"")];
    let (_, echo) = get(&gw, client_config(&pki, "ca", &["h2"], None, BOTH), "shop.test", &spoof).await.unwrap();
    assert!(echo["headers"].get("x-forwarded-client-cert").is_none(), "{echo}");
    let (_, echo) = get(&gw, client_config(&pki, "ca", &["h2"], Some("orders"), BOTH), "shop.test", &[]).await.unwrap();
    assert!(echo["headers"]["x-forwarded-client-cert"].as_str().unwrap().contains("CN=orders,O=shop"), "{echo}");
    assert!(get(&gw, client_config(&pki, "ca", &["h2"], Some("expired"), BOTH), "shop.test", &[]).await.is_err());
    assert_eq!(handshakes(&gw, "client_certificate_expired").await, 1.0);
}

/// Starting with certificates that cannot be used stops with the file and the reason.
async fn start_error(yaml: &str, pki: &Pki) -> String {
    let file = pki.dir.join("config.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (files, loaded) = umw_dataplane::config::load(&file).unwrap();
    let options = umw_dataplane::app::Options {
        http_address: Some("127.0.0.1:0".parse().unwrap()),
        admin_address: Some("127.0.0.1:0".parse().unwrap()),
        tls_dir: pki.dir.join("secrets"),
        ..umw_dataplane::app::Options::new(file)
    };
    match umw_dataplane::app::App::start(options, files, loaded, umw_dataplane::telemetry::LogControl::disabled()).await
    {
        Ok(app) => {
            app.abort();
            panic!("started with {yaml}");
        }
        Err(error) => format!("{error:#}"),
    }
}

#[tokio::test]
async fn certificates_that_cannot_be_used_stop_the_start_with_the_file_and_the_reason() {
    let pki = pki();
    pki.server("other", "ca", &["other.test"]);
    let up = Upstream::start("up").await;
    let with = |cert: &str, key: &str| {
        config(
            &up.url(),
            &format!("{{certificates: [{{certFile: '{}', keyFile: '{}'}}]}}", pki.path(cert), pki.path(key)),
        )
    };
    let error = start_error(&with("served.crt", "other.key"), &pki).await;
    assert!(error.contains("other.key: the private key does not belong to the certificate in"), "{error}");
    let error = start_error(&with("missing.crt", "served.key"), &pki).await;
    assert!(error.contains("reading ") && error.contains("missing.crt: No such file"), "{error}");
    std::fs::write(pki.dir.join("garbage.crt"), "not a certificate\n").unwrap();
    let error = start_error(&with("garbage.crt", "served.key"), &pki).await;
    assert!(error.contains("garbage.crt: holds no PEM certificate"), "{error}");
    let error = start_error(&with("served.crt", "garbage.crt"), &pki).await;
    assert!(error.contains("garbage.crt: not a PEM private key"), "{error}");
    let error = start_error(
        &config(
            &up.url(),
            &format!(
                "{{certificates: [{}], clientCertificates: {{caFile: '{}'}}}}",
                certificate(&pki, "served"),
                pki.path("garbage.crt")
            ),
        ),
        &pki,
    )
    .await;
    assert!(error.contains("garbage.crt (") && error.contains("holds no PEM certificate"), "{error}");

    // A Secret's files, under the TLS directory, by the Secret's name.
    let secret = pki.dir.join("secrets/shop-tls");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::copy(pki.dir.join("served.crt"), secret.join("tls.crt")).unwrap();
    let error = start_error(&config(&up.url(), "{certificates: [{secretName: shop-tls}]}"), &pki).await;
    assert!(error.contains("secrets/shop-tls/tls.key: No such file"), "{error}");
    std::fs::copy(pki.dir.join("served.key"), secret.join("tls.key")).unwrap();
    let file = pki.dir.join("config.yaml");
    std::fs::write(&file, config(&up.url(), "{certificates: [{secretName: shop-tls}]}")).unwrap();
    let (files, loaded) = umw_dataplane::config::load(&file).unwrap();
    let options = umw_dataplane::app::Options {
        http_address: Some("127.0.0.1:0".parse().unwrap()),
        admin_address: Some("127.0.0.1:0".parse().unwrap()),
        tls_dir: pki.dir.join("secrets"),
        ..umw_dataplane::app::Options::new(file)
    };
    let app = umw_dataplane::app::App::start(options, files, loaded, umw_dataplane::telemetry::LogControl::disabled())
        .await
        .unwrap();
    app.abort();
}
