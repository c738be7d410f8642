//! `hotbackup binlog-archive`: every binlog file of a server lands in an archive
//! directory as the server writes it, fsynced, with a checksum manifest, for
//! point-in-time recovery.
//!
//! # Design
//!
//! The bytes come from the server's own replication protocol through
//! `mariadb-binlog --read-from-remote-server --raw` run as a child (the [`streamer`]),
//! supervised here. Chosen over watching a local binlog directory with inotify
//! because it works wherever a replica would (TCP included, another host included),
//! needs only REPLICATION SLAVE and BINLOG MONITOR (no access to the datadir, no
//! running as the server's user), sees exactly the bytes the server sends to its
//! replicas, and cannot read a file the server is half-way through writing: the
//! server sends whole events only. Measured: the tool writes every event with its
//! own `write()`, so nothing waits in a user-space buffer; what it received is in
//! the page cache at once. The password reaches it through a pipe on its stdin that
//! it reads as its only option file (`--defaults-file=/dev/stdin`): never argv, the
//! environment, or a file left on disk. (Speaking the replication protocol ourselves
//! would need the binlog feature of the `mysql` crate, which parses and re-encodes
//! each event and pulls in zstd; inotify would need the datadir on this host and
//! readable, and would see half-written events.)
//!
//! What the tool does not do, this module does:
//!
//! * **Durability.** Every second the partial files are fsynced. Before that, the
//!   server's position is read (`SHOW MASTER STATUS`); when the fsynced bytes reach
//!   it, every commit before the query is on disk. The age of the last such proof is
//!   the number of seconds of commits at risk, printed in the status lines (about
//!   1 s while following the server).
//! * **Completeness.** A file is complete when the server lists a later one and the
//!   copy holds exactly as many bytes as the server's, in whole events (or, for a
//!   file the server purged meanwhile, when it ends with the server's ROTATE or STOP
//!   event). Only then is it checksummed, fsynced and renamed from `.partial/` into
//!   the archive, both directories fsynced, and recorded in `archive.json` (replaced
//!   atomically). The archive never holds a torn complete file.
//! * **Restarts.** The tool rewrites a file from its start when started on it, and a
//!   server's shutdown ends its dump before the final STOP event is sent. So after any
//!   interruption the partial file is streamed again from its start (the server still
//!   has it, with the STOP event), while the old copy is kept as `NAME.previous` until
//!   the new one has passed it: what was fsynced stays on disk. Files are never
//!   appended to at an offset, so a lost or duplicated event cannot arise.
//! * **Resume and gaps.** On every (re)connection the manifest is compared with
//!   `SHOW BINARY LOGS` ([`plan`]): sizes (and the GTID list each file starts with)
//!   of files both hold must agree, or the server's history is not the archived one
//!   and we stop; files purged before they were archived are a gap, reported on
//!   stderr and recorded in the manifest once; streaming continues with the first
//!   file not archived complete.
//! * **Liveness.** When the server goes away the tool exits; we say so once and
//!   reconnect with backoff. A tool that stays connected but stops receiving while
//!   the server writes is restarted after `STALL` (30 s).
//!
//! The cost of the choice: a restart streams the current file again from its start
//! (at most `max_binlog_size`). A file of a server that crashed (was not shut down)
//! differs from the server's own copy in one flag of its first event: the server
//! sends it with "in use" cleared, as it is on disk after a clean close.

mod archiver;
pub mod binlog;
pub mod manifest;
pub mod plan;
pub mod remote;
pub mod store;
pub mod streamer;
pub mod upload;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::db::flavor::Flavor;
use crate::db::server::{self, Needed, ServerFacts};
use crate::db::{Db, DbError, Sql, Target};
use crate::repo::RepoOptions;
use archiver::Archiver;
use manifest::ServerIdentity;
use store::Archive;

/// What the archiver needs of the user it connects as.
const NEEDED: &[Needed] = &[
    Needed {
        any_of: &["REPLICATION SLAVE"],
        on: None,
        why: "streaming the binlog as a replica does",
    },
    Needed {
        any_of: &["BINLOG MONITOR", "REPLICATION CLIENT", "SUPER"],
        on: None,
        why: "SHOW BINARY LOGS and SHOW MASTER STATUS",
    },
];

/// Everything `hotbackup binlog-archive` takes besides the connection.
#[derive(Clone, Debug, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct ArchiveOptions {
    /// The archive directory (created if missing): complete binlog files under their
    /// own names, `archive.json`, and the file being written in `.partial/`.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Archive what the server has now, up to its current end, then exit.
    #[arg(long)]
    pub once: bool,
    /// The server_id the archiver uses on the server, as a replica would (default:
    /// one derived from the archive directory, above 2^31). A replica with the same
    /// server_id and the archiver would keep cutting each other off.
    #[arg(long, value_name = "ID")]
    pub archiver_server_id: Option<u32>,
    /// Seconds between two status lines (0: none).
    #[arg(long, default_value_t = 60, value_name = "S")]
    pub status_interval: u64,
    /// The binlog client to run (default: mariadb-binlog, else mysqlbinlog, from PATH).
    #[arg(long, value_name = "PATH")]
    pub mariadb_binlog: Option<PathBuf>,
    /// Also copy every complete file into a bucket, s3://BUCKET/PREFIX/NAME (compressed,
    /// encrypted with --encrypt-key-file, as `upload` stores images). The local archive
    /// stays the durable copy (fsynced within ~1 s); the bucket follows it file by file,
    /// so it lags by the file being written (rotate sooner with a smaller
    /// max_binlog_size). A slow or unreachable bucket never holds archiving up: files
    /// queue locally and are uploaded when it answers (a restart uploads what it lacks;
    /// so does `hotbackup upload DIR URL`).
    #[arg(long, value_name = "URL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Refused(String),
    #[error("the archive cannot go on: {0}")]
    Diverged(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("mariadb-binlog failed: {0}")]
    Streamer(String),
}

/// What the archiver reports while it works, for the command line to print.
#[derive(Clone, Debug, PartialEq)]
pub enum ArchiveEvent {
    Note(String),
    /// Files purged before they were archived (already recorded in the manifest).
    Gap(String),
    Status(String),
}

/// What a run leaves behind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchiveSummary {
    pub dir: PathBuf,
    pub archived_now: usize,
    pub files: usize,
    pub gaps: usize,
    /// The file being written and how many of its bytes are archived so far.
    pub current: Option<(String, u64)>,
    /// With `--upload`: where the bucket stands at the end of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<upload::UploadState>,
}

impl std::fmt::Display for ArchiveSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} complete binlog file(s) in {} ({} new)",
            self.files,
            self.dir.display(),
            self.archived_now
        )?;
        if let Some((name, bytes)) = &self.current {
            write!(f, "; {name} archived up to byte {bytes}")?;
        }
        if self.gaps > 0 {
            write!(
                f,
                "; {} gap(s) recorded in {}",
                self.gaps,
                manifest::MANIFEST
            )?;
        }
        if let Some(u) = &self.upload {
            write!(f, "; {u}")?;
        }
        Ok(())
    }
}

/// SIGINT and SIGTERM set the returned flag (the archiver then stops in order).
pub fn stop_on_signals() -> std::io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the first is being handled ends the process at once.
        signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&flag))?;
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    Ok(flag)
}

/// Runs the archiver until `stop` is set (or, with `--once`, until the server's
/// current end is archived); with `--upload`, an uploader thread follows it.
pub fn run(
    target: &Target,
    options: &ArchiveOptions,
    repo: &RepoOptions,
    stop: &AtomicBool,
    mut events: impl FnMut(ArchiveEvent) + Send,
) -> Result<ArchiveSummary, ArchiveError> {
    let program = streamer::program(options.mariadb_binlog.as_deref())?;
    let dir = if options.dir.is_absolute() {
        options.dir.clone()
    } else {
        std::env::current_dir()
            .map_err(|e| ArchiveError::Refused(format!("cannot resolve --dir: {e}")))?
            .join(&options.dir)
    };
    let refused = |e: crate::repo::RepoError| ArchiveError::Refused(e.to_string());
    let mut uploader = options
        .upload
        .as_deref()
        .map(|url| upload::Uploader::new(url, &dir, repo))
        .transpose()
        .map_err(refused)?;
    let mut db = Db::connect(target)?;
    let (facts, identity) = preflight(&mut db)?;
    let server_id = options
        .archiver_server_id
        .unwrap_or_else(|| default_server_id(&dir, &identity));
    if u64::from(server_id) == facts.server_id {
        return Err(ArchiveError::Refused(format!(
            "--archiver-server-id {server_id} is the server's own server_id; pick another"
        )));
    }
    let archive = Archive::open(&dir, &identity)?;
    if let Some(u) = &mut uploader
        && let Some(why) = u.check(&archive.manifest).map_err(refused)?
    {
        events(ArchiveEvent::Note(format!(
            "{} does not answer now ({why}); archiving starts, and complete files are uploaded when it answers",
            u.url()
        )));
    }
    let events = parking_lot::Mutex::new(events);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // However the archiver ends (a panic included), the uploader makes its last pass.
        let _done = SetOnDrop(&done);
        let uploading = uploader.as_mut().map(|u| {
            let (done, events) = (&done, &events);
            scope.spawn(move || u.follow(stop, done, |e| (events.lock())(e)))
        });
        let mut forward = |e| (events.lock())(e);
        let mut archiver = Archiver {
            target,
            program,
            files_at_start: archive.manifest.files.len(),
            archive,
            caught_up_at: None,
            events: &mut forward,
        };
        let result = if options.once {
            archiver.once(&mut db, stop)
        } else {
            archiver.follow(db, server_id, options.status_interval, stop)
        };
        done.store(true, Ordering::Release);
        let state = uploading.and_then(|h| h.join().ok());
        result.map(|summary| ArchiveSummary {
            upload: state,
            ..summary
        })
    })
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Checks the server can be archived and says which server it is.
fn preflight(db: &mut Db) -> Result<(ServerFacts, ServerIdentity), ArchiveError> {
    let facts = ServerFacts::read(db)?;
    let Some(basename) = facts.log_bin_basename.as_ref().filter(|_| facts.log_bin) else {
        return Err(ArchiveError::Refused(format!(
            "{} writes no binlog (log_bin is OFF), so there is nothing to archive; start it with --log-bin (and a --server-id) to archive its binlogs",
            db.target.describe()
        )));
    };
    let grants: Vec<String> = db
        .rows("SHOW GRANTS FOR CURRENT_USER()")?
        .into_iter()
        .filter_map(|r| r.into_values().next().flatten())
        .collect();
    let missing = server::missing_privileges(&grants, NEEDED);
    if !missing.is_empty() {
        return Err(ArchiveError::Refused(format!(
            "user {:?} lacks what the archiver needs: {}",
            db.target.user,
            missing.join("; ")
        )));
    }
    let server_uuid = match facts.flavor {
        Flavor::MariaDb => None,
        _ => db.value("SELECT @@GLOBAL.server_uuid")?,
    };
    let identity = ServerIdentity {
        server_id: facts.server_id,
        hostname: facts.hostname.clone(),
        binlog_basename: basename
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        server_uuid,
    };
    Ok((facts, identity))
}

/// A server_id for the archiver that no ordinary replica uses: above 2^31, fixed for
/// one archive directory so that a restarted archiver replaces its own old dump.
fn default_server_id(dir: &std::path::Path, identity: &ServerIdentity) -> u32 {
    let mut h = blake3::Hasher::new();
    h.update(dir.as_os_str().as_encoded_bytes());
    h.update(identity.hostname.as_bytes());
    let [a, b, c, d, ..] = *h.finalize().as_bytes();
    let n = u32::from_le_bytes([a, b, c, d]);
    0x8000_0000 | (n & 0x7fff_fffe)
}
