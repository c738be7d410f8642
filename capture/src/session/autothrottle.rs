//! `--throttle auto`: the copier's rate follows the application's own latency on the
//! mount. The operator chooses a latency budget (or takes twice what the application saw
//! before the backup); every window the copier speeds up additively while the
//! application's mean sync latency (or write latency, when it does not sync) stays within
//! the budget, and halves its rate when it does not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::stats::{AppLatency, LatencyTotals};

/// How often the rate is reconsidered.
const WINDOW: Duration = Duration::from_millis(200);
/// The rate the copier starts at, and the bounds it moves in (bytes per second).
const START_RATE: f64 = 64e6;
const MIN_RATE: f64 = 1e6;
const MAX_RATE: f64 = 4e9;
/// Added per calm window.
const STEP: f64 = 8e6;
/// The budget when the operator gives none and nothing was measured before: a commit's
/// fsync on a local SSD takes well under this.
const FALLBACK_BUDGET: Duration = Duration::from_millis(5);
/// The budget is never tighter than this (scheduling noise on a busy host).
const MIN_BUDGET: Duration = Duration::from_millis(1);

pub(crate) struct AutoThrottle {
    latency: Arc<AppLatency>,
    budget: Duration,
    state: Mutex<State>,
}

struct State {
    rate: f64,
    since: Instant,
    at: LatencyTotals,
}

/// What one window's measurement did to the rate (for logs and tests).
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    Faster,
    Slower,
    Unchanged,
}

impl AutoThrottle {
    /// Watches `latency`; with no `budget`, twice the mean the application saw on this
    /// mount so far (at least `MIN_BUDGET`).
    pub(crate) fn new(latency: Arc<AppLatency>, budget: Option<Duration>) -> AutoThrottle {
        let at = latency.totals();
        let budget = budget.unwrap_or_else(|| {
            at.mean_since(&LatencyTotals::default())
                .map_or(FALLBACK_BUDGET, |m| (m * 2).max(MIN_BUDGET))
        });
        tracing::info!(
            budget_us = budget.as_micros() as u64,
            "copier paced by application latency"
        );
        AutoThrottle {
            latency,
            budget,
            state: Mutex::new(State {
                rate: START_RATE,
                since: Instant::now(),
                at,
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn budget(&self) -> Duration {
        self.budget
    }

    /// The current rate in bytes per second, first reconsidered if a window has passed.
    pub(crate) fn rate(&self) -> f64 {
        let mut st = self.state.lock();
        if st.since.elapsed() >= WINDOW {
            let now = self.latency.totals();
            let mean = now.mean_since(&st.at);
            self.adjust(&mut st, mean);
            st.at = now;
            st.since = Instant::now();
        }
        st.rate
    }

    fn adjust(&self, st: &mut State, mean: Option<Duration>) -> Step {
        match mean {
            Some(m) if m > self.budget => {
                st.rate = (st.rate / 2.0).max(MIN_RATE);
                tracing::debug!(
                    mean_us = m.as_micros() as u64,
                    rate = st.rate,
                    "copier slows down"
                );
                Step::Slower
            }
            // Within budget, or the application did not write at all: speed up.
            _ if st.rate < MAX_RATE => {
                st.rate = (st.rate + STEP).min(MAX_RATE);
                Step::Faster
            }
            _ => Step::Unchanged,
        }
    }

    /// How long a copier thread (one of `threads`) waits after moving `bytes`.
    pub(crate) fn pause(&self, bytes: u64, threads: usize) -> Duration {
        let per_thread = self.rate() / threads.max(1) as f64;
        Duration::from_secs_f64(bytes as f64 / per_thread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Op;

    fn throttle(budget_ms: u64) -> AutoThrottle {
        AutoThrottle::new(
            Arc::new(AppLatency::default()),
            Some(Duration::from_millis(budget_ms)),
        )
    }

    #[test]
    fn slow_syncs_halve_the_rate_and_calm_windows_raise_it() {
        let t = throttle(4);
        let mut st = t.state.lock();
        let r0 = st.rate;
        assert_eq!(
            t.adjust(&mut st, Some(Duration::from_millis(9))),
            Step::Slower
        );
        assert_eq!(st.rate, r0 / 2.0);
        assert_eq!(
            t.adjust(&mut st, Some(Duration::from_millis(3))),
            Step::Faster
        );
        assert_eq!(st.rate, r0 / 2.0 + STEP);
        assert_eq!(t.adjust(&mut st, None), Step::Faster);
        for _ in 0..100 {
            t.adjust(&mut st, Some(Duration::from_secs(1)));
        }
        assert_eq!(st.rate, MIN_RATE, "the copier never stops altogether");
    }

    #[test]
    fn the_budget_defaults_to_twice_what_the_application_saw() {
        let lat = Arc::new(AppLatency::default());
        for _ in 0..10 {
            lat.record(Op::fsync, Duration::from_millis(3));
            lat.record(Op::write, Duration::from_micros(20));
        }
        assert_eq!(
            AutoThrottle::new(lat, None).budget(),
            Duration::from_millis(6)
        );
        let idle = AutoThrottle::new(Arc::new(AppLatency::default()), None);
        assert_eq!(idle.budget(), FALLBACK_BUDGET);
    }

    #[test]
    fn a_window_of_slow_syncs_seen_through_the_counters_slows_the_copier() {
        let lat = Arc::new(AppLatency::default());
        let t = AutoThrottle::new(lat.clone(), Some(Duration::from_millis(2)));
        let r0 = t.rate();
        lat.record(Op::fsync, Duration::from_millis(30));
        t.state.lock().since -= WINDOW;
        assert_eq!(t.rate(), r0 / 2.0);
        assert!(t.pause(1 << 20, 2) > Duration::from_millis(60));
    }
}
