//! Every setup the agent must refuse gets a one-sentence error naming the fix, exits
//! non-zero and changes nothing; a busy mount is not pulled from under its users.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Agent, hotbackup, hotbackup_bin, is_mounted, wait_with_timeout};

/// Runs `hotbackup agent` expecting a refusal; returns its stderr.
fn refused(backing: &Path, mountpoint: &Path, extra: &[&str]) -> String {
    let child = Command::new(hotbackup_bin())
        .arg("agent")
        .arg("--backing")
        .arg(backing)
        .arg("--mountpoint")
        .arg(mountpoint)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a refusal, got {:?}: {stderr}",
        out.status
    );
    assert!(stderr.starts_with("hotbackup: "), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one sentence, no backtrace: {stderr}"
    );
    stderr
}

fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("backing");
    let m = dir.path().join("mnt");
    fs::create_dir(&b).unwrap();
    fs::create_dir(&m).unwrap();
    (dir, b, m)
}

#[test]
fn refuses_missing_backing() {
    let (dir, _b, m) = dirs();
    let err = refused(&dir.path().join("nope"), &m, &[]);
    assert!(
        err.contains("does not exist") && err.contains("--backing"),
        "{err}"
    );
    assert!(!is_mounted(&m));
}

#[test]
fn refuses_missing_mountpoint() {
    let (dir, b, _m) = dirs();
    let err = refused(&b, &dir.path().join("nope"), &[]);
    assert!(
        err.contains("does not exist") && err.contains("create an empty directory"),
        "{err}"
    );
}

#[test]
fn refuses_non_empty_mountpoint() {
    let (_dir, b, m) = dirs();
    fs::write(m.join("stray"), b"keep me").unwrap();
    let err = refused(&b, &m, &[]);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(fs::read(m.join("stray")).unwrap(), b"keep me");
    assert!(!is_mounted(&m));
}

#[test]
fn refuses_mountpoint_inside_backing_and_the_reverse() {
    let (_dir, b, m) = dirs();
    let inner = b.join("inner");
    fs::create_dir(&inner).unwrap();
    let err = refused(&b, &inner, &[]);
    assert!(err.contains("overlap"), "{err}");
    let inner_b = m.join("data");
    fs::create_dir(&inner_b).unwrap();
    let err = refused(&inner_b, &m, &[]);
    assert!(err.contains("overlap"), "{err}");
    let err = refused(&b, &b, &[]);
    assert!(err.contains("overlap"), "{err}");
    assert!(!is_mounted(&inner) && !is_mounted(&m) && !is_mounted(&b));
}

#[test]
fn refuses_a_second_agent_on_the_same_mountpoint() {
    let first = Agent::start();
    fs::write(first.mnt("f"), b"served").unwrap();
    let other_backing = first.dir.path().join("other");
    fs::create_dir(&other_backing).unwrap();
    let err = refused(&other_backing, &first.mountpoint, &[]);
    assert!(err.contains("already a mountpoint"), "{err}");
    // The first agent keeps serving its own files.
    assert_eq!(fs::read(first.mnt("f")).unwrap(), b"served");
    assert!(fs::read_dir(&other_backing).unwrap().next().is_none());
}

#[test]
fn refuses_a_socket_another_agent_answers_on() {
    let first = Agent::start();
    let (_dir, b, m) = dirs();
    let err = refused(&b, &m, &["--socket", first.socket.to_str().unwrap()]);
    assert!(err.contains("already answers"), "{err}");
    assert!(!is_mounted(&m));
    let out = hotbackup(&["status", "--socket", first.socket.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "the first agent's socket must survive"
    );
}

#[test]
fn refuses_without_permission_for_fuse() {
    let (dir, b, m) = dirs();
    // Let the unprivileged user reach the directories and the binary.
    for p in [dir.path(), b.as_path(), m.as_path()] {
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut fs::metadata(p).unwrap().permissions(),
            0o755,
        );
        fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(hotbackup_bin())
        .args(["agent", "--backing"])
        .arg(&b)
        .arg("--mountpoint")
        .arg(&m)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not permitted") && err.contains("root"),
        "{err}"
    );
    assert!(!is_mounted(&m));
}

#[test]
fn refuses_without_dev_fuse() {
    let (dir, b, m) = dirs();
    // A private mount namespace whose /dev has no fuse device.
    let script = format!(
        "mount -t tmpfs none /dev && exec {} agent --backing {} --mountpoint {} --socket {}",
        hotbackup_bin().display(),
        b.display(),
        m.display(),
        dir.path().join("s.sock").display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no /dev/fuse") && err.contains("modprobe fuse"),
        "{err}"
    );
}

#[test]
fn status_finds_the_agent_from_its_mountpoint() {
    let a = Agent::start();
    fs::write(a.mnt("x"), b"12345").unwrap();
    let out = hotbackup(&["status", "--mountpoint", a.mountpoint.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(a.backing.to_str().unwrap()), "{text}");
    assert!(text.contains(a.socket.to_str().unwrap()), "{text}");
    assert!(
        text.contains("written") && text.contains("write "),
        "{text}"
    );
    // A directory no agent serves gets a clear answer.
    let out = hotbackup(&["status", "--mountpoint", a.backing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("hotbackup agent"), "{err}");
}

#[test]
fn default_socket_is_found_without_being_named() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("backing");
    let m = dir.path().join("mnt");
    fs::create_dir(&b).unwrap();
    fs::create_dir(&m).unwrap();
    let child = Command::new(hotbackup_bin())
        .args(["agent", "--backing"])
        .arg(&b)
        .arg("--mountpoint")
        .arg(&m)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !is_mounted(&m) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = hotbackup(&["status", "--json", "--mountpoint", m.to_str().unwrap()]);
    common::signal(child.id(), libc::SIGTERM);
    let done = wait_with_timeout(child, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let socket = status["socket"].as_str().unwrap().to_string();
    assert!(socket.starts_with("/run/hotbackup/"), "{socket}");
    assert!(done.status.success());
    assert!(!Path::new(&socket).exists(), "socket left behind");
    assert!(!is_mounted(&m));
}

#[test]
fn busy_mount_is_not_pulled_away() {
    let mut a = Agent::start();
    fs::write(a.mnt("open-me"), b"still here").unwrap();
    let mut held = File::open(a.mnt("open-me")).unwrap();
    let mp = a.mountpoint.to_str().unwrap().to_string();

    // The unmount command is refused with a reason, and the mount keeps serving.
    let out = hotbackup(&["unmount", "--mountpoint", &mp]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("still in use") && err.contains("force"),
        "{err}"
    );
    assert!(is_mounted(&a.mountpoint));

    // So is SIGTERM: the agent stays up and says why.
    common::signal(a.pid(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(700));
    assert!(a.is_running(), "agent exited while the mount was busy");
    let mut s = String::new();
    held.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    fs::write(a.mnt("new"), b"writes still work").unwrap();

    // Once the files are closed, stopping works and the mount goes away.
    drop(held);
    let (status, log) = a.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("still in use"),
        "the refusal must be logged: {log}"
    );
    assert!(!is_mounted(&a.mountpoint));
    assert_eq!(
        fs::read(a.backing.join("new")).unwrap(),
        b"writes still work"
    );
}

#[test]
fn forced_unmount_detaches_and_open_files_keep_working() {
    let a = Agent::start();
    fs::write(a.mnt("f"), b"data").unwrap();
    let mut held = File::open(a.mnt("f")).unwrap();
    let out = hotbackup(&[
        "unmount",
        "--force",
        "--mountpoint",
        a.mountpoint.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&a.mountpoint));
    let mut s = String::new();
    held.read_to_string(&mut s).unwrap();
    assert_eq!(s, "data");
}
