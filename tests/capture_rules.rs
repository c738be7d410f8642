//! The capture rules of DESIGN §3, one test each, on a real mount: the image must be the
//! tree at the validity point.

mod engine;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use capture::session::SessionOptions;
use engine::{Rig, assert_image_is, tree};

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

/// Holds a thread at a hook point until the test releases it.
struct Gate {
    state: std::sync::Mutex<(bool, bool)>, // (arrived, released)
    cv: std::sync::Condvar,
}

impl Gate {
    fn new() -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate {
            state: std::sync::Mutex::new((false, false)),
            cv: std::sync::Condvar::new(),
        })
    }
    fn hold(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        self.cv.notify_all();
        while !s.1 {
            s = self.cv.wait(s).unwrap();
        }
    }
    fn wait_arrived(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.0 {
            s = self
                .cv
                .wait_timeout(s, std::time::Duration::from_secs(10))
                .unwrap()
                .0;
        }
    }
    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
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
    let gate = Gate::new();
    let g = gate.clone();
    rig.mounted.fs.hooks.set(
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
    rig.mounted.fs.hooks.clear();
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
