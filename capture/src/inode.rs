//! The inode table: one `O_PATH` fd per backing inode, keyed by (dev, ino), with the
//! kernel's lookup count so that `forget` can drop it.
//!
//! Node ids are the backing inode numbers (for inodes on the backing directory's own
//! device), so `st_ino` on the mount equals `st_ino` in the backing directory and
//! `readdir`'s `d_ino` agrees with `stat`. That is safe because the table holds an fd
//! on every inode the kernel knows, so the backing filesystem cannot reuse its number
//! before the kernel has forgotten it. Inodes on other devices (mounts inside the
//! backing directory) get numbers from a private range.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

/// FUSE's fixed node id for the root of the mount.
pub const ROOT_ID: u64 = 1;
/// Node ids handed out for inodes that cannot use their own inode number.
const PRIVATE_ID_BASE: u64 = 1 << 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub dev: u64,
    pub ino: u64,
}

impl InodeKey {
    pub fn of(st: &libc::stat) -> InodeKey {
        InodeKey {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// One backing inode the kernel holds a reference to.
#[derive(Debug)]
pub struct Inode {
    pub id: u64,
    pub key: InodeKey,
    /// `S_IFMT` bits of the inode (a type never changes).
    pub kind: u32,
    fd: OwnedFd,
}

impl Inode {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
}

struct Slot {
    inode: Arc<Inode>,
    lookups: u64,
}

#[derive(Default)]
struct Maps {
    by_id: HashMap<u64, Slot>,
    by_key: HashMap<InodeKey, u64>,
}

pub struct InodeTable {
    maps: RwLock<Maps>,
    root_dev: u64,
    next_private: AtomicU64,
}

impl InodeTable {
    /// A table whose root (node id 1) is `root_fd`, an `O_PATH` fd on the backing directory.
    pub fn new(root_fd: OwnedFd, root_stat: &libc::stat) -> InodeTable {
        let key = InodeKey::of(root_stat);
        let root = Arc::new(Inode {
            id: ROOT_ID,
            key,
            kind: root_stat.st_mode & libc::S_IFMT,
            fd: root_fd,
        });
        let mut maps = Maps::default();
        maps.by_key.insert(key, ROOT_ID);
        maps.by_id.insert(
            ROOT_ID,
            Slot {
                inode: root,
                // The kernel never forgets the root.
                lookups: u64::MAX / 2,
            },
        );
        InodeTable {
            maps: RwLock::new(maps),
            root_dev: key.dev,
            next_private: AtomicU64::new(PRIVATE_ID_BASE),
        }
    }

    pub fn get(&self, id: u64) -> Option<Arc<Inode>> {
        self.maps.read().by_id.get(&id).map(|s| s.inode.clone())
    }

    /// Records one kernel lookup of the inode `fd` refers to (whose stat is `st`), adding it
    /// to the table when new. Returns the table's inode (whose fd may be an older one).
    pub fn remember(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Inode> {
        let key = InodeKey::of(st);
        let mut maps = self.maps.write();
        if let Some(&id) = maps.by_key.get(&key) {
            let slot = maps.by_id.get_mut(&id).expect("by_key and by_id agree");
            slot.lookups += 1;
            return slot.inode.clone();
        }
        let id = self.id_for(&key, &maps);
        let inode = Arc::new(Inode {
            id,
            key,
            kind: st.st_mode & libc::S_IFMT,
            fd,
        });
        maps.by_key.insert(key, id);
        maps.by_id.insert(
            id,
            Slot {
                inode: inode.clone(),
                lookups: 1,
            },
        );
        inode
    }

    fn id_for(&self, key: &InodeKey, maps: &Maps) -> u64 {
        let own = key.ino;
        if key.dev == self.root_dev
            && own > ROOT_ID
            && own < PRIVATE_ID_BASE
            && !maps.by_id.contains_key(&own)
        {
            own
        } else {
            self.next_private.fetch_add(1, Ordering::Relaxed)
        }
    }

    /// Drops `n` kernel references; the inode (and its fd) goes when none are left.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut maps = self.maps.write();
        let Some(slot) = maps.by_id.get_mut(&id) else {
            return;
        };
        slot.lookups = slot.lookups.saturating_sub(n);
        if slot.lookups == 0 {
            let key = slot.inode.key;
            maps.by_id.remove(&id);
            maps.by_key.remove(&key);
        }
    }

    /// Number of inodes the kernel currently references (root included).
    pub fn len(&self) -> usize {
        self.maps.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kernel's lookup count for `id` (for tests of the accounting).
    pub fn lookups(&self, id: u64) -> Option<u64> {
        self.maps.read().by_id.get(&id).map(|s| s.lookups)
    }
}
