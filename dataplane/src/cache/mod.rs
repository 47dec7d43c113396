//! Response caching: the [`Cache`] trait with an in-process ([`memory`]) and a Redis ([`redis`])
//! implementation, and the chain's cache stage ([`stage`]) that applies CachePolicy rules.
//!
//! The cache component imports nothing of its siblings: the runtime builds it from a snapshot and puts
//! its stage in the chain's cache slot.

pub mod entry;
pub mod memory;
pub mod redis;
pub mod stage;

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
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Entry>, CacheError>>;
    /// Stores `entry` for `keep` (its freshness plus the stale windows).
    fn put<'a>(&'a self, key: &'a str, entry: &'a Entry, keep: Duration) -> BoxFuture<'a, Result<(), CacheError>>;
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), CacheError>>;
}
