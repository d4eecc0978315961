//! The log: named topics split into partitions, each an ordered sequence of
//! records with offsets; consumer groups share a topic's partitions among
//! their members and commit how far they got.
//!
//! Production uses Kafka; the embedded default keeps segment files under the
//! data directory with the same semantics (key-hashed partitioning, headers,
//! group assignment and rebalance, committed offsets, retention).

pub mod check;
pub mod embedded;
pub mod faults;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "kinesis")]
pub mod kinesis;
mod offset;
pub mod prefixed;
mod segment;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

pub use embedded::EmbeddedLog;
pub use offset::{Offset, ParseOffsetError};

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The topic does not exist.
    #[error("topic `{0}` does not exist; create it with `sift topics create {0}`")]
    NoSuchTopic(String),
    /// A topic or group name is not usable.
    #[error(
        "invalid {what} name `{name}`: use 1-249 characters of a-z, A-Z, 0-9, `.`, `_` and `-`"
    )]
    InvalidName {
        /// "topic" or "group".
        what: &'static str,
        /// The offending name.
        name: String,
    },
    /// A partition number beyond the topic's partitions.
    #[error("topic `{topic}` has {partitions} partitions; partition {partition} does not exist")]
    NoSuchPartition {
        /// Topic.
        topic: String,
        /// Requested partition.
        partition: u32,
        /// Partitions the topic has.
        partitions: u32,
    },
    /// The requested offset was deleted by retention.
    #[error(
        "offset {offset} of {topic}/{partition} is gone (retention); earliest is {earliest}; \
         move the group on with `sift topics offsets GROUP --topic {topic} --reset-to earliest`, \
         or set log.on_offset_out_of_range"
    )]
    OffsetOutOfRange {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Requested offset.
        offset: Offset,
        /// Earliest offset still stored.
        earliest: Offset,
    },
    /// A group's committed offset lies beyond the end of a partition: the
    /// records it passed are not there (lost, or the offsets belong to
    /// another log), and new records would be skipped up to it.
    #[error(
        "group `{group}` has committed offset {committed} on {topic}/{partition}, beyond its end \
         {end}: the records it had read are not in the log any more (see `sift topics describe \
         {topic}`); once you know why, move the group with `sift topics offsets {group} --topic \
         {topic} --reset-to earliest|latest|OFFSET`, or set log.on_offset_out_of_range"
    )]
    OffsetBeyondEnd {
        /// Group.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The committed offset.
        committed: Offset,
        /// The partition's end (next offset to be written).
        end: Offset,
    },
    /// A record is larger than the log accepts.
    #[error("record of {size} bytes exceeds the {max}-byte limit for topic `{topic}`")]
    RecordTooLarge {
        /// Topic.
        topic: String,
        /// Encoded size.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// The consumer's group rebalanced since its last poll; poll again before committing.
    #[error("group `{group}` rebalanced: {topic}/{partition} is no longer assigned to this member; poll again and reprocess")]
    NotAssigned {
        /// Group.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// Stored data failed its checksum outside the tail a crash can tear.
    #[error(
        "log data corrupt in {path} at byte {position}: {detail}; `sift log check --repair` moves \
         the damaged range to a quarantine file and keeps the intact records, or set \
         log.on_corruption = \"skip\" to do that as it is read"
    )]
    Corrupt {
        /// Segment file.
        path: String,
        /// Byte position of the bad frame.
        position: u64,
        /// What check failed.
        detail: String,
    },
    /// Another process has the embedded log open.
    #[error(
        "the log at {path} is in use by another sift process; stop it or use another --data-dir"
    )]
    Locked {
        /// Log directory.
        path: String,
    },
    /// A file operation failed.
    #[error("log I/O at {path}: {source}")]
    Io {
        /// File or directory involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The log server failed or could not be reached.
    #[error("log backend error: {0}")]
    Backend(String),
    /// The backend was configured but this build lacks its feature.
    #[error("log backend `{backend}` is not available in this build: rebuild sift with `--features {feature}`")]
    FeatureDisabled {
        /// Configured backend.
        backend: &'static str,
        /// Cargo feature that provides it.
        feature: &'static str,
    },
}

impl LogError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        LogError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// A record to produce.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// Partitioning key: records with the same key land in the same partition, in order.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Bytes,
    /// Headers, in order (names may repeat).
    pub headers: Vec<(String, Bytes)>,
}

impl Record {
    /// A keyed record without headers.
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Record {
            key: Some(key.into()),
            value: value.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A consumed record with its place in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: Offset,
    /// When it was produced, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Partitioning key.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Bytes,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
}

impl Message {
    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// Where a produced record landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: Offset,
}

/// A topic and its partition count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
}

/// The offsets a partition holds: `low..high`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Watermarks {
    /// Partition.
    pub partition: u32,
    /// Earliest offset still stored.
    pub low: Offset,
    /// Offset the next record will get.
    pub high: Offset,
}

/// A partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TopicPartition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
}

/// A group's progress on one partition: the offset of the next record to consume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Commit {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Next offset to consume (last processed + 1).
    pub next_offset: Offset,
}

impl Commit {
    /// The commits that mark every message of a batch as processed (the highest per partition).
    pub fn after(messages: &[Message]) -> Vec<Commit> {
        let mut best: std::collections::BTreeMap<(&str, u32), Offset> = Default::default();
        for m in messages {
            let next = m.offset.next();
            let e = best
                .entry((m.topic.as_str(), m.partition))
                .or_insert(Offset::ZERO);
            if next > *e {
                *e = next;
            }
        }
        best.into_iter()
            .map(|((topic, partition), next_offset)| Commit {
                topic: topic.to_string(),
                partition,
                next_offset,
            })
            .collect()
    }

    /// The partition it commits and the offset it commits there.
    pub fn entry(&self) -> (TopicPartition, Offset) {
        (
            TopicPartition {
                topic: self.topic.clone(),
                partition: self.partition,
            },
            self.next_offset.clone(),
        )
    }
}

/// The largest record (key + value + headers) any log backend accepts; Kafka's
/// default `message.max.bytes` is about this.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// The most records [`Log::count`] reads to count on a log whose offsets
/// are not dense.
pub const COUNT_LIMIT: u64 = 1_000;

/// A log backend.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Creates a topic; returns false if it already existed (its partitions unchanged).
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<bool, LogError>;
    /// Every topic, sorted by name.
    async fn list_topics(&self) -> Result<Vec<TopicInfo>, LogError>;
    /// Appends records: keyed ones to the partition their key hashes to, others
    /// spread round-robin. Returns where each landed, in input order, once stored.
    async fn produce(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError>;
    /// The stored offset range of every partition of a topic.
    async fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError>;
    /// Reads up to `max` records of one partition from `offset`, without a group
    /// and without waiting (an empty result means nothing at or after `offset` yet).
    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: &Offset,
        max: usize,
    ) -> Result<Vec<Message>, LogError>;
    /// How many records one partition holds from `from` up to `to`: the
    /// lag of a group committed at `from` when `to` is the high watermark.
    /// Offsets are dense on Kafka and the embedded log, so this is `to -
    /// from`. On Kinesis, whose sequence numbers are not, the records are
    /// counted by reading, up to [`COUNT_LIMIT`] per call: past it, a
    /// lower bound.
    async fn count(
        &self,
        _topic: &str,
        _partition: u32,
        from: &Offset,
        to: &Offset,
    ) -> Result<u64, LogError> {
        Ok(from.until(to))
    }
    /// Joins consumer group `group` on `topics`; the group rebalances its
    /// partitions among its members as they join and leave.
    async fn subscribe(&self, group: &str, topics: &[&str]) -> Result<Box<dyn Consumer>, LogError>;
    /// The committed offsets of a group on a topic, per partition (None = never committed).
    async fn committed(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(u32, Option<Offset>)>, LogError>;
    /// Sets a group's committed offsets, while none of its members runs
    /// (`sift topics offsets GROUP --reset-to …`).
    async fn set_committed(&self, group: &str, commits: &[Commit]) -> Result<(), LogError>;
}

/// A member of a consumer group.
#[async_trait]
pub trait Consumer: Send {
    /// Waits up to `timeout` for records on the partitions assigned to this
    /// member, starting after the group's committed offsets. Rebalances happen here.
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Message>, LogError>;
    /// Commits progress; only partitions currently assigned to this member.
    async fn commit(&mut self, commits: &[Commit]) -> Result<(), LogError>;
    /// Partitions assigned to this member as of the last poll.
    fn assignment(&self) -> Vec<TopicPartition>;
    /// Leaves the group, handing its partitions to the remaining members.
    async fn close(self: Box<Self>) -> Result<(), LogError>;
}

/// Checks a topic or group name (the Kafka rules).
pub fn validate_name(what: &'static str, name: &str) -> Result<(), LogError> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LogError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

/// The embedded log's partition for a key: CRC-32 of the key modulo the
/// partition count, stable across runs and versions. The Kafka backend leaves
/// this to the producer (murmur2, as the Java client does), so the same key may
/// land in a different partition number there; each backend is consistent with
/// itself, which is all ordering per key needs.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    crc32fast::hash(key) % partitions.max(1)
}
