//! A throwaway MariaDB server for the integration tests (the write load that runs on it
//! is in `load.rs`).
//!
//! Each server owns its datadir, unix socket, loopback port and error log. It is driven
//! with the stock `mariadb` / `mariadb-admin` clients and stopped through its own pid,
//! never by name, also when a test panics; the system's server and /var/lib/mysql are
//! never touched.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::signal;

/// How long a server may take to answer its first ping (crash recovery included).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clean shutdown may take before the test fails.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one client statement may run; a hang on the mount must fail, not stall CI.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(120);

/// The OS user `mariadbd` runs as. Files it creates must end up owned by that user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerUser {
    Root,
    Mysql,
}

impl ServerUser {
    pub fn name(self) -> &'static str {
        match self {
            ServerUser::Root => "root",
            ServerUser::Mysql => "mysql",
        }
    }

    /// (uid, gid) of the user and of its primary group.
    pub fn ids(self) -> (u32, u32) {
        let user = nix::unistd::User::from_name(self.name())
            .expect("read passwd")
            .unwrap_or_else(|| panic!("no `{}` user on this machine", self.name()));
        (user.uid.as_raw(), user.gid.as_raw())
    }
}

/// Where a program lives: PATH first, then the sbin directories a non-login PATH may lack.
pub fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found; install mariadb-server and mariadb-client"))
}

/// `mariadb` client connected as root over `socket` (no option files), for threads that
/// hold only the socket path.
pub fn client_for(socket: &Path) -> Command {
    let mut cmd = Command::new(find_program("mariadb"));
    cmd.arg("--no-defaults")
        .arg(format!("--socket={}", socket.display()))
        .arg("--user=root");
    cmd
}

/// One server: a datadir plus the private run directory holding its socket, pid file,
/// error logs and tmpdir. The server itself may be stopped and started again.
pub struct MariaDb {
    datadir: PathBuf,
    user: ServerUser,
    /// Short path under /tmp: unix socket paths are limited to 107 bytes.
    run_dir: tempfile::TempDir,
    socket: PathBuf,
    pid_file: PathBuf,
    port: u16,
    /// Number of starts so far; each start writes its own error log.
    starts: u32,
    child: Option<Child>,
}

impl MariaDb {
    /// Creates a fresh datadir at `datadir` (made if missing) with `mariadb-install-db`;
    /// the server is not started.
    pub fn init(datadir: &Path, user: ServerUser) -> MariaDb {
        fs::create_dir_all(datadir)
            .unwrap_or_else(|e| panic!("create datadir {}: {e}", datadir.display()));
        let db = MariaDb::with_datadir(datadir, user);
        let mut cmd = Command::new(find_program("mariadb-install-db"));
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--user={}", user.name()))
            .arg("--auth-root-authentication-method=socket")
            .arg("--skip-test-db")
            .arg("--skip-name-resolve")
            // Passed through to the bootstrap server, so the files match what start() uses.
            .args(SIZE_ARGS)
            .arg(format!("--tmpdir={}", db.run_dir.path().display()));
        let out = run_captured(&mut cmd, QUERY_TIMEOUT)
            .unwrap_or_else(|e| panic!("mariadb-install-db: {e}"));
        assert!(
            out.status.success(),
            "mariadb-install-db into {} failed ({}):\n{}\n{}",
            datadir.display(),
            out.status,
            out.stdout,
            out.stderr
        );
        if user == ServerUser::Mysql {
            let (uid, gid) = user.ids();
            chown_recursive(datadir, uid, gid);
        }
        db
    }

    /// A handle on an existing datadir (for example a restored image); not started.
    pub fn with_datadir(datadir: &Path, user: ServerUser) -> MariaDb {
        let run_dir = tempfile::Builder::new()
            .prefix("hbdb-")
            .tempdir_in("/tmp")
            .expect("server run dir");
        if user == ServerUser::Mysql {
            let (uid, gid) = user.ids();
            make_ancestors_traversable(datadir);
            chown_recursive(datadir, uid, gid);
            std::os::unix::fs::lchown(run_dir.path(), Some(uid), Some(gid)).expect("chown run dir");
        }
        let socket = run_dir.path().join("mysqld.sock");
        assert!(
            socket.as_os_str().len() < 100,
            "socket path too long: {}",
            socket.display()
        );
        let pid_file = run_dir.path().join("mariadbd.pid");
        MariaDb {
            datadir: datadir.to_path_buf(),
            user,
            run_dir,
            socket,
            pid_file,
            port: 0,
            starts: 0,
            child: None,
        }
    }

    /// Creates the datadir and starts the server.
    pub fn init_and_start(datadir: &Path, user: ServerUser) -> MariaDb {
        let mut db = MariaDb::init(datadir, user);
        db.start();
        db
    }

    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    pub fn user(&self) -> ServerUser {
        self.user
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The loopback TCP port of the current (or last) run.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the server process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Starts the server with the harness's settings and waits until it answers a ping.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// Starts the server with extra `mariadbd` options (they come last, so they win).
    /// Panics with the error log if it does not come up within [`STARTUP_TIMEOUT`].
    pub fn start_with(&mut self, extra: &[&str]) {
        assert!(!self.is_running(), "server already running");
        self.starts += 1;
        self.port = free_loopback_port();
        // Leftovers of a killed run; both are ours.
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(&self.pid_file);
        let stderr = fs::File::create(self.stderr_path()).expect("create mariadbd stderr file");
        let mut cmd = Command::new(find_program("mariadbd"));
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.datadir.display()))
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--pid-file={}", self.pid_file.display()))
            .arg(format!("--log-error={}", self.error_log_path().display()))
            .arg(format!("--tmpdir={}", self.run_dir.path().display()))
            .arg(format!("--user={}", self.user.name()))
            .arg("--performance-schema=OFF")
            .arg("--character-set-server=utf8mb4")
            .arg("--collation-server=utf8mb4_general_ci")
            .arg("--innodb-flush-log-at-trx-commit=1")
            .arg("--key-buffer-size=8M")
            .arg("--aria-pagecache-buffer-size=8M")
            .arg("--max-connections=64")
            .args(SIZE_ARGS)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        self.child = Some(cmd.spawn().expect("spawn mariadbd"));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("server spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                panic!(
                    "mariadbd exited during startup ({status}) on {}:\n{}",
                    self.datadir.display(),
                    self.diagnostics()
                );
            }
            if self.socket.exists() && self.ping() {
                return;
            }
            if Instant::now() >= deadline {
                self.stop_by_pid();
                panic!(
                    "mariadbd on {} did not answer a ping within {STARTUP_TIMEOUT:?}:\n{}",
                    self.datadir.display(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ping(&self) -> bool {
        let mut cmd = self.admin();
        cmd.arg("--connect-timeout=5").arg("ping");
        run_captured(&mut cmd, Duration::from_secs(15)).is_ok_and(|o| o.status.success())
    }

    /// Clean shutdown (`mariadb-admin shutdown`), then waits for the server's pid to exit.
    /// Panics with the error log if it fails, hangs or exits with an error status.
    pub fn shutdown(&mut self) {
        assert!(self.is_running(), "shutdown: server not running");
        let mut cmd = self.admin();
        cmd.arg("shutdown");
        match run_captured(&mut cmd, SHUTDOWN_TIMEOUT) {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "mariadb-admin shutdown failed ({}): {}\n{}",
                out.status,
                out.stderr.trim(),
                self.diagnostics()
            ),
            Err(e) => panic!("mariadb-admin shutdown: {e}\n{}", self.diagnostics()),
        }
        let child = self.child.as_mut().expect("server running");
        match wait_until(child, SHUTDOWN_TIMEOUT) {
            Some(status) => {
                self.child = None;
                assert!(
                    status.success(),
                    "mariadbd exited with {status} after a clean shutdown:\n{}",
                    self.diagnostics()
                );
            }
            None => {
                self.stop_by_pid();
                panic!(
                    "mariadbd did not exit within {SHUTDOWN_TIMEOUT:?} of shutdown:\n{}",
                    self.diagnostics()
                );
            }
        }
    }

    /// SIGKILL to the server's own pid (a crash: nothing is flushed), then reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: server not running");
        signal(child.id(), libc::SIGKILL);
        assert!(
            wait_until(&mut child, Duration::from_secs(30)).is_some(),
            "mariadbd (pid {}) still alive 30 s after SIGKILL",
            child.id()
        );
    }

    /// SIGTERM to our own pid, SIGKILL if it is still alive after a while. Never panics.
    fn stop_by_pid(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        signal(child.id(), libc::SIGTERM);
        if wait_until(&mut child, Duration::from_secs(30)).is_none() {
            signal(child.id(), libc::SIGKILL);
            let _ = wait_until(&mut child, Duration::from_secs(10));
        }
    }

    fn error_log_path(&self) -> PathBuf {
        self.run_dir
            .path()
            .join(format!("error.{}.log", self.starts))
    }

    fn stderr_path(&self) -> PathBuf {
        self.run_dir
            .path()
            .join(format!("mariadbd.{}.stderr", self.starts))
    }

    /// The error log of the current (or last) run.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.error_log_path()).unwrap_or_default()
    }

    /// The error logs of every run so far, oldest first, each under a `=== run N ===` header.
    pub fn all_error_logs(&self) -> String {
        let mut all = String::new();
        for n in 1..=self.starts {
            let log = fs::read_to_string(self.run_dir.path().join(format!("error.{n}.log")))
                .unwrap_or_default();
            let _ = write!(all, "=== run {n} ===\n{log}");
        }
        all
    }

    /// `[ERROR]` lines of every run so far.
    pub fn error_lines(&self) -> Vec<String> {
        error_lines(&self.all_error_logs())
    }

    /// What to show when the server misbehaves: its error log and anything on stderr.
    pub fn diagnostics(&self) -> String {
        let stderr = fs::read_to_string(self.stderr_path()).unwrap_or_default();
        let mut out = format!(
            "--- error log {} ---\n{}",
            self.error_log_path().display(),
            self.error_log()
        );
        if !stderr.trim().is_empty() {
            let _ = write!(out, "\n--- mariadbd stderr ---\n{stderr}");
        }
        out
    }

    /// `mariadb` client connected as root over the server's socket (no option files).
    pub fn client(&self) -> Command {
        client_for(&self.socket)
    }

    fn admin(&self) -> Command {
        let mut cmd = Command::new(find_program("mariadb-admin"));
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .arg("--user=root");
        cmd
    }

    /// Runs `query` (one or more statements) and returns the client's stdout in batch
    /// form: tab-separated columns, no headers. Err carries the client's stderr.
    pub fn try_sql(&self, query: &str) -> Result<String, String> {
        let mut cmd = self.client();
        cmd.args(["-N", "-B", "-e", query]);
        let out = run_captured(&mut cmd, QUERY_TIMEOUT)?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!("{} ({})", out.stderr.trim(), out.status))
        }
    }

    /// [`MariaDb::try_sql`], panicking with the client's stderr on failure.
    pub fn sql(&self, query: &str) -> String {
        self.try_sql(query)
            .unwrap_or_else(|e| panic!("query failed: {query}\n{e}"))
    }

    /// The result rows of `query`, each split into its columns.
    pub fn rows(&self, query: &str) -> Vec<Vec<String>> {
        self.sql(query)
            .lines()
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect()
    }

    /// The single value `query` returns.
    pub fn value(&self, query: &str) -> String {
        let out = self.sql(query);
        let mut lines = out.lines();
        let v = lines
            .next()
            .unwrap_or_else(|| panic!("no row from: {query}"));
        assert!(lines.next().is_none(), "more than one row from: {query}");
        v.to_owned()
    }

    /// Base tables of `schema` with their engines, by name.
    pub fn tables(&self, schema: &str) -> Vec<(String, String)> {
        self.rows(&format!(
            "SELECT table_name, engine FROM information_schema.tables \
             WHERE table_schema = '{schema}' AND table_type = 'BASE TABLE' ORDER BY table_name"
        ))
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
    }

    /// Row count and `CHECKSUM TABLE ... EXTENDED` of every base table of `schema`.
    pub fn table_states(&self, schema: &str) -> BTreeMap<String, TableState> {
        self.tables(schema)
            .into_iter()
            .map(|(name, engine)| {
                let rows = self
                    .value(&format!("SELECT COUNT(*) FROM `{schema}`.`{name}`"))
                    .parse()
                    .expect("row count");
                let sum = self.rows(&format!("CHECKSUM TABLE `{schema}`.`{name}` EXTENDED"));
                let checksum = sum[0][1].clone();
                (
                    name,
                    TableState {
                        engine,
                        rows,
                        checksum,
                    },
                )
            })
            .collect()
    }

    /// `CHECK TABLE ... EXTENDED` of one table.
    pub fn check_table(&self, schema: &str, table: &str) -> TableVerdict {
        TableVerdict::parse(&self.sql(&format!("CHECK TABLE `{schema}`.`{table}` EXTENDED")))
    }

    /// `REPAIR TABLE` of one table (MyISAM/Aria after a crash).
    pub fn repair_table(&self, schema: &str, table: &str) -> TableVerdict {
        TableVerdict::parse(&self.sql(&format!("REPAIR TABLE `{schema}`.`{table}`")))
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop_by_pid();
    }
}

/// Options that size the server small: both `mariadb-install-db` and `start` use them.
const SIZE_ARGS: &[&str] = &[
    "--innodb-buffer-pool-size=64M",
    "--innodb-log-file-size=32M",
    "--innodb-log-buffer-size=8M",
];

/// What a table holds, to compare across a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableState {
    pub engine: String,
    pub rows: u64,
    pub checksum: String,
}

/// The message rows of a `CHECK TABLE` / `REPAIR TABLE`: (Msg_type, Msg_text).
#[derive(Clone, Debug)]
pub struct TableVerdict {
    pub messages: Vec<(String, String)>,
}

impl TableVerdict {
    fn parse(out: &str) -> TableVerdict {
        let messages = out
            .lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split('\t').collect();
                (cols.len() >= 4).then(|| (cols[2].to_owned(), cols[3..].join("\t")))
            })
            .collect();
        TableVerdict { messages }
    }

    /// The server's final word is `status OK` and nothing on the way was an error.
    pub fn is_ok(&self) -> bool {
        !self
            .messages
            .iter()
            .any(|(t, _)| t.eq_ignore_ascii_case("error"))
            && self
                .messages
                .last()
                .is_some_and(|(t, m)| t == "status" && m == "OK")
    }
}

/// The `[ERROR]` lines of an error log.
pub fn error_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("[ERROR]"))
        .map(str::to_owned)
        .collect()
}

/// A port nobody listens on right now: bind 127.0.0.1:0 and let the kernel choose.
fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local addr").port()
}

/// `chown -R uid:gid path` without following symlinks.
fn chown_recursive(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    let meta = fs::symlink_metadata(path).expect("stat");
    if meta.is_dir() {
        for entry in fs::read_dir(path).expect("read dir") {
            chown_recursive(&entry.expect("dir entry").path(), uid, gid);
        }
    }
}

/// The `mysql` user must be able to walk down to the datadir. Temp directories are 0700,
/// so every ancestor the tests created below the temp dir gets 0755; an untraversable
/// ancestor elsewhere is a set-up mistake the test reports.
fn make_ancestors_traversable(datadir: &Path) {
    let temp = std::env::temp_dir();
    let datadir = datadir.canonicalize().expect("canonical datadir");
    for dir in datadir.ancestors().skip(1) {
        let mode = fs::metadata(dir)
            .expect("stat ancestor")
            .permissions()
            .mode();
        if mode & 0o001 != 0 {
            continue;
        }
        assert!(
            dir.starts_with(&temp) && dir != temp,
            "{} (mode {:o}) is not traversable by others, so the mysql user cannot reach {}",
            dir.display(),
            mode & 0o7777,
            datadir.display()
        );
        fs::set_permissions(dir, fs::Permissions::from_mode((mode & 0o7777) | 0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
    }
}

/// Owner (uid, gid) of every entry below `root` (root included) that is not owned by
/// `uid:gid`; used to show that ownership passes through the mount.
pub fn foreign_owned(root: &Path, uid: u32, gid: u32) -> Vec<(PathBuf, u32, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = fs::symlink_metadata(&p).expect("stat");
        if meta.uid() != uid || meta.gid() != gid {
            out.push((p.clone(), meta.uid(), meta.gid()));
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&p).expect("read dir") {
                stack.push(entry.expect("dir entry").path());
            }
        }
    }
    out
}

/// What a finished command printed.
struct Captured {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` with its output captured, killing it (by its own pid) after `timeout`.
fn run_captured(cmd: &mut Command, timeout: Duration) -> Result<Captured, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let Some(status) = wait_until(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "{:?} timed out after {timeout:?}; stderr: {}",
            cmd.get_args().collect::<Vec<_>>(),
            stderr.join().unwrap_or_default()
        ));
    };
    Ok(Captured {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks on a full pipe.
pub(super) fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` to exit; None if it is still running after `timeout`.
pub(super) fn wait_until(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}
