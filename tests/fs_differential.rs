//! Differential tests: the same random operation sequences run on a plain directory and
//! on the mount must give the same results, errnos and final trees (contents, sizes,
//! modes, link counts, symlink targets).

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::Agent;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const PATHS: &[&str] = &["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a", "e", "e/a"];
const MODES: &[u32] = &[0o644, 0o600, 0o755, 0o400, 0o4755, 0o2750];
const RENAME_FLAGS: &[u32] = &[0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE];
const FALLOC_MODES: &[i32] = &[
    0,
    libc::FALLOC_FL_KEEP_SIZE,
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    libc::FALLOC_FL_ZERO_RANGE,
];

#[derive(Clone, Debug)]
enum Op {
    Create {
        p: usize,
        mode: usize,
    },
    Write {
        p: usize,
        off: u64,
        len: usize,
        seed: u8,
    },
    Append {
        p: usize,
        len: usize,
        seed: u8,
    },
    Truncate {
        p: usize,
        size: u64,
    },
    Read {
        p: usize,
        off: u64,
        len: usize,
    },
    Mkdir {
        p: usize,
    },
    Rmdir {
        p: usize,
    },
    Unlink {
        p: usize,
    },
    Rename {
        from: usize,
        to: usize,
        flags: usize,
    },
    Link {
        from: usize,
        to: usize,
    },
    Symlink {
        target: usize,
        p: usize,
    },
    Chmod {
        p: usize,
        mode: usize,
    },
    Stat {
        p: usize,
    },
    ReadDir {
        p: usize,
    },
    Fsync {
        p: usize,
    },
    Fallocate {
        p: usize,
        mode: usize,
        off: u64,
        len: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    prop_oneof![
        3 => (p.clone(), 0..MODES.len()).prop_map(|(p, mode)| Op::Create { p, mode }),
        4 => (p.clone(), 0u64..70_000, 0usize..9_000, any::<u8>())
            .prop_map(|(p, off, len, seed)| Op::Write { p, off, len, seed }),
        2 => (p.clone(), 0usize..5_000, any::<u8>()).prop_map(|(p, len, seed)| Op::Append { p, len, seed }),
        2 => (p.clone(), 0u64..80_000).prop_map(|(p, size)| Op::Truncate { p, size }),
        2 => (p.clone(), 0u64..80_000, 0usize..20_000).prop_map(|(p, off, len)| Op::Read { p, off, len }),
        3 => p.clone().prop_map(|p| Op::Mkdir { p }),
        1 => p.clone().prop_map(|p| Op::Rmdir { p }),
        2 => p.clone().prop_map(|p| Op::Unlink { p }),
        3 => (p.clone(), p.clone(), 0..RENAME_FLAGS.len())
            .prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        1 => (p.clone(), p.clone()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (p.clone(), p.clone()).prop_map(|(target, p)| Op::Symlink { target, p }),
        1 => (p.clone(), 0..MODES.len()).prop_map(|(p, mode)| Op::Chmod { p, mode }),
        2 => p.clone().prop_map(|p| Op::Stat { p }),
        1 => p.clone().prop_map(|p| Op::ReadDir { p }),
        1 => p.clone().prop_map(|p| Op::Fsync { p }),
        1 => (p, 0..FALLOC_MODES.len(), 0u64..70_000, 1u64..20_000)
            .prop_map(|(p, mode, off, len)| Op::Fallocate { p, mode, off, len }),
    ]
}

/// What an operation returned, reduced to what must be equal on both sides.
type Outcome = Result<String, i32>;

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 253) as u8))
        .collect()
}

fn describe(m: &fs::Metadata) -> String {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "file"
    };
    // Directory sizes depend on the backing filesystem's history, not on us.
    let size = if ft.is_dir() { 0 } else { m.len() };
    format!(
        "{kind} size={size} mode={:o} nlink={} uid={} gid={}",
        m.mode(),
        m.nlink(),
        m.uid(),
        m.gid()
    )
}

fn apply(root: &Path, op: &Op) -> Outcome {
    let at = |i: usize| root.join(PATHS[i]);
    match *op {
        Op::Create { p, mode } => OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(MODES[mode])
            .open(at(p))
            .map(|f| describe(&f.metadata().unwrap()))
            .map_err(errno),
        Op::Write { p, off, len, seed } => {
            let f = OpenOptions::new().write(true).open(at(p)).map_err(errno)?;
            f.write_all_at(&pattern(len, seed), off).map_err(errno)?;
            Ok(describe(&f.metadata().unwrap()))
        }
        Op::Append { p, len, seed } => {
            let mut f = OpenOptions::new().append(true).open(at(p)).map_err(errno)?;
            f.write_all(&pattern(len, seed)).map_err(errno)?;
            Ok(describe(&f.metadata().unwrap()))
        }
        Op::Truncate { p, size } => {
            let f = OpenOptions::new().write(true).open(at(p)).map_err(errno)?;
            f.set_len(size).map_err(errno)?;
            Ok(describe(&f.metadata().unwrap()))
        }
        Op::Read { p, off, len } => {
            let f = File::open(at(p)).map_err(errno)?;
            let mut buf = vec![0u8; len];
            let mut got = 0;
            while got < len {
                match f
                    .read_at(&mut buf[got..], off + got as u64)
                    .map_err(errno)?
                {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            Ok(format!("{} bytes, blake3 {}", got, blake3_hex(&buf)))
        }
        Op::Mkdir { p } => fs::create_dir(at(p)).map(|_| String::new()).map_err(errno),
        Op::Rmdir { p } => fs::remove_dir(at(p)).map(|_| String::new()).map_err(errno),
        Op::Unlink { p } => fs::remove_file(at(p)).map(|_| String::new()).map_err(errno),
        Op::Rename { from, to, flags } => {
            let (a, b) = (cpath(&at(from)), cpath(&at(to)));
            // SAFETY: renameat2 with NUL-terminated absolute paths.
            let r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    RENAME_FLAGS[flags],
                )
            };
            if r == 0 {
                Ok(String::new())
            } else {
                Err(errno(std::io::Error::last_os_error()))
            }
        }
        Op::Link { from, to } => fs::hard_link(at(from), at(to))
            .map(|_| describe(&fs::symlink_metadata(at(to)).unwrap()))
            .map_err(errno),
        Op::Symlink { target, p } => std::os::unix::fs::symlink(PATHS[target], at(p))
            .map(|_| String::new())
            .map_err(errno),
        Op::Chmod { p, mode } => {
            fs::set_permissions(at(p), fs::Permissions::from_mode(MODES[mode]))
                .map(|_| String::new())
                .map_err(errno)
        }
        Op::Stat { p } => fs::symlink_metadata(at(p))
            .map(|m| describe(&m))
            .map_err(errno),
        Op::ReadDir { p } => {
            let mut names: Vec<String> = fs::read_dir(at(p))
                .map_err(errno)?
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            Ok(names.join(","))
        }
        Op::Fsync { p } => File::open(at(p))
            .and_then(|f| f.sync_all())
            .map(|_| String::new())
            .map_err(errno),
        Op::Fallocate { p, mode, off, len } => {
            let f = OpenOptions::new().write(true).open(at(p)).map_err(errno)?;
            // SAFETY: fallocate on an fd this test owns.
            let r = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    FALLOC_MODES[mode],
                    off as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                Ok(describe(&f.metadata().unwrap()))
            } else {
                Err(errno(std::io::Error::last_os_error()))
            }
        }
    }
}

fn blake3_hex(data: &[u8]) -> String {
    // A short content fingerprint without another dependency: FNV-1a 64.
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Every entry below `root`: relative path to its description (and content or target).
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let m = fs::symlink_metadata(&path).unwrap();
            let mut d = describe(&m);
            if m.is_dir() {
                stack.push(path.clone());
            } else if m.file_type().is_symlink() {
                d += &format!(" -> {}", fs::read_link(&path).unwrap().display());
            } else {
                d += &format!(" content {}", blake3_hex(&fs::read(&path).unwrap()));
            }
            out.insert(path.strip_prefix(root).unwrap().to_path_buf(), d);
        }
    }
    out
}

/// Runs `ops` on fresh directories below `plain` and the mount and compares everything.
fn check_sequence(
    agent: &Agent,
    plain: &Path,
    case: usize,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let name = format!("case-{case}");
    let p = plain.join(&name);
    let m = agent.mnt(&name);
    fs::create_dir(&p).unwrap();
    fs::create_dir(&m).unwrap();
    for (i, op) in ops.iter().enumerate() {
        let want = apply(&p, op);
        let got = apply(&m, op);
        prop_assert_eq!(&got, &want, "op #{} {:?} differs (mount vs plain)", i, op);
    }
    prop_assert_eq!(tree(&m), tree(&p), "final trees differ");
    prop_assert_eq!(
        tree(&agent.backing.join(&name)),
        tree(&p),
        "backing tree differs"
    );
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[test]
fn random_operation_sequences_match_a_plain_directory() {
    let agent = Agent::start();
    let plain = tempfile::tempdir().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&prop::collection::vec(op_strategy(), 1..40), |ops| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        check_sequence(&agent, plain.path(), n, &ops)
    });
    if let Err(e) = result {
        panic!("{e}\nKeep the minimal sequence above as a regression_* test.");
    }
}

/// Runs one fixed sequence (a kept shrunk failure) on a fresh mount.
fn regression(ops: &[Op]) {
    let agent = Agent::start();
    let plain = tempfile::tempdir().unwrap();
    check_sequence(&agent, plain.path(), 0, ops).unwrap();
}

#[test]
fn regression_write_through_hard_link_then_exchange() {
    regression(&[
        Op::Create { p: 0, mode: 0 },
        Op::Link { from: 0, to: 1 },
        Op::Write {
            p: 1,
            off: 4000,
            len: 100,
            seed: 3,
        },
        Op::Mkdir { p: 2 },
        Op::Rename {
            from: 0,
            to: 2,
            flags: 2,
        },
        Op::Stat { p: 2 },
        Op::Read {
            p: 1,
            off: 0,
            len: 5000,
        },
    ]);
}
