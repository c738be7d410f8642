//! Proving a replica matches its source: both are read at one GTID, without locking the
//! source. The source opens a consistent snapshot (MariaDB gives the binlog position
//! that belongs to it, `binlog_snapshot_file/position`); the replica is run up to
//! exactly that position and stopped there; then CHECKSUM TABLE of every table on both.
//! Tables of non-transactional engines are read live on the source: if one of them
//! changes while it is compared, that is reported as such, not as a divergence.

use serde::Serialize;

use super::{ReplicaError, ReplicaEvent, status_of};
use crate::db::{Db, Sql, Target, quote};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TableComparison {
    pub table: String,
    pub engine: String,
    pub source: Option<String>,
    pub replica: Option<String>,
    /// A non-transactional table that changed on the source while it was compared.
    pub unstable: bool,
}

impl TableComparison {
    pub fn equal(&self) -> bool {
        self.unstable || (self.source.is_some() && self.source == self.replica)
    }
}

/// Compares every table of the replica (`db`) with the source at one GTID, then lets
/// the replica run on. Returns the GTID and each table's result.
pub fn compare_at_one_gtid(
    db: &mut Db,
    source: &Target,
    connection: &str,
    events: &mut impl FnMut(ReplicaEvent<'_>),
) -> Result<(String, Vec<TableComparison>), ReplicaError> {
    let mut src = Db::connect(source)?;
    src.exec("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")?;
    src.exec("START TRANSACTION WITH CONSISTENT SNAPSHOT")?;
    let status = src.rows("SHOW STATUS LIKE 'binlog_snapshot_%'")?;
    let get = |name: &str| {
        status
            .iter()
            .find(|r| {
                r.get("Variable_name")
                    .cloned()
                    .flatten()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .and_then(|r| r.get("Value").cloned().flatten())
            .unwrap_or_default()
    };
    let (file, pos) = (get("binlog_snapshot_file"), get("binlog_snapshot_position"));
    if file.is_empty() {
        return Err(ReplicaError::Refused(
            "the source reports no binlog snapshot position (is its binlog enabled?); cannot compare at one point".into(),
        ));
    }
    let gtid = src
        .value(&format!(
            "SELECT BINLOG_GTID_POS({}, {})",
            quote(&file),
            pos.parse::<u64>().unwrap_or(0)
        ))?
        .unwrap_or_default();
    events(ReplicaEvent::Note(&format!(
        "comparing at the source's GTID {gtid} ({file} at {pos})"
    )));
    let name = if connection.is_empty() {
        String::new()
    } else {
        format!(" {}", quote(connection))
    };
    let uses_gtid = status_of(db, connection)?.uses_gtid;
    db.exec(&format!("STOP SLAVE{name}"))?;
    let until = if uses_gtid {
        format!("MASTER_GTID_POS = {}", quote(&gtid))
    } else {
        format!("MASTER_LOG_FILE = {}, MASTER_LOG_POS = {pos}", quote(&file))
    };
    db.exec(&format!("START SLAVE{name} UNTIL {until}"))?;
    let wait = if uses_gtid {
        format!("SELECT MASTER_GTID_WAIT({}, {WAIT_SECS})", quote(&gtid))
    } else {
        format!(
            "SELECT MASTER_POS_WAIT({}, {pos}, {WAIT_SECS}, {})",
            quote(&file),
            quote(connection)
        )
    };
    let outcome =
        reach_and_stop(db, connection, &name, &wait).and_then(|()| checksum_all(db, &mut src));
    // Whatever happened: the replica runs on, the snapshot ends.
    let _ = db.exec(&format!("START SLAVE{name}"));
    let _ = src.exec("COMMIT");
    Ok((gtid, outcome?))
}

/// Waits until the replica has applied everything up to the UNTIL position, then stops
/// it there. (The UNTIL condition alone stops the SQL thread only when an event past
/// it arrives: on a quiet source it would run on, waiting.)
fn reach_and_stop(
    db: &mut Db,
    connection: &str,
    name: &str,
    wait: &str,
) -> Result<(), ReplicaError> {
    let reached = db.value(wait)?;
    match reached.as_deref() {
        Some(v) if !v.starts_with('-') => {}
        _ => {
            let s = status_of(db, connection)?;
            return Err(if s.error.is_empty() {
                ReplicaError::Timeout(WAIT_SECS)
            } else {
                ReplicaError::Stopped(s.error)
            });
        }
    }
    db.exec(&format!("STOP SLAVE{name}"))?;
    Ok(())
}

const WAIT_SECS: u64 = 600;

fn checksum_all(db: &mut Db, src: &mut Db) -> Result<Vec<TableComparison>, ReplicaError> {
    let tables = src.rows(
        "SELECT TABLE_SCHEMA, TABLE_NAME, ENGINE FROM information_schema.TABLES \
         WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN \
         ('mysql', 'information_schema', 'performance_schema', 'sys') ORDER BY 1, 2",
    )?;
    let mut out = Vec::new();
    for t in tables {
        let get = |k: &str| t.get(k).cloned().flatten().unwrap_or_default();
        let table = format!("`{}`.`{}`", get("TABLE_SCHEMA"), get("TABLE_NAME"));
        let engine = get("ENGINE");
        let sql = format!("CHECKSUM TABLE {table} EXTENDED");
        let sum = |db: &mut Db| -> Result<Option<String>, ReplicaError> {
            Ok(db
                .rows(&sql)?
                .first()
                .and_then(|r| r.get("Checksum").cloned().flatten()))
        };
        let source = sum(src)?;
        let replica = sum(db)?;
        let transactional = engine.eq_ignore_ascii_case("InnoDB");
        let unstable = !transactional && source != replica && sum(src)? != source;
        out.push(TableComparison {
            table,
            engine,
            source,
            replica,
            unstable,
        });
    }
    Ok(out)
}
