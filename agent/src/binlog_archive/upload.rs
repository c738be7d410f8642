//! `binlog-archive --upload s3://…` (and `upload ARCHIVE_DIR s3://…`): every file the
//! local archive holds complete is copied into a bucket, then the bucket's manifest is
//! replaced ([`super::remote`]).
//!
//! The local archive stays the durable copy (fsynced within about a second); the bucket
//! follows it from a thread of its own that reads only what the archiver has finished
//! (`archive.json` is replaced atomically, archived files are never rewritten), so a
//! slow or failing bucket never holds the archiver up: files stay queued locally, the
//! failure is said once, retried with backoff, and the bucket catches up when it
//! answers again. What the bucket lacks is found by comparing the two manifests, so a
//! restarted archiver (or a one-shot `upload`) uploads exactly that.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::ArchiveEvent;
use super::binlog::split_name;
use super::manifest::{ArchiveManifest, ArchivedFile, MANIFEST};
use super::remote::{self, REMOTE_FORMAT_VERSION, RemoteManifest};
use crate::manifest::rfc3339;
use crate::repo::config::join;
use crate::repo::format::{Encoding, EncryptionKey};
use crate::repo::s3::Bucket;
use crate::repo::upload::put_checked;
use crate::repo::{Location, RepoError, RepoOptions, S3Url, StoredObject, object_key};

/// How often the local manifest is looked at for new complete files.
const TICK: Duration = Duration::from_secs(1);
/// The first and the longest wait before trying a failing bucket again.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Requests retried by the S3 client itself before the uploader's own backoff takes over
/// (kept low: the uploader retries forever, and says so once).
const CLIENT_RETRIES: usize = 2;
/// While catching up, the bucket's manifest is replaced at most this often (and after the
/// last file): objects uploaded since are uploaded again if the run is cut short.
const MANIFEST_EVERY: Duration = Duration::from_secs(2);

/// Where the bucket stands against the local archive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadState {
    pub url: String,
    /// Complete files the bucket's manifest names.
    pub in_bucket: usize,
    /// Complete local files the bucket does not hold yet.
    pub queued: Vec<String>,
    /// Why uploading stopped for good in this run (the archive went on locally).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

impl std::fmt::Display for UploadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} complete file(s) in {}", self.in_bucket, self.url)?;
        if !self.queued.is_empty() {
            write!(
                f,
                " ({} not uploaded yet: {}; `hotbackup upload ARCHIVE_DIR {}` or a restart of the archiver uploads them)",
                self.queued.len(),
                self.queued.join(", "),
                self.url
            )?;
        }
        Ok(())
    }
}

/// Copies the complete files of the archive in `dir` into the archive at `url`.
pub struct Uploader {
    url: S3Url,
    parent: S3Url,
    name: String,
    dir: PathBuf,
    options: RepoOptions,
    encoding: Encoding,
    bucket: Option<Bucket>,
    /// The bucket's manifest as last read or written.
    remote: Option<RemoteManifest>,
    /// Whether `remote` is known to be what the bucket holds (false after a failure:
    /// read it again before trusting it).
    synced: bool,
    stopped: Option<String>,
}

impl Uploader {
    /// Checks the URL and loads the key; contacts nothing.
    pub fn new(url: &Path, dir: &Path, options: &RepoOptions) -> Result<Uploader, RepoError> {
        let url = match Location::parse(url)? {
            Location::S3(u) => u,
            Location::Dir(d) => {
                return Err(RepoError::Refused(format!(
                    "--upload {} is not an s3:// URL; write s3://BUCKET/PREFIX/NAME",
                    d.display()
                )));
            }
        };
        let Some((parent, name)) = url.split_name() else {
            return Err(RepoError::Refused(format!(
                "{url} names no archive; write s3://BUCKET/PREFIX/NAME"
            )));
        };
        let key = match &options.encrypt_key_file {
            Some(f) => Some(EncryptionKey::load(f)?),
            None => None,
        };
        Ok(Uploader {
            url,
            parent,
            name,
            dir: dir.to_path_buf(),
            options: RepoOptions {
                s3_retries: options.s3_retries.min(CLIENT_RETRIES),
                ..options.clone()
            },
            encoding: Encoding {
                level: options.compress_level,
                key,
            },
            bucket: None,
            remote: None,
            synced: false,
            stopped: None,
        })
    }

    pub fn url(&self) -> &S3Url {
        &self.url
    }

    /// Before archiving starts: the bucket must exist, take the credentials and hold
    /// nothing else under the name. Ok(Some(why)) when it fails otherwise (does not
    /// answer): archiving may start, the bucket catches up later.
    pub fn check(&mut self, local: &ArchiveManifest) -> Result<Option<String>, RepoError> {
        match self.connect(local) {
            Ok(()) => Ok(None),
            Err(e @ (RepoError::Refused(_) | RepoError::BucketRefused(_))) => Err(e),
            Err(e) => {
                self.bucket = None;
                Ok(Some(e.to_string()))
            }
        }
    }

    /// Connects on first use and reads the bucket's manifest again (another uploader
    /// may have replaced it), checked to belong to `local`.
    fn connect(&mut self, local: &ArchiveManifest) -> Result<(), RepoError> {
        self.synced = false;
        if self.bucket.is_none() {
            self.bucket = Some(Bucket::connect(&self.parent, &self.options)?);
        }
        let bucket = self.bucket.as_ref().expect("connected above");
        let found = remote::read(bucket, &self.name)?;
        if found.is_none() {
            // Objects of this archive's own files may be there (an upload cut off before
            // the first manifest); anything else is not ours to mix with.
            let base = format!("{}/", bucket.key(&self.name));
            let ours = |key: &str| {
                let rel = key.strip_prefix(&base).unwrap_or(key);
                let name = rel.strip_suffix(".enc").unwrap_or(rel);
                name.strip_suffix(".zst")
                    .and_then(split_name)
                    .is_some_and(|(b, _)| b == local.server.binlog_basename)
            };
            if let Some((other, _)) = bucket
                .list_all(&self.name)?
                .into_iter()
                .find(|(k, _)| !ours(k.as_ref()))
            {
                return Err(RepoError::Refused(format!(
                    "{} holds {other} but no binlog archive manifest ({}): it is something else; upload the binlogs to another name",
                    self.url,
                    remote::REMOTE_MANIFEST
                )));
            }
        }
        let m = found.unwrap_or_else(|| RemoteManifest {
            format_version: REMOTE_FORMAT_VERSION,
            updated_at: String::new(),
            uploaded_from: self.dir.clone(),
            archive: ArchiveManifest {
                files: Vec::new(),
                ..local.clone()
            },
            encoding: self.encoding.name().into(),
            key_id: self.encoding.key.as_ref().map(|k| k.id.clone()),
            objects: Vec::new(),
        });
        self.belongs(&m, local)?;
        self.remote = Some(m);
        self.synced = true;
        Ok(())
    }

    /// The bucket's archive must be this server's, stored with this key, and hold the
    /// same bytes under each name.
    fn belongs(&self, m: &RemoteManifest, local: &ArchiveManifest) -> Result<(), RepoError> {
        let url = &self.url;
        if m.archive.server != local.server {
            return Err(RepoError::Refused(format!(
                "{url} holds the binlog archive of another server ({}), not of the one archived in {} ({}); upload each archive to its own URL",
                m.archive.server,
                self.dir.display(),
                local.server
            )));
        }
        let ours = self.encoding.key.as_ref().map(|k| k.id.as_str());
        if m.key_id.as_deref() != ours {
            return Err(RepoError::Refused(format!(
                "{url} is stored as {} (key id {}) and this upload would store {} (key id {}); give the --encrypt-key-file it was uploaded with, or upload to a new URL",
                m.encoding,
                m.key_id.as_deref().unwrap_or("none"),
                self.encoding.name(),
                ours.unwrap_or("none")
            )));
        }
        let theirs: HashMap<&str, &str> = m
            .archive
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.blake3.as_str()))
            .collect();
        for f in &local.files {
            if let Some(b) = theirs.get(f.name.as_str())
                && *b != f.blake3
            {
                return Err(RepoError::Refused(format!(
                    "{url} holds another {} (blake3 {b} vs {} here): it is not this archive's history; upload to a new URL",
                    f.name, f.blake3
                )));
            }
        }
        Ok(())
    }

    /// Uploads every complete local file the bucket lacks, in order, replacing the
    /// bucket's manifest as it goes (only ever naming objects already stored); stops
    /// between files when `stop` is set. Returns how many it uploaded.
    pub fn pass(&mut self, stop: &AtomicBool) -> Result<usize, RepoError> {
        let Some(local) = read_local(&self.dir)? else {
            return Ok(0); // nothing archived complete yet
        };
        let in_step =
            |r: &RemoteManifest| lacks(r, &local).is_empty() && r.archive.gaps == local.gaps;
        if self.synced && self.remote.as_ref().is_some_and(in_step) {
            return Ok(0);
        }
        self.connect(&local)?;
        let result = self.upload_lacking(&local, stop);
        // After a failure, what the bucket's manifest says is read again next time.
        self.synced = result.is_ok();
        result
    }

    fn upload_lacking(
        &mut self,
        local: &ArchiveManifest,
        stop: &AtomicBool,
    ) -> Result<usize, RepoError> {
        let (Some(bucket), Some(m)) = (self.bucket.as_ref(), self.remote.as_mut()) else {
            unreachable!("connected by the caller");
        };
        // Files are added to `next`; `m` follows each time the bucket's manifest does.
        let mut next = RemoteManifest {
            archive: ArchiveManifest {
                files: m.archive.files.clone(),
                ..local.clone()
            },
            ..m.clone()
        };
        let mut dirty = next.archive.gaps != m.archive.gaps;
        let tag = self.encoding.tag();
        let mut written = Instant::now();
        let mut uploaded = 0;
        for f in lacks(m, local) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let path = self.dir.join(&f.name);
            let file = File::open(&path).map_err(|e| RepoError::Io {
                what: format!("cannot read the archived {}", path.display()),
                error: e,
            })?;
            let job = StoredObject {
                key: object_key(Path::new(&f.name), self.encoding.key.is_some()),
                path: PathBuf::from(&f.name),
                size: f.size,
                blake3: f.blake3.clone(),
                stored_size: 0,
                stored_blake3: String::new(),
            };
            let rel = join(&self.name, &job.key);
            let Some(stored) = put_checked(bucket, &rel, file, &job, &self.encoding, &tag, 0)?
            else {
                return Err(RepoError::Refused(format!(
                    "{} no longer matches its checksum in {}: the local archive is damaged, so neither it nor any later file is uploaded; check the disk, and restore from another copy of that file",
                    path.display(),
                    MANIFEST
                )));
            };
            next.archive.files.push(f);
            next.objects.push(stored);
            uploaded += 1;
            dirty = true;
            if written.elapsed() >= MANIFEST_EVERY {
                save(bucket, &self.dir, &self.name, &mut next)?;
                *m = next.clone();
                written = Instant::now();
                dirty = false;
            }
        }
        if dirty {
            save(bucket, &self.dir, &self.name, &mut next)?;
            *m = next;
        }
        Ok(uploaded)
    }

    /// Where the bucket stands (as last read) against the local archive.
    pub fn state(&self) -> UploadState {
        let local = read_local(&self.dir).ok().flatten();
        let (in_bucket, queued) = match (&self.remote, &local) {
            (Some(r), Some(l)) => (
                r.archive.files.len(),
                lacks(r, l).into_iter().map(|f| f.name).collect(),
            ),
            (None, Some(l)) => (0, l.files.iter().map(|f| f.name.clone()).collect()),
            (r, None) => (r.as_ref().map_or(0, |r| r.archive.files.len()), Vec::new()),
        };
        UploadState {
            url: self.url.to_string(),
            in_bucket,
            queued,
            stopped: self.stopped.clone(),
        }
    }

    /// Follows the archive until `done` is set (then makes one last pass) or until the
    /// bucket refuses for good; a failing bucket is said once and retried with backoff.
    pub fn follow(
        &mut self,
        stop: &AtomicBool,
        done: &AtomicBool,
        mut events: impl FnMut(ArchiveEvent),
    ) -> UploadState {
        crate::repo::lower_priority();
        let mut failing = false;
        let mut pause = FIRST_BACKOFF;
        loop {
            let last = done.load(Ordering::Acquire);
            match self.pass(stop) {
                Ok(_) => {
                    if std::mem::take(&mut failing) {
                        events(ArchiveEvent::Note(format!(
                            "{} answers again; the queued files are uploaded",
                            self.url
                        )));
                    }
                    pause = FIRST_BACKOFF;
                }
                Err(RepoError::Refused(why)) => {
                    events(ArchiveEvent::Note(format!(
                        "uploading to {} stopped: {why}; archiving into {} goes on",
                        self.url,
                        self.dir.display()
                    )));
                    self.stopped = Some(why);
                    return self.state();
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        events(ArchiveEvent::Note(format!(
                            "cannot upload to {} ({e}); complete files stay queued in {} and are uploaded when it answers again (retrying every {} s at most)",
                            self.url,
                            self.dir.display(),
                            MAX_BACKOFF.as_secs()
                        )));
                    }
                    // Connect afresh next time.
                    self.bucket = None;
                    if !last {
                        wait(pause, done);
                    }
                    pause = (pause * 2).min(MAX_BACKOFF);
                    if !last {
                        continue;
                    }
                }
            }
            if last {
                return self.state();
            }
            wait(TICK, done);
        }
    }
}

/// Sleeps for `pause`, or until `done` is set.
fn wait(pause: Duration, done: &AtomicBool) {
    let until = Instant::now() + pause;
    while Instant::now() < until && !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The complete local files the bucket's archive does not hold, in order.
fn lacks(remote: &RemoteManifest, local: &ArchiveManifest) -> Vec<ArchivedFile> {
    let there: HashSet<&str> = remote
        .archive
        .files
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    local
        .files
        .iter()
        .filter(|f| !there.contains(f.name.as_str()))
        .cloned()
        .collect()
}

/// Replaces the bucket's manifest (every object it names is stored already).
fn save(bucket: &Bucket, dir: &Path, name: &str, m: &mut RemoteManifest) -> Result<(), RepoError> {
    m.updated_at = rfc3339(SystemTime::now());
    m.uploaded_from = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    remote::write(bucket, name, m)
}

/// `hotbackup upload ARCHIVE_DIR s3://…`: uploads what the bucket lacks, once.
pub fn upload_archive(
    dir: &Path,
    url: &Path,
    options: &RepoOptions,
) -> Result<UploadState, RepoError> {
    if read_local(dir)?.is_none() {
        return Err(RepoError::Refused(format!(
            "{} holds no binlog archive ({MANIFEST}), or none with a complete file yet",
            dir.display()
        )));
    }
    let mut uploader = Uploader::new(url, dir, options)?;
    // A one-shot upload may take the client's own retries in full.
    uploader.options.s3_retries = options.s3_retries;
    crate::repo::lower_priority();
    uploader.pass(&AtomicBool::new(false))?;
    Ok(uploader.state())
}

/// The local archive's manifest (None: nothing archived complete yet).
fn read_local(dir: &Path) -> Result<Option<ArchiveManifest>, RepoError> {
    let path = dir.join(MANIFEST);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            RepoError::Refused(format!(
                "{} is not a binlog archive manifest ({e})",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RepoError::Io {
            what: format!("cannot read {}", path.display()),
            error: e,
        }),
    }
}
