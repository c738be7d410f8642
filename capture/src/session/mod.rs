//! The capture engine: a backup session copies every file under the mount into an image
//! directory while each write that lands on an already-copied range is mirrored into the
//! image, so that at the stop the image is the tree at one instant (DESIGN §3).
//!
//! The image keeps the source's namespace at all times: at start, a walk gives every
//! source entry its image entry (empty files, directories, symlinks, hard links), a batch
//! at a time under the namespace lock (`walk.rs` says why a tree half walked stays
//! exact); every namespace operation on walked entries is applied to both trees at the
//! same relative path. Renames of pending files and of directories with pending work below them
//! therefore need nothing special. File contents arrive by the copier (chunks under byte-
//! range locks) or by mirrored writes (on copied ranges), never both for one byte.
//!
//! A session moves through stages the caller drives: started (skeleton built, copiers
//! running) → copied (nothing pending: only mirroring left; work that arrives late, such
//! as a file renamed in from an excluded place, sends it back to copying) → stopped at the
//! validity point → finished by the caller. Anything the session cannot follow aborts it
//! with a typed [`AbortReason`]; nothing is ever silently skipped.
//!
//! # Lock order
//! Every path that holds more than one of these takes them in this order, never the
//! reverse (a thread may skip any of them):
//!
//! 1. `ns` (the namespace lock; held by namespace operations, the copier's name lookup,
//!    registration of late work, each batch of the session-start walk, and the stop);
//! 2. a file's byte-range lock (`FileCapture::lock`);
//! 3. `paths` (image names of tracked files);
//! 4. `files` (the capture state map; only ever held for a lookup or an insert);
//! 5. a file's `dest` slot, then its `copied` set;
//! 6. `queue` (the copier work queue);
//! 7. `unwalked` (what the session-start walk has left; only ever held for a lookup or
//!    an update).
//!
//! `registering` is apart: an operation on a file the session does not track holds it
//! (shared) for the whole operation and takes nothing else; registration of a file in the
//! middle of a session takes it exclusively, with none of the above held, as a barrier.

mod autothrottle;
mod copier;
mod mirror;
mod namespace;
mod pacing;
mod skeleton;
mod transfer;
mod validity;
mod walk;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::Instant;

use globset::{Glob, GlobSet, GlobSetBuilder};
use parking_lot::{ArcMutexGuard, Condvar, Mutex, RawMutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::hooks::Hooks;
use crate::inode::InodeKey;
use crate::rangelock::RangeLock;
use crate::ranges::CopiedRanges;
use crate::stats::AppLatency;

pub use pacing::{CopierPriority, background_thread};
pub use validity::{EntryMeta, ValidityPoint};

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
    /// CPU and I/O priority of the copier threads.
    #[serde(default)]
    pub priority: CopierPriority,
    /// Bytes of image writeback each copier thread keeps in flight before it waits for
    /// the oldest (0: leave writeback to the kernel, which sends it in bursts).
    #[serde(default = "default_writeback_window")]
    pub writeback_window: u64,
    /// Pace the copier by the application's latency on the mount (`--throttle auto`).
    #[serde(default)]
    pub throttle_auto: bool,
    /// The latency budget of `throttle_auto` in microseconds [default: twice the mean
    /// the application saw on this mount before].
    #[serde(default)]
    pub latency_budget_us: Option<u64>,
    /// Whether the copier clones file ranges (reflinks) instead of copying bytes.
    #[serde(default)]
    pub clone: CloneMode,
    /// Bytes the copier clones under one range lock (rounded down to the filesystem's
    /// block size). Cloning is metadata work, so this is larger than `chunk_size`, but
    /// XFS holds the whole file's I/O lock for a clone and first writes the range's
    /// dirty pages back: every writer into the file waits for one clone (see
    /// scripts/bench-clone: 4 MiB took 0.23 ms median, 0.8 ms p95 clean, 3.3 ms
    /// median dirty; 16 MiB 0.8 ms clean, 7.9 ms dirty).
    #[serde(default = "default_clone_chunk")]
    pub clone_chunk_size: u64,
}

fn default_writeback_window() -> u64 {
    8 << 20
}

fn default_open_image_files() -> u64 {
    256
}

fn default_clone_chunk() -> u64 {
    4 << 20
}

/// When the copier clones instead of copying: `auto` when the target is on the same
/// mounted filesystem as the backing directory and that filesystem clones (XFS with
/// reflink, btrfs), `always` (refuse to start otherwise), `never`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneMode {
    #[default]
    Auto,
    Always,
    Never,
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
            priority: CopierPriority::default(),
            writeback_window: default_writeback_window(),
            throttle_auto: false,
            latency_budget_us: None,
            clone: CloneMode::default(),
            clone_chunk_size: default_clone_chunk(),
        }
    }
}

/// Why a session ended without a validity point. Carried through the control protocol
/// to the client's exit code and the backup history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum AbortReason {
    #[error("the backup target is full ({0}); free space there or choose another target")]
    TargetFull(String),
    #[error("writing the backup target failed: {0}")]
    TargetIo(String),
    #[error("reading the data directory failed: {0}")]
    SourceIo(String),
    /// A change on the mount that the session could not follow into the image.
    #[error("a change on the mount could not be followed into the image: {0}")]
    Untrackable(String),
    #[error("internal error: {0}")]
    Panic(String),
    #[error("the client went away")]
    ClientGone,
    #[error("cancelled: {0}")]
    Cancelled(String),
}

impl AbortReason {
    /// An error on the image side: a full disk is told apart from other failures.
    pub fn target(what: impl std::fmt::Display, e: impl Into<io::Error>) -> AbortReason {
        let e: io::Error = e.into();
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                AbortReason::TargetFull(format!("{what}: {e}"))
            }
            _ => AbortReason::TargetIo(format!("{what}: {e}")),
        }
    }

    pub fn source(what: impl std::fmt::Display, e: impl Into<io::Error>) -> AbortReason {
        AbortReason::SourceIo(format!("{what}: {}", e.into()))
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
    #[error("--clone always was asked for, but {0}; use --clone auto or never to copy bytes")]
    CloneImpossible(String),
    #[error("bad --exclude pattern {pattern:?}: {error}")]
    BadExclude { pattern: String, error: String },
    #[error("the session was aborted: {0}")]
    Aborted(AbortReason),
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

/// The pace `--throttle auto` keeps.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Pace {
    pub bytes_per_sec: u64,
    pub budget_us: u64,
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
    /// The part of `bytes_copied` that was cloned (reflinked), not read and written.
    #[serde(default)]
    pub bytes_cloned: u64,
    /// The copier clones file ranges in this session (decided at its start).
    #[serde(default)]
    pub cloning: bool,
    /// With `--throttle auto`: the copier's current rate and the latency budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pace: Option<Pace>,
    pub current_file: Option<String>,
    pub error: Option<String>,
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
    /// Bumped when a gone file gets a name again and is copied afresh: a copier still
    /// working on the old copy gives up.
    generation: AtomicU64,
}

impl FileCapture {
    fn new(copied: CopiedRanges) -> FileCapture {
        FileCapture {
            lock: RangeLock::new(),
            copied: Mutex::new(copied),
            dest: Mutex::new(None),
            gone: AtomicBool::new(false),
            generation: AtomicU64::new(0),
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

/// Copy work: files waiting, and how many a copier is on right now.
#[derive(Default)]
struct WorkQueue {
    items: VecDeque<Pending>,
    busy: usize,
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
    /// See the module's lock order: the barrier between operations on untracked files
    /// and the registration of files in the middle of a session.
    registering: RwLock<()>,
    queue: Mutex<WorkQueue>,
    /// What the session-start walk has yet to bring into the image (see `walk.rs`);
    /// changed only under the namespace lock.
    unwalked: Mutex<BTreeSet<PathBuf>>,
    /// Copiers wait here for work.
    work_ready: Condvar,
    /// `wait_copied` waits here for the queue to drain (or the session to end).
    idle: Condvar,
    copiers: Mutex<Vec<JoinHandle<()>>>,
    error: Mutex<Option<AbortReason>>,
    started: Instant,
    files_total: AtomicU64,
    files_copied: AtomicU64,
    bytes_total: AtomicU64,
    bytes_copied: AtomicU64,
    bytes_mirrored: AtomicU64,
    bytes_cloned: AtomicU64,
    /// The block size clones are aligned to while the copier clones; 0 when it copies
    /// bytes (never cloning, or given up after the filesystem refused a clone).
    clone_block: AtomicU64,
    current: Mutex<Option<PathBuf>>,
    hooks: Arc<Hooks>,
    /// Image files held open (see `SessionOptions::max_open_image_files`).
    open_image_files: AtomicU64,
    /// The copier's pacing by application latency, if asked for.
    auto_throttle: Option<autothrottle::AutoThrottle>,
}

impl CaptureSession {
    /// A session that will copy `source_root` into the empty directory `image_root`.
    pub fn new(
        source_root: &Path,
        image_root: &Path,
        options: SessionOptions,
        hooks: Arc<Hooks>,
        latency: Arc<AppLatency>,
    ) -> Result<CaptureSession, CaptureError> {
        let exclude = options.exclude_set()?;
        let auto_throttle = options.throttle_auto.then(|| {
            autothrottle::AutoThrottle::new(
                latency,
                options
                    .latency_budget_us
                    .map(std::time::Duration::from_micros),
            )
        });
        let clone_block = match options.clone {
            CloneMode::Never => 0,
            CloneMode::Auto => crate::reflink::probe(source_root, image_root).unwrap_or(0),
            CloneMode::Always => crate::reflink::probe(source_root, image_root)
                .map_err(CaptureError::CloneImpossible)?,
        };
        Ok(CaptureSession {
            source_root: source_root.to_path_buf(),
            image_root: image_root.to_path_buf(),
            options,
            exclude,
            phase: AtomicU8::new(Phase::Copying as u8),
            files: RwLock::new(HashMap::new()),
            ns: Arc::new(Mutex::new(())),
            paths: RwLock::new(HashMap::new()),
            registering: RwLock::new(()),
            queue: Mutex::new(WorkQueue::default()),
            unwalked: Mutex::new(BTreeSet::new()),
            work_ready: Condvar::new(),
            idle: Condvar::new(),
            copiers: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            started: Instant::now(),
            files_total: AtomicU64::new(0),
            files_copied: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            bytes_mirrored: AtomicU64::new(0),
            bytes_cloned: AtomicU64::new(0),
            clone_block: AtomicU64::new(clone_block),
            current: Mutex::new(None),
            hooks,
            open_image_files: AtomicU64::new(0),
            auto_throttle,
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
            bytes_cloned: self.bytes_cloned.load(Relaxed),
            cloning: self.clone_block.load(Relaxed) > 0,
            pace: self.auto_throttle.as_ref().map(|t| t.pace()),
            current_file: self
                .current
                .lock()
                .as_ref()
                .map(|p| p.display().to_string()),
            error: self.error.lock().as_ref().map(|e| e.to_string()),
        }
    }

    /// Stops the session with `reason` recorded (the first one wins); the application
    /// never sees it. Copiers stop at their next chunk; `join_copiers` waits for them.
    pub fn abort(&self, reason: AbortReason) {
        let mut slot = self.error.lock();
        if slot.is_none() {
            tracing::error!(%reason, "backup session aborted");
            *slot = Some(reason);
        }
        self.phase.store(Phase::Aborted as u8, SeqCst);
        drop(slot);
        let mut queue = self.queue.lock();
        queue.items.clear();
        self.work_ready.notify_all();
        self.idle.notify_all();
    }

    pub fn error(&self) -> Option<AbortReason> {
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

    /// Runs session-side work after the application's operation is done: a panic in it
    /// aborts the session, and never turns the operation's own result into an error.
    fn guarded(&self, what: &str, work: impl FnOnce()) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
            self.abort(AbortReason::Panic(format!("a panic while {what}")));
        }
    }

    /// Files waiting to be copied or being copied now.
    pub fn files_pending(&self) -> u64 {
        let queue = self.queue.lock();
        (queue.items.len() + queue.busy) as u64
    }
}
