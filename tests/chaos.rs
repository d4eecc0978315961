//! Chaos on the real services: every stage as several `sift` processes in
//! its consumer group (2 × ingest, 2 × clean, 2 × archive, 3 × infer and
//! 2 × match) on Kafka, S3 (moto), HBase, OpenSearch and Redis, fed a
//! stream of documents (written to `sift.raw` and crawled by the ingest
//! group from a fixture web) and of social profiles, malformed records among
//! both. Meanwhile, at seeded random moments: an instance of every stage is
//! killed with SIGKILL and started again, an infer and a clean instance are
//! added and later removed (rebalances), the Kafka broker and OpenSearch
//! are restarted, the HBase Thrift gateway is killed and started again, and
//! Redis is restarted. A daemon that exits on its own is started again, as
//! a supervisor would, and reported.
//!
//! Then, exactly:
//! - every document of `sift.raw` has its row in `documents` with its `c`
//!   family, and is in `sift.clean`;
//! - the archive holds each record of `sift.raw` exactly once: the ids of all
//!   parts, counted, equal the ids of the topic's valid records, counted;
//! - every page of the fixture web was ingested;
//! - every profile has its row in `handles`;
//! - the dead letters are exactly the malformed inputs, per stage;
//! - every group's lag is 0.
//!
//! It prints how long each fault took to recover from: until every group
//! that had work has committed past where it stood when the fault came.
//!
//! The run has a topic and group namespace of its own (`log.topic_prefix`),
//! a bucket, a search index and handles of its own. `SIFT_CHAOS_DOCS` sets
//! the documents written to `sift.raw` (default 20,000), `SIFT_CHAOS_PROFILES`
//! the profiles (default 5,000), `SIFT_CHAOS_SEED` the seed (default: the
//! clock, printed), `SIFT_CHAOS_FAULTS` a comma-separated subset of the
//! faults by the words they start with (e.g. `restart the Kafka`; default
//! all), and `SIFT_CHAOS_KEEP=1` keeps the run's directory, with every
//! instance's log (`<stage>-<n>.log`, at the level of `SIFT_CHAOS_RUST_LOG`,
//! default `warn`), and prints where it is.
#![cfg(all(
    feature = "kafka",
    feature = "s3",
    feature = "hbase",
    feature = "elasticsearch",
    feature = "redis"
))]

mod conformance;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use axum::http::{header, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use sift::backends::log::{Log, Record};
use sift::backends::objects::ObjectStore;
use sift::backends::table::{Scan, Table};
use sift::envelope::{headers, topics, Envelope, SCHEMA_VERSION};

/// Malformed records among the documents written to `sift.raw`.
const MALFORMED_DOCS: usize = 40;
/// Malformed records among the profiles.
const MALFORMED_PROFILES: usize = 20;
/// Sites of the fixture web, and pages each one's sitemap lists.
const SITES: usize = 6;
const PAGES: usize = 40;
/// The enrichment stand-in's API key.
const KEY: &str = "chaos-key";
/// The consumer groups whose lag must reach 0, with the topic each reads.
const GROUPS: [(&str, &str); 4] = [
    ("sift-clean", topics::RAW),
    ("sift-archive", topics::RAW),
    ("sift-infer", topics::CLEAN),
    ("sift-match", topics::PROFILES),
];

struct Instance {
    stage: &'static str,
    n: usize,
    child: Child,
}

/// What every `sift` process of the run shares.
struct Run {
    dir: PathBuf,
    config: PathBuf,
    sources: PathBuf,
    enrich_url: String,
}

impl Run {
    fn sift(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sift"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("SIFT__TELEMETRY__METRICS_ADDR", "")
            .env("SIFT__ENRICH__URL", &self.enrich_url)
            .env("SIFT__ENRICH__API_KEY", KEY)
            .env(
                "RUST_LOG",
                std::env::var("SIFT_CHAOS_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("AWS_ACCESS_KEY_ID", "sift-test")
            .env("AWS_SECRET_ACCESS_KEY", "sift-test");
        cmd
    }

    /// A command run to completion (setup), its stdout returned.
    fn run_ok(&self, args: &[&str], data: &str) -> Result<String> {
        let out = self
            .sift()
            .arg("--data-dir")
            .arg(self.dir.join(data))
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "sift {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start(&self, stage: &'static str, n: usize) -> Result<Instance> {
        let data = self.dir.join(format!("{stage}-{n}"));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{stage}-{n}.log")))?;
        let mut cmd = self.sift();
        cmd.arg("--data-dir").arg(&data).arg(stage);
        if stage == "ingest" {
            cmd.arg("--sources").arg(&self.sources);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn()?;
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
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(90);
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

/// Every instance of the run, by stage.
struct Fleet {
    instances: Vec<Instance>,
    /// Daemons that exited on their own and were started again: (name, status).
    exits: Vec<(String, String)>,
}

impl Fleet {
    /// Kills a random instance of `stage` and starts it again.
    fn kill_one(&mut self, run: &Run, stage: &'static str, rng: &mut impl Rng) -> Result<()> {
        let of: Vec<usize> = (0..self.instances.len())
            .filter(|&k| self.instances[k].stage == stage)
            .collect();
        let k = of[rng.random_range(0..of.len())];
        self.instances[k].kill()?;
        let n = self.instances[k].n;
        self.instances[k] = run.start(stage, n)?;
        Ok(())
    }

    fn add(&mut self, run: &Run, stage: &'static str, n: usize) -> Result<()> {
        self.instances.push(run.start(stage, n)?);
        Ok(())
    }

    fn remove(&mut self, stage: &str, n: usize) -> Result<()> {
        if let Some(k) = self
            .instances
            .iter()
            .position(|i| i.stage == stage && i.n == n)
        {
            self.instances[k].stop()?;
            self.instances.remove(k);
        }
        Ok(())
    }

    /// Starts again every daemon that exited, as a supervisor would.
    fn supervise(&mut self, run: &Run) -> Result<()> {
        for inst in &mut self.instances {
            if let Some(status) = inst.child.try_wait()? {
                let name = format!("{}-{}", inst.stage, inst.n);
                let text = std::fs::read_to_string(run.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.contains("CONFWARN"))
                    .rev()
                    .take(8)
                    .collect();
                eprintln!(
                    "chaos: {name} exited ({status}); starting it again. Its last lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
                self.exits.push((name, status.to_string()));
                *inst = run.start(inst.stage, inst.n)?;
            }
        }
        Ok(())
    }

    fn stop_all(&mut self) -> Result<()> {
        for inst in &mut self.instances {
            inst.stop()?;
        }
        Ok(())
    }
}

fn envelope(i: usize, tag: &str) -> Envelope {
    let words = [
        "council", "budget", "river", "library", "permit", "hearing", "school", "bridge",
        "harbour", "zoning", "transit", "water", "park", "tax", "election", "clinic",
    ];
    let text: String = (0..40)
        .map(|k| words[(i * 7 + k * 13 + k * k) % words.len()])
        .collect::<Vec<_>>()
        .join(" ");
    let source = format!("{tag}-feed-{}", i % 5);
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

/// One site of the fixture web: robots.txt, a sitemap of [`PAGES`] pages, the pages.
async fn start_site(site: usize, tag: String) -> Result<SocketAddr> {
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let tag = tag.clone();
        async move {
            let (status, ct, body) = match uri.path() {
                "/robots.txt" => (StatusCode::OK, "text/plain", String::new()),
                "/sitemap.xml" => (
                    StatusCode::OK,
                    "application/xml",
                    format!(
                        "<?xml version=\"1.0\"?><urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">{}</urlset>",
                        (0..PAGES).map(|k| format!("<url><loc>/p{k}.html</loc></url>")).collect::<String>()
                    ),
                ),
                p => match p
                    .strip_prefix("/p")
                    .and_then(|p| p.strip_suffix(".html"))
                    .and_then(|k| k.parse::<usize>().ok())
                {
                    Some(k) if k < PAGES => (
                        StatusCode::OK,
                        "text/html",
                        format!(
                            "<html><head><title>Minutes {k} of site {site}</title></head><body>\
                             <p>Run {tag}. The committee of site {site} met for session {k} and \
                             agreed {} items about the water supply, the library budget and the \
                             bridge permits of district {}.</p></body></html>",
                            k + 2,
                            site * 1000 + k
                        ),
                    ),
                    _ => (StatusCode::NOT_FOUND, "text/plain", "no".to_string()),
                },
            };
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, ct)
                .body(axum::body::Body::from(body))
                .unwrap_or_default()
        }
    });
    // One loopback address per site: one host per site.
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.{}:0", site + 20)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Produces, retrying while the broker is away.
async fn produce(log: &dyn Log, topic: &str, records: Vec<Record>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match log.produce(topic, records.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("chaos: producing again after: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A group's records committed on `topic`, summed over partitions, and its lag.
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

/// Every group's standing; None for one the log cannot tell now (a broker away).
async fn standings(log: &dyn Log) -> Vec<Option<(u64, u64)>> {
    let mut out = Vec::new();
    for (group, topic) in GROUPS {
        out.push(standing(log, group, topic).await.ok());
    }
    out
}

/// A fault not yet recovered from: what, where the groups stood, when, and
/// when each group moved again.
struct Pending {
    what: String,
    before: Vec<Option<(u64, u64)>>,
    since: Instant,
    moved: Vec<Option<Duration>>,
}

/// Records the faults every group has moved past since: a group recovered
/// once it committed more than before the fault, or has nothing left to do.
async fn settle(
    log: &dyn Log,
    pending: &mut Vec<Pending>,
    recoveries: &mut Vec<(String, Duration)>,
) {
    if pending.is_empty() {
        return;
    }
    let now = standings(log).await;
    pending.retain_mut(|p| {
        for (k, (b, n)) in p.before.iter().zip(&now).enumerate() {
            let moved = match (b, n) {
                (_, None) => false,
                (Some(b), Some(n)) => n.0 > b.0 || n.1 == 0,
                (None, Some(n)) => n.1 == 0 || n.0 > 0,
            };
            if moved && p.moved[k].is_none() {
                p.moved[k] = Some(p.since.elapsed());
            }
        }
        if p.moved.iter().all(Option::is_some) {
            let took = p.since.elapsed();
            let each: Vec<String> = GROUPS
                .iter()
                .zip(&p.moved)
                .map(|((g, _), d)| format!("{g} {:.1} s", d.unwrap_or_default().as_secs_f64()))
                .collect();
            eprintln!(
                "chaos: {}: every group moving again after {} ms ({})",
                p.what,
                took.as_millis(),
                each.join(", ")
            );
            recoveries.push((p.what.clone(), took));
            return false;
        }
        true
    });
}

fn services(verb: &str, name: &str) -> Result<()> {
    conformance::services(verb, name)
}

/// `scripts/services.sh` with any arguments.
fn services_script(args: &[&str]) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh");
    let out = Command::new("bash").arg(&script).args(args).output()?;
    ensure!(
        out.status.success(),
        "services.sh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A profile file of `sift dbusa generate` and its enrichment answers, with
/// every handle prefixed so this run's `handles` rows are its own.
fn prefix_handles(dir: &Path, prefix: &str) -> Result<Vec<(String, String)>> {
    let mut handles = Vec::new();
    let profiles = std::fs::read_to_string(dir.join("profiles.jsonl"))?;
    let mut out = String::new();
    for line in profiles.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line)?;
        let handle = format!("{prefix}{}", v["handle"].as_str().context("a handle")?);
        let network = v["network"].as_str().context("a network")?.to_string();
        v["handle"] = handle.clone().into();
        handles.push((network, handle));
        out.push_str(&serde_json::to_string(&v)?);
        out.push('\n');
    }
    std::fs::write(dir.join("profiles.jsonl"), out)?;
    let answers = std::fs::read_to_string(dir.join("enrichment.jsonl"))?;
    let mut out = String::new();
    for line in answers.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line)?;
        let username = format!("{prefix}{}", v["username"].as_str().context("a username")?);
        v["username"] = username.into();
        out.push_str(&serde_json::to_string(&v)?);
        out.push('\n');
    }
    std::fs::write(dir.join("enrichment.jsonl"), out)?;
    Ok(handles)
}

fn env_usize(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_survives_kills_rebalances_and_service_restarts() -> Result<()> {
    let mut addr = BTreeMap::new();
    for var in [
        "SIFT_TEST_KAFKA",
        "SIFT_TEST_S3",
        "SIFT_TEST_HBASE",
        "SIFT_TEST_HBASE_ADMIN",
        "SIFT_TEST_ES",
        "SIFT_TEST_REDIS",
    ] {
        let Some(a) = conformance::service_addr(var) else {
            return Ok(());
        };
        addr.insert(var, a);
    }
    let docs = env_usize("SIFT_CHAOS_DOCS", 20_000);
    let profiles = env_usize("SIFT_CHAOS_PROFILES", 5_000);
    let seed: u64 = std::env::var("SIFT_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    eprintln!(
        "chaos: {docs} documents, {profiles} profiles, seed {seed} (SIFT_CHAOS_SEED={seed} repeats it)"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tag = conformance::unique("chaos")
        .replace('_', "-")
        .to_lowercase();
    let dir = tempfile::TempDir::with_prefix("sift-chaos-")?;
    let keep = std::env::var_os("SIFT_CHAOS_KEEP").is_some_and(|v| v != "0");
    if keep {
        eprintln!(
            "chaos: the run's directory is kept: {}",
            dir.path().display()
        );
    }

    // The fixture web and the sources file of the ingest group.
    let mut sources = String::from("[defaults]\npoll_interval = \"60s\"\n");
    let mut pages = BTreeSet::new();
    for site in 0..SITES {
        let a = start_site(site, tag.clone()).await?;
        sources.push_str(&format!(
            "[[source]]\ntag = \"{tag}-site-{site}\"\nkind = \"sitemap\"\nurls = [\"http://{a}/sitemap.xml\"]\n"
        ));
        for k in 0..PAGES {
            pages.insert(format!("http://{a}/p{k}.html"));
        }
    }
    let sources_path = dir.path().join("sources.toml");
    std::fs::write(&sources_path, sources)?;

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
# default) as that timeout. Every stage here polls every few seconds. (The
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
[table]
backend = "hbase"
[table.hbase]
address = "{hbase}"
admin_address = "{hbase_admin}"
timeout = "10s"
[search]
backend = "elasticsearch"
[search.elasticsearch]
url = "{es}"
timeout = "20s"
[cache]
backend = "redis"
redis_url = "{redis}"
[dbusa]
index = "{tag}-dbusa"
[ingest]
per_host_rate = 0.0
timeout = "5s"
[clean]
near_duplicate_bits = 0
batch_size = 200
[archive]
flush_bytes = 1000000
flush_age = "2s"
[enrich]
rate_per_minute = 600000
pending_wait = "50ms"
"#,
            kafka = addr["SIFT_TEST_KAFKA"],
            s3 = addr["SIFT_TEST_S3"],
            hbase = addr["SIFT_TEST_HBASE"],
            hbase_admin = addr["SIFT_TEST_HBASE_ADMIN"],
            es = addr["SIFT_TEST_ES"],
            redis = addr["SIFT_TEST_REDIS"],
        ),
    )?;
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "sift-test"),
        ("AWS_SECRET_ACCESS_KEY", "sift-test"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    // The test's own view of the same services.
    let config = sift::config::load(&sift::config::Sources {
        file: Some(config_path.clone()),
        file_required: true,
        env: Vec::new(),
        data_dir: Some(dir.path().join("test")),
    })
    .context("the chaos config")?
    .config;
    let log = sift::backends::open_log(&config).await?;
    let objects = sift::backends::open_objects(&config).await?;
    let table = sift::backends::open_table(&config).await?;

    // The consumer database, its profiles, and the enrichment stand-in.
    let enrich_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let run = Run {
        dir: dir.path().to_path_buf(),
        config: config_path,
        sources: sources_path,
        enrich_url: format!("http://127.0.0.1:{enrich_port}"),
    };
    let generated = dir.path().join("dbusa");
    let insiders = profiles * 4 / 5;
    let (outsiders, housemates) = (
        (profiles - insiders) / 2,
        profiles - insiders - (profiles - insiders) / 2,
    );
    run.run_ok(
        &[
            "dbusa",
            "generate",
            "--rows",
            "20000",
            "--profiles",
            &insiders.to_string(),
            "--outsiders",
            &outsiders.to_string(),
            "--housemates",
            &housemates.to_string(),
            "--seed",
            &(seed % 1_000_000).to_string(),
            "--out",
            &generated.to_string_lossy(),
        ],
        "setup",
    )?;
    let short: String = tag.chars().rev().take(8).collect();
    let handles = prefix_handles(&generated, &format!("x{short}_"))?;
    ensure!(
        handles.len() == profiles,
        "{} profiles generated",
        handles.len()
    );
    run.run_ok(
        &[
            "dbusa",
            "load",
            &generated.join("dbusa.csv").to_string_lossy(),
        ],
        "setup",
    )?;
    let mut standin = run
        .sift()
        .args(["enrich", "standin", "--listen"])
        .arg(format!("127.0.0.1:{enrich_port}"))
        .arg("--answers")
        .arg(generated.join("enrichment.jsonl"))
        .args(["--api-key", KEY])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // A model in the registry for the infer instances.
    let t = Instant::now();
    run.run_ok(&["train", "--epochs", "1"], "setup")?;
    eprintln!("chaos: setup model trained in {} s", t.elapsed().as_secs());

    let result = chaos(
        &run,
        &tag,
        log.as_ref(),
        &objects,
        table.as_ref(),
        &pages,
        &generated,
        &handles,
        docs,
        &mut rng,
    )
    .await;
    let _ = standin.kill();
    let _ = standin.wait();
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
    if keep {
        let _ = dir.keep();
    }
    result
}

/// Injects one fault; returns it as pending recovery.
async fn inject(
    fleet: &mut Fleet,
    run: &Run,
    log: &dyn Log,
    what: &str,
    rng: &mut rand::rngs::StdRng,
) -> Result<Pending> {
    let before = standings(log).await;
    let since = Instant::now();
    match what {
        "kill an ingest instance" => fleet.kill_one(run, "ingest", rng)?,
        "kill a clean instance" => fleet.kill_one(run, "clean", rng)?,
        "kill an archive instance" => fleet.kill_one(run, "archive", rng)?,
        "kill an infer instance" => fleet.kill_one(run, "infer", rng)?,
        "kill a match instance" => fleet.kill_one(run, "match", rng)?,
        "add an infer instance" => fleet.add(run, "infer", 3)?,
        "add a clean instance" => fleet.add(run, "clean", 2)?,
        "remove the added infer instance" => fleet.remove("infer", 3)?,
        "remove the added clean instance" => fleet.remove("clean", 2)?,
        "restart the Kafka broker" => {
            services("down", "kafka")?;
            services("up", "kafka")?;
        }
        "kill the HBase Thrift gateway and start it again" => {
            services_script(&["kill", "hbase", "thrift"])?;
            services("up", "hbase")?;
        }
        "restart OpenSearch" => {
            services("down", "opensearch")?;
            services("up", "opensearch")?;
        }
        "restart Redis" => {
            services("down", "redis")?;
            services("up", "redis")?;
        }
        "kill instances of three stages at once" => {
            let mut stages = ["clean", "archive", "infer", "match", "ingest"];
            for k in 0..3 {
                let j = rng.random_range(k..stages.len());
                stages.swap(k, j);
                fleet.kill_one(run, stages[k], rng)?;
            }
        }
        other => bail!("no such fault: {other}"),
    }
    Ok(Pending {
        what: what.to_string(),
        moved: vec![None; before.len()],
        before,
        since,
    })
}

#[allow(clippy::too_many_arguments)]
async fn chaos(
    run: &Run,
    tag: &str,
    log: &dyn Log,
    objects: &Arc<dyn ObjectStore>,
    table: &dyn Table,
    pages: &BTreeSet<String>,
    generated: &Path,
    handles: &[(String, String)],
    docs: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<()> {
    log.create_topic(topics::RAW, 6).await?;
    log.create_topic(topics::PROFILES, 6).await?;
    let mut fleet = Fleet {
        instances: Vec::new(),
        exits: Vec::new(),
    };
    for (stage, count) in [
        ("ingest", 2),
        ("clean", 2),
        ("archive", 2),
        ("infer", 3),
        ("match", 2),
    ] {
        for n in 0..count {
            fleet.add(run, stage, n)?;
        }
    }
    // Faults at seeded moments of the feed (fractions of it), in order.
    let faults = [
        "kill an ingest instance",
        "kill a clean instance",
        "kill an archive instance",
        "kill an infer instance",
        "kill a match instance",
        "add an infer instance",
        "add a clean instance",
        "restart the Kafka broker",
        "kill the HBase Thrift gateway and start it again",
        "restart OpenSearch",
        "restart Redis",
        "remove the added infer instance",
        "remove the added clean instance",
        "kill instances of three stages at once",
    ];
    let chosen: Vec<String> = std::env::var("SIFT_CHAOS_FAULTS")
        .map(|v| v.split(',').map(|f| f.trim().to_string()).collect())
        .unwrap_or_default();
    // Every fault draws its moment, so a subset keeps the moments of a full run.
    let mut at: Vec<(f64, &str)> = faults
        .iter()
        .map(|f| (rng.random_range(0.05..0.95), *f))
        .filter(|(_, f)| chosen.is_empty() || chosen.iter().any(|c| f.starts_with(c.as_str())))
        .collect();
    ensure!(
        !at.is_empty(),
        "SIFT_CHAOS_FAULTS {chosen:?} names none of {faults:?}"
    );
    at.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Additions come before their removals.
    for (add, remove) in [
        ("add an infer instance", "remove the added infer instance"),
        ("add a clean instance", "remove the added clean instance"),
    ] {
        let (Some(a), Some(r)) = (
            at.iter().position(|f| f.1 == add),
            at.iter().position(|f| f.1 == remove),
        ) else {
            continue;
        };
        if r < a {
            let (x, y) = (at[a].1, at[r].1);
            at[r].1 = x;
            at[a].1 = y;
        }
    }
    let mut next_fault = 0;
    let mut recoveries: Vec<(String, Duration)> = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();

    // The profiles, in step with the documents.
    let profile_lines: Vec<String> = std::fs::read_to_string(generated.join("profiles.jsonl"))?
        .lines()
        .map(str::to_string)
        .collect();
    let mut profile_records: Vec<Record> = Vec::new();
    let mut malformed_profiles = BTreeSet::new();
    let bad_profile_every = profile_lines.len() / MALFORMED_PROFILES;
    for (k, line) in profile_lines.iter().enumerate() {
        let p: sift::matching::matcher::ProfileIn = serde_json::from_str(line)?;
        let (network, handle) = p.key();
        profile_records.push(Record::new(
            format!("{network}:{handle}"),
            serde_json::to_vec(&p)?,
        ));
        if bad_profile_every > 0 && k % bad_profile_every == bad_profile_every / 2 {
            let key = format!("malformed-profile-{k}");
            malformed_profiles.insert(key.clone());
            let value = if k % 2 == 0 {
                format!("{{\"network\":\"twitter\",\"handle\":\"cut off at {k}")
            } else {
                "{\"network\":\"\",\"handle\":\"\"}".to_string()
            };
            profile_records.push(Record::new(key, value));
        }
    }

    let mut fed_ids: BTreeSet<String> = BTreeSet::new();
    let mut malformed: BTreeSet<String> = BTreeSet::new();
    let bad_every = docs / MALFORMED_DOCS;
    let batch = 500;
    let steps = docs.div_ceil(batch).max(1);
    let profiles_per_step = profile_records.len().div_ceil(steps);
    let mut profile_chunks = profile_records.chunks(profiles_per_step.max(1));
    let mut i = 0;
    while i < docs {
        let mut records = Vec::new();
        for k in i..(i + batch).min(docs) {
            let env = envelope(k, tag);
            fed_ids.insert(env.id.clone());
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
        produce(log, topics::RAW, records).await?;
        if let Some(chunk) = profile_chunks.next() {
            produce(log, topics::PROFILES, chunk.to_vec()).await?;
        }
        i = (i + batch).min(docs);
        tokio::time::sleep(Duration::from_millis(300)).await;
        fleet.supervise(run)?;
        settle(log, &mut pending, &mut recoveries).await;
        // One fault per step at most, so each one's recovery is its own.
        if next_fault < at.len() && (i as f64) >= at[next_fault].0 * docs as f64 {
            let what = at[next_fault].1;
            next_fault += 1;
            pending.push(inject(&mut fleet, run, log, what, rng).await?);
            eprintln!("chaos: after {i} documents: {what}");
        }
    }
    // The rest of the profiles, if the steps ran out first.
    for chunk in profile_chunks {
        produce(log, topics::PROFILES, chunk.to_vec()).await?;
    }
    // Faults the steps ran out for (a short feed), a few seconds apart.
    for (_, what) in &at[next_fault..] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        fleet.supervise(run)?;
        settle(log, &mut pending, &mut recoveries).await;
        pending.push(inject(&mut fleet, run, log, what, rng).await?);
        eprintln!("chaos: after the feed: {what}");
    }

    // Everything fed: every page ingested, every group at lag 0.
    let fed = Instant::now();
    let deadline = fed + Duration::from_secs(900);
    let ingest_prefix = format!("{tag}-site-");
    loop {
        fleet.supervise(run)?;
        settle(log, &mut pending, &mut recoveries).await;
        let now = standings(log).await;
        let idle = now.iter().all(|s| s.is_some_and(|s| s.1 == 0));
        if idle {
            let raw = conformance::log::read_all(log, topics::RAW).await?;
            let ingested: BTreeSet<String> = raw
                .iter()
                .filter_map(|m| serde_json::from_slice::<Envelope>(&m.value).ok())
                .filter(|e| e.source.starts_with(&ingest_prefix))
                .map(|e| e.url)
                .collect();
            if &ingested == pages && pending.is_empty() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "after 900 s: {} of {} pages ingested; faults not recovered from: {:?}",
                ingested.intersection(pages).count(),
                pages.len(),
                pending.iter().map(|p| &p.what).collect::<Vec<_>>()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "lag after 900 s: {:?}",
            GROUPS.iter().zip(&now).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "chaos: every page ingested and lag 0 in every group {} ms after the last record",
        fed.elapsed().as_millis()
    );
    fleet.stop_all()?;

    // What sift.raw holds: the valid envelopes, counted by id.
    let raw = conformance::log::read_all(log, topics::RAW).await?;
    let mut raw_ids: BTreeMap<String, u32> = BTreeMap::new();
    for m in &raw {
        if let Ok(env) = serde_json::from_slice::<Envelope>(&m.value) {
            *raw_ids.entry(env.id).or_default() += 1;
        }
    }
    let ids: BTreeSet<String> = raw_ids.keys().cloned().collect();
    ensure!(
        fed_ids.is_subset(&ids) && ids.len() == fed_ids.len() + pages.len(),
        "sift.raw: {} documents, {} fed and {} pages",
        ids.len(),
        fed_ids.len(),
        pages.len()
    );

    // Every document cleaned (at least once: a killed member's last batch
    // may be produced twice).
    let cleaned = conformance::log::read_all(log, topics::CLEAN).await?;
    let cleaned_ids: BTreeSet<String> = cleaned
        .iter()
        .filter_map(|m| serde_json::from_slice::<Envelope>(&m.value).ok())
        .map(|e| e.id)
        .collect();
    ensure!(
        cleaned_ids == ids,
        "clean: {} of {} documents, {} unexpected",
        ids.intersection(&cleaned_ids).count(),
        ids.len(),
        cleaned_ids.difference(&ids).count()
    );

    // Every document scored into `documents`, with its `c` family.
    let mut scored: BTreeSet<String> = BTreeSet::new();
    for id in &ids {
        let row = table
            .get(
                sift::documents::TABLE,
                id.as_bytes(),
                Some(&[sift::documents::CATEGORIES.to_string()]),
            )
            .await?;
        if row
            .as_ref()
            .and_then(|r| {
                r.get(
                    sift::documents::CATEGORIES,
                    sift::documents::categories::TOP5.as_bytes(),
                )
            })
            .is_some()
        {
            scored.insert(id.clone());
        }
    }
    ensure!(
        scored.len() == ids.len(),
        "documents: {} of {} rows have their categories",
        scored.len(),
        ids.len()
    );

    // The archive: each record of sift.raw in exactly one part.
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
    if archived != raw_ids {
        let extra: Vec<_> = archived
            .iter()
            .filter(|(id, n)| raw_ids.get(*id) < Some(n))
            .take(5)
            .collect();
        let short: Vec<_> = raw_ids
            .iter()
            .filter(|(id, n)| archived.get(*id) < Some(n))
            .take(5)
            .collect();
        bail!(
            "archive: {} ids in {parts} parts against {} in sift.raw; more often than in the log: {extra:?}; less often: {short:?}",
            archived.len(),
            raw_ids.len()
        );
    }

    // Every profile has its `handles` row.
    let mut decided = 0;
    let networks: BTreeSet<&str> = handles.iter().map(|(n, _)| n.as_str()).collect();
    let mut rows: BTreeSet<String> = BTreeSet::new();
    let prefix_of = |h: &str| h.split('_').next().unwrap_or_default().to_string() + "_";
    let handle_prefix = prefix_of(&handles[0].1);
    for network in networks {
        let prefix = format!("{network}:{handle_prefix}");
        let found = table
            .scan(
                sift::matching::sink::HANDLES,
                &Scan {
                    prefix: Some(Bytes::from(prefix.into_bytes())),
                    ..Scan::default()
                },
            )
            .await?;
        for r in found {
            rows.insert(String::from_utf8_lossy(&r.key).into_owned());
        }
    }
    for (network, handle) in handles {
        if rows.contains(&sift::matching::sink::handle_row(
            network,
            &handle.to_lowercase(),
        )) {
            decided += 1;
        }
    }
    ensure!(
        decided == handles.len(),
        "handles: {decided} of {} profiles have their row",
        handles.len()
    );

    // Dead letters: exactly the malformed inputs, from each stage that read them.
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
    for (stage, want) in [
        ("clean", &malformed),
        ("archive", &malformed),
        ("match", &malformed_profiles),
    ] {
        let got = by_stage.remove(stage).unwrap_or_default();
        if &got != want {
            bail!("{stage}: dead letters {got:?}, malformed {want:?}");
        }
    }
    ensure!(
        by_stage.is_empty(),
        "dead letters from elsewhere: {by_stage:?}"
    );
    ensure!(
        pending.is_empty(),
        "never recovered from: {:?}",
        pending.iter().map(|p| &p.what).collect::<Vec<_>>()
    );
    eprintln!(
        "chaos: {} documents ({} fed, {} ingested) and {} malformed; {} profiles and {} malformed; \
         {} cleaned records; {parts} archive parts; daemons that exited on their own: {:?}",
        ids.len(),
        fed_ids.len(),
        pages.len(),
        malformed.len(),
        handles.len(),
        malformed_profiles.len(),
        cleaned.len(),
        fleet.exits
    );
    eprintln!(
        "chaos: recoveries: {}",
        recoveries
            .iter()
            .map(|(w, d)| format!("{w} {} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
