//! The poller of `sift infer`: owns the consumer of `sift.clean`, parses
//! each record, resolves claim-checked texts, sends what it cannot handle
//! to `sift.dlq`, tokenizes the rest on the rayon pool and queues it for
//! the model thread; it stops polling while `infer.max_in_flight` documents
//! are between poll and commit. It also commits: a poll's offsets once every
//! document of it, and of every earlier poll, is durable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::backends::log::{Commit, Consumer, Log, Message, Offset, Watermarks};
use crate::backends::objects::ObjectStore;
use crate::dlq::{self, DeadLetter};
use crate::envelope::{topics, Envelope};
use crate::stage::{
    commit, dead_letter, parallel, parse, resolve_claims, retry, standing, Backoff, Rejection, Stop,
};

use super::model::Slot;
use super::{model_text, reasons, Doc, Done, InferSummary, Queued, Settings, HEALTH, STAGE};

/// A poll's documents until all are durable.
pub(super) struct Unit {
    commits: Vec<Commit>,
    remaining: usize,
    consumed: u64,
}

/// The poller: owns the consumer, feeds the model thread, commits.
pub(super) struct Poller {
    pub(super) log: Arc<dyn Log>,
    pub(super) objects: Arc<dyn ObjectStore>,
    pub(super) consumer: Box<dyn Consumer>,
    pub(super) settings: Settings,
    pub(super) slot: Arc<Slot>,
    pub(super) stop: Stop,
    pub(super) to_model: std_mpsc::Sender<Queued>,
    pub(super) queued: Arc<AtomicI64>,
    pub(super) done_rx: mpsc::UnboundedReceiver<Done>,
    pub(super) units: BTreeMap<u64, Unit>,
    pub(super) next_unit: u64,
    pub(super) in_flight: usize,
}

/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often the lag is measured when not running until caught up.
const LAG_EVERY: Duration = Duration::from_secs(2);
/// How long a poll waits when nothing is in flight.
const POLL_WAIT: Duration = Duration::from_millis(200);
/// How long a poll waits while documents are in flight (their completions need handling).
const POLL_WAIT_BUSY: Duration = Duration::from_millis(5);

impl Poller {
    pub(super) async fn consume(
        &mut self,
        summary: &mut InferSummary,
        targets: Option<&[Watermarks]>,
        started: Instant,
    ) -> crate::Result<()> {
        let metrics = crate::metrics::global();
        let mut last_lag: Option<Instant> = None;
        let mut last_progress = (Instant::now(), 0u64);
        let mut poll_backoff = Backoff::for_polls(&HEALTH);
        loop {
            if !self.settle(summary, false).await {
                return Ok(());
            }
            if self.stop.is_set() {
                break;
            }
            let check_lag = if targets.is_some() {
                self.units.is_empty()
            } else {
                last_lag.is_none_or(|t: Instant| t.elapsed() >= LAG_EVERY)
            };
            if check_lag {
                match standing(
                    self.log.as_ref(),
                    topics::CLEAN,
                    &self.settings.group,
                    targets,
                )
                .await
                {
                    Ok((lag, done)) => {
                        metrics.lag(STAGE, i64::try_from(lag).unwrap_or(i64::MAX));
                        last_lag = Some(Instant::now());
                        if done && self.units.is_empty() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Could not measure the consumer lag."),
                }
            }
            if last_progress.0.elapsed() >= PROGRESS_EVERY {
                let rate = (summary.scored - last_progress.1) as f64
                    / last_progress.0.elapsed().as_secs_f64();
                metrics.infer_docs_per_second.set(rate);
                last_progress = (Instant::now(), summary.scored);
                tracing::info!(
                    consumed = summary.consumed,
                    scored = summary.scored,
                    in_flight = self.in_flight,
                    docs_per_second = rate.round(),
                    total_docs_per_second =
                        (summary.scored as f64 / started.elapsed().as_secs_f64()).round(),
                    "Scoring."
                );
            }
            let room = self.settings.max_in_flight.saturating_sub(self.in_flight);
            if room == 0 {
                // Backpressure: wait for the model and the writer.
                if !self.settle(summary, true).await {
                    return Ok(());
                }
                continue;
            }
            let wait = if self.in_flight > 0 {
                POLL_WAIT_BUSY
            } else {
                POLL_WAIT
            };
            match self
                .consumer
                .poll(self.settings.poll_records.min(room), wait)
                .await
            {
                Ok(batch) if batch.is_empty() => poll_backoff = Backoff::for_polls(&HEALTH),
                Ok(batch) => {
                    poll_backoff = Backoff::for_polls(&HEALTH);
                    if !self.admit(batch, summary).await? {
                        break;
                    }
                }
                Err(e) => {
                    if !poll_backoff
                        .wait(&mut self.stop, "poll sift.clean", &e)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        // Drain: everything in flight reaches the table and is committed.
        while !self.units.is_empty() {
            if !self.settle(summary, true).await {
                break;
            }
        }
        Ok(())
    }

    /// Takes in what the writer finished and commits every complete poll at
    /// the front; with `block`, waits for at least one report first. False
    /// when the writer has gone (it gave up on a backend at shutdown).
    async fn settle(&mut self, summary: &mut InferSummary, block: bool) -> bool {
        let mut reports = Vec::new();
        if block && self.in_flight > 0 {
            match tokio::time::timeout(Duration::from_millis(100), self.done_rx.recv()).await {
                Ok(Some(d)) => reports.push(d),
                Ok(None) => return false,
                Err(_) => {}
            }
        }
        loop {
            match self.done_rx.try_recv() {
                Ok(d) => reports.push(d),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if self.in_flight > 0 {
                        return false;
                    }
                    break;
                }
            }
        }
        for d in reports {
            for (unit, n) in d.units {
                if let Some(u) = self.units.get_mut(&unit) {
                    u.remaining = u.remaining.saturating_sub(n);
                }
                self.in_flight = self.in_flight.saturating_sub(n);
            }
            summary.batches += d.batches;
            for (version, n) in d.by_model {
                summary.scored += n;
                *summary.by_model.entry(version).or_default() += n;
            }
            for reason in d.dead {
                *summary.dead_letters.entry(reason.to_string()).or_default() += 1;
            }
            summary.latencies.extend(d.latencies);
        }
        crate::metrics::global()
            .infer_in_flight
            .set(i64::try_from(self.in_flight).unwrap_or(i64::MAX));
        self.commit_ready(summary).await
    }

    /// Commits the complete polls at the front; false if shutdown came while the log failed.
    async fn commit_ready(&mut self, summary: &mut InferSummary) -> bool {
        let mut latest: BTreeMap<(String, u32), Offset> = BTreeMap::new();
        let mut consumed = 0;
        while let Some(entry) = self.units.first_entry() {
            if entry.get().remaining > 0 {
                break;
            }
            let unit = entry.remove();
            consumed += unit.consumed;
            for c in unit.commits {
                let e = latest.entry((c.topic, c.partition)).or_insert(Offset::ZERO);
                if c.next_offset > *e {
                    *e = c.next_offset;
                }
            }
        }
        if latest.is_empty() {
            return true;
        }
        let commits: Vec<Commit> = latest
            .into_iter()
            .map(|((topic, partition), next_offset)| Commit {
                topic,
                partition,
                next_offset,
            })
            .collect();
        if !commit(
            self.consumer.as_mut(),
            &commits,
            &self.settings.group,
            &mut self.stop,
            &HEALTH,
        )
        .await
        {
            return false;
        }
        summary.consumed += consumed;
        HEALTH.recovered();
        true
    }

    /// Parses, resolves claims, dead-letters and tokenizes a poll, and
    /// queues its documents; false if shutdown came while a backend failed.
    async fn admit(
        &mut self,
        batch: Vec<Message>,
        summary: &mut InferSummary,
    ) -> crate::Result<bool> {
        let metrics = crate::metrics::global();
        let unit = self.next_unit;
        self.next_unit += 1;
        let commits = Commit::after(&batch);
        let consumed = batch.len() as u64;
        let values: Vec<Bytes> = batch.iter().map(|m| m.value.clone()).collect();
        let mut parsed = parallel(values, |v| parse(&v).and_then(check)).await?;
        if !resolve_claims(&mut parsed, &self.objects, &self.stop, &HEALTH).await {
            return Ok(false);
        }
        let parsed: Vec<(Message, Result<Envelope, Rejection>)> =
            batch.into_iter().zip(parsed).collect();
        let Some(model) = self.slot.current() else {
            return Err(crate::Error::Invalid("no model loaded".into()));
        };
        let started = Instant::now();
        let encoder = model.clone();
        let prepared: Vec<Result<Doc, Box<DeadLetter>>> = parallel(parsed, move |(message, p)| {
            let env = match p.and_then(non_empty) {
                Ok(env) => env,
                Err(r) => return Err(Box::new(dead_letter(STAGE, &message, r))),
            };
            match encoder.predictor.encode(&model_text(&env)) {
                Ok(encoded) => Ok(Doc {
                    unit,
                    message,
                    env,
                    encoded,
                    generation: encoder.generation,
                }),
                Err(e) => Err(Box::new(dead_letter(
                    STAGE,
                    &message,
                    Rejection::new(reasons::INTERNAL, format!("tokenizing failed: {e}")),
                ))),
            }
        })
        .await?;
        metrics.infer_stage("tokenize", started.elapsed().as_secs_f64());
        let mut docs = Vec::with_capacity(prepared.len());
        let mut dead = Vec::new();
        for p in prepared {
            match p {
                Ok(d) => docs.push(d),
                Err(d) => dead.push(*d),
            }
        }
        if !dead.is_empty() {
            let (log, objects) = (&self.log, &self.objects);
            if !retry(&self.stop, &HEALTH, "send dead letters to sift.dlq", || {
                dlq::send(log.as_ref(), objects.as_ref(), &dead)
            })
            .await
            {
                return Ok(false);
            }
            for d in &dead {
                tracing::warn!(reason = d.reason, detail = %d.detail, "Sent a record to the dead-letter topic.");
                *summary
                    .dead_letters
                    .entry(d.reason.to_string())
                    .or_default() += 1;
            }
        }
        self.units.insert(
            unit,
            Unit {
                commits,
                remaining: docs.len(),
                consumed,
            },
        );
        self.in_flight += docs.len();
        let now = Instant::now();
        self.queued.fetch_add(docs.len() as i64, Ordering::Relaxed);
        for doc in docs {
            if self.to_model.send(Queued { doc, since: now }).is_err() {
                return Err(crate::Error::Invalid("the model thread stopped".into()));
            }
        }
        metrics
            .infer_queue_depth
            .set(self.queued.load(Ordering::Relaxed));
        Ok(true)
    }
}

/// An envelope must have an id to have a row.
fn check(env: Envelope) -> Result<Envelope, Rejection> {
    if env.id.trim().is_empty() {
        return Err(Rejection::new(
            reasons::BAD_ID,
            "the envelope has an empty id, so it cannot have a row".into(),
        ));
    }
    Ok(env)
}

/// A document with nothing to read is not scored.
fn non_empty(env: Envelope) -> Result<Envelope, Rejection> {
    let text = env.text.as_deref().unwrap_or_default();
    if text.trim().is_empty() && env.title.trim().is_empty() {
        return Err(Rejection::new(
            reasons::EMPTY_TEXT,
            "the document has neither title nor text".into(),
        ));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::SCHEMA_VERSION;

    fn envelope(id: &str, title: &str, text: Option<&str>) -> Envelope {
        Envelope {
            v: SCHEMA_VERSION,
            id: id.into(),
            source: "s".into(),
            url: "http://s/a".into(),
            fetched_at_ms: 0,
            content_type: "text/html".into(),
            title: title.into(),
            text: text.map(str::to_owned),
            body_uri: None,
            metadata: Default::default(),
        }
    }

    fn reason(r: Result<Envelope, Rejection>) -> Option<&'static str> {
        r.err().map(|r| r.reason)
    }

    #[test]
    fn a_document_without_an_id_cannot_have_a_row() {
        assert_eq!(
            reason(check(envelope(" \t", "t", Some("x")))),
            Some(reasons::BAD_ID)
        );
        assert_eq!(
            reason(check(envelope("", "t", Some("x")))),
            Some(reasons::BAD_ID)
        );
        assert_eq!(reason(check(envelope("d1", "t", Some("x")))), None);
    }

    #[test]
    fn a_document_needs_a_title_or_a_text_to_be_scored() {
        for (title, text) in [("", None), (" ", Some("\n\t ")), ("", Some(""))] {
            assert_eq!(
                reason(non_empty(envelope("d", title, text))),
                Some(reasons::EMPTY_TEXT),
                "{title:?} {text:?}"
            );
        }
        for (title, text) in [("a title", None), ("", Some("a text")), ("t", Some("x"))] {
            assert_eq!(reason(non_empty(envelope("d", title, text))), None);
        }
    }
}
