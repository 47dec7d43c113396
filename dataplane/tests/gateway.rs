//! The gateway in-process on loopback in front of real HTTP upstreams: routing, proxy headers, streaming,
//! timeouts, retries, circuit breakers, limits and validation, h2c, hot reload, malformed input.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use support::{Gateway, Upstream, eventually, get, middleware, send};

fn route(name: &str, matches: &str, upstream: &str, extra: &str) -> String {
    format!("    - name: {name}\n      match: {matches}\n      upstream: {{url: '{upstream}'}}\n{extra}")
}

#[tokio::test]
async fn requests_are_routed_by_host_path_method_and_header_first_match_wins() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let routes = [
        route("by-host", "{hosts: ['*.tenant.example']}", &a.url(), ""),
        route("by-header", "{pathPrefix: /api, headers: [{name: x-version, value: '2'}]}", &b.url(), ""),
        route("by-method", "{pathPrefix: /api, methods: [POST]}", &b.url(), ""),
        route("by-prefix", "{pathPrefix: /api}", &a.url(), ""),
        route("exact", "{path: /b/only}", &b.url(), ""),
    ]
    .concat();
    let gw = Gateway::start(&middleware(&routes, "")).await;
    let upstream_of = |reply: &support::Reply| reply.json()["upstream"].as_str().unwrap_or("").to_string();

    let r = send(Method::GET, &gw.url("/anything"), &[("host", "shop.tenant.example")], Bytes::new()).await;
    assert_eq!(upstream_of(&r), "a");
    let r = send(Method::GET, &gw.url("/api/x"), &[("x-version", "2")], Bytes::new()).await;
    assert_eq!(upstream_of(&r), "b");
    let r = send(Method::POST, &gw.url("/api/x"), &[], Bytes::new()).await;
    assert_eq!(upstream_of(&r), "b");
    let r = get(&gw.url("/api/x?q=1")).await;
    assert_eq!(upstream_of(&r), "a");
    assert_eq!(r.json()["uri"], "/api/x?q=1", "path and query reach the upstream unchanged");
    assert_eq!(upstream_of(&get(&gw.url("/b/only")).await), "b");

    let miss = get(&gw.url("/b/only/not")).await;
    assert_eq!(miss.status, 404);
    assert_eq!(miss.headers["content-type"], "application/problem+json");
    assert_eq!(miss.json()["type"], "https://umw.dev/problems/no-route");
    assert_eq!(gw.metric("umw_gateway_errors_total", &["kind=\"no_route\""]).await, 1.0);
    assert_eq!(gw.metric("umw_http_requests_total", &["route=\"by-prefix\"", "status=\"2xx\""]).await, 1.0);
}

#[tokio::test]
async fn the_upstream_learns_who_asked_and_hop_by_hop_headers_stay_on_their_hop() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&middleware(&route("all", "{}", &format!("{}/base", up.url()), ""), "")).await;
    let r = send(
        Method::GET,
        &gw.url("/echo?x=1"),
        &[
            ("host", "shop.example:8443"),
            ("connection", "keep-alive, x-private-hop"),
            ("x-private-hop", "secret"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "203.0.113.9"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("x-request-id", "req-123"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-request-id"], "req-123", "the caller's request id comes back");
    let echo = r.json();
    let h = &echo["headers"];
    assert_eq!(echo["uri"], "/base/echo?x=1", "the URL's path goes in front");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example:8443");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"shop.example:8443\"");
    assert_eq!(h["host"], up.address.to_string(), "a URL upstream gets its own Host");
    assert_eq!(h["x-request-id"], "req-123");
    assert!(h.get("x-private-hop").is_none() && h.get("keep-alive").is_none(), "{h}");
    let traceparent = h["traceparent"].as_str().unwrap();
    assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "same trace: {traceparent}");
    assert!(!traceparent.contains("00f067aa0ba902b7"), "a new parent span: {traceparent}");
    assert!(traceparent.ends_with("-01"), "the sampled flag is kept");

    // Without a request id the gateway makes one and sends it both ways.
    let r = get(&gw.url("/echo")).await;
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(r.json()["headers"]["x-request-id"], id.as_str());
}

#[tokio::test]
async fn bodies_stream_both_ways_without_loss() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&middleware(&route("all", "{}", &up.url(), "      maxBodyBytes: 67108864\n"), "")).await;
    // 20 MiB down, streamed in chunks by the upstream.
    let r = get(&gw.url("/bytes/20971520")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 20_971_520);
    assert!(r.body.iter().all(|b| *b == b'x'));
    // 8 MiB up, chunked (no Content-Length).
    let chunks = (0..128).map(|_| Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![7u8; 65536]))));
    let body = http_body_util::StreamBody::new(futures::stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let request = http::Request::post(gw.url("/upload")).body(body).unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    use http_body_util::BodyExt as _;
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(text, "8388608");
}

#[tokio::test]
async fn a_slow_upstream_gets_a_504_at_the_route_timeout() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&middleware(&route("slow", "{}", &up.url(), "      timeout: 300ms\n"), "")).await;
    let started = Instant::now();
    let r = get(&gw.url("/slow/5000")).await;
    let elapsed = started.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["type"], "https://umw.dev/problems/upstream-timeout");
    assert!(elapsed < Duration::from_secs(4), "answered at the deadline, not when the upstream finished: {elapsed:?}");
    assert_eq!(gw.metric("umw_upstream_requests_total", &["outcome=\"timeout\""]).await, 1.0);
    assert_eq!(gw.metric("umw_gateway_errors_total", &["route=\"slow\"", "kind=\"upstream_timeout\""]).await, 1.0);
    // A client that gives up before the deadline is not the upstream's timeout.
    let gave_up = tokio::time::timeout(Duration::from_millis(100), get(&gw.url("/slow/5000"))).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(gw.metric("umw_upstream_requests_total", &["outcome=\"timeout\""]).await, 1.0);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn idempotent_requests_are_retried_and_others_are_not() {
    let up = Upstream::start("up").await;
    let retry = "      retry: {attempts: 3, backoff: 5ms}\n";
    let gw = Gateway::start(&middleware(&route("flaky", "{}", &up.url(), retry), "")).await;
    let r = get(&gw.url("/flaky/2")).await;
    assert_eq!(r.status, 200, "two 503s, then the third attempt succeeds");
    assert_eq!(up.hits(), 3);
    assert_eq!(gw.metric("umw_upstream_retries_total", &[]).await, 2.0);

    let up = Upstream::start("up2").await;
    let gw = Gateway::start(&middleware(&route("flaky", "{}", &up.url(), retry), "")).await;
    let r = send(Method::POST, &gw.url("/flaky/2"), &[], Bytes::from_static(b"{}")).await;
    assert_eq!(r.status, 503, "POST is not idempotent: the upstream's answer comes back as it is");
    assert_eq!(up.hits(), 1);
    // PUT with a small body is idempotent and replayable.
    let r = send(Method::PUT, &gw.url("/flaky/2"), &[], Bytes::from_static(b"{\"a\":1}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 3, "one more failure, then success");
}

#[tokio::test]
async fn a_failing_upstream_opens_its_circuit_breaker_and_recovers() {
    let up = Upstream::start("up").await;
    let breaker = "      upstream: {{url: '{}', circuitBreaker: {{consecutiveFailures: 3, openFor: 1s}}}}\n";
    let yaml = middleware(
        &format!(
            "    - name: fragile\n      match: {{}}\n{}",
            breaker.replace("{}", &up.url()).replace("{{", "{").replace("}}", "}")
        ),
        "",
    );
    let gw = Gateway::start(&yaml).await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/status/503")).await.status, 503);
    }
    assert_eq!(up.hits(), 3);
    let refused = get(&gw.url("/status/200")).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["type"], "https://umw.dev/problems/upstream-unavailable");
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(up.hits(), 3, "an open breaker sends nothing upstream");
    assert_eq!(gw.metric("umw_circuit_breaker_state", &[]).await, 1.0);
    assert_eq!(gw.metric("umw_circuit_breaker_rejections_total", &[]).await, 1.0);
    let status = gw.status().await;
    let component = status["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().starts_with("upstream"))
        .unwrap()
        .clone();
    assert_eq!(component["state"], "Degraded", "{status}");
    assert_eq!(status["ready"], true, "an open breaker does not make the pod unready");

    // Refused (503) until openFor has passed; then the trial request goes and closes the breaker.
    eventually("the trial request closes the breaker", Duration::from_secs(5), || async {
        get(&gw.url("/status/200")).await.status == 200
    })
    .await;
    assert_eq!(gw.metric("umw_circuit_breaker_state", &[]).await, 0.0);
    assert_eq!(get(&gw.url("/status/200")).await.status, 200);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_at_once() {
    let (_closed, closed) = support::closed_address();
    let gw = Gateway::start(&middleware(&route("gone", "{}", &format!("http://{closed}"), "      timeout: 10s\n"), ""))
        .await;
    let started = Instant::now();
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.status, 502);
    let problem = r.json();
    assert_eq!(problem["type"], "https://umw.dev/problems/upstream-unreachable");
    assert!(!problem.to_string().contains("127.0.0.1"), "no internals leak: {problem}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(gw.metric("umw_upstream_requests_total", &["outcome=\"connect_error\""]).await, 1.0);
}

#[tokio::test]
async fn oversized_and_invalid_bodies_are_refused_before_the_upstream() {
    let up = Upstream::start("up").await;
    let extra = "      maxBodyBytes: 1024\n      requestSchema:\n        type: object\n        required: [sku, quantity]\n        properties:\n          quantity: {type: integer, minimum: 1}\n";
    let gw = Gateway::start(&middleware(&route("orders", "{}", &up.url(), extra), "")).await;
    let big = Bytes::from(vec![b'a'; 4096]);
    let r = send(Method::POST, &gw.url("/orders"), &[("content-type", "application/json")], big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["type"], "https://umw.dev/problems/body-too-large");

    let r = send(Method::POST, &gw.url("/orders"), &[], Bytes::from_static(br#"{"quantity": 0}"#)).await;
    assert_eq!(r.status, 422);
    let problem = r.json();
    let pointers: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap()).collect();
    assert_eq!(pointers, ["", "/quantity"], "{problem}");
    let r = send(Method::POST, &gw.url("/orders"), &[], Bytes::from_static(b"not json")).await;
    assert_eq!(r.status, 422);
    assert_eq!(up.hits(), 0, "nothing invalid reached the upstream");

    let r = send(Method::POST, &gw.url("/orders"), &[], Bytes::from_static(br#"{"sku": "k", "quantity": 2}"#)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body"], r#"{"sku": "k", "quantity": 2}"#, "a valid body arrives unchanged");
}

#[tokio::test]
async fn h2c_clients_and_h2c_upstreams() {
    let up = Upstream::start("up").await;
    let routes = [
        route("h1", "{pathPrefix: /h1}", &up.url(), ""),
        format!(
            "    - name: h2\n      match: {{pathPrefix: /h2}}\n      upstream: {{url: '{}', protocol: H2C}}\n",
            up.url()
        ),
    ]
    .concat();
    let gw = Gateway::start(&middleware(&routes, "")).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    // An HTTP/1.1 upstream sees the path as the request target; an HTTP/2 one sees the full URI.
    for (path, seen) in [("/h1/x", "/h1/x".to_string()), ("/h2/x", format!("{}/h2/x", up.url()))] {
        let r = support::send_with(&h2, Method::GET, &gw.url(path), &[], Bytes::new()).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json()["uri"], seen.as_str(), "{path}");
    }
}

#[tokio::test]
async fn a_changed_configuration_is_reloaded_and_a_broken_one_is_refused() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = Gateway::start(&middleware(&route("one", "{pathPrefix: /one}", &a.url(), ""), "")).await;
    let first = gw.status().await["configHash"].as_str().unwrap().to_string();
    assert_eq!(get(&gw.url("/two")).await.status, 404);

    let both =
        [route("one", "{pathPrefix: /one}", &a.url(), ""), route("two", "{pathPrefix: /two}", &b.url(), "")].concat();
    gw.write_config(&middleware(&both, ""));
    eventually("the new route", Duration::from_secs(5), || async { get(&gw.url("/two")).await.status == 200 }).await;
    let second = gw.status().await["configHash"].as_str().unwrap().to_string();
    assert_ne!(first, second);
    assert_eq!(gw.metric("umw_config_reloads_total", &["outcome=\"applied\""]).await, 1.0);

    gw.write_config(&middleware(&route("broken", "{path: /a, pathPrefix: /b}", &a.url(), ""), ""));
    eventually("the rejection", Duration::from_secs(5), || async {
        gw.metric("umw_config_reloads_total", &["outcome=\"rejected\""]).await == 1.0
    })
    .await;
    let status = gw.status().await;
    assert_eq!(status["configHash"], second.as_str(), "the running configuration stays");
    let config = status["components"].as_array().unwrap().iter().find(|c| c["name"] == "config").unwrap().clone();
    assert_eq!(config["state"], "Degraded");
    assert!(config["message"].as_str().unwrap().contains("set at most one of pathPrefix and path"), "{config}");
    assert_eq!(get(&gw.url("/two")).await.status, 200, "still served");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gw.metric("umw_config_reloads_total", &["outcome=\"rejected\""]).await,
        1.0,
        "counted once, not every poll"
    );
}

#[tokio::test]
async fn paths_an_upstream_would_resolve_differently_and_connect_are_refused() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&middleware(&route("api", "{pathPrefix: /api}", &up.url(), ""), "")).await;
    for path in ["/api/../admin", "/api/./x", "/api/%2e%2e/admin", "/api/a%2Fb", "/api/%5c"] {
        let r = get(&gw.url(path)).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(r.json()["type"], "https://umw.dev/problems/bad-request", "{path}");
    }
    let r = send(Method::CONNECT, &format!("http://{}", gw.address), &[], Bytes::new()).await;
    assert_eq!(r.status, 405);
    assert_eq!(up.hits(), 0);
    assert_eq!(get(&gw.url("/api/ok")).await.status, 200);
}

#[tokio::test]
async fn malformed_requests_get_a_400_and_the_gateway_keeps_serving() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&middleware(&route("all", "{}", &up.url(), ""), "")).await;
    for garbage in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(gw.address).await.unwrap();
        stream.write_all(garbage).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 400"), "{text}");
    }
    assert_eq!(get(&gw.url("/still-fine")).await.status, 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_rejected_reload_leaves_nothing_behind_and_reverting_it_clears_the_rejection() {
    let up = Upstream::start("up").await;
    let good = middleware(&route("all", "{}", &up.url(), ""), "");
    let gw = Gateway::start(&good).await;
    let names = |status: &serde_json::Value| -> Vec<String> {
        status["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
    };
    let before = names(&gw.status().await);

    // Builds a Kafka producer (events), a new upstream (proxy) and then fails in the cache: the Redis URL
    // is a Secret this process does not have. Nothing the build made may show.
    let (_closed, closed) = support::closed_address();
    let broken = format!(
        "{}\n  connections:\n    kafka: {{bootstrapServers: {{value: '{closed}'}}}}\n    redis: {{url: {{secretKeyRef: {{name: absent, key: url}}}}}}\n\
---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {{name: orders, namespace: gw}}\nspec:\n  targetRefs: [{{name: test}}]\n  source: {{http: {{path: /events/orders}}}}\n  destination: {{kafka: {{topic: orders}}}}\n\
---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: c, namespace: gw}}\nspec:\n  targetRefs: [{{name: test}}]\n  backend: redis\n  rules: [{{ttl: 30s}}]\n",
        middleware(
            &[route("all", "{}", &up.url(), ""), route("new", "{path: /new}", "http://127.0.0.1:9", "")].concat(),
            ""
        )
    );
    gw.write_config(&broken);
    eventually("the reload rejected", Duration::from_secs(10), || async {
        let status = gw.status().await;
        status["components"].as_array().unwrap().iter().any(|c| c["name"] == "config" && c["state"] == "Degraded")
    })
    .await;
    let status = gw.status().await;
    assert!(status["components"].to_string().contains("absent"), "the rejection names the Secret: {status}");
    assert_eq!(names(&status), before, "a rejected build leaves no component behind: {status}");
    assert_eq!(status["routes"].as_array().unwrap().len(), 1, "the old routes still serve: {status}");

    gw.write_config(&good);
    eventually("the configuration accepted again", Duration::from_secs(10), || async {
        let status = gw.status().await;
        status["components"].as_array().unwrap().iter().all(|c| c["state"] == "Up")
    })
    .await;
    assert_eq!(names(&gw.status().await), before);
}

#[tokio::test]
async fn upstream_connections_are_reused_and_one_left_mid_body_is_not() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&middleware(&route("all", "{}", &up.url(), "      maxBodyBytes: 67108864\n"), "")).await;
    let opened = || gw.metric("umw_upstream_connections_opened_total", &[]);
    for i in 0..20 {
        let method = if i % 2 == 0 { Method::GET } else { Method::HEAD };
        assert_eq!(send(method, &gw.url("/echo"), &[], Bytes::new()).await.status, 200);
    }
    assert_eq!(send(Method::POST, &gw.url("/upload"), &[], Bytes::from(vec![1u8; 100_000])).await.body, "100000");
    assert_eq!(get(&gw.url("/bytes/3000000")).await.body.len(), 3_000_000);
    assert_eq!(get(&gw.url("/status/204")).await.status, 204);
    assert_eq!(opened().await, 1.0, "one connection carried every request, whatever the body");

    // A client that goes away in the middle of a streamed body: the rest of that response is still on the
    // upstream connection, so it is closed, and the next request opens another.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut client = tokio::net::TcpStream::connect(gw.url("").trim_start_matches("http://")).await.unwrap();
    client.write_all(b"GET /bytes/20971520 HTTP/1.1\r\nhost: gw\r\n\r\n").await.unwrap();
    let mut some = vec![0u8; 65536];
    let n = client.read(&mut some).await.unwrap();
    assert!(n > 0 && some.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&some[..n]));
    drop(client);
    // Time for the gateway to find the client gone and drop the response.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/echo")).await.status, 200);
    }
    assert_eq!(opened().await, 2.0);
    assert_eq!(up.hits(), 27);
}

#[tokio::test]
async fn traffic_threads_share_the_port_and_each_keeps_its_own_upstream_pool() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start_threads(&middleware(&route("all", "{}", &up.url(), ""), ""), 2).await;
    // One request per client connection, one after the other: the kernel spreads the connections over
    // the two sockets (the chance that one got all 32 is 2^-31), and each thread's requests take turns on
    // that thread's one upstream connection.
    for _ in 0..32 {
        assert_eq!(get(&gw.url("/echo")).await.status, 200);
    }
    assert_eq!(gw.metric("umw_connections_accepted_total", &[]).await, 32.0);
    assert_eq!(gw.metric("umw_upstream_connections_opened_total", &[]).await, 2.0, "one per thread");
    assert_eq!(up.hits(), 32);
}
