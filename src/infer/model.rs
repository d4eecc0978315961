//! The model `sift infer` scores with, and its hot swap.
//!
//! The [`Slot`] holds the current model. A watcher task checks the
//! registry's LATEST every `infer.model_poll`; a new version is fetched and
//! loaded in the background (the daemon keeps scoring with the old one), then
//! put in the slot. The model thread reads the slot at the start of every
//! batch, so a swap falls between two batches: every document is scored by
//! exactly one model, and its row records which. A version that fails to
//! load is reported (log, `sift_infer_model_loads_total{outcome="failed"}`)
//! and not tried again until LATEST moves; the old model keeps running.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use parking_lot::RwLock;
use sift_training::Predictor;

use crate::backends::objects::ObjectStore;
use crate::stage::Stop;
use crate::train::registry::Registry;

/// A loaded model.
pub struct Loaded {
    /// Registry version (or the directory, for a model given by path).
    pub version: String,
    /// Increases with every swap; documents tokenized by an older model are
    /// tokenized again before scoring.
    pub generation: u64,
    /// The model.
    pub predictor: Predictor,
}

/// The current model; empty until the first one loads.
#[derive(Default)]
pub struct Slot(RwLock<Option<Arc<Loaded>>>);

impl Slot {
    /// The current model.
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.0.read().clone()
    }

    /// Empties the slot.
    pub fn clear(&self) {
        *self.0.write() = None;
    }

    /// Puts `predictor` in the slot as `version`.
    pub fn install(&self, version: String, predictor: Predictor) -> Arc<Loaded> {
        let mut slot = self.0.write();
        let generation = slot.as_ref().map_or(1, |m| m.generation + 1);
        let loaded = Arc::new(Loaded {
            version,
            generation,
            predictor,
        });
        *slot = Some(loaded.clone());
        loaded
    }
}

/// Where models come from and how they are loaded.
#[derive(Clone)]
pub struct Source {
    /// The registry.
    pub registry: Arc<Registry>,
    /// Local cache of fetched versions.
    pub cache: PathBuf,
    /// Device.
    pub device: Device,
    /// Arithmetic.
    pub dtype: DType,
}

impl Source {
    /// A source over the object store's registry under `prefix`.
    pub fn new(
        objects: Arc<dyn ObjectStore>,
        prefix: &str,
        cache: PathBuf,
        device: Device,
        dtype: DType,
    ) -> Self {
        Source {
            registry: Arc::new(Registry::new(objects, prefix)),
            cache,
            device,
            dtype,
        }
    }

    /// The version LATEST names, if any.
    pub async fn latest(&self) -> Result<Option<String>, String> {
        self.registry
            .latest()
            .await
            .map(|l| l.map(|(latest, _)| latest.version))
            .map_err(|e| e.to_string())
    }

    /// Fetches and loads `version` (off the async runtime).
    pub async fn load(&self, version: &str) -> Result<Predictor, String> {
        let dir = self
            .registry
            .fetch(version, &self.cache)
            .await
            .map_err(|e| format!("cannot fetch model {version}: {e}"))?;
        let (device, dtype) = (self.device.clone(), self.dtype);
        tokio::task::spawn_blocking(move || Predictor::load(&dir, &device, dtype))
            .await
            .map_err(|e| format!("loading model {version} failed: {e}"))?
            .map_err(|e| format!("cannot load model {version}: {e}"))
    }
}

/// Loads `version` into the slot, counting the outcome; false on failure.
pub async fn swap_to(slot: &Slot, source: &Source, version: &str) -> bool {
    let metrics = crate::metrics::global();
    match source.load(version).await {
        Ok(predictor) => {
            let old = slot.current().map(|m| m.version.clone());
            let loaded = slot.install(version.to_owned(), predictor);
            metrics.infer_model_loaded(old.as_deref(), &loaded.version);
            tracing::info!(
                version = %loaded.version,
                previous = old.as_deref().unwrap_or("none"),
                generation = loaded.generation,
                "Model loaded; scoring with it from the next batch."
            );
            true
        }
        Err(e) => {
            metrics.infer_model_load_failed();
            tracing::error!(
                error = %e,
                version,
                running = slot.current().map(|m| m.version.clone()).as_deref().unwrap_or("none"),
                "A model failed to load; the running one keeps scoring."
            );
            false
        }
    }
}

/// Which model scores in the shadow (`infer.shadow_model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShadowChoice {
    /// No shadow.
    Off,
    /// The newest version the gate refused (or has not gated): followed as
    /// new ones are trained.
    Challenger,
    /// One registry version.
    Version(String),
}

impl ShadowChoice {
    /// From the config value: empty, `challenger`, or a version.
    pub fn parse(value: &str) -> Self {
        match value.trim() {
            "" => ShadowChoice::Off,
            "challenger" => ShadowChoice::Challenger,
            v => ShadowChoice::Version(v.to_owned()),
        }
    }
}

/// The shadow: its slot, the champion's, where models come from, which one
/// to follow, and the version that last failed to load.
pub struct Shadow {
    /// The shadow slot.
    pub slot: Arc<Slot>,
    /// The champion's slot (a shadow equal to it is not loaded).
    pub champion: Arc<Slot>,
    /// The registry.
    pub source: Source,
    /// Which model.
    pub choice: ShadowChoice,
    failed: Option<String>,
}

impl Shadow {
    /// A shadow not loaded yet.
    pub fn new(slot: Arc<Slot>, champion: Arc<Slot>, source: Source, choice: ShadowChoice) -> Self {
        Shadow {
            slot,
            champion,
            source,
            choice,
            failed: None,
        }
    }

    /// Puts the model the choice names now in the slot (or empties it): a
    /// version equal to the champion's is not loaded twice, and a version
    /// that fails to load is reported and not tried again until the choice
    /// moves.
    pub async fn refresh(&mut self) {
        let wanted = match &self.choice {
            ShadowChoice::Off => return,
            ShadowChoice::Version(v) => Ok(Some(v.clone())),
            ShadowChoice::Challenger => self
                .source
                .registry
                .challenger()
                .await
                .map_err(|e| e.to_string()),
        };
        match wanted {
            Ok(Some(version)) => {
                let champion = self.champion.current().map(|m| m.version.clone());
                let running = self.slot.current().map(|m| m.version.clone());
                if champion.as_deref() == Some(version.as_str()) {
                    self.slot.clear();
                } else if running.as_deref() != Some(version.as_str())
                    && self.failed.as_deref() != Some(version.as_str())
                {
                    match self.source.load(&version).await {
                        Ok(predictor) => {
                            self.slot.install(version.clone(), predictor);
                            tracing::info!(%version, "Shadow model loaded; scoring every document a second time.");
                        }
                        Err(e) => {
                            crate::metrics::global().infer_model_load_failed();
                            tracing::error!(error = %e, %version, "The shadow model failed to load; scoring without a shadow.");
                            self.failed = Some(version);
                        }
                    }
                }
            }
            Ok(None) => self.slot.clear(),
            Err(e) => {
                tracing::warn!(error = %e, "Could not look for a challenger in the registry.")
            }
        }
    }
}

/// Keeps the shadow on the model its choice names until `stop`.
pub async fn watch_shadow(mut shadow: Shadow, every: Duration, mut stop: Stop) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait() => return,
        }
        shadow.refresh().await;
    }
}

/// Follows LATEST until `stop`: loads each new version once.
pub async fn watch(slot: Arc<Slot>, source: Source, every: Duration, mut stop: Stop) {
    let mut failed: Option<String> = None;
    loop {
        match source.latest().await {
            Ok(Some(version)) => {
                let running = slot.current().map(|m| m.version.clone());
                if running.as_deref() != Some(version.as_str())
                    && failed.as_deref() != Some(version.as_str())
                    && !swap_to(&slot, &source, &version).await
                {
                    failed = Some(version);
                }
            }
            Ok(None) => {
                if slot.current().is_none() {
                    tracing::info!(
                        "No model in the registry yet (train one with `sift train`); waiting."
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "Could not read the registry's LATEST."),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait() => return,
        }
    }
}
