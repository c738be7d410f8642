//! Reading an uploaded image: opening it (its repository manifest), checking every
//! object (`verify s3://…`), and fetching it into a local backup directory that the
//! local commands (`restore`, `replica`) then use as they use any other. Every object
//! is checked twice as it arrives: the stored bytes against the repository manifest's
//! blake3, the restored bytes against the image manifest's; a mismatch stops the fetch
//! before anything is placed.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Instant, SystemTime};

use super::config::{S3Url, join};
use super::format::{self, EncryptionKey, Hashing};
use super::s3::{Bucket, Sealed};
use super::{
    REPO_MANIFEST, RepoError, RepoEvent, RepoManifest, RepoOptions, StoredObject, VERIFIED,
};
use crate::digest::Algorithm;
use crate::image::Image;
use crate::image::verify::{Problem, VerifyReport};
use crate::manifest::{self, EntryKind};

/// An uploaded image with its repository manifest read.
pub struct RemoteImage {
    pub url: S3Url,
    pub name: String,
    pub bucket: Bucket,
    pub manifest: RepoManifest,
    /// The manifest as stored, with its MAC when the image is encrypted.
    sealed: Sealed,
}

impl RemoteImage {
    pub fn open(url: &S3Url, options: &RepoOptions) -> Result<RemoteImage, RepoError> {
        let Some((parent, name)) = url.split_name() else {
            return Err(RepoError::Refused(format!(
                "{url} names no image; write s3://BUCKET/PREFIX/NAME (`hotbackup list s3://BUCKET/PREFIX` shows them)"
            )));
        };
        let bucket = Bucket::connect(&parent, options)?;
        let Some((manifest, sealed)) = bucket.manifest_sealed(&name)? else {
            return Err(RepoError::Refused(format!(
                "{url} is not a complete backup (it has no {REPO_MANIFEST}: nothing is there, or an upload was cut off); `hotbackup list {parent}` shows the backups"
            )));
        };
        Ok(RemoteImage {
            url: url.clone(),
            name,
            bucket,
            manifest,
            sealed,
        })
    }

    /// The key an encrypted image needs, checked to be the one it was encrypted with.
    pub fn key(&self, options: &RepoOptions) -> Result<Option<EncryptionKey>, RepoError> {
        let Some(key) = key_for(
            &self.url.to_string(),
            self.manifest.key_id.as_deref(),
            options,
        )?
        else {
            return Ok(None);
        };
        // Nothing the manifest says is trusted before its seal opens.
        let detail = match &self.sealed.mac {
            None => "it carries no MAC, though the image is encrypted".to_string(),
            Some(mac) if !key.opens(&self.name, &self.sealed.bytes, mac) => {
                "its MAC does not match its contents under this key".to_string()
            }
            Some(_) => return Ok(Some(key)),
        };
        Err(RepoError::Tampered {
            image: self.url.to_string(),
            key: REPO_MANIFEST.to_string(),
            detail,
        })
    }

    /// Streams one object into `sink`, checking both checksums; the detail of a mismatch.
    fn fetch_object(
        &self,
        object: &StoredObject,
        key: Option<&EncryptionKey>,
        sink: impl Write,
    ) -> Result<Result<(), String>, RepoError> {
        fetch_checked(
            &self.bucket,
            &join(&self.name, &object.key),
            object,
            key,
            sink,
        )
    }

    fn tampered(&self, object: &StoredObject, detail: String) -> RepoError {
        RepoError::Tampered {
            image: self.url.to_string(),
            key: object.key.clone(),
            detail,
        }
    }
}

/// The key for what was encrypted with the key `key_id` (None: not encrypted), checked
/// to be that key; `what` names it in the sentence.
pub fn key_for(
    what: &str,
    key_id: Option<&str>,
    options: &RepoOptions,
) -> Result<Option<EncryptionKey>, RepoError> {
    let Some(id) = key_id else {
        return Ok(None);
    };
    let Some(file) = &options.encrypt_key_file else {
        return Err(RepoError::Refused(format!(
            "{what} is encrypted; give its key with --encrypt-key-file"
        )));
    };
    let key = EncryptionKey::load(file)?;
    if key.id != id {
        return Err(RepoError::Refused(format!(
            "the key in {} is not the one {what} was encrypted with (key id {id}); give the right --encrypt-key-file",
            file.display(),
        )));
    }
    Ok(Some(key))
}

/// Streams the object `rel` into `sink`, checking the stored bytes against `object`'s
/// stored blake3 and the decoded ones against its blake3; the detail of a mismatch.
pub(crate) fn fetch_checked(
    bucket: &Bucket,
    rel: &str,
    object: &StoredObject,
    key: Option<&EncryptionKey>,
    sink: impl Write,
) -> Result<Result<(), String>, RepoError> {
    let mut stored = Hashing::new(bucket.reader(rel)?);
    let decoded = format::decode(
        &mut stored,
        sink,
        key,
        Algorithm::of(&object.blake3),
        &object.key,
    );
    if stored.len != object.stored_size || stored.hex() != object.stored_blake3 {
        return Ok(Err(format!(
            "{} stored bytes, blake3 {}; the repository manifest says {} bytes, blake3 {}",
            stored.len,
            &stored.hex()[..16],
            object.stored_size,
            &object.stored_blake3[..16.min(object.stored_blake3.len())]
        )));
    }
    match decoded {
        Err(e) if e.get_ref().is_some_and(|i| i.is::<RepoError>()) => {
            Err(RepoError::S3(e.to_string()))
        }
        Err(e) => Ok(Err(format!("cannot be decoded: {e}"))),
        Ok((len, hash)) if len != object.size || hash != object.blake3 => Ok(Err(format!(
            "decodes to {len} bytes that differ from the manifest's {} bytes",
            object.size
        ))),
        Ok(_) => Ok(Ok(())),
    }
}

/// Checks every object of the image (and that no other is there), and records the result
/// in the bucket for `info`.
pub fn verify(
    image: &RemoteImage,
    options: &RepoOptions,
    mut events: impl FnMut(RepoEvent<'_>) + Send,
) -> Result<VerifyReport, RepoError> {
    let started = Instant::now();
    let key = image.key(options)?;
    let b = &image.bucket;
    let present: BTreeSet<String> = b
        .list_all(&image.name)?
        .into_iter()
        .map(|(k, _)| k.as_ref().to_string())
        .collect();
    let expected: BTreeSet<String> = image
        .manifest
        .objects
        .iter()
        .map(|o| b.key(&join(&image.name, &o.key)).as_ref().to_string())
        .collect();
    let mut problems: Vec<Problem> = Vec::new();
    for extra in present.difference(&expected) {
        let rel = extra
            .rsplit_once(&format!("{}/", image.name))
            .map_or(extra.as_str(), |(_, r)| r);
        if rel != REPO_MANIFEST && rel != VERIFIED {
            problems.push(Problem::Extra {
                path: PathBuf::from(rel),
            });
        }
    }
    let total: u64 = image.manifest.objects.iter().map(|o| o.size).sum();
    let done = AtomicU64::new(0);
    let events = parking_lot::Mutex::new(&mut events);
    let found = super::parallel(&image.manifest.objects, options.transfers, |o| {
        let problem = if !present.contains(b.key(&join(&image.name, &o.key)).as_ref()) {
            Some(Problem::Missing {
                path: o.path.clone(),
            })
        } else {
            image
                .fetch_object(o, key.as_ref(), io::sink())?
                .err()
                .map(|detail| Problem::Changed {
                    path: o.path.clone(),
                    detail,
                })
        };
        let d = done.fetch_add(o.size, Relaxed) + o.size;
        (events.lock())(RepoEvent::Progress { done: d, total });
        Ok(problem)
    })?;
    problems.extend(found.into_iter().flatten());
    problems.sort();
    let report = VerifyReport {
        dir: PathBuf::from(image.url.to_string()),
        at: manifest::rfc3339(SystemTime::now()),
        files: image.manifest.objects.len() as u64,
        bytes: total,
        duration_secs: started.elapsed().as_secs_f64(),
        problems,
    };
    if let Ok(text) = serde_json::to_vec_pretty(&report) {
        let _ = b.put_small(&join(&image.name, VERIFIED), text);
    }
    Ok(report)
}

/// The last recorded verification of an uploaded image.
pub fn last_verified(image: &RemoteImage) -> Option<VerifyReport> {
    let bytes = image
        .bucket
        .get_small(&join(&image.name, VERIFIED))
        .ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Fetches the image into `dest` (new or empty) as a backup directory; with `with_data`
/// false only the manifest and the side files (what `replica` reads).
pub fn fetch(
    image: &RemoteImage,
    dest: &Path,
    options: &RepoOptions,
    with_data: bool,
    mut events: impl FnMut(RepoEvent<'_>) + Send,
) -> Result<Image, RepoError> {
    let key = image.key(options)?;
    let io = |what: &Path| super::io_error(format!("cannot write {}", what.display()));
    fs::create_dir_all(dest).map_err(io(dest))?;
    let marker = manifest::incomplete_marker(dest);
    fs::write(&marker, "this backup is not usable: being downloaded\n").map_err(io(&marker))?;
    let entries = &image.manifest.image.files;
    let data = dest.join(manifest::DATA);
    if with_data {
        fs::create_dir_all(&data).map_err(io(&data))?;
        for e in entries.iter().filter(|e| e.kind == EntryKind::Directory) {
            fs::create_dir_all(data.join(&e.path)).map_err(io(&data.join(&e.path)))?;
        }
    }
    let objects: Vec<&StoredObject> = image
        .manifest
        .objects
        .iter()
        .filter(|o| with_data || !o.path.starts_with(manifest::DATA))
        .collect();
    let total: u64 = objects.iter().map(|o| o.size).sum();
    let done = AtomicU64::new(0);
    let events = parking_lot::Mutex::new(&mut events);
    (events.lock())(RepoEvent::Step("download the image"));
    super::parallel(&objects, options.transfers, |o| {
        let path = dest.join(&o.path);
        let file = File::create(&path).map_err(io(&path))?;
        let mut sparse = Sparse { file, pos: 0 };
        if let Err(detail) = image.fetch_object(o, key.as_ref(), &mut sparse)? {
            return Err(image.tampered(o, detail));
        }
        sparse.file.set_len(sparse.pos).map_err(io(&path))?;
        let d = done.fetch_add(o.size, Relaxed) + o.size;
        (events.lock())(RepoEvent::Progress { done: d, total });
        Ok(())
    })?;
    if with_data {
        restore_attributes(image, &data)?;
    }
    let manifest_path = dest.join(manifest::MANIFEST);
    let text = serde_json::to_vec_pretty(&image.manifest.image)
        .map_err(|e| RepoError::S3(e.to_string()))?;
    fs::write(&manifest_path, text).map_err(io(&manifest_path))?;
    fs::remove_file(&marker).map_err(io(&marker))?;
    Ok(Image::open(dest)?)
}

/// Links, modes, owners and times as the image had them; directories last, deepest
/// first, since creating their entries changed their times.
fn restore_attributes(image: &RemoteImage, data: &Path) -> Result<(), RepoError> {
    let io = |what: &Path| super::io_error(format!("cannot set up {}", what.display()));
    let entries = &image.manifest.image.files;
    for e in entries.iter().filter(|e| e.kind == EntryKind::Symlink) {
        let target = e.target.clone().unwrap_or_default();
        std::os::unix::fs::symlink(&target, data.join(&e.path)).map_err(io(&data.join(&e.path)))?;
    }
    let attributes: std::collections::HashMap<&Path, _> = image
        .manifest
        .attributes
        .iter()
        .map(|a| (a.path.as_path(), a))
        .collect();
    let mut ordered: Vec<_> = entries.iter().collect();
    ordered.sort_by_key(|e| {
        (
            e.kind == EntryKind::Directory,
            std::cmp::Reverse(e.path.components().count()),
        )
    });
    for e in ordered {
        let path = data.join(&e.path);
        let a = attributes.get(e.path.as_path());
        // Owner before mode: chown clears set-id bits.
        if let Some(a) = a {
            std::os::unix::fs::lchown(&path, Some(a.uid), Some(a.gid)).map_err(io(&path))?;
        }
        if e.kind != EntryKind::Symlink {
            fs::set_permissions(&path, fs::Permissions::from_mode(e.mode & 0o7777))
                .map_err(io(&path))?;
        }
        if let Some(a) = a {
            let time = nix::sys::time::TimeSpec::new(a.mtime_secs, a.mtime_nsecs);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &path,
                &time,
                &time,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| io(&path)(e.into()))?;
        }
    }
    Ok(())
}

/// Writes a file leaving zero blocks as holes, so a sparse file stays sparse.
struct Sparse {
    file: File,
    pos: u64,
}

impl Write for Sparse {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !crate::digest::is_zero(buf) {
            self.file.write_all_at(buf, self.pos)?;
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
