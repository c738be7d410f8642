//! `hotbackup status` for the whole host: every hotbackup mount in the mount table, what
//! its agent says (a running backup's progress), and the last backups in the history.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::client::{AgentAddress, agent_socket, call_streaming};
use crate::control::{AgentStatus, Request, Response};
use crate::history::BackupRecord;

/// A hotbackup mount and what its agent answered.
#[derive(Clone, Debug, Serialize)]
pub struct MountedAgent {
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    /// `None` when the agent did not answer (then `error` says why).
    pub status: Option<AgentStatus>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostStatus {
    pub agents: Vec<MountedAgent>,
    pub history_file: PathBuf,
    /// The last backups, newest first.
    pub backups: Vec<BackupRecord>,
    /// Why the history could not be read, if it could not.
    pub history_error: Option<String>,
}

/// The hotbackup mounts among `mounts`: (mountpoint, the agent's socket).
pub fn hotbackup_mounts(mounts: &[capture::mountinfo::MountEntry]) -> Vec<(PathBuf, PathBuf)> {
    mounts
        .iter()
        .filter_map(|m| Some((m.mountpoint.clone(), agent_socket(m)?)))
        .collect()
}

/// Asks every agent on the host for its status and reads the last `last` backups.
pub fn status(history_file: &Path, last: usize) -> HostStatus {
    let agents = hotbackup_mounts(&capture::mountinfo::mounts())
        .into_iter()
        .map(|(mountpoint, socket)| {
            let (status, error) = match agent_status(&socket) {
                Ok(s) => (Some(s), None),
                Err(_) if crate::stale::is_dead_mount(&mountpoint) => (
                    None,
                    Some(format!(
                        "its agent is gone and the mount is dead (Transport endpoint is not connected); restart the agent (`systemctl restart {}`), which detaches it",
                        crate::service::instance_unit(&mountpoint)
                            .unwrap_or_else(|_| "hotbackup-agent@...".into())
                    )),
                ),
                Err(e) => (None, Some(e)),
            };
            MountedAgent {
                mountpoint,
                socket,
                status,
                error,
            }
        })
        .collect();
    let (backups, history_error) = match crate::history::last_backups(history_file, last) {
        Ok(b) => (b, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    HostStatus {
        agents,
        history_file: history_file.to_path_buf(),
        backups,
        history_error,
    }
}

/// One agent's status; a hung agent must not hang the host's status for long.
fn agent_status(socket: &Path) -> Result<AgentStatus, String> {
    let mut answer = None;
    call_streaming(
        &AgentAddress::Socket(socket.to_path_buf()),
        &Request::Status,
        Duration::from_secs(10),
        |r| {
            answer = Some(r);
            false
        },
    )
    .map_err(|e| e.to_string())?;
    match answer {
        Some(Response::Status(s)) => Ok(*s),
        Some(Response::Error { message, .. }) => Err(message),
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fuse_mounts_with_the_agent_source_are_hotbackup_mounts() {
        let table = b"36 25 0:32 / /var/lib/mysql rw - fuse hotbackup:/run/hb/a.sock rw\n\
                      37 25 0:33 / /srv/other rw - fuse.sshfs host:/x rw\n\
                      38 25 8:1 / /data rw - ext4 hotbackup:/nope rw\n\
                      39 25 0:34 / /srv/my\\040db rw - fuse hotbackup:/run/hb/b.sock rw\n";
        let found = hotbackup_mounts(&capture::mountinfo::parse(table));
        assert_eq!(
            found,
            vec![
                (
                    PathBuf::from("/var/lib/mysql"),
                    PathBuf::from("/run/hb/a.sock")
                ),
                (PathBuf::from("/srv/my db"), PathBuf::from("/run/hb/b.sock")),
            ]
        );
    }
}
