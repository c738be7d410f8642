//! `hotbackup backup --clone always` of a real MariaDB under load whose backing directory
//! and backup target share a loop-mounted XFS: the image is made of clones of the
//! server's files, and a server started on it recovers to exactly the recorded GTID with
//! the load's invariants and every table sound.

mod common;

use std::time::Duration;

use common::load::{LOAD_SCHEMA, LoadOptions, WriteLoad};
use common::mariadb::{MariaDb, ServerUser};
use common::xfs::shared_bytes;
use common::{Agent, backup};

#[test]
fn a_cloned_backup_under_load_restores_to_the_recorded_gtid() {
    let agent = Agent::start_on_xfs("2G");
    let settings = [
        "--log-bin=mysql-bin",
        "--server-id=1",
        "--innodb-log-file-size=8M",
        "--innodb-flush-log-at-trx-commit=2",
    ];
    let mut source = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    source.start_with(&settings);
    let load = WriteLoad::start(&source, LoadOptions::default());
    assert!(
        load.wait_until_acked(10, Duration::from_secs(60)),
        "the load did not get going"
    );
    let floors = load.acked();
    let target = agent.xfs.as_ref().unwrap().dir().join("backup");
    let out = backup(&source, &target, &["--clone=always"]);
    let report = load.stop();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "backup failed:\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("of it cloned"), "{stdout}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("backup.json")).unwrap()).unwrap();
    let totals = &manifest["totals"];
    let cloned = totals["bytes_cloned"].as_u64().unwrap();
    // The copier's bytes are clones (a file's tail too, to its unaligned end), but for
    // the odd range the filesystem will not clone; ibdata1 alone is 12 MiB.
    assert!(
        cloned >= 10 << 20 && cloned * 10 >= totals["bytes_copied"].as_u64().unwrap() * 9,
        "the copier should have cloned, not copied: {totals}"
    );
    assert!(
        shared_bytes(&target.join("data/ibdata1")) > 0,
        "ibdata1 in the image shares no extents with the server's"
    );
    let gtid = manifest["database"]["binlog"]["gtid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!gtid.is_empty(), "{manifest}");
    // The image's files are still clones of the live ones: starting a server on it
    // writes there (copy-on-write), never into the source's blocks.
    let mut restored = MariaDb::with_datadir(&target.join("data"), ServerUser::Root);
    restored.start_with(&[
        "--log-bin=mysql-bin",
        "--server-id=2",
        "--innodb-log-file-size=8M",
    ]);
    assert_eq!(
        restored.value("SELECT @@GLOBAL.gtid_binlog_pos"),
        gtid,
        "the image is not at the recorded binlog position"
    );
    report.assert_innodb_prefix(&restored, &floors, false);
    for (table, _) in restored.tables(LOAD_SCHEMA) {
        let verdict = restored.check_table(LOAD_SCHEMA, &table);
        assert!(verdict.is_ok(), "CHECK TABLE {table}: {verdict:?}");
    }
    // And the source is untouched by the restored server's writes.
    for (table, _) in source.tables(LOAD_SCHEMA) {
        let verdict = source.check_table(LOAD_SCHEMA, &table);
        assert!(verdict.is_ok(), "source CHECK TABLE {table}: {verdict:?}");
    }
    restored.shutdown();
    source.shutdown();
}

/// A target off the backing directory's mount cannot take clones: `--clone always`
/// refuses with a sentence naming why and what to do instead, and the application's
/// files are untouched; `--clone auto` copies bytes there.
#[test]
fn clone_always_refuses_a_target_on_another_filesystem() {
    let agent = Agent::start_on_xfs("1G");
    std::fs::write(agent.mnt("f"), vec![7u8; 100_000]).unwrap();
    let copy =
        |target: &std::path::Path, clone: &str| agent.copy(target, &["--progress", "json", clone]);
    // The agent's temp directory is not on the XFS.
    let refused = copy(&agent.dir.path().join("always"), "--clone=always");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--clone always was asked for, but")
            && stderr.contains("not on the same mounted filesystem")
            && stderr.contains("use --clone auto or never"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(agent.mnt("f")).unwrap(), vec![7u8; 100_000]);
    agent.wait_no_session();
    let auto = copy(&agent.dir.path().join("auto"), "--clone=auto");
    assert!(
        auto.status.success(),
        "{}",
        String::from_utf8_lossy(&auto.stderr)
    );
    let stdout = String::from_utf8_lossy(&auto.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let summary: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(summary["copied"]["bytes_cloned"], 0, "{summary}");
    assert_eq!(summary["copied"]["bytes_copied"], 100_000, "{summary}");
}
