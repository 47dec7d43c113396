//! Response caching: the [`Cache`] trait with an in-process ([`memory`]) and a Redis ([`redis`])
//! implementation, and the chain's cache stage ([`stage`]) that applies CachePolicy rules.
//!
//! [`component`] builds it from the CachePolicies: a cache stage per route that a rule covers, the
//! `/cache/invalidate` admin endpoint, event-driven invalidation through the events' `Subscribe` port, and
//! the warm-up task.

pub mod component;
pub mod entry;
mod invalidation;
pub mod memory;
pub mod redis;
pub mod stage;
pub mod tiered;
pub mod warmup;

use std::time::Duration;

use futures::future::BoxFuture;

pub use entry::Entry;

/// Why a cache operation failed. The stage treats every failure as a miss (fail open) and counts it.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the cache did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the cache is unavailable (circuit open after repeated errors)")]
    Unavailable,
    #[error("cache backend: {0}")]
    Backend(String),
    #[error("a cached entry could not be decoded")]
    Corrupt,
}

impl CacheError {
    pub fn kind(&self) -> &'static str {
        match self {
            CacheError::Timeout(_) => "timeout",
            CacheError::Unavailable => "unavailable",
            CacheError::Backend(_) => "backend",
            CacheError::Corrupt => "corrupt",
        }
    }
}

/// Where entries live. Keys are strings the stage builds; values are [`Entry`]s.
pub trait Cache: Send + Sync + 'static {
    /// `memory` or `redis`: the metric label.
    fn backend(&self) -> &'static str;
    /// False while the backend is known not to answer (not connected, circuit open): writes are not tried
    /// and responses do not claim to be stored.
    fn available(&self) -> bool {
        true
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<std::sync::Arc<Entry>>, CacheError>>;
    /// Stores `entry` for `keep` (its freshness plus the stale windows).
    fn put<'a>(&'a self, key: &'a str, entry: &'a Entry, keep: Duration) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Deletes one key; returns how many entries went (0 or 1).
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<usize, CacheError>>;
    /// Records that `key` carries the tag whose set is `tag_key`, for `keep` at least.
    fn tag<'a>(&'a self, tag_key: &'a str, key: &'a str, keep: Duration) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Deletes every entry carrying the tag; returns how many.
    fn delete_tag<'a>(&'a self, tag_key: &'a str) -> BoxFuture<'a, Result<usize, CacheError>>;
    /// Deletes every entry whose key starts with `prefix`; returns how many.
    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<usize, CacheError>>;
    /// Takes a lock shared by every replica for `ttl` (so that a holder that dies cannot block the others
    /// longer); `Some(token)` when taken. The in-process backend has no other replicas: always taken.
    fn lock<'a>(&'a self, key: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Option<String>, CacheError>>;
    /// Releases a lock taken with `token` (and only if still held with it).
    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> BoxFuture<'a, Result<(), CacheError>>;
}

pub use crate::kernel::ports::Invalidation;

/// Invalidation over the caches of one configuration: what the admin API and event consumers call.
pub struct Invalidator {
    /// `umw:<namespace>/<middleware>:`.
    pub prefix: String,
    pub caches: Vec<std::sync::Arc<dyn Cache>>,
    /// Bearer tokens the admin API accepts (empty: the admin API is off).
    pub tokens: Vec<String>,
    pub metrics: crate::kernel::metrics::Metrics,
}

impl crate::kernel::ports::Invalidate for Invalidator {
    fn invalidate<'a>(&'a self, what: &'a Invalidation) -> BoxFuture<'a, Result<usize, String>> {
        Box::pin(async move { Invalidator::invalidate(self, what).await.map_err(|e| e.to_string()) })
    }
}

impl Invalidator {
    /// The Redis set of a tag.
    pub fn tag_key(prefix: &str, tag: &str) -> String {
        format!("{prefix}tag:{tag}")
    }

    /// The set of the variants of the entry under `key` (a response with `Vary`).
    pub fn variants_key(key: &str) -> String {
        format!("{key}|variants")
    }

    /// Deletes what `what` names from every cache; returns how many entries went.
    pub async fn invalidate(&self, what: &Invalidation) -> Result<usize, CacheError> {
        let mut deleted = 0;
        for cache in &self.caches {
            for key in &what.keys {
                let full = format!("{}{key}", self.prefix);
                deleted += cache.delete(&full).await?;
                // A response with Vary has its variants in a set under the key, as a tag has its entries:
                // no scan of the keyspace.
                deleted += cache.delete_tag(&Self::variants_key(&full)).await?;
                self.count("key");
            }
            for prefix in &what.prefixes {
                deleted += cache.delete_prefix(&format!("{}{prefix}", self.prefix)).await?;
                self.count("prefix");
            }
            for tag in &what.tags {
                deleted += cache.delete_tag(&Self::tag_key(&self.prefix, tag)).await?;
                self.count("tag");
            }
        }
        Ok(deleted)
    }

    fn count(&self, by: &str) {
        self.metrics.cache_invalidations.with_label_values(&[by]).inc();
    }

    /// Whether `token` is one of the admin tokens, compared in constant time.
    pub fn accepts(&self, token: &str) -> bool {
        self.tokens.iter().any(|t| crate::kernel::secret::constant_time_eq(t.as_bytes(), token.as_bytes()))
    }
}
