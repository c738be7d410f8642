//! `hotbackup adopt` and `unadopt` on a real datadir: the server's rows and checksums are
//! the same on the mount and back on the plain directory; and each refusal (server
//! running, backing on another filesystem, already adopted, a mountpoint) changes nothing.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::mariadb::{MariaDb, ServerUser};
use common::{Agent, hotbackup, is_mounted, ok};

fn run(args: &[&Path]) -> Output {
    let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
    hotbackup(&args)
}

fn adopt(datadir: &Path, root: &Path, extra: &[&str]) -> Output {
    let mut a: Vec<&Path> = vec!["adopt".as_ref(), "--datadir".as_ref(), datadir];
    a.extend(["--root".as_ref(), root]);
    a.extend(extra.iter().map(Path::new));
    run(&a)
}

fn unadopt(datadir: &Path, root: &Path) -> Output {
    run(&[
        "unadopt".as_ref(),
        "--datadir".as_ref(),
        datadir,
        "--root".as_ref(),
        root,
    ])
}

/// The one-sentence error of a refused command.
fn refused(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "not refused: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// Every file under `root`, relative to it.
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

fn record(root: &Path) -> serde_json::Value {
    let dir = root.join("etc/hotbackup");
    let file = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("adopted-"))
        .expect("an adopt record");
    serde_json::from_slice(&fs::read(file.path()).unwrap()).unwrap()
}

const CHECKSUMS: &str = "CHECKSUM TABLE shop.orders, shop.notes EXTENDED";

#[test]
fn adopt_then_unadopt_keeps_every_row_of_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("mysql");
    let root = dir.path().join("root");
    let mut db = MariaDb::init(&datadir, ServerUser::Mysql);
    db.start();
    db.sql(
        "CREATE DATABASE shop; USE shop;
         CREATE TABLE shop.orders (id INT PRIMARY KEY, v VARCHAR(64)) ENGINE=InnoDB;
         CREATE TABLE shop.notes (id INT PRIMARY KEY, v TEXT) ENGINE=Aria;
         INSERT INTO shop.orders SELECT seq, MD5(seq) FROM seq_1_to_2000;
         INSERT INTO shop.notes SELECT seq, REPEAT('n', seq) FROM seq_1_to_300;",
    );
    let before = db.sql(CHECKSUMS);

    // The running server is named, with how to stop it.
    let err = refused(adopt(&datadir, &root, &[]));
    let pid = db.pid().unwrap();
    assert!(err.contains(&format!("process {pid} (mariadbd)")), "{err}");
    assert!(err.contains("systemctl stop mariadb.service"), "{err}");
    db.shutdown();
    // Not what mkdir under the usual umask gives, so a mountpoint made without it shows.
    fs::set_permissions(&datadir, fs::Permissions::from_mode(0o750)).unwrap();
    let original = fs::metadata(&datadir).unwrap();
    let files_before = files_under(&datadir);

    // A dry run prints the plan and changes nothing.
    let plan = ok(&adopt(&datadir, &root, &["--dry-run"]));
    assert!(plan.contains("2. rename "), "{plan}");
    assert!(plan.contains("dry run"), "{plan}");
    assert_eq!(files_under(&datadir), files_before);
    assert!(!root.exists());

    let out = ok(&adopt(&datadir, &root, &[]));
    assert!(out.contains("next: systemctl daemon-reload"), "{out}");
    let rec = record(&root);
    let backing = PathBuf::from(rec["backing"].as_str().unwrap());
    assert_eq!(backing, dir.path().join("mysql.backing"));
    assert_eq!(files_under(&backing), files_before);
    // The mountpoint: empty, with the datadir's owner, group and mode.
    let mp = fs::metadata(&datadir).unwrap();
    assert!(fs::read_dir(&datadir).unwrap().next().is_none());
    assert_eq!(
        (mp.uid(), mp.gid(), mp.mode()),
        (original.uid(), original.gid(), original.mode())
    );
    let env = fs::read_to_string(root.join(format!(
        "etc/hotbackup/agent-{}.env",
        rec["instance"]
            .as_str()
            .unwrap()
            .trim_start_matches("hotbackup-agent@")
            .trim_end_matches(".service")
    )))
    .unwrap();
    assert!(env.contains(&format!("HOTBACKUP_BACKING=\"{}\"", backing.display())));

    let err = refused(adopt(&datadir, &root, &[]));
    assert!(err.contains("already adopted"), "{err}");

    // What the unit would run; the server sees the same rows through the mount.
    let mut agent = Agent::serve(&backing, &datadir);
    db.start();
    assert_eq!(db.sql(CHECKSUMS), before);
    db.sql("INSERT INTO shop.orders SELECT seq, 'on the mount' FROM shop.seq_2001_to_2500");
    let after = db.sql(CHECKSUMS);
    assert_ne!(after, before);
    scheduled_backup_needs_no_flags(&db, dir.path());

    let err = refused(unadopt(&datadir, &root));
    assert!(
        err.contains(&format!("process {}", db.pid().unwrap())),
        "{err}"
    );
    db.shutdown();
    let err = refused(unadopt(&datadir, &root));
    assert!(err.contains("still mounted"), "{err}");
    let (status, stderr) = agent.stop();
    assert!(status.success(), "agent: {stderr}");

    ok(&unadopt(&datadir, &root));
    assert!(!is_mounted(&datadir));
    assert!(!backing.exists());
    assert_eq!(
        files_under(&root),
        Vec::<PathBuf>::new(),
        "unadopt left files"
    );
    let back = fs::metadata(&datadir).unwrap();
    assert_eq!((back.ino(), back.mode()), (original.ino(), original.mode()));
    db.start();
    assert_eq!(db.sql(CHECKSUMS), after);
    db.shutdown();
}

/// What hotbackup-backup.service runs (`backup --progress=none`, nothing else) makes a
/// new dated backup under the configuration's target.root.
fn scheduled_backup_needs_no_flags(db: &MariaDb, dir: &Path) {
    let config = dir.join("hotbackup.toml");
    let backups = dir.join("backups");
    fs::write(
        &config,
        format!(
            "[connection]\nsocket = {:?}\nuser = \"root\"\nno_defaults = true\n\
             [backup]\nhistory_file = {:?}\n[target]\nroot = {:?}\n",
            db.socket(),
            dir.join("history.jsonl"),
            backups
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::hotbackup_bin())
        .args(["backup", "--progress=none"])
        .env(agent::config::ENV, &config)
        .output()
        .unwrap();
    ok(&out);
    let made: Vec<_> = fs::read_dir(&backups).unwrap().flatten().collect();
    assert_eq!(made.len(), 1);
    let name = made[0].file_name().into_string().unwrap();
    assert!(name.len() == 16 && name.ends_with('Z'), "{name}");
    assert!(made[0].path().join("backup.json").is_file());
}

/// A tmpfs the test mounts, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .expect("mount tmpfs");
        Tmpfs(at.into())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn refusals_change_nothing_and_an_interrupted_adopt_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("data");
    let root = dir.path().join("root");
    fs::create_dir(&datadir).unwrap();
    fs::write(datadir.join("ibdata1"), b"pages").unwrap();
    let other = Tmpfs::mount(&dir.path().join("other"));

    let err = refused(adopt(
        &datadir,
        &root,
        &["--backing", other.0.join("data").to_str().unwrap()],
    ));
    assert!(err.contains("another filesystem"), "{err}");
    assert!(err.contains("cannot cross filesystems"), "{err}");
    let err = refused(adopt(&other.0, &root, &[]));
    assert!(err.contains("is a mountpoint (tmpfs"), "{err}");
    fs::create_dir(dir.path().join("taken")).unwrap();
    let err = refused(adopt(
        &datadir,
        &root,
        &["--backing", dir.path().join("taken").to_str().unwrap()],
    ));
    assert!(err.contains("already exists"), "{err}");
    let err = refused(unadopt(&datadir, &root));
    assert!(err.contains("was not adopted"), "{err}");
    assert_eq!(fs::read(datadir.join("ibdata1")).unwrap(), b"pages");
    assert!(!root.exists());

    // An adopt interrupted after the rename, before the mountpoint was made: unadopt
    // finishes from the record.
    ok(&adopt(&datadir, &root, &[]));
    fs::remove_dir(&datadir).unwrap();
    let plan = ok(&run(&[
        "unadopt".as_ref(),
        "--datadir".as_ref(),
        &datadir,
        "--root".as_ref(),
        &root,
        "--dry-run".as_ref(),
    ]));
    assert!(!plan.contains("remove the empty mountpoint"), "{plan}");
    assert!(plan.contains("rename the backing directory back"), "{plan}");
    ok(&unadopt(&datadir, &root));
    assert_eq!(fs::read(datadir.join("ibdata1")).unwrap(), b"pages");

    // Unadopt never empties a mountpoint something wrote into.
    ok(&adopt(&datadir, &root, &[]));
    fs::write(datadir.join("stray"), b"x").unwrap();
    let err = refused(unadopt(&datadir, &root));
    assert!(err.contains("never deletes data"), "{err}");
    assert_eq!(fs::read(datadir.join("stray")).unwrap(), b"x");
}
