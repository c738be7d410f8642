//! Adapter from fuser's callbacks to `PassthroughFs`: every callback has the same shape,
//! count, call (a panic becomes EIO, never a hung request), reply or errno.

use std::ffi::OsStr;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, PollEvents, PollFlags,
    PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Caller, FsResult, Opened, PassthroughFs, SetAttr, XattrReply};
use crate::stats::{AppLatency, Op};
use crate::uring::Negotiation;

/// Largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1024 * 1024;

pub struct FuseAdapter {
    fs: Arc<PassthroughFs>,
    /// Set when the mount would take io_uring: INIT asks for it and says what it got.
    uring: Option<Arc<Negotiation>>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<PassthroughFs>, uring: Option<Arc<Negotiation>>) -> FuseAdapter {
        FuseAdapter { fs, uring }
    }

    fn run<T>(&self, op: Op, call: impl FnOnce(&PassthroughFs) -> FsResult<T>) -> Result<T, Errno> {
        serve(&self.fs, op, call)
    }

    fn reply_entry(&self, reply: ReplyEntry, r: Result<fuser::FileAttr, Errno>) {
        match r {
            Ok(attr) => reply.entry(&self.fs.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

/// Runs one operation the way every transport does: count, call (a panic becomes EIO,
/// never a hung request), time the application's syncs, count the error.
pub(crate) fn serve<T>(
    fs: &PassthroughFs,
    op: Op,
    call: impl FnOnce(&PassthroughFs) -> FsResult<T>,
) -> Result<T, Errno> {
    fs.stats.count(op);
    let timed = AppLatency::times(op).then(Instant::now);
    let outcome = catch_unwind(AssertUnwindSafe(|| call(fs)));
    if let Some(t0) = timed {
        fs.stats.latency.record(op, t0.elapsed());
    }
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            fs.stats.error(e.errno() as i32);
            tracing::trace!(op = op.name(), error = %e, "operation failed");
            Err(Errno::from_i32(e.errno() as i32))
        }
        Err(_) => {
            fs.stats.error(libc::EIO);
            tracing::error!(op = op.name(), "panic while serving; answered EIO");
            Err(Errno::EIO)
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

pub(crate) fn open_flags(opened: &Opened) -> FopenFlags {
    if opened.direct_io {
        // O_DIRECT: no page cache on our side either; writes to distinct ranges of one
        // file may run in parallel (the kernel still serializes extending writes).
        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
    } else {
        // Only this daemon changes the backing files, so cached pages stay valid.
        FopenFlags::FOPEN_KEEP_CACHE
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Each is optional: a kernel that lacks one still serves correctly.
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            // With killpriv_v2 the kernel marks inodes S_NOSEC and stops asking for
            // security.capability before every write; we drop set-id bits ourselves.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::debug!(?missing, "kernel lacks FUSE capability");
            }
        }
        if let Some(uring) = &self.uring {
            uring.decided(
                config
                    .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                    .is_ok(),
            );
        }
        Ok(())
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        // ENOSYS once makes the kernel stop asking for this mount and treat files as
        // always ready, which regular files on the backing filesystem are.
        reply.error(Errno::ENOSYS);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.run(Op::lookup, |fs| fs.lookup(parent.0, name));
        self.reply_entry(reply, r);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.stats.count(Op::forget);
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.run(Op::getattr, |fs| fs.getattr(ino.0, fh.map(|f| f.0))) {
            Ok(attr) => reply.attr(&self.fs.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        match self.run(Op::setattr, |fs| fs.setattr(ino.0, fh.map(|f| f.0), set)) {
            Ok(attr) => reply.attr(&self.fs.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.run(Op::readlink, |fs| fs.readlink(ino.0)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let r = self.run(Op::mknod, |fs| fs.mknod(parent.0, name, mode, rdev, who));
        self.reply_entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let r = self.run(Op::mkdir, |fs| fs.mkdir(parent.0, name, mode, who));
        self.reply_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.run(Op::unlink, |fs| fs.unlink(parent.0, name)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.run(Op::rmdir, |fs| fs.rmdir(parent.0, name)));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let r = self.run(Op::symlink, |fs| {
            fs.symlink(parent.0, link_name, target, who)
        });
        self.reply_entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.run(Op::rename, |fs| {
            fs.rename(parent.0, name, newparent.0, newname, flags.bits())
        });
        empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.run(Op::link, |fs| fs.link(ino.0, newparent.0, newname));
        self.reply_entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.run(Op::open, |fs| fs.open(ino.0, flags.0)) {
            Ok(opened) => reply.opened(FileHandle(opened.fh), open_flags(&opened)),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.run(Op::read, |fs| fs.read(fh.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.run(Op::write, |fs| fs.write(fh.0, offset, data, kill)) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes reach the backing file synchronously; there is nothing buffered to flush.
        self.fs.stats.count(Op::flush);
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.stats.count(Op::release);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.run(Op::fsync, |fs| fs.fsync(fh.0, datasync)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.run(Op::opendir, |fs| fs.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.run(Op::readdir, |fs| {
            fs.readdir(fh.0, offset, |ino, next, kind, name| {
                reply.add(INodeNo(ino), next, kind, name)
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.fs.ttl;
        let r = self.run(Op::readdirplus, |fs| {
            fs.readdirplus(fh.0, offset, |next, name, attr| {
                reply.add(attr.ino, next, name, &ttl, attr, Generation(0))
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.stats.count(Op::releasedir);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.run(Op::fsyncdir, |fs| fs.fsyncdir(fh.0, datasync)),
        );
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.run(Op::statfs, |fs| fs.statfs(ino.0)) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.run(Op::setxattr, |fs| fs.setxattr(ino.0, name, value, flags)),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.run(Op::getxattr, |fs| fs.getxattr(ino.0, name, size)) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.run(Op::listxattr, |fs| fs.listxattr(ino.0, size)) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            self.run(Op::removexattr, |fs| fs.removexattr(ino.0, name)),
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let who = caller(req);
        empty(
            reply,
            self.run(Op::access, |fs| fs.access(ino.0, mask.bits(), who)),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let who = caller(req);
        match self.run(Op::create, |fs| fs.create(parent.0, name, mode, flags, who)) {
            Ok((attr, opened)) => reply.created(
                &self.fs.ttl,
                &attr,
                Generation(0),
                FileHandle(opened.fh),
                open_flags(&opened),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.run(Op::fallocate, |fs| fs.fallocate(fh.0, offset, length, mode)),
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.run(Op::lseek, |fs| fs.lseek(fh.0, offset, whence)) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let r = self.run(Op::copy_file_range, |fs| {
            fs.copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        });
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }
}
