//! The validity point itself (DESIGN §4): prepare, block commits, make the engine log
//! cover every commit, read the coordinates, stop capture, release; and, after a
//! failure, the release that leaves the server unlocked.

use std::time::{Duration, Instant};

use crate::client::{ClientError, StagedClient};
use crate::control::Report;
use crate::db::coordinates::{self, Coordinates, ReplicaConnection};
use crate::db::flavor::{Dialect, Plan};
use crate::db::{DbError, Row, Sql};

use super::safe_slave::SqlThreads;
use super::{BackupError, BackupOptions, Event, LockTimes};

/// The replication connections, listed before anything is locked; none without the
/// privilege to list them (the privilege check then names it).
pub(super) fn replica_connections(
    db: &mut impl Sql,
    dialect: Dialect,
) -> Result<Vec<ReplicaConnection>, DbError> {
    match db.rows(dialect.replica_status()) {
        Ok(rows) => Ok(coordinates::connections(dialect, &rows)),
        Err(DbError::Query { code: 1227, .. }) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Where the capture stops: the agent's staged session, or a recording in the tests.
pub(super) trait CaptureStop {
    /// Stops capture at this instant (the validity point), reporting late copy work.
    fn stop(&mut self, progress: &mut dyn FnMut(&Report)) -> Result<(), ClientError>;
}

impl CaptureStop for StagedClient {
    fn stop(&mut self, progress: &mut dyn FnMut(&Report)) -> Result<(), ClientError> {
        StagedClient::stop(self, progress).map(drop)
    }
}

/// The validity point with its promise: whatever fails, no lock stays (the release
/// statements run, or the connection closes) and every SQL thread the backup stopped
/// runs again.
pub(super) fn at_validity_point(
    db: &mut impl Sql,
    capture: &mut impl CaptureStop,
    plan: &Plan,
    options: &BackupOptions,
    replicas: &[ReplicaConnection],
    events: &mut impl FnMut(Event<'_>),
) -> Result<(Coordinates, LockTimes), BackupError> {
    let mut sql_threads = SqlThreads::new(plan.dialect);
    let outcome = validity_point(
        db,
        capture,
        plan,
        options,
        replicas,
        &mut sql_threads,
        events,
    );
    if outcome.is_err() {
        release_after_failure(db, plan);
    }
    match (outcome, sql_threads.restore(db)) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(restart)) => Err(restart),
        (Err(e), restarted) => {
            // The first failure is the one to report; a thread left stopped must still
            // be told.
            if let Err(restart) = restarted {
                events(Event::Note(restart.to_string()));
            }
            Err(e)
        }
    }
}

fn validity_point(
    db: &mut impl Sql,
    capture: &mut impl CaptureStop,
    plan: &Plan,
    options: &BackupOptions,
    replicas: &[ReplicaConnection],
    sql_threads: &mut SqlThreads,
    events: &mut impl FnMut(Event<'_>),
) -> Result<(Coordinates, LockTimes), BackupError> {
    let mut lock = LockTimes::default();
    db.exec(&format!(
        "SET SESSION lock_wait_timeout = {}",
        options.lock_wait_timeout.max(1)
    ))?;
    if options.safe_slave_backup && !replicas.iter().any(|r| r.sql_running) {
        if !replicas.is_empty() {
            events(Event::Note(
                "--safe-slave-backup: no replication SQL thread runs, so no temporary table can close; not waiting".into(),
            ));
        }
    } else if options.safe_slave_backup {
        events(Event::Note(
            "waiting for the replica's temporary tables to close".into(),
        ));
        sql_threads.stop_until_no_temp_tables(
            db,
            replicas,
            Duration::from_secs(options.safe_slave_backup_timeout),
        )?;
    }
    pause_point("copied");
    for sql in &plan.prepare {
        timed(db, sql, &mut lock).map_err(|e| lock_wait(db, sql, options, e))?;
    }
    // Write the engine log once before commits are blocked, so that under the block
    // only the last few milliseconds of it remain to be written.
    sync_engine_log(db, plan, &mut lock)?;
    for sql in &plan.block_commits {
        timed(db, sql, &mut lock).map_err(|e| lock_wait(db, sql, options, e))?;
    }
    let blocked = Instant::now();
    pause_point("block_commit");
    sync_engine_log(db, plan, &mut lock)?;
    let mut coords = Coordinates::default();
    let reading = Instant::now();
    if !plan.binlog_coordinates.is_empty() {
        let answers = answers(db, &plan.binlog_coordinates)?;
        coords.binlog = Some(
            coordinates::binlog_position(plan.dialect, &answers)
                .map_err(|e| BackupError::AtValidityPoint(e.to_string()))?,
        );
    }
    if !plan.replica_coordinates.is_empty() {
        let answers = answers(db, &plan.replica_coordinates)?;
        (coords.replication, coords.replica_gtid) =
            coordinates::replica_coordinates(plan.dialect, &answers);
        // As they were before safe-slave stopped anything.
        for c in &mut coords.replication {
            if let Some(before) = replicas.iter().find(|r| r.name == c.name) {
                c.sql_running = before.sql_running;
            }
        }
    }
    lock.stages
        .push(("read coordinates".into(), ms(reading.elapsed())));
    let stopping = Instant::now();
    capture.stop(&mut |r| events(Event::Copy(r)))?;
    lock.stages.push((
        "stop capture (the validity point)".into(),
        ms(stopping.elapsed()),
    ));
    for sql in &plan.release {
        timed(db, sql, &mut lock)?;
    }
    lock.commit_block_ms = ms(blocked.elapsed());
    Ok((coords, lock))
}

/// The rows each statement returned, in order.
fn answers(db: &mut impl Sql, statements: &[String]) -> Result<Vec<Vec<Row>>, DbError> {
    statements.iter().map(|sql| db.rows(sql)).collect()
}

/// Runs the plan's engine-log write. When its last statement puts back a setting the
/// first one raised (`SET GLOBAL`), that one runs even if a statement before it failed:
/// the server never keeps the raised setting.
fn sync_engine_log(db: &mut impl Sql, plan: &Plan, lock: &mut LockTimes) -> Result<(), DbError> {
    let steps = plan.sync_engine_log.as_slice();
    let (body, restore) = match steps.split_last() {
        Some((last, rest)) if !rest.is_empty() && last.starts_with("SET GLOBAL") => {
            (rest, Some(last))
        }
        _ => (steps, None),
    };
    let result = body.iter().try_for_each(|sql| timed(db, sql, lock));
    match restore {
        Some(sql) => result.and(timed(db, sql, lock)),
        None => result,
    }
}

fn timed(db: &mut impl Sql, sql: &str, lock: &mut LockTimes) -> Result<(), DbError> {
    let t = Instant::now();
    db.exec(sql)?;
    lock.stages
        .push((sql.to_string(), t.elapsed().as_secs_f64() * 1000.0));
    Ok(())
}

/// A lock-wait timeout, with the statement that held the lock named.
fn lock_wait(db: &mut impl Sql, sql: &str, options: &BackupOptions, e: DbError) -> BackupError {
    if e.code() != Some(1205) {
        return e.into();
    }
    let blocker = db
        .rows(
            "SELECT ID, USER, TIME, INFO FROM information_schema.PROCESSLIST \
             WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Sleep', 'Daemon', 'Binlog Dump') \
             AND INFO IS NOT NULL ORDER BY TIME DESC LIMIT 1",
        )
        .ok()
        .and_then(|rows| rows.into_iter().next())
        .map(|r| {
            let get = |k: &str| r.get(k).cloned().flatten().unwrap_or_default();
            format!(
                " behind connection {} of {} running for {}s: {}",
                get("ID"),
                get("USER"),
                get("TIME"),
                get("INFO")
            )
        })
        .unwrap_or_default();
    BackupError::LockWait {
        stage: sql.to_string(),
        timeout: options.lock_wait_timeout,
        blocker,
    }
}

/// Ends every stage after a failure (a success released them, timed, in
/// `validity_point`). Errors are ignored: a connection that failed releases its locks
/// by closing.
fn release_after_failure(db: &mut impl Sql, plan: &Plan) {
    for sql in &plan.release {
        let _ = db.exec(sql);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Fault injection for the tests: with `HOTBACKUP_TEST_PAUSE_AT=<point>` in the
/// environment the coordinator announces the point on stderr and waits there (for a
/// test to kill it). Points: `copied` (before any lock), `block_commit` (commits blocked).
fn pause_point(point: &str) {
    if std::env::var("HOTBACKUP_TEST_PAUSE_AT").is_ok_and(|p| p == point) {
        eprintln!("hotbackup: paused at {point}");
        std::thread::sleep(Duration::from_secs(120));
    }
}
