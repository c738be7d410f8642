//! The archive directory: the lock that keeps a second archiver out, the manifest
//! (written atomically), the partial files the streamer writes, and the step that
//! turns a partial file into an archived one (checksum, fsync, rename, fsync of both
//! directories, manifest).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::ArchiveError;
use super::binlog::{self, Scan};
use super::manifest::{
    ArchiveManifest, ArchivedFile, FORMAT_VERSION, Gap, MANIFEST, ServerIdentity,
};
use super::plan::{Archived, Partial};
use crate::manifest::rfc3339;

/// Where the streamer writes; a file here is not archived yet.
pub const PARTIAL_DIR: &str = ".partial";
const LOCK: &str = ".lock";
/// A partial file kept while the streamer writes the same file again from its start.
const PREVIOUS: &str = ".previous";
/// The archived beginning of a file the server purged before its end was archived.
pub const INCOMPLETE: &str = ".incomplete";

/// An open archive directory, locked for this process.
pub struct Archive {
    pub dir: PathBuf,
    partial_dir: PathBuf,
    pub manifest: ArchiveManifest,
    /// Bytes of each partial file known to be on disk (fsynced).
    synced: BTreeMap<String, u64>,
    _lock: nix::fcntl::Flock<File>,
}

fn not_writable(dir: &Path, e: io::Error) -> ArchiveError {
    ArchiveError::Refused(format!(
        "cannot write the archive directory {}: {e}; pass a --dir this user can write",
        dir.display()
    ))
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ArchiveError {
    let what = what.into();
    move |source| ArchiveError::Io { what, source }
}

impl Archive {
    /// Opens (or starts) the archive in `dir` for the server `identity`; refuses a
    /// directory that holds something else, another server's archive, or a running
    /// archiver.
    pub fn open(dir: &Path, identity: &ServerIdentity) -> Result<Archive, ArchiveError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| not_writable(dir, e))?;
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK))
            .map_err(|e| not_writable(dir, e))?;
        let mut lock =
            nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, errno)| {
                    ArchiveError::Refused(format!(
                        "another hotbackup binlog-archive is archiving into {} ({errno}); stop it first, or pass another --dir",
                        dir.display()
                    ))
                })?;
        lock.set_len(0).map_err(|e| not_writable(dir, e))?;
        writeln!(lock, "{}", std::process::id()).map_err(|e| not_writable(dir, e))?;

        let manifest_path = dir.join(MANIFEST);
        let now = rfc3339(SystemTime::now());
        let manifest = match fs::read(&manifest_path) {
            Ok(bytes) => {
                let m: ArchiveManifest = serde_json::from_slice(&bytes).map_err(|e| {
                    ArchiveError::Refused(format!(
                        "{} is not a binlog archive manifest ({e}); pass another --dir",
                        manifest_path.display()
                    ))
                })?;
                if m.server != *identity {
                    return Err(ArchiveError::Refused(format!(
                        "{} holds the binlog archive of another server ({}), not of this one ({}); archive each server into its own --dir",
                        dir.display(),
                        m.server,
                        identity
                    )));
                }
                m
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let foreign: Vec<String> = fs::read_dir(dir)
                    .map_err(|e| not_writable(dir, e))?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != LOCK && n != PARTIAL_DIR && *n != format!(".{MANIFEST}.tmp"))
                    .collect();
                if !foreign.is_empty() {
                    return Err(ArchiveError::Refused(format!(
                        "{} is not empty ({}) and holds no binlog archive ({MANIFEST}); pass a new or empty --dir",
                        dir.display(),
                        foreign.join(", ")
                    )));
                }
                ArchiveManifest {
                    format_version: FORMAT_VERSION,
                    tool_version: env!("CARGO_PKG_VERSION").into(),
                    server: identity.clone(),
                    created_at: now.clone(),
                    updated_at: now,
                    files: Vec::new(),
                    gaps: Vec::new(),
                }
            }
            Err(e) => return Err(not_writable(dir, e)),
        };
        let partial_dir = dir.join(PARTIAL_DIR);
        fs::DirBuilder::new()
            .mode(0o750)
            .create(&partial_dir)
            .or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| not_writable(dir, e))?;
        let mut archive = Archive {
            dir: dir.to_path_buf(),
            partial_dir,
            manifest,
            synced: BTreeMap::new(),
            _lock: lock,
        };
        archive.recover()?;
        archive.save()?;
        Ok(archive)
    }

    /// Puts back what a killed archiver left between two steps: a kept previous copy
    /// the new one had not caught up with, and a file renamed into the archive whose
    /// manifest entry was not written (it goes back to be checked again).
    fn recover(&mut self) -> Result<(), ArchiveError> {
        for name in self.names(&self.partial_dir)? {
            let Some(base) = name.strip_suffix(PREVIOUS) else {
                continue;
            };
            let previous = self.partial_dir.join(&name);
            let current = self.partial_dir.join(base);
            let (kept, newer) = (len(&previous), len(&current));
            if newer.is_none_or(|n| n < kept.unwrap_or(0)) {
                fs::rename(&previous, &current).map_err(io_err(format!("restore {name}")))?;
            } else {
                fs::remove_file(&previous).map_err(io_err(format!("remove {name}")))?;
            }
        }
        let base = self.manifest.server.binlog_basename.clone();
        for name in self.names(&self.dir)? {
            let ours = binlog::split_name(&name).is_some_and(|(b, _)| b == base);
            if !ours || self.manifest.files.iter().any(|f| f.name == name) {
                continue;
            }
            let partial = self.partial_dir.join(&name);
            if partial.exists() {
                fs::remove_file(self.dir.join(&name))
            } else {
                fs::rename(self.dir.join(&name), &partial)
            }
            .map_err(io_err(format!("move {name} back to {PARTIAL_DIR}")))?;
        }
        sync_dir(&self.partial_dir).map_err(io_err("fsync the partial directory"))?;
        sync_dir(&self.dir).map_err(io_err("fsync the archive directory"))
    }

    fn names(&self, dir: &Path) -> Result<Vec<String>, ArchiveError> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map_err(io_err(format!("list {}", dir.display())))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Bytes of each partial file the streamer has written (as of the last sync).
    pub fn streamed(&self) -> &BTreeMap<String, u64> {
        &self.synced
    }

    pub fn partial_dir(&self) -> &Path {
        &self.partial_dir
    }

    /// The path the streamer writes `name` to.
    pub fn partial_path(&self, name: &str) -> PathBuf {
        self.partial_dir.join(name)
    }

    /// What the planner needs to know of the archive.
    pub fn archived(&self) -> Archived {
        Archived {
            files: self
                .manifest
                .files
                .iter()
                .map(|f| (f.name.clone(), f.size))
                .collect(),
            gaps: self
                .manifest
                .gaps
                .iter()
                .flat_map(|g| g.files.iter().cloned())
                .collect(),
        }
    }

    /// The partial files; those `listed` does not contain are scanned for their end.
    pub fn partials(&self, listed: impl Fn(&str) -> bool) -> Result<Vec<Partial>, ArchiveError> {
        let mut out = Vec::new();
        for name in self.names(&self.partial_dir)? {
            if name.ends_with(PREVIOUS) {
                continue;
            }
            let path = self.partial_dir.join(&name);
            let ends_cleanly = if listed(&name) {
                None
            } else {
                Some(
                    binlog::scan(&path)
                        .map_err(io_err(format!("read {}", path.display())))?
                        .ends_cleanly(),
                )
            };
            out.push(Partial {
                size: len(&path).unwrap_or(0),
                name,
                ends_cleanly,
            });
        }
        Ok(out)
    }

    /// Keeps the current partial copy of each of `names` aside while the streamer
    /// writes the file again from its start, so its bytes stay on disk meanwhile.
    pub fn keep_previous(&mut self, names: &[String]) -> Result<(), ArchiveError> {
        for name in names {
            let current = self.partial_dir.join(name);
            let previous = self.partial_dir.join(format!("{name}{PREVIOUS}"));
            if len(&current).unwrap_or(0) > len(&previous).unwrap_or(0) {
                fs::rename(&current, &previous).map_err(io_err(format!("keep {name} aside")))?;
            }
            self.synced.remove(name);
        }
        sync_dir(&self.partial_dir).map_err(io_err("fsync the partial directory"))
    }

    /// fsyncs every partial file that grew since the last call; returns how many bytes
    /// of each are on disk (a kept previous copy counts until the new one passes it).
    pub fn sync_partials(&mut self) -> Result<BTreeMap<String, u64>, ArchiveError> {
        let mut durable = BTreeMap::new();
        let mut new_names = false;
        for name in self.names(&self.partial_dir)? {
            if let Some(base) = name.strip_suffix(PREVIOUS) {
                let kept = len(&self.partial_dir.join(&name)).unwrap_or(0);
                let e = durable.entry(base.to_string()).or_insert(0);
                *e = (*e).max(kept);
                continue;
            }
            let path = self.partial_dir.join(&name);
            let file = File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
            let size = file
                .metadata()
                .map_err(io_err(format!("stat {}", path.display())))?
                .len();
            match self.synced.get(&name) {
                Some(s) if *s == size => {}
                known => {
                    new_names |= known.is_none();
                    file.sync_data()
                        .map_err(io_err(format!("fsync {}", path.display())))?;
                    self.synced.insert(name.clone(), size);
                }
            }
            let e = durable.entry(name).or_insert(0);
            *e = (*e).max(size);
        }
        if new_names {
            sync_dir(&self.partial_dir).map_err(io_err("fsync the partial directory"))?;
        }
        // A previous copy the new one has caught up with is no longer needed.
        for (name, size) in &self.synced {
            let previous = self.partial_dir.join(format!("{name}{PREVIOUS}"));
            if len(&previous).is_some_and(|p| p <= *size) {
                fs::remove_file(&previous).map_err(io_err(format!("remove {name}{PREVIOUS}")))?;
            }
        }
        self.synced.retain(|name, _| durable.contains_key(name));
        Ok(durable)
    }

    /// Moves a complete partial file into the archive: checks it is whole (and as large
    /// as the server says, when it still lists it), checksums, fsyncs, renames, fsyncs
    /// both directories and records it. A file archived already is only compared.
    pub fn finalize(&mut self, name: &str, server_size: Option<u64>) -> Result<(), ArchiveError> {
        let path = self.partial_dir.join(name);
        let scan = binlog::scan(&path).map_err(io_err(format!("read {}", path.display())))?;
        let whole = match server_size {
            Some(size) => scan.untorn() && scan.size == size,
            None => scan.ends_cleanly(),
        };
        if !whole {
            return Err(ArchiveError::Diverged(format!(
                "the streamed copy of {name} ({} bytes, whole events up to {}) does not match the server's file ({}); it was left in {}",
                scan.size,
                scan.events_end,
                server_size.map_or("purged".into(), |s| format!("{s} bytes")),
                self.partial_dir.display()
            )));
        }
        if let Some(done) = self.manifest.files.iter().find(|f| f.name == name) {
            if done.blake3 != scan.blake3 {
                return Err(ArchiveError::Diverged(format!(
                    "the server's {name} differs from the archived one (blake3 {} vs {}); the archived file is kept and nothing is overwritten",
                    scan.blake3, done.blake3
                )));
            }
            return self.remove_partial(name);
        }
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(format!("fsync {}", path.display())))?;
        fs::rename(&path, self.dir.join(name)).map_err(io_err(format!("archive {name}")))?;
        sync_dir(&self.partial_dir).map_err(io_err("fsync the partial directory"))?;
        sync_dir(&self.dir).map_err(io_err("fsync the archive directory"))?;
        self.push(name, &scan);
        let _ = fs::remove_file(self.partial_dir.join(format!("{name}{PREVIOUS}")));
        self.synced.remove(name);
        self.save()
    }

    fn push(&mut self, name: &str, scan: &Scan) {
        self.manifest.files.push(ArchivedFile {
            name: name.to_string(),
            size: scan.size,
            blake3: scan.blake3.clone(),
            created_at: scan
                .created
                .map(|t| rfc3339(UNIX_EPOCH + Duration::from_secs(t.into()))),
            gtid_list_at_start: scan.gtid_list.clone(),
            archived_at: rfc3339(SystemTime::now()),
        });
    }

    /// Deletes a partial file that is archived already.
    pub fn remove_partial(&mut self, name: &str) -> Result<(), ArchiveError> {
        fs::remove_file(self.partial_dir.join(name))
            .map_err(io_err(format!("remove the leftover {PARTIAL_DIR}/{name}")))?;
        self.synced.remove(name);
        Ok(())
    }

    /// Keeps the archived beginning of a purged file as `NAME.incomplete`; returns its
    /// size.
    pub fn keep_incomplete(&mut self, name: &str) -> Result<u64, ArchiveError> {
        let from = self.partial_dir.join(name);
        let size = len(&from).unwrap_or(0);
        File::open(&from)
            .and_then(|f| f.sync_all())
            .map_err(io_err(format!("fsync {}", from.display())))?;
        fs::rename(&from, self.dir.join(format!("{name}{INCOMPLETE}")))
            .map_err(io_err(format!("keep {name}{INCOMPLETE}")))?;
        sync_dir(&self.dir).map_err(io_err("fsync the archive directory"))?;
        self.synced.remove(name);
        Ok(size)
    }

    pub fn record_gap(&mut self, files: Vec<String>, detail: String) -> Result<(), ArchiveError> {
        self.manifest.gaps.push(Gap {
            files,
            detected_at: rfc3339(SystemTime::now()),
            detail,
        });
        self.save()
    }

    /// Writes the manifest: a temp file, fsync, rename over the old one, fsync the
    /// directory; a reader sees the old manifest or the new one, never a torn one.
    pub fn save(&mut self) -> Result<(), ArchiveError> {
        self.manifest.updated_at = rfc3339(SystemTime::now());
        let text = serde_json::to_vec_pretty(&self.manifest).map_err(io::Error::other);
        let tmp = self.dir.join(format!(".{MANIFEST}.tmp"));
        text.and_then(|text| {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join(MANIFEST))?;
            sync_dir(&self.dir)
        })
        .map_err(io_err(format!(
            "write {}",
            self.dir.join(MANIFEST).display()
        )))
    }
}

fn len(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.len())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::super::binlog::tests::binlog;
    use super::*;

    fn identity(id: u64) -> ServerIdentity {
        ServerIdentity {
            server_id: id,
            hostname: "h".into(),
            binlog_basename: "bin".into(),
            server_uuid: None,
        }
    }

    #[test]
    fn finalizing_moves_a_whole_file_in_once_and_refuses_a_different_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("archive");
        let mut a = Archive::open(&d, &identity(1)).unwrap();
        let bytes = binlog(2, Some(binlog::ROTATE_EVENT));
        fs::write(a.partial_path("bin.000001"), &bytes).unwrap();
        // A size the server does not agree with is not archived.
        assert!(
            a.finalize("bin.000001", Some(bytes.len() as u64 + 1))
                .is_err()
        );
        a.finalize("bin.000001", Some(bytes.len() as u64)).unwrap();
        assert_eq!(fs::read(d.join("bin.000001")).unwrap(), bytes);
        assert!(!a.partial_path("bin.000001").exists());
        let m: ArchiveManifest =
            serde_json::from_slice(&fs::read(d.join(MANIFEST)).unwrap()).unwrap();
        assert_eq!(m.files.len(), 1);
        assert_eq!(m.files[0].blake3, blake3::hash(&bytes).to_hex().to_string());
        assert_eq!(
            m.files[0].gtid_list_at_start.as_deref(),
            Some("[0-1-13,1-2-5]")
        );
        // The same bytes again: only the leftover goes. Other bytes: refused.
        fs::write(a.partial_path("bin.000001"), &bytes).unwrap();
        a.finalize("bin.000001", Some(bytes.len() as u64)).unwrap();
        assert!(!a.partial_path("bin.000001").exists());
        let mut other = bytes.clone();
        other[30] ^= 1;
        fs::write(a.partial_path("bin.000001"), &other).unwrap();
        assert!(matches!(
            a.finalize("bin.000001", Some(bytes.len() as u64)),
            Err(ArchiveError::Diverged(_))
        ));
        assert_eq!(a.manifest.files.len(), 1);
    }

    #[test]
    fn a_second_archiver_another_server_and_a_foreign_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("archive");
        let a = Archive::open(&d, &identity(1)).unwrap();
        let err = Archive::open(&d, &identity(1)).err().unwrap().to_string();
        assert!(err.contains("another hotbackup binlog-archive"), "{err}");
        drop(a);
        let err = Archive::open(&d, &identity(2)).err().unwrap().to_string();
        assert!(err.contains("another server (server_id 1"), "{err}");
        let foreign = dir.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("notes.txt"), "x").unwrap();
        let err = Archive::open(&foreign, &identity(1))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is not empty (notes.txt)"), "{err}");
    }

    #[test]
    fn a_previous_copy_is_kept_until_the_new_one_catches_up_and_restored_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("archive");
        let bytes = binlog(3, None);
        {
            let mut a = Archive::open(&d, &identity(1)).unwrap();
            fs::write(a.partial_path("bin.000002"), &bytes).unwrap();
            a.keep_previous(&["bin.000002".into()]).unwrap();
            // The streamer starts the file again: the old bytes still count.
            fs::write(a.partial_path("bin.000002"), &bytes[..10]).unwrap();
            assert_eq!(a.sync_partials().unwrap()["bin.000002"], bytes.len() as u64);
            // Killed here: the next open puts the longer copy back.
        }
        let mut a = Archive::open(&d, &identity(1)).unwrap();
        assert_eq!(fs::read(a.partial_path("bin.000002")).unwrap(), bytes);
        a.keep_previous(&["bin.000002".into()]).unwrap();
        fs::write(a.partial_path("bin.000002"), &bytes).unwrap();
        a.sync_partials().unwrap();
        let left: Vec<String> = a.names(a.partial_dir()).unwrap();
        assert_eq!(left, vec!["bin.000002".to_string()]);
    }
}
