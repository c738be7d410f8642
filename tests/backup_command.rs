//! `hotbackup backup` against a real MariaDB on a real mount: the consistency proof
//! under load (a server started on the image recovers, keeps the load's invariants, sits
//! exactly at the recorded GTID, and as a replica converges to the source's checksums),
//! for the commit-durability settings and binlog formats a user may run.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::load::{LOAD_SCHEMA, LoadOptions, WriteLoad};
use common::mariadb::{MariaDb, ServerUser};
use common::replication::{add_replication_user, checksums, start_replica, wait_caught_up};
use common::{Agent, backup};

/// DDL in a loop on its own schema while the copy runs: create, fill, rebuild by copy,
/// rename, drop.
fn ddl_churn(db: &MariaDb, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    let socket = db.socket().to_path_buf();
    std::thread::spawn(move || {
        let mut rounds = 0;
        let run = |sql: &str| {
            let out = common::mariadb::client_for(&socket)
                .args(["-N", "-B", "-e", sql])
                .output()
                .expect("run mariadb");
            assert!(
                out.status.success(),
                "DDL failed: {sql}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run("CREATE DATABASE IF NOT EXISTS hb_ddl");
        while !stop.load(Ordering::SeqCst) {
            rounds += 1;
            run(&format!(
                "USE hb_ddl;\n\
                 CREATE TABLE hb_ddl.t{rounds} (id INT PRIMARY KEY, v VARCHAR(64)) ENGINE=InnoDB;\n\
                 INSERT INTO hb_ddl.t{rounds} SELECT seq, MD5(seq) FROM seq_1_to_500;\n\
                 ALTER TABLE hb_ddl.t{rounds} ADD COLUMN w INT NOT NULL DEFAULT 7, ALGORITHM=COPY;\n\
                 RENAME TABLE hb_ddl.t{rounds} TO hb_ddl.r{rounds};\n\
                 CREATE TABLE hb_ddl.m{rounds} ENGINE=MyISAM SELECT * FROM hb_ddl.r{rounds};"
            ));
            if rounds > 2 {
                run(&format!(
                    "DROP TABLE hb_ddl.r{}, hb_ddl.m{}",
                    rounds - 2,
                    rounds - 2
                ));
            }
        }
        rounds
    })
}

/// MyISAM inserts that each run for 0.3 s, in a loop: BLOCK_DDL waits for them while
/// InnoDB commits go on and DDL waits too, so commits pile up that only the backup's own
/// engine-log write puts in the image (a test without it fails).
fn slow_myisam_writes(db: &MariaDb, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    db.sql(
        "CREATE DATABASE IF NOT EXISTS hb_slow;\n\
         CREATE TABLE hb_slow.t (id INT AUTO_INCREMENT PRIMARY KEY, slept INT) ENGINE=MyISAM",
    );
    let socket = db.socket().to_path_buf();
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let out = common::mariadb::client_for(&socket)
                .args(["-e", "INSERT INTO hb_slow.t (slept) SELECT SLEEP(0.3)"])
                .output()
                .expect("run mariadb");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
        n
    })
}

/// InnoDB autocommit inserts as fast as one connection goes, until `hb_slow.ctl.go` is
/// 0: they keep committing while BLOCK_DDL waits (InnoDB writes are not blocked there),
/// so right before commits are blocked there are commits whose redo is still only in
/// the log buffer when the server does not write it at commit.
fn innodb_autocommits(db: &MariaDb) -> std::thread::JoinHandle<()> {
    db.sql(
        "CREATE DATABASE IF NOT EXISTS hb_slow;\n\
         CREATE TABLE hb_slow.ctl (go INT) ENGINE=InnoDB;\n\
         INSERT INTO hb_slow.ctl VALUES (1);\n\
         CREATE TABLE hb_slow.inno (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(64)) ENGINE=InnoDB",
    );
    let socket = db.socket().to_path_buf();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut child = common::mariadb::client_for(&socket)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run mariadb");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(
                b"DELIMITER //\n\
                  BEGIN NOT ATOMIC\n\
                    WHILE (SELECT go FROM hb_slow.ctl) = 1 DO\n\
                      INSERT INTO hb_slow.inno (v) VALUES ('autocommit');\n\
                    END WHILE;\n\
                  END//\n",
            )
            .unwrap();
        let out = child.wait_with_output().expect("mariadb");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
}

/// The recorded coordinates: `FILE<TAB>POS<TAB>GTID`.
fn binlog_info(target: &Path) -> (String, u64, String) {
    let text = std::fs::read_to_string(target.join("hotbackup_binlog_info"))
        .expect("hotbackup_binlog_info");
    let f: Vec<&str> = text.trim_end_matches('\n').split('\t').collect();
    assert_eq!(f.len(), 3, "{text:?}");
    (f[0].to_string(), f[1].parse().unwrap(), f[2].to_string())
}

/// The consistency proof for one set of server settings.
fn consistent_backup_under_load(settings: &[&str]) {
    let agent = Agent::start();
    let mut source = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    let mut opts = vec![
        "--log-bin=mysql-bin",
        "--server-id=1",
        "--innodb-log-file-size=8M",
    ];
    opts.extend_from_slice(settings);
    source.start_with(&opts);
    add_replication_user(&source);
    let load = WriteLoad::start(&source, LoadOptions::default());
    assert!(
        load.wait_until_acked(10, Duration::from_secs(60)),
        "the load did not get going"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ddl = ddl_churn(&source, stop.clone());
    let slow = slow_myisam_writes(&source, stop.clone());
    let autocommits = innodb_autocommits(&source);
    let floors = load.acked();
    let target = agent.dir.path().join("backup");
    // Slow enough that the load and the DDL run through the copy.
    let out = backup(&source, &target, &["--throttle=20"]);
    stop.store(true, Ordering::SeqCst);
    let ddl_rounds = ddl.join().expect("DDL thread");
    slow.join().expect("slow MyISAM writer");
    source.sql("UPDATE hb_slow.ctl SET go = 0");
    autocommits.join().expect("InnoDB autocommit writer");
    let report = load.stop();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "backup failed:\n{stderr}\n{stdout}");
    assert!(stdout.contains("commits blocked for"), "{stdout}");
    assert!(ddl_rounds >= 1);
    let (_, _, gtid) = binlog_info(&target);
    assert!(!gtid.is_empty());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["kind"], "backup");
    assert_eq!(manifest["database"]["binlog"]["gtid"], gtid.as_str());
    assert_eq!(manifest["database"]["datadir_in_image"], "");
    let block_ms = manifest["database"]["lock"]["commit_block_ms"]
        .as_f64()
        .unwrap();
    // A server started on the image: crash recovery, every table sound, the load's
    // invariants, and exactly at the recorded GTID.
    let mut restored = MariaDb::with_datadir(&target.join("data"), ServerUser::Root);
    let mut ropts = vec![
        "--log-bin=mysql-bin",
        "--server-id=2",
        "--innodb-log-file-size=8M",
    ];
    ropts.extend(
        settings.iter().filter(|s| {
            s.starts_with("--binlog-format") || s.starts_with("--innodb-log-file-size")
        }),
    );
    restored.start_with(&ropts);
    assert_eq!(
        restored.value("SELECT @@GLOBAL.gtid_binlog_pos"),
        gtid,
        "the image is not at the recorded binlog position"
    );
    report.assert_innodb_prefix(&restored, &floors, false);
    for schema in [LOAD_SCHEMA, "hb_ddl", "hb_slow"] {
        for (table, _) in restored.tables(schema) {
            let verdict = restored.check_table(schema, &table);
            assert!(verdict.is_ok(), "CHECK TABLE {schema}.{table}: {verdict:?}");
        }
    }
    // Made a replica from the recorded coordinates, it converges to the source.
    start_replica(&restored, &source, &gtid);
    wait_caught_up(&restored, &source, Duration::from_secs(120));
    let schemas = [LOAD_SCHEMA, "hb_ddl", "hb_slow"];
    let want = checksums(&source, &schemas);
    let got = checksums(&restored, &schemas);
    assert_eq!(
        got, want,
        "the replica built from the backup diverged from its source"
    );
    eprintln!(
        "settings {settings:?}: commits blocked {block_ms:.1} ms, {ddl_rounds} DDL rounds, {} txns; stages {}",
        report.acked_txns(),
        manifest["database"]["lock"]["stages"]
    );
    restored.shutdown();
    source.shutdown();
}

#[test]
fn backup_under_load_is_consistent_with_durable_commits_and_row_binlog() {
    consistent_backup_under_load(&[
        "--innodb-flush-log-at-trx-commit=1",
        "--sync-binlog=1",
        "--binlog-format=ROW",
    ]);
}

#[test]
fn backup_under_load_is_consistent_with_lazy_commits_and_statement_binlog() {
    consistent_backup_under_load(&[
        "--innodb-flush-log-at-trx-commit=0",
        // Nothing then writes the log buffer for a long time (no background write, no
        // checkpoint pressure): commits in the binlog but not in the redo log show up in
        // the image unless the backup writes it.
        "--innodb-flush-log-at-timeout=2700",
        "--innodb-log-file-size=256M",
        "--innodb-log-buffer-size=64M",
        "--innodb-max-dirty-pages-pct=90",
        "--innodb-buffer-pool-size=512M",
        "--innodb-io-capacity=100",
        "--innodb-adaptive-flushing=OFF",
        "--sync-binlog=0",
        "--binlog-format=STATEMENT",
    ]);
}

#[test]
fn backup_under_load_is_consistent_with_unsynced_commits_and_mixed_binlog() {
    consistent_backup_under_load(&[
        "--innodb-flush-log-at-trx-commit=2",
        "--sync-binlog=0",
        "--binlog-format=MIXED",
    ]);
}
