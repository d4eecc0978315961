//! Polite HTTP fetching: a global cap on requests in flight, a per-host cap
//! and request rate (a source's `rate_limit`, robots.txt `Crawl-delay`, or
//! `ingest.per_host_rate`), robots.txt honoured, bounded redirects with loop
//! detection, retries with exponential backoff and jitter on timeouts,
//! connection errors, 429 and 5xx (`Retry-After` respected), conditional GET,
//! and bodies read in chunks so one too large is abandoned, not buffered.
//!
//! Redirect hops are followed by the HTTP client within the same request, so
//! the per-host limits and robots.txt apply to the host of the first URL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rand::Rng;
use reqwest::header::{
    HeaderMap, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RETRY_AFTER,
};
use reqwest::StatusCode;
use tokio::sync::Semaphore;
use url::Url;

use crate::config::IngestConfig;

/// The longest `Retry-After` honoured; a server asking for more is retried
/// after this and, if it still refuses, given up on for this pass.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What a successful fetch returned.
#[derive(Debug)]
pub enum Fetched {
    /// A body (status 200).
    Body(Page),
    /// The page has not changed since the validators given (status 304).
    NotModified,
}

/// A fetched page.
#[derive(Debug)]
pub struct Page {
    /// The URL after redirects.
    pub final_url: Url,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The `ETag` header, for the next conditional GET.
    pub etag: Option<String>,
    /// The `Last-Modified` header, for the next conditional GET.
    pub last_modified: Option<String>,
    /// The body.
    pub body: Bytes,
}

/// Why a URL could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// robots.txt disallows it for sift's user agent.
    #[error("robots.txt of {host} disallows it for user agent `{agent}`")]
    Robots {
        /// Host.
        host: String,
        /// User agent matched.
        agent: String,
    },
    /// robots.txt answered 5xx or not at all: crawlers stay away until it does.
    #[error("robots.txt of {host} is unavailable (5xx or unreachable); the host is not crawled until it answers")]
    RobotsUnavailable {
        /// Host.
        host: String,
    },
    /// The server answered with an error status (after retries where they apply).
    #[error("HTTP {status}{}", if *.attempts > 1 { format!(" after {} attempts", .attempts) } else { String::new() })]
    Status {
        /// Status code.
        status: u16,
        /// Attempts made.
        attempts: u32,
    },
    /// The body is larger than the source allows.
    #[error("the body is larger than {limit} bytes (max_bytes)")]
    TooLarge {
        /// Limit in bytes.
        limit: u64,
    },
    /// No answer in time, after retries.
    #[error("no answer within {timeout:?} after {attempts} attempts")]
    Timeout {
        /// Per-request timeout.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
    },
    /// Redirects went in a circle or on too long.
    #[error("{0}")]
    Redirect(String),
    /// Connection refused, DNS failure, TLS error, broken body ... after retries.
    #[error("{message} after {attempts} attempts")]
    Network {
        /// What failed.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
}

impl FetchError {
    /// A short fixed code for metrics and the dead-letter topic.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Robots { .. } => "robots",
            FetchError::RobotsUnavailable { .. } => "robots_unavailable",
            FetchError::Status {
                status: 404 | 410, ..
            } => "http_not_found",
            FetchError::Status {
                status: 400..=499, ..
            } => "http_4xx",
            FetchError::Status { .. } => "http_5xx",
            FetchError::TooLarge { .. } => "too_large",
            FetchError::Timeout { .. } => "timeout",
            FetchError::Redirect(_) => "redirect",
            FetchError::Network { .. } => "network",
        }
    }
}

/// One request's parameters.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `If-None-Match`.
    pub etag: Option<String>,
    /// `If-Modified-Since`.
    pub last_modified: Option<String>,
    /// Largest body accepted.
    pub max_bytes: u64,
    /// Requests per second to the host; None = the configured per-host rate.
    pub rate: Option<f64>,
}

enum Robots {
    /// No robots.txt (4xx): everything is allowed.
    AllowAll,
    /// robots.txt could not be fetched (5xx, unreachable): nothing is, for now.
    Unavailable,
    /// Rules and crawl delay.
    Rules(texting_robots::Robot),
}

struct Host {
    /// Requests in flight to this host.
    slots: Semaphore,
    /// When the next request may start.
    next: tokio::sync::Mutex<Instant>,
    /// robots.txt and when it was fetched.
    robots: tokio::sync::Mutex<Option<(Instant, Arc<Robots>)>>,
}

/// The shared fetcher of one `sift ingest` process.
pub struct Fetcher {
    client: reqwest::Client,
    config: IngestConfig,
    global: Semaphore,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
}

impl Fetcher {
    /// A fetcher with the configured limits.
    pub fn new(config: &IngestConfig) -> Result<Self, FetchError> {
        let max_redirects = config.max_redirects as usize;
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().iter().any(|u| u == attempt.url()) {
                let url = attempt.url().to_string();
                attempt.error(format!("redirect loop back to {url}"))
            } else if attempt.previous().len() > max_redirects {
                attempt.error(format!(
                    "more than {max_redirects} redirects (ingest.max_redirects)"
                ))
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .user_agent(config.user_agent.clone())
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .redirect(policy)
            .pool_max_idle_per_host(config.per_host_concurrency.max(1) as usize)
            .build()
            .map_err(|e| FetchError::Network {
                message: format!("cannot build the HTTP client: {e}"),
                attempts: 0,
            })?;
        Ok(Fetcher {
            client,
            config: config.clone(),
            global: Semaphore::new(config.max_concurrency.max(1) as usize),
            hosts: Mutex::new(HashMap::new()),
        })
    }

    fn host(&self, url: &Url) -> Arc<Host> {
        let key = format!(
            "{}://{}:{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(0)
        );
        self.hosts
            .lock()
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Host {
                    slots: Semaphore::new(self.config.per_host_concurrency.max(1) as usize),
                    next: tokio::sync::Mutex::new(Instant::now()),
                    robots: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }

    /// robots.txt of `url`'s host, fetched at most once per `robots_ttl`.
    async fn robots(&self, url: &Url, host: &Host) -> Arc<Robots> {
        let mut cached = host.robots.lock().await;
        if let Some((at, r)) = cached.as_ref() {
            if at.elapsed() < self.config.robots_ttl {
                return r.clone();
            }
        }
        let mut robots_url = url.clone();
        robots_url.set_path("/robots.txt");
        robots_url.set_query(None);
        robots_url.set_fragment(None);
        let r = match self.client.get(robots_url.clone()).send().await {
            Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                Ok(body) => match texting_robots::Robot::new(&self.config.user_agent, &body) {
                    Ok(robot) => Robots::Rules(robot),
                    // Unparseable rules: treat as none, as crawlers do.
                    Err(_) => Robots::AllowAll,
                },
                Err(_) => Robots::Unavailable,
            },
            Ok(resp) if resp.status().is_client_error() => Robots::AllowAll,
            Ok(_) | Err(_) => Robots::Unavailable,
        };
        if matches!(r, Robots::Unavailable) {
            tracing::warn!(url = %robots_url, "robots.txt is unavailable; not fetching from this host until it answers.");
        }
        let r = Arc::new(r);
        *cached = Some((Instant::now(), r.clone()));
        r
    }

    /// Waits for the host's next request slot under its rate.
    async fn pace(&self, host: &Host, rate: f64) {
        if rate <= 0.0 {
            return;
        }
        let gap = Duration::from_secs_f64(1.0 / rate);
        let wait = {
            let mut next = host.next.lock().await;
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + gap;
            start - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Fetches `url` politely, retrying what is worth retrying.
    pub async fn fetch(&self, url: &Url, req: &Request) -> Result<Fetched, FetchError> {
        let host = self.host(url);
        let robots = self.robots(url, &host).await;
        let mut rate = req.rate.unwrap_or(self.config.per_host_rate);
        match robots.as_ref() {
            Robots::AllowAll => {}
            Robots::Unavailable => {
                return Err(FetchError::RobotsUnavailable {
                    host: url.host_str().unwrap_or_default().to_string(),
                })
            }
            Robots::Rules(r) => {
                if !r.allowed(url.as_str()) {
                    return Err(FetchError::Robots {
                        host: url.host_str().unwrap_or_default().to_string(),
                        agent: self.config.user_agent.clone(),
                    });
                }
                if let Some(delay) = r.delay.filter(|d| *d > 0.0) {
                    let limit = 1.0 / f64::from(delay);
                    rate = if rate <= 0.0 { limit } else { rate.min(limit) };
                }
            }
        }
        let attempts = self.config.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = {
                let _global = self
                    .global
                    .acquire()
                    .await
                    .map_err(|_| FetchError::Network {
                        message: "the fetcher is shut down".into(),
                        attempts: attempt,
                    })?;
                let _slot = host
                    .slots
                    .acquire()
                    .await
                    .map_err(|_| FetchError::Network {
                        message: "the fetcher is shut down".into(),
                        attempts: attempt,
                    })?;
                self.pace(&host, rate).await;
                self.once(url, req).await
            };
            let retry_after = match outcome {
                Ok(f) => return Ok(f),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Retry { error, after }) => {
                    if attempt >= attempts {
                        return Err(error(attempt));
                    }
                    after
                }
            };
            let backoff = self
                .config
                .retry_backoff
                .saturating_mul(1 << (attempt - 1).min(10));
            let jitter = rand::rng().random_range(0.5..1.5);
            let wait = retry_after
                .unwrap_or_else(|| backoff.mul_f64(jitter))
                .min(MAX_RETRY_AFTER);
            tracing::debug!(%url, attempt, ?wait, "Retrying a fetch.");
            tokio::time::sleep(wait).await;
        }
    }

    /// One HTTP exchange.
    async fn once(&self, url: &Url, req: &Request) -> Result<Fetched, Attempt> {
        let mut headers = HeaderMap::new();
        if let Some(v) = req.etag.as_deref().and_then(|v| v.parse().ok()) {
            headers.insert(IF_NONE_MATCH, v);
        }
        if let Some(v) = req.last_modified.as_deref().and_then(|v| v.parse().ok()) {
            headers.insert(IF_MODIFIED_SINCE, v);
        }
        let timeout = self.config.timeout;
        let resp = match self.client.get(url.clone()).headers(headers).send().await {
            Ok(r) => r,
            Err(e) => return Err(classify(e, timeout)),
        };
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::NotModified);
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let code = status.as_u16();
            return Err(Attempt::Retry {
                error: Box::new(move |attempts| FetchError::Status {
                    status: code,
                    attempts,
                }),
                after,
            });
        }
        if !status.is_success() {
            return Err(Attempt::Final(FetchError::Status {
                status: status.as_u16(),
                attempts: 1,
            }));
        }
        let limit = req.max_bytes;
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(Attempt::Final(FetchError::TooLarge { limit }));
        }
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header(CONTENT_TYPE);
        let etag = header(ETAG);
        let last_modified = header(LAST_MODIFIED);
        let final_url = resp.url().clone();
        let mut resp = resp;
        let mut body = BytesMut::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() as u64 + chunk.len() as u64 > limit {
                        return Err(Attempt::Final(FetchError::TooLarge { limit }));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(classify(e, timeout)),
            }
        }
        crate::metrics::global()
            .fetched_bytes
            .inc_by(body.len() as u64);
        Ok(Fetched::Body(Page {
            final_url,
            content_type,
            etag,
            last_modified,
            body: body.freeze(),
        }))
    }
}

/// A failed attempt: give up now, or try again (after the server's `Retry-After`).
enum Attempt {
    Final(FetchError),
    Retry {
        error: Box<dyn FnOnce(u32) -> FetchError + Send>,
        after: Option<Duration>,
    },
}

fn classify(e: reqwest::Error, timeout: Duration) -> Attempt {
    if e.is_redirect() {
        let msg = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string());
        return Attempt::Final(FetchError::Redirect(msg));
    }
    if e.is_timeout() {
        return Attempt::Retry {
            error: Box::new(move |attempts| FetchError::Timeout { timeout, attempts }),
            after: None,
        };
    }
    if e.is_builder() {
        return Attempt::Final(FetchError::Network {
            message: e.to_string(),
            attempts: 1,
        });
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    Attempt::Retry {
        error: Box::new(move |attempts| FetchError::Network { message, attempts }),
        after: None,
    }
}
