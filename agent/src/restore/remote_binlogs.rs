//! `restore --until… --binlog-dir s3://…`: the binlog files a point-in-time recovery
//! needs (the image's binlog file and every later one) fetched from an archive in a
//! bucket into a temporary directory next to the restore, each object checked against
//! the bucket's manifest as it arrives; the directory goes when the restore ends.

use std::fs::{self, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::pitr::split_binlog_name;
use super::{RestoreError, RestoreEvent, RestoreOptions};
use crate::binlog_archive::remote::{self, REMOTE_MANIFEST, RemoteManifest};
use crate::image::Image;
use crate::repo::config::join;
use crate::repo::download::{fetch_checked, key_for};
use crate::repo::s3::Bucket;
use crate::repo::{Location, RepoError, RepoOptions, S3Url, StoredObject};

/// The `--binlog-dir`s with every bucket replaced by the local directory its files were
/// fetched to; that directory is removed when this is dropped.
pub struct Fetched {
    pub dirs: Vec<PathBuf>,
    work: Option<PathBuf>,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if let Some(w) = &self.work {
            let _ = fs::remove_dir_all(w);
        }
    }
}

/// Fetches what a point-in-time recovery of `image` needs from every `s3://` binlog dir.
pub fn fetch(
    image: &Image,
    options: &RestoreOptions,
    repo: &RepoOptions,
    events: &mut impl FnMut(RestoreEvent<'_>),
) -> Result<Fetched, RestoreError> {
    let mut fetched = Fetched {
        dirs: options.binlog_dir.clone(),
        work: None,
    };
    let wanted = options.until.is_some() || options.until_gtid.is_some();
    let Some(start) = image.binlog().filter(|_| wanted) else {
        return Ok(fetched); // the plan says why, if anything is wrong
    };
    let Some((stem, first)) = split_binlog_name(&start.file) else {
        return Ok(fetched);
    };
    let only = options.binlog_dir.len() == 1;
    for i in 0..fetched.dirs.len() {
        let Location::S3(url) = Location::parse(&fetched.dirs[i]).map_err(refused)? else {
            continue;
        };
        let work = match &fetched.work {
            Some(w) => w.clone(),
            None => {
                let w = work_dir(options, repo)?;
                fetched.work = Some(w.clone());
                w
            }
        };
        let into = work.join(i.to_string());
        events(RestoreEvent::Step("download the binlogs from the bucket"));
        fetch_one(&url, repo, (stem, first), only, &into, events)?;
        fetched.dirs[i] = into;
    }
    Ok(fetched)
}

fn refused(e: RepoError) -> RestoreError {
    RestoreError::Refused(e.to_string())
}

/// `--staging-dir`, else a hidden directory next to `--datadir` (on its filesystem).
fn work_dir(options: &RestoreOptions, repo: &RepoOptions) -> Result<PathBuf, RestoreError> {
    let base = match &repo.staging_dir {
        Some(d) => d.clone(),
        None => std::path::absolute(&options.datadir)
            .map_err(|e| RestoreError::Refused(format!("cannot resolve --datadir: {e}")))?
            .parent()
            .unwrap_or(Path::new("/"))
            .to_path_buf(),
    };
    let dir = base.join(format!(".hotbackup-binlogs-{}", std::process::id()));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            RestoreError::Refused(format!(
                "cannot make {} to fetch the binlogs into: {e}; give --staging-dir a directory with room",
                dir.display()
            ))
        })?;
    Ok(dir)
}

/// Fetches the files of series `stem` from number `first` on out of the archive at `url`
/// into `into`. When the bucket is the only `--binlog-dir`, what it lacks is refused
/// here, by name; otherwise the plan decides over all the directories.
fn fetch_one(
    url: &S3Url,
    repo: &RepoOptions,
    (stem, first): (&str, u64),
    only: bool,
    into: &Path,
    events: &mut impl FnMut(RestoreEvent<'_>),
) -> Result<(), RestoreError> {
    let Some((parent, name)) = url.split_name() else {
        return Err(RestoreError::Refused(format!(
            "--binlog-dir {url} names no archive; write s3://BUCKET/PREFIX/NAME, the URL `binlog-archive --upload` was given"
        )));
    };
    let bucket = Bucket::connect(&parent, repo).map_err(refused)?;
    let Some(m) = remote::read(&bucket, &name).map_err(refused)? else {
        return Err(RestoreError::Refused(format!(
            "--binlog-dir {url} holds no binlog archive (no {REMOTE_MANIFEST}); give the URL `binlog-archive --upload` was given (`hotbackup list {parent}` shows what is there)"
        )));
    };
    let key = key_for(&url.to_string(), m.key_id.as_deref(), repo).map_err(refused)?;
    let wanted: Vec<(u64, &StoredObject)> = m
        .archive
        .files
        .iter()
        .filter_map(|f| {
            let (s, n) = split_binlog_name(&f.name)?;
            (s == stem && n >= first).then_some((n, m.object(&f.name)?))
        })
        .collect();
    if only {
        lacking(url, &m, stem, first, &wanted)?;
    }
    fs::create_dir_all(into)
        .map_err(|e| RestoreError::Refused(format!("cannot make {}: {e}", into.display())))?;
    // One after another: the restore's progress is reported from this thread.
    let total: u64 = wanted.iter().map(|(_, o)| o.size).sum();
    let mut done = 0;
    for (_, o) in &wanted {
        let path = into.join(&o.path);
        let file = File::create(&path)
            .map_err(|e| RestoreError::Refused(format!("cannot write {}: {e}", path.display())))?;
        let rel = join(&name, &o.key);
        if let Err(detail) =
            fetch_checked(&bucket, &rel, o, key.as_ref(), &file).map_err(refused)?
        {
            return Err(RestoreError::Refused(format!(
                "{} in {url} is damaged or was tampered with ({detail}); nothing was restored: replay from an intact copy (the archiver's local directory, as --binlog-dir DIR)",
                o.key
            )));
        }
        done += o.size;
        events(RestoreEvent::Progress { done, total });
    }
    Ok(())
}

/// The files of the series from `first` on that the bucket's archive does not hold.
fn lacking(
    url: &S3Url,
    m: &RemoteManifest,
    stem: &str,
    first: u64,
    wanted: &[(u64, &StoredObject)],
) -> Result<(), RestoreError> {
    let Some(&(last, _)) = wanted.last() else {
        let newest = m
            .archive
            .files
            .last()
            .map_or("nothing".into(), |f| f.name.clone());
        return Err(RestoreError::Refused(format!(
            "--binlog-dir {url} holds no binlog file {stem}.{first:06} or later (its newest is {newest}); the archiver has not uploaded them yet (`hotbackup upload ARCHIVE_DIR {url}`), or give the archive's local directory as --binlog-dir"
        )));
    };
    let missing: Vec<String> = (first..=last)
        .filter(|n| !wanted.iter().any(|(w, _)| w == n))
        .map(|n| format!("{stem}.{n:06}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let recorded: Vec<&str> = m
        .archive
        .gaps
        .iter()
        .filter(|g| g.files.iter().any(|f| missing.contains(f)))
        .map(|g| g.detail.as_str())
        .collect();
    Err(RestoreError::Refused(format!(
        "the binlogs in {url} have a gap: {} missing{}; recover only up to the gap, or add a --binlog-dir that holds the missing file(s)",
        missing.join(", "),
        if recorded.is_empty() {
            String::new()
        } else {
            format!(" ({})", recorded.join("; "))
        }
    )))
}
