//! The copier: threads that copy pending files chunk by chunk under byte-range locks,
//! and the copy phase's end (nothing pending, nothing being copied).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant};

use super::pacing::Writeback;
use super::{AbortReason, CaptureSession, FileCapture, Phase};
use crate::inode::InodeKey;
use crate::rangelock::TO_END;
use crate::sys::{self, Errno, cvt};

impl CaptureSession {
    /// Starts the copier threads. They copy what is queued, wait for late work while the
    /// session lives, and exit when it is stopped or aborted (`join_copiers` waits).
    pub(crate) fn start_copier(self: &Arc<Self>) {
        let workers = self.options.parallel.max(1);
        let mut handles = self.copiers.lock();
        for i in 0..workers {
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("copier-{i}"))
                .spawn(move || {
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.copy_loop()));
                    if outcome.is_err() {
                        me.abort(AbortReason::Panic("a copier thread panicked".into()));
                    }
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    drop(handles);
                    self.abort(AbortReason::Panic(format!(
                        "could not start a copier thread: {e}"
                    )));
                    return;
                }
            }
        }
    }

    /// Waits until every copier thread has exited (after a stop or an abort): no
    /// straggler writes into the image after this.
    pub(crate) fn join_copiers(&self) {
        let handles = std::mem::take(&mut *self.copiers.lock());
        let me = std::thread::current().id();
        for h in handles {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }

    /// Waits until the copy phase is over (nothing pending: `Copied`; or the session
    /// ended), or `timeout` passes. Returns the phase then.
    pub fn wait_copied(&self, timeout: Duration) -> Phase {
        let deadline = Instant::now() + timeout;
        let mut queue = self.queue.lock();
        while self.phase() == Phase::Copying {
            if self.idle.wait_until(&mut queue, deadline).timed_out() {
                break;
            }
        }
        self.phase()
    }

    /// True when nothing is queued or being copied and the session is in its copied
    /// phase. Stable while the caller holds the namespace lock: late work only arrives
    /// through namespace operations.
    pub(crate) fn is_copied(&self) -> bool {
        let queue = self.queue.lock();
        queue.items.is_empty() && queue.busy == 0 && self.phase() == Phase::Copied
    }

    fn copy_loop(&self) {
        self.options.priority.apply_to_current_thread();
        let mut writeback = Writeback::new(self.options.writeback_window);
        let mut buf = vec![0u8; self.options.chunk_size as usize];
        loop {
            let item = {
                let mut queue = self.queue.lock();
                loop {
                    if !self.live() {
                        return;
                    }
                    if let Some(item) = queue.items.pop_front() {
                        queue.busy += 1;
                        break item;
                    }
                    if queue.busy == 0
                        && self
                            .phase
                            .compare_exchange(
                                Phase::Copying as u8,
                                Phase::Copied as u8,
                                SeqCst,
                                SeqCst,
                            )
                            .is_ok()
                    {
                        *self.current.lock() = None;
                        self.idle.notify_all();
                    }
                    self.work_ready.wait(&mut queue);
                }
            };
            let result = self.copy_file(item.key, &mut buf, &mut writeback);
            self.files_copied.fetch_add(1, Relaxed);
            self.queue.lock().busy -= 1;
            if let Err(reason) = result {
                self.abort(reason);
                return;
            }
        }
    }

    /// Opens the source and image files of `key` by its current name.
    fn open_pair(
        &self,
        key: InodeKey,
        fc: &FileCapture,
    ) -> Result<Option<(File, Arc<File>)>, AbortReason> {
        // Under the namespace lock: a source rename and its image rename (and the names
        // recorded here) change together, so the name found is the file's current one.
        let _ns = self.ns.lock();
        // The inode number may have been freed and reused by a new file since this work
        // was queued: copy only under the capture state registered now (and, holding
        // the source open below, it stays so), never under a stale one whose range locks
        // no writer of the new file takes.
        let current = self.files.read().get(&key).cloned();
        if !current.is_some_and(|c| std::ptr::eq(Arc::as_ptr(&c), fc)) {
            return Ok(None);
        }
        let paths = self.paths.read();
        let Some(rel) = paths.get(&key).and_then(|v| v.first()) else {
            return Ok(None); // unlinked before its turn
        };
        let src = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.source(rel))
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AbortReason::source(format!("opening {}", rel.display()), e)),
        };
        let st = sys::fstat_path(src.as_fd()).map_err(|e| AbortReason::source("stat", e))?;
        if super::InodeKey::of(&st) != key {
            return Ok(None);
        }
        *self.current.lock() = Some(rel.clone());
        let mut dest_slot = fc.dest.lock();
        let dest = match &*dest_slot {
            Some(d) => d.clone(),
            None => {
                let d = Arc::new(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(self.image(rel))
                        .map_err(|e| {
                            AbortReason::target(format!("opening image file {}", rel.display()), e)
                        })?,
                );
                *dest_slot = Some(d.clone());
                self.open_image_files.fetch_add(1, Relaxed);
                d
            }
        };
        Ok(Some((src, dest)))
    }

    fn copy_file(
        &self,
        key: InodeKey,
        buf: &mut [u8],
        writeback: &mut Writeback,
    ) -> Result<(), AbortReason> {
        // A file renamed, unlinked or recopied while it waited or was being copied is
        // left to whoever changed it.
        let Some(fc) = self.file(&key) else {
            return Ok(());
        };
        let generation = fc.generation.load(SeqCst);
        self.hooks.fire("copier.before_file", 0);
        let Some((src, dest)) = self.open_pair(key, &fc)? else {
            return Ok(());
        };
        // Another copy of this file started (it lost its names and got one back): that
        // copy owns the image file now.
        let stale = || fc.generation.load(SeqCst) != generation;
        let mut off = 0u64;
        // Whole chunks under their own range lock.
        loop {
            if !self.live() || stale() {
                return Ok(());
            }
            let chunk = self.chunk_len(buf.len() as u64);
            self.throttle(chunk);
            self.hooks.fire("copier.before_chunk", off);
            let guard = fc.lock.lock(off, off + chunk);
            match seek_data(src.as_fd(), off) {
                // No data from here on: the rest is the tail.
                Err(Errno::ENXIO) => break,
                Ok(data) if data >= off + chunk => {
                    // A hole: the image file is sparse there too. Its whole chunks are
                    // taken at once, not one by one (a 1 TiB sparse file is a million
                    // chunks), under a lock on all of them and checked again under it.
                    drop(guard);
                    let end = off + (data - off) / chunk * chunk;
                    let hole = fc.lock.lock(off, end);
                    if seek_data(src.as_fd(), off).is_ok_and(|d| d >= end) {
                        fc.copied.lock().insert(off, end);
                        off = end;
                    }
                    // (Otherwise a write landed meanwhile: this chunk again, as data.)
                    drop(hole);
                    continue;
                }
                _ => {}
            }
            // A chunk that reaches past the end of the file is left to the tail.
            if !self.take_chunk(&src, &dest, off, chunk, buf)? {
                break;
            }
            fc.copied.lock().insert(off, off + chunk);
            drop(guard);
            // (A cloned range has no dirty pages: its writeback returns at once.)
            writeback
                .written(&dest, off, chunk)
                .map_err(|e| AbortReason::target("writing the image back", e))?;
            off += chunk;
        }
        // The tail, locked to the end of any file: appends wait, then get mirrored. Only
        // data is taken: a hole at the end stays a hole (the image file is sized below).
        let _tail = fc.lock.lock(off, TO_END);
        if stale() {
            return Ok(());
        }
        self.hooks.fire("copier.tail", off);
        let tail_start = off;
        self.take_tail(&src, &dest, off, buf)?;
        let size = sys::fstat_path(src.as_fd())
            .map_err(|e| AbortReason::source("reading the source", e))?
            .st_size as u64;
        dest.set_len(size)
            .map_err(|e| AbortReason::target("sizing the image file", e))?;
        // Everything from where the tail began is in the image now (and, being locked to
        // the end, stays so): later writes anywhere there, not just appends, are mirrored.
        fc.copied.lock().set_tail(tail_start.min(size));
        self.hooks.fire("copier.done", size);
        if self.open_image_files.load(Relaxed) > self.options.max_open_image_files
            && fc.dest.lock().take().is_some()
        {
            self.open_image_files.fetch_sub(1, Relaxed);
        }
        Ok(())
    }

    fn throttle(&self, next: u64) {
        // A clone moves no data (the filesystem shares the extents): pacing it by bytes
        // would take away its point, so `auto` paces byte copies only.
        if let Some(auto) = &self.auto_throttle
            && self.clone_block.load(Relaxed) == 0
        {
            self.pause(auto.pause(next, self.options.parallel));
        }
        let Some(rate) = self.options.throttle_bytes_per_sec.filter(|r| *r > 0) else {
            return;
        };
        let done = self.bytes_copied.load(Relaxed) + next;
        let due = Duration::from_secs_f64(done as f64 / rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            self.pause(due - elapsed);
        }
    }

    /// Sleeps in short steps so that a stop or an abort is not held up.
    fn pause(&self, time: Duration) {
        let end = Instant::now() + time;
        while self.live() && Instant::now() < end {
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
        }
    }
}

pub(super) fn seek_data(fd: BorrowedFd<'_>, off: u64) -> Result<u64, Errno> {
    // SAFETY: lseek on a valid fd; only this thread uses the copier's source fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    cvt(r).map(|v| v as u64)
}
