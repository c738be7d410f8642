//! What `verify`, `info` and `restore` say about images that are damaged, incomplete or
//! not backups at all, and targets a restore must not touch: one clear sentence, the
//! documented exit code, and nothing changed.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use common::mariadb::{MariaDb, ServerUser};
use common::{Agent, backup, hotbackup};

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out: Output = hotbackup(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_tree(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .args(["-a", "--"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tmpfs of `size` mounted by the test; unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> SmallFs {
        fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", at.display());
        SmallFs(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn damaged_incomplete_and_foreign_images_and_unsafe_targets_are_refused() {
    let agent = Agent::start();
    let mut source = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    source.start_with(&["--log-bin=mysql-bin", "--server-id=1"]);
    source.sql(
        "CREATE DATABASE hb; CREATE TABLE hb.t (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB; \
         INSERT INTO hb.t VALUES (1, 'one'), (2, 'two');",
    );
    let work = agent.dir.path();
    let target = work.join("backup");
    let out = backup(&source, &target, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Not a backup at all.
    let empty = work.join("empty");
    fs::create_dir(&empty).unwrap();
    let (code, _, err) = run(&["verify", s(&empty)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not a hotbackup backup"), "{err}");
    let (code, out, _) = run(&["info", s(&empty)]);
    assert_eq!(code, Some(1));
    assert!(out.contains("not usable"), "{out}");

    // Damaged: a flipped byte, a missing and an extra file, each named.
    let damaged = work.join("damaged");
    copy_tree(&target, &damaged);
    let ibd = damaged.join("data/hb/t.ibd");
    let mut bytes = fs::read(&ibd).unwrap();
    bytes[20000] ^= 0x40;
    fs::write(&ibd, bytes).unwrap();
    fs::remove_file(damaged.join("data/hb/t.frm")).unwrap();
    fs::write(damaged.join("data/hb/stray.txt"), "x").unwrap();
    let (code, out, err) = run(&["verify", s(&damaged)]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("changed: hb/t.ibd (checksum differs)"),
        "{out}"
    );
    assert!(out.contains("missing: hb/t.frm"), "{out}");
    assert!(out.contains("extra: hb/stray.txt"), "{out}");
    assert!(out.contains("DAMAGED, 3 problem(s)"), "{out}");
    let (_, info, _) = run(&["info", s(&damaged)]);
    assert!(info.contains("DAMAGED, 3 problem(s)"), "{info}");
    let into = work.join("restored-damaged");
    let (code, _, err) = run(&["restore", s(&damaged), "--datadir", s(&into)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is damaged (3 problem(s)"), "{err}");
    assert!(
        !into.exists(),
        "a refused restore created {}",
        into.display()
    );

    // Incomplete.
    let incomplete = work.join("incomplete");
    copy_tree(&target, &incomplete);
    fs::write(
        incomplete.join("INCOMPLETE"),
        "this backup is not usable: the client went away\n",
    )
    .unwrap();
    let (code, out, _) = run(&["info", s(&incomplete)]);
    assert_eq!(code, Some(1));
    assert!(out.contains("INCOMPLETE: the client went away"), "{out}");
    let (code, _, err) = run(&["verify", s(&incomplete)]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = run(&["restore", s(&incomplete), "--datadir", s(&into)]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("INCOMPLETE backup and cannot be restored"),
        "{err}"
    );
    assert!(!into.exists());

    // A datadir that is not empty is left exactly as it was.
    let busy = work.join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("keep.me"), "precious").unwrap();
    let (code, _, err) = run(&["restore", s(&target), "--datadir", s(&busy)]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(
        fs::read_to_string(busy.join("keep.me")).unwrap(),
        "precious"
    );
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);

    // The running server's own datadir: in use.
    let (code, _, err) = run(&["restore", s(&target), "--datadir", s(&agent.mountpoint)]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is in use by process"), "{err}");
    assert_eq!(source.value("SELECT COUNT(*) FROM hb.t"), "2");

    // --dry-run prints the plan and creates nothing.
    let (code, out, err) = run(&["restore", s(&target), "--datadir", s(&into), "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("verify every checksum"), "{out}");
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert!(!into.exists(), "--dry-run created {}", into.display());

    // Too little space, and --move across filesystems.
    let small = SmallFs::mount(&work.join("small"), "1M");
    let (code, _, err) = run(&["restore", s(&target), "--datadir", s(&small.0.join("db"))]);
    assert_eq!(code, Some(1));
    assert!(err.contains("free but the image needs"), "{err}");
    let (code, _, err) = run(&[
        "restore",
        s(&target),
        "--datadir",
        s(&small.0.join("db")),
        "--move",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--move needs the backup and --datadir on one filesystem"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&small.0).unwrap().count(), 0);
    drop(small);

    // Point-in-time recovery names what it lacks.
    let (code, _, err) = run(&[
        "restore",
        s(&target),
        "--datadir",
        s(&into),
        "--until-gtid",
        "0-1-9",
    ]);
    assert_eq!(code, Some(2), "clap must require --binlog-dir: {err}");

    // --move uses the backup up: afterwards it is marked INCOMPLETE, saying where its
    // files went. --user sets every file's owner.
    let movable = work.join("movable");
    copy_tree(&target, &movable);
    let moved = work.join("moved");
    let (code, out, err) = run(&[
        "restore",
        s(&movable),
        "--datadir",
        s(&moved),
        "--move",
        "--user",
        "mysql",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!movable.join("data").exists());
    let (code, info, _) = run(&["info", s(&movable)]);
    assert_eq!(code, Some(1));
    assert!(info.contains("moved into"), "{info}");
    let (uid, _) = ServerUser::Mysql.ids();
    assert_eq!(fs::metadata(moved.join("hb/t.ibd")).unwrap().uid(), uid);
    assert_eq!(fs::metadata(&moved).unwrap().uid(), uid);
    assert!(!moved.join("auto.cnf").exists());

    // A link out of the image: a restored server would follow it to the old host's
    // files, so the image cannot be restored.
    std::os::unix::fs::symlink("/etc", agent.mnt("hb/outside")).unwrap();
    let linked = work.join("linked");
    let out = backup(&source, &linked, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _, err) = run(&["restore", s(&linked), "--datadir", s(&into)]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("hb/outside in the image is a symbolic link to /etc"),
        "{err}"
    );
    assert!(!into.exists());
    source.shutdown();
}
