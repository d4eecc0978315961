//! The embedded search index: one `tantivy` index per index name, each in its
//! own folder under the data directory (`<dir>/<name>/`).
//!
//! Every `bulk` and `delete` commits before it returns, so what it wrote survives
//! a crash and is visible to the next search without waiting for a refresh;
//! `refresh` exists for parity with Elasticsearch, whose writes become visible
//! only after one. The [`IndexSpec`] is kept next to the tantivy files as
//! `sift-index.json`, so a later `ensure_index` can tell whether the caller
//! still means the same layout.
//!
//! A bulk load ([`SearchIndex::begin_bulk_load`]) is the exception: from it
//! to `end_bulk_load`, a `bulk` adds its documents and returns without a
//! commit, and they survive a crash once [`SearchIndex::persist`] has
//! committed them, which a loader calls before it records rows as loaded.
//! A commit per request was what a load spent most of its time on: each made
//! a small segment that the merges then read and wrote again (at 10,000
//! documents a request, 37,500 rows/s into an empty index; see
//! `benches/README.md` for the figures since). A write that fails during a
//! load rolls back every uncommitted document, other requests' included, so
//! the next `persist` says so instead of committing what is left.
//!
//! Documents are converted outside the writer lock, and during a load
//! several requests add theirs at once (tantivy's writer takes documents
//! from many threads; only a commit or rollback needs it alone). Stored
//! documents are compressed with lz4.

use super::{
    compare_fields, describe_fields, expected_value, json_type, kind_name, validate_fields,
    validate_name,
};
use std::collections::HashMap;
use std::fmt::Display;
use std::fs;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use serde::ser::{SerializeMap, Serializer as _};
use serde_json::{Map, Value};
use tantivy::collector::sort_key::{SortBySimilarityScore, SortByString};
use tantivy::collector::TopDocs;
use tantivy::query::{
    AllQuery, BooleanQuery, BoostQuery, ConstScoreQuery, EmptyQuery, ExistsQuery, FuzzyTermQuery,
    Occur, Query as EngineQuery, RangeQuery, TermQuery,
};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value as _, FAST, INDEXED,
    STORED, STRING,
};
use tantivy::tokenizer::TokenStream as _;
use tantivy::{
    DocAddress, Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term,
};

use super::{
    BulkReport, Clause, FieldKind, Hit, IndexSpec, LoadSettings, Query, SearchDoc, SearchError,
    SearchIndex,
};

/// File, next to the tantivy files, that records the [`IndexSpec`] an index was created with.
const SPEC_FILE: &str = "sift-index.json";
/// Field holding the document id: exact-match, stored, and a fast field for the tie-break sort.
const ID_FIELD: &str = "_id";
/// Field holding the whole source document as JSON text.
const SOURCE_FIELD: &str = "_source";
/// Memory each indexing thread may use before it flushes a segment.
const WRITER_HEAP_BYTES_PER_THREAD: usize = 64_000_000;
/// Most indexing threads of a writer (one per core up to this): each builds
/// its own segments, so a load uses every core; tantivy allows 8.
const MAX_WRITER_THREADS: usize = 4;
/// Longest accepted id, as in Elasticsearch.
const MAX_ID_BYTES: usize = 512;
/// Longest accepted keyword value, as in Elasticsearch (Lucene's term limit).
const MAX_KEYWORD_BYTES: usize = 32_766;

/// A search index kept in local `tantivy` indexes, one per index name.
///
/// Cloning is cheap and clones share the open indexes, so one value can serve
/// the whole process; opening the same directory twice at once fails, because
/// tantivy allows one writer per index.
#[derive(Clone)]
pub struct EmbeddedSearch {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedSearch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedSearch")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl EmbeddedSearch {
    /// Uses `dir` as the data directory, creating it if needed. Indexes already
    /// there are opened on first use, so reopening a directory keeps its documents.
    pub fn open(dir: &Path) -> Result<Self, SearchError> {
        fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                open: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Runs blocking index work on tokio's blocking pool, so async callers are never stalled.
    async fn blocking<T, F>(&self, work: F) -> Result<T, SearchError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, SearchError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| engine("the search task did not finish", e))?
    }
}

#[async_trait]
impl SearchIndex for EmbeddedSearch {
    async fn ensure_index(&self, spec: &IndexSpec) -> Result<(), SearchError> {
        let spec = spec.clone();
        self.blocking(move |inner| inner.ensure_index(&spec)).await
    }

    async fn drop_index(&self, index: &str) -> Result<bool, SearchError> {
        let index = index.to_owned();
        self.blocking(move |inner| inner.drop_index(&index)).await
    }

    async fn bulk(&self, index: &str, docs: Vec<SearchDoc>) -> Result<BulkReport, SearchError> {
        let index = index.to_owned();
        self.blocking(move |inner| inner.handle(&index)?.bulk(docs, true))
            .await
    }

    async fn bulk_new(&self, index: &str, docs: Vec<SearchDoc>) -> Result<BulkReport, SearchError> {
        let index = index.to_owned();
        self.blocking(move |inner| inner.handle(&index)?.bulk(docs, false))
            .await
    }

    async fn delete(&self, index: &str, id: &str) -> Result<(), SearchError> {
        let (index, id) = (index.to_owned(), id.to_owned());
        self.blocking(move |inner| inner.handle(&index)?.delete(&id))
            .await
    }

    async fn refresh(&self, index: &str) -> Result<(), SearchError> {
        let index = index.to_owned();
        self.blocking(move |inner| inner.handle(&index)?.refresh())
            .await
    }

    async fn get(&self, index: &str, id: &str) -> Result<Option<SearchDoc>, SearchError> {
        let (index, id) = (index.to_owned(), id.to_owned());
        self.blocking(move |inner| inner.handle(&index)?.get(&id))
            .await
    }

    async fn count(&self, index: &str) -> Result<u64, SearchError> {
        let index = index.to_owned();
        self.blocking(move |inner| Ok(inner.handle(&index)?.reader.searcher().num_docs()))
            .await
    }

    async fn search(&self, index: &str, query: &Query) -> Result<Vec<Hit>, SearchError> {
        let (index, query) = (index.to_owned(), query.clone());
        self.blocking(move |inner| inner.handle(&index)?.search(&query))
            .await
    }

    async fn count_matching(&self, index: &str, query: &Query) -> Result<u64, SearchError> {
        let (index, query) = (index.to_owned(), query.clone());
        self.blocking(move |inner| inner.handle(&index)?.count_matching(&query))
            .await
    }

    async fn bulk_load_settings(&self, index: &str) -> Result<LoadSettings, SearchError> {
        let index = index.to_owned();
        self.blocking(move |inner| inner.handle(&index).map(|_| LoadSettings::default()))
            .await
    }

    async fn begin_bulk_load(&self, index: &str) -> Result<LoadSettings, SearchError> {
        let index = index.to_owned();
        self.blocking(move |inner| {
            inner.handle(&index)?.begin_load();
            Ok(LoadSettings::default())
        })
        .await
    }

    async fn persist(&self, index: &str) -> Result<(), SearchError> {
        let index = index.to_owned();
        self.blocking(move |inner| inner.handle(&index)?.persist())
            .await
    }

    async fn end_bulk_load(&self, index: &str, _restore: &LoadSettings) -> Result<(), SearchError> {
        let index = index.to_owned();
        self.blocking(move |inner| inner.handle(&index)?.end_load())
            .await
    }
}

/// State shared by all clones of an [`EmbeddedSearch`].
struct Inner {
    /// The data directory.
    dir: PathBuf,
    /// Indexes opened so far, by name. Held while an index is opened or created,
    /// so two callers never open the same index (and its writer) twice.
    open: Mutex<HashMap<String, Arc<OpenIndex>>>,
}

impl Inner {
    fn ensure_index(&self, spec: &IndexSpec) -> Result<(), SearchError> {
        validate_name(&spec.name)?;
        validate_fields(spec)?;
        let mut open = self.open.lock();
        if let Some(existing) = open.get(&spec.name) {
            return compare_fields(&existing.spec, spec);
        }
        let path = self.dir.join(&spec.name);
        let spec_path = path.join(SPEC_FILE);
        if spec_path.exists() {
            let stored = read_spec(&spec_path)?;
            compare_fields(&stored, spec)?;
            let index = OpenIndex::open(&path, stored)?;
            open.insert(spec.name.clone(), Arc::new(index));
            return Ok(());
        }
        let index = OpenIndex::create(&path, spec.clone())?;
        // Written last: an index folder without this file was never fully created
        // and is finished by the next `ensure_index`.
        write_spec(&spec_path, spec)?;
        open.insert(spec.name.clone(), Arc::new(index));
        Ok(())
    }

    /// Closes and removes the index `name`. The spec file goes first, so a
    /// crash in the middle leaves a folder the next `ensure_index` recreates.
    fn drop_index(&self, name: &str) -> Result<bool, SearchError> {
        validate_name(name)?;
        let mut open = self.open.lock();
        open.remove(name);
        let path = self.dir.join(name);
        if !path.exists() {
            return Ok(false);
        }
        let spec_path = path.join(SPEC_FILE);
        match fs::remove_file(&spec_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error(&spec_path, source)),
        }
        fs::remove_dir_all(&path).map_err(|source| io_error(&path, source))?;
        tracing::info!(index = name, folder = %path.display(), "dropped search index");
        Ok(true)
    }

    /// The open index `name`, opening it from disk if it was created earlier.
    fn handle(&self, name: &str) -> Result<Arc<OpenIndex>, SearchError> {
        validate_name(name)?;
        let mut open = self.open.lock();
        if let Some(index) = open.get(name) {
            return Ok(Arc::clone(index));
        }
        let path = self.dir.join(name);
        let spec_path = path.join(SPEC_FILE);
        if !spec_path.exists() {
            return Err(SearchError::NoSuchIndex(name.to_owned()));
        }
        let spec = read_spec(&spec_path)?;
        let index = Arc::new(OpenIndex::open(&path, spec)?);
        open.insert(name.to_owned(), Arc::clone(&index));
        Ok(index)
    }
}

/// One open tantivy index with its writer and reader.
struct OpenIndex {
    spec: IndexSpec,
    index: Index,
    id: Field,
    source: Field,
    /// Searchable fields by name.
    fields: HashMap<String, Searchable>,
    /// The only writer of this index. Outside a bulk load it is held alone
    /// for a whole batch, so a batch commits as one; during a load, requests
    /// share it to add documents and a commit or rollback takes it alone.
    writer: RwLock<IndexWriter>,
    /// Whether a bulk load defers commits, and what it has not committed.
    load: Mutex<LoadState>,
    reader: IndexReader,
}

/// A searchable field of an index.
#[derive(Debug, Clone, Copy)]
struct Searchable {
    field: Field,
    kind: FieldKind,
    /// Kept in the stored document (not in the spec's `source_excludes`).
    stored: bool,
}

/// The bulk load of one index, as its writer sees it.
#[derive(Debug, Default)]
struct LoadState {
    /// Between `begin_bulk_load` and `end_bulk_load`: `bulk` does not commit.
    active: bool,
    /// Documents added and acknowledged since the last commit.
    pending: u64,
    /// Why acknowledged documents were rolled back since the last commit.
    lost: Option<String>,
}

impl OpenIndex {
    /// Creates the index files in `path` (or finishes an interrupted creation).
    fn create(path: &Path, spec: IndexSpec) -> Result<Self, SearchError> {
        fs::create_dir_all(path).map_err(|source| io_error(path, source))?;
        let directory = tantivy::directory::MmapDirectory::open(path)
            .map_err(|e| engine(format!("cannot open index folder {}", path.display()), e))?;
        let index = Index::builder()
            .schema(build_schema(&spec))
            .open_or_create(directory)
            .map_err(|e| match e {
                tantivy::TantivyError::SchemaError(detail) => SearchError::SchemaMismatch {
                    index: spec.name.clone(),
                    detail: format!(
                        "{detail} (the folder {} holds an index without {SPEC_FILE}; \
                         remove the folder to recreate it)",
                        path.display()
                    ),
                },
                other => engine(format!("cannot create index `{}`", spec.name), other),
            })?;
        Self::from_index(index, spec)
    }

    /// Opens the index files in `path`, created earlier with `spec`.
    fn open(path: &Path, spec: IndexSpec) -> Result<Self, SearchError> {
        let index = Index::open_in_dir(path)
            .map_err(|e| engine(format!("cannot open index `{}`", spec.name), e))?;
        Self::from_index(index, spec)
    }

    fn from_index(index: Index, spec: IndexSpec) -> Result<Self, SearchError> {
        let schema = index.schema();
        let missing = |name: &str| {
            SearchError::Engine(format!(
                "index `{}` on disk has no field `{name}` although {SPEC_FILE} lists it; \
             the index files are damaged or were written by something else",
                spec.name
            ))
        };
        let id = schema.get_field(ID_FIELD).map_err(|_| missing(ID_FIELD))?;
        let source = schema
            .get_field(SOURCE_FIELD)
            .map_err(|_| missing(SOURCE_FIELD))?;
        let mut fields = HashMap::new();
        for f in &spec.fields {
            let field = schema.get_field(&f.name).map_err(|_| missing(&f.name))?;
            let stored = !spec.source_excludes.contains(&f.name);
            fields.insert(
                f.name.clone(),
                Searchable {
                    field,
                    kind: f.kind,
                    stored,
                },
            );
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_WRITER_THREADS);
        let writer = index
            .writer_with_num_threads(threads, threads * WRITER_HEAP_BYTES_PER_THREAD)
            .map_err(|e| engine(format!("cannot open a writer on index `{}`", spec.name), e))?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| engine(format!("cannot open a reader on index `{}`", spec.name), e))?;
        Ok(Self {
            spec,
            index,
            id,
            source,
            fields,
            writer: RwLock::new(writer),
            load: Mutex::new(LoadState::default()),
            reader,
        })
    }

    /// Adds `docs`; with `replace`, each first deletes a document of its id.
    fn bulk(&self, docs: Vec<SearchDoc>, replace: bool) -> Result<BulkReport, SearchError> {
        let mut report = BulkReport::default();
        let mut ready = Vec::with_capacity(docs.len());
        for doc in docs {
            match self.to_document(&doc) {
                Ok(document) => {
                    let id = replace.then(|| Term::from_field_text(self.id, &doc.id));
                    ready.push((id, document));
                }
                Err(reason) => report.failed.push((doc.id, reason)),
            }
        }
        if ready.is_empty() {
            return Ok(report);
        }
        report.indexed = ready.len();
        if self.load.lock().active {
            return self.add_deferred(ready).map(|()| report);
        }
        let mut writer = self.writer.write();
        for (id, document) in ready {
            if let Some(id) = id {
                writer.delete_term(id);
            }
            if let Err(e) = writer.add_document(document) {
                return Err(self.abandon(&mut writer, e));
            }
        }
        if let Err(e) = writer.commit() {
            return Err(self.abandon(&mut writer, e));
        }
        drop(writer);
        self.refresh()?;
        Ok(report)
    }

    /// Adds documents during a bulk load, beside other requests, without a commit.
    fn add_deferred(&self, ready: Vec<(Option<Term>, TantivyDocument)>) -> Result<(), SearchError> {
        let n = ready.len() as u64;
        let failed = {
            let writer = self.writer.read();
            ready.into_iter().find_map(|(id, document)| {
                if let Some(id) = id {
                    writer.delete_term(id);
                }
                writer.add_document(document).err()
            })
        };
        match failed {
            None => {
                self.load.lock().pending += n;
                Ok(())
            }
            Some(e) => Err(self.abandon(&mut self.writer.write(), e)),
        }
    }

    /// Commits what bulk requests added during a load; fails, committing
    /// nothing, when a failed write rolled acknowledged documents back.
    fn persist(&self) -> Result<(), SearchError> {
        let mut writer = self.writer.write();
        let mut load = self.load.lock();
        if let Some(lost) = load.lost.take() {
            load.pending = 0;
            return Err(SearchError::Engine(lost));
        }
        if load.pending == 0 {
            return Ok(());
        }
        if let Err(e) = writer.commit() {
            drop(load);
            return Err(self.abandon(&mut writer, e));
        }
        load.pending = 0;
        Ok(())
    }

    /// Starts deferring commits until `end_load`.
    fn begin_load(&self) {
        self.load.lock().active = true;
    }

    /// Commits what the load left uncommitted, stops deferring commits and
    /// makes the documents visible.
    fn end_load(&self) -> Result<(), SearchError> {
        let persisted = self.persist();
        self.load.lock().active = false;
        persisted?;
        self.refresh()
    }

    fn delete(&self, id: &str) -> Result<(), SearchError> {
        let mut writer = self.writer.write();
        writer.delete_term(Term::from_field_text(self.id, id));
        if let Err(e) = writer.commit() {
            return Err(self.abandon(&mut writer, e));
        }
        self.load.lock().pending = 0;
        drop(writer);
        self.refresh()
    }

    /// Drops what the writer holds uncommitted, so a failed batch is not
    /// committed later by someone else's, and describes the failure.
    fn abandon(&self, writer: &mut IndexWriter, cause: tantivy::TantivyError) -> SearchError {
        let rollback = match writer.rollback() {
            Ok(_) => String::new(),
            Err(e) => format!("; rolling back also failed: {e}"),
        };
        let mut load = self.load.lock();
        let pending = load.pending;
        if pending > 0 {
            load.lost.get_or_insert_with(|| {
                format!(
                    "writing to index `{}` failed ({cause}), which rolled back {} documents \
                     acknowledged since the last commit; send them again",
                    self.spec.name, pending
                )
            });
            load.pending = 0;
        }
        SearchError::Engine(format!(
            "writing to index `{}` failed: {cause}{rollback}",
            self.spec.name
        ))
    }

    fn refresh(&self) -> Result<(), SearchError> {
        self.reader.reload().map_err(|e| {
            engine(
                format!("cannot reload the reader of index `{}`", self.spec.name),
                e,
            )
        })
    }

    fn get(&self, id: &str) -> Result<Option<SearchDoc>, SearchError> {
        let searcher = self.reader.searcher();
        let query = TermQuery::new(Term::from_field_text(self.id, id), IndexRecordOption::Basic);
        let found = searcher
            .search(&query, &TopDocs::with_limit(1).order_by_score())
            .map_err(|e| self.engine_error(e))?;
        match found.first() {
            Some(&(_, address)) => self.load(&searcher, address).map(Some),
            None => Ok(None),
        }
    }

    fn search(&self, query: &Query) -> Result<Vec<Hit>, SearchError> {
        let engine_query = self.build_query(query)?;
        let searcher = self.reader.searcher();
        // More than the index holds is all of it; the collector reserves room for `k`.
        let limit = usize::try_from(searcher.num_docs()).map_or(query.k, |n| query.k.min(n));
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Best score first; equal scores by ascending id, so results do not
        // depend on segment layout.
        let collector = TopDocs::with_limit(limit).order_by((
            (SortBySimilarityScore, Order::Desc),
            (SortByString::for_field(ID_FIELD), Order::Asc),
        ));
        let top = searcher
            .search(&*engine_query, &collector)
            .map_err(|e| self.engine_error(e))?;
        top.into_iter()
            .map(|((score, _), address)| {
                let doc = self.load(&searcher, address)?;
                Ok(Hit {
                    id: doc.id,
                    score,
                    source: doc.source,
                })
            })
            .collect()
    }

    fn count_matching(&self, query: &Query) -> Result<u64, SearchError> {
        let engine_query = self.build_query(query)?;
        let searcher = self.reader.searcher();
        let n = searcher
            .search(&*engine_query, &tantivy::collector::Count)
            .map_err(|e| self.engine_error(e))?;
        Ok(n as u64)
    }

    /// Reads a stored document back.
    fn load(
        &self,
        searcher: &tantivy::Searcher,
        address: DocAddress,
    ) -> Result<SearchDoc, SearchError> {
        let stored: TantivyDocument = searcher.doc(address).map_err(|e| self.engine_error(e))?;
        let id = stored
            .get_first(self.id)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        let source_text = stored
            .get_first(self.source)
            .and_then(|v| v.as_str())
            .unwrap_or("{}");
        let source: Map<String, Value> = serde_json::from_str(source_text).map_err(|e| {
            SearchError::Engine(format!(
                "index `{}`: stored document `{id}` is not valid JSON: {e}",
                self.spec.name
            ))
        })?;
        Ok(SearchDoc { id, source })
    }

    /// Builds the tantivy document for `doc`, or says why it cannot be indexed.
    fn to_document(&self, doc: &SearchDoc) -> Result<TantivyDocument, String> {
        if doc.id.is_empty() {
            return Err("the document id is empty".to_owned());
        }
        if doc.id.len() > MAX_ID_BYTES {
            return Err(format!(
                "the document id is {} bytes long; the limit is {MAX_ID_BYTES}",
                doc.id.len()
            ));
        }
        let mut document = TantivyDocument::new();
        document.add_text(self.id, &doc.id);
        // The stored JSON is written as the fields are indexed, leaving out
        // the spec's `source_excludes`.
        let mut stored = Vec::with_capacity(512);
        let mut json = serde_json::Serializer::new(&mut stored);
        let unstorable =
            |e: serde_json::Error| format!("the document cannot be stored as JSON: {e}");
        let mut kept = json.serialize_map(None).map_err(unstorable)?;
        for (name, value) in &doc.source {
            let keep = match self.fields.get(name) {
                Some(f) => {
                    add_value(&mut document, f.field, f.kind, name, value)?;
                    f.stored
                }
                None => true,
            };
            if keep {
                kept.serialize_entry(name, value).map_err(unstorable)?;
            }
        }
        SerializeMap::end(kept).map_err(unstorable)?;
        let source =
            String::from_utf8(stored).map_err(|e| unstorable(serde::ser::Error::custom(e)))?;
        document.add_text(self.source, source);
        Ok(document)
    }

    fn build_query(&self, query: &Query) -> Result<Box<dyn EngineQuery>, SearchError> {
        if query.must.is_empty() && query.should.is_empty() && query.filter.is_empty() {
            return Ok(Box::new(AllQuery));
        }
        let mut clauses: Vec<(Occur, Box<dyn EngineQuery>)> = Vec::new();
        for clause in &query.must {
            clauses.push((Occur::Must, self.clause(clause)?));
        }
        for clause in &query.should {
            clauses.push((Occur::Should, self.clause(clause)?));
        }
        for clause in &query.filter {
            let unscored = ConstScoreQuery::new(self.clause(clause)?, 0.0);
            clauses.push((Occur::Must, Box::new(unscored)));
        }
        // As in Elasticsearch: with nothing else required, one `should` must match.
        let min_should_match =
            if query.min_should_match == 0 && query.must.is_empty() && query.filter.is_empty() {
                1
            } else {
                query.min_should_match
            };
        Ok(Box::new(BooleanQuery::with_minimum_required_clauses(
            clauses,
            min_should_match,
        )))
    }

    fn clause(&self, clause: &Clause) -> Result<Box<dyn EngineQuery>, SearchError> {
        let (query, boost): (Box<dyn EngineQuery>, f32) = match clause {
            Clause::Term {
                field,
                value,
                boost,
            } => {
                let (f, kind) = self.field(field)?;
                let term = match (kind, value) {
                    (FieldKind::Keyword, Value::String(s)) => Term::from_field_text(f, s),
                    (FieldKind::Text, Value::String(s)) => {
                        Term::from_field_text(f, &s.to_lowercase())
                    }
                    (FieldKind::Integer, Value::Number(n)) => match n.as_i64() {
                        Some(i) => Term::from_field_i64(f, i),
                        None => return Err(self.bad_value(field, kind, value)),
                    },
                    _ => return Err(self.bad_value(field, kind, value)),
                };
                (
                    Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)),
                    *boost,
                )
            }
            Clause::Fuzzy {
                field,
                value,
                max_edits,
                boost,
            } => {
                let (f, kind) = self.field(field)?;
                if *max_edits > 2 {
                    return Err(SearchError::BadField {
                        index: self.spec.name.clone(),
                        detail: format!(
                            "fuzzy clause on `{field}` asks for {max_edits} edits; use 0, 1 or 2"
                        ),
                    });
                }
                let term = match kind {
                    FieldKind::Keyword => Term::from_field_text(f, value),
                    FieldKind::Text => Term::from_field_text(f, &value.to_lowercase()),
                    FieldKind::Integer => {
                        return Err(self.wrong_kind(field, kind, "a fuzzy clause"));
                    }
                };
                (
                    Box::new(FuzzyTermQuery::new(term, *max_edits, true)),
                    *boost,
                )
            }
            Clause::Match { field, text, boost } => {
                let (f, kind) = self.field(field)?;
                if kind == FieldKind::Integer {
                    return Err(self.wrong_kind(field, kind, "a match clause"));
                }
                let terms = self.tokenize(f, text)?;
                let query: Box<dyn EngineQuery> = if terms.is_empty() {
                    Box::new(EmptyQuery)
                } else {
                    let should = terms
                        .into_iter()
                        .map(|t| {
                            let term = Term::from_field_text(f, &t);
                            let q: Box<dyn EngineQuery> =
                                Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs));
                            (Occur::Should, q)
                        })
                        .collect();
                    Box::new(BooleanQuery::with_minimum_required_clauses(should, 1))
                };
                (query, *boost)
            }
            Clause::Range { field, gte, lte } => {
                let (f, kind) = self.field(field)?;
                if kind != FieldKind::Integer {
                    return Err(self.wrong_kind(field, kind, "a range clause"));
                }
                let bound = |b: &Option<i64>| match b {
                    Some(v) => Bound::Included(Term::from_field_i64(f, *v)),
                    None => Bound::Unbounded,
                };
                let query: Box<dyn EngineQuery> = if gte.is_none() && lte.is_none() {
                    // tantivy's range query needs a bound; without one it means "has a value".
                    Box::new(ExistsQuery::new(field.clone(), false))
                } else {
                    Box::new(RangeQuery::new(bound(gte), bound(lte)))
                };
                (query, 1.0)
            }
        };
        if boost == 1.0 {
            Ok(query)
        } else {
            Ok(Box::new(BoostQuery::new(query, boost)))
        }
    }

    /// The tokens the field's analyzer makes of `text`, as the index stored them.
    fn tokenize(&self, field: Field, text: &str) -> Result<Vec<String>, SearchError> {
        let mut analyzer = self
            .index
            .tokenizer_for_field(field)
            .map_err(|e| self.engine_error(e))?;
        let mut stream = analyzer.token_stream(text);
        let mut tokens = Vec::new();
        stream.process(&mut |token| tokens.push(token.text.clone()));
        tokens.sort();
        tokens.dedup();
        Ok(tokens)
    }

    fn field(&self, name: &str) -> Result<(Field, FieldKind), SearchError> {
        self.fields
            .get(name)
            .map(|f| (f.field, f.kind))
            .ok_or_else(|| SearchError::BadField {
                index: self.spec.name.clone(),
                detail: format!(
                    "no searchable field `{name}`; the index has {}",
                    describe_fields(&self.spec.fields)
                ),
            })
    }

    fn bad_value(&self, field: &str, kind: FieldKind, value: &Value) -> SearchError {
        SearchError::BadField {
            index: self.spec.name.clone(),
            detail: format!(
                "field `{field}` is {} and cannot be compared with {value}; use {}",
                kind_name(kind),
                expected_value(kind)
            ),
        }
    }

    fn wrong_kind(&self, field: &str, kind: FieldKind, what: &str) -> SearchError {
        SearchError::BadField {
            index: self.spec.name.clone(),
            detail: format!(
                "field `{field}` is {} and cannot take {what}",
                kind_name(kind)
            ),
        }
    }

    fn engine_error(&self, e: tantivy::TantivyError) -> SearchError {
        engine(format!("index `{}`", self.spec.name), e)
    }
}

/// The tantivy schema for a spec: `_id`, `_source`, then one field per searchable field.
fn build_schema(spec: &IndexSpec) -> Schema {
    let mut builder = Schema::builder();
    builder.add_text_field(ID_FIELD, STRING | STORED | FAST);
    builder.add_text_field(SOURCE_FIELD, STORED);
    for field in &spec.fields {
        match field.kind {
            FieldKind::Keyword => builder.add_text_field(&field.name, STRING),
            // Queries match words, never phrases: no positions to keep.
            FieldKind::Text => builder.add_text_field(
                &field.name,
                TextOptions::default().set_indexing_options(
                    TextFieldIndexing::default()
                        .set_tokenizer("default")
                        .set_index_option(IndexRecordOption::WithFreqs),
                ),
            ),
            FieldKind::Integer => builder.add_i64_field(&field.name, INDEXED | FAST),
        };
    }
    builder.build()
}

/// Adds one source value to the document, checking it suits the field's kind.
fn add_value(
    document: &mut TantivyDocument,
    field: Field,
    kind: FieldKind,
    name: &str,
    value: &Value,
) -> Result<(), String> {
    match value {
        // As in Elasticsearch, null means "no value".
        Value::Null => Ok(()),
        Value::Array(items) => items.iter().try_for_each(|item| match item {
            Value::Array(_) => Err(format!(
                "field `{name}` holds a nested array; use {}",
                expected_value(kind)
            )),
            scalar => add_value(document, field, kind, name, scalar),
        }),
        Value::String(s) if kind != FieldKind::Integer => {
            if kind == FieldKind::Keyword && s.len() > MAX_KEYWORD_BYTES {
                return Err(format!(
                    "keyword field `{name}` holds {} bytes; the limit is {MAX_KEYWORD_BYTES}",
                    s.len()
                ));
            }
            document.add_text(field, s);
            Ok(())
        }
        Value::Number(n) if kind == FieldKind::Integer => match n.as_i64() {
            Some(i) => {
                document.add_i64(field, i);
                Ok(())
            }
            None => Err(format!(
                "integer field `{name}` holds {n}, which is not a 64-bit integer"
            )),
        },
        other => Err(format!(
            "field `{name}` is {} but holds {}; use {}",
            kind_name(kind),
            json_type(other),
            expected_value(kind)
        )),
    }
}

fn read_spec(path: &Path) -> Result<IndexSpec, SearchError> {
    let bytes = fs::read(path).map_err(|source| io_error(path, source))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        SearchError::Engine(format!(
            "{} is not a valid index description ({e}); restore it or remove the index folder",
            path.display()
        ))
    })
}

/// Writes the spec through a temporary file and a rename, so the file is whole or absent.
fn write_spec(path: &Path, spec: &IndexSpec) -> Result<(), SearchError> {
    let json = serde_json::to_vec_pretty(spec)
        .map_err(|e| engine("cannot describe the index as JSON", e))?;
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, json).map_err(|source| io_error(&tmp, source))?;
    fs::rename(&tmp, path).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> SearchError {
    SearchError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn engine(context: impl Display, e: impl Display) -> SearchError {
    SearchError::Engine(format!("{context}: {e}"))
}
