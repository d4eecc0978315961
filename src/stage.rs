//! What the consumer stages (`clean`, `infer`, ...) share: the stop signal,
//! retry with backoff, envelope parsing with its rejection reasons, claim
//! checks, dead letters about a record, committing, and the group's standing
//! on its input topic.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use rayon::prelude::*;
use serde::Deserialize;
use tokio::sync::watch;

use crate::backends::log::{
    Commit, Consumer, Log, LogError, Message, Offset, Watermarks, MAX_RECORD_BYTES,
};
use crate::backends::objects::{self, ObjectError, ObjectStore};
use crate::daemon::StageHealth;
use crate::dlq::DeadLetter;
use crate::envelope::{self, Envelope, Stage, SCHEMA_VERSION};

/// Largest record a stage sends, leaving room for the log's own framing.
pub const RECORD_LIMIT: usize = MAX_RECORD_BYTES - 4096;
/// Claim checks fetched at once.
const CLAIM_FETCHES: usize = 8;

/// Reasons every stage that reads envelopes can give (the `reason` label).
pub mod reasons {
    /// Not a JSON envelope.
    pub const BAD_JSON: &str = "bad_json";
    /// An envelope of another schema version.
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// A `body_uri` that is not a claim check of sift's object store, or whose object is not UTF-8.
    pub const BAD_CLAIM: &str = "bad_claim";
    /// A claim check whose object does not exist.
    pub const CLAIM_MISSING: &str = "claim_missing";
}

/// Resolves once shutdown was asked for; never when it cannot be.
///
/// A bounded stop ([`Stop::bounded`], for one-pass runs) also ends the run
/// when one step has failed too many times in a row, and keeps why: a
/// `--once` run exits non-zero instead of retrying forever.
#[derive(Clone)]
pub struct Stop {
    rx: watch::Receiver<bool>,
    bound: Option<Arc<GiveUp>>,
}

struct GiveUp {
    /// Failed attempts in a row after which the run gives up.
    after: u32,
    tx: Arc<watch::Sender<bool>>,
    why: parking_lot::Mutex<Option<String>>,
}

/// Failed attempts in a row after which a one-pass run gives up: with the
/// backoff doubling from 100 ms, about 13 seconds of retrying.
pub const ONCE_ATTEMPTS: u32 = 8;

impl Stop {
    /// A stop that is set once `signal` resolves (never without one), and the task watching it.
    pub fn new(
        signal: Option<BoxFuture<'static, ()>>,
    ) -> (Self, Option<tokio::task::JoinHandle<()>>) {
        Self::bounded(signal, None)
    }

    /// As [`Stop::new`]; with `give_up_after`, a step that fails that many
    /// times in a row also sets it, and [`Stop::gave_up`] says why.
    pub fn bounded(
        signal: Option<BoxFuture<'static, ()>>,
        give_up_after: Option<u32>,
    ) -> (Self, Option<tokio::task::JoinHandle<()>>) {
        let (tx, rx) = watch::channel(false);
        let tx = Arc::new(tx);
        let watcher = signal.map(|f| {
            let tx = Arc::clone(&tx);
            tokio::spawn(async move {
                f.await;
                let _ = tx.send(true);
            })
        });
        let bound = give_up_after.map(|after| {
            Arc::new(GiveUp {
                after: after.max(1),
                tx,
                why: parking_lot::Mutex::new(None),
            })
        });
        (Stop { rx, bound }, watcher)
    }

    /// Why the run gave up, if it did.
    pub fn gave_up(&self) -> Option<String> {
        self.bound.as_ref().and_then(|b| b.why.lock().clone())
    }

    /// [`crate::Error::GaveUp`] if the run gave up.
    pub fn check(&self) -> crate::Result<()> {
        match self.gave_up() {
            Some(why) => Err(crate::Error::GaveUp(why)),
            None => Ok(()),
        }
    }

    /// Ends a bounded run after `attempt` failures in a row; true if it did.
    fn give_up_at(&self, attempt: u32, what: &str, error: &dyn std::fmt::Display) -> bool {
        let Some(bound) = &self.bound else {
            return false;
        };
        if attempt < bound.after {
            return false;
        }
        let mut why = bound.why.lock();
        if why.is_none() {
            *why = Some(format!("could not {what} in {attempt} attempts: {error}"));
        }
        let _ = bound.tx.send(true);
        true
    }

    /// Whether shutdown was asked for.
    pub fn is_set(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown is asked for.
    pub async fn wait(&mut self) {
        if self.rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Exponential backoff between retries of a failed backend call.
pub struct Backoff {
    delay: Duration,
    max: Duration,
    attempt: u32,
    /// The stage's health, which counts failures in a row for `/healthz`.
    health: &'static StageHealth,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    /// Longest wait between failed polls of a consumer group.
    const POLL_MAX: Duration = Duration::from_secs(5);

    /// A fresh backoff that counts failures in `health`.
    pub fn new(health: &'static StageHealth) -> Self {
        Backoff {
            delay: Self::FIRST,
            max: Self::MAX,
            attempt: 0,
            health,
        }
    }

    /// A backoff between failed polls, which waits at most 5 s: a poll
    /// already waits for records, costs the brokers little, and a member
    /// that does not poll within the group's `max.poll.interval.ms` is put
    /// out of the group, which then rebalances without it.
    pub fn for_polls(health: &'static StageHealth) -> Self {
        Backoff {
            max: Self::POLL_MAX,
            ..Self::new(health)
        }
    }

    /// Logs the failure and waits; false if shutdown was asked for meanwhile.
    /// Resolves once shutdown is asked for.
    pub async fn wait<E: std::fmt::Display>(
        &mut self,
        stop: &mut Stop,
        what: &str,
        error: &E,
    ) -> bool {
        self.attempt += 1;
        self.health.fail();
        crate::metrics::note_failure(format!(
            "could not {what} ({} attempts in a row): {error}",
            self.attempt
        ));
        if stop.give_up_at(self.attempt, what, error) {
            tracing::error!(
                error = %error,
                attempts = self.attempt,
                "Could not {what}; giving up (a one-pass run does not retry forever)."
            );
            return false;
        }
        tracing::warn!(
            error = %error,
            attempt = self.attempt,
            retry_in = ?self.delay,
            "Could not {what}; retrying."
        );
        let slept = tokio::select! {
            _ = tokio::time::sleep(self.delay) => true,
            _ = stop.wait() => false,
        };
        self.delay = (self.delay * 2).min(self.max);
        slept
    }
}

/// Calls `call` until it succeeds, with backoff between failures; false
/// if shutdown was asked for while it kept failing.
pub async fn retry<T, E, F, Fut>(
    stop: &Stop,
    health: &'static StageHealth,
    what: &str,
    mut call: F,
) -> bool
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut stop = stop.clone();
    let mut backoff = Backoff::new(health);
    loop {
        match call().await {
            Ok(_) => return true,
            Err(e) => {
                if !backoff.wait(&mut stop, what, &e).await {
                    return false;
                }
            }
        }
    }
}

/// Why a record is rejected.
pub struct Rejection {
    /// A short fixed code (a metric label).
    pub reason: &'static str,
    /// What went wrong, for a person.
    pub detail: String,
}

impl Rejection {
    /// A rejection for `reason`.
    pub fn new(reason: &'static str, detail: String) -> Self {
        Rejection { reason, detail }
    }
}

/// The only field read from a record that is not a current envelope.
#[derive(Deserialize)]
struct Versioned {
    v: u32,
}

/// Parses a raw record's envelope.
pub fn parse(value: &[u8]) -> Result<Envelope, Rejection> {
    match serde_json::from_slice::<Envelope>(value) {
        Ok(env) if env.v == SCHEMA_VERSION => Ok(env),
        Ok(env) => Err(schema_rejection(env.v)),
        Err(e) => match serde_json::from_slice::<Versioned>(value) {
            Ok(v) if v.v != SCHEMA_VERSION => Err(schema_rejection(v.v)),
            _ => Err(Rejection::new(
                reasons::BAD_JSON,
                format!("not a JSON envelope: {e}"),
            )),
        },
    }
}

fn schema_rejection(v: u32) -> Rejection {
    Rejection::new(
        reasons::SCHEMA_VERSION,
        format!("envelope schema version {v}; this sift reads version {SCHEMA_VERSION}"),
    )
}

/// Commits a sent batch; false if shutdown was asked for while the log failed.
pub async fn commit(
    consumer: &mut dyn Consumer,
    commits: &[Commit],
    group: &str,
    stop: &mut Stop,
    health: &'static StageHealth,
) -> bool {
    let mut backoff = Backoff::new(health);
    loop {
        match consumer.commit(commits).await {
            Ok(()) => return true,
            // The batch is written; the partition's new owner gets it again
            // and writes the same keys.
            Err(LogError::NotAssigned { .. }) => {
                tracing::info!(
                    group,
                    "The group rebalanced before the batch was committed; its records will be delivered again."
                );
                return true;
            }
            Err(e) => {
                if !backoff.wait(stop, "commit offsets", &e).await {
                    return false;
                }
            }
        }
    }
}

/// A dead letter about `m`, carrying it as its original ([`dlq::send`]
/// claim-checks one too large to carry).
pub fn dead_letter(stage: Stage, m: &Message, r: Rejection) -> DeadLetter {
    let detail = format!("{} ({} {}@{})", r.detail, m.topic, m.partition, m.offset);
    DeadLetter::of_message(stage, r.reason, detail, m)
}

/// Fetches a claim-checked text; None if shutdown was asked for while the store failed.
pub async fn fetch_claim(
    objects: &dyn ObjectStore,
    uri: &str,
    stop: &mut Stop,
    health: &'static StageHealth,
) -> Option<Result<String, Rejection>> {
    let Some(key) = envelope::claim_key(uri).filter(|k| objects::validate_key(k).is_ok()) else {
        return Some(Err(Rejection::new(
            reasons::BAD_CLAIM,
            format!(
                "body_uri `{uri}` is not a claim check of sift's object store (objects:claims/...)"
            ),
        )));
    };
    let mut backoff = Backoff::new(health);
    loop {
        match objects.get(key).await {
            Ok((_, body)) => {
                return Some(String::from_utf8(body.to_vec()).map_err(|e| {
                    Rejection::new(
                        reasons::BAD_CLAIM,
                        format!("claim check `{uri}` is not UTF-8 text: {e}"),
                    )
                }))
            }
            Err(ObjectError::NotFound(_)) => {
                return Some(Err(Rejection::new(
                    reasons::CLAIM_MISSING,
                    format!("claim check `{uri}` has no object in the object store"),
                )))
            }
            Err(e @ ObjectError::InvalidKey { .. }) => {
                return Some(Err(Rejection::new(
                    reasons::BAD_CLAIM,
                    format!("claim check `{uri}`: {e}"),
                )))
            }
            Err(e) => {
                if !backoff.wait(stop, "read a claim check", &e).await {
                    return None;
                }
            }
        }
    }
}

/// The group's lag on `topic`, and whether it has committed up to `targets`.
pub async fn standing(
    log: &dyn Log,
    topic: &str,
    group: &str,
    targets: Option<&[Watermarks]>,
) -> Result<(u64, bool), LogError> {
    let marks = log.watermarks(topic).await?;
    let committed = log.committed(group, topic).await?;
    let mut lag = 0u64;
    for w in &marks {
        if let Some(p) = position(w, &committed) {
            lag = lag.saturating_add(log.count(topic, w.partition, &p, &w.high).await?);
        }
    }
    // Done against the partitions' ends now, not the targets': a committed
    // offset beyond a partition's end is not done.
    let now = |partition: u32| marks.iter().find(|w| w.partition == partition);
    let done = targets.is_some_and(|t| {
        t.iter().all(|w| {
            now(w.partition).is_none_or(|m| position(m, &committed).is_some())
                && committed_or_low(w, &committed) >= w.high
        })
    });
    Ok((lag, done))
}

/// Where a group stands in partition `w`: its committed offset, or the
/// partition's start when it has none (or one below the start, deleted by
/// retention). None when the committed offset lies beyond the partition's
/// end: that is not "done"; the consumer meets it and
/// `log.on_offset_out_of_range` decides.
pub fn position(w: &Watermarks, committed: &[(u32, Option<Offset>)]) -> Option<Offset> {
    let c = committed_or_low(w, committed);
    (c <= w.high).then_some(c)
}

fn committed_or_low(w: &Watermarks, committed: &[(u32, Option<Offset>)]) -> Offset {
    committed
        .iter()
        .find(|(p, _)| *p == w.partition)
        .and_then(|(_, c)| c.clone())
        .unwrap_or_else(|| w.low.clone())
        .max(w.low.clone())
}

/// Fetches the texts of claim-checked envelopes; false if stopped first.
pub async fn resolve_claims(
    parsed: &mut [Result<Envelope, Rejection>],
    objects: &Arc<dyn ObjectStore>,
    stop: &Stop,
    health: &'static StageHealth,
) -> bool {
    let wanted: Vec<(usize, String)> = parsed
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Ok(env) if env.text.is_none() => env.body_uri.clone().map(|u| (i, u)),
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        return true;
    }
    let fetched: Vec<(usize, Option<Result<String, Rejection>>)> = futures::stream::iter(wanted)
        .map(|(i, uri)| {
            let objects = objects.clone();
            let mut stop = stop.clone();
            async move {
                (
                    i,
                    fetch_claim(objects.as_ref(), &uri, &mut stop, health).await,
                )
            }
        })
        .buffer_unordered(CLAIM_FETCHES)
        .collect()
        .await;
    for (i, f) in fetched {
        match f {
            None => return false,
            Some(Ok(text)) => {
                if let Ok(env) = &mut parsed[i] {
                    env.text = Some(text);
                }
            }
            Some(Err(r)) => parsed[i] = Err(r),
        }
    }
    true
}

/// Runs `f` over `items` on the rayon pool, off the async runtime.
pub async fn parallel<T, R>(
    items: Vec<T>,
    f: impl Fn(T) -> R + Send + Sync + 'static,
) -> crate::Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(move || items.into_par_iter().map(f).collect())
        .await
        .map_err(|e| crate::Error::Invalid(format!("a worker failed: {e}")))
}
