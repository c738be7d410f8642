//! `hotbackup backup` of a replica: its source's coordinates are recorded
//! (`hotbackup_slave_info`), a sibling replica built from them converges to the
//! source, and `--safe-slave-backup` waits out the temporary tables of statement-based
//! replication, leaving every SQL thread as it found it.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::mariadb::{MariaDb, ServerUser};
use common::replication::{
    REPL_PASSWORD, REPL_USER, add_replication_user, checksums, start_replica, wait_caught_up,
};
use common::{Agent, backup, hotbackup, restored_server_args};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A session on `db` that holds a temporary table for `secs` seconds, then ends (under
/// statement replication the replica's SQL thread holds it as long).
fn hold_temp_table(db: &MariaDb, secs: u32) -> Child {
    db.client()
        .args([
            "-e",
            &format!(
                "CREATE TEMPORARY TABLE hb_r.tmp (id INT) ENGINE=InnoDB; \
                 INSERT INTO hb_r.tmp VALUES (1); \
                 INSERT INTO hb_r.t (v) SELECT id FROM hb_r.tmp; \
                 SELECT SLEEP({secs});"
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn open_temp_tables(db: &MariaDb) -> u64 {
    db.rows("SHOW GLOBAL STATUS LIKE 'Slave_open_temp_tables'")[0][1]
        .parse()
        .unwrap()
}

/// Waits until the replica's SQL thread holds a temporary table.
fn wait_temp_table_open(replica: &MariaDb) {
    for _ in 0..50 {
        if open_temp_tables(replica) > 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the replica holds no temporary table");
}

fn sql_running(db: &MariaDb) -> String {
    // Vertical output with the column names (the harness's `sql` leaves them out).
    let out = db
        .client()
        .args(["-e", "SHOW SLAVE STATUS\\G"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Slave_SQL_Running: ")
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// A source on a plain directory (statement binlog) and its replica on the mount.
fn source_and_replica(agent: &Agent, dir: &Path) -> (MariaDb, MariaDb) {
    let mut source = MariaDb::init(&dir.join("source"), ServerUser::Root);
    source.start_with(&[
        "--log-bin=mysql-bin",
        "--server-id=1",
        "--binlog-format=STATEMENT",
    ]);
    add_replication_user(&source);
    source.sql(
        "CREATE DATABASE hb_r; \
         CREATE TABLE hb_r.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT) ENGINE=InnoDB; \
         INSERT INTO hb_r.t (v) SELECT seq FROM hb_r.seq_1_to_100;",
    );
    let mut replica = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    replica.start_with(&[
        "--log-bin=mysql-bin",
        "--server-id=2",
        "--log-slave-updates",
    ]);
    start_replica(&replica, &source, "");
    wait_caught_up(&replica, &source, Duration::from_secs(60));
    (source, replica)
}

#[test]
fn a_backup_of_a_replica_makes_a_sibling_that_converges_and_waits_out_temp_tables() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let (source, replica) = source_and_replica(&agent, dir.path());
    // A temporary table open on the replica's SQL thread for 3 s.
    let mut holder = hold_temp_table(&source, 3);
    wait_temp_table_open(&replica);
    assert!(
        open_temp_tables(&replica) > 0,
        "the replica holds no temporary table"
    );
    let target = agent.dir.path().join("replica-backup");
    let out = backup(
        &replica,
        &target,
        &["--safe-slave-backup", "--safe-slave-backup-timeout=60"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(holder.wait().unwrap().success());
    assert_eq!(
        sql_running(&replica),
        "Yes",
        "the SQL thread was left stopped"
    );
    // The source's coordinates are recorded, as ready-to-run SQL without a password.
    let info = std::fs::read_to_string(target.join("hotbackup_slave_info")).unwrap();
    assert!(info.starts_with("SET GLOBAL gtid_slave_pos = '"), "{info}");
    assert!(
        info.contains(&format!(
            "MASTER_HOST='127.0.0.1', MASTER_PORT={}, MASTER_USE_GTID=slave_pos",
            source.port()
        )),
        "{info}"
    );
    assert!(!info.to_ascii_lowercase().contains("password"));
    // A sibling from the image, restored and provisioned by hotbackup: a replica of the
    // same source that converges, compared table by table at one GTID.
    source.sql("INSERT INTO hb_r.t (v) SELECT seq FROM hb_r.seq_1_to_50");
    source.sql(&format!(
        "SET SESSION sql_log_bin = 0; GRANT SELECT ON *.* TO '{REPL_USER}'@'127.0.0.1'"
    ));
    let root = dir.path().join("sibling");
    let out = hotbackup(&["restore", s(&target), "--datadir", s(&root)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut sibling = MariaDb::with_datadir(&root, ServerUser::Root);
    let mut opts = restored_server_args(&root.join("hotbackup-restored.cnf"));
    opts.push("--server-id=3".into());
    sibling.start_with(&opts.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        sibling.value(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Slave%'"
        ),
        "0",
        "the restored replica started replicating on its own"
    );
    let pw = dir.path().join("repl.pw");
    std::fs::write(&pw, REPL_PASSWORD).unwrap();
    let out = hotbackup(&[
        "replica",
        s(&target),
        "--no-defaults",
        "--socket",
        s(sibling.socket()),
        "--user=root",
        "--sibling",
        "--source-user",
        REPL_USER,
        "--source-password-file",
        s(&pw),
        "--wait",
        "--verify-checksums",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("the replica matches its source"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("replicating from 127.0.0.1:{}", source.port())),
        "{stdout}"
    );
    wait_caught_up(&sibling, &source, Duration::from_secs(60));
    assert_eq!(
        checksums(&sibling, &["hb_r"]),
        checksums(&source, &["hb_r"])
    );
    sibling.shutdown();
}

#[test]
fn safe_slave_backup_times_out_clearly_and_leaves_sql_threads_as_they_were() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let (source, replica) = source_and_replica(&agent, dir.path());
    let mut holder = hold_temp_table(&source, 60);
    wait_temp_table_open(&replica);
    let target = agent.dir.path().join("timeout");
    let out = backup(
        &replica,
        &target,
        &["--safe-slave-backup", "--safe-slave-backup-timeout=2"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("temporary table(s) open after --safe-slave-backup-timeout"),
        "{err}"
    );
    assert!(target.join("INCOMPLETE").exists());
    assert_eq!(
        sql_running(&replica),
        "Yes",
        "the SQL thread was left stopped"
    );
    agent.wait_no_session();
    let _ = holder.kill();
    let _ = holder.wait();
    // An SQL thread stopped before the backup stays stopped after it.
    replica.sql("STOP SLAVE SQL_THREAD");
    let out = backup(
        &replica,
        &agent.dir.path().join("stopped"),
        &["--safe-slave-backup"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sql_running(&replica),
        "No",
        "a stopped SQL thread was started"
    );
}
