//! The copier cloning file ranges (FICLONERANGE) instead of copying bytes, on a
//! loop-mounted XFS holding both the backing and the image directory: the image is still
//! the tree at the validity point, and it really is made of clones. (The engine's other
//! point-in-time tests run on XFS too: `HOTBACKUP_TEST_FS=xfs`, see scripts/test.)

mod engine;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::time::Duration;

use capture::session::{CaptureError, CloneMode, SessionOptions};
use engine::xfs::shared_bytes;
use engine::{Rig, assert_image_is, blocked_for, hold_at, tree};

const CHUNK: u64 = 64 * 1024;

fn cloning(clone_chunk: u64) -> SessionOptions {
    SessionOptions {
        parallel: 2,
        chunk_size: CHUNK,
        clone: CloneMode::Always,
        clone_chunk_size: clone_chunk,
        ..SessionOptions::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Data written through the mount and not synced (still dirty in the backing file's
/// page cache) is in the clone: XFS writes a range back before it shares it.
#[test]
fn a_tree_is_cloned_not_copied_and_equals_the_source() {
    let rig = Rig::on_xfs();
    fs::create_dir(rig.m("db")).unwrap();
    fs::write(rig.m("db/big.ibd"), pattern(5 << 20, 1)).unwrap();
    // An unaligned end, and a file smaller than a block.
    fs::write(rig.m("db/odd"), pattern(3 * 4096 + 1234, 2)).unwrap();
    fs::write(rig.m("db/tiny.frm"), b"tiny").unwrap();
    fs::write(rig.m("empty"), b"").unwrap();
    // Holes: whole clone chunks of hole, data inside, a hole at the end.
    let sparse = File::create(rig.m("sparse")).unwrap();
    sparse.write_all_at(&pattern(8192, 3), 3 << 20).unwrap();
    sparse.write_all_at(&pattern(100, 4), 9 << 20).unwrap();
    sparse.set_len(12 << 20).unwrap();
    drop(sparse);
    // Not a multiple of the block size: the copier rounds it down.
    let session = rig.start(cloning((1 << 20) + 1000));
    let vp = rig.finish(&session);
    assert_image_is(&rig, &tree(&rig.mnt));
    let p = &vp.progress;
    assert!(p.cloning, "{p:?}");
    assert!(p.bytes_cloned >= 5 << 20, "{p:?}");
    assert!(
        shared_bytes(&rig.img("db/big.ibd")) >= 5 << 20,
        "the image file shares no extents: it was copied, not cloned"
    );
    assert!(shared_bytes(&rig.img("db/odd")) > 0);
    let img = fs::metadata(rig.img("sparse")).unwrap();
    assert_eq!(img.len(), 12 << 20);
    assert!(img.blocks() * 512 < 1 << 20, "holes were filled: {img:?}");
}

/// The mutation check of the clone path: a write into a chunk that has been cloned but
/// not yet recorded as copied must wait for the range lock, then be mirrored. Without
/// the lock it would land in the source only, after the clone: lost from the image.
#[test]
fn a_write_racing_a_chunk_clone_waits_and_is_mirrored() {
    let rig = Rig::on_xfs();
    fs::write(rig.m("f"), pattern(4 * CHUNK as usize, 5)).unwrap();
    let gate = hold_at(&rig, "copier.chunk_read", CHUNK);
    let session = rig.start(SessionOptions {
        parallel: 1,
        ..cloning(CHUNK)
    });
    gate.wait_arrived();
    let path = rig.m("f");
    let (blocked, writer) = blocked_for(Duration::from_millis(300), move || {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&[0xee; 100], CHUNK + 1000).unwrap();
    });
    gate.release();
    writer.join().unwrap();
    assert!(
        blocked,
        "a write into a chunk being cloned must wait for it"
    );
    let expected = tree(&rig.mnt);
    let vp = rig.finish(&session);
    assert_image_is(&rig, &expected);
    assert!(vp.progress.bytes_mirrored >= 100, "{:?}", vp.progress);
    assert_eq!(vp.progress.bytes_cloned, 4 * CHUNK);
}

/// Buffered and O_DIRECT writers all over a file while its chunks are cloned (slowly),
/// and after: the image is the file at the stop, and the mirrored writes broke the
/// sharing only where they landed.
#[test]
fn buffered_and_direct_writes_during_and_after_the_clone_are_in_the_image() {
    let rig = Rig::on_xfs();
    let size = 4 << 20;
    fs::write(rig.m("f"), pattern(size, 6)).unwrap();
    let session = rig.start(SessionOptions {
        parallel: 1,
        throttle_bytes_per_sec: Some(8 << 20),
        ..cloning(CHUNK)
    });
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(rig.m("f"))
        .unwrap();
    let buffered = OpenOptions::new().write(true).open(rig.m("f")).unwrap();
    // A block-aligned buffer, as O_DIRECT needs.
    let raw = vec![0xd1u8; 2 * 4096];
    let start = raw.as_ptr().align_offset(4096);
    let block = &raw[start..start + 4096];
    let mut i = 0u64;
    while session.phase() == capture::session::Phase::Copying || i < 40 {
        let at = (i * 7919 * 4096) % size as u64;
        direct.write_all_at(block, at).unwrap();
        buffered
            .write_all_at(&[0xb0 + (i % 16) as u8; 1000], (at + 123_457) % size as u64)
            .unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let expected = tree(&rig.mnt);
    let vp = rig.finish(&session);
    assert_image_is(&rig, &expected);
    assert!(vp.progress.bytes_cloned >= size as u64, "{:?}", vp.progress);
    assert!(vp.progress.bytes_mirrored > 0, "{:?}", vp.progress);
    let shared = shared_bytes(&rig.img("f"));
    assert!(
        shared > 0 && shared < size as u64,
        "mirrored writes must unshare only their blocks: {shared} of {size} shared"
    );
}

/// An append waiting on the tail's lock lands after the tail's clone (which ends in a
/// partial block shared with the source) and is mirrored onto it.
#[test]
fn a_file_extended_during_the_tail_clone_is_mirrored() {
    let rig = Rig::on_xfs();
    fs::write(rig.m("log"), pattern(3 * CHUNK as usize + 777, 7)).unwrap();
    let gate = hold_at(&rig, "copier.tail", 3 * CHUNK);
    let session = rig.start(SessionOptions {
        parallel: 1,
        ..cloning(CHUNK)
    });
    gate.wait_arrived();
    let path = rig.m("log");
    let (blocked, appender) = blocked_for(Duration::from_millis(300), move || {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(&pattern(10_000, 8)).unwrap();
    });
    gate.release();
    appender.join().unwrap();
    assert!(blocked, "an append must wait for the tail");
    let expected = tree(&rig.mnt);
    let vp = rig.finish(&session);
    assert_image_is(&rig, &expected);
    assert_eq!(vp.progress.bytes_cloned, 3 * CHUNK + 777);
}

/// Off the backing directory's mount there is nothing to clone into: `always` refuses
/// to start with a sentence saying so, `auto` copies bytes.
#[test]
fn across_mounts_always_refuses_and_auto_copies_bytes() {
    let rig = Rig::on_xfs();
    fs::write(rig.m("f"), pattern(300_000, 9)).unwrap();
    let elsewhere = rig.dir.path().join("image-elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let refused = rig.fs.start_capture(&elsewhere, cloning(CHUNK)).err();
    let Some(CaptureError::CloneImpossible(why)) = &refused else {
        panic!("--clone always started across mounts: {refused:?}");
    };
    let message = refused.as_ref().unwrap().to_string();
    assert!(
        why.contains("not on the same mounted filesystem") && message.contains("--clone auto"),
        "{message}"
    );
    let session = rig
        .fs
        .start_capture(
            &elsewhere,
            SessionOptions {
                clone: CloneMode::Auto,
                ..cloning(CHUNK)
            },
        )
        .unwrap();
    session.wait_copied(Duration::from_secs(30));
    let vp = rig.fs.stop_capture().unwrap().validity_point().unwrap();
    assert!(!vp.progress.cloning, "{:?}", vp.progress);
    assert_eq!(vp.progress.bytes_cloned, 0);
    assert_eq!(vp.progress.bytes_copied, 300_000);
    assert_eq!(fs::read(elsewhere.join("f")).unwrap(), pattern(300_000, 9));
}
