//! `--throttle auto`: the copier's rate follows the application's own latency on the
//! mount. The operator chooses a latency budget (or takes twice what the application saw
//! before the backup); every window the copier speeds up additively while the
//! application's mean sync latency (or write latency, when it does not sync) stays within
//! the budget, and halves its rate when it does not.
//!
//! A budget the agent chose itself follows the application when backing off does not
//! help: if the application stays over it while the copier is nearly stopped, the
//! copier is not the cause (a busier hour than the baseline was measured in), and a
//! budget below what the application sees without us would only stall the backup. An
//! operator's own `--latency-budget` is kept as given.

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
/// At or below this rate the copier is "nearly stopped"...
const NEARLY_STOPPED: f64 = 4e6;
/// ...and this many windows over budget there make a chosen budget follow the
/// application, to this multiple of what it sees.
const NOT_OUR_FAULT: u32 = 5;
const FOLLOW: f64 = 1.5;

pub(crate) struct AutoThrottle {
    latency: Arc<AppLatency>,
    /// Whether the budget is the operator's (kept) or the agent's (may follow).
    given: bool,
    state: Mutex<State>,
}

struct State {
    rate: f64,
    budget: Duration,
    since: Instant,
    at: LatencyTotals,
    /// Consecutive windows over budget with the copier nearly stopped.
    stuck: u32,
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
    /// mount outside backups (at least `MIN_BUDGET`).
    pub(crate) fn new(latency: Arc<AppLatency>, budget: Option<Duration>) -> AutoThrottle {
        let at = latency.totals();
        let given = budget.is_some();
        let budget = budget.unwrap_or_else(|| {
            latency
                .baseline()
                .mean_since(&LatencyTotals::default())
                .map_or(FALLBACK_BUDGET, |m| (m * 2).max(MIN_BUDGET))
        });
        tracing::info!(
            budget_us = budget.as_micros() as u64,
            "copier paced by application latency"
        );
        AutoThrottle {
            latency,
            given,
            state: Mutex::new(State {
                rate: START_RATE,
                budget,
                since: Instant::now(),
                at,
                stuck: 0,
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn budget(&self) -> Duration {
        self.state.lock().budget
    }

    /// The current rate and budget, for progress displays.
    pub(crate) fn pace(&self) -> super::Pace {
        let st = self.state.lock();
        super::Pace {
            bytes_per_sec: st.rate as u64,
            budget_us: st.budget.as_micros() as u64,
        }
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
            Some(m) if m > st.budget => {
                st.stuck = if st.rate <= NEARLY_STOPPED {
                    st.stuck + 1
                } else {
                    0
                };
                if st.stuck >= NOT_OUR_FAULT && !self.given {
                    st.budget = m.mul_f64(FOLLOW);
                    st.stuck = 0;
                    tracing::info!(
                        budget_us = st.budget.as_micros() as u64,
                        "the application stays slow with the copier nearly stopped; the latency budget follows it"
                    );
                    return Step::Unchanged;
                }
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
                st.stuck = 0;
                st.rate = (st.rate + STEP).min(MAX_RATE);
                Step::Faster
            }
            _ => {
                st.stuck = 0;
                Step::Unchanged
            }
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
    fn a_chosen_budget_follows_an_application_that_stays_slow_without_us() {
        let lat = Arc::new(AppLatency::default());
        lat.record(Op::fsync, Duration::from_millis(2));
        let chosen = AutoThrottle::new(lat.clone(), None);
        let given = throttle(4);
        for t in [&chosen, &given] {
            let mut st = t.state.lock();
            // Ten windows at 20 ms: the rate falls to the floor, then it is stuck there.
            for _ in 0..10 {
                t.adjust(&mut st, Some(Duration::from_millis(20)));
            }
        }
        assert_eq!(chosen.budget(), Duration::from_millis(30));
        assert_eq!(
            given.budget(),
            Duration::from_millis(4),
            "the operator's budget is kept"
        );
        // Within the new budget the chosen one speeds up again.
        let mut st = chosen.state.lock();
        assert_eq!(
            chosen.adjust(&mut st, Some(Duration::from_millis(20))),
            Step::Faster
        );
    }

    #[test]
    fn the_baseline_leaves_out_what_the_application_saw_during_backups() {
        let lat = Arc::new(AppLatency::default());
        lat.record(Op::fsync, Duration::from_millis(1));
        let start = lat.totals();
        lat.record(Op::fsync, Duration::from_millis(50));
        lat.session_ended(&start);
        assert_eq!(
            AutoThrottle::new(lat, None).budget(),
            Duration::from_millis(2)
        );
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
