//! The slice of the FUSE kernel ABI that the io_uring transport speaks itself: request
//! and reply layouts (little-endian, as the kernel's `struct`s lie in memory on the
//! platforms we run on), read and written field by field.

use std::time::{Duration, SystemTime};

use fuser::{FileAttr, FileType};

use crate::fs::{since_epoch, system_time};

// Opcodes (include/uapi/linux/fuse.h).
pub const LOOKUP: u32 = 1;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const SYMLINK: u32 = 6;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const RENAME: u32 = 12;
pub const LINK: u32 = 13;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const REMOVEXATTR: u32 = 24;
pub const FLUSH: u32 = 25;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const DESTROY: u32 = 38;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;
pub const RENAME2: u32 = 45;
pub const LSEEK: u32 = 46;
pub const COPY_FILE_RANGE: u32 = 47;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
/// `struct fuse_uring_req_header`: the in/out header area, the op header area and
/// `struct fuse_uring_ent_in_out`.
pub const RING_HEADER_LEN: usize = 128 + 128 + 32;
pub const OP_IN_AT: usize = 128;
pub const ENT_IN_OUT_AT: usize = 256;

pub const CMD_REGISTER: u32 = 1;
pub const CMD_COMMIT_AND_FETCH: u32 = 2;

pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;
pub const FATTR_FH: u32 = 1 << 6;
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
pub const FATTR_MTIME_NOW: u32 = 1 << 8;

pub const GETATTR_FH: u32 = 1 << 0;
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
pub const FSYNC_FDATASYNC: u32 = 1 << 0;

/// Reads little-endian fields in order; a short buffer reads as zeros and marks itself
/// `short`, which the dispatcher answers with EINVAL.
pub struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
    pub short: bool,
}

impl<'a> Fields<'a> {
    pub fn new(bytes: &'a [u8]) -> Fields<'a> {
        Fields {
            bytes,
            at: 0,
            short: false,
        }
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        match self.bytes.get(self.at..self.at + N) {
            Some(b) => {
                self.at += N;
                b.try_into().expect("slice of N bytes")
            }
            None => {
                self.short = true;
                [0; N]
            }
        }
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    pub fn skip(&mut self, n: usize) {
        if self.at + n > self.bytes.len() {
            self.short = true;
        }
        self.at = (self.at + n).min(self.bytes.len());
    }
}

/// `struct fuse_in_header`.
#[derive(Clone, Copy, Debug, Default)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
}

impl InHeader {
    pub fn parse(bytes: &[u8]) -> InHeader {
        let mut f = Fields::new(bytes);
        f.skip(4); // len: the ring gives the payload's length itself
        InHeader {
            opcode: f.u32(),
            unique: f.u64(),
            nodeid: f.u64(),
            uid: f.u32(),
            gid: f.u32(),
        }
    }
}

/// The NUL-terminated strings at the start of a payload (names, xattr names), and
/// what follows them.
pub fn split_cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    Some((&bytes[..nul], &bytes[nul + 1..]))
}

/// Appends reply structs to a buffer.
pub struct Out<'a> {
    pub buf: &'a mut [u8],
    pub len: usize,
}

impl<'a> Out<'a> {
    pub fn new(buf: &'a mut [u8]) -> Out<'a> {
        Out { buf, len: 0 }
    }

    pub fn room(&self) -> usize {
        self.buf.len() - self.len
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn zeros(&mut self, n: usize) {
        self.buf[self.len..self.len + n].fill(0);
        self.len += n;
    }

    /// `struct fuse_attr` (88 bytes).
    pub fn attr(&mut self, a: &FileAttr) {
        let (at, atn) = epoch(a.atime);
        let (mt, mtn) = epoch(a.mtime);
        let (ct, ctn) = epoch(a.ctime);
        self.u64(a.ino.0);
        self.u64(a.size);
        self.u64(a.blocks);
        self.u64(at);
        self.u64(mt);
        self.u64(ct);
        self.u32(atn);
        self.u32(mtn);
        self.u32(ctn);
        self.u32(mode_bits(a.kind) | u32::from(a.perm));
        self.u32(a.nlink);
        self.u32(a.uid);
        self.u32(a.gid);
        self.u32(a.rdev);
        self.u32(a.blksize);
        self.u32(a.flags);
    }

    /// `struct fuse_entry_out` (128 bytes).
    pub fn entry(&mut self, a: &FileAttr, ttl: Duration) {
        self.u64(a.ino.0);
        self.u64(0); // generation
        self.u64(ttl.as_secs());
        self.u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos());
        self.u32(ttl.subsec_nanos());
        self.attr(a);
    }

    /// `struct fuse_attr_out` (104 bytes).
    pub fn attr_out(&mut self, a: &FileAttr, ttl: Duration) {
        self.u64(ttl.as_secs());
        self.u32(ttl.subsec_nanos());
        self.u32(0);
        self.attr(a);
    }

    /// `struct fuse_open_out` (16 bytes).
    pub fn open(&mut self, fh: u64, open_flags: u32) {
        self.u64(fh);
        self.u32(open_flags);
        self.u32(0);
    }

    /// `struct fuse_dirent` with its name, padded to 8 bytes; false (nothing written)
    /// when it does not fit.
    pub fn dirent(&mut self, ino: u64, off: u64, kind: FileType, name: &[u8]) -> bool {
        let len = dirent_len(name);
        if len > self.room() {
            return false;
        }
        self.u64(ino);
        self.u64(off);
        self.u32(name.len() as u32);
        self.u32(mode_bits(kind) >> 12);
        self.bytes(name);
        self.zeros(len - 24 - name.len());
        true
    }
}

pub fn dirent_len(name: &[u8]) -> usize {
    (24 + name.len()).div_ceil(8) * 8
}

/// The `S_IFMT` bits of a file type.
pub fn mode_bits(kind: FileType) -> u32 {
    match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    }
}

/// Seconds and nanoseconds since the epoch, as the kernel's two's-complement u64 for a
/// time before it.
fn epoch(t: SystemTime) -> (u64, u32) {
    let (sec, nsec) = since_epoch(t);
    (sec as u64, nsec)
}

/// The time a `fuse_setattr_in` carries.
pub fn time_of(secs: u64, nanos: u32) -> SystemTime {
    system_time(secs as i64, nanos.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuser::INodeNo;
    use std::time::UNIX_EPOCH;

    fn attr() -> FileAttr {
        FileAttr {
            ino: INodeNo(7),
            size: 4096,
            blocks: 8,
            atime: UNIX_EPOCH + Duration::new(10, 5),
            mtime: UNIX_EPOCH - Duration::new(1, 250),
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o640,
            nlink: 1,
            uid: 3,
            gid: 4,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    #[test]
    fn entry_out_has_the_kernel_layout() {
        let mut buf = [0u8; 256];
        let mut out = Out::new(&mut buf);
        out.entry(&attr(), Duration::new(1, 500));
        assert_eq!(out.len, 128);
        let mut f = Fields::new(&buf[..128]);
        assert_eq!(f.u64(), 7, "nodeid");
        assert_eq!(f.u64(), 0, "generation");
        assert_eq!((f.u64(), f.u64()), (1, 1), "entry and attr valid");
        assert_eq!((f.u32(), f.u32()), (500, 500));
        assert_eq!((f.u64(), f.u64(), f.u64()), (7, 4096, 8), "ino size blocks");
        assert_eq!(f.u64(), 10, "atime");
        assert_eq!(f.u64() as i64, -2, "mtime before the epoch");
        f.skip(8);
        assert_eq!((f.u32(), f.u32()), (5, 1_000_000_000 - 250));
        f.skip(4);
        assert_eq!(f.u32(), libc::S_IFREG | 0o640, "mode");
        assert_eq!(time_of(-2i64 as u64, 1_000_000_000 - 250), attr().mtime);
    }

    #[test]
    fn dirents_are_padded_and_refused_when_full() {
        let mut buf = [0u8; 64];
        let mut out = Out::new(&mut buf);
        assert!(out.dirent(5, 1, FileType::Directory, b"abc"));
        assert_eq!(out.len, 32);
        assert!(!out.dirent(6, 2, FileType::RegularFile, &[b'x'; 20]));
        assert_eq!(out.len, 32, "an entry that does not fit is left out whole");
        assert!(out.dirent(6, 2, FileType::RegularFile, b"y"));
        assert_eq!(out.len, 64);
        assert_eq!(
            u32::from_le_bytes(buf[20..24].try_into().unwrap()),
            4,
            "DT_DIR"
        );
    }

    #[test]
    fn a_short_request_is_marked() {
        let mut f = Fields::new(&[1, 0, 0, 0]);
        assert_eq!(f.u32(), 1);
        assert!(!f.short);
        assert_eq!(f.u64(), 0);
        assert!(f.short);
        assert_eq!(split_cstr(b"ab\0cd"), Some((&b"ab"[..], &b"cd"[..])));
        assert_eq!(split_cstr(b"ab"), None);
    }
}
