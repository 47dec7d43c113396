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
    l1: Arc<L1>,
    l2: Arc<RedisCache>,
    channel: String,
    /// This replica's id in messages, to ignore its own.
    id: String,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The in-process tier, shared with the task that hears the other replicas.
struct L1 {
    cache: MemoryCache,
    /// True while the subscription is up: only then is the tier trusted.
    coherent: AtomicBool,
    /// Bumped by every invalidation of the tier (local or heard), before it deletes: a read of Redis fills
    /// the tier only if none happened meanwhile, so that a copy read just before an invalidation is not put
    /// back after it.
    generation: AtomicU64,
}

impl L1 {
    fn new(bytes: u64) -> Self {
        Self { cache: MemoryCache::new(bytes), coherent: AtomicBool::new(false), generation: AtomicU64::new(0) }
    }

    fn usable(&self) -> Option<&MemoryCache> {
        self.coherent.load(Ordering::SeqCst).then_some(&self.cache)
    }

    async fn drop_key(&self, key: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let _ = self.cache.delete(key).await;
    }

    async fn drop_prefix(&self, prefix: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let _ = self.cache.delete_prefix(prefix).await;
    }

    fn drop_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.clear();
    }

    /// What the tier holds for `key`, else what `read` (of Redis) finds, kept in the tier unless an
    /// invalidation came while it was read.
    async fn read_through(
        &self,
        key: &str,
        read: impl Future<Output = Result<Option<Arc<Entry>>, CacheError>>,
    ) -> Result<Option<Arc<Entry>>, CacheError> {
        if let Some(l1) = self.usable()
            && let Ok(Some(entry)) = l1.get(key).await
        {
            return Ok(Some(entry));
        }
        let seen = self.generation.load(Ordering::SeqCst);
        let entry = read.await?;
        if let (Some(l1), Some(entry)) = (self.usable(), &entry)
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

    /// Applies an invalidation heard from another replica.
    async fn apply(&self, what: &str) {
        match what.split_once(':') {
            Some(("key", key)) => self.drop_key(key).await,
            Some(("prefix", prefix)) => self.drop_prefix(prefix).await,
            // Tags are known to Redis only: drop the whole tier, it refills from Redis.
            _ => self.drop_all(),
        }
    }
}

impl TieredCache {
    /// `channel` is per Middleware (`<prefix>l1`). The in-process tier is used once
    /// [activated](Self::activate) and subscribed.
    pub fn new(l2: Arc<RedisCache>, channel: String) -> Self {
        let id = format!("{:016x}", fastrand::u64(..));
        Self { l1: Arc::new(L1::new(L1_BYTES)), l2, channel, id, task: std::sync::Mutex::new(None) }
    }

    /// Connects Redis and subscribes to the other replicas' invalidations. Needs a Tokio runtime.
    pub fn activate(&self) {
        self.l2.activate();
        let (Ok(mut task), Ok(handle)) = (self.task.lock(), tokio::runtime::Handle::try_current()) else { return };
        if task.is_none() {
            let (l1, l2, channel, id) = (self.l1.clone(), self.l2.clone(), self.channel.clone(), self.id.clone());
            *task = Some(handle.spawn(listen(l1, l2, channel, id)));
        }
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
async fn listen(l1: Arc<L1>, l2: Arc<RedisCache>, channel: String, id: String) {
    let mut delay = Duration::from_millis(100);
    loop {
        match l2.subscriber(&channel).await {
            Ok(pubsub) => {
                delay = Duration::from_millis(100);
                l1.coherent.store(true, Ordering::SeqCst);
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Ok(text) = message.get_payload::<String>() else { continue };
                    let Some((from, what)) = text.split_once(' ') else { continue };
                    if from != id {
                        l1.apply(what).await;
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "cannot subscribe to the cache invalidation channel"),
        }
        // Not hearing the others: forget what L1 holds and read Redis alone until subscribed again.
        l1.coherent.store(false, Ordering::SeqCst);
        l1.drop_all();
        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64())).await;
        delay = (delay * 2).min(Duration::from_secs(5));
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
        self.l1.read_through(key, self.l2.get(key)).boxed()
    }

    fn put<'a>(&'a self, key: &'a str, entry: &'a Entry, keep: Duration) -> BoxFuture<'a, Result<(), CacheError>> {
        async move {
            self.l2.put(key, entry, keep).await?;
            if let Some(l1) = self.l1.usable() {
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
            self.l1.drop_key(key).await;
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
            self.l1.drop_all();
            self.tell_others("flush:").await;
            Ok(deleted)
        }
        .boxed()
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move {
            let deleted = self.l2.delete_prefix(prefix).await?;
            self.l1.drop_prefix(prefix).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &'static str) -> Entry {
        let now = super::super::entry::now_ms();
        Entry {
            status: 200,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(body.as_bytes()),
            stored_ms: now,
            fresh_until_ms: now + 60_000,
            stale_until_ms: now + 60_000,
            vary: Vec::new(),
        }
    }

    fn coherent() -> L1 {
        let l1 = L1::new(1 << 20);
        l1.coherent.store(true, Ordering::SeqCst);
        l1
    }

    #[tokio::test]
    async fn a_read_of_redis_fills_the_in_process_tier() {
        let l1 = coherent();
        let read = l1.read_through("k", async { Ok(Some(Arc::new(entry("v1")))) }).await.unwrap();
        assert_eq!(read.unwrap().body, "v1");
        assert_eq!(l1.cache.get("k").await.unwrap().expect("kept in the tier").body, "v1");
        // The next read is answered by the tier: Redis is not read.
        let read = l1.read_through("k", async { panic!("Redis was read on a hit") }).await.unwrap();
        assert_eq!(read.unwrap().body, "v1");
    }

    #[tokio::test]
    async fn a_copy_read_before_an_invalidation_is_not_put_back_after_it() {
        // The read of Redis returns the old copy, and the invalidation (another replica's write, heard over
        // pub/sub) is applied while that read is in flight: after it, the tier must not hold the old copy.
        for what in ["key:k", "prefix:k", "flush:"] {
            let l1 = coherent();
            let read = l1
                .read_through("k", async {
                    l1.apply(what).await;
                    Ok(Some(Arc::new(entry("old"))))
                })
                .await
                .unwrap();
            assert_eq!(read.unwrap().body, "old", "the caller still gets what Redis had");
            assert!(l1.cache.get("k").await.unwrap().is_none(), "{what}: the old copy was put back in the tier");
        }
    }

    #[tokio::test]
    async fn an_incoherent_tier_is_neither_read_nor_filled() {
        let l1 = coherent();
        l1.cache.put("k", &entry("stale"), Duration::ZERO).await.unwrap();
        l1.coherent.store(false, Ordering::SeqCst);
        let read = l1.read_through("k", async { Ok(Some(Arc::new(entry("fresh")))) }).await.unwrap();
        assert_eq!(read.unwrap().body, "fresh");
        assert_eq!(l1.cache.get("k").await.unwrap().unwrap().body, "stale", "not filled while incoherent");
    }
}
