//! Placing the image's files at the restore root: copied in parallel (a reflink where
//! the filesystem allows it, otherwise only the data ranges, so holes stay holes) or
//! moved; owners, modes and times kept; everything fsynced.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use super::plan::{Method, RestorePlan};
use super::{RestoreError, RestoreEvent};
use crate::image::Image;
use crate::manifest::{self, EntryKind};
use crate::sparse;

pub(super) struct Placed {
    pub files: u64,
    pub bytes: u64,
    pub reflinked: u64,
}

pub(super) fn place(
    image: &Image,
    plan: &RestorePlan,
    parallel: usize,
    events: &mut impl FnMut(RestoreEvent<'_>),
) -> Result<Placed, RestoreError> {
    let failed = |path: &Path, error: io::Error| RestoreError::Io {
        root: plan.root.clone(),
        path: path.to_path_buf(),
        error,
    };
    match plan.method {
        Method::Copy => copy_tree(image, plan, parallel, events),
        Method::Move => {
            let placed = move_tree(image, plan).map_err(|(p, e)| failed(&p, e))?;
            // The backup is used up: it must never be taken for a usable one again.
            crate::copy::mark_incomplete(
                &image.dir,
                &format!(
                    "its files were moved into {} by `hotbackup restore --move`",
                    plan.root.display()
                ),
            );
            Ok(placed)
        }
    }
}

fn copy_tree(
    image: &Image,
    plan: &RestorePlan,
    parallel: usize,
    events: &mut impl FnMut(RestoreEvent<'_>),
) -> Result<Placed, RestoreError> {
    let data = image.data();
    let failed = |path: &Path, error: io::Error| RestoreError::Io {
        root: plan.root.clone(),
        path: path.to_path_buf(),
        error,
    };
    if let Some(parent) = plan.root.parent() {
        fs::create_dir_all(parent).map_err(|e| failed(parent, e))?;
    }
    match fs::create_dir(&plan.root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(failed(&plan.root, e)),
    }
    // Directories and links first (the manifest is sorted, parents before children),
    // then the files in parallel, then the directories' metadata, deepest first.
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    for e in &image.manifest.files {
        let dst = plan.root.join(&e.path);
        match e.kind {
            EntryKind::Directory => {
                fs::create_dir(&dst).map_err(|err| failed(&dst, err))?;
                dirs.push(e.path.clone());
            }
            EntryKind::Symlink => {
                let target = e.target.clone().unwrap_or_default();
                std::os::unix::fs::symlink(&target, &dst).map_err(|err| failed(&dst, err))?;
                keep_metadata(&data.join(&e.path), &dst, plan).map_err(|err| failed(&dst, err))?;
            }
            EntryKind::File => files.push((e.path.clone(), e.size)),
        }
    }
    let total: u64 = files.iter().map(|(_, s)| s).sum();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let reflinked = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let reflink_works = AtomicBool::new(true);
    let outcome: Result<(), RestoreError> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                scope.spawn(|| -> Result<(), RestoreError> {
                    while !stop.load(Relaxed) {
                        let Some((rel, size)) = files.get(next.fetch_add(1, Relaxed)) else {
                            break;
                        };
                        let dst = plan.root.join(rel);
                        let cloned = copy_file(&data.join(rel), &dst, plan, &reflink_works)
                            .map_err(|e| {
                                stop.store(true, Relaxed);
                                failed(&dst, e)
                            })?;
                        if cloned {
                            reflinked.fetch_add(1, Relaxed);
                        }
                        done.fetch_add(*size, Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        let mut result = Ok(());
        for w in workers {
            while !w.is_finished() {
                std::thread::sleep(Duration::from_millis(200));
                events(RestoreEvent::Progress {
                    done: done.load(Relaxed),
                    total,
                });
            }
            let r = w.join().unwrap_or_else(|_| {
                Err(failed(
                    &plan.root,
                    io::Error::other("a copy thread panicked"),
                ))
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    });
    outcome?;
    events(RestoreEvent::Progress { done: total, total });
    for rel in dirs.iter().rev() {
        let dst = plan.root.join(rel);
        keep_metadata(&data.join(rel), &dst, plan).map_err(|e| failed(&dst, e))?;
        File::open(&dst)
            .and_then(|d| d.sync_all())
            .map_err(|e| failed(&dst, e))?;
    }
    sync_parent(&plan.root).map_err(|e| failed(&plan.root, e))?;
    Ok(Placed {
        files: files.len() as u64,
        bytes: total,
        reflinked: reflinked.load(Relaxed),
    })
}

/// Copies one file; true if it was reflinked.
fn copy_file(
    src: &Path,
    dst: &Path,
    plan: &RestorePlan,
    reflink_works: &AtomicBool,
) -> io::Result<bool> {
    let from = File::open(src)?;
    let to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        // Unreadable to others until its real mode is set.
        .mode(0o600)
        .open(dst)?;
    let mut cloned = false;
    if reflink_works.load(Relaxed) {
        if capture::reflink::clone_file(to.as_fd(), from.as_fd()).is_ok() {
            cloned = true;
        } else {
            // Not supported here (or across filesystems): copy bytes from now on.
            reflink_works.store(false, Relaxed);
        }
    }
    if !cloned {
        copy_data_ranges(&from, &to)?;
    }
    to.sync_all()?;
    drop(to);
    keep_metadata(src, dst, plan)?;
    Ok(cloned)
}

/// Copies only the ranges that hold data (SEEK_DATA / SEEK_HOLE), then sets the length,
/// so the copy is as sparse as the image.
fn copy_data_ranges(from: &File, to: &File) -> io::Result<()> {
    let len = from.metadata()?.len();
    let (fi, fo) = (from.as_raw_fd(), to.as_raw_fd());
    let mut pos = 0;
    while let Some((start, end)) = sparse::next_data(from.as_fd(), pos, len)? {
        let (mut off_in, mut off_out) = (start as i64, start as i64);
        while off_in < end as i64 {
            let want = (end as i64 - off_in).min(1 << 30) as usize;
            // SAFETY: copy_file_range between two open descriptors with our offsets.
            let n = unsafe { libc::copy_file_range(fi, &mut off_in, fo, &mut off_out, want, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                // Across filesystems (a FUSE mount, say) the kernel may refuse: copy
                // through a buffer instead.
                match e.raw_os_error() {
                    Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                        copy_through_buffer(from, to, off_in as u64, end)?;
                        break;
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                break;
            }
        }
        pos = end;
    }
    to.set_len(len)
}

fn copy_through_buffer(from: &File, to: &File, mut at: u64, end: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while at < end {
        let want = ((end - at) as usize).min(buf.len());
        let n = from.read_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Owner (the plan's, or the image file's), mode and times of `src` onto `dst`.
fn keep_metadata(src: &Path, dst: &Path, plan: &RestorePlan) -> io::Result<()> {
    let m = fs::symlink_metadata(src)?;
    let (uid, gid) = match &plan.owner {
        Some((u, g, _)) => (*u, *g),
        None => (m.uid(), m.gid()),
    };
    std::os::unix::fs::lchown(dst, Some(uid), Some(gid))?;
    if !m.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    set_times(dst, &m)
}

fn set_times(path: &Path, m: &fs::Metadata) -> io::Result<()> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let at = TimeSpec::new(m.atime(), m.atime_nsec());
    let mt = TimeSpec::new(m.mtime(), m.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &at,
        &mt,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

fn move_tree(image: &Image, plan: &RestorePlan) -> Result<Placed, (PathBuf, io::Error)> {
    let data = image.data();
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    let data_meta = fs::metadata(&data).map_err(at(&data))?;
    if plan.root.exists() {
        for e in fs::read_dir(&data).map_err(at(&data))? {
            let e = e.map_err(at(&data))?;
            let dst = plan.root.join(e.file_name());
            fs::rename(e.path(), &dst).map_err(at(&dst))?;
        }
        fs::remove_dir(&data).map_err(at(&data))?;
    } else {
        if let Some(parent) = plan.root.parent() {
            fs::create_dir_all(parent).map_err(at(parent))?;
        }
        fs::rename(&data, &plan.root).map_err(at(&plan.root))?;
    }
    let (uid, gid) = match &plan.owner {
        Some((u, g, _)) => (*u, *g),
        None => (data_meta.uid(), data_meta.gid()),
    };
    std::os::unix::fs::lchown(&plan.root, Some(uid), Some(gid)).map_err(at(&plan.root))?;
    fs::set_permissions(
        &plan.root,
        fs::Permissions::from_mode(data_meta.mode() & 0o7777),
    )
    .map_err(at(&plan.root))?;
    set_times(&plan.root, &data_meta).map_err(at(&plan.root))?;
    let mut files = 0;
    let mut bytes = 0;
    for e in &image.manifest.files {
        let path = plan.root.join(&e.path);
        if let Some((u, g, _)) = &plan.owner {
            std::os::unix::fs::lchown(&path, Some(*u), Some(*g)).map_err(at(&path))?;
        }
        if e.kind == EntryKind::File {
            files += 1;
            bytes += e.size;
        }
    }
    File::open(&plan.root)
        .and_then(|d| d.sync_all())
        .map_err(at(&plan.root))?;
    sync_parent(&plan.root).map_err(at(&plan.root))?;
    sync_parent(&image.dir.join(manifest::DATA)).map_err(at(&image.dir))?;
    Ok(Placed {
        files,
        bytes,
        reflinked: 0,
    })
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => File::open(p)?.sync_all(),
        _ => Ok(()),
    }
}
