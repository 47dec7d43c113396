//! A circuit breaker (per upstream, and around the Redis cache): closed → (N failures in a row) → open for
//! a while → one trial request (half-open) → closed on success, open again on failure. Only the trial
//! decides: a request admitted before the breaker opened that reports during the trial changes nothing.
//!
//! A breaker that is closed with no failure counted (every request, while an upstream is healthy) admits
//! and takes successes without its lock: one atomic load, read by every thread without contention.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// The one request that probes a half-open breaker; its report decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trial(u64);

/// Whether a request may go to the upstream.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send it; report the outcome with its `trial`.
    Allowed { trial: Option<Trial> },
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
        trial: Trial,
    },
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    phase: Mutex<Phase>,
    /// Whether the phase is `Closed { failures: 0 }`; written under the lock whenever the phase changes.
    healthy: AtomicBool,
    /// The id of the next trial.
    trials: std::sync::atomic::AtomicU64,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for,
            phase: Mutex::new(Phase::Closed { failures: 0 }),
            healthy: AtomicBool::new(true),
            trials: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Closed with no failure counted: a request is admitted, and a success changes nothing.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Asks to send a request now. A transition to half-open is returned alongside.
    pub fn admit(&self, now: Instant) -> (Admission, Option<BreakerState>) {
        if self.is_healthy() {
            return (Admission::Allowed { trial: None }, None);
        }
        let Ok(mut phase) = self.phase.lock() else { return (Admission::Allowed { trial: None }, None) };
        let next = || Trial(self.trials.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        match *phase {
            Phase::Closed { .. } => (Admission::Allowed { trial: None }, None),
            Phase::Open { until } if now < until => (Admission::Rejected { retry_after: until - now }, None),
            Phase::Open { .. } => {
                let trial = next();
                *phase = Phase::HalfOpen { started: now, trial };
                (Admission::Allowed { trial: Some(trial) }, Some(BreakerState::HalfOpen))
            }
            // A trial that never reported (its request was cancelled) must not stall the upstream forever.
            Phase::HalfOpen { started, .. } if now.duration_since(started) >= self.open_for => {
                let trial = next();
                *phase = Phase::HalfOpen { started: now, trial };
                (Admission::Allowed { trial: Some(trial) }, None)
            }
            Phase::HalfOpen { started, .. } => {
                (Admission::Rejected { retry_after: self.open_for.saturating_sub(now.duration_since(started)) }, None)
            }
        }
    }

    /// Reports the outcome of an allowed request (with the trial its admission carried); returns the state
    /// entered, if it changed.
    pub fn record(&self, trial: Option<Trial>, success: bool, now: Instant) -> Option<BreakerState> {
        if success && trial.is_none() && self.is_healthy() {
            return None;
        }
        let Ok(mut phase) = self.phase.lock() else { return None };
        let transition = Self::step(&mut phase, self.threshold, self.open_for, trial, success, now);
        self.healthy.store(matches!(*phase, Phase::Closed { failures: 0 }), Ordering::Release);
        transition
    }

    fn step(
        phase: &mut Phase,
        threshold: u32,
        open_for: Duration,
        trial: Option<Trial>,
        success: bool,
        now: Instant,
    ) -> Option<BreakerState> {
        match (&mut *phase, success) {
            (Phase::Closed { failures }, true) => {
                *failures = 0;
                None
            }
            (Phase::Closed { failures }, false) => {
                *failures += 1;
                if *failures >= threshold {
                    *phase = Phase::Open { until: now + open_for };
                    Some(BreakerState::Open)
                } else {
                    None
                }
            }
            // Only the trial decides; a request admitted before reports late and changes nothing.
            (Phase::HalfOpen { trial: current, .. }, _) if trial != Some(*current) => None,
            (Phase::HalfOpen { .. }, true) => {
                *phase = Phase::Closed { failures: 0 };
                Some(BreakerState::Closed)
            }
            (Phase::HalfOpen { .. }, false) => {
                *phase = Phase::Open { until: now + open_for };
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
        assert_eq!(b.record(None, false, t), None);
        assert_eq!(b.record(None, true, t), None, "a success resets the count");
        assert_eq!(b.record(None, false, t), None);
        assert_eq!(b.record(None, false, t), None);
        assert_eq!(b.record(None, false, t), Some(BreakerState::Open));
        assert_eq!(b.admit(t + Duration::from_secs(4)).0, Admission::Rejected { retry_after: Duration::from_secs(6) });
        let later = t + Duration::from_secs(10);
        let (admission, transition) = b.admit(later);
        let Admission::Allowed { trial: Some(trial) } = admission else { panic!("a trial: {admission:?}") };
        assert_eq!(transition, Some(BreakerState::HalfOpen));
        assert!(matches!(b.admit(later).0, Admission::Rejected { .. }), "one trial at a time");
        assert_eq!(b.record(Some(trial), true, later), Some(BreakerState::Closed));
        assert_eq!(b.admit(later).0, Admission::Allowed { trial: None });
    }

    #[test]
    fn only_a_closed_breaker_without_failures_takes_the_lock_free_path() {
        let b = Breaker::new(2, Duration::from_secs(10));
        let t = Instant::now();
        assert!(b.is_healthy());
        assert_eq!(b.record(None, false, t), None);
        assert!(!b.is_healthy(), "a failure is counted under the lock");
        assert_eq!(b.record(None, true, t), None);
        assert!(b.is_healthy(), "a success resets the count");
        b.record(None, false, t);
        assert_eq!(b.record(None, false, t), Some(BreakerState::Open));
        assert!(!b.is_healthy());
        assert!(matches!(b.admit(t).0, Admission::Rejected { .. }), "an open breaker is asked under the lock");
        let Admission::Allowed { trial } = b.admit(t + Duration::from_secs(10)).0 else { panic!("a trial") };
        assert!(!b.is_healthy(), "half-open");
        assert_eq!(b.record(trial, true, t + Duration::from_secs(10)), Some(BreakerState::Closed));
        assert!(b.is_healthy());
    }

    #[test]
    fn a_failed_trial_reopens_and_a_lost_trial_does_not_stall() {
        let b = Breaker::new(1, Duration::from_secs(5));
        let t = Instant::now();
        assert_eq!(b.record(None, false, t), Some(BreakerState::Open));
        let t1 = t + Duration::from_secs(5);
        let Admission::Allowed { trial: trial @ Some(_) } = b.admit(t1).0 else { panic!("a trial") };
        assert_eq!(b.record(trial, false, t1), Some(BreakerState::Open));
        let t2 = t1 + Duration::from_secs(5);
        assert!(matches!(b.admit(t2).0, Admission::Allowed { trial: Some(_) }));
        // The trial's request is cancelled and never reports: another trial goes after open_for.
        assert!(matches!(b.admit(t2 + Duration::from_secs(1)).0, Admission::Rejected { .. }));
        assert!(matches!(b.admit(t2 + Duration::from_secs(5)).0, Admission::Allowed { trial: Some(_) }));
    }

    #[test]
    fn only_the_trial_decides_a_half_open_breaker() {
        let b = Breaker::new(1, Duration::from_secs(10));
        let t = Instant::now();
        // Admitted while closed, still out (route timeout 30 s) when the breaker opens and then half-opens.
        let Admission::Allowed { trial: slow } = b.admit(t).0 else { panic!("closed admits") };
        assert_eq!(b.record(None, false, t), Some(BreakerState::Open));
        let t1 = t + Duration::from_secs(10);
        let Admission::Allowed { trial: trial @ Some(_) } = b.admit(t1).0 else { panic!("a trial") };
        assert_eq!(b.record(slow, true, t1), None, "a late success does not close the breaker");
        assert_eq!(b.record(slow, false, t1), None, "nor does a late failure reopen it");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.record(trial, true, t1), Some(BreakerState::Closed), "the trial does");
    }
}
