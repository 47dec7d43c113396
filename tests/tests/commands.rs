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
    let bad_id = get(&gw.url("/commands/not-an-id")).await;
    assert_eq!(bad_id.status, StatusCode::NOT_FOUND);
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
