//! `archive.json`: which server the archive belongs to, every archived file with its
//! size and blake3, and the gaps.

use serde::{Deserialize, Serialize};

pub const MANIFEST: &str = "archive.json";
pub const FORMAT_VERSION: u32 = 1;

/// Which server an archive belongs to. MariaDB has no server_uuid: its server_id,
/// host name and binlog base name stand for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerIdentity {
    pub server_id: u64,
    pub hostname: String,
    pub binlog_basename: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_uuid: Option<String>,
}

impl std::fmt::Display for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "server_id {} on host {:?}, binlog {:?}",
            self.server_id, self.hostname, self.binlog_basename
        )?;
        if let Some(uuid) = &self.server_uuid {
            write!(f, ", server_uuid {uuid}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchiveManifest {
    pub format_version: u32,
    pub tool_version: String,
    pub server: ServerIdentity,
    pub created_at: String,
    pub updated_at: String,
    /// Complete files, in the order they were archived (which is the server's order).
    pub files: Vec<ArchivedFile>,
    pub gaps: Vec<Gap>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchivedFile {
    pub name: String,
    pub size: u64,
    pub blake3: String,
    /// When the server created the file (its first event's time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// The GTID state at the file's start (its GTID list event): the file holds the
    /// transactions after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid_list_at_start: Option<String>,
    pub archived_at: String,
}

/// Files the server purged before they were archived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gap {
    pub files: Vec<String>,
    pub detected_at: String,
    pub detail: String,
}
