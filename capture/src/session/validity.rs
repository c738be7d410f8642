//! The validity point: the instant the image represents, and the metadata (mode, owner,
//! times) every image entry gets from its source entry at that instant.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};
use std::time::SystemTime;

use super::skeleton::sys_lstat;
use super::{AbortReason, CaptureError, CaptureSession, Phase, Progress};

/// Metadata of one image entry as the source had it at the validity point.
#[derive(Clone, Debug)]
pub struct EntryMeta {
    pub rel: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

impl EntryMeta {
    fn of(rel: PathBuf, st: &libc::stat) -> EntryMeta {
        EntryMeta {
            rel,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            atime: (st.st_atime, st.st_atime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
        }
    }
}

/// The instant the image represents.
#[derive(Clone, Debug)]
pub struct ValidityPoint {
    pub at: SystemTime,
    pub progress: Progress,
    pub entries: Vec<EntryMeta>,
}

impl ValidityPoint {
    /// Gives every image entry the mode, owner and times its source had at the validity
    /// point. Files and links first, then directories deepest first, so that nothing done
    /// later changes a directory's recorded times.
    pub fn apply_metadata(&self, image: &Path) -> io::Result<()> {
        let mut metas: Vec<&EntryMeta> = self.entries.iter().collect();
        metas.sort_by_key(|m| {
            let is_dir = m.mode & libc::S_IFMT == libc::S_IFDIR;
            (is_dir, std::cmp::Reverse(m.rel.components().count()))
        });
        for meta in metas {
            apply_meta(&image.join(&meta.rel), meta)?;
        }
        Ok(())
    }
}

fn apply_meta(path: &Path, meta: &EntryMeta) -> io::Result<()> {
    let is_link = meta.mode & libc::S_IFMT == libc::S_IFLNK;
    std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
    if !is_link {
        std::fs::set_permissions(
            path,
            std::os::unix::fs::PermissionsExt::from_mode(meta.mode & 0o7777),
        )?;
    }
    let times = [
        libc::timespec {
            tv_sec: meta.atime.0 as libc::time_t,
            tv_nsec: meta.atime.1 as libc::c_long,
        },
        libc::timespec {
            tv_sec: meta.mtime.0 as libc::time_t,
            tv_nsec: meta.mtime.1 as libc::c_long,
        },
    ];
    let c = super::skeleton::cstring(path);
    // SAFETY: a NUL-terminated path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl CaptureSession {
    /// Reads the metadata of every image entry from its source entry. Call with the
    /// namespace frozen (`PassthroughFs::stop_capture`): no rename can move another inode
    /// under a name while this reads it.
    pub(crate) fn collect_metadata(&self) -> Result<Vec<EntryMeta>, AbortReason> {
        self.hooks.fire("stop.metadata", 0);
        let mut entries = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(dir) = stack.pop() {
            let list = std::fs::read_dir(self.image(&dir)).map_err(|e| {
                AbortReason::target(format!("listing the image at {}", dir.display()), e)
            })?;
            for entry in list {
                let entry = entry.map_err(|e| AbortReason::target("listing the image", e))?;
                let rel = dir.join(entry.file_name());
                let st = sys_lstat(&self.source(&rel)).map_err(|e| {
                    AbortReason::Untrackable(format!(
                        "{} is in the image but cannot be read in the source: {e}",
                        rel.display()
                    ))
                })?;
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    stack.push(rel.clone());
                }
                entries.push(EntryMeta::of(rel, &st));
            }
        }
        let st = sys_lstat(&self.source_root)
            .map_err(|e| AbortReason::source("stat of the backing root", e))?;
        entries.push(EntryMeta::of(PathBuf::new(), &st));
        Ok(entries)
    }

    /// Marks the validity point: the caller has switched the gate away under the
    /// namespace lock, so every mirrored write has landed and no more will. Returns the
    /// instant and the progress then; the image files are closed and the metadata read
    /// afterwards, with the namespace still frozen.
    pub(crate) fn mark_stopped(&self) -> Result<(SystemTime, Progress), CaptureError> {
        let at = SystemTime::now();
        {
            // Under the queue lock so that no copier misses the wake-up.
            let _queue = self.queue.lock();
            if let Some(e) = self.error() {
                return Err(CaptureError::Aborted(e));
            }
            self.phase.store(Phase::Stopped as u8, SeqCst);
            self.work_ready.notify_all();
            self.idle.notify_all();
        }
        Ok((at, self.progress()))
    }

    /// Closes the image files (the image is final). Not at the validity point itself:
    /// closing thousands of files can take milliseconds that commits would wait for.
    pub(crate) fn close_image_files(&self) {
        for fc in self.files.read().values() {
            fc.dest.lock().take();
        }
        self.open_image_files.store(0, Relaxed);
    }
}
