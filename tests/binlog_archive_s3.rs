//! `binlog-archive --upload` and `restore --binlog-dir s3://…` against a real MariaDB
//! and a real S3-compatible server (moto, behind a proxy that can fail it): the bucket
//! follows the local archive file by file and its manifest never names an object that
//! is not there; a failing or unreachable bucket never holds the local archive up, is
//! said once, and catches up (in the run, and at a restart); point-in-time recovery
//! from the bucket reaches exactly the source's state at a GTID; a tampered object, a
//! gap, a missing archive or bucket are refused by name before anything is restored.

mod common;

use std::fs;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::mariadb::{MariaDb, ServerUser};
use common::replication::checksums;
use common::s3::{BUCKET, CutProxy, Moto};
use common::{Agent, backup, restored_server_args, signal, wait_for, wait_with_timeout};

const SCHEMAS: [&str; 1] = ["hb_bs3"];
const ARCHIVE: &str = "arch/binlogs";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Autocommit writes `from..=to` (one GTID each).
fn write_rows(db: &MariaDb, from: u32, to: u32) {
    let sql: String = (from..=to)
        .map(|i| {
            format!(
                "INSERT INTO hb_bs3.t VALUES ({i}, REPEAT('r', {i})); UPDATE hb_bs3.t SET v = CONCAT(v, 'u') WHERE id = {};\n",
                1 + i % 7
            )
        })
        .collect();
    db.sql(&sql);
}

/// The bucket's archive manifest (JSON), if there is one.
fn remote_manifest(moto: &Moto) -> Option<serde_json::Value> {
    let bytes = moto.get(&format!("{ARCHIVE}/hotbackup-binlogs.json"))?;
    Some(serde_json::from_slice(&bytes).expect("the manifest is JSON"))
}

fn names(files: &serde_json::Value) -> Vec<String> {
    files
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

/// Complete files the bucket's manifest names.
fn in_bucket(moto: &Moto) -> Vec<String> {
    remote_manifest(moto).map_or(Vec::new(), |m| names(&m["archive"]["files"]))
}

/// Complete files the local archive names.
fn in_archive(dir: &Path) -> Vec<String> {
    fs::read(dir.join("archive.json")).map_or(Vec::new(), |b| {
        names(&serde_json::from_slice::<serde_json::Value>(&b).unwrap()["files"])
    })
}

/// Every object the bucket's manifest names is there, as large as it says.
fn assert_bucket_consistent(moto: &Moto) {
    let Some(m) = remote_manifest(moto) else {
        return;
    };
    let objects = m["objects"].as_array().unwrap();
    assert_eq!(
        objects.len(),
        m["archive"]["files"].as_array().unwrap().len()
    );
    for o in objects {
        let key = format!("{ARCHIVE}/{}", o["key"].as_str().unwrap());
        let stored = moto.get(&key);
        assert_eq!(
            stored.map(|b| b.len() as u64),
            o["stored_size"].as_u64(),
            "the bucket's manifest names {key}, which is not there whole"
        );
    }
}

/// A continuous archiver uploading through `endpoint`; dropping it stops it (SIGTERM to
/// its own pid).
struct Archiver {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Archiver {
    fn start(moto: &Moto, endpoint: &str, socket: &Path, dir: &Path, log: &Path) -> Archiver {
        let child = moto
            .command(&[
                "binlog-archive",
                "--no-defaults",
                "--user=root",
                "--socket",
                s(socket),
                "--dir",
                s(dir),
                "--status-interval=0",
                "--upload",
                &moto.url(ARCHIVE),
                "--s3-endpoint",
                endpoint,
            ])
            .stdout(fs::File::create(log.with_extension("out")).unwrap())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn the archiver");
        Archiver {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; its exit status and stdout.
    fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        let out = wait_with_timeout(child, Duration::from_secs(30));
        let stdout = fs::read_to_string(self.log.with_extension("out")).unwrap_or_default();
        (out.status, stdout)
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

/// `hotbackup restore TARGET --datadir ROOT --until-gtid GTID --binlog-dir URL`.
fn restore(moto: &Moto, target: &Path, root: &Path, gtid: &str, url: &str) -> std::process::Output {
    moto.hotbackup(&[
        "restore",
        s(target),
        "--datadir",
        s(root),
        "--until-gtid",
        gtid,
        "--binlog-dir",
        url,
    ])
}

/// A refused restore: exit 1, the sentence, nothing left behind.
fn assert_refused(out: &std::process::Output, root: &Path, sentence: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(sentence), "wanted {sentence:?} in: {err}");
    assert!(!root.exists(), "{} was created", root.display());
    let left: Vec<_> = fs::read_dir(root.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".hotbackup-binlogs")
        })
        .collect();
    assert!(left.is_empty(), "the fetched binlogs were left: {left:?}");
}

#[test]
fn the_bucket_follows_the_archive_through_failures_and_pitr_restores_from_it() {
    let agent = Agent::start();
    let mut source = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    source.start_with(&[
        "--log-bin=mysql-bin",
        "--server-id=1",
        "--binlog-format=MIXED",
    ]);
    source.sql("CREATE DATABASE hb_bs3; CREATE TABLE hb_bs3.t (id INT PRIMARY KEY, v TEXT);");
    write_rows(&source, 1, 10);
    let work = tempfile::Builder::new()
        .prefix("hb-bs3-")
        .tempdir()
        .unwrap();
    let dir = work.path().join("archive");
    let moto = Moto::start();
    moto.allow_anonymous_reads();
    let proxy = CutProxy::start(&moto.endpoint, u64::MAX);
    // The first manifest cannot be written: objects are there without one.
    proxy.refuse(Some(&format!(
        "PUT /{BUCKET}/{ARCHIVE}/hotbackup-binlogs.json"
    )));
    let mut archiver = Archiver::start(
        &moto,
        &proxy.endpoint,
        source.socket(),
        &dir,
        &work.path().join("archiver.log"),
    );

    let target = agent.dir.path().join("backup");
    let out = backup(&source, &target, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_rows(&source, 11, 30);
    source.sql("FLUSH BINARY LOGS");
    write_rows(&source, 31, 50);
    let at_gtid = source.value("SELECT @@GLOBAL.gtid_binlog_pos");
    let state_at_gtid = checksums(&source, &SCHEMAS);
    write_rows(&source, 51, 60);
    source.sql("FLUSH BINARY LOGS");
    let logs = source.rows("SHOW BINARY LOGS");
    let complete: Vec<String> = logs[..logs.len() - 1]
        .iter()
        .map(|r| r[0].clone())
        .collect();
    let said = |what: &str| archiver.log().matches(what).count();
    wait_for("the failure to be said", Duration::from_secs(30), || {
        said("cannot upload to") == 1
    });
    let first_object = format!("{ARCHIVE}/{}.zst", complete[0]);
    assert!(moto.get(&first_object).is_some());
    assert_eq!(remote_manifest(&moto), None);
    proxy.refuse(None);
    wait_for(
        "the bucket to name every complete file",
        Duration::from_secs(60),
        || in_bucket(&moto) == complete,
    );
    assert_bucket_consistent(&moto);

    // A bucket that fails the next file's object: the local archive goes on, the bucket's
    // manifest names neither that file nor a later one, the failure is said once.
    assert_eq!(said("cannot upload to"), 1, "{}", archiver.log());
    assert_eq!(
        said("the queued files are uploaded"),
        1,
        "{}",
        archiver.log()
    );
    let next = logs[logs.len() - 1][0].clone();
    proxy.refuse(Some(&format!("{next}.zst")));
    write_rows(&source, 61, 70);
    source.sql("FLUSH BINARY LOGS");
    write_rows(&source, 71, 75);
    source.sql("FLUSH BINARY LOGS");
    wait_for(
        "the local archive to go on",
        Duration::from_secs(30),
        || in_archive(&dir).len() == complete.len() + 2,
    );
    wait_for("the failure to be said", Duration::from_secs(30), || {
        said("cannot upload to") == 2
    });
    std::thread::sleep(Duration::from_secs(4)); // a few retries
    assert_eq!(in_bucket(&moto), complete, "{}", archiver.log());
    assert_bucket_consistent(&moto);
    assert_eq!(said("cannot upload to"), 2, "{}", archiver.log());
    proxy.refuse(None);
    wait_for("the bucket to catch up", Duration::from_secs(60), || {
        in_bucket(&moto) == in_archive(&dir)
    });
    assert_eq!(
        said("the queued files are uploaded"),
        2,
        "{}",
        archiver.log()
    );
    assert_bucket_consistent(&moto);

    // An unreachable bucket while the archiver stops: it stops at once, says what is not
    // uploaded, and the next run (here a one-shot) uploads what the bucket lacks.
    proxy.set_down(true);
    write_rows(&source, 76, 80);
    source.sql("FLUSH BINARY LOGS");
    let archived = in_archive(&dir).len() + 1;
    wait_for(
        "the local archive to go on",
        Duration::from_secs(30),
        || in_archive(&dir).len() == archived,
    );
    let (status, stdout) = archiver.stop();
    assert!(status.success(), "{status:?}: {}", archiver.log());
    assert!(stdout.contains("1 not uploaded yet"), "{stdout}");
    assert_eq!(in_bucket(&moto).len(), archived - 1);
    proxy.set_down(false);
    let out = moto.hotbackup(&[
        "binlog-archive",
        "--no-defaults",
        "--user=root",
        "--socket",
        s(source.socket()),
        "--dir",
        s(&dir),
        "--once",
        "--upload",
        &moto.url(ARCHIVE),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(in_bucket(&moto), in_archive(&dir));
    assert_bucket_consistent(&moto);

    // `list` does not take the archive for a backup, and `delete` does not touch it.
    let out = moto.hotbackup(&["list", &moto.url("arch")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("binlogs"));
    assert!(!err.contains("incomplete"), "{err}");
    assert!(
        err.contains("not a backup: binlogs: binlog archive of server_id 1"),
        "{err}"
    );
    let out = moto.hotbackup(&["delete", &moto.url(ARCHIVE)]);
    assert!(!out.status.success());
    assert_eq!(in_bucket(&moto), in_archive(&dir));

    // Point-in-time recovery from the bucket reaches exactly the source's state.
    let root = work.path().join("restored");
    let out = restore(&moto, &target, &root, &at_gtid, &moto.url(ARCHIVE));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("reached GTID {at_gtid}")),
        "{stdout}"
    );
    let mut opts = restored_server_args(&root.join("hotbackup-restored.cnf"));
    opts.push("--server-id=2".into());
    let mut restored = MariaDb::with_datadir(&root, ServerUser::Root);
    restored.start_with(&opts.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(checksums(&restored, &SCHEMAS), state_at_gtid);
    restored.shutdown();

    // Refusals, each before anything is restored.
    let nowhere = work.path().join("nowhere");
    let out = restore(&moto, &target, &nowhere, &at_gtid, &moto.url("arch/other"));
    assert_refused(
        &out,
        &nowhere,
        "holds no binlog archive (no hotbackup-binlogs.json)",
    );
    let out = restore(
        &moto,
        &target,
        &nowhere,
        &at_gtid,
        "s3://no-such-bucket/arch/binlogs",
    );
    assert_refused(&out, &nowhere, "the bucket no-such-bucket does not exist");
    // A gap: the manifest without a file after the image's.
    let image_file = fs::read_to_string(target.join("hotbackup_binlog_info")).unwrap();
    let image_file = image_file.split('\t').next().unwrap().to_string();
    let files = in_bucket(&moto);
    let first = files.iter().position(|f| *f == image_file).unwrap();
    let dropped = files[first + 1].clone();
    moto.python(&format!(
        "import json\nk = '{ARCHIVE}/hotbackup-binlogs.json'\n\
         m = json.loads(s3().get_object(Bucket={BUCKET:?}, Key=k)['Body'].read())\n\
         i = [f['name'] for f in m['archive']['files']].index({dropped:?})\n\
         del m['archive']['files'][i]; del m['objects'][i]\n\
         s3().copy_object(Bucket={BUCKET:?}, Key=k + '.saved', CopySource={{'Bucket': {BUCKET:?}, 'Key': k}})\n\
         s3().put_object(Bucket={BUCKET:?}, Key=k, Body=json.dumps(m).encode())"
    ));
    let out = restore(&moto, &target, &nowhere, &at_gtid, &moto.url(ARCHIVE));
    assert_refused(&out, &nowhere, &format!("have a gap: {dropped} missing"));
    // A tampered object: another file's (well-formed) object under the image file's key.
    moto.python(&format!(
        "k = '{ARCHIVE}/hotbackup-binlogs.json'\n\
         s3().copy_object(Bucket={BUCKET:?}, Key=k, CopySource={{'Bucket': {BUCKET:?}, 'Key': k + '.saved'}})\n\
         s3().copy_object(Bucket={BUCKET:?}, Key='{ARCHIVE}/{image_file}.zst', CopySource={{'Bucket': {BUCKET:?}, 'Key': '{ARCHIVE}/{dropped}.zst'}})"
    ));
    let out = restore(&moto, &target, &nowhere, &at_gtid, &moto.url(ARCHIVE));
    assert_refused(
        &out,
        &nowhere,
        &format!(
            "{image_file}.zst in {} is damaged or was tampered with",
            moto.url(ARCHIVE)
        ),
    );
    source.shutdown();
}
