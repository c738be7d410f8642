//! `upload`: pushes a finished local image into a bucket, every file compressed (and
//! encrypted) on the way and checked against the image's manifest as it is read, the
//! repository manifest last. A re-run after an interruption skips every object a
//! journal next to the image says was finished, once the bucket confirms it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::config::{S3Url, join};
use super::format::{self, Encoding, EncryptionKey, Hashing};
use super::s3::Bucket;
use super::{
    EntryAttributes, REPO_FORMAT_VERSION, REPO_MANIFEST, RepoError, RepoEvent, RepoManifest,
    RepoOptions, StoredObject, object_key,
};
use crate::digest::Algorithm;
use crate::image::Image;
use crate::manifest::{self, EntryKind};

/// Finished objects of uploads from this image, one JSON line each.
pub const JOURNAL: &str = "hotbackup-upload.jsonl";
/// Files at least this large are compressed by several zstd workers.
const BIG: u64 = 64 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadSummary {
    pub url: String,
    pub objects: usize,
    /// Objects a previous, interrupted run had already stored.
    pub skipped: usize,
    pub bytes: u64,
    pub stored_bytes: u64,
    pub duration_secs: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct JournalLine {
    url: String,
    encoding: String,
    object: StoredObject,
}

/// Uploads the image in `dir` as `url` (`s3://bucket/prefix/name`).
pub fn upload(
    dir: &Path,
    url: &S3Url,
    options: &RepoOptions,
    mut events: impl FnMut(RepoEvent<'_>) + Send,
) -> Result<UploadSummary, RepoError> {
    let started = Instant::now();
    let Some((parent, name)) = url.split_name() else {
        return Err(RepoError::Refused(format!(
            "{url} names no image; write s3://BUCKET/PREFIX/NAME"
        )));
    };
    let image = Image::open(dir)?;
    let key = match &options.encrypt_key_file {
        Some(f) => Some(EncryptionKey::load(f)?),
        None => None,
    };
    let encoding = Encoding {
        level: options.compress_level,
        key,
    };
    lower_priority_once();
    let bucket = Bucket::connect(&parent, options)?;
    if bucket.manifest(&name)?.is_some() {
        return Err(RepoError::Refused(format!(
            "{url} already holds a complete backup; upload under a new name, or `hotbackup delete {url}` first"
        )));
    }
    let tag = encoding.tag();
    let jobs = objects(&image, encoding.key.is_some())?;
    let journal_path = dir.join(JOURNAL);
    let done_before = read_journal(&journal_path, &url.to_string(), &tag);
    let journal = parking_lot::Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .ok(),
    );
    if journal.lock().is_none() {
        events(RepoEvent::Note(format!(
            "cannot write {}: an interrupted upload will start over",
            journal_path.display()
        )));
    }
    events(RepoEvent::Step("upload the image"));
    let total: u64 = jobs.iter().map(|o| o.size).sum();
    let done = AtomicU64::new(0);
    let skipped = AtomicUsize::new(0);
    let events = parking_lot::Mutex::new(&mut events);
    let put_one = |job: &StoredObject| -> Result<StoredObject, RepoError> {
        let rel = join(&name, &job.key);
        if let Some(prev) = done_before.get(&job.key).filter(|p| p.blake3 == job.blake3)
            && let Some((size, meta)) = bucket.head(&rel)?
            && size == prev.stored_size
            && meta
                .iter()
                .any(|(k, v)| k == "hotbackup-blake3" && *v == job.blake3)
        {
            skipped.fetch_add(1, Relaxed);
            return Ok(prev.clone());
        }
        let local = dir.join(&job.path);
        let file = File::open(&local)
            .map_err(super::io_error(format!("cannot read {}", local.display())))?;
        let threads = if job.size >= BIG { 2 } else { 0 };
        let Some(stored) = put_checked(&bucket, &rel, file, job, &encoding, &tag, threads)? else {
            return Err(RepoError::Refused(format!(
                "{} changed since the backup was taken (its checksum differs from the manifest); nothing was listed as a backup, check the image with `hotbackup verify {}`",
                local.display(),
                dir.display()
            )));
        };
        if let Some(f) = journal.lock().as_mut() {
            let line = JournalLine {
                url: url.to_string(),
                encoding: tag.clone(),
                object: stored.clone(),
            };
            let _ = writeln!(f, "{}", serde_json::to_string(&line).unwrap_or_default());
        }
        Ok(stored)
    };
    let mut stored = super::parallel(&jobs, options.transfers, |job| {
        let stored = put_one(job)?;
        let d = done.fetch_add(job.size, Relaxed) + job.size;
        (events.lock())(RepoEvent::Progress { done: d, total });
        Ok(stored)
    })?;
    stored.sort_by(|a, b| a.key.cmp(&b.key));
    let manifest = RepoManifest {
        format_version: REPO_FORMAT_VERSION,
        uploaded_at: manifest::rfc3339(std::time::SystemTime::now()),
        uploaded_from: fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
        image: image.manifest.clone(),
        encoding: encoding.name().to_string(),
        zstd_level: encoding.level,
        key_id: encoding.key.as_ref().map(|k| k.id.clone()),
        attributes: attributes(&image)?,
        objects: stored,
    };
    (events.lock())(RepoEvent::Step("write the repository manifest"));
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| RepoError::S3(e.to_string()))?;
    let rel = join(&name, REPO_MANIFEST);
    match &encoding.key {
        Some(key) => {
            let mac = key.seal(&name, &text);
            let mut w = bucket.writer(&rel, &[(super::s3::MAC_METADATA, mac)]);
            w.write_all(&text)
                .map_err(|e| RepoError::S3(format!("upload of {rel}: {e}")))?;
            w.finish()?;
        }
        None => bucket.put_small(&rel, text)?,
    }
    let _ = fs::remove_file(&journal_path);
    Ok(UploadSummary {
        url: url.to_string(),
        objects: manifest.objects.len(),
        skipped: skipped.load(Relaxed),
        bytes: total,
        stored_bytes: manifest.stored_bytes(),
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

/// Stores `src` as the object `rel` (encoded, with the blake3 and the encoding `tag` as
/// metadata), checking what was read against `job`'s size and blake3 before the object
/// is made: None (and nothing stored) when they differ.
pub(crate) fn put_checked(
    bucket: &Bucket,
    rel: &str,
    src: impl std::io::Read,
    job: &StoredObject,
    encoding: &Encoding,
    tag: &str,
    threads: u32,
) -> Result<Option<StoredObject>, RepoError> {
    let writer = bucket.writer(
        rel,
        &[
            ("hotbackup-blake3", job.blake3.clone()),
            ("hotbackup-encoding", tag.to_string()),
        ],
    );
    let digest = Algorithm::of(&job.blake3);
    let (sink, len, hash) = format::encode(
        src,
        Hashing::new(writer),
        encoding,
        threads,
        digest,
        &job.key,
    )
    .map_err(|e| match e.downcast::<RepoError>() {
        Ok(r) => r,
        Err(e) => RepoError::S3(format!("uploading {rel} to {} failed: {e}", bucket.url)),
    })?;
    if len != job.size || hash != job.blake3 {
        // The unfinished writer is dropped: a multipart upload is aborted, a PUT never sent.
        return Ok(None);
    }
    let stored = StoredObject {
        stored_size: sink.len,
        stored_blake3: sink.hex(),
        ..job.clone()
    };
    sink.inner.finish()?;
    Ok(Some(stored))
}

fn lower_priority_once() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(super::lower_priority);
}

/// Every object the image needs: its files, then the side files.
fn objects(image: &Image, encrypted: bool) -> Result<Vec<StoredObject>, RepoError> {
    let mut out = Vec::new();
    for e in image
        .manifest
        .files
        .iter()
        .filter(|e| e.kind == EntryKind::File)
    {
        let Some(blake3) = &e.blake3 else {
            return Err(RepoError::Refused(format!(
                "{} has no checksum in the manifest of {}; it cannot be uploaded",
                e.path.display(),
                image.dir.display()
            )));
        };
        let path = Path::new(manifest::DATA).join(&e.path);
        out.push(StoredObject {
            key: object_key(&path, encrypted),
            path,
            size: e.size,
            blake3: blake3.clone(),
            stored_size: 0,
            stored_blake3: String::new(),
        });
    }
    for side in &image.manifest.side_files {
        let path = PathBuf::from(&side.name);
        out.push(StoredObject {
            key: object_key(&path, encrypted),
            path,
            size: side.size,
            blake3: side.blake3.clone(),
            stored_size: 0,
            stored_blake3: String::new(),
        });
    }
    // Large files first, so that the transfers end together.
    out.sort_by_key(|o| std::cmp::Reverse(o.size));
    Ok(out)
}

fn attributes(image: &Image) -> Result<Vec<EntryAttributes>, RepoError> {
    let data = image.data();
    image
        .manifest
        .files
        .iter()
        .map(|e| {
            let path = data.join(&e.path);
            let m = fs::symlink_metadata(&path)
                .map_err(super::io_error(format!("cannot read {}", path.display())))?;
            Ok(EntryAttributes {
                path: e.path.clone(),
                uid: m.uid(),
                gid: m.gid(),
                mtime_secs: m.mtime(),
                mtime_nsecs: m.mtime_nsec(),
            })
        })
        .collect()
}

fn read_journal(path: &Path, url: &str, tag: &str) -> HashMap<String, StoredObject> {
    let Ok(f) = File::open(path) else {
        return HashMap::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<JournalLine>(&l).ok())
        .filter(|l| l.url == url && l.encoding == tag)
        .map(|l| (l.object.key.clone(), l.object))
        .collect()
}
