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
        offset,
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
    /// otherwise by scanning. `active` segments may have a torn tail, which is
    /// cut off; in a sealed segment a bad frame is corruption.
    pub fn open(path: &Path, base: u64, active: bool) -> Result<Segment, LogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| LogError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| LogError::io(path, e))?.len();
        let mut seg = Segment::empty(base, path.to_path_buf(), file);
        if !active && seg.load_index(file_len) {
            return Ok(seg);
        }
        let bad = seg.scan()?;
        if let Some((position, detail)) = bad {
            if !active {
                return Err(LogError::Corrupt {
                    path: path.display().to_string(),
                    position,
                    detail,
                });
            }
            tracing::warn!(
                path = %path.display(),
                kept_bytes = seg.len,
                dropped_bytes = file_len - seg.len,
                %detail,
                "Cut a torn tail off the log after an unclean stop."
            );
            crate::metrics::global().log_torn_tails.inc();
            seg.file
                .set_len(seg.len)
                .and_then(|()| seg.file.sync_all())
                .map_err(|e| LogError::io(path, e))?;
        }
        Ok(seg)
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
            if offset != self.next {
                return Ok(Some((
                    pos,
                    format!("offset {offset} where {} was expected", self.next),
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

/// Reads frames from `view` starting at its position, returning messages with
/// offsets `>= from`, at most `max` of them and roughly `max_bytes` of data,
/// plus the byte position after the last one returned.
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
    let mut want = max_bytes.max(64 * 1024) as u64;
    let mut bytes = 0usize;
    while pos < view.end && out.len() < max {
        let n = want.min(view.end - pos) as usize;
        let mut buf = BytesMut::zeroed(n);
        view.file
            .read_exact_at(&mut buf, pos)
            .map_err(|e| LogError::io(&view.path, e))?;
        let mut chunk = buf.freeze();
        let mut consumed = 0u64;
        while chunk.len() >= HEADER && out.len() < max {
            let body_len = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
            let crc = u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
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
                want = HEADER as u64 + body_len;
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
