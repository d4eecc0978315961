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

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sift_training::{Encoded, Scored};
use tokio::sync::mpsc;

use crate::backends::log::{Commit, Consumer, Log, Message, Record, Watermarks};
use crate::backends::objects::ObjectStore;
use crate::backends::table::{RowPut, Table};
use crate::config::Config;
use crate::daemon::StageHealth;
use crate::dlq::{self, DeadLetter};
use crate::documents::{categories, CATEGORIES};
use crate::envelope::{headers, topics, Envelope, Stage, SCHEMA_VERSION};
use crate::metrics::Health;
use crate::stage::{
    commit, dead_letter, parallel, parse, resolve_claims, retry, standing, Backoff, Rejection, Stop,
};

use self::batcher::{Limits, Pending};
use self::model::{Slot, Source};

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
    let dtype = config.infer.dtype.dtype();
    let slot = Arc::new(Slot::default());
    let source = Source::new(
        objects.clone(),
        &config.train.prefix,
        crate::train::model_cache(config),
        device.clone(),
        dtype,
    );
    let model_watcher = match &choice {
        ModelChoice::Dir(dir) => {
            let d = dir.clone();
            let predictor = tokio::task::spawn_blocking(move || {
                sift_training::Predictor::load(&d, &device, dtype)
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
                dtype,
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

/// Waits until the slot has a model; false if stopped first.
async fn wait_for_model(slot: &Slot, stop: &Stop) -> bool {
    let mut stop = stop.clone();
    while slot.current().is_none() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.wait() => return false,
        }
    }
    true
}

/// A poll's documents until all are durable.
struct Unit {
    commits: Vec<Commit>,
    remaining: usize,
    consumed: u64,
}

/// The poller: owns the consumer, feeds the model thread, commits.
struct Poller {
    log: Arc<dyn Log>,
    objects: Arc<dyn ObjectStore>,
    consumer: Box<dyn Consumer>,
    settings: Settings,
    slot: Arc<Slot>,
    stop: Stop,
    to_model: std_mpsc::Sender<Queued>,
    queued: Arc<AtomicI64>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    units: BTreeMap<u64, Unit>,
    next_unit: u64,
    in_flight: usize,
}

/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often the lag is measured when not running until caught up.
const LAG_EVERY: Duration = Duration::from_secs(2);
/// How long a poll waits when nothing is in flight.
const POLL_WAIT: Duration = Duration::from_millis(200);
/// How long a poll waits while documents are in flight (their completions need handling).
const POLL_WAIT_BUSY: Duration = Duration::from_millis(5);

impl Poller {
    async fn consume(
        &mut self,
        summary: &mut InferSummary,
        targets: Option<&[Watermarks]>,
        started: Instant,
    ) -> crate::Result<()> {
        let metrics = crate::metrics::global();
        let mut last_lag: Option<Instant> = None;
        let mut last_progress = (Instant::now(), 0u64);
        let mut poll_backoff = Backoff::new(&HEALTH);
        loop {
            if !self.settle(summary, false).await {
                return Ok(());
            }
            if self.stop.is_set() {
                break;
            }
            let check_lag = if targets.is_some() {
                self.units.is_empty()
            } else {
                last_lag.is_none_or(|t: Instant| t.elapsed() >= LAG_EVERY)
            };
            if check_lag {
                match standing(
                    self.log.as_ref(),
                    topics::CLEAN,
                    &self.settings.group,
                    targets,
                )
                .await
                {
                    Ok((lag, done)) => {
                        metrics.lag(STAGE, i64::try_from(lag).unwrap_or(i64::MAX));
                        last_lag = Some(Instant::now());
                        if done && self.units.is_empty() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Could not measure the consumer lag."),
                }
            }
            if last_progress.0.elapsed() >= PROGRESS_EVERY {
                let rate = (summary.scored - last_progress.1) as f64
                    / last_progress.0.elapsed().as_secs_f64();
                metrics.infer_docs_per_second.set(rate);
                last_progress = (Instant::now(), summary.scored);
                tracing::info!(
                    consumed = summary.consumed,
                    scored = summary.scored,
                    in_flight = self.in_flight,
                    docs_per_second = rate.round(),
                    total_docs_per_second =
                        (summary.scored as f64 / started.elapsed().as_secs_f64()).round(),
                    "Scoring."
                );
            }
            let room = self.settings.max_in_flight.saturating_sub(self.in_flight);
            if room == 0 {
                // Backpressure: wait for the model and the writer.
                if !self.settle(summary, true).await {
                    return Ok(());
                }
                continue;
            }
            let wait = if self.in_flight > 0 {
                POLL_WAIT_BUSY
            } else {
                POLL_WAIT
            };
            match self
                .consumer
                .poll(self.settings.poll_records.min(room), wait)
                .await
            {
                Ok(batch) if batch.is_empty() => poll_backoff = Backoff::new(&HEALTH),
                Ok(batch) => {
                    poll_backoff = Backoff::new(&HEALTH);
                    if !self.admit(batch, summary).await? {
                        break;
                    }
                }
                Err(e) => {
                    if !poll_backoff
                        .wait(&mut self.stop, "poll sift.clean", &e)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        // Drain: everything in flight reaches the table and is committed.
        while !self.units.is_empty() {
            if !self.settle(summary, true).await {
                break;
            }
        }
        Ok(())
    }

    /// Takes in what the writer finished and commits every complete poll at
    /// the front; with `block`, waits for at least one report first. False
    /// when the writer has gone (it gave up on a backend at shutdown).
    async fn settle(&mut self, summary: &mut InferSummary, block: bool) -> bool {
        let mut reports = Vec::new();
        if block && self.in_flight > 0 {
            match tokio::time::timeout(Duration::from_millis(100), self.done_rx.recv()).await {
                Ok(Some(d)) => reports.push(d),
                Ok(None) => return false,
                Err(_) => {}
            }
        }
        loop {
            match self.done_rx.try_recv() {
                Ok(d) => reports.push(d),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if self.in_flight > 0 {
                        return false;
                    }
                    break;
                }
            }
        }
        for d in reports {
            for (unit, n) in d.units {
                if let Some(u) = self.units.get_mut(&unit) {
                    u.remaining = u.remaining.saturating_sub(n);
                }
                self.in_flight = self.in_flight.saturating_sub(n);
            }
            summary.batches += d.batches;
            for (version, n) in d.by_model {
                summary.scored += n;
                *summary.by_model.entry(version).or_default() += n;
            }
            for reason in d.dead {
                *summary.dead_letters.entry(reason.to_string()).or_default() += 1;
            }
            summary.latencies.extend(d.latencies);
        }
        crate::metrics::global()
            .infer_in_flight
            .set(i64::try_from(self.in_flight).unwrap_or(i64::MAX));
        self.commit_ready(summary).await
    }

    /// Commits the complete polls at the front; false if shutdown came while the log failed.
    async fn commit_ready(&mut self, summary: &mut InferSummary) -> bool {
        let mut latest: BTreeMap<(String, u32), u64> = BTreeMap::new();
        let mut consumed = 0;
        while let Some(entry) = self.units.first_entry() {
            if entry.get().remaining > 0 {
                break;
            }
            let unit = entry.remove();
            consumed += unit.consumed;
            for c in unit.commits {
                let e = latest.entry((c.topic, c.partition)).or_insert(0);
                *e = (*e).max(c.next_offset);
            }
        }
        if latest.is_empty() {
            return true;
        }
        let commits: Vec<Commit> = latest
            .into_iter()
            .map(|((topic, partition), next_offset)| Commit {
                topic,
                partition,
                next_offset,
            })
            .collect();
        if !commit(
            self.consumer.as_mut(),
            &commits,
            &self.settings.group,
            &mut self.stop,
            &HEALTH,
        )
        .await
        {
            return false;
        }
        summary.consumed += consumed;
        HEALTH.recovered();
        true
    }

    /// Parses, resolves claims, dead-letters and tokenizes a poll, and
    /// queues its documents; false if shutdown came while a backend failed.
    async fn admit(
        &mut self,
        batch: Vec<Message>,
        summary: &mut InferSummary,
    ) -> crate::Result<bool> {
        let metrics = crate::metrics::global();
        let unit = self.next_unit;
        self.next_unit += 1;
        let commits = Commit::after(&batch);
        let consumed = batch.len() as u64;
        let values: Vec<Bytes> = batch.iter().map(|m| m.value.clone()).collect();
        let mut parsed = parallel(values, |v| parse(&v).and_then(check)).await?;
        if !resolve_claims(&mut parsed, &self.objects, &self.stop, &HEALTH).await {
            return Ok(false);
        }
        let parsed: Vec<(Message, Result<Envelope, Rejection>)> =
            batch.into_iter().zip(parsed).collect();
        let Some(model) = self.slot.current() else {
            return Err(crate::Error::Invalid("no model loaded".into()));
        };
        let started = Instant::now();
        let encoder = model.clone();
        let prepared: Vec<Result<Doc, Box<DeadLetter>>> = parallel(parsed, move |(message, p)| {
            let env = match p.and_then(non_empty) {
                Ok(env) => env,
                Err(r) => return Err(Box::new(dead_letter(STAGE, &message, r))),
            };
            match encoder.predictor.encode(&model_text(&env)) {
                Ok(encoded) => Ok(Doc {
                    unit,
                    message,
                    env,
                    encoded,
                    generation: encoder.generation,
                }),
                Err(e) => Err(Box::new(dead_letter(
                    STAGE,
                    &message,
                    Rejection::new(reasons::INTERNAL, format!("tokenizing failed: {e}")),
                ))),
            }
        })
        .await?;
        metrics.infer_stage("tokenize", started.elapsed().as_secs_f64());
        let mut docs = Vec::with_capacity(prepared.len());
        let mut dead = Vec::new();
        for p in prepared {
            match p {
                Ok(d) => docs.push(d),
                Err(d) => dead.push(*d),
            }
        }
        if !dead.is_empty() {
            let (log, objects) = (&self.log, &self.objects);
            if !retry(&self.stop, &HEALTH, "send dead letters to sift.dlq", || {
                dlq::send(log.as_ref(), objects.as_ref(), &dead)
            })
            .await
            {
                return Ok(false);
            }
            for d in &dead {
                tracing::warn!(reason = d.reason, detail = %d.detail, "Sent a record to the dead-letter topic.");
                *summary
                    .dead_letters
                    .entry(d.reason.to_string())
                    .or_default() += 1;
            }
        }
        self.units.insert(
            unit,
            Unit {
                commits,
                remaining: docs.len(),
                consumed,
            },
        );
        self.in_flight += docs.len();
        let now = Instant::now();
        self.queued.fetch_add(docs.len() as i64, Ordering::Relaxed);
        for doc in docs {
            if self.to_model.send(Queued { doc, since: now }).is_err() {
                return Err(crate::Error::Invalid("the model thread stopped".into()));
            }
        }
        metrics
            .infer_queue_depth
            .set(self.queued.load(Ordering::Relaxed));
        Ok(true)
    }
}

/// An envelope must have an id to have a row.
fn check(env: Envelope) -> Result<Envelope, Rejection> {
    if env.id.trim().is_empty() {
        return Err(Rejection::new(
            reasons::BAD_ID,
            "the envelope has an empty id, so it cannot have a row".into(),
        ));
    }
    Ok(env)
}

/// A document with nothing to read is not scored.
fn non_empty(env: Envelope) -> Result<Envelope, Rejection> {
    let text = env.text.as_deref().unwrap_or_default();
    if text.trim().is_empty() && env.title.trim().is_empty() {
        return Err(Rejection::new(
            reasons::EMPTY_TEXT,
            "the document has neither title nor text".into(),
        ));
    }
    Ok(env)
}

/// The model thread: the dynamic batcher and the forward passes.
fn model_loop(
    rx: std_mpsc::Receiver<Queued>,
    out: mpsc::Sender<Vec<Outcome>>,
    slot: Arc<Slot>,
    shadow: Arc<Slot>,
    limits: Limits,
    queued: Arc<AtomicI64>,
) {
    let metrics = crate::metrics::global();
    let mut pending: Pending<Doc> = Pending::default();
    let mut closed = false;
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(q) => pending.push(q.doc.encoded.ids.len(), q.since, q.doc),
                Err(_) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(q) => pending.push(q.doc.encoded.ids.len(), q.since, q.doc),
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // A batch that is not full waits up to max_wait after its oldest document.
        while !closed && !pending.can_fill(&limits) {
            let Some(oldest) = pending.oldest() else {
                break;
            };
            let deadline = oldest + limits.max_wait;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(q) => pending.push(q.doc.encoded.ids.len(), q.since, q.doc),
                Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => closed = true,
            }
        }
        let batch = pending.take(&limits);
        if batch.is_empty() {
            continue;
        }
        let left = queued.fetch_sub(batch.len() as i64, Ordering::Relaxed) - batch.len() as i64;
        metrics.infer_queue_depth.set(left);
        let started = Instant::now();
        for w in &batch {
            metrics.infer_stage("queue", started.duration_since(w.since).as_secs_f64());
        }
        let docs: Vec<Doc> = batch.into_iter().map(|w| w.item).collect();
        let mut outcomes = score(docs, &slot);
        shadow_score(&mut outcomes, &shadow);
        if out.blocking_send(outcomes).is_err() {
            break;
        }
    }
}

/// Scores one batch with the current model; a failed batch is retried one
/// document at a time, so only a document that fails alone is dead-lettered.
fn score(mut docs: Vec<Doc>, slot: &Slot) -> Vec<Outcome> {
    let metrics = crate::metrics::global();
    let Some(model) = slot.current() else {
        return docs
            .into_iter()
            .map(|doc| Outcome {
                doc,
                result: Err(Rejection::new(reasons::INTERNAL, "no model loaded".into())),
            })
            .collect();
    };
    // Documents tokenized by a model swapped out since are tokenized again.
    for doc in docs.iter_mut() {
        if doc.generation != model.generation {
            match model.predictor.encode(&doc.model_text()) {
                Ok(e) => {
                    doc.encoded = e;
                    doc.generation = model.generation;
                }
                Err(e) => tracing::warn!(error = %e, "Re-tokenizing after a model swap failed."),
            }
        }
    }
    let version: Arc<str> = Arc::from(model.version.as_str());
    let forward = |docs: &[Doc]| -> Result<Vec<Vec<(u32, f32)>>, String> {
        let refs: Vec<&Encoded> = docs.iter().map(|d| &d.encoded).collect();
        let longest = refs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        metrics.infer_batch_docs.observe(refs.len() as f64);
        metrics
            .infer_batch_padded_tokens
            .observe((longest * refs.len()) as f64);
        let started = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            model.predictor.predict_encoded(&refs, TOP_K)
        }));
        metrics.infer_stage("forward", started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(tops)) if tops.len() == refs.len() => Ok(tops),
            Ok(Ok(tops)) => Err(format!(
                "the model returned {} results for {} documents",
                tops.len(),
                refs.len()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(p) => Err(p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the model panicked".into())),
        }
    };
    let why_of = |doc: &Doc, top: &[(u32, f32)]| -> Vec<Vec<String>> {
        model
            .predictor
            .explain(&doc.model_text(), &doc.encoded, top, WHY_WORDS)
            .into_iter()
            .map(|words| words.into_iter().map(|(w, _)| w).collect())
            .collect()
    };
    let scored = |doc: Doc, top: &[(u32, f32)], why: Vec<Vec<String>>| Outcome {
        doc,
        result: Ok(Scoring {
            version: version.clone(),
            top: model.predictor.name(top).top,
            why,
            shadow: None,
            scored_at_ms: crate::now_ms(),
        }),
    };
    match forward(&docs) {
        Ok(tops) => {
            // The words behind each label are found on the rayon pool: the
            // model thread is the stage's bottleneck.
            let whys: Vec<Vec<Vec<String>>> = {
                use rayon::prelude::*;
                docs.par_iter()
                    .zip(tops.par_iter())
                    .map(|(doc, top)| why_of(doc, top))
                    .collect()
            };
            docs.into_iter()
                .zip(tops)
                .zip(whys)
                .map(|((doc, top), why)| scored(doc, &top, why))
                .collect()
        }
        Err(e) if docs.len() > 1 => {
            tracing::warn!(error = %e, documents = docs.len(), "A batch failed; scoring its documents one at a time.");
            docs.into_iter()
                .map(|doc| match forward(std::slice::from_ref(&doc)) {
                    Ok(tops) => {
                        let why = why_of(&doc, &tops[0]);
                        scored(doc, &tops[0], why)
                    }
                    Err(e) => Outcome {
                        doc,
                        result: Err(Rejection::new(
                            reasons::INTERNAL,
                            format!("scoring failed: {e}"),
                        )),
                    },
                })
                .collect()
        }
        Err(e) => docs
            .into_iter()
            .map(|doc| Outcome {
                doc,
                result: Err(Rejection::new(
                    reasons::INTERNAL,
                    format!("scoring failed: {e}"),
                )),
            })
            .collect(),
    }
}

/// Words kept per label to explain it on the review page.
const WHY_WORDS: usize = 6;

/// Scores the documents the champion scored a second time with the shadow
/// model, if one is loaded, into their [`Scoring::shadow`]. The shadow can
/// never cost a document its champion scores: a shadow failure is logged
/// and the documents go out without shadow columns.
fn shadow_score(outcomes: &mut [Outcome], shadow: &Slot) {
    let Some(model) = shadow.current() else {
        return;
    };
    let scored: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| {
            o.result
                .as_ref()
                .is_ok_and(|s| *s.version != *model.version)
        })
        .map(|(i, _)| i)
        .collect();
    if scored.is_empty() {
        return;
    }
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let encoded = scored
            .iter()
            .map(|&i| model.predictor.encode(&outcomes[i].doc.model_text()))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Encoded> = encoded.iter().collect();
        model.predictor.predict_encoded(&refs, TOP_K)
    }));
    match result {
        Ok(Ok(tops)) if tops.len() == scored.len() => {
            let version: Arc<str> = Arc::from(model.version.as_str());
            for (&i, top) in scored.iter().zip(tops) {
                if let Ok(s) = &mut outcomes[i].result {
                    s.shadow = Some((version.clone(), model.predictor.name(&top).top));
                }
            }
        }
        Ok(Ok(_)) => tracing::warn!("The shadow model returned the wrong number of results; no shadow scores for this batch."),
        Ok(Err(e)) => tracing::warn!(error = %e, "The shadow model failed; no shadow scores for this batch."),
        Err(_) => tracing::warn!("The shadow model panicked; no shadow scores for this batch."),
    }
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

/// `text` cut to at most `max` bytes at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The row and the `sift.categorized` record of a scored document.
fn outputs(doc: &Doc, s: &Scoring, store_text_bytes: usize) -> (RowPut, Record) {
    let mut env = doc.env.clone();
    if let Some(text) = env.text.take() {
        env.text = Some(cut(&text, store_text_bytes).to_owned());
    }
    let top5 = serde_json::to_string(&s.top).unwrap_or_else(|_| "[]".into());
    let why = serde_json::to_string(&s.why).unwrap_or_else(|_| "[]".into());
    let mut row = crate::documents::row_of(&env)
        .cell(CATEGORIES, categories::TOP5, top5)
        .cell(CATEGORIES, categories::WHY, why)
        .cell(CATEGORIES, categories::MODEL_VERSION, s.version.to_string())
        .cell(
            CATEGORIES,
            categories::SCORED_AT_MS,
            s.scored_at_ms.to_string(),
        );
    if let Some((version, top)) = &s.shadow {
        row = row
            .cell(
                CATEGORIES,
                categories::SHADOW_TOP5,
                serde_json::to_string(top).unwrap_or_else(|_| "[]".into()),
            )
            .cell(CATEGORIES, categories::SHADOW_VERSION, version.to_string());
    }
    let value = Categorized {
        v: SCHEMA_VERSION,
        id: env.id.clone(),
        source: env.source.clone(),
        url: env.url.clone(),
        title: env.title.clone(),
        top5: s.top.clone(),
        model_version: s.version.to_string(),
        scored_at_ms: s.scored_at_ms,
    };
    let record = Record::new(
        env.id.clone(),
        serde_json::to_vec(&value).unwrap_or_default(),
    )
    .header(headers::SOURCE, env.source.clone())
    .header(headers::SCHEMA, SCHEMA_VERSION.to_string());
    (row, record)
}

/// The writer: rows to the table, records to `sift.categorized`, dead
/// letters to `sift.dlq`; reports each write to the poller once all are
/// acknowledged. Gives up (returns) only when shutdown was asked for while a
/// backend failed; what it held is then redelivered to the next run.
async fn write_loop(
    table: Arc<dyn Table>,
    log: Arc<dyn Log>,
    objects: Arc<dyn ObjectStore>,
    mut rx: mpsc::Receiver<Vec<Outcome>>,
    done: mpsc::UnboundedSender<Done>,
    settings: Settings,
    stop: Stop,
) {
    let metrics = crate::metrics::global();
    while let Some(first) = rx.recv().await {
        let mut outcomes = first;
        let mut batches = 1;
        while outcomes.len() < settings.write_rows {
            match rx.try_recv() {
                Ok(more) => {
                    outcomes.extend(more);
                    batches += 1;
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut rows = Vec::with_capacity(outcomes.len());
        let mut records = Vec::with_capacity(outcomes.len());
        let mut dead = Vec::new();
        let mut report = Done {
            batches,
            ..Done::default()
        };
        for o in &outcomes {
            *report.units.entry(o.doc.unit).or_default() += 1;
            match &o.result {
                Ok(s) => {
                    let (row, record) = outputs(&o.doc, s, settings.store_text_bytes);
                    rows.push(row);
                    records.push(record);
                    *report.by_model.entry(s.version.to_string()).or_default() += 1;
                }
                Err(r) => {
                    dead.push(dead_letter(
                        STAGE,
                        &o.doc.message,
                        Rejection::new(r.reason, r.detail.clone()),
                    ));
                    report.dead.push(r.reason);
                }
            }
        }
        let table_write = retry(&stop, &HEALTH, "write rows to the documents table", || {
            table.put(crate::documents::TABLE, rows.clone())
        });
        let produce = retry(&stop, &HEALTH, "produce to sift.categorized", || {
            log.produce(topics::CATEGORIZED, records.clone())
        });
        let dead_letters = async {
            dead.is_empty()
                || retry(&stop, &HEALTH, "send dead letters to sift.dlq", || {
                    dlq::send(log.as_ref(), objects.as_ref(), &dead)
                })
                .await
        };
        let (a, b, c) = tokio::join!(table_write, produce, dead_letters);
        if !(a && b && c) {
            tracing::warn!(
                documents = outcomes.len(),
                "Stopped while a backend failed; these documents were not committed and will be scored again."
            );
            return;
        }
        let now = crate::now_ms();
        for o in &outcomes {
            if o.result.is_ok() {
                let seconds = (now - o.doc.message.timestamp_ms).max(0) as f64 / 1e3;
                metrics.infer_latency_seconds.observe(seconds);
                report.latencies.push(seconds);
            }
        }
        metrics.infer_stage("write", started.elapsed().as_secs_f64());
        metrics.stage(STAGE, rows.len() as u64);
        if done.send(report).is_err() {
            return;
        }
    }
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
