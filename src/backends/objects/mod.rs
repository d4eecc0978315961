//! The object store: the raw archive, claim-checked document bodies and model
//! artifacts. Keys are `/`-separated paths; every write is atomic (a reader
//! sees the old object or the new one, never a part), and conditional puts on
//! an ETag make compare-and-swap possible, which is how a model's `LATEST`
//! pointer moves safely.
//!
//! Production uses S3; the embedded default is a directory.

pub mod embedded;
#[cfg(feature = "s3")]
pub mod s3;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use tokio::io::AsyncRead;

pub use embedded::EmbeddedObjects;

/// Errors of the object store.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// No object under the key.
    #[error("no object at `{0}`")]
    NotFound(String),
    /// A conditional put found the object not in the expected state.
    #[error("object `{key}` changed concurrently ({detail}); read it again and retry")]
    PreconditionFailed {
        /// Key.
        key: String,
        /// What the condition was.
        detail: String,
    },
    /// The key is not usable.
    #[error("invalid object key `{key}`: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// A file operation failed.
    #[error("object store I/O at {path}: {source}")]
    Io {
        /// File involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The object server failed or could not be reached.
    #[error("object store error: {0}")]
    Backend(String),
    /// The backend was configured but this build lacks its feature.
    #[error("object store `{backend}` is not available in this build: rebuild sift with `--features {feature}`")]
    FeatureDisabled {
        /// Configured backend.
        backend: &'static str,
        /// Cargo feature that provides it.
        feature: &'static str,
    },
}

/// What a put requires of the current object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PutMode {
    /// Write whatever is there.
    #[default]
    Overwrite,
    /// Write only if no object exists (S3 `If-None-Match: *`).
    IfAbsent,
    /// Write only if the current object has this ETag (S3 `If-Match`).
    IfMatch(String),
}

/// An object's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectMeta {
    /// Key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Opaque version tag; changes on every write.
    pub etag: String,
    /// Last write, milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

/// A streamed object body.
pub type ObjectReader = Box<dyn AsyncRead + Send + Unpin>;

/// An object store backend.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Writes a whole body held in memory.
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<ObjectMeta, ObjectError>;
    /// Writes a body read from a stream, without holding it in memory.
    async fn put_stream(
        &self,
        key: &str,
        body: ObjectReader,
        mode: PutMode,
    ) -> Result<ObjectMeta, ObjectError>;
    /// Reads a whole object.
    async fn get(&self, key: &str) -> Result<(ObjectMeta, Bytes), ObjectError>;
    /// Opens an object for streaming.
    async fn get_stream(&self, key: &str) -> Result<(ObjectMeta, ObjectReader), ObjectError>;
    /// Metadata of an object, or None.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError>;
    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError>;
    /// Deletes an object; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;
}

/// Checks a key: non-empty, at most 1024 bytes, relative, no empty, `.` or `..` segments.
pub fn validate_key(key: &str) -> Result<(), ObjectError> {
    let bad = |reason| {
        Err(ObjectError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() || key.len() > 1024 {
        return bad("keys are 1 to 1024 bytes");
    }
    if key.starts_with('/') || key.ends_with('/') {
        return bad("keys neither start nor end with `/`");
    }
    if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == ".." || s.starts_with(".sift"))
    {
        return bad("segments may not be empty, `.`, `..` or start with `.sift`");
    }
    if key.contains('\0') {
        return bad("keys may not contain NUL");
    }
    Ok(())
}
