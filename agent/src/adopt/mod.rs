//! `hotbackup adopt` and `unadopt`: putting an existing server's datadir on a hotbackup
//! mount and taking it off again, planned first (`--dry-run` prints the plan) and recorded
//! so that the reverse is exact.
//!
//! Adopt renames the datadir to the backing path (one rename(2): atomic, no copy, so it
//! must stay on one filesystem), makes an empty mountpoint with the datadir's owner, group
//! and mode, and writes the agent's units. SELinux labels and ACLs on the datadir itself
//! are not carried over to the new mountpoint (out of scope; the files keep theirs).
//! The record (`/etc/hotbackup/adopted-<instance>.json`) is written before anything moves,
//! so a crash at any step leaves a state `unadopt` can finish.

mod execute;

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::in_use::in_use;
use crate::service::{self, ServiceOptions, UnitFile};

pub use execute::{UnadoptPlan, UnadoptStep, adopt, unadopt, unadopt_plan};

/// Options of `hotbackup adopt`.
#[derive(Clone, Debug, clap::Args, Serialize, Deserialize)]
pub struct AdoptOptions {
    /// The server's datadir: its files move to --backing, and it becomes the mountpoint.
    #[arg(long, default_value = "/var/lib/mysql")]
    pub datadir: PathBuf,
    /// Where the files go, on the datadir's filesystem [default: <datadir>.backing].
    #[arg(long)]
    pub backing: Option<PathBuf>,
    /// The database server's unit, which gets the drop-in that requires the agent.
    #[arg(long, default_value = "mariadb.service")]
    pub server_unit: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub common: AdoptCommon,
}

/// What `adopt` and `unadopt` share.
#[derive(Clone, Debug, clap::Args, Serialize, Deserialize)]
pub struct AdoptCommon {
    /// The root directory units and the record are written under; systemctl is run
    /// only for / on a host booted with systemd (otherwise the commands are printed).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Options of `hotbackup unadopt`.
#[derive(Clone, Debug, clap::Args, Serialize, Deserialize)]
pub struct UnadoptOptions {
    /// The datadir `hotbackup adopt` put on a mount.
    #[arg(long, default_value = "/var/lib/mysql")]
    pub datadir: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub common: AdoptCommon,
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// A refusal before anything changed; the sentence names the fix.
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {error}; {fix}")]
    Step {
        what: String,
        error: std::io::Error,
        fix: String,
    },
    #[error(transparent)]
    Service(#[from] service::ServiceError),
}

fn refuse<T>(msg: String) -> Result<T, AdoptError> {
    Err(AdoptError::Refused(msg))
}

/// A unit file adopt writes, and whether one was already there (then it is left in place
/// by unadopt: it was not ours to remove).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedFile {
    /// Relative to the root.
    pub path: PathBuf,
    pub existed_before: bool,
}

/// What adopt did, kept so that unadopt reverses exactly that.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdoptRecord {
    pub datadir: PathBuf,
    pub backing: PathBuf,
    /// The datadir's mode (permission bits), owner and group, given to the mountpoint.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The agent instance's unit, e.g. `hotbackup-agent@var-lib-mysql.service`.
    pub instance: String,
    pub files: Vec<RecordedFile>,
}

/// Where the record of adopting `datadir` lives, relative to the root.
pub fn record_path(datadir: &Path) -> Result<PathBuf, AdoptError> {
    Ok(
        Path::new(service::ENV_DIR)
            .join(format!("adopted-{}.json", service::escape_path(datadir)?)),
    )
}

/// Everything adopt will do, checked; printing it is `--dry-run`.
#[derive(Clone, Debug)]
pub struct AdoptPlan {
    pub root: PathBuf,
    pub record: AdoptRecord,
    pub units: Vec<UnitFile>,
    /// Run systemctl (root is / on a host booted with systemd) or print the commands.
    pub systemctl: bool,
}

/// True when `root` is the running system's and systemd manages it.
pub(crate) fn systemd_manages(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

/// Checks everything adopt needs, changing nothing; `exe` is the binary the units run.
pub fn plan(options: &AdoptOptions, exe: &Path) -> Result<AdoptPlan, AdoptError> {
    let datadir = options.datadir.clone();
    if !datadir.is_absolute() {
        return refuse(format!(
            "--datadir {} is not an absolute path; give the server's datadir as an absolute path",
            datadir.display()
        ));
    }
    let backing = options.backing.clone().unwrap_or_else(|| {
        let mut s = datadir.as_os_str().to_owned();
        s.push(".backing");
        PathBuf::from(s)
    });
    let root = &options.common.root;
    let record_rel = record_path(&datadir)?;
    if root.join(&record_rel).exists() {
        return refuse(format!(
            "{} was already adopted (the record {} exists); run `hotbackup unadopt --datadir {}` first, which also finishes an adopt that was interrupted",
            datadir.display(),
            root.join(&record_rel).display(),
            datadir.display()
        ));
    }
    let meta = match std::fs::symlink_metadata(&datadir) {
        Ok(m) => m,
        Err(e) => {
            return refuse(format!(
                "cannot read --datadir {}: {e}; name the server's existing datadir",
                datadir.display()
            ));
        }
    };
    if meta.file_type().is_symlink() {
        return refuse(format!(
            "--datadir {} is a symlink; pass the directory it points to",
            datadir.display()
        ));
    }
    if !meta.is_dir() {
        return refuse(format!(
            "--datadir {} is not a directory; name the server's datadir",
            datadir.display()
        ));
    }
    if let Some(m) = capture::mountinfo::mount_at(&datadir) {
        if crate::client::agent_socket(&m).is_some() {
            return refuse(format!(
                "{} is already a hotbackup mount; its files are already served by an agent (see `hotbackup status`)",
                datadir.display()
            ));
        }
        return refuse(format!(
            "{} is a mountpoint ({} from {}), which a rename cannot move; mount that filesystem at the backing path instead and run `hotbackup systemd --install --mountpoint {}`",
            datadir.display(),
            m.fstype,
            m.source.to_string_lossy(),
            datadir.display()
        ));
    }
    if let Some((pid, name)) = in_use(&datadir) {
        return refuse(format!(
            "{} is in use by process {pid} ({name}); stop the server first (e.g. `systemctl stop {}`)",
            datadir.display(),
            options.server_unit
        ));
    }
    if backing.starts_with(&datadir) || datadir.starts_with(&backing) {
        return refuse(format!(
            "--backing {} and --datadir {} overlap; choose a backing path beside the datadir",
            backing.display(),
            datadir.display()
        ));
    }
    if std::fs::symlink_metadata(&backing).is_ok() {
        return refuse(format!(
            "--backing {} already exists; adopt never writes into an existing path: remove it or choose another --backing",
            backing.display()
        ));
    }
    let parent = backing.parent().unwrap_or(Path::new("/"));
    let parent_meta = match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => m,
        _ => {
            return refuse(format!(
                "the directory {} for --backing does not exist; create it on the datadir's filesystem",
                parent.display()
            ));
        }
    };
    if parent_meta.dev() != meta.dev() {
        return refuse(format!(
            "--backing {} is on another filesystem than {}; adopt moves the datadir with one rename, which cannot cross filesystems (a copy would not be atomic): choose a backing path on the same filesystem",
            backing.display(),
            datadir.display()
        ));
    }
    let service = ServiceOptions {
        mountpoint: datadir.clone(),
        backing: Some(backing.clone()),
        server_unit: options.server_unit.clone(),
        timer: None,
    };
    let units = service::units(&service, exe)?;
    let files = units
        .iter()
        .map(|u| RecordedFile {
            path: u.path.clone(),
            existed_before: root.join(&u.path).exists(),
        })
        .chain(std::iter::once(RecordedFile {
            path: record_rel,
            existed_before: false,
        }))
        .collect();
    Ok(AdoptPlan {
        root: root.clone(),
        record: AdoptRecord {
            instance: service::instance_unit(&datadir)?,
            datadir,
            backing,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            files,
        },
        units,
        systemctl: systemd_manages(root),
    })
}

impl fmt::Display for AdoptPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.record;
        let root = |p: &Path| self.root.join(p);
        writeln!(
            f,
            "1. record the adoption in {}",
            root(&r.files.last().expect("the record").path).display()
        )?;
        writeln!(
            f,
            "2. rename {} -> {}",
            r.datadir.display(),
            r.backing.display()
        )?;
        writeln!(
            f,
            "3. create the empty mountpoint {} (owner {}:{}, mode {:04o})",
            r.datadir.display(),
            r.uid,
            r.gid,
            r.mode
        )?;
        for u in &r.files[..r.files.len() - 1] {
            let note = if u.existed_before {
                " (replacing the existing one)"
            } else {
                ""
            };
            writeln!(f, "4. write {}{note}", root(&u.path).display())?;
        }
        let how = if self.systemctl {
            ""
        } else {
            "(to run yourself) "
        };
        writeln!(
            f,
            "5. {how}systemctl daemon-reload && systemctl enable --now {}",
            r.instance
        )
    }
}
