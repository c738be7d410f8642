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
