//! The commands that talk to a running agent: `status` (one agent's state and counters,
//! or the whole host's mounts, agents, running backup and last backups) and `copy`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::{AgentAddress, AgentStatus, CopyOptions, Request, Response};
use anyhow::bail;

use crate::render::{self, bytes};

/// The whole host: every hotbackup mount, its agent, and the history's last backups.
pub fn host(history_file: &Path, last: usize, json: bool) -> anyhow::Result<()> {
    let host = agent::host::status(history_file, last);
    if json {
        println!("{}", serde_json::to_string_pretty(&host)?);
    } else {
        print!("{}", render::host_status(&host));
    }
    Ok(())
}

/// `hotbackup copy`: an exact image of the tree under the mount, through the agent.
pub fn copy(
    address: &AgentAddress,
    target_dir: PathBuf,
    options: &CopyOptions,
    progress: render::ProgressMode,
) -> anyhow::Result<()> {
    let options = options.session()?;
    let target = if target_dir.is_absolute() {
        target_dir
    } else {
        std::env::current_dir()?.join(target_dir)
    };
    let json = progress == render::ProgressMode::Json
        || (progress == render::ProgressMode::Auto
            && !std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let mut sink = render::sink(progress);
    // The agent reports several times a second in every stage: a minute of silence
    // means it is stuck.
    let idle = Duration::from_secs(60);
    let (mut session, _copied) =
        agent::client::StagedClient::begin(address, &target, options, idle, |r| sink.update(r))?;
    session.stop(|r| sink.update(r))?;
    let summary = session.finish("copy", serde_json::Value::Null, Vec::new(), |r| {
        sink.update(r)
    })?;
    sink.finish();
    println!("{}", render::summary(&summary, json));
    Ok(())
}

/// One agent, asked over its control socket.
pub fn agent(address: &AgentAddress, json: bool) -> anyhow::Result<()> {
    let status = match agent::client::call(address, &Request::Status)? {
        Response::Status(s) => *s,
        Response::Error { message, .. } => bail!("{message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status);
    }
    Ok(())
}

fn print_status(s: &AgentStatus) {
    println!(
        "agent       pid {} (hotbackup {}), up {}",
        s.pid,
        s.version,
        duration(s.uptime_secs)
    );
    println!("backing     {}", s.backing.display());
    println!("mountpoint  {}", s.mountpoint.display());
    println!("socket      {}", s.socket.display());
    println!("threads     {}", s.threads);
    if !s.transport.is_empty() {
        println!("transport   {}", s.transport);
    }
    println!(
        "inodes      {} known to the kernel, {} files/dirs open",
        s.inodes, s.open_handles
    );
    println!(
        "bytes       {} read, {} written",
        bytes(s.stats.bytes_read),
        bytes(s.stats.bytes_written)
    );
    let mut ops: Vec<_> = s.stats.ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1));
    let ops: Vec<String> = ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "operations  {}",
        if ops.is_empty() {
            "none yet".into()
        } else {
            ops.join(", ")
        }
    );
    let errnos: Vec<String> = s
        .stats
        .errnos
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "errors      {} answered with an errno{}",
        s.stats.errors,
        if errnos.is_empty() {
            String::new()
        } else {
            format!(" ({})", errnos.join(", "))
        }
    );
    if let Some(p) = &s.session {
        println!(
            "session     {}{}",
            crate::render::session_line(p),
            p.error
                .as_deref()
                .map(|e| format!(" (error: {e})"))
                .unwrap_or_default()
        );
    }
}

pub(crate) fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
