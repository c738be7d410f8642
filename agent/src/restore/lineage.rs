//! A restored server's binlog starts a new history (WL#4209 R05). The image is older
//! than what the replicas of the old server may have applied; if the restored server
//! went on numbering its binlog files and GTIDs from the image's, a replica that was
//! ahead would, once the restored server has written as many transactions, find its
//! position again (the same GTID, or a file offset inside a new file of the same name)
//! and silently apply a different history. So the restored server gets binlog file
//! numbers and GTID sequence numbers no old replica can hold: `RESET MASTER TO` a file
//! number far past the image's, and the GTID state moved far ahead. An old replica
//! then stops with the server's own error (its file is not in the index; its GTID is
//! older than the binlog), at once and also after any number of new transactions.
//! `--keep-binlog-history` keeps the image's numbering instead.

use serde::{Deserialize, Serialize};

use super::RestoreError;
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
    let mut sql = format!("RESET MASTER TO {}", history.first_file_number);
    if !history.gtid_state.is_empty() {
        sql.push_str(&format!(
            "; SET GLOBAL gtid_binlog_state = '{}'; SET GLOBAL gtid_slave_pos = '{}'",
            history.gtid_state, history.data_gtid
        ));
    }
    server.sql(&sql)
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
