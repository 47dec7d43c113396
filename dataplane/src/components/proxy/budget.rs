//! A retry budget per upstream, so that retries cannot multiply the load on an upstream that is already
//! failing: retries may add at most `ratio` of the requests of the current window, plus a small floor that
//! lets a quiet upstream retry at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Retries may add this share of the window's requests.
pub const RATIO: f64 = 0.2;
/// Retries always allowed per window.
pub const FLOOR: u64 = 10;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Counters in atomics: every request of an upstream counts itself here, from any thread, without a lock.
/// Windows are consecutive `WINDOW`s from the budget's creation; the first thread to see a new one resets
/// the counts (a count racing with the reset may land in either window).
#[derive(Debug)]
pub struct RetryBudget {
    origin: Instant,
    window: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            window: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }
}

impl RetryBudget {
    fn roll(&self, now: Instant) {
        let window = (now.saturating_duration_since(self.origin).as_millis() / WINDOW.as_millis()) as u64;
        let current = self.window.load(Ordering::Acquire);
        if window > current
            && self.window.compare_exchange(current, window, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            self.requests.store(0, Ordering::Relaxed);
            self.retries.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a first attempt.
    pub fn record_request(&self, now: Instant) {
        self.roll(now);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self, now: Instant) -> bool {
        self.roll(now);
        let allowed = FLOOR + (self.requests.load(Ordering::Relaxed) as f64 * RATIO) as u64;
        self.retries.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| (r < allowed).then_some(r + 1)).is_ok()
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
