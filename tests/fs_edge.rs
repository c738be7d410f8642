//! Edge cases of the passthrough, each its own test, on a real mount served by the real
//! agent binary: results must be those of a local filesystem.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use common::Agent;

fn op_count(agent: &Agent, op: &str) -> u64 {
    agent.status()["stats"]["ops"][op].as_u64().unwrap_or(0)
}

#[test]
fn rename_over_existing_file_replaces_it() {
    let a = Agent::start();
    fs::write(a.mnt("src"), b"new").unwrap();
    fs::write(a.mnt("dst"), b"old contents").unwrap();
    let dst_reader = File::open(a.mnt("dst")).unwrap();
    fs::rename(a.mnt("src"), a.mnt("dst")).unwrap();
    assert_eq!(fs::read(a.mnt("dst")).unwrap(), b"new");
    assert!(!a.mnt("src").exists());
    assert_eq!(fs::read(a.backing.join("dst")).unwrap(), b"new");
    // The replaced file stays readable through the fd opened before the rename.
    let mut old = String::new();
    (&dst_reader).read_to_string(&mut old).unwrap();
    assert_eq!(old, "old contents");
}

#[test]
fn rename_over_existing_directory() {
    let a = Agent::start();
    fs::create_dir(a.mnt("d1")).unwrap();
    fs::write(a.mnt("d1/f"), b"x").unwrap();
    fs::create_dir(a.mnt("empty")).unwrap();
    fs::create_dir(a.mnt("full")).unwrap();
    fs::write(a.mnt("full/g"), b"y").unwrap();
    let err = fs::rename(a.mnt("d1"), a.mnt("full")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::rename(a.mnt("d1"), a.mnt("empty")).unwrap();
    assert_eq!(fs::read(a.mnt("empty/f")).unwrap(), b"x");
    assert!(!a.mnt("d1").exists());
    let err = fs::rename(a.mnt("empty"), a.mnt("full/g")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
}

#[test]
fn rename_directory_with_open_files_below() {
    let a = Agent::start();
    fs::create_dir_all(a.mnt("db/sub")).unwrap();
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(a.mnt("db/sub/t.ibd"))
        .unwrap();
    f.write_all(b"before ").unwrap();
    fs::rename(a.mnt("db"), a.mnt("db2")).unwrap();
    f.write_all(b"after").unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::read(a.mnt("db2/sub/t.ibd")).unwrap(), b"before after");
    assert_eq!(
        fs::read(a.backing.join("db2/sub/t.ibd")).unwrap(),
        b"before after"
    );
    assert!(!a.mnt("db").exists());
    // A new file created through the renamed directory lands in the right place.
    fs::write(a.mnt("db2/sub/new"), b"n").unwrap();
    assert_eq!(fs::read(a.backing.join("db2/sub/new")).unwrap(), b"n");
}

#[test]
fn unlinked_open_file_keeps_working_through_its_fd() {
    let a = Agent::start();
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(a.mnt("tmpfile"))
        .unwrap();
    f.write_all(b"hello").unwrap();
    fs::remove_file(a.mnt("tmpfile")).unwrap();
    assert!(!a.mnt("tmpfile").exists());
    assert!(!a.backing.join("tmpfile").exists());
    f.write_all(b" world").unwrap();
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello world");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    // A new file of the same name is a different file.
    fs::write(a.mnt("tmpfile"), b"other").unwrap();
    f.write_all(b"!").unwrap();
    assert_eq!(fs::read(a.mnt("tmpfile")).unwrap(), b"other");
}

#[test]
fn hard_links_share_inode_and_count() {
    let a = Agent::start();
    fs::write(a.mnt("one"), b"data").unwrap();
    fs::create_dir(a.mnt("d")).unwrap();
    fs::hard_link(a.mnt("one"), a.mnt("two")).unwrap();
    fs::hard_link(a.mnt("one"), a.mnt("d/three")).unwrap();
    let m1 = fs::metadata(a.mnt("one")).unwrap();
    let m3 = fs::metadata(a.mnt("d/three")).unwrap();
    assert_eq!(m1.nlink(), 3);
    assert_eq!(m1.ino(), m3.ino());
    assert_eq!(m1.ino(), fs::metadata(a.backing.join("one")).unwrap().ino());
    fs::write(a.mnt("two"), b"changed").unwrap();
    assert_eq!(fs::read(a.mnt("d/three")).unwrap(), b"changed");
    fs::remove_file(a.mnt("one")).unwrap();
    assert_eq!(fs::metadata(a.mnt("two")).unwrap().nlink(), 2);
    let err = fs::hard_link(a.mnt("d"), a.mnt("dirlink")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
}

#[test]
fn symlinks_are_links() {
    let a = Agent::start();
    fs::write(a.mnt("target"), b"t").unwrap();
    std::os::unix::fs::symlink("target", a.mnt("rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/x", a.mnt("dangling")).unwrap();
    assert_eq!(
        fs::read_link(a.mnt("rel")).unwrap().to_str(),
        Some("target")
    );
    assert_eq!(fs::read(a.mnt("rel")).unwrap(), b"t");
    assert!(
        fs::symlink_metadata(a.mnt("dangling"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(fs::metadata(a.mnt("dangling")).is_err());
    assert_eq!(
        fs::read_link(a.backing.join("rel")).unwrap().to_str(),
        Some("target")
    );
    fs::rename(a.mnt("rel"), a.mnt("rel2")).unwrap();
    assert_eq!(fs::read(a.mnt("rel2")).unwrap(), b"t");
}

#[test]
fn sparse_files_keep_their_holes() {
    let a = Agent::start();
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(a.mnt("sparse"))
        .unwrap();
    let mib = 1 << 20;
    f.write_all_at(b"data", 8 * mib).unwrap();
    let m = f.metadata().unwrap();
    assert_eq!(m.len(), 8 * mib + 4);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "allocated {} blocks",
        m.blocks()
    );
    let fd = f.as_raw_fd();
    // SAFETY: lseek on an fd this test owns.
    let data = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    assert_eq!(hole, 0);
    assert!(
        data >= 0 && data as u64 <= 8 * mib && data as u64 > 0,
        "SEEK_DATA gave {data}"
    );
    let mut buf = vec![1u8; 4096];
    f.read_exact_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn offsets_past_4gib() {
    let a = Agent::start();
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(a.mnt("big"))
        .unwrap();
    let off = (5u64 << 30) + 12345;
    f.write_all_at(b"far away", off).unwrap();
    assert_eq!(f.metadata().unwrap().len(), off + 8);
    let mut buf = [0u8; 8];
    f.read_exact_at(&mut buf, off).unwrap();
    assert_eq!(&buf, b"far away");
    let backing = File::open(a.backing.join("big")).unwrap();
    backing.read_exact_at(&mut buf, off).unwrap();
    assert_eq!(&buf, b"far away");
}

#[test]
fn truncate_up_and_down() {
    let a = Agent::start();
    fs::write(a.mnt("t"), b"0123456789").unwrap();
    let f = OpenOptions::new().write(true).open(a.mnt("t")).unwrap();
    f.set_len(4).unwrap();
    assert_eq!(fs::read(a.mnt("t")).unwrap(), b"0123");
    f.set_len(8).unwrap();
    assert_eq!(fs::read(a.mnt("t")).unwrap(), b"0123\0\0\0\0");
    drop(f);
    // Truncate by path (no open handle) and O_TRUNC on open.
    let c = std::ffi::CString::new(a.mnt("t").to_str().unwrap()).unwrap();
    // SAFETY: truncate(2) on a NUL-terminated path.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 2) }, 0);
    assert_eq!(fs::read(a.backing.join("t")).unwrap(), b"01");
    File::create(a.mnt("t")).unwrap();
    assert_eq!(fs::metadata(a.mnt("t")).unwrap().len(), 0);
}

#[test]
fn concurrent_o_append_writers_interleave_whole_records() {
    let a = Agent::start();
    let path = a.mnt("log");
    File::create(&path).unwrap();
    let writers = 4;
    let records = 500;
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                for i in 0..records {
                    let rec = format!("w{w}-r{i:05}-{}\n", "x".repeat(40));
                    f.write_all(rec.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), writers * records);
    for w in 0..writers {
        let mine: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("w{w}-")))
            .collect();
        assert_eq!(mine.len(), records);
        for (i, l) in mine.iter().enumerate() {
            assert_eq!(
                **l,
                format!("w{w}-r{i:05}-{}", "x".repeat(40)),
                "record out of order or torn"
            );
        }
    }
}

/// Creates (or truncates) a file opened read-write with O_DIRECT.
fn open_direct(path: &std::path::Path) -> File {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap()
}

/// A buffer aligned for O_DIRECT.
fn aligned(len: usize, fill: u8) -> (Vec<u8>, usize) {
    let v = vec![fill; len + 4096];
    let start = v.as_ptr().align_offset(4096);
    (v, start)
}

#[test]
fn o_direct_aligned_io() {
    let a = Agent::start();
    let f = open_direct(&a.mnt("direct"));
    let len = 64 * 1024;
    let (buf, s) = aligned(len, 0xab);
    f.write_all_at(&buf[s..s + len], 16384).unwrap();
    let (mut rbuf, rs) = aligned(len, 0);
    f.read_exact_at(&mut rbuf[rs..rs + len], 16384).unwrap();
    assert!(rbuf[rs..rs + len].iter().all(|&b| b == 0xab));
    f.sync_data().unwrap();
    assert_eq!(f.metadata().unwrap().len(), 16384 + len as u64);
    let plain = fs::read(a.backing.join("direct")).unwrap();
    assert!(plain[16384..].iter().all(|&b| b == 0xab));
    assert!(plain[..16384].iter().all(|&b| b == 0));
    // A cached reader of the same file sees what the direct writer wrote.
    let (buf2, s2) = aligned(4096, 0xcd);
    f.write_all_at(&buf2[s2..s2 + 4096], 0).unwrap();
    assert_eq!(fs::read(a.mnt("direct")).unwrap()[..4096], [0xcd; 4096]);
}

#[test]
fn fallocate_modes() {
    let a = Agent::start();
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(a.mnt("fa"))
        .unwrap();
    f.write_all_at(&[7u8; 65536], 0).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: fallocate on an fd this test owns.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            4096,
            8192,
        )
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    let data = fs::read(a.mnt("fa")).unwrap();
    assert_eq!(data.len(), 65536);
    assert!(data[4096..12288].iter().all(|&b| b == 0));
    assert!(data[..4096].iter().all(|&b| b == 7) && data[12288..].iter().all(|&b| b == 7));
    // SAFETY: as above.
    let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 65536, 1 << 20) };
    assert_eq!(r, 0);
    assert_eq!(f.metadata().unwrap().len(), 65536);
    assert!(f.metadata().unwrap().blocks() * 512 >= (1 << 20));
    // SAFETY: as above.
    let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, 0, 100) };
    assert_eq!(r, 0);
    assert_eq!(
        &fs::read(a.backing.join("fa")).unwrap()[..101],
        &[[0u8; 100].as_slice(), &[7]].concat()[..]
    );
    // SAFETY: as above.
    let r = unsafe { libc::fallocate(fd, 0, 0, 200_000) };
    assert_eq!(r, 0);
    assert_eq!(f.metadata().unwrap().len(), 200_000);
}

#[test]
fn fsync_of_files_and_directories_reaches_the_agent() {
    let a = Agent::start();
    fs::create_dir(a.mnt("d")).unwrap();
    let f = File::create(a.mnt("d/f")).unwrap();
    let before = (op_count(&a, "fsync"), op_count(&a, "fsyncdir"));
    (&f).write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    let dir = File::open(a.mnt("d")).unwrap();
    dir.sync_all().unwrap();
    let after = (op_count(&a, "fsync"), op_count(&a, "fsyncdir"));
    assert!(
        after.0 >= before.0 + 2,
        "fsync did not reach the agent: {before:?} -> {after:?}"
    );
    assert!(
        after.1 > before.1,
        "fsyncdir did not reach the agent: {before:?} -> {after:?}"
    );
}

#[test]
fn thousands_of_files_in_one_directory() {
    let a = Agent::start();
    fs::create_dir(a.mnt("many")).unwrap();
    let n = 5000;
    for i in 0..n {
        File::create(a.mnt(&format!("many/file-{i:05}"))).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(a.mnt("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), n);
    assert_eq!(names[0], "file-00000");
    assert_eq!(names[n - 1], format!("file-{:05}", n - 1));
    // d_ino from readdir agrees with st_ino from stat.
    for e in fs::read_dir(a.mnt("many")).unwrap().take(50) {
        let e = e.unwrap();
        assert_eq!(
            std::os::unix::fs::DirEntryExt::ino(&e),
            e.metadata().unwrap().ino()
        );
    }
    for i in (0..n).step_by(2) {
        fs::remove_file(a.mnt(&format!("many/file-{i:05}"))).unwrap();
    }
    assert_eq!(fs::read_dir(a.mnt("many")).unwrap().count(), n / 2);
}

#[test]
fn xattrs_round_trip() {
    let a = Agent::start();
    fs::write(a.mnt("x"), b"").unwrap();
    let p = std::ffi::CString::new(a.mnt("x").to_str().unwrap()).unwrap();
    let name = c"user.hotbackup.test";
    let value = b"some value";
    // SAFETY: NUL-terminated strings and a valid buffer.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    // SAFETY: size query with a null buffer.
    let size = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(size, value.len() as isize);
    let mut buf = [0u8; 64];
    // SAFETY: valid buffer.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], value);
    let mut small = [0u8; 2];
    // SAFETY: valid buffer, deliberately too small.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            small.as_mut_ptr().cast(),
            small.len(),
        )
    };
    assert_eq!(n, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ERANGE)
    );
    let mut list = [0u8; 256];
    // SAFETY: valid buffer.
    let n = unsafe { libc::listxattr(p.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(
        list[..n as usize]
            .split(|&b| b == 0)
            .any(|s| s == b"user.hotbackup.test")
    );
    // SAFETY: XATTR_CREATE on an existing name must fail with EEXIST.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            libc::XATTR_CREATE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    // The backing file carries the attribute.
    let bp = std::ffi::CString::new(a.backing.join("x").to_str().unwrap()).unwrap();
    // SAFETY: size query.
    assert_eq!(
        unsafe { libc::getxattr(bp.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) },
        10
    );
    // SAFETY: NUL-terminated strings.
    assert_eq!(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }, 0);
    // SAFETY: size query of a removed attribute.
    let r = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );
}

#[test]
fn utimens_keeps_nanoseconds() {
    let a = Agent::start();
    let f = File::create(a.mnt("t")).unwrap();
    let atime = UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    let mtime = UNIX_EPOCH + Duration::new(1_700_000_000, 987_654_321);
    f.set_times(
        std::fs::FileTimes::new()
            .set_accessed(atime)
            .set_modified(mtime),
    )
    .unwrap();
    drop(f);
    for p in [a.mnt("t"), a.backing.join("t")] {
        let m = fs::metadata(&p).unwrap();
        assert_eq!(
            (m.mtime(), m.mtime_nsec()),
            (1_700_000_000, 987_654_321),
            "{}",
            p.display()
        );
        assert_eq!(
            (m.atime(), m.atime_nsec()),
            (1_600_000_000, 123_456_789),
            "{}",
            p.display()
        );
    }
}

#[test]
fn chmod_and_ownership_pass_through() {
    let a = Agent::start();
    fs::write(a.mnt("f"), b"").unwrap();
    fs::set_permissions(a.mnt("f"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        fs::metadata(a.backing.join("f")).unwrap().mode() & 0o7777,
        0o640
    );
    std::os::unix::fs::chown(a.mnt("f"), Some(65534), Some(65534)).unwrap();
    let m = fs::metadata(a.backing.join("f")).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    // A file created by an unprivileged user belongs to that user.
    fs::create_dir(a.mnt("open")).unwrap();
    fs::set_permissions(a.mnt("open"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(a.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "touch"])
        .arg(a.mnt("open/by-nobody"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = fs::metadata(a.backing.join("open/by-nobody")).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    // default_permissions: the unprivileged user cannot write a root-owned 0644 file.
    fs::write(a.mnt("open/roots"), b"r").unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!("echo x > {}", a.mnt("open/roots").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(fs::read(a.backing.join("open/roots")).unwrap(), b"r");
}

#[test]
fn copy_file_range_copies() {
    let a = Agent::start();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(a.mnt("src"), &data).unwrap();
    let src = File::open(a.mnt("src")).unwrap();
    let dst = File::create(a.mnt("dst")).unwrap();
    common::io::copy_range(&src, 1000, &dst, 0, 150_000);
    assert_eq!(
        fs::read(a.backing.join("dst")).unwrap(),
        &data[1000..151_000]
    );
}

#[test]
fn rename_noreplace_and_exchange() {
    let a = Agent::start();
    fs::write(a.mnt("a"), b"A").unwrap();
    fs::write(a.mnt("b"), b"B").unwrap();
    let ca = std::ffi::CString::new(a.mnt("a").to_str().unwrap()).unwrap();
    let cb = std::ffi::CString::new(a.mnt("b").to_str().unwrap()).unwrap();
    // SAFETY: renameat2 with NUL-terminated absolute paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    // SAFETY: as above.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "exchange: {}", std::io::Error::last_os_error());
    assert_eq!(fs::read(a.mnt("a")).unwrap(), b"B");
    assert_eq!(fs::read(a.mnt("b")).unwrap(), b"A");
    assert_eq!(fs::read(a.backing.join("a")).unwrap(), b"B");
}

#[test]
fn statfs_reports_the_backing_filesystem() {
    let a = Agent::start();
    let stat = |p: &std::path::Path| {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: valid path and out-pointer.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) }, 0);
        // SAFETY: statvfs succeeded.
        unsafe { s.assume_init() }
    };
    let m = stat(&a.mountpoint);
    let b = stat(&a.backing);
    assert_eq!(m.f_blocks, b.f_blocks);
    assert_eq!(m.f_bsize, b.f_bsize);
    assert!(m.f_bavail.abs_diff(b.f_bavail) < b.f_blocks / 100 + 1024);
}

#[test]
fn forgotten_inodes_are_released() {
    let a = Agent::start();
    fs::create_dir(a.mnt("d")).unwrap();
    for i in 0..300 {
        fs::write(a.mnt(&format!("d/{i}")), b"x").unwrap();
    }
    let known = a.status()["inodes"].as_u64().unwrap();
    assert!(
        known >= 300,
        "expected the kernel to reference the new files, saw {known}"
    );
    fs::remove_dir_all(a.mnt("d")).unwrap();
    // Unlinked inodes are dropped by the kernel at once, which sends FORGET.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = a.status()["inodes"].as_u64().unwrap();
        if now < 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "inode table still holds {now} inodes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn writes_do_not_cost_a_getxattr_round_trip() {
    let a = Agent::start();
    let f = File::create(a.mnt("hot")).unwrap();
    f.write_all_at(b"warm up", 0).unwrap();
    let before = op_count(&a, "getxattr");
    for i in 0..200u64 {
        f.write_all_at(b"0123456789abcdef", i * 16).unwrap();
    }
    let after = op_count(&a, "getxattr");
    assert!(
        after - before < 5,
        "200 writes caused {} getxattr requests (security.capability checks)",
        after - before
    );
    // Set-id bits are still dropped when an unprivileged user writes.
    fs::set_permissions(a.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(a.mnt("setuid"), b"x").unwrap();
    fs::set_permissions(a.mnt("setuid"), fs::Permissions::from_mode(0o4777)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!("printf y >> {}", a.mnt("setuid").display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = fs::metadata(a.backing.join("setuid")).unwrap().mode() & 0o7777;
    assert_eq!(
        mode, 0o777,
        "set-user-id bit survived an unprivileged write"
    );
}

/// Pages of `path` resident in the page cache, from util-linux's fincore.
fn resident_pages(path: &std::path::Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "PAGES"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn o_direct_bypasses_the_backing_page_cache_and_tolerates_misalignment() {
    let a = Agent::start();
    let f = open_direct(&a.mnt("ibdata"));
    let len = 4 << 20;
    let (buf, s) = aligned(len, 0x5a);
    f.write_all_at(&buf[s..s + len], 0).unwrap();
    let (mut rbuf, rs) = aligned(len, 0);
    f.read_exact_at(&mut rbuf[rs..rs + len], 0).unwrap();
    assert!(rbuf[rs..rs + len].iter().all(|&b| b == 0x5a));
    // Written and read with O_DIRECT on the backing file: cached once (by the
    // application), not a second time in the backing page cache.
    let cached = resident_pages(&a.backing.join("ibdata"));
    assert!(cached < 64, "{cached} pages of the backing file are cached");
    // Unaligned requests on an O_DIRECT file (which FUSE lets through) still work.
    f.write_all_at(b"odd", 1001).unwrap();
    let mut three = [0u8; 3];
    f.read_exact_at(&mut three, 1001).unwrap();
    assert_eq!(&three, b"odd");
    let plain = fs::read(a.backing.join("ibdata")).unwrap();
    assert_eq!(&plain[1000..1005], &[0x5a, b'o', b'd', b'd', 0x5a]);
}
