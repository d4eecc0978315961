//! `sift bench`: measurements that need the whole binary.
//!
//! - `sift bench model`: the model's forward pass alone over a dataset,
//!   documents sorted by length and cut into batches of `--batch`, best of
//!   `--repeat` passes; `--export DIR` writes the encoded inputs, the top 5
//!   and the timing so a reference implementation (benches/reference/) can
//!   score exactly the same token ids and compare.
//! - `sift bench infer`: the inference daemon end to end on embedded
//!   backends, `sift.clean` → `documents` + `sift.categorized`, for each
//!   batch limit asked for: documents/s draining a backlog, then p50/p99
//!   latency from topic to table at half that rate.
//! - `sift bench match`: identity matching over a generated data set:
//!   accuracy against the truth, profiles/s and time per profile.
//! - `sift bench review`: the review server's document page over loopback
//!   with a large table: server and client p50/p99, requests/s.
//! - `sift bench e2e`: every stage of `sift run` on a fixed workload.
//! - `sift bench feedback`: simulated analysts reviewing day by day; the
//!   model's test figures per day with the queue's order, a random order
//!   and no reviews.

pub mod e2e;
pub mod feedback;
pub mod infer;
pub mod matching;
pub mod review;
pub mod scale;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use serde::Serialize;
use sift_training::{Document, Encoded, Predictor};

use crate::config::Config;
use crate::device::{set_threads, DeviceArg, DtypeArg};
use crate::train::TrainCommandError;

/// `sift bench`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The model's forward pass alone over a dataset (tokenization timed apart).
    Model(ModelBenchArgs),
    /// `sift infer` end to end on embedded backends at several batch limits.
    Infer(infer::InferBenchArgs),
    /// Identity matching over a generated data set: accuracy against the truth, profiles/s, latency.
    Match(matching::MatchBenchArgs),
    /// The review server's document page over loopback with a large table: p50/p99, requests/s.
    Review(review::ReviewBenchArgs),
    /// Every stage of `sift run` on a fixed workload: items/s, CPU and peak memory per stage, fetch-to-row latency.
    E2e(e2e::E2eBenchArgs),
    /// Simulated analysts, day by day: does reviewing (least certain first, random, none) teach the model?
    Feedback(feedback::FeedbackBenchArgs),
    /// Each stage with 1, 2 and 4 instances on the real services: items/s, CPU, and what bounds it.
    Scale(scale::ScaleBenchArgs),
}

/// Runs `sift bench`.
pub async fn main(config: &Config, command: BenchCommand) -> Result<(), TrainCommandError> {
    match command {
        BenchCommand::Model(args) => model(config, args).await,
        BenchCommand::Infer(args) => infer::main(config, args).await,
        BenchCommand::Match(args) => Ok(matching::main(config, args).await?),
        BenchCommand::Review(args) => Ok(review::main(config, args).await?),
        BenchCommand::E2e(args) => Ok(e2e::main(config, args).await?),
        BenchCommand::Scale(args) => Ok(scale::main(config, args).await?),
        BenchCommand::Feedback(args) => tokio::task::spawn_blocking(move || feedback::main(args))
            .await
            .map_err(|e| TrainCommandError::Invalid(format!("the bench thread failed: {e}")))?,
    }
}

/// `sift bench model`.
#[derive(Debug, Clone, Args)]
pub struct ModelBenchArgs {
    /// A model directory; default the registry's LATEST.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// JSON lines `{id, title, text}`; default the bundled sample.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use only the first N documents (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Only the documents `sift train`'s default split holds out for
    /// validation (10% of the sources, by the same hash), before --limit.
    #[arg(long)]
    pub validation: bool,
    /// Documents per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Threads for the model (sets the rayon pool; 0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Timed passes over the data; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Arithmetic of the model.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Write encoded.jsonl, sift_scores.jsonl and sift.json here.
    #[arg(long)]
    pub export: Option<PathBuf>,
}

/// What `sift bench model` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ModelBench {
    /// Documents scored per pass.
    pub docs: usize,
    /// Real (unpadded) tokens per pass.
    pub tokens: usize,
    /// Best pass, seconds of forward passes (tokenization excluded).
    pub seconds: f64,
    /// Documents per second of the best pass.
    pub docs_per_second: f64,
    /// Tokens per second of the best pass.
    pub tokens_per_second: f64,
    /// Seconds to tokenize every document once.
    pub tokenize_seconds: f64,
    /// Threads of the model's pool.
    pub threads: usize,
    /// Documents per batch.
    pub batch: usize,
    /// Device.
    pub device: String,
    /// Arithmetic.
    pub dtype: DtypeArg,
    /// Share of documents whose first label is one of their tags (only
    /// when the documents have tags).
    pub p_at_1: Option<f64>,
    /// The int8 kernel, with `--dtype int8`.
    pub int8_kernel: Option<&'static str>,
    /// The CPU, as `/proc/cpuinfo` names it.
    pub cpu: String,
    /// The model's configuration.
    pub model: serde_json::Value,
}

async fn model(config: &Config, args: ModelBenchArgs) -> Result<(), TrainCommandError> {
    let threads = set_threads(args.threads);
    let (dir, version) =
        crate::classify::resolve_model(config, args.model.as_deref(), None).await?;
    let device = crate::device::device(args.device)?;
    let predictor = Predictor::load_as(&dir, &device, args.dtype.arithmetic())
        .map_err(|e| TrainCommandError::Invalid(format!("cannot load model {version}: {e}")))?;
    let mut documents: Vec<Document> = match &args.data {
        Some(path) => {
            let store = crate::backends::open_objects(config).await?;
            crate::train::read_dataset(&path.display().to_string(), store.as_ref()).await?
        }
        None => crate::train::bundled_documents()?,
    };
    if args.validation {
        let plan = sift_training::SplitPlan::default();
        documents.retain(|d| plan.part(d) == sift_training::Part::Validation);
    }
    if args.limit > 0 {
        documents.truncate(args.limit);
    }
    if documents.is_empty() || args.batch == 0 || args.repeat == 0 {
        return Err(TrainCommandError::Invalid(
            "sift bench model needs documents, --batch ≥ 1 and --repeat ≥ 1".into(),
        ));
    }
    let started = Instant::now();
    let encoded = documents
        .iter()
        .map(|d| predictor.encode(&d.full_text()))
        .collect::<Result<Vec<Encoded>, _>>()
        .map_err(|e| TrainCommandError::Invalid(format!("tokenizing: {e}")))?;
    let tokenize_seconds = started.elapsed().as_secs_f64();
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| (encoded[i].ids.len(), i));
    let batches: Vec<Vec<&Encoded>> = order
        .chunks(args.batch)
        .map(|c| c.iter().map(|&i| &encoded[i]).collect())
        .collect();
    let forward = |batch: &[&Encoded]| {
        predictor
            .predict_encoded(batch, 5)
            .map_err(|e| TrainCommandError::Invalid(format!("scoring: {e}")))
    };
    // Warm-up: first-touch allocations, CUDA kernel loading.
    if let Some(first) = batches.last() {
        forward(first)?;
    }
    let mut best = f64::INFINITY;
    let mut tops: Vec<Vec<(u32, f32)>> = Vec::new();
    for _ in 0..args.repeat {
        let started = Instant::now();
        let mut out = Vec::with_capacity(encoded.len());
        for batch in &batches {
            out.extend(forward(batch)?);
        }
        best = best.min(started.elapsed().as_secs_f64());
        tops = out;
    }
    let tokens: usize = encoded.iter().map(|e| e.ids.len()).sum();
    let result = ModelBench {
        docs: encoded.len(),
        tokens,
        seconds: best,
        docs_per_second: encoded.len() as f64 / best,
        tokens_per_second: tokens as f64 / best,
        tokenize_seconds,
        threads,
        batch: args.batch,
        device: format!("{:?}", args.device).to_lowercase(),
        dtype: args.dtype,
        p_at_1: p_at_1(&documents, &encoded, &order, &tops, &predictor),
        int8_kernel: predictor.int8_kernel().map(|k| k.name()),
        cpu: cpu_model(),
        model: serde_json::to_value(predictor.config()).unwrap_or_default(),
    };
    println!(
        "{} documents, {} tokens, batch {}, {} threads, {} {:?}: {:.1} docs/s, {:.0} tokens/s \
         (best of {} passes; tokenizing took {:.2} s apart)",
        result.docs,
        result.tokens,
        result.batch,
        result.threads,
        result.device,
        result.dtype,
        result.docs_per_second,
        result.tokens_per_second,
        args.repeat,
        result.tokenize_seconds
    );
    if let Some(p) = result.p_at_1 {
        println!("P@1 {p:.4} (the first label is one of the document's tags)");
    }
    if let Some(out) = &args.export {
        export(
            out, &documents, &encoded, &order, &tops, &predictor, &result,
        )?;
        println!(
            "wrote {}/{{encoded.jsonl, sift_scores.jsonl, sift.json}}",
            out.display()
        );
    }
    Ok(())
}

/// P@1 of the scored documents (`tops` in `order`), if they have tags.
fn p_at_1(
    documents: &[Document],
    encoded: &[Encoded],
    order: &[usize],
    tops: &[Vec<(u32, f32)>],
    predictor: &Predictor,
) -> Option<f64> {
    if documents.iter().all(|d| d.tags.is_empty()) || tops.len() != encoded.len() {
        return None;
    }
    let hits = order
        .iter()
        .zip(tops)
        .filter(|(&i, top)| {
            top.first()
                .and_then(|&(label, _)| predictor.labels().name(label as usize))
                .is_some_and(|name| documents[i].tags.iter().any(|t| t == name))
        })
        .count();
    Some(hits as f64 / documents.len() as f64)
}

/// Writes the inputs, the top 5 (in input order) and the timing.
fn export(
    out: &std::path::Path,
    documents: &[Document],
    encoded: &[Encoded],
    order: &[usize],
    tops: &[Vec<(u32, f32)>],
    predictor: &Predictor,
    result: &ModelBench,
) -> Result<(), TrainCommandError> {
    let io = |what: &str, e: std::io::Error| {
        TrainCommandError::Sift(crate::Error::io(format!("writing {what}"), e))
    };
    std::fs::create_dir_all(out).map_err(|e| io(&out.display().to_string(), e))?;
    let mut by_input: Vec<Option<&Vec<(u32, f32)>>> = vec![None; encoded.len()];
    for (&i, top) in order.iter().zip(tops) {
        by_input[i] = Some(top);
    }
    let mut enc = std::io::BufWriter::new(
        std::fs::File::create(out.join("encoded.jsonl")).map_err(|e| io("encoded.jsonl", e))?,
    );
    let mut scores = std::io::BufWriter::new(
        std::fs::File::create(out.join("sift_scores.jsonl"))
            .map_err(|e| io("sift_scores.jsonl", e))?,
    );
    for (i, doc) in documents.iter().enumerate() {
        let line =
            serde_json::json!({"id": doc.id, "ids": encoded[i].ids, "ngrams": encoded[i].ngrams});
        writeln!(enc, "{line}").map_err(|e| io("encoded.jsonl", e))?;
        let top = by_input[i]
            .map(|t| predictor.name(t).top)
            .unwrap_or_default();
        let line = serde_json::json!({"id": doc.id, "top5": top});
        writeln!(scores, "{line}").map_err(|e| io("sift_scores.jsonl", e))?;
    }
    enc.flush().map_err(|e| io("encoded.jsonl", e))?;
    scores.flush().map_err(|e| io("sift_scores.jsonl", e))?;
    let json = serde_json::to_string_pretty(result)
        .map_err(|e| TrainCommandError::Invalid(format!("cannot write sift.json: {e}")))?;
    std::fs::write(out.join("sift.json"), json).map_err(|e| io("sift.json", e))?;
    Ok(())
}

/// The CPU's model name from `/proc/cpuinfo` (empty elsewhere): every
/// figure is stated with the CPU that gave it.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_default()
}
