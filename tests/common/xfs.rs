//! A loop-mounted XFS (reflink=1) that a test makes in its own temp directory, for the
//! clone tests: unmounted, its loop device detached and its image file removed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Xfs {
    mountpoint: PathBuf,
    image: PathBuf,
}

impl Xfs {
    /// A fresh XFS of `size` (sparse: only what is written takes space) mounted at
    /// `parent/xfs`, its image file at `parent/xfs.img`.
    pub fn new(parent: &Path, size: &str) -> Xfs {
        let image = parent.join("xfs.img");
        let mountpoint = parent.join("xfs");
        std::fs::create_dir(&mountpoint).unwrap();
        run(Command::new("truncate").args(["-s", size]).arg(&image));
        let mkfs = Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run mkfs.xfs ({e}): install xfsprogs (scripts/setup does)")
            });
        assert!(
            mkfs.status.success(),
            "mkfs.xfs failed: {}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
        // From here on the guard exists, so a failed mount still removes the image.
        let xfs = Xfs { mountpoint, image };
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&xfs.image)
            .arg(&xfs.mountpoint));
        xfs
    }

    pub fn dir(&self) -> &Path {
        &self.mountpoint
    }

    /// The loop device behind the mount, if it is mounted.
    fn device(&self) -> Option<String> {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", "--mountpoint"])
            .arg(&self.mountpoint)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !dev.is_empty()).then_some(dev)
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        if let Some(dev) = self.device() {
            let unmounted = Command::new("umount")
                .arg(&self.mountpoint)
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                // Something still holds a file there (a failed test's stray process):
                // detach the mount now, the kernel frees it when the holder is gone.
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
            // `mount -o loop` sets autoclear, so this is normally already done; it
            // fails harmlessly then.
            if dev.starts_with("/dev/loop") {
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(&dev)
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes of `path` whose extents are shared with another file (FIEMAP's shared flag, as
/// `filefrag -v` shows it): how much of it is a clone.
pub fn shared_bytes(path: &Path) -> u64 {
    let out = Command::new("filefrag")
        .args(["-v", "-b1"])
        .arg(path)
        .output()
        .expect("run filefrag (e2fsprogs)");
    assert!(out.status.success(), "filefrag {}", path.display());
    // Lines look like: "   0:        0..    4095:   ...:   4096:   ...: last,shared,eof".
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("shared"))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(':').map(str::trim).collect();
            fields.get(3)?.parse::<u64>().ok()
        })
        .sum()
}
