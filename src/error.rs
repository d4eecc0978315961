//! The crate-wide error: every module has its own `thiserror` enum, folded in here
//! so callers that do not care which part failed can use `?` everywhere.

use crate::backends::{
    cache::CacheError, log::LogError, objects::ObjectError, search::SearchError, table::TableError,
};
use crate::config::ConfigError;

/// Any error sift's library code returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration could not be loaded or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log (topics) backend failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The object store failed.
    #[error(transparent)]
    Objects(#[from] ObjectError),
    /// The wide-column table failed.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The search index failed.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A stage's own error that callers pass on whole (`sift ingest`
    /// could not start, the enrichment API failed): the stage converts it
    /// with `From`, so this floor names no stage.
    #[error(transparent)]
    Stage(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A file or socket operation outside any backend failed.
    #[error("{context}: {source}")]
    Io {
        /// What sift was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Input that sift could not understand.
    #[error("{0}")]
    Invalid(String),
    /// A one-pass run (`--once`) gave up after failing the same step too
    /// many times in a row; a daemon would have kept retrying.
    #[error("gave up: {0}")]
    GaveUp(String),
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what sift was doing when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
