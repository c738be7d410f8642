//! `hotbackup binlog-archive` against real MariaDB servers: every binlog file lands in
//! the archive byte for byte and exactly once, through the server's restarts and the
//! archiver's own (SIGKILL included); replaying the archive into a fresh server gives
//! the source's tables; a purge before archiving is a gap that names the files; and
//! every refusal is one sentence.

mod common;

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use common::mariadb::{MariaDb, ServerUser, client_for, find_program};
use common::replication::{REPL_PASSWORD, REPL_USER, add_replication_user, checksums};
use common::{hotbackup, hotbackup_bin, signal, wait_for, wait_with_timeout};

const SCHEMA: &str = "hb_arch";
const BINLOG_ARGS: &[&str] = &["--log-bin=mysql-bin", "--server-id=1"];

/// A fresh temp directory for one test's servers and archive.
fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hb-arch-")
        .tempdir()
        .expect("tempdir")
}

/// A server writing a binlog (`mysql-bin.*`) with the schema the tests write to.
fn binlog_server(dir: &Path, name: &str, args: &[&str]) -> MariaDb {
    let mut db = MariaDb::init(&dir.join(name), ServerUser::Root);
    db.start_with(args);
    db.sql(&format!(
        "CREATE DATABASE {SCHEMA};\n\
         CREATE TABLE {SCHEMA}.t (id INT PRIMARY KEY, v VARCHAR(64), n INT) ENGINE=InnoDB;"
    ));
    db
}

/// Inserts rows `ids` into the test table, one autocommit transaction each.
fn insert_rows(socket: &Path, ids: Range<u32>) {
    let sql: String = ids
        .map(|i| format!("INSERT INTO {SCHEMA}.t VALUES ({i}, MD5({i}), {i});"))
        .collect();
    let out = client_for(socket).args(["-e", &sql]).output().unwrap();
    assert!(
        out.status.success(),
        "insert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `hotbackup binlog-archive` arguments for `socket` as root into `dir`.
fn archive_args(socket: &Path, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "binlog-archive".to_string(),
        "--no-defaults".into(),
        format!("--socket={}", socket.display()),
        format!("--dir={}", dir.display()),
    ];
    if !extra.iter().any(|e| e.starts_with("--user")) {
        a.push("--user=root".into());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn archive_once(db: &MariaDb, dir: &Path, extra: &[&str]) -> Output {
    let mut extra = extra.to_vec();
    extra.push("--once");
    let a = archive_args(db.socket(), dir, &extra);
    hotbackup(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A continuous archiver; dropping it stops it (SIGTERM to its own pid).
struct Archiver {
    child: Option<Child>,
    log: PathBuf,
}

impl Archiver {
    /// Runs `hotbackup ARGS` (binlog-archive without --once), stderr appended to `log`.
    fn start(a: &[String], log: PathBuf) -> Archiver {
        let err = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(hotbackup_bin())
            .args(a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn the archiver");
        Archiver {
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("archiver running").id()
    }

    fn kill9(&mut self) {
        let child = self.child.take().expect("archiver running");
        signal(child.id(), libc::SIGKILL);
        let out = wait_with_timeout(child, Duration::from_secs(10));
        assert!(out.status.code().is_none(), "not killed: {:?}", out.status);
    }

    /// SIGTERM; its exit status and everything it wrote on stderr (all runs).
    fn stop(&mut self) -> (ExitStatus, String) {
        let child = self.child.take().expect("archiver running");
        signal(child.id(), libc::SIGTERM);
        let out = wait_with_timeout(child, Duration::from_secs(30));
        (
            out.status,
            fs::read_to_string(&self.log).unwrap_or_default(),
        )
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            let _ = wait_with_timeout(child, Duration::from_secs(10));
        }
    }
}

/// Processes streaming into `dir` (found by their command line; only read, never killed).
fn streamers_into(dir: &Path) -> Vec<u32> {
    let needle = format!("--result-file={}/.partial/", dir.display());
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join("archive.json")).expect("archive.json"))
        .expect("archive.json is JSON")
}

/// Names of the complete files in the manifest, in its order.
fn archived(dir: &Path) -> Vec<String> {
    manifest(dir)["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

/// The server's binlog files (SHOW BINARY LOGS), oldest first.
fn server_logs(db: &MariaDb) -> Vec<String> {
    db.rows("SHOW BINARY LOGS")
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

/// Every complete file of the archive is recorded once, with the right checksum and
/// size, and is byte for byte the server's own file while the server still has it;
/// the names follow each other without a hole. Returns how many were compared with
/// the server's.
fn assert_archive_is_the_servers(db: &MariaDb, dir: &Path) -> usize {
    let m = manifest(dir);
    let files = m["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(unique, names, "a file is archived twice");
    for pair in names.windows(2) {
        let n = |s: &str| s.rsplit_once('.').unwrap().1.parse::<u64>().unwrap();
        assert_eq!(n(pair[1]), n(pair[0]) + 1, "a hole between {pair:?}");
    }
    let mut compared = 0;
    for f in files {
        let name = f["name"].as_str().unwrap();
        let ours = fs::read(dir.join(name)).unwrap();
        assert_eq!(ours.len() as u64, f["size"].as_u64().unwrap(), "{name}");
        assert_eq!(
            blake3::hash(&ours).to_hex().as_str(),
            f["blake3"].as_str().unwrap(),
            "{name}: checksum"
        );
        if let Ok(theirs) = fs::read(db.datadir().join(name)) {
            assert!(ours == theirs, "{name} differs from the server's");
            compared += 1;
        }
    }
    compared
}

#[test]
fn once_archives_every_file_byte_for_byte_and_nothing_twice() {
    let tmp = workdir();
    let db = binlog_server(tmp.path(), "src", BINLOG_ARGS);
    // Two GTID domains: each file starts with a GTID list that a resume compares with
    // the server's.
    db.sql(&format!(
        "SET SESSION gtid_domain_id = 5; INSERT INTO {SCHEMA}.t VALUES (9999, 'other', 0)"
    ));
    for round in 0..3 {
        insert_rows(db.socket(), round * 50..round * 50 + 50);
        db.sql("FLUSH BINARY LOGS");
    }
    insert_rows(db.socket(), 1000..1010);
    let dir = tmp.path().join("archive");
    let out = archive_once(&db, &dir, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let logs = server_logs(&db);
    assert_eq!(logs.len(), 4);
    // Every file the server rotated past is archived, equal to the server's.
    assert_eq!(archived(&dir), logs[..3]);
    assert_eq!(assert_archive_is_the_servers(&db, &dir), 3);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 complete binlog file(s)"),
        "{out:?}"
    );
    // The file being written is there up to the server's current end; it differs only
    // in the "in use" flag of its first event, which the server clears when sending.
    let current = &logs[3];
    let partial = fs::read(dir.join(".partial").join(current)).unwrap();
    let server = fs::read(db.datadir().join(current)).unwrap();
    assert_eq!(partial.len(), server.len());
    let differ: Vec<usize> = (0..server.len())
        .filter(|&i| partial[i] != server[i])
        .collect();
    assert_eq!(differ, vec![21], "only the in-use flag differs");
    assert_eq!(partial[21], server[21] & !1);
    assert!(
        !dir.join(current).exists(),
        "an unfinished file is not archived"
    );

    // Again with nothing new: nothing is archived twice.
    let before = manifest(&dir)["files"].clone();
    let out = archive_once(&db, &dir, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(manifest(&dir)["files"], before);
    // After a rotation the formerly current file is archived in full.
    insert_rows(db.socket(), 2000..2010);
    db.sql("FLUSH BINARY LOGS");
    let out = archive_once(&db, &dir, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(archived(&dir), server_logs(&db)[..4]);
    assert_eq!(assert_archive_is_the_servers(&db, &dir), 4);
}

#[test]
fn continuous_archiving_survives_server_restarts_and_its_own_sigkill() {
    let tmp = workdir();
    let mut src = binlog_server(tmp.path(), "src", BINLOG_ARGS);
    let dir = tmp.path().join("archive");
    let log = tmp.path().join("archiver.stderr");
    let args = archive_args(src.socket(), &dir, &["--status-interval=2"]);
    let mut arch = Archiver::start(&args, log.clone());
    wait_for(
        "the archiver to start streaming",
        Duration::from_secs(30),
        || dir.join(".partial/mysql-bin.000001").exists(),
    );

    // Writes from another client while the binlog is rotated under them.
    let socket = src.socket().to_path_buf();
    let writer = std::thread::spawn(move || {
        for batch in 0..10 {
            insert_rows(&socket, batch * 20..batch * 20 + 20);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(200));
        src.sql("FLUSH BINARY LOGS");
    }
    writer.join().expect("writer");
    wait_for(
        "the first files to be archived",
        Duration::from_secs(30),
        || archived(&dir).len() >= 2,
    );

    // The server restarts (its shutdown rotates the binlog); the archiver carries on.
    src.shutdown();
    std::thread::sleep(Duration::from_secs(1));
    src.start_with(BINLOG_ARGS);
    insert_rows(src.socket(), 200..300);
    src.sql(&format!("UPDATE {SCHEMA}.t SET n = n + 1 WHERE id % 3 = 0"));
    src.sql("FLUSH BINARY LOGS");
    insert_rows(src.socket(), 300..350);
    let restarted = server_logs(&src);
    wait_for(
        "the archive to pass the server's restart",
        Duration::from_secs(60),
        || archived(&dir).len() >= restarted.len() - 1,
    );

    // The archiver is killed; its streamer dies with it; the server goes on writing
    // and rotating; a new archiver resumes.
    let streamers = streamers_into(&dir);
    assert_eq!(streamers.len(), 1, "one streamer for {}", arch.pid());
    arch.kill9();
    wait_for(
        "the streamer to die with the archiver",
        Duration::from_secs(10),
        || streamers_into(&dir).is_empty(),
    );
    insert_rows(src.socket(), 350..400);
    src.sql("FLUSH BINARY LOGS");
    src.sql(&format!("DELETE FROM {SCHEMA}.t WHERE id % 7 = 0"));
    let mut arch = Archiver::start(&args, log.clone());
    insert_rows(src.socket(), 400..450);
    src.sql("FLUSH BINARY LOGS");
    insert_rows(src.socket(), 450..500);
    src.sql("FLUSH BINARY LOGS");

    let logs = server_logs(&src);
    wait_for(
        "every rotated file to be archived",
        Duration::from_secs(60),
        || archived(&dir).len() == logs.len() - 1,
    );
    let (status, stderr) = arch.stop();
    assert!(
        status.success(),
        "the archiver failed ({status}):\n{stderr}"
    );
    assert!(
        streamers_into(&dir).is_empty(),
        "a streamer outlived the archiver"
    );

    // Every file exactly once, in order, byte-equal to the server's, no gap.
    assert_eq!(archived(&dir), logs[..logs.len() - 1]);
    assert_eq!(assert_archive_is_the_servers(&src, &dir), logs.len() - 1);
    assert_eq!(manifest(&dir)["gaps"], serde_json::json!([]));
    // It said what is at risk; it reported the lost server once, not a flood.
    assert!(
        stderr.contains("at most ~1 s of commits at risk"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("lost the server").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("reconnected").count(), 1, "{stderr}");

    // Point-in-time recovery: the archive replayed into a fresh server gives the
    // source's tables.
    let replay = MariaDb::init_and_start(&tmp.path().join("replay"), ServerUser::Root);
    let files: Vec<PathBuf> = archived(&dir).iter().map(|n| dir.join(n)).collect();
    let mut binlog = Command::new(find_program("mariadb-binlog"))
        .arg("--no-defaults")
        .args(&files)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let applied = replay
        .client()
        .stdin(Stdio::from(binlog.stdout.take().unwrap()))
        .output()
        .unwrap();
    let decoded = binlog.wait_with_output().unwrap();
    assert!(
        decoded.status.success(),
        "{}",
        String::from_utf8_lossy(&decoded.stderr)
    );
    assert!(
        applied.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let rows = src.value(&format!("SELECT COUNT(*) FROM {SCHEMA}.t"));
    let deleted = (0..400).filter(|i| i % 7 == 0).count();
    assert_eq!(rows, (500 - deleted).to_string());
    assert_eq!(
        replay.value(&format!("SELECT COUNT(*) FROM {SCHEMA}.t")),
        rows
    );
    assert_eq!(checksums(&replay, &[SCHEMA]), checksums(&src, &[SCHEMA]));
}

#[test]
fn a_purge_before_archiving_is_a_gap_that_names_the_files() {
    let tmp = workdir();
    let db = binlog_server(tmp.path(), "src", BINLOG_ARGS);
    let dir = tmp.path().join("archive");
    insert_rows(db.socket(), 0..10);
    db.sql("FLUSH BINARY LOGS");
    insert_rows(db.socket(), 10..20);
    let out = archive_once(&db, &dir, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(archived(&dir), ["mysql-bin.000001"]);
    // While no archiver runs: 000002 is finished (its copy lacks its end), 000003 is
    // written and finished, and both are purged.
    insert_rows(db.socket(), 20..30);
    db.sql("FLUSH BINARY LOGS");
    insert_rows(db.socket(), 30..40);
    db.sql("FLUSH BINARY LOGS");
    // The server keeps a file until its transactions are checkpointed: ask again.
    wait_for("the purge", Duration::from_secs(30), || {
        db.sql("PURGE BINARY LOGS TO 'mysql-bin.000004'");
        server_logs(&db) == ["mysql-bin.000004"]
    });

    let out = archive_once(&db, &dir, &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let gap_line = err
        .lines()
        .find(|l| l.contains("GAP"))
        .unwrap_or_else(|| panic!("no gap reported:\n{err}"));
    assert!(
        gap_line.contains("mysql-bin.000002, mysql-bin.000003") && gap_line.contains("purged"),
        "{gap_line}"
    );
    let gaps = manifest(&dir)["gaps"].clone();
    assert_eq!(gaps.as_array().unwrap().len(), 1, "{gaps}");
    assert_eq!(
        gaps[0]["files"],
        serde_json::json!(["mysql-bin.000002", "mysql-bin.000003"])
    );
    // What was archived of 000002 is kept, under a name that says it is incomplete.
    assert!(dir.join("mysql-bin.000002.incomplete").exists());
    assert!(!dir.join("mysql-bin.000002").exists());

    // Archiving goes on with what exists, and the gap is not reported again.
    insert_rows(db.socket(), 40..50);
    db.sql("FLUSH BINARY LOGS");
    let out = archive_once(&db, &dir, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("GAP"), "{}", stderr(&out));
    assert_eq!(archived(&dir), ["mysql-bin.000001", "mysql-bin.000004"]);
    assert_eq!(manifest(&dir)["gaps"].as_array().unwrap().len(), 1);
    assert_eq!(
        fs::read(dir.join("mysql-bin.000004")).unwrap(),
        fs::read(db.datadir().join("mysql-bin.000004")).unwrap()
    );
}

#[test]
fn over_tcp_with_a_password_that_never_shows_in_argv_or_environment() {
    let tmp = workdir();
    let db = binlog_server(tmp.path(), "src", BINLOG_ARGS);
    add_replication_user(&db);
    db.sql(&format!(
        "GRANT BINLOG MONITOR ON *.* TO '{REPL_USER}'@'127.0.0.1'"
    ));
    insert_rows(db.socket(), 0..20);
    db.sql("FLUSH BINARY LOGS");
    let dir = tmp.path().join("archive");
    let args: Vec<String> = [
        "binlog-archive",
        "--no-defaults",
        "--host=127.0.0.1",
        &format!("--port={}", db.port()),
        &format!("--user={REPL_USER}"),
        &format!("--password={REPL_PASSWORD}"),
        &format!("--dir={}", dir.display()),
    ]
    .map(String::from)
    .to_vec();
    let mut arch = Archiver::start(&args, tmp.path().join("archiver.stderr"));
    wait_for(
        "the first file to be archived",
        Duration::from_secs(30),
        || dir.join("archive.json").exists() && archived(&dir) == ["mysql-bin.000001"],
    );
    let streamers = streamers_into(&dir);
    assert_eq!(streamers.len(), 1);
    for what in ["cmdline", "environ"] {
        let text = fs::read(format!("/proc/{}/{what}", streamers[0])).unwrap();
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.contains("--protocol=tcp") || what == "environ",
            "{text}"
        );
        assert!(
            !text.contains(REPL_PASSWORD),
            "the password is in the streamer's {what}"
        );
    }
    let (status, stderr) = arch.stop();
    assert!(status.success(), "{stderr}");
    assert_eq!(assert_archive_is_the_servers(&db, &dir), 1);
}

/// A failed run: exit status 1 and exactly one line on stderr; returns the line.
fn refused(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one sentence: {err}");
    lines[0].to_string()
}

#[test]
fn refusals_name_the_problem_in_one_sentence() {
    let tmp = workdir();
    // A server without a binlog: nothing to archive, and no archive is created.
    let mut plain = MariaDb::init_and_start(&tmp.path().join("plain"), ServerUser::Root);
    let dir = tmp.path().join("archive");
    let err = refused(&archive_once(&plain, &dir, &[]));
    assert!(err.contains("writes no binlog (log_bin is OFF)"), "{err}");
    assert!(!dir.exists());

    // The server is not there.
    let gone = tmp.path().join("nowhere.sock");
    let a = archive_args(&gone, &dir, &["--once"]);
    let err = refused(&hotbackup(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(
        err.contains("cannot connect") && err.contains("is the server running"),
        "{err}"
    );

    let other = binlog_server(
        tmp.path(),
        "other",
        &["--log-bin=mysql-bin", "--server-id=2"],
    );
    other.sql(
        "DELETE FROM mysql.global_priv WHERE User = '';\n\
         FLUSH PRIVILEGES;\n\
         CREATE USER 'arch'@'localhost' IDENTIFIED BY 'right-pw';\n\
         GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO 'arch'@'localhost';\n\
         CREATE USER 'watcher'@'localhost' IDENTIFIED BY 'pw';\n\
         GRANT BINLOG MONITOR ON *.* TO 'watcher'@'localhost';",
    );
    // A wrong password.
    let err = refused(&archive_once(
        &other,
        &dir,
        &["--user=arch", "--password=wrong"],
    ));
    assert!(err.contains("refused user \"arch\""), "{err}");
    // A missing privilege, named with its GRANT.
    let err = refused(&archive_once(
        &other,
        &dir,
        &["--user=watcher", "--password=pw"],
    ));
    assert!(
        err.contains("REPLICATION SLAVE") && err.contains("GRANT REPLICATION SLAVE ON *.*"),
        "{err}"
    );
    // The right password works, also for the streamer it runs.
    let out = archive_once(&other, &dir, &["--user=arch", "--password=right-pw"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.join(".partial/mysql-bin.000001").exists());
    let mine = manifest(&dir);
    assert_eq!(mine["server"]["server_id"], 2);

    // Another server's archive: refused, and left as it was.
    plain.shutdown();
    plain.start_with(BINLOG_ARGS);
    let err = refused(&archive_once(&plain, &dir, &[]));
    assert!(
        err.contains("holds the binlog archive of another server (server_id 2"),
        "{err}"
    );
    assert_eq!(manifest(&dir), mine);

    // A directory that cannot be written.
    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let err = refused(&archive_once(&plain, &file.join("archive"), &[]));
    assert!(err.contains("cannot write the archive directory"), "{err}");
}
