//! Logs and traces.
//!
//! Logs: `tracing` to stderr, JSON (default) or text, with the filter of `spec.observability.logLevel`
//! (or `RUST_LOG`), which a configuration reload changes in place. Log lines about a request carry its
//! `trace_id` and `request_id`.
//!
//! Traces: when an OTLP endpoint is configured (`spec.observability.otlpEndpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), every sampled request is exported
//! as a server span, and every upstream attempt as a client span under it, over OTLP/gRPC. The spans carry
//! the ids that the gateway propagated in `traceparent` ([`crate::kernel::trace`]), so the trace the upstream
//! continues is the one the collector receives.

use std::cell::Cell;
use std::time::SystemTime;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt as _;
use umw_crds::middleware::{LogFormat, Observability};

use crate::kernel::trace::TraceContext;

/// Default share of new traces that are sampled, as documented on `samplingRatio`.
pub const DEFAULT_SAMPLING_RATIO: f64 = 0.1;

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: Option<reload::Handle<EnvFilter, tracing_subscriber::Registry>>,
}

impl LogControl {
    /// A control that changes nothing (when no subscriber was installed, e.g. in `check`).
    pub fn disabled() -> Self {
        Self { handle: None }
    }

    /// Applies `spec.observability.logLevel`; `RUST_LOG`, when set, wins over the configuration.
    pub fn apply(&self, level: Option<&str>) -> Result<(), String> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Ok(());
        }
        let Some(handle) = &self.handle else { return Ok(()) };
        let filter = EnvFilter::try_new(level.unwrap_or("info")).map_err(|e| format!("logLevel: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the log subscriber. The format is fixed for the life of the process; the filter is not.
pub fn init_logs(format: LogFormat, level: Option<&str>) -> LogControl {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| level.and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Text => {
            use std::io::IsTerminal as _;
            let ansi = std::io::stderr().is_terminal();
            registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)).try_init()
        }
    };
    LogControl { handle: installed.is_ok().then_some(handle) }
}

/// Whether the standard variables ask for OTLP traces.
fn env_endpoint() -> Option<String> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")).ok()
}

/// The sampling ratio: the configuration's, else `OTEL_TRACES_SAMPLER_ARG`, else 0.1.
pub fn sampling_ratio(observability: &Observability) -> f64 {
    observability
        .sampling_ratio
        .or_else(|| std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().and_then(|v| v.parse().ok()))
        .unwrap_or(DEFAULT_SAMPLING_RATIO)
        .clamp(0.0, 1.0)
}

/// The OTLP exporter, when one is configured.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    pub endpoint: String,
}

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP exporter for {endpoint}: {source}")]
pub struct TracesError {
    endpoint: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

impl Traces {
    /// Builds the exporter for the configured endpoint, if any. Must run inside the Tokio runtime.
    pub fn from_config(observability: &Observability, middleware: &str) -> Result<Option<Self>, TracesError> {
        use opentelemetry_otlp::WithExportConfig as _;
        let Some(endpoint) = observability.otlp_endpoint.clone().or_else(env_endpoint) else { return Ok(None) };
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if observability.otlp_endpoint.is_some() {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let exporter = builder.build().map_err(|source| TracesError { endpoint: endpoint.clone(), source })?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("umw-dataplane");
        }
        resource = resource.with_attribute(KeyValue::new("umw.middleware", middleware.to_string()));
        if let Ok(pod) = std::env::var("UMW_POD_NAME") {
            resource = resource.with_attribute(KeyValue::new("k8s.pod.name", pod));
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            // The gateway decides sampling itself (see `crate::kernel::trace`) and builds only sampled spans.
            .with_sampler(Sampler::AlwaysOn)
            .with_id_generator(GatewayIds)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("umw-dataplane");
        Ok(Some(Self { provider, tracer, endpoint }))
    }

    /// Exports the server span of a finished request.
    pub fn server_span(
        &self,
        trace: &TraceContext,
        name: String,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        error: bool,
    ) {
        if !trace.sampled {
            return;
        }
        let parent = match trace.parent_span_id {
            Some(parent) => remote_parent(trace.trace_id, parent),
            None => Context::new(),
        };
        self.export(trace.trace_id, trace.span_id, &parent, name, SpanKind::Server, start, attributes, error);
    }

    /// Exports the client span of one upstream attempt.
    pub fn client_span(
        &self,
        trace: &TraceContext,
        span_id: [u8; 8],
        name: String,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        error: bool,
    ) {
        if !trace.sampled {
            return;
        }
        let parent = remote_parent(trace.trace_id, trace.span_id);
        self.export(trace.trace_id, span_id, &parent, name, SpanKind::Client, start, attributes, error);
    }

    /// Exports a span of another kind (a producer's publish, a consumer's processing) with this parent.
    #[allow(clippy::too_many_arguments)]
    pub fn child_span(
        &self,
        trace_id: [u8; 16],
        parent_span_id: [u8; 8],
        span_id: [u8; 8],
        name: String,
        kind: SpanKind,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        error: bool,
    ) {
        let parent = remote_parent(trace_id, parent_span_id);
        self.export(trace_id, span_id, &parent, name, kind, start, attributes, error);
    }

    #[allow(clippy::too_many_arguments)]
    fn export(
        &self,
        trace_id: [u8; 16],
        span_id: [u8; 8],
        parent: &Context,
        name: String,
        kind: SpanKind,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        error: bool,
    ) {
        use opentelemetry::trace::Span as _;
        NEXT_IDS.with(|next| next.set(Some((trace_id, span_id))));
        let builder = self.tracer.span_builder(name).with_kind(kind).with_start_time(start).with_attributes(attributes);
        let mut span = self.tracer.build_with_context(builder, parent);
        NEXT_IDS.with(|next| next.set(None));
        if error {
            span.set_status(Status::error(""));
        }
        span.end_with_timestamp(SystemTime::now());
    }

    /// Sends what is buffered now.
    pub fn flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::warn!(%error, "flushing traces failed");
        }
    }

    /// Sends what is buffered and stops the exporter.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "flushing traces at shutdown failed");
        }
    }
}

fn remote_parent(trace_id: [u8; 16], span_id: [u8; 8]) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_bytes(trace_id),
        SpanId::from_bytes(span_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

thread_local! {
    /// The ids of the span being built on this thread (set just around `build_with_context`).
    static NEXT_IDS: Cell<Option<([u8; 16], [u8; 8])>> = const { Cell::new(None) };
}

/// Hands the SDK the ids the gateway already propagated; random ones otherwise.
#[derive(Debug)]
struct GatewayIds;

impl IdGenerator for GatewayIds {
    fn new_trace_id(&self) -> TraceId {
        match NEXT_IDS.with(Cell::get) {
            Some((trace_id, _)) => TraceId::from_bytes(trace_id),
            None => RandomIdGenerator::default().new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match NEXT_IDS.with(Cell::get) {
            Some((_, span_id)) => SpanId::from_bytes(span_id),
            None => RandomIdGenerator::default().new_span_id(),
        }
    }
}
