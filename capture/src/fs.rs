//! The passthrough filesystem's logic: every operation is carried out on the backing
//! directory through per-inode `O_PATH` fds, returning plain results so that it can be
//! exercised without a mount. `fuse.rs` adapts it to fuser's callbacks.

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
use crate::stats::FsStats;
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
    /// Serializes starting and stopping sessions.
    capture_ctl: Mutex<()>,
    /// Pause points for race tests.
    pub hooks: Arc<Hooks>,
}

/// A namespace operation's way in: the session's namespace lock (taken first, so that a
/// stop holding it while it drains the gate cannot deadlock with us) and the gate pass.
struct NamespacePass<'a> {
    pass: Pass<'a, CaptureSession>,
    _ns: Option<NamespaceGuard>,
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
            capture_ctl: Mutex::new(()),
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
        let _ctl = self.capture_ctl.lock();
        if self.gate.peek().is_some() {
            return Err(CaptureError::SessionRunning);
        }
        let session = Arc::new(CaptureSession::new(
            &self.backing,
            image,
            options,
            self.hooks.clone(),
        )?);
        let ns = session.namespace();
        // From here on every operation sees the session; namespace operations wait for
        // the skeleton to be built.
        self.gate.switch(Some(session.clone()));
        let built = session.adopt(Path::new(""), false);
        drop(ns);
        if let Err(reason) = built {
            session.abort(reason.clone());
            self.gate.switch(None);
            return Err(CaptureError::Aborted(reason));
        }
        // A second barrier: writes that looked for their file before it was registered
        // (and so took no range lock) are done before the copier reads anything.
        self.gate.switch(Some(session.clone()));
        session.start_copier();
        Ok(session)
    }

    /// The running session, if any.
    pub fn capture(&self) -> Option<Arc<CaptureSession>> {
        self.gate.peek()
    }

    /// Stops the session at this instant (the validity point): once this returns every
    /// mirrored write has landed in the image and no later one will. Refused with
    /// `NotCopied` while any copy work is pending (the session keeps running: wait for
    /// the copy phase again and retry); an aborted session is ended.
    pub fn stop_capture(&self) -> Result<ValidityPoint, CaptureError> {
        let _ctl = self.capture_ctl.lock();
        let session = self.gate.peek().ok_or(CaptureError::NoSession)?;
        let ns = session.namespace();
        // Under the namespace lock no late work can arrive: what is pending now is all.
        if let Some(reason) = session.error() {
            drop(ns);
            self.end_session(&session);
            return Err(CaptureError::Aborted(reason));
        }
        if !session.is_copied() {
            return Err(CaptureError::NotCopied(session.files_pending()));
        }
        let entries = match session.collect_metadata() {
            Ok(entries) => entries,
            Err(reason) => {
                session.abort(reason.clone());
                drop(ns);
                self.end_session(&session);
                return Err(CaptureError::Aborted(reason));
            }
        };
        self.gate.switch(None);
        let vp = session.mark_stopped(entries);
        drop(ns);
        session.join_copiers();
        vp
    }

    /// Ends the session without a validity point (the client went away, or a failure).
    /// When this returns no copier thread of it is left.
    pub fn abort_capture(&self, reason: AbortReason) {
        let _ctl = self.capture_ctl.lock();
        if let Some(session) = self.gate.peek() {
            session.abort(reason);
            self.end_session(&session);
        }
    }

    fn end_session(&self, session: &CaptureSession) {
        debug_assert!(session.phase() == Phase::Aborted);
        self.gate.switch(None);
        session.join_copiers();
    }

    fn enter_namespace(&self) -> NamespacePass<'_> {
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
                return NamespacePass { pass, _ns: ns };
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

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<FileAttr> {
        let parent = self.inode(parent)?;
        self.lookup_in(&parent, &cstr(name)?)
    }

    pub fn forget(&self, id: u64, n: u64) {
        self.inodes.forget(id, n);
    }

    pub fn getattr(&self, id: u64, fh: Option<u64>) -> FsResult<FileAttr> {
        if let Some(handle) = fh.and_then(|fh| self.handle(fh).ok()) {
            let st = sys::fstat_path(handle.fd())?;
            return Ok(self.attr(&handle.inode, &st));
        }
        self.stat_inode(&*self.inode(id)?)
    }

    pub fn setattr(&self, id: u64, fh: Option<u64>, set: SetAttr) -> FsResult<FileAttr> {
        let inode = self.inode(id)?;
        let name = Self::proc_name(inode.fd());
        let proc = self.proc_fds.as_raw_fd();
        if let Some(mode) = set.mode {
            // SAFETY: `name` is a NUL-terminated fd number below /proc/self/fd.
            cvt(unsafe { libc::fchmodat(proc, name.as_ptr(), mode & 0o7777, 0) })?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.unwrap_or(u32::MAX);
            let gid = set.gid.unwrap_or(u32::MAX);
            // SAFETY: chown of the inode the O_PATH fd refers to; EMPTY is NUL-terminated.
            cvt(unsafe {
                libc::fchownat(
                    inode.fd().as_raw_fd(),
                    sys::EMPTY.as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if let Some(size) = set.size {
            let handle = fh.and_then(|fh| self.handle(fh).ok());
            let reopened;
            let fd = match &handle {
                Some(h) => h.fd(),
                None => {
                    reopened = self.reopen(&inode, libc::O_WRONLY)?;
                    reopened.as_fd()
                }
            };
            self.truncate(&inode, fd, size)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = [timespec_of(set.atime), timespec_of(set.mtime)];
            if inode.kind == libc::S_IFLNK {
                // SAFETY: `times` holds two timespecs; EMPTY is NUL-terminated.
                cvt(unsafe {
                    libc::utimensat(
                        inode.fd().as_raw_fd(),
                        sys::EMPTY.as_ptr(),
                        times.as_ptr(),
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            } else {
                // SAFETY: as above, through the /proc/self/fd name of the inode.
                cvt(unsafe { libc::utimensat(proc, name.as_ptr(), times.as_ptr(), 0) })?;
            }
        }
        self.stat_inode(&inode)
    }

    /// Sets the size of `inode`'s file through `fd`, in a running session's view.
    fn truncate(&self, inode: &Inode, fd: BorrowedFd<'_>, size: u64) -> FsResult<()> {
        let truncate = || -> FsResult<()> {
            // SAFETY: ftruncate on a valid fd.
            cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) })?;
            Ok(())
        };
        let pass = self.gate.enter();
        match &pass.session {
            None => truncate(),
            Some(session) => session.resize(inode.key, truncate, || {
                sys::fstat_path(fd).ok().map(|st| st.st_size as u64)
            }),
        }
    }

    pub fn readlink(&self, id: u64) -> FsResult<Vec<u8>> {
        let inode = self.inode(id)?;
        Ok(sys::readlinkat(inode.fd())?)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        let ns = self.enter_namespace();
        let parent = self.inode(parent)?;
        let name = cstr(name)?;
        {
            let _creds = FsCredentials::assume(caller.uid, caller.gid);
            // SAFETY: `name` is NUL-terminated; the parent fd is valid.
            cvt(unsafe {
                libc::mknodat(
                    parent.fd().as_raw_fd(),
                    name.as_ptr(),
                    mode,
                    rdev as libc::dev_t,
                )
            })?;
        }
        self.created(&ns, &parent, &name)
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        let ns = self.enter_namespace();
        let parent = self.inode(parent)?;
        let name = cstr(name)?;
        {
            let _creds = FsCredentials::assume(caller.uid, caller.gid);
            // SAFETY: `name` is NUL-terminated; the parent fd is valid.
            cvt(unsafe { libc::mkdirat(parent.fd().as_raw_fd(), name.as_ptr(), mode) })?;
        }
        self.created(&ns, &parent, &name)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        let ns = self.enter_namespace();
        let parent = self.inode(parent)?;
        let name = cstr(name)?;
        let target = cstr(target.as_os_str())?;
        {
            let _creds = FsCredentials::assume(caller.uid, caller.gid);
            // SAFETY: both strings are NUL-terminated; the parent fd is valid.
            cvt(unsafe {
                libc::symlinkat(target.as_ptr(), parent.fd().as_raw_fd(), name.as_ptr())
            })?;
        }
        self.created(&ns, &parent, &name)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, 0)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, libc::AT_REMOVEDIR)
    }

    fn remove(&self, parent: u64, name: &OsStr, flags: i32) -> FsResult<()> {
        let ns = self.enter_namespace();
        let parent = self.inode(parent)?;
        let cname = cstr(name)?;
        let victim = ns
            .session()
            .and_then(|_| sys::fstatat(parent.fd(), &cname, libc::AT_SYMLINK_NOFOLLOW).ok())
            .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
            .map(|st| InodeKey::of(&st));
        let rel = ns.session().and_then(|_| self.child_rel(&parent, name));
        // SAFETY: `name` is NUL-terminated; the parent fd is valid.
        cvt(unsafe { libc::unlinkat(parent.fd().as_raw_fd(), cname.as_ptr(), flags) })?;
        if let Some(session) = ns.session() {
            match rel {
                Some(rel) => session.removed(&rel, victim, flags & libc::AT_REMOVEDIR != 0),
                None => session.unresolvable("a removed entry"),
            }
        }
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let ns = self.enter_namespace();
        let from = self.inode(parent)?;
        let to = self.inode(newparent)?;
        let cname = cstr(name)?;
        let cnewname = cstr(newname)?;
        // Some(None): the session runs but the paths could not be resolved.
        let mirror = ns.session().and_then(|_| {
            let key_at = |dir: &Inode, name: &CStr| {
                sys::fstatat(dir.fd(), name, libc::AT_SYMLINK_NOFOLLOW)
                    .ok()
                    .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
                    .map(|st| InodeKey::of(&st))
            };
            let replaced = key_at(&to, &cnewname);
            // Renaming a name onto another link of the same inode changes nothing.
            if replaced.is_some() && replaced == key_at(&from, &cname) {
                return None;
            }
            Some(
                self.child_rel(&from, name)
                    .zip(self.child_rel(&to, newname))
                    .map(|(a, b)| (a, b, replaced)),
            )
        });
        // SAFETY: both names are NUL-terminated; both parent fds are valid.
        cvt(unsafe {
            libc::renameat2(
                from.fd().as_raw_fd(),
                cname.as_ptr(),
                to.fd().as_raw_fd(),
                cnewname.as_ptr(),
                flags,
            )
        })?;
        match (ns.session(), mirror) {
            (Some(session), Some(Some((a, b, replaced)))) => {
                session.renamed(&a, &b, flags, replaced)
            }
            (Some(session), Some(None)) => session.unresolvable("a renamed entry"),
            _ => {}
        }
        Ok(())
    }

    pub fn link(&self, id: u64, newparent: u64, newname: &OsStr) -> FsResult<FileAttr> {
        let ns = self.enter_namespace();
        let inode = self.inode(id)?;
        let parent = self.inode(newparent)?;
        let newname = cstr(newname)?;
        let name = Self::proc_name(inode.fd());
        // SAFETY: names are NUL-terminated; the fds are valid. AT_SYMLINK_FOLLOW follows the
        // /proc magic link to the inode itself (never further).
        cvt(unsafe {
            libc::linkat(
                self.proc_fds.as_raw_fd(),
                name.as_ptr(),
                parent.fd().as_raw_fd(),
                newname.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })?;
        let attr = self.lookup_in(&parent, &newname)?;
        if let Some(session) = ns.session() {
            match self.child_rel(&parent, OsStr::from_bytes(newname.to_bytes())) {
                Some(rel) => session.linked(inode.key, &rel),
                None => session.unresolvable("a new hard link"),
            }
        }
        Ok(attr)
    }

    pub fn open(&self, id: u64, flags: i32) -> FsResult<Opened> {
        let inode = self.inode(id)?;
        let (file, direct) = self.open_for_io(inode.fd(), flags)?;
        // Only with FUSE_ATOMIC_O_TRUNC does the kernel leave the truncation to open.
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.truncate(&inode, file.as_fd(), 0)?;
        }
        let fh = self.add_file_handle(inode, file, flags, direct);
        Ok(Opened {
            fh,
            direct_io: flags & libc::O_DIRECT != 0,
        })
    }

    /// Opens what `fd` refers to for I/O with `flags`, with `O_DIRECT` on the backing file
    /// when the application asked for it and the backing filesystem supports it.
    fn open_for_io(&self, fd: BorrowedFd<'_>, flags: i32) -> FsResult<(OwnedFd, bool)> {
        let name = Self::proc_name(fd);
        let proc = self.proc_fds.as_raw_fd();
        let plain = flags & !STRIPPED_OPEN_FLAGS;
        if flags & libc::O_DIRECT != 0 {
            match sys::openat(proc, &name, plain | libc::O_DIRECT, 0) {
                Ok(file) => return Ok((file, true)),
                // The backing filesystem has no O_DIRECT (tmpfs): serve it buffered.
                Err(Errno::EINVAL) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok((sys::openat(proc, &name, plain, 0)?, false))
    }

    /// True when a request at `offset` of `len` bytes takes the direct path.
    fn goes_direct(handle: &Handle, offset: u64, len: usize) -> bool {
        handle.direct.is_some() && direct::aligned(offset, len)
    }

    /// The fd for buffered I/O on the handle's file: its own, or for a direct file, the
    /// buffered fallback for requests the direct path cannot take.
    fn buffered_fd<'h>(&self, handle: &'h Handle) -> FsResult<BorrowedFd<'h>> {
        match &handle.direct {
            None => Ok(handle.fd()),
            Some(d) => d.buffered(|| self.reopen(&handle.inode, handle.flags)),
        }
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(FileAttr, Opened)> {
        let ns = self.enter_namespace();
        let parent = self.inode(parent)?;
        let name = cstr(name)?;
        let (file, made) = self.create_or_open(&parent, &name, mode, flags, caller)?;
        let path_fd = sys::openat(
            self.proc_fds.as_raw_fd(),
            &Self::proc_name(file.as_fd()),
            libc::O_PATH,
            0,
        )?;
        let mut st = sys::fstat_path(path_fd.as_fd())?;
        let inode = self.inodes.remember(path_fd, &st);
        if made {
            self.mirror_created(&ns, &parent, &name, &st);
        } else if flags & libc::O_TRUNC != 0 {
            // An existing file: its truncation is a size change the session must see.
            self.truncate(&inode, file.as_fd(), 0)?;
            st = sys::fstat_path(inode.fd())?;
        }
        let attr = self.attr(&inode, &st);
        drop(ns);
        let (file, direct) = if flags & libc::O_DIRECT != 0 {
            self.open_for_io(file.as_fd(), flags & !libc::O_TRUNC)?
        } else {
            (file, false)
        };
        let fh = self.add_file_handle(inode, file, flags, direct);
        Ok((
            attr,
            Opened {
                fh,
                direct_io: flags & libc::O_DIRECT != 0,
            },
        ))
    }

    /// Creates `name` in `parent`, or (without `O_EXCL`) opens it if it exists; true when
    /// this call made it. Never truncates: see `create`.
    fn create_or_open(
        &self,
        parent: &Inode,
        name: &CStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(OwnedFd, bool)> {
        let plain = flags & !STRIPPED_OPEN_FLAGS;
        loop {
            let made = {
                let _creds = FsCredentials::assume(caller.uid, caller.gid);
                sys::openat(
                    parent.fd().as_raw_fd(),
                    name,
                    plain | libc::O_CREAT | libc::O_EXCL,
                    mode,
                )
            };
            match made {
                Ok(file) => return Ok((file, true)),
                Err(Errno::EEXIST) if flags & libc::O_EXCL == 0 => {}
                Err(e) => return Err(e.into()),
            }
            match sys::openat(parent.fd().as_raw_fd(), name, plain | libc::O_NOFOLLOW, 0) {
                Ok(file) => return Ok((file, false)),
                // Removed in between: try creating it again.
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let handle = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let direct = Self::goes_direct(&handle, offset, buf.len());
        let n = match direct.then(|| direct::pread(handle.fd(), &mut buf, offset)) {
            Some(Err(e)) if !direct::refused(e) => return Err(e.into()),
            Some(Ok(n)) => n,
            _ => sys::pread_full(self.buffered_fd(&handle)?, &mut buf, offset)?,
        };
        buf.truncate(n);
        self.stats.read_bytes(n);
        Ok(buf)
    }

    /// Writes `data` at `offset`. `kill_suidgid`: the kernel asks us to drop set-id bits,
    /// as a write by an unprivileged user does on a local filesystem.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> FsResult<usize> {
        let handle = self.handle(fh)?;
        let pass = self.gate.enter();
        self.hooks.fire("write.entered", offset);
        let n = match &pass.session {
            None => self.write_source(&handle, offset, data)?,
            Some(session) => session.write(handle.inode.key, offset, data, || {
                self.write_source(&handle, offset, data)
            })?,
        };
        drop(pass);
        if kill_suidgid {
            drop_setid_bits(handle.fd())?;
        }
        self.stats.written_bytes(n);
        Ok(n)
    }

    fn write_source(&self, handle: &Handle, offset: u64, data: &[u8]) -> FsResult<usize> {
        let direct = Self::goes_direct(handle, offset, data.len());
        Ok(
            match direct.then(|| direct::pwrite(handle.fd(), data, offset)) {
                Some(Err(e)) if !direct::refused(e) => return Err(e.into()),
                Some(Ok(n)) => n,
                _ => sys::pwrite_full(self.buffered_fd(handle)?, data, offset)?,
            },
        )
    }

    pub fn release(&self, fh: u64) {
        self.handles.write().remove(&fh);
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let fd = handle.fd().as_raw_fd();
        // SAFETY: fsync/fdatasync on a valid fd.
        cvt(unsafe {
            if datasync {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        })?;
        Ok(())
    }

    pub fn opendir(&self, id: u64) -> FsResult<u64> {
        let inode = self.inode(id)?;
        let file = self.reopen(&inode, libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(self.add_handle(inode, file))
    }

    /// Lists the directory from `offset` (0, or an offset returned with an earlier entry),
    /// handing each entry to `add` until it answers that its buffer is full.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> FsResult<()> {
        let handle = self.handle(fh)?;
        self.scan_dir(&handle, offset, |entry| {
            let kind = kind_of_dtype(entry.dtype)
                .or_else(|| self.kind_by_stat(&handle.inode, entry.name))
                .unwrap_or(FileType::RegularFile);
            Ok(add(
                entry.ino,
                entry.next_offset as u64,
                kind,
                OsStr::from_bytes(entry.name),
            ))
        })
    }

    /// Like `readdir`, with each entry's attributes; every entry handed out counts as a
    /// kernel lookup, except `.` and `..`, which the kernel does not take references on.
    pub fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, &OsStr, &FileAttr) -> bool,
    ) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let dir = handle.inode.clone();
        self.scan_dir(&handle, offset, |entry| {
            let name = OsStr::from_bytes(entry.name);
            if entry.name == b"." || entry.name == b".." {
                let st = sys::fstat_path(dir.fd())?;
                let mut attr = attr_from_stat(entry.ino, &st);
                attr.ino = INodeNo(entry.ino);
                return Ok(add(entry.next_offset as u64, name, &attr));
            }
            let attr = match self.lookup_in(&dir, &cstr(name)?) {
                Ok(attr) => attr,
                // Removed since getdents saw it: leave it out.
                Err(FsError::Os(Errno::ENOENT)) => return Ok(false),
                Err(e) => return Err(e),
            };
            let full = add(entry.next_offset as u64, name, &attr);
            if full {
                self.inodes.forget(attr.ino.0, 1);
            }
            Ok(full)
        })
    }

    fn scan_dir(
        &self,
        handle: &Handle,
        offset: u64,
        mut each: impl FnMut(&sys::RawDirEntry<'_>) -> FsResult<bool>,
    ) -> FsResult<()> {
        let _pos = handle.dir_pos.lock();
        let fd = handle.fd();
        // SAFETY: lseek on a valid directory fd, to a cookie getdents gave us (or 0).
        cvt(unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, libc::SEEK_SET) })?;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = sys::getdents(fd, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            for entry in sys::parse_dirents(&buf[..n]) {
                if each(&entry)? {
                    return Ok(());
                }
            }
        }
    }

    fn kind_by_stat(&self, dir: &Inode, name: &[u8]) -> Option<FileType> {
        let name = CString::new(name).ok()?;
        let st = sys::fstatat(dir.fd(), &name, libc::AT_SYMLINK_NOFOLLOW).ok()?;
        Some(kind_of_mode(st.st_mode))
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> FsResult<()> {
        self.fsync(fh, datasync)
    }

    pub fn statfs(&self, id: u64) -> FsResult<libc::statvfs> {
        let inode = self.inode(id)?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `st` is a valid out-pointer; fstatvfs works on O_PATH fds.
        cvt(unsafe { libc::fstatvfs(inode.fd().as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstatvfs succeeded and filled `st`.
        Ok(unsafe { st.assume_init() })
    }

    /// The `/proc/self/fd/N` path of an inode, for the path-only xattr calls.
    fn xattr_path(&self, inode: &Inode) -> FsResult<CString> {
        if inode.kind == libc::S_IFLNK {
            // The proc magic link of a symlink cannot name the symlink for xattr calls.
            return Err(FsError::Os(Errno::ENOTSUP));
        }
        Ok(CString::new(format!("/proc/self/fd/{}", inode.fd().as_raw_fd())).expect("no NUL"))
    }

    pub fn setxattr(&self, id: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let inode = self.inode(id)?;
        let path = self.xattr_path(&inode)?;
        let name = cstr(name)?;
        // SAFETY: strings are NUL-terminated; `value` is valid for its length.
        cvt(unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })?;
        Ok(())
    }

    /// The value of an xattr, or with `size == 0` only its length (as `Err(len)` in `Ok`).
    pub fn getxattr(&self, id: u64, name: &OsStr, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(id)?;
        let path = match self.xattr_path(&inode) {
            Ok(p) => p,
            Err(_) => return Err(FsError::Os(Errno::ENODATA)),
        };
        let name = cstr(name)?;
        xattr_call(size, |buf, len| {
            // SAFETY: `buf` is valid for `len` bytes (or null with len 0).
            unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf, len) }
        })
    }

    pub fn listxattr(&self, id: u64, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(id)?;
        let Ok(path) = self.xattr_path(&inode) else {
            return Ok(if size == 0 {
                XattrReply::Size(0)
            } else {
                XattrReply::Data(Vec::new())
            });
        };
        xattr_call(size, |buf, len| {
            // SAFETY: `buf` is valid for `len` bytes (or null with len 0).
            unsafe { libc::listxattr(path.as_ptr(), buf.cast(), len) }
        })
    }

    pub fn removexattr(&self, id: u64, name: &OsStr) -> FsResult<()> {
        let inode = self.inode(id)?;
        let path = self.xattr_path(&inode)?;
        let name = cstr(name)?;
        // SAFETY: both strings are NUL-terminated.
        cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })?;
        Ok(())
    }

    pub fn access(&self, id: u64, mask: i32, caller: Caller) -> FsResult<()> {
        let inode = self.inode(id)?;
        let name = Self::proc_name(inode.fd());
        let _creds = FsCredentials::assume(caller.uid, caller.gid);
        // SAFETY: `name` is NUL-terminated below /proc/self/fd.
        cvt(unsafe {
            libc::faccessat(
                self.proc_fds.as_raw_fd(),
                name.as_ptr(),
                mask,
                libc::AT_EACCESS,
            )
        })?;
        Ok(())
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let allocate = || -> FsResult<()> {
            // SAFETY: fallocate on a valid fd.
            cvt(unsafe {
                libc::fallocate(
                    handle.fd().as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            })?;
            Ok(())
        };
        let pass = self.gate.enter();
        match &pass.session {
            None => allocate(),
            Some(session) => session.fallocate(handle.inode.key, mode, offset, length, allocate),
        }
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let handle = self.handle(fh)?;
        // SAFETY: lseek on a valid fd. The backing fd's position is never used for I/O
        // (all I/O is positional), so moving it is harmless.
        Ok(cvt(unsafe {
            libc::lseek(handle.fd().as_raw_fd(), offset, whence)
        })?)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> FsResult<usize> {
        let input = self.handle(fh_in)?;
        let output = self.handle(fh_out)?;
        let copy = || -> FsResult<usize> {
            let mut off_in = offset_in as libc::loff_t;
            let mut off_out = offset_out as libc::loff_t;
            // SAFETY: valid fds and offset out-pointers.
            let n = cvt(unsafe {
                libc::copy_file_range(
                    input.fd().as_raw_fd(),
                    &mut off_in,
                    output.fd().as_raw_fd(),
                    &mut off_out,
                    len as usize,
                    0,
                )
            })?;
            Ok(n as usize)
        };
        let pass = self.gate.enter();
        let n = match &pass.session {
            None => copy()?,
            Some(session) => {
                // The output may be open write-only: read what landed through a reader of
                // its own (the output's range lock keeps it stable until mirrored).
                let readback = self.reopen(&output.inode, libc::O_RDONLY)?;
                session.write_from_source(
                    output.inode.key,
                    offset_out,
                    len,
                    readback.as_fd(),
                    copy,
                )?
            }
        };
        self.stats.written_bytes(n);
        Ok(n)
    }
}

/// An xattr answer: the length the caller must provide, or the bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

fn xattr_call(
    size: u32,
    call: impl Fn(*mut libc::c_void, usize) -> libc::ssize_t,
) -> FsResult<XattrReply> {
    if size == 0 {
        let n = cvt(call(std::ptr::null_mut(), 0))?;
        return Ok(XattrReply::Size(n as u32));
    }
    let mut buf = vec![0u8; size as usize];
    let n = cvt(call(buf.as_mut_ptr().cast(), buf.len()))?;
    buf.truncate(n as usize);
    Ok(XattrReply::Data(buf))
}

/// Clears set-user-id and set-group-id (when group-executable), as the kernel does on a
/// write by an unprivileged user.
fn drop_setid_bits(fd: BorrowedFd<'_>) -> FsResult<()> {
    let st = sys::fstat_path(fd)?;
    let mut mode = st.st_mode & 0o7777;
    let before = mode;
    mode &= !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        mode &= !libc::S_ISGID;
    }
    if mode != before {
        // SAFETY: fchmod on a valid, non-O_PATH fd.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })?;
    }
    Ok(())
}

fn timespec_of(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos() as i64;
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                libc::timespec {
                    tv_sec: sec as libc::time_t,
                    tv_nsec: nsec as libc::c_long,
                }
            }
        },
    }
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

pub fn kind_of_mode(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn kind_of_dtype(dtype: u8) -> Option<FileType> {
    Some(match dtype {
        libc::DT_DIR => FileType::Directory,
        libc::DT_REG => FileType::RegularFile,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => return None,
    })
}

pub fn attr_from_stat(id: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of_mode(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}
