//! The archiver at work: reconciles the archive with the server, runs and supervises
//! the streamer (fsync every tick, completed files archived, what is at risk
//! measured), and reconnects when the server goes away.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::binlog::{same_gtid_state, split_name};
use super::plan::{self, ServerLog};
use super::store::{self, Archive};
use super::streamer::{Mode, Streamer};
use super::{ArchiveError, ArchiveEvent, ArchiveSummary, preflight};
use crate::db::{Db, DbError, Sql, Target, quote};

/// How often the partial files are fsynced and the server's position is read.
pub const TICK: Duration = Duration::from_secs(1);
/// A streamer that receives nothing for this long while the server writes is restarted.
const STALL: Duration = Duration::from_secs(30);
/// The first and the longest wait before reconnecting.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// After this many failures in a row without catching up, say so again (once).
const FAILURES_WORTH_A_WORD: u32 = 5;
/// How many archived files still on the server have their GTID list compared.
const CONTENT_CHECKS: usize = 8;

/// The binlog files the server lists, oldest first.
fn binary_logs(db: &mut Db) -> Result<Vec<ServerLog>, DbError> {
    Ok(db
        .rows("SHOW BINARY LOGS")?
        .into_iter()
        .map(|r| ServerLog {
            name: r.get("Log_name").cloned().flatten().unwrap_or_default(),
            size: r
                .get("File_size")
                .cloned()
                .flatten()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        })
        .collect())
}

/// The server's current binlog file and position.
fn master_position(db: &mut Db) -> Result<Option<(String, u64)>, DbError> {
    let rows = db.rows("SHOW MASTER STATUS")?;
    Ok(rows.first().and_then(|r| {
        let file = r.get("File").cloned().flatten()?;
        let pos = r.get("Position").cloned().flatten()?.parse().ok()?;
        Some((file, pos))
    }))
}

/// The server went away (or is going): worth reconnecting rather than giving up.
fn going_away(e: &DbError) -> bool {
    // 1053: server shutdown in progress; 1927: connection killed.
    matches!(
        e,
        DbError::Lost { .. }
            | DbError::Unreachable { .. }
            | DbError::Query {
                code: 1053 | 1927,
                ..
            }
    )
}

/// The number in a binlog name, for ordering (names outgrow six digits).
fn number(name: &str) -> u64 {
    split_name(name).map_or(0, |(_, n)| n)
}

/// Why following the server stopped.
enum Interrupted {
    /// SIGINT/SIGTERM.
    Stopped,
    /// The server or the streamer went away; worth reconnecting.
    Lost(String),
}

pub(super) struct Archiver<'a, F: FnMut(ArchiveEvent)> {
    pub target: &'a Target,
    pub program: PathBuf,
    pub archive: Archive,
    pub files_at_start: usize,
    /// When the server's position was last proven on disk (this connection).
    pub caught_up_at: Option<Instant>,
    pub events: &'a mut F,
}

impl<F: FnMut(ArchiveEvent)> Archiver<'_, F> {
    fn note(&mut self, text: String) {
        (self.events)(ArchiveEvent::Note(text));
    }

    /// `--once`: the server's files up to its current end, then done.
    pub fn once(&mut self, db: &mut Db, stop: &AtomicBool) -> Result<ArchiveSummary, ArchiveError> {
        let (plan, server) = self.reconcile(db)?;
        let partial = std::fs::metadata(self.archive.partial_path(&plan.start)).map(|m| m.len());
        // Nothing new since the last run: do not stream the current file again.
        let up_to_date = server
            .last()
            .is_some_and(|n| n.name == plan.start && partial.is_ok_and(|p| p == n.size));
        if !up_to_date {
            self.archive.keep_previous(&plan.rewrite)?;
            let mut streamer = self.start_streamer(&plan.start, Mode::ToCurrentEnd)?;
            loop {
                if stop.load(Ordering::Relaxed) {
                    streamer.stop();
                    break;
                }
                if let Some(status) = streamer.exited() {
                    if !status.success() {
                        let words = streamer.last_words();
                        self.archive.sync_partials()?;
                        return Err(ArchiveError::Streamer(format!("{status}: {words}")));
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.archive.sync_partials()?;
        if !stop.load(Ordering::Relaxed) {
            let server = binary_logs(db)?;
            self.finalize_rotated(&server)?;
        }
        self.summary()
    }

    /// Continuous archiving until stopped: stream, supervise, reconnect.
    pub fn follow(
        &mut self,
        mut db: Db,
        server_id: u32,
        status_interval: u64,
        stop: &AtomicBool,
    ) -> Result<ArchiveSummary, ArchiveError> {
        let mut first = true;
        // Failures in a row since the archive last caught up with the server.
        let mut failures = 0u32;
        loop {
            let streaming = self.reconcile(&mut db).and_then(|(plan, _)| {
                if first {
                    first = false;
                    self.note(format!(
                        "archiving into {} from {}; the archive is fsynced every {} s, so once caught up at most ~{} s of commits are at risk",
                        self.archive.dir.display(),
                        plan.start,
                        TICK.as_secs(),
                        TICK.as_secs()
                    ));
                }
                self.archive.keep_previous(&plan.rewrite)?;
                self.start_streamer(&plan.start, Mode::Follow { server_id })
            });
            let outcome = match streaming {
                Ok(mut streamer) => {
                    let outcome = self.supervise(&mut db, &mut streamer, status_interval, stop);
                    streamer.stop();
                    self.archive.sync_partials()?;
                    outcome?
                }
                Err(ArchiveError::Db(e)) if going_away(&e) => Interrupted::Lost(e.to_string()),
                Err(e) => return Err(e),
            };
            let why = match outcome {
                Interrupted::Stopped => {
                    // Files the server rotated past while we stopped are archived now.
                    if let Ok(server) = binary_logs(&mut db) {
                        self.finalize_rotated(&server)?;
                    }
                    return self.summary();
                }
                Interrupted::Lost(why) => why,
            };
            if self.caught_up_at.take().is_some() {
                failures = 0;
            }
            failures += 1;
            // One word per outage, not one per attempt.
            if failures == 1 {
                self.note(format!(
                    "lost the server ({why}); reconnecting, retrying every few seconds"
                ));
            } else if failures == FAILURES_WORTH_A_WORD {
                self.note(format!(
                    "still not streaming after {failures} attempts ({why}); retrying every {} s",
                    MAX_BACKOFF.as_secs()
                ));
            }
            let pause = FIRST_BACKOFF
                .saturating_mul(1 << failures.min(5))
                .min(MAX_BACKOFF);
            match self.reconnect(stop, pause)? {
                Some(new) => db = new,
                None => return self.summary(),
            }
            if failures == 1 {
                self.note("reconnected to the server; resuming".into());
            }
        }
    }

    /// Connects again with growing pauses until it works or `stop` is set; a server
    /// that answers but may no longer be archived (another server, no binlog, no
    /// privilege, a wrong password) ends the run.
    fn reconnect(
        &mut self,
        stop: &AtomicBool,
        mut pause: Duration,
    ) -> Result<Option<Db>, ArchiveError> {
        loop {
            let deadline = Instant::now() + pause;
            while Instant::now() < deadline {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let connected = Db::connect(self.target)
                .map_err(ArchiveError::from)
                .and_then(|mut db| Ok((preflight(&mut db)?, db)));
            match connected {
                Ok(((_, identity), db)) if identity == self.archive.manifest.server => {
                    return Ok(Some(db));
                }
                Ok(((_, identity), _)) => {
                    return Err(ArchiveError::Refused(format!(
                        "after reconnecting, {} is another server ({identity}) than the one archived in {} ({})",
                        self.target.describe(),
                        self.archive.dir.display(),
                        self.archive.manifest.server
                    )));
                }
                // A server starting up or going down answers with errors for a while.
                Err(ArchiveError::Db(
                    DbError::Unreachable { .. } | DbError::Lost { .. } | DbError::Query { .. },
                )) => {}
                Err(e) => return Err(e),
            }
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }

    fn start_streamer(&mut self, start: &str, mode: Mode) -> Result<Streamer, ArchiveError> {
        Streamer::spawn(
            &self.program,
            self.target,
            self.archive.partial_dir(),
            start,
            mode,
        )
    }

    /// Compares the archive with the server, archives what is complete, records gaps;
    /// returns the plan (where streaming starts) and the server's list.
    fn reconcile(&mut self, db: &mut Db) -> Result<(plan::Plan, Vec<ServerLog>), ArchiveError> {
        let server = binary_logs(db)?;
        self.check_contents(db, &server)?;
        let partials = self
            .archive
            .partials(|name| server.iter().any(|s| s.name == name))?;
        let plan = plan::reconcile(&self.archive.archived(), &server, &partials)
            .map_err(ArchiveError::Diverged)?;
        for name in &plan.stale {
            self.archive.remove_partial(name)?;
        }
        for (name, size) in &plan.finalize {
            self.archive.finalize(name, *size)?;
        }
        let mut kept = Vec::new();
        for name in &plan.lost {
            let bytes = self.archive.keep_incomplete(name)?;
            kept.push(format!(
                "{name} was archived only up to byte {bytes}, kept as {name}{}",
                store::INCOMPLETE
            ));
        }
        if let (Some(first), Some(last)) = (plan.gap.first(), plan.gap.last()) {
            let mut detail = format!(
                "purged from the server before they were archived: point-in-time recovery cannot cross from before {first} to after {last}"
            );
            if !kept.is_empty() {
                detail.push_str(&format!(" ({})", kept.join("; ")));
            }
            let text = format!("GAP in the archive: {} {detail}", plan.gap.join(", "));
            self.archive.record_gap(plan.gap.clone(), detail)?;
            (self.events)(ArchiveEvent::Gap(text));
        }
        Ok((plan, server))
    }

    /// The newest archived files the server still has must start at the same GTID
    /// state as the server's (the sizes are compared by the plan).
    fn check_contents(&mut self, db: &mut Db, server: &[ServerLog]) -> Result<(), ArchiveError> {
        let both: Vec<(String, String)> = self
            .archive
            .manifest
            .files
            .iter()
            .rev()
            .filter(|f| server.iter().any(|s| s.name == f.name))
            .take(CONTENT_CHECKS)
            .filter_map(|f| Some((f.name.clone(), f.gtid_list_at_start.clone()?)))
            .collect();
        for (name, ours) in both {
            let rows = db.rows(&format!("SHOW BINLOG EVENTS IN {} LIMIT 4", quote(&name)))?;
            let theirs = rows.iter().find_map(|r| {
                (r.get("Event_type").cloned().flatten().as_deref() == Some("Gtid_list"))
                    .then(|| r.get("Info").cloned().flatten().unwrap_or_default())
            });
            if let Some(theirs) = theirs
                && !same_gtid_state(&theirs, &ours)
            {
                return Err(ArchiveError::Diverged(format!(
                    "the server's {name} starts at GTID state {theirs} but the archived one at {ours}: the server's binlogs are not the ones archived here (RESET MASTER, or a different server); archive it into a new --dir"
                )));
            }
        }
        Ok(())
    }

    /// Archives every partial file the server has rotated past.
    fn finalize_rotated(&mut self, server: &[ServerLog]) -> Result<(), ArchiveError> {
        let Some(newest) = server.last() else {
            return Ok(());
        };
        let mut partials = self.archive.partials(|_| true)?;
        partials.sort_by_key(|p| number(&p.name));
        for p in partials {
            let Some(s) = server.iter().find(|s| s.name == p.name) else {
                continue;
            };
            let done = self.archive.manifest.files.iter().any(|f| f.name == p.name);
            if s.name != newest.name && s.size == p.size && !done {
                self.archive.finalize(&p.name, Some(s.size))?;
            }
        }
        Ok(())
    }

    /// Follows the streamer: fsync every tick, archive completed files, measure what
    /// is at risk, print status; returns when stopped or when the server is lost.
    fn supervise(
        &mut self,
        db: &mut Db,
        streamer: &mut Streamer,
        status_interval: u64,
        stop: &AtomicBool,
    ) -> Result<Interrupted, ArchiveError> {
        let mut next_tick = Instant::now();
        let mut next_status = Instant::now() + Duration::from_secs(status_interval);
        let mut streamed: BTreeMap<String, u64> = BTreeMap::new();
        let mut streamed_at = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(Interrupted::Stopped);
            }
            if let Some(status) = streamer.exited() {
                let words = streamer.last_words();
                return Ok(Interrupted::Lost(if words.is_empty() {
                    format!("mariadb-binlog exited with {status}")
                } else {
                    format!("mariadb-binlog: {words}")
                }));
            }
            if Instant::now() < next_tick {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            next_tick += TICK;
            // The position first: once the bytes on disk reach it, every commit before
            // this instant is in the archive.
            let asked_at = Instant::now();
            let queried = master_position(db).and_then(|p| Ok((p, binary_logs(db)?)));
            let (position, server) = match queried {
                Ok(v) => v,
                Err(e) => return Ok(Interrupted::Lost(e.to_string())),
            };
            let durable = self.archive.sync_partials()?;
            self.finalize_rotated(&server)?;
            let Some((file, pos)) = position else {
                continue;
            };
            let archived = self.archive.manifest.files.iter().any(|f| f.name == file);
            let have = durable.get(&file).copied().unwrap_or(0);
            if archived || have >= pos {
                if self.caught_up_at.is_none() {
                    self.note(format!(
                        "caught up with the server at {file}:{pos}; at most ~{} s of commits at risk",
                        TICK.as_secs()
                    ));
                }
                self.caught_up_at = Some(asked_at);
            }
            // Progress is what the streamer itself wrote (a kept previous copy hides
            // the growth of a file streamed again).
            if self.archive.streamed() != &streamed {
                streamed = self.archive.streamed().clone();
                streamed_at = Instant::now();
            } else if !archived && have < pos && streamed_at.elapsed() > STALL {
                return Ok(Interrupted::Lost(format!(
                    "mariadb-binlog received nothing for {} s while the server wrote up to {file}:{pos}",
                    STALL.as_secs()
                )));
            }
            if status_interval > 0 && Instant::now() >= next_status {
                next_status = Instant::now() + Duration::from_secs(status_interval);
                let risk = match self.caught_up_at {
                    Some(t) => format!(
                        "at most ~{} s of commits at risk",
                        t.elapsed().as_secs().max(TICK.as_secs())
                    ),
                    None => "not caught up yet".into(),
                };
                let text = format!(
                    "{} complete file(s) archived; {file} archived up to byte {have} of {pos}; {risk}",
                    self.archive.manifest.files.len()
                );
                (self.events)(ArchiveEvent::Status(text));
            }
        }
    }

    pub fn summary(&mut self) -> Result<ArchiveSummary, ArchiveError> {
        let durable = self.archive.sync_partials()?;
        let m = &self.archive.manifest;
        Ok(ArchiveSummary {
            dir: self.archive.dir.clone(),
            archived_now: m.files.len().saturating_sub(self.files_at_start),
            files: m.files.len(),
            gaps: m.gaps.len(),
            current: durable.into_iter().max_by_key(|(name, _)| number(name)),
            upload: None,
        })
    }
}
