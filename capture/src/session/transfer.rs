//! How the copier puts a range of a source file into its image file, under the range
//! lock the copier holds: cloned (the image shares the source's extents, and the
//! filesystem's copy-on-write keeps it at the clone instant) where the session clones,
//! otherwise read and written.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;

use super::copier::seek_data;
use super::{AbortReason, CaptureSession, CloneMode};
use crate::reflink;
use crate::sys::{self, Errno};

impl CaptureSession {
    /// Bytes the next chunk spans: `byte_chunk` when copying bytes, the clone chunk
    /// (a whole number of blocks) when cloning.
    pub(super) fn chunk_len(&self, byte_chunk: u64) -> u64 {
        let block = self.clone_block.load(Relaxed);
        if block == 0 {
            return byte_chunk;
        }
        (self.options.clone_chunk_size / block * block).max(block)
    }

    /// Puts the whole chunk `[off, off+len)` into the image. False (and nothing
    /// recorded) when the source ends inside the chunk: the tail takes it.
    pub(super) fn take_chunk(
        &self,
        src: &File,
        dest: &File,
        off: u64,
        len: u64,
        buf: &mut [u8],
    ) -> Result<bool, AbortReason> {
        if self.clone_block.load(Relaxed) > 0 {
            if off + len > source_size(src)? {
                return Ok(false);
            }
            if self.clone(src, dest, off, len)? {
                // The chunk is taken from the source; it is not yet recorded as copied.
                self.hooks.fire("copier.chunk_read", off);
                return Ok(true);
            }
        }
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            let piece = &mut buf[..want];
            let n = sys::pread_full(src.as_fd(), piece, pos).map_err(read_err)?;
            if n < piece.len() {
                return Ok(false);
            }
            self.hooks.fire("copier.chunk_read", pos);
            sys::pwrite_full(dest.as_fd(), piece, pos).map_err(write_err)?;
            self.bytes_copied.fetch_add(n as u64, Relaxed);
            pos += n as u64;
        }
        Ok(true)
    }

    /// Puts the data from `off` to the end of the source into the image (the caller
    /// holds the range lock to the end of any file). Holes are not taken: the image file
    /// gets its size afterwards.
    pub(super) fn take_tail(
        &self,
        src: &File,
        dest: &File,
        mut off: u64,
        buf: &mut [u8],
    ) -> Result<(), AbortReason> {
        let block = self.clone_block.load(Relaxed);
        if block > 0 {
            let from = match seek_data(src.as_fd(), off) {
                Ok(data) => (data - data % block).max(off),
                Err(Errno::ENXIO) => return Ok(()),
                Err(e) => return Err(read_err(e)),
            };
            // A clone may end unaligned at the source's end of file (where the image
            // file ends too, so far).
            let size = source_size(src)?;
            if size > from && self.clone(src, dest, from, size - from)? {
                return Ok(());
            }
        }
        loop {
            off = match seek_data(src.as_fd(), off) {
                Ok(data) => data,
                Err(Errno::ENXIO) => break,
                Err(e) => return Err(read_err(e)),
            };
            let n = sys::pread_full(src.as_fd(), buf, off).map_err(read_err)?;
            if n == 0 {
                break;
            }
            sys::pwrite_full(dest.as_fd(), &buf[..n], off).map_err(write_err)?;
            self.bytes_copied.fetch_add(n as u64, Relaxed);
            off += n as u64;
        }
        Ok(())
    }

    /// Clones `[off, off+len)` of the source into the image at the same offset. False
    /// when the bytes must be copied instead: this range cannot be cloned (an unaligned
    /// end), or the filesystem refuses clones here at all (then, under `--clone auto`,
    /// the rest of the session copies bytes).
    fn clone(&self, src: &File, dest: &File, off: u64, len: u64) -> Result<bool, AbortReason> {
        match reflink::clone_range(src.as_fd(), off, len, dest.as_fd(), off) {
            Ok(()) => {
                self.bytes_copied.fetch_add(len, Relaxed);
                self.bytes_cloned.fetch_add(len, Relaxed);
                Ok(true)
            }
            Err(Errno::EINVAL) => Ok(false),
            Err(e @ (Errno::EXDEV | Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::ENOSYS)) => {
                if self.options.clone == CloneMode::Always {
                    return Err(AbortReason::target(
                        "cloning into the image (--clone always)",
                        std::io::Error::from(e),
                    ));
                }
                tracing::warn!(error = %e, "the filesystem refused a clone: copying bytes from now on");
                self.clone_block.store(0, Relaxed);
                Ok(false)
            }
            Err(e) => Err(AbortReason::target(
                "cloning into the image",
                std::io::Error::from(e),
            )),
        }
    }
}

fn source_size(src: &File) -> Result<u64, AbortReason> {
    Ok(sys::fstat_path(src.as_fd()).map_err(read_err)?.st_size as u64)
}

fn read_err(e: Errno) -> AbortReason {
    AbortReason::source("reading the source", e)
}

fn write_err(e: Errno) -> AbortReason {
    AbortReason::target("writing the image", e)
}
