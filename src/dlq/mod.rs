//! The dead-letter topic: anything a stage cannot handle goes to `sift.dlq`
//! with a short reason code (a bounded metric label) and a sentence saying
//! what went wrong, and is counted. Nothing bad is dropped silently.
//!
//! A dead letter about a record keeps that record's key, value and headers,
//! so it can be replayed once the cause is fixed. An original too large to
//! carry beside the headers (a message stops at 1 MB) goes to the object
//! store under `dlq/` and the letter carries its claim check
//! (`sift-original: objects:dlq/…`) and a description. One about something that
//! never became a record (a fetch that failed) carries a small JSON
//! description instead. Either way the headers say the stage, the reason,
//! and where known the source and URL.
//!
//! `sift dlq list|replay` reads the letters back and replays their
//! originals: [`replay`].

pub mod replay;

use bytes::Bytes;
use serde::Serialize;

use crate::backends::log::{Log, Message, Record};
use crate::backends::objects::{ObjectStore, PutMode};
use crate::envelope::{headers, topics, Stage};

/// The largest original record a dead letter carries; the rest of the 1 MB a
/// message may have is left for headers.
const MAX_ORIGINAL_BYTES: usize = 1_000_000 - 16 * 1024;

/// Prefix of the object keys holding originals too large to carry.
pub const ORIGINAL_PREFIX: &str = "dlq/";

/// One record for `sift.dlq`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The stage that gave up (`ingest`, `clean`, `archive`, ...).
    pub stage: Stage,
    /// A short fixed code, used as a metric label (`http_not_found`, `bad_json`, ...).
    pub reason: &'static str,
    /// What went wrong, for a person.
    pub detail: String,
    /// Source tag, when known.
    pub source: Option<String>,
    /// URL or path, when known.
    pub url: Option<String>,
    /// The original record, when there was one.
    pub original: Option<Original>,
}

/// The record a dead letter is about.
#[derive(Debug, Clone)]
pub struct Original {
    /// Its key.
    pub key: Option<Bytes>,
    /// Its value, unchanged.
    pub value: Bytes,
    /// Its headers.
    pub headers: Vec<(String, Bytes)>,
}

impl From<&Message> for Original {
    fn from(m: &Message) -> Self {
        Original {
            key: m.key.clone(),
            value: m.value.clone(),
            headers: m.headers.clone(),
        }
    }
}

/// The value of a dead letter that has no original record.
#[derive(Serialize)]
struct Description<'a> {
    stage: &'a str,
    reason: &'a str,
    detail: &'a str,
    source: Option<&'a str>,
    url: Option<&'a str>,
    at_ms: i64,
}

impl DeadLetter {
    /// A dead letter about an existing log record.
    pub fn of_message(stage: Stage, reason: &'static str, detail: String, m: &Message) -> Self {
        let header = |name: &str| {
            m.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        DeadLetter {
            stage,
            reason,
            detail,
            source: header(headers::SOURCE),
            url: header(headers::URL),
            original: Some(m.into()),
        }
    }

    /// Whether the original is too large to carry next to the headers.
    fn original_too_large(&self) -> bool {
        self.original.as_ref().is_some_and(|o| {
            o.value.len()
                + o.key.as_ref().map_or(0, Bytes::len)
                + o.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
                > MAX_ORIGINAL_BYTES
        })
    }

    /// The log record. An original too large to carry next to the headers
    /// (the log's messages stop at 1 MB) is left out and the value says so;
    /// with `claim`, the URI its value was stored under, the letter keeps the
    /// original's key and headers and carries the claim check, so it can be
    /// replayed.
    pub fn record(&self) -> Record {
        self.record_with(None)
    }

    fn record_with(&self, claim: Option<&str>) -> Record {
        let original = self
            .original
            .as_ref()
            .filter(|_| !self.original_too_large());
        let (key, value, mut hs) = match original {
            Some(o) => (
                o.key.clone(),
                o.value.clone(),
                o.headers
                    .iter()
                    .filter(|(k, _)| !is_letter_header(k))
                    .cloned()
                    .collect::<Vec<_>>(),
            ),
            None => {
                let omitted;
                let detail = match (&self.original, claim) {
                    (Some(o), Some(uri)) => {
                        omitted = format!(
                            "{} (the original record, {} bytes, is too large to carry; its value is at {uri})",
                            self.detail,
                            o.value.len()
                        );
                        omitted.as_str()
                    }
                    (Some(o), None) => {
                        omitted = format!(
                            "{} (the original record, {} bytes, is too large to carry)",
                            self.detail,
                            o.value.len()
                        );
                        omitted.as_str()
                    }
                    (None, _) => self.detail.as_str(),
                };
                let d = Description {
                    stage: self.stage.name(),
                    reason: self.reason,
                    detail,
                    source: self.source.as_deref(),
                    url: self.url.as_deref(),
                    at_ms: crate::now_ms(),
                };
                let value = serde_json::to_vec(&d).unwrap_or_default();
                // A claim-checked original keeps its headers, for the replay.
                let hs = match (&self.original, claim) {
                    (Some(o), Some(uri)) => o
                        .headers
                        .iter()
                        .filter(|(k, _)| !is_letter_header(k))
                        .cloned()
                        .chain([(headers::ORIGINAL.to_owned(), Bytes::from(uri.to_owned()))])
                        .collect(),
                    _ => Vec::new(),
                };
                (
                    self.original
                        .as_ref()
                        .and_then(|o| o.key.clone())
                        .or_else(|| self.url.clone().map(Bytes::from)),
                    Bytes::from(value),
                    hs,
                )
            }
        };
        hs.push((
            headers::REASON.into(),
            Bytes::from(format!("{}: {}", self.reason, self.detail)),
        ));
        hs.push((headers::STAGE.into(), Bytes::from(self.stage.name())));
        if let Some(s) = &self.source {
            if !hs.iter().any(|(k, _)| k == headers::SOURCE) {
                hs.push((headers::SOURCE.into(), Bytes::from(s.clone())));
            }
        }
        if let Some(u) = &self.url {
            hs.push((headers::URL.into(), Bytes::from(u.clone())));
        }
        Record {
            key,
            value,
            headers: hs,
        }
    }
}

/// Headers a dead letter sets itself; an original's copies of them are not kept.
fn is_letter_header(name: &str) -> bool {
    [
        headers::REASON,
        headers::STAGE,
        headers::URL,
        headers::ORIGINAL,
    ]
    .contains(&name)
}

/// The object key of an original too large to carry: named by its content,
/// so a retried send stores it once.
fn original_key(stage: &str, o: &Original) -> String {
    let mut h = blake3::Hasher::new();
    h.update(o.key.as_deref().unwrap_or_default());
    h.update(&[0]);
    h.update(&o.value);
    format!("{ORIGINAL_PREFIX}{stage}/{}", h.finalize().to_hex())
}

/// Sends dead letters to `sift.dlq`, logs and counts each. An original too
/// large to carry is stored in `objects` first and the letter carries its
/// claim check. Returns once the log has them, so a caller may then commit
/// the offsets of their originals.
pub async fn send(
    log: &dyn Log,
    objects: &dyn ObjectStore,
    letters: &[DeadLetter],
) -> crate::Result<()> {
    if letters.is_empty() {
        return Ok(());
    }
    let mut records = Vec::with_capacity(letters.len());
    for d in letters {
        let claim = match &d.original {
            Some(o) if d.original_too_large() => {
                let key = original_key(d.stage.name(), o);
                objects
                    .put(&key, o.value.clone(), PutMode::Overwrite)
                    .await?;
                Some(crate::envelope::claim_uri(&key))
            }
            _ => None,
        };
        records.push(d.record_with(claim.as_deref()));
    }
    log.produce(topics::DLQ, records).await?;
    // Counted and logged once the log has them, so a retried send does not
    // count twice.
    let metrics = crate::metrics::global();
    for d in letters {
        metrics.dead_letter(d.reason);
        tracing::warn!(
            stage = d.stage.name(),
            reason = d.reason,
            source = d.source.as_deref().unwrap_or(""),
            url = d.url.as_deref().unwrap_or(""),
            detail = %d.detail,
            "Sent to the dead-letter topic."
        );
    }
    Ok(())
}
