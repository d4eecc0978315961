//! Segment files of the embedded log.
//!
//! A partition directory holds segments named by their first offset
//! (`00000000000000000000.log`). Each record is one frame:
//!
//! ```text
//! u32 body length | u32 CRC-32 of body | body
//! body = u64 offset | i64 timestamp ms | i32 key length (-1 = none) | key
//!        | u32 value length | value | u16 header count | (u16 len, name, u32 len, value)*
//! ```
//!
//! A sealed segment also has `<base>.idx`: its sparse offset index and totals,
//! checksummed, so reopening does not rescan it. The active (last) segment is
//! always rescanned on open, and a torn tail, left by a crash in the middle of
//! a write, is cut off at the last whole frame.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use super::{LogError, Message, Record};

const HEADER: usize = 8;
const FIXED_BODY: usize = 8 + 8 + 4 + 4 + 2;
/// A sparse index entry is added every this many bytes of frames.
const INDEX_EVERY: u64 = 4096;
const IDX_MAGIC: &[u8; 8] = b"SIFTIDX1";

/// The encoded size of a record.
pub(super) fn frame_len(r: &Record) -> usize {
    HEADER
        + FIXED_BODY
        + r.key.as_ref().map_or(0, |k| k.len())
        + r.value.len()
        + r.headers
            .iter()
            .map(|(n, v)| 2 + n.len() + 4 + v.len())
            .sum::<usize>()
}

/// Appends one record's frame to `buf`.
pub(super) fn encode(buf: &mut Vec<u8>, offset: u64, ts: i64, r: &Record) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER]);
    buf.extend_from_slice(&offset.to_be_bytes());
    buf.extend_from_slice(&ts.to_be_bytes());
    match &r.key {
        Some(k) => {
            buf.extend_from_slice(&(k.len() as i32).to_be_bytes());
            buf.extend_from_slice(k);
        }
        None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    buf.extend_from_slice(&(r.value.len() as u32).to_be_bytes());
    buf.extend_from_slice(&r.value);
    buf.extend_from_slice(&(r.headers.len() as u16).to_be_bytes());
    for (name, value) in &r.headers {
        buf.extend_from_slice(&(name.len() as u16).to_be_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_be_bytes());
        buf.extend_from_slice(value);
    }
    let body_len = (buf.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_be_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// Offset and timestamp of a frame body, checked.
fn body_meta(body: &[u8]) -> Option<(u64, i64)> {
    if body.len() < FIXED_BODY {
        return None;
    }
    let offset = u64::from_be_bytes(body[0..8].try_into().ok()?);
    let ts = i64::from_be_bytes(body[8..16].try_into().ok()?);
    Some((offset, ts))
}

/// Decodes a checked frame body into a message sharing `body`'s memory.
fn decode(topic: &str, partition: u32, mut body: Bytes) -> Option<Message> {
    if body.len() < FIXED_BODY {
        return None;
    }
    let offset = body.get_u64();
    let timestamp_ms = body.get_i64();
    let key_len = body.get_i32();
    let key = if key_len < 0 {
        None
    } else {
        let n = key_len as usize;
        if body.remaining() < n {
            return None;
        }
        Some(body.split_to(n))
    };
    if body.remaining() < 4 {
        return None;
    }
    let n = body.get_u32() as usize;
    if body.remaining() < n + 2 {
        return None;
    }
    let value = body.split_to(n);
    let count = body.get_u16();
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if body.remaining() < 2 {
            return None;
        }
        let n = body.get_u16() as usize;
        if body.remaining() < n + 4 {
            return None;
        }
        let name = String::from_utf8_lossy(&body.split_to(n)).into_owned();
        let n = body.get_u32() as usize;
        if body.remaining() < n {
            return None;
        }
        headers.push((name, body.split_to(n)));
    }
    Some(Message {
        topic: topic.to_string(),
        partition,
        offset: super::Offset::new(offset),
        timestamp_ms,
        key,
        value,
        headers,
    })
}

/// One segment file.
pub(super) struct Segment {
    /// Offset of its first record.
    pub base: u64,
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Bytes of whole frames (readers never look past this).
    pub len: u64,
    /// Offset after its last record.
    pub next: u64,
    /// Newest record timestamp (for age retention); `i64::MIN` when empty.
    pub max_ts: i64,
    /// Sparse (offset, byte position) pairs, ascending.
    pub index: Vec<(u64, u64)>,
    last_indexed: u64,
}

/// The `.idx` file of a segment.
pub(super) fn index_path(log_path: &Path) -> PathBuf {
    idx_path(log_path)
}

pub(super) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn idx_path(log_path: &Path) -> PathBuf {
    log_path.with_extension("idx")
}

impl Segment {
    /// Creates an empty segment.
    pub fn create(dir: &Path, base: u64) -> Result<Segment, LogError> {
        let path = segment_path(dir, base);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| LogError::io(&path, e))?;
        Ok(Segment::empty(base, path, file))
    }

    fn empty(base: u64, path: PathBuf, file: File) -> Segment {
        Segment {
            base,
            path,
            file: Arc::new(file),
            len: 0,
            next: base,
            max_ts: i64::MIN,
            index: Vec::new(),
            last_indexed: 0,
        }
    }

    /// Opens a segment: a sealed one from its index file when that is intact,
    /// otherwise by scanning every frame.
    ///
    /// Damage (a torn tail after a crash, a bad frame anywhere) is handled by
    /// `repair`:
    /// - [`Repair::ReadOnly`]: nothing is changed; readers stop before the
    ///   first bad frame, and the damage is reported;
    /// - [`Repair::Quarantine`]: every bad byte range is moved to a
    ///   quarantine file beside the segment, the intact frames on both sides
    ///   are kept, and the damage is reported;
    /// - [`Repair::Refuse`]: a [`LogError::Corrupt`] naming the fix.
    pub fn open(path: &Path, base: u64, active: bool, repair: Repair) -> Result<Opened, LogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(repair == Repair::Quarantine)
            .open(path)
            .map_err(|e| LogError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| LogError::io(path, e))?.len();
        let mut seg = Segment::empty(base, path.to_path_buf(), file);
        if !active && seg.load_index(file_len) {
            return Ok(Opened {
                segment: seg,
                damage: Vec::new(),
                lost_tail: false,
            });
        }
        let Some((position, detail)) = seg.scan()? else {
            return Ok(Opened {
                segment: seg,
                damage: Vec::new(),
                lost_tail: false,
            });
        };
        match repair {
            Repair::ReadOnly => {
                let damage = Damage {
                    segment: path.to_path_buf(),
                    position,
                    bytes: file_len - position,
                    after_offset: seg.next.checked_sub(1).filter(|_| seg.len > 0),
                    before_offset: None,
                    detail,
                    quarantine: None,
                };
                Ok(Opened {
                    segment: seg,
                    damage: vec![damage],
                    lost_tail: true,
                })
            }
            Repair::Refuse => Err(LogError::Corrupt {
                path: path.display().to_string(),
                position,
                detail,
            }),
            Repair::Quarantine => quarantine(path, base),
        }
    }

    /// Reads every frame, verifying checksums and offsets; stops at the first
    /// bad one and returns where and why.
    fn scan(&mut self) -> Result<Option<(u64, String)>, LogError> {
        let file = self.file.clone();
        let mut reader = BufReader::with_capacity(1 << 20, &*file);
        let mut header = [0u8; HEADER];
        let mut body = Vec::new();
        loop {
            let pos = self.len;
            match read_full(&mut reader, &mut header) {
                Ok(0) => return Ok(None),
                Ok(n) if n < HEADER => return Ok(Some((pos, "partial frame header".into()))),
                Ok(_) => {}
                Err(e) => return Err(LogError::io(&self.path, e)),
            }
            let body_len =
                u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
            if !(FIXED_BODY..=64 * super::MAX_RECORD_BYTES).contains(&body_len) {
                return Ok(Some((pos, format!("impossible frame length {body_len}"))));
            }
            body.resize(body_len, 0);
            match read_full(&mut reader, &mut body) {
                Ok(n) if n < body_len => return Ok(Some((pos, "partial frame body".into()))),
                Ok(_) => {}
                Err(e) => return Err(LogError::io(&self.path, e)),
            }
            if crc32fast::hash(&body) != crc {
                return Ok(Some((pos, "checksum mismatch".into())));
            }
            let Some((offset, ts)) = body_meta(&body) else {
                return Ok(Some((pos, "short frame body".into())));
            };
            // Offsets rise; a gap is where a bad frame was quarantined, or
            // where the log continued above offsets a lost tail had used.
            if offset < self.next {
                return Ok(Some((
                    pos,
                    format!("offset {offset} where {} or above was expected", self.next),
                )));
            }
            self.note_appended(offset, ts, pos, (HEADER + body_len) as u64);
        }
    }

    /// Records that a frame for `offset` now ends the segment.
    pub fn note_appended(&mut self, offset: u64, ts: i64, pos: u64, frame: u64) {
        if self.index.is_empty() || pos >= self.last_indexed + INDEX_EVERY {
            self.index.push((offset, pos));
            self.last_indexed = pos;
        }
        self.len = pos + frame;
        self.next = offset + 1;
        self.max_ts = self.max_ts.max(ts);
    }

    /// Writes the index file of a segment that will not grow any more.
    pub fn seal(&self) -> Result<(), LogError> {
        self.file
            .sync_all()
            .map_err(|e| LogError::io(&self.path, e))?;
        let mut buf = Vec::with_capacity(48 + self.index.len() * 16);
        buf.extend_from_slice(IDX_MAGIC);
        buf.extend_from_slice(&self.len.to_be_bytes());
        buf.extend_from_slice(&self.next.to_be_bytes());
        buf.extend_from_slice(&self.max_ts.to_be_bytes());
        buf.extend_from_slice(&self.last_indexed.to_be_bytes());
        buf.extend_from_slice(&(self.index.len() as u64).to_be_bytes());
        for (o, p) in &self.index {
            buf.extend_from_slice(&o.to_be_bytes());
            buf.extend_from_slice(&p.to_be_bytes());
        }
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_be_bytes());
        let path = idx_path(&self.path);
        let tmp = path.with_extension("idx.tmp");
        let mut f = File::create(&tmp).map_err(|e| LogError::io(&tmp, e))?;
        f.write_all(&buf)
            .and_then(|()| f.sync_all())
            .map_err(|e| LogError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| LogError::io(&path, e))
    }

    fn load_index(&mut self, file_len: u64) -> bool {
        let Ok(buf) = std::fs::read(idx_path(&self.path)) else {
            return false;
        };
        if buf.len() < 52 || &buf[..8] != IDX_MAGIC {
            return false;
        }
        let (data, crc) = buf.split_at(buf.len() - 4);
        if crc32fast::hash(data) != u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return false;
        }
        let mut d = &data[8..];
        let len = d.get_u64();
        let next = d.get_u64();
        let max_ts = d.get_i64();
        let last_indexed = d.get_u64();
        let count = d.get_u64() as usize;
        if d.remaining() != count * 16 || len != file_len {
            return false;
        }
        self.index = (0..count).map(|_| (d.get_u64(), d.get_u64())).collect();
        self.len = len;
        self.next = next;
        self.max_ts = max_ts;
        self.last_indexed = last_indexed;
        true
    }

    /// Deletes the segment's files.
    pub fn remove(&self) -> Result<(), LogError> {
        for p in [self.path.clone(), idx_path(&self.path)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::io(&p, e)),
            }
        }
        Ok(())
    }

    /// Byte position to start reading for `offset`: the nearest indexed frame at or before it.
    pub fn position_for(&self, offset: u64) -> u64 {
        match self.index.partition_point(|(o, _)| *o <= offset) {
            0 => 0,
            i => self.index[i - 1].1,
        }
    }
}

/// What to do with damage found while opening a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Repair {
    /// Change nothing (read-only commands).
    ReadOnly,
    /// Move bad byte ranges aside and keep every intact frame.
    Quarantine,
    /// Fail with [`LogError::Corrupt`].
    Refuse,
}

/// A segment as opened, with what was wrong with it.
pub(super) struct Opened {
    pub segment: Segment,
    /// Bad byte ranges, in file order.
    pub damage: Vec<Damage>,
    /// The segment ended in damage: offsets above its last intact frame may
    /// have been given out, so the partition continues above its reservation.
    pub lost_tail: bool,
}

/// A bad byte range of a segment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Damage {
    /// The segment file.
    pub segment: PathBuf,
    /// Byte position of the range in the file as it was.
    pub position: u64,
    /// Its length.
    pub bytes: u64,
    /// Offset of the last intact record before it (None: none before it).
    pub after_offset: Option<u64>,
    /// Offset of the first intact record after it (None: none after it).
    pub before_offset: Option<u64>,
    /// What check failed first.
    pub detail: String,
    /// Where its bytes were moved; None when nothing was changed.
    pub quarantine: Option<PathBuf>,
}

impl Damage {
    /// The offsets the range may have held, as text: `a..b` (`a..` when
    /// nothing intact follows it).
    pub fn offsets(&self) -> String {
        let from = self.after_offset.map_or(0, |o| o + 1);
        match self.before_offset {
            Some(b) => format!("{from}..{b}"),
            None => format!("{from}.."),
        }
    }
}

/// How a quarantine file's name ends.
const QUARANTINE_SUFFIX: &str = ".quarantine";

/// The quarantine file of the bad range at `position` of `segment`.
pub(super) fn quarantine_path(segment: &Path, position: u64) -> PathBuf {
    let stem = segment
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    segment.with_file_name(format!("{stem}.{position}{QUARANTINE_SUFFIX}"))
}

/// Whether a file name in a partition folder is a quarantine file.
pub(super) fn is_quarantine(name: &str) -> bool {
    name.ends_with(QUARANTINE_SUFFIX)
}

/// The quarantine files of a partition folder with their sizes, sorted.
pub(super) fn quarantine_files(dir: &Path) -> Result<Vec<(PathBuf, u64)>, LogError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LogError::io(dir, e))? {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        if is_quarantine(&entry.file_name().to_string_lossy()) {
            out.push((entry.path(), entry.metadata().map_or(0, |m| m.len())));
        }
    }
    out.sort();
    Ok(out)
}

/// A whole, checked frame at `pos` whose offset is at least `min`: its
/// length, offset and timestamp.
fn frame_at(bytes: &[u8], pos: usize, min: u64) -> Option<(usize, u64, i64)> {
    let header = bytes.get(pos..pos + HEADER)?;
    let body_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if !(FIXED_BODY..=64 * super::MAX_RECORD_BYTES).contains(&body_len) {
        return None;
    }
    let body = bytes.get(pos + HEADER..pos + HEADER + body_len)?;
    let (offset, ts) = body_meta(body)?;
    // Cheap checks first: most positions inside a bad range fail here.
    if offset < min || offset - min > u64::from(u32::MAX) {
        return None;
    }
    if crc32fast::hash(body) != crc {
        return None;
    }
    decode("", 0, Bytes::copy_from_slice(body))?;
    Some((HEADER + body_len, offset, ts))
}

/// Splits a segment's bytes into intact frames and bad ranges: after a bad
/// frame, the next position where an intact frame with a higher offset
/// starts is where the intact frames resume.
fn pieces(bytes: &[u8], base: u64) -> Vec<(bool, usize, usize, Option<u64>)> {
    let mut out: Vec<(bool, usize, usize, Option<u64>)> = Vec::new();
    let (mut pos, mut min) = (0usize, base);
    while pos < bytes.len() {
        match frame_at(bytes, pos, min) {
            Some((len, offset, _)) => {
                out.push((true, pos, len, Some(offset)));
                pos += len;
                min = offset + 1;
            }
            None => {
                let mut next = pos + 1;
                while next < bytes.len() && frame_at(bytes, next, min).is_none() {
                    next += 1;
                }
                out.push((false, pos, next - pos, None));
                pos = next;
            }
        }
    }
    out
}

/// What a full read of a segment file found, changing nothing.
pub(super) struct Inspection {
    /// Bad byte ranges, in file order (not quarantined).
    pub damage: Vec<Damage>,
    /// Bytes of intact frames.
    pub good_bytes: u64,
    /// Intact records.
    pub records: u64,
    /// Offset after the last intact record (the base when none).
    pub next: u64,
    /// The file ends in damage.
    pub lost_tail: bool,
    /// The index file, when there is one, describes other bytes.
    pub stale_index: bool,
}

/// Reads every frame of the segment at `path`, checking each one.
pub(super) fn inspect(path: &Path, base: u64) -> Result<Inspection, LogError> {
    let bytes = std::fs::read(path).map_err(|e| LogError::io(path, e))?;
    let pieces = pieces(&bytes, base);
    let mut out = Inspection {
        damage: Vec::new(),
        good_bytes: 0,
        records: 0,
        next: base,
        lost_tail: pieces.last().is_some_and(|p| !p.0),
        stale_index: false,
    };
    let mut last_offset = None;
    for (i, &(good, pos, len, offset)) in pieces.iter().enumerate() {
        if good {
            out.good_bytes += len as u64;
            out.records += 1;
            last_offset = offset;
            out.next = offset.map_or(out.next, |o| o + 1);
            continue;
        }
        out.damage.push(Damage {
            segment: path.to_path_buf(),
            position: pos as u64,
            bytes: len as u64,
            after_offset: last_offset,
            before_offset: pieces.get(i + 1).and_then(|p| p.3),
            detail: describe_bad(&bytes, pos),
            quarantine: None,
        });
    }
    if idx_path(path).exists() {
        let file = File::open(path).map_err(|e| LogError::io(path, e))?;
        let mut indexed = Segment::empty(base, path.to_path_buf(), file);
        out.stale_index = !indexed.load_index(bytes.len() as u64)
            || indexed.next != out.next
            || !out.damage.is_empty();
    }
    Ok(out)
}

fn describe_bad(bytes: &[u8], pos: usize) -> String {
    match frame_at(bytes, pos, 0) {
        Some(_) => "a frame whose offset does not follow the one before it".to_owned(),
        None if bytes.len() - pos < HEADER => "partial frame header".to_owned(),
        None => "a frame that fails its checksum or is cut short".to_owned(),
    }
}

/// Moves every bad range of the segment at `path` to a quarantine file and
/// rewrites the segment with its intact frames, then opens it.
///
/// Crash-safe: the quarantine files are written and synced before the
/// segment is replaced (temp file, sync, rename, sync of the folder), so a
/// crash in between leaves the segment as it was, and the next open does
/// the same work again.
pub(super) fn quarantine(path: &Path, base: u64) -> Result<Opened, LogError> {
    let bytes = std::fs::read(path).map_err(|e| LogError::io(path, e))?;
    let pieces = pieces(&bytes, base);
    let mut damage = Vec::new();
    let mut kept = Vec::with_capacity(bytes.len());
    let mut last_offset = None;
    for (i, &(good, pos, len, offset)) in pieces.iter().enumerate() {
        let range = &bytes[pos..pos + len];
        if good {
            kept.extend_from_slice(range);
            last_offset = offset;
            continue;
        }
        let file = quarantine_path(path, pos as u64);
        let mut f = File::create(&file).map_err(|e| LogError::io(&file, e))?;
        f.write_all(range)
            .and_then(|()| f.sync_all())
            .map_err(|e| LogError::io(&file, e))?;
        let detail = describe_bad(&bytes, pos);
        damage.push(Damage {
            segment: path.to_path_buf(),
            position: pos as u64,
            bytes: len as u64,
            after_offset: last_offset,
            before_offset: pieces.get(i + 1).and_then(|p| p.3),
            detail,
            quarantine: Some(file),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    sync_folder(dir)?;
    let tmp = path.with_extension("log.tmp");
    {
        let mut f = File::create(&tmp).map_err(|e| LogError::io(&tmp, e))?;
        f.write_all(&kept)
            .and_then(|()| f.sync_all())
            .map_err(|e| LogError::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| LogError::io(path, e))?;
    // The old index describes the old bytes.
    match std::fs::remove_file(idx_path(path)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(LogError::io(idx_path(path), e)),
    }
    sync_folder(dir)?;
    let lost_tail = pieces.last().is_some_and(|p| !p.0);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| LogError::io(path, e))?;
    let mut segment = Segment::empty(base, path.to_path_buf(), file);
    if let Some((position, detail)) = segment.scan()? {
        return Err(LogError::Corrupt {
            path: path.display().to_string(),
            position,
            detail: format!("still damaged after quarantine: {detail}"),
        });
    }
    let m = crate::metrics::global();
    for d in &damage {
        m.log_quarantined_ranges.inc();
        m.log_quarantined_bytes.inc_by(d.bytes);
        tracing::warn!(
            segment = %path.display(),
            position = d.position,
            bytes = d.bytes,
            offsets = %d.offsets(),
            quarantine = %d.quarantine.as_ref().map_or(String::new(), |q| q.display().to_string()),
            detail = %d.detail,
            "Moved a damaged range of the log to a quarantine file; the intact records around it are kept."
        );
    }
    Ok(Opened {
        segment,
        damage,
        lost_tail,
    })
}

fn sync_folder(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io(dir, e))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What a reader needs from a segment, copied out under the partition lock.
pub(super) struct ReadView {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub start: u64,
    pub end: u64,
}

/// Chunks up to this size are read into a reused buffer ([`READ_BUFFERS`]);
/// larger ones (a single huge frame) get their own. A consumer reads at most
/// 4 MB of a partition per poll, so its chunks fit.
const REUSED_CHUNK: usize = 4 * 1024 * 1024;

/// Read buffers of [`REUSED_CHUNK`] bytes that no record points into any
/// more, for the next reads: a fresh buffer's pages are faulted in and
/// zeroed by the kernel, and zeroing a kept one again costs as much, which
/// together were most of a consumer's time. A buffer comes back here when
/// the last record read from it is dropped, on whatever thread that is.
static READ_BUFFERS: parking_lot::Mutex<Vec<Vec<u8>>> = parking_lot::Mutex::new(Vec::new());

/// Read buffers kept for reuse (64 MB at most); more in use at once are
/// allocated and freed. A consumer's records from one poll keep two or three
/// alive, and the records it holds back for its next poll a few more: with
/// 4 kept, a quarter of the reads allocated and zeroed a fresh buffer.
const READ_BUFFERS_KEPT: usize = 16;

/// A read buffer lent to the records read into it.
struct ReadBuffer(Vec<u8>);

impl AsRef<[u8]> for ReadBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        let mut kept = READ_BUFFERS.lock();
        if kept.len() < READ_BUFFERS_KEPT {
            kept.push(std::mem::take(&mut self.0));
        }
    }
}

/// Reads `n` bytes of `file` at `pos`.
fn read_chunk(file: &File, pos: u64, n: usize) -> std::io::Result<Bytes> {
    if n > REUSED_CHUNK {
        let mut buf = BytesMut::zeroed(n);
        file.read_exact_at(&mut buf, pos)?;
        return Ok(buf.freeze());
    }
    let kept = READ_BUFFERS.lock().pop();
    let mut buf = ReadBuffer(kept.unwrap_or_else(|| vec![0; REUSED_CHUNK]));
    file.read_exact_at(&mut buf.0[..n], pos)?;
    Ok(Bytes::from_owner(buf).slice(..n))
}

/// Reads frames from `view` starting at its position, returning messages with
/// offsets `>= from` until `out` holds `max` messages (other partitions'
/// included) or roughly `max_bytes` of data are read, plus the byte position
/// after the last one returned.
pub(super) fn read_frames(
    view: &ReadView,
    topic: &str,
    partition: u32,
    from: u64,
    max: usize,
    max_bytes: usize,
    out: &mut Vec<Message>,
) -> Result<u64, LogError> {
    let mut pos = view.start;
    let mut bytes = 0usize;
    // Set when one frame is larger than the chunk read.
    let mut whole_frame: Option<u64> = None;
    while pos < view.end && out.len() < max {
        // What is left of the byte budget, not the whole budget again: the
        // frames cut at the end of one chunk need a small read, and reading
        // (and zeroing) megabytes for them cost more than the records.
        let budget = max_bytes.saturating_sub(bytes).max(64 * 1024) as u64;
        let want = whole_frame.take().map_or(budget, |f| f.max(budget));
        let n = want.min(view.end - pos) as usize;
        let mut chunk = read_chunk(&view.file, pos, n).map_err(|e| LogError::io(&view.path, e))?;
        let mut consumed = 0u64;
        while chunk.len() >= HEADER && out.len() < max {
            let body_len = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
            let crc = u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
            if pos + consumed + (HEADER + body_len) as u64 > view.end {
                // A length no whole frame can have here: a damaged header.
                return Err(LogError::Corrupt {
                    path: view.path.display().to_string(),
                    position: pos + consumed,
                    detail: format!("a frame of {body_len} bytes runs past the end of the segment"),
                });
            }
            if chunk.len() < HEADER + body_len {
                break;
            }
            let frame = chunk.split_to(HEADER + body_len);
            let body = frame.slice(HEADER..);
            let at = pos + consumed;
            let corrupt = |detail: &str| LogError::Corrupt {
                path: view.path.display().to_string(),
                position: at,
                detail: detail.to_string(),
            };
            if crc32fast::hash(&body) != crc {
                return Err(corrupt("checksum mismatch"));
            }
            consumed += frame.len() as u64;
            let (offset, _) = body_meta(&body).ok_or_else(|| corrupt("short frame body"))?;
            if offset < from {
                continue;
            }
            bytes += body.len();
            out.push(decode(topic, partition, body).ok_or_else(|| corrupt("malformed frame"))?);
        }
        if consumed == 0 {
            if chunk.len() >= HEADER {
                // One frame larger than the chunk: read exactly that frame next time.
                let body_len = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as u64;
                whole_frame = Some(HEADER as u64 + body_len);
                continue;
            }
            break;
        }
        pos += consumed;
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(pos)
}
