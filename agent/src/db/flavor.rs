//! Which server we talk to, and each flavor's statement plan for the validity point, as
//! pure functions of what the server told us (unit-tested here for the flavors that
//! cannot be installed on our machines).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    MariaDb,
    MySql,
    Percona,
}

impl Flavor {
    /// From `@@version` and `@@version_comment`.
    pub fn detect(version: &str, comment: &str) -> Flavor {
        if version.to_ascii_lowercase().contains("mariadb") {
            Flavor::MariaDb
        } else if comment.to_ascii_lowercase().contains("percona") {
            Flavor::Percona
        } else {
            Flavor::MySql
        }
    }

    /// The server's name as its vendor spells it.
    pub fn name(self) -> &'static str {
        match self {
            Flavor::MariaDb => "MariaDB",
            Flavor::MySql => "MySQL",
            Flavor::Percona => "Percona Server",
        }
    }
}

/// `major.minor.patch` of a version string such as `10.11.19-MariaDB-0+deb12u1` or
/// `8.0.35-27` (a missing part is 0).
pub fn version_triple(version: &str) -> (u32, u32, u32) {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

/// `major.minor` of a version string.
pub fn major_minor(version: &str) -> (u32, u32) {
    let (major, minor, _) = version_triple(version);
    (major, minor)
}

/// The servers whose statements the plans use.
const SUPPORTED: &str =
    "MariaDB 10.4 and later, MySQL and Percona Server 8.0.23 and later, and Percona Server 5.7";

/// Whether the plan of `flavor` runs on this server `version` (`@@version`): each plan's
/// statements need a release that has them. Refused, one sentence naming the version and
/// what is supported.
pub fn supported(flavor: Flavor, version: &str) -> Result<(), String> {
    let v = version_triple(version);
    let missing = match flavor {
        Flavor::MariaDb if v < (10, 4, 0) => "BACKUP STAGE (MariaDB 10.4)",
        // Percona Server 5.7 adds its backup locks to MySQL 5.7; MySQL 5.7 has none.
        Flavor::MySql if v < (8, 0, 0) => "backup locks (LOCK INSTANCE FOR BACKUP, MySQL 8.0)",
        // Replication channels, which the 5.7 plan names.
        Flavor::Percona if v < (5, 7, 0) => "replication channels (5.7)",
        // The 8.0 plan lists replicas with SHOW REPLICA STATUS and stops their SQL
        // threads with STOP REPLICA (8.0.22), and writes CHANGE REPLICATION SOURCE TO
        // into hotbackup_slave_info (8.0.23).
        Flavor::MySql | Flavor::Percona if ((8, 0, 0)..(8, 0, 22)).contains(&v) => {
            "SHOW REPLICA STATUS (8.0.22) and CHANGE REPLICATION SOURCE TO (8.0.23)"
        }
        Flavor::MySql | Flavor::Percona if ((8, 0, 0)..(8, 0, 23)).contains(&v) => {
            "CHANGE REPLICATION SOURCE TO (8.0.23)"
        }
        _ => return Ok(()),
    };
    Err(format!(
        "{} {version} is not supported: it lacks {missing}, which the backup uses; supported are {SUPPORTED}",
        flavor.name()
    ))
}

/// How a flavor's SQL speaks of replication, and where it reports coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// MariaDB: named connections, `SHOW ALL SLAVES STATUS`, `gtid_slave_pos`.
    MariaDb,
    /// MySQL and Percona Server 5.7: channels, `SHOW SLAVE STATUS`, `MASTER_*` options.
    MySql57,
    /// MySQL and Percona Server 8.0 (from 8.0.23): channels, `SHOW REPLICA STATUS`,
    /// `SOURCE_*` options, `performance_schema.log_status`.
    MySql8,
}

impl Dialect {
    pub fn of(flavor: Flavor, version: (u32, u32)) -> Dialect {
        match flavor {
            Flavor::MariaDb => Dialect::MariaDb,
            Flavor::MySql | Flavor::Percona if version < (8, 0) => Dialect::MySql57,
            Flavor::MySql | Flavor::Percona => Dialect::MySql8,
        }
    }

    /// Lists the replication connections, one row each (no row: not a replica).
    pub fn replica_status(self) -> &'static str {
        match self {
            Dialect::MariaDb => "SHOW ALL SLAVES STATUS",
            Dialect::MySql57 => "SHOW SLAVE STATUS",
            Dialect::MySql8 => "SHOW REPLICA STATUS",
        }
    }

    /// How many temporary tables the replication SQL threads hold open (one row, `Value`).
    pub fn open_temp_tables(self) -> &'static str {
        match self {
            Dialect::MariaDb | Dialect::MySql57 => {
                "SHOW GLOBAL STATUS LIKE 'Slave_open_temp_tables'"
            }
            Dialect::MySql8 => "SHOW GLOBAL STATUS LIKE 'Replica_open_temp_tables'",
        }
    }

    /// Stops (or starts) the SQL thread of the connection or channel `name` (empty: the
    /// default one).
    pub fn sql_thread(self, verb: ThreadVerb, name: &str) -> String {
        let verb = match verb {
            ThreadVerb::Stop => "STOP",
            ThreadVerb::Start => "START",
        };
        let name = super::quote(name);
        match self {
            Dialect::MariaDb => format!("{verb} SLAVE {name} SQL_THREAD"),
            Dialect::MySql57 => format!("{verb} SLAVE SQL_THREAD FOR CHANNEL {name}"),
            Dialect::MySql8 => format!("{verb} REPLICA SQL_THREAD FOR CHANNEL {name}"),
        }
    }
}

/// What [`Dialect::sql_thread`] does to a replication SQL thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadVerb {
    Stop,
    Start,
}

/// What decides the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanFacts {
    pub flavor: Flavor,
    pub version: (u32, u32),
    /// `innodb_flush_log_at_trx_commit`.
    pub flush_log_at_trx_commit: u8,
    pub binlog: bool,
    pub replica: bool,
}

/// The statements of the validity point, stage by stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// How this flavor speaks of replication (listing, SQL threads, coordinates).
    pub dialect: Dialect,
    /// Before anything is locked, once the copy phase is over: locks that wait for DDL
    /// and flush non-transactional tables (each wait bounded by `lock_wait_timeout`).
    pub prepare: Vec<String>,
    /// Blocks commits (and binlog writes): the commit block starts when it returns.
    pub block_commits: Vec<String>,
    /// Under the block: make the engine log cover every commit in the binlog.
    pub sync_engine_log: Vec<String>,
    /// Under the block: where the binlog is (parsed by `coordinates::binlog_position`).
    pub binlog_coordinates: Vec<String>,
    /// Under the block, on a replica: where each replication connection is, and the GTID
    /// state a server started on the image resumes from (parsed by
    /// `coordinates::replica_coordinates`).
    pub replica_coordinates: Vec<String>,
    /// After the stop: every lock released, in order.
    pub release: Vec<String>,
}

/// The statement plan of a flavor.
pub fn plan(f: &PlanFacts) -> Plan {
    let flush_logs = "FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS".to_string();
    let dialect = Dialect::of(f.flavor, f.version);
    // On MySQL the GTID state a replica resumes from is its gtid_executed.
    let replica_coordinates = |gtid: &str| {
        if f.replica {
            vec![dialect.replica_status().to_string(), gtid.to_string()]
        } else {
            Vec::new()
        }
    };
    match dialect {
        Dialect::MariaDb => Plan {
            dialect,
            prepare: vec![
                "BACKUP STAGE START".into(),
                "BACKUP STAGE FLUSH".into(),
                "BACKUP STAGE BLOCK_DDL".into(),
            ],
            block_commits: vec!["BACKUP STAGE BLOCK_COMMIT".into()],
            // FLUSH ENGINE LOGS writes InnoDB's log buffer only when the setting is not
            // 0 (and does not fsync at 2; we need the write, not the fsync: the capture
            // sees every write). At 0 the setting is raised to 2 for that one flush.
            sync_engine_log: if f.flush_log_at_trx_commit == 0 {
                vec![
                    "SET GLOBAL innodb_flush_log_at_trx_commit = 2".into(),
                    flush_logs,
                    "SET GLOBAL innodb_flush_log_at_trx_commit = 0".into(),
                ]
            } else {
                vec![flush_logs]
            },
            binlog_coordinates: if f.binlog {
                vec![
                    "SHOW MASTER STATUS".into(),
                    "SELECT @@GLOBAL.gtid_binlog_pos".into(),
                ]
            } else {
                Vec::new()
            },
            replica_coordinates: replica_coordinates("SELECT @@GLOBAL.gtid_slave_pos"),
            release: vec!["BACKUP STAGE END".into()],
        },
        // A lock that waits for DDL, then one that blocks commits, each with its release.
        Dialect::MySql57 | Dialect::MySql8 => {
            let ((ddl, unlock_ddl), (commits, unlock_commits), binlog) =
                if dialect == Dialect::MySql57 {
                    // Percona Server 5.7's backup locks (MySQL 5.7 has none: LOCK INSTANCE
                    // is 8.0's); Executed_Gtid_Set is a column of SHOW MASTER STATUS here.
                    (
                        ("LOCK TABLES FOR BACKUP", "UNLOCK TABLES"),
                        ("LOCK BINLOG FOR BACKUP", "UNLOCK BINLOG"),
                        "SHOW MASTER STATUS",
                    )
                } else {
                    // MySQL 8 and Percona Server 8: LOCK INSTANCE FOR BACKUP blocks DDL but
                    // not commits, so a read lock blocks them, whatever the engines. The
                    // validity point is the capture stop, not the log_status snapshot:
                    // log_status gives the binlog position, GTID set and redo LSN
                    // consistent with each other at the instant it is read, but a commit
                    // between that read and the stop would still reach the image, which
                    // would then be past the recorded position. The read lock holds
                    // commits from before the coordinates are read until after the stop
                    // (taken after the copy phase, its wait bounded by lock_wait_timeout
                    // like every stage's).
                    (
                        ("LOCK INSTANCE FOR BACKUP", "UNLOCK INSTANCE"),
                        (
                            "FLUSH NO_WRITE_TO_BINLOG TABLES WITH READ LOCK",
                            "UNLOCK TABLES",
                        ),
                        "SELECT LOCAL FROM performance_schema.log_status",
                    )
                };
            Plan {
                dialect,
                prepare: vec![ddl.into()],
                block_commits: vec![commits.into()],
                sync_engine_log: vec![flush_logs],
                binlog_coordinates: if f.binlog {
                    vec![binlog.into()]
                } else {
                    Vec::new()
                },
                replica_coordinates: replica_coordinates("SELECT @@GLOBAL.gtid_executed"),
                // Released in the reverse order of taking: commits first.
                release: vec![unlock_commits.into(), unlock_ddl.into()],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(flavor: Flavor, version: (u32, u32)) -> PlanFacts {
        PlanFacts {
            flavor,
            version,
            flush_log_at_trx_commit: 1,
            binlog: true,
            replica: false,
        }
    }

    #[test]
    fn detects_flavors_from_version_strings() {
        assert_eq!(
            Flavor::detect("10.11.19-MariaDB-0+deb12u1", "Debian 12"),
            Flavor::MariaDb
        );
        assert_eq!(
            Flavor::detect("8.0.36", "MySQL Community Server - GPL"),
            Flavor::MySql
        );
        assert_eq!(
            Flavor::detect(
                "8.0.35-27",
                "Percona Server (GPL), Release 27, Revision 2f8eeab2"
            ),
            Flavor::Percona
        );
        assert_eq!(major_minor("10.11.19-MariaDB-0+deb12u1"), (10, 11));
        assert_eq!(major_minor("5.7.44-48-log"), (5, 7));
        assert_eq!(version_triple("10.11.19-MariaDB-0+deb12u1"), (10, 11, 19));
        assert_eq!(version_triple("8.0.35-27"), (8, 0, 35));
        assert_eq!(version_triple("8.0.22"), (8, 0, 22));
        assert_eq!(version_triple("8.4"), (8, 4, 0));
    }

    #[test]
    fn servers_without_the_plans_statements_are_refused_by_version() {
        for (flavor, version) in [
            (Flavor::MariaDb, "10.11.19-MariaDB-0+deb12u1"),
            (Flavor::MariaDb, "10.4.34-MariaDB-log"),
            (Flavor::MariaDb, "11.4.2-MariaDB-log"),
            (Flavor::Percona, "5.7.44-48-log"),
            (Flavor::MySql, "8.0.23"),
            (Flavor::MySql, "8.0.36"),
            (Flavor::MySql, "8.4.0"),
            (Flavor::Percona, "8.0.23-14"),
            (Flavor::Percona, "8.0.35-27"),
        ] {
            assert_eq!(supported(flavor, version), Ok(()), "{flavor:?} {version}");
        }
        for (flavor, version, lacks) in [
            (Flavor::MariaDb, "10.3.39-MariaDB-0+deb10u2", "BACKUP STAGE"),
            (Flavor::MariaDb, "5.5.68-MariaDB", "BACKUP STAGE"),
            (Flavor::MySql, "5.7.44-log", "backup locks"),
            (Flavor::MySql, "5.6.51", "backup locks"),
            (Flavor::Percona, "5.6.51-91.0", "replication channels"),
            (Flavor::MySql, "8.0.21", "SHOW REPLICA STATUS"),
            (Flavor::MySql, "8.0.22", "CHANGE REPLICATION SOURCE TO"),
            (Flavor::Percona, "8.0.22-13", "CHANGE REPLICATION SOURCE TO"),
            (Flavor::Percona, "8.0.19-10", "SHOW REPLICA STATUS"),
        ] {
            let refusal = supported(flavor, version).expect_err(version);
            assert!(
                refusal.starts_with(&format!("{} {version} is not supported", flavor.name())),
                "{refusal}"
            );
            assert!(refusal.contains(lacks), "{refusal}");
            assert!(refusal.ends_with(SUPPORTED), "{refusal}");
        }
        assert_eq!(
            supported(Flavor::MySql, "5.7.44-log").unwrap_err(),
            "MySQL 5.7.44-log is not supported: it lacks backup locks (LOCK INSTANCE FOR BACKUP, MySQL 8.0), which the backup uses; supported are MariaDB 10.4 and later, MySQL and Percona Server 8.0.23 and later, and Percona Server 5.7"
        );
    }

    #[test]
    fn mariadb_blocks_commits_with_backup_stages_and_raises_a_zero_log_setting() {
        let p = plan(&facts(Flavor::MariaDb, (10, 11)));
        assert_eq!(
            p.prepare,
            [
                "BACKUP STAGE START",
                "BACKUP STAGE FLUSH",
                "BACKUP STAGE BLOCK_DDL"
            ]
        );
        assert_eq!(p.block_commits, ["BACKUP STAGE BLOCK_COMMIT"]);
        assert_eq!(p.sync_engine_log, ["FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS"]);
        assert_eq!(p.release, ["BACKUP STAGE END"]);
        assert!(p.replica_coordinates.is_empty());
        let zero = plan(&PlanFacts {
            flush_log_at_trx_commit: 0,
            replica: true,
            binlog: false,
            ..facts(Flavor::MariaDb, (10, 11))
        });
        assert_eq!(
            zero.sync_engine_log,
            [
                "SET GLOBAL innodb_flush_log_at_trx_commit = 2",
                "FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS",
                "SET GLOBAL innodb_flush_log_at_trx_commit = 0"
            ]
        );
        assert!(zero.binlog_coordinates.is_empty());
        assert_eq!(
            zero.replica_coordinates,
            ["SHOW ALL SLAVES STATUS", "SELECT @@GLOBAL.gtid_slave_pos"]
        );
    }

    #[test]
    fn percona_57_uses_backup_locks() {
        let p = plan(&facts(Flavor::Percona, (5, 7)));
        assert_eq!(p.prepare, ["LOCK TABLES FOR BACKUP"]);
        assert_eq!(p.block_commits, ["LOCK BINLOG FOR BACKUP"]);
        assert_eq!(p.release, ["UNLOCK BINLOG", "UNLOCK TABLES"]);
        assert_eq!(p.binlog_coordinates, ["SHOW MASTER STATUS"]);
        let replica = plan(&PlanFacts {
            replica: true,
            ..facts(Flavor::Percona, (5, 7))
        });
        assert_eq!(
            replica.replica_coordinates,
            ["SHOW SLAVE STATUS", "SELECT @@GLOBAL.gtid_executed"]
        );
    }

    #[test]
    fn mysql_8_always_blocks_commits_with_a_read_lock_until_after_the_stop() {
        for flavor in [Flavor::MySql, Flavor::Percona] {
            for replica in [false, true] {
                let p = plan(&PlanFacts {
                    replica,
                    ..facts(flavor, (8, 0))
                });
                assert_eq!(p.prepare, ["LOCK INSTANCE FOR BACKUP"]);
                // InnoDB-only tables too: LOCK INSTANCE FOR BACKUP lets commits through.
                assert_eq!(
                    p.block_commits,
                    ["FLUSH NO_WRITE_TO_BINLOG TABLES WITH READ LOCK"]
                );
                assert_eq!(
                    p.binlog_coordinates,
                    ["SELECT LOCAL FROM performance_schema.log_status"]
                );
                assert_eq!(p.release, ["UNLOCK TABLES", "UNLOCK INSTANCE"]);
            }
            let replica = plan(&PlanFacts {
                replica: true,
                ..facts(flavor, (8, 0))
            });
            assert_eq!(
                replica.replica_coordinates,
                ["SHOW REPLICA STATUS", "SELECT @@GLOBAL.gtid_executed"]
            );
        }
    }

    /// The image is taken at the capture stop, after the coordinates are read: every
    /// flavor's plan must block commits before reading them and release only after.
    #[test]
    fn every_plan_blocks_commits_from_before_the_coordinates_to_the_release() {
        for (flavor, version) in [
            (Flavor::MariaDb, (10, 11)),
            (Flavor::Percona, (5, 7)),
            (Flavor::MySql, (8, 0)),
            (Flavor::Percona, (8, 0)),
        ] {
            for (binlog, replica) in [(true, false), (false, true), (true, true)] {
                let p = plan(&PlanFacts {
                    binlog,
                    replica,
                    ..facts(flavor, version)
                });
                let at = format!("{flavor:?} {version:?}");
                assert!(!p.block_commits.is_empty(), "{at}: commits never blocked");
                assert!(!p.release.is_empty(), "{at}: nothing released");
            }
        }
    }

    #[test]
    fn each_dialect_lists_replicas_and_stops_sql_threads_in_its_own_words() {
        let d = |flavor, version| Dialect::of(flavor, version);
        assert_eq!(d(Flavor::MariaDb, (10, 11)), Dialect::MariaDb);
        assert_eq!(d(Flavor::Percona, (5, 7)), Dialect::MySql57);
        assert_eq!(d(Flavor::MySql, (8, 0)), Dialect::MySql8);
        assert_eq!(d(Flavor::Percona, (8, 0)), Dialect::MySql8);
        for (dialect, verb, name, sql) in [
            (
                Dialect::MariaDb,
                ThreadVerb::Stop,
                "east",
                "STOP SLAVE 'east' SQL_THREAD",
            ),
            (
                Dialect::MariaDb,
                ThreadVerb::Start,
                "",
                "START SLAVE '' SQL_THREAD",
            ),
            (
                Dialect::MySql57,
                ThreadVerb::Stop,
                "",
                "STOP SLAVE SQL_THREAD FOR CHANNEL ''",
            ),
            (
                Dialect::MySql8,
                ThreadVerb::Start,
                "east",
                "START REPLICA SQL_THREAD FOR CHANNEL 'east'",
            ),
        ] {
            assert_eq!(dialect.sql_thread(verb, name), sql);
        }
        assert_eq!(
            Dialect::MySql8.open_temp_tables(),
            "SHOW GLOBAL STATUS LIKE 'Replica_open_temp_tables'"
        );
        assert_eq!(Dialect::MySql57.replica_status(), "SHOW SLAVE STATUS");
    }
}
