//! What a training run records: the curves and the final figures written to
//! `metrics.json` and drawn in `report.html`.

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

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
    /// Mean loss on the validation split.
    pub validation_loss: f64,
    /// Validation P@1.
    pub p_at_1: f64,
    /// Validation hit@5.
    pub hit_at_5: f64,
    /// Validation recall@5.
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
    /// Per epoch.
    pub epochs: Vec<EpochRecord>,
    /// The training-loss curve.
    pub steps: Vec<StepRecord>,
}
