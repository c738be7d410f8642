//! Finding an agent and talking to it. A client needs only the mountpoint: the agent
//! records its socket path as the mount's source in the kernel's mount table.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capture::mountinfo;

use capture::session::{AbortReason, Progress, SessionOptions};

use crate::control::{ExtraFile, Report, Request, Response};
use crate::copy::CopySummary;

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
    /// The agent refused or ended a backup session; `abort` says why it was aborted.
    #[error("{message}")]
    Agent {
        message: String,
        abort: Option<AbortReason>,
    },
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
    agent_socket(&entry).ok_or_else(|| ClientError::ForeignMount {
        path: mountpoint.into(),
        fstype: entry.fstype,
    })
}

/// Suffix of the file under a block-device mount's loop device: `SOCKET.blockdev`.
const BLOCKDEV_SUFFIX: &str = ".blockdev";

/// The file under the loop device of the agent on `socket` (`--block-device auto`). The
/// source of a `fuseblk` mount must be its device, so this name is where that mount
/// records the socket.
pub fn blockdev_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(BLOCKDEV_SUFFIX);
    PathBuf::from(name)
}

/// The control socket of the agent serving `entry`, if it is a hotbackup mount: a FUSE
/// mount whose source is `hotbackup:SOCKET`, or a `fuseblk.hotbackup` mount whose loop
/// device reads `SOCKET.blockdev`.
pub fn agent_socket(entry: &mountinfo::MountEntry) -> Option<PathBuf> {
    if !entry.fstype.starts_with("fuse") {
        return None;
    }
    if let Some(socket) = entry
        .source
        .as_encoded_bytes()
        .strip_prefix(SOURCE_PREFIX.as_bytes())
    {
        return Some(PathBuf::from(std::ffi::OsStr::from_bytes(socket)));
    }
    if entry.fstype != "fuseblk.hotbackup" {
        return None;
    }
    let file = capture::blockdev::loop_backing_file(Path::new(&entry.source))?;
    let socket = file
        .as_os_str()
        .as_encoded_bytes()
        .strip_suffix(BLOCKDEV_SUFFIX.as_bytes())?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(socket)))
}

/// Connects to the agent; `idle` bounds every later wait for a line.
fn connect(address: &AgentAddress, idle: Duration) -> Result<(PathBuf, UnixStream), ClientError> {
    let socket = address.socket()?;
    let stream = UnixStream::connect(&socket).map_err(|error| ClientError::Connect {
        socket: socket.clone(),
        error,
    })?;
    stream
        .set_read_timeout(Some(idle))
        .map_err(|error| ClientError::Io {
            socket: socket.clone(),
            error,
        })?;
    Ok((socket, stream))
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
    let (socket, mut stream) = connect(address, idle)?;
    let io_err = |error| ClientError::Io {
        socket: socket.clone(),
        error,
    };
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

/// The client's side of a staged backup session (`staged.rs`): one connection, driven
/// through copied → stopped → finished. Dropping it before `finish` returns aborts the
/// session (the agent sees the connection close).
pub struct StagedClient {
    socket: PathBuf,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

/// Where the session stood when it was stopped.
#[derive(Clone, Debug)]
pub struct Stopped {
    pub validity_point: String,
    pub progress: Progress,
}

impl StagedClient {
    /// Starts a session copying into `target` and returns once the copy phase is over
    /// (only mirroring left), reporting progress on the way. `idle` bounds the wait for
    /// any one line from the agent (it reports several times a second).
    pub fn begin(
        address: &AgentAddress,
        target: &Path,
        options: SessionOptions,
        idle: Duration,
        mut progress: impl FnMut(&Report),
    ) -> Result<(StagedClient, Progress), ClientError> {
        let (socket, stream) = connect(address, idle)?;
        let reader = BufReader::new(stream.try_clone().map_err(|error| ClientError::Io {
            socket: socket.clone(),
            error,
        })?);
        let mut client = StagedClient {
            socket,
            stream,
            reader,
        };
        client.send(&Request::Begin {
            target: target.to_path_buf(),
            options,
        })?;
        let copied = client.until_copied(&mut progress)?;
        Ok((client, copied))
    }

    /// Stops at the validity point. Late copy work (a file moved into the image) is
    /// copied first, reporting progress, and the stop retried.
    pub fn stop(&mut self, mut progress: impl FnMut(&Report)) -> Result<Stopped, ClientError> {
        loop {
            self.send(&Request::Stop)?;
            match self.read()? {
                Response::Stopped {
                    validity_point,
                    progress,
                } => {
                    return Ok(Stopped {
                        validity_point,
                        progress,
                    });
                }
                Response::NotCopied { .. } => {
                    self.until_copied(&mut progress)?;
                }
                other => return Err(self.unexpected(other)),
            }
        }
    }

    /// Finishes the image: `files` next to it, then checksums, fsync and the manifest.
    pub fn finish(
        mut self,
        kind: &str,
        database: serde_json::Value,
        files: Vec<ExtraFile>,
        mut progress: impl FnMut(&Report),
    ) -> Result<CopySummary, ClientError> {
        self.send(&Request::Finish {
            kind: kind.into(),
            database,
            files,
        })?;
        loop {
            match self.read()? {
                Response::Progress(r) => progress(&r),
                Response::Finished(summary) => return Ok(summary),
                other => return Err(self.unexpected(other)),
            }
        }
    }

    /// Ends the session; the target stays marked incomplete with `reason`.
    pub fn cancel(mut self, reason: &str) {
        let _ = self.send(&Request::Cancel {
            reason: reason.into(),
        });
        let _ = self.read();
    }

    fn until_copied(
        &mut self,
        progress: &mut impl FnMut(&Report),
    ) -> Result<Progress, ClientError> {
        loop {
            match self.read()? {
                Response::Progress(r) => progress(&r),
                Response::Copied(p) => return Ok(p),
                other => return Err(self.unexpected(other)),
            }
        }
    }

    fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_string(request).expect("requests serialize");
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(|error| ClientError::Io {
                socket: self.socket.clone(),
                error,
            })
    }

    fn read(&mut self) -> Result<Response, ClientError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|error| ClientError::Io {
                socket: self.socket.clone(),
                error,
            })?;
        if n == 0 {
            return Err(ClientError::Protocol {
                socket: self.socket.clone(),
                detail:
                    "the agent closed the connection in the middle of a backup session; see its log"
                        .into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol {
            socket: self.socket.clone(),
            detail: format!("{e}: {line:?}"),
        })
    }

    fn unexpected(&self, got: Response) -> ClientError {
        match got {
            Response::Error { message, abort } => ClientError::Agent { message, abort },
            other => ClientError::Protocol {
                socket: self.socket.clone(),
                detail: format!("unexpected answer {other:?}"),
            },
        }
    }
}
