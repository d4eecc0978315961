//! The embedded log: topics as directories of partition directories of
//! segment files (see `segment.rs`), consumer groups coordinated inside the
//! process, committed offsets in one small file per group.
//!
//! Durability: a produce returns once its frames are written to the segment
//! file (so a killed process loses nothing acknowledged); with
//! `fsync = "always"` also once they are on disk. A background thread syncs
//! dirty partitions every `fsync_interval` and applies retention.
//!
//! One process owns a log directory at a time (a lock file enforces it);
//! scale-out across processes is what the Kafka backend is for. Read-only
//! commands open it without the lock ([`EmbeddedLog::open_read_only`]) and
//! never change a file.
//!
//! Nothing is deleted because it could not be read. A damaged byte range (a
//! tail torn by a crash, a flipped bit) is moved to a quarantine file beside
//! its segment (`<base>.<position>.quarantine`), logged, counted, and listed
//! by `sift topics describe`; the intact records on both sides stay. Only a
//! process that opens the log to write does this: at open for the active
//! segment, and when a read finds a bad record if `log.on_corruption =
//! "skip"` (which also sends a dead letter naming the offsets); with
//! `"fail"`, the default, the read fails and names `sift log check --repair`.
//!
//! Offsets are never given out twice. Each partition keeps a durable
//! reservation (`reserved`, a few thousand offsets above the last one
//! written); when recovery loses the end of a segment, whose offsets
//! consumers may have read and committed, the partition continues above the
//! reservation and above every committed offset, so no new record gets an
//! offset a consumer has already passed.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use super::faults;
use super::segment::{self, Damage, ReadView, Repair, Segment};
use super::{
    partition_for_key, validate_name, Commit, Consumer, LogError, Message, Offset, Position,
    Record, TopicInfo, TopicPartition, Watermarks, MAX_RECORD_BYTES,
};
use crate::config::{EmbeddedLogConfig, FsyncPolicy, OffsetOutOfRange, OnCorruption};

/// The embedded log numbers each partition's records from 0 in 64 bits; an
/// offset beyond that lies past the end of every partition.
fn local(offset: &Offset) -> u64 {
    offset.as_u64().unwrap_or(u64::MAX)
}

/// A commit as the partition and the 64-bit offset this log keeps.
fn local_entry(commit: &Commit) -> (TopicPartition, u64) {
    let (tp, next) = commit.entry();
    (tp, local(&next))
}

pub(super) const OFFSETS_DIR: &str = "~offsets";
pub(super) const TOPIC_META: &str = "topic.json";
/// Bytes a consumer reads from one partition per poll, at most (roughly).
const POLL_BYTES_PER_PARTITION: usize = 4 * 1024 * 1024;
/// Bytes a consumer reads per poll over all its partitions (roughly): a
/// poll holds its read buffers until its messages are dropped, and larger
/// polls made the allocator hand memory back and fault it in again.
const POLL_BYTES: usize = 2 * POLL_BYTES_PER_PARTITION;
const RETENTION_EVERY: Duration = Duration::from_secs(10);
/// File in a partition folder holding its offset reservation.
pub(super) const RESERVED_FILE: &str = "reserved";
/// Offsets reserved at a time: the reservation file is written once per this
/// many records, and a lost tail skips at most this many offsets.
const RESERVE_BLOCK: u64 = 4096;

/// How `log.on_*` asks the log to behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policies {
    /// A committed offset outside the stored range.
    pub on_offset_out_of_range: OffsetOutOfRange,
    /// A record that fails its checksum when read.
    pub on_corruption: OnCorruption,
    /// Partitions of `sift.dlq` if the log must create it for a dead letter.
    pub dlq_partitions: u32,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            on_offset_out_of_range: OffsetOutOfRange::default(),
            on_corruption: OnCorruption::default(),
            dlq_partitions: 4,
        }
    }
}

/// One partition as `sift topics describe` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionReport {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Earliest stored offset.
    pub low: u64,
    /// Offset the next record gets.
    pub high: u64,
    /// Offsets below this may have been given out.
    pub reserved: u64,
    /// Segment files.
    pub segments: usize,
    /// Bytes of whole records.
    pub bytes: u64,
    /// Quarantine files beside the segments, with their sizes.
    pub quarantined: Vec<(PathBuf, u64)>,
    /// Damage found since the log was opened (the latest [`DAMAGE_KEPT`]);
    /// `quarantine` is None where it was not repaired (a read-only open
    /// changes nothing). The quarantine files are the lasting record.
    pub damaged: Vec<Damage>,
}

/// Damage reports a process keeps in memory for [`EmbeddedLog::describe`].
pub const DAMAGE_KEPT: usize = 10_000;

/// The embedded log. Cheap to clone; clones share one open log.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    opts: EmbeddedLogConfig,
    policies: Policies,
    /// Opened by a read-only command: nothing may change a file.
    read_only: bool,
    /// Damage found since the log was opened: repaired (quarantined) when
    /// open to write, only reported when read-only.
    damaged: Mutex<Vec<Damage>>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    groups: Mutex<HashMap<String, Group>>,
    /// Bumped on every produce and every group change; consumers wait on it.
    changed: watch::Sender<u64>,
    _lock: Option<File>,
}

struct Topic {
    name: String,
    partitions: Vec<Partition>,
    round_robin: AtomicU64,
}

struct Partition {
    id: u32,
    dir: PathBuf,
    state: Mutex<PartitionState>,
}

struct PartitionState {
    /// Ascending by base offset; the last is the active one. Never empty.
    segments: Vec<Segment>,
    /// Written since the last sync.
    dirty: bool,
    /// No offset at or above this has been given out (durable in
    /// `RESERVED_FILE`).
    reserved: u64,
    /// The reservation file was written since the last sync.
    reserved_dirty: bool,
}

impl PartitionState {
    fn active(&mut self) -> &mut Segment {
        self.segments
            .last_mut()
            .expect("a partition always has an active segment")
    }
    fn low(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.base)
    }
    fn high(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.next)
    }
}

#[derive(Default)]
struct Group {
    generation: u64,
    next_member: u64,
    /// Member id to subscribed topics.
    members: BTreeMap<u64, Vec<String>>,
    assignments: HashMap<u64, Vec<TopicPartition>>,
    /// Committed next offsets; loaded from disk on first use.
    offsets: Option<BTreeMap<TopicPartition, u64>>,
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io(dir, e))
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir`, recovering from an unclean stop,
    /// with the default policies.
    pub fn open(dir: &Path, opts: EmbeddedLogConfig) -> Result<Self, LogError> {
        Self::open_with(dir, opts, Policies::default())
    }

    /// Opens (or creates) the log in `dir` to write, recovering from an
    /// unclean stop: damaged ranges of active segments are quarantined.
    pub fn open_with(
        dir: &Path,
        opts: EmbeddedLogConfig,
        policies: Policies,
    ) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir.join(OFFSETS_DIR)).map_err(|e| LogError::io(dir, e))?;
        let lock_path = dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LogError::io(&lock_path, e))?;
        if lock.try_lock().is_err() {
            return Err(LogError::Locked {
                path: dir.display().to_string(),
            });
        }
        let (topics, damage) = open_topics(dir, policies, false)?;
        let inner = Self::assemble(dir, opts, policies, topics, damage.clone(), Some(lock));
        // What recovery quarantined or found missing is in `sift.dlq` too.
        for d in &damage {
            let partition = d.segment.parent();
            let topic = partition.and_then(Path::parent).and_then(Path::file_name);
            let id = partition
                .and_then(Path::file_name)
                .and_then(|n| n.to_str()?.parse::<u32>().ok());
            if let (Some(topic), Some(id)) = (topic.and_then(|t| t.to_str()), id) {
                inner.dead_letters(topic, id, std::slice::from_ref(d))?;
            }
        }
        inner.enforce_retention();
        spawn_background(Arc::downgrade(&inner), inner.opts.fsync_interval);
        Ok(EmbeddedLog { inner })
    }

    /// Opens the log in `dir` to read, without the lock and without changing
    /// any file: damage is reported ([`EmbeddedLog::describe`]), not repaired,
    /// and readers stop before it. Producing and committing fail.
    pub fn open_read_only(dir: &Path, opts: EmbeddedLogConfig) -> Result<Self, LogError> {
        let (topics, damaged) = if dir.is_dir() {
            open_topics(dir, Policies::default(), true)?
        } else {
            (BTreeMap::new(), Vec::new())
        };
        let inner = Self::assemble(dir, opts, Policies::default(), topics, damaged, None);
        Ok(EmbeddedLog { inner })
    }

    fn assemble(
        dir: &Path,
        opts: EmbeddedLogConfig,
        policies: Policies,
        topics: BTreeMap<String, Arc<Topic>>,
        damaged: Vec<Damage>,
        lock: Option<File>,
    ) -> Arc<Inner> {
        let (changed, _) = watch::channel(0);
        Arc::new(Inner {
            dir: dir.to_path_buf(),
            opts,
            policies,
            read_only: lock.is_none(),
            damaged: Mutex::new(damaged),
            topics: RwLock::new(topics),
            groups: Mutex::new(HashMap::new()),
            changed,
            _lock: lock,
        })
    }

    /// Every partition of every topic: offsets, segments, quarantine files,
    /// and the damage found since the log was opened (with its quarantine
    /// file when it was repaired).
    pub fn describe(&self) -> Result<Vec<PartitionReport>, LogError> {
        let topics: Vec<Arc<Topic>> = self.inner.topics.read().values().cloned().collect();
        let damaged = self.inner.damaged.lock().clone();
        let mut out = Vec::new();
        for t in topics {
            for p in &t.partitions {
                let (low, high, reserved, segments, bytes) = {
                    let st = p.state.lock();
                    (
                        st.low(),
                        st.high(),
                        st.reserved,
                        st.segments.len(),
                        st.segments.iter().map(|s| s.len).sum(),
                    )
                };
                let quarantined = segment::quarantine_files(&p.dir)?;
                out.push(PartitionReport {
                    topic: t.name.clone(),
                    partition: p.id,
                    low,
                    high,
                    reserved,
                    segments,
                    bytes,
                    quarantined,
                    damaged: damaged
                        .iter()
                        .filter(|d| d.segment.parent() == Some(p.dir.as_path()))
                        .cloned()
                        .collect(),
                });
            }
        }
        Ok(out)
    }

    /// Sets group `group`'s committed offsets; refused while a member of the
    /// group is subscribed in this process.
    pub fn set_committed(&self, group: &str, commits: &[Commit]) -> Result<(), LogError> {
        validate_name("group", group)?;
        self.inner.writable()?;
        let mut groups = self.inner.groups.lock();
        let g = groups.entry(group.to_string()).or_default();
        if !g.members.is_empty() {
            return Err(LogError::Backend(format!(
                "group `{group}` has members running; stop them before setting its offsets"
            )));
        }
        for c in commits {
            let t = self.inner.topic(&c.topic)?;
            self.inner.partition(&t, c.partition)?;
        }
        self.inner
            .update_offsets(group, g, commits.iter().map(local_entry))
    }

    /// Syncs every partition written since the last sync.
    pub fn flush(&self) -> Result<(), LogError> {
        self.inner.flush()
    }

    /// Applies size and age retention now (it also runs in the background).
    pub fn enforce_retention(&self) {
        self.inner.enforce_retention();
    }
}

/// Topics by name.
type Topics = BTreeMap<String, Arc<Topic>>;

/// Opens every topic under `dir`; with `read_only`, damage is collected, not repaired.
fn open_topics(
    dir: &Path,
    policies: Policies,
    read_only: bool,
) -> Result<(Topics, Vec<Damage>), LogError> {
    let committed = committed_floors(dir);
    let mut topics = BTreeMap::new();
    let mut damaged = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| LogError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !path.is_dir() || name.starts_with('.') || name.starts_with('~') {
            continue;
        }
        if name.contains('~') {
            // A topic creation that did not finish.
            if !read_only {
                let _ = std::fs::remove_dir_all(&path);
            }
            continue;
        }
        let open = OpenTopic {
            policies,
            read_only,
            committed: &committed,
        };
        let topic = open.topic(&path, &name, &mut damaged)?;
        topics.insert(name, Arc::new(topic));
    }
    Ok((topics, damaged))
}

/// The highest offset any group has committed, per partition, read from the
/// offsets files that can be read (an unreadable one is reported when its
/// group is used).
pub(super) fn committed_floors(dir: &Path) -> HashMap<(String, u32), u64> {
    let mut floors: HashMap<(String, u32), u64> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir.join(OFFSETS_DIR)) else {
        return floors;
    };
    for entry in entries.flatten() {
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let Ok(stored) = serde_json::from_slice::<BTreeMap<String, BTreeMap<u32, u64>>>(&bytes)
        else {
            continue;
        };
        for (topic, parts) in stored {
            for (partition, offset) in parts {
                let e = floors.entry((topic.clone(), partition)).or_default();
                *e = (*e).max(offset);
            }
        }
    }
    floors
}

struct OpenTopic<'a> {
    policies: Policies,
    read_only: bool,
    committed: &'a HashMap<(String, u32), u64>,
}

impl OpenTopic<'_> {
    fn topic(&self, path: &Path, name: &str, damaged: &mut Vec<Damage>) -> Result<Topic, LogError> {
        let meta_path = path.join(TOPIC_META);
        let meta: serde_json::Value = std::fs::read(&meta_path)
            .map_err(|e| LogError::io(&meta_path, e))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| {
                    LogError::io(
                        &meta_path,
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    )
                })
            })?;
        let count = meta
            .get("partitions")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32;
        let mut partitions = Vec::with_capacity(count as usize);
        for id in 0..count {
            let dir = path.join(id.to_string());
            let floor = self.committed.get(&(name.to_owned(), id)).copied();
            partitions.push(self.partition(&dir, name, id, floor, damaged)?);
        }
        Ok(Topic {
            name: name.to_string(),
            partitions,
            round_robin: AtomicU64::new(0),
        })
    }

    fn partition(
        &self,
        dir: &Path,
        topic: &str,
        id: u32,
        committed: Option<u64>,
        damaged: &mut Vec<Damage>,
    ) -> Result<Partition, LogError> {
        if !self.read_only {
            std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        }
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| LogError::io(dir, e))? {
            let entry = entry.map_err(|e| LogError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".log") {
                if let Ok(base) = stem.parse::<u64>() {
                    bases.push(base);
                }
            } else if name.ends_with(".tmp") && !self.read_only {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        bases.sort_unstable();
        let mut segments = Vec::with_capacity(bases.len().max(1));
        let mut lost_tail = false;
        for (i, base) in bases.iter().enumerate() {
            let active = i + 1 == bases.len();
            let repair = if self.read_only {
                Repair::ReadOnly
            } else if active || self.policies.on_corruption == OnCorruption::Skip {
                Repair::Quarantine
            } else {
                Repair::Refuse
            };
            let opened = Segment::open(&segment::segment_path(dir, *base), *base, active, repair)
                .map_err(|e| corrupt_with_fix(e, topic, id))?;
            lost_tail = active && opened.lost_tail;
            damaged.extend(opened.damage);
            segments.push(opened.segment);
        }
        if segments.is_empty() {
            if self.read_only {
                return Err(LogError::Backend(format!(
                    "{} holds no segment file; open the log to write (any stage) to recreate it",
                    dir.display()
                )));
            }
            segments.push(Segment::create(dir, 0)?);
            sync_dir(dir)?;
        }
        let mut state = PartitionState {
            segments,
            dirty: false,
            reserved: 0,
            reserved_dirty: false,
        };
        let stored = read_reserved(dir);
        state.reserved = stored.map_or(0, |r| r.reserved).max(state.high());
        // Closed cleanly with more records than are there now: whole
        // records are missing at the end (a file cut at a frame boundary).
        if let Some(closed_at) = stored.and_then(|r| r.closed_at) {
            let high = state.high();
            if closed_at > high {
                let active = &state.segments[state.segments.len() - 1];
                damaged.push(Damage {
                    segment: active.path.clone(),
                    position: active.len,
                    bytes: 0,
                    after_offset: high.checked_sub(1),
                    before_offset: Some(closed_at),
                    detail: format!(
                        "{} records missing at the end: the log was closed with offsets up to {}",
                        closed_at - high,
                        closed_at - 1
                    ),
                    quarantine: None,
                });
                lost_tail = !self.read_only;
            }
        }
        if self.read_only {
            return Ok(Partition {
                id,
                dir: dir.to_path_buf(),
                state: Mutex::new(state),
            });
        }
        if lost_tail {
            crate::metrics::global().log_torn_tails.inc();
            // The lost records' offsets may have been read and committed:
            // continue above everything that may have been given out.
            let floor = state.reserved.max(committed.unwrap_or(0));
            let high = state.high();
            if floor > high {
                let active = state.active();
                active.seal()?;
                state.segments.push(Segment::create(dir, floor)?);
                sync_dir(dir)?;
                tracing::warn!(
                    topic,
                    partition = id,
                    lost_from = high,
                    continue_at = floor,
                    "The end of the partition was damaged; new records get offsets above every one that may have been given out."
                );
            }
        }
        // Open: not closed cleanly until `close_cleanly` says so.
        write_reserved(
            dir,
            Reservation {
                reserved: state.reserved,
                closed_at: None,
            },
            true,
        )?;
        Ok(Partition {
            id,
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
        })
    }
}

/// Adds where the damage is and the fix to a [`LogError::Corrupt`].
fn corrupt_with_fix(e: LogError, topic: &str, partition: u32) -> LogError {
    match e {
        LogError::Corrupt {
            path,
            position,
            detail,
        } => LogError::Corrupt {
            path,
            position,
            detail: format!("{detail} (topic {topic}, partition {partition})"),
        },
        other => other,
    }
}

/// What a partition's `reserved` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reservation {
    /// No offset at or above this has been given out.
    pub reserved: u64,
    /// The partition's end when the log was last closed cleanly; None while
    /// a process has it open (or after a stop that was not clean).
    pub closed_at: Option<u64>,
}

/// The partition's stored reservation; None when absent or unreadable.
pub(super) fn read_reserved(dir: &Path) -> Option<Reservation> {
    let bytes = std::fs::read(dir.join(RESERVED_FILE)).ok()?;
    let (data, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(data) != u32::from_be_bytes(crc.try_into().ok()?) {
        return None;
    }
    let reserved = u64::from_be_bytes(data.get(..8)?.try_into().ok()?);
    let closed_at = match data.len() {
        8 => None,
        16 => Some(u64::from_be_bytes(data[8..16].try_into().ok()?)).filter(|c| *c != u64::MAX),
        _ => return None,
    };
    Some(Reservation {
        reserved,
        closed_at,
    })
}

/// Writes the partition's reservation in place (20 bytes, within one sector).
pub(super) fn write_reserved(dir: &Path, r: Reservation, sync: bool) -> Result<(), LogError> {
    let path = dir.join(RESERVED_FILE);
    let mut buf = [0u8; 20];
    buf[..8].copy_from_slice(&r.reserved.to_be_bytes());
    buf[8..16].copy_from_slice(&r.closed_at.unwrap_or(u64::MAX).to_be_bytes());
    let crc = crc32fast::hash(&buf[..16]);
    buf[16..].copy_from_slice(&crc.to_be_bytes());
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LogError::io(&path, e))?;
    faults::write_all_at(&file, &path, &buf, 0)
        .and_then(|()| file.set_len(20))
        .map_err(|e| LogError::io(&path, e))?;
    if sync {
        faults::sync_data(&file, &path).map_err(|e| LogError::io(&path, e))?;
    }
    Ok(())
}

fn spawn_background(inner: Weak<Inner>, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("sift-log-flusher".into())
        .spawn(move || {
            let mut last_retention = Instant::now();
            loop {
                std::thread::sleep(every);
                let Some(inner) = inner.upgrade() else { return };
                if let Err(e) = inner.flush() {
                    tracing::error!(error = %e, "Syncing the log to disk failed; will retry.");
                }
                if last_retention.elapsed() >= RETENTION_EVERY {
                    inner.enforce_retention();
                    last_retention = Instant::now();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "Could not start the log flusher thread; records are synced only on close.");
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.flush().and_then(|()| self.close_cleanly()) {
            tracing::error!(error = %e, "Syncing the log on close failed.");
        }
    }
}

impl Inner {
    fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::NoSuchTopic(name.to_string()))
    }

    /// Records each partition's end in its reservation file, after the
    /// records are synced: the next open then knows if whole records went
    /// missing while it was closed.
    fn close_cleanly(&self) -> Result<(), LogError> {
        if self.read_only {
            return Ok(());
        }
        for t in self.topics.read().values() {
            for p in &t.partitions {
                let st = p.state.lock();
                write_reserved(
                    &p.dir,
                    Reservation {
                        reserved: st.reserved,
                        closed_at: Some(st.high()),
                    },
                    true,
                )?;
            }
        }
        Ok(())
    }

    /// Refuses changes to a log opened read-only.
    fn writable(&self) -> Result<(), LogError> {
        if self.read_only {
            return Err(LogError::Backend(format!(
                "the log at {} was opened read-only; this command only reads it",
                self.dir.display()
            )));
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), LogError> {
        if self.read_only {
            return Ok(());
        }
        let topics: Vec<Arc<Topic>> = self.topics.read().values().cloned().collect();
        for t in topics {
            for p in &t.partitions {
                let mut st = p.state.lock();
                if st.reserved_dirty {
                    // Before the records that use the reservation.
                    let path = p.dir.join(RESERVED_FILE);
                    File::open(&path)
                        .and_then(|f| faults::sync_data(&f, &path))
                        .map_err(|e| LogError::io(&path, e))?;
                    st.reserved_dirty = false;
                }
                if st.dirty {
                    let seg = st.active();
                    faults::sync_data(&seg.file, &seg.path)
                        .map_err(|e| LogError::io(&seg.path, e))?;
                    st.dirty = false;
                }
            }
        }
        Ok(())
    }

    fn enforce_retention(&self) {
        if self.read_only {
            return;
        }
        let topics: Vec<Arc<Topic>> = self.topics.read().values().cloned().collect();
        let now = crate::now_ms();
        let max_age = self.opts.retention_age.as_millis() as i64;
        for t in topics {
            for p in &t.partitions {
                let mut st = p.state.lock();
                while st.segments.len() > 1 {
                    let total: u64 = st.segments.iter().map(|s| s.len).sum();
                    let oldest = &st.segments[0];
                    let too_big =
                        self.opts.retention_bytes > 0 && total > self.opts.retention_bytes;
                    let too_old = max_age > 0 && oldest.max_ts < now - max_age;
                    if !(too_big || too_old) {
                        break;
                    }
                    if let Err(e) = oldest.remove() {
                        tracing::error!(error = %e, "Deleting an expired log segment failed.");
                        break;
                    }
                    tracing::info!(topic = %t.name, partition = p.id, base = oldest.base, too_big, too_old, "Deleted a log segment under retention.");
                    st.segments.remove(0);
                }
            }
        }
    }

    fn create_topic(&self, name: &str, partitions: u32) -> Result<bool, LogError> {
        validate_name("topic", name)?;
        if !self.topics.read().contains_key(name) {
            self.writable()?;
        }
        if partitions == 0 {
            return Err(LogError::Backend(format!(
                "topic `{name}` needs at least one partition"
            )));
        }
        let mut topics = self.topics.write();
        if topics.contains_key(name) {
            return Ok(false);
        }
        let final_dir = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}~{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| LogError::io(&tmp, e))?;
        for id in 0..partitions {
            let pdir = tmp.join(id.to_string());
            std::fs::create_dir_all(&pdir).map_err(|e| LogError::io(&pdir, e))?;
            let seg = Segment::create(&pdir, 0)?;
            seg.file
                .sync_all()
                .map_err(|e| LogError::io(&seg.path, e))?;
            sync_dir(&pdir)?;
        }
        let meta = serde_json::json!({ "partitions": partitions, "created_ms": crate::now_ms() });
        let meta_path = tmp.join(TOPIC_META);
        std::fs::write(&meta_path, meta.to_string())
            .and_then(|()| File::open(&meta_path)?.sync_all())
            .map_err(|e| LogError::io(&meta_path, e))?;
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &final_dir).map_err(|e| LogError::io(&final_dir, e))?;
        sync_dir(&self.dir)?;
        let topic = OpenTopic {
            policies: self.policies,
            read_only: false,
            committed: &HashMap::new(),
        }
        .topic(&final_dir, name, &mut Vec::new())?;
        topics.insert(name.to_string(), Arc::new(topic));
        tracing::info!(topic = name, partitions, "Created topic.");
        Ok(true)
    }

    fn produce(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        self.writable()?;
        let t = self.topic(topic)?;
        let n = t.partitions.len() as u32;
        let mut by_partition: Vec<Vec<(usize, &Record)>> = vec![Vec::new(); n as usize];
        for (i, r) in records.iter().enumerate() {
            let size = segment::frame_len(r);
            if size > MAX_RECORD_BYTES {
                return Err(LogError::RecordTooLarge {
                    topic: topic.to_string(),
                    size,
                    max: MAX_RECORD_BYTES,
                });
            }
            let p = match &r.key {
                Some(k) => partition_for_key(k, n),
                None => (t.round_robin.fetch_add(1, Ordering::Relaxed) % u64::from(n)) as u32,
            };
            by_partition[p as usize].push((i, r));
        }
        let mut positions = vec![
            Position {
                partition: 0,
                offset: Offset::ZERO
            };
            records.len()
        ];
        let ts = crate::now_ms();
        let mut buf = Vec::new();
        let mut bytes = 0u64;
        for (p, batch) in by_partition.iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let part = &t.partitions[p];
            let mut st = part.state.lock();
            let batch_len: usize = batch.iter().map(|(_, r)| segment::frame_len(r)).sum();
            {
                let active = st.active();
                if active.len > 0 && active.len + batch_len as u64 > self.opts.segment_bytes {
                    active.seal()?;
                    let next = active.next;
                    let seg = Segment::create(&part.dir, next)?;
                    sync_dir(&part.dir)?;
                    st.segments.push(seg);
                }
            }
            let needed = st.high() + batch.len() as u64;
            if needed > st.reserved {
                let reserved = needed + RESERVE_BLOCK;
                let always = self.opts.fsync == FsyncPolicy::Always;
                write_reserved(
                    &part.dir,
                    Reservation {
                        reserved,
                        closed_at: None,
                    },
                    always,
                )?;
                st.reserved = reserved;
                st.reserved_dirty = !always;
            }
            let active = st.active();
            buf.clear();
            buf.reserve(batch_len);
            let start_pos = active.len;
            let mut frames = Vec::with_capacity(batch.len());
            for (k, (i, r)) in batch.iter().enumerate() {
                let offset = active.next + k as u64;
                let before = buf.len();
                segment::encode(&mut buf, offset, ts, r);
                frames.push((
                    offset,
                    start_pos + before as u64,
                    (buf.len() - before) as u64,
                ));
                positions[*i] = Position {
                    partition: p as u32,
                    offset: Offset::new(offset),
                };
            }
            let written = faults::write_all_at(&active.file, &active.path, &buf, start_pos)
                .and_then(|()| {
                    if self.opts.fsync == FsyncPolicy::Always {
                        faults::sync_data(&active.file, &active.path)
                    } else {
                        Ok(())
                    }
                });
            if let Err(e) = written {
                // Nothing of the batch was acknowledged: take back what part
                // of it reached the file (a full disk writes some), so the
                // next append and the next open find the segment as it was.
                if let Err(t) = active.file.set_len(start_pos) {
                    tracing::warn!(path = %active.path.display(), error = %t, "Could not cut a failed append off the segment; the next open quarantines it.");
                }
                return Err(LogError::io(&active.path, e));
            }
            for (offset, pos, len) in frames {
                active.note_appended(offset, ts, pos, len);
            }
            if self.opts.fsync != FsyncPolicy::Always {
                st.dirty = true;
            }
            bytes += buf.len() as u64;
        }
        let m = crate::metrics::global();
        m.log_produced_records.inc_by(records.len() as u64);
        m.log_produced_bytes.inc_by(bytes);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        Ok(positions)
    }

    fn partition<'a>(&self, t: &'a Topic, partition: u32) -> Result<&'a Partition, LogError> {
        t.partitions
            .get(partition as usize)
            .ok_or_else(|| LogError::NoSuchPartition {
                topic: t.name.clone(),
                partition,
                partitions: t.partitions.len() as u32,
            })
    }

    /// Reads records of one partition from `offset`. A record that fails its
    /// checksum is handled by `log.on_corruption`: an error that names the
    /// fix, or (`skip`, when open to write) its range quarantined, a dead
    /// letter sent, and the read done again.
    ///
    /// Returns `Some(end)` when nothing was read although `offset` lies below
    /// the partition's end: no record has an offset in `offset..end`.
    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
        max_bytes: usize,
        out: &mut Vec<Message>,
    ) -> Result<Option<u64>, LogError> {
        let before = out.len();
        let mut attempt = 0;
        loop {
            match self.fetch_once(topic, partition, offset, max, max_bytes, out) {
                Err(LogError::Corrupt {
                    path,
                    position,
                    detail,
                }) => {
                    out.truncate(before);
                    attempt += 1;
                    let skip = !self.read_only
                        && self.policies.on_corruption == OnCorruption::Skip
                        && attempt <= 3;
                    if !skip {
                        return Err(LogError::Corrupt {
                            path,
                            position,
                            detail: format!(
                                "{detail} (topic {topic}, partition {partition}, reading from offset {offset})"
                            ),
                        });
                    }
                    let damage = self.quarantine_segment(topic, partition, Path::new(&path))?;
                    self.dead_letters(topic, partition, &damage)?;
                    let mut kept = self.damaged.lock();
                    kept.extend(damage);
                    let over = kept.len().saturating_sub(DAMAGE_KEPT);
                    kept.drain(..over);
                }
                other => return other,
            }
        }
    }

    /// Quarantines the damaged ranges of one segment of a partition and puts
    /// the rewritten segment in its place.
    fn quarantine_segment(
        &self,
        topic: &str,
        partition: u32,
        path: &Path,
    ) -> Result<Vec<Damage>, LogError> {
        let t = self.topic(topic)?;
        let part = self.partition(&t, partition)?;
        let floor = self.committed_floor(topic, partition);
        let mut st = part.state.lock();
        let Some(i) = st.segments.iter().position(|s| s.path == path) else {
            // Replaced meanwhile (another reader quarantined it).
            return Ok(Vec::new());
        };
        let active = i + 1 == st.segments.len();
        let opened = segment::quarantine(path, st.segments[i].base)?;
        if !active {
            opened.segment.seal()?;
        }
        st.segments[i] = opened.segment;
        if active && opened.lost_tail {
            let floor = st.reserved.max(floor);
            if floor > st.high() {
                st.active().seal()?;
                st.segments.push(Segment::create(&part.dir, floor)?);
                sync_dir(&part.dir)?;
            }
        }
        Ok(opened.damage)
    }

    /// The highest offset of `topic`/`partition` committed by any group
    /// this process has loaded, or any offsets file holds.
    fn committed_floor(&self, topic: &str, partition: u32) -> u64 {
        let on_disk = committed_floors(&self.dir)
            .get(&(topic.to_owned(), partition))
            .copied()
            .unwrap_or(0);
        let tp = TopicPartition {
            topic: topic.to_owned(),
            partition,
        };
        let loaded = self
            .groups
            .lock()
            .values()
            .filter_map(|g| g.offsets.as_ref()?.get(&tp).copied())
            .max()
            .unwrap_or(0);
        on_disk.max(loaded)
    }

    /// Sends one dead letter per quarantined range to `sift.dlq`, naming the
    /// topic, partition, offsets and quarantine file, so nothing vanishes
    /// unrecorded. A range of `sift.dlq` itself is only logged.
    fn dead_letters(&self, topic: &str, partition: u32, damage: &[Damage]) -> Result<(), LogError> {
        use crate::envelope::{headers, topics, Stage};
        if damage.is_empty() || topic == topics::DLQ {
            return Ok(());
        }
        let records: Vec<Record> = damage
            .iter()
            .map(|d| {
                let detail = match &d.quarantine {
                    Some(q) => format!(
                        "{topic}/{partition}: offsets {} were unreadable ({}); {} bytes moved to {}",
                        d.offsets(),
                        d.detail,
                        d.bytes,
                        q.display()
                    ),
                    None => format!("{topic}/{partition}: offsets {}: {}", d.offsets(), d.detail),
                };
                let value = serde_json::json!({
                    "stage": Stage::Log.name(),
                    "reason": "log_corruption",
                    "detail": detail,
                    "source": null,
                    "url": null,
                    "at_ms": crate::now_ms(),
                });
                Record::new(format!("{topic}/{partition}"), value.to_string())
                    .header(headers::REASON, format!("log_corruption: {detail}"))
                    .header(headers::STAGE, Stage::Log.name())
            })
            .collect();
        self.create_topic(topics::DLQ, self.policies.dlq_partitions.max(1))?;
        self.produce(topics::DLQ, records)?;
        for _ in damage {
            crate::metrics::global().dead_letter("log_corruption");
        }
        Ok(())
    }

    fn fetch_once(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
        max_bytes: usize,
        out: &mut Vec<Message>,
    ) -> Result<Option<u64>, LogError> {
        let t = self.topic(topic)?;
        let part = self.partition(&t, partition)?;
        let (views, high): (Vec<ReadView>, u64) = {
            let st = part.state.lock();
            let (low, high) = (st.low(), st.high());
            if offset < low {
                return Err(LogError::OffsetOutOfRange {
                    topic: topic.to_string(),
                    partition,
                    offset: Offset::new(offset),
                    earliest: Offset::new(low),
                });
            }
            if offset >= high {
                return Ok(None);
            }
            let first = st.segments.partition_point(|s| s.base <= offset).max(1) - 1;
            let views = st.segments[first..]
                .iter()
                .enumerate()
                .map(|(i, s)| ReadView {
                    file: s.file.clone(),
                    path: s.path.clone(),
                    start: if i == 0 { s.position_for(offset) } else { 0 },
                    end: s.len,
                })
                .collect();
            (views, high)
        };
        let before = out.len();
        for view in &views {
            if out.len() - before >= max {
                break;
            }
            // `read_frames` counts what `out` holds, other partitions' too.
            let limit = out.len() + (max - (out.len() - before));
            segment::read_frames(view, topic, partition, offset, limit, max_bytes, out)?;
        }
        // Every view was read to its end without a record at or after
        // `offset`: offsets up to `high` are a gap (quarantined records, or
        // offsets skipped after a lost tail).
        Ok((out.len() == before).then_some(high))
    }

    fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError> {
        let t = self.topic(topic)?;
        Ok(t.partitions
            .iter()
            .map(|p| {
                let st = p.state.lock();
                Watermarks {
                    partition: p.id,
                    low: Offset::new(st.low()),
                    high: Offset::new(st.high()),
                }
            })
            .collect())
    }

    // ---- consumer groups -------------------------------------------------

    fn offsets_path(&self, group: &str) -> PathBuf {
        self.dir.join(OFFSETS_DIR).join(format!("{group}.json"))
    }

    fn load_offsets(&self, group: &str) -> Result<BTreeMap<TopicPartition, u64>, LogError> {
        let path = self.offsets_path(group);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(LogError::io(&path, e)),
        };
        let stored: BTreeMap<String, BTreeMap<u32, u64>> =
            serde_json::from_slice(&bytes).map_err(|e| {
                LogError::io(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            })?;
        Ok(stored
            .into_iter()
            .flat_map(|(topic, parts)| {
                parts.into_iter().map(move |(partition, off)| {
                    (
                        TopicPartition {
                            topic: topic.clone(),
                            partition,
                        },
                        off,
                    )
                })
            })
            .collect())
    }

    fn store_offsets(
        &self,
        group: &str,
        offsets: &BTreeMap<TopicPartition, u64>,
    ) -> Result<(), LogError> {
        let mut stored: BTreeMap<&str, BTreeMap<u32, u64>> = BTreeMap::new();
        for (tp, off) in offsets {
            stored
                .entry(tp.topic.as_str())
                .or_default()
                .insert(tp.partition, *off);
        }
        let path = self.offsets_path(group);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec(&stored).map_err(|e| {
            LogError::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        let always = self.opts.fsync == FsyncPolicy::Always;
        (|| -> std::io::Result<()> {
            let f = File::create(&tmp)?;
            faults::write_all_at(&f, &tmp, &body, 0)?;
            if always {
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)
        })()
        .map_err(|e| LogError::io(&path, e))?;
        if always {
            sync_dir(&self.dir.join(OFFSETS_DIR))?;
        }
        Ok(())
    }

    /// Writes group `name`'s committed offsets with `changes` applied, then
    /// takes them in memory: offsets move only once their file is written.
    fn update_offsets(
        &self,
        name: &str,
        group: &mut Group,
        changes: impl IntoIterator<Item = (TopicPartition, u64)>,
    ) -> Result<(), LogError> {
        let offsets = self.group_offsets(name, group)?;
        let mut updated = offsets.clone();
        updated.extend(changes);
        self.store_offsets(name, &updated)?;
        *offsets = updated;
        Ok(())
    }

    fn group_offsets<'g>(
        &self,
        name: &str,
        group: &'g mut Group,
    ) -> Result<&'g mut BTreeMap<TopicPartition, u64>, LogError> {
        if group.offsets.is_none() {
            group.offsets = Some(self.load_offsets(name)?);
        }
        Ok(group
            .offsets
            .as_mut()
            .expect("offsets were loaded just above"))
    }

    /// Recomputes a group's assignment: each topic's partitions are dealt
    /// round-robin to the members subscribed to it, in member order.
    fn rebalance(&self, group: &mut Group) {
        group.generation += 1;
        group.assignments.clear();
        let topics = self.topics.read();
        let mut names: Vec<&String> = group.members.values().flatten().collect();
        names.sort();
        names.dedup();
        for name in names {
            let members: Vec<u64> = group
                .members
                .iter()
                .filter(|(_, ts)| ts.contains(name))
                .map(|(id, _)| *id)
                .collect();
            let Some(t) = topics.get(name.as_str()) else {
                continue;
            };
            for p in 0..t.partitions.len() as u32 {
                let member = members[p as usize % members.len()];
                group
                    .assignments
                    .entry(member)
                    .or_default()
                    .push(TopicPartition {
                        topic: name.clone(),
                        partition: p,
                    });
            }
        }
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn join(&self, group: &str, topics: Vec<String>) -> u64 {
        let mut groups = self.groups.lock();
        let g = groups.entry(group.to_string()).or_default();
        g.next_member += 1;
        let id = g.next_member;
        g.members.insert(id, topics);
        self.rebalance(g);
        tracing::debug!(
            group,
            member = id,
            generation = g.generation,
            "Member joined group."
        );
        id
    }

    fn leave(&self, group: &str, member: u64) {
        let mut groups = self.groups.lock();
        if let Some(g) = groups.get_mut(group) {
            if g.members.remove(&member).is_some() {
                self.rebalance(g);
                tracing::debug!(
                    group,
                    member,
                    generation = g.generation,
                    "Member left group."
                );
            }
        }
    }
}

#[async_trait]
impl super::Log for EmbeddedLog {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<bool, LogError> {
        let inner = self.inner.clone();
        let topic = topic.to_string();
        blocking(move || inner.create_topic(&topic, partitions)).await
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>, LogError> {
        Ok(self
            .inner
            .topics
            .read()
            .values()
            .map(|t| TopicInfo {
                name: t.name.clone(),
                partitions: t.partitions.len() as u32,
            })
            .collect())
    }

    async fn produce(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let inner = self.inner.clone();
        let topic = topic.to_string();
        blocking(move || inner.produce(&topic, records)).await
    }

    async fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError> {
        self.inner.watermarks(topic)
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: &Offset,
        max: usize,
    ) -> Result<Vec<Message>, LogError> {
        let inner = self.inner.clone();
        let topic = topic.to_string();
        let offset = local(offset);
        blocking(move || {
            let mut out = Vec::new();
            inner.fetch(
                &topic,
                partition,
                offset,
                max,
                POLL_BYTES_PER_PARTITION,
                &mut out,
            )?;
            // A gap (no record in offset..end) reads as nothing, as at the end.
            Ok(out)
        })
        .await
    }

    async fn subscribe(&self, group: &str, topics: &[&str]) -> Result<Box<dyn Consumer>, LogError> {
        validate_name("group", group)?;
        for t in topics {
            self.inner.topic(t)?;
        }
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        let member = self.inner.join(group, topics.clone());
        Ok(Box::new(EmbeddedConsumer {
            inner: self.inner.clone(),
            group: group.to_string(),
            member,
            generation: 0,
            positions: BTreeMap::new(),
            next_start: 0,
            changed: self.inner.changed.subscribe(),
            closed: false,
        }))
    }

    async fn committed(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(u32, Option<Offset>)>, LogError> {
        validate_name("group", group)?;
        let t = self.inner.topic(topic)?;
        let mut groups = self.inner.groups.lock();
        let g = groups.entry(group.to_string()).or_default();
        let offsets = self.inner.group_offsets(group, g)?;
        Ok((0..t.partitions.len() as u32)
            .map(|p| {
                let tp = TopicPartition {
                    topic: topic.to_string(),
                    partition: p,
                };
                (p, offsets.get(&tp).copied().map(Offset::new))
            })
            .collect())
    }

    async fn set_committed(&self, group: &str, commits: &[Commit]) -> Result<(), LogError> {
        blocking_set_committed(self, group, commits).await
    }
}

async fn blocking_set_committed(
    log: &EmbeddedLog,
    group: &str,
    commits: &[Commit],
) -> Result<(), LogError> {
    let (log, group, commits) = (log.clone(), group.to_owned(), commits.to_vec());
    blocking(move || log.set_committed(&group, &commits)).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::Backend(format!("log worker thread failed: {e}")))?
}

/// A member of an embedded consumer group.
struct EmbeddedConsumer {
    inner: Arc<Inner>,
    group: String,
    member: u64,
    /// Group generation this member's assignment is from.
    generation: u64,
    /// Next offset to read, per assigned partition.
    positions: BTreeMap<TopicPartition, u64>,
    /// Partition to read first next time, so no partition starves.
    next_start: usize,
    changed: watch::Receiver<u64>,
    closed: bool,
}

impl EmbeddedConsumer {
    /// Takes up the group's current assignment if it changed since the last poll.
    fn sync_assignment(&mut self) -> Result<(), LogError> {
        let mut groups = self.inner.groups.lock();
        let Some(g) = groups.get_mut(&self.group) else {
            return Ok(());
        };
        if g.generation == self.generation {
            return Ok(());
        }
        let assigned = g.assignments.get(&self.member).cloned().unwrap_or_default();
        let generation = g.generation;
        let committed = self.inner.group_offsets(&self.group, g)?.clone();
        drop(groups);
        let mut positions = BTreeMap::new();
        let mut resets = Vec::new();
        for tp in assigned {
            let (low, high) = self
                .inner
                .topic(&tp.topic)
                .ok()
                .and_then(|t| {
                    t.partitions.get(tp.partition as usize).map(|p| {
                        let st = p.state.lock();
                        (st.low(), st.high())
                    })
                })
                .unwrap_or((0, 0));
            let pos = match committed.get(&tp).copied() {
                None => low,
                Some(c) if c > high => self.out_of_range(
                    &tp,
                    c,
                    low,
                    high,
                    LogError::OffsetBeyondEnd {
                        group: self.group.clone(),
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        committed: Offset::new(c),
                        end: Offset::new(high),
                    },
                )?,
                Some(c) if c < low => self.out_of_range(
                    &tp,
                    c,
                    low,
                    high,
                    LogError::OffsetOutOfRange {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        offset: Offset::new(c),
                        earliest: Offset::new(low),
                    },
                )?,
                Some(c) => c,
            };
            if committed.get(&tp).is_some_and(|c| *c != pos) {
                resets.push((tp.clone(), pos));
            }
            positions.insert(tp, pos);
        }
        tracing::debug!(group = %self.group, member = self.member, generation, partitions = positions.len(), "Took up a new assignment.");
        self.positions = positions;
        self.generation = generation;
        // A reset is a decision: kept, so the group's committed offset says
        // where it now stands.
        for (tp, pos) in resets {
            self.store_position(&tp, pos, false)?;
        }
        Ok(())
    }

    /// Where to continue when the committed offset `at` lies outside
    /// `low..=high`, by `log.on_offset_out_of_range`; `fail` returns `error`.
    fn out_of_range(
        &self,
        tp: &TopicPartition,
        at: u64,
        low: u64,
        high: u64,
        error: LogError,
    ) -> Result<u64, LogError> {
        let to = match self.inner.policies.on_offset_out_of_range {
            OffsetOutOfRange::Fail => return Err(error),
            OffsetOutOfRange::Earliest => low,
            OffsetOutOfRange::Latest => high,
        };
        crate::metrics::global().log_offset_resets.inc();
        tracing::warn!(
            group = %self.group,
            topic = %tp.topic,
            partition = tp.partition,
            from = at,
            to,
            %error,
            "The group's offset lay outside the stored records; moved it as log.on_offset_out_of_range says."
        );
        Ok(to)
    }

    /// Commits `to` for `tp` on the group's behalf (with `only_forward`,
    /// only past what is committed): after a gap is stepped over, or a
    /// position reset by `log.on_offset_out_of_range`.
    fn store_position(
        &self,
        tp: &TopicPartition,
        to: u64,
        only_forward: bool,
    ) -> Result<(), LogError> {
        if self.inner.read_only {
            return Ok(());
        }
        let mut groups = self.inner.groups.lock();
        let g = groups.entry(self.group.clone()).or_default();
        let current = g.generation == self.generation
            && g.assignments
                .get(&self.member)
                .is_some_and(|a| a.contains(tp));
        if !current {
            return Ok(());
        }
        let offsets = self.inner.group_offsets(&self.group, g)?;
        if only_forward && offsets.get(tp).is_some_and(|c| *c >= to) {
            return Ok(());
        }
        self.inner
            .update_offsets(&self.group, g, [(tp.clone(), to)])
    }

    fn read(&mut self, max: usize) -> Result<Vec<Message>, LogError> {
        let mut out = Vec::new();
        let tps: Vec<TopicPartition> = self.positions.keys().cloned().collect();
        if tps.is_empty() {
            return Ok(out);
        }
        let start = self.next_start % tps.len();
        self.next_start = self.next_start.wrapping_add(1);
        let mut bytes = 0usize;
        for i in 0..tps.len() {
            if out.len() >= max || bytes >= POLL_BYTES {
                break;
            }
            let tp = &tps[(start + i) % tps.len()];
            let pos = self.positions[tp];
            let before = out.len();
            match self.inner.fetch(
                &tp.topic,
                tp.partition,
                pos,
                max - out.len(),
                POLL_BYTES_PER_PARTITION,
                &mut out,
            ) {
                Ok(None) => {}
                Ok(Some(end)) => {
                    // Nothing stored between here and `end`: step over the
                    // gap, and commit it, so that the group's committed
                    // offset reaches the end and a one-pass run ends.
                    self.positions.insert(tp.clone(), end);
                    self.store_position(tp, end, true)?;
                    continue;
                }
                Err(e @ LogError::OffsetOutOfRange { .. }) => {
                    // Retention deleted records this member had not read.
                    let (low, high) = match &e {
                        LogError::OffsetOutOfRange { earliest, .. } => {
                            (local(earliest), local(earliest))
                        }
                        _ => (pos, pos),
                    };
                    let high = self
                        .inner
                        .watermarks(&tp.topic)
                        .ok()
                        .and_then(|w| w.get(tp.partition as usize).map(|w| local(&w.high)))
                        .unwrap_or(high);
                    let to = self.out_of_range(tp, pos, low, high, e)?;
                    self.positions.insert(tp.clone(), to);
                    self.store_position(tp, to, false)?;
                    continue;
                }
                Err(e) => return Err(e),
            }
            bytes += out[before..]
                .iter()
                .map(|m| m.value.len() + m.key.as_ref().map_or(0, |k| k.len()))
                .sum::<usize>();
            if let Some(last) = out[before..].last() {
                self.positions.insert(tp.clone(), local(&last.offset) + 1);
            }
        }
        crate::metrics::global()
            .log_consumed_records
            .inc_by(out.len() as u64);
        Ok(out)
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Message>, LogError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.changed.borrow_and_update();
            self.sync_assignment()?;
            // Reads are page-cache copies of at most a few MB: cheap enough to do inline.
            let batch = self.read(max)?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(Vec::new()),
            }
        }
    }

    async fn commit(&mut self, commits: &[Commit]) -> Result<(), LogError> {
        if commits.is_empty() {
            return Ok(());
        }
        self.inner.writable()?;
        let inner = self.inner.clone();
        let mut groups = inner.groups.lock();
        let g = groups.entry(self.group.clone()).or_default();
        let assigned = g.assignments.get(&self.member).cloned().unwrap_or_default();
        let current = g.generation == self.generation;
        for c in commits {
            let tp = TopicPartition {
                topic: c.topic.clone(),
                partition: c.partition,
            };
            if !current || !assigned.contains(&tp) {
                return Err(LogError::NotAssigned {
                    group: self.group.clone(),
                    topic: c.topic.clone(),
                    partition: c.partition,
                });
            }
        }
        inner.update_offsets(&self.group, g, commits.iter().map(local_entry))
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.positions.keys().cloned().collect()
    }

    async fn close(mut self: Box<Self>) -> Result<(), LogError> {
        self.closed = true;
        self.inner.leave(&self.group, self.member);
        Ok(())
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        if !self.closed {
            self.inner.leave(&self.group, self.member);
        }
    }
}
