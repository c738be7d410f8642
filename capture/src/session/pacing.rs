//! Keeping the copier's own I/O out of the application's way: copier threads run at
//! background CPU priority, and the image's writeback is paced chunk by chunk so
//! that copied data never piles up in the page cache and leaves in one burst that the
//! database's fsyncs queue behind (on ext4 a commit's fsync can even wait for it).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// How the copier's threads are scheduled against the application.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopierPriority {
    /// Nice 10: the application's threads get the CPU first. Its I/O keeps the normal
    /// class: on ext4 (data=ordered) a commit's fsync may have to wait for the image
    /// blocks in the same journal transaction, and idle-class writeback would make the
    /// commit wait at idle priority.
    #[default]
    Background,
    /// Nice 10 and the idle I/O class.
    Idle,
    /// The agent's own priority (what the application gets).
    Normal,
}

impl CopierPriority {
    /// Applies the priority to the calling thread (only to it: the filesystem threads
    /// that serve the application, and mirror its writes, keep theirs).
    pub fn apply_to_current_thread(self) {
        match self {
            CopierPriority::Background => background_thread(),
            CopierPriority::Idle => {
                background_thread();
                idle_io_thread();
            }
            CopierPriority::Normal => {}
        }
    }
}

/// Lowers the calling thread's CPU priority (nice 10). Best effort: a thread that cannot
/// be lowered (a restricted container) runs at normal priority, which is only slower
/// for the application, never wrong.
pub fn background_thread() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id; a failure is only reported.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) } != 0 {
        tracing::debug!(
            "could not lower a copier thread's CPU priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// Puts the calling thread's I/O in the idle class (best effort, as above).
fn idle_io_thread() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: gettid has no preconditions; ioprio_set on our own thread id, a failure
    // is only reported.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            libc::gettid() as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if r != 0 {
        tracing::debug!(
            "could not lower a copier thread's I/O priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// One copier thread's writeback window: each chunk's writeback starts as soon as it is
/// written, and once more than `window` bytes are in flight the oldest are waited for.
/// The copier thus moves data at the disk's pace instead of the page cache's, and the
/// final fsync of each image file finds almost nothing left to write.
pub(crate) struct Writeback {
    window: u64,
    in_flight: VecDeque<(Arc<File>, u64, u64)>,
    bytes: u64,
}

impl Writeback {
    /// A window of `window` bytes; 0 turns pacing off.
    pub(crate) fn new(window: u64) -> Writeback {
        Writeback {
            window,
            in_flight: VecDeque::new(),
            bytes: 0,
        }
    }

    /// `len` bytes at `off` of `file` were just written (call it with no range lock held:
    /// waiting for the disk must not hold up the application's writes).
    pub(crate) fn written(&mut self, file: &Arc<File>, off: u64, len: u64) -> io::Result<()> {
        if self.window == 0 || len == 0 {
            return Ok(());
        }
        sync_file_range(file, off, len, libc::SYNC_FILE_RANGE_WRITE)?;
        self.in_flight.push_back((file.clone(), off, len));
        self.bytes += len;
        while self.bytes > self.window {
            let Some((f, o, l)) = self.in_flight.pop_front() else {
                break;
            };
            self.bytes -= l;
            sync_file_range(
                &f,
                o,
                l,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )?;
        }
        Ok(())
    }
}

fn sync_file_range(file: &File, off: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: a plain syscall on an open fd; no memory is passed.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn the_window_bounds_what_is_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(File::create(dir.path().join("img")).unwrap());
        let mut wb = Writeback::new(3 << 20);
        for i in 0..8u64 {
            f.write_all_at(&[7u8; 1 << 20], i << 20).unwrap();
            wb.written(&f, i << 20, 1 << 20).unwrap();
            assert!(wb.bytes <= 3 << 20, "{} bytes in flight", wb.bytes);
        }
        assert_eq!(wb.in_flight.len(), 3);
        // Off: nothing is tracked or waited for.
        let mut off = Writeback::new(0);
        off.written(&f, 0, 1 << 20).unwrap();
        assert!(off.in_flight.is_empty());
    }

    #[test]
    fn background_priority_lowers_only_the_calling_thread() {
        let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let lowered = std::thread::spawn(|| {
            CopierPriority::Background.apply_to_current_thread();
            let tid = unsafe { libc::gettid() };
            unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
        })
        .join()
        .unwrap();
        assert_eq!(lowered, 10);
        let tid = unsafe { libc::gettid() };
        assert_eq!(
            unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) },
            before
        );
    }
}
