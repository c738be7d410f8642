//! `verify`, `info`, `restore` and `digest`: the commands that read a finished backup (or a
//! file to compare with one).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agent::digest::Algorithm;
use agent::image::info::{ImageInfo, State};
use agent::image::verify::{self, VerifyProgress};
use agent::image::{Image, ImageError};
use agent::restore::{RestoreEvent, RestoreOptions};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::render::bytes;

/// Exit codes of `verify`: 0 good, 1 damaged, 2 cannot check.
pub fn verify(dir: &Path, parallel: usize, json: bool) -> ExitCode {
    let image = match Image::open(dir) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("hotbackup: {e}");
            return ExitCode::from(2);
        }
    };
    let bar = bar(json);
    let report = verify::verify(&image, parallel, |p: VerifyProgress| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!("{}/{} files", p.files_done, p.files_total));
    });
    bar.finish_and_clear();
    if let Err(e) = verify::record(&image, &report) {
        eprintln!(
            "hotbackup: note: could not record the result in {}: {e}",
            dir.display()
        );
    }
    print_verify(dir, &report, json)
}

/// Prints a verification's result; its exit code.
pub fn print_verify(dir: &Path, report: &verify::VerifyReport, json: bool) -> ExitCode {
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        for p in &report.problems {
            println!("{p}");
        }
        let rate = report.bytes as f64 / report.duration_secs.max(1e-3);
        println!(
            "{}: {} files, {} checked in {:.1}s ({}/s): {}",
            dir.display(),
            report.files,
            bytes(report.bytes),
            report.duration_secs,
            bytes(rate as u64),
            if report.ok() {
                "all checksums match".to_string()
            } else {
                format!(
                    "DAMAGED, {} problem(s); restore from another backup",
                    report.problems.len()
                )
            }
        );
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Exit codes of `info`: 0 a complete image, 1 incomplete or unreadable.
pub fn info(dir: &Path, json: bool) -> ExitCode {
    print_info(&agent::image::info::info(dir), json)
}

/// Prints what `info` found; its exit code.
pub fn print_info(info: &ImageInfo, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).unwrap_or_default()
        );
    } else {
        print!("{}", describe(info));
    }
    if info.state == State::Complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn describe(i: &ImageInfo) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    line("backup", i.dir.display().to_string());
    line(
        "state",
        match (&i.state, &i.reason) {
            (State::Complete, _) => "complete".into(),
            (State::Incomplete, r) => {
                format!("INCOMPLETE: {}", r.as_deref().unwrap_or("unknown"))
            }
            (State::Unreadable, r) => {
                format!("not usable: {}", r.as_deref().unwrap_or("unknown"))
            }
        },
    );
    line(
        "verified",
        match &i.verified {
            None => "never (run `hotbackup verify`)".into(),
            Some(v) if v.ok() => format!("{}: all checksums matched", v.at),
            Some(v) => format!("{}: DAMAGED, {} problem(s)", v.at, v.problems.len()),
        },
    );
    let Some(s) = &i.summary else {
        return out;
    };
    line("kind", s.kind.clone());
    line(
        "size",
        format!(
            "{} in {} files, {} directories ({}, {} mirrored)",
            bytes(s.totals.bytes),
            s.totals.files,
            s.totals.directories,
            crate::render::copied(s.totals.bytes_copied, s.totals.bytes_cloned),
            bytes(s.totals.bytes_mirrored)
        ),
    );
    line("started", s.started_at.clone());
    line("valid at", s.validity_point.clone());
    line(
        "finished",
        format!("{} ({:.1}s)", s.finished_at, s.duration_secs),
    );
    line(
        "taken by",
        format!("hotbackup {} on {}", s.tool_version, s.host),
    );
    if let Some(v) = &s.server_version {
        line(
            "server",
            format!(
                "{} {v}, server_id {}, host {}",
                s.server_flavor.as_deref().unwrap_or("?"),
                s.server_id.unwrap_or(0),
                s.server_hostname.as_deref().unwrap_or("?")
            ),
        );
    }
    if let Some(d) = &s.datadir {
        line("datadir", d.display().to_string());
    }
    if s.kind == "backup" {
        line(
            "binlog",
            match &s.binlog {
                Some(b) => format!(
                    "{} at {}, GTID {}",
                    b.file,
                    b.position,
                    if b.gtid.is_empty() { "(none)" } else { &b.gtid }
                ),
                None => "none (the server ran without a binlog)".into(),
            },
        );
        if let Some(conns) = s.replication.as_array().filter(|c| !c.is_empty()) {
            for c in conns {
                line(
                    "replica of",
                    format!(
                        "{}:{}{} executed up to {} at {} (GTID: {})",
                        c["source_host"].as_str().unwrap_or("?"),
                        c["source_port"],
                        c["name"]
                            .as_str()
                            .filter(|n| !n.is_empty())
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default(),
                        c["exec_file"].as_str().unwrap_or("?"),
                        c["exec_position"],
                        c["using_gtid"].as_str().unwrap_or("?")
                    ),
                );
            }
            if let Some(g) = &s.gtid_slave_pos {
                line("gtid_slave_pos", g.clone());
            }
        }
        if let Some(ms) = s.commit_block_ms {
            line("commit block", format!("{ms:.1} ms"));
        }
    }
    out
}

/// Exit codes of `restore`: 0 restored (or planned, with --dry-run), 1 refused or failed.
/// `digest`: one line per file, as b3sum prints them.
pub fn digest(files: &[PathBuf], algorithm: Algorithm) -> anyhow::Result<()> {
    for path in files {
        let digest = std::fs::File::open(path)
            .and_then(|f| agent::digest::of_file(&f, algorithm, |_| {}))
            .with_context(|| format!("cannot read {}; name a readable file", path.display()))?;
        println!("{digest}  {}", path.display());
    }
    Ok(())
}

pub fn restore(
    dir: &Path,
    options: &RestoreOptions,
    repo: &agent::repo::RepoOptions,
) -> anyhow::Result<()> {
    let bar = bar(false);
    let result = agent::restore::run(dir, options, repo, |e| match e {
        RestoreEvent::Step(s) => {
            bar.set_length(0);
            bar.set_position(0);
            bar.set_message(s.to_string());
            if bar.is_hidden() {
                eprintln!("hotbackup: {s}");
            }
        }
        RestoreEvent::Progress { done, total } => {
            bar.set_length(total);
            bar.set_position(done);
        }
        RestoreEvent::Note(n) => bar.suspend(|| eprintln!("hotbackup: {n}")),
    });
    bar.finish_and_clear();
    let (plan, summary) = match result {
        Ok(v) => v,
        Err(agent::restore::RestoreError::Image(ImageError::Incomplete { dir, reason })) => {
            anyhow::bail!(
                "{} is an INCOMPLETE backup and cannot be restored: {reason}",
                dir.display()
            )
        }
        Err(e) => return Err(e.into()),
    };
    let Some(s) = summary else {
        println!("{plan}");
        println!("(dry run: nothing was changed)");
        return Ok(());
    };
    println!(
        "restored {} files, {} into {} in {:.1}s{}",
        s.files,
        bytes(s.bytes),
        plan.root.display(),
        s.duration_secs,
        if s.reflinked > 0 {
            format!(" ({} reflinked)", s.reflinked)
        } else {
            String::new()
        }
    );
    if let Some(g) = &s.reached_gtid {
        println!("point-in-time recovery reached GTID {g}");
    }
    println!(
        "start the server with: mariadbd --defaults-extra-file={} (datadir {})",
        s.config.display(),
        s.datadir.display()
    );
    Ok(())
}

pub fn bar(json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("valid template"),
    );
    bar
}

/// `replica`: points a server started on a restored image at its source.
pub fn replica(
    dir: &Path,
    server: &agent::db::Target,
    options: &agent::replica::ReplicaOptions,
) -> anyhow::Result<()> {
    use agent::replica::ReplicaEvent;
    let image = Image::open(dir)?;
    if options.print_sql {
        for sql in agent::replica::plan(&image, options, None)?.statements {
            println!("{sql};");
        }
        return Ok(());
    }
    let mut last = std::time::Instant::now() - std::time::Duration::from_secs(10);
    let summary = agent::replica::run(&image, server, options, |e| match e {
        ReplicaEvent::Note(n) => eprintln!("hotbackup: {n}"),
        ReplicaEvent::Behind {
            replica,
            source,
            seconds,
        } => {
            if last.elapsed() >= std::time::Duration::from_secs(2) {
                last = std::time::Instant::now();
                eprintln!(
                    "hotbackup: catching up: replica at {replica}, source at {source}{}",
                    seconds
                        .map(|s| format!(", {s} s behind"))
                        .unwrap_or_default()
                );
            }
        }
    })?;
    println!(
        "replicating from {}:{}{}",
        summary.plan.source_host,
        summary.plan.source_port,
        if summary.plan.connection.is_empty() {
            String::new()
        } else {
            format!(" (connection {})", summary.plan.connection)
        }
    );
    if let Some(g) = &summary.caught_up_at {
        println!("caught up with the source at GTID {g}");
    }
    if !summary.compared.is_empty() {
        for t in &summary.compared {
            println!(
                "  {:<40} {:<8} {}",
                t.table,
                t.engine,
                if t.unstable {
                    "changed on the source while compared (not transactional)".to_string()
                } else {
                    format!("checksum {} on both", t.source.as_deref().unwrap_or("?"))
                }
            );
        }
        println!(
            "{} tables compared at GTID {}: the replica matches its source",
            summary.compared.len(),
            summary.caught_up_at.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}
