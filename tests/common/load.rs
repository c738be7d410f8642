//! A concurrent write load on a test server whose clients report exactly which
//! transactions they saw committed, and the checks of what a server holds afterwards.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::mariadb::{MariaDb, QUERY_TIMEOUT, drain, wait_until};

/// The schema the write load creates and fills.
pub const LOAD_SCHEMA: &str = "hb_load";

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
