//! The `sift match` daemon: a consumer group on `sift.profiles`. Each poll's
//! profiles are matched concurrently (`match.concurrency`), then every
//! decision is written to the tables, the cache and `sift.matches`, records
//! that are not profiles go to `sift.dlq`, and only then are the offsets
//! committed. A crash before the commit matches the same profiles again and
//! rewrites the same rows and keys.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::matcher::{Matcher, Outcome, ProfileIn};
use super::sink::{self, Decided};
use crate::backends::log::{Commit, Log, Message, Watermarks};
use crate::backends::{Cache, Table};
use crate::config::Config;
use crate::daemon::{StageHealth, Until};
use crate::dlq;
use crate::envelope::{topics, Stage};
use crate::metrics::Health;
use crate::stage::{commit, dead_letter, retry, standing, Backoff, Rejection, Stop};

const STAGE: Stage = Stage::Match;
/// How long a poll waits for records.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Reasons a record of `sift.profiles` is refused.
pub mod reasons {
    /// Not a JSON object with `network` and `handle` strings.
    pub const BAD_JSON: &str = "bad_json";
    /// A `v` other than 1.
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// Network or handle empty, malformed or too long.
    pub const BAD_PROFILE: &str = "bad_profile";
}

/// How `sift match` is doing, for `/healthz`: unhealthy while backend calls keep failing.
static HEALTH: StageHealth = StageHealth::new();

/// `/healthz` of `sift match`.
pub fn health() -> Health {
    HEALTH.probe()
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MatchSummary {
    /// Records consumed and committed.
    pub consumed: u64,
    /// Profiles decided, by reason.
    pub decided: BTreeMap<String, u64>,
    /// Records sent to `sift.dlq`, by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Profiles per second.
    pub profiles_per_second: f64,
}

/// Parses one record of `sift.profiles`.
pub fn parse_profile(value: &[u8]) -> Result<ProfileIn, Rejection> {
    let json: serde_json::Value = serde_json::from_slice(value)
        .map_err(|e| Rejection::new(reasons::BAD_JSON, format!("not JSON: {e}")))?;
    if let Some(v) = json.get("v") {
        if v.as_u64() != Some(1) {
            return Err(Rejection::new(
                reasons::SCHEMA_VERSION,
                format!("profile schema version {v}; this sift reads version 1"),
            ));
        }
    }
    let p: ProfileIn = serde_json::from_value(json).map_err(|e| {
        Rejection::new(
            reasons::BAD_JSON,
            format!("not a profile (network, handle, name?, location?, email?, phone?): {e}"),
        )
    })?;
    p.validate()
        .map_err(|e| Rejection::new(reasons::BAD_PROFILE, e))?;
    Ok(p)
}

/// The backends and settings of a run.
pub struct Parts {
    /// The log.
    pub log: Arc<dyn Log>,
    /// The object store, for dead letters' originals too large to carry.
    pub objects: Arc<dyn crate::backends::objects::ObjectStore>,
    /// The table.
    pub table: Arc<dyn Table>,
    /// The cache.
    pub cache: Arc<dyn Cache>,
    /// The matcher.
    pub matcher: Arc<Matcher>,
}

/// Creates the topics and tables `sift match` writes.
pub async fn prepare(config: &Config, log: &dyn Log, table: &dyn Table) -> crate::Result<()> {
    log.create_topic(topics::PROFILES, config.log.default_partitions)
        .await?;
    log.create_topic(topics::MATCHES, config.log.default_partitions)
        .await?;
    log.create_topic(topics::DLQ, 1).await?;
    sink::ensure_tables(table).await
}

/// Consumes `sift.profiles` until `until`.
pub async fn run(parts: Parts, config: &Config, until: Until) -> crate::Result<MatchSummary> {
    let started = Instant::now();
    prepare(config, parts.log.as_ref(), parts.table.as_ref()).await?;
    let group = config.matching.group.clone();
    let targets: Option<Vec<Watermarks>> = if until.caught_up {
        Some(parts.log.watermarks(topics::PROFILES).await?)
    } else {
        None
    };
    let (stop, watcher) = Stop::bounded(
        until.stop,
        until.caught_up.then_some(crate::stage::ONCE_ATTEMPTS),
    );
    let mut consumer = parts.log.subscribe(&group, &[topics::PROFILES]).await?;
    tracing::info!(group = %group, from = topics::PROFILES, to = topics::MATCHES, "Matching.");
    let mut summary = MatchSummary::default();
    let metrics = crate::metrics::global();
    let cache_ttl = Some(config.matching.cache_ttl).filter(|d| !d.is_zero());
    let concurrency = config.matching.concurrency.max(1) as usize;
    let mut poll_backoff = Backoff::for_polls(&HEALTH);
    let mut last_progress = Instant::now();
    let mut wait_stop = stop.clone();
    let result: crate::Result<()> = async {
        loop {
            if stop.is_set() {
                break;
            }
            if let Ok((lag, done)) = standing(
                parts.log.as_ref(),
                topics::PROFILES,
                &group,
                targets.as_deref(),
            )
            .await
            {
                metrics.lag(STAGE, i64::try_from(lag).unwrap_or(i64::MAX));
                if done {
                    break;
                }
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                parts.matcher.flush_enrich_stats().await;
                tracing::info!(
                    consumed = summary.consumed,
                    matched = summary.decided.get("matched").copied().unwrap_or(0),
                    "Matching."
                );
            }
            let batch = match consumer
                .poll(config.matching.poll_records.max(1) as usize, POLL_WAIT)
                .await
            {
                Ok(b) => {
                    poll_backoff = Backoff::for_polls(&HEALTH);
                    b
                }
                Err(e) => {
                    if !poll_backoff
                        .wait(&mut wait_stop, "poll sift.profiles", &e)
                        .await
                    {
                        break;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                continue;
            }
            let Some(handled) = handle(&parts, &batch, concurrency, &stop, cache_ttl).await? else {
                break;
            };
            let mut s = stop.clone();
            if !commit(
                consumer.as_mut(),
                &Commit::after(&batch),
                &group,
                &mut s,
                &HEALTH,
            )
            .await
            {
                break;
            }
            summary.consumed += batch.len() as u64;
            for d in &handled.decided {
                metrics.match_decided(d.outcome.reason.name());
                *summary
                    .decided
                    .entry(d.outcome.reason.name().to_owned())
                    .or_default() += 1;
            }
            for d in &handled.dead {
                *summary
                    .dead_letters
                    .entry(d.reason.to_string())
                    .or_default() += 1;
            }
            metrics.stage(STAGE, handled.decided.len() as u64);
            HEALTH.recovered();
        }
        parts.matcher.flush_enrich_stats().await;
        consumer.close().await?;
        Ok(())
    }
    .await;
    if let Some(w) = watcher {
        w.abort();
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.profiles_per_second = summary.consumed as f64 / summary.seconds.max(1e-9);
    result?;
    stop.check()?;
    Ok(summary)
}

/// A poll's decisions and dead letters, written.
struct Handled {
    decided: Vec<Decided>,
    dead: Vec<dlq::DeadLetter>,
}

/// Matches a poll's profiles and writes everything; None if shutdown was
/// asked for while a backend kept failing (nothing is committed then).
async fn handle(
    parts: &Parts,
    batch: &[Message],
    concurrency: usize,
    stop: &Stop,
    cache_ttl: Option<Duration>,
) -> crate::Result<Option<Handled>> {
    let mut dead = Vec::new();
    let mut profiles = Vec::new();
    for m in batch {
        match parse_profile(&m.value) {
            Ok(p) => profiles.push(p),
            Err(r) => {
                dead.push(dead_letter(STAGE, m, r));
            }
        }
    }
    let outcomes: Vec<crate::Result<Option<Outcome>>> =
        super::unordered_map(profiles.iter().collect(), concurrency, |p| {
            decide(&parts.matcher, p, stop)
        })
        .await;
    let mut decided = Vec::with_capacity(outcomes.len());
    for (p, o) in profiles.into_iter().zip(outcomes) {
        // A refused enrichment key stops the stage: nothing of the poll is
        // committed, and the exit is non-zero.
        let Some(outcome) = o? else { return Ok(None) };
        decided.push(Decided {
            profile: p,
            outcome,
            at_ms: crate::now_ms(),
        });
    }
    let records: Vec<_> = decided.iter().map(Decided::record).collect();
    let writes = async {
        decided.is_empty()
            || retry(
                stop,
                &HEALTH,
                "write matches to the tables and the cache",
                || sink::write(&parts.table, &parts.cache, &decided, cache_ttl),
            )
            .await
    };
    let produce = async {
        records.is_empty()
            || retry(stop, &HEALTH, "produce to sift.matches", || {
                parts.log.produce(topics::MATCHES, records.clone())
            })
            .await
    };
    let dead_sent = async {
        dead.is_empty()
            || retry(stop, &HEALTH, "send dead letters to sift.dlq", || {
                dlq::send(parts.log.as_ref(), parts.objects.as_ref(), &dead)
            })
            .await
    };
    let (a, b, c) = tokio::join!(writes, produce, dead_sent);
    if !(a && b && c) {
        return Ok(None);
    }
    Ok(Some(Handled { decided, dead }))
}

/// Matches one profile, retrying while the search index or the table of
/// enrichment answers fails; None if
/// shutdown was asked for meanwhile; an error when retrying cannot help
/// (the enrichment API refused the key).
async fn decide(matcher: &Matcher, p: &ProfileIn, stop: &Stop) -> crate::Result<Option<Outcome>> {
    let mut s = stop.clone();
    let mut backoff = Backoff::new(&HEALTH);
    loop {
        match matcher.match_profile(p).await {
            Ok(o) => return Ok(Some(o)),
            Err(e @ super::matcher::MatchError::EnrichmentKey(_)) => {
                return Err(crate::Error::Invalid(e.to_string()))
            }
            Err(e) => {
                let what = match e {
                    super::matcher::MatchError::EnrichmentStore(_) => {
                        "read the table of enrichment answers"
                    }
                    _ => "search the consumer database",
                };
                if !backoff.wait(&mut s, what, &e).await {
                    return Ok(None);
                }
            }
        }
    }
}
