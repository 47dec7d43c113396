//! What a client may send before the gateway refuses it, from `spec.listeners.http`: the size and field
//! count of a request head (`431`, enforced by hyper from these settings), a time limit to send the head
//! (the connection is closed), a `Host` header on HTTP/1.1 (`400`), and a time limit between two reads of
//! a body (`408`). Every refusal is counted in `umw_http_refused_total` by reason ([`reasons`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus::{IntCounter, IntCounterVec};
use tokio::time::{Instant, Sleep};
use umw_crds::middleware::HttpListener;
use umw_crds::validate::duration_or;

/// The listener's limits, read once when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::from_spec(&HttpListener::default())
    }
}

impl Limits {
    /// The limits of a listener that validation accepted (absent fields take their defaults).
    pub fn from_spec(http: &HttpListener) -> Self {
        Self {
            max_header_bytes: http.max_header_bytes.unwrap_or(HttpListener::DEFAULT_MAX_HEADER_BYTES) as usize,
            max_headers: usize::from(http.max_headers.unwrap_or(HttpListener::DEFAULT_MAX_HEADERS)),
            header_read_timeout: duration_or(
                http.header_read_timeout.as_ref(),
                HttpListener::DEFAULT_HEADER_READ_TIMEOUT,
            ),
            body_read_timeout: duration_or(http.body_read_timeout.as_ref(), HttpListener::DEFAULT_BODY_READ_TIMEOUT),
            max_connections: http.max_connections.unwrap_or(HttpListener::DEFAULT_MAX_CONNECTIONS) as usize,
        }
    }
}

/// Why a request or connection was refused before any route saw it.
pub mod reasons {
    /// A request head larger than `maxHeaderBytes` or with more than `maxHeaders` fields (`431`).
    pub const HEADERS_TOO_LARGE: &str = "headers_too_large";
    /// No complete first request head within `headerReadTimeout` of the connection's start (it is closed).
    pub const HEADER_TIMEOUT: &str = "header_timeout";
    /// A request head hyper could not parse (`400`).
    pub const MALFORMED: &str = "malformed";
    /// HTTP/1.1 without exactly one `Host` header (`400`).
    pub const HOST: &str = "host";
    /// A body that paused longer than `bodyReadTimeout`, or was still arriving at the route's deadline (`408`).
    pub const BODY_TIMEOUT: &str = "body_timeout";
    /// A connection over `maxConnections` (closed as it is accepted).
    pub const CONNECTION_LIMIT: &str = "connection_limit";

    pub const ALL: [&str; 6] = [HEADERS_TOO_LARGE, HEADER_TIMEOUT, MALFORMED, HOST, BODY_TIMEOUT, CONNECTION_LIMIT];
}

/// Counts a connection that hyper ended with an error of the client's making, by its kind. Hyper's own
/// header timeout also ends kept-alive connections that sit idle after a response: that is the normal end
/// of a connection, not a refusal, so it counts only for a connection that never got a request through
/// (`served` false).
pub fn count_connection_error(refused: &IntCounterVec, error: &(dyn std::error::Error + 'static), served: bool) {
    let count = |reason: &str| refused.with_label_values(&[reason]).inc();
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(error) = e.downcast_ref::<hyper::Error>() {
            if error.is_parse_too_large() {
                count(reasons::HEADERS_TOO_LARGE);
            } else if error.is_timeout() && !served {
                count(reasons::HEADER_TIMEOUT);
            } else if error.is_parse() {
                count(reasons::MALFORMED);
            }
            return;
        }
        current = e.source();
    }
}

/// Why an HTTP/1.1 request's `Host` is not acceptable (RFC 9112 §3.2: exactly one), if it is not.
pub fn host_problem(request: &http::Request<Body>) -> Option<&'static str> {
    if request.version() != http::Version::HTTP_11 {
        return None;
    }
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => Some("an HTTP/1.1 request must carry a Host header"),
        (Some(_), Some(_)) => Some("an HTTP/1.1 request must carry exactly one Host header"),
        (Some(_), None) => None,
    }
}

/// The client's body paused longer than the listener allows.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no part of the request body for {0:?}")]
pub struct BodyTimeout(pub Duration);

/// Whether `error` or one of its causes is a [`BodyTimeout`].
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTimeout>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// Where the reading of a request's body stands; in the request's extensions when it has a body.
#[derive(Clone, Debug, Default)]
pub struct BodyProgress(Arc<AtomicU8>);

/// Not read yet, or a frame just arrived: nobody waits for the client.
const READING: u8 = 0;
/// The reader asked for more and the client has not sent it.
const WAITING: u8 = 1;
/// Read to its end.
const FINISHED: u8 = 2;

impl BodyProgress {
    /// Whether the body has been read to its end.
    pub fn finished(&self) -> bool {
        self.0.load(Ordering::Relaxed) == FINISHED
    }

    /// Whether the reader (the proxy, a schema check, ingest) is waiting for the client to send more: a
    /// deadline that passes now is the client's doing. An upstream that is not reading leaves this false.
    pub fn waiting_on_client(&self) -> bool {
        self.0.load(Ordering::Relaxed) == WAITING
    }

    fn set(&self, state: u8) {
        self.0.store(state, Ordering::Relaxed);
    }
}

/// A client's request body that ends with [`BodyTimeout`] when the reader has waited `idle` for the next
/// frame, and records in a [`BodyProgress`] how its reading stands. Time before the first read (stages,
/// connecting upstream, `100-continue`) does not count.
pub struct Watched {
    inner: Body,
    idle: Duration,
    /// Armed when the reader starts waiting; created at the first wait.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    progress: BodyProgress,
    timeouts: IntCounter,
}

impl Watched {
    /// Watches `request`'s body when it has one (a request without a body is left as it is); `timeouts`
    /// counts the bodies that paused too long.
    pub fn watch(request: &mut http::Request<Body>, idle: Duration, timeouts: &IntCounter) {
        if http_body::Body::is_end_stream(request.body()) {
            return;
        }
        let progress = BodyProgress::default();
        request.extensions_mut().insert(progress.clone());
        let inner = std::mem::take(request.body_mut());
        let watched = Watched { inner, idle, timer: None, armed: false, progress, timeouts: timeouts.clone() };
        *request.body_mut() = Body::new(watched);
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(frame)) => {
                this.armed = false;
                // A reader that knows the length stops after the last frame, without asking for the end.
                this.progress.set(if this.inner.is_end_stream() { FINISHED } else { READING });
                Poll::Ready(Some(frame))
            }
            Poll::Ready(None) => {
                this.progress.set(FINISHED);
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.progress.set(WAITING);
                if !this.armed {
                    let deadline = Instant::now() + this.idle;
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.armed = true;
                }
                let Some(timer) = this.timer.as_mut() else { return Poll::Pending };
                ready!(timer.as_mut().poll(cx));
                this.timeouts.inc();
                Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(this.idle)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.progress.set(FINISHED);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn a_body_that_pauses_too_long_ends_with_a_timeout_and_a_whole_one_is_marked_finished() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let mut request = http::Request::new(Body::from_stream(rx));
        let timeouts = IntCounter::new("t", "t").unwrap();
        Watched::watch(&mut request, Duration::from_millis(100), &timeouts);
        let progress = request.extensions().get::<BodyProgress>().cloned().unwrap();
        let mut body = request.into_body();
        futures::SinkExt::send(&mut tx, Ok(Bytes::from_static(b"part"))).await.unwrap();
        assert!(!progress.waiting_on_client(), "nobody has asked for the body yet");
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "part");
        assert!(!progress.waiting_on_client(), "a part arrived");
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(is_body_timeout(&error), "{error}");
        assert!(!progress.finished() && progress.waiting_on_client());
        assert_eq!(timeouts.get(), 1);
        drop(tx);

        let mut request = http::Request::new(Body::from("whole"));
        Watched::watch(&mut request, Duration::from_secs(5), &timeouts);
        let progress = request.extensions().get::<BodyProgress>().cloned().unwrap();
        assert_eq!(request.into_body().collect().await.unwrap().to_bytes(), "whole");
        assert!(progress.finished());

        let mut request = http::Request::new(Body::empty());
        Watched::watch(&mut request, Duration::from_secs(5), &timeouts);
        assert!(request.extensions().get::<BodyProgress>().is_none(), "no body, nothing to watch");
    }

    #[test]
    fn http_1_1_needs_exactly_one_host() {
        let request = |hosts: &[&str], version| {
            let mut builder = http::Request::builder().version(version);
            for host in hosts {
                builder = builder.header(http::header::HOST, *host);
            }
            builder.body(Body::empty()).unwrap()
        };
        assert!(host_problem(&request(&[], http::Version::HTTP_11)).is_some());
        assert!(host_problem(&request(&["a", "b"], http::Version::HTTP_11)).is_some());
        assert!(host_problem(&request(&["a"], http::Version::HTTP_11)).is_none());
        assert!(host_problem(&request(&[], http::Version::HTTP_10)).is_none());
        assert!(host_problem(&request(&[], http::Version::HTTP_2)).is_none());
    }
}
