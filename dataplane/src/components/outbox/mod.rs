//! Commands and the transactional outbox.
//!
//! A command accepted over HTTP is written, with its event, in one PostgreSQL transaction; the `202` is
//! sent only after that transaction committed. A relay then publishes committed events to Kafka and marks
//! them published, so an event is never lost between the database and the broker: a crash after the
//! commit leaves the row for the next relay, a crash after publishing and before marking publishes it once
//! more (delivery is at-least-once; every event carries a stable id for de-duplication).
//!
//! The same relay reads application-owned outbox tables (an `EventRoute` with an `outbox` source). An
//! in-process store serves standalone use; it keeps nothing across a restart.
//!
//! This component publishes through the events component's `Publish` port, and command handlers are
//! called through the proxy's `Forward` port ([`component`]).

pub mod commands;
pub mod component;
pub mod memory;
pub mod postgres;
pub mod relay;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::kernel::problem::Kind;

/// Problems of commands.
pub mod kinds {
    use super::Kind;
    use http::StatusCode;

    pub const COMMANDS_UNAVAILABLE: Kind = Kind {
        slug: "commands-unavailable",
        title: "The command could not be recorded now",
        status: StatusCode::SERVICE_UNAVAILABLE,
    };
    pub const IDEMPOTENCY_CONFLICT: Kind = Kind {
        slug: "idempotency-key-reused",
        title: "The idempotency key was used for a different request",
        status: StatusCode::CONFLICT,
    };
    pub const INVALID_COMMAND: Kind =
        Kind { slug: "invalid-command", title: "The request is not a valid command", status: StatusCode::BAD_REQUEST };
    pub const COMMAND_NOT_FOUND: Kind =
        Kind { slug: "command-not-found", title: "No such command", status: StatusCode::NOT_FOUND };
    pub const HANDLER_FAILED: Kind = Kind {
        slug: "command-handler-failed",
        title: "The command's handler did not accept or refuse it",
        status: StatusCode::BAD_GATEWAY,
    };
}

/// Defaults documented on the CRD.
pub const DEFAULT_BATCH: u32 = 500;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
/// Below the producer's default `message.max.bytes` (1,000,000), with room for the event's headers: a
/// larger event could be recorded but never published.
pub const DEFAULT_MAX_BODY: u64 = 900 * 1024;

/// The name of the PostgreSQL component in `/status`.
pub const COMPONENT: &str = "postgres";

/// The table of events written by commands.
pub const COMMANDS_TABLE: &str = "umw_outbox";

pub use crate::kernel::ports::{Record, Sink, SinkError};

/// Why the store could not do something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or timed out: try again later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a bug or a schema changed under us).
    #[error("the database refused the operation: {0}")]
    Failed(String),
}

/// A command as recorded, for idempotent replays and `GET /commands/{id}`.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRecord {
    pub id: uuid::Uuid,
    pub command: String,
    pub request_hash: Vec<u8>,
    /// `accepted` or `rejected`.
    pub state: String,
    /// The response sent for it, replayed for a retry with the same idempotency key.
    pub status: u16,
    pub response: serde_json::Value,
    pub created_at: String,
}

/// A command to record with its events, in one transaction.
#[derive(Clone, Debug)]
pub struct NewCommand {
    pub record: CommandRecord,
    pub idempotency_key: Option<String>,
    pub ttl: Duration,
    pub events: Vec<Record>,
}

/// What became of a command's event.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventState {
    pub id: String,
    pub topic: String,
    /// `pending`, `published` or `failed` (moved to the dead-letter table).
    pub state: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A command and the state of its events.
pub type CommandState = (CommandRecord, Vec<EventState>);

/// The outcome of [`OutboxStore::record`].
#[derive(Debug)]
pub enum Recorded {
    Done,
    /// The idempotency key was taken first by this command.
    KeyTaken(CommandRecord),
}

/// A row that failed for good, for the admin view.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadRow {
    pub table: String,
    pub id: String,
    pub topic: String,
    pub key: Option<String>,
    #[serde(rename = "type")]
    pub ty: String,
    pub attempts: u32,
    pub error: String,
    pub failed_at: String,
}

/// Where commands and their events are kept: PostgreSQL, or memory for standalone use.
pub trait OutboxStore: Send + Sync + 'static {
    /// The command recorded under an idempotency key, if any.
    fn find_by_key<'a>(
        &'a self,
        command: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<CommandRecord>, StoreError>>;

    /// Writes the command and its events in one transaction.
    fn record(&self, command: NewCommand) -> BoxFuture<'_, Result<Recorded, StoreError>>;

    /// A command and the state of its events.
    fn get(&self, id: uuid::Uuid) -> BoxFuture<'_, Result<Option<CommandState>, StoreError>>;

    /// Rows that failed for good, newest first.
    fn dead(&self, limit: u32) -> BoxFuture<'_, Result<Vec<DeadRow>, StoreError>>;

    /// The relay source of the commands' events.
    fn source(&self) -> Arc<dyn relay::Source>;
}
