//! The image's manifest (`backup.json`) and the marker that flags an unfinished target.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// 2: file digests are `b3z1:` (see `digest.rs`); version 1 manifests (plain blake3)
/// are still read everywhere.
pub const FORMAT_VERSION: u32 = 2;
pub const MANIFEST: &str = "backup.json";
/// Present while a target is not a finished backup; later commands refuse such a target.
pub const INCOMPLETE: &str = "INCOMPLETE";
/// Where the image of the data directory goes inside a target.
pub const DATA: &str = "data";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub tool: String,
    pub tool_version: String,
    /// `copy` for a raw tree image, `backup` for a database backup.
    pub kind: String,
    pub host: String,
    pub source: Source,
    pub started_at: String,
    pub validity_point: String,
    pub finished_at: String,
    pub duration_secs: f64,
    pub options: serde_json::Value,
    /// What the client that drove the session adds (a database backup: server,
    /// coordinates, lock times); null for a raw copy.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub database: serde_json::Value,
    pub totals: Totals,
    pub files: Vec<ManifestEntry>,
    /// The files next to `data/` that the client added (coordinates, settings), with
    /// their checksums, so that `verify` covers them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub side_files: Vec<SideFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SideFile {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Source {
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub bytes_copied: u64,
    pub bytes_mirrored: u64,
    /// The part of `bytes_copied` that was cloned (reflinked) rather than copied.
    #[serde(default)]
    pub bytes_cloned: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestEntry {
    /// Relative to `data/`.
    pub path: PathBuf,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    /// The content digest: `b3z1:…` (format 2), or plain blake3 hex (format 1); the
    /// field keeps its old name so that both read alike.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub blake3: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
}

pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

pub fn incomplete_marker(target: &Path) -> PathBuf {
    target.join(INCOMPLETE)
}
