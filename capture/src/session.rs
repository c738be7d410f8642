//! The capture engine: a backup session copies every file under the mount into an image
//! directory while each write that lands on an already-copied range is mirrored into the
//! image, so that at `stop` the image is the tree at one instant (DESIGN §3).
//!
//! The image keeps the source's namespace at all times: at start, under the namespace
//! lock, every source entry gets its image entry (empty files, directories, symlinks, hard
//! links); from then on every namespace operation is applied to both trees at the same
//! relative path. Renames of pending files and of directories with pending work below them
//! therefore need nothing special. File contents arrive by the copier (chunks under byte-
//! range locks) or by mirrored writes (on copied ranges), never both for one byte.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant, SystemTime};

use globset::{Glob, GlobSet, GlobSetBuilder};
use parking_lot::{ArcMutexGuard, Condvar, Mutex, RawMutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::hooks::Hooks;
use crate::inode::InodeKey;
use crate::rangelock::{RangeLock, TO_END};
use crate::ranges::CopiedRanges;
use crate::sys::{self, Errno, cvt};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionOptions {
    /// Copier threads.
    pub parallel: usize,
    /// Copier bandwidth limit; mirroring is never slowed.
    pub throttle_bytes_per_sec: Option<u64>,
    /// Globs (relative to the mount root) of entries to leave out of the image.
    pub exclude: Vec<String>,
    /// Bytes the copier moves under one range lock.
    pub chunk_size: u64,
    /// Image files kept open (a datadir may have many thousands); past this the copier
    /// closes the ones it finished, and mirroring reopens them by name when needed.
    #[serde(default = "default_open_image_files")]
    pub max_open_image_files: u64,
}

fn default_open_image_files() -> u64 {
    256
}

impl SessionOptions {
    /// Checks the options without starting anything.
    pub fn validate(&self) -> Result<(), CaptureError> {
        self.exclude_set().map(|_| ())
    }

    fn exclude_set(&self) -> Result<GlobSet, CaptureError> {
        let mut globs = GlobSetBuilder::new();
        for pattern in &self.exclude {
            let glob = Glob::new(pattern).map_err(|e| CaptureError::BadExclude {
                pattern: pattern.clone(),
                error: e.to_string(),
            })?;
            globs.add(glob);
        }
        globs.build().map_err(|e| CaptureError::BadExclude {
            pattern: self.exclude.join(" "),
            error: e.to_string(),
        })
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            parallel: 2,
            throttle_bytes_per_sec: None,
            exclude: Vec::new(),
            // A write into the chunk being copied waits for it: small chunks keep that
            // wait short (1 MiB is read and written in about a millisecond here).
            chunk_size: 1 << 20,
            max_open_image_files: default_open_image_files(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("a backup session is already running on this mount; wait for it or cancel it")]
    SessionRunning,
    #[error("no backup session is running")]
    NoSession,
    #[error("the copy is not finished yet ({0} files left); stop once the copy phase is done")]
    NotCopied(u64),
    #[error("bad --exclude pattern {pattern:?}: {error}")]
    BadExclude { pattern: String, error: String },
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
    #[error("the session was aborted: {0}")]
    Aborted(String),
}

fn io_err(what: impl Into<String>, error: impl Into<io::Error>) -> CaptureError {
    CaptureError::Io {
        what: what.into(),
        error: error.into(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Copying,
    Copied,
    Stopped,
    Aborted,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Copying,
            1 => Phase::Copied,
            2 => Phase::Stopped,
            _ => Phase::Aborted,
        }
    }
}

/// Where a session stands, for progress displays.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub phase: Option<Phase>,
    pub files_total: u64,
    pub files_copied: u64,
    pub bytes_total: u64,
    pub bytes_copied: u64,
    pub bytes_mirrored: u64,
    pub current_file: Option<String>,
    pub error: Option<String>,
}

/// Metadata of one image entry as the source had it at the validity point.
#[derive(Clone, Debug)]
pub struct EntryMeta {
    pub rel: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

/// The instant the image represents.
#[derive(Clone, Debug)]
pub struct ValidityPoint {
    pub at: SystemTime,
    pub progress: Progress,
    pub entries: Vec<EntryMeta>,
}

impl ValidityPoint {
    /// Gives every image entry the mode, owner and times its source had at the validity
    /// point. Files and links first, then directories deepest first, so that nothing done
    /// later changes a directory's recorded times.
    pub fn apply_metadata(&self, image: &Path) -> io::Result<()> {
        let mut metas: Vec<&EntryMeta> = self.entries.iter().collect();
        metas.sort_by_key(|m| {
            let is_dir = m.mode & libc::S_IFMT == libc::S_IFDIR;
            (is_dir, std::cmp::Reverse(m.rel.components().count()))
        });
        for meta in metas {
            apply_meta(&image.join(&meta.rel), meta)?;
        }
        Ok(())
    }
}

fn apply_meta(path: &Path, meta: &EntryMeta) -> io::Result<()> {
    let is_link = meta.mode & libc::S_IFMT == libc::S_IFLNK;
    std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
    if !is_link {
        std::fs::set_permissions(
            path,
            std::os::unix::fs::PermissionsExt::from_mode(meta.mode & 0o7777),
        )?;
    }
    let times = [
        libc::timespec {
            tv_sec: meta.atime.0 as libc::time_t,
            tv_nsec: meta.atime.1 as libc::c_long,
        },
        libc::timespec {
            tv_sec: meta.mtime.0 as libc::time_t,
            tv_nsec: meta.mtime.1 as libc::c_long,
        },
    ];
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Capture state of one source file.
struct FileCapture {
    lock: RangeLock,
    copied: Mutex<CopiedRanges>,
    /// The image file, opened by the copier before it copies anything (so a mirrored
    /// write, which only happens on copied ranges, always finds it).
    dest: Mutex<Option<Arc<File>>>,
    /// No name of the file is left: stop mirroring it.
    gone: AtomicBool,
}

impl FileCapture {
    fn new(copied: CopiedRanges) -> FileCapture {
        FileCapture {
            lock: RangeLock::new(),
            copied: Mutex::new(copied),
            dest: Mutex::new(None),
            gone: AtomicBool::new(false),
        }
    }

    fn has_copied(&self) -> bool {
        self.copied.lock().intervals() > 0
    }
}

/// Held while a namespace operation and its mirroring run.
pub type NamespaceGuard = ArcMutexGuard<RawMutex, ()>;

struct Pending {
    key: InodeKey,
    size: u64,
    hot: bool,
}

pub struct CaptureSession {
    source_root: PathBuf,
    image_root: PathBuf,
    options: SessionOptions,
    exclude: GlobSet,
    phase: AtomicU8,
    files: RwLock<HashMap<InodeKey, Arc<FileCapture>>>,
    /// Serializes namespace operations with their mirroring (and with start and stop).
    ns: Arc<Mutex<()>>,
    /// Image-relative names of every tracked regular file; changed only together with
    /// the image's namespace, under the write lock.
    paths: RwLock<HashMap<InodeKey, Vec<PathBuf>>>,
    queue: Mutex<VecDeque<Pending>>,
    workers_left: Mutex<usize>,
    workers_done: Condvar,
    error: Mutex<Option<String>>,
    started: Instant,
    files_total: AtomicU64,
    files_copied: AtomicU64,
    bytes_total: AtomicU64,
    bytes_copied: AtomicU64,
    bytes_mirrored: AtomicU64,
    current: Mutex<Option<PathBuf>>,
    hooks: Arc<Hooks>,
    /// Image files held open (see `SessionOptions::max_open_image_files`).
    open_image_files: AtomicU64,
}

/// Names of append-only logs that are hot until the end: copied last, so that the copy
/// phases of all files end together and fewer bytes are mirrored.
fn is_hot(rel: &Path) -> bool {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.starts_with("ib_logfile")
        || name.starts_with("ib_redo")
        || name.starts_with("aria_log.")
        || name.contains("-bin.")
        || name.contains("-relay-bin.")
        || name == "ddl_recovery.log"
}

impl CaptureSession {
    /// A session that will copy `source_root` into the empty directory `image_root`.
    pub fn new(
        source_root: &Path,
        image_root: &Path,
        options: SessionOptions,
        hooks: Arc<Hooks>,
    ) -> Result<CaptureSession, CaptureError> {
        let exclude = options.exclude_set()?;
        Ok(CaptureSession {
            source_root: source_root.to_path_buf(),
            image_root: image_root.to_path_buf(),
            options,
            exclude,
            phase: AtomicU8::new(Phase::Copying as u8),
            files: RwLock::new(HashMap::new()),
            ns: Arc::new(Mutex::new(())),
            paths: RwLock::new(HashMap::new()),
            queue: Mutex::new(VecDeque::new()),
            workers_left: Mutex::new(0),
            workers_done: Condvar::new(),
            error: Mutex::new(None),
            started: Instant::now(),
            files_total: AtomicU64::new(0),
            files_copied: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            bytes_mirrored: AtomicU64::new(0),
            current: Mutex::new(None),
            hooks,
            open_image_files: AtomicU64::new(0),
        })
    }

    pub fn image_root(&self) -> &Path {
        &self.image_root
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(SeqCst))
    }

    fn live(&self) -> bool {
        matches!(self.phase(), Phase::Copying | Phase::Copied)
    }

    pub fn progress(&self) -> Progress {
        Progress {
            phase: Some(self.phase()),
            files_total: self.files_total.load(Relaxed),
            files_copied: self.files_copied.load(Relaxed),
            bytes_total: self.bytes_total.load(Relaxed),
            bytes_copied: self.bytes_copied.load(Relaxed),
            bytes_mirrored: self.bytes_mirrored.load(Relaxed),
            current_file: self
                .current
                .lock()
                .as_ref()
                .map(|p| p.display().to_string()),
            error: self.error.lock().clone(),
        }
    }

    /// Stops the session with `error` recorded; the application never sees it.
    pub fn abort(&self, error: impl Into<String>) {
        let error = error.into();
        let mut slot = self.error.lock();
        if slot.is_none() {
            tracing::error!(%error, "backup session aborted");
            *slot = Some(error);
        }
        self.phase.store(Phase::Aborted as u8, SeqCst);
        drop(slot);
        self.queue.lock().clear();
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().clone()
    }

    pub fn excluded(&self, rel: &Path) -> bool {
        !rel.as_os_str().is_empty()
            && rel
                .ancestors()
                .any(|a| !a.as_os_str().is_empty() && self.exclude.is_match(a))
    }

    /// Holds the namespace lock: namespace operations and their mirroring happen under it.
    pub fn namespace(&self) -> NamespaceGuard {
        self.ns.lock_arc()
    }

    fn file(&self, key: &InodeKey) -> Option<Arc<FileCapture>> {
        self.files.read().get(key).cloned()
    }

    fn image(&self, rel: &Path) -> PathBuf {
        self.image_root.join(rel)
    }

    fn source(&self, rel: &Path) -> PathBuf {
        self.source_root.join(rel)
    }

    // ----- building the image skeleton --------------------------------------------------

    /// Creates image entries for the source subtree at `rel` (the whole tree for ""),
    /// registering its regular files as pending copy work. Call under the namespace lock.
    pub fn adopt(&self, rel: &Path) -> Result<(), CaptureError> {
        let mut seen: HashMap<InodeKey, PathBuf> = HashMap::new();
        let mut pending = Vec::new();
        let mut stack = vec![rel.to_path_buf()];
        while let Some(dir_rel) = stack.pop() {
            let entries = std::fs::read_dir(self.source(&dir_rel))
                .map_err(|e| io_err(format!("listing {}", self.source(&dir_rel).display()), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| io_err("reading a directory", e))?;
                let child = dir_rel.join(entry.file_name());
                if self.excluded(&child) {
                    continue;
                }
                let st = match sys_lstat(&self.source(&child)) {
                    Ok(st) => st,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(io_err(format!("stat {}", child.display()), e)),
                };
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFDIR => {
                        mkdir(&self.image(&child))?;
                        stack.push(child);
                    }
                    libc::S_IFREG => {
                        let key = InodeKey::of(&st);
                        if let Some(first) = seen.get(&key) {
                            std::fs::hard_link(self.image(first), self.image(&child))
                                .map_err(|e| io_err(format!("linking {}", child.display()), e))?;
                            self.paths.write().entry(key).or_default().push(child);
                            continue;
                        }
                        File::create(self.image(&child)).map_err(|e| {
                            io_err(format!("creating {}", self.image(&child).display()), e)
                        })?;
                        seen.insert(key, child.clone());
                        self.files
                            .write()
                            .insert(key, Arc::new(FileCapture::new(CopiedRanges::new())));
                        self.paths
                            .write()
                            .entry(key)
                            .or_default()
                            .push(child.clone());
                        let size = st.st_size as u64;
                        self.files_total.fetch_add(1, Relaxed);
                        self.bytes_total.fetch_add(size, Relaxed);
                        pending.push(Pending {
                            key,
                            size,
                            hot: is_hot(&child),
                        });
                    }
                    libc::S_IFLNK => {
                        let target = std::fs::read_link(self.source(&child))
                            .map_err(|e| io_err(format!("readlink {}", child.display()), e))?;
                        std::os::unix::fs::symlink(&target, self.image(&child))
                            .map_err(|e| io_err(format!("symlink {}", child.display()), e))?;
                    }
                    // Sockets, fifos and devices are not data.
                    _ => {}
                }
            }
        }
        // Large, cold files first; hot logs last.
        pending.sort_by(|a, b| a.hot.cmp(&b.hot).then(b.size.cmp(&a.size)));
        self.queue.lock().extend(pending);
        Ok(())
    }

    // ----- the copier --------------------------------------------------------------------

    /// Starts the copier threads; they finish the copy phase on their own.
    pub fn start_copier(self: &Arc<Self>) {
        let workers = self.options.parallel.max(1);
        *self.workers_left.lock() = workers;
        for i in 0..workers {
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("copier-{i}"))
                .spawn(move || {
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.copy_loop()));
                    if outcome.is_err() {
                        me.abort("a copier thread panicked");
                    }
                    me.worker_finished();
                });
            if let Err(e) = spawned {
                self.abort(format!("could not start a copier thread: {e}"));
                self.worker_finished();
            }
        }
    }

    fn worker_finished(&self) {
        let mut left = self.workers_left.lock();
        *left -= 1;
        if *left == 0 {
            let _ = self.phase.compare_exchange(
                Phase::Copying as u8,
                Phase::Copied as u8,
                SeqCst,
                SeqCst,
            );
            self.workers_done.notify_all();
        }
    }

    /// Waits until the copy phase is over (copied or aborted), or `timeout` passes.
    pub fn wait_copied(&self, timeout: Duration) -> Phase {
        let mut left = self.workers_left.lock();
        if *left > 0 {
            self.workers_done.wait_for(&mut left, timeout);
        }
        self.phase()
    }

    fn copy_loop(&self) {
        let mut buf = vec![0u8; self.options.chunk_size as usize];
        loop {
            if !self.live() {
                return;
            }
            let Some(item) = self.queue.lock().pop_front() else {
                return;
            };
            if let Err(e) = self.copy_file(item.key, &mut buf) {
                self.abort(e.to_string());
                return;
            }
        }
    }

    /// Opens the source and image files of `key` by its current name.
    fn open_pair(
        &self,
        key: InodeKey,
        fc: &FileCapture,
    ) -> Result<Option<(File, Arc<File>)>, CaptureError> {
        // Under the namespace lock: a source rename and its image rename (and the names
        // recorded here) change together, so the name found is the file's current one.
        let _ns = self.ns.lock();
        let paths = self.paths.read();
        let Some(rel) = paths.get(&key).and_then(|v| v.first()) else {
            return Ok(None); // unlinked before its turn
        };
        let src = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.source(rel))
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("opening {}", rel.display()), e)),
        };
        let st = sys::fstat_path(src.as_fd()).map_err(|e| io_err("stat", e))?;
        if InodeKey::of(&st) != key {
            return Ok(None);
        }
        *self.current.lock() = Some(rel.clone());
        let mut dest_slot = fc.dest.lock();
        let dest = match &*dest_slot {
            Some(d) => d.clone(),
            None => {
                let d = Arc::new(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(self.image(rel))
                        .map_err(|e| io_err(format!("opening image file {}", rel.display()), e))?,
                );
                *dest_slot = Some(d.clone());
                self.open_image_files.fetch_add(1, Relaxed);
                d
            }
        };
        Ok(Some((src, dest)))
    }

    fn copy_file(&self, key: InodeKey, buf: &mut [u8]) -> Result<(), CaptureError> {
        let Some(fc) = self.file(&key) else {
            return Ok(());
        };
        self.hooks.fire("copier.before_file", 0);
        let Some((src, dest)) = self.open_pair(key, &fc)? else {
            self.files_copied.fetch_add(1, Relaxed);
            return Ok(());
        };
        let chunk = buf.len() as u64;
        let mut off = 0u64;
        let write_err = |e| io_err("writing the image", e);
        let read_err = |e| io_err("reading the source", e);
        // Whole chunks under their own range lock.
        loop {
            if !self.live() {
                return Ok(());
            }
            self.throttle(chunk);
            self.hooks.fire("copier.before_chunk", off);
            let guard = fc.lock.lock(off, off + chunk);
            match seek_data(src.as_fd(), off) {
                // No data from here on: the rest is the tail.
                Err(Errno::ENXIO) => break,
                Ok(data) if data >= off + chunk => {
                    // A whole hole: the image file is sparse there too.
                    fc.copied.lock().insert(off, off + chunk);
                    drop(guard);
                    off += chunk;
                    continue;
                }
                _ => {}
            }
            let n = sys::pread_full(src.as_fd(), buf, off).map_err(read_err)?;
            if (n as u64) < chunk {
                break;
            }
            self.hooks.fire("copier.chunk_read", off);
            sys::pwrite_full(dest.as_fd(), &buf[..n], off).map_err(write_err)?;
            fc.copied.lock().insert(off, off + n as u64);
            drop(guard);
            self.bytes_copied.fetch_add(n as u64, Relaxed);
            off += n as u64;
        }
        // The tail, locked to the end of any file: appends wait, then get mirrored.
        let _tail = fc.lock.lock(off, TO_END);
        self.hooks.fire("copier.tail", off);
        let tail_start = off;
        loop {
            let n = sys::pread_full(src.as_fd(), buf, off).map_err(read_err)?;
            if n == 0 {
                break;
            }
            sys::pwrite_full(dest.as_fd(), &buf[..n], off).map_err(write_err)?;
            self.bytes_copied.fetch_add(n as u64, Relaxed);
            off += n as u64;
        }
        let size = sys::fstat_path(src.as_fd()).map_err(read_err)?.st_size as u64;
        dest.set_len(size)
            .map_err(|e| io_err("sizing the image file", e))?;
        // Everything from where the tail began is in the image now (and, being locked to
        // the end, stays so): later writes anywhere there, not just appends, are mirrored.
        fc.copied.lock().set_tail(tail_start.min(size));
        self.hooks.fire("copier.done", size);
        self.files_copied.fetch_add(1, Relaxed);
        if self.open_image_files.load(Relaxed) > self.options.max_open_image_files
            && fc.dest.lock().take().is_some()
        {
            self.open_image_files.fetch_sub(1, Relaxed);
        }
        Ok(())
    }

    fn throttle(&self, next: u64) {
        let Some(rate) = self.options.throttle_bytes_per_sec.filter(|r| *r > 0) else {
            return;
        };
        let done = self.bytes_copied.load(Relaxed) + next;
        let due = Duration::from_secs_f64(done as f64 / rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }

    // ----- mirroring data ------------------------------------------------------------------

    /// Runs `write` (the source write of `data` at `offset`) under the range lock and
    /// mirrors what it wrote onto copied ranges. The application gets `write`'s result.
    pub fn write<E>(
        &self,
        key: InodeKey,
        offset: u64,
        data: &[u8],
        write: impl FnOnce() -> Result<usize, E>,
    ) -> Result<usize, E> {
        let Some(fc) = self.file(&key) else {
            return write();
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

    /// Runs session-side work after the application's operation is done: a panic in it
    /// aborts the session, and never turns the operation's own result into an error.
    fn guarded(&self, what: &str, work: impl FnOnce()) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
            self.abort(format!("internal error: a panic while {what}"));
        }
    }

    /// Like `write`, for writes whose data is only in the source afterwards
    /// (copy_file_range): the mirrored bytes are read back from `source`.
    pub fn write_from_source<E>(
        &self,
        key: InodeKey,
        offset: u64,
        len: u64,
        source: BorrowedFd<'_>,
        write: impl FnOnce() -> Result<usize, E>,
    ) -> Result<usize, E> {
        let Some(fc) = self.file(&key) else {
            return write();
        };
        let _range = fc.lock.lock(offset, offset + len);
        let n = write()?;
        if n > 0 && self.live() && !fc.gone.load(SeqCst) {
            let spans = fc.copied.lock().overlap(offset, offset + n as u64);
            if !spans.is_empty() {
                let mut data = vec![0u8; n];
                match sys::pread_full(source, &mut data, offset) {
                    Ok(got) => {
                        data.truncate(got);
                        self.mirror_spans(key, &fc, &spans, offset, &data);
                    }
                    Err(e) => self.abort(format!("reading back a copied range to mirror it: {e}")),
                }
            }
        }
        Ok(n)
    }

    /// The image file of `key`, reopened by its current name if it was closed. Names
    /// change together with the image (under the paths write lock), so the name read
    /// here names this file in the image.
    fn image_file(&self, key: InodeKey, fc: &FileCapture) -> Option<Arc<File>> {
        let mut slot = fc.dest.lock();
        if let Some(d) = &*slot {
            return Some(d.clone());
        }
        let paths = self.paths.read();
        let rel = paths.get(&key)?.first()?;
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
                self.abort(format!("reopening image file {}: {e}", rel.display()));
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
                    self.abort(format!(
                        "mirroring a write: short write ({n} of {} bytes)",
                        to - from
                    ));
                    return;
                }
                Err(e) => {
                    self.abort(format!("mirroring a write into the image: {e}"));
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
        let Some(fc) = self.file(&key) else {
            return op();
        };
        let _all = fc.lock.lock(0, TO_END);
        let r = op()?;
        if !self.live() || fc.gone.load(SeqCst) {
            return Ok(r);
        }
        let Some(size) = new_size() else {
            self.abort("could not read a file's size after a truncate");
            return Ok(r);
        };
        // The copied set stays as it is: bytes past the new end are zeros in the source
        // from now on, and the image file is cut below, so its zeros there match; and the
        // copier, which may already be past them, will not come back. Writes that regrow
        // the file into copied ranges are therefore mirrored, as they must be.
        let full = fc.copied.lock().covers(size, size.saturating_add(1));
        self.hooks.fire("resize", size);
        // A file the copier has not started has nothing in the image to cut.
        if let Some(dest) = fc.has_copied().then(|| self.image_file(key, &fc)).flatten() {
            let cur = dest.metadata().map(|m| m.len()).unwrap_or(0);
            if (full || cur > size)
                && let Err(e) = dest.set_len(size)
            {
                self.abort(format!("truncating an image file: {e}"));
            }
        }
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
        let Some(fc) = self.file(&key) else {
            return op();
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
        if !self.live() || fc.gone.load(SeqCst) {
            return Ok(());
        }
        let spans = fc.copied.lock().overlap(offset, offset.saturating_add(len));
        if spans.is_empty() {
            return Ok(());
        }
        let Some(dest) = self.image_file(key, &fc) else {
            return Ok(());
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
                self.abort(format!("mirroring fallocate into the image: {err}"));
                break;
            }
        }
        Ok(())
    }

    // ----- mirroring the namespace (call under `namespace()`) -----------------------------

    /// A new entry appeared at `rel` in the source (create, mkdir, symlink, mknod).
    pub fn created(&self, rel: &Path, st: &libc::stat) {
        self.guarded("mirroring a namespace change", || {
            self.created_inner(rel, st)
        });
    }

    fn created_inner(&self, rel: &Path, st: &libc::stat) {
        if !self.live() || self.excluded(rel) {
            return;
        }
        let r = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => mkdir(&self.image(rel)),
            libc::S_IFREG => self.created_file(rel, st),
            libc::S_IFLNK => std::fs::read_link(self.source(rel))
                .and_then(|t| std::os::unix::fs::symlink(t, self.image(rel)))
                .map_err(|e| io_err(format!("mirroring symlink {}", rel.display()), e)),
            _ => Ok(()),
        };
        if let Err(e) = r {
            self.abort(e.to_string());
        }
    }

    fn created_file(&self, rel: &Path, st: &libc::stat) -> Result<(), CaptureError> {
        let key = InodeKey::of(st);
        let mut paths = self.paths.write();
        let dest = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.image(rel))
            .map_err(|e| io_err(format!("mirroring create of {}", rel.display()), e))?;
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
        if !self.live() || self.excluded(new_rel) {
            return;
        }
        let mut paths = self.paths.write();
        let Some(existing) = paths.get(&key).and_then(|v| v.first()).cloned() else {
            return;
        };
        match std::fs::hard_link(self.image(&existing), self.image(new_rel)) {
            Ok(()) => paths.entry(key).or_default().push(new_rel.to_path_buf()),
            Err(e) => self.abort(format!("mirroring link {}: {e}", new_rel.display())),
        }
    }

    /// The entry at `rel` (a file `key`, or a directory) was removed from the source.
    pub fn removed(&self, rel: &Path, key: Option<InodeKey>, is_dir: bool) {
        self.guarded("mirroring a namespace change", || {
            self.removed_inner(rel, key, is_dir)
        });
    }

    fn removed_inner(&self, rel: &Path, key: Option<InodeKey>, is_dir: bool) {
        if !self.live() || self.excluded(rel) {
            return;
        }
        let mut paths = self.paths.write();
        let r = if is_dir {
            std::fs::remove_dir(self.image(rel))
        } else {
            std::fs::remove_file(self.image(rel))
        };
        if let Err(e) = r
            && e.kind() != io::ErrorKind::NotFound
        {
            self.abort(format!("mirroring removal of {}: {e}", rel.display()));
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
        let (from_out, to_out) = (self.excluded(from), self.excluded(to));
        if from_out && to_out {
            return;
        }
        let mut paths = self.paths.write();
        if from_out || to_out {
            // Moving across the exclusion boundary: the image follows by removing or
            // adopting the subtree.
            drop(paths);
            if from_out {
                if let Err(e) = self.adopt_entry(to) {
                    self.abort(e.to_string());
                }
            } else {
                self.forget_subtree(from);
            }
            return;
        }
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
            self.abort(format!(
                "mirroring rename of {} to {}: {e}",
                from.display(),
                to.display()
            ));
            return;
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if !exchange && let Some(victim) = replaced {
            self.drop_name(&mut paths, victim, to);
        }
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

    fn adopt_entry(&self, rel: &Path) -> Result<(), CaptureError> {
        let st = sys_lstat(&self.source(rel))
            .map_err(|e| io_err(format!("stat {}", rel.display()), e))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            mkdir(&self.image(rel))?;
            self.adopt(rel)
        } else if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            // A file moved in from an excluded place: copy it like any pending file.
            File::create(self.image(rel)).map_err(|e| io_err("creating an image file", e))?;
            let key = InodeKey::of(&st);
            self.files
                .write()
                .insert(key, Arc::new(FileCapture::new(CopiedRanges::new())));
            self.paths.write().insert(key, vec![rel.to_path_buf()]);
            self.files_total.fetch_add(1, Relaxed);
            self.bytes_total.fetch_add(st.st_size as u64, Relaxed);
            self.queue.lock().push_back(Pending {
                key,
                size: st.st_size as u64,
                hot: false,
            });
            Ok(())
        } else {
            self.created(rel, &st);
            Ok(())
        }
    }

    fn forget_subtree(&self, rel: &Path) {
        let mut paths = self.paths.write();
        let _ = std::fs::remove_dir_all(self.image(rel))
            .or_else(|_| std::fs::remove_file(self.image(rel)));
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

    // ----- the validity point ----------------------------------------------------------------

    /// Marks the validity point (the caller has switched the gate away under the
    /// namespace lock, so every mirrored write has landed and no more will) and records
    /// the metadata of every image entry as the source has it now.
    pub fn mark_stopped(&self) -> Result<ValidityPoint, CaptureError> {
        let at = SystemTime::now();
        if let Some(e) = self.error() {
            return Err(CaptureError::Aborted(e));
        }
        self.phase.store(Phase::Stopped as u8, SeqCst);
        let mut entries = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(dir) = stack.pop() {
            let list = std::fs::read_dir(self.image(&dir))
                .map_err(|e| io_err(format!("listing the image at {}", dir.display()), e))?;
            for entry in list {
                let entry = entry.map_err(|e| io_err("listing the image", e))?;
                let rel = dir.join(entry.file_name());
                let Ok(st) = sys_lstat(&self.source(&rel)) else {
                    continue;
                };
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    stack.push(rel.clone());
                }
                entries.push(EntryMeta {
                    rel,
                    mode: st.st_mode,
                    uid: st.st_uid,
                    gid: st.st_gid,
                    atime: (st.st_atime, st.st_atime_nsec),
                    mtime: (st.st_mtime, st.st_mtime_nsec),
                });
            }
        }
        if let Ok(st) = sys_lstat(&self.source_root) {
            entries.push(EntryMeta {
                rel: PathBuf::new(),
                mode: st.st_mode,
                uid: st.st_uid,
                gid: st.st_gid,
                atime: (st.st_atime, st.st_atime_nsec),
                mtime: (st.st_mtime, st.st_mtime_nsec),
            });
        }
        // Close the image files: the image is final.
        for fc in self.files.read().values() {
            fc.dest.lock().take();
        }
        self.open_image_files.store(0, Relaxed);
        Ok(ValidityPoint {
            at,
            progress: self.progress(),
            entries,
        })
    }
}

/// `p` with its leading `from` replaced by `to`, if it lies at or below `from`.
fn rebase(p: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    let rest = p.strip_prefix(from).ok()?;
    // `join("")` would append a trailing slash, which then fails on files.
    Some(if rest.as_os_str().is_empty() {
        to.to_path_buf()
    } else {
        to.join(rest)
    })
}

fn cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL")
}

fn sys_lstat(p: &Path) -> Result<libc::stat, Errno> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    sys::fstatat(
        // SAFETY: AT_FDCWD is a valid "directory fd" for *at calls with absolute paths.
        unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) },
        &c,
        libc::AT_SYMLINK_NOFOLLOW,
    )
}

fn mkdir(p: &Path) -> Result<(), CaptureError> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(
            format!("creating image directory {}", p.display()),
            e,
        )),
    }
}

fn seek_data(fd: BorrowedFd<'_>, off: u64) -> Result<u64, Errno> {
    // SAFETY: lseek on a valid fd; only this thread uses the copier's source fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    cvt(r).map(|v| v as u64)
}
