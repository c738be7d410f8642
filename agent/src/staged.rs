//! A staged backup session on one control connection: start → copied → stop at the
//! validity point → finish. Between `Copied` and `Stop` the client does what it must at
//! the validity point (a database coordinator blocks commits there); the session follows
//! every write meanwhile. Whatever happens to the client, the session never outlives its
//! connection: the agent aborts it and leaves the target marked incomplete.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use capture::PassthroughFs;
use capture::session::{AbortReason, CaptureError, Phase, SessionOptions, ValidityPoint};

use crate::control::{ExtraFile, Report, Request, Response};
use crate::copy::{self, CopySummary, FinishCounters};
use crate::manifest::{self, Manifest, SideFile, Source, Totals};

const TICK: Duration = Duration::from_millis(250);

/// Why a staged session ended early; the message goes to the client and the log.
struct Ended {
    message: String,
    abort: Option<AbortReason>,
}

impl Ended {
    fn aborted(reason: AbortReason) -> Ended {
        Ended {
            message: format!("the session was aborted: {reason}"),
            abort: Some(reason),
        }
    }
}

/// Serves a `Begin` request on `stream` until the session is finished or ended.
pub fn serve<'a>(
    fs: &'a PassthroughFs,
    mountpoint: &'a Path,
    stream: &'a UnixStream,
    reader: &'a mut BufReader<&'a UnixStream>,
    target: &Path,
    options: SessionOptions,
) -> io::Result<()> {
    // Waiting for the client's next step has no time limit (it may be waiting for a
    // database lock), but a dead client is noticed at once: its end of the socket closes.
    stream.set_read_timeout(None)?;
    let mut run = Run {
        fs,
        mountpoint,
        stream,
        reader,
        started: SystemTime::now(),
        clock: Instant::now(),
        target: None,
    };
    match run.drive(target, options) {
        Ok(summary) => {
            tracing::info!(target = %summary.target.display(), bytes = summary.bytes,
                mirrored = summary.bytes_mirrored, "backup image finished");
            send(stream, &Response::Finished(summary))
        }
        Err(ended) => {
            tracing::error!("backup session ended: {}", ended.message);
            if let Some(target) = &run.target {
                copy::mark_incomplete(target, &ended.message);
            }
            send(
                stream,
                &Response::Error {
                    message: ended.message,
                    abort: ended.abort,
                },
            )
        }
    }
}

struct Run<'a> {
    fs: &'a PassthroughFs,
    mountpoint: &'a Path,
    stream: &'a UnixStream,
    reader: &'a mut BufReader<&'a UnixStream>,
    started: SystemTime,
    clock: Instant,
    /// Set once the target is prepared (and marked incomplete).
    target: Option<PathBuf>,
}

impl Run<'_> {
    fn drive(&mut self, target: &Path, options: SessionOptions) -> Result<CopySummary, Ended> {
        let plain = |e: &dyn std::fmt::Display| Ended {
            message: e.to_string(),
            abort: None,
        };
        options.validate().map_err(|e| plain(&e))?;
        let target = copy::prepare_target(target, self.mountpoint, self.fs.backing())
            .map_err(|e| plain(&e))?;
        self.target = Some(target.clone());
        let image = target.join(manifest::DATA);
        copy::private_dir(&image, false).map_err(|e| plain(&e))?;
        let parallel = options.parallel;
        let options_json = serde_json::to_value(&options).unwrap_or_default();
        let session = self
            .fs
            .start_capture(&image, options)
            .map_err(|e| match e {
                CaptureError::Aborted(r) => Ended::aborted(r),
                other => plain(&other),
            })?;
        let fs = self.fs;
        let stopped = loop {
            self.until_copied(&session)?;
            match self.next_request()? {
                Request::Stop => match fs.stop_capture() {
                    Ok(stopped) => break stopped,
                    Err(CaptureError::NotCopied(files_left)) => {
                        self.reply(&Response::NotCopied { files_left })?
                    }
                    Err(CaptureError::Aborted(r)) => return Err(Ended::aborted(r)),
                    Err(other) => return Err(plain(&other)),
                },
                other => return Err(self.unexpected(other, "Stop")),
            }
        };
        // The client learns of the validity point at once (a database coordinator is
        // holding commits); the image's metadata is read after, the namespace frozen.
        self.reply(&Response::Stopped {
            validity_point: manifest::rfc3339(stopped.at),
            progress: stopped.progress.clone(),
        })?;
        let vp = stopped.validity_point().map_err(|e| match e {
            CaptureError::Aborted(r) => Ended::aborted(r),
            other => plain(&other),
        })?;
        let (kind, database, files) = match self.next_request()? {
            Request::Finish {
                kind,
                database,
                files,
            } => (kind, database, files),
            other => return Err(self.unexpected(other, "Finish")),
        };
        self.finish(&target, &vp, parallel, options_json, kind, database, &files)
    }

    /// Streams progress until the copy phase is over; the client's disappearance (or a
    /// failed session) ends the session.
    fn until_copied(&mut self, session: &capture::session::CaptureSession) -> Result<(), Ended> {
        loop {
            let phase = session.wait_copied(TICK);
            let progress = session.progress();
            match phase {
                Phase::Copying => self.reply(&Response::Progress(Report {
                    capture: progress,
                    finishing: None,
                }))?,
                Phase::Copied => return self.reply(&Response::Copied(progress)),
                Phase::Aborted | Phase::Stopped => {
                    let reason = session
                        .error()
                        .unwrap_or_else(|| AbortReason::Cancelled("the session ended".into()));
                    self.fs.abort_capture(reason.clone());
                    return Err(Ended::aborted(reason));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        target: &Path,
        vp: &ValidityPoint,
        parallel: usize,
        options: serde_json::Value,
        kind: String,
        database: serde_json::Value,
        files: &[ExtraFile],
    ) -> Result<CopySummary, Ended> {
        let failed = |error: io::Error| Ended {
            message: format!(
                "finishing the image in {} failed: {error}",
                target.display()
            ),
            abort: None,
        };
        let mut side_files = Vec::new();
        for extra in files {
            let name = Path::new(&extra.name);
            let plain_name = name.components().count() == 1
                && name.file_name().is_some()
                && !matches!(
                    extra.name.as_str(),
                    manifest::MANIFEST | manifest::INCOMPLETE | manifest::DATA
                );
            if !plain_name {
                return Err(failed(io::Error::other(format!(
                    "{:?} is not a plain file name for the target",
                    extra.name
                ))));
            }
            let path = target.join(name);
            copy::write_private(&path, &extra.contents).map_err(failed)?;
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(failed)?;
            side_files.push(SideFile {
                name: extra.name.clone(),
                size: extra.contents.len() as u64,
                blake3: blake3::hash(extra.contents.as_bytes()).to_hex().to_string(),
            });
        }
        let counters = FinishCounters::default();
        let stream = self.stream;
        // Reports how far the pass is; a client that is gone cancels it (nobody is
        // waiting for this image any more).
        let report = || {
            let report = Report {
                capture: vp.progress.clone(),
                finishing: Some(counters.snapshot()),
            };
            if send(stream, &Response::Progress(report)).is_err() {
                counters.cancelled.store(true, Relaxed);
            }
        };
        let outcome = std::thread::scope(|scope| {
            let work = scope.spawn(|| copy::finish_image(target, vp, parallel, &counters));
            while !work.is_finished() {
                std::thread::sleep(TICK);
                report();
            }
            let outcome = work
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the finishing pass panicked")));
            // A last report, so that even a quick pass is seen to end.
            report();
            outcome
        });
        if counters.cancelled.load(Relaxed) {
            return Err(Ended::aborted(AbortReason::ClientGone));
        }
        let (entries, totals) = outcome.map_err(failed)?;
        let manifest = Manifest {
            format_version: manifest::FORMAT_VERSION,
            tool: "hotbackup".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            kind,
            host: copy::hostname(),
            source: Source {
                mountpoint: self.mountpoint.to_path_buf(),
                backing: self.fs.backing().to_path_buf(),
            },
            started_at: manifest::rfc3339(self.started),
            validity_point: manifest::rfc3339(vp.at),
            finished_at: manifest::rfc3339(SystemTime::now()),
            duration_secs: self.clock.elapsed().as_secs_f64(),
            options,
            database,
            totals: Totals {
                bytes_copied: vp.progress.bytes_copied,
                bytes_mirrored: vp.progress.bytes_mirrored,
                bytes_cloned: vp.progress.bytes_cloned,
                ..totals
            },
            files: entries,
            side_files,
        };
        copy::write_manifest(target, &manifest).map_err(failed)?;
        Ok(CopySummary {
            target: target.to_path_buf(),
            files: manifest.totals.files,
            bytes: manifest.totals.bytes,
            bytes_copied: manifest.totals.bytes_copied,
            bytes_mirrored: manifest.totals.bytes_mirrored,
            bytes_cloned: manifest.totals.bytes_cloned,
            duration_secs: manifest.duration_secs,
            validity_point: manifest.validity_point,
        })
    }

    /// Sends a line; a client that is gone ends the session.
    fn reply(&mut self, response: &Response) -> Result<(), Ended> {
        send(self.stream, response).map_err(|_| self.client_gone())
    }

    /// Reads the client's next step; end of file (or a broken line) ends the session,
    /// and so does `Cancel`.
    fn next_request(&mut self) -> Result<Request, Ended> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => return Err(self.client_gone()),
            Ok(_) => {}
        }
        match serde_json::from_str::<Request>(&line) {
            Ok(Request::Cancel { reason }) => {
                let reason = AbortReason::Cancelled(reason);
                self.fs.abort_capture(reason.clone());
                Err(Ended::aborted(reason))
            }
            Ok(request) => Ok(request),
            Err(e) => {
                self.fs
                    .abort_capture(AbortReason::Cancelled("a bad request".into()));
                Err(Ended {
                    message: format!("bad request in a backup session: {e}"),
                    abort: Some(AbortReason::Cancelled("a bad request".into())),
                })
            }
        }
    }

    fn unexpected(&mut self, got: Request, wanted: &str) -> Ended {
        let reason =
            AbortReason::Cancelled(format!("the client sent {got:?} where {wanted} was due"));
        self.fs.abort_capture(reason.clone());
        Ended::aborted(reason)
    }

    fn client_gone(&mut self) -> Ended {
        // Harmless after the stop (no session is running then).
        self.fs.abort_capture(AbortReason::ClientGone);
        Ended::aborted(AbortReason::ClientGone)
    }
}

pub(crate) fn send(stream: &UnixStream, response: &Response) -> io::Result<()> {
    let mut out = serde_json::to_string(response).expect("responses serialize");
    out.push('\n');
    let mut writer = stream;
    writer.write_all(out.as_bytes())
}
