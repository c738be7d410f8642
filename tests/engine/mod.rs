//! Harness for capture-engine tests: a real FUSE mount served by this test process (the
//! `capture` library) or, without a mount, the same filesystem driven by direct calls
//! (`direct.rs`); an image directory; and tree comparison.
#![allow(dead_code)]

pub mod direct;
#[path = "../common/io.rs"]
pub mod io;
#[path = "../common/xfs.rs"]
pub mod xfs;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use capture::session::{CaptureSession, Phase, SessionOptions, ValidityPoint};
use capture::{MountOptions, Mounted, PassthroughFs};

pub struct Rig {
    pub backing: PathBuf,
    /// Where the tree is seen: the mountpoint, or the backing directory without a mount.
    pub mnt: PathBuf,
    pub image: PathBuf,
    pub fs: Arc<PassthroughFs>,
    pub mounted: Option<Mounted>,
    /// Without a mount: the directory locking the kernel would do (`direct.rs`).
    pub dirs: std::sync::RwLock<()>,
    /// Gates a test holds threads at: released when the rig is dropped, so that a test
    /// that fails while a copier waits at one ends instead of hanging in the cleanup.
    pub gates: std::sync::Mutex<Vec<Arc<Gate>>>,
    /// The XFS the backing and image directories are on, for a rig that clones. Fields
    /// drop in this order: the filesystem (and its open backing files) first, then this
    /// is unmounted, then `dir` is removed.
    pub xfs: Option<xfs::Xfs>,
    pub dir: tempfile::TempDir,
}

/// Where a rig keeps its backing and image directories: `HOTBACKUP_TEST_FS=xfs` reruns
/// the engine's tests with both on a loop-mounted XFS, where the copier clones.
fn xfs_from_env() -> bool {
    std::env::var("HOTBACKUP_TEST_FS").is_ok_and(|v| v == "xfs")
}

/// A temp directory and, if `xfs`, an XFS mounted inside it; the directory to put the
/// backing and image directories in.
fn base(xfs: bool) -> (tempfile::TempDir, Option<xfs::Xfs>, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("hb-engine-")
        .tempdir()
        .unwrap();
    let xfs = xfs.then(|| xfs::Xfs::new(dir.path(), "1G"));
    let root = xfs.as_ref().map_or(dir.path(), |x| x.dir()).to_path_buf();
    (dir, xfs, root)
}

impl Rig {
    /// The filesystem without a mount: operations are direct calls (`direct::Direct`).
    pub fn unmounted() -> Rig {
        let (dir, xfs, root) = base(xfs_from_env());
        let backing = root.join("backing");
        let image = root.join("image");
        for d in [&backing, &image] {
            fs::create_dir(d).unwrap();
        }
        let fs = Arc::new(PassthroughFs::new(&fs::canonicalize(&backing).unwrap()).unwrap());
        Rig {
            xfs,
            dir,
            mnt: backing.clone(),
            backing,
            image,
            fs,
            mounted: None,
            dirs: Default::default(),
            gates: Default::default(),
        }
    }

    pub fn new() -> Rig {
        Rig::mounted(xfs_from_env())
    }

    /// A mounted rig whose backing and image directories are on one XFS (reflink=1).
    pub fn on_xfs() -> Rig {
        Rig::mounted(true)
    }

    fn mounted(on_xfs: bool) -> Rig {
        let (dir, xfs, root) = base(on_xfs);
        let backing = root.join("backing");
        let mnt = dir.path().join("mnt");
        let image = root.join("image");
        for d in [&backing, &mnt, &image] {
            fs::create_dir(d).unwrap();
        }
        let mounted = capture::mount(
            &backing,
            &mnt,
            &MountOptions {
                threads: 4,
                fsname: "hotbackup-test".into(),
                ..MountOptions::default()
            },
        )
        .expect("mount");
        Rig {
            xfs,
            dir,
            backing,
            mnt,
            image,
            fs: mounted.fs.clone(),
            mounted: Some(mounted),
            dirs: Default::default(),
            gates: Default::default(),
        }
    }

    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn img(&self, rel: &str) -> PathBuf {
        self.image.join(rel)
    }

    /// On XFS, a test's `chunk_size` is the clone chunk too (unless it set one), so
    /// that its pause points at chunk offsets are reached when the copier clones.
    pub fn start(&self, mut options: SessionOptions) -> Arc<CaptureSession> {
        if self.xfs.is_some()
            && options.clone_chunk_size == SessionOptions::default().clone_chunk_size
        {
            options.clone_chunk_size = options.chunk_size;
        }
        self.fs
            .start_capture(&self.image, options)
            .expect("start capture")
    }

    /// A gate released at the latest when the rig is dropped.
    pub fn gate(&self) -> Arc<Gate> {
        let gate = Gate::new();
        self.gates.lock().unwrap().push(gate.clone());
        gate
    }

    /// Waits for the copy phase, then stops: the validity point.
    pub fn finish(&self, session: &CaptureSession) -> ValidityPoint {
        let vp = loop {
            let phase = session.wait_copied(Duration::from_secs(60));
            assert_eq!(
                phase,
                Phase::Copied,
                "copy did not finish: {:?}",
                session.error()
            );
            match self.fs.stop_capture() {
                // Late work arrived between the wait and the stop: copy it first.
                Err(capture::session::CaptureError::NotCopied(_)) => continue,
                other => {
                    break other
                        .and_then(|stopped| stopped.validity_point())
                        .expect("stop capture");
                }
            }
        };
        vp.apply_metadata(&self.image).expect("apply metadata");
        vp
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.fs.hooks.clear();
        for gate in self.gates.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            gate.release();
        }
        self.fs
            .abort_capture(capture::session::AbortReason::Cancelled("test over".into()));
        if let Some(mounted) = &mut self.mounted {
            let _ = mounted.unmount(true);
        }
    }
}

/// Removes everything below `root`, keeping `root`.
pub fn empty_dir(root: &Path) {
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
}

/// Every entry below `root` with its kind, size, mode, link target and content digest.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    tree_without(root, None)
}

/// Like `tree`, leaving out the top-level entry `excluded` (an excluded place of the
/// session). A file's link count is the number of its names in what is compared, as the
/// image (which has no excluded places) counts them.
pub fn tree_without(root: &Path, excluded: Option<&str>) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<PathBuf, u64> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if excluded.is_some_and(|x| rel.starts_with(x)) {
                continue;
            }
            let m = fs::symlink_metadata(&path).unwrap();
            let meta = format!(
                "{:o} {}:{} mtime={}.{:09}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec()
            );
            let desc = if m.is_dir() {
                stack.push(path.clone());
                format!("dir {meta}")
            } else if m.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                format!("symlink {meta} -> {}", target.display())
            } else if m.is_file() {
                let data = fs::read(&path).unwrap();
                inodes.insert(rel.clone(), m.ino());
                format!("file {meta} size={} {}", m.len(), digest(&data))
            } else {
                continue; // fifos and sockets are not captured
            };
            out.insert(rel, desc);
        }
    }
    for (rel, ino) in &inodes {
        let names = inodes.values().filter(|i| *i == ino).count();
        if let Some(desc) = out.get_mut(rel) {
            *desc = desc.replacen(" size=", &format!(" nlink={names} size="), 1);
        }
    }
    out
}

pub fn digest(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Where two files' bytes differ, as ranges (for failure messages).
fn byte_diff(want: &Path, got: &Path) -> String {
    let (Ok(a), Ok(b)) = (fs::read(want), fs::read(got)) else {
        return String::new();
    };
    let mut out = String::new();
    let mut i = 0;
    let n = a.len().max(b.len());
    while i < n {
        if a.get(i) != b.get(i) {
            let start = i;
            while i < n && a.get(i) != b.get(i) {
                i += 1;
            }
            out += &format!(
                "  bytes {start}..{i} differ (want {:?}.., got {:?}..)\n",
                a.get(start),
                b.get(start)
            );
        }
        i += 1;
    }
    out
}

/// Asserts the image equals `expected` (a tree snapshot of the source at the stop).
pub fn assert_image_is(rig: &Rig, expected: &BTreeMap<PathBuf, String>) {
    let got = tree(&rig.image);
    if &got != expected {
        let mut diff = String::new();
        for (k, v) in expected {
            match got.get(k) {
                None => diff += &format!("missing in image: {} ({v})\n", k.display()),
                Some(g) if g != v => {
                    diff += &format!("differs: {}\n  want {v}\n  got  {g}\n", k.display());
                    diff += &byte_diff(&rig.mnt.join(k), &rig.image.join(k));
                    let backing = byte_diff(&rig.mnt.join(k), &rig.backing.join(k));
                    if !backing.is_empty() {
                        diff +=
                            &format!("  and the backing file differs from the mount:\n{backing}");
                    }
                }
                _ => {}
            }
        }
        for (k, v) in &got {
            if !expected.contains_key(k) {
                diff += &format!("extra in image: {} ({v})\n", k.display());
            }
        }
        panic!("image differs from the tree at the validity point:\n{diff}");
    }
}

/// Holds a thread at a hook point until the test releases it.
pub struct Gate {
    state: std::sync::Mutex<(bool, bool)>, // (arrived, released)
    cv: std::sync::Condvar,
}

impl Gate {
    pub fn new() -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate {
            state: std::sync::Mutex::new((false, false)),
            cv: std::sync::Condvar::new(),
        })
    }
    pub fn hold(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        self.cv.notify_all();
        while !s.1 {
            s = self.cv.wait(s).unwrap();
        }
    }
    pub fn wait_arrived(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.0 {
            s = self
                .cv
                .wait_timeout(s, std::time::Duration::from_secs(10))
                .unwrap()
                .0;
        }
    }
    /// Like `wait_arrived`, giving up after `limit`; true if the thread arrived.
    pub fn arrived_within(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut s = self.state.lock().unwrap();
        while !s.0 {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            s = self.cv.wait_timeout(s, deadline - now).unwrap().0;
        }
        true
    }
    pub fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

pub fn hold_at(rig: &Rig, point: &'static str, at: u64) -> std::sync::Arc<Gate> {
    let gate = rig.gate();
    let g = gate.clone();
    let once = std::sync::atomic::AtomicBool::new(false);
    rig.fs.hooks.set(
        point,
        std::sync::Arc::new(move |_, off| {
            if off == at && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                g.hold();
            }
        }),
    );
    gate
}

/// Runs `f` on a thread and reports whether it finished within `wait`.
pub fn blocked_for<T: Send + 'static>(
    wait: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> (bool, std::thread::JoinHandle<T>) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let handle = std::thread::spawn(move || {
        let r = f();
        d.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    });
    std::thread::sleep(wait);
    (!done.load(std::sync::atomic::Ordering::SeqCst), handle)
}
