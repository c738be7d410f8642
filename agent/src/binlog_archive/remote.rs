//! A binlog archive in a bucket (`s3://bucket/prefix/name/`): one object per complete
//! binlog file, stored as image files are (`NAME.zst`, `.zst.enc` when encrypted; see
//! [`crate::repo::format`]), and [`REMOTE_MANIFEST`], replaced after each new object,
//! so that it never names an object that is not wholly there.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::manifest::ArchiveManifest;
use crate::repo::config::join;
use crate::repo::s3::Bucket;
use crate::repo::{RepoError, StoredObject};

/// The object that names what a bucket's binlog archive holds.
pub const REMOTE_MANIFEST: &str = "hotbackup-binlogs.json";
pub const REMOTE_FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteManifest {
    pub format_version: u32,
    pub updated_at: String,
    /// The local archive directory it was uploaded from.
    pub uploaded_from: PathBuf,
    /// The local `archive.json` with only the files the bucket holds (in order) and
    /// every gap it records.
    pub archive: ArchiveManifest,
    /// `zstd`, or `zstd+xchacha20poly1305` when encrypted.
    pub encoding: String,
    /// blake3 of the key, shortened: names the key the objects need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// One per file of `archive.files`, in the same order.
    pub objects: Vec<StoredObject>,
}

impl RemoteManifest {
    /// The stored object of the archived file `name`.
    pub fn object(&self, name: &str) -> Option<&StoredObject> {
        self.objects
            .iter()
            .find(|o| o.path.as_os_str() == std::ffi::OsStr::new(name))
    }
}

/// The manifest of the binlog archive `name` under the bucket's prefix (None: none there).
pub fn read(bucket: &Bucket, name: &str) -> Result<Option<RemoteManifest>, RepoError> {
    let rel = join(name, REMOTE_MANIFEST);
    let Some(bytes) = bucket.get_small(&rel)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        RepoError::Refused(format!(
            "{}/{rel} is not a binlog archive manifest ({e}); point at another URL",
            bucket.url
        ))
    })
}

/// Replaces the manifest of the binlog archive `name`.
pub fn write(bucket: &Bucket, name: &str, manifest: &RemoteManifest) -> Result<(), RepoError> {
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| RepoError::S3(e.to_string()))?;
    bucket.put_small(&join(name, REMOTE_MANIFEST), text)
}

/// One line per binlog archive directly under the bucket's prefix, for `list`.
pub fn list(bucket: &Bucket) -> Result<Vec<String>, RepoError> {
    let mut out = Vec::new();
    for name in bucket.children()? {
        if bucket.manifest(&name)?.is_some() {
            continue; // an image
        }
        if let Some(m) = read(bucket, &name)? {
            let files = &m.archive.files;
            let range = match (files.first(), files.last()) {
                (Some(a), Some(b)) => format!("{} .. {}", a.name, b.name),
                _ => "no file yet".into(),
            };
            out.push(format!(
                "{name}: binlog archive of {}, {} file(s) ({range}), {} gap(s), updated {}",
                m.archive.server,
                files.len(),
                m.archive.gaps.len(),
                m.updated_at
            ));
        }
    }
    Ok(out)
}
