//! WL#4209 R05: a primary restored from an older image, started exactly the way the
//! original was, with no step beyond `hotbackup restore`: its old replicas, which had
//! applied more than the image holds, must stop with an error instead of replicating
//! the restored primary's new, different history. Both a GTID replica and a
//! file/position replica, and also after the restored primary has written more
//! transactions than they were ahead by.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::mariadb::{MariaDb, ServerUser};
use common::replication::{REPL_PASSWORD, REPL_USER, add_replication_user, wait_caught_up};
use common::{Agent, backup, hotbackup};

fn insert(db: &MariaDb, ids: std::ops::RangeInclusive<u32>, src: &str) {
    let sql: String = ids
        .map(|i| format!("INSERT INTO hb_r5.t VALUES ({i}, '{src}');\n"))
        .collect();
    db.sql(&sql);
}

fn slave_status(db: &MariaDb) -> String {
    let out = db
        .client()
        .args(["-e", "SHOW SLAVE STATUS\\G"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the replica's IO thread stopped on error 1236 (the source cannot serve
/// its position); panics with its status otherwise.
fn wait_stopped_with_1236(db: &MariaDb, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = slave_status(db);
        if status.contains("Last_IO_Errno: 1236") && status.contains("Slave_IO_Running: No") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the {what} replica did not stop on the restored primary:\n{status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn replicas_ahead_of_a_restored_primary_stop_instead_of_diverging() {
    let agent = Agent::start();
    let opts = [
        "--log-bin=mysql-bin",
        "--server-id=1",
        "--binlog-format=ROW",
    ];
    let mut primary = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    primary.start_with(&opts);
    add_replication_user(&primary);
    let work = tempfile::Builder::new()
        .prefix("hb-r05-")
        .tempdir()
        .unwrap();
    let mut replicas = Vec::new();
    for (name, id, how) in [
        ("gtid", 2, "MASTER_USE_GTID=slave_pos"),
        (
            "file/position",
            3,
            "MASTER_USE_GTID=no, MASTER_LOG_FILE='mysql-bin.000001', MASTER_LOG_POS=4",
        ),
    ] {
        let mut r = MariaDb::init(&work.path().join(format!("r{id}")), ServerUser::Root);
        r.start_with(&[&format!("--server-id={id}")]);
        r.sql(&format!(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, MASTER_USER='{REPL_USER}', \
             MASTER_PASSWORD='{REPL_PASSWORD}', MASTER_CONNECT_RETRY=1, {how}; START SLAVE;",
            primary.port()
        ));
        replicas.push((name, r));
    }
    primary.sql(
        "CREATE DATABASE hb_r5; CREATE TABLE hb_r5.t (id INT PRIMARY KEY, src VARCHAR(10)) ENGINE=InnoDB;",
    );
    insert(&primary, 1..=20, "old");
    let target = agent.dir.path().join("backup");
    let out = backup(&primary, &target, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The replicas go 40 transactions past the image, then lose their primary.
    insert(&primary, 21..=60, "old");
    for (_, r) in &replicas {
        wait_caught_up(r, &primary, Duration::from_secs(60));
        r.sql("STOP SLAVE");
    }
    let port = primary.port();
    primary.shutdown();

    // The primary's files are replaced by the older backup, and it is started exactly
    // as before: same options, same port.
    for e in fs::read_dir(&agent.mountpoint).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    let out = hotbackup(&[
        "restore",
        target.to_str().unwrap(),
        "--datadir",
        agent.mountpoint.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "restore failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port_arg = format!("--port={port}");
    let mut restored_opts = opts.to_vec();
    restored_opts.push(&port_arg);
    primary.start_with(&restored_opts);
    assert_eq!(primary.value("SELECT COUNT(*) FROM hb_r5.t"), "20");
    // Its binlog goes on far past anything the old primary numbered.
    let file = primary.rows("SHOW MASTER STATUS")[0][0].clone();
    let number: u64 = file.rsplit_once('.').unwrap().1.parse().unwrap();
    assert!(number > 1_000_000, "the restored binlog is {file}");
    let seq: u64 = primary
        .value("SELECT @@GLOBAL.gtid_binlog_pos")
        .rsplit_once('-')
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!(seq > 1_000_000_000, "the restored GTIDs go on at {seq}");
    // It writes more than the replicas were ahead by before they reconnect.
    insert(&primary, 1001..=1100, "new");
    for (name, r) in &replicas {
        r.sql("START SLAVE");
        let status = wait_stopped_with_1236(r, name);
        eprintln!(
            "{name} replica: {}",
            status
                .lines()
                .find(|l| l.contains("Last_IO_Error:"))
                .unwrap_or_default()
                .trim()
        );
        assert_eq!(
            r.value("SELECT COUNT(*) FROM hb_r5.t WHERE src = 'new'"),
            "0",
            "the {name} replica applied the restored primary's new history"
        );
        assert_eq!(r.value("SELECT COUNT(*) FROM hb_r5.t"), "60");
    }
    for (_, mut r) in replicas {
        r.shutdown();
    }
    primary.shutdown();
}
