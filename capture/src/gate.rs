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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;

pub struct CaptureGate<S> {
    current: ArcSwapOption<S>,
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
            current: ArcSwapOption::const_empty(),
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
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        previous
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn switch_waits_for_operations_that_saw_the_old_state() {
        let gate = Arc::new(CaptureGate::<u32>::new());
        let pass = gate.enter();
        assert!(pass.session.is_none());
        let switched = Arc::new(AtomicBool::new(false));
        let t = {
            let (gate, switched) = (gate.clone(), switched.clone());
            std::thread::spawn(move || {
                gate.switch(Some(Arc::new(7)));
                switched.store(true, SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !switched.load(SeqCst),
            "switch returned while an old operation ran"
        );
        // New operations are not blocked and already see the new session.
        assert_eq!(gate.enter().session.as_deref(), Some(&7));
        drop(pass);
        t.join().unwrap();
        assert!(switched.load(SeqCst));
    }

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
