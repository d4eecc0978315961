//! Kinesis Data Streams as the log (feature `kinesis`).
//!
//! A topic is a stream (`log.kinesis.stream_prefix` + the topic's name), a
//! partition is a shard (shard `shardId-000000000003` is partition 3), and an
//! offset is a record's sequence number within its shard: a decimal of up to
//! 129 digits, increasing but not dense, so it travels as an [`Offset`] and
//! never as a `u64`. The record key is the partition key, so one document's
//! records stay in one shard, in order.
//!
//! Kinesis records carry no headers: each record's data is a small frame
//! (`sift\x01`, the key, the headers, then the value), so a message reads
//! back exactly as it was produced. Data that does not start with the frame's
//! magic (another producer's) reads as a value without headers, keyed by its
//! partition key.
//!
//! Produce uses `PutRecords` (at most 500 records and 5 MiB per call). A
//! partly failed call is retried for the failed entries only, after a backoff
//! when Kinesis refused them for throughput (counted in
//! `sift_log_throttled_records_total`). One call carries at most one record of
//! each key, and a key's next record goes only once the one before it is
//! stored, so a retry never puts a key's records out of order.
//!
//! Consumer groups keep their leases and checkpoints in DynamoDB, as the
//! Kinesis Client Library does: see [`consumer`] for how a member works and
//! [`leases`] for the table's layout and the rules of taking leases.

pub mod consumer;
pub mod leases;
pub mod table;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_kinesis::error::DisplayErrorContext;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{
    PutRecordsRequestEntry, Shard, ShardIteratorType, StreamMode, StreamModeDetails, StreamStatus,
};
use aws_sdk_kinesis::Client;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

use super::{
    validate_name, Commit, Consumer, LogError, Message, Offset, Position, Record, TopicInfo,
    Watermarks, MAX_RECORD_BYTES,
};
use crate::config::{KinesisConfig, KinesisMode};

/// The first bytes of a record's data that sift framed.
const MAGIC: &[u8] = b"sift\x01";
/// Key length that says "no key".
const NO_KEY: u32 = u32::MAX;
/// `PutRecords` limits per call.
const PUT_RECORDS: usize = 500;
const PUT_BYTES: usize = 5 * 1024 * 1024;
/// Kinesis's limit on one record: data plus partition key.
const KINESIS_RECORD_BYTES: usize = 1024 * 1024;
/// Longest partition key Kinesis accepts, in characters.
const PARTITION_KEY_CHARS: usize = 256;
/// Longest stream name.
const STREAM_NAME_CHARS: usize = 128;
/// `GetRecords` returns at most this many records per call.
const GET_RECORDS: usize = 10_000;
/// Calls one fetch makes before it answers with what it has: Kinesis may
/// answer empty while records lie further on.
const FETCH_CALLS: usize = 20;
/// Produce attempts without any progress before giving up.
const PUT_ATTEMPTS: u32 = 30;
/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long to wait for a new stream to become ACTIVE.
const ACTIVE_WAIT: Duration = Duration::from_secs(120);

/// The log on Kinesis Data Streams. Clones share their clients and caches.
#[derive(Clone)]
pub struct KinesisLog {
    client: Client,
    /// The lease tables' DynamoDB.
    dynamodb: aws_sdk_dynamodb::Client,
    config: KinesisConfig,
    /// Where the API is, for messages.
    location: String,
    /// Partition keys for records without a key.
    round_robin: Arc<AtomicU64>,
    /// The highest sequence number this process knows of, per (stream,
    /// shard id): where looking for a shard's end starts.
    tails: Arc<Mutex<HashMap<(String, String), Offset>>>,
}

impl std::fmt::Debug for KinesisLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KinesisLog")
            .field("location", &self.location)
            .finish()
    }
}

impl KinesisLog {
    /// Builds the client from the AWS chain (region and endpoint from the
    /// config) and checks that the API answers.
    pub async fn connect(config: &KinesisConfig) -> Result<Self, LogError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()));
        if !config.endpoint.is_empty() {
            loader = loader.endpoint_url(&config.endpoint);
        }
        let shared = loader.load().await;
        let location = if config.endpoint.is_empty() {
            format!("AWS Kinesis ({})", config.region)
        } else {
            config.endpoint.clone()
        };
        let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(&shared);
        if !config.dynamodb_endpoint.is_empty() {
            dynamodb = dynamodb.endpoint_url(&config.dynamodb_endpoint);
        }
        let log = KinesisLog {
            client: Client::new(&shared),
            dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.build()),
            config: config.clone(),
            location,
            round_robin: Arc::new(AtomicU64::new(0)),
            tails: Arc::new(Mutex::new(HashMap::new())),
        };
        log.client
            .list_streams()
            .limit(1)
            .send()
            .await
            .map_err(|e| log.error("listing streams", e))?;
        Ok(log)
    }

    fn error<E>(&self, what: &str, e: E) -> LogError
    where
        E: std::error::Error + 'static,
    {
        LogError::Backend(format!(
            "Kinesis at {}: {what}: {}",
            self.location,
            DisplayErrorContext(&e)
        ))
    }

    /// A call on a topic's stream failed: the topic does not exist when the
    /// stream is `missing`, else the error as it came.
    fn stream_error<E>(&self, topic: &str, missing: bool, what: &str, e: E) -> LogError
    where
        E: std::error::Error + 'static,
    {
        if missing {
            LogError::NoSuchTopic(topic.to_string())
        } else {
            self.error(what, e)
        }
    }

    /// The stream a topic lives in.
    fn stream(&self, topic: &str) -> Result<String, LogError> {
        validate_name("topic", topic)?;
        let name = format!("{}{topic}", self.config.stream_prefix);
        if name.len() > STREAM_NAME_CHARS {
            return Err(LogError::InvalidName {
                what: "topic",
                name: format!(
                    "{name} (a Kinesis stream name has at most {STREAM_NAME_CHARS} characters)"
                ),
            });
        }
        Ok(name)
    }

    /// Every shard of a stream, open or closed, by partition number.
    async fn shards(&self, topic: &str) -> Result<Vec<(u32, Shard)>, LogError> {
        let stream = self.stream(topic)?;
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let call = match &token {
                Some(t) => self.client.list_shards().next_token(t),
                None => self.client.list_shards().stream_name(&stream),
            };
            let page = call.send().await.map_err(|e| {
                let missing = e
                    .as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception());
                self.stream_error(
                    topic,
                    missing,
                    &format!("listing the shards of stream {stream}"),
                    e,
                )
            })?;
            for shard in page.shards() {
                out.push((shard_number(shard.shard_id())?, shard.clone()));
            }
            match page.next_token() {
                Some(t) => token = Some(t.to_string()),
                None => break,
            }
        }
        out.sort_by_key(|(n, _)| *n);
        Ok(out)
    }

    async fn shard(&self, topic: &str, partition: u32) -> Result<Shard, LogError> {
        let shards = self.shards(topic).await?;
        let count = shards.len() as u32;
        shards
            .into_iter()
            .find(|(n, _)| *n == partition)
            .map(|(_, s)| s)
            .ok_or_else(|| LogError::NoSuchPartition {
                topic: topic.to_string(),
                partition,
                partitions: count,
            })
    }

    /// Waits until a stream is ACTIVE (created, or resharded).
    async fn wait_active(&self, stream: &str) -> Result<(), LogError> {
        let deadline = tokio::time::Instant::now() + ACTIVE_WAIT;
        loop {
            let summary = self
                .client
                .describe_stream_summary()
                .stream_name(stream)
                .send()
                .await
                .map_err(|e| self.error(&format!("describing stream {stream}"), e))?;
            let status = summary
                .stream_description_summary()
                .map(|s| s.stream_status().clone());
            if status == Some(StreamStatus::Active) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(LogError::Backend(format!(
                    "Kinesis at {}: stream {stream} is still {status:?} after {} s",
                    self.location,
                    ACTIVE_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The partition key of a record: its key when Kinesis takes it as one,
    /// else a hash of it (the same key, the same shard); a counter for a
    /// record without a key, which spreads them over the shards.
    fn partition_key(&self, key: Option<&Bytes>) -> String {
        match key {
            Some(k) => match std::str::from_utf8(k) {
                Ok(s) if !s.is_empty() && s.chars().count() <= PARTITION_KEY_CHARS => s.to_owned(),
                _ => format!("{:032x}", xxhash_rust::xxh3::xxh3_128(k)),
            },
            None => format!("r{}", self.round_robin.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// An iterator that reads shard `shard_id` of `stream` (which starts at
    /// `start`) from `offset`: its records at `offset` or after.
    async fn iterator_from(
        &self,
        stream: &str,
        shard_id: &str,
        start: &Offset,
        offset: &Offset,
    ) -> Result<Option<String>, LogError> {
        let ask = |kind: ShardIteratorType, at: Option<String>| {
            self.client
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(shard_id)
                .shard_iterator_type(kind)
                .set_starting_sequence_number(at)
                .send()
        };
        if offset <= start {
            let out = ask(ShardIteratorType::TrimHorizon, None)
                .await
                .map_err(|e| self.error("opening a shard iterator", e))?;
            return Ok(out.shard_iterator().map(str::to_owned));
        }
        // `offset` is a record's sequence number (read at it) or one past a
        // record's (read after that record). Kinesis accepts only sequence
        // numbers it gave out, so one of the two is refused as invalid.
        let at = ask(
            ShardIteratorType::AtSequenceNumber,
            Some(offset.to_string()),
        )
        .await;
        match at {
            Ok(out) => Ok(out.shard_iterator().map(str::to_owned)),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_invalid_argument_exception()) =>
            {
                let before = offset.prev().unwrap_or(Offset::ZERO);
                let out = ask(
                    ShardIteratorType::AfterSequenceNumber,
                    Some(before.to_string()),
                )
                .await
                .map_err(|e| {
                    self.error(
                        &format!(
                            "offset {offset} is neither a record of shard {shard_id} nor one past a record"
                        ),
                        e,
                    )
                })?;
                Ok(out.shard_iterator().map(str::to_owned))
            }
            Err(e) => Err(self.error("opening a shard iterator", e)),
        }
    }

    /// Reads up to `max` records with `iterator`; stops early at the shard's
    /// end or once Kinesis says nothing newer is stored.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        mut iterator: Option<String>,
        max: usize,
    ) -> Result<Vec<Message>, LogError> {
        let mut out = Vec::new();
        for _ in 0..FETCH_CALLS {
            let Some(it) = iterator.take() else { break };
            if out.len() >= max {
                break;
            }
            let page = self
                .client
                .get_records()
                .shard_iterator(it)
                .limit((max - out.len()).min(GET_RECORDS) as i32)
                .send()
                .await
                .map_err(|e| self.error("reading records", e))?;
            for r in page.records() {
                out.push(decode(topic, partition, r)?);
            }
            iterator = page.next_shard_iterator().map(str::to_owned);
            let caught_up = page.millis_behind_latest().unwrap_or(0) == 0;
            if caught_up && page.records().is_empty() {
                break;
            }
        }
        out.truncate(max);
        Ok(out)
    }

    /// The offset after a shard's last record (its start when it holds none).
    /// Kinesis does not say, so it is read: from the last record this
    /// process knows of in the shard (produced, read or found here before),
    /// or the shard's start the first time. (Reading back from a timestamp
    /// would be cheaper on a cold start, but kinesalite never answers an
    /// `AT_TIMESTAMP` iterator on a shard with nothing after the timestamp.)
    async fn end_of(&self, stream: &str, shard: &Shard) -> Result<Offset, LogError> {
        let start = shard_start(shard)?;
        let tail_key = (stream.to_string(), shard.shard_id().to_string());
        let mut known = self.tails.lock().get(&tail_key).cloned();
        let mut iterator = loop {
            let call = self
                .client
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(shard.shard_id());
            let call = match &known {
                Some(seq) => call
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(seq.to_string()),
                None => call.shard_iterator_type(ShardIteratorType::TrimHorizon),
            };
            match call.send().await {
                Ok(out) => break out.shard_iterator().map(str::to_owned),
                // A sequence number of a stream deleted and created again
                // under the same name: start over from the shard's start.
                Err(e)
                    if known.is_some()
                        && e.as_service_error()
                            .is_some_and(|s| s.is_invalid_argument_exception()) =>
                {
                    self.tails.lock().remove(&tail_key);
                    known = None;
                }
                Err(e) => return Err(self.error("opening a shard iterator", e)),
            }
        };
        let mut last = known;
        while let Some(it) = iterator.take() {
            let page = self
                .client
                .get_records()
                .shard_iterator(it)
                .limit(GET_RECORDS as i32)
                .send()
                .await
                .map_err(|e| self.error("reading records", e))?;
            if let Some(r) = page.records().last() {
                last = Some(sequence(r.sequence_number())?);
            }
            iterator = page.next_shard_iterator().map(str::to_owned);
            if page.millis_behind_latest().unwrap_or(0) == 0 && page.records().is_empty() {
                break;
            }
        }
        match last {
            Some(l) => {
                self.saw(stream, shard.shard_id(), &l);
                Ok(l.next())
            }
            None => Ok(start),
        }
    }

    /// Deletes a topic's stream and every record in it (tests, and tidying up
    /// after an experiment: the log trait never deletes).
    pub async fn delete_topic(&self, topic: &str) -> Result<(), LogError> {
        let stream = self.stream(topic)?;
        self.client
            .delete_stream()
            .stream_name(&stream)
            .enforce_consumer_deletion(true)
            .send()
            .await
            .map_err(|e| {
                let missing = e
                    .as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception());
                self.stream_error(topic, missing, &format!("deleting stream {stream}"), e)
            })?;
        self.tails.lock().retain(|(s, _), _| *s != stream);
        Ok(())
    }

    /// Deletes a group's lease table, and so its checkpoints.
    pub async fn delete_group(&self, group: &str) -> Result<(), LogError> {
        validate_name("group", group)?;
        if let Some(table) =
            table::LeaseTable::existing(self.dynamodb.clone(), self.lease_table_name(group)).await?
        {
            table.delete().await?;
        }
        Ok(())
    }

    /// Splits a shard in two at the middle of its hash key range, as
    /// `UpdateShardCount` and `SplitShard` do in production (tests of
    /// resharding); waits until the stream is ACTIVE again.
    pub async fn split_shard(&self, topic: &str, partition: u32) -> Result<(), LogError> {
        let stream = self.stream(topic)?;
        let shard = self.shard(topic, partition).await?;
        let range = shard.hash_key_range().ok_or_else(|| {
            LogError::Backend(format!("shard {} has no hash key range", shard.shard_id()))
        })?;
        let low: u128 = range.starting_hash_key().parse().map_err(|e| {
            LogError::Backend(format!("hash key {}: {e}", range.starting_hash_key()))
        })?;
        let high: u128 = range
            .ending_hash_key()
            .parse()
            .map_err(|e| LogError::Backend(format!("hash key {}: {e}", range.ending_hash_key())))?;
        self.client
            .split_shard()
            .stream_name(&stream)
            .shard_to_split(shard.shard_id())
            .new_starting_hash_key((low + (high - low) / 2 + 1).to_string())
            .send()
            .await
            .map_err(|e| self.error(&format!("splitting shard {}", shard.shard_id()), e))?;
        self.wait_active(&stream).await
    }

    /// Merges two adjacent shards into one; waits until the stream is ACTIVE.
    pub async fn merge_shards(
        &self,
        topic: &str,
        partition: u32,
        adjacent: u32,
    ) -> Result<(), LogError> {
        let stream = self.stream(topic)?;
        let a = self.shard(topic, partition).await?;
        let b = self.shard(topic, adjacent).await?;
        self.client
            .merge_shards()
            .stream_name(&stream)
            .shard_to_merge(a.shard_id())
            .adjacent_shard_to_merge(b.shard_id())
            .send()
            .await
            .map_err(|e| {
                self.error(
                    &format!("merging shards {} and {}", a.shard_id(), b.shard_id()),
                    e,
                )
            })?;
        self.wait_active(&stream).await
    }

    /// Notes a record of a shard, so that finding the shard's end later
    /// reads only what came after it.
    fn saw(&self, stream: &str, shard_id: &str, seq: &Offset) {
        let mut tails = self.tails.lock();
        let known = tails
            .entry((stream.to_string(), shard_id.to_string()))
            .or_insert_with(|| seq.clone());
        if *seq > *known {
            *known = seq.clone();
        }
    }
}

/// The partition number of a shard id (`shardId-000000000003` → 3).
fn shard_number(id: &str) -> Result<u32, LogError> {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| LogError::Backend(format!("Kinesis shard id `{id}` has no number")))
}

/// The first sequence number a shard can hold: its low watermark.
fn shard_start(shard: &Shard) -> Result<Offset, LogError> {
    sequence(
        shard
            .sequence_number_range()
            .map(|r| r.starting_sequence_number())
            .unwrap_or("0"),
    )
}

fn sequence(s: &str) -> Result<Offset, LogError> {
    s.parse()
        .map_err(|e| LogError::Backend(format!("Kinesis sequence number: {e}")))
}

/// A record's data: the frame's magic, the key (u32 length, `u32::MAX` for
/// none), the headers (u16 count; u16 name length, name, u32 value length,
/// value), then the value.
pub fn encode(record: &Record) -> Bytes {
    let mut out = BytesMut::with_capacity(
        MAGIC.len()
            + 6
            + record.key.as_ref().map_or(0, Bytes::len)
            + record
                .headers
                .iter()
                .map(|(n, v)| 6 + n.len() + v.len())
                .sum::<usize>()
            + record.value.len(),
    );
    out.put_slice(MAGIC);
    match &record.key {
        Some(k) => {
            out.put_u32(k.len() as u32);
            out.put_slice(k);
        }
        None => out.put_u32(NO_KEY),
    }
    out.put_u16(record.headers.len() as u16);
    for (name, value) in &record.headers {
        out.put_u16(name.len() as u16);
        out.put_slice(name.as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value);
    }
    out.put_slice(&record.value);
    out.freeze()
}

/// The record a frame holds; None when `data` is not one (another
/// producer's record, or cut short).
pub fn decode_frame(data: &Bytes) -> Option<Record> {
    let mut body = data.clone();
    if !body.starts_with(MAGIC) {
        return None;
    }
    body.advance(MAGIC.len());
    let take = |body: &mut Bytes, n: usize| (body.remaining() >= n).then(|| body.split_to(n));
    if body.remaining() < 4 {
        return None;
    }
    let key = match body.get_u32() {
        NO_KEY => None,
        n => Some(take(&mut body, n as usize)?),
    };
    if body.remaining() < 2 {
        return None;
    }
    let count = body.get_u16();
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if body.remaining() < 2 {
            return None;
        }
        let n = body.get_u16() as usize;
        let name = String::from_utf8(take(&mut body, n)?.to_vec()).ok()?;
        if body.remaining() < 4 {
            return None;
        }
        let n = body.get_u32() as usize;
        headers.push((name, take(&mut body, n)?));
    }
    Some(Record {
        key,
        value: body,
        headers,
    })
}

fn decode(
    topic: &str,
    partition: u32,
    r: &aws_sdk_kinesis::types::Record,
) -> Result<Message, LogError> {
    let data = Bytes::copy_from_slice(r.data().as_ref());
    let Record {
        key,
        value,
        headers,
    } = decode_frame(&data).unwrap_or_else(|| Record {
        key: r
            .partition_key()
            .map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: data,
        headers: Vec::new(),
    });
    Ok(Message {
        topic: topic.to_string(),
        partition,
        offset: sequence(r.sequence_number())?,
        timestamp_ms: r
            .approximate_arrival_timestamp()
            .and_then(|t| t.to_millis().ok())
            .unwrap_or(0),
        key,
        value,
        headers,
    })
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempt.min(6))).min(MAX_BACKOFF)
}

#[async_trait]
impl super::Log for KinesisLog {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<bool, LogError> {
        let stream = self.stream(topic)?;
        let call = self.client.create_stream().stream_name(&stream);
        let call = match self.config.mode {
            KinesisMode::Provisioned => call.shard_count(partitions.max(1) as i32),
            KinesisMode::OnDemand => call.stream_mode_details(
                StreamModeDetails::builder()
                    .stream_mode(StreamMode::OnDemand)
                    .build()
                    .map_err(|e| self.error("describing on-demand mode", e))?,
            ),
        };
        let created = match call.send().await {
            Ok(_) => true,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) =>
            {
                false
            }
            Err(e) => return Err(self.error(&format!("creating stream {stream}"), e)),
        };
        self.wait_active(&stream).await?;
        Ok(created)
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>, LogError> {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_streams()
                .set_next_token(token.clone())
                .set_exclusive_start_stream_name(
                    token.is_none().then(|| names.last().cloned()).flatten(),
                )
                .send()
                .await
                .map_err(|e| self.error("listing streams", e))?;
            names.extend(page.stream_names().iter().cloned());
            if !page.has_more_streams() {
                break;
            }
            token = page.next_token().map(str::to_owned);
        }
        let mut out = Vec::new();
        for name in names {
            let Some(topic) = name.strip_prefix(&self.config.stream_prefix) else {
                continue;
            };
            if validate_name("topic", topic).is_err() {
                continue;
            }
            let shards = self.shards(topic).await?;
            out.push(TopicInfo {
                name: topic.to_string(),
                partitions: shards.len() as u32,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn produce(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        let stream = self.stream(topic)?;
        let mut entries = Vec::with_capacity(records.len());
        for r in &records {
            let data = encode(r);
            let key = self.partition_key(r.key.as_ref());
            let size = data.len() + key.len();
            if size > KINESIS_RECORD_BYTES || r.value.len() > MAX_RECORD_BYTES {
                return Err(LogError::RecordTooLarge {
                    topic: topic.to_string(),
                    size,
                    max: KINESIS_RECORD_BYTES,
                });
            }
            entries.push((key, data));
        }
        // Each key's records, in order; a call takes the first pending record
        // of each key.
        let mut queues: HashMap<&str, VecDeque<usize>> = HashMap::new();
        let mut keys: Vec<&str> = Vec::new();
        for (i, (key, _)) in entries.iter().enumerate() {
            let q = queues.entry(key.as_str()).or_default();
            if q.is_empty() {
                keys.push(key.as_str());
            }
            q.push_back(i);
        }
        let mut positions: Vec<Option<Position>> = vec![None; entries.len()];
        let mut stalled = 0u32;
        loop {
            let mut batch = Vec::new();
            let mut bytes = 0;
            for key in &keys {
                let Some(&i) = queues.get(key).and_then(VecDeque::front) else {
                    continue;
                };
                let size = entries[i].0.len() + entries[i].1.len();
                if batch.len() == PUT_RECORDS || bytes + size > PUT_BYTES {
                    break;
                }
                bytes += size;
                batch.push(i);
            }
            if batch.is_empty() {
                break;
            }
            let mut request = Vec::with_capacity(batch.len());
            for &i in &batch {
                request.push(
                    PutRecordsRequestEntry::builder()
                        .partition_key(&entries[i].0)
                        .data(Blob::new(entries[i].1.to_vec()))
                        .build()
                        .map_err(|e| self.error("building a record", e))?,
                );
            }
            let out = self
                .client
                .put_records()
                .stream_name(&stream)
                .set_records(Some(request))
                .send()
                .await
                .map_err(|e| {
                    let missing = e
                        .as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception());
                    self.stream_error(
                        topic,
                        missing,
                        &format!("putting records into stream {stream}"),
                        e,
                    )
                })?;
            let mut throttled = 0u64;
            let mut stored = 0usize;
            let mut refused = None;
            for (&i, result) in batch.iter().zip(out.records()) {
                match (
                    result.error_code(),
                    result.shard_id(),
                    result.sequence_number(),
                ) {
                    (None, Some(shard), Some(seq)) => {
                        let offset = sequence(seq)?;
                        self.saw(&stream, shard, &offset);
                        positions[i] = Some(Position {
                            partition: shard_number(shard)?,
                            offset,
                        });
                        if let Some(q) = queues.get_mut(entries[i].0.as_str()) {
                            q.pop_front();
                        }
                        stored += 1;
                    }
                    (Some("ProvisionedThroughputExceededException"), ..) => throttled += 1,
                    (code, ..) => {
                        refused = Some(format!(
                            "{}: {}",
                            code.unwrap_or("no sequence number"),
                            result.error_message().unwrap_or_default()
                        ))
                    }
                }
            }
            if throttled > 0 {
                crate::metrics::global()
                    .log_throttled_records
                    .inc_by(throttled);
            }
            if stored == batch.len() {
                stalled = 0;
                continue;
            }
            stalled = if stored > 0 { 0 } else { stalled + 1 };
            if stalled >= PUT_ATTEMPTS {
                return Err(LogError::Backend(format!(
                    "Kinesis at {}: stream {stream} refused {} records {PUT_ATTEMPTS} times in a row ({})",
                    self.location,
                    batch.len() - stored,
                    refused.unwrap_or_else(|| "throughput exceeded".into())
                )));
            }
            tracing::debug!(
                topic,
                throttled,
                failed = batch.len() - stored,
                "Kinesis refused part of a PutRecords call; sending those again."
            );
            tokio::time::sleep(backoff(stalled)).await;
        }
        positions
            .into_iter()
            .map(|p| p.ok_or_else(|| LogError::Backend("a record was never stored".into())))
            .collect()
    }

    async fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError> {
        let stream = self.stream(topic)?;
        let mut out = Vec::new();
        for (partition, shard) in self.shards(topic).await? {
            let low = shard_start(&shard)?;
            let high = self.end_of(&stream, &shard).await?;
            out.push(Watermarks {
                partition,
                low,
                high,
            });
        }
        Ok(out)
    }

    async fn count(
        &self,
        topic: &str,
        partition: u32,
        from: &Offset,
        to: &Offset,
    ) -> Result<u64, LogError> {
        if from >= to {
            return Ok(0);
        }
        // Sequence numbers are not dense: read, up to a bound.
        let records = self
            .fetch(topic, partition, from, super::COUNT_LIMIT as usize)
            .await?;
        Ok(records.iter().filter(|m| m.offset < *to).count() as u64)
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: &Offset,
        max: usize,
    ) -> Result<Vec<Message>, LogError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let stream = self.stream(topic)?;
        let shard = self.shard(topic, partition).await?;
        let iterator = self
            .iterator_from(&stream, shard.shard_id(), &shard_start(&shard)?, offset)
            .await?;
        self.read(topic, partition, iterator, max).await
    }

    async fn subscribe(&self, group: &str, topics: &[&str]) -> Result<Box<dyn Consumer>, LogError> {
        validate_name("group", group)?;
        Ok(Box::new(self.join(group, topics).await?))
    }

    async fn committed(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(u32, Option<Offset>)>, LogError> {
        validate_name("group", group)?;
        self.group_committed(group, topic).await
    }

    async fn set_committed(&self, group: &str, commits: &[Commit]) -> Result<(), LogError> {
        validate_name("group", group)?;
        self.group_set_committed(group, commits).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A framed record reads back as it was written, keyless or not.
        #[test]
        fn frames_round_trip(
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
            headers in proptest::collection::vec(("[a-z.-]{0,20}", proptest::collection::vec(any::<u8>(), 0..50)), 0..5),
            value in proptest::collection::vec(any::<u8>(), 0..500),
        ) {
            let record = Record {
                key: key.map(Bytes::from),
                value: Bytes::from(value),
                headers: headers.into_iter().map(|(n, v)| (n, Bytes::from(v))).collect(),
            };
            prop_assert_eq!(decode_frame(&encode(&record)), Some(record));
        }

        /// Another producer's data is never mistaken for a frame unless it
        /// starts with the magic, and a truncated frame is refused.
        #[test]
        fn foreign_and_cut_data_are_not_frames(data in proptest::collection::vec(any::<u8>(), 0..200), cut in 0usize..40) {
            if !data.starts_with(MAGIC) {
                prop_assert!(decode_frame(&Bytes::from(data.clone())).is_none());
            }
            let framed = encode(&Record::new("key", data).header("h", "v"));
            let short = framed.slice(..cut.min(framed.len().saturating_sub(1)).min(MAGIC.len() + 12));
            prop_assert!(decode_frame(&short).is_none());
        }
    }

    #[test]
    fn shard_numbers() {
        assert_eq!(shard_number("shardId-000000000003").ok(), Some(3));
        assert_eq!(shard_number("shardId-000000001000").ok(), Some(1000));
        assert!(shard_number("shard").is_err());
    }
}
