//! `--safe-slave-backup`: the replication SQL threads stopped until no temporary table
//! is open, and started again afterwards, each connection back to its state before.

use std::time::{Duration, Instant};

use crate::db::coordinates::ReplicaConnection;
use crate::db::flavor::{Dialect, ThreadVerb};
use crate::db::{DbError, Sql};

use super::BackupError;

/// The replication SQL threads the backup stopped, to be started again.
pub(super) struct SqlThreads {
    dialect: Dialect,
    stopped: Vec<String>,
}

impl SqlThreads {
    pub(super) fn new(dialect: Dialect) -> SqlThreads {
        SqlThreads {
            dialect,
            stopped: Vec::new(),
        }
    }

    fn stop(&mut self, db: &mut impl Sql, name: &str) -> Result<(), DbError> {
        db.exec(&self.dialect.sql_thread(ThreadVerb::Stop, name))?;
        if !self.stopped.iter().any(|n| n == name) {
            self.stopped.push(name.to_string());
        }
        Ok(())
    }

    /// Starts every stopped thread; one that fails does not keep the others stopped.
    fn start_all(&self, db: &mut impl Sql) -> Result<(), DbError> {
        let mut first_error = None;
        for name in &self.stopped {
            if let Err(e) = db.exec(&self.dialect.sql_thread(ThreadVerb::Start, name)) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Stops every running SQL thread and waits until the replica has no temporary table
    /// open, letting them run briefly between checks, up to `timeout`.
    pub(super) fn stop_until_no_temp_tables(
        &mut self,
        db: &mut impl Sql,
        replicas: &[ReplicaConnection],
        timeout: Duration,
    ) -> Result<(), BackupError> {
        let deadline = Instant::now() + timeout;
        loop {
            for r in replicas.iter().filter(|r| r.sql_running) {
                self.stop(db, &r.name)?;
            }
            let open: u64 = db
                .rows(self.dialect.open_temp_tables())?
                .first()
                .and_then(|r| r.get("Value").cloned().flatten())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if open == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(BackupError::Refused(format!(
                    "the replica still had {open} temporary table(s) open after --safe-slave-backup-timeout ({}s); its SQL threads run again; retry later or raise the timeout",
                    timeout.as_secs()
                )));
            }
            self.start_all(db)?;
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Starts again what was stopped (each connection back to its state before).
    pub(super) fn restore(&mut self, db: &mut impl Sql) -> Result<(), BackupError> {
        let result = self.start_all(db);
        let by_hand: Vec<String> = std::mem::take(&mut self.stopped)
            .iter()
            .map(|name| self.dialect.sql_thread(ThreadVerb::Start, name))
            .collect();
        result.map_err(|e| {
            BackupError::AtValidityPoint(format!(
                "could not restart a replication SQL thread the backup stopped ({e}); run {}",
                by_hand.join("; ")
            ))
        })
    }
}
