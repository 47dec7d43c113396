//! Component health: what `/readyz` decides on and what `/status` reports to the operator.
//!
//! Each component (the configuration, the HTTP listener, each upstream, and later the cache, events and
//! the outbox) has a state, a message and the time it entered that state. Components marked `required`
//! decide readiness; the others can only degrade the Middleware.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use serde::Serialize;

/// State of a component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum State {
    /// Working.
    Up,
    /// Working with a problem, or partly (e.g. an upstream's circuit breaker is open).
    Degraded,
    /// Not working.
    Down,
    /// Not started yet, or not warm yet.
    Starting,
}

/// One component as `/status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    pub name: String,
    pub state: State,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339 time the component entered its state.
    pub since: String,
    /// Whether readiness waits for this component.
    pub required: bool,
}

/// The health registry, shared by every component.
///
/// An entry is owned either by the process (`set`: the configuration, the listener) or by a resource
/// through a [`HealthHandle`]: the handle shows nothing until it is activated (a snapshot that is never
/// committed leaves nothing behind), its entry goes when the handle is retired or dropped, and a retired
/// handle's late writes are ignored. Several resources may report under one name (a Kafka producer and a
/// consumer are both `kafka`); `/status` shows the worst of them.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<RwLock<BTreeMap<String, BTreeMap<u64, Component>>>>,
}

/// The owner id of the entries the process sets directly.
const PROCESS: u64 = 0;

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

impl Health {
    /// Records a component's state; `since` moves only when the state changes.
    pub fn set(&self, name: &str, state: State, message: impl Into<String>, required: bool) {
        self.write(name, PROCESS, state, message.into(), required);
    }

    fn write(&self, name: &str, owner: u64, state: State, message: String, required: bool) {
        let Ok(mut map) = self.inner.write() else { return };
        let owners = map.entry(name.to_string()).or_default();
        match owners.get_mut(&owner) {
            Some(existing) if existing.state == state => {
                existing.message = message;
                existing.required = required;
            }
            _ => {
                owners.insert(
                    owner,
                    Component { name: name.to_string(), state, message, since: rfc3339(SystemTime::now()), required },
                );
            }
        }
    }

    fn remove(&self, name: &str, owner: u64) {
        let Ok(mut map) = self.inner.write() else { return };
        if let Some(owners) = map.get_mut(name) {
            owners.remove(&owner);
            if owners.is_empty() {
                map.remove(name);
            }
        }
    }

    /// Drops process-owned entries that no longer apply.
    pub fn unset(&self, name: &str) {
        self.remove(name, PROCESS);
    }

    /// A handle for one resource's entry under `name`. Nothing shows until [`HealthHandle::activate`].
    pub fn handle(&self, name: impl Into<String>, required: bool) -> HealthHandle {
        HealthHandle(Arc::new(Owner {
            health: self.clone(),
            name: name.into(),
            id: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            required,
            phase: AtomicU8::new(DETACHED),
            last: Mutex::new(None),
        }))
    }

    /// Every component, one per name: the worst state its owners report (then the most recent).
    pub fn components(&self) -> Vec<Component> {
        let Ok(map) = self.inner.read() else { return Vec::new() };
        map.values()
            .filter_map(|owners| {
                let mut worst: Option<&Component> = None;
                for c in owners.values() {
                    if worst.is_none_or(|w| severity(c.state) > severity(w.state)) {
                        worst = Some(c);
                    }
                }
                let mut shown = worst?.clone();
                shown.required = owners.values().any(|c| c.required);
                Some(shown)
            })
            .collect()
    }

    /// Ready when no required component is down or still starting (a degraded one still serves). The
    /// message names the first one that keeps the pod unready.
    pub fn readiness(&self) -> Result<(), String> {
        let components = self.components();
        if components.is_empty() {
            return Err("starting".into());
        }
        match components.iter().find(|c| c.required && matches!(c.state, State::Down | State::Starting)) {
            Some(c) => Err(format!(
                "{} is {:?}{}",
                c.name,
                c.state,
                if c.message.is_empty() { String::new() } else { format!(": {}", c.message) }
            )),
            None => Ok(()),
        }
    }
}

fn severity(state: State) -> u8 {
    match state {
        State::Up => 0,
        State::Degraded => 1,
        State::Starting => 2,
        State::Down => 3,
    }
}

const DETACHED: u8 = 0;
const ACTIVE: u8 = 1;
const RETIRED: u8 = 2;

/// One resource's entry in the [`Health`] registry. Clones share the entry; it is removed when the last
/// clone is dropped or when one of them is retired, whichever comes first.
#[derive(Clone)]
pub struct HealthHandle(Arc<Owner>);

struct Owner {
    health: Health,
    name: String,
    id: u64,
    required: bool,
    phase: AtomicU8,
    /// The last state reported, shown when the handle is activated (nothing, if nothing was reported).
    last: Mutex<Option<(State, String)>>,
}

impl HealthHandle {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Reports the resource's state; kept until activation, ignored once retired.
    pub fn set(&self, state: State, message: impl Into<String>) {
        let message = message.into();
        let Ok(mut last) = self.0.last.lock() else { return };
        *last = Some((state, message.clone()));
        // Checked under the lock, so that a write cannot slip in after `retire` removed the entry.
        if self.0.phase.load(Ordering::SeqCst) == ACTIVE {
            self.0.health.write(&self.0.name, self.0.id, state, message, self.0.required);
        }
    }

    /// Shows the entry from now on, with the last state reported (a resource that reported nothing yet
    /// appears with its first report); a retired handle stays hidden.
    pub fn activate(&self) {
        let Ok(last) = self.0.last.lock() else { return };
        if self.0.phase.compare_exchange(DETACHED, ACTIVE, Ordering::SeqCst, Ordering::SeqCst).is_ok()
            && let Some((state, message)) = last.as_ref()
        {
            self.0.health.write(&self.0.name, self.0.id, *state, message.clone(), self.0.required);
        }
    }

    /// Removes the entry for good: later writes (from a task that is still stopping) are ignored.
    pub fn retire(&self) {
        let Ok(_last) = self.0.last.lock() else { return };
        if self.0.phase.swap(RETIRED, Ordering::SeqCst) == ACTIVE {
            self.0.health.remove(&self.0.name, self.0.id);
        }
    }

    pub fn is_active(&self) -> bool {
        self.0.phase.load(Ordering::SeqCst) == ACTIVE
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if *self.phase.get_mut() == ACTIVE {
            self.health.remove(&self.name, self.id);
        }
    }
}

/// RFC 3339 in UTC, seconds precision, without a date crate.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_is_right() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_652_245)), "2026-11-26T00:17:25Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn readiness_follows_required_components_only() {
        let health = Health::default();
        assert!(health.readiness().is_err(), "nothing registered yet");
        health.set("config", State::Up, "", true);
        let since = health.components()[0].since.clone();
        health.set("config", State::Up, "reloaded", true);
        assert_eq!(health.components()[0].since, since, "the same state keeps its since");
        health.set("upstream/a", State::Down, "circuit open", false);
        assert_eq!(health.readiness(), Ok(()), "optional components do not decide");
        health.set("config", State::Degraded, "reload rejected", true);
        assert_eq!(health.readiness(), Ok(()), "degraded still serves");
        health.set("http", State::Starting, "binding", true);
        assert_eq!(health.readiness(), Err("http is Starting: binding".into()));
    }

    #[test]
    fn a_handle_shows_nothing_until_activated_and_nothing_after_it_is_retired_or_dropped() {
        let health = Health::default();
        let handle = health.handle("redis", false);
        handle.set(State::Down, "cannot connect");
        assert!(health.components().is_empty(), "a detached handle is invisible");
        handle.activate();
        assert_eq!(health.components()[0].message, "cannot connect", "activation shows the last state");
        let late = handle.clone();
        handle.retire();
        late.set(State::Up, "connected");
        assert!(health.components().is_empty(), "a late write does not bring a retired entry back");
        late.activate();
        assert!(health.components().is_empty(), "nor does activating it again");
        let other = health.handle("redis", false);
        other.activate();
        assert!(health.components().is_empty(), "a handle that reported nothing shows nothing");
        other.set(State::Up, "connected");
        assert_eq!(health.components().len(), 1, "until its first report");
        drop(other);
        assert!(health.components().is_empty(), "dropping the last clone removes the entry");
    }

    #[test]
    fn owners_of_one_name_show_as_one_component_with_the_worst_state() {
        let health = Health::default();
        let producer = health.handle("kafka", false);
        let consumer = health.handle("kafka", false);
        producer.set(State::Up, "connected");
        consumer.set(State::Down, "group coordinator unreachable");
        producer.activate();
        consumer.activate();
        let shown = health.components();
        assert_eq!(shown.len(), 1);
        assert_eq!((shown[0].state, shown[0].message.as_str()), (State::Down, "group coordinator unreachable"));
        drop(consumer);
        assert_eq!(health.components()[0].state, State::Up, "the consumer's report went with it");
    }
}
