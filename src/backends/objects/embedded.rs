//! The embedded object store: one file per object under a root directory.
//! Writes go to a temporary file that is synced and then renamed over the
//! key's path, so they are atomic and durable when put returns. Conditional
//! puts check and rename under a lock file, so they are safe across processes.
//! The ETag is derived from the file's inode, size and modification time,
//! which change with every rename.
//!
//! It cannot encrypt at rest: puts that ask for encryption are refused (the
//! trait's default `put_with`), never written in the clear.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{validate_key, ObjectError, ObjectMeta, ObjectReader, PutMode};

const TMP_DIR: &str = ".sift-tmp";
const LOCK_FILE: &str = ".sift-lock";

/// The embedded object store.
#[derive(Clone)]
pub struct EmbeddedObjects {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    seq: AtomicU64,
}

fn io(path: &Path, source: std::io::Error) -> ObjectError {
    ObjectError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn meta_of(key: &str, m: &std::fs::Metadata) -> ObjectMeta {
    let modified_ms = m.mtime() * 1000 + m.mtime_nsec() / 1_000_000;
    ObjectMeta {
        key: key.to_string(),
        size: m.len(),
        etag: format!(
            "\"{:x}-{:x}-{:x}{:08x}\"",
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ),
        modified_ms,
        encryption: None,
    }
}

impl EmbeddedObjects {
    /// Opens (or creates) the store rooted at `root`.
    pub fn open(root: &Path) -> Result<Self, ObjectError> {
        let tmp = root.join(TMP_DIR);
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        // Temporary files left by a crash are never referenced: remove them.
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(EmbeddedObjects {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                seq: AtomicU64::new(0),
            }),
        })
    }
}

impl Inner {
    fn path_of(&self, key: &str) -> Result<PathBuf, ObjectError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(TMP_DIR)
            .join(format!("{}-{n}", std::process::id()))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        let path = self.path_of(key)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(meta_of(key, &m))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.raw_os_error() == Some(20) => Ok(None), // ENOTDIR: a prefix is a file
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Moves a finished temporary file into place, checking `mode` atomically.
    fn commit(&self, key: &str, tmp: &Path, mode: &PutMode) -> Result<ObjectMeta, ObjectError> {
        let path = self.path_of(key)?;
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
        let lock = if *mode == PutMode::Overwrite {
            None
        } else {
            let lock_path = self.root.join(LOCK_FILE);
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| io(&lock_path, e))?;
            f.lock().map_err(|e| io(&lock_path, e))?;
            Some(f)
        };
        let current = self.head(key)?;
        let fail = |detail: String| {
            let _ = std::fs::remove_file(tmp);
            Err(ObjectError::PreconditionFailed {
                key: key.to_string(),
                detail,
            })
        };
        match (mode, &current) {
            (PutMode::IfAbsent, Some(m)) => {
                return fail(format!("it exists with ETag {}", m.etag));
            }
            (PutMode::IfMatch(want), None) => {
                return fail(format!("it does not exist; expected ETag {want}"));
            }
            (PutMode::IfMatch(want), Some(m)) if m.etag != *want => {
                return fail(format!("its ETag is {}, expected {want}", m.etag));
            }
            _ => {}
        }
        std::fs::rename(tmp, &path).map_err(|e| io(&path, e))?;
        File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&parent, e))?;
        drop(lock);
        let m = std::fs::metadata(&path).map_err(|e| io(&path, e))?;
        crate::metrics::global()
            .objects_written_bytes
            .inc_by(m.len());
        Ok(meta_of(key, &m))
    }

    fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let path = self.path_of(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path, e)),
        }
        // Remove directories the delete left empty, up to the root.
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == self.root || std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        // Walk only the deepest directory the prefix names in full.
        let start_rel = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        if !start_rel.is_empty() {
            validate_key(start_rel)?;
        }
        let start = self.root.join(start_rel);
        let mut out = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(20) =>
                {
                    continue
                }
                Err(e) => return Err(io(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io(&dir, e))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".sift") {
                    continue;
                }
                let path = entry.path();
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().into_owned();
                let ft = entry.file_type().map_err(|e| io(&path, e))?;
                if ft.is_dir() {
                    let as_prefix = format!("{key}/");
                    if as_prefix.starts_with(prefix) || prefix.starts_with(&as_prefix) {
                        stack.push(path);
                    }
                } else if ft.is_file() && key.starts_with(prefix) {
                    match entry.metadata() {
                        Ok(m) => out.push(meta_of(&key, &m)),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io(&path, e)),
                    }
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ObjectError> + Send + 'static,
) -> Result<T, ObjectError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ObjectError::Backend(format!("object store worker failed: {e}")))?
}

#[async_trait]
impl super::ObjectStore for EmbeddedObjects {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<ObjectMeta, ObjectError> {
        validate_key(key)?;
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || {
            let tmp = inner.tmp_path();
            let write = || -> std::io::Result<()> {
                let f = File::create(&tmp)?;
                std::os::unix::fs::FileExt::write_all_at(&f, &body, 0)?;
                f.sync_all()
            };
            if let Err(e) = write() {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(&tmp, e));
            }
            inner.commit(&key, &tmp, &mode)
        })
        .await
    }

    async fn put_stream(
        &self,
        key: &str,
        mut body: ObjectReader,
        mode: PutMode,
    ) -> Result<ObjectMeta, ObjectError> {
        validate_key(key)?;
        let tmp = self.inner.tmp_path();
        let written = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            tokio::io::copy(&mut body, &mut f).await?;
            f.flush().await?;
            f.sync_all().await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io(&tmp, e));
        }
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || inner.commit(&key, &tmp, &mode)).await
    }

    async fn get(&self, key: &str) -> Result<(ObjectMeta, Bytes), ObjectError> {
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || {
            let path = inner.path_of(&key)?;
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ObjectError::NotFound(key))
                }
                Err(e) => return Err(io(&path, e)),
            };
            // Metadata and content from the same open file, so they match even
            // if the key is replaced meanwhile.
            let m = f.metadata().map_err(|e| io(&path, e))?;
            if !m.is_file() {
                return Err(ObjectError::NotFound(key));
            }
            let mut buf = Vec::with_capacity(m.len() as usize);
            std::io::Read::read_to_end(&mut &f, &mut buf).map_err(|e| io(&path, e))?;
            Ok((meta_of(&key, &m), Bytes::from(buf)))
        })
        .await
    }

    async fn get_stream(&self, key: &str) -> Result<(ObjectMeta, ObjectReader), ObjectError> {
        let path = self.inner.path_of(key)?;
        let f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ObjectError::NotFound(key.to_string()))
            }
            Err(e) => return Err(io(&path, e)),
        };
        let m = f.metadata().await.map_err(|e| io(&path, e))?;
        if !m.is_file() {
            return Err(ObjectError::NotFound(key.to_string()));
        }
        Ok((
            meta_of(key, &m),
            Box::new(tokio::io::BufReader::with_capacity(256 * 1024, f)),
        ))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        self.inner.head(key)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let inner = self.inner.clone();
        let prefix = prefix.to_string();
        blocking(move || inner.list(&prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let inner = self.inner.clone();
        let key = key.to_string();
        blocking(move || inner.delete(&key)).await
    }
}
