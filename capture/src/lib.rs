//! The capture filesystem: a FUSE passthrough over a backing directory that a database
//! lives on (and, in later layers, the capture engine that copies it while it runs).

pub mod direct;
pub mod fs;
pub mod fuse;
pub mod gate;
pub mod hooks;
pub mod inode;
pub mod mount;
pub mod mountinfo;
pub mod rangelock;
pub mod ranges;
pub mod session;
pub mod stats;
pub mod sys;

pub use fs::{FsError, PassthroughFs};
pub use mount::{MountError, MountOptions, Mounted, UnmountError, mount};
pub use stats::StatsSnapshot;
