//! What a training run records: the curves and the final figures written to
//! `metrics.json` and drawn in `report.html`.

use serde::{Deserialize, Serialize};

use crate::ensemble::GridPoint;
use crate::metrics::Metrics;
use crate::SplitPlan;

/// Headline figures of one model on one set of documents, without the
/// per-label table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Documents evaluated.
    pub documents: u64,
    /// P@1.
    pub p_at_1: f64,
    /// hit@5.
    pub hit_at_5: f64,
    /// recall@5.
    pub recall_at_5: f64,
}

impl From<&Metrics> for Figures {
    fn from(m: &Metrics) -> Self {
        Self {
            documents: m.documents,
            p_at_1: m.p_at_1,
            hit_at_5: m.hit_at_5,
            recall_at_5: m.recall_at_5,
        }
    }
}

/// The classic anchor trained in the same run on the same documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineRecord {
    /// What it is, e.g. `TF-IDF (1,2)-grams + one-vs-rest linear SVM`.
    pub name: String,
    /// Its figures on the validation split.
    pub validation: Figures,
    /// Its figures on the seen-source split.
    pub seen: Option<Figures>,
    /// Training time, seconds.
    pub seconds: f64,
    /// Features in its vocabulary.
    pub features: u64,
    /// Weights kept.
    pub weights: u64,
}

/// How the shipped scores were combined, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnsembleRecord {
    /// The linear model's weight chosen on the tuning split.
    pub linear_weight: f32,
    /// The form chosen on the tuning split (records written before there
    /// was a choice: the product).
    #[serde(default)]
    pub form: crate::ensemble::Form,
    /// The mixture's slope chosen on the tuning split.
    #[serde(default = "one")]
    pub linear_scale: f32,
    /// Every weight tried, with its tuning figures.
    pub grid: Vec<GridPoint>,
    /// The linear half, when it is not the baseline itself (it reads
    /// character grams as well as the baseline's word grams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear: Option<LinearHalfRecord>,
}

/// The linear half of the shipped model, trained apart from the baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearHalfRecord {
    /// What it is.
    pub name: String,
    /// Its figures on the validation split, alone.
    pub validation: Figures,
    /// Training time, seconds.
    pub seconds: f64,
    /// Features in its vocabulary.
    pub features: u64,
    /// Weights kept.
    pub weights: u64,
}

/// One point of the training-loss curve (the mean over the steps since the
/// previous point).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimiser steps done so far.
    pub step: u64,
    /// Epoch (1-based) the step belongs to, fractional within the epoch.
    pub epoch: f64,
    /// Mean training loss over the steps since the previous record.
    pub loss: f64,
    /// Learning rate at this step.
    pub learning_rate: f64,
}

/// One epoch: training loss and the validation figures after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: u32,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Mean loss on the tuning split (named for files written before it).
    pub validation_loss: f64,
    /// P@1 on the tuning split (which picks the epoch).
    pub p_at_1: f64,
    /// hit@5 on the tuning split.
    pub hit_at_5: f64,
    /// recall@5 on the tuning split.
    pub recall_at_5: f64,
    /// Real (unpadded) training tokens per second of training time.
    pub tokens_per_second: f64,
    /// Wall time of the epoch including evaluation, seconds.
    pub seconds: f64,
    /// Whether this epoch's weights were the best so far (and were kept).
    pub best: bool,
}

/// Everything `metrics.json` holds. The headline figures are at the top
/// level so `jq .hit_at_5 metrics.json` works.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    /// Validation figures of the kept (best) checkpoint.
    #[serde(flatten)]
    pub validation: Metrics,
    /// Metric that chose the best epoch (the registry's gate has its own).
    pub selection_metric: String,
    /// Epoch whose weights were kept.
    pub best_epoch: u32,
    /// Whether training stopped before the epoch limit because validation
    /// stopped improving.
    pub stopped_early: bool,
    /// Real training tokens per second over the whole run.
    pub tokens_per_second: f64,
    /// Wall time of the whole run, seconds.
    pub wall_seconds: f64,
    /// Training documents (after the split).
    pub train_documents: u64,
    /// Validation documents.
    pub validation_documents: u64,
    /// Digest of the validation documents (ids and labels): two models with
    /// the same fingerprint were judged on the same documents, so their
    /// figures compare directly.
    #[serde(default)]
    pub validation_fingerprint: String,
    /// Training examples that came from analysts' feedback.
    pub feedback_documents: u64,
    /// Model preset (`tiny`, `base`, `pretrained`).
    pub preset: String,
    /// Loss: `bce` or `softmax`.
    pub loss: String,
    /// Device, e.g. `cpu` or `cuda:0`, and the compute dtype.
    pub device: String,
    /// Seed of the run.
    pub seed: u64,
    /// How the data was split (absent in models trained before the split
    /// by source).
    #[serde(default)]
    pub split: Option<SplitPlan>,
    /// Documents in the tuning split (chose the epoch and the ensemble).
    #[serde(default)]
    pub tuning_documents: u64,
    /// The transformer alone on the validation split (the headline figures
    /// are the shipped combination's).
    #[serde(default)]
    pub transformer: Option<Figures>,
    /// The linear anchor, trained and scored in the same run.
    #[serde(default)]
    pub baseline: Option<BaselineRecord>,
    /// The combination's weight and the grid it was chosen from.
    #[serde(default)]
    pub ensemble: Option<EnsembleRecord>,
    /// The shipped model on the tuning split.
    #[serde(default)]
    pub tuning: Option<Figures>,
    /// The shipped model on documents of training sources held out by id:
    /// what an id split would have reported.
    #[serde(default)]
    pub seen: Option<Figures>,
    /// The shipped model on the validation documents with their fields
    /// (section, page name) taken away; absent when they had none.
    #[serde(default)]
    pub text_alone: Option<Figures>,
    /// Epochs the run planned (the learning rate's schedule spans them).
    #[serde(default)]
    pub epochs_planned: u32,
    /// Share of training documents, in percent, shown without their fields.
    #[serde(default)]
    pub field_dropout_percent: u8,
    /// Per epoch (figures on the tuning split).
    pub epochs: Vec<EpochRecord>,
    /// The training-loss curve.
    pub steps: Vec<StepRecord>,
}

fn one() -> f32 {
    1.0
}
