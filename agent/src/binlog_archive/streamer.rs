//! The streamer: `mariadb-binlog --read-from-remote-server --raw` as a child process
//! that writes each binlog file into the partial directory as the server sends it. The
//! password reaches it through a pipe on its stdin read as its only option file, never
//! through argv or the environment; it dies with us (PR_SET_PDEATHSIG) and runs in its
//! own process group, so a Ctrl-C reaches only us and we stop it in order.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ArchiveError;
use crate::db::Target;

/// How the streamer runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Follows the server (`--stop-never`) as a replica with this server_id would.
    Follow { server_id: u32 },
    /// Everything up to the server's current end, then exits (`--to-last-log`).
    ToCurrentEnd,
}

/// The program: `explicit`, else `mariadb-binlog` or `mysqlbinlog` from PATH.
pub fn program(explicit: Option<&Path>) -> Result<PathBuf, ArchiveError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["mariadb-binlog", "mysqlbinlog"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ArchiveError::Refused(
                "neither mariadb-binlog nor mysqlbinlog is on PATH; install the MariaDB client (mariadb-client) or pass --mariadb-binlog PATH".into(),
            )
        })
}

/// A value for an option file: quoted, with the escapes the client's parser undoes.
fn option_value(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A running streamer.
pub struct Streamer {
    child: Child,
    /// The last lines it wrote on stderr.
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Streamer {
    /// Starts streaming from the beginning of `first` into `partial_dir`.
    pub fn spawn(
        program: &Path,
        target: &Target,
        partial_dir: &Path,
        first: &str,
        mode: Mode,
    ) -> Result<Streamer, ArchiveError> {
        let mut cmd = Command::new(program);
        // --defaults-file must come first; the pipe on stdin is the only option file.
        cmd.arg("--defaults-file=/dev/stdin");
        match (&target.socket, &target.host) {
            (Some(socket), _) => {
                cmd.arg("--protocol=socket")
                    .arg(format!("--socket={}", socket.display()));
            }
            (None, Some(host)) => {
                cmd.arg("--protocol=tcp")
                    .arg(format!("--host={host}"))
                    .arg(format!("--port={}", target.port));
            }
            (None, None) => {}
        }
        cmd.args(["--read-from-remote-server", "--raw"]);
        match mode {
            Mode::Follow { server_id } => cmd
                .arg("--stop-never")
                .arg(format!("--stop-never-slave-server-id={server_id}")),
            Mode::ToCurrentEnd => cmd.arg("--to-last-log"),
        };
        // The result file is a prefix: each binlog lands under its own name below it.
        let mut prefix = partial_dir.as_os_str().to_owned();
        prefix.push("/");
        let mut result = std::ffi::OsString::from("--result-file=");
        result.push(&prefix);
        cmd.arg(result).arg(first);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (prctl, getppid, _exit); it touches no memory of ours.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // We died before the prctl took effect: do not outlive us.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ArchiveError::Refused(format!("cannot run {}: {e}", program.display())))?;
        let mut options = format!("[client]\nuser={}\n", option_value(&target.user));
        if let Some(p) = &target.password {
            options.push_str(&format!("password={}\n", option_value(p)));
        }
        if let Some(mut stdin) = child.stdin.take() {
            // An option file this small fits in the pipe: the write does not block.
            let _ = stdin.write_all(options.as_bytes());
        }
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&stderr);
        let pipe = child.stderr.take();
        let stderr_reader = pipe.map(|pipe| {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut l = lines.lock().unwrap_or_else(|p| p.into_inner());
                    if l.len() >= 20 {
                        l.remove(0);
                    }
                    l.push(line);
                }
            })
        });
        Ok(Streamer {
            child,
            stderr,
            stderr_reader,
        })
    }

    /// Its exit status once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// What it said last on stderr (after it exited, everything it said).
    pub fn last_words(&mut self) -> String {
        if self.exited().is_some()
            && let Some(reader) = self.stderr_reader.take()
        {
            let _ = reader.join();
        }
        let lines = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .unwrap_or_default()
    }

    /// SIGTERM, and SIGKILL if it is still there after a few seconds; then reaps it.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_survive_quotes_and_backslashes() {
        assert_eq!(option_value(r#"a"b\c #d"#), r#""a\"b\\c #d""#);
        // Read back by our own parser, which follows the client's rules.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.cnf");
        std::fs::write(
            &f,
            format!("[client]\npassword={}\n", option_value("p\"w\\ #x")),
        )
        .unwrap();
        let set = crate::db::optfile::read(std::slice::from_ref(&f), &[], &["client"]).unwrap();
        assert_eq!(set.get("password"), Some("p\"w\\ #x"));
    }
}
