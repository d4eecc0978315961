//! Training of sift's category classifier. This part is the data side:
//!
//! - [`Dataset`]: JSON lines `{id, title, text, tags[]}` and the
//!   deterministic train/validation [`split`](Dataset::split) by a hash of
//!   the id, so a document never moves between splits when data is added.
//! - [`Labels`]: the label list saved as `labels.json`; its order is the
//!   order of the model's outputs.
//! - [`TextTokenizer`]: a WordPiece tokenizer trained on the corpus (or
//!   loaded from `tokenizer.json`) that truncates instead of failing.
//! - [`NgramHasher`]: hashed word uni/bigrams for the model's n-gram branch.
//! - [`plan_batches`] and [`Batch`]: length-bucketed, dynamically padded
//!   batches under a token and a document budget, in a seeded order.

mod batch;
mod dataset;
mod labels;
mod ngrams;
mod tokenizer;

pub use batch::{plan_batches, Batch, BatchLimits, Example};
pub use dataset::{is_validation, DataError, Dataset, Document};
pub use labels::{Labels, LabelsError};
pub use ngrams::NgramHasher;
pub use tokenizer::{TextTokenizer, TokenizerError, CLS, PAD, SEP, UNK};

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
