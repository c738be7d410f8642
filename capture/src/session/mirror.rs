//! Mirroring data: writes, size changes and fallocate on the source, repeated on the
//! parts of the image file the copier has already copied.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use parking_lot::RwLockReadGuard;
use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};

use super::{AbortReason, CaptureSession, FileCapture};
use crate::inode::InodeKey;
use crate::rangelock::TO_END;
use crate::sys::{self, cvt};

impl CaptureSession {
    /// The capture state of `key`, or for a file the session does not track, the shared
    /// registration guard: hold it for the whole operation (see the module's lock order),
    /// so that a registration of this file waits for the operation to finish.
    fn tracked(&self, key: InodeKey) -> Result<Arc<FileCapture>, RwLockReadGuard<'_, ()>> {
        let untracked = self.registering.read();
        self.file(&key).ok_or(untracked)
    }

    /// Runs `write` (the source write of `data` at `offset`) under the range lock and
    /// mirrors what it wrote onto copied ranges. The application gets `write`'s result.
    pub fn write<E>(
        &self,
        key: InodeKey,
        offset: u64,
        data: &[u8],
        write: impl FnOnce() -> Result<usize, E>,
    ) -> Result<usize, E> {
        let fc = match self.tracked(key) {
            Ok(fc) => fc,
            Err(_untracked) => return write(),
        };
        let _range = fc.lock.lock(offset, offset + data.len() as u64);
        let n = write()?;
        self.guarded("mirroring a write", || {
            self.hooks.fire("write.before_mirror", offset);
            if n > 0 && self.live() && !fc.gone.load(SeqCst) {
                let spans = fc.copied.lock().overlap(offset, offset + n as u64);
                if !spans.is_empty() {
                    self.mirror_spans(key, &fc, &spans, offset, &data[..n]);
                }
            }
        });
        Ok(n)
    }

    /// Like `write`, for writes whose data is only in the source afterwards
    /// (copy_file_range): the mirrored bytes are read back from `source`, one bounded
    /// buffer at a time.
    pub fn write_from_source<E>(
        &self,
        key: InodeKey,
        offset: u64,
        len: u64,
        source: BorrowedFd<'_>,
        write: impl FnOnce() -> Result<usize, E>,
    ) -> Result<usize, E> {
        let fc = match self.tracked(key) {
            Ok(fc) => fc,
            Err(_untracked) => return write(),
        };
        let _range = fc.lock.lock(offset, offset.saturating_add(len));
        let n = write()?;
        self.guarded("mirroring a copy_file_range", || {
            if n == 0 || !self.live() || fc.gone.load(SeqCst) {
                return;
            }
            let spans = fc.copied.lock().overlap(offset, offset + n as u64);
            let mut buf = vec![0u8; (self.options.chunk_size as usize).min(n).max(1)];
            for (s, e) in spans {
                let mut at = s;
                while at < e {
                    let want = ((e - at) as usize).min(buf.len());
                    match sys::pread_full(source, &mut buf[..want], at) {
                        Ok(0) => break,
                        Ok(got) => {
                            self.mirror_spans(key, &fc, &[(at, at + got as u64)], at, &buf[..got]);
                            at += got as u64;
                        }
                        Err(e) => {
                            self.abort(AbortReason::source(
                                "reading back a copied range to mirror it",
                                e,
                            ));
                            return;
                        }
                    }
                }
            }
        });
        Ok(n)
    }

    /// The image file of `key`, reopened by its current name if it was closed. Names
    /// change together with the image (under the paths write lock, held here across the
    /// reopen), so the name read here names this file in the image.
    fn image_file(&self, key: InodeKey, fc: &FileCapture) -> Option<Arc<File>> {
        // Lock order: paths before dest.
        let paths = self.paths.read();
        let mut slot = fc.dest.lock();
        if let Some(d) = &*slot {
            return Some(d.clone());
        }
        let Some(rel) = paths.get(&key).and_then(|names| names.first()) else {
            // Its last name went away after the caller looked (`gone` is set under the
            // paths write lock, so it is current here): nothing to mirror into.
            if !fc.gone.load(SeqCst) {
                self.abort(AbortReason::Untrackable(
                    "a copied file has no name left in the image to mirror into".into(),
                ));
            }
            return None;
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .open(self.image(rel))
        {
            Ok(f) => {
                let f = Arc::new(f);
                *slot = Some(f.clone());
                self.open_image_files.fetch_add(1, Relaxed);
                Some(f)
            }
            Err(e) => {
                drop(slot);
                drop(paths);
                self.abort(AbortReason::target("reopening an image file", e));
                None
            }
        }
    }

    fn mirror_spans(
        &self,
        key: InodeKey,
        fc: &FileCapture,
        spans: &[(u64, u64)],
        offset: u64,
        data: &[u8],
    ) {
        let Some(dest) = self.image_file(key, fc) else {
            return;
        };
        for &(s, e) in spans {
            let from = (s - offset) as usize;
            let to = ((e - offset) as usize).min(data.len());
            if from >= to {
                continue;
            }
            self.hooks.fire("mirror.span", s);
            match sys::pwrite_full(dest.as_fd(), &data[from..to], s) {
                Ok(n) if n == to - from => {
                    self.bytes_mirrored.fetch_add(n as u64, Relaxed);
                }
                Ok(n) => {
                    self.abort(AbortReason::TargetIo(format!(
                        "mirroring a write: short write ({n} of {} bytes)",
                        to - from
                    )));
                    return;
                }
                Err(e) => {
                    self.abort(AbortReason::target("mirroring a write into the image", e));
                    return;
                }
            }
        }
    }

    /// Runs a size change of the source (`op`) with the file locked whole, then makes the
    /// image agree: it is cut to the new size if longer, and a fully copied file gets
    /// exactly the new size.
    pub fn resize<T, E>(
        &self,
        key: InodeKey,
        op: impl FnOnce() -> Result<T, E>,
        new_size: impl FnOnce() -> Option<u64>,
    ) -> Result<T, E> {
        let fc = match self.tracked(key) {
            Ok(fc) => fc,
            Err(_untracked) => return op(),
        };
        let _all = fc.lock.lock(0, TO_END);
        let r = op()?;
        self.guarded("mirroring a size change", || {
            if !self.live() || fc.gone.load(SeqCst) {
                return;
            }
            let Some(size) = new_size() else {
                self.abort(AbortReason::source(
                    "reading a file's size after a truncate",
                    std::io::Error::other("fstat failed"),
                ));
                return;
            };
            // The copied set stays as it is: bytes past the new end are zeros in the
            // source from now on, and the image file is cut below, so its zeros there
            // match; and the copier, which may already be past them, will not come back.
            // Writes that regrow the file into copied ranges are therefore mirrored.
            let full = fc.copied.lock().covers(size, size.saturating_add(1));
            self.hooks.fire("resize", size);
            // A file the copier has not started has nothing in the image to cut.
            if let Some(dest) = fc.has_copied().then(|| self.image_file(key, &fc)).flatten() {
                let cur = dest.metadata().map(|m| m.len()).unwrap_or(0);
                if (full || cur > size)
                    && let Err(e) = dest.set_len(size)
                {
                    self.abort(AbortReason::target("truncating an image file", e));
                }
            }
        });
        Ok(r)
    }

    /// Runs `op` (an fallocate of the source) under the range lock and repeats it on
    /// the copied parts of the range in the image.
    pub fn fallocate<E>(
        &self,
        key: InodeKey,
        mode: i32,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let fc = match self.tracked(key) {
            Ok(fc) => fc,
            Err(_untracked) => return op(),
        };
        let keeps_size =
            mode & libc::FALLOC_FL_KEEP_SIZE != 0 || mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let end = if keeps_size {
            offset.saturating_add(len)
        } else {
            TO_END
        };
        let _range = fc.lock.lock(offset, end);
        op()?;
        self.guarded("mirroring fallocate", || {
            if !self.live() || fc.gone.load(SeqCst) {
                return;
            }
            let spans = fc.copied.lock().overlap(offset, offset.saturating_add(len));
            if spans.is_empty() {
                return;
            }
            let Some(dest) = self.image_file(key, &fc) else {
                return;
            };
            for (s, e) in spans {
                // SAFETY: fallocate on the image file this session owns.
                let r = cvt(unsafe {
                    libc::fallocate(
                        dest.as_raw_fd(),
                        mode,
                        s as libc::off_t,
                        (e - s) as libc::off_t,
                    )
                });
                if let Err(err) = r {
                    self.abort(AbortReason::target(
                        "mirroring fallocate into the image",
                        err,
                    ));
                    break;
                }
            }
        });
        Ok(())
    }
}
