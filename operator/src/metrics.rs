//! The operator's Prometheus metrics, registered once. Labels carry kinds and error classes, never object
//! names.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Duration of reconciles, by controller (`middleware`, `cachepolicy`, ...).
    pub reconcile_duration: HistogramVec,
    /// Failed reconciles, by controller and error class.
    pub reconcile_errors: IntCounterVec,
    /// Reconciles that ended with the Middleware `Stalled`, by reason (a problem only the user can fix).
    pub reconcile_stalled: IntCounterVec,
    /// Write requests the operator sent, by kind and verb (`apply`, `delete`, `status`).
    pub api_writes: IntCounterVec,
    /// Watch stream errors, by kind.
    pub watch_errors: IntCounterVec,
    /// 1 while this replica holds the leader lease.
    pub leader: IntGauge,
    /// Reads of data-plane pods' `/status`, by result (`ok`, `error`).
    pub health_polls: IntCounterVec,
    /// Secrets read from the API server to learn their keys: once per Secret version, not per reconcile.
    pub secret_reads: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("umw_operator".into()), None)?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "Duration of reconciles")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["controller"],
        )?;
        let reconcile_errors =
            IntCounterVec::new(Opts::new("reconcile_errors_total", "Failed reconciles"), &["controller", "error"])?;
        let reconcile_stalled = IntCounterVec::new(
            Opts::new("reconcile_stalled_total", "Reconciles that ended with the Middleware Stalled"),
            &["reason"],
        )?;
        let api_writes = IntCounterVec::new(
            Opts::new("api_writes_total", "Write requests sent to the API server"),
            &["kind", "verb"],
        )?;
        let watch_errors = IntCounterVec::new(Opts::new("watch_errors_total", "Watch stream errors"), &["kind"])?;
        let leader = IntGauge::new("leader", "1 while this replica holds the leader lease")?;
        let health_polls =
            IntCounterVec::new(Opts::new("health_polls_total", "Reads of data-plane pods' /status"), &["result"])?;
        registry.register(Box::new(health_polls.clone()))?;
        let secret_reads =
            IntCounter::new("secret_reads_total", "Secrets read to learn their keys (once per version)")?;
        registry.register(Box::new(secret_reads.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_stalled.clone()))?;
        registry.register(Box::new(api_writes.clone()))?;
        registry.register(Box::new(watch_errors.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Self {
            registry,
            reconcile_duration,
            reconcile_errors,
            reconcile_stalled,
            api_writes,
            watch_errors,
            leader,
            health_polls,
            secret_reads,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}
