//! Running the agent under systemd: the text of the units `hotbackup systemd` prints or
//! installs (pure functions of the options), and writing them under a root directory.
//!
//! The layout, for a mountpoint `/var/lib/mysql`:
//! * `/etc/systemd/system/hotbackup-agent@.service`: the template; its instance is the
//!   systemd-escaped mountpoint (`var-lib-mysql`), and `%f` gives the path back.
//! * `/etc/hotbackup/agent-var-lib-mysql.env`: the instance's backing directory
//!   (`HOTBACKUP_BACKING=`) and extra agent flags (`HOTBACKUP_AGENT_OPTIONS=`). The backing
//!   path is recorded here rather than derived from the mountpoint, because `adopt` and
//!   operators put it wherever the datadir's filesystem has room.
//! * `/etc/systemd/system/mariadb.service.d/hotbackup.conf`: makes the server require and
//!   start after its agent, so it never starts on an empty mountpoint.

use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The template unit's name.
pub const TEMPLATE: &str = "hotbackup-agent@.service";
/// Where unit files go, relative to the root.
pub const UNIT_DIR: &str = "etc/systemd/system";
/// Where the instances' environment files go, relative to the root.
pub const ENV_DIR: &str = "etc/hotbackup";

/// Options of `hotbackup systemd`, shared by the command line and config files.
#[derive(Clone, Debug, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct ServiceOptions {
    /// The database's datadir, served by the agent instance these units start.
    #[arg(long, default_value = "/var/lib/mysql")]
    pub mountpoint: PathBuf,
    /// The directory that holds the real files [default: <mountpoint>.backing].
    #[arg(long)]
    pub backing: Option<PathBuf>,
    /// The database server's unit, which gets the drop-in that requires the agent.
    #[arg(long, default_value = "mariadb.service")]
    pub server_unit: String,
    /// Also write hotbackup-backup.service and .timer: `hotbackup backup` (its options
    /// from /etc/hotbackup/hotbackup.toml) on this systemd calendar, e.g. daily or
    /// "*-*-* 02:30:00".
    #[arg(long, value_name = "CALENDAR")]
    #[serde(default)]
    pub timer: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ServiceError {
    #[error("{0} is not an absolute path; systemd units need absolute paths")]
    NotAbsolute(PathBuf),
    #[error("{0} contains '.' or '..'; give the plain path")]
    NotNormal(PathBuf),
    #[error("{0} contains a newline, which a unit file cannot hold")]
    Newline(PathBuf),
    #[error("the mountpoint cannot be / (the agent serves a directory below it)")]
    Root,
    #[error("{0:?} is not a service unit name (like mariadb.service)")]
    ServerUnit(String),
    #[error(
        "--timer {0:?} is not a calendar a unit can hold; give one like daily or \"*-*-* 02:30:00\""
    )]
    Calendar(String),
}

/// One file to write: where (relative to the root) and what.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitFile {
    pub path: PathBuf,
    pub text: String,
}

/// Escapes a path the way `systemd-escape --path` does: slashes become `-`, and every
/// byte outside `[A-Za-z0-9:_.]` (and a leading `.`) becomes `\xNN`.
pub fn escape_path(path: &Path) -> Result<String, ServiceError> {
    check_path(path)?;
    let parts: Vec<&[u8]> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.as_encoded_bytes()),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        return Ok("-".into());
    }
    let mut out = String::new();
    for (i, part) in parts.join(&b'/').iter().enumerate() {
        match *part {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'.' => {
                out.push(b as char)
            }
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    Ok(out)
}

/// The instance name of the agent serving `mountpoint`, e.g. `hotbackup-agent@var-lib-mysql.service`.
pub fn instance_unit(mountpoint: &Path) -> Result<String, ServiceError> {
    Ok(format!(
        "hotbackup-agent@{}.service",
        escape_path(mountpoint)?
    ))
}

fn check_path(path: &Path) -> Result<(), ServiceError> {
    if !path.is_absolute() {
        return Err(ServiceError::NotAbsolute(path.into()));
    }
    // Path::components() hides a `.` in the middle, so look at the raw segments.
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.split(|b| *b == b'/').any(|s| s == b"." || s == b"..") {
        return Err(ServiceError::NotNormal(path.into()));
    }
    if bytes.contains(&b'\n') {
        return Err(ServiceError::Newline(path.into()));
    }
    Ok(())
}

/// A word of a unit's command line: quoted, with systemd's specifiers (`%`) and variable
/// expansion (`$`) escaped so that the path is taken literally.
fn exec_word(path: &Path) -> String {
    let mut out = String::from("\"");
    for c in path.to_string_lossy().chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The template `hotbackup-agent@.service`, running the binary at `exe`.
pub fn agent_template(exe: &Path) -> String {
    format!(
        "\
# Written by `hotbackup systemd --install`. One instance per mountpoint: the instance
# name is the escaped mountpoint (systemd-escape --path /var/lib/mysql = var-lib-mysql),
# and /etc/hotbackup/agent-<instance>.env names the backing directory.
[Unit]
Description=hotbackup capture filesystem at %f
After=local-fs.target

[Service]
# READY=1 comes once the filesystem is mounted and the control socket listens.
Type=notify
NotifyAccess=main
EnvironmentFile=/etc/hotbackup/agent-%i.env
ExecStart={exe} agent --mountpoint %f --backing ${{HOTBACKUP_BACKING}} $HOTBACKUP_AGENT_OPTIONS
# SIGTERM unmounts, but the agent refuses while files are open on the mount (the server
# still runs) and keeps serving: the server's unit is ordered after this one, so it is
# stopped first. A crash leaves a dead mount (ENOTCONN: Transport endpoint is not connected);
# the restarted agent detaches it before mounting again (never a live one).
KillSignal=SIGTERM
TimeoutStopSec=5min
Restart=on-failure
RestartSec=2s
# An inode or open file of the database is a descriptor in the agent.
LimitNOFILE=1048576
# Hardening that leaves the mount visible to everyone else: no option that gives the
# service a mount namespace of its own (ProtectSystem, ProtectHome, PrivateTmp,
# PrivateDevices, ReadOnlyPaths, ProtectKernel*...), or the server would see the empty
# directory under it. Mounting needs CAP_SYS_ADMIN and /dev/fuse; passing through a
# request as its caller needs the file-ownership capabilities and setfsuid/setfsgid.
# The loop devices are for `--block-device auto` (a fuseblk mount over a 1 MiB loop
# device of the agent's own, so that InnoDB writes its redo log with O_DIRECT).
DevicePolicy=closed
DeviceAllow=/dev/fuse rw
DeviceAllow=/dev/loop-control rw
DeviceAllow=block-loop rw
CapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_FSETID CAP_CHOWN CAP_SETUID CAP_SETGID CAP_MKNOD
NoNewPrivileges=yes
RestrictAddressFamilies=AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
",
        exe = exec_word(exe)
    )
}

/// An environment-file value: double-quoted, so spaces survive.
fn env_value(path: &Path) -> String {
    let mut out = String::from("\"");
    for c in path.to_string_lossy().chars() {
        if matches!(c, '"' | '\\' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The instance's environment file: its backing directory and extra agent flags.
pub fn environment_file(mountpoint: &Path, backing: &Path) -> String {
    format!(
        "\
# The hotbackup agent serving {mountpoint} (written by `hotbackup systemd --install`).
HOTBACKUP_BACKING={backing}
# Extra flags of `hotbackup agent`, split at spaces, e.g. --threads 16 --block-device auto
HOTBACKUP_AGENT_OPTIONS=
",
        mountpoint = mountpoint.display(),
        backing = env_value(backing)
    )
}

/// The server unit's drop-in: it needs the agent instance and starts after it (and so
/// is stopped before it).
pub fn server_dropin(instance: &str) -> String {
    format!(
        "\
# Written by `hotbackup systemd --install`: the server's files are served by {instance},
# so the server must never start on the empty mountpoint under it.
[Unit]
Requires={instance}
After={instance}
"
    )
}

/// The scheduled backup's service and timer unit names.
pub const BACKUP_SERVICE: &str = "hotbackup-backup.service";
pub const BACKUP_TIMER: &str = "hotbackup-backup.timer";

/// The scheduled backup: `hotbackup backup` with every option from the config file.
pub fn backup_service(exe: &Path, server_unit: &str, instance: &str) -> String {
    format!(
        "\
# Written by `hotbackup systemd --install --timer`: started by {BACKUP_TIMER}. Every
# option comes from /etc/hotbackup/hotbackup.toml (target.root or target.dir names a
# new directory per run); `systemctl start {BACKUP_SERVICE}` runs one now.
[Unit]
Description=hotbackup backup of the server on its agent's mount
# Not Requires=: a backup must never start the server or its agent; it fails instead,
# and says which is down.
After={server_unit} {instance}

[Service]
Type=oneshot
ExecStart={exe} backup --progress=none
",
        exe = exec_word(exe)
    )
}

/// The timer that starts the scheduled backup on `calendar`.
pub fn backup_timer(calendar: &str) -> String {
    format!(
        "\
# Written by `hotbackup systemd --install --timer`.
[Unit]
Description=scheduled hotbackup backup

[Timer]
OnCalendar={calendar}
# A run missed while the machine was off happens at the next boot.
Persistent=true

[Install]
WantedBy=timers.target
"
    )
}

/// Every file `hotbackup systemd` writes for these options, the binary being `exe`.
pub fn units(options: &ServiceOptions, exe: &Path) -> Result<Vec<UnitFile>, ServiceError> {
    let mountpoint = &options.mountpoint;
    let instance_name = escape_path(mountpoint)?;
    if instance_name == "-" {
        return Err(ServiceError::Root);
    }
    let backing = match &options.backing {
        Some(b) => b.clone(),
        None => {
            let mut s = mountpoint.as_os_str().to_owned();
            s.push(".backing");
            PathBuf::from(s)
        }
    };
    check_path(&backing)?;
    check_path(exe)?;
    let server = &options.server_unit;
    if !server.ends_with(".service")
        || server.len() == ".service".len()
        || server.contains(['/', '\n', ' '])
    {
        return Err(ServiceError::ServerUnit(server.clone()));
    }
    if let Some(c) = &options.timer
        && (c.trim().is_empty() || c.contains(['\n', '\\', '%']))
    {
        return Err(ServiceError::Calendar(c.clone()));
    }
    let instance = instance_unit(mountpoint)?;
    let units = Path::new(UNIT_DIR);
    let mut files = vec![
        UnitFile {
            path: units.join(TEMPLATE),
            text: agent_template(exe),
        },
        UnitFile {
            path: Path::new(ENV_DIR).join(format!("agent-{instance_name}.env")),
            text: environment_file(mountpoint, &backing),
        },
        UnitFile {
            path: units.join(format!("{server}.d")).join("hotbackup.conf"),
            text: server_dropin(&instance),
        },
    ];
    if let Some(calendar) = &options.timer {
        files.push(UnitFile {
            path: units.join(BACKUP_SERVICE),
            text: backup_service(exe, server, &instance),
        });
        files.push(UnitFile {
            path: units.join(BACKUP_TIMER),
            text: backup_timer(calendar.trim()),
        });
    }
    Ok(files)
}

/// Writes `files` under `root` (each replaced atomically); returns the paths written.
pub fn install(root: &Path, files: &[UnitFile]) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for file in files {
        let path = root.join(&file.path);
        let dir = path.parent().expect("unit files live in a directory");
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(file.text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests;
