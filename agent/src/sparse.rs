//! Where a file holds data: SEEK_DATA / SEEK_HOLE, for the readers that skip holes
//! (the digest) and the writers that keep them (restore's copy).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The next range `[start, end)` at or after `at` that may hold data, or None when only a
/// hole remains before `len`. A filesystem that cannot tell holes has data everywhere.
pub fn next_data(fd: BorrowedFd<'_>, at: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let start = match seek(fd, at, libc::SEEK_DATA) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
            return Ok(Some((at, len)));
        }
        Err(e) => return Err(e),
    };
    if start >= len {
        return Ok(None);
    }
    let end = seek(fd, start, libc::SEEK_HOLE)?;
    Ok(Some((start, end.clamp(start + 1, len))))
}

fn seek(fd: BorrowedFd<'_>, off: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor the caller keeps open; the offset it moves is only
    // used by positioned I/O (pread, copy_file_range with offsets), which ignores it.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}
