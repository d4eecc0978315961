//! `sift infer`: `sift.clean` → the model's top 5 → the `documents` table
//! (families `m` and `c`) and `sift.categorized`.
//!
//! Every instance is a member of the consumer group `infer.group` on
//! `sift.clean`, so more instances (CPU or GPU nodes) share more partitions.
//! Four parts run at once, joined by bounded channels:
//!
//! 1. the **poller** (async) takes records from the log, parses them,
//!    resolves claim-checked texts, sends what it cannot handle to `sift.dlq`
//!    (`bad_json`, `schema_version`, `bad_claim`, `claim_missing`, `bad_id`,
//!    `empty_text`), and tokenizes the rest on the rayon pool (long texts are
//!    cut, never refused). It stops polling while `infer.max_in_flight`
//!    documents are between poll and commit: overload slows consumption
//!    instead of growing memory.
//! 2. the **model thread** (a dedicated OS thread; the model's own matrix
//!    work uses the rayon pool on the CPU, or the GPU) runs the dynamic
//!    batcher ([`batcher`]): documents of similar length are batched up to
//!    `max_batch_docs` documents and `max_batch_tokens` padded tokens, a batch
//!    that is not full leaves after `max_wait`, and the poller tokenizes the
//!    next documents while a batch runs. A batch that fails is retried one
//!    document at a time; a document that still fails goes to `sift.dlq`
//!    (`internal`), so one bad input never stops the daemon.
//! 3. the **writer** (async) writes each scored document's row (`m`: the
//!    cleaned metadata and text; `c`: top 5, model version, scored-at) to the
//!    table in batches of `write_rows`, produces it to `sift.categorized`
//!    keyed by document id, and sends dead letters.
//! 4. the poller also **commits**: a poll's offsets are committed once every
//!    document of it (and of every earlier poll) is in the table, in
//!    `sift.categorized` or in `sift.dlq`. A crash at any moment redelivers
//!    at most the uncommitted records, which rewrite the same rows and keys.
//!
//! The model is hot-swapped between batches ([`model`]). `/metrics` has the
//! queue depth, batch sizes, per-stage latency, documents/s and the model
//! version; `/healthz` says whether backend calls succeed, `/readyz` also
//! whether a model is loaded. SIGTERM stops polling, lets every document in
//! flight reach the table, commits, and exits.

pub mod batcher;
pub mod model;
mod poller;
mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sift_training::{Encoded, Scored};
use tokio::sync::mpsc;

use crate::backends::log::{Log, Message, Record};
use crate::backends::objects::ObjectStore;
use crate::backends::table::Table;
use crate::config::Config;
use crate::daemon::StageHealth;
use crate::documents::{categories, CATEGORIES};
use crate::envelope::{headers, topics, Envelope, Stage, SCHEMA_VERSION};
use crate::metrics::Health;
use crate::stage::{Rejection, Stop};

use self::batcher::Limits;
use self::model::{model_loop, wait_for_model, Slot, Source};
use self::poller::Poller;
use self::writer::write_loop;

pub use crate::daemon::Until;

/// The stage name in metrics and dead letters.
pub const STAGE: Stage = Stage::Infer;

/// Labels kept per document.
pub const TOP_K: usize = 5;

/// Why a record went to the dead-letter topic (the `reason` label).
pub mod reasons {
    pub use crate::stage::reasons::{BAD_CLAIM, BAD_JSON, CLAIM_MISSING, SCHEMA_VERSION};
    /// A document with neither title nor text.
    pub const EMPTY_TEXT: &str = "empty_text";
    /// A document without an id (it would have no row).
    pub const BAD_ID: &str = "bad_id";
    /// Scoring failed even alone (a bug or a device failure; kept for replay).
    pub const INTERNAL: &str = "internal";
}

/// `sift infer` flags; the rest is `[infer]` in the configuration.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InferArgs {
    /// Exit once the consumer group has caught up with the end of `sift.clean` as it was at start.
    #[arg(long, env = "SIFT_INFER_ONCE")]
    pub once: bool,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Score with this model directory and never swap (instead of the registry).
    #[arg(long, env = "SIFT_MODEL")]
    pub model: Option<PathBuf>,
}

/// Which model to score with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelChoice {
    /// The registry's LATEST, followed (hot swap).
    Latest,
    /// One registry version, never swapped.
    Version(String),
    /// A model directory, never swapped.
    Dir(PathBuf),
}

impl ModelChoice {
    /// From the flags and `infer.model_version`.
    pub fn from_config(config: &Config, dir: Option<PathBuf>) -> Self {
        match dir {
            Some(d) => ModelChoice::Dir(d),
            None if !config.infer.model_version.is_empty() => {
                ModelChoice::Version(config.infer.model_version.clone())
            }
            None => ModelChoice::Latest,
        }
    }
}

/// What a run did. Counts are of this process's work; records redelivered
/// after a crash or rebalance count again.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InferSummary {
    /// Records consumed from `sift.clean` and fully handled (committed or committable).
    pub consumed: u64,
    /// Documents scored and written.
    pub scored: u64,
    /// Of those, per model version.
    pub by_model: BTreeMap<String, u64>,
    /// Records sent to `sift.dlq`, by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// Forward passes.
    pub batches: u64,
    /// Seconds to load the first model (before consuming).
    pub model_load_seconds: f64,
    /// Wall time after the model loaded, seconds.
    pub seconds: f64,
    /// Documents scored per second of that time.
    pub docs_per_second: f64,
    /// Median seconds from a record's arrival in `sift.clean` to its row.
    pub latency_p50_seconds: f64,
    /// 99th percentile of the same.
    pub latency_p99_seconds: f64,
    /// Every document's latency, seconds (for benchmarks; not printed).
    #[serde(skip)]
    pub latencies: Vec<f64>,
}

/// How `sift infer` is doing, for `/healthz`: unhealthy while backend calls keep failing.
static HEALTH: StageHealth = StageHealth::new();

/// `/readyz` of `sift infer`: healthy and a model loaded.
pub fn readiness() -> Health {
    Arc::new(|| HEALTH.healthy() && crate::metrics::global().infer_ready.get() == 1)
}

/// Runs `sift infer`.
pub async fn main(config: &Config, args: InferArgs) -> crate::Result<()> {
    crate::device::set_threads(config.infer.threads as usize);
    let log = crate::backends::open_log(config).await?;
    let table = crate::backends::open_table(config).await?;
    let objects = crate::backends::open_objects(config).await?;
    crate::daemon::serve_probes(config, HEALTH.probe(), readiness()).await?;
    let until = if args.once {
        Until::caught_up().or_stopped_by(crate::daemon::shutdown_signal())
    } else {
        Until::stopped_by(crate::daemon::shutdown_signal())
    };
    let choice = ModelChoice::from_config(config, args.model);
    let s = run(log, table, objects, config, choice, until).await?;
    if args.json {
        let text = serde_json::to_string_pretty(&s)
            .map_err(|e| crate::Error::Invalid(format!("cannot print the summary: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "infer finished in {:.2} s ({:.1} docs/s; topic to table p50 {:.0} ms, p99 {:.0} ms)",
        s.seconds,
        s.docs_per_second,
        s.latency_p50_seconds * 1e3,
        s.latency_p99_seconds * 1e3
    );
    println!("  consumed from sift.clean {:>8}", s.consumed);
    println!(
        "  scored and stored        {:>8}  {:?}",
        s.scored, s.by_model
    );
    println!(
        "  dead letters             {:>8}  {:?}",
        s.dead_letters.values().sum::<u64>(),
        s.dead_letters
    );
    println!(
        "  forward passes           {:>8}  ({:.1} documents each)",
        s.batches,
        s.scored as f64 / s.batches.max(1) as f64
    );
    Ok(())
}

/// `infer` settings, checked.
#[derive(Debug, Clone)]
struct Settings {
    group: String,
    poll_records: usize,
    limits: Limits,
    max_in_flight: usize,
    write_rows: usize,
    model_poll: Duration,
    store_text_bytes: usize,
}

impl Settings {
    fn new(config: &Config) -> crate::Result<Self> {
        let c = &config.infer;
        for (name, value) in [
            ("poll_records", c.poll_records),
            ("max_batch_docs", c.max_batch_docs),
            ("max_batch_tokens", c.max_batch_tokens),
            ("max_in_flight", c.max_in_flight),
            ("write_rows", c.write_rows),
        ] {
            if value == 0 {
                return Err(crate::Error::Invalid(format!(
                    "invalid config value infer.{name}: must be at least 1"
                )));
            }
        }
        if c.model_poll.is_zero() {
            return Err(crate::Error::Invalid(
                "invalid config value infer.model_poll: must be longer than 0 s".into(),
            ));
        }
        Ok(Settings {
            group: c.group.clone(),
            poll_records: c.poll_records as usize,
            limits: Limits {
                max_docs: c.max_batch_docs as usize,
                max_tokens: c.max_batch_tokens as usize,
                max_wait: c.max_wait,
            },
            max_in_flight: c.max_in_flight as usize,
            write_rows: c.write_rows as usize,
            model_poll: c.model_poll,
            store_text_bytes: usize::try_from(c.store_text_bytes).unwrap_or(usize::MAX),
        })
    }
}

/// A document on its way through the pipeline.
struct Doc {
    /// The poll it came in.
    unit: u64,
    /// The record, for its timestamp and for a dead letter.
    message: Message,
    /// The cleaned envelope, its text resolved.
    env: Envelope,
    /// Its tokens, by the model of `generation`.
    encoded: Encoded,
    generation: u64,
}

impl Doc {
    fn model_text(&self) -> String {
        model_text(&self.env)
    }
}

/// The text the model reads, as training builds it ([`Envelope::model_input`]).
fn model_text(env: &Envelope) -> String {
    env.model_input()
}

/// A document queued for the model thread.
struct Queued {
    doc: Doc,
    since: Instant,
}

/// What the model thread made of a document.
struct Outcome {
    doc: Doc,
    result: Result<Scoring, Rejection>,
}

/// A document's scores.
struct Scoring {
    version: Arc<str>,
    top: Vec<Scored>,
    /// Per label of `top`, the words that weighed most for it.
    why: Vec<Vec<String>>,
    /// The shadow model's version and top 5, when one scored it too.
    shadow: Option<(Arc<str>, Vec<Scored>)>,
    scored_at_ms: i64,
}

/// Documents made durable (or dead-lettered), reported by the writer.
#[derive(Default)]
struct Done {
    /// Per poll: how many of its documents.
    units: BTreeMap<u64, usize>,
    by_model: BTreeMap<String, u64>,
    dead: Vec<&'static str>,
    latencies: Vec<f64>,
    batches: u64,
}

/// Consumes `sift.clean` in group `infer.group` and writes scored rows
/// until `until`; creates the topics and the table if missing.
pub async fn run(
    log: Arc<dyn Log>,
    table: Arc<dyn Table>,
    objects: Arc<dyn ObjectStore>,
    config: &Config,
    choice: ModelChoice,
    until: Until,
) -> crate::Result<InferSummary> {
    let started = Instant::now();
    let settings = Settings::new(config)?;
    log.create_topic(topics::CLEAN, config.log.default_partitions)
        .await?;
    log.create_topic(topics::CATEGORIZED, config.log.default_partitions)
        .await?;
    log.create_topic(topics::DLQ, 1).await?;
    table
        .ensure_table(crate::documents::TABLE, &crate::documents::FAMILIES)
        .await?;
    let targets = if until.caught_up {
        Some(log.watermarks(topics::CLEAN).await?)
    } else {
        None
    };
    let (stop, stop_watcher) = Stop::bounded(
        until.stop,
        until.caught_up.then_some(crate::stage::ONCE_ATTEMPTS),
    );
    let gave_up = stop.clone();
    let metrics = crate::metrics::global();
    metrics.infer_ready.set(0);

    // The model: loaded before anything is consumed.
    let device = crate::device::device(config.infer.device)
        .map_err(|e| crate::Error::Invalid(e.to_string()))?;
    let arithmetic = config.infer.dtype.arithmetic();
    let slot = Arc::new(Slot::default());
    let source = Source::new(
        objects.clone(),
        &config.train.prefix,
        crate::train::model_cache(config),
        device.clone(),
        arithmetic,
    );
    let model_watcher = match &choice {
        ModelChoice::Dir(dir) => {
            let d = dir.clone();
            let predictor = tokio::task::spawn_blocking(move || {
                sift_training::Predictor::load_as(&d, &device, arithmetic)
            })
            .await
            .map_err(|e| crate::Error::Invalid(format!("loading the model failed: {e}")))?
            .map_err(|e| {
                crate::Error::Invalid(format!("cannot load model {}: {e}", dir.display()))
            })?;
            let loaded = slot.install(dir.display().to_string(), predictor);
            metrics.infer_model_loaded(None, &loaded.version);
            None
        }
        ModelChoice::Version(v) => {
            if !model::swap_to(&slot, &source, v).await {
                return Err(crate::Error::Invalid(format!(
                    "cannot load model version {v} (infer.model_version); see the log above"
                )));
            }
            None
        }
        ModelChoice::Latest => Some(tokio::spawn(model::watch(
            slot.clone(),
            source,
            settings.model_poll,
            stop.clone(),
        ))),
    };
    if !wait_for_model(&slot, &stop).await {
        if let Some(w) = model_watcher {
            w.abort();
        }
        return Ok(InferSummary::default());
    }
    // The shadow is resolved once before anything is consumed, so a run
    // that asks for one scores every document with it; then followed.
    let shadow = Arc::new(Slot::default());
    let shadow_choice = model::ShadowChoice::parse(&config.infer.shadow_model);
    let shadow_watcher = if shadow_choice == model::ShadowChoice::Off {
        None
    } else {
        let mut follower = model::Shadow::new(
            shadow.clone(),
            slot.clone(),
            Source::new(
                objects.clone(),
                &config.train.prefix,
                crate::train::model_cache(config),
                crate::device::device(config.infer.device)
                    .map_err(|e| crate::Error::Invalid(e.to_string()))?,
                arithmetic,
            ),
            shadow_choice,
        );
        follower.refresh().await;
        Some(tokio::spawn(model::watch_shadow(
            follower,
            settings.model_poll,
            stop.clone(),
        )))
    };
    if stop.is_set() {
        if let Some(w) = shadow_watcher {
            w.abort();
        }
        if let Some(w) = model_watcher {
            w.abort();
        }
        return Ok(InferSummary::default());
    }
    metrics.infer_ready.set(1);
    // Throughput counts from here: loading the model is not scoring.
    let loaded_in = started.elapsed().as_secs_f64();
    let started = Instant::now();

    let consumer = log.subscribe(&settings.group, &[topics::CLEAN]).await?;
    tracing::info!(
        group = %settings.group,
        from = topics::CLEAN,
        to = topics::CATEGORIZED,
        model = slot.current().map(|m| m.version.clone()).unwrap_or_default(),
        max_batch_docs = settings.limits.max_docs,
        caught_up = until.caught_up,
        "Scoring."
    );

    let queued = Arc::new(AtomicI64::new(0));
    let (to_model, model_rx) = std_mpsc::channel::<Queued>();
    let (to_writer, writer_rx) = mpsc::channel::<Vec<Outcome>>(64);
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    let model_thread = {
        let slot = slot.clone();
        let limits = settings.limits;
        let queued = queued.clone();
        std::thread::Builder::new()
            .name("sift-infer-model".into())
            .spawn(move || model_loop(model_rx, to_writer, slot, shadow, limits, queued))
            .map_err(|e| crate::Error::io("starting the model thread", e))?
    };
    let writer = tokio::spawn(write_loop(
        table,
        log.clone(),
        objects.clone(),
        writer_rx,
        done_tx,
        settings.clone(),
        stop.clone(),
    ));

    let mut summary = InferSummary::default();
    let mut poller = Poller {
        log,
        objects,
        consumer,
        settings,
        slot,
        stop,
        to_model,
        queued,
        done_rx,
        units: BTreeMap::new(),
        next_unit: 0,
        in_flight: 0,
    };
    let result = poller
        .consume(&mut summary, targets.as_deref(), started)
        .await;
    // Let the model thread finish what it has, then the writer.
    let Poller {
        consumer, to_model, ..
    } = poller;
    drop(to_model);
    let _ = tokio::task::spawn_blocking(move || model_thread.join()).await;
    let _ = writer.await;
    if let Some(w) = model_watcher {
        w.abort();
    }
    if let Some(w) = shadow_watcher {
        w.abort();
    }
    if let Some(w) = stop_watcher {
        w.abort();
    }
    consumer.close().await?;
    metrics.infer_ready.set(0);
    summary.model_load_seconds = loaded_in;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.docs_per_second = summary.scored as f64 / summary.seconds.max(1e-9);
    let (p50, p99) = percentiles(&mut summary.latencies);
    summary.latency_p50_seconds = p50;
    summary.latency_p99_seconds = p99;
    result?;
    gave_up.check()?;
    tracing::info!(
        consumed = summary.consumed,
        scored = summary.scored,
        dead_letters = summary.dead_letters.values().sum::<u64>(),
        seconds = summary.seconds,
        "Stopped scoring."
    );
    Ok(summary)
}

/// The median and 99th percentile of `values` (sorted in place).
fn percentiles(values: &mut [f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// A `sift.categorized` record's value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Categorized {
    /// Schema version of this record.
    pub v: u32,
    /// Document id (also the key and the row).
    pub id: String,
    /// Source tag.
    pub source: String,
    /// URL.
    pub url: String,
    /// Title.
    pub title: String,
    /// The top 5, best first.
    pub top5: Vec<Scored>,
    /// Model version that scored it.
    pub model_version: String,
    /// When, ms since the epoch.
    pub scored_at_ms: i64,
}

/// A scored document read back from the table (tests, the review UI).
pub fn top5_of(row: &crate::backends::table::Row) -> Option<Vec<Scored>> {
    let value = row.get(CATEGORIES, categories::TOP5.as_bytes())?;
    serde_json::from_slice(value).ok()
}

/// The bytes of an envelope on `sift.clean` (tests and benchmarks).
pub fn clean_record(env: &Envelope) -> Record {
    Record::new(
        env.id.clone(),
        Bytes::from(serde_json::to_vec(env).unwrap_or_default()),
    )
    .header(headers::SOURCE, env.source.clone())
    .header(headers::SCHEMA, SCHEMA_VERSION.to_string())
}
