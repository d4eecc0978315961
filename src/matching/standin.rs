//! A local stand-in for the enrichment API, following its request and
//! response format (FullContact Person Enrich v3), for tests and benchmarks
//! that must not spend money on the real one.
//!
//! It answers from canned [`Answer`]s (a JSON-lines file `sift dbusa
//! generate` writes, or a list built by a test), looked up by network and
//! handle, else by any email. An answer can carry a script of statuses served
//! to repeated requests (`[202, 200]`: queued first, then found), so the
//! client's re-asks and retries run against real HTTP. It counts what it
//! serves, so a test can check that the same handle was not paid for twice.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::enrich::{RateLimiter, ENRICH_PATH};
use crate::dbusa::person::Answer;

/// How the stand-in behaves beyond its answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandInOptions {
    /// Requests per minute beyond which it answers 429 (bursts of one second's
    /// worth allowed); 0 = no limit.
    pub rate_per_minute: u32,
    /// The `Retry-After` (seconds) of its 429 answers; 0 makes tests fast.
    pub retry_after_secs: u64,
}

impl Default for StandInOptions {
    fn default() -> Self {
        StandInOptions {
            rate_per_minute: 0,
            retry_after_secs: 1,
        }
    }
}

/// What the server shares between requests.
struct Shared {
    api_key: String,
    answers: Vec<Answer>,
    by_profile: HashMap<(String, String), usize>,
    by_email: HashMap<String, usize>,
    limiter: Option<RateLimiter>,
    retry_after_secs: u64,
    /// Requests served so far per answer (the position in its script).
    served: parking_lot::Mutex<HashMap<usize, usize>>,
    total: AtomicU64,
    /// Well-formed, authorised requests per (service, lowercased username).
    per_profile: parking_lot::Mutex<HashMap<(String, String), u64>>,
    statuses: parking_lot::Mutex<BTreeMap<u16, u64>>,
}

/// A running stand-in server.
pub struct StandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl fmt::Debug for StandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandIn")
            .field("addr", &self.addr)
            .field("answers", &self.shared.answers.len())
            .field("requests", &self.requests())
            .finish_non_exhaustive()
    }
}

impl StandIn {
    /// The base URL to configure as `enrich.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received, whatever was answered.
    pub fn requests(&self) -> u64 {
        self.shared.total.load(Ordering::Relaxed)
    }

    /// Authorised, well-formed requests that asked for this profile (the
    /// username without regard to case), whatever was answered.
    pub fn requests_for(&self, service: &str, username: &str) -> u64 {
        self.shared
            .per_profile
            .lock()
            .get(&profile_key(service, username))
            .copied()
            .unwrap_or(0)
    }

    /// How many answers of each HTTP status were served.
    pub fn statuses(&self) -> BTreeMap<u16, u64> {
        self.shared.statuses.lock().clone()
    }

    /// Answers it holds.
    pub fn answers(&self) -> usize {
        self.shared.answers.len()
    }

    /// Stops accepting requests, lets those in flight finish (for at most 5
    /// seconds), and returns.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "The enrichment stand-in stopped with an error.")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "The enrichment stand-in's task failed."),
            Err(_) => {
                tracing::warn!("The enrichment stand-in did not stop within 5 s; closing it.");
                task.abort();
            }
        }
    }
}

fn profile_key(service: &str, username: &str) -> (String, String) {
    (
        service.trim().to_lowercase(),
        username.trim().to_lowercase(),
    )
}

/// Starts a stand-in on `addr` (port 0 picks a free one) that accepts
/// `Authorization: Bearer {api_key}` and answers from `answers` (the first
/// answer of a key wins).
pub async fn start(
    addr: SocketAddr,
    api_key: String,
    answers: Vec<Answer>,
    options: StandInOptions,
) -> crate::Result<StandIn> {
    if api_key.trim().is_empty() {
        return Err(crate::Error::Invalid(
            "the enrichment stand-in needs a non-empty API key to expect from clients".into(),
        ));
    }
    let mut by_profile = HashMap::new();
    let mut by_email = HashMap::new();
    for (i, a) in answers.iter().enumerate() {
        if let Some(bad) = a.statuses.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(crate::Error::Invalid(format!(
                "the stand-in answer for {}:{} scripts status {bad}; use HTTP statuses (e.g. 200, 202, 404, 429, 503)",
                a.service, a.username
            )));
        }
        if !a.username.trim().is_empty() {
            by_profile
                .entry(profile_key(&a.service, &a.username))
                .or_insert(i);
        }
        for e in &a.emails {
            by_email.entry(e.trim().to_lowercase()).or_insert(i);
        }
    }
    let shared = Arc::new(Shared {
        api_key,
        answers,
        by_profile,
        by_email,
        limiter: (options.rate_per_minute > 0)
            .then(|| RateLimiter::per_minute(options.rate_per_minute)),
        retry_after_secs: options.retry_after_secs,
        served: parking_lot::Mutex::new(HashMap::new()),
        total: AtomicU64::new(0),
        per_profile: parking_lot::Mutex::new(HashMap::new()),
        statuses: parking_lot::Mutex::new(BTreeMap::new()),
    });
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        crate::Error::io(
            format!("cannot listen on {addr} for the enrichment stand-in; pick another --listen address"),
            e,
        )
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| crate::Error::io("reading the stand-in's address", e))?;
    let app = Router::new()
        .route(ENRICH_PATH, post(enrich))
        .with_state(Arc::clone(&shared));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(url = %format!("http://{bound}"), answers = shared.answers.len(), "The enrichment stand-in is listening.");
    Ok(StandIn {
        addr: bound,
        shared,
        stop,
        task,
    })
}

/// `POST /v3/person.enrich`.
async fn enrich(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    s.total.fetch_add(1, Ordering::Relaxed);
    let (status, body) = s.answer(&headers, &body);
    *s.statuses.lock().entry(status).or_default() += 1;
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (
        code,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response();
    if status == 429 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s.retry_after_secs));
    }
    response
}

fn error_body(status: u16, message: &str) -> Value {
    json!({ "status": status, "message": message })
}

impl Shared {
    /// The status and body for one request.
    fn answer(&self, headers: &HeaderMap, body: &[u8]) -> (u16, Value) {
        let expected = format!("Bearer {}", self.api_key);
        let authorised = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == expected);
        if !authorised {
            return (
                401,
                error_body(
                    401,
                    "Invalid access token: send Authorization: Bearer <API key>.",
                ),
            );
        }
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return (400, error_body(400, "The request body is not valid JSON."));
        };
        let strings = |field: &str| -> Vec<String> {
            request
                .get(field)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(|s| s.trim().to_lowercase())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let profiles: Vec<(String, String)> = request
            .get("profiles")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| {
                        let service = p.get("service")?.as_str()?;
                        let username = p.get("username")?.as_str()?;
                        (!username.trim().is_empty()).then(|| profile_key(service, username))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let emails = strings("emails");
        let phones = strings("phones");
        if profiles.is_empty() && emails.is_empty() && phones.is_empty() {
            return (
                400,
                error_body(
                    400,
                    "The request needs at least one of profiles (service and username), emails or phones.",
                ),
            );
        }
        {
            let mut counts = self.per_profile.lock();
            for key in &profiles {
                *counts.entry(key.clone()).or_default() += 1;
            }
        }
        if let Some(limiter) = &self.limiter {
            if !limiter.try_acquire(tokio::time::Instant::now()) {
                return (429, error_body(429, "Rate limit exceeded."));
            }
        }
        let found = profiles
            .iter()
            .find_map(|k| self.by_profile.get(k))
            .or_else(|| emails.iter().find_map(|e| self.by_email.get(e)))
            .copied();
        let Some(i) = found else {
            return (404, error_body(404, "Profile not found"));
        };
        let answer = &self.answers[i];
        let status = {
            let mut served = self.served.lock();
            let n = served.entry(i).or_default();
            let status = match answer.statuses.len() {
                0 => 200,
                len => answer.statuses[(*n).min(len - 1)],
            };
            *n += 1;
            status
        };
        let body = match status {
            200 => answer.person.clone(),
            202 => error_body(202, "Queued for search. Try again later."),
            404 => error_body(404, "Profile not found"),
            429 => error_body(429, "Rate limit exceeded."),
            503 => error_body(503, "Service temporarily unavailable."),
            other => error_body(other, "Scripted answer."),
        };
        (status, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_scripts_and_empty_keys_are_refused() {
        let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        let bad = Answer {
            service: "twitter".into(),
            username: "a".into(),
            emails: vec![],
            statuses: vec![200, 42],
            person: json!({}),
        };
        assert!(
            start(addr, "k".into(), vec![bad], StandInOptions::default())
                .await
                .is_err()
        );
        assert!(start(addr, " ".into(), vec![], StandInOptions::default())
            .await
            .is_err());
    }
}
