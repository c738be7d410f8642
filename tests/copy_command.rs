//! `hotbackup copy` through the real agent: exact images with a manifest, refusals,
//! faults that must never reach the application (a full target, a killed client), and a
//! MariaDB under load that sees no errors while it is copied.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::load::{LoadOptions, WriteLoad};
use common::mariadb::{MariaDb, ServerUser};
use common::{Agent, hotbackup_bin, is_mounted, wait_for};

fn copy(agent: &Agent, target: &Path, extra: &[&str]) -> std::process::Output {
    agent.copy(target, &[&["--progress", "none"], extra].concat())
}

fn spawn_copy(agent: &Agent, target: &Path, extra: &[&str]) -> Child {
    Command::new(hotbackup_bin())
        .args(["copy", "--mountpoint"])
        .arg(&agent.mountpoint)
        .arg("--target-dir")
        .arg(target)
        .args(["--progress", "json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn fill(agent: &Agent, files: usize, size: usize) {
    fs::create_dir_all(agent.mnt("db")).unwrap();
    for i in 0..files {
        let data: Vec<u8> = (0..size).map(|b| (b * 31 + i) as u8).collect();
        fs::write(agent.mnt(&format!("db/t{i}.ibd")), data).unwrap();
    }
}

#[test]
fn copy_of_a_quiet_tree_is_exact_with_checksums_and_metadata() {
    let agent = Agent::start();
    fill(&agent, 5, 200_000);
    fs::set_permissions(
        agent.mnt("db/t0.ibd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::chown(agent.mnt("db/t1.ibd"), Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::symlink("db/t0.ibd", agent.mnt("link")).unwrap();
    let t = fs::FileTimes::new()
        .set_modified(std::time::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789));
    File::options()
        .write(true)
        .open(agent.mnt("db/t2.ibd"))
        .unwrap()
        .set_times(t)
        .unwrap();
    let target = agent.dir.path().join("backup");
    let out = copy(&agent, &target, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("copied 5 files"), "{text}");
    // Checked before this test reads the image: the image file has the access time its
    // source had at the validity point (the copier's read gave it one), not the time the
    // checksum pass read it.
    let atime = |p: &Path| {
        let m = fs::metadata(p).unwrap();
        (m.atime(), m.atime_nsec())
    };
    assert_eq!(
        atime(&target.join("data/db/t2.ibd")),
        atime(&agent.backing.join("db/t2.ibd")),
        "the image file's access time is not the source's"
    );
    assert!(!target.join("INCOMPLETE").exists());
    // Whatever the agent's umask, what it creates outside the image is private.
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&target), 0o750, "target directory mode");
    assert_eq!(mode(&target.join("backup.json")), 0o640, "manifest mode");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(target.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 2);
    assert_eq!(manifest["totals"]["files"], 5);
    let files = manifest["files"].as_array().unwrap();
    for f in files.iter().filter(|f| f["type"] == "file") {
        let path = target.join("data").join(f["path"].as_str().unwrap());
        let data = fs::read(&path).unwrap();
        assert_eq!(
            f["blake3"].as_str().unwrap(),
            agent::digest::of_bytes(agent::digest::Algorithm::B3z1, &data),
            "{}",
            path.display()
        );
        assert_eq!(f["size"].as_u64().unwrap(), data.len() as u64);
        assert_eq!(
            data,
            fs::read(agent.mnt(f["path"].as_str().unwrap())).unwrap()
        );
    }
    let img = |p: &str| fs::symlink_metadata(target.join("data").join(p)).unwrap();
    assert_eq!(img("db/t0.ibd").mode() & 0o7777, 0o640);
    assert_eq!(
        (img("db/t1.ibd").uid(), img("db/t1.ibd").gid()),
        (65534, 65534)
    );
    assert_eq!(
        (img("db/t2.ibd").mtime(), img("db/t2.ibd").mtime_nsec()),
        (1_600_000_000, 123_456_789)
    );
    assert!(img("link").file_type().is_symlink());
    assert_eq!(
        fs::read_link(target.join("data/link")).unwrap().to_str(),
        Some("db/t0.ibd")
    );
}

#[test]
fn copy_refuses_bad_targets_and_a_second_session() {
    let agent = Agent::start();
    fill(&agent, 4, 1 << 20);
    let taken = agent.dir.path().join("taken");
    fs::create_dir(&taken).unwrap();
    fs::write(taken.join("keep"), b"mine").unwrap();
    let out = copy(&agent, &taken, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(fs::read(taken.join("keep")).unwrap(), b"mine");
    assert_eq!(fs::read_dir(&taken).unwrap().count(), 1);
    for inside in [agent.mnt("backup"), agent.backing.join("backup")] {
        let out = copy(&agent, &inside, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("outside the mount"), "{err}");
        assert!(!inside.exists(), "a refused target was created");
    }
    // A slow copy runs; a second one is refused and the first still completes.
    let first_target = agent.dir.path().join("first");
    let first = spawn_copy(&agent, &first_target, &["--throttle", "1"]);
    wait_for("the first session", Duration::from_secs(20), || {
        !agent.status()["session"].is_null()
    });
    let out = copy(&agent, &agent.dir.path().join("second"), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("already running"), "{err}");
    let done = first.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(first_target.join("backup.json").exists());
}

#[test]
fn a_full_target_aborts_the_session_but_never_an_application_write() {
    let agent = Agent::start();
    fill(&agent, 6, 1 << 20);
    let small = agent.dir.path().join("small");
    fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "hb-test-tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _cleanup = Unmount(&small);
    // An application keeps writing on the mount during the whole copy.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop) = (agent.mnt("db/t0.ibd"), stop.clone());
        std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(path).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                f.write_all_at(&[9u8; 4096], (n % 200) * 4096)
                    .expect("application write failed");
                n += 1;
            }
            n
        })
    };
    let out = copy(&agent, &small.join("backup"), &[]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = writer
        .join()
        .expect("the application's writes must all succeed");
    let err = String::from_utf8_lossy(&out.stderr);
    // Exit code 3: the target failed.
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("target is full") && err.contains("No space left"),
        "{err}"
    );
    assert!(writes > 0);
    let marker = fs::read_to_string(small.join("backup/INCOMPLETE")).unwrap();
    assert!(marker.contains("No space left"), "{marker}");
    assert!(
        agent.status()["session"].is_null(),
        "the aborted session must be gone"
    );
    // The mount serves on, and the next copy (with room) works.
    fs::write(agent.mnt("after"), b"still fine").unwrap();
    let out = copy(&agent, &agent.dir.path().join("roomy"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_killed_client_aborts_the_session_and_the_mount_serves_on() {
    let agent = Agent::start();
    fill(&agent, 8, 1 << 20);
    let target = agent.dir.path().join("killed");
    let mut client = spawn_copy(&agent, &target, &["--throttle", "1"]);
    wait_for("the session", Duration::from_secs(20), || {
        !agent.status()["session"].is_null()
    });
    client.kill().unwrap();
    client.wait().unwrap();
    wait_for(
        "the agent to abort the session",
        Duration::from_secs(20),
        || agent.status()["session"].is_null(),
    );
    assert!(is_mounted(&agent.mountpoint));
    // The agent ends the session first and then records why in the marker: a status
    // read in between sees no session and the marker not yet rewritten.
    wait_for("the reason in the marker", Duration::from_secs(20), || {
        fs::read_to_string(target.join("INCOMPLETE")).is_ok_and(|m| m.contains("client went away"))
    });
    assert!(!target.join("backup.json").exists());
    fs::write(agent.mnt("db/new"), b"the mount keeps serving").unwrap();
    let out = copy(&agent, &agent.dir.path().join("next"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(agent.dir.path().join("next/data/db/new")).unwrap(),
        b"the mount keeps serving"
    );
}

#[test]
fn mariadb_under_load_sees_no_errors_while_it_is_copied() {
    let agent = Agent::start();
    let mut db = MariaDb::init_and_start(&agent.mountpoint, ServerUser::Root);
    let load = WriteLoad::start(&db, LoadOptions::default());
    assert!(
        load.wait_until_acked(20, Duration::from_secs(60)),
        "the load did not get going"
    );
    let target = agent.dir.path().join("dbcopy");
    let out = copy(&agent, &target, &["--parallel", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = load.stop();
    for w in &report.workers {
        assert!(
            w.exit.is_some_and(|s| s.success()),
            "load client {} failed: {}",
            w.worker,
            w.stderr
        );
    }
    assert!(
        db.error_lines().is_empty(),
        "server errors during the copy: {:?}",
        db.error_lines()
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(target.join("backup.json")).unwrap()).unwrap();
    assert!(manifest["totals"]["files"].as_u64().unwrap() > 10);
    assert!(target.join("data/ibdata1").exists());
    db.shutdown();
}

/// Without any database coordination, the image is still the server's files at one
/// instant, so it must start like a server after a power cut: InnoDB crash recovery,
/// no corruption, and each client's transactions an unbroken prefix that holds every
/// transaction acknowledged before the copy began.
#[test]
fn a_copy_of_mariadb_under_load_recovers_like_after_a_crash() {
    let agent = Agent::start();
    let mut db = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    // Flush pages and checkpoint all the time, with a small redo log: then a page write
    // missing from the image is soon no longer covered by the redo log that recovery
    // replays, and the image shows it (lost rows or corruption) instead of recovery
    // quietly repairing it.
    db.start_with(&[
        "--innodb-log-file-size=4M",
        "--innodb-max-dirty-pages-pct=0",
        "--innodb-max-dirty-pages-pct-lwm=0",
        "--innodb-io-capacity=2000",
        "--innodb-adaptive-flushing-lwm=0",
    ]);
    let load = WriteLoad::start(&db, LoadOptions::default());
    assert!(
        load.wait_until_acked(20, Duration::from_secs(60)),
        "the load did not get going"
    );
    let floors = load.acked();
    let target = agent.dir.path().join("crashcopy");
    // Slow enough that the load runs through many checkpoints during the copy.
    let out = copy(&agent, &target, &["--parallel", "2", "--throttle", "25"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = load.stop();
    db.shutdown();
    let mut restored = MariaDb::with_datadir(&target.join("data"), ServerUser::Root);
    restored.start_with(&["--innodb-log-file-size=4M"]);
    let log = restored.error_log();
    assert!(
        log.contains("crash recovery"),
        "the image should need crash recovery:\n{log}"
    );
    report.assert_innodb_prefix(&restored, &floors, false);
    for table in ["innodb_rows", "innodb_progress"] {
        let verdict = restored.check_table(common::load::LOAD_SCHEMA, table);
        assert!(verdict.is_ok(), "CHECK TABLE {table}: {verdict:?}");
    }
    restored.shutdown();
}

#[test]
fn excluded_entries_stay_out_of_the_image() {
    let agent = Agent::start();
    fill(&agent, 2, 10_000);
    fs::write(agent.mnt("db/scratch.tmp"), b"temporary").unwrap();
    fs::create_dir_all(agent.mnt("cache/deep")).unwrap();
    fs::write(agent.mnt("cache/deep/blob"), vec![1u8; 50_000]).unwrap();
    let target = agent.dir.path().join("excl");
    let out = copy(
        &agent,
        &target,
        &["--exclude", "**/*.tmp", "--exclude", "cache"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = target.join("data");
    assert!(data.join("db/t0.ibd").exists());
    assert!(!data.join("db/scratch.tmp").exists());
    assert!(!data.join("cache").exists());
    let manifest = fs::read_to_string(target.join("backup.json")).unwrap();
    assert!(
        !manifest.contains("scratch.tmp") && !manifest.contains("cache/"),
        "{manifest}"
    );
    // A bad pattern is a clear error.
    let out = copy(&agent, &agent.dir.path().join("bad"), &["--exclude", "a[b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("--exclude"), "{err}");
    assert!(
        !agent.dir.path().join("bad").exists(),
        "a refused copy created its target"
    );
}

#[test]
fn throttle_limits_the_copier() {
    let agent = Agent::start();
    fill(&agent, 4, 1 << 20);
    let started = Instant::now();
    let out = copy(&agent, &agent.dir.path().join("slow"), &["--throttle", "2"]);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 4 MiB at 2 MB/s cannot take less than about 2 s, however fast the machine.
    assert!(
        took >= Duration::from_millis(1800),
        "4 MiB at 2 MB/s took only {took:?}"
    );
}

#[test]
fn throttle_auto_backs_off_while_the_application_suffers() {
    let agent = Agent::start();
    fill(&agent, 2, 32 << 20);
    // The application: small writes, each fsynced, for the first 3 s of the copy. Every
    // fsync takes longer than the budget of 10 µs, so the copier must keep halving its
    // rate: at most ~30 MB can move in those 3 s, and the tree holds 64 MiB.
    let app = agent.mnt("db/redo");
    let suffer = Duration::from_secs(3);
    let writer = std::thread::spawn(move || {
        let f = File::create(&app).unwrap();
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < suffer {
            f.write_all_at(&[n as u8; 4096], (n % 256) * 4096).unwrap();
            f.sync_data().unwrap();
            n += 1;
        }
        n
    });
    let started = Instant::now();
    // Half-way through the suffering, `status` shows the pace the copier keeps.
    let (out, pace) = std::thread::scope(|s| {
        let pace = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(1500));
            agent.status()["session"]["pace"].clone()
        });
        let out = copy(
            &agent,
            &agent.dir.path().join("paced"),
            &["--throttle", "auto", "--latency-budget", "0.01"],
        );
        (out, pace.join().unwrap())
    });
    let took = started.elapsed();
    let syncs = writer.join().unwrap();
    assert_eq!(pace["budget_us"], 10, "{pace}");
    assert!(
        pace["bytes_per_sec"].as_u64().unwrap() < 64_000_000,
        "the copier kept its starting rate while every fsync was over budget: {pace}"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(syncs > 10, "the application synced only {syncs} times");
    assert!(
        took >= suffer,
        "64 MiB were copied in {took:?} while every fsync was over budget"
    );
}
