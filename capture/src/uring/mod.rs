//! FUSE over io_uring: the kernel hands each request to a ring entry of the queue of
//! the CPU the application runs on, and a thread pinned to that CPU serves it and
//! commits the answer in the same `io_uring_enter` that fetches the next request.
//!
//! Why: on a VM whose idle vCPUs halt, waking a thread on the other CPU costs about
//! 130 µs, twice per request over /dev/fuse (the daemon, then the application), while a
//! request served on the application's own CPU costs a context switch. This transport
//! keeps the round trip on one CPU.
//!
//! fuser still owns /dev/fuse: it answers INIT (where the kernel and we agree on
//! io_uring), FORGET and INTERRUPT (which never go through the ring), and every request
//! until each queue has an entry registered. The kernel offers io_uring only when the
//! `fuse` module's `enable_uring` parameter is set; see [`enable`].

mod abi;
mod dispatch;

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::fs::PassthroughFs;

const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the kernel will offer io_uring to a new mount; with `turn_on`, sets the
/// module parameter first when it is off (it only lets daemons that ask use io_uring).
pub fn enable(turn_on: bool) -> Result<(), String> {
    match fs::read_to_string(ENABLE_PARAM) {
        Ok(v) if v.trim() == "Y" => Ok(()),
        Ok(_) if turn_on => {
            fs::write(ENABLE_PARAM, "Y").map_err(|e| format!("could not set {ENABLE_PARAM} ({e})"))
        }
        Ok(_) => Err(format!("{ENABLE_PARAM} is N")),
        Err(e) => Err(format!(
            "this kernel has no FUSE over io_uring ({ENABLE_PARAM}: {e})"
        )),
    }
}

/// What INIT decided, shared between fuser's `init` and the ring's start.
#[derive(Default)]
pub struct Negotiation(OnceLock<bool>);

impl Negotiation {
    pub fn decided(&self, on: bool) {
        let _ = self.0.set(on);
    }

    fn wait(&self, limit: Duration) -> Option<bool> {
        let t0 = Instant::now();
        loop {
            if let Some(on) = self.0.get() {
                return Some(*on);
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The serving threads of a mount's rings.
pub struct Rings {
    threads: Vec<JoinHandle<()>>,
    pub queues: usize,
    pub per_queue: usize,
}

impl Rings {
    /// Waits for the threads to end after the connection went away; a thread that has
    /// not ended by `limit` is left to end with the process.
    pub fn join(self, limit: Duration) {
        let t0 = Instant::now();
        for t in self.threads {
            while !t.is_finished() && t0.elapsed() < limit {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("an io_uring FUSE thread did not end with its mount");
            }
        }
    }
}

/// Registers `per_queue` entries on every queue of the connection behind `dev` once
/// INIT has agreed on io_uring, each served by its own thread pinned to the queue's
/// CPU. An error means the mount goes on being served over /dev/fuse.
pub fn start(
    fs: Arc<PassthroughFs>,
    dev: &OwnedFd,
    init: &Negotiation,
    per_queue: usize,
    payload_len: usize,
) -> io::Result<Rings> {
    match init.wait(Duration::from_secs(10)) {
        Some(true) => {}
        Some(false) => return Err(io::Error::other("the kernel did not offer io_uring")),
        None => return Err(io::Error::other("no INIT from the kernel within 10 s")),
    }
    let queues = possible_cpus()?;
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::new();
    let mut first_error = None;
    let per_queue = per_queue.max(1);
    // Fault injection for tests: this queue's entries are refused, after the queues
    // before it have registered theirs.
    let refused: Option<usize> = std::env::var("HOTBACKUP_TEST_URING_REFUSE_QUEUE")
        .ok()
        .and_then(|q| q.parse().ok());
    for qid in 0..queues {
        if refused == Some(qid) {
            first_error = Some(io::Error::other(format!(
                "queue {qid} refused (HOTBACKUP_TEST_URING_REFUSE_QUEUE)"
            )));
            continue;
        }
        for n in 0..per_queue {
            let entry = Entry::new(dev.try_clone()?, qid as u16, payload_len)?;
            let (fs, tx) = (fs.clone(), tx.clone());
            let t = std::thread::Builder::new()
                .name(format!("fuse-ring{qid}.{n}"))
                .spawn(move || entry.serve(&fs, tx))?;
            threads.push(t);
        }
    }
    drop(tx);
    for r in rx.iter().take(threads.len()) {
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        None => Ok(Rings {
            threads,
            queues,
            per_queue,
        }),
        // Threads that did register stay parked on their entries, and the kernel may
        // already route requests to the ring, where a queue without entries hangs
        // them: the caller must give this connection up (see `mount`).
        Some(e) => Err(e),
    }
}

/// `num_possible_cpus()`: the kernel makes one queue per possible CPU and uses the ring
/// only once each has an entry.
fn possible_cpus() -> io::Result<usize> {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut last = 0;
    for part in text.trim().split(',') {
        let hi = part.rsplit('-').next().unwrap_or(part);
        last = last.max(
            hi.parse::<usize>()
                .map_err(|_| io::Error::other(format!("odd CPU list {text:?}")))?,
        );
    }
    Ok(last + 1)
}

/// One ring entry with its own io_uring and thread.
struct Entry {
    dev: OwnedFd,
    qid: u16,
    header: Box<[u8; abi::RING_HEADER_LEN]>,
    payload: PageBuf,
    iov: [libc::iovec; 2],
}

// SAFETY: the iovecs point into `header` and `payload`, which move with the entry and
// are only touched by the thread that owns it.
unsafe impl Send for Entry {}

impl Entry {
    fn new(dev: OwnedFd, qid: u16, payload_len: usize) -> io::Result<Entry> {
        let mut e = Entry {
            dev,
            qid,
            header: Box::new([0; abi::RING_HEADER_LEN]),
            payload: PageBuf::new(payload_len)?,
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2],
        };
        e.iov = [
            libc::iovec {
                iov_base: e.header.as_mut_ptr().cast(),
                iov_len: abi::RING_HEADER_LEN,
            },
            libc::iovec {
                iov_base: e.payload.ptr.cast(),
                iov_len: e.payload.len,
            },
        ];
        Ok(e)
    }

    fn command(&self, cmd_op: u32, commit_id: u64) -> squeue::Entry128 {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_le_bytes());
        let sqe = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), cmd_op)
            .cmd(cmd)
            .addr(Some(self.iov.as_ptr() as u64))
            .build();
        with_len(sqe, 2)
    }

    fn serve(mut self, fs: &PassthroughFs, registered: mpsc::Sender<io::Result<()>>) {
        pin_to_cpu(self.qid as usize);
        let (mut ring, mut first) = match self.register() {
            Ok(r) => r,
            Err(e) => {
                let _ = registered.send(Err(e));
                return;
            }
        };
        let _ = registered.send(Ok(()));
        loop {
            let Some(res) = first.take().or_else(|| wait(&mut ring)) else {
                return;
            };
            if res < 0 {
                // ENOTCONN/ECANCELED: the connection is gone (unmount) or being torn down.
                tracing::debug!(errno = -res, qid = self.qid, "ring entry ended");
                return;
            }
            let commit_id = self.answer(fs);
            let next = self.command(abi::CMD_COMMIT_AND_FETCH, commit_id);
            // SAFETY: the SQE points at `self.iov`, whose buffers live as long as `self`.
            if unsafe { ring.submission().push(&next) }.is_err() {
                tracing::error!("io_uring submission queue full");
                return;
            }
        }
    }

    /// Makes the entry's ring and registers the entry. A bad REGISTER completes at once
    /// with an error; a good one waits for a request, which may already be there (its
    /// result is returned with the ring).
    fn register(&self) -> io::Result<(Ring, Option<i32>)> {
        let mut ring = Ring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(2)?;
        let sqe = self.command(abi::CMD_REGISTER, 0);
        // SAFETY: the SQE points at `self.iov`, whose buffers live as long as `self`.
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            return Err(io::Error::other("io_uring submission queue full"));
        }
        ring.submit()?;
        let first = ring.completion().next().map(|cqe| cqe.result());
        match first {
            Some(res) if res < 0 => Err(io::Error::from_raw_os_error(-res)),
            first => Ok((ring, first)),
        }
    }

    /// Serves the request in the buffers and writes its answer there; returns the
    /// commit id the kernel gave it.
    fn answer(&mut self, fs: &PassthroughFs) -> u64 {
        let h = abi::InHeader::parse(&self.header[..abi::IN_HEADER_LEN]);
        let mut ent = abi::Fields::new(&self.header[abi::ENT_IN_OUT_AT..]);
        let _flags = ent.u64();
        let commit_id = ent.u64();
        let in_len = ent.u32() as usize;
        let op_in: [u8; 128] = self.header[abi::OP_IN_AT..abi::ENT_IN_OUT_AT]
            .try_into()
            .expect("128 bytes");
        let payload = self.payload.slice();
        // `serve` already turns a panic in the filesystem into EIO; this catches one in
        // the decoding, which would otherwise end the thread and leave its queue short.
        let answer = catch_unwind(AssertUnwindSafe(|| {
            dispatch::dispatch(fs, &h, &op_in, payload, in_len)
        }));
        let (error, len) = match answer {
            Ok(Ok(n)) => (0i32, n),
            Ok(Err(errno)) => (-errno, 0),
            Err(_) => {
                tracing::error!(
                    opcode = h.opcode,
                    "panic while decoding a request; answered EIO"
                );
                (-libc::EIO, 0)
            }
        };
        let mut out = abi::Out::new(&mut self.header[..abi::OUT_HEADER_LEN]);
        out.u32((abi::OUT_HEADER_LEN + len) as u32);
        out.u32(error as u32);
        out.u64(h.unique);
        let at = abi::ENT_IN_OUT_AT + 16;
        self.header[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
        commit_id
    }
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// Submits what is queued and waits for the next completion; None when the ring fails.
fn wait(ring: &mut Ring) -> Option<i32> {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring wait failed; ring thread ends");
                return None;
            }
        }
        if let Some(cqe) = ring.completion().next() {
            return Some(cqe.result());
        }
    }
}

/// io_uring's crate has no setter for the SQE's `len`, which FUSE's commands use for the
/// number of iovecs.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: `Entry128` is `repr(C)` over `struct io_uring_sqe` and 64 more bytes;
    // `len` is the u32 at byte 24 of `io_uring_sqe`.
    unsafe {
        let mut raw: [u8; 128] = std::mem::transmute(sqe);
        raw[24..28].copy_from_slice(&len.to_le_bytes());
        std::mem::transmute::<[u8; 128], squeue::Entry128>(raw)
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for any CPU
    // below CPU_SETSIZE, and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            // A cpuset without this CPU: serve unpinned.
            tracing::debug!(cpu, "could not pin a ring thread to its CPU");
        }
    }
}

/// A page-aligned buffer (so an O_DIRECT write's payload can go to the backing file
/// as it lies), mapped lazily: pages a request never touches cost no memory.
struct PageBuf {
    ptr: *mut u8,
    len: usize,
}

impl PageBuf {
    fn new(len: usize) -> io::Result<PageBuf> {
        // SAFETY: an anonymous private mapping with no address hint.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(PageBuf {
            ptr: ptr.cast(),
            len,
        })
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sqe_len_lands_where_the_kernel_reads_it() {
        let sqe = opcode::UringCmd80::new(types::Fd(3), abi::CMD_REGISTER)
            .addr(Some(0x1234))
            .build();
        let raw: [u8; 128] = unsafe { std::mem::transmute(with_len(sqe, 2)) };
        assert_eq!(raw[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(u32::from_le_bytes(raw[4..8].try_into().unwrap()), 3, "fd");
        assert_eq!(u64::from_le_bytes(raw[16..24].try_into().unwrap()), 0x1234);
        assert_eq!(u32::from_le_bytes(raw[24..28].try_into().unwrap()), 2);
    }
}
