//! The n-gram branch's table trained on the host with lazy Adam: only the
//! rows a batch touches are read and updated. A dense gradient over a table
//! of 2^18 × 64 floats costs more per step than the whole encoder; a batch
//! touches a few thousand rows.

use std::collections::HashMap;

/// Adam's defaults (as candle-nn's `ParamsAdamW`).
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

/// The gradient of one batch, by row.
#[derive(Debug, Clone, Default)]
pub(crate) struct SparseGrad {
    /// Touched rows, ascending.
    rows: Vec<u32>,
    /// `rows.len() × dim` gradients.
    values: Vec<f32>,
}

impl SparseGrad {
    /// Sum of squared gradient entries (for global-norm clipping).
    pub(crate) fn norm_sq(&self) -> f64 {
        self.values
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum()
    }
}

/// Table, Adam moments and step count.
#[derive(Debug, Clone)]
pub(crate) struct SparseNgrams {
    dim: usize,
    table: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    step: i32,
}

impl SparseNgrams {
    /// Starts from the (seeded) initial table `[rows, dim]`, row-major.
    pub(crate) fn new(table: Vec<f32>, dim: usize) -> Self {
        let n = table.len();
        Self {
            dim,
            table,
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    /// The table, row-major.
    pub(crate) fn table(&self) -> &[f32] {
        &self.table
    }

    /// `[docs × dim]`: each document's mean bucket embedding (zeros for a
    /// document without n-grams), as the model's own forward pass computes.
    pub(crate) fn bag(&self, lists: &[Vec<u32>]) -> Vec<f32> {
        let d = self.dim;
        let mut out = vec![0f32; lists.len() * d];
        for (doc, list) in lists.iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let acc = &mut out[doc * d..(doc + 1) * d];
            for &row in list {
                let r = row as usize * d;
                for (a, &x) in acc.iter_mut().zip(&self.table[r..r + d]) {
                    *a += x;
                }
            }
            let inv = 1.0 / list.len() as f32;
            acc.iter_mut().for_each(|a| *a *= inv);
        }
        out
    }

    /// Spreads the gradient of the bags (`[docs × dim]`) back to the rows:
    /// each of a document's n-grams gets its bag gradient over the count.
    pub(crate) fn gradient(&self, lists: &[Vec<u32>], bag_grad: &[f32]) -> SparseGrad {
        let d = self.dim;
        let mut slot: HashMap<u32, usize> = HashMap::new();
        let mut rows: Vec<u32> = Vec::new();
        for list in lists {
            for &row in list {
                slot.entry(row).or_insert_with(|| {
                    rows.push(row);
                    0
                });
            }
        }
        rows.sort_unstable();
        for (i, row) in rows.iter().enumerate() {
            slot.insert(*row, i);
        }
        let mut values = vec![0f32; rows.len() * d];
        for (doc, list) in lists.iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let g = &bag_grad[doc * d..(doc + 1) * d];
            let inv = 1.0 / list.len() as f32;
            for row in list {
                let s = slot[row] * d;
                for (acc, &x) in values[s..s + d].iter_mut().zip(g) {
                    *acc += x * inv;
                }
            }
        }
        SparseGrad { rows, values }
    }

    /// One lazy Adam step on the touched rows, the gradient multiplied by
    /// `scale` first (clipping).
    pub(crate) fn step(&mut self, grad: &SparseGrad, learning_rate: f64, scale: f64) {
        self.step += 1;
        let d = self.dim;
        let correct1 = 1.0 - BETA1.powi(self.step);
        let correct2 = 1.0 - BETA2.powi(self.step);
        let lr = learning_rate as f32;
        let scale = scale as f32;
        for (i, &row) in grad.rows.iter().enumerate() {
            let r = row as usize * d;
            let g = &grad.values[i * d..(i + 1) * d];
            let params = self.table[r..r + d].iter_mut();
            let moments = self.m[r..r + d].iter_mut().zip(&mut self.v[r..r + d]);
            for ((p, (m, v)), &gj) in params.zip(moments).zip(g) {
                let gj = gj * scale;
                *m = BETA1 * *m + (1.0 - BETA1) * gj;
                *v = BETA2 * *v + (1.0 - BETA2) * gj * gj;
                *p -= lr * (*m / correct1) / ((*v / correct2).sqrt() + EPS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bag_is_the_mean_and_the_gradient_spreads_back() {
        // 3 rows of width 2.
        let ngrams = SparseNgrams::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2);
        let lists = vec![vec![0, 2], vec![], vec![1, 1]];
        assert_eq!(ngrams.bag(&lists), [3.0, 4.0, 0.0, 0.0, 3.0, 4.0]);
        let grad = ngrams.gradient(&lists, &[1.0, 2.0, 9.0, 9.0, 4.0, 4.0]);
        assert_eq!(grad.rows, [0, 1, 2]);
        // Row 1 appears twice in one document: 2 × (4 / 2).
        assert_eq!(grad.values, [0.5, 1.0, 4.0, 4.0, 0.5, 1.0]);
        assert!((grad.norm_sq() - (0.25 + 1.0 + 16.0 + 16.0 + 0.25 + 1.0)).abs() < 1e-9);
    }

    #[test]
    fn adam_moves_only_touched_rows_against_the_gradient() {
        let mut ngrams = SparseNgrams::new(vec![0.0; 6], 2);
        let grad = ngrams.gradient(&[vec![1]], &[1.0, -1.0]);
        ngrams.step(&grad, 0.1, 1.0);
        // Adam's first step moves each touched weight by the learning rate.
        let t = ngrams.table();
        assert_eq!(&t[0..2], &[0.0, 0.0]);
        assert!(
            (t[2] + 0.1).abs() < 1e-5 && (t[3] - 0.1).abs() < 1e-5,
            "{t:?}"
        );
        assert_eq!(&t[4..6], &[0.0, 0.0]);
    }
}
