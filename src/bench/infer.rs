//! `sift bench infer`: `sift infer` end to end on embedded backends, one
//! fresh data directory per batch limit.
//!
//! For each `--batch` value: `--docs` cleaned documents are put on
//! `sift.clean` and the daemon drains them (documents/s, the model's load
//! excluded); then, on a fresh directory, documents arrive at half that rate
//! for `--latency-seconds` while the daemon runs, and the time from each
//! record's arrival in `sift.clean` to its row in the table gives p50/p99.
//! (Latency measured while draining a backlog would only measure the
//! backlog.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::backends::log::{EmbeddedLog, Log, Offset};
use crate::backends::objects::{EmbeddedObjects, ObjectStore};
use crate::backends::table::{EmbeddedTable, Table};
use crate::config::Config;
use crate::device::{set_threads, DeviceArg, DtypeArg};
use crate::envelope::{self, topics, Envelope, SCHEMA_VERSION};
use crate::infer::{self, ModelChoice, Until};
use crate::train::TrainCommandError;

/// `sift bench infer`.
#[derive(Debug, Clone, Args)]
pub struct InferBenchArgs {
    /// A model directory; default the registry's LATEST.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// JSON lines `{id, title, text}`; default the bundled sample (repeated to `--docs`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Documents per throughput run.
    #[arg(long, default_value_t = 2000)]
    pub docs: usize,
    /// Batch limits (`infer.max_batch_docs`) to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    pub batch: Vec<u32>,
    /// Seconds of steady arrivals for the latency run (0 = skip it).
    #[arg(long, default_value_t = 10.0)]
    pub latency_seconds: f64,
    /// Threads (rayon pool: tokenizing and the model on the CPU); 0 = one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Arithmetic of the model.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One batch limit's figures.
#[derive(Debug, Clone, Serialize)]
pub struct InferBenchRow {
    /// `infer.max_batch_docs`.
    pub batch: u32,
    /// Documents drained.
    pub docs: u64,
    /// Documents per second draining the backlog (model load excluded).
    pub docs_per_second: f64,
    /// Mean documents per forward pass while draining.
    pub mean_batch: f64,
    /// Arrival rate of the latency run, documents/s.
    pub offered_per_second: f64,
    /// Documents of the latency run.
    pub latency_docs: u64,
    /// Median seconds from `sift.clean` to the table at that rate.
    pub latency_p50_ms: f64,
    /// 99th percentile of the same.
    pub latency_p99_ms: f64,
}

/// What `sift bench infer` measured.
#[derive(Debug, Clone, Serialize)]
pub struct InferBench {
    /// Model directory or version.
    pub model: String,
    /// Its configuration.
    pub config: serde_json::Value,
    /// Device and arithmetic.
    pub device: String,
    /// Arithmetic.
    pub dtype: DtypeArg,
    /// Rayon threads.
    pub threads: usize,
    /// One row per batch limit.
    pub rows: Vec<InferBenchRow>,
}

pub(super) async fn main(config: &Config, args: InferBenchArgs) -> Result<(), TrainCommandError> {
    let threads = set_threads(args.threads);
    let (dir, shown) = crate::classify::resolve_model(config, args.model.as_deref(), None).await?;
    let model_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(sift_training::files::CONFIG))
            .map_err(|e| TrainCommandError::Sift(crate::Error::io("reading config.json", e)))?,
    )
    .map_err(|e| TrainCommandError::Invalid(format!("config.json: {e}")))?;
    let max_len = model_config["max_len"].as_u64().unwrap_or(512) as u32;
    let source = match &args.data {
        Some(path) => {
            let store = crate::backends::open_objects(config).await?;
            crate::train::read_dataset(&path.display().to_string(), store.as_ref()).await?
        }
        None => crate::train::bundled_documents()?,
    };
    if source.is_empty() || args.docs == 0 || args.batch.contains(&0) {
        return Err(TrainCommandError::Invalid(
            "sift bench infer needs documents, --docs ≥ 1 and batch limits ≥ 1".into(),
        ));
    }
    let envelope = |i: usize| -> Envelope {
        let d = &source[i % source.len()];
        let url = format!("https://bench.example.com/{i}/{}", d.id);
        Envelope {
            v: SCHEMA_VERSION,
            id: envelope::document_id("bench", &url),
            source: "bench".into(),
            url,
            fetched_at_ms: crate::now_ms(),
            content_type: "text/plain".into(),
            title: d.title.clone(),
            text: Some(d.text.clone()),
            body_uri: None,
            metadata: BTreeMap::new(),
        }
    };
    let mut rows = Vec::new();
    for &batch in &args.batch {
        let mut cfg = bench_config(config, &args, batch, max_len);
        // Throughput: drain a backlog.
        let work = tempfile::tempdir()
            .map_err(|e| TrainCommandError::Sift(crate::Error::io("a scratch directory", e)))?;
        cfg.data_dir = work.path().to_path_buf();
        let (log, table, objects) = open(&cfg)?;
        log.create_topic(topics::CLEAN, cfg.log.default_partitions)
            .await
            .map_err(crate::Error::from)?;
        for chunk in (0..args.docs).collect::<Vec<_>>().chunks(500) {
            let records = chunk
                .iter()
                .map(|&i| infer::clean_record(&envelope(i)))
                .collect();
            log.produce(topics::CLEAN, records)
                .await
                .map_err(crate::Error::from)?;
        }
        let drained = infer::run(
            log,
            table,
            objects,
            &cfg,
            ModelChoice::Dir(dir.clone()),
            Until::caught_up(),
        )
        .await?;
        let mut row = InferBenchRow {
            batch,
            docs: drained.scored,
            docs_per_second: drained.docs_per_second,
            mean_batch: drained.scored as f64 / drained.batches.max(1) as f64,
            offered_per_second: 0.0,
            latency_docs: 0,
            latency_p50_ms: 0.0,
            latency_p99_ms: 0.0,
        };
        drop(work);
        eprintln!(
            "batch {batch:>4}: {:.1} docs/s draining {} documents ({:.1} per forward pass)",
            row.docs_per_second, row.docs, row.mean_batch
        );
        if args.latency_seconds > 0.0 {
            let rate = (row.docs_per_second * 0.5).max(1.0);
            let (docs, p50, p99) =
                latency_run(&cfg, &dir, rate, args.latency_seconds, &envelope).await?;
            row.offered_per_second = rate;
            row.latency_docs = docs;
            row.latency_p50_ms = p50 * 1e3;
            row.latency_p99_ms = p99 * 1e3;
            eprintln!(
                "batch {batch:>4}: at {rate:.1} docs/s offered, topic to table p50 {:.1} ms, p99 {:.1} ms ({docs} documents)",
                row.latency_p50_ms, row.latency_p99_ms
            );
        }
        rows.push(row);
    }
    let result = InferBench {
        model: shown,
        config: model_config,
        device: format!("{:?}", args.device).to_lowercase(),
        dtype: args.dtype,
        threads,
        rows,
    };
    println!(
        "sift infer end to end (embedded backends), {} {:?}, {} threads, model {}",
        result.device, result.dtype, result.threads, result.model
    );
    println!("| batch | docs/s | docs per pass | offered docs/s | p50 ms | p99 ms |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &result.rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.batch,
            r.docs_per_second,
            r.mean_batch,
            r.offered_per_second,
            r.latency_p50_ms,
            r.latency_p99_ms
        );
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result)
            .map_err(|e| TrainCommandError::Invalid(format!("cannot write JSON: {e}")))?;
        std::fs::write(path, text).map_err(|e| {
            TrainCommandError::Sift(crate::Error::io(format!("writing {}", path.display()), e))
        })?;
    }
    Ok(())
}

/// The daemon's configuration for one batch limit.
fn bench_config(config: &Config, args: &InferBenchArgs, batch: u32, max_len: u32) -> Config {
    let mut cfg = Config {
        data_dir: config.data_dir.clone(),
        ..Config::default()
    };
    cfg.telemetry.metrics_addr = String::new();
    cfg.infer.max_batch_docs = batch;
    // The document limit is the one measured; tokens never bind first.
    cfg.infer.max_batch_tokens = batch.saturating_mul(max_len);
    cfg.infer.poll_records = batch.max(256);
    cfg.infer.max_in_flight = (batch * 8).max(2048);
    cfg.infer.device = args.device;
    cfg.infer.dtype = args.dtype;
    cfg
}

type Backends = (Arc<dyn Log>, Arc<dyn Table>, Arc<dyn ObjectStore>);

fn open(cfg: &Config) -> Result<Backends, TrainCommandError> {
    let d = &cfg.data_dir;
    let log: Arc<dyn Log> = Arc::new(
        EmbeddedLog::open(&d.join("log"), cfg.log.embedded.clone()).map_err(crate::Error::from)?,
    );
    let table: Arc<dyn Table> =
        Arc::new(EmbeddedTable::open(&d.join("table.redb")).map_err(crate::Error::from)?);
    let objects: Arc<dyn ObjectStore> =
        Arc::new(EmbeddedObjects::open(&d.join("objects")).map_err(crate::Error::from)?);
    Ok((log, table, objects))
}

/// Documents arrive at `rate` per second for `seconds` while the daemon
/// runs; returns how many, and the p50 and p99 seconds from topic to table.
async fn latency_run(
    cfg: &Config,
    model: &std::path::Path,
    rate: f64,
    seconds: f64,
    envelope: &dyn Fn(usize) -> Envelope,
) -> Result<(u64, f64, f64), TrainCommandError> {
    let work = tempfile::tempdir()
        .map_err(|e| TrainCommandError::Sift(crate::Error::io("a scratch directory", e)))?;
    let mut cfg = cfg.clone();
    cfg.data_dir = work.path().to_path_buf();
    let (log, table, objects) = open(&cfg)?;
    log.create_topic(topics::CLEAN, cfg.log.default_partitions)
        .await
        .map_err(crate::Error::from)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = {
        let (log, cfg, model) = (log.clone(), cfg.clone(), model.to_path_buf());
        tokio::spawn(async move {
            infer::run(
                log,
                table,
                objects,
                &cfg,
                ModelChoice::Dir(model),
                Until::stopped_by(async {
                    let _ = stop_rx.await;
                }),
            )
            .await
        })
    };
    // Let the daemon load its model before the clock starts.
    let ready = Instant::now();
    while crate::metrics::global().infer_ready.get() != 1
        && ready.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = ((rate * seconds).round() as usize).max(1);
    let tick = Duration::from_millis(10);
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
        if due > sent {
            let records = (sent..due)
                .map(|i| infer::clean_record(&envelope(1_000_000 + i)))
                .collect();
            log.produce(topics::CLEAN, records)
                .await
                .map_err(crate::Error::from)?;
            sent = due;
        }
        tokio::time::sleep(tick).await;
    }
    // Wait for every document to reach the table (its record in sift.categorized comes with it).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let written: u64 = log
            .watermarks(topics::CATEGORIZED)
            .await
            .map_err(crate::Error::from)?
            .iter()
            .map(|w| Offset::ZERO.until(&w.high))
            .sum();
        if written >= total as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    let summary = daemon
        .await
        .map_err(|e| TrainCommandError::Invalid(format!("the daemon failed: {e}")))??;
    Ok((
        summary.scored,
        summary.latency_p50_seconds,
        summary.latency_p99_seconds,
    ))
}
