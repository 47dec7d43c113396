//! A small shop API to put behind the data plane on a laptop (`make run` starts it).
//!
//! ```text
//! cargo run -p umw-dataplane --example demo-upstream -- 127.0.0.1:9080
//! ```
//!
//! `GET /products`, `GET /products/{id}`, `POST /orders` (echoes the order with an id), and for poking at
//! the gateway: `/echo` (what arrived: method, path, headers), `/status/{code}`, `/slow/{ms}`, and `/hits`
//! (requests served so far, for counting what got past a cache).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::{any, get, post};
use serde_json::{Value, json};

#[derive(Default)]
struct Shop {
    orders: AtomicU64,
    hits: AtomicU64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9080".into());
    let app = Router::new()
        .route("/products", get(products))
        .route("/products/{id}", get(product))
        .route("/orders", post(order))
        .route("/echo", any(echo))
        .route("/echo/{*rest}", any(echo))
        .route("/status/{code}", any(status))
        .route("/slow/{ms}", any(slow))
        .route("/hits", get(hits));
    let shop = Arc::new(Shop::default());
    let counter = shop.clone();
    let app = app
        .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let counter = counter.clone();
            async move {
                if request.uri().path() != "/hits" {
                    counter.hits.fetch_add(1, Ordering::Relaxed);
                }
                next.run(request).await
            }
        }))
        .with_state(shop);
    let listener = tokio::net::TcpListener::bind(&address).await?;
    eprintln!("demo upstream listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

fn catalogue() -> Vec<Value> {
    vec![
        json!({"id": 1, "name": "Kettle", "price": 29.0}),
        json!({"id": 2, "name": "Teapot", "price": 19.5}),
        json!({"id": 3, "name": "Mug", "price": 7.25}),
    ]
}

async fn products() -> Json<Value> {
    Json(json!({"products": catalogue()}))
}

async fn product(Path(id): Path<u64>) -> Result<Json<Value>, StatusCode> {
    catalogue().into_iter().find(|p| p["id"] == id).map(Json).ok_or(StatusCode::NOT_FOUND)
}

async fn order(State(shop): State<Arc<Shop>>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let id = shop.orders.fetch_add(1, Ordering::Relaxed) + 1;
    (StatusCode::CREATED, Json(json!({"orderId": id, "order": body})))
}

async fn echo(method: Method, uri: Uri, headers: HeaderMap) -> Json<Value> {
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_str().unwrap_or("<binary>").to_string())))
        .collect();
    Json(json!({"method": method.as_str(), "uri": uri.to_string(), "headers": headers}))
}

async fn hits(State(shop): State<Arc<Shop>>) -> String {
    shop.hits.load(Ordering::Relaxed).to_string()
}

async fn status(Path(code): Path<u16>) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
}

async fn slow(Path(ms): Path<u64>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    "done\n"
}
