//! The envelope every topic carries: a versioned JSON document with a stable
//! id. The id hashes the source tag and the canonical URL, so the same page
//! fetched twice is the same document everywhere downstream.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the envelope schema; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Header names set on every envelope record.
pub mod headers {
    /// Source tag.
    pub const SOURCE: &str = "sift-source";
    /// Content type of the original document.
    pub const CONTENT_TYPE: &str = "sift-content-type";
    /// Envelope schema version.
    pub const SCHEMA: &str = "sift-schema";
    /// Why a record went to the dead-letter topic (`code: detail`).
    pub const REASON: &str = "sift-reason";
    /// The stage that sent a record to the dead-letter topic.
    pub const STAGE: &str = "sift-stage";
    /// URL of the document a dead letter is about.
    pub const URL: &str = "sift-url";
    /// Where a replayed record came from: `archive` (`sift archive replay`)
    /// or `dlq:{stage}` (`sift dlq replay` of that stage's dead letter). The
    /// archive stage skips records it already holds.
    pub const REPLAY: &str = "sift-replay";
    /// On a dead letter whose original was too large to carry beside its
    /// headers: the claim check (`objects:dlq/…`) of the original's value.
    pub const ORIGINAL: &str = "sift-original";
}

/// Topic names.
pub mod topics {
    /// Fetched, extracted documents.
    pub const RAW: &str = "sift.raw";
    /// One record per source of the sources file, keyed by its site: the
    /// ingest daemons' consumer group shares them out by partition.
    pub const SOURCES: &str = "sift.sources";
    /// Rejected records with their reason.
    pub const DLQ: &str = "sift.dlq";
    /// Normalized, language-tagged, de-duplicated documents.
    pub const CLEAN: &str = "sift.clean";
    /// Scored documents: id, source, URL, title, top 5, model version (`sift infer`).
    pub const CATEGORIZED: &str = "sift.categorized";
    /// Social profiles to link to people: network, handle, name?, location? (`sift match` reads it).
    pub const PROFILES: &str = "sift.profiles";
    /// Identity decisions: profile, person id or the reason there is none, score, evidence.
    pub const MATCHES: &str = "sift.matches";
    /// Analysts' review decisions: id, decision, label, rejected labels, reviewer, the top 5 shown (`sift review`).
    pub const FEEDBACK: &str = "sift.feedback";
}

/// A part of sift that handles records: the value of the `sift-stage`
/// header of its dead letters and the `stage` label of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// `sift ingest`.
    Ingest,
    /// `sift clean`.
    Clean,
    /// `sift archive`.
    Archive,
    /// `sift infer`.
    Infer,
    /// `sift match`.
    Match,
    /// The embedded log itself (damage it found and moved aside).
    Log,
}

impl Stage {
    /// Every stage.
    pub const ALL: [Stage; 6] = [
        Stage::Ingest,
        Stage::Clean,
        Stage::Archive,
        Stage::Infer,
        Stage::Match,
        Stage::Log,
    ];

    /// Its name in headers, metrics and `sift dlq list`.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest",
            Stage::Clean => "clean",
            Stage::Archive => "archive",
            Stage::Infer => "infer",
            Stage::Match => "match",
            Stage::Log => "log",
        }
    }

    /// The stage called `name`, if sift has one.
    pub fn parse(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The topic it consumes: where the originals of its dead letters go
    /// back to. None for `ingest`, whose letters are about fetches, not
    /// records, and for the log, whose letters describe damage.
    pub const fn input_topic(self) -> Option<&'static str> {
        match self {
            Stage::Clean | Stage::Archive => Some(topics::RAW),
            Stage::Infer => Some(topics::CLEAN),
            Stage::Match => Some(topics::PROFILES),
            Stage::Ingest | Stage::Log => None,
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Prefix of the object-store keys holding claim-checked texts.
pub const CLAIM_PREFIX: &str = "claims/";

/// The `body_uri` of a text stored under `key` in sift's configured object
/// store (`objects:claims/…`). The scheme names the store by role, not by
/// backend, so envelopes stay valid when the store moves.
pub fn claim_uri(key: &str) -> String {
    format!("objects:{key}")
}

/// The object key a `body_uri` points at, if it is a claim check.
pub fn claim_key(uri: &str) -> Option<&str> {
    uri.strip_prefix("objects:").filter(|k| !k.is_empty())
}

/// A document travelling through the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// Stable document id: [`document_id`] of source and canonical URL.
    pub id: String,
    /// Tag of the source that yielded it.
    pub source: String,
    /// Canonical URL (or path) it came from.
    pub url: String,
    /// When it was fetched, ms since the Unix epoch.
    pub fetched_at_ms: i64,
    /// Content type of the original (`text/html`, `application/pdf`, ...).
    pub content_type: String,
    /// Title, possibly empty.
    pub title: String,
    /// Extracted text; None when the body is stored aside (`body_uri`).
    pub text: Option<String>,
    /// Object-store URI of a body too large to carry (claim check).
    pub body_uri: Option<String>,
    /// Free-form metadata (source defaults, labels of seed documents, ...).
    #[serde(default)]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// Metadata keys that more than one stage reads.
pub mod meta {
    /// The section the site filed the page under (its `article:section`,
    /// its feed item's category, or the source's `[source.metadata]`
    /// default); the model reads it.
    pub const SECTION: &str = "section";
}

impl Envelope {
    /// The page's section ([`meta::SECTION`]), or "" when none is known.
    pub fn section(&self) -> &str {
        self.metadata
            .get(meta::SECTION)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
    }

    /// What the model reads of this document, as training builds it from a
    /// dataset row: the section and page-name line, the title, the text
    /// (empty while a claim-checked body is unresolved).
    pub fn model_input(&self) -> String {
        let name = sift_training::page_name(&self.url);
        sift_training::model_input(
            &self.title,
            self.text.as_deref().unwrap_or_default(),
            &sift_training::Fields {
                section: self.section(),
                name: &name,
            },
        )
    }

    /// The headers of this envelope's record on `sift.raw`: source, content
    /// type, schema version and URL, so consumers can route and filter
    /// without parsing the value.
    pub fn raw_headers(&self) -> Vec<(String, bytes::Bytes)> {
        vec![
            (headers::SOURCE.into(), self.source.clone().into()),
            (
                headers::CONTENT_TYPE.into(),
                self.content_type.clone().into(),
            ),
            (headers::SCHEMA.into(), SCHEMA_VERSION.to_string().into()),
            (headers::URL.into(), self.url.clone().into()),
        ]
    }
}

/// The stable id of a document: 32 hex digits of BLAKE3 over source and URL.
pub fn document_id(source: &str, canonical_url: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(source.as_bytes());
    h.update(b"\n");
    h.update(canonical_url.as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_reads_an_envelope_as_training_reads_its_dataset_row() {
        let mut env = Envelope {
            v: SCHEMA_VERSION,
            id: document_id("site-001", "http://x/packages/libz1.html"),
            source: "site-001".into(),
            url: "http://x/packages/libz1.html".into(),
            fetched_at_ms: 0,
            content_type: "text/html".into(),
            title: "zlib".into(),
            text: Some("compression library".into()),
            body_uri: None,
            metadata: BTreeMap::new(),
        };
        env.metadata
            .insert(meta::SECTION.into(), serde_json::Value::from("libs"));
        let row = sift_training::Document {
            id: "libz1".into(),
            title: "zlib".into(),
            text: "compression library".into(),
            section: "libs".into(),
            ..Default::default()
        };
        assert_eq!(env.model_input(), row.full_text());
        assert_eq!(
            env.model_input(),
            "section libs\npage libz1\nzlib\ncompression library"
        );
        // No section: only the page's name.
        env.metadata.clear();
        assert_eq!(env.section(), "");
        assert_eq!(env.model_input(), "page libz1\nzlib\ncompression library");
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = document_id("debian", "https://packages.debian.org/x");
        assert_eq!(a, document_id("debian", "https://packages.debian.org/x"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, document_id("debian2", "https://packages.debian.org/x"));
        // The separator keeps (source, url) pairs from colliding when concatenated.
        assert_ne!(document_id("ab", "c"), document_id("a", "bc"));
    }
}
