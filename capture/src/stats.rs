//! Operation and byte counters of a mounted filesystem, cheap enough for every request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! ops {
    ($($name:ident),* $(,)?) => {
        /// The filesystem operations that are counted.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub enum Op { $($name),* }

        impl Op {
            pub const ALL: &'static [Op] = &[$(Op::$name),*];
            pub fn name(self) -> &'static str {
                match self { $(Op::$name => stringify!($name)),* }
            }
        }
    };
}

ops!(
    lookup,
    forget,
    getattr,
    setattr,
    readlink,
    mknod,
    mkdir,
    unlink,
    rmdir,
    symlink,
    rename,
    link,
    open,
    read,
    write,
    flush,
    release,
    fsync,
    opendir,
    readdir,
    readdirplus,
    releasedir,
    fsyncdir,
    statfs,
    setxattr,
    getxattr,
    listxattr,
    removexattr,
    access,
    create,
    fallocate,
    lseek,
    copy_file_range,
);

pub struct FsStats {
    /// How long the application's writes and syncs take: `--throttle auto` watches it.
    pub latency: std::sync::Arc<AppLatency>,
    ops: [AtomicU64; Op::ALL.len()],
    errors: AtomicU64,
    /// Errors by errno; only the error path takes this lock.
    errnos: parking_lot::Mutex<BTreeMap<i32, u64>>,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// A point-in-time copy of the counters, for `hotbackup status`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct StatsSnapshot {
    pub ops: BTreeMap<String, u64>,
    pub errors: u64,
    /// Errors by errno name (ENOENT for a lookup of a missing name, ...).
    #[serde(default)]
    pub errnos: BTreeMap<String, u64>,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl Default for FsStats {
    fn default() -> Self {
        FsStats {
            latency: Default::default(),
            ops: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: AtomicU64::new(0),
            errnos: parking_lot::Mutex::new(BTreeMap::new()),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        }
    }
}

impl FsStats {
    pub fn count(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, errno: i32) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.errnos.lock().entry(errno).or_default() += 1;
    }

    pub fn read_bytes(&self, n: usize) {
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn written_bytes(&self, n: usize) {
        self.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            ops: Op::ALL
                .iter()
                .map(|&op| {
                    (
                        op.name().to_string(),
                        self.ops[op as usize].load(Ordering::Relaxed),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
            errors: self.errors.load(Ordering::Relaxed),
            errnos: self
                .errnos
                .lock()
                .iter()
                .map(|(&e, &n)| (format!("{:?}", nix::errno::Errno::from_raw(e)), n))
                .collect(),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}

/// Time the application spends in writes and in syncs (fsync, fdatasync) on the mount,
/// summed: two relaxed adds per request, and any reader can take a window by difference.
#[derive(Default)]
pub struct AppLatency {
    syncs: AtomicU64,
    sync_ns: AtomicU64,
    writes: AtomicU64,
    write_ns: AtomicU64,
    /// What happened while capture sessions ran: left out of [`AppLatency::baseline`],
    /// so that one backup's slower syncs do not loosen the next one's budget.
    during_sessions: parking_lot::Mutex<LatencyTotals>,
}

/// Totals of [`AppLatency`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencyTotals {
    pub syncs: u64,
    pub sync_ns: u64,
    pub writes: u64,
    pub write_ns: u64,
}

impl AppLatency {
    /// Whether `op` is timed (the callers skip the clock for every other operation).
    pub fn times(op: Op) -> bool {
        matches!(op, Op::write | Op::fsync | Op::fsyncdir)
    }

    pub fn record(&self, op: Op, took: std::time::Duration) {
        let ns = took.as_nanos() as u64;
        let (n, sum) = match op {
            Op::fsync | Op::fsyncdir => (&self.syncs, &self.sync_ns),
            Op::write => (&self.writes, &self.write_ns),
            _ => return,
        };
        n.fetch_add(1, Ordering::Relaxed);
        sum.fetch_add(ns, Ordering::Relaxed);
    }

    /// The totals of the time outside capture sessions.
    pub fn baseline(&self) -> LatencyTotals {
        self.totals().minus(&self.during_sessions.lock())
    }

    /// A session that started when the totals were `start` has ended: what happened
    /// since leaves the baseline.
    pub fn session_ended(&self, start: &LatencyTotals) {
        let during = self.totals().minus(start);
        let mut d = self.during_sessions.lock();
        d.syncs += during.syncs;
        d.sync_ns += during.sync_ns;
        d.writes += during.writes;
        d.write_ns += during.write_ns;
    }

    pub fn totals(&self) -> LatencyTotals {
        LatencyTotals {
            syncs: self.syncs.load(Ordering::Relaxed),
            sync_ns: self.sync_ns.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            write_ns: self.write_ns.load(Ordering::Relaxed),
        }
    }
}

impl LatencyTotals {
    fn minus(&self, other: &LatencyTotals) -> LatencyTotals {
        LatencyTotals {
            syncs: self.syncs.saturating_sub(other.syncs),
            sync_ns: self.sync_ns.saturating_sub(other.sync_ns),
            writes: self.writes.saturating_sub(other.writes),
            write_ns: self.write_ns.saturating_sub(other.write_ns),
        }
    }

    /// The mean latency of what happened between `earlier` and `self`: of the syncs if
    /// there were any (a commit waits for them), else of the writes; None if neither.
    pub fn mean_since(&self, earlier: &LatencyTotals) -> Option<std::time::Duration> {
        let syncs = self.syncs.saturating_sub(earlier.syncs);
        let writes = self.writes.saturating_sub(earlier.writes);
        let (n, ns) = if syncs > 0 {
            (syncs, self.sync_ns.saturating_sub(earlier.sync_ns))
        } else {
            (writes, self.write_ns.saturating_sub(earlier.write_ns))
        };
        (n > 0).then(|| std::time::Duration::from_nanos(ns / n))
    }
}
