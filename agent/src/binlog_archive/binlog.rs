//! Binlog files as bytes and names: one pass over a (possibly unfinished) file that
//! checksums it and walks its event chain, and the numbering of a server's binlog names.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Every binlog file starts with these four bytes.
pub const MAGIC: [u8; 4] = [0xfe, b'b', b'i', b'n'];
/// The common header of every event (binlog format 4).
const HEADER_LEN: u64 = 19;
pub const STOP_EVENT: u8 = 3;
pub const ROTATE_EVENT: u8 = 4;
pub const GTID_LIST_EVENT: u8 = 163;
/// A GTID list event larger than this is not kept for the manifest (it lists domains).
const GTID_LIST_MAX: u64 = 64 * 1024;

/// What one pass over a binlog file found.
#[derive(Clone, Debug, PartialEq)]
pub struct Scan {
    pub size: u64,
    pub blake3: String,
    /// Where the last whole event ends: equal to `size` unless the file is torn or
    /// not a binlog.
    pub events_end: u64,
    pub last_event: Option<u8>,
    /// The first event's timestamp: when the server created the file (Unix seconds).
    pub created: Option<u32>,
    /// The GTID state at the start of the file, as the server prints it (`[0-1-13]`).
    pub gtid_list: Option<String>,
}

impl Scan {
    /// Whole events up to the end of the file.
    pub fn untorn(&self) -> bool {
        self.events_end == self.size && self.size >= MAGIC.len() as u64
    }

    /// The server closed this file itself: it ends with a ROTATE (to the next file)
    /// or a STOP (a clean shutdown) event.
    pub fn ends_cleanly(&self) -> bool {
        self.untorn() && matches!(self.last_event, Some(STOP_EVENT | ROTATE_EVENT))
    }
}

/// Reads `path` once: blake3 of all of it and the event chain.
pub fn scan(path: &Path) -> io::Result<Scan> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut walker = EventWalker::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        walker.feed(&buf[..n]);
    }
    Ok(Scan {
        size: walker.offset,
        blake3: hasher.finalize().to_hex().to_string(),
        events_end: walker.events_end,
        last_event: walker.last_event,
        created: walker.created,
        gtid_list: walker.gtid_list,
    })
}

/// Follows the event chain through a byte stream fed in pieces of any size, without
/// holding more than one small event in memory.
#[derive(Default)]
struct EventWalker {
    /// Bytes fed so far.
    offset: u64,
    /// The header of the event being read, while it is incomplete.
    header: Vec<u8>,
    /// Where the event being read ends, once its header is known.
    event_end: Option<u64>,
    event_type: u8,
    /// The body of a GTID list event being read.
    body: Option<Vec<u8>>,
    events: u64,
    events_end: u64,
    last_event: Option<u8>,
    created: Option<u32>,
    gtid_list: Option<String>,
    /// Not a binlog, or an impossible event size: nothing after this is trusted.
    broken: bool,
}

impl EventWalker {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.broken {
            let magic_len = MAGIC.len() as u64;
            if self.offset < magic_len {
                let at = self.offset as usize;
                let n = data.len().min(MAGIC.len() - at);
                if data[..n] != MAGIC[at..at + n] {
                    self.broken = true;
                    return;
                }
                self.offset += n as u64;
                self.events_end = self.offset;
                data = &data[n..];
                continue;
            }
            let Some(end) = self.event_end else {
                let n = data.len().min(HEADER_LEN as usize - self.header.len());
                self.header.extend_from_slice(&data[..n]);
                self.offset += n as u64;
                data = &data[n..];
                if self.header.len() == HEADER_LEN as usize {
                    self.start_event();
                }
                continue;
            };
            let n = data.len().min((end - self.offset) as usize);
            if let Some(body) = &mut self.body {
                body.extend_from_slice(&data[..n]);
            }
            self.offset += n as u64;
            data = &data[n..];
            if self.offset == end {
                self.finish_event();
            }
        }
    }

    fn start_event(&mut self) {
        let h = &self.header;
        let size = u64::from(u32::from_le_bytes([h[9], h[10], h[11], h[12]]));
        if size < HEADER_LEN {
            self.broken = true;
            return;
        }
        self.event_type = h[4];
        if self.events == 0 {
            self.created = Some(u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
        }
        self.body = (self.event_type == GTID_LIST_EVENT
            && self.gtid_list.is_none()
            && size <= GTID_LIST_MAX)
            .then(Vec::new);
        self.event_end = Some(self.offset - HEADER_LEN + size);
        if size == HEADER_LEN {
            self.finish_event();
        }
    }

    fn finish_event(&mut self) {
        self.events += 1;
        self.events_end = self.offset;
        self.last_event = Some(self.event_type);
        if let Some(body) = self.body.take() {
            self.gtid_list = gtid_list(&body);
        }
        self.header.clear();
        self.event_end = None;
    }
}

/// Whether two GTID lists (`[0-1-3,5-1-1]`) name the same state: the file holds them in
/// its own order, `SHOW BINLOG EVENTS` prints them sorted.
pub fn same_gtid_state(a: &str, b: &str) -> bool {
    let set = |s: &str| {
        let mut v: Vec<String> = s
            .trim_matches(|c: char| c == '[' || c == ']' || c.is_whitespace())
            .split(',')
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .collect();
        v.sort();
        v
    };
    set(a) == set(b)
}

/// The body of a GTID list event as the server prints it: `[domain-server-seq,...]`.
fn gtid_list(body: &[u8]) -> Option<String> {
    let count = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) & 0x0fff_ffff;
    let mut gtids = Vec::new();
    for i in 0..count as usize {
        let at = 4 + i * 16;
        let e = body.get(at..at + 16)?;
        let domain = u32::from_le_bytes(e[0..4].try_into().ok()?);
        let server = u32::from_le_bytes(e[4..8].try_into().ok()?);
        let seq = u64::from_le_bytes(e[8..16].try_into().ok()?);
        gtids.push((domain, server, seq));
    }
    gtids.sort_unstable();
    let gtids: Vec<String> = gtids
        .iter()
        .map(|(d, s, n)| format!("{d}-{s}-{n}"))
        .collect();
    Some(format!("[{}]", gtids.join(",")))
}

/// `mysql-bin.000042` → (`mysql-bin`, 42).
pub fn split_name(name: &str) -> Option<(&str, u64)> {
    let (base, digits) = name.rsplit_once('.')?;
    if base.is_empty() || digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((base, digits.parse().ok()?))
}

/// The name of binlog number `n` (the server pads to six digits).
pub fn file_name(base: &str, n: u64) -> String {
    format!("{base}.{n:06}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One event: the common header (timestamp, type, size, next position) and a body.
    pub(crate) fn event(kind: u8, timestamp: u32, at: u64, body: &[u8]) -> Vec<u8> {
        let size = HEADER_LEN as u32 + body.len() as u32;
        let mut e = Vec::new();
        e.extend_from_slice(&timestamp.to_le_bytes());
        e.push(kind);
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&(at as u32 + size).to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        e.extend_from_slice(body);
        e
    }

    /// A binlog: magic, a format description, a GTID list, `extra` events, then `last`.
    pub(crate) fn binlog(extra: usize, last: Option<u8>) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        let fde = event(15, 1_700_000_000, 4, &[0u8; 40]);
        f.extend_from_slice(&fde);
        let mut gl = 2u32.to_le_bytes().to_vec();
        for (d, s, n) in [(0u32, 1u32, 13u64), (1, 2, 5)] {
            gl.extend_from_slice(&d.to_le_bytes());
            gl.extend_from_slice(&s.to_le_bytes());
            gl.extend_from_slice(&n.to_le_bytes());
        }
        gl.extend_from_slice(&[0xaa; 4]); // the checksum
        let at = f.len() as u64;
        f.extend_from_slice(&event(GTID_LIST_EVENT, 1_700_000_000, at, &gl));
        for i in 0..extra {
            let at = f.len() as u64;
            f.extend_from_slice(&event(2, 1_700_000_001, at, &vec![i as u8; 100 + i]));
        }
        if let Some(kind) = last {
            let at = f.len() as u64;
            f.extend_from_slice(&event(
                kind,
                1_700_000_002,
                at,
                b"\x04\0\0\0\0\0\0\0next.000002",
            ));
        }
        f
    }

    fn scan_bytes(bytes: &[u8], piece: usize) -> Scan {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, bytes).unwrap();
        let whole = scan(&path).unwrap();
        // Fed in small pieces the walker finds the same.
        let mut w = EventWalker::default();
        for chunk in bytes.chunks(piece) {
            w.feed(chunk);
        }
        assert_eq!(
            (w.events_end, w.last_event),
            (whole.events_end, whole.last_event)
        );
        assert_eq!(w.gtid_list, whole.gtid_list);
        whole
    }

    #[test]
    fn a_rotated_file_ends_cleanly_and_names_its_start() {
        let bytes = binlog(3, Some(ROTATE_EVENT));
        for piece in [1, 7, 19, 4096] {
            let s = scan_bytes(&bytes, piece);
            assert_eq!(s.size, bytes.len() as u64);
            assert!(s.ends_cleanly(), "{s:?}");
            assert_eq!(s.created, Some(1_700_000_000));
            assert_eq!(s.gtid_list.as_deref(), Some("[0-1-13,1-2-5]"));
            assert_eq!(s.blake3, blake3::hash(&bytes).to_hex().to_string());
        }
    }

    #[test]
    fn an_unfinished_or_torn_file_does_not_end_cleanly() {
        // Whole events but no ROTATE/STOP: the file the server is writing.
        let open = binlog(2, None);
        let s = scan_bytes(&open, 5);
        assert!(s.untorn() && !s.ends_cleanly());
        // Cut inside an event: torn, and the chain ends before the cut.
        let full = binlog(2, Some(STOP_EVENT));
        let torn = &full[..full.len() - 3];
        let s = scan_bytes(torn, 3);
        assert!(!s.untorn());
        assert_eq!(s.events_end, open.len() as u64);
        // Not a binlog at all.
        let s = scan_bytes(b"hello world, not a binlog", 4);
        assert!(!s.untorn());
    }

    /// The server printed `[0-1-3,5-1-1,5-9-2]` for a file that holds them as
    /// `5-1-1,5-9-2,0-1-3`; compared as strings, a resumed archive was taken for
    /// another server's.
    #[test]
    fn regression_gtid_lists_compare_as_sets_not_in_file_order() {
        assert!(same_gtid_state(
            "[5-1-1,5-9-2,0-1-3]",
            "[0-1-3, 5-1-1,5-9-2]"
        ));
        assert!(same_gtid_state("[]", "[]"));
        assert!(!same_gtid_state("[0-1-3]", "[0-1-4]"));
        assert!(!same_gtid_state("[]", "[0-1-3]"));
    }

    #[test]
    fn names_split_and_format_with_the_servers_padding() {
        assert_eq!(split_name("mysql-bin.000042"), Some(("mysql-bin", 42)));
        assert_eq!(split_name("a.b.1234567"), Some(("a.b", 1_234_567)));
        assert_eq!(split_name("mysql-bin.index"), None);
        assert_eq!(split_name("mysql-bin.42"), None);
        assert_eq!(file_name("mysql-bin", 42), "mysql-bin.000042");
        assert_eq!(file_name("b", 1_234_567), "b.1234567");
    }
}
