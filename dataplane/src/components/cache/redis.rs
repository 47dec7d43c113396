//! The Redis cache: standalone or Cluster, multiplexed connections that reconnect by themselves (with
//! backoff and jitter), a deadline on every operation, and a circuit breaker so that a Redis that is down
//! or slow costs requests nothing but a miss. Its health is the `redis` component in `/status`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Cache, CacheError, Entry};
use crate::kernel::breaker::{Admission, Breaker, BreakerState};
use crate::kernel::health::{Health, HealthHandle, State};
use crate::kernel::secret::Secret;

/// Default deadline of one Redis operation: a cache that answers later than this is worse than none.
pub const OPERATION_TIMEOUT: Duration = Duration::from_millis(250);

/// The name of the Redis component in `/status`.
pub const COMPONENT: &str = "redis";

/// How to reach Redis.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RedisSettings {
    pub url: String,
    pub password: Option<Secret>,
    /// PEM roots for `rediss://` instead of the system's.
    pub ca_cert: Option<String>,
    pub cluster: bool,
    /// Deadline of one operation.
    pub timeout: Duration,
}

#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

pub struct RedisCache {
    connection: Arc<arc_swap::ArcSwapOption<Connection>>,
    /// A client for pub/sub: the standalone server, or the given node of a Cluster (PUBLISH reaches every
    /// node of a Cluster).
    pubsub: Option<redis::Client>,
    breaker: Breaker,
    timeout: Duration,
    health: HealthHandle,
    metrics: crate::kernel::metrics::Metrics,
    /// Connecting, in the background once activated.
    connect: Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Why the settings cannot make a client.
#[derive(Debug, thiserror::Error)]
#[error("Redis connection settings: {0}")]
pub struct SettingsError(String);

impl RedisCache {
    /// Creates the client; it connects in the background once [activated](Self::activate), and until
    /// connected every operation is a miss.
    pub fn new(
        settings: &RedisSettings,
        health: &Health,
        metrics: crate::kernel::metrics::Metrics,
    ) -> Result<Self, SettingsError> {
        let connection: Arc<arc_swap::ArcSwapOption<Connection>> = Arc::default();
        let health = health.handle(COMPONENT, false);
        health.set(State::Starting, "connecting");
        let settings_ = settings.clone();
        let slot = connection.clone();
        let health_ = health.clone();
        let pubsub = {
            let mut info: redis::ConnectionInfo =
                redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
                    .map_err(|e| SettingsError(e.to_string()))?;
            if let Some(password) = &settings.password {
                let with = info.redis_settings().clone().set_password(password.expose());
                info = info.set_redis_settings(with);
            }
            client(info, settings).ok()
        };
        let (standalone, cluster) = if settings.cluster {
            let mut builder = redis::cluster::ClusterClient::builder(vec![settings.url.clone()])
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(settings.timeout * 5);
            if let Some(password) = &settings.password {
                builder = builder.password(password.expose());
            }
            if let Some(ca) = &settings.ca_cert {
                builder = builder.certs(certificates(ca));
            }
            (None, Some(builder.build().map_err(|e| SettingsError(e.to_string()))?))
        } else {
            let mut info: redis::ConnectionInfo =
                redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
                    .map_err(|e| SettingsError(e.to_string()))?;
            if let Some(password) = &settings.password {
                let settings = info.redis_settings().clone().set_password(password.expose());
                info = info.set_redis_settings(settings);
            }
            (Some(client(info, settings)?), None)
        };
        let connect = Box::pin(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                let attempt: Result<Connection, String> = match (&standalone, &cluster) {
                    (Some(client), _) => {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(Duration::from_secs(2)))
                            .set_response_timeout(Some(settings_.timeout * 5))
                            .set_number_of_retries(3);
                        match tokio::time::timeout(
                            Duration::from_secs(3),
                            ConnectionManager::new_with_config(client.clone(), config),
                        )
                        .await
                        {
                            Ok(Ok(manager)) => Ok(Connection::Standalone(manager)),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("connecting timed out".into()),
                        }
                    }
                    (None, Some(client)) => {
                        match tokio::time::timeout(Duration::from_secs(3), client.get_async_connection()).await {
                            Ok(Ok(connection)) => Ok(Connection::Cluster(connection)),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("connecting timed out".into()),
                        }
                    }
                    (None, None) => return,
                };
                match attempt {
                    Ok(connection) => {
                        slot.store(Some(Arc::new(connection)));
                        health_.set(State::Up, format!("connected to {}", redact(&settings_.url)));
                        tracing::info!(url = %redact(&settings_.url), cluster = settings_.cluster, "connected to Redis");
                        return;
                    }
                    Err(error) => {
                        health_.set(State::Down, format!("cannot connect: {error}"));
                        tracing::warn!(%error, retry_in = ?delay, "cannot connect to Redis; the cache misses until it can");
                        // Exponential backoff with jitter, up to 5 s.
                        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64())).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(Self {
            connection,
            pubsub,
            breaker: Breaker::new(5, Duration::from_secs(5)),
            timeout: settings.timeout,
            health,
            metrics,
            connect: Mutex::new(Some(connect)),
            task: Mutex::new(None),
        })
    }

    /// Starts connecting and shows the client in `/status` (once the snapshot that uses it is committed).
    /// Needs a Tokio runtime.
    pub fn activate(&self) {
        if let (Ok(mut connect), Ok(handle)) = (self.connect.lock(), tokio::runtime::Handle::try_current())
            && let Some(connect) = connect.take()
            && let Ok(mut task) = self.task.lock()
        {
            *task = Some(handle.spawn(connect));
        }
        self.health.activate();
    }

    async fn run<T: redis::FromRedisValue>(&self, op: &'static str, command: redis::Cmd) -> Result<T, CacheError> {
        let Some(connection) = self.connection.load_full() else { return Err(CacheError::Unavailable) };
        let trial = match self.breaker.admit(Instant::now()).0 {
            Admission::Allowed { trial } => trial,
            Admission::Rejected { .. } => return Err(CacheError::Unavailable),
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            match connection.as_ref().clone() {
                Connection::Standalone(mut c) => command.query_async::<T>(&mut c).await,
                Connection::Cluster(mut c) => command.query_async::<T>(&mut c).await,
            }
        })
        .await;
        self.metrics.cache_backend_duration.with_label_values(&["redis", op]).observe(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(CacheError::Backend(error.to_string())),
            Err(_) => Err(CacheError::Timeout(self.timeout)),
        };
        let transition = self.breaker.record(trial, outcome.is_ok(), Instant::now());
        match transition {
            Some(BreakerState::Open) => {
                let reason = outcome.as_ref().err().map(ToString::to_string).unwrap_or_default();
                self.health.set(State::Degraded, format!("failing, requests go to the upstreams: {reason}"));
                tracing::warn!(%reason, "Redis keeps failing; serving from the upstreams without the cache for a while");
            }
            Some(BreakerState::Closed) => {
                self.health.set(State::Up, "answering again");
                tracing::info!("Redis answers again; caching resumes");
            }
            _ => {}
        }
        outcome
    }
}

impl RedisCache {
    /// Publishes a message on a channel.
    pub async fn publish(&self, channel: &str, message: &str) -> Result<(), CacheError> {
        self.run::<i64>("publish", redis::cmd("PUBLISH").arg(channel).arg(message).clone()).await.map(|_| ())
    }

    /// A fresh pub/sub connection.
    pub async fn subscriber(&self, channel: &str) -> Result<redis::aio::PubSub, CacheError> {
        let client = self.pubsub.as_ref().ok_or(CacheError::Unavailable)?;
        let mut pubsub = tokio::time::timeout(Duration::from_secs(3), client.get_async_pubsub())
            .await
            .map_err(|_| CacheError::Timeout(Duration::from_secs(3)))?
            .map_err(|e| CacheError::Backend(e.to_string()))?;
        pubsub.subscribe(channel).await.map_err(|e| CacheError::Backend(e.to_string()))?;
        Ok(pubsub)
    }
}

impl Drop for RedisCache {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

impl Cache for RedisCache {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn available(&self) -> bool {
        self.connection.load().is_some() && self.breaker.state() != BreakerState::Open
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Arc<Entry>>, CacheError>> {
        async move {
            let value: Option<Vec<u8>> = self.run("get", redis::cmd("GET").arg(key).clone()).await?;
            match value {
                None => Ok(None),
                Some(bytes) => Entry::decode(Bytes::from(bytes)).map(|e| Some(Arc::new(e))).ok_or(CacheError::Corrupt),
            }
        }
        .boxed()
    }

    fn put<'a>(&'a self, key: &'a str, entry: &'a Entry, keep: Duration) -> BoxFuture<'a, Result<(), CacheError>> {
        async move {
            let millis = keep.as_millis().max(1) as u64;
            let command = redis::cmd("SET").arg(key).arg(entry.encode().as_ref()).arg("PX").arg(millis).clone();
            self.run::<()>("set", command).await
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move { self.run::<usize>("del", redis::cmd("DEL").arg(key).clone()).await }.boxed()
    }

    fn tag<'a>(&'a self, tag_key: &'a str, key: &'a str, keep: Duration) -> BoxFuture<'a, Result<(), CacheError>> {
        async move {
            let millis = keep.as_millis().max(1) as u64;
            self.run::<()>("sadd", redis::cmd("SADD").arg(tag_key).arg(key).clone()).await?;
            // The set lives as long as its longest-lived member: set the expiry when it has none (NX), extend
            // it when longer (GT).
            self.run::<()>("pexpire", redis::cmd("PEXPIRE").arg(tag_key).arg(millis).arg("NX").clone()).await?;
            self.run::<()>("pexpire", redis::cmd("PEXPIRE").arg(tag_key).arg(millis).arg("GT").clone()).await
        }
        .boxed()
    }

    fn delete_tag<'a>(&'a self, tag_key: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move {
            let members: Vec<String> = self.run("smembers", redis::cmd("SMEMBERS").arg(tag_key).clone()).await?;
            let mut deleted = 0;
            // One key per DEL: in a Cluster the keys live in different slots.
            for key in &members {
                deleted += self.run::<usize>("del", redis::cmd("DEL").arg(key).clone()).await?;
            }
            self.run::<usize>("del", redis::cmd("DEL").arg(tag_key).clone()).await?;
            Ok(deleted)
        }
        .boxed()
    }

    fn lock<'a>(&'a self, key: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Option<String>, CacheError>> {
        async move {
            let token = format!("{:032x}", fastrand::u128(..));
            let millis = ttl.as_millis().max(1) as u64;
            let set: Option<String> = self
                .run("lock", redis::cmd("SET").arg(key).arg(&token).arg("NX").arg("PX").arg(millis).clone())
                .await?;
            Ok(set.map(|_| token))
        }
        .boxed()
    }

    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        // Compare and delete in one step: a lock that expired and was taken by another replica stays theirs.
        const SCRIPT: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
        async move {
            self.run::<i64>("unlock", redis::cmd("EVAL").arg(SCRIPT).arg(1).arg(key).arg(token).clone())
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<usize, CacheError>> {
        async move {
            let Some(connection) = self.connection.load_full() else { return Err(CacheError::Unavailable) };
            let Connection::Standalone(_) = connection.as_ref() else {
                return Err(CacheError::Backend(
                    "invalidation by prefix needs a standalone Redis; use tags with a Cluster".into(),
                ));
            };
            let pattern = format!("{}*", glob_escape(prefix));
            let mut cursor: u64 = 0;
            let mut deleted = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = self
                    .run(
                        "scan",
                        redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).clone(),
                    )
                    .await?;
                if !keys.is_empty() {
                    deleted += self.run::<usize>("del", redis::cmd("DEL").arg(&keys).clone()).await?;
                }
                if next == 0 {
                    return Ok(deleted);
                }
                cursor = next;
            }
        }
        .boxed()
    }
}

/// A literal for Redis glob patterns (`SCAN MATCH`).
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn certificates(ca: &str) -> redis::TlsCertificates {
    redis::TlsCertificates { client_tls: None, root_cert: Some(ca.as_bytes().to_vec()) }
}

/// A client for one server, verifying TLS against the given roots when there are any.
fn client(info: redis::ConnectionInfo, settings: &RedisSettings) -> Result<redis::Client, SettingsError> {
    match &settings.ca_cert {
        Some(ca) => redis::Client::build_with_tls(info, certificates(ca)),
        None => redis::Client::open(info),
    }
    .map_err(|e| SettingsError(e.to_string()))
}

/// A URL without its password.
pub fn redact(url: &str) -> String {
    umw_crds::redact::url(url)
}
