//! Training of sift's category classifier: data, the training loop,
//! evaluation and the trained model's files.
//!
//! - [`Dataset`]: JSON lines `{id, title, text, source, tags[]}` and the
//!   deterministic [`SplitPlan`] by a hash of the source (training, tuning,
//!   validation) and of the id (seen-source), so whole sources are held out
//!   and a document never moves between parts when data is added.
//! - [`LinearModel`]: TF-IDF (1,2)-grams + one-vs-rest linear SVM, the
//!   anchor trained in the same run and the shipped model's linear half,
//!   which [`ensemble`] combines with the transformer (optionally reading
//!   character grams too).
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
pub use history::{
    BaselineRecord, EnsembleRecord, EpochRecord, Figures, LinearHalfRecord, ModelMetrics,
    StepRecord,
};
pub use labels::{Labels, LabelsError};
pub use linear::{LinearModel, LinearOptions};
pub use metrics::{Metric, Metrics};
pub use ngrams::NgramHasher;
pub use predict::{Arithmetic, Encoded, PredictError, Prediction, Predictor, Scored};
pub use report::render_report;
pub use tokenizer::{TextTokenizer, TokenizerError, CLS, PAD, SEP, UNK};
pub use train::{
    device_name, drops_fields, evaluate, files, fingerprint, learning_rate_at, merge_feedback,
    planned_epochs, train, Preset, Pretrained, TrainError, TrainOptions, Trained, MIN_EPOCHS,
};

/// Most bytes of a document's text the model reads: far more than any
/// preset's `max_len` tokens cover, and a bound on tokenizing and hashing
/// time for a 100,000-word document. Cut at a character boundary.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// What a document says about itself besides its words. Both models read
/// them: on Debian descriptions of sources never seen in training, the
/// archive section and the package name lift the linear model from P@1
/// 0.868 / hit@5 0.958 / recall@5 0.781 to 0.921 / 0.977 / 0.811 (the
/// README's training section).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fields<'a> {
    /// The section the site filed the page under: a Debian archive section
    /// (`libs`, `python`, `non-free/games`), a news site's `article:section`.
    pub section: &'a str,
    /// The page's name: a Debian package name, a URL's last path segment
    /// (`libmumps-5.5`, `how-to-tune-postgres`).
    pub name: &'a str,
}

impl Fields<'_> {
    /// Whether there is nothing to say.
    pub fn is_empty(&self) -> bool {
        self.section.trim().is_empty() && self.name.trim().is_empty()
    }
}

/// The text both models read: a `section …` line and a `page …` line for the
/// fields that are known, then the title, a newline and the body. Training,
/// `sift infer` and every benchmark build it here, so what a model learned
/// from is what it is shown.
pub fn model_input(title: &str, text: &str, fields: &Fields<'_>) -> String {
    let mut out = String::with_capacity(title.len() + text.len() + 64);
    for (key, value) in [("section", fields.section), ("page", fields.name)] {
        let value = value.trim();
        if !value.is_empty() {
            out.push_str(key);
            out.push(' ');
            out.push_str(value);
            out.push('\n');
        }
    }
    out.push_str(title);
    out.push('\n');
    out.push_str(text);
    out
}

/// A page's name from its URL: the last non-empty path segment, without its
/// query, fragment or file extension, percent-decoded
/// (`https://x/packages/vim-gtk3.html` → `vim-gtk3`, `…/libstdc%2B%2B6.html`
/// → `libstdc++6`; a version such as `libfoo-1.2` keeps its `.2`). Empty for
/// a site's root.
pub fn page_name(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let path = match url.find("://") {
        Some(scheme) => url[scheme + 3..]
            .find('/')
            .map_or("", |p| &url[scheme + 3 + p..]),
        None => url,
    };
    let last = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or_default();
    let stem = match last.rsplit_once('.') {
        Some((stem, ext))
            if !stem.is_empty()
                && (1..=5).contains(&ext.len())
                && ext.chars().all(|c| c.is_ascii_alphabetic()) =>
        {
            stem
        }
        _ => last,
    };
    percent_decode(stem)
}

/// `%XX` escapes to their bytes (read as UTF-8, lossily); a `%` not
/// followed by two hex digits stays as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

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
