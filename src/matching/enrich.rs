//! The enrichment API client (FullContact Person Enrich v3).
//!
//! `sift match` calls it for profiles that show no usable name or location:
//! the API may know the person behind a handle (or an email, or a phone) and
//! answer with a name and a home location to search the database with.
//!
//! Every lookup costs money, so it is paid once:
//! - answers (found and not found, with when they were fetched) are stored
//!   durably in the table `enrichment` ([`AnswerStore`], row = network and
//!   handle), with the cache in front; found people stay good for
//!   `cache_ttl`, misses for `not_found_ttl`, across restarts;
//! - one request is in flight per handle: concurrent lookups of the same
//!   handle wait for the first and take its answer;
//! - a refused key (401, 403) is [`EnrichError::KeyRefused`], which stops
//!   `sift match` with a non-zero exit instead of marking every profile.
//!
//! One [`Enricher`] keeps its callers under the account's rate with a shared
//! [`RateLimiter`] and counts what it paid and what it reused
//! ([`EnrichStats`], flushed to the table for `sift enrich stats`). The API
//! key travels only in the `Authorization` header: it is never logged, shown
//! by `Debug`, or put in an error message.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::backends::table::{RowPut, Table, TableError};
use crate::backends::Cache;
use crate::config::EnrichConfig;
use crate::dbusa::names;

/// Cache namespace of enrichment answers.
pub const CACHE_NAMESPACE: &str = "enrich";

/// The path the client posts to, after the configured base URL.
pub const ENRICH_PATH: &str = "/v3/person.enrich";

/// First wait after a 429 or 5xx; doubled at each further attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// How long an answer just paid for is offered to a failing table before it
/// is left in the cache only.
const STORE_PATIENCE: Duration = Duration::from_secs(120);
/// The longest wait between two attempts computed by the backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A `Retry-After` longer than this is not waited for: the lookup is reported
/// as unavailable so the caller can move on.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// One profile to look up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrichRequest {
    /// The network, as the API names it (`twitter`, `instagram`, `facebook`,
    /// `linkedin`, `tiktok`).
    pub network: String,
    /// The handle on that network.
    pub handle: String,
    /// An email known for the profile, sent along when present.
    pub email: Option<String>,
    /// A phone known for the profile (E.164 preferred), sent along when present.
    pub phone: Option<String>,
}

impl EnrichRequest {
    /// The cache key: `{network}:{lowercased handle}`; a profile without a
    /// handle is keyed by its email or phone instead.
    pub fn cache_key(&self) -> String {
        let handle = self.handle.trim().to_lowercase();
        if !handle.is_empty() {
            return format!("{}:{handle}", self.network);
        }
        match (&self.email, &self.phone) {
            (Some(e), _) if !e.trim().is_empty() => {
                format!("{}:email:{}", self.network, e.trim().to_lowercase())
            }
            (_, Some(p)) if !p.trim().is_empty() => format!("{}:phone:{}", self.network, p.trim()),
            _ => format!("{}:", self.network),
        }
    }

    /// The JSON body the API expects: the profile, and emails and phones only
    /// when known.
    pub fn body(&self) -> Value {
        let mut body = serde_json::Map::new();
        if !self.handle.trim().is_empty() {
            body.insert(
                "profiles".into(),
                serde_json::json!([{ "service": self.network, "username": self.handle.trim() }]),
            );
        }
        if let Some(e) = self.email.as_deref().filter(|e| !e.trim().is_empty()) {
            body.insert("emails".into(), serde_json::json!([e.trim()]));
        }
        if let Some(p) = self.phone.as_deref().filter(|p| !p.trim().is_empty()) {
            body.insert("phones".into(), serde_json::json!([p.trim()]));
        }
        Value::Object(body)
    }
}

/// What the API knows about a person, reduced to what matching uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrichedPerson {
    /// Full name as the API writes it.
    pub full_name: Option<String>,
    /// Given name.
    pub given: Option<String>,
    /// Family name.
    pub family: Option<String>,
    /// City of the first (home) location.
    pub city: Option<String>,
    /// Two-letter US state code (upper case) of that location, when known.
    pub region_code: Option<String>,
    /// That location as one line (`Saint Paul, Minnesota, United States`).
    pub location: Option<String>,
    /// Email addresses.
    pub emails: Vec<String>,
    /// Phone numbers.
    pub phones: Vec<String>,
}

impl EnrichedPerson {
    /// Reads a 200 answer's body leniently: every field is optional, fields of
    /// an unexpected type count as missing, unknown fields are ignored.
    pub fn from_api(body: &Value) -> Self {
        let text = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let details = body.get("details");
        let name = details.and_then(|d| d.get("name"));
        let given = text(name.and_then(|n| n.get("given")));
        let family = text(name.and_then(|n| n.get("family")));
        let full_name = text(name.and_then(|n| n.get("full")))
            .or_else(|| text(body.get("fullName")))
            .or_else(|| match (&given, &family) {
                (Some(g), Some(f)) => Some(format!("{g} {f}")),
                _ => None,
            });
        let values = |field: &str| -> Vec<String> {
            details
                .and_then(|d| d.get(field))
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| text(i.get("value")).or_else(|| text(Some(i))))
                        .collect()
                })
                .unwrap_or_default()
        };
        let emails = values("emails");
        let phones = values("phones");

        // The home location first, else the first one listed.
        let locations: Vec<&Value> = details
            .and_then(|d| d.get("locations"))
            .and_then(Value::as_array)
            .map(|l| l.iter().filter(|v| v.is_object()).collect())
            .unwrap_or_default();
        let home = locations
            .iter()
            .find(|l| text(l.get("label")).as_deref() == Some("home"))
            .or(locations.first())
            .copied();
        let (mut city, mut region_code, mut location) = (None, None, None);
        if let Some(l) = home {
            city = text(l.get("city"));
            let us = text(l.get("countryCode"))
                .map(|c| c.eq_ignore_ascii_case("us"))
                .unwrap_or(true);
            region_code = text(l.get("regionCode"))
                .filter(|c| us && c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()))
                .or_else(|| {
                    text(l.get("region"))
                        .filter(|_| us)
                        .and_then(|r| names::state_code(&names::normalize(&r)))
                        .map(str::to_owned)
                })
                .map(|c| c.to_ascii_uppercase());
            location = text(l.get("formatted")).or_else(|| {
                let parts: Vec<String> = ["city", "region", "country"]
                    .iter()
                    .filter_map(|f| text(l.get(*f)))
                    .collect();
                (!parts.is_empty()).then(|| parts.join(", "))
            });
        }
        if location.is_none() {
            location = text(body.get("location"));
            // Only the one-line form: take what can be recognised from it.
            if let Some(line) = &location {
                let place = names::parse_location(line);
                if city.is_none() && !place.city.is_empty() {
                    city = Some(place.city.clone());
                }
                if region_code.is_none() && !place.state.is_empty() {
                    region_code = Some(place.state.to_ascii_uppercase());
                }
            }
        }
        EnrichedPerson {
            full_name,
            given,
            family,
            city,
            region_code,
            location,
            emails,
            phones,
        }
    }
}

/// The outcome of a lookup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "person", rename_all = "snake_case")]
pub enum Enrichment {
    /// The API knows the person.
    Found(EnrichedPerson),
    /// The API queued the lookup and had no answer yet after the configured
    /// re-asks; ask again later (not cached).
    Pending,
    /// The API does not know the profile.
    NotFound,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrichSource {
    /// The cache: nothing was paid for.
    Cache,
    /// The table of stored answers (paid for before, perhaps by another
    /// instance or an earlier run): nothing was paid for.
    Stored,
    /// The API was called.
    Api,
}

impl EnrichSource {
    /// Whether this answer cost a call.
    pub fn paid(self) -> bool {
        self == EnrichSource::Api
    }
}

impl fmt::Display for EnrichSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnrichSource::Cache => "cache",
            EnrichSource::Stored => "stored",
            EnrichSource::Api => "api",
        })
    }
}

/// The table of answers paid for.
pub const TABLE: &str = "enrichment";
/// Its one column family.
pub const FAMILY: &str = "e";
/// Row-key prefix of each instance's counters (`~` sorts after every
/// network name, so answers and counters never mix in a scan).
pub const STATS_PREFIX: &str = "~stats/";

/// This process's name among the instances that write counters: host,
/// process id and start time, so a restart counts as a new instance and
/// nothing counted before is overwritten.
pub fn instance() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".to_owned());
        format!("{host}-{}-{}", std::process::id(), crate::now_ms())
    })
}

/// An answer as stored: what the API said, when, and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    /// Found or not found (pending answers are not stored).
    pub answer: Enrichment,
    /// When it was fetched, ms since the Unix epoch.
    pub fetched_at_ms: i64,
    /// Calls it took (re-asks of a queued lookup included).
    pub calls: u64,
}

/// Answers kept durably in the table `enrichment`, one row per
/// [`EnrichRequest::cache_key`]: `e:answer` (JSON), `e:fetched_at_ms`,
/// `e:calls`. The cache in front of it is only a cache.
#[derive(Clone)]
pub struct AnswerStore {
    table: Arc<dyn Table>,
}

impl fmt::Debug for AnswerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnswerStore").finish_non_exhaustive()
    }
}

impl AnswerStore {
    /// The store in `table`, created on first use.
    pub async fn open(table: Arc<dyn Table>) -> Result<Self, TableError> {
        table.ensure_table(TABLE, &[FAMILY]).await?;
        Ok(AnswerStore { table })
    }

    /// The stored answer for `key`; None when there is none or it cannot be
    /// read (then it is asked again, and overwritten).
    pub async fn get(&self, key: &str) -> Result<Option<StoredAnswer>, TableError> {
        let Some(row) = self.table.get(TABLE, key.as_bytes(), None).await? else {
            return Ok(None);
        };
        let text = |q: &str| {
            row.get(FAMILY, q.as_bytes())
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let answer = text("answer").and_then(|a| serde_json::from_str::<Enrichment>(&a).ok());
        let fetched = text("fetched_at_ms").and_then(|t| t.parse::<i64>().ok());
        Ok(match (answer, fetched) {
            (Some(answer), Some(fetched_at_ms)) => Some(StoredAnswer {
                answer,
                fetched_at_ms,
                calls: text("calls").and_then(|c| c.parse().ok()).unwrap_or(1),
            }),
            _ => {
                tracing::warn!(key, "Ignoring an unreadable stored enrichment answer.");
                None
            }
        })
    }

    /// Stores an answer (found or not found) under `key`.
    pub async fn put(&self, key: &str, stored: &StoredAnswer) -> Result<(), TableError> {
        let answer = serde_json::to_string(&stored.answer).unwrap_or_default();
        let row = RowPut::new(key.to_owned())
            .cell(FAMILY, "answer", answer)
            .cell(FAMILY, "fetched_at_ms", stored.fetched_at_ms.to_string())
            .cell(FAMILY, "calls", stored.calls.to_string());
        self.table.put(TABLE, vec![row]).await
    }

    /// Writes one instance's counters (its own row, overwritten each time).
    pub async fn put_stats(&self, instance: &str, stats: &EnrichStats) -> Result<(), TableError> {
        let row = RowPut::new(format!("{STATS_PREFIX}{instance}")).cell(
            FAMILY,
            "stats",
            serde_json::to_vec(stats).unwrap_or_default(),
        );
        self.table.put(TABLE, vec![row]).await
    }

    /// What the table holds: answers by outcome, calls paid for them, and
    /// every instance's counters added up.
    pub async fn summary(&self) -> Result<StoreSummary, TableError> {
        let mut summary = StoreSummary::default();
        crate::backends::table::scan_pages(self.table.as_ref(), TABLE, None, 1000, |row| {
            if row.key.starts_with(STATS_PREFIX.as_bytes()) {
                summary.instances += 1;
                let each: EnrichStats = row
                    .get(FAMILY, b"stats")
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or_default();
                summary.counted.add(&each);
                return;
            }
            let answer = row
                .get(FAMILY, b"answer")
                .and_then(|a| serde_json::from_slice::<Enrichment>(a).ok());
            match answer {
                Some(Enrichment::Found(_)) => summary.found += 1,
                Some(Enrichment::NotFound) => summary.not_found += 1,
                _ => summary.unreadable += 1,
            }
            summary.stored_calls += row
                .get(FAMILY, b"calls")
                .and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok())
                .unwrap_or(1);
        })
        .await?;
        Ok(summary)
    }
}

/// What one [`Enricher`] did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EnrichStats {
    /// Lookups asked of it.
    pub lookups: u64,
    /// Answered by the cache.
    pub cache_hits: u64,
    /// Answered by the table of stored answers.
    pub stored_hits: u64,
    /// Answered by waiting for the same handle's lookup in flight.
    pub joined: u64,
    /// Requests sent to the API (each retry and re-ask counts: each may be
    /// billed).
    pub calls: u64,
    /// Lookups that ended in an error.
    pub failed: u64,
}

impl EnrichStats {
    fn add(&mut self, other: &EnrichStats) {
        self.lookups += other.lookups;
        self.cache_hits += other.cache_hits;
        self.stored_hits += other.stored_hits;
        self.joined += other.joined;
        self.calls += other.calls;
        self.failed += other.failed;
    }

    /// Share of lookups answered without a call (cache, table, or a
    /// lookup in flight); None before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        (self.lookups > 0).then(|| {
            (self.cache_hits + self.stored_hits + self.joined) as f64 / self.lookups as f64
        })
    }
}

/// The table's contents, for `sift enrich stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StoreSummary {
    /// Stored answers that found a person.
    pub found: u64,
    /// Stored answers that found no one.
    pub not_found: u64,
    /// Rows that could not be read.
    pub unreadable: u64,
    /// Calls the stored answers took.
    pub stored_calls: u64,
    /// Instances that flushed counters.
    pub instances: u64,
    /// Their counters, added up.
    pub counted: EnrichStats,
}

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    /// The API refused the request or the account (400, 401, 403, 422, ...):
    /// asking again will not help.
    #[error("the enrichment API rejected the request with status {status}: {message}{}", rejected_hint(.status))]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
    /// The API could not be reached or kept failing (429, 5xx, network)
    /// after every attempt; the profile can be tried again later.
    #[error("the enrichment API is unavailable: {0}")]
    Unavailable(String),
    /// The table of stored answers could not be read: the lookup waits for
    /// it (the caller retries) rather than paying the API for an answer
    /// that may be stored already.
    #[error("the table of enrichment answers could not be read: {0}; the lookup waits for it rather than paying the API again")]
    Store(String),
    /// The API refused the key (401 or 403): every further lookup would
    /// fail the same way, so the matcher stops.
    #[error("the enrichment API refused the key with status {status}: {message} (check enrich.api_key, best set as SIFT__ENRICH__API_KEY, and the account's plan)")]
    KeyRefused {
        /// HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
}

impl From<EnrichError> for crate::Error {
    fn from(e: EnrichError) -> Self {
        crate::Error::Stage(Box::new(e))
    }
}

fn rejected_hint(status: &u16) -> &'static str {
    match status {
        400 | 422 => " (the request was malformed: check the network name and the handle)",
        _ => "",
    }
}

/// A rate limit shared by concurrent callers: the generic cell rate algorithm
/// (a token bucket kept as one timestamp).
///
/// Requests are spaced `60 s / per_minute` apart on average, and up to
/// `burst` requests may go at once after a quiet spell. [`Enricher`] uses a
/// burst of one second's worth of requests (at least 1).
pub struct RateLimiter {
    /// Time between two requests at the sustained rate.
    interval: Duration,
    /// How far ahead of the sustained rate a burst may run.
    tolerance: Duration,
    /// The theoretical arrival time of the next request at the sustained
    /// rate; None before the first one.
    next: parking_lot::Mutex<Option<Instant>>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("interval", &self.interval)
            .field("tolerance", &self.tolerance)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limit of `per_minute` requests per minute allowing bursts of `burst`;
    /// `per_minute = 0` means no limit.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let interval = if per_minute == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(60) / per_minute
        };
        RateLimiter {
            interval,
            tolerance: interval * burst.max(1).saturating_sub(1),
            next: parking_lot::Mutex::new(None),
        }
    }

    /// Sustained requests per minute with a burst of one second's worth.
    pub fn per_minute(per_minute: u32) -> Self {
        Self::new(per_minute, (per_minute / 60).max(1))
    }

    /// Reserves a slot for a request made at `now` and returns how long the
    /// caller must wait before sending it. Reservations are handed out in
    /// call order, so concurrent callers queue fairly.
    pub fn reserve(&self, now: Instant) -> Duration {
        if self.interval.is_zero() {
            return Duration::ZERO;
        }
        let mut next = self.next.lock();
        let tat = next.map_or(now, |t| t.max(now));
        let allowed_at = tat.checked_sub(self.tolerance).unwrap_or(now);
        *next = Some(tat + self.interval);
        allowed_at.saturating_duration_since(now)
    }

    /// Takes a slot only if one is free at `now` (for a server that answers
    /// 429 instead of making clients wait).
    pub fn try_acquire(&self, now: Instant) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        let mut next = self.next.lock();
        let tat = next.map_or(now, |t| t.max(now));
        let allowed_at = tat.checked_sub(self.tolerance).unwrap_or(now);
        if allowed_at > now {
            return false;
        }
        *next = Some(tat + self.interval);
        true
    }

    /// Waits for a slot; returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let wait = self.reserve(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        wait
    }
}

/// The enrichment client: cache first, then the API under the rate limit,
/// with re-asks for queued lookups and backoff on 429 and 5xx.
///
/// Cheap to share: put it in an `Arc` and call it from many tasks.
pub struct Enricher {
    http: reqwest::Client,
    endpoint: String,
    /// `Bearer {key}`, marked sensitive; the only copy of the key.
    authorization: HeaderValue,
    limiter: RateLimiter,
    cache: Arc<dyn Cache>,
    max_attempts: u32,
    pending_attempts: u32,
    pending_wait: Duration,
    cache_ttl: Duration,
    not_found_ttl: Duration,
    /// Answers paid for, kept across restarts; None = the cache alone.
    store: Option<AnswerStore>,
    /// One gate per handle with a lookup in flight.
    in_flight: parking_lot::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    counters: parking_lot::Mutex<EnrichStats>,
}

impl fmt::Debug for Enricher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enricher")
            .field("endpoint", &self.endpoint)
            .field("api_key", &"[redacted]")
            .field("limiter", &self.limiter)
            .field("max_attempts", &self.max_attempts)
            .field("pending_attempts", &self.pending_attempts)
            .field("pending_wait", &self.pending_wait)
            .field("cache_ttl", &self.cache_ttl)
            .field("not_found_ttl", &self.not_found_ttl)
            .finish_non_exhaustive()
    }
}

/// One answer of the API, before re-asks.
enum Reply {
    Found(EnrichedPerson),
    Queued,
    NotFound,
}

impl Enricher {
    /// The client the configuration describes; `None` when `api_key` is empty
    /// (enrichment off).
    pub fn new(config: &EnrichConfig, cache: Arc<dyn Cache>) -> Result<Option<Self>, EnrichError> {
        let key = config.api_key.trim();
        if key.is_empty() {
            return Ok(None);
        }
        let base = config.url.trim().trim_end_matches('/');
        let endpoint = format!("{base}{ENRICH_PATH}");
        let parsed = url::Url::parse(&endpoint).map_err(|e| {
            EnrichError::Unavailable(format!(
                "enrich.url `{}` is not a usable URL ({e}); set it to the API's base, e.g. https://api.fullcontact.com",
                config.url
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(EnrichError::Unavailable(format!(
                "enrich.url `{}` must start with https:// (or http:// for a local stand-in)",
                config.url
            )));
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            EnrichError::Unavailable(
                "enrich.api_key contains characters an HTTP header cannot carry; set it to the key as issued"
                    .into(),
            )
        })?;
        authorization.set_sensitive(true);
        let timeout = if config.timeout.is_zero() {
            Duration::from_secs(10)
        } else {
            config.timeout
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .user_agent(concat!("sift/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| EnrichError::Unavailable(format!("cannot build the HTTP client: {e}")))?;
        Ok(Some(Enricher {
            http,
            endpoint,
            authorization,
            limiter: RateLimiter::per_minute(config.rate_per_minute),
            cache,
            max_attempts: config.max_attempts.max(1),
            pending_attempts: config.pending_attempts,
            pending_wait: config.pending_wait,
            cache_ttl: config.cache_ttl,
            not_found_ttl: config.not_found_ttl,
            store: None,
            in_flight: parking_lot::Mutex::new(std::collections::HashMap::new()),
            counters: parking_lot::Mutex::new(EnrichStats::default()),
        }))
    }

    /// Keeps answers in `store` too, so they outlive the cache and the
    /// process.
    pub fn with_store(mut self, store: AnswerStore) -> Self {
        self.store = Some(store);
        self
    }

    /// What this client did since it started.
    pub fn stats(&self) -> EnrichStats {
        *self.counters.lock()
    }

    fn count(&self, counter: impl FnOnce(&mut EnrichStats) -> &mut u64) {
        *counter(&mut self.counters.lock()) += 1;
    }

    /// Writes this client's counters to the table (row `~stats/INSTANCE`),
    /// for `sift enrich stats`; nothing without a store.
    pub async fn flush_stats(&self, instance: &str) -> Result<(), TableError> {
        match &self.store {
            Some(store) => store.put_stats(instance, &self.stats()).await,
            None => Ok(()),
        }
    }

    /// The URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Looks a profile up: from the cache, else the table of stored answers,
    /// else (one lookup per handle at a time) from the API. Found people and
    /// misses are stored and cached; pending lookups are not.
    #[tracing::instrument(name = "enrich", skip_all, fields(network = %req.network, handle = %req.handle))]
    pub async fn enrich(
        &self,
        req: &EnrichRequest,
    ) -> Result<(Enrichment, EnrichSource), EnrichError> {
        self.count(|c| &mut c.lookups);
        let key = req.cache_key();
        let known = self.known(&key).await;
        if known.is_err() {
            self.count(|c| &mut c.failed);
        }
        if let Some(hit) = known? {
            match hit.1 {
                EnrichSource::Stored => self.count(|c| &mut c.stored_hits),
                _ => {
                    crate::metrics::global().enrich_cache_hit();
                    self.count(|c| &mut c.cache_hits);
                }
            }
            return Ok(hit);
        }
        if req.body().as_object().is_none_or(|b| b.is_empty()) {
            self.count(|c| &mut c.failed);
            return Err(EnrichError::Rejected {
                status: 400,
                message: "the profile has no handle, email or phone to look up".into(),
            });
        }
        // One lookup per handle in flight: the others wait here, then find
        // its answer stored.
        let gate = Arc::clone(self.in_flight.lock().entry(key.clone()).or_default());
        let result = {
            let _turn = gate.lock().await;
            // Whoever held the handle before may have paid for it meanwhile.
            match self.known(&key).await {
                Ok(Some(hit)) => {
                    self.count(|c| &mut c.joined);
                    Ok(hit)
                }
                Ok(None) => self.fetch(req, &key).await,
                Err(e) => Err(e),
            }
        };
        self.release(&key, &gate);
        if result.is_err() {
            self.count(|c| &mut c.failed);
        }
        result
    }

    /// Forgets a handle's gate once nobody else holds it.
    fn release(&self, key: &str, gate: &Arc<tokio::sync::Mutex<()>>) {
        let mut in_flight = self.in_flight.lock();
        // The map's reference and ours: no one else waits.
        if Arc::strong_count(gate) <= 2 {
            in_flight.remove(key);
        }
    }

    /// The answer already paid for: the cache's, else a fresh stored one
    /// (which goes back into the cache). Counted by the caller. A table that
    /// cannot be read is an error, not a miss: a miss would pay again.
    async fn known(&self, key: &str) -> Result<Option<(Enrichment, EnrichSource)>, EnrichError> {
        match self.cache.get(CACHE_NAMESPACE, key).await {
            Ok(Some(bytes)) => match serde_json::from_slice::<Enrichment>(&bytes) {
                Ok(e) => return Ok(Some((e, EnrichSource::Cache))),
                Err(e) => tracing::warn!(error = %e, "Ignoring an unreadable cached enrichment."),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "The enrichment cache failed; reading the table."),
        }
        let Some(store) = self.store.as_ref() else {
            return Ok(None);
        };
        let Some(stored) = store
            .get(key)
            .await
            .map_err(|e| EnrichError::Store(e.to_string()))?
        else {
            return Ok(None);
        };
        let ttl = self.ttl(&stored.answer);
        let age = Duration::from_millis(
            u64::try_from(crate::now_ms().saturating_sub(stored.fetched_at_ms)).unwrap_or(0),
        );
        if age >= ttl {
            return Ok(None);
        }
        self.cache_answer(key, &stored.answer, ttl - age).await;
        Ok(Some((stored.answer, EnrichSource::Stored)))
    }

    /// Stores an answer just paid for, trying again while the table fails
    /// (a Thrift gateway restarting), for up to [`STORE_PATIENCE`]; after
    /// that the answer stays in the cache only, and an error says so.
    async fn store_answer(&self, store: &AnswerStore, key: &str, stored: &StoredAnswer) {
        let started = Instant::now();
        let mut wait = FIRST_BACKOFF;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match store.put(key, stored).await {
                Ok(()) => {
                    if attempts > 1 {
                        tracing::info!(
                            attempts,
                            "Stored an enrichment answer after the table came back."
                        );
                    }
                    return;
                }
                Err(e) if started.elapsed() + wait <= STORE_PATIENCE => {
                    tracing::warn!(error = %e, attempts, retry_in = ?wait, "Could not store an enrichment answer; trying again.");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(error = %e, attempts, "Could not store an enrichment answer; it stays in the cache only, and is paid again once the cache forgets it.");
                    return;
                }
            }
        }
    }

    fn ttl(&self, answer: &Enrichment) -> Duration {
        match answer {
            Enrichment::NotFound => self.not_found_ttl,
            _ => self.cache_ttl,
        }
    }

    async fn cache_answer(&self, key: &str, answer: &Enrichment, ttl: Duration) {
        match serde_json::to_vec(answer) {
            Ok(bytes) => {
                if let Err(e) = self
                    .cache
                    .set(CACHE_NAMESPACE, key, Bytes::from(bytes), Some(ttl))
                    .await
                {
                    tracing::warn!(error = %e, "Could not cache an enrichment answer.");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Could not encode an enrichment answer for the cache.")
            }
        }
    }

    /// Asks the API (with re-asks while the lookup is queued), then stores
    /// and caches the answer.
    async fn fetch(
        &self,
        req: &EnrichRequest,
        key: &str,
    ) -> Result<(Enrichment, EnrichSource), EnrichError> {
        let mut calls = 0u64;
        let mut asked_again = 0;
        let outcome = loop {
            match self.ask(req, &mut calls).await? {
                Reply::Found(p) => break Enrichment::Found(p),
                Reply::NotFound => break Enrichment::NotFound,
                Reply::Queued if asked_again >= self.pending_attempts => {
                    tracing::debug!(
                        asked_again,
                        "The lookup is still queued; reporting it pending."
                    );
                    return Ok((Enrichment::Pending, EnrichSource::Api));
                }
                Reply::Queued => {
                    asked_again += 1;
                    tokio::time::sleep(self.pending_wait).await;
                }
            }
        };
        if let Some(store) = &self.store {
            let stored = StoredAnswer {
                answer: outcome.clone(),
                fetched_at_ms: crate::now_ms(),
                calls,
            };
            self.store_answer(store, key, &stored).await;
        }
        self.cache_answer(key, &outcome, self.ttl(&outcome)).await;
        Ok((outcome, EnrichSource::Api))
    }

    /// One question to the API, attempted up to `max_attempts` times while it
    /// answers 429 or 5xx or cannot be reached.
    /// `calls` counts the requests sent.
    async fn ask(&self, req: &EnrichRequest, calls: &mut u64) -> Result<Reply, EnrichError> {
        let metrics = crate::metrics::global();
        let body = serde_json::to_vec(&req.body())
            .map_err(|e| EnrichError::Unavailable(format!("cannot encode the request: {e}")))?;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let waited = self.limiter.acquire().await;
            if !waited.is_zero() {
                metrics.enrich_rate_limited(waited.as_secs_f64());
            }
            self.count(|c| &mut c.calls);
            *calls += 1;
            let sent = self
                .http
                .post(&self.endpoint)
                .header(AUTHORIZATION, self.authorization.clone())
                .body(body.clone())
                .send()
                .await;
            let (problem, retry_after) = match sent {
                Err(e) => {
                    metrics.enrich_request("error");
                    (
                        format!("cannot reach {}: {}", self.endpoint, describe(&e)),
                        None,
                    )
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    metrics.enrich_request(&status_label(status));
                    let retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = match response.bytes().await {
                        Ok(b) => b,
                        Err(e) => {
                            let problem = format!(
                                "the answer ({status}) could not be read: {}",
                                describe(&e)
                            );
                            if attempt >= self.max_attempts {
                                return Err(EnrichError::Unavailable(self.scrub(problem)));
                            }
                            tracing::warn!(attempt, problem = %self.scrub(problem), "Retrying an enrichment lookup.");
                            self.pause(&mut backoff, None).await;
                            continue;
                        }
                    };
                    match status {
                        200 => {
                            let value: Value = serde_json::from_slice(&text).map_err(|e| {
                                EnrichError::Unavailable(format!(
                                    "the API answered 200 with a body that is not JSON ({e})"
                                ))
                            })?;
                            return Ok(Reply::Found(EnrichedPerson::from_api(&value)));
                        }
                        202 => return Ok(Reply::Queued),
                        404 => return Ok(Reply::NotFound),
                        429 | 500..=599 => (
                            format!("the API answered {status}: {}", self.message(&text)),
                            retry_after,
                        ),
                        401 | 403 => {
                            return Err(EnrichError::KeyRefused {
                                status,
                                message: self.message(&text),
                            })
                        }
                        _ => {
                            return Err(EnrichError::Rejected {
                                status,
                                message: self.message(&text),
                            })
                        }
                    }
                }
            };
            if attempt >= self.max_attempts {
                return Err(EnrichError::Unavailable(format!(
                    "{problem} (gave up after {attempt} attempts)"
                )));
            }
            if retry_after.is_some_and(|r| r > MAX_RETRY_AFTER) {
                return Err(EnrichError::Unavailable(format!(
                    "{problem}, asking to wait {} s, longer than sift waits ({} s); try the profile later",
                    retry_after.map_or(0, |r| r.as_secs()),
                    MAX_RETRY_AFTER.as_secs()
                )));
            }
            tracing::debug!(attempt, problem = %problem, "Retrying an enrichment lookup.");
            self.pause(&mut backoff, retry_after).await;
        }
    }

    /// Sleeps the backoff (half fixed, half random), or `Retry-After` when
    /// that is longer, and doubles the backoff.
    async fn pause(&self, backoff: &mut Duration, retry_after: Option<Duration>) {
        let half = *backoff / 2;
        let jitter = half.mul_f64(rand::rng().random::<f64>());
        let wait = (half + jitter).max(retry_after.unwrap_or_default());
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        tokio::time::sleep(wait).await;
    }

    /// The `message` of an error body, else the body's start; never the key.
    fn message(&self, body: &[u8]) -> String {
        let from_json = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned));
        let message = from_json.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                "no message".to_owned()
            } else {
                text.chars().take(200).collect()
            }
        });
        self.scrub(message)
    }

    /// `text` with the API key, should a server echo it, replaced.
    fn scrub(&self, text: String) -> String {
        let key = self
            .authorization
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if key.len() >= 4 && text.contains(key) {
            text.replace(key, "[redacted]")
        } else {
            text
        }
    }
}

/// A reqwest error with its causes, without the URL's query (none is sent).
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The metric label of an HTTP status: the statuses the API documents, else
/// their class, so the label stays bounded.
fn status_label(status: u16) -> String {
    match status {
        200 | 202 | 400 | 401 | 403 | 404 | 422 | 429 | 500 | 502 | 503 | 504 => status.to_string(),
        400..=499 => "4xx".into(),
        500..=599 => "5xx".into(),
        _ => "other".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_answer_is_read() {
        let body: Value = serde_json::from_str(
            r#"{"fullName": "John Doe", "ageRange": "30-39", "gender": "Male",
            "location": "Saint Paul, Minnesota, United States", "title": null,
            "twitter": "https://twitter.com/jdoe",
            "details": {"name": {"given": "John", "family": "Doe", "full": "John Doe"},
              "age": {"range": {"start": 30, "end": 39}},
              "emails": [{"label": "personal", "value": "john@example.com"}],
              "phones": [{"label": "mobile", "value": "+16515550101"}],
              "profiles": {"twitter": {"username": "jdoe", "service": "twitter"}},
              "locations": [{"label": "work", "city": "Minneapolis", "regionCode": "MN"},
                            {"label": "home", "city": "Saint Paul", "region": "Minnesota",
                             "regionCode": "MN", "country": "United States", "countryCode": "US",
                             "formatted": "Saint Paul, Minnesota, United States"}],
              "employment": [], "photos": []},
            "updated": "2026-05-01", "isSensitive": false, "somethingNew": {"x": 1}}"#,
        )
        .expect("valid JSON");
        let p = EnrichedPerson::from_api(&body);
        assert_eq!(p.full_name.as_deref(), Some("John Doe"));
        assert_eq!(p.given.as_deref(), Some("John"));
        assert_eq!(p.family.as_deref(), Some("Doe"));
        assert_eq!(p.city.as_deref(), Some("Saint Paul"));
        assert_eq!(p.region_code.as_deref(), Some("MN"));
        assert_eq!(
            p.location.as_deref(),
            Some("Saint Paul, Minnesota, United States")
        );
        assert_eq!(p.emails, ["john@example.com"]);
        assert_eq!(p.phones, ["+16515550101"]);
    }

    #[test]
    fn sparse_and_odd_answers_are_read_leniently() {
        let p = EnrichedPerson::from_api(&serde_json::json!({}));
        assert_eq!(p, EnrichedPerson::default());
        // Wrong types count as missing; the state comes from its name; the
        // one-line location stands in for missing details.
        let p = EnrichedPerson::from_api(&serde_json::json!({
            "fullName": 7,
            "details": {"name": "Jane", "emails": "x", "locations": [{"city": "Austin", "region": "Texas"}]}
        }));
        assert_eq!(p.full_name, None);
        assert_eq!(p.city.as_deref(), Some("Austin"));
        assert_eq!(p.region_code.as_deref(), Some("TX"));
        assert_eq!(p.location.as_deref(), Some("Austin, Texas"));
        assert!(p.emails.is_empty());
        let p = EnrichedPerson::from_api(&serde_json::json!({
            "fullName": "Ann Lee", "location": "Boise, ID"
        }));
        assert_eq!(p.full_name.as_deref(), Some("Ann Lee"));
        assert_eq!(p.region_code.as_deref(), Some("ID"));
        assert_eq!(p.city.as_deref(), Some("boise"));
        // A foreign region code is not a US state.
        let p = EnrichedPerson::from_api(&serde_json::json!({
            "details": {"locations": [{"city": "Toronto", "regionCode": "ON", "countryCode": "CA"}]}
        }));
        assert_eq!(p.region_code, None);
    }

    #[test]
    fn requests_carry_only_what_is_known() {
        let mut r = EnrichRequest {
            network: "twitter".into(),
            handle: "JDoe".into(),
            email: None,
            phone: Some(String::new()),
        };
        assert_eq!(
            r.body(),
            serde_json::json!({"profiles": [{"service": "twitter", "username": "JDoe"}]})
        );
        assert_eq!(r.cache_key(), "twitter:jdoe");
        r.email = Some("a@b.com".into());
        r.phone = Some("+16515550101".into());
        assert_eq!(
            r.body(),
            serde_json::json!({"profiles": [{"service": "twitter", "username": "JDoe"}],
                "emails": ["a@b.com"], "phones": ["+16515550101"]})
        );
        r.handle.clear();
        assert_eq!(r.cache_key(), "twitter:email:a@b.com");
    }

    #[test]
    fn enrichments_round_trip_as_json() {
        for e in [
            Enrichment::Found(EnrichedPerson {
                full_name: Some("A B".into()),
                emails: vec!["a@b.c".into()],
                ..EnrichedPerson::default()
            }),
            Enrichment::Pending,
            Enrichment::NotFound,
        ] {
            let json = serde_json::to_string(&e).expect("serialisable");
            assert_eq!(
                serde_json::from_str::<Enrichment>(&json).expect("readable"),
                e
            );
        }
    }

    #[test]
    fn the_bucket_allows_a_burst_then_spaces_requests() {
        // 120 a minute: one every 500 ms, bursts of 2.
        let limiter = RateLimiter::per_minute(120);
        let t0 = Instant::now();
        let waits: Vec<Duration> = (0..6).map(|_| limiter.reserve(t0)).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 0, 500, 1000, 1500, 2000]);
        // After a quiet spell the burst is available again, not more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(limiter.reserve(later), Duration::ZERO);
        assert_eq!(limiter.reserve(later), Duration::ZERO);
        assert_eq!(limiter.reserve(later), Duration::from_millis(500));
    }

    #[test]
    fn try_acquire_refuses_beyond_the_rate() {
        let limiter = RateLimiter::new(60, 3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.try_acquire(t0)));
        assert!(!limiter.try_acquire(t0));
        assert!(!limiter.try_acquire(t0 + Duration::from_millis(900)));
        assert!(limiter.try_acquire(t0 + Duration::from_secs(1)));
        assert!(!limiter.try_acquire(t0 + Duration::from_secs(1)));
        let off = RateLimiter::new(0, 1);
        assert!((0..1000).all(|_| off.try_acquire(t0)));
        assert_eq!(off.reserve(t0), Duration::ZERO);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_bucket() {
        let limiter = Arc::new(RateLimiter::new(600, 1));
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let l = Arc::clone(&limiter);
                tokio::spawn(async move { l.acquire().await })
            })
            .collect();
        let mut waits = Vec::new();
        for t in tasks {
            waits.push(t.await.expect("task"));
        }
        waits.sort_unstable();
        // Each caller got its own slot, 100 ms after the one before (less the
        // moments between the tasks' starts).
        assert_eq!(waits[0], Duration::ZERO, "{waits:?}");
        for (k, w) in waits.iter().enumerate().skip(1) {
            let slot = Duration::from_millis(100 * k as u64);
            assert!(
                *w <= slot && *w + Duration::from_millis(50) > slot,
                "{waits:?}"
            );
        }
        assert!(started.elapsed() >= Duration::from_millis(350));
    }

    #[test]
    fn no_key_means_no_client() -> Result<(), EnrichError> {
        let cache: Arc<dyn Cache> = Arc::new(crate::backends::cache::EmbeddedCache::new(10));
        assert!(Enricher::new(&EnrichConfig::default(), Arc::clone(&cache))?.is_none());
        let config = EnrichConfig {
            api_key: "sk_live_very_secret".into(),
            url: "ftp://example.com".into(),
            ..EnrichConfig::default()
        };
        let err = Enricher::new(&config, Arc::clone(&cache))
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("https://") && !e.contains("very_secret")));
        let config = EnrichConfig {
            url: "http://127.0.0.1:9/".into(),
            ..config
        };
        let enricher =
            Enricher::new(&config, cache)?.ok_or_else(|| EnrichError::Unavailable("off".into()))?;
        assert_eq!(enricher.endpoint(), "http://127.0.0.1:9/v3/person.enrich");
        let debug = format!("{enricher:?}");
        assert!(!debug.contains("very_secret") && debug.contains("[redacted]"));
        Ok(())
    }
}
