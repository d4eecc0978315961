//! The search index: bulk-indexed documents with an id, and structured queries
//! (exact, fuzzy and full-text clauses on named fields, filters, top-k with scores).
//!
//! Production uses Elasticsearch; the embedded default is a `tantivy` index per
//! index name under the data directory. Matching builds its person query from
//! [`Query`], so the same query runs on either.

#[cfg(feature = "elasticsearch")]
pub mod elasticsearch;
pub mod embedded;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use embedded::EmbeddedSearch;

/// Errors of the search index.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The index has not been created.
    #[error("search index `{0}` does not exist; create it first (ensure_index)")]
    NoSuchIndex(String),
    /// The index exists with a different field layout.
    #[error("search index `{index}` exists with different fields than requested: {detail}")]
    SchemaMismatch {
        /// Index name.
        index: String,
        /// What differs.
        detail: String,
    },
    /// A query or document names a field the index does not have, or has the wrong type.
    #[error("search index `{index}`: {detail}")]
    BadField {
        /// Index name.
        index: String,
        /// What is wrong.
        detail: String,
    },
    /// The index name is not usable.
    #[error("invalid index name `{0}`: use 1-100 characters of a-z, 0-9, `_` and `-`, not starting with `_` or `-`")]
    InvalidName(String),
    /// Reading or writing the index files failed.
    #[error("search index I/O at {path}: {source}")]
    Io {
        /// File or directory involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The search engine reported an error.
    #[error("search engine error: {0}")]
    Engine(String),
    /// The backend was configured but this build lacks its feature.
    #[error("search backend `{backend}` is not available in this build: rebuild sift with `--features {feature}`")]
    FeatureDisabled {
        /// Configured backend.
        backend: &'static str,
        /// Cargo feature that provides it.
        feature: &'static str,
    },
}

/// How a field is indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// Matched as one exact token (ids, codes, zip, state, phonetic keys); usable in filters.
    Keyword,
    /// Tokenized and lower-cased for full-text `Match` and per-token `Fuzzy` clauses.
    Text,
    /// A signed 64-bit integer; usable in `Term` and `Range` clauses.
    Integer,
}

/// One field of an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSpec {
    /// Field name as it appears in documents and queries.
    pub name: String,
    /// How it is indexed.
    pub kind: FieldKind,
}

/// The layout of an index: its name and fields. Documents may carry other
/// fields; they are stored and returned but not searchable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSpec {
    /// Index name.
    pub name: String,
    /// Searchable fields.
    pub fields: Vec<FieldSpec>,
    /// Searchable fields left out of the stored document (Elasticsearch
    /// `_source.excludes`): found by queries, never returned in a hit. For
    /// values derived from what is stored, which would double what each
    /// document stores.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_excludes: Vec<String>,
}

impl IndexSpec {
    /// The kind of a field, if the index has it.
    pub fn kind_of(&self, field: &str) -> Option<FieldKind> {
        self.fields.iter().find(|f| f.name == field).map(|f| f.kind)
    }
}

/// A document to index: its id and its fields as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchDoc {
    /// Unique id; indexing the same id again replaces the document.
    pub id: String,
    /// Field values; strings for keyword/text, integers for integer fields.
    pub source: Map<String, Value>,
}

/// What a bulk request did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BulkReport {
    /// Documents written.
    pub indexed: usize,
    /// Documents rejected, with the reason for each (the rest of the batch is kept).
    pub failed: Vec<(String, String)>,
}

/// One clause of a query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clause {
    /// The field holds exactly this value (keyword or integer fields; text fields
    /// match one lower-cased token).
    Term {
        /// Field name.
        field: String,
        /// Value as JSON (string or integer).
        value: Value,
        /// Score multiplier.
        boost: f32,
    },
    /// The field holds a token within `max_edits` (0-2) edits of `value`.
    Fuzzy {
        /// Field name.
        field: String,
        /// Value, lower-cased for text fields.
        value: String,
        /// Levenshtein distance allowed, transpositions counting as one edit.
        max_edits: u8,
        /// Score multiplier.
        boost: f32,
    },
    /// Full-text match: any of the tokens of `text` in a text field.
    Match {
        /// Field name.
        field: String,
        /// Text to tokenize.
        text: String,
        /// Score multiplier.
        boost: f32,
    },
    /// Integer field between two bounds, both inclusive.
    Range {
        /// Field name.
        field: String,
        /// Lower bound, if any.
        gte: Option<i64>,
        /// Upper bound, if any.
        lte: Option<i64>,
    },
}

/// A structured query: documents must satisfy every `filter` (no score) and
/// every `must`, and should satisfy at least `min_should_match` of `should`;
/// the score sums the matching scored clauses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Query {
    /// Required, scored.
    pub must: Vec<Clause>,
    /// Optional, scored.
    pub should: Vec<Clause>,
    /// Required, not scored.
    pub filter: Vec<Clause>,
    /// How many `should` clauses must match. 0 follows Elasticsearch: one is
    /// needed when the query has no `must` and no `filter`, none otherwise.
    pub min_should_match: usize,
    /// How many hits to return, best first (0 returns none).
    pub k: usize,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// Document id.
    pub id: String,
    /// Relevance score (engine-specific scale; only the order is comparable).
    pub score: f32,
    /// The stored document.
    pub source: Map<String, Value>,
}

/// A search index backend.
#[async_trait]
pub trait SearchIndex: Send + Sync + 'static {
    /// Creates the index if missing; an existing index must have the same fields.
    async fn ensure_index(&self, spec: &IndexSpec) -> Result<(), SearchError>;
    /// Deletes the whole index, documents and fields; true when it existed.
    /// An index whose fields changed (a newer sift asks for more) is rebuilt
    /// this way: dropped, then created and loaded again.
    async fn drop_index(&self, index: &str) -> Result<bool, SearchError>;
    /// Indexes (inserts or replaces) documents; per-document failures are reported, not fatal.
    async fn bulk(&self, index: &str, docs: Vec<SearchDoc>) -> Result<BulkReport, SearchError>;
    /// Indexes documents the caller knows the index does not hold (a load
    /// into an empty index): no older copy is looked for, which saves the
    /// embedded index a lookup per document in every segment. A document
    /// that is there after all is then held twice.
    ///
    /// The default is [`SearchIndex::bulk`].
    async fn bulk_new(&self, index: &str, docs: Vec<SearchDoc>) -> Result<BulkReport, SearchError> {
        self.bulk(index, docs).await
    }
    /// Deletes a document; deleting a missing id is not an error.
    async fn delete(&self, index: &str, id: &str) -> Result<(), SearchError>;
    /// Makes everything written so far visible to searches.
    async fn refresh(&self, index: &str) -> Result<(), SearchError>;
    /// Fetches one document by id.
    async fn get(&self, index: &str, id: &str) -> Result<Option<SearchDoc>, SearchError>;
    /// Number of documents visible to searches.
    async fn count(&self, index: &str) -> Result<u64, SearchError>;
    /// Documents that `query` matches (its `k` is ignored): an exact count,
    /// as `search` with no limit would return.
    async fn count_matching(&self, index: &str, query: &Query) -> Result<u64, SearchError>;
    /// Runs a query and returns the top `query.k` hits, best first.
    async fn search(&self, index: &str, query: &Query) -> Result<Vec<Hit>, SearchError>;
    /// Reads the settings [`SearchIndex::begin_bulk_load`] would change,
    /// without changing them. A loader saves them before it begins, so that a
    /// load killed in the middle and resumed later restores these, not the
    /// bulk-load values it finds.
    ///
    /// The default has nothing to report: [`LoadSettings::default`].
    async fn bulk_load_settings(&self, index: &str) -> Result<LoadSettings, SearchError> {
        let _ = index;
        Ok(LoadSettings::default())
    }
    /// Prepares `index` for a bulk load (Elasticsearch: refresh off, no replicas) and returns the settings to restore.
    ///
    /// The default changes nothing.
    async fn begin_bulk_load(&self, index: &str) -> Result<LoadSettings, SearchError> {
        self.bulk_load_settings(index).await
    }
    /// Makes every document a `bulk` acknowledged during a bulk load survive
    /// a crash; a loader calls it before it records rows as loaded. Fails
    /// when acknowledged documents were lost since the last call (a failed
    /// write rolled them back): they must be sent again.
    ///
    /// The default does nothing: Elasticsearch acknowledges a bulk request
    /// once its translog holds it. The embedded index commits here (see its
    /// module).
    async fn persist(&self, index: &str) -> Result<(), SearchError> {
        let _ = index;
        Ok(())
    }
    /// Restores what `begin_bulk_load` changed, then refreshes.
    ///
    /// The default only refreshes.
    async fn end_bulk_load(&self, index: &str, restore: &LoadSettings) -> Result<(), SearchError> {
        let _ = restore;
        self.refresh(index).await
    }
}

/// Index settings a bulk load changes, as they were before it. `None` is the
/// engine's default (the setting is not set on the index).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSettings {
    /// How often writes become visible to searches (Elasticsearch
    /// `index.refresh_interval`, e.g. `"1s"`; `"-1"` turns refreshes off).
    pub refresh_interval: Option<String>,
    /// Copies of each shard (Elasticsearch `index.number_of_replicas`).
    pub number_of_replicas: Option<u32>,
}

// Rules and messages shared by the embedded and Elasticsearch indexes, so a
// spec or document valid on one backend is valid on the other.

/// Longest field name (characters).
const MAX_FIELD_NAME_CHARS: usize = 256;

/// Index names both backends accept: 1 to 100 of `a-z 0-9 _ -`, not
/// starting with `_` or `-`.
fn validate_name(name: &str) -> Result<(), SearchError> {
    let valid = (1..=100).contains(&name.len())
        && !name.starts_with(['_', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(SearchError::InvalidName(name.to_owned()))
    }
}

/// Field names both backends accept: 1 to 256 characters, not `_id` or
/// `_source`, not starting with `-`, each listed once.
fn validate_fields(spec: &IndexSpec) -> Result<(), SearchError> {
    let bad = |detail: String| SearchError::BadField {
        index: spec.name.clone(),
        detail,
    };
    let mut seen = std::collections::HashSet::new();
    for field in &spec.fields {
        let name = field.name.as_str();
        if name.is_empty() || name.chars().count() > MAX_FIELD_NAME_CHARS {
            return Err(bad(format!(
                "field name `{name}` must have 1 to {MAX_FIELD_NAME_CHARS} characters"
            )));
        }
        if name == "_id" || name == "_source" {
            return Err(bad(format!(
                "field name `{name}` is reserved; rename the field"
            )));
        }
        if name.starts_with('-') {
            return Err(bad(format!("field name `{name}` must not start with `-`")));
        }
        if !seen.insert(name) {
            return Err(bad(format!("field `{name}` is listed twice")));
        }
    }
    if let Some(name) = spec
        .source_excludes
        .iter()
        .find(|n| !seen.contains(n.as_str()))
    {
        return Err(bad(format!(
            "`{name}` is left out of stored documents but is not a field of the index; \
             list only its fields"
        )));
    }
    Ok(())
}

/// `Ok` when both specs have the same fields (in any order), else `SchemaMismatch`.
fn compare_fields(existing: &IndexSpec, requested: &IndexSpec) -> Result<(), SearchError> {
    let sorted = |spec: &IndexSpec| {
        let mut fields = spec.fields.clone();
        fields.sort_by(|a, b| a.name.cmp(&b.name));
        fields
    };
    let (have, want) = (sorted(existing), sorted(requested));
    if have == want {
        return Ok(());
    }
    Err(SearchError::SchemaMismatch {
        index: requested.name.clone(),
        detail: format!(
            "it has {}, the request has {}; use another index name or delete the index",
            describe_fields(&have),
            describe_fields(&want)
        ),
    })
}

fn describe_fields(fields: &[FieldSpec]) -> String {
    if fields.is_empty() {
        return "no searchable fields".to_owned();
    }
    let parts: Vec<String> = fields
        .iter()
        .map(|f| format!("{} ({})", f.name, kind_name(f.kind)))
        .collect();
    parts.join(", ")
}

fn kind_name(kind: FieldKind) -> &'static str {
    match kind {
        FieldKind::Keyword => "keyword",
        FieldKind::Text => "text",
        FieldKind::Integer => "integer",
    }
}

fn expected_value(kind: FieldKind) -> &'static str {
    match kind {
        FieldKind::Keyword | FieldKind::Text => "a string or an array of strings",
        FieldKind::Integer => "an integer or an array of integers",
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
