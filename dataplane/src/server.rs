//! The traffic listener: accepts connections (HTTP/1.1 and h2c on one port, or HTTPS with HTTP/2 and
//! HTTP/1.1 by ALPN) and hands every request to the chain, within the listener's [`Limits`]. On shutdown it
//! stops accepting, lets in-flight requests finish within a deadline, and closes what is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;

use crate::chain::{Chain, ClientAddr};
use crate::kernel::inbound::{self, Limits, Watched};
use crate::kernel::metrics::Metrics;
use crate::tls::{CLIENT_CERT_HEADER, ClientCertificate, Tls};

/// Concurrent streams one HTTP/2 connection may open (hyper's default is 200; Envoy's 100; nginx's 128).
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2 pings on a connection that has been quiet this long...
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection is closed when one is not answered within this.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every listener of the traffic port shares, whether one task serves it or one per thread.
#[derive(Clone)]
pub struct Serving {
    pub chain: Chain,
    pub metrics: Metrics,
    pub limits: Limits,
    pub tls: Option<Arc<Tls>>,
    /// Open connections over all of them: `maxConnections` is the process's limit, not a thread's.
    pub connections: Arc<tokio::sync::Semaphore>,
}

impl Serving {
    pub fn new(chain: Chain, metrics: Metrics, limits: Limits, tls: Option<Arc<Tls>>) -> Self {
        let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        Self { chain, metrics, limits, tls, connections }
    }
}

/// `count` listening sockets on one address with `SO_REUSEPORT`, for one thread each: the kernel spreads
/// new connections over them by a hash of the client's address and port. Port 0 binds the first to a free
/// port and the others to the same one. Only processes of the same user can join the group.
pub fn bind_reuseport(address: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut bound = address;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let socket = socket2::Socket::new(socket2::Domain::for_address(bound), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&bound.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener = std::net::TcpListener::from(socket);
        bound = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Connections the kernel queues, per listening socket, before one is accepted (Tokio's default).
const LISTEN_BACKLOG: i32 = 1024;

/// Serves on `listener` until `shutdown` resolves, then drains for at most `drain`. With TLS, every
/// connection is a TLS handshake first (within the header timeout).
pub async fn serve(listener: TcpListener, serving: Serving, shutdown: impl Future<Output = ()>, drain: Duration) {
    let Serving { chain, metrics, limits, tls, connections } = serving;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    // HTTP/2, explicitly: streams per connection bounded, and pings that find a peer that vanished.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    // This thread's idle upstream connections are closed when they expire even if no request comes.
    let sweeper = tokio::spawn(crate::kernel::pool::sweep_now_and_then());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        metrics.connections_accepted.inc();
        // Over the limit: closed at once, before it costs a task or a buffer.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics.http_refused.with_label_values(&[inbound::reasons::CONNECTION_LIMIT]).inc();
            tracing::debug!(%peer, "closing a connection over maxConnections");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            chain: chain.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            metrics: metrics.clone(),
            limits,
            peer,
        };
        let open = metrics.connections_open.clone();
        open.inc();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => connection.serve(stream, None).await,
                Some(tls) => connection.handshake(stream, &tls).await,
            }
            open.dec();
        });
    }
    drop(listener);
    sweeper.abort();
    tracing::info!(deadline = ?drain, "stopped accepting; draining in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!("drain deadline passed; closing the remaining connections"),
    }
}

/// What serving one accepted connection needs.
struct Connection {
    chain: Chain,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    metrics: Metrics,
    limits: Limits,
    peer: SocketAddr,
}

impl Connection {
    /// The TLS handshake, within the header timeout, then HTTP over it.
    async fn handshake(self, stream: TcpStream, tls: &Tls) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
        let peer = self.peer;
        let stream = match tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                let outcome = crate::tls::failure_outcome(&error);
                tls.handshakes.with_label_values(&[outcome]).inc();
                tracing::debug!(%error, %peer, outcome, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tls.handshakes.with_label_values(&[crate::tls::outcomes::TIMEOUT]).inc();
                tracing::debug!(%peer, "closing a connection whose TLS handshake did not finish in time");
                return;
            }
        };
        let session = stream.get_ref().1;
        let outcome = match session.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => crate::tls::outcomes::RESUMED,
            _ => crate::tls::outcomes::FULL,
        };
        tls.handshakes.with_label_values(&[outcome]).inc();
        let client = ClientCertificate::of(session).map(Arc::new);
        self.serve(stream, client).await;
    }

    /// HTTP/1.1 or HTTP/2 on `io` until the client or the drain ends it.
    async fn serve<IO>(self, io: IO, client: Option<Arc<ClientCertificate>>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self { chain, builder, watcher, metrics, limits, peer } = self;
        // Telling HTTP/1 from h2c reads the connection's first bytes with no time limit of hyper's own, and
        // hyper's header timeout starts only after that: until the first request, the limit is kept here.
        let started = Arc::new(AtomicBool::new(false));
        let service = {
            let started = started.clone();
            let body_timeouts = metrics.http_refused.with_label_values(&[inbound::reasons::BODY_TIMEOUT]);
            let client_header = client.as_ref().and_then(|c| c.header_value());
            tower::service_fn(move |request: http::Request<Incoming>| {
                started.store(true, Ordering::Relaxed);
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(ClientAddr(peer));
                // What a client claims about its own certificate is never passed on; a verified one is.
                let headers = request.headers_mut();
                headers.remove(CLIENT_CERT_HEADER);
                if let Some(value) = &client_header {
                    headers.insert(CLIENT_CERT_HEADER, value.clone());
                }
                if let Some(client) = &client {
                    request.extensions_mut().insert(client.clone());
                }
                Watched::watch(&mut request, limits.body_read_timeout, &body_timeouts);
                chain.clone().oneshot(request)
            })
        };
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
        let connection = watcher.watch(connection.into_owned());
        let refused = &metrics.http_refused;
        tokio::pin!(connection);
        let ended = tokio::select! {
            ended = &mut connection => Some(ended),
            () = tokio::time::sleep(limits.header_read_timeout) => None,
        };
        let ended = match ended {
            Some(ended) => ended,
            None if !started.load(Ordering::Relaxed) => {
                refused.with_label_values(&[inbound::reasons::HEADER_TIMEOUT]).inc();
                tracing::debug!(%peer, "closing a connection that sent no request in time");
                return;
            }
            None => connection.await,
        };
        if let Err(error) = ended {
            inbound::count_connection_error(refused, error.as_ref(), started.load(Ordering::Relaxed));
            tracing::debug!(%error, %peer, "connection ended with an error");
        }
    }
}
