//! Which process uses a directory: one with its working directory or an open file under
//! it. Restore and adopt refuse to move a running server's files away from it.

use std::fs;
use std::path::{Path, PathBuf};

/// A process whose working directory or an open file is under `dir`.
pub fn in_use(dir: &Path) -> Option<(u32, String)> {
    let me = std::process::id();
    for proc_entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = proc_entry.path();
        let under = |p: PathBuf| fs::read_link(p).is_ok_and(|t| t.starts_with(dir));
        let uses = under(base.join("cwd"))
            || fs::read_dir(base.join("fd"))
                .map(|fds| fds.flatten().any(|fd| under(fd.path())))
                .unwrap_or(false);
        if uses {
            let name = fs::read_to_string(base.join("comm")).unwrap_or_default();
            return Some((pid, name.trim().to_string()));
        }
    }
    None
}
