//! The session-start walk brings the tree into the image a batch at a time, releasing
//! the namespace lock between batches: namespace changes (create, write, rename across
//! directories, unlink, link, mkdir, rmdir, directory renames) land between its batches
//! and alongside them, on walked and unwalked places alike, and the image must still be
//! the tree at the validity point.

mod engine;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use capture::session::SessionOptions;
use engine::{Rig, assert_image_is, empty_dir, tree};

const DIRS: usize = 10;
const FILES_PER_DIR: usize = 120;
/// File names ops pick from: some exist, some do not yet.
const NAMES: usize = 200;
const SUBDIRS: usize = 3;

/// A small deterministic generator: each round is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A directory: top-level `dNN` or `mN`, or `dNN/sM` below one (only a few of the `m`
/// and `s` names exist at first, so that directories can be renamed onto free names).
fn dir(rng: &mut Rng) -> PathBuf {
    let top = match rng.below(4) {
        0 => PathBuf::from(format!("m{}", rng.below(4))),
        _ => PathBuf::from(format!("d{:02}", rng.below(DIRS))),
    };
    match rng.below(3) {
        0 => top.join(format!("s{}", rng.below(SUBDIRS + 3))),
        _ => top,
    }
}

fn file(rng: &mut Rng) -> PathBuf {
    dir(rng).join(format!("f{:03}", rng.below(NAMES)))
}

/// One random namespace change (or a write) through the mount; failures (a missing
/// source, a non-empty directory...) are part of the game: the tree at the stop is the
/// truth either way.
fn change(root: &Path, rng: &mut Rng) {
    let p = |rel: PathBuf| root.join(rel);
    let _ = match rng.below(10) {
        0 | 1 => fs::write(p(file(rng)), vec![rng.below(256) as u8; rng.below(9000)]),
        2 => OpenOptions::new()
            .write(true)
            .open(p(file(rng)))
            .and_then(|f| f.write_all_at(&[0xee; 700], rng.below(6000) as u64)),
        3 | 4 => fs::rename(p(file(rng)), p(file(rng))),
        5 => fs::remove_file(p(file(rng))),
        6 => fs::hard_link(p(file(rng)), p(file(rng))),
        7 => std::os::unix::fs::symlink("f000", p(file(rng))),
        _ => match rng.below(4) {
            0 => fs::create_dir(p(dir(rng))),
            1 => fs::remove_dir(p(dir(rng))),
            _ => fs::rename(p(dir(rng)), p(dir(rng))),
        },
    };
}

/// The starting tree, made in the backing directory (quicker than through the mount).
fn populate(backing: &Path, rng: &mut Rng) {
    for d in 0..DIRS {
        let top = backing.join(format!("d{d:02}"));
        for s in 0..SUBDIRS {
            fs::create_dir_all(top.join(format!("s{s}"))).unwrap();
        }
        for f in 0..FILES_PER_DIR {
            let name = format!("f{f:03}");
            let at = if f % 5 == 0 {
                top.join(format!("s{}", f % SUBDIRS)).join(name)
            } else {
                top.join(name)
            };
            fs::write(at, vec![(d + f) as u8; rng.below(5000)]).unwrap();
        }
    }
}

/// One round: changes between the walk's batches (from the walk's own thread, with the
/// namespace lock released) and from another thread all through the walk.
fn round(rig: &Rig, seed: u64) {
    empty_dir(&rig.backing);
    empty_dir(&rig.image);
    populate(&rig.backing, &mut Rng(seed));
    let batches = Arc::new(AtomicU64::new(0));
    let between = Arc::new(Mutex::new(Rng(seed ^ 0x9e37_79b9_7f4a_7c15)));
    {
        let (batches, between, mnt) = (batches.clone(), between.clone(), rig.mnt.clone());
        rig.fs.hooks.set(
            "walk.batch",
            Arc::new(move |_, _| {
                batches.fetch_add(1, SeqCst);
                let mut rng = between.lock().unwrap();
                for _ in 0..4 {
                    change(&mnt, &mut rng);
                }
            }),
        );
    }
    let walking = AtomicBool::new(true);
    let session = std::thread::scope(|scope| {
        let alongside = scope.spawn(|| {
            let mut rng = Rng(seed.wrapping_mul(31) | 1);
            let mut changes = 0u64;
            while walking.load(SeqCst) {
                change(&rig.mnt, &mut rng);
                changes += 1;
            }
            changes
        });
        let session = rig.start(SessionOptions {
            parallel: 2,
            ..SessionOptions::default()
        });
        walking.store(false, SeqCst);
        let changes = alongside.join().unwrap();
        assert!(changes > 0, "no change ran alongside the walk");
        session
    });
    rig.fs.hooks.clear();
    let vp = rig.finish(&session);
    assert!(
        vp.progress.error.is_none(),
        "seed {seed}: session error: {:?}",
        vp.progress.error
    );
    let walked_in = batches.load(SeqCst);
    assert!(
        walked_in >= 8,
        "the walk took {walked_in} batches: too few to interleave changes with it"
    );
    // Nothing changes after the stop, so the tree now is the tree at the validity point.
    assert_image_is(rig, &tree(&rig.mnt));
}

#[test]
fn namespace_changes_during_the_start_walk_keep_the_image_exact() {
    let rig = Rig::new();
    let rounds = std::env::var("CAPTURE_WALK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4u64);
    for seed in 1..=rounds {
        round(&rig, seed * 7919);
    }
}
