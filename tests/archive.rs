//! `sift archive` on the embedded backends: the exact part layout, flushing by
//! size and by age, dead letters, refusing encryption the store cannot do, a
//! deterministic check of the crash argument (a flush that dies after some
//! uploads, rerun with other flush boundaries), rival members flushing the
//! same partitions at once with puts failing at random, and the real
//! binary killed with SIGKILL at random moments, then stopped with SIGTERM.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use sift::archive::{self, Until};
use sift::backends::log::{Log, Offset, Position, Record};
use sift::backends::objects::{
    EmbeddedObjects, ObjectError, ObjectMeta, ObjectReader, ObjectStore, PutMode,
};
use sift::config::{Config, Encryption};
use sift::envelope::{self, headers, topics, Envelope, SCHEMA_VERSION};

mod embedded;
use embedded::{open_log, wait_unlocked};

const DAY_MS: i64 = 86_400_000;
/// 2024-03-01T00:00:00Z.
const MARCH_1: i64 = 1_709_251_200_000;

fn envelope(source: &str, n: usize, fetched_at_ms: i64, text_len: usize) -> Envelope {
    let url = format!("https://example.org/{n:06}");
    let text: String = (0..text_len)
        .map(|i| char::from(b'a' + ((n * 7 + i * 13) % 26) as u8))
        .collect();
    Envelope {
        v: SCHEMA_VERSION,
        id: envelope::document_id(source, &url),
        source: source.into(),
        url,
        fetched_at_ms,
        content_type: "text/html".into(),
        title: format!("doc {n:06}"),
        text: Some(text),
        body_uri: None,
        metadata: BTreeMap::from([("n".to_string(), serde_json::json!(format!("{n:06}")))]),
    }
}

fn record_of(env: &Envelope) -> Result<Record> {
    Ok(Record::new(env.id.clone(), serde_json::to_vec(env)?)
        .header(headers::SOURCE, env.source.clone())
        .header(headers::SCHEMA, SCHEMA_VERSION.to_string()))
}

fn config(dir: &Path, flush_bytes: u64, flush_age: Duration) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.archive.flush_bytes = flush_bytes;
    c.archive.flush_age = flush_age;
    c.telemetry.metrics_addr = String::new();
    c
}

fn open_store(dir: &Path) -> Result<Arc<EmbeddedObjects>> {
    Ok(Arc::new(EmbeddedObjects::open(&dir.join("objects"))?))
}

/// A part key taken apart: (dt, source segment, partition, first offset).
fn parse_key(key: &str) -> Result<(String, String, u32, u64)> {
    let rest = key.strip_prefix("raw/dt=").context("prefix")?;
    let (dt, rest) = rest.split_once("/source=").context("source")?;
    let (source, file) = rest.split_once("/part-").context("part")?;
    let file = file.strip_suffix(".jsonl.zst").context("suffix")?;
    let (p, offset) = file.split_once('-').context("offset")?;
    ensure!(
        offset.len() == 20,
        "offset is zero-padded to 20 digits: {key}"
    );
    Ok((dt.into(), source.into(), p.parse()?, offset.parse()?))
}

/// Every part of the archive with its decompressed lines.
async fn read_archive(store: &dyn ObjectStore) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for m in store.list("raw/").await? {
        let (_, body) = store.get(&m.key).await?;
        let text = String::from_utf8(zstd::decode_all(&body[..])?)?;
        ensure!(
            text.ends_with('\n'),
            "every line ends with a newline: {}",
            m.key
        );
        out.insert(m.key, text.lines().map(str::to_string).collect());
    }
    Ok(out)
}

async fn committed(log: &dyn Log, group: &str) -> Result<Vec<Option<u64>>> {
    Ok(log
        .committed(group, topics::RAW)
        .await?
        .into_iter()
        .map(|(_, c)| c.as_ref().map(dense))
        .collect())
}

async fn highs(log: &dyn Log) -> Result<Vec<u64>> {
    Ok(log
        .watermarks(topics::RAW)
        .await?
        .iter()
        .map(|w| dense(&w.high))
        .collect())
}

/// The embedded log's offsets, which always fit in 64 bits.
fn dense(offset: &Offset) -> u64 {
    offset.as_u64().expect("embedded offsets fit in 64 bits")
}

/// The parts a run must have written when it flushed partition `p` at the
/// given batch boundaries: (key, ids in order) per (batch, dt, source).
fn expected_parts(
    produced: &[(Envelope, Position)],
    p: u32,
    boundaries: &[u64],
    key_of: impl Fn(&Envelope, u32, &Offset) -> String,
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in boundaries.windows(2) {
        let mut firsts: BTreeMap<(String, String), String> = BTreeMap::new();
        for (env, pos) in produced {
            if pos.partition != p || pos.offset < w[0] || pos.offset >= w[1] {
                continue;
            }
            let group = (
                archive::keys::utc_date(env.fetched_at_ms),
                env.source.clone(),
            );
            let key = firsts
                .entry(group)
                .or_insert_with(|| key_of(env, p, &pos.offset))
                .clone();
            out.entry(key).or_default().push(env.id.clone());
        }
    }
    out
}

fn standard_key(env: &Envelope, p: u32, offset: &Offset) -> String {
    sift::archive::keys::Layout::new("raw")
        .expect("valid prefix")
        .part_key(
            &archive::keys::GroupKey::of(env.fetched_at_ms, &env.source),
            p,
            offset,
        )
}

fn ids_by_key(archive: &BTreeMap<String, Vec<String>>) -> Result<BTreeMap<String, Vec<String>>> {
    archive
        .iter()
        .map(|(k, lines)| {
            let ids = lines
                .iter()
                .map(|l| Ok(serde_json::from_str::<Envelope>(l)?.id))
                .collect::<Result<Vec<_>>>()?;
            Ok((k.clone(), ids))
        })
        .collect()
}

/// Records of several sources (one needing escaping, one empty) and dates,
/// with bad records among them, archived once: the exact key list, the exact
/// lines of each part, the dead letters with their reasons, the commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_by_date_and_source() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let store = open_store(dir.path())?;
    log.create_topic(topics::RAW, 2).await?;
    let sources = ["debian", "news/feed ü", ""];
    let mut envs = Vec::new();
    for n in 0..90 {
        let at = MARCH_1 + (n as i64 / 3 % 3 - 1) * DAY_MS + (n as i64 * 997_000) % DAY_MS;
        envs.push(envelope(sources[n % 3], n, at, 50 + n));
    }
    let mut produced = Vec::new();
    for chunk in envs.chunks(30) {
        let records = chunk.iter().map(record_of).collect::<Result<Vec<_>>>()?;
        let positions = log.produce(topics::RAW, records).await?;
        produced.extend(chunk.iter().cloned().zip(positions));
    }
    let mut v2 = envelope("debian", 999, MARCH_1, 10);
    v2.v = 2;
    let bad = vec![
        Record::new("bad-1", "{not json").header(headers::SOURCE, "debian"),
        Record::new("bad-2", r#"{"hello":"world"}"#),
        Record::new("bad-3", serde_json::to_vec(&v2)?),
    ];
    let bad_positions = log.produce(topics::RAW, bad.clone()).await?;
    // More good records after the bad ones, in the same partitions.
    let late: Vec<Envelope> = (90..96)
        .map(|n| envelope("debian", n, MARCH_1, 20))
        .collect();
    let positions = log
        .produce(
            topics::RAW,
            late.iter().map(record_of).collect::<Result<_>>()?,
        )
        .await?;
    produced.extend(late.into_iter().zip(positions));

    let c = config(dir.path(), u64::MAX, Duration::from_secs(3600));
    let summary = archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await?;

    // Exact keys and contents: one batch per partition, one part per (dt, source).
    let highs = highs(log.as_ref()).await?;
    let mut want = BTreeMap::new();
    for p in 0..2u32 {
        want.extend(expected_parts(
            &produced,
            p,
            &[0, highs[p as usize]],
            standard_key,
        ));
    }
    let got = read_archive(store.as_ref()).await?;
    let got_ids = ids_by_key(&got)?;
    ensure!(
        got_ids.keys().collect::<Vec<_>>() == want.keys().collect::<Vec<_>>(),
        "keys:\n{:#?}\nwant:\n{:#?}",
        got_ids.keys(),
        want.keys()
    );
    ensure!(got_ids == want, "records per part differ");
    // Escaped and empty source tags, as documented.
    let keys: Vec<&String> = got.keys().collect();
    for seg in [
        "/source=debian/",
        "/source=news%2Ffeed%20%C3%BC/",
        "/source=__HIVE_DEFAULT_PARTITION__/",
    ] {
        ensure!(keys.iter().any(|k| k.contains(seg)), "no key with {seg}");
    }
    for day in ["2024-02-29", "2024-03-01", "2024-03-02"] {
        ensure!(keys.iter().any(|k| k.contains(&format!("/dt={day}/"))));
    }
    // Every line is the produced envelope, byte for byte.
    let by_id: BTreeMap<&str, &Envelope> =
        produced.iter().map(|(e, _)| (e.id.as_str(), e)).collect();
    for (key, lines) in &got {
        let (dt, _, _, first) = parse_key(key)?;
        for (i, line) in lines.iter().enumerate() {
            let env: Envelope = serde_json::from_str(line)?;
            let want = by_id.get(env.id.as_str()).context("unknown id")?;
            ensure!(&env == *want);
            ensure!(line.as_bytes() == serde_json::to_vec(want)?.as_slice());
            ensure!(archive::keys::utc_date(env.fetched_at_ms) == dt);
            if i == 0 {
                let pos = produced
                    .iter()
                    .find(|(e, _)| e.id == env.id)
                    .context("pos")?;
                ensure!(pos.1.offset == first, "{key} starts at its first record");
            }
        }
    }
    let records: usize = got.values().map(Vec::len).sum();
    ensure!(records == 96 && summary.records == 96, "{summary:?}");
    ensure!(summary.parts == got.len() as u64, "{summary:?}");
    ensure!(summary.bytes_in > summary.bytes_out && summary.bytes_out > 0);
    ensure!(
        summary.dead_letters
            == BTreeMap::from([
                ("bad_json".to_string(), 2),
                ("schema_version".to_string(), 1)
            ]),
        "{summary:?}"
    );

    // Dead letters: the original records, with stage and reason.
    let dlq = log.fetch(topics::DLQ, 0, &Offset::new(0), 100).await?;
    ensure!(dlq.len() == 3, "{dlq:?}");
    for (want, reason) in bad.iter().zip([
        "bad_json: not an envelope",
        "bad_json: not an envelope",
        "schema_version: envelope version 2 is not 1",
    ]) {
        let m = dlq
            .iter()
            .find(|m| m.key == want.key)
            .context("a dead letter per bad record")?;
        ensure!(m.value == want.value);
        ensure!(m.header(headers::STAGE).map(|v| v.as_ref()) == Some(&b"archive"[..]));
        let got =
            String::from_utf8_lossy(m.header(headers::REASON).map_or(&b""[..], |v| v)).into_owned();
        ensure!(got.starts_with(reason), "{got}");
    }
    // Everything is committed, the bad records' offsets included.
    ensure!(bad_positions
        .iter()
        .all(|b| b.offset < highs[b.partition as usize]));
    ensure!(
        committed(log.as_ref(), &c.archive.group).await?
            == highs.iter().map(|h| Some(*h)).collect::<Vec<_>>()
    );

    // Nothing new: a second pass writes nothing.
    let again = archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await?;
    ensure!(again.records == 0 && again.parts == 0, "{again:?}");
    ensure!(read_archive(store.as_ref()).await? == got);
    Ok(())
}

/// Records of equal size in one group: a flush every `n` records, where `n`
/// lines first reach `flush_bytes`, and a last partial part at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_by_size() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let store = open_store(dir.path())?;
    log.create_topic(topics::RAW, 1).await?;
    let envs: Vec<Envelope> = (0..100).map(|n| envelope("s", n, MARCH_1, 300)).collect();
    let line = serde_json::to_vec(&envs[0])?.len() as u64 + 1;
    ensure!(envs
        .iter()
        .all(|e| serde_json::to_vec(e).map_or(0, |v| v.len() as u64 + 1) == line));
    let positions = log
        .produce(
            topics::RAW,
            envs.iter().map(record_of).collect::<Result<_>>()?,
        )
        .await?;
    let produced: Vec<(Envelope, Position)> = envs.into_iter().zip(positions).collect();
    let flush_bytes = 10 * line - 5; // reached by the 10th line
                                     // No age limit at all: only size and the end of the pass flush.
    let c = config(dir.path(), flush_bytes, Duration::MAX);
    let summary = archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await?;
    let boundaries: Vec<u64> = (0..=10).map(|i| i * 10).collect();
    let want = expected_parts(&produced, 0, &boundaries, standard_key);
    ensure!(want.len() == 10);
    let got = ids_by_key(&read_archive(store.as_ref()).await?)?;
    ensure!(got == want, "{:#?}", got.keys());
    ensure!(summary.parts == 10 && summary.records == 100);

    // Three more records: below flush_bytes, so only the end of the pass flushes them.
    let more: Vec<Envelope> = (100..103).map(|n| envelope("s", n, MARCH_1, 300)).collect();
    log.produce(
        topics::RAW,
        more.iter().map(record_of).collect::<Result<_>>()?,
    )
    .await?;
    let summary = archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await?;
    ensure!(summary.parts == 1 && summary.records == 3, "{summary:?}");
    let got = read_archive(store.as_ref()).await?;
    let last = got
        .get("raw/dt=2024-03-01/source=s/part-0-00000000000000000100.jsonl.zst")
        .context("the last part")?;
    ensure!(last.len() == 3);
    Ok(())
}

/// As a daemon, a buffer far below `flush_bytes` is flushed and committed
/// once its oldest record has waited `flush_age`, while the daemon runs; a
/// stop request returns the summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_by_age() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let store = open_store(dir.path())?;
    log.create_topic(topics::RAW, 1).await?;
    let c = config(dir.path(), u64::MAX, Duration::from_millis(300));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = {
        let (log, store, c) = (log.clone(), store.clone(), c.clone());
        tokio::spawn(async move {
            archive::run(
                log,
                store,
                &c,
                Until::stopped_by(async {
                    let _ = stop_rx.await;
                }),
            )
            .await
        })
    };
    let group = c.archive.group.clone();
    let produce = |from: usize, to: usize| {
        let log = log.clone();
        async move {
            let envs: Vec<Envelope> = (from..to).map(|n| envelope("s", n, MARCH_1, 40)).collect();
            log.produce(
                topics::RAW,
                envs.iter().map(record_of).collect::<Result<_>>()?,
            )
            .await?;
            anyhow::Ok(())
        }
    };
    let wait_for_commit = |want: u64| {
        let log = log.clone();
        let group = group.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while committed(log.as_ref(), &group).await? != vec![Some(want)] {
                ensure!(Instant::now() < deadline, "no age flush committed {want}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        }
    };
    produce(0, 10).await?;
    wait_for_commit(10).await?;
    let keys: Vec<String> = store
        .list("raw/")
        .await?
        .into_iter()
        .map(|m| m.key)
        .collect();
    ensure!(keys == ["raw/dt=2024-03-01/source=s/part-0-00000000000000000000.jsonl.zst"]);
    produce(10, 15).await?;
    wait_for_commit(15).await?;
    ensure!(store.list("raw/").await?.len() == 2);
    let _ = stop_tx.send(());
    let summary = daemon.await??;
    ensure!(summary.parts == 2 && summary.records == 15, "{summary:?}");
    Ok(())
}

/// Encryption asked of the embedded store: refused before anything is
/// consumed, with a message that names the setting and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_on_embedded_store_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let store = open_store(dir.path())?;
    log.create_topic(topics::RAW, 1).await?;
    log.produce(
        topics::RAW,
        vec![record_of(&envelope("s", 0, MARCH_1, 10))?],
    )
    .await?;
    for (encryption, named) in [
        (Encryption::SseS3, "SSE-S3"),
        (Encryption::SseKms, "SSE-KMS"),
    ] {
        let mut c = config(dir.path(), u64::MAX, Duration::from_secs(60));
        c.archive.encryption = encryption;
        c.archive.kms_key_id = "alias/sift".into();
        let err = match archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await {
            Ok(s) => bail!("archived {s:?} unencrypted"),
            Err(e) => e.to_string(),
        };
        ensure!(
            err.contains("archive.encryption")
                && err.contains(named)
                && err.contains("embedded object store")
                && err.contains("cannot encrypt")
                && err.contains("archive.encryption = \"none\""),
            "{err}"
        );
    }
    ensure!(store.list("").await?.is_empty());
    ensure!(committed(log.as_ref(), "sift-archive").await? == vec![None]);

    // The trait's own answer to an encrypted put on a store that cannot.
    let put = store
        .put_with(
            "x",
            Bytes::from_static(b"x"),
            PutMode::Overwrite,
            &sift::backends::objects::PutOptions {
                encryption: Some(sift::backends::objects::Encryption::SseS3),
            },
        )
        .await;
    ensure!(
        matches!(put, Err(ObjectError::Unsupported { .. })),
        "{put:?}"
    );
    ensure!(store.head("x").await?.is_none());

    // The binary fails at startup the same way.
    drop(log);
    wait_unlocked(dir.path())?;
    let out = sift_cmd(dir.path())
        .args(["archive", "--once"])
        .env("SIFT__ARCHIVE__ENCRYPTION", "sse_s3")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{stderr}");
    ensure!(
        stderr.contains("archive.encryption") && stderr.contains("cannot encrypt"),
        "{stderr}"
    );
    Ok(())
}

/// The embedded store, failing puts of chosen keys, as a crash would stop
/// them (`run` fails after the other parts of the batch are uploaded and
/// before the commit), and a seeded share of all puts, as outages would.
struct Flaky {
    inner: EmbeddedObjects,
    fail: Mutex<BTreeSet<String>>,
    rng: Mutex<rand::rngs::StdRng>,
    failure_rate: f64,
    injected: std::sync::atomic::AtomicU64,
}

impl Flaky {
    fn open(dir: &Path, seed: u64, failure_rate: f64) -> Result<Self> {
        Ok(Flaky {
            inner: EmbeddedObjects::open(&dir.join("objects"))?,
            fail: Mutex::new(BTreeSet::new()),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            failure_rate,
            injected: Default::default(),
        })
    }
}

#[async_trait]
impl ObjectStore for Flaky {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<ObjectMeta, ObjectError> {
        let chosen = self.fail.lock().map_or(true, |f| f.contains(key));
        let drawn = self
            .rng
            .lock()
            .map_or(true, |mut r| r.random_bool(self.failure_rate));
        if chosen || drawn {
            self.injected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ObjectError::Backend(format!("injected failure at {key}")));
        }
        self.inner.put(key, body, mode).await
    }
    async fn put_stream(
        &self,
        key: &str,
        body: ObjectReader,
        mode: PutMode,
    ) -> Result<ObjectMeta, ObjectError> {
        self.inner.put_stream(key, body, mode).await
    }
    async fn get(&self, key: &str) -> Result<(ObjectMeta, Bytes), ObjectError> {
        self.inner.get(key).await
    }
    async fn get_stream(&self, key: &str) -> Result<(ObjectMeta, ObjectReader), ObjectError> {
        self.inner.get_stream(key).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.inner.delete(key).await
    }
}

/// The crash argument of `sift::archive`, step by step: a first run flushes
/// everything as one batch, claiming the range [0, 300), and dies after
/// uploading all parts but one; a second run cuts batches of 37 records, yet
/// finds the claim, waits until it holds the whole range, and dies on
/// another part of it; a third, with batches of 23, archives the range as it
/// was claimed, then cuts its own batches in 100 records more. Group `late`
/// has its first record near the end of the first range. In the end the
/// parts are exactly those of the claimed ranges, and each record is in one
/// part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_upload_and_commit_is_idempotent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = open_log(dir.path())?;
    let store = Arc::new(Flaky::open(dir.path(), 0, 0.0)?);
    log.create_topic(topics::RAW, 1).await?;
    // Equal-size lines; groups: a/b on two days interleaved, `late` from 250.
    let envelopes = |range: std::ops::Range<usize>| {
        range
            .map(|n| {
                let (source, day) = if n >= 250 && n % 2 == 0 {
                    ("late", 0)
                } else {
                    (["srca", "srcb"][n % 2], (n / 7 % 2) as i64)
                };
                envelope(source, n, MARCH_1 + day * DAY_MS, 100)
            })
            .collect::<Vec<_>>()
    };
    let envs = envelopes(0..300);
    let line = serde_json::to_vec(&envs[0])?.len() as u64 + 1;
    ensure!(envs
        .iter()
        .all(|e| serde_json::to_vec(e).map_or(0, |v| v.len() as u64 + 1) == line));
    let positions = log
        .produce(
            topics::RAW,
            envs.iter().map(record_of).collect::<Result<_>>()?,
        )
        .await?;
    let mut produced: Vec<(Envelope, Position)> = envs.into_iter().zip(positions).collect();
    let group = "sift-archive";
    let fail_only = |key: &str| -> Result<()> {
        let mut f = store.fail.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        f.clear();
        f.insert(key.to_string());
        Ok(())
    };

    // Run 1: one batch [0, 300); the part of source srcb on 2024-03-02 fails.
    let run1 = expected_parts(&produced, 0, &[0, 300], standard_key);
    let failing = "raw/dt=2024-03-02/source=srcb/part-0-00000000000000000007.jsonl.zst";
    ensure!(run1.contains_key(failing), "{:#?}", run1.keys());
    fail_only(failing)?;
    let c = config(dir.path(), u64::MAX, Duration::from_secs(3600));
    let err = archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await;
    ensure!(err.is_err(), "run 1 must fail");
    ensure!(committed(log.as_ref(), group).await? == vec![None]);
    let after1 = ids_by_key(&read_archive(store.as_ref()).await?)?;
    let mut uploaded = run1.clone();
    uploaded.remove(failing);
    ensure!(uploaded.len() == 4, "{:#?}", run1.keys());
    ensure!(
        after1 == uploaded,
        "all parts but the failing one are uploaded"
    );
    let late = "raw/dt=2024-03-01/source=late/part-0-00000000000000000250.jsonl.zst";
    ensure!(after1.contains_key(late));
    let claim = "_sift/archive-ranges/raw/part-0-00000000000000000000.json";
    let (_, held) = store.get(claim).await?;
    let held: serde_json::Value = serde_json::from_slice(&held)?;
    ensure!(held["end"] == "300" && held["first"] == "0", "{held}");

    // Run 2: batches of 37 asked, but [0, 300) is claimed; `late` fails.
    fail_only(late)?;
    let c = config(dir.path(), 37 * line, Duration::from_secs(3600));
    ensure!(
        archive::run(log.clone(), store.clone(), &c, Until::caught_up())
            .await
            .is_err()
    );
    ensure!(committed(log.as_ref(), group).await? == vec![None]);
    ensure!(
        store.list("_sift/archive-ranges/").await?.len() == 1,
        "no range of its own before the claimed one is archived"
    );

    // Run 3: batches of 23; the claimed range first, then 100 new records.
    store
        .fail
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clear();
    let more = envelopes(300..400);
    let positions = log
        .produce(
            topics::RAW,
            more.iter().map(record_of).collect::<Result<_>>()?,
        )
        .await?;
    produced.extend(more.into_iter().zip(positions));
    let c = config(dir.path(), 23 * line, Duration::from_secs(3600));
    let summary = archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await?;
    ensure!(committed(log.as_ref(), group).await? == vec![Some(400)]);
    ensure!(
        summary.records == 400 && summary.ranges_adopted == 1,
        "{summary:?}"
    );

    let mut boundaries: Vec<u64> = vec![0, 300];
    boundaries.extend((1..=4).map(|i| 300 + i * 23));
    boundaries.push(400);
    let want = expected_parts(&produced, 0, &boundaries, standard_key);
    let got = ids_by_key(&read_archive(store.as_ref()).await?)?;
    ensure!(
        got.keys().collect::<Vec<_>>() == want.keys().collect::<Vec<_>>(),
        "keys:\n{:#?}\nwant:\n{:#?}",
        got.keys(),
        want.keys()
    );
    ensure!(got == want);
    ensure!(store.list("_sift/archive-ranges/").await?.len() == boundaries.len() - 1);
    let mut seen = HashSet::new();
    for ids in got.values() {
        for id in ids {
            ensure!(seen.insert(id.clone()), "{id} archived twice");
        }
    }
    ensure!(seen.len() == 400);
    Ok(())
}

/// The rebalance race at its worst: members that each believe they own
/// every partition (each in a consumer group of its own, so none ever sees
/// another's commits), flushing at their own seeded batch sizes at the same
/// time into one archive, while puts fail at random and failed members
/// restart from their commits. Whoever claims a range first decides its cut;
/// every record ends up in exactly one part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rival_members_archive_each_record_once() -> Result<()> {
    for seed in 0..4u64 {
        let dir = tempfile::tempdir()?;
        let log = open_log(dir.path())?;
        log.create_topic(topics::RAW, 2).await?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let envs: Vec<Envelope> = (0..600)
            .map(|n| {
                let source = ["a", "b", "c", "x y"][rng.random_range(0..4)];
                let day = rng.random_range(0..3);
                envelope(source, n, MARCH_1 + day * DAY_MS, rng.random_range(20..200))
            })
            .collect();
        let mut records: Vec<Record> = envs.iter().map(record_of).collect::<Result<_>>()?;
        for bad in [17, 230, 411] {
            records[bad] = Record::new(format!("bad-{bad}"), b"{not json".to_vec());
        }
        let positions = log.produce(topics::RAW, records).await?;
        let produced: Vec<(Envelope, Position)> = envs
            .into_iter()
            .zip(positions)
            .enumerate()
            .filter(|(n, _)| ![17, 230, 411].contains(n))
            .map(|(_, p)| p)
            .collect();
        let store = Arc::new(Flaky::open(dir.path(), seed ^ 0x5eed, 0.01)?);
        let mut members = Vec::new();
        for m in 0..3 {
            let mut c = config(
                dir.path(),
                rng.random_range(400..20_000),
                Duration::from_secs(3600),
            );
            c.archive.group = format!("member-{m}");
            let (log, store) = (log.clone(), store.clone());
            members.push(tokio::spawn(async move {
                let mut failures = 0;
                loop {
                    match archive::run(log.clone(), store.clone(), &c, Until::caught_up()).await {
                        Ok(_) => return anyhow::Ok(failures),
                        Err(_) if failures < 200 => failures += 1,
                        Err(e) => return Err(e.into()),
                    }
                }
            }));
        }
        for m in members {
            m.await??;
        }
        let injected = store.injected.load(std::sync::atomic::Ordering::Relaxed);
        ensure!(
            injected > 0,
            "seed {seed}: no put failed, so nothing was tested"
        );
        let archive = ids_by_key(&read_archive(&store.inner).await?)?;
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for ids in archive.values() {
            for id in ids {
                *seen.entry(id).or_default() += 1;
            }
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        ensure!(
            twice.is_empty(),
            "seed {seed}: {} records archived more than once, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        );
        let missing: Vec<&str> = produced
            .iter()
            .map(|(e, _)| e.id.as_str())
            .filter(|id| !seen.contains_key(id))
            .collect();
        ensure!(
            missing.is_empty(),
            "seed {seed}: {} records missing, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        ensure!(seen.len() == produced.len());
        // The claims tile each partition: each starts where the previous ended.
        for p in 0..2u32 {
            let mut claims: Vec<(u64, u64)> = Vec::new();
            for m in store
                .inner
                .list(&format!("_sift/archive-ranges/raw/part-{p}-"))
                .await?
            {
                let (_, body) = store.inner.get(&m.key).await?;
                let c: serde_json::Value = serde_json::from_slice(&body)?;
                let num = |v: &serde_json::Value| {
                    v.as_str()
                        .and_then(|s| s.parse::<u64>().ok())
                        .context("an offset")
                };
                claims.push((num(&c["first"])?, num(&c["end"])?));
            }
            claims.sort();
            let high = highs(log.as_ref()).await?[p as usize];
            let mut at = 0;
            for (first, end) in &claims {
                ensure!(*first == at && end > first, "seed {seed}: {claims:?}");
                at = *end;
            }
            ensure!(at == high, "seed {seed}: claims end at {at}, log at {high}");
        }
    }
    Ok(())
}

fn sift_cmd(data: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sift"));
    cmd.arg("--data-dir")
        .arg(data)
        .env_remove("SIFT_CONFIG")
        .env_remove("SIFT_DATA_DIR")
        .env("SIFT__TELEMETRY__METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .current_dir(data);
    cmd
}

/// Produces the crash test's records: envelopes of several sources (one
/// needing escaping) over five days, with a few bad records among them.
async fn produce_corpus(
    log: &dyn Log,
    n: usize,
    seed: u64,
) -> Result<(Vec<(Envelope, Position)>, Vec<Position>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sources = ["debian", "gov feeds/€", "news", "pdfs"];
    log.create_topic(topics::RAW, 4).await?;
    let mut produced = Vec::new();
    let mut bad = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let envs: Vec<Envelope> = chunk
            .iter()
            .map(|&i| {
                let at = MARCH_1 + rng.random_range(0..5 * DAY_MS);
                envelope(
                    sources[rng.random_range(0..sources.len())],
                    i,
                    at,
                    rng.random_range(100..1500),
                )
            })
            .collect();
        let positions = log
            .produce(
                topics::RAW,
                envs.iter().map(record_of).collect::<Result<_>>()?,
            )
            .await?;
        produced.extend(envs.into_iter().zip(positions));
        let junk = Record::new(
            format!("junk-{}", chunk[0]),
            format!("{{broken {}", chunk[0]),
        );
        bad.extend(log.produce(topics::RAW, vec![junk]).await?);
    }
    Ok((produced, bad))
}

/// Checks that the archive holds every produced record exactly once, in
/// parts named by partition and first offset, and that every bad record is
/// in the dead-letter topic.
async fn check_complete(
    dir: &Path,
    produced: &[(Envelope, Position)],
    bad: &[Position],
) -> Result<()> {
    let log = open_log(dir)?;
    let store = open_store(dir)?;
    let highs = highs(log.as_ref()).await?;
    ensure!(
        committed(log.as_ref(), "sift-archive").await?
            == highs.iter().map(|h| Some(*h)).collect::<Vec<_>>(),
        "everything is committed"
    );
    let positions: BTreeMap<&str, Position> = produced
        .iter()
        .map(|(e, p)| (e.id.as_str(), p.clone()))
        .collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let archive = read_archive(store.as_ref()).await?;
    for (key, lines) in &archive {
        let (dt, source, p, first) = parse_key(key)?;
        let mut last = None;
        for (i, line) in lines.iter().enumerate() {
            let env: Envelope = serde_json::from_str(line)?;
            let pos = positions
                .get(env.id.as_str())
                .context("an unknown record")?;
            ensure!(
                pos.partition == p,
                "{key}: a record of partition {}",
                pos.partition
            );
            ensure!(
                i > 0 || pos.offset == first,
                "{key} starts at offset {}",
                pos.offset
            );
            ensure!(last < Some(&pos.offset), "{key}: offsets increase");
            last = Some(&pos.offset);
            ensure!(archive::keys::utc_date(env.fetched_at_ms) == dt);
            ensure!(archive::keys::source_segment(&env.source) == source);
            *seen.entry(env.id).or_default() += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(twice.is_empty(), "archived more than once: {twice:?}");
    let missing = produced
        .iter()
        .filter(|(e, _)| !seen.contains_key(&e.id))
        .count();
    ensure!(missing == 0, "{missing} records missing from the archive");
    ensure!(seen.len() == produced.len());

    let dlq = log.fetch(topics::DLQ, 0, &Offset::new(0), 100_000).await?;
    let dead: HashSet<Bytes> = dlq.iter().filter_map(|m| m.key.clone()).collect();
    ensure!(
        dead.len() == bad.len(),
        "{} dead letters for {} bad records",
        dead.len(),
        bad.len()
    );
    Ok(())
}

/// Part files under the data directory, counted without opening the store
/// (opening it clears temporary files a running daemon is writing).
fn count_parts(data: &Path) -> usize {
    fn walk(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        walk(&path)
                    } else {
                        usize::from(path.to_string_lossy().ends_with(".jsonl.zst"))
                    }
                })
                .sum()
        })
    }
    walk(&data.join("objects").join("raw"))
}

/// Runs `sift archive` to completion with `--once`, retrying while the
/// previous process still holds the log's lock.
fn run_once(data: &Path) -> Result<serde_json::Value> {
    for _ in 0..50 {
        let out = sift_cmd(data)
            .args(["archive", "--once", "--json"])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return Ok(serde_json::from_slice(&out.stdout)?);
        }
        ensure!(
            stderr.contains("in use by another sift process"),
            "sift archive --once: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the log stayed locked")
}

/// The real binary as a daemon with 50 kB flushes, killed with SIGKILL at
/// random (seeded) moments and restarted each time, then finished with
/// `--once`: every record is archived exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_survives_sigkill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let (produced, bad) = {
        let log = open_log(data)?;
        produce_corpus(log.as_ref(), 5000, 20261125).await?
    };
    wait_unlocked(data)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let kills = rng.random_range(3..=5);
    let mut parts_seen = vec![0];
    for _ in 0..kills {
        let mut child: Child = sift_cmd(data)
            .arg("archive")
            .env("SIFT__ARCHIVE__FLUSH_BYTES", "50000")
            .env("SIFT__ARCHIVE__FLUSH_AGE", "2s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // Kill while it works: once it has uploaded a part, at a random moment after.
        let before = parts_seen.last().copied().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while count_parts(data) <= before && Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                bail!("the daemon exited on its own");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        child.kill()?;
        child.wait()?;
        parts_seen.push(count_parts(data));
    }
    eprintln!("{kills} kills; parts after each: {parts_seen:?}");
    ensure!(
        parts_seen.windows(2).all(|w| w[1] > w[0]),
        "every run archived something before its kill: {parts_seen:?}"
    );
    // The last pass flushes at the default 64 MB: other boundaries again.
    let summary = run_once(data)?;
    eprintln!("final pass: {summary}");
    ensure!(summary["records"].as_u64().is_some() && summary["seconds"].as_f64().is_some());
    check_complete(data, &produced, &bad).await
}

/// The daemon with nothing big or old enough to flush: SIGTERM makes it
/// flush, upload and commit everything, and exit 0 with its summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_flushes_on_sigterm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let (produced, bad) = {
        let log = open_log(data)?;
        produce_corpus(log.as_ref(), 600, 99).await?
    };
    wait_unlocked(data)?;
    let mut child = sift_cmd(data)
        .arg("archive")
        .env("RUST_LOG", "info")
        .env("SIFT__ARCHIVE__FLUSH_AGE", "1h")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut log_lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .with_context(|| format!("the daemon never caught up: {log_lines:#?}"))?;
        let caught_up = line.contains("Caught up with sift.raw");
        log_lines.push(line);
        if caught_up {
            break;
        }
    }
    ensure!(
        open_store(data)?.list("raw/").await?.is_empty(),
        "nothing is flushed before the signal"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    ensure!(status.success());
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "exit status {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.contains(&format!("records archived   {:>12}", produced.len())),
        "{stdout}"
    );
    check_complete(data, &produced, &bad).await
}
