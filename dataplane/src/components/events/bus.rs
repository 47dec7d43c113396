//! Where events are published: Kafka, or, for a data plane running on its own, an in-process bus with
//! the same routing, filters, retries and dead-letter topics — but no durability: a topic keeps nothing,
//! each event route reading it gets the events published after it started, and a restart loses what
//! was queued.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use futures::FutureExt as _;
use futures::future::BoxFuture;

use super::envelope::Wire;
use super::kafka::{Delivered, Incoming, PublishError};

/// Publishes records to topics.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes and waits for the acknowledgement.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a [u8]>,
        wire: &'a Wire,
    ) -> BoxFuture<'a, Result<Delivered, PublishError>>;
}

impl Publisher for super::kafka::Producer {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a [u8]>,
        wire: &'a Wire,
    ) -> BoxFuture<'a, Result<Delivered, PublishError>> {
        super::kafka::Producer::publish(self, topic, key, wire).boxed()
    }
}

/// Events an in-process subscriber may have queued before publishers are told to back off.
const QUEUE: usize = 1024;

/// The in-process bus.
#[derive(Default)]
pub struct InProcessBus {
    topics: Mutex<HashMap<String, Topic>>,
}

#[derive(Default)]
struct Topic {
    next_offset: i64,
    subscribers: Vec<tokio::sync::mpsc::Sender<Incoming>>,
}

impl InProcessBus {
    /// Every event published to `topic` from now on.
    pub fn subscribe(&self, topic: &str) -> tokio::sync::mpsc::Receiver<Incoming> {
        let (sender, receiver) = tokio::sync::mpsc::channel(QUEUE);
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.entry(topic.to_string()).or_default().subscribers.push(sender);
        receiver
    }
}

impl Publisher for InProcessBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a [u8]>,
        wire: &'a Wire,
    ) -> BoxFuture<'a, Result<Delivered, PublishError>> {
        let result = (|| {
            let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            let entry = topics.entry(topic.to_string()).or_default();
            entry.subscribers.retain(|s| !s.is_closed());
            // All or nothing: a subscriber that is full refuses the event for every one.
            if entry.subscribers.iter().any(|s| s.capacity() == 0) {
                return Err(PublishError::Full(QUEUE));
            }
            let offset = entry.next_offset;
            entry.next_offset += 1;
            let message = Incoming {
                topic: topic.to_string(),
                partition: 0,
                offset,
                key: key.map(<[u8]>::to_vec),
                headers: wire.headers.iter().map(|(n, v)| (n.clone(), v.clone().into_bytes())).collect(),
                payload: Some(wire.body.clone()),
            };
            for subscriber in &entry.subscribers {
                let _ = subscriber.try_send(message.clone());
            }
            Ok(Delivered { partition: 0, offset })
        })();
        async move { result }.boxed()
    }
}

/// Runs an event route over an in-process topic until dropped.
pub struct BusConsumer {
    task: tokio::task::JoinHandle<()>,
}

impl BusConsumer {
    pub fn start(bus: &InProcessBus, topic: &str, handler: Arc<dyn super::kafka::Handler>) -> Self {
        let mut receiver = bus.subscribe(topic);
        let task = tokio::spawn(async move {
            let stopping = Arc::new(AtomicBool::new(false));
            while let Some(message) = receiver.recv().await {
                handler.handle(message, stopping.clone()).await;
            }
        });
        Self { task }
    }
}

impl Drop for BusConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
