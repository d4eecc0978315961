//! Starting from a pretrained BERT-style encoder (e.g. all-MiniLM-L6-v2).
//!
//! BERT is post-norm (layer norm after each residual sum, and on the
//! embeddings, no final norm), so a model started from BERT weights uses
//! [`Norm::Post`]; the encoder weights then map one to one. Two BERT details
//! are folded away rather than modelled:
//!
//! - token-type embeddings: sift feeds single segments, so row 0 of
//!   `token_type_embeddings` is a constant added to every position; it is
//!   added into the position table.
//! - the pooler (`pooler.dense`) is dropped; the config's pooling applies
//!   (mean pooling, as sentence-transformers' MiniLM was trained with).
//!
//! The head and the n-gram branch have no BERT counterpart and keep their
//! fresh initialisation. Typical use in the training crate:
//!
//! ```text
//! let config = sift_models::bert::config_from_bert(&config_json, num_labels, 256)?;
//! let bert = candle_core::safetensors::load("model.safetensors", &device)?;
//! let weights = sift_models::bert::convert(bert, &config)?;
//! let varmap = VarMap::new();
//! let model = Classifier::new(&config, seeded_var_builder(&varmap, seed, DType::F32, &device))?;
//! varmap.clone().set(weights.iter())?;
//! ```

use std::collections::HashMap;

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::{ModelConfig, Norm, Pooling};
use crate::{Error, Result};

/// Per-layer names: (BERT suffix after `encoder.layer.N.`, ours after
/// `layers.N.`).
const LAYER_NAMES: [(&str, &str); 16] = [
    ("attention.self.query.weight", "attention.query.weight"),
    ("attention.self.query.bias", "attention.query.bias"),
    ("attention.self.key.weight", "attention.key.weight"),
    ("attention.self.key.bias", "attention.key.bias"),
    ("attention.self.value.weight", "attention.value.weight"),
    ("attention.self.value.bias", "attention.value.bias"),
    ("attention.output.dense.weight", "attention.output.weight"),
    ("attention.output.dense.bias", "attention.output.bias"),
    ("attention.output.LayerNorm.weight", "attention_norm.weight"),
    ("attention.output.LayerNorm.bias", "attention_norm.bias"),
    ("intermediate.dense.weight", "ff.up.weight"),
    ("intermediate.dense.bias", "ff.up.bias"),
    ("output.dense.weight", "ff.down.weight"),
    ("output.dense.bias", "ff.down.bias"),
    ("output.LayerNorm.weight", "ff_norm.weight"),
    ("output.LayerNorm.bias", "ff_norm.bias"),
];

/// Embedding names: (BERT, ours). Positions are handled separately.
const EMBEDDING_NAMES: [(&str, &str); 3] = [
    (
        "embeddings.word_embeddings.weight",
        "embeddings.tokens.weight",
    ),
    ("embeddings.LayerNorm.weight", "embeddings.norm.weight"),
    ("embeddings.LayerNorm.bias", "embeddings.norm.bias"),
];

const POSITIONS: &str = "embeddings.position_embeddings.weight";
const TOKEN_TYPES: &str = "embeddings.token_type_embeddings.weight";

/// Every (BERT name, our name) pair for an encoder with `layers` layers,
/// except the position table (see [`convert`]).
pub fn name_map(layers: usize) -> Vec<(String, String)> {
    let mut names: Vec<(String, String)> = EMBEDDING_NAMES
        .iter()
        .map(|(bert, ours)| (bert.to_string(), ours.to_string()))
        .collect();
    for layer in 0..layers {
        for (bert, ours) in LAYER_NAMES {
            names.push((
                format!("encoder.layer.{layer}.{bert}"),
                format!("layers.{layer}.{ours}"),
            ));
        }
    }
    names
}

/// Normalises checkpoint spellings: a `bert.` prefix (BertForX
/// checkpoints) and TensorFlow-era `gamma`/`beta` layer-norm names.
fn canonical(name: &str) -> String {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    if let Some(stem) = name.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight")
    } else if let Some(stem) = name.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias")
    } else {
        name.to_string()
    }
}

/// Renames BERT encoder tensors to this crate's names, for a post-norm
/// `config` whose sizes match the checkpoint. The position table is cut to
/// `max_len` rows with token-type row 0 added in. Fails naming the first
/// missing tensor; extra tensors (pooler, heads) are ignored.
pub fn convert(
    tensors: HashMap<String, Tensor>,
    config: &ModelConfig,
) -> Result<HashMap<String, Tensor>> {
    config.validate()?;
    if config.norm != Norm::Post {
        return Err(Error::Bert(
            "BERT weights need a post-norm model; set `norm` to \"post\" in the config".into(),
        ));
    }
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, tensor)| (canonical(&name), tensor))
        .collect();
    let take = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Bert(format!("the checkpoint has no tensor `{name}`")))
    };

    let mut out = HashMap::new();
    for (bert, ours) in name_map(config.layers) {
        out.insert(ours, take(&bert)?);
    }
    let positions = take(POSITIONS)?;
    let available = positions.dim(0)?;
    if available < config.max_len {
        return Err(Error::Bert(format!(
            "the checkpoint has {available} positions but max_len is {}; lower max_len",
            config.max_len
        )));
    }
    let mut positions = positions.narrow(0, 0, config.max_len)?;
    if let Some(token_types) = tensors.get(TOKEN_TYPES) {
        positions = positions.broadcast_add(&token_types.narrow(0, 0, 1)?)?;
    }
    out.insert("embeddings.positions.weight".to_string(), positions);

    let tokens = &out["embeddings.tokens.weight"];
    if tokens.dims() != [config.vocab_size, config.hidden] {
        return Err(Error::Bert(format!(
            "the checkpoint's word embeddings are {:?} but the config says [{}, {}]; \
             build the config with `config_from_bert`",
            tokens.dims(),
            config.vocab_size,
            config.hidden
        )));
    }
    Ok(out)
}

/// The fields of a Hugging Face BERT `config.json` this crate needs.
#[derive(Debug, Deserialize)]
struct BertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "bert_eps")]
    layer_norm_eps: f64,
    #[serde(default = "bert_dropout")]
    hidden_dropout_prob: f32,
    #[serde(default = "bert_act")]
    hidden_act: String,
}

fn bert_eps() -> f64 {
    1e-12
}

fn bert_dropout() -> f32 {
    0.1
}

fn bert_act() -> String {
    "gelu".into()
}

/// A post-norm, mean-pooling [`ModelConfig`] matching a BERT `config.json`
/// (its text), with `num_labels` outputs and inputs cut to `max_len`.
pub fn config_from_bert(
    bert_config_json: &str,
    num_labels: usize,
    max_len: usize,
) -> Result<ModelConfig> {
    let bert: BertConfig = serde_json::from_str(bert_config_json)
        .map_err(|e| Error::Bert(format!("cannot parse the BERT config.json: {e}")))?;
    if bert.hidden_act != "gelu" {
        return Err(Error::Bert(format!(
            "the checkpoint uses activation `{}`; only BERT's exact `gelu` is supported",
            bert.hidden_act
        )));
    }
    if max_len > bert.max_position_embeddings {
        return Err(Error::Bert(format!(
            "max_len {max_len} exceeds the checkpoint's {} positions",
            bert.max_position_embeddings
        )));
    }
    let config = ModelConfig {
        vocab_size: bert.vocab_size,
        max_len,
        hidden: bert.hidden_size,
        layers: bert.num_hidden_layers,
        heads: bert.num_attention_heads,
        ff: bert.intermediate_size,
        dropout: bert.hidden_dropout_prob,
        num_labels,
        pooling: Pooling::Mean,
        norm: Norm::Post,
        norm_eps: bert.layer_norm_eps,
        output: crate::Output::Sigmoid,
        ngrams: None,
    };
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    const MINILM_CONFIG: &str = r#"{
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 384,
        "initializer_range": 0.02, "intermediate_size": 1536, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 6, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30522
    }"#;

    #[test]
    fn minilm_config_maps_to_a_post_norm_model() -> Result<()> {
        let config = config_from_bert(MINILM_CONFIG, 367, 256)?;
        assert_eq!(config.norm, Norm::Post);
        assert_eq!(
            (config.hidden, config.layers, config.heads, config.ff),
            (384, 6, 12, 1536)
        );
        assert_eq!(config.norm_eps, 1e-12);
        assert!(config_from_bert(MINILM_CONFIG, 367, 1024).is_err());
        Ok(())
    }

    #[test]
    fn converts_a_bert_checkpoint() -> Result<()> {
        let device = Device::Cpu;
        let mut config = ModelConfig::tiny(50, 3);
        config.norm = Norm::Post;
        config.layers = 1;
        config.hidden = 8;
        config.heads = 2;
        config.ff = 16;
        config.max_len = 4;
        let mut bert = HashMap::new();
        for (i, (name, _)) in name_map(config.layers).into_iter().enumerate() {
            let shape: &[usize] = if name.contains("word_embeddings") {
                &[50, 8]
            } else if name.contains("intermediate.dense.weight") {
                &[16, 8]
            } else if name.contains("intermediate.dense.bias") {
                &[16]
            } else if name.contains("output.dense.weight") && !name.contains("attention") {
                &[8, 16]
            } else if name.ends_with("weight") && !name.contains("LayerNorm") {
                &[8, 8]
            } else {
                &[8]
            };
            bert.insert(
                format!("bert.{name}").replace("LayerNorm.weight", "LayerNorm.gamma"),
                Tensor::full(i as f32, shape, &device)?,
            );
        }
        bert.insert(
            format!("bert.{POSITIONS}"),
            Tensor::ones((512, 8), DType::F32, &device)?,
        );
        bert.insert(
            format!("bert.{TOKEN_TYPES}"),
            Tensor::ones((2, 8), DType::F32, &device)?,
        );
        bert.insert(
            "bert.pooler.dense.weight".into(),
            Tensor::zeros((8, 8), DType::F32, &device)?,
        );

        let ours = convert(bert.clone(), &config)?;
        assert_eq!(ours.len(), name_map(1).len() + 1);
        let positions = &ours["embeddings.positions.weight"];
        assert_eq!(positions.dims(), [4, 8]);
        assert_eq!(positions.flatten_all()?.min(0)?.to_scalar::<f32>()?, 2.0);
        assert!(ours.contains_key("layers.0.attention_norm.weight"));

        // The converted tensors are exactly what the classifier asks for.
        let vb = candle_nn::VarBuilder::from_tensors(ours, DType::F32, &device);
        let mut without_head = config.clone();
        without_head.num_labels = 3;
        let missing_head = crate::Classifier::new(&without_head, vb);
        let message = missing_head
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("head"),
            "only the head is missing: {message}"
        );

        bert.remove(&format!("bert.{POSITIONS}"));
        assert!(convert(bert, &config).is_err());
        Ok(())
    }
}
