//! `replica`: turns a server started on a restored image into a replica, either of the
//! server the backup was taken from (its binlog position, `hotbackup_binlog_info`) or,
//! with `--sibling`, of the source of the replica the backup was taken on (its
//! replication coordinates, `hotbackup_slave_info`). Then, on request, waits until it
//! has caught up and proves it matches its source table by table at one GTID.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::db::coordinates::ReplicaConnection;
use crate::db::{Db, DbError, Sql, Target, quote};
use crate::image::{Image, ImageError};

mod checksums;

pub use checksums::{TableComparison, compare_at_one_gtid};

#[derive(Clone, Debug, Default, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicaOptions {
    /// The source to replicate from (default with --sibling: the one the backup recorded).
    #[arg(long, value_name = "HOST")]
    pub source_host: Option<String>,
    /// The source's port (default with --sibling: the recorded one; otherwise 3306).
    #[arg(long, value_name = "PORT")]
    pub source_port: Option<u16>,
    /// The replication user on the source.
    #[arg(long, value_name = "USER", default_value = "repl")]
    pub source_user: String,
    /// A file whose first line is that user's password (never on the command line).
    #[arg(long, value_name = "FILE")]
    pub source_password_file: Option<PathBuf>,
    /// Replicate from the source of the replica the backup was taken on.
    #[arg(long)]
    pub sibling: bool,
    /// With --sibling on a multi-source replica: which recorded connection.
    #[arg(long, value_name = "NAME")]
    pub connection: Option<String>,
    /// Start from this GTID position instead of the backup's (after a point-in-time
    /// restore: the GTID it reached).
    #[arg(long, value_name = "GTID")]
    pub gtid: Option<String>,
    /// Print the statements and change nothing.
    #[arg(long)]
    pub print_sql: bool,
    /// Wait until the replica has caught up with its source, showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600, value_name = "S")]
    pub wait_timeout: u64,
    /// Afterwards compare CHECKSUM TABLE of every table with the source at one GTID.
    #[arg(long)]
    pub verify_checksums: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Refused(String),
    #[error("replication stopped: {0}")]
    Stopped(String),
    #[error(
        "the replica did not catch up within {0} s; it keeps replicating (see SHOW SLAVE STATUS)"
    )]
    Timeout(u64),
    #[error("the replica differs from its source in {count} table(s): {tables}")]
    Diverged { count: usize, tables: String },
}

/// What `replica` reports as it goes.
pub enum ReplicaEvent<'a> {
    Note(&'a str),
    /// While waiting: the replica's position, the source's, and the reported lag.
    Behind {
        replica: &'a str,
        source: &'a str,
        seconds: Option<u64>,
    },
}

/// The statements that make the server a replica; the password shown masked.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaPlan {
    pub statements: Vec<String>,
    pub source_host: String,
    pub source_port: u16,
    pub connection: String,
    /// The GTID position replication starts from (empty: by file and position).
    pub gtid: String,
}

const MASKED: &str = "<from --source-password-file>";

/// The statements for `image`, with `password` (or a mask) in them.
pub fn plan(
    image: &Image,
    options: &ReplicaOptions,
    password: Option<&str>,
) -> Result<ReplicaPlan, ReplicaError> {
    let password = password.unwrap_or(MASKED);
    let user = &options.source_user;
    let (conn, host, port, position, gtid) = if options.sibling {
        let conns: Vec<ReplicaConnection> =
            serde_json::from_value(image.manifest.database["replication"].clone())
                .unwrap_or_default();
        if conns.is_empty() {
            return Err(ReplicaError::Refused(format!(
                "--sibling: the backup in {} was not taken on a replica (it records no replication connection); leave out --sibling to replicate from the server it was taken on",
                image.dir.display()
            )));
        }
        let c = match &options.connection {
            Some(name) => conns.iter().find(|c| &c.name == name).ok_or_else(|| {
                ReplicaError::Refused(format!(
                    "--connection {name:?}: the backup records only {}",
                    conns
                        .iter()
                        .map(|c| format!("{:?}", c.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?,
            None if conns.len() == 1 => &conns[0],
            None => {
                return Err(ReplicaError::Refused(
                    "--sibling: the backed-up replica had several connections; choose one with --connection NAME".into(),
                ));
            }
        };
        let gtid = match &options.gtid {
            Some(g) => g.clone(),
            None if c.using_gtid != "No" => image.manifest.database["gtid_slave_pos"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            None => String::new(),
        };
        let position = (c.exec_file.clone(), c.exec_position);
        (
            c.name.clone(),
            options
                .source_host
                .clone()
                .unwrap_or_else(|| c.source_host.clone()),
            options.source_port.unwrap_or(c.source_port),
            position,
            gtid,
        )
    } else {
        let Some(b) = image.binlog() else {
            return Err(ReplicaError::Refused(format!(
                "the backup in {} has no binlog position (its server ran without a binlog), so a replica cannot start from it; use --sibling on a backup of a replica, or enable log_bin on the source",
                image.dir.display()
            )));
        };
        let Some(host) = options.source_host.clone() else {
            return Err(ReplicaError::Refused(
                "--source-host is needed: the address of the server the backup was taken on".into(),
            ));
        };
        let gtid = options.gtid.clone().unwrap_or(b.gtid.clone());
        (
            String::new(),
            host,
            options.source_port.unwrap_or(3306),
            (b.file, b.position),
            gtid,
        )
    };
    let name = if conn.is_empty() {
        String::new()
    } else {
        format!("{} ", quote(&conn))
    };
    let mut statements = Vec::new();
    let start = if gtid.is_empty() {
        format!(
            "MASTER_LOG_FILE={}, MASTER_LOG_POS={}",
            quote(&position.0),
            position.1
        )
    } else {
        statements.push(format!("SET GLOBAL gtid_slave_pos = {}", quote(&gtid)));
        "MASTER_USE_GTID=slave_pos".to_string()
    };
    statements.push(format!(
        "CHANGE MASTER {name}TO MASTER_HOST={}, MASTER_PORT={port}, MASTER_USER={}, MASTER_PASSWORD={}, MASTER_CONNECT_RETRY=5, {start}",
        quote(&host),
        quote(user),
        quote(password),
    ));
    statements.push(
        format!("START SLAVE {}", name.trim_end())
            .trim_end()
            .to_string(),
    );
    Ok(ReplicaPlan {
        statements,
        source_host: host,
        source_port: port,
        connection: conn,
        gtid,
    })
}

/// What `replica` did.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaSummary {
    pub plan: ReplicaPlan,
    /// The GTID both sides were at when they were compared (or caught up to).
    pub caught_up_at: Option<String>,
    pub compared: Vec<TableComparison>,
}

/// Makes the server at `server` a replica from `image`, then waits and compares as
/// `options` ask.
pub fn run(
    image: &Image,
    server: &Target,
    options: &ReplicaOptions,
    mut events: impl FnMut(ReplicaEvent<'_>),
) -> Result<ReplicaSummary, ReplicaError> {
    let password = match &options.source_password_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| {
                    ReplicaError::Refused(format!(
                        "cannot read --source-password-file {}: {e}",
                        f.display()
                    ))
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        ),
        None => None,
    };
    let shown = plan(image, options, None)?;
    let real = plan(image, options, Some(password.as_deref().unwrap_or("")))?;
    let mut db = Db::connect(server)?;
    preflight(&mut db, image, options, &shown)?;
    for sql in &real.statements {
        db.exec(sql)?;
    }
    events(ReplicaEvent::Note(&format!(
        "replicating from {}:{}{}",
        shown.source_host,
        shown.source_port,
        if shown.gtid.is_empty() {
            String::new()
        } else {
            format!(" from GTID {}", shown.gtid)
        }
    )));
    let source = Target {
        socket: None,
        host: Some(shown.source_host.clone()),
        port: shown.source_port,
        user: options.source_user.clone(),
        password,
    };
    let mut caught_up_at = None;
    if options.wait || options.verify_checksums {
        caught_up_at = Some(wait_caught_up(
            &mut db,
            &source,
            &shown.connection,
            Duration::from_secs(options.wait_timeout),
            &mut events,
        )?);
    }
    let mut compared = Vec::new();
    if options.verify_checksums {
        let (at, tables) = compare_at_one_gtid(&mut db, &source, &shown.connection, &mut events)?;
        caught_up_at = Some(at);
        let diverged: Vec<&TableComparison> = tables.iter().filter(|t| !t.equal()).collect();
        if !diverged.is_empty() {
            return Err(ReplicaError::Diverged {
                count: diverged.len(),
                tables: diverged
                    .iter()
                    .map(|t| t.table.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        compared = tables;
    }
    Ok(ReplicaSummary {
        plan: shown,
        caught_up_at,
        compared,
    })
}

/// Refuses a server that already replicates, or shares the source's server_id.
fn preflight(
    db: &mut Db,
    image: &Image,
    options: &ReplicaOptions,
    plan: &ReplicaPlan,
) -> Result<(), ReplicaError> {
    for row in db.rows("SHOW ALL SLAVES STATUS")? {
        let get = |k: &str| row.get(k).cloned().flatten().unwrap_or_default();
        let running = get("Slave_IO_Running") == "Yes" || get("Slave_SQL_Running") == "Yes";
        if running && get("Connection_name") == plan.connection {
            return Err(ReplicaError::Refused(format!(
                "the server already replicates from {}:{} on this connection; stop it (STOP SLAVE) and RESET SLAVE ALL first if it should replicate from the backup's source instead",
                get("Master_Host"),
                get("Master_Port")
            )));
        }
    }
    let own: u64 = db
        .value("SELECT @@GLOBAL.server_id")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let backed_up = image.manifest.database["server"]["server_id"].as_u64();
    if !options.sibling && Some(own) == backed_up {
        return Err(ReplicaError::Refused(format!(
            "the server has server_id {own}, the same as the server the backup was taken on, which it would replicate from; give it its own server_id and restart it"
        )));
    }
    Ok(())
}

/// Waits until the replica has applied what the source had binlogged when the wait
/// began; returns that GTID position.
fn wait_caught_up(
    db: &mut Db,
    source: &Target,
    connection: &str,
    timeout: Duration,
    events: &mut impl FnMut(ReplicaEvent<'_>),
) -> Result<String, ReplicaError> {
    let mut src = Db::connect(source)?;
    let target = src
        .value("SELECT @@GLOBAL.gtid_binlog_pos")?
        .unwrap_or_default();
    let deadline = Instant::now() + timeout;
    loop {
        let reached = db
            .value(&format!("SELECT MASTER_GTID_WAIT({}, 1)", quote(&target)))?
            .unwrap_or_default();
        if reached == "0" {
            return Ok(target);
        }
        let status = status_of(db, connection)?;
        let stopped = !(status.io_running && status.sql_running);
        if stopped && !status.error.is_empty() {
            return Err(ReplicaError::Stopped(status.error));
        }
        let pos = db
            .value("SELECT @@GLOBAL.gtid_slave_pos")?
            .unwrap_or_default();
        events(ReplicaEvent::Behind {
            replica: &pos,
            source: &target,
            seconds: status.behind,
        });
        if Instant::now() > deadline {
            return Err(ReplicaError::Timeout(timeout.as_secs()));
        }
    }
}

pub(crate) struct Status {
    /// The connection finds its position by GTID (`Using_Gtid` is not `No`).
    pub uses_gtid: bool,
    pub io_running: bool,
    pub sql_running: bool,
    pub behind: Option<u64>,
    pub error: String,
}

pub(crate) fn status_of(db: &mut Db, connection: &str) -> Result<Status, ReplicaError> {
    let rows = db.rows("SHOW ALL SLAVES STATUS")?;
    let row = rows
        .iter()
        .find(|r| {
            r.get("Connection_name")
                .cloned()
                .flatten()
                .unwrap_or_default()
                == connection
        })
        .ok_or_else(|| ReplicaError::Stopped("the replication connection is gone".into()))?;
    let get = |k: &str| row.get(k).cloned().flatten().unwrap_or_default();
    let error = [get("Last_IO_Error"), get("Last_SQL_Error")]
        .into_iter()
        .filter(|e| !e.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Status {
        uses_gtid: !matches!(get("Using_Gtid").as_str(), "" | "No"),
        io_running: get("Slave_IO_Running") == "Yes",
        sql_running: get("Slave_SQL_Running") == "Yes",
        behind: get("Seconds_Behind_Master").parse().ok(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Manifest, Source, Totals};

    fn image(database: serde_json::Value) -> Image {
        Image {
            dir: "/b".into(),
            manifest: Manifest {
                format_version: 1,
                tool: "hotbackup".into(),
                tool_version: "0".into(),
                kind: "backup".into(),
                host: "h".into(),
                source: Source {
                    mountpoint: "/m".into(),
                    backing: "/k".into(),
                },
                started_at: String::new(),
                validity_point: String::new(),
                finished_at: String::new(),
                duration_secs: 0.0,
                options: serde_json::Value::Null,
                database,
                totals: Totals::default(),
                files: vec![],
                side_files: vec![],
            },
        }
    }

    #[test]
    fn a_replica_of_the_backed_up_server_starts_at_its_gtid() {
        let img = image(serde_json::json!({
            "binlog": {"file": "bin.000003", "position": 1234, "gtid": "0-1-99"}
        }));
        let options = ReplicaOptions {
            source_host: Some("10.0.0.5".into()),
            source_user: "repl".into(),
            ..ReplicaOptions::default()
        };
        let p = plan(&img, &options, None).unwrap();
        assert_eq!(
            p.statements,
            [
                "SET GLOBAL gtid_slave_pos = '0-1-99'",
                "CHANGE MASTER TO MASTER_HOST='10.0.0.5', MASTER_PORT=3306, MASTER_USER='repl', MASTER_PASSWORD='<from --source-password-file>', MASTER_CONNECT_RETRY=5, MASTER_USE_GTID=slave_pos",
                "START SLAVE",
            ]
        );
        let no_gtid = image(serde_json::json!({
            "binlog": {"file": "bin.000003", "position": 1234, "gtid": ""}
        }));
        let p = plan(&no_gtid, &options, Some("s'cret")).unwrap();
        assert!(p.statements[0].contains("MASTER_PASSWORD='s''cret'"));
        assert!(p.statements[0].ends_with("MASTER_LOG_FILE='bin.000003', MASTER_LOG_POS=1234"));
        assert!(matches!(
            plan(
                &img,
                &ReplicaOptions {
                    source_host: None,
                    ..options
                },
                None
            ),
            Err(ReplicaError::Refused(_))
        ));
    }

    #[test]
    fn a_sibling_replicates_from_the_recorded_source_connection() {
        let img = image(serde_json::json!({
            "binlog": {"file": "r.000001", "position": 4, "gtid": "0-2-5"},
            "gtid_slave_pos": "0-1-77",
            "replication": [{
                "name": "east", "source_host": "db1", "source_port": 3307,
                "using_gtid": "Slave_Pos", "exec_file": "b.000002", "exec_position": 99,
                "sql_running": true, "io_running": true
            }]
        }));
        let options = ReplicaOptions {
            sibling: true,
            source_user: "repl".into(),
            ..ReplicaOptions::default()
        };
        let p = plan(&img, &options, Some("pw")).unwrap();
        assert_eq!(
            p.statements,
            [
                "SET GLOBAL gtid_slave_pos = '0-1-77'",
                "CHANGE MASTER 'east' TO MASTER_HOST='db1', MASTER_PORT=3307, MASTER_USER='repl', MASTER_PASSWORD='pw', MASTER_CONNECT_RETRY=5, MASTER_USE_GTID=slave_pos",
                "START SLAVE 'east'",
            ]
        );
        let plain =
            image(serde_json::json!({"binlog": {"file": "r.000001", "position": 4, "gtid": ""}}));
        assert!(matches!(
            plan(&plain, &options, None),
            Err(ReplicaError::Refused(_))
        ));
    }
}
