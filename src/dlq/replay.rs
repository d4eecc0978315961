//! `sift dlq`: reading the dead letters back and replaying their originals.
//!
//! `sift dlq list` reads the letters back ([`Letter::read`]): counts by stage
//! and reason, and the latest few. `sift dlq replay` produces the originals
//! back to the input topic of the stage that gave up ([`input_topic`]) and
//! keeps its place as the committed offsets of consumer group
//! [`REPLAY_GROUP`], committed after each batch is produced, so no letter is
//! replayed twice (unless asked with `--from-offset`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backends::log::{Commit, Consumer, Log, LogError, Message, Offset, Record, Watermarks};
use crate::backends::objects::{ObjectError, ObjectStore};
use crate::config::Config;
use crate::envelope::{headers, topics, Stage};

/// The consumer group whose committed offsets on `sift.dlq` say how far
/// `sift dlq replay` has got.
pub const REPLAY_GROUP: &str = "sift-dlq-replay";

/// Letters read from `sift.dlq` per fetch.
const FETCH_LETTERS: usize = 500;
/// Not-replayable letters kept for the replay's report; the rest are counted.
const NOT_REPLAYABLE_KEPT: usize = 20;
/// How long `sift dlq replay` waits to be given every partition of `sift.dlq`.
const JOIN_WAIT: Duration = Duration::from_secs(30);
/// Characters of a detail shown in text output.
const DETAIL_CHARS: usize = 240;

/// The topic the stage called `stage` consumes: where the originals of its
/// dead letters go back to ([`Stage::input_topic`]); None for a stage sift
/// does not know.
pub fn input_topic(stage: &str) -> Option<&'static str> {
    Stage::parse(stage).and_then(Stage::input_topic)
}

/// [`Description`] read back: the value of a letter without an original.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
// Every field is declared, and no other allowed, so that only a description
// parses as one; not all of them are read.
#[allow(dead_code)]
struct DescriptionIn {
    stage: String,
    reason: String,
    detail: String,
    source: Option<String>,
    url: Option<String>,
    at_ms: i64,
}

/// A dead letter as read back from `sift.dlq`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Letter {
    /// Partition of `sift.dlq`.
    pub partition: u32,
    /// Offset in it.
    pub offset: Offset,
    /// When it was sent, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// The stage that gave up; None for letters written without one (`sift run`).
    pub stage: Option<String>,
    /// The reason code.
    pub reason: String,
    /// What went wrong.
    pub detail: String,
    /// Source tag, when known.
    pub source: Option<String>,
    /// URL or path, when known.
    pub url: Option<String>,
    /// The topic `sift dlq replay` sends its original to, if it can.
    pub replay_to: Option<&'static str>,
    /// Why it cannot be replayed, if it cannot.
    pub not_replayable: Option<String>,
    /// Where the original's value is kept when it was too large to carry
    /// (`objects:dlq/…`); [`Letter::original`] then has an empty value
    /// until [`fill_original`] reads it.
    pub original_at: Option<String>,
    /// The original record, headers without the dead-letter ones.
    #[serde(skip)]
    pub original: Option<Record>,
}

impl Letter {
    /// Reads a `sift.dlq` message: its headers, and its original when it
    /// carries one (a letter without one carries a JSON description instead).
    pub fn read(m: &Message) -> Letter {
        let text = |name: &str| {
            m.header(name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let stage = text(headers::STAGE);
        let (reason, detail) = match text(headers::REASON) {
            Some(r) => match r.split_once(": ") {
                Some((code, detail)) => (code.to_string(), detail.to_string()),
                None => (r, String::new()),
            },
            None => (String::new(), String::new()),
        };
        let description = serde_json::from_slice::<DescriptionIn>(&m.value)
            .ok()
            .filter(|d| stage.as_deref().is_none_or(|s| s == d.stage) && d.reason == reason);
        let original_at = description
            .as_ref()
            .and(text(headers::ORIGINAL))
            .filter(|uri| crate::envelope::claim_key(uri).is_some());
        // A claimed original's description stands in for its value.
        let description = description.filter(|_| original_at.is_none());
        let original = description.is_none().then(|| Record {
            key: m.key.clone(),
            value: if original_at.is_some() {
                Bytes::new()
            } else {
                m.value.clone()
            },
            headers: m
                .headers
                .iter()
                .filter(|(k, _)| {
                    k != headers::REASON
                        && k != headers::STAGE
                        && k != headers::REPLAY
                        && k != headers::ORIGINAL
                })
                .cloned()
                .chain(
                    stage
                        .as_ref()
                        .map(|s| (headers::REPLAY.to_owned(), Bytes::from(format!("dlq:{s}")))),
                )
                .collect(),
        });
        let (replay_to, not_replayable) = match (&stage, &description) {
            (_, Some(d)) => (
                None,
                Some(if stage.as_deref() == Some(Stage::Ingest.name()) {
                    "no original record: ingest gave up before there was one; its next visit \
                     fetches the URL again"
                        .to_string()
                } else {
                    format!("no original record: {}", d.detail)
                }),
            ),
            (None, None) => (
                None,
                Some(
                    "no sift-stage header (written by `sift run`): the topic it came from is unknown"
                        .to_string(),
                ),
            ),
            (Some(s), None) => match input_topic(s) {
                Some(t) => (Some(t), None),
                None => (None, Some(format!("stage `{s}` has no input topic to replay to"))),
            },
        };
        Letter {
            partition: m.partition,
            offset: m.offset.clone(),
            timestamp_ms: m.timestamp_ms,
            stage,
            reason,
            detail,
            source: text(headers::SOURCE),
            url: text(headers::URL),
            replay_to,
            not_replayable,
            original_at,
            original: original.filter(|_| replay_to.is_some()),
        }
    }

    /// Reads a claim-checked original's value from the object store. One
    /// that is gone makes the letter not replayable (and says why); a store
    /// that fails is an error, so the replay stops before passing it.
    pub async fn fill_original(&mut self, objects: &dyn ObjectStore) -> crate::Result<()> {
        let (Some(uri), Some(original)) = (&self.original_at, self.original.as_mut()) else {
            return Ok(());
        };
        let key = crate::envelope::claim_key(uri).unwrap_or_default();
        match objects.get(key).await {
            Ok((_, value)) => original.value = value,
            Err(ObjectError::NotFound(_)) => {
                self.not_replayable = Some(format!(
                    "the original's value is no longer in the object store at {uri}"
                ));
                self.replay_to = None;
                self.original = None;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn stage_or_dash(&self) -> &str {
        self.stage.as_deref().unwrap_or("-")
    }
}

/// Which letters a command looks at.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// Only letters of this stage (`clean`, `archive`, `infer`, `match`, `ingest`).
    #[arg(long)]
    pub stage: Option<String>,
    /// Only letters with this reason code (`bad_json`, `schema_version`, `http_not_found`, ...).
    #[arg(long)]
    pub reason: Option<String>,
}

impl Filter {
    /// Whether a letter passes.
    pub fn matches(&self, l: &Letter) -> bool {
        self.stage
            .as_deref()
            .is_none_or(|s| l.stage.as_deref() == Some(s))
            && self.reason.as_deref().is_none_or(|r| l.reason == r)
    }

    fn is_empty(&self) -> bool {
        self.stage.is_none() && self.reason.is_none()
    }
}

/// `sift dlq` commands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Count dead letters by stage and reason, then show the latest ones.
    List(ListArgs),
    /// Produce the original records of dead letters back to the topic of the
    /// stage that gave up, once the cause is fixed.
    ///
    /// clean and archive letters go back to sift.raw, infer letters to
    /// sift.clean, match letters to sift.profiles, each with its key, value
    /// and headers as they were (without sift-reason and sift-stage). Letters
    /// without an original (ingest's fetch failures; originals too large to
    /// carry) are counted as not replayable: the next ingest visit fetches
    /// their URL again.
    ///
    /// How far replay has got is kept as the committed offsets of consumer
    /// group `sift-dlq-replay` on sift.dlq, committed after each batch is
    /// produced, so running it again replays only letters that arrived since.
    /// Letters that --stage or --reason leave out are passed over too (the
    /// summary says where the first one is); --from-offset goes back to them.
    Replay(ReplayArgs),
}

/// `sift dlq list` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Which letters.
    #[command(flatten)]
    pub filter: Filter,
    /// How many of the latest matching letters to show.
    #[arg(short = 'n', long = "latest", default_value_t = 10)]
    pub latest: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `sift dlq replay` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReplayArgs {
    /// Which letters.
    #[command(flatten)]
    pub filter: Filter,
    /// Start at this offset of every partition of sift.dlq instead of the
    /// group's committed position (letters replayed before are replayed again).
    #[arg(long, value_name = "N")]
    pub from_offset: Option<Offset>,
    /// Count what would be replayed; produce and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Letters of one stage and reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Count {
    /// Stage, `-` when the letters have none.
    pub stage: String,
    /// Reason code.
    pub reason: String,
    /// Letters.
    pub letters: u64,
    /// Of which replayable.
    pub replayable: u64,
}

/// Where replay stands on one partition of `sift.dlq`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Standing {
    /// Partition.
    pub partition: u32,
    /// Earliest stored offset.
    pub low: Offset,
    /// Next offset to be written.
    pub high: Offset,
    /// The replay group's committed offset, if it ever committed.
    pub replayed_to: Option<Offset>,
    /// Letters after where replay stands (a lower bound past
    /// [`crate::backends::log::COUNT_LIMIT`] on a log with sparse offsets).
    pub pending: u64,
}

/// What `sift dlq list` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Listing {
    /// Letters stored.
    pub total: u64,
    /// Letters that pass the filter.
    pub matching: u64,
    /// Matching letters by stage and reason.
    pub counts: Vec<Count>,
    /// The latest matching letters, oldest first.
    pub latest: Vec<Letter>,
    /// The replay group's position per partition.
    pub replay: Vec<Standing>,
}

/// A letter `sift dlq replay` could not replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unreplayable {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: Offset,
    /// Stage, `-` when none.
    pub stage: String,
    /// Reason code.
    pub reason: String,
    /// URL, when known.
    pub url: Option<String>,
    /// Why it cannot be replayed.
    pub why: String,
}

/// One partition's part in a replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    /// Partition.
    pub partition: u32,
    /// First offset read.
    pub from: Offset,
    /// Offset after the last one read (committed unless a dry run).
    pub to: Offset,
    /// The first letter the filter passed over, to come back to with `--from-offset`.
    pub first_passed_over: Option<Offset>,
}

/// What `sift dlq replay` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplaySummary {
    /// Whether nothing was produced or committed.
    pub dry_run: bool,
    /// Letters read.
    pub read: u64,
    /// Originals produced, by topic.
    pub replayed: BTreeMap<String, u64>,
    /// Matching letters that could not be replayed, by `stage/reason`.
    pub not_replayable: BTreeMap<String, u64>,
    /// The first few of those.
    pub not_replayable_letters: Vec<Unreplayable>,
    /// Letters the filter left out, passed over.
    pub passed_over: u64,
    /// What was read of each partition.
    pub spans: Vec<Span>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Runs `sift dlq`.
pub async fn main(config: &Config, command: DlqCommand) -> crate::Result<()> {
    let log = match command {
        // Listing only reads: beside the daemons, and changing no file.
        DlqCommand::List(_) => crate::backends::open_log_read_only(config).await?,
        _ => crate::backends::open_log(config).await?,
    };
    match command {
        DlqCommand::List(args) => {
            let listing = list(log.as_ref(), &args.filter, args.latest).await?;
            if args.json {
                println!("{}", to_json(&listing)?);
            } else {
                print_listing(&listing, &args.filter);
            }
        }
        DlqCommand::Replay(args) => {
            let bar = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "replaying sift.dlq {bar:30} {pos}/{len} letters {per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            let summary = replay_with(log.as_ref(), config, &args, &bar).await;
            bar.finish_and_clear();
            let s = summary?;
            if args.json {
                println!("{}", to_json(&s)?);
            } else {
                print_replay(&s);
            }
        }
    }
    Ok(())
}

fn to_json(v: &impl Serialize) -> crate::Result<String> {
    serde_json::to_string_pretty(v)
        .map_err(|e| crate::Error::Invalid(format!("cannot encode the output as JSON: {e}")))
}

/// The watermarks of `sift.dlq`; none when it does not exist yet.
async fn dlq_marks(log: &dyn Log) -> Result<Vec<Watermarks>, LogError> {
    match log.watermarks(topics::DLQ).await {
        Ok(m) => Ok(m),
        Err(LogError::NoSuchTopic(_)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Reads a partition of `sift.dlq` from `from` up to `high` (exclusive), a
/// batch at a time; an offset lost to retention skips to the earliest kept.
async fn read_batch(
    log: &dyn Log,
    partition: u32,
    from: &mut Offset,
    high: &Offset,
) -> Result<Vec<Message>, LogError> {
    loop {
        if *from >= *high {
            return Ok(Vec::new());
        }
        match log.fetch(topics::DLQ, partition, from, FETCH_LETTERS).await {
            Ok(mut batch) => {
                batch.retain(|m| m.offset < *high);
                if let Some(last) = batch.last() {
                    *from = last.offset.next();
                }
                return Ok(batch);
            }
            Err(LogError::OffsetOutOfRange { earliest, .. }) if earliest > *from => {
                tracing::warn!(
                    partition,
                    from = %from,
                    to = %earliest,
                    "Dead letters were deleted by retention; continuing from the earliest kept."
                );
                *from = earliest;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Counts the letters by stage and reason and keeps the latest `latest`
/// that pass `filter`; the library entry of `sift dlq list`.
pub async fn list(log: &dyn Log, filter: &Filter, latest: usize) -> crate::Result<Listing> {
    let marks = dlq_marks(log).await?;
    let committed = if marks.is_empty() {
        Vec::new()
    } else {
        log.committed(REPLAY_GROUP, topics::DLQ).await?
    };
    let mut listing = Listing::default();
    let mut counts: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let mut latest_of_each: Vec<Letter> = Vec::new();
    for w in &marks {
        let replayed_to = committed
            .iter()
            .find(|(p, _)| *p == w.partition)
            .and_then(|(_, c)| c.clone());
        let at = replayed_to
            .clone()
            .unwrap_or_else(|| w.low.clone())
            .clamp(w.low.clone(), w.high.clone());
        listing.replay.push(Standing {
            partition: w.partition,
            low: w.low.clone(),
            high: w.high.clone(),
            replayed_to,
            pending: log.count(topics::DLQ, w.partition, &at, &w.high).await?,
        });
        let mut tail: VecDeque<Letter> = VecDeque::new();
        let mut at = w.low.clone();
        loop {
            let batch = read_batch(log, w.partition, &mut at, &w.high).await?;
            if batch.is_empty() {
                break;
            }
            for m in &batch {
                listing.total += 1;
                let mut l = Letter::read(m);
                if !filter.matches(&l) {
                    continue;
                }
                listing.matching += 1;
                let c = counts
                    .entry((l.stage_or_dash().to_string(), l.reason.clone()))
                    .or_default();
                c.0 += 1;
                c.1 += u64::from(l.replay_to.is_some());
                if latest > 0 {
                    l.original = None;
                    if tail.len() == latest {
                        tail.pop_front();
                    }
                    tail.push_back(l);
                }
            }
        }
        latest_of_each.extend(tail);
    }
    listing.counts = counts
        .into_iter()
        .map(|((stage, reason), (letters, replayable))| Count {
            stage,
            reason,
            letters,
            replayable,
        })
        .collect();
    // The latest across partitions, by the time each was sent.
    latest_of_each.sort_by(|a, b| {
        (a.timestamp_ms, a.partition, &a.offset).cmp(&(b.timestamp_ms, b.partition, &b.offset))
    });
    let skip = latest_of_each.len().saturating_sub(latest);
    listing.latest = latest_of_each.split_off(skip);
    Ok(listing)
}

fn print_listing(l: &Listing, filter: &Filter) {
    if l.replay.is_empty() {
        println!("sift.dlq does not exist yet: nothing has been dead-lettered.");
        return;
    }
    if filter.is_empty() {
        println!("sift.dlq holds {} dead letters", l.total);
    } else {
        println!(
            "sift.dlq holds {} dead letters, {} of them match",
            l.total, l.matching
        );
    }
    for s in &l.replay {
        let pending = s.pending;
        match &s.replayed_to {
            Some(c) => println!(
                "  partition {}: offsets {}..{}, `sift dlq replay` is at {c} ({pending} after it)",
                s.partition, s.low, s.high
            ),
            None => println!(
                "  partition {}: offsets {}..{}, never replayed ({pending} letters)",
                s.partition, s.low, s.high
            ),
        }
    }
    if l.counts.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<10} {:<24} {:>10} {:>11}",
        "STAGE", "REASON", "LETTERS", "REPLAYABLE"
    );
    for c in &l.counts {
        println!(
            "{:<10} {:<24} {:>10} {:>11}",
            c.stage, c.reason, c.letters, c.replayable
        );
    }
    if l.latest.is_empty() {
        return;
    }
    println!();
    println!("latest {} (oldest first):", l.latest.len());
    for x in &l.latest {
        println!(
            "{}@{}  {}  {}/{}  source={}  url={}",
            x.partition,
            x.offset,
            rfc3339(x.timestamp_ms),
            x.stage_or_dash(),
            x.reason,
            x.source.as_deref().unwrap_or("-"),
            x.url.as_deref().unwrap_or("-"),
        );
        println!("    {}", shorten(&x.detail));
        match (x.replay_to, &x.not_replayable) {
            (Some(t), _) => match &x.original_at {
                Some(at) => println!("    replays to {t} (the original's value is at {at})"),
                None => println!("    replays to {t}"),
            },
            (None, Some(why)) => println!("    not replayable: {why}"),
            (None, None) => {}
        }
    }
}

fn rfc3339(ms: i64) -> String {
    u64::try_from(ms).map_or_else(
        |_| ms.to_string(),
        |ms| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        },
    )
}

fn shorten(s: &str) -> String {
    let one_line = s.replace('\n', "\\n");
    if one_line.chars().count() <= DETAIL_CHARS {
        one_line
    } else {
        let cut: String = one_line.chars().take(DETAIL_CHARS).collect();
        format!("{cut}…")
    }
}

/// Replays the originals of the letters that pass `args.filter`; the
/// library entry of `sift dlq replay`.
pub async fn replay(
    log: &dyn Log,
    config: &Config,
    args: &ReplayArgs,
) -> crate::Result<ReplaySummary> {
    replay_with(log, config, args, &indicatif::ProgressBar::hidden()).await
}

async fn replay_with(
    log: &dyn Log,
    config: &Config,
    args: &ReplayArgs,
    bar: &indicatif::ProgressBar,
) -> crate::Result<ReplaySummary> {
    let started = std::time::Instant::now();
    let mut summary = ReplaySummary {
        dry_run: args.dry_run,
        ..ReplaySummary::default()
    };
    let marks = dlq_marks(log).await?;
    if marks.is_empty() {
        return Ok(summary);
    }
    // The group's position is read once this process holds every partition,
    // so a replay that ran just before has committed all it will.
    let mut consumer = if args.dry_run {
        None
    } else {
        Some(join(log, &marks).await?)
    };
    let committed = log.committed(REPLAY_GROUP, topics::DLQ).await?;
    let starts: Vec<Offset> = marks
        .iter()
        .map(|w| {
            let c = committed
                .iter()
                .find(|(p, _)| *p == w.partition)
                .and_then(|(_, c)| c.clone());
            args.from_offset
                .clone()
                .or(c)
                .unwrap_or_else(|| w.low.clone())
                .clamp(w.low.clone(), w.high.clone())
        })
        .collect();
    let mut length = 0u64;
    for (w, s) in marks.iter().zip(&starts) {
        length = length.saturating_add(log.count(topics::DLQ, w.partition, s, &w.high).await?);
    }
    bar.set_length(length);
    let mut created: BTreeSet<&'static str> = BTreeSet::new();
    // Opened at the first claim-checked original.
    let mut objects: Option<std::sync::Arc<dyn ObjectStore>> = None;
    let result = async {
        for (w, start) in marks.iter().zip(&starts) {
            let mut span = Span {
                partition: w.partition,
                from: start.clone(),
                to: start.clone(),
                first_passed_over: None,
            };
            let mut at = start.clone();
            loop {
                let batch = read_batch(log, w.partition, &mut at, &w.high).await?;
                let Some(last) = batch.last() else {
                    break;
                };
                let next = last.offset.next();
                let mut out: BTreeMap<&'static str, Vec<Record>> = BTreeMap::new();
                for m in &batch {
                    summary.read += 1;
                    let mut l = Letter::read(m);
                    if !args.filter.matches(&l) {
                        summary.passed_over += 1;
                        span.first_passed_over.get_or_insert(l.offset);
                        continue;
                    }
                    if l.original_at.is_some() {
                        if objects.is_none() {
                            objects = Some(crate::backends::open_objects(config).await?);
                        }
                        if let Some(store) = &objects {
                            l.fill_original(store.as_ref()).await?;
                        }
                    }
                    match (l.replay_to, l.original) {
                        (Some(topic), Some(original)) => {
                            out.entry(topic).or_default().push(original)
                        }
                        _ => {
                            let why = l.not_replayable.clone().unwrap_or_default();
                            *summary
                                .not_replayable
                                .entry(format!(
                                    "{}/{}",
                                    l.stage.as_deref().unwrap_or("-"),
                                    l.reason
                                ))
                                .or_default() += 1;
                            if summary.not_replayable_letters.len() < NOT_REPLAYABLE_KEPT {
                                summary.not_replayable_letters.push(Unreplayable {
                                    partition: l.partition,
                                    offset: l.offset,
                                    stage: l.stage.unwrap_or_else(|| "-".into()),
                                    reason: l.reason,
                                    url: l.url,
                                    why,
                                });
                            }
                        }
                    }
                }
                for (topic, records) in out {
                    let n = records.len() as u64;
                    if !args.dry_run {
                        // The stage's own topic; created as the stage creates it.
                        if created.insert(topic) {
                            log.create_topic(topic, config.log.default_partitions)
                                .await?;
                        }
                        log.produce(topic, records).await?;
                    }
                    *summary.replayed.entry(topic.to_string()).or_default() += n;
                }
                // Committed only once the log has every original of the batch.
                if let Some(consumer) = consumer.as_deref_mut() {
                    // Polled to stay in the group: Kafka expels a member that
                    // has not polled for `max.poll.interval.ms`.
                    consumer.poll(1, Duration::ZERO).await?;
                    commit(consumer, w.partition, next.clone()).await?;
                }
                span.to = next;
                bar.inc(batch.len() as u64);
            }
            summary.spans.push(span);
        }
        Ok::<(), crate::Error>(())
    }
    .await;
    if let Some(consumer) = consumer {
        consumer.close().await?;
    }
    result?;
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        read = summary.read,
        replayed = ?summary.replayed,
        not_replayable = ?summary.not_replayable,
        passed_over = summary.passed_over,
        dry_run = summary.dry_run,
        "Dead-letter replay finished."
    );
    Ok(summary)
}

/// Joins the replay group and waits until it holds every partition of
/// `sift.dlq`: another replay running at the same time would share them.
async fn join(log: &dyn Log, marks: &[Watermarks]) -> crate::Result<Box<dyn Consumer>> {
    let mut consumer = log.subscribe(REPLAY_GROUP, &[topics::DLQ]).await?;
    let deadline = std::time::Instant::now() + JOIN_WAIT;
    loop {
        // Polled only to take part in the group; letters are read with `fetch`.
        consumer.poll(1, Duration::from_millis(200)).await?;
        let held = consumer
            .assignment()
            .iter()
            .filter(|tp| tp.topic == topics::DLQ)
            .count();
        if held == marks.len() {
            return Ok(consumer);
        }
        if std::time::Instant::now() >= deadline {
            consumer.close().await?;
            return Err(crate::Error::Invalid(format!(
                "consumer group {REPLAY_GROUP} gave this process {held} of sift.dlq's {} \
                 partitions after {} s: another `sift dlq replay` is running; let it finish, \
                 then run this one again",
                marks.len(),
                JOIN_WAIT.as_secs()
            )));
        }
    }
}

async fn commit(
    consumer: &mut dyn Consumer,
    partition: u32,
    next_offset: Offset,
) -> crate::Result<()> {
    let c = Commit {
        topic: topics::DLQ.to_string(),
        partition,
        next_offset: next_offset.clone(),
    };
    match consumer.commit(&[c]).await {
        Ok(()) => Ok(()),
        Err(LogError::NotAssigned { .. }) => Err(crate::Error::Invalid(format!(
            "consumer group {REPLAY_GROUP} took sift.dlq partition {partition} from this \
             process during the replay (another `sift dlq replay` joined, or this one stalled); \
             the letters before offset {next_offset} were produced but not committed, so the \
             next run replays them again. Run one `sift dlq replay` at a time"
        ))),
        Err(e) => Err(e.into()),
    }
}

fn print_replay(s: &ReplaySummary) {
    let what = if s.dry_run {
        "dry run of sift dlq replay (nothing produced or committed)"
    } else {
        "sift dlq replay"
    };
    println!("{what} finished in {:.2} s", s.seconds);
    if s.spans.is_empty() {
        println!("  sift.dlq does not exist yet: nothing has been dead-lettered");
        return;
    }
    for sp in &s.spans {
        println!(
            "  partition {}: letters {}..{}{}",
            sp.partition,
            sp.from,
            sp.to,
            if s.dry_run {
                ""
            } else {
                "  (committed for group sift-dlq-replay)"
            }
        );
    }
    println!("  letters read       {:>10}", s.read);
    let replayed: u64 = s.replayed.values().sum();
    let to: Vec<String> = s.replayed.iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!("  replayed           {:>10}  {}", replayed, to.join(", "));
    let dead: u64 = s.not_replayable.values().sum();
    let by: Vec<String> = s
        .not_replayable
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("  not replayable     {:>10}  {}", dead, by.join(", "));
    for u in &s.not_replayable_letters {
        println!(
            "    {}@{} {}/{} {}: {}",
            u.partition,
            u.offset,
            u.stage,
            u.reason,
            u.url.as_deref().unwrap_or("-"),
            u.why
        );
    }
    println!(
        "  passed over        {:>10}  (left out by --stage/--reason)",
        s.passed_over
    );
    for sp in &s.spans {
        if let Some(o) = &sp.first_passed_over {
            println!(
                "    partition {}: the first passed over is at offset {o}; \
                 `sift dlq replay --from-offset {o}` with other filters comes back to it",
                sp.partition
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::{DeadLetter, Original};

    fn letter(value: Bytes) -> DeadLetter {
        DeadLetter {
            stage: Stage::Clean,
            reason: "bad_json",
            detail: "not an envelope".into(),
            source: Some("s".into()),
            url: Some("https://x/".into()),
            original: Some(Original {
                key: Some(Bytes::from("k1")),
                value,
                headers: vec![(headers::SOURCE.into(), Bytes::from("s"))],
            }),
        }
    }

    fn header<'a>(r: &'a Record, name: &str) -> Option<&'a [u8]> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn keeps_the_original_and_says_why() {
        let r = letter(Bytes::from("{oops")).record();
        assert_eq!(r.value, Bytes::from("{oops"));
        assert_eq!(r.key, Some(Bytes::from("k1")));
        assert_eq!(
            header(&r, headers::REASON),
            Some(&b"bad_json: not an envelope"[..])
        );
        assert_eq!(header(&r, headers::STAGE), Some(&b"clean"[..]));
        assert_eq!(header(&r, headers::URL), Some(&b"https://x/"[..]));
        assert_eq!(
            r.headers
                .iter()
                .filter(|(k, _)| k == headers::SOURCE)
                .count(),
            1
        );
    }

    fn message(r: Record) -> Message {
        Message {
            topic: topics::DLQ.into(),
            partition: 0,
            offset: Offset::new(7),
            timestamp_ms: 1,
            key: r.key,
            value: r.value,
            headers: r.headers,
        }
    }

    #[test]
    fn a_letter_reads_back_with_its_original() {
        let mut d = letter(Bytes::from("{oops"));
        if let Some(o) = d.original.as_mut() {
            o.headers
                .push((headers::URL.into(), Bytes::from("https://x/")));
        }
        let l = Letter::read(&message(d.record()));
        assert_eq!(l.stage.as_deref(), Some("clean"));
        assert_eq!(l.reason, "bad_json");
        assert_eq!(l.detail, "not an envelope");
        assert_eq!(l.replay_to, Some(topics::RAW));
        assert_eq!(l.not_replayable, None);
        let Some(o) = l.original else {
            panic!("the original is kept");
        };
        assert_eq!(o.key, Some(Bytes::from("k1")));
        assert_eq!(o.value, Bytes::from("{oops"));
        let mut hs: Vec<&str> = o.headers.iter().map(|(k, _)| k.as_str()).collect();
        hs.sort_unstable();
        assert_eq!(hs, [headers::REPLAY, headers::SOURCE, headers::URL]);
        let marker = o.headers.iter().find(|(k, _)| k == headers::REPLAY);
        assert_eq!(marker.map(|(_, v)| v.as_ref()), Some(&b"dlq:clean"[..]));
    }

    #[test]
    fn letters_without_an_original_are_not_replayable() {
        for (stage, d) in [
            (Stage::Ingest, None),
            (Stage::Clean, Some(Bytes::from(vec![b'x'; 1_000_000]))),
        ] {
            let mut x = letter(Bytes::new());
            x.stage = stage;
            x.original = d.map(|value| Original {
                key: None,
                value,
                headers: Vec::new(),
            });
            let l = Letter::read(&message(x.record()));
            assert_eq!(l.stage.as_deref(), Some(stage.name()));
            assert_eq!(l.replay_to, None, "{stage}");
            assert!(l.original.is_none());
            assert!(l
                .not_replayable
                .as_deref()
                .is_some_and(|w| w.starts_with("no original record")));
            assert_eq!(l.url.as_deref(), Some("https://x/"));
        }
        assert_eq!(input_topic("infer"), Some(topics::CLEAN));
        assert_eq!(input_topic("match"), Some(topics::PROFILES));
        assert_eq!(input_topic("archive"), Some(topics::RAW));
        assert_eq!(input_topic("ingest"), None);
    }

    #[test]
    fn a_too_large_original_is_described_instead() -> anyhow::Result<()> {
        let r = letter(Bytes::from(vec![b'x'; 1_000_000])).record();
        assert!(r.value.len() < 4096);
        assert_eq!(r.key, Some(Bytes::from("k1")));
        let v: serde_json::Value = serde_json::from_slice(&r.value)?;
        assert!(v["detail"]
            .as_str()
            .is_some_and(|d| d.contains("1000000 bytes")));
        Ok(())
    }
}
