//! Rendering progress and sizes for people (a bar on a terminal) or machines (JSON lines).

use std::io::IsTerminal;

use agent::control::Report;
use agent::copy::CopySummary;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, JSON lines on stdout otherwise.
    Auto,
    Bar,
    Json,
    None,
}

pub trait ProgressSink {
    fn update(&mut self, r: &Report);
    fn finish(&mut self);
}

pub fn sink(mode: ProgressMode) -> Box<dyn ProgressSink> {
    let mode = match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::Json,
        m => m,
    };
    match mode {
        ProgressMode::Bar => Box::new(Bar::new()),
        ProgressMode::Json => Box::new(JsonLines),
        _ => Box::new(Quiet),
    }
}

struct Bar(ProgressBar);

impl Bar {
    fn new() -> Bar {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .expect("valid template"),
        );
        Bar(bar)
    }
}

impl ProgressSink for Bar {
    fn update(&mut self, r: &Report) {
        if let Some(f) = &r.finishing {
            self.0.set_length(f.bytes_total.max(f.bytes_done));
            self.0.set_position(f.bytes_done);
            self.0.set_message(format!(
                "finishing: {}/{} files checksummed and synced",
                f.files_done, f.files_total
            ));
            return;
        }
        let p = &r.capture;
        self.0.set_length(p.bytes_total.max(p.bytes_copied));
        self.0.set_position(p.bytes_copied);
        self.0.set_message(format!(
            "{}/{} files, {} mirrored{}{}",
            p.files_copied,
            p.files_total,
            bytes(p.bytes_mirrored),
            pace(p),
            p.current_file
                .as_deref()
                .map(|f| format!(", {f}"))
                .unwrap_or_default()
        ));
    }

    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

struct JsonLines;

impl ProgressSink for JsonLines {
    fn update(&mut self, r: &Report) {
        if let Ok(line) = serde_json::to_string(&serde_json::json!({ "progress": r })) {
            println!("{line}");
        }
    }

    fn finish(&mut self) {}
}

struct Quiet;

impl ProgressSink for Quiet {
    fn update(&mut self, _: &Report) {}
    fn finish(&mut self) {}
}

pub fn summary(s: &CopySummary, json: bool) -> String {
    if json {
        return serde_json::to_string(&serde_json::json!({ "copied": s })).unwrap_or_default();
    }
    let rate = s.bytes_copied as f64 / s.duration_secs.max(1e-3);
    format!(
        "copied {} files, {} into {}\n  {}, {} mirrored, {:.1}s ({}/s)\n  validity point {}",
        s.files,
        bytes(s.bytes),
        s.target.display(),
        copied(s.bytes_copied, s.bytes_cloned),
        bytes(s.bytes_mirrored),
        s.duration_secs,
        bytes(rate as u64),
        s.validity_point
    )
}

/// A running session in one line: phase, files, bytes (cloned, mirrored), the pace.
pub fn session_line(p: &agent::Progress) -> String {
    format!(
        "{:?}: {}/{} files, {} of {}, {} mirrored{}",
        p.phase.unwrap_or(agent::Phase::Copying),
        p.files_copied,
        p.files_total,
        copied(p.bytes_copied, p.bytes_cloned),
        bytes(p.bytes_total),
        bytes(p.bytes_mirrored),
        pace(p)
    )
}

/// ", copier paced at R/s (budget B ms)" under `--throttle auto`, else nothing.
fn pace(p: &agent::Progress) -> String {
    p.pace.map_or(String::new(), |pace| {
        format!(
            ", copier paced at {}/s (latency budget {:.1} ms)",
            bytes(pace.bytes_per_sec),
            pace.budget_us as f64 / 1000.0
        )
    })
}

/// "N copied", saying how much of it was cloned (reflinked) when any was.
pub fn copied(copied: u64, cloned: u64) -> String {
    if cloned == 0 {
        format!("{} copied", bytes(copied))
    } else {
        format!("{} copied ({} of it cloned)", bytes(copied), bytes(cloned))
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn backup_summary(s: &agent::backup::BackupSummary, json: bool) -> String {
    if json {
        return serde_json::to_string(&serde_json::json!({ "backup": s })).unwrap_or_default();
    }
    let binlog = match &s.binlog {
        Some(b) => format!(
            "binlog {} at {}, GTID {}",
            b.file,
            b.position,
            if b.gtid.is_empty() { "(none)" } else { &b.gtid }
        ),
        None => "no binlog (the server runs without one): no coordinates recorded".into(),
    };
    let mut out = format!(
        "backup complete: {}\n  {} files, {} ({}, {} mirrored) in {:.1}s\n  validity point {}\n  {binlog}\n  commits blocked for {:.1} ms",
        s.image.target.display(),
        s.image.files,
        bytes(s.image.bytes),
        copied(s.image.bytes_copied, s.image.bytes_cloned),
        bytes(s.image.bytes_mirrored),
        s.image.duration_secs,
        s.image.validity_point,
        s.lock.commit_block_ms,
    );
    for c in &s.replication {
        out.push_str(&format!(
            "\n  replica of {}:{}{}: executed up to {} at {} (GTID: {})",
            c.source_host,
            c.source_port,
            if c.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.name)
            },
            c.exec_file,
            c.exec_position,
            c.using_gtid
        ));
    }
    out
}

/// `hotbackup status` of the whole host: the mounts and their agents, then the last
/// backups, as two tables.
pub fn host_status(s: &agent::host::HostStatus) -> String {
    let mut agents = vec![[
        "MOUNTPOINT".to_string(),
        "AGENT".to_string(),
        "BACKUP RUNNING".to_string(),
    ]];
    for a in &s.agents {
        let (agent, session) = match (&a.status, &a.error) {
            (Some(st), _) => (
                format!(
                    "pid {}, up {}",
                    st.pid,
                    crate::agent_cmds::duration(st.uptime_secs)
                ),
                st.session.as_ref().map_or("none".to_string(), session_line),
            ),
            (None, error) => (
                format!("no answer: {}", error.as_deref().unwrap_or("unknown")),
                "?".to_string(),
            ),
        };
        agents.push([a.mountpoint.display().to_string(), agent, session]);
    }
    let mut out = if s.agents.is_empty() {
        "no hotbackup mounts on this host\n".to_string()
    } else {
        table(&agents)
    };
    out.push('\n');
    match &s.history_error {
        Some(e) => out.push_str(&format!(
            "the history {} cannot be read: {e}\n",
            s.history_file.display()
        )),
        None if s.backups.is_empty() => out.push_str(&format!(
            "no backups in the history {}\n",
            s.history_file.display()
        )),
        None => {
            out.push_str(&format!(
                "last backups (newest first, from {}):\n",
                s.history_file.display()
            ));
            let mut rows = vec![[
                "STARTED".to_string(),
                "ENDED".to_string(),
                "STATE".to_string(),
                "TARGET".to_string(),
                "DETAIL".to_string(),
            ]];
            for b in &s.backups {
                rows.push([
                    b.started.clone(),
                    b.updated.clone(),
                    b.state.clone(),
                    b.target.display().to_string(),
                    b.detail.clone().unwrap_or_default(),
                ]);
            }
            out.push_str(&table(&rows));
        }
    }
    out
}

/// Rows as left-aligned columns, two spaces apart.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
