//! `RangeLock`: a byte-range lock per source file. A write holds the range it writes
//! while it writes the source and mirrors it; the copier holds the chunk it copies. Writes
//! to different ranges of one file proceed in parallel. Requests are served in arrival
//! order among those that overlap, so a stream of appends cannot starve the copier.

use crate::sync::{Condvar, Mutex};

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
    #[cfg(all(test, not(feature = "shuttle")))]
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

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;

    #[test]
    fn disjoint_ranges_do_not_wait() {
        let lock = RangeLock::new();
        let _a = lock.lock(0, 100);
        let _b = lock.lock(100, 200);
        let _c = lock.lock(500, TO_END);
        assert_eq!(lock.pending(), 3);
    }
}

/// The range lock under shuttle's randomized schedules: overlapping ranges are never held
/// at once, and overlapping requests are granted in arrival order.
#[cfg(all(test, feature = "shuttle"))]
mod shuttle_tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_are_never_held_together_and_go_in_order() {
        shuttle::check_random(
            || {
                let lock = Arc::new(RangeLock::new());
                // Who holds what, and the order overlapping holders of byte 50 got it.
                let held = Arc::new(shuttle::sync::Mutex::new(Vec::<(u64, u64)>::new()));
                let ranges = [(0, 100), (50, 60), (90, TO_END), (200, 300)];
                let threads: Vec<_> = ranges
                    .into_iter()
                    .map(|(start, end)| {
                        let (lock, held) = (lock.clone(), held.clone());
                        shuttle::thread::spawn(move || {
                            let _g = lock.lock(start, end);
                            {
                                let mut h = held.lock().unwrap();
                                for &(s, e) in h.iter() {
                                    assert!(
                                        !overlaps((s, e), (start, end)),
                                        "[{start},{end}) granted while [{s},{e}) is held"
                                    );
                                }
                                h.push((start, end));
                            }
                            shuttle::thread::yield_now();
                            held.lock().unwrap().retain(|&r| r != (start, end));
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().unwrap();
                }
            },
            2000,
        );
    }

    #[test]
    fn an_earlier_overlapping_request_is_served_first() {
        shuttle::check_random(
            || {
                let lock = Arc::new(RangeLock::new());
                let first = lock.lock(10, 20);
                // The whole-file request arrives before the later one: it must be granted
                // first although the later one does not overlap what is held.
                let order = Arc::new(shuttle::sync::Mutex::new(Vec::new()));
                let tail = {
                    let (lock, order) = (lock.clone(), order.clone());
                    shuttle::thread::spawn(move || {
                        let _g = lock.lock(0, TO_END);
                        order.lock().unwrap().push("tail");
                    })
                };
                // Wait until the tail request is queued.
                while lock.state.lock().entries.len() < 2 {
                    shuttle::thread::yield_now();
                }
                let later = {
                    let (lock, order) = (lock.clone(), order.clone());
                    shuttle::thread::spawn(move || {
                        let _g = lock.lock(500, 510);
                        order.lock().unwrap().push("later");
                    })
                };
                shuttle::thread::yield_now();
                drop(first);
                tail.join().unwrap();
                later.join().unwrap();
                assert_eq!(*order.lock().unwrap(), ["tail", "later"]);
            },
            2000,
        );
    }
}
