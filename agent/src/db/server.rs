//! What the backup needs to know about the server: its flavor and settings (the paths
//! the image must hold, what recovery depends on), the privileges the plan needs, and
//! the coordinates read at the validity point.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::flavor::{self, Flavor};
use super::{DbError, Row, Sql};

/// The server as it describes itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerFacts {
    pub flavor: Flavor,
    pub version: String,
    pub server_id: u64,
    pub hostname: String,
    pub datadir: PathBuf,
    pub log_bin: bool,
    /// Absolute; None without a binlog.
    pub log_bin_basename: Option<PathBuf>,
    pub binlog_format: String,
    pub flush_log_at_trx_commit: u8,
    pub sync_binlog: u64,
    /// Every setting a server started on the image must match, by option name.
    pub settings: Vec<(String, String)>,
    /// The directories the image needs, by setting name (absolute).
    pub paths: Vec<(String, PathBuf)>,
}

/// Settings a server started on the image must have as the source had them (MariaDB).
const IMAGE_SETTINGS: &[&str] = &[
    "innodb_page_size",
    "innodb_data_file_path",
    "innodb_undo_tablespaces",
    "innodb_log_file_size",
    "innodb_checksum_algorithm",
    "lower_case_table_names",
    "log_bin_basename",
    "log_bin_index",
    "binlog_format",
    "gtid_domain_id",
    "server_id",
    "aria_log_file_size",
];

impl ServerFacts {
    pub fn read<S: Sql>(db: &mut S) -> Result<ServerFacts, DbError> {
        let version = db.value("SELECT @@version")?.unwrap_or_default();
        let comment = db.value("SELECT @@version_comment")?.unwrap_or_default();
        let flavor = Flavor::detect(&version, &comment);
        let var = |db: &mut S, name: &str| -> Result<Option<String>, DbError> {
            // Variables a flavor lacks read as None.
            match db.value(&format!("SELECT @@GLOBAL.{name}")) {
                Ok(v) => Ok(v),
                Err(DbError::Query { code: 1193, .. }) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let datadir = PathBuf::from(var(db, "datadir")?.unwrap_or_default());
        let log_bin = var(db, "log_bin")?.is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("on"));
        let log_bin_basename = var(db, "log_bin_basename")?
            .filter(|v| log_bin && !v.is_empty())
            .map(|v| resolve(&datadir, &v));
        let mut paths = vec![("datadir".to_string(), datadir.clone())];
        if let Some(b) = &log_bin_basename {
            paths.push((
                "log_bin_basename".into(),
                b.parent().map(Path::to_path_buf).unwrap_or_default(),
            ));
        }
        for name in [
            "innodb_log_group_home_dir",
            "innodb_data_home_dir",
            "innodb_undo_directory",
            "aria_log_dir_path",
        ] {
            if let Some(v) = var(db, name)? {
                paths.push((name.into(), resolve(&datadir, &v)));
            }
        }
        let mut settings = Vec::new();
        for name in IMAGE_SETTINGS {
            if let Some(v) = var(db, name)? {
                settings.push((name.to_string(), v));
            }
        }
        Ok(ServerFacts {
            flavor,
            version,
            server_id: var(db, "server_id")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            hostname: var(db, "hostname")?.unwrap_or_default(),
            datadir,
            log_bin,
            log_bin_basename,
            binlog_format: var(db, "binlog_format")?.unwrap_or_default(),
            flush_log_at_trx_commit: var(db, "innodb_flush_log_at_trx_commit")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            sync_binlog: var(db, "sync_binlog")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            settings,
            paths,
        })
    }

    pub fn version_pair(&self) -> (u32, u32) {
        flavor::major_minor(&self.version)
    }
}

/// A path setting as the server resolves it: relative to the datadir, empty = datadir.
fn resolve(datadir: &Path, value: &str) -> PathBuf {
    let p = Path::new(value.trim());
    if p.as_os_str().is_empty() {
        datadir.to_path_buf()
    } else if p.is_absolute() {
        p.to_path_buf()
    } else {
        // `./` and friends: lexically below the datadir.
        let mut out = datadir.to_path_buf();
        for c in p.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        out
    }
}

/// A privilege the backup needs, and the GRANT that gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Needed {
    /// Names that satisfy it (any one), as SHOW GRANTS spells them.
    pub any_of: &'static [&'static str],
    pub why: &'static str,
}

/// The privileges a MariaDB backup needs with these facts and options.
pub fn needed_privileges(facts: &ServerFacts, replica: bool, safe_slave: bool) -> Vec<Needed> {
    let mut out = vec![
        Needed {
            any_of: &["RELOAD"],
            why: "BACKUP STAGE and FLUSH ENGINE LOGS",
        },
        Needed {
            any_of: &["PROCESS"],
            why: "naming the statement that blocks a backup stage",
        },
    ];
    if facts.log_bin {
        out.push(Needed {
            any_of: &["BINLOG MONITOR", "REPLICATION CLIENT", "SUPER"],
            why: "reading the binlog position (SHOW MASTER STATUS)",
        });
    }
    if replica {
        out.push(Needed {
            any_of: &[
                "SLAVE MONITOR",
                "REPLICA MONITOR",
                "REPLICATION CLIENT",
                "SUPER",
            ],
            why: "reading the replication coordinates (SHOW ALL SLAVES STATUS)",
        });
    }
    if safe_slave {
        out.push(Needed {
            any_of: &["REPLICATION SLAVE ADMIN", "SUPER"],
            why: "stopping and starting the SQL threads (--safe-slave-backup)",
        });
    }
    if facts.flush_log_at_trx_commit == 0 {
        out.push(Needed {
            any_of: &["SUPER"],
            why: "raising innodb_flush_log_at_trx_commit from 0 for one log write at the validity point",
        });
    }
    out
}

/// The privileges in `needed` that `grants` (the lines of SHOW GRANTS FOR
/// CURRENT_USER()) do not give, each with its GRANT statement.
pub fn missing_privileges(grants: &[String], needed: &[Needed]) -> Vec<String> {
    let global: Vec<String> = grants
        .iter()
        .filter(|g| g.contains(" ON *.* "))
        .map(|g| g.to_ascii_uppercase())
        .collect();
    let has = |p: &str| {
        global.iter().any(|g| {
            g.starts_with("GRANT ALL PRIVILEGES ON *.*")
                || g.split(" ON *.*")
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("GRANT ")
                    .split(',')
                    .any(|x| x.trim() == p)
        })
    };
    needed
        .iter()
        .filter(|n| !n.any_of.iter().any(|p| has(p)))
        .map(|n| {
            format!(
                "{} (for {}): GRANT {} ON *.* TO <user>",
                n.any_of[0], n.why, n.any_of[0]
            )
        })
        .collect()
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

/// One replication connection of a replica at the validity point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaConnection {
    /// Empty for the default connection.
    pub name: String,
    pub source_host: String,
    pub source_port: u16,
    /// `No`, `Slave_Pos` or `Current_Pos`.
    pub using_gtid: String,
    /// The source's binlog coordinates of the last executed event.
    pub exec_file: String,
    pub exec_position: u64,
    pub sql_running: bool,
    pub io_running: bool,
}

impl ReplicaConnection {
    pub fn from_row(row: &Row) -> ReplicaConnection {
        let get = |k: &str| row.get(k).cloned().flatten().unwrap_or_default();
        ReplicaConnection {
            name: get("Connection_name"),
            source_host: get("Master_Host"),
            source_port: get("Master_Port").parse().unwrap_or(3306),
            using_gtid: get("Using_Gtid"),
            exec_file: get("Relay_Master_Log_File"),
            exec_position: get("Exec_Master_Log_Pos").parse().unwrap_or(0),
            sql_running: get("Slave_SQL_Running") == "Yes",
            io_running: get("Slave_IO_Running") == "Yes",
        }
    }
}

/// `hotbackup_slave_info`: ready-to-run SQL that points a server started on the image
/// at the backed-up replica's sources. Never a password.
pub fn slave_info(connections: &[ReplicaConnection], gtid_slave_pos: &str) -> String {
    let mut out = String::new();
    let any_gtid = connections.iter().any(|c| c.using_gtid != "No");
    if any_gtid {
        out.push_str(&format!(
            "SET GLOBAL gtid_slave_pos = {};\n",
            super::quote(gtid_slave_pos)
        ));
    }
    for c in connections {
        let name = if c.name.is_empty() {
            String::new()
        } else {
            format!("{} ", super::quote(&c.name))
        };
        let position = if c.using_gtid != "No" {
            "MASTER_USE_GTID=slave_pos".to_string()
        } else {
            format!(
                "MASTER_LOG_FILE={}, MASTER_LOG_POS={}",
                super::quote(&c.exec_file),
                c.exec_position
            )
        };
        out.push_str(&format!(
            "CHANGE MASTER {name}TO MASTER_HOST={}, MASTER_PORT={}, {position};\n",
            super::quote(&c.source_host),
            c.source_port
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_like_the_server() {
        let d = Path::new("/var/lib/mysql");
        assert_eq!(resolve(d, "./"), PathBuf::from("/var/lib/mysql"));
        assert_eq!(resolve(d, ""), PathBuf::from("/var/lib/mysql"));
        assert_eq!(resolve(d, "../logs"), PathBuf::from("/var/lib/logs"));
        assert_eq!(resolve(d, "/srv/binlog"), PathBuf::from("/srv/binlog"));
    }

    #[test]
    fn missing_privileges_are_named_with_their_grant() {
        let facts = ServerFacts {
            flavor: Flavor::MariaDb,
            version: "10.11.19-MariaDB".into(),
            server_id: 1,
            hostname: "h".into(),
            datadir: "/d".into(),
            log_bin: true,
            log_bin_basename: Some("/d/bin".into()),
            binlog_format: "ROW".into(),
            flush_log_at_trx_commit: 1,
            sync_binlog: 0,
            settings: vec![],
            paths: vec![],
        };
        let needed = needed_privileges(&facts, true, false);
        let grants = vec![
            "GRANT RELOAD, PROCESS ON *.* TO `bk`@`localhost`".to_string(),
            "GRANT SELECT ON `db`.* TO `bk`@`localhost`".to_string(),
        ];
        let missing = missing_privileges(&grants, &needed);
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(missing[0].starts_with("BINLOG MONITOR"));
        assert!(missing[1].contains("GRANT SLAVE MONITOR ON *.*"));
        let all =
            vec!["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION".to_string()];
        assert!(missing_privileges(&all, &needed).is_empty());
        let alt = vec!["GRANT RELOAD, PROCESS, SUPER ON *.* TO `bk`@`%`".to_string()];
        assert!(missing_privileges(&alt, &needed).is_empty());
    }

    #[test]
    fn slave_info_is_sql_per_connection_without_passwords() {
        let conns = vec![
            ReplicaConnection {
                name: String::new(),
                source_host: "10.0.0.1".into(),
                source_port: 3306,
                using_gtid: "Slave_Pos".into(),
                exec_file: "bin.000003".into(),
                exec_position: 1234,
                sql_running: true,
                io_running: true,
            },
            ReplicaConnection {
                name: "east".into(),
                source_host: "db'east".into(),
                source_port: 3307,
                using_gtid: "No".into(),
                exec_file: "east-bin.000009".into(),
                exec_position: 42,
                sql_running: false,
                io_running: true,
            },
        ];
        let sql = slave_info(&conns, "0-1-100,1-2-7");
        assert_eq!(
            sql,
            "SET GLOBAL gtid_slave_pos = '0-1-100,1-2-7';\n\
             CHANGE MASTER TO MASTER_HOST='10.0.0.1', MASTER_PORT=3306, MASTER_USE_GTID=slave_pos;\n\
             CHANGE MASTER 'east' TO MASTER_HOST='db''east', MASTER_PORT=3307, MASTER_LOG_FILE='east-bin.000009', MASTER_LOG_POS=42;\n"
        );
        assert!(!sql.to_ascii_uppercase().contains("PASSWORD"));
    }
}
