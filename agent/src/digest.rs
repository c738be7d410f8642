//! Content digests of image files: the hole-aware `b3z1:` digest the manifest records
//! (cost O(data + extents), whatever the apparent size), the plain blake3 of older
//! manifests, which one a manifest string names, and computing either from a file
//! (skipping holes) or from a stream (upload, download).
//!
//! `b3z1` splits the content into 1 MiB blocks (the last one short) and is blake3, in
//! derive-key mode, over one record per maximal run of all-zero blocks (`Z`, run length
//! as u64 LE), one per other block (`D`, the block's blake3), and the length (`L`, u64
//! LE). It depends on the bytes only: a hole and written zeros give the same digest, so
//! a file restored, downloaded or copied with another hole layout still verifies; and a
//! block inside a hole (SEEK_HOLE) is known to be zero without reading it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;

/// The block the `b3z1` digest splits content into.
pub const BLOCK: usize = 1 << 20;
/// What a `b3z1` digest starts with in a manifest.
pub const B3Z1_PREFIX: &str = "b3z1:";
/// Domain separation of the outer hash: no other blake3 use collides with it.
const CONTEXT: &str = "hotbackup 2026-11 b3z1 content digest, 1 MiB blocks";

/// How a manifest digest was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// blake3 of the whole content, hex (format version 1 manifests).
    Blake3,
    /// The hole-aware block digest, `b3z1:` and hex.
    B3z1,
}

impl Algorithm {
    /// The algorithm a manifest's digest string was made with.
    pub fn of(digest: &str) -> Algorithm {
        if digest.starts_with(B3Z1_PREFIX) {
            Algorithm::B3z1
        } else {
            Algorithm::Blake3
        }
    }
}

/// True when every byte is zero. Word-wide and branch-light: it runs over every byte
/// of a zero block, and must stay far cheaper than hashing it.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(128);
    for c in &mut chunks {
        let c: &[u8; 128] = c.try_into().expect("exact chunk");
        if c.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Computes a digest from content written to it in any pieces.
pub struct ContentHasher(State);

enum State {
    Blake3(Box<blake3::Hasher>),
    B3z1 {
        blocks: Box<BlockDigest>,
        pending: Vec<u8>,
    },
}

impl ContentHasher {
    pub fn new(algorithm: Algorithm) -> ContentHasher {
        ContentHasher(match algorithm {
            Algorithm::Blake3 => State::Blake3(Box::default()),
            Algorithm::B3z1 => State::B3z1 {
                blocks: Box::new(BlockDigest::new()),
                pending: Vec::new(),
            },
        })
    }

    /// The digest as the manifest writes it.
    pub fn finalize(&self) -> String {
        match &self.0 {
            State::Blake3(h) => h.finalize().to_hex().to_string(),
            State::B3z1 { blocks, pending } => {
                let mut blocks = (**blocks).clone();
                if !pending.is_empty() {
                    blocks.block(pending);
                }
                blocks.finish()
            }
        }
    }
}

impl Write for ContentHasher {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        match &mut self.0 {
            State::Blake3(h) => {
                h.update(buf);
            }
            State::B3z1 { blocks, pending } => {
                if !pending.is_empty() {
                    let take = (BLOCK - pending.len()).min(buf.len());
                    pending.extend_from_slice(&buf[..take]);
                    buf = &buf[take..];
                    if pending.len() == BLOCK {
                        blocks.block(pending);
                        pending.clear();
                    }
                }
                // Whole blocks straight from the caller's buffer, without copying.
                let mut whole = buf.chunks_exact(BLOCK);
                for b in &mut whole {
                    blocks.block(b);
                }
                pending.extend_from_slice(whole.remainder());
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The `b3z1` records so far; fed whole blocks (only the last one may be short).
#[derive(Clone)]
struct BlockDigest {
    outer: blake3::Hasher,
    /// All-zero blocks not yet recorded: a run is recorded once, when it ends.
    zeros: u64,
    len: u64,
}

impl BlockDigest {
    fn new() -> BlockDigest {
        BlockDigest {
            outer: blake3::Hasher::new_derive_key(CONTEXT),
            zeros: 0,
            len: 0,
        }
    }

    fn zero_blocks(&mut self, count: u64, bytes: u64) {
        self.zeros += count;
        self.len += bytes;
    }

    fn block(&mut self, block: &[u8]) {
        if is_zero(block) {
            self.zero_blocks(1, block.len() as u64);
            return;
        }
        self.end_zero_run();
        self.outer.update(b"D");
        self.outer.update(blake3::hash(block).as_bytes());
        self.len += block.len() as u64;
    }

    fn end_zero_run(&mut self) {
        if self.zeros > 0 {
            self.outer.update(b"Z");
            self.outer.update(&self.zeros.to_le_bytes());
            self.zeros = 0;
        }
    }

    fn finish(mut self) -> String {
        self.end_zero_run();
        self.outer.update(b"L");
        self.outer.update(&self.len.to_le_bytes());
        format!("{B3Z1_PREFIX}{}", self.outer.finalize().to_hex())
    }
}

/// The digest of a file's content, reading only its data (holes are zeros without being
/// read); `progress` gets each step's bytes, holes included. The file must not change
/// meanwhile (an image file is final): one that shrinks is an error.
pub fn of_file(file: &File, algorithm: Algorithm, progress: impl FnMut(u64)) -> io::Result<String> {
    Ok(digest_file(file, algorithm, progress)?.0)
}

/// `of_file`, and how many bytes it read.
fn digest_file(
    file: &File,
    algorithm: Algorithm,
    mut progress: impl FnMut(u64),
) -> io::Result<(String, u64)> {
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; BLOCK];
    if algorithm == Algorithm::Blake3 {
        let mut hasher = blake3::Hasher::new();
        let mut at = 0;
        while at < len {
            let n = read_block(file, &mut buf, at, len)?;
            hasher.update(&buf[..n]);
            progress(n as u64);
            at += n as u64;
        }
        return Ok((hasher.finalize().to_hex().to_string(), len));
    }
    let block = BLOCK as u64;
    let blocks = len.div_ceil(block);
    let mut digest = BlockDigest::new();
    let mut read = 0;
    let mut i = 0;
    while i < blocks {
        let at = i * block;
        let Some((start, end)) = next_data(file.as_fd(), at, len)? else {
            // Only a hole remains.
            digest.zero_blocks(blocks - i, len - at);
            progress(len - at);
            break;
        };
        // Blocks wholly before the data are in a hole.
        let first = start / block;
        if first > i {
            digest.zero_blocks(first - i, (first - i) * block);
            progress((first - i) * block);
            i = first;
        }
        // Blocks the data touches are read (the hole parts of them read as zeros).
        while i < end.div_ceil(block).min(blocks) {
            let n = read_block(file, &mut buf, i * block, len)?;
            digest.block(&buf[..n]);
            progress(n as u64);
            read += n as u64;
            i += 1;
        }
    }
    Ok((digest.finish(), read))
}

/// Reads the block at `at` (a whole block, or up to `len`); its length.
fn read_block(file: &File, buf: &mut [u8], at: u64, len: u64) -> io::Result<usize> {
    let n = (len - at).min(buf.len() as u64) as usize;
    file.read_exact_at(&mut buf[..n], at).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(e.kind(), "the file shrank while it was read")
        } else {
            e
        }
    })?;
    Ok(n)
}

/// The next range `[start, end)` at or after `at` that may hold data, or None when only a
/// hole remains before `len`. A filesystem that cannot tell holes has data everywhere.
fn next_data(fd: BorrowedFd<'_>, at: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let start = match seek(fd, at, libc::SEEK_DATA) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
            return Ok(Some((at, len)));
        }
        Err(e) => return Err(e),
    };
    if start >= len {
        return Ok(None);
    }
    let end = seek(fd, start, libc::SEEK_HOLE)?;
    Ok(Some((start, end.clamp(start + 1, len))))
}

fn seek(fd: BorrowedFd<'_>, off: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor the caller keeps open; the offset it moves is only
    // used by positioned reads (pread), which ignore it.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// The digest of bytes in memory.
pub fn of_bytes(algorithm: Algorithm, bytes: &[u8]) -> String {
    let mut h = ContentHasher::new(algorithm);
    h.write_all(bytes).expect("hashing cannot fail");
    h.finalize()
}

#[cfg(test)]
mod tests {
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
}
