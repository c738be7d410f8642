//! `info`: what an operator asks of an image before using it, also of one that is
//! incomplete or damaged (then it says so and why).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::verify::{self, VerifyReport};
use super::{BinlogCoordinates, Image, ImageError};
use crate::manifest::{Manifest, Totals};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Complete,
    Incomplete,
    /// No usable manifest.
    Unreadable,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub dir: PathBuf,
    pub state: State,
    /// Why it is not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last verification, if one was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub kind: String,
    pub tool_version: String,
    pub host: String,
    pub mountpoint: PathBuf,
    pub started_at: String,
    pub validity_point: String,
    pub finished_at: String,
    pub duration_secs: f64,
    pub totals: Totals,
    pub server_flavor: Option<String>,
    pub server_version: Option<String>,
    pub server_id: Option<u64>,
    pub server_hostname: Option<String>,
    pub datadir: Option<PathBuf>,
    pub datadir_in_image: PathBuf,
    pub binlog: Option<BinlogCoordinates>,
    /// Per replication connection of a backup taken on a replica.
    pub replication: serde_json::Value,
    pub gtid_slave_pos: Option<String>,
    pub commit_block_ms: Option<f64>,
}

/// Describes `dir`, whatever state it is in.
pub fn info(dir: &Path) -> ImageInfo {
    let mut out = ImageInfo {
        dir: dir.to_path_buf(),
        state: State::Complete,
        reason: None,
        verified: verify::last(dir),
        summary: None,
    };
    match Image::open(dir) {
        Ok(image) => out.summary = Some(summary(&image)),
        Err(ImageError::Incomplete { reason, .. }) => {
            out.state = State::Incomplete;
            out.reason = Some(reason);
        }
        Err(e) => {
            out.state = State::Unreadable;
            out.reason = Some(e.to_string());
        }
    }
    // A manifest next to an INCOMPLETE marker (a restore --move consumed the image,
    // say) still tells what the image was.
    if out.state == State::Incomplete
        && let Ok(text) = std::fs::read(dir.join(crate::manifest::MANIFEST))
        && let Ok(manifest) = serde_json::from_slice::<Manifest>(&text)
    {
        out.summary = Some(summary(&Image {
            dir: dir.to_path_buf(),
            manifest,
        }));
    }
    out
}

pub fn summary(image: &Image) -> Summary {
    let m = &image.manifest;
    let db = &m.database;
    let server = &db["server"];
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    Summary {
        kind: m.kind.clone(),
        tool_version: m.tool_version.clone(),
        host: m.host.clone(),
        mountpoint: m.source.mountpoint.clone(),
        started_at: m.started_at.clone(),
        validity_point: m.validity_point.clone(),
        finished_at: m.finished_at.clone(),
        duration_secs: m.duration_secs,
        totals: m.totals.clone(),
        server_flavor: text(&server["flavor"]),
        server_version: text(&server["version"]),
        server_id: server["server_id"].as_u64(),
        server_hostname: text(&server["hostname"]),
        datadir: text(&server["datadir"]).map(PathBuf::from),
        datadir_in_image: image.datadir_in_image(),
        binlog: image.binlog(),
        replication: db["replication"].clone(),
        gtid_slave_pos: text(&db["gtid_slave_pos"]).filter(|s| !s.is_empty()),
        commit_block_ms: db["lock"]["commit_block_ms"].as_f64(),
    }
}
