//! The coordinates read under the commit block: parsed, per dialect, from the rows the
//! plan's own statements returned (pure, so each flavor's answers are tested as a server
//! gives them), and `hotbackup_slave_info`, the SQL that resumes replication from them.

use serde::{Deserialize, Serialize};

use super::flavor::Dialect;
use super::{Row, quote};

/// What was read under the commit block.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Coordinates {
    pub binlog: Option<BinlogPosition>,
    pub replication: Vec<ReplicaConnection>,
    /// The GTID state a server started on the image resumes replication from: MariaDB's
    /// `gtid_slave_pos`, MySQL's `gtid_executed` (what `gtid_purged` is set to).
    pub replica_gtid: String,
}

/// The binlog position at the validity point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BinlogPosition {
    pub file: String,
    pub position: u64,
    pub gtid: String,
}

impl BinlogPosition {
    /// `FILE<TAB>POS<TAB>GTID`, the layout of mariabackup's `xtrabackup_binlog_info`.
    pub fn info_line(&self) -> String {
        format!("{}\t{}\t{}\n", self.file, self.position, self.gtid)
    }
}

/// One replication connection (MariaDB) or channel (MySQL) of a replica.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaConnection {
    /// Empty for the default connection or channel.
    pub name: String,
    pub source_host: String,
    pub source_port: u16,
    /// MariaDB: `No`, `Slave_Pos` or `Current_Pos`; MySQL: `No`, or `Auto_Position`
    /// when the channel finds its position by GTID.
    pub using_gtid: String,
    /// The source's binlog coordinates of the last executed event.
    pub exec_file: String,
    pub exec_position: u64,
    pub sql_running: bool,
    pub io_running: bool,
}

/// A coordinate statement's answer that is not what its flavor returns.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(pub String);

/// The columns of a dialect's replica status that the coordinates come from.
struct StatusColumns {
    name: &'static str,
    host: &'static str,
    port: &'static str,
    file: &'static str,
    position: &'static str,
    sql_running: &'static str,
    io_running: &'static str,
}

impl StatusColumns {
    fn of(dialect: Dialect) -> StatusColumns {
        let slave = StatusColumns {
            name: "Connection_name",
            host: "Master_Host",
            port: "Master_Port",
            file: "Relay_Master_Log_File",
            position: "Exec_Master_Log_Pos",
            sql_running: "Slave_SQL_Running",
            io_running: "Slave_IO_Running",
        };
        match dialect {
            Dialect::MariaDb => slave,
            Dialect::MySql57 => StatusColumns {
                name: "Channel_Name",
                ..slave
            },
            Dialect::MySql8 => StatusColumns {
                name: "Channel_Name",
                host: "Source_Host",
                port: "Source_Port",
                file: "Relay_Source_Log_File",
                position: "Exec_Source_Log_Pos",
                sql_running: "Replica_SQL_Running",
                io_running: "Replica_IO_Running",
            },
        }
    }
}

/// The replication connections in the rows of `dialect.replica_status()`.
pub fn connections(dialect: Dialect, rows: &[Row]) -> Vec<ReplicaConnection> {
    let col = StatusColumns::of(dialect);
    rows.iter()
        .map(|row| {
            let get = |k: &str| row.get(k).cloned().flatten().unwrap_or_default();
            ReplicaConnection {
                name: get(col.name),
                source_host: get(col.host),
                source_port: get(col.port).parse().unwrap_or(3306),
                using_gtid: match dialect {
                    Dialect::MariaDb => get("Using_Gtid"),
                    _ if get("Auto_Position") == "1" => "Auto_Position".into(),
                    _ => "No".into(),
                },
                exec_file: get(col.file),
                exec_position: get(col.position).parse().unwrap_or(0),
                sql_running: get(col.sql_running) == "Yes",
                io_running: get(col.io_running) == "Yes",
            }
        })
        .collect()
}

/// The binlog position from the answers to `plan.binlog_coordinates`, in order.
pub fn binlog_position(
    dialect: Dialect,
    answers: &[Vec<Row>],
) -> Result<BinlogPosition, Unreadable> {
    if dialect == Dialect::MySql8 {
        first_row(answers, 0, "performance_schema.log_status")?;
        return log_status(&single_value(answers, 0).unwrap_or_default());
    }
    let status = first_row(answers, 0, "SHOW MASTER STATUS")?;
    let get = |k: &str| status.get(k).cloned().flatten().unwrap_or_default();
    let gtid = match dialect {
        Dialect::MariaDb => single_value(answers, 1).unwrap_or_default(),
        Dialect::MySql57 | Dialect::MySql8 => one_line(&get("Executed_Gtid_Set")),
    };
    Ok(BinlogPosition {
        file: get("File"),
        position: get("Position").parse().unwrap_or(0),
        gtid,
    })
}

/// The replication connections and the GTID state to resume from, from the answers to
/// `plan.replica_coordinates`, in order.
pub fn replica_coordinates(
    dialect: Dialect,
    answers: &[Vec<Row>],
) -> (Vec<ReplicaConnection>, String) {
    let rows = answers.first().map(Vec::as_slice).unwrap_or_default();
    let gtid = single_value(answers, 1).unwrap_or_default();
    let gtid = match dialect {
        Dialect::MariaDb => gtid,
        Dialect::MySql57 | Dialect::MySql8 => one_line(&gtid),
    };
    (connections(dialect, rows), gtid)
}

/// `SELECT LOCAL FROM performance_schema.log_status`: one JSON document with the binlog
/// position and the GTID set, taken together.
fn log_status(local: &str) -> Result<BinlogPosition, Unreadable> {
    #[derive(Deserialize)]
    struct Local {
        #[serde(default)]
        gtid_executed: String,
        binary_log_file: Option<String>,
        binary_log_position: Option<u64>,
    }
    let local: Local = serde_json::from_str(local).map_err(|e| {
        Unreadable(format!(
            "performance_schema.log_status returned LOCAL = {local:?}, not its JSON ({e})"
        ))
    })?;
    match (local.binary_log_file, local.binary_log_position) {
        (Some(file), Some(position)) => Ok(BinlogPosition {
            file,
            position,
            gtid: one_line(&local.gtid_executed),
        }),
        _ => Err(Unreadable(
            "performance_schema.log_status reports no binary log position; is the binlog off?"
                .into(),
        )),
    }
}

fn first_row<'a>(answers: &'a [Vec<Row>], i: usize, what: &str) -> Result<&'a Row, Unreadable> {
    answers
        .get(i)
        .and_then(|rows| rows.first())
        .ok_or_else(|| Unreadable(format!("{what} returned no row")))
}

/// The value of a one-column answer.
fn single_value(answers: &[Vec<Row>], i: usize) -> Option<String> {
    answers.get(i)?.first()?.values().next().cloned().flatten()
}

/// A MySQL GTID set as one line (the server breaks it after each comma).
fn one_line(gtid_set: &str) -> String {
    gtid_set
        .chars()
        .filter(|c| !matches!(c, '\n' | '\r'))
        .collect()
}

/// `hotbackup_slave_info`: ready-to-run SQL that points a server started on the image
/// at the backed-up replica's sources, in the flavor's own words. Never a password.
pub fn slave_info(
    dialect: Dialect,
    connections: &[ReplicaConnection],
    replica_gtid: &str,
) -> String {
    let mut out = String::new();
    if connections.iter().any(|c| c.using_gtid != "No") {
        let variable = match dialect {
            Dialect::MariaDb => "gtid_slave_pos",
            Dialect::MySql57 | Dialect::MySql8 => "gtid_purged",
        };
        out.push_str(&format!(
            "SET GLOBAL {variable} = {};\n",
            quote(replica_gtid)
        ));
    }
    for c in connections {
        let channel = match (dialect, c.name.as_str()) {
            (Dialect::MariaDb, _) | (_, "") => String::new(),
            _ => format!(" FOR CHANNEL {}", quote(&c.name)),
        };
        // The statement and the prefix of its options.
        let (change, option) = match dialect {
            Dialect::MariaDb if c.name.is_empty() => ("CHANGE MASTER TO".to_string(), "MASTER"),
            Dialect::MariaDb => (format!("CHANGE MASTER {} TO", quote(&c.name)), "MASTER"),
            Dialect::MySql57 => ("CHANGE MASTER TO".to_string(), "MASTER"),
            Dialect::MySql8 => ("CHANGE REPLICATION SOURCE TO".to_string(), "SOURCE"),
        };
        let position = match (c.using_gtid != "No", dialect) {
            (false, _) => format!(
                "{option}_LOG_FILE={}, {option}_LOG_POS={}",
                quote(&c.exec_file),
                c.exec_position
            ),
            (true, Dialect::MariaDb) => "MASTER_USE_GTID=slave_pos".to_string(),
            (true, _) => format!("{option}_AUTO_POSITION=1"),
        };
        out.push_str(&format!(
            "{change} {option}_HOST={}, {option}_PORT={}, {position}{channel};\n",
            quote(&c.source_host),
            c.source_port
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(columns: &[(&str, &str)]) -> Row {
        columns
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_string())))
            .collect()
    }

    fn connection(name: &str, using_gtid: &str, host: &str) -> ReplicaConnection {
        ReplicaConnection {
            name: name.into(),
            source_host: host.into(),
            source_port: 3306,
            using_gtid: using_gtid.into(),
            exec_file: "bin.000009".into(),
            exec_position: 42,
            sql_running: true,
            io_running: true,
        }
    }

    #[test]
    fn mysql_gtid_sets_are_read_as_one_line() {
        let status = row(&[
            ("File", "mysql-bin.000003"),
            ("Position", "194"),
            (
                "Executed_Gtid_Set",
                "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5,\n4c9c3ad1-71ca-11e1-9e33-c80aa9429562:1-3",
            ),
        ]);
        let b = binlog_position(Dialect::MySql57, &[vec![status]]).unwrap();
        assert_eq!(
            b.info_line(),
            "mysql-bin.000003\t194\t3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5,4c9c3ad1-71ca-11e1-9e33-c80aa9429562:1-3\n"
        );
        let local = row(&[(
            "LOCAL",
            r#"{"gtid_executed": "a:1-5,\nb:1-2", "binary_log_file": "binlog.000002", "binary_log_position": 1234}"#,
        )]);
        let b = binlog_position(Dialect::MySql8, &[vec![local]]).unwrap();
        assert_eq!(
            (b.file.as_str(), b.position, b.gtid.as_str()),
            ("binlog.000002", 1234, "a:1-5,b:1-2")
        );
    }

    #[test]
    fn an_answer_without_a_position_is_unreadable_not_zero() {
        let no_binlog = row(&[("LOCAL", r#"{"gtid_executed": ""}"#)]);
        let e = binlog_position(Dialect::MySql8, &[vec![no_binlog]]).unwrap_err();
        assert!(e.0.contains("no binary log position"), "{e}");
        let e = binlog_position(Dialect::MySql8, &[vec![row(&[("LOCAL", "{")])]]).unwrap_err();
        assert!(e.0.contains("not its JSON"), "{e}");
        let e = binlog_position(Dialect::MariaDb, &[vec![], vec![]]).unwrap_err();
        assert_eq!(e.0, "SHOW MASTER STATUS returned no row");
    }

    #[test]
    fn mariadb_slave_info_is_sql_per_connection_without_passwords() {
        let conns = vec![
            ReplicaConnection {
                source_host: "10.0.0.1".into(),
                exec_file: "bin.000003".into(),
                exec_position: 1234,
                ..connection("", "Slave_Pos", "")
            },
            ReplicaConnection {
                source_port: 3307,
                exec_file: "east-bin.000009".into(),
                sql_running: false,
                ..connection("east", "No", "db'east")
            },
        ];
        let sql = slave_info(Dialect::MariaDb, &conns, "0-1-100,1-2-7");
        assert_eq!(
            sql,
            "SET GLOBAL gtid_slave_pos = '0-1-100,1-2-7';\n\
             CHANGE MASTER TO MASTER_HOST='10.0.0.1', MASTER_PORT=3306, MASTER_USE_GTID=slave_pos;\n\
             CHANGE MASTER 'east' TO MASTER_HOST='db''east', MASTER_PORT=3307, MASTER_LOG_FILE='east-bin.000009', MASTER_LOG_POS=42;\n"
        );
        assert!(!sql.to_ascii_uppercase().contains("PASSWORD"));
    }

    #[test]
    fn mysql_slave_info_sets_gtid_purged_and_names_channels() {
        let conns = vec![
            connection("", "Auto_Position", "10.0.0.1"),
            connection("east", "No", "10.0.0.2"),
        ];
        assert_eq!(
            slave_info(Dialect::MySql8, &conns, "a:1-5"),
            "SET GLOBAL gtid_purged = 'a:1-5';\n\
             CHANGE REPLICATION SOURCE TO SOURCE_HOST='10.0.0.1', SOURCE_PORT=3306, SOURCE_AUTO_POSITION=1;\n\
             CHANGE REPLICATION SOURCE TO SOURCE_HOST='10.0.0.2', SOURCE_PORT=3306, SOURCE_LOG_FILE='bin.000009', SOURCE_LOG_POS=42 FOR CHANNEL 'east';\n"
        );
        assert_eq!(
            slave_info(Dialect::MySql57, &conns[1..], "a:1-5"),
            "CHANGE MASTER TO MASTER_HOST='10.0.0.2', MASTER_PORT=3306, MASTER_LOG_FILE='bin.000009', MASTER_LOG_POS=42 FOR CHANNEL 'east';\n"
        );
    }
}
