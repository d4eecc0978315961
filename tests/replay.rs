//! Replaying from the archive (`sift archive replay`) and from the
//! dead-letter topic (`sift dlq replay`) on the embedded backends: every
//! archived envelope of a date range comes back exactly once, keyed and with
//! the headers of a fresh ingest, `--source` filters, a corrupt part and a
//! bad line are skipped and reported (and make the binary exit non-zero);
//! dead letters go back to the input topic of the stage that gave up, with
//! their original key, value and headers, never twice, and letters without
//! an original are reported as not replayable.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use clap::Parser;
use sift::archive::replay::{self, ReplayArgs};
use sift::archive::{self, Until};
use sift::backends::log::{EmbeddedLog, Log, Message, Offset, Record};
use sift::backends::objects::{EmbeddedObjects, ObjectStore, PutMode};
use sift::config::Config;
use sift::dlq::replay::{self as letters, Filter};
use sift::dlq::{self, DeadLetter};
use sift::envelope::{self, headers, topics, Envelope, Stage, SCHEMA_VERSION};
use sift::stage::{dead_letter, Rejection};

mod embedded;
use embedded::{open_log, wait_unlocked};

const DAY_MS: i64 = 86_400_000;
/// 2024-03-01T00:00:00Z.
const MARCH_1: i64 = 1_709_251_200_000;
const SOURCES: [&str; 3] = ["debian", "news/feed ü", "gov"];
const DAYS: [&str; 3] = ["2024-02-29", "2024-03-01", "2024-03-02"];

fn envelope(source: &str, n: usize, fetched_at_ms: i64) -> Envelope {
    let url = format!("https://example.org/{source}/{n:06}");
    Envelope {
        v: SCHEMA_VERSION,
        id: envelope::document_id(source, &url),
        source: source.into(),
        url,
        fetched_at_ms,
        content_type: if n.is_multiple_of(2) {
            "text/html".into()
        } else {
            "application/pdf".into()
        },
        title: format!("doc {n:06}"),
        text: Some(format!("text of document {n} ").repeat(1 + n % 7)),
        body_uri: None,
        metadata: BTreeMap::from([("n".to_string(), serde_json::json!(n))]),
    }
}

/// The record a fresh ingest produces for an envelope.
fn ingest_record(env: &Envelope) -> Result<Record> {
    embedded::raw_record(env)
}

fn config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    // Small parts: several per (day, source), so the replay reads many.
    c.archive.flush_bytes = 16 * 1024;
    c.archive.flush_age = Duration::from_secs(3600);
    c.telemetry.metrics_addr = String::new();
    c
}

fn open_store(dir: &Path) -> Result<Arc<EmbeddedObjects>> {
    Ok(Arc::new(EmbeddedObjects::open(&dir.join("objects"))?))
}

/// Every record of a topic at or after `from[p]` in each partition `p`.
async fn read_topic(log: &dyn Log, topic: &str, from: &[u64]) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    for w in log.watermarks(topic).await? {
        let mut at = Offset::new(from.get(w.partition as usize).copied().unwrap_or(0));
        while at < w.high {
            let batch = log.fetch(topic, w.partition, &at, 1000).await?;
            let Some(last) = batch.last() else { break };
            at = last.offset.next();
            out.extend(batch);
        }
    }
    Ok(out)
}

async fn highs(log: &dyn Log, topic: &str) -> Result<Vec<u64>> {
    Ok(log
        .watermarks(topic)
        .await?
        .iter()
        .map(|w| dense(&w.high))
        .collect())
}

/// The embedded log's offsets, which always fit in 64 bits.
fn dense(offset: &Offset) -> u64 {
    offset.as_u64().expect("embedded offsets fit in 64 bits")
}

/// Where the replay group stands on each partition of sift.dlq.
async fn replayed_to(log: &dyn Log) -> Result<Vec<(u32, Option<u64>)>> {
    Ok(log
        .committed(letters::REPLAY_GROUP, topics::DLQ)
        .await?
        .into_iter()
        .map(|(p, o)| (p, o.as_ref().map(dense)))
        .collect())
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a [u8]> {
    m.header(name).map(|v| v.as_ref())
}

/// 270 envelopes of three sources over three days (and 30 on a fourth day
/// outside every replayed range), produced to `sift.raw` and archived.
async fn archived(dir: &Path) -> Result<(Arc<EmbeddedLog>, Arc<EmbeddedObjects>, Vec<Envelope>)> {
    let log = open_log(dir)?;
    let store = open_store(dir)?;
    log.create_topic(topics::RAW, 2).await?;
    let mut envs = Vec::new();
    for n in 0..300 {
        // 30 per source and day.
        let day = if n >= 270 { 3 } else { (n % 9 / 3) as i64 - 1 };
        let at = MARCH_1 + day * DAY_MS + (n as i64 * 997_000) % DAY_MS;
        envs.push(envelope(SOURCES[n % 3], n, at));
    }
    for chunk in envs.chunks(50) {
        let records = chunk
            .iter()
            .map(ingest_record)
            .collect::<Result<Vec<_>>>()?;
        log.produce(topics::RAW, records).await?;
    }
    let c = config(dir);
    let summary = archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await?;
    ensure!(summary.records == 300, "{summary:?}");
    ensure!(summary.parts > 30, "several parts per group: {summary:?}");
    Ok((log, store, envs))
}

fn in_days<'a>(envs: &'a [Envelope], days: &[&str]) -> Vec<&'a Envelope> {
    envs.iter()
        .filter(|e| days.contains(&archive::keys::utc_date(e.fetched_at_ms).as_str()))
        .collect()
}

/// Checks that `got` holds exactly one record per envelope of `want`, each
/// keyed by document id, with the archived line as its value and the
/// headers a fresh ingest gives.
fn check_exactly(got: &[Message], want: &[&Envelope]) -> Result<()> {
    let mut seen = BTreeSet::new();
    let want: BTreeMap<&str, &Envelope> = want.iter().map(|e| (e.id.as_str(), *e)).collect();
    for m in got {
        let key = std::str::from_utf8(m.key.as_deref().context("keyed")?)?;
        let env = want
            .get(key)
            .with_context(|| format!("{key} was not asked for"))?;
        ensure!(seen.insert(key.to_string()), "{key} came back twice");
        let value: Envelope = serde_json::from_slice(&m.value)?;
        ensure!(&value == *env, "{key}: the value differs");
        ensure!(header(m, headers::SOURCE) == Some(env.source.as_bytes()));
        ensure!(header(m, headers::CONTENT_TYPE) == Some(env.content_type.as_bytes()));
        ensure!(header(m, headers::SCHEMA) == Some(&b"1"[..]));
        ensure!(header(m, headers::URL) == Some(env.url.as_bytes()));
        ensure!(header(m, headers::REPLAY) == Some(&b"archive"[..]));
        ensure!(m.headers.len() == 5, "{:?}", m.headers);
    }
    ensure!(
        seen.len() == want.len(),
        "{} of {} came back",
        seen.len(),
        want.len()
    );
    Ok(())
}

fn args(from: &str, to: &str, topic: &str) -> ReplayArgs {
    ReplayArgs {
        topic: topic.into(),
        ..ReplayArgs::new(from, to)
    }
}

/// A date range, then one source (one that needs escaping in keys), then two
/// sources of one day, each into a fresh topic: every envelope asked for
/// exactly once. A dry run counts the same and produces nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_replay_brings_back_every_envelope_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (log, store, envs) = archived(dir.path()).await?;
    let c = config(dir.path());
    for t in ["two-days", "one-source", "two-sources", "dry"] {
        log.create_topic(t, 3).await?;
    }

    let s = replay::replay(
        log.clone(),
        store.clone(),
        &c,
        &args(DAYS[0], DAYS[1], "two-days"),
    )
    .await?;
    let want = in_days(&envs, &DAYS[..2]);
    ensure!(want.len() == 180);
    let listed = store.list("raw/dt=2024-02-29/").await?.len()
        + store.list("raw/dt=2024-03-01/").await?.len();
    ensure!(
        s.records == 180 && s.parts == listed as u64 && s.parts_read == s.parts,
        "{s:?}"
    );
    ensure!(s.skipped() == 0 && s.errors.is_empty(), "{s:?}");
    ensure!(s.bytes > 0 && s.bytes_uncompressed > s.bytes, "{s:?}");
    check_exactly(&read_topic(log.as_ref(), "two-days", &[]).await?, &want)?;

    let mut one = args(DAYS[0], DAYS[2], "one-source");
    one.sources = vec!["news/feed ü".into()];
    let s = replay::replay(log.clone(), store.clone(), &c, &one).await?;
    let want: Vec<&Envelope> = in_days(&envs, &DAYS)
        .into_iter()
        .filter(|e| e.source == "news/feed ü")
        .collect();
    ensure!(want.len() == 90 && s.records == 90, "{s:?}");
    check_exactly(&read_topic(log.as_ref(), "one-source", &[]).await?, &want)?;

    let mut two = args(DAYS[2], DAYS[2], "two-sources");
    two.to = None; // defaults to --from
    two.sources = vec!["gov".into(), "debian".into(), "gov".into()];
    let s = replay::replay(log.clone(), store.clone(), &c, &two).await?;
    let want: Vec<&Envelope> = in_days(&envs, &DAYS[2..])
        .into_iter()
        .filter(|e| e.source != "news/feed ü")
        .collect();
    ensure!(s.records == want.len() as u64 && s.to == DAYS[2], "{s:?}");
    check_exactly(&read_topic(log.as_ref(), "two-sources", &[]).await?, &want)?;

    let mut dry = args(DAYS[0], DAYS[2], "dry");
    dry.dry_run = true;
    let s = replay::replay(log.clone(), store.clone(), &c, &dry).await?;
    ensure!(s.records == 270 && s.dry_run, "{s:?}");
    ensure!(highs(log.as_ref(), "dry").await? == vec![0, 0, 0]);

    // The default topic is sift.raw; the same keys land in the same
    // partitions as the first time.
    let before = highs(log.as_ref(), topics::RAW).await?;
    let s = replay::replay(
        log.clone(),
        store.clone(),
        &c,
        &ReplayArgs::new(DAYS[1], DAYS[1]),
    )
    .await?;
    ensure!(s.topic == topics::RAW && s.records == 90, "{s:?}");
    let again = read_topic(log.as_ref(), topics::RAW, &before).await?;
    check_exactly(&again, &in_days(&envs, &DAYS[1..2]))?;
    let first = read_topic(log.as_ref(), topics::RAW, &[]).await?;
    let partition_of: BTreeMap<_, _> = first
        .iter()
        .filter(|m| m.offset < before[m.partition as usize])
        .map(|m| (m.key.clone(), m.partition))
        .collect();
    ensure!(again
        .iter()
        .all(|m| partition_of.get(&m.key) == Some(&m.partition)));
    // The archive stage does not archive what it replayed a second time.
    ensure!(again
        .iter()
        .all(|m| header(m, headers::REPLAY) == Some(&b"archive"[..])));
    let parts_before = store.list("raw/").await?.len();
    let s = archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await?;
    ensure!(s.records == 0 && s.replays_skipped == 90, "{s:?}");
    ensure!(store.list("raw/").await?.len() == parts_before);

    // A range the wrong way round, a topic that does not exist, a bad date.
    for (from, to, topic, says) in [
        (DAYS[1], DAYS[0], "dry", "before --from"),
        (DAYS[0], DAYS[0], "nope", "sift topics create nope"),
        ("2024-02-30", DAYS[0], "dry", "2024-02-30"),
    ] {
        let err = replay::replay(log.clone(), store.clone(), &c, &args(from, to, topic))
            .await
            .err()
            .with_context(|| format!("{from}..{to} into {topic} is refused"))?;
        ensure!(err.to_string().contains(says), "{err}");
    }
    Ok(())
}

/// One part truncated, one with a line that is not an envelope: the first is
/// skipped whole, the line alone, both reported with the part's key; every
/// other envelope comes back. Through the binary the same replay prints the
/// report and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_parts_and_lines_are_skipped_and_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (log, store, envs) = archived(dir.path()).await?;
    let c = config(dir.path());
    let parts = store.list("raw/dt=2024-03-01/").await?;
    ensure!(parts.len() >= 4);
    let ids_of = |text: &[u8]| -> Result<Vec<String>> {
        std::str::from_utf8(text)?
            .lines()
            .map(|l| Ok(serde_json::from_str::<Envelope>(l)?.id))
            .collect()
    };

    // A truncated part: its zstd frame is incomplete.
    let broken = parts[1].key.clone();
    let (_, body) = store.get(&broken).await?;
    let lost = ids_of(&zstd::decode_all(&body[..])?)?;
    store
        .put(&broken, body.slice(..body.len() / 2), PutMode::Overwrite)
        .await?;
    // A part whose second line is not an envelope.
    let bad_line = parts[3].key.clone();
    let (_, body) = store.get(&bad_line).await?;
    let text = String::from_utf8(zstd::decode_all(&body[..])?)?;
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(1, r#"{"hello":"world"}"#);
    let patched = format!("{}\n", lines.join("\n"));
    store
        .put(
            &bad_line,
            Bytes::from(zstd::encode_all(patched.as_bytes(), 3)?),
            PutMode::Overwrite,
        )
        .await?;

    log.create_topic("out", 2).await?;
    let s = replay::replay(
        log.clone(),
        store.clone(),
        &c,
        &args(DAYS[0], DAYS[2], "out"),
    )
    .await?;
    ensure!(
        s.skipped_parts == 1 && s.skipped_lines == 1 && s.skipped() == 2,
        "{s:?}"
    );
    ensure!(s.parts_read + 1 == s.parts, "{s:?}");
    ensure!(s.errors.len() == 2, "{:?}", s.errors);
    ensure!(
        s.errors
            .iter()
            .any(|e| e.part == broken && e.line.is_none() && e.message.contains("zstd")),
        "{:?}",
        s.errors
    );
    ensure!(
        s.errors
            .iter()
            .any(|e| e.part == bad_line && e.line == Some(2) && e.message.contains("bad_json")),
        "{:?}",
        s.errors
    );
    let want: Vec<&Envelope> = in_days(&envs, &DAYS)
        .into_iter()
        .filter(|e| !lost.contains(&e.id))
        .collect();
    ensure!(s.records == want.len() as u64 && want.len() == 270 - lost.len());
    check_exactly(&read_topic(log.as_ref(), "out", &[]).await?, &want)?;

    // The binary: summary on stdout, the error on stderr, exit status 1.
    log.create_topic("out2", 2).await?;
    drop(log);
    drop(store);
    wait_unlocked(dir.path())?;
    let out = Command::new(env!("CARGO_BIN_EXE_sift"))
        .args([
            "archive", "replay", "--from", DAYS[0], "--to", DAYS[2], "--topic", "out2",
        ])
        .env("SIFT_DATA_DIR", dir.path())
        .env_remove("SIFT_CONFIG")
        .env("RUST_LOG", "error")
        .current_dir(dir.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "{stdout}\n{stderr}");
    ensure!(stdout.contains(&format!("skipped {broken}:")), "{stdout}");
    ensure!(
        stdout.contains(&format!("skipped {bad_line} line 2:")),
        "{stdout}"
    );
    ensure!(
        stderr.contains("skipped 1 part(s) and 1 line(s)"),
        "{stderr}"
    );
    let log = open_log(dir.path())?;
    check_exactly(&read_topic(log.as_ref(), "out2", &[]).await?, &want)?;
    Ok(())
}

/// A record as it sat in its topic, to compare with what a replay produces.
/// A record as a replay compares it: key, value and headers, without the
/// replay marker (checked apart).
fn as_record(m: &Message) -> (Option<Bytes>, Bytes, BTreeSet<(String, Bytes)>) {
    (
        m.key.clone(),
        m.value.clone(),
        m.headers
            .iter()
            .filter(|(k, _)| k != headers::REPLAY)
            .cloned()
            .collect(),
    )
}

async fn produce_and_read(
    log: &dyn Log,
    topic: &str,
    records: Vec<Record>,
) -> Result<Vec<Message>> {
    let before = highs(log, topic).await?;
    log.produce(topic, records).await?;
    read_topic(log, topic, &before).await
}

fn filter(stage: Option<&str>, reason: Option<&str>) -> Filter {
    Filter {
        stage: stage.map(str::to_string),
        reason: reason.map(str::to_string),
    }
}

fn dlq_args(f: Filter, from_offset: Option<u64>) -> letters::ReplayArgs {
    letters::ReplayArgs {
        filter: f,
        from_offset: from_offset.map(Offset::new),
        ..Default::default()
    }
}

/// Dead letters of every stage, sent the way the stages send them: listed by
/// stage and reason; replayed by stage and reason into the input topic of
/// the stage that gave up with the original key, value and headers; a second
/// replay produces nothing; letters without an original are not replayable;
/// an original too large to carry comes back from its claim check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_back_where_they_came_from_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let c = config(dir.path());
    for t in [topics::RAW, topics::CLEAN, topics::PROFILES] {
        log.create_topic(t, 2).await?;
    }
    log.create_topic(topics::DLQ, 1).await?;

    // Originals: raw records clean and archive gave up on, clean records
    // infer gave up on, profiles match gave up on.
    let raw_envs: Vec<Envelope> = (0..6).map(|n| envelope("debian", n, MARCH_1)).collect();
    let raw = produce_and_read(
        log.as_ref(),
        topics::RAW,
        raw_envs.iter().map(ingest_record).collect::<Result<_>>()?,
    )
    .await?;
    let clean = produce_and_read(
        log.as_ref(),
        topics::CLEAN,
        (0..3)
            .map(|n| {
                Record::new(format!("c{n}"), format!("{{\"v\":1,\"id\":\"c{n}\"}}"))
                    .header(headers::SOURCE, "gov")
                    .header(headers::SCHEMA, "1")
            })
            .collect(),
    )
    .await?;
    let profiles = produce_and_read(
        log.as_ref(),
        topics::PROFILES,
        (0..2)
            .map(|n| {
                Record::new(
                    format!("twitter:h{n}"),
                    format!("{{\"network\":\"twitter\",\"handle\":\"h{n}\"}}"),
                )
            })
            .collect(),
    )
    .await?;
    ensure!(raw.len() == 6 && clean.len() == 3 && profiles.len() == 2);

    let clean_letter = |m: &Message| {
        DeadLetter::of_message(
            Stage::Clean,
            "bad_json",
            format!(
                "not a JSON envelope ({} {}@{})",
                m.topic, m.partition, m.offset
            ),
            m,
        )
    };
    let ingest_letter = |n: usize| DeadLetter {
        stage: Stage::Ingest,
        reason: "fetch",
        detail: format!("HTTP 503 after 3 attempts ({n})"),
        source: Some("gov".into()),
        url: Some(format!("https://gov.example/{n}")),
        original: None,
    };
    // Near the log's 1 MB: too large to carry beside a letter's headers.
    let huge = |n: u8| Message {
        topic: topics::RAW.into(),
        partition: 0,
        offset: Offset::new(99),
        timestamp_ms: MARCH_1,
        key: Some(Bytes::from(format!("huge{n}"))),
        value: Bytes::from(vec![b'x' + n; 1_040_000]),
        headers: vec![(headers::SOURCE.into(), Bytes::from("debian"))],
    };
    let store = open_store(dir.path())?;
    let objects = store.as_ref();
    // Interleaved, as they would arrive.
    dlq::send(
        log.as_ref(),
        objects,
        &[
            clean_letter(&raw[0]),
            clean_letter(&raw[1]),
            ingest_letter(0),
        ],
    )
    .await?;
    dlq::send(
        log.as_ref(),
        objects,
        &[
            dead_letter(
                Stage::Infer,
                &clean[0],
                Rejection::new("empty_text", "no text".into()),
            ),
            dead_letter(
                Stage::Infer,
                &clean[1],
                Rejection::new("empty_text", "no text".into()),
            ),
            DeadLetter::of_message(Stage::Archive, "bad_source", "tag too long".into(), &raw[2]),
            DeadLetter::of_message(
                Stage::Match,
                "bad_profile",
                "no handle".into(),
                &profiles[0],
            ),
        ],
    )
    .await?;
    // A letter as `sift run` writes it: the original with a reason, no stage.
    log.produce(
        topics::DLQ,
        vec![Record {
            key: raw[5].key.clone(),
            value: raw[5].value.clone(),
            headers: vec![(
                headers::REASON.into(),
                Bytes::from("bad_json: not an envelope"),
            )],
        }],
    )
    .await?;
    dlq::send(
        log.as_ref(),
        objects,
        &[
            clean_letter(&raw[3]),
            DeadLetter::of_message(Stage::Clean, "bad_json", "too big".into(), &huge(0)),
            ingest_letter(1),
            DeadLetter::of_message(
                Stage::Match,
                "bad_profile",
                "no handle".into(),
                &profiles[1],
            ),
            clean_letter(&raw[4]),
        ],
    )
    .await?;
    let letters = 13u64;
    ensure!(highs(log.as_ref(), topics::DLQ).await? == vec![letters]);

    // The listing: counts by stage and reason, the latest few, no replay yet.
    let l = letters::list(log.as_ref(), &Filter::default(), 4).await?;
    ensure!(l.total == letters && l.matching == letters, "{l:?}");
    let counts: BTreeMap<(String, String), (u64, u64)> = l
        .counts
        .iter()
        .map(|c| {
            (
                (c.stage.clone(), c.reason.clone()),
                (c.letters, c.replayable),
            )
        })
        .collect();
    let want: BTreeMap<(String, String), (u64, u64)> = [
        ("-", "bad_json", 1, 0),
        ("archive", "bad_source", 1, 1),
        ("clean", "bad_json", 5, 5),
        ("infer", "empty_text", 2, 2),
        ("ingest", "fetch", 2, 0),
        ("match", "bad_profile", 2, 2),
    ]
    .into_iter()
    .map(|(s, r, n, ok)| ((s.to_string(), r.to_string()), (n, ok)))
    .collect();
    ensure!(counts == want, "{counts:#?}");
    ensure!(
        l.latest
            .iter()
            .map(|x| dense(&x.offset))
            .collect::<Vec<_>>()
            == vec![9, 10, 11, 12],
        "{:?}",
        l.latest
    );
    let ingest = &l.latest[1];
    ensure!(ingest.stage.as_deref() == Some("ingest") && ingest.replay_to.is_none());
    ensure!(
        ingest
            .not_replayable
            .as_deref()
            .is_some_and(|w| w.contains("no original")),
        "{ingest:?}"
    );
    ensure!(ingest.url.as_deref() == Some("https://gov.example/1"));
    ensure!(ingest.source.as_deref() == Some("gov"));
    ensure!(ingest.detail == "HTTP 503 after 3 attempts (1)");
    ensure!(l.latest[3].replay_to == Some(topics::RAW));
    ensure!(l.replay.len() == 1 && l.replay[0].replayed_to.is_none());
    ensure!(l.replay[0].pending == l.total, "{:?}", l.replay);
    let only = letters::list(log.as_ref(), &filter(Some("ingest"), None), 10).await?;
    ensure!(only.matching == 2 && only.latest.len() == 2 && only.counts.len() == 1);

    // A dry run counts and changes nothing.
    let mut dry = dlq_args(Filter::default(), None);
    dry.dry_run = true;
    let before = [
        highs(log.as_ref(), topics::RAW).await?,
        highs(log.as_ref(), topics::CLEAN).await?,
        highs(log.as_ref(), topics::PROFILES).await?,
    ];
    let s = letters::replay(log.as_ref(), &c, &dry).await?;
    ensure!(
        s.replayed
            == BTreeMap::from([
                (topics::RAW.to_string(), 6),
                (topics::CLEAN.to_string(), 2),
                (topics::PROFILES.to_string(), 2),
            ]),
        "{s:?}"
    );
    ensure!(
        s.not_replayable
            == BTreeMap::from([
                ("-/bad_json".to_string(), 1),
                ("ingest/fetch".to_string(), 2),
            ]),
        "{s:?}"
    );
    ensure!(s.read == letters && s.passed_over == 0);
    ensure!(highs(log.as_ref(), topics::RAW).await? == before[0]);
    ensure!(replayed_to(log.as_ref()).await? == vec![(0, None)]);

    // Clean's bad_json letters: their originals back to sift.raw as they were.
    let s = letters::replay(
        log.as_ref(),
        &c,
        &dlq_args(filter(Some("clean"), Some("bad_json")), None),
    )
    .await?;
    ensure!(
        s.replayed == BTreeMap::from([(topics::RAW.to_string(), 5)]),
        "{s:?}"
    );
    ensure!(s.not_replayable.is_empty(), "{s:?}");
    ensure!(
        s.passed_over == 8 && s.spans[0].first_passed_over == Some(Offset::new(2)),
        "{s:?}"
    );
    ensure!(s.spans[0].from == 0 && s.spans[0].to == letters);
    let back = read_topic(log.as_ref(), topics::RAW, &before[0]).await?;
    let got: BTreeSet<_> = back.iter().map(as_record).collect();
    let want: BTreeSet<_> = [&raw[0], &raw[1], &raw[3], &raw[4], &huge(0)]
        .into_iter()
        .map(as_record)
        .collect();
    ensure!(got == want, "{back:#?}");
    ensure!(back
        .iter()
        .all(|m| m.header(headers::STAGE).is_none() && m.header(headers::REASON).is_none()));
    ensure!(replayed_to(log.as_ref()).await? == vec![(0, Some(letters))]);

    // Run twice: nothing the second time.
    let s = letters::replay(
        log.as_ref(),
        &c,
        &dlq_args(filter(Some("clean"), Some("bad_json")), None),
    )
    .await?;
    ensure!(
        s.read == 0 && s.replayed.is_empty() && s.not_replayable.is_empty(),
        "{s:?}"
    );
    let s = letters::replay(log.as_ref(), &c, &dlq_args(Filter::default(), None)).await?;
    ensure!(s.read == 0 && s.replayed.is_empty(), "{s:?}");
    ensure!(
        read_topic(log.as_ref(), topics::RAW, &before[0])
            .await?
            .len()
            == 5
    );

    // A new letter: only it is replayed.
    dlq::send(
        log.as_ref(),
        objects,
        &[dead_letter(
            Stage::Infer,
            &clean[2],
            Rejection::new("internal", "tokenizing failed".into()),
        )],
    )
    .await?;
    let s = letters::replay(log.as_ref(), &c, &dlq_args(Filter::default(), None)).await?;
    ensure!(
        s.read == 1 && s.replayed == BTreeMap::from([(topics::CLEAN.to_string(), 1)]),
        "{s:?}"
    );
    let back = read_topic(log.as_ref(), topics::CLEAN, &before[1]).await?;
    ensure!(
        back.len() == 1 && as_record(&back[0]) == as_record(&clean[2]),
        "{back:?}"
    );
    ensure!(
        header(&back[0], headers::REPLAY) == Some(&b"dlq:infer"[..]),
        "{back:?}"
    );

    // Passed-over letters are reached again from an offset: infer's two
    // earlier letters to sift.clean, match's to sift.profiles.
    let from = Some(2);
    let s = letters::replay(
        log.as_ref(),
        &c,
        &dlq_args(filter(Some("infer"), Some("empty_text")), from),
    )
    .await?;
    ensure!(
        s.replayed == BTreeMap::from([(topics::CLEAN.to_string(), 2)]),
        "{s:?}"
    );
    let back = read_topic(log.as_ref(), topics::CLEAN, &before[1]).await?;
    let got: BTreeSet<_> = back.iter().map(as_record).collect();
    let want: BTreeSet<_> = clean.iter().map(as_record).collect();
    ensure!(back.len() == 3 && got == want, "{back:#?}");
    let s = letters::replay(
        log.as_ref(),
        &c,
        &dlq_args(filter(Some("match"), None), from),
    )
    .await?;
    ensure!(
        s.replayed == BTreeMap::from([(topics::PROFILES.to_string(), 2)]),
        "{s:?}"
    );
    let back = read_topic(log.as_ref(), topics::PROFILES, &before[2]).await?;
    let got: BTreeSet<_> = back.iter().map(as_record).collect();
    let want: BTreeSet<_> = profiles.iter().map(as_record).collect();
    ensure!(got == want, "{back:#?}");
    let s = letters::replay(
        log.as_ref(),
        &c,
        &dlq_args(filter(Some("ingest"), None), Some(0)),
    )
    .await?;
    ensure!(
        s.replayed.is_empty()
            && s.not_replayable == BTreeMap::from([("ingest/fetch".to_string(), 2)]),
        "{s:?}"
    );
    ensure!(s.not_replayable_letters.iter().all(|u| u
        .url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://gov.example/"))));
    ensure!(replayed_to(log.as_ref()).await? == vec![(0, Some(letters + 1))]);

    // The listing shows where replay stands.
    let l = letters::list(log.as_ref(), &Filter::default(), 0).await?;
    ensure!(
        l.latest.is_empty()
            && l.replay[0].replayed_to == Some(Offset::new(letters + 1))
            && l.replay[0].pending == 0,
        "{l:?}"
    );

    // The command's entry, as `sift dlq` calls it (text output).
    drop(log);
    wait_unlocked(dir.path())?;
    let parse = |args: &[&str]| -> Result<letters::DlqCommand> {
        Ok(DlqCli::try_parse_from([&["sift-dlq"], args].concat())?.command)
    };
    letters::main(&c, parse(&["list", "-n", "3", "--stage", "ingest"])?).await?;
    letters::main(&c, parse(&["list", "-n", "4"])?).await?;
    letters::main(&c, parse(&["replay", "--from-offset", "0", "--dry-run"])?).await?;
    let log = open_log(dir.path())?;
    ensure!(replayed_to(log.as_ref()).await? == vec![(0, Some(letters + 1))]);

    // A claim-checked original: the letter names where it is; one whose
    // object is gone is not replayable, and says why.
    let kept = letters::list(log.as_ref(), &filter(Some("clean"), None), 20).await?;
    let at = kept
        .latest
        .iter()
        .find_map(|l| l.original_at.clone())
        .context("no letter names its original's claim check")?;
    let key = envelope::claim_key(&at).context("not a claim check")?;
    ensure!(key.starts_with(dlq::ORIGINAL_PREFIX), "{at}");
    ensure!(store.get(key).await?.1 == huge(0).value);
    dlq::send(
        log.as_ref(),
        objects,
        &[DeadLetter::of_message(
            Stage::Clean,
            "bad_json",
            "too big".into(),
            &huge(1),
        )],
    )
    .await?;
    let gone = letters::list(log.as_ref(), &Filter::default(), 1)
        .await?
        .latest;
    let gone = gone[0].original_at.as_deref().context("no claim check")?;
    ensure!(gone != at, "two originals under one key");
    store
        .delete(envelope::claim_key(gone).context("not a claim check")?)
        .await?;
    let s = letters::replay(log.as_ref(), &c, &dlq_args(Filter::default(), None)).await?;
    ensure!(
        s.replayed.is_empty()
            && s.not_replayable == BTreeMap::from([("clean/bad_json".to_string(), 1)])
            && s.not_replayable_letters[0]
                .why
                .contains("no longer in the object store"),
        "{s:?}"
    );
    Ok(())
}

/// `sift dlq` as main.rs mounts it.
#[derive(clap::Parser)]
struct DlqCli {
    #[command(subcommand)]
    command: letters::DlqCommand,
}

/// The flags parse as documented, and clap finds nothing wrong with them.
#[test]
fn dlq_flags() -> Result<()> {
    use clap::CommandFactory;
    DlqCli::command().debug_assert();
    let cli = DlqCli::try_parse_from([
        "sift-dlq",
        "replay",
        "--stage",
        "clean",
        "--reason",
        "bad_json",
        "--from-offset",
        "7",
        "--dry-run",
        "--json",
    ])?;
    let letters::DlqCommand::Replay(r) = cli.command else {
        anyhow::bail!("replay parses as replay");
    };
    ensure!(
        r.filter.stage.as_deref() == Some("clean")
            && r.filter.reason.as_deref() == Some("bad_json")
    );
    ensure!(r.from_offset == Some(Offset::new(7)) && r.dry_run && r.json);
    let cli = DlqCli::try_parse_from(["sift-dlq", "list", "-n", "3"])?;
    let letters::DlqCommand::List(l) = cli.command else {
        anyhow::bail!("list parses as list");
    };
    ensure!(l.latest == 3 && l.filter.stage.is_none() && !l.json);
    let help = DlqCli::command()
        .find_subcommand_mut("replay")
        .context("replay")?
        .render_long_help()
        .to_string();
    ensure!(
        help.contains("sift-dlq-replay") && help.contains("committed"),
        "{help}"
    );
    Ok(())
}

/// With no dead-letter topic at all, listing and replaying say so and do nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_dead_letter_topic_is_nothing_to_do() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let c = config(dir.path());
    let l = letters::list(log.as_ref(), &Filter::default(), 10).await?;
    ensure!(l.total == 0 && l.replay.is_empty());
    let s = letters::replay(log.as_ref(), &c, &letters::ReplayArgs::default()).await?;
    ensure!(s.read == 0 && s.spans.is_empty());
    ensure!(log.list_topics().await?.is_empty());
    Ok(())
}
