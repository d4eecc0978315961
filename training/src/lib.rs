//! Training of sift's category classifier: data, the training loop,
//! evaluation and the trained model's files.
//!
//! - [`Dataset`]: JSON lines `{id, title, text, source, tags[]}` and the
//!   deterministic [`SplitPlan`] by a hash of the source (training, tuning,
//!   validation) and of the id (seen-source), so whole sources are held out
//!   and a document never moves between parts when data is added.
//! - [`LinearModel`]: TF-IDF (1,2)-grams + one-vs-rest linear SVM, the
//!   anchor trained in the same run; [`ensemble`] combines it with the
//!   transformer.
//! - [`Labels`]: the label list saved as `labels.json`; its order is the
//!   order of the model's outputs.
//! - [`TextTokenizer`]: a WordPiece tokenizer trained on the corpus (or
//!   loaded from `tokenizer.json`) that truncates instead of failing.
//! - [`NgramHasher`]: hashed word uni/bigrams for the model's n-gram branch.
//! - [`plan_batches`] and [`Batch`]: length-bucketed, dynamically padded
//!   batches under a token and a document budget, in a seeded order.
//! - [`train()`]: AdamW with warmup and cosine decay, gradient clipping,
//!   validation after each epoch, early stopping, the best epoch's weights
//!   kept; writes [`files::ALL`] (weights, config, tokenizer, labels,
//!   `metrics.json`, `report.html`) to a directory.
//! - [`metrics`]: P@1, hit@5, recall@5 and per-label figures.
//! - [`Predictor`]: a trained model directory loaded for scoring; the top 5
//!   labels of any text.

mod batch;
mod dataset;
pub mod ensemble;
mod history;
mod labels;
pub mod linear;
pub mod metrics;
mod ngrams;
mod predict;
mod report;
mod sparse;
mod tokenizer;
mod train;
mod vocab;

pub use batch::{plan_batches, Batch, BatchLimits, Example};
pub use dataset::{is_validation, DataError, Dataset, Document, Part, SplitPlan};
pub use ensemble::Ensemble;
pub use history::{BaselineRecord, EnsembleRecord, EpochRecord, Figures, ModelMetrics, StepRecord};
pub use labels::{Labels, LabelsError};
pub use linear::{LinearModel, LinearOptions};
pub use metrics::{Metric, Metrics};
pub use ngrams::NgramHasher;
pub use predict::{Encoded, PredictError, Prediction, Predictor, Scored};
pub use report::render_report;
pub use tokenizer::{TextTokenizer, TokenizerError, CLS, PAD, SEP, UNK};
pub use train::{
    device_name, evaluate, files, fingerprint, learning_rate_at, merge_feedback, train, Preset,
    Pretrained, TrainError, TrainOptions, Trained,
};

/// Most bytes of a document's text the model reads: far more than any
/// preset's `max_len` tokens cover, and a bound on tokenizing and hashing
/// time for a 100,000-word document. Cut at a character boundary.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// The part of `text` the tokenizer and the n-gram hasher see.
pub fn model_text(text: &str) -> &str {
    if text.len() <= MAX_TEXT_BYTES {
        return text;
    }
    let mut end = MAX_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What can go wrong preparing training data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the dataset failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Building, reading or writing the label list failed.
    #[error(transparent)]
    Labels(#[from] LabelsError),
    /// Training, reading, writing or running the tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
