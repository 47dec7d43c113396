//! Kafka through librdkafka (`rdkafka`): an idempotent producer with a bounded number of events awaiting
//! acknowledgement, and consumer groups that commit an offset only after its message was handled.
//!
//! A consumer polls on its own thread and hands each partition's messages, in order, to that
//! partition's worker task; partitions are handled concurrently. A worker that cannot keep up has its
//! partition paused (the poll loop keeps running, so the group does not evict the member) and resumed
//! when it catches up. Offsets of handled messages are committed every second and, for the partitions
//! being revoked, synchronously in the rebalance callback after their workers finished the message in
//! hand, so a rebalance neither loses events nor replays more than that one message.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::Semaphore;

use super::envelope::Wire;
use crate::kernel::health::{Health, HealthHandle, State};
use crate::kernel::metrics::Metrics;
use crate::kernel::secret::Secret;

/// The name of the Kafka component in `/status`.
pub const COMPONENT: &str = "kafka";

/// Defaults documented on the CRD.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_LINGER: Duration = Duration::from_millis(5);

/// How to reach the brokers and how to produce; equal settings share one producer across reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// Mechanism, user name, password.
    pub sasl: Option<(String, String, Secret)>,
    pub tls: bool,
    pub ca_cert: Option<String>,
    pub acks: &'static str,
    pub linger: Duration,
    pub batch_bytes: Option<u32>,
    pub compression: &'static str,
    pub max_in_flight: usize,
    pub delivery_timeout: Duration,
    /// `client.id`, for the brokers' logs and quotas.
    pub client_id: String,
}

impl KafkaSettings {
    /// What every client (producer, consumer) sets.
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id)
            .set("statistics.interval.ms", "1000")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "2000")
            .set("socket.keepalive.enable", "true");
        let protocol = match (&self.sasl, self.tls) {
            (None, false) => "plaintext",
            (None, true) => "ssl",
            (Some(_), false) => "sasl_plaintext",
            (Some(_), true) => "sasl_ssl",
        };
        config.set("security.protocol", protocol);
        if let Some((mechanism, user, password)) = &self.sasl {
            config.set("sasl.mechanism", mechanism).set("sasl.username", user).set("sasl.password", password.expose());
        }
        if let Some(ca) = &self.ca_cert {
            config.set("ssl.ca.pem", ca);
        }
        config
    }
}

/// Why an event was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Too many events await acknowledgement: back off.
    #[error("{0} events already wait for the broker's acknowledgement")]
    Full(usize),
    /// No broker is reachable.
    #[error("Kafka is unavailable: {0}")]
    Unavailable(String),
    /// The event was handed to a broker that did not acknowledge it in time: it may have been written.
    #[error("Kafka is unavailable: {0}")]
    TimedOut(String),
    /// The broker did not take the event this time.
    #[error("Kafka did not acknowledge the event: {0}")]
    Failed(String),
    /// The broker will never take this event (too large, malformed).
    #[error("Kafka refused the event: {0}")]
    Refused(String),
}

impl PublishError {
    /// Whether sending the same event again may succeed.
    pub fn retryable(&self) -> bool {
        !matches!(self, PublishError::Refused(_))
    }

    pub fn outcome(&self) -> &'static str {
        match self {
            PublishError::Full(_) => "full",
            PublishError::Unavailable(_) | PublishError::TimedOut(_) => "unavailable",
            PublishError::Failed(_) | PublishError::Refused(_) => "error",
        }
    }
}

/// Where a published event landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// Broker reachability as the client sees it.
const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Feeds the client's view of the brokers into `/status` and the lag gauge.
pub struct Context {
    health: HealthHandle,
    state: Arc<AtomicU8>,
    /// For consumers: the lag gauge of their event route.
    lag: Option<prometheus::IntGauge>,
    /// For consumers: what the rebalance callback needs.
    group: Option<Arc<Group>>,
}

impl Context {
    fn set(&self, up: bool, message: String) {
        let new = if up { UP } else { DOWN };
        if self.state.swap(new, Ordering::Relaxed) != new {
            if up {
                self.health.set(State::Up, message);
                tracing::info!("Kafka reachable again");
            } else {
                self.health.set(State::Down, message.clone());
                tracing::warn!(%message, "Kafka unreachable");
            }
        }
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let brokers: Vec<_> = statistics.brokers.values().filter(|b| b.nodeid >= 0).collect();
        if brokers.iter().any(|b| b.state == "UP") {
            self.set(true, format!("{} broker(s) connected", brokers.iter().filter(|b| b.state == "UP").count()));
        } else if !brokers.is_empty() {
            self.set(false, "no broker connected".into());
        }
        if let Some(lag) = &self.lag {
            let total: i64 = statistics
                .topics
                .values()
                .flat_map(|t| t.partitions.values())
                .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
                .map(|p| p.consumer_lag)
                .sum();
            lag.set(total);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication) {
            // Overrides whatever the statistics said: the brokers are there, they refuse us.
            self.state.store(UNKNOWN, Ordering::Relaxed);
            self.set(false, format!("authentication failed: {reason}"));
        } else if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.set(false, format!("all brokers down: {reason}"));
        } else {
            tracing::debug!(%error, reason, "Kafka client error");
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::warn!(facility, "librdkafka: {message}"),
            _ => tracing::debug!(facility, "librdkafka: {message}"),
        }
    }
}

impl ConsumerContext for Context {
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Some(group) = &self.group {
            group.commits.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = result {
                tracing::warn!(route = %group.route, %error, "an offset commit failed; the messages after the last committed offset are consumed again by the next owner");
                // Ask again at the next round.
                group.committed.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // A partition paused for backpressure, revoked and assigned back would stay paused: partitions
        // start resumed (their backlog went with the revocation).
        if let Rebalance::Assign(partitions) = rebalance
            && let Err(error) = consumer.resume(partitions)
        {
            tracing::debug!(%error, "resuming newly assigned partitions failed");
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Some(group) = &self.group else { return };
        match rebalance {
            Rebalance::Revoke(partitions) => group.revoke(consumer, partitions),
            Rebalance::Assign(partitions) => group.assigned(partitions),
            Rebalance::Error(error) => tracing::warn!(%error, route = %group.route, "consumer group rebalance failed"),
        }
    }
}

/// The producer shared by every event route of a configuration with these settings.
pub struct Producer {
    inner: FutureProducer<Context>,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    state: Arc<AtomicU8>,
    /// While no broker is connected, asks for metadata every second: librdkafka connects only when it has
    /// something to do, and events are refused meanwhile.
    probe: Option<tokio::task::JoinHandle<()>>,
    health: HealthHandle,
    metrics: Metrics,
}

impl Drop for Producer {
    fn drop(&mut self) {
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
    }
}

impl Producer {
    /// The client connects at once; its health shows once [activated](Self::activate).
    pub fn new(settings: &KafkaSettings, health: &Health, metrics: Metrics) -> Result<Self, String> {
        let mut config = settings.client_config();
        let idempotent = settings.acks == "all";
        config
            .set("acks", settings.acks)
            .set("enable.idempotence", if idempotent { "true" } else { "false" })
            .set("linger.ms", settings.linger.as_millis().max(1).to_string())
            .set("compression.type", settings.compression)
            .set("message.timeout.ms", settings.delivery_timeout.as_millis().max(1).to_string())
            // librdkafka's own queue is larger than ours, so that ours decides when to push back.
            .set("queue.buffering.max.messages", (settings.max_in_flight * 2).max(1000).to_string());
        if let Some(batch) = settings.batch_bytes {
            config.set("batch.size", batch.to_string());
        }
        let state = Arc::new(AtomicU8::new(UNKNOWN));
        let health = health.handle(COMPONENT, false);
        health.set(State::Starting, "connecting");
        let context = Context { health: health.clone(), state: state.clone(), lag: None, group: None };
        let inner: FutureProducer<Context> =
            config.create_with_context(context).map_err(|e| format!("Kafka producer settings: {e}"))?;
        Ok(Self {
            permits: Arc::new(Semaphore::new(settings.max_in_flight)),
            max_in_flight: settings.max_in_flight,
            probe: tokio::runtime::Handle::try_current()
                .ok()
                .map(|handle| handle.spawn(probe(inner.clone(), state.clone()))),
            inner,
            state,
            health,
            metrics,
        })
    }

    /// Shows the producer in `/status` (once the snapshot that uses it is committed).
    pub fn activate(&self) {
        self.health.activate();
    }

    /// Publishes one record and waits for the broker's acknowledgement (`acks`).
    pub async fn publish(&self, topic: &str, key: Option<&[u8]>, wire: &Wire) -> Result<Delivered, PublishError> {
        let result = self.send(topic, key, wire).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(error) => error.outcome(),
        };
        self.metrics.events_published.with_label_values(&[topic, outcome]).inc();
        result
    }

    async fn send(&self, topic: &str, key: Option<&[u8]>, wire: &Wire) -> Result<Delivered, PublishError> {
        if self.state.load(Ordering::Relaxed) == DOWN {
            return Err(PublishError::Unavailable("no broker connected".into()));
        }
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            return Err(PublishError::Full(self.max_in_flight));
        };
        self.metrics.events_in_flight.inc();
        let _in_flight = Decrement(self.metrics.events_in_flight.clone());
        let mut headers = OwnedHeaders::new_with_capacity(wire.headers.len());
        for (name, value) in &wire.headers {
            headers = headers.insert(Header { key: name.as_str(), value: Some(value.as_bytes()) });
        }
        let mut record = FutureRecord::to(topic).payload(&wire.body).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        let started = Instant::now();
        let delivery = match self.inner.send_result(record) {
            Ok(delivery) => delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(PublishError::Full(self.max_in_flight));
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                return Err(PublishError::Refused("larger than the producer's message.max.bytes".into()));
            }
            Err((error, _)) => return Err(PublishError::Failed(error.to_string())),
        };
        match delivery.await {
            Ok(Ok(delivery)) => {
                self.metrics
                    .events_publish_duration
                    .with_label_values(&[topic])
                    .observe(started.elapsed().as_secs_f64());
                Ok(Delivered { partition: delivery.partition, offset: delivery.offset })
            }
            Ok(Err((error, _))) => Err(match error.rdkafka_error_code() {
                // Brokers that answer but time the event out: a topic that does not exist looks like
                // this (the producer waits for it to appear); say so rather than "unavailable".
                Some(RDKafkaErrorCode::MessageTimedOut) if self.topic_missing(topic).await => {
                    tracing::warn!(%topic, "publishing to a topic that does not exist; create it (brokers here do not create topics on their own)");
                    PublishError::Failed(format!("topic {topic} does not exist"))
                }
                Some(RDKafkaErrorCode::MessageTimedOut) => PublishError::TimedOut(error.to_string()),
                Some(RDKafkaErrorCode::AllBrokersDown) => PublishError::Unavailable(error.to_string()),
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::InvalidMessageSize,
                ) => PublishError::Refused(error.to_string()),
                _ => PublishError::Failed(error.to_string()),
            }),
            Err(_) => Err(PublishError::Failed("the producer went away".into())),
        }
    }

    /// Whether the brokers say the topic does not exist (false when they cannot be asked).
    async fn topic_missing(&self, topic: &str) -> bool {
        let producer = self.inner.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&topic), Duration::from_secs(2)).is_ok_and(|metadata| {
                metadata.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error()
                            .is_some_and(|e| RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition)
                })
            })
        })
        .await
        .unwrap_or(false)
    }

    /// Waits up to `timeout` for every event handed over to be acknowledged (graceful shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.inner.flush(timeout).map_err(|e| e.to_string())
    }
}

async fn probe(producer: FutureProducer<Context>, state: Arc<AtomicU8>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if state.load(Ordering::Relaxed) != DOWN {
            continue;
        }
        let producer = producer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if producer.client().fetch_metadata(None, Duration::from_secs(1)).is_ok() {
                // Answered: the statistics will say which brokers are up within a second.
                tracing::debug!("Kafka answered a metadata request");
            }
        })
        .await;
    }
}

struct Decrement(prometheus::IntGauge);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A message as a consumer hands it to its handler.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Option<Vec<u8>>,
}

/// What a consumer does with each message. It returns once the message is done with (delivered, dead-
/// lettered or dropped on purpose): its offset is committed after that. It returns `false` only when it
/// gave up because the consumer is stopping, and the message must be consumed again.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, message: Incoming, stopping: Arc<AtomicBool>) -> BoxFuture<'static, bool>;
}

/// Consumer settings.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub connection: KafkaSettings,
    pub topic: String,
    /// The consumer group; empty for a broadcast consumer, which has none: it is assigned every partition
    /// of the topic at its end when it starts, commits nothing, and leaves nothing on the broker.
    pub group: String,
    /// The event route, for logs and metrics.
    pub route: String,
    /// A new group starts at the topic's end instead of its beginning (for cache invalidation: what was
    /// published before the pod started cannot be in its cache).
    pub from_latest: bool,
}

/// Messages a partition's worker may have queued before its partition is paused.
const QUEUE: usize = 256;
/// How long a revocation waits for a worker to finish the message in hand.
const REVOKE_WAIT: Duration = Duration::from_secs(10);

struct Worker {
    sender: tokio::sync::mpsc::Sender<Incoming>,
    stopping: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    /// Disconnects when the worker's task ends (or is dropped with its runtime): what the poll thread
    /// waits on, without needing the runtime.
    ended: std::sync::mpsc::Receiver<()>,
}

/// The state shared by a consumer's poll thread, its rebalance callback and its workers.
struct Group {
    route: String,
    runtime: tokio::runtime::Handle,
    handler: Arc<dyn Handler>,
    workers: Mutex<HashMap<i32, Worker>>,
    /// Next offset to commit per partition (the last handled message's offset + 1).
    done: Arc<Mutex<HashMap<i32, i64>>>,
    /// Last committed per partition (asked for; a commit that fails is not retried for the same offset, and
    /// the next handled message moves it on anyway).
    committed: Mutex<HashMap<i32, i64>>,
    /// Commit results received.
    commits: std::sync::atomic::AtomicU64,
    topic: String,
    metrics: Metrics,
    /// No group: nothing is committed.
    broadcast: bool,
}

impl Group {
    fn worker(&self, partition: i32) -> tokio::sync::mpsc::Sender<Incoming> {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(worker) = workers.get(&partition)
            && !worker.task.is_finished()
        {
            return worker.sender.clone();
        }
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Incoming>(QUEUE);
        let stopping = Arc::new(AtomicBool::new(false));
        let handler = self.handler.clone();
        let done = self.done.clone();
        let stop = stopping.clone();
        let (end, ended) = std::sync::mpsc::channel::<()>();
        let task = self.runtime.spawn(async move {
            let _end = end;
            while let Some(message) = receiver.recv().await {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let offset = message.offset;
                if !handler.handle(message, stop.clone()).await {
                    break;
                }
                done.lock().unwrap_or_else(|p| p.into_inner()).insert(partition, offset + 1);
            }
        });
        workers.insert(partition, Worker { sender: sender.clone(), stopping, task, ended });
        sender
    }

    fn assigned(&self, partitions: &TopicPartitionList) {
        self.metrics.events_rebalances.with_label_values(&[&self.route, "assign"]).inc();
        let list: Vec<i32> = partitions.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(route = %self.route, partitions = ?list, "partitions assigned");
    }

    /// Stops the workers of revoked partitions after the message in hand, then commits what they handled.
    fn revoke(&self, consumer: &BaseConsumer<Context>, partitions: &TopicPartitionList) {
        self.metrics.events_rebalances.with_label_values(&[&self.route, "revoke"]).inc();
        let revoked: Vec<i32> = partitions.elements().iter().map(|e| e.partition()).collect();
        self.stop_workers(&revoked);
        // Asynchronous: the commit request is queued to the group coordinator ahead of the rebalance that
        // follows, and a synchronous one would wait without bound for a broker that went away.
        self.commit(consumer, Some(&revoked), CommitMode::Async);
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        for partition in &revoked {
            done.remove(partition);
            committed.remove(partition);
        }
        tracing::info!(route = %self.route, partitions = ?revoked, "partitions revoked; handled offsets committed");
    }

    fn stop_workers(&self, partitions: &[i32]) {
        let stopped: Vec<Worker> = {
            let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            partitions.iter().filter_map(|p| workers.remove(p)).collect()
        };
        for worker in &stopped {
            worker.stopping.store(true, Ordering::Relaxed);
        }
        let deadline = Instant::now() + REVOKE_WAIT;
        for worker in stopped {
            drop(worker.sender);
            let left = deadline.saturating_duration_since(Instant::now());
            let finished = matches!(
                worker.ended.recv_timeout(left),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) | Ok(())
            );
            if !finished {
                tracing::warn!(route = %self.route, "a worker did not finish its message in time; it will be consumed again");
            }
        }
    }

    /// Commits the handled offsets that moved since the last commit (of `only` these partitions); false
    /// when there was nothing to commit.
    fn commit(&self, consumer: &BaseConsumer<Context>, only: Option<&[i32]>, mode: CommitMode) -> bool {
        if self.broadcast {
            return false;
        }
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        let mut list = TopicPartitionList::new();
        for (partition, offset) in &done {
            if only.is_some_and(|o| !o.contains(partition)) || committed.get(partition) == Some(offset) {
                continue;
            }
            if list.add_partition_offset(&self.topic, *partition, Offset::Offset(*offset)).is_err() {
                continue;
            }
        }
        if list.count() == 0 {
            return false;
        }
        match consumer.commit(&list, mode) {
            Ok(()) => {
                for element in list.elements() {
                    if let Offset::Offset(offset) = element.offset() {
                        committed.insert(element.partition(), offset);
                    }
                }
                true
            }
            Err(error) => {
                tracing::warn!(route = %self.route, %error, "committing offsets failed; they are committed again later");
                false
            }
        }
    }
}

/// A running consumer: its poll thread stops (committing what was handled) when this is dropped or
/// [`Consumer::stop`]ped.
pub struct Consumer {
    stop: Arc<AtomicBool>,
    /// Disconnects when the poll thread ends.
    ended: std::sync::mpsc::Receiver<()>,
}

/// How long [`Consumer::stop`] waits for the poll thread: leaving the group waits for the brokers, and a
/// broker that went away must not hold a shutdown.
const STOP_WAIT: Duration = Duration::from_secs(15);

impl Consumer {
    /// Joins the group and starts consuming; needs a Tokio runtime (the workers run on it). With
    /// `previous` (the consumer this one replaces after a reload), it joins only once that one has left
    /// the group (up to 15 s), so that the partitions move over with their committed offsets and no
    /// event goes through the old route after the new one started.
    pub fn start(
        settings: &ConsumerSettings,
        handler: Arc<dyn Handler>,
        health: HealthHandle,
        metrics: Metrics,
        previous: Option<Consumer>,
    ) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| "no async runtime".to_string())?;
        let mut config = settings.connection.client_config();
        let broadcast = settings.group.is_empty();
        // librdkafka wants a group id for assign() too; a consumer that is assigned its partitions and
        // commits nothing never makes the group known to the brokers.
        let group_id =
            if broadcast { format!("umw-broadcast-{:016x}", fastrand::u64(..)) } else { settings.group.clone() };
        config.set("group.id", &group_id);
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", if settings.from_latest { "latest" } else { "earliest" })
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000");
        let group = Arc::new(Group {
            route: settings.route.clone(),
            runtime,
            handler,
            workers: Mutex::default(),
            done: Arc::default(),
            committed: Mutex::default(),
            commits: std::sync::atomic::AtomicU64::new(0),
            topic: settings.topic.clone(),
            metrics: metrics.clone(),
            broadcast,
        });
        let context = Context {
            health,
            state: Arc::new(AtomicU8::new(UNKNOWN)),
            lag: Some(metrics.events_consumer_lag.with_label_values(&[&settings.route])),
            group: Some(group.clone()),
        };
        let consumer: BaseConsumer<Context> =
            config.create_with_context(context).map_err(|e| format!("Kafka consumer settings: {e}"))?;
        let topic = settings.topic.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_ = stop.clone();
        let name = format!("umw-consumer-{}", settings.route);
        let (end, ended) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let _end = end;
                if let Some(previous) = previous {
                    previous.stop();
                }
                if broadcast {
                    if !assign_at_end(&consumer, &group, &topic, &stop_) {
                        return;
                    }
                } else if let Err(error) = consumer.subscribe(&[&topic]) {
                    tracing::error!(route = %group.route, %error, "subscribing to {topic} failed");
                    return;
                }
                poll_loop(consumer, group, stop_);
            })
            .map_err(|e| format!("starting the consumer thread: {e}"))?;
        Ok(Self { stop, ended })
    }

    /// Stops consuming: the workers finish the message in hand, their offsets are committed, the member
    /// leaves the group. Blocks up to 15 s; call it off the async threads.
    pub fn stop(self) {
        self.stop_within(STOP_WAIT);
    }

    /// [`Consumer::stop`], waiting at most `wait`.
    pub fn stop_within(self, wait: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        if matches!(self.ended.recv_timeout(wait.min(STOP_WAIT)), Err(std::sync::mpsc::RecvTimeoutError::Timeout)) {
            tracing::warn!("a consumer did not leave its group in time (brokers unreachable?); going on without it");
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // The poll thread stops on its own (committing what was handled); nothing waits for it here.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Assigns every partition of `topic` at its current end (the high watermark, read now, so that what is
/// published from here on is read), retrying until it can or the consumer stops.
fn assign_at_end(consumer: &BaseConsumer<Context>, group: &Group, topic: &str, stop: &AtomicBool) -> bool {
    let timeout = Duration::from_secs(5);
    let mut delay = Duration::from_millis(200);
    while !stop.load(Ordering::Relaxed) {
        let assigned = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| e.to_string()).and_then(|metadata| {
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                return Err(format!("topic {topic} has no partitions (does it exist?)"));
            }
            let mut list = TopicPartitionList::new();
            for partition in partitions {
                let (_, high) = consumer.fetch_watermarks(topic, partition, timeout).map_err(|e| e.to_string())?;
                list.add_partition_offset(topic, partition, Offset::Offset(high)).map_err(|e| e.to_string())?;
            }
            consumer.assign(&list).map_err(|e| e.to_string())?;
            Ok(list)
        });
        match assigned {
            Ok(list) => {
                group.assigned(&list);
                return true;
            }
            Err(error) => {
                tracing::warn!(route = %group.route, %error, "cannot assign the partitions of {topic} yet; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    false
}

fn poll_loop(consumer: BaseConsumer<Context>, group: Arc<Group>, stop: Arc<AtomicBool>) {
    // Messages waiting for a paused partition's worker, in order.
    let mut pending: HashMap<i32, VecDeque<Incoming>> = HashMap::new();
    let mut last_commit = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Hand waiting messages on; resume partitions whose backlog is gone.
        let mut resumed = Vec::new();
        for (partition, queue) in pending.iter_mut() {
            let sender = group.worker(*partition);
            while let Some(message) = queue.pop_front() {
                match sender.try_send(message) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Full(message))
                    | Err(tokio::sync::mpsc::error::TrySendError::Closed(message)) => {
                        queue.push_front(message);
                        break;
                    }
                }
            }
            if queue.is_empty() {
                resumed.push(*partition);
            }
        }
        for partition in resumed {
            pending.remove(&partition);
            let mut list = TopicPartitionList::new();
            list.add_partition(&group.topic, partition);
            if let Err(error) = consumer.resume(&list) {
                tracing::debug!(%error, partition, "resuming a partition failed");
            }
        }
        match consumer.poll(Duration::from_millis(100)) {
            // Polled after the stop: not handled, not committed; the next owner gets it.
            Some(Ok(_)) if stop.load(Ordering::Relaxed) => {}
            Some(Ok(message)) => {
                let incoming = Incoming {
                    topic: message.topic().to_string(),
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    headers: message
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    payload: message.payload().map(<[u8]>::to_vec),
                };
                let partition = incoming.partition;
                if let Some(queue) = pending.get_mut(&partition) {
                    queue.push_back(incoming);
                } else if let Err(error) = group.worker(partition).try_send(incoming) {
                    let incoming = match error {
                        tokio::sync::mpsc::error::TrySendError::Full(m)
                        | tokio::sync::mpsc::error::TrySendError::Closed(m) => m,
                    };
                    pending.entry(partition).or_default().push_back(incoming);
                    let mut list = TopicPartitionList::new();
                    list.add_partition(&group.topic, partition);
                    match consumer.pause(&list) {
                        Ok(()) => group.metrics.events_paused.with_label_values(&[&group.route]).inc(),
                        Err(error) => tracing::debug!(%error, partition, "pausing a partition failed"),
                    }
                }
            }
            Some(Err(error)) => tracing::debug!(route = %group.route, %error, "consumer error"),
            None => {}
        }
        // Revoked partitions have no business in the backlog.
        if let Ok(assignment) = consumer.assignment() {
            let assigned: Vec<i32> = assignment.elements().iter().map(|e| e.partition()).collect();
            pending.retain(|p, _| assigned.contains(p));
        }
        if last_commit.elapsed() >= Duration::from_secs(1) {
            group.commit(&consumer, None, CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    // Stopping: finish the messages in hand, commit, leave the group.
    let partitions: Vec<i32> = group.workers.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
    group.stop_workers(&partitions);
    // Commit and wait (a bounded while, polling for the result: librdkafka's synchronous commit waits
    // without bound for a broker that went away); what is not committed is consumed again by the next
    // member.
    let before = group.commits.load(Ordering::Relaxed);
    if group.commit(&consumer, None, CommitMode::Async) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while group.commits.load(Ordering::Relaxed) == before && Instant::now() < deadline {
            // Messages polled now are not handled, so not committed: the next owner gets them.
            let _ = consumer.poll(Duration::from_millis(50));
        }
    }
    if group.broadcast {
        let _ = consumer.unassign();
        tracing::info!(route = %group.route, "consumer stopped");
        return;
    }
    consumer.unsubscribe();
    tracing::info!(route = %group.route, "consumer stopped; handled offsets committed");
}
