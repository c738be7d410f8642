//! The coordinator of `hotbackup backup`: drives a staged capture session on the agent
//! and a SQL connection to the server through the validity point (DESIGN §4): copy with
//! no lock; then prepare (flush and block DDL), block commits, make the engine log cover
//! every commit, read the coordinates, stop capture, release; then finish the image
//! with the database's files. The server is never left locked and a replica is never
//! left with a stopped SQL thread, whatever fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{AgentAddress, ClientError, StagedClient};
use crate::control::{ExtraFile, Report, Request, Response};
use crate::copy::CopySummary;
use crate::db::coordinates::{self, BinlogPosition, ReplicaConnection};
use crate::db::flavor::{self, Dialect, Flavor, PlanFacts};
use crate::db::server::{self, ServerFacts};
use crate::db::{Db, DbError, Sql, Target};
use crate::history::History;
use crate::metrics;
use crate::options::CopyOptions;

mod safe_slave;
mod validity;

#[cfg(test)]
mod transcript_tests;

use validity::{at_validity_point, replica_connections};

/// Everything `hotbackup backup` takes besides the connection and the target.
#[derive(Clone, Debug, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupOptions {
    #[command(flatten)]
    pub copy: CopyOptions,
    /// The agent's control socket (default: found from the server's datadir mount).
    #[arg(long, value_name = "PATH")]
    pub agent_socket: Option<PathBuf>,
    /// Seconds any one lock may be waited for (a long ALTER or MyISAM write must not
    /// keep the server waiting behind the backup's queued lock).
    #[arg(long, default_value_t = 60, value_name = "S")]
    pub lock_wait_timeout: u64,
    /// On a replica: stop the SQL threads until no temporary table is open.
    #[arg(long)]
    pub safe_slave_backup: bool,
    /// Seconds to wait for the replica's temporary tables to close.
    #[arg(long, default_value_t = 300, value_name = "S")]
    pub safe_slave_backup_timeout: u64,
    /// Also keep a copy of these option files of the server in the target (as
    /// `hotbackup-config-<name>`); MySQL's `auto.cnf` is refused: a server started on
    /// the image must get its own server_uuid.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub copy_config: Vec<PathBuf>,
    /// Where the backup history goes (one JSON line per state change).
    #[arg(long, value_name = "PATH", default_value = crate::history::DEFAULT_FILE)]
    pub history_file: PathBuf,
    /// After every backup (success, error or cancel), write its outcome here in the
    /// Prometheus text format, for node_exporter's textfile collector (name it
    /// `*.prom` in the collector's directory). A file that cannot be written is a
    /// warning, never a failed backup.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            copy: CopyOptions::default(),
            agent_socket: None,
            lock_wait_timeout: 60,
            safe_slave_backup: false,
            safe_slave_backup_timeout: 300,
            copy_config: Vec::new(),
            history_file: PathBuf::from(crate::history::DEFAULT_FILE),
            metrics_file: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error("{0}")]
    Refused(String),
    #[error(
        "{stage} waited longer than --lock-wait-timeout ({timeout}s){blocker}; the backup was stopped and nothing stays locked; retry when it is done, or raise --lock-wait-timeout"
    )]
    LockWait {
        stage: String,
        timeout: u64,
        blocker: String,
    },
    #[error("the backup failed at the validity point: {0}")]
    AtValidityPoint(String),
}

/// What a finished backup reports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackupSummary {
    pub image: CopySummary,
    pub binlog: Option<BinlogPosition>,
    pub replication: Vec<ReplicaConnection>,
    pub lock: LockTimes,
}

/// How long each stage waited and how long commits were blocked, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LockTimes {
    /// From the moment commits were blocked until they were allowed again.
    pub commit_block_ms: f64,
    /// Each statement of the plan with how long it took.
    pub stages: Vec<(String, f64)>,
}

/// What the coordinator reports while it works.
pub enum Event<'a> {
    Copy(&'a Report),
    Note(String),
}

/// The agent serving the mount that holds `datadir`, with the mountpoint.
pub fn agent_for(datadir: &Path) -> Result<(AgentAddress, PathBuf), BackupError> {
    let datadir = std::fs::canonicalize(datadir).unwrap_or_else(|_| datadir.to_path_buf());
    let mount = capture::mountinfo::mounts()
        .into_iter()
        .rev()
        .filter(|m| datadir.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.components().count());
    let Some(mount) = mount else {
        return Err(BackupError::Refused(format!(
            "the server's datadir {} is on no mount the agent serves; put it on a hotbackup mount (`hotbackup agent`), or pass --agent-socket",
            datadir.display()
        )));
    };
    match crate::client::agent_socket(&mount) {
        Some(socket) => Ok((AgentAddress::Socket(socket), mount.mountpoint)),
        None => Err(BackupError::Refused(format!(
            "the server's datadir {} is on {} ({}), not on a hotbackup mount; run the server on a hotbackup mount, or pass --agent-socket",
            datadir.display(),
            mount.mountpoint.display(),
            mount.fstype
        ))),
    }
}

/// Runs a backup of the server at `conn` into `target`, and records its outcome in the
/// metrics file, if one is named.
pub fn run(
    conn: &Target,
    target: &Path,
    options: &BackupOptions,
    mut events: impl FnMut(Event<'_>),
) -> Result<BackupSummary, BackupError> {
    let started = std::time::Instant::now();
    let mut mountpoint = PathBuf::new();
    let result = run_backup(conn, target, options, &mut mountpoint, &mut events);
    if let Some(path) = &options.metrics_file {
        let attempt = metrics::Attempt {
            mountpoint: mountpoint.to_string_lossy().into_owned(),
            ended: metrics::epoch_secs(std::time::SystemTime::now()),
            duration_secs: started.elapsed().as_secs_f64(),
            success: result.as_ref().ok().map(|s| metrics::SuccessValues {
                commit_block_ms: s.lock.commit_block_ms,
                bytes: s.image.bytes,
                bytes_copied: s.image.bytes_copied,
                bytes_mirrored: s.image.bytes_mirrored,
                bytes_cloned: s.image.bytes_cloned,
            }),
        };
        if let Err(e) = metrics::record(path, &attempt) {
            events(Event::Note(format!(
                "WARNING: could not write the metrics file {}: {e}; the backup's own outcome is unaffected",
                path.display()
            )));
        }
    }
    result
}

/// The backup itself; `mountpoint` is set as soon as the server's mount is known.
fn run_backup(
    conn: &Target,
    target: &Path,
    options: &BackupOptions,
    mountpoint_out: &mut PathBuf,
    mut events: impl FnMut(Event<'_>),
) -> Result<BackupSummary, BackupError> {
    let session_options = options
        .copy
        .session()
        .map_err(|e| BackupError::Refused(e.to_string()))?;
    // ----- preflight: nothing is created before all of this passes -----------------
    let configs = read_configs(&options.copy_config)?;
    let mut db = Db::connect(conn)?;
    let facts = ServerFacts::read(&mut db)?;
    flavor::supported(facts.flavor, &facts.version).map_err(BackupError::Refused)?;
    if facts.flavor != Flavor::MariaDb {
        events(Event::Note(format!(
            "{} {}: this flavor's validity point is tested against recorded server transcripts only, not against a live server",
            facts.flavor.name(),
            facts.version
        )));
    }
    let dialect = Dialect::of(facts.flavor, facts.version_pair());
    let replicas = replica_connections(&mut db, dialect)?;
    let is_replica = !replicas.is_empty();
    let grants: Vec<String> = db
        .rows("SHOW GRANTS FOR CURRENT_USER()")?
        .into_iter()
        .filter_map(|r| r.into_values().next().flatten())
        .collect();
    let missing = server::missing_privileges(
        &grants,
        &server::needed_privileges(&facts, is_replica, options.safe_slave_backup),
    );
    if !missing.is_empty() {
        return Err(BackupError::Refused(format!(
            "user {:?} lacks what the backup needs: {}",
            conn.user,
            missing.join("; ")
        )));
    }
    let (address, mountpoint) = match &options.agent_socket {
        Some(s) => (
            AgentAddress::Socket(s.clone()),
            agent_for(&facts.datadir)
                .map(|(_, m)| m)
                .unwrap_or_default(),
        ),
        None => agent_for(&facts.datadir)?,
    };
    mountpoint_out.clone_from(&mountpoint);
    if !mountpoint.as_os_str().is_empty() {
        for (setting, path) in &facts.paths {
            let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            if !resolved.starts_with(&mountpoint) {
                return Err(BackupError::Refused(format!(
                    "{setting} is {}, outside the hotbackup mount {}: the image would miss it; move it below the mount (or set {setting} to a path there) and restart the server",
                    path.display(),
                    mountpoint.display()
                )));
            }
        }
    }
    match crate::client::call(&address, &Request::Status)? {
        Response::Status(s) if s.session.is_some() => {
            return Err(BackupError::Refused(
                "another backup is running on this mount; wait for it to finish (see `hotbackup status`)".into(),
            ));
        }
        Response::Status(_) => {}
        other => {
            return Err(BackupError::Refused(format!(
                "the agent answered {other:?} to a status request"
            )));
        }
    }
    let plan = flavor::plan(&PlanFacts {
        flavor: facts.flavor,
        version: facts.version_pair(),
        flush_log_at_trx_commit: facts.flush_log_at_trx_commit,
        binlog: facts.log_bin,
        replica: is_replica,
    });
    let history = History::open(&options.history_file, target);
    history.record("starting", None);
    // ----- the copy: no server lock at all ------------------------------------------
    let idle = Duration::from_secs(120);
    let (mut session, _) = StagedClient::begin(&address, target, session_options, idle, |r| {
        events(Event::Copy(r))
    })
    .inspect_err(|e| history.record("error", Some(&e.to_string())))?;
    history.record("copying", None);
    // ----- the validity point -------------------------------------------------------
    let outcome = at_validity_point(
        &mut db,
        &mut session,
        &plan,
        options,
        &replicas,
        &mut events,
    );
    let (coords, lock) = match outcome {
        Ok(v) => v,
        Err(e) => {
            session.cancel(&e.to_string());
            history.record(
                if matches!(e, BackupError::Agent(ClientError::Agent { .. })) {
                    "error"
                } else {
                    "cancelled"
                },
                Some(&e.to_string()),
            );
            return Err(e);
        }
    };
    history.record("validity_point", None);
    // ----- finish: the database's files next to the image ---------------------------
    let mut files = vec![ExtraFile {
        name: "hotbackup-my.cnf".into(),
        contents: my_cnf(&facts),
    }];
    files.extend(configs);
    if let Some(b) = &coords.binlog {
        files.push(ExtraFile {
            name: "hotbackup_binlog_info".into(),
            contents: b.info_line(),
        });
    }
    if !coords.replication.is_empty() {
        files.push(ExtraFile {
            name: "hotbackup_slave_info".into(),
            contents: coordinates::slave_info(
                plan.dialect,
                &coords.replication,
                &coords.replica_gtid,
            ),
        });
    }
    // Where the datadir is inside the image (the image is the whole mount).
    let datadir_in_image = std::fs::canonicalize(&facts.datadir)
        .ok()
        .and_then(|d| d.strip_prefix(&mountpoint).ok().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut database = serde_json::json!({
        "datadir_in_image": datadir_in_image,
        "server": {
            "flavor": facts.flavor,
            "version": facts.version,
            "server_id": facts.server_id,
            "hostname": facts.hostname,
            "datadir": facts.datadir,
            "binlog_format": facts.binlog_format,
            "innodb_flush_log_at_trx_commit": facts.flush_log_at_trx_commit,
            "sync_binlog": facts.sync_binlog,
        },
        "binlog": coords.binlog,
        "replication": coords.replication,
        "lock": lock,
    });
    // The GTID state a server started on the image resumes replication from, under its
    // own name.
    let gtid_key = match plan.dialect {
        Dialect::MariaDb => "gtid_slave_pos",
        Dialect::MySql57 | Dialect::MySql8 => "gtid_executed",
    };
    database[gtid_key] = serde_json::json!(coords.replica_gtid);
    let image = session
        .finish("backup", database, files, |r| events(Event::Copy(r)))
        .inspect_err(|e| history.record("error", Some(&e.to_string())))?;
    history.record("complete", None);
    Ok(BackupSummary {
        image,
        binlog: coords.binlog,
        replication: coords.replication,
        lock,
    })
}

/// `hotbackup-my.cnf`: the settings a server started on the image must have, in the
/// option group its server reads.
fn my_cnf(facts: &ServerFacts) -> String {
    let group = match facts.flavor {
        Flavor::MariaDb => "[mariadbd]",
        Flavor::MySql | Flavor::Percona => "[mysqld]",
    };
    let mut out = format!(
        "# Written by hotbackup: the settings of the backed-up server that a server\n\
         # started on this image must keep (restore, point-in-time replay, replicas).\n\
         {group}\n",
    );
    for (name, value) in &facts.settings {
        // Read-only variables that name what an option sets: the file must be usable
        // as an option file (`--defaults-extra-file`), so it holds the option.
        let name = match name.as_str() {
            "log_bin_basename" => "log_bin",
            other => other,
        };
        out.push_str(&format!("{name} = {value}\n"));
    }
    // The directories recovery reads, resolved (the restore moves them with the image).
    for (name, path) in &facts.paths {
        if name != "datadir" && name != "log_bin_basename" {
            out.push_str(&format!("{name} = {}\n", path.display()));
        }
    }
    out
}

/// The option files `--copy-config` names, read before anything else happens.
fn read_configs(paths: &[PathBuf]) -> Result<Vec<ExtraFile>, BackupError> {
    let mut out: Vec<ExtraFile> = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == "auto.cnf" {
            return Err(BackupError::Refused(format!(
                "--copy-config {}: auto.cnf holds the server's server_uuid, which a server started on the image must not share; leave it out",
                path.display()
            )));
        }
        let contents = std::fs::read_to_string(path).map_err(|e| {
            BackupError::Refused(format!(
                "--copy-config {}: {e}; name an option file the backup can read",
                path.display()
            ))
        })?;
        let name = format!("hotbackup-config-{name}");
        if out.iter().any(|f| f.name == name) {
            return Err(BackupError::Refused(format!(
                "--copy-config names two files called {:?}; copy them under different names",
                path.file_name().unwrap_or_default()
            )));
        }
        out.push(ExtraFile { name, contents });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_file_names_options_a_server_accepts() {
        let facts = ServerFacts {
            flavor: Flavor::MariaDb,
            version: "10.11.19-MariaDB".into(),
            server_id: 1,
            hostname: "h".into(),
            datadir: "/srv/db".into(),
            log_bin: true,
            log_bin_basename: Some("/srv/db/bin".into()),
            binlog_format: "ROW".into(),
            flush_log_at_trx_commit: 1,
            sync_binlog: 0,
            settings: vec![
                ("innodb_page_size".into(), "16384".into()),
                ("log_bin_basename".into(), "/srv/db/bin".into()),
                ("log_bin_index".into(), "/srv/db/bin.index".into()),
            ],
            paths: vec![
                ("datadir".into(), "/srv/db".into()),
                ("log_bin_basename".into(), "/srv/db".into()),
                ("innodb_log_group_home_dir".into(), "/srv/db".into()),
            ],
        };
        let text = my_cnf(&facts);
        assert!(text.contains("[mariadbd]\n"), "{text}");
        assert!(text.contains("\nlog_bin = /srv/db/bin\n"), "{text}");
        assert!(
            text.contains("\nlog_bin_index = /srv/db/bin.index\n"),
            "{text}"
        );
        assert!(
            text.contains("\ninnodb_log_group_home_dir = /srv/db\n"),
            "{text}"
        );
        assert!(!text.contains("basename"), "{text}");
    }
}
