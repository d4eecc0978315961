//! The training loop: AdamW with warmup and cosine decay, gradient clipping,
//! evaluation after every epoch, early stopping, and the best checkpoint kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use serde::{Deserialize, Serialize};
use sift_models::{
    bert, ops, seeded_var_builder, Classifier, ModelConfig, NgramBatch, NgramConfig, Output,
};

use crate::ensemble;
use crate::history::{BaselineRecord, Figures};
use crate::history::{EpochRecord, ModelMetrics, StepRecord};
use crate::linear::{LinearExample, LinearModel, LinearOptions};
use crate::metrics::{top_k, Evaluator, Metric, Metrics, TOP_K};
use crate::{
    model_text, plan_batches, Batch, BatchLimits, Dataset, Document, Example, Labels, NgramHasher,
    SplitPlan, TextTokenizer,
};

/// Names of the files a trained model is made of, in its directory.
pub mod files {
    /// The weights (safetensors).
    pub const MODEL: &str = "model.safetensors";
    /// [`sift_models::ModelConfig`] as JSON.
    pub const CONFIG: &str = "config.json";
    /// The tokenizer (Hugging Face `tokenizers` JSON).
    pub const TOKENIZER: &str = "tokenizer.json";
    /// The label list, in output order.
    pub const LABELS: &str = "labels.json";
    /// [`ModelMetrics`](crate::ModelMetrics) as JSON.
    pub const METRICS: &str = "metrics.json";
    /// The training report page.
    pub const REPORT: &str = "report.html";
    /// The linear model combined with the transformer.
    pub const LINEAR: &str = crate::linear::FILE;
    /// The combination's weight.
    pub const ENSEMBLE: &str = crate::ensemble::FILE;
    /// Every file of a model, in upload order (the weights last but one, the
    /// metrics last, so a reader that sees `metrics.json` sees a whole model).
    pub const ALL: [&str; 8] = [
        CONFIG, TOKENIZER, LABELS, REPORT, LINEAR, ENSEMBLE, MODEL, METRICS,
    ];
    /// Files a model trained before they existed lacks; it scores with the
    /// transformer alone.
    pub const OPTIONAL: [&str; 2] = [LINEAR, ENSEMBLE];
}

/// Model sizes to start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// [`ModelConfig::tiny`] plus the n-gram branch: CPU training and tests.
    #[default]
    Tiny,
    /// [`ModelConfig::base`] plus the n-gram branch: GPU training.
    Base,
}

impl Preset {
    /// Name as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Base => "base",
        }
    }
}

/// A pretrained BERT-style encoder to start from: a directory with
/// `model.safetensors`, `config.json` and `tokenizer.json` (Hugging Face
/// layout, e.g. all-MiniLM-L6-v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pretrained {
    /// The directory.
    pub dir: PathBuf,
}

/// Everything a training run is told.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Model size, unless [`pretrained`](Self::pretrained) is set.
    pub preset: Preset,
    /// Start the encoder from these weights (and their tokenizer).
    pub pretrained: Option<Pretrained>,
    /// Longest input in tokens; None = the preset's.
    pub max_len: Option<usize>,
    /// Vocabulary of the tokenizer trained on the corpus.
    pub vocab_size: usize,
    /// Load this `tokenizer.json` instead of training one.
    pub tokenizer: Option<PathBuf>,
    /// The hashed n-gram branch (buckets, width); None = encoder alone.
    pub ngrams: Option<NgramConfig>,
    /// Sigmoid + BCE or softmax + cross-entropy.
    pub output: Output,
    /// Most epochs.
    pub max_epochs: u32,
    /// The daily budget, in documents shown: fewer epochs on a large corpus
    /// (never fewer than [`MIN_EPOCHS`]), up to `max_epochs` on a small one.
    /// The learning rate's schedule spans the epochs planned. None = always
    /// `max_epochs`.
    pub epoch_budget_documents: Option<u64>,
    /// Stop after this many epochs in which neither [`selection`](Self::selection) nor the
    /// validation loss improved.
    pub patience: u32,
    /// Peak learning rate, reached after warmup.
    pub learning_rate: f64,
    /// The n-gram table's learning rate as a multiple of `learning_rate`
    /// (sparse rows see few updates, so they learn faster with more).
    pub ngram_learning_rate_scale: f64,
    /// Share of all planned steps spent warming the learning rate up from 0.
    pub warmup_fraction: f64,
    /// AdamW weight decay, applied to matrices only (not biases and norms).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub clip_norm: f64,
    /// Batch sizes in padded tokens and documents.
    pub batch: BatchLimits,
    /// Seed of the weights, the batch order and dropout.
    pub seed: u64,
    /// How documents are split into training, tuning, validation and
    /// seen-source parts (by source, then by id).
    pub split: SplitPlan,
    /// The linear anchor trained beside the transformer, scored on the same
    /// documents and combined with it; None = the transformer alone.
    pub linear: Option<LinearOptions>,
    /// Figure that picks the best epoch (default: the mean of the three; on
    /// the full debtags set, hit@5 alone kept epoch 2 of 6 for a 0.002 edge
    /// while epoch 4 was 0.030 better on P@1).
    pub selection: Metric,
    /// Share of training documents, in percent, shown without their
    /// [`Fields`](crate::Fields), so a model that leans on a page's section
    /// and name still scores pages whose site gives neither.
    pub field_dropout_percent: u8,
    /// Where to train.
    pub device: Device,
    /// Show progress bars on stderr.
    pub progress: bool,
}

impl TrainOptions {
    /// Defaults for a preset. Softmax over the normalised multi-hot target
    /// and a peak learning rate of 3e-3 won on the debtags development data
    /// (tiny, 3,000 documents, 6 epochs: P@1 0.742 / hit@5 0.926 against
    /// 0.555 / 0.825 for BCE at the same rate and 0.678 / 0.905 for softmax
    /// at 1e-3); see the README's training section for the full-data run.
    pub fn for_preset(preset: Preset) -> Self {
        let (learning_rate, batch, max_epochs) = match preset {
            Preset::Tiny => (
                3e-3,
                BatchLimits {
                    max_batch_tokens: 4096,
                    max_batch_docs: 32,
                },
                20,
            ),
            Preset::Base => (
                5e-4,
                BatchLimits {
                    max_batch_tokens: 16384,
                    max_batch_docs: 64,
                },
                15,
            ),
        };
        Self {
            preset,
            pretrained: None,
            max_len: None,
            vocab_size: 8000,
            tokenizer: None,
            ngrams: Some(NgramConfig {
                buckets: 1 << 18,
                dim: 64,
            }),
            output: Output::Softmax,
            max_epochs,
            // Four passes over the 21,000 training documents of the debtags
            // development set: 22 minutes on 2 cores, and as good as the
            // 7 epochs an early stop ran on a flat schedule (README).
            epoch_budget_documents: match preset {
                Preset::Tiny => Some(84_000),
                Preset::Base => None,
            },
            patience: 3,
            learning_rate,
            ngram_learning_rate_scale: 10.0,
            warmup_fraction: 0.05,
            weight_decay: 0.01,
            clip_norm: 1.0,
            batch,
            seed: 42,
            split: SplitPlan::default(),
            linear: Some(LinearOptions::default()),
            selection: Metric::Mean,
            field_dropout_percent: 15,
            device: Device::Cpu,
            progress: false,
        }
    }
}

/// What can go wrong training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Not enough usable documents.
    #[error("training data: {0}")]
    Data(String),
    /// Preparing data failed.
    #[error(transparent)]
    Prepare(#[from] crate::Error),
    /// Building or running the model failed.
    #[error(transparent)]
    Model(#[from] sift_models::Error),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Writing an output file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Saving the linear model failed.
    #[error(transparent)]
    Linear(#[from] crate::linear::LinearError),
    /// The loss became NaN or infinite.
    #[error("the training loss diverged ({loss}) at step {step}; lower the learning rate")]
    Diverged {
        /// Step.
        step: u64,
        /// The loss value.
        loss: f32,
    },
}

/// The result of [`train`]: a model directory and its figures.
#[derive(Debug, Clone)]
pub struct Trained {
    /// Directory holding [`files::ALL`].
    pub dir: PathBuf,
    /// What was written to `metrics.json`.
    pub metrics: ModelMetrics,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Encodes one document as `text` (its [`Document::full_text`] or
/// [`Document::text_alone`]); None when it carries nothing to learn from.
fn encode(
    doc: &Document,
    text: &str,
    tokenizer: &TextTokenizer,
    hasher: Option<&NgramHasher>,
    labels: &Labels,
) -> Result<Option<Example>, TrainError> {
    let positives = labels.indices(&doc.tags);
    let rejected = labels.indices(&doc.rejected);
    if positives.is_empty() && rejected.is_empty() {
        return Ok(None);
    }
    let text = model_text(text);
    Ok(Some(Example {
        ids: tokenizer.encode(text).map_err(crate::Error::from)?,
        ngrams: hasher.map(|h| h.hash(text)).unwrap_or_default(),
        labels: positives,
        rejected,
    }))
}

/// Fewest epochs a document budget plans.
pub const MIN_EPOCHS: u32 = 3;

/// Epochs a run plans for `documents` training documents: the budget's
/// share, between [`MIN_EPOCHS`] and `max_epochs`.
pub fn planned_epochs(options: &TrainOptions, documents: usize) -> u32 {
    let most = options.max_epochs.max(1);
    match options.epoch_budget_documents {
        Some(budget) => {
            let epochs = budget.div_ceil(documents.max(1) as u64);
            u32::try_from(epochs)
                .unwrap_or(u32::MAX)
                .clamp(MIN_EPOCHS.min(most), most)
        }
        None => most,
    }
}

/// Whether a training document is in the share shown without its fields:
/// a seeded hash of its id, so the same documents every run and epoch.
pub fn drops_fields(doc: &Document, percent: u8) -> bool {
    percent > 0
        && doc.has_fields()
        && xxhash_rust::xxh3::xxh3_64_with_seed(doc.id.as_bytes(), FIELD_DROPOUT_SEED) % 100
            < u64::from(percent)
}

const FIELD_DROPOUT_SEED: u64 = 0xf1e1d;

/// Tensors of one batch on `device`.
struct BatchTensors {
    ids: Tensor,
    mask: Tensor,
    ngrams: Option<NgramBatch>,
    targets: Tensor,
    weights: Tensor,
    row_weights: Tensor,
    real_tokens: u64,
}

impl BatchTensors {
    fn new(batch: Batch, with_ngrams: bool, device: &Device) -> Result<Self, TrainError> {
        let shape = (batch.docs, batch.width);
        let real_tokens = batch.mask.iter().map(|&m| u64::from(m)).sum();
        Ok(Self {
            ids: Tensor::from_vec(batch.ids, shape, device)?,
            mask: Tensor::from_vec(batch.mask, shape, device)?,
            ngrams: if with_ngrams {
                Some(NgramBatch::from_lists(&batch.ngrams, device)?)
            } else {
                None
            },
            targets: Tensor::from_vec(batch.targets, (batch.docs, batch.num_labels), device)?,
            weights: Tensor::from_vec(batch.weights, (batch.docs, batch.num_labels), device)?,
            row_weights: Tensor::from_vec(batch.row_weights, batch.docs, device)?,
            real_tokens,
        })
    }
}

fn loss_of(logits: &Tensor, batch: &BatchTensors, output: Output) -> candle_core::Result<Tensor> {
    match output {
        Output::Sigmoid => ops::weighted_bce_with_logits(logits, &batch.targets, &batch.weights),
        Output::Softmax => {
            ops::soft_target_cross_entropy(logits, &batch.targets, &batch.row_weights)
        }
    }
}

/// Scores `examples` with `model` (no dropout): validation figures and the
/// mean loss.
pub fn evaluate(
    model: &Classifier,
    examples: &[Example],
    labels: &Labels,
    limits: BatchLimits,
    device: &Device,
) -> Result<(Metrics, f64), TrainError> {
    let config = model.config();
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let mut evaluator = Evaluator::new(labels.len());
    let (mut loss_sum, mut loss_docs) = (0.0, 0usize);
    for indices in plan_batches(&lengths, limits, 0) {
        let batch = Batch::collate(examples, &indices, labels.len());
        let tensors = BatchTensors::new(batch, config.ngrams.is_some(), device)?;
        let logits = model.forward(&tensors.ids, &tensors.mask, tensors.ngrams.as_ref(), false)?;
        let loss = loss_of(&logits, &tensors, config.output)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        loss_sum += f64::from(loss) * indices.len() as f64;
        loss_docs += indices.len();
        let scores = ops::scores(&logits, config.output)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (row, &i) in scores.iter().zip(&indices) {
            evaluator.add(&top_k(row, TOP_K), &examples[i].labels);
        }
    }
    let loss = if loss_docs == 0 {
        0.0
    } else {
        loss_sum / loss_docs as f64
    };
    Ok((evaluator.finish(labels), loss))
}

/// The anchor's name in reports.
pub const BASELINE_NAME: &str = "TF-IDF (1,2)-grams + one-vs-rest linear SVM";

/// What the report calls the shipped model's linear half when it reads
/// character grams too.
pub const LINEAR_HALF_NAME: &str =
    "TF-IDF word (1,2)-grams and character (2–5)-grams + one-vs-rest linear SVM";

/// A part's examples and the text of each, aligned.
#[derive(Default)]
struct Encoded {
    examples: Vec<Example>,
    texts: Vec<String>,
}

/// What the shipped model scored on each held-out part.
struct Shipped {
    validation: Metrics,
    tuning: Metrics,
    seen: Option<Figures>,
    text_alone: Option<Figures>,
    baseline: Option<BaselineRecord>,
    ensemble: Option<crate::EnsembleRecord>,
}

/// Every label's score (probabilities for softmax, sigmoids otherwise) for
/// each of `examples`, in their order.
fn score_rows(
    model: &Classifier,
    examples: &[Example],
    limits: BatchLimits,
    device: &Device,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let config = model.config();
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let mut out = vec![Vec::new(); examples.len()];
    for indices in plan_batches(&lengths, limits, 0) {
        let batch = Batch::collate(examples, &indices, config.num_labels);
        let tensors = BatchTensors::new(batch, config.ngrams.is_some(), device)?;
        let logits = model.forward(&tensors.ids, &tensors.mask, tensors.ngrams.as_ref(), false)?;
        let scores = ops::scores(&logits, config.output)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (row, i) in scores.into_iter().zip(indices) {
            out[i] = row;
        }
    }
    Ok(out)
}

/// Learning rate at `step` of `total`: linear warmup, then cosine decay to 0.
pub fn learning_rate_at(step: u64, total: u64, warmup: u64, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Sum of squares of every gradient of `vars`.
fn gradient_norm_sq(grads: &GradStore, vars: &[Var]) -> candle_core::Result<f64> {
    let mut squares = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            squares += f64::from(
                g.sqr()?
                    .sum_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?,
            );
        }
    }
    Ok(squares)
}

/// The factor that brings a global gradient norm down to `max_norm`
/// (1 when it is already below, or when clipping is off).
fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

fn scale_gradients(grads: &mut GradStore, vars: &[Var], scale: f64) -> candle_core::Result<()> {
    if scale == 1.0 {
        return Ok(());
    }
    for var in vars {
        if let Some(g) = grads.remove(var.as_tensor()) {
            grads.insert(var.as_tensor(), (g * scale)?);
        }
    }
    Ok(())
}

/// The n-gram table's variable name (see `sift_models::Classifier`).
const NGRAM_TABLE: &str = "ngrams.weight";

/// Every variable by name, sorted: a `VarMap` is a hash map, and summing
/// gradient norms in a varying order would make runs differ in the last bits.
fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The model config for `options` given the tokenizer and labels.
fn model_config(
    options: &TrainOptions,
    tokenizer: &TextTokenizer,
    num_labels: usize,
    pretrained_config: Option<&str>,
) -> Result<ModelConfig, TrainError> {
    let mut config = match pretrained_config {
        Some(json) => bert::config_from_bert(json, num_labels, tokenizer.max_len())?,
        None => match options.preset {
            Preset::Tiny => ModelConfig::tiny(tokenizer.vocab_size(), num_labels),
            Preset::Base => ModelConfig::base(tokenizer.vocab_size(), num_labels),
        },
    };
    config.max_len = tokenizer.max_len();
    config.output = options.output;
    config.ngrams = options.ngrams;
    config.validate().map_err(sift_models::Error::from)?;
    Ok(config)
}

/// Folds analysts' feedback into the dataset. A feedback document with the
/// id of a dataset document amends it: its labels are added, its rejected
/// labels removed from the tags and kept as rejections (the analyst is the
/// later word). Other feedback documents are added as they are. Returns the
/// number of documents feedback touched.
pub fn merge_feedback(documents: &mut Vec<Document>, feedback: Vec<Document>) -> u64 {
    let mut by_id: std::collections::HashMap<String, usize> = documents
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.clone(), i))
        .collect();
    let mut touched = 0;
    for fb in feedback {
        touched += 1;
        match by_id.get(&fb.id) {
            Some(&i) => {
                let doc = &mut documents[i];
                for tag in fb.tags {
                    if !doc.tags.contains(&tag) {
                        doc.tags.push(tag);
                    }
                }
                doc.tags.retain(|t| !fb.rejected.contains(t));
                for label in fb.rejected {
                    if !doc.rejected.contains(&label) {
                        doc.rejected.push(label);
                    }
                }
                if doc.text.is_empty() {
                    doc.text = fb.text;
                }
            }
            None => {
                by_id.insert(fb.id.clone(), documents.len());
                documents.push(fb);
            }
        }
    }
    touched
}

/// Trains a model on `documents` plus analysts' `feedback` (see
/// [`merge_feedback`]) and writes it to `out_dir` (created if missing):
/// [`files::ALL`]. Documents are split into training and validation by a
/// hash of their id ([`crate::is_validation`]).
pub fn train(
    mut documents: Vec<Document>,
    feedback: Vec<Document>,
    options: &TrainOptions,
    out_dir: &Path,
) -> Result<Trained, TrainError> {
    let started = Instant::now();
    std::fs::create_dir_all(out_dir).map_err(io_error(out_dir))?;
    let feedback_documents = merge_feedback(&mut documents, feedback);
    let labels = Labels::from_documents(&documents);
    if labels.is_empty() {
        return Err(TrainError::Data(
            "no document carries a label; every line needs a non-empty `tags` array".into(),
        ));
    }
    let [train_set, tuning_set, validation_set, seen_set] =
        Dataset { documents }.split_parts(&options.split);
    let validation_fingerprint = fingerprint(&validation_set.documents);

    // Tokenizer: the pretrained one, a given one, or one trained on the
    // training split only (validation text must not shape it).
    let default_max_len = match options.preset {
        Preset::Tiny => ModelConfig::tiny(1, 1).max_len,
        Preset::Base => ModelConfig::base(1, 1).max_len,
    };
    let max_len = options.max_len.unwrap_or(default_max_len);
    let pretrained_config = match &options.pretrained {
        Some(p) => {
            let path = p.dir.join(files::CONFIG);
            Some(std::fs::read_to_string(&path).map_err(io_error(&path))?)
        }
        None => None,
    };
    let tokenizer_path = match (&options.pretrained, &options.tokenizer) {
        (_, Some(path)) => Some(path.clone()),
        (Some(p), None) => Some(p.dir.join(files::TOKENIZER)),
        (None, None) => None,
    };
    let tokenizer = match tokenizer_path {
        Some(path) => TextTokenizer::load(path, max_len).map_err(crate::Error::from)?,
        None => {
            let texts: Vec<String> = train_set
                .documents
                .iter()
                .map(|d| model_text(&d.full_text()).to_owned())
                .collect();
            TextTokenizer::train(texts.iter(), options.vocab_size, max_len)
                .map_err(crate::Error::from)?
        }
    };
    let config = model_config(
        options,
        &tokenizer,
        labels.len(),
        pretrained_config.as_deref(),
    )?;
    let hasher = config
        .ngrams
        .map(|n| NgramHasher::new(u32::try_from(n.buckets).unwrap_or(u32::MAX)));

    // Examples and, aligned with them, the text the linear model reads.
    // Training documents in the dropout share are shown without their
    // fields, so a page whose site says nothing is still scored well; the
    // held-out parts are scored as they are.
    let encode_all =
        |set: &Dataset, labelled_only: bool, dropout: u8| -> Result<Encoded, TrainError> {
            let mut out = Encoded::default();
            for doc in &set.documents {
                let text = if drops_fields(doc, dropout) {
                    doc.text_alone()
                } else {
                    doc.full_text()
                };
                if let Some(example) = encode(doc, &text, &tokenizer, hasher.as_ref(), &labels)? {
                    if labelled_only && example.labels.is_empty() {
                        continue;
                    }
                    out.texts.push(model_text(&text).to_owned());
                    out.examples.push(example);
                }
            }
            Ok(out)
        };
    let train_encoded = encode_all(&train_set, false, options.field_dropout_percent)?;
    let train_examples = &train_encoded.examples;
    let tuning = encode_all(&tuning_set, true, 0)?;
    let validation = encode_all(&validation_set, true, 0)?;
    let seen = encode_all(&seen_set, true, 0)?;
    // The validation documents again with their fields taken away: what the
    // model does for a site that says nothing about its pages.
    let bare = if validation_set.documents.iter().any(Document::has_fields) {
        encode_all(&validation_set, true, 100)?
    } else {
        Encoded::default()
    };
    if train_examples.is_empty() || validation.examples.is_empty() || tuning.examples.is_empty() {
        return Err(TrainError::Data(format!(
            "{} training, {} tuning and {} validation documents with labels; each part needs \
             some (add data, or data from more sources, or raise the shares)",
            train_examples.len(),
            tuning.examples.len(),
            validation.examples.len()
        )));
    }

    let device = &options.device;
    if device.is_cuda() {
        // Weights, moments and the loss stay f32; matrix products use TF32
        // tensor cores, which is where a GPU's time goes.
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        device.set_seed(options.seed)?;
    }
    let varmap = VarMap::new();
    let model = Classifier::new(
        &config,
        seeded_var_builder(&varmap, options.seed, DType::F32, device),
    )?;
    model.seed_dropout(options.seed);
    if let Some(p) = &options.pretrained {
        let path = p.dir.join(files::MODEL);
        let tensors = candle_core::safetensors::load(&path, device)?;
        // Checkpoints come in f16/bf16 as often as f32; the weights train in f32.
        let tensors = tensors
            .into_iter()
            .map(|(name, t)| {
                let t = if t.dtype().is_float() {
                    t.to_dtype(DType::F32)?
                } else {
                    t
                };
                Ok((name, t))
            })
            .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()?;
        let weights = bert::convert(tensors, &config)?;
        let mut varmap = varmap.clone();
        varmap.set(weights.iter())?;
    }
    let named = sorted_vars(&varmap);
    let ngram_var = named
        .iter()
        .find(|(name, _)| name == NGRAM_TABLE)
        .map(|(_, v)| v.clone());
    let mut sparse = match (&ngram_var, config.ngrams) {
        (Some(var), Some(n)) => Some(crate::sparse::SparseNgrams::new(
            var.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            n.dim,
        )),
        _ => None,
    };
    let dense: Vec<Var> = named
        .into_iter()
        .filter(|(name, _)| name != NGRAM_TABLE)
        .map(|(_, v)| v)
        .collect();
    let (decay, no_decay): (Vec<Var>, Vec<Var>) = dense
        .iter()
        .cloned()
        .partition(|v| v.as_tensor().rank() >= 2);
    // Copies the host n-gram table into the model before it is evaluated
    // or saved.
    let sync_ngrams = |sparse: &Option<crate::sparse::SparseNgrams>| -> Result<(), TrainError> {
        if let (Some(var), Some(sparse)) = (&ngram_var, sparse) {
            let shape = var.as_tensor().shape().clone();
            var.set(&Tensor::from_slice(sparse.table(), shape, device)?)?;
        }
        Ok(())
    };
    let adam = |vars: Vec<Var>, weight_decay: f64| {
        AdamW::new(
            vars,
            ParamsAdamW {
                lr: options.learning_rate,
                weight_decay,
                ..ParamsAdamW::default()
            },
        )
    };
    let mut optimizers = [adam(decay, options.weight_decay)?, adam(no_decay, 0.0)?];

    let lengths: Vec<usize> = train_examples.iter().map(|e| e.ids.len()).collect();
    let steps_per_epoch = plan_batches(&lengths, options.batch, options.seed).len() as u64;
    let max_epochs = planned_epochs(options, train_examples.len());
    let total_steps = steps_per_epoch * u64::from(max_epochs);
    let warmup = ((total_steps as f64 * options.warmup_fraction) as u64).max(1);
    let record_every = (steps_per_epoch / 20).max(1);

    let bar = if options.progress {
        indicatif::ProgressBar::new(steps_per_epoch)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );

    let model_path = out_dir.join(files::MODEL);
    let mut epochs: Vec<EpochRecord> = Vec::new();
    let mut steps: Vec<StepRecord> = Vec::new();
    let mut best: Option<(f64, f64, Metrics)> = None;
    let mut best_epoch = 0u32;
    let mut lowest_loss = f64::INFINITY;
    let mut since_best = 0u32;
    let mut step = 0u64;
    let mut train_tokens_total = 0u64;
    let mut train_seconds_total = 0f64;
    let mut stopped_early = false;

    for epoch in 1..=max_epochs {
        let epoch_started = Instant::now();
        let plan = plan_batches(&lengths, options.batch, options.seed + u64::from(epoch));
        bar.reset();
        bar.set_length(plan.len() as u64);
        bar.set_prefix(format!("epoch {epoch}/{max_epochs}"));
        let (mut epoch_loss, mut epoch_batches, mut epoch_tokens) = (0f64, 0u64, 0u64);
        let (mut window_loss, mut window_steps) = (0f64, 0u64);
        for indices in &plan {
            let batch = Batch::collate(train_examples, indices, labels.len());
            let lists = batch.ngrams.clone();
            let tensors = BatchTensors::new(batch, false, device)?;
            let bag = match (&sparse, config.ngrams) {
                (Some(sparse), Some(n)) => Some(Var::from_tensor(&Tensor::from_vec(
                    sparse.bag(&lists),
                    (lists.len(), n.dim),
                    device,
                )?)?),
                _ => None,
            };
            let logits = model.forward_with_bag(
                &tensors.ids,
                &tensors.mask,
                bag.as_ref().map(Var::as_tensor),
                true,
            )?;
            let loss = loss_of(&logits, &tensors, config.output)?;
            let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            if !value.is_finite() {
                bar.abandon();
                return Err(TrainError::Diverged { step, loss: value });
            }
            let mut grads = loss.backward()?;
            let sparse_grad = match (&sparse, &bag) {
                (Some(sparse), Some(bag)) => match grads.get(bag.as_tensor()) {
                    Some(g) => Some(sparse.gradient(&lists, &g.flatten_all()?.to_vec1::<f32>()?)),
                    None => None,
                },
                _ => None,
            };
            let norm_sq = gradient_norm_sq(&grads, &dense)?
                + sparse_grad.as_ref().map_or(0.0, |g| g.norm_sq());
            let scale = clip_scale(norm_sq.sqrt(), options.clip_norm);
            scale_gradients(&mut grads, &dense, scale)?;
            let lr = learning_rate_at(step, total_steps, warmup, options.learning_rate);
            for optimizer in &mut optimizers {
                optimizer.set_learning_rate(lr);
                optimizer.step(&grads)?;
            }
            if let (Some(sparse), Some(g)) = (&mut sparse, &sparse_grad) {
                sparse.step(g, lr * options.ngram_learning_rate_scale, scale);
            }
            step += 1;
            epoch_loss += f64::from(value);
            epoch_batches += 1;
            epoch_tokens += tensors.real_tokens;
            window_loss += f64::from(value);
            window_steps += 1;
            if step.is_multiple_of(record_every) {
                steps.push(StepRecord {
                    step,
                    epoch: f64::from(epoch - 1) + epoch_batches as f64 / plan.len() as f64,
                    loss: window_loss / window_steps as f64,
                    learning_rate: lr,
                });
                (window_loss, window_steps) = (0.0, 0);
            }
            let elapsed = epoch_started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4} · {:.0} tok/s",
                epoch_loss / epoch_batches as f64,
                epoch_tokens as f64 / elapsed
            ));
            bar.inc(1);
        }
        let train_seconds = epoch_started.elapsed().as_secs_f64();
        train_seconds_total += train_seconds;
        train_tokens_total += epoch_tokens;

        bar.set_message("evaluating");
        sync_ngrams(&sparse)?;
        // The tuning split picks the epoch; the validation split is only
        // reported, so its figures are not chosen for.
        let (metrics, validation_loss) =
            evaluate(&model, &tuning.examples, &labels, options.batch, device)?;
        // Best by the selection metric, ties going to the lower validation
        // loss. Patience counts epochs in which neither improved: the
        // metric can sit on a plateau (the most frequent labels) while the
        // loss still shows the model learning.
        let score = options.selection.of(&metrics);
        let improved = best
            .as_ref()
            .is_none_or(|(b, loss, _)| score > *b || (score == *b && validation_loss < *loss));
        let loss_improved = validation_loss < lowest_loss;
        lowest_loss = lowest_loss.min(validation_loss);
        if improved {
            // The n-gram table was copied into the model before evaluating.
            varmap.save(&model_path)?;
            best = Some((score, validation_loss, metrics.clone()));
            best_epoch = epoch;
        }
        if improved || loss_improved {
            since_best = 0;
        } else {
            since_best += 1;
        }
        let record = EpochRecord {
            epoch,
            train_loss: epoch_loss / epoch_batches.max(1) as f64,
            validation_loss,
            p_at_1: metrics.p_at_1,
            hit_at_5: metrics.hit_at_5,
            recall_at_5: metrics.recall_at_5,
            tokens_per_second: epoch_tokens as f64 / train_seconds.max(1e-9),
            seconds: epoch_started.elapsed().as_secs_f64(),
            best: improved,
        };
        let line = format!(
            "epoch {epoch}: train loss {:.4} · validation loss {:.4} · P@1 {:.3} · hit@5 {:.3} · \
             recall@5 {:.3} · {:.0} tok/s{}",
            record.train_loss,
            record.validation_loss,
            record.p_at_1,
            record.hit_at_5,
            record.recall_at_5,
            record.tokens_per_second,
            if improved { " · best" } else { "" }
        );
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
        epochs.push(record);
        if since_best >= options.patience && epoch < max_epochs {
            stopped_early = true;
            break;
        }
    }
    bar.finish_and_clear();

    best.expect("at least one epoch ran, and the first always counts as best");
    // The kept epoch's weights back into the model, then every held-out
    // part scored with them.
    {
        let mut varmap = varmap.clone();
        varmap.load(&model_path)?;
    }
    let truth = |part: &Encoded| -> Vec<Vec<u32>> {
        part.examples.iter().map(|e| e.labels.clone()).collect()
    };
    let rows = |part: &Encoded| score_rows(&model, &part.examples, options.batch, device);
    let (tuning_p, validation_p, seen_p) = (rows(&tuning)?, rows(&validation)?, rows(&seen)?);
    let bare_p = rows(&bare)?;
    let figures_of = |rows: &[Vec<f32>], part: &Encoded| {
        (!part.examples.is_empty())
            .then(|| Figures::from(&ensemble::evaluate_rows(rows, &truth(part), &labels)))
    };
    let transformer = ensemble::evaluate_rows(&validation_p, &truth(&validation), &labels);
    let mut shipped = Shipped {
        validation: transformer.clone(),
        tuning: ensemble::evaluate_rows(&tuning_p, &truth(&tuning), &labels),
        seen: figures_of(&seen_p, &seen),
        text_alone: figures_of(&bare_p, &bare),
        baseline: None,
        ensemble: None,
    };
    if let Some(linear_options) = &options.linear {
        bar.set_message("training the linear model");
        let linear_started = Instant::now();
        let examples: Vec<LinearExample<'_>> = train_encoded
            .texts
            .iter()
            .zip(train_examples)
            .map(|(text, e)| LinearExample {
                text,
                labels: &e.labels,
                rejected: &e.rejected,
            })
            .collect();
        // The classic anchor, word grams alone, is the baseline the report
        // compares with; the linear half of the shipped model may read
        // character grams too, and is trained apart when it does.
        let anchor_options = LinearOptions {
            char_grams: false,
            ..*linear_options
        };
        let anchor = LinearModel::train(&examples, labels.len(), &anchor_options);
        let linear_seconds = linear_started.elapsed().as_secs_f64();
        let with_chars;
        let half_started = Instant::now();
        let linear = if linear_options.char_grams {
            bar.set_message("training the linear half with character grams");
            with_chars = LinearModel::train(&examples, labels.len(), linear_options);
            &with_chars
        } else {
            &anchor
        };
        let half_seconds = half_started.elapsed().as_secs_f64();
        let scores_of = |model: &LinearModel, part: &Encoded| -> Vec<Vec<f32>> {
            use rayon::prelude::*;
            part.texts.par_iter().map(|t| model.scores(t)).collect()
        };
        let scores = |part: &Encoded| scores_of(linear, part);
        let (anchor_validation, anchor_seen) = if linear_options.char_grams {
            (scores_of(&anchor, &validation), scores_of(&anchor, &seen))
        } else {
            (Vec::new(), Vec::new())
        };
        let (tuning_s, validation_s, seen_s, bare_s) = (
            scores(&tuning),
            scores(&validation),
            scores(&seen),
            scores(&bare),
        );
        let (choice, grid) = ensemble::fit(
            &tuning_p,
            &tuning_s,
            &truth(&tuning),
            &labels,
            options.selection,
        );
        let combined = |p: &[Vec<f32>], s: &[Vec<f32>]| -> Vec<Vec<f32>> {
            p.iter()
                .zip(s)
                .map(|(p, s)| ensemble::combine(p, s, &choice))
                .collect()
        };
        shipped.validation = ensemble::evaluate_rows(
            &combined(&validation_p, &validation_s),
            &truth(&validation),
            &labels,
        );
        shipped.tuning =
            ensemble::evaluate_rows(&combined(&tuning_p, &tuning_s), &truth(&tuning), &labels);
        shipped.seen = figures_of(&combined(&seen_p, &seen_s), &seen);
        shipped.text_alone = figures_of(&combined(&bare_p, &bare_s), &bare);
        let (anchor_validation, anchor_seen) = if linear_options.char_grams {
            (&anchor_validation, &anchor_seen)
        } else {
            (&validation_s, &seen_s)
        };
        let half = linear_options.char_grams.then(|| crate::LinearHalfRecord {
            name: LINEAR_HALF_NAME.to_owned(),
            validation: Figures::from(&ensemble::evaluate_rows(
                &validation_s,
                &truth(&validation),
                &labels,
            )),
            seconds: half_seconds,
            features: linear.num_features() as u64,
            weights: linear.num_weights() as u64,
        });
        shipped.baseline = Some(BaselineRecord {
            name: BASELINE_NAME.to_owned(),
            validation: Figures::from(&ensemble::evaluate_rows(
                anchor_validation,
                &truth(&validation),
                &labels,
            )),
            seen: figures_of(anchor_seen, &seen),
            seconds: linear_seconds,
            features: anchor.num_features() as u64,
            weights: anchor.num_weights() as u64,
        });
        linear.save(&out_dir.join(files::LINEAR))?;
        let path = out_dir.join(files::ENSEMBLE);
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&choice).expect("a number always serialises"),
        )
        .map_err(io_error(&path))?;
        shipped.ensemble = Some(crate::EnsembleRecord {
            linear_weight: choice.linear_weight,
            form: choice.form,
            linear_scale: choice.linear_scale,
            grid,
            linear: half,
        });
    }
    let Shipped {
        validation: validation_metrics,
        tuning: tuning_metrics,
        seen: seen_figures,
        text_alone,
        baseline,
        ensemble: ensemble_record,
    } = shipped;
    let write = |name: &str, bytes: &[u8]| -> Result<(), TrainError> {
        let path = out_dir.join(name);
        std::fs::write(&path, bytes).map_err(io_error(&path))
    };
    write(files::CONFIG, config.to_json().as_bytes())?;
    tokenizer
        .save(out_dir.join(files::TOKENIZER))
        .map_err(crate::Error::from)?;
    labels
        .save(out_dir.join(files::LABELS))
        .map_err(crate::Error::from)?;
    let metrics = ModelMetrics {
        validation: validation_metrics,
        selection_metric: options.selection.name().to_owned(),
        best_epoch,
        stopped_early,
        tokens_per_second: train_tokens_total as f64 / train_seconds_total.max(1e-9),
        wall_seconds: started.elapsed().as_secs_f64(),
        train_documents: train_examples.len() as u64,
        validation_documents: validation.examples.len() as u64,
        split: Some(options.split),
        tuning_documents: tuning.examples.len() as u64,
        transformer: Some(Figures::from(&transformer)),
        baseline,
        ensemble: ensemble_record,
        tuning: Some(Figures::from(&tuning_metrics)),
        seen: seen_figures,
        text_alone,
        epochs_planned: max_epochs,
        field_dropout_percent: options.field_dropout_percent,
        validation_fingerprint,
        feedback_documents,
        preset: if options.pretrained.is_some() {
            "pretrained".to_owned()
        } else {
            options.preset.name().to_owned()
        },
        loss: match config.output {
            Output::Sigmoid => "bce",
            Output::Softmax => "softmax",
        }
        .to_owned(),
        device: if device.is_cuda() {
            format!("{} f32 (TF32 matmul)", device_name(device))
        } else {
            format!("{} f32", device_name(device))
        },
        seed: options.seed,
        epochs,
        steps,
    };
    let title = format!(
        "sift {} model: hit@5 {:.3}",
        metrics.preset, metrics.validation.hit_at_5
    );
    write(
        files::REPORT,
        crate::render_report(&metrics, &title).as_bytes(),
    )?;
    write(
        files::METRICS,
        &serde_json::to_vec_pretty(&metrics).expect("numbers and strings always serialise"),
    )?;
    Ok(Trained {
        dir: out_dir.to_path_buf(),
        metrics,
    })
}

/// xxh3 over the sorted `id` + sorted tags of `documents`, hex.
pub fn fingerprint(documents: &[Document]) -> String {
    let mut lines: Vec<String> = documents
        .iter()
        .map(|d| {
            let mut tags = d.tags.clone();
            tags.sort();
            format!("{}\t{}", d.id, tags.join(","))
        })
        .collect();
    lines.sort();
    format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(lines.join("\n").as_bytes())
    )
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_owned(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_decays_to_zero() {
        let peak = 1e-3;
        assert!((learning_rate_at(0, 100, 10, peak) - 1e-4).abs() < 1e-12);
        assert!((learning_rate_at(9, 100, 10, peak) - peak).abs() < 1e-12);
        assert!((learning_rate_at(10, 100, 10, peak) - peak).abs() < 1e-12);
        let mid = learning_rate_at(55, 100, 10, peak);
        assert!((mid - peak / 2.0).abs() < 1e-9, "{mid}");
        assert!(learning_rate_at(100, 100, 10, peak) < 1e-12);
        assert!(learning_rate_at(500, 100, 10, peak) < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let a = Var::new(&[1f32, 2.0], &device)?;
        let b = Var::new(&[[3f32]], &device)?;
        // d/da sum(3a) = 3, d/db sum(4b) = 4 → global norm sqrt(9+9+16).
        let loss = ((a.as_tensor() * 3.0)?.sum_all()? + (b.as_tensor() * 4.0)?.sum_all()?)?;
        let mut grads = loss.backward()?;
        let vars = vec![a.clone(), b.clone()];
        let norm = gradient_norm_sq(&grads, &vars)?.sqrt();
        assert!((norm - 34f64.sqrt()).abs() < 1e-5);
        scale_gradients(&mut grads, &vars, clip_scale(norm, 1.0))?;
        let after = gradient_norm_sq(&grads, &vars)?.sqrt();
        assert!((after - 1.0).abs() < 1e-4, "{after}");
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert_eq!(clip_scale(50.0, 0.0), 1.0);
        Ok(())
    }
}
