//! Finding an agent and talking to it. A client needs only the mountpoint: the agent
//! records its socket path as the mount's source in the kernel's mount table.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capture::mountinfo;

use crate::control::{Request, Response};

/// Prefix of the mount source that names the agent's socket: `hotbackup:/run/...sock`.
pub const SOURCE_PREFIX: &str = "hotbackup:";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "{0} is not a hotbackup mount (it is not mounted at all); start `hotbackup agent --mountpoint {0} ...` or pass --socket"
    )]
    NotMounted(PathBuf),
    #[error(
        "{path} is mounted as {fstype}, not by a hotbackup agent; pass the agent's --mountpoint or --socket"
    )]
    ForeignMount { path: PathBuf, fstype: String },
    #[error("no agent answers on {socket}: {error}; is `hotbackup agent` running?")]
    Connect {
        socket: PathBuf,
        error: std::io::Error,
    },
    #[error("talking to the agent on {socket}: {error}")]
    Io {
        socket: PathBuf,
        error: std::io::Error,
    },
    #[error("the agent on {socket} sent an answer this client does not understand: {detail}")]
    Protocol { socket: PathBuf, detail: String },
}

/// Where to reach an agent.
#[derive(Clone, Debug)]
pub enum AgentAddress {
    Socket(PathBuf),
    Mountpoint(PathBuf),
}

impl AgentAddress {
    /// The socket path, looked up in the mount table for a mountpoint.
    pub fn socket(&self) -> Result<PathBuf, ClientError> {
        match self {
            AgentAddress::Socket(s) => Ok(s.clone()),
            AgentAddress::Mountpoint(mp) => socket_of_mountpoint(mp),
        }
    }
}

pub fn socket_of_mountpoint(mountpoint: &Path) -> Result<PathBuf, ClientError> {
    let entry = mountinfo::mount_at(mountpoint)
        .ok_or_else(|| ClientError::NotMounted(mountpoint.into()))?;
    let socket = entry
        .source
        .as_encoded_bytes()
        .strip_prefix(SOURCE_PREFIX.as_bytes())
        .map(|s| PathBuf::from(std::ffi::OsStr::from_bytes(s)));
    match socket {
        Some(socket) if entry.fstype.starts_with("fuse") => Ok(socket),
        _ => Err(ClientError::ForeignMount {
            path: mountpoint.into(),
            fstype: entry.fstype,
        }),
    }
}

/// Sends one request and reads its response.
pub fn call(address: &AgentAddress, request: &Request) -> Result<Response, ClientError> {
    let mut last = None;
    call_streaming(address, request, Duration::from_secs(120), |r| {
        last = Some(r);
        false
    })?;
    Ok(last.expect("call_streaming delivers at least one response"))
}

/// Sends one request and hands each response line to `each` until it returns false or
/// the agent closes the connection. `idle` bounds the wait for any one line.
pub fn call_streaming(
    address: &AgentAddress,
    request: &Request,
    idle: Duration,
    mut each: impl FnMut(Response) -> bool,
) -> Result<(), ClientError> {
    let socket = address.socket()?;
    let mut stream = UnixStream::connect(&socket).map_err(|error| ClientError::Connect {
        socket: socket.clone(),
        error,
    })?;
    let io_err = |error| ClientError::Io {
        socket: socket.clone(),
        error,
    };
    stream.set_read_timeout(Some(idle)).map_err(io_err)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut reader = BufReader::new(&stream);
    let mut delivered = false;
    loop {
        let mut answer = String::new();
        let n = reader.read_line(&mut answer).map_err(io_err)?;
        if n == 0 {
            if delivered {
                return Ok(());
            }
            return Err(ClientError::Protocol {
                socket: socket.clone(),
                detail: "the agent closed the connection without answering".into(),
            });
        }
        let response = serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
            socket: socket.clone(),
            detail: format!("{e}: {answer:?}"),
        })?;
        delivered = true;
        if !each(response) {
            return Ok(());
        }
    }
}
