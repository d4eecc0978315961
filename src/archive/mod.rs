//! `sift archive`: every envelope on `sift.raw`, as zstd-compressed JSON
//! lines in the object store, laid out the way Spark, Athena and Trino read
//! Hive-style partitions:
//!
//! ```text
//! <prefix>/dt=YYYY-MM-DD/source=<TAG>/part-<P>-<OFFSET>.jsonl.zst
//! ```
//!
//! - `dt` is the UTC date of the envelope's `fetched_at_ms`, so where a record
//!   lands never depends on when it is archived;
//! - `TAG` is the source tag made key-safe: ASCII letters, digits, `-`, `_`
//!   and `.` stay, every other byte of its UTF-8 becomes `%XX` (`%` itself
//!   too, so the mapping reverses), an empty tag is `__HIVE_DEFAULT_PARTITION__`
//!   ([`keys::source_segment`]);
//! - `P` is the log partition, `OFFSET` (20 digits) the log offset of the
//!   part's first record.
//!
//! Each line is a record's envelope exactly as produced (re-encoded compactly
//! only if a producer spread it over several lines). A record that is not an
//! envelope goes to `sift.dlq` instead (`bad_json`, `schema_version`, or
//! `bad_source` for a tag too long to fit in an object key) and is committed
//! once `sift.dlq` has it.
//!
//! # Batches
//!
//! The daemon is a member of consumer group `archive.group` on `sift.raw`.
//! Each partition buffers what it consumes and is flushed when its lines
//! reach `archive.flush_bytes`, when its oldest record has waited
//! `archive.flush_age`, and on shutdown. A flush groups the partition's
//! buffer by (date, source), compresses each group into one part (zstd at
//! `archive.zstd_level`, a few groups at a time, so memory holds the buffer
//! plus a few compressed parts, not a second copy of the buffer: about
//! `flush_bytes` per assigned partition in all), uploads every part
//! (overwriting), and only then commits the partition's offset past the
//! batch.
//!
//! # Why neither a crash nor a rebalance loses or duplicates a record
//!
//! A part is named by the first record of its group within its batch, so
//! where a batch is cut decides which parts exist. Two writers that cut the
//! same records differently would write parts that overlap under different
//! names (duplicates) or that replace each other (losses): a rerun after a
//! crash between upload and commit, or two members that both believe they own
//! a partition during a rebalance (one expelled while flushing).
//!
//! So batches are cut once, by whoever flushes a range first. Before
//! uploading a batch `[s, e)` of partition `P` (`s` the offset of its first
//! record, `e` the offset it commits), a member claims it: it puts the
//! object `_sift/archive-ranges/<prefix>/part-<P>-<s>.json`, holding `e`,
//! only if no object of that name exists (S3 `If-None-Match: *`; the
//! embedded store checks under a lock). If the put succeeds, the batch is
//! this member's. If a claim exists, another member or an earlier run cut
//! this range at `e'`: the member archives exactly `[s, e')`, waiting for
//! more records if it holds fewer, and goes on with what follows `e'`.
//!
//! A range's parts then have the same names and the same lines whoever
//! writes them: the lines are the records of the range's groups in offset
//! order, as the log holds them. Writing them twice, or at the same time,
//! changes nothing, and a member that finds a claim writes the range's parts
//! again in case their claimer died before uploading them.
//!
//! Every batch starts at the first record after a claimed range's end (or at
//! the partition's first record), because members start at the group's
//! committed offset, and a commit is always the end of a claimed range. So
//! the claimed ranges tile the partition without overlap, every record is in
//! exactly one range, and in exactly one part of it.
//!
//! Limits:
//! - Claims are small (about 150 bytes, one per flush of a partition) and
//!   are never deleted by sift. A lifecycle rule may expire them once no
//!   member can still be flushing a range that old: days, not minutes.
//! - Retention: if the log deletes records a run has not archived yet, the
//!   next range starts elsewhere than a claim that an earlier run made, and
//!   records of that claim that the log still holds can be archived twice.
//! - An archive written before claims existed has none, so a rerun over a
//!   crashed batch of that version is cut afresh.
//!
//! Rebalances: a partition taken from this member loses its buffer (the new
//! owner re-reads from the committed offset), a consumer sent back to the
//! committed offset forgets what it will re-read, and a flush first drops
//! whatever another member has committed meanwhile.
//!
//! # Encryption
//!
//! `archive.encryption` asks the object store for SSE-S3 or SSE-KMS on every
//! part. The embedded store cannot encrypt, and `sift archive` refuses to
//! start with that combination rather than write the archive in the clear.

pub mod keys;
pub mod replay;

mod buffer;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::backends::log::{Commit, Consumer, Log, LogError, Message, Offset, Watermarks};
use crate::backends::objects::{self, ObjectError, ObjectStore, PutMode, PutOptions};
use crate::config::{Config, ConfigError, Encryption};
use crate::daemon::StageHealth;
use crate::dlq::{self, DeadLetter};
use crate::envelope::{topics, Stage};
use crate::stage::{Backoff, Stop};
use buffer::{Group, Parsed, PartitionBuffer};
use keys::Layout;

/// Stage name in metrics, logs and dead letters.
pub const STAGE: Stage = Stage::Archive;

/// Records asked of one poll.
const POLL_RECORDS: usize = 1000;
/// Longest wait of one poll, so age flushes, lag and stop requests are timely.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// Parts compressed and uploaded at the same time within one flush.
const PARTS_IN_FLIGHT: usize = 4;
/// How often consumer lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(2);
/// `/healthz` fails when the loop has not moved for this long.
const STALL: Duration = Duration::from_secs(600);

/// `sift archive` flags.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ArchiveArgs {
    /// Another archive command instead of the daemon.
    #[command(subcommand)]
    pub command: Option<ArchiveCommand>,
    /// Exit once the consumer group has archived everything `sift.raw` held at
    /// the start (flushing what it holds), instead of running as a daemon.
    #[arg(long, env = "SIFT_ARCHIVE_ONCE")]
    pub once: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `sift archive` commands besides the daemon.
#[derive(Debug, clap::Subcommand)]
pub enum ArchiveCommand {
    /// Produce the archived envelopes of a date range to `sift.raw` again,
    /// keyed and with headers as a fresh ingest gives them.
    Replay(replay::ReplayArgs),
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ArchiveSummary {
    /// Records written into uploaded parts (a record re-read after a crash
    /// counts again; its part replaced the earlier one).
    pub records: u64,
    /// Parts uploaded.
    pub parts: u64,
    /// Uncompressed bytes of the uploaded parts.
    pub bytes_in: u64,
    /// Compressed bytes uploaded.
    pub bytes_out: u64,
    /// Records sent to `sift.dlq`, by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// Replayed records skipped because the archive holds them already.
    pub replays_skipped: u64,
    /// Ranges flushed as another member or an earlier run had claimed them
    /// (their parts written again, identical).
    pub ranges_adopted: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

pub use crate::daemon::Until;

/// How `sift archive` is doing, for `/healthz`: unhealthy once a run failed
/// or has not moved for [`STALL`].
static HEALTH: StageHealth = StageHealth::with_stall(STALL);

/// Where a run is, for progress bars; clones share it.
#[derive(Clone, Default)]
pub struct Progress(Arc<ProgressState>);

#[derive(Default)]
struct ProgressState {
    target: AtomicU64,
    consumed: AtomicU64,
}

impl Progress {
    /// Records to consume before [`Until::caught_up`] is met (0 otherwise).
    pub fn target(&self) -> u64 {
        self.0.target.load(Ordering::Relaxed)
    }

    /// Records of that target consumed so far.
    pub fn consumed(&self) -> u64 {
        self.0.consumed.load(Ordering::Relaxed).min(self.target())
    }
}

/// The archive settings, checked against the object store.
#[derive(Debug, Clone)]
struct Settings {
    group: String,
    layout: Layout,
    flush_bytes: u64,
    flush_age: Duration,
    zstd_level: i32,
    put: PutOptions,
}

impl Settings {
    fn new(config: &Config, store: &dyn ObjectStore) -> crate::Result<Self> {
        let a = &config.archive;
        let invalid = |field: &'static str, message: String| {
            crate::Error::Config(ConfigError::Value { field, message })
        };
        let layout = Layout::new(&a.prefix).map_err(|e| {
            invalid(
                "archive.prefix",
                format!("`{}` cannot start an object key: {e}", a.prefix),
            )
        })?;
        let levels = zstd::compression_level_range();
        if !levels.contains(&a.zstd_level) {
            return Err(invalid(
                "archive.zstd_level",
                format!(
                    "{} is outside zstd's levels {}..={}",
                    a.zstd_level,
                    levels.start(),
                    levels.end()
                ),
            ));
        }
        let encryption = match a.encryption {
            Encryption::None => None,
            Encryption::SseS3 => Some(objects::Encryption::SseS3),
            Encryption::SseKms => Some(objects::Encryption::SseKms {
                key_id: (!a.kms_key_id.is_empty()).then(|| a.kms_key_id.clone()),
            }),
        };
        if a.encryption != Encryption::SseKms && !a.kms_key_id.is_empty() {
            tracing::warn!(
                kms_key_id = %a.kms_key_id,
                "archive.kms_key_id is set but archive.encryption is not \"sse_kms\"; the key is not used."
            );
        }
        if let Some(e) = &encryption {
            if !store.supports_encryption() {
                let backend = serde_json::to_value(config.objects.backend)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                return Err(invalid(
                    "archive.encryption",
                    format!(
                        "{e} asks the object store to encrypt the archive at rest, but the \
                         {backend} object store (objects.backend = \"{backend}\") cannot encrypt; \
                         set archive.encryption = \"none\", or archive to S3 \
                         (objects.backend = \"s3\")"
                    ),
                ));
            }
        }
        Ok(Settings {
            group: a.group.clone(),
            layout,
            flush_bytes: a.flush_bytes,
            flush_age: a.flush_age,
            zstd_level: a.zstd_level,
            put: PutOptions { encryption },
        })
    }
}

/// Checks the archive settings against the object store, as `run` does
/// first: a bad prefix or level, or encryption the store cannot do, fails here.
pub fn check(config: &Config, store: &dyn ObjectStore) -> crate::Result<()> {
    Settings::new(config, store).map(|_| ())
}

/// Runs `sift archive`, or `sift archive replay` when asked for.
pub async fn main(config: &Config, args: ArchiveArgs) -> crate::Result<()> {
    if let Some(ArchiveCommand::Replay(replay_args)) = args.command {
        return replay::main(config, replay_args).await;
    }
    // The settings first: a misconfiguration fails before the log is touched.
    let store = crate::backends::open_objects(config).await?;
    check(config, store.as_ref())?;
    let log = crate::backends::open_log(config).await?;
    let progress = Progress::default();
    crate::daemon::serve_metrics(config, HEALTH.probe()).await?;

    let stop = crate::daemon::shutdown_signal();
    let until = if args.once {
        Until::caught_up().or_stopped_by(stop)
    } else {
        Until::stopped_by(stop)
    };
    let bar = args.once.then(|| progress_bar(progress.clone()));
    let summary = run_with(log, store, config, until, progress).await;
    if let Some((bar, ticker)) = bar {
        ticker.abort();
        bar.finish_and_clear();
    }
    let s = summary?;
    if args.json {
        let json = serde_json::to_string_pretty(&s)
            .map_err(|e| crate::Error::Invalid(format!("cannot encode the summary: {e}")))?;
        println!("{json}");
        return Ok(());
    }
    let dead: u64 = s.dead_letters.values().sum();
    println!("archive pass finished in {:.2} s", s.seconds);
    println!("  records archived   {:>12}", s.records);
    println!("  parts uploaded     {:>12}", s.parts);
    println!(
        "  bytes in           {:>12}  (uncompressed JSON lines)",
        s.bytes_in
    );
    println!("  bytes out          {:>12}  (zstd)", s.bytes_out);
    println!("  dead letters       {:>12}  {:?}", dead, s.dead_letters);
    Ok(())
}

/// A progress bar on stderr fed from `progress`, and the task that feeds it.
fn progress_bar(progress: Progress) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "archiving sift.raw {bar:30} {pos}/{len} records {per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    let shown = bar.clone();
    let ticker = tokio::spawn(async move {
        loop {
            shown.set_length(progress.target());
            shown.set_position(progress.consumed());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (bar, ticker)
}

/// Archives `sift.raw` until `until`; the library entry of `sift archive`.
pub async fn run(
    log: Arc<dyn Log>,
    store: Arc<dyn ObjectStore>,
    config: &Config,
    until: Until,
) -> crate::Result<ArchiveSummary> {
    run_with(log, store, config, until, Progress::default()).await
}

/// [`run`], reporting where it is through `progress`.
pub async fn run_with(
    log: Arc<dyn Log>,
    store: Arc<dyn ObjectStore>,
    config: &Config,
    until: Until,
    progress: Progress,
) -> crate::Result<ArchiveSummary> {
    HEALTH.reset();
    let result = archive(log, store, config, until, progress).await;
    if result.is_err() {
        HEALTH.failed();
    }
    result
}

async fn archive(
    log: Arc<dyn Log>,
    store: Arc<dyn ObjectStore>,
    config: &Config,
    until: Until,
    progress: Progress,
) -> crate::Result<ArchiveSummary> {
    let started = Instant::now();
    let settings = Arc::new(Settings::new(config, store.as_ref())?);
    log.create_topic(topics::RAW, config.log.default_partitions)
        .await?;
    log.create_topic(topics::DLQ, 1).await?;
    let targets = if until.caught_up {
        let marks = log.watermarks(topics::RAW).await?;
        let committed = log.committed(&settings.group, topics::RAW).await?;
        let mut target = 0u64;
        for w in &marks {
            let from = position(w, &committed);
            target =
                target.saturating_add(log.count(topics::RAW, w.partition, &from, &w.high).await?);
        }
        progress.0.target.store(target, Ordering::Relaxed);
        Some(marks)
    } else {
        None
    };
    let consumer = log.subscribe(&settings.group, &[topics::RAW]).await?;
    tracing::info!(
        group = %settings.group,
        prefix = %settings.layout.prefix(),
        flush_bytes = settings.flush_bytes,
        flush_age = ?settings.flush_age,
        encryption = ?settings.put.encryption,
        "Archiving sift.raw."
    );
    let (stop, watcher) = crate::stage::Stop::bounded(
        until.stop,
        until.caught_up.then_some(crate::stage::ONCE_ATTEMPTS),
    );
    let mut a = Archiver {
        log,
        store,
        settings,
        consumer,
        stop: stop.clone(),
        buffers: BTreeMap::new(),
        summary: ArchiveSummary::default(),
        progress,
        last_lag: None,
        caught_up_once: false,
    };
    // With nothing to catch up on, there is nothing to poll for.
    let mut done = targets.is_some() && a.progress.target() == 0;
    let mut stop_wait = stop.clone();
    let mut backoff = Backoff::for_polls(&HEALTH);
    while !done {
        HEALTH.beat();
        match a.step(&mut stop_wait, targets.as_deref()).await {
            Ok(Some(d)) => {
                done = d;
                backoff = Backoff::for_polls(&HEALTH);
            }
            Ok(None) => break,
            Err(e) => {
                // Nothing is lost by a failed step: every write that must
                // not be skipped (dead letters, claims, parts, commits) is
                // retried where it failed, so what fails here is a poll or
                // a read of offsets, and the consumer keeps its place.
                if stop.is_set() || !backoff.wait(&mut stop_wait, "archive", &e).await {
                    if let Some(w) = watcher {
                        w.abort();
                    }
                    stop.check()?;
                    return Err(e);
                }
            }
        }
    }
    if let Some(w) = watcher {
        w.abort();
    }
    stop.check()?;
    a.consumer.close().await?;
    let mut summary = a.summary;
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        records = summary.records,
        parts = summary.parts,
        bytes_in = summary.bytes_in,
        bytes_out = summary.bytes_out,
        "Archive stopped."
    );
    Ok(summary)
}

/// Where the group stands on a partition ([`crate::stage::position`]); a
/// commit beyond the end counts as not started: the consumer meets it and
/// `log.on_offset_out_of_range` decides.
fn position(w: &Watermarks, committed: &[(u32, Option<Offset>)]) -> Offset {
    crate::stage::position(w, committed).unwrap_or_else(|| w.low.clone())
}

/// One run's state.
struct Archiver {
    log: Arc<dyn Log>,
    store: Arc<dyn ObjectStore>,
    settings: Arc<Settings>,
    consumer: Box<dyn Consumer>,
    /// Set on shutdown, or when a one-pass run gives up.
    stop: Stop,
    buffers: BTreeMap<u32, PartitionBuffer>,
    summary: ArchiveSummary,
    progress: Progress,
    last_lag: Option<Instant>,
    caught_up_once: bool,
}

/// What one uploaded part held.
struct PartStats {
    records: u64,
    bytes_in: u64,
    bytes_out: u64,
}

impl Archiver {
    /// One poll and what follows it: Some(whether the run is done), or
    /// None once stopped (everything buffered flushed).
    async fn step(
        &mut self,
        stop: &mut Stop,
        targets: Option<&[Watermarks]>,
    ) -> crate::Result<Option<bool>> {
        let wait = self.next_age_flush().map_or(POLL_WAIT, |at| {
            at.saturating_duration_since(Instant::now()).min(POLL_WAIT)
        });
        let polled = if stop.is_set() {
            None
        } else {
            tokio::select! {
                _ = stop.wait() => None,
                batch = self.consumer.poll(POLL_RECORDS, wait) => Some(batch?),
            }
        };
        let Some(batch) = polled else {
            if self.stop.gave_up().is_none() {
                tracing::info!("Stopping: flushing what is buffered.");
                self.flush_all().await?;
            }
            return Ok(None);
        };
        self.drop_revoked();
        let empty = batch.is_empty();
        if let Some(targets) = targets {
            self.count_progress(&batch, targets);
        }
        self.ingest(batch).await?;
        self.flush_aged().await?;
        if let Err(e) = self.report_lag().await {
            tracing::warn!(error = %e, "Could not measure the consumer lag.");
        }
        Ok(Some(match targets {
            Some(targets) => (empty || self.reached(targets)) && self.caught_up(targets).await?,
            None => false,
        }))
    }

    /// When the oldest buffered record of any partition reaches `flush_age`.
    fn next_age_flush(&self) -> Option<Instant> {
        self.buffers
            .values()
            .filter(|b| !b.short_of_cut())
            .filter_map(PartitionBuffer::since)
            .min()
            .and_then(|t| t.checked_add(self.settings.flush_age))
    }

    /// Forgets buffers of partitions no longer assigned to this member: their
    /// new owner reads them again from the committed offset.
    fn drop_revoked(&mut self) {
        let assigned: BTreeSet<u32> = self
            .consumer
            .assignment()
            .into_iter()
            .filter(|tp| tp.topic == topics::RAW)
            .map(|tp| tp.partition)
            .collect();
        self.buffers.retain(|p, b| {
            let keep = assigned.contains(p);
            if !keep && b.start().is_some() {
                tracing::info!(
                    partition = p,
                    records = b.len(),
                    "Partition reassigned: its new owner archives the buffered records."
                );
            }
            keep
        });
    }

    fn count_progress(&self, batch: &[Message], targets: &[Watermarks]) {
        let below = batch
            .iter()
            .filter(|m| {
                targets
                    .iter()
                    .any(|w| w.partition == m.partition && m.offset < w.high)
            })
            .count() as u64;
        self.progress.0.consumed.fetch_add(below, Ordering::Relaxed);
    }

    /// Buffers a polled batch: dead letters first (acknowledged before any
    /// commit can cover them), then every record in order, flushing a
    /// partition as soon as it reaches `flush_bytes`.
    async fn ingest(&mut self, batch: Vec<Message>) -> crate::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut parsed = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        for m in &batch {
            if buffer::already_archived(&m.headers) {
                self.summary.replays_skipped += 1;
                parsed.push(Parsed::Replayed);
                continue;
            }
            let p = buffer::parse(&m.value, &self.settings.layout);
            if let Parsed::Dead(reason, detail) = &p {
                dead.push(DeadLetter::of_message(STAGE, reason, detail.clone(), m));
                *self
                    .summary
                    .dead_letters
                    .entry(reason.to_string())
                    .or_default() += 1;
            }
            parsed.push(p);
        }
        persist(&self.stop, "send dead letters to sift.dlq", || {
            dlq::send(self.log.as_ref(), self.store.as_ref(), &dead)
        })
        .await?;
        let now = Instant::now();
        for (m, p) in batch.iter().zip(parsed) {
            let buf = self.buffers.entry(m.partition).or_default();
            if buf.next().is_some_and(|next| m.offset < *next) {
                tracing::debug!(
                    partition = m.partition,
                    offset = %m.offset,
                    "The consumer went back to the committed offset; re-reading from there."
                );
                buf.rewind(&m.offset);
            }
            buf.accept(m.offset.clone(), p, now);
            if buf.full(self.settings.flush_bytes) {
                self.flush(&[m.partition]).await?;
            }
        }
        Ok(())
    }

    async fn flush_aged(&mut self) -> crate::Result<()> {
        let now = Instant::now();
        let due: Vec<u32> = self
            .buffers
            .iter()
            .filter(|(_, b)| !b.short_of_cut())
            .filter(|(_, b)| {
                b.since()
                    .and_then(|t| t.checked_add(self.settings.flush_age))
                    .is_some_and(|due| due <= now)
            })
            .map(|(p, _)| *p)
            .collect();
        self.flush(&due).await
    }

    async fn flush_all(&mut self) -> crate::Result<()> {
        let pending: Vec<u32> = self
            .buffers
            .iter()
            .filter(|(_, b)| b.start().is_some() && !b.short_of_cut())
            .map(|(p, _)| *p)
            .collect();
        self.flush(&pending).await
    }

    /// Flushes partitions: claims each one's range, uploads its parts, then
    /// commits it.
    async fn flush(&mut self, partitions: &[u32]) -> crate::Result<()> {
        if partitions.is_empty() {
            return Ok(());
        }
        let committed = persist(&self.stop, "read the group's committed offsets", || async {
            Ok(self
                .log
                .committed(&self.settings.group, topics::RAW)
                .await?)
        })
        .await?;
        for &p in partitions {
            let Some(buf) = self.buffers.get_mut(&p) else {
                continue;
            };
            // Another member may have archived and committed part of this
            // range since (a rebalance); keep only what lies beyond its commit.
            let theirs = committed
                .iter()
                .find(|(q, _)| *q == p)
                .and_then(|(_, c)| c.as_ref());
            if let (Some(c), Some(start)) = (theirs, buf.start()) {
                if c > start {
                    tracing::info!(
                        partition = p,
                        committed = %c,
                        from = %start,
                        "Another member archived part of this buffer; keeping only the rest."
                    );
                    buf.forget_before(c);
                }
            }
            while let Some(buf) = self.buffers.get_mut(&p) {
                if buf.short_of_cut() {
                    break;
                }
                let (Some(first), Some(next)) = (buf.start().cloned(), buf.next().cloned()) else {
                    break;
                };
                let end = match buf.waiting_for() {
                    Some(end) => end.clone(),
                    None => {
                        let (end, ours) = persist(&self.stop, "claim an archive range", || {
                            claim(&self.store, &self.settings, p, &first, &next)
                        })
                        .await?;
                        if !ours {
                            self.summary.ranges_adopted += 1;
                            tracing::info!(
                                partition = p,
                                first = %first,
                                end = %end,
                                "This range was claimed by another member or an earlier run; \
                                 archiving exactly its records."
                            );
                        }
                        end
                    }
                };
                let Some(buf) = self.buffers.get_mut(&p) else {
                    break;
                };
                if end > next {
                    buf.wait_for(end);
                    break;
                }
                let Some(batch) = buf.take_before(&end) else {
                    break;
                };
                if !self.upload_and_commit(p, batch).await? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Uploads a batch's parts and commits it; false when the partition was
    /// reassigned meanwhile (its buffer is dropped: the new owner goes on).
    async fn upload_and_commit(&mut self, p: u32, batch: buffer::Batch) -> crate::Result<bool> {
        let records: usize = batch.groups.iter().map(|g| g.lines.len()).sum();
        let parts = batch.groups.len();
        let stats = persist(&self.stop, "upload archive parts", || {
            upload_all(&self.store, &self.settings, p, batch.groups.clone())
        })
        .await?;
        let metrics = crate::metrics::global();
        for s in &stats {
            self.summary.records += s.records;
            self.summary.parts += 1;
            self.summary.bytes_in += s.bytes_in;
            self.summary.bytes_out += s.bytes_out;
            metrics.archive_part_bytes.observe(s.bytes_in as f64);
            metrics.archive_part_records.observe(s.records as f64);
            metrics.stage(STAGE, s.records);
        }
        let commit = Commit {
            topic: topics::RAW.to_string(),
            partition: p,
            next_offset: batch.commit.clone(),
        };
        let mut stop = self.stop.clone();
        let mut backoff = Backoff::new(&HEALTH);
        loop {
            match self.consumer.commit(std::slice::from_ref(&commit)).await {
                Ok(()) => break,
                // The parts are uploaded; the new owner re-reads from the
                // committed offset, finds the range claimed and writes the
                // same parts again.
                Err(LogError::NotAssigned { .. }) => {
                    tracing::info!(
                        partition = p,
                        "Partition reassigned during a flush; its new owner re-archives the batch."
                    );
                    self.buffers.remove(&p);
                    return Ok(false);
                }
                Err(e) => {
                    if !backoff.wait(&mut stop, "commit archived offsets", &e).await {
                        return Err(e.into());
                    }
                }
            }
        }
        tracing::info!(
            partition = p,
            parts,
            records,
            committed = %batch.commit,
            "Flushed archive parts."
        );
        Ok(true)
    }

    /// Whether this member has read every assigned partition up to its target.
    fn reached(&self, targets: &[Watermarks]) -> bool {
        self.consumer
            .assignment()
            .iter()
            .filter(|tp| tp.topic == topics::RAW)
            .all(|tp| {
                let next = self
                    .buffers
                    .get(&tp.partition)
                    .and_then(PartitionBuffer::next)
                    .cloned()
                    .unwrap_or(Offset::ZERO);
                targets
                    .iter()
                    .find(|w| w.partition == tp.partition)
                    .is_none_or(|w| next >= w.high)
            })
    }

    /// Flushes everything and says whether the group has committed every target.
    async fn caught_up(&mut self, targets: &[Watermarks]) -> crate::Result<bool> {
        self.flush_all().await?;
        let committed = self
            .log
            .committed(&self.settings.group, topics::RAW)
            .await?;
        Ok(targets.iter().all(|w| position(w, &committed) >= w.high))
    }

    /// Publishes the consumer lag: records between where the group stands
    /// (this member's reading position where it knows it) and the log's end.
    async fn report_lag(&mut self) -> crate::Result<()> {
        if self.last_lag.is_some_and(|t| t.elapsed() < LAG_EVERY) {
            return Ok(());
        }
        self.last_lag = Some(Instant::now());
        let marks = self.log.watermarks(topics::RAW).await?;
        let committed = self
            .log
            .committed(&self.settings.group, topics::RAW)
            .await?;
        let mut lag = 0u64;
        for w in &marks {
            let read = self
                .buffers
                .get(&w.partition)
                .and_then(PartitionBuffer::next)
                .cloned()
                .unwrap_or(Offset::ZERO);
            let from = position(w, &committed).max(read);
            lag = lag.saturating_add(
                self.log
                    .count(topics::RAW, w.partition, &from, &w.high)
                    .await?,
            );
        }
        crate::metrics::global().lag(STAGE, i64::try_from(lag).unwrap_or(i64::MAX));
        if lag == 0 && !self.caught_up_once {
            self.caught_up_once = true;
            tracing::info!("Caught up with sift.raw; archiving new records as they arrive.");
        }
        Ok(())
    }
}

/// Calls `call` until it succeeds, with backoff between failures (a backend
/// away: a broker or the object store restarting), so a write that must not
/// be skipped is never skipped; fails only once shutdown was asked for or a
/// one-pass run gave up.
async fn persist<T, F, Fut>(stop: &Stop, what: &str, mut call: F) -> crate::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let mut stop = stop.clone();
    let mut backoff = Backoff::new(&HEALTH);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                if !backoff.wait(&mut stop, what, &e).await {
                    stop.check()?;
                    return Err(e);
                }
            }
        }
    }
}

/// What a range claim holds: `_sift/archive-ranges/<prefix>/part-<P>-<FIRST>.json`.
#[derive(Debug, Serialize, serde::Deserialize)]
struct Claim {
    /// Log partition.
    partition: u32,
    /// Offset of the range's first record.
    first: String,
    /// Offset after the range: what its flush commits.
    end: String,
    /// Consumer group of the member that claimed it.
    group: String,
    /// When it was claimed, ms since the Unix epoch.
    claimed_at_ms: i64,
}

/// The end of the range of `partition` whose first record is at `first`:
/// `proposed`, claimed now (true), or the end another member or an earlier
/// run claimed (false). The claim is a put that succeeds only where no
/// object exists, so of members flushing the same range at once, exactly
/// one claims it and every other one archives the range it claimed.
async fn claim(
    store: &Arc<dyn ObjectStore>,
    settings: &Settings,
    partition: u32,
    first: &Offset,
    proposed: &Offset,
) -> crate::Result<(Offset, bool)> {
    let key = settings.layout.claim_key(partition, first);
    let body = serde_json::to_vec(&Claim {
        partition,
        first: first.to_string(),
        end: proposed.to_string(),
        group: settings.group.clone(),
        claimed_at_ms: crate::now_ms(),
    })
    .map_err(|e| crate::Error::Invalid(format!("cannot encode a range claim: {e}")))?;
    // A claim deleted between the failed put and the read (by a lifecycle
    // rule) is claimed again; three rounds are plenty.
    for _ in 0..3 {
        match store
            .put_with(
                &key,
                Bytes::from(body.clone()),
                PutMode::IfAbsent,
                &settings.put,
            )
            .await
        {
            Ok(_) => return Ok((proposed.clone(), true)),
            Err(ObjectError::PreconditionFailed { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let held = match store.get(&key).await {
            Ok((_, held)) => held,
            Err(ObjectError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let damaged = |why: String| {
            crate::Error::Invalid(format!(
                "archive range claim `{key}` is damaged ({why}); it says where the flush of \
                 log partition {partition} from offset {first} ends. Restore it, or delete it \
                 if no part holds records of partition {partition} from offset {first} on"
            ))
        };
        let c: Claim = serde_json::from_slice(&held).map_err(|e| damaged(e.to_string()))?;
        let end: Offset = c
            .end
            .parse()
            .map_err(|_| damaged(format!("end `{}` is not an offset", c.end)))?;
        if c.partition != partition || c.first != first.to_string() || end <= *first {
            return Err(damaged(format!(
                "it names partition {} from {} to {}",
                c.partition, c.first, c.end
            )));
        }
        return Ok((end, false));
    }
    Err(crate::Error::Invalid(format!(
        "archive range claim `{key}` keeps appearing and disappearing; is a lifecycle rule \
         deleting fresh claims?"
    )))
}

/// Uploads a batch's parts, a few at a time. After a failure no new upload
/// starts, and the error is returned only once those in flight are done,
/// so nothing of the batch is still being written when the flush fails.
async fn upload_all(
    store: &Arc<dyn ObjectStore>,
    settings: &Arc<Settings>,
    partition: u32,
    groups: Vec<Group>,
) -> crate::Result<Vec<PartStats>> {
    let failed = AtomicBool::new(false);
    let results: Vec<crate::Result<Option<PartStats>>> =
        futures::stream::iter(groups.into_iter().map(|g| {
            let failed = &failed;
            async move {
                if failed.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                let done = upload(store.clone(), settings.clone(), partition, g).await;
                if done.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                done.map(Some)
            }
        }))
        .buffer_unordered(PARTS_IN_FLIGHT)
        .collect()
        .await;
    let mut stats = Vec::with_capacity(results.len());
    for r in results {
        stats.extend(r?);
    }
    Ok(stats)
}

/// Compresses one group (on a blocking thread) and uploads it as its part.
async fn upload(
    store: Arc<dyn ObjectStore>,
    settings: Arc<Settings>,
    partition: u32,
    group: Group,
) -> crate::Result<PartStats> {
    let key = settings
        .layout
        .part_key(&group.key, partition, &group.first);
    let level = settings.zstd_level;
    let records = group.lines.len() as u64;
    let bytes_in = group.bytes;
    let body = tokio::task::spawn_blocking(move || buffer::compress(&group, level))
        .await
        .map_err(|e| crate::Error::io("compressing an archive part", std::io::Error::other(e)))?
        .map_err(|e| crate::Error::io(format!("compressing archive part {key}"), e))?;
    let bytes_out = body.len() as u64;
    store
        .put_with(&key, Bytes::from(body), PutMode::Overwrite, &settings.put)
        .await?;
    HEALTH.beat();
    tracing::debug!(
        key,
        records,
        bytes_in,
        bytes_out,
        "Uploaded an archive part."
    );
    Ok(PartStats {
        records,
        bytes_in,
        bytes_out,
    })
}
