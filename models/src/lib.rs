//! Candle model definitions for sift's category classifier: configuration
//! and modules only. The only file format touched is safetensors, through
//! candle (`VarMap::save`, `VarBuilder::from_mmaped_safetensors`); reading
//! datasets, tokenizers and checkpoints from storage belongs to the training
//! crate and the inference daemon.
//!
//! - [`ModelConfig`]: sizes, pooling, norm placement and the optional hashed
//!   n-gram branch; serialised as `config.json`.
//! - [`Classifier`]: a transformer encoder (token + learned position
//!   embeddings, pre- or post-norm layers, masked multi-head attention, GELU
//!   feed-forward) with mean or CLS pooling and a linear multi-label head.
//! - [`ops`]: differentiable softmax, layer norm and a stable BCE loss.
//!   candle-nn's fused `layer_norm`, `rms_norm` and `softmax_last_dim` have no
//!   backward pass, so this crate never uses them.
//! - [`seeded_var_builder`]: deterministic initialisation (candle cannot seed
//!   its CPU generator).
//! - [`bert`]: start from a pretrained BERT/MiniLM encoder (post-norm).
//! - [`PackedEncoder`]: the same forward pass for inference on the CPU,
//!   over the documents' real tokens only (no padding), several times
//!   faster than candle's generic CPU ops.
//!
//! Dropout masks on the CPU come from a generator seeded through
//! [`Classifier::seed_dropout`], so a CPU training run is reproducible bit
//! for bit; on CUDA they come from candle's generator (`Device::set_seed`).
//! Evaluation (`train = false`) is always deterministic.
//!
//! Training a model and loading saved weights:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use sift_models::{seeded_var_builder, Classifier, ModelConfig};
//!
//! let device = Device::Cpu;
//! let config = ModelConfig::tiny(8000, 367);
//! let varmap = VarMap::new();
//! let model = Classifier::new(&config, seeded_var_builder(&varmap, 42, DType::F32, &device))?;
//! // ... optimise varmap.all_vars() with candle_nn::AdamW ...
//! varmap.save("model.safetensors")?;
//!
//! // SAFETY: the file is not modified while mapped.
//! #[allow(unsafe_code)]
//! let vb = unsafe {
//!     VarBuilder::from_mmaped_safetensors(&["model.safetensors"], DType::F32, &device)?
//! };
//! let loaded = Classifier::new(&config, vb)?;
//! # Ok(())
//! # }
//! ```

#[macro_use]
mod simd;

pub mod bert;
mod classifier;
mod config;
mod init;
pub mod int8;
pub mod ops;
pub mod packed;

pub use classifier::{Classifier, NgramBatch};
pub use config::{ConfigError, ModelConfig, NgramConfig, Norm, Output, Pooling};
pub use init::seeded_var_builder;
pub use int8::Kernel as Int8Kernel;
pub use packed::{PackedEncoder, PackedInput, Precision};

/// What can go wrong building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Inputs have the wrong shape or do not fit the model.
    #[error("model input: {0}")]
    Input(String),
    /// A pretrained BERT checkpoint does not fit.
    #[error("BERT checkpoint: {0}")]
    Bert(String),
    /// A tensor operation failed (shape mismatch, missing weight, device).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
