//! The `documents` table's schema, shared by the stages that write it and
//! those that read it: `m` metadata (written by the store stage), `c` the
//! model's categories (inference), `r` the analyst's review decision.
//!
//! | family | qualifier | value |
//! | --- | --- | --- |
//! | `m` | `source`, `url`, `title`, `text`, `content_type`, `fetched_at_ms`, `metadata` | document metadata and text |
//! | `c` | `top5` | JSON `[{"label": ..., "score": ...}, ...]`, best first |
//! | `c` | `why` | JSON `[["word", "word pair", ...], ...]`: per label of `top5`, the words that raised its score most |
//! | `c` | `model_version`, `scored_at_ms` | which model scored it, when |
//! | `c` | `shadow_top5`, `shadow_version` | the shadow model's top 5 (`infer.shadow_model`), never shown to analysts |
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
    /// JSON list, per label of the top 5, of the words that weighed most.
    pub const WHY: &str = "why";
    /// The shadow model's JSON top 5 (never shown to analysts).
    pub const SHADOW_TOP5: &str = "shadow_top5";
    /// The shadow model's version.
    pub const SHADOW_VERSION: &str = "shadow_version";
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
        source: text(row, META, "source").unwrap_or_default(),
        tags,
        rejected,
        section: text(row, META, "metadata")
            .and_then(|json| serde_json::from_str::<serde_json::Value>(&json).ok())
            .and_then(|m| {
                m.get(crate::envelope::meta::SECTION)?
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_default(),
        url: text(row, META, "url").unwrap_or_default(),
    })
}

/// How a champion and its shadow did on the documents analysts labelled:
/// the live evidence for (or against) promoting the shadow.
///
/// Only decisions that name the right label (accept, choose) count, and
/// only on documents whose champion top 5 is the one the analyst reviewed.
/// The champion's top 5 is what the analyst saw, so its top-5 agreement
/// leans its way; top 1 is the fair comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LiveEvidence {
    /// The model whose top 5 was reviewed.
    pub champion: String,
    /// The shadow model.
    pub shadow: String,
    /// Labelled decisions.
    pub reviewed: u64,
    /// ... whose label was the champion's first.
    pub champion_top1: u64,
    /// ... among the champion's 5.
    pub champion_top5: u64,
    /// ... the shadow's first.
    pub shadow_top1: u64,
    /// ... among the shadow's 5.
    pub shadow_top5: u64,
    /// Per chosen label: (decisions, champion top 1, shadow top 1).
    pub per_label: std::collections::BTreeMap<String, (u64, u64, u64)>,
}

impl LiveEvidence {
    /// Counts one labelled decision.
    pub fn add(&mut self, label: &str, champion_top5: &[&str], shadow_top5: &[&str]) {
        let first = |top: &[&str]| top.first() == Some(&label);
        let within = |top: &[&str]| top.contains(&label);
        self.reviewed += 1;
        self.champion_top1 += u64::from(first(champion_top5));
        self.champion_top5 += u64::from(within(champion_top5));
        self.shadow_top1 += u64::from(first(shadow_top5));
        self.shadow_top5 += u64::from(within(shadow_top5));
        let e = self.per_label.entry(label.to_owned()).or_default();
        e.0 += 1;
        e.1 += u64::from(first(champion_top5));
        e.2 += u64::from(first(shadow_top5));
    }

    /// Share of decisions with the label first, champion then shadow.
    pub fn top1_shares(&self) -> (f64, f64) {
        let d = self.reviewed.max(1) as f64;
        (self.champion_top1 as f64 / d, self.shadow_top1 as f64 / d)
    }

    /// Share with the label among the 5, champion then shadow.
    pub fn top5_shares(&self) -> (f64, f64) {
        let d = self.reviewed.max(1) as f64;
        (self.champion_top5 as f64 / d, self.shadow_top5 as f64 / d)
    }
}

/// One reviewed row as live evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveObservation {
    /// The model whose top 5 was reviewed.
    pub champion: String,
    /// The shadow model.
    pub shadow: String,
    /// The label the analyst accepted or chose.
    pub label: String,
    /// The champion's 5 labels, best first.
    pub champion_top5: Vec<String>,
    /// The shadow's 5 labels, best first.
    pub shadow_top5: Vec<String>,
}

/// One reviewed row as live evidence. None unless the row has a shadow top
/// 5, a decision naming a label, and the champion top 5 it was made on.
pub fn live_observation(row: &Row) -> Option<LiveObservation> {
    let decision = Decision::parse(&text(row, REVIEW, review::DECISION)?)?;
    if decision == Decision::Reject {
        return None;
    }
    let label = text(row, REVIEW, review::LABEL).filter(|l| !l.is_empty())?;
    let champion = text(row, CATEGORIES, categories::MODEL_VERSION)?;
    if text(row, REVIEW, review::MODEL_VERSION)? != champion {
        return None;
    }
    let shadow = text(row, CATEGORIES, categories::SHADOW_VERSION).filter(|v| !v.is_empty())?;
    let labels = |q: &str| -> Option<Vec<String>> {
        let top: Vec<Scored> = serde_json::from_str(&text(row, CATEGORIES, q)?).ok()?;
        Some(top.into_iter().map(|s| s.label).collect())
    };
    Some(LiveObservation {
        champion,
        shadow,
        label,
        champion_top5: labels(categories::TOP5)?,
        shadow_top5: labels(categories::SHADOW_TOP5)?,
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
