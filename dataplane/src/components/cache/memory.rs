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

pub struct MemoryCache {
    entries: moka::future::Cache<String, Arc<Entry>>,
    /// Tag → keys. Members whose entry expired are dropped when the tag is invalidated.
    tags: std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>,
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
        Self { entries, tags: Default::default() }
    }
}

impl MemoryCache {
    /// Drops every entry and tag.
    pub fn clear(&self) {
        self.entries.invalidate_all();
        if let Ok(mut tags) = self.tags.lock() {
            tags.clear();
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
            if let Ok(mut tags) = self.tags.lock() {
                tags.entry(tag_key.to_string()).or_default().insert(key.to_string());
            }
            Ok(())
        }
        .boxed()
    }

    fn delete_tag<'a>(&'a self, tag_key: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move {
            let keys = self.tags.lock().ok().and_then(|mut tags| tags.remove(tag_key)).unwrap_or_default();
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
