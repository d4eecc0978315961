//! The `documents` table's schema, shared by the stages that write it and
//! those that read it: `m` metadata (written by the store stage), `c` the
//! model's categories (inference), `r` the analyst's review decision.
//!
//! | family | qualifier | value |
//! | --- | --- | --- |
//! | `m` | `source`, `url`, `title`, `text`, `content_type`, `fetched_at_ms`, `metadata` | document metadata and text |
//! | `c` | `top5` | JSON `[{"label": ..., "score": ...}, ...]`, best first |
//! | `c` | `model_version`, `scored_at_ms` | which model scored it, when |
//! | `r` | `decision` | `accept` (one of the top 5), `choose` (another label), `reject` (none of the 5) |
//! | `r` | `label` | the accepted or chosen label |
//! | `r` | `rejected` | JSON array of the labels rejected (the top 5 shown) |
//! | `r` | `reviewer`, `at_ms`, `model_version` | who, when, and which model's top 5 was reviewed |

use serde::Deserialize;

use crate::backends::table::{Row, RowPut};
use crate::envelope::Envelope;

/// The table analysts review.
pub const TABLE: &str = "documents";
/// Its column families: `m` metadata, `c` categories, `r` review decision.
pub const FAMILIES: [&str; 3] = ["m", "c", "r"];

/// Family `m`.
pub const META: &str = "m";
/// Family `c`.
pub const CATEGORIES: &str = "c";
/// Family `r`.
pub const REVIEW: &str = "r";

/// Qualifiers of family `c`.
pub mod categories {
    /// JSON top 5.
    pub const TOP5: &str = "top5";
    /// Version of the model that scored the document.
    pub const MODEL_VERSION: &str = "model_version";
    /// When it was scored, ms since the epoch.
    pub const SCORED_AT_MS: &str = "scored_at_ms";
}

/// Qualifiers of family `r`.
pub mod review {
    /// `accept`, `choose` or `reject`.
    pub const DECISION: &str = "decision";
    /// The accepted or chosen label.
    pub const LABEL: &str = "label";
    /// JSON array of rejected labels.
    pub const REJECTED: &str = "rejected";
    /// Who decided.
    pub const REVIEWER: &str = "reviewer";
    /// When, ms since the epoch.
    pub const AT_MS: &str = "at_ms";
    /// The model whose top 5 was reviewed.
    pub const MODEL_VERSION: &str = "model_version";
}

/// An analyst's decision on a document's top 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// One of the top 5 is right.
    Accept,
    /// Another label, found through search, is right.
    Choose,
    /// None of the top 5 is right.
    Reject,
}

impl Decision {
    /// As stored in `r:decision`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Accept => "accept",
            Decision::Choose => "choose",
            Decision::Reject => "reject",
        }
    }

    /// Parses `r:decision`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "accept" => Some(Decision::Accept),
            "choose" => Some(Decision::Choose),
            "reject" => Some(Decision::Reject),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct Scored {
    label: String,
}

fn text(row: &Row, family: &str, qualifier: &str) -> Option<String> {
    row.get(family, qualifier.as_bytes())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A reviewed row as a training document: an accepted or chosen label is a
/// positive; a rejection makes the rejected labels (`r:rejected`, else the
/// row's `c:top5`) negatives for this document. None for rows without a
/// decision, without text, or with a decision sift does not know.
pub fn feedback_document(row: &Row) -> Option<sift_training::Document> {
    let decision = Decision::parse(&text(row, REVIEW, review::DECISION)?)?;
    let body = text(row, META, "text").unwrap_or_default();
    let title = text(row, META, "title").unwrap_or_default();
    if body.trim().is_empty() && title.trim().is_empty() {
        return None;
    }
    let (tags, rejected) = match decision {
        Decision::Accept | Decision::Choose => {
            let label = text(row, REVIEW, review::LABEL)?;
            if label.is_empty() {
                return None;
            }
            (vec![label], Vec::new())
        }
        Decision::Reject => {
            let rejected: Vec<String> = match text(row, REVIEW, review::REJECTED) {
                Some(json) => serde_json::from_str(&json).ok()?,
                None => {
                    let top: Vec<Scored> =
                        serde_json::from_str(&text(row, CATEGORIES, categories::TOP5)?).ok()?;
                    top.into_iter().map(|s| s.label).collect()
                }
            };
            if rejected.is_empty() {
                return None;
            }
            (Vec::new(), rejected)
        }
    };
    Some(sift_training::Document {
        id: String::from_utf8_lossy(&row.key).into_owned(),
        title,
        text: body,
        tags,
        rejected,
    })
}

/// The table row for an envelope (family `m`).
pub fn row_of(env: &Envelope) -> RowPut {
    let mut row = RowPut::new(env.id.clone())
        .cell("m", "source", env.source.clone())
        .cell("m", "url", env.url.clone())
        .cell("m", "title", env.title.clone())
        .cell("m", "content_type", env.content_type.clone())
        .cell("m", "fetched_at_ms", env.fetched_at_ms.to_string());
    if let Some(text) = &env.text {
        row = row.cell("m", "text", text.clone());
    }
    if let Some(uri) = &env.body_uri {
        row = row.cell("m", "body_uri", uri.clone());
    }
    if !env.metadata.is_empty() {
        row = row.cell(
            "m",
            "metadata",
            serde_json::to_string(&env.metadata).unwrap_or_default(),
        );
    }
    row
}
