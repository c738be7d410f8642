//! File I/O: open, read, write (mirrored), fsync, fallocate, lseek, copy_file_range;
//! `O_DIRECT` requests take the direct path when aligned.

use super::*;

impl PassthroughFs {
    pub fn open(&self, id: u64, flags: i32) -> FsResult<Opened> {
        let inode = self.inode(id)?;
        let (file, direct) = self.open_for_io(inode.fd(), flags)?;
        // Only with FUSE_ATOMIC_O_TRUNC does the kernel leave the truncation to open.
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.truncate(&inode, file.as_fd(), 0)?;
        }
        let fh = self.add_file_handle(inode, file, flags, direct);
        Ok(Opened {
            fh,
            direct_io: flags & libc::O_DIRECT != 0,
        })
    }

    /// Opens what `fd` refers to for I/O with `flags`, with `O_DIRECT` on the backing file
    /// when the application asked for it and the backing filesystem supports it.
    pub(super) fn open_for_io(&self, fd: BorrowedFd<'_>, flags: i32) -> FsResult<(OwnedFd, bool)> {
        let name = Self::proc_name(fd);
        let proc = self.proc_fds.as_raw_fd();
        let plain = flags & !STRIPPED_OPEN_FLAGS;
        if flags & libc::O_DIRECT != 0 {
            match sys::openat(proc, &name, plain | libc::O_DIRECT, 0) {
                Ok(file) => return Ok((file, true)),
                // The backing filesystem has no O_DIRECT (tmpfs): serve it buffered.
                Err(Errno::EINVAL) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok((sys::openat(proc, &name, plain, 0)?, false))
    }

    /// True when a request at `offset` of `len` bytes takes the direct path.
    pub(super) fn goes_direct(handle: &Handle, offset: u64, len: usize) -> bool {
        handle.direct.is_some() && direct::aligned(offset, len)
    }

    /// The fd for buffered I/O on the handle's file: its own, or for a direct file, the
    /// buffered fallback for requests the direct path cannot take.
    pub(super) fn buffered_fd<'h>(&self, handle: &'h Handle) -> FsResult<BorrowedFd<'h>> {
        match &handle.direct {
            None => Ok(handle.fd()),
            Some(d) => d.buffered(|| self.reopen(&handle.inode, handle.flags)),
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let n = self.read_into(fh, offset, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads into `buf` (the io_uring transport's payload buffer); returns the count,
    /// short at the end of the file.
    pub fn read_into(&self, fh: u64, offset: u64, buf: &mut [u8]) -> FsResult<usize> {
        let handle = self.handle(fh)?;
        let direct = Self::goes_direct(&handle, offset, buf.len());
        let n = match direct.then(|| direct::pread(handle.fd(), buf, offset)) {
            Some(Err(e)) if !direct::refused(e) => return Err(e.into()),
            Some(Ok(n)) => n,
            _ => sys::pread_full(self.buffered_fd(&handle)?, buf, offset)?,
        };
        self.stats.read_bytes(n);
        Ok(n)
    }

    /// Writes `data` at `offset`. `kill_suidgid`: the kernel asks us to drop set-id bits,
    /// as a write by an unprivileged user does on a local filesystem.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> FsResult<usize> {
        let handle = self.handle(fh)?;
        let pass = self.gate.enter();
        self.hooks.fire("write.entered", offset);
        let n = match &pass.session {
            None => self.write_source(&handle, offset, data)?,
            Some(session) => session.write(handle.inode.key, offset, data, || {
                self.write_source(&handle, offset, data)
            })?,
        };
        drop(pass);
        if kill_suidgid {
            drop_setid_bits(handle.fd())?;
        }
        self.stats.written_bytes(n);
        Ok(n)
    }

    pub(super) fn write_source(
        &self,
        handle: &Handle,
        offset: u64,
        data: &[u8],
    ) -> FsResult<usize> {
        let direct = Self::goes_direct(handle, offset, data.len());
        Ok(
            match direct.then(|| direct::pwrite(handle.fd(), data, offset)) {
                Some(Err(e)) if !direct::refused(e) => return Err(e.into()),
                Some(Ok(n)) => n,
                _ => sys::pwrite_full(self.buffered_fd(handle)?, data, offset)?,
            },
        )
    }

    pub fn release(&self, fh: u64) {
        self.handles.write().remove(&fh);
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let fd = handle.fd().as_raw_fd();
        // SAFETY: fsync/fdatasync on a valid fd.
        cvt(unsafe {
            if datasync {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        })?;
        Ok(())
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let allocate = || -> FsResult<()> {
            // SAFETY: fallocate on a valid fd.
            cvt(unsafe {
                libc::fallocate(
                    handle.fd().as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            })?;
            Ok(())
        };
        let pass = self.gate.enter();
        match &pass.session {
            None => allocate(),
            Some(session) => session.fallocate(handle.inode.key, mode, offset, length, allocate),
        }
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let handle = self.handle(fh)?;
        // SAFETY: lseek on a valid fd. The backing fd's position is never used for I/O
        // (all I/O is positional), so moving it is harmless.
        Ok(cvt(unsafe {
            libc::lseek(handle.fd().as_raw_fd(), offset, whence)
        })?)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> FsResult<usize> {
        let input = self.handle(fh_in)?;
        let output = self.handle(fh_out)?;
        let copy = || -> FsResult<usize> {
            let mut off_in = offset_in as libc::loff_t;
            let mut off_out = offset_out as libc::loff_t;
            // SAFETY: valid fds and offset out-pointers.
            let n = cvt(unsafe {
                libc::copy_file_range(
                    input.fd().as_raw_fd(),
                    &mut off_in,
                    output.fd().as_raw_fd(),
                    &mut off_out,
                    len as usize,
                    0,
                )
            })?;
            Ok(n as usize)
        };
        let pass = self.gate.enter();
        let n = match &pass.session {
            None => copy()?,
            Some(session) => {
                // The output may be open write-only: read what landed through a reader of
                // its own (the output's range lock keeps it stable until mirrored).
                let readback = self.reopen(&output.inode, libc::O_RDONLY)?;
                session.write_from_source(
                    output.inode.key,
                    offset_out,
                    len,
                    readback.as_fd(),
                    copy,
                )?
            }
        };
        self.stats.written_bytes(n);
        Ok(n)
    }
}

/// Clears set-user-id and set-group-id (when group-executable), as the kernel does on a
/// write by an unprivileged user.
fn drop_setid_bits(fd: BorrowedFd<'_>) -> FsResult<()> {
    let st = sys::fstat_path(fd)?;
    let mut mode = st.st_mode & 0o7777;
    let before = mode;
    mode &= !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        mode &= !libc::S_ISGID;
    }
    if mode != before {
        // SAFETY: fchmod on a valid, non-O_PATH fd.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })?;
    }
    Ok(())
}
