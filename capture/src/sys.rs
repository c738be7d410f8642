//! Thin, errno-returning wrappers over the syscalls the passthrough needs.

use std::ffi::{CStr, CString, OsStr};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

pub use nix::errno::Errno;

pub type SysResult<T> = Result<T, Errno>;

/// Turns a `-1`-on-error return value into a `Result` carrying errno.
pub fn cvt<T: Copy + PartialEq + From<i8>>(ret: T) -> SysResult<T> {
    if ret == T::from(-1) {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

pub fn cstr(name: &OsStr) -> SysResult<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

pub const EMPTY: &CStr = c"";

pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> SysResult<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a valid out-pointer for one `struct stat`; `name` is NUL-terminated.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so the kernel filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `stat` of whatever an `O_PATH` (or ordinary) fd refers to, without following symlinks.
pub fn fstat_path(fd: BorrowedFd<'_>) -> SysResult<libc::stat> {
    fstatat(fd, EMPTY, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
}

pub fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the returned fd is owned by the caller.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    cvt(n).map(|n| n as usize)
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> SysResult<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    cvt(n).map(|n| n as usize)
}

/// Reads until `buf` is full or end of file; returns the byte count.
pub fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        match pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::EINTR) => continue,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

/// Writes all of `buf`; a failure after a partial write reports the partial count.
pub fn pwrite_full(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> SysResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        match pwrite(fd, &buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::EINTR) => continue,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

pub fn readlinkat(fd: BorrowedFd<'_>) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; EMPTY is NUL-terminated.
    let n = cvt(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n as usize);
    Ok(buf)
}

/// One entry of a `getdents64` batch.
pub struct RawDirEntry<'a> {
    pub ino: u64,
    pub next_offset: i64,
    pub dtype: u8,
    pub name: &'a [u8],
}

/// Reads a batch of directory entries at the directory fd's current position.
pub fn getdents(fd: BorrowedFd<'_>, buf: &mut [u8]) -> SysResult<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    cvt(n).map(|n| n as usize)
}

/// Iterates the `linux_dirent64` records in `buf[..len]`.
pub fn parse_dirents(buf: &[u8]) -> impl Iterator<Item = RawDirEntry<'_>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos + 19 > buf.len() {
            return None;
        }
        let rec = &buf[pos..];
        let ino = u64::from_ne_bytes(rec[0..8].try_into().ok()?);
        let next_offset = i64::from_ne_bytes(rec[8..16].try_into().ok()?);
        let reclen = u16::from_ne_bytes(rec[16..18].try_into().ok()?) as usize;
        let dtype = rec[18];
        let name_area = &rec[19..reclen.min(rec.len())];
        let name_len = name_area
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_area.len());
        pos += reclen.max(1);
        Some(RawDirEntry {
            ino,
            next_offset,
            dtype,
            name: &name_area[..name_len],
        })
    })
}

/// Sets this thread's filesystem uid/gid for the life of the guard, so that new files
/// get the caller's ownership (and the backing filesystem's setgid-directory rules apply).
pub struct FsCredentials {
    old: Option<(u32, u32)>,
}

impl FsCredentials {
    /// Also makes sure this thread creates entries with exactly the modes it is given
    /// (see `thread_umask_zero`).
    pub fn assume(uid: u32, gid: u32) -> FsCredentials {
        thread_umask_zero();
        if uid == 0 && gid == 0 {
            return FsCredentials { old: None };
        }
        // SAFETY: setfsgid/setfsuid only change this thread's fs credentials; they cannot fail
        // in a way that corrupts memory, and the guard restores them.
        let (old_gid, old_uid) = unsafe { (libc::setfsgid(gid), libc::setfsuid(uid)) };
        FsCredentials {
            old: Some((old_uid as u32, old_gid as u32)),
        }
    }
}

impl Drop for FsCredentials {
    fn drop(&mut self) {
        if let Some((uid, gid)) = self.old {
            // SAFETY: restores the credentials saved by `assume` on this same thread.
            unsafe {
                libc::setfsuid(uid);
                libc::setfsgid(gid);
            }
        }
    }
}

thread_local! {
    static UMASK_CLEARED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Gives the calling thread a umask of its own, set to 0: the kernel has already applied
/// the application's umask to every mode it sends us. The process umask (and with it
/// everything else the process creates, such as backup images) is left alone.
pub fn thread_umask_zero() {
    if UMASK_CLEARED.with(|c| c.get()) {
        return;
    }
    // SAFETY: unshare(CLONE_FS) gives this thread a private copy of its cwd, root and
    // umask; umask then changes only that copy. Neither touches memory.
    let private = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
    if private {
        // SAFETY: as above; the umask is now this thread's own.
        unsafe { libc::umask(0) };
    } else {
        tracing::warn!(
            "could not give a filesystem thread its own umask ({}); new entries on the mount get the process umask",
            std::io::Error::last_os_error()
        );
    }
    UMASK_CLEARED.with(|c| c.set(true));
}
