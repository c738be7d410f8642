//! Building the image skeleton: image entries for source entries (those the
//! session-start walk brings in, or a subtree that appears in the middle of a session),
//! and registration of regular files as copy work.

use std::ffi::CString;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};

use super::{AbortReason, CaptureSession, FileCapture, Pending};
use crate::inode::InodeKey;
use crate::rangelock::TO_END;
use crate::ranges::CopiedRanges;
use crate::sys::{self, Errno};

/// Image entries are private until the validity point gives them their real metadata.
pub(super) const IMAGE_FILE_MODE: u32 = 0o600;
pub(super) const IMAGE_DIR_MODE: u32 = 0o700;

/// Names of append-only logs that are hot until the end: copied last, so that the copy
/// phases of all files end together and fewer bytes are mirrored.
fn is_hot(rel: &Path) -> bool {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.starts_with("ib_logfile")
        || name.starts_with("ib_redo")
        || name.starts_with("aria_log.")
        || name.contains("-bin.")
        || name.contains("-relay-bin.")
        || name == "ddl_recovery.log"
}

impl CaptureSession {
    /// Creates image entries for the source subtree at `rel` (a directory that appeared
    /// in the image in the middle of the session), registering its regular files as
    /// pending copy work. Call under the namespace lock.
    pub(super) fn adopt(&self, rel: &Path) -> Result<(), AbortReason> {
        let mut pending = Vec::new();
        let mut stack = vec![rel.to_path_buf()];
        while let Some(dir_rel) = stack.pop() {
            for child in self.list_source_dir(&dir_rel)? {
                if self.adopt_child(&child, &mut pending)? {
                    stack.push(child);
                }
            }
        }
        self.registration_barrier();
        self.enqueue(pending);
        Ok(())
    }

    /// The names in the source directory `dir_rel` that are not excluded, as paths
    /// relative to the root.
    pub(super) fn list_source_dir(&self, dir_rel: &Path) -> Result<Vec<PathBuf>, AbortReason> {
        let listing =
            |e| AbortReason::source(format!("listing {}", self.source(dir_rel).display()), e);
        let mut children = Vec::new();
        for entry in std::fs::read_dir(self.source(dir_rel)).map_err(listing)? {
            let entry = entry.map_err(listing)?;
            let child = dir_rel.join(entry.file_name());
            if !self.excluded(&child) {
                children.push(child);
            }
        }
        Ok(children)
    }

    /// Gives the source entry at `child` its image entry (a regular file's copy work goes
    /// to `pending`). True for a directory, whose entries are still to be adopted; an
    /// entry that is gone by now is left out.
    pub(super) fn adopt_child(
        &self,
        child: &Path,
        pending: &mut Vec<Pending>,
    ) -> Result<bool, AbortReason> {
        let st = match sys_lstat(&self.source(child)) {
            Ok(st) => st,
            // (ENOTDIR: a directory on the way was replaced by a file.)
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(false),
            Err(e) => {
                return Err(AbortReason::source(format!("stat {}", child.display()), e));
            }
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                mkdir(&self.image(child))?;
                return Ok(true);
            }
            libc::S_IFREG => {
                if let Some(p) = self.register_file(child, &st)? {
                    pending.push(p);
                }
            }
            libc::S_IFLNK => {
                let target = std::fs::read_link(self.source(child))
                    .map_err(|e| AbortReason::source(format!("readlink {}", child.display()), e))?;
                std::os::unix::fs::symlink(&target, self.image(child))
                    .map_err(|e| AbortReason::target(format!("symlink {}", child.display()), e))?;
            }
            // Sockets, fifos and devices are not data.
            _ => {}
        }
        Ok(false)
    }

    /// The entry at `rel` became part of the image in the middle of the session (moved
    /// in from an excluded place, or a new hard link to a file the session did not track).
    pub(super) fn adopt_entry(&self, rel: &Path) -> Result<(), AbortReason> {
        // While the session-start walk runs, it brings the entry in with the rest.
        if self.walk_defer(rel) {
            return Ok(());
        }
        let st = sys_lstat(&self.source(rel))
            .map_err(|e| AbortReason::source(format!("stat {}", rel.display()), e))?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                mkdir(&self.image(rel))?;
                self.adopt(rel)
            }
            libc::S_IFREG => {
                let pending = self.register_file(rel, &st)?;
                self.registration_barrier();
                self.enqueue(pending.into_iter().collect());
                Ok(())
            }
            _ => {
                self.created_inner(rel, &st);
                Ok(())
            }
        }
    }

    /// Gives the regular file `st` at `rel` its image entry: a hard link to its image file
    /// when the session already tracks it under another name, otherwise an empty image
    /// file and copy work (returned, for the caller to queue after any barrier).
    pub(super) fn register_file(
        &self,
        rel: &Path,
        st: &libc::stat,
    ) -> Result<Option<Pending>, AbortReason> {
        let key = InodeKey::of(st);
        let existing = self.files.read().get(&key).cloned();
        // A file with no name left whose copy is stale: it is copied again from scratch.
        // Its whole-file lock waits out writes in flight (which saw it gone and mirrored
        // nothing) and keeps new ones out until its state is reset.
        let reset = existing.filter(|fc| fc.gone.load(SeqCst));
        let _all = reset.as_ref().map(|fc| fc.lock.lock(0, TO_END));
        let mut paths = self.paths.write();
        if let Some(first) = paths.get(&key).and_then(|names| names.first()).cloned() {
            std::fs::hard_link(self.image(&first), self.image(rel))
                .map_err(|e| AbortReason::target(format!("linking {}", rel.display()), e))?;
            paths.entry(key).or_default().push(rel.to_path_buf());
            return Ok(None);
        }
        create_image_file(&self.image(rel))?;
        match &reset {
            Some(fc) => {
                fc.generation.fetch_add(1, SeqCst);
                *fc.copied.lock() = CopiedRanges::new();
                if fc.dest.lock().take().is_some() {
                    self.open_image_files.fetch_sub(1, Relaxed);
                }
                fc.gone.store(false, SeqCst);
            }
            None => {
                self.files
                    .write()
                    .insert(key, Arc::new(FileCapture::new(CopiedRanges::new())));
            }
        }
        paths.insert(key, vec![rel.to_path_buf()]);
        let size = st.st_size as u64;
        self.files_total.fetch_add(1, Relaxed);
        self.bytes_total.fetch_add(size, Relaxed);
        Ok(Some(Pending {
            key,
            size,
            hot: is_hot(rel),
        }))
    }

    /// Waits until every operation that found a file untracked (and so took no range
    /// lock) has finished: after this, the copier may read what they wrote.
    pub(super) fn registration_barrier(&self) {
        drop(self.registering.write());
    }

    /// Queues copy work (large, cold files first; hot logs last). Work that arrives after
    /// the copy phase ended sends the session back to copying.
    pub(super) fn enqueue(&self, mut pending: Vec<Pending>) {
        if pending.is_empty() {
            return;
        }
        pending.sort_by(|a, b| a.hot.cmp(&b.hot).then(b.size.cmp(&a.size)));
        let mut queue = self.queue.lock();
        if !self.live() {
            return;
        }
        queue.items.extend(pending);
        let _ = self.phase.compare_exchange(
            super::Phase::Copied as u8,
            super::Phase::Copying as u8,
            SeqCst,
            SeqCst,
        );
        self.work_ready.notify_all();
    }
}

pub(super) fn create_image_file(path: &Path) -> Result<std::fs::File, AbortReason> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(IMAGE_FILE_MODE)
        .open(path)
        .map_err(|e| AbortReason::target(format!("creating image file {}", path.display()), e))
}

pub(super) fn mkdir(p: &Path) -> Result<(), AbortReason> {
    match std::fs::DirBuilder::new().mode(IMAGE_DIR_MODE).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(AbortReason::target(
            format!("creating image directory {}", p.display()),
            e,
        )),
    }
}

pub(super) fn sys_lstat(p: &Path) -> Result<libc::stat, Errno> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    sys::fstatat(
        // SAFETY: AT_FDCWD is a valid "directory fd" for *at calls with absolute paths.
        unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) },
        &c,
        libc::AT_SYMLINK_NOFOLLOW,
    )
}

pub(super) fn cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL")
}

/// `p` with its leading `from` replaced by `to`, if it lies at or below `from`.
pub(super) fn rebase(p: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    let rest = p.strip_prefix(from).ok()?;
    // `join("")` would append a trailing slash, which then fails on files.
    Some(if rest.as_os_str().is_empty() {
        to.to_path_buf()
    } else {
        to.join(rest)
    })
}
