//! The passthrough filesystem's logic: every operation is carried out on the backing
//! directory through per-inode `O_PATH` fds, returning plain results so that it can be
//! exercised without a mount. `fuse.rs` adapts it to fuser's callbacks.
//!
//! This module holds the filesystem's state and what every operation shares (inodes,
//! handles, the capture gate and starting and stopping sessions); the operations live
//! by seam in `entry` (namespace), `file_io`, `dir` and `attr`.

mod attr;
mod dir;
mod entry;
mod file_io;

use attr::kind_of_dtype;
pub use attr::{XattrReply, attr_from_stat, kind_of_mode};
pub(crate) use attr::{since_epoch, system_time};

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};
use parking_lot::{Mutex, RwLock};

use crate::direct::{self, DirectFile};
use crate::gate::{CaptureGate, Pass};
use crate::hooks::Hooks;
use crate::inode::{Inode, InodeKey, InodeTable};
use crate::session::{
    AbortReason, CaptureError, CaptureSession, NamespaceGuard, Phase, SessionOptions, ValidityPoint,
};
use crate::stats::{FsStats, LatencyTotals};
use crate::sys::{self, Errno, FsCredentials, cstr, cvt};

/// A failed operation; each maps to the errno the application sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum FsError {
    #[error("{0}")]
    Os(#[from] Errno),
    #[error("unknown inode {0}")]
    UnknownInode(u64),
    #[error("unknown file handle {0}")]
    UnknownHandle(u64),
}

impl FsError {
    pub fn errno(self) -> Errno {
        match self {
            FsError::Os(e) => e,
            FsError::UnknownInode(_) => Errno::ESTALE,
            FsError::UnknownHandle(_) => Errno::EBADF,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// Who asked: new inodes are created with the caller's ownership.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// The attribute changes of one `setattr`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

/// A file opened for the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// The application asked for `O_DIRECT`: bypass the kernel's page cache for it.
    pub direct_io: bool,
}

/// An open file or directory.
pub struct Handle {
    pub inode: Arc<Inode>,
    file: OwnedFd,
    /// Set when `file` was opened with `O_DIRECT`.
    direct: Option<DirectFile>,
    /// The access mode and flags `file` was opened with (for the buffered fallback).
    flags: i32,
    /// Serializes seek + getdents on a directory stream.
    dir_pos: Mutex<()>,
}

impl Handle {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

pub struct PassthroughFs {
    backing: PathBuf,
    inodes: InodeTable,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// `/proc/self/fd`, to reopen `O_PATH` fds with real access modes.
    proc_fds: OwnedFd,
    pub stats: FsStats,
    pub ttl: Duration,
    /// Whether a capture session runs; every mutating operation passes through it.
    gate: CaptureGate<CaptureSession>,
    /// Serializes starting and stopping sessions; holds the application's latency
    /// totals from when the running session started.
    capture_ctl: Mutex<Option<LatencyTotals>>,
    /// Namespace operations hold it shared; a stop holds it exclusively from just
    /// before the validity point until the image's metadata is read, so that no rename
    /// lends an entry another inode's metadata, without the walk lengthening the stop.
    ns_freeze: RwLock<()>,
    /// Pause points for race tests.
    pub hooks: Arc<Hooks>,
}

/// A session stopped at its validity point, with the namespace frozen until
/// [`Stopped::validity_point`] has read the metadata every image entry gets.
pub struct Stopped<'a> {
    session: Arc<CaptureSession>,
    /// The validity point.
    pub at: SystemTime,
    pub progress: crate::session::Progress,
    _frozen: parking_lot::RwLockWriteGuard<'a, ()>,
    _ctl: parking_lot::MutexGuard<'a, Option<LatencyTotals>>,
}

impl std::fmt::Debug for Stopped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stopped")
            .field("at", &self.at)
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

impl Stopped<'_> {
    /// Reads the source metadata of every image entry (the namespace is as it was at the
    /// validity point: namespace operations wait until this returns) and ends the stop.
    pub fn validity_point(self) -> Result<ValidityPoint, CaptureError> {
        self.session.close_image_files();
        let entries = self
            .session
            .collect_metadata()
            .map_err(CaptureError::Aborted)?;
        Ok(ValidityPoint {
            at: self.at,
            progress: self.progress,
            entries,
        })
    }
}

/// A namespace operation's way in: the session's namespace lock (taken first, so that a
/// stop holding it while it drains the gate cannot deadlock with us) and the gate pass.
struct NamespacePass<'a> {
    pass: Pass<'a, CaptureSession>,
    _ns: Option<NamespaceGuard>,
    _unfrozen: parking_lot::RwLockReadGuard<'a, ()>,
}

impl NamespacePass<'_> {
    fn session(&self) -> Option<&CaptureSession> {
        self.pass.session.as_deref()
    }
}

/// Open flags the backing file must not get: creation is explicit, appends use the
/// kernel's offsets (so mirrored writes know where they landed), `O_DIRECT` is added back
/// only by `open_for_io` (whose callers handle its alignment), proc magic links must be
/// followed, and a truncation goes through `truncate` (so a running session sees it),
/// never through the backing `open`.
const STRIPPED_OPEN_FLAGS: i32 = libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOCTTY
    | libc::O_APPEND
    | libc::O_DIRECT
    | libc::O_NOFOLLOW
    | libc::O_TRUNC;

impl PassthroughFs {
    /// Serves `backing`. The kernel has already applied the application's umask to every
    /// mode it sends; the threads that create entries drop their own (see
    /// `FsCredentials::assume`), and the process umask stays as it was.
    pub fn new(backing: &Path) -> io::Result<PassthroughFs> {
        let root_path = CString::new(backing.as_os_str().as_bytes())?;
        let root = sys::openat(
            libc::AT_FDCWD,
            &root_path,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(io::Error::from)?;
        let st = sys::fstat_path(root.as_fd()).map_err(io::Error::from)?;
        let proc_fds = sys::openat(
            libc::AT_FDCWD,
            c"/proc/self/fd",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(io::Error::from)?;
        Ok(PassthroughFs {
            backing: backing.to_path_buf(),
            inodes: InodeTable::new(root, &st),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            proc_fds,
            stats: FsStats::default(),
            ttl: Duration::from_secs(1),
            gate: CaptureGate::new(),
            capture_ctl: Mutex::new(None),
            ns_freeze: RwLock::new(()),
            hooks: Arc::new(Hooks::default()),
        })
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    pub fn inodes(&self) -> &InodeTable {
        &self.inodes
    }

    pub fn open_handles(&self) -> usize {
        self.handles.read().len()
    }

    /// Starts copying the whole tree into the empty directory `image` while mirroring
    /// writes (see `session.rs`). At most one session runs per mount.
    pub fn start_capture(
        &self,
        image: &Path,
        options: SessionOptions,
    ) -> Result<Arc<CaptureSession>, CaptureError> {
        let mut ctl = self.capture_ctl.lock();
        if self.gate.peek().is_some() {
            return Err(CaptureError::SessionRunning);
        }
        let session = Arc::new(CaptureSession::new(
            &self.backing,
            image,
            options,
            self.hooks.clone(),
            self.stats.latency.clone(),
        )?);
        // Namespace operations find the whole tree unwalked until the walk brings it
        // into the image.
        session.begin_walk();
        let ns = session.namespace();
        // From here on every operation sees the session.
        self.gate.switch(Some(session.clone()));
        drop(ns);
        *ctl = Some(self.stats.latency.totals());
        session.start_copier();
        if let Err(reason) = session.walk() {
            session.abort(reason.clone());
            self.end_session(&session, &mut ctl);
            return Err(CaptureError::Aborted(reason));
        }
        Ok(session)
    }

    /// The running session, if any.
    pub fn capture(&self) -> Option<Arc<CaptureSession>> {
        self.gate.peek()
    }

    /// Stops the session at this instant (the validity point): once this returns every
    /// mirrored write has landed in the image and no later one will. Refused with
    /// `NotCopied` while any copy work is pending (the session keeps running: wait for
    /// the copy phase again and retry); an aborted session is ended. The namespace stays
    /// frozen until the returned `Stopped` has read the image's metadata.
    pub fn stop_capture(&self) -> Result<Stopped<'_>, CaptureError> {
        let mut ctl = self.capture_ctl.lock();
        let session = self.gate.peek().ok_or(CaptureError::NoSession)?;
        let frozen = self.ns_freeze.write();
        let ns = session.namespace();
        // Under the namespace lock no late work can arrive: what is pending now is all.
        if let Some(reason) = session.error() {
            drop((ns, frozen));
            self.end_session(&session, &mut ctl);
            return Err(CaptureError::Aborted(reason));
        }
        if !session.is_copied() {
            return Err(CaptureError::NotCopied(session.files_pending()));
        }
        self.gate.switch(None);
        self.latency_window_closes(&mut ctl);
        let stopped = session.mark_stopped();
        drop(ns);
        session.join_copiers();
        match stopped {
            Ok((at, progress)) => Ok(Stopped {
                session,
                at,
                progress,
                _frozen: frozen,
                _ctl: ctl,
            }),
            Err(e) => Err(e),
        }
    }

    /// Ends the session without a validity point (the client went away, or a failure).
    /// When this returns no copier thread of it is left.
    pub fn abort_capture(&self, reason: AbortReason) {
        let mut ctl = self.capture_ctl.lock();
        if let Some(session) = self.gate.peek() {
            session.abort(reason);
            self.end_session(&session, &mut ctl);
        }
    }

    fn end_session(&self, session: &CaptureSession, ctl: &mut Option<LatencyTotals>) {
        debug_assert!(session.phase() == Phase::Aborted);
        self.gate.switch(None);
        self.latency_window_closes(ctl);
        session.join_copiers();
    }

    /// The application's latency while a session ran stays out of the baseline the
    /// next session's `--throttle auto` budget comes from.
    fn latency_window_closes(&self, ctl: &mut Option<LatencyTotals>) {
        if let Some(start) = ctl.take() {
            self.stats.latency.session_ended(&start);
        }
    }

    fn enter_namespace(&self) -> NamespacePass<'_> {
        let unfrozen = self.ns_freeze.read();
        loop {
            let peeked = self.gate.peek();
            let ns = peeked.as_ref().map(|s| s.namespace());
            let pass = self.gate.enter();
            let locked_right = match (&peeked, &pass.session) {
                (_, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, Some(_)) => false,
            };
            if locked_right {
                return NamespacePass {
                    pass,
                    _ns: ns,
                    _unfrozen: unfrozen,
                };
            }
        }
    }

    /// Path of an inode relative to the backing root, or None once it has no name.
    fn rel_path(&self, inode: &Inode) -> Option<PathBuf> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", inode.fd().as_raw_fd())).ok()?;
        if link.as_os_str().as_bytes().ends_with(b" (deleted)") && !link.exists() {
            return None;
        }
        link.strip_prefix(&self.backing).ok().map(Path::to_path_buf)
    }

    fn child_rel(&self, parent: &Inode, name: &OsStr) -> Option<PathBuf> {
        self.rel_path(parent).map(|p| p.join(name))
    }

    fn inode(&self, id: u64) -> FsResult<Arc<Inode>> {
        self.inodes.get(id).ok_or(FsError::UnknownInode(id))
    }

    pub fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles
            .read()
            .get(&fh)
            .cloned()
            .ok_or(FsError::UnknownHandle(fh))
    }

    fn add_handle(&self, inode: Arc<Inode>, file: OwnedFd) -> u64 {
        self.add_file_handle(inode, file, 0, false)
    }

    fn add_file_handle(&self, inode: Arc<Inode>, file: OwnedFd, flags: i32, direct: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(Handle {
            inode,
            file,
            direct: direct.then(DirectFile::new),
            // Reopening must never truncate again.
            flags: flags & !(libc::O_TRUNC | STRIPPED_OPEN_FLAGS),
            dir_pos: Mutex::new(()),
        });
        self.handles.write().insert(fh, handle);
        fh
    }

    /// The `/proc/self/fd` name of an fd, to reopen or to name it for path-only calls.
    fn proc_name(fd: BorrowedFd<'_>) -> CString {
        CString::new(fd.as_raw_fd().to_string()).expect("digits have no NUL")
    }

    /// Opens the inode for I/O with `flags` (an `O_PATH` fd cannot read or write).
    fn reopen(&self, inode: &Inode, flags: i32) -> FsResult<OwnedFd> {
        let name = Self::proc_name(inode.fd());
        Ok(sys::openat(
            self.proc_fds.as_raw_fd(),
            &name,
            flags & !STRIPPED_OPEN_FLAGS,
            0,
        )?)
    }

    fn attr(&self, inode: &Inode, st: &libc::stat) -> FileAttr {
        attr_from_stat(inode.id, st)
    }

    fn stat_inode(&self, inode: &Inode) -> FsResult<FileAttr> {
        let st = sys::fstat_path(inode.fd())?;
        Ok(self.attr(inode, &st))
    }

    /// Looks `name` up in `parent` and records one kernel reference to it.
    fn lookup_in(&self, parent: &Inode, name: &CStr) -> FsResult<FileAttr> {
        self.lookup_stat(parent, name).map(|(attr, _)| attr)
    }

    fn lookup_stat(&self, parent: &Inode, name: &CStr) -> FsResult<(FileAttr, libc::stat)> {
        let fd = sys::openat(
            parent.fd().as_raw_fd(),
            name,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        )?;
        let st = sys::fstat_path(fd.as_fd())?;
        let inode = self.inodes.remember(fd, &st);
        Ok((self.attr(&inode, &st), st))
    }

    /// Looks up a just-created entry and mirrors its creation into a running session.
    fn created(&self, ns: &NamespacePass<'_>, parent: &Inode, name: &CStr) -> FsResult<FileAttr> {
        let (attr, st) = self.lookup_stat(parent, name)?;
        self.mirror_created(ns, parent, name, &st);
        Ok(attr)
    }

    fn mirror_created(&self, ns: &NamespacePass<'_>, parent: &Inode, name: &CStr, st: &libc::stat) {
        if let Some(session) = ns.session() {
            match self.child_rel(parent, OsStr::from_bytes(name.to_bytes())) {
                Some(rel) => session.created(&rel, st),
                None => session.unresolvable("a new entry"),
            }
        }
    }
}
