//! A finished backup directory as later commands see it: opening one (and refusing a
//! target that is not a finished backup), checking it (`verify`) and describing it
//! (`info`). Nothing here needs a mount or a server.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::{self, Manifest};

pub mod info;
pub mod verify;

/// Why a directory cannot be used as a backup.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0} does not exist; name a backup directory (the --target-dir of a backup)")]
    Missing(PathBuf),
    #[error(
        "{0} is not a hotbackup backup (it has no {manifest}); name the --target-dir of a backup",
        manifest = manifest::MANIFEST
    )]
    NotABackup(PathBuf),
    #[error("{dir} is an INCOMPLETE backup and cannot be used: {reason}")]
    Incomplete { dir: PathBuf, reason: String },
    #[error("cannot read {path}: {error}")]
    Unreadable { path: PathBuf, error: String },
}

/// A backup directory with its manifest read.
#[derive(Clone, Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// Where the binlog stood at the validity point (`hotbackup_binlog_info`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BinlogCoordinates {
    pub file: String,
    pub position: u64,
    pub gtid: String,
}

impl Image {
    /// Opens a finished backup; an INCOMPLETE one is refused with its reason.
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        if let Some(reason) = incomplete_reason(dir)? {
            return Err(ImageError::Incomplete {
                dir: dir.to_path_buf(),
                reason,
            });
        }
        let path = dir.join(manifest::MANIFEST);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(if dir.exists() {
                    ImageError::NotABackup(dir.to_path_buf())
                } else {
                    ImageError::Missing(dir.to_path_buf())
                });
            }
            Err(e) => return Err(unreadable(&path, e)),
        };
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| unreadable(&path, e))?;
        if manifest.format_version > manifest::FORMAT_VERSION {
            return Err(unreadable(
                &path,
                format!(
                    "format version {} is newer than this hotbackup reads ({}); use a newer hotbackup",
                    manifest.format_version,
                    manifest::FORMAT_VERSION
                ),
            ));
        }
        Ok(Image {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The image of the mount (`DIR/data`).
    pub fn data(&self) -> PathBuf {
        self.dir.join(manifest::DATA)
    }

    /// The server's datadir relative to the image root (empty: the mount was the datadir).
    pub fn datadir_in_image(&self) -> PathBuf {
        self.manifest.database["datadir_in_image"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_default()
    }

    /// The binlog coordinates of the validity point, if the server had a binlog.
    pub fn binlog(&self) -> Option<BinlogCoordinates> {
        let b = &self.manifest.database["binlog"];
        Some(BinlogCoordinates {
            file: b["file"].as_str()?.to_string(),
            position: b["position"].as_u64()?,
            gtid: b["gtid"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// The settings the backed-up server ran with (`hotbackup-my.cnf`), by name.
    pub fn settings(&self) -> Vec<(String, String)> {
        fs::read_to_string(self.dir.join("hotbackup-my.cnf"))
            .map(|t| parse_settings(&t))
            .unwrap_or_default()
    }
}

/// `name = value` lines of an option file's groups (comments and group headers skipped).
pub fn parse_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            (k.trim().replace('-', "_"), v.trim().to_string())
        })
        .collect()
}

/// The reason an INCOMPLETE marker gives, if there is one.
pub fn incomplete_reason(dir: &Path) -> Result<Option<String>, ImageError> {
    let marker = manifest::incomplete_marker(dir);
    match fs::read_to_string(&marker) {
        Ok(text) => Ok(Some(
            text.trim()
                .trim_start_matches("this backup is not usable: ")
                .to_string(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unreadable(&marker, e)),
    }
}

fn unreadable(path: &Path, error: impl ToString) -> ImageError {
    ImageError::Unreadable {
        path: path.to_path_buf(),
        error: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_read_from_option_file_lines() {
        let text = "# comment\n[mariadbd]\ninnodb_page_size = 16384\nlog-bin = /x/bin\nskip_name_resolve\n";
        assert_eq!(
            parse_settings(text),
            [
                ("innodb_page_size".to_string(), "16384".to_string()),
                ("log_bin".to_string(), "/x/bin".to_string()),
                ("skip_name_resolve".to_string(), String::new()),
            ]
        );
    }
}
