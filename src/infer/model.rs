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
//!
//! The model thread ([`model_loop`]) takes queued documents through the
//! dynamic batcher, scores each batch with the slot's model ([`score`]):
//! top 5, the words that weighed most, and the shadow model's top 5 where
//! one is set; a batch that fails is retried one document at a time, and a
//! document that still fails is a dead letter.

use std::path::PathBuf;

use candle_core::Device;
use parking_lot::RwLock;
use sift_training::{Arithmetic, Predictor};

use crate::train::registry::Registry;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sift_training::Encoded;
use tokio::sync::mpsc;

use crate::backends::objects::ObjectStore;
use crate::stage::{Rejection, Stop};

use super::batcher::{Limits, Pending};
use super::{reasons, Doc, Outcome, Queued, Scoring, TOP_K};

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
    pub arithmetic: Arithmetic,
}

impl Source {
    /// A source over the object store's registry under `prefix`.
    pub fn new(
        objects: Arc<dyn ObjectStore>,
        prefix: &str,
        cache: PathBuf,
        device: Device,
        arithmetic: Arithmetic,
    ) -> Self {
        Source {
            registry: Arc::new(Registry::new(objects, prefix)),
            cache,
            device,
            arithmetic,
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
        let (device, arithmetic) = (self.device.clone(), self.arithmetic);
        tokio::task::spawn_blocking(move || Predictor::load_as(&dir, &device, arithmetic))
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

/// Waits until the slot has a model; false if stopped first.
pub(super) async fn wait_for_model(slot: &Slot, stop: &Stop) -> bool {
    let mut stop = stop.clone();
    while slot.current().is_none() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.wait() => return false,
        }
    }
    true
}

/// The model thread: the dynamic batcher and the forward passes.
pub(super) fn model_loop(
    rx: std_mpsc::Receiver<Queued>,
    out: mpsc::Sender<Vec<Outcome>>,
    slot: Arc<Slot>,
    shadow: Arc<Slot>,
    limits: Limits,
    queued: Arc<AtomicI64>,
) {
    let metrics = crate::metrics::global();
    let mut pending: Pending<Doc> = Pending::default();
    let mut closed = false;
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(q) => pending.push(q.doc.encoded.ids.len(), q.since, q.doc),
                Err(_) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(q) => pending.push(q.doc.encoded.ids.len(), q.since, q.doc),
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // A batch that is not full waits up to max_wait after its oldest document.
        while !closed && !pending.can_fill(&limits) {
            let Some(oldest) = pending.oldest() else {
                break;
            };
            let deadline = oldest + limits.max_wait;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(q) => pending.push(q.doc.encoded.ids.len(), q.since, q.doc),
                Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => closed = true,
            }
        }
        let batch = pending.take(&limits);
        if batch.is_empty() {
            continue;
        }
        let left = queued.fetch_sub(batch.len() as i64, Ordering::Relaxed) - batch.len() as i64;
        metrics.infer_queue_depth.set(left);
        let started = Instant::now();
        for w in &batch {
            metrics.infer_stage("queue", started.duration_since(w.since).as_secs_f64());
        }
        let docs: Vec<Doc> = batch.into_iter().map(|w| w.item).collect();
        let mut outcomes = score(docs, &slot);
        shadow_score(&mut outcomes, &shadow);
        if out.blocking_send(outcomes).is_err() {
            break;
        }
    }
}

/// Scores one batch with the current model; a failed batch is retried one
/// document at a time, so only a document that fails alone is dead-lettered.
fn score(mut docs: Vec<Doc>, slot: &Slot) -> Vec<Outcome> {
    let metrics = crate::metrics::global();
    let Some(model) = slot.current() else {
        return docs
            .into_iter()
            .map(|doc| Outcome {
                doc,
                result: Err(Rejection::new(reasons::INTERNAL, "no model loaded".into())),
            })
            .collect();
    };
    // Documents tokenized by a model swapped out since are tokenized again.
    for doc in docs.iter_mut() {
        if doc.generation != model.generation {
            match model.predictor.encode(&doc.model_text()) {
                Ok(e) => {
                    doc.encoded = e;
                    doc.generation = model.generation;
                }
                Err(e) => tracing::warn!(error = %e, "Re-tokenizing after a model swap failed."),
            }
        }
    }
    let version: Arc<str> = Arc::from(model.version.as_str());
    let forward = |docs: &[Doc]| -> Result<Vec<Vec<(u32, f32)>>, String> {
        let refs: Vec<&Encoded> = docs.iter().map(|d| &d.encoded).collect();
        let longest = refs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        metrics.infer_batch_docs.observe(refs.len() as f64);
        metrics
            .infer_batch_padded_tokens
            .observe((longest * refs.len()) as f64);
        let started = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            model.predictor.predict_encoded(&refs, TOP_K)
        }));
        metrics.infer_stage("forward", started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(tops)) if tops.len() == refs.len() => Ok(tops),
            Ok(Ok(tops)) => Err(format!(
                "the model returned {} results for {} documents",
                tops.len(),
                refs.len()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(p) => Err(p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the model panicked".into())),
        }
    };
    let why_of = |doc: &Doc, top: &[(u32, f32)]| -> Vec<Vec<String>> {
        model
            .predictor
            .explain(&doc.model_text(), &doc.encoded, top, WHY_WORDS)
            .into_iter()
            .map(|words| words.into_iter().map(|(w, _)| w).collect())
            .collect()
    };
    let scored = |doc: Doc, top: &[(u32, f32)], why: Vec<Vec<String>>| Outcome {
        doc,
        result: Ok(Scoring {
            version: version.clone(),
            top: model.predictor.name(top).top,
            why,
            shadow: None,
            scored_at_ms: crate::now_ms(),
        }),
    };
    match forward(&docs) {
        Ok(tops) => {
            // The words behind each label are found on the rayon pool: the
            // model thread is the stage's bottleneck.
            let whys: Vec<Vec<Vec<String>>> = {
                use rayon::prelude::*;
                docs.par_iter()
                    .zip(tops.par_iter())
                    .map(|(doc, top)| why_of(doc, top))
                    .collect()
            };
            docs.into_iter()
                .zip(tops)
                .zip(whys)
                .map(|((doc, top), why)| scored(doc, &top, why))
                .collect()
        }
        Err(e) if docs.len() > 1 => {
            tracing::warn!(error = %e, documents = docs.len(), "A batch failed; scoring its documents one at a time.");
            docs.into_iter()
                .map(|doc| match forward(std::slice::from_ref(&doc)) {
                    Ok(tops) => {
                        let why = why_of(&doc, &tops[0]);
                        scored(doc, &tops[0], why)
                    }
                    Err(e) => Outcome {
                        doc,
                        result: Err(Rejection::new(
                            reasons::INTERNAL,
                            format!("scoring failed: {e}"),
                        )),
                    },
                })
                .collect()
        }
        Err(e) => docs
            .into_iter()
            .map(|doc| Outcome {
                doc,
                result: Err(Rejection::new(
                    reasons::INTERNAL,
                    format!("scoring failed: {e}"),
                )),
            })
            .collect(),
    }
}

/// Words kept per label to explain it on the review page.
const WHY_WORDS: usize = 6;

/// Scores the documents the champion scored a second time with the shadow
/// model, if one is loaded, into their [`Scoring::shadow`]. The shadow can
/// never cost a document its champion scores: a shadow failure is logged
/// and the documents go out without shadow columns.
fn shadow_score(outcomes: &mut [Outcome], shadow: &Slot) {
    let Some(model) = shadow.current() else {
        return;
    };
    let scored: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| {
            o.result
                .as_ref()
                .is_ok_and(|s| *s.version != *model.version)
        })
        .map(|(i, _)| i)
        .collect();
    if scored.is_empty() {
        return;
    }
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let encoded = scored
            .iter()
            .map(|&i| model.predictor.encode(&outcomes[i].doc.model_text()))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Encoded> = encoded.iter().collect();
        model.predictor.predict_encoded(&refs, TOP_K)
    }));
    match result {
        Ok(Ok(tops)) if tops.len() == scored.len() => {
            let version: Arc<str> = Arc::from(model.version.as_str());
            for (&i, top) in scored.iter().zip(tops) {
                if let Ok(s) = &mut outcomes[i].result {
                    s.shadow = Some((version.clone(), model.predictor.name(&top).top));
                }
            }
        }
        Ok(Ok(_)) => tracing::warn!("The shadow model returned the wrong number of results; no shadow scores for this batch."),
        Ok(Err(e)) => tracing::warn!(error = %e, "The shadow model failed; no shadow scores for this batch."),
        Err(_) => tracing::warn!("The shadow model panicked; no shadow scores for this batch."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_a_model_ends_when_shutdown_is_asked_for() {
        let slot = Slot::default();
        let (stop, _) = Stop::new(Some(Box::pin(async {})));
        let waited =
            tokio::time::timeout(Duration::from_secs(5), wait_for_model(&slot, &stop)).await;
        assert_eq!(
            waited.ok(),
            Some(false),
            "no model, and asked to stop: it gives up at once"
        );
    }
}
