//! `restore`: puts an image back as a server's files, safely. A plan is made first
//! (every refusal happens there, before anything is written), then executed; `--dry-run`
//! prints the plan and stops.
//!
//! Where things go: the image is the whole mount of the backed-up server; it is placed
//! at `--datadir`, so the restored server's datadir is `--datadir` itself when the mount
//! was the datadir (the usual case), or the same subdirectory of it as on the mount.
//! Every path in the image that names the old server's files (binlog and relay-log
//! indexes, InnoDB `.isl` links, symbolic links) is rewritten to the restored place or,
//! if it points outside the image, refused: a restored server never touches a file of
//! the server the image came from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::image::{Image, ImageError};

mod fixup;
pub mod lineage;
pub mod pitr;
mod place;
mod plan;
pub mod remote_binlogs;
mod temp_server;

pub use plan::{Method, RestorePlan, plan};

#[derive(Clone, Debug, Default, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestoreOptions {
    /// Where the image goes: the restored server's datadir (new or empty).
    #[arg(long, value_name = "DIR")]
    pub datadir: PathBuf,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Move the image's files instead of copying them (same filesystem only); the
    /// backup is used up.
    #[arg(long = "move")]
    pub move_files: bool,
    /// Owner of the restored files (default: the owner they had on the backed-up server).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Skip checking every checksum before restoring.
    #[arg(long)]
    pub no_verify: bool,
    /// Keep the replica state (relay logs, master.info, relay-log.info): the restored
    /// server then resumes replicating where the backed-up replica was.
    #[arg(long)]
    pub keep_replica_state: bool,
    /// Point-in-time recovery: replay the binlog up to (not including) this time,
    /// `YYYY-MM-DD HH:MM:SS` in this machine's time zone.
    #[arg(
        long,
        value_name = "TIME",
        conflicts_with = "until_gtid",
        requires = "binlog_dir"
    )]
    pub until: Option<String>,
    /// Point-in-time recovery: replay the binlog up to and including this GTID.
    #[arg(long, value_name = "GTID", requires = "binlog_dir")]
    pub until_gtid: Option<String>,
    /// Where the binlogs to replay are (an archive, the old server's binlog directory,
    /// or an archive in a bucket, s3://BUCKET/PREFIX/NAME as `binlog-archive --upload`
    /// was given); repeatable.
    #[arg(long, value_name = "DIR|URL")]
    pub binlog_dir: Vec<PathBuf>,
    /// Keep the image's binlog file and GTID numbering. By default the restored server
    /// starts a new binlog history, so that replicas of the old server that were ahead
    /// of the image stop with an error instead of replicating a different history.
    #[arg(long)]
    pub keep_binlog_history: bool,
    /// Threads for verifying and copying.
    #[arg(long, default_value_t = 2)]
    #[serde(skip)]
    pub parallel: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A refusal found while planning: nothing was changed.
    #[error("{0}")]
    Refused(String),
    #[error("the image in {dir} is damaged ({count} problem(s), first: {first}); restore from another backup (see `hotbackup verify {dir}`)", dir = .dir.display())]
    Damaged {
        dir: PathBuf,
        count: usize,
        first: String,
    },
    #[error("restoring into {path} failed: {error}; the restore is incomplete, remove {root} and run it again", path = .path.display(), root = .root.display())]
    Io {
        root: PathBuf,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the restore's private server failed: {0}")]
    Replay(String),
}

/// What a restore reports as it goes.
pub enum RestoreEvent<'a> {
    /// A step of the plan starts.
    Step(&'a str),
    /// Bytes done of a step's total.
    Progress {
        done: u64,
        total: u64,
    },
    Note(String),
}

/// What a finished restore did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreSummary {
    pub datadir: PathBuf,
    pub config: PathBuf,
    pub files: u64,
    pub bytes: u64,
    pub reflinked: u64,
    pub duration_secs: f64,
    /// After point-in-time recovery: the GTID position the server reached.
    pub reached_gtid: Option<String>,
}

/// Plans and (unless `--dry-run`) executes a restore of `dir`; binlogs in a bucket are
/// fetched first (`repo` says how to reach it).
pub fn run(
    dir: &Path,
    options: &RestoreOptions,
    repo: &crate::repo::RepoOptions,
    mut events: impl FnMut(RestoreEvent<'_>),
) -> Result<(RestorePlan, Option<RestoreSummary>), RestoreError> {
    let image = Image::open(dir)?;
    if options
        .binlog_dir
        .iter()
        .any(|d| crate::repo::Location::is_s3(d))
    {
        // The cheap refusals (a non-empty --datadir…) before any download.
        plan(
            &image,
            &RestoreOptions {
                until: None,
                until_gtid: None,
                binlog_dir: Vec::new(),
                ..options.clone()
            },
        )?;
    }
    let fetched = remote_binlogs::fetch(&image, options, repo, &mut events)?;
    let options = &RestoreOptions {
        binlog_dir: fetched.dirs.clone(),
        ..options.clone()
    };
    let plan = plan(&image, options)?;
    if options.dry_run {
        return Ok((plan, None));
    }
    let summary = execute(&image, &plan, options, &mut events)?;
    Ok((plan, Some(summary)))
}

fn execute(
    image: &Image,
    plan: &RestorePlan,
    options: &RestoreOptions,
    events: &mut impl FnMut(RestoreEvent<'_>),
) -> Result<RestoreSummary, RestoreError> {
    let started = std::time::Instant::now();
    if plan.verify {
        events(RestoreEvent::Step("verify the image"));
        let report = crate::image::verify::verify(image, options.parallel.max(1), |p| {
            events(RestoreEvent::Progress {
                done: p.bytes_done,
                total: p.bytes_total,
            })
        });
        let _ = crate::image::verify::record(image, &report);
        if let Some(first) = report.problems.first() {
            return Err(RestoreError::Damaged {
                dir: image.dir.clone(),
                count: report.problems.len(),
                first: first.to_string(),
            });
        }
    }
    events(RestoreEvent::Step(match plan.method {
        Method::Copy => "copy the image (reflinked where the filesystem allows it)",
        Method::Move => "move the image's files",
    }));
    let placed = place::place(image, plan, options.parallel.max(1), events)?;
    events(RestoreEvent::Step("rewrite paths and strip replica state"));
    fixup::apply(plan).map_err(|(path, error)| RestoreError::Io {
        root: plan.root.clone(),
        path,
        error,
    })?;
    // The work done by the server's own hands, on a private temporary server.
    if plan.pitr.is_some() || plan.new_history.is_some() {
        let server = temp_server::TempServer::start(plan, events)?;
        if let Some(pitr) = &plan.pitr {
            events(RestoreEvent::Step(
                "replay the binlog (point-in-time recovery)",
            ));
            pitr::replay(&server, pitr)?;
        }
        if let Some(history) = &plan.new_history {
            events(RestoreEvent::Step("start a new binlog history"));
            lineage::start(&server, history)?;
        }
        server.shutdown()?;
        if let Some(history) = &plan.new_history {
            lineage::renumber(plan, history)?;
        }
    }
    let reached_gtid = plan.pitr.as_ref().map(|p| p.reached.clone());
    Ok(RestoreSummary {
        datadir: plan.datadir.clone(),
        config: plan.config.clone(),
        files: placed.files,
        bytes: placed.bytes,
        reflinked: placed.reflinked,
        duration_secs: started.elapsed().as_secs_f64(),
        reached_gtid,
    })
}
