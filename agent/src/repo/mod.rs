//! Where images live (DESIGN §6b): a repository is a local directory whose children are
//! backup directories, or an S3-compatible bucket prefix (`s3://bucket/prefix`) whose
//! children are uploaded images. Both answer `list` and `delete` through one
//! [`Repository`] trait, so `prune` is written once.
//!
//! An image in a bucket (`s3://bucket/prefix/name/`) is one object per file of the image
//! (`data/<path>.zst`, the side files as `<name>.zst`; `.zst.enc` when encrypted) and a
//! repository manifest, [`REPO_MANIFEST`], written LAST: it holds the image's own
//! manifest plus, per object, what was stored (size, encoding, blake3 of the stored
//! bytes). An image without it is a partial upload and is never listed as a backup.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

pub mod config;
pub mod download;
pub mod format;
pub mod local;
pub mod prune;
pub mod s3;
pub mod upload;

pub use config::{Location, RepoOptions, S3Url};

/// The object that makes an uploaded image a backup; written after every other object.
pub const REPO_MANIFEST: &str = "hotbackup-repo.json";
/// The last remote verification's result (as `hotbackup_verified.json` next to a local image).
pub const VERIFIED: &str = "hotbackup_verified.json";
pub const REPO_FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A user's mistake or a refusal: the sentence says what to do.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    S3(String),
    /// The bucket is missing or the server refuses the credentials: no retry helps
    /// until someone fixes it (unlike a server that does not answer, an S3 error).
    #[error("{0}")]
    BucketRefused(String),
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// A stored object is not what the repository manifest says: nothing is placed.
    #[error(
        "{key} in {image} is damaged or was tampered with ({detail}); nothing was restored, use another backup"
    )]
    Tampered {
        image: String,
        key: String,
        detail: String,
    },
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
}

pub fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RepoError {
    let what = what.into();
    move |error| RepoError::Io { what, error }
}

/// What a repository lists for one image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Listed {
    pub name: String,
    /// Complete: a finished backup (a local one without INCOMPLETE, an uploaded one with
    /// its repository manifest). Incomplete ones are still being written, or were cut off.
    pub complete: bool,
    /// When the image is valid (RFC 3339, UTC); empty when unknown (incomplete).
    pub validity_point: String,
    pub kind: String,
    pub bytes: u64,
    /// Bytes stored (compressed, encrypted) for an uploaded image; the image's size locally.
    pub stored_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Images in a place, and removing one.
pub trait Repository {
    /// The place, as the user wrote it.
    fn location(&self) -> String;
    /// Every image, complete or not, oldest first by validity point.
    fn list(&self) -> Result<Vec<Listed>, RepoError>;
    /// Removes one image. An uploaded one loses its manifest first, so that a delete
    /// cut short leaves a partial upload, never a damaged backup that is still listed.
    fn delete(&self, name: &str) -> Result<(), RepoError>;
}

/// Opens the repository at `location` (a directory or `s3://bucket/prefix`).
pub fn open(location: &Location, options: &RepoOptions) -> Result<Box<dyn Repository>, RepoError> {
    Ok(match location {
        Location::Dir(dir) => Box::new(local::LocalRepo::new(dir)),
        Location::S3(url) => Box::new(s3::S3Repo::connect(url, options)?),
    })
}

/// What a transfer reports as it goes.
pub enum RepoEvent<'a> {
    Step(&'a str),
    /// Bytes of the image (uncompressed) done of the total.
    Progress {
        done: u64,
        total: u64,
    },
    Note(String),
}

/// Lowers this thread's CPU and I/O priority, and so that of the threads it starts: a
/// transfer must never compete with the database for the disk or the cores.
pub fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread; failure only leaves the priority as is.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
        // ioprio_set(IOPRIO_WHO_PROCESS, this thread, best effort at its lowest level);
        // not the idle class, which a busy disk could starve forever.
        libc::syscall(libc::SYS_ioprio_set, 1, 0, (2 << 13) | 7);
    }
}

/// Runs `f` on every item with `n` threads; the first error stops the others from
/// taking more work and is returned.
pub fn parallel<T: Sync, R: Send>(
    items: &[T],
    n: usize,
    f: impl Fn(&T) -> Result<R, RepoError> + Sync,
) -> Result<Vec<R>, RepoError> {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let next = AtomicUsize::new(0);
    let results: Vec<Result<Vec<R>, RepoError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..n.max(1))
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    while let Some(item) = items.get(next.fetch_add(1, Relaxed)) {
                        out.push(f(item).inspect_err(|_| next.store(items.len(), Relaxed))?);
                    }
                    Ok(out)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(RepoError::S3("a transfer thread panicked".into())))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(items.len());
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

/// What an uploaded image holds, written last.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepoManifest {
    pub format_version: u32,
    pub uploaded_at: String,
    /// The local directory it was uploaded from.
    pub uploaded_from: PathBuf,
    /// The image's own manifest (`backup.json`): files, sizes, blake3, coordinates.
    pub image: Manifest,
    /// `zstd`, or `zstd+xchacha20poly1305` when encrypted.
    pub encoding: String,
    pub zstd_level: i32,
    /// blake3 of the key, shortened: names the key an encrypted image needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    pub objects: Vec<StoredObject>,
    /// Owner and modification time of every entry under `data/`, which the image's
    /// manifest does not record (a local image keeps them in the filesystem).
    pub attributes: Vec<EntryAttributes>,
}

impl RepoManifest {
    pub fn stored_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.stored_size).sum()
    }
}

/// One object of an uploaded image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredObject {
    /// Relative to the image's prefix (`data/ibdata1.zst`).
    pub key: String,
    /// Where it goes in a backup directory (`data/ibdata1`, `hotbackup_binlog_info`).
    pub path: PathBuf,
    pub size: u64,
    /// The image manifest's blake3 of the file.
    pub blake3: String,
    pub stored_size: u64,
    pub stored_blake3: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EntryAttributes {
    /// Relative to `data/`.
    pub path: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub mtime_secs: i64,
    pub mtime_nsecs: i64,
}

/// The object key of an image file: compressed, and `.enc` when encrypted.
pub fn object_key(path: &Path, encrypted: bool) -> String {
    format!(
        "{}.zst{}",
        path.to_string_lossy(),
        if encrypted { ".enc" } else { "" }
    )
}
