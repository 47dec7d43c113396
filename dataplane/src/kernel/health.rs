//! Component health: what `/readyz` decides on and what `/status` reports to the operator.
//!
//! Each component (the configuration, the HTTP listener, each upstream, and later the cache, events and
//! the outbox) has a state, a message and the time it entered that state. Components marked `required`
//! decide readiness; the others can only degrade the Middleware.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
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
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<RwLock<BTreeMap<String, Component>>>,
}

impl Health {
    /// Records a component's state; `since` moves only when the state changes.
    pub fn set(&self, name: &str, state: State, message: impl Into<String>, required: bool) {
        let message = message.into();
        let Ok(mut map) = self.inner.write() else { return };
        match map.get_mut(name) {
            Some(existing) if existing.state == state => {
                existing.message = message;
                existing.required = required;
            }
            _ => {
                map.insert(
                    name.to_string(),
                    Component { name: name.to_string(), state, message, since: rfc3339(SystemTime::now()), required },
                );
            }
        }
    }

    /// Drops components that the current configuration no longer has (e.g. a removed upstream).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut map) = self.inner.write() {
            map.retain(|name, _| keep(name));
        }
    }

    pub fn components(&self) -> Vec<Component> {
        self.inner.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
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
}
