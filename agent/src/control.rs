//! The control protocol: JSON lines over a Unix socket (mode 0600) that only root can
//! reach. One request and one response, except for a staged session (`Begin`), which is a
//! conversation on one connection.

use std::path::PathBuf;

use capture::StatsSnapshot;
use capture::session::{AbortReason, Progress, SessionOptions};

use crate::copy::{CopySummary, FinishProgress};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Unmount and exit; refused while the mount is in use unless `force`.
    Unmount {
        force: bool,
    },
    /// Starts a staged backup session on this connection (`staged.rs`): the agent
    /// prepares `target`, copies, streams `Progress`, and answers `Copied` when only
    /// mirroring is left. The session lives as long as the connection: closing it at any
    /// stage aborts the session and leaves the target marked incomplete.
    Begin {
        target: PathBuf,
        options: SessionOptions,
    },
    /// After `Copied`: stop at the validity point now. Answered `Stopped`, or
    /// `NotCopied` when late work arrived (progress follows until `Copied` again).
    Stop,
    /// After `Stopped`: write `files` into the target, then finish the image (metadata,
    /// checksums, fsync, manifest with `kind` and `database`), streaming `Progress`, and
    /// answer `Finished`.
    Finish {
        kind: String,
        #[serde(default)]
        database: serde_json::Value,
        #[serde(default)]
        files: Vec<ExtraFile>,
    },
    /// At any stage: abort the session, the target stays incomplete.
    Cancel {
        reason: String,
    },
}

/// A small file the client adds to the target next to the image (for example
/// `hotbackup_binlog_info`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExtraFile {
    pub name: String,
    pub contents: String,
}

/// A progress line of a staged session: the capture, then the finishing pass.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub capture: Progress,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finishing: Option<FinishProgress>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<AgentStatus>),
    Unmounted,
    Progress(Report),
    /// The copy phase is over: only mirroring is left.
    Copied(Progress),
    NotCopied {
        files_left: u64,
    },
    Stopped {
        validity_point: String,
        progress: Progress,
    },
    Finished(CopySummary),
    Error {
        message: String,
        /// Why the session ended, when it was aborted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        abort: Option<AbortReason>,
    },
}

impl Response {
    pub fn error(message: impl Into<String>) -> Response {
        Response::Error {
            message: message.into(),
            abort: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub version: String,
    pub pid: u32,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    pub uptime_secs: f64,
    pub threads: usize,
    /// How the kernel hands requests over ("io_uring (…)" or "/dev/fuse").
    #[serde(default)]
    pub transport: String,
    /// Inodes the kernel currently references.
    pub inodes: usize,
    /// Files and directories open through the mount.
    pub open_handles: usize,
    pub stats: StatsSnapshot,
    /// The running backup session, if any.
    pub session: Option<Progress>,
}
