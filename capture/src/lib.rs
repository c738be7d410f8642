//! The capture filesystem: a FUSE passthrough over a backing directory that a database
//! lives on (and, in later layers, the capture engine that copies it while it runs).

pub mod blockdev;
mod direct;
pub mod fs;
pub mod fuse;
mod gate;
pub mod hooks;
mod inode;
pub mod mount;
pub mod mountinfo;
mod rangelock;
mod ranges;
pub mod reflink;
pub mod session;
pub mod stats;
mod sync;
mod sys;
mod uring;

pub use fs::{FsError, PassthroughFs};
pub use mount::{BlockDevice, IoUringMode, MountError, MountOptions, Mounted, UnmountError, mount};
pub use stats::StatsSnapshot;
