//! `sift bench scale`: how each stage's throughput grows with instances.
//!
//! For every stage asked (ingest, clean, archive, infer, match) and every
//! instance count (1, 2 and 4 by default), a trial:
//!
//! 1. gets a topic and group namespace of its own (`log.topic_prefix`; the
//!    archive also a prefix of its own), so no trial sees another's records
//!    or commits, and its input topic gets `--partitions` partitions;
//! 2. has its whole input written first: generated documents on `sift.raw`
//!    (clean, archive) or `sift.clean` (infer), generated profiles on
//!    `sift.profiles` (match, with handles of its own so no cache answers
//!    for them), or, for ingest, the bundled sample web served on loopback
//!    with what earlier trials fetched from it forgotten;
//! 3. starts that many `sift <stage>` processes of this binary, with the
//!    same configuration, and waits until the group has committed the whole
//!    input (ingest: until every served page is on `sift.raw`).
//!
//! Each trial reports items/s from starting the instances to the last item
//! done (how long the start-up took, loading the model and joining the
//! group, is reported too, as the time to the first item), the CPU the instances used (user + system, from
//! `/proc/PID/stat`, in cores), and how busy the whole machine was
//! (`/proc/stat`, services included). A stage whose one instance already
//! keeps the machine busy is CPU-bound here; one whose instances use little
//! CPU while the machine idles is waiting: on the log, the table, the search
//! index, the enrichment API, or a site's politeness.
//!
//! Each instance's log (`RUST_LOG` from `SIFT_BENCH_INSTANCE_LOG`, default
//! `warn`) is kept beside the trial and its last lines printed if it fails.
//!
//! Meant for the real services (`scripts/services-config.sh`): the embedded
//! backends belong to one process, so more instances cannot share them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use serde::Serialize;

use crate::backends::log::{Log, Record};
use crate::backends::table::Delete;
use crate::config::{Config, LogBackend};
use crate::envelope::{self, topics, Envelope, SCHEMA_VERSION};

/// The archive flushes a partition at this size or 2 s of age in the
/// bench, not at its 64 MiB and 5 minutes: a trial's few thousand documents
/// would otherwise wait minutes for their first flush.
const ARCHIVE_FLUSH_BYTES: u64 = 4 * 1024 * 1024;

/// `sift bench scale`.
#[derive(Debug, Clone, Args)]
pub struct ScaleBenchArgs {
    /// Instance counts to measure, each stage at each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub instances: Vec<usize>,
    /// Stages to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ingest,clean,archive,infer,match"
    )]
    pub stages: Vec<String>,
    /// Documents written for infer.
    #[arg(long, default_value_t = 6_000)]
    pub documents: usize,
    /// Documents written for clean and archive, which are many times faster
    /// than infer: enough that start-up is a small share of a trial.
    #[arg(long, default_value_t = 40_000)]
    pub bulk_documents: usize,
    /// Profiles written for match.
    #[arg(long, default_value_t = 2_000)]
    pub profiles: usize,
    /// People in the consumer database match searches.
    #[arg(long, default_value_t = 20_000)]
    pub people: u64,
    /// Sites of the sample web ingest fetches (the bundled sample spread over them).
    #[arg(long, default_value_t = 60)]
    pub sites: usize,
    /// Partitions of each trial's input topic; at least the most instances.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Longest a trial may take.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub trial_timeout: Duration,
    /// Write the results as JSON here too.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Keep the bench's directory (`{data_dir}/bench-scale-…`: the
    /// configuration and every instance's log) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

/// One trial's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    /// Stage.
    pub stage: String,
    /// Instances.
    pub instances: usize,
    /// Items of input (documents, pages or profiles).
    pub items: u64,
    /// Seconds from starting the instances to the first item done (part of `seconds`).
    pub startup_seconds: f64,
    /// Seconds from starting the instances to the last item done.
    pub seconds: f64,
    /// Items per second over those seconds.
    pub per_second: f64,
    /// per_second over the same stage's with the fewest instances.
    pub speedup: f64,
    /// CPU the instances used over the whole trial, in cores (CPU seconds / wall seconds).
    pub instance_cores: f64,
    /// Share of the machine's CPU time busy over the trial, services included (0 to 1).
    pub machine_busy: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// sift's version.
    pub version: String,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Logical CPUs.
    pub cpus: usize,
    /// Backends, by role.
    pub backends: BTreeMap<String, String>,
    /// Partitions of each input topic.
    pub partitions: u32,
    /// The trials.
    pub trials: Vec<Trial>,
}

/// What a running trial's instances share.
struct Bench {
    exe: PathBuf,
    config_file: PathBuf,
    dir: PathBuf,
    stamp: String,
    /// Environment every instance gets (enrichment URL and key, index name).
    env: Vec<(String, String)>,
}

/// Runs `sift bench scale`.
pub async fn main(config: &Config, args: ScaleBenchArgs) -> crate::Result<()> {
    if config.log.backend == LogBackend::Embedded {
        return Err(crate::Error::Invalid(
            "sift bench scale runs several sift processes on one log, which the embedded log \
             cannot share: run it with the real services (scripts/services.sh up, then \
             --config from scripts/services-config.sh)"
                .into(),
        ));
    }
    let most = args.instances.iter().copied().max().unwrap_or(1);
    if args.instances.is_empty() || args.instances.contains(&0) {
        return Err(crate::Error::Invalid(
            "--instances needs counts of 1 or more".into(),
        ));
    }
    if (args.partitions as usize) < most {
        return Err(crate::Error::Invalid(format!(
            "--partitions {} is fewer than the {most} instances asked for: members beyond the \
             partitions would sit idle",
            args.partitions
        )));
    }
    for s in &args.stages {
        if !["ingest", "clean", "archive", "infer", "match"].contains(&s.as_str()) {
            return Err(crate::Error::Invalid(format!(
                "unknown stage `{s}` (ingest, clean, archive, infer, match)"
            )));
        }
    }
    let stamp = format!("{:x}", crate::now_ms());
    let dir = config.data_dir.join(format!("bench-scale-{stamp}"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| crate::Error::io("creating the bench directory", e))?;
    let config_file = dir.join("sift.toml");
    let text = toml::to_string(config)
        .map_err(|e| crate::Error::Invalid(format!("cannot write the configuration: {e}")))?;
    std::fs::write(&config_file, text)
        .map_err(|e| crate::Error::io("writing the configuration", e))?;
    let mut bench = Bench {
        exe: std::env::current_exe().map_err(|e| crate::Error::io("finding the sift binary", e))?,
        config_file,
        dir: dir.clone(),
        stamp,
        env: Vec::new(),
    };
    let result = run_all(config, &args, &mut bench).await;
    if args.keep {
        eprintln!("bench scale: kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = result?;
    print_table(&report);
    if let Some(path) = &args.output {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| crate::Error::Invalid(format!("cannot encode the report: {e}")))?;
        std::fs::write(path, json).map_err(|e| crate::Error::io("writing the report", e))?;
    }
    Ok(())
}

async fn run_all(
    config: &Config,
    args: &ScaleBenchArgs,
    bench: &mut Bench,
) -> crate::Result<ScaleReport> {
    let wants = |s: &str| args.stages.iter().any(|x| x == s);
    // What the stages need before any trial: a model, a consumer database
    // and the enrichment stand-in, the sample web.
    if wants("infer") {
        ensure_model(config, bench).await?;
    }
    let mut standin: Option<Child> = None;
    let mut profiles: Vec<serde_json::Value> = Vec::new();
    if wants("match") {
        let (child, generated) = prepare_matching(args, bench)?;
        standin = Some(child);
        profiles = generated;
    }
    let mut web = None;
    if wants("ingest") {
        let docs = crate::sample::bundled()?;
        let served = crate::run::web::SampleWeb::start(
            &docs,
            &crate::run::web::WebOptions {
                sites: args.sites,
                port: 0,
                broken: false,
            },
        )
        .await?;
        let sources = bench.dir.join("sources.toml");
        std::fs::write(&sources, served.sources_toml())
            .map_err(|e| crate::Error::io("writing the sources file", e))?;
        web = Some((served, sources));
    }
    let mut trials = Vec::new();
    let outcome: crate::Result<()> = async {
        for stage in &args.stages {
            let mut base: Option<f64> = None;
            for &n in &args.instances {
                let mut t = match stage.as_str() {
                    "ingest" => {
                        let (served, sources) = web.as_ref().ok_or_else(|| {
                            crate::Error::Invalid("the sample web did not start".into())
                        })?;
                        trial_ingest(config, args, bench, served, sources, n).await?
                    }
                    "match" => trial_match(config, args, bench, &profiles, n).await?,
                    other => trial_documents(config, args, bench, other, n).await?,
                };
                let b = *base.get_or_insert(t.per_second);
                t.speedup = if b > 0.0 { t.per_second / b } else { 0.0 };
                eprintln!(
                    "bench scale: {} × {}: {:.1} items/s ({} items in {:.1} s, the first after {:.1} s), \
                     instances {:.2} cores, machine {:.0}% busy",
                    t.stage,
                    t.instances,
                    t.per_second,
                    t.items,
                    t.seconds,
                    t.startup_seconds,
                    t.instance_cores,
                    t.machine_busy * 100.0
                );
                trials.push(t);
            }
        }
        Ok(())
    }
    .await;
    if let Some(mut c) = standin {
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some((served, _)) = web {
        served.stop().await;
    }
    outcome?;
    let backends = BTreeMap::from([
        (
            "log".to_string(),
            format!("{:?}", config.log.backend).to_lowercase(),
        ),
        (
            "objects".to_string(),
            format!("{:?}", config.objects.backend).to_lowercase(),
        ),
        (
            "table".to_string(),
            format!("{:?}", config.table.backend).to_lowercase(),
        ),
        (
            "search".to_string(),
            format!("{:?}", config.search.backend).to_lowercase(),
        ),
        (
            "cache".to_string(),
            format!("{:?}", config.cache.backend).to_lowercase(),
        ),
    ]);
    Ok(ScaleReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        at_ms: crate::now_ms(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        backends,
        partitions: args.partitions,
        trials,
    })
}

/// The configuration one trial's processes see: their own topics, groups
/// and archive prefix.
fn trial_config(config: &Config, bench: &Bench, stage: &str, n: usize) -> Config {
    // A trial number too, so a count asked for twice gets a fresh namespace.
    static TRIALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let t = TRIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut c = config.clone();
    c.log.topic_prefix = format!(
        "{}bench-scale-{}-{t}-{stage}-{n}.",
        config.log.topic_prefix, bench.stamp
    );
    c.archive.prefix = format!("bench-scale/{}/{t}-{stage}-{n}", bench.stamp);
    c
}

/// Trains a model into the registry unless it has one.
async fn ensure_model(config: &Config, bench: &Bench) -> crate::Result<()> {
    let store = crate::backends::open_objects(config).await?;
    let latest = format!("{}/LATEST", config.train.prefix.trim_end_matches('/'));
    if store.head(&latest).await?.is_some() {
        return Ok(());
    }
    eprintln!("bench scale: the registry has no model; training one (1 epoch) for infer");
    run_ok(bench, &["train", "--epochs", "1"])
}

/// Runs this binary to completion with the bench's configuration.
fn run_ok(bench: &Bench, args: &[&str]) -> crate::Result<()> {
    let out = Command::new(&bench.exe)
        .arg("--config")
        .arg(&bench.config_file)
        .args(args)
        .envs(bench.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .output()
        .map_err(|e| crate::Error::io(format!("running sift {}", args.join(" ")), e))?;
    if !out.status.success() {
        return Err(crate::Error::Invalid(format!(
            "sift {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Generates the consumer database and its profiles, loads the database
/// into an index of the bench's own, and starts the enrichment stand-in with
/// answers for every trial's handles. Returns the stand-in and the profiles.
fn prepare_matching(
    args: &ScaleBenchArgs,
    bench: &mut Bench,
) -> crate::Result<(Child, Vec<serde_json::Value>)> {
    let out = bench.dir.join("dbusa");
    let insiders = args.profiles * 4 / 5;
    let outsiders = args.profiles - insiders;
    run_ok(
        bench,
        &[
            "dbusa",
            "generate",
            "--rows",
            &args.people.to_string(),
            "--profiles",
            &insiders.to_string(),
            "--outsiders",
            &(outsiders / 2).to_string(),
            "--housemates",
            &(outsiders - outsiders / 2).to_string(),
            "--out",
            &out.to_string_lossy(),
        ],
    )?;
    let index = format!("bench-scale-{}", bench.stamp);
    bench
        .env
        .push(("SIFT__DBUSA__INDEX".to_string(), index.clone()));
    run_ok(
        bench,
        &["dbusa", "load", &out.join("dbusa.csv").to_string_lossy()],
    )?;
    let read = |name: &str| -> crate::Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(out.join(name))
            .map_err(|e| crate::Error::io(format!("reading {name}"), e))?;
        text.lines()
            .map(|l| {
                serde_json::from_str(l).map_err(|e| crate::Error::Invalid(format!("{name}: {e}")))
            })
            .collect()
    };
    let profiles = read("profiles.jsonl")?;
    let answers = read("enrichment.jsonl")?;
    // One copy of the answers per trial, under that trial's handle prefix.
    let mut all = String::new();
    for &n in &args.instances {
        for a in &answers {
            let mut a = a.clone();
            let user = a["username"].as_str().unwrap_or_default().to_string();
            a["username"] = handle_for(bench, n, &user).into();
            all.push_str(&a.to_string());
            all.push('\n');
        }
    }
    let answers_file = bench.dir.join("answers.jsonl");
    std::fs::write(&answers_file, all).map_err(|e| crate::Error::io("writing the answers", e))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| crate::Error::io("finding a free port", e))?
        .port();
    let key = format!("bench-{}", bench.stamp);
    let child = Command::new(&bench.exe)
        .args(["enrich", "standin", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--answers")
        .arg(&answers_file)
        .args(["--api-key", &key])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| crate::Error::io("starting the enrichment stand-in", e))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(crate::Error::Invalid(
                "the enrichment stand-in did not start".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bench.env.push((
        "SIFT__ENRICH__URL".to_string(),
        format!("http://127.0.0.1:{port}"),
    ));
    bench.env.push(("SIFT__ENRICH__API_KEY".to_string(), key));
    bench.env.push((
        "SIFT__ENRICH__RATE_PER_MINUTE".to_string(),
        "600000".to_string(),
    ));
    Ok((child, profiles))
}

/// A trial's own spelling of a handle, so neither the cache nor the
/// `handles` table knows it from another trial.
fn handle_for(bench: &Bench, n: usize, handle: &str) -> String {
    format!("s{}n{n}_{handle}", bench.stamp)
}

/// A generated document: the text of two documents of the bundled sample,
/// so every one differs and their lengths are real ones.
fn document(i: usize, sample: &[crate::sample::LabeledDoc], stamp: &str) -> Envelope {
    let a = &sample[i % sample.len()];
    let b = &sample[(i * 7 + 3) % sample.len()];
    let source = format!("bench-{}", i % 12);
    let url = format!("https://bench.example/{stamp}/{i}");
    Envelope {
        v: SCHEMA_VERSION,
        id: envelope::document_id(&source, &url),
        source,
        url,
        fetched_at_ms: crate::now_ms(),
        content_type: "text/html".into(),
        title: a.title.clone(),
        text: Some(format!("{}\n\n{}", a.text, b.text)),
        body_uri: None,
        metadata: Default::default(),
    }
}

/// Writes records to a trial's topic in chunks.
async fn produce_all(log: &dyn Log, topic: &str, records: Vec<Record>) -> crate::Result<()> {
    for chunk in records.chunks(1000) {
        log.produce(topic, chunk.to_vec()).await?;
    }
    Ok(())
}

/// A clean, archive or infer trial: documents on its input topic, then
/// `n` instances until their group has committed them all.
async fn trial_documents(
    config: &Config,
    args: &ScaleBenchArgs,
    bench: &Bench,
    stage: &str,
    n: usize,
) -> crate::Result<Trial> {
    let c = trial_config(config, bench, stage, n);
    let log = crate::backends::open_log(&c).await?;
    let (input, group) = match stage {
        "clean" => (topics::RAW, c.clean.group.clone()),
        "archive" => (topics::RAW, c.archive.group.clone()),
        _ => (topics::CLEAN, c.infer.group.clone()),
    };
    log.create_topic(input, args.partitions).await?;
    let sample = crate::sample::bundled()?;
    let count = if stage == "infer" {
        args.documents
    } else {
        args.bulk_documents
    };
    let records: Vec<Record> = (0..count)
        .map(|i| {
            let env = document(i, &sample, &format!("{}-{stage}-{n}", bench.stamp));
            Record {
                key: Some(Bytes::from(env.id.clone())),
                value: Bytes::from(serde_json::to_vec(&env).unwrap_or_default()),
                headers: env.raw_headers(),
            }
        })
        .collect();
    produce_all(log.as_ref(), input, records).await?;
    let target = count as u64;
    run_trial(bench, &c, stage, n, args.trial_timeout, target, || {
        committed(log.clone(), group.clone(), input)
    })
    .await
}

/// A match trial: the profiles, under the trial's handles, on `sift.profiles`.
async fn trial_match(
    config: &Config,
    args: &ScaleBenchArgs,
    bench: &Bench,
    profiles: &[serde_json::Value],
    n: usize,
) -> crate::Result<Trial> {
    let c = trial_config(config, bench, "match", n);
    let log = crate::backends::open_log(&c).await?;
    log.create_topic(topics::PROFILES, args.partitions).await?;
    let mut records = Vec::with_capacity(profiles.len());
    for p in profiles {
        let mut p = p.clone();
        let handle = handle_for(bench, n, p["handle"].as_str().unwrap_or_default());
        let network = p["network"].as_str().unwrap_or_default().to_string();
        p["handle"] = handle.clone().into();
        records.push(Record::new(format!("{network}:{handle}"), p.to_string()));
    }
    let target = records.len() as u64;
    produce_all(log.as_ref(), topics::PROFILES, records).await?;
    let group = c.matching.group.clone();
    run_trial(bench, &c, "match", n, args.trial_timeout, target, || {
        committed(log.clone(), group.clone(), topics::PROFILES)
    })
    .await
}

/// An ingest trial: the sample web, forgotten by earlier trials, fetched by
/// `n` members of the ingest group until every served page is on `sift.raw`.
async fn trial_ingest(
    config: &Config,
    args: &ScaleBenchArgs,
    bench: &Bench,
    served: &crate::run::web::SampleWeb,
    sources: &Path,
    n: usize,
) -> crate::Result<Trial> {
    let c = trial_config(config, bench, "ingest", n);
    let log = crate::backends::open_log(&c).await?;
    let objects = crate::backends::open_objects(&c).await?;
    let table = crate::backends::open_table(&c).await?;
    // What earlier trials fetched, and when they visited each source.
    let ingest = crate::ingest::Ingest::new(log.clone(), objects, table.clone(), &c).await?;
    ingest.forget(&crate::run::web::url_prefixes()).await?;
    let text = std::fs::read_to_string(sources)
        .map_err(|e| crate::Error::io("reading the sources file", e))?;
    let parsed = crate::ingest::sources::parse(&text, sources)
        .map_err(|e| crate::Error::Invalid(e.to_string()))?;
    for s in &parsed {
        table
            .delete(
                crate::ingest::STATE_TABLE,
                format!("v/{}", s.tag).as_bytes(),
                Delete::Row,
            )
            .await?;
    }
    log.create_topic(topics::SOURCES, args.partitions).await?;
    log.create_topic(topics::RAW, args.partitions).await?;
    let target = served.served().len() as u64;
    let mut with_sources = bench.env.clone();
    with_sources.push((
        "SIFT_SOURCES".into(),
        sources.to_string_lossy().into_owned(),
    ));
    let b = Bench {
        exe: bench.exe.clone(),
        config_file: bench.config_file.clone(),
        dir: bench.dir.clone(),
        stamp: bench.stamp.clone(),
        env: with_sources,
    };
    run_trial(&b, &c, "ingest", n, args.trial_timeout, target, || {
        produced(log.clone(), topics::RAW)
    })
    .await
}

/// Records a group has committed on `topic`, summed over partitions.
async fn committed(log: Arc<dyn Log>, group: String, topic: &'static str) -> crate::Result<u64> {
    let marks = log.watermarks(topic).await?;
    let commits = log.committed(&group, topic).await?;
    let mut done = 0;
    for w in &marks {
        if let Some(c) = commits
            .iter()
            .find(|(p, _)| *p == w.partition)
            .and_then(|(_, c)| c.as_ref())
        {
            done += log.count(topic, w.partition, &w.low, c).await?;
        }
    }
    Ok(done)
}

/// Records on `topic`, summed over partitions.
async fn produced(log: Arc<dyn Log>, topic: &'static str) -> crate::Result<u64> {
    let mut n = 0;
    for w in log.watermarks(topic).await? {
        n += log.count(topic, w.partition, &w.low, &w.high).await?;
    }
    Ok(n)
}

/// Starts `n` instances of `stage`, waits until `done()` reaches `target`,
/// stops them, and measures.
async fn run_trial<F, Fut>(
    bench: &Bench,
    c: &Config,
    stage: &str,
    n: usize,
    timeout: Duration,
    target: u64,
    mut done: F,
) -> crate::Result<Trial>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<u64>>,
{
    let machine_before = machine_ticks();
    let started = Instant::now();
    let mut children = Vec::with_capacity(n);
    for k in 0..n {
        let data = bench.dir.join(format!("{stage}-{n}-{k}"));
        let log_path = bench.dir.join(format!("{stage}-{n}-{k}.log"));
        let log_file = std::fs::File::create(&log_path)
            .map_err(|e| crate::Error::io("creating an instance's log", e))?;
        let child = Command::new(&bench.exe)
            .arg("--config")
            .arg(&bench.config_file)
            .arg("--data-dir")
            .arg(&data)
            .arg(stage)
            .envs(bench.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("SIFT__LOG__TOPIC_PREFIX", &c.log.topic_prefix)
            .env("SIFT__ARCHIVE__PREFIX", &c.archive.prefix)
            .env(
                "SIFT__ARCHIVE__FLUSH_BYTES",
                ARCHIVE_FLUSH_BYTES.to_string(),
            )
            .env("SIFT__ARCHIVE__FLUSH_AGE", "2s")
            .env("SIFT__TELEMETRY__METRICS_ADDR", "")
            .env(
                "RUST_LOG",
                std::env::var("SIFT_BENCH_INSTANCE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| crate::Error::io(format!("starting sift {stage}"), e))?;
        children.push(child);
    }
    let mut first: Option<Instant> = None;
    let mut cpu: BTreeMap<u32, f64> = BTreeMap::new();
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for ch in &children {
            let s = super::e2e::cpu_seconds_of(&format!("/proc/{}/stat", ch.id()));
            if s > 0.0 {
                cpu.insert(ch.id(), s);
            }
        }
        if let Some(ch) = children.iter_mut().find_map(|ch| match ch.try_wait() {
            Ok(Some(status)) => Some(status),
            _ => None,
        }) {
            break Err(crate::Error::Invalid(format!(
                "a sift {stage} instance exited ({ch}) during the trial"
            )));
        }
        let now = match done().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "Could not read the trial's progress; trying again.");
                continue;
            }
        };
        if now > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if now >= target {
            break Ok(());
        }
        if started.elapsed() > timeout {
            break Err(crate::Error::Invalid(format!(
                "{stage} × {n}: {now} of {target} items after {} s",
                timeout.as_secs()
            )));
        }
    };
    let ended = Instant::now();
    let machine_after = machine_ticks();
    for ch in &mut children {
        let _ = Command::new("kill")
            .args(["-TERM", &ch.id().to_string()])
            .status();
    }
    for ch in &mut children {
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(ch.try_wait(), Ok(None)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = ch.kill();
        let _ = ch.wait();
    }
    if let Err(e) = outcome {
        let mut tails = String::new();
        for k in 0..n {
            let text = std::fs::read_to_string(bench.dir.join(format!("{stage}-{n}-{k}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("CONFWARN"))
                .rev()
                .take(6)
                .collect();
            tails.push_str(&format!(
                "\n--- {stage} instance {k}:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        return Err(crate::Error::Invalid(format!("{e}{tails}")));
    }
    let wall = ended.duration_since(started).as_secs_f64();
    let first = first.unwrap_or(started);
    let machine_busy = match (machine_before, machine_after) {
        (Some((busy0, all0)), Some((busy1, all1))) if all1 > all0 => {
            (busy1 - busy0) as f64 / (all1 - all0) as f64
        }
        _ => 0.0,
    };
    Ok(Trial {
        stage: stage.to_string(),
        instances: n,
        items: target,
        startup_seconds: first.duration_since(started).as_secs_f64(),
        seconds: wall,
        per_second: target as f64 / wall.max(1e-3),
        speedup: 1.0,
        instance_cores: cpu.values().sum::<f64>() / wall.max(1e-3),
        machine_busy,
    })
}

/// (busy, total) jiffies of all CPUs from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

fn print_table(r: &ScaleReport) {
    println!(
        "sift bench scale: {} CPUs, {} partitions per input topic, backends {:?}",
        r.cpus, r.partitions, r.backends
    );
    println!(
        "{:<8} {:>9} {:>7} {:>10} {:>8} {:>10} {:>8} {:>9}",
        "stage", "instances", "items", "items/s", "speedup", "start-up s", "cores", "machine"
    );
    for t in &r.trials {
        println!(
            "{:<8} {:>9} {:>7} {:>10.1} {:>7.2}× {:>10.1} {:>8.2} {:>8.0}%",
            t.stage,
            t.instances,
            t.items,
            t.per_second,
            t.speedup,
            t.startup_seconds,
            t.instance_cores,
            t.machine_busy * 100.0
        );
    }
}
