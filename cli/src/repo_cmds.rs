//! The repository commands (`upload`, `list`, `delete`, `prune`) and the `s3://` side
//! of the image commands: an image in a bucket is verified and described in place, and
//! fetched into a local staging directory for `restore` and `replica`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agent::image::info::{ImageInfo, State};
use agent::repo::download::{self, RemoteImage};
use agent::repo::prune::Policy;
use agent::repo::{Location, RepoError, RepoEvent, RepoOptions, S3Url};
use anyhow::{Context, bail};

use crate::render::bytes;

fn s3(arg: &Path) -> anyhow::Result<S3Url> {
    match Location::parse(arg)? {
        Location::S3(url) => Ok(url),
        Location::Dir(d) => bail!("{} is not an s3:// URL", d.display()),
    }
}

/// Shows transfer progress on a terminal, steps and notes always.
fn events(json: bool) -> (indicatif::ProgressBar, impl FnMut(RepoEvent<'_>) + Send) {
    let bar = crate::image_cmds::bar(json);
    let b = bar.clone();
    let sink = move |e: RepoEvent<'_>| match e {
        RepoEvent::Step(s) => {
            b.set_message(s.to_string());
            if b.is_hidden() && !json {
                eprintln!("hotbackup: {s}");
            }
        }
        RepoEvent::Progress { done, total } => {
            b.set_length(total);
            b.set_position(done);
        }
        RepoEvent::Note(n) => b.suspend(|| eprintln!("hotbackup: {n}")),
    };
    (bar, sink)
}

/// `upload DIR s3://bucket/prefix/name`.
pub fn upload(dir: &Path, target: &Path, options: &RepoOptions) -> anyhow::Result<()> {
    if dir.join(agent::binlog_archive::manifest::MANIFEST).exists() {
        let state = agent::binlog_archive::upload::upload_archive(dir, target, options)?;
        println!("uploaded the binlog archive {}: {state}", dir.display());
        return Ok(());
    }
    let url = s3(target)?;
    let (bar, sink) = events(false);
    let s = agent::repo::upload::upload(dir, &url, options, sink);
    bar.finish_and_clear();
    let s = s?;
    println!(
        "uploaded {} to {}: {} objects ({} already there from an interrupted upload), {} stored as {} ({:.2}x) in {:.1}s",
        dir.display(),
        s.url,
        s.objects,
        s.skipped,
        bytes(s.bytes),
        bytes(s.stored_bytes),
        s.bytes as f64 / s.stored_bytes.max(1) as f64,
        s.duration_secs
    );
    Ok(())
}

/// `list DIR|s3://bucket/prefix`: complete backups; partial ones are only counted.
pub fn list(location: &Path, options: &RepoOptions, json: bool) -> anyhow::Result<()> {
    let repo = agent::repo::open(&Location::parse(location)?, options)?;
    let images = repo.list()?;
    let (complete, partial): (Vec<_>, Vec<_>) = images.into_iter().partition(|l| l.complete);
    if json {
        println!("{}", serde_json::to_string_pretty(&complete)?);
    } else {
        for l in &complete {
            println!(
                "{:<28} {:<28} {:<7} {:>10} stored {:>10}",
                l.name,
                l.validity_point,
                l.kind,
                bytes(l.bytes),
                bytes(l.stored_bytes)
            );
        }
    }
    if let Location::S3(url) = Location::parse(location)? {
        let bucket = agent::repo::s3::Bucket::connect(&url, options)?;
        for line in agent::binlog_archive::remote::list(&bucket)? {
            eprintln!("hotbackup: not a backup: {line}");
        }
    }
    if !partial.is_empty() {
        eprintln!(
            "hotbackup: not listed: {} incomplete ({}): being written, or cut off",
            partial.len(),
            partial
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// `delete DIR/NAME|s3://bucket/prefix/name`.
pub fn delete(image: &Path, options: &RepoOptions) -> anyhow::Result<()> {
    let (parent, name) = match Location::parse(image)? {
        Location::S3(url) => {
            let (parent, name) = url
                .split_name()
                .with_context(|| format!("{url} names no image; write s3://BUCKET/PREFIX/NAME"))?;
            (Location::S3(parent), name)
        }
        Location::Dir(d) => {
            let d = std::path::absolute(&d)?;
            let name = d.file_name().context("name a backup directory")?;
            let name = name.to_string_lossy().into_owned();
            (
                Location::Dir(d.parent().unwrap_or(Path::new("/")).to_path_buf()),
                name,
            )
        }
    };
    let repo = agent::repo::open(&parent, options)?;
    if !repo.list()?.iter().any(|l| l.name == name) {
        bail!(
            "{} is not a backup in {}; `hotbackup list {}` shows them",
            name,
            repo.location(),
            repo.location()
        );
    }
    repo.delete(&name)?;
    println!("deleted {}", image.display());
    Ok(())
}

/// `prune LOCATION --keep-…`.
pub fn prune(
    location: &Path,
    policy: &Policy,
    dry_run: bool,
    options: &RepoOptions,
) -> anyhow::Result<()> {
    let repo = agent::repo::open(&Location::parse(location)?, options)?;
    let decisions = agent::repo::prune::prune(repo.as_ref(), policy, dry_run, |d| {
        eprintln!("hotbackup: deleted {}", d.name)
    })?;
    for d in &decisions {
        println!(
            "{:<12} {:<28} {:<28} {}",
            if d.keep {
                "keep"
            } else if dry_run {
                "would delete"
            } else {
                "delete"
            },
            d.name,
            d.validity_point,
            d.reasons.join(", ")
        );
    }
    let incomplete = decisions
        .iter()
        .filter(|d| d.reasons.iter().any(|r| r == "incomplete"))
        .count();
    if incomplete > 0 {
        println!(
            "{incomplete} incomplete image(s) kept: one may still be being written; delete it with `hotbackup delete` once you know it is not"
        );
    }
    if dry_run {
        println!("(dry run: nothing was deleted)");
    }
    Ok(())
}

/// `verify s3://…`: exit 0 good, 1 damaged, 2 cannot check.
pub fn verify(url: &Path, options: &RepoOptions, json: bool) -> ExitCode {
    let result = s3(url)
        .and_then(|u| Ok(RemoteImage::open(&u, options)?))
        .and_then(|image| {
            let (bar, sink) = events(json);
            let report = download::verify(&image, options, sink);
            bar.finish_and_clear();
            Ok(report?)
        });
    match result {
        Ok(report) => crate::image_cmds::print_verify(url, &report, json),
        // The repository manifest's seal did not open: damaged, not uncheckable.
        Err(e) if matches!(e.downcast_ref(), Some(RepoError::Tampered { .. })) => {
            eprintln!("hotbackup: {e:#}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("hotbackup: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `info s3://…`: exit 0 complete, 1 not.
pub fn info(url: &Path, options: &RepoOptions, json: bool) -> ExitCode {
    let mut out = ImageInfo {
        dir: url.to_path_buf(),
        state: State::Complete,
        reason: None,
        verified: None,
        summary: None,
    };
    match s3(url).and_then(|u| Ok(RemoteImage::open(&u, options)?)) {
        Ok(image) => {
            out.verified = download::last_verified(&image);
            let local = agent::image::Image {
                dir: url.to_path_buf(),
                manifest: image.manifest.image.clone(),
            };
            out.summary = Some(agent::image::info::summary(&local));
        }
        Err(e) => {
            out.state = State::Unreadable;
            out.reason = Some(format!("{e:#}"));
        }
    }
    crate::image_cmds::print_info(&out, json)
}

/// Where an image from a bucket is fetched to: `--staging-dir`, else next to `near`.
fn staging(options: &RepoOptions, near: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let base = match &options.staging_dir {
        Some(d) => d.clone(),
        None => std::path::absolute(near)?
            .parent()
            .unwrap_or(Path::new("/"))
            .to_path_buf(),
    };
    let dir = base.join(format!(".hotbackup-download-{name}-{}", std::process::id()));
    Ok(dir)
}

/// Removes a staging directory when dropped, whatever happened.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `restore s3://… --datadir X`: fetched (every object checked) into a staging directory
/// on X's filesystem, then restored from there by rename.
pub fn restore(
    url: &Path,
    restore: &agent::restore::RestoreOptions,
    options: &RepoOptions,
) -> anyhow::Result<()> {
    let image = RemoteImage::open(&s3(url)?, options)?;
    // The cheap refusal first: no download for a datadir that will be refused anyway.
    if std::fs::read_dir(&restore.datadir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "--datadir {} is not empty; restore into a new or empty directory (a restore never overwrites a server's files)",
            restore.datadir.display()
        );
    }
    if restore.dry_run {
        return dry_run(&image, restore, options);
    }
    let dir = staging(options, &restore.datadir, &image.name)?;
    let staged = Staged(dir.clone());
    let needed = image.manifest.image.totals.bytes;
    if let Some(parent) = dir.parent()
        && let Ok(st) = nix::sys::statvfs::statvfs(parent)
        && st.blocks_available() * st.fragment_size() < needed
    {
        bail!(
            "{} has less free space than the image needs ({}); free some, or give --staging-dir on the datadir's filesystem with room",
            parent.display(),
            bytes(needed)
        );
    }
    let (bar, sink) = events(false);
    let fetched = download::fetch(&image, &staged.0, options, true, sink);
    bar.finish_and_clear();
    fetched?;
    let same_fs = {
        use std::os::unix::fs::MetadataExt;
        let datadir_fs = restore
            .datadir
            .ancestors()
            .find_map(|a| std::fs::metadata(a).ok());
        std::fs::metadata(&dir)
            .ok()
            .zip(datadir_fs)
            .is_some_and(|(a, b)| a.dev() == b.dev())
    };
    let restore_options = agent::restore::RestoreOptions {
        // Every object was checked as it arrived.
        no_verify: true,
        move_files: same_fs && !restore.dry_run,
        ..restore.clone()
    };
    crate::image_cmds::restore(&dir, &restore_options, options)
}

/// `restore s3://… --dry-run`: the plan from the manifest and the side files alone
/// (what a restore checks before it places anything), not a download of the data.
fn dry_run(
    image: &RemoteImage,
    restore: &agent::restore::RestoreOptions,
    options: &RepoOptions,
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir().context("cannot make a temporary directory")?;
    let dir = tmp.path().join(&image.name);
    download::fetch(image, &dir, options, false, |_| {})?;
    println!(
        "would download {} from the bucket first (into --staging-dir, or next to the datadir), checking every object",
        bytes(image.manifest.image.totals.bytes)
    );
    let restore_options = agent::restore::RestoreOptions {
        no_verify: true,
        ..restore.clone()
    };
    crate::image_cmds::restore(&dir, &restore_options, options)
}

/// `replica s3://…`: the manifest and the side files are all it reads.
pub fn replica(
    url: &Path,
    server: &agent::db::Target,
    replica: &agent::replica::ReplicaOptions,
    options: &RepoOptions,
) -> anyhow::Result<()> {
    let image = RemoteImage::open(&s3(url)?, options)?;
    let tmp = tempfile::tempdir().context("cannot make a temporary directory")?;
    let dir = tmp.path().join(&image.name);
    download::fetch(&image, &dir, options, false, |_| {})?;
    crate::image_cmds::replica(&dir, server, replica)
}

/// For `backup --target-dir s3://…`: the local directory the backup is written to first.
pub fn backup_staging(
    target: &Path,
    options: &RepoOptions,
) -> anyhow::Result<Option<(PathBuf, S3Url)>> {
    if !Location::is_s3(target) {
        return Ok(None);
    }
    let url = s3(target)?;
    let Some((_, name)) = url.split_name() else {
        bail!("{url} names no image; write s3://BUCKET/PREFIX/NAME");
    };
    let Some(staging) = &options.staging_dir else {
        bail!(
            "a backup to {url} is written to a local directory first and uploaded after the validity point; give one with --staging-dir DIR (room for the whole image)"
        );
    };
    // The bucket is checked before the backup starts, not after it is taken.
    agent::repo::s3::Bucket::connect(&url.split_name().expect("checked").0, options)?;
    Ok(Some((std::path::absolute(staging)?.join(name), url)))
}

/// After a backup to `s3://…`: uploads the staged image and removes it.
pub fn upload_staged(staged: &Path, url: &S3Url, options: &RepoOptions) -> anyhow::Result<()> {
    upload(staged, Path::new(&url.to_string()), options).with_context(|| {
        format!(
            "the backup is complete in {}; upload it again with `hotbackup upload {} {url}`",
            staged.display(),
            staged.display()
        )
    })?;
    std::fs::remove_dir_all(staged).with_context(|| {
        format!(
            "uploaded, but could not remove the staged copy {}",
            staged.display()
        )
    })
}
