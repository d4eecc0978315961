//! `sift archive replay`: the archived envelopes of a date range, produced
//! again to `sift.raw` (or another topic) as a fresh ingest would produce
//! them: keyed by document id, with the source, content type, schema and URL
//! headers. Downstream stages write by document id, so a replay rewrites the
//! same rows.
//!
//! Parts are listed per day (and per source when `--source` is given), read
//! in key order, and handled one at a time: a part is downloaded and
//! decompressed whole (its zstd checksum is checked before anything of it is
//! produced), its lines parsed on a blocking thread, and its records produced
//! in batches. At most [`PARTS_AHEAD`] parts are read ahead of the one being
//! produced, so memory holds a few parts, each about `archive.flush_bytes` at
//! most when it was written.
//!
//! A part that cannot be read is skipped whole; a line that is not an
//! envelope is skipped alone. Both are counted and the first
//! [`ERRORS_KEPT`] reported with the part's key (and the line number), and
//! the command then exits non-zero; neither stops the replay.
//!
//! Records produced to `sift.raw` are read again by every consumer of it.
//! They carry the header `sift-replay: archive`, so the archive stage skips
//! them instead of archiving them a second time.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::backends::log::{Log, Record, MAX_RECORD_BYTES};
use crate::backends::objects::ObjectStore;
use crate::config::{Config, ConfigError};
use crate::envelope::{headers, topics};

use super::keys::{self, Layout};

/// Parts downloaded and decoded ahead of the one being produced.
const PARTS_AHEAD: usize = 2;
/// Records per produce call.
const BATCH_RECORDS: usize = 1000;
/// Bytes (keys, values, headers) per produce call.
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Errors kept for the report; the rest are only counted.
pub const ERRORS_KEPT: usize = 20;
/// The longest date range one replay accepts.
const MAX_DAYS: i64 = 3660;
const DAY_MS: i64 = 86_400_000;

/// `sift archive replay` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// First day to replay, UTC (`YYYY-MM-DD`, the archive's `dt=`).
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = date_arg)]
    pub from: String,
    /// Last day to replay, inclusive; defaults to --from.
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = date_arg)]
    pub to: Option<String>,
    /// Replay only this source tag (repeat for several); default: every source.
    #[arg(long = "source", value_name = "TAG")]
    pub sources: Vec<String>,
    /// Topic to produce to. It must exist unless it is `sift.raw`.
    #[arg(long, default_value = topics::RAW)]
    pub topic: String,
    /// Read and count everything, produce nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ReplayArgs {
    /// A replay of `from..=to` (`YYYY-MM-DD`) of every source to `sift.raw`.
    pub fn new(from: &str, to: &str) -> Self {
        ReplayArgs {
            from: from.to_string(),
            to: Some(to.to_string()),
            sources: Vec::new(),
            topic: topics::RAW.to_string(),
            dry_run: false,
            json: false,
        }
    }
}

/// Something a replay skipped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayError {
    /// Key of the part.
    pub part: String,
    /// 1-based line number, for a line that is not an envelope; None when the
    /// whole part was skipped.
    pub line: Option<u64>,
    /// What was wrong.
    pub message: String,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplaySummary {
    /// The topic produced to.
    pub topic: String,
    /// Whether nothing was produced (`--dry-run`).
    pub dry_run: bool,
    /// First and last day replayed.
    pub from: String,
    /// Last day, inclusive.
    pub to: String,
    /// Parts listed in the range.
    pub parts: u64,
    /// Parts read (listed minus skipped).
    pub parts_read: u64,
    /// Envelopes produced (counted, in a dry run).
    pub records: u64,
    /// Compressed bytes of the parts read.
    pub bytes: u64,
    /// Their bytes decompressed.
    pub bytes_uncompressed: u64,
    /// Parts that could not be read, skipped whole.
    pub skipped_parts: u64,
    /// Lines that are not envelopes, skipped.
    pub skipped_lines: u64,
    /// The first [`ERRORS_KEPT`] of those, in the order met.
    pub errors: Vec<ReplayError>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Records per second of wall time.
    pub records_per_second: f64,
}

impl ReplaySummary {
    /// Parts and lines skipped.
    pub fn skipped(&self) -> u64 {
        self.skipped_parts + self.skipped_lines
    }

    fn error(&mut self, e: ReplayError) {
        tracing::warn!(part = %e.part, line = ?e.line, error = %e.message, "Skipped while replaying the archive.");
        if self.errors.len() < ERRORS_KEPT {
            self.errors.push(e);
        }
    }
}

/// Runs `sift archive replay`: the summary, then a non-zero exit when
/// anything was skipped.
pub async fn main(config: &Config, args: ReplayArgs) -> crate::Result<()> {
    let store = crate::backends::open_objects(config).await?;
    let log = crate::backends::open_log(config).await?;
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "replaying {msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    let summary = replay_with(log, store, config, &args, &bar).await;
    bar.finish_and_clear();
    let s = summary?;
    if args.json {
        let json = serde_json::to_string_pretty(&s)
            .map_err(|e| crate::Error::Invalid(format!("cannot encode the summary: {e}")))?;
        println!("{json}");
    } else {
        print_summary(&s);
    }
    if s.skipped() > 0 {
        return Err(crate::Error::Invalid(format!(
            "the replay skipped {} part(s) and {} line(s) (the first are listed above); \
             everything else was {}",
            s.skipped_parts,
            s.skipped_lines,
            if s.dry_run { "counted" } else { "produced" }
        )));
    }
    Ok(())
}

fn print_summary(s: &ReplaySummary) {
    let verb = if s.dry_run {
        "dry run (nothing produced)"
    } else {
        "replay"
    };
    println!(
        "{verb} of {}..={} to {} finished in {:.2} s",
        s.from, s.to, s.topic, s.seconds
    );
    println!("  parts listed       {:>12}", s.parts);
    println!("  parts read         {:>12}", s.parts_read);
    println!(
        "  records            {:>12}  ({:.0} records/s)",
        s.records, s.records_per_second
    );
    println!("  bytes read         {:>12}  (zstd)", s.bytes);
    println!("  bytes decoded      {:>12}", s.bytes_uncompressed);
    println!("  parts skipped      {:>12}", s.skipped_parts);
    println!("  lines skipped      {:>12}", s.skipped_lines);
    for e in &s.errors {
        match e.line {
            Some(n) => println!("  skipped {} line {n}: {}", e.part, e.message),
            None => println!("  skipped {}: {}", e.part, e.message),
        }
    }
    let unlisted = s.skipped().saturating_sub(s.errors.len() as u64);
    if unlisted > 0 {
        println!("  … and {unlisted} more (see the log)");
    }
}

/// Replays archived envelopes; the library entry of `sift archive replay`.
/// Skipped parts and lines are in the summary, not errors; an error means
/// the listing or the log failed.
pub async fn replay(
    log: Arc<dyn Log>,
    store: Arc<dyn ObjectStore>,
    config: &Config,
    args: &ReplayArgs,
) -> crate::Result<ReplaySummary> {
    replay_with(log, store, config, args, &indicatif::ProgressBar::hidden()).await
}

/// One part of the archive to read.
#[derive(Debug, Clone)]
struct Part {
    key: String,
    size: u64,
}

/// A part read and parsed: its records, or why it was skipped.
struct Loaded {
    key: String,
    compressed: u64,
    outcome: Result<Decoded, String>,
}

struct Decoded {
    records: Vec<Record>,
    uncompressed: u64,
    /// (line number, what is wrong).
    bad: Vec<(u64, String)>,
}

async fn replay_with(
    log: Arc<dyn Log>,
    store: Arc<dyn ObjectStore>,
    config: &Config,
    args: &ReplayArgs,
    bar: &indicatif::ProgressBar,
) -> crate::Result<ReplaySummary> {
    let started = Instant::now();
    let invalid = |field: &'static str, message: String| {
        crate::Error::Config(ConfigError::Value { field, message })
    };
    let layout = Layout::new(&config.archive.prefix).map_err(|e| {
        invalid(
            "archive.prefix",
            format!(
                "`{}` cannot start an object key: {e}",
                config.archive.prefix
            ),
        )
    })?;
    let to_arg = args.to.as_deref().unwrap_or(&args.from);
    let from = parse_date(&args.from).map_err(|e| crate::Error::Invalid(format!("--from: {e}")))?;
    let to = parse_date(to_arg).map_err(|e| crate::Error::Invalid(format!("--to: {e}")))?;
    if to < from {
        return Err(crate::Error::Invalid(format!(
            "--to {to_arg} is before --from {}; give the range earliest day first",
            args.from
        )));
    }
    if to - from >= MAX_DAYS {
        return Err(crate::Error::Invalid(format!(
            "{}..={to_arg} is {} days; replay at most {MAX_DAYS} days at a time",
            args.from,
            to - from + 1
        )));
    }
    if !args.dry_run {
        if args.topic == topics::RAW {
            log.create_topic(topics::RAW, config.log.default_partitions)
                .await?;
        } else {
            // Fails now, naming the topic, rather than after the first part.
            log.watermarks(&args.topic).await?;
        }
    }

    let segments: BTreeSet<String> = args
        .sources
        .iter()
        .map(|s| keys::source_segment(s))
        .collect();
    let mut parts = Vec::new();
    for day in from..=to {
        let dt = keys::utc_date(day * DAY_MS);
        let day_prefix = format!("{}dt={dt}/", layout.prefix());
        let prefixes: Vec<String> = if segments.is_empty() {
            vec![day_prefix]
        } else {
            segments
                .iter()
                .map(|s| format!("{day_prefix}source={s}/"))
                .collect()
        };
        let mut listed = Vec::new();
        for prefix in prefixes {
            for m in store.list(&prefix).await? {
                if is_part(&m.key) {
                    listed.push(Part {
                        key: m.key,
                        size: m.size,
                    });
                } else {
                    tracing::debug!(key = %m.key, "Not an archive part; left out of the replay.");
                }
            }
        }
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        parts.extend(listed);
    }
    let mut summary = ReplaySummary {
        topic: args.topic.clone(),
        dry_run: args.dry_run,
        from: keys::utc_date(from * DAY_MS),
        to: keys::utc_date(to * DAY_MS),
        parts: parts.len() as u64,
        ..ReplaySummary::default()
    };
    tracing::info!(
        from = %summary.from,
        to = %summary.to,
        sources = ?args.sources,
        parts = parts.len(),
        topic = %args.topic,
        dry_run = args.dry_run,
        "Replaying the archive."
    );
    bar.set_length(parts.iter().map(|p| p.size).sum());
    bar.set_message(format!("{} parts", parts.len()));

    // Each part is read on its own task so the next ones download and decode
    // while this one is produced; `buffered` keeps at most PARTS_AHEAD going.
    let mut loaded = futures::stream::iter(parts.into_iter().map(|part| {
        let store = store.clone();
        tokio::spawn(load(store, part))
    }))
    .buffered(PARTS_AHEAD);
    while let Some(next) = loaded.next().await {
        let part = next
            .map_err(|e| crate::Error::io("reading an archive part", std::io::Error::other(e)))?;
        bar.inc(part.compressed);
        let decoded = match part.outcome {
            Ok(d) => d,
            Err(message) => {
                summary.skipped_parts += 1;
                summary.error(ReplayError {
                    part: part.key,
                    line: None,
                    message,
                });
                continue;
            }
        };
        summary.parts_read += 1;
        summary.bytes += part.compressed;
        summary.bytes_uncompressed += decoded.uncompressed;
        for (line, message) in decoded.bad {
            summary.skipped_lines += 1;
            summary.error(ReplayError {
                part: part.key.clone(),
                line: Some(line),
                message,
            });
        }
        let n = decoded.records.len() as u64;
        if !args.dry_run {
            produce(log.as_ref(), &args.topic, decoded.records).await?;
        }
        summary.records += n;
        bar.set_message(format!("{} records", summary.records));
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.records_per_second = summary.records as f64 / summary.seconds.max(1e-9);
    tracing::info!(
        parts = summary.parts_read,
        records = summary.records,
        skipped_parts = summary.skipped_parts,
        skipped_lines = summary.skipped_lines,
        "Archive replay finished."
    );
    Ok(summary)
}

/// Produces a part's records in batches, in order.
async fn produce(log: &dyn Log, topic: &str, records: Vec<Record>) -> crate::Result<()> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    for r in records {
        bytes += record_bytes(&r);
        batch.push(r);
        if batch.len() >= BATCH_RECORDS || bytes >= BATCH_BYTES {
            log.produce(topic, std::mem::take(&mut batch)).await?;
            bytes = 0;
        }
    }
    if !batch.is_empty() {
        log.produce(topic, batch).await?;
    }
    Ok(())
}

/// About the bytes a record takes in the log (a little over, never under).
fn record_bytes(r: &Record) -> usize {
    64 + r.key.as_ref().map_or(0, Bytes::len)
        + r.value.len()
        + r.headers
            .iter()
            .map(|(n, v)| 8 + n.len() + v.len())
            .sum::<usize>()
}

/// Downloads, decompresses and parses one part.
async fn load(store: Arc<dyn ObjectStore>, part: Part) -> Loaded {
    let body = match store.get(&part.key).await {
        Ok((_, body)) => body,
        Err(e) => {
            return Loaded {
                key: part.key,
                compressed: part.size,
                outcome: Err(format!("cannot read the part: {e}")),
            }
        }
    };
    let compressed = body.len() as u64;
    let outcome = tokio::task::spawn_blocking(move || decode(&body))
        .await
        .unwrap_or_else(|e| Err(format!("decoding the part failed: {e}")));
    Loaded {
        key: part.key,
        compressed,
        outcome,
    }
}

/// A part's records: each line that is a current envelope, as a fresh ingest
/// produces it (see `ingest::produce`), the line itself as the value.
fn decode(body: &[u8]) -> Result<Decoded, String> {
    if body.is_empty() {
        return Err("the part is empty (0 bytes); a part holds at least one record".into());
    }
    // Whole before anything is produced: the frame's checksum is checked at
    // its end, so a corrupt part is skipped whole, not half replayed.
    let text = Bytes::from(
        zstd::stream::decode_all(body).map_err(|e| format!("not a readable zstd stream: {e}"))?,
    );
    let mut records = Vec::new();
    let mut bad = Vec::new();
    let mut start = 0;
    let mut line_no = 0u64;
    while start < text.len() {
        let end = text[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(text.len(), |i| start + i);
        line_no += 1;
        let line = text.slice(start..end);
        start = end + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let env = match crate::stage::parse(&line) {
            Ok(env) => env,
            Err(r) => {
                bad.push((line_no, format!("{}: {}", r.reason, r.detail)));
                continue;
            }
        };
        let mut marked = env.raw_headers();
        marked.push((headers::REPLAY.into(), Bytes::from_static(b"archive")));
        let record = Record {
            key: Some(Bytes::from(env.id)),
            value: line,
            headers: marked,
        };
        let size = record_bytes(&record);
        if size > MAX_RECORD_BYTES {
            bad.push((
                line_no,
                format!(
                    "the record would be {size} bytes with its headers; a log record holds at most {MAX_RECORD_BYTES}"
                ),
            ));
            continue;
        }
        records.push(record);
    }
    Ok(Decoded {
        records,
        uncompressed: text.len() as u64,
        bad,
    })
}

/// Whether a key names an archive part (`…/part-<P>-<OFFSET>.jsonl.zst`).
fn is_part(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("part-") && name.ends_with(".jsonl.zst"))
}

/// Checks a `YYYY-MM-DD` flag (clap's value parser).
fn date_arg(s: &str) -> Result<String, String> {
    parse_date(s).map(|_| s.to_string())
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` calendar date.
fn parse_date(s: &str) -> Result<i64, String> {
    let bad = || format!("`{s}` is not a date: write it as YYYY-MM-DD, e.g. 2024-03-01");
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = &s[r];
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    // Howard Hinnant's days_from_civil, the inverse of keys::utc_date.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    // Month 13 or February 30 land on another date: refuse them.
    if !(1..=12).contains(&m) || d < 1 || keys::utc_date(days * DAY_MS) != s {
        return Err(format!("`{s}` is not a calendar date"));
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::SCHEMA_VERSION;

    #[test]
    fn dates_parse_and_round_trip() {
        assert_eq!(parse_date("1970-01-01"), Ok(0));
        assert_eq!(parse_date("1969-12-31"), Ok(-1));
        assert_eq!(parse_date("2024-03-01"), Ok(1_709_251_200_000 / DAY_MS));
        assert_eq!(parse_date("2024-02-29"), Ok(1_709_251_200_000 / DAY_MS - 1));
        for day in (-1000..30_000).step_by(7) {
            assert_eq!(parse_date(&keys::utc_date(day * DAY_MS)), Ok(day));
        }
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-04-31",
            "2024-3-01",
            "20240301",
            "2024-03-01T00:00",
            "+024-03-01",
            "",
        ] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_part_keys_are_parts() {
        assert!(is_part(
            "raw/dt=2024-03-01/source=s/part-0-00000000000000000000.jsonl.zst"
        ));
        assert!(!is_part("raw/dt=2024-03-01/source=s/_SUCCESS"));
        assert!(!is_part("raw/dt=2024-03-01/source=s/part-0.json"));
    }

    #[test]
    fn decodes_envelopes_and_reports_the_rest() -> anyhow::Result<()> {
        let env = crate::envelope::Envelope {
            v: SCHEMA_VERSION,
            id: crate::envelope::document_id("s", "https://x/1"),
            source: "s".into(),
            url: "https://x/1".into(),
            fetched_at_ms: 0,
            content_type: "text/html".into(),
            title: "t".into(),
            text: Some("hello".into()),
            body_uri: None,
            metadata: Default::default(),
        };
        let line = serde_json::to_string(&env)?;
        let text = format!("{line}\n{{oops\n\n{line}\n");
        let body = zstd::encode_all(text.as_bytes(), 3)?;
        let Ok(d) = decode(&body) else {
            anyhow::bail!("a valid part was refused");
        };
        assert_eq!(d.records.len(), 2);
        assert_eq!(d.bad.len(), 1);
        assert_eq!(d.bad[0].0, 2);
        assert_eq!(d.records[0].key, Some(Bytes::from(env.id.clone())));
        assert_eq!(d.records[0].value, Bytes::from(line));
        assert_eq!(d.uncompressed, text.len() as u64);
        assert!(decode(&body[..body.len() - 3]).is_err());
        assert!(decode(b"not zstd").is_err());
        assert!(decode(b"").is_err());
        Ok(())
    }
}
