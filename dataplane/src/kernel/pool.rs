//! The connection pool of plain `http://` HTTP/1 upstreams, one per worker thread, driven in the task of
//! the request that uses the connection.
//!
//! A pooled connection is hyper's low-level client connection: a `SendRequest` and the `Connection`
//! future that does its I/O. Nothing is spawned: the request's task polls the connection while it waits
//! for the response head, and the response body polls it while the server writes the body out, so a
//! proxied request costs one task and no cross-thread wake-ups. When the body has been read to its end
//! the connection goes back to the pool of the thread that finished it; a body dropped before its end
//! (the client went away) closes the connection, since what is left of the response is still on it.
//!
//! Idle connections are kept for [`IDLE_TIMEOUT`], at most [`MAX_IDLE`] per upstream and thread, the most
//! recently used first. A connection the upstream closed while idle is found when it is checked out (its
//! `Connection` future completes) and discarded; a request that a reused connection could not even start
//! to send is sent again on a new connection.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::net::TcpStream;

/// How long an unused connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per upstream and worker thread.
pub const MAX_IDLE: usize = 512;
/// How long resolving and connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keep-alive probes find pooled connections whose peer vanished without a reset.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// How often a busy thread's pools are swept of expired connections, on a checkout.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often [`sweep_now_and_then`] sweeps, so that a thread gone quiet does not keep its idle connections.
const SWEEP_IDLE_EVERY: Duration = Duration::from_secs(15);

type Conn = Connection<TokioIo<TcpStream>, Body>;
type Sender = SendRequest<Body>;

/// Why a request could not be exchanged with the upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to {address} failed: {source}")]
    Connect { address: String, source: std::io::Error },
    #[error("connecting to {0} took longer than {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(String),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// One upstream's address and connection counter: what the pool needs to reach it.
pub struct Http1Pool {
    id: u64,
    address: String,
    opened: IntCounter,
}

impl Http1Pool {
    /// The pool of connections to `address` (`host:port`); `opened` counts the connections made.
    pub fn new(address: String, opened: IntCounter) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self { id: NEXT.fetch_add(1, Ordering::Relaxed), address, opened }
    }

    /// Sends `request` (origin-form URI, with a `Host` header) on an idle connection of this thread, or a
    /// new one, and returns the response with a body that gives the connection back when read to its end.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Body>, SendError> {
        let request = match poll_fn(|cx| Poll::Ready(checkout(self.id, cx))).await {
            Some(link) => match self.exchange(link, request).await {
                Ok(response) => return Ok(response),
                // The connection closed before the request was written: nothing reached the upstream.
                Err((_, Some(request))) => request,
                Err((error, None)) => return Err(error),
            },
            None => request,
        };
        let link = self.connect().await?;
        self.exchange(link, request).await.map_err(|(error, _)| error)
    }

    async fn connect(&self) -> Result<Link, SendError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, open(&self.address))
            .await
            .map_err(|_| SendError::ConnectTimeout(self.address.clone()))?
            .map_err(|source| SendError::Connect { address: self.address.clone(), source })?;
        // Both are best effort: a socket that refuses them still works.
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(KEEPALIVE));
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        self.opened.inc();
        Ok(Link { sender, conn, pool: self.id })
    }

    /// Sends the request and polls the connection until the response head arrives. On failure, the request
    /// comes back when none of it was written.
    async fn exchange(
        &self,
        link: Link,
        request: Request<Body>,
    ) -> Result<Response<Body>, (SendError, Option<Request<Body>>)> {
        let Link { mut sender, conn, pool } = link;
        let mut conn = Some(conn);
        let mut response = std::pin::pin!(sender.try_send_request(request));
        let result = poll_fn(|cx| {
            if let Some(c) = conn.as_mut()
                && Pin::new(c).poll(cx).is_ready()
            {
                // Dropping the finished connection fails a request still waiting on it.
                conn = None;
            }
            response.as_mut().poll(cx)
        })
        .await;
        match result {
            Ok(response) => {
                let link = conn.map(|conn| Link { sender, conn, pool });
                Ok(response.map(|inner| PooledBody::body(inner, link)))
            }
            Err(mut error) => {
                let request = error.take_message();
                Err((SendError::Http(error.into_error()), request))
            }
        }
    }
}

async fn open(address: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(address).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")))
}

/// A connection and the pool it belongs to.
struct Link {
    sender: Sender,
    conn: Conn,
    pool: u64,
}

struct Idle {
    link: Link,
    since: Instant,
}

#[derive(Default)]
struct Pools {
    idle: HashMap<u64, Vec<Idle>>,
    swept: Option<Instant>,
}

thread_local! {
    static POOLS: RefCell<Pools> = RefCell::new(Pools::default());
}

/// An idle connection of this thread that is ready for a request, polled with the caller's context.
/// Connections are polled and dropped outside the pool's borrow: that runs code that is not the pool's.
fn checkout(pool: u64, cx: &mut Context<'_>) -> Option<Link> {
    loop {
        let (found, expired) = POOLS.try_with(|pools| pop(&mut pools.borrow_mut(), pool)).ok()?;
        drop(expired);
        let Idle { mut link, .. } = found?;
        // A finished connection was closed by the upstream (or failed) while idle.
        if Pin::new(&mut link.conn).poll(cx).is_ready() {
            continue;
        }
        if let Poll::Ready(Ok(())) = link.sender.poll_ready(cx) {
            return Some(link);
        }
    }
}

/// The most recently used connection of `pool`, and, now and then, the expired ones of every pool.
fn pop(pools: &mut Pools, pool: u64) -> (Option<Idle>, Vec<Idle>) {
    let now = Instant::now();
    let mut expired = Vec::new();
    if pools.swept.is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY) {
        pools.swept = Some(now);
        for idle in pools.idle.values_mut() {
            // Oldest first: the expired ones are a prefix.
            let end = idle.partition_point(|i| now.duration_since(i.since) >= IDLE_TIMEOUT);
            expired.extend(idle.drain(..end));
        }
        pools.idle.retain(|_, idle| !idle.is_empty());
    }
    let Some(idle) = pools.idle.get_mut(&pool) else { return (None, expired) };
    match idle.pop() {
        // The most recent has expired, so have all the others.
        Some(top) if now.duration_since(top.since) >= IDLE_TIMEOUT => {
            expired.push(top);
            expired.append(idle);
            (None, expired)
        }
        found => (found, expired),
    }
}

/// Closes, every few seconds, this thread's idle connections that expired or that their upstream closed.
/// Each thread that serves traffic runs it, since a checkout sweeps only the thread it runs on.
pub async fn sweep_now_and_then() {
    loop {
        tokio::time::sleep(SWEEP_IDLE_EVERY).await;
        sweep_at(Instant::now());
    }
}

/// Sweeps this thread's pools as of `now`: connections idle for [`IDLE_TIMEOUT`] are closed, and those the
/// upstream closed are dropped. The connections are polled and dropped outside the pool's borrow.
fn sweep_at(now: Instant) {
    let Ok(mut taken) = POOLS.try_with(|pools| std::mem::take(&mut pools.borrow_mut().idle)) else { return };
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut expired = Vec::new();
    for idle in taken.values_mut() {
        // Oldest first: the expired ones are a prefix.
        let end = idle.partition_point(|i| now.saturating_duration_since(i.since) >= IDLE_TIMEOUT);
        expired.extend(idle.drain(..end));
        // Pending while open; ready once the upstream closed it (or it failed).
        idle.retain_mut(|i| Pin::new(&mut i.link.conn).poll(&mut cx).is_pending());
    }
    taken.retain(|_, idle| !idle.is_empty());
    drop(expired);
    let _ = POOLS.try_with(|pools| {
        let mut pools = pools.borrow_mut();
        // Nothing runs on this thread in between, but keep whatever is there, after the older ones.
        for (pool, mut idle) in std::mem::replace(&mut pools.idle, taken) {
            pools.idle.entry(pool).or_default().append(&mut idle);
        }
        pools.swept = Some(now);
    });
}

fn checkin(link: Link) {
    let _ = POOLS.try_with(|pools| {
        let mut pools = pools.borrow_mut();
        let idle = pools.idle.entry(link.pool).or_default();
        // Full: the oldest goes (it is the likeliest to be closed by the upstream soon).
        let oldest = (idle.len() >= MAX_IDLE).then(|| idle.remove(0));
        idle.push(Idle { link, since: Instant::now() });
        oldest
    });
}

/// The number of idle connections this thread holds for `pool`.
#[cfg(test)]
fn idle_count(pool: &Http1Pool) -> usize {
    POOLS.with(|pools| pools.borrow().idle.get(&pool.id).map_or(0, Vec::len))
}

/// A response body that drives its connection and gives it back to the pool once read to its end.
struct PooledBody {
    inner: Incoming,
    link: Option<Link>,
}

impl PooledBody {
    fn body(inner: Incoming, link: Option<Link>) -> Body {
        let mut body = Self { inner, link };
        // The server does not poll a body that is known to be empty (HEAD, 204, 304, Content-Length: 0).
        if http_body::Body::is_end_stream(&body.inner) {
            body.release();
        }
        Body::new(body)
    }

    /// Back to the pool if the connection is ready for another request. It is not when the upstream
    /// answered before reading all of the request's body: that body is still being sent on it.
    fn release(&mut self) {
        if let Some(link) = self.link.take()
            && link.sender.is_ready()
        {
            checkin(link);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(link) = this.link.as_mut()
            && Pin::new(&mut link.conn).poll(cx).is_ready()
        {
            // Closed after the response (Connection: close) or failed: the body has what it will get.
            this.link = None;
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.link = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    fn pool(address: std::net::SocketAddr) -> Http1Pool {
        Http1Pool::new(address.to_string(), IntCounter::new("opened", "opened").unwrap())
    }

    fn get(path: &str) -> Request<Body> {
        Request::builder().uri(path).header("host", "upstream").body(Body::empty()).unwrap()
    }

    /// An upstream that answers each request on a connection with `answers` in turn, then closes it;
    /// reports each accepted connection.
    async fn upstream(answers: Vec<&'static str>) -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (accepted, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let _ = accepted.send(());
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    for answer in answers {
                        // Read one request head (these requests have no body).
                        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buffer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buffer.drain(..end);
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (address, rx)
    }

    async fn text(response: Response<Body>) -> String {
        String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const CHUNKED: &str = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nch\r\n3\r\nunk\r\n0\r\n\r\n";
    const EMPTY: &str = "HTTP/1.1 204 No Content\r\n\r\n";
    const CLOSE: &str = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye";

    #[tokio::test(flavor = "current_thread")]
    async fn reuses_a_connection_after_fixed_chunked_and_empty_bodies() {
        let (address, mut accepted) = upstream(vec![OK, CHUNKED, EMPTY, OK]).await;
        let pool = pool(address);
        assert_eq!(text(pool.send(get("/a")).await.unwrap()).await, "ok");
        assert_eq!(idle_count(&pool), 1);
        assert_eq!(text(pool.send(get("/b")).await.unwrap()).await, "chunk");
        let empty = pool.send(get("/c")).await.unwrap();
        assert_eq!(empty.status(), 204);
        // Known to be empty: back in the pool before anyone reads it.
        assert_eq!(idle_count(&pool), 1);
        drop(empty);
        assert_eq!(text(pool.send(get("/d")).await.unwrap()).await, "ok");
        assert_eq!(pool.opened.get(), 1, "four requests on one connection");
        accepted.recv().await.unwrap();
        assert!(accepted.try_recv().is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_upstream_closes_is_not_reused() {
        let (address, _accepted) = upstream(vec![CLOSE]).await;
        let pool = pool(address);
        assert_eq!(text(pool.send(get("/a")).await.unwrap()).await, "bye");
        // Connection: close, or the upstream closing an idle connection: the next request opens a new one.
        assert_eq!(text(pool.send(get("/b")).await.unwrap()).await, "bye");
        assert_eq!(pool.opened.get(), 2);

        // The upstream answers once and closes without saying so: the idle connection is found closed.
        let (address, _accepted) = upstream(vec![OK]).await;
        let pool = super::tests::pool(address);
        assert_eq!(text(pool.send(get("/a")).await.unwrap()).await, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(text(pool.send(get("/b")).await.unwrap()).await, "ok");
        assert_eq!(pool.opened.get(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sweep_closes_expired_connections_and_drops_those_the_upstream_closed() {
        // Open and idle: kept by a sweep now, closed by one after the idle timeout, with no checkout.
        let (address, _accepted) = upstream(vec![OK, OK]).await;
        let open = pool(address);
        assert_eq!(text(open.send(get("/a")).await.unwrap()).await, "ok");
        // Closed by its upstream after one answer: dropped by the next sweep.
        let (address, _accepted) = upstream(vec![OK]).await;
        let closed = pool(address);
        assert_eq!(text(closed.send(get("/a")).await.unwrap()).await, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
        sweep_at(Instant::now());
        assert_eq!((idle_count(&open), idle_count(&closed)), (1, 0));
        sweep_at(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(idle_count(&open), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_body_dropped_before_its_end_closes_the_connection() {
        let (address, _accepted) = upstream(vec!["HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart"]).await;
        let pool = pool(address);
        let response = pool.send(get("/a")).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"part");
        drop(body);
        assert_eq!(idle_count(&pool), 0, "the rest of the response is still on the connection");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_still_sending_the_request_body_is_not_reused() {
        // The upstream answers after the head, without reading the body (a 401 or 413 would).
        let (address, _accepted) = upstream(vec![OK, OK]).await;
        let pool = pool(address);
        let first = futures::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from("a")))]);
        let endless = first.chain(futures::stream::pending());
        let request = Request::builder()
            .method("POST")
            .uri("/upload")
            .header("host", "upstream")
            .body(Body::new(http_body_util::StreamBody::new(endless)))
            .unwrap();
        assert_eq!(text(pool.send(request).await.unwrap()).await, "ok");
        assert_eq!(idle_count(&pool), 0, "the request body is still being sent on it");
        assert_eq!(text(pool.send(get("/b")).await.unwrap()).await, "ok");
        assert_eq!(pool.opened.get(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unreachable_upstreams_fail_with_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let error = pool(address).send(get("/")).await.unwrap_err();
        assert!(matches!(error, SendError::Connect { .. }), "{error}");
        assert!(error.to_string().contains(&address.to_string()), "{error}");
    }
}
