//! The control protocol: one JSON request line, one JSON response line, over a Unix
//! socket (mode 0600) that only root can reach.

use std::path::PathBuf;

use capture::StatsSnapshot;
use capture::session::{Progress, SessionOptions};

use crate::copy::CopySummary;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Unmount and exit; refused while the mount is in use unless `force`.
    Unmount {
        force: bool,
    },
    /// Copy the mount into `target` (a point-in-time image); answered by a stream of
    /// `Progress` lines and a final `Copied` or `Error`. Closing the connection aborts.
    Copy {
        target: PathBuf,
        options: SessionOptions,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<AgentStatus>),
    Unmounted,
    Progress(Progress),
    Copied(CopySummary),
    Error { message: String },
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
    /// Inodes the kernel currently references.
    pub inodes: usize,
    /// Files and directories open through the mount.
    pub open_handles: usize,
    pub stats: StatsSnapshot,
    /// The running backup session, if any.
    pub session: Option<Progress>,
}
