//! A restored server's binlog starts a new history (WL#4209 R05). The image is older
//! than what the replicas of the old server may have applied; if the restored server
//! went on numbering its binlog files and GTIDs from the image's, a replica that was
//! ahead would, once the restored server has written as many transactions, find its
//! position again (the same GTID, or a file offset inside a new file of the same name)
//! and silently apply a different history. So the restored server gets binlog file
//! numbers and GTID sequence numbers no old replica can hold: `RESET MASTER TO` a file
//! number far past the image's, and the GTID state moved far ahead (in the first event of the new binlog). An old replica
//! then stops with the server's own error (its file is not in the index; its GTID is
//! older than the binlog), at once and also after any number of new transactions.
//! `--keep-binlog-history` keeps the image's numbering instead.

use serde::{Deserialize, Serialize};

use std::fs;
use std::path::{Path, PathBuf};

use super::RestoreError;
use super::plan::RestorePlan;
use super::temp_server::TempServer;

/// How far the new history starts past the image's.
pub const FILE_JUMP: u64 = 1_000_000;
pub const SEQ_JUMP: u64 = 1_000_000_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewHistory {
    /// The GTID state the image's binlog must end at (checked before it is reset).
    pub image_gtid: String,
    /// The data's GTID state (after a point-in-time replay, the GTID reached).
    pub data_gtid: String,
    pub first_file_number: u64,
    pub gtid_state: String,
}

impl NewHistory {
    pub fn new(binlog_file: &str, image_gtid: &str, data_gtid: &str) -> Option<NewHistory> {
        let (_, n) = binlog_file.rsplit_once('.')?;
        let n: u64 = n.parse().ok()?;
        let gtid_state = data_gtid
            .split(',')
            .filter_map(|g| {
                let mut it = g.trim().splitn(3, '-');
                let (d, s, q) = (it.next()?, it.next()?, it.next()?.parse::<u64>().ok()?);
                Some(format!("{d}-{s}-{}", q + SEQ_JUMP))
            })
            .collect::<Vec<_>>()
            .join(",");
        Some(NewHistory {
            image_gtid: image_gtid.to_string(),
            data_gtid: data_gtid.to_string(),
            first_file_number: n + FILE_JUMP,
            gtid_state,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "start a new binlog history (file number {}, GTIDs after {}), so that replicas of the old server stop instead of diverging (--keep-binlog-history keeps the old numbering)",
            self.first_file_number,
            if self.gtid_state.is_empty() {
                "none"
            } else {
                &self.gtid_state
            }
        )
    }
}

/// Checks that the image's binlog ends exactly at the recorded GTID (the backup's
/// consistency, seen by the server itself), then starts the new history.
pub(super) fn start(server: &TempServer, history: &NewHistory) -> Result<(), RestoreError> {
    let out = server
        .client(&["-N", "-B", "-e", "SELECT @@GLOBAL.gtid_binlog_pos"])
        .output()
        .map_err(|e| RestoreError::Replay(format!("running the mariadb client: {e}")))?;
    super::temp_server::succeeded("reading the image's GTID position", &out)?;
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if found != history.image_gtid {
        return Err(RestoreError::Replay(format!(
            "the image's binlog ends at GTID {found:?}, but the backup recorded {:?}: the image is not at its validity point; do not use it, and report this",
            history.image_gtid
        )));
    }
    // `SET GLOBAL gtid_binlog_state` empties the binlog and starts it again (at file 1)
    // with the new state in its first event: a replica asking for an older GTID then
    // stops. The file number moves once the server is down (`renumber`).
    let mut sql = String::from("RESET MASTER");
    if !history.gtid_state.is_empty() {
        sql.push_str(&format!(
            "; SET GLOBAL gtid_binlog_state = '{}'; SET GLOBAL gtid_slave_pos = '{}'",
            history.gtid_state, history.data_gtid
        ));
    }
    server.sql(&sql)
}

/// With the temporary server shut down cleanly: the binlog files it left (after the
/// reset, normally one) take numbers from `first_file_number` on, and the index names
/// them, so that a replica asking for a file of the old numbering finds none.
pub(super) fn renumber(plan: &RestorePlan, history: &NewHistory) -> Result<(), RestoreError> {
    let setting = |name: &str| {
        plan.config_text.lines().find_map(|l| {
            let (k, v) = l.split_once(" = ")?;
            (k.trim() == name).then(|| PathBuf::from(v.trim()))
        })
    };
    let (Some(basename), Some(index)) = (setting("log-bin"), setting("log-bin-index")) else {
        return Ok(());
    };
    let failed = |e: std::io::Error| RestoreError::Io {
        root: plan.root.clone(),
        path: index.clone(),
        error: e,
    };
    let text = fs::read_to_string(&index).map_err(failed)?;
    let base_name = basename.file_name().unwrap_or_default().to_string_lossy();
    let mut out = String::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let old = Path::new(line.trim());
        let old_path = if old.is_absolute() {
            old.to_path_buf()
        } else {
            plan.datadir.join(old)
        };
        let name = format!("{base_name}.{:06}", history.first_file_number + i as u64);
        fs::rename(&old_path, old_path.with_file_name(&name)).map_err(failed)?;
        out.push_str(&format!("{}\n", old.with_file_name(&name).display()));
    }
    // Owner and mode kept: the server (often not root) must read it.
    super::fixup::replace_contents(&index, out.as_bytes())
        .and_then(|()| fs::File::open(index.parent().unwrap_or(Path::new("/")))?.sync_all())
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_history_starts_far_past_the_image() {
        let h = NewHistory::new("bin.000007", "0-1-100,2-5-9", "0-1-120,2-5-9").unwrap();
        assert_eq!(h.first_file_number, 1_000_007);
        assert_eq!(h.gtid_state, "0-1-1000000120,2-5-1000000009");
        assert_eq!(h.data_gtid, "0-1-120,2-5-9");
        let empty = NewHistory::new("bin.000001", "", "").unwrap();
        assert_eq!(empty.gtid_state, "");
    }
}
