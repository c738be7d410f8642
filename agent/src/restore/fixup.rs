//! After placing: every path into the old server's mount is moved to the restored
//! place, replica state and `auto.cnf` are removed, and the restored server's option
//! file is written. Each change is fsynced.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::plan::RestorePlan;

pub(super) fn apply(plan: &RestorePlan) -> Result<(), (PathBuf, io::Error)> {
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    let old = plan.original_mount.to_string_lossy().into_owned();
    let new = plan.root.to_string_lossy().into_owned();
    for rel in &plan.rewrites {
        let path = plan.root.join(rel);
        let text = fs::read_to_string(&path).map_err(at(&path))?;
        let rewritten = rewrite_paths(&text, &old, &new);
        if rewritten != text {
            replace_contents(&path, rewritten.as_bytes()).map_err(at(&path))?;
        }
    }
    for (rel, target) in &plan.relinks {
        let path = plan.root.join(rel);
        let m = fs::symlink_metadata(&path).map_err(at(&path))?;
        fs::remove_file(&path).map_err(at(&path))?;
        std::os::unix::fs::symlink(target, &path).map_err(at(&path))?;
        std::os::unix::fs::lchown(&path, Some(m.uid()), Some(m.gid())).map_err(at(&path))?;
    }
    for rel in &plan.strip {
        let path = plan.root.join(rel);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err((path, e)),
        }
    }
    // The option file belongs to whoever owns the datadir.
    let owner = fs::metadata(&plan.datadir).map_err(at(&plan.datadir))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&plan.config)
        .map_err(at(&plan.config))?;
    f.write_all(plan.config_text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(at(&plan.config))?;
    std::os::unix::fs::chown(&plan.config, Some(owner.uid()), Some(owner.gid()))
        .map_err(at(&plan.config))?;
    let mut dirs: Vec<PathBuf> = plan
        .rewrites
        .iter()
        .chain(plan.strip.iter())
        .chain(plan.relinks.iter().map(|(p, _)| p))
        .filter_map(|p| plan.root.join(p).parent().map(Path::to_path_buf))
        .collect();
    dirs.push(plan.datadir.clone());
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        File::open(&d).and_then(|f| f.sync_all()).map_err(at(&d))?;
    }
    Ok(())
}

/// Every line (or line part after a tab) that starts with the old mount's path gets the
/// new root instead; other text stays byte for byte.
pub(super) fn rewrite_paths(text: &str, old: &str, new: &str) -> String {
    let old_dir = format!("{}/", old.trim_end_matches('/'));
    let new_dir = format!("{}/", new.trim_end_matches('/'));
    text.split_inclusive('\n')
        .map(|line| {
            if let Some(rest) = line.strip_prefix(&old_dir) {
                format!("{new_dir}{rest}")
            } else if line.trim_end() == old.trim_end_matches('/') {
                line.replacen(old.trim_end_matches('/'), new.trim_end_matches('/'), 1)
            } else {
                line.to_string()
            }
        })
        .collect()
}

/// Writes a file's new contents through a temporary name (the file is never torn),
/// keeping its owner and mode.
pub(super) fn replace_contents(path: &Path, contents: &[u8]) -> io::Result<()> {
    let m = fs::metadata(path)?;
    let tmp = path.with_extension("hotbackup-tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(m.mode() & 0o7777)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid()))?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_into_the_old_mount_are_rewritten() {
        let index = "/srv/old/bin.000001\n./bin.000002\n/srv/older/bin.000003\n/srv/old/bin.000004";
        assert_eq!(
            rewrite_paths(index, "/srv/old", "/restored/x"),
            "/restored/x/bin.000001\n./bin.000002\n/srv/older/bin.000003\n/restored/x/bin.000004"
        );
        assert_eq!(rewrite_paths("/srv/old/\n", "/srv/old/", "/n"), "/n/\n");
    }
}
