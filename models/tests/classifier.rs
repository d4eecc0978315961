//! Behaviour of the classifier: gradients reach every weight, padding is
//! invisible, weights round-trip through safetensors, and the model can fit
//! a small multi-label problem.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sift_models::ops::bce_with_logits;
use sift_models::{seeded_var_builder, Classifier, ModelConfig, NgramBatch, Norm, Pooling};

const PAD: u32 = 0;

/// A batch of documents as token lists, n-gram lists and multi-hot labels.
struct Docs {
    tokens: Vec<Vec<u32>>,
    ngrams: Vec<Vec<u32>>,
    labels: Vec<Vec<u8>>,
}

fn random_docs(n: usize, config: &ModelConfig, max_tokens: usize, seed: u64) -> Docs {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut docs = Docs {
        tokens: vec![],
        ngrams: vec![],
        labels: vec![],
    };
    for _ in 0..n {
        let len = rng.random_range(2..=max_tokens);
        docs.tokens.push(
            (0..len)
                .map(|_| rng.random_range(1..config.vocab_size as u32))
                .collect(),
        );
        let buckets = config.ngrams.map_or(1, |g| g.buckets as u32);
        let count = rng.random_range(0..6);
        docs.ngrams
            .push((0..count).map(|_| rng.random_range(0..buckets)).collect());
        let mut labels = vec![0u8; config.num_labels];
        for _ in 0..rng.random_range(1..=3) {
            labels[rng.random_range(0..config.num_labels)] = 1;
        }
        docs.labels.push(labels);
    }
    docs
}

/// `[B, width]` ids and mask; padding positions get `filler` ids so tests can
/// show that the mask, not the id, hides them.
fn pad(
    tokens: &[Vec<u32>],
    width: usize,
    filler: u32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut ids = vec![filler; tokens.len() * width];
    let mut mask = vec![0u8; tokens.len() * width];
    for (row, doc) in tokens.iter().enumerate() {
        for (col, &id) in doc.iter().enumerate() {
            ids[row * width + col] = id;
            mask[row * width + col] = 1;
        }
    }
    Ok((
        Tensor::from_vec(ids, (tokens.len(), width), device)?,
        Tensor::from_vec(mask, (tokens.len(), width), device)?,
    ))
}

fn labels(docs: &Docs, device: &Device) -> Result<Tensor> {
    let flat: Vec<u8> = docs.labels.concat();
    Ok(Tensor::from_vec(
        flat,
        (docs.labels.len(), docs.labels[0].len()),
        device,
    )?)
}

fn forward(model: &Classifier, docs: &Docs, width: usize, train: bool) -> Result<Tensor> {
    let device = Device::Cpu;
    let (ids, mask) = pad(&docs.tokens, width, PAD, &device)?;
    let ngrams = match model.config().ngrams {
        Some(_) => Some(NgramBatch::from_lists(&docs.ngrams, &device)?),
        None => None,
    };
    Ok(model.forward(&ids, &mask, ngrams.as_ref(), train)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn build(config: &ModelConfig, seed: u64) -> Result<(VarMap, Classifier)> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu);
    let model = Classifier::new(config, vb)?;
    Ok((varmap, model))
}

fn variants() -> Vec<ModelConfig> {
    let mut post_cls = ModelConfig::tiny(200, 6);
    post_cls.norm = Norm::Post;
    post_cls.pooling = Pooling::Cls;
    vec![
        ModelConfig::tiny(200, 6),
        ModelConfig::tiny(200, 6).with_ngrams(97, 16),
        post_cls.with_ngrams(97, 16),
    ]
}

/// The design's requirement: every trainable tensor gets a non-zero
/// gradient from one loss, in training mode (dropout on). Fused candle-nn
/// norm/softmax kernels would leave the layers below them without one.
#[test]
fn every_weight_receives_a_gradient() -> Result<()> {
    for config in variants() {
        let (varmap, model) = build(&config, 7)?;
        let docs = random_docs(4, &config, 12, 1);
        let logits = forward(&model, &docs, 12, true)?;
        ensure!(logits.dims() == [4, config.num_labels]);
        let loss = bce_with_logits(&logits, &labels(&docs, &Device::Cpu)?)?;
        let grads = loss.backward()?;

        let vars = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        let mut names: Vec<_> = vars.keys().cloned().collect();
        names.sort();
        let expected = 2 + config.layers * 16 + 2 + 2 + usize::from(config.ngrams.is_some());
        ensure!(names.len() == expected, "{} vars: {names:?}", names.len());
        for name in names {
            let grad = grads
                .get(vars[&name].as_tensor())
                .ok_or_else(|| anyhow::anyhow!("{name} has no gradient ({config:?})"))?;
            let norm = grad.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            ensure!(
                norm > 0.0 && norm.is_finite(),
                "{name} has gradient norm {norm} ({config:?})"
            );
        }
    }
    Ok(())
}

#[test]
fn padding_does_not_change_logits() -> Result<()> {
    let device = Device::Cpu;
    for config in variants() {
        let (_, model) = build(&config, 3)?;
        let docs = random_docs(3, &config, 10, 2);
        let ngrams = match config.ngrams {
            Some(_) => Some(NgramBatch::from_lists(&docs.ngrams, &device)?),
            None => None,
        };
        let (ids, mask) = pad(&docs.tokens, 10, PAD, &device)?;
        let tight = model.forward(&ids, &mask, ngrams.as_ref(), false)?;
        // Much more padding, filled with real-looking token ids.
        let (ids, mask) = pad(&docs.tokens, 40, 17, &device)?;
        let loose_ngrams = match config.ngrams {
            Some(_) => {
                let (ids, mask) = pad(&docs.ngrams, 12, 3, &device)?;
                Some(NgramBatch { ids, mask })
            }
            None => None,
        };
        let loose = model.forward(&ids, &mask, loose_ngrams.as_ref(), false)?;
        let diff = max_abs_diff(&tight, &loose)?;
        ensure!(diff < 1e-5, "padding changed logits by {diff} ({config:?})");

        // Each document alone gives the same logits as in the batch.
        for (row, doc) in docs.tokens.iter().enumerate() {
            let (ids, mask) = pad(std::slice::from_ref(doc), doc.len(), PAD, &device)?;
            let alone_ngrams = match config.ngrams {
                Some(_) => Some(NgramBatch::from_lists(&docs.ngrams[row..=row], &device)?),
                None => None,
            };
            let alone = model.forward(&ids, &mask, alone_ngrams.as_ref(), false)?;
            let diff = max_abs_diff(&alone, &tight.narrow(0, row, 1)?)?;
            ensure!(
                diff < 1e-5,
                "batching changed logits by {diff} ({config:?})"
            );
        }
    }
    Ok(())
}

#[test]
fn seeded_init_is_deterministic() -> Result<()> {
    let config = ModelConfig::tiny(200, 6).with_ngrams(97, 16);
    let docs = random_docs(3, &config, 10, 4);
    let a = forward(&build(&config, 11)?.1, &docs, 10, false)?;
    let b = forward(&build(&config, 11)?.1, &docs, 10, false)?;
    let c = forward(&build(&config, 12)?.1, &docs, 10, false)?;
    ensure!(max_abs_diff(&a, &b)? == 0.0);
    ensure!(max_abs_diff(&a, &c)? > 1e-4);
    Ok(())
}

#[test]
fn save_then_load_gives_identical_outputs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    for config in variants() {
        let (varmap, model) = build(&config, 5)?;
        let docs = random_docs(3, &config, 10, 6);
        let before = forward(&model, &docs, 10, false)?;
        varmap.save(&path)?;
        let json = config.to_json();

        let loaded_config = ModelConfig::from_json(&json)?;
        let loaded =
            Classifier::load_safetensors(&loaded_config, &[&path], DType::F32, &Device::Cpu)?;
        let after = forward(&loaded, &docs, 10, false)?;
        ensure!(max_abs_diff(&before, &after)? == 0.0);
    }
    Ok(())
}

#[test]
fn forward_rejects_bad_inputs() -> Result<()> {
    let device = Device::Cpu;
    let config = ModelConfig::tiny(200, 6).with_ngrams(97, 16);
    let (_, model) = build(&config, 1)?;
    let (ids, mask) = pad(&[vec![1, 2, 3]], 3, PAD, &device)?;
    let missing = model.forward(&ids, &mask, None, false);
    ensure!(missing.is_err_and(|e| e.to_string().contains("n-gram")));
    let (long_ids, long_mask) = pad(&[vec![1; 129]], 129, PAD, &device)?;
    let ngrams = NgramBatch::from_lists(&[vec![1]], &device)?;
    let too_long = model.forward(&long_ids, &long_mask, Some(&ngrams), false);
    ensure!(too_long.is_err_and(|e| e.to_string().contains("max_len")));
    Ok(())
}

/// 32 random documents with multi-hot labels are memorised in a few hundred
/// AdamW steps: the whole training path (forward, loss, backward, update)
/// works end to end.
#[test]
fn overfits_a_small_multilabel_set() -> Result<()> {
    let device = Device::Cpu;
    let mut config = ModelConfig::tiny(100, 8);
    config.max_len = 16;
    config.dropout = 0.0;
    let (varmap, model) = build(&config, 21)?;
    let docs = random_docs(32, &config, 16, 8);
    let targets = labels(&docs, &device)?;
    let (ids, mask) = pad(&docs.tokens, 16, PAD, &device)?;

    let params = ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.0,
        ..ParamsAdamW::default()
    };
    let mut optimiser = AdamW::new(varmap.all_vars(), params)?;
    let mut loss_value = f32::INFINITY;
    for step in 0..300 {
        let logits = model.forward(&ids, &mask, None, true)?;
        let loss = bce_with_logits(&logits, &targets)?;
        optimiser.backward_step(&loss)?;
        loss_value = loss.to_scalar::<f32>()?;
        if loss_value < 0.02 {
            eprintln!("loss {loss_value} after {step} steps");
            break;
        }
    }
    let logits = model.forward(&ids, &mask, None, false)?;
    let final_loss = bce_with_logits(&logits, &targets)?.to_scalar::<f32>()?;
    ensure!(
        final_loss < 0.05,
        "loss {final_loss} (last train loss {loss_value})"
    );
    Ok(())
}

/// Seeded initialisation and the forward pass are pinned: a change to either
/// (init scheme, layer order, norm placement) shows up here.
#[test]
fn logits_match_recorded_values() -> Result<()> {
    let device = Device::Cpu;
    let config = ModelConfig::tiny(50, 4).with_ngrams(31, 8);
    let (_, model) = build(&config, 0)?;
    let (ids, mask) = pad(&[vec![5, 9, 12, 3], vec![7, 7]], 4, PAD, &device)?;
    let ngrams = NgramBatch::from_lists(&[vec![1, 30], vec![]], &device)?;
    let logits = model.forward(&ids, &mask, Some(&ngrams), false)?;
    let got = logits.flatten_all()?.to_vec1::<f32>()?;
    let recorded: [f32; 8] = [
        0.171_657_35,
        0.267_397_58,
        -0.053_102_575,
        0.141_548_9,
        -0.031_748_82,
        0.419_760_3,
        -0.411_963_08,
        -0.015_068_084,
    ];
    for (g, r) in got.iter().zip(recorded) {
        ensure!((g - r).abs() < 1e-4, "got {got:?}, recorded {recorded:?}");
    }
    Ok(())
}
