//! What a partition holds between flushes, and how a flush turns it into
//! compressed parts.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use bytes::Bytes;
use serde::Deserialize;
use tokio::time::Instant;

use super::keys::{GroupKey, Layout};
use crate::backends::log::Offset;
use crate::envelope::{Envelope, SCHEMA_VERSION};

/// What became of one `sift.raw` record.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// A valid envelope: its group and its JSON line (without the newline).
    Line(GroupKey, Bytes),
    /// Not archivable: the dead-letter reason code and what went wrong.
    Dead(&'static str, String),
    /// A replayed record the archive holds already (see [`already_archived`]).
    Replayed,
}

/// Whether a record is a replay of one the archive holds already: one
/// `sift archive replay` read from it, or the original of a dead letter
/// that a stage other than archive gave up on (archive took it then).
pub(crate) fn already_archived(headers: &[(String, Bytes)]) -> bool {
    headers
        .iter()
        .find(|(k, _)| k == crate::envelope::headers::REPLAY)
        .is_some_and(|(_, v)| {
            v.as_ref() == b"archive" || (v.starts_with(b"dlq:") && v.as_ref() != b"dlq:archive")
        })
}

/// Just the version of something that may be an envelope of another schema.
#[derive(Deserialize)]
struct VersionOnly {
    v: Option<u32>,
}

/// Reads a record value as an envelope.
pub(crate) fn parse(value: &Bytes, layout: &Layout) -> Parsed {
    let env = match serde_json::from_slice::<Envelope>(value) {
        Ok(env) => env,
        Err(e) => {
            // Another schema version may have other fields: report the version,
            // not the fields, when the value says which version it is.
            return match serde_json::from_slice::<VersionOnly>(value) {
                Ok(VersionOnly { v: Some(v) }) if v != SCHEMA_VERSION => Parsed::Dead(
                    "schema_version",
                    format!("envelope version {v} is not {SCHEMA_VERSION}"),
                ),
                _ => Parsed::Dead("bad_json", format!("not an envelope: {e}")),
            };
        }
    };
    if env.v != SCHEMA_VERSION {
        return Parsed::Dead(
            "schema_version",
            format!("envelope version {} is not {SCHEMA_VERSION}", env.v),
        );
    }
    let group = GroupKey::of(env.fetched_at_ms, &env.source);
    if !layout.fits(&group) {
        return Parsed::Dead(
            "bad_source",
            format!(
                "source tag of {} bytes makes object keys longer than 1024 bytes",
                env.source.len()
            ),
        );
    }
    // A JSON line must be one line: a producer that pretty-printed the
    // envelope gets it re-encoded compactly; everything else is kept byte for byte.
    if value.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        return match serde_json::to_vec(&env) {
            Ok(compact) => Parsed::Line(group, Bytes::from(compact)),
            Err(e) => Parsed::Dead("bad_json", format!("envelope cannot be re-encoded: {e}")),
        };
    }
    Parsed::Line(group, value.clone())
}

/// One buffered record.
#[derive(Debug)]
struct Line {
    offset: Offset,
    /// Index into the buffer's groups, or [`NOT_ARCHIVED`].
    group: u32,
    bytes: Bytes,
}

/// The group of a record that is in the offset range but in no part (a dead
/// letter or a replay): it is kept only for its offset.
const NOT_ARCHIVED: u32 = u32::MAX;

/// The records of one log partition consumed since its last commit.
///
/// Dead letters are held only by their offset: they are acknowledged by
/// `sift.dlq` before they enter, so the commit that covers the buffer may
/// cover them too. Every record's offset is kept, so after any cut the
/// buffer knows the first record that follows it.
#[derive(Debug, Default)]
pub(crate) struct PartitionBuffer {
    lines: Vec<Line>,
    groups: Vec<GroupKey>,
    index: HashMap<GroupKey, u32>,
    /// Uncompressed bytes of the archivable lines, newlines included.
    bytes: u64,
    /// Archivable lines.
    archivable: usize,
    /// Offset after the last record seen: the commit that covers the buffer.
    next: Option<Offset>,
    /// When the first pending record arrived.
    since: Option<Instant>,
    /// Where the range that starts at the first pending record ends, when the
    /// range was claimed (by another member or an earlier run) beyond what
    /// this buffer holds: (first offset, end).
    cut: Option<(Offset, Offset)>,
}

/// One (date, source) group of a flushed buffer: the lines of one part.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    /// Date and source.
    pub key: GroupKey,
    /// Offset of its first record: the part's name.
    pub first: Offset,
    /// Its lines in offset order, without newlines.
    pub lines: Vec<Bytes>,
    /// Uncompressed size, newlines included.
    pub bytes: u64,
}

/// A buffer taken for flushing.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Groups in (date, source) order.
    pub groups: Vec<Group>,
    /// Offset to commit once every group is uploaded.
    pub commit: Offset,
}

impl PartitionBuffer {
    /// Takes a record; records arrive in offset order.
    pub fn accept(&mut self, offset: Offset, parsed: Parsed, now: Instant) {
        if self.lines.is_empty() {
            self.since = Some(now);
        }
        self.next = Some(offset.next());
        let (group, bytes) = match parsed {
            Parsed::Line(key, bytes) => {
                let group = match self.index.get(&key) {
                    Some(g) => *g,
                    None => {
                        let g = self.groups.len() as u32;
                        self.groups.push(key.clone());
                        self.index.insert(key, g);
                        g
                    }
                };
                self.bytes += bytes.len() as u64 + 1;
                self.archivable += 1;
                (group, bytes)
            }
            Parsed::Dead(..) | Parsed::Replayed => (NOT_ARCHIVED, Bytes::new()),
        };
        self.lines.push(Line {
            offset,
            group,
            bytes,
        });
    }

    /// Offset after the last record seen, if any.
    pub fn next(&self) -> Option<&Offset> {
        self.next.as_ref()
    }

    /// Offset of the first pending record, if any.
    pub fn start(&self) -> Option<&Offset> {
        self.lines.first().map(|l| &l.offset)
    }

    /// When the oldest pending record arrived.
    pub fn since(&self) -> Option<Instant> {
        self.since
    }

    /// Uncompressed bytes buffered.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Archivable lines buffered.
    pub fn len(&self) -> usize {
        self.archivable
    }

    /// Remembers that the range starting at the first pending record ends at
    /// `end`, beyond what is buffered.
    pub fn wait_for(&mut self, end: Offset) {
        self.cut = self.start().cloned().map(|s| (s, end));
    }

    /// The end of the claimed range this buffer is filling, if it waits for one.
    pub fn waiting_for(&self) -> Option<&Offset> {
        match (&self.cut, self.start()) {
            (Some((first, end)), Some(start)) if first == start => Some(end),
            _ => None,
        }
    }

    /// Whether a flush is due: the buffer holds the whole claimed range it
    /// waits for, or (waiting for none) `flush_bytes` of lines.
    pub fn full(&self, flush_bytes: u64) -> bool {
        match self.waiting_for() {
            Some(end) => self.next.as_ref().is_some_and(|n| n >= end),
            None => self.bytes >= flush_bytes,
        }
    }

    /// Whether the buffer waits for records of a claimed range it does not
    /// hold yet (a flush cannot complete it).
    pub fn short_of_cut(&self) -> bool {
        self.waiting_for()
            .is_some_and(|end| self.next.as_ref().is_none_or(|n| n < end))
    }

    /// The consumer went back to `offset` (it re-reads from the committed
    /// offset after a rebalance): forget what will be delivered again.
    pub fn rewind(&mut self, offset: &Offset) {
        self.lines.retain(|l| l.offset < *offset);
        self.recount();
        self.next = Some(offset.clone());
    }

    /// Another member of the group committed up to `offset` (archiving what
    /// lies before it): forget that part.
    pub fn forget_before(&mut self, offset: &Offset) {
        self.lines.retain(|l| l.offset >= *offset);
        self.recount();
    }

    fn recount(&mut self) {
        let archivable = self.lines.iter().filter(|l| l.group != NOT_ARCHIVED);
        self.bytes = archivable.clone().map(|l| l.bytes.len() as u64 + 1).sum();
        self.archivable = archivable.count();
        if self.lines.is_empty() {
            self.since = None;
        }
    }

    /// Empties the buffer into its groups; None when nothing is pending.
    #[cfg(test)]
    pub fn take(&mut self) -> Option<Batch> {
        let next = self.next.clone()?;
        self.take_before(&next)
    }

    /// Takes the records before `end` as a batch that commits `end`, keeping
    /// the rest; None when no record lies before `end`.
    pub fn take_before(&mut self, end: &Offset) -> Option<Batch> {
        if self.lines.first().is_none_or(|l| l.offset >= *end) {
            return None;
        }
        let lines = std::mem::take(&mut self.lines);
        let groups = std::mem::take(&mut self.groups);
        self.index.clear();
        let mut by_group: BTreeMap<&GroupKey, Group> = BTreeMap::new();
        let mut rest = Vec::new();
        for line in lines {
            if line.offset >= *end {
                rest.push(line);
                continue;
            }
            if line.group == NOT_ARCHIVED {
                continue;
            }
            let key = &groups[line.group as usize];
            let g = by_group.entry(key).or_insert_with(|| Group {
                key: key.clone(),
                first: line.offset,
                lines: Vec::new(),
                bytes: 0,
            });
            g.bytes += line.bytes.len() as u64 + 1;
            g.lines.push(line.bytes);
        }
        let batch = Batch {
            groups: by_group.into_values().collect(),
            commit: end.clone(),
        };
        // What lies beyond the cut stays, with its groups numbered afresh.
        for mut line in rest {
            if line.group != NOT_ARCHIVED {
                let key = &groups[line.group as usize];
                line.group = match self.index.get(key) {
                    Some(g) => *g,
                    None => {
                        let g = self.groups.len() as u32;
                        self.groups.push(key.clone());
                        self.index.insert(key.clone(), g);
                        g
                    }
                };
            }
            self.lines.push(line);
        }
        self.recount();
        Some(batch)
    }
}

/// Compresses a group's lines into one zstd frame (with its content size and
/// a checksum), newline after each line.
pub(crate) fn compress(group: &Group, level: i32) -> std::io::Result<Vec<u8>> {
    let mut encoder =
        zstd::stream::Encoder::new(Vec::with_capacity(group.bytes as usize / 4 + 64), level)?;
    encoder.include_checksum(true)?;
    encoder.set_pledged_src_size(Some(group.bytes))?;
    for line in &group.lines {
        encoder.write_all(line)?;
        encoder.write_all(b"\n")?;
    }
    encoder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(source: &str, at_ms: i64) -> Envelope {
        Envelope {
            v: SCHEMA_VERSION,
            id: crate::envelope::document_id(source, "u"),
            source: source.into(),
            url: "u".into(),
            fetched_at_ms: at_ms,
            content_type: "text/plain".into(),
            title: "t".into(),
            text: Some("a\nb".into()),
            body_uri: None,
            metadata: Default::default(),
        }
    }

    fn layout() -> Layout {
        Layout::new("raw").expect("a valid prefix")
    }

    #[test]
    fn parses_and_rejects() {
        let env = envelope("s", 0);
        let compact = Bytes::from(serde_json::to_vec(&env).expect("serializable"));
        match parse(&compact, &layout()) {
            Parsed::Line(g, b) => {
                assert_eq!(g, GroupKey::of(0, "s"));
                assert_eq!(b, compact);
            }
            other => panic!("{other:?}"),
        }
        let pretty = Bytes::from(serde_json::to_vec_pretty(&env).expect("serializable"));
        match parse(&pretty, &layout()) {
            Parsed::Line(_, b) => assert_eq!(b, compact),
            other => panic!("{other:?}"),
        }
        let dead = |v: &[u8]| match parse(&Bytes::copy_from_slice(v), &layout()) {
            Parsed::Dead(code, _) => code,
            Parsed::Line(..) => "archived",
            Parsed::Replayed => "replayed",
        };
        assert_eq!(dead(b"{not json"), "bad_json");
        assert_eq!(dead(b"{\"v\":1}"), "bad_json");
        assert_eq!(dead(b"{\"v\":2,\"other\":true}"), "schema_version");
        let mut v2 = env.clone();
        v2.v = 2;
        assert_eq!(
            dead(&serde_json::to_vec(&v2).expect("serializable")),
            "schema_version"
        );
        let long = envelope(&"x".repeat(2000), 0);
        assert_eq!(
            dead(&serde_json::to_vec(&long).expect("serializable")),
            "bad_source"
        );
    }

    #[test]
    fn groups_by_date_and_source_in_offset_order() {
        let now = Instant::now();
        let mut b = PartitionBuffer::default();
        let line = |s: &str, day: i64| {
            Parsed::Line(
                GroupKey::of(day * 86_400_000, s),
                Bytes::from(format!("{s}{day}")),
            )
        };
        b.accept(Offset::new(10), line("b", 0), now);
        b.accept(
            Offset::new(11),
            Parsed::Dead("bad_json", String::new()),
            now,
        );
        b.accept(Offset::new(12), line("a", 1), now);
        b.accept(Offset::new(13), line("b", 0), now);
        b.accept(Offset::new(14), line("a", 0), now);
        assert_eq!(b.len(), 4);
        assert_eq!(b.bytes(), 4 * 3);
        let batch = b.take().expect("pending");
        assert_eq!(batch.commit, 15);
        let got: Vec<(String, String, u64, usize)> = batch
            .groups
            .iter()
            .map(|g| {
                (
                    g.key.dt.clone(),
                    g.key.source.clone(),
                    g.first.as_u64().expect("small"),
                    g.lines.len(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("1970-01-01".into(), "a".into(), 14, 1),
                ("1970-01-01".into(), "b".into(), 10, 2),
                ("1970-01-02".into(), "a".into(), 12, 1),
            ]
        );
        assert!(b.take().is_none());
        assert_eq!(b.next(), Some(&Offset::new(15)));

        // Only dead letters: nothing to upload, but still a commit.
        b.accept(
            Offset::new(15),
            Parsed::Dead("bad_json", String::new()),
            now,
        );
        let batch = b.take().expect("pending");
        assert!(batch.groups.is_empty() && batch.commit == 16);
    }

    #[test]
    fn rewinds_and_forgets() {
        let now = Instant::now();
        let mut b = PartitionBuffer::default();
        for o in 0..10 {
            b.accept(
                Offset::new(o),
                Parsed::Line(GroupKey::of(0, "s"), Bytes::from_static(b"x")),
                now,
            );
        }
        let at = |o: u64| Some(Offset::new(o));
        b.rewind(&Offset::new(4));
        assert_eq!(
            (b.len(), b.start().cloned(), b.next().cloned()),
            (4, at(0), at(4))
        );
        b.forget_before(&Offset::new(2));
        assert_eq!(
            (b.len(), b.start().cloned(), b.next().cloned()),
            (2, at(2), at(4))
        );
        let batch = b.take().expect("pending");
        assert_eq!(
            (&batch.groups[0].first, &batch.commit),
            (&Offset::new(2), &Offset::new(4))
        );
        b.accept(
            Offset::new(4),
            Parsed::Line(GroupKey::of(0, "s"), Bytes::from_static(b"x")),
            now,
        );
        b.forget_before(&Offset::new(9));
        assert_eq!((b.len(), b.start()), (0, None));
        assert!(b.take().is_none());
    }

    #[test]
    fn cuts_where_a_claim_ends() {
        let now = Instant::now();
        let mut b = PartitionBuffer::default();
        let line = |s: &str| Parsed::Line(GroupKey::of(0, s), Bytes::from(s.to_string()));
        b.accept(Offset::new(3), Parsed::Dead("bad_json", String::new()), now);
        b.accept(Offset::new(4), line("a"), now);
        b.accept(Offset::new(5), line("b"), now);
        b.accept(Offset::new(6), Parsed::Replayed, now);
        b.accept(Offset::new(7), line("b"), now);
        b.accept(Offset::new(8), line("a"), now);
        // A dead letter is the first record: the range starts at it.
        assert_eq!(b.start(), Some(&Offset::new(3)));
        assert!(b.take_before(&Offset::new(3)).is_none());
        let batch = b.take_before(&Offset::new(6)).expect("records before 6");
        assert_eq!(batch.commit, 6);
        let firsts: Vec<u64> = batch
            .groups
            .iter()
            .map(|g| g.first.as_u64().expect("small"))
            .collect();
        assert_eq!(firsts, vec![4, 5]);
        // The rest starts at the replay at 6, its groups renumbered.
        assert_eq!(
            (b.start(), b.len(), b.bytes()),
            (Some(&Offset::new(6)), 2, 4)
        );
        b.accept(Offset::new(9), line("c"), now);
        let rest = b.take().expect("pending");
        let got: Vec<(String, u64, usize)> = rest
            .groups
            .iter()
            .map(|g| {
                (
                    g.key.source.clone(),
                    g.first.as_u64().expect("small"),
                    g.lines.len(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![("a".into(), 8, 1), ("b".into(), 7, 1), ("c".into(), 9, 1)]
        );
        assert_eq!(rest.commit, 10);
        assert!(b.start().is_none());
    }

    #[test]
    fn waits_for_a_claimed_end() {
        let now = Instant::now();
        let mut b = PartitionBuffer::default();
        let x = || Parsed::Line(GroupKey::of(0, "s"), Bytes::from_static(b"x"));
        b.accept(Offset::new(0), x(), now);
        assert!(b.full(1) && !b.short_of_cut());
        b.wait_for(Offset::new(3));
        assert!(!b.full(1) && b.short_of_cut());
        b.accept(Offset::new(1), x(), now);
        assert!(!b.full(0));
        b.accept(Offset::new(2), x(), now);
        assert!(b.full(u64::MAX) && !b.short_of_cut());
        assert_eq!(b.waiting_for(), Some(&Offset::new(3)));
        b.take_before(&Offset::new(3)).expect("three records");
        // The wait belonged to the range that started at 0.
        b.accept(Offset::new(3), x(), now);
        assert_eq!(b.waiting_for(), None);
        assert!(!b.full(100));
        // A rewind before the range's start forgets the wait too.
        b.wait_for(Offset::new(9));
        b.rewind(&Offset::new(3));
        assert_eq!(b.waiting_for(), None);
    }

    #[test]
    fn compresses_to_lines() -> std::io::Result<()> {
        let g = Group {
            key: GroupKey::of(0, "s"),
            first: Offset::ZERO,
            lines: vec![Bytes::from_static(b"{\"a\":1}"), Bytes::from_static(b"{}")],
            bytes: 11,
        };
        let z = compress(&g, 3)?;
        assert_eq!(zstd::decode_all(&z[..])?, b"{\"a\":1}\n{}\n");
        Ok(())
    }
}
