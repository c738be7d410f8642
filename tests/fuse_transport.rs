//! How the kernel hands requests to the agent: FUSE over io_uring where the kernel has
//! it, /dev/fuse otherwise, and never a mount that hangs between the two.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Agent, hotbackup_bin, is_mounted, wait_with_timeout};

/// The last possible CPU's queue: the one that registers after all the others.
fn last_queue() -> String {
    let cpus = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    cpus.trim().rsplit(['-', ',']).next().unwrap().to_string()
}

/// Voluntary context switches of the agent's threads whose name starts with `prefix`.
fn switches_of_threads(pid: u32, prefix: &str) -> (usize, u64) {
    let mut threads = 0;
    let mut switches = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        threads += 1;
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(n) = line.strip_prefix("voluntary_ctxt_switches:") {
                switches += n.trim().parse::<u64>().unwrap();
            }
        }
    }
    (threads, switches)
}

#[test]
fn requests_are_served_over_io_uring_where_the_kernel_has_it() {
    let kernel_has_it = std::path::Path::new("/sys/module/fuse/parameters/enable_uring").exists();
    let expect_uring = kernel_has_it && common::test_transport().as_deref() != Some("off");
    let a = Agent::start();
    let transport = a.status()["transport"].as_str().unwrap().to_string();
    let (threads, before) = switches_of_threads(a.pid(), "fuse-ring");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(a.mnt("f"))
        .unwrap();
    for i in 0..200u64 {
        f.write_all_at(&i.to_le_bytes(), i * 8).unwrap();
    }
    f.sync_data().unwrap();
    let (_, after) = switches_of_threads(a.pid(), "fuse-ring");
    assert_eq!(fs::metadata(a.backing.join("f")).unwrap().len(), 1600);
    if expect_uring {
        assert!(
            transport.starts_with("io_uring"),
            "the kernel offers io_uring but the agent serves over {transport}"
        );
        let cpus = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
        assert!(threads >= 2, "{threads} ring threads for CPUs {cpus}");
        // Each request wakes the ring thread that serves it: 200 writes and a sync
        // served over /dev/fuse would leave the ring threads asleep.
        assert!(
            after - before >= 200,
            "ring threads woke {} times for 201 requests",
            after - before
        );
    } else {
        assert_eq!(transport, "/dev/fuse");
        assert_eq!(threads, 0, "ring threads without io_uring");
    }
}

#[test]
fn a_queue_that_refuses_its_ring_entries_leaves_the_mount_on_dev_fuse() {
    // The last queue refuses after the others registered theirs: the kernel may already
    // route requests to the ring, and a queue without entries would hang them.
    let last = last_queue();
    let mut a = Agent::launch(&[], &[("HOTBACKUP_TEST_URING_REFUSE_QUEUE", last.as_ref())]);
    a.wait_ready();
    // `status` answers once the agent's mount is final: the first, given-up mount may
    // show in the mount table for a moment before.
    assert_eq!(a.status()["transport"], "/dev/fuse");
    let path = a.mnt("f");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = fs::write(&path, b"served").and_then(|()| fs::read(&path));
        let _ = tx.send(r);
    });
    let got = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a write and a read through the mount hung for 20 s");
    assert_eq!(got.unwrap(), b"served");
    assert_eq!(fs::read(a.backing.join("f")).unwrap(), b"served");
}

/// `--io-uring on` is a promise: when a queue refuses its entries, the agent refuses to
/// mount in one sentence naming the way out, and leaves no mount behind (the connection
/// it gave up is detached). On a kernel without io_uring it refuses the same way.
#[test]
fn io_uring_on_refuses_to_mount_without_every_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let child = Command::new(hotbackup_bin())
        .arg("agent")
        .arg("--backing")
        .arg(&backing)
        .arg("--mountpoint")
        .arg(&mnt)
        .arg("--socket")
        .arg(dir.path().join("agent.sock"))
        .args(["--io-uring", "on"])
        .env("HOTBACKUP_TEST_URING_REFUSE_QUEUE", last_queue())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
    // The log may say what happened before; the error is the last line, one sentence.
    let error = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        error.starts_with("hotbackup: FUSE over io_uring is not available")
            && error.contains("--io-uring off"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!is_mounted(&mnt), "the given-up mount was left behind");
    // The mountpoint is an empty directory again, ready for the next try.
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);
}
