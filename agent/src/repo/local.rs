//! A local directory of backup directories as a repository.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Listed, RepoError, Repository, io_error};
use crate::image::{Image, ImageError};
use crate::manifest;

pub struct LocalRepo {
    dir: PathBuf,
}

impl LocalRepo {
    pub fn new(dir: &Path) -> LocalRepo {
        LocalRepo {
            dir: dir.to_path_buf(),
        }
    }
}

impl Repository for LocalRepo {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn list(&self) -> Result<Vec<Listed>, RepoError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| {
            RepoError::Refused(format!(
                "cannot read {}: {e}; name a directory that holds backups",
                self.dir.display()
            ))
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let listed =
                |complete, reason: Option<String>, m: Option<&manifest::Manifest>| Listed {
                    name: name.clone(),
                    complete,
                    validity_point: m.map(|m| m.validity_point.clone()).unwrap_or_default(),
                    kind: m.map(|m| m.kind.clone()).unwrap_or_default(),
                    bytes: m.map_or(0, |m| m.totals.bytes),
                    stored_bytes: m.map_or(0, |m| m.totals.bytes),
                    reason,
                };
            match Image::open(&path) {
                Ok(image) => out.push(listed(true, None, Some(&image.manifest))),
                Err(ImageError::Incomplete { reason, .. }) => {
                    out.push(listed(false, Some(reason), None))
                }
                // Anything else in the directory is not ours to list.
                Err(_) => {}
            }
        }
        out.sort_by(|a, b| a.validity_point.cmp(&b.validity_point));
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), RepoError> {
        let dir = self.dir.join(name);
        if name.contains('/')
            || !dir.join(manifest::MANIFEST).exists() && !dir.join(manifest::INCOMPLETE).exists()
        {
            return Err(RepoError::Refused(format!(
                "{} is not a backup in {}; name one that `hotbackup list` shows",
                name,
                self.dir.display()
            )));
        }
        // Marked first, so that a delete cut short is never taken for a backup.
        fs::write(
            manifest::incomplete_marker(&dir),
            "this backup is not usable: being deleted\n",
        )
        .map_err(io_error(format!(
            "cannot mark {} for deletion",
            dir.display()
        )))?;
        fs::remove_dir_all(&dir).map_err(io_error(format!("cannot remove {}", dir.display())))
    }
}
