//! Mounting the passthrough: the checks that refuse a bad setup before anything changes,
//! the fuser session, and unmounting that refuses while the mount is still in use.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{BackgroundSession, Config, SessionACL};

use crate::blockdev::LoopDevice;
use crate::fs::PassthroughFs;
use crate::fuse::{FuseAdapter, MAX_WRITE};
use crate::mountinfo;
use crate::uring::{self, Rings};

/// Why a mount was refused; every message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("backing directory {0} does not exist; create it or pass the right --backing")]
    BackingMissing(PathBuf),
    #[error(
        "backing path {0} is not a directory; --backing must name the directory that holds the data"
    )]
    BackingNotDirectory(PathBuf),
    #[error("mountpoint {0} does not exist; create an empty directory there")]
    MountpointMissing(PathBuf),
    #[error("mountpoint {0} is not a directory; pass an empty directory as --mountpoint")]
    MountpointNotDirectory(PathBuf),
    #[error(
        "mountpoint {0} is not empty; the data belongs in the backing directory, mount on an empty directory"
    )]
    MountpointNotEmpty(PathBuf),
    #[error(
        "{0} is already a mountpoint ({1}); if another agent serves it, see `hotbackup status --mountpoint {0}`, otherwise unmount it first"
    )]
    AlreadyMounted(PathBuf, String),
    #[error(
        "mountpoint {mountpoint} and backing directory {backing} overlap; they must be separate directories, neither inside the other"
    )]
    Overlap {
        mountpoint: PathBuf,
        backing: PathBuf,
    },
    #[error(
        "no /dev/fuse on this machine; load the fuse module (`modprobe fuse`) or give the container the device"
    )]
    NoFuseDevice,
    #[error("not permitted to use FUSE ({0}); run the agent as root")]
    NotPermitted(String),
    #[error("could not mount {mountpoint}: {error}")]
    Mount {
        mountpoint: PathBuf,
        error: io::Error,
    },
    #[error("could not open backing directory {path}: {error}")]
    Backing { path: PathBuf, error: io::Error },
    #[error(
        "FUSE over io_uring is not available ({0}); mount without it (--io-uring off) or use a kernel with it (6.14 or later, `fuse` module parameter enable_uring=Y)"
    )]
    IoUring(String),
    #[error(
        "could not set up the loop device for a block-device mount: {0}; is the loop module loaded (`modprobe loop`, /dev/loop-control)? Or mount without one (--block-device none)"
    )]
    BlockDevice(io::Error),
}

/// Why an unmount did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UnmountError {
    #[error(
        "{mountpoint} is still in use ({open_files} files open through it); stop the database (or whatever uses it) first, or force a lazy unmount"
    )]
    Busy {
        mountpoint: PathBuf,
        open_files: usize,
    },
    #[error("could not unmount {mountpoint}: {error}")]
    Failed {
        mountpoint: PathBuf,
        error: nix::errno::Errno,
    },
}

#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Threads reading requests from the kernel, each on its own cloned /dev/fuse fd.
    pub threads: usize,
    /// What the mount table shows as the mount's source (not for a block-device mount,
    /// whose source is its device).
    pub fsname: String,
    /// Mount as `fuseblk` over a loop device made for it, so files get a block device's
    /// `st_dev` (see `blockdev`); None mounts plain `fuse`.
    pub block_device: Option<BlockDevice>,
    /// Whether requests come through io_uring rings (see `uring`) or /dev/fuse alone.
    pub io_uring: IoUringMode,
}

/// How the kernel hands requests to the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoUringMode {
    /// io_uring when the kernel has it (the agent sets the `fuse` module's
    /// `enable_uring` if it is off), /dev/fuse otherwise.
    #[default]
    Auto,
    /// io_uring or refuse to mount.
    On,
    /// /dev/fuse only.
    Off,
}

/// The dummy device of a `fuseblk` mount.
#[derive(Clone, Debug)]
pub struct BlockDevice {
    /// Where the file under the loop device is made (and unlinked at once); its name stays
    /// visible as the device's backing file.
    pub file: PathBuf,
    /// The device's sector size (logical and physical) and the mount's block size.
    pub block_size: u32,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 8,
            fsname: "hotbackup".into(),
            block_device: None,
            io_uring: IoUringMode::Auto,
        }
    }
}

/// Canonical (backing, mountpoint) after every refusal check has passed.
pub fn check(backing: &Path, mountpoint: &Path) -> Result<(PathBuf, PathBuf), MountError> {
    let backing_meta = fs::metadata(backing).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => MountError::BackingMissing(backing.into()),
        _ => MountError::Backing {
            path: backing.into(),
            error: e,
        },
    })?;
    if !backing_meta.is_dir() {
        return Err(MountError::BackingNotDirectory(backing.into()));
    }
    let mp_meta = fs::metadata(mountpoint).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => MountError::MountpointMissing(mountpoint.into()),
        _ => MountError::Mount {
            mountpoint: mountpoint.into(),
            error: e,
        },
    })?;
    if !mp_meta.is_dir() {
        return Err(MountError::MountpointNotDirectory(mountpoint.into()));
    }
    let backing = fs::canonicalize(backing).map_err(|e| MountError::Backing {
        path: backing.into(),
        error: e,
    })?;
    let mountpoint = fs::canonicalize(mountpoint).map_err(|e| MountError::Mount {
        mountpoint: mountpoint.into(),
        error: e,
    })?;
    if backing.starts_with(&mountpoint) || mountpoint.starts_with(&backing) {
        return Err(MountError::Overlap {
            mountpoint,
            backing,
        });
    }
    if let Some(existing) = mountinfo::mount_at(&mountpoint) {
        return Err(MountError::AlreadyMounted(
            mountpoint,
            format!(
                "{} from {}",
                existing.fstype,
                existing.source.to_string_lossy()
            ),
        ));
    }
    let not_empty = fs::read_dir(&mountpoint)
        .map_err(|e| MountError::Mount {
            mountpoint: mountpoint.clone(),
            error: e,
        })?
        .next()
        .is_some();
    if not_empty {
        return Err(MountError::MountpointNotEmpty(mountpoint));
    }
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(MountError::NoFuseDevice),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(MountError::NotPermitted(format!("/dev/fuse: {e}")));
        }
        Err(e) => {
            return Err(MountError::Mount {
                mountpoint,
                error: e,
            });
        }
    }
    Ok((backing, mountpoint))
}

/// A served mount. Dropping it without `unmount` detaches it lazily, so that a mount
/// never outlives its server in the namespace.
pub struct Mounted {
    pub fs: Arc<PassthroughFs>,
    pub mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    rings: Option<Rings>,
}

/// Mounts `backing` at `mountpoint` and serves it from background threads.
pub fn mount(
    backing: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<Mounted, MountError> {
    let (backing, mountpoint) = check(backing, mountpoint)?;
    let want_uring = match options.io_uring {
        IoUringMode::Off => false,
        mode => match uring::enable(true) {
            Ok(()) => true,
            Err(why) if mode == IoUringMode::On => return Err(MountError::IoUring(why)),
            Err(why) => {
                tracing::info!(%why, "serving over /dev/fuse, without io_uring");
                false
            }
        },
    };
    if want_uring {
        let init = Arc::new(uring::Negotiation::default());
        let (mut mounted, dev) = mount_once(&backing, &mountpoint, options, Some(init.clone()))?;
        let per_queue = options.threads.div_ceil(available_cpus()).max(2);
        match uring::start(
            mounted.fs.clone(),
            &dev,
            &init,
            per_queue,
            MAX_WRITE as usize,
        ) {
            Ok(rings) => {
                tracing::info!(
                    queues = rings.queues,
                    per_queue,
                    "serving over io_uring, one queue per CPU"
                );
                mounted.rings = Some(rings);
                return Ok(mounted);
            }
            // Some queues may hold entries already, and the kernel may then route
            // requests to a queue that has none: this connection is given up.
            Err(e) if options.io_uring == IoUringMode::On => {
                mounted.abandon();
                return Err(MountError::IoUring(e.to_string()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "io_uring did not start; mounting again over /dev/fuse");
                mounted.abandon();
            }
        }
    }
    mount_once(&backing, &mountpoint, options, None).map(|(mounted, _)| mounted)
}

/// One mount with a fresh `PassthroughFs`; `uring` makes INIT ask for io_uring.
fn mount_once(
    backing: &Path,
    mountpoint: &Path,
    options: &MountOptions,
    uring: Option<Arc<uring::Negotiation>>,
) -> Result<(Mounted, OwnedFd), MountError> {
    let fs = Arc::new(
        PassthroughFs::new(backing).map_err(|e| MountError::Backing {
            path: backing.into(),
            error: e,
        })?,
    );
    let mut config = Config::default();
    config.acl = SessionACL::All;
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    let adapter = FuseAdapter::new(fs.clone(), uring);
    let (source, fstype, device, block_size) = match &options.block_device {
        None => (options.fsname.clone(), "fuse.hotbackup", None, None),
        Some(block) => {
            let device = LoopDevice::create(&block.file, block.block_size)
                .map_err(MountError::BlockDevice)?;
            let source = device.path().to_string_lossy().into_owned();
            let size = Some(block.block_size);
            (source, "fuseblk.hotbackup", Some(device), size)
        }
    };
    let (session, dev) = mount_fd(adapter, mountpoint, &source, fstype, block_size, config)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => MountError::NotPermitted(e.to_string()),
            _ => MountError::Mount {
                mountpoint: mountpoint.into(),
                error: e,
            },
        })?;
    // The mount holds the device now; it detaches itself when the mount goes.
    drop(device);
    let mounted = Mounted {
        fs,
        mountpoint: mountpoint.into(),
        session: Some(session),
        rings: None,
    };
    Ok((mounted, dev))
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Mounts with mount(2) and a /dev/fuse fd of our own (fuser's own mounting knows
/// neither `fuseblk` nor io_uring, which needs the fd), then fuser serves a clone of it.
/// Returns the session and the fd, for the rings.
fn mount_fd(
    adapter: FuseAdapter,
    mountpoint: &Path,
    source: &str,
    fstype: &str,
    block_size: Option<u32>,
    config: Config,
) -> io::Result<(BackgroundSession, OwnedFd)> {
    use std::os::unix::fs::MetadataExt;
    let fuse = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},allow_other,default_permissions",
        fuse.as_raw_fd(),
        fs::metadata(mountpoint)?.mode(),
        nix::unistd::getuid(),
        nix::unistd::getgid(),
    );
    if let Some(size) = block_size {
        data.push_str(&format!(",blksize={size}"));
    }
    nix::mount::mount(
        Some(source),
        mountpoint,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )?;
    let dev = OwnedFd::from(fuse);
    let session = dev.try_clone().and_then(|fd| {
        fuser::Session::from_fd(adapter, fd, SessionACL::All, config)
            .and_then(fuser::Session::spawn)
    });
    match session {
        Ok(s) => Ok((s, dev)),
        Err(e) => {
            // Closing the fds ends the connection, so the unmount does not wait on it.
            drop(dev);
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            Err(e)
        }
    }
}

impl Mounted {
    /// Takes the mount away. A mount still in use is refused (and keeps serving) unless
    /// `force`, which detaches it lazily: it disappears from the namespace at once and is
    /// served until its last user closes. Call `join` afterwards to wait for that.
    pub fn unmount(&mut self, force: bool) -> Result<(), UnmountError> {
        use nix::mount::{MntFlags, umount2};
        match umount2(&self.mountpoint, MntFlags::empty()) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) if force => {
                umount2(&self.mountpoint, MntFlags::MNT_DETACH).map_err(|error| {
                    UnmountError::Failed {
                        mountpoint: self.mountpoint.clone(),
                        error,
                    }
                })
            }
            Err(nix::errno::Errno::EBUSY) => Err(UnmountError::Busy {
                mountpoint: self.mountpoint.clone(),
                open_files: self.fs.open_handles(),
            }),
            // Someone unmounted it already (fusermount3 -u): just wind down.
            Err(nix::errno::Errno::EINVAL) if mountinfo::mount_at(&self.mountpoint).is_none() => {
                Ok(())
            }
            Err(error) => Err(UnmountError::Failed {
                mountpoint: self.mountpoint.clone(),
                error,
            }),
        }
    }

    /// Waits for the serving threads to end (after an unmount from anywhere).
    pub fn join(&mut self) {
        if let Some(Err(e)) = self.session.take().map(|s| s.join()) {
            tracing::warn!(error = %e, "FUSE session ended with an error");
        }
        if let Some(rings) = self.rings.take() {
            rings.join(Duration::from_secs(5));
        }
    }

    /// Gives up a connection whose rings did not all start: aborts it (MNT_FORCE makes
    /// FUSE fail every request in flight or to come, where a queue without entries would
    /// hang them) and detaches the mount.
    fn abandon(self) {
        use nix::mount::{MntFlags, umount2};
        let _ = umount2(&self.mountpoint, MntFlags::MNT_FORCE | MntFlags::MNT_DETACH);
    }

    /// How requests reach the agent, for logs and `status`.
    pub fn transport(&self) -> String {
        match &self.rings {
            Some(r) => format!(
                "io_uring ({} queues, one per CPU, {} threads each)",
                r.queues, r.per_queue
            ),
            None => "/dev/fuse".into(),
        }
    }

    /// True once the serving threads have stopped (the mount was taken away).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.session.is_some() && mountinfo::mount_at(&self.mountpoint).is_some() {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
