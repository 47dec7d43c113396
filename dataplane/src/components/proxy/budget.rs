//! A retry budget per upstream, so that retries cannot multiply the load on an upstream that is already
//! failing: retries may add at most `ratio` of the requests of the current window, plus a small floor that
//! lets a quiet upstream retry at all.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Retries may add this share of the window's requests.
pub const RATIO: f64 = 0.2;
/// Retries always allowed per window.
pub const FLOOR: u64 = 10;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RetryBudget {
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    requests: u64,
    retries: u64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self { window: Mutex::new(Window { started: Instant::now(), requests: 0, retries: 0 }) }
    }
}

impl RetryBudget {
    fn current(&self, now: Instant) -> Option<std::sync::MutexGuard<'_, Window>> {
        let mut window = self.window.lock().ok()?;
        if now.duration_since(window.started) >= WINDOW {
            *window = Window { started: now, requests: 0, retries: 0 };
        }
        Some(window)
    }

    /// Counts a first attempt.
    pub fn record_request(&self, now: Instant) {
        if let Some(mut window) = self.current(now) {
            window.requests += 1;
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self, now: Instant) -> bool {
        let Some(mut window) = self.current(now) else { return false };
        let allowed = FLOOR + (window.requests as f64 * RATIO) as u64;
        if window.retries < allowed {
            window.retries += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_the_floor_plus_a_share_of_requests() {
        let budget = RetryBudget::default();
        let t = Instant::now();
        for _ in 0..100 {
            budget.record_request(t);
        }
        let granted = (0..1000).filter(|_| budget.try_retry(t)).count() as u64;
        assert_eq!(granted, FLOOR + 20);
        // A new window starts afresh.
        assert!(budget.try_retry(t + WINDOW));
    }
}
