//! `hotbackup restore`, `verify` and `info` on real backups of a real MariaDB: a backup
//! taken under load is restored, starts with crash recovery, keeps the load's
//! invariants and converges as a replica, and the server it came from is never touched;
//! every refusal leaves everything as it was.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::load::{LOAD_SCHEMA, LoadOptions, WriteLoad};
use common::mariadb::{MariaDb, ServerUser};
use common::replication::{
    REPL_PASSWORD, REPL_USER, add_replication_user, checksums, wait_caught_up,
};
use common::{Agent, backup, hotbackup, restored_server_args};

fn run(args: &[&str]) -> (Output, String, String) {
    let out = hotbackup(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// blake3 of every file under `root`, by relative path.
fn tree_sums(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                let sum = blake3::hash(&fs::read(&p).unwrap()).to_hex().to_string();
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), sum);
            }
        }
    }
    out
}

/// A server whose datadir is a subdirectory of the mount and whose binlog lives in
/// another one, named by an absolute path (so its index holds absolute file names).
fn source_below_the_mount(agent: &Agent, user: ServerUser) -> MariaDb {
    let binlog_dir = agent.mnt("binlog");
    fs::create_dir(&binlog_dir).unwrap();
    let (uid, gid) = user.ids();
    std::os::unix::fs::chown(&binlog_dir, Some(uid), Some(gid)).unwrap();
    let mut source = MariaDb::init(&agent.mnt("db"), user);
    source.start_with(&[
        &format!("--log-bin={}/bin", binlog_dir.display()),
        "--server-id=1",
        "--binlog-format=ROW",
    ]);
    add_replication_user(&source);
    source
}

#[test]
fn a_backup_under_load_restores_recovers_and_converges_as_a_replica() {
    let agent = Agent::start();
    let mut source = source_below_the_mount(&agent, ServerUser::Mysql);
    let load = WriteLoad::start(&source, LoadOptions::default());
    assert!(load.wait_until_acked(10, Duration::from_secs(60)));
    let floors = load.acked();
    let target = agent.dir.path().join("backup");
    // The default pace (--throttle auto), with the load running through the copy. (A
    // fixed 20 MB/s chased the load's growth: 1.1 GiB copied in 49 s on a quiet machine,
    // against 214 MiB in 6 s with auto.)
    let out = backup(&source, &target, &[]);
    let report = load.stop();
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gtid = fs::read_to_string(target.join("hotbackup_binlog_info"))
        .unwrap()
        .trim_end()
        .rsplit('\t')
        .next()
        .unwrap()
        .to_string();

    // info: a complete backup with its coordinates; verify: every checksum matches.
    let (out, info, _) = run(&["info", target.to_str().unwrap()]);
    assert!(out.status.success(), "{info}");
    assert!(info.contains("state         complete"), "{info}");
    assert!(info.contains(&format!("GTID {gtid}")), "{info}");
    assert!(info.contains("commit block"), "{info}");
    let (out, stdout, stderr) = run(&["verify", target.to_str().unwrap()]);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("all checksums match"), "{stdout}");
    let (_, info, _) = run(&["info", target.to_str().unwrap()]);
    assert!(info.contains("all checksums matched"), "{info}");

    // The source stops; its files are summed before anything runs on the restored copy.
    source.shutdown();
    let original = tree_sums(&agent.backing);
    let work = tempfile::Builder::new()
        .prefix("hb-restore-")
        .tempdir()
        .unwrap();
    let root = work.path().join("restored");
    let (out, stdout, stderr) = run(&[
        "restore",
        target.to_str().unwrap(),
        "--datadir",
        root.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "restore failed:\n{stdout}\n{stderr}");
    let datadir = root.join("db");
    let cnf = datadir.join("hotbackup-restored.cnf");
    assert!(stdout.contains(&cnf.display().to_string()), "{stdout}");
    // Owner and modes as on the source (the server ran as mysql).
    let (uid, _) = ServerUser::Mysql.ids();
    let ibdata = fs::metadata(datadir.join("ibdata1")).unwrap();
    assert_eq!(ibdata.uid(), uid);
    let index = fs::read_to_string(root.join("binlog/bin.index")).unwrap();
    let old = agent.mountpoint.display().to_string();
    assert!(
        !index.contains(&old),
        "the index still names the old mount:\n{index}"
    );
    assert!(index.contains(&root.display().to_string()), "{index}");

    // The restored server: crash recovery, at the recorded GTID, the load's invariants.
    let mut restored = MariaDb::with_datadir(&datadir, ServerUser::Mysql);
    let mut opts = restored_server_args(&cnf);
    opts.push("--server-id=2".into());
    restored.start_with(&opts.iter().map(String::as_str).collect::<Vec<_>>());
    // The restore checked that the image's binlog ends exactly at the recorded GTID
    // before it gave the server a new binlog history (R05); its data is at that GTID.
    assert!(stdout.contains("restored"), "{stdout}");
    assert_eq!(restored.value("SELECT @@GLOBAL.gtid_slave_pos"), gtid);
    let (domain_server, seq) = gtid.rsplit_once('-').unwrap();
    assert_eq!(
        restored.value("SELECT @@GLOBAL.gtid_binlog_pos"),
        format!(
            "{domain_server}-{}",
            seq.parse::<u64>().unwrap() + 1_000_000_000
        )
    );
    report.assert_innodb_prefix(&restored, &floors, false);
    for (table, _) in restored.tables(LOAD_SCHEMA) {
        let verdict = restored.check_table(LOAD_SCHEMA, &table);
        assert!(verdict.is_ok(), "CHECK TABLE {table}: {verdict:?}");
    }
    // It writes and rotates its binlog: all of that lands in the restored tree.
    restored.sql("CREATE DATABASE hb_after; CREATE TABLE hb_after.t (id INT PRIMARY KEY) ENGINE=InnoDB; INSERT INTO hb_after.t VALUES (1); FLUSH BINARY LOGS;");
    restored.shutdown();
    assert_eq!(
        tree_sums(&agent.backing),
        original,
        "the restored server changed a file of the server the image came from"
    );
    // A restore into the datadir of a running server is refused (R04: also a replica).
    restored.start_with(&opts.iter().map(String::as_str).collect::<Vec<_>>());
    restored.sql("DROP DATABASE hb_after");
    source.start_with(&[
        &format!("--log-bin={}/bin", agent.mnt("binlog").display()),
        "--server-id=1",
        "--binlog-format=ROW",
    ]);
    // `hotbackup replica` under load: caught up, then compared with the source at one
    // GTID (the source's user may read the tables for that).
    source.sql(&format!(
        "SET SESSION sql_log_bin = 0; GRANT SELECT ON *.* TO '{REPL_USER}'@'127.0.0.1'"
    ));
    let pw = work.path().join("repl.pw");
    fs::write(&pw, format!("{REPL_PASSWORD}\n")).unwrap();
    let load = WriteLoad::start(&source, LoadOptions::default());
    assert!(load.wait_until_acked(20, Duration::from_secs(60)));
    let port = source.port().to_string();
    let socket = restored.socket().display().to_string();
    // `hotbackup replica` of the restored server from the source, with `extra` options.
    let replica = |extra: &[&str]| {
        let mut args = vec![
            "replica",
            target.to_str().unwrap(),
            "--no-defaults",
            "--socket",
            &socket,
            "--user=root",
            "--source-host=127.0.0.1",
            "--source-port",
            &port,
            "--source-user",
            REPL_USER,
            "--source-password-file",
            pw.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (out, stdout, stderr) = replica(&["--wait", "--verify-checksums"]);
    load.stop();
    assert!(out.status.success(), "replica failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("the replica matches its source"),
        "{stdout}"
    );
    assert!(stdout.contains("innodb_rows"), "{stdout}");
    wait_caught_up(&restored, &source, Duration::from_secs(120));
    let (out, _, stderr) = run(&[
        "restore",
        target.to_str().unwrap(),
        "--datadir",
        datadir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use by process"), "{stderr}");
    assert!(stderr.contains("mariadbd"), "{stderr}");
    let status = restored
        .client()
        .args(["-e", "SHOW SLAVE STATUS\\G"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("Slave_SQL_Running: Yes"),
        "the refused restore disturbed the replica:\n{status}"
    );
    let schemas = [LOAD_SCHEMA];
    assert_eq!(
        checksums(&restored, &schemas),
        checksums(&source, &schemas),
        "the replica built from the restored backup diverged"
    );
    // A replica that lost a row: --verify-checksums names the table.
    restored.sql(&format!(
        "STOP SLAVE; RESET SLAVE ALL; SET SESSION sql_log_bin = 0; \
         DELETE FROM {LOAD_SCHEMA}.innodb_rows ORDER BY worker, seq LIMIT 1"
    ));
    let at = restored.value("SELECT @@GLOBAL.gtid_slave_pos");
    let (out, stdout, stderr) = replica(&["--gtid", &at, "--verify-checksums"]);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "differs from its source in 1 table(s): `{LOAD_SCHEMA}`.`innodb_rows`"
        )),
        "{stderr}"
    );
    restored.shutdown();
    source.shutdown();
}
