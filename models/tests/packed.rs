//! The packed CPU encoder computes the same scores as candle's padded
//! forward pass for every config variant, and the comparison is sharp enough
//! to catch a wrong mask or pooling.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{rngs::StdRng, Rng, SeedableRng};
use sift_models::{
    ops, seeded_var_builder, Classifier, Int8Kernel, ModelConfig, NgramBatch, Norm, Output,
    PackedEncoder, PackedInput, Pooling, Precision,
};

/// Largest allowed difference between the two paths' scores.
const TOLERANCE: f32 = 1e-4;
/// Scores closer than this count as tied when comparing top-5 orders.
const TIE: f32 = 1e-5;

/// A classifier whose every weight, bias and norm gain is random, so that a
/// mistake in any of them (or in the mask or pooling) changes the scores.
/// Candle's own initialiser leaves biases at 0 and gains at 1.
fn random_model(config: &ModelConfig, seed: u64) -> Result<Classifier> {
    let varmap = VarMap::new();
    let model = Classifier::new(
        config,
        seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu),
    )?;
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31) + 7);
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        // Uniform with unit variance, scaled per kind of weight.
        let scale = if name.ends_with("norm.weight") || name.ends_with("norm.bias") {
            0.2
        } else if name.starts_with("embeddings") || name.starts_with("ngrams") {
            0.8
        } else if name.ends_with(".bias") {
            0.1
        } else if name.starts_with("head") {
            3.0 / (dims[1] as f32).sqrt()
        } else {
            1.0 / (dims[1] as f32).sqrt()
        };
        let offset = if name.ends_with("norm.weight") {
            1.0
        } else {
            0.0
        };
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| offset + scale * 3f32.sqrt() * (2.0 * rng.random::<f32>() - 1.0))
            .collect();
        var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?)?;
    }
    Ok(model)
}

struct Docs {
    ids: Vec<Vec<u32>>,
    ngrams: Vec<Vec<u32>>,
}

impl Docs {
    fn new(config: &ModelConfig, lengths: &[usize], seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut docs = Docs {
            ids: vec![],
            ngrams: vec![],
        };
        for &len in lengths {
            docs.ids.push(
                (0..len)
                    .map(|_| rng.random_range(0..config.vocab_size as u32))
                    .collect(),
            );
            let grams = match config.ngrams {
                // Every third document has no n-grams.
                Some(n) if !docs.ids.len().is_multiple_of(3) => (0..rng.random_range(1..12))
                    .map(|_| rng.random_range(0..n.buckets as u32))
                    .collect(),
                _ => vec![],
            };
            docs.ngrams.push(grams);
        }
        docs
    }

    fn inputs(&self) -> Vec<PackedInput<'_>> {
        self.ids
            .iter()
            .zip(&self.ngrams)
            .map(|(ids, ngrams)| PackedInput { ids, ngrams })
            .collect()
    }
}

/// Candle's scores for `docs` padded to the longest; padding positions hold
/// random (non-pad) ids, so only the mask hides them (rows of empty
/// documents hold pad ids). `mask_padding = false`
/// marks padding as real: the wrong computation the tests must tell apart.
fn candle_scores(
    model: &Classifier,
    docs: &Docs,
    mask_padding: bool,
    seed: u64,
) -> Result<Vec<Vec<f32>>> {
    let config = model.config();
    let mut rng = StdRng::seed_from_u64(seed);
    let width = docs.ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let b = docs.ids.len();
    let mut ids = vec![0u32; b * width];
    let mut mask = vec![0u8; b * width];
    for (row, doc) in docs.ids.iter().enumerate() {
        for col in 0..width {
            let at = row * width + col;
            match doc.get(col) {
                Some(&id) => {
                    ids[at] = id;
                    mask[at] = 1;
                }
                // A document without tokens is scored as one pad token
                // (id 0), as `Predictor` pads it.
                None if doc.is_empty() => ids[at] = 0,
                None => {
                    ids[at] = rng.random_range(1..config.vocab_size as u32);
                    mask[at] = u8::from(!mask_padding);
                }
            }
        }
    }
    let ids = Tensor::from_vec(ids, (b, width), &Device::Cpu)?;
    let mask = Tensor::from_vec(mask, (b, width), &Device::Cpu)?;
    let ngrams = match config.ngrams {
        Some(_) => Some(NgramBatch::from_lists(&docs.ngrams, &Device::Cpu)?),
        None => None,
    };
    let logits = model.forward(&ids, &mask, ngrams.as_ref(), false)?;
    Ok(ops::scores(&logits, config.output)?.to_vec2::<f32>()?)
}

fn top5(row: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    order.truncate(5);
    order
}

/// Largest score difference; fails unless it is under [`TOLERANCE`] and
/// the top-5 orders agree up to ties.
fn compare(reference: &[Vec<f32>], packed: &[Vec<f32>], what: &str) -> Result<f32> {
    ensure!(reference.len() == packed.len(), "{what}: row counts differ");
    let mut worst = 0f32;
    for (doc, (r, p)) in reference.iter().zip(packed).enumerate() {
        ensure!(r.len() == p.len(), "{what}: label counts differ");
        for (a, b) in r.iter().zip(p) {
            ensure!(a.is_finite() && b.is_finite(), "{what}: non-finite score");
            worst = worst.max((a - b).abs());
        }
        for (rank, (&ri, &pi)) in top5(r).iter().zip(&top5(p)).enumerate() {
            ensure!(
                ri == pi || (r[ri] - r[pi]).abs() < TIE,
                "{what}: document {doc} rank {rank}: candle has label {ri} ({}), packed {pi} ({})",
                r[ri],
                r[pi]
            );
        }
    }
    ensure!(worst < TOLERANCE, "{what}: max |packed - candle| = {worst}");
    Ok(worst)
}

/// Small shapes (so the test is quick) covering every config variant.
fn configs() -> Vec<(&'static str, ModelConfig)> {
    let small = |norm, pooling, output| ModelConfig {
        vocab_size: 300,
        max_len: 40,
        hidden: 48,
        layers: 3,
        heads: 3,
        ff: 96,
        dropout: 0.1,
        num_labels: 37,
        pooling,
        norm,
        norm_eps: 1e-5,
        output,
        ngrams: None,
    };
    let mut tiny = ModelConfig::tiny(500, 60).with_ngrams(1000, 16);
    tiny.max_len = 64;
    let mut bert = small(Norm::Post, Pooling::Cls, Output::Softmax);
    bert.norm_eps = 1e-12;
    vec![
        ("tiny, n-grams, pre, mean, sigmoid", tiny),
        ("post, cls, softmax, no n-grams", bert),
        (
            "post, mean, sigmoid, no n-grams",
            small(Norm::Post, Pooling::Mean, Output::Sigmoid),
        ),
        (
            "pre, cls, sigmoid, n-grams",
            small(Norm::Pre, Pooling::Cls, Output::Sigmoid).with_ngrams(64, 8),
        ),
        (
            "pre, mean, softmax, n-grams",
            small(Norm::Pre, Pooling::Mean, Output::Softmax).with_ngrams(64, 24),
        ),
        (
            "post, mean, softmax, n-grams",
            small(Norm::Post, Pooling::Mean, Output::Softmax).with_ngrams(50, 4),
        ),
    ]
}

fn batches(max_len: usize) -> Vec<Vec<usize>> {
    vec![
        vec![1],
        vec![1, 1, 1],
        vec![2, 2],
        vec![7, 7, 7, 7],
        vec![max_len, max_len],
        vec![max_len],
        vec![1, 2, 7, max_len, 13, max_len - 1, 3, 30.min(max_len), 2, 1],
    ]
}

#[test]
fn packed_matches_candle_for_every_config_and_length() -> Result<()> {
    for (seed, (name, config)) in configs().into_iter().enumerate() {
        let model = random_model(&config, seed as u64)?;
        let packed = PackedEncoder::from_classifier(&model)?;
        for (i, lengths) in batches(config.max_len).into_iter().enumerate() {
            let docs = Docs::new(&config, &lengths, 100 * seed as u64 + i as u64);
            let reference = candle_scores(&model, &docs, true, 7)?;
            let ours = packed.scores(&docs.inputs())?;
            let worst = compare(&reference, &ours, &format!("{name}, lengths {lengths:?}"))?;
            // Every document's scores do not depend on its batch.
            for (d, doc) in docs.inputs().iter().enumerate() {
                let alone = packed.scores(std::slice::from_ref(doc))?;
                ensure!(alone[0] == ours[d] || compare(&ours[d..=d], &alone, name).is_ok());
            }
            eprintln!("{name}, lengths {lengths:?}: max diff {worst:e}");
        }
    }
    Ok(())
}

#[test]
fn int8_is_close_to_f32_and_every_kernel_computes_the_same() -> Result<()> {
    let kernels: Vec<Int8Kernel> = [Int8Kernel::Vnni512, Int8Kernel::Avx2, Int8Kernel::Portable]
        .into_iter()
        .filter(|k| k.supported())
        .collect();
    for (seed, (name, config)) in configs().into_iter().enumerate() {
        let model = random_model(&config, seed as u64)?;
        let exact = PackedEncoder::from_classifier(&model)?;
        let encoders: Vec<PackedEncoder> = kernels
            .iter()
            .map(|&k| PackedEncoder::with_precision(&model, Precision::Int8(k)))
            .collect::<Result<_, _>>()?;
        for (i, lengths) in batches(config.max_len).into_iter().enumerate() {
            let docs = Docs::new(&config, &lengths, 100 * seed as u64 + i as u64);
            let reference = exact.scores(&docs.inputs())?;
            let mut first: Option<Vec<Vec<f32>>> = None;
            for (kernel, encoder) in kernels.iter().zip(&encoders) {
                ensure!(encoder.precision() == Precision::Int8(*kernel));
                let ours = encoder.scores(&docs.inputs())?;
                let worst = reference
                    .iter()
                    .flatten()
                    .zip(ours.iter().flatten())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Random weights at unit scale through every layer: int8's
                // rounding moves scores, but by little (twice as much with
                // the AVX2 kernel's 7-bit weights).
                let bound = if *kernel == Int8Kernel::Avx2 {
                    0.1
                } else {
                    0.05
                };
                eprintln!("{name} {kernel:?}, lengths {lengths:?}: max diff {worst}");
                ensure!(
                    worst < bound,
                    "{name} {kernel:?}, lengths {lengths:?}: max diff {worst}"
                );
                // A document scores the same alone as in a batch: every
                // activation is quantised per row.
                for (d, doc) in docs.inputs().iter().enumerate() {
                    let alone = encoder.scores(std::slice::from_ref(doc))?;
                    ensure!(
                        compare(&ours[d..=d], &alone, name).is_ok(),
                        "{name} {kernel:?}: document {d} scores differently alone"
                    );
                }
                // The 8-bit kernels agree exactly; AVX2 keeps 7-bit weights.
                if *kernel != Int8Kernel::Avx2 {
                    match &first {
                        Some(f) => ensure!(
                            f == &ours,
                            "{name}: {kernel:?} differs from {:?}",
                            kernels[0]
                        ),
                        None => first = Some(ours),
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn flat_scores_are_the_rows_of_scores() -> Result<()> {
    let (_, config) = configs().remove(0);
    let model = random_model(&config, 3)?;
    let packed = PackedEncoder::from_classifier(&model)?;
    let docs = Docs::new(&config, &[5, 1, 20], 9);
    let rows = packed.scores(&docs.inputs())?;
    let flat = packed.scores_flat(&docs.inputs())?;
    ensure!(rows.concat() == flat);
    ensure!(packed.scores(&[])?.is_empty());
    Ok(())
}

#[test]
fn empty_ngram_lists_and_empty_documents_match_candle() -> Result<()> {
    for (seed, (name, config)) in configs().into_iter().enumerate() {
        let model = random_model(&config, 40 + seed as u64)?;
        let packed = PackedEncoder::from_classifier(&model)?;
        // No document has n-grams.
        let mut docs = Docs::new(&config, &[4, 9, 1], seed as u64);
        docs.ngrams.iter_mut().for_each(Vec::clear);
        compare(
            &candle_scores(&model, &docs, true, 1)?,
            &packed.scores(&docs.inputs())?,
            &format!("{name}, no n-grams"),
        )?;
        // A document without tokens, alone (as candle pads it: one masked
        // position), and for mean pooling inside a batch too.
        let mut empty = Docs::new(&config, &[0], seed as u64);
        compare(
            &candle_scores(&model, &empty, true, 1)?,
            &packed.scores(&empty.inputs())?,
            &format!("{name}, empty document"),
        )?;
        if config.pooling == Pooling::Mean {
            empty = Docs::new(&config, &[0, 6, 3], seed as u64);
            compare(
                &candle_scores(&model, &empty, true, 1)?,
                &packed.scores(&empty.inputs())?,
                &format!("{name}, empty document in a batch"),
            )?;
        }
    }
    Ok(())
}

#[test]
fn the_comparison_catches_a_wrong_mask_or_pooling() -> Result<()> {
    for (seed, (name, config)) in configs().into_iter().enumerate() {
        let model = random_model(&config, seed as u64)?;
        let packed = PackedEncoder::from_classifier(&model)?;
        let docs = Docs::new(&config, &[3, config.max_len, 7, 1], 5);
        let ours = packed.scores(&docs.inputs())?;
        // Attending to (and pooling over) padding is caught.
        let unmasked = candle_scores(&model, &docs, false, 7)?;
        ensure!(
            compare(&unmasked, &ours, name).is_err(),
            "{name}: a missing mask went unnoticed"
        );
        // The other pooling, same weights, is caught.
        let mut other = config.clone();
        other.pooling = match config.pooling {
            Pooling::Mean => Pooling::Cls,
            Pooling::Cls => Pooling::Mean,
        };
        let other_model = random_model(&other, seed as u64)?;
        let other_scores = candle_scores(&other_model, &docs, true, 7)?;
        ensure!(
            compare(&other_scores, &ours, name).is_err(),
            "{name}: the wrong pooling went unnoticed"
        );
    }
    Ok(())
}

#[test]
fn bad_inputs_are_rejected() -> Result<()> {
    let (_, config) = configs().remove(0);
    let packed = PackedEncoder::from_classifier(&random_model(&config, 1)?)?;
    let too_long = vec![1u32; config.max_len + 1];
    let unknown = [config.vocab_size as u32];
    let bucket = [config.ngrams.context("n-grams")?.buckets as u32];
    for doc in [
        PackedInput {
            ids: &too_long,
            ngrams: &[],
        },
        PackedInput {
            ids: &unknown,
            ngrams: &[],
        },
        PackedInput {
            ids: &[1],
            ngrams: &bucket,
        },
    ] {
        ensure!(packed.scores(&[doc]).is_err());
    }
    let (_, plain) = configs().remove(1);
    let packed = PackedEncoder::from_classifier(&random_model(&plain, 1)?)?;
    ensure!(packed
        .scores(&[PackedInput {
            ids: &[1],
            ngrams: &[0]
        }])
        .is_err());
    Ok(())
}
