//! Pooled HTTP clients shared by every component that sends HTTP (the proxy, webhooks), and the
//! `--resolve` overrides of where upstream names connect.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The connection pools, one per protocol, shared by every upstream and kept across reloads: `https://`
/// upstreams, h2c upstreams and webhooks. Plain `http://` HTTP/1 upstreams use the per-thread pool of
/// [`super::pool`], which does not spawn a task per connection.
#[derive(Clone)]
pub struct Clients {
    pub http1: Client<HttpsConnector, Body>,
    pub h2c: Client<HttpConnector, Body>,
}

impl Clients {
    pub fn new() -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        // TCP keep-alive finds pooled connections whose peer vanished without a reset.
        http.set_keepalive(Some(Duration::from_secs(30)));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_native_roots() {
            Ok(builder) => builder,
            Err(error) => {
                tracing::warn!(%error, "no system CA certificates; https:// upstreams will fail verification");
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config_without_roots())
            }
        };
        let https = builder.https_or_http().enable_http1().enable_http2().wrap_connector(http.clone());
        let http1 = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(https);
        // HTTP/2 multiplexes on few connections, so a dead one would take every request with it: pings find
        // it within 30 s.
        let h2c = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true)
            .build(http);
        Self { http1, h2c }
    }
}

impl Default for Clients {
    fn default() -> Self {
        Self::new()
    }
}

/// A TLS configuration that trusts nothing: https:// upstreams fail with a verification error (which the
/// log explains) instead of the process failing to start.
fn config_without_roots() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth())
        // The ring provider supports the default protocol versions; this branch is unreachable in practice.
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth()
        })
}

/// `--resolve NAME:PORT=ADDRESS`: connect to ADDRESS for an upstream named NAME:PORT (a Service name and
/// port, or a URL's host and port), as curl's `--resolve` does. For running the data plane outside a
/// cluster against upstreams that are Services inside one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides(pub BTreeMap<String, SocketAddr>);

impl std::str::FromStr for Overrides {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, address) =
                item.split_once('=').ok_or_else(|| format!("{item:?} is not NAME:PORT=ADDRESS:PORT"))?;
            let address: SocketAddr =
                address.parse().map_err(|_| format!("{address:?} in {item:?} is not an IP address and port"))?;
            if !name.contains(':') {
                return Err(format!("{name:?} in {item:?} needs a port (NAME:PORT)"));
            }
            map.insert(name.to_ascii_lowercase(), address);
        }
        Ok(Self(map))
    }
}
