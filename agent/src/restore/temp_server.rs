//! A private temporary server on the restored files, for the work a restore does with
//! the server's own hands (replaying binlogs, starting a new binlog history): started
//! with the restored option file, its socket in a 0700 directory, no networking, no
//! replica start, and a throwaway user made by its init file; stopped cleanly, or by its
//! own pid if anything fails.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::plan::RestorePlan;
use super::{RestoreError, RestoreEvent};

const USER: &str = "hotbackup_restore";
const TIMEOUT: Duration = Duration::from_secs(300);

pub(super) struct TempServer {
    child: Child,
    /// Holds the socket, pid file, log and init file; removed when dropped, after
    /// `Drop` has stopped the server.
    _dir: tempfile::TempDir,
    socket: PathBuf,
    password: String,
    log: PathBuf,
}

impl TempServer {
    pub fn start(
        restore: &RestorePlan,
        events: &mut impl FnMut(RestoreEvent<'_>),
    ) -> Result<TempServer, RestoreError> {
        let owner =
            fs::metadata(&restore.datadir).map_err(|e| failed("reading the datadir", &e))?;
        let user = nix::unistd::User::from_uid(owner.uid().into())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "root".into());
        // Created 0700 by tempfile.
        let dir = tempfile::Builder::new()
            .prefix("hotbackup-restore-")
            .tempdir()
            .map_err(|e| failed("creating a private directory", &e))?;
        let give = |p: &Path| {
            std::os::unix::fs::chown(p, Some(owner.uid()), Some(owner.gid()))
                .map_err(|e| failed("creating a private directory", &e))
        };
        give(dir.path())?;
        let socket = dir.path().join("mariadbd.sock");
        let password = random_password().map_err(|e| failed("reading /dev/urandom", &e))?;
        let init = dir.path().join("init.sql");
        fs::write(
            &init,
            format!(
                "SET sql_log_bin = 0;\n\
                 CREATE USER IF NOT EXISTS '{USER}'@'localhost' IDENTIFIED BY '{password}';\n\
                 GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'localhost';\n"
            ),
        )
        .map_err(|e| failed("writing the init file", &e))?;
        give(&init)?;
        let log = dir.path().join("mariadbd.err");
        events(RestoreEvent::Note(format!(
            "starting a private server on {} (socket {}, no networking, no replication)",
            restore.datadir.display(),
            socket.display()
        )));
        let child = Command::new(program("mariadbd"))
            .arg(format!("--defaults-file={}", restore.config.display()))
            .arg(format!("--datadir={}", restore.datadir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mariadbd.pid").display()
            ))
            .arg(format!("--log-error={}", log.display()))
            .arg(format!("--init-file={}", init.display()))
            .arg(format!("--user={user}"))
            .args(["--skip-networking", "--skip-slave-start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| failed("starting mariadbd", &e))?;
        let mut server = TempServer {
            child,
            _dir: dir,
            socket,
            password,
            log,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<(), RestoreError> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(RestoreError::Replay(format!(
                    "the temporary server exited ({status}) before it was ready; its log:\n{}",
                    tail(&self.log)
                )));
            }
            let ok = self
                .client(&["-e", "SELECT 1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(RestoreError::Replay(format!(
                    "the temporary server did not answer within {} s; its log:\n{}",
                    TIMEOUT.as_secs(),
                    tail(&self.log)
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The `mariadb` client, connected as the throwaway user.
    pub fn client(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(program("mariadb"));
        c.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!("--user={USER}"))
            .env("MYSQL_PWD", &self.password)
            .args(extra);
        c
    }

    /// Runs statements; their failure is an error naming them.
    pub fn sql(&self, sql: &str) -> Result<(), RestoreError> {
        let out = self
            .client(&["-e", sql])
            .output()
            .map_err(|e| failed("running the mariadb client", &e))?;
        succeeded(&format!("`{sql}`"), &out)
    }

    /// Drops the throwaway user and shuts the server down cleanly.
    pub fn shutdown(mut self) -> Result<(), RestoreError> {
        self.sql(&format!(
            "SET sql_log_bin = 0; DROP USER '{USER}'@'localhost'; SHUTDOWN"
        ))?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => {
                    return Err(RestoreError::Replay(format!(
                        "the temporary server exited with {s}; its log:\n{}",
                        tail(&self.log)
                    )));
                }
                _ if Instant::now() > deadline => {
                    return Err(RestoreError::Replay(format!(
                        "the temporary server did not shut down within {} s",
                        TIMEOUT.as_secs()
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for TempServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(super) fn succeeded(what: &str, out: &std::process::Output) -> Result<(), RestoreError> {
    if out.status.success() {
        return Ok(());
    }
    Err(RestoreError::Replay(format!(
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

fn failed(what: &str, e: &dyn std::fmt::Display) -> RestoreError {
    RestoreError::Replay(format!("{what}: {e}"))
}

/// A throwaway password for the temporary server's private user.
fn random_password() -> io::Result<String> {
    let mut bytes = [0u8; 12];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A program of the server's packages: PATH first, then the sbin directories.
pub fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}
