//! TLS termination on the traffic listener: certificates chosen by SNI, ALPN (`h2`, `http/1.1`), TLS 1.2 and
//! 1.3, session resumption (tickets and a session cache), optional client certificates.
//!
//! Certificates come from files: two per certificate (chain and key) and one for the client authority. In
//! a cluster they are Secret volumes, which the kubelet updates in place when the Secret changes; the files
//! are polled, and new contents are served from the next handshake on. Contents that cannot be used (a key
//! that does not match its certificate, a file that is not PEM) are refused with the file and the reason,
//! counted, and shown on the `tls` component while the previous certificates stay in service. At start,
//! they stop the data plane with the same message.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, IntGaugeVec};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use sha2::Digest as _;
use umw_crds::middleware::{ClientCertificateMode, ListenerTls, TlsVersion, tls_keys};

use crate::kernel::health::{Health, State};
use crate::kernel::metrics::Metrics;

/// Where the operator mounts the Secrets a listener's TLS names, one directory per Secret.
pub const DEFAULT_TLS_DIR: &str = "/etc/umw/tls";
/// Sessions the server remembers for TLS 1.2 session-id resumption and stateful TLS 1.3 resumption.
const SESSION_CACHE_ENTRIES: usize = 4096;
/// A certificate that expires sooner than this shows the `tls` component `Degraded`.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

pub use crate::kernel::metrics::tls_outcomes as outcomes;

/// The files of one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Source {
    /// How the configuration names it: the Secret's name or the certificate file.
    name: String,
    cert: PathBuf,
    key: PathBuf,
}

/// Where the certificates and the client authority are read from, and the settings that do not change.
#[derive(Clone, Debug)]
pub struct Sources {
    certificates: Vec<Source>,
    client_ca: Option<(String, PathBuf)>,
    mode: ClientCertificateMode,
    min_version: TlsVersion,
}

impl Sources {
    /// The files `tls` names; a Secret's files are under `tls_dir/<secret name>/`.
    pub fn new(tls: &ListenerTls, tls_dir: &Path) -> Self {
        let certificates = tls
            .certificates
            .iter()
            .map(|c| match (&c.secret_name, &c.cert_file, &c.key_file) {
                (Some(secret), _, _) => Source {
                    name: format!("secret {secret}"),
                    cert: tls_dir.join(secret).join(tls_keys::CERT),
                    key: tls_dir.join(secret).join(tls_keys::KEY),
                },
                (None, cert, key) => Source {
                    name: cert.clone().unwrap_or_default(),
                    cert: cert.clone().unwrap_or_default().into(),
                    key: key.clone().unwrap_or_default().into(),
                },
            })
            .collect();
        let client_ca = tls.client_certificates.as_ref().map(|c| match (&c.ca_secret_name, &c.ca_file) {
            (Some(secret), _) => (format!("secret {secret}"), tls_dir.join(secret).join(tls_keys::CA)),
            (None, file) => (file.clone().unwrap_or_default(), file.clone().unwrap_or_default().into()),
        });
        let mode = tls.client_certificates.as_ref().map(|c| c.mode).unwrap_or_default();
        Self { certificates, client_ca, mode, min_version: tls.min_version }
    }

    /// Every file, in a fixed order: each certificate's chain and key, then the authority.
    fn paths(&self) -> Vec<&Path> {
        let mut paths: Vec<&Path> =
            self.certificates.iter().flat_map(|c| [c.cert.as_path(), c.key.as_path()]).collect();
        paths.extend(self.client_ca.as_ref().map(|(_, path)| path.as_path()));
        paths
    }

    fn read(&self) -> Result<Vec<Vec<u8>>, String> {
        self.paths()
            .into_iter()
            .map(|path| std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display())))
            .collect()
    }
}

/// One certificate as served.
#[derive(Debug)]
struct Served {
    /// Lower-case DNS names (`*.` wildcards included) it covers.
    names: Vec<String>,
    key: Arc<CertifiedKey>,
    not_after: Option<SystemTime>,
}

/// Picks the certificate for a handshake by the name the client asks for.
#[derive(Debug)]
struct BySni {
    served: Vec<Served>,
}

impl BySni {
    fn pick(&self, name: Option<&str>) -> &Served {
        let name = name.map(str::to_ascii_lowercase);
        name.and_then(|name| self.served.iter().find(|s| s.names.iter().any(|n| covers(n, &name))))
            .unwrap_or(&self.served[0])
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).key.clone())
    }
}

/// Whether a certificate name (`shop.example.com`, `*.example.com`) covers a host: a wildcard stands for
/// exactly one leftmost label.
fn covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == host,
    }
}

/// The state that survives a rotation, so that sessions resume across it.
struct Resumption {
    tickets: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions + Send + Sync>,
}

/// The listener's TLS: the current configuration, swapped whole when the files change.
pub struct Tls {
    sources: Sources,
    current: ArcSwap<ServerConfig>,
    /// The file contents last looked at (applied or refused), or why they could not be read, so that each
    /// change is handled and reported once.
    last_read: Mutex<Result<Vec<Vec<u8>>, String>>,
    resumption: Resumption,
    provider: Arc<CryptoProvider>,
    health: Health,
    reloads: IntCounterVec,
    expiry: IntGaugeVec,
    pub(crate) handshakes: IntCounterVec,
}

impl Tls {
    /// Reads and checks every file; an error names the file and what is wrong with it.
    pub fn load(sources: Sources, metrics: &Metrics, health: Health) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resumption = Resumption {
            tickets: rustls::crypto::ring::Ticketer::new()
                .map_err(|e| format!("starting the session ticketer: {e}"))?,
            sessions: rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
        };
        let contents = sources.read()?;
        let (config, served) = build(&sources, &contents, &resumption, &provider)?;
        let tls = Self {
            sources,
            current: ArcSwap::from_pointee(config),
            last_read: Mutex::new(Ok(contents)),
            resumption,
            provider,
            health,
            reloads: metrics.tls_reloads.clone(),
            expiry: metrics.tls_certificate_expiry.clone(),
            handshakes: metrics.tls_handshakes.clone(),
        };
        tls.report(&served);
        Ok(tls)
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Looks at the files once: new contents that can be used are swapped in; others are refused and the
    /// running certificates stay.
    pub fn check(&self) {
        let read = self.sources.read();
        {
            let mut last = self.last_read.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last == read {
                return;
            }
            *last = read.clone();
        }
        let contents = match read {
            Ok(contents) => contents,
            Err(error) => return self.refuse(error),
        };
        match build(&self.sources, &contents, &self.resumption, &self.provider) {
            Ok((config, served)) => {
                self.current.store(Arc::new(config));
                self.reloads.with_label_values(&["applied"]).inc();
                tracing::info!(certificates = served.served.len(), "TLS certificates reloaded");
                self.report(&served);
            }
            Err(error) => self.refuse(error),
        }
    }

    fn refuse(&self, error: String) {
        self.reloads.with_label_values(&["rejected"]).inc();
        tracing::error!(%error, "new TLS certificates refused; the previous ones stay in service");
        self.health.set(
            "tls",
            State::Degraded,
            format!("new certificates refused, serving the previous ones: {error}"),
            false,
        );
    }

    /// Sets the expiry gauges and the `tls` component from what is served.
    fn report(&self, served: &BySni) {
        let mut message = String::new();
        let mut worst = State::Up;
        let now = SystemTime::now();
        for (source, served) in self.sources.certificates.iter().zip(&served.served) {
            let not_after = served.not_after.map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
            self.expiry.with_label_values(&[&source.name]).set(not_after.map_or(0, |t| t.as_secs() as i64));
            let names = if served.names.is_empty() { "no DNS names".to_string() } else { served.names.join(", ") };
            let _ = write!(message, "{}{} ({names}", if message.is_empty() { "" } else { "; " }, source.name);
            if let Some(not_after) = served.not_after {
                let _ = write!(message, ", expires {}", chrono::DateTime::<chrono::Utc>::from(not_after).to_rfc3339());
                if not_after < now + EXPIRY_WARNING {
                    worst = State::Degraded;
                    message.push_str(if not_after < now { ", EXPIRED" } else { ", expires within 7 days" });
                }
            }
            message.push(')');
        }
        self.health.set("tls", worst, message, false);
    }
}

/// Builds a configuration from file contents in [`Sources::paths`] order.
fn build(
    sources: &Sources,
    contents: &[Vec<u8>],
    resumption: &Resumption,
    provider: &Arc<CryptoProvider>,
) -> Result<(ServerConfig, Arc<BySni>), String> {
    let mut served = Vec::with_capacity(sources.certificates.len());
    for (i, source) in sources.certificates.iter().enumerate() {
        served.push(certified(source, &contents[2 * i], &contents[2 * i + 1], provider)?);
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match sources.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &sources.client_ca {
        None => builder.with_no_client_auth(),
        Some((name, path)) => {
            let pem = contents.last().map(Vec::as_slice).unwrap_or_default();
            let mut roots = rustls::RootCertStore::empty();
            let mut count = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("{}: not a usable authority certificate: {e}", path.display()))?;
                count += 1;
            }
            if count == 0 {
                return Err(format!("{} ({name}): holds no PEM certificate", path.display()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = match sources.mode {
                ClientCertificateMode::Require => verifier,
                ClientCertificateMode::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(
                verifier.build().map_err(|e| format!("{} ({name}): client authority: {e}", path.display()))?,
            )
        }
    };
    let served = Arc::new(BySni { served });
    let mut config = builder.with_cert_resolver(served.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = resumption.tickets.clone();
    config.session_storage = resumption.sessions.clone();
    // Tickets carry resumption; the TLS 1.3 default of four tickets per handshake is more than a browser uses.
    config.send_tls13_tickets = 2;
    Ok((config, served))
}

/// One certificate chain and its key, checked to belong together.
fn certified(source: &Source, chain: &[u8], key: &[u8], provider: &CryptoProvider) -> Result<Served, String> {
    let cert_file = source.cert.display();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_file}: not a PEM certificate chain: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{cert_file}: holds no PEM certificate"));
    };
    let parsed = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("{cert_file}: the first certificate cannot be parsed: {e}"))?;
    let names = parsed.valid_dns_names().map(str::to_ascii_lowercase).collect();
    let not_after = crate::kernel::x509::validity(leaf).map(|(_, not_after)| not_after);
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("{}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}", source.key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: the private key cannot be used: {e}", source.key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(format!(
                "{}: the private key does not belong to the certificate in {cert_file}",
                source.key.display()
            ));
        }
    }
    Ok(Served { names, key: Arc::new(certified), not_after })
}

/// A verified client certificate: what the upstream gets in `x-forwarded-client-cert`, and what
/// authorization sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The subject, RFC 4514 (`CN=orders,O=shop`).
    pub subject: String,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    /// SHA-256 of the certificate's DER, in lower-case hex.
    pub hash: String,
}

/// The header that carries a verified client certificate to the upstream, in the format Envoy defined.
pub const CLIENT_CERT_HEADER: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

impl ClientCertificate {
    /// The verified leaf certificate of a connection, if the client showed one.
    pub fn of(connection: &rustls::ServerConnection) -> Option<Self> {
        let leaf = connection.peer_certificates()?.first()?;
        let parsed = webpki::EndEntityCert::try_from(leaf).ok()?;
        Some(Self {
            subject: crate::kernel::x509::distinguished_name(parsed.subject()).unwrap_or_default(),
            dns_names: parsed.valid_dns_names().map(str::to_string).collect(),
            uris: parsed.valid_uri_names().map(str::to_string).collect(),
            hash: sha2::Sha256::digest(leaf.as_ref()).iter().fold(String::with_capacity(64), |mut hex, byte| {
                let _ = write!(hex, "{byte:02x}");
                hex
            }),
        })
    }

    /// `Hash=…;Subject="…";URI=…;DNS=…`.
    pub fn header_value(&self) -> Option<http::HeaderValue> {
        let mut value =
            format!("Hash={};Subject=\"{}\"", self.hash, self.subject.replace('\\', "\\\\").replace('"', "\\\""));
        for uri in &self.uris {
            let _ = write!(value, ";URI={uri}");
        }
        for dns in &self.dns_names {
            let _ = write!(value, ";DNS={dns}");
        }
        http::HeaderValue::from_str(&value).ok()
    }
}

/// The `umw_tls_handshakes_total` outcome of a failed handshake.
pub fn failure_outcome(error: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error};
    let Some(error) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return outcomes::ERROR;
    };
    match error {
        Error::NoCertificatesPresented => outcomes::CLIENT_CERTIFICATE_MISSING,
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            outcomes::CLIENT_CERTIFICATE_EXPIRED
        }
        Error::InvalidCertificate(_) => outcomes::CLIENT_CERTIFICATE_INVALID,
        Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate,
        ) => outcomes::REFUSED_BY_CLIENT,
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => outcomes::INCOMPATIBLE,
        _ => outcomes::ERROR,
    }
}

/// Polls the files every `interval`.
pub async fn watch(tls: Arc<Tls>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let tls = tls.clone();
        // Reading files and parsing keys is blocking work, off the serving threads.
        if tokio::task::spawn_blocking(move || tls.check()).await.is_err() {
            tracing::error!("checking the TLS certificates failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_covers_one_label() {
        assert!(covers("shop.example.com", "shop.example.com"));
        assert!(covers("*.example.com", "shop.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "a.shop.example.com"));
        assert!(!covers("*.example.com", ".example.com"));
        assert!(!covers("shop.example.com", "other.example.com"));
    }

    #[test]
    fn the_client_certificate_header_quotes_the_subject() {
        let cert = ClientCertificate {
            subject: "CN=a \"quoted\" name,O=shop".into(),
            dns_names: vec!["orders.shop".into()],
            uris: vec!["spiffe://shop/orders".into()],
            hash: "ab".into(),
        };
        assert_eq!(
            cert.header_value().unwrap(),
            "Hash=ab;Subject=\"CN=a \\\"quoted\\\" name,O=shop\";URI=spiffe://shop/orders;DNS=orders.shop"
        );
    }
}
