//! Chaos on the real services, first part: several `sift clean` and `sift
//! archive` processes in their consumer groups on Kafka and S3 (moto), fed
//! a stream of documents with malformed records among them, while, at
//! seeded random moments, instances are killed with SIGKILL and restarted,
//! an instance is added and later removed (rebalances), and the Kafka
//! broker is restarted. Then, exactly: every document is in `sift.clean`,
//! every archived document is in exactly one part, the dead letters are
//! exactly the malformed records (once per stage that read them), and both
//! groups' lag is 0. Prints the time each fault took to recover from.
//!
//! The run has a topic namespace of its own (`log.topic_prefix`) and a
//! bucket of its own. `SIFT_CHAOS_DOCS` sets the documents (default
//! 20,000), `SIFT_CHAOS_SEED` the seed (default: the clock, printed).
#![cfg(all(feature = "kafka", feature = "s3"))]

mod conformance;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use sift::backends::log::{Log, Record};
use sift::backends::objects::ObjectStore;
use sift::config::{Config, LogBackend, ObjectsBackend};
use sift::envelope::{headers, topics, Envelope, SCHEMA_VERSION};

const MALFORMED: usize = 40;

struct Instance {
    stage: &'static str,
    n: usize,
    child: Child,
}

struct Run {
    dir: PathBuf,
    config: PathBuf,
}

impl Run {
    fn start(&self, stage: &'static str, n: usize) -> Result<Instance> {
        let data = self.dir.join(format!("{stage}-{n}"));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{stage}-{n}.log")))?;
        let child = Command::new(env!("CARGO_BIN_EXE_sift"))
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&data)
            .arg(stage)
            .env("SIFT__TELEMETRY__METRICS_ADDR", "")
            .env("RUST_LOG", "warn")
            .env("AWS_ACCESS_KEY_ID", "sift-test")
            .env("AWS_SECRET_ACCESS_KEY", "sift-test")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Instance { stage, n, child })
    }
}

impl Instance {
    fn kill(&mut self) -> Result<()> {
        self.child.kill()?; // SIGKILL
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM: finish the work in hand, commit, leave the group.
    fn stop(&mut self) -> Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait()?.is_none() {
            ensure!(
                Instant::now() < deadline,
                "{}-{} did not stop on SIGTERM",
                self.stage,
                self.n
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

fn envelope(i: usize) -> Envelope {
    let words = [
        "council", "budget", "river", "library", "permit", "hearing", "school", "bridge",
        "harbour", "zoning", "transit", "water", "park", "tax", "election", "clinic",
    ];
    let text: String = (0..40)
        .map(|k| words[(i * 7 + k * 13 + k * k) % words.len()])
        .collect::<Vec<_>>()
        .join(" ");
    let source = format!("chaos-{}", i % 5);
    let url = format!("https://site{}.example/doc/{i}", i % 5);
    Envelope {
        v: SCHEMA_VERSION,
        id: sift::envelope::document_id(&source, &url),
        source,
        url,
        // Two days, so parts fall into several dt= partitions.
        fetched_at_ms: 1_790_000_000_000 + (i as i64 % 2) * 86_400_000 + i as i64,
        content_type: "text/html".into(),
        title: format!("Notice {i}"),
        text: Some(format!(
            "Public notice number {i}. The {text}. Reference {i} of the record."
        )),
        body_uri: None,
        metadata: Default::default(),
    }
}

fn record(env: &Envelope) -> Result<Record> {
    Ok(Record {
        key: Some(Bytes::from(env.id.clone())),
        value: Bytes::from(serde_json::to_vec(env)?),
        headers: env.raw_headers(),
    })
}

/// Produces, retrying while the broker is away.
async fn produce(log: &dyn Log, records: Vec<Record>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match log.produce(topics::RAW, records.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("chaos: producing again after: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The group's committed offsets summed over `topic`'s partitions, and its lag.
async fn standing(log: &dyn Log, group: &str, topic: &str) -> Result<(u64, u64)> {
    let marks = log.watermarks(topic).await?;
    let committed = log.committed(group, topic).await?;
    let (mut done, mut lag) = (0, 0);
    for w in &marks {
        let c = committed
            .iter()
            .find(|(p, _)| *p == w.partition)
            .and_then(|(_, c)| c.clone())
            .unwrap_or_else(|| w.low.clone());
        done += w.low.until(&c);
        lag += c.until(&w.high);
    }
    Ok((done, lag))
}

/// Records the faults both groups have moved past since.
async fn settle<'a>(
    log: &dyn Log,
    pending: &mut Vec<(&'a str, (u64, u64), Instant)>,
    recoveries: &mut Vec<(&'a str, Duration)>,
) {
    if pending.is_empty() {
        return;
    }
    let now = progress(log).await;
    pending.retain(|(what, before, since)| {
        if now.0 > before.0 && now.1 > before.1 {
            let took = since.elapsed();
            eprintln!(
                "chaos: {what}: both groups moving again after {} ms",
                took.as_millis()
            );
            recoveries.push((what, took));
            false
        } else {
            true
        }
    });
}

async fn progress(log: &dyn Log) -> (u64, u64) {
    let c = standing(log, "sift-clean", topics::RAW)
        .await
        .map_or(0, |s| s.0);
    let a = standing(log, "sift-archive", topics::RAW)
        .await
        .map_or(0, |s| s.0);
    (c, a)
}

fn services(verb: &str) -> Result<()> {
    conformance::services(verb, "kafka")
}

// Not in the test command yet: two archive members flushing one partition
// around a rebalance can still overwrite each other's part of the same name,
// which the exactly-once check of the archive catches. Until that is fixed,
// run it by hand:
//   cargo test --features full --test chaos -- --ignored --nocapture
#[ignore = "the archive's rebalance race can fail its exactly-once check; run by hand with --ignored"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_and_archive_instances_survive_kills_rebalances_and_a_broker_restart() -> Result<()> {
    let (Some(kafka), Some(s3)) = (
        conformance::service_addr("SIFT_TEST_KAFKA"),
        conformance::service_addr("SIFT_TEST_S3"),
    ) else {
        return Ok(());
    };
    let docs: usize = std::env::var("SIFT_CHAOS_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("SIFT_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    eprintln!("chaos: {docs} documents, seed {seed} (SIFT_CHAOS_SEED={seed} repeats it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tag = conformance::unique("chaos")
        .replace('_', "-")
        .to_lowercase();
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("sift.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"[log]
backend = "kafka"
default_partitions = 6
topic_prefix = "{tag}."
[log.kafka]
brokers = "{kafka}"
[log.kafka.properties]
# A member killed while its group rebalances is removed only when the
# rebalance times out, and librdkafka sends max.poll.interval.ms (300 s by
# default) as that timeout: the broker's log showed a group waiting exactly
# 300 s for a killed member. Clean and archive poll every few seconds. (The
# offset reader needs a session timeout under it too.)
"max.poll.interval.ms" = "30000"
"session.timeout.ms" = "10000"
[objects]
backend = "s3"
[objects.s3]
bucket = "{tag}"
region = "us-east-1"
endpoint = "{s3}"
path_style = true
create_bucket = true
[clean]
near_duplicate_bits = 0
batch_size = 200
[archive]
flush_bytes = 1000000
flush_age = "2s"
"#
        ),
    )?;
    // The test's own view of the same log and bucket.
    let mut config = Config {
        data_dir: dir.path().join("test"),
        ..Config::default()
    };
    config.log.backend = LogBackend::Kafka;
    config.log.kafka.brokers = kafka.clone();
    config.log.topic_prefix = format!("{tag}.");
    config.log.default_partitions = 6;
    config.objects.backend = ObjectsBackend::S3;
    config.objects.s3.bucket = tag.clone();
    config.objects.s3.endpoint = s3.clone();
    config.objects.s3.path_style = true;
    config.objects.s3.create_bucket = true;
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "sift-test"),
        ("AWS_SECRET_ACCESS_KEY", "sift-test"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    let log = sift::backends::open_log(&config).await?;
    let objects = sift::backends::open_objects(&config).await?;
    log.create_topic(topics::RAW, 6).await?;
    let run = Run {
        dir: dir.path().to_path_buf(),
        config: config_path,
    };
    let result = chaos(&run, log.as_ref(), &objects, docs, &mut rng).await;
    if result.is_err() {
        for entry in std::fs::read_dir(dir.path())? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!(
                    "--- {} (last lines)\n{}",
                    p.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
    result
}

async fn chaos(
    run: &Run,
    log: &dyn Log,
    objects: &Arc<dyn ObjectStore>,
    docs: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<()> {
    let mut clean: Vec<Instance> = vec![run.start("clean", 0)?, run.start("clean", 1)?];
    let mut archive: Vec<Instance> = vec![run.start("archive", 0)?, run.start("archive", 1)?];
    // Faults at seeded moments of the feed (fractions of it, in order).
    let mut at: Vec<(f64, &str)> = vec![
        (rng.random_range(0.10..0.25), "kill a clean instance"),
        (rng.random_range(0.25..0.40), "kill an archive instance"),
        (rng.random_range(0.40..0.50), "add a clean instance"),
        (rng.random_range(0.50..0.65), "restart the Kafka broker"),
        (
            rng.random_range(0.65..0.80),
            "remove the added clean instance",
        ),
        (
            rng.random_range(0.80..0.95),
            "kill a clean and an archive instance",
        ),
    ];
    at.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut next_fault = 0;
    let mut recoveries: Vec<(&str, Duration)> = Vec::new();
    // Faults not yet recovered from: what, where the groups stood, when.
    let mut pending: Vec<(&str, (u64, u64), Instant)> = Vec::new();
    let mut ids: BTreeSet<String> = BTreeSet::new();
    let mut malformed: BTreeSet<String> = BTreeSet::new();
    let bad_every = docs / MALFORMED;
    let batch = 500;
    let mut i = 0;
    while i < docs {
        let mut records = Vec::new();
        for k in i..(i + batch).min(docs) {
            let env = envelope(k);
            ids.insert(env.id.clone());
            records.push(record(&env)?);
            if bad_every > 0 && k % bad_every == bad_every / 2 {
                let key = format!("malformed-{k}");
                malformed.insert(key.clone());
                records.push(Record::new(
                    key,
                    format!("{{\"v\":1,\"id\":\"cut off at {k}"),
                ));
            }
        }
        produce(log, records).await?;
        i = (i + batch).min(docs);
        tokio::time::sleep(Duration::from_millis(150)).await;
        settle(log, &mut pending, &mut recoveries).await;
        while next_fault < at.len() && (i as f64) >= at[next_fault].0 * docs as f64 {
            let what = at[next_fault].1;
            next_fault += 1;
            let before = progress(log).await;
            let since = Instant::now();
            match what {
                "kill a clean instance" => {
                    let k = rng.random_range(0..clean.len());
                    clean[k].kill()?;
                    let n = clean[k].n;
                    clean[k] = run.start("clean", n)?;
                }
                "kill an archive instance" => {
                    let k = rng.random_range(0..archive.len());
                    archive[k].kill()?;
                    let n = archive[k].n;
                    archive[k] = run.start("archive", n)?;
                }
                "add a clean instance" => clean.push(run.start("clean", 2)?),
                "restart the Kafka broker" => {
                    services("down")?;
                    services("up")?;
                }
                "remove the added clean instance" => {
                    if let Some(pos) = clean.iter().position(|c| c.n == 2) {
                        clean[pos].stop()?;
                        clean.remove(pos);
                    }
                }
                _ => {
                    let k = rng.random_range(0..clean.len());
                    clean[k].kill()?;
                    let n = clean[k].n;
                    clean[k] = run.start("clean", n)?;
                    let k = rng.random_range(0..archive.len());
                    archive[k].kill()?;
                    let n = archive[k].n;
                    archive[k] = run.start("archive", n)?;
                }
            }
            eprintln!("chaos: after {i} documents: {what}");
            pending.push((what, before, since));
        }
    }
    // Everything fed: both groups drain to lag 0.
    let fed = Instant::now();
    let deadline = fed + Duration::from_secs(300);
    loop {
        let c = standing(log, "sift-clean", topics::RAW).await;
        let a = standing(log, "sift-archive", topics::RAW).await;
        settle(log, &mut pending, &mut recoveries).await;
        if let (Ok((_, 0)), Ok((_, 0))) = (&c, &a) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "lag after 300 s: clean {c:?}, archive {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "chaos: lag 0 in both groups {} ms after the last document",
        fed.elapsed().as_millis()
    );
    ensure!(
        pending.is_empty(),
        "the groups never moved after: {:?}",
        pending.iter().map(|p| p.0).collect::<Vec<_>>()
    );
    for inst in clean.iter_mut().chain(archive.iter_mut()) {
        inst.stop()?;
    }

    // Every document cleaned (at least once: a killed member's last batch
    // may be produced twice).
    let cleaned = conformance::log::read_all(log, topics::CLEAN).await?;
    let mut cleaned_ids = BTreeSet::new();
    for m in &cleaned {
        let env: Envelope = serde_json::from_slice(&m.value).context("a cleaned record")?;
        cleaned_ids.insert(env.id);
    }
    ensure!(
        cleaned_ids == ids,
        "clean: {} of {} documents, {} unexpected",
        ids.intersection(&cleaned_ids).count(),
        ids.len(),
        cleaned_ids.difference(&ids).count()
    );
    // Every document archived exactly once.
    let mut archived: BTreeMap<String, u32> = BTreeMap::new();
    let mut parts = 0;
    for meta in objects.list("raw/").await? {
        parts += 1;
        let (_, body) = objects.get(&meta.key).await?;
        for line in zstd::decode_all(&body[..])?.split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let env: Envelope = serde_json::from_slice(line).context("an archived line")?;
            *archived.entry(env.id).or_default() += 1;
        }
    }
    let twice: Vec<&String> = archived
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    ensure!(
        twice.is_empty(),
        "{} documents are in two parts or more",
        twice.len()
    );
    let archived_ids: BTreeSet<String> = archived.into_keys().collect();
    ensure!(
        archived_ids == ids,
        "archive: {} of {} documents in {parts} parts",
        ids.intersection(&archived_ids).count(),
        ids.len()
    );
    // Dead letters: exactly the malformed records, from each stage.
    let letters = conformance::log::read_all(log, topics::DLQ).await?;
    let mut by_stage: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in &letters {
        let stage = m
            .headers
            .iter()
            .find(|(k, _)| k == headers::STAGE)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let key = m
            .key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        by_stage.entry(stage).or_default().insert(key);
    }
    for stage in ["clean", "archive"] {
        let got = by_stage.remove(stage).unwrap_or_default();
        if got != malformed {
            bail!("{stage}: dead letters {got:?}, malformed {malformed:?}");
        }
    }
    ensure!(
        by_stage.is_empty(),
        "dead letters from elsewhere: {by_stage:?}"
    );
    eprintln!(
        "chaos: {} documents and {} malformed records; {} cleaned records; {parts} archive parts; recoveries: {}",
        ids.len(),
        malformed.len(),
        cleaned.len(),
        recoveries
            .iter()
            .map(|(w, d)| format!("{w} {} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
