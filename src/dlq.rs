//! The dead-letter topic: anything a stage cannot handle goes to `sift.dlq`
//! with a short reason code (a bounded metric label) and a sentence saying
//! what went wrong, and is counted. Nothing bad is dropped silently.
//!
//! A dead letter about a record keeps that record's key, value and headers,
//! so it can be replayed once the cause is fixed; one about something that
//! never became a record (a fetch that failed) carries a small JSON
//! description instead. Either way the headers say the stage, the reason,
//! and where known the source and URL.

use bytes::Bytes;
use serde::Serialize;

use crate::backends::log::{Log, LogError, Message, Record};
use crate::envelope::{headers, topics};

/// The largest original record a dead letter carries; the rest of the 1 MB a
/// message may have is left for headers.
const MAX_ORIGINAL_BYTES: usize = 1_000_000 - 16 * 1024;

/// One record for `sift.dlq`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The stage that gave up (`ingest`, `clean`, `archive`, ...).
    pub stage: &'static str,
    /// A short fixed code, used as a metric label (`fetch`, `bad_json`, ...).
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
    pub fn of_message(
        stage: &'static str,
        reason: &'static str,
        detail: String,
        m: &Message,
    ) -> Self {
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

    /// The log record. An original too large to carry next to the headers
    /// (the log's messages stop at 1 MB) is left out, and the value says so.
    pub fn record(&self) -> Record {
        let original = self
            .original
            .as_ref()
            .filter(|o| o.value.len() + o.key.as_ref().map_or(0, Bytes::len) <= MAX_ORIGINAL_BYTES);
        let (key, value, mut hs) = match original {
            Some(o) => (
                o.key.clone(),
                o.value.clone(),
                o.headers
                    .iter()
                    .filter(|(k, _)| {
                        k != headers::REASON && k != headers::STAGE && k != headers::URL
                    })
                    .cloned()
                    .collect::<Vec<_>>(),
            ),
            None => {
                let omitted;
                let detail = match &self.original {
                    Some(o) => {
                        omitted = format!(
                            "{} (the original record, {} bytes, is too large to carry)",
                            self.detail,
                            o.value.len()
                        );
                        omitted.as_str()
                    }
                    None => self.detail.as_str(),
                };
                let d = Description {
                    stage: self.stage,
                    reason: self.reason,
                    detail,
                    source: self.source.as_deref(),
                    url: self.url.as_deref(),
                    at_ms: crate::now_ms(),
                };
                let value = serde_json::to_vec(&d).unwrap_or_default();
                (
                    self.original
                        .as_ref()
                        .and_then(|o| o.key.clone())
                        .or_else(|| self.url.clone().map(Bytes::from)),
                    Bytes::from(value),
                    Vec::new(),
                )
            }
        };
        hs.push((
            headers::REASON.into(),
            Bytes::from(format!("{}: {}", self.reason, self.detail)),
        ));
        hs.push((headers::STAGE.into(), Bytes::from(self.stage)));
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

/// Sends dead letters to `sift.dlq`, logs and counts each. Returns once the
/// log has them, so a caller may then commit the offsets of their originals.
pub async fn send(log: &dyn Log, letters: &[DeadLetter]) -> Result<(), LogError> {
    if letters.is_empty() {
        return Ok(());
    }
    let records = letters.iter().map(DeadLetter::record).collect();
    log.produce(topics::DLQ, records).await?;
    // Counted and logged once the log has them, so a retried send does not
    // count twice.
    let metrics = crate::metrics::global();
    for d in letters {
        metrics.dead_letter(d.reason);
        tracing::warn!(
            stage = d.stage,
            reason = d.reason,
            source = d.source.as_deref().unwrap_or(""),
            url = d.url.as_deref().unwrap_or(""),
            detail = %d.detail,
            "Sent to the dead-letter topic."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(value: Bytes) -> DeadLetter {
        DeadLetter {
            stage: "clean",
            reason: "bad_json",
            detail: "not an envelope".into(),
            source: Some("s".into()),
            url: Some("https://x/".into()),
            original: Some(Original {
                key: Some(Bytes::from("k1")),
                value,
                headers: vec![(headers::SOURCE.into(), Bytes::from("s"))],
            }),
        }
    }

    fn header<'a>(r: &'a Record, name: &str) -> Option<&'a [u8]> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn keeps_the_original_and_says_why() {
        let r = letter(Bytes::from("{oops")).record();
        assert_eq!(r.value, Bytes::from("{oops"));
        assert_eq!(r.key, Some(Bytes::from("k1")));
        assert_eq!(
            header(&r, headers::REASON),
            Some(&b"bad_json: not an envelope"[..])
        );
        assert_eq!(header(&r, headers::STAGE), Some(&b"clean"[..]));
        assert_eq!(header(&r, headers::URL), Some(&b"https://x/"[..]));
        assert_eq!(
            r.headers
                .iter()
                .filter(|(k, _)| k == headers::SOURCE)
                .count(),
            1
        );
    }

    #[test]
    fn a_too_large_original_is_described_instead() -> anyhow::Result<()> {
        let r = letter(Bytes::from(vec![b'x'; 1_000_000])).record();
        assert!(r.value.len() < 4096);
        assert_eq!(r.key, Some(Bytes::from("k1")));
        let v: serde_json::Value = serde_json::from_slice(&r.value)?;
        assert!(v["detail"]
            .as_str()
            .is_some_and(|d| d.contains("1000000 bytes")));
        Ok(())
    }
}
