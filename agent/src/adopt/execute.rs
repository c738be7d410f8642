//! Carrying out an adopt plan, and planning and carrying out its reverse from the record.
//! Nothing here deletes data: directories are removed only with rmdir (empty ones), and
//! files only when the record says adopt wrote them.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{AdoptError, AdoptPlan, AdoptRecord, UnadoptOptions, record_path, refuse};
use crate::in_use::in_use;
use crate::service::{self, ENV_DIR, TEMPLATE};

fn step(what: String, fix: String) -> impl FnOnce(io::Error) -> AdoptError {
    move |error| AdoptError::Step { what, error, fix }
}

/// Carries out `plan`; returns the commands left for the operator to run.
pub fn adopt(plan: &AdoptPlan) -> Result<Vec<String>, AdoptError> {
    let r = &plan.record;
    let record = plan.root.join(&r.files.last().expect("the record").path);
    let data = r.datadir.display();
    let undo = format!("run `hotbackup unadopt --datadir {data}` to put the files back");
    // First, so that every later step can be undone from it.
    write_atomically(&record, &serde_json::to_vec_pretty(r).expect("record")).map_err(step(
        format!("could not write {}", record.display()),
        "nothing was changed".into(),
    ))?;
    if let Err(e) = fs::rename(&r.datadir, &r.backing) {
        let _ = fs::remove_file(&record);
        let why = if e.raw_os_error() == Some(libc::EXDEV) {
            "the backing path must be on the datadir's own filesystem (and mount)".to_string()
        } else {
            "nothing was changed".to_string()
        };
        return Err(step(
            format!("could not rename {data} to {}", r.backing.display()),
            why,
        )(e));
    }
    make_mountpoint(r).map_err(step(
        format!("could not create the mountpoint {data}"),
        undo.clone(),
    ))?;
    sync_parents(r);
    service::install(&plan.root, &plan.units).map_err(step(
        format!("could not write the units under {}", plan.root.display()),
        undo,
    ))?;
    let commands = [
        vec!["daemon-reload".to_string()],
        vec!["enable".into(), "--now".into(), r.instance.clone()],
    ];
    systemctl_or_print(plan.systemctl, &commands)
}

fn make_mountpoint(r: &AdoptRecord) -> io::Result<()> {
    fs::create_dir(&r.datadir)?;
    std::os::unix::fs::chown(&r.datadir, Some(r.uid), Some(r.gid))?;
    // After chown, which clears set-id bits; and not through mkdir, which the umask cuts.
    fs::set_permissions(&r.datadir, fs::Permissions::from_mode(r.mode))
}

/// The renames and the new directory survive a power cut once their parents are synced.
fn sync_parents(r: &AdoptRecord) {
    for p in [&r.datadir, &r.backing] {
        if let Some(dir) = p.parent().and_then(|d| fs::File::open(d).ok()) {
            let _ = dir.sync_all();
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().expect("a file in a directory");
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Runs each `systemctl ARGS` when systemd manages the root; otherwise returns them as
/// the commands to run.
fn systemctl_or_print(run: bool, commands: &[Vec<String>]) -> Result<Vec<String>, AdoptError> {
    let text = |c: &Vec<String>| format!("systemctl {}", c.join(" "));
    if !run {
        return Ok(commands.iter().map(text).collect());
    }
    for c in commands {
        let status = Command::new("systemctl").args(c).status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            let error = match status {
                Err(e) => e,
                Ok(s) => io::Error::other(format!("it exited with {s}")),
            };
            return Err(step(
                format!("`{}` failed", text(c)),
                "fix that and run it again".to_string(),
            )(error));
        }
    }
    Ok(Vec::new())
}

/// One step of undoing an adoption.
#[derive(Clone, Debug, PartialEq)]
pub enum UnadoptStep {
    /// systemctl disable --now the agent instance.
    StopAgent(String),
    /// Detach the mount a crashed agent left.
    DetachDeadMount,
    /// rmdir the (empty) mountpoint.
    RemoveMountpoint,
    RenameBack,
    RemoveFile(PathBuf),
    DaemonReload,
}

#[derive(Clone, Debug)]
pub struct UnadoptPlan {
    pub root: PathBuf,
    pub record: AdoptRecord,
    pub steps: Vec<UnadoptStep>,
}

/// Plans undoing what the record of adopting `options.datadir` says adopt did, from
/// whatever step an interrupted adopt or unadopt reached.
pub fn unadopt_plan(options: &UnadoptOptions) -> Result<UnadoptPlan, AdoptError> {
    let root = &options.common.root;
    let datadir = &options.datadir;
    let record_file = root.join(record_path(datadir)?);
    let record: AdoptRecord = match fs::read(&record_file) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            AdoptError::Refused(format!(
                "the record {} is not readable ({e}); undo by hand: stop the agent, rmdir the empty mountpoint and rename the backing directory back",
                record_file.display()
            ))
        })?,
        Err(e) => {
            return refuse(format!(
                "{} was not adopted here (no record at {}: {e}); nothing to undo",
                datadir.display(),
                record_file.display()
            ));
        }
    };
    let data = record.datadir.display();
    let backing = record.backing.display();
    if let Some((pid, name)) = in_use(&record.datadir) {
        return refuse(format!(
            "{data} is in use by process {pid} ({name}); stop the server first (e.g. `systemctl stop mariadb`)"
        ));
    }
    let systemctl = super::systemd_manages(root);
    let mut steps = Vec::new();
    if systemctl {
        steps.push(UnadoptStep::StopAgent(record.instance.clone()));
    }
    let mounted = capture::mountinfo::mount_at(&record.datadir);
    match &mounted {
        Some(_) if crate::stale::is_dead_mount(&record.datadir) => {
            steps.push(UnadoptStep::DetachDeadMount)
        }
        Some(_) if systemctl => {}
        Some(m) => {
            return refuse(format!(
                "{data} is still mounted ({}); stop its agent first: `hotbackup unmount --mountpoint {data}`",
                m.fstype
            ));
        }
        None => {}
    }
    let backing_there = fs::symlink_metadata(&record.backing).is_ok();
    let datadir_there = mounted.is_some() || fs::symlink_metadata(&record.datadir).is_ok();
    if backing_there {
        if mounted.is_none() {
            if let Some((pid, name)) = in_use(&record.backing) {
                return refuse(format!(
                    "{backing} is in use by process {pid} ({name}); stop it first"
                ));
            }
            let empty = fs::read_dir(&record.datadir).is_ok_and(|mut d| d.next().is_none());
            if datadir_there && !empty {
                return refuse(format!(
                    "{data} is not empty and the adopted files are in {backing}; move one of them aside by hand (unadopt never deletes data), then run unadopt again"
                ));
            }
        }
        if datadir_there {
            steps.push(UnadoptStep::RemoveMountpoint);
        }
        steps.push(UnadoptStep::RenameBack);
    } else if !datadir_there {
        return refuse(format!(
            "neither {data} nor {backing} exists; the files are elsewhere: put them at {data} by hand"
        ));
    }
    let others = other_instances(root, &record);
    for f in &record.files {
        let keep = f.existed_before
            || (f.path.file_name() == Some(TEMPLATE.as_ref()) && others)
            || f.path == record_path(&record.datadir)?;
        if !keep {
            steps.push(UnadoptStep::RemoveFile(f.path.clone()));
        }
    }
    if systemctl {
        steps.push(UnadoptStep::DaemonReload);
    }
    steps.push(UnadoptStep::RemoveFile(record_path(&record.datadir)?));
    Ok(UnadoptPlan {
        root: root.clone(),
        record,
        steps,
    })
}

/// Whether other agent instances still use the shared template (their env files remain).
fn other_instances(root: &Path, record: &AdoptRecord) -> bool {
    let ours: Vec<_> = record.files.iter().map(|f| root.join(&f.path)).collect();
    fs::read_dir(root.join(ENV_DIR)).is_ok_and(|d| {
        d.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("agent-") && name.ends_with(".env") && !ours.contains(&e.path())
        })
    })
}

impl fmt::Display for UnadoptStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnadoptStep::StopAgent(unit) => write!(f, "systemctl disable --now {unit}"),
            UnadoptStep::DetachDeadMount => write!(f, "detach the dead mount a crashed agent left"),
            UnadoptStep::RemoveMountpoint => write!(f, "remove the empty mountpoint"),
            UnadoptStep::RenameBack => write!(f, "rename the backing directory back"),
            UnadoptStep::RemoveFile(p) => write!(f, "remove /{}", p.display()),
            UnadoptStep::DaemonReload => write!(f, "systemctl daemon-reload"),
        }
    }
}

impl fmt::Display for UnadoptPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.record;
        writeln!(
            f,
            "undo adopting {} (files in {})",
            r.datadir.display(),
            r.backing.display()
        )?;
        for (i, s) in self.steps.iter().enumerate() {
            match s {
                // Under the root the plan was made for, which need not be /.
                UnadoptStep::RemoveFile(p) => {
                    writeln!(f, "{}. remove {}", i + 1, self.root.join(p).display())?
                }
                s => writeln!(f, "{}. {s}", i + 1)?,
            }
        }
        Ok(())
    }
}

/// Carries out an unadopt plan, step by step; each failure names what is left to do.
pub fn unadopt(plan: &UnadoptPlan) -> Result<(), AdoptError> {
    let r = &plan.record;
    let data = r.datadir.display().to_string();
    let again = format!("fix that and run `hotbackup unadopt --datadir {data}` again");
    for s in &plan.steps {
        let fail = step(format!("could not {s}"), again.clone());
        match s {
            UnadoptStep::StopAgent(unit) => {
                let c = vec!["disable".into(), "--now".into(), unit.clone()];
                systemctl_or_print(true, &[c])?;
            }
            UnadoptStep::DetachDeadMount => {
                crate::stale::clear_dead_mount(&r.datadir).map_err(fail)?;
            }
            UnadoptStep::RemoveMountpoint => {
                if capture::mountinfo::mount_at(&r.datadir).is_some() {
                    return refuse(format!(
                        "{data} is still mounted; stop its agent (`hotbackup unmount --mountpoint {data}`) and run unadopt again"
                    ));
                }
                // rmdir: a mountpoint something wrote into is refused, never emptied.
                fs::remove_dir(&r.datadir).map_err(fail)?;
            }
            UnadoptStep::RenameBack => {
                fs::rename(&r.backing, &r.datadir).map_err(fail)?;
                sync_parents(r);
            }
            UnadoptStep::RemoveFile(p) => match fs::remove_file(plan.root.join(p)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(fail(e)),
                _ => {}
            },
            UnadoptStep::DaemonReload => {
                systemctl_or_print(true, &[vec!["daemon-reload".into()]])?;
            }
        }
    }
    Ok(())
}
