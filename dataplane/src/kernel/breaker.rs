//! A circuit breaker (per upstream, and around the Redis cache): closed → (N failures in a row) → open for a while → one trial request
//! (half-open) → closed on success, open again on failure.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The breaker's state, as the metric reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Whether a request may go to the upstream.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send it. `trial` is true for the one request that probes a half-open breaker.
    Allowed { trial: bool },
    /// Do not: the breaker is open for about this long.
    Rejected { retry_after: Duration },
}

#[derive(Debug)]
enum Phase {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A trial request is out since `started`; others are refused until it reports.
    HalfOpen {
        started: Instant,
    },
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    phase: Mutex<Phase>,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self { threshold: threshold.max(1), open_for, phase: Mutex::new(Phase::Closed { failures: 0 }) }
    }

    /// Asks to send a request now. A transition to half-open is returned alongside.
    pub fn admit(&self, now: Instant) -> (Admission, Option<BreakerState>) {
        let Ok(mut phase) = self.phase.lock() else { return (Admission::Allowed { trial: false }, None) };
        match *phase {
            Phase::Closed { .. } => (Admission::Allowed { trial: false }, None),
            Phase::Open { until } if now < until => (Admission::Rejected { retry_after: until - now }, None),
            Phase::Open { .. } => {
                *phase = Phase::HalfOpen { started: now };
                (Admission::Allowed { trial: true }, Some(BreakerState::HalfOpen))
            }
            // A trial that never reported (its request was cancelled) must not stall the upstream forever.
            Phase::HalfOpen { started } if now.duration_since(started) >= self.open_for => {
                *phase = Phase::HalfOpen { started: now };
                (Admission::Allowed { trial: true }, None)
            }
            Phase::HalfOpen { started } => {
                (Admission::Rejected { retry_after: self.open_for.saturating_sub(now.duration_since(started)) }, None)
            }
        }
    }

    /// Reports the outcome of an allowed request; returns the state entered, if it changed.
    pub fn record(&self, success: bool, now: Instant) -> Option<BreakerState> {
        let Ok(mut phase) = self.phase.lock() else { return None };
        match (&mut *phase, success) {
            (Phase::Closed { failures }, true) => {
                *failures = 0;
                None
            }
            (Phase::Closed { failures }, false) => {
                *failures += 1;
                if *failures >= self.threshold {
                    *phase = Phase::Open { until: now + self.open_for };
                    Some(BreakerState::Open)
                } else {
                    None
                }
            }
            (Phase::HalfOpen { .. }, true) => {
                *phase = Phase::Closed { failures: 0 };
                Some(BreakerState::Closed)
            }
            (Phase::HalfOpen { .. }, false) => {
                *phase = Phase::Open { until: now + self.open_for };
                Some(BreakerState::Open)
            }
            // Requests admitted before the breaker opened report late; they do not change an open breaker.
            (Phase::Open { .. }, _) => None,
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.phase.lock().map(|p| match *p {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }) {
            Ok(state) => state,
            Err(_) => BreakerState::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_a_good_trial() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(b.record(false, t), None);
        assert_eq!(b.record(true, t), None, "a success resets the count");
        assert_eq!(b.record(false, t), None);
        assert_eq!(b.record(false, t), None);
        assert_eq!(b.record(false, t), Some(BreakerState::Open));
        assert_eq!(b.admit(t + Duration::from_secs(4)).0, Admission::Rejected { retry_after: Duration::from_secs(6) });
        let later = t + Duration::from_secs(10);
        assert_eq!(b.admit(later), (Admission::Allowed { trial: true }, Some(BreakerState::HalfOpen)));
        assert!(matches!(b.admit(later).0, Admission::Rejected { .. }), "one trial at a time");
        assert_eq!(b.record(true, later), Some(BreakerState::Closed));
        assert_eq!(b.admit(later).0, Admission::Allowed { trial: false });
    }

    #[test]
    fn a_failed_trial_reopens_and_a_lost_trial_does_not_stall() {
        let b = Breaker::new(1, Duration::from_secs(5));
        let t = Instant::now();
        assert_eq!(b.record(false, t), Some(BreakerState::Open));
        let t1 = t + Duration::from_secs(5);
        assert_eq!(b.admit(t1).0, Admission::Allowed { trial: true });
        assert_eq!(b.record(false, t1), Some(BreakerState::Open));
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(b.admit(t2).0, Admission::Allowed { trial: true });
        // The trial's request is cancelled and never reports: another trial goes after open_for.
        assert!(matches!(b.admit(t2 + Duration::from_secs(1)).0, Admission::Rejected { .. }));
        assert_eq!(b.admit(t2 + Duration::from_secs(5)).0, Admission::Allowed { trial: true });
    }
}
