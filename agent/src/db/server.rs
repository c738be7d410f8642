//! What the backup needs to know about the server: its flavor and settings (the paths
//! the image must hold, what recovery depends on) and the privileges the plan needs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::flavor::{self, Dialect, Flavor};
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
    /// Where: `None` on every database (`*.*`); or one table (`schema.table`), which a
    /// grant on its schema or on `*.*` also gives.
    pub on: Option<(&'static str, &'static str)>,
    pub why: &'static str,
}

/// A privilege needed on `*.*`.
fn global(any_of: &'static [&'static str], why: &'static str) -> Needed {
    Needed {
        any_of,
        on: None,
        why,
    }
}

/// The privileges a backup needs with these facts and options: those of the flavor's
/// statement plan (`flavor::plan`) and replica handling.
pub fn needed_privileges(facts: &ServerFacts, replica: bool, safe_slave: bool) -> Vec<Needed> {
    let dialect = Dialect::of(facts.flavor, facts.version_pair());
    let mut out = match dialect {
        Dialect::MariaDb => vec![global(&["RELOAD"], "BACKUP STAGE and FLUSH ENGINE LOGS")],
        Dialect::MySql57 => vec![
            global(&["RELOAD"], "the backup locks and FLUSH ENGINE LOGS"),
            global(
                &["LOCK TABLES"],
                "LOCK TABLES FOR BACKUP and LOCK BINLOG FOR BACKUP",
            ),
        ],
        Dialect::MySql8 => vec![
            global(
                &["BACKUP_ADMIN"],
                "LOCK INSTANCE FOR BACKUP and performance_schema.log_status",
            ),
            global(
                &["RELOAD"],
                "FLUSH ENGINE LOGS and FLUSH TABLES WITH READ LOCK",
            ),
        ],
    };
    out.push(global(
        &["PROCESS"],
        "naming the statement that blocks a backup stage",
    ));
    if facts.log_bin {
        out.push(match dialect {
            Dialect::MariaDb => global(
                &["BINLOG MONITOR", "REPLICATION CLIENT", "SUPER"],
                "reading the binlog position (SHOW MASTER STATUS)",
            ),
            Dialect::MySql57 => global(
                &["REPLICATION CLIENT", "SUPER"],
                "reading the binlog position (SHOW MASTER STATUS)",
            ),
            Dialect::MySql8 => Needed {
                any_of: &["SELECT"],
                on: Some(("performance_schema", "log_status")),
                why: "reading the binlog position (performance_schema.log_status)",
            },
        });
    }
    if replica {
        out.push(match dialect {
            Dialect::MariaDb => global(
                &[
                    "SLAVE MONITOR",
                    "REPLICA MONITOR",
                    "REPLICATION CLIENT",
                    "SUPER",
                ],
                "reading the replication coordinates (SHOW ALL SLAVES STATUS)",
            ),
            Dialect::MySql57 => global(
                &["REPLICATION CLIENT", "SUPER"],
                "reading the replication coordinates (SHOW SLAVE STATUS)",
            ),
            Dialect::MySql8 => global(
                &["REPLICATION CLIENT", "SUPER"],
                "reading the replication coordinates (SHOW REPLICA STATUS)",
            ),
        });
    }
    if safe_slave {
        let why = "stopping and starting the SQL threads (--safe-slave-backup)";
        out.push(match dialect {
            Dialect::MariaDb => global(&["REPLICATION SLAVE ADMIN", "SUPER"], why),
            Dialect::MySql57 => global(&["SUPER"], why),
            Dialect::MySql8 => global(&["REPLICATION_SLAVE_ADMIN", "SUPER"], why),
        });
    }
    // Only MariaDB's plan raises the setting (flavor::plan).
    if dialect == Dialect::MariaDb && facts.flush_log_at_trx_commit == 0 {
        out.push(global(
            &["SUPER"],
            "raising innodb_flush_log_at_trx_commit from 0 for one log write at the validity point",
        ));
    }
    out
}

/// The privileges in `needed` that `grants` (the lines of SHOW GRANTS FOR
/// CURRENT_USER()) do not give, each with its GRANT statement.
pub fn missing_privileges(grants: &[String], needed: &[Needed]) -> Vec<String> {
    // (object, privileges) of each `GRANT privileges ON object TO ...` line.
    let granted: Vec<(String, Vec<String>)> = grants
        .iter()
        .filter_map(|g| {
            let g = g.to_ascii_uppercase();
            let (privileges, rest) = g.strip_prefix("GRANT ")?.split_once(" ON ")?;
            let object = rest.split(" TO ").next()?.trim().replace('`', "");
            let privileges = privileges.split(',').map(|p| p.trim().to_string());
            Some((object, privileges.collect()))
        })
        .collect();
    let has = |n: &Needed, p: &str| {
        let objects = match n.on {
            None => vec!["*.*".to_string()],
            Some((schema, table)) => vec![
                "*.*".to_string(),
                format!("{schema}.*").to_ascii_uppercase(),
                format!("{schema}.{table}").to_ascii_uppercase(),
            ],
        };
        granted.iter().any(|(object, privileges)| {
            objects.contains(object)
                && privileges
                    .iter()
                    .any(|x| x == p || x == "ALL PRIVILEGES" || x == "ALL")
        })
    };
    needed
        .iter()
        .filter(|n| !n.any_of.iter().any(|p| has(n, p)))
        .map(|n| {
            let on = n.on.map_or("*.*".to_string(), |(schema, table)| {
                format!("{schema}.{table}")
            });
            format!(
                "{} (for {}): GRANT {} ON {on} TO <user>",
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

    fn facts(flavor: Flavor, version: &str) -> ServerFacts {
        ServerFacts {
            flavor,
            version: version.into(),
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
        }
    }

    fn lines(grants: &[&str]) -> Vec<String> {
        grants.iter().map(|g| g.to_string()).collect()
    }

    #[test]
    fn missing_privileges_are_named_with_their_grant() {
        let facts = facts(Flavor::MariaDb, "10.11.19-MariaDB");
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
    fn mysql_8_needs_backup_admin_and_log_status_a_table_grant_gives() {
        let needed = needed_privileges(&facts(Flavor::MySql, "8.0.36"), true, true);
        let grants = [
            "GRANT RELOAD, PROCESS, REPLICATION CLIENT ON *.* TO `bk`@`%`",
            "GRANT BACKUP_ADMIN,REPLICATION_SLAVE_ADMIN ON *.* TO `bk`@`%`",
            "GRANT SELECT ON `performance_schema`.`log_status` TO `bk`@`%`",
        ];
        assert!(missing_privileges(&lines(&grants), &needed).is_empty());
        let missing = missing_privileges(&lines(&grants[..2]), &needed);
        assert_eq!(
            missing,
            [
                "SELECT (for reading the binlog position (performance_schema.log_status)): GRANT SELECT ON performance_schema.log_status TO <user>"
            ]
        );
        let missing = missing_privileges(&lines(&[grants[0], grants[2]]), &needed);
        assert!(missing[0].starts_with("BACKUP_ADMIN (for LOCK INSTANCE FOR BACKUP"));
        assert!(missing[1].contains("GRANT REPLICATION_SLAVE_ADMIN ON *.*"));
        // MySQL 8's root: static privileges listed, dynamic ones on a line of their own.
        let root = [
            "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, RELOAD, SHUTDOWN, PROCESS, FILE, REFERENCES, INDEX, ALTER, SHOW DATABASES, SUPER, CREATE TEMPORARY TABLES, LOCK TABLES, EXECUTE, REPLICATION SLAVE, REPLICATION CLIENT, CREATE VIEW, SHOW VIEW, CREATE ROUTINE, ALTER ROUTINE, CREATE USER, EVENT, TRIGGER, CREATE TABLESPACE, CREATE ROLE, DROP ROLE ON *.* TO `root`@`localhost` WITH GRANT OPTION",
            "GRANT APPLICATION_PASSWORD_ADMIN,AUDIT_ABORT_EXEMPT,AUDIT_ADMIN,AUTHENTICATION_POLICY_ADMIN,BACKUP_ADMIN,BINLOG_ADMIN,BINLOG_ENCRYPTION_ADMIN,CLONE_ADMIN,CONNECTION_ADMIN,REPLICATION_SLAVE_ADMIN,SYSTEM_VARIABLES_ADMIN ON *.* TO `root`@`localhost` WITH GRANT OPTION",
            "GRANT PROXY ON ``@`` TO `root`@`localhost` WITH GRANT OPTION",
        ];
        assert!(missing_privileges(&lines(&root), &needed).is_empty());
    }

    #[test]
    fn percona_57_needs_reload_and_lock_tables_for_its_backup_locks() {
        let needed = needed_privileges(&facts(Flavor::Percona, "5.7.44-48-log"), true, false);
        let grants = ["GRANT RELOAD, PROCESS, REPLICATION CLIENT ON *.* TO 'bk'@'%'"];
        let missing = missing_privileges(&lines(&grants), &needed);
        assert_eq!(
            missing,
            [
                "LOCK TABLES (for LOCK TABLES FOR BACKUP and LOCK BINLOG FOR BACKUP): GRANT LOCK TABLES ON *.* TO <user>"
            ]
        );
        let grants = ["GRANT RELOAD, LOCK TABLES, PROCESS, REPLICATION CLIENT ON *.* TO 'bk'@'%'"];
        assert!(missing_privileges(&lines(&grants), &needed).is_empty());
    }
}
