//! The object store: the raw archive, claim-checked document bodies and model
//! artifacts. Keys are `/`-separated paths; every write is atomic (a reader
//! sees the old object or the new one, never a part), and conditional puts on
//! an ETag make compare-and-swap possible, which is how a model's `LATEST`
//! pointer moves safely.
//!
//! A put may also ask the store to encrypt the object at rest
//! ([`PutOptions::encryption`], S3's SSE-S3 and SSE-KMS). A store that cannot
//! encrypt refuses such a put with [`ObjectError::Unsupported`] rather than
//! writing the object in the clear, and says so up front through
//! [`ObjectStore::supports_encryption`], so a daemon can fail at startup.
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
    /// A put asked for something this store cannot do (encryption at rest on
    /// the embedded store); nothing was written.
    #[error("cannot write `{key}`: {reason}")]
    Unsupported {
        /// Key.
        key: String,
        /// What was asked and what to do instead.
        reason: String,
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

/// Server-side encryption of an object at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Encryption {
    /// Keys held by the store itself (S3's SSE-S3, `AES256`).
    SseS3,
    /// Keys held in a key management service (S3's SSE-KMS, `aws:kms`).
    SseKms {
        /// KMS key id or ARN; None = the account's default key for the store
        /// (`aws/s3`). Stores report it where they know it.
        key_id: Option<String>,
    },
}

impl std::fmt::Display for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Encryption::SseS3 => f.write_str("SSE-S3 (AES256)"),
            Encryption::SseKms { key_id: None } => f.write_str("SSE-KMS (default key)"),
            Encryption::SseKms { key_id: Some(k) } => write!(f, "SSE-KMS (key {k})"),
        }
    }
}

/// How a put stores an object, beyond its body and write condition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Encrypt the object at rest. A store that cannot refuses the put
    /// ([`ObjectError::Unsupported`]) instead of storing it unencrypted.
    pub encryption: Option<Encryption>,
}

impl PutOptions {
    /// Options that ask for nothing beyond a plain put.
    pub fn is_plain(&self) -> bool {
        self.encryption.is_none()
    }
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
    /// How the store says the object is encrypted at rest, where it says so
    /// (S3 on put, get and head; not in listings). None from stores that do
    /// not encrypt. S3 encrypts every new object with SSE-S3 unless told
    /// otherwise, so plain puts there report SSE-S3 too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
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

    /// Whether this store can honour [`PutOptions::encryption`]. Callers that
    /// are configured to encrypt check it at startup, so a misconfiguration
    /// stops a daemon before it consumes anything.
    fn supports_encryption(&self) -> bool {
        false
    }

    /// [`put`](Self::put) with options. The default serves plain options and
    /// refuses any it cannot honour; stores that can encrypt override it.
    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        mode: PutMode,
        options: &PutOptions,
    ) -> Result<ObjectMeta, ObjectError> {
        refuse_unsupported(key, options)?;
        self.put(key, body, mode).await
    }

    /// [`put_stream`](Self::put_stream) with options; see [`put_with`](Self::put_with).
    async fn put_stream_with(
        &self,
        key: &str,
        body: ObjectReader,
        mode: PutMode,
        options: &PutOptions,
    ) -> Result<ObjectMeta, ObjectError> {
        refuse_unsupported(key, options)?;
        self.put_stream(key, body, mode).await
    }
}

/// The error of a store without encryption at rest asked for it.
fn refuse_unsupported(key: &str, options: &PutOptions) -> Result<(), ObjectError> {
    match &options.encryption {
        None => Ok(()),
        Some(e) => Err(ObjectError::Unsupported {
            key: key.to_string(),
            reason: format!(
                "{e} was asked for, but this object store cannot encrypt objects at rest; \
                 use the S3 object store, or do not ask for encryption"
            ),
        }),
    }
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
