//! `RangeLock`: a byte-range lock per source file. A write holds the range it writes
//! while it writes the source and mirrors it; the copier holds the chunk it copies. Writes
//! to different ranges of one file proceed in parallel. Requests are served in arrival
//! order among those that overlap, so a stream of appends cannot starve the copier.

use parking_lot::{Condvar, Mutex};

/// Exclusive end of a range that reaches to the end of any file.
pub const TO_END: u64 = u64::MAX;

#[derive(Debug)]
struct Entry {
    ticket: u64,
    start: u64,
    end: u64,
    granted: bool,
}

#[derive(Debug, Default)]
struct State {
    next_ticket: u64,
    entries: Vec<Entry>,
}

#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<State>,
    changed: Condvar,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl RangeLock {
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Locks `[start, end)` (an empty range is widened to one byte so that it still
    /// orders against writers at that offset).
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let end = end.max(start.saturating_add(1));
        let mut state = self.state.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.entries.push(Entry {
            ticket,
            start,
            end,
            granted: false,
        });
        loop {
            // Wait for every overlapping request that came earlier, granted or waiting.
            let blocked = state
                .entries
                .iter()
                .any(|e| e.ticket < ticket && overlaps((e.start, e.end), (start, end)));
            if !blocked {
                break;
            }
            self.changed.wait(&mut state);
        }
        let me = state
            .entries
            .iter_mut()
            .find(|e| e.ticket == ticket)
            .expect("own entry");
        me.granted = true;
        RangeGuard { lock: self, ticket }
    }

    /// Number of held or waiting requests.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.state.lock().entries.len()
    }
}

/// Holds a range until dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.lock.state.lock();
        state.entries.retain(|e| e.ticket != self.ticket);
        drop(state);
        self.lock.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn disjoint_ranges_do_not_wait() {
        let lock = RangeLock::new();
        let _a = lock.lock(0, 100);
        let _b = lock.lock(100, 200);
        let _c = lock.lock(500, TO_END);
        assert_eq!(lock.pending(), 3);
    }

    #[test]
    fn overlapping_range_waits_for_release() {
        let lock = Arc::new(RangeLock::new());
        let held = lock.lock(0, 100);
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (lock, entered) = (lock.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = lock.lock(50, 60);
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !entered.load(Ordering::SeqCst),
            "overlapping lock was granted"
        );
        drop(held);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        assert_eq!(lock.pending(), 0);
    }

    #[test]
    fn a_waiting_tail_lock_is_not_starved_by_later_writers() {
        let lock = Arc::new(RangeLock::new());
        let first = lock.lock(1000, 1010);
        let order = Arc::new(AtomicU64::new(0));
        let tail = {
            let (lock, order) = (lock.clone(), order.clone());
            std::thread::spawn(move || {
                let _g = lock.lock(0, TO_END);
                order.fetch_add(1, Ordering::SeqCst)
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let later = {
            let (lock, order) = (lock.clone(), order.clone());
            std::thread::spawn(move || {
                let _g = lock.lock(2000, 2010);
                order.fetch_add(1, Ordering::SeqCst)
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        assert_eq!(
            tail.join().unwrap(),
            0,
            "the earlier tail request must go first"
        );
        assert_eq!(later.join().unwrap(), 1);
    }
}
