//! The review queue, the leases on its documents and the labels a reviewer
//! may choose.
//!
//! The queue is an in-memory snapshot of the `documents` table: per scored
//! row its id, source, title, top 5, model and review decision, never its
//! text. It is built by one paged scan when the server starts and rebuilt in
//! the background every `review.queue_refresh`; the rebuild scans only
//! families `c` and `r` and reads `m` (for source and title) only for rows it
//! has not seen before. A snapshot is immutable and precomputes the waiting
//! documents in each order, so `/next` walks a sorted list and stops at the
//! first document it may hand out. Decisions made by this server go to an
//! overlay that hides them at once; a rebuild that sees them in the table
//! drops them from the overlay.
//!
//! Leases live in this process: there is one review server per table.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;

use crate::backends::objects::{ObjectError, ObjectStore};
use crate::backends::table::{Row, Table};
use crate::documents::{self, categories, review, Decision, CATEGORIES, META, REVIEW};

/// Rows per scan page: bounds the memory one page of rows (with their
/// text, on backends that cannot leave it out) takes.
const PAGE: usize = 1000;
/// A rebuild that meets more unseen rows than this re-reads their metadata
/// with a scan instead of one `get` per row.
const MAX_GETS: usize = 2000;
/// `get`s in flight at once for unseen rows.
const GETS_IN_FLIGHT: usize = 16;

/// How the queue is sorted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Lowest top-1 score first: what the model is least sure of.
    #[default]
    Uncertainty,
    /// Smallest gap between the first and second label first.
    Margin,
    /// Most recently scored first.
    Newest,
}

impl Order {
    /// As written in the query string.
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Uncertainty => "uncertainty",
            Order::Margin => "margin",
            Order::Newest => "newest",
        }
    }

    /// Parses the query string's `order`; unknown or empty = the default.
    pub fn parse(s: &str) -> Self {
        match s {
            "margin" => Order::Margin,
            "newest" => Order::Newest,
            _ => Order::Uncertainty,
        }
    }

    /// Every order, for the filter form.
    pub const ALL: [Order; 3] = [Order::Uncertainty, Order::Margin, Order::Newest];
}

/// Which documents a reviewer works through, and in which order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// Only documents of this source tag.
    pub source: Option<String>,
    /// Only documents with this label in their top 5.
    pub category: Option<String>,
    /// The order.
    pub order: Order,
}

impl Filters {
    /// From query or form fields (empty values = no filter).
    pub fn new(source: Option<&str>, category: Option<&str>, order: Option<&str>) -> Self {
        let keep = |s: Option<&str>| {
            s.map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Filters {
            source: keep(source),
            category: keep(category),
            order: Order::parse(order.unwrap_or_default()),
        }
    }

    /// The filters as a query string (without `?`), only the ones set.
    pub fn query(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(s) = &self.source {
            q.append_pair("source", s);
        }
        if let Some(c) = &self.category {
            q.append_pair("category", c);
        }
        if self.order != Order::default() {
            q.append_pair("order", self.order.as_str());
        }
        q.finish()
    }

    /// `path` with the filters appended as its query string.
    pub fn url(&self, path: &str) -> String {
        let q = self.query();
        if q.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{q}")
        }
    }

    fn matches(&self, doc: &Doc) -> bool {
        self.source.as_deref().is_none_or(|s| &*doc.source == s)
            && self
                .category
                .as_deref()
                .is_none_or(|c| doc.top5.iter().any(|(l, _)| &**l == c))
    }
}

/// A review decision as the queue and the statistics need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    /// What was decided.
    pub decision: Decision,
    /// The accepted or chosen label.
    pub label: Option<Arc<str>>,
    /// The labels rejected (a rejection's top 5).
    pub rejected: Vec<Arc<str>>,
    /// Who decided.
    pub reviewer: Arc<str>,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Which model's top 5 was reviewed.
    pub model_version: Arc<str>,
}

/// One scored document of the queue.
#[derive(Debug, Clone)]
pub struct Doc {
    /// Row key.
    pub id: Arc<str>,
    /// Source tag.
    pub source: Arc<str>,
    /// Title (may be empty).
    pub title: Box<str>,
    /// Labels and scores, best first.
    pub top5: Box<[(Arc<str>, f32)]>,
    /// Model that scored it.
    pub model_version: Arc<str>,
    /// When it was scored, ms since the epoch.
    pub scored_at_ms: i64,
    /// The decision stored in the table when the snapshot was built.
    pub review: Option<Review>,
    /// The shadow model's top 5, when one scored it.
    pub shadow: Option<ShadowTop5>,
}

/// A shadow model's top 5 of a document (never shown to analysts).
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowTop5 {
    /// The shadow model's version.
    pub version: Arc<str>,
    /// Its 5 labels, best first.
    pub labels: Box<[Arc<str>]>,
}

impl Doc {
    /// Score of the best label (0 without any).
    pub fn top1(&self) -> f32 {
        self.top5.first().map_or(0.0, |(_, s)| *s)
    }

    fn margin(&self) -> f32 {
        let second = self.top5.get(1).map_or(0.0, |(_, s)| *s);
        self.top1() - second
    }
}

/// An immutable picture of the table's scored documents.
#[derive(Debug, Default)]
pub struct Snapshot {
    docs: Vec<Doc>,
    by_id: HashMap<Arc<str>, u32>,
    /// Undecided documents (when built) in each order.
    uncertainty: Vec<u32>,
    margin: Vec<u32>,
    newest: Vec<u32>,
    /// Every source tag, sorted.
    sources: Vec<Arc<str>>,
    /// Every label in a top 5 or a decision, sorted.
    labels: Vec<Arc<str>>,
}

impl Snapshot {
    /// Every document, decided or not.
    pub fn docs(&self) -> &[Doc] {
        &self.docs
    }

    /// Looks a document up by id.
    pub fn get(&self, id: &str) -> Option<&Doc> {
        self.by_id.get(id).map(|&i| &self.docs[i as usize])
    }

    /// Every source tag, sorted.
    pub fn sources(&self) -> &[Arc<str>] {
        &self.sources
    }

    /// Every label seen in the table, sorted.
    pub fn labels(&self) -> &[Arc<str>] {
        &self.labels
    }

    fn order(&self, order: Order) -> &[u32] {
        match order {
            Order::Uncertainty => &self.uncertainty,
            Order::Margin => &self.margin,
            Order::Newest => &self.newest,
        }
    }
}

/// Collects rows into a snapshot, sharing repeated strings.
#[derive(Default)]
struct Builder {
    docs: Vec<Doc>,
    strings: HashSet<Arc<str>>,
    /// Positions of documents whose `m` family is still to be read.
    unseen: Vec<usize>,
}

#[derive(Deserialize)]
struct Scored {
    label: String,
    score: f32,
}

fn cell<'a>(row: &'a Row, family: &str, qualifier: &str) -> Option<&'a str> {
    row.get(family, qualifier.as_bytes())
        .and_then(|v| std::str::from_utf8(v).ok())
}

impl Builder {
    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    fn review(&mut self, row: &Row) -> Option<Review> {
        let decision = Decision::parse(cell(row, REVIEW, review::DECISION)?)?;
        let label = cell(row, REVIEW, review::LABEL)
            .filter(|l| !l.is_empty())
            .map(|l| self.intern(l));
        let rejected: Vec<String> = cell(row, REVIEW, review::REJECTED)
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let rejected = rejected.iter().map(|l| self.intern(l)).collect();
        let reviewer = self.intern(cell(row, REVIEW, review::REVIEWER).unwrap_or_default());
        let model_version =
            self.intern(cell(row, REVIEW, review::MODEL_VERSION).unwrap_or_default());
        Some(Review {
            decision,
            label,
            rejected,
            reviewer,
            at_ms: cell(row, REVIEW, review::AT_MS)
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
            model_version,
        })
    }

    /// Adds a row; `meta` is its (source, title) when already known, else
    /// they are read from the row (or later, if the row lacks family `m`).
    fn add(&mut self, row: &Row, meta: Option<(Arc<str>, Box<str>)>) {
        let Some(top5) = cell(row, CATEGORIES, categories::TOP5)
            .and_then(|j| serde_json::from_str::<Vec<Scored>>(j).ok())
        else {
            return;
        };
        let Ok(id) = std::str::from_utf8(&row.key) else {
            return;
        };
        let top5: Box<[(Arc<str>, f32)]> = top5
            .iter()
            .take(5)
            .map(|s| (self.intern(&s.label), s.score))
            .collect();
        let model_version =
            self.intern(cell(row, CATEGORIES, categories::MODEL_VERSION).unwrap_or_default());
        let scored_at_ms = cell(row, CATEGORIES, categories::SCORED_AT_MS)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let review = self.review(row);
        let shadow = match (
            cell(row, CATEGORIES, categories::SHADOW_VERSION),
            cell(row, CATEGORIES, categories::SHADOW_TOP5)
                .and_then(|j| serde_json::from_str::<Vec<Scored>>(j).ok()),
        ) {
            (Some(version), Some(top)) if !version.is_empty() => Some(ShadowTop5 {
                version: self.intern(version),
                labels: top.iter().take(5).map(|s| self.intern(&s.label)).collect(),
            }),
            _ => None,
        };
        let (source, title) = match meta {
            Some(m) => m,
            None => {
                let has_meta = row.cells.iter().any(|c| c.family == META);
                if !has_meta {
                    self.unseen.push(self.docs.len());
                }
                self.meta_of(row)
            }
        };
        self.docs.push(Doc {
            id: Arc::from(id),
            source,
            title,
            top5,
            model_version,
            scored_at_ms,
            review,
            shadow,
        });
    }

    fn meta_of(&mut self, row: &Row) -> (Arc<str>, Box<str>) {
        let source = self.intern(cell(row, META, "source").unwrap_or_default());
        let title: Box<str> = cell(row, META, "title").unwrap_or_default().into();
        (source, title)
    }

    fn finish(self) -> Snapshot {
        let docs = self.docs;
        let by_id = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), i as u32))
            .collect();
        let waiting: Vec<u32> = (0..docs.len() as u32)
            .filter(|&i| docs[i as usize].review.is_none())
            .collect();
        let sorted = |key: &dyn Fn(&Doc, &Doc) -> std::cmp::Ordering| {
            let mut v = waiting.clone();
            v.sort_by(|&a, &b| {
                let (a, b) = (&docs[a as usize], &docs[b as usize]);
                key(a, b).then_with(|| a.id.cmp(&b.id))
            });
            v
        };
        let uncertainty = sorted(&|a, b| a.top1().total_cmp(&b.top1()));
        let margin = sorted(&|a, b| a.margin().total_cmp(&b.margin()));
        let newest = sorted(&|a, b| b.scored_at_ms.cmp(&a.scored_at_ms));
        let mut sources: Vec<Arc<str>> = docs.iter().map(|d| d.source.clone()).collect();
        sources.sort();
        sources.dedup();
        let mut labels: Vec<Arc<str>> = docs
            .iter()
            .flat_map(|d| {
                d.top5
                    .iter()
                    .map(|(l, _)| l.clone())
                    .chain(d.review.as_ref().and_then(|r| r.label.clone()))
            })
            .collect();
        labels.sort();
        labels.dedup();
        Snapshot {
            docs,
            by_id,
            uncertainty,
            margin,
            newest,
            sources,
            labels,
        }
    }
}

/// Reads every row of `documents` a page at a time.
async fn scan_pages(
    table: &dyn Table,
    families: &[&str],
    each: impl FnMut(&Row),
) -> crate::Result<()> {
    Ok(
        crate::backends::table::scan_pages(table, documents::TABLE, Some(families), PAGE, each)
            .await?,
    )
}

/// Builds a snapshot from the table. With `previous`, only families `c`
/// and `r` are scanned and source and title come from `previous` (or a
/// `get` of `m` for the few rows it lacks).
pub async fn build(table: &dyn Table, previous: Option<&Snapshot>) -> crate::Result<Snapshot> {
    let mut builder = Builder::default();
    let Some(previous) = previous else {
        scan_pages(table, &[META, CATEGORIES, REVIEW], |row| {
            builder.add(row, None)
        })
        .await?;
        return Ok(builder.finish());
    };
    scan_pages(table, &[CATEGORIES, REVIEW], |row| {
        let known = std::str::from_utf8(&row.key)
            .ok()
            .and_then(|id| previous.get(id))
            .map(|d| (d.source.clone(), d.title.clone()));
        builder.add(row, known)
    })
    .await?;
    if builder.unseen.len() > MAX_GETS {
        return Box::pin(build(table, None)).await;
    }
    let unseen = std::mem::take(&mut builder.unseen);
    let families = [META.to_string()];
    let ids: Vec<Arc<str>> = unseen.iter().map(|&i| builder.docs[i].id.clone()).collect();
    let rows: Vec<crate::Result<Option<Row>>> = futures::stream::iter(ids)
        .map(|id| {
            let families = &families;
            async move {
                Ok(table
                    .get(documents::TABLE, id.as_bytes(), Some(families))
                    .await?)
            }
        })
        .buffered(GETS_IN_FLIGHT)
        .collect()
        .await;
    for (i, row) in unseen.into_iter().zip(rows) {
        if let Some(row) = row? {
            let (source, title) = builder.meta_of(&row);
            builder.docs[i].source = source;
            builder.docs[i].title = title;
        }
    }
    Ok(builder.finish())
}

/// The queue: the current snapshot and the decisions made since.
pub struct Queue {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Decisions this server made that the snapshot does not show yet.
    overlay: RwLock<HashMap<Arc<str>, Review>>,
}

impl Queue {
    /// A queue over `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        let queue = Queue {
            snapshot: RwLock::new(Arc::new(snapshot)),
            overlay: RwLock::new(HashMap::new()),
        };
        queue.publish_depth();
        queue
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().clone()
    }

    /// Replaces the snapshot, keeping the overlay's decisions the new one
    /// does not show yet.
    pub fn replace(&self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        {
            let mut overlay = self.overlay.write();
            overlay.retain(|id, r| {
                snapshot
                    .get(id)
                    .and_then(|d| d.review.as_ref())
                    .is_none_or(|stored| stored.at_ms < r.at_ms)
            });
            *self.snapshot.write() = snapshot;
        }
        self.publish_depth();
    }

    /// Records a decision this server made: the document leaves the queue.
    pub fn decided(&self, id: &str, review: Review) {
        let was_waiting = self.snapshot().get(id).is_some_and(|d| d.review.is_none());
        let first = self.overlay.write().insert(Arc::from(id), review).is_none();
        if was_waiting && first {
            crate::metrics::global().review_queue_documents.dec();
        }
    }

    /// The decision on a document: this server's latest, else the table's.
    pub fn review_of(&self, doc: &Doc) -> Option<Review> {
        if let Some(r) = self.overlay.read().get(&doc.id) {
            return Some(r.clone());
        }
        doc.review.clone()
    }

    /// Calls `each` for every document with its current decision.
    pub fn for_each_reviewed(&self, mut each: impl FnMut(&Doc, &Review)) {
        let snapshot = self.snapshot();
        let overlay = self.overlay.read();
        for doc in snapshot.docs() {
            if let Some(r) = overlay.get(&doc.id).or(doc.review.as_ref()) {
                each(doc, r);
            }
        }
    }

    /// Waiting documents matching `filters`, in order: how many, and the
    /// first `limit` of them.
    pub fn waiting(&self, filters: &Filters, limit: usize) -> (usize, Vec<Doc>) {
        let snapshot = self.snapshot();
        let overlay = self.overlay.read();
        let mut count = 0;
        let mut first = Vec::new();
        for &i in snapshot.order(filters.order) {
            let doc = &snapshot.docs[i as usize];
            if overlay.contains_key(&doc.id) || !filters.matches(doc) {
                continue;
            }
            count += 1;
            if first.len() < limit {
                first.push(doc.clone());
            }
        }
        (count, first)
    }

    /// The first waiting document matching `filters` that `take` accepts
    /// (it leases it), walking the queue in order.
    pub fn next(
        &self,
        filters: &Filters,
        mut take: impl FnMut(&Arc<str>) -> bool,
    ) -> Option<Arc<str>> {
        let snapshot = self.snapshot();
        let overlay = self.overlay.read();
        snapshot
            .order(filters.order)
            .iter()
            .map(|&i| &snapshot.docs[i as usize])
            .filter(|d| !overlay.contains_key(&d.id) && filters.matches(d))
            .find(|d| take(&d.id))
            .map(|d| d.id.clone())
    }

    fn publish_depth(&self) {
        let snapshot = self.snapshot();
        let overlay = self.overlay.read();
        let decided_since = overlay
            .keys()
            .filter(|id| snapshot.get(id).is_some_and(|d| d.review.is_none()))
            .count();
        let waiting = snapshot.uncertainty.len().saturating_sub(decided_since);
        crate::metrics::global()
            .review_queue_documents
            .set(waiting as i64);
    }
}

/// A reviewer's hold on a document.
#[derive(Debug, Clone)]
struct Lease {
    reviewer: Arc<str>,
    expires: Instant,
}

/// Who is reviewing which document, for `review.lease` after they opened it.
pub struct Leases {
    ttl: Duration,
    held: Mutex<HashMap<Arc<str>, Lease>>,
    /// Per session, the documents its reviewer skipped.
    skipped: Mutex<HashMap<String, HashSet<Arc<str>>>>,
}

impl Leases {
    /// Leases that last `ttl` from when they are taken or renewed.
    pub fn new(ttl: Duration) -> Self {
        Leases {
            ttl,
            held: Mutex::new(HashMap::new()),
            skipped: Mutex::new(HashMap::new()),
        }
    }

    /// Takes or renews the lease on `id` for `reviewer`; `Err` names the
    /// other reviewer who holds it.
    pub fn take(&self, id: &str, reviewer: &str) -> Result<(), String> {
        let now = Instant::now();
        let mut held = self.held.lock();
        if let Some(l) = held.get_mut(id) {
            if l.expires > now && &*l.reviewer != reviewer {
                return Err(l.reviewer.to_string());
            }
            l.reviewer = Arc::from(reviewer);
            l.expires = now + self.ttl;
            return Ok(());
        }
        held.insert(
            Arc::from(id),
            Lease {
                reviewer: Arc::from(reviewer),
                expires: now + self.ttl,
            },
        );
        Ok(())
    }

    /// The other reviewer holding `id`, if any.
    pub fn holder_other_than(&self, id: &str, reviewer: &str) -> Option<String> {
        let held = self.held.lock();
        held.get(id)
            .filter(|l| l.expires > Instant::now() && &*l.reviewer != reviewer)
            .map(|l| l.reviewer.to_string())
    }

    /// Gives up `reviewer`'s lease on `id` (another reviewer's stays).
    pub fn release(&self, id: &str, reviewer: &str) {
        let mut held = self.held.lock();
        if held.get(id).is_some_and(|l| &*l.reviewer == reviewer) {
            held.remove(id);
        }
    }

    /// Drops expired leases.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.held.lock().retain(|_, l| l.expires > now);
    }

    /// Remembers that the reviewer of `session` skipped `id`.
    pub fn skip(&self, session: &str, id: &str) {
        self.skipped
            .lock()
            .entry(session.to_owned())
            .or_default()
            .insert(Arc::from(id));
    }

    /// Whether the reviewer of `session` skipped `id`.
    pub fn skipped(&self, session: &str, id: &str) -> bool {
        self.skipped
            .lock()
            .get(session)
            .is_some_and(|s| s.contains(id))
    }

    /// Forgets a session's skips (at logout).
    pub fn forget(&self, session: &str) {
        self.skipped.lock().remove(session);
    }
}

/// The labels a reviewer may choose.
#[derive(Debug, Default)]
pub struct Labels {
    /// From the file or the registry, if any.
    configured: RwLock<Vec<Arc<str>>>,
    /// `configured` merged with the labels seen in the table, sorted.
    all: RwLock<Arc<Vec<Arc<str>>>>,
    /// The registry version `configured` came from.
    version: Mutex<Option<String>>,
}

/// Where the labels come from.
#[derive(Clone)]
pub enum LabelSource {
    /// `review.labels`.
    File(std::path::PathBuf),
    /// The registry's LATEST model (`train.prefix`).
    Registry {
        /// The object store.
        store: Arc<dyn ObjectStore>,
        /// The registry's key prefix.
        prefix: String,
    },
}

impl std::fmt::Debug for LabelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelSource::File(p) => f.debug_tuple("File").field(p).finish(),
            LabelSource::Registry { prefix, .. } => {
                f.debug_struct("Registry").field("prefix", prefix).finish()
            }
        }
    }
}

/// Reads a labels file: a JSON array of strings, or one label per line.
pub fn read_labels_file(path: &Path) -> crate::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        crate::Error::io(
            format!("reading the labels file {} (review.labels)", path.display()),
            e,
        )
    })?;
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text).map_err(|e| {
            crate::Error::Invalid(format!(
                "the labels file {} (review.labels) is not a JSON array of strings: {e}",
                path.display()
            ))
        });
    }
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

impl Labels {
    /// Loads the configured labels (if `source` is given) and merges the
    /// ones seen in `snapshot`. A registry that cannot be read leaves the
    /// labels seen in the table, with a warning.
    pub async fn load(source: Option<&LabelSource>, snapshot: &Snapshot) -> crate::Result<Self> {
        let labels = Labels::default();
        match source {
            Some(LabelSource::File(path)) => {
                let names = read_labels_file(path)?;
                *labels.configured.write() = names.iter().map(|n| Arc::from(n.as_str())).collect();
            }
            Some(source @ LabelSource::Registry { .. }) => labels.refresh(source).await,
            None => {}
        }
        labels.merge(snapshot);
        Ok(labels)
    }

    /// Re-reads the registry's labels if LATEST moved; a file is read once.
    pub async fn refresh(&self, source: &LabelSource) {
        let LabelSource::Registry { store, prefix } = source else {
            return;
        };
        let registry = crate::train::registry::Registry::new(store.clone(), prefix);
        let version = match registry.latest().await {
            Ok(Some((latest, _))) => latest.version,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the registry's LATEST; reviewers choose among the labels seen in the table.");
                return;
            }
        };
        if self.version.lock().as_deref() == Some(version.as_str()) {
            return;
        }
        let key = format!(
            "{}/{version}/{}",
            prefix.trim_end_matches('/'),
            sift_training::files::LABELS
        );
        let names: Vec<String> = match store.get(&key).await {
            Ok((_, body)) => match serde_json::from_slice(&body) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(key, error = %e, "The model's labels.json is not a JSON array of strings.");
                    return;
                }
            },
            Err(ObjectError::NotFound(_)) => return,
            Err(e) => {
                tracing::warn!(key, error = %e, "Cannot read the model's labels.json.");
                return;
            }
        };
        tracing::info!(
            version,
            labels = names.len(),
            "Loaded the labels of the registry's LATEST model."
        );
        *self.configured.write() = names.iter().map(|n| Arc::from(n.as_str())).collect();
        *self.version.lock() = Some(version);
    }

    /// Adds the labels seen in `snapshot`.
    pub fn merge(&self, snapshot: &Snapshot) {
        let mut all: Vec<Arc<str>> = self.configured.read().clone();
        all.extend(snapshot.labels().iter().cloned());
        all.sort();
        all.dedup();
        *self.all.write() = Arc::new(all);
    }

    /// Every known label, sorted.
    pub fn all(&self) -> Arc<Vec<Arc<str>>> {
        self.all.read().clone()
    }

    /// Whether `label` is known.
    pub fn contains(&self, label: &str) -> bool {
        self.all
            .read()
            .binary_search_by(|l| (**l).cmp(label))
            .is_ok()
    }

    /// At most `limit` labels for `q`, case-insensitively: labels that
    /// start with it, then labels that contain it, then labels whose
    /// category name and description (see [`crate::categories`]) hold every
    /// word of it, best matches first.
    pub fn search(&self, q: &str, limit: usize) -> Vec<String> {
        let q = q.trim().to_lowercase();
        let all = self.all();
        let mut starts = Vec::new();
        let mut contains = Vec::new();
        let mut described: Vec<(u32, String)> = Vec::new();
        let words = crate::categories::query_words(&q);
        for l in all.iter() {
            let lower = l.to_lowercase();
            if lower.starts_with(&q) {
                starts.push(l.to_string());
            } else if lower.contains(&q) {
                contains.push(l.to_string());
            } else if !words.is_empty() {
                if let Some(c) = crate::categories::get(l) {
                    let score = c.matches(&words);
                    if score > 0 {
                        described.push((score, l.to_string()));
                    }
                }
            }
            if starts.len() >= limit {
                break;
            }
        }
        described.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        starts.extend(contains);
        starts.extend(described.into_iter().map(|(_, l)| l));
        starts.truncate(limit);
        starts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::table::{Cell, EmbeddedTable, RowPut};
    use bytes::Bytes;

    fn row(id: &str, top: &[(&str, f32)], decided: Option<&str>) -> Row {
        let top5 = serde_json::to_string(
            &top.iter()
                .map(|(l, s)| serde_json::json!({"label": l, "score": s}))
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default();
        let mut cells = vec![
            Cell {
                family: "c".into(),
                qualifier: Bytes::from_static(b"top5"),
                value: Bytes::from(top5),
                timestamp_ms: 1,
            },
            Cell {
                family: "m".into(),
                qualifier: Bytes::from_static(b"source"),
                value: Bytes::from(if id < "m" { "alpha" } else { "beta" }),
                timestamp_ms: 1,
            },
        ];
        if let Some(d) = decided {
            cells.push(Cell {
                family: "r".into(),
                qualifier: Bytes::from_static(b"decision"),
                value: Bytes::from(d.to_owned()),
                timestamp_ms: 1,
            });
        }
        Row {
            key: Bytes::from(id.to_owned()),
            cells,
        }
    }

    fn snapshot() -> Snapshot {
        let mut b = Builder::default();
        b.add(&row("a", &[("x", 0.9), ("y", 0.05)], None), None);
        b.add(&row("b", &[("x", 0.4), ("z", 0.39)], None), None);
        b.add(&row("c", &[("y", 0.3), ("x", 0.1)], None), None);
        b.add(&row("n", &[("z", 0.2), ("y", 0.01)], Some("accept")), None);
        b.add(&row("o", &[("z", 0.6), ("x", 0.3)], None), None);
        b.finish()
    }

    #[test]
    fn orders_and_filters_the_waiting_documents() {
        let q = Queue::new(snapshot());
        let ids = |f: &Filters| {
            q.waiting(f, 10)
                .1
                .iter()
                .map(|d| d.id.to_string())
                .collect::<Vec<_>>()
        };
        let by = |order| Filters {
            order,
            ..Filters::default()
        };
        assert_eq!(ids(&by(Order::Uncertainty)), ["c", "b", "o", "a"]);
        assert_eq!(ids(&by(Order::Margin)), ["b", "c", "o", "a"]);
        let beta = Filters::new(Some("beta"), None, None);
        assert_eq!(ids(&beta), ["o"]);
        let x = Filters::new(None, Some("x"), Some("margin"));
        assert_eq!(ids(&x), ["b", "c", "o", "a"]);
        let z = Filters::new(None, Some("z"), None);
        assert_eq!(ids(&z), ["b", "o"]);
        assert_eq!(z.query(), "category=z");
        assert_eq!(
            Filters::new(Some("a b"), None, Some("newest")).url("/next"),
            "/next?source=a+b&order=newest"
        );
    }

    #[test]
    fn a_decision_leaves_the_queue_until_the_table_shows_it() {
        let q = Queue::new(snapshot());
        let review = Review {
            decision: Decision::Reject,
            label: None,
            rejected: vec![],
            reviewer: Arc::from("ann"),
            at_ms: 10,
            model_version: Arc::from("v1"),
        };
        q.decided("c", review);
        assert_eq!(q.waiting(&Filters::default(), 10).0, 3);
        // A rebuild that does not show the decision yet keeps hiding it.
        q.replace(snapshot());
        assert_eq!(q.waiting(&Filters::default(), 10).0, 3);
        assert_eq!(q.next(&Filters::default(), |_| true).as_deref(), Some("b"));
        let mut skipped_b = |id: &Arc<str>| &**id != "b";
        assert_eq!(
            q.next(&Filters::default(), &mut skipped_b).as_deref(),
            Some("o")
        );
    }

    #[test]
    fn leases_keep_others_out_until_released_or_expired() {
        let l = Leases::new(Duration::from_millis(50));
        assert!(l.take("d", "ann").is_ok());
        assert!(l.take("d", "ann").is_ok());
        assert_eq!(l.take("d", "bob"), Err("ann".to_string()));
        assert_eq!(l.holder_other_than("d", "bob").as_deref(), Some("ann"));
        l.release("d", "bob");
        assert!(l.take("d", "bob").is_err());
        l.release("d", "ann");
        assert!(l.take("d", "bob").is_ok());
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.take("d", "ann").is_ok());
    }

    #[test]
    fn searches_labels_case_insensitively() -> anyhow::Result<()> {
        let labels = Labels::default();
        *labels.configured.write() = ["Finance", "Refinancing", "Sports", "fintech"]
            .iter()
            .map(|s| Arc::from(*s))
            .collect();
        labels.merge(&Snapshot::default());
        assert_eq!(
            labels.search("FIN", 20),
            ["Finance", "fintech", "Refinancing"]
        );
        assert_eq!(labels.search("fin", 1), ["Finance"]);
        assert!(labels.contains("Sports") && !labels.contains("sports"));
        Ok(())
    }

    #[tokio::test]
    async fn a_rebuild_reads_metadata_only_for_new_rows() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let table = EmbeddedTable::open(&dir.path().join("t.redb"))?;
        table
            .ensure_table(documents::TABLE, &crate::documents::FAMILIES)
            .await?;
        let put = |id: &str, title: &str| {
            RowPut::new(id.to_owned())
                .cell("m", "source", "s")
                .cell("m", "title", title.to_owned())
                .cell("m", "text", "long text")
                .cell("c", "top5", r#"[{"label":"x","score":0.5}]"#)
        };
        table.put(documents::TABLE, vec![put("a", "A")]).await?;
        let first = build(&table, None).await?;
        assert_eq!(first.get("a").map(|d| &*d.title), Some("A"));
        table
            .put(
                documents::TABLE,
                vec![
                    put("b", "B"),
                    RowPut::new("u").cell("m", "title", "unscored"),
                ],
            )
            .await?;
        let second = build(&table, Some(&first)).await?;
        assert_eq!(second.docs().len(), 2);
        assert_eq!(
            second.get("b").map(|d| (&*d.source, &*d.title)),
            Some(("s", "B"))
        );
        Ok(())
    }
}
