//! The Kafka log: a client of Apache Kafka through librdkafka (`rdkafka`).
//!
//! One idempotent producer (`acks=all`) is shared by every produce call; an
//! admin client creates topics; topic names and partition counts are cached
//! from cluster metadata so producing to a missing topic fails at once instead
//! of waiting for the broker. Random-access reads ([`Log::fetch`]) use a small
//! pool of consumers that are assigned one partition at a time and never join
//! a group; each group member is its own librdkafka consumer.
//!
//! librdkafka's consumer and metadata calls block, so they run on tokio's
//! blocking pool; producing is asynchronous (delivery reports).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use super::{
    validate_name, Commit, Consumer, LogError, Message, Position, Record, TopicInfo,
    TopicPartition, Watermarks, MAX_RECORD_BYTES,
};

/// Kafka numbers records with non-negative 64-bit signed offsets; a larger
/// position (only another backend makes one) cannot be committed here.
fn kafka_offset(offset: &super::Offset) -> Result<i64, LogError> {
    offset
        .as_u64()
        .and_then(|o| i64::try_from(o).ok())
        .ok_or_else(|| {
            LogError::Backend(format!(
                "offset {offset} is beyond what a Kafka partition can hold (2^63 - 1)"
            ))
        })
}
use crate::config::KafkaConfig;

/// How long a metadata, watermark or committed-offset request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker may take to create a topic.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fetch may take to read records known to be below the high watermark.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a produced record may wait for its acknowledgement before the
/// produce call fails (librdkafka's default, five minutes, would leave callers
/// hanging through an outage). `properties` may override it.
const MESSAGE_TIMEOUT_MS: &str = "60000";
/// Cached partition counts are re-read after this long, so partitions added
/// by another client are seen.
const TOPIC_CACHE_TTL: Duration = Duration::from_secs(30);
/// Idle random-access consumers kept for reuse.
const FETCHER_POOL: usize = 4;
/// Room for record-batch framing on top of [`MAX_RECORD_BYTES`]: the
/// producer's request limit and the `max.message.bytes` of the topics sift
/// creates are this much larger, so every record the client accepts fits.
const FRAMING_BYTES: usize = 64 * 1024;
/// Internal topics (`__consumer_offsets`, ...) start with this.
const INTERNAL_PREFIX: &str = "__";

/// A consumer that is only ever assigned partitions (librdkafka requires a
/// `group.id` for that, but it never joins or commits to the group).
type Fetcher = BaseConsumer;
/// A consumer-group member.
type Member = BaseConsumer;

/// The Kafka log. Cheap to clone; clones share the producer and caches.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

struct Inner {
    settings: KafkaConfig,
    /// Replaced when librdkafka reports a fatal producer error (an idempotent
    /// producer that lost its sequence cannot continue), so one bad episode
    /// does not disable the log for the life of the process.
    producer: RwLock<FutureProducer>,
    admin: AdminClient<DefaultClientContext>,
    topics: Mutex<TopicCache>,
    fetchers: Mutex<Vec<Fetcher>>,
}

/// What cluster metadata says about one topic.
struct TopicMeta {
    partitions: u32,
    /// Every partition has a leader (a new topic is not usable before).
    led: bool,
}

#[derive(Default)]
struct TopicCache {
    partitions: HashMap<String, u32>,
    refreshed: Option<Instant>,
}

impl KafkaLog {
    /// Connects to the brokers of `config` and reads the cluster's topics once,
    /// so an unreachable or misconfigured cluster fails here rather than on
    /// first use.
    pub async fn connect(config: &KafkaConfig) -> Result<KafkaLog, LogError> {
        if config.brokers.trim().is_empty() {
            return Err(LogError::Backend(
                "log.kafka.brokers is empty: set it to the Kafka bootstrap servers \
                 (host:port, comma-separated)"
                    .into(),
            ));
        }
        let producer = create_producer(config)?;
        let admin = client_config(config, &[])
            .create::<AdminClient<DefaultClientContext>>()
            .map_err(|e| client_error(config, "admin client", e))?;
        let inner = Arc::new(Inner {
            settings: config.clone(),
            producer: RwLock::new(producer),
            admin,
            topics: Mutex::new(TopicCache::default()),
            fetchers: Mutex::new(Vec::new()),
        });
        let probe = inner.clone();
        blocking(move || probe.refresh_topics().map(|_| ())).await?;
        Ok(KafkaLog { inner })
    }
}

/// Settings shared by every client, then the role's, then the user's
/// `properties` (last, so they can override anything).
fn client_config(settings: &KafkaConfig, role: &[(&str, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("client.id", &settings.client_id)
        // Topics exist only through create_topic, whatever the broker allows.
        .set("allow.auto.create.topics", "false")
        // Brokers close idle connections; that is not worth a log line.
        .set("log.connection.close", "false");
    for (k, v) in role {
        c.set(*k, v);
    }
    for (k, v) in &settings.properties {
        c.set(k, v);
    }
    c
}

fn create_producer(settings: &KafkaConfig) -> Result<FutureProducer, LogError> {
    let mut role = vec![
        ("enable.idempotence", "true".into()),
        ("acks", "all".into()),
        // Keyed records land where the Java client would put them.
        ("partitioner", "murmur2_random".into()),
        // Unkeyed records spread per record, not per 10 ms batch.
        ("sticky.partitioning.linger.ms", "0".into()),
        (
            "message.max.bytes",
            (MAX_RECORD_BYTES + FRAMING_BYTES).to_string(),
        ),
    ];
    // Ours only when the user set neither spelling: the two are aliases and
    // whichever librdkafka applies last would win.
    if !TIMEOUT_KEYS
        .iter()
        .any(|k| settings.properties.contains_key(*k))
    {
        role.push(("message.timeout.ms", MESSAGE_TIMEOUT_MS.into()));
    }
    client_config(settings, &role)
        .create()
        .map_err(|e| client_error(settings, "producer", e))
}

/// librdkafka's two names for the producer's acknowledgement timeout.
const TIMEOUT_KEYS: [&str; 2] = ["message.timeout.ms", "delivery.timeout.ms"];

/// The producer's effective acknowledgement timeout, in milliseconds.
fn message_timeout_ms(settings: &KafkaConfig) -> &str {
    TIMEOUT_KEYS
        .iter()
        .find_map(|k| settings.properties.get(*k))
        .map_or(MESSAGE_TIMEOUT_MS, String::as_str)
}

fn client_error(settings: &KafkaConfig, what: &str, e: KafkaError) -> LogError {
    LogError::Backend(format!(
        "could not create the Kafka {what} for {}: {e}; \
         check log.kafka.brokers and log.kafka.properties",
        settings.brokers
    ))
}

/// The encoded size that counts against [`MAX_RECORD_BYTES`].
fn record_size(r: &Record) -> usize {
    r.key.as_ref().map_or(0, |k| k.len())
        + r.value.len()
        + r.headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
}

fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    e.rdkafka_error_code()
}

fn is_unknown_topic(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}

/// Errors that mean "ask again shortly": the partition's leader is moving.
fn is_leader_change(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::FencedLeaderEpoch
                | RDKafkaErrorCode::UnknownLeaderEpoch
        )
    )
}

impl Inner {
    fn brokers(&self) -> &str {
        &self.settings.brokers
    }

    /// A server failure, naming what was attempted and where.
    fn backend(&self, what: &str, e: impl std::fmt::Display) -> LogError {
        LogError::Backend(format!(
            "{what} failed on Kafka at {}: {e}; check that the brokers are up and reachable",
            self.brokers()
        ))
    }

    fn producer(&self) -> FutureProducer {
        self.producer.read().clone()
    }

    /// Reads every topic and its partition count from the cluster (blocking).
    fn refresh_topics(&self) -> Result<HashMap<String, u32>, LogError> {
        Ok(self
            .read_metadata()?
            .into_iter()
            .map(|(name, t)| (name, t.partitions))
            .collect())
    }

    /// Reads every topic's metadata and refreshes the cache (blocking).
    fn read_metadata(&self) -> Result<HashMap<String, TopicMeta>, LogError> {
        let producer = self.producer();
        let md = producer
            .client()
            .fetch_metadata(None, REQUEST_TIMEOUT)
            .map_err(|e| self.backend("reading the topic list", e))?;
        let mut topics = HashMap::new();
        for t in md.topics() {
            let missing = t
                .error()
                .is_some_and(|e| is_unknown_topic(Some(RDKafkaErrorCode::from(e))));
            if !missing {
                let meta = TopicMeta {
                    partitions: t.partitions().len() as u32,
                    led: t
                        .partitions()
                        .iter()
                        .all(|p| p.error().is_none() && p.leader() >= 0),
                };
                topics.insert(t.name().to_string(), meta);
            }
        }
        let mut cache = self.topics.lock();
        cache.partitions = topics
            .iter()
            .map(|(name, t)| (name.clone(), t.partitions))
            .collect();
        cache.refreshed = Some(Instant::now());
        Ok(topics)
    }

    fn forget_topic(&self, topic: &str) {
        self.topics.lock().partitions.remove(topic);
    }

    /// Builds a consumer for random access (blocking only in the sense that
    /// creating a librdkafka client starts threads).
    fn new_fetcher(&self) -> Result<Fetcher, LogError> {
        client_config(
            &self.settings,
            &[
                (
                    "group.id",
                    format!("{}-random-access", self.settings.client_id),
                ),
                ("enable.auto.commit", "false".into()),
                ("enable.auto.offset.store", "false".into()),
                ("enable.partition.eof", "true".into()),
                // A vanished offset is an error for the caller, not a jump.
                ("auto.offset.reset", "error".into()),
            ],
        )
        .create()
        .map_err(|e| client_error(&self.settings, "fetch consumer", e))
    }

    /// Reads `[offset, min(offset + max, high))` of one partition (blocking).
    fn fetch_blocking(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<Message>, LogError> {
        let (low, high) = self.partition_watermarks(topic, partition)?;
        if offset >= high || max == 0 {
            return Ok(Vec::new());
        }
        if offset < low {
            return Err(LogError::OffsetOutOfRange {
                topic: topic.to_string(),
                partition,
                offset: offset.into(),
                earliest: low.into(),
            });
        }
        let want = max.min(usize::try_from(high - offset).unwrap_or(usize::MAX));
        let pooled = self.fetchers.lock().pop();
        let fetcher = match pooled {
            Some(f) => f,
            None => self.new_fetcher()?,
        };
        let result = self.read_range(&fetcher, topic, partition, offset, high, want, low);
        // A fetcher whose unassign fails is in an unknown state: drop it.
        if fetcher.unassign().is_ok() && result.is_ok() {
            let mut pool = self.fetchers.lock();
            if pool.len() < FETCHER_POOL {
                pool.push(fetcher);
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn read_range(
        &self,
        fetcher: &Fetcher,
        topic: &str,
        partition: u32,
        offset: u64,
        high: u64,
        want: usize,
        low: u64,
    ) -> Result<Vec<Message>, LogError> {
        let what = || format!("reading {topic}/{partition} from offset {offset}");
        let p = partition as i32;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(offset as i64))
            .map_err(|e| self.backend(&what(), e))?;
        fetcher.assign(&tpl).map_err(|e| self.backend(&what(), e))?;
        let deadline = Instant::now() + FETCH_TIMEOUT;
        let mut out = Vec::with_capacity(want);
        let mut next = offset;
        let mut last_error = None;
        let mut at_end = false;
        while out.len() < want && next < high && !at_end {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match fetcher.poll(left.min(Duration::from_millis(500))) {
                None => {}
                Some(Ok(m)) => {
                    // Skip anything prefetched for an earlier assignment.
                    let o = m.offset() as u64;
                    if m.topic() == topic && m.partition() == p && o >= next {
                        next = o + 1;
                        out.push(to_message(&m));
                    }
                }
                Some(Err(KafkaError::PartitionEOF(eof))) => at_end = eof == p,
                Some(Err(e)) if code_of(&e) == Some(RDKafkaErrorCode::OffsetOutOfRange) => {
                    // Retention removed the range between the watermark check and the read.
                    let earliest = self
                        .partition_watermarks(topic, partition)
                        .map_or(low, |(l, _)| l);
                    return Err(LogError::OffsetOutOfRange {
                        topic: topic.to_string(),
                        partition,
                        offset: offset.into(),
                        earliest: earliest.into(),
                    });
                }
                // Transport errors and the like: librdkafka retries on its own.
                Some(Err(e)) => last_error = Some(e),
            }
        }
        if out.is_empty() && !at_end {
            let why = last_error.map_or_else(
                || format!("no records arrived within {FETCH_TIMEOUT:?}"),
                |e| format!("{e}"),
            );
            return Err(self.backend(
                &format!("{} (the partition holds offsets below {high})", what()),
                why,
            ));
        }
        Ok(out)
    }

    /// `(low, high)` of one partition (blocking). Leadership moves (a new
    /// topic's leaders settling, a broker restarting) are retried until
    /// [`REQUEST_TIMEOUT`]: librdkafka refreshes its metadata meanwhile.
    fn partition_watermarks(&self, topic: &str, partition: u32) -> Result<(u64, u64), LogError> {
        let producer = self.producer();
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match producer
                .client()
                .fetch_watermarks(topic, partition as i32, left)
            {
                Ok((low, high)) => return Ok((low.max(0) as u64, high.max(0) as u64)),
                Err(e) if is_unknown_topic(code_of(&e)) => {
                    self.forget_topic(topic);
                    return Err(LogError::NoSuchTopic(topic.to_string()));
                }
                Err(e) if is_leader_change(code_of(&e)) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(
                        self.backend(&format!("reading the offsets of {topic}/{partition}"), e)
                    )
                }
            }
        }
    }

    /// A consumer of `group` that never subscribes, so it does not join the
    /// group or disturb its members: it reads or writes committed offsets.
    fn group_client(&self, group: &str, role: &str) -> Result<BaseConsumer, LogError> {
        client_config(
            &self.settings,
            &[
                ("group.id", group.to_string()),
                ("enable.auto.commit", "false".into()),
                ("enable.auto.offset.store", "false".into()),
            ],
        )
        .create()
        .map_err(|e| client_error(&self.settings, role, e))
    }

    /// Committed offsets of `group` on every partition of `topic` (blocking).
    fn committed_blocking(
        &self,
        group: &str,
        topic: &str,
        partitions: u32,
    ) -> Result<Vec<(u32, Option<super::Offset>)>, LogError> {
        let what = format!("reading the committed offsets of group `{group}` on `{topic}`");
        let consumer = self.group_client(group, "offset reader")?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_range(topic, 0, partitions as i32 - 1);
        let tpl = consumer
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(|e| self.backend(&what, e))?;
        let mut out = Vec::with_capacity(partitions as usize);
        for e in tpl.elements() {
            e.error().map_err(|err| self.backend(&what, err))?;
            let committed = match e.offset() {
                Offset::Offset(o) if o >= 0 => Some((o as u64).into()),
                _ => None,
            };
            out.push((e.partition() as u32, committed));
        }
        out.sort_unstable_by_key(|(p, _)| *p);
        Ok(out)
    }

    /// Commits `commits` for `group` from a consumer that never subscribes;
    /// the brokers refuse it while the group has members (blocking).
    fn set_committed_blocking(&self, group: &str, commits: &[Commit]) -> Result<(), LogError> {
        let what = format!("setting the committed offsets of group `{group}`");
        let consumer = self.group_client(group, "offset writer")?;
        let mut tpl = TopicPartitionList::new();
        for c in commits {
            tpl.add_partition_offset(
                &c.topic,
                c.partition as i32,
                Offset::Offset(kafka_offset(&c.next_offset)?),
            )
            .map_err(|e| self.backend(&what, e))?;
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| self.backend(&format!("{what} (stop its members first)"), e))
    }

    /// Turns a failed delivery into the error the caller sees.
    fn delivery_error(&self, topic: &str, record: &Record, e: KafkaError) -> LogError {
        if let Some((code, reason)) = self.producer().client().fatal_error() {
            self.replace_producer();
            return LogError::Backend(format!(
                "the Kafka producer for {} hit a fatal error ({code}: {reason}) and was rebuilt; \
                 records of this call may or may not be stored, produce them again",
                self.brokers()
            ));
        }
        match code_of(&e) {
            c if is_unknown_topic(c) => {
                self.forget_topic(topic);
                LogError::NoSuchTopic(topic.to_string())
            }
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => LogError::Backend(format!(
                "Kafka at {} refused a record of {} bytes as too large for topic `{topic}`; \
                 raise the topic's max.message.bytes to at least {}",
                self.brokers(),
                record_size(record),
                MAX_RECORD_BYTES + FRAMING_BYTES
            )),
            Some(RDKafkaErrorCode::MessageTimedOut) => LogError::Backend(format!(
                "gave up waiting for Kafka at {} to acknowledge a record for `{topic}` \
                 (message.timeout.ms = {}): the brokers are unreachable or unhealthy; it may \
                 or may not be stored, produce it again",
                self.brokers(),
                message_timeout_ms(&self.settings)
            )),
            _ => self.backend(&format!("producing to `{topic}`"), e),
        }
    }

    fn replace_producer(&self) {
        match create_producer(&self.settings) {
            Ok(p) => *self.producer.write() = p,
            Err(e) => tracing::error!(error = %e, "could not rebuild the Kafka producer"),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing a consumer waits on librdkafka; keep that off the executor.
        off_executor(std::mem::take(self.fetchers.get_mut()));
    }
}

/// Drops `value` on the blocking pool when called from inside a tokio runtime.
fn off_executor<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(move || drop(value));
        }
        Err(_) => drop(value),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::Backend(format!("Kafka worker thread failed: {e}")))?
}

fn to_message(m: &BorrowedMessage<'_>) -> Message {
    let headers = m.headers().map_or_else(Vec::new, |hs| {
        hs.iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    h.value.map(Bytes::copy_from_slice).unwrap_or_default(),
                )
            })
            .collect()
    });
    Message {
        topic: m.topic().to_string(),
        partition: m.partition() as u32,
        offset: (m.offset() as u64).into(),
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        key: m.key().map(Bytes::copy_from_slice),
        value: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        headers,
    }
}

impl KafkaLog {
    /// The partition count of `topic`, from the cache or fresh metadata.
    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        {
            let cache = self.inner.topics.lock();
            let fresh = cache
                .refreshed
                .is_some_and(|t| t.elapsed() < TOPIC_CACHE_TTL);
            if let (Some(n), true) = (cache.partitions.get(topic), fresh) {
                return Ok(*n);
            }
        }
        let inner = self.inner.clone();
        let topics = blocking(move || inner.refresh_topics()).await?;
        topics
            .get(topic)
            .copied()
            .ok_or_else(|| LogError::NoSuchTopic(topic.to_string()))
    }
}

#[async_trait]
impl super::Log for KafkaLog {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<bool, LogError> {
        validate_name("topic", topic)?;
        let count = i32::try_from(partitions).unwrap_or(i32::MAX);
        let max_bytes = (MAX_RECORD_BYTES + FRAMING_BYTES).to_string();
        // Replication -1: the broker's default.replication.factor (KIP-464).
        let new = NewTopic::new(topic, count, TopicReplication::Fixed(-1))
            .set("max.message.bytes", &max_bytes);
        let opts = AdminOptions::new()
            .operation_timeout(Some(CREATE_TIMEOUT))
            .request_timeout(Some(CREATE_TIMEOUT + REQUEST_TIMEOUT));
        let what = format!("creating topic `{topic}` with {partitions} partitions");
        let results = self
            .inner
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| self.inner.backend(&what, e))?;
        match results.into_iter().next() {
            Some(Ok(_)) => {}
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => return Ok(false),
            Some(Err((_, code))) => {
                return Err(LogError::Backend(format!(
                    "Kafka at {} refused {what}: {code}",
                    self.inner.brokers()
                )))
            }
            None => return Err(self.inner.backend(&what, "the broker returned no result")),
        }
        // Creation is asynchronous on the cluster: wait until metadata shows
        // every partition with a leader, so the topic is usable when this returns.
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let inner = self.inner.clone();
            let topics = blocking(move || inner.read_metadata()).await?;
            if topics
                .get(topic)
                .is_some_and(|t| t.partitions == partitions && t.led)
            {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    topic,
                    "created topic is not yet visible in Kafka metadata; continuing"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(true)
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>, LogError> {
        let inner = self.inner.clone();
        let topics = blocking(move || inner.refresh_topics()).await?;
        let mut list: Vec<TopicInfo> = topics
            .into_iter()
            .filter(|(name, _)| !name.starts_with(INTERNAL_PREFIX))
            .map(|(name, partitions)| TopicInfo { name, partitions })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    /// Enqueues every record at once (in input order, so same-key records keep
    /// their order) and then waits for all delivery reports. On error, some
    /// records of the call may still have been stored.
    async fn produce(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        self.partitions(topic).await?;
        for r in &records {
            let size = record_size(r);
            if size > MAX_RECORD_BYTES {
                return Err(LogError::RecordTooLarge {
                    topic: topic.to_string(),
                    size,
                    max: MAX_RECORD_BYTES,
                });
            }
        }
        let producer = self.inner.producer();
        let mut pending = Vec::with_capacity(records.len());
        let mut first_error = None;
        'records: for (i, r) in records.iter().enumerate() {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (name, value) in &r.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_ref()),
                });
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(r.value.as_ref())
                .headers(headers);
            if let Some(key) = &r.key {
                record = record.key(key.as_ref());
            }
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push((i, delivery));
                        break;
                    }
                    Err((e, back)) if code_of(&e) == Some(RDKafkaErrorCode::QueueFull) => {
                        // librdkafka's local queue is full: wait for deliveries to drain it.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => {
                        first_error = Some(self.inner.delivery_error(topic, r, e));
                        break 'records;
                    }
                }
            }
        }
        // Wait for every enqueued record, even after a failure, so nothing of
        // this call is still in flight when it returns.
        let mut positions = Vec::with_capacity(pending.len());
        for (i, delivery) in pending {
            match delivery.await {
                Ok(Ok(d)) => positions.push(Position {
                    partition: d.partition as u32,
                    offset: (d.offset as u64).into(),
                }),
                Ok(Err((e, _))) => {
                    if first_error.is_none() {
                        first_error = Some(self.inner.delivery_error(topic, &records[i], e));
                    }
                }
                Err(_) => {
                    if first_error.is_none() {
                        first_error = Some(self.inner.backend(
                            &format!("producing to `{topic}`"),
                            "the producer shut down before the record was acknowledged",
                        ));
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(positions),
        }
    }

    async fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError> {
        let partitions = self.partitions(topic).await?;
        let inner = self.inner.clone();
        let topic = topic.to_string();
        blocking(move || {
            (0..partitions)
                .map(|p| {
                    let (low, high) = inner.partition_watermarks(&topic, p)?;
                    Ok(Watermarks {
                        partition: p,
                        low: low.into(),
                        high: high.into(),
                    })
                })
                .collect()
        })
        .await
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: &super::Offset,
        max: usize,
    ) -> Result<Vec<Message>, LogError> {
        // Beyond any Kafka offset: past the end, so nothing to read.
        let offset = offset.as_u64().unwrap_or(u64::MAX);
        let partitions = self.partitions(topic).await?;
        if partition >= partitions {
            return Err(LogError::NoSuchPartition {
                topic: topic.to_string(),
                partition,
                partitions,
            });
        }
        let inner = self.inner.clone();
        let topic = topic.to_string();
        blocking(move || inner.fetch_blocking(&topic, partition, offset, max)).await
    }

    async fn subscribe(&self, group: &str, topics: &[&str]) -> Result<Box<dyn Consumer>, LogError> {
        validate_name("group", group)?;
        for t in topics {
            self.partitions(t).await?;
        }
        let config = client_config(
            &self.inner.settings,
            &[
                ("group.id", group.to_string()),
                ("enable.auto.commit", "false".into()),
                ("enable.auto.offset.store", "false".into()),
                ("auto.offset.reset", "earliest".into()),
                // Eager rebalances: every member gives up all its partitions
                // and starts each partition it is assigned at the group's
                // committed offset. With cooperative-sticky, a member that
                // kept a partition through a rebalance kept librdkafka's
                // fetch position too, so records it had read but could not
                // commit during the rebalance were never read again and the
                // group's lag stayed above 0 until a restart (`sift bench
                // scale`, 4 infer instances starting together: 2 of 8
                // partitions stuck in 3 of 3 runs).
                ("partition.assignment.strategy", "range,roundrobin".into()),
                // A member that vanishes without leaving is replaced within
                // seconds, not the default 45.
                ("session.timeout.ms", "10000".into()),
                ("heartbeat.interval.ms", "1000".into()),
            ],
        );
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        let member = {
            let (config, topics, settings, group) = (
                config.clone(),
                topics.clone(),
                self.inner.settings.clone(),
                group.to_string(),
            );
            blocking(move || join(&config, &topics, &settings, &group)).await?
        };
        Ok(Box::new(KafkaConsumer {
            member: Some(Arc::new(member)),
            group: group.to_string(),
            brokers: self.inner.brokers().to_string(),
            assignment: Vec::new(),
            inner: self.inner.clone(),
            config,
            topics,
            failing: Failing::new(REJOIN_AFTER),
        }))
    }

    async fn committed(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(u32, Option<super::Offset>)>, LogError> {
        validate_name("group", group)?;
        let partitions = self.partitions(topic).await?;
        let inner = self.inner.clone();
        let (group, topic) = (group.to_string(), topic.to_string());
        blocking(move || inner.committed_blocking(&group, &topic, partitions)).await
    }

    async fn set_committed(&self, group: &str, commits: &[Commit]) -> Result<(), LogError> {
        validate_name("group", group)?;
        let inner = self.inner.clone();
        let (group, commits) = (group.to_string(), commits.to_vec());
        blocking(move || inner.set_committed_blocking(&group, &commits)).await
    }
}

/// Creates a group member and subscribes it to `topics` (blocking).
fn join(
    config: &ClientConfig,
    topics: &[String],
    settings: &KafkaConfig,
    group: &str,
) -> Result<Member, LogError> {
    let member: Member = config
        .create()
        .map_err(|e| client_error(settings, "group consumer", e))?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    member.subscribe(&names).map_err(|e| {
        LogError::Backend(format!(
            "joining group `{group}` on Kafka at {} failed: {e}",
            settings.brokers
        ))
    })?;
    Ok(member)
}

/// How long a member's polls may fail, while the cluster answers other
/// clients, before the member is replaced by a fresh one.
const REJOIN_AFTER: Duration = Duration::from_secs(60);

/// Tracks a member's polls failing in a row, to tell a member that is stuck
/// from a cluster that is down. After a broker restart, a librdkafka member
/// has been seen to answer `AllBrokersDown` to every poll for 15 minutes
/// while every other client of the same process had reconnected; its group
/// then waited on it.
#[derive(Debug)]
struct Failing {
    since: Option<Instant>,
    after: Duration,
}

impl Failing {
    fn new(after: Duration) -> Self {
        Failing { since: None, after }
    }

    /// A poll succeeded.
    fn ok(&mut self) {
        self.since = None;
    }

    /// A poll failed at `now`: whether the member has failed long enough
    /// (or fatally) that it should be replaced, if the cluster answers.
    fn failed(&mut self, now: Instant, fatal: bool) -> bool {
        let since = *self.since.get_or_insert(now);
        fatal || now.saturating_duration_since(since) >= self.after
    }

    /// How long polls have failed, as of `now`.
    fn for_how_long(&self, now: Instant) -> Duration {
        self.since
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

/// Drops a member on a thread of its own: closing one that is stuck can
/// block in librdkafka for as long as it stays stuck, and must neither hold
/// a worker nor keep the runtime from shutting down.
fn close_detached(member: Arc<Member>) {
    let spare = member.clone();
    if std::thread::Builder::new()
        .name("sift-kafka-close".into())
        .spawn(move || drop(member))
        .is_err()
    {
        off_executor(spare);
    }
}

/// A member of a Kafka consumer group.
struct KafkaConsumer {
    /// None once closed.
    member: Option<Arc<Member>>,
    group: String,
    brokers: String,
    /// As of the last poll.
    assignment: Vec<TopicPartition>,
    /// The log's clients, to ask whether the cluster answers.
    inner: Arc<Inner>,
    /// What the member was created with, to create it again.
    config: ClientConfig,
    topics: Vec<String>,
    failing: Failing,
}

impl KafkaConsumer {
    fn member(&self) -> Result<Arc<Member>, LogError> {
        self.member.clone().ok_or_else(|| {
            LogError::Backend(format!(
                "the consumer of group `{}` is closed; subscribe again",
                self.group
            ))
        })
    }

    /// After a failed poll: replaces a member that failed fatally, or has
    /// failed every poll for [`REJOIN_AFTER`] while the cluster answers
    /// metadata requests, with a fresh member of the group. It starts each
    /// partition it is assigned at the group's committed offset, as after
    /// any rebalance.
    async fn after_failed_poll(&mut self, fatal: bool) {
        if !self.failing.failed(Instant::now(), fatal) {
            return;
        }
        let probe = self.inner.clone();
        if let Err(e) = blocking(move || probe.read_metadata().map(|_| ())).await {
            tracing::debug!(error = %e, group = %self.group, "The Kafka cluster does not answer either; keeping the member");
            return;
        }
        let (config, topics, settings, group) = (
            self.config.clone(),
            self.topics.clone(),
            self.inner.settings.clone(),
            self.group.clone(),
        );
        match blocking(move || join(&config, &topics, &settings, &group)).await {
            Ok(fresh) => {
                tracing::warn!(
                    group = %self.group,
                    failing_for = ?self.failing.for_how_long(Instant::now()),
                    fatal,
                    "The Kafka consumer failed every poll while the cluster answered; \
                     replaced it with a fresh member of the group."
                );
                crate::metrics::global().log_consumer_rejoins.inc();
                if let Some(old) = self.member.replace(Arc::new(fresh)) {
                    close_detached(old);
                }
                self.assignment.clear();
                self.failing.ok();
            }
            Err(e) => {
                tracing::warn!(error = %e, group = %self.group, "Could not replace a failing Kafka consumer; trying again after the next failed poll")
            }
        }
    }

    fn error(&self, what: &str, e: KafkaError) -> LogError {
        let advice = if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
            "the member cannot continue: the next poll replaces it with a fresh member of the group"
        } else {
            "the member keeps its place: poll again, and check the brokers if this persists \
             (a member that fails every poll for a minute while the cluster answers is replaced)"
        };
        LogError::Backend(format!(
            "{what} for group `{}` on Kafka at {}: {e}; {advice}",
            self.group, self.brokers
        ))
    }
}

fn assignment_of(member: &Member) -> Result<Vec<TopicPartition>, KafkaError> {
    let mut out: Vec<TopicPartition> = member
        .assignment()?
        .elements()
        .iter()
        .map(|e| TopicPartition {
            topic: e.topic().to_string(),
            partition: e.partition() as u32,
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Collects up to `max` messages: waits up to `timeout` for the first, then
/// takes only what is already there. Rebalance callbacks run inside `poll`.
///
/// librdkafka queues an error event on the consumer for every failed
/// connection attempt while the brokers are away (hundreds in a broker
/// restart), and each `poll` hands out one of them. So an error does not end
/// the poll: it goes on until the deadline, draining the queue, and the last
/// error is returned only if no message came. Returning at the first error
/// left a stage that backs off between failed polls draining one queued
/// event per backoff, minutes after the broker was back. A fatal error ends
/// the poll at once.
fn poll_member(
    member: &Member,
    max: usize,
    timeout: Duration,
) -> (Vec<Message>, Option<KafkaError>) {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut error = None;
    while out.len() < max {
        let wait = if out.is_empty() {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        match member.poll(wait) {
            Some(Ok(m)) => out.push(to_message(&m)),
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                error = Some(e);
                break;
            }
            Some(Err(e)) => {
                error = Some(e);
                if Instant::now() >= deadline {
                    break;
                }
            }
            // Nothing, or a rebalance was served: go on until the deadline.
            None => {
                if !out.is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    match error {
        // The messages taken must reach the caller; librdkafka keeps
        // retrying whatever failed.
        Some(e) if !out.is_empty() => {
            tracing::debug!(error = %e, "Kafka consumer error during a poll that returned messages");
            (out, None)
        }
        error => (out, error),
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Message>, LogError> {
        let member = self.member()?;
        let (messages, error, assignment) = tokio::task::spawn_blocking(move || {
            let (messages, error) = poll_member(&member, max, timeout);
            (messages, error, assignment_of(&member))
        })
        .await
        .map_err(|e| LogError::Backend(format!("Kafka worker thread failed: {e}")))?;
        let failure = match (assignment, error) {
            (Ok(a), error) => {
                self.assignment = a;
                error.map(|e| ("polling", e))
            }
            (Err(e), None) => Some(("reading the assignment", e)),
            (Err(_), Some(e)) => Some(("polling", e)),
        };
        match failure {
            None => {
                self.failing.ok();
                Ok(messages)
            }
            Some((what, e)) => {
                let fatal = matches!(e, KafkaError::MessageConsumptionFatal(_));
                let error = self.error(what, e);
                self.after_failed_poll(fatal).await;
                Err(error)
            }
        }
    }

    async fn commit(&mut self, commits: &[Commit]) -> Result<(), LogError> {
        if commits.is_empty() {
            return Ok(());
        }
        let member = self.member()?;
        let commits = commits.to_vec();
        let group = self.group.clone();
        let not_assigned = move |c: &Commit| LogError::NotAssigned {
            group: group.clone(),
            topic: c.topic.clone(),
            partition: c.partition,
        };
        let result =
            tokio::task::spawn_blocking(move || -> Result<Result<(), LogError>, KafkaError> {
                let assigned: BTreeSet<TopicPartition> = if member.assignment_lost() {
                    BTreeSet::new()
                } else {
                    assignment_of(&member)?.into_iter().collect()
                };
                let mut tpl = TopicPartitionList::new();
                for c in &commits {
                    let tp = TopicPartition {
                        topic: c.topic.clone(),
                        partition: c.partition,
                    };
                    if !assigned.contains(&tp) {
                        return Ok(Err(not_assigned(c)));
                    }
                    let offset = match kafka_offset(&c.next_offset) {
                        Ok(o) => o,
                        Err(e) => return Ok(Err(e)),
                    };
                    tpl.add_partition_offset(&c.topic, c.partition as i32, Offset::Offset(offset))?;
                }
                let fenced = |e: &KafkaError| {
                    matches!(
                        code_of(e),
                        Some(
                            RDKafkaErrorCode::IllegalGeneration
                                | RDKafkaErrorCode::RebalanceInProgress
                                | RDKafkaErrorCode::UnknownMemberId
                                | RDKafkaErrorCode::FencedInstanceId
                                | RDKafkaErrorCode::StaleMemberEpoch
                                | RDKafkaErrorCode::AssignmentLost
                        )
                    )
                };
                match member.commit(&tpl, CommitMode::Sync) {
                    // The group moved on while this member was busy: its
                    // partitions may belong to another member now.
                    Err(e) if fenced(&e) => return Ok(Err(not_assigned(&commits[0]))),
                    other => other?,
                }
                // A synchronous commit reports per-partition failures in the list.
                for (e, c) in tpl.elements().iter().zip(&commits) {
                    match e.error() {
                        Err(err) if fenced(&err) => return Ok(Err(not_assigned(c))),
                        other => other?,
                    }
                }
                Ok(Ok(()))
            })
            .await
            .map_err(|e| LogError::Backend(format!("Kafka worker thread failed: {e}")))?;
        match result {
            Ok(r) => r,
            Err(e) => Err(self.error("committing offsets", e)),
        }
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.assignment.clone()
    }

    /// Leaves the group (the remaining members rebalance at once) and waits
    /// until librdkafka has closed the consumer.
    async fn close(mut self: Box<Self>) -> Result<(), LogError> {
        let Some(member) = self.member.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            member.unsubscribe();
            // Dropping the last handle closes the consumer: it leaves the
            // group and serves the final revocation before returning.
            drop(member);
        })
        .await
        .map_err(|e| LogError::Backend(format!("Kafka worker thread failed: {e}")))
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        if let Some(member) = self.member.take() {
            off_executor(member);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_replaced_only_after_failing_throughout_or_fatally() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut f = Failing::new(s(60));
        assert!(!f.failed(t0, false));
        assert!(!f.failed(t0 + s(59), false));
        assert_eq!(f.for_how_long(t0 + s(59)), s(59));
        // A poll that succeeds in between starts the count again.
        f.ok();
        assert!(!f.failed(t0 + s(61), false));
        assert!(!f.failed(t0 + s(120), false));
        assert!(f.failed(t0 + s(121), false));
        // Fatal errors do not wait.
        let mut g = Failing::new(s(60));
        assert!(g.failed(t0, true));
        assert_eq!(Failing::new(s(1)).for_how_long(t0), Duration::ZERO);
    }
}
