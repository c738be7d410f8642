//! The digest's properties: layout independence, zero blocks as holes, holes unread,
//! sensitivity to bytes and length, the plain blake3 of format 1, and the definition.

use super::*;

const MIB: usize = 1 << 20;

/// Content of `len` bytes: zeros, with `data` written at the given offsets.
fn content(len: usize, data: &[(usize, &[u8])]) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (at, bytes) in data {
        v[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    v
}

/// A file holding `bytes`, where the `written` ranges are written (zeros too) and the
/// rest is left a hole.
fn file(dir: &tempfile::TempDir, name: &str, bytes: &[u8], written: &[(usize, usize)]) -> File {
    let path = dir.path().join(name);
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for &(start, end) in written {
        f.write_all_at(&bytes[start..end], start as u64).unwrap();
    }
    f.sync_all().unwrap();
    f
}

fn streamed(bytes: &[u8], piece: usize) -> String {
    let mut h = ContentHasher::new(Algorithm::B3z1);
    for p in bytes.chunks(piece.max(1)) {
        h.write_all(p).unwrap();
    }
    h.finalize()
}

fn b3z1(f: &File) -> String {
    of_file(f, Algorithm::B3z1, |_| {}).unwrap()
}

#[test]
fn the_same_bytes_give_the_same_digest_whatever_the_hole_layout() {
    let len = 5 * MIB + 123;
    let bytes = content(len, &[(MIB + MIB / 2, b"page one"), (4 * MIB + 7, b"two")]);
    let dir = tempfile::tempdir().unwrap();
    let sparse = file(
        &dir,
        "sparse",
        &bytes,
        &[
            (MIB + MIB / 2, MIB + MIB / 2 + 8),
            (4 * MIB + 7, 4 * MIB + 10),
        ],
    );
    let dense = file(&dir, "dense", &bytes, &[(0, len)]);
    // Zeros written where the others have holes, a hole where they have zeros.
    let mixed = file(
        &dir,
        "mixed",
        &bytes,
        &[(0, 2 * MIB), (4 * MIB, 4 * MIB + 10), (5 * MIB, len)],
    );
    let digest = b3z1(&sparse);
    assert!(digest.starts_with(B3Z1_PREFIX), "{digest}");
    assert_eq!(b3z1(&dense), digest, "written zeros");
    assert_eq!(b3z1(&mixed), digest, "another layout");
    for piece in [1 << 12, 7777, MIB, 3 * MIB + 1, len] {
        assert_eq!(
            streamed(&bytes, piece),
            digest,
            "streamed in pieces of {piece}"
        );
    }
    assert_eq!(of_bytes(Algorithm::B3z1, &bytes), digest);
}

#[test]
fn an_all_zero_data_block_is_the_same_as_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = vec![0u8; 3 * MIB + 5];
    let hole = file(&dir, "hole", &zeros, &[]);
    let written = file(&dir, "written", &zeros, &[(0, zeros.len())]);
    assert_eq!(b3z1(&hole), b3z1(&written));
    assert_eq!(b3z1(&hole), of_bytes(Algorithm::B3z1, &zeros));
}

#[test]
fn holes_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let len = 64 * MIB;
    let bytes = content(len, &[(10 * MIB + 3, b"x"), (len - 1, b"y")]);
    let f = file(
        &dir,
        "f",
        &bytes,
        &[(10 * MIB + 3, 10 * MIB + 4), (len - 1, len)],
    );
    let mut seen = 0;
    let (digest, read) = digest_file(&f, Algorithm::B3z1, |n| seen += n).unwrap();
    assert_eq!(digest, of_bytes(Algorithm::B3z1, &bytes));
    // Filesystems allocate in blocks of a few KiB, so each byte of data costs at most
    // its 1 MiB block; progress still covers every byte.
    assert_eq!(
        read,
        2 * MIB as u64,
        "only the two blocks with data are read"
    );
    assert_eq!(seen, len as u64);
}

#[test]
fn one_changed_byte_or_a_changed_length_changes_the_digest() {
    let len = 4 * MIB;
    let bytes = content(len, &[(MIB, b"data")]);
    let digest = of_bytes(Algorithm::B3z1, &bytes);
    for at in [0, MIB + 1, 2 * MIB + 17, len - 1] {
        let mut changed = bytes.clone();
        changed[at] ^= 1;
        assert_ne!(of_bytes(Algorithm::B3z1, &changed), digest, "byte {at}");
    }
    // Zeros added or removed at the end, within the last block or as a new one.
    for other in [len - 1, len + 1, len + MIB] {
        let mut v = bytes.clone();
        v.resize(other, 0);
        assert_ne!(of_bytes(Algorithm::B3z1, &v), digest, "{other} bytes");
    }
    // Where the zero run ends matters, not only how many zero blocks there are.
    let moved = content(len, &[(2 * MIB, b"data")]);
    assert_ne!(of_bytes(Algorithm::B3z1, &moved), digest);
    assert_ne!(
        of_bytes(Algorithm::B3z1, b""),
        of_bytes(Algorithm::B3z1, &[0])
    );
}

#[test]
fn plain_blake3_digests_of_old_manifests_still_work() {
    let bytes = content(2 * MIB + 9, &[(5, b"old")]);
    let plain = blake3::hash(&bytes).to_hex().to_string();
    assert_eq!(Algorithm::of(&plain), Algorithm::Blake3);
    assert_eq!(
        Algorithm::of(&of_bytes(Algorithm::B3z1, &bytes)),
        Algorithm::B3z1
    );
    let dir = tempfile::tempdir().unwrap();
    let f = file(&dir, "f", &bytes, &[(0, 9)]);
    assert_eq!(of_file(&f, Algorithm::Blake3, |_| {}).unwrap(), plain);
    assert_eq!(of_bytes(Algorithm::Blake3, &bytes), plain);
    assert_ne!(of_bytes(Algorithm::B3z1, &bytes), plain);
}

/// The definition, written as plainly as possible: whole blocks in memory.
fn reference(bytes: &[u8]) -> String {
    let mut outer = blake3::Hasher::new_derive_key(CONTEXT);
    let mut zeros = 0u64;
    for block in bytes.chunks(BLOCK) {
        if block.iter().all(|&b| b == 0) {
            zeros += 1;
            continue;
        }
        if zeros > 0 {
            outer.update(b"Z").update(&zeros.to_le_bytes());
            zeros = 0;
        }
        outer.update(b"D").update(blake3::hash(block).as_bytes());
    }
    if zeros > 0 {
        outer.update(b"Z").update(&zeros.to_le_bytes());
    }
    outer
        .update(b"L")
        .update(&(bytes.len() as u64).to_le_bytes());
    format!("{B3Z1_PREFIX}{}", outer.finalize().to_hex())
}

#[test]
fn file_and_stream_digests_follow_the_definition() {
    // Blocks that start with zeros and end with data (a zero prefix longer than a
    // read piece), data then zeros, all zeros, and a short last block.
    let len = 6 * MIB + 1000;
    let bytes = content(
        len,
        &[
            (MIB + 300_000, b"late"),
            (3 * MIB, b"early"),
            (6 * MIB + 999, b"z"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let f = file(
        &dir,
        "f",
        &bytes,
        &[
            (MIB + 300_000, MIB + 300_004),
            (3 * MIB, 3 * MIB + 5),
            (len - 1, len),
        ],
    );
    let expected = reference(&bytes);
    assert_eq!(b3z1(&f), expected);
    for piece in [1000, PIECE, MIB + 1] {
        assert_eq!(streamed(&bytes, piece), expected, "pieces of {piece}");
    }
}

#[test]
fn is_zero_finds_a_byte_anywhere() {
    for len in [0, 1, 127, 128, 129, 1000] {
        assert!(is_zero(&vec![0; len]));
        for at in 0..len {
            let mut v = vec![0; len];
            v[at] = 0x80;
            assert!(!is_zero(&v), "{len} bytes, at {at}");
        }
    }
}
