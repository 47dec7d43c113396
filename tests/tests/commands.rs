//! Commands and the transactional outbox against a real PostgreSQL and a real Apache Kafka broker.

#[path = "../../dataplane/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::{Gateway, eventually, get, send};
use umw_tests::{KafkaBroker, PostgresServer};

async fn servers() -> (PostgresServer, KafkaBroker) {
    let pg = tokio::task::spawn_blocking(PostgresServer::start);
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start);
    (pg.await.unwrap(), kafka.await.unwrap())
}

/// A Middleware with PostgreSQL and Kafka connections and these commands (YAML list items) and extra spec.
fn middleware(pg: &PostgresServer, kafka: &KafkaBroker, commands: &str, extra: &str) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cmd}}\nspec:\n  connections:\n    postgres:\n      url: {{value: '{}'}}\n    kafka:\n      bootstrapServers: {{value: '{}'}}\n  commands:\n{commands}{extra}",
        pg.url(),
        kafka.bootstrap()
    )
}

const PLACE_ORDER: &str = "    - name: place-order\n      schema: {type: object, required: [orderId, sku], properties: {orderId: {type: string}, sku: {type: string}, quantity: {type: integer, minimum: 1}}}\n      event: {type: com.example.order.placed, topic: orders, keyTemplate: '{{ data.orderId }}'}\n";

async fn post_command(gw: &Gateway, name: &str, key: Option<&str>, body: &str) -> support::Reply {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(key) = key {
        headers.push(("idempotency-key", key));
    }
    send(Method::POST, &gw.url(&format!("/commands/{name}")), &headers, Bytes::from(body.to_string())).await
}

async fn postgres_up(gw: &Gateway) {
    eventually("the postgres component up", Duration::from_secs(30), || async {
        let status = gw.status().await;
        status["components"].as_array().unwrap().iter().any(|c| c["name"] == "postgres" && c["state"] == "Up")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_recorded_with_its_event_and_relayed_to_kafka_with_idempotent_replays() {
    let (pg, kafka) = servers().await;
    kafka.create_topic("orders", 3);
    let gw = Gateway::start(&middleware(&pg, &kafka, PLACE_ORDER, "")).await;
    postgres_up(&gw).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = r#"{"orderId": "o-1", "sku": "tea", "quantity": 2}"#;
    let reply = send(
        Method::POST,
        &gw.url("/commands/place-order"),
        &[("content-type", "application/json"), ("idempotency-key", "k-1"), ("traceparent", traceparent)],
        Bytes::from(body),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let accepted = reply.json();
    let id = accepted["id"].as_str().unwrap().to_string();
    let event_id = accepted["events"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(accepted["state"], "accepted");
    assert_eq!(accepted["statusUrl"], format!("/commands/{id}"));
    assert_eq!(reply.headers["location"], format!("/commands/{id}").as_str());

    // Committed in PostgreSQL before the 202: the command and its event.
    assert_eq!(pg.sql(&format!("SELECT state FROM umw_commands WHERE id = '{id}'")), "accepted");
    assert_eq!(pg.sql(&format!("SELECT count(*) FROM umw_outbox WHERE command_id = '{id}'")), "1");

    // Relayed to Kafka: a CloudEvent keyed by the order id, continuing the request's trace.
    let records = kafka.read("orders", 1, Duration::from_secs(20));
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.header("ce_id").as_deref(), Some(event_id.as_str()));
    assert_eq!(record.header("ce_type").as_deref(), Some("com.example.order.placed"));
    assert_eq!(record.header("ce_source").as_deref(), Some("/commands/place-order"));
    assert_eq!(record.header("ce_commandid").as_deref(), Some(id.as_str()));
    assert!(record.header("ce_time").is_some());
    assert!(record.header("ce_traceparent").unwrap().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert_eq!(record.key.as_deref(), Some(&b"o-1"[..]));
    let data: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
    assert_eq!(data["quantity"], 2);

    // Its state: published, once the relay marked it.
    eventually("the command published", Duration::from_secs(10), || async {
        get(&gw.url(&format!("/commands/{id}"))).await.json()["state"] == "published"
    })
    .await;
    let state = get(&gw.url(&format!("/commands/{id}"))).await.json();
    assert_eq!(state["command"], "place-order");
    assert_eq!(state["events"][0]["id"], event_id.as_str());
    assert_eq!(state["events"][0]["state"], "published");

    // The same key and body: the original answer, nothing recorded twice.
    let replay = post_command(&gw, "place-order", Some("k-1"), body).await;
    assert_eq!(replay.status, StatusCode::ACCEPTED);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.json()["id"], id.as_str());
    assert_eq!(pg.sql("SELECT count(*) FROM umw_outbox"), "1");
    // The same key with another body: 409.
    let conflict = post_command(&gw, "place-order", Some("k-1"), r#"{"orderId": "o-1", "sku": "coffee"}"#).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT, "{}", conflict.text());
    assert_eq!(conflict.json()["type"], "https://umw.dev/problems/idempotency-key-reused");

    // Bad input: each schema violation with its pointer; not JSON; unknown command and id.
    let invalid = post_command(&gw, "place-order", None, r#"{"orderId": 7, "quantity": 0}"#).await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", invalid.text());
    let pointers: Vec<String> = invalid.json()["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap().to_string())
        .collect();
    assert!(pointers.contains(&"/orderId".to_string()) && pointers.contains(&"/quantity".to_string()), "{pointers:?}");
    assert!(invalid.text().contains("sku"), "the missing property is named: {}", invalid.text());
    let not_json = post_command(&gw, "place-order", None, "{nope").await;
    assert_eq!(not_json.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", not_json.text());
    let unknown = get(&gw.url("/commands/0190a2f4-0000-7000-8000-000000000000")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.json()["type"], "https://umw.dev/problems/command-not-found");
    let spaced = post_command(&gw, "place-order", Some("a b"), r#"{"orderId": "o-1", "sku": "tea"}"#).await;
    assert_eq!(spaced.status, StatusCode::BAD_REQUEST, "a key of visible characters only: {}", spaced.text());
    let bad_id = get(&gw.url("/commands/not-an-id")).await;
    assert_eq!(bad_id.status, StatusCode::NOT_FOUND);
    assert_eq!(gw.metric("umw_gateway_errors_total", &["route=\"commands-status\"", "kind=\"not_found\""]).await, 2.0);
    assert!(invalid.json()["detail"].as_str().unwrap().contains("schema of command place-order"), "{}", invalid.text());
    assert_eq!(
        gw.metric("umw_commands_total", &["command=\"place-order\"", "outcome=\"invalid\""]).await,
        3.0,
        "two bodies the schema refuses and a bad key"
    );
    assert_eq!(pg.sql("SELECT count(*) FROM umw_commands"), "1", "nothing recorded for bad input");

    // Without a key: every request is a new command.
    for _ in 0..2 {
        let reply = post_command(&gw, "place-order", None, r#"{"orderId": "o-2", "sku": "tea"}"#).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
    }
    assert_eq!(kafka.read("orders", 3, Duration::from_secs(20)).len(), 3);
    assert!(gw.metric("umw_commands_total", &["command=\"place-order\"", "outcome=\"accepted\""]).await >= 3.0);
    assert_eq!(gw.metric("umw_commands_total", &["outcome=\"replayed\""]).await, 1.0);
    assert_eq!(gw.metric("umw_commands_total", &["outcome=\"conflict\""]).await, 1.0);
    eventually("outbox metrics", Duration::from_secs(10), || async {
        gw.metric("umw_outbox_published_total", &["table=\"umw_outbox\""]).await == 3.0
            && gw.metric("umw_outbox_depth", &["table=\"umw_outbox\""]).await == 0.0
    })
    .await;
}

/// What a stream of commands got.
#[derive(Default)]
struct Sent {
    /// `(command id, key, sequence number within the key)` of every command answered 202.
    accepted: std::sync::Mutex<Vec<(String, String, u64)>>,
    attempts: std::sync::atomic::AtomicUsize,
    /// The first few answers other than 202, for the test's output.
    answers: std::sync::Mutex<Vec<String>>,
    /// Requests answered otherwise (503 while a server is down) or not answered (connection refused).
    failed: std::sync::atomic::AtomicUsize,
}

impl Sent {
    fn accepted(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

/// Sends `total` `place-order` commands from `keys` senders, round-robin over `urls`. Each sender sends
/// its key's commands one after another, so the order of a key's accepted commands is the order they were
/// recorded in.
async fn stream(urls: Vec<String>, keys: usize, total: usize, sent: std::sync::Arc<Sent>) {
    use std::sync::atomic::Ordering;
    let urls = std::sync::Arc::new(urls);
    let client = support::client();
    let senders = (0..keys).map(|k| {
        let (urls, sent, client) = (urls.clone(), sent.clone(), client.clone());
        async move {
            let key = format!("k{k}");
            let mut seq = 0u64;
            loop {
                let n = sent.attempts.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return;
                }
                let body = format!(r#"{{"orderId": "{key}", "sku": "tea", "seq": {seq}}}"#);
                let request = http::Request::builder()
                    .method(Method::POST)
                    .uri(format!("{}/commands/place-order", urls[n % urls.len()]))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(Bytes::from(body)))
                    .unwrap();
                let answer = tokio::time::timeout(Duration::from_secs(30), client.request(request)).await;
                match answer {
                    Ok(Ok(response)) if response.status() == StatusCode::ACCEPTED => {
                        use http_body_util::BodyExt as _;
                        let body = response.into_body().collect().await.unwrap().to_bytes();
                        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let id = json["id"].as_str().unwrap().to_string();
                        sent.accepted.lock().unwrap().push((id, key.clone(), seq));
                    }
                    other => {
                        let answer = match other {
                            Ok(Ok(response)) => {
                                use http_body_util::BodyExt as _;
                                let status = response.status();
                                let body =
                                    response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                format!("{status} {}", String::from_utf8_lossy(&body))
                            }
                            Ok(Err(error)) => format!("error: {error}"),
                            Err(_) => "no answer within 30 s".into(),
                        };
                        {
                            let mut answers = sent.answers.lock().unwrap();
                            if answers.len() < 5 {
                                answers.push(answer);
                            }
                        }
                        sent.failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                seq += 1;
            }
        }
    });
    futures::future::join_all(senders).await;
}

/// Reads the whole topic once the outbox has drained and checks the accepted commands against it: every
/// one present (returns the number of records and of duplicates), and per key in the order sent.
async fn check_delivered(pg: &PostgresServer, kafka: &KafkaBroker, topic: &str, sent: &Sent) -> (usize, usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while pg.sql("SELECT count(*) FROM umw_outbox WHERE published_at IS NULL") != "0" {
        assert!(std::time::Instant::now() < deadline, "the outbox did not drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let records = kafka.read(topic, usize::MAX, Duration::from_secs(8));
    let accepted = sent.accepted.lock().unwrap().clone();
    let by_command: std::collections::HashMap<&str, (&str, u64)> =
        accepted.iter().map(|(id, key, seq)| (id.as_str(), (key.as_str(), *seq))).collect();
    let mut seen = std::collections::HashSet::new();
    let mut last: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut duplicates = 0;
    for record in &records {
        let event = record.header("ce_id").unwrap();
        if !seen.insert(event) {
            duplicates += 1;
            continue;
        }
        let command = record.header("ce_commandid").unwrap();
        if let Some(&(key, seq)) = by_command.get(command.as_str()) {
            assert_eq!(record.key.as_deref(), Some(key.as_bytes()));
            if let Some(previous) = last.insert(key, seq) {
                assert!(seq > previous, "key {key}: seq {seq} published after {previous}");
            }
        }
    }
    let published: std::collections::HashSet<String> =
        records.iter().filter_map(|r| r.header("ce_commandid")).collect();
    let lost: Vec<&String> = accepted.iter().map(|(id, _, _)| id).filter(|id| !published.contains(*id)).collect();
    assert!(lost.is_empty(), "{} of {} accepted commands have no event in Kafka", lost.len(), accepted.len());
    (records.len(), duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_killed_while_commands_stream_in_loses_no_accepted_command() {
    use std::sync::atomic::Ordering;
    const COMMANDS: usize = 10_000;
    let (pg, kafka) = servers().await;
    kafka.create_topic("orders", 3);
    let dir = std::env::temp_dir().join(format!("umw-cmd-kill-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.yaml"), middleware(&pg, &kafka, PLACE_ORDER, "")).unwrap();
    let mut dataplane = umw_tests::DataPlaneProcess::start(&dir.join("config.yaml"), &dir.join("dataplane.log"));
    let status = format!("http://{}/status", dataplane.admin);
    eventually("the data plane with postgres up", Duration::from_secs(60), || async {
        let client = support::client();
        let request = http::Request::get(&status).body(http_body_util::Full::new(Bytes::new())).unwrap();
        match client.request(request).await {
            Ok(response) => {
                use http_body_util::BodyExt as _;
                let body = response.into_body().collect().await.unwrap().to_bytes();
                String::from_utf8_lossy(&body).contains(r#""name":"postgres","state":"Up""#)
            }
            Err(_) => false,
        }
    })
    .await;

    let sent = std::sync::Arc::new(Sent::default());
    let load = tokio::spawn(stream(vec![dataplane.url("")], 32, COMMANDS, sent.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while sent.accepted() < COMMANDS / 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "too few commands accepted: {}\n{}",
            sent.accepted(),
            dataplane.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SIGKILL while commands stream in and the relay publishes.
    dataplane.kill();
    let at_kill = sent.accepted();
    tokio::time::sleep(Duration::from_millis(500)).await;
    dataplane.restart();
    load.await.unwrap();
    let (records, duplicates) = check_delivered(&pg, &kafka, "orders", &sent).await;
    let committed: usize = pg.sql("SELECT count(*) FROM umw_outbox").parse().unwrap();
    println!(
        "kill -9 after {at_kill} accepted: {} commands sent, {} accepted (202), {} refused or unanswered, {committed} committed, {records} records in Kafka, lost 0, {duplicates} duplicates",
        COMMANDS,
        sent.accepted(),
        sent.failed.load(Ordering::Relaxed)
    );
    assert!(sent.accepted() > at_kill, "commands were accepted after the restart");
    assert!(committed >= sent.accepted(), "every accepted command was committed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_and_kafka_stopped_are_recovered_from_without_losing_commands() {
    use std::sync::atomic::Ordering;
    let (mut pg, mut kafka) = servers().await;
    kafka.create_topic("orders", 3);
    let gw = Gateway::start(&middleware(&pg, &kafka, PLACE_ORDER, "  outbox: {pollInterval: 200ms}\n")).await;
    postgres_up(&gw).await;

    // PostgreSQL crashes and comes back while commands stream in: refused meanwhile (503), then accepted
    // again without a restart of the data plane.
    let sent = std::sync::Arc::new(Sent::default());
    let load = tokio::spawn(stream(vec![gw.url("")], 8, 3_000, sent.clone()));
    while sent.accepted() < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pg.crash();
    let refused = send(
        Method::POST,
        &gw.url("/commands/place-order"),
        &[("content-type", "application/json")],
        Bytes::from(r#"{"orderId": "x", "sku": "y"}"#),
    )
    .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text());
    assert!(refused.headers.contains_key("retry-after"));
    eventually("postgres reported down", Duration::from_secs(20), || async {
        let status = gw.status().await;
        status["components"].as_array().unwrap().iter().any(|c| c["name"] == "postgres" && c["state"] == "Down")
    })
    .await;
    pg = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(2));
        pg.restart();
        pg
    })
    .await
    .unwrap();
    load.await.unwrap();
    assert!(sent.failed.load(Ordering::Relaxed) > 0, "some commands were refused while PostgreSQL was down");
    let (_, duplicates) = check_delivered(&pg, &kafka, "orders", &sent).await;
    println!(
        "postgres restarted: {} accepted, {} refused, {duplicates} duplicates",
        sent.accepted(),
        sent.failed.load(Ordering::Relaxed)
    );
    postgres_up(&gw).await;

    // Kafka stops: commands are still accepted, the outbox grows; it drains once the broker is back.
    kafka.kill();
    let before: usize = pg.sql("SELECT count(*) FROM umw_outbox").parse().unwrap();
    for i in 0..200 {
        let reply =
            post_command(&gw, "place-order", None, &format!(r#"{{"orderId": "kafka-down-{}", "sku": "tea"}}"#, i % 10))
                .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    }
    eventually("the outbox depth shows the backlog", Duration::from_secs(20), || async {
        gw.metric("umw_outbox_depth", &["table=\"umw_outbox\""]).await >= 200.0
    })
    .await;
    assert!(gw.metric("umw_outbox_oldest_age_seconds", &["table=\"umw_outbox\""]).await > 0.0, "the backlog ages");
    assert_eq!(pg.sql("SELECT count(*) FROM umw_outbox WHERE published_at IS NULL"), "200");
    assert_eq!(pg.sql("SELECT count(*) FROM umw_outbox_dead"), "0", "an unavailable broker dead-letters nothing");
    kafka = tokio::task::spawn_blocking(move || {
        kafka.restart();
        kafka
    })
    .await
    .unwrap();
    eventually("the outbox drained", Duration::from_secs(90), || async {
        pg.sql("SELECT count(*) FROM umw_outbox WHERE published_at IS NULL") == "0"
    })
    .await;
    let records = kafka.read("orders", usize::MAX, Duration::from_secs(8));
    let after: std::collections::HashSet<String> = records
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.value).contains("kafka-down-"))
        .filter_map(|r| r.header("ce_id"))
        .collect();
    assert_eq!(after.len(), 200, "every command accepted while Kafka was down is published ({before} before)");
    eventually("depth back to 0", Duration::from_secs(10), || async {
        gw.metric("umw_outbox_depth", &["table=\"umw_outbox\""]).await == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_table_publish_each_event_once_and_keep_each_keys_order() {
    let (pg, kafka) = servers().await;
    kafka.create_topic("orders", 3);
    let yaml = middleware(&pg, &kafka, PLACE_ORDER, "  outbox: {batchSize: 100}\n");
    let a = Gateway::start(&yaml).await;
    let b = Gateway::start(&yaml).await;
    postgres_up(&a).await;
    postgres_up(&b).await;
    let sent = std::sync::Arc::new(Sent::default());
    stream(vec![a.url(""), b.url("")], 16, 4_000, sent.clone()).await;
    let (records, duplicates) = check_delivered(&pg, &kafka, "orders", &sent).await;
    let by_a = a.metric("umw_outbox_published_total", &["table=\"umw_outbox\""]).await;
    let by_b = b.metric("umw_outbox_published_total", &["table=\"umw_outbox\""]).await;
    println!(
        "two relays: {} accepted, {records} records, relayed {by_a} + {by_b}, {duplicates} duplicates; other answers: {:?}",
        sent.accepted(),
        sent.answers.lock().unwrap()
    );
    assert_eq!(sent.accepted(), 4_000, "every command accepted: {:?}", sent.answers.lock().unwrap());
    assert_eq!(duplicates, 0, "no event published twice in normal operation");
    assert_eq!(records, sent.accepted());
    assert_eq!(by_a + by_b, sent.accepted() as f64);
    assert!(by_a > 0.0 && by_b > 0.0, "both relays published: {by_a} + {by_b}");
}

/// A command handler: refuses `sku: none` (409), fails on `sku: boom` (500), accepts the rest with a result.
async fn start_handler() -> String {
    use axum::routing::post;
    async fn handle(body: Bytes) -> (StatusCode, String) {
        let command: serde_json::Value = serde_json::from_slice(&body).unwrap();
        match command["sku"].as_str() {
            Some("none") => (StatusCode::CONFLICT, r#"{"reason": "out of stock"}"#.into()),
            Some("boom") => (StatusCode::INTERNAL_SERVER_ERROR, "broken".into()),
            _ => (StatusCode::OK, format!(r#"{{"reserved": "{}"}}"#, command["orderId"].as_str().unwrap())),
        }
    }
    let app = axum::Router::new().route("/commands/place-order", post(handle));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_accepts_or_rejects_commands_and_events_kafka_refuses_are_dead_lettered() {
    let (pg, kafka) = servers().await;
    kafka.create_topic("orders", 1);
    let handler = start_handler().await;
    let commands = format!(
        "    - name: place-order\n      event: {{type: com.example.order.placed, topic: orders, keyTemplate: '{{{{ data.orderId }}}}'}}\n      handler: {{url: '{handler}'}}\n      maxBodyBytes: 3000000\n"
    );
    let gw =
        Gateway::start(&middleware(&pg, &kafka, &commands, "  outbox: {maxAttempts: 3, adminToken: {value: d34d}}\n"))
            .await;
    postgres_up(&gw).await;

    // Accepted by the handler: its answer is the command's result.
    let ok = post_command(&gw, "place-order", None, r#"{"orderId": "o-1", "sku": "tea"}"#).await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.text());
    assert_eq!(ok.json()["result"]["reserved"], "o-1");
    let id = ok.json()["id"].as_str().unwrap().to_string();
    eventually("published", Duration::from_secs(10), || async {
        get(&gw.url(&format!("/commands/{id}"))).await.json()["state"] == "published"
    })
    .await;
    assert_eq!(get(&gw.url(&format!("/commands/{id}"))).await.json()["result"]["reserved"], "o-1");

    // Refused by the handler: its answer, remembered for a replay, and no event.
    let refused = post_command(&gw, "place-order", Some("r-1"), r#"{"orderId": "o-2", "sku": "none"}"#).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.text());
    assert_eq!(refused.json()["reason"], "out of stock");
    let again = post_command(&gw, "place-order", Some("r-1"), r#"{"orderId": "o-2", "sku": "none"}"#).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let rejected_at = again.headers["location"].to_str().unwrap().to_string();
    assert_eq!(get(&gw.url(&rejected_at)).await.json()["state"], "rejected");
    assert_eq!(pg.sql("SELECT count(*) FROM umw_commands WHERE state = 'rejected'"), "1");
    // The handler fails: 502, nothing recorded, and the same key may be sent again.
    let failed = post_command(&gw, "place-order", Some("f-1"), r#"{"orderId": "o-3", "sku": "boom"}"#).await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY, "{}", failed.text());
    assert_eq!(pg.sql("SELECT count(*) FROM umw_commands WHERE idempotency_key = 'f-1'"), "0");
    assert_eq!(pg.sql("SELECT count(*) FROM umw_outbox"), "1");

    // An event larger than the producer takes: dead-lettered at once, the next event of its key goes on.
    let big = format!(r#"{{"orderId": "o-9", "sku": "tea", "note": "{}"}}"#, "x".repeat(1_500_000));
    let too_big = post_command(&gw, "place-order", None, &big).await;
    assert_eq!(too_big.status, StatusCode::ACCEPTED, "{}", too_big.text());
    let big_id = too_big.json()["id"].as_str().unwrap().to_string();
    let next = post_command(&gw, "place-order", None, r#"{"orderId": "o-9", "sku": "tea", "n": 2}"#).await;
    assert_eq!(next.status, StatusCode::ACCEPTED);
    eventually("the large event dead-lettered", Duration::from_secs(20), || async {
        get(&gw.url(&format!("/commands/{big_id}"))).await.json()["state"] == "failed"
    })
    .await;
    let state = get(&gw.url(&format!("/commands/{big_id}"))).await.json();
    assert!(state["events"][0]["lastError"].as_str().unwrap().contains("message.max.bytes"), "{state}");
    let dead_url = format!("http://{}/outbox/dead", gw.admin);
    let unauthorized = send(Method::GET, &dead_url, &[], Bytes::new()).await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED, "the rows carry business data: a token is needed");
    let wrong = send(Method::GET, &dead_url, &[("authorization", "Bearer nope")], Bytes::new()).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let token = [("authorization", "Bearer d34d")];
    let dead = send(Method::GET, &dead_url, &token, Bytes::new()).await.json();
    assert_eq!(dead["rows"].as_array().unwrap().len(), 1, "{dead}");
    assert_eq!(dead["rows"][0]["table"], "umw_outbox");
    assert_eq!(dead["rows"][0]["key"], "o-9");
    let bad_limit = send(Method::GET, &format!("{dead_url}?limit=0"), &token, Bytes::new()).await;
    assert_eq!(bad_limit.status, StatusCode::BAD_REQUEST);
    assert_eq!(gw.metric("umw_outbox_dead_lettered_total", &["table=\"umw_outbox\""]).await, 1.0);
    let records = kafka.read("orders", 2, Duration::from_secs(20));
    assert_eq!(records.len(), 2, "o-1 and the event after the dead-lettered one");
    assert!(String::from_utf8_lossy(&records[1].value).contains(r#""n": 2"#), "the body as sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_outbox_table_is_relayed_in_order_per_aggregate() {
    let (pg, kafka) = servers().await;
    kafka.create_topic("shop-events", 3);
    pg.sql(
        "CREATE TABLE shop_outbox (seq bigserial, id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, headers jsonb)",
    );
    pg.sql("CREATE INDEX ON shop_outbox (aggregateid, seq)");
    let yaml = format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cmd}}\nspec:\n  connections:\n    postgres: {{url: {{value: '{}'}}}}\n    kafka: {{bootstrapServers: {{value: '{}'}}}}\n  outbox: {{pollInterval: 100ms}}\n---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {{name: shop-outbox, namespace: cmd}}\nspec:\n  targetRefs: [{{name: shop}}]\n  source: {{outbox: {{table: shop_outbox, columns: {{position: seq, headers: headers}}}}}}\n  destination: {{kafka: {{topic: shop-events}}}}\n",
        pg.url(),
        kafka.bootstrap()
    );
    let gw = Gateway::start(&yaml).await;
    postgres_up(&gw).await;
    let status = gw.status().await;
    let policy = status["policies"].as_array().unwrap().iter().find(|p| p["name"] == "shop-outbox").unwrap().clone();
    assert_eq!(policy["enforced"], true, "{policy}");
    // The application writes its outbox rows in its own transactions.
    for batch in 0..5 {
        pg.sql(&format!(
            "INSERT INTO shop_outbox (aggregatetype, aggregateid, type, payload, headers)
             SELECT 'order', 'order-' || (n % 10), 'OrderUpdated', jsonb_build_object('n', n), jsonb_build_object('tenant', 'acme')
             FROM generate_series({}, {}) AS n",
            batch * 200,
            batch * 200 + 199
        ));
    }
    let records = kafka.read("shop-events", 1000, Duration::from_secs(30));
    assert_eq!(records.len(), 1000);
    let mut last: std::collections::HashMap<Vec<u8>, i64> = std::collections::HashMap::new();
    for record in &records {
        let data: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        let n = data["n"].as_i64().unwrap();
        let key = record.key.clone().unwrap();
        assert_eq!(String::from_utf8_lossy(&key), format!("order-{}", n % 10));
        if let Some(previous) = last.insert(key, n) {
            assert!(n > previous, "per aggregate order: {n} after {previous}");
        }
        assert_eq!(record.header("ce_type").as_deref(), Some("OrderUpdated"));
        assert_eq!(record.header("ce_source").as_deref(), Some("/order"));
        assert_eq!(record.header("tenant").as_deref(), Some("acme"), "the headers column");
    }
    let first = &records[0];
    let id = first.header("ce_id").unwrap();
    assert_eq!(id.len(), 36, "the row's id is the event id: {id}");
    eventually("published rows deleted", Duration::from_secs(10), || async {
        pg.sql("SELECT count(*) FROM shop_outbox") == "0"
    })
    .await;
    assert_eq!(gw.metric("umw_outbox_published_total", &["table=\"public.shop_outbox\""]).await, 1000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_is_trusted_through_the_private_authority_only() {
    let pg = tokio::task::spawn_blocking(PostgresServer::start_tls);
    let kafka = tokio::task::spawn_blocking(KafkaBroker::start);
    let (pg, kafka) = (pg.await.unwrap(), kafka.await.unwrap());
    kafka.create_topic("orders", 1);
    let ca = pg.ca_cert.clone().unwrap().replace('\n', "\\n");
    let with_ca = middleware(&pg, &kafka, PLACE_ORDER, "")
        .replace("      url: {value: '", &format!("      caCert: {{value: \"{ca}\"}}\n      url: {{value: '"));
    let gw = Gateway::start(&with_ca).await;
    postgres_up(&gw).await;
    let reply = post_command(&gw, "place-order", None, r#"{"orderId": "o-1", "sku": "tea"}"#).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    assert_eq!(kafka.read("orders", 1, Duration::from_secs(20)).len(), 1);

    // Verifying the server without the authority fails, and says why.
    let url = format!("{}?sslmode=verify-full", pg.url());
    let without = middleware(&pg, &kafka, PLACE_ORDER, "").replace(&pg.url(), &url);
    let untrusted = Gateway::start(&without).await;
    eventually("postgres down, naming the certificate", Duration::from_secs(30), || async {
        let status = untrusted.status().await;
        status["components"].as_array().unwrap().iter().any(|c| {
            c["name"] == "postgres"
                && c["state"] == "Down"
                && c["message"].as_str().unwrap_or("").contains("certificate")
        })
    })
    .await;
    let refused = post_command(&untrusted, "place-order", None, r#"{"orderId": "o-2", "sku": "tea"}"#).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text());
    assert!(!refused.text().contains(umw_tests::postgres::PASSWORD), "no credentials in answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_and_expired_commands_are_cleaned_up_after_their_retention() {
    let (pg, kafka) = servers().await;
    kafka.create_topic("orders", 1);
    let commands = PLACE_ORDER.to_string() + "      idempotency: {ttl: 3s}\n";
    let gw = Gateway::start(&middleware(&pg, &kafka, &commands, "  outbox: {retention: 4s}\n")).await;
    postgres_up(&gw).await;
    for i in 0..20 {
        let reply = post_command(
            &gw,
            "place-order",
            Some(&format!("c-{i}")),
            &format!(r#"{{"orderId": "o-{i}", "sku": "tea"}}"#),
        )
        .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
    }
    assert_eq!(kafka.read("orders", 20, Duration::from_secs(20)).len(), 20);
    assert_eq!(pg.sql("SELECT count(*) FROM umw_outbox"), "20", "published rows stay for their retention");
    eventually("published rows and expired commands deleted", Duration::from_secs(30), || async {
        pg.sql("SELECT count(*) FROM umw_outbox") == "0" && pg.sql("SELECT count(*) FROM umw_commands") == "0"
    })
    .await;
    assert_eq!(gw.metric("umw_outbox_cleaned_total", &["table=\"umw_outbox\""]).await, 40.0);
    // An expired key is a new command.
    let again = post_command(&gw, "place-order", Some("c-0"), r#"{"orderId": "o-0", "sku": "coffee"}"#).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text());
    assert!(!again.headers.contains_key("idempotent-replayed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_its_timeout_is_cancelled_and_the_command_answered_503() {
    let (pg, kafka) = servers().await;
    kafka.create_topic("orders", 1);
    let config =
        middleware(&pg, &kafka, PLACE_ORDER, "").replace("      url: {", "      statementTimeout: 300ms\n      url: {");
    let gw = Gateway::start(&config).await;
    postgres_up(&gw).await;
    let first = post_command(&gw, "place-order", None, r#"{"orderId": "o-1", "sku": "tea"}"#).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text());

    // Another session holds the outbox table for a while: the command's insert waits for it until the
    // server cancels the statement.
    let holder = {
        let url = pg.url();
        std::thread::spawn(move || {
            std::process::Command::new("psql")
                .args([url.as_str(), "-X", "-q", "-v", "ON_ERROR_STOP=1"])
                .args(["-c", "BEGIN; LOCK TABLE umw_outbox IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(6); COMMIT;"])
                .output()
                .expect("running psql")
        })
    };
    eventually("the outbox table locked", Duration::from_secs(10), || async {
        pg.sql("SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND relation = 'umw_outbox'::regclass")
            == "1"
    })
    .await;
    // Without the timeout the insert would wait for the lock and be answered 202 once it is released.
    let cancelled = post_command(&gw, "place-order", None, r#"{"orderId": "o-2", "sku": "tea"}"#).await;
    assert_eq!(cancelled.status, StatusCode::SERVICE_UNAVAILABLE, "{}", cancelled.text());
    assert!(cancelled.headers.contains_key("retry-after"));
    assert_eq!(gw.metric("umw_commands_total", &["outcome=\"unavailable\""]).await, 1.0);
    assert!(gw.metric("umw_postgres_errors_total", &["operation=\"command\""]).await >= 1.0);
    assert_eq!(pg.sql("SELECT count(*) FROM umw_commands"), "1", "nothing of the cancelled command recorded");

    assert!(holder.join().unwrap().status.success());
    let after = post_command(&gw, "place-order", None, r#"{"orderId": "o-3", "sku": "tea"}"#).await;
    assert_eq!(after.status, StatusCode::ACCEPTED, "{}", after.text());
    assert_eq!(kafka.read("orders", 2, Duration::from_secs(20)).len(), 2);
}

/// A TCP forwarder to `target` that can turn into a black hole: connections it then accepts are held open
/// and never answered, and the ones it was forwarding are cut.
struct Forwarder {
    address: std::net::SocketAddr,
    black_hole: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let black_hole = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
        let switch = black_hole.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if *switch.borrow() {
                    held.push(client);
                    continue;
                }
                let target = target.clone();
                let mut cut = switch.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|hole| *hole) => {}
                    }
                });
            }
        });
        Self { address, black_hole, task }
    }

    fn black_hole(&self) {
        self.black_hole.send_replace(true);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_writer_gives_up_connecting_after_connect_timeout() {
    let (pg, kafka) = servers().await;
    kafka.create_topic("orders", 3);
    let forwarder = Forwarder::start(format!("{}:{}", pg.host, pg.port)).await;
    let url = pg.url().replace(&format!("{}:{}", pg.host, pg.port), &forwarder.address.to_string());
    let yaml = format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cmd}}\nspec:\n  connections:\n    postgres:\n      url: {{value: '{url}'}}\n      connectTimeout: 1s\n    kafka:\n      bootstrapServers: {{value: '{}'}}\n  commands:\n{PLACE_ORDER}",
        kafka.bootstrap()
    );
    let gw = Gateway::start(&yaml).await;
    postgres_up(&gw).await;
    let order = r#"{"orderId": "o-1", "sku": "tea"}"#;
    assert_eq!(post_command(&gw, "place-order", None, order).await.status, StatusCode::ACCEPTED);

    // The writer's connection is cut, and a new one would hang: each command is answered 503 within about
    // connectTimeout, not left to the route's 30 s timeout.
    forwarder.black_hole();
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let reply = post_command(&gw, "place-order", None, order).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        assert!(started.elapsed() < Duration::from_secs(10), "answered after {:?}", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_client_left_before_it_was_written_is_not_written() {
    let (pg, kafka) = servers().await;
    kafka.create_topic("orders", 3);
    // A small connection budget: one writer, so that the second command waits behind the first.
    let yaml = format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cmd}}\nspec:\n  connections:\n    postgres:\n      url: {{value: '{}'}}\n      maxConnections: 5\n    kafka:\n      bootstrapServers: {{value: '{}'}}\n  commands:\n{PLACE_ORDER}",
        pg.url(),
        kafka.bootstrap()
    );
    let gw = std::sync::Arc::new(Gateway::start(&yaml).await);
    postgres_up(&gw).await;
    let pg = std::sync::Arc::new(pg);
    // Hold the commands' table, so that the writer waits inside its statement.
    let lock = {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || {
            pg.sql("BEGIN; LOCK TABLE umw_commands IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT;")
        })
    };
    let locked = "SELECT count(*) FROM pg_locks WHERE relation = 'umw_commands'::regclass";
    eventually("the table locked", Duration::from_secs(10), || async {
        pg.sql(&format!("{locked} AND granted")) == "1"
    })
    .await;
    let first = {
        let gw = gw.clone();
        // Without idempotency keys: looking a key up would wait for the lock before the writer does.
        tokio::spawn(async move { post_command(&gw, "place-order", None, r#"{"orderId": "o-1", "sku": "tea"}"#).await })
    };
    eventually("the writer waiting for the lock", Duration::from_secs(10), || async {
        pg.sql(&format!("{locked} AND NOT granted")) != "0"
    })
    .await;
    // The second client gives up while its command waits for the writer.
    let second = tokio::time::timeout(
        Duration::from_millis(500),
        post_command(&gw, "place-order", None, r#"{"orderId": "o-2", "sku": "tea"}"#),
    )
    .await;
    assert!(second.is_err(), "the second command waited behind the first");
    lock.await.unwrap();
    assert_eq!(first.await.unwrap().status, StatusCode::ACCEPTED);
    eventually("the abandoned command counted", Duration::from_secs(10), || async {
        gw.metric("umw_commands_total", &["outcome=\"abandoned\""]).await == 1.0
    })
    .await;
    assert_eq!(pg.sql("SELECT count(*) FROM umw_commands"), "1", "only the answered command is written");
    assert_eq!(pg.sql("SELECT count(*) FROM umw_outbox"), "1", "and only its event");
}
