//! `--metrics-file`: the outcome of each backup as a Prometheus text-format file for
//! node_exporter's textfile collector. The last success's values and the error counter
//! are carried over from the previous file, so a failed backup keeps them.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

/// What one backup attempt ended with.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    /// The mount the backup was of (empty when the backup failed before it was known).
    pub mountpoint: String,
    /// When the attempt ended, in seconds since the epoch.
    pub ended: f64,
    pub duration_secs: f64,
    /// What a successful backup measured; `None` for an error or a cancel.
    pub success: Option<SuccessValues>,
}

/// The values of a successful backup, kept until the next success.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SuccessValues {
    pub commit_block_ms: f64,
    pub bytes: u64,
    pub bytes_copied: u64,
    pub bytes_mirrored: u64,
    pub bytes_cloned: u64,
}

/// Everything the file holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackupMetrics {
    pub mountpoint: String,
    /// 0 until a backup has succeeded (so "no success for 26h" alerts fire at once).
    pub last_success_timestamp: f64,
    pub last_attempt_timestamp: f64,
    pub last_attempt_success: bool,
    pub last_duration_secs: f64,
    pub last_success: SuccessValues,
    pub errors_total: u64,
}

/// Name, type and help of each metric, in the order they are written.
const METRICS: [(&str, &str, &str); 10] = [
    (
        "hotbackup_last_success_timestamp_seconds",
        "gauge",
        "When the last successful backup ended (0: none yet).",
    ),
    (
        "hotbackup_last_attempt_timestamp_seconds",
        "gauge",
        "When the last backup attempt ended, whatever its outcome.",
    ),
    (
        "hotbackup_last_attempt_success",
        "gauge",
        "1 if the last backup attempt succeeded, 0 if it failed or was cancelled.",
    ),
    (
        "hotbackup_last_duration_seconds",
        "gauge",
        "How long the last backup attempt took.",
    ),
    (
        "hotbackup_last_commit_block_milliseconds",
        "gauge",
        "How long the last successful backup blocked commits.",
    ),
    (
        "hotbackup_last_bytes",
        "gauge",
        "Size of the image of the last successful backup.",
    ),
    (
        "hotbackup_last_bytes_copied",
        "gauge",
        "Bytes the last successful backup copied.",
    ),
    (
        "hotbackup_last_bytes_mirrored",
        "gauge",
        "Bytes the last successful backup mirrored from writes made during the copy.",
    ),
    (
        "hotbackup_last_bytes_cloned",
        "gauge",
        "The part of the copied bytes the last successful backup cloned (reflinked).",
    ),
    (
        "hotbackup_errors_total",
        "counter",
        "Backups that failed or were cancelled, across runs.",
    ),
];

impl BackupMetrics {
    /// The metrics after `attempt`, carrying over what `previous` knew.
    pub fn after(previous: Option<&BackupMetrics>, attempt: &Attempt) -> BackupMetrics {
        let mut m = previous.cloned().unwrap_or_default();
        if !attempt.mountpoint.is_empty() {
            m.mountpoint = attempt.mountpoint.clone();
        }
        m.last_attempt_timestamp = attempt.ended;
        m.last_duration_secs = attempt.duration_secs;
        m.last_attempt_success = attempt.success.is_some();
        match &attempt.success {
            Some(values) => {
                m.last_success_timestamp = attempt.ended;
                m.last_success = values.clone();
            }
            None => m.errors_total += 1,
        }
        m
    }

    fn values(&self) -> [f64; 10] {
        [
            self.last_success_timestamp,
            self.last_attempt_timestamp,
            if self.last_attempt_success { 1.0 } else { 0.0 },
            self.last_duration_secs,
            self.last_success.commit_block_ms,
            self.last_success.bytes as f64,
            self.last_success.bytes_copied as f64,
            self.last_success.bytes_mirrored as f64,
            self.last_success.bytes_cloned as f64,
            self.errors_total as f64,
        ]
    }

    /// The file's text, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let label = escape_label(&self.mountpoint);
        let mut out = String::new();
        for ((name, kind, help), value) in METRICS.iter().zip(self.values()) {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{mountpoint=\"{label}\"}} {value}\n"
            ));
        }
        out
    }

    /// Reads back what [`render`](Self::render) wrote; `None` if `text` holds none of it
    /// (a missing or foreign file starts the counters afresh).
    pub fn parse(text: &str) -> Option<BackupMetrics> {
        let mut m = BackupMetrics::default();
        let mut found = false;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            if let Some(label) = labels
                .strip_prefix("mountpoint=\"")
                .and_then(|l| l.strip_suffix("\"}"))
            {
                m.mountpoint = unescape_label(label);
            }
            found = true;
            match name {
                "hotbackup_last_success_timestamp_seconds" => m.last_success_timestamp = value,
                "hotbackup_last_attempt_timestamp_seconds" => m.last_attempt_timestamp = value,
                "hotbackup_last_attempt_success" => m.last_attempt_success = value == 1.0,
                "hotbackup_last_duration_seconds" => m.last_duration_secs = value,
                "hotbackup_last_commit_block_milliseconds" => {
                    m.last_success.commit_block_ms = value
                }
                "hotbackup_last_bytes" => m.last_success.bytes = value as u64,
                "hotbackup_last_bytes_copied" => m.last_success.bytes_copied = value as u64,
                "hotbackup_last_bytes_mirrored" => m.last_success.bytes_mirrored = value as u64,
                "hotbackup_last_bytes_cloned" => m.last_success.bytes_cloned = value as u64,
                "hotbackup_errors_total" => m.errors_total = value as u64,
                _ => found = false,
            }
        }
        found.then_some(m)
    }
}

/// Seconds since the epoch of `t`.
pub fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Records `attempt` in the metrics file at `path`: reads the previous file, writes the
/// new one to a temporary file in the same directory and renames it over, so the
/// collector never reads half a file.
pub fn record(path: &Path, attempt: &Attempt) -> std::io::Result<BackupMetrics> {
    let previous = match std::fs::read_to_string(path) {
        Ok(text) => BackupMetrics::parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let metrics = BackupMetrics::after(previous.as_ref(), attempt);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "its directory {} does not exist; create it (node_exporter's textfile directory) or name another --metrics-file",
                dir.display()
            ),
        ));
    }
    // node_exporter reads only `*.prom`: the temporary name must not end so.
    let mut tmp = tempfile::Builder::new()
        .prefix(".hotbackup-metrics-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(metrics.render().as_bytes())?;
    tmp.as_file().sync_all()?;
    // Readable by node_exporter, which runs as another user.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(metrics)
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn unescape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn success(ended: f64) -> Attempt {
        Attempt {
            mountpoint: "/var/lib/mysql".into(),
            ended,
            duration_secs: 12.5,
            success: Some(SuccessValues {
                commit_block_ms: 3.25,
                bytes: 1000,
                bytes_copied: 900,
                bytes_mirrored: 100,
                bytes_cloned: 400,
            }),
        }
    }

    #[test]
    fn a_missing_directory_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone/hotbackup.prom");
        let e = record(&path, &success(1.0)).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{} does not exist",
                dir.path().join("gone").display()
            )),
            "{e}"
        );
        assert!(e.contains("--metrics-file"), "{e}");
    }

    fn failure(ended: f64) -> Attempt {
        Attempt {
            mountpoint: String::new(),
            ended,
            duration_secs: 0.5,
            success: None,
        }
    }

    #[test]
    fn the_file_has_help_type_and_a_labelled_sample_for_each_metric() {
        let text = BackupMetrics::after(None, &success(1_700_000_000.0)).render();
        for (name, kind, _) in METRICS {
            assert!(text.contains(&format!("# HELP {name} ")), "{text}");
            assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{text}");
        }
        assert!(
            text.contains(
                "hotbackup_last_success_timestamp_seconds{mountpoint=\"/var/lib/mysql\"} 1700000000\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "hotbackup_last_commit_block_milliseconds{mountpoint=\"/var/lib/mysql\"} 3.25\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("hotbackup_last_attempt_success{mountpoint=\"/var/lib/mysql\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("hotbackup_errors_total{mountpoint=\"/var/lib/mysql\"} 0\n"),
            "{text}"
        );
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            METRICS.len(),
            "{text}"
        );
    }

    #[test]
    fn a_failure_keeps_the_last_success_and_counts_an_error() {
        let ok = BackupMetrics::after(None, &success(100.0));
        let failed = BackupMetrics::after(Some(&ok), &failure(200.0));
        assert_eq!(failed.last_success_timestamp, 100.0);
        assert_eq!(failed.last_success, ok.last_success);
        assert_eq!(failed.last_attempt_timestamp, 200.0);
        assert!(!failed.last_attempt_success);
        assert_eq!(failed.last_duration_secs, 0.5);
        assert_eq!(failed.errors_total, 1);
        assert_eq!(
            failed.mountpoint, "/var/lib/mysql",
            "a failure before the mount was known keeps the label"
        );
    }

    #[test]
    fn the_error_counter_is_carried_over_through_the_file() {
        let mut m = BackupMetrics::after(None, &failure(1.0));
        for t in 2..=3 {
            let previous = BackupMetrics::parse(&m.render()).expect("parses its own file");
            m = BackupMetrics::after(Some(&previous), &failure(t as f64));
        }
        let previous = BackupMetrics::parse(&m.render()).unwrap();
        m = BackupMetrics::after(Some(&previous), &success(4.0));
        assert_eq!(m.errors_total, 3, "a success does not reset the counter");
        assert_eq!(m.last_success_timestamp, 4.0);
    }

    #[test]
    fn a_file_reads_back_as_written_with_an_awkward_label() {
        let mut m = BackupMetrics::after(None, &success(1_700_000_123.75));
        m.mountpoint = "/srv/a \"b\"\\c\nd".into();
        m.errors_total = 7;
        assert_eq!(BackupMetrics::parse(&m.render()), Some(m));
    }

    #[test]
    fn no_success_yet_is_written_as_zero_and_a_foreign_file_starts_afresh() {
        let m = BackupMetrics::after(None, &failure(5.0));
        assert!(
            m.render()
                .contains("hotbackup_last_success_timestamp_seconds{mountpoint=\"\"} 0\n")
        );
        assert_eq!(BackupMetrics::parse("node_load1 0.5\n# x\n"), None);
    }

    #[test]
    fn record_replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hotbackup.prom");
        record(&path, &success(10.0)).unwrap();
        let m = record(&path, &failure(20.0)).unwrap();
        assert_eq!(m.last_success_timestamp, 10.0);
        assert_eq!(m.errors_total, 1);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(BackupMetrics::parse(&text), Some(m));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("hotbackup.prom")]);
    }
}
