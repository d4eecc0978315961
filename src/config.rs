//! One TOML file configures sift (`sift.toml`, or `--config` / `SIFT_CONFIG`).
//! Every field has a default, so no file at all means: every backend embedded
//! under `./sift-data`. Environment variables `SIFT__SECTION__KEY=value`
//! override single fields (double underscores separate the path), and
//! [`Loaded::origins`] records where each effective value came from so
//! `sift config show` can explain it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::device::{DeviceArg, DtypeArg};

/// Prefix of environment variables that override config fields.
pub const ENV_PREFIX: &str = "SIFT__";

/// Errors of loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for sift (unknown field, wrong type, ...).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// An environment override names no field or has a value of the wrong type.
    #[error("invalid environment override {var}: {message}")]
    Env {
        /// The variable name.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config value {field}: {message}")]
    Value {
        /// Dotted field path.
        field: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory that holds every embedded backend's files (log segments,
    /// objects, table, search indexes). Created when missing.
    pub data_dir: PathBuf,
    /// The log: named, partitioned topics with consumer groups.
    pub log: LogConfig,
    /// The object store: raw archive, claim-checked bodies, models.
    pub objects: ObjectsConfig,
    /// The wide-column table (HBase model): documents, identities, handles.
    pub table: TableConfig,
    /// The search index: the consumer database for identity matching.
    pub search: SearchConfig,
    /// The cache: social handle to person id lookups.
    pub cache: CacheConfig,
    /// `sift ingest`: fetching, extraction, first filters.
    pub ingest: IngestConfig,
    /// `sift clean`: normalization, language, near-duplicates.
    pub clean: CleanConfig,
    /// `sift archive`: the raw topic as compressed JSON lines in the object store.
    pub archive: ArchiveConfig,
    /// `sift train` and the model registry.
    pub train: TrainConfig,
    /// `sift infer`: the batched inference daemon.
    pub infer: InferConfig,
    /// `sift dbusa load`: the consumer database in the search index.
    pub dbusa: DbusaConfig,
    /// `sift match`: social profiles to people in the consumer database.
    #[serde(rename = "match")]
    pub matching: MatchConfig,
    /// The enrichment API (FullContact Person Enrich v3) `sift match` calls
    /// for profiles without a usable name or location.
    pub enrich: EnrichConfig,
    /// `sift review`: the analysts' review web UI.
    pub review: ReviewConfig,
    /// Logs and metrics.
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./sift-data"),
            log: LogConfig::default(),
            objects: ObjectsConfig::default(),
            table: TableConfig::default(),
            search: SearchConfig::default(),
            cache: CacheConfig::default(),
            ingest: IngestConfig::default(),
            clean: CleanConfig::default(),
            archive: ArchiveConfig::default(),
            train: TrainConfig::default(),
            infer: InferConfig::default(),
            dbusa: DbusaConfig::default(),
            matching: MatchConfig::default(),
            enrich: EnrichConfig::default(),
            review: ReviewConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// Which log implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogBackend {
    /// Segment files under `data_dir/log`.
    #[default]
    Embedded,
    /// Apache Kafka (needs the `kafka` cargo feature).
    Kafka,
    /// Amazon Kinesis Data Streams, with consumer-group leases in DynamoDB
    /// (needs the `kinesis` cargo feature).
    Kinesis,
}

/// The log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `embedded`, `kafka` or `kinesis`.
    pub backend: LogBackend,
    /// Partitions given to topics sift creates on its own.
    pub default_partitions: u32,
    /// Prefix of every topic and consumer group name, so several
    /// deployments can share one cluster ("" = none): topic `sift.raw` is
    /// `PREFIXsift.raw`, group `sift-clean` is `PREFIXsift-clean`.
    pub topic_prefix: String,
    /// What a consumer does when its group's committed offset lies outside
    /// what a partition stores (beyond its end, or below its start after
    /// retention): `fail`, `earliest` or `latest`.
    pub on_offset_out_of_range: OffsetOutOfRange,
    /// What a reader of the embedded log does with a record that fails its
    /// checksum: `fail` or `skip` (quarantine it and dead-letter the range).
    pub on_corruption: OnCorruption,
    /// Settings of the embedded log.
    pub embedded: EmbeddedLogConfig,
    /// Settings of the Kafka client.
    pub kafka: KafkaConfig,
    /// Settings of the Kinesis and DynamoDB clients.
    pub kinesis: KinesisConfig,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            backend: LogBackend::Embedded,
            default_partitions: 4,
            topic_prefix: String::new(),
            on_offset_out_of_range: OffsetOutOfRange::default(),
            on_corruption: OnCorruption::default(),
            embedded: EmbeddedLogConfig::default(),
            kafka: KafkaConfig::default(),
            kinesis: KinesisConfig::default(),
        }
    }
}

/// `log.on_offset_out_of_range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetOutOfRange {
    /// Stop the stage with an error that names the fix (`sift topics offsets
    /// GROUP --reset-to …`): records may have been skipped or lost.
    #[default]
    Fail,
    /// Continue from the earliest stored offset, logged and counted.
    Earliest,
    /// Continue from the end, logged and counted.
    Latest,
}

/// `log.on_corruption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnCorruption {
    /// Stop with an error that names the file, the offsets and the fix
    /// (`sift log check --repair`).
    #[default]
    Fail,
    /// Move the bad range to a quarantine file, count it, send a dead letter
    /// naming the topic, partition and offsets, and go on.
    Skip,
}

/// When the embedded log forces written records to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Before every produce call returns: survives power loss, slowest.
    Always,
    /// Every `fsync_interval` in the background: a produce survives a killed
    /// process at once and power loss after the interval.
    #[default]
    Interval,
}

/// The embedded log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedLogConfig {
    /// `always` or `interval`.
    pub fsync: FsyncPolicy,
    /// How often the background flusher syncs with `fsync = "interval"`.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// A partition starts a new segment file once the current one reaches this size.
    pub segment_bytes: u64,
    /// Oldest segments of a partition are deleted while it holds more than this (0 = no limit).
    pub retention_bytes: u64,
    /// Segments whose newest record is older than this are deleted (0s = keep forever).
    #[serde(with = "humantime_serde")]
    pub retention_age: Duration,
}

impl Default for EmbeddedLogConfig {
    fn default() -> Self {
        EmbeddedLogConfig {
            fsync: FsyncPolicy::Interval,
            fsync_interval: Duration::from_millis(200),
            segment_bytes: 128 * 1024 * 1024,
            retention_bytes: 4 * 1024 * 1024 * 1024,
            retention_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The Kafka client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Client id reported to the brokers.
    pub client_id: String,
    /// Extra librdkafka settings passed through as they are, for both producer
    /// and consumers (e.g. `security.protocol`, `sasl.mechanism`).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "sift".into(),
            properties: BTreeMap::new(),
        }
    }
}

/// How a Kinesis stream that sift creates is provisioned (`log.kinesis.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KinesisMode {
    /// `log.default_partitions` shards (or a topic's own count), resharded by hand.
    #[default]
    Provisioned,
    /// On-demand capacity: Kinesis adds and removes shards as traffic changes.
    OnDemand,
}

/// The Kinesis and DynamoDB clients. Credentials come from the usual AWS chain
/// (environment, profile, instance or task role), as for S3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KinesisConfig {
    /// Region of the streams and the lease tables.
    pub region: String,
    /// Endpoint URL of the Kinesis API; empty = AWS's own.
    pub endpoint: String,
    /// Endpoint URL of the DynamoDB API; empty = AWS's own.
    pub dynamodb_endpoint: String,
    /// `provisioned` or `on_demand`, for the streams sift creates.
    pub mode: KinesisMode,
    /// Prefix of every stream name: topic `sift.raw` is stream `PREFIXsift.raw`.
    pub stream_prefix: String,
    /// Prefix of each consumer group's lease table: group `sift-clean` keeps
    /// its leases in table `PREFIXsift-clean`.
    pub lease_table_prefix: String,
    /// How long a lease lasts without renewal before another member may take
    /// it (KCL's `failoverTimeMillis`).
    pub lease_duration_ms: u64,
}

impl Default for KinesisConfig {
    fn default() -> Self {
        KinesisConfig {
            region: "us-east-1".into(),
            endpoint: String::new(),
            dynamodb_endpoint: String::new(),
            mode: KinesisMode::default(),
            stream_prefix: String::new(),
            lease_table_prefix: "sift-leases-".into(),
            lease_duration_ms: 10_000,
        }
    }
}

/// Which object store to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectsBackend {
    /// A directory under `data_dir/objects`.
    #[default]
    Embedded,
    /// Amazon S3 or an S3-compatible store (needs the `s3` cargo feature).
    S3,
}

/// The object store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectsConfig {
    /// `embedded` or `s3`.
    pub backend: ObjectsBackend,
    /// Settings of the S3 client.
    pub s3: S3Config,
}

impl Default for ObjectsConfig {
    fn default() -> Self {
        ObjectsConfig {
            backend: ObjectsBackend::Embedded,
            s3: S3Config::default(),
        }
    }
}

/// The S3 client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Bucket holding every sift object.
    pub bucket: String,
    /// Region name.
    pub region: String,
    /// Endpoint URL of an S3-compatible store; empty = AWS's own endpoints.
    pub endpoint: String,
    /// Address buckets by path (`endpoint/bucket/key`), as most S3-compatible stores need.
    pub path_style: bool,
    /// Create the bucket at startup when it does not exist (needs the permission to).
    pub create_bucket: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: "sift".into(),
            region: "us-east-1".into(),
            endpoint: String::new(),
            path_style: false,
            create_bucket: false,
        }
    }
}

/// Which table implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableBackend {
    /// A `redb` database file at `data_dir/table.redb`.
    #[default]
    Embedded,
    /// HBase through its Thrift gateway (needs the `hbase` cargo feature).
    Hbase,
}

/// The wide-column table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    /// `embedded` or `hbase`.
    pub backend: TableBackend,
    /// Settings of the HBase client.
    pub hbase: HbaseConfig,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            backend: TableBackend::Embedded,
            hbase: HbaseConfig::default(),
        }
    }
}

/// The HBase Thrift client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HbaseConfig {
    /// Thrift1 gateway address, `host:port`: every read and write.
    pub address: String,
    /// Thrift2 gateway address, `host:port`, used only to add a column family
    /// to an existing table (Thrift1 cannot alter a table); empty = none, and
    /// such a change is left to the HBase shell.
    pub admin_address: String,
    /// Connections kept open to the gateway.
    pub pool_size: u32,
    /// Connect, read and write timeout of one gateway call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HbaseConfig {
    fn default() -> Self {
        HbaseConfig {
            address: "127.0.0.1:9090".into(),
            admin_address: "127.0.0.1:9091".into(),
            pool_size: 8,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Which search index to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchBackend {
    /// `tantivy` indexes under `data_dir/search`.
    #[default]
    Embedded,
    /// Elasticsearch (or a compatible server; needs the `elasticsearch` cargo feature).
    Elasticsearch,
}

/// The search index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    /// `embedded` or `elasticsearch`.
    pub backend: SearchBackend,
    /// Settings of the Elasticsearch client.
    pub elasticsearch: ElasticsearchConfig,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            backend: SearchBackend::Embedded,
            elasticsearch: ElasticsearchConfig::default(),
        }
    }
}

/// The Elasticsearch client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticsearchConfig {
    /// Base URL of the cluster.
    pub url: String,
    /// User for HTTP basic authentication; empty = none.
    pub username: String,
    /// Password for HTTP basic authentication (better set from the environment:
    /// `SIFT__SEARCH__ELASTICSEARCH__PASSWORD`).
    pub password: String,
    /// Timeout of one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ElasticsearchConfig {
    fn default() -> Self {
        ElasticsearchConfig {
            url: "http://127.0.0.1:9200".into(),
            username: String::new(),
            password: String::new(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Which cache to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheBackend {
    /// In the process's memory (lost on exit; refilled from the table).
    #[default]
    Embedded,
    /// Redis (needs the `redis` cargo feature).
    Redis,
}

/// The cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `embedded` or `redis`.
    pub backend: CacheBackend,
    /// Most entries the embedded cache keeps per namespace before evicting.
    pub max_entries: u64,
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`.
    pub redis_url: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            backend: CacheBackend::Embedded,
            max_entries: 1_000_000,
            redis_url: "redis://127.0.0.1:6379/0".into(),
        }
    }
}

/// Format of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `sift ingest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// The sources file (TOML); `--sources` wins.
    pub sources: PathBuf,
    /// Fetches in flight at once, over all hosts.
    pub max_concurrency: u32,
    /// Fetches in flight at once per host.
    pub per_host_concurrency: u32,
    /// Requests per second per host, unless a source sets its own `rate_limit`.
    pub per_host_rate: f64,
    /// Timeout of one request (connect, headers and body).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Tries of one URL on a timeout, connection error, 429 or 5xx (1 = no retry).
    pub max_attempts: u32,
    /// First retry delay; doubled each try, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Redirects followed before a URL is given up as a loop.
    pub max_redirects: u32,
    /// User-Agent sent with every request and matched against robots.txt.
    pub user_agent: String,
    /// Largest body fetched, unless a source sets `max_bytes`; a larger one goes to the dead-letter topic.
    pub max_document_bytes: u64,
    /// A text longer than this is written to the object store and the message
    /// carries its URI (claim check), so no message exceeds the log's 1 MB.
    pub claim_check_bytes: u64,
    /// An identical text (by content hash) seen within this long is dropped.
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// How long a fetched robots.txt is trusted.
    #[serde(with = "humantime_serde")]
    pub robots_ttl: Duration,
    /// Consumer group on `sift.sources`: the daemons with this group share
    /// the sources (each site goes to one instance); "" = every instance
    /// visits every source of its file.
    pub group: String,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            sources: PathBuf::from("sources.toml"),
            max_concurrency: 64,
            per_host_concurrency: 2,
            per_host_rate: 2.0,
            timeout: Duration::from_secs(30),
            max_attempts: 4,
            retry_backoff: Duration::from_millis(500),
            max_redirects: 5,
            user_agent: concat!("sift/", env!("CARGO_PKG_VERSION")).into(),
            max_document_bytes: 50 * 1024 * 1024,
            claim_check_bytes: 900 * 1024,
            dedupe_window: Duration::from_secs(7 * 24 * 3600),
            robots_ttl: Duration::from_secs(3600),
            group: "sift-ingest".into(),
        }
    }
}

/// `sift clean`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanConfig {
    /// Consumer group on `sift.raw`; instances with the same group share the partitions.
    pub group: String,
    /// Records taken from the log per batch.
    pub batch_size: u32,
    /// A text shorter than this after normalization (in characters) is dropped to the dead-letter topic.
    pub min_chars: u32,
    /// Two texts of one source whose 64-bit SimHashes differ in at most this
    /// many bits are near-duplicates; the later one is dropped. 0 = off.
    pub near_duplicate_bits: u32,
    /// SimHashes remembered per source for the near-duplicate check.
    pub near_duplicate_window: u32,
    /// Languages kept (ISO 639-3 codes such as `eng`); empty = all. Each
    /// must be a code `language_detector` can return.
    pub languages: Vec<String>,
    /// Which detector tells the language: `fast` (whichlang, 16 languages,
    /// no `lang_confidence` in the metadata) costs ~6 µs a document;
    /// `broad` (whatlang, 70 languages with a confidence) ~75 µs, which
    /// about halves the documents/s of `sift clean`.
    pub language_detector: LanguageDetector,
}

/// Which detector tells a text's language (`clean.language_detector`);
/// what each does is in `clean::language`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LanguageDetector {
    /// `whichlang`: 16 languages, no confidence, ~12× faster than `broad`.
    #[default]
    Fast,
    /// `whatlang`: 70 languages with a confidence; about half the documents/s.
    Broad,
}

impl Default for CleanConfig {
    fn default() -> Self {
        CleanConfig {
            group: "sift-clean".into(),
            batch_size: 500,
            min_chars: 20,
            near_duplicate_bits: 3,
            near_duplicate_window: 10_000,
            languages: Vec::new(),
            language_detector: LanguageDetector::Fast,
        }
    }
}

/// Server-side encryption of archive objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encryption {
    /// None asked for (the bucket's default applies).
    #[default]
    None,
    /// SSE-S3 (`AES256`).
    SseS3,
    /// SSE-KMS with `kms_key_id`.
    SseKms,
}

/// `sift train` and the model registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Datasets read when `--data` is not given: file paths, or `objects:KEY`
    /// for JSON lines in the object store (`.gz` and `.zst` are decompressed).
    /// Empty = the labeled sample bundled with sift.
    pub data: Vec<String>,
    /// Model size: `tiny` (CPU) or `base` (GPU).
    pub preset: String,
    /// Key prefix of the model registry in the object store.
    pub prefix: String,
    /// Figure the champion/challenger gate compares: `hit_at_5`, `p_at_1`,
    /// `recall_at_5` or `mean` (of the three).
    pub gate_metric: String,
    /// Share of sources (by a hash of each document's source, else its id)
    /// held out for validation, percent: the figures reported and gated on,
    /// on sources the model never saw.
    pub validation_percent: u8,
    /// Share of sources held out for tuning, percent: they choose the best
    /// epoch and the weight of the linear model, so nothing is chosen on the
    /// validation sources.
    pub tuning_percent: u8,
    /// Share of the remaining documents (by id) held out to show what a
    /// split by document id would report, percent.
    pub seen_percent: u8,
    /// Train the TF-IDF + linear SVM anchor beside the transformer, report
    /// it, and ship both combined.
    pub linear: bool,
    /// The shipped linear half also reads character 2- to 5-grams within
    /// words (the baseline always reads word grams alone): on the debtags
    /// development set it lifts recall@5 on unseen sources, for a model
    /// file about twice as large and about 90 s more training.
    pub char_grams: bool,
    /// Seed of the weights, the batch order and dropout.
    pub seed: u64,
    /// Add the analysts' decisions (family `r` of the `documents` table) to the training data.
    pub feedback: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: Vec::new(),
            preset: "tiny".into(),
            prefix: "models".into(),
            gate_metric: "hit_at_5".into(),
            validation_percent: 10,
            tuning_percent: 5,
            seen_percent: 3,
            linear: true,
            char_grams: true,
            seed: 42,
            feedback: true,
        }
    }
}

/// `sift infer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferConfig {
    /// Consumer group on `sift.clean`; instances with the same group share partitions.
    pub group: String,
    /// Most records taken from the log per poll.
    pub poll_records: u32,
    /// Most documents in one forward pass.
    pub max_batch_docs: u32,
    /// Most padded tokens (documents × the longest) in one forward pass.
    pub max_batch_tokens: u32,
    /// How long a batch that is not full waits for more documents.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Most documents between the poll and the commit (tokenized, queued,
    /// scored or being written); a full pipeline stops polling.
    pub max_in_flight: u32,
    /// Most rows written to the table (and records to `sift.categorized`) at once.
    pub write_rows: u32,
    /// Where the model runs: `cpu` or `cuda`.
    pub device: DeviceArg,
    /// Arithmetic: `f32`, `int8` (CPU), or `bf16` or `f16` (GPU).
    pub dtype: DtypeArg,
    /// Threads for tokenizing and the model on the CPU; 0 = one per core.
    pub threads: u32,
    /// How often the registry's LATEST is checked for a new model.
    #[serde(with = "humantime_serde")]
    pub model_poll: Duration,
    /// Score with this registry version and never swap; empty = follow LATEST.
    pub model_version: String,
    /// Score every document a second time with this model into shadow
    /// columns analysts do not see: a registry version, or `challenger` (the
    /// newest version newer than LATEST, i.e. the one the gate refused);
    /// empty = no shadow.
    pub shadow_model: String,
    /// Longest text stored in the row (`m:text`), bytes; longer texts are cut at a character boundary.
    pub store_text_bytes: u64,
}

impl Default for InferConfig {
    fn default() -> Self {
        InferConfig {
            group: "sift-infer".into(),
            poll_records: 256,
            max_batch_docs: 32,
            max_batch_tokens: 8192,
            max_wait: Duration::from_millis(5),
            max_in_flight: 2048,
            write_rows: 256,
            device: DeviceArg::Cpu,
            dtype: DtypeArg::F32,
            threads: 0,
            model_poll: Duration::from_secs(30),
            model_version: String::new(),
            shadow_model: String::new(),
            store_text_bytes: 1 << 20,
        }
    }
}

/// `sift dbusa load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DbusaConfig {
    /// Name of the search index that holds the consumer database.
    pub index: String,
    /// Documents per bulk request.
    pub bulk_docs: u32,
    /// Bulk requests in flight at once.
    pub workers: u32,
}

impl Default for DbusaConfig {
    fn default() -> Self {
        DbusaConfig {
            index: "dbusa".into(),
            bulk_docs: 10000,
            workers: 2,
        }
    }
}

/// `sift match`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// Consumer group on `sift.profiles`.
    pub group: String,
    /// Most records taken from the log per poll.
    pub poll_records: u32,
    /// Profiles matched at once (search queries and enrichment calls in flight).
    pub concurrency: u32,
    /// Candidates fetched from the search index per profile.
    pub candidates: u32,
    /// Field weights (JSON written by `sift match fit`); empty = the weights built into sift.
    pub weights: String,
    /// Accept the best candidate when its match probability is at least
    /// this (0 to 1). The probability is its score with the prior of the
    /// database loaded: one person among the people in the index, so the
    /// same setting holds at 200,000 and at 30 million people.
    pub threshold: f64,
    /// ... and beats the runner-up by at least this much (log2 Bayes factor).
    pub margin: f64,
    /// How long a handle → person entry lives in the cache; 0 = until the next refresh.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for MatchConfig {
    fn default() -> Self {
        MatchConfig {
            group: "sift-match".into(),
            poll_records: 256,
            concurrency: 16,
            candidates: 20,
            weights: String::new(),
            threshold: 0.5,
            margin: 2.0,
            cache_ttl: Duration::ZERO,
        }
    }
}

/// The enrichment API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrichConfig {
    /// Base URL; the client posts to `{url}/v3/person.enrich`.
    pub url: String,
    /// API key, sent as `Authorization: Bearer`; empty = enrichment off.
    /// Best given as `SIFT__ENRICH__API_KEY`; never logged or shown.
    pub api_key: String,
    /// Client-side rate limit, requests per minute.
    pub rate_per_minute: u32,
    /// Timeout of one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts of one request while the API answers 429 or 503 (exponential backoff).
    pub max_attempts: u32,
    /// Times a 202 (queued) answer is asked again before the profile is reported as pending.
    pub pending_attempts: u32,
    /// Wait before asking again after a 202.
    #[serde(with = "humantime_serde")]
    pub pending_wait: Duration,
    /// How long a found person is cached (the same handle is not paid for twice).
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long a 404 (not found) is cached.
    #[serde(with = "humantime_serde")]
    pub not_found_ttl: Duration,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        EnrichConfig {
            url: "https://api.fullcontact.com".into(),
            api_key: String::new(),
            rate_per_minute: 6000,
            timeout: Duration::from_secs(10),
            max_attempts: 6,
            pending_attempts: 3,
            pending_wait: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(30 * 86_400),
            not_found_ttl: Duration::from_secs(7 * 86_400),
        }
    }
}

/// `sift archive`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Consumer group on `sift.raw`.
    pub group: String,
    /// Key prefix of the archive in the object store.
    pub prefix: String,
    /// A part is uploaded once its uncompressed JSON lines reach this size.
    pub flush_bytes: u64,
    /// ... or once its oldest record has waited this long.
    #[serde(with = "humantime_serde")]
    pub flush_age: Duration,
    /// zstd level of the parts (1 fast … 19 small).
    pub zstd_level: i32,
    /// Server-side encryption: `none`, `sse_s3` or `sse_kms`.
    pub encryption: Encryption,
    /// KMS key id or ARN for `sse_kms`.
    pub kms_key_id: String,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            group: "sift-archive".into(),
            prefix: "raw".into(),
            flush_bytes: 64 * 1024 * 1024,
            flush_age: Duration::from_secs(300),
            zstd_level: 3,
            encryption: Encryption::None,
            kms_key_id: String::new(),
        }
    }
}

/// `sift review`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReviewConfig {
    /// Address the web UI listens on (`--listen` overrides it).
    pub listen: String,
    /// How long a reviewer holds a document they opened before another
    /// reviewer may be given it; renewed each time they open it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long a login lasts.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Failed logins allowed per user name and per client address per minute;
    /// more are refused with 429 until the minute has passed.
    pub login_attempts_per_minute: u32,
    /// How often the queue is rebuilt from the `documents` table (documents
    /// scored since, decisions made by other servers).
    #[serde(with = "humantime_serde")]
    pub queue_refresh: Duration,
    /// PEM certificate chain; with `tls_key`, the UI is served over HTTPS
    /// and its cookies are `Secure`. Empty = plain HTTP.
    pub tls_cert: String,
    /// PEM private key of `tls_cert`.
    pub tls_key: String,
    /// File of the labels a reviewer may choose (a JSON array, or one label
    /// per line). Empty = the registry's LATEST model's `labels.json`, else
    /// the labels seen in the documents' top 5.
    pub labels: String,
}

impl Default for ReviewConfig {
    fn default() -> Self {
        ReviewConfig {
            listen: "127.0.0.1:8080".into(),
            lease: Duration::from_secs(300),
            session_ttl: Duration::from_secs(12 * 3600),
            login_attempts_per_minute: 5,
            queue_refresh: Duration::from_secs(5),
            tls_cert: String::new(),
            tls_key: String::new(),
            labels: String::new(),
        }
    }
}

/// Logs and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json`. Verbosity comes from `RUST_LOG` (default `info`).
    pub log_format: LogFormat,
    /// Address daemons serve `/metrics` and `/healthz` on; empty = do not serve.
    pub metrics_addr: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: LogFormat::Text,
            metrics_addr: "127.0.0.1:9464".into(),
        }
    }
}

impl Config {
    /// Checks values the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.log.default_partitions == 0 {
            return Err(ConfigError::Value {
                field: "log.default_partitions",
                message: "must be at least 1".into(),
            });
        }
        if self.log.embedded.segment_bytes < 4096 {
            return Err(ConfigError::Value {
                field: "log.embedded.segment_bytes",
                message: "must be at least 4096".into(),
            });
        }
        if self.log.embedded.fsync_interval.is_zero() {
            return Err(ConfigError::Value {
                field: "log.embedded.fsync_interval",
                message: "must be positive; use fsync = \"always\" to sync every write".into(),
            });
        }
        if self.cache.max_entries == 0 {
            return Err(ConfigError::Value {
                field: "cache.max_entries",
                message: "must be at least 1".into(),
            });
        }
        if self.review.lease.is_zero()
            || self.review.session_ttl.is_zero()
            || self.review.queue_refresh.is_zero()
        {
            return Err(ConfigError::Value {
                field: "review.lease, review.session_ttl, review.queue_refresh",
                message: "must be positive durations such as \"5m\"".into(),
            });
        }
        let t = self.matching.threshold;
        if !(t > 0.0 && t < 1.0) {
            return Err(ConfigError::Value {
                field: "match.threshold",
                message: format!(
                    "is a match probability between 0 and 1 (exclusive), not {t}; \
                     it was a score in log2 odds before, which now follows from the probability \
                     and the size of the database (sift match logs the score it needs)"
                ),
            });
        }
        if self.review.login_attempts_per_minute == 0 {
            return Err(ConfigError::Value {
                field: "review.login_attempts_per_minute",
                message: "must be at least 1".into(),
            });
        }
        if self.review.tls_cert.is_empty() != self.review.tls_key.is_empty() {
            return Err(ConfigError::Value {
                field: "review.tls_cert, review.tls_key",
                message: "set both (PEM files) to serve HTTPS, or neither for plain HTTP".into(),
            });
        }
        Ok(())
    }
}

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Built-in default.
    Default,
    /// The config file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(v) => write!(f, "env {v}"),
            Origin::Flag(n) => write!(f, "flag --{n}"),
        }
    }
}

/// The effective configuration and where each field came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The effective configuration.
    pub config: Config,
    /// Dotted field path (e.g. `log.embedded.fsync`) to origin, for every leaf field.
    pub origins: BTreeMap<String, Origin>,
    /// The effective configuration as a TOML tree, in field order.
    pub tree: toml::Table,
}

/// How to load the configuration.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Config file; `None` looks for `./sift.toml` and uses defaults if absent.
    pub file: Option<PathBuf>,
    /// Whether `file` was asked for explicitly (then a missing file is an error).
    pub file_required: bool,
    /// Environment variables to consider (normally `std::env::vars()`).
    pub env: Vec<(String, String)>,
    /// `--data-dir`, which beats the file and the environment.
    pub data_dir: Option<PathBuf>,
}

impl Sources {
    /// Sources as the CLI sees them: `--config`/`SIFT_CONFIG`, the process environment, `--data-dir`.
    pub fn from_cli(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> Self {
        Sources {
            file_required: config.is_some(),
            file: config,
            env: std::env::vars().collect(),
            data_dir,
        }
    }
}

/// Loads defaults, then the file, then environment overrides, then flags.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let mut tree = to_tree(&Config::default());
    let mut origins = BTreeMap::new();
    collect_leaves(&tree, "", &mut |path| {
        origins.insert(path, Origin::Default);
    });

    let path = sources
        .file
        .clone()
        .unwrap_or_else(|| PathBuf::from("sift.toml"));
    match std::fs::read_to_string(&path) {
        Ok(text) => merge_file(&mut tree, &mut origins, &path, &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !sources.file_required => {}
        Err(source) => return Err(ConfigError::Read { path, source }),
    }

    let mut env: Vec<&(String, String)> = sources
        .env
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    env.sort();
    for (var, value) in env {
        apply_env(&mut tree, &mut origins, var, value)?;
    }

    if let Some(dir) = &sources.data_dir {
        tree.insert(
            "data_dir".into(),
            toml::Value::String(dir.display().to_string()),
        );
        origins.insert("data_dir".into(), Origin::Flag("data-dir"));
    }

    let config: Config =
        toml::Value::Table(tree.clone())
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Env {
                var: "(merged)".into(),
                message: e.message().to_string(),
            })?;
    config.validate()?;
    Ok(Loaded {
        config,
        origins,
        tree,
    })
}

fn to_tree(config: &Config) -> toml::Table {
    match toml::Value::try_from(config) {
        Ok(toml::Value::Table(t)) => t,
        _ => {
            unreachable!("Config serializes to a TOML table: all its fields are tables or scalars")
        }
    }
}

fn collect_leaves(table: &toml::Table, prefix: &str, f: &mut dyn FnMut(String)) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => collect_leaves(t, &path, f),
            _ => f(path),
        }
    }
}

fn merge_file(
    tree: &mut toml::Table,
    origins: &mut BTreeMap<String, Origin>,
    path: &Path,
    text: &str,
) -> Result<(), ConfigError> {
    // Parsing straight into Config first gives errors with line and column,
    // and rejects unknown fields and wrong types.
    toml::from_str::<Config>(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let file: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    fn merge(
        dst: &mut toml::Table,
        src: toml::Table,
        prefix: &str,
        origins: &mut BTreeMap<String, Origin>,
        path: &Path,
    ) {
        for (k, v) in src {
            let p = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match (dst.get_mut(&k), v) {
                (Some(toml::Value::Table(d)), toml::Value::Table(s)) => {
                    merge(d, s, &p, origins, path)
                }
                (_, v) => {
                    origins.insert(p, Origin::File(path.to_path_buf()));
                    dst.insert(k, v);
                }
            }
        }
    }
    merge(tree, file, "", origins, path);
    Ok(())
}

fn apply_env(
    tree: &mut toml::Table,
    origins: &mut BTreeMap<String, Origin>,
    var: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Env {
        var: var.to_string(),
        message,
    };
    let rest = &var[ENV_PREFIX.len()..];
    let parts: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
    if parts.iter().any(String::is_empty) {
        return Err(err("empty path segment; use SIFT__SECTION__KEY".into()));
    }
    let path = parts.join(".");
    let (last, parents) = parts
        .split_last()
        .expect("split of a non-empty string has one part");
    let mut table = &mut *tree;
    for p in parents {
        table = match table.get_mut(p) {
            Some(toml::Value::Table(t)) => t,
            _ => return Err(err(format!("no config section `{p}` in `{path}`"))),
        };
    }
    let value = match table.get(last) {
        None => return Err(err(format!("no config field `{path}`"))),
        Some(toml::Value::Table(_)) => {
            return Err(err(format!(
                "`{path}` is a section; name one of its fields"
            )))
        }
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_string()),
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| err(format!("`{path}` takes an integer, got `{raw}`")))?,
        ),
        Some(toml::Value::Float(_)) => toml::Value::Float(
            raw.trim()
                .parse()
                .map_err(|_| err(format!("`{path}` takes a number, got `{raw}`")))?,
        ),
        Some(toml::Value::Boolean(_)) => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
            "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
            _ => return Err(err(format!("`{path}` takes true or false, got `{raw}`"))),
        },
        Some(_) => {
            let wrapped = format!("v = {raw}");
            let parsed: toml::Table = toml::from_str(&wrapped)
                .map_err(|e| err(format!("`{path}`: not a TOML value: {}", e.message())))?;
            parsed
                .get("v")
                .cloned()
                .expect("the table parsed from `v = ...` has key v")
        }
    };
    // Check the type against Config so a bad value names its variable.
    let mut probe = tree.clone();
    set_path(&mut probe, &parts, value.clone());
    toml::Value::Table(probe)
        .try_into::<Config>()
        .map_err(|e| err(e.message().to_string()))?;
    set_path(tree, &parts, value);
    origins.insert(path, Origin::Env(var.to_string()));
    Ok(())
}

fn set_path(tree: &mut toml::Table, parts: &[String], value: toml::Value) {
    let (last, parents) = parts.split_last().expect("caller passes a non-empty path");
    let mut table = tree;
    for p in parents {
        table = match table.get_mut(p) {
            Some(toml::Value::Table(t)) => t,
            _ => return,
        };
    }
    table.insert(last.clone(), value);
}

impl Loaded {
    /// Renders the effective configuration as TOML, each value followed by its
    /// origin, with secrets redacted.
    pub fn render(&self) -> String {
        let mut out = String::new();
        render_table(&self.redacted(), "", &self.origins, &mut out);
        out
    }

    /// The effective configuration with every non-empty secret (a field whose
    /// name mentions a password, secret, token or API key, and the password
    /// of a URL) replaced, for display.
    pub fn redacted(&self) -> toml::Table {
        fn walk(table: &mut toml::Table) {
            for (k, v) in table.iter_mut() {
                match v {
                    toml::Value::Table(t) => walk(t),
                    toml::Value::String(s) if !s.is_empty() && is_secret(k) => {
                        *s = "<redacted>".into();
                    }
                    // A URL may carry a password (`redis://:pw@host`).
                    toml::Value::String(s) if k.ends_with("url") => {
                        if let Some(shown) = without_password(s) {
                            *s = shown;
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut tree = self.tree.clone();
        walk(&mut tree);
        tree
    }
}

/// `s` with the password of its userinfo replaced, if it is a URL with one.
fn without_password(s: &str) -> Option<String> {
    let mut url = url::Url::parse(s).ok()?;
    url.password()?;
    url.set_password(Some("redacted")).ok()?;
    Some(url.to_string())
}

fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "api_key"]
        .iter()
        .any(|w| k.contains(w))
}

fn render_table(
    table: &toml::Table,
    prefix: &str,
    origins: &BTreeMap<String, Origin>,
    out: &mut String,
) {
    let path_of = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    for (k, v) in table {
        if !matches!(v, toml::Value::Table(_)) {
            let path = path_of(k);
            let line = format!("{k} = {v}");
            let origin = origins.get(&path).cloned().unwrap_or(Origin::Default);
            out.push_str(&format!("{line:<48} # {origin}\n"));
        }
    }
    for (k, v) in table {
        if let toml::Value::Table(t) = v {
            let path = path_of(k);
            out.push_str(&format!("\n[{path}]\n"));
            render_table(t, &path, origins, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(env: &[(&str, &str)], file: Option<PathBuf>) -> Sources {
        Sources {
            file_required: file.is_some(),
            file,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            data_dir: None,
        }
    }

    #[test]
    fn no_file_means_embedded_defaults() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = sources(&[], Some(dir.path().join("missing.toml")));
        assert!(matches!(load(&s), Err(ConfigError::Read { .. })));
        let s = Sources {
            file: None,
            ..sources(&[], None)
        };
        let loaded = load(&s)?;
        assert_eq!(loaded.config, Config::default());
        assert!(loaded.origins.values().all(|o| *o == Origin::Default));
        Ok(())
    }

    #[test]
    fn file_then_env_then_flag_with_origins() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("sift.toml");
        std::fs::write(
            &file,
            "data_dir = \"/tmp/x\"\n[log]\ndefault_partitions = 8\n[log.embedded]\nfsync = \"always\"\n",
        )?;
        let mut s = sources(
            &[
                ("SIFT__LOG__DEFAULT_PARTITIONS", "12"),
                ("SIFT__LOG__EMBEDDED__FSYNC_INTERVAL", "50ms"),
                ("SIFT__CACHE__BACKEND", "redis"),
                ("SIFT_CONFIG", "ignored"),
            ],
            Some(file.clone()),
        );
        s.data_dir = Some(PathBuf::from("/tmp/flag"));
        let loaded = load(&s)?;
        let c = &loaded.config;
        assert_eq!(c.log.default_partitions, 12);
        assert_eq!(c.log.embedded.fsync, FsyncPolicy::Always);
        assert_eq!(c.log.embedded.fsync_interval, Duration::from_millis(50));
        assert_eq!(c.cache.backend, CacheBackend::Redis);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/flag"));
        let o = &loaded.origins;
        assert_eq!(o["log.embedded.fsync"], Origin::File(file));
        assert_eq!(
            o["log.default_partitions"],
            Origin::Env("SIFT__LOG__DEFAULT_PARTITIONS".into())
        );
        assert_eq!(o["data_dir"], Origin::Flag("data-dir"));
        assert_eq!(o["table.backend"], Origin::Default);
        let shown = loaded.render();
        assert!(shown.contains("fsync = \"always\""), "{shown}");
        assert!(shown.contains("# env SIFT__CACHE__BACKEND"), "{shown}");
        Ok(())
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("sift.toml");
        std::fs::write(&file, "[log]\npartitions = 3\n")?;
        let err = load(&sources(&[], Some(file.clone())))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("unknown field `partitions`"), "{err}");
        assert!(err.contains("line 2"), "{err}");

        std::fs::write(&file, "")?;
        for (var, val, needle) in [
            ("SIFT__LOG__NOPE", "1", "no config field `log.nope`"),
            ("SIFT__LOG", "1", "is a section"),
            ("SIFT__LOG__DEFAULT_PARTITIONS", "many", "takes an integer"),
            ("SIFT__LOG__BACKEND", "rabbit", "unknown variant"),
            ("SIFT__LOG__DEFAULT_PARTITIONS", "0", "must be at least 1"),
        ] {
            let err = load(&sources(&[(var, val)], Some(file.clone())))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(needle), "{var}={val}: {err}");
        }
        Ok(())
    }

    /// The fields of `Config` that the TOML text `text` does not set.
    fn missing_fields(text: &str) -> anyhow::Result<Vec<String>> {
        let example: toml::Table = toml::from_str(text)?;
        let mut missing = Vec::new();
        collect_leaves(&to_tree(&Config::default()), "", &mut |p| {
            let mut t = &example;
            let parts: Vec<&str> = p.split('.').collect();
            let (last, parents) = parts.split_last().expect("non-empty path");
            let mut found = true;
            for part in parents {
                match t.get(*part) {
                    Some(toml::Value::Table(x)) => t = x,
                    _ => {
                        found = false;
                        break;
                    }
                }
            }
            if !found || !t.contains_key(*last) {
                missing.push(p);
            }
        });
        Ok(missing)
    }

    #[test]
    fn example_file_documents_every_field() -> anyhow::Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sift.example.toml");
        let text = std::fs::read_to_string(&path)?;
        let parsed: Config = toml::from_str(&text)?;
        parsed.validate()?;
        let missing = missing_fields(&text)?;
        assert!(missing.is_empty(), "sift.example.toml lacks {missing:?}");
        Ok(())
    }

    /// deploy/sift.production.toml sets every field, names the real
    /// backends, and leaves the secrets to the environment.
    #[test]
    fn production_file_sets_every_field() -> anyhow::Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sift.production.toml");
        let text = std::fs::read_to_string(&path)?;
        let missing = missing_fields(&text)?;
        assert!(missing.is_empty(), "{} lacks {missing:?}", path.display());

        let in_file: Config = toml::from_str(&text)?;
        assert!(
            in_file.enrich.api_key.is_empty() && in_file.search.elasticsearch.password.is_empty(),
            "secrets belong in the environment, not in {}",
            path.display()
        );
        let loaded = load(&sources(
            &[
                ("SIFT__ENRICH__API_KEY", "key-from-env"),
                ("SIFT__SEARCH__ELASTICSEARCH__PASSWORD", "password-from-env"),
            ],
            Some(path.clone()),
        ))?;
        let c = &loaded.config;
        assert_eq!(c.log.backend, LogBackend::Kafka);
        assert_eq!(c.objects.backend, ObjectsBackend::S3);
        assert_eq!(c.table.backend, TableBackend::Hbase);
        assert_eq!(c.search.backend, SearchBackend::Elasticsearch);
        assert_eq!(c.cache.backend, CacheBackend::Redis);
        assert_eq!(c.infer.device, DeviceArg::Cuda);
        assert_eq!(c.infer.dtype, DtypeArg::Bf16);
        assert!(!c.review.tls_cert.is_empty() && !c.review.tls_key.is_empty());
        assert_eq!(c.enrich.api_key, "key-from-env");
        assert_eq!(c.search.elasticsearch.password, "password-from-env");
        let from_file = loaded
            .origins
            .iter()
            .filter(|(_, o)| !matches!(o, Origin::File(_)))
            .map(|(k, o)| format!("{k} ({o})"))
            .collect::<Vec<_>>();
        assert_eq!(
            from_file,
            [
                "enrich.api_key (env SIFT__ENRICH__API_KEY)",
                "search.elasticsearch.password (env SIFT__SEARCH__ELASTICSEARCH__PASSWORD)"
            ],
            "every other value comes from the file"
        );
        let shown = loaded.render();
        assert!(
            !shown.contains("key-from-env") && !shown.contains("password-from-env"),
            "{shown}"
        );
        Ok(())
    }
}
