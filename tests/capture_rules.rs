//! The capture rules of DESIGN §3, one test each, on a real mount: the image must be the
//! tree at the validity point.

mod engine;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use capture::session::{AbortReason, SessionOptions};
use engine::{Rig, assert_image_is, blocked_for, hold_at, tree};

fn small_chunks() -> SessionOptions {
    SessionOptions {
        parallel: 2,
        chunk_size: 64 * 1024,
        ..SessionOptions::default()
    }
}

#[test]
fn idle_tree_is_copied_exactly() {
    let rig = Rig::new();
    fs::create_dir_all(rig.m("db/sub")).unwrap();
    fs::write(rig.m("db/t1.ibd"), vec![7u8; 300_000]).unwrap();
    fs::write(rig.m("db/sub/small"), b"hello").unwrap();
    fs::write(rig.m("empty"), b"").unwrap();
    std::os::unix::fs::symlink("db/t1.ibd", rig.m("link")).unwrap();
    fs::hard_link(rig.m("db/sub/small"), rig.m("hard")).unwrap();
    let f = File::create(rig.m("sparse")).unwrap();
    f.write_all_at(b"end", 10 << 20).unwrap();
    let session = rig.start(small_chunks());
    let vp = rig.finish(&session);
    assert_image_is(&rig, &tree(&rig.mnt));
    assert!(vp.progress.bytes_copied >= 300_000);
    assert!(
        fs::metadata(rig.img("sparse")).unwrap().len() == (10 << 20) + 3
            && std::os::unix::fs::MetadataExt::blocks(&fs::metadata(rig.img("sparse")).unwrap())
                < 1000,
        "sparse file not kept sparse"
    );
}

#[test]
fn writes_during_the_copy_are_in_the_image() {
    let rig = Rig::new();
    let size = 8 << 20;
    fs::write(rig.m("big"), vec![1u8; size]).unwrap();
    let f = OpenOptions::new().write(true).open(rig.m("big")).unwrap();
    let session = rig.start(SessionOptions {
        parallel: 1,
        chunk_size: 64 * 1024,
        throttle_bytes_per_sec: Some(16 << 20),
        ..SessionOptions::default()
    });
    // Writes at both ends while the (throttled) copier walks through the file.
    for i in 0..50u64 {
        f.write_all_at(&[2u8; 4096], i * 4096).unwrap();
        f.write_all_at(&[3u8; 4096], size as u64 - (i + 1) * 4096)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let expected = tree(&rig.mnt);
    let vp = rig.finish(&session);
    assert_image_is(&rig, &expected);
    assert!(
        vp.progress.bytes_mirrored > 0,
        "nothing was mirrored: {:?}",
        vp.progress
    );
}

#[test]
fn appends_after_the_copier_reached_the_end_are_mirrored() {
    let rig = Rig::new();
    fs::write(rig.m("log"), b"start\n").unwrap();
    let mut log = OpenOptions::new().append(true).open(rig.m("log")).unwrap();
    let session = rig.start(small_chunks());
    session.wait_copied(std::time::Duration::from_secs(30));
    for i in 0..100 {
        writeln!(log, "line {i}").unwrap();
    }
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

#[test]
fn namespace_changes_during_the_session_are_mirrored() {
    let rig = Rig::new();
    fs::create_dir_all(rig.m("d1/inner")).unwrap();
    fs::write(rig.m("d1/inner/f"), vec![5u8; 200_000]).unwrap();
    fs::write(rig.m("victim"), b"old").unwrap();
    fs::write(rig.m("gone"), b"bye").unwrap();
    let session = rig.start(SessionOptions {
        throttle_bytes_per_sec: Some(1 << 20),
        ..small_chunks()
    });
    fs::rename(rig.m("d1"), rig.m("d2")).unwrap();
    fs::write(rig.m("d2/new"), b"created during the session").unwrap();
    fs::create_dir(rig.m("newdir")).unwrap();
    std::os::unix::fs::symlink("d2/new", rig.m("newlink")).unwrap();
    fs::write(rig.m("src"), b"replacement").unwrap();
    fs::rename(rig.m("src"), rig.m("victim")).unwrap();
    fs::remove_file(rig.m("gone")).unwrap();
    fs::hard_link(rig.m("d2/new"), rig.m("newdir/hard")).unwrap();
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

#[test]
fn writes_after_the_stop_are_not_in_the_image() {
    let rig = Rig::new();
    fs::write(rig.m("f"), b"before").unwrap();
    let f = OpenOptions::new().write(true).open(rig.m("f")).unwrap();
    let session = rig.start(small_chunks());
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    f.write_all_at(b"AFTER!", 0).unwrap();
    fs::write(rig.m("later"), b"x").unwrap();
    assert_image_is(&rig, &expected);
}

#[test]
fn truncate_below_the_copied_range_then_regrow() {
    for copied_chunks in 0..5 {
        truncate_then_regrow_with_copier_at(copied_chunks);
    }
}

fn truncate_then_regrow_with_copier_at(copied_chunks: u64) {
    let rig = Rig::new();
    let chunk = 64 * 1024u64;
    let data: Vec<u8> = (0..289_348u32).map(|b| (b % 251) as u8).collect();
    fs::write(rig.m("f"), &data).unwrap();
    let gate = rig.gate();
    let g = gate.clone();
    rig.fs.hooks.set(
        "copier.before_chunk",
        std::sync::Arc::new(move |_, off| {
            if off == copied_chunks * chunk {
                g.hold();
            }
        }),
    );
    let session = rig.start(SessionOptions {
        parallel: 1,
        chunk_size: chunk,
        ..SessionOptions::default()
    });
    gate.wait_arrived(); // two chunks copied, the copier waits before the third
    let f = OpenOptions::new().write(true).open(rig.m("f")).unwrap();
    f.set_len(58_107).unwrap();
    f.write_all_at(&vec![20u8; 30_929], 51_640).unwrap();
    f.write_all_at(&vec![26u8; 35_551], 202_370).unwrap();
    gate.release();
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    rig.fs.hooks.clear();
    assert_image_is(&rig, &expected);
}

/// Regression (found by the model test): the copier marked only the end of a file's tail
/// as copied, so overwrites inside a small, already copied file were not mirrored.
#[test]
fn overwrites_of_a_fully_copied_small_file_are_mirrored() {
    let rig = Rig::new();
    fs::write(rig.m("small"), vec![1u8; 10_000]).unwrap();
    let session = rig.start(small_chunks());
    session.wait_copied(std::time::Duration::from_secs(30));
    let f = OpenOptions::new().write(true).open(rig.m("small")).unwrap();
    f.write_all_at(&[2u8; 100], 5_000).unwrap();
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

const WAIT: std::time::Duration = std::time::Duration::from_millis(300);

#[test]
fn a_write_racing_a_chunk_copy_waits_and_is_mirrored() {
    let rig = Rig::new();
    fs::write(rig.m("f"), vec![1u8; 256 * 1024]).unwrap();
    // The copier has read chunk 0 (old bytes) and not yet written it to the image.
    let gate = hold_at(&rig, "copier.chunk_read", 0);
    let session = rig.start(SessionOptions {
        parallel: 1,
        chunk_size: 64 * 1024,
        ..SessionOptions::default()
    });
    gate.wait_arrived();
    let path = rig.m("f");
    let (blocked, writer) = blocked_for(WAIT, move || {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&[0xee; 100], 1000).unwrap();
    });
    gate.release();
    writer.join().unwrap();
    assert!(
        blocked,
        "a write into a chunk being copied must wait for the chunk"
    );
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

#[test]
fn a_write_in_flight_at_session_start_finishes_before_the_copy_begins() {
    let rig = Rig::new();
    fs::write(rig.m("f"), vec![1u8; 100_000]).unwrap();
    // A write has entered the filesystem (seeing no session) but not yet written.
    let gate = hold_at(&rig, "write.entered", 777);
    let path = rig.m("f");
    let writer = std::thread::spawn(move || {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&[0xab; 100], 777).unwrap();
    });
    gate.wait_arrived();
    let fs_handle = rig.fs.clone();
    let image = rig.image.clone();
    let (blocked, starter) = blocked_for(WAIT, move || {
        fs_handle
            .start_capture(&image, SessionOptions::default())
            .unwrap()
    });
    gate.release();
    writer.join().unwrap();
    let session = starter.join().unwrap();
    assert!(
        blocked,
        "session start must wait for writes already in flight"
    );
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

#[test]
fn the_stop_waits_for_a_mirrored_write_in_flight() {
    let rig = Rig::new();
    fs::write(rig.m("f"), vec![1u8; 100_000]).unwrap();
    let session = rig.start(small_chunks());
    session.wait_copied(std::time::Duration::from_secs(30));
    // A write has reached the source and not yet the image.
    let gate = hold_at(&rig, "write.before_mirror", 555);
    let path = rig.m("f");
    let writer = std::thread::spawn(move || {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&[0xcd; 100], 555).unwrap();
    });
    gate.wait_arrived();
    let fs_handle = rig.fs.clone();
    let (blocked, stopper) = blocked_for(WAIT, move || {
        fs_handle
            .stop_capture()
            .and_then(|stopped| stopped.validity_point())
            .unwrap()
    });
    gate.release();
    writer.join().unwrap();
    let vp = stopper.join().unwrap();
    assert!(blocked, "the stop must wait for mirrored writes in flight");
    vp.apply_metadata(&rig.image).unwrap();
    assert_image_is(&rig, &tree(&rig.mnt));
}

#[test]
fn renames_of_a_pending_file_and_of_a_directory_with_pending_work() {
    let rig = Rig::new();
    fs::write(rig.m("first"), vec![1u8; 1 << 20]).unwrap();
    fs::write(rig.m("pending"), vec![2u8; 50_000]).unwrap();
    fs::create_dir(rig.m("dir")).unwrap();
    fs::write(rig.m("dir/x"), vec![3u8; 60_000]).unwrap();
    fs::write(rig.m("dir/y"), vec![4u8; 70_000]).unwrap();
    // The copier is about to start its first file; nothing else is copied yet.
    let gate = hold_at(&rig, "copier.before_file", 0);
    let session = rig.start(SessionOptions {
        parallel: 1,
        ..small_chunks()
    });
    gate.wait_arrived();
    fs::rename(rig.m("pending"), rig.m("renamed")).unwrap();
    fs::rename(rig.m("dir"), rig.m("dir2")).unwrap();
    fs::write(rig.m("dir2/x"), b"rewritten after the rename").unwrap();
    gate.release();
    let expected = tree(&rig.mnt);
    rig.finish(&session);
    assert_image_is(&rig, &expected);
}

#[test]
fn unlink_of_a_file_being_copied() {
    let rig = Rig::new();
    fs::write(rig.m("doomed"), vec![5u8; 256 * 1024]).unwrap();
    fs::write(rig.m("kept"), b"kept").unwrap();
    let gate = hold_at(&rig, "copier.chunk_read", 64 * 1024);
    let session = rig.start(SessionOptions {
        parallel: 1,
        chunk_size: 64 * 1024,
        ..SessionOptions::default()
    });
    gate.wait_arrived();
    let open = OpenOptions::new()
        .write(true)
        .open(rig.m("doomed"))
        .unwrap();
    fs::remove_file(rig.m("doomed")).unwrap();
    // Open-but-unlinked: writes go on, and no longer belong to the image.
    open.write_all_at(&[9u8; 4096], 0).unwrap();
    gate.release();
    open.write_all_at(&[9u8; 4096], 200_000).unwrap();
    let expected = tree(&rig.mnt);
    let vp = rig.finish(&session);
    assert!(vp.progress.error.is_none(), "{:?}", vp.progress.error);
    assert_image_is(&rig, &expected);
}

#[test]
fn a_file_created_during_the_session_is_mirrored_from_its_first_byte() {
    let rig = Rig::new();
    fs::write(rig.m("busy"), vec![1u8; 1 << 20]).unwrap();
    let gate = hold_at(&rig, "copier.before_file", 0);
    let session = rig.start(small_chunks());
    gate.wait_arrived();
    let mut f = File::create(rig.m("new")).unwrap();
    f.write_all(&vec![7u8; 300_000]).unwrap();
    f.write_all_at(b"patched", 1000).unwrap();
    f.set_len(250_000).unwrap();
    drop(f);
    fs::rename(rig.m("new"), rig.m("new2")).unwrap();
    gate.release();
    let expected = tree(&rig.mnt);
    let vp = rig.finish(&session);
    assert!(vp.progress.bytes_mirrored >= 250_000, "{:?}", vp.progress);
    assert_image_is(&rig, &expected);
}

#[test]
fn a_panic_while_mirroring_aborts_the_session_but_not_the_write() {
    let rig = Rig::new();
    fs::write(rig.m("f"), vec![1u8; 10_000]).unwrap();
    let session = rig.start(small_chunks());
    session.wait_copied(std::time::Duration::from_secs(30));
    rig.fs.hooks.set(
        "write.before_mirror",
        std::sync::Arc::new(|_, off| {
            if off == 4242 {
                panic!("injected fault while mirroring");
            }
        }),
    );
    let f = OpenOptions::new().write(true).open(rig.m("f")).unwrap();
    f.write_all_at(b"application data", 4242)
        .expect("the application's write must succeed");
    rig.fs.hooks.clear();
    assert_eq!(
        &fs::read(rig.m("f")).unwrap()[4242..4258],
        b"application data"
    );
    assert_eq!(session.phase(), capture::session::Phase::Aborted);
    assert!(
        matches!(session.error(), Some(AbortReason::Panic(ref m)) if m.contains("mirroring a write")),
        "{:?}",
        session.error()
    );
    // The mount serves on and later writes work; the stop reports the abort.
    f.write_all_at(b"later", 0).unwrap();
    assert!(rig.fs.stop_capture().is_err());
}

#[test]
fn a_panic_in_a_copier_thread_aborts_the_session_and_the_mount_serves_on() {
    let rig = Rig::new();
    fs::write(rig.m("f"), vec![1u8; 256 * 1024]).unwrap();
    rig.fs.hooks.set(
        "copier.chunk_read",
        std::sync::Arc::new(|_, _| panic!("injected fault in the copier")),
    );
    let session = rig.start(small_chunks());
    let phase = session.wait_copied(std::time::Duration::from_secs(30));
    rig.fs.hooks.clear();
    assert_eq!(phase, capture::session::Phase::Aborted);
    assert!(
        matches!(session.error(), Some(AbortReason::Panic(ref m)) if m.contains("copier thread panicked")),
        "{:?}",
        session.error()
    );
    fs::write(rig.m("g"), b"still serving").unwrap();
    assert_eq!(fs::read(rig.m("g")).unwrap(), b"still serving");
    rig.fs.abort_capture(AbortReason::Cancelled("test".into()));
    // A new session works after the aborted one.
    fs::remove_dir_all(&rig.image).unwrap();
    fs::create_dir(&rig.image).unwrap();
    let next = rig.start(small_chunks());
    let expected = tree(&rig.mnt);
    rig.finish(&next);
    assert_image_is(&rig, &expected);
}
