//! `CopiedRanges`: which byte ranges of a source file are already in the image. A write
//! that lands on a copied range must be mirrored; anything else the copier will pick up.
//! Copies proceed in order, so the set stays a handful of intervals per file.

use std::collections::BTreeMap;

/// A set of half-open byte intervals `[start, end)`, plus "everything from here on", which
/// a file gets when the copier reaches its end (later appends must be mirrored too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopiedRanges {
    /// start -> end, disjoint and non-adjacent.
    spans: BTreeMap<u64, u64>,
    /// Every byte at or beyond this offset counts as copied.
    tail_from: Option<u64>,
}

impl CopiedRanges {
    pub fn new() -> CopiedRanges {
        CopiedRanges::default()
    }

    /// A set covering every offset (a file created during the session).
    pub fn everything() -> CopiedRanges {
        CopiedRanges {
            spans: BTreeMap::new(),
            tail_from: Some(0),
        }
    }

    /// Marks `[start, end)` as copied.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if let Some(t) = self.tail_from
            && end >= t
        {
            self.set_tail(start.min(t));
            return;
        }
        let mut start = start;
        let mut end = end;
        // Merge with a span that starts before and reaches `start`.
        if let Some((&s, &e)) = self.spans.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        // Swallow every span that starts inside [start, end].
        let inside: Vec<u64> = self.spans.range(start..=end).map(|(&s, _)| s).collect();
        for s in inside {
            let e = self.spans.remove(&s).expect("listed");
            end = end.max(e);
        }
        self.spans.insert(start, end);
    }

    /// Marks everything from `start` on as copied (the copier reached end of file).
    pub fn set_tail(&mut self, start: u64) {
        let start = match self.spans.range(..=start).next_back() {
            Some((&s, &e)) if e >= start => s,
            _ => start,
        };
        let start = self.tail_from.map_or(start, |t| t.min(start));
        self.spans.retain(|&s, _| s < start);
        self.tail_from = Some(start);
    }

    /// The parts of `[start, end)` that are copied, in order.
    pub fn overlap(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        if let Some((_, &e)) = self.spans.range(..=start).next_back()
            && e > start
        {
            out.push((start, e.min(end)));
        }
        for (&s, &e) in self.spans.range(start + 1..end) {
            out.push((s, e.min(end)));
        }
        if let Some(t) = self.tail_from {
            let from = t.max(start);
            if from < end {
                match out.last_mut() {
                    Some(last) if last.1 >= from => last.1 = end,
                    _ => out.push((from, end)),
                }
            }
        }
        out
    }

    /// True when every byte of `[start, end)` is copied.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        start >= end || self.overlap(start, end) == [(start, end)]
    }

    /// Number of separate intervals (memory stays bounded by this).
    pub fn intervals(&self) -> usize {
        self.spans.len() + usize::from(self.tail_from.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The model: one bool per byte of a small file, plus the tail rule.
    #[derive(Clone, Debug)]
    struct Model {
        bytes: Vec<bool>,
        tail: Option<u64>,
    }

    impl Model {
        fn copied(&self, off: u64) -> bool {
            self.tail.is_some_and(|t| off >= t)
                || self.bytes.get(off as usize).copied().unwrap_or(false)
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        Tail(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..200, 0u64..60).prop_map(|(s, l)| Op::Insert(s, s + l)),
            1 => (0u64..200).prop_map(Op::Tail),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_byte_model(ops in prop::collection::vec(op(), 0..30), q in 0u64..260, ql in 0u64..80) {
            let mut set = CopiedRanges::new();
            let mut model = Model { bytes: vec![false; 300], tail: None };
            for op in &ops {
                match *op {
                    Op::Insert(s, e) => {
                        set.insert(s, e);
                        for b in s..e { model.bytes[b as usize] = true; }
                    }
                    Op::Tail(t) => {
                        set.set_tail(t);
                        model.tail = Some(model.tail.map_or(t, |x| x.min(t)));
                    }
                }
            }
            let got = set.overlap(q, q + ql);
            let mut want: Vec<(u64, u64)> = Vec::new();
            for b in q..q + ql {
                if model.copied(b) {
                    match want.last_mut() {
                        Some(last) if last.1 == b => last.1 = b + 1,
                        _ => want.push((b, b + 1)),
                    }
                }
            }
            prop_assert_eq!(got, want);
            prop_assert!(set.intervals() <= ops.len() + 1);
        }
    }

    #[test]
    fn everything_covers_appends() {
        let set = CopiedRanges::everything();
        assert!(set.covers(0, 10));
        assert!(set.covers(1 << 40, (1 << 40) + 5));
    }

    #[test]
    fn adjacent_copies_merge() {
        let mut set = CopiedRanges::new();
        for i in 0..100 {
            set.insert(i * 10, (i + 1) * 10);
        }
        assert_eq!(set.intervals(), 1);
        set.set_tail(1000);
        assert_eq!(set.intervals(), 1);
        assert!(set.covers(0, 5000));
    }
}
