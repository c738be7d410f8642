//! Point-in-time recovery with `hotbackup restore --until-gtid / --until`: the restored
//! server holds exactly what the source held at that GTID or time (compared with the
//! source's own checksums taken there), and a gap in the binlogs is refused by name
//! before anything is replayed.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use common::mariadb::{MariaDb, ServerUser};
use common::replication::checksums;
use common::{Agent, backup, hotbackup, restored_server_args};

const SCHEMAS: [&str; 1] = ["hb_pitr"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Autocommit writes `from..=to` (one GTID each), InnoDB and MyISAM.
fn write_rows(db: &MariaDb, from: u32, to: u32) {
    let mut sql = String::new();
    for i in from..=to {
        sql.push_str(&format!(
            "INSERT INTO hb_pitr.inno VALUES ({i}, REPEAT('i', {i})); \
             INSERT INTO hb_pitr.isam VALUES ({i}, {i} * 7); \
             UPDATE hb_pitr.inno SET v = CONCAT(v, 'u') WHERE id = {};\n",
            1 + i % 10
        ));
    }
    db.sql(&sql);
}

struct Restored {
    server: MariaDb,
    stdout: String,
}

fn restore_and_start(target: &Path, root: &Path, until: &[&str]) -> Restored {
    let mut args = vec!["restore", s(target), "--datadir", s(root)];
    args.extend_from_slice(until);
    let out = hotbackup(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "restore {until:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cnf = root.join("hotbackup-restored.cnf");
    let mut opts = restored_server_args(&cnf);
    opts.push("--server-id=2".into());
    let mut server = MariaDb::with_datadir(root, ServerUser::Root);
    server.start_with(&opts.iter().map(String::as_str).collect::<Vec<_>>());
    Restored { server, stdout }
}

#[test]
fn pitr_reaches_exactly_the_source_state_at_a_gtid_and_at_a_time() {
    let agent = Agent::start();
    let mut source = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    source.start_with(&[
        "--log-bin=mysql-bin",
        "--server-id=1",
        "--binlog-format=MIXED",
    ]);
    source.sql(
        "CREATE DATABASE hb_pitr; \
         CREATE TABLE hb_pitr.inno (id INT PRIMARY KEY, v TEXT) ENGINE=InnoDB; \
         CREATE TABLE hb_pitr.isam (id INT PRIMARY KEY, n INT) ENGINE=MyISAM;",
    );
    write_rows(&source, 1, 20);
    let target = agent.dir.path().join("backup");
    let out = backup(&source, &target, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // After the backup: three stretches of writes across binlog rotations, with the
    // source's state recorded at a GTID and at a time.
    write_rows(&source, 21, 40);
    source.sql("FLUSH BINARY LOGS");
    write_rows(&source, 41, 60);
    let at_gtid = source.value("SELECT @@GLOBAL.gtid_binlog_pos");
    let state_at_gtid: BTreeMap<String, String> = checksums(&source, &SCHEMAS);
    write_rows(&source, 61, 100);
    source.sql("FLUSH BINARY LOGS");
    let state_at_time = checksums(&source, &SCHEMAS);
    std::thread::sleep(Duration::from_millis(1500));
    let time = source.value("SELECT NOW()");
    std::thread::sleep(Duration::from_millis(1500));
    write_rows(&source, 101, 150);
    source.sql("FLUSH BINARY LOGS");
    write_rows(&source, 151, 160);
    assert_ne!(checksums(&source, &SCHEMAS), state_at_time);

    let binlogs = agent.mountpoint.clone();
    let work = tempfile::Builder::new()
        .prefix("hb-pitr-")
        .tempdir()
        .unwrap();

    // To a GTID.
    let mut r = restore_and_start(
        &target,
        &work.path().join("to-gtid"),
        &["--until-gtid", &at_gtid, "--binlog-dir", s(&binlogs)],
    );
    assert!(
        r.stdout.contains(&format!("reached GTID {at_gtid}")),
        "{}",
        r.stdout
    );
    assert_eq!(
        checksums(&r.server, &SCHEMAS),
        state_at_gtid,
        "PITR to GTID {at_gtid} did not give the source's state there"
    );
    assert_eq!(r.server.value("SELECT @@GLOBAL.gtid_slave_pos"), at_gtid);
    r.server.shutdown();

    // To a time, out of a binlog archive made by `binlog-archive --once`.
    let archived = work.path().join("archived");
    let out = hotbackup(&[
        "binlog-archive",
        "--no-defaults",
        "--socket",
        s(source.socket()),
        "--user=root",
        "--dir",
        s(&archived),
        "--once",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut r = restore_and_start(
        &target,
        &work.path().join("to-time"),
        &["--until", &time, "--binlog-dir", s(&archived)],
    );
    assert_eq!(
        checksums(&r.server, &SCHEMAS),
        state_at_time,
        "PITR to {time} did not give the source's state then"
    );
    r.server.shutdown();

    // A GTID the binlogs never reach, and a gap in an archive: refused, nothing created.
    let nowhere = work.path().join("nowhere");
    let out = hotbackup(&[
        "restore",
        s(&target),
        "--datadir",
        s(&nowhere),
        "--until-gtid",
        "0-1-999999",
        "--binlog-dir",
        s(&binlogs),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("GTID 0-1-999999 is not in the binlogs"),
        "{err}"
    );
    assert!(!nowhere.exists());
    let archive = work.path().join("archive");
    fs::create_dir(&archive).unwrap();
    let mut names: Vec<String> = fs::read_dir(&binlogs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("mysql-bin.0"))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    for n in names.iter().filter(|n| **n != names[1]) {
        fs::copy(binlogs.join(n), archive.join(n)).unwrap();
    }
    let out = hotbackup(&[
        "restore",
        s(&target),
        "--datadir",
        s(&nowhere),
        "--until",
        &time,
        "--binlog-dir",
        s(&archive),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("the binlogs have a gap: {} missing", names[1])),
        "{err}"
    );
    assert!(!nowhere.exists());
    source.shutdown();
}
