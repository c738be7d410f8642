//! The hotbackup agent: serves the capture filesystem, answers on a control socket, and
//! (in later layers) coordinates backups. `cli` only parses and renders; this decides.

pub mod adopt;
pub mod backup;
pub mod binlog_archive;
pub mod client;
pub mod config;
pub mod control;
pub mod copy;
pub mod daemon;
pub mod db;
pub mod digest;
pub mod history;
pub mod host;
pub mod image;
pub mod in_use;
pub mod manifest;
pub mod metrics;
pub mod notify;
pub mod options;
pub mod replica;
pub mod repo;
pub mod restore;
pub mod service;
pub mod sparse;
pub mod staged;
pub mod stale;

/// What the command line shows of a session, without reaching into the capture crate.
pub use capture::session::{AbortReason, Phase, Progress};
pub use client::{AgentAddress, ClientError};
pub use control::{AgentStatus, Request, Response};
pub use daemon::{AgentError, AgentOptions, run_agent};
pub use options::CopyOptions;
