//! Traces leave the gateway over OTLP/gRPC to a real OTLP receiver (the collector protocol, served with
//! tonic), with the ids that the gateway propagated to the upstream.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use support::{Gateway, Upstream, eventually, middleware, send};

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn start_receiver() -> (std::net::SocketAddr, Receiver) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    (address, receiver)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn sampled_requests_are_exported_as_server_and_client_spans_of_the_propagated_trace() {
    let (collector, receiver) = start_receiver().await;
    let upstream = Upstream::start("up").await;
    let yaml = middleware(
        &format!("    - name: traced\n      match: {{}}\n      upstream: {{url: '{}'}}\n", upstream.url()),
        &format!("  observability:\n    otlpEndpoint: http://{collector}\n    samplingRatio: 1\n"),
    );
    let gw = Gateway::start(&yaml).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let reply = send(
        Method::GET,
        &gw.url("/orders/7"),
        &[("traceparent", &format!("00-{trace_id}-{caller_span}-01"))],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let sent = reply.json()["headers"]["traceparent"].as_str().unwrap().to_string();
    let upstream_parent = sent.split('-').nth(2).unwrap().to_string();

    let traces = gw.runtime.snapshot().traces.clone().expect("an exporter is configured");
    eventually("spans at the collector", Duration::from_secs(20), || {
        let traces = traces.clone();
        let receiver = receiver.clone();
        async move {
            tokio::task::spawn_blocking(move || traces.flush()).await.unwrap();
            receiver.spans.lock().unwrap().len() >= 2
        }
    })
    .await;
    let spans = receiver.spans.lock().unwrap().clone();
    let server = spans.iter().find(|s| s.kind == 2).expect("a server span");
    let client = spans.iter().find(|s| s.kind == 3).expect("a client span");
    assert_eq!(hex(&server.trace_id), trace_id);
    assert_eq!(hex(&server.parent_span_id), caller_span, "the caller's span is the parent");
    assert_eq!(server.name, "GET traced");
    assert_eq!(hex(&client.trace_id), trace_id);
    assert_eq!(client.parent_span_id, server.span_id, "the upstream call is a child of the server span");
    assert_eq!(hex(&client.span_id), upstream_parent, "the upstream continues the exported client span");
}

#[tokio::test]
async fn unsampled_requests_are_propagated_but_not_exported() {
    let (collector, receiver) = start_receiver().await;
    let upstream = Upstream::start("up").await;
    let yaml = middleware(
        &format!("    - name: quiet\n      match: {{}}\n      upstream: {{url: '{}'}}\n", upstream.url()),
        &format!("  observability:\n    otlpEndpoint: http://{collector}\n    samplingRatio: 0\n"),
    );
    let gw = Gateway::start(&yaml).await;
    let reply = send(Method::GET, &gw.url("/x"), &[], Bytes::new()).await;
    let sent = reply.json()["headers"]["traceparent"].as_str().unwrap().to_string();
    assert!(sent.starts_with("00-") && sent.ends_with("-00"), "a new, unsampled trace goes upstream: {sent}");
    let traces = gw.runtime.snapshot().traces.clone().unwrap();
    tokio::task::spawn_blocking(move || traces.flush()).await.unwrap();
    assert!(receiver.spans.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_trace_goes_from_ingest_through_a_producer_span_to_the_delivery() {
    let (collector, receiver) = start_receiver().await;
    // A webhook that keeps the traceparent it was called with.
    let called: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(called): axum::extract::State<Arc<Mutex<Vec<String>>>>,
                 headers: http::HeaderMap| async move {
                    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or("");
                    called.lock().unwrap().push(traceparent.to_string());
                    http::StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(called.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let yaml = format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: ev, namespace: t}}\nspec:\n  connections:\n    kafka: {{bootstrapServers: {{value: 'unused:9092'}}}}\n  observability:\n    otlpEndpoint: http://{collector}\n    samplingRatio: 1\n---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {{name: in, namespace: t}}\nspec:\n  targetRefs: [{{name: ev}}]\n  source: {{http: {{path: /events/in}}}}\n  destination: {{kafka: {{topic: t1}}}}\n---\napiVersion: umw.dev/v1alpha1\nkind: EventRoute\nmetadata: {{name: out, namespace: t}}\nspec:\n  targetRefs: [{{name: ev}}]\n  source: {{kafka: {{topic: t1}}}}\n  destination: {{http: {{url: '{hook}'}}}}\n"
    );
    let gw = Gateway::start_in_process(&yaml).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let reply = send(
        Method::POST,
        &gw.url("/events/in"),
        &[("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01")), ("content-type", "application/json")],
        Bytes::from_static(b"{\"n\": 1}"),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    eventually("the webhook called", Duration::from_secs(10), || async { !called.lock().unwrap().is_empty() }).await;
    let traces = gw.runtime.snapshot().traces.clone().expect("an exporter is configured");
    eventually("three spans at the collector", Duration::from_secs(20), || {
        let traces = traces.clone();
        let receiver = receiver.clone();
        async move {
            tokio::task::spawn_blocking(move || traces.flush()).await.unwrap();
            receiver.spans.lock().unwrap().len() >= 3
        }
    })
    .await;
    let spans = receiver.spans.lock().unwrap().clone();
    let server = spans.iter().find(|s| s.kind == 2).expect("the ingest request's server span");
    let producer = spans.iter().find(|s| s.kind == 4).expect("a producer span");
    let delivery = spans.iter().find(|s| s.kind == 3).expect("the delivery's client span");
    assert!(spans.iter().all(|s| hex(&s.trace_id) == trace_id), "one trace");
    assert_eq!(producer.parent_span_id, server.span_id, "published from the request");
    assert_eq!(producer.name, "publish t1");
    assert_eq!(delivery.parent_span_id, producer.span_id, "delivered from the published event");
    let sent = called.lock().unwrap()[0].clone();
    assert_eq!(sent.split('-').nth(2).unwrap(), hex(&delivery.span_id), "the webhook continues the delivery span");
}
