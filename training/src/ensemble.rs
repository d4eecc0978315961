//! The shipped model is a product of two experts: the transformer's
//! probabilities and the linear SVM's decision values, combined as
//!
//! ```text
//! score = softmax( ln(p_transformer + 1e-7) + w · s_linear )
//! ```
//!
//! One weight `w`, chosen on the tuning split (never on the validation split
//! that is reported) from a fixed grid. `w = 0` is the transformer alone;
//! a large `w` lets the SVM decide. The result is still a distribution over
//! the labels, so the scores the review UI shows keep their meaning.

use serde::{Deserialize, Serialize};

use crate::metrics::{top_k, Evaluator, Metric, Metrics, TOP_K};
use crate::Labels;

/// The file holding the weight, beside the model's other files.
pub const FILE: &str = "ensemble.json";

/// The weights tried on the tuning split.
pub const GRID: [f32; 16] = [
    0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0,
];

/// How the two models' scores are combined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ensemble {
    /// `w`: the linear model's decision values' weight against the
    /// transformer's log-probabilities.
    pub linear_weight: f32,
}

/// Combines one document's transformer probabilities with its linear
/// decision values (same label order) into a distribution.
pub fn combine(probabilities: &[f32], linear: &[f32], weight: f32) -> Vec<f32> {
    let mut z: Vec<f32> = probabilities
        .iter()
        .zip(linear)
        .map(|(&p, &s)| (p.max(0.0) + 1e-7).ln() + weight * s)
        .collect();
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in &mut z {
        *v = (*v - max).exp();
        sum += *v;
    }
    if sum > 0.0 {
        for v in &mut z {
            *v /= sum;
        }
    }
    z
}

/// Figures of score rows against each row's true label positions.
pub fn evaluate_rows(rows: &[Vec<f32>], truth: &[Vec<u32>], labels: &Labels) -> Metrics {
    let mut evaluator = Evaluator::new(labels.len());
    for (row, truth) in rows.iter().zip(truth) {
        evaluator.add(&top_k(row, TOP_K), truth);
    }
    evaluator.finish(labels)
}

/// One weight of the grid and its figures on the tuning split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridPoint {
    /// The weight.
    pub linear_weight: f32,
    /// P@1 on the tuning split.
    pub p_at_1: f64,
    /// hit@5 on the tuning split.
    pub hit_at_5: f64,
    /// recall@5 on the tuning split.
    pub recall_at_5: f64,
}

/// Chooses the weight of [`GRID`] with the best `metric` on the tuning rows
/// (ties to the smaller weight). Returns it and every point tried.
pub fn fit(
    probabilities: &[Vec<f32>],
    linear: &[Vec<f32>],
    truth: &[Vec<u32>],
    labels: &Labels,
    metric: Metric,
) -> (Ensemble, Vec<GridPoint>) {
    let mut points = Vec::with_capacity(GRID.len());
    let mut best = (f64::NEG_INFINITY, 0.0f32);
    for weight in GRID {
        let rows: Vec<Vec<f32>> = probabilities
            .iter()
            .zip(linear)
            .map(|(p, s)| combine(p, s, weight))
            .collect();
        let m = evaluate_rows(&rows, truth, labels);
        let score = metric.of(&m);
        if score > best.0 {
            best = (score, weight);
        }
        points.push(GridPoint {
            linear_weight: weight,
            p_at_1: m.p_at_1,
            hit_at_5: m.hit_at_5,
            recall_at_5: m.recall_at_5,
        });
    }
    (
        Ensemble {
            linear_weight: best.1,
        },
        points,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_is_a_distribution_and_weight_zero_keeps_the_order() {
        let p = [0.6, 0.3, 0.1];
        let s = [-1.0, 2.0, 0.5];
        let alone = combine(&p, &s, 0.0);
        assert!((alone.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!((alone[0] - 0.6).abs() < 1e-4, "{alone:?}");
        let mixed = combine(&p, &s, 4.0);
        assert!((mixed.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(
            mixed[1] > mixed[0],
            "the SVM's confident label wins: {mixed:?}"
        );
    }

    #[test]
    fn fit_prefers_the_linear_model_when_only_it_is_right() -> anyhow::Result<()> {
        let labels = Labels::from_names(["a", "b", "c"].map(str::to_owned).to_vec())?;
        // The transformer always says label 0; the truth is label 1, which
        // only the linear model ranks first.
        let probabilities = vec![vec![0.7, 0.2, 0.1]; 10];
        let linear = vec![vec![-0.5, 0.8, -0.9]; 10];
        let truth = vec![vec![1]; 10];
        let (ensemble, points) = fit(&probabilities, &linear, &truth, &labels, Metric::PAt1);
        assert_eq!(points.len(), GRID.len());
        assert_eq!(points[0].p_at_1, 0.0);
        assert!(ensemble.linear_weight > 0.0);
        // And the transformer alone when it is the one that is right.
        let truth = vec![vec![0]; 10];
        let (ensemble, _) = fit(&probabilities, &linear, &truth, &labels, Metric::PAt1);
        assert_eq!(ensemble.linear_weight, 0.0);
        Ok(())
    }
}
