//! Shared harness for the integration tests: a real `hotbackup agent` serving a real
//! FUSE mount over a temp backing directory, cleaned up even when a test fails.
#![allow(dead_code)]

pub mod io;
pub mod load;
pub mod mariadb;
pub mod replication;
pub mod s3;
pub mod xfs;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the `hotbackup` binary cargo built for these tests.
pub fn hotbackup_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hotbackup"))
}

/// Runs `hotbackup ARGS...` to completion and returns its output.
pub fn hotbackup(args: &[&str]) -> Output {
    Command::new(hotbackup_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hotbackup")
}

/// The stdout of a command that must have succeeded (else both streams, at the caller).
#[track_caller]
pub fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// True when `path` is a mountpoint according to the kernel's mount table.
pub fn is_mounted(path: &Path) -> bool {
    capture::mountinfo::mount_at(path).is_some()
}

/// A running agent: `backing` is served at `mountpoint`. Dropping it stops the agent
/// (SIGTERM to its own pid, then `fusermount3 -u` as a fallback) and removes the dirs.
pub struct Agent {
    /// The loop-mounted XFS holding the backing directory, if any: unmounted after the
    /// agent has stopped and before `dir` is removed (fields drop in this order).
    pub xfs: Option<xfs::Xfs>,
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent over a fresh, empty backing directory.
    pub fn start() -> Agent {
        Self::start_with(&[])
    }

    /// Starts an agent with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> Agent {
        let mut agent = Self::launch(extra, &[]);
        agent.wait_ready();
        agent
    }

    /// Starts an agent whose backing directory is on a fresh loop-mounted XFS of `size`
    /// (reflink=1), where a target beside it (under `xfs.dir()`) can take clones.
    pub fn start_on_xfs(size: &str) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("hb-test-")
            .tempdir()
            .expect("tempdir");
        let xfs = xfs::Xfs::new(dir.path(), size);
        let backing = xfs.dir().join("backing");
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mountpoint).unwrap();
        let socket = dir.path().join("agent.sock");
        let mut agent = Self::spawn(dir, backing, mountpoint, socket, &[], &[]);
        agent.xfs = Some(xfs);
        agent.wait_ready();
        agent
    }

    /// Starts an agent with extra arguments and environment variables and returns at
    /// once, before it has mounted (see [`Agent::wait_ready`]).
    pub fn launch(extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("hb-test-")
            .tempdir()
            .expect("tempdir");
        let backing = dir.path().join("backing");
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mountpoint).unwrap();
        let socket = dir.path().join("agent.sock");
        Self::spawn(dir, backing, mountpoint, socket, extra, env)
    }

    /// Starts an agent serving existing directories (as a unit would after `adopt`); its
    /// socket lives in a temp dir of its own.
    pub fn serve(backing: &Path, mountpoint: &Path) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("hb-test-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let mut agent = Self::spawn(dir, backing.into(), mountpoint.into(), socket, &[], &[]);
        agent.wait_ready();
        agent
    }

    fn spawn(
        dir: tempfile::TempDir,
        backing: PathBuf,
        mountpoint: PathBuf,
        socket: PathBuf,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Agent {
        let child = spawn_agent(&backing, &mountpoint, &socket, extra, env);
        Agent {
            xfs: None,
            dir,
            backing,
            mountpoint,
            socket,
            child: Some(child),
        }
    }

    /// Waits until the agent has mounted and its control socket exists.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if is_mounted(&self.mountpoint) && self.socket.exists() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let out = self.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "agent exited early ({status}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent did not mount {} in time", self.mountpoint.display());
    }

    /// A path below the mountpoint.
    pub fn mnt(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `hotbackup copy` of this agent's tree into `target`, found from its mountpoint;
    /// `extra` adds options (a `--progress` among them).
    pub fn copy(&self, target: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "copy",
            "--mountpoint",
            self.mountpoint.to_str().unwrap(),
            "--target-dir",
            target.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        hotbackup(&args)
    }

    /// `hotbackup status --json` of this agent, found from its mountpoint as a user would.
    pub fn status(&self) -> serde_json::Value {
        let out = hotbackup(&[
            "status",
            "--json",
            "--mountpoint",
            self.mountpoint.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The agent's pid.
    /// Waits (up to 5 s) until the agent has no backup session; panics otherwise.
    pub fn wait_no_session(&self) {
        for _ in 0..100 {
            if self.status()["session"].is_null() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the agent still has a session: {}", self.status());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// Sends SIGTERM and waits for the agent to exit; returns its stderr and status.
    pub fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let child = self.child.take().expect("agent running");
        signal(child.id(), libc::SIGTERM);
        let out = wait_with_timeout(child, Duration::from_secs(30));
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// SIGKILLs the agent (a crash: its mount stays behind, dead) and reaps it.
    pub fn kill9(&mut self) {
        let child = self.child.take().expect("agent running");
        signal(child.id(), libc::SIGKILL);
        wait_with_timeout(child, Duration::from_secs(10));
    }

    /// Starts a new agent on the same backing, mountpoint and socket (as a service
    /// manager restarts it) and waits until it serves.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the previous agent still runs");
        let child = spawn_agent(&self.backing, &self.mountpoint, &self.socket, &[], &[]);
        self.child = Some(child);
        // The old agent's socket file and (dead) mount may still be there: wait until
        // the new agent answers and the mountpoint serves.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err()
            || fs::metadata(&self.mountpoint).is_err()
        {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let out = self.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "restarted agent exited ({status}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(Instant::now() < deadline, "restarted agent did not serve");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the agent process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            let _ = wait_with_timeout(child, Duration::from_secs(10));
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// The transport every agent of this run uses unless a test picks one:
/// `HOTBACKUP_TEST_IO_URING=off` runs a suite over /dev/fuse (scripts/test does, for the
/// passthrough's edge cases), otherwise the agent's default (io_uring where the kernel
/// has it).
pub fn test_transport() -> Option<String> {
    std::env::var("HOTBACKUP_TEST_IO_URING").ok()
}

fn transport_args(extra: &[&str]) -> Vec<String> {
    match test_transport() {
        Some(mode) if !extra.contains(&"--io-uring") => vec!["--io-uring".into(), mode],
        _ => Vec::new(),
    }
}

fn spawn_agent(
    backing: &Path,
    mountpoint: &Path,
    socket: &Path,
    extra: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> Child {
    Command::new(hotbackup_bin())
        .arg("agent")
        .arg("--backing")
        .arg(backing)
        .arg("--mountpoint")
        .arg(mountpoint)
        .arg("--socket")
        .arg(socket)
        .args(transport_args(extra))
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn agent")
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this harness spawned itself; no memory is touched.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Waits for `child` to exit, killing it after `timeout`; returns its output.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                break;
            }
        }
    }
    child.wait_with_output().expect("wait child")
}

/// Polls `cond` until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `hotbackup backup` arguments for the server on `socket` as root (no option files),
/// into `target`, with a history file beside it.
pub fn backup_args(socket: &Path, target: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "backup".to_string(),
        "--no-defaults".into(),
        format!("--socket={}", socket.display()),
        "--user=root".into(),
        format!("--target-dir={}", target.display()),
        "--progress=none".into(),
        format!(
            "--history-file={}",
            target.with_extension("history.jsonl").display()
        ),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Runs `hotbackup backup` of `db` into `target` (see [`backup_args`]).
pub fn backup(db: &mariadb::MariaDb, target: &Path, extra: &[&str]) -> Output {
    let a = backup_args(db.socket(), target, extra);
    hotbackup(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `mariadbd` options from the option file `hotbackup restore` wrote (the harness
/// starts servers with `--no-defaults` and its own datadir).
pub fn restored_server_args(cnf: &Path) -> Vec<String> {
    fs::read_to_string(cnf)
        .unwrap_or_else(|e| panic!("read {}: {e}", cnf.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', '[']))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let k = k.trim();
            (k != "datadir").then(|| format!("--{}={}", k.replace('_', "-"), v.trim()))
        })
        .collect()
}
