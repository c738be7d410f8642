//! `hotbackup backup`'s invariants and refusals against a real MariaDB on a real mount:
//! none of its statements reaches the binlog; a server without a binlog gets no
//! coordinates; bad input gets one sentence and changes nothing; a killed client leaves
//! nothing locked and the next backup works.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mariadb::{MariaDb, ServerUser};
use common::{Agent, backup, backup_args, hotbackup, hotbackup_bin};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A server on the mount with a binlog.
fn server_on_mount(agent: &Agent, extra: &[&str]) -> MariaDb {
    let mut db = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    let mut opts = vec!["--log-bin=mysql-bin", "--server-id=1"];
    opts.extend_from_slice(extra);
    db.start_with(&opts);
    db
}

/// Commits go through at once (the server is not left locked).
fn commits_flow(db: &MariaDb) {
    let t = Instant::now();
    db.sql(
        "CREATE DATABASE IF NOT EXISTS hb_t; \
         CREATE TABLE IF NOT EXISTS hb_t.c (id INT AUTO_INCREMENT PRIMARY KEY) ENGINE=InnoDB; \
         INSERT INTO hb_t.c VALUES (); \
         CREATE TABLE IF NOT EXISTS hb_t.m (id INT AUTO_INCREMENT PRIMARY KEY) ENGINE=MyISAM; \
         INSERT INTO hb_t.m VALUES ();",
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "commits waited {:?}: the server was left locked",
        t.elapsed()
    );
}

#[test]
fn a_backup_of_an_idle_server_leaves_its_binlog_and_its_replica_untouched() {
    let agent = Agent::start();
    let source = server_on_mount(&agent, &["--binlog-format=ROW"]);
    commits_flow(&source);
    common::replication::add_replication_user(&source);
    let replica_dir = tempfile::tempdir().unwrap();
    let mut replica = MariaDb::init(&replica_dir.path().join("db"), ServerUser::Root);
    replica.start_with(&["--server-id=2"]);
    let gtid = source.value("SELECT @@GLOBAL.gtid_binlog_pos");
    common::replication::start_replica(&replica, &source, &gtid);
    common::replication::wait_caught_up(&replica, &source, Duration::from_secs(60));
    let before = source.rows("SHOW MASTER STATUS");
    let replica_read = |r: &MariaDb| r.sql("SHOW SLAVE STATUS\\G");
    let read_pos = |s: &str| {
        s.lines()
            .find(|l| l.trim_start().starts_with("Read_Master_Log_Pos:"))
            .map(str::to_string)
    };
    let replica_before = read_pos(&replica_read(&replica));
    let target = agent.dir.path().join("idle");
    let out = backup(&source, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        source.rows("SHOW MASTER STATUS"),
        before,
        "the backup wrote to the binlog"
    );
    assert_eq!(source.value("SELECT @@GLOBAL.gtid_binlog_pos"), gtid);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read_pos(&replica_read(&replica)),
        replica_before,
        "the replica received events"
    );
    let info = std::fs::read_to_string(target.join("hotbackup_binlog_info")).unwrap();
    assert_eq!(
        info,
        format!("{}\t{}\t{gtid}\n", before[0][0], before[0][1]),
        "the recorded coordinates are the idle server's"
    );
    // A backup taken on the replica (not on a mount): refused by name, nothing created.
    let t2 = agent.dir.path().join("from-replica");
    let out = backup(&replica, &t2, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not on a hotbackup mount"),
        "{}",
        stderr(&out)
    );
    assert!(!t2.exists());
    replica.shutdown();
}

#[test]
fn a_server_without_a_binlog_gets_no_coordinates() {
    let agent = Agent::start();
    let mut db = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    db.start();
    let target = agent.dir.path().join("nobinlog");
    let cnf = agent.dir.path().join("my.cnf");
    std::fs::write(&cnf, "[mariadbd]\ninnodb_buffer_pool_size = 64M\n").unwrap();
    let auto = agent.dir.path().join("auto.cnf");
    std::fs::write(&auto, "[auto]\nserver-uuid=x\n").unwrap();
    let refused = backup(
        &db,
        &target,
        &[&format!("--copy-config={}", auto.display())],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("auto.cnf holds the server's server_uuid"),
        "{}",
        stderr(&refused)
    );
    assert!(!target.exists());
    let out = backup(&db, &target, &[&format!("--copy-config={}", cnf.display())]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(target.join("hotbackup-config-my.cnf")).unwrap(),
        "[mariadbd]\ninnodb_buffer_pool_size = 64M\n"
    );
    assert!(!target.join("hotbackup_binlog_info").exists());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no binlog"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("backup.json")).unwrap()).unwrap();
    assert!(manifest["database"]["binlog"].is_null());
    assert!(target.join("hotbackup-my.cnf").exists());
    db.shutdown();
}

#[test]
fn bad_input_gets_one_sentence_and_changes_nothing() {
    let agent = Agent::start();
    let db = server_on_mount(&agent, &[]);
    let t = |name: &str| agent.dir.path().join(name);
    // The server is down (a socket nobody listens on).
    let gone = agent.dir.path().join("nobody.sock");
    let a = backup_args(&gone, &t("down"), &[]);
    let out = hotbackup(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is the server running?"),
        "{}",
        stderr(&out)
    );
    assert!(!t("down").exists());
    // A wrong password, and a user without the privileges (named with their GRANT).
    db.sql(
        "DELETE FROM mysql.global_priv WHERE User = ''; FLUSH PRIVILEGES; \
         CREATE USER 'weak'@'localhost' IDENTIFIED BY 'pw'; GRANT SELECT ON *.* TO 'weak'@'localhost';",
    );
    let mut a = backup_args(db.socket(), &t("pw"), &[]);
    a[3] = "--user=weak".into();
    a.push("--password=wrong".into());
    let out = hotbackup(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("refused user \"weak\""),
        "{}",
        stderr(&out)
    );
    let mut a = backup_args(db.socket(), &t("priv"), &[]);
    a[3] = "--user=weak".into();
    let out = Command::new(hotbackup_bin())
        .args(&a)
        .env("MYSQL_PWD", "pw")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("GRANT RELOAD ON *.*")
            && err.contains("GRANT PROCESS ON *.*")
            && err.contains("BINLOG MONITOR"),
        "{err}"
    );
    // A target that is not empty, and one inside the mount.
    std::fs::create_dir(t("full")).unwrap();
    std::fs::write(t("full").join("x"), b"x").unwrap();
    let out = backup(&db, &t("full"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
    let inside = agent.mountpoint.join("backup-here");
    let out = backup(&db, &inside, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("outside the mount"),
        "{}",
        stderr(&out)
    );
    assert!(!inside.exists());
    commits_flow(&db);
    agent.wait_no_session();
}

#[test]
fn a_binlog_outside_the_mount_is_refused_by_name() {
    let agent = Agent::start();
    let elsewhere = tempfile::tempdir().unwrap();
    let log_bin = format!("--log-bin={}/mysql-bin", elsewhere.path().display());
    let mut db = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    db.start_with(&[&log_bin, "--server-id=1"]);
    let target = agent.dir.path().join("t");
    let out = backup(&db, &target, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("log_bin_basename is") && err.contains("outside the hotbackup mount"),
        "{err}"
    );
    assert!(!target.exists());
    db.shutdown();
}

#[test]
fn a_lock_wait_timeout_names_the_blocker_and_leaves_nothing_locked() {
    let agent = Agent::start();
    let db = server_on_mount(&agent, &[]);
    commits_flow(&db);
    // A MyISAM insert that runs for 20 s: BLOCK_DDL must wait for it.
    let socket = db.socket().to_path_buf();
    let slow = std::thread::spawn(move || {
        common::mariadb::client_for(&socket)
            .args(["-e", "INSERT INTO hb_t.m (id) SELECT 1000 + SLEEP(20)"])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    let target = agent.dir.path().join("t");
    let out = backup(&db, &target, &["--lock-wait-timeout=2"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("waited longer than --lock-wait-timeout"),
        "{err}"
    );
    assert!(err.contains("SLEEP(20)"), "the blocker is not named: {err}");
    assert!(target.join("INCOMPLETE").exists());
    agent.wait_no_session();
    // Nothing stays locked: InnoDB commits go through while the slow insert still runs.
    let t = Instant::now();
    db.sql("INSERT INTO hb_t.c VALUES ()");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "commits waited {:?}",
        t.elapsed()
    );
    assert!(slow.join().unwrap().status.success());
    commits_flow(&db);
}

/// Kills the client where it pauses (`HOTBACKUP_TEST_PAUSE_AT`) and checks that nothing
/// stays locked, the session is gone, the target is incomplete and the next backup works.
fn kill_client_at(point: &str) {
    let agent = Agent::start();
    let db = server_on_mount(&agent, &[]);
    commits_flow(&db);
    let target = agent.dir.path().join("killed");
    let mut child = Command::new(hotbackup_bin())
        .args(backup_args(db.socket(), &target, &[]))
        .env("HOTBACKUP_TEST_PAUSE_AT", point)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let paused = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("paused at")));
    assert!(paused.is_some(), "the client never reached {point}");
    common::signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
    commits_flow(&db);
    agent.wait_no_session();
    assert!(target.join("INCOMPLETE").exists());
    let next = agent.dir.path().join("next");
    let out = backup(&db, &next, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_client_killed_before_any_lock_leaves_nothing_behind() {
    kill_client_at("copied");
}

#[test]
fn a_client_killed_while_commits_are_blocked_leaves_nothing_locked() {
    kill_client_at("block_commit");
}

#[test]
fn a_second_backup_is_refused_while_one_runs() {
    let agent = Agent::start();
    let db = server_on_mount(&agent, &[]);
    let target = agent.dir.path().join("first");
    let mut first = Command::new(hotbackup_bin())
        .args(backup_args(db.socket(), &target, &[]))
        .env("HOTBACKUP_TEST_PAUSE_AT", "copied")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.contains("paused at"))));
    let out = backup(&db, &agent.dir.path().join("second"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("another backup is running"),
        "{}",
        stderr(&out)
    );
    assert!(!agent.dir.path().join("second").exists());
    common::signal(first.id(), libc::SIGKILL);
    let _ = first.wait();
    agent.wait_no_session();
}
