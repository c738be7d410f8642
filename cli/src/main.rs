//! The `hotbackup` command: parses, calls the agent library, renders. Nothing else.
//!
//! Exit codes: 0 success; 1 the command failed (the message says why and what to do);
//! 2 the command line was wrong; 3 the backup target failed (full, or an I/O error);
//! 4 the session was aborted by what happened on the mount (a read error, a change it
//! could not follow, an internal error); 5 the session was cancelled or its client went
//! away. With 3 to 5 the target is left marked INCOMPLETE.

use std::path::PathBuf;
use std::process::ExitCode;

use agent::backup::BackupOptions;
use agent::db::ConnectionOptions;
use agent::{AgentAddress, AgentOptions, CopyOptions, Request, Response};
use anyhow::{Context, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

mod adopt_cmds;
mod agent_cmds;
mod config_cmd;
mod image_cmds;
mod render;
mod repo_cmds;

#[derive(Parser)]
#[command(
    name = "hotbackup",
    version,
    about = "Online physical backups of MariaDB/MySQL through a capture filesystem"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a backing directory at a mountpoint (the database's datadir) until stopped.
    Agent {
        #[command(flatten)]
        options: AgentOptions,
        /// Log level: error, warn, info, debug or trace.
        #[arg(long, default_value = "info")]
        log_level: String,
    },
    /// Show what an agent serves, for how long, and its counters; with no
    /// --mountpoint/--socket, the whole host: every hotbackup mount, its agent, a running
    /// backup's progress, and the last backups from the history.
    Status {
        #[command(flatten)]
        agent: AgentArgs,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// The backup history to show the last backups from (the whole host's status).
        #[arg(long, value_name = "PATH", default_value = agent::history::DEFAULT_FILE)]
        history_file: PathBuf,
        /// How many of the last backups to show (the whole host's status).
        #[arg(long, value_name = "N", default_value_t = 10)]
        last: usize,
    },
    /// Copy everything under the mount into a new directory: an exact image of the tree
    /// at one instant, taken while applications keep writing (no database coordination).
    Copy {
        #[command(flatten)]
        agent: AgentArgs,
        /// Where the backup goes (new or empty): the image in DIR/data, the manifest in
        /// DIR/backup.json.
        #[arg(long, value_name = "DIR")]
        target_dir: PathBuf,
        #[command(flatten)]
        options: CopyOptions,
        /// How to show progress.
        #[arg(long, value_enum, default_value_t = render::ProgressMode::Auto)]
        progress: render::ProgressMode,
    },
    /// Back up a running MariaDB server whose datadir is on a hotbackup mount: an exact
    /// image at one instant, taken with commits blocked for milliseconds, that starts
    /// with crash recovery and records the binlog and replication coordinates.
    Backup {
        #[command(flatten)]
        connection: ConnectionOptions,
        /// Where the backup goes (new or empty): the image in DIR/data, the manifest in
        /// DIR/backup.json, the coordinates in DIR/hotbackup_binlog_info; or
        /// s3://BUCKET/PREFIX/NAME (written to --staging-dir, uploaded after the validity
        /// point) [default: from the configuration's target.root or target.dir].
        #[arg(long, value_name = "DIR|URL")]
        target_dir: Option<PathBuf>,
        /// The configuration file; flags win over it [default: $HOTBACKUP_CONFIG, else
        /// /etc/hotbackup/hotbackup.toml if it exists].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: BackupOptions,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
        /// How to show progress.
        #[arg(long, value_enum, default_value_t = render::ProgressMode::Auto)]
        progress: render::ProgressMode,
    },
    /// Recompute every checksum of a backup and name each changed, missing or extra
    /// file. Exit code 0: good; 1: damaged; 2: cannot check (not a finished backup).
    Verify {
        /// The backup directory, or s3://BUCKET/PREFIX/NAME.
        dir: PathBuf,
        /// Threads reading the image.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
    },
    /// Describe a backup: state, size, times, server, binlog and replica coordinates,
    /// lock time. Exit code 0: a complete backup; 1: incomplete or unreadable.
    Info {
        /// The backup directory, or s3://BUCKET/PREFIX/NAME.
        dir: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
    },
    /// Print the content digest of files as a backup's manifest records it, to compare a
    /// file with a backup (holes are not read: a sparse file costs what its data costs).
    Digest {
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// b3z1 (what backups record), or blake3 (what format 1 manifests record).
        #[arg(long, value_enum, default_value = "b3z1")]
        algorithm: agent::digest::Algorithm,
    },
    /// Put a backup back as a server's files (verified first), optionally rolled
    /// forward to a GTID or a time from the binlogs (point-in-time recovery).
    Restore {
        /// The backup directory, or s3://BUCKET/PREFIX/NAME.
        dir: PathBuf,
        #[command(flatten)]
        options: agent::restore::RestoreOptions,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
    },
    /// Make a server started on a restored backup a replica: of the server the backup
    /// was taken on, or (--sibling) of the source of the replica it was taken on.
    Replica {
        /// The backup directory the server was restored from, or s3://BUCKET/PREFIX/NAME.
        dir: PathBuf,
        /// How to reach the restored server.
        #[command(flatten)]
        connection: ConnectionOptions,
        #[command(flatten)]
        options: agent::replica::ReplicaOptions,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
    },
    /// Upload a finished backup directory to s3://BUCKET/PREFIX/NAME (compressed,
    /// optionally encrypted; resumes an interrupted upload), or the complete files of a
    /// binlog archive directory that the bucket's copy lacks.
    Upload {
        /// The backup directory.
        dir: PathBuf,
        /// Where it goes.
        #[arg(value_name = "URL")]
        target: PathBuf,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
    },
    /// List the complete backups in a directory or under s3://BUCKET/PREFIX, oldest first.
    List {
        #[arg(value_name = "DIR|URL")]
        location: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
    },
    /// Delete one backup (a directory, or s3://BUCKET/PREFIX/NAME).
    Delete {
        #[arg(value_name = "DIR|URL")]
        image: PathBuf,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
    },
    /// Delete the backups a retention policy does not keep. The newest complete backup
    /// and every incomplete one are always kept.
    Prune {
        #[arg(value_name = "DIR|URL")]
        location: PathBuf,
        #[command(flatten)]
        policy: agent::repo::prune::Policy,
        /// Say what would be deleted, and delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
    },
    /// Archive the server's binlog files into a directory as the server writes them
    /// (fsynced, checksummed, resumable), for point-in-time recovery.
    BinlogArchive {
        #[command(flatten)]
        connection: ConnectionOptions,
        #[command(flatten)]
        options: agent::binlog_archive::ArchiveOptions,
        #[command(flatten)]
        repo: agent::repo::RepoOptions,
    },
    /// Print or install the systemd units that run the agent for a mountpoint and make
    /// the database server's unit require it.
    #[command(group(clap::ArgGroup::new("mode").required(true)))]
    Systemd {
        /// Print the files to stdout, each after a `### PATH` line.
        #[arg(long, group = "mode")]
        print: bool,
        /// Write the files under --root (then: systemctl daemon-reload, and enable the
        /// agent instance).
        #[arg(long, group = "mode")]
        install: bool,
        /// The root directory the files are written under.
        #[arg(long, value_name = "DIR", default_value = "/", requires = "install")]
        root: PathBuf,
        #[command(flatten)]
        options: agent::service::ServiceOptions,
    },
    /// Move a stopped server's datadir onto a hotbackup mount: rename it to the backing
    /// path (same filesystem), make the empty mountpoint, install the agent's units.
    Adopt {
        #[command(flatten)]
        options: agent::adopt::AdoptOptions,
    },
    /// Undo `hotbackup adopt` exactly, from its record (also an interrupted one).
    Unadopt {
        #[command(flatten)]
        options: agent::adopt::UnadoptOptions,
    },
    /// Ask an agent to unmount and exit; refused while files are still open on the mount.
    Unmount {
        #[command(flatten)]
        agent: AgentArgs,
        /// Detach even if in use: the mount vanishes from the namespace and is served
        /// until its last open file closes.
        #[arg(long)]
        force: bool,
    },
}

/// Which agent: `copy` and `unmount` need one; `status` without one shows the host.
#[derive(Args)]
#[group(multiple = false)]
struct AgentArgs {
    /// The agent's mountpoint (its socket is found from the mount table).
    #[arg(long)]
    mountpoint: Option<PathBuf>,
    /// The agent's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl AgentArgs {
    /// The agent named, if one is.
    fn named(&self) -> Option<AgentAddress> {
        match (&self.socket, &self.mountpoint) {
            (Some(s), _) => Some(AgentAddress::Socket(s.clone())),
            (None, Some(m)) => Some(AgentAddress::Mountpoint(m.clone())),
            (None, None) => None,
        }
    }

    /// The agent named; with none, clap's usage error and exit code 2.
    fn address(&self) -> AgentAddress {
        self.named().unwrap_or_else(|| {
            Cli::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "name the agent: --mountpoint DIR or --socket PATH",
                )
                .exit()
        })
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The commands with exit codes of their own.
    match &cli.command {
        Command::Verify {
            dir, json, repo, ..
        } if agent::repo::Location::is_s3(dir) => {
            return repo_cmds::verify(dir, repo, *json);
        }
        Command::Info { dir, json, repo } if agent::repo::Location::is_s3(dir) => {
            return repo_cmds::info(dir, repo, *json);
        }
        Command::Verify {
            dir,
            parallel,
            json,
            ..
        } => return image_cmds::verify(dir, (*parallel).max(1), *json),
        Command::Info { dir, json, .. } => return image_cmds::info(dir, *json),
        _ => {}
    }
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hotbackup: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The documented exit code of a failure (see the module's doc).
fn exit_code(err: &anyhow::Error) -> u8 {
    use agent::AbortReason as R;
    use agent::backup::BackupError;
    let abort = err.chain().find_map(|e| {
        let client = e.downcast_ref::<agent::ClientError>().or_else(|| {
            match e.downcast_ref::<BackupError>() {
                Some(BackupError::Agent(c)) => Some(c),
                _ => None,
            }
        });
        match client {
            Some(agent::ClientError::Agent { abort, .. }) => abort.clone(),
            _ => None,
        }
    });
    match abort {
        None => 1,
        Some(R::TargetFull(_) | R::TargetIo(_)) => 3,
        Some(R::SourceIo(_) | R::Untrackable(_) | R::Panic(_)) => 4,
        Some(R::Cancelled(_) | R::ClientGone) => 5,
    }
}

/// Reads a password from the terminal without echoing it.
fn prompt_password() -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let fd = tty.as_raw_fd();
    // SAFETY: termios calls on the terminal we opened; the old state is restored below.
    let mut term: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::tcgetattr(fd, &mut term) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = term;
    term.c_lflag &= !libc::ECHO;
    // SAFETY: as above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &term) };
    let mut out = &tty;
    let _ = out.write_all(b"Enter password: ");
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    // SAFETY: restores the terminal state saved above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &old) };
    let _ = out.write_all(b"\n");
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent { options, log_level } => {
            init_logging(&log_level)?;
            agent::run_agent(&options)?;
            Ok(())
        }
        Command::Status {
            agent,
            json,
            history_file,
            last,
        } => match agent.named() {
            None => agent_cmds::host(&history_file, last, json),
            Some(address) => agent_cmds::agent(&address, json),
        },
        Command::Copy {
            agent,
            target_dir,
            options,
            progress,
        } => agent_cmds::copy(&agent.address(), target_dir, &options, progress),
        Command::Backup {
            connection,
            target_dir,
            config,
            options,
            progress,
            repo,
        } => {
            let (connection, target_dir, options) = config_cmd::backup_options(
                matches
                    .subcommand_matches("backup")
                    .expect("the backup command"),
                config.as_deref(),
                &connection,
                target_dir,
                &options,
            )?;
            let upload_to = repo_cmds::backup_staging(&target_dir, &repo)?;
            let target = match &upload_to {
                Some((staged, _)) => staged.clone(),
                None if target_dir.is_absolute() => target_dir,
                None => std::env::current_dir()?.join(target_dir),
            };
            let conn = connection.resolve(prompt_password)?;
            let json = progress == render::ProgressMode::Json
                || (progress == render::ProgressMode::Auto
                    && !std::io::IsTerminal::is_terminal(&std::io::stderr()));
            let mut sink = render::sink(progress);
            let summary = agent::backup::run(&conn, &target, &options, |e| match e {
                agent::backup::Event::Copy(r) => sink.update(r),
                agent::backup::Event::Note(n) => eprintln!("hotbackup: {n}"),
            });
            sink.finish();
            let summary = summary.with_context(|| match &upload_to {
                Some((staged, _)) => format!(
                    "the backup was staged in {} (a full staging filesystem needs --staging-dir elsewhere)",
                    staged.display()
                ),
                None => "the backup failed".into(),
            })?;
            println!("{}", render::backup_summary(&summary, json));
            if let Some((staged, url)) = &upload_to {
                repo_cmds::upload_staged(staged, url, &repo)?;
            }
            Ok(())
        }
        Command::Verify { .. } | Command::Info { .. } => unreachable!("handled in main"),
        Command::Restore { dir, options, repo } if agent::repo::Location::is_s3(&dir) => {
            repo_cmds::restore(&dir, &options, &repo)
        }
        Command::Digest { files, algorithm } => image_cmds::digest(&files, algorithm),
        Command::Restore { dir, options, repo } => image_cmds::restore(&dir, &options, &repo),
        Command::Replica {
            dir,
            connection,
            options,
            repo,
        } => {
            let server = connection.resolve(prompt_password)?;
            if agent::repo::Location::is_s3(&dir) {
                repo_cmds::replica(&dir, &server, &options, &repo)
            } else {
                image_cmds::replica(&dir, &server, &options)
            }
        }
        Command::Upload { dir, target, repo } => repo_cmds::upload(&dir, &target, &repo),
        Command::List {
            location,
            json,
            repo,
        } => repo_cmds::list(&location, &repo, json),
        Command::Delete { image, repo } => repo_cmds::delete(&image, &repo),
        Command::Prune {
            location,
            policy,
            dry_run,
            repo,
        } => repo_cmds::prune(&location, &policy, dry_run, &repo),
        Command::BinlogArchive {
            connection,
            options,
            repo,
        } => binlog_archive(&connection, &options, &repo),
        Command::Systemd {
            print,
            install: _,
            root,
            options,
        } => adopt_cmds::systemd(print, &root, &options),
        Command::Adopt { options } => adopt_cmds::adopt(&options),
        Command::Unadopt { options } => adopt_cmds::unadopt(&options),
        Command::Unmount { agent, force } => {
            match agent::client::call(&agent.address(), &Request::Unmount { force })? {
                Response::Unmounted => {
                    println!("unmounted");
                    Ok(())
                }
                Response::Error { message, .. } => bail!("{message}"),
                other => bail!("unexpected answer from the agent: {other:?}"),
            }
        }
    }
}

fn binlog_archive(
    connection: &ConnectionOptions,
    options: &agent::binlog_archive::ArchiveOptions,
    repo: &agent::repo::RepoOptions,
) -> anyhow::Result<()> {
    use agent::binlog_archive::{self as archive, ArchiveEvent};
    let conn = connection.resolve(prompt_password)?;
    let stop = archive::stop_on_signals()?;
    let summary = archive::run(&conn, options, repo, &stop, |e| match e {
        ArchiveEvent::Note(n) | ArchiveEvent::Status(n) => eprintln!("hotbackup: {n}"),
        ArchiveEvent::Gap(g) => eprintln!("hotbackup: WARNING: {g}"),
    })?;
    println!("{summary}");
    // `--once` promised the bucket the files it archived.
    if let Some(u) = summary.upload.as_ref().filter(|_| options.once)
        && (!u.queued.is_empty() || u.stopped.is_some())
    {
        bail!(
            "the binlogs are archived in {}, but {} file(s) are not in {} yet; run the same command again once the bucket answers",
            summary.dir.display(),
            u.queued.len(),
            u.url
        );
    }
    Ok(())
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    // fuser warns when its own unmount-on-drop finds the mount already gone (we unmount
    // first, on purpose); its other messages are kept.
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{level},fuser::mnt=error"))
        .with_context(|| {
            format!(
                "--log-level {level:?} is not a log level; use error, warn, info, debug or trace"
            )
        })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}
