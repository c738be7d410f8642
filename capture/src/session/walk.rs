//! The session-start walk: the source tree enters the image a batch of entries at a
//! time, each batch under the namespace lock, so that namespace operations (DDL) wait
//! for one batch, never for the whole tree.
//!
//! # Why a tree half walked stays exact
//! `unwalked` holds the entries the walk has listed (or will list: the root at first)
//! but not brought into the image yet. An entry is *unwalked* when it or one of its
//! ancestors is in that set; its image entry does not exist yet, and the walk, when it
//! comes to it, takes the source entry as it is then. Every namespace operation on
//! unwalked entries is therefore left alone, as for excluded entries, and one that
//! crosses between walked and unwalked places is followed as a move across the
//! exclusion boundary: the walked side leaves the image or enters it. Entries in the
//! set follow renames of walked directories and go with removed ones. The walk and the
//! operations hold the namespace lock, so each sees the other whole. A file the walk
//! registers gets the registration barrier before it is queued, as any file that enters
//! the image in the middle of a session.

use std::path::{Path, PathBuf};

use super::{AbortReason, CaptureSession, Pending};

/// Source entries (lstat, image entry, registration) one hold of the namespace lock
/// brings into the image: about a millisecond's work on a warm cache.
const WALK_BATCH: usize = 128;

/// Listed names that cost as much as one entry brought in.
const NAMES_PER_ENTRY: usize = 32;

impl CaptureSession {
    /// Sets the walk up (under the namespace lock, as the session becomes visible):
    /// everything is unwalked, and the walk counts as copy work in progress, so that the
    /// copy phase cannot end before it does.
    pub(crate) fn begin_walk(&self) {
        self.unwalked.lock().insert(PathBuf::new());
        self.queue.lock().busy += 1;
    }

    /// Brings the whole source tree into the image, batch by batch, while copiers copy
    /// what is registered. Returns when every entry is in (or the session ended).
    pub(crate) fn walk(&self) -> Result<(), AbortReason> {
        let walked = self.walk_batches();
        // Hot logs were held back so that they are copied last.
        let mut queue = self.queue.lock();
        queue.busy -= 1;
        self.work_ready.notify_all();
        drop(queue);
        walked
    }

    fn walk_batches(&self) -> Result<(), AbortReason> {
        let mut hot = Vec::new();
        let mut batch = 0;
        loop {
            let mut pending = Vec::new();
            let done = {
                let _ns = self.ns.lock();
                if !self.live() {
                    return Ok(());
                }
                self.walk_batch(&mut pending)?;
                self.unwalked.lock().is_empty()
            };
            self.registration_barrier();
            let (hot_now, cold): (Vec<Pending>, Vec<Pending>) =
                pending.into_iter().partition(|p| p.hot);
            hot.extend(hot_now);
            self.enqueue(cold);
            self.hooks.fire("walk.batch", batch);
            batch += 1;
            if done {
                self.enqueue(hot);
                return Ok(());
            }
        }
    }

    /// One batch, under the namespace lock.
    fn walk_batch(&self, pending: &mut Vec<Pending>) -> Result<(), AbortReason> {
        let mut budget = WALK_BATCH * NAMES_PER_ENTRY;
        while budget > 0 {
            let Some(rel) = self.unwalked.lock().pop_first() else {
                break;
            };
            budget = budget.saturating_sub(NAMES_PER_ENTRY);
            // An entry below another one still to walk is taken with it (never the case
            // while renames keep the set as it is built; a cheap guard). One a rename
            // moved into an excluded place stays out. (`rel` left the set above, so
            // `outside` asks about its ancestors only.)
            if self.outside(&rel) {
                continue;
            }
            let is_dir = rel.as_os_str().is_empty() || self.adopt_child(&rel, pending)?;
            if is_dir {
                let children = self.list_source_dir(&rel)?;
                budget = budget.saturating_sub(children.len());
                self.unwalked.lock().extend(children);
            }
        }
        Ok(())
    }

    /// True when `rel` is unwalked (the walk will bring it in as it is then).
    pub(super) fn unwalked(&self, rel: &Path) -> bool {
        let set = self.unwalked.lock();
        !set.is_empty() && rel.ancestors().any(|a| set.contains(a))
    }

    /// Left out of the image for now or for good: excluded, or not walked yet.
    pub(super) fn outside(&self, rel: &Path) -> bool {
        self.excluded(rel) || self.unwalked(rel)
    }

    /// While the walk runs, an entry that enters the image in the middle of the session
    /// is left to it: true if `rel` was handed to the walk.
    pub(super) fn walk_defer(&self, rel: &Path) -> bool {
        let mut set = self.unwalked.lock();
        if set.is_empty() {
            return false;
        }
        set.insert(rel.to_path_buf());
        true
    }

    /// The walked entry `rel` is gone from the image (removed, or replaced): what the
    /// walk still had to do below it is void.
    pub(super) fn walk_forget(&self, rel: &Path) {
        let mut set = self.unwalked.lock();
        if !set.is_empty() {
            drop(take_below(&mut set, rel));
        }
    }

    /// The walked entry `from` is now at `to` (both ways for an exchange): so is what
    /// the walk still has to do below it.
    pub(super) fn walk_renamed(&self, from: &Path, to: &Path, exchange: bool) {
        let mut set = self.unwalked.lock();
        if set.is_empty() {
            return;
        }
        let moved = take_below(&mut set, from);
        let back = take_below(&mut set, to);
        let rebase = |p: PathBuf, a: &Path, b: &Path| super::skeleton::rebase(&p, a, b);
        set.extend(moved.into_iter().filter_map(|p| rebase(p, from, to)));
        if exchange {
            set.extend(back.into_iter().filter_map(|p| rebase(p, to, from)));
        }
    }
}

/// Removes and returns the entries of `set` at or below `rel`, which sort together.
fn take_below(set: &mut std::collections::BTreeSet<PathBuf>, rel: &Path) -> Vec<PathBuf> {
    let below: Vec<PathBuf> = set
        .range(rel.to_path_buf()..)
        .take_while(|p| p.starts_with(rel))
        .cloned()
        .collect();
    for p in &below {
        set.remove(p);
    }
    below
}
