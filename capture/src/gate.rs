//! `CaptureGate`: how every filesystem operation learns whether a capture session is
//! running, and the barrier that makes session start and stop exact.
//!
//! An operation enters the gate (one atomic increment on the current epoch's counter),
//! loads the session pointer, does its work with or without the session, and leaves.
//! Nothing blocks on the way: with no session this is the whole cost. Installing or
//! removing a session swaps the pointer, flips the epoch and waits until the old epoch's
//! counter drains, so when `switch` returns, every operation that saw the previous state
//! has finished: at start, no write that began before the session can race the copier;
//! at stop, every write that was mirrored has landed. Two counters (as in RCU) mean a
//! steady stream of new operations cannot keep the barrier waiting.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

use crate::sync::{AtomicU64, AtomicUsize, Mutex, SwapOption};

pub struct CaptureGate<S> {
    current: SwapOption<S>,
    epoch: AtomicUsize,
    inflight: [AtomicU64; 2],
    switching: Mutex<()>,
}

/// Proof of having entered the gate; leaving happens on drop.
pub struct Pass<'a, S> {
    gate: &'a CaptureGate<S>,
    epoch: usize,
    pub session: Option<Arc<S>>,
}

impl<S> Drop for Pass<'_, S> {
    fn drop(&mut self) {
        self.gate.inflight[self.epoch].fetch_sub(1, SeqCst);
    }
}

impl<S> Default for CaptureGate<S> {
    fn default() -> Self {
        CaptureGate {
            current: SwapOption::const_empty(),
            epoch: AtomicUsize::new(0),
            inflight: [AtomicU64::new(0), AtomicU64::new(0)],
            switching: Mutex::new(()),
        }
    }
}

impl<S> CaptureGate<S> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Enters the gate for one operation; the pass says which session (if any) it runs in.
    pub fn enter(&self) -> Pass<'_, S> {
        loop {
            let seen = self.epoch.load(SeqCst);
            let slot = seen & 1;
            self.inflight[slot].fetch_add(1, SeqCst);
            // Counted only if no flip came between reading the epoch and counting: else a
            // switch could drain the other counter and miss us.
            if self.epoch.load(SeqCst) == seen {
                return Pass {
                    gate: self,
                    epoch: slot,
                    session: self.current.load_full(),
                };
            }
            self.inflight[slot].fetch_sub(1, SeqCst);
        }
    }

    /// The session operations currently see, without entering.
    pub fn peek(&self) -> Option<Arc<S>> {
        self.current.load_full()
    }

    /// Installs `next` (or removes the session) and returns once every operation that
    /// could have seen the previous state has left. Returns the previous session.
    pub fn switch(&self, next: Option<Arc<S>>) -> Option<Arc<S>> {
        let _one_at_a_time = self.switching.lock();
        let previous = self.current.swap(next);
        let old = self.epoch.fetch_add(1, SeqCst) & 1;
        let mut spins = 0u32;
        while self.inflight[old].load(SeqCst) != 0 {
            spins += 1;
            if spins < 100 {
                crate::sync::yield_now();
            } else {
                crate::sync::pause();
            }
        }
        previous
    }
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn a_stream_of_new_operations_does_not_stall_the_switch() {
        let gate = Arc::new(CaptureGate::<u32>::new());
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (gate, stop) = (gate.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(SeqCst) {
                        let _p = gate.enter();
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        for i in 0..200 {
            gate.switch(Some(Arc::new(i)));
            gate.switch(None);
        }
        stop.store(true, SeqCst);
        for w in workers {
            w.join().unwrap();
        }
    }
}

/// The gate's barrier under shuttle's randomized schedules: every interleaving of an
/// operation's entry with a switch must leave no operation that saw the old state still
/// running when the switch returns. Run by `scripts/test` with `--features shuttle`.
#[cfg(all(test, feature = "shuttle"))]
mod shuttle_tests {
    use super::*;
    use shuttle::sync::atomic::AtomicUsize as Count;
    use std::sync::atomic::Ordering::SeqCst;

    #[test]
    fn switch_returns_only_when_operations_that_saw_an_older_state_are_done() {
        shuttle::check_random(
            || {
                let gate = Arc::new(CaptureGate::<usize>::new());
                // Per state (0 = no session, k = the k-th session): operations that saw
                // it and have not finished.
                let inside: Arc<[Count; 4]> = Arc::new(Default::default());
                let ops: Vec<_> = (0..2)
                    .map(|_| {
                        let (gate, inside) = (gate.clone(), inside.clone());
                        shuttle::thread::spawn(move || {
                            for _ in 0..3 {
                                let pass = gate.enter();
                                let seen = pass.session.as_deref().copied().unwrap_or(0);
                                inside[seen].fetch_add(1, SeqCst);
                                shuttle::thread::yield_now();
                                inside[seen].fetch_sub(1, SeqCst);
                                drop(pass);
                            }
                        })
                    })
                    .collect();
                // Two counters serve every switch: the third reuses the first one's.
                for k in 1..=3 {
                    gate.switch(Some(Arc::new(k)));
                    for older in 0..k {
                        assert_eq!(
                            inside[older].load(SeqCst),
                            0,
                            "switch {k} returned while an operation that saw state {older} ran"
                        );
                    }
                }
                for op in ops {
                    op.join().unwrap();
                }
            },
            3000,
        );
    }
}
