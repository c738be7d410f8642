//! The dummy block device behind a `fuseblk` mount: a loop device over a small, already
//! unlinked file, so that files on the mount get a block device's `st_dev` and a server
//! finds `/sys/dev/block/MAJ:MIN/queue/physical_block_size` for them (InnoDB opens its
//! redo log with `O_DIRECT` only when that file exists). Nothing is ever read from or
//! written to the device; the kernel only opens it exclusively for the mount.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

// <linux/loop.h>; the libc crate does not carry them.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// The size of the file under the device: the kernel wants a device at least one block long.
const DEVICE_BYTES: u64 = 1 << 20;

/// A configured loop device, held open until the mount has it. It is set up to detach
/// itself when its last user closes it (`LO_FLAGS_AUTOCLEAR`): dropping this before a
/// mount took it frees the device at once, and a mount that took it frees it on unmount,
/// even if the agent was killed. Nothing is left to clean up by hand.
pub struct LoopDevice {
    path: PathBuf,
    _device: File,
}

impl LoopDevice {
    /// Sets up a free loop device with `block_size`-byte sectors (logical and physical)
    /// over a new file at `file`, which is unlinked again at once (the device keeps it).
    /// The name stays visible as the device's backing file (`losetup -l`,
    /// `/sys/block/loopN/loop/backing_file`), which is how clients find the agent.
    pub fn create(file: &Path, block_size: u32) -> io::Result<LoopDevice> {
        let _ = fs::remove_file(file);
        let backing = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(file)?;
        let sized = backing.set_len(DEVICE_BYTES);
        fs::remove_file(file)?;
        sized?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")?;
        // Another process may take the free device between the two calls: try again.
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let device = OpenOptions::new().read(true).write(true).open(&path)?;
            let mut config = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size,
                // SAFETY: all-zero is a valid loop_info64 (no offset, no limit, no name).
                info: unsafe { std::mem::zeroed() },
                reserved: [0; 8],
            };
            config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
            // SAFETY: `config` is a valid `struct loop_config` that outlives the call.
            let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &mut config) };
            if rc == 0 {
                return Ok(LoopDevice {
                    path,
                    _device: device,
                });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(e);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            "every free loop device was taken by someone else first",
        ))
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The file a loop device reads from, as the kernel names it (an unlinked one ends in
/// ` (deleted)`, which is stripped). None for anything that is not a configured loop device.
pub fn loop_backing_file(device: &Path) -> Option<PathBuf> {
    let meta = fs::metadata(device).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let text =
        fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file")).ok()?;
    let name = text.trim_end_matches('\n');
    Some(PathBuf::from(
        name.strip_suffix(" (deleted)").unwrap_or(name),
    ))
}

/// The physical block size of the device under `dir`'s filesystem, looked up the way
/// InnoDB does (the device, then its parent for a partition); None if there is none
/// (tmpfs, overlay, FUSE) or it is not a power of two from 512 to 4096.
pub fn physical_block_size(dir: &Path) -> Option<u32> {
    let dev = fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    ["", "/.."].iter().find_map(|up| {
        let text = fs::read_to_string(format!(
            "/sys/dev/block/{major}:{minor}{up}/queue/physical_block_size"
        ))
        .ok()?;
        let size: u32 = text.trim().parse().ok()?;
        (size.is_power_of_two() && (512..=4096).contains(&size)).then_some(size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configured_loop_device_has_a_backing_file() {
        assert_eq!(loop_backing_file(Path::new("/dev/null")), None);
        assert_eq!(loop_backing_file(Path::new("/nonexistent/loop9")), None);
    }

    /// tmpfs (like FUSE) has an anonymous device with no entry under /sys/dev/block.
    #[test]
    fn a_filesystem_without_a_block_device_has_no_physical_block_size() {
        let shm = Path::new("/dev/shm");
        if fs::metadata(shm).is_ok() {
            assert_eq!(physical_block_size(shm), None);
        }
    }
}
