//! Point-in-time recovery: after the image is placed, a private temporary server on it
//! replays the binlog from the image's position up to a GTID or a time.
//!
//! Planning reads every binlog to replay once (`mariadb-binlog` text output), so that a
//! gap, a file that is not the image's binlog, or a target the binlogs never reach is
//! refused before anything is replayed, and so that a GTID target becomes an exact
//! file position (numeric positions work the same in every server version).

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::temp_server::{TempServer, program, succeeded};
use super::{RestoreError, RestoreOptions};
use crate::image::{BinlogCoordinates, Image};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Until {
    Gtid(String),
    Time(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PitrPlan {
    pub start: BinlogCoordinates,
    /// The binlog files to replay, in order (the first from `start.position`).
    pub files: Vec<PathBuf>,
    pub until: Until,
    /// For a GTID target: where in the last file the replay stops (None: its end).
    pub stop_position: Option<u64>,
    pub transactions: u64,
    /// The GTID position the server will have reached.
    pub reached: String,
}

impl PitrPlan {
    pub fn describe(&self) -> String {
        let target = match &self.until {
            Until::Gtid(g) => format!("GTID {g}"),
            Until::Time(t) => format!("before {t}"),
        };
        format!(
            "replay {} transaction(s) from {} at {} up to {target} out of {} binlog file(s) ({} .. {}) on a private temporary server; GTID reached: {}",
            self.transactions,
            self.start.file,
            self.start.position,
            self.files.len(),
            self.files
                .first()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            self.files
                .last()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            if self.reached.is_empty() {
                "(none)"
            } else {
                &self.reached
            }
        )
    }
}

pub(super) fn plan(
    image: &Image,
    options: &RestoreOptions,
) -> Result<Option<PitrPlan>, RestoreError> {
    let refuse = |s: String| Err(RestoreError::Refused(s));
    let until = match (&options.until_gtid, &options.until) {
        (Some(g), _) => {
            if parse_gtid(g).is_none() {
                return refuse(format!(
                    "--until-gtid {g:?} is not a GTID; give one as domain-server-sequence, e.g. 0-1-1234"
                ));
            }
            Until::Gtid(g.clone())
        }
        (None, Some(t)) => {
            if !is_datetime(t) {
                return refuse(format!(
                    "--until {t:?} is not a time; give it as 'YYYY-MM-DD HH:MM:SS' (this machine's time zone)"
                ));
            }
            Until::Time(t.clone())
        }
        (None, None) => return Ok(None),
    };
    let Some(start) = image.binlog() else {
        return refuse(
            "the image has no binlog position (its server ran without a binlog), so there is nothing to replay from; restore without --until".into(),
        );
    };
    if options.binlog_dir.is_empty() {
        return refuse("point-in-time recovery needs --binlog-dir (a binlog archive, or the old server's binlog directory)".into());
    }
    let (stem, first) = split_binlog_name(&start.file).ok_or_else(|| {
        RestoreError::Refused(format!(
            "the image's binlog file name {:?} has no sequence number",
            start.file
        ))
    })?;
    // Every file of the series from the image's file on, from all the directories.
    let mut found: std::collections::BTreeMap<u64, PathBuf> = Default::default();
    for dir in &options.binlog_dir {
        let entries = fs::read_dir(dir).map_err(|e| {
            RestoreError::Refused(format!("cannot read --binlog-dir {}: {e}", dir.display()))
        })?;
        // A `binlog-archive` keeps the file being written in `.partial/`: complete files
        // are taken first, the partial one only where no complete copy exists.
        let partial = fs::read_dir(dir.join(".partial")).into_iter().flatten();
        for e in entries.flatten().chain(partial.flatten()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((s, n)) = split_binlog_name(&name)
                && s == stem
                && n >= first
            {
                found.entry(n).or_insert(e.path());
            }
        }
    }
    let Some(&last) = found.keys().next_back() else {
        return refuse(format!(
            "no binlog file {} or later of series {stem} in {}; point-in-time recovery needs the binlogs written since the backup",
            start.file,
            dirs(&options.binlog_dir)
        ));
    };
    let missing: Vec<String> = (first..=last)
        .filter(|n| !found.contains_key(n))
        .map(|n| format!("{stem}.{n:06}"))
        .collect();
    if !missing.is_empty() {
        return refuse(format!(
            "the binlogs have a gap: {} missing from {}; find the missing file(s) (a binlog archive?) or recover only up to the gap",
            missing.join(", "),
            dirs(&options.binlog_dir)
        ));
    }
    let files: Vec<PathBuf> = found.into_values().collect();
    lines_up(image, &start, &files[0])?;
    let scan = scan(&files, start.position)?;
    let (last_file, stop_position, replayed) = match &until {
        Until::Gtid(g) => {
            let target = parse_gtid(g).expect("checked above");
            let Some(i) = scan.iter().position(|t| t.gtid == target) else {
                let range = match (scan.first(), scan.last()) {
                    (Some(a), Some(b)) => {
                        format!("they hold {} .. {}", a.gtid_text(), b.gtid_text())
                    }
                    _ => "they hold no transaction after the image's position".into(),
                };
                return refuse(format!(
                    "GTID {g} is not in the binlogs after the image's position ({range}); pick a GTID they hold, or add the binlogs that have it"
                ));
            };
            let stop = scan
                .get(i + 1)
                .filter(|next| next.file == scan[i].file)
                .map(|next| next.at);
            (scan[i].file, stop, &scan[..=i])
        }
        Until::Time(t) => {
            let cut = scan
                .iter()
                .position(|tx| tx.time.as_str() >= t.as_str())
                .unwrap_or(scan.len());
            (files.len() - 1, None, &scan[..cut])
        }
    };
    let mut reached = parse_gtid_list(&start.gtid);
    for tx in replayed {
        reached.retain(|g| g.0 != tx.gtid.0);
        reached.push(tx.gtid);
    }
    reached.sort();
    Ok(Some(PitrPlan {
        start,
        files: files[..=last_file].to_vec(),
        until,
        stop_position,
        transactions: replayed.len() as u64,
        reached: reached
            .iter()
            .map(|g| format!("{}-{}-{}", g.0, g.1, g.2))
            .collect::<Vec<_>>()
            .join(","),
    }))
}

/// Replays the plan on the private temporary server `server` (started on the restored
/// files). The replay is not binlogged; the GTID position reached becomes the server's
/// `gtid_slave_pos` (a replica started on it continues from there).
pub(super) fn replay(server: &TempServer, pitr: &PitrPlan) -> Result<(), RestoreError> {
    let failed =
        |what: &str, e: &dyn std::fmt::Display| RestoreError::Replay(format!("{what}: {e}"));
    // mariadb-binlog | mariadb: the binlog's own session settings (server id, GTID,
    // timestamps) are replayed; --disable-log-bin keeps the replay out of the binlog.
    let mut binlog = Command::new(program("mariadb-binlog"));
    binlog
        .arg("--disable-log-bin")
        .arg(format!("--start-position={}", pitr.start.position));
    match (&pitr.until, pitr.stop_position) {
        (Until::Time(t), _) => {
            binlog.arg(format!("--stop-datetime={t}"));
        }
        (Until::Gtid(_), Some(p)) => {
            binlog.arg(format!("--stop-position={p}"));
        }
        (Until::Gtid(_), None) => {}
    }
    binlog
        .args(&pitr.files)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut reader = binlog
        .spawn()
        .map_err(|e| failed("running mariadb-binlog", &e))?;
    let stream = reader.stdout.take().expect("piped");
    let applied = server
        .client(&["--binary-mode"])
        .stdin(stream)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| failed("running the mariadb client", &e))?;
    let read = reader
        .wait_with_output()
        .map_err(|e| failed("running mariadb-binlog", &e))?;
    succeeded("reading the binlog (mariadb-binlog)", &read)?;
    succeeded("applying the binlog", &applied)?;
    server.sql(&format!(
        "SET sql_log_bin = 0; SET GLOBAL gtid_slave_pos = '{}'",
        pitr.reached
    ))
}

/// One transaction of the scanned binlogs.
#[derive(Clone, Debug)]
struct Transaction {
    gtid: (u32, u32, u64),
    /// Index into the file list, and the position of its GTID event there.
    file: usize,
    at: u64,
    /// `YYYY-MM-DD HH:MM:SS` of its GTID event.
    time: String,
}

impl Transaction {
    fn gtid_text(&self) -> String {
        format!("{}-{}-{}", self.gtid.0, self.gtid.1, self.gtid.2)
    }
}

/// Every GTID event after `start` (in the first file) in `files`, with its place and time.
fn scan(files: &[PathBuf], start: u64) -> Result<Vec<Transaction>, RestoreError> {
    let mut out = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let mut c = Command::new(program("mariadb-binlog"));
        if i == 0 {
            c.arg(format!("--start-position={start}"));
        }
        let mut child = c
            .arg(file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                RestoreError::Refused(format!(
                    "cannot run mariadb-binlog (install mariadb-client): {e}"
                ))
            })?;
        let mut at = 0;
        for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
            let line = line
                .map_err(|e| RestoreError::Refused(format!("reading {}: {e}", file.display())))?;
            if let Some(p) = line.strip_prefix("# at ") {
                at = p.trim().parse().unwrap_or(at);
            } else if let Some((time, gtid)) = gtid_header(&line) {
                out.push(Transaction {
                    gtid,
                    file: i,
                    at,
                    time,
                });
            }
        }
        let mut err = String::new();
        let _ = child.stderr.take().expect("piped").read_to_string(&mut err);
        let status = child
            .wait()
            .map_err(|e| RestoreError::Refused(e.to_string()))?;
        if !status.success() {
            return Err(RestoreError::Refused(format!(
                "{} is not a readable binlog: {}",
                file.display(),
                err.trim()
            )));
        }
    }
    Ok(out)
}

/// From a header line such as `#251121 23:45:01 server id 1 end_log_pos 400 ... GTID 0-1-5 trans`:
/// the time as `2025-11-21 23:45:01` and the GTID.
fn gtid_header(line: &str) -> Option<(String, (u32, u32, u64))> {
    let rest = line.strip_prefix('#')?;
    let (date, rest) = rest.split_once(' ')?;
    let rest = rest.trim_start();
    let (clock, rest) = rest.split_once(' ')?;
    let idx = rest
        .find("\tGTID ")
        .map(|i| i + 6)
        .or_else(|| rest.find(" GTID ").map(|i| i + 6))?;
    let gtid = parse_gtid(rest[idx..].split_whitespace().next()?)?;
    if date.len() != 6 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let clock = if clock.len() == 7 {
        format!("0{clock}")
    } else {
        clock.to_string()
    };
    Some((
        format!("20{}-{}-{} {clock}", &date[0..2], &date[2..4], &date[4..6]),
        gtid,
    ))
}

/// The image's own copy of its binlog file must be a prefix of the one to replay
/// (after the first event, whose in-use flag differs once the server closed the file).
fn lines_up(image: &Image, start: &BinlogCoordinates, replay: &Path) -> Result<(), RestoreError> {
    let refuse = |why: String| {
        Err(RestoreError::Refused(format!(
            "{} does not line up with the image's binlog position ({} at {}): {why}; give the binlogs of the server the backup was taken from",
            replay.display(),
            start.file,
            start.position
        )))
    };
    let basename = image
        .settings()
        .into_iter()
        .find(|(k, _)| k == "log_bin" || k == "log_bin_basename")
        .map(|(_, v)| PathBuf::from(v));
    let own = basename
        .and_then(|b| {
            b.parent()
                .and_then(|p| p.strip_prefix(&image.manifest.source.mountpoint).ok())
                .map(Path::to_path_buf)
        })
        .map(|rel| image.data().join(rel).join(&start.file));
    let Some(own) = own.filter(|p| p.exists()) else {
        return Ok(()); // nothing to compare with (an image without its binlog)
    };
    match same_prefix(&own, replay, start.position) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => refuse(why),
        Err(e) => refuse(e.to_string()),
    }
}

/// Whether `replay` holds the bytes of `own` before `pos`, skipping the first event
/// (its in-use flag differs once the server closed the file); Some(why) if not. Read
/// in chunks: binlog files can be large.
fn same_prefix(own: &Path, replay: &Path, pos: u64) -> std::io::Result<Option<String>> {
    use std::io::{Seek, SeekFrom};
    let (mut a, mut b) = (fs::File::open(own)?, fs::File::open(replay)?);
    let len = b.metadata()?.len();
    if len < pos {
        return Ok(Some(format!(
            "it holds {len} bytes, fewer than the position"
        )));
    }
    if a.metadata()?.len() < pos {
        return Ok(Some("its bytes before the position differ".into()));
    }
    let mut header = [0u8; 17];
    let from = match a.read_exact(&mut header) {
        Ok(()) => {
            4 + u64::from(u32::from_le_bytes([
                header[13], header[14], header[15], header[16],
            ]))
        }
        Err(_) => 4,
    }
    .min(pos);
    a.seek(SeekFrom::Start(from))?;
    b.seek(SeekFrom::Start(from))?;
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut left = pos - from;
    while left > 0 {
        let n = left.min(x.len() as u64) as usize;
        a.read_exact(&mut x[..n])?;
        b.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(Some("its bytes before the position differ".into()));
        }
        left -= n as u64;
    }
    Ok(None)
}

pub(super) fn split_binlog_name(name: &str) -> Option<(&str, u64)> {
    let (stem, n) = name.rsplit_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stem, n.parse().ok()?))
}

fn parse_gtid(s: &str) -> Option<(u32, u32, u64)> {
    let mut it = s.trim().splitn(3, '-');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

fn parse_gtid_list(s: &str) -> Vec<(u32, u32, u64)> {
    s.split(',').filter_map(parse_gtid).collect()
}

fn is_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 19
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
}

fn dirs(d: &[PathBuf]) -> String {
    d.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_event_headers_give_time_and_gtid() {
        let line =
            "#251121 23:45:01 server id 1  end_log_pos 400 CRC32 0x8a7d0c1f \tGTID 0-1-5 trans";
        assert_eq!(
            gtid_header(line),
            Some(("2025-11-21 23:45:01".to_string(), (0, 1, 5)))
        );
        assert_eq!(
            gtid_header("#251121 23:45:01 server id 1  end_log_pos 400 \tXid = 7"),
            None
        );
        assert_eq!(
            gtid_header("#251121  9:05:01 server id 1 \tGTID 2-9-77 ddl").map(|x| x.0),
            Some("2025-11-21 09:05:01".to_string())
        );
    }

    #[test]
    fn binlog_names_and_times_are_checked() {
        assert_eq!(split_binlog_name("bin.000012"), Some(("bin", 12)));
        assert_eq!(split_binlog_name("bin.index"), None);
        assert!(is_datetime("2026-11-21 10:00:00"));
        assert!(!is_datetime("2026-11-21T10:00:00"));
        assert_eq!(parse_gtid_list("0-1-5,1-2-9"), [(0, 1, 5), (1, 2, 9)]);
    }
}
