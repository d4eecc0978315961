//! `sift bench e2e`: a fixed workload through every stage of `sift run`, on
//! the configured backends (embedded by default) in a fresh data directory.
//!
//! Two phases, because one number cannot be both a stage's capacity and the
//! pipeline's latency:
//!
//! 1. **Throughput**: the stages one after another, each draining its whole
//!    input (ingest over the sample web, clean, archive, train, infer,
//!    consumer database load, match, cache refresh). Each gets its items/s,
//!    its wall time, the process CPU seconds it used (user + system, from
//!    `/proc/self/stat`) and the peak resident memory while it ran
//!    (`VmHWM` of `/proc/self/status`, reset before each stage through
//!    `/proc/self/clear_refs`).
//! 2. **Latency**: the web fetched again with ingest, clean and infer
//!    running together as daemons do; for every document, the time from its
//!    fetch (`m:fetched_at_ms`) to its scored row (`c:scored_at_ms`, stamped
//!    when the model returns, in the same write batch as the row). The whole
//!    web arrives as one burst, so the figures include the queueing a burst
//!    causes.
//!
//! On persistent backends every run measures the same work: it first
//! forgets what earlier runs fetched from the sample web and empties the
//! enrichment cache, and at the end lets the archive group take the records
//! phase 2 put on `sift.raw`.
//!
//! The table goes to stdout; `--output FILE` writes the same as JSON with the
//! machine and the workload, for comparing runs over time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;

use crate::backends::table::scan_pages;
use crate::config::Config;
use crate::daemon::Until;
use crate::documents;
use crate::envelope::topics;
use crate::run::stages::{self, Done, Shared, WorldArgs};
use crate::run::web;

/// `sift bench e2e`.
#[derive(Debug, Clone, Args)]
pub struct E2eBenchArgs {
    /// Sites of the sample web.
    #[arg(long, default_value_t = 120)]
    pub sites: usize,
    /// Documents of the sample's web share to serve (0 = all).
    #[arg(long, default_value_t = 0)]
    pub documents: usize,
    /// People in the generated consumer database.
    #[arg(long, default_value_t = 100_000)]
    pub people: u64,
    /// Profiles of people in the database.
    #[arg(long, default_value_t = 5_000)]
    pub profiles: u64,
    /// Profiles of people not in it.
    #[arg(long, default_value_t = 1_000)]
    pub outsiders: u64,
    /// Training epochs (default: the preset's).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Write the results as JSON here too.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Keep the benchmark's data directory (`{data_dir}/bench-e2e-…`) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

/// One stage's figures.
#[derive(Debug, Clone, Serialize)]
pub struct StageFigures {
    /// Stage.
    pub stage: String,
    /// What it counts (documents, rows, profiles, …).
    pub unit: String,
    /// Items it handled.
    pub items: u64,
    /// Wall seconds.
    pub seconds: f64,
    /// items / seconds.
    pub per_second: f64,
    /// Process CPU seconds (user + system) while it ran.
    pub cpu_seconds: f64,
    /// Peak resident memory while it ran, bytes (None where the OS does not say).
    pub peak_rss_bytes: Option<u64>,
}

/// Fetch-to-row latency of the pipelined phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Documents measured.
    pub documents: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// Wall seconds of the phase (fetch of the first to row of the last).
    pub seconds: f64,
    /// documents / seconds.
    pub per_second: f64,
    /// Peak resident memory during the phase, bytes.
    pub peak_rss_bytes: Option<u64>,
}

/// Everything a run of the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    /// sift's version.
    pub version: String,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Logical CPUs.
    pub cpus: usize,
    /// Backends, by role.
    pub backends: std::collections::BTreeMap<String, String>,
    /// The workload.
    pub workload: Workload,
    /// Phase 1.
    pub stages: Vec<StageFigures>,
    /// Phase 2.
    pub latency: Latency,
    /// Peak resident memory of the whole run, bytes.
    pub peak_rss_bytes: Option<u64>,
    /// CPU seconds of the whole run.
    pub cpu_seconds: f64,
    /// Wall seconds of the whole run.
    pub seconds: f64,
}

/// What went through.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Sites.
    pub sites: usize,
    /// Labeled documents served.
    pub documents: u64,
    /// People in the database.
    pub people: u64,
    /// Profiles (insiders + outsiders).
    pub profiles: u64,
    /// Training documents.
    pub train_documents: u64,
    /// Epochs trained.
    pub epochs: usize,
}

/// Process CPU seconds so far (user + system), from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    cpu_seconds_of("/proc/self/stat")
}

/// CPU seconds (user + system) of the process whose `/proc/PID/stat` is at
/// `path`; 0 where it cannot be read (the process is gone, or not Linux).
pub(crate) fn cpu_seconds_of(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after ")".
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // The kernel's USER_HZ is 100 on every Linux architecture sift builds for.
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident memory (`VmHWM`), bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak to the current resident memory (Linux 4.0 and later).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Times one stage.
struct Meter {
    started: Instant,
    cpu: f64,
}

impl Meter {
    fn start() -> Self {
        reset_peak_rss();
        Meter {
            started: Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    fn stop(self, stage: &str, unit: &str, items: u64) -> StageFigures {
        let seconds = self.started.elapsed().as_secs_f64();
        let figures = StageFigures {
            stage: stage.into(),
            unit: unit.into(),
            items,
            seconds,
            per_second: items as f64 / seconds.max(1e-9),
            cpu_seconds: cpu_seconds() - self.cpu,
            peak_rss_bytes: peak_rss(),
        };
        eprintln!(
            "  {:<14} {:>8} {:<10} {:>8.2} s {:>10.0}/s",
            figures.stage, figures.items, figures.unit, figures.seconds, figures.per_second
        );
        figures
    }
}

fn backends(config: &Config) -> std::collections::BTreeMap<String, String> {
    fn name(v: impl Serialize) -> String {
        serde_json::to_value(v)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
    [
        ("log", name(config.log.backend)),
        ("objects", name(config.objects.backend)),
        ("table", name(config.table.backend)),
        ("search", name(config.search.backend)),
        ("cache", name(config.cache.backend)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Runs `sift bench e2e`.
pub async fn main(config: &Config, args: E2eBenchArgs) -> crate::Result<()> {
    let started = Instant::now();
    let cpu_at_start = cpu_seconds();
    let mut config = config.clone();
    let dir = config
        .data_dir
        .join(format!("bench-e2e-{}", crate::now_ms()));
    config.data_dir = dir.clone();
    let report = bench(&mut config, &args, started, cpu_at_start).await;
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = report?;
    print(&report);
    if let Some(path) = &args.output {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| crate::Error::Invalid(format!("cannot encode the report: {e}")))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| crate::Error::io(format!("creating {}", parent.display()), e))?;
        }
        std::fs::write(path, text)
            .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

async fn bench(
    config: &mut Config,
    args: &E2eBenchArgs,
    started: Instant,
    cpu_at_start: f64,
) -> crate::Result<E2eReport> {
    let world_args = WorldArgs {
        sites: args.sites,
        documents: args.documents,
        web_port: 0,
        people: args.people,
        profiles: args.profiles,
        outsiders: args.outsiders,
        seed: 7,
        retrain: true,
        epochs: args.epochs,
    };
    let run_dir = config.data_dir.join(stages::RUN_DIR);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| crate::Error::io(format!("creating {}", run_dir.display()), e))?;
    let shared = Shared::open(config).await?;
    eprintln!(
        "sift bench e2e: {} documents on {} sites, {} people, {} profiles; backends {:?}",
        if args.documents == 0 {
            "all web".to_owned()
        } else {
            args.documents.to_string()
        },
        args.sites,
        args.people,
        args.profiles + args.outsiders,
        backends(config)
    );
    let world = stages::prepare(config, &world_args, &run_dir).await?;
    let result = phases(config, &world_args, &shared, &world).await;
    stages::finish(world).await;
    let (stages, latency, workload) = result?;
    Ok(E2eReport {
        version: env!("CARGO_PKG_VERSION").into(),
        at_ms: crate::now_ms(),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        backends: backends(config),
        workload,
        stages,
        latency,
        peak_rss_bytes: None,
        cpu_seconds: cpu_seconds() - cpu_at_start,
        seconds: started.elapsed().as_secs_f64(),
    }
    .with_peak())
}

impl E2eReport {
    fn with_peak(mut self) -> Self {
        self.peak_rss_bytes = self
            .stages
            .iter()
            .filter_map(|s| s.peak_rss_bytes)
            .chain(self.latency.peak_rss_bytes)
            .max();
        self
    }
}

async fn phases(
    config: &Config,
    world_args: &WorldArgs,
    shared: &Shared,
    world: &stages::World,
) -> crate::Result<(Vec<StageFigures>, Latency, Workload)> {
    let mut stages = Vec::new();
    eprintln!("phase 1: each stage drains its whole input");

    let ingest = crate::ingest::Ingest::new(
        shared.log.clone(),
        shared.objects.clone(),
        shared.table.clone(),
        config,
    )
    .await?;
    // Real backends keep what earlier runs fetched from the sample web (the
    // validators and content hashes of `ingest_state`): forget it, so every
    // run ingests the whole workload.
    ingest.forget(&web::url_prefixes()).await?;
    let m = Meter::start();
    let s = ingest.pass(&world.sources).await?;
    stages.push(m.stop("ingest", "documents", s.produced));

    let m = Meter::start();
    let s = crate::clean::run(
        shared.log.clone(),
        shared.objects.clone(),
        config,
        Until::caught_up(),
    )
    .await?;
    stages.push(m.stop("clean", "documents", s.consumed));

    let m = Meter::start();
    let s = crate::archive::run(
        shared.log.clone(),
        shared.objects.clone(),
        config,
        Until::caught_up(),
    )
    .await?;
    stages.push(m.stop("archive", "records", s.records));

    let m = Meter::start();
    let train_args = stages::train_args(world, world_args)?;
    let model = stages::train_or_reuse(
        config,
        &train_args,
        shared.objects.clone(),
        shared.table.clone(),
        true,
    )
    .await?;
    let epochs = model.epochs;
    stages.push(m.stop("train", "documents", model.train_documents));

    let m = Meter::start();
    let s = crate::infer::run(
        shared.log.clone(),
        shared.table.clone(),
        shared.objects.clone(),
        config,
        crate::infer::ModelChoice::from_config(config, None),
        Until::caught_up(),
    )
    .await?;
    stages.push(m.stop("infer", "documents", s.scored));

    let m = Meter::start();
    let s = stages::load_database(config, shared, &world.generated).await?;
    stages.push(m.stop("dbusa load", "people", s.rows_loaded));

    let profiles = stages::publish_profiles(config, shared, &world.generated).await?;
    let parts = stages::matching_parts(config, shared).await?;
    let cache = parts.cache.clone();
    // Every run pays the enrichment API as the first did: a shared cache
    // (Redis) keeps earlier runs' answers.
    cache
        .replace_namespace(crate::matching::enrich::CACHE_NAMESPACE, Vec::new(), None)
        .await?;
    let m = Meter::start();
    let matched = crate::matching::daemon::run(parts, config, Until::caught_up()).await?;
    stages.push(m.stop("match", "profiles", matched.consumed));

    let m = Meter::start();
    let refreshed = stages::refresh_cache(config, &shared.table, &cache).await?;
    stages.push(m.stop("cache refresh", "handles", refreshed.rows));

    eprintln!("phase 2: the web again, ingest → clean → infer together");
    let latency = latency(config, shared, world, &ingest).await?;
    // Phase 2 put the web on `sift.raw` again; the archive group takes it
    // (untimed), so the next run on persistent backends archives only its own.
    crate::archive::run(
        shared.log.clone(),
        shared.objects.clone(),
        config,
        Until::caught_up(),
    )
    .await?;
    let workload = Workload {
        sites: world.web.sites(),
        documents: world.web.served().len() as u64,
        people: world.generated.rows,
        profiles: profiles.len() as u64,
        train_documents: model.train_documents,
        epochs,
    };
    Ok((stages, latency, workload))
}

/// Phase 2: fetch-to-row latency with the stages running together.
async fn latency(
    config: &Config,
    shared: &Shared,
    world: &stages::World,
    ingest: &crate::ingest::Ingest,
) -> crate::Result<Latency> {
    ingest.forget(&web::url_prefixes()).await?;
    reset_peak_rss();
    let since = crate::now_ms();
    let (_never, stop) = watch::channel(false);
    let (ingest_done, ingest_rx) = Done::new();
    let (clean_done, clean_rx) = Done::new();
    let config = Arc::new(config.clone());
    let clean = tokio::spawn(stages::clean_stage(
        shared.clone(),
        config.clone(),
        stages::until_drained(
            shared,
            topics::RAW,
            &config.clean.group,
            ingest_rx,
            stop.clone(),
        ),
        Some(clean_done),
    ));
    let infer = tokio::spawn(stages::infer_stage(
        shared.clone(),
        config.clone(),
        stages::until_drained(shared, topics::CLEAN, &config.infer.group, clean_rx, stop),
        None,
    ));
    let fetched = ingest.pass(&world.sources).await;
    ingest_done.set();
    let panicked =
        |e: tokio::task::JoinError| crate::Error::Invalid(format!("a stage panicked: {e}"));
    let clean = clean.await.map_err(panicked)?;
    let infer = infer.await.map_err(panicked)?;
    fetched?;
    clean?;
    infer?;

    let mut ms: Vec<f64> = Vec::new();
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    scan_pages(
        shared.table.as_ref(),
        documents::TABLE,
        Some(&[documents::META, documents::CATEGORIES]),
        5_000,
        |row| {
            let number = |family: &str, q: &str| {
                row.get(family, q.as_bytes())
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse::<i64>().ok())
            };
            let (Some(fetched), Some(scored)) = (
                number(documents::META, "fetched_at_ms"),
                number(documents::CATEGORIES, documents::categories::SCORED_AT_MS),
            ) else {
                return;
            };
            if fetched >= since && scored >= fetched {
                ms.push((scored - fetched) as f64);
                first = first.min(fetched);
                last = last.max(scored);
            }
        },
    )
    .await?;
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if ms.is_empty() {
            0.0
        } else {
            ms[((ms.len() - 1) as f64 * q).round() as usize]
        }
    };
    let seconds = if ms.is_empty() {
        0.0
    } else {
        (last - first) as f64 / 1e3
    };
    let l = Latency {
        documents: ms.len() as u64,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
        seconds,
        per_second: ms.len() as f64 / seconds.max(1e-9),
        peak_rss_bytes: peak_rss(),
    };
    eprintln!(
        "  {} documents fetched to row: p50 {:.0} ms, p99 {:.0} ms",
        l.documents, l.p50_ms, l.p99_ms
    );
    Ok(l)
}

fn print(r: &E2eReport) {
    let mb =
        |b: Option<u64>| b.map_or("-".to_owned(), |b| format!("{:.0}", b as f64 / 1_048_576.0));
    println!(
        "sift bench e2e · {} CPUs · backends {} · {} documents on {} sites, {} people, {} profiles",
        r.cpus,
        r.backends
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        r.workload.documents,
        r.workload.sites,
        r.workload.people,
        r.workload.profiles
    );
    println!();
    println!("| stage | items | unit | seconds | items/s | CPU s | CPU use | peak RSS MB |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    for s in &r.stages {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.0}% | {} |",
            s.stage,
            s.items,
            s.unit,
            s.seconds,
            s.per_second,
            s.cpu_seconds,
            100.0 * s.cpu_seconds / s.seconds.max(1e-9),
            mb(s.peak_rss_bytes)
        );
    }
    println!();
    let l = &r.latency;
    println!(
        "fetch → documents row, ingest + clean + infer together: {} documents, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {:.0} documents/s; peak RSS {} MB",
        l.documents, l.p50_ms, l.p99_ms, l.max_ms, l.per_second, mb(l.peak_rss_bytes)
    );
    println!(
        "whole run: {:.1} s wall, {:.1} CPU s, peak RSS {} MB",
        r.seconds,
        r.cpu_seconds,
        mb(r.peak_rss_bytes)
    );
}
