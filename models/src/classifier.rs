//! The transformer encoder classifier.
//!
//! Tensor names (what `VarMap::save` writes and safetensors loading expects):
//!
//! ```text
//! embeddings.tokens.weight                     [vocab_size, hidden]
//! embeddings.positions.weight                  [max_len, hidden]
//! embeddings.norm.{weight,bias}                [hidden]            (post-norm only)
//! layers.N.attention.{query,key,value,output}.{weight,bias}
//! layers.N.attention_norm.{weight,bias}
//! layers.N.ff.up.{weight,bias}                 [ff, hidden], [ff]
//! layers.N.ff.down.{weight,bias}               [hidden, ff], [hidden]
//! layers.N.ff_norm.{weight,bias}
//! final_norm.{weight,bias}                     [hidden]            (pre-norm only)
//! ngrams.weight                                [buckets, dim]      (n-gram branch only)
//! head.{weight,bias}                           [num_labels, hidden + dim], [num_labels]
//! ```

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Init, Linear, VarBuilder};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::config::{ModelConfig, Norm, Pooling};
use crate::ops::{softmax_last_dim, LayerNorm};
use crate::{Error, Result};

/// BERT's initialiser: small normal weights, zero biases.
const WEIGHT_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Added to attention scores of padding keys. Large enough that their
/// softmax weight underflows to exactly 0 in f32, small enough for f16.
const MASKED_SCORE: f64 = -1e4;

fn linear(inputs: usize, outputs: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = vb.get_with_hints((outputs, inputs), "weight", WEIGHT_INIT)?;
    let bias = vb.get_with_hints(outputs, "bias", Init::Const(0.0))?;
    Ok(Linear::new(weight, Some(bias)))
}

fn embedding(rows: usize, dim: usize, vb: VarBuilder) -> candle_core::Result<Embedding> {
    let weight = vb.get_with_hints((rows, dim), "weight", WEIGHT_INIT)?;
    Ok(Embedding::new(weight, dim))
}

/// Dropout whose masks come from one seeded generator shared by every module
/// of a model, so training on the CPU is reproducible (candle's own CPU
/// generator cannot be seeded). On other devices the mask is drawn there, by
/// candle, seeded through `Device::set_seed`, to avoid copying it over.
#[derive(Debug, Clone)]
struct Dropout {
    p: f32,
    rng: Arc<Mutex<StdRng>>,
}

impl Dropout {
    fn forward(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(xs.clone());
        }
        if !xs.device().is_cpu() {
            return candle_nn::ops::dropout(xs, self.p);
        }
        let keep = 1.0 / (1.0 - self.p);
        // Compare raw u32 draws against a threshold: cheaper than floats.
        let threshold = (f64::from(self.p) * f64::from(u32::MAX)) as u32;
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            (0..xs.elem_count())
                .map(|_| {
                    if rng.next_u32() < threshold {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }
}

/// Hashed n-gram bucket ids for a batch, padded to the longest document.
#[derive(Debug, Clone)]
pub struct NgramBatch {
    /// `[B, L]` u32 bucket ids (padding positions hold 0).
    pub ids: Tensor,
    /// `[B, L]` 1 for a real id, 0 for padding (u8 or f32).
    pub mask: Tensor,
}

impl NgramBatch {
    /// Pads one list of bucket ids per document into tensors on `device`.
    /// A document with no n-grams contributes a zero vector.
    pub fn from_lists(lists: &[Vec<u32>], device: &Device) -> Result<Self> {
        let width = lists.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; lists.len() * width];
        let mut mask = vec![0u8; lists.len() * width];
        for (row, list) in lists.iter().enumerate() {
            for (col, &id) in list.iter().enumerate() {
                ids[row * width + col] = id;
                mask[row * width + col] = 1;
            }
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (lists.len(), width), device)?,
            mask: Tensor::from_vec(mask, (lists.len(), width), device)?,
        })
    }
}

/// Mean of `xs` `[B, T, D]` over positions where `mask` `[B, T]` (f32) is 1;
/// rows with no real position give zeros.
fn masked_mean(xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let weights = mask.unsqueeze(D::Minus1)?.to_dtype(xs.dtype())?;
    let sum = xs.broadcast_mul(&weights)?.sum(1)?;
    let count = weights.sum(1)?.clamp(1.0, f64::INFINITY)?;
    sum.broadcast_div(&count)
}

#[derive(Debug, Clone)]
struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    heads: usize,
    head_dim: usize,
    dropout: Dropout,
}

impl SelfAttention {
    fn new(config: &ModelConfig, dropout: &Dropout, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = config.hidden;
        Ok(Self {
            query: linear(h, h, vb.pp("query"))?,
            key: linear(h, h, vb.pp("key"))?,
            value: linear(h, h, vb.pp("value"))?,
            output: linear(h, h, vb.pp("output"))?,
            heads: config.heads,
            head_dim: h / config.heads,
            dropout: dropout.clone(),
        })
    }

    /// `xs` `[B, T, H]`, `mask_bias` `[B, 1, 1, T]` (0 for real keys,
    /// [`MASKED_SCORE`] for padding).
    fn forward(&self, xs: &Tensor, mask_bias: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(xs)?)?;
        let k = split(self.key.forward(xs)?)?;
        let v = split(self.value.forward(xs)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask_bias)?;
        let probs = self.dropout.forward(&softmax_last_dim(&scores)?, train)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h))?;
        self.output.forward(&context)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    up: Linear,
    down: Linear,
}

impl FeedForward {
    fn new(config: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            up: linear(config.hidden, config.ff, vb.pp("up"))?,
            down: linear(config.ff, config.hidden, vb.pp("down"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // Exact (erf) GELU, as BERT uses; it has a backward pass.
        self.down.forward(&self.up.forward(xs)?.gelu_erf()?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    attention: SelfAttention,
    attention_norm: LayerNorm,
    ff: FeedForward,
    ff_norm: LayerNorm,
    norm: Norm,
    dropout: Dropout,
}

impl EncoderLayer {
    fn new(config: &ModelConfig, dropout: &Dropout, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            attention: SelfAttention::new(config, dropout, vb.pp("attention"))?,
            attention_norm: LayerNorm::load(
                config.hidden,
                config.norm_eps,
                vb.pp("attention_norm"),
            )?,
            ff: FeedForward::new(config, vb.pp("ff"))?,
            ff_norm: LayerNorm::load(config.hidden, config.norm_eps, vb.pp("ff_norm"))?,
            norm: config.norm,
            dropout: dropout.clone(),
        })
    }

    fn forward(&self, xs: &Tensor, mask_bias: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let dropout = |x: &Tensor| self.dropout.forward(x, train);
        match self.norm {
            Norm::Pre => {
                let attended =
                    self.attention
                        .forward(&self.attention_norm.forward(xs)?, mask_bias, train)?;
                let xs = (xs + dropout(&attended)?)?;
                let fed = self.ff.forward(&self.ff_norm.forward(&xs)?)?;
                &xs + dropout(&fed)?
            }
            Norm::Post => {
                let attended = self.attention.forward(xs, mask_bias, train)?;
                let xs = self.attention_norm.forward(&(xs + dropout(&attended)?)?)?;
                let fed = self.ff.forward(&xs)?;
                self.ff_norm.forward(&(&xs + dropout(&fed)?)?)
            }
        }
    }
}

/// Multi-label document classifier: a transformer encoder over tokens, an
/// optional bag of hashed n-grams, and a linear head emitting one logit per
/// label.
#[derive(Debug, Clone)]
pub struct Classifier {
    config: ModelConfig,
    tokens: Embedding,
    positions: Embedding,
    /// Post-norm (BERT) models normalise the embeddings.
    embedding_norm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    /// Pre-norm models normalise the last layer's output.
    final_norm: Option<LayerNorm>,
    ngrams: Option<Embedding>,
    head: Linear,
    dropout: Dropout,
    /// Every layer norm's gain and bias under its tensor name, kept so that
    /// [`Classifier::named_weights`] can hand them out (the norm modules
    /// keep theirs private).
    norm_weights: Vec<(String, Tensor)>,
}

/// Fetches a layer norm's gain and bias under `prefix` the same way
/// [`LayerNorm::load`] does, so the tensors are the ones the module holds.
fn norm_weights(
    hidden: usize,
    prefix: &str,
    vb: &VarBuilder,
    out: &mut Vec<(String, Tensor)>,
) -> candle_core::Result<()> {
    let vb = vb.pp(prefix);
    let weight = vb.get_with_hints(hidden, "weight", Init::Const(1.0))?;
    let bias = vb.get_with_hints(hidden, "bias", Init::Const(0.0))?;
    out.push((format!("{prefix}.weight"), weight));
    out.push((format!("{prefix}.bias"), bias));
    Ok(())
}

impl Classifier {
    /// Builds the modules, taking or creating each weight through `vb`:
    /// over a `VarMap` (see [`crate::seeded_var_builder`]) to train, over
    /// `VarBuilder::from_mmaped_safetensors` to load saved weights.
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let emb = vb.pp("embeddings");
        let tokens = embedding(config.vocab_size, config.hidden, emb.pp("tokens"))?;
        let positions = embedding(config.max_len, config.hidden, emb.pp("positions"))?;
        let embedding_norm = match config.norm {
            Norm::Post => Some(LayerNorm::load(
                config.hidden,
                config.norm_eps,
                emb.pp("norm"),
            )?),
            Norm::Pre => None,
        };
        let dropout = Dropout {
            p: config.dropout,
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(0))),
        };
        let layers = (0..config.layers)
            .map(|i| EncoderLayer::new(config, &dropout, vb.pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_norm = match config.norm {
            Norm::Pre => Some(LayerNorm::load(
                config.hidden,
                config.norm_eps,
                vb.pp("final_norm"),
            )?),
            Norm::Post => None,
        };
        let ngrams = config
            .ngrams
            .map(|n| embedding(n.buckets, n.dim, vb.pp("ngrams")))
            .transpose()?;
        let head = linear(config.head_input(), config.num_labels, vb.pp("head"))?;
        let mut norms = Vec::new();
        if config.norm == Norm::Post {
            norm_weights(config.hidden, "embeddings.norm", &vb, &mut norms)?;
        }
        for i in 0..config.layers {
            for norm in ["attention_norm", "ff_norm"] {
                norm_weights(
                    config.hidden,
                    &format!("layers.{i}.{norm}"),
                    &vb,
                    &mut norms,
                )?;
            }
        }
        if config.norm == Norm::Pre {
            norm_weights(config.hidden, "final_norm", &vb, &mut norms)?;
        }
        Ok(Self {
            config: config.clone(),
            tokens,
            positions,
            embedding_norm,
            layers,
            final_norm,
            ngrams,
            head,
            dropout,
            norm_weights: norms,
        })
    }

    /// Every weight under its tensor name (the table at the top of this
    /// module), for code that runs the same function outside candle, such as
    /// the packed CPU encoder. The tensors share storage with the model.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![
            (
                "embeddings.tokens.weight".to_owned(),
                self.tokens.embeddings().clone(),
            ),
            (
                "embeddings.positions.weight".to_owned(),
                self.positions.embeddings().clone(),
            ),
        ];
        let mut linear = |name: String, module: &Linear| {
            out.push((format!("{name}.weight"), module.weight().clone()));
            if let Some(bias) = module.bias() {
                out.push((format!("{name}.bias"), bias.clone()));
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let attention = &layer.attention;
            for (part, module) in [
                ("query", &attention.query),
                ("key", &attention.key),
                ("value", &attention.value),
                ("output", &attention.output),
            ] {
                linear(format!("layers.{i}.attention.{part}"), module);
            }
            linear(format!("layers.{i}.ff.up"), &layer.ff.up);
            linear(format!("layers.{i}.ff.down"), &layer.ff.down);
        }
        linear("head".to_owned(), &self.head);
        if let Some(table) = &self.ngrams {
            out.push(("ngrams.weight".to_owned(), table.embeddings().clone()));
        }
        out.extend(self.norm_weights.iter().cloned());
        out
    }

    /// Restarts the dropout masks' generator from `seed` (it starts at 0).
    /// On the CPU the same seed, weights and batches give the same training
    /// run, bit for bit.
    pub fn seed_dropout(&self, seed: u64) {
        let mut rng = self.dropout.rng.lock().unwrap_or_else(|e| e.into_inner());
        *rng = StdRng::seed_from_u64(seed);
    }

    /// Builds the model from saved weights (`VarMap::save` output) by
    /// memory-mapping the safetensors files.
    pub fn load_safetensors<P: AsRef<std::path::Path>>(
        config: &ModelConfig,
        paths: &[P],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // SAFETY: the mapping is only read while the model is built (the
        // tensors are copied to `device`), and sift never rewrites a published
        // model file in place: new versions go to new paths.
        #[allow(unsafe_code)]
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device)? };
        Self::new(config, vb)
    }

    /// The configuration the modules were built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Logits `[B, num_labels]` (apply a sigmoid for per-label scores).
    ///
    /// `input_ids` is `[B, T]` u32 with `T <= max_len`; `attention_mask` is
    /// `[B, T]`, 1 for real tokens and 0 for padding (u8 or f32). Padding
    /// changes neither attention nor mean pooling, so a document's logits do
    /// not depend on how far its batch is padded. `ngrams` must be given
    /// exactly when the config has an n-gram branch. `train` turns dropout on.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        ngrams: Option<&NgramBatch>,
        train: bool,
    ) -> Result<Tensor> {
        let bag = match (&self.ngrams, ngrams) {
            (Some(table), Some(batch)) => {
                let b = input_ids.dim(0)?;
                if batch.ids.dim(0)? != b {
                    return Err(Error::Input(format!(
                        "n-gram batch has {} documents, input_ids has {b}",
                        batch.ids.dim(0)?
                    )));
                }
                Some(masked_mean(
                    &table.forward(&batch.ids)?,
                    &batch.mask.to_dtype(DType::F32)?,
                )?)
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::Input(
                    "this model has an n-gram branch; pass the documents' n-gram bucket ids".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::Input(
                    "n-gram ids were given but this model has no n-gram branch; pass None".into(),
                ))
            }
        };
        self.forward_with_bag(input_ids, attention_mask, bag.as_ref(), train)
    }

    /// [`forward`](Self::forward) with the n-gram branch's output given
    /// directly: `bag` `[B, dim]`, each row the mean of the document's bucket
    /// embeddings (zeros for none). Training keeps the n-gram table on the
    /// host and updates only the rows a batch touches, which is far cheaper
    /// than a dense gradient over the whole table.
    pub fn forward_with_bag(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        bag: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if attention_mask.dims() != [b, t] {
            return Err(Error::Input(format!(
                "attention_mask has shape {:?}, input_ids has [{b}, {t}]; they must match",
                attention_mask.dims()
            )));
        }
        if t == 0 || t > self.config.max_len {
            return Err(Error::Input(format!(
                "sequence length {t} is outside 1..={}; truncate inputs to max_len",
                self.config.max_len
            )));
        }
        let device = input_ids.device();
        let mask = attention_mask.to_dtype(DType::F32)?;

        let position_ids = Tensor::arange(0u32, t as u32, device)?;
        let xs = self
            .tokens
            .forward(input_ids)?
            .broadcast_add(&self.positions.forward(&position_ids)?)?;
        let xs = match &self.embedding_norm {
            Some(norm) => norm.forward(&xs)?,
            None => xs,
        };
        let mut xs = self.dropout.forward(&xs, train)?;

        // 0 for real keys, MASKED_SCORE for padding, shaped to broadcast over
        // heads and query positions.
        let mask_bias = mask
            .affine(-MASKED_SCORE, MASKED_SCORE)?
            .to_dtype(xs.dtype())?
            .reshape((b, 1, 1, t))?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask_bias, train)?;
        }
        if let Some(norm) = &self.final_norm {
            xs = norm.forward(&xs)?;
        }

        let pooled = match self.config.pooling {
            Pooling::Mean => masked_mean(&xs, &mask)?,
            Pooling::Cls => xs.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let features = match (self.config.ngrams, bag) {
            (Some(n), Some(bag)) => {
                if bag.dims() != [b, n.dim] {
                    return Err(Error::Input(format!(
                        "n-gram bag has shape {:?}; expected [{b}, {}]",
                        bag.dims(),
                        n.dim
                    )));
                }
                Tensor::cat(&[&pooled, &bag.to_dtype(pooled.dtype())?], 1)?
            }
            (None, None) => pooled,
            (Some(_), None) => {
                return Err(Error::Input(
                    "this model has an n-gram branch; pass the documents' n-gram bag".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::Input(
                    "an n-gram bag was given but this model has no n-gram branch; pass None".into(),
                ))
            }
        };
        let features = self.dropout.forward(&features, train)?;
        Ok(self.head.forward(&features)?)
    }
}
