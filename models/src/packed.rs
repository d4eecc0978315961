//! A fast CPU forward pass for inference: the same function as
//! [`Classifier::forward`] with `train = false`, followed by
//! [`crate::ops::scores`], computed on packed rows.
//!
//! Why a second implementation: on the CPU candle runs each tensor op on its
//! own (an allocation per op, single-threaded elementwise kernels, an erf
//! GELU through `f64`), and a padded `[B, T]` batch spends FLOPs on padding.
//! Here the documents' real tokens are concatenated into one
//! `[total_tokens, hidden]` matrix, so
//!
//! - every linear layer is one matrix product over all rows (the `gemm`
//!   crate, which candle itself uses, with its AVX-512 kernels), the bias
//!   added in a pass that also does the next elementwise step;
//! - attention runs per (document, head) over that document's own tokens,
//!   which is what the padded computation does: candle adds -1e4 to padding
//!   keys, and `exp(-1e4)` is exactly 0 in f32, so padding keys get weight 0
//!   and padding queries never reach the pooled output;
//! - layer norm, GELU (erf, through an approximation within 2e-7 of it) and
//!   softmax run in place, in SIMD loops, split over rayon's threads.
//!
//! Weights are copied out of the [`Classifier`] once, as f32, with linear
//! weights transposed to `[inputs, outputs]` and the query, key and value
//! projections fused into one `[hidden, 3·hidden]` product.
//!
//! A document with no tokens is scored as candle scores it in a batch of
//! width 1: one padding token (id 0) whose state mean pooling ignores (the
//! pooled vector is zeros) and CLS pooling uses.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::config::{ModelConfig, Norm, Output, Pooling};
use crate::int8::{Epilogue, Kernel, QuantWeight};
use crate::{Classifier, Error, Result};

/// Rows per parallel task in elementwise passes: large enough to amortise
/// rayon's scheduling, small enough to balance two to a few dozen threads.
const ROWS_PER_TASK: usize = 16;

/// One document to score.
#[derive(Debug, Clone, Copy, Default)]
pub struct PackedInput<'a> {
    /// Token ids, already truncated to the model's `max_len`.
    pub ids: &'a [u32],
    /// Hashed n-gram bucket ids; empty for none, and for models without the
    /// n-gram branch.
    pub ngrams: &'a [u32],
}

/// A layer norm's gain and bias.
#[derive(Debug, Clone)]
struct NormWeights {
    gain: Vec<f32>,
    bias: Vec<f32>,
}

/// A linear layer, its weight transposed to row-major `[inputs, outputs]`.
#[derive(Clone)]
struct Dense {
    /// Empty when the layer runs in int8.
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
    /// The weight quantised, for [`Precision::Int8`].
    int8: Option<QuantWeight>,
}

impl Dense {
    /// Replaces the f32 weight by its int8 form for `kernel`.
    fn quantize(&mut self, kernel: Kernel) {
        self.int8 = Some(QuantWeight::new(
            &self.weight,
            self.inputs,
            self.outputs,
            kernel,
        ));
        self.weight = Vec::new();
    }
}

/// The arithmetic of the encoder's linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 throughout: the same scores as candle within rounding.
    #[default]
    F32,
    /// The four linear layers of every encoder layer in int8 (weights per
    /// output channel, activations per row; see [`crate::int8`]) with the
    /// given kernel; embeddings, attention, norms and the head stay f32.
    Int8(Kernel),
}

#[derive(Clone)]
struct Layer {
    /// Query, key and value side by side: outputs `[q | k | v]`.
    qkv: Dense,
    output: Dense,
    attention_norm: NormWeights,
    up: Dense,
    down: Dense,
    ff_norm: NormWeights,
}

/// The classifier's weights laid out for packed CPU inference; see the
/// module documentation. Immutable once built, so it is `Send + Sync` and
/// can serve several threads.
#[derive(Clone)]
pub struct PackedEncoder {
    config: ModelConfig,
    precision: Precision,
    eps: f32,
    /// `[vocab_size, hidden]`.
    tokens: Vec<f32>,
    /// `[max_len, hidden]`.
    positions: Vec<f32>,
    embedding_norm: Option<NormWeights>,
    layers: Vec<Layer>,
    final_norm: Option<NormWeights>,
    /// `[buckets, dim]`.
    ngrams: Option<Vec<f32>>,
    head: Dense,
}

impl std::fmt::Debug for PackedEncoder {
    // The weights are millions of numbers; the config says what matters.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedEncoder")
            .field("config", &self.config)
            .field("precision", &self.precision)
            .finish_non_exhaustive()
    }
}

/// The weights of a [`Classifier`] by name, as host f32 vectors.
struct Weights(HashMap<String, Tensor>);

impl Weights {
    fn take(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let tensor = self
            .0
            .get(name)
            .ok_or_else(|| Error::Input(format!("the classifier has no weight named `{name}`")))?;
        let values = tensor
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if values.len() != len {
            return Err(Error::Input(format!(
                "weight `{name}` has {} values; the config implies {len}",
                values.len()
            )));
        }
        Ok(values)
    }

    fn norm(&self, prefix: &str, hidden: usize) -> Result<NormWeights> {
        Ok(NormWeights {
            gain: self.take(&format!("{prefix}.weight"), hidden)?,
            bias: self.take(&format!("{prefix}.bias"), hidden)?,
        })
    }

    /// Linear layers `prefixes` (each `[outputs, inputs]` in candle) side by
    /// side as one `[inputs, Σ outputs]` layer.
    fn dense(&self, prefixes: &[&str], inputs: usize, outputs: usize) -> Result<Dense> {
        let total = outputs * prefixes.len();
        let mut weight = vec![0f32; inputs * total];
        let mut bias = Vec::with_capacity(total);
        for (part, prefix) in prefixes.iter().enumerate() {
            let w = self.take(&format!("{prefix}.weight"), outputs * inputs)?;
            for (o, row) in w.chunks_exact(inputs).enumerate() {
                for (i, &value) in row.iter().enumerate() {
                    weight[i * total + part * outputs + o] = value;
                }
            }
            bias.extend(self.take(&format!("{prefix}.bias"), outputs)?);
        }
        Ok(Dense {
            weight,
            bias,
            inputs,
            outputs: total,
            int8: None,
        })
    }
}

impl PackedEncoder {
    /// Copies `classifier`'s weights (from any device and dtype) into host
    /// f32 buffers laid out for [`scores`](Self::scores).
    pub fn from_classifier(classifier: &Classifier) -> Result<Self> {
        Self::with_precision(classifier, Precision::F32)
    }

    /// [`from_classifier`](Self::from_classifier) computing the encoder
    /// layers' linear products in `precision`. Fails if the CPU cannot run
    /// the int8 kernel asked for.
    pub fn with_precision(classifier: &Classifier, precision: Precision) -> Result<Self> {
        if let Precision::Int8(kernel) = precision {
            if !kernel.supported() {
                return Err(Error::Input(format!(
                    "this CPU cannot run the {} int8 kernel",
                    kernel.name()
                )));
            }
        }
        let config = classifier.config().clone();
        config.validate()?;
        let weights = Weights(classifier.named_weights().into_iter().collect());
        let h = config.hidden;
        let layers = (0..config.layers)
            .map(|i| {
                let p = |name: &str| format!("layers.{i}.{name}");
                let mut layer = Layer {
                    qkv: weights.dense(
                        &[
                            &p("attention.query"),
                            &p("attention.key"),
                            &p("attention.value"),
                        ],
                        h,
                        h,
                    )?,
                    output: weights.dense(&[&p("attention.output")], h, h)?,
                    attention_norm: weights.norm(&p("attention_norm"), h)?,
                    up: weights.dense(&[&p("ff.up")], h, config.ff)?,
                    down: weights.dense(&[&p("ff.down")], config.ff, h)?,
                    ff_norm: weights.norm(&p("ff_norm"), h)?,
                };
                if let Precision::Int8(kernel) = precision {
                    for dense in [
                        &mut layer.qkv,
                        &mut layer.output,
                        &mut layer.up,
                        &mut layer.down,
                    ] {
                        dense.quantize(kernel);
                    }
                }
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        let (embedding_norm, final_norm) = match config.norm {
            Norm::Post => (Some(weights.norm("embeddings.norm", h)?), None),
            Norm::Pre => (None, Some(weights.norm("final_norm", h)?)),
        };
        let ngrams = config
            .ngrams
            .map(|n| weights.take("ngrams.weight", n.buckets * n.dim))
            .transpose()?;
        Ok(Self {
            precision,
            eps: config.norm_eps as f32,
            tokens: weights.take("embeddings.tokens.weight", config.vocab_size * h)?,
            positions: weights.take("embeddings.positions.weight", config.max_len * h)?,
            embedding_norm,
            layers,
            final_norm,
            ngrams,
            head: weights.dense(&["head"], config.head_input(), config.num_labels)?,
            config,
        })
    }

    /// The configuration of the classifier the weights came from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The arithmetic of the linear layers.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Per-label scores of each document, in input order: what
    /// `ops::scores(&classifier.forward(ids, mask, ngrams, false)?, output)`
    /// gives for the same documents padded into a batch.
    pub fn scores(&self, docs: &[PackedInput<'_>]) -> Result<Vec<Vec<f32>>> {
        let labels = self.config.num_labels;
        Ok(self
            .scores_flat(docs)?
            .chunks_exact(labels)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// [`scores`](Self::scores) as one row-major `[docs, num_labels]`
    /// buffer.
    pub fn scores_flat(&self, docs: &[PackedInput<'_>]) -> Result<Vec<f32>> {
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        self.check(docs)?;
        let config = &self.config;
        let h = config.hidden;

        // Row ranges of the documents in the packed matrix. An empty
        // document is one padding token (see the module documentation).
        let mut starts = Vec::with_capacity(docs.len() + 1);
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for doc in docs {
            starts.push(ids.len());
            if doc.ids.is_empty() {
                ids.push(0);
                positions.push(0);
            } else {
                ids.extend_from_slice(doc.ids);
                positions.extend(0..doc.ids.len());
            }
        }
        starts.push(ids.len());
        let rows = ids.len();

        let mut buffers = Buffers::take();
        let Buffers {
            x,
            normed,
            qkv,
            context,
            up,
        } = &mut buffers;
        let x = Buffers::sized(x, rows * h);
        x.par_chunks_mut(h * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, block)| {
                for (r, row) in block.chunks_exact_mut(h).enumerate() {
                    let at = task * ROWS_PER_TASK + r;
                    let token = &self.tokens[ids[at] as usize * h..][..h];
                    let position = &self.positions[positions[at] * h..][..h];
                    for ((out, t), p) in row.iter_mut().zip(token).zip(position) {
                        *out = t + p;
                    }
                }
            });

        let zeros = vec![0f32; h];
        let normed = Buffers::sized(normed, rows * h);
        let qkv = Buffers::sized(qkv, rows * 3 * h);
        let context = Buffers::sized(context, rows * h);
        let up = Buffers::sized(up, rows * config.ff);
        match config.norm {
            Norm::Pre => {
                let first = self
                    .layers
                    .first()
                    .map(|l| &l.attention_norm)
                    .or(self.final_norm.as_ref());
                if let Some(norm) = first {
                    self.bias_norm_into(&mut *x, &zeros, norm, &mut *normed);
                }
            }
            Norm::Post => {
                if let Some(norm) = &self.embedding_norm {
                    self.bias_norm_in_place(&mut *x, &zeros, norm);
                }
            }
        }

        for (i, layer) in self.layers.iter().enumerate() {
            // The attention input: normalised for pre-norm, raw for post-norm.
            let input = match config.norm {
                Norm::Pre => &*normed,
                Norm::Post => &*x,
            };
            fill_rows(&mut *qkv, &layer.qkv.bias);
            linear(&mut *qkv, input, &layer.qkv, rows, true);
            self.attention(&*qkv, &mut *context, &starts);
            // x += context · W_o; the bias joins in the pass below.
            linear(&mut *x, &*context, &layer.output, rows, true);
            match config.norm {
                Norm::Pre => {
                    self.bias_norm_into(&mut *x, &layer.output.bias, &layer.ff_norm, &mut *normed);
                    linear_gelu(&mut *up, &*normed, &layer.up, rows);
                }
                Norm::Post => {
                    self.bias_norm_in_place(&mut *x, &layer.output.bias, &layer.attention_norm);
                    linear_gelu(&mut *up, &*x, &layer.up, rows);
                }
            }
            linear(&mut *x, &*up, &layer.down, rows, true);
            match config.norm {
                Norm::Pre => {
                    // The next layer's attention norm, or the final norm.
                    let next = self
                        .layers
                        .get(i + 1)
                        .map(|l| &l.attention_norm)
                        .or(self.final_norm.as_ref());
                    if let Some(norm) = next {
                        self.bias_norm_into(&mut *x, &layer.down.bias, norm, &mut *normed);
                    }
                }
                Norm::Post => self.bias_norm_in_place(&mut *x, &layer.down.bias, &layer.ff_norm),
            }
        }
        let states = match config.norm {
            Norm::Pre => &*normed,
            Norm::Post => &*x,
        };

        let features = self.features(docs, states, &starts);
        buffers.give_back();
        let mut logits = vec![0f32; docs.len() * config.num_labels];
        fill_rows(&mut logits, &self.head.bias);
        linear(&mut logits, &features, &self.head, docs.len(), true);
        for row in logits.chunks_exact_mut(config.num_labels) {
            match config.output {
                Output::Sigmoid => row.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
                Output::Softmax => {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for v in row.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    row.iter_mut().for_each(|v| *v /= sum);
                }
            }
        }
        Ok(logits)
    }

    /// Rejects what candle would reject, with the same kind of message.
    fn check(&self, docs: &[PackedInput<'_>]) -> Result<()> {
        let config = &self.config;
        for (i, doc) in docs.iter().enumerate() {
            if doc.ids.len() > config.max_len {
                return Err(Error::Input(format!(
                    "document {i} has {} tokens, more than max_len {}; truncate inputs",
                    doc.ids.len(),
                    config.max_len
                )));
            }
            if let Some(&id) = doc.ids.iter().find(|&&id| id as usize >= config.vocab_size) {
                return Err(Error::Input(format!(
                    "document {i} has token id {id}, outside the vocabulary of {}",
                    config.vocab_size
                )));
            }
            match config.ngrams {
                Some(n) => {
                    if let Some(&id) = doc.ngrams.iter().find(|&&id| id as usize >= n.buckets) {
                        return Err(Error::Input(format!(
                            "document {i} has n-gram bucket {id}, outside the {} buckets",
                            n.buckets
                        )));
                    }
                }
                None if !doc.ngrams.is_empty() => {
                    return Err(Error::Input(format!(
                        "document {i} has n-gram ids but this model has no n-gram branch"
                    )))
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Multi-head self-attention of each document over its own rows:
    /// `context` gets softmax(q·kᵀ/√d)·v, head by head in its columns.
    #[allow(unsafe_code)]
    fn attention(&self, qkv: &[f32], context: &mut [f32], starts: &[usize]) {
        let h = self.config.hidden;
        let heads = self.config.heads;
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let stride = 3 * h;
        let rows = starts.last().copied().unwrap_or(0);
        assert_eq!(qkv.len(), rows * stride, "qkv holds q, k and v per row");
        assert_eq!(context.len(), rows * h, "context holds one row per token");
        let tasks: Vec<(usize, usize)> = (0..starts.len() - 1)
            .flat_map(|doc| (0..heads).map(move |head| (doc, head)))
            .collect();
        // Each task writes its own (document rows × head columns) block, so
        // tasks never write the same element; see the SAFETY note below.
        let context_at = context.as_mut_ptr().expose_provenance();
        let qkv_at = qkv.as_ptr().expose_provenance();
        thread_local! {
            /// A task's attention scores, kept per thread (see `Buffers`).
            static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        tasks.par_iter().with_min_len(1).for_each(|&(doc, head)| {
            SCORES.with_borrow_mut(|scores| {
                let start = starts[doc];
                let t = starts[doc + 1] - start;
                scores.clear();
                scores.resize(t * t, 0.0);
                let base = start * stride + head * d;
                let q = std::ptr::with_exposed_provenance::<f32>(qkv_at).wrapping_add(base);
                let k = q.wrapping_add(h);
                let v = q.wrapping_add(2 * h);
                let out = std::ptr::with_exposed_provenance_mut::<f32>(context_at)
                    .wrapping_add(start * h + head * d);
                // SAFETY: rows `start..start + t` exist in both buffers
                // (checked lengths above; `starts` is ascending and ends at
                // `rows`) and `head * d + d <= h`, so every element read
                // from q, k, v and written to `out` is in bounds. `scores`
                // holds t × t elements. Tasks write disjoint blocks of
                // `context`, which is exclusively borrowed for this call,
                // and no task writes `qkv`.
                unsafe {
                    // scores = scale · q kᵀ: kᵀ[j][c] is k[c][j], so its row
                    // stride is 1 and its column stride one packed row.
                    gemm::gemm(
                        t,
                        t,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        t as isize,
                        false,
                        q,
                        1,
                        stride as isize,
                        k,
                        stride as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                for row in scores.chunks_exact_mut(t) {
                    softmax_in_place(row);
                }
                // SAFETY: as above; `out` is this task's block of `context`.
                unsafe {
                    gemm::gemm(
                        t,
                        d,
                        t,
                        out,
                        1,
                        h as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        t as isize,
                        v,
                        1,
                        stride as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            })
        });
    }

    /// Pooled encoder state (mean over the document's tokens, or its first
    /// token) followed by the mean of its n-gram embeddings, per document.
    fn features(&self, docs: &[PackedInput<'_>], states: &[f32], starts: &[usize]) -> Vec<f32> {
        let h = self.config.hidden;
        let width = self.config.head_input();
        let mut features = vec![0f32; docs.len() * width];
        features
            .par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| {
                let (pooled, bag) = row.split_at_mut(h);
                let doc_states = &states[starts[i] * h..starts[i + 1] * h];
                match self.config.pooling {
                    Pooling::Cls => pooled.copy_from_slice(&doc_states[..h]),
                    // An empty document pools to zeros, as candle's
                    // masked mean gives for a row without real tokens.
                    Pooling::Mean if docs[i].ids.is_empty() => {}
                    Pooling::Mean => {
                        for state in doc_states.chunks_exact(h) {
                            pooled.iter_mut().zip(state).for_each(|(p, s)| *p += s);
                        }
                        let count = docs[i].ids.len() as f32;
                        pooled.iter_mut().for_each(|p| *p /= count);
                    }
                }
                if let (Some(table), Some(n)) = (&self.ngrams, self.config.ngrams) {
                    for &id in docs[i].ngrams {
                        let embedding = &table[id as usize * n.dim..][..n.dim];
                        bag.iter_mut().zip(embedding).for_each(|(b, e)| *b += e);
                    }
                    let count = docs[i].ngrams.len().max(1) as f32;
                    bag.iter_mut().for_each(|b| *b /= count);
                }
            });
        features
    }

    /// `x += bias` then `out = norm(x)`, row by row.
    fn bias_norm_into(&self, x: &mut [f32], bias: &[f32], norm: &NormWeights, out: &mut [f32]) {
        let h = self.config.hidden;
        let eps = self.eps;
        x.par_chunks_mut(h * ROWS_PER_TASK)
            .zip(out.par_chunks_mut(h * ROWS_PER_TASK))
            .for_each(|(x, out)| {
                for (x, out) in x.chunks_exact_mut(h).zip(out.chunks_exact_mut(h)) {
                    bias_norm_row(x, bias, &norm.gain, &norm.bias, eps, out);
                }
            });
    }

    /// `x = norm(x + bias)`, row by row.
    fn bias_norm_in_place(&self, x: &mut [f32], bias: &[f32], norm: &NormWeights) {
        let h = self.config.hidden;
        let eps = self.eps;
        x.par_chunks_mut(h * ROWS_PER_TASK).for_each_init(
            || vec![0f32; h],
            |row_out, x| {
                for x in x.chunks_exact_mut(h) {
                    bias_norm_row(x, bias, &norm.gain, &norm.bias, eps, row_out);
                    x.copy_from_slice(row_out);
                }
            },
        );
    }
}

/// The activation buffers of one forward pass, kept for the next: a
/// batch's buffers are tens of megabytes, and fresh ones cost a page fault
/// per 4 KiB on first touch (7% of a `tiny` pass at batch 32).
#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    up: Vec<f32>,
}

/// Buffers between passes; at most [`SPARE_BUFFERS`] sets are kept, so
/// memory stays bounded whatever the number of threads that score.
static SPARE: std::sync::Mutex<Vec<Buffers>> = std::sync::Mutex::new(Vec::new());
const SPARE_BUFFERS: usize = 2;

impl Buffers {
    fn take() -> Self {
        SPARE
            .lock()
            .map(|mut spare| spare.pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn give_back(self) {
        if let Ok(mut spare) = SPARE.lock() {
            if spare.len() < SPARE_BUFFERS {
                spare.push(self);
            }
        }
    }

    /// `buffer` holding `len` values. What it held before is left in place:
    /// every user overwrites its buffer before reading it.
    fn sized(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
        buffer.resize(len, 0.0);
        &mut buffer[..]
    }
}

/// Sets every row of `out` to `row`.
fn fill_rows(out: &mut [f32], row: &[f32]) {
    out.par_chunks_mut(row.len() * ROWS_PER_TASK)
        .for_each(|block| {
            block
                .chunks_exact_mut(row.len())
                .for_each(|r| r.copy_from_slice(row))
        });
}

/// `out = gelu(input · dense.weight + dense.bias)`: in int8 in one pass,
/// in f32 as a product then a pass over `out`.
fn linear_gelu(out: &mut [f32], input: &[f32], dense: &Dense, rows: usize) {
    match &dense.int8 {
        Some(weight) => {
            crate::int8::linear(out, input, weight, rows, Epilogue::BiasGelu(&dense.bias))
        }
        None => {
            linear(out, input, dense, rows, false);
            bias_gelu(out, &dense.bias);
        }
    }
}

/// `out[rows, outputs] (+)= input[rows, inputs] · dense.weight`, over all of
/// rayon's threads. With `accumulate` the product is added to what `out`
/// holds (a residual or a bias filled in beforehand).
#[allow(unsafe_code)]
fn linear(out: &mut [f32], input: &[f32], dense: &Dense, rows: usize, accumulate: bool) {
    if let Some(weight) = &dense.int8 {
        let epilogue = if accumulate {
            Epilogue::Accumulate
        } else {
            Epilogue::Store
        };
        return crate::int8::linear(out, input, weight, rows, epilogue);
    }
    let (k, n) = (dense.inputs, dense.outputs);
    assert_eq!(input.len(), rows * k, "input is [rows, inputs]");
    assert_eq!(out.len(), rows * n, "output is [rows, outputs]");
    assert_eq!(dense.weight.len(), k * n, "weight is [inputs, outputs]");
    if rows == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the three buffers are contiguous row-major matrices of the
    // sizes asserted above, so every access is in bounds; `out` is borrowed
    // mutably and does not alias the shared `input` and weight.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            input.as_ptr(),
            1,
            k as isize,
            dense.weight.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Lanes of the partial sums in reductions: one AVX-512 register of f32.
const LANES: usize = 16;

/// Sum of `xs`, in [`LANES`] partial sums so the loop vectorises.
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of `(x - mean)²` over `xs`, vectorised like [`sum`].
#[inline(always)]
fn squared_deviation(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|x| (x - mean) * (x - mean))
        .sum();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            let c = x - mean;
            *a += c * c;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Maximum of `xs`, vectorised like [`sum`].
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

/// `e^x` in f32 within about 2 ulp (Cephes' `expf`: a degree-6 polynomial
/// after reduction by powers of two), branch-free so loops vectorise. Inputs
/// below -87.3 give about 1e-38 instead of a smaller value or 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if x < -87.3 { -87.3 } else { x };
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is in -126..=127 after the clamps, a normal power of two. Adding
    // 1.5·2²³ puts the integer n + 127 in the low mantissa bits, so the
    // exponent field is built with integer operations alone: `n as i32`
    // would saturate and map NaN to 0 lane by lane, which keeps the loop
    // from vectorising.
    const SHIFTER: f32 = 12_582_912.0;
    let biased = (n + (127.0 + SHIFTER))
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits());
    let scale = f32::from_bits(biased << 23);
    y * scale
}

/// The error function, within 2e-7 of the exact value everywhere
/// (Abramowitz and Stegun 7.1.26, whose own bound is 1.5e-7, evaluated with
/// [`exp`]); branch-free so loops vectorise.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// GELU as BERT defines it, `x · Φ(x)` with the exact normal CDF.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

simd_fn! {
    /// `x += bias`, then `out = (x - mean) / sqrt(var + eps) · gain + beta`.
    fn bias_norm_row(
        x: &mut [f32],
        bias: &[f32],
        gain: &[f32],
        beta: &[f32],
        eps: f32,
        out: &mut [f32],
    ) {
        for (x, b) in x.iter_mut().zip(bias) {
            *x += b;
        }
        let n = x.len() as f32;
        let mean = sum(x) / n;
        let var = squared_deviation(x, mean) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, x), g), b) in out.iter_mut().zip(x.iter()).zip(gain).zip(beta) {
            *o = (x - mean) * inv * g + b;
        }
    }
}

simd_fn! {
    /// Softmax of one row of attention scores, in place.
    fn softmax_in_place(row: &mut [f32]) {
        let m = max(row);
        for v in row.iter_mut() {
            *v = exp(*v - m);
        }
        let inv = 1.0 / sum(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

simd_fn! {
    /// `x = gelu(x + bias)` over rows of `bias.len()` values.
    fn bias_gelu_rows(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu(*v + b);
            }
        }
    }
}

/// `x = gelu(x + bias)` on `[rows, bias.len()]`, over rayon's threads.
fn bias_gelu(x: &mut [f32], bias: &[f32]) {
    x.par_chunks_mut(bias.len() * ROWS_PER_TASK)
        .for_each(|block| bias_gelu_rows(block, bias));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_exp_are_accurate() -> candle_core::Result<()> {
        // Compare against candle's erf, computed in f64.
        let xs: Vec<f32> = (-6000..=6000).map(|i| i as f32 * 1e-3).collect();
        let reference = Tensor::new(xs.as_slice(), &Device::Cpu)?
            .to_dtype(DType::F64)?
            .erf()?
            .to_vec1::<f64>()?;
        let mut worst = 0f64;
        for (&x, &r) in xs.iter().zip(&reference) {
            worst = worst.max((f64::from(erf(x)) - r).abs());
        }
        assert!(worst < 1e-6, "erf error {worst}");
        for &x in &xs {
            let x = x * 14.0;
            let r = f64::from(x).exp();
            let rel = (f64::from(exp(x)) - r).abs() / r;
            assert!(rel < 1e-6, "exp({x}) relative error {rel}");
        }
        Ok(())
    }

    #[test]
    fn gelu_matches_candle() -> candle_core::Result<()> {
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 5e-3).collect();
        let reference = Tensor::new(xs.as_slice(), &Device::Cpu)?
            .gelu_erf()?
            .to_vec1::<f32>()?;
        let mut ours = xs.clone();
        bias_gelu_rows(&mut ours, &[0.0]);
        let worst = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-6, "gelu error {worst}");
        Ok(())
    }

    #[test]
    fn reductions_cover_the_tail() {
        let xs: Vec<f32> = (0..37).map(|i| i as f32).collect();
        assert_eq!(sum(&xs), 666.0);
        assert_eq!(max(&xs), 36.0);
        let mut row = vec![1.0f32, 2.0, 3.0];
        softmax_in_place(&mut row);
        let z = 1f32.exp() + 2f32.exp() + 3f32.exp();
        assert!((row[2] - 3f32.exp() / z).abs() < 1e-6);
    }
}
