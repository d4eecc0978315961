//! `sift clean`: `sift.raw` → normalize, language, near-duplicates → `sift.clean`.
//!
//! Every instance is a member of the consumer group `clean.group` on
//! `sift.raw`, so more instances share more partitions. Each raw record goes
//! through, in order:
//!
//! 1. parsing: not an envelope → dead letter `bad_json`; an envelope of
//!    another schema version → `schema_version`;
//! 2. the claim check, for a body stored aside (`body_uri`): a URI that is
//!    not a claim check → `bad_claim`; no such object → `claim_missing`;
//! 3. normalization of title and text ([`normalize`]); a text shorter than
//!    `clean.min_chars` characters (an empty one included) → `too_short`;
//! 4. language identification ([`language`], with the detector of
//!    `clean.language_detector`): `lang` goes into the metadata, and
//!    `lang_confidence` too with the `broad` detector (the default `fast` one
//!    gives no confidence); a language outside a non-empty `clean.languages`
//!    is dropped (a policy, counted as a drop, not a dead letter);
//! 5. near-duplicates ([`simhash`]): a text whose SimHash is within
//!    `clean.near_duplicate_bits` of one of the last
//!    `clean.near_duplicate_window` documents kept from the same source is
//!    dropped. A document with the same id does not count: a re-fetched page
//!    that changed a little is an update, and replaces its entry. The SimHash
//!    goes into the metadata (`simhash`, 16 hex digits).
//!
//! The window lives in this process's memory, per instance (about 120 bytes
//! per remembered document: 1.2 MB per source with the default window).
//! After a restart or a rebalance it starts empty, and instances do not see
//! each other's documents, so a near-duplicate may then pass. What is
//! produced stays idempotent all the same: `sift.clean` is keyed by document
//! id, so a redelivered record yields the same key again.
//!
//! The cleaned envelope goes to `sift.clean` keyed by document id; a text
//! longer than `ingest.claim_check_bytes` is written to the object store
//! under `claims/<id>/clean-<hash>.txt` (content-addressed, so rewriting it
//! is harmless) and the envelope carries its `body_uri` instead.
//!
//! Offsets are committed only once the batch's records are in `sift.clean`
//! and its dead letters in `sift.dlq`: at-least-once. Backend errors are
//! logged and retried with backoff; no single record stops the daemon.
//! Parsing and cleaning run on the rayon pool, and the next batch is cleaned
//! while the previous one is being sent, so both kinds of work overlap.
//!
//! [`run`] is the library entry point (tests, `sift run`); [`main`] wires
//! the configured backends, `/metrics` and `/healthz`, and the signals.

pub mod language;
pub mod normalize;
pub mod simhash;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

use crate::backends::log::{Commit, Consumer, Log, LogError, Message, Record, Watermarks};
use crate::backends::objects::{self, ObjectStore, PutMode};
use crate::config::Config;
use crate::daemon::StageHealth;
use crate::dlq::{self, DeadLetter};
use crate::envelope::{self, headers, topics, Envelope, Stage, CLAIM_PREFIX, SCHEMA_VERSION};
use crate::stage::{
    commit, dead_letter, parallel, parse, resolve_claims, retry, standing, Backoff, Rejection,
    Stop, RECORD_LIMIT,
};

use self::language::LanguageDetector;
use self::simhash::NearDuplicates;

/// The stage name in metrics and dead letters.
pub const STAGE: Stage = Stage::Clean;

/// Why a record went to the dead-letter topic (the `reason` label).
pub mod reasons {
    pub use crate::stage::reasons::{BAD_CLAIM, BAD_JSON, CLAIM_MISSING, SCHEMA_VERSION};
    /// A text shorter than `clean.min_chars` after normalization.
    pub const TOO_SHORT: &str = "too_short";
    /// A cleaned envelope larger than a log record may be (a huge title or metadata).
    pub const TOO_LARGE: &str = "too_large";
    /// A document id that cannot be part of an object key.
    pub const BAD_ID: &str = "bad_id";
    /// Cleaning the record failed unexpectedly (a bug; the record is kept for replay).
    pub const INTERNAL: &str = "internal";
}

/// Why a document was dropped on purpose (the `reason` label of drops).
pub mod drops {
    /// Its language is not in `clean.languages`.
    pub const LANGUAGE: &str = "language";
    /// A near-duplicate of a recent document of the same source.
    pub const NEAR_DUPLICATE: &str = "near_duplicate";
}

/// Metadata keys `sift clean` sets.
pub mod meta {
    /// ISO 639-3 code of the text's language (`und` when it cannot be told).
    pub const LANG: &str = "lang";
    /// Confidence of `lang`, 0 to 1; only with `clean.language_detector = "broad"`.
    pub const LANG_CONFIDENCE: &str = "lang_confidence";
    /// SimHash of the text, 16 hex digits.
    pub const SIMHASH: &str = "simhash";
}

/// `sift clean` flags.
#[derive(Debug, clap::Args)]
pub struct CleanArgs {
    /// Exit once the consumer group has caught up with the end of `sift.raw` as it was at start.
    #[arg(long, env = "SIFT_CLEAN_ONCE")]
    pub once: bool,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What a run did. Counts are of this process's work; records redelivered
/// after a crash or rebalance count again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CleanSummary {
    /// Records consumed from `sift.raw` and fully handled (their batch committed or committable).
    pub consumed: u64,
    /// Documents produced to `sift.clean`.
    pub produced: u64,
    /// Of those, texts written to the object store (claim checks).
    pub claim_checked: u64,
    /// Records sent to `sift.dlq`, by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// Documents dropped on purpose, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Records consumed per second.
    pub docs_per_second: f64,
}

pub use crate::daemon::Until;

/// How `sift clean` is doing, for `/healthz`: unhealthy while backend calls keep failing.
static HEALTH: StageHealth = StageHealth::new();

/// Runs `sift clean`.
pub async fn main(config: &Config, args: CleanArgs) -> crate::Result<()> {
    let log = crate::backends::open_log(config).await?;
    let objects = crate::backends::open_objects(config).await?;
    crate::daemon::serve_metrics(config, HEALTH.probe()).await?;
    let until = if args.once {
        Until::caught_up().or_stopped_by(crate::daemon::shutdown_signal())
    } else {
        Until::stopped_by(crate::daemon::shutdown_signal())
    };
    let s = run(log, objects, config, until).await?;
    if args.json {
        let text = serde_json::to_string_pretty(&s)
            .map_err(|e| crate::Error::Invalid(format!("cannot print the summary: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "clean finished in {:.2} s ({:.0} docs/s)",
        s.seconds, s.docs_per_second
    );
    println!("  consumed from sift.raw   {:>8}", s.consumed);
    println!(
        "  produced to sift.clean   {:>8}  ({} claim-checked)",
        s.produced, s.claim_checked
    );
    println!(
        "  dead letters             {:>8}  {:?}",
        s.dead_letters.values().sum::<u64>(),
        s.dead_letters
    );
    println!(
        "  dropped                  {:>8}  {:?}",
        s.dropped.values().sum::<u64>(),
        s.dropped
    );
    Ok(())
}

/// How often progress is logged on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often the consumer lag is measured (every batch when running until caught up).
const LAG_EVERY: Duration = Duration::from_secs(2);
/// How long a poll waits for records when no batch is waiting to be sent.
const POLL_WAIT: Duration = Duration::from_millis(500);

/// Consumes `sift.raw` in group `clean.group` and produces `sift.clean`
/// until `until`; creates `sift.raw`, `sift.clean` and `sift.dlq` if missing.
pub async fn run(
    log: Arc<dyn Log>,
    objects: Arc<dyn ObjectStore>,
    config: &Config,
    until: Until,
) -> crate::Result<CleanSummary> {
    let started = Instant::now();
    let settings = Arc::new(Settings::new(config)?);
    log.create_topic(topics::RAW, config.log.default_partitions)
        .await?;
    log.create_topic(topics::CLEAN, config.log.default_partitions)
        .await?;
    log.create_topic(topics::DLQ, 1).await?;
    let targets = if until.caught_up {
        Some(log.watermarks(topics::RAW).await?)
    } else {
        None
    };
    let (stop, watcher) = Stop::bounded(
        until.stop,
        until.caught_up.then_some(crate::stage::ONCE_ATTEMPTS),
    );
    let gave_up = stop.clone();
    let consumer = log.subscribe(&settings.group, &[topics::RAW]).await?;
    tracing::info!(
        group = %settings.group,
        from = topics::RAW,
        to = topics::CLEAN,
        caught_up = until.caught_up,
        "Cleaning."
    );
    let sender = Sender { log, objects, stop };
    let mut near = NearDuplicates::new(
        config.clean.near_duplicate_bits,
        config.clean.near_duplicate_window as usize,
    );
    let mut summary = CleanSummary::default();
    let result = consume(
        consumer,
        sender,
        settings,
        &mut near,
        &mut summary,
        targets.as_deref(),
        started,
    )
    .await;
    if let Some(w) = watcher {
        w.abort();
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.docs_per_second = summary.consumed as f64 / summary.seconds.max(1e-9);
    result?;
    gave_up.check()?;
    tracing::info!(
        consumed = summary.consumed,
        produced = summary.produced,
        dead_letters = summary.dead_letters.values().sum::<u64>(),
        dropped = summary.dropped.values().sum::<u64>(),
        seconds = summary.seconds,
        "Stopped cleaning."
    );
    Ok(summary)
}

/// `clean` settings, checked.
struct Settings {
    group: String,
    batch_size: usize,
    min_chars: usize,
    /// Empty = every language.
    languages: Vec<String>,
    detector: LanguageDetector,
    claim_check_bytes: usize,
}

impl Settings {
    fn new(config: &Config) -> crate::Result<Self> {
        let c = &config.clean;
        if c.batch_size == 0 {
            return Err(crate::Error::Invalid(
                "invalid config value clean.batch_size: must be at least 1".into(),
            ));
        }
        let detector = c.language_detector;
        if let Some(bad) = c.languages.iter().find(|l| !detector.is_known(l)) {
            let more = match detector {
                LanguageDetector::Fast => {
                    "; clean.language_detector = \"broad\" tells 70 languages"
                }
                LanguageDetector::Broad => "",
            };
            return Err(crate::Error::Invalid(format!(
                "invalid config value clean.languages: `{bad}` is not an ISO 639-3 code \
                 the {} language detector can return; it returns {} (\"und\" for texts \
                 whose language cannot be told){more}",
                detector.name(),
                detector.codes().join(", "),
            )));
        }
        Ok(Settings {
            group: c.group.clone(),
            batch_size: c.batch_size as usize,
            min_chars: c.min_chars as usize,
            languages: c.languages.clone(),
            detector,
            claim_check_bytes: usize::try_from(config.ingest.claim_check_bytes)
                .unwrap_or(usize::MAX),
        })
    }
}

/// What became of one raw record.
enum Verdict {
    /// Cleaned, for `sift.clean` (unless it is a near-duplicate).
    Clean(Box<Cleaned>),
    /// For `sift.dlq`.
    Dead(Rejection),
    /// Dropped on purpose.
    Dropped(Rejection),
}

/// A cleaned document ready to send.
struct Cleaned {
    id: String,
    source: String,
    simhash: u64,
    record: Record,
    /// Object to write before the record is sent: key and text.
    claim: Option<(String, Bytes)>,
}

/// Size of a record as the log counts it, roughly (the limit leaves room for framing).
fn record_size(r: &Record) -> usize {
    r.key.as_ref().map_or(0, |k| k.len())
        + r.value.len()
        + r.headers
            .iter()
            .map(|(n, v)| 6 + n.len() + v.len())
            .sum::<usize>()
}

/// Normalizes, tags and hashes one envelope whose text is in hand.
fn clean(mut env: Envelope, s: &Settings) -> Verdict {
    let raw = env.text.take().unwrap_or_default();
    let text = normalize::text(&raw);
    drop(raw);
    if text.chars < s.min_chars {
        return Verdict::Dead(Rejection::new(
            reasons::TOO_SHORT,
            format!(
                "the text has {} characters after normalization; clean.min_chars is {}",
                text.chars, s.min_chars
            ),
        ));
    }
    let lang = s.detector.detect(&text.text);
    if !s.languages.is_empty() && !s.languages.iter().any(|l| l == lang.code) {
        let confidence = lang
            .confidence
            .map(|c| format!(" (confidence {c})"))
            .unwrap_or_default();
        return Verdict::Dropped(Rejection::new(
            drops::LANGUAGE,
            format!(
                "language `{}`{confidence} is not in clean.languages",
                lang.code
            ),
        ));
    }
    let simhash = simhash::simhash(&text.text);
    env.title = normalize::title(&env.title);
    env.metadata
        .insert(meta::LANG.into(), serde_json::Value::from(lang.code));
    match lang.confidence {
        Some(confidence) => {
            env.metadata.insert(
                meta::LANG_CONFIDENCE.into(),
                serde_json::Value::from(confidence),
            );
        }
        // Whatever the raw record carried would pass for this detector's.
        None => {
            env.metadata.remove(meta::LANG_CONFIDENCE);
        }
    }
    env.metadata.insert(
        meta::SIMHASH.into(),
        serde_json::Value::from(format!("{simhash:016x}")),
    );
    let claim = if text.text.len() > s.claim_check_bytes {
        let key = format!(
            "{CLAIM_PREFIX}{}/clean-{:032x}.txt",
            env.id,
            xxh3_128(text.text.as_bytes())
        );
        if let Err(e) = objects::validate_key(&key) {
            return Verdict::Dead(Rejection::new(
                reasons::BAD_ID,
                format!("the text needs a claim check but the document id cannot be part of an object key: {e}"),
            ));
        }
        env.text = None;
        env.body_uri = Some(envelope::claim_uri(&key));
        Some((key, Bytes::from(text.text)))
    } else {
        env.text = Some(text.text);
        env.body_uri = None;
        None
    };
    // Sized for the text plus the fields around it, so it is written without regrowing.
    let mut value = Vec::with_capacity(
        env.text.as_ref().map_or(0, String::len) + env.title.len() + env.url.len() + 1024,
    );
    if let Err(e) = serde_json::to_writer(&mut value, &env) {
        return Verdict::Dead(Rejection::new(
            reasons::BAD_JSON,
            format!("the cleaned envelope cannot be written as JSON: {e}"),
        ));
    }
    let record = Record::new(env.id.clone(), value)
        .header(headers::SOURCE, env.source.clone())
        .header(headers::CONTENT_TYPE, env.content_type.clone())
        .header(headers::SCHEMA, SCHEMA_VERSION.to_string());
    let size = record_size(&record);
    if size > RECORD_LIMIT {
        return Verdict::Dead(Rejection::new(
            reasons::TOO_LARGE,
            format!("the cleaned envelope is {size} bytes even with its text claim-checked; a log record holds at most {RECORD_LIMIT}"),
        ));
    }
    Verdict::Clean(Box::new(Cleaned {
        id: env.id,
        source: env.source,
        simhash,
        record,
        claim,
    }))
}

/// [`clean`], with a panic turned into a dead letter rather than a dead daemon.
fn clean_guarded(env: Envelope, s: &Settings) -> Verdict {
    std::panic::catch_unwind(AssertUnwindSafe(|| clean(env, s))).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Verdict::Dead(Rejection::new(
            reasons::INTERNAL,
            format!("cleaning panicked: {what}"),
        ))
    })
}

/// Sends what a batch yielded.
#[derive(Clone)]
struct Sender {
    log: Arc<dyn Log>,
    objects: Arc<dyn ObjectStore>,
    stop: Stop,
}

/// A batch cleaned and decided, waiting to be sent and committed.
struct Prepared {
    commits: Vec<Commit>,
    consumed: u64,
    clean: Vec<Cleaned>,
    dead: Vec<DeadLetter>,
    dropped: Vec<&'static str>,
}

/// What a poll came to.
enum Polled {
    Batch(Prepared),
    Empty,
    /// Shutdown was asked for while claim checks could not be read.
    Stopped,
    Failed(LogError),
}

/// The consuming loop. While one batch is sent and committed the next is
/// polled and cleaned, so the cores stay busy; batches are still sent and
/// committed one after the other, in order.
async fn consume(
    mut consumer: Box<dyn Consumer>,
    sender: Sender,
    settings: Arc<Settings>,
    near: &mut NearDuplicates,
    summary: &mut CleanSummary,
    targets: Option<&[Watermarks]>,
    started: Instant,
) -> crate::Result<()> {
    let metrics = crate::metrics::global();
    let mut stop = sender.stop.clone();
    let mut last_lag: Option<Instant> = None;
    let mut last_progress = Instant::now();
    let mut lag = 0u64;
    let mut poll_backoff = Backoff::for_polls(&HEALTH);
    let mut pending: Option<Prepared> = None;
    loop {
        if stop.is_set() {
            break;
        }
        if targets.is_some() || last_lag.is_none_or(|t| t.elapsed() >= LAG_EVERY) {
            match standing(sender.log.as_ref(), topics::RAW, &settings.group, targets).await {
                Ok((l, done)) => {
                    lag = l;
                    metrics.lag(STAGE, i64::try_from(l).unwrap_or(i64::MAX));
                    last_lag = Some(Instant::now());
                    if done {
                        break;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Could not measure the consumer lag."),
            }
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            progress(summary, lag, started);
        }
        // With a batch to send, take only what is there already.
        let wait = if pending.is_some() {
            Duration::ZERO
        } else {
            POLL_WAIT
        };
        let (sent, polled) = tokio::join!(
            async {
                match &pending {
                    Some(p) => sender.send(p).await,
                    None => true,
                }
            },
            async {
                let polled: crate::Result<Polled> = match consumer
                    .poll(settings.batch_size, wait)
                    .await
                {
                    Ok(batch) if batch.is_empty() => Ok(Polled::Empty),
                    Ok(batch) => Ok(
                        prepare(batch, &settings, &sender.objects, &sender.stop, near)
                            .await?
                            .map_or(Polled::Stopped, Polled::Batch),
                    ),
                    Err(e) => Ok(Polled::Failed(e)),
                };
                polled
            }
        );
        if let Some(p) = pending.take() {
            if !sent
                || !commit(
                    consumer.as_mut(),
                    &p.commits,
                    &settings.group,
                    &mut stop,
                    &HEALTH,
                )
                .await
            {
                return Ok(());
            }
            account(summary, &p);
        }
        match polled? {
            Polled::Batch(p) => {
                poll_backoff = Backoff::for_polls(&HEALTH);
                pending = Some(p);
            }
            Polled::Empty => poll_backoff = Backoff::for_polls(&HEALTH),
            Polled::Stopped => break,
            Polled::Failed(e) => {
                if !poll_backoff.wait(&mut stop, "poll sift.raw", &e).await {
                    break;
                }
            }
        }
    }
    // Finish the batch in hand.
    if let Some(p) = pending.take() {
        if !sender.send(&p).await
            || !commit(
                consumer.as_mut(),
                &p.commits,
                &settings.group,
                &mut stop,
                &HEALTH,
            )
            .await
        {
            return Ok(());
        }
        account(summary, &p);
    }
    consumer.close().await?;
    Ok(())
}

fn progress(s: &CleanSummary, lag: u64, started: Instant) {
    tracing::info!(
        consumed = s.consumed,
        produced = s.produced,
        dead_letters = s.dead_letters.values().sum::<u64>(),
        dropped = s.dropped.values().sum::<u64>(),
        lag,
        docs_per_second = (s.consumed as f64 / started.elapsed().as_secs_f64().max(1e-9)).round(),
        "Cleaning."
    );
}

/// Counts a sent and committed batch.
fn account(summary: &mut CleanSummary, p: &Prepared) {
    let metrics = crate::metrics::global();
    metrics.stage(STAGE, p.clean.len() as u64);
    summary.consumed += p.consumed;
    summary.produced += p.clean.len() as u64;
    summary.claim_checked += p.clean.iter().filter(|c| c.claim.is_some()).count() as u64;
    for d in &p.dead {
        *summary
            .dead_letters
            .entry(d.reason.to_string())
            .or_default() += 1;
    }
    for reason in &p.dropped {
        metrics.drop(STAGE, reason);
        *summary.dropped.entry(reason.to_string()).or_default() += 1;
    }
    HEALTH.recovered();
}

/// Parses, resolves claim checks, cleans (on the rayon pool) and applies
/// the near-duplicate check in batch order; None if shutdown was asked for
/// while claim checks could not be read.
async fn prepare(
    batch: Vec<Message>,
    settings: &Arc<Settings>,
    objects: &Arc<dyn ObjectStore>,
    stop: &Stop,
    near: &mut NearDuplicates,
) -> crate::Result<Option<Prepared>> {
    let values: Vec<Bytes> = batch.iter().map(|m| m.value.clone()).collect();
    let mut parsed = parallel(values, |v| parse(&v)).await?;
    if !resolve_claims(&mut parsed, objects, stop, &HEALTH).await {
        return Ok(None);
    }
    let s = settings.clone();
    let verdicts = parallel(parsed, move |p| match p {
        Ok(env) => clean_guarded(env, &s),
        Err(r) => Verdict::Dead(r),
    })
    .await?;
    let mut p = Prepared {
        commits: Commit::after(&batch),
        consumed: batch.len() as u64,
        clean: Vec::with_capacity(verdicts.len()),
        dead: Vec::new(),
        dropped: Vec::new(),
    };
    for (m, v) in batch.iter().zip(verdicts) {
        match v {
            Verdict::Clean(c) => match near.check(&c.source, &c.id, c.simhash) {
                None => p.clean.push(*c),
                Some(hit) => {
                    tracing::debug!(
                        id = %c.id,
                        source = %c.source,
                        simhash = format_args!("{:016x}", c.simhash),
                        near = format_args!("{:016x}", hit.simhash),
                        distance = hit.distance,
                        "Dropped a near-duplicate."
                    );
                    p.dropped.push(drops::NEAR_DUPLICATE);
                }
            },
            Verdict::Dropped(r) => {
                tracing::debug!(partition = m.partition, offset = %m.offset, detail = %r.detail, "Dropped a document.");
                p.dropped.push(r.reason);
            }
            Verdict::Dead(r) => p.dead.push(dead_letter(STAGE, m, r)),
        }
    }
    Ok(Some(p))
}

impl Sender {
    /// Writes claim checks, then the records and dead letters; true once all
    /// are acknowledged, false if shutdown was asked for while a backend failed.
    async fn send(&self, p: &Prepared) -> bool {
        for c in &p.clean {
            let Some((key, text)) = &c.claim else {
                continue;
            };
            if !retry(&self.stop, &HEALTH, "write a claim check", || {
                self.objects.put(key, text.clone(), PutMode::Overwrite)
            })
            .await
            {
                return false;
            }
        }
        let records: Vec<Record> = p.clean.iter().map(|c| c.record.clone()).collect();
        let produce = async {
            records.is_empty()
                || retry(&self.stop, &HEALTH, "produce to sift.clean", || {
                    self.log.produce(topics::CLEAN, records.clone())
                })
                .await
        };
        let dead = async {
            p.dead.is_empty()
                || retry(&self.stop, &HEALTH, "send dead letters to sift.dlq", || {
                    dlq::send(self.log.as_ref(), self.objects.as_ref(), &p.dead)
                })
                .await
        };
        let (a, b) = tokio::join!(produce, dead);
        a && b
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    fn settings() -> Settings {
        Settings {
            group: "g".into(),
            batch_size: 10,
            min_chars: 20,
            languages: vec!["eng".into()],
            detector: LanguageDetector::Fast,
            claim_check_bytes: 200,
        }
    }

    fn envelope(text: &str) -> Envelope {
        Envelope {
            v: SCHEMA_VERSION,
            id: "0123456789abcdef0123456789abcdef".into(),
            source: "test".into(),
            url: "https://example.com/a".into(),
            fetched_at_ms: 1,
            content_type: "text/html".into(),
            title: " A\u{0}  ﬁne title ".into(),
            text: Some(text.into()),
            body_uri: None,
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn clean_parse_rejections() {
        let reason = |v: &[u8]| parse(v).err().map(|r| r.reason);
        assert_eq!(reason(b"{not json"), Some(reasons::BAD_JSON));
        assert_eq!(reason(b"{\"v\": 1}"), Some(reasons::BAD_JSON));
        assert_eq!(
            reason(b"{\"v\": 7, \"other\": true}"),
            Some(reasons::SCHEMA_VERSION)
        );
        let mut env = envelope("x");
        env.v = 2;
        let bytes = serde_json::to_vec(&env).unwrap_or_default();
        assert_eq!(reason(&bytes), Some(reasons::SCHEMA_VERSION));
        let ok = serde_json::to_vec(&envelope("x")).unwrap_or_default();
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn clean_one_envelope() -> anyhow::Result<()> {
        let s = settings();
        let text =
            "The committee will publish its annual report on the state of the railways next week.";
        let Verdict::Clean(c) = clean(envelope(&format!("  {text}\u{7} ")), &s) else {
            anyhow::bail!("not cleaned");
        };
        assert!(c.claim.is_none());
        let env: Envelope = serde_json::from_slice(&c.record.value)?;
        assert_eq!(env.text.as_deref(), Some(text));
        assert_eq!(env.title, "A fine title");
        assert_eq!(env.metadata[meta::LANG], "eng");
        assert!(!env.metadata.contains_key(meta::LANG_CONFIDENCE));
        assert_eq!(
            env.metadata[meta::SIMHASH],
            format!("{:016x}", simhash::simhash(text))
        );
        assert_eq!(c.record.key.as_deref(), Some(env.id.as_bytes()));

        // Longer than claim_check_bytes: the text goes aside.
        let long = format!("{text} ").repeat(5);
        let Verdict::Clean(c) = clean(envelope(&long), &s) else {
            anyhow::bail!("not cleaned");
        };
        let (key, body) = c.claim.as_ref().context("claim")?;
        assert!(key.starts_with("claims/0123456789abcdef0123456789abcdef/clean-"));
        assert_eq!(body.as_ref(), long.trim().as_bytes());
        let env: Envelope = serde_json::from_slice(&c.record.value)?;
        assert_eq!(env.text, None);
        assert_eq!(env.body_uri, Some(envelope::claim_uri(key)));

        assert!(
            matches!(clean(envelope(" short "), &s), Verdict::Dead(r) if r.reason == reasons::TOO_SHORT)
        );
        let fr = "Le comité publiera la semaine prochaine son rapport annuel sur l'état des chemins de fer.";
        assert!(
            matches!(clean(envelope(fr), &s), Verdict::Dropped(r) if r.reason == drops::LANGUAGE)
        );

        // The broad detector adds its confidence.
        let broad = Settings {
            detector: LanguageDetector::Broad,
            ..settings()
        };
        let Verdict::Clean(c) = clean(envelope(text), &broad) else {
            anyhow::bail!("not cleaned");
        };
        let env: Envelope = serde_json::from_slice(&c.record.value)?;
        assert_eq!(env.metadata[meta::LANG], "eng");
        let confidence = env.metadata[meta::LANG_CONFIDENCE]
            .as_f64()
            .context("a number")?;
        assert!((0.0..=1.0).contains(&confidence), "{confidence}");
        Ok(())
    }
}
