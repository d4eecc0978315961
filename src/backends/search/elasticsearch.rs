//! The Elasticsearch search index: one Elasticsearch index per index name,
//! spoken to over the REST API with the official `elasticsearch` client. Only
//! APIs that Elasticsearch 7.10+ and OpenSearch both serve are used.
//!
//! Every index is created with explicit mappings (`dynamic: false`), so the
//! fields of the [`IndexSpec`] are the only searchable ones and other document
//! fields are kept in `_source` only, as in the embedded index. Text fields use
//! an analyzer that splits and lower-cases like the embedded (tantivy) index,
//! so the same [`Query`] finds the same documents on either backend.
//!
//! Documents are checked against the spec before they are sent, with the same
//! rules and messages as the embedded index; Elasticsearch would otherwise
//! coerce some values (a number into a keyword) that the embedded index refuses.
//!
//! Every request is idempotent (documents are written under their id), so
//! requests that fail for a passing reason (connection refused or reset, 429,
//! 502-504) are retried with exponential backoff and jitter, briefly, before
//! the error is returned. Items of a bulk request that the cluster rejects as
//! overloaded (429) are sent again the same way; other per-item failures are
//! reported in [`BulkReport::failed`].
//!
//! A bulk load ([`SearchIndex::begin_bulk_load`]) turns refreshes off
//! (`index.refresh_interval: -1`) and drops replicas (`index.number_of_replicas:
//! 0`), which the Elasticsearch manual advises for large loads; the settings
//! are read first and put back by `end_bulk_load` (an unset setting is reset
//! to the cluster's default with `null`).

use super::{
    compare_fields, describe_fields, expected_value, json_type, kind_name, validate_fields,
    validate_name,
};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::elasticsearch::auth::Credentials;
use ::elasticsearch::http::response::Response;
use ::elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use ::elasticsearch::http::{StatusCode, Url};
use ::elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteParts, IndicesGetMappingParts, IndicesGetSettingsParts,
    IndicesPutSettingsParts, IndicesRefreshParts,
};
use ::elasticsearch::{BulkParts, CountParts, DeleteParts, Elasticsearch, GetParts, SearchParts};
use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    BulkReport, Clause, FieldKind, FieldSpec, Hit, IndexSpec, LoadSettings, Query, SearchDoc,
    SearchError, SearchIndex,
};
use crate::config::ElasticsearchConfig;

/// Keyword copy of the document id, indexed but left out of the stored
/// `_source`. Equal scores are ordered by id, as in the embedded index, and
/// Elasticsearch 8+ refuses to sort on `_id` itself. The leading `-` keeps it
/// apart from every field a spec may declare (those may not start with `-`).
const ID_FIELD: &str = "-sift-id";
/// Analyzer of text fields, defined in each index's settings.
const TEXT_ANALYZER: &str = "sift_text";
/// Longest accepted id: Elasticsearch's limit.
const MAX_ID_BYTES: usize = 512;
/// Longest accepted keyword value: Lucene's term limit.
const MAX_KEYWORD_BYTES: usize = 32_766;
/// Longest accepted field name, as in the embedded index.
/// Most hits one search request may return (Elasticsearch's default
/// `index.max_result_window`); larger `k` are fetched in pages with `search_after`.
const PAGE_SIZE: usize = 10_000;
/// Terms one fuzzy clause may expand to. Elasticsearch's default of 50 can drop
/// real matches on a large index of names; 100 keeps a query of ten fuzzy
/// clauses under the default limit of 1024 clauses per query.
const FUZZY_MAX_EXPANSIONS: u32 = 100;
/// Bulk response fields this client reads; the rest is not sent back.
const BULK_FILTER: [&str; 2] = ["items.*.status", "items.*.error"];

/// A search index kept in an Elasticsearch (or OpenSearch) cluster.
///
/// One value serves the whole process: requests run concurrently over the
/// client's connection pool, and the value survives the cluster going away and
/// coming back (each request reconnects as needed).
pub struct ElasticsearchIndex {
    client: Elasticsearch,
    /// The cluster URL without credentials, for messages and logs.
    url: String,
    /// Timeout of one request, for messages.
    timeout: Duration,
    /// Specs of the indexes used so far, read from their mappings: bulk checks
    /// documents and search checks clauses against them without a round trip.
    /// An index deleted and created again with other fields behind this
    /// client's back keeps its old fields here until a call finds it missing.
    specs: RwLock<HashMap<String, Arc<IndexSpec>>>,
    /// Backoff between attempts of a request, and between rounds of bulk
    /// items rejected as overloaded.
    retry: ExponentialBuilder,
}

impl std::fmt::Debug for ElasticsearchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hand-written so that credentials never reach a log line.
        f.debug_struct("ElasticsearchIndex")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ElasticsearchIndex {
    /// Connects to the cluster at `config.url` and checks that it answers, so
    /// a wrong address or password shows at startup rather than at the first
    /// document. Uses HTTP basic authentication when `config.username` is set.
    pub async fn connect(config: &ElasticsearchConfig) -> Result<Self, SearchError> {
        // The URL is not echoed: it may hold a password.
        let url = Url::parse(&config.url).map_err(|e| {
            SearchError::Engine(format!(
                "search.elasticsearch.url is not a valid URL ({e}); write it like \
                 http://127.0.0.1:9200"
            ))
        })?;
        let shown = without_credentials(&url);
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SearchError::Engine(format!(
                "search.elasticsearch.url `{shown}` must start with http:// or https://"
            )));
        }
        let url_has_credentials = !url.username().is_empty() || url.password().is_some();
        let mut builder =
            TransportBuilder::new(SingleNodeConnectionPool::new(url)).timeout(config.timeout);
        if !config.username.is_empty() {
            if url_has_credentials {
                return Err(SearchError::Engine(format!(
                    "search.elasticsearch.url `{shown}` carries a user and so do \
                     search.elasticsearch.username and password; give them in one place only"
                )));
            }
            builder = builder.auth(Credentials::Basic(
                config.username.clone(),
                config.password.clone(),
            ));
        }
        let transport = builder.build().map_err(|e| {
            SearchError::Engine(format!(
                "cannot set up the Elasticsearch client for {shown}: {e}"
            ))
        })?;
        let index = ElasticsearchIndex {
            client: Elasticsearch::new(transport),
            url: shown,
            timeout: config.timeout,
            specs: RwLock::new(HashMap::new()),
            retry: ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(6)
                .with_jitter(),
        };
        index.check_cluster().await?;
        Ok(index)
    }

    /// Asks the cluster who it is; logs its version.
    async fn check_cluster(&self) -> Result<(), SearchError> {
        let what = "connecting";
        let response = self.call(what, || self.client.info().send()).await?;
        if response.status_code() == StatusCode::FORBIDDEN {
            // Signed in, but without the cluster-monitor privilege `GET /`
            // needs; the index privileges sift uses may still be there.
            tracing::warn!(
                url = %self.url,
                "the search cluster does not let this user read its version; continuing"
            );
            return Ok(());
        }
        if !response.status_code().is_success() {
            return Err(self.failure(what, None, response).await);
        }
        let info: Value = self.parse(what, response).await?;
        let version = &info["version"];
        tracing::info!(
            url = %self.url,
            distribution = version["distribution"].as_str().unwrap_or("elasticsearch"),
            version = version["number"].as_str().unwrap_or("unknown"),
            "connected to the search cluster"
        );
        Ok(())
    }

    /// Sends a request made by `send`, again after a backoff while it fails for
    /// a passing reason. Returns the last response whatever its status; an
    /// error only when no response came.
    async fn call<F, Fut>(&self, what: &str, send: F) -> Result<Response, SearchError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Response, ::elasticsearch::Error>>,
    {
        let mut delays = self.retry.build();
        loop {
            let outcome = send().await;
            let problem = match &outcome {
                Ok(response) if is_transient(response.status_code()) => {
                    Some(format!("status {}", response.status_code()))
                }
                Ok(_) => None,
                // A timed-out request may still be running on the cluster; it
                // is reported rather than piled onto.
                Err(e) if e.is_timeout() || e.is_json() => None,
                Err(e) => Some(error_chain(e)),
            };
            if let Some(problem) = problem {
                if let Some(delay) = delays.next() {
                    tracing::warn!(
                        url = %self.url,
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        %problem,
                        "search cluster request failed while {what}; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            return outcome.map_err(|e| self.unreachable(what, &e));
        }
    }

    /// The error for a request that got no response.
    fn unreachable(&self, what: &str, e: &::elasticsearch::Error) -> SearchError {
        if e.is_timeout() {
            SearchError::Engine(format!(
                "Elasticsearch at {} did not answer within {} while {what}; the cluster may \
                 be overloaded, or raise search.elasticsearch.timeout",
                self.url,
                humantime::format_duration(self.timeout)
            ))
        } else {
            SearchError::Engine(format!(
                "cannot reach Elasticsearch at {} while {what}: {}; check that the cluster is \
                 running and that search.elasticsearch.url points to it",
                self.url,
                error_chain(e)
            ))
        }
    }

    /// The error for a response with an unexpected status.
    async fn failure(&self, what: &str, index: Option<&str>, response: Response) -> SearchError {
        let failure = read_failure(response).await;
        self.failure_error(what, index, failure)
    }

    fn failure_error(&self, what: &str, index: Option<&str>, failure: Failure) -> SearchError {
        let Failure {
            status,
            kind,
            reason,
        } = failure;
        if let Some(index) = index {
            if kind.as_deref() == Some("index_not_found_exception") {
                self.specs.write().remove(index);
                return SearchError::NoSuchIndex(index.to_owned());
            }
        }
        let advice = match status.as_u16() {
            401 | 403 => "; check search.elasticsearch.username and password",
            413 => "; send fewer documents per bulk request",
            429 => "; the cluster is overloaded, try again later",
            500.. => "; check the cluster's health and logs",
            _ => "",
        };
        SearchError::Engine(format!(
            "Elasticsearch at {} answered {status} while {what}: {reason}{advice}",
            self.url
        ))
    }

    /// Reads a successful response body as `T`.
    async fn parse<T: DeserializeOwned>(
        &self,
        what: &str,
        response: Response,
    ) -> Result<T, SearchError> {
        response.json::<T>().await.map_err(|e| {
            SearchError::Engine(format!(
                "Elasticsearch at {} sent an answer this client cannot read while {what}: {}",
                self.url,
                error_chain(&e)
            ))
        })
    }

    /// The spec of `index`, from the cache or from its mapping.
    async fn spec(&self, index: &str) -> Result<Arc<IndexSpec>, SearchError> {
        validate_name(index)?;
        if let Some(spec) = self.specs.read().get(index) {
            return Ok(Arc::clone(spec));
        }
        let mapping = self
            .mapping(index)
            .await?
            .ok_or_else(|| SearchError::NoSuchIndex(index.to_owned()))?;
        let spec = Arc::new(spec_from_mapping(index, &mapping)?);
        self.specs
            .write()
            .insert(index.to_owned(), Arc::clone(&spec));
        Ok(spec)
    }

    /// The `mappings` object of `index`, or None when the index does not exist.
    async fn mapping(&self, index: &str) -> Result<Option<Value>, SearchError> {
        let what = format!("reading the mapping of index `{index}`");
        let (api, indices) = (self.client.indices(), [index]);
        let response = self
            .call(&what, || {
                api.get_mapping(IndicesGetMappingParts::Index(&indices))
                    .send()
            })
            .await?;
        if !response.status_code().is_success() {
            return match self.failure(&what, Some(index), response).await {
                SearchError::NoSuchIndex(_) => Ok(None),
                other => Err(other),
            };
        }
        let reply: Map<String, Value> = self.parse(&what, response).await?;
        // Keyed by the concrete index name, which differs when `index` is an alias.
        match reply.into_iter().next() {
            Some((_, mut entry)) => Ok(Some(entry["mappings"].take())),
            None => Ok(None),
        }
    }

    /// Creates `spec`'s index; false when it already existed (another caller
    /// created it in between).
    async fn create(&self, spec: &IndexSpec) -> Result<bool, SearchError> {
        let what = format!("creating index `{}`", spec.name);
        let (api, body) = (self.client.indices(), index_body(spec));
        let response = self
            .call(&what, || {
                api.create(IndicesCreateParts::Index(&spec.name))
                    .body(&body)
                    .send()
            })
            .await?;
        if response.status_code().is_success() {
            tracing::info!(index = %spec.name, url = %self.url, "created search index");
            return Ok(true);
        }
        let failure = read_failure(response).await;
        if failure.kind.as_deref() == Some("resource_already_exists_exception") {
            return Ok(false);
        }
        Err(self.failure_error(&what, Some(&spec.name), failure))
    }

    /// Sends one bulk request of pre-encoded documents and sorts the items into
    /// indexed, failed, and rejected as overloaded (returned, to send again).
    async fn bulk_round(
        &self,
        index: &str,
        pending: Vec<Encoded>,
        report: &mut BulkReport,
    ) -> Result<Vec<(Encoded, String)>, SearchError> {
        let what = format!("bulk indexing {} documents into `{index}`", pending.len());
        let body = {
            let size = pending.iter().map(|e| e.lines.len()).sum();
            let mut body = BytesMut::with_capacity(size);
            for encoded in &pending {
                body.put_slice(&encoded.lines);
            }
            body.freeze()
        };
        let response = self
            .call(&what, || {
                self.client
                    .bulk(BulkParts::Index(index))
                    .filter_path(&BULK_FILTER)
                    .body(vec![body.clone()])
                    .send()
            })
            .await?;
        if !response.status_code().is_success() {
            return Err(self.failure(&what, Some(index), response).await);
        }
        let reply: BulkReply = self.parse(&what, response).await?;
        if reply.items.len() != pending.len() {
            return Err(SearchError::Engine(format!(
                "Elasticsearch at {} answered {} items to {what}; the documents' state is \
                 unknown, index them again",
                self.url,
                reply.items.len()
            )));
        }
        let mut overloaded = Vec::new();
        for (encoded, item) in pending.into_iter().zip(reply.items) {
            // One action per item, keyed by its name (`index`).
            let Some(result) = item.into_values().next() else {
                report.failed.push((
                    encoded.id,
                    "Elasticsearch answered an empty item".to_owned(),
                ));
                continue;
            };
            let reason = || {
                result.error.as_ref().map_or_else(
                    || format!("status {}", result.status),
                    describe_engine_error,
                )
            };
            match result.status {
                200..=299 => report.indexed += 1,
                429 => {
                    let why = reason();
                    overloaded.push((encoded, why));
                }
                _ => {
                    let why = reason();
                    report.failed.push((encoded.id, why));
                }
            }
        }
        Ok(overloaded)
    }

    /// Runs one search request.
    /// `_count` of `index` with `body` (a query).
    async fn count_with(&self, index: &str, what: &str, body: Value) -> Result<u64, SearchError> {
        let indices = [index];
        let response = self
            .call(what, || {
                self.client
                    .count(CountParts::Index(&indices))
                    .body(body.clone())
                    .send()
            })
            .await?;
        if !response.status_code().is_success() {
            return Err(self.failure(what, Some(index), response).await);
        }
        let reply: CountReply = self.parse(what, response).await?;
        self.check_shards(what, &reply.shards)?;
        Ok(reply.count)
    }

    async fn search_page(&self, index: &str, body: &Value) -> Result<SearchReply, SearchError> {
        let what = format!("searching index `{index}`");
        let indices = [index];
        let response = self
            .call(&what, || {
                self.client
                    .search(SearchParts::Index(&indices))
                    .body(body)
                    .send()
            })
            .await?;
        if !response.status_code().is_success() {
            return Err(self.failure(&what, Some(index), response).await);
        }
        let reply: SearchReply = self.parse(&what, response).await?;
        self.check_shards(&what, &reply.shards)?;
        Ok(reply)
    }

    /// Changes settings of `index` (`body` as for `PUT /{index}/_settings`).
    async fn put_settings(&self, index: &str, body: &Value) -> Result<(), SearchError> {
        validate_name(index)?;
        let what = format!("changing the settings of index `{index}`");
        let (api, indices) = (self.client.indices(), [index]);
        let response = self
            .call(&what, || {
                api.put_settings(IndicesPutSettingsParts::Index(&indices))
                    .body(body)
                    .send()
            })
            .await?;
        if !response.status_code().is_success() {
            return Err(self.failure(&what, Some(index), response).await);
        }
        let reply: Value = self.parse(&what, response).await?;
        if reply["acknowledged"] != Value::Bool(true) {
            // The change is made; some node had not confirmed it in time.
            tracing::warn!(index, url = %self.url, "the cluster did not acknowledge a settings change in time; it applies once every node has it");
        }
        Ok(())
    }

    /// Refuses partial answers: a result missing some shards would look complete.
    fn check_shards(&self, what: &str, shards: &ShardsReply) -> Result<(), SearchError> {
        if shards.failed == 0 {
            return Ok(());
        }
        Err(SearchError::Engine(format!(
            "Elasticsearch at {} reached only {} of {} shards while {what}; check the \
             cluster's health and try again",
            self.url, shards.successful, shards.total
        )))
    }
}

#[async_trait]
impl SearchIndex for ElasticsearchIndex {
    async fn ensure_index(&self, spec: &IndexSpec) -> Result<(), SearchError> {
        validate_name(&spec.name)?;
        validate_fields(spec)?;
        let mapping = match self.mapping(&spec.name).await? {
            Some(mapping) => mapping,
            None => {
                if self.create(spec).await? {
                    self.specs
                        .write()
                        .insert(spec.name.clone(), Arc::new(spec.clone()));
                    return Ok(());
                }
                self.mapping(&spec.name).await?.ok_or_else(|| {
                    SearchError::Engine(format!(
                        "index `{}` was reported as existing but has no mapping at {}; \
                         something else is creating and deleting it",
                        spec.name, self.url
                    ))
                })?
            }
        };
        let stored = spec_from_mapping(&spec.name, &mapping)?;
        compare_fields(&stored, spec)?;
        self.specs
            .write()
            .insert(spec.name.clone(), Arc::new(stored));
        Ok(())
    }

    /// An `Err` leaves the batch partly written or not at all; indexing it
    /// again is safe, because documents are written under their ids.
    async fn bulk(&self, index: &str, docs: Vec<SearchDoc>) -> Result<BulkReport, SearchError> {
        let spec = self.spec(index).await?;
        let mut report = BulkReport::default();
        let mut pending = Vec::with_capacity(docs.len());
        for doc in docs {
            match encode(&spec, doc) {
                Ok(encoded) => pending.push(encoded),
                Err((id, reason)) => report.failed.push((id, reason)),
            }
        }
        let mut delays = self.retry.build();
        while !pending.is_empty() {
            let overloaded = self.bulk_round(index, pending, &mut report).await?;
            pending = Vec::new();
            if overloaded.is_empty() {
                break;
            }
            match delays.next() {
                Some(delay) => {
                    tracing::warn!(
                        index,
                        url = %self.url,
                        documents = overloaded.len(),
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "search cluster rejected bulk items as overloaded; sending them again"
                    );
                    tokio::time::sleep(delay).await;
                    pending = overloaded.into_iter().map(|(encoded, _)| encoded).collect();
                }
                None => {
                    for (encoded, reason) in overloaded {
                        report.failed.push((
                            encoded.id,
                            format!(
                                "the cluster stayed overloaded (429) through every retry: \
                                 {reason}; index the document again later"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(report)
    }

    async fn delete(&self, index: &str, id: &str) -> Result<(), SearchError> {
        validate_name(index)?;
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            // No document can have such an id; only the index must exist.
            return self.spec(index).await.map(|_| ());
        }
        let what = format!("deleting document `{id}` from `{index}`");
        let response = self
            .call(&what, || {
                self.client.delete(DeleteParts::IndexId(index, id)).send()
            })
            .await?;
        let status = response.status_code();
        if status.is_success() {
            return Ok(());
        }
        let failure = read_failure(response).await;
        if status == StatusCode::NOT_FOUND && failure.kind.is_none() {
            // The document was not there: deleting it is done.
            return Ok(());
        }
        Err(self.failure_error(&what, Some(index), failure))
    }

    async fn drop_index(&self, index: &str) -> Result<bool, SearchError> {
        validate_name(index)?;
        let what = format!("deleting index `{index}`");
        let (api, indices) = (self.client.indices(), [index]);
        let response = self
            .call(&what, || {
                api.delete(IndicesDeleteParts::Index(&indices)).send()
            })
            .await?;
        self.specs.write().remove(index);
        if response.status_code().is_success() {
            tracing::info!(index, url = %self.url, "deleted search index");
            return Ok(true);
        }
        match self.failure(&what, Some(index), response).await {
            SearchError::NoSuchIndex(_) => Ok(false),
            other => Err(other),
        }
    }

    async fn refresh(&self, index: &str) -> Result<(), SearchError> {
        validate_name(index)?;
        let what = format!("refreshing index `{index}`");
        let (api, indices) = (self.client.indices(), [index]);
        let response = self
            .call(&what, || {
                api.refresh(IndicesRefreshParts::Index(&indices)).send()
            })
            .await?;
        if !response.status_code().is_success() {
            return Err(self.failure(&what, Some(index), response).await);
        }
        let reply: RefreshReply = self.parse(&what, response).await?;
        self.check_shards(&what, &reply.shards)
    }

    async fn get(&self, index: &str, id: &str) -> Result<Option<SearchDoc>, SearchError> {
        validate_name(index)?;
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return self.spec(index).await.map(|_| None);
        }
        let what = format!("fetching document `{id}` from `{index}`");
        let response = self
            .call(&what, || {
                self.client.get(GetParts::IndexId(index, id)).send()
            })
            .await?;
        let status = response.status_code();
        if status.is_success() {
            let reply: GetReply = self.parse(&what, response).await?;
            return Ok(reply.found.then(|| SearchDoc {
                id: id.to_owned(),
                source: reply.source,
            }));
        }
        let failure = read_failure(response).await;
        if status == StatusCode::NOT_FOUND && failure.kind.is_none() {
            return Ok(None);
        }
        Err(self.failure_error(&what, Some(index), failure))
    }

    async fn count(&self, index: &str) -> Result<u64, SearchError> {
        validate_name(index)?;
        let what = format!("counting the documents of `{index}`");
        self.count_with(index, &what, json!({ "query": { "match_all": {} } }))
            .await
    }

    async fn count_matching(&self, index: &str, query: &Query) -> Result<u64, SearchError> {
        let spec = self.spec(index).await?;
        let Some(engine_query) = build_query(&spec, query)? else {
            return Ok(0);
        };
        let what = format!("counting the documents of `{index}` a query matches");
        self.count_with(index, &what, json!({ "query": engine_query }))
            .await
    }

    async fn search(&self, index: &str, query: &Query) -> Result<Vec<Hit>, SearchError> {
        let spec = self.spec(index).await?;
        // Built first, so a bad clause is reported even when k is 0.
        let Some(engine_query) = build_query(&spec, query)? else {
            return Ok(Vec::new());
        };
        let mut hits: Vec<Hit> = Vec::with_capacity(query.k.min(PAGE_SIZE));
        let mut after: Option<Value> = None;
        while hits.len() < query.k {
            let size = (query.k - hits.len()).min(PAGE_SIZE);
            let mut body = json!({
                "query": engine_query,
                "size": size,
                // Best score first, equal scores by ascending id, as in the
                // embedded index, so results do not depend on segment layout.
                "sort": [
                    { "_score": "desc" },
                    { ID_FIELD: { "order": "asc", "unmapped_type": "keyword" } },
                ],
                "track_scores": true,
                "track_total_hits": false,
            });
            if let Some(after) = after.take() {
                body["search_after"] = after;
            }
            let page = self.search_page(index, &body).await?.hits.hits;
            let full = page.len() == size;
            after = page.last().map(|hit| Value::Array(hit.sort.clone()));
            hits.extend(page.into_iter().map(|hit| Hit {
                id: hit.id,
                // Scores are f32 in Lucene; the JSON carries them as f64.
                score: hit.score.unwrap_or(0.0) as f32,
                source: hit.source,
            }));
            if !full {
                break;
            }
        }
        Ok(hits)
    }

    async fn bulk_load_settings(&self, index: &str) -> Result<LoadSettings, SearchError> {
        validate_name(index)?;
        let what = format!("reading the settings of index `{index}`");
        let (api, indices) = (self.client.indices(), [index]);
        let response = self
            .call(&what, || {
                api.get_settings(IndicesGetSettingsParts::Index(&indices))
                    .flat_settings(true)
                    .send()
            })
            .await?;
        if !response.status_code().is_success() {
            return Err(self.failure(&what, Some(index), response).await);
        }
        let reply: Map<String, Value> = self.parse(&what, response).await?;
        // Keyed by the concrete index name, which differs when `index` is an alias.
        let settings = reply
            .into_iter()
            .next()
            .map(|(_, mut entry)| entry["settings"].take())
            .ok_or_else(|| SearchError::NoSuchIndex(index.to_owned()))?;
        load_settings(index, &settings)
    }

    async fn begin_bulk_load(&self, index: &str) -> Result<LoadSettings, SearchError> {
        let before = self.bulk_load_settings(index).await?;
        let body = json!({ "index": { "refresh_interval": "-1", "number_of_replicas": 0 } });
        self.put_settings(index, &body).await?;
        tracing::info!(
            index,
            url = %self.url,
            found_refresh_interval = before.refresh_interval.as_deref().unwrap_or("default"),
            found_number_of_replicas = before
                .number_of_replicas
                .map_or_else(|| "default".to_owned(), |n| n.to_string()),
            "bulk load: refreshes off and no replicas until it ends"
        );
        Ok(before)
    }

    async fn end_bulk_load(&self, index: &str, restore: &LoadSettings) -> Result<(), SearchError> {
        // `null` resets a setting the index did not have to the cluster's default.
        let body = json!({
            "index": {
                "refresh_interval": restore.refresh_interval,
                "number_of_replicas": restore.number_of_replicas,
            }
        });
        self.put_settings(index, &body).await?;
        self.refresh(index).await
    }
}

/// The settings a bulk load changes, from the flat settings of an index
/// (`GET /{index}/_settings?flat_settings=true`); absent ones are `None`.
fn load_settings(index: &str, settings: &Value) -> Result<LoadSettings, SearchError> {
    let unreadable = |key: &str, value: &Value| {
        SearchError::Engine(format!(
            "index `{index}` has `{key}` = {value}, which this client cannot read; \
             check the index settings"
        ))
    };
    let refresh_key = "index.refresh_interval";
    let refresh_interval = match settings.get(refresh_key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(unreadable(refresh_key, other)),
    };
    let replicas_key = "index.number_of_replicas";
    let number_of_replicas = match settings.get(replicas_key) {
        None | Some(Value::Null) => None,
        // Settings come back as strings; accept numbers too.
        Some(Value::String(s)) => Some(
            s.parse::<u32>()
                .map_err(|_| unreadable(replicas_key, &Value::String(s.clone())))?,
        ),
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| unreadable(replicas_key, &Value::Number(n.clone())))?,
        ),
        Some(other) => return Err(unreadable(replicas_key, other)),
    };
    Ok(LoadSettings {
        refresh_interval,
        number_of_replicas,
    })
}

/// A document ready for a bulk request: its action and source lines.
struct Encoded {
    id: String,
    lines: Bytes,
}

/// Checks `doc` against `spec` and encodes it, or says why it cannot be indexed.
fn encode(spec: &IndexSpec, doc: SearchDoc) -> Result<Encoded, (String, String)> {
    let SearchDoc { id, mut source } = doc;
    if let Err(reason) = check_document(spec, &id, &source) {
        return Err((id, reason));
    }
    source.insert(ID_FIELD.to_owned(), Value::String(id.clone()));
    let action = json!({ "index": { "_id": id } });
    let mut lines = Vec::new();
    let written = serde_json::to_writer(&mut lines, &action)
        .and_then(|()| {
            lines.push(b'\n');
            serde_json::to_writer(&mut lines, &source)
        })
        .map(|()| lines.push(b'\n'));
    match written {
        Ok(()) => Ok(Encoded {
            id,
            lines: Bytes::from(lines),
        }),
        Err(e) => Err((id, format!("the document cannot be encoded as JSON: {e}"))),
    }
}

/// The rules of the embedded index: an id of 1-512 bytes, and values that
/// suit the kinds of the spec's fields.
fn check_document(spec: &IndexSpec, id: &str, source: &Map<String, Value>) -> Result<(), String> {
    if id.is_empty() {
        return Err("the document id is empty".to_owned());
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "the document id is {} bytes long; the limit is {MAX_ID_BYTES}",
            id.len()
        ));
    }
    if source.contains_key(ID_FIELD) {
        return Err(format!(
            "the field name `{ID_FIELD}` is reserved by the Elasticsearch backend; rename the field"
        ));
    }
    for (name, value) in source {
        if let Some(kind) = spec.kind_of(name) {
            check_value(kind, name, value)?;
        }
    }
    Ok(())
}

/// Whether one source value suits the field's kind.
fn check_value(kind: FieldKind, name: &str, value: &Value) -> Result<(), String> {
    match value {
        // As in Elasticsearch, null means "no value".
        Value::Null => Ok(()),
        Value::Array(items) => items.iter().try_for_each(|item| match item {
            Value::Array(_) => Err(format!(
                "field `{name}` holds a nested array; use {}",
                expected_value(kind)
            )),
            scalar => check_value(kind, name, scalar),
        }),
        Value::String(s) if kind != FieldKind::Integer => {
            if kind == FieldKind::Keyword && s.len() > MAX_KEYWORD_BYTES {
                return Err(format!(
                    "keyword field `{name}` holds {} bytes; the limit is {MAX_KEYWORD_BYTES}",
                    s.len()
                ));
            }
            Ok(())
        }
        Value::Number(n) if kind == FieldKind::Integer => match n.as_i64() {
            Some(_) => Ok(()),
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

/// The settings and mappings of a new index for `spec`.
fn index_body(spec: &IndexSpec) -> Value {
    let mut source_excludes = vec![ID_FIELD.to_owned()];
    source_excludes.extend(spec.source_excludes.iter().cloned());
    let mut properties = Map::new();
    properties.insert(ID_FIELD.to_owned(), json!({ "type": "keyword" }));
    for field in &spec.fields {
        let mapping = match field.kind {
            FieldKind::Keyword => json!({ "type": "keyword" }),
            FieldKind::Text => json!({ "type": "text", "analyzer": TEXT_ANALYZER }),
            // Without coercion a string like "1975" is refused, as in the embedded index.
            FieldKind::Integer => json!({ "type": "long", "coerce": false }),
        };
        properties.insert(field.name.clone(), mapping);
    }
    json!({
        "settings": {
            "analysis": {
                // The embedded (tantivy) text analysis: runs of letters, marks and
                // digits, tokens over 40 characters dropped, lower-cased.
                "tokenizer": {
                    "sift_words": { "type": "pattern", "pattern": "[^\\p{L}\\p{M}\\p{N}]+" }
                },
                "filter": {
                    "sift_max_40": { "type": "length", "max": 40 }
                },
                "analyzer": {
                    TEXT_ANALYZER: {
                        "type": "custom",
                        "tokenizer": "sift_words",
                        "filter": ["sift_max_40", "lowercase"]
                    }
                }
            }
        },
        "mappings": {
            // Fields outside the spec are stored in `_source` but not indexed.
            "dynamic": false,
            "_source": { "excludes": source_excludes },
            "properties": properties
        }
    })
}

/// The spec an existing index was created with, read back from its mapping.
fn spec_from_mapping(index: &str, mapping: &Value) -> Result<IndexSpec, SearchError> {
    let foreign = |detail: String| SearchError::SchemaMismatch {
        index: index.to_owned(),
        detail: format!("{detail}; it was not created by sift, use another index name"),
    };
    let empty = Map::new();
    let properties = mapping
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    if !properties.contains_key(ID_FIELD) {
        return Err(foreign(format!("its mapping has no `{ID_FIELD}` field")));
    }
    let mut fields = Vec::new();
    collect_fields("", properties, &mut fields).map_err(foreign)?;
    let source_excludes = mapping
        .pointer("/_source/excludes")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(Value::as_str)
                .filter(|name| *name != ID_FIELD)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(IndexSpec {
        name: index.to_owned(),
        fields,
        source_excludes,
    })
}

/// Adds the fields of a mapping's `properties` to `fields`. Dotted field names
/// come back from Elasticsearch as nested objects, and are put back together.
fn collect_fields(
    prefix: &str,
    properties: &Map<String, Value>,
    fields: &mut Vec<FieldSpec>,
) -> Result<(), String> {
    for (name, mapping) in properties {
        if prefix.is_empty() && name == ID_FIELD {
            continue;
        }
        let full = format!("{prefix}{name}");
        let kind = match mapping.get("type").and_then(Value::as_str) {
            Some("keyword") => FieldKind::Keyword,
            Some("text") => FieldKind::Text,
            Some("long") => FieldKind::Integer,
            None | Some("object") => {
                let inner = mapping
                    .get("properties")
                    .and_then(Value::as_object)
                    .ok_or_else(|| format!("field `{full}` has neither a type nor properties"))?;
                collect_fields(&format!("{full}."), inner, fields)?;
                continue;
            }
            Some(other) => {
                return Err(format!(
                    "field `{full}` has type `{other}`, which sift does not use"
                ))
            }
        };
        fields.push(FieldSpec { name: full, kind });
    }
    Ok(())
}

/// The Elasticsearch query for `query`, or None when nothing can match
/// (more `should` clauses required than given, as in the embedded index).
fn build_query(spec: &IndexSpec, query: &Query) -> Result<Option<Value>, SearchError> {
    let clauses = |list: &[Clause]| -> Result<Vec<Value>, SearchError> {
        list.iter().map(|c| clause(spec, c)).collect()
    };
    let (must, should, filter) = (
        clauses(&query.must)?,
        clauses(&query.should)?,
        clauses(&query.filter)?,
    );
    if must.is_empty() && should.is_empty() && filter.is_empty() {
        return Ok(Some(json!({ "match_all": {} })));
    }
    // The trait's rule (Elasticsearch's own): with nothing else required, one
    // `should` must match.
    let min_should_match = if query.min_should_match == 0 && must.is_empty() && filter.is_empty() {
        1
    } else {
        query.min_should_match
    };
    // Elasticsearch lowers a larger minimum to the number of clauses; the
    // trait (and the embedded index) then match nothing.
    if min_should_match > should.len() {
        return Ok(None);
    }
    Ok(Some(json!({
        "bool": {
            "must": must,
            "should": should,
            "filter": filter,
            "minimum_should_match": min_should_match,
        }
    })))
}

/// One clause as an Elasticsearch query, checked against the field's kind.
fn clause(spec: &IndexSpec, clause: &Clause) -> Result<Value, SearchError> {
    // (query type, field, its parameters, boost)
    let shape = match clause {
        Clause::Term {
            field,
            value,
            boost,
        } => {
            let kind = field_kind(spec, field)?;
            let value = match (kind, value) {
                (FieldKind::Keyword, Value::String(s)) => json!(s),
                (FieldKind::Text, Value::String(s)) => json!(s.to_lowercase()),
                (FieldKind::Integer, Value::Number(n)) => match n.as_i64() {
                    Some(i) => json!(i),
                    None => return Err(bad_value(spec, field, kind, value)),
                },
                _ => return Err(bad_value(spec, field, kind, value)),
            };
            ("term", field, json!({ "value": value }), *boost)
        }
        Clause::Fuzzy {
            field,
            value,
            max_edits,
            boost,
        } => {
            let kind = field_kind(spec, field)?;
            if *max_edits > 2 {
                return Err(SearchError::BadField {
                    index: spec.name.clone(),
                    detail: format!(
                        "fuzzy clause on `{field}` asks for {max_edits} edits; use 0, 1 or 2"
                    ),
                });
            }
            let value = match kind {
                FieldKind::Keyword => value.clone(),
                FieldKind::Text => value.to_lowercase(),
                FieldKind::Integer => return Err(wrong_kind(spec, field, kind, "a fuzzy clause")),
            };
            let fuzzy = json!({
                "value": value,
                "fuzziness": max_edits,
                "transpositions": true,
                "prefix_length": 0,
                "max_expansions": FUZZY_MAX_EXPANSIONS,
            });
            ("fuzzy", field, fuzzy, *boost)
        }
        Clause::Match { field, text, boost } => {
            let kind = field_kind(spec, field)?;
            if kind == FieldKind::Integer {
                return Err(wrong_kind(spec, field, kind, "a match clause"));
            }
            ("match", field, json!({ "query": text }), *boost)
        }
        Clause::Range { field, gte, lte } => {
            let kind = field_kind(spec, field)?;
            if kind != FieldKind::Integer {
                return Err(wrong_kind(spec, field, kind, "a range clause"));
            }
            if gte.is_none() && lte.is_none() {
                // No bound: any value, as in the embedded index.
                return Ok(json!({ "exists": { "field": field } }));
            }
            let mut bounds = Map::new();
            if let Some(gte) = gte {
                bounds.insert("gte".to_owned(), json!(gte));
            }
            if let Some(lte) = lte {
                bounds.insert("lte".to_owned(), json!(lte));
            }
            ("range", field, Value::Object(bounds), 1.0)
        }
    };
    let (kind, field, mut params, boost) = shape;
    if boost != 1.0 {
        params["boost"] = json!(boost);
    }
    Ok(json!({ kind: { field: params } }))
}

fn field_kind(spec: &IndexSpec, name: &str) -> Result<FieldKind, SearchError> {
    spec.kind_of(name).ok_or_else(|| SearchError::BadField {
        index: spec.name.clone(),
        detail: format!(
            "no searchable field `{name}`; the index has {}",
            describe_fields(&spec.fields)
        ),
    })
}

fn bad_value(spec: &IndexSpec, field: &str, kind: FieldKind, value: &Value) -> SearchError {
    SearchError::BadField {
        index: spec.name.clone(),
        detail: format!(
            "field `{field}` is {} and cannot be compared with {value}; use {}",
            kind_name(kind),
            expected_value(kind)
        ),
    }
}

fn wrong_kind(spec: &IndexSpec, field: &str, kind: FieldKind, what: &str) -> SearchError {
    SearchError::BadField {
        index: spec.name.clone(),
        detail: format!(
            "field `{field}` is {} and cannot take {what}",
            kind_name(kind)
        ),
    }
}

/// Statuses that say "try again shortly": overloaded, or a proxy or the
/// cluster not ready (a node starting up answers 503).
fn is_transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// The URL as shown in messages: without user and password.
fn without_credentials(url: &Url) -> String {
    let mut shown = url.clone();
    // These fail only for URLs that cannot carry credentials, which have none to hide.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.as_str().trim_end_matches('/').to_owned()
}

/// An error and its causes, as one line (the HTTP client's own message leaves
/// out the cause, e.g. "connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What an error response said.
struct Failure {
    status: StatusCode,
    /// Elasticsearch's error type (`index_not_found_exception`), when the body has one.
    kind: Option<String>,
    /// A readable reason.
    reason: String,
}

async fn read_failure(response: Response) -> Failure {
    let status = response.status_code();
    let text = match response.text().await {
        Ok(text) => text,
        Err(e) => {
            return Failure {
                status,
                kind: None,
                reason: format!("the response body could not be read: {}", error_chain(&e)),
            }
        }
    };
    let error = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|mut body| body.get_mut("error").map(Value::take));
    match error {
        Some(error) => Failure {
            status,
            kind: error.get("type").and_then(Value::as_str).map(str::to_owned),
            reason: describe_engine_error(&error),
        },
        None => {
            let mut reason: String = text.chars().take(500).collect();
            if reason.is_empty() {
                reason = "no details given".to_owned();
            }
            Failure {
                status,
                kind: None,
                reason,
            }
        }
    }
}

/// An Elasticsearch error object (`type`, `reason`, `caused_by`) as one line.
fn describe_engine_error(error: &Value) -> String {
    match error {
        Value::Object(fields) => {
            let kind = fields
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("error");
            let reason = fields
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            let mut text = format!("{kind}: {reason}");
            if let Some(cause) = fields.get("caused_by") {
                text.push_str(&format!(" (caused by {})", describe_engine_error(cause)));
            }
            text
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
struct BulkReply {
    #[serde(default)]
    items: Vec<HashMap<String, BulkItem>>,
}

#[derive(Deserialize)]
struct BulkItem {
    status: u16,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ShardsReply {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    successful: u64,
    #[serde(default)]
    failed: u64,
}

#[derive(Deserialize)]
struct RefreshReply {
    #[serde(rename = "_shards")]
    shards: ShardsReply,
}

#[derive(Deserialize)]
struct CountReply {
    count: u64,
    #[serde(rename = "_shards")]
    shards: ShardsReply,
}

#[derive(Deserialize)]
struct GetReply {
    found: bool,
    #[serde(rename = "_source", default)]
    source: Map<String, Value>,
}

#[derive(Deserialize)]
struct SearchReply {
    #[serde(rename = "_shards")]
    shards: ShardsReply,
    hits: HitsReply,
}

#[derive(Deserialize)]
struct HitsReply {
    hits: Vec<HitReply>,
}

#[derive(Deserialize)]
struct HitReply {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "_score")]
    score: Option<f64>,
    #[serde(rename = "_source", default)]
    source: Map<String, Value>,
    /// Sort values of the hit, the `search_after` key of the next page.
    #[serde(default)]
    sort: Vec<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> IndexSpec {
        IndexSpec {
            name: "people".to_owned(),
            source_excludes: Vec::new(),
            fields: vec![
                FieldSpec {
                    name: "last".to_owned(),
                    kind: FieldKind::Text,
                },
                FieldSpec {
                    name: "state".to_owned(),
                    kind: FieldKind::Keyword,
                },
                FieldSpec {
                    name: "year".to_owned(),
                    kind: FieldKind::Integer,
                },
            ],
        }
    }

    #[test]
    fn mapping_round_trips_to_the_spec() {
        let mut spec = spec();
        spec.fields.push(FieldSpec {
            name: "address.zip".to_owned(),
            kind: FieldKind::Keyword,
        });
        // As Elasticsearch returns it: dotted names as objects.
        let mut mapping = index_body(&spec)["mappings"].take();
        let props = mapping["properties"]
            .as_object_mut()
            .expect("the body has properties");
        props.remove("address.zip");
        props.insert(
            "address".to_owned(),
            json!({ "properties": { "zip": { "type": "keyword" } } }),
        );
        let back = spec_from_mapping("people", &mapping).expect("a sift mapping");
        compare_fields(&back, &spec).expect("the same fields");
    }

    #[test]
    fn foreign_mapping_is_a_mismatch() {
        let mapping = json!({ "properties": { "x": { "type": "keyword" } } });
        assert!(matches!(
            spec_from_mapping("other", &mapping),
            Err(SearchError::SchemaMismatch { .. })
        ));
    }

    #[test]
    fn min_should_match_follows_the_trait() {
        let term = |v: &str| Clause::Term {
            field: "state".to_owned(),
            value: json!(v),
            boost: 1.0,
        };
        let only_should = Query {
            should: vec![term("IL"), term("TX")],
            k: 5,
            ..Query::default()
        };
        let q = build_query(&spec(), &only_should)
            .expect("valid")
            .expect("can match");
        assert_eq!(q["bool"]["minimum_should_match"], json!(1));
        let with_must = Query {
            must: vec![term("IL")],
            ..only_should.clone()
        };
        let q = build_query(&spec(), &with_must)
            .expect("valid")
            .expect("can match");
        assert_eq!(q["bool"]["minimum_should_match"], json!(0));
        let impossible = Query {
            min_should_match: 3,
            ..only_should
        };
        assert_eq!(build_query(&spec(), &impossible).expect("valid"), None);
    }

    #[test]
    fn text_terms_are_lower_cased_and_keywords_are_not() {
        let text = Clause::Term {
            field: "last".to_owned(),
            value: json!("Smith"),
            boost: 2.0,
        };
        let q = clause(&spec(), &text).expect("valid");
        assert_eq!(q["term"]["last"]["value"], json!("smith"));
        assert_eq!(q["term"]["last"]["boost"], json!(2.0));
        let keyword = Clause::Term {
            field: "state".to_owned(),
            value: json!("IL"),
            boost: 1.0,
        };
        let q = clause(&spec(), &keyword).expect("valid");
        assert_eq!(q["term"]["state"]["value"], json!("IL"));
    }

    #[test]
    fn documents_are_checked_like_the_embedded_index() {
        let spec = spec();
        let doc = |source: Value| SearchDoc {
            id: "d".to_owned(),
            source: source.as_object().expect("an object").clone(),
        };
        assert!(encode(&spec, doc(json!({ "year": 1975, "state": ["IL"] }))).is_ok());
        for bad in [
            json!({ "year": "1975" }),
            json!({ "year": 19.5 }),
            json!({ "state": 5 }),
            json!({ "last": { "name": "x" } }),
            json!({ "state": [["IL"]] }),
            json!({ ID_FIELD: "x" }),
        ] {
            assert!(encode(&spec, doc(bad.clone())).is_err(), "{bad} must fail");
        }
        let encoded = encode(&spec, doc(json!({ "state": "IL" }))).expect("valid");
        let text = std::str::from_utf8(&encoded.lines).expect("utf-8");
        assert_eq!(
            text,
            format!("{{\"index\":{{\"_id\":\"d\"}}}}\n{{\"{ID_FIELD}\":\"d\",\"state\":\"IL\"}}\n")
        );
    }

    #[tokio::test]
    async fn credentials_in_two_places_are_refused() {
        let config = ElasticsearchConfig {
            url: "http://user:secret@127.0.0.1:9".to_owned(),
            username: "other".to_owned(),
            password: "secret2".to_owned(),
            ..ElasticsearchConfig::default()
        };
        let err = ElasticsearchIndex::connect(&config)
            .await
            .expect_err("two sets of credentials");
        let message = err.to_string();
        assert!(message.contains("one place"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }

    #[test]
    fn load_settings_are_read_from_flat_settings() {
        let settings = json!({
            "index.number_of_replicas": "1",
            "index.number_of_shards": "1",
            "index.refresh_interval": "30s",
        });
        assert_eq!(
            load_settings("people", &settings).expect("readable"),
            LoadSettings {
                refresh_interval: Some("30s".to_owned()),
                number_of_replicas: Some(1),
            }
        );
        assert_eq!(
            load_settings("people", &json!({})).expect("readable"),
            LoadSettings::default()
        );
        assert!(load_settings("people", &json!({ "index.number_of_replicas": "many" })).is_err());
    }

    #[test]
    fn shown_url_has_no_password() {
        let url = Url::parse("https://user:secret@es.example:9200/").expect("a URL");
        assert_eq!(without_credentials(&url), "https://es.example:9200");
    }
}
