//! The classifier's shape, saved as `config.json` next to `model.safetensors`.

use serde::{Deserialize, Serialize};

/// What is wrong with a [`ModelConfig`], found before any tensor is built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size that must be positive is zero.
    #[error("model config: `{field}` is 0; it must be at least 1")]
    Zero {
        /// The config field.
        field: &'static str,
    },
    /// Attention heads must split the hidden size evenly.
    #[error(
        "model config: `hidden` ({hidden}) is not divisible by `heads` ({heads}); \
         pick a head count that divides the hidden size"
    )]
    HeadsDoNotDivideHidden {
        /// The hidden size.
        hidden: usize,
        /// The number of attention heads.
        heads: usize,
    },
    /// Dropout is a probability below one.
    #[error("model config: `dropout` is {0}; it must be in [0, 1)")]
    Dropout(f32),
    /// Layer-norm epsilon keeps the division finite.
    #[error("model config: `norm_eps` is {0}; it must be a positive finite number")]
    NormEps(f64),
    /// `config.json` is not valid JSON for this struct.
    #[error("model config: cannot parse JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// How the encoder's token states become one vector per document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over real (unmasked) tokens: robust without a trained CLS token.
    #[default]
    Mean,
    /// The first token's state; the tokenizer must put a `[CLS]` token there.
    Cls,
}

/// Where layer norm sits in each encoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// Norm before attention / feed-forward, plus a final norm: trains stably
    /// from scratch, so it is the default.
    #[default]
    Pre,
    /// Norm after each residual sum, plus a norm on the embeddings and no
    /// final norm: the BERT layout, needed to start from BERT/MiniLM weights.
    Post,
}

/// How logits become per-label scores, which is also the loss trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Independent sigmoids, trained with binary cross-entropy per label:
    /// each score is that label's own probability.
    #[default]
    Sigmoid,
    /// One softmax over all labels, trained with cross-entropy against the
    /// normalised multi-hot target: scores sum to 1 across labels.
    Softmax,
}

/// The fastText-style branch: a bag of hashed word uni/bi-gram buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NgramConfig {
    /// Number of hash buckets (rows of the n-gram embedding table).
    pub buckets: usize,
    /// Width of each bucket's embedding; concatenated to the pooled encoder
    /// output before the head.
    pub dim: usize,
}

/// The classifier's hyper-parameters; everything needed to rebuild the
/// modules before loading weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Token vocabulary size (rows of the token embedding table).
    pub vocab_size: usize,
    /// Longest input in tokens (rows of the position embedding table).
    pub max_len: usize,
    /// Width of the encoder's hidden states.
    pub hidden: usize,
    /// Number of encoder layers.
    pub layers: usize,
    /// Attention heads per layer; must divide `hidden`.
    pub heads: usize,
    /// Width of the feed-forward (intermediate) layer.
    pub ff: usize,
    /// Dropout probability, applied only when training.
    pub dropout: f32,
    /// Number of labels; the head emits one logit per label (multi-label).
    pub num_labels: usize,
    /// How token states are pooled into a document vector.
    #[serde(default)]
    pub pooling: Pooling,
    /// Pre-norm (default) or post-norm (BERT) layers.
    #[serde(default)]
    pub norm: Norm,
    /// Layer-norm epsilon (BERT uses 1e-12).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// How logits become scores (and the loss the model was trained with).
    #[serde(default)]
    pub output: Output,
    /// Optional hashed n-gram branch; absent means the encoder alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ngrams: Option<NgramConfig>,
}

fn default_norm_eps() -> f64 {
    1e-5
}

impl ModelConfig {
    /// A small model for tests and CPU training: 2 layers × 128, 4 heads.
    pub fn tiny(vocab_size: usize, num_labels: usize) -> Self {
        Self {
            vocab_size,
            max_len: 128,
            hidden: 128,
            layers: 2,
            heads: 4,
            ff: 512,
            dropout: 0.1,
            num_labels,
            pooling: Pooling::Mean,
            norm: Norm::Pre,
            norm_eps: default_norm_eps(),
            output: Output::Sigmoid,
            ngrams: None,
        }
    }

    /// The production size: 6 layers × 384, 6 heads, MiniLM-L6's shape.
    pub fn base(vocab_size: usize, num_labels: usize) -> Self {
        Self {
            max_len: 256,
            hidden: 384,
            layers: 6,
            heads: 6,
            ff: 1536,
            ..Self::tiny(vocab_size, num_labels)
        }
    }

    /// Adds the hashed n-gram branch.
    pub fn with_ngrams(mut self, buckets: usize, dim: usize) -> Self {
        self.ngrams = Some(NgramConfig { buckets, dim });
        self
    }

    /// Width of the vector the head sees: pooled encoder output plus the
    /// n-gram branch, if any.
    pub fn head_input(&self) -> usize {
        self.hidden + self.ngrams.map_or(0, |n| n.dim)
    }

    /// Checks the sizes fit together, so a bad `config.json` fails with a
    /// sentence instead of a shape error deep in a forward pass.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("max_len", self.max_len),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("ff", self.ff),
            ("num_labels", self.num_labels),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if let Some(ngrams) = self.ngrams {
            if ngrams.buckets == 0 {
                return Err(ConfigError::Zero {
                    field: "ngrams.buckets",
                });
            }
            if ngrams.dim == 0 {
                return Err(ConfigError::Zero {
                    field: "ngrams.dim",
                });
            }
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(ConfigError::HeadsDoNotDivideHidden {
                hidden: self.hidden,
                heads: self.heads,
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError::Dropout(self.dropout));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(ConfigError::NormEps(self.norm_eps));
        }
        Ok(())
    }

    /// Parses and validates `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Pretty JSON for `config.json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a struct of numbers and enums always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_round_trip() -> Result<(), ConfigError> {
        for config in [
            ModelConfig::tiny(1000, 10),
            ModelConfig::base(30522, 367).with_ngrams(1 << 18, 64),
        ] {
            config.validate()?;
            assert_eq!(ModelConfig::from_json(&config.to_json())?, config);
        }
        Ok(())
    }

    #[test]
    fn defaults_fill_optional_fields() -> Result<(), ConfigError> {
        let config = ModelConfig::from_json(
            r#"{"vocab_size": 10, "max_len": 8, "hidden": 8, "layers": 1, "heads": 2,
                "ff": 16, "dropout": 0.0, "num_labels": 3}"#,
        )?;
        assert_eq!(config.pooling, Pooling::Mean);
        assert_eq!(config.norm, Norm::Pre);
        assert_eq!(config.ngrams, None);
        Ok(())
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let mut config = ModelConfig::tiny(100, 5);
        config.heads = 3;
        let message = config.validate().err().map(|e| e.to_string());
        assert!(message.is_some_and(|m| m.contains("not divisible by `heads`")));

        let mut config = ModelConfig::tiny(100, 5);
        config.num_labels = 0;
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Zero {
                field: "num_labels"
            })
        ));

        let mut config = ModelConfig::tiny(100, 5);
        config.dropout = 1.0;
        assert!(matches!(config.validate(), Err(ConfigError::Dropout(_))));

        let unknown = ModelConfig::from_json(
            r#"{"vocab_size": 10, "max_len": 8, "hidden": 8, "layers": 1, "heads": 2,
                "ff": 16, "dropout": 0.0, "num_labels": 3, "hiden": 4}"#,
        );
        assert!(matches!(unknown, Err(ConfigError::Json(_))));
    }
}
