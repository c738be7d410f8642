//! Reflinks: the clone ioctls (`FICLONE`, `FICLONERANGE`) and the once-per-session probe
//! of whether files in one directory can share extents with files in another.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::sys::{Errno, SysResult, cvt};

/// Makes `dest` share all of `src`'s extents (its whole content, holes included).
pub fn clone_file(dest: BorrowedFd<'_>, src: BorrowedFd<'_>) -> SysResult<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument; no memory is passed.
    cvt(unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) }).map(|_| ())
}

/// Makes `dest[dest_off..dest_off+len]` share `src[src_off..src_off+len]`'s extents. The
/// offsets and `len` must be multiples of the filesystem's block size, except that the
/// range may end at the source's end of file. `len` 0 would mean "to the end": refused.
pub fn clone_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    len: u64,
    dest: BorrowedFd<'_>,
    dest_off: u64,
) -> SysResult<()> {
    if len == 0 {
        return Err(Errno::EINVAL);
    }
    let range = libc::file_clone_range {
        src_fd: src.as_raw_fd() as i64,
        src_offset: src_off,
        src_length: len,
        dest_offset: dest_off,
    };
    // SAFETY: FICLONERANGE reads one `struct file_clone_range`, which `range` is, for the
    // duration of the call.
    cvt(unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONERANGE, &range) }).map(|_| ())
}

/// Whether files under `source` can be cloned into files under `target`: the block size
/// to align clones to, or why not (a sentence for the user).
pub fn probe(source: &Path, target: &Path) -> Result<u64, String> {
    let mount_id = |dir: &Path| {
        statx_mount_id(dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))
    };
    if mount_id(source)? != mount_id(target)? {
        // The clone ioctls refuse (EXDEV) across mounts, even of one filesystem.
        return Err(format!(
            "{} and {} are not on the same mounted filesystem",
            target.display(),
            source.display()
        ));
    }
    let block = block_size(target)?;
    // Two unnamed files in the target: nothing is left behind, whatever happens.
    let tmp = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(target)
            .map_err(|e| format!("cannot create a probe file in {}: {e}", target.display()))
    };
    let (mut a, b): (File, File) = (tmp()?, tmp()?);
    a.write_all(&vec![0x5a; block as usize])
        .map_err(|e| format!("cannot write a probe file in {}: {e}", target.display()))?;
    clone_range(a.as_fd(), 0, block, b.as_fd(), 0).map_err(|e| {
        format!(
            "the filesystem of {} cannot clone file ranges ({e}); reflinks need XFS \
             (reflink=1) or btrfs",
            target.display()
        )
    })?;
    Ok(block)
}

/// The filesystem's block size: the unit clone ranges are aligned to.
fn block_size(dir: &Path) -> Result<u64, String> {
    let st = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    Ok((st.block_size() as u64).max(512))
}

/// The id of the mount `path` is on (statx `STATX_MNT_ID`), or its device number on a
/// kernel too old to report one.
fn statx_mount_id(path: &Path) -> Result<(u64, u64), Errno> {
    let name = crate::sys::cstr(path.as_os_str())?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `name` is NUL-terminated and `stx` is a valid out-pointer for one statx.
    cvt(unsafe {
        libc::statx(
            libc::AT_FDCWD,
            name.as_ptr(),
            0,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded (and the buffer was zeroed before), so it is initialized.
    let stx = unsafe { stx.assume_init() };
    let dev = ((stx.stx_dev_major as u64) << 32) | stx.stx_dev_minor as u64;
    let mnt = if stx.stx_mask & libc::STATX_MNT_ID != 0 {
        stx.stx_mnt_id
    } else {
        0
    };
    Ok((dev, mnt))
}
