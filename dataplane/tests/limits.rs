//! Hostile HTTP input against the listener's limits (`spec.listeners.http`): oversized heads, too many
//! header fields, HTTP/1.1 without `Host`, connections that send nothing or stop mid-head, and bodies that
//! stop arriving. Each is refused the way the docs say and counted in `umw_http_refused_total`.

mod support;

use std::time::Duration;

use support::{Gateway, Upstream, get, middleware};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn config(upstream: &str, listener: &str, route_extra: &str) -> String {
    let routes = format!("    - name: all\n      upstream: {{url: '{upstream}'}}\n{route_extra}");
    middleware(&routes, &format!("  listeners:\n    http: {{{listener}}}\n"))
}

/// Writes `bytes` and reads until the gateway closes the connection or `wait` passes; `None` when the
/// connection was still open then.
async fn exchange(gw: &Gateway, bytes: &[u8], wait: Duration) -> Option<String> {
    let mut stream = TcpStream::connect(gw.address).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    match tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

async fn refused(gw: &Gateway, reason: &str) -> f64 {
    gw.metric("umw_http_refused_total", &[&format!("reason=\"{reason}\"")]).await
}

#[tokio::test]
async fn oversized_heads_and_too_many_fields_are_answered_431_and_never_forwarded() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up.url(), "maxHeaderBytes: 16384, maxHeaders: 20", "")).await;
    let big = format!("GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let answer = exchange(&gw, big.as_bytes(), Duration::from_secs(5)).await.expect("the connection is closed");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let mut many = String::from("GET /b HTTP/1.1\r\nHost: x\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-Field-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = exchange(&gw, many.as_bytes(), Duration::from_secs(5)).await.expect("the connection is closed");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
    assert_eq!(refused(&gw, "headers_too_large").await, 2.0);
    // Within the limits, the same kind of request is served.
    let fine = format!("GET /c HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(8 * 1024));
    let answer = exchange(&gw, fine.as_bytes(), Duration::from_secs(5)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn the_default_head_limit_is_32_kib() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up.url(), "", "")).await;
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(40 * 1024));
    let answer = exchange(&gw, big.as_bytes(), Duration::from_secs(5)).await.expect("the connection is closed");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn http_1_1_without_exactly_one_host_is_a_400_and_http_1_0_needs_none() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up.url(), "", "")).await;
    for request in [
        &b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    ] {
        let answer = exchange(&gw, request, Duration::from_secs(5)).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("application/problem+json") && answer.contains("Host header"), "{answer}");
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(refused(&gw, "host").await, 2.0);
    let answer = exchange(&gw, b"GET /x HTTP/1.0\r\n\r\n", Duration::from_secs(5)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_or_stops_mid_head_is_closed_at_the_header_timeout() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up.url(), "headerReadTimeout: 1s", "")).await;
    // Nothing at all: the HTTP/1-or-h2c detection must not wait forever.
    let silent = exchange(&gw, b"", Duration::from_secs(10)).await;
    assert_eq!(silent.as_deref(), Some(""), "closed without an answer");
    // A few bytes, fewer than the h2c preface.
    let short = exchange(&gw, b"GET", Duration::from_secs(10)).await;
    assert!(short.is_some(), "closed");
    // Most of a head, then nothing.
    let partial = exchange(&gw, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n", Duration::from_secs(10)).await;
    assert!(partial.is_some(), "closed");
    assert!(refused(&gw, "header_timeout").await >= 3.0, "{}", gw.metrics().await);
    // A kept-alive connection idle after its first response is closed too.
    let mut stream = TcpStream::connect(gw.address).await.unwrap();
    stream.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the idle connection was closed");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert_eq!(up.hits(), 1);
    assert_eq!(get(&gw.url("/still-serving")).await.status, 200);
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408_not_504() {
    let up = Upstream::start("up").await;
    // The pause limit is shorter than the route's timeout: the pause ends the request.
    let gw = Gateway::start(&config(&up.url(), "bodyReadTimeout: 1s", "      timeout: 20s\n")).await;
    let head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";
    let answer = exchange(&gw, head, Duration::from_secs(10)).await.expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body-timeout"), "{answer}");
    assert_eq!(refused(&gw, "body_timeout").await, 1.0);
    drop(gw);

    // The route's timeout is shorter: a body still arriving at the deadline is the client's wait.
    let gw = Gateway::start(&config(&up.url(), "", "      timeout: 1s\n")).await;
    let answer = exchange(&gw, head, Duration::from_secs(10)).await.expect("answered");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(refused(&gw, "body_timeout").await, 1.0);
    // A whole body and a slow upstream are still the upstream's timeout.
    let slow = b"POST /slow/3000 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    let answer = exchange(&gw, slow, Duration::from_secs(10)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
}

#[tokio::test]
async fn connections_over_max_connections_are_closed_as_they_are_accepted() {
    max_connections(0).await;
}

/// With a socket per thread, the limit is still the process's, wherever the kernel puts each connection.
#[tokio::test]
async fn max_connections_holds_across_traffic_threads() {
    max_connections(2).await;
}

async fn max_connections(threads: usize) {
    let up = Upstream::start("up").await;
    let gw = Gateway::start_threads(&config(&up.url(), "maxConnections: 2", ""), threads).await;
    // Two idle connections take the two places.
    let first = TcpStream::connect(gw.address).await.unwrap();
    let _second = TcpStream::connect(gw.address).await.unwrap();
    support::eventually("both connections open", Duration::from_secs(5), || async {
        gw.metric("umw_connections_open", &[]).await == 2.0
    })
    .await;
    let request = b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = exchange(&gw, request, Duration::from_secs(5)).await.expect("the third is closed at once");
    assert_eq!(answer, "", "closed without an answer");
    assert_eq!(refused(&gw, "connection_limit").await, 1.0);
    assert_eq!(up.hits(), 0);
    // A place that frees up is taken again.
    drop(first);
    support::eventually("a connection closed", Duration::from_secs(5), || async {
        gw.metric("umw_connections_open", &[]).await == 1.0
    })
    .await;
    let answer = exchange(&gw, request, Duration::from_secs(5)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A chunked body of `size` bytes (no Content-Length, so only counting it as it streams can refuse it).
async fn chunked(gw: &Gateway, path: &str, size: usize) -> String {
    let mut stream = TcpStream::connect(gw.address).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    let mut sent = 0;
    // The gateway may answer (and close) before the whole body is sent: stop writing then.
    while sent < size {
        let n = chunk.len().min(size - sent);
        let frame = [format!("{n:x}\r\n").as_bytes(), &chunk[..n], b"\r\n"].concat();
        if stream.write_all(&frame).await.is_err() {
            break;
        }
        sent += n;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_answered_413_on_every_kind_of_route() {
    let up = Upstream::start("up").await;
    let routes = format!(
        "    - name: proxied\n      match: {{pathPrefix: /upload}}\n      upstream: {{url: '{}'}}\n      maxBodyBytes: 1000\n    - name: validated\n      match: {{pathPrefix: /validated}}\n      upstream: {{url: '{}'}}\n      maxBodyBytes: 1000\n      requestSchema: {{type: object}}\n",
        up.url(),
        up.url()
    );
    // Connections are named as validation asks; the in-process backends stand in for them.
    let extra = "  connections:\n    kafka: {bootstrapServers: {value: '127.0.0.1:9'}}\n    postgres: {url: {value: 'postgres://u@127.0.0.1:9/db'}}\n  commands:\n    - name: order\n      maxBodyBytes: 1000\n      event: {type: order.placed, topic: orders}\n---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {name: ingest, namespace: gw}\nspec:\n  targetRefs: [{name: test}]\n  source: {http: {path: /events/in}}\n  destination: {kafka: {topic: in}}\n";
    let gw = Gateway::start_in_process(&middleware(&routes, extra)).await;
    for (path, size) in
        [("/upload", 5000), ("/validated", 5000), ("/commands/order", 5000), ("/events/in", 11 * 1024 * 1024)]
    {
        let answer = chunked(&gw, path, size).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
    }
    assert_eq!(up.hits(), 0, "nothing over the limit reached the upstream");
}
