//! Seeing backups: `hotbackup backup --metrics-file` against a real MariaDB on a real
//! mount (a success's values, kept across a failure that counts an error), and
//! `hotbackup status` with no agent named, which lists the host's mounts and the last
//! backups from the history.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::SystemTime;

use common::mariadb::{MariaDb, ServerUser};
use common::{Agent, backup, hotbackup};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const METRICS: [&str; 10] = [
    "hotbackup_last_success_timestamp_seconds",
    "hotbackup_last_attempt_timestamp_seconds",
    "hotbackup_last_attempt_success",
    "hotbackup_last_duration_seconds",
    "hotbackup_last_commit_block_milliseconds",
    "hotbackup_last_bytes",
    "hotbackup_last_bytes_copied",
    "hotbackup_last_bytes_mirrored",
    "hotbackup_last_bytes_cloned",
    "hotbackup_errors_total",
];

/// The samples of a metrics file, by name: (the mountpoint label, the value). Parsed
/// here, not by the agent's own reader, so the test holds the format to what the
/// textfile collector reads.
fn samples(path: &Path) -> BTreeMap<String, (String, f64)> {
    let text = std::fs::read_to_string(path).unwrap();
    for name in METRICS {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP: {name}\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "no TYPE: {name}\n{text}"
        );
    }
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = series.split_once('{').unwrap();
            let label = labels
                .strip_prefix("mountpoint=\"")
                .and_then(|l| l.strip_suffix("\"}"))
                .unwrap_or_else(|| panic!("no mountpoint label: {l}"));
            (
                name.to_string(),
                (label.to_string(), value.parse().unwrap()),
            )
        })
        .collect()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn metrics_keep_the_last_success_across_a_failure_and_status_lists_the_host() {
    let agent = Agent::start();
    let mut db = MariaDb::init(&agent.mountpoint, ServerUser::Root);
    db.start_with(&["--log-bin=mysql-bin", "--server-id=1"]);
    db.sql(
        "CREATE DATABASE hb_m; CREATE TABLE hb_m.t (id INT PRIMARY KEY) ENGINE=InnoDB; \
         INSERT INTO hb_m.t VALUES (1), (2), (3);",
    );
    let prom_dir = agent.dir.path().join("textfile");
    std::fs::create_dir(&prom_dir).unwrap();
    let prom = prom_dir.join("hotbackup.prom");
    let metrics_arg = format!("--metrics-file={}", prom.display());
    // `backup.1` and `backup.2` share the harness's history file `backup.history.jsonl`.
    let history = agent.dir.path().join("backup.history.jsonl");
    let mountpoint = std::fs::canonicalize(&agent.mountpoint).unwrap();
    let mountpoint = mountpoint.to_str().unwrap();

    // A successful backup: sane values, labelled with the mount.
    let good = agent.dir.path().join("backup.1");
    let out = backup(&db, &good, &[&metrics_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after_success = samples(&prom);
    let value = |m: &BTreeMap<String, (String, f64)>, name: &str| m[name].1;
    assert_eq!(after_success.len(), METRICS.len(), "{after_success:?}");
    for (name, (label, _)) in &after_success {
        assert_eq!(label, mountpoint, "{name}");
    }
    let success_at = value(&after_success, "hotbackup_last_success_timestamp_seconds");
    assert!(
        (now() - 60.0..=now()).contains(&success_at),
        "last success {success_at} is not within the last minute"
    );
    assert_eq!(
        value(&after_success, "hotbackup_last_attempt_timestamp_seconds"),
        success_at
    );
    assert_eq!(value(&after_success, "hotbackup_last_attempt_success"), 1.0);
    assert!(value(&after_success, "hotbackup_last_duration_seconds") > 0.0);
    assert!(value(&after_success, "hotbackup_last_commit_block_milliseconds") > 0.0);
    assert!(value(&after_success, "hotbackup_last_bytes") > 0.0);
    assert!(value(&after_success, "hotbackup_last_bytes_copied") > 0.0);
    assert_eq!(value(&after_success, "hotbackup_errors_total"), 0.0);

    // A failing backup (a non-empty target): the last success stays, an error counts.
    let bad = agent.dir.path().join("backup.2");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("someone-elses-file"), "x").unwrap();
    let out = backup(&db, &bad, &[&metrics_arg]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let after_failure = samples(&prom);
    assert_eq!(
        value(&after_failure, "hotbackup_last_success_timestamp_seconds"),
        success_at
    );
    assert!(value(&after_failure, "hotbackup_last_attempt_timestamp_seconds") >= success_at);
    assert_eq!(value(&after_failure, "hotbackup_last_attempt_success"), 0.0);
    assert_eq!(value(&after_failure, "hotbackup_errors_total"), 1.0);
    for kept in [
        "hotbackup_last_commit_block_milliseconds",
        "hotbackup_last_bytes",
        "hotbackup_last_bytes_copied",
        "hotbackup_last_bytes_mirrored",
    ] {
        assert_eq!(
            value(&after_failure, kept),
            value(&after_success, kept),
            "{kept}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&prom_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec!["hotbackup.prom"],
        "a temporary file was left behind"
    );

    // The whole host's status: this test's mount with its agent, and both backups.
    let out = hotbackup(&[
        "status",
        "--json",
        &format!("--history-file={}", history.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let host: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = host["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["mountpoint"] == mountpoint)
        .unwrap_or_else(|| panic!("the test's mount is not listed: {host:#}"));
    assert_eq!(ours["status"]["pid"], agent.pid(), "{ours:#}");
    assert!(ours["status"]["session"].is_null(), "{ours:#}");
    let backups = host["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{host:#}");
    assert_eq!(backups[0]["target"], bad.to_str().unwrap());
    assert_eq!(backups[0]["state"], "error");
    assert_eq!(backups[1]["target"], good.to_str().unwrap());
    assert_eq!(backups[1]["state"], "complete");

    // The same as tables, and --last.
    let out = hotbackup(&[
        "status",
        "--last=1",
        &format!("--history-file={}", history.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(mountpoint) && l.contains(&format!("pid {}", agent.pid()))),
        "{table}"
    );
    assert!(table.contains(bad.to_str().unwrap()), "{table}");
    assert!(
        !table.contains(good.to_str().unwrap()),
        "--last=1 shows only the newest: {table}"
    );
    db.shutdown();
}
