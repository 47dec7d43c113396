//! PostgreSQL through `sqlx`: the pool, the embedded migrations, the command store, and the relay sources
//! (the commands' table `umw_outbox` and application-owned outbox tables).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, PgSslMode};
use sqlx::{Postgres, Row as _, Transaction};
use tokio::sync::watch;

use super::relay::{Claim, Outcome, Row, Source};
use super::{
    COMMANDS_TABLE, COMPONENT, CommandRecord, CommandState, DeadRow, EventState, NewCommand, OutboxStore, Record,
    Recorded, StoreError,
};
use crate::kernel::health::{Health, HealthHandle, State};
use crate::kernel::metrics::Metrics;
use crate::kernel::secret::Secret;

/// How to reach the database; equal settings share one pool across reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PgSettings {
    /// May carry the password (in the user information or as `?password=`).
    pub url: Secret,
    pub ca_cert: Option<String>,
    pub max_connections: u32,
    pub statement_timeout: Duration,
    pub connect_timeout: Duration,
}

/// The migrations, in order; each runs once, in its own transaction, under an advisory lock so that
/// replicas starting together do not race.
const MIGRATIONS: &[(i32, &str, &str)] = &[(1, "commands and the outbox", include_str!("migrations/0001_outbox.sql"))];

/// Key of the advisory lock held while migrating (`umw` + `mig` in ASCII).
const MIGRATION_LOCK: i64 = 0x0075_6d77_5f6d_6967;

/// The channel a commit to `umw_outbox` notifies.
pub const CHANNEL: &str = "umw_outbox";

/// Rows deleted per cleanup statement, so that no statement holds many locks for long.
const CLEANUP_BATCH: i64 = 1000;

/// A pool, and whether its schema is ready.
pub struct Database {
    pub pool: PgPool,
    /// How to open a connection outside the pool (the command writers own theirs).
    options: PgConnectOptions,
    /// Deadline of a connection attempt (`connectTimeout`).
    connect_timeout: Duration,
    ready: watch::Receiver<bool>,
    /// Preparing the schema, in the background once activated.
    migrate: std::sync::Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
    migrations: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    health: HealthHandle,
    pub metrics: Metrics,
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some(task) = self.migrations.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// A `postgres://` URL (or keyword/value string) without its password, for messages.
pub fn redact(url: &str) -> String {
    umw_crds::redact::url(url)
}

impl Database {
    /// A lazily connecting pool; once [activated](Self::activate), the migrations run in the background
    /// until they succeed.
    pub fn new(settings: &PgSettings, health: &Health, metrics: Metrics) -> Result<Arc<Self>, String> {
        let url = settings.url.expose();
        let mut options: PgConnectOptions =
            url.parse().map_err(|e| format!("spec.connections.postgres.url is not a PostgreSQL URL: {e}"))?;
        if let Some(ca) = &settings.ca_cert {
            options = options.ssl_root_cert_from_pem(ca.as_bytes().to_vec());
            if !url.contains("sslmode=") {
                options = options.ssl_mode(PgSslMode::VerifyFull);
            }
        }
        let timeout_ms = settings.statement_timeout.as_millis().to_string();
        options = options.application_name("umw-dataplane").options([("statement_timeout", timeout_ms.as_str())]);
        // The command writers own their connections; the pool has the rest of maxConnections.
        let pooled = settings.max_connections.saturating_sub(writers(settings.max_connections) as u32).max(MIN_POOL);
        let pool = PgPoolOptions::new()
            .max_connections(pooled)
            .min_connections(0)
            // A broken connection fails the statement that uses it (answered 503, nothing recorded) and
            // is dropped; a ping before every use would cost a round trip per command.
            .test_before_acquire(false)
            .acquire_timeout(settings.connect_timeout)
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(options.clone());
        let (ready_tx, ready) = watch::channel(false);
        let health = health.handle(COMPONENT, false);
        health.set(State::Starting, "connecting");
        let migrate = Box::pin(migrate_until_done(pool.clone(), redact(url), health.clone(), ready_tx));
        Ok(Arc::new(Self {
            pool,
            options,
            connect_timeout: settings.connect_timeout,
            ready,
            migrate: std::sync::Mutex::new(Some(migrate)),
            migrations: std::sync::Mutex::new(None),
            health,
            metrics,
        }))
    }

    /// Starts preparing the schema and shows the database in `/status` (once the snapshot that uses it is
    /// committed). Needs a Tokio runtime.
    pub fn activate(&self) {
        if let (Ok(mut migrate), Ok(mut task)) = (self.migrate.lock(), self.migrations.lock())
            && let Some(migrate) = migrate.take()
        {
            *task = Some(tokio::spawn(migrate));
        }
        self.health.activate();
    }

    /// Waits (at most `timeout`) for the schema; false when it is not there yet.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        tokio::time::timeout(timeout, ready.wait_for(|r| *r)).await.is_ok_and(|r| r.is_ok())
    }
}

async fn migrate_until_done(pool: PgPool, url: String, health: HealthHandle, ready: watch::Sender<bool>) {
    let mut failures = 0u32;
    loop {
        match migrate(&pool).await {
            Ok(version) => {
                health.set(State::Up, format!("connected to {url}, schema version {version}"));
                let _ = ready.send(true);
                return;
            }
            Err(error) => {
                failures += 1;
                health.set(State::Down, format!("cannot prepare the schema in {url}: {error}"));
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(%url, %error, "cannot reach PostgreSQL or prepare its schema; retrying");
                }
                tokio::time::sleep(super::relay::backoff(failures, Duration::from_millis(200), Duration::from_secs(5)))
                    .await;
            }
        }
    }
}

/// Applies the migrations not applied yet; returns the schema version.
pub async fn migrate(pool: &PgPool) -> Result<i32, StoreError> {
    let mut connection = pool.acquire().await.map_err(store_error)?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *connection)
        .await
        .map_err(store_error)?;
    let result = async {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS umw_schema_migrations (version integer PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(&mut *connection)
        .await?;
        let applied: Vec<i32> =
            sqlx::query_scalar("SELECT version FROM umw_schema_migrations").fetch_all(&mut *connection).await?;
        for (version, description, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            let mut tx = sqlx::Connection::begin(&mut *connection).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql)).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO umw_schema_migrations (version, description) VALUES ($1, $2)")
                .bind(version)
                .bind(description)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, description, "database migration applied");
        }
        Ok::<_, sqlx::Error>(MIGRATIONS.last().map_or(0, |m| m.0))
    }
    .await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATION_LOCK).execute(&mut *connection).await;
    if unlock.is_err() {
        // The session ends with the connection, and its lock with it.
        connection.close_on_drop();
    }
    result.map_err(store_error)
}

/// Maps a driver error: connection trouble and timeouts are `Unavailable`, the rest `Failed`.
pub fn store_error(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
            StoreError::Unavailable(error.to_string())
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 57014: statement timeout; 57P01..57P03: shutdown; 08xxx: connection; 53xxx: resources;
            // 40001/40P01: serialization failure or deadlock.
            if code == "57014"
                || code.starts_with("57P")
                || code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("40")
            {
                StoreError::Unavailable(db.message().to_string())
            } else {
                StoreError::Failed(db.message().to_string())
            }
        }
        _ => StoreError::Failed(error.to_string()),
    }
}

/// Commands and their events in PostgreSQL.
pub struct PgStore {
    db: Arc<Database>,
    source: Arc<CommandsTable>,
    writer: tokio::sync::mpsc::Sender<Pending>,
}

/// Runs `writers` writers, each with a connection of its own (outside the pool: the hot path neither waits
/// for the pool nor pays its ping on every return). A writer takes whatever commands are queued, up to
/// [`GROUP`], and writes them with one statement.
async fn write_groups(db: Arc<Database>, queue: tokio::sync::mpsc::Receiver<Pending>, writers: usize) {
    let queue = Arc::new(tokio::sync::Mutex::new(queue));
    let tasks: Vec<_> = (0..writers).map(|_| tokio::spawn(writer(db.clone(), queue.clone()))).collect();
    for task in tasks {
        let _ = task.await;
    }
}

async fn writer(db: Arc<Database>, queue: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Pending>>>) {
    use sqlx::Connection as _;
    let mut connection: Option<sqlx::PgConnection> = None;
    let mut failures = 0u32;
    loop {
        let group = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else { return };
            let mut group = vec![first];
            while group.len() < GROUP {
                match queue.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
            group
        };
        if connection.is_none() {
            // A black-holed server would hold the writer for the system's connect timeout, and one that
            // accepts but never finishes the handshake for ever.
            let opened =
                match tokio::time::timeout(db.connect_timeout, sqlx::PgConnection::connect_with(&db.options)).await {
                    Ok(opened) => opened.map_err(store_error),
                    Err(_) => Err(StoreError::Unavailable(format!(
                        "connecting to PostgreSQL took longer than connectTimeout ({:?})",
                        db.connect_timeout
                    ))),
                };
            match opened {
                Ok(opened) => {
                    connection = Some(opened);
                    failures = 0;
                }
                Err(error) => {
                    for pending in group {
                        let _ = pending.done.send(Err(error.clone()));
                    }
                    // Later commands fail fast too, until a connection attempt succeeds.
                    failures += 1;
                    tokio::time::sleep(super::relay::backoff(
                        failures,
                        Duration::from_millis(50),
                        Duration::from_secs(1),
                    ))
                    .await;
                    continue;
                }
            }
        }
        // A command whose client is gone (it disconnected, or the route's timeout answered 504) while it
        // waited here is not written: nobody would learn that it was.
        let mut group = group;
        group.retain(|pending| {
            let gone = pending.done.is_closed();
            if gone {
                let name = &pending.command.record.command;
                db.metrics.commands.with_label_values(&[name, "abandoned"]).inc();
                tracing::debug!(command = %name, "the client left before the command was written; not written");
            }
            !gone
        });
        if group.is_empty() {
            continue;
        }
        let Some(open) = connection.as_mut() else { continue };
        let result = write_group(open, &group).await;
        if let Err(StoreError::Unavailable(_)) = &result {
            // The connection may be broken: open a new one for the next group.
            connection = None;
        }
        for pending in group {
            let outcome = match &result {
                Ok(written) => Ok(written.contains(&pending.command.record.id)),
                Err(error) => Err(error.clone()),
            };
            if pending.done.send(outcome).is_err() && result.is_ok() {
                // Written while its client left: the client's 504 (or nothing) hides a committed command.
                db.metrics.commands.with_label_values(&[&pending.command.record.command, "unanswered"]).inc();
            }
        }
    }
}

/// Writes the commands and their events in one statement, so one implicit transaction: all of them are
/// committed together, or none. Returns the ids of the commands written (a command whose idempotency key
/// is taken is not, and neither are its events).
async fn write_group(
    connection: &mut sqlx::PgConnection,
    group: &[Pending],
) -> Result<std::collections::HashSet<uuid::Uuid>, StoreError> {
    let mut ids = Vec::with_capacity(group.len());
    let mut names = Vec::with_capacity(group.len());
    let mut keys = Vec::with_capacity(group.len());
    let mut hashes = Vec::with_capacity(group.len());
    let mut states = Vec::with_capacity(group.len());
    let mut statuses = Vec::with_capacity(group.len());
    let mut responses = Vec::with_capacity(group.len());
    let mut ttls = Vec::with_capacity(group.len());
    let mut events = EventColumns::default();
    for Pending { command, .. } in group {
        let record = &command.record;
        ids.push(record.id);
        names.push(record.command.as_str());
        keys.push(command.idempotency_key.as_deref());
        hashes.push(record.request_hash.as_slice());
        states.push(record.state.as_str());
        statuses.push(i16::try_from(record.status).unwrap_or(500));
        responses.push(&record.response);
        ttls.push(command.ttl.as_secs_f64());
        for event in &command.events {
            events.push(record.id, event);
        }
    }
    let written: Vec<uuid::Uuid> = sqlx::query_scalar(
        "WITH c AS (
            INSERT INTO umw_commands (id, command, idempotency_key, request_hash, state, status, response, expires_at)
            SELECT id, command, key, hash, state, status, response, now() + make_interval(secs => ttl)
            FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::int2[], $7::jsonb[], $8::float8[])
                AS t(id, command, key, hash, state, status, response, ttl)
            ON CONFLICT (command, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING id
        ), e AS (
            INSERT INTO umw_outbox (id, command_id, topic, key, type, source, subject, data, content_type, extensions)
            SELECT ev.id, ev.command_id, ev.topic, ev.key, ev.type, ev.source, ev.subject, ev.data, ev.content_type, ev.extensions
            FROM unnest($9::uuid[], $10::uuid[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], $16::bytea[], $17::text[], $18::jsonb[])
                WITH ORDINALITY AS ev(id, command_id, topic, key, type, source, subject, data, content_type, extensions, ord)
            WHERE ev.command_id IN (SELECT id FROM c)
            ORDER BY ev.ord
        )
        SELECT id FROM c",
    )
    .bind(&ids)
    .bind(&names)
    .bind(&keys)
    .bind(&hashes)
    .bind(&states)
    .bind(&statuses)
    .bind(&responses)
    .bind(&ttls)
    .bind(&events.ids)
    .bind(&events.commands)
    .bind(&events.topics)
    .bind(&events.keys)
    .bind(&events.types)
    .bind(&events.sources)
    .bind(&events.subjects)
    .bind(&events.data)
    .bind(&events.content_types)
    .bind(&events.extensions)
    .fetch_all(&mut *connection)
    .await
    .map_err(store_error)?;
    Ok(written.into_iter().collect())
}

/// A command waiting for the writer, and where to say whether it was written (false: its idempotency key
/// was taken).
struct Pending {
    command: NewCommand,
    done: tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
}

/// How many command writers (each with its own connection) for a connection budget: two (one below
/// [`MIN_POOL`] + 2). A writer takes every command queued when it starts a statement, so more writers do not
/// write more: they split the same commands into more statements and more WAL flushes (docs/benchmarks.md:
/// 2 writers accepted twice the commands/s of 32). One writer measured about the same as two; the second
/// keeps commands flowing while the other waits on a slow flush or reconnects.
pub fn writers(max_connections: u32) -> usize {
    if max_connections < MIN_POOL + 2 { 1 } else { 2 }
}

/// The fewest pooled connections: the relay's LISTEN connection, its two loops (each holds a transaction
/// while publishing), and one for cleanup, gauges, idempotency checks and `GET /commands/{id}`.
pub const MIN_POOL: u32 = 4;

/// Most commands written by one statement.
const GROUP: usize = 256;

impl PgStore {
    /// The store, with its writer: commands that arrive while earlier ones are being written are written
    /// together, by one statement (group commit: one transaction, one WAL flush for all of them). At most
    /// `writers` statements run at once; a lone command is written at once, alone.
    pub fn new(db: Arc<Database>, writers: usize) -> Self {
        let source = Arc::new(CommandsTable { db: db.clone(), listener: tokio::sync::Mutex::new(None) });
        let (writer, queue) = tokio::sync::mpsc::channel(GROUP * writers.max(1) * 4);
        tokio::spawn(write_groups(db.clone(), queue, writers.max(1)));
        Self { db, source, writer }
    }

    async fn schema(&self) -> Result<(), StoreError> {
        if self.db.ready(Duration::from_millis(50)).await {
            Ok(())
        } else {
            Err(StoreError::Unavailable("the database schema is not ready yet".into()))
        }
    }
}

const RFC3339: &str = r#"to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#;

fn command_record(row: &PgRow) -> Result<CommandRecord, sqlx::Error> {
    Ok(CommandRecord {
        id: row.try_get("id")?,
        command: row.try_get("command")?,
        request_hash: row.try_get("request_hash")?,
        state: row.try_get("state")?,
        status: u16::try_from(row.try_get::<i16, _>("status")?).unwrap_or(500),
        response: row.try_get("response")?,
        created_at: row.try_get("created")?,
    })
}

impl OutboxStore for PgStore {
    fn find_by_key<'a>(
        &'a self,
        command: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<CommandRecord>, StoreError>> {
        async move {
            self.schema().await?;
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id, command, request_hash, state, status, response, {RFC3339} AS created FROM umw_commands WHERE command = $1 AND idempotency_key = $2"
            )))
            .bind(command)
            .bind(key)
            .fetch_optional(&self.db.pool)
            .await
            .map_err(store_error)?;
            row.as_ref().map(command_record).transpose().map_err(store_error)
        }
        .boxed()
    }

    fn record(&self, command: NewCommand) -> BoxFuture<'_, Result<Recorded, StoreError>> {
        async move {
            self.schema().await?;
            let (done, written) = tokio::sync::oneshot::channel();
            let name = command.record.command.clone();
            let key = command.idempotency_key.clone();
            self.writer
                .send(Pending { command, done })
                .await
                .map_err(|_| StoreError::Unavailable("the command writer stopped".into()))?;
            let written = written.await.map_err(|_| StoreError::Unavailable("the command writer stopped".into()))??;
            if written {
                return Ok(Recorded::Done);
            }
            match self.find_by_key(&name, &key.unwrap_or_default()).await? {
                Some(existing) => Ok(Recorded::KeyTaken(existing)),
                // Taken and expired in between: rare enough to ask the client to retry.
                None => Err(StoreError::Unavailable("the idempotency key changed hands; retry".into())),
            }
        }
        .boxed()
    }

    fn get(&self, id: uuid::Uuid) -> BoxFuture<'_, Result<Option<CommandState>, StoreError>> {
        async move {
            self.schema().await?;
            let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id, command, request_hash, state, status, response, {RFC3339} AS created FROM umw_commands WHERE id = $1"
            )))
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await
            .map_err(store_error)?
            else {
                return Ok(None);
            };
            let record = command_record(&row).map_err(store_error)?;
            let rows = sqlx::query(
                "SELECT id::text AS id, topic, CASE WHEN published_at IS NULL THEN 'pending' ELSE 'published' END AS state, attempts, last_error, position
                   FROM umw_outbox WHERE command_id = $1
                 UNION ALL
                 SELECT id, topic, 'failed', attempts, error, 0 FROM umw_outbox_dead WHERE command_id = $1
                 ORDER BY position",
            )
            .bind(id)
            .fetch_all(&self.db.pool)
            .await
            .map_err(store_error)?;
            let mut events = Vec::new();
            for row in rows {
                events.push(EventState {
                    id: row.try_get("id").map_err(store_error)?,
                    topic: row.try_get("topic").map_err(store_error)?,
                    state: row.try_get("state").map_err(store_error)?,
                    attempts: u32::try_from(row.try_get::<i32, _>("attempts").map_err(store_error)?).unwrap_or(0),
                    last_error: row.try_get("last_error").map_err(store_error)?,
                });
            }
            Ok(Some((record, events)))
        }
        .boxed()
    }

    fn dead(&self, limit: u32) -> BoxFuture<'_, Result<Vec<DeadRow>, StoreError>> {
        async move { dead_rows(&self.db, limit).await }.boxed()
    }

    fn source(&self) -> Arc<dyn Source> {
        self.source.clone()
    }
}

/// A relay's transaction. Its commit does not wait for the WAL flush (`synchronous_commit = off`): a mark
/// "published" lost in a database crash only publishes the row again, which at-least-once delivery allows,
/// and the relay's cycle no longer waits for the disk.
async fn begin_relay(db: &Database) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = db.pool.begin().await.map_err(store_error)?;
    sqlx::query("SET LOCAL synchronous_commit TO off").execute(&mut *tx).await.map_err(store_error)?;
    Ok(tx)
}

/// Rows of the dead-letter table, newest first.
pub async fn dead_rows(db: &Database, limit: u32) -> Result<Vec<DeadRow>, StoreError> {
    let rows = sqlx::query(
        r#"SELECT source_table, id, topic, key, type, attempts, error,
                  to_char(failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS failed
           FROM umw_outbox_dead ORDER BY failed_at DESC LIMIT $1"#,
    )
    .bind(i64::from(limit))
    .fetch_all(&db.pool)
    .await
    .map_err(store_error)?;
    rows.iter()
        .map(|row| {
            Ok(DeadRow {
                table: row.try_get("source_table")?,
                id: row.try_get("id")?,
                topic: row.try_get("topic")?,
                key: row.try_get("key")?,
                ty: row.try_get("type")?,
                attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
                error: row.try_get("error")?,
                failed_at: row.try_get("failed")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(store_error)
}

/// Events as column arrays, for one `unnest` insert.
#[derive(Default)]
struct EventColumns {
    ids: Vec<uuid::Uuid>,
    commands: Vec<uuid::Uuid>,
    topics: Vec<String>,
    keys: Vec<Option<String>>,
    types: Vec<String>,
    sources: Vec<String>,
    subjects: Vec<Option<String>>,
    data: Vec<Vec<u8>>,
    content_types: Vec<Option<String>>,
    extensions: Vec<serde_json::Value>,
}

impl EventColumns {
    fn push(&mut self, command: uuid::Uuid, event: &Record) {
        self.ids.push(event.id.parse().unwrap_or_else(|_| uuid::Uuid::now_v7()));
        self.commands.push(command);
        self.topics.push(event.topic.clone());
        self.keys.push(event.key.clone());
        self.types.push(event.ty.clone());
        self.sources.push(event.source.clone());
        self.subjects.push(event.subject.clone());
        self.data.push(event.data.clone());
        self.content_types.push(event.content_type.clone());
        let extensions: serde_json::Map<String, serde_json::Value> =
            event.extensions.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        self.extensions.push(serde_json::Value::Object(extensions));
    }
}

fn string_pairs(value: Option<serde_json::Value>) -> Vec<(String, String)> {
    match value {
        Some(serde_json::Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The commands' events: `umw_outbox`, woken by `LISTEN/NOTIFY`.
pub struct CommandsTable {
    db: Arc<Database>,
    listener: tokio::sync::Mutex<Option<sqlx::postgres::PgListener>>,
}

struct CommandsClaim {
    tx: Transaction<'static, Postgres>,
    rows: Vec<Row>,
    positions: Vec<i64>,
}

impl Source for CommandsTable {
    fn name(&self) -> &str {
        COMMANDS_TABLE
    }

    fn claim(&self, limit: u32) -> BoxFuture<'_, Result<Box<dyn Claim>, StoreError>> {
        async move {
            if !self.db.ready(Duration::from_secs(1)).await {
                return Err(StoreError::Unavailable("the database schema is not ready yet".into()));
            }
            let mut tx = begin_relay(&self.db).await?;
            let fetched = sqlx::query(sqlx::AssertSqlSafe(format!(
                "WITH claimed AS (
                    SELECT position FROM umw_outbox o
                    WHERE published_at IS NULL AND next_attempt_at <= now()
                      -- Not behind an earlier row of its key that waits for a retry: such rows would
                      -- fill every batch and hold up the other keys.
                      AND NOT (key IS NOT NULL AND EXISTS (
                          SELECT 1 FROM umw_outbox w
                          WHERE w.key = o.key AND w.published_at IS NULL AND w.position < o.position
                            AND w.next_attempt_at > now()
                      ))
                    ORDER BY position LIMIT $1
                    FOR UPDATE SKIP LOCKED
                 )
                 SELECT o.position, o.id::text AS id, o.command_id, o.topic, o.key, o.type, o.source, o.subject, o.data,
                        o.content_type, o.extensions, o.attempts, {RFC3339} AS created,
                        extract(epoch FROM clock_timestamp() - o.created_at)::float8 AS age,
                        o.key IS NOT NULL AND EXISTS (
                            SELECT 1 FROM umw_outbox p
                            WHERE p.key = o.key AND p.published_at IS NULL AND p.position < o.position
                              AND p.position NOT IN (SELECT position FROM claimed)
                        ) AS blocked
                 FROM umw_outbox o JOIN claimed USING (position)
                 ORDER BY o.position"
            )))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
            let mut rows = Vec::with_capacity(fetched.len());
            let mut positions = Vec::with_capacity(fetched.len());
            for row in &fetched {
                let (position, claimed) = commands_row(row).map_err(store_error)?;
                positions.push(position);
                rows.push(claimed);
            }
            Ok(Box::new(CommandsClaim { tx, rows, positions }) as Box<dyn Claim>)
        }
        .boxed()
    }

    fn wait(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        async move {
            let mut listener = self.listener.lock().await;
            if listener.is_none() {
                match sqlx::postgres::PgListener::connect_with(&self.db.pool).await {
                    Ok(mut l) => match l.listen(CHANNEL).await {
                        Ok(()) => *listener = Some(l),
                        Err(error) => tracing::debug!(%error, "LISTEN failed; polling"),
                    },
                    Err(error) => tracing::debug!(%error, "cannot open a listening connection; polling"),
                }
            }
            match listener.as_mut() {
                Some(l) => match tokio::time::timeout(timeout, l.recv()).await {
                    Ok(Ok(_)) => {
                        // Several commits may have notified: take them all in one wake-up.
                        while let Ok(Some(_)) = l.try_recv().now_or_never().unwrap_or(Ok(None)) {}
                    }
                    Ok(Err(_)) => {
                        *listener = None;
                        drop(listener);
                        tokio::time::sleep(timeout.min(Duration::from_millis(500))).await;
                    }
                    Err(_) => {}
                },
                None => {
                    drop(listener);
                    tokio::time::sleep(timeout).await;
                }
            }
        }
        .boxed()
    }

    fn cleanup(&self, retention: Duration) -> BoxFuture<'_, Result<u64, StoreError>> {
        async move {
            if !self.db.ready(Duration::from_millis(10)).await {
                return Ok(0);
            }
            let mut deleted = 0;
            for statement in [
                "DELETE FROM umw_outbox WHERE position IN (SELECT position FROM umw_outbox WHERE published_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)",
                "DELETE FROM umw_commands WHERE id IN (SELECT id FROM umw_commands WHERE expires_at < now() LIMIT $2 FOR UPDATE SKIP LOCKED) AND $1 >= 0",
            ] {
                loop {
                    let done = sqlx::query(statement)
                        .bind(retention.as_secs_f64())
                        .bind(CLEANUP_BATCH)
                        .execute(&self.db.pool)
                        .await
                        .map_err(store_error)?
                        .rows_affected();
                    deleted += done;
                    if done < CLEANUP_BATCH as u64 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok(deleted)
        }
        .boxed()
    }

    fn depth(&self) -> BoxFuture<'_, Result<(i64, f64), StoreError>> {
        async move {
            if !self.db.ready(Duration::from_millis(10)).await {
                return Ok((0, 0.0));
            }
            let row = sqlx::query(
                "SELECT count(*) AS depth, coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) AS age
                 FROM umw_outbox WHERE published_at IS NULL",
            )
            .fetch_one(&self.db.pool)
            .await
            .map_err(store_error)?;
            Ok((row.try_get("depth").map_err(store_error)?, row.try_get("age").map_err(store_error)?))
        }
        .boxed()
    }
}

fn commands_row(row: &PgRow) -> Result<(i64, Row), sqlx::Error> {
    let position: i64 = row.try_get("position")?;
    let mut extensions = string_pairs(row.try_get("extensions")?);
    if let Some(command) = row.try_get::<Option<uuid::Uuid>, _>("command_id")? {
        extensions.push(("commandid".into(), command.to_string()));
    }
    let record = Record {
        id: row.try_get("id")?,
        topic: row.try_get("topic")?,
        key: row.try_get("key")?,
        ty: row.try_get("type")?,
        source: row.try_get("source")?,
        subject: row.try_get("subject")?,
        time: row.try_get("created")?,
        data: row.try_get("data")?,
        content_type: row.try_get("content_type")?,
        extensions,
        headers: Vec::new(),
    };
    let row = Row {
        record,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
        blocked: row.try_get("blocked")?,
        age: row.try_get::<f64, _>("age")?.max(0.0),
    };
    Ok((position, row))
}

/// The rows of a claim, as the statements that record outcomes address them.
enum Rows<'a> {
    Commands(&'a [i64]),
    App(&'a AppTable, &'a [String]),
}

/// Writes the outcomes of a claim: published rows marked, failing rows rescheduled, dead rows moved.
async fn record_outcomes(
    tx: &mut Transaction<'static, Postgres>,
    table: &str,
    target: Rows<'_>,
    rows: &[Row],
    outcomes: &[Outcome],
) -> Result<(), sqlx::Error> {
    let done: Vec<usize> =
        outcomes.iter().enumerate().filter(|(_, o)| matches!(o, Outcome::Published)).map(|(i, _)| i).collect();
    if !done.is_empty() {
        match &target {
            Rows::Commands(positions) => {
                let done: Vec<i64> = done.iter().map(|&i| positions[i]).collect();
                sqlx::query("UPDATE umw_outbox SET published_at = now() WHERE position = ANY($1)")
                    .bind(&done)
                    .execute(&mut **tx)
                    .await?;
            }
            Rows::App(app, refs) => {
                let done: Vec<&str> = done.iter().map(|&i| refs[i].as_str()).collect();
                sqlx::query(sqlx::AssertSqlSafe(app.publish_sql.as_str())).bind(&done).execute(&mut **tx).await?;
            }
        }
    }
    for (i, outcome) in outcomes.iter().enumerate() {
        match (outcome, &target) {
            (Outcome::Retry { error, delay }, Rows::Commands(positions)) => {
                sqlx::query(
                    "UPDATE umw_outbox SET attempts = attempts + 1, last_error = $2,
                        next_attempt_at = now() + make_interval(secs => $3) WHERE position = $1",
                )
                .bind(positions[i])
                .bind(error)
                .bind(delay.as_secs_f64())
                .execute(&mut **tx)
                .await?;
            }
            (Outcome::Dead { error }, _) => {
                let row = &rows[i];
                let record = &row.record;
                let command_id = record
                    .extensions
                    .iter()
                    .find(|(k, _)| k == "commandid")
                    .and_then(|(_, v)| v.parse::<uuid::Uuid>().ok());
                let extensions: serde_json::Map<String, serde_json::Value> = record
                    .extensions
                    .iter()
                    .filter(|(k, _)| k != "commandid")
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect();
                sqlx::query(
                    "INSERT INTO umw_outbox_dead (source_table, id, command_id, topic, key, type, source, data, extensions, attempts, error)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (source_table, id) DO NOTHING",
                )
                .bind(table)
                .bind(&record.id)
                .bind(command_id)
                .bind(&record.topic)
                .bind(&record.key)
                .bind(&record.ty)
                .bind(&record.source)
                .bind(&record.data)
                .bind(serde_json::Value::Object(extensions))
                .bind(i32::try_from(row.attempts + 1).unwrap_or(i32::MAX))
                .bind(error)
                .execute(&mut **tx)
                .await?;
                match &target {
                    Rows::Commands(positions) => {
                        sqlx::query("DELETE FROM umw_outbox WHERE position = $1")
                            .bind(positions[i])
                            .execute(&mut **tx)
                            .await?;
                    }
                    Rows::App(app, refs) => {
                        sqlx::query(sqlx::AssertSqlSafe(app.remove_sql.as_str()))
                            .bind(&refs[i])
                            .execute(&mut **tx)
                            .await?;
                    }
                }
            }
            // Failing rows of application tables are rescheduled in memory (see AppTable::failing).
            (Outcome::Retry { .. }, Rows::App(..)) | (Outcome::Published | Outcome::Skipped, _) => {}
        }
    }
    Ok(())
}

impl Claim for CommandsClaim {
    fn rows(&self) -> &[Row] {
        &self.rows
    }

    fn finish(self: Box<Self>, outcomes: Vec<Outcome>) -> BoxFuture<'static, Result<(), StoreError>> {
        async move {
            let CommandsClaim { mut tx, rows, positions } = *self;
            record_outcomes(&mut tx, COMMANDS_TABLE, Rows::Commands(&positions), &rows, &outcomes)
                .await
                .map_err(store_error)?;
            tx.commit().await.map_err(store_error)
        }
        .boxed()
    }
}

/// An application-owned outbox table (an `EventRoute` with an `outbox` source).
pub struct AppTable {
    db: Arc<Database>,
    /// `schema.table`, for metrics, logs and the dead-letter table.
    name: String,
    topic: String,
    claim_sql: String,
    publish_sql: String,
    remove_sql: String,
    cleanup_sql: Option<String>,
    depth_sql: String,
    /// Attempts and next attempt of failing rows, by event id (kept in memory: a restart retries at once).
    failing: Mutex<HashMap<String, (u32, Instant)>>,
}

/// Column names of an application's outbox table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AppColumns {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub ty: String,
    pub payload: String,
    pub headers: Option<String>,
    pub position: String,
    pub published_at: Option<String>,
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

impl AppTable {
    pub fn new(db: Arc<Database>, schema: &str, table: &str, columns: &AppColumns, topic: &str) -> Self {
        let t = format!("{}.{}", quote(schema), quote(table));
        let c = |name: &str| quote(name);
        let pending = match &columns.published_at {
            Some(published) => format!("{} IS NULL", c(published)),
            None => "true".to_string(),
        };
        let pending_p = match &columns.published_at {
            Some(published) => format!("p.{} IS NULL", c(published)),
            None => "true".to_string(),
        };
        let headers = match &columns.headers {
            Some(h) => format!("t.{}::jsonb", c(h)),
            None => "NULL::jsonb".to_string(),
        };
        let claim_sql = format!(
            "WITH claimed AS (
                SELECT ctid AS row_ref FROM {t} WHERE {pending} ORDER BY {position} LIMIT $1 FOR UPDATE SKIP LOCKED
             )
             SELECT t.ctid::text AS row_ref, t.{id}::text AS id, t.{aggregate_type}::text AS aggregate_type,
                    t.{aggregate_id}::text AS key, t.{ty}::text AS type, t.{payload} AS payload, {headers} AS headers,
                    EXISTS (
                        SELECT 1 FROM {t} p
                        WHERE p.{aggregate_id} = t.{aggregate_id} AND {pending_p} AND p.{position} < t.{position}
                          AND p.ctid NOT IN (SELECT row_ref FROM claimed)
                    ) AS blocked
             FROM {t} t JOIN claimed ON t.ctid = claimed.row_ref
             ORDER BY t.{position}",
            position = c(&columns.position),
            id = c(&columns.id),
            aggregate_type = c(&columns.aggregate_type),
            aggregate_id = c(&columns.aggregate_id),
            ty = c(&columns.ty),
            payload = c(&columns.payload),
        );
        let publish_sql = match &columns.published_at {
            Some(published) => format!("UPDATE {t} SET {} = now() WHERE ctid = ANY($1::text[]::tid[])", c(published)),
            None => format!("DELETE FROM {t} WHERE ctid = ANY($1::text[]::tid[])"),
        };
        let remove_sql = format!("DELETE FROM {t} WHERE ctid = $1::text::tid");
        let cleanup_sql = columns.published_at.as_ref().map(|published| {
            format!(
                "DELETE FROM {t} WHERE ctid IN (SELECT ctid FROM {t} WHERE {p} < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)",
                p = c(published)
            )
        });
        let depth_sql = format!("SELECT count(*) FROM {t} WHERE {pending}");
        Self {
            db,
            name: format!("{schema}.{table}"),
            topic: topic.to_string(),
            claim_sql,
            publish_sql,
            remove_sql,
            cleanup_sql,
            depth_sql,
            failing: Mutex::new(HashMap::new()),
        }
    }
}

/// A payload column as bytes: `bytea` as is, `jsonb`/`json`/`text` as UTF-8 text.
fn payload_bytes(row: &PgRow) -> Result<(Vec<u8>, Option<String>), sqlx::Error> {
    if let Ok(bytes) = row.try_get::<Option<Vec<u8>>, _>("payload") {
        return Ok((bytes.unwrap_or_default(), None));
    }
    if let Ok(value) = row.try_get::<Option<serde_json::Value>, _>("payload") {
        let bytes = value.map(|v| serde_json::to_vec(&v).unwrap_or_default()).unwrap_or_default();
        return Ok((bytes, Some("application/json".into())));
    }
    let text: Option<String> = row.try_get("payload")?;
    let text = text.unwrap_or_default();
    let json = serde_json::from_str::<serde_json::Value>(&text).is_ok();
    Ok((text.into_bytes(), json.then(|| "application/json".into())))
}

struct AppClaim {
    tx: Transaction<'static, Postgres>,
    rows: Vec<Row>,
    refs: Vec<String>,
    table: Arc<AppTable>,
}

impl AppTable {
    fn claim_rows(self: Arc<Self>, limit: u32) -> BoxFuture<'static, Result<Box<dyn Claim>, StoreError>> {
        async move {
            if !self.db.ready(Duration::from_secs(1)).await {
                return Err(StoreError::Unavailable("the database schema is not ready yet".into()));
            }
            let mut tx = begin_relay(&self.db).await?;
            let fetched = sqlx::query(sqlx::AssertSqlSafe(self.claim_sql.as_str()))
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await
                .map_err(store_error)?;
            let now = Instant::now();
            let failing = self.failing.lock().map(|f| f.clone()).unwrap_or_default();
            let mut rows = Vec::with_capacity(fetched.len());
            let mut refs = Vec::with_capacity(fetched.len());
            for row in &fetched {
                let parse = || -> Result<(String, Row), sqlx::Error> {
                    let id: String = row.try_get("id")?;
                    let aggregate_type: Option<String> = row.try_get("aggregate_type")?;
                    let key: Option<String> = row.try_get("key")?;
                    let (data, content_type) = payload_bytes(row)?;
                    let (attempts, next) = failing.get(&id).copied().unwrap_or((0, now));
                    let record = Record {
                        id,
                        topic: self.topic.clone(),
                        key: key.clone(),
                        ty: row.try_get::<Option<String>, _>("type")?.unwrap_or_default(),
                        source: format!("/{}", aggregate_type.unwrap_or_else(|| self.name.clone())),
                        subject: key,
                        time: None,
                        data,
                        content_type,
                        extensions: Vec::new(),
                        headers: string_pairs(row.try_get("headers")?),
                    };
                    let blocked: bool = row.try_get("blocked")?;
                    Ok((row.try_get("row_ref")?, Row { record, attempts, blocked: blocked || next > now, age: 0.0 }))
                };
                let (row_ref, row) = parse().map_err(store_error)?;
                refs.push(row_ref);
                rows.push(row);
            }
            Ok(Box::new(AppClaim { tx, rows, refs, table: self }) as Box<dyn Claim>)
        }
        .boxed()
    }
}

/// A handle that lets [`Source::claim`] hand the claim an owned reference to the table.
pub struct AppSource(pub Arc<AppTable>);

impl Source for AppSource {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn claim(&self, limit: u32) -> BoxFuture<'_, Result<Box<dyn Claim>, StoreError>> {
        self.0.clone().claim_rows(limit)
    }

    fn wait(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        tokio::time::sleep(timeout).boxed()
    }

    fn cleanup(&self, retention: Duration) -> BoxFuture<'_, Result<u64, StoreError>> {
        async move {
            let Some(sql) = &self.0.cleanup_sql else { return Ok(0) };
            let mut deleted = 0;
            loop {
                let done = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                    .bind(retention.as_secs_f64())
                    .bind(CLEANUP_BATCH)
                    .execute(&self.0.db.pool)
                    .await
                    .map_err(store_error)?
                    .rows_affected();
                deleted += done;
                if done < CLEANUP_BATCH as u64 {
                    return Ok(deleted);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        .boxed()
    }

    fn depth(&self) -> BoxFuture<'_, Result<(i64, f64), StoreError>> {
        async move {
            let depth: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(self.0.depth_sql.as_str()))
                .fetch_one(&self.0.db.pool)
                .await
                .map_err(store_error)?;
            Ok((depth, 0.0))
        }
        .boxed()
    }
}

impl Claim for AppClaim {
    fn rows(&self) -> &[Row] {
        &self.rows
    }

    fn finish(self: Box<Self>, outcomes: Vec<Outcome>) -> BoxFuture<'static, Result<(), StoreError>> {
        async move {
            let AppClaim { mut tx, rows, refs, table } = *self;
            record_outcomes(&mut tx, &table.name, Rows::App(&table, &refs), &rows, &outcomes)
                .await
                .map_err(store_error)?;
            tx.commit().await.map_err(store_error)?;
            if let Ok(mut failing) = table.failing.lock() {
                let now = Instant::now();
                for (row, outcome) in rows.iter().zip(&outcomes) {
                    match outcome {
                        Outcome::Retry { delay, .. } => {
                            failing.insert(row.record.id.clone(), (row.attempts + 1, now + *delay));
                        }
                        Outcome::Published | Outcome::Dead { .. } => {
                            failing.remove(&row.record.id);
                        }
                        Outcome::Skipped => {}
                    }
                }
            }
            Ok(())
        }
        .boxed()
    }
}
