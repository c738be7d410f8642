//! Attributes: getattr and setattr (a size change goes through the session), xattrs,
//! access checks, and the conversions from `stat` to fuser's attributes.

use super::*;

impl PassthroughFs {
    pub fn getattr(&self, id: u64, fh: Option<u64>) -> FsResult<FileAttr> {
        if let Some(handle) = fh.and_then(|fh| self.handle(fh).ok()) {
            let st = sys::fstat_path(handle.fd())?;
            return Ok(self.attr(&handle.inode, &st));
        }
        self.stat_inode(&*self.inode(id)?)
    }

    pub fn setattr(&self, id: u64, fh: Option<u64>, set: SetAttr) -> FsResult<FileAttr> {
        let inode = self.inode(id)?;
        let name = Self::proc_name(inode.fd());
        let proc = self.proc_fds.as_raw_fd();
        if let Some(mode) = set.mode {
            // SAFETY: `name` is a NUL-terminated fd number below /proc/self/fd.
            cvt(unsafe { libc::fchmodat(proc, name.as_ptr(), mode & 0o7777, 0) })?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.unwrap_or(u32::MAX);
            let gid = set.gid.unwrap_or(u32::MAX);
            // SAFETY: chown of the inode the O_PATH fd refers to; EMPTY is NUL-terminated.
            cvt(unsafe {
                libc::fchownat(
                    inode.fd().as_raw_fd(),
                    sys::EMPTY.as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if let Some(size) = set.size {
            let handle = fh.and_then(|fh| self.handle(fh).ok());
            let reopened;
            let fd = match &handle {
                Some(h) => h.fd(),
                None => {
                    reopened = self.reopen(&inode, libc::O_WRONLY)?;
                    reopened.as_fd()
                }
            };
            self.truncate(&inode, fd, size)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = [timespec_of(set.atime), timespec_of(set.mtime)];
            if inode.kind == libc::S_IFLNK {
                // SAFETY: `times` holds two timespecs; EMPTY is NUL-terminated.
                cvt(unsafe {
                    libc::utimensat(
                        inode.fd().as_raw_fd(),
                        sys::EMPTY.as_ptr(),
                        times.as_ptr(),
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            } else {
                // SAFETY: as above, through the /proc/self/fd name of the inode.
                cvt(unsafe { libc::utimensat(proc, name.as_ptr(), times.as_ptr(), 0) })?;
            }
        }
        self.stat_inode(&inode)
    }

    /// Sets the size of `inode`'s file through `fd`, in a running session's view.
    pub(super) fn truncate(&self, inode: &Inode, fd: BorrowedFd<'_>, size: u64) -> FsResult<()> {
        let truncate = || -> FsResult<()> {
            // SAFETY: ftruncate on a valid fd.
            cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) })?;
            Ok(())
        };
        let pass = self.gate.enter();
        match &pass.session {
            None => truncate(),
            Some(session) => session.resize(inode.key, truncate, || {
                sys::fstat_path(fd).ok().map(|st| st.st_size as u64)
            }),
        }
    }

    /// The `/proc/self/fd/N` path of an inode, for the path-only xattr calls.
    pub(super) fn xattr_path(&self, inode: &Inode) -> FsResult<CString> {
        if inode.kind == libc::S_IFLNK {
            // The proc magic link of a symlink cannot name the symlink for xattr calls.
            return Err(FsError::Os(Errno::ENOTSUP));
        }
        Ok(CString::new(format!("/proc/self/fd/{}", inode.fd().as_raw_fd())).expect("no NUL"))
    }

    pub fn setxattr(&self, id: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let inode = self.inode(id)?;
        let path = self.xattr_path(&inode)?;
        let name = cstr(name)?;
        // SAFETY: strings are NUL-terminated; `value` is valid for its length.
        cvt(unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })?;
        Ok(())
    }

    /// The value of an xattr, or with `size == 0` only its length (as `Err(len)` in `Ok`).
    pub fn getxattr(&self, id: u64, name: &OsStr, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(id)?;
        let path = match self.xattr_path(&inode) {
            Ok(p) => p,
            Err(_) => return Err(FsError::Os(Errno::ENODATA)),
        };
        let name = cstr(name)?;
        xattr_call(size, |buf, len| {
            // SAFETY: `buf` is valid for `len` bytes (or null with len 0).
            unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf, len) }
        })
    }

    pub fn listxattr(&self, id: u64, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(id)?;
        let Ok(path) = self.xattr_path(&inode) else {
            return Ok(if size == 0 {
                XattrReply::Size(0)
            } else {
                XattrReply::Data(Vec::new())
            });
        };
        xattr_call(size, |buf, len| {
            // SAFETY: `buf` is valid for `len` bytes (or null with len 0).
            unsafe { libc::listxattr(path.as_ptr(), buf.cast(), len) }
        })
    }

    pub fn removexattr(&self, id: u64, name: &OsStr) -> FsResult<()> {
        let inode = self.inode(id)?;
        let path = self.xattr_path(&inode)?;
        let name = cstr(name)?;
        // SAFETY: both strings are NUL-terminated.
        cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })?;
        Ok(())
    }

    pub fn access(&self, id: u64, mask: i32, caller: Caller) -> FsResult<()> {
        let inode = self.inode(id)?;
        let name = Self::proc_name(inode.fd());
        let _creds = FsCredentials::assume(caller.uid, caller.gid);
        // SAFETY: `name` is NUL-terminated below /proc/self/fd.
        cvt(unsafe {
            libc::faccessat(
                self.proc_fds.as_raw_fd(),
                name.as_ptr(),
                mask,
                libc::AT_EACCESS,
            )
        })?;
        Ok(())
    }
}

/// An xattr answer: the length the caller must provide, or the bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

fn xattr_call(
    size: u32,
    call: impl Fn(*mut libc::c_void, usize) -> libc::ssize_t,
) -> FsResult<XattrReply> {
    if size == 0 {
        let n = cvt(call(std::ptr::null_mut(), 0))?;
        return Ok(XattrReply::Size(n as u32));
    }
    let mut buf = vec![0u8; size as usize];
    let n = cvt(call(buf.as_mut_ptr().cast(), buf.len()))?;
    buf.truncate(n as usize);
    Ok(XattrReply::Data(buf))
}

fn timespec_of(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let (sec, nsec) = since_epoch(t);
            libc::timespec {
                tv_sec: sec as libc::time_t,
                tv_nsec: nsec as libc::c_long,
            }
        }
    }
}

/// Seconds and nanoseconds since the epoch as a `timespec` holds them: a time before it
/// has negative seconds and nanoseconds counted forward from there.
pub(crate) fn since_epoch(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            (sec, nsec)
        }
    }
}

/// The time a `timespec` (or the kernel's seconds and nanoseconds) holds.
pub(crate) fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

pub fn kind_of_mode(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

pub(super) fn kind_of_dtype(dtype: u8) -> Option<FileType> {
    Some(match dtype {
        libc::DT_DIR => FileType::Directory,
        libc::DT_REG => FileType::RegularFile,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => return None,
    })
}

pub fn attr_from_stat(id: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of_mode(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}
