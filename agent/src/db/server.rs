//! What the backup needs to know about the server: its flavor and settings (the paths
//! the image must hold, what recovery depends on) and the privileges the plan needs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::flavor::{self, Flavor};
use super::{DbError, Sql};

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
}
