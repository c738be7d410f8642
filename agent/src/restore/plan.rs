//! The restore plan: every check and every decision, made before anything is written.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::lineage::NewHistory;
use super::pitr::{self, PitrPlan};
use super::{RestoreError, RestoreOptions};
use crate::image::Image;
use crate::in_use::in_use;
use crate::manifest::EntryKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Copy,
    Move,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestorePlan {
    pub image_dir: PathBuf,
    /// Where the image root goes (`--datadir`).
    pub root: PathBuf,
    /// The restored server's datadir (`root`, or the datadir's place inside the image).
    pub datadir: PathBuf,
    pub method: Method,
    pub verify: bool,
    /// `--user`: (uid, gid, name); None keeps each file's owner from the image.
    pub owner: Option<(u32, u32, String)>,
    pub bytes_needed: u64,
    pub bytes_free: u64,
    /// Where the image's files lived on the backed-up server.
    pub original_mount: PathBuf,
    /// Files (relative to `root`) whose absolute paths into the old mount are rewritten.
    pub rewrites: Vec<PathBuf>,
    /// Symbolic links (relative to `root`) given a target in the restored tree.
    pub relinks: Vec<(PathBuf, PathBuf)>,
    /// Files (relative to `root`) removed after placing: replica state, `auto.cnf`.
    pub strip: Vec<PathBuf>,
    /// The option file a server on the restored files needs, and its text.
    pub config: PathBuf,
    pub config_text: String,
    pub pitr: Option<PitrPlan>,
    /// The new binlog history the restored server starts (None: kept, or no binlog).
    pub new_history: Option<NewHistory>,
}

/// Makes the plan, or refuses (nothing is changed either way).
pub fn plan(image: &Image, options: &RestoreOptions) -> Result<RestorePlan, RestoreError> {
    let refuse = |s: String| Err(RestoreError::Refused(s));
    let root = absolute(&options.datadir);
    if root.as_os_str().is_empty() || root == Path::new("/") {
        return refuse("--datadir must name the directory to restore into".into());
    }
    let image_dir = fs::canonicalize(&image.dir).unwrap_or_else(|_| image.dir.clone());
    let resolved_root = crate::copy::resolve_nonexistent(&root).unwrap_or_else(|_| root.clone());
    if resolved_root.starts_with(&image_dir) || image_dir.starts_with(&resolved_root) {
        return refuse(format!(
            "--datadir {} and the backup {} overlap; restore into a directory outside the backup",
            root.display(),
            image_dir.display()
        ));
    }
    if let Some((pid, name)) = in_use(&resolved_root) {
        return refuse(format!(
            "--datadir {} is in use by process {pid} ({name}); stop that server first (a running server, a replica included, must not have its files replaced)",
            root.display()
        ));
    }
    match fs::read_dir(&root) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return refuse(format!(
                    "--datadir {} is not empty; restore into a new or empty directory (a restore never overwrites a server's files)",
                    root.display()
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return refuse(format!(
                "--datadir {} exists and is not a directory; name a new or empty directory",
                root.display()
            ));
        }
        Err(e) => return refuse(format!("cannot read --datadir {}: {e}", root.display())),
    }
    let owner = match &options.user {
        None => None,
        Some(name) => match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Some((u.uid.as_raw(), u.gid.as_raw(), name.clone())),
            _ => return refuse(format!("--user {name}: no such user on this machine")),
        },
    };
    let data = image.data();
    let existing = nearest_existing(&root);
    let method = if options.move_files {
        let same_fs = fs::metadata(&data)
            .and_then(|a| fs::metadata(&existing).map(|b| a.dev() == b.dev()))
            .unwrap_or(false);
        if !same_fs {
            return refuse(format!(
                "--move needs the backup and --datadir on one filesystem ({} and {} are not); restore without --move to copy",
                data.display(),
                existing.display()
            ));
        }
        Method::Move
    } else {
        Method::Copy
    };
    let bytes_needed = match method {
        Method::Move => 0,
        Method::Copy => allocated(&data, image),
    };
    let bytes_free = free_bytes(&existing);
    if bytes_needed > bytes_free {
        return refuse(format!(
            "{} has {} free but the image needs {}; free space or restore elsewhere",
            existing.display(),
            human(bytes_free),
            human(bytes_needed)
        ));
    }
    let original_mount = image.manifest.source.mountpoint.clone();
    let map = |p: &Path| -> Option<PathBuf> {
        p.strip_prefix(&original_mount)
            .ok()
            .map(|rel| root.join(rel))
    };
    let datadir_rel = image.datadir_in_image();
    let datadir = root.join(&datadir_rel);
    let mut rewrites = Vec::new();
    let mut relinks = Vec::new();
    let mut strip = Vec::new();
    for e in &image.manifest.files {
        match e.kind {
            EntryKind::Symlink => {
                let target = e.target.clone().unwrap_or_default();
                if target.is_absolute() {
                    match map(&target) {
                        Some(new) => relinks.push((e.path.clone(), new)),
                        None => {
                            return refuse(format!(
                                "{} in the image is a symbolic link to {}, outside the backed-up mount: a restored server would use the old server's file; the image cannot be restored safely",
                                e.path.display(),
                                target.display()
                            ));
                        }
                    }
                } else if escapes(&e.path, &target) {
                    return refuse(format!(
                        "{} in the image is a symbolic link to {}, outside the image; the image cannot be restored safely",
                        e.path.display(),
                        target.display()
                    ));
                }
            }
            EntryKind::File if e.path.extension().is_some_and(|x| x == "isl") => {
                let text = fs::read_to_string(data.join(&e.path)).unwrap_or_default();
                if map(Path::new(text.trim())).is_none() {
                    return refuse(format!(
                        "InnoDB link file {} points to {}, outside the backed-up mount; that tablespace is not in the image",
                        e.path.display(),
                        text.trim()
                    ));
                }
                rewrites.push(e.path.clone());
            }
            _ => {}
        }
    }
    let settings = image.settings();
    let setting = |name: &str| {
        settings
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| PathBuf::from(v))
    };
    let in_image = |p: &Path| p.strip_prefix(&original_mount).ok().map(Path::to_path_buf);
    let binlog_index = setting("log_bin_index").and_then(|p| in_image(&p));
    if let Some(index) = &binlog_index {
        rewrites.push(index.clone());
    }
    // Replica state lives in the datadir.
    for e in &image.manifest.files {
        if e.kind != EntryKind::File || e.path.parent() != Some(datadir_rel.as_path()) {
            continue;
        }
        let name = e.path.file_name().unwrap_or_default().to_string_lossy();
        if name == "auto.cnf" {
            strip.push(e.path.clone());
        } else if is_replica_state(&name)
            || (name.ends_with(".index") && Some(&e.path) != binlog_index.as_ref())
        {
            if options.keep_replica_state {
                rewrites.push(e.path.clone());
            } else {
                strip.push(e.path.clone());
            }
        }
    }
    let config = datadir.join("hotbackup-restored.cnf");
    let config_text = config_text(&settings, &datadir, &map);
    let pitr = pitr::plan(image, options)?;
    let new_history = match image.binlog() {
        Some(b) if !options.keep_binlog_history => {
            let data_gtid = pitr.as_ref().map_or(b.gtid.clone(), |p| p.reached.clone());
            NewHistory::new(&b.file, &b.gtid, &data_gtid)
        }
        _ => None,
    };
    Ok(RestorePlan {
        image_dir,
        root,
        datadir,
        method,
        verify: !options.no_verify,
        owner,
        bytes_needed,
        bytes_free,
        original_mount,
        rewrites,
        relinks,
        strip,
        config,
        config_text,
        pitr,
        new_history,
    })
}

/// master.info, relay-log.info, their multi-source twins, relay logs.
fn is_replica_state(name: &str) -> bool {
    name == "master.info"
        || name == "relay-log.info"
        || name == "multi-master.info"
        || (name.starts_with("master-") && name.ends_with(".info"))
        || (name.starts_with("relay-log-") && name.ends_with(".info"))
        || name.rsplit_once('.').is_some_and(|(stem, n)| {
            stem.contains("relay-bin") && n.bytes().all(|b| b.is_ascii_digit())
        })
}

/// The option file for a server on the restored files: the image's recorded settings,
/// with every path moved to the restored place.
fn config_text(
    settings: &[(String, String)],
    datadir: &Path,
    map: &dyn Fn(&Path) -> Option<PathBuf>,
) -> String {
    let mut out = String::from(
        "# Written by hotbackup restore: the settings a server on these files needs.\n\
         # Start it with --defaults-extra-file=<this file> (or copy these into its my.cnf).\n\
         [mariadbd]\n",
    );
    out.push_str(&format!("datadir = {}\n", datadir.display()));
    for (name, value) in settings {
        let path = || map(Path::new(value)).unwrap_or_else(|| PathBuf::from(value));
        match name.as_str() {
            "log_bin_basename" | "log_bin" => out.push_str(&format!("log-bin = {}\n", path().display())),
            "log_bin_index" => out.push_str(&format!("log-bin-index = {}\n", path().display())),
            "server_id" => out.push_str(&format!(
                "# server_id = {value} was the backed-up server's; give this server its own unless it replaces it\n"
            )),
            "innodb_log_group_home_dir" | "innodb_data_home_dir" | "innodb_undo_directory" | "aria_log_dir_path" => {
                out.push_str(&format!("{name} = {}\n", path().display()))
            }
            _ => out.push_str(&format!("{name} = {value}\n")),
        }
    }
    out
}

/// A relative link target that leaves the image root.
fn escapes(link: &Path, target: &Path) -> bool {
    let mut depth = link.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

/// Disk space the image's files take (their allocated blocks: holes stay holes).
fn allocated(data: &Path, image: &Image) -> u64 {
    image
        .manifest
        .files
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| {
            fs::symlink_metadata(data.join(&e.path))
                .map(|m| m.blocks() * 512)
                .unwrap_or(e.size)
        })
        .sum()
}

fn free_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(u64::MAX)
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

fn nearest_existing(p: &Path) -> PathBuf {
    let mut cur = p.to_path_buf();
    while !cur.exists() {
        if !cur.pop() {
            return PathBuf::from("/");
        }
    }
    cur
}

pub(super) fn human(n: u64) -> String {
    let mut v = n as f64;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} PiB")
}

impl fmt::Display for RestorePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "restore plan for {}", self.image_dir.display())?;
        let mut step = 0;
        let mut line = |f: &mut fmt::Formatter<'_>, text: String| {
            step += 1;
            writeln!(f, "  {step}. {text}")
        };
        if self.verify {
            line(f, "verify every checksum of the image".into())?;
        }
        line(
            f,
            match self.method {
                Method::Copy => format!(
                    "copy the image into {} ({} needed, {} free; reflinked where the filesystem allows it, holes kept)",
                    self.root.display(),
                    human(self.bytes_needed),
                    human(self.bytes_free)
                ),
                Method::Move => format!(
                    "move the image's files into {} (the backup is used up)",
                    self.root.display()
                ),
            },
        )?;
        line(
            f,
            match &self.owner {
                Some((uid, gid, name)) => {
                    format!("files owned by {name} ({uid}:{gid}), modes and times kept")
                }
                None => "owners, modes and times kept as in the image".into(),
            },
        )?;
        for p in &self.rewrites {
            line(
                f,
                format!(
                    "rewrite paths under {} in {}",
                    self.original_mount.display(),
                    p.display()
                ),
            )?;
        }
        for (p, t) in &self.relinks {
            line(
                f,
                format!("point the link {} to {}", p.display(), t.display()),
            )?;
        }
        for p in &self.strip {
            line(f, format!("remove {}", p.display()))?;
        }
        line(f, format!("write {}", self.config.display()))?;
        if let Some(p) = &self.pitr {
            line(f, p.describe())?;
        }
        if let Some(h) = &self.new_history {
            line(f, h.describe())?;
        }
        write!(
            f,
            "  the restored server's datadir: {}",
            self.datadir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_links_that_leave_the_image_are_found() {
        assert!(!escapes(Path::new("a/link"), Path::new("../b")));
        assert!(escapes(Path::new("a/link"), Path::new("../../etc/passwd")));
        assert!(escapes(Path::new("link"), Path::new("../x")));
        assert!(!escapes(Path::new("link"), Path::new("x/../y")));
    }

    #[test]
    fn replica_state_files_are_recognised() {
        for name in [
            "master.info",
            "relay-log.info",
            "multi-master.info",
            "master-east.info",
            "relay-log-east.info",
            "host-relay-bin.000003",
            "host-relay-bin-east.000001",
        ] {
            assert!(is_replica_state(name), "{name}");
        }
        for name in ["ibdata1", "bin.000001", "aria_log.00000001", "relay.frm"] {
            assert!(!is_replica_state(name), "{name}");
        }
    }

    #[test]
    fn the_config_moves_every_path_and_leaves_the_server_id_out() {
        let settings = vec![
            ("innodb_page_size".to_string(), "16384".to_string()),
            ("log_bin_basename".to_string(), "/old/mnt/bin".to_string()),
            (
                "log_bin_index".to_string(),
                "/old/mnt/bin.index".to_string(),
            ),
            ("server_id".to_string(), "7".to_string()),
        ];
        let map = |p: &Path| {
            p.strip_prefix("/old/mnt")
                .ok()
                .map(|r| Path::new("/new").join(r))
        };
        let text = config_text(&settings, Path::new("/new"), &map);
        assert!(text.contains("datadir = /new\n"));
        assert!(text.contains("log-bin = /new/bin\n"));
        assert!(text.contains("log-bin-index = /new/bin.index\n"));
        assert!(text.contains("innodb_page_size = 16384\n"));
        assert!(!text.contains("\nserver_id"));
        assert!(!text.contains("/old/"));
    }
}
