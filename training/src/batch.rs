//! Length-bucketed batches with dynamic padding and a seeded order.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// One encoded training document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Example {
    /// Token ids from [`TextTokenizer::encode`](crate::TextTokenizer::encode).
    pub ids: Vec<u32>,
    /// Bucket ids from [`NgramHasher::hash`](crate::NgramHasher::hash).
    pub ngrams: Vec<u32>,
    /// Label positions from [`Labels::indices`](crate::Labels::indices).
    pub labels: Vec<u32>,
    /// Positions of labels known to be wrong ([`Document::rejected`](crate::Document::rejected)).
    /// Only used when `labels` is empty: such an example trains only these
    /// labels, towards 0.
    pub rejected: Vec<u32>,
}

/// How large one batch may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most padded tokens (documents × longest document) per batch. A single
    /// document longer than this still gets a batch of its own.
    pub max_batch_tokens: usize,
    /// Most documents per batch.
    pub max_batch_docs: usize,
}

/// Groups example indices into batches for one epoch.
///
/// Examples are sorted by length (ties broken by a seeded shuffle, so batch
/// contents vary between epochs) and cut greedily under `limits`, which keeps
/// padding small; the batch order is then shuffled. The same `lengths`,
/// `limits` and `seed` always give the same plan: pass e.g. `seed + epoch`.
pub fn plan_batches(lengths: &[usize], limits: BatchLimits, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    order.sort_by_key(|&i| lengths[i]);
    let max_docs = limits.max_batch_docs.max(1);
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending, so the newcomer is the longest in the batch.
        let padded = (current.len() + 1) * lengths[i].max(1);
        if !current.is_empty() && (current.len() >= max_docs || padded > limits.max_batch_tokens) {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches.shuffle(&mut rng);
    batches
}

/// Token id rows padded with 0 (`[PAD]`) to the longest (at least 1):
/// `(ids, mask, width)`, row-major `[rows, width]`, mask 1 on real tokens.
pub fn pad(rows: &[&[u32]]) -> (Vec<u32>, Vec<u8>, usize) {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![0u32; rows.len() * width];
    let mut mask = vec![0u8; rows.len() * width];
    for (row, tokens) in rows.iter().enumerate() {
        let start = row * width;
        ids[start..start + tokens.len()].copy_from_slice(tokens);
        mask[start..start + tokens.len()].fill(1);
    }
    (ids, mask, width)
}

/// A padded batch in row-major host memory, ready for
/// `Tensor::from_vec(ids, (docs, width), device)`, the mask likewise, and
/// `NgramBatch::from_lists(&ngrams, device)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Which examples, in row order.
    pub examples: Vec<usize>,
    /// Rows (documents).
    pub docs: usize,
    /// Columns: the longest document in the batch (at least 1).
    pub width: usize,
    /// `[docs, width]` token ids, 0 (`[PAD]`) after each document's end.
    pub ids: Vec<u32>,
    /// `[docs, width]` 1 for a real token, 0 for padding.
    pub mask: Vec<u8>,
    /// Per document n-gram bucket ids, unpadded.
    pub ngrams: Vec<Vec<u32>>,
    /// `[docs, num_labels]` multi-hot targets.
    pub targets: Vec<f32>,
    /// `[docs, num_labels]` loss weight of each target: 1 everywhere for a
    /// document with labels; for one with only rejections, 1 on the rejected
    /// labels and 0 elsewhere.
    pub weights: Vec<f32>,
    /// `[docs]` 1 for a document with at least one label, else 0 (a softmax
    /// loss needs a positive label).
    pub row_weights: Vec<f32>,
    /// Width of a target row.
    pub num_labels: usize,
}

impl Batch {
    /// Pads the examples at `indices` to the longest of them.
    ///
    /// # Panics
    ///
    /// If an index is out of range or a label position is not below
    /// `num_labels`: both come from this crate's own planning and labels.
    pub fn collate(examples: &[Example], indices: &[usize], num_labels: usize) -> Self {
        let docs = indices.len();
        let rows: Vec<&[u32]> = indices
            .iter()
            .map(|&i| examples[i].ids.as_slice())
            .collect();
        let (ids, mask, width) = pad(&rows);
        let mut targets = vec![0f32; docs * num_labels];
        let mut weights = vec![1f32; docs * num_labels];
        let mut row_weights = vec![1f32; docs];
        let mut ngrams = Vec::with_capacity(docs);
        for (row, &i) in indices.iter().enumerate() {
            let example = &examples[i];
            for &label in &example.labels {
                targets[row * num_labels + label as usize] = 1.0;
            }
            if example.labels.is_empty() {
                row_weights[row] = 0.0;
                let row_slice = &mut weights[row * num_labels..(row + 1) * num_labels];
                row_slice.fill(0.0);
                for &label in &example.rejected {
                    row_slice[label as usize] = 1.0;
                }
            }
            ngrams.push(example.ngrams.clone());
        }
        Self {
            examples: indices.to_vec(),
            docs,
            width,
            ids,
            mask,
            ngrams,
            targets,
            weights,
            row_weights,
            num_labels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths() -> Vec<usize> {
        // Deterministic spread of lengths 1..=64.
        (0..500).map(|i| (i * 37 % 64) + 1).collect()
    }

    #[test]
    fn batches_respect_limits_and_cover_each_example_once() {
        let lengths = lengths();
        let limits = BatchLimits {
            max_batch_tokens: 256,
            max_batch_docs: 16,
        };
        let plan = plan_batches(&lengths, limits, 7);
        let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for batch in &plan {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            assert!(batch.len() <= 16);
            assert!(batch.len() * longest <= 256, "{batch:?}");
        }
        // Both limits bind somewhere: short documents hit the document cap.
        assert!(plan.iter().any(|b| b.len() == 16));
        assert!(plan.iter().any(|b| b.len() < 16 && b.len() > 1));
    }

    #[test]
    fn plans_are_reproducible_and_vary_by_seed() {
        let lengths = lengths();
        let limits = BatchLimits {
            max_batch_tokens: 512,
            max_batch_docs: 32,
        };
        assert_eq!(
            plan_batches(&lengths, limits, 1),
            plan_batches(&lengths, limits, 1)
        );
        assert_ne!(
            plan_batches(&lengths, limits, 1),
            plan_batches(&lengths, limits, 2)
        );
    }

    #[test]
    fn an_oversized_document_gets_its_own_batch() {
        let limits = BatchLimits {
            max_batch_tokens: 10,
            max_batch_docs: 4,
        };
        let mut plan = plan_batches(&[3, 50, 3], limits, 0);
        plan.sort();
        assert_eq!(
            plan,
            [vec![0, 2], vec![1]].map(|mut b| {
                b.sort_unstable();
                b
            })
        );
        assert!(plan_batches(&[], limits, 0).is_empty());
    }

    #[test]
    fn collate_pads_masks_and_sets_targets() {
        let examples = vec![
            Example {
                ids: vec![2, 10, 11, 3],
                ngrams: vec![5, 6],
                labels: vec![0, 2],
                rejected: vec![],
            },
            Example {
                ids: vec![2, 3],
                ngrams: vec![],
                labels: vec![1],
                rejected: vec![],
            },
            Example {
                ids: vec![2, 12, 3],
                ngrams: vec![7],
                labels: vec![],
                rejected: vec![1, 2],
            },
        ];
        let batch = Batch::collate(&examples, &[1, 0], 3);
        assert_eq!((batch.docs, batch.width), (2, 4));
        assert_eq!(batch.ids, [2, 3, 0, 0, 2, 10, 11, 3]);
        assert_eq!(batch.mask, [1, 1, 0, 0, 1, 1, 1, 1]);
        assert_eq!(batch.targets, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        assert_eq!(batch.ngrams, [vec![], vec![5, 6]]);
        assert_eq!(batch.examples, [1, 0]);
        assert!(batch.weights.iter().all(|&w| w == 1.0));
        assert_eq!(batch.row_weights, [1.0, 1.0]);
        // Only rejections: those labels count, towards 0; the row is out of
        // a softmax loss.
        let rejected = Batch::collate(&examples, &[2], 3);
        assert_eq!(rejected.targets, [0.0, 0.0, 0.0]);
        assert_eq!(rejected.weights, [0.0, 1.0, 1.0]);
        assert_eq!(rejected.row_weights, [0.0]);
        let empty = Batch::collate(&[Example::default()], &[0], 1);
        assert_eq!((empty.width, empty.ids, empty.mask), (1, vec![0], vec![0]));
    }
}
