//! The validity point of each flavor against a transcript of its server (`transcripts/`:
//! MariaDB recorded from a real 10.11 server, MySQL 8.0.36, Percona 5.7.44 and 8.0.35 in
//! the shape theirs print): the preflight listing, then prepare → engine log → block →
//! coordinates → stop → release. Replay is strict, so a passing test means the backup
//! sent exactly the recorded statements, in order, with the capture stop where the
//! recording has it; each test then checks what was read and written from them.

use std::time::Duration;

use super::validity::{CaptureStop, at_validity_point, replica_connections};
use super::{BackupError, BackupOptions, Event, LockTimes};
use crate::client::ClientError;
use crate::control::Report;
use crate::db::DbError;
use crate::db::coordinates::{self, Coordinates, ReplicaConnection};
use crate::db::flavor::{self, Dialect, Flavor, Plan, PlanFacts};
use crate::db::transcript::{self, STOP, Transcript};

/// A recording of `transcripts/`, by name.
macro_rules! recording {
    ($name:literal) => {
        ($name, include_str!(concat!("transcripts/", $name, ".txt")))
    };
}

impl CaptureStop for transcript::Capture {
    fn stop(&mut self, _progress: &mut dyn FnMut(&Report)) -> Result<(), ClientError> {
        self.record_stop();
        Ok(())
    }
}

/// The server a recording was made on, and how the backup ran.
struct Setup {
    flavor: Flavor,
    version: (u32, u32),
    options: BackupOptions,
}

impl Setup {
    fn new(flavor: Flavor, version: (u32, u32)) -> Setup {
        Setup {
            flavor,
            version,
            options: BackupOptions::default(),
        }
    }

    fn safe_slave(self) -> Setup {
        Setup {
            options: BackupOptions {
                safe_slave_backup: true,
                ..self.options
            },
            ..self
        }
    }
}

/// A recording played through the preflight listing and the validity point.
struct Played {
    transcript: Transcript,
    plan: Plan,
    outcome: Result<(Coordinates, LockTimes), BackupError>,
    notes: Vec<String>,
}

impl Played {
    fn coordinates(&self) -> &Coordinates {
        match &self.outcome {
            Ok((coords, _)) => coords,
            Err(e) => panic!("the validity point failed: {e}"),
        }
    }

    fn error(&self) -> &BackupError {
        match &self.outcome {
            Err(e) => e,
            Ok(_) => panic!("the validity point succeeded"),
        }
    }

    /// The statement during which the connection was lost.
    fn lost_during(&self) -> &str {
        match self.error() {
            BackupError::Db(DbError::Lost { sql, .. }) => sql,
            other => panic!("not a lost connection: {other}"),
        }
    }

    /// The stage that waited too long, and what it waited behind.
    fn lock_wait(&self) -> (&str, u64, &str) {
        match self.error() {
            BackupError::LockWait {
                stage,
                timeout,
                blocker,
            } => (stage, *timeout, blocker),
            other => panic!("not a lock wait: {other}"),
        }
    }

    fn binlog_info(&self) -> String {
        self.coordinates()
            .binlog
            .as_ref()
            .expect("binlog coordinates")
            .info_line()
    }

    fn slave_info(&self) -> String {
        let c = self.coordinates();
        coordinates::slave_info(self.plan.dialect, &c.replication, &c.replica_gtid)
    }

    /// The capture stopped right after `before` (the last coordinate read) and right
    /// before `after` (the first release).
    fn assert_stop_between(&self, before: &str, after: &str) {
        let sent = self.transcript.sent();
        let at = sent
            .iter()
            .position(|s| s == STOP)
            .expect("the capture stopped");
        assert_eq!(
            (sent[at - 1].as_str(), sent[at + 1].as_str()),
            (before, after)
        );
    }

    /// The statements sent after the one that failed.
    fn sent_after(&self, failed: &str) -> Vec<String> {
        let sent = self.transcript.sent();
        let at = sent.iter().rposition(|s| s == failed).expect("sent");
        sent[at + 1..].to_vec()
    }
}

fn play((name, recording): (&str, &str), setup: Setup) -> Played {
    let mut transcript = Transcript::parse(name, recording);
    let mut capture = transcript.capture();
    let dialect = Dialect::of(setup.flavor, setup.version);
    let replicas = replica_connections(&mut transcript, dialect).expect("preflight listing");
    let plan = flavor::plan(&PlanFacts {
        flavor: setup.flavor,
        version: setup.version,
        flush_log_at_trx_commit: 1,
        binlog: true,
        replica: !replicas.is_empty(),
    });
    let mut notes = Vec::new();
    let outcome = at_validity_point(
        &mut transcript,
        &mut capture,
        &plan,
        &setup.options,
        &replicas,
        &mut |e| {
            if let Event::Note(n) = e {
                notes.push(n)
            }
        },
    );
    transcript.assert_played_out();
    Played {
        transcript,
        plan,
        outcome,
        notes,
    }
}

/// On MySQL the binlog's GTID set (`FILE<TAB>POS` then it) is also the one a server
/// started on the image resumes replication from (gtid_executed).
fn assert_one_gtid_set(played: &Played, file_pos: &str, gtid: &str) {
    assert_eq!(played.binlog_info(), format!("{file_pos}\t{gtid}\n"));
    assert_eq!(played.coordinates().replica_gtid, gtid);
}

fn running(replication: &[ReplicaConnection]) -> Vec<(&str, bool)> {
    replication
        .iter()
        .map(|c| (c.name.as_str(), c.sql_running))
        .collect()
}

#[test]
fn mariadb_10_11_replica_with_safe_slave_records_both_sources() {
    let played = play(
        recording!("mariadb-10.11-replica-safe-slave"),
        Setup::new(Flavor::MariaDb, (10, 11)).safe_slave(),
    );
    played.assert_stop_between("SELECT @@GLOBAL.gtid_slave_pos", "BACKUP STAGE END");
    assert_eq!(played.binlog_info(), "mysql-bin.000001\t1403\t0-1-6\n");
    let c = played.coordinates();
    assert_eq!(c.replica_gtid, "0-1-6");
    // As they were before the backup stopped the default connection's SQL thread.
    assert_eq!(running(&c.replication), [("", true), ("east", false)]);
    assert_eq!(
        played.slave_info(),
        "SET GLOBAL gtid_slave_pos = '0-1-6';\n\
         CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=33061, MASTER_USE_GTID=slave_pos;\n\
         CHANGE MASTER 'east' TO MASTER_HOST='127.0.0.1', MASTER_PORT=33063, MASTER_LOG_FILE='east-bin.000001', MASTER_LOG_POS=327;\n"
    );
    // Only the thread the backup stopped is started, after the release.
    assert_eq!(
        played.sent_after("BACKUP STAGE END"),
        ["START SLAVE '' SQL_THREAD"]
    );
}

#[test]
fn mariadb_10_11_lock_wait_names_the_blocker_and_still_releases() {
    let played = play(
        recording!("mariadb-10.11-lock-wait"),
        Setup {
            options: BackupOptions {
                lock_wait_timeout: 1,
                ..BackupOptions::default()
            },
            ..Setup::new(Flavor::MariaDb, (10, 11))
        },
    );
    assert_eq!(
        played.lock_wait(),
        (
            "BACKUP STAGE START",
            1,
            " behind connection 9 of root running for 2s: ALTER TABLE app.t ADD COLUMN w4 INT, ALGORITHM=COPY"
        )
    );
    assert!(!played.transcript.sent().contains(&STOP.to_string()));
    assert_eq!(
        played.transcript.sent().last().map(String::as_str),
        Some("BACKUP STAGE END")
    );
}

#[test]
fn mariadb_10_11_lost_connection_under_the_block_still_sends_the_release() {
    let played = play(
        recording!("mariadb-10.11-lost-under-block"),
        Setup::new(Flavor::MariaDb, (10, 11)),
    );
    assert_eq!(played.lost_during(), "FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS");
    assert_eq!(
        played.sent_after("BACKUP STAGE BLOCK_COMMIT"),
        ["FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS", "BACKUP STAGE END"]
    );
}

#[test]
fn percona_57_replica_with_safe_slave_waits_out_a_temp_table_and_uses_executed_gtid_set() {
    let started = std::time::Instant::now();
    let played = play(
        recording!("percona-5.7.44-replica-safe-slave"),
        Setup::new(Flavor::Percona, (5, 7)).safe_slave(),
    );
    // The SQL thread ran again for a moment between the two looks.
    assert!(started.elapsed() >= Duration::from_secs(1));
    played.assert_stop_between("SELECT @@GLOBAL.gtid_executed", "UNLOCK BINLOG");
    let gtid =
        "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-20567,a1b2c3d4-0e1f-11ee-8c99-0242ac120004:1-3";
    assert_one_gtid_set(&played, "mysql-bin.000009\t4871", gtid);
    let c = played.coordinates();
    assert_eq!(running(&c.replication), [("", true), ("east", false)]);
    assert_eq!(
        played.slave_info(),
        format!(
            "SET GLOBAL gtid_purged = '{gtid}';\n\
             CHANGE MASTER TO MASTER_HOST='10.20.0.11', MASTER_PORT=3306, MASTER_AUTO_POSITION=1;\n\
             CHANGE MASTER TO MASTER_HOST='10.20.0.12', MASTER_PORT=3306, MASTER_LOG_FILE='east-bin.000042', MASTER_LOG_POS=1920 FOR CHANNEL 'east';\n"
        )
    );
    assert_eq!(
        played.sent_after("UNLOCK BINLOG"),
        ["UNLOCK TABLES", "START SLAVE SQL_THREAD FOR CHANNEL ''"]
    );
}

#[test]
fn percona_57_lock_wait_at_the_block_releases_and_restores_sql_threads_as_they_were() {
    let played = play(
        recording!("percona-5.7.44-lock-wait-at-block"),
        Setup::new(Flavor::Percona, (5, 7)).safe_slave(),
    );
    match &played.outcome {
        Err(BackupError::LockWait { stage, blocker, .. }) => {
            assert_eq!(stage, "LOCK BINLOG FOR BACKUP");
            assert_eq!(
                blocker,
                " behind connection 48213 of app running for 61s: COMMIT"
            );
        }
        other => panic!("{:?}", other.as_ref().map(|_| ())),
    }
    // Both locks released, then the one SQL thread the backup stopped started: 'east',
    // stopped before the backup, stays stopped.
    let sent = played.sent_after("LOCK BINLOG FOR BACKUP");
    assert_eq!(
        sent[1..],
        [
            "UNLOCK BINLOG",
            "UNLOCK TABLES",
            "START SLAVE SQL_THREAD FOR CHANNEL ''"
        ]
    );
    // Nothing to tell of the SQL threads: they run as before.
    assert_eq!(
        played.notes,
        ["waiting for the replica's temporary tables to close"]
    );
}

#[test]
fn mysql_80_replica_reads_log_status_and_points_a_sibling_by_auto_position() {
    let played = play(
        recording!("mysql-8.0.36-replica-gtid"),
        Setup::new(Flavor::MySql, (8, 0)),
    );
    // InnoDB tables only, and still the read lock: commits stay blocked from before
    // log_status is read until after the stop, the instant the image is.
    assert_eq!(
        played.sent_after("FLUSH NO_WRITE_TO_BINLOG TABLES WITH READ LOCK")[..2],
        [
            "FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS",
            "SELECT LOCAL FROM performance_schema.log_status"
        ]
    );
    played.assert_stop_between("SELECT @@GLOBAL.gtid_executed", "UNLOCK TABLES");
    assert_eq!(played.sent_after("UNLOCK TABLES"), ["UNLOCK INSTANCE"]);
    let gtid =
        "5f2a3b1c-8e0d-11ee-b1a2-0242ac110002:1-1042,7b1c9d4e-8e0d-11ee-9f31-0242ac110003:1-17";
    assert_one_gtid_set(&played, "binlog.000012\t48213", gtid);
    let c = played.coordinates();
    assert_eq!(
        (
            c.replication[0].exec_file.as_str(),
            c.replication[0].exec_position
        ),
        ("binlog.000031", 918273)
    );
    assert_eq!(
        played.slave_info(),
        format!(
            "SET GLOBAL gtid_purged = '{gtid}';\n\
             CHANGE REPLICATION SOURCE TO SOURCE_HOST='db1.internal', SOURCE_PORT=3306, SOURCE_AUTO_POSITION=1;\n"
        )
    );
}

#[test]
fn mysql_80_lost_connection_under_the_lock_still_sends_release_and_restart_and_says_so() {
    let played = play(
        recording!("mysql-8.0.36-lost-under-lock"),
        Setup::new(Flavor::MySql, (8, 0)).safe_slave(),
    );
    assert_eq!(
        played.lost_during(),
        "SELECT LOCAL FROM performance_schema.log_status"
    );
    assert_eq!(
        played.sent_after("SELECT LOCAL FROM performance_schema.log_status"),
        [
            "UNLOCK TABLES",
            "UNLOCK INSTANCE",
            "START REPLICA SQL_THREAD FOR CHANNEL ''"
        ]
    );
    // The thread could not be started again: the operator is told how.
    assert_eq!(played.notes.len(), 2, "{:?}", played.notes);
    assert!(
        played.notes[1].ends_with("run START REPLICA SQL_THREAD FOR CHANNEL ''"),
        "{}",
        played.notes[1]
    );
}

#[test]
fn percona_80_with_myisam_blocks_commits_with_a_read_lock_and_records_file_positions() {
    let played = play(
        recording!("percona-8.0.35-myisam-replica"),
        Setup::new(Flavor::Percona, (8, 0)),
    );
    played.assert_stop_between("SELECT @@GLOBAL.gtid_executed", "UNLOCK TABLES");
    assert_eq!(played.sent_after("UNLOCK TABLES"), ["UNLOCK INSTANCE"]);
    assert_eq!(played.binlog_info(), "binlog.000004\t157\t\n");
    assert_eq!(
        played.slave_info(),
        "CHANGE REPLICATION SOURCE TO SOURCE_HOST='10.30.0.21', SOURCE_PORT=3307, SOURCE_LOG_FILE='east-bin.000118', SOURCE_LOG_POS=2291044 FOR CHANNEL 'east';\n"
    );
}
