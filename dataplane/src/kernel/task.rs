//! Background work a configuration asks for (Kafka consumers, outbox relays, cache warm-up, producer
//! flushes), described by components and run by the runtime's supervisor: started when a snapshot that
//! names it is committed, replaced when its version changes, stopped when no snapshot names it, and
//! stopped together under one deadline at shutdown.

use std::hash::{Hash, Hasher};
use std::time::Instant;

use futures::future::BoxFuture;

use super::health::Health;
use super::metrics::Metrics;
use super::ports::Loopback;

/// What a task is, independent of its settings: two snapshots that name the same key run one task.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey {
    /// The component that owns it.
    pub component: &'static str,
    /// `consumer`, `relay`, `warmup`, ...
    pub kind: &'static str,
    /// Which one (an event route, a table, a topic).
    pub name: String,
}

impl TaskKey {
    pub fn new(component: &'static str, kind: &'static str, name: impl Into<String>) -> Self {
        Self { component, kind, name: name.into() }
    }
}

impl std::fmt::Display for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.component, self.kind, self.name)
    }
}

/// When a task stops at shutdown: work first (consumers commit, relays finish their batch), then what the
/// work publishes through (producers flush).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Wave {
    Work,
    Flush,
}

/// What the supervisor gives a task that starts.
#[derive(Clone)]
pub struct TaskCx {
    pub health: Health,
    pub metrics: Metrics,
    /// The gateway's own chain, for tasks that send requests through it (warm-up).
    pub loopback: Loopback,
    /// Whether this is the first snapshot of the process (readiness may wait for the task).
    pub first: bool,
}

/// What starts a task.
pub type Start = Box<dyn FnOnce(&TaskCx) -> Result<Box<dyn Running>, String> + Send>;

/// A task a snapshot asks for.
pub struct TaskSpec {
    pub key: TaskKey,
    /// Changes whenever anything the task depends on does; an equal version keeps the running task.
    pub version: u64,
    pub wave: Wave,
    pub start: Start,
}

impl TaskSpec {
    pub fn new(
        key: TaskKey,
        version: u64,
        start: impl FnOnce(&TaskCx) -> Result<Box<dyn Running>, String> + Send + 'static,
    ) -> Self {
        Self { key, version, wave: Wave::Work, start: Box::new(start) }
    }

    pub fn in_wave(mut self, wave: Wave) -> Self {
        self.wave = wave;
        self
    }
}

/// A started task.
pub trait Running: Send + 'static {
    /// Stops, finishing the work in hand, by `deadline` at the latest.
    fn stop(self: Box<Self>, deadline: Instant) -> BoxFuture<'static, ()>;
}

/// A task that is a tokio task with nothing to finish: stopping (or dropping) aborts it.
pub struct Aborting(pub tokio::task::JoinHandle<()>);

impl Running for Aborting {
    fn stop(self: Box<Self>, _deadline: Instant) -> BoxFuture<'static, ()> {
        drop(self);
        Box::pin(async {})
    }
}

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A version from anything hashable (settings hash by their values, credentials included).
pub fn version_of(value: &impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}
