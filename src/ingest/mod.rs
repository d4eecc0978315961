//! `sift ingest`: sources → fetch → extract → first filters → `sift.raw`.
//!
//! Each visit of a source finds its pages (the URL list, a sitemap's
//! `<loc>`s, a feed's item links, a directory's files, an object-store
//! prefix), keeps those its include/exclude patterns allow, and fetches them
//! concurrently through the polite [`fetch::Fetcher`]. A body is extracted
//! (the same code as `sift extract`), filtered (content type, minimum length),
//! de-duplicated by content hash within `ingest.dedupe_window`, wrapped in the
//! versioned envelope and produced to `sift.raw`, keyed by document id. A text
//! over `ingest.claim_check_bytes` goes to the object store and the message
//! carries its URI instead. Whatever fails goes to `sift.dlq` with its reason,
//! source and URL; one bad page or host never stops the daemon.
//!
//! What the next visit needs is kept durably in the table `ingest_state`
//! (family `s`): per URL the `ETag`/`Last-Modified` validators (or a file's
//! mtime and size, an object's ETag) for a conditional fetch, and per content
//! hash when it was last produced. Both are written only after the produce is
//! acknowledged, so a crash can make a page be produced twice (same id, same
//! row downstream) but never lost.

pub mod discover;
pub mod extract;
pub mod fetch;
pub mod sources;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;
use url::Url;

use crate::backends::log::{Commit, Log, Record, TopicPartition};
use crate::backends::objects::{ObjectStore, PutMode};
use crate::backends::table::{Delete, RowPut, Scan, Table};
use crate::config::{Config, IngestConfig};
use crate::daemon::StageHealth;
use crate::dlq::DeadLetter;
use crate::envelope::{self, topics, Envelope, Stage, SCHEMA_VERSION};
use fetch::{Fetched, Fetcher};
use sources::{Source, SourceKind};

/// The table that remembers validators and content hashes.
pub const STATE_TABLE: &str = "ingest_state";
const STATE_FAMILY: &str = "s";
/// Largest title kept (characters); a longer one is cut.
const MAX_TITLE_CHARS: usize = 1000;
/// The log's limit on one message; an envelope is never larger.
const MAX_MESSAGE_BYTES: usize = 1_000_000;
/// Envelopes produced per call to the log.
const PRODUCE_BATCH: usize = 256;
/// Sitemap indexes are followed this deep.
const MAX_SITEMAP_DEPTH: u32 = 3;

/// `sift ingest` flags.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// The sources file (default `ingest.sources` of the config, `sources.toml`).
    #[arg(long, env = "SIFT_SOURCES")]
    pub sources: Option<PathBuf>,
    /// One pass over every source, then exit with a summary.
    #[arg(long, env = "SIFT_INGEST_ONCE")]
    pub once: bool,
    /// Print the `--once` summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a pass did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct IngestSummary {
    /// Sources visited.
    pub sources: u64,
    /// Page URLs found (after include/exclude).
    pub discovered: u64,
    /// Pages a `links` source's crawl fetched to find links (documents
    /// among them are not fetched again).
    pub crawled: u64,
    /// Bodies fetched or read.
    pub fetched: u64,
    /// Pages that had not changed (304, same mtime/ETag).
    pub not_modified: u64,
    /// Documents produced to `sift.raw`.
    pub produced: u64,
    /// Of those, documents whose text went to the object store.
    pub claim_checked: u64,
    /// Body bytes fetched or read.
    pub bytes: u64,
    /// Documents dropped on purpose, by reason (`duplicate`, `url_pattern`, ...).
    pub dropped: BTreeMap<String, u64>,
    /// Dead letters, by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl IngestSummary {
    fn add(&mut self, o: &IngestSummary) {
        self.sources += o.sources;
        self.discovered += o.discovered;
        self.crawled += o.crawled;
        self.fetched += o.fetched;
        self.not_modified += o.not_modified;
        self.produced += o.produced;
        self.claim_checked += o.claim_checked;
        self.bytes += o.bytes;
        for (k, v) in &o.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.dead_letters {
            *self.dead_letters.entry(k.clone()).or_default() += v;
        }
    }
}

/// Why `sift ingest` stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The sources file is bad.
    #[error(transparent)]
    Sources(#[from] sources::SourcesError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
}

impl From<IngestError> for crate::Error {
    fn from(e: IngestError) -> Self {
        crate::Error::Stage(Box::new(e))
    }
}

/// A page to fetch or read, and what to attach to it.
#[derive(Debug)]
struct Target {
    /// What is fetched: an http(s) URL, `file:///…`, or `objects:KEY`.
    url: String,
    /// Metadata from discovery (feed title, published).
    extra: BTreeMap<String, serde_json::Value>,
    /// What a crawl got when it fetched the page to find its links (so a
    /// page is fetched once a visit).
    prefetched: Option<Box<Fetched>>,
}

/// What came of one target.
enum Outcome {
    /// A document ready to produce, and the state to record once it is.
    Document {
        envelope: Box<Envelope>,
        state: RowPut,
        hash: String,
        claim_checked: bool,
        bytes: u64,
    },
    /// Unchanged since last time.
    NotModified,
    /// Dropped on purpose.
    Dropped { reason: &'static str, bytes: u64 },
    /// Failed.
    Dead(DeadLetter),
}

/// The ingest stage: sources in, envelopes out.
pub struct Ingest {
    log: Arc<dyn Log>,
    objects: Arc<dyn ObjectStore>,
    table: Arc<dyn Table>,
    fetcher: Fetcher,
    config: IngestConfig,
    /// Partitions of the topics it creates (`log.default_partitions`).
    partitions: u32,
}

impl Ingest {
    /// Prepares the topics and the state table.
    pub async fn new(
        log: Arc<dyn Log>,
        objects: Arc<dyn ObjectStore>,
        table: Arc<dyn Table>,
        config: &Config,
    ) -> crate::Result<Self> {
        log.create_topic(topics::RAW, config.log.default_partitions)
            .await?;
        log.create_topic(topics::DLQ, 1).await?;
        table.ensure_table(STATE_TABLE, &[STATE_FAMILY]).await?;
        let fetcher = Fetcher::new(&config.ingest).map_err(IngestError::from)?;
        Ok(Ingest {
            log,
            objects,
            table,
            fetcher,
            config: config.ingest.clone(),
            partitions: config.log.default_partitions,
        })
    }

    /// Forgets what was fetched from URLs starting with one of `prefixes`:
    /// their validators and the content hashes they produced, so the next
    /// visit downloads and produces them again (`sift run` replays its
    /// sample this way). Returns the URLs forgotten.
    pub async fn forget(&self, prefixes: &[String]) -> crate::Result<u64> {
        let mut forgotten = 0;
        for prefix in prefixes {
            let rows = self
                .table
                .scan(
                    STATE_TABLE,
                    &Scan {
                        prefix: Some(Bytes::from(format!("u/{prefix}"))),
                        ..Scan::default()
                    },
                )
                .await?;
            for row in rows {
                if let Some(hash) = row.get(STATE_FAMILY, b"hash") {
                    let key = [b"h/".as_slice(), hash].concat();
                    self.table.delete(STATE_TABLE, &key, Delete::Row).await?;
                }
                self.table
                    .delete(STATE_TABLE, &row.key, Delete::Row)
                    .await?;
                forgotten += 1;
            }
        }
        Ok(forgotten)
    }

    /// Visits every source once, concurrently; returns what happened.
    pub async fn pass(&self, sources: &[Source]) -> crate::Result<IngestSummary> {
        let started = Instant::now();
        let progress = indicatif::ProgressBar::new(sources.len() as u64);
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "ingest {bar:30} {pos}/{len} sources · {msg} · {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let total = Mutex::new(IngestSummary::default());
        // The visits are made up front (they do nothing until polled): a
        // stream mapping `&Source` to them would make this future not `Send`
        // (a closure over a borrowed item is not general enough).
        let visits: Vec<_> = sources.iter().map(|s| self.visit(s)).collect();
        let mut visits = futures::stream::iter(visits).buffer_unordered(16);
        while let Some(r) = visits.next().await {
            let s = r?;
            let mut t = total.lock();
            t.add(&s);
            progress.inc(1);
            progress.set_message(format!(
                "{} produced, {} unchanged",
                t.produced, t.not_modified
            ));
        }
        progress.finish_and_clear();
        let mut total = total.into_inner();
        total.seconds = started.elapsed().as_secs_f64();
        Ok(total)
    }

    /// One visit of one source. Errors returned are the log's or table's
    /// (the pipeline cannot go on); anything about the source itself becomes
    /// dead letters.
    async fn visit(&self, source: &Source) -> crate::Result<IngestSummary> {
        let mut summary = IngestSummary {
            sources: 1,
            ..Default::default()
        };
        let mut dead = Vec::new();
        let targets = self.discover(source, &mut dead, &mut summary).await?;
        let mut seen = HashSet::new();
        let mut wanted = Vec::new();
        for t in targets {
            if !seen.insert(t.url.clone()) {
                continue;
            }
            if !source.wants(&t.url) {
                *summary.dropped.entry("url_pattern".into()).or_default() += 1;
                crate::metrics::global().drop(Stage::Ingest, "url_pattern");
                continue;
            }
            wanted.push(t);
        }
        summary.discovered = wanted.len() as u64;
        let hashes_this_pass = Mutex::new(HashSet::new());
        let mut outcomes = futures::stream::iter(wanted)
            .map(|t| self.ingest_one(source, t, &hashes_this_pass))
            .buffer_unordered(self.config.max_concurrency.max(1) as usize);
        let mut ready: Vec<(Box<Envelope>, RowPut, String)> = Vec::new();
        while let Some(o) = outcomes.next().await {
            match o? {
                Outcome::Document {
                    envelope,
                    state,
                    hash,
                    claim_checked,
                    bytes,
                } => {
                    summary.fetched += 1;
                    summary.bytes += bytes;
                    summary.claim_checked += u64::from(claim_checked);
                    ready.push((envelope, state, hash));
                    if ready.len() >= PRODUCE_BATCH {
                        summary.produced += self.produce(std::mem::take(&mut ready)).await?;
                    }
                }
                Outcome::NotModified => summary.not_modified += 1,
                Outcome::Dropped { reason, bytes } => {
                    summary.fetched += 1;
                    summary.bytes += bytes;
                    *summary.dropped.entry(reason.into()).or_default() += 1;
                    crate::metrics::global().drop(Stage::Ingest, reason);
                }
                Outcome::Dead(d) => dead.push(d),
            }
        }
        drop(outcomes);
        summary.produced += self.produce(ready).await?;
        for d in &dead {
            *summary.dead_letters.entry(d.reason.into()).or_default() += 1;
        }
        crate::dlq::send(self.log.as_ref(), self.objects.as_ref(), &dead).await?;
        Ok(summary)
    }

    /// Produces envelopes, then records their validators and hashes.
    async fn produce(&self, ready: Vec<(Box<Envelope>, RowPut, String)>) -> crate::Result<u64> {
        if ready.is_empty() {
            return Ok(0);
        }
        let mut records = Vec::with_capacity(ready.len());
        let mut state = Vec::with_capacity(ready.len() * 2);
        let now = crate::now_ms().to_string();
        for (env, row, hash) in ready {
            let value = serde_json::to_vec(&*env)
                .map_err(|e| crate::Error::Invalid(format!("cannot serialize an envelope: {e}")))?;
            records.push(Record {
                key: Some(Bytes::from(env.id.clone())),
                value: Bytes::from(value),
                headers: env.raw_headers(),
            });
            state.push(row);
            state.push(
                RowPut::new(format!("h/{hash}"))
                    .cell(STATE_FAMILY, "at", now.clone())
                    .cell(STATE_FAMILY, "id", env.id.clone()),
            );
        }
        let n = records.len() as u64;
        self.log.produce(topics::RAW, records).await?;
        self.table.put(STATE_TABLE, state).await?;
        crate::metrics::global().stage(Stage::Ingest, n);
        Ok(n)
    }

    /// The pages of a source. A sitemap or feed that cannot be fetched or
    /// parsed becomes a dead letter; the rest of the source goes on.
    async fn discover(
        &self,
        source: &Source,
        dead: &mut Vec<DeadLetter>,
        summary: &mut IngestSummary,
    ) -> crate::Result<Vec<Target>> {
        let mut out = Vec::new();
        let letter = |reason, url: &str, detail| source_letter(source, reason, url, detail);
        match source.kind {
            SourceKind::Pages => out.extend(source.urls.iter().map(|u| Target {
                url: u.to_string(),
                extra: BTreeMap::new(),
                prefetched: None,
            })),
            SourceKind::Sitemap => {
                let mut queue: Vec<(Url, u32)> =
                    source.urls.iter().map(|u| (u.clone(), 0)).collect();
                let mut visited = HashSet::new();
                while let Some((url, depth)) = queue.pop() {
                    if !visited.insert(url.clone()) || out.len() >= source.max_urls as usize {
                        continue;
                    }
                    let body = match self.fetch_listing(source, &url).await {
                        Ok(b) => b,
                        Err(e) => {
                            dead.push(letter(e.reason(), url.as_str(), format!("sitemap: {e}")));
                            continue;
                        }
                    };
                    match discover::sitemap(&body) {
                        Ok(map) => {
                            for p in map.pages {
                                match url.join(&p) {
                                    Ok(u) => out.push(Target {
                                        url: u.to_string(),
                                        extra: BTreeMap::new(),
                                        prefetched: None,
                                    }),
                                    Err(e) => dead.push(letter(
                                        "bad_url",
                                        &p,
                                        format!("in sitemap {url}: {e}"),
                                    )),
                                }
                            }
                            if depth < MAX_SITEMAP_DEPTH {
                                queue.extend(
                                    map.sitemaps
                                        .iter()
                                        .filter_map(|s| url.join(s).ok())
                                        .map(|u| (u, depth + 1)),
                                );
                            }
                        }
                        Err(e) => dead.push(letter("bad_sitemap", url.as_str(), e.to_string())),
                    }
                }
                out.truncate(source.max_urls as usize);
            }
            SourceKind::Rss | SourceKind::Atom => {
                for url in &source.urls {
                    let body = match self.fetch_listing(source, url).await {
                        Ok(b) => b,
                        Err(e) => {
                            dead.push(letter(e.reason(), url.as_str(), format!("feed: {e}")));
                            continue;
                        }
                    };
                    match discover::feed(&body) {
                        Ok(items) => {
                            for item in items.into_iter().take(source.max_urls as usize) {
                                let Ok(u) = url.join(&item.url) else {
                                    dead.push(letter(
                                        "bad_url",
                                        &item.url,
                                        format!("in feed {url}"),
                                    ));
                                    continue;
                                };
                                let mut extra = BTreeMap::new();
                                if let Some(t) = item.title {
                                    extra.insert("feed_title".into(), t.into());
                                }
                                if let Some(p) = item.published {
                                    extra.insert("published".into(), p.into());
                                }
                                if let Some(section) = item.section {
                                    extra.insert(envelope::meta::SECTION.into(), section.into());
                                }
                                out.push(Target {
                                    url: u.to_string(),
                                    extra,
                                    prefetched: None,
                                });
                            }
                        }
                        Err(e) => dead.push(letter("bad_feed", url.as_str(), e.to_string())),
                    }
                }
            }
            SourceKind::Links => {
                out.extend(self.crawl(source, dead, summary).await?);
            }
            SourceKind::Dir => {
                let dir = source.path.clone().unwrap_or_default();
                let listed = tokio::task::spawn_blocking(move || discover::files(&dir))
                    .await
                    .map_err(|e| crate::Error::Invalid(format!("a directory walk failed: {e}")))?;
                match listed {
                    Ok(files) => {
                        for f in files {
                            match Url::from_file_path(&f) {
                                Ok(u) => out.push(Target {
                                    url: u.to_string(),
                                    extra: BTreeMap::new(),
                                    prefetched: None,
                                }),
                                Err(()) => dead.push(letter(
                                    "bad_url",
                                    &f.display().to_string(),
                                    "not an absolute path".into(),
                                )),
                            }
                        }
                    }
                    Err(e) => dead.push(letter(
                        "dir",
                        &source
                            .path
                            .clone()
                            .unwrap_or_default()
                            .display()
                            .to_string(),
                        e.to_string(),
                    )),
                }
            }
            SourceKind::Prefix => {
                let prefix = source.prefix.clone().unwrap_or_default();
                for meta in self.objects.list(&prefix).await? {
                    out.push(Target {
                        url: envelope::claim_uri(&meta.key),
                        extra: BTreeMap::new(),
                        prefetched: None,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The pages of a `links` source: its start pages and the pages they
    /// link to within the site (same host and port), breadth first, up to
    /// `max_depth` links away and `max_pages` fetches a visit. Links are
    /// made canonical ([`discover::canonical_link`]) so a page is fetched
    /// once; a page is followed if it matches `follow` (when given) and not
    /// `exclude`, and is a document if `include`/`exclude` want it. A
    /// document the crawl fetched is handed on with its body (fetched
    /// conditionally, as any document is); a page asking robots not to
    /// follow its links (`<meta name="robots" content="nofollow">`) is not
    /// followed; robots.txt and the per-host rate hold as for every fetch (a
    /// link robots.txt disallows is dropped as `robots`, or a dead letter
    /// when it is a document). A page that fails is a dead letter.
    async fn crawl(
        &self,
        source: &Source,
        dead: &mut Vec<DeadLetter>,
        summary: &mut IngestSummary,
    ) -> crate::Result<Vec<Target>> {
        let site: HashSet<(String, Option<u16>)> = source
            .urls
            .iter()
            .filter_map(|u| {
                Some((
                    u.host_str()?.to_ascii_lowercase(),
                    u.port_or_known_default(),
                ))
            })
            .collect();
        let in_site = |u: &Url| {
            u.host_str().is_some_and(|h| {
                site.contains(&(h.to_ascii_lowercase(), u.port_or_known_default()))
            })
        };
        let follows = |u: &str| {
            source.follow.as_ref().is_none_or(|f| f.is_match(u))
                && !source.exclude.as_ref().is_some_and(|x| x.is_match(u))
        };
        let letter =
            |reason, url: &Url, detail| source_letter(source, reason, url.as_str(), detail);
        let mut seen: HashSet<String> = HashSet::new();
        let mut queue: std::collections::VecDeque<(Url, u32)> = std::collections::VecDeque::new();
        for u in &source.urls {
            if let Some(c) = discover::canonical_link(u) {
                if seen.insert(c.to_string()) {
                    queue.push_back((c, 0));
                }
            }
        }
        let mut out = Vec::new();
        let mut documents: HashSet<String> = HashSet::new();
        while let Some((url, depth)) = queue.pop_front() {
            if summary.crawled >= u64::from(source.max_pages) {
                // Out of budget: a page left in the queue is still fetched
                // if it is a document, just not searched for links.
                queue.push_front((url, depth));
                break;
            }
            let document = source.wants(url.as_str());
            let validators = if document {
                self.validators(url.as_str()).await?
            } else {
                (None, None)
            };
            let req = fetch::Request {
                etag: validators.0,
                last_modified: validators.1,
                max_bytes: self.max_bytes(source),
                rate: source.rate_limit,
            };
            let fetched = match self.fetcher.fetch(&url, &req).await {
                Ok(f) => f,
                Err(e) => {
                    crate::metrics::global().fetch(e.reason());
                    // robots.txt refused it before any request: no budget spent.
                    if e.reason() != "robots" {
                        summary.crawled += 1;
                    }
                    if e.reason() == "robots" && !document {
                        *summary.dropped.entry("robots".into()).or_default() += 1;
                        crate::metrics::global().drop(Stage::Ingest, "robots");
                    } else {
                        dead.push(letter(e.reason(), &url, format!("crawl: {e}")));
                    }
                    continue;
                }
            };
            summary.crawled += 1;
            crate::metrics::global().fetch(match fetched {
                Fetched::Body(_) => "ok",
                Fetched::NotModified => "not_modified",
            });
            let links = match &fetched {
                Fetched::Body(page) if depth < source.max_depth => {
                    // A redirect's target counts as seen too.
                    if let Some(c) = discover::canonical_link(&page.final_url) {
                        seen.insert(c.to_string());
                    }
                    let (body, ct, at) = (
                        page.body.clone(),
                        page.content_type.clone(),
                        page.final_url.clone(),
                    );
                    match tokio::task::spawn_blocking(move || {
                        extract::links(&body, ct.as_deref(), &at)
                    })
                    .await
                    .map_err(|e| {
                        crate::Error::Invalid(format!("a link extraction thread failed: {e}"))
                    })? {
                        Ok(l) => l,
                        Err(e) => {
                            // A document's own extraction reports it.
                            if !document {
                                dead.push(letter(e.reason(), &url, format!("crawl: {e}")));
                            }
                            None
                        }
                    }
                }
                // Unchanged documents' links were followed when they changed.
                _ => None,
            };
            if document && documents.insert(url.to_string()) {
                out.push(Target {
                    url: url.to_string(),
                    extra: BTreeMap::new(),
                    prefetched: Some(Box::new(fetched)),
                });
            }
            let Some(links) = links.filter(|l| !l.nofollow) else {
                continue;
            };
            for link in links.hrefs {
                let Some(c) = discover::canonical_link(&link) else {
                    continue;
                };
                if !in_site(&c) || !seen.insert(c.to_string()) {
                    continue;
                }
                if follows(c.as_str()) {
                    queue.push_back((c, depth + 1));
                } else if source.wants(c.as_str()) && documents.insert(c.to_string()) {
                    out.push(Target {
                        url: c.to_string(),
                        extra: BTreeMap::new(),
                        prefetched: None,
                    });
                }
            }
        }
        for (url, _) in queue {
            if source.wants(url.as_str()) && documents.insert(url.to_string()) {
                out.push(Target {
                    url: url.to_string(),
                    extra: BTreeMap::new(),
                    prefetched: None,
                });
            }
        }
        out.truncate(source.max_urls as usize);
        Ok(out)
    }

    /// The validators kept for a URL: its `ETag` and `Last-Modified`.
    async fn validators(&self, url: &str) -> crate::Result<(Option<String>, Option<String>)> {
        let row = self
            .table
            .get(STATE_TABLE, format!("u/{url}").as_bytes(), None)
            .await?;
        let get = |q: &str| {
            row.as_ref()
                .and_then(|r| r.get(STATE_FAMILY, q.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .filter(|v| !v.is_empty())
        };
        Ok((get("etag"), get("last_modified")))
    }

    /// A sitemap or feed body (never conditional: its list is needed every visit).
    async fn fetch_listing(&self, source: &Source, url: &Url) -> Result<Bytes, fetch::FetchError> {
        let req = fetch::Request {
            max_bytes: self.max_bytes(source),
            rate: source.rate_limit,
            ..Default::default()
        };
        match self.fetcher.fetch(url, &req).await? {
            Fetched::Body(p) => Ok(p.body),
            Fetched::NotModified => Err(fetch::FetchError::Status {
                status: 304,
                attempts: 1,
            }),
        }
    }

    fn max_bytes(&self, source: &Source) -> u64 {
        source.max_bytes.unwrap_or(self.config.max_document_bytes)
    }

    /// Fetches (or reads), extracts, filters and wraps one target.
    async fn ingest_one(
        &self,
        source: &Source,
        target: Target,
        hashes_this_pass: &Mutex<HashSet<String>>,
    ) -> crate::Result<Outcome> {
        let dead = |reason: &'static str, detail: String| {
            Ok(Outcome::Dead(DeadLetter {
                stage: Stage::Ingest,
                reason,
                detail,
                source: Some(source.tag.clone()),
                url: Some(target.url.clone()),
                original: None,
            }))
        };
        let prefetched = target.prefetched.is_some();
        let state_key = format!("u/{}", target.url);
        let previous = self
            .table
            .get(STATE_TABLE, state_key.as_bytes(), None)
            .await?;
        let prev = |q: &str| {
            previous
                .as_ref()
                .and_then(|r| r.get(STATE_FAMILY, q.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let limit = self.max_bytes(source);
        // Body, content type header, final URL, validators.
        let (body, content_type, final_url, etag, last_modified) = if let Some(key) =
            envelope::claim_key(&target.url)
        {
            match self.objects.head(key).await? {
                None => return dead("not_found", format!("object `{key}` is gone")),
                Some(m) if prev("etag").as_deref() == Some(m.etag.as_str()) => {
                    crate::metrics::global().fetch("not_modified");
                    return Ok(Outcome::NotModified);
                }
                Some(m) if m.size > limit => {
                    return dead(
                        "too_large",
                        format!("{} bytes is more than max_bytes {limit}", m.size),
                    )
                }
                Some(_) => {}
            }
            let (meta, body) = match self.objects.get(key).await {
                Ok(x) => x,
                Err(crate::backends::objects::ObjectError::NotFound { .. }) => {
                    return dead("not_found", format!("object `{key}` is gone"))
                }
                Err(e) => return Err(e.into()),
            };
            (body, None, target.url.clone(), Some(meta.etag), None)
        } else if target.url.starts_with("file:") {
            let path = Url::parse(&target.url)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .unwrap_or_default();
            let meta = match tokio::fs::metadata(&path).await {
                Ok(m) => m,
                Err(e) => return dead("not_found", format!("cannot read {}: {e}", path.display())),
            };
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let stamp = format!("{mtime}-{}", meta.len());
            if prev("etag").as_deref() == Some(stamp.as_str()) {
                crate::metrics::global().fetch("not_modified");
                return Ok(Outcome::NotModified);
            }
            if meta.len() > limit {
                return dead(
                    "too_large",
                    format!("{} bytes is more than max_bytes {limit}", meta.len()),
                );
            }
            match tokio::fs::read(&path).await {
                Ok(b) => (Bytes::from(b), None, target.url.clone(), Some(stamp), None),
                Err(e) => return dead("read", format!("cannot read {}: {e}", path.display())),
            }
        } else {
            let url = match Url::parse(&target.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => u,
                Ok(u) => return dead("bad_url", format!("scheme `{}` is not fetched", u.scheme())),
                Err(e) => return dead("bad_url", e.to_string()),
            };
            let req = fetch::Request {
                etag: prev("etag"),
                last_modified: prev("last_modified"),
                max_bytes: limit,
                rate: source.rate_limit,
            };
            let fetched = match target.prefetched {
                // The crawl fetched it, and counted the fetch.
                Some(f) => Ok(*f),
                None => self.fetcher.fetch(&url, &req).await,
            };
            match fetched {
                Ok(Fetched::NotModified) => {
                    if !prefetched {
                        crate::metrics::global().fetch("not_modified");
                    }
                    return Ok(Outcome::NotModified);
                }
                Ok(Fetched::Body(p)) => (
                    p.body,
                    p.content_type,
                    canonical(&p.final_url),
                    p.etag,
                    p.last_modified,
                ),
                Err(e) => {
                    crate::metrics::global().fetch(e.reason());
                    return dead(e.reason(), e.to_string());
                }
            }
        };
        if !prefetched {
            crate::metrics::global().fetch("ok");
        }
        let bytes = body.len() as u64;
        let name = final_url.clone();
        let extracted = tokio::task::spawn_blocking(move || {
            extract::extract(&body, content_type.as_deref(), &name)
        })
        .await
        .map_err(|e| crate::Error::Invalid(format!("an extraction thread failed: {e}")))?;
        let doc = match extracted {
            Ok(d) => d,
            Err(e) => return dead(e.reason(), e.to_string()),
        };
        if !source.content_types.is_empty()
            && !source.content_types.iter().any(|c| c == doc.content_type)
        {
            return Ok(Outcome::Dropped {
                reason: "content_type",
                bytes,
            });
        }
        if (doc.text.chars().count() as u64) < u64::from(source.min_text_chars) {
            return Ok(Outcome::Dropped {
                reason: "too_short",
                bytes,
            });
        }
        let hash = blake3::hash(doc.text.as_bytes()).to_hex().to_string();
        // Validators are recorded even for a duplicate, so the next visit
        // can skip the download.
        let state = RowPut::new(state_key.clone())
            .cell(STATE_FAMILY, "etag", etag.clone().unwrap_or_default())
            .cell(
                STATE_FAMILY,
                "last_modified",
                last_modified.clone().unwrap_or_default(),
            )
            .cell(STATE_FAMILY, "hash", hash.clone())
            .cell(STATE_FAMILY, "at", crate::now_ms().to_string());
        if !hashes_this_pass.lock().insert(hash.clone()) || self.seen_recently(&hash).await? {
            self.table.put(STATE_TABLE, vec![state]).await?;
            return Ok(Outcome::Dropped {
                reason: "duplicate",
                bytes,
            });
        }
        let id = envelope::document_id(&source.tag, &final_url);
        let mut metadata = source.metadata.clone();
        metadata.extend(target.extra);
        // The page's own section wins over its feed's category and the
        // source's default.
        if let Some(section) = doc.section.clone() {
            metadata.insert(envelope::meta::SECTION.into(), section.into());
        }
        metadata.insert("content_hash".into(), hash[..32].into());
        if final_url != target.url {
            metadata.insert("requested_url".into(), target.url.clone().into());
        }
        let title: String = doc.title.chars().take(MAX_TITLE_CHARS).collect();
        let (text, body_uri, claim_checked) =
            if doc.text.len() as u64 > self.config.claim_check_bytes {
                let key = format!("{}{id}/{}.txt", envelope::CLAIM_PREFIX, &hash[..16]);
                self.objects
                    .put(&key, Bytes::from(doc.text), PutMode::Overwrite)
                    .await?;
                (None, Some(envelope::claim_uri(&key)), true)
            } else {
                (Some(doc.text), None, false)
            };
        let envelope = Envelope {
            v: SCHEMA_VERSION,
            id,
            source: source.tag.clone(),
            url: final_url,
            fetched_at_ms: crate::now_ms(),
            content_type: doc.content_type.to_string(),
            title,
            text,
            body_uri,
            metadata,
        };
        let size = serde_json::to_vec(&envelope).map_or(usize::MAX, |v| v.len());
        if size > MAX_MESSAGE_BYTES {
            return dead(
                "too_large",
                format!("the envelope is {size} bytes even with its text claim-checked (metadata or title too large)"),
            );
        }
        Ok(Outcome::Document {
            envelope: Box::new(envelope),
            state,
            hash,
            claim_checked,
            bytes,
        })
    }

    /// Whether a text with this hash was produced within the dedupe window.
    async fn seen_recently(&self, hash: &str) -> crate::Result<bool> {
        let row = self
            .table
            .get(STATE_TABLE, format!("h/{hash}").as_bytes(), None)
            .await?;
        let at = row
            .as_ref()
            .and_then(|r| r.get(STATE_FAMILY, b"at"))
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok());
        let window = i64::try_from(self.config.dedupe_window.as_millis()).unwrap_or(i64::MAX);
        Ok(at.is_some_and(|at| crate::now_ms().saturating_sub(at) <= window))
    }
}

/// A dead letter about a URL of `source`.
fn source_letter(source: &Source, reason: &'static str, url: &str, detail: String) -> DeadLetter {
    DeadLetter {
        stage: Stage::Ingest,
        reason,
        detail,
        source: Some(source.tag.clone()),
        url: Some(url.to_string()),
        original: None,
    }
}

/// The canonical form of a fetched URL: no fragment (the `url` crate already
/// lower-cases the scheme and host and drops default ports).
fn canonical(url: &Url) -> String {
    let mut u = url.clone();
    u.set_fragment(None);
    u.to_string()
}

/// Runs `sift ingest`: one pass with `--once`, else a daemon that visits each
/// source again every `poll_interval` until SIGINT/SIGTERM.
pub async fn main(config: &Config, args: IngestArgs) -> crate::Result<()> {
    let path = args
        .sources
        .unwrap_or_else(|| config.ingest.sources.clone());
    let sources = sources::load(&path).map_err(IngestError::from)?;
    let log = crate::backends::open_log(config).await?;
    let objects = crate::backends::open_objects(config).await?;
    let table = crate::backends::open_table(config).await?;
    let ingest = Ingest::new(log, objects, table, config).await?;
    tracing::info!(sources = sources.len(), file = %path.display(), "Loaded the sources.");
    if args.once {
        let s = ingest.pass(&sources).await?;
        print_summary(&s, args.json);
        return Ok(());
    }
    crate::daemon::serve_metrics(config, HEALTH.probe()).await?;
    if config.ingest.group.is_empty() {
        serve(&ingest, &sources, crate::daemon::shutdown_signal()).await;
    } else {
        serve_group(
            &ingest,
            &sources,
            &config.ingest.group,
            crate::daemon::shutdown_signal(),
        )
        .await?;
    }
    Ok(())
}

/// One pass over `batch`, with the tags it visited. Each source's visit is
/// marked in the state table first, so an instance that takes the source
/// over in a rebalance keeps its schedule instead of visiting it again.
async fn visit_batch(
    ingest: &Ingest,
    batch: Vec<Source>,
) -> (Vec<String>, crate::Result<IngestSummary>) {
    let tags: Vec<String> = batch.iter().map(|s| s.tag.clone()).collect();
    let now = crate::now_ms().to_string();
    let marks = tags
        .iter()
        .map(|t| RowPut::new(format!("v/{t}")).cell(STATE_FAMILY, "at", now.clone()))
        .collect();
    if let Err(e) = ingest.table.put(STATE_TABLE, marks).await {
        return (tags, Err(e.into()));
    }
    (tags, ingest.pass(&batch).await)
}

/// When a source was last visited by any instance (ms since the epoch).
async fn last_visit(table: &dyn Table, tag: &str) -> crate::Result<Option<i64>> {
    Ok(table
        .get(STATE_TABLE, format!("v/{tag}").as_bytes(), None)
        .await?
        .as_ref()
        .and_then(|r| r.get(STATE_FAMILY, b"at"))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()))
}

/// How long `serve_group` keeps trying to join the group at start-up.
const STARTUP_RETRIES: Duration = Duration::from_secs(60);

/// How long a member waits after its partitions change before it starts
/// visiting, so that a group forming at once (replicas starting together)
/// settles before anyone fetches.
const SETTLE: Duration = Duration::from_secs(2);

/// A source's record in `sift.sources`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct SourceRecord {
    /// The source's tag.
    tag: String,
    /// Its site key (the record's key).
    site: String,
    /// When it was published: the latest record of a tag says where it lives.
    published_ms: i64,
}

/// The key of a source's record in `sift.sources`: its site, the host of its
/// first URL (lower-cased), so every source of one site lands in one
/// partition and so with one instance, and politeness holds across
/// instances; a `dir` or `prefix` source goes by its tag.
pub fn site_key(source: &Source) -> String {
    source.urls.first().and_then(|u| u.host_str()).map_or_else(
        || format!("tag:{}", source.tag),
        |h| format!("site:{}", h.to_ascii_lowercase()),
    )
}

/// Where each tag's latest record in `sift.sources` is: tag → (partition, site).
async fn recorded_sources(log: &dyn Log) -> crate::Result<BTreeMap<String, (u32, String)>> {
    let mut latest: BTreeMap<String, (i64, u32, String)> = BTreeMap::new();
    for w in log.watermarks(topics::SOURCES).await? {
        let mut at = w.low.clone();
        while at < w.high {
            let batch = log.fetch(topics::SOURCES, w.partition, &at, 1000).await?;
            let Some(last) = batch.last() else { break };
            at = last.offset.next();
            for m in &batch {
                match serde_json::from_slice::<SourceRecord>(&m.value) {
                    Ok(r) => {
                        let newer = latest
                            .get(&r.tag)
                            .is_none_or(|(t, _, _)| r.published_ms >= *t);
                        if newer {
                            latest.insert(r.tag, (r.published_ms, m.partition, r.site));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(partition = m.partition, offset = %m.offset, error = %e, "Skipping a record of sift.sources that is not a source record.")
                    }
                }
            }
        }
    }
    Ok(latest
        .into_iter()
        .map(|(tag, (_, p, site))| (tag, (p, site)))
        .collect())
}

/// Publishes the sources this instance loaded that `sift.sources` lacks, or
/// holds under another site; returns how many.
pub async fn publish_sources(log: &dyn Log, sources: &[Source]) -> crate::Result<u64> {
    let recorded = recorded_sources(log).await?;
    let now = crate::now_ms();
    let records: Vec<Record> = sources
        .iter()
        .filter(|s| {
            recorded
                .get(&s.tag)
                .is_none_or(|(_, site)| *site != site_key(s))
        })
        .map(|s| {
            let r = SourceRecord {
                tag: s.tag.clone(),
                site: site_key(s),
                published_ms: now,
            };
            Record {
                key: Some(Bytes::from(r.site.clone())),
                value: Bytes::from(serde_json::to_vec(&r).unwrap_or_default()),
                headers: Vec::new(),
            }
        })
        .collect();
    let n = records.len() as u64;
    if n > 0 {
        log.produce(topics::SOURCES, records).await?;
    }
    Ok(n)
}

/// The tags whose latest record is in one of `partitions` of `sift.sources`.
async fn owned_tags(
    log: &dyn Log,
    partitions: &[TopicPartition],
) -> crate::Result<HashSet<String>> {
    let mine: HashSet<u32> = partitions
        .iter()
        .filter(|tp| tp.topic == topics::SOURCES)
        .map(|tp| tp.partition)
        .collect();
    Ok(recorded_sources(log)
        .await?
        .into_iter()
        .filter(|(_, (p, _))| mine.contains(p))
        .map(|(tag, _)| tag)
        .collect())
}

/// How often a member of the ingest group reads `sift.sources` again for
/// sources other instances published.
const SOURCES_REFRESH: Duration = Duration::from_secs(60);

/// The ingest daemon as a member of consumer group `group` on
/// `sift.sources`: it publishes the sources of its file that the topic
/// lacks, then visits, on each source's schedule, only the sources whose
/// records are in the partitions assigned to it. A rebalance (an instance
/// joins, leaves or dies) moves whole partitions, so each site is visited
/// by one instance at a time (while a pass that started before a rebalance
/// finishes, its sources may be visited by their new owner too). A source
/// another instance published that this instance's file lacks is left
/// alone: every instance should load the same file.
pub async fn serve_group(
    ingest: &Ingest,
    sources: &[Source],
    group: &str,
    stop: impl std::future::Future<Output = ()>,
) -> crate::Result<()> {
    let log = ingest.log.as_ref();
    // Instances starting together race to create `sift.sources`, and a
    // topic another client just created can take a moment to reach this
    // one's metadata; a broker may still be starting. Keep trying for a while.
    let deadline = Instant::now() + STARTUP_RETRIES;
    let (published, mut consumer) = loop {
        let attempt = async {
            log.create_topic(topics::SOURCES, ingest.partitions).await?;
            let published = publish_sources(log, sources).await?;
            let consumer = log.subscribe(group, &[topics::SOURCES]).await?;
            crate::Result::Ok((published, consumer))
        }
        .await;
        match attempt {
            Ok(v) => break v,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "Could not join the ingest group yet; trying again.");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(group, published, "Joined the ingest group.");
    let mut due: Vec<Instant> = vec![Instant::now(); sources.len()];
    let mut assignment: Vec<TopicPartition> = Vec::new();
    let mut owned: HashSet<String> = HashSet::new();
    let mut refreshed = Instant::now();
    let mut settled_at = Instant::now() + SETTLE;
    let mut pass = None;
    tokio::pin!(stop);
    loop {
        if pass.is_none() && Instant::now() >= settled_at {
            let now = Instant::now();
            let batch: Vec<Source> = sources
                .iter()
                .zip(&due)
                .filter(|(s, d)| **d <= now && owned.contains(&s.tag))
                .map(|(s, _)| s.clone())
                .collect();
            if !batch.is_empty() {
                pass = Some(Box::pin(visit_batch(ingest, batch)));
            }
        }
        tokio::select! {
            (tags, r) = async { match pass.as_mut() { Some(p) => p.await, None => std::future::pending().await } } => {
                pass = None;
                let next = match r {
                    Ok(s) => {
                        HEALTH.recovered();
                        tracing::info!(sources = s.sources, produced = s.produced, unchanged = s.not_modified, dead_letters = s.dead_letters.values().sum::<u64>(), seconds = s.seconds, "Visited sources.");
                        None
                    }
                    Err(e) => {
                        HEALTH.fail();
                        tracing::error!(error = %e, "A pass failed; retrying in 30 s.");
                        Some(Instant::now() + Duration::from_secs(30))
                    }
                };
                for (s, d) in sources.iter().zip(due.iter_mut()) {
                    if tags.contains(&s.tag) {
                        *d = next.unwrap_or_else(|| Instant::now() + s.poll_interval);
                    }
                }
            }
            polled = consumer.poll(1000, Duration::from_secs(1)) => {
                match polled {
                    Ok(batch) => {
                        if !batch.is_empty() {
                            // New sources' records: ownership is read again below.
                            refreshed = Instant::now() - SOURCES_REFRESH;
                            if let Err(e) = consumer.commit(&Commit::after(&batch)).await {
                                tracing::warn!(error = %e, "Could not commit sift.sources.");
                            }
                        }
                    }
                    Err(e) => {
                        HEALTH.fail();
                        tracing::warn!(error = %e, "Polling sift.sources failed; trying again.");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                let now_assigned = consumer.assignment();
                if now_assigned != assignment || refreshed.elapsed() >= SOURCES_REFRESH {
                    match owned_tags(log, &now_assigned).await {
                        Ok(tags) => {
                            if tags != owned {
                                tracing::info!(partitions = now_assigned.len(), sources = tags.iter().filter(|t| sources.iter().any(|s| &s.tag == *t)).count(), "The ingest group gave this instance its sources.");
                                settled_at = Instant::now() + SETTLE;
                                // Sources new to this instance keep the
                                // schedule of whoever visited them last.
                                for (s, d) in sources.iter().zip(due.iter_mut()) {
                                    if tags.contains(&s.tag) && !owned.contains(&s.tag) {
                                        match last_visit(ingest.table.as_ref(), &s.tag).await {
                                            Ok(Some(at)) => {
                                                let interval = i64::try_from(s.poll_interval.as_millis()).unwrap_or(i64::MAX);
                                                let wait = at.saturating_add(interval).saturating_sub(crate::now_ms()).max(0);
                                                *d = Instant::now() + Duration::from_millis(wait as u64);
                                            }
                                            Ok(None) => *d = Instant::now(),
                                            Err(e) => tracing::warn!(source = %s.tag, error = %e, "Could not read when a source was last visited; visiting it now."),
                                        }
                                    }
                                }
                            }
                            owned = tags;
                            assignment = now_assigned;
                            refreshed = Instant::now();
                        }
                        Err(e) => tracing::warn!(error = %e, "Could not read sift.sources; keeping the sources held."),
                    }
                }
            }
            _ = &mut stop => break,
        }
    }
    drop(pass);
    consumer.close().await?;
    Ok(())
}

/// How `sift ingest` is doing, for `/healthz`: unhealthy while passes keep
/// failing on the log or the table.
static HEALTH: StageHealth = StageHealth::new();

/// The ingest daemon: visits each source again every `poll_interval` until
/// `stop` resolves. A pass the log or table fails is retried 30 s later.
pub async fn serve(
    ingest: &Ingest,
    sources: &[Source],
    stop: impl std::future::Future<Output = ()>,
) {
    let mut due: Vec<Instant> = vec![Instant::now(); sources.len()];
    tokio::pin!(stop);
    loop {
        let now = Instant::now();
        let batch: Vec<Source> = sources
            .iter()
            .zip(&due)
            .filter(|(_, d)| **d <= now)
            .map(|(s, _)| s.clone())
            .collect();
        if !batch.is_empty() {
            let pass = ingest.pass(&batch);
            tokio::select! {
                r = pass => {
                    match r {
                        Ok(s) => {
                            HEALTH.recovered();
                            tracing::info!(sources = s.sources, produced = s.produced, unchanged = s.not_modified, dead_letters = s.dead_letters.values().sum::<u64>(), seconds = s.seconds, "Visited sources.");
                        }
                        Err(e) => {
                            HEALTH.fail();
                            // The log or table failed: retry these sources shortly.
                            tracing::error!(error = %e, "A pass failed; retrying in 30 s.");
                            for (s, d) in sources.iter().zip(due.iter_mut()) {
                                if batch.iter().any(|b| b.tag == s.tag) {
                                    *d = Instant::now() + Duration::from_secs(30);
                                }
                            }
                            continue;
                        }
                    }
                }
                _ = &mut stop => return,
            }
            let now = Instant::now();
            for (s, d) in sources.iter().zip(due.iter_mut()) {
                if batch.iter().any(|b| b.tag == s.tag) {
                    *d = now + s.poll_interval;
                }
            }
        }
        let next = due
            .iter()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = &mut stop => return,
        }
    }
}

fn print_summary(s: &IngestSummary, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
        return;
    }
    println!("sources visited     {}", s.sources);
    println!("pages found         {}", s.discovered);
    println!(
        "fetched             {} ({:.1} MB)",
        s.fetched,
        s.bytes as f64 / 1e6
    );
    println!("unchanged           {}", s.not_modified);
    println!(
        "produced to {}  {} ({} claim-checked)",
        topics::RAW,
        s.produced,
        s.claim_checked
    );
    for (k, v) in &s.dropped {
        println!(
            "dropped ({k}){:>w$}",
            v,
            w = 20usize.saturating_sub(k.len() + 10)
        );
    }
    for (k, v) in &s.dead_letters {
        println!("dead letters ({k})  {v}");
    }
    println!(
        "took                {:.1} s ({:.0} documents/s)",
        s.seconds,
        s.produced as f64 / s.seconds.max(1e-9)
    );
}
