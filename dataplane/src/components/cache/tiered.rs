//! The two-tier cache: a small in-process tier (L1) in front of Redis (L2), kept coherent across replicas
//! by invalidation messages over Redis pub/sub.
//!
//! Reads try L1, then Redis (and keep what Redis had in L1). Writes go to both and tell the other replicas
//! to drop the key from their L1 (they fetch the new version from Redis next time). Invalidations go to
//! Redis, to L1, and to the other replicas. L1 is used only while the subscription is up: a replica that
//! cannot hear the others drops its L1 and reads Redis alone until it can again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};

use super::memory::MemoryCache;
use super::redis::RedisCache;
use super::{Cache, CacheError, Entry};

/// Default size of the in-process tier.
pub const L1_BYTES: u64 = 16 * 1024 * 1024;

pub struct TieredCache {
    l1: Arc<MemoryCache>,
    l2: Arc<RedisCache>,
    channel: String,
    /// This replica's id in messages, to ignore its own.
    id: String,
    /// True while the subscription is up: only then is L1 trusted.
    coherent: Arc<AtomicBool>,
    /// Bumped by every invalidation of the in-process tier (local or heard): a read of Redis fills the tier
    /// only if none happened meanwhile, so that a copy read just before an invalidation is not put back
    /// after it.
    generation: Arc<AtomicU64>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl TieredCache {
    /// `channel` is per Middleware (`<prefix>l1`). The in-process tier is used once
    /// [activated](Self::activate) and subscribed.
    pub fn new(l2: Arc<RedisCache>, channel: String) -> Self {
        let l1 = Arc::new(MemoryCache::new(L1_BYTES));
        let id = format!("{:016x}", fastrand::u64(..));
        let coherent = Arc::new(AtomicBool::new(false));
        Self { l1, l2, channel, id, coherent, generation: Arc::default(), task: std::sync::Mutex::new(None) }
    }

    /// Connects Redis and subscribes to the other replicas' invalidations. Needs a Tokio runtime.
    pub fn activate(&self) {
        self.l2.activate();
        let (Ok(mut task), Ok(handle)) = (self.task.lock(), tokio::runtime::Handle::try_current()) else { return };
        if task.is_none() {
            let (l1, l2, channel, id) = (self.l1.clone(), self.l2.clone(), self.channel.clone(), self.id.clone());
            let (coherent, generation) = (self.coherent.clone(), self.generation.clone());
            *task = Some(handle.spawn(listen(l1, l2, channel, id, coherent, generation)));
        }
    }

    fn l1(&self) -> Option<&MemoryCache> {
        self.coherent.load(Ordering::SeqCst).then_some(self.l1.as_ref())
    }

    async fn tell_others(&self, what: &str) {
        let message = format!("{} {what}", self.id);
        if let Err(error) = self.l2.publish(&self.channel, &message).await {
            // Others would keep a stale copy: they must not be trusted to have heard it. Nothing more can
            // be done from here; their subscriptions see the same Redis and resynchronise when it is back.
            tracing::warn!(%error, "could not tell the other replicas to drop a cached entry");
        }
    }
}

impl Drop for TieredCache {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// Listens for the other replicas' invalidations, reconnecting with backoff.
async fn listen(
    l1: Arc<MemoryCache>,
    l2: Arc<RedisCache>,
    channel: String,
    id: String,
    coherent: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        match l2.subscriber(&channel).await {
            Ok(pubsub) => {
                delay = Duration::from_millis(100);
                coherent.store(true, Ordering::SeqCst);
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Ok(text) = message.get_payload::<String>() else { continue };
                    let Some((from, what)) = text.split_once(' ') else { continue };
                    if from == id {
                        continue;
                    }
                    generation.fetch_add(1, Ordering::SeqCst);
                    apply(&l1, what).await;
                }
            }
            Err(error) => tracing::debug!(%error, "cannot subscribe to the cache invalidation channel"),
        }
        // Not hearing the others: forget what L1 holds and read Redis alone until subscribed again.
        coherent.store(false, Ordering::SeqCst);
        generation.fetch_add(1, Ordering::SeqCst);
        l1.clear();
        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64())).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn apply(l1: &MemoryCache, what: &str) {
    match what.split_once(':') {
        Some(("key", key)) => {
            let _ = l1.delete(key).await;
        }
        Some(("prefix", prefix)) => {
            let _ = l1.delete_prefix(prefix).await;
        }
        // Tags are known to Redis only: drop the whole tier, it refills from Redis.
        _ => l1.clear(),
    }
}

impl Cache for TieredCache {
    fn backend(&self) -> &'static str {
        "tiered"
    }

    fn available(&self) -> bool {
        self.l2.available()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<Entry>>, CacheError>> {
        async move {
            if let Some(l1) = self.l1()
                && let Ok(Some(entry)) = l1.get(key).await
            {
                return Ok(Some(entry));
            }
            let seen = self.generation.load(Ordering::SeqCst);
            let entry = self.l2.get(key).await?;
            if let (Some(l1), Some(entry)) = (self.l1(), &entry)
                && self.generation.load(Ordering::SeqCst) == seen
            {
                let _ = l1.put(key, entry, Duration::ZERO).await;
                // An invalidation that came in while the copy was put: it may have deleted before the put.
                if self.generation.load(Ordering::SeqCst) != seen {
                    let _ = l1.delete(key).await;
                }
            }
            Ok(entry)
        }
        .boxed()
    }

    fn put<'a>(&'a self, key: &'a str, entry: &'a Entry, keep: Duration) -> BoxFuture<'a, Result<(), CacheError>> {
        async move {
            self.l2.put(key, entry, keep).await?;
            if let Some(l1) = self.l1() {
                let _ = l1.put(key, entry, keep).await;
            }
            self.tell_others(&format!("key:{key}")).await;
            Ok(())
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move {
            let deleted = self.l2.delete(key).await?;
            self.generation.fetch_add(1, Ordering::SeqCst);
            let _ = self.l1.delete(key).await;
            self.tell_others(&format!("key:{key}")).await;
            Ok(deleted)
        }
        .boxed()
    }

    fn tag<'a>(&'a self, tag_key: &'a str, key: &'a str, keep: Duration) -> BoxFuture<'a, Result<(), CacheError>> {
        self.l2.tag(tag_key, key, keep)
    }

    fn delete_tag<'a>(&'a self, tag_key: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move {
            let deleted = self.l2.delete_tag(tag_key).await?;
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.l1.clear();
            self.tell_others("flush:").await;
            Ok(deleted)
        }
        .boxed()
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move {
            let deleted = self.l2.delete_prefix(prefix).await?;
            self.generation.fetch_add(1, Ordering::SeqCst);
            let _ = self.l1.delete_prefix(prefix).await;
            self.tell_others(&format!("prefix:{prefix}")).await;
            Ok(deleted)
        }
        .boxed()
    }

    fn lock<'a>(&'a self, key: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Option<String>, CacheError>> {
        self.l2.lock(key, ttl)
    }

    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        self.l2.unlock(key, token)
    }
}
