//! The cache: namespaced key/value entries with optional TTL, and an atomic
//! replacement of a whole namespace (the periodic refresh from the table builds
//! a namespace aside and switches to it, so readers never see it half-built).
//!
//! Production uses Redis; the embedded default lives in the process.

pub mod embedded;
#[cfg(feature = "redis")]
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use embedded::EmbeddedCache;

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The namespace or key is not usable.
    #[error("invalid cache {what} `{value}`: {reason}")]
    Invalid {
        /// "namespace" or "key".
        what: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// The cache server could not be reached or failed.
    #[error("cache backend error: {0}")]
    Backend(String),
    /// The backend was configured but this build lacks its feature.
    #[error("cache backend `{backend}` is not available in this build: rebuild sift with `--features {feature}`")]
    FeatureDisabled {
        /// Configured backend.
        backend: &'static str,
        /// Cargo feature that provides it.
        feature: &'static str,
    },
}

/// A cache backend.
#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// The value under `key` in `namespace`, unless missing or expired.
    async fn get(&self, namespace: &str, key: &str) -> Result<Option<Bytes>, CacheError>;
    /// Values of several keys, in the order asked.
    async fn mget(
        &self,
        namespace: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Bytes>>, CacheError>;
    /// Stores a value, expiring after `ttl` if given.
    async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError>;
    /// Removes a key; returns whether it was present.
    async fn delete(&self, namespace: &str, key: &str) -> Result<bool, CacheError>;
    /// Replaces every entry of `namespace` with `entries` in one step: a reader
    /// sees either the old namespace whole or the new one whole.
    async fn replace_namespace(
        &self,
        namespace: &str,
        entries: Vec<(String, Bytes)>,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError>;
    /// Number of live entries in a namespace (approximate while entries expire).
    async fn len(&self, namespace: &str) -> Result<u64, CacheError>;
}
