//! Mirroring the namespace: creations, links, removals and renames in the source are
//! applied to the image at the same relative paths. Every entry point is called under
//! the namespace lock (`CaptureSession::namespace`).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};

use super::skeleton::{create_image_file, cstring, mkdir, rebase};
use super::{AbortReason, CaptureSession, FileCapture};
use crate::inode::InodeKey;
use crate::ranges::CopiedRanges;
use crate::sys::cvt;

impl CaptureSession {
    /// A change at `what` that the filesystem could not resolve to a path below the
    /// backing root: the image can no longer follow the tree.
    pub fn unresolvable(&self, what: &str) {
        if self.live() {
            self.abort(AbortReason::Untrackable(format!(
                "could not resolve the path of {what} below the backing directory"
            )));
        }
    }

    /// A new entry appeared at `rel` in the source (create, mkdir, symlink, mknod).
    pub fn created(&self, rel: &Path, st: &libc::stat) {
        self.guarded("mirroring a namespace change", || {
            self.created_inner(rel, st)
        });
    }

    pub(super) fn created_inner(&self, rel: &Path, st: &libc::stat) {
        if !self.live() || self.outside(rel) {
            return;
        }
        let r = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => mkdir(&self.image(rel)),
            libc::S_IFREG => self.created_file(rel, st),
            libc::S_IFLNK => std::fs::read_link(self.source(rel))
                .map_err(|e| AbortReason::source(format!("readlink {}", rel.display()), e))
                .and_then(|t| {
                    std::os::unix::fs::symlink(t, self.image(rel)).map_err(|e| {
                        AbortReason::target(format!("mirroring symlink {}", rel.display()), e)
                    })
                }),
            _ => Ok(()),
        };
        if let Err(e) = r {
            self.abort(e);
        }
    }

    fn created_file(&self, rel: &Path, st: &libc::stat) -> Result<(), AbortReason> {
        let key = InodeKey::of(st);
        let mut paths = self.paths.write();
        let dest = create_image_file(&self.image(rel))?;
        // A new file is copied in full from its first byte: every write is mirrored.
        let fc = Arc::new(FileCapture::new(CopiedRanges::everything()));
        *fc.dest.lock() = Some(Arc::new(dest));
        self.open_image_files.fetch_add(1, Relaxed);
        self.files.write().insert(key, fc);
        paths.insert(key, vec![rel.to_path_buf()]);
        Ok(())
    }

    /// A hard link `new_rel` to the file `key` was made.
    pub fn linked(&self, key: InodeKey, new_rel: &Path) {
        self.guarded("mirroring a namespace change", || {
            self.linked_inner(key, new_rel)
        });
    }

    fn linked_inner(&self, key: InodeKey, new_rel: &Path) {
        if !self.live() || self.outside(new_rel) {
            return;
        }
        let mut paths = self.paths.write();
        let Some(existing) = paths.get(&key).and_then(|v| v.first()).cloned() else {
            // A link to a file the image does not have (it lives only in an excluded
            // place, or lost all its names): it enters the image as a file to copy.
            drop(paths);
            if let Err(e) = self.adopt_entry(new_rel) {
                self.abort(e);
            }
            return;
        };
        match std::fs::hard_link(self.image(&existing), self.image(new_rel)) {
            Ok(()) => paths.entry(key).or_default().push(new_rel.to_path_buf()),
            Err(e) => self.abort(AbortReason::target(
                format!("mirroring link {}", new_rel.display()),
                e,
            )),
        }
    }

    /// The entry at `rel` (a file `key`, or a directory) was removed from the source.
    pub fn removed(&self, rel: &Path, key: Option<InodeKey>, is_dir: bool) {
        self.guarded("mirroring a namespace change", || {
            self.removed_inner(rel, key, is_dir)
        });
    }

    fn removed_inner(&self, rel: &Path, key: Option<InodeKey>, is_dir: bool) {
        if !self.live() || self.outside(rel) {
            return;
        }
        let mut paths = self.paths.write();
        if is_dir {
            self.walk_forget(rel);
        }
        let r = if is_dir {
            std::fs::remove_dir(self.image(rel))
        } else {
            std::fs::remove_file(self.image(rel))
        };
        if let Err(e) = r
            && e.kind() != io::ErrorKind::NotFound
        {
            self.abort(AbortReason::target(
                format!("mirroring removal of {}", rel.display()),
                e,
            ));
            return;
        }
        if let Some(key) = key {
            self.drop_name(&mut paths, key, rel);
        }
    }

    /// `rel` no longer names the file `key`; with no name left, the file is gone from the
    /// image and its writes (through fds still open) no longer belong to it.
    fn drop_name(&self, paths: &mut HashMap<InodeKey, Vec<PathBuf>>, key: InodeKey, rel: &Path) {
        let Some(names) = paths.get_mut(&key) else {
            return;
        };
        names.retain(|p| p != rel);
        if names.is_empty() {
            paths.remove(&key);
            if let Some(fc) = self.file(&key) {
                fc.gone.store(true, SeqCst);
            }
        }
    }

    /// `from` was renamed to `to` in the source with `flags`; `replaced` is the file that
    /// `to` named before (if a regular file).
    pub fn renamed(&self, from: &Path, to: &Path, flags: u32, replaced: Option<InodeKey>) {
        self.guarded("mirroring a namespace change", || {
            self.renamed_inner(from, to, flags, replaced)
        });
    }

    fn renamed_inner(&self, from: &Path, to: &Path, flags: u32, replaced: Option<InodeKey>) {
        if !self.live() {
            return;
        }
        let (from_out, to_out) = (self.outside(from), self.outside(to));
        if from_out && to_out {
            return;
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if from_out || to_out {
            // Moving across the exclusion boundary (or between walked and unwalked
            // places): the image follows by removing or adopting the subtree (both sides
            // for an exchange).
            // `inside` is the side that is in the image: what it named before (the
            // renamed entry, or the one replaced or exchanged) leaves the image, and what
            // it names now (moved in, or exchanged in) enters it.
            let inside = if from_out { to } else { from };
            self.forget_subtree(inside);
            if (from_out || exchange)
                && let Err(e) = self.adopt_entry(inside)
            {
                self.abort(e);
            }
            return;
        }
        let mut paths = self.paths.write();
        let (a, b) = (cstring(&self.image(from)), cstring(&self.image(to)));
        // SAFETY: renameat2 on NUL-terminated paths inside the image.
        let r = cvt(unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                flags,
            )
        });
        if let Err(e) = r {
            self.abort(AbortReason::target(
                format!("mirroring rename of {} to {}", from.display(), to.display()),
                e,
            ));
            return;
        }
        if !exchange && let Some(victim) = replaced {
            self.drop_name(&mut paths, victim, to);
        }
        self.walk_renamed(from, to, exchange);
        for names in paths.values_mut() {
            for p in names.iter_mut() {
                if let Some(moved) = rebase(p, from, to) {
                    *p = moved;
                } else if exchange && let Some(moved) = rebase(p, to, from) {
                    *p = moved;
                }
            }
        }
    }

    /// The subtree at `rel` left the image (moved into an excluded place, or replaced).
    fn forget_subtree(&self, rel: &Path) {
        let mut paths = self.paths.write();
        self.walk_forget(rel);
        let image = self.image(rel);
        let removed = match std::fs::symlink_metadata(&image) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&image),
            Ok(_) => std::fs::remove_file(&image),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            self.abort(AbortReason::target(
                format!("removing {} from the image", rel.display()),
                e,
            ));
            return;
        }
        paths.retain(|key, names| {
            names.retain(|p| !p.starts_with(rel));
            if names.is_empty() {
                if let Some(fc) = self.file(key) {
                    fc.gone.store(true, SeqCst);
                }
                false
            } else {
                true
            }
        });
    }
}
