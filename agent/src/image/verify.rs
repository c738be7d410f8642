//! `verify`: recomputes every checksum of a backup and names each file that changed, is
//! missing, or should not be there. The result is recorded next to the manifest so that
//! `info` can say when the image was last verified.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::Image;
use crate::digest::{self, Algorithm};
use crate::manifest::{self, EntryKind, ManifestEntry};

/// Where the last verification's result is kept, next to the manifest.
pub const RECORD: &str = "hotbackup_verified.json";

/// One thing wrong with an image.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// Its bytes are not what the manifest says.
    Changed {
        path: PathBuf,
        detail: String,
    },
    Missing {
        path: PathBuf,
    },
    /// Present but not in the manifest.
    Extra {
        path: PathBuf,
    },
    Unreadable {
        path: PathBuf,
        error: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Changed { path, detail } => {
                write!(f, "changed: {} ({detail})", path.display())
            }
            Problem::Missing { path } => write!(f, "missing: {}", path.display()),
            Problem::Extra { path } => write!(f, "extra: {}", path.display()),
            Problem::Unreadable { path, error } => {
                write!(f, "unreadable: {} ({error})", path.display())
            }
        }
    }
}

/// What a verification found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub at: String,
    pub files: u64,
    pub bytes: u64,
    pub duration_secs: f64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// How far a verification is.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VerifyProgress {
    pub files_total: u64,
    pub files_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
}

/// Checks every file of the image (and the side files) against the manifest with
/// `parallel` threads, reporting progress about five times a second.
pub fn verify(
    image: &Image,
    parallel: usize,
    mut progress: impl FnMut(VerifyProgress),
) -> VerifyReport {
    let started = Instant::now();
    let data = image.data();
    let mut problems = Vec::new();
    // Every entry of the manifest where it should be, with the right type.
    let mut files: Vec<(PathBuf, &ManifestEntry)> = Vec::new();
    for e in &image.manifest.files {
        let path = data.join(&e.path);
        let found = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                problems.push(Problem::Missing {
                    path: e.path.clone(),
                });
                continue;
            }
            Err(err) => {
                problems.push(unreadable(&e.path, err));
                continue;
            }
        };
        let kind = if found.is_dir() {
            EntryKind::Directory
        } else if found.file_type().is_symlink() {
            EntryKind::Symlink
        } else {
            EntryKind::File
        };
        if kind != e.kind {
            problems.push(changed(
                &e.path,
                format!("a {kind:?}, the manifest says {:?}", e.kind),
            ));
            continue;
        }
        match e.kind {
            EntryKind::File if found.len() != e.size => problems.push(changed(
                &e.path,
                format!("{} bytes, the manifest says {}", found.len(), e.size),
            )),
            EntryKind::File => files.push((path, e)),
            EntryKind::Symlink => {
                let target = fs::read_link(&path).ok();
                if target.as_ref() != e.target.as_ref() {
                    problems.push(changed(&e.path, "the link points elsewhere".into()));
                }
            }
            EntryKind::Directory => {}
        }
        if e.kind != EntryKind::Symlink && found.mode() & 0o7777 != e.mode & 0o7777 {
            problems.push(changed(
                &e.path,
                format!(
                    "mode {:o}, the manifest says {:o}",
                    found.mode() & 0o7777,
                    e.mode & 0o7777
                ),
            ));
        }
    }
    // Anything under data/ that the manifest does not list.
    let listed: BTreeSet<&Path> = image
        .manifest
        .files
        .iter()
        .map(|e| e.path.as_path())
        .collect();
    extras(&data, Path::new(""), &listed, &mut problems);
    // The side files (coordinates, settings), hashed here: they are small.
    for side in &image.manifest.side_files {
        match fs::read(image.dir.join(&side.name)) {
            Ok(bytes) => {
                if blake3::hash(&bytes).to_hex().as_str() != side.blake3 {
                    problems.push(changed(Path::new(&side.name), "checksum differs".into()));
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => problems.push(Problem::Missing {
                path: PathBuf::from(&side.name),
            }),
            Err(err) => problems.push(unreadable(Path::new(&side.name), err)),
        }
    }
    let total = VerifyProgress {
        files_total: files.len() as u64,
        bytes_total: files.iter().map(|(_, e)| e.size).sum(),
        ..VerifyProgress::default()
    };
    problems.extend(hash_all(&files, parallel.max(1), total, &mut progress));
    problems.sort();
    VerifyReport {
        dir: image.dir.clone(),
        at: manifest::rfc3339(SystemTime::now()),
        files: total.files_total,
        bytes: total.bytes_total,
        duration_secs: started.elapsed().as_secs_f64(),
        problems,
    }
}

/// Keeps the result next to the manifest (best effort: a read-only image is still
/// verified, only not marked).
pub fn record(image: &Image, report: &VerifyReport) -> io::Result<()> {
    let tmp = image.dir.join(format!("{RECORD}.tmp"));
    fs::write(
        &tmp,
        serde_json::to_vec_pretty(report).map_err(io::Error::other)?,
    )?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, image.dir.join(RECORD))
}

/// The last recorded verification, if any.
pub fn last(dir: &Path) -> Option<VerifyReport> {
    serde_json::from_slice(&fs::read(dir.join(RECORD)).ok()?).ok()
}

fn hash_all(
    files: &[(PathBuf, &ManifestEntry)],
    parallel: usize,
    total: VerifyProgress,
    progress: &mut impl FnMut(VerifyProgress),
) -> Vec<Problem> {
    let next = AtomicUsize::new(0);
    let files_done = AtomicU64::new(0);
    let bytes_done = AtomicU64::new(0);
    let snapshot = || VerifyProgress {
        files_done: files_done.load(Relaxed),
        bytes_done: bytes_done.load(Relaxed),
        ..total
    };
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                scope.spawn(|| {
                    let mut problems = Vec::new();
                    while let Some((path, entry)) = files.get(next.fetch_add(1, Relaxed)) {
                        if let Some(p) = check_file(path, entry, &bytes_done) {
                            problems.push(p);
                        }
                        files_done.fetch_add(1, Relaxed);
                    }
                    problems
                })
            })
            .collect();
        let mut out = Vec::new();
        let mut last = Instant::now();
        for w in workers {
            while !w.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
                if last.elapsed() >= Duration::from_millis(200) {
                    progress(snapshot());
                    last = Instant::now();
                }
            }
            out.extend(w.join().unwrap_or_else(|_| {
                vec![Problem::Unreadable {
                    path: PathBuf::new(),
                    error: "a checksum thread panicked".into(),
                }]
            }));
        }
        progress(snapshot());
        out
    })
}

fn check_file(path: &Path, entry: &ManifestEntry, bytes_done: &AtomicU64) -> Option<Problem> {
    let Some(expected) = &entry.blake3 else {
        return Some(changed(
            &entry.path,
            "the manifest has no checksum for it".into(),
        ));
    };
    let result = File::open(path).and_then(|f| {
        digest::of_file(&f, Algorithm::of(expected), |n| {
            bytes_done.fetch_add(n, Relaxed);
        })
    });
    match result {
        Err(e) => Some(unreadable(&entry.path, e)),
        Ok(found) if &found != expected => Some(changed(&entry.path, "checksum differs".into())),
        Ok(_) => None,
    }
}

fn extras(data: &Path, rel: &Path, listed: &BTreeSet<&Path>, out: &mut Vec<Problem>) {
    let Ok(dir) = fs::read_dir(data.join(rel)) else {
        return;
    };
    for e in dir.flatten() {
        let path = rel.join(e.file_name());
        if !listed.contains(path.as_path()) {
            out.push(Problem::Extra { path });
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            extras(data, &path, listed, out);
        }
    }
}

fn changed(path: &Path, detail: String) -> Problem {
    Problem::Changed {
        path: path.to_path_buf(),
        detail,
    }
}

fn unreadable(path: &Path, error: impl ToString) -> Problem {
    Problem::Unreadable {
        path: path.to_path_buf(),
        error: error.to_string(),
    }
}
