//! Candle's padded forward pass against the packed CPU encoder, in tokens
//! per second, for the `tiny` and `base` presets at 32 documents × 128
//! tokens and at 32 documents of 16..128 tokens; plus one linear layer's
//! matrix product through candle and through `gemm` directly.
//!
//! Run with `RAYON_NUM_THREADS=2 cargo bench -p sift-models --bench packed`.
//! It also prints the matrix FLOPs of each batch, so the packed path's
//! FLOP/s is the reported tokens/s times FLOPs per token.

use std::time::Duration;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sift_models::{seeded_var_builder, Classifier, ModelConfig, PackedEncoder, PackedInput};

const DOCS: usize = 32;

/// Matrix FLOPs of one forward pass: `2·n·k·m` per linear layer over the
/// packed rows, `4·t²·hidden` per document and layer for attention, and
/// the head.
fn flops(config: &ModelConfig, lengths: &[usize]) -> f64 {
    let n: usize = lengths.iter().sum();
    let (h, ff) = (config.hidden as f64, config.ff as f64);
    let linear = 2.0 * n as f64 * (h * 3.0 * h + h * h + 2.0 * h * ff);
    let attention: f64 = lengths.iter().map(|&t| 4.0 * (t * t) as f64 * h).sum();
    let head = 2.0 * (lengths.len() * config.head_input() * config.num_labels) as f64;
    config.layers as f64 * (linear + attention) + head
}

fn model(config: &ModelConfig) -> Result<Classifier> {
    let varmap = VarMap::new();
    Ok(Classifier::new(
        config,
        seeded_var_builder(&varmap, 1, DType::F32, &Device::Cpu),
    )?)
}

fn documents(config: &ModelConfig, lengths: &[usize]) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(3);
    lengths
        .iter()
        .map(|&len| {
            (0..len)
                .map(|_| rng.random_range(1..config.vocab_size as u32))
                .collect()
        })
        .collect()
}

/// `[B, T]` ids and mask padded to the longest document.
fn padded(docs: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
    let width = docs.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = vec![0u32; docs.len() * width];
    let mut mask = vec![0u8; docs.len() * width];
    for (row, doc) in docs.iter().enumerate() {
        ids[row * width..][..doc.len()].copy_from_slice(doc);
        mask[row * width..][..doc.len()].fill(1);
    }
    Ok((
        Tensor::from_vec(ids, (docs.len(), width), &Device::Cpu)?,
        Tensor::from_vec(mask, (docs.len(), width), &Device::Cpu)?,
    ))
}

fn forward(c: &mut Criterion) {
    if let Err(e) = run_forward(c) {
        panic!("benchmark setup failed: {e:#}");
    }
}

fn run_forward(c: &mut Criterion) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    let mixed: Vec<usize> = (0..DOCS).map(|_| rng.random_range(16..=128)).collect();
    let full = vec![128; DOCS];
    for (preset, config) in [
        ("tiny", ModelConfig::tiny(30_000, 250)),
        ("base", ModelConfig::base(30_000, 250)),
    ] {
        let classifier = model(&config)?;
        let packed = PackedEncoder::from_classifier(&classifier)?;
        let mut group = c.benchmark_group(format!("forward/{preset}"));
        if preset == "base" {
            group
                .sample_size(10)
                .warm_up_time(Duration::from_secs(2))
                .measurement_time(Duration::from_secs(15));
        }
        for (shape, lengths) in [("32x128", &full), ("32x16..128", &mixed)] {
            let tokens: usize = lengths.iter().sum();
            eprintln!(
                "{preset} {shape}: {tokens} tokens, {:.3} GFLOP per batch, {:.0} FLOP per token",
                flops(&config, lengths) / 1e9,
                flops(&config, lengths) / tokens as f64
            );
            let docs = documents(&config, lengths);
            let (ids, mask) = padded(&docs)?;
            let inputs: Vec<PackedInput<'_>> = docs
                .iter()
                .map(|ids| PackedInput { ids, ngrams: &[] })
                .collect();
            group.throughput(Throughput::Elements(tokens as u64));
            group.bench_function(BenchmarkId::new("candle", shape), |b| {
                b.iter(|| {
                    classifier
                        .forward(&ids, &mask, None, false)
                        .and_then(|logits| Ok(sift_models::ops::scores(&logits, config.output)?))
                        .expect("candle forward")
                })
            });
            group.bench_function(BenchmarkId::new("packed", shape), |b| {
                b.iter(|| packed.scores_flat(&inputs).expect("packed forward"))
            });
        }
        group.finish();
    }
    Ok(())
}

/// One feed-forward up-projection of the base model over 32 × 128 rows:
/// candle's `Linear` (matmul, then a broadcast bias add) against `gemm`
/// writing into a buffer that already holds the bias.
fn linear(c: &mut Criterion) {
    let (rows, inputs, outputs) = (DOCS * 128, 384, 1536);
    let mut rng = StdRng::seed_from_u64(5);
    let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
    let x = random(rows * inputs);
    let w = random(inputs * outputs);
    let bias = random(outputs);
    let build = || -> candle_core::Result<(Tensor, candle_nn::Linear)> {
        let xs = Tensor::from_vec(x.clone(), (rows, inputs), &Device::Cpu)?;
        let weight = Tensor::from_vec(w.clone(), (outputs, inputs), &Device::Cpu)?;
        let b = Tensor::from_vec(bias.clone(), outputs, &Device::Cpu)?;
        Ok((xs, candle_nn::Linear::new(weight, Some(b))))
    };
    let (xs, layer) = build().expect("tensors");
    let mut group = c.benchmark_group("linear/4096x384x1536");
    group.throughput(Throughput::Elements(2 * (rows * inputs * outputs) as u64));
    group.bench_function("candle", |b| {
        b.iter(|| candle_core::Module::forward(&layer, &xs).expect("matmul"))
    });
    let mut out = vec![0f32; rows * outputs];
    let threads = rayon::current_num_threads();
    group.bench_function("gemm", |b| {
        b.iter(|| {
            for row in out.chunks_exact_mut(outputs) {
                row.copy_from_slice(&bias);
            }
            // SAFETY: contiguous row-major buffers of exactly these sizes.
            #[allow(unsafe_code)]
            unsafe {
                gemm::gemm(
                    rows,
                    outputs,
                    inputs,
                    out.as_mut_ptr(),
                    1,
                    outputs as isize,
                    true,
                    x.as_ptr(),
                    1,
                    inputs as isize,
                    w.as_ptr(),
                    1,
                    outputs as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            }
        })
    });
    group.finish();
}

criterion_group!(benches, linear, forward);
criterion_main!(benches);
