//! The sample web `sift run` ingests: the labeled sample served as many small
//! web sites on loopback, fetched by `sift ingest` through an ordinary
//! sources file.
//!
//! Site `i` listens on its own loopback address (127.0.1.{i+1} for the first
//! 254 sites, then 127.0.2.x and so on; Linux routes all of 127.0.0.0/8 to
//! `lo`), every site on the same port, so the fetcher, whose politeness is per
//! host and port, sees as many hosts as there are sites. Sites take four kinds
//! in turn by index: `sitemap` (robots.txt names `/sitemap.xml`, which lists
//! the site's pages and PDFs), `rss` (`/feed.xml`), `atom` (`/atom.xml`) and
//! `pages` (the sources file lists the page URLs). Document `j` of the input
//! goes to site `j % sites`, so the same sample on the same port gives the same
//! URLs, and so the same document ids, on every run.
//!
//! Every response carries `Content-Type`, a strong `ETag` (a hash of the body)
//! and a fixed `Last-Modified`, and conditional GETs are answered with 304, so
//! a second visit finds everything unchanged.
//!
//! With [`WebOptions::broken`], a few extra URLs that are none of the labeled
//! documents show the failure paths (see [`Broken`]):
//!
//! | URL | where | what ingest makes of it |
//! | --- | --- | --- |
//! | `/archive/removed-package.html` | site 0's sitemap | 404: dead letter `http_not_found` |
//! | `/manuals/packaging-manual.pdf` | site 0's sitemap | a truncated PDF: dead letter `pdf_broken` |
//! | `/broken-feed.xml` | site 1, its own source `site-001-news` | not well-formed XML: dead letter `bad_feed` |
//! | `/about.html` | site 3's page list | a page of a few words: dropped as `too_short` (a drop, not a dead letter) |
//!
//! (With fewer than four sites, the site numbers wrap around.)

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use maud::{html, Markup, DOCTYPE};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ingest::extract::build_pdf;
use crate::sample::LabeledDoc;

/// Sites `sift run` serves by default.
pub const DEFAULT_SITES: usize = 120;
/// The port `sift run` serves on by default: fixed, so URLs and document ids
/// stay the same from one run to the next.
pub const DEFAULT_PORT: u16 = 18480;
/// Most sites one web can have (distinct loopback addresses it uses).
pub const MAX_SITES: usize = 254 * 200;
/// `Last-Modified` of everything served: fixed, so the validators a run
/// records still hold on the next run.
pub const LAST_MODIFIED: &str = "Mon, 01 Jan 2024 00:00:00 GMT";
/// The same date in RFC 3339, for sitemaps and Atom.
const UPDATED: &str = "2024-01-01T00:00:00Z";
/// Tries at finding a port free on every site address when the port is 0.
const PORT_TRIES: usize = 8;
/// How long [`SampleWeb::stop`] lets open connections finish.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// One document in this many on a sitemap site is served as a PDF.
const PDF_EVERY: usize = 6;

/// How a document is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An HTML page.
    Html,
    /// A PDF file.
    Pdf,
}

/// One document the web serves, with its truth.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    /// The URL it is served at, in the canonical form ingest records.
    pub url: String,
    /// The labeled document's id ([`LabeledDoc::id`]).
    pub doc_id: String,
    /// Its labels.
    pub tags: Vec<String>,
    /// HTML page or PDF.
    pub format: Format,
    /// Index of the site serving it.
    pub site: usize,
}

/// A deliberately broken item (only with [`WebOptions::broken`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Broken {
    /// The URL.
    pub url: String,
    /// Tag of the source that finds it.
    pub source: String,
    /// The dead-letter reason ingest gives it, or the drop reason for the
    /// too-short page.
    pub reason: &'static str,
    /// Whether ingest counts it as a dead letter (else as a drop).
    pub dead_letter: bool,
}

/// What to serve.
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// Number of sites, 1 to [`MAX_SITES`]. With more sites than documents
    /// some serve none: their sitemaps and feeds are empty, and a `pages`
    /// site with nothing to list is left out of the sources file.
    pub sites: usize,
    /// Port every site listens on; 0 picks one free on every site address.
    pub port: u16,
    /// Include the deliberately broken items.
    pub broken: bool,
}

impl Default for WebOptions {
    fn default() -> Self {
        WebOptions {
            sites: DEFAULT_SITES,
            port: DEFAULT_PORT,
            broken: true,
        }
    }
}

/// What a site points ingest at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SiteKind {
    Sitemap,
    Rss,
    Atom,
    Pages,
}

impl SiteKind {
    fn of(site: usize) -> SiteKind {
        match site % 4 {
            0 => SiteKind::Sitemap,
            1 => SiteKind::Rss,
            2 => SiteKind::Atom,
            _ => SiteKind::Pages,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            SiteKind::Sitemap => "sitemap",
            SiteKind::Rss => "rss",
            SiteKind::Atom => "atom",
            SiteKind::Pages => "pages",
        }
    }

    /// The listing ingest starts from, if the kind has one.
    fn listing(self) -> Option<&'static str> {
        match self {
            SiteKind::Sitemap => Some("/sitemap.xml"),
            SiteKind::Rss => Some("/feed.xml"),
            SiteKind::Atom => Some("/atom.xml"),
            SiteKind::Pages => None,
        }
    }
}

/// A response body ready to serve.
struct Resource {
    content_type: &'static str,
    body: Bytes,
    etag: HeaderValue,
}

impl Resource {
    fn new(content_type: &'static str, body: impl Into<Bytes>) -> Resource {
        let body = body.into();
        let hash = blake3::hash(&body).to_hex();
        let etag = HeaderValue::from_str(&format!("\"{}\"", &hash[..20]))
            .expect("a quoted hex string is a valid header value");
        Resource {
            content_type,
            body,
            etag,
        }
    }
}

/// What one site's server answers with.
struct SiteState {
    resources: HashMap<String, Resource>,
    requests: Arc<AtomicU64>,
}

/// An entry of a site's listing (sitemap, feed or page list).
struct Entry {
    path: String,
    title: String,
    summary: String,
}

/// The sample web, serving until [`SampleWeb::stop`] or drop.
pub struct SampleWeb {
    port: u16,
    sites: usize,
    served: Vec<Served>,
    broken: Vec<Broken>,
    /// Per site: the paths its sources file entry lists (pages sites only).
    page_lists: Vec<Vec<String>>,
    /// Site with the extra broken feed, if any.
    news_site: Option<usize>,
    requests: Arc<AtomicU64>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SampleWeb {
    /// Serves `docs` spread over `options.sites` sites on loopback.
    ///
    /// Fails when `options.sites` is 0 or over [`MAX_SITES`], when two
    /// documents share an id, or when the port cannot be bound on every site
    /// address (the message names the address and says to pass another port).
    pub async fn start(docs: &[LabeledDoc], options: &WebOptions) -> crate::Result<SampleWeb> {
        let sites = options.sites;
        if sites == 0 || sites > MAX_SITES {
            return Err(crate::Error::Invalid(format!(
                "the sample web needs 1 to {MAX_SITES} sites, not {sites}"
            )));
        }
        let mut ids = std::collections::HashSet::with_capacity(docs.len());
        if let Some(twice) = docs.iter().find(|d| !ids.insert(d.id.as_str())) {
            return Err(crate::Error::Invalid(format!(
                "document id `{}` appears twice in the sample web's documents; ids must be unique",
                twice.id
            )));
        }
        let (port, listeners) = bind_all(sites, options.port).await?;
        let base = |site: usize| format!("http://{}:{port}", site_ip(site));

        let mut served = Vec::with_capacity(docs.len());
        let mut resources: Vec<HashMap<String, Resource>> =
            (0..sites).map(|_| HashMap::new()).collect();
        let mut entries: Vec<Vec<Entry>> = (0..sites).map(|_| Vec::new()).collect();
        for (j, doc) in docs.iter().enumerate() {
            let site = j % sites;
            let nth = j / sites;
            let id = escape_path_segment(&doc.id);
            let pdf = SiteKind::of(site) == SiteKind::Sitemap && nth % PDF_EVERY == PDF_EVERY - 1;
            let (path, format, resource) = if pdf {
                let body = build_pdf(&doc.title, &[pdf_text(doc)]);
                (
                    format!("/files/{id}.pdf"),
                    Format::Pdf,
                    Resource::new("application/pdf", body),
                )
            } else {
                (
                    format!("/packages/{id}.html"),
                    Format::Html,
                    Resource::new(
                        "text/html; charset=utf-8",
                        document_page(site, doc).into_string(),
                    ),
                )
            };
            served.push(Served {
                url: format!("{}{path}", base(site)),
                doc_id: doc.id.clone(),
                tags: doc.tags.clone(),
                format,
                site,
            });
            entries[site].push(Entry {
                path: path.clone(),
                title: doc.title.clone(),
                summary: summary_of(&doc.text),
            });
            resources[site].insert(path, resource);
        }

        let mut broken = Vec::new();
        let mut news_site = None;
        if options.broken {
            let tag = |site: usize| format!("site-{site:03}");
            // A page the sitemap lists but the server no longer has.
            let gone = "/archive/removed-package.html";
            entries[0].push(Entry {
                path: gone.into(),
                title: "Removed package".into(),
                summary: "This package was removed from the archive.".into(),
            });
            broken.push(Broken {
                url: format!("{}{gone}", base(0)),
                source: tag(0),
                reason: "http_not_found",
                dead_letter: true,
            });
            // A PDF cut off half way, as an interrupted upload leaves it.
            let cut = "/manuals/packaging-manual.pdf";
            let whole = build_pdf(
                "Packaging manual",
                &["How packages are built, described and uploaded to the archive. ".repeat(60)],
            );
            resources[0].insert(
                cut.into(),
                Resource::new("application/pdf", whole[..whole.len() / 2].to_vec()),
            );
            entries[0].push(Entry {
                path: cut.into(),
                title: "Packaging manual".into(),
                summary: "The packaging manual as a PDF.".into(),
            });
            broken.push(Broken {
                url: format!("{}{cut}", base(0)),
                source: tag(0),
                reason: "pdf_broken",
                dead_letter: true,
            });
            // A news feed whose XML is not well-formed: an item never closed.
            let news = 1 % sites;
            resources[news].insert(
                "/broken-feed.xml".into(),
                Resource::new("application/rss+xml", broken_feed(&base(news))),
            );
            news_site = Some(news);
            broken.push(Broken {
                url: format!("{}/broken-feed.xml", base(news)),
                source: format!("{}-news", tag(news)),
                reason: "bad_feed",
                dead_letter: true,
            });
            // A page with next to no text.
            let tiny_site = 3 % sites;
            resources[tiny_site].insert(
                "/about.html".into(),
                Resource::new(
                    "text/html; charset=utf-8",
                    about_page(tiny_site).into_string(),
                ),
            );
            entries[tiny_site].push(Entry {
                path: "/about.html".into(),
                title: "About".into(),
                summary: "About this site.".into(),
            });
            broken.push(Broken {
                url: format!("{}/about.html", base(tiny_site)),
                source: tag(tiny_site),
                reason: "too_short",
                dead_letter: false,
            });
        }

        let mut page_lists = Vec::with_capacity(sites);
        for (site, list) in entries.iter().enumerate() {
            let kind = SiteKind::of(site);
            let b = base(site);
            let res = &mut resources[site];
            let robots = match kind.listing().filter(|_| kind == SiteKind::Sitemap) {
                Some(l) => format!("User-agent: *\nAllow: /\n\nSitemap: {b}{l}\n"),
                None => "User-agent: *\nAllow: /\n".to_string(),
            };
            res.insert(
                "/robots.txt".into(),
                Resource::new("text/plain; charset=utf-8", robots),
            );
            res.insert(
                "/".into(),
                Resource::new(
                    "text/html; charset=utf-8",
                    home_page(site, list).into_string(),
                ),
            );
            match kind {
                SiteKind::Sitemap => {
                    res.insert(
                        "/sitemap.xml".into(),
                        Resource::new("application/xml", sitemap_xml(&b, list)),
                    );
                }
                SiteKind::Rss => {
                    res.insert(
                        "/feed.xml".into(),
                        Resource::new("application/rss+xml", rss_xml(site, &b, list)),
                    );
                }
                SiteKind::Atom => {
                    res.insert(
                        "/atom.xml".into(),
                        Resource::new("application/atom+xml", atom_xml(site, &b, list)),
                    );
                }
                SiteKind::Pages => {}
            }
            page_lists.push(if kind == SiteKind::Pages {
                list.iter().map(|e| format!("{b}{}", e.path)).collect()
            } else {
                Vec::new()
            });
        }

        let requests = Arc::new(AtomicU64::new(0));
        let (shutdown, _) = watch::channel(false);
        let mut tasks = Vec::with_capacity(sites);
        for (listener, resources) in listeners.into_iter().zip(resources) {
            let state = Arc::new(SiteState {
                resources,
                requests: requests.clone(),
            });
            let app = axum::Router::new().fallback(answer).with_state(state);
            let mut stop = shutdown.subscribe();
            tasks.push(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::warn!(error = %e, "A sample web site stopped serving.");
                }
            }));
        }
        tracing::info!(
            sites,
            port,
            documents = served.len(),
            "Serving the sample web on loopback."
        );
        Ok(SampleWeb {
            port,
            sites,
            served,
            broken,
            page_lists,
            news_site,
            requests,
            shutdown,
            tasks,
        })
    }

    /// A complete sources file (TOML text) for `sift ingest` naming every site
    /// (one `[[source]]` each, tagged `site-000` on; a `pages` site that
    /// serves no documents is left out) and, with the broken items, the
    /// broken feed's own source (`site-001-news`).
    pub fn sources_toml(&self) -> String {
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut out = format!(
            "# The sample web of `sift run`: {} sites on loopback port {}.\n\n\
             [defaults]\n\
             # Loopback: every site answers at once, so politeness can be generous.\n\
             rate_limit = 100.0\n\
             # Many package descriptions are only a sentence long.\n\
             min_text_chars = 40\n\
             poll_interval = \"10m\"\n\
             max_urls = 100000\n\
             content_types = [\"text/html\", \"application/pdf\"]\n",
            self.sites, self.port
        );
        for site in 0..self.sites {
            let kind = SiteKind::of(site);
            let b = self.base(site);
            let urls: Vec<String> = match kind.listing() {
                Some(l) => vec![quote(&format!("{b}{l}"))],
                None => self.page_lists[site].iter().map(|u| quote(u)).collect(),
            };
            if urls.is_empty() {
                // A `pages` source needs a URL; this site serves no documents.
                continue;
            }
            out += &format!(
                "\n[[source]]\ntag = \"site-{site:03}\"\nkind = \"{}\"\nurls = [{}]\n",
                kind.as_str(),
                urls.join(", ")
            );
        }
        if let Some(site) = self.news_site {
            out += &format!(
                "\n[[source]]\ntag = \"site-{site:03}-news\"\nkind = \"rss\"\nurls = [{}]\n",
                quote(&format!("{}/broken-feed.xml", self.base(site)))
            );
        }
        out
    }

    /// Every labeled document served, in input order.
    pub fn served(&self) -> &[Served] {
        &self.served
    }

    /// The deliberately broken items (empty without [`WebOptions::broken`]).
    pub fn broken(&self) -> &[Broken] {
        &self.broken
    }

    /// Number of sites.
    pub fn sites(&self) -> usize {
        self.sites
    }

    /// The port every site listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Base URL of site i (for the summary and tests).
    pub fn site_url(&self, i: usize) -> String {
        format!("{}/", self.base(i))
    }

    /// HTTP requests answered so far, all sites.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Stops every site, letting open requests finish (for a few seconds at
    /// most); the port is free again when this returns.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(STOP_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
    }

    fn base(&self, site: usize) -> String {
        format!("http://{}:{}", site_ip(site), self.port)
    }
}

impl Drop for SampleWeb {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The loopback address of site `i`.
fn site_ip(i: usize) -> Ipv4Addr {
    let third = u8::try_from(1 + i / 254).unwrap_or(u8::MAX);
    let fourth = u8::try_from(1 + i % 254).unwrap_or(u8::MAX);
    Ipv4Addr::new(127, 0, third, fourth)
}

/// URL prefixes that cover every address a sample web of up to
/// [`MAX_SITES`] sites uses, whatever its port and site count (a document
/// may sit on another site in a run with another `--sites`), and nothing
/// else on loopback: `http://127.0.1.` to `http://127.0.200.`.
pub fn url_prefixes() -> Vec<String> {
    let last = site_ip(MAX_SITES - 1).octets()[2];
    (1..=last).map(|k| format!("http://127.0.{k}.")).collect()
}

/// Binds every site's address on `port`, or on one port free on all of them
/// when `port` is 0.
async fn bind_all(sites: usize, port: u16) -> crate::Result<(u16, Vec<TcpListener>)> {
    let fixed = port != 0;
    let mut last = None;
    for _ in 0..if fixed { 1 } else { PORT_TRIES } {
        let mut listeners = Vec::with_capacity(sites);
        let mut port = port;
        let mut failed = None;
        for site in 0..sites {
            let addr = SocketAddr::from((site_ip(site), port));
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    if port == 0 {
                        port = l
                            .local_addr()
                            .map_err(|e| {
                                crate::Error::io("reading the sample web's bound address", e)
                            })?
                            .port();
                    }
                    listeners.push(l);
                }
                Err(e) => {
                    failed = Some((addr, e));
                    break;
                }
            }
        }
        match failed {
            None => return Ok((port, listeners)),
            // Another port may be free everywhere; nothing else changes on a retry.
            Some((addr, e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some((addr, e));
            }
            Some((addr, e)) => {
                last = Some((addr, e));
                break;
            }
        }
    }
    let Some((addr, e)) = last else {
        return Err(crate::Error::Invalid(
            "the sample web found no port to listen on".into(),
        ));
    };
    let last_ip = site_ip(sites - 1);
    let context = if e.kind() == std::io::ErrorKind::AddrNotAvailable {
        format!(
            "the sample web cannot listen on {addr}: it needs the loopback addresses 127.0.1.1 to {last_ip} (Linux routes all of 127.0.0.0/8 to lo; elsewhere add them to the loopback interface)"
        )
    } else if fixed {
        format!(
            "the sample web cannot listen on port {} of {addr}, and needs it free on every site address (127.0.1.1 to {last_ip}); pass another port with --web-port (0 picks a free one)",
            addr.port()
        )
    } else if e.kind() == std::io::ErrorKind::AddrInUse {
        format!(
            "the sample web found no port free on all its addresses (127.0.1.1 to {last_ip}) in {PORT_TRIES} tries, the last {}; pass a free port with --web-port",
            addr.port()
        )
    } else {
        format!("the sample web cannot listen on {addr}; pass another port with --web-port")
    };
    Err(crate::Error::io(context, e))
}

/// Answers one request from the site's prepared resources.
async fn answer(
    State(site): State<Arc<SiteState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    site.requests.fetch_add(1, Ordering::Relaxed);
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Body::from(text));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Some(res) = site.resources.get(uri.path()) else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    let unchanged = not_modified(&headers, &res.etag);
    let body = if unchanged || method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(res.body.clone())
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::ETAG, res.etag.clone());
    h.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_static(LAST_MODIFIED),
    );
    if unchanged {
        *r.status_mut() = StatusCode::NOT_MODIFIED;
    } else {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(res.content_type),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(res.body.len()));
    }
    r
}

/// Whether a conditional GET's validators match: `If-None-Match` when given
/// (any listed tag, weak or strong, or `*`), else `If-Modified-Since` not
/// before [`LAST_MODIFIED`].
fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    if let Some(v) = headers.get(header::IF_NONE_MATCH) {
        let ours = etag.as_bytes();
        return v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t).as_bytes() == ours)
        });
    }
    let since = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(http_date_secs);
    matches!((since, http_date_secs(LAST_MODIFIED)), (Some(s), Some(m)) if s >= m)
}

/// Seconds since the Unix epoch of an HTTP date (`Mon, 01 Jan 2024 00:00:00 GMT`).
fn http_date_secs(s: &str) -> Option<i64> {
    let at = httpdate::parse_http_date(s).ok()?;
    let secs = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
}

/// `s` with every byte but unreserved URL characters percent-encoded, so a
/// package name like `libstdc++6` is one path segment.
fn escape_path_segment(s: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, RESERVED).to_string()
}

/// Text for XML: characters XML 1.0 forbids dropped, markup escaped.
fn xml_text(s: &str) -> String {
    let kept: String = s
        .chars()
        .filter(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r'))
        .collect();
    quick_xml::escape::escape(kept.as_str()).into_owned()
}

/// The paragraphs of a description (separated by blank lines).
fn paragraphs(text: &str) -> impl Iterator<Item = &str> {
    text.split("\n\n").map(str::trim).filter(|p| !p.is_empty())
}

/// The first sentence or so of a description, for meta descriptions and feeds.
fn summary_of(text: &str) -> String {
    let first = paragraphs(text).next().unwrap_or_default();
    let flat = first.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= 160 {
        return flat;
    }
    let cut: String = flat.chars().take(157).collect();
    format!("{}...", cut.trim_end())
}

/// The text of a document's PDF. The package name keeps two packages with
/// the same title and description distinct documents.
fn pdf_text(doc: &LabeledDoc) -> String {
    format!(
        "{}\n\nPackage: {}\n\n{}",
        doc.title,
        doc.id,
        doc.text.trim()
    )
}

fn site_name(site: usize) -> String {
    format!("Package notes {site:03}")
}

/// What a page's `<head>` says about it.
struct Head<'a> {
    title: &'a str,
    description: &'a str,
    /// The Debian archive section, as a news site's `article:section`.
    section: Option<&'a str>,
}

/// The parts every page of a site shares: head, navigation, header, footer.
fn layout(site: usize, head: Head<'_>, main: Markup) -> Markup {
    let Head {
        title,
        description,
        section,
    } = head;
    let name = site_name(site);
    let listing = SiteKind::of(site).listing();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                meta name="description" content=(description);
                @if let Some(section) = section.filter(|s| !s.is_empty()) {
                    meta property="article:section" content=(section);
                }
                style { "body{font-family:sans-serif;max-width:46rem;margin:auto}nav a{margin-right:1em}" }
            }
            body {
                nav {
                    a href="/" { "Home" }
                    a href="/" { "All packages" }
                    @if let Some(l) = listing {
                        a href=(l) { "Subscribe" }
                    }
                    a href="/about.html" { "About" }
                }
                header {
                    p.site-name { (name) }
                    p.tagline { "Descriptions of Debian packages, one page each." }
                }
                main { (main) }
                footer {
                    p { "© 2024 " (name) ". Package descriptions are distributed under the licenses of their packages." }
                    p {
                        a href="/" { "Home" } " · "
                        a href="/about.html" { "About" } " · "
                        a href="/privacy.html" { "Privacy" } " · "
                        a href="/contact.html" { "Contact" }
                    }
                }
            }
        }
    }
}

/// A document's page: the title as heading, the package name, the
/// description's paragraphs.
fn document_page(site: usize, doc: &LabeledDoc) -> Markup {
    let main = html! {
        article {
            h1 { (doc.title) }
            p.package { "Package: " code { (doc.id) } }
            @for p in paragraphs(&doc.text) {
                p { (p) }
            }
        }
    };
    layout(
        site,
        Head {
            title: &doc.title,
            description: &summary_of(&doc.text),
            section: Some(&doc.section),
        },
        main,
    )
}

/// A site's home page, listing its pages.
fn home_page(site: usize, entries: &[Entry]) -> Markup {
    let name = site_name(site);
    let main = html! {
        h1 { (name) }
        ul {
            @for e in entries {
                li { a href=(e.path) { (e.title) } }
            }
        }
    };
    layout(
        site,
        Head {
            title: &name,
            description: "Descriptions of Debian packages.",
            section: None,
        },
        main,
    )
}

/// A page with next to no text.
fn about_page(site: usize) -> Markup {
    let main = html! {
        h1 { "About" }
        p { "Notes, soon." }
    };
    layout(
        site,
        Head {
            title: "About",
            description: "About this site.",
            section: None,
        },
        main,
    )
}

/// A news feed whose XML is not well-formed: an item is never closed.
fn broken_feed(base: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<rss version=\"2.0\"><channel>\
         <title>Project news</title><link>{base}/</link><description>News</description>\
         <item><title>Archive maintenance</title><link>{base}/archive/maintenance.html</link>\
         </channel></rss>\n"
    )
}

fn sitemap_xml(base: &str, entries: &[Entry]) -> String {
    let mut out = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n",
    );
    for e in entries {
        out += &format!(
            "  <url><loc>{}</loc><lastmod>{UPDATED}</lastmod></url>\n",
            xml_text(&format!("{base}{}", e.path))
        );
    }
    out += "</urlset>\n";
    out
}

fn rss_xml(site: usize, base: &str, entries: &[Entry]) -> String {
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<rss version=\"2.0\"><channel>\n\
         <title>{}</title><link>{base}/</link><description>New package descriptions</description>\n\
         <lastBuildDate>{LAST_MODIFIED}</lastBuildDate>\n",
        xml_text(&site_name(site))
    );
    for e in entries {
        let url = xml_text(&format!("{base}{}", e.path));
        out += &format!(
            "<item><title>{}</title><link>{url}</link><guid isPermaLink=\"true\">{url}</guid>\
             <pubDate>{LAST_MODIFIED}</pubDate><description>{}</description></item>\n",
            xml_text(&e.title),
            xml_text(&e.summary)
        );
    }
    out += "</channel></rss>\n";
    out
}

fn atom_xml(site: usize, base: &str, entries: &[Entry]) -> String {
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<feed xmlns=\"http://www.w3.org/2005/Atom\">\n\
         <title>{}</title><id>{base}/</id><updated>{UPDATED}</updated>\
         <link rel=\"self\" href=\"{base}/atom.xml\"/><link rel=\"alternate\" href=\"{base}/\"/>\n",
        xml_text(&site_name(site))
    );
    for e in entries {
        let url = xml_text(&format!("{base}{}", e.path));
        out += &format!(
            "<entry><title>{}</title><id>{url}</id><updated>{UPDATED}</updated>\
             <link rel=\"alternate\" href=\"{url}\"/><summary>{}</summary></entry>\n",
            xml_text(&e.title),
            xml_text(&e.summary)
        );
    }
    out += "</feed>\n";
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::path::Path;

    use anyhow::{ensure, Context, Result};

    use super::*;
    use crate::config::Config;
    use crate::ingest::{sources, Ingest};

    fn bundled() -> Result<Vec<LabeledDoc>> {
        Ok(crate::sample::bundled()?)
    }

    #[test]
    fn url_prefixes_cover_every_site_address_and_nothing_else() {
        let prefixes = url_prefixes();
        let covered = |url: &str| prefixes.iter().any(|p| url.starts_with(p.as_str()));
        for i in [0, 1, 119, 253, 254, 10_000, MAX_SITES - 1] {
            let url = format!("http://{}:18480/packages/x.html", site_ip(i));
            assert!(covered(&url), "{url}");
        }
        assert!(!covered("http://127.0.0.1:8080/packages/x.html"));
        assert!(!covered("http://127.0.201.1:80/"));
        assert!(!covered("https://www.example.com/"));
    }

    #[test]
    fn http_dates_parse() {
        assert_eq!(http_date_secs(LAST_MODIFIED), Some(1_704_067_200));
        assert_eq!(
            http_date_secs("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(http_date_secs("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(http_date_secs("yesterday"), None);
    }

    #[test]
    fn pages_extract_to_their_text_without_boilerplate() -> Result<()> {
        let docs = bundled()?;
        let doc = docs
            .iter()
            .find(|d| d.text.contains("\n\n"))
            .context("a description with two paragraphs")?;
        let page = document_page(5, doc).into_string();
        let (title, text) =
            crate::ingest::extract::html::extract_str(&page).expect("within the budget");
        assert_eq!(title, doc.title);
        ensure!(text.starts_with(&doc.title), "{text}");
        // The model's fields survive the trip: the section as the page's
        // article:section, the package name as its URL's last segment.
        let extracted = crate::ingest::extract::html::extract(page.as_bytes(), None, "x.html")
            .expect("within the budget");
        ensure!(!doc.section.is_empty());
        assert_eq!(extracted.section.as_deref(), Some(doc.section.as_str()));
        for id in [doc.id.as_str(), "libstdc++6", "g++-12"] {
            let url = format!(
                "http://{}:18480/packages/{}.html",
                site_ip(5),
                escape_path_segment(id)
            );
            assert_eq!(sift_training::page_name(&url), id, "{url}");
        }
        ensure!(text.contains(&format!("Package: {}", doc.id)), "{text}");
        let last = paragraphs(&doc.text).last().unwrap_or_default();
        let last_words: Vec<&str> = last.split_whitespace().collect();
        ensure!(
            text.contains(&last_words.join(" ")),
            "the last paragraph is missing from {text}"
        );
        for boilerplate in ["©", "Privacy", "Subscribe", "Package notes 005"] {
            ensure!(!text.contains(boilerplate), "{boilerplate} kept in {text}");
        }
        // Markup in the text is escaped, not interpreted.
        let nasty = LabeledDoc {
            id: "x".into(),
            source: "x".into(),
            title: "<script>alert(1)</script> & co".into(),
            text: "Uses <b>tags</b> & \"quotes\".".into(),
            section: String::new(),
            tags: vec![],
        };
        let page = document_page(0, &nasty).into_string();
        ensure!(!page.contains("<script>alert"), "{page}");
        let (title, text) =
            crate::ingest::extract::html::extract_str(&page).expect("within the budget");
        assert_eq!(title, nasty.title);
        ensure!(text.contains("Uses <b>tags</b> & \"quotes\"."), "{text}");
        Ok(())
    }

    #[test]
    fn the_broken_pdf_and_feed_fail_to_parse_and_the_good_listings_do() -> Result<()> {
        let whole = build_pdf("Manual", &["Some text of the manual. ".repeat(60)]);
        let err = crate::ingest::extract::extract(
            &whole[..whole.len() / 2],
            Some("application/pdf"),
            "m.pdf",
        )
        .err()
        .context("a truncated PDF was extracted")?;
        assert_eq!(err.reason(), "pdf_broken");
        ensure!(crate::ingest::discover::feed(broken_feed("http://x").as_bytes()).is_err());
        // The good listings parse, and list what was given.
        let entries = [Entry {
            path: "/packages/a%2B%2B.html".into(),
            title: "A <fast> & small tool".into(),
            summary: "Does \u{1} things.".into(),
        }];
        let rss = crate::ingest::discover::feed(rss_xml(0, "http://x", &entries).as_bytes())?;
        assert_eq!(rss[0].url, "http://x/packages/a%2B%2B.html");
        assert_eq!(rss[0].title.as_deref(), Some("A <fast> & small tool"));
        let atom = crate::ingest::discover::feed(atom_xml(0, "http://x", &entries).as_bytes())?;
        assert_eq!(atom[0].url, "http://x/packages/a%2B%2B.html");
        let map = crate::ingest::discover::sitemap(sitemap_xml("http://x", &entries).as_bytes())?;
        assert_eq!(map.pages, ["http://x/packages/a%2B%2B.html"]);
        Ok(())
    }

    #[tokio::test]
    async fn a_hundred_sites_serve_every_document_once() -> Result<()> {
        let docs = bundled()?;
        let options = WebOptions {
            sites: 100,
            port: 0,
            broken: true,
        };
        let web = SampleWeb::start(&docs, &options).await?;
        assert_eq!(web.sites(), 100);
        let parsed = sources::parse(&web.sources_toml(), Path::new("sample-web.toml"))?;
        assert_eq!(parsed.len(), 101, "one source per site and the news feed");
        let kinds: HashSet<&str> = parsed.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds.len(), 4, "{kinds:?}");
        assert_eq!(parsed[0].min_text_chars, 40);

        let served = web.served();
        assert_eq!(served.len(), docs.len());
        let ids: HashSet<&str> = served.iter().map(|s| s.doc_id.as_str()).collect();
        let want: HashSet<&str> = docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, want, "every document, each once");
        let urls: HashSet<&str> = served.iter().map(|s| s.url.as_str()).collect();
        assert_eq!(urls.len(), served.len(), "distinct URLs");
        let pdfs = served.iter().filter(|s| s.format == Format::Pdf).count();
        ensure!(pdfs > 50, "{pdfs} PDFs");
        ensure!(served
            .iter()
            .all(|s| s.format == Format::Html || SiteKind::of(s.site) == SiteKind::Sitemap));
        let hosts: HashSet<String> = served
            .iter()
            .filter_map(|s| url::Url::parse(&s.url).ok()?.host_str().map(String::from))
            .collect();
        assert_eq!(hosts.len(), 100, "each site is its own host");
        for b in web.broken() {
            ensure!(!urls.contains(b.url.as_str()), "{} is a labeled URL", b.url);
        }

        // Conditional GETs: 200 with validators, then 304.
        let client = reqwest::Client::new();
        let plus = served
            .iter()
            .find(|s| s.doc_id.contains('+'))
            .context("a package name with '+'")?;
        let r = client.get(&plus.url).send().await?;
        assert_eq!(r.status(), 200, "{}", plus.url);
        let etag = r
            .headers()
            .get(header::ETAG)
            .context("an ETag")?
            .to_str()?
            .to_string();
        assert_eq!(r.headers()[header::LAST_MODIFIED], LAST_MODIFIED);
        let r = client
            .get(&plus.url)
            .header(header::IF_NONE_MATCH, &etag)
            .send()
            .await?;
        assert_eq!(r.status(), 304);
        let r = client
            .get(&plus.url)
            .header(header::IF_MODIFIED_SINCE, LAST_MODIFIED)
            .send()
            .await?;
        assert_eq!(r.status(), 304);
        let r = client
            .get(&plus.url)
            .header(header::IF_MODIFIED_SINCE, "Sun, 31 Dec 2023 00:00:00 GMT")
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        let robots = client
            .get(format!("{}robots.txt", web.site_url(0)))
            .send()
            .await?
            .text()
            .await?;
        ensure!(
            robots.contains(&format!("Sitemap: {}sitemap.xml", web.site_url(0))),
            "{robots}"
        );
        assert_eq!(web.requests(), 5);
        web.stop().await;
        Ok(())
    }

    #[tokio::test]
    async fn ingest_gets_every_document_and_the_broken_items_fail() -> Result<()> {
        let docs = bundled()?;
        let options = WebOptions {
            sites: 100,
            port: 0,
            broken: true,
        };
        let web = SampleWeb::start(&docs, &options).await?;
        let srcs = sources::parse(&web.sources_toml(), Path::new("sample-web.toml"))?;
        let dir = tempfile::tempdir()?;
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let log = crate::backends::open_log(&config).await?;
        let objects = crate::backends::open_objects(&config).await?;
        let table = crate::backends::open_table(&config).await?;
        let ingest = Ingest::new(log.clone(), objects, table, &config).await?;

        let first = ingest.pass(&srcs).await?;
        assert_eq!(
            first.produced,
            web.served().len() as u64,
            "every labeled document arrives: {first:?}"
        );
        for b in web.broken().iter().filter(|b| b.dead_letter) {
            assert_eq!(
                first.dead_letters.get(b.reason),
                Some(&1),
                "{}: {first:?}",
                b.url
            );
        }
        assert_eq!(
            first.dead_letters.values().sum::<u64>(),
            3,
            "only the broken items are dead letters: {first:?}"
        );
        assert_eq!(first.dropped.get("too_short"), Some(&1), "{first:?}");
        assert_eq!(first.dropped.len(), 1, "{first:?}");

        // The ids are the ones the served URLs give.
        let mut ids = HashSet::new();
        let watermarks = log.watermarks(crate::envelope::topics::RAW).await?;
        for w in watermarks {
            let mut offset = w.low.clone();
            while offset < w.high {
                let msgs = log
                    .fetch(crate::envelope::topics::RAW, w.partition, &offset, 1000)
                    .await?;
                ensure!(
                    !msgs.is_empty(),
                    "partition {} stops at {offset}",
                    w.partition
                );
                for m in msgs {
                    offset = m.offset.next();
                    let env: crate::envelope::Envelope = serde_json::from_slice(&m.value)?;
                    ids.insert(env.id);
                }
            }
        }
        let want: HashSet<String> = web
            .served()
            .iter()
            .map(|s| {
                let tag = format!("site-{:03}", s.site);
                crate::envelope::document_id(&tag, &s.url)
            })
            .collect();
        assert_eq!(ids, want);

        let second = ingest.pass(&srcs).await?;
        assert_eq!(second.produced, 0, "{second:?}");
        assert_eq!(second.not_modified, web.served().len() as u64, "{second:?}");
        web.stop().await;
        Ok(())
    }

    #[tokio::test]
    async fn more_sites_than_documents_is_a_valid_web() -> Result<()> {
        let docs: Vec<LabeledDoc> = bundled()?.into_iter().take(3).collect();
        let options = WebOptions {
            sites: 9,
            port: 0,
            broken: false,
        };
        let web = SampleWeb::start(&docs, &options).await?;
        let parsed = sources::parse(&web.sources_toml(), Path::new("sample-web.toml"))?;
        // Sites 0 to 2 serve a document each; of the empty ones, the pages
        // sites (3 and 7) have nothing to list.
        assert_eq!(parsed.len(), 7);
        assert_eq!(web.served().len(), 3);
        let zero = SampleWeb::start(
            &docs,
            &WebOptions {
                sites: 0,
                ..options
            },
        )
        .await;
        ensure!(zero.is_err(), "a web of no sites started");
        web.stop().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_taken_port_is_named() -> Result<()> {
        let docs = bundled()?;
        // Take the port on the third site's address only.
        let taken = std::net::TcpListener::bind((site_ip(2), 0))?;
        let port = taken.local_addr()?.port();
        let options = WebOptions {
            sites: 4,
            port,
            broken: false,
        };
        let err = match SampleWeb::start(&docs, &options).await {
            Ok(_) => anyhow::bail!("port {port} was taken, yet the web started"),
            Err(e) => e.to_string(),
        };
        ensure!(err.contains(&format!("port {port}")), "{err}");
        ensure!(err.contains("--web-port"), "{err}");
        // The addresses bound before the failure are free again.
        drop(taken);
        let web = SampleWeb::start(&docs, &options).await?;
        assert_eq!(web.port(), port);
        assert_eq!(web.site_url(3), format!("http://127.0.1.4:{port}/"));
        ensure!(web.broken().is_empty());
        web.stop().await;
        Ok(())
    }
}
