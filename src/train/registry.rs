//! The model registry in the object store:
//!
//! ```text
//! PREFIX/<version>/{config.json, tokenizer.json, labels.json, report.html,
//!                   model.safetensors, metrics.json}
//! PREFIX/LATEST     {"version": ..., "previous": [...], "promoted_at_ms": ..., "reason": ...}
//! ```
//!
//! A version is uploaded file by file with `metrics.json` last, so a version
//! whose `metrics.json` exists is complete. `LATEST` only ever moves with a
//! compare-and-swap on its ETag: two trainers finishing at once cannot both
//! win, and the loser sees the winner and re-runs its gate. `LATEST` keeps
//! the versions it replaced, newest first, which is what `rollback` pops.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sift_training::{files, ModelMetrics};

use crate::backends::objects::{ObjectError, ObjectStore, PutMode};

/// How many replaced versions `LATEST` remembers for rollback.
const HISTORY: usize = 20;

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The object store failed.
    #[error(transparent)]
    Objects(#[from] ObjectError),
    /// No such version, or it is incomplete.
    #[error("model version `{0}` is not in the registry (see `sift models list`)")]
    UnknownVersion(String),
    /// Nothing has been promoted yet.
    #[error("no model has been promoted yet: run `sift train` first")]
    NoLatest,
    /// `rollback` has nothing to go back to.
    #[error("LATEST ({0}) has no earlier version to roll back to")]
    NothingToRollBack(String),
    /// A stored JSON file does not parse.
    #[error("registry file `{key}` is not valid: {message}")]
    Corrupt {
        /// The object key.
        key: String,
        /// The parse error.
        message: String,
    },
    /// A local file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// `LATEST` kept changing under us.
    #[error("LATEST changed concurrently {0} times in a row; try again")]
    Contended(u32),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RegistryError {
    let context = context.into();
    move |source| RegistryError::Io { context, source }
}

/// The `LATEST` pointer's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    /// The version serving now.
    pub version: String,
    /// Versions it replaced, newest first.
    #[serde(default)]
    pub previous: Vec<String>,
    /// When it was promoted, ms since the epoch.
    pub promoted_at_ms: i64,
    /// Why: `gate`, `first`, `forced`, `manual`, `rollback`.
    pub reason: String,
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionInfo {
    /// Version id (sortable by time).
    pub version: String,
    /// Its figures.
    pub metrics: ModelMetrics,
    /// Size of `model.safetensors`, bytes.
    pub model_bytes: u64,
    /// Whether it is LATEST.
    pub latest: bool,
}

/// The registry over an object store.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl Registry {
    /// A registry under `prefix` (e.g. `models`).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        Self {
            store,
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    fn latest_key(&self) -> String {
        format!("{}/LATEST", self.prefix)
    }

    fn key(&self, version: &str, file: &str) -> String {
        format!("{}/{version}/{file}", self.prefix)
    }

    /// A new version id: UTC time plus a digest of the weights, e.g.
    /// `20261126-041500-3fa94c`; later versions sort later.
    pub fn new_version(model_dir: &Path) -> Result<String, RegistryError> {
        let weights = model_dir.join(files::MODEL);
        let bytes =
            std::fs::read(&weights).map_err(io(format!("reading {}", weights.display())))?;
        let digest = blake3::hash(&bytes).to_hex();
        let now = time_stamp(crate::now_ms());
        Ok(format!("{now}-{}", &digest[..6]))
    }

    /// Uploads a trained model directory as `version` (metrics last).
    pub async fn publish(&self, model_dir: &Path, version: &str) -> Result<(), RegistryError> {
        for file in files::ALL {
            let path = model_dir.join(file);
            if files::OPTIONAL.contains(&file) && !path.is_file() {
                continue;
            }
            let body = tokio::fs::read(&path)
                .await
                .map_err(io(format!("reading {}", path.display())))?;
            self.store
                .put(
                    &self.key(version, file),
                    Bytes::from(body),
                    PutMode::Overwrite,
                )
                .await?;
        }
        Ok(())
    }

    /// The `LATEST` pointer and its ETag, or None before the first promotion.
    pub async fn latest(&self) -> Result<Option<(Latest, String)>, RegistryError> {
        let key = self.latest_key();
        match self.store.get(&key).await {
            Ok((meta, body)) => {
                let latest: Latest =
                    serde_json::from_slice(&body).map_err(|e| RegistryError::Corrupt {
                        key: key.clone(),
                        message: e.to_string(),
                    })?;
                Ok(Some((latest, meta.etag)))
            }
            Err(ObjectError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A version's `metrics.json` (which also proves it is complete).
    pub async fn metrics(&self, version: &str) -> Result<ModelMetrics, RegistryError> {
        let key = self.key(version, files::METRICS);
        let body = match self.store.get(&key).await {
            Ok((_, body)) => body,
            Err(ObjectError::NotFound(_)) => {
                return Err(RegistryError::UnknownVersion(version.to_owned()))
            }
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&body).map_err(|e| RegistryError::Corrupt {
            key,
            message: e.to_string(),
        })
    }

    /// Every complete version, oldest first.
    pub async fn list(&self) -> Result<Vec<VersionInfo>, RegistryError> {
        let latest = self.latest().await?.map(|(l, _)| l.version);
        let objects = self.store.list(&format!("{}/", self.prefix)).await?;
        let mut out = Vec::new();
        for meta in &objects {
            let Some(rest) = meta.key.strip_prefix(&format!("{}/", self.prefix)) else {
                continue;
            };
            let Some((version, file)) = rest.split_once('/') else {
                continue;
            };
            if file != files::METRICS {
                continue;
            }
            let model_bytes = objects
                .iter()
                .find(|m| m.key == self.key(version, files::MODEL))
                .map_or(0, |m| m.size);
            out.push(VersionInfo {
                version: version.to_owned(),
                metrics: self.metrics(version).await?,
                model_bytes,
                latest: latest.as_deref() == Some(version),
            });
        }
        out.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(out)
    }

    /// The newest complete version (its `metrics.json` written) that is
    /// newer than LATEST: the latest challenger the gate refused, or one not
    /// yet gated. None when LATEST is the newest or there is no LATEST.
    pub async fn challenger(&self) -> Result<Option<String>, RegistryError> {
        let Some((latest, _)) = self.latest().await? else {
            return Ok(None);
        };
        let prefix = format!("{}/", self.prefix);
        let objects = self.store.list(&prefix).await?;
        Ok(objects
            .iter()
            .filter_map(|meta| {
                let (version, file) = meta.key.strip_prefix(&prefix)?.split_once('/')?;
                (file == files::METRICS && version > latest.version.as_str())
                    .then(|| version.to_owned())
            })
            .max())
    }

    /// Rewrites `LATEST` with compare-and-swap: `next` sees the current
    /// pointer (None before the first promotion) and returns the new one, or
    /// None to leave it. If another writer moves `LATEST` in between, `next`
    /// runs again on what that writer wrote.
    async fn swap_latest<F>(&self, mut next: F) -> Result<Option<Latest>, RegistryError>
    where
        F: FnMut(Option<&Latest>) -> Result<Option<Latest>, RegistryError>,
    {
        const ATTEMPTS: u32 = 5;
        for _ in 0..ATTEMPTS {
            let current = self.latest().await?;
            let Some(latest) = next(current.as_ref().map(|(l, _)| l))? else {
                return Ok(None);
            };
            let mode = match &current {
                Some((_, etag)) => PutMode::IfMatch(etag.clone()),
                None => PutMode::IfAbsent,
            };
            let body = serde_json::to_vec_pretty(&latest).expect("plain data serialises");
            match self
                .store
                .put(&self.latest_key(), Bytes::from(body), mode)
                .await
            {
                Ok(_) => return Ok(Some(latest)),
                Err(ObjectError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RegistryError::Contended(ATTEMPTS))
    }

    /// Moves `LATEST` to `version`. `decide` sees the current pointer and
    /// returns the reason to promote, or None to leave it; it runs again if
    /// another writer moved `LATEST` in between. Returns the pointer
    /// written, or None when `decide` declined.
    pub async fn promote_if<F>(
        &self,
        version: &str,
        mut decide: F,
    ) -> Result<Option<Latest>, RegistryError>
    where
        F: FnMut(Option<&Latest>) -> Option<String>,
    {
        self.metrics(version).await?;
        self.swap_latest(|current| {
            let Some(reason) = decide(current) else {
                return Ok(None);
            };
            let mut previous: Vec<String> = current
                .map(|l| {
                    std::iter::once(&l.version)
                        .chain(&l.previous)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            previous.retain(|v| v != version);
            previous.truncate(HISTORY);
            Ok(Some(Latest {
                version: version.to_owned(),
                previous,
                promoted_at_ms: crate::now_ms(),
                reason,
            }))
        })
        .await
    }

    /// Moves `LATEST` to `version` only if it still points where it did
    /// when the caller compared (`expected`, None = nothing promoted yet):
    /// a comparison against a champion that has since been replaced is
    /// void. Returns None when `LATEST` had moved.
    pub async fn promote_over(
        &self,
        version: &str,
        expected: Option<&str>,
        reason: &str,
    ) -> Result<Option<Latest>, RegistryError> {
        self.promote_if(version, |now| {
            (now.map(|l| l.version.as_str()) == expected).then(|| reason.to_owned())
        })
        .await
    }

    /// Points `LATEST` back at the version it replaced.
    pub async fn rollback(&self) -> Result<Latest, RegistryError> {
        let latest = self
            .swap_latest(|current| {
                let current = current.ok_or(RegistryError::NoLatest)?;
                let Some((target, rest)) = current.previous.split_first() else {
                    return Err(RegistryError::NothingToRollBack(current.version.clone()));
                };
                Ok(Some(Latest {
                    version: target.clone(),
                    previous: rest.to_vec(),
                    promoted_at_ms: crate::now_ms(),
                    reason: format!("rollback from {}", current.version),
                }))
            })
            .await?;
        Ok(latest.expect("the closure above never declines"))
    }

    /// Downloads `version` into `cache/<version>/` unless it is already
    /// there (complete), and returns the directory. Files land in a
    /// temporary directory that is renamed into place, so a crash never
    /// leaves a half model that looks whole.
    pub async fn fetch(&self, version: &str, cache: &Path) -> Result<PathBuf, RegistryError> {
        let dir = cache.join(version);
        if dir.join(files::METRICS).is_file() {
            return Ok(dir);
        }
        self.metrics(version).await?;
        tokio::fs::create_dir_all(cache)
            .await
            .map_err(io(format!("creating {}", cache.display())))?;
        let partial = cache.join(format!(".{version}.partial-{}", std::process::id()));
        let _ = tokio::fs::remove_dir_all(&partial).await;
        tokio::fs::create_dir_all(&partial)
            .await
            .map_err(io(format!("creating {}", partial.display())))?;
        for file in files::ALL {
            let body = match self.store.get(&self.key(version, file)).await {
                Ok((_, body)) => body,
                // A model trained before these files existed scores alone.
                Err(ObjectError::NotFound(_)) if files::OPTIONAL.contains(&file) => continue,
                Err(e) => return Err(e.into()),
            };
            let path = partial.join(file);
            tokio::fs::write(&path, &body)
                .await
                .map_err(io(format!("writing {}", path.display())))?;
        }
        match tokio::fs::rename(&partial, &dir).await {
            Ok(()) => Ok(dir),
            // Another process fetched it first.
            Err(_) if dir.join(files::METRICS).is_file() => {
                let _ = tokio::fs::remove_dir_all(&partial).await;
                Ok(dir)
            }
            Err(e) => Err(io(format!("moving the model into {}", dir.display()))(e)),
        }
    }
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn time_stamp(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_stamps_are_utc_and_sortable() {
        assert_eq!(time_stamp(0), "19700101-000000");
        // 2026-11-26T04:15:09Z
        assert_eq!(time_stamp(1_795_666_509_000), "20261126-041509");
        assert_eq!(time_stamp(951_782_400_000), "20000229-000000");
    }
}
