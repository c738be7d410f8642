//! The stored form of an image file: zstd, then optionally XChaCha20-Poly1305 in the
//! STREAM construction (64 KiB chunks; a 32-bit chunk counter and a last-chunk flag in
//! each nonce, so a truncated, reordered or spliced object fails to decrypt; the
//! object's key is the associated data of every chunk, so an object moved to another
//! name fails too). XChaCha20's 192-bit nonce lets every object take a random one with
//! no state shared between uploads, and it is fast in software on any CPU.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::{KeyInit, OsRng, Payload};

use super::RepoError;
use crate::digest::{Algorithm, ContentHasher};

const MAGIC: &[u8; 4] = b"HBX1";
const CHUNK: usize = 64 << 10;
const TAG: usize = 16;
const NONCE_PREFIX: usize = 19;

/// How files are stored.
pub struct Encoding {
    pub level: i32,
    pub key: Option<EncryptionKey>,
}

impl Encoding {
    /// What the repository manifest records.
    pub fn name(&self) -> &'static str {
        if self.key.is_some() {
            "zstd+xchacha20poly1305"
        } else {
            "zstd"
        }
    }

    /// The encoding and the key's id, as each object's metadata records them.
    pub fn tag(&self) -> String {
        match &self.key {
            Some(k) => format!("{}:{}", self.name(), k.id),
            None => self.name().to_string(),
        }
    }
}

/// A 32-byte key from `--encrypt-key-file`.
pub struct EncryptionKey {
    key: [u8; 32],
    /// blake3 of the key, shortened: tells which key an image needs without revealing it.
    pub id: String,
}

impl EncryptionKey {
    pub fn load(path: &Path) -> Result<EncryptionKey, RepoError> {
        let refuse = |s: String| Err(RepoError::Refused(s));
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) => return refuse(format!("cannot read the key file {}: {e}", path.display())),
        };
        if meta.permissions().mode() & 0o077 != 0 {
            return refuse(format!(
                "the key file {} can be read by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        let bytes = fs::read(path).map_err(super::io_error(format!(
            "cannot read the key file {}",
            path.display()
        )))?;
        let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) else {
            return refuse(format!(
                "the key file {} holds {} bytes, a key is exactly 32 random bytes (make one with `head -c 32 /dev/urandom > FILE`)",
                path.display(),
                bytes.len()
            ));
        };
        Ok(EncryptionKey {
            id: blake3::hash(&key).to_hex()[..16].to_string(),
            key,
        })
    }

    /// The MAC of an encrypted image's repository manifest: keyed blake3 (under a key
    /// derived from this one) of the image's name and the manifest's bytes as stored.
    /// The objects authenticate themselves, but the manifest names their checksums,
    /// sizes and the image's coordinates; unsealed, whoever can write to the bucket could
    /// swap in another image's objects (same names, same key) with a manifest to match.
    pub fn seal(&self, name: &str, manifest: &[u8]) -> String {
        let key = blake3::derive_key("hotbackup 2026-11 repository manifest MAC", &self.key);
        let mut h = blake3::Hasher::new_keyed(&key);
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(manifest);
        h.finalize().to_hex().to_string()
    }

    /// Whether `mac` is the seal of `name` and `manifest` (compared in constant time).
    pub fn opens(&self, name: &str, manifest: &[u8], mac: &str) -> bool {
        blake3::Hash::from_hex(mac)
            .is_ok_and(|m| m == blake3::Hash::from_hex(self.seal(name, manifest)).unwrap())
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.key).into())
    }
}

/// Counts and hashes what passes through: plain blake3 (stored bytes), or an image
/// file's content digest as its manifest names it.
pub struct Hashing<T> {
    pub inner: T,
    pub hasher: ContentHasher,
    pub len: u64,
}

impl<T> Hashing<T> {
    pub fn new(inner: T) -> Hashing<T> {
        Hashing::with(inner, Algorithm::Blake3)
    }

    pub fn with(inner: T, algorithm: Algorithm) -> Hashing<T> {
        Hashing {
            inner,
            hasher: ContentHasher::new(algorithm),
            len: 0,
        }
    }

    pub fn hex(&self) -> String {
        self.hasher.finalize()
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.write_all(&buf[..n])?;
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.write_all(&buf[..n])?;
        self.len += n as u64;
        Ok(n)
    }
}

/// Stores `src` into `sink`; returns the sink and the length and `digest` of what was
/// read. `threads` are zstd workers for this object (0: compress on the calling thread).
pub fn encode<W: Write>(
    src: impl Read,
    sink: W,
    encoding: &Encoding,
    threads: u32,
    digest: Algorithm,
    aad: &str,
) -> io::Result<(W, u64, String)> {
    let mut src = Hashing::with(src, digest);
    let sink = match &encoding.key {
        None => compress(&mut src, sink, encoding.level, threads)?,
        Some(key) => {
            let mut nonce = [0u8; NONCE_PREFIX];
            OsRng.fill_bytes(&mut nonce);
            let mut sink = sink;
            sink.write_all(MAGIC)?;
            sink.write_all(&nonce)?;
            let encrypting = Encrypting {
                inner: sink,
                stream: EncryptorBE32::from_aead(key.cipher(), (&nonce).into()),
                buffer: Vec::with_capacity(CHUNK),
                aad: aad.as_bytes().to_vec(),
            };
            compress(&mut src, encrypting, encoding.level, threads)?.finish()?
        }
    };
    let hex = src.hex();
    Ok((sink, src.len, hex))
}

fn compress<W: Write>(src: &mut impl Read, sink: W, level: i32, threads: u32) -> io::Result<W> {
    let mut encoder = zstd::stream::write::Encoder::new(sink, level)?;
    if threads > 0 {
        encoder.multithread(threads)?;
    }
    io::copy(src, &mut encoder)?;
    encoder.finish()
}

/// Restores a stored object from `src` into `sink`; returns the length and `digest` of
/// what was written. Everything in `src` is read, so a hash of it covers the whole object.
pub fn decode(
    src: &mut impl Read,
    sink: impl Write,
    key: Option<&EncryptionKey>,
    digest: Algorithm,
    aad: &str,
) -> io::Result<(u64, String)> {
    let mut sink = Hashing::with(sink, digest);
    match key {
        None => {
            let mut d = zstd::stream::read::Decoder::new(&mut *src)?;
            io::copy(&mut d, &mut sink)?;
        }
        Some(key) => {
            let mut header = [0u8; MAGIC.len() + NONCE_PREFIX];
            src.read_exact(&mut header)
                .map_err(|_| bad("shorter than its header"))?;
            if &header[..MAGIC.len()] != MAGIC {
                return Err(bad("not an encrypted hotbackup object"));
            }
            let nonce: [u8; NONCE_PREFIX] = header[MAGIC.len()..].try_into().expect("sized");
            let decrypting = Decrypting {
                inner: &mut *src,
                stream: Some(DecryptorBE32::from_aead(key.cipher(), (&nonce).into())),
                plain: Vec::new(),
                pos: 0,
                carry: None,
                aad: aad.as_bytes().to_vec(),
            };
            let mut d = zstd::stream::read::Decoder::new(decrypting)?;
            io::copy(&mut d, &mut sink)?;
        }
    }
    io::copy(src, &mut io::sink())?;
    let hex = sink.hex();
    Ok((sink.len, hex))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

struct Encrypting<W> {
    inner: W,
    stream: EncryptorBE32<XChaCha20Poly1305>,
    buffer: Vec<u8>,
    aad: Vec<u8>,
}

impl<W: Write> Encrypting<W> {
    fn finish(self) -> io::Result<W> {
        let Encrypting {
            mut inner,
            stream,
            buffer,
            aad,
        } = self;
        let sealed = stream
            .encrypt_last(Payload {
                msg: &buffer,
                aad: &aad,
            })
            .map_err(|_| io::Error::other("encryption failed"))?;
        inner.write_all(&sealed)?;
        Ok(inner)
    }
}

impl<W: Write> Write for Encrypting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A full chunk is sealed only when more data follows: the last chunk, full or
        // not, carries the last-chunk flag.
        if self.buffer.len() == CHUNK {
            let sealed = self
                .stream
                .encrypt_next(Payload {
                    msg: &self.buffer,
                    aad: &self.aad,
                })
                .map_err(|_| io::Error::other("encryption failed"))?;
            self.inner.write_all(&sealed)?;
            self.buffer.clear();
        }
        let n = buf.len().min(CHUNK - self.buffer.len());
        self.buffer.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Decrypting<R> {
    inner: R,
    stream: Option<DecryptorBE32<XChaCha20Poly1305>>,
    plain: Vec<u8>,
    pos: usize,
    /// One byte read past a full chunk to learn whether it was the last.
    carry: Option<u8>,
    aad: Vec<u8>,
}

impl<R: Read> Decrypting<R> {
    /// Decrypts the next chunk into `plain`; false at the end.
    fn next_chunk(&mut self) -> io::Result<bool> {
        if self.stream.is_none() {
            return Ok(false);
        }
        let mut sealed = Vec::with_capacity(CHUNK + TAG);
        if let Some(b) = self.carry.take() {
            sealed.push(b);
        }
        (&mut self.inner)
            .take((CHUNK + TAG - sealed.len()) as u64)
            .read_to_end(&mut sealed)?;
        let mut peek = [0u8; 1];
        let last = sealed.len() < CHUNK + TAG || self.inner.read(&mut peek)? == 0;
        let payload = Payload {
            msg: &sealed,
            aad: &self.aad,
        };
        let tampered = |_| bad("authentication failed: tampered, truncated or the wrong key");
        self.plain = if last {
            let stream = self.stream.take().expect("checked above");
            stream.decrypt_last(payload).map_err(tampered)?
        } else {
            self.carry = Some(peek[0]);
            let stream = self.stream.as_mut().expect("checked above");
            stream.decrypt_next(payload).map_err(tampered)?
        };
        self.pos = 0;
        Ok(true)
    }
}

impl<R: Read> Read for Decrypting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.plain.len() - self.pos);
        buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> EncryptionKey {
        EncryptionKey {
            key: [7; 32],
            id: "test".into(),
        }
    }

    fn roundtrip(data: &[u8], key: Option<EncryptionKey>) -> (Vec<u8>, Vec<u8>) {
        let encoding = Encoding { level: 3, key };
        let digest = Algorithm::B3z1;
        let (stored, len, hash) =
            encode(data, Vec::new(), &encoding, 0, digest, "data/t1.ibd").unwrap();
        assert_eq!(
            (len, hash.as_str()),
            (
                data.len() as u64,
                crate::digest::of_bytes(digest, data).as_str()
            )
        );
        let mut out = Vec::new();
        let (len, back) = decode(
            &mut stored.as_slice(),
            &mut out,
            encoding.key.as_ref(),
            digest,
            "data/t1.ibd",
        )
        .unwrap();
        assert_eq!((len, back), (data.len() as u64, hash));
        (stored, out)
    }

    #[test]
    fn files_come_back_byte_for_byte_plain_and_encrypted() {
        // Sizes around the chunk size, where the last-chunk rule matters.
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            assert_eq!(roundtrip(&data, None).1, data, "plain, {size} bytes");
            assert_eq!(
                roundtrip(&data, Some(key())).1,
                data,
                "encrypted, {size} bytes"
            );
        }
    }

    #[test]
    fn encrypted_objects_refuse_tampering_truncation_renaming_and_wrong_keys() {
        // Random bytes do not compress: several encrypted chunks.
        let mut data = vec![0u8; 3 * CHUNK];
        OsRng.fill_bytes(&mut data);
        let (stored, _) = roundtrip(&data, Some(key()));
        let fails = |bytes: &[u8], key: &EncryptionKey, aad: &str| {
            decode(&mut &bytes[..], io::sink(), Some(key), Algorithm::B3z1, aad).is_err()
        };
        let mut flipped = stored.clone();
        flipped[100] ^= 1;
        assert!(fails(&flipped, &key(), "data/t1.ibd"), "a flipped bit");
        let whole_chunks = MAGIC.len() + NONCE_PREFIX + CHUNK + TAG;
        assert!(
            fails(&stored[..whole_chunks], &key(), "data/t1.ibd"),
            "cut at a chunk"
        );
        assert!(
            fails(&stored, &key(), "data/t2.ibd"),
            "moved to another name"
        );
        let other = EncryptionKey {
            key: [8; 32],
            id: "other".into(),
        };
        assert!(fails(&stored, &other, "data/t1.ibd"), "the wrong key");
        assert!(!fails(&stored, &key(), "data/t1.ibd"));
    }

    #[test]
    fn zeros_cost_almost_nothing_stored() {
        // A sparse file's holes read as zeros: 64 MiB of them must stay small.
        let encoding = Encoding {
            level: 3,
            key: None,
        };
        let zeros = io::repeat(0).take(64 << 20);
        let (stored, len, _) =
            encode(zeros, Vec::new(), &encoding, 0, Algorithm::B3z1, "x").unwrap();
        assert_eq!(len, 64 << 20);
        assert!(stored.len() < 64 << 10, "{} bytes stored", stored.len());
    }
}
