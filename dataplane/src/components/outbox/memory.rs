//! The in-process store, for a data plane running on its own (`--in-process-backends`): the same
//! commands, idempotency and relay, but nothing survives a restart — not the commands, not the events
//! waiting to be published. Never use it where a command's event must not be lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;

use super::relay::{Claim, Outcome, Row, Source};
use super::{
    COMMANDS_TABLE, CommandRecord, CommandState, DeadRow, EventState, NewCommand, OutboxStore, Record, Recorded,
    StoreError,
};

#[derive(Default)]
struct State {
    commands: HashMap<uuid::Uuid, (CommandRecord, Instant)>,
    keys: HashMap<(String, String), uuid::Uuid>,
    /// Unpublished and published events by position.
    outbox: BTreeMap<u64, Entry>,
    next_position: u64,
    dead: Vec<DeadRow>,
}

struct Entry {
    record: Record,
    command: uuid::Uuid,
    created: Instant,
    attempts: u32,
    last_error: Option<String>,
    next_attempt: Instant,
    published: Option<Instant>,
    claimed: bool,
}

/// Commands and their events in memory.
#[derive(Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    wake: Arc<tokio::sync::Notify>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl OutboxStore for MemoryStore {
    fn find_by_key<'a>(
        &'a self,
        command: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<CommandRecord>, StoreError>> {
        let state = self.lock();
        let found = state
            .keys
            .get(&(command.to_string(), key.to_string()))
            .and_then(|id| state.commands.get(id))
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(record, _)| record.clone());
        futures::future::ready(Ok(found)).boxed()
    }

    fn record(&self, command: NewCommand) -> BoxFuture<'_, Result<Recorded, StoreError>> {
        let mut state = self.lock();
        let NewCommand { mut record, idempotency_key, ttl, events } = command;
        let now = Instant::now();
        if let Some(key) = &idempotency_key {
            let existing = state
                .keys
                .get(&(record.command.clone(), key.clone()))
                .and_then(|id| state.commands.get(id))
                .filter(|(_, expires)| *expires > now)
                .map(|(record, _)| record.clone());
            if let Some(existing) = existing {
                return futures::future::ready(Ok(Recorded::KeyTaken(existing))).boxed();
            }
            state.keys.insert((record.command.clone(), key.clone()), record.id);
        }
        record.created_at = now_rfc3339();
        let id = record.id;
        state.commands.insert(id, (record, now + ttl));
        let had_events = !events.is_empty();
        for mut event in events {
            event.time = Some(now_rfc3339());
            let position = state.next_position;
            state.next_position += 1;
            state.outbox.insert(
                position,
                Entry {
                    record: event,
                    command: id,
                    created: now,
                    attempts: 0,
                    last_error: None,
                    next_attempt: now,
                    published: None,
                    claimed: false,
                },
            );
        }
        drop(state);
        if had_events {
            self.wake.notify_one();
        }
        futures::future::ready(Ok(Recorded::Done)).boxed()
    }

    fn get(&self, id: uuid::Uuid) -> BoxFuture<'_, Result<Option<CommandState>, StoreError>> {
        let state = self.lock();
        let found = state.commands.get(&id).map(|(record, _)| {
            let mut events: Vec<EventState> = state
                .outbox
                .values()
                .filter(|e| e.command == id)
                .map(|e| EventState {
                    id: e.record.id.clone(),
                    topic: e.record.topic.clone(),
                    state: if e.published.is_some() { "published" } else { "pending" }.into(),
                    attempts: e.attempts,
                    last_error: e.last_error.clone(),
                })
                .collect();
            let command = id.to_string();
            events.extend(state.dead.iter().filter(|d| d.id.starts_with(&command)).map(|d| EventState {
                id: d.id.clone(),
                topic: d.topic.clone(),
                state: "failed".into(),
                attempts: d.attempts,
                last_error: Some(d.error.clone()),
            }));
            (record.clone(), events)
        });
        futures::future::ready(Ok(found)).boxed()
    }

    fn dead(&self, limit: u32) -> BoxFuture<'_, Result<Vec<DeadRow>, StoreError>> {
        let state = self.lock();
        let rows = state.dead.iter().rev().take(limit as usize).cloned().collect();
        futures::future::ready(Ok(rows)).boxed()
    }

    fn source(&self) -> Arc<dyn Source> {
        Arc::new(MemorySource { state: self.state.clone(), wake: self.wake.clone() })
    }
}

struct MemorySource {
    state: Arc<Mutex<State>>,
    wake: Arc<tokio::sync::Notify>,
}

struct MemoryClaim {
    state: Arc<Mutex<State>>,
    rows: Vec<Row>,
    positions: Vec<u64>,
}

impl Source for MemorySource {
    fn name(&self) -> &str {
        COMMANDS_TABLE
    }

    fn claim(&self, limit: u32) -> BoxFuture<'_, Result<Box<dyn Claim>, StoreError>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut rows = Vec::new();
        let mut positions = Vec::new();
        // Keys with an unpublished row that this claim does not take: their later rows wait.
        let mut waiting: std::collections::HashSet<String> = std::collections::HashSet::new();
        for (position, entry) in state.outbox.iter_mut() {
            if entry.published.is_some() {
                continue;
            }
            let key = entry.record.key.clone();
            let takeable = !entry.claimed && entry.next_attempt <= now && rows.len() < limit as usize;
            if !takeable {
                if let Some(key) = key {
                    waiting.insert(key);
                }
                continue;
            }
            entry.claimed = true;
            let blocked = key.as_ref().is_some_and(|k| waiting.contains(k));
            rows.push(Row {
                record: entry.record.clone(),
                attempts: entry.attempts,
                blocked,
                age: now.duration_since(entry.created).as_secs_f64(),
            });
            positions.push(*position);
        }
        let claim = MemoryClaim { state: self.state.clone(), rows, positions };
        futures::future::ready(Ok(Box::new(claim) as Box<dyn Claim>)).boxed()
    }

    fn wait(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        async move {
            let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
        }
        .boxed()
    }

    fn cleanup(&self, retention: Duration) -> BoxFuture<'_, Result<u64, StoreError>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let before = state.outbox.len() + state.commands.len();
        state.outbox.retain(|_, e| e.published.is_none_or(|at| now.duration_since(at) < retention));
        let expired: Vec<uuid::Uuid> =
            state.commands.iter().filter(|(_, (_, expires))| *expires <= now).map(|(id, _)| *id).collect();
        for id in expired {
            state.commands.remove(&id);
        }
        let commands: std::collections::HashSet<uuid::Uuid> = state.commands.keys().copied().collect();
        state.keys.retain(|_, id| commands.contains(id));
        let deleted = before - state.outbox.len() - state.commands.len();
        futures::future::ready(Ok(deleted as u64)).boxed()
    }

    fn depth(&self) -> BoxFuture<'_, Result<(i64, f64), StoreError>> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let pending = state.outbox.values().filter(|e| e.published.is_none());
        let (count, oldest) = pending
            .fold((0i64, 0.0f64), |(n, oldest), e| (n + 1, oldest.max(now.duration_since(e.created).as_secs_f64())));
        futures::future::ready(Ok((count, oldest))).boxed()
    }
}

impl Claim for MemoryClaim {
    fn rows(&self) -> &[Row] {
        &self.rows
    }

    fn finish(self: Box<Self>, outcomes: Vec<Outcome>) -> BoxFuture<'static, Result<(), StoreError>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for ((position, row), outcome) in self.positions.iter().zip(&self.rows).zip(outcomes) {
            match outcome {
                Outcome::Published => {
                    if let Some(entry) = state.outbox.get_mut(position) {
                        entry.published = Some(now);
                        entry.claimed = false;
                    }
                }
                Outcome::Retry { error, delay } => {
                    if let Some(entry) = state.outbox.get_mut(position) {
                        entry.attempts += 1;
                        entry.last_error = Some(error);
                        entry.next_attempt = now + delay;
                        entry.claimed = false;
                    }
                }
                Outcome::Dead { error } => {
                    if let Some(entry) = state.outbox.remove(position) {
                        state.dead.push(DeadRow {
                            table: COMMANDS_TABLE.into(),
                            id: format!("{}/{}", entry.command, row.record.id),
                            topic: row.record.topic.clone(),
                            key: row.record.key.clone(),
                            ty: row.record.ty.clone(),
                            attempts: row.attempts + 1,
                            error,
                            failed_at: now_rfc3339(),
                        });
                    }
                }
                Outcome::Skipped => {
                    if let Some(entry) = state.outbox.get_mut(position) {
                        entry.claimed = false;
                    }
                }
            }
        }
        futures::future::ready(Ok(())).boxed()
    }
}

impl Drop for MemoryClaim {
    fn drop(&mut self) {
        // A claim dropped without finish (the relay stopped) releases its rows.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for position in &self.positions {
            if let Some(entry) = state.outbox.get_mut(position) {
                entry.claimed = false;
            }
        }
    }
}
