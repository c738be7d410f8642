//! The kernel's mount table (`/proc/self/mountinfo`), to refuse double mounts and to let
//! clients find the agent that serves a mountpoint.

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// All current mounts, in mount order.
pub fn mounts() -> Vec<MountEntry> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Parses mountinfo text: `id parent maj:min root mountpoint opts [tags] - fstype source super`.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mountpoint = fields.get(4)?;
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: unescape(fields.get(dash + 1)?),
                source: unescape(fields.get(dash + 2)?),
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
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = (bytes[i] == b'\\' && i + 4 <= bytes.len())
            .then(|| u8::from_str_radix(&s[i + 1..i + 4], 8).ok())
            .flatten();
        if let Some(v) = octal {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_escapes() {
        let text = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - fuse.hotbackup hotbackup:/run/x.sock rw\n\
                    37 35 98:0 / /plain rw - ext4 /dev/vda rw\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fstype, "fuse.hotbackup");
        assert_eq!(m[0].source, "hotbackup:/run/x.sock");
        assert_eq!(m[1].fstype, "ext4");
    }
}
