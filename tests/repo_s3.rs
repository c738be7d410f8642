//! Backups in an S3-compatible bucket (a real `moto` server on loopback, authentication
//! on): a real MariaDB backup goes up plain and encrypted and comes back byte for byte,
//! a tampered object is refused by `verify` and `restore`, a backup goes straight to a
//! bucket, and bad credentials, a missing bucket and bad key files are one sentence.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::mariadb::{MariaDb, ServerUser};
use common::s3::{BUCKET, Moto, key_file};
use common::{Agent, backup, ok, restored_server_args};

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// blake3 and mode of every file under `root`, by relative path.
fn tree(root: &Path) -> BTreeMap<PathBuf, (String, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            let sum = if m.is_file() {
                blake3::hash(&fs::read(&p).unwrap()).to_hex().to_string()
            } else {
                String::new()
            };
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), (sum, m.mode()));
        }
    }
    out
}

/// Restores `image` (a directory or URL) into `root` keeping the image's binlog
/// numbering (no private server runs: the files are the image's exactly).
fn restore(moto: &Moto, image: &str, root: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "restore",
        image,
        "--datadir",
        root.to_str().unwrap(),
        "--keep-binlog-history",
    ];
    args.extend(extra);
    moto.hotbackup(&args)
}

/// Flips one byte in the middle of the stored object whose key ends with `suffix`.
fn tamper(moto: &Moto, prefix: &str, suffix: &str) -> String {
    let key = moto
        .keys(prefix)
        .into_iter()
        .find(|k| k.ends_with(suffix))
        .unwrap_or_else(|| panic!("no object ending in {suffix} under {prefix}"));
    moto.python(&format!(
        "c = s3()\nb = bytearray(c.get_object(Bucket={BUCKET:?}, Key={key:?})['Body'].read())\n\
         b[len(b) // 2] ^= 1\nc.put_object(Bucket={BUCKET:?}, Key={key:?}, Body=bytes(b))"
    ));
    key
}

#[test]
fn a_mariadb_backup_round_trips_through_a_bucket_and_tampering_is_refused() {
    let moto = Moto::start();
    let agent = Agent::start();
    let mut source = MariaDb::init(&agent.mnt("db"), ServerUser::Mysql);
    source.start_with(&["--log-bin=bin", "--server-id=1"]);
    source.sql(
        "SET SESSION max_recursive_iterations = 10000; CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY, v VARCHAR(100)) ENGINE=InnoDB;
         INSERT INTO app.t WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 5000)
             SELECT n, REPEAT('x', 100) FROM s;
         CREATE TABLE app.m (id INT) ENGINE=MyISAM; INSERT INTO app.m VALUES (1),(2),(3);",
    );
    let work = tempfile::Builder::new().prefix("hb-s3-").tempdir().unwrap();
    let local = work.path().join("local");
    let out = backup(&source, &local, &[]);
    assert!(out.status.success(), "backup: {:?}", text(&out));

    // Up, plain and encrypted.
    let key = key_file(work.path());
    let plain = moto.url("nightly/plain");
    let enc = moto.url("nightly/enc");
    let local_s = local.to_str().unwrap();
    let up = ok(&moto.hotbackup(&["upload", local_s, &plain]));
    assert!(up.contains("0 already there"), "{up}");
    ok(&moto.hotbackup(&[
        "upload",
        local_s,
        &enc,
        "--encrypt-key-file",
        key.to_str().unwrap(),
    ]));
    // A second upload to a name that holds a backup is refused.
    let (_, again) = text(&moto.hotbackup(&["upload", local_s, &plain]));
    assert!(again.contains("already holds a complete backup"), "{again}");

    let listed = ok(&moto.hotbackup(&["list", &moto.url("nightly")]));
    assert!(
        listed.contains("plain") && listed.contains("enc"),
        "{listed}"
    );
    let gtid = fs::read_to_string(local.join("hotbackup_binlog_info")).unwrap();
    let gtid = gtid.trim_end().rsplit('\t').next().unwrap().to_string();
    let info = ok(&moto.hotbackup(&["info", &plain]));
    assert!(info.contains("state         complete"), "{info}");
    assert!(info.contains(&format!("GTID {gtid}")), "{info}");
    let verified = ok(&moto.hotbackup(&["verify", &plain]));
    assert!(verified.contains("all checksums match"), "{verified}");
    assert!(ok(&moto.hotbackup(&["info", &plain])).contains("all checksums matched"));
    let key_s = key.to_str().unwrap();
    assert!(
        ok(&moto.hotbackup(&["verify", &enc, "--encrypt-key-file", key_s]))
            .contains("all checksums match")
    );
    let (_, no_key) = text(&moto.hotbackup(&["verify", &enc]));
    assert!(
        no_key.contains("is encrypted; give its key with --encrypt-key-file"),
        "{no_key}"
    );

    // Down: the same files, modes and owners as a restore of the local image.
    let from_local = work.path().join("from-local");
    ok(&restore(&moto, local_s, &from_local, &[]));
    let expected = tree(&from_local);
    let cnf = PathBuf::from("db/hotbackup-restored.cnf");
    let without_cnf = |mut t: BTreeMap<PathBuf, (String, u32)>| {
        t.remove(&cnf).expect("the restore wrote its option file");
        t
    };
    for (url, extra) in [(&plain, vec![]), (&enc, vec!["--encrypt-key-file", key_s])] {
        let root = work
            .path()
            .join(format!("from-{}", url.rsplit('/').next().unwrap()));
        ok(&restore(&moto, url, &root, &extra));
        assert_eq!(
            without_cnf(tree(&root)),
            without_cnf(expected.clone()),
            "{url}"
        );
        let (uid, _) = ServerUser::Mysql.ids();
        assert_eq!(fs::metadata(root.join("db/ibdata1")).unwrap().uid(), uid);
    }
    // ... and a server starts on it, with the data at the recorded GTID.
    let datadir = work.path().join("from-enc/db");
    let mut restored = MariaDb::with_datadir(&datadir, ServerUser::Mysql);
    let mut opts = restored_server_args(&datadir.join("hotbackup-restored.cnf"));
    opts.push("--server-id=2".into());
    restored.start_with(&opts.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(restored.value("SELECT COUNT(*) FROM app.t"), "5000");
    assert_eq!(restored.value("SELECT COUNT(*) FROM app.m"), "3");
    assert_eq!(restored.value("SELECT @@gtid_binlog_pos"), gtid);
    restored.shutdown();

    // `replica` reads the coordinates from the bucket as from a directory.
    let replica_args = |image: &str| {
        let socket = format!("--socket={}", source.socket().display());
        moto.hotbackup(&[
            "replica",
            image,
            "--no-defaults",
            &socket,
            "--user=root",
            "--source-host=127.0.0.1",
            "--print-sql",
        ])
    };
    let from_bucket = ok(&replica_args(&plain));
    assert!(
        from_bucket.contains(&gtid) && from_bucket.contains("CHANGE MASTER"),
        "{from_bucket}"
    );
    assert_eq!(from_bucket, ok(&replica_args(local_s)));

    // A tampered object: verify names it, restore refuses before placing anything.
    tamper(&moto, "nightly/plain/", "ibdata1.zst");
    let out = moto.hotbackup(&["verify", &plain]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("changed: data/db/ibdata1") && stdout.contains("DAMAGED"),
        "{stdout}"
    );
    let refused_root = work.path().join("tampered");
    // A dry run reads the manifest and the side files only: the damaged data object
    // is not downloaded, and nothing is placed.
    let out = restore(&moto, &plain, &refused_root, &["--dry-run"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("would download") && stdout.contains("dry run: nothing was changed"),
        "{stdout}"
    );
    assert!(!refused_root.exists(), "a dry run placed something");
    let out = restore(&moto, &plain, &refused_root, &[]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("tampered with"), "{stderr}");
    assert!(!refused_root.exists(), "something was placed");
    let leftovers: Vec<_> = fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".hotbackup-download")
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "the staging directory was left behind"
    );
    // An encrypted image's manifest is sealed: one changed byte (the metadata kept), or
    // the MAC dropped, and nothing it says is trusted.
    let manifest_key = moto
        .keys("nightly/enc/")
        .into_iter()
        .find(|k| k.ends_with("hotbackup-repo.json"))
        .unwrap();
    let saved = work.path().join("sealed-manifest");
    let saved_s = saved.to_str().unwrap();
    let put = |body: &str, metadata: &str| {
        moto.python(&format!(
            "import pickle\nc = s3()\nb, meta = pickle.load(open({saved_s:?}, 'rb'))\n{body}\n\
             c.put_object(Bucket={BUCKET:?}, Key={manifest_key:?}, Body=b, Metadata={metadata})"
        ))
    };
    moto.python(&format!(
        "import pickle\nc = s3()\no = c.get_object(Bucket={BUCKET:?}, Key={manifest_key:?})\n\
         pickle.dump((o['Body'].read(), o['Metadata']), open({saved_s:?}, 'wb'))"
    ));
    put(
        "b = b.replace(b'\"uploaded_from\": \"/', b'\"uploaded_from\": \"//')",
        "meta",
    );
    for args in [
        vec!["verify", enc.as_str(), "--encrypt-key-file", key_s],
        vec![
            "restore",
            enc.as_str(),
            "--datadir",
            refused_root.to_str().unwrap(),
            "--encrypt-key-file",
            key_s,
        ],
    ] {
        let out = moto.hotbackup(&args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("hotbackup-repo.json") && stderr.contains("MAC does not match"),
            "{args:?}: {stderr}"
        );
        assert!(!refused_root.exists(), "something was placed");
    }
    put("pass", "{}");
    let out = moto.hotbackup(&["verify", &enc, "--encrypt-key-file", key_s]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).1.contains("carries no MAC"), "{:?}", text(&out));
    put("pass", "meta");
    ok(&moto.hotbackup(&["verify", &enc, "--encrypt-key-file", key_s]));
    // Encrypted, a flipped bit fails authentication.
    tamper(&moto, "nightly/enc/", "ibdata1.zst.enc");
    let out = moto.hotbackup(&["verify", &enc, "--encrypt-key-file", key_s]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));

    // A backup straight to a bucket: staged, uploaded after the validity point, removed.
    let staging = work.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let direct = moto.url("nightly/direct");
    let history = work.path().join("history.jsonl");
    ok(&moto.hotbackup(&[
        "backup",
        "--no-defaults",
        &format!("--socket={}", source.socket().display()),
        "--user=root",
        &format!("--target-dir={direct}"),
        &format!("--staging-dir={}", staging.display()),
        "--progress=none",
        &format!("--history-file={}", history.display()),
    ]));
    assert!(!staging.join("direct").exists(), "the staged copy was kept");
    assert!(ok(&moto.hotbackup(&["verify", &direct])).contains("all checksums match"));
    let (_, no_staging) = text(&moto.hotbackup(&[
        "backup",
        "--no-defaults",
        &format!("--socket={}", source.socket().display()),
        &format!("--target-dir={}", moto.url("nightly/other")),
    ]));
    assert!(no_staging.contains("--staging-dir"), "{no_staging}");
}

#[test]
fn bad_credentials_a_missing_bucket_and_bad_key_files_are_one_sentence() {
    let moto = Moto::start_with_auth();
    let url = moto.url("x");
    let one_line = |out: Output, expect: &str| {
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    };
    one_line(
        moto.hotbackup_with(&["list", &url], &[("AWS_SECRET_ACCESS_KEY", "wrong")]),
        "refused the credentials",
    );
    one_line(
        moto.hotbackup_with(&["list", &url], &[("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")]),
        "refused the credentials",
    );
    one_line(
        moto.hotbackup(&["list", "s3://no-such-bucket/x"]),
        "the bucket no-such-bucket does not exist",
    );
    one_line(
        moto.hotbackup_with(
            &["list", &url],
            &[("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")],
        ),
        "no S3 credentials",
    );
    // The right key gets in: the image is simply not there. So does the same key from
    // the credential file when the variables are not set.
    let absent = |out: Output| {
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        assert!(
            stdout.contains("is not a complete backup"),
            "{stdout}{stderr}"
        );
    };
    absent(moto.hotbackup(&["info", &moto.url("x/nothing")]));
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            moto.access_key, moto.secret_key
        ),
    )
    .unwrap();
    absent(moto.hotbackup_with(
        &["info", &moto.url("x/nothing")],
        &[
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
        ],
    ));
    // Key files: readable by others, or not 32 bytes.
    let key = key_file(dir.path());
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let upload = |key: &Path| {
        moto.hotbackup(&[
            "upload",
            dir.path().to_str().unwrap(),
            &url,
            "--encrypt-key-file",
            key.to_str().unwrap(),
        ])
    };
    // (The image is checked first: make it a finished one.)
    fs::write(dir.path().join("backup.json"), common_manifest()).unwrap();
    one_line(upload(&key), "can be read by others");
    let short = dir.path().join("short.key");
    fs::write(&short, [1u8; 16]).unwrap();
    fs::set_permissions(&short, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    one_line(upload(&short), "a key is exactly 32 random bytes");
}

/// The smallest finished image: a manifest with no files.
fn common_manifest() -> String {
    serde_json::json!({
        "format_version": 1, "tool": "hotbackup", "tool_version": "test", "kind": "copy",
        "host": "test", "source": {"mountpoint": "/m", "backing": "/b"},
        "started_at": "2026-01-01T00:00:00Z", "validity_point": "2026-01-01T00:00:01Z",
        "finished_at": "2026-01-01T00:00:02Z", "duration_secs": 2.0, "options": {},
        "totals": {"files": 0, "directories": 0, "symlinks": 0, "bytes": 0, "bytes_copied": 0, "bytes_mirrored": 0},
        "files": []
    })
    .to_string()
}
