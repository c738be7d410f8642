//! `hotbackup agent`: mount the capture filesystem, serve the control socket, and stay up
//! until told to stop, refusing to pull the mount from under a running database.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use capture::{
    BlockDevice, IoUringMode, MountError, MountOptions, Mounted, PassthroughFs, UnmountError,
};
use serde::{Deserialize, Serialize};

use crate::client::{SOURCE_PREFIX, blockdev_file};
use crate::control::{AgentStatus, Request, Response};

/// Options of `hotbackup agent`, shared by the command line and config files.
#[derive(Clone, Debug, clap::Args, Serialize, Deserialize)]
pub struct AgentOptions {
    /// The directory that holds the real files.
    #[arg(long)]
    pub backing: PathBuf,
    /// An empty directory where the database will see its files.
    #[arg(long)]
    pub mountpoint: PathBuf,
    /// Control socket path [default: /run/hotbackup/<hash of mountpoint>.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Threads serving FUSE requests [default: two per CPU, from 2 to 8].
    #[arg(long, default_value_t = default_threads(), hide_default_value = true)]
    pub threads: usize,
    /// On SIGTERM/SIGINT, unmount even if files are still open (lazy detach: the mount
    /// keeps serving its open files and disappears from the namespace).
    #[arg(long)]
    pub force: bool,
    /// `auto` mounts as `fuseblk` over a loop device the agent makes (and the kernel
    /// frees on unmount), so that InnoDB finds a block size for the mount and writes its
    /// redo log with O_DIRECT; `none` mounts plain `fuse`, where it writes it buffered.
    #[arg(long, value_enum, default_value_t = BlockDeviceMode::None)]
    #[serde(default)]
    pub block_device: BlockDeviceMode,
    /// How the kernel hands requests over: `auto` uses FUSE over io_uring where the
    /// kernel has it (6.14+; the agent sets the `fuse` module's `enable_uring` if it is
    /// off), served on the application's own CPU, and /dev/fuse otherwise; `on` refuses
    /// to mount without it; `off` uses /dev/fuse only.
    #[arg(long, value_enum, default_value_t = IoUring::Auto)]
    #[serde(default)]
    pub io_uring: IoUring,
}

/// See `--io-uring`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoUring {
    #[default]
    Auto,
    On,
    Off,
}

/// Two FUSE threads per CPU, 2 to 8. On a 2-core VM, 4 threads gave 1.12-2.0x the
/// sysbench throughput of 8 (scripts/bench-fs --agent-args "--threads 4" --base-args
/// "--threads 8"): fewer idle readers, fewer context switches per request.
fn default_threads() -> usize {
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    (2 * cpus).clamp(2, 8)
}

/// Whether the mount gets a dummy block device (see `--block-device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockDeviceMode {
    Auto,
    #[default]
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("another agent already answers on {0}; stop it first or pass a different --socket")]
    SocketInUse(PathBuf),
    #[error("socket path {0} contains a comma or a newline; choose a plainer --socket path")]
    BadSocketPath(PathBuf),
    #[error("could not create the control socket {path}: {error}")]
    Socket {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("could not install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(
        "{mountpoint} is a dead hotbackup mount (its agent is gone) and could not be detached: {error}; run `umount -l {mountpoint}` and start the agent again"
    )]
    DeadMount {
        mountpoint: PathBuf,
        error: std::io::Error,
    },
}

/// The socket path an agent serving `mountpoint` uses unless told otherwise.
pub fn default_socket(mountpoint: &Path) -> PathBuf {
    let hash = blake3::hash(mountpoint.as_os_str().as_encoded_bytes());
    PathBuf::from("/run/hotbackup").join(format!("{}.sock", &hash.to_hex()[..16]))
}

enum Event {
    Signal(i32),
    /// The requester's connection travels along, so that the answer is written before
    /// the process exits.
    Unmount {
        force: bool,
        reply_to: UnixStream,
    },
}

/// Runs the agent until it is stopped; returns after a clean unmount.
pub fn run_agent(options: &AgentOptions) -> Result<(), AgentError> {
    // A crashed agent leaves its mount dead; a restart (Restart=on-failure) clears it.
    match crate::stale::clear_dead_mount(&options.mountpoint) {
        Ok(Some(dead)) => tracing::warn!(
            mountpoint = %dead.mountpoint.display(),
            old_socket = %dead.socket.display(),
            "detached the dead mount a previous agent left (\"Transport endpoint is not connected\")"
        ),
        Ok(None) => {}
        Err(error) => {
            return Err(AgentError::DeadMount {
                mountpoint: options.mountpoint.clone(),
                error,
            });
        }
    }
    let (backing, mountpoint) = capture::mount::check(&options.backing, &options.mountpoint)?;
    raise_open_file_limit();
    let socket = options
        .socket
        .clone()
        .unwrap_or_else(|| default_socket(&mountpoint));
    let listener = bind_control_socket(&socket)?;
    let _socket_file = RemoveOnDrop(socket.clone());

    let block_device = (options.block_device == BlockDeviceMode::Auto).then(|| BlockDevice {
        file: blockdev_file(&socket),
        // As the backing files' own device has it, so the server picks the block size it
        // would pick on a plain directory there.
        block_size: capture::blockdev::physical_block_size(&backing).unwrap_or(4096),
    });
    let mount_options = MountOptions {
        threads: options.threads,
        fsname: format!("{SOURCE_PREFIX}{}", socket.display()),
        block_device,
        io_uring: match options.io_uring {
            IoUring::Auto => IoUringMode::Auto,
            IoUring::On => IoUringMode::On,
            IoUring::Off => IoUringMode::Off,
        },
    };
    let mut mounted = capture::mount(&backing, &mountpoint, &mount_options)?;
    let started = Instant::now();
    tracing::info!(
        backing = %backing.display(),
        mountpoint = %mountpoint.display(),
        socket = %socket.display(),
        threads = options.threads,
        transport = %mounted.transport(),
        "serving"
    );

    let (events, inbox) = mpsc::channel();
    watch_signals(events.clone())?;
    let status = StatusSource {
        fs: mounted.fs.clone(),
        mountpoint: mountpoint.clone(),
        socket: socket.clone(),
        threads: options.threads,
        transport: mounted.transport(),
        started,
    };
    thread::Builder::new()
        .name("control".into())
        .spawn(move || serve_control(listener, status, events))
        .map_err(|e| AgentError::Socket {
            path: socket.clone(),
            error: e,
        })?;
    // Mounted and listening: a server ordered after this unit may start now.
    crate::notify::tell(&format!(
        "READY=1\nSTATUS=serving {} at {}",
        backing.display(),
        mountpoint.display()
    ));

    loop {
        match inbox.recv_timeout(Duration::from_millis(250)) {
            Ok(Event::Signal(sig)) => {
                tracing::info!(signal = sig, "asked to stop");
                match try_unmount(&mut mounted, options.force) {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!("not stopping: {e}; still serving");
                        crate::notify::tell(&format!("STATUS=not stopping: {e}; still serving"));
                    }
                }
            }
            Ok(Event::Unmount { force, reply_to }) => match try_unmount(&mut mounted, force) {
                Ok(()) => {
                    let _ = send(&reply_to, &Response::Unmounted);
                    break;
                }
                Err(e) => {
                    tracing::error!("not unmounting: {e}; still serving");
                    let _ = send(&reply_to, &Response::error(e.to_string()));
                }
            },
            Err(RecvTimeoutError::Timeout) => {
                if mounted.is_finished() {
                    tracing::warn!("the mount was removed from outside the agent; exiting");
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    crate::notify::tell("STOPPING=1\nSTATUS=unmounted; waiting for the last open files");
    if !mounted.is_finished() {
        tracing::info!("waiting for the last open files on the detached mount to close");
    }
    mounted.join();
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
    Ok(())
}

/// The agent holds an fd per inode the kernel knows and per open file, so a database
/// with many tables needs far more than the usual soft limit of 1024: take the hard one.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct for this process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(from = old, to = lim.rlim_max, "raised the open file limit");
            }
        }
    }
}

fn try_unmount(mounted: &mut Mounted, force: bool) -> Result<(), UnmountError> {
    let r = mounted.unmount(force);
    if r.is_ok() && force {
        tracing::info!("unmounted (forced: lazily detached if it was in use)");
    }
    r
}

struct StatusSource {
    fs: Arc<PassthroughFs>,
    mountpoint: PathBuf,
    socket: PathBuf,
    threads: usize,
    transport: String,
    started: Instant,
}

impl StatusSource {
    fn status(&self) -> AgentStatus {
        AgentStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            backing: self.fs.backing().to_path_buf(),
            mountpoint: self.mountpoint.clone(),
            socket: self.socket.clone(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            threads: self.threads,
            transport: self.transport.clone(),
            inodes: self.fs.inodes().len(),
            open_handles: self.fs.open_handles(),
            stats: self.fs.stats.snapshot(),
            session: self.fs.capture().map(|s| s.progress()),
        }
    }
}

/// Binds the control socket (mode 0600), refusing when another agent answers on it and
/// replacing a stale file left by an agent that died.
fn bind_control_socket(path: &Path) -> Result<UnixListener, AgentError> {
    let text = path.as_os_str().as_encoded_bytes();
    if text.contains(&b',') || text.contains(&b'\n') {
        return Err(AgentError::BadSocketPath(path.into()));
    }
    let sock_err = |error| AgentError::Socket {
        path: path.into(),
        error,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(AgentError::SocketInUse(path.into()));
        }
        std::fs::remove_file(path).map_err(sock_err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    let listener = UnixListener::bind(path).map_err(sock_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    Ok(listener)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn watch_signals(events: Sender<Event>) -> Result<(), AgentError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(AgentError::Signals)?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    // A closed terminal must not take the database's files away.
                    continue;
                }
                if events.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .map_err(AgentError::Signals)?;
    Ok(())
}

fn serve_control(listener: UnixListener, status: StatusSource, events: Sender<Event>) {
    let status = Arc::new(status);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        // A thread per connection: a copy streams for as long as it runs, and status
        // must still answer meanwhile.
        let (status, events) = (status.clone(), events.clone());
        let spawned = thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                if let Err(e) = answer(stream, &status, &events) {
                    tracing::debug!(error = %e, "control connection failed");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not serve a control connection");
        }
    }
}

fn answer(
    stream: UnixStream,
    status: &StatusSource,
    events: &Sender<Event>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    reader.read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => Response::Status(Box::new(status.status())),
        Ok(Request::Begin { target, options }) => {
            tracing::info!(target = %target.display(), "backup session requested");
            return crate::staged::serve(
                &status.fs,
                &status.mountpoint,
                &stream,
                &mut reader,
                &target,
                options,
            );
        }
        Ok(Request::Unmount { force }) => {
            let _ = events.send(Event::Unmount {
                force,
                reply_to: stream,
            });
            return Ok(());
        }
        Ok(other) => Response::error(format!(
            "{other:?} belongs to a backup session; start one with Begin first"
        )),
        Err(e) => Response::error(format!("bad request: {e}")),
    };
    send(&stream, &response)
}

use crate::staged::send;
