//! The kernel's mount table (`/proc/self/mountinfo`), to refuse double mounts and to let
//! clients find the agent that serves a mountpoint.

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    /// The mount source as the kernel has it (a path, a device, or any bytes).
    pub source: OsString,
}

/// All current mounts, in mount order. Paths are bytes, not text: a mount anywhere on
/// the host with a name that is not UTF-8 must not hide the others.
pub fn mounts() -> Vec<MountEntry> {
    fs::read("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Parses mountinfo: `id parent maj:min root mountpoint opts [tags] - fstype source super`.
pub fn parse(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            let mountpoint = fields.get(4)?;
            let dash = fields.iter().position(|f| *f == b"-")?;
            Some(MountEntry {
                mountpoint: PathBuf::from(OsString::from_vec(unescape(mountpoint))),
                fstype: String::from_utf8_lossy(&unescape(fields.get(dash + 1)?)).into_owned(),
                source: OsString::from_vec(unescape(fields.get(dash + 2)?)),
            })
        })
        .collect()
}

/// The topmost mount at exactly `path` (canonical), if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mounts().into_iter().rev().find(|m| m.mountpoint == want)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = (bytes[i] == b'\\' && i + 4 <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_escapes() {
        let text = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - fuse.hotbackup hotbackup:/run/x.sock rw\n\
                    37 35 98:0 / /plain rw - ext4 /dev/vda rw\n";
        let m = parse(text.as_bytes());
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fstype, "fuse.hotbackup");
        assert_eq!(m[0].source, "hotbackup:/run/x.sock");
        assert_eq!(m[1].fstype, "ext4");
    }

    /// Regression: one mount whose path is not UTF-8 used to empty the whole table, which
    /// silently disabled the already-mounted refusal.
    #[test]
    fn a_mount_path_that_is_not_utf8_hides_nothing() {
        let mut text = b"40 35 98:0 / /srv/caf\xe9 rw - ext4 /dev/vdb rw\n".to_vec();
        text.extend_from_slice(
            b"41 35 0:50 / /data/mnt rw - fuse.hotbackup hotbackup:/run/y.sock rw\n",
        );
        let m = parse(&text);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].mountpoint.as_os_str().as_encoded_bytes(),
            b"/srv/caf\xe9"
        );
        assert_eq!(m[1].mountpoint, PathBuf::from("/data/mnt"));
        assert_eq!(m[1].source, "hotbackup:/run/y.sock");
    }
}
