//! The in-process cache: bounded by bytes, entries expire when their stale window ends. Not shared
//! between replicas and lost on restart: for standalone use, or a Middleware without Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use moka::Expiry;

use super::entry::now_ms;
use super::{Cache, CacheError, Entry};

/// Default size bound of the in-process cache.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Default bound of the tag index (tag memberships, variants of entries with `Vary` included).
pub const DEFAULT_MAX_TAG_MEMBERS: usize = 100_000;

pub struct MemoryCache {
    entries: moka::future::Cache<String, Arc<Entry>>,
    /// Tag → keys, bounded: members whose entry is gone are pruned when the bound is reached.
    tags: std::sync::Mutex<Tags>,
    max_tag_members: usize,
}

#[derive(Default)]
struct Tags {
    sets: std::collections::HashMap<String, std::collections::HashSet<String>>,
    members: usize,
    /// The next prune, when `members` reaches it (so that a full index of live entries is not rescanned on
    /// every insert).
    prune_at: usize,
}

struct UntilStale;

impl Expiry<String, Arc<Entry>> for UntilStale {
    fn expire_after_create(&self, _: &String, entry: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(Duration::from_millis(entry.stale_until_ms.saturating_sub(now_ms())))
    }

    fn expire_after_update(&self, _: &String, entry: &Arc<Entry>, _: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(Duration::from_millis(entry.stale_until_ms.saturating_sub(now_ms())))
    }
}

impl MemoryCache {
    pub fn new(max_bytes: u64) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &String, entry: &Arc<Entry>| entry.weight())
            .expire_after(UntilStale)
            .build();
        Self { entries, tags: Default::default(), max_tag_members: DEFAULT_MAX_TAG_MEMBERS }
    }

    /// With another bound on the tag index.
    pub fn with_tag_limit(mut self, max_tag_members: usize) -> Self {
        self.max_tag_members = max_tag_members.max(1);
        self
    }

    /// How many tag memberships are kept.
    pub fn tag_members(&self) -> usize {
        self.tags.lock().map(|t| t.members).unwrap_or(0)
    }
}

impl MemoryCache {
    /// Drops every entry and tag.
    pub fn clear(&self) {
        self.entries.invalidate_all();
        if let Ok(mut tags) = self.tags.lock() {
            *tags = Tags::default();
        }
    }
}

impl Cache for MemoryCache {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<Entry>>, CacheError>> {
        async move { Ok(self.entries.get(key).await) }.boxed()
    }

    fn put<'a>(&'a self, key: &'a str, entry: &'a Entry, _keep: Duration) -> BoxFuture<'a, Result<(), CacheError>> {
        async move {
            self.entries.insert(key.to_string(), Arc::new(entry.clone())).await;
            Ok(())
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move { Ok(usize::from(self.entries.remove(key).await.is_some())) }.boxed()
    }

    fn tag<'a>(&'a self, tag_key: &'a str, key: &'a str, _keep: Duration) -> BoxFuture<'a, Result<(), CacheError>> {
        async move {
            let full = {
                let Ok(mut tags) = self.tags.lock() else { return Err(CacheError::Unavailable) };
                if tags.members >= self.max_tag_members && tags.members >= tags.prune_at {
                    // Drop the members whose entry expired or was evicted.
                    let entries = &self.entries;
                    tags.sets.retain(|_, keys| {
                        keys.retain(|k| entries.contains_key(k));
                        !keys.is_empty()
                    });
                    tags.members = tags.sets.values().map(|k| k.len()).sum();
                    tags.prune_at = tags.members + self.max_tag_members / 10 + 1;
                }
                let full = tags.members >= self.max_tag_members;
                if !full && tags.sets.entry(tag_key.to_string()).or_default().insert(key.to_string()) {
                    tags.members += 1;
                }
                full
            };
            if full {
                // An entry that a tag invalidation could not find must not be served.
                self.entries.remove(key).await;
                return Err(CacheError::Backend("the in-process tag index is full".into()));
            }
            Ok(())
        }
        .boxed()
    }

    fn delete_tag<'a>(&'a self, tag_key: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move {
            let keys = self
                .tags
                .lock()
                .ok()
                .and_then(|mut tags| {
                    let keys = tags.sets.remove(tag_key)?;
                    tags.members -= keys.len();
                    Some(keys)
                })
                .unwrap_or_default();
            let mut deleted = 0;
            for key in keys {
                if self.entries.remove(&key).await.is_some() {
                    deleted += 1;
                }
            }
            Ok(deleted)
        }
        .boxed()
    }

    fn lock<'a>(&'a self, _key: &'a str, _ttl: Duration) -> BoxFuture<'a, Result<Option<String>, CacheError>> {
        async move { Ok(Some(String::new())) }.boxed()
    }

    fn unlock<'a>(&'a self, _key: &'a str, _token: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        async move { Ok(()) }.boxed()
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move {
            let keys: Vec<String> =
                self.entries.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, _)| k.as_ref().clone()).collect();
            let mut deleted = 0;
            for key in keys {
                if self.entries.remove(&key).await.is_some() {
                    deleted += 1;
                }
            }
            Ok(deleted)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let now = now_ms();
        Entry {
            status: 200,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::new(),
            stored_ms: now,
            fresh_until_ms: now + 60_000,
            stale_until_ms: now + 60_000,
            vary: Vec::new(),
        }
    }

    #[tokio::test]
    async fn the_tag_index_stays_within_its_bound_and_never_keeps_an_untagged_entry() {
        let cache = MemoryCache::new(DEFAULT_MAX_BYTES).with_tag_limit(100);
        let keep = Duration::from_secs(60);
        // Entries that go (deleted, as expiry or eviction would) leave members behind, pruned at the bound.
        for i in 0..1000 {
            let key = format!("k{i}");
            cache.put(&key, &entry(), keep).await.unwrap();
            cache.tag(&format!("tag{}", i % 7), &key, keep).await.unwrap();
            cache.delete(&key).await.unwrap();
        }
        assert!(cache.tag_members() <= 100, "{} members", cache.tag_members());
        // Live entries fill it: one more is refused, and its entry dropped rather than kept untaggable.
        for i in 0..100 {
            let key = format!("live{i}");
            cache.put(&key, &entry(), keep).await.unwrap();
            let _ = cache.tag("live", &key, keep).await;
        }
        cache.put("last", &entry(), keep).await.unwrap();
        assert!(cache.tag("live", "last", keep).await.is_err());
        assert!(cache.get("last").await.unwrap().is_none(), "the untagged entry is not served");
        assert_eq!(cache.delete_tag("live").await.unwrap(), 100);
        assert_eq!(cache.tag_members(), 0);
    }
}
