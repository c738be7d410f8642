//! Sparse files through the real agent (issue 9): `hotbackup copy`, `verify` and
//! `restore` cost what a sparse file's data costs, keep its holes, and still catch a
//! changed byte where the hole was. The digest's own properties are unit-tested in
//! `agent/src/digest.rs`.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::{Agent, hotbackup, ok};

const GIB: u64 = 1 << 30;
/// Apparent size: reading it all (as the old whole-content blake3 did) would take long
/// enough to notice, but the test does not time anything.
const SIZE: u64 = 4 * GIB;
/// Where data is written: the start, a page in the middle, the very last byte.
const DATA: [(u64, &[u8]); 3] = [
    (0, b"page zero of a tablespace"),
    (GIB + GIB / 2 + 4096, b"a page in the middle"),
    (SIZE - 1, b"!"),
];

/// Bytes the filesystem allocated for `path`.
fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

fn digest_of(path: &Path) -> String {
    let f = File::open(path).unwrap();
    agent::digest::of_file(&f, agent::digest::Algorithm::B3z1, |_| {}).unwrap()
}

#[test]
fn a_sparse_file_is_copied_verified_and_restored_with_its_holes() {
    let agent = Agent::start();
    let huge = agent.mnt("huge.ibd");
    {
        let f = File::create(&huge).unwrap();
        f.set_len(SIZE).unwrap();
        for (at, bytes) in DATA {
            f.write_all_at(bytes, at).unwrap();
        }
        // A MiB of written zeros: data to the filesystem, a zero block to the digest.
        f.write_all_at(&vec![0u8; 1 << 20], 3 * GIB).unwrap();
    }
    let target = agent.dir.path().join("image");
    ok(&agent.copy(&target, &["--progress", "none"]));

    let image_file = target.join("data/huge.ibd");
    assert_eq!(fs::metadata(&image_file).unwrap().len(), SIZE);
    assert!(
        allocated(&image_file) < 64 << 20,
        "the image file is not sparse: {} bytes allocated",
        allocated(&image_file)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(target.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 2);
    let entry = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "huge.ibd")
        .unwrap();
    // The same bytes with the source's hole layout give the manifest's digest.
    let recorded = entry["blake3"].as_str().unwrap();
    assert!(recorded.starts_with("b3z1:"), "{recorded}");
    assert_eq!(
        recorded,
        digest_of(&agent.dir.path().join("backing/huge.ibd"))
    );
    let verify = || hotbackup(&["verify", target.to_str().unwrap()]);
    ok(&verify());
    // `hotbackup digest` prints what the manifest records.
    let printed = ok(&hotbackup(&["digest", image_file.to_str().unwrap()]));
    assert_eq!(
        printed.split_whitespace().next(),
        Some(recorded),
        "{printed}"
    );

    // Restored: as sparse as the image, and the same content.
    let restored = agent.dir.path().join("restored");
    ok(&hotbackup(&[
        "restore",
        target.to_str().unwrap(),
        "--datadir",
        restored.to_str().unwrap(),
    ]));
    let restored_file = restored.join("huge.ibd");
    assert!(
        allocated(&restored_file) < 64 << 20,
        "the restored file is not sparse"
    );
    assert_eq!(digest_of(&restored_file), recorded);

    // Zeros written into a former hole change the layout, not the content: it verifies.
    let image = OpenOptions::new().write(true).open(&image_file).unwrap();
    image.write_all_at(&vec![0u8; 3 << 20], GIB).unwrap();
    ok(&verify());
    // One changed byte inside a former hole is caught.
    image.write_all_at(&[1], 2 * GIB + 12345).unwrap();
    image.sync_all().unwrap();
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "verify missed a changed byte: {stdout}"
    );
    assert!(stdout.contains("huge.ibd"), "{stdout}");
}
