//! Evaluation: how often the model's top 5 contain what people chose.
//!
//! Every figure is over documents with at least one known true label:
//!
//! - **P@1**: the top-scored label is a true label.
//! - **hit@5**: at least one true label is among the top 5 (what the review
//!   UI shows, so the share of documents an analyst can accept with one key).
//! - **recall@5**: true labels among the top 5 divided by the number of true
//!   labels, averaged over documents (a document with 8 true labels can reach
//!   at most 5/8).
//! - Per label: a label counts as *predicted* for a document when it ranks
//!   within the document's first `k` labels, `k` being the number of true
//!   labels the document has (at most 5). This needs no score threshold, so
//!   it means the same for sigmoid and softmax models. Precision, recall and
//!   F1 follow from that; support is the number of documents that truly
//!   carry the label.

use serde::{Deserialize, Serialize};

use crate::Labels;

/// How many labels the model shows and is judged on.
pub const TOP_K: usize = 5;

/// One label's figures on a validation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    /// Label name.
    pub label: String,
    /// Documents that truly carry it.
    pub support: u64,
    /// Documents it was predicted for.
    pub predicted: u64,
    /// Documents it was predicted for and truly carries.
    pub true_positives: u64,
    /// `true_positives / predicted` (0 when never predicted).
    pub precision: f64,
    /// `true_positives / support` (0 when no support).
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
}

/// A model's figures on a validation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Documents evaluated (those with at least one known true label).
    pub documents: u64,
    /// Share whose top label is true.
    pub p_at_1: f64,
    /// Share with a true label among the top 5.
    pub hit_at_5: f64,
    /// Mean share of each document's true labels found in its top 5.
    pub recall_at_5: f64,
    /// Per label, in label order.
    pub per_label: Vec<LabelMetrics>,
}

/// Which figure decides between two models (the registry's gate, early
/// stopping and the best checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// [`Metrics::p_at_1`].
    PAt1,
    /// [`Metrics::hit_at_5`].
    #[default]
    HitAt5,
    /// [`Metrics::recall_at_5`].
    RecallAt5,
    /// The mean of P@1, hit@5 and recall@5: picks the best epoch of a run
    /// without letting a third-decimal wobble of one saturated figure
    /// (hit@5 sits near 0.97) outvote the other two.
    Mean,
}

impl Metric {
    /// The figure in `metrics`.
    pub fn of(self, metrics: &Metrics) -> f64 {
        match self {
            Metric::PAt1 => metrics.p_at_1,
            Metric::HitAt5 => metrics.hit_at_5,
            Metric::RecallAt5 => metrics.recall_at_5,
            Metric::Mean => (metrics.p_at_1 + metrics.hit_at_5 + metrics.recall_at_5) / 3.0,
        }
    }

    /// Name as written in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Metric::PAt1 => "p_at_1",
            Metric::HitAt5 => "hit_at_5",
            Metric::RecallAt5 => "recall_at_5",
            Metric::Mean => "mean",
        }
    }
}

impl std::str::FromStr for Metric {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "p_at_1" | "p@1" => Ok(Metric::PAt1),
            "hit_at_5" | "hit@5" => Ok(Metric::HitAt5),
            "recall_at_5" | "recall@5" => Ok(Metric::RecallAt5),
            "mean" => Ok(Metric::Mean),
            other => Err(format!(
                "unknown metric `{other}`; use p_at_1, hit_at_5, recall_at_5 or mean"
            )),
        }
    }
}

/// The `k` highest scores of one row as `(label position, score)`, highest
/// first; ties go to the lower position, so the order is deterministic.
pub fn top_k(scores: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    let k = k.min(order.len());
    let by_score = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    if k == 0 {
        return Vec::new();
    }
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_score);
        order.truncate(k);
    }
    order.sort_by(by_score);
    order.into_iter().map(|i| (i, scores[i as usize])).collect()
}

/// Accumulates predictions and computes [`Metrics`].
#[derive(Debug, Clone)]
pub struct Evaluator {
    documents: u64,
    top1: u64,
    hits: u64,
    recall_sum: f64,
    support: Vec<u64>,
    predicted: Vec<u64>,
    true_positives: Vec<u64>,
}

impl Evaluator {
    /// An empty evaluation over `num_labels` outputs.
    pub fn new(num_labels: usize) -> Self {
        Self {
            documents: 0,
            top1: 0,
            hits: 0,
            recall_sum: 0.0,
            support: vec![0; num_labels],
            predicted: vec![0; num_labels],
            true_positives: vec![0; num_labels],
        }
    }

    /// Adds one document: its top predictions (from [`top_k`], highest
    /// first) and its true label positions. A document without true labels
    /// is not counted.
    pub fn add(&mut self, top: &[(u32, f32)], truth: &[u32]) {
        if truth.is_empty() {
            return;
        }
        self.documents += 1;
        let is_true = |label: u32| truth.contains(&label);
        let shown = &top[..top.len().min(TOP_K)];
        if shown.first().is_some_and(|&(l, _)| is_true(l)) {
            self.top1 += 1;
        }
        let found = shown.iter().filter(|&&(l, _)| is_true(l)).count();
        if found > 0 {
            self.hits += 1;
        }
        self.recall_sum += found as f64 / truth.len() as f64;
        for &label in truth {
            if let Some(s) = self.support.get_mut(label as usize) {
                *s += 1;
            }
        }
        let cut = truth.len().clamp(1, TOP_K);
        for &(label, _) in shown.iter().take(cut) {
            {
                let l = label as usize;
                if l < self.predicted.len() {
                    self.predicted[l] += 1;
                    if is_true(label) {
                        self.true_positives[l] += 1;
                    }
                }
            }
        }
    }

    /// The figures so far; label names come from `labels`.
    pub fn finish(&self, labels: &Labels) -> Metrics {
        let share = |n: f64| {
            if self.documents == 0 {
                0.0
            } else {
                n / self.documents as f64
            }
        };
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let per_label = (0..self.support.len())
            .map(|i| {
                let precision = ratio(self.true_positives[i], self.predicted[i]);
                let recall = ratio(self.true_positives[i], self.support[i]);
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                LabelMetrics {
                    label: labels.name(i).unwrap_or_default().to_owned(),
                    support: self.support[i],
                    predicted: self.predicted[i],
                    true_positives: self.true_positives[i],
                    precision,
                    recall,
                    f1,
                }
            })
            .collect();
        Metrics {
            documents: self.documents,
            p_at_1: share(self.top1 as f64),
            hit_at_5: share(self.hits as f64),
            recall_at_5: share(self.recall_sum),
            per_label,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_score_then_position() {
        let scores = [0.1, 0.9, 0.5, 0.9, 0.0, 0.7];
        let top = top_k(&scores, 3);
        assert_eq!(top, vec![(1, 0.9), (3, 0.9), (5, 0.7)]);
        assert_eq!(top_k(&scores, 10).len(), 6);
        assert!(top_k(&scores, 0).is_empty());
    }

    #[test]
    fn figures_match_a_hand_count() {
        let labels =
            Labels::from_names((0..6).map(|i| format!("l{i}")).collect()).expect("unique names");
        let mut eval = Evaluator::new(6);
        // Top label right; 2 of 2 true labels in the top 5.
        eval.add(
            &[(0, 0.9), (1, 0.6), (2, 0.2), (3, 0.1), (4, 0.05)],
            &[0, 1],
        );
        // Top label wrong, true labels at ranks 4 and 5; 2 of 4 found.
        eval.add(
            &[(2, 0.8), (3, 0.3), (4, 0.2), (5, 0.1), (0, 0.05)],
            &[5, 1, 0, 9],
        );
        // Nothing right.
        eval.add(&[(3, 0.4), (4, 0.3), (2, 0.2), (1, 0.1), (0, 0.0)], &[5]);
        // No truth: ignored.
        eval.add(&[(3, 0.4)], &[]);
        let m = eval.finish(&labels);
        assert_eq!(m.documents, 3);
        assert!((m.p_at_1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((m.hit_at_5 - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.recall_at_5 - (1.0 + 0.5 + 0.0) / 3.0).abs() < 1e-12);
        // Cuts: 2 labels for the first document, 4 for the second, 1 for the
        // third. l1: predicted in the first (rank 2 of 2), true there;
        // support 2 (the second document's l1 is not in its top 5).
        let l1 = &m.per_label[1];
        assert_eq!((l1.support, l1.predicted, l1.true_positives), (2, 1, 1));
        assert!((l1.precision - 1.0).abs() < 1e-12 && (l1.recall - 0.5).abs() < 1e-12);
        // l5: rank 4 in the second document, within its cut of 4, and true.
        let l5 = &m.per_label[5];
        assert_eq!((l5.support, l5.predicted, l5.true_positives), (2, 1, 1));
        // l3: predicted in the first cut? No (rank 4 > 2); in the second (rank
        // 2 ≤ 4) and the third (rank 1), both wrongly.
        assert_eq!(
            (m.per_label[3].predicted, m.per_label[3].true_positives),
            (2, 0)
        );
        assert_eq!(m.per_label[3].f1, 0.0);
        assert!("hit@5".parse::<Metric>().is_ok() && "x".parse::<Metric>().is_err());
    }
}
