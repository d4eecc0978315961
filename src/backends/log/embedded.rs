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
//! scale-out across processes is what the Kafka backend is for.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use super::segment::{self, ReadView, Segment};
use super::{
    partition_for_key, validate_name, Commit, Consumer, LogError, Message, Position, Record,
    TopicInfo, TopicPartition, Watermarks, MAX_RECORD_BYTES,
};
use crate::config::{EmbeddedLogConfig, FsyncPolicy};

const OFFSETS_DIR: &str = "~offsets";
const TOPIC_META: &str = "topic.json";
/// Bytes a consumer reads from one partition per poll, at most (roughly).
const POLL_BYTES_PER_PARTITION: usize = 4 * 1024 * 1024;
const RETENTION_EVERY: Duration = Duration::from_secs(10);

/// The embedded log. Cheap to clone; clones share one open log.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    opts: EmbeddedLogConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    groups: Mutex<HashMap<String, Group>>,
    /// Bumped on every produce and every group change; consumers wait on it.
    changed: watch::Sender<u64>,
    _lock: File,
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

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io(dir, e))
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir`, recovering from an unclean stop.
    pub fn open(dir: &Path, opts: EmbeddedLogConfig) -> Result<Self, LogError> {
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
        let mut topics = BTreeMap::new();
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
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            let topic = open_topic(&path, &name)?;
            topics.insert(name, Arc::new(topic));
        }
        let (changed, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            opts,
            topics: RwLock::new(topics),
            groups: Mutex::new(HashMap::new()),
            changed,
            _lock: lock,
        });
        inner.enforce_retention();
        spawn_background(Arc::downgrade(&inner), inner.opts.fsync_interval);
        Ok(EmbeddedLog { inner })
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

fn open_topic(path: &Path, name: &str) -> Result<Topic, LogError> {
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
        partitions.push(open_partition(&dir, id)?);
    }
    Ok(Topic {
        name: name.to_string(),
        partitions,
        round_robin: AtomicU64::new(0),
    })
}

fn open_partition(dir: &Path, id: u32) -> Result<Partition, LogError> {
    std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LogError::io(dir, e))? {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(base) = stem.parse::<u64>() {
                bases.push(base);
            }
        } else if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    bases.sort_unstable();
    let mut segments = Vec::with_capacity(bases.len().max(1));
    for (i, base) in bases.iter().enumerate() {
        let active = i + 1 == bases.len();
        segments.push(Segment::open(
            &segment::segment_path(dir, *base),
            *base,
            active,
        )?);
    }
    if segments.is_empty() {
        segments.push(Segment::create(dir, 0)?);
        sync_dir(dir)?;
    }
    Ok(Partition {
        id,
        dir: dir.to_path_buf(),
        state: Mutex::new(PartitionState {
            segments,
            dirty: false,
        }),
    })
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
        if let Err(e) = self.flush() {
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

    fn flush(&self) -> Result<(), LogError> {
        let topics: Vec<Arc<Topic>> = self.topics.read().values().cloned().collect();
        for t in topics {
            for p in &t.partitions {
                let mut st = p.state.lock();
                if st.dirty {
                    let seg = st.active();
                    seg.file
                        .sync_data()
                        .map_err(|e| LogError::io(&seg.path, e))?;
                    st.dirty = false;
                }
            }
        }
        Ok(())
    }

    fn enforce_retention(&self) {
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
        let topic = open_topic(&final_dir, name)?;
        topics.insert(name.to_string(), Arc::new(topic));
        tracing::info!(topic = name, partitions, "Created topic.");
        Ok(true)
    }

    fn produce(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
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
                offset: 0
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
                    offset,
                };
            }
            active
                .file
                .write_all_at(&buf, start_pos)
                .map_err(|e| LogError::io(&active.path, e))?;
            if self.opts.fsync == FsyncPolicy::Always {
                active
                    .file
                    .sync_data()
                    .map_err(|e| LogError::io(&active.path, e))?;
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

    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
        max_bytes: usize,
        out: &mut Vec<Message>,
    ) -> Result<(), LogError> {
        let t = self.topic(topic)?;
        let part = self.partition(&t, partition)?;
        let views: Vec<ReadView> = {
            let st = part.state.lock();
            let (low, high) = (st.low(), st.high());
            if offset < low {
                return Err(LogError::OffsetOutOfRange {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    earliest: low,
                });
            }
            if offset >= high {
                return Ok(());
            }
            let first = st.segments.partition_point(|s| s.base <= offset).max(1) - 1;
            st.segments[first..]
                .iter()
                .enumerate()
                .map(|(i, s)| ReadView {
                    file: s.file.clone(),
                    path: s.path.clone(),
                    start: if i == 0 { s.position_for(offset) } else { 0 },
                    end: s.len,
                })
                .collect()
        };
        let before = out.len();
        for view in &views {
            if out.len() - before >= max {
                break;
            }
            let remaining = max - (out.len() - before);
            segment::read_frames(view, topic, partition, offset, remaining, max_bytes, out)?;
        }
        Ok(())
    }

    fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError> {
        let t = self.topic(topic)?;
        Ok(t.partitions
            .iter()
            .map(|p| {
                let st = p.state.lock();
                Watermarks {
                    partition: p.id,
                    low: st.low(),
                    high: st.high(),
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
            f.write_all_at(&body, 0)?;
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
        offset: u64,
        max: usize,
    ) -> Result<Vec<Message>, LogError> {
        let inner = self.inner.clone();
        let topic = topic.to_string();
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
    ) -> Result<Vec<(u32, Option<u64>)>, LogError> {
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
                (p, offsets.get(&tp).copied())
            })
            .collect())
    }
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
        for tp in assigned {
            let low = self
                .inner
                .topic(&tp.topic)
                .ok()
                .and_then(|t| {
                    t.partitions
                        .get(tp.partition as usize)
                        .map(|p| p.state.lock().low())
                })
                .unwrap_or(0);
            let pos = committed.get(&tp).copied().unwrap_or(low).max(low);
            positions.insert(tp, pos);
        }
        tracing::debug!(group = %self.group, member = self.member, generation, partitions = positions.len(), "Took up a new assignment.");
        self.positions = positions;
        self.generation = generation;
        Ok(())
    }

    fn read(&mut self, max: usize) -> Result<Vec<Message>, LogError> {
        let mut out = Vec::new();
        let tps: Vec<TopicPartition> = self.positions.keys().cloned().collect();
        if tps.is_empty() {
            return Ok(out);
        }
        let start = self.next_start % tps.len();
        self.next_start = self.next_start.wrapping_add(1);
        for i in 0..tps.len() {
            if out.len() >= max {
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
                Ok(()) => {}
                Err(LogError::OffsetOutOfRange { earliest, .. }) => {
                    tracing::warn!(topic = %tp.topic, partition = tp.partition, from = pos, to = earliest, "Committed offset was deleted by retention; continuing from the earliest stored.");
                    self.positions.insert(tp.clone(), earliest);
                    continue;
                }
                Err(e) => return Err(e),
            }
            if let Some(last) = out[before..].last() {
                self.positions.insert(tp.clone(), last.offset + 1);
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
        let offsets = inner.group_offsets(&self.group, g)?;
        let mut updated = offsets.clone();
        for c in commits {
            updated.insert(
                TopicPartition {
                    topic: c.topic.clone(),
                    partition: c.partition,
                },
                c.next_offset,
            );
        }
        inner.store_offsets(&self.group, &updated)?;
        *offsets = updated;
        Ok(())
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
