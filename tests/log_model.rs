//! A model-based test of the embedded log: proptest drives random sequences
//! of produce, poll, commit, clean reopen, crash (the files as a killed
//! process leaves them), a torn tail, a flipped byte, and a disk that fails
//! a write part-way (ENOSPC) or a sync (EIO) under a produce or a commit,
//! with fsync on every write or in the background; and checks the log
//! against a simple model of what was acknowledged:
//!
//! - every acknowledged record is readable with its value, or lies in a
//!   damaged range the log reported (and quarantined): never silently gone;
//! - the consumer group never skips an acknowledged record: each one is
//!   delivered, or reported damaged;
//! - committed offsets never pass unread records (a commit covers only what
//!   was delivered, and after a crash the group starts from its commit);
//! - an offset is never given out twice, whatever was lost.
//!
//! CI runs a bounded number of cases; `PROPTEST_CASES=2000 cargo test --test
//! log_model` runs more.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use proptest::prelude::*;
use sift::backends::log::embedded::Policies;
use sift::backends::log::faults::{self, DiskOp};
use sift::backends::log::{
    partition_for_key, Commit, Consumer, EmbeddedLog, Log, Message, Offset, Record,
};
use sift::config::{EmbeddedLogConfig, FsyncPolicy, OffsetOutOfRange, OnCorruption};

const TOPIC: &str = "model";
const GROUP: &str = "model-group";
const PARTITIONS: u32 = 2;

#[derive(Debug, Clone)]
enum Op {
    /// Produce `count` records to one partition.
    Produce { partition: u32, count: u8 },
    /// Poll up to `max` records.
    Poll { max: u8 },
    /// Commit everything delivered since the last commit.
    Commit,
    /// Close and open again.
    Reopen,
    /// Continue from the files as a killed process leaves them.
    Crash,
    /// Crash, then cut bytes off the end of a partition's last segment.
    Truncate { partition: u32, bytes: u16 },
    /// Crash, then flip a byte of one of a partition's segments.
    Flip {
        partition: u32,
        segment: u8,
        at_permille: u16,
    },
    /// A produce to one partition whose write fails part-way (or, with
    /// fsync on every write, whose sync fails): an error, nothing acknowledged.
    FailedProduce {
        partition: u32,
        count: u8,
        sync: bool,
    },
    /// A commit whose offsets file cannot be written: an error, and the
    /// group's committed offsets stay where they were.
    FailedCommit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..PARTITIONS, 1u8..12).prop_map(|(partition, count)| Op::Produce { partition, count }),
        4 => (1u8..30).prop_map(|max| Op::Poll { max }),
        3 => Just(Op::Commit),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => (0..PARTITIONS, 1u16..300).prop_map(|(partition, bytes)| Op::Truncate { partition, bytes }),
        1 => (0..PARTITIONS, any::<u8>(), 0u16..1000).prop_map(|(partition, segment, at_permille)| Op::Flip { partition, segment, at_permille }),
        1 => (0..PARTITIONS, 1u8..12, any::<bool>()).prop_map(|(partition, count, sync)| Op::FailedProduce { partition, count, sync }),
        1 => Just(Op::FailedCommit),
    ]
}

fn options(fsync: FsyncPolicy) -> EmbeddedLogConfig {
    EmbeddedLogConfig {
        segment_bytes: 1024,
        retention_bytes: 0,
        retention_age: Duration::ZERO,
        fsync,
        ..EmbeddedLogConfig::default()
    }
}

fn policies() -> Policies {
    Policies {
        on_offset_out_of_range: OffsetOutOfRange::Fail,
        on_corruption: OnCorruption::Skip,
        dlq_partitions: 1,
    }
}

/// A key for each partition.
fn keys() -> Vec<String> {
    (0..PARTITIONS)
        .map(|p| {
            (0..)
                .map(|i| format!("key-{i}"))
                .find(|k| partition_for_key(k.as_bytes(), PARTITIONS) == p)
                .unwrap_or_default()
        })
        .collect()
}

/// What was acknowledged, delivered and reported.
#[derive(Default)]
struct Model {
    /// Per partition: offset → value of every acknowledged record.
    acked: BTreeMap<u32, BTreeMap<u64, String>>,
    /// Values delivered to the group, ever.
    delivered: BTreeSet<String>,
    /// Per partition: offset ranges reported damaged (from, to exclusive; None open).
    damaged: BTreeMap<u32, Vec<(u64, Option<u64>)>>,
    /// Values produced so far (each one unique).
    produced: u64,
}

impl Model {
    /// `count` new records under `key`, each with a value never used before.
    fn records(&mut self, key: &str, count: u8) -> Vec<Record> {
        (0..count)
            .map(|_| {
                self.produced += 1;
                Record::new(key.to_owned(), format!("v{}", self.produced))
            })
            .collect()
    }

    fn in_damage(&self, partition: u32, offset: u64) -> bool {
        self.damaged.get(&partition).is_some_and(|ranges| {
            ranges
                .iter()
                .any(|(from, to)| offset >= *from && to.is_none_or(|t| offset < t))
        })
    }

    fn note_damage(&mut self, log: &EmbeddedLog) -> Result<()> {
        for r in log.describe()? {
            if r.topic != TOPIC {
                continue;
            }
            for d in r.damaged {
                ensure!(
                    d.quarantine.is_some() || d.bytes == 0,
                    "damage left unrepaired: {d:?}"
                );
                let from = d.after_offset.map_or(0, |o| o + 1);
                let entry = self.damaged.entry(r.partition).or_default();
                if !entry.contains(&(from, d.before_offset)) {
                    entry.push((from, d.before_offset));
                }
            }
        }
        Ok(())
    }
}

/// The log and its one consumer, in a folder that a crash replaces.
struct World {
    root: PathBuf,
    fsync: FsyncPolicy,
    generation: u32,
    log: Option<EmbeddedLog>,
    consumer: Option<Box<dyn Consumer>>,
    /// Delivered and not yet committed.
    uncommitted: Vec<Message>,
}

impl World {
    fn dir(&self) -> PathBuf {
        self.root.join(format!("log-{}", self.generation))
    }

    async fn open(&mut self, model: &mut Model) -> Result<()> {
        let log = EmbeddedLog::open_with(&self.dir(), options(self.fsync), policies())?;
        log.create_topic(TOPIC, PARTITIONS).await?;
        model.note_damage(&log)?;
        self.consumer = Some(log.subscribe(GROUP, &[TOPIC]).await?);
        self.log = Some(log);
        self.uncommitted.clear();
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        if let Some(c) = self.consumer.take() {
            c.close().await?;
        }
        self.log = None;
        // The flusher thread may hold the last handle for one more sync.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir().join(".lock"))?;
        for _ in 0..500 {
            if lock.try_lock().is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        anyhow::bail!("the log stayed locked")
    }

    /// The files as a killed process leaves them: copied while the log is
    /// open, then the copy is used; the consumer's uncommitted reads are lost.
    async fn crash(&mut self) -> Result<()> {
        let from = self.dir();
        self.generation += 1;
        copy_dir(&from, &self.dir())?;
        self.consumer = None;
        self.log = None;
        self.uncommitted.clear();
        Ok(())
    }

    fn partition_dir(&self, partition: u32) -> PathBuf {
        self.dir().join(TOPIC).join(partition.to_string())
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if entry.file_name() != ".lock" {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn segment_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    out.sort();
    Ok(out)
}

async fn run(ops: Vec<Op>, fsync: FsyncPolicy) -> Result<()> {
    let root = tempfile::tempdir()?;
    let keys = keys();
    let mut model = Model::default();
    let mut world = World {
        root: root.path().to_path_buf(),
        fsync,
        generation: 0,
        log: None,
        consumer: None,
        uncommitted: Vec::new(),
    };
    world.open(&mut model).await?;
    for op in ops {
        match op {
            Op::Produce { partition, count } => {
                let log = world.log.as_ref().context("open")?;
                let records = model.records(&keys[partition as usize], count);
                let values: Vec<String> = records
                    .iter()
                    .map(|r| String::from_utf8_lossy(&r.value).into_owned())
                    .collect();
                let positions = log.produce(TOPIC, records).await?;
                let acked = model.acked.entry(partition).or_default();
                let highest = acked.keys().next_back().copied();
                for (p, v) in positions.iter().zip(values) {
                    ensure!(p.partition == partition);
                    ensure!(
                        highest.is_none_or(|h| p.offset > h),
                        "offset {} of partition {partition} given out again (highest so far {highest:?})",
                        p.offset
                    );
                    acked.insert(dense(&p.offset), v);
                }
            }
            Op::Poll { max } => {
                let consumer = world.consumer.as_mut().context("open")?;
                let batch = consumer
                    .poll(max as usize, Duration::from_millis(1))
                    .await?;
                let log = world.log.as_ref().context("open")?;
                model.note_damage(log)?;
                for m in batch {
                    let value = String::from_utf8_lossy(&m.value).into_owned();
                    let acked = model
                        .acked
                        .get(&m.partition)
                        .and_then(|a| a.get(&dense(&m.offset)));
                    ensure!(
                        acked == Some(&value),
                        "delivered {value} at {}/{}, acknowledged there: {acked:?}",
                        m.partition,
                        m.offset
                    );
                    model.delivered.insert(value);
                    world.uncommitted.push(m);
                }
            }
            Op::Commit => {
                let consumer = world.consumer.as_mut().context("open")?;
                let commits = Commit::after(&world.uncommitted);
                consumer.commit(&commits).await?;
                world.uncommitted.clear();
            }
            Op::FailedProduce {
                partition,
                count,
                sync,
            } => {
                let log = world.log.as_ref().context("open")?;
                let under = world.partition_dir(partition);
                let op = if sync && fsync == FsyncPolicy::Always {
                    DiskOp::Sync
                } else {
                    DiskOp::Write
                };
                faults::inject(&under, op, 1);
                let records = model.records(&keys[partition as usize], count);
                let result = log.produce(TOPIC, records).await;
                let unspent = faults::clear(&under);
                ensure!(
                    result.is_err() && unspent == 0,
                    "a produce under a failing disk ({op:?}) returned {result:?}"
                );
            }
            Op::FailedCommit => {
                let under = world.dir().join("~offsets");
                faults::inject(&under, DiskOp::Write, 1);
                let consumer = world.consumer.as_mut().context("open")?;
                let commits = Commit::after(&world.uncommitted);
                let result = consumer.commit(&commits).await;
                let unspent = faults::clear(&under);
                // It failed, or it had nothing new to write.
                ensure!(
                    result.is_err() == (unspent == 0),
                    "a commit under a failing disk returned {result:?} ({unspent} failures unspent)"
                );
            }
            Op::Reopen => {
                world.close().await?;
                world.open(&mut model).await?;
            }
            Op::Crash => {
                world.crash().await?;
                world.open(&mut model).await?;
            }
            Op::Truncate { partition, bytes } => {
                // A file cut while the log was closed (any length: whole
                // records too); a crash tears at most the record being
                // written, which `bytes % 8 + 1` stays inside.
                let torn = bytes % 2 == 0;
                let bytes = if torn {
                    world.crash().await?;
                    bytes % 8 + 1
                } else {
                    world.close().await?;
                    bytes
                };
                if let Some(last) = segment_files(&world.partition_dir(partition))?.pop() {
                    let len = std::fs::metadata(&last)?.len();
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&last)?
                        .set_len(len.saturating_sub(u64::from(bytes)))?;
                }
                world.open(&mut model).await?;
            }
            Op::Flip {
                partition,
                segment,
                at_permille,
            } => {
                world.crash().await?;
                let segs = segment_files(&world.partition_dir(partition))?;
                if !segs.is_empty() {
                    let seg = &segs[segment as usize % segs.len()];
                    let mut bytes = std::fs::read(seg)?;
                    if !bytes.is_empty() {
                        let last = bytes.len() - 1;
                        let at = (bytes.len() * usize::from(at_permille) / 1000).min(last);
                        bytes[at] ^= 0x41;
                        std::fs::write(seg, bytes)?;
                    }
                }
                world.open(&mut model).await?;
            }
        }
    }

    // Drain: every acknowledged record is delivered or reported damaged.
    world.close().await?;
    world.open(&mut model).await?;
    let mut idle = 0;
    while idle < 3 {
        let consumer = world.consumer.as_mut().context("open")?;
        let batch = consumer.poll(1000, Duration::from_millis(5)).await?;
        idle = if batch.is_empty() { idle + 1 } else { 0 };
        for m in &batch {
            model
                .delivered
                .insert(String::from_utf8_lossy(&m.value).into_owned());
        }
        consumer.commit(&Commit::after(&batch)).await?;
        model.note_damage(world.log.as_ref().context("open")?)?;
    }
    let log = world.log.as_ref().context("open")?;
    // Everything still readable, per partition.
    let mut readable: BTreeMap<u32, BTreeMap<u64, String>> = BTreeMap::new();
    for w in log.watermarks(TOPIC).await? {
        let mut at = w.low;
        while at < w.high {
            let batch = log.fetch(TOPIC, w.partition, &at, 1000).await?;
            let Some(last) = batch.last() else { break };
            at = last.offset.next();
            for m in batch {
                readable.entry(w.partition).or_default().insert(
                    dense(&m.offset),
                    String::from_utf8_lossy(&m.value).into_owned(),
                );
            }
        }
    }
    // Reading found and quarantined what the group had no need to read again.
    model.note_damage(log)?;
    for (partition, acked) in &model.acked {
        for (offset, value) in acked {
            let ok = readable.get(partition).and_then(|r| r.get(offset)) == Some(value)
                || model.in_damage(*partition, *offset);
            ensure!(
                ok,
                "record {value} at {partition}/{offset} is gone without a report (damaged: {:?})",
                model.damaged.get(partition)
            );
            ensure!(
                model.delivered.contains(value) || model.in_damage(*partition, *offset),
                "the group skipped {value} at {partition}/{offset}"
            );
        }
    }
    world.close().await?;
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_log_never_loses_or_skips_an_acknowledged_record(
        ops in proptest::collection::vec(op(), 1..60),
        always in any::<bool>(),
    ) {
        let fsync = if always { FsyncPolicy::Always } else { FsyncPolicy::Interval };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        runtime
            .block_on(run(ops, fsync))
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    }
}

/// Cases the property found, kept as they were shrunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn found_a_flipped_length_at_the_start_of_a_segment() -> Result<()> {
    let mut ops: Vec<Op> = [7u8, 6, 7, 5]
        .into_iter()
        .map(|count| Op::Produce {
            partition: 1,
            count,
        })
        .collect();
    ops.extend([
        Op::Poll { max: 20 },
        Op::Commit,
        Op::Flip {
            partition: 1,
            segment: 6,
            at_permille: 0,
        },
    ]);
    run(ops, FsyncPolicy::Interval).await
}

/// The embedded log's offsets, which always fit in 64 bits.
fn dense(offset: &Offset) -> u64 {
    offset.as_u64().expect("embedded offsets fit in 64 bits")
}
