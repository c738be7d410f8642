//! Regression tests for the places where an image could differ from the tree at the
//! validity point without any error (issue: capture holes). Each test names the hole; each
//! failed on the engine before its fix.

mod engine;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use capture::fs::Caller;
use capture::session::{AbortReason, CaptureError, Phase, SessionOptions};
use engine::{Rig, assert_image_is, blocked_for, tree, tree_without};

const WAIT: Duration = Duration::from_millis(300);
const ROOT: u64 = 1;

fn options(exclude: &[&str]) -> SessionOptions {
    SessionOptions {
        parallel: 2,
        chunk_size: 64 * 1024,
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        ..SessionOptions::default()
    }
}

fn copied(session: &capture::session::CaptureSession) {
    assert_eq!(
        session.wait_copied(Duration::from_secs(30)),
        Phase::Copied,
        "{:?}",
        session.error()
    );
}

/// Hole 1: work queued after the copiers had finished was never done, and the image kept
/// an empty file for it.
#[test]
fn regression_a_file_moved_in_after_the_copy_phase_is_copied() {
    let rig = Rig::new();
    fs::create_dir(rig.m("tmp")).unwrap();
    fs::write(rig.m("tmp/f"), vec![9u8; 300_000]).unwrap();
    fs::write(rig.m("kept"), b"kept").unwrap();
    let session = rig.start(options(&["tmp"]));
    copied(&session);
    fs::rename(rig.m("tmp/f"), rig.m("f")).unwrap();
    let expected = tree_without(&rig.mnt, Some("tmp"));
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

/// Hole 2: a mirroring step whose path could not be resolved was skipped silently.
#[test]
fn regression_a_change_that_cannot_be_resolved_aborts_the_session() {
    let rig = Rig::new();
    fs::write(rig.m("f"), b"data").unwrap();
    let session = rig.start(options(&[]));
    copied(&session);
    // The backing directory moves under the agent (an operator's mistake): the paths of
    // its inodes no longer lie below the backing root.
    let moved = rig.backing.with_file_name("backing-moved");
    fs::rename(&rig.backing, &moved).unwrap();
    let made = fs::create_dir(rig.m("newdir"));
    fs::rename(&moved, &rig.backing).unwrap();
    made.expect("the application's mkdir must succeed");
    match rig.fs.stop_capture() {
        Err(CaptureError::Aborted(AbortReason::Untrackable(why))) => {
            assert!(why.contains("resolve"), "{why}")
        }
        other => panic!("the stop must report the unfollowable change, got {other:?}"),
    }
    assert!(rig.m("newdir").is_dir());
}

/// Hole 3a: a hard link to a file the session did not track never reached the image.
#[test]
fn regression_a_hard_link_to_an_excluded_file_enters_the_image() {
    let rig = Rig::new();
    fs::create_dir(rig.m("tmp")).unwrap();
    fs::write(rig.m("tmp/f"), vec![4u8; 200_000]).unwrap();
    let session = rig.start(options(&["tmp"]));
    copied(&session);
    fs::hard_link(rig.m("tmp/f"), rig.m("linked")).unwrap();
    // Written through the new name after the link: mirrored or copied, never lost.
    let f = OpenOptions::new()
        .write(true)
        .open(rig.m("linked"))
        .unwrap();
    f.write_all_at(b"after the link", 1000).unwrap();
    rig.finish(&session);
    assert_eq!(
        fs::read(rig.img("linked")).unwrap(),
        fs::read(rig.m("linked")).unwrap()
    );
    assert!(!rig.img("tmp/f").exists());
}

/// Hole 3b: adopting a moved-in directory started a fresh map of seen inodes, so a hard
/// link in it to a tracked file replaced that file's capture state, and writes to copied
/// ranges of the first name stopped being mirrored.
#[test]
fn regression_a_moved_in_directory_with_a_link_to_a_tracked_file() {
    let rig = Rig::new();
    fs::create_dir_all(rig.m("tmp/dir")).unwrap();
    fs::write(rig.m("a"), vec![1u8; 200_000]).unwrap();
    fs::hard_link(rig.m("a"), rig.m("tmp/dir/b")).unwrap();
    let session = rig.start(options(&["tmp"]));
    copied(&session);
    fs::rename(rig.m("tmp/dir"), rig.m("dir")).unwrap();
    let f = OpenOptions::new().write(true).open(rig.m("a")).unwrap();
    f.write_all_at(&[7u8; 5000], 100_000).unwrap();
    let expected = tree_without(&rig.mnt, Some("tmp"));
    rig.finish(&session);
    assert_image_is(&rig, &expected);
    assert_eq!(
        fs::metadata(rig.img("a")).unwrap().ino(),
        fs::metadata(rig.img("dir/b")).unwrap().ino()
    );
}

/// Hole 4: metadata at the stop was read by name after the session was switched off, so
/// a rename racing the stop gave an entry another inode's mode.
#[test]
fn regression_metadata_at_the_stop_is_not_taken_from_a_racing_rename() {
    let rig = Rig::new();
    fs::write(rig.m("x"), b"x").unwrap();
    fs::write(rig.m("y"), b"y").unwrap();
    fs::set_permissions(rig.m("x"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(rig.m("y"), fs::Permissions::from_mode(0o644)).unwrap();
    let session = rig.start(options(&[]));
    copied(&session);
    let expected = tree(&rig.mnt);
    let mnt = rig.mnt.clone();
    let fired = std::sync::atomic::AtomicBool::new(false);
    rig.fs.hooks.set(
        "stop.metadata",
        Arc::new(move |_, _| {
            if fired.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            // Swap the two names from another thread, giving it time to land.
            let mnt = mnt.clone();
            let (done, _t) = blocked_for(WAIT, move || {
                fs::rename(mnt.join("x"), mnt.join("z")).unwrap();
                fs::rename(mnt.join("y"), mnt.join("x")).unwrap();
                fs::rename(mnt.join("z"), mnt.join("y")).unwrap();
            });
            let _ = done;
        }),
    );
    rig.finish(&session);
    rig.fs.hooks.clear();
    assert_image_is(&rig, &expected);
}

/// Hole 5a: the tail of a file ending in a hole was read as zeros (under a lock to the
/// end of the file) and the image lost the hole.
#[test]
fn regression_a_trailing_hole_stays_a_hole() {
    let rig = Rig::new();
    let f = File::create(rig.m("sparse")).unwrap();
    f.write_all_at(&[5u8; 100_000], 0).unwrap();
    f.set_len(64 << 20).unwrap();
    let session = rig.start(options(&[]));
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
    let m = fs::metadata(rig.img("sparse")).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 < 4 << 20,
        "the image allocates {} bytes for 100 kB of data",
        m.blocks() * 512
    );
}

/// Hole 5b: a mirrored copy_file_range read its whole length into one buffer; now it is
/// mirrored in bounded pieces, and must still be exact.
#[test]
fn a_copy_file_range_larger_than_a_chunk_is_mirrored() {
    let rig = Rig::new();
    let src: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(rig.m("src"), &src).unwrap();
    fs::write(rig.m("dst"), vec![0u8; 3_000_000]).unwrap();
    let session = rig.start(options(&[]));
    copied(&session);
    let a = File::open(rig.m("src")).unwrap();
    let b = OpenOptions::new().write(true).open(rig.m("dst")).unwrap();
    engine::io::copy_range(&a, 10, &b, 1000, 2_500_000);
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

/// Hole 6: an `O_TRUNC` that reached the backing `open` (with FUSE_ATOMIC_O_TRUNC, or a
/// create that found the file existing) truncated the source outside the session's view.
#[test]
fn regression_truncation_by_open_and_create_reaches_the_image() {
    let rig = Rig::new();
    fs::write(rig.m("opened"), vec![3u8; 200_000]).unwrap();
    fs::write(rig.m("created"), vec![3u8; 200_000]).unwrap();
    let session = rig.start(options(&[]));
    copied(&session);
    let fs_ = &rig.fs;
    // The calls the kernel makes, driven directly: open with O_TRUNC (atomic truncation)
    // and create of a name that exists by now.
    let ino = fs_.lookup(ROOT, OsStr::new("opened")).unwrap().ino;
    let opened = fs_.open(ino.0, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    fs_.release(opened.fh);
    let caller = Caller { uid: 0, gid: 0 };
    let (attr, created) = fs_
        .create(
            ROOT,
            OsStr::new("created"),
            0o644,
            libc::O_WRONLY | libc::O_TRUNC,
            caller,
        )
        .unwrap();
    assert_eq!(attr.size, 0, "create must report the truncated size");
    fs_.release(created.fh);
    assert_eq!(fs::metadata(rig.m("opened")).unwrap().len(), 0);
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

/// Hole 7: `abort_capture` returned while copier threads still ran, so a straggler could
/// write into an image while the next session started.
#[test]
fn regression_abort_waits_for_the_copier_threads() {
    let rig = Rig::new();
    fs::write(rig.m("f"), vec![1u8; 1 << 20]).unwrap();
    let gate = rig.gate();
    let g = gate.clone();
    rig.fs.hooks.set(
        "copier.chunk_read",
        Arc::new(move |_, off| {
            if off == 0 {
                g.hold();
            }
        }),
    );
    let _session = rig.start(options(&[]));
    gate.wait_arrived();
    let fs_ = rig.fs.clone();
    let (blocked, aborting) = blocked_for(WAIT, move || {
        fs_.abort_capture(AbortReason::Cancelled("test".into()))
    });
    assert!(
        blocked,
        "abort returned while a copier was still inside a chunk"
    );
    gate.release();
    aborting.join().unwrap();
    rig.fs.hooks.clear();
}

/// Hole 8: the filesystem set the whole process's umask to 0, and image entries were
/// created world-writable until the validity point.
#[test]
fn regression_the_process_umask_is_kept_and_image_entries_start_private() {
    // SAFETY: umask read-and-restore on this process.
    let before = unsafe { libc::umask(0o022) };
    unsafe { libc::umask(before) };
    let rig = Rig::new();
    fs::create_dir(rig.m("d")).unwrap();
    fs::write(rig.m("d/f"), b"data").unwrap();
    // SAFETY: as above.
    let now = unsafe { libc::umask(0o022) };
    unsafe { libc::umask(now) };
    assert_eq!(now, before, "serving the mount changed the process umask");
    // Modes the application asks for pass through exactly (the kernel applied its umask).
    let m = fs::metadata(rig.m("d/f")).unwrap().permissions().mode() & 0o777;
    assert_eq!(m, 0o666 & !before);
    let session = rig.start(options(&[]));
    copied(&session);
    fs::write(rig.m("d/new"), b"new").unwrap();
    for rel in ["d", "d/f", "d/new"] {
        let mode = fs::metadata(rig.img(rel)).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "{rel} is {mode:o} in the image before the stop"
        );
    }
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

/// Found while building the mount-less model: a copier that had looked up a file's
/// capture state before the file was unlinked, and then found a new file under the same
/// (reused) inode number, copied the new file under the old state's range locks, which no
/// writer of the new file takes: a write between its chunk read and its chunk write was
/// lost. It must skip the new file (which is mirrored from its first byte).
#[test]
fn regression_a_copier_ignores_a_new_file_on_a_reused_inode_number() {
    let rig = Rig::new();
    fs::write(rig.m("a"), vec![1u8; 200_000]).unwrap();
    let ino_a = fs::metadata(rig.m("a")).unwrap().ino();
    let before_file = engine::hold_at(&rig, "copier.before_file", 0);
    let session = rig.start(SessionOptions {
        parallel: 1,
        ..options(&[])
    });
    before_file.wait_arrived(); // a's state looked up, a not opened yet
    fs::remove_file(rig.m("a")).unwrap();
    // Other tests create files on the same filesystem at the same time and may take
    // the freed number first: misses are removed again, which frees their numbers.
    let reused = (0..2000).find_map(|i| {
        let p = rig.m(&format!("b{i}"));
        fs::write(&p, vec![2u8; 200_000]).unwrap();
        if fs::metadata(&p).unwrap().ino() == ino_a {
            return Some(p);
        }
        fs::remove_file(&p).unwrap();
        None
    });
    let b = reused.expect("the backing filesystem did not reuse the inode number");
    let chunk_read = rig.gate();
    let g = chunk_read.clone();
    rig.fs
        .hooks
        .set("copier.chunk_read", Arc::new(move |_, _| g.hold()));
    before_file.release();
    let stale_copy = chunk_read.arrived_within(WAIT);
    // A write to the new file while a stale copy (if any) holds a chunk it read before.
    let f = OpenOptions::new().write(true).open(&b).unwrap();
    f.write_all_at(&[3u8; 4096], 0).unwrap();
    chunk_read.release();
    rig.fs.hooks.clear();
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
    assert!(
        !stale_copy,
        "the copier copied the new file under the old file's state"
    );
}
