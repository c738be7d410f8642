//! A throwaway MariaDB server for the integration tests, and a concurrent write load
//! whose clients report exactly which transactions they saw committed.
//!
//! Each server owns its datadir, unix socket, loopback port and error log. It is driven
//! with the stock `mariadb` / `mariadb-admin` clients and stopped through its own pid,
//! never by name, also when a test panics; the system's server and /var/lib/mysql are
//! never touched.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::signal;

/// How long a server may take to answer its first ping (crash recovery included).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clean shutdown may take before the test fails.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one client statement may run; a hang on the mount must fail, not stall CI.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(120);

/// The schema the write load creates and fills.
pub const LOAD_SCHEMA: &str = "hb_load";

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
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` to exit; None if it is still running after `timeout`.
fn wait_until(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Write load
// ---------------------------------------------------------------------------------------

/// How the write load runs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Concurrent clients; each is one `mariadb` process fed through its stdin.
    pub workers: u32,
    /// InnoDB rows each transaction inserts.
    pub rows_per_txn: u32,
    /// Stop each worker after this many transactions (None: until stopped).
    pub max_txns: Option<u64>,
    /// Transactions a worker may send ahead of the last one the server acknowledged;
    /// small, so that a stop drains quickly and a crash leaves few unacknowledged.
    pub max_in_flight: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            workers: 4,
            rows_per_txn: 3,
            max_txns: None,
            max_in_flight: 4,
        }
    }
}

/// InnoDB rows of transaction `seq` of a worker: `payload` and `doc` are functions of
/// (worker, seq, r), so their content is checked in SQL after a restart. `doc` grows up
/// to 16 kB, so some rows live off-page.
const INNODB_DOC_REPEATS: u64 = 400;
/// Same for the MyISAM/Aria rows (one per transaction).
const NONTX_DOC_REPEATS: u64 = 200;

/// A running write load. Per transaction `seq` a worker `w`:
/// * InnoDB, in one transaction: inserts `rows_per_txn` rows (w, seq, r), sets its
///   `innodb_progress` row to (last_seq = seq, row_count += rows_per_txn) and bumps an
///   older row; committed rows of a worker therefore always form the prefix 1..=k;
/// * MyISAM and Aria (crash-safe, TRANSACTIONAL=1): inserts (w, seq), grows an older
///   row, deletes an even older one every fourth transaction;
/// * prints `ACK seq`, which the client only reaches when every statement before it,
///   the COMMIT included, succeeded.
pub struct WriteLoad {
    opts: LoadOptions,
    stop: Arc<AtomicBool>,
    workers: Vec<LoadWorker>,
}

struct LoadWorker {
    worker: u32,
    first_seq: u64,
    child: Child,
    shared: Arc<WorkerShared>,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
}

#[derive(Default)]
struct WorkerShared {
    state: Mutex<WorkerState>,
    changed: Condvar,
}

#[derive(Clone, Copy, Default)]
struct WorkerState {
    /// Last seq written to the client's stdin.
    sent: u64,
    /// Last seq whose `ACK` the client printed.
    acked: u64,
    /// The client closed its stdout (it exited).
    eof: bool,
}

/// What one client did.
#[derive(Clone, Debug)]
pub struct WorkerReport {
    pub worker: u32,
    /// First seq this load sent (a load resumes after what an earlier one committed).
    pub first_seq: u64,
    /// Last seq sent to the client.
    pub sent: u64,
    /// Last seq the client saw succeed: every InnoDB transaction up to it is committed.
    pub acked: u64,
    /// The client's exit status (None if it had to be killed).
    pub exit: Option<ExitStatus>,
    pub stderr: String,
}

/// What the whole load did.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub rows_per_txn: u32,
    pub workers: Vec<WorkerReport>,
}

impl WriteLoad {
    /// Creates the schema (idempotent) and starts the clients. Workers continue after
    /// whatever an earlier load committed.
    pub fn start(db: &MariaDb, opts: LoadOptions) -> WriteLoad {
        create_load_schema(db, opts.workers);
        let stop = Arc::new(AtomicBool::new(false));
        let progress: BTreeMap<u32, u64> = db
            .rows(&format!(
                "SELECT worker, last_seq FROM {LOAD_SCHEMA}.innodb_progress"
            ))
            .into_iter()
            .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
            .collect();
        let workers = (0..opts.workers)
            .map(|w| {
                let first_seq = progress.get(&w).copied().unwrap_or(0) + 1;
                LoadWorker::spawn(db, w, first_seq, &opts, &stop)
            })
            .collect();
        WriteLoad {
            opts,
            stop,
            workers,
        }
    }

    /// Runs a load for `duration` and stops it.
    pub fn run_for(db: &MariaDb, opts: LoadOptions, duration: Duration) -> LoadReport {
        let load = WriteLoad::start(db, opts);
        std::thread::sleep(duration);
        load.stop()
    }

    /// Last acknowledged seq of each worker so far.
    pub fn acked(&self) -> Vec<u64> {
        self.workers
            .iter()
            .map(|w| w.shared.state.lock().unwrap().acked)
            .collect()
    }

    /// Waits until every worker has had `txns` transactions of this load acknowledged;
    /// false on timeout or if a client exited.
    pub fn wait_until_acked(&self, txns: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for w in &self.workers {
            let mut st = w.shared.state.lock().unwrap();
            while st.acked + 1 < w.first_seq + txns {
                let now = Instant::now();
                if st.eof || now >= deadline {
                    return false;
                }
                st = w.shared.changed.wait_timeout(st, deadline - now).unwrap().0;
            }
        }
        true
    }

    /// Stops feeding the clients, lets them finish what they were sent (or notice the
    /// server is gone) and reports what each saw committed.
    pub fn stop(mut self) -> LoadReport {
        self.finish()
    }

    fn finish(&mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        for w in &self.workers {
            w.shared.changed.notify_all();
        }
        let mut reports = Vec::new();
        for w in &mut self.workers {
            if let Some(writer) = w.writer.take() {
                let _ = writer.join();
            }
            // stdin is closed now: the client runs what it has and exits.
            let exit = wait_until(&mut w.child, QUERY_TIMEOUT);
            if exit.is_none() {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
            if let Some(reader) = w.reader.take() {
                let _ = reader.join();
            }
            let stderr = w
                .stderr
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default();
            let st = *w.shared.state.lock().unwrap();
            reports.push(WorkerReport {
                worker: w.worker,
                first_seq: w.first_seq,
                sent: st.sent,
                acked: st.acked,
                exit,
                stderr,
            });
        }
        LoadReport {
            rows_per_txn: self.opts.rows_per_txn,
            workers: reports,
        }
    }
}

impl Drop for WriteLoad {
    fn drop(&mut self) {
        if self.workers.iter().any(|w| w.writer.is_some()) {
            // Dropped without stop() (a test panicked): end the clients by their own pids.
            for w in &mut self.workers {
                let _ = w.child.kill();
            }
            let _ = self.finish();
        }
    }
}

impl LoadWorker {
    fn spawn(
        db: &MariaDb,
        worker: u32,
        first_seq: u64,
        opts: &LoadOptions,
        stop: &Arc<AtomicBool>,
    ) -> LoadWorker {
        let mut cmd = db.client();
        // -n: flush after every statement, so each ACK is seen as soon as it is printed.
        // No --force: the first failed statement ends the client, so no ACK follows it.
        cmd.args(["-N", "-B", "-n", &format!("--database={LOAD_SCHEMA}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn mariadb client");
        let shared = Arc::new(WorkerShared::default());
        {
            let mut st = shared.state.lock().unwrap();
            st.sent = first_seq - 1;
            st.acked = first_seq - 1;
        }
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        let writer = {
            let (shared, stop, opts) = (shared.clone(), stop.clone(), opts.clone());
            std::thread::spawn(move || feed(stdin, worker, first_seq, &opts, &shared, &stop))
        };
        let reader = {
            let shared = shared.clone();
            std::thread::spawn(move || read_acks(stdout, &shared))
        };
        LoadWorker {
            worker,
            first_seq,
            child,
            shared,
            writer: Some(writer),
            reader: Some(reader),
            stderr: Some(stderr),
        }
    }
}

/// Writer side of a worker: sends transactions while at most `max_in_flight` are
/// unacknowledged, until stopped, done, or the client is gone. Closing stdin ends it.
fn feed(
    mut stdin: ChildStdin,
    worker: u32,
    first_seq: u64,
    opts: &LoadOptions,
    shared: &WorkerShared,
    stop: &AtomicBool,
) {
    let last = opts.max_txns.map(|n| first_seq + n - 1);
    let mut seq = first_seq;
    while last.is_none_or(|last| seq <= last) {
        {
            let mut st = shared.state.lock().unwrap();
            while !st.eof
                && !stop.load(Ordering::SeqCst)
                && st.sent >= st.acked + opts.max_in_flight
            {
                st = shared
                    .changed
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
            if st.eof || stop.load(Ordering::SeqCst) {
                break;
            }
        }
        let script = txn_script(worker, seq, opts.rows_per_txn);
        if stdin
            .write_all(script.as_bytes())
            .and_then(|()| stdin.flush())
            .is_err()
        {
            break;
        }
        shared.state.lock().unwrap().sent = seq;
        seq += 1;
    }
}

/// Reader side of a worker: records each `ACK seq` the client prints.
fn read_acks(stdout: impl Read, shared: &WorkerShared) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(seq) = line
            .strip_prefix("ACK ")
            .and_then(|s| s.trim().parse().ok())
        {
            shared.state.lock().unwrap().acked = seq;
            shared.changed.notify_all();
        }
    }
    shared.state.lock().unwrap().eof = true;
    shared.changed.notify_all();
}

/// The SQL of transaction `seq` of `worker` (see [`WriteLoad`]).
fn txn_script(w: u32, seq: u64, rows: u32) -> String {
    let mut s = String::with_capacity(2048);
    s.push_str("BEGIN;\nINSERT INTO innodb_rows (worker, seq, r, payload, doc) VALUES ");
    for r in 0..rows {
        let sep = if r == 0 { "" } else { "," };
        let repeats = 1 + (seq * 7 + u64::from(r)) % INNODB_DOC_REPEATS;
        let _ = write!(
            s,
            "{sep}({w},{seq},{r},REPEAT(MD5('{w}-{seq}-{r}'),7),REPEAT(SHA1('{w}-{seq}-{r}'),{repeats}))"
        );
    }
    let older = seq / 2;
    let _ = writeln!(
        s,
        ";\nUPDATE innodb_progress SET last_seq = {seq}, row_count = row_count + {rows} WHERE worker = {w};\n\
         UPDATE innodb_rows SET hits = hits + 1 WHERE worker = {w} AND seq = {older};\n\
         COMMIT;"
    );
    let repeats = 1 + (seq * 7) % NONTX_DOC_REPEATS;
    for table in ["myisam_rows", "aria_rows"] {
        let _ = writeln!(
            s,
            "INSERT INTO {table} (worker, seq, payload, doc) \
             VALUES ({w},{seq},REPEAT(MD5('{w}-{seq}'),7),REPEAT(SHA1('{w}-{seq}'),{repeats}));\n\
             UPDATE {table} SET hits = hits + 1, doc = CONCAT(doc, 'u') WHERE worker = {w} AND seq = {older};"
        );
        if seq > 20 && seq & 3 == 0 {
            let _ = writeln!(
                s,
                "DELETE FROM {table} WHERE worker = {w} AND seq = {};",
                seq - 20
            );
        }
    }
    let _ = writeln!(s, "SELECT 'ACK {seq}';");
    s
}

fn create_load_schema(db: &MariaDb, workers: u32) {
    let nontx = |engine: &str| {
        format!(
            "CREATE TABLE IF NOT EXISTS {LOAD_SCHEMA}.{table} (\
               worker INT NOT NULL, seq BIGINT NOT NULL, hits INT NOT NULL DEFAULT 0, \
               payload VARCHAR(255) NOT NULL, doc TEXT NOT NULL, \
               PRIMARY KEY (worker, seq), KEY hits (hits), KEY payload (payload(16))\
             ) ENGINE={engine} DEFAULT CHARSET=utf8mb4;",
            table = if engine == "MyISAM" {
                "myisam_rows"
            } else {
                "aria_rows"
            },
        )
    };
    let progress_rows: Vec<String> = (0..workers).map(|w| format!("({w},0,0)")).collect();
    db.sql(&format!(
        "CREATE DATABASE IF NOT EXISTS {LOAD_SCHEMA};\n\
         CREATE TABLE IF NOT EXISTS {LOAD_SCHEMA}.innodb_rows (\
           worker INT NOT NULL, seq BIGINT NOT NULL, r INT NOT NULL, \
           hits INT NOT NULL DEFAULT 0, payload VARCHAR(255) NOT NULL, doc MEDIUMTEXT NOT NULL, \
           PRIMARY KEY (worker, seq, r), KEY hits (hits)\
         ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;\n\
         CREATE TABLE IF NOT EXISTS {LOAD_SCHEMA}.innodb_progress (\
           worker INT NOT NULL PRIMARY KEY, last_seq BIGINT NOT NULL, row_count BIGINT NOT NULL\
         ) ENGINE=InnoDB;\n\
         {}\n{}\n\
         INSERT IGNORE INTO {LOAD_SCHEMA}.innodb_progress (worker, last_seq, row_count) VALUES {};",
        nontx("MyISAM"),
        nontx("Aria TRANSACTIONAL=1"),
        progress_rows.join(",")
    ));
}

impl LoadReport {
    /// Transactions acknowledged across all workers.
    pub fn acked_txns(&self) -> u64 {
        self.workers.iter().map(|w| w.acked + 1 - w.first_seq).sum()
    }

    /// Asserts the InnoDB side of the load on `db`: per worker the committed rows are the
    /// complete, uncorrupted prefix 1..=k, `innodb_progress` agrees with them (the
    /// transactions were atomic), k covers every acknowledged transaction and no more
    /// than was sent; with `exact`, k is exactly the last acknowledged one.
    pub fn assert_innodb_intact(&self, db: &MariaDb, exact: bool) {
        let floors: Vec<u64> = self.workers.iter().map(|w| w.acked).collect();
        self.assert_innodb_prefix(db, &floors, exact);
    }

    /// Like `assert_innodb_intact` for a point-in-time image taken during the load: every
    /// worker's committed transactions form a prefix 1..=k that holds at least the
    /// `floors[i]` transactions it had acknowledged before the image was taken.
    pub fn assert_innodb_prefix(&self, db: &MariaDb, floors: &[u64], exact: bool) {
        let rows = u64::from(self.rows_per_txn);
        for (w, &floor) in self.workers.iter().zip(floors) {
            let id = w.worker;
            let r = db.rows(&format!(
                "SELECT COUNT(*), COUNT(DISTINCT seq), COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) \
                 FROM {LOAD_SCHEMA}.innodb_rows WHERE worker = {id}"
            ));
            let n: Vec<u64> = r[0].iter().map(|v| v.parse().unwrap()).collect();
            let (count, distinct, min, k) = (n[0], n[1], n[2], n[3]);
            assert!(
                k >= floor,
                "worker {id}: acknowledged transaction {floor} is lost, last committed is {k}"
            );
            assert!(
                k <= w.sent,
                "worker {id}: committed {k} but only sent {}",
                w.sent
            );
            if exact {
                assert_eq!(k, w.acked, "worker {id}: committed vs acknowledged");
            }
            assert!(
                k == 0 || min == 1,
                "worker {id}: rows start at seq {min}, not 1"
            );
            assert_eq!(distinct, k, "worker {id}: holes in seq 1..={k}");
            assert_eq!(
                count,
                k * rows,
                "worker {id}: partial transactions in 1..={k}"
            );
            let progress = db.rows(&format!(
                "SELECT last_seq, row_count FROM {LOAD_SCHEMA}.innodb_progress WHERE worker = {id}"
            ));
            assert_eq!(
                progress,
                vec![vec![k.to_string(), (k * rows).to_string()]],
                "worker {id}: innodb_progress disagrees with innodb_rows"
            );
        }
        let bad = db.value(&format!(
            "SELECT COUNT(*) FROM {LOAD_SCHEMA}.innodb_rows \
             WHERE payload <> REPEAT(MD5(CONCAT(worker,'-',seq,'-',r)),7) \
                OR doc <> REPEAT(SHA1(CONCAT(worker,'-',seq,'-',r)), 1 + (seq * 7 + r) % {INNODB_DOC_REPEATS})"
        ));
        assert_eq!(bad, "0", "InnoDB rows with wrong content");
    }
}
