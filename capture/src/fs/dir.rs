//! Directories: open, read (with or without attributes), fsync; and statfs.

use super::*;

impl PassthroughFs {
    pub fn opendir(&self, id: u64) -> FsResult<u64> {
        let inode = self.inode(id)?;
        let file = self.reopen(&inode, libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(self.add_handle(inode, file))
    }

    /// Lists the directory from `offset` (0, or an offset returned with an earlier entry),
    /// handing each entry to `add` until it answers that its buffer is full.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> FsResult<()> {
        let handle = self.handle(fh)?;
        self.scan_dir(&handle, offset, |entry| {
            let kind = kind_of_dtype(entry.dtype)
                .or_else(|| self.kind_by_stat(&handle.inode, entry.name))
                .unwrap_or(FileType::RegularFile);
            Ok(add(
                entry.ino,
                entry.next_offset as u64,
                kind,
                OsStr::from_bytes(entry.name),
            ))
        })
    }

    /// Like `readdir`, with each entry's attributes; every entry handed out counts as a
    /// kernel lookup, except `.` and `..`, which the kernel does not take references on.
    pub fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, &OsStr, &FileAttr) -> bool,
    ) -> FsResult<()> {
        let handle = self.handle(fh)?;
        let dir = handle.inode.clone();
        self.scan_dir(&handle, offset, |entry| {
            let name = OsStr::from_bytes(entry.name);
            if entry.name == b"." || entry.name == b".." {
                let st = sys::fstat_path(dir.fd())?;
                let mut attr = attr_from_stat(entry.ino, &st);
                attr.ino = INodeNo(entry.ino);
                return Ok(add(entry.next_offset as u64, name, &attr));
            }
            let attr = match self.lookup_in(&dir, &cstr(name)?) {
                Ok(attr) => attr,
                // Removed since getdents saw it: leave it out.
                Err(FsError::Os(Errno::ENOENT)) => return Ok(false),
                Err(e) => return Err(e),
            };
            let full = add(entry.next_offset as u64, name, &attr);
            if full {
                self.inodes.forget(attr.ino.0, 1);
            }
            Ok(full)
        })
    }

    pub(super) fn scan_dir(
        &self,
        handle: &Handle,
        offset: u64,
        mut each: impl FnMut(&sys::RawDirEntry<'_>) -> FsResult<bool>,
    ) -> FsResult<()> {
        let _pos = handle.dir_pos.lock();
        let fd = handle.fd();
        // SAFETY: lseek on a valid directory fd, to a cookie getdents gave us (or 0).
        cvt(unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, libc::SEEK_SET) })?;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = sys::getdents(fd, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            for entry in sys::parse_dirents(&buf[..n]) {
                if each(&entry)? {
                    return Ok(());
                }
            }
        }
    }

    pub(super) fn kind_by_stat(&self, dir: &Inode, name: &[u8]) -> Option<FileType> {
        let name = CString::new(name).ok()?;
        let st = sys::fstatat(dir.fd(), &name, libc::AT_SYMLINK_NOFOLLOW).ok()?;
        Some(kind_of_mode(st.st_mode))
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> FsResult<()> {
        self.fsync(fh, datasync)
    }

    pub fn statfs(&self, id: u64) -> FsResult<libc::statvfs> {
        let inode = self.inode(id)?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `st` is a valid out-pointer; fstatvfs works on O_PATH fds.
        cvt(unsafe { libc::fstatvfs(inode.fd().as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstatvfs succeeded and filled `st`.
        Ok(unsafe { st.assume_init() })
    }
}
