//! The in-process event bus (`--in-process-backends`): the same event routes, filters, retries and
//! dead-letter topics as with Kafka, for a data plane running on its own. (The Kafka tests are in
//! `tests/tests/events.rs`, against a real broker.)

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use support::{Gateway, eventually, send};

type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

async fn webhook(status: StatusCode) -> (Received, String) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route(
            "/hook",
            post(
                |State((received, status)): State<(Received, StatusCode)>, headers: HeaderMap, body: Bytes| async move {
                    received.lock().unwrap().push((headers, body));
                    status
                },
            ),
        )
        .with_state((received.clone(), status));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (received, url)
}

fn config(good: &str, bad: &str) -> String {
    format!(
        r#"apiVersion: umw.dev/v1alpha1
kind: Middleware
metadata: {{name: shop, namespace: bus}}
spec:
  connections:
    kafka: {{bootstrapServers: {{value: 'unused:9092'}}}}
---
apiVersion: umw.dev/v1alpha1
kind: EventRoute
metadata: {{name: orders-in, namespace: bus}}
spec:
  targetRefs: [{{name: shop}}]
  source: {{http: {{path: /events/orders}}}}
  destination: {{kafka: {{topic: orders}}}}
---
apiVersion: umw.dev/v1alpha1
kind: EventRoute
metadata: {{name: paid-out, namespace: bus}}
spec:
  targetRefs: [{{name: shop}}]
  source: {{kafka: {{topic: orders}}}}
  destination: {{http: {{url: '{good}'}}}}
  filter: {{data: [{{pointer: /status, equals: '"paid"'}}]}}
---
apiVersion: umw.dev/v1alpha1
kind: EventRoute
metadata: {{name: broken-out, namespace: bus}}
spec:
  targetRefs: [{{name: shop}}]
  source: {{kafka: {{topic: orders}}}}
  destination: {{http: {{url: '{bad}'}}}}
  retry: {{maxAttempts: 2, initialBackoff: 10ms}}
  deadLetter: {{topic: orders-dlq}}
---
apiVersion: umw.dev/v1alpha1
kind: EventRoute
metadata: {{name: dlq-out, namespace: bus}}
spec:
  targetRefs: [{{name: shop}}]
  source: {{kafka: {{topic: orders-dlq}}}}
  destination: {{http: {{url: '{good}'}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_through_the_in_process_bus_with_filters_retries_and_dead_letters() {
    let (good, good_url) = webhook(StatusCode::OK).await;
    let (bad, bad_url) = webhook(StatusCode::INTERNAL_SERVER_ERROR).await;
    let gw = Gateway::start_in_process(&config(&good_url, &bad_url)).await;
    for status in ["paid", "open", "paid"] {
        let reply = send(
            Method::POST,
            &gw.url("/events/orders"),
            &[("content-type", "application/json"), ("ce-type", "order.updated")],
            Bytes::from(format!(r#"{{"status": "{status}"}}"#)),
        )
        .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
        assert_eq!(reply.json()["topic"], "orders");
    }
    // paid-out gets the two paid events; broken-out fails twice per event (2 attempts × 3 events) and
    // dead-letters each; dlq-out delivers the three dead letters to the good webhook.
    eventually("2 paid + 3 dead letters delivered", Duration::from_secs(10), || async {
        good.lock().unwrap().len() == 5
    })
    .await;
    assert_eq!(bad.lock().unwrap().len(), 6, "two attempts per event");
    let good = good.lock().unwrap().clone();
    let mut ids: Vec<String> = good.iter().map(|(h, _)| h["ce-id"].to_str().unwrap().to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "the dead letters are the original events, with their ids: {ids:?}");
    let paid = good
        .iter()
        .filter(|(_, body)| serde_json::from_slice::<serde_json::Value>(body).unwrap()["status"] == "paid")
        .count();
    assert_eq!(paid, 4, "two paid events, each delivered by paid-out and, dead-lettered, by dlq-out");
    assert_eq!(gw.metric("umw_events_handled_total", &["event_route=\"paid-out\"", "outcome=\"filtered\""]).await, 1.0);
    assert_eq!(
        gw.metric("umw_events_handled_total", &["event_route=\"broken-out\"", "outcome=\"dead_lettered\""]).await,
        3.0
    );
    // The policies say they are enforced.
    let status = gw.status().await;
    let policies = status["policies"].as_array().unwrap();
    assert!(policies.iter().filter(|p| p["kind"] == "EventRoute").all(|p| p["enforced"] == true), "{policies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_on_the_in_process_store_and_bus() {
    // The connections are named (a configuration for a cluster) but not contacted.
    let yaml = "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: shop, namespace: bus}\nspec:\n  connections:\n    postgres: {url: {value: 'postgres://nowhere.invalid/db'}}\n    kafka: {bootstrapServers: {value: 'nowhere.invalid:9092'}}\n  commands:\n    - name: place-order\n      schema: {type: object, required: [sku]}\n      event: {type: order.placed, topic: orders}\n---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {name: app-outbox, namespace: bus}\nspec:\n  targetRefs: [{name: shop}]\n  source: {outbox: {table: app_outbox}}\n  destination: {kafka: {topic: orders}}\n";
    // (An application's outbox table is not relayed without PostgreSQL, but the configuration loads.)
    let gw = Gateway::start_in_process(yaml).await;
    let post = |key: &'static str, body: &'static str| {
        let url = gw.url("/commands/place-order");
        async move {
            send(
                Method::POST,
                &url,
                &[("content-type", "application/json"), ("idempotency-key", key)],
                Bytes::from(body),
            )
            .await
        }
    };
    let accepted = post("a", r#"{"sku": "tea"}"#).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text());
    let id = accepted.json()["id"].as_str().unwrap().to_string();
    let replay = post("a", r#"{"sku": "tea"}"#).await;
    assert_eq!(replay.json()["id"], id.as_str());
    assert_eq!(post("a", r#"{"sku": "coffee"}"#).await.status, StatusCode::CONFLICT);
    assert_eq!(post("b", r#"{}"#).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    eventually("published on the bus", Duration::from_secs(10), || async {
        support::get(&gw.url(&format!("/commands/{id}"))).await.json()["state"] == "published"
    })
    .await;
}
