//! The relay: claims a batch of committed, unpublished rows, publishes them, and marks the outcome in the
//! same transaction that claimed them.
//!
//! Order: events of one key are published one after the other, each only after the previous one was
//! acknowledged; keys are published concurrently. A row that fails blocks the rows after it with the same
//! key until it is published or moved to the dead-letter table, in this batch and the next ones (the source
//! flags rows that have an earlier, unpublished row of their key that this claim does not hold).
//!
//! Several relays (replicas) on one table claim disjoint batches (`FOR UPDATE SKIP LOCKED`); a row is
//! published twice only when a relay dies between the broker's acknowledgement and its commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::{Record, Sink, SinkError, StoreError};
use crate::kernel::health::{HealthHandle, State};
use crate::kernel::metrics::Metrics;

/// A claimed row.
#[derive(Clone, Debug)]
pub struct Row {
    pub record: Record,
    /// Publish attempts so far.
    pub attempts: u32,
    /// An earlier row of the same key is unpublished and not in this claim: leave this one (and the rest
    /// of its key) for later.
    pub blocked: bool,
    /// Seconds since the row was committed, when it was claimed.
    pub age: f64,
}

/// What became of a claimed row.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Published,
    /// Try again after `delay`; counts as an attempt.
    Retry {
        error: String,
        delay: Duration,
    },
    /// Move to the dead-letter table.
    Dead {
        error: String,
    },
    /// Left as it was (blocked behind its key, or the broker was unavailable).
    Skipped,
}

/// Rows held by one relay until [`Claim::finish`] records their outcomes (and releases them).
pub trait Claim: Send {
    fn rows(&self) -> &[Row];
    /// Records the outcome of every row, in the order of [`Claim::rows`], and releases the claim.
    fn finish(self: Box<Self>, outcomes: Vec<Outcome>) -> BoxFuture<'static, Result<(), StoreError>>;
}

/// A table the relay reads.
pub trait Source: Send + Sync + 'static {
    /// The table, as metrics and logs name it.
    fn name(&self) -> &str;
    /// Claims up to `limit` publishable rows, oldest first.
    fn claim(&self, limit: u32) -> BoxFuture<'_, Result<Box<dyn Claim>, StoreError>>;
    /// Returns when new rows may have been committed, or after `timeout`.
    fn wait(&self, timeout: Duration) -> BoxFuture<'_, ()>;
    /// Deletes published rows older than `retention` (and expired command records), in small batches.
    fn cleanup(&self, retention: Duration) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// Unpublished rows and the age in seconds of the oldest.
    fn depth(&self) -> BoxFuture<'_, Result<(i64, f64), StoreError>>;
}

/// How a relay runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Settings {
    pub batch: u32,
    pub max_attempts: u32,
    pub poll_interval: Duration,
    pub retention: Duration,
}

/// Prefix of the `/status` components of application outbox tables.
pub const COMPONENT_PREFIX: &str = "outbox ";

/// How often depth and age are measured, and published rows cleaned up.
const MEASURE_EVERY: Duration = Duration::from_secs(2);
const CLEANUP_EVERY: Duration = Duration::from_secs(30);
/// The first and the longest retry delay of a failing row.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LONGEST_RETRY: Duration = Duration::from_secs(300);

/// Claim-publish-mark loops per relay: while one publishes a batch, the other claims the next, so a row
/// committed meanwhile does not wait for a whole cycle. They claim disjoint rows and keep per-key order
/// between them like relays of different pods do.
const LOOPS: usize = 2;

/// A running relay; stopped (after the batch in hand) when dropped or by [`Relay::stop`].
pub struct Relay {
    stopping: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    housekeeping: Option<tokio::task::JoinHandle<()>>,
}

/// The `/status` component of the relay of `table`: `postgres` for the commands' table (with the
/// database), `outbox <table>` for an application's (so that a broken application table does not mark
/// the database down).
pub fn component_name(table: &str) -> String {
    if table == super::COMMANDS_TABLE { super::COMPONENT.to_string() } else { format!("{COMPONENT_PREFIX}{table}") }
}

impl crate::kernel::task::Running for Relay {
    fn stop(self: Box<Self>, deadline: std::time::Instant) -> futures::future::BoxFuture<'static, ()> {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        Box::pin(Relay::stop(*self, wait))
    }
}

impl Relay {
    pub fn start(
        source: Arc<dyn Source>,
        sink: Arc<dyn Sink>,
        settings: Settings,
        metrics: Metrics,
        health: HealthHandle,
    ) -> Self {
        let stopping = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Inner {
            source,
            sink,
            settings,
            metrics,
            health,
            stopping: stopping.clone(),
            down: AtomicBool::new(false),
        });
        let tasks = (0..LOOPS).map(|_| tokio::spawn(inner.clone().run())).collect();
        let housekeeping = tokio::spawn(inner.housekeeping());
        Self { stopping, tasks, housekeeping: Some(housekeeping) }
    }

    /// Stops after the batch in hand has been recorded (at most `timeout`).
    pub async fn stop(mut self, timeout: Duration) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(task) = self.housekeeping.take() {
            task.abort();
        }
        let tasks = futures::future::join_all(std::mem::take(&mut self.tasks));
        if tokio::time::timeout(timeout, tasks).await.is_err() {
            tracing::warn!("the outbox relay did not finish its batch in time; its rows will be published again");
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(task) = self.housekeeping.take() {
            task.abort();
        }
        // The relay task ends by itself after its batch.
    }
}

struct Inner {
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    settings: Settings,
    metrics: Metrics,
    health: HealthHandle,
    stopping: Arc<AtomicBool>,
    /// Whether the last failure of an operation on the table has not been followed by a success yet.
    down: AtomicBool,
}

impl Inner {
    async fn run(self: Arc<Self>) {
        let table = self.source.name().to_string();
        let mut failures = 0u32;
        while !self.stopping.load(Ordering::Relaxed) {
            let claim = match self.source.claim(self.settings.batch).await {
                Ok(claim) => claim,
                Err(error) => {
                    failures += 1;
                    self.store_failed("claim", &error, failures);
                    tokio::time::sleep(backoff(failures, Duration::from_millis(200), Duration::from_secs(5))).await;
                    continue;
                }
            };
            failures = 0;
            self.recovered();
            if claim.rows().is_empty() {
                drop(claim);
                self.source.wait(self.settings.poll_interval).await;
                continue;
            }
            let claimed = Instant::now();
            let (outcomes, unavailable) = self.publish(claim.rows(), claimed).await;
            let counts = count(&outcomes);
            // Every row left for later (blocked behind its key): do not claim them again at once.
            let idle = outcomes.iter().all(|o| *o == Outcome::Skipped) && unavailable.is_none();
            match claim.finish(outcomes).await {
                Ok(()) => {
                    self.recovered();
                    self.metrics.outbox_published.with_label_values(&[&table]).inc_by(counts.published);
                    self.metrics.outbox_dead.with_label_values(&[&table]).inc_by(counts.dead);
                    if counts.dead > 0 {
                        tracing::warn!(%table, rows = counts.dead, "outbox rows moved to umw_outbox_dead after failing");
                    }
                }
                Err(error) => {
                    // The rows stay unpublished and are published again: at-least-once.
                    self.store_failed("finish", &error, 1);
                }
            }
            if let Some(reason) = unavailable {
                self.health.set(State::Up, format!("connected; relaying {table} waits for the broker: {reason}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else if idle {
                self.source.wait(self.settings.poll_interval).await;
            }
        }
    }

    fn store_failed(&self, operation: &str, error: &StoreError, failures: u32) {
        self.metrics.postgres_errors.with_label_values(&[operation]).inc();
        self.health.set(State::Down, error.to_string());
        // After the state: a success racing with this failure then still finds the flag and clears it.
        self.down.store(true, Ordering::Relaxed);
        if failures <= 1 || failures.is_multiple_of(60) {
            tracing::warn!(table = %self.source.name(), operation, %error, failures, "the outbox relay cannot use its table");
        }
    }

    /// Marks the component up again after a failure, whichever operation (a loop's claim or mark, or
    /// housekeeping) failed and whichever succeeds.
    fn recovered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            self.health.set(State::Up, format!("relaying {} again", self.source.name()));
        }
    }

    /// Publishes the claimed rows, one key at a time in order, keys concurrently. Returns each row's
    /// outcome and, when the broker was unavailable, why.
    async fn publish(&self, rows: &[Row], claimed: Instant) -> (Vec<Outcome>, Option<String>) {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_key: HashMap<&str, usize> = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            match row.record.key.as_deref() {
                Some(key) => match by_key.get(key) {
                    Some(&group) => groups[group].push(i),
                    None => {
                        by_key.insert(key, groups.len());
                        groups.push(vec![i]);
                    }
                },
                None => groups.push(vec![i]),
            }
        }
        let table = self.source.name();
        let results = futures::future::join_all(groups.into_iter().map(|group| async move {
            let mut out = Vec::with_capacity(group.len());
            let mut stop = false;
            let mut unavailable = None;
            for i in group {
                let row = &rows[i];
                if stop || row.blocked {
                    stop = true;
                    out.push((i, Outcome::Skipped));
                    continue;
                }
                let outcome = match self.sink.publish(&row.record).await {
                    Ok(()) => {
                        let latency = row.age + claimed.elapsed().as_secs_f64();
                        self.metrics.outbox_latency.with_label_values(&[table]).observe(latency);
                        Outcome::Published
                    }
                    Err(SinkError::Unavailable(reason)) => {
                        self.metrics.outbox_failures.with_label_values(&[table, "unavailable"]).inc();
                        unavailable = Some(reason);
                        stop = true;
                        Outcome::Skipped
                    }
                    Err(SinkError::Refused(error)) => {
                        self.metrics.outbox_failures.with_label_values(&[table, "refused"]).inc();
                        Outcome::Dead { error }
                    }
                    Err(SinkError::Failed(error)) => {
                        self.metrics.outbox_failures.with_label_values(&[table, "failed"]).inc();
                        if row.attempts + 1 >= self.settings.max_attempts {
                            Outcome::Dead { error: format!("after {} attempts: {error}", row.attempts + 1) }
                        } else {
                            stop = true;
                            Outcome::Retry { error, delay: backoff(row.attempts + 1, FIRST_RETRY, LONGEST_RETRY) }
                        }
                    }
                };
                out.push((i, outcome));
            }
            (out, unavailable)
        }))
        .await;
        let mut outcomes = vec![Outcome::Skipped; rows.len()];
        let mut unavailable = None;
        for (group, reason) in results {
            for (i, outcome) in group {
                outcomes[i] = outcome;
            }
            unavailable = unavailable.or(reason);
        }
        (outcomes, unavailable)
    }

    /// Measures depth and age, and deletes published rows after the retention period.
    async fn housekeeping(self: Arc<Self>) {
        let table = self.source.name().to_string();
        let mut last_cleanup: Option<Instant> = None;
        loop {
            match self.source.depth().await {
                Ok((depth, age)) => {
                    self.recovered();
                    self.metrics.outbox_depth.with_label_values(&[&table]).set(depth);
                    self.metrics.outbox_oldest_age.with_label_values(&[&table]).set(age);
                }
                Err(error) => self.store_failed("depth", &error, 2),
            }
            // Short retentions (tests, small databases) are kept to within about half of themselves.
            let every = CLEANUP_EVERY.min(self.settings.retention / 2).max(MEASURE_EVERY);
            if last_cleanup.is_none_or(|at| at.elapsed() >= every) {
                last_cleanup = Some(Instant::now());
                match self.source.cleanup(self.settings.retention).await {
                    Ok(deleted) => {
                        self.metrics.outbox_cleaned.with_label_values(&[&table]).inc_by(deleted);
                    }
                    Err(error) => self.store_failed("cleanup", &error, 2),
                }
            }
            tokio::time::sleep(MEASURE_EVERY).await;
        }
    }
}

struct Counts {
    published: u64,
    dead: u64,
}

fn count(outcomes: &[Outcome]) -> Counts {
    let mut counts = Counts { published: 0, dead: 0 };
    for outcome in outcomes {
        match outcome {
            Outcome::Published => counts.published += 1,
            Outcome::Dead { .. } => counts.dead += 1,
            Outcome::Retry { .. } | Outcome::Skipped => {}
        }
    }
    counts
}

/// Exponential backoff with jitter: a random delay between half and all of `first * 2^(n-1)`, at most
/// `longest`.
pub fn backoff(n: u32, first: Duration, longest: Duration) -> Duration {
    let ceiling = first.saturating_mul(1u32 << n.saturating_sub(1).min(20)).min(longest);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(fastrand::u64(millis / 2..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let first = Duration::from_millis(100);
        let longest = Duration::from_secs(1);
        assert!(backoff(1, first, longest) <= first);
        assert!(backoff(3, first, longest) <= Duration::from_millis(400));
        assert!(backoff(3, first, longest) >= Duration::from_millis(200));
        for n in [10, 100, u32::MAX] {
            assert!(backoff(n, first, longest) <= longest);
        }
    }

    /// A table whose claims always work and whose depth query fails the first `failing` times.
    struct Flaky {
        failing: std::sync::atomic::AtomicU32,
    }

    struct Empty;

    impl Claim for Empty {
        fn rows(&self) -> &[Row] {
            &[]
        }
        fn finish(self: Box<Self>, _: Vec<Outcome>) -> BoxFuture<'static, Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
    }

    impl Source for Flaky {
        fn name(&self) -> &str {
            super::super::COMMANDS_TABLE
        }
        fn claim(&self, _: u32) -> BoxFuture<'_, Result<Box<dyn Claim>, StoreError>> {
            Box::pin(async { Ok(Box::new(Empty) as Box<dyn Claim>) })
        }
        fn wait(&self, timeout: Duration) -> BoxFuture<'_, ()> {
            Box::pin(tokio::time::sleep(timeout))
        }
        fn cleanup(&self, _: Duration) -> BoxFuture<'_, Result<u64, StoreError>> {
            Box::pin(async { Ok(0) })
        }
        fn depth(&self) -> BoxFuture<'_, Result<(i64, f64), StoreError>> {
            let failed = self.failing.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
            Box::pin(async move {
                if failed { Err(StoreError::Unavailable("connection reset".into())) } else { Ok((0, 0.0)) }
            })
        }
    }

    struct Nowhere;

    impl Sink for Nowhere {
        fn publish<'a>(&'a self, _: &'a Record) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn state(health: &crate::kernel::health::Health) -> Option<State> {
        health.components().into_iter().find(|c| c.name == super::super::COMPONENT).map(|c| c.state)
    }

    #[tokio::test]
    async fn a_failure_outside_the_loops_is_cleared_by_the_next_success() {
        let health = crate::kernel::health::Health::default();
        let settings = Settings {
            batch: 10,
            max_attempts: 3,
            poll_interval: Duration::from_millis(100),
            retention: Duration::from_secs(60),
        };
        let source = Arc::new(Flaky { failing: 1.into() });
        let metrics = Metrics::new().unwrap();
        let handle = health.handle(component_name(super::super::COMMANDS_TABLE), false);
        handle.activate();
        let relay = Relay::start(source, Arc::new(Nowhere), settings, metrics.clone(), handle);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(metrics.postgres_errors.with_label_values(&["depth"]).get(), 1, "the depth query failed once");
        // The loops' claims kept working: the component is up again, not left down until a loop fails.
        assert_eq!(state(&health), Some(State::Up));
        tokio::time::sleep(MEASURE_EVERY + Duration::from_millis(500)).await;
        assert_eq!(state(&health), Some(State::Up));
        relay.stop(Duration::from_secs(1)).await;
    }
}
