//! Events against a real Apache Kafka broker: HTTP ingest → Kafka, Kafka → webhook with retries and a
//! dead-letter topic, the broker going away and coming back.

#[path = "../../dataplane/tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use support::{Gateway, eventually, send};
use umw_tests::KafkaBroker;

/// A webhook that records what it gets and fails the first `fail_first` attempts of each event id (and
/// every attempt of events whose data says `"poison": true`).
#[derive(Clone, Default)]
struct Webhook {
    received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    attempts: Arc<Mutex<HashMap<String, u32>>>,
    fail_first: u32,
}

impl Webhook {
    async fn start(fail_first: u32) -> (Self, String) {
        let hook = Webhook { fail_first, ..Webhook::default() };
        let app = Router::new().route("/hook", post(receive)).with_state(hook.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (hook, url)
    }

    fn delivered(&self) -> Vec<(HeaderMap, Bytes)> {
        self.received.lock().unwrap().clone()
    }
}

async fn receive(State(hook): State<Webhook>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = headers.get("ce-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let attempt = {
        let mut attempts = hook.attempts.lock().unwrap();
        let n = attempts.entry(id).or_default();
        *n += 1;
        *n
    };
    let poison = serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v["poison"] == true);
    if poison || attempt <= hook.fail_first {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    hook.received.lock().unwrap().push((headers, body));
    StatusCode::NO_CONTENT
}

fn middleware(kafka: &KafkaBroker, extra: &str) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: ev}}\nspec:\n  connections:\n    kafka:\n      bootstrapServers: {{value: '{}'}}\n{extra}",
        kafka.bootstrap()
    )
}

fn event_route(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {{name: {name}, namespace: ev}}\nspec:\n  targetRefs: [{{name: shop}}]\n{spec}"
    )
}

async fn kafka_up(gw: &Gateway) {
    eventually("the kafka component up", Duration::from_secs(30), || async {
        let status = gw.status().await;
        status["components"].as_array().unwrap().iter().any(|c| c["name"] == "kafka" && c["state"] == "Up")
    })
    .await;
}

async fn post_json(url: &str, headers: &[(&str, &str)], body: &str) -> support::Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(Method::POST, url, &all, Bytes::from(body.to_string())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_answers_202_once_the_broker_has_the_event() {
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    kafka.create_topic("orders", 3);
    let yaml = format!(
        "{}{}",
        middleware(&kafka, ""),
        event_route(
            "orders-in",
            "  source: {http: {path: /events/orders}}\n  destination: {kafka: {topic: orders, keyTemplate: '{{ data.customer }}'}}\n  schema: {type: object, required: [customer], properties: {customer: {type: string}}}\n"
        )
    );
    let gw = Gateway::start(&yaml).await;
    kafka_up(&gw).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = post_json(
        &gw.url("/events/orders"),
        &[("traceparent", traceparent), ("ce-type", "order.placed")],
        r#"{"customer": "c-17", "total": 12}"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let answer = reply.json();
    let id = answer["id"].as_str().unwrap().to_string();
    assert_eq!(answer["topic"], "orders");
    let records = kafka.read("orders", 1, Duration::from_secs(20));
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.partition, answer["partition"].as_i64().unwrap() as i32);
    assert_eq!(record.offset, answer["offset"].as_i64().unwrap());
    assert_eq!(record.header("ce_id").as_deref(), Some(id.as_str()));
    assert_eq!(record.header("ce_specversion").as_deref(), Some("1.0"));
    assert_eq!(record.header("ce_type").as_deref(), Some("order.placed"));
    assert_eq!(record.header("ce_source").as_deref(), Some("/ev/orders-in"));
    assert_eq!(record.header("content-type").as_deref(), Some("application/json"));
    assert_eq!(record.key.as_deref(), Some(&b"c-17"[..]), "the key template");
    let continued = record.header("ce_traceparent").unwrap();
    assert!(continued.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "the trace continues: {continued}");
    assert_ne!(continued, traceparent, "from the gateway's span");
    assert_eq!(record.value, br#"{"customer": "c-17", "total": 12}"#, "the body as it came, not re-serialised");

    // Bad input: a clear problem and nothing published.
    let not_json = post_json(&gw.url("/events/orders"), &[], "{nope").await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST, "{}", not_json.text());
    assert!(not_json.text().contains("not JSON"), "{}", not_json.text());
    let invalid = post_json(&gw.url("/events/orders"), &[], r#"{"customer": 5}"#).await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(invalid.json()["errors"][0]["pointer"], "/customer");
    // A structured CloudEvent keeps its own id.
    let structured = send(
        Method::POST,
        &gw.url("/events/orders"),
        &[("content-type", "application/cloudevents+json")],
        Bytes::from(r#"{"specversion":"1.0","id":"own-id-1","type":"order.placed","source":"/client","data":{"customer":"c-2"}}"#),
    )
    .await;
    assert_eq!(structured.status, StatusCode::ACCEPTED, "{}", structured.text());
    assert_eq!(structured.json()["id"], "own-id-1");
    assert_eq!(kafka.read("orders", 2, Duration::from_secs(20)).len(), 2, "two events in all");
    assert_eq!(gw.metric("umw_events_published_total", &["topic=\"orders\"", "outcome=\"ok\""]).await, 2.0);

    // A batch: all or nothing on validation, published together.
    let event = |id: &str, customer: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","type":"order.placed","source":"/batch","data":{{"customer":{customer}}}}}"#
        )
    };
    let url = gw.url("/events/orders");
    let batch = |events: Vec<String>| {
        let url = url.clone();
        async move {
            send(
                Method::POST,
                &url,
                &[("content-type", "application/cloudevents-batch+json")],
                Bytes::from(format!("[{}]", events.join(","))),
            )
            .await
        }
    };
    let refused = batch(vec![event("b-1", r#""c-1""#), event("b-2", "7")]).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", refused.text());
    assert_eq!(refused.json()["errors"][0]["pointer"], "/1/data/customer");
    let published = batch((0..3).map(|i| event(&format!("b-{i}"), &format!(r#""c-{i}""#))).collect()).await;
    assert_eq!(published.status, StatusCode::ACCEPTED, "{}", published.text());
    let answered = published.json();
    assert_eq!(answered["events"].as_array().unwrap().len(), 3);
    assert!(answered["events"][2]["offset"].is_i64());
    let records = kafka.read("orders", 5, Duration::from_secs(20));
    let ids: Vec<String> = records.iter().filter_map(|r| r.header("ce_id")).filter(|id| id.starts_with("b-")).collect();
    assert_eq!(ids.len(), 3, "the batch's events, and only the valid batch's: {ids:?}");

    // A batch above 64 KiB is read off the request threads, with the same answer.
    let pad = "x".repeat(100);
    let large: Vec<String> = (0..500).map(|i| event(&format!("l-{i}"), &format!(r#""c-{i}-{pad}""#))).collect();
    assert!(large.iter().map(String::len).sum::<usize>() > 64 * 1024);
    let published = batch(large).await;
    assert_eq!(published.status, StatusCode::ACCEPTED, "{}", published.text());
    assert_eq!(published.json()["events"].as_array().unwrap().len(), 500);
    let records = kafka.read("orders", 505, Duration::from_secs(30));
    assert_eq!(records.iter().filter(|r| r.header("ce_id").is_some_and(|id| id.starts_with("l-"))).count(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_break_cloudevents_1_0_are_refused_naming_the_attribute_and_none_is_published() {
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    kafka.create_topic("strict", 1);
    let yaml = format!(
        "{}{}",
        middleware(&kafka, ""),
        event_route("strict-in", "  source: {http: {path: /events/strict}}\n  destination: {kafka: {topic: strict}}\n")
    );
    let gw = Gateway::start(&yaml).await;
    kafka_up(&gw).await;
    let url = gw.url("/events/strict");
    let structured = |body: &str| {
        let url = url.clone();
        let body = Bytes::from(body.to_string());
        async move { send(Method::POST, &url, &[("content-type", "application/cloudevents+json")], body).await }
    };
    let binary = |headers: Vec<(&'static str, &'static str)>| {
        let url = url.clone();
        async move {
            let mut all = vec![("content-type", "application/json"), ("ce-specversion", "1.0")];
            all.extend(headers);
            send(Method::POST, &url, &all, Bytes::from_static(b"{}")).await
        }
    };
    let base = [("ce-id", "i-1"), ("ce-type", "t"), ("ce-source", "/s")];
    let with = |name: &'static str, value: &'static str| {
        let mut headers: Vec<_> = base.iter().copied().filter(|(n, _)| *n != name).collect();
        headers.push((name, value));
        headers
    };
    let cases = vec![
        ("/id", binary(with("ce-id", "")).await),
        ("/type", binary(with("ce-type", "")).await),
        ("/bad_ext", binary(with("ce-bad_ext", "x")).await),
        ("time", binary(with("ce-time", "yesterday")).await),
        ("/source", structured(r#"{"specversion":"1.0","id":"s-1","type":"t","source":""}"#).await),
        ("/subject", structured(r#"{"specversion":"1.0","id":"s-2","type":"t","source":"/s","subject":""}"#).await),
        (
            "/datacontenttype",
            structured(
                r#"{"specversion":"1.0","id":"s-3","type":"t","source":"/s","datacontenttype":"json","data":"x"}"#,
            )
            .await,
        ),
        ("/specversion", structured(r#"{"specversion":"0.3","id":"s-4","type":"t","source":"/s"}"#).await),
        // A plain body: the client's own empty ce-id is not replaced by a generated one.
        ("/id", post_json(&url, &[("ce-id", "")], "{}").await),
    ];
    let refused = cases.len();
    for (attribute, reply) in cases {
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{attribute}: {}", reply.text());
        let problem = reply.json();
        assert!(problem["type"].as_str().unwrap().ends_with("invalid-event"), "{problem}");
        if attribute.starts_with('/') {
            assert_eq!(problem["errors"][0]["pointer"], attribute, "{problem}");
        }
        assert!(
            problem["detail"].as_str().unwrap().contains(&format!("`{}`", attribute.trim_start_matches('/'))),
            "{problem}"
        );
    }
    // A batch is refused whole when one element breaks the specification.
    let batch = send(
        Method::POST,
        &url,
        &[("content-type", "application/cloudevents-batch+json")],
        Bytes::from(
            r#"[{"specversion":"1.0","id":"b-1","type":"t","source":"/s"},{"specversion":"1.0","id":"b-2","type":"","source":"/s"}]"#,
        ),
    )
    .await;
    assert_eq!(batch.status, StatusCode::BAD_REQUEST, "{}", batch.text());
    assert_eq!(batch.json()["errors"][0]["pointer"], "/1/type");

    // Nothing of the above reached Kafka: the first record is the valid event sent last.
    let valid = binary(base.to_vec()).await;
    assert_eq!(valid.status, StatusCode::ACCEPTED, "{}", valid.text());
    let records = kafka.read("strict", 1, Duration::from_secs(20));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].offset, 0, "nothing invalid was published before the valid event");
    assert_eq!(records[0].header("ce_id").as_deref(), Some("i-1"));
    let invalid = gw.metric("umw_events_handled_total", &["event_route=\"strict-in\"", "outcome=\"invalid\""]).await;
    assert_eq!(invalid, (refused + 1) as f64, "every refusal is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_delivers_to_the_webhook_with_retries_and_dead_letters_what_keeps_failing() {
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    kafka.create_topic("payments", 2);
    kafka.create_topic("payments-dlq", 1);
    let (hook, url) = Webhook::start(2).await;
    let yaml = format!(
        "{}{}{}",
        middleware(&kafka, ""),
        event_route(
            "pay-in",
            "  source: {http: {path: /events/payments}}\n  destination: {kafka: {topic: payments}}\n"
        ),
        event_route(
            "pay-out",
            &format!(
                "  source: {{kafka: {{topic: payments}}}}\n  destination: {{http: {{url: '{url}', timeout: 2s}}}}\n  filter: {{types: [payment.done]}}\n  retry: {{maxAttempts: 4, initialBackoff: 10ms, maxBackoff: 50ms}}\n  deadLetter: {{topic: payments-dlq}}\n"
            )
        )
    );
    let gw = Gateway::start(&yaml).await;
    kafka_up(&gw).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let reply =
            post_json(&gw.url("/events/payments"), &[("ce-type", "payment.done")], &format!(r#"{{"n": {i}}}"#)).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
        ids.push(reply.json()["id"].as_str().unwrap().to_string());
    }
    // Filtered out: acknowledged, never delivered.
    let other = post_json(&gw.url("/events/payments"), &[("ce-type", "payment.started")], r#"{"n": 99}"#).await;
    assert_eq!(other.status, StatusCode::ACCEPTED);
    // Poison: fails every attempt, goes to the dead-letter topic, does not block the partition.
    let poison = post_json(&gw.url("/events/payments"), &[("ce-type", "payment.done")], r#"{"poison": true}"#).await;
    let poison_id = poison.json()["id"].as_str().unwrap().to_string();
    let after = post_json(&gw.url("/events/payments"), &[("ce-type", "payment.done")], r#"{"n": 100}"#).await;
    ids.push(after.json()["id"].as_str().unwrap().to_string());

    eventually("21 events delivered", Duration::from_secs(30), || async { hook.delivered().len() >= 21 }).await;
    let delivered = hook.delivered();
    let mut got: Vec<String> =
        delivered.iter().map(|(h, _)| h.get("ce-id").unwrap().to_str().unwrap().to_string()).collect();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want, "every event once, the filtered one not");
    let (headers, _) = &delivered[0];
    assert_eq!(headers.get("ce-specversion").unwrap(), "1.0");
    assert_eq!(headers.get("ce-type").unwrap(), "payment.done");
    assert_eq!(headers.get("content-type").unwrap(), "application/json");
    // The delivery continues the event's trace: same trace id, a span of its own.
    let event_trace = headers.get("ce-traceparent").unwrap().to_str().unwrap();
    let delivery_trace = headers.get("traceparent").unwrap().to_str().unwrap();
    assert_eq!(event_trace[3..35], delivery_trace[3..35], "{event_trace} / {delivery_trace}");
    assert_ne!(event_trace[36..52], delivery_trace[36..52]);
    // Each delivered event took three attempts (two failures first). The poison event may still be
    // retrying on the other partition here; it is counted once it is dead-lettered.
    {
        let attempts = hook.attempts.lock().unwrap();
        for id in &want {
            assert_eq!(attempts.get(id), Some(&3), "attempts for {id}: {attempts:?}");
        }
    }

    let dead = kafka.read("payments-dlq", 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "the poison event is dead-lettered");
    let dead = &dead[0];
    assert_eq!(dead.header("ce_id").as_deref(), Some(poison_id.as_str()));
    assert_eq!(dead.header("umw_original_topic").as_deref(), Some("payments"));
    assert!(dead.header("umw_original_partition").is_some_and(|p| p == "0" || p == "1"));
    assert!(dead.header("umw_original_offset").is_some_and(|o| o.parse::<i64>().is_ok()));
    assert_eq!(dead.header("umw_attempts").as_deref(), Some("4"));
    assert_eq!(hook.attempts.lock().unwrap().get(&poison_id), Some(&4), "maxAttempts bounds the poison event");
    assert!(dead.header("umw_error").unwrap().contains("503"), "{:?}", dead.header("umw_error"));
    assert_eq!(
        gw.metric("umw_events_handled_total", &["event_route=\"pay-out\"", "outcome=\"dead_lettered\""]).await,
        1.0
    );
    assert_eq!(gw.metric("umw_events_handled_total", &["event_route=\"pay-out\"", "outcome=\"filtered\""]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_ingest_answers_503_and_every_acknowledged_event_is_kept() {
    let mut kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    kafka.create_topic("audit", 1);
    let yaml = format!(
        "{}{}",
        middleware(&kafka, "      producer: {deliveryTimeout: 3s}\n"),
        event_route("audit-in", "  source: {http: {path: /events/audit}}\n  destination: {kafka: {topic: audit}}\n")
    );
    let gw = Gateway::start(&yaml).await;
    kafka_up(&gw).await;
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let reply = post_json(&gw.url("/events/audit"), &[], &format!(r#"{{"n": {i}}}"#)).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        acknowledged.push(reply.json()["id"].as_str().unwrap().to_string());
    }
    kafka.kill();
    // Until the client notices, a request waits at most the delivery timeout; then every answer is a 503
    // with Retry-After, at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = post_json(&gw.url("/events/audit"), &[], r#"{"n": -1}"#).await;
        if reply.status == StatusCode::ACCEPTED {
            acknowledged.push(reply.json()["id"].as_str().unwrap().to_string());
        } else if reply.status == StatusCode::SERVICE_UNAVAILABLE && reply.headers.contains_key("retry-after") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no 503 with Retry-After: {} {}", reply.status, reply.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = std::time::Instant::now();
    let reply = post_json(&gw.url("/events/audit"), &[], r#"{"n": -2}"#).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(1), "answered at once: {:?}", started.elapsed());
    assert_eq!(reply.json()["type"].as_str().unwrap().rsplit('/').next(), Some("events-unavailable"));
    eventually("kafka Down in /status", Duration::from_secs(10), || async {
        let status = gw.status().await;
        status["components"].as_array().unwrap().iter().any(|c| c["name"] == "kafka" && c["state"] == "Down")
    })
    .await;

    kafka = tokio::task::spawn_blocking(move || {
        kafka.restart();
        kafka
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reply = post_json(&gw.url("/events/audit"), &[], r#"{"n": 1000}"#).await;
        if reply.status == StatusCode::ACCEPTED {
            acknowledged.push(reply.json()["id"].as_str().unwrap().to_string());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ingest did not recover: {} {}", reply.status, reply.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let records = kafka.read("audit", acknowledged.len(), Duration::from_secs(30));
    let present: Vec<String> = records.iter().filter_map(|r| r.header("ce_id")).collect();
    let missing: Vec<&String> = acknowledged.iter().filter(|id| !present.contains(id)).collect();
    assert!(missing.is_empty(), "acknowledged events missing after the restart: {missing:?}");
}

/// A webhook that counts deliveries per event id.
#[derive(Clone, Default)]
struct Counter {
    seen: Arc<Mutex<HashMap<String, u32>>>,
}

impl Counter {
    async fn start() -> (Self, String) {
        let counter = Counter::default();
        let app = Router::new()
            .route(
                "/count",
                post(|State(counter): State<Counter>, headers: HeaderMap| async move {
                    let id = headers.get("ce-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    *counter.seen.lock().unwrap().entry(id).or_default() += 1;
                    StatusCode::NO_CONTENT
                }),
            )
            .with_state(counter.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/count", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (counter, url)
    }

    /// (distinct events, deliveries)
    fn figures(&self) -> (usize, u64) {
        let seen = self.seen.lock().unwrap();
        (seen.len(), seen.values().map(|n| u64::from(*n)).sum())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_growing_and_shrinking_while_50k_events_flow_loses_none() {
    const EVENTS: usize = 50_000;
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    kafka.create_topic("stream", 6);
    let (counter, url) = Counter::start().await;
    let yaml = format!(
        "{}{}",
        middleware(&kafka, ""),
        event_route(
            "stream-out",
            &format!(
                "  source: {{kafka: {{topic: stream, group: stream-group}}}}\n  destination: {{http: {{url: '{url}'}}}}\n"
            )
        )
    );
    // The events are in the topic before the first member joins, and more arrive while members come and go.
    let producer = {
        let bootstrap = kafka.bootstrap();
        std::thread::spawn(move || {
            let kafka = KafkaBrokerAt(bootstrap);
            kafka.produce("stream", EVENTS / 2, 500, |i| format!(r#"{{"n": {i}}}"#));
            std::thread::sleep(Duration::from_secs(3));
            kafka.produce("stream", EVENTS / 2, 500, |i| format!(r#"{{"n": {}}}"#, EVENTS / 2 + i));
        })
    };
    let progress = |at: usize| {
        let counter = counter.clone();
        async move {
            eventually(&format!("{at} events handled"), Duration::from_secs(120), || async {
                counter.figures().0 >= at
            })
            .await
        }
    };
    let first = Gateway::start(&yaml).await;
    // Thousands of events wait: the lag gauge says so within a statistics interval.
    eventually("consumer lag reported", Duration::from_secs(20), || async {
        first.metric("umw_events_consumer_lag", &["event_route=\"stream-out\""]).await > 100.0
    })
    .await;
    progress(5_000).await;
    let second = Gateway::start(&yaml).await;
    progress(15_000).await;
    let third = Gateway::start(&yaml).await;
    progress(25_000).await;
    drop(third);
    progress(35_000).await;
    drop(second);
    producer.join().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while counter.figures().0 < EVENTS {
        assert!(std::time::Instant::now() < deadline, "not every event handled: {:?}", counter.figures());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Redeliveries, if any, come right after a rebalance: give them a moment to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (distinct, deliveries) = counter.figures();
    let duplicates = deliveries - distinct as u64;
    println!("consumer group 1→2→3→2→1 over {EVENTS} events: {distinct} handled, {duplicates} delivered twice or more");
    assert_eq!(distinct, EVENTS, "no event lost");
    let rebalances = first.metric("umw_events_rebalances_total", &["kind=\"revoke\""]).await;
    assert!(rebalances >= 2.0, "the first member saw its partitions move: {rebalances}");
    // The lag gauge (from the client's statistics) comes down to zero once everything is handled.
    eventually("consumer lag 0", Duration::from_secs(20), || async {
        let text = first.metrics().await;
        text.lines().any(|l| l.starts_with("umw_events_consumer_lag{event_route=\"stream-out\"} 0"))
    })
    .await;
}

/// The same broker, from its address only (for a producer thread).
struct KafkaBrokerAt(String);

impl KafkaBrokerAt {
    fn produce(&self, topic: &str, count: usize, keys: usize, value: impl Fn(usize) -> String) {
        umw_tests::kafka::produce(&self.0, topic, count, keys, value);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consuming_data_plane_killed_mid_batch_redelivers_after_restart_and_loses_nothing() {
    const EVENTS: usize = 5_000;
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    kafka.create_topic("jobs", 3);
    let (counter, url) = Counter::start().await;
    let dir = std::env::temp_dir().join(format!("umw-kill-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        format!(
            "{}{}",
            middleware(&kafka, ""),
            event_route(
                "jobs-out",
                &format!("  source: {{kafka: {{topic: jobs}}}}\n  destination: {{http: {{url: '{url}'}}}}\n")
            )
        ),
    )
    .unwrap();
    let bootstrap = kafka.bootstrap();
    tokio::task::spawn_blocking(move || {
        umw_tests::kafka::produce(&bootstrap, "jobs", EVENTS, 100, |i| format!(r#"{{"n": {i}}}"#))
    })
    .await
    .unwrap();
    let log = dir.join("dataplane.log");
    let mut dataplane = umw_tests::DataPlaneProcess::start(&dir.join("config.yaml"), &log);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while counter.figures().0 < EVENTS / 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the data plane consumed too little: {:?}\n{}",
            counter.figures(),
            dataplane.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL mid-stream: nothing is committed on the way out.
    dataplane.kill();
    let at_kill = counter.figures();
    assert!(at_kill.0 < EVENTS, "killed before the end: {at_kill:?}");
    dataplane.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while counter.figures().0 < EVENTS {
        assert!(
            std::time::Instant::now() < deadline,
            "not every event handled after the restart: {:?}",
            counter.figures()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (distinct, deliveries) = counter.figures();
    println!(
        "kill -9 after {} of {EVENTS} events: {distinct} handled in all, {} redelivered after the restart",
        at_kill.0,
        deliveries - distinct as u64
    );
    assert_eq!(distinct, EVENTS, "no event lost");
    dataplane.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_is_routed_to_another_and_a_reload_moves_the_route_without_losing_events() {
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    for topic in ["raw", "clean", "audit"] {
        kafka.create_topic(topic, 2);
    }
    let config = |to: &str| {
        format!(
            "{}{}",
            middleware(&kafka, ""),
            event_route(
                "raw-to",
                &format!(
                    "  source: {{kafka: {{topic: raw, group: router}}}}\n  destination: {{kafka: {{topic: {to}, keyTemplate: '{{{{ data.k }}}}'}}}}\n  format: structured\n  filter: {{data: [{{pointer: /keep, equals: 'true'}}]}}\n"
                )
            )
        )
    };
    let gw = Gateway::start(&config("clean")).await;
    kafka_up(&gw).await;
    let bootstrap = kafka.bootstrap();
    let produce = move |from: usize| {
        let bootstrap = bootstrap.clone();
        tokio::task::spawn_blocking(move || {
            umw_tests::kafka::produce(&bootstrap, "raw", 100, 10, |i| {
                format!(r#"{{"k": "key-{}", "keep": {}, "n": {}}}"#, i % 10, i % 2 == 0, from + i)
            })
        })
    };
    produce(0).await.unwrap();
    let clean = kafka.read("clean", 50, Duration::from_secs(30));
    assert_eq!(clean.len(), 50, "the kept half");
    let record = &clean[0];
    assert_eq!(record.header("content-type").as_deref(), Some("application/cloudevents+json"), "structured mode");
    let envelope: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["source"], "kafka:raw");
    assert!(record.key.as_deref().unwrap().starts_with(b"key-"), "the key template");

    // A reload moves the route to another topic; the group goes on from its committed offsets.
    gw.write_config(&config("audit"));
    eventually("the new configuration applied", Duration::from_secs(10), || async {
        gw.metric("umw_config_reloads_total", &["outcome=\"applied\""]).await >= 1.0
    })
    .await;
    produce(100).await.unwrap();
    let audit = kafka.read("audit", 50, Duration::from_secs(30));
    assert_eq!(audit.len(), 50, "the next kept half, in the new topic");
    let numbers: Vec<i64> = audit
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.value).unwrap()["data"]["n"].as_i64().unwrap())
        .collect();
    assert!(numbers.iter().all(|n| *n >= 100), "nothing routed twice after the reload: {numbers:?}");
    assert_eq!(kafka.read("clean", 51, Duration::from_secs(3)).len(), 50, "nothing more in the old topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_requiring_sasl_gets_the_credentials_and_refuses_wrong_ones() {
    let kafka = tokio::task::spawn_blocking(|| KafkaBroker::start_sasl("shop", "shop-secret")).await.unwrap();
    kafka.create_topic("secured", 1);
    let config = |password: &str| {
        format!(
            "{}{}",
            middleware(
                &kafka,
                &format!(
                    "      sasl: {{mechanism: PLAIN, username: {{value: shop}}, password: {{value: '{password}'}}}}\n"
                )
            ),
            event_route(
                "secured-in",
                "  source: {http: {path: /events/secured}}\n  destination: {kafka: {topic: secured}}\n"
            )
        )
    };
    let wrong = Gateway::start(&config("wrong-secret")).await;
    eventually("kafka Down with an authentication error", Duration::from_secs(30), || async {
        let status = wrong.status().await;
        status["components"].as_array().unwrap().iter().any(|c| {
            c["name"] == "kafka"
                && c["state"] == "Down"
                && c["message"].as_str().unwrap_or("").contains("authentication")
        })
    })
    .await;
    let refused = post_json(&wrong.url("/events/secured"), &[], r#"{"n": 1}"#).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text());
    drop(wrong);

    let gw = Gateway::start(&config("shop-secret")).await;
    kafka_up(&gw).await;
    let reply = post_json(&gw.url("/events/secured"), &[], r#"{"n": 2}"#).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let records = kafka.read("secured", 1, Duration::from_secs(20));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].header("ce_id").as_deref(), reply.json()["id"].as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_pauses_its_partition_and_gets_every_event_in_order() {
    const EVENTS: usize = 1_500;
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    kafka.create_topic("slow", 1);
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let app = Router::new()
        .route(
            "/slow",
            post(|State(seen): State<Arc<Mutex<Vec<i64>>>>, body: Bytes| async move {
                tokio::time::sleep(Duration::from_millis(3)).await;
                let n = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["n"].as_i64().unwrap();
                seen.lock().unwrap().push(n);
                StatusCode::NO_CONTENT
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/slow", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let bootstrap = kafka.bootstrap();
    tokio::task::spawn_blocking(move || {
        umw_tests::kafka::produce(&bootstrap, "slow", EVENTS, 1, |i| format!(r#"{{"n": {i}}}"#))
    })
    .await
    .unwrap();
    let yaml = format!(
        "{}{}",
        middleware(&kafka, ""),
        event_route(
            "slow-out",
            &format!("  source: {{kafka: {{topic: slow}}}}\n  destination: {{http: {{url: '{url}'}}}}\n")
        )
    );
    let gw = Gateway::start(&yaml).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while seen.lock().unwrap().len() < EVENTS {
        assert!(std::time::Instant::now() < deadline, "{} of {EVENTS} delivered", seen.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in the partition's order, each once");
    assert!(
        gw.metric("umw_events_partitions_paused_total", &["event_route=\"slow-out\""]).await >= 1.0,
        "the partition was paused while its worker was behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_behind_tls_with_a_private_authority_is_reached_with_its_ca_certificate() {
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start_tls).await.unwrap();
    kafka.create_topic("private", 1);
    let ca: String = kafka.ca_cert.as_deref().unwrap().lines().map(|l| format!("          {l}\n")).collect();
    let config = |ca: &str| {
        format!(
            "{}{}",
            middleware(&kafka, &format!("      tls: true\n{ca}")),
            event_route(
                "private-in",
                "  source: {http: {path: /events/private}}\n  destination: {kafka: {topic: private}}\n"
            )
        )
    };
    // Without the authority, the broker's certificate is not trusted: Down, and ingest answers 503.
    let untrusting = Gateway::start(&config("")).await;
    eventually("kafka Down without the authority", Duration::from_secs(30), || async {
        let status = untrusting.status().await;
        status["components"].as_array().unwrap().iter().any(|c| c["name"] == "kafka" && c["state"] == "Down")
    })
    .await;
    assert_eq!(post_json(&untrusting.url("/events/private"), &[], "{}").await.status, StatusCode::SERVICE_UNAVAILABLE);
    drop(untrusting);

    let gw = Gateway::start(&config(&format!("      caCert:\n        value: |\n{ca}"))).await;
    kafka_up(&gw).await;
    let reply = post_json(&gw.url("/events/private"), &[], r#"{"n": 1}"#).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    assert_eq!(kafka.read("private", 1, Duration::from_secs(20)).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_named_and_a_client_id_is_kept() {
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    kafka.create_topic("present", 1);
    let yaml = format!(
        "{}{}{}",
        middleware(&kafka, "      producer: {deliveryTimeout: 2s}\n"),
        event_route(
            "to-present",
            "  source: {http: {path: /events/present}}\n  destination: {kafka: {topic: present}}\n"
        ),
        event_route(
            "to-missing",
            "  source: {http: {path: /events/missing}}\n  destination: {kafka: {topic: missing}}\n"
        )
    );
    let gw = Gateway::start(&yaml).await;
    kafka_up(&gw).await;
    // A plain JSON body keeps the client's ce-id, so that a retry can be recognized downstream.
    let reply = post_json(&gw.url("/events/present"), &[("ce-id", "client-id-1")], r#"{"n": 1}"#).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    assert_eq!(reply.json()["id"], "client-id-1");
    let missing = post_json(&gw.url("/events/missing"), &[], r#"{"n": 1}"#).await;
    assert_eq!(missing.status, StatusCode::SERVICE_UNAVAILABLE, "{}", missing.text());
    assert!(missing.text().contains("topic missing does not exist"), "{}", missing.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_in_flight_ingest_answers_503_with_retry_after_at_once() {
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await.unwrap();
    kafka.create_topic("bounded", 1);
    let yaml = format!(
        "{}{}",
        middleware(&kafka, "      producer: {maxInFlight: 2, linger: 50ms}\n"),
        event_route(
            "bounded-in",
            "  source: {http: {path: /events/bounded}}\n  destination: {kafka: {topic: bounded}}\n"
        )
    );
    let gw = Gateway::start(&yaml).await;
    kafka_up(&gw).await;
    let url = gw.url("/events/bounded");
    let replies = futures::future::join_all((0..40).map(|i| {
        let url = url.clone();
        async move { post_json(&url, &[], &format!(r#"{{"n": {i}}}"#)).await }
    }))
    .await;
    let accepted = replies.iter().filter(|r| r.status == StatusCode::ACCEPTED).count();
    let full: Vec<&support::Reply> = replies.iter().filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE).collect();
    assert!(accepted >= 2, "some got through: {accepted}");
    assert!(!full.is_empty(), "the bound pushed back");
    assert_eq!(accepted + full.len(), 40);
    assert_eq!(full[0].headers["retry-after"], "1");
    assert!(full[0].text().contains("already wait for the broker's acknowledgement"), "{}", full[0].text());
    assert!(gw.metric("umw_events_published_total", &["outcome=\"full\""]).await >= 1.0);
    assert_eq!(
        kafka.read("bounded", accepted + 1, Duration::from_secs(5)).len(),
        accepted,
        "exactly the accepted ones"
    );
}
