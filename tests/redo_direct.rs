//! `hotbackup agent --block-device auto`: the mount is a `fuseblk` over a loop device the
//! agent makes, so a MariaDB server on it writes its redo log with O_DIRECT (as on a
//! plain directory, and unlike on a plain FUSE mount), clients still find the agent, a
//! backup of that server restores, and the loop device goes away with the mount.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::mariadb::{MariaDb, ServerUser};
use common::{Agent, backup, hotbackup, restored_server_args};

/// The `flags:` line of `/proc/PID/fdinfo` for the fd `pid` has open on `name`, in octal.
fn open_flags(pid: u32, name: &str) -> u32 {
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if fs::read_link(fd.path()).is_ok_and(|t| t.ends_with(name)) {
            let info = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .expect("fdinfo has flags");
            return u32::from_str_radix(flags.trim(), 8).unwrap();
        }
    }
    panic!("process {pid} has no {name} open");
}

/// The loop device's backing file as sysfs shows it, if the device is still configured.
fn loop_backing(device: &Path) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()
}

#[test]
fn a_server_on_a_block_device_mount_writes_its_redo_log_direct_and_backs_up() {
    let mut agent = Agent::start_with(&["--block-device", "auto"]);
    let entry = capture::mountinfo::mount_at(&agent.mountpoint).expect("mounted");
    assert_eq!(entry.fstype, "fuseblk.hotbackup");
    let device = PathBuf::from(&entry.source);
    let backing_file = loop_backing(&device).expect("a configured loop device");
    assert!(
        backing_file.starts_with(&format!("{}.blockdev", agent.socket.display())),
        "{backing_file}"
    );
    // A client finds the agent from the mountpoint alone.
    assert_eq!(
        agent.status()["socket"].as_str().map(Path::new),
        Some(agent.socket.as_path()),
        "{}",
        agent.status()
    );

    let mut db = MariaDb::init_and_start(&agent.mnt("db"), ServerUser::Root);
    // Files on the mount live on the loop device, which has a physical block size.
    let dev = fs::metadata(db.datadir().join("ib_logfile0"))
        .unwrap()
        .dev();
    assert_eq!(fs::metadata(&device).unwrap().rdev(), dev);
    let sysfs = format!(
        "/sys/dev/block/{}:{}/queue/physical_block_size",
        libc::major(dev),
        libc::minor(dev)
    );
    assert!(Path::new(&sysfs).exists(), "{sysfs}");
    let flags = open_flags(db.pid().unwrap(), "ib_logfile0");
    assert_ne!(
        flags & libc::O_DIRECT as u32,
        0,
        "ib_logfile0 open without O_DIRECT (flags {flags:o})"
    );
    assert_eq!(db.value("SELECT @@innodb_log_file_buffering"), "0");

    db.sql(
        "CREATE DATABASE t; CREATE TABLE t.a (id INT PRIMARY KEY, v INT) ENGINE=InnoDB; \
         INSERT INTO t.a SELECT seq, seq * 2 FROM t.seq_1_to_5000",
    );
    let target = agent.dir.path().join("backup");
    let out = backup(&db, &target, &[]);
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    db.sql("INSERT INTO t.a VALUES (9999999, 0)");
    db.shutdown();

    let root = agent.dir.path().join("restored");
    let out = hotbackup(&[
        "restore",
        target.to_str().unwrap(),
        "--datadir",
        root.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let datadir = root.join("db");
    let mut restored = MariaDb::with_datadir(&datadir, ServerUser::Root);
    let opts = restored_server_args(&datadir.join("hotbackup-restored.cnf"));
    restored.start_with(&opts.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        restored.value("SELECT COUNT(*), SUM(v) FROM t.a"),
        "5000\t25005000"
    );
    restored.shutdown();

    // The loop device detaches itself with the mount.
    let (status, stderr) = agent.stop();
    assert!(status.success(), "{stderr}");
    assert_ne!(
        loop_backing(&device),
        Some(backing_file),
        "loop device left"
    );
}
