//! Entries: lookup and the namespace operations (create, mkdir, mknod, symlink, link,
//! unlink, rmdir, rename), each mirrored into a running capture session.

use super::*;

impl PassthroughFs {
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<FileAttr> {
        let parent = self.inode(parent)?;
        self.lookup_in(&parent, &cstr(name)?)
    }

    pub fn forget(&self, id: u64, n: u64) {
        self.inodes.forget(id, n);
    }

    pub fn readlink(&self, id: u64) -> FsResult<Vec<u8>> {
        let inode = self.inode(id)?;
        Ok(sys::readlinkat(inode.fd())?)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        self.make_entry(parent, name, caller, |dir, name| {
            // SAFETY: `name` is NUL-terminated; the parent fd is valid.
            unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev as libc::dev_t) }
        })
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        self.make_entry(parent, name, caller, |dir, name| {
            // SAFETY: `name` is NUL-terminated; the parent fd is valid.
            unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }
        })
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> FsResult<FileAttr> {
        let target = cstr(target.as_os_str())?;
        self.make_entry(parent, name, caller, |dir, name| {
            // SAFETY: both strings are NUL-terminated; the parent fd is valid.
            unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }
        })
    }

    /// Creates `name` in `parent` with `make` (a syscall on the parent's fd, run with the
    /// caller's fs credentials so the entry gets their ownership) and mirrors it into a
    /// running session.
    fn make_entry(
        &self,
        parent: u64,
        name: &OsStr,
        caller: Caller,
        make: impl FnOnce(i32, &CStr) -> libc::c_int,
    ) -> FsResult<FileAttr> {
        let ns = self.enter_namespace();
        let parent = self.inode(parent)?;
        let name = cstr(name)?;
        {
            let _creds = FsCredentials::assume(caller.uid, caller.gid);
            cvt(make(parent.fd().as_raw_fd(), &name))?;
        }
        self.created(&ns, &parent, &name)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, 0)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, libc::AT_REMOVEDIR)
    }

    pub(super) fn remove(&self, parent: u64, name: &OsStr, flags: i32) -> FsResult<()> {
        let ns = self.enter_namespace();
        let parent = self.inode(parent)?;
        let cname = cstr(name)?;
        let victim = ns
            .session()
            .and_then(|_| sys::fstatat(parent.fd(), &cname, libc::AT_SYMLINK_NOFOLLOW).ok())
            .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
            .map(|st| InodeKey::of(&st));
        let rel = ns.session().and_then(|_| self.child_rel(&parent, name));
        // SAFETY: `name` is NUL-terminated; the parent fd is valid.
        cvt(unsafe { libc::unlinkat(parent.fd().as_raw_fd(), cname.as_ptr(), flags) })?;
        if let Some(session) = ns.session() {
            match rel {
                Some(rel) => session.removed(&rel, victim, flags & libc::AT_REMOVEDIR != 0),
                None => session.unresolvable("a removed entry"),
            }
        }
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let ns = self.enter_namespace();
        let from = self.inode(parent)?;
        let to = self.inode(newparent)?;
        let cname = cstr(name)?;
        let cnewname = cstr(newname)?;
        // Some(None): the session runs but the paths could not be resolved.
        let mirror = ns.session().and_then(|_| {
            let key_at = |dir: &Inode, name: &CStr| {
                sys::fstatat(dir.fd(), name, libc::AT_SYMLINK_NOFOLLOW)
                    .ok()
                    .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
                    .map(|st| InodeKey::of(&st))
            };
            let replaced = key_at(&to, &cnewname);
            // Renaming a name onto another link of the same inode changes nothing.
            if replaced.is_some() && replaced == key_at(&from, &cname) {
                return None;
            }
            Some(
                self.child_rel(&from, name)
                    .zip(self.child_rel(&to, newname))
                    .map(|(a, b)| (a, b, replaced)),
            )
        });
        // SAFETY: both names are NUL-terminated; both parent fds are valid.
        cvt(unsafe {
            libc::renameat2(
                from.fd().as_raw_fd(),
                cname.as_ptr(),
                to.fd().as_raw_fd(),
                cnewname.as_ptr(),
                flags,
            )
        })?;
        match (ns.session(), mirror) {
            (Some(session), Some(Some((a, b, replaced)))) => {
                session.renamed(&a, &b, flags, replaced)
            }
            (Some(session), Some(None)) => session.unresolvable("a renamed entry"),
            _ => {}
        }
        Ok(())
    }

    pub fn link(&self, id: u64, newparent: u64, newname: &OsStr) -> FsResult<FileAttr> {
        let ns = self.enter_namespace();
        let inode = self.inode(id)?;
        let parent = self.inode(newparent)?;
        let newname = cstr(newname)?;
        let name = Self::proc_name(inode.fd());
        // SAFETY: names are NUL-terminated; the fds are valid. AT_SYMLINK_FOLLOW follows the
        // /proc magic link to the inode itself (never further).
        cvt(unsafe {
            libc::linkat(
                self.proc_fds.as_raw_fd(),
                name.as_ptr(),
                parent.fd().as_raw_fd(),
                newname.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })?;
        let attr = self.lookup_in(&parent, &newname)?;
        if let Some(session) = ns.session() {
            match self.child_rel(&parent, OsStr::from_bytes(newname.to_bytes())) {
                Some(rel) => session.linked(inode.key, &rel),
                None => session.unresolvable("a new hard link"),
            }
        }
        Ok(attr)
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(FileAttr, Opened)> {
        let ns = self.enter_namespace();
        let parent = self.inode(parent)?;
        let name = cstr(name)?;
        let (file, made) = self.create_or_open(&parent, &name, mode, flags, caller)?;
        let path_fd = sys::openat(
            self.proc_fds.as_raw_fd(),
            &Self::proc_name(file.as_fd()),
            libc::O_PATH,
            0,
        )?;
        let mut st = sys::fstat_path(path_fd.as_fd())?;
        let inode = self.inodes.remember(path_fd, &st);
        if made {
            self.mirror_created(&ns, &parent, &name, &st);
        } else if flags & libc::O_TRUNC != 0 {
            // An existing file: its truncation is a size change the session must see.
            self.truncate(&inode, file.as_fd(), 0)?;
            st = sys::fstat_path(inode.fd())?;
        }
        let attr = self.attr(&inode, &st);
        drop(ns);
        let (file, direct) = if flags & libc::O_DIRECT != 0 {
            self.open_for_io(file.as_fd(), flags & !libc::O_TRUNC)?
        } else {
            (file, false)
        };
        let fh = self.add_file_handle(inode, file, flags, direct);
        Ok((
            attr,
            Opened {
                fh,
                direct_io: flags & libc::O_DIRECT != 0,
            },
        ))
    }

    /// Creates `name` in `parent`, or (without `O_EXCL`) opens it if it exists; true when
    /// this call made it. Never truncates: see `create`.
    pub(super) fn create_or_open(
        &self,
        parent: &Inode,
        name: &CStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(OwnedFd, bool)> {
        let plain = flags & !STRIPPED_OPEN_FLAGS;
        loop {
            let made = {
                let _creds = FsCredentials::assume(caller.uid, caller.gid);
                sys::openat(
                    parent.fd().as_raw_fd(),
                    name,
                    plain | libc::O_CREAT | libc::O_EXCL,
                    mode,
                )
            };
            match made {
                Ok(file) => return Ok((file, true)),
                Err(Errno::EEXIST) if flags & libc::O_EXCL == 0 => {}
                Err(e) => return Err(e.into()),
            }
            match sys::openat(parent.fd().as_raw_fd(), name, plain | libc::O_NOFOLLOW, 0) {
                Ok(file) => return Ok((file, false)),
                // Removed in between: try creating it again.
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
