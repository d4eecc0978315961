//! sift: ingests documents from hundreds of websites, cleans them, classifies
//! each into its most likely categories, stores the results for analysts to
//! review, and links social-media profiles to people in a consumer database.
//!
//! Every storage role is a trait in [`backends`] with an embedded default, so
//! the whole pipeline runs on one machine with no services; production points
//! the same code at Kafka, S3, HBase, Elasticsearch and Redis.

pub mod archive;
pub mod backends;
pub mod bench;
pub mod categories;
pub mod classify;
pub mod clean;
pub mod config;
pub mod daemon;
pub mod dbusa;
pub mod device;
pub mod dlq;
pub mod documents;
pub mod envelope;
pub mod error;
pub mod infer;
pub mod ingest;
pub mod logcmd;
pub mod matching;
pub mod metrics;
pub mod review;
pub mod run;
pub mod sample;
pub mod stage;
pub mod telemetry;
pub mod train;

pub use error::{Error, Result};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
