//! Backup history (WL#4209 R06): one JSON line per state change of a backup, appended to
//! a file; never written through the server, so never replicated.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub const DEFAULT_FILE: &str = "/var/lib/hotbackup/history.jsonl";

pub struct History {
    file: PathBuf,
    id: String,
    target: PathBuf,
}

impl History {
    pub fn open(file: &Path, target: &Path) -> History {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        History {
            file: file.to_path_buf(),
            id: format!("{}-{}", now.as_millis(), std::process::id()),
            target: target.to_path_buf(),
        }
    }

    /// Appends a state (starting, copying, validity_point, complete, error, cancelled).
    /// A history that cannot be written is reported on stderr, never fails a backup.
    pub fn record(&self, state: &str, detail: Option<&str>) {
        let line = serde_json::json!({
            "id": self.id,
            "time": crate::manifest::rfc3339(SystemTime::now()),
            "state": state,
            "target": self.target,
            "detail": detail,
        });
        let written = (|| -> std::io::Result<()> {
            if let Some(dir) = self.file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.file)?;
            writeln!(f, "{line}")
        })();
        if let Err(e) = written {
            eprintln!(
                "hotbackup: could not append to the history {}: {e}",
                self.file.display()
            );
        }
    }
}

/// One backup as the history tells it: its first and last lines.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackupRecord {
    pub id: String,
    pub target: PathBuf,
    /// The time of its first line (RFC 3339).
    pub started: String,
    /// The time of its last line.
    pub updated: String,
    /// Its last state: complete, error, cancelled, or a state it is still in (or was in
    /// when its client was killed).
    pub state: String,
    pub detail: Option<String>,
}

/// The last `n` backups in the history file, newest first; a missing file has none.
pub fn last_backups(file: &Path, n: usize) -> std::io::Result<Vec<BackupRecord>> {
    match std::fs::read_to_string(file) {
        Ok(text) => Ok(backups(&text).into_iter().rev().take(n).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Every backup in a history's text, in the order they started. Lines that are not
/// history lines (a torn last line after a crash) are passed over.
pub fn backups(text: &str) -> Vec<BackupRecord> {
    let mut out: Vec<BackupRecord> = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(id), Some(time), Some(state)) =
            (v["id"].as_str(), v["time"].as_str(), v["state"].as_str())
        else {
            continue;
        };
        let detail = v["detail"].as_str().map(str::to_string);
        // Backups interleave only when two run at once, which the agent refuses: the
        // one a line belongs to is nearly always the last one.
        match out.iter_mut().rev().find(|b| b.id == id) {
            Some(b) => {
                b.updated = time.to_string();
                b.state = state.to_string();
                b.detail = detail;
            }
            None => out.push(BackupRecord {
                id: id.to_string(),
                target: PathBuf::from(v["target"].as_str().unwrap_or_default()),
                started: time.to_string(),
                updated: time.to_string(),
                state: state.to_string(),
                detail,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backup_is_told_by_its_first_and_last_lines() {
        let text = [
            r#"{"id":"1","time":"T1","state":"starting","target":"/b/1","detail":null}"#,
            r#"{"id":"1","time":"T2","state":"complete","target":"/b/1","detail":null}"#,
            r#"{"id":"2","time":"T3","state":"starting","target":"/b/2","detail":null}"#,
            r#"{"id":"2","time":"T4","state":"error","target":"/b/2","detail":"full"}"#,
            r#"{"id":"3","time":"T5","state":"copy"#,
        ]
        .join("\n");
        let all = backups(&text);
        assert_eq!(all.len(), 2, "the torn line is passed over: {all:?}");
        assert_eq!(
            (all[0].started.as_str(), all[0].updated.as_str()),
            ("T1", "T2")
        );
        assert_eq!(all[0].state, "complete");
        assert_eq!(all[1].state, "error");
        assert_eq!(all[1].detail.as_deref(), Some("full"));
        assert_eq!(all[1].target, PathBuf::from("/b/2"));
    }

    #[test]
    fn the_last_backups_come_newest_first_and_a_missing_file_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.jsonl");
        assert_eq!(last_backups(&file, 5).unwrap(), Vec::new());
        for (i, target) in ["/b/1", "/b/2", "/b/3"].iter().enumerate() {
            History {
                file: file.clone(),
                id: i.to_string(),
                target: PathBuf::from(target),
            }
            .record("complete", None);
        }
        let last: Vec<_> = last_backups(&file, 2)
            .unwrap()
            .into_iter()
            .map(|b| b.target)
            .collect();
        assert_eq!(last, vec![PathBuf::from("/b/3"), PathBuf::from("/b/2")]);
    }
}
