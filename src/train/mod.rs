//! `sift train`: the daily training run. Reads labeled JSON lines (files or
//! the object store) and the analysts' decisions from the `documents` table,
//! trains a model ([`sift_training::train`]), publishes it to the registry,
//! and promotes it to `LATEST` only if it beats the current champion on the
//! same validation documents (unless `--force`). `--every 24h` repeats it as
//! a daemon.

pub mod models;
pub mod registry;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;
use sift_training::{
    BatchLimits, Dataset, Document, LinearOptions, Metric, Part, Predictor, Preset, Pretrained,
    SplitPlan, TrainOptions,
};

use crate::backends::objects::ObjectStore;
use crate::backends::table::Table;
use crate::config::Config;
use crate::daemon::StageHealth;
use crate::device::{DeviceArg, DeviceError};
use registry::{Registry, RegistryError};

/// Errors of `sift train`.
#[derive(Debug, thiserror::Error)]
pub enum TrainCommandError {
    /// Reading a dataset failed.
    #[error("dataset {source_name}: {message}")]
    Data {
        /// Path or object key.
        source_name: String,
        /// What went wrong.
        message: String,
    },
    /// Training failed.
    #[error(transparent)]
    Train(#[from] sift_training::TrainError),
    /// Loading a model for the gate failed.
    #[error(transparent)]
    Predict(#[from] sift_training::PredictError),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A setting is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Any other sift error (backends, I/O).
    #[error(transparent)]
    Sift(#[from] crate::Error),
}

impl From<DeviceError> for TrainCommandError {
    fn from(e: DeviceError) -> Self {
        TrainCommandError::Invalid(e.to_string())
    }
}

impl From<crate::backends::table::TableError> for TrainCommandError {
    fn from(e: crate::backends::table::TableError) -> Self {
        TrainCommandError::Sift(e.into())
    }
}

impl From<crate::backends::objects::ObjectError> for TrainCommandError {
    fn from(e: crate::backends::objects::ObjectError) -> Self {
        TrainCommandError::Sift(e.into())
    }
}

/// Model size on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PresetArg {
    /// 2 layers × 128 plus hashed n-grams: CPU.
    Tiny,
    /// 6 layers × 384 plus hashed n-grams: GPU.
    Base,
}

/// Loss on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LossArg {
    /// Independent sigmoids with binary cross-entropy.
    Bce,
    /// Softmax over labels with cross-entropy against the normalised multi-hot target.
    Softmax,
}

/// `sift train`. The default is the command without flags or environment:
/// the config's dataset and preset, on the CPU, gated and promoted.
#[derive(Debug, Clone, Default, Args)]
pub struct TrainArgs {
    /// Dataset of JSON lines `{id, title, text, tags[]}`: a file (`.gz`, `.zst` are decompressed)
    /// or `objects:KEY` in the object store. Repeatable. Default: `train.data` in the config, else
    /// the bundled sample.
    #[arg(long = "data", env = "SIFT_TRAIN_DATA", value_delimiter = ',')]
    pub data: Vec<String>,
    /// Model size (default: `train.preset` in the config).
    #[arg(long, env = "SIFT_TRAIN_PRESET")]
    pub preset: Option<PresetArg>,
    /// Start the encoder from a pretrained BERT-style model: a directory with model.safetensors,
    /// config.json and tokenizer.json (e.g. all-MiniLM-L6-v2).
    #[arg(long, env = "SIFT_TRAIN_PRETRAINED")]
    pub pretrained: Option<PathBuf>,
    /// Use this tokenizer.json instead of training one on the corpus.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Epochs to run (default: the preset's daily budget, `tiny`: 84,000
    /// documents shown, between 3 and 20 epochs).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Stop after this many epochs without improvement.
    #[arg(long)]
    pub patience: Option<u32>,
    /// Peak learning rate (default: the preset's).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Longest input in tokens (default: the preset's).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Loss and output activation (default: softmax, which won on validation).
    #[arg(long)]
    pub loss: Option<LossArg>,
    /// Train the transformer alone, without the hashed n-gram branch.
    #[arg(long)]
    pub no_ngrams: bool,
    /// Seed (default: `train.seed` in the config).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where to train.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu, env = "SIFT_TRAIN_DEVICE")]
    pub device: DeviceArg,
    /// Promote the new model to LATEST even if it does not beat the current one.
    #[arg(long)]
    pub force: bool,
    /// Publish the model to the registry but never promote it.
    #[arg(long)]
    pub no_promote: bool,
    /// Ignore the analysts' feedback in the table for this run.
    #[arg(long)]
    pub no_feedback: bool,
    /// Run as a daemon: train now, then again every DURATION (e.g. `24h`).
    #[arg(long, env = "SIFT_TRAIN_EVERY", value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// What the gate decided.
#[derive(Debug, Clone, Serialize)]
pub struct GateOutcome {
    /// Metric compared.
    pub metric: String,
    /// The new model's figure on the validation documents.
    pub challenger: f64,
    /// The champion's version and figure on the same documents, if there was one.
    pub champion: Option<(String, f64)>,
    /// Validation documents both were scored on.
    pub documents: u64,
    /// Whether LATEST now points at the new model.
    pub promoted: bool,
    /// Why.
    pub reason: String,
}

/// What one training run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    /// The new version.
    pub version: String,
    /// Where the model files are on this machine.
    pub dir: PathBuf,
    /// Its figures.
    pub metrics: sift_training::ModelMetrics,
    /// Documents read from datasets.
    pub dataset_documents: u64,
    /// Reviewed documents read from the table.
    pub feedback_documents: u64,
    /// The gate.
    pub gate: GateOutcome,
    /// Wall time, seconds.
    pub seconds: f64,
}

fn data_error(source_name: &str, message: impl std::fmt::Display) -> TrainCommandError {
    TrainCommandError::Data {
        source_name: source_name.to_owned(),
        message: message.to_string(),
    }
}

/// Wraps a compressed reader by the name's extension.
fn decompressed<'a>(name: &str, reader: impl Read + 'a) -> std::io::Result<Box<dyn BufRead + 'a>> {
    Ok(if name.ends_with(".gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(reader)))
    } else if name.ends_with(".zst") {
        Box::new(BufReader::new(zstd::Decoder::new(reader)?))
    } else {
        Box::new(BufReader::new(reader))
    })
}

/// Reads one dataset: a path, or `objects:KEY`.
pub async fn read_dataset(
    spec: &str,
    store: &dyn ObjectStore,
) -> Result<Vec<Document>, TrainCommandError> {
    let reader: Box<dyn BufRead> = match spec.strip_prefix("objects:") {
        Some(key) => {
            let (_, body) = store.get(key).await?;
            decompressed(key, std::io::Cursor::new(body)).map_err(|e| data_error(spec, e))?
        }
        None => {
            let file = std::fs::File::open(spec).map_err(|e| data_error(spec, e))?;
            decompressed(spec, file).map_err(|e| data_error(spec, e))?
        }
    };
    Ok(Dataset::read(reader)
        .map_err(|e| data_error(spec, e))?
        .documents)
}

/// The bundled labeled sample as training documents.
pub fn bundled_documents() -> crate::Result<Vec<Document>> {
    Ok(crate::sample::bundled()?
        .into_iter()
        .map(|d| Document {
            id: d.id,
            title: d.title,
            text: d.text,
            source: d.source,
            tags: d.tags,
            rejected: Vec::new(),
            section: d.section,
            url: String::new(),
        })
        .collect())
}

/// Every reviewed document in the `documents` table, read a page at a time.
pub async fn read_feedback(table: &dyn Table) -> Result<Vec<Document>, TrainCommandError> {
    use crate::documents;
    let mut out = Vec::new();
    crate::backends::table::scan_pages(
        table,
        documents::TABLE,
        Some(&[documents::META, documents::CATEGORIES, documents::REVIEW]),
        1000,
        |row| out.extend(documents::feedback_document(row)),
    )
    .await?;
    Ok(out)
}

fn options(config: &Config, args: &TrainArgs) -> Result<TrainOptions, TrainCommandError> {
    let preset = match args.preset {
        Some(PresetArg::Tiny) => Preset::Tiny,
        Some(PresetArg::Base) => Preset::Base,
        None => match config.train.preset.as_str() {
            "tiny" => Preset::Tiny,
            "base" => Preset::Base,
            other => {
                return Err(TrainCommandError::Invalid(format!(
                    "train.preset is `{other}`; use \"tiny\" or \"base\""
                )))
            }
        },
    };
    let mut o = TrainOptions::for_preset(preset);
    o.pretrained = args.pretrained.clone().map(|dir| Pretrained { dir });
    o.tokenizer = args.tokenizer.clone();
    if let Some(v) = args.epochs {
        o.max_epochs = v.max(1);
        o.epoch_budget_documents = None;
    }
    if let Some(v) = args.patience {
        o.patience = v;
    }
    if let Some(v) = args.learning_rate {
        o.learning_rate = v;
    }
    o.max_len = args.max_len;
    if let Some(loss) = args.loss {
        o.output = match loss {
            LossArg::Bce => sift_models::Output::Sigmoid,
            LossArg::Softmax => sift_models::Output::Softmax,
        };
    }
    if args.no_ngrams {
        o.ngrams = None;
    }
    o.seed = args.seed.unwrap_or(config.train.seed);
    o.split = split_plan(config);
    o.linear = config.train.linear.then(|| LinearOptions {
        seed: o.seed,
        char_grams: config.train.char_grams,
        ..LinearOptions::default()
    });
    // The gate metric is checked here so a typo fails before training; the
    // best epoch within the run is picked by the preset's selection.
    gate_metric(config)?;
    o.device = crate::device::device(args.device)?;
    o.progress = !args.quiet && !args.json;
    Ok(o)
}

/// How the configured training splits its data.
pub fn split_plan(config: &Config) -> SplitPlan {
    SplitPlan {
        validation_percent: config.train.validation_percent,
        tuning_percent: config.train.tuning_percent,
        seen_percent: config.train.seen_percent,
    }
}

/// The configured gate metric.
pub fn gate_metric(config: &Config) -> Result<Metric, TrainCommandError> {
    config
        .train
        .gate_metric
        .parse()
        .map_err(|e: String| TrainCommandError::Invalid(format!("train.gate_metric: {e}")))
}

/// Local directory of trained and fetched models.
pub fn model_cache(config: &Config) -> PathBuf {
    config.data_dir.join("models")
}

/// Batches used when scoring validation documents for the gate.
const GATE_BATCH: BatchLimits = BatchLimits {
    max_batch_tokens: 8192,
    max_batch_docs: 64,
};

/// One training run: read, train, publish, gate.
pub async fn run_once(
    config: &Config,
    args: &TrainArgs,
    store: Arc<dyn ObjectStore>,
    table: Option<Arc<dyn Table>>,
) -> Result<TrainOutcome, TrainCommandError> {
    let started = Instant::now();
    let options = options(config, args)?;
    let specs = if args.data.is_empty() {
        config.train.data.clone()
    } else {
        args.data.clone()
    };
    let mut documents = Vec::new();
    if specs.is_empty() {
        documents = bundled_documents()?;
        tracing::info!(
            documents = documents.len(),
            "Training on the bundled sample."
        );
    }
    for spec in &specs {
        let read = read_dataset(spec, store.as_ref()).await?;
        tracing::info!(dataset = %spec, documents = read.len(), "Read a dataset.");
        documents.extend(read);
    }
    let dataset_documents = documents.len() as u64;
    let feedback = match (&table, config.train.feedback && !args.no_feedback) {
        (Some(table), true) => {
            table
                .ensure_table(crate::documents::TABLE, &crate::documents::FAMILIES)
                .await?;
            read_feedback(table.as_ref()).await?
        }
        _ => Vec::new(),
    };
    let feedback_documents = feedback.len() as u64;
    if feedback_documents > 0 {
        tracing::info!(
            documents = feedback_documents,
            "Read the analysts' feedback."
        );
    }

    // The gate scores both models on the validation split of exactly the
    // data this model is trained on (feedback folded in the same way).
    let mut merged = documents.clone();
    sift_training::merge_feedback(&mut merged, feedback.clone());
    let validation: Vec<Document> = merged
        .into_iter()
        .filter(|d| options.split.part(d) == Part::Validation)
        .collect();

    let cache = model_cache(config);
    let work = cache.join(format!(
        ".training-{}-{}",
        std::process::id(),
        crate::now_ms()
    ));
    let trained = {
        let work = work.clone();
        let options = options.clone();
        tokio::task::spawn_blocking(move || {
            sift_training::train(documents, feedback, &options, &work)
        })
        .await
        .map_err(|e| TrainCommandError::Invalid(format!("the training thread failed: {e}")))??
    };
    let version = Registry::new_version(&work)?;
    let dir = cache.join(&version);
    std::fs::rename(&work, &dir)
        .map_err(|e| crate::Error::io(format!("moving the model to {}", dir.display()), e))?;
    let registry = Registry::new(store, &config.train.prefix);
    registry.publish(&dir, &version).await?;
    tracing::info!(%version, "Published the model.");

    let gate = gate(
        config,
        args,
        &registry,
        &version,
        &dir,
        &validation,
        options.selection,
    )
    .await?;
    let metrics = crate::metrics::global();
    metrics
        .train_runs
        .get_or_create(&crate::metrics::OutcomeLabel {
            outcome: if gate.promoted { "promoted" } else { "kept" }.into(),
        })
        .inc();
    metrics
        .train_last_hit_at_5
        .set((trained.metrics.validation.hit_at_5 * 1000.0).round() as i64);
    metrics.train_last_finished.set(crate::now_ms() / 1000);
    Ok(TrainOutcome {
        version,
        dir,
        metrics: trained.metrics,
        dataset_documents,
        feedback_documents,
        gate,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Scores a model directory on `documents` by `metric`, on a blocking thread.
async fn score(
    dir: PathBuf,
    documents: Vec<Document>,
    metric: Metric,
) -> Result<f64, TrainCommandError> {
    tokio::task::spawn_blocking(move || {
        let predictor = Predictor::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32)?;
        let metrics = predictor.evaluate(&documents, GATE_BATCH)?;
        Ok::<_, TrainCommandError>(metric.of(&metrics))
    })
    .await
    .map_err(|e| TrainCommandError::Invalid(format!("the scoring thread failed: {e}")))?
}

/// Champion/challenger: promote `version` if it beats LATEST on `validation`.
async fn gate(
    config: &Config,
    args: &TrainArgs,
    registry: &Registry,
    version: &str,
    dir: &Path,
    validation: &[Document],
    metric: Metric,
) -> Result<GateOutcome, TrainCommandError> {
    let challenger = score(dir.to_path_buf(), validation.to_vec(), metric).await?;
    let documents = validation.iter().filter(|d| !d.tags.is_empty()).count() as u64;
    let current = registry.latest().await?;
    let champion = match &current {
        Some((latest, _)) => {
            let champion_dir = registry
                .fetch(&latest.version, &model_cache(config))
                .await?;
            let figure = score(champion_dir, validation.to_vec(), metric).await?;
            Some((latest.version.clone(), figure))
        }
        None => None,
    };
    let mut outcome = GateOutcome {
        metric: metric.name().to_owned(),
        challenger,
        champion: champion.clone(),
        documents,
        promoted: false,
        reason: String::new(),
    };
    if args.no_promote {
        outcome.reason = "--no-promote".into();
        return Ok(outcome);
    }
    let decision: Option<String> = match (&champion, args.force) {
        (None, _) => Some("first".into()),
        (Some(_), true) => Some("forced".into()),
        (Some((_, figure)), false) if challenger > *figure => Some("gate".into()),
        (Some((champion_version, figure)), false) => {
            outcome.reason = format!(
                "{} {challenger:.4} does not beat {champion_version}'s {figure:.4}",
                metric.name()
            );
            None
        }
    };
    let Some(reason) = decision else {
        return Ok(outcome);
    };
    let evaluated = champion.as_ref().map(|(v, _)| v.as_str());
    let written = registry.promote_over(version, evaluated, &reason).await?;
    match written {
        Some(latest) => {
            outcome.promoted = true;
            outcome.reason = latest.reason;
        }
        None => {
            outcome.reason = "LATEST moved while the gate ran; the next run compares again".into();
        }
    }
    Ok(outcome)
}

fn print_outcome(outcome: &TrainOutcome, json: bool) {
    if json {
        let mut value = serde_json::to_value(outcome).unwrap_or_default();
        // The per-label table and curves are in metrics.json; keep the line short.
        if let Some(m) = value.get_mut("metrics").and_then(|m| m.as_object_mut()) {
            m.remove("per_label");
            m.remove("steps");
        }
        println!("{value}");
        return;
    }
    let m = &outcome.metrics;
    println!("trained {} in {:.0} s", outcome.version, outcome.seconds);
    println!(
        "  documents          {} from datasets, {} reviewed in the table",
        outcome.dataset_documents, outcome.feedback_documents
    );
    println!(
        "  split              {} training, {} tuning, {} validation (unseen sources)",
        m.train_documents, m.tuning_documents, m.validation_documents
    );
    println!(
        "  validation         P@1 {:.3} · hit@5 {:.3} · recall@5 {:.3} (best epoch {} of {})",
        m.validation.p_at_1,
        m.validation.hit_at_5,
        m.validation.recall_at_5,
        m.best_epoch,
        m.epochs.len()
    );
    let figures = |name: &str, f: &sift_training::Figures| {
        println!(
            "  {name:<18} P@1 {:.3} · hit@5 {:.3} · recall@5 {:.3}",
            f.p_at_1, f.hit_at_5, f.recall_at_5
        );
    };
    if let Some(t) = &m.transformer {
        figures("transformer alone", t);
    }
    if let Some(b) = &m.baseline {
        figures("baseline", &b.validation);
        let v = &m.validation;
        let behind: Vec<&str> = [
            ("P@1", v.p_at_1 < b.validation.p_at_1),
            ("hit@5", v.hit_at_5 < b.validation.hit_at_5),
            ("recall@5", v.recall_at_5 < b.validation.recall_at_5),
        ]
        .into_iter()
        .filter(|(_, lost)| *lost)
        .map(|(name, _)| name)
        .collect();
        if !behind.is_empty() {
            println!(
                "  NOTE               the baseline ({}) beats this model on {}",
                b.name,
                behind.join(", ")
            );
        }
    }
    if let Some(s) = &m.seen {
        figures("seen sources", s);
    }
    println!(
        "  throughput         {:.0} tokens/s on {}",
        m.tokens_per_second, m.device
    );
    let g = &outcome.gate;
    match &g.champion {
        Some((v, figure)) => println!(
            "  gate               {} {:.4} vs LATEST {v} {:.4} on {} documents",
            g.metric, g.challenger, figure, g.documents
        ),
        None => println!("  gate               no LATEST yet"),
    }
    if g.promoted {
        println!("  LATEST             -> {} ({})", outcome.version, g.reason);
    } else {
        println!("  LATEST             unchanged: {}", g.reason);
    }
    println!(
        "  report             {}",
        outcome.dir.join(sift_training::files::REPORT).display()
    );
}

/// `sift train`.
pub async fn main(config: &Config, args: TrainArgs) -> Result<(), TrainCommandError> {
    let store = crate::backends::open_objects(config).await?;
    let table = if config.train.feedback && !args.no_feedback {
        Some(crate::backends::open_table(config).await?)
    } else {
        None
    };
    let Some(every) = args.every else {
        let outcome = run_once(config, &args, store, table).await?;
        print_outcome(&outcome, args.json);
        return Ok(());
    };
    // Unhealthy once runs keep failing (daily runs: after days of it).
    static HEALTH: StageHealth = StageHealth::new();
    crate::daemon::serve_metrics(config, HEALTH.probe()).await?;
    let mut stop = std::pin::pin!(crate::daemon::shutdown_signal());
    loop {
        let next = tokio::time::Instant::now() + every;
        match run_once(config, &args, store.clone(), table.clone()).await {
            Ok(outcome) => {
                HEALTH.recovered();
                print_outcome(&outcome, args.json);
            }
            Err(e) => {
                HEALTH.fail();
                crate::metrics::global()
                    .train_runs
                    .get_or_create(&crate::metrics::OutcomeLabel {
                        outcome: "failed".into(),
                    })
                    .inc();
                tracing::error!(error = %e, "Training run failed; the next run is at the usual time.");
            }
        }
        tracing::info!(every = %humantime::format_duration(every), "Next training run scheduled.");
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut stop => {
                tracing::info!("Stopping.");
                return Ok(());
            }
        }
    }
}
