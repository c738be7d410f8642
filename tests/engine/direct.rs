//! The filesystem driven without a mount: each operation is the call (or calls) the
//! kernel would make, on paths resolved by lookups from the root. The model test runs
//! many more cases this way than through FUSE, on the same engine.
//!
//! One guarantee of the kernel's is kept here too: a namespace operation holds its
//! directories locked, so no lookup reaches an entry while it is being created (the VFS
//! takes the parent's `i_rwsem`). Without it a test could truncate a file between its
//! creation in the backing directory and its registration in the session, which no
//! application on the mount can do.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::RwLock;

use capture::PassthroughFs;
use capture::fs::{Caller, SetAttr};

const ROOT: u64 = 1;
const ME: Caller = Caller { uid: 0, gid: 0 };

pub struct Direct<'a> {
    pub fs: &'a PassthroughFs,
    /// Held shared while resolving a path, exclusively by namespace operations.
    pub dirs: &'a RwLock<()>,
}

/// Inode ids looked up for one operation; their kernel references are given back on drop.
struct Lookups<'a> {
    fs: &'a PassthroughFs,
    ids: Vec<u64>,
}

impl Drop for Lookups<'_> {
    fn drop(&mut self) {
        for &id in &self.ids {
            self.fs.forget(id, 1);
        }
    }
}

fn os(e: capture::FsError) -> io::Error {
    io::Error::from_raw_os_error(e.errno() as i32)
}

impl Direct<'_> {
    /// The id of the directory holding `rel`, and its last name.
    fn parent<'p>(&self, rel: &'p str, refs: &mut Lookups<'_>) -> io::Result<(u64, &'p OsStr)> {
        let path = Path::new(rel);
        let mut id = ROOT;
        if let Some(dir) = path.parent() {
            for part in dir.components() {
                id = self.fs.lookup(id, part.as_os_str()).map_err(os)?.ino.0;
                refs.ids.push(id);
            }
        }
        Ok((id, path.file_name().expect("a name")))
    }

    /// Resolves `rel` for a data operation (outside any namespace operation).
    fn node(&self, rel: &str, refs: &mut Lookups<'_>) -> io::Result<u64> {
        let _dirs = self.dirs.read().unwrap();
        self.node_locked(rel, refs)
    }

    fn node_locked(&self, rel: &str, refs: &mut Lookups<'_>) -> io::Result<u64> {
        let (parent, name) = self.parent(rel, refs)?;
        let id = self.fs.lookup(parent, name).map_err(os)?.ino.0;
        refs.ids.push(id);
        Ok(id)
    }

    fn refs(&self) -> Lookups<'_> {
        Lookups {
            fs: self.fs,
            ids: Vec::new(),
        }
    }

    /// Runs `f` on `rel` opened with `flags`.
    fn with_open<T>(
        &self,
        rel: &str,
        flags: i32,
        f: impl FnOnce(u64) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut refs = self.refs();
        let id = self.node(rel, &mut refs)?;
        let fh = self.fs.open(id, flags).map_err(os)?.fh;
        let r = f(fh);
        self.fs.release(fh);
        r
    }

    pub fn write_at(&self, rel: &str, data: &[u8], off: u64) -> io::Result<()> {
        self.with_open(rel, libc::O_WRONLY, |fh| {
            self.fs.write(fh, off, data, false).map(|_| ()).map_err(os)
        })
    }

    pub fn append(&self, rel: &str, data: &[u8]) -> io::Result<()> {
        let mut refs = self.refs();
        let id = self.node(rel, &mut refs)?;
        let size = self.fs.getattr(id, None).map_err(os)?.size;
        self.write_at(rel, data, size)
    }

    pub fn set_len(&self, rel: &str, size: u64) -> io::Result<()> {
        self.setattr(
            rel,
            SetAttr {
                size: Some(size),
                ..SetAttr::default()
            },
        )
    }

    pub fn chmod(&self, rel: &str, mode: u32) -> io::Result<()> {
        self.setattr(
            rel,
            SetAttr {
                mode: Some(mode),
                ..SetAttr::default()
            },
        )
    }

    fn setattr(&self, rel: &str, set: SetAttr) -> io::Result<()> {
        let mut refs = self.refs();
        let id = self.node(rel, &mut refs)?;
        self.fs.setattr(id, None, set).map(|_| ()).map_err(os)
    }

    pub fn create_new(&self, rel: &str) -> io::Result<()> {
        let _dirs = self.dirs.write().unwrap();
        let mut refs = self.refs();
        let (parent, name) = self.parent(rel, &mut refs)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        let (attr, opened) = self.fs.create(parent, name, 0o644, flags, ME).map_err(os)?;
        refs.ids.push(attr.ino.0);
        self.fs.release(opened.fh);
        Ok(())
    }

    pub fn mkdir(&self, rel: &str) -> io::Result<()> {
        let _dirs = self.dirs.write().unwrap();
        let mut refs = self.refs();
        let (parent, name) = self.parent(rel, &mut refs)?;
        let attr = self.fs.mkdir(parent, name, 0o755, ME).map_err(os)?;
        refs.ids.push(attr.ino.0);
        Ok(())
    }

    pub fn unlink(&self, rel: &str) -> io::Result<()> {
        let _dirs = self.dirs.write().unwrap();
        let mut refs = self.refs();
        let (parent, name) = self.parent(rel, &mut refs)?;
        self.fs.unlink(parent, name).map_err(os)
    }

    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let _dirs = self.dirs.write().unwrap();
        let mut refs = self.refs();
        let (a, an) = self.parent(from, &mut refs)?;
        let (b, bn) = self.parent(to, &mut refs)?;
        self.fs.rename(a, an, b, bn, 0).map_err(os)
    }

    pub fn link(&self, from: &str, to: &str) -> io::Result<()> {
        let _dirs = self.dirs.write().unwrap();
        let mut refs = self.refs();
        let id = self.node_locked(from, &mut refs)?;
        let (parent, name) = self.parent(to, &mut refs)?;
        let attr = self.fs.link(id, parent, name).map_err(os)?;
        refs.ids.push(attr.ino.0);
        Ok(())
    }

    pub fn fallocate(&self, rel: &str, mode: i32, off: u64, len: u64) -> io::Result<()> {
        self.with_open(rel, libc::O_WRONLY, |fh| {
            self.fs.fallocate(fh, off, len, mode).map_err(os)
        })
    }

    pub fn copy_range(
        &self,
        from: &str,
        off_in: u64,
        to: &str,
        off_out: u64,
        len: u64,
    ) -> io::Result<()> {
        self.with_open(from, libc::O_RDONLY, |fh_in| {
            self.with_open(to, libc::O_WRONLY, |fh_out| {
                self.fs
                    .copy_file_range(fh_in, off_in, fh_out, off_out, len)
                    .map(|_| ())
                    .map_err(os)
            })
        })
    }
}
