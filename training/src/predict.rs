//! A trained model loaded for scoring: what `sift classify`, the registry's
//! gate and the inference daemon use.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sift_models::{
    ops, Classifier, Int8Kernel, ModelConfig, NgramBatch, PackedEncoder, PackedInput, Precision,
};

use crate::ensemble::{self, Ensemble};
use crate::linear::{Features, LinearModel};
use crate::metrics::{top_k, Evaluator, Metrics, TOP_K};
use crate::train::files;
use crate::{model_text, plan_batches, BatchLimits, Document, Labels, NgramHasher, TextTokenizer};

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// A file of the model directory is missing or unreadable.
    #[error("model file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The config, tokenizer or labels do not fit together.
    #[error("model at {dir}: {reason}")]
    Mismatch {
        /// The model directory.
        dir: String,
        /// What does not fit.
        reason: String,
    },
    /// Tokenizer or labels failed.
    #[error(transparent)]
    Prepare(#[from] crate::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] sift_models::Error),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// One label and its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Label name.
    pub label: String,
    /// Score in [0, 1]: a sigmoid or a softmax share per the model config,
    /// or, combined with the linear half, the ensemble's score
    /// ([`crate::ensemble`]).
    pub score: f32,
}

/// A document's top labels, best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Highest scores first.
    pub top: Vec<Scored>,
}

/// A text encoded for the model; cheap to build on a worker thread.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Encoded {
    /// Token ids, truncated to the model's `max_len`.
    pub ids: Vec<u32>,
    /// N-gram bucket ids (empty when the model has no n-gram branch).
    pub ngrams: Vec<u32>,
    /// The linear model's TF-IDF features (empty without one).
    pub features: Features,
}

/// One batch's input positions and their top labels, row for row.
type ScoredBatch = (Vec<usize>, Vec<Vec<(u32, f32)>>);

/// How the model runs.
#[derive(Debug)]
enum Backend {
    /// Candle's tensors on the load device (a GPU, or a CPU in half
    /// precision).
    Candle(Classifier),
    /// f32 or int8 on the CPU: the packed encoder computes the same scores
    /// (f32) several times faster, and holds the only copy of the weights.
    Packed(PackedEncoder),
}

/// The arithmetic a [`Predictor`] computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arithmetic {
    /// Floating point of this dtype (f32 on the CPU; bf16 or f16 on a GPU).
    Float(DType),
    /// The encoder's linear layers in int8 on the CPU, with this kernel
    /// (see `sift_models::int8`); `None` picks the CPU's best.
    Int8(Option<Int8Kernel>),
}

/// A loaded model directory ([`files::ALL`]).
#[derive(Debug)]
pub struct Predictor {
    model: Backend,
    tokenizer: TextTokenizer,
    labels: Labels,
    hasher: Option<NgramHasher>,
    /// The linear model and its weight in the combination, when the model
    /// directory has them (models trained before them score alone).
    linear: Option<(LinearModel, Ensemble)>,
    device: Device,
}

impl Predictor {
    /// Loads `config.json`, `model.safetensors`, `tokenizer.json` and
    /// `labels.json` from `dir` onto `device`, computing in `dtype` (f32 on
    /// the CPU; bf16 or f16 on a GPU halves memory and time).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, PredictError> {
        Self::load_as(dir, device, Arithmetic::Float(dtype))
    }

    /// [`load`](Self::load) in any [`Arithmetic`]; int8 only on the CPU.
    pub fn load_as(
        dir: &Path,
        device: &Device,
        arithmetic: Arithmetic,
    ) -> Result<Self, PredictError> {
        let dtype = match arithmetic {
            Arithmetic::Float(dtype) => dtype,
            Arithmetic::Int8(_) if !device.is_cpu() => {
                return Err(PredictError::Mismatch {
                    dir: dir.display().to_string(),
                    reason: "int8 runs on the CPU only; on a GPU use bf16 or f16".into(),
                })
            }
            Arithmetic::Int8(_) => DType::F32,
        };
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| PredictError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        let mismatch = |reason: String| PredictError::Mismatch {
            dir: dir.display().to_string(),
            reason,
        };
        let config =
            ModelConfig::from_json(&read(files::CONFIG)?).map_err(sift_models::Error::from)?;
        let labels = Labels::load(dir.join(files::LABELS)).map_err(crate::Error::from)?;
        if labels.len() != config.num_labels {
            return Err(mismatch(format!(
                "labels.json has {} labels but config.json says {}",
                labels.len(),
                config.num_labels
            )));
        }
        let tokenizer = TextTokenizer::load(dir.join(files::TOKENIZER), config.max_len)
            .map_err(crate::Error::from)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(mismatch(format!(
                "tokenizer.json has {} tokens but the model embeds only {}",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let weights = dir.join(files::MODEL);
        if !weights.is_file() {
            return Err(PredictError::Io {
                path: weights.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let classifier = Classifier::load_safetensors(&config, &[weights], dtype, device)?;
        let model = if let Arithmetic::Int8(kernel) = arithmetic {
            let kernel = kernel.unwrap_or_else(Int8Kernel::detect);
            Backend::Packed(PackedEncoder::with_precision(
                &classifier,
                Precision::Int8(kernel),
            )?)
        } else if device.is_cpu() && dtype == DType::F32 {
            Backend::Packed(PackedEncoder::from_classifier(&classifier)?)
        } else {
            Backend::Candle(classifier)
        };
        let hasher = config
            .ngrams
            .map(|n| NgramHasher::new(u32::try_from(n.buckets).unwrap_or(u32::MAX)));
        let linear_path = dir.join(files::LINEAR);
        let ensemble_path = dir.join(files::ENSEMBLE);
        let linear = match (linear_path.is_file(), ensemble_path.is_file()) {
            (false, false) => None,
            (true, true) => {
                let ensemble: Ensemble = serde_json::from_str(&read(files::ENSEMBLE)?)
                    .map_err(|e| mismatch(format!("{}: {e}", files::ENSEMBLE)))?;
                let linear = LinearModel::load(&linear_path, labels.len())
                    .map_err(|e| mismatch(e.to_string()))?;
                Some((linear, ensemble))
            }
            (true, false) | (false, true) => {
                return Err(mismatch(format!(
                    "{} and {} come together; copy the whole model directory",
                    files::LINEAR,
                    files::ENSEMBLE
                )))
            }
        };
        Ok(Self {
            model,
            tokenizer,
            labels,
            hasher,
            linear,
            device: device.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        match &self.model {
            Backend::Candle(model) => model.config(),
            Backend::Packed(model) => model.config(),
        }
    }

    /// The int8 kernel the encoder runs, if it runs in int8.
    pub fn int8_kernel(&self) -> Option<Int8Kernel> {
        match &self.model {
            Backend::Packed(model) => match model.precision() {
                Precision::Int8(kernel) => Some(kernel),
                Precision::F32 => None,
            },
            Backend::Candle(_) => None,
        }
    }

    /// The labels, in output order.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The linear model combined with the transformer, if any.
    pub fn linear(&self) -> Option<&LinearModel> {
        self.linear.as_ref().map(|(l, _)| l)
    }

    /// The transformer's full score row combined with the linear model's,
    /// then its `k` best labels.
    fn finish_row(&self, row: &[f32], features: &Features, k: usize) -> Vec<(u32, f32)> {
        match &self.linear {
            Some((linear, ensemble)) => top_k(
                &ensemble::combine(row, &linear.scores_of(features), ensemble),
                k,
            ),
            None => top_k(row, k),
        }
    }

    /// [`finish_row`](Self::finish_row) for each row of a batch; with a
    /// linear half, on the rayon pool (its sparse products cost as much as
    /// a third of the transformer's time).
    fn finish_rows(&self, rows: &[&[f32]], batch: &[&Encoded], k: usize) -> Vec<Vec<(u32, f32)>> {
        use rayon::prelude::*;
        if self.linear.is_some() && rows.len() > 1 {
            rows.par_iter()
                .zip(batch.par_iter())
                .map(|(row, e)| self.finish_row(row, &e.features, k))
                .collect()
        } else {
            rows.iter()
                .zip(batch)
                .map(|(row, e)| self.finish_row(row, &e.features, k))
                .collect()
        }
    }

    /// Tokenizes and hashes one text (title and body joined as
    /// [`Document::full_text`] does). Never fails on length: long texts are
    /// cut ([`model_text`], then `max_len` tokens).
    pub fn encode(&self, text: &str) -> Result<Encoded, PredictError> {
        let text = model_text(text);
        Ok(Encoded {
            ids: self.tokenizer.encode(text).map_err(crate::Error::from)?,
            ngrams: self
                .hasher
                .as_ref()
                .map(|h| h.hash(text))
                .unwrap_or_default(),
            features: self
                .linear
                .as_ref()
                .map(|(l, _)| l.features(text))
                .unwrap_or_default(),
        })
    }

    /// Scores encoded texts in one forward pass (the caller picks the
    /// batch); `k` best labels each, in input order.
    pub fn predict_encoded(
        &self,
        batch: &[&Encoded],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>, PredictError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let model = match &self.model {
            Backend::Candle(model) => model,
            Backend::Packed(model) => {
                let inputs: Vec<PackedInput<'_>> = batch
                    .iter()
                    .map(|e| PackedInput {
                        ids: &e.ids,
                        // As below: n-grams count only for a model with the branch.
                        ngrams: if self.hasher.is_some() {
                            &e.ngrams
                        } else {
                            &[]
                        },
                    })
                    .collect();
                let scores = model.scores_flat(&inputs)?;
                let labels = self.config().num_labels;
                let rows: Vec<&[f32]> = scores.chunks_exact(labels).collect();
                return Ok(self.finish_rows(&rows, batch, k));
            }
        };
        let rows: Vec<&[u32]> = batch.iter().map(|e| e.ids.as_slice()).collect();
        let (ids, mask, width) = crate::batch::pad(&rows);
        let shape = (batch.len(), width);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let ngrams = match self.hasher {
            Some(_) => {
                let lists: Vec<Vec<u32>> = batch.iter().map(|e| e.ngrams.clone()).collect();
                Some(NgramBatch::from_lists(&lists, &self.device)?)
            }
            None => None,
        };
        let logits = model.forward(&ids, &mask, ngrams.as_ref(), false)?;
        let scores = ops::scores(&logits, self.config().output)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let rows: Vec<&[f32]> = scores.iter().map(Vec::as_slice).collect();
        Ok(self.finish_rows(&rows, batch, k))
    }

    /// For each label of `top`, the `n` words or word pairs of `text` that
    /// raised its score most (the linear model's contributions); empty
    /// lists for a model without a linear half.
    /// `encoded` is the text as [`encode`](Self::encode) made it, whose
    /// linear features are reused.
    pub fn explain(
        &self,
        text: &str,
        encoded: &Encoded,
        top: &[(u32, f32)],
        n: usize,
    ) -> Vec<Vec<(String, f32)>> {
        let positions: Vec<u32> = top.iter().map(|&(p, _)| p).collect();
        match &self.linear {
            Some((linear, _)) => linear.explain(model_text(text), &encoded.features, &positions, n),
            None => vec![Vec::new(); positions.len()],
        }
    }

    /// Label names for positions from [`predict_encoded`](Self::predict_encoded).
    pub fn name(&self, top: &[(u32, f32)]) -> Prediction {
        Prediction {
            top: top
                .iter()
                .map(|&(i, score)| Scored {
                    label: self.labels.name(i as usize).unwrap_or_default().to_owned(),
                    score,
                })
                .collect(),
        }
    }

    /// The `k` best labels of each text, in input order; texts are batched
    /// by length under `limits` to keep padding small.
    pub fn predict(
        &self,
        texts: &[&str],
        k: usize,
        limits: BatchLimits,
    ) -> Result<Vec<Prediction>, PredictError> {
        let encoded = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = vec![Prediction { top: Vec::new() }; texts.len()];
        for (indices, tops) in self.batched(&encoded, k, limits)? {
            for (i, top) in indices.into_iter().zip(tops) {
                out[i] = self.name(&top);
            }
        }
        Ok(out)
    }

    fn batched(
        &self,
        encoded: &[Encoded],
        k: usize,
        limits: BatchLimits,
    ) -> Result<Vec<ScoredBatch>, PredictError> {
        let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
        plan_batches(&lengths, limits, 0)
            .into_iter()
            .map(|indices| {
                let batch: Vec<&Encoded> = indices.iter().map(|&i| &encoded[i]).collect();
                let tops = self.predict_encoded(&batch, k)?;
                Ok((indices, tops))
            })
            .collect()
    }

    /// Validation figures on `documents`, judged by label name, so models
    /// with different label lists are compared on the same truth (a true
    /// label this model does not know counts as missed).
    pub fn evaluate(
        &self,
        documents: &[Document],
        limits: BatchLimits,
    ) -> Result<Metrics, PredictError> {
        let documents: Vec<&Document> = documents.iter().filter(|d| !d.tags.is_empty()).collect();
        let encoded = documents
            .iter()
            .map(|d| self.encode(&d.full_text()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut evaluator = Evaluator::new(self.labels.len());
        for (indices, tops) in self.batched(&encoded, TOP_K, limits)? {
            for (i, top) in indices.into_iter().zip(tops) {
                let truth = truth_positions(&self.labels, &documents[i].tags);
                evaluator.add(&top, &truth);
            }
        }
        Ok(evaluator.finish(&self.labels))
    }
}

// The inference daemon shares one `Predictor` between threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Predictor>();
};

/// Positions of `tags` in `labels`; tags the model does not know get
/// distinct positions past its outputs, so they count as true but are never
/// predicted.
fn truth_positions(labels: &Labels, tags: &[String]) -> Vec<u32> {
    let mut unknown = labels.len() as u32;
    let mut out: Vec<u32> = tags
        .iter()
        .map(|t| match labels.index(t) {
            Some(i) => i as u32,
            None => {
                unknown += 1;
                unknown
            }
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}
