//! The embedded cache: one bounded `moka` cache per namespace, in the process.
//!
//! A namespace is an `Arc` to its cache; replacing a namespace builds a new
//! cache aside and swaps the `Arc` under the write lock, and every read takes
//! the `Arc` once, so a reader (a whole `mget` included) sees one generation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::sync::Cache as Moka;
use moka::Expiry;
use parking_lot::RwLock;

use super::{Cache, CacheError};

/// Longest accepted namespace, in characters.
const MAX_NAMESPACE_CHARS: usize = 100;
/// Longest accepted key, in bytes.
const MAX_KEY_BYTES: usize = 1024;

/// A cache kept in process memory, bounded per namespace.
///
/// Cloning is cheap and clones share the entries.
#[derive(Clone)]
pub struct EmbeddedCache {
    max_entries_per_namespace: u64,
    namespaces: Arc<RwLock<HashMap<String, Namespace>>>,
}

/// The entries of one namespace.
type Namespace = Arc<Moka<String, Entry>>;

impl std::fmt::Debug for EmbeddedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedCache")
            .field("max_entries_per_namespace", &self.max_entries_per_namespace)
            .field("namespaces", &self.namespaces.read().len())
            .finish()
    }
}

/// A stored value with the lifetime it was given.
#[derive(Clone)]
struct Entry {
    value: Bytes,
    /// Lifetime from the write, used by moka to schedule eviction.
    ttl: Option<Duration>,
    /// When the entry stops being visible; checked where moka may still hand
    /// back an entry that has expired but is not yet evicted.
    expires_at: Option<Instant>,
}

impl Entry {
    fn new(value: Bytes, ttl: Option<Duration>) -> Self {
        Self {
            value,
            ttl,
            expires_at: ttl.and_then(|ttl| Instant::now().checked_add(ttl)),
        }
    }

    fn is_live(&self) -> bool {
        self.expires_at.is_none_or(|at| Instant::now() < at)
    }
}

/// Each entry expires after its own TTL, counted from its last write.
struct PerEntryTtl;

impl Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _at: Instant) -> Option<Duration> {
        entry.ttl
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Entry,
        _at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        // A write replaces the lifetime too: a value set without TTL never
        // expires, even if the one it replaced had a TTL (as Redis `SET` does).
        entry.ttl
    }
}

impl EmbeddedCache {
    /// An empty cache keeping at most `max_entries_per_namespace` entries in each
    /// namespace; beyond that the least useful entries are evicted.
    pub fn new(max_entries_per_namespace: u64) -> Self {
        Self {
            max_entries_per_namespace,
            namespaces: Arc::new(RwLock::new(HashMap::new())),
        }
    }

    fn new_namespace(&self) -> Namespace {
        Arc::new(
            Moka::builder()
                .max_capacity(self.max_entries_per_namespace)
                .expire_after(PerEntryTtl)
                .build(),
        )
    }

    /// The namespace's current cache, if it has one.
    fn namespace(&self, namespace: &str) -> Result<Option<Namespace>, CacheError> {
        validate_namespace(namespace)?;
        Ok(self.namespaces.read().get(namespace).cloned())
    }

    /// The namespace's current cache, creating an empty one if needed.
    fn namespace_for_write(&self, namespace: &str) -> Result<Namespace, CacheError> {
        if let Some(existing) = self.namespace(namespace)? {
            return Ok(existing);
        }
        let mut namespaces = self.namespaces.write();
        let cache = namespaces
            .entry(namespace.to_owned())
            .or_insert_with(|| self.new_namespace());
        Ok(Arc::clone(cache))
    }
}

#[async_trait]
impl Cache for EmbeddedCache {
    async fn get(&self, namespace: &str, key: &str) -> Result<Option<Bytes>, CacheError> {
        validate_key(key)?;
        let Some(cache) = self.namespace(namespace)? else {
            return Ok(None);
        };
        Ok(cache
            .get(key)
            .filter(Entry::is_live)
            .map(|entry| entry.value))
    }

    async fn mget(
        &self,
        namespace: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Bytes>>, CacheError> {
        keys.iter().try_for_each(|key| validate_key(key))?;
        // One namespace generation for the whole call.
        let Some(cache) = self.namespace(namespace)? else {
            return Ok(vec![None; keys.len()]);
        };
        Ok(keys
            .iter()
            .map(|key| {
                cache
                    .get(key.as_str())
                    .filter(Entry::is_live)
                    .map(|entry| entry.value)
            })
            .collect())
    }

    async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        validate_key(key)?;
        let cache = self.namespace_for_write(namespace)?;
        cache.insert(key.to_owned(), Entry::new(value, ttl));
        Ok(())
    }

    async fn delete(&self, namespace: &str, key: &str) -> Result<bool, CacheError> {
        validate_key(key)?;
        let Some(cache) = self.namespace(namespace)? else {
            return Ok(false);
        };
        Ok(cache.remove(key).is_some_and(|entry| entry.is_live()))
    }

    async fn replace_namespace(
        &self,
        namespace: &str,
        entries: Vec<(String, Bytes)>,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        validate_namespace(namespace)?;
        entries.iter().try_for_each(|(key, _)| validate_key(key))?;
        // Built aside, where no reader can see it half-filled.
        let fresh = self.new_namespace();
        for (key, value) in entries {
            fresh.insert(key, Entry::new(value, ttl));
        }
        let previous = self.namespaces.write().insert(namespace.to_owned(), fresh);
        // Readers still holding the old generation keep it alive until they finish.
        drop(previous);
        Ok(())
    }

    async fn len(&self, namespace: &str) -> Result<u64, CacheError> {
        let Some(cache) = self.namespace(namespace)? else {
            return Ok(0);
        };
        cache.run_pending_tasks();
        Ok(cache.entry_count())
    }
}

pub(super) fn validate_namespace(namespace: &str) -> Result<(), CacheError> {
    let invalid = |reason| CacheError::Invalid {
        what: "namespace",
        value: namespace.to_owned(),
        reason,
    };
    if namespace.is_empty() {
        return Err(invalid(
            "it is empty; use 1-100 characters of A-Z, a-z, 0-9, `.`, `_` and `-`",
        ));
    }
    if namespace.len() > MAX_NAMESPACE_CHARS {
        return Err(invalid("it is longer than 100 characters"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if !namespace.bytes().all(allowed) {
        return Err(invalid("use only A-Z, a-z, 0-9, `.`, `_` and `-`"));
    }
    Ok(())
}

pub(super) fn validate_key(key: &str) -> Result<(), CacheError> {
    let invalid = |reason| CacheError::Invalid {
        what: "key",
        value: key.chars().take(64).collect(),
        reason,
    };
    if key.is_empty() {
        return Err(invalid("it is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid("it is longer than 1024 bytes"));
    }
    Ok(())
}
