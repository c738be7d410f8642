//! A dead hotbackup mount at the agent's own mountpoint: what a crashed (SIGKILLed)
//! agent leaves behind, and what a restarted agent clears before mounting again.
//!
//! When the agent dies, the kernel keeps the mount but every access to it fails with
//! ENOTCONN ("Transport endpoint is not connected"), and a new mount on top of it is
//! refused. Over io_uring the kernel tears down the dead agent's rings after the process
//! is gone, and a request in that moment fails with ECANCELED (it reached an entry whose
//! thread had died) or ECONNABORTED (it was queued when the connection was aborted):
//! the same dead mount, seen a moment earlier. So that `Restart=on-failure` actually
//! recovers, the agent detaches such a mount itself; a live one (its agent answers, or
//! the mount answers) is never touched.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use capture::mountinfo::{self, MountEntry};

use crate::client::agent_socket;

/// Why a mountpoint was judged dead (for the log).
#[derive(Debug, PartialEq)]
pub struct DeadMount {
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
}

/// If `mountpoint` is a dead hotbackup mount, detaches it (lazily: anything still holding
/// a file there keeps its failing descriptor) and says so; otherwise changes nothing.
pub fn clear_dead_mount(mountpoint: &Path) -> io::Result<Option<DeadMount>> {
    let Some(dead) = dead_mount(mountpoint, &mountinfo::mounts()) else {
        return Ok(None);
    };
    nix::mount::umount2(&dead.mountpoint, nix::mount::MntFlags::MNT_DETACH)
        .map_err(io::Error::from)?;
    Ok(Some(dead))
}

/// True when `mountpoint` is a dead hotbackup mount (see [`clear_dead_mount`]).
pub fn is_dead_mount(mountpoint: &Path) -> bool {
    dead_mount(mountpoint, &mountinfo::mounts()).is_some()
}

/// The dead hotbackup mount at `mountpoint` among `mounts`, if it is one.
fn dead_mount(mountpoint: &Path, mounts: &[MountEntry]) -> Option<DeadMount> {
    let path = absolute(mountpoint);
    let entry = mounts.iter().rev().find(|m| m.mountpoint == path)?;
    // Someone else's mount is refused later, with its name, by the usual checks.
    let socket = agent_socket(entry)?;
    // An agent that answers is alive, however its mount behaves: never take it away.
    // Asked first, because stat on a live but busy mount could wait on its agent.
    if UnixStream::connect(&socket).is_ok() {
        return None;
    }
    match std::fs::symlink_metadata(&path) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTCONN | libc::ECANCELED | libc::ECONNABORTED)
            ) =>
        {
            Some(DeadMount {
                mountpoint: path,
                socket,
            })
        }
        _ => None,
    }
}

/// `path` made absolute with its parent resolved: the mountpoint itself cannot be
/// canonicalized while its mount is dead (every lookup there fails).
fn absolute(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or(abs),
        _ => abs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unanswering_hotbackup_mount_that_fails_with_enotconn_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().canonicalize().unwrap();
        let table = |fstype: &str, source: &str| {
            vec![MountEntry {
                mountpoint: mp.clone(),
                fstype: fstype.into(),
                source: source.into(),
            }]
        };
        // A plain directory answers stat, so a hotbackup entry over it is not dead.
        let sock = dir.path().join("gone.sock");
        let src = format!("hotbackup:{}", sock.display());
        assert_eq!(dead_mount(&mp, &table("fuse.hotbackup", &src)), None);
        // Not ours, or not a mount at all: nothing to do.
        assert_eq!(dead_mount(&mp, &table("ext4", "/dev/vda")), None);
        assert_eq!(dead_mount(&mp, &[]), None);
    }
}
