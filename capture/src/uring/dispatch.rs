//! One request from the ring to `PassthroughFs` and its answer back into the ring
//! entry's payload buffer, which carries the request's arguments in and the reply out.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use fuser::{Errno, TimeOrNow};

use super::abi::{self, Fields, InHeader, Out};
use crate::fs::{Caller, PassthroughFs, SetAttr, XattrReply};
use crate::fuse::{open_flags, serve};
use crate::stats::Op;

/// What the dispatcher answers: the reply's length in the payload buffer, or an errno.
pub type Answer = Result<usize, i32>;

/// Serves one request. `payload[..in_len]` holds its arguments after the op header
/// (`op_in`); the reply is written from `payload[0]` once the arguments are used.
pub fn dispatch(
    fs: &PassthroughFs,
    h: &InHeader,
    op_in: &[u8],
    payload: &mut [u8],
    in_len: usize,
) -> Answer {
    let in_len = in_len.min(payload.len());
    let mut f = Fields::new(op_in);
    let who = Caller {
        uid: h.uid,
        gid: h.gid,
    };
    let id = h.nodeid;
    let ttl = fs.ttl;
    let answer = match h.opcode {
        abi::LOOKUP => {
            let name = name(payload, in_len)?;
            let attr = ok(serve(fs, Op::lookup, |fs| fs.lookup(id, &name)))?;
            reply(payload, |o| o.entry(&attr, ttl))
        }
        abi::GETATTR => {
            let flags = f.u32();
            f.skip(4);
            let fh = f.u64();
            let fh = (flags & abi::GETATTR_FH != 0).then_some(fh);
            let attr = ok(serve(fs, Op::getattr, |fs| fs.getattr(id, fh)))?;
            reply(payload, |o| o.attr_out(&attr, ttl))
        }
        abi::SETATTR => {
            let (fh, set) = setattr_in(&mut f);
            let attr = ok(serve(fs, Op::setattr, |fs| fs.setattr(id, fh, set)))?;
            reply(payload, |o| o.attr_out(&attr, ttl))
        }
        abi::READLINK => {
            let target = ok(serve(fs, Op::readlink, |fs| fs.readlink(id)))?;
            data(payload, &target)
        }
        abi::SYMLINK => {
            let (link, rest) = abi::split_cstr(&payload[..in_len]).ok_or(libc::EINVAL)?;
            let (target, _) = abi::split_cstr(rest).ok_or(libc::EINVAL)?;
            let (link, target) = (os(link), os(target));
            let attr = ok(serve(fs, Op::symlink, |fs| {
                fs.symlink(id, &link, Path::new(&target), who)
            }))?;
            reply(payload, |o| o.entry(&attr, ttl))
        }
        abi::MKNOD => {
            let (mode, rdev) = (f.u32(), f.u32());
            let name = name(payload, in_len)?;
            let attr = ok(serve(fs, Op::mknod, |fs| {
                fs.mknod(id, &name, mode, rdev, who)
            }))?;
            reply(payload, |o| o.entry(&attr, ttl))
        }
        abi::MKDIR => {
            let mode = f.u32();
            let name = name(payload, in_len)?;
            let attr = ok(serve(fs, Op::mkdir, |fs| fs.mkdir(id, &name, mode, who)))?;
            reply(payload, |o| o.entry(&attr, ttl))
        }
        abi::UNLINK => {
            let name = name(payload, in_len)?;
            ok(serve(fs, Op::unlink, |fs| fs.unlink(id, &name)))?;
            Ok(0)
        }
        abi::RMDIR => {
            let name = name(payload, in_len)?;
            ok(serve(fs, Op::rmdir, |fs| fs.rmdir(id, &name)))?;
            Ok(0)
        }
        abi::RENAME | abi::RENAME2 => {
            let newdir = f.u64();
            let flags = if h.opcode == abi::RENAME2 { f.u32() } else { 0 };
            let (old, rest) = abi::split_cstr(&payload[..in_len]).ok_or(libc::EINVAL)?;
            let (new, _) = abi::split_cstr(rest).ok_or(libc::EINVAL)?;
            let (old, new) = (os(old), os(new));
            ok(serve(fs, Op::rename, |fs| {
                fs.rename(id, &old, newdir, &new, flags)
            }))?;
            Ok(0)
        }
        abi::LINK => {
            let target = f.u64();
            let name = name(payload, in_len)?;
            let attr = ok(serve(fs, Op::link, |fs| fs.link(target, id, &name)))?;
            reply(payload, |o| o.entry(&attr, ttl))
        }
        abi::OPEN => {
            let flags = f.u32() as i32;
            let opened = ok(serve(fs, Op::open, |fs| fs.open(id, flags)))?;
            reply(payload, |o| o.open(opened.fh, open_flags(&opened).bits()))
        }
        abi::READ => {
            let (fh, offset, size) = (f.u64(), f.u64(), f.u32() as usize);
            let buf = payload.get_mut(..size).ok_or(libc::EINVAL)?;
            ok(serve(fs, Op::read, |fs| fs.read_into(fh, offset, buf)))
        }
        abi::WRITE => {
            let (fh, offset, size, flags) = (f.u64(), f.u64(), f.u32() as usize, f.u32());
            let bytes = payload.get(..size.min(in_len)).ok_or(libc::EINVAL)?;
            let kill = flags & abi::WRITE_KILL_SUIDGID != 0;
            let n = ok(serve(fs, Op::write, |fs| fs.write(fh, offset, bytes, kill)))?;
            reply(payload, |o| {
                o.u32(n as u32);
                o.u32(0);
            })
        }
        abi::STATFS => {
            let st = ok(serve(fs, Op::statfs, |fs| fs.statfs(id)))?;
            reply(payload, |o| {
                for v in [st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree] {
                    o.u64(v);
                }
                o.u32(st.f_bsize as u32);
                o.u32(st.f_namemax as u32);
                o.u32(st.f_frsize as u32);
                o.zeros(4 + 6 * 4);
            })
        }
        abi::RELEASE | abi::RELEASEDIR => {
            let op = if h.opcode == abi::RELEASE {
                Op::release
            } else {
                Op::releasedir
            };
            let fh = f.u64();
            fs.stats.count(op);
            fs.release(fh);
            Ok(0)
        }
        abi::FSYNC | abi::FSYNCDIR => {
            let (fh, flags) = (f.u64(), f.u32());
            let datasync = flags & abi::FSYNC_FDATASYNC != 0;
            if h.opcode == abi::FSYNC {
                ok(serve(fs, Op::fsync, |fs| fs.fsync(fh, datasync)))?;
            } else {
                ok(serve(fs, Op::fsyncdir, |fs| fs.fsyncdir(fh, datasync)))?;
            }
            Ok(0)
        }
        abi::SETXATTR => {
            let (size, flags) = (f.u32() as usize, f.u32() as i32);
            let (name, value) = abi::split_cstr(&payload[..in_len]).ok_or(libc::EINVAL)?;
            let value = value.get(..size).ok_or(libc::EINVAL)?;
            ok(serve(fs, Op::setxattr, |fs| {
                fs.setxattr(id, OsStr::from_bytes(name), value, flags)
            }))?;
            Ok(0)
        }
        abi::GETXATTR => {
            let size = f.u32();
            let name = name(payload, in_len)?;
            let r = ok(serve(fs, Op::getxattr, |fs| fs.getxattr(id, &name, size)))?;
            xattr(payload, r)
        }
        abi::LISTXATTR => {
            let size = f.u32();
            let r = ok(serve(fs, Op::listxattr, |fs| fs.listxattr(id, size)))?;
            xattr(payload, r)
        }
        abi::REMOVEXATTR => {
            let name = name(payload, in_len)?;
            ok(serve(fs, Op::removexattr, |fs| fs.removexattr(id, &name)))?;
            Ok(0)
        }
        abi::FLUSH => {
            // Writes reach the backing file synchronously; nothing is buffered here.
            fs.stats.count(Op::flush);
            Ok(0)
        }
        abi::OPENDIR => {
            let fh = ok(serve(fs, Op::opendir, |fs| fs.opendir(id)))?;
            reply(payload, |o| o.open(fh, 0))
        }
        abi::READDIR => {
            let (fh, offset, size) = (f.u64(), f.u64(), f.u32() as usize);
            let room = size.min(payload.len());
            let mut out = Out::new(&mut payload[..room]);
            ok(serve(fs, Op::readdir, |fs| {
                fs.readdir(fh, offset, |ino, next, kind, name| {
                    !out.dirent(ino, next, kind, name.as_bytes())
                })
            }))?;
            Ok(out.len)
        }
        abi::READDIRPLUS => {
            let (fh, offset, size) = (f.u64(), f.u64(), f.u32() as usize);
            let room = size.min(payload.len());
            let mut out = Out::new(&mut payload[..room]);
            ok(serve(fs, Op::readdirplus, |fs| {
                fs.readdirplus(fh, offset, |next, name, attr| {
                    let name = name.as_bytes();
                    if 128 + abi::dirent_len(name) > out.room() {
                        return true;
                    }
                    out.entry(attr, ttl);
                    out.dirent(attr.ino.0, next, attr.kind, name);
                    false
                })
            }))?;
            Ok(out.len)
        }
        abi::ACCESS => {
            let mask = f.u32() as i32;
            ok(serve(fs, Op::access, |fs| fs.access(id, mask, who)))?;
            Ok(0)
        }
        abi::CREATE => {
            let (flags, mode) = (f.u32() as i32, f.u32());
            let name = name(payload, in_len)?;
            let (attr, opened) = ok(serve(fs, Op::create, |fs| {
                fs.create(id, &name, mode, flags, who)
            }))?;
            reply(payload, |o| {
                o.entry(&attr, ttl);
                o.open(opened.fh, open_flags(&opened).bits());
            })
        }
        abi::FALLOCATE => {
            let (fh, offset, length, mode) = (f.u64(), f.u64(), f.u64(), f.u32() as i32);
            ok(serve(fs, Op::fallocate, |fs| {
                fs.fallocate(fh, offset, length, mode)
            }))?;
            Ok(0)
        }
        abi::LSEEK => {
            let (fh, offset, whence) = (f.u64(), f.u64() as i64, f.u32() as i32);
            let off = ok(serve(fs, Op::lseek, |fs| fs.lseek(fh, offset, whence)))?;
            reply(payload, |o| o.u64(off as u64))
        }
        abi::COPY_FILE_RANGE => {
            let (fh_in, off_in) = (f.u64(), f.u64());
            f.skip(8);
            let (fh_out, off_out, len) = (f.u64(), f.u64(), f.u64());
            let n = ok(serve(fs, Op::copy_file_range, |fs| {
                fs.copy_file_range(fh_in, off_in, fh_out, off_out, len)
            }))?;
            reply(payload, |o| {
                o.u32(n as u32);
                o.u32(0);
            })
        }
        abi::DESTROY => Ok(0),
        // Polling (regular files are always ready), locks, ioctl, bmap, statx, syncfs:
        // ENOSYS makes the kernel stop asking or handle them itself, as over /dev/fuse.
        _ => Err(libc::ENOSYS),
    };
    if f.short {
        return Err(libc::EINVAL);
    }
    answer
}

fn ok<T>(r: Result<T, Errno>) -> Result<T, i32> {
    r.map_err(Errno::code)
}

fn os(b: &[u8]) -> std::ffi::OsString {
    OsStr::from_bytes(b).to_owned()
}

/// The NUL-terminated name that is a request's first argument.
fn name(payload: &[u8], in_len: usize) -> Result<std::ffi::OsString, i32> {
    let (name, _) = abi::split_cstr(&payload[..in_len]).ok_or(libc::EINVAL)?;
    Ok(os(name))
}

fn reply(payload: &mut [u8], write: impl FnOnce(&mut Out)) -> Answer {
    let mut out = Out::new(payload);
    write(&mut out);
    Ok(out.len)
}

fn data(payload: &mut [u8], bytes: &[u8]) -> Answer {
    let dst = payload.get_mut(..bytes.len()).ok_or(libc::EIO)?;
    dst.copy_from_slice(bytes);
    Ok(bytes.len())
}

fn xattr(payload: &mut [u8], r: XattrReply) -> Answer {
    match r {
        XattrReply::Size(n) => reply(payload, |o| {
            o.u32(n);
            o.u32(0);
        }),
        XattrReply::Data(d) => data(payload, &d),
    }
}

/// `struct fuse_setattr_in`.
fn setattr_in(f: &mut Fields) -> (Option<u64>, SetAttr) {
    let valid = f.u32();
    f.skip(4);
    let fh = f.u64();
    let size = f.u64();
    f.skip(8); // lock_owner
    let (atime, mtime) = (f.u64(), f.u64());
    f.skip(8); // ctime
    let (atimensec, mtimensec) = (f.u32(), f.u32());
    f.skip(4);
    let mode = f.u32();
    f.skip(4);
    let (uid, gid) = (f.u32(), f.u32());
    let has = |bit| valid & bit != 0;
    let time = |bit_set, bit_now, secs, nanos| {
        if has(bit_now) {
            Some(TimeOrNow::Now)
        } else if has(bit_set) {
            Some(TimeOrNow::SpecificTime(abi::time_of(secs, nanos)))
        } else {
            None
        }
    };
    let set = SetAttr {
        mode: has(abi::FATTR_MODE).then_some(mode),
        uid: has(abi::FATTR_UID).then_some(uid),
        gid: has(abi::FATTR_GID).then_some(gid),
        size: has(abi::FATTR_SIZE).then_some(size),
        atime: time(abi::FATTR_ATIME, abi::FATTR_ATIME_NOW, atime, atimensec),
        mtime: time(abi::FATTR_MTIME, abi::FATTR_MTIME_NOW, mtime, mtimensec),
    };
    (has(abi::FATTR_FH).then_some(fh), set)
}
