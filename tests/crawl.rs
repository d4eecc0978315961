//! `links` sources against a fixture site with neither sitemap nor feed: a
//! council's home page, minutes behind five paginated index pages, PDF
//! reports, links back to every index (cycles), the same pages linked with
//! fragments, tracking and session parameters, a
//! chain of pages deeper than the depth limit, a page that asks robots not
//! to follow its links, a path robots.txt disallows, an excluded print
//! section, and links to another site (another port) that must never be
//! requested. Counts are exact, and every page is requested at most once a
//! visit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use parking_lot::Mutex;
use sift::backends::log::Log;
use sift::config::Config;
use sift::envelope::{topics, Envelope};
use sift::ingest::{sources, Ingest};

/// Index pages of minutes, four minutes each.
const INDEX_PAGES: usize = 5;
const PER_PAGE: usize = 4;
/// The deep chain: /deep/1.html → /deep/2.html → … each linking one document.
const DEEP: usize = 12;
const REPORTS: usize = 3;

/// Requests per path and query, on one server.
#[derive(Default)]
struct Hits(Mutex<BTreeMap<String, u32>>);

fn html(title: &str, body: &str) -> String {
    format!("<!DOCTYPE html><html><head><title>{title}</title></head><body><h1>{title}</h1>{body}</body></html>")
}

fn respond(status: StatusCode, ct: &str, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ct)
        .body(body.into())
        .unwrap_or_default()
}

/// A document: its body with an ETag, or 304 for a matching If-None-Match.
fn document(tag: &str, req: &HeaderMap, ct: &str, body: Vec<u8>) -> Response {
    let etag = format!("\"{tag}\"");
    if req
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return respond(StatusCode::NOT_MODIFIED, ct, Body::empty());
    }
    let mut r = respond(StatusCode::OK, ct, body);
    if let Ok(v) = etag.parse() {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

fn minutes_name(n: usize) -> String {
    format!("2024-{:02}-{:02}", 1 + n / 28, 1 + n % 28)
}

fn minutes_text(n: usize) -> String {
    format!(
        "Minutes of the council meeting number {n}. Present: the mayor and {} councillors. \
         Item {n}.1: the budget for road repairs in ward {} was approved by {} votes to {}. \
         Item {n}.2: the library's opening hours change from {} o'clock. Item {n}.3: public comment \
         on the planning application {} for the site at {} Mill Lane was heard and recorded.",
        5 + n % 7,
        n % 9,
        7 + n % 3,
        n % 4,
        8 + n % 3,
        1000 + n * 17,
        n * 3 + 1
    )
}

async fn serve(hits: Arc<Hits>, other: SocketAddr, uri: Uri, req: HeaderMap) -> Response {
    let key = uri
        .path_and_query()
        .map_or(uri.path().to_string(), |p| p.as_str().to_string());
    *hits.0.lock().entry(key).or_default() += 1;
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let path = uri.path();
    let ok = |body: String| respond(StatusCode::OK, "text/html; charset=utf-8", body);
    match path {
        "/robots.txt" => respond(StatusCode::OK, "text/plain", "User-agent: *\nDisallow: /private/\n"),
        "/" => ok(html(
            "Council",
            &format!(
                "<a href=\"/minutes/\">Minutes</a> <a href=\"/reports/\">Reports</a> \
                 <a href=\"about.html\">About</a> <a href=\"/private/secret.html\">Staff</a> \
                 <a href=\"mailto:clerk@council.example\">Mail</a> <a href=\"javascript:void(0)\">Menu</a> \
                 <a href=\"http://{other}/elsewhere.html\">Elsewhere</a> \
                 <a href=\"/minutes/#list\">Minutes again</a> <a href=\"/deep/1.html\">Archive</a> \
                 <a href=\"/nofollow.html\">Notices</a> <a href=\"/print/minutes/\">Print</a>"
            ),
        )),
        "/about.html" => ok(html("About", "<p>About the council.</p><a href=\"/\">Home</a>")),
        "/minutes/" => {
            let page: usize = query.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
            if !(1..=INDEX_PAGES).contains(&page) {
                return respond(StatusCode::NOT_FOUND, "text/plain", "no such page");
            }
            let mut body = String::from("<a href=\"/\">Home</a> <a href=\"/minutes/\">First</a>");
            for i in 0..PER_PAGE {
                let n = (page - 1) * PER_PAGE + i;
                let name = minutes_name(n);
                // Relative, with a fragment, and once more with a tracking
                // parameter: one page.
                body.push_str(&format!(
                    "<a href=\"{name}.html#item-1\">{name}</a> <a href=\"/minutes/{name}.html?utm_source=newsletter\">again</a>"
                ));
            }
            if page < INDEX_PAGES {
                let next = page + 1;
                body.push_str(&format!(
                    "<a href=\"?page={next}\">Next</a> <a href=\"/minutes/?PHPSESSID=abc{page}&page={next}\">Next (session)</a>"
                ));
            }
            if page > 1 {
                let prev = page - 1;
                let href = if prev == 1 { "/minutes/".to_string() } else { format!("?page={prev}") };
                body.push_str(&format!("<a href=\"{href}\">Previous</a>"));
            }
            ok(html(&format!("Minutes, page {page}"), &body))
        }
        "/reports/" => {
            let mut body = String::from("<a href=\"/\">Home</a>");
            for r in 1..=REPORTS {
                body.push_str(&format!(
                    "<a href=\"r{r}.pdf\">Report {r}</a> <a href=\"/reports/r{r}.pdf?utm_campaign=x#page=2\">Report {r}, page 2</a>"
                ));
            }
            body.push_str("<a href=\"/print/reports/\">Print all</a>");
            ok(html("Reports", &body))
        }
        "/nofollow.html" => ok(
            "<html><head><meta name=\"robots\" content=\"noindex, nofollow\"><title>Notices</title></head>\
             <body><a href=\"/nofollow-target.html\">Hidden</a></body></html>"
                .to_string(),
        ),
        _ => {
            if let Some(name) = path.strip_prefix("/minutes/").and_then(|p| p.strip_suffix(".html")) {
                let Some(n) = (0..INDEX_PAGES * PER_PAGE + DEEP).find(|n| minutes_name(*n) == name) else {
                    return respond(StatusCode::NOT_FOUND, "text/plain", "no such minutes");
                };
                let text = minutes_text(n);
                let page = html(
                    &format!("Minutes {name}"),
                    &format!("<p>{text}</p><a href=\"/minutes/\">All minutes</a> <a href=\"/\">Home</a>"),
                );
                return document(name, &req, "text/html; charset=utf-8", page.into_bytes());
            }
            if let Some(r) = path.strip_prefix("/reports/r").and_then(|p| p.strip_suffix(".pdf")) {
                let Ok(r) = r.parse::<usize>() else {
                    return respond(StatusCode::NOT_FOUND, "text/plain", "no");
                };
                let pages: Vec<String> = (1..=2).map(|k| format!("Annual report {r}, part {k}. {}", minutes_text(500 + r * 10 + k))).collect();
                let pdf = sift::ingest::extract::build_pdf(&format!("Report {r}"), &pages);
                return document(&format!("r{r}"), &req, "application/pdf", pdf);
            }
            if let Some(d) = path.strip_prefix("/deep/").and_then(|p| p.strip_suffix(".html")) {
                let Ok(d) = d.parse::<usize>() else {
                    return respond(StatusCode::NOT_FOUND, "text/plain", "no");
                };
                let doc = minutes_name(INDEX_PAGES * PER_PAGE + d - 1);
                let next = if d < DEEP { format!("<a href=\"/deep/{}.html\">Older</a>", d + 1) } else { String::new() };
                return ok(html(&format!("Archive {d}"), &format!("<a href=\"/minutes/{doc}.html\">{doc}</a> {next}")));
            }
            respond(StatusCode::NOT_FOUND, "text/plain", "not found")
        }
    }
}

async fn start(other: SocketAddr) -> Result<(SocketAddr, Arc<Hits>)> {
    let hits = Arc::new(Hits::default());
    let state = hits.clone();
    let app = axum::Router::new()
        .fallback(move |uri: Uri, h: HeaderMap| serve(state.clone(), other, uri, h));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, hits))
}

/// Another site: anything it is asked is a failure of the crawl.
async fn start_other() -> Result<(SocketAddr, Arc<Hits>)> {
    let hits = Arc::new(Hits::default());
    let state = hits.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let state = state.clone();
        async move {
            *state.0.lock().entry(uri.to_string()).or_default() += 1;
            respond(
                StatusCode::OK,
                "text/html",
                html("Elsewhere", "<p>Not the council.</p>"),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, hits))
}

fn config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.log.default_partitions = 2;
    c.ingest.per_host_rate = 0.0;
    c.ingest.timeout = Duration::from_secs(5);
    c.ingest.max_attempts = 1;
    c
}

/// An ingest on fresh embedded backends in `dir`, and its log.
async fn fresh(dir: &Path) -> Result<(Ingest, Arc<dyn Log>)> {
    let c = config(dir);
    let log = sift::backends::open_log(&c).await?;
    let objects = sift::backends::open_objects(&c).await?;
    let table = sift::backends::open_table(&c).await?;
    Ok((Ingest::new(log.clone(), objects, table, &c).await?, log))
}

fn source(addr: SocketAddr, extra: &str) -> Result<Vec<sources::Source>> {
    let text = format!(
        r#"[[source]]
tag = "council"
kind = "links"
urls = ["http://127.0.0.1:{port}/"]
include = ['/minutes/\d{{4}}-\d{{2}}-\d{{2}}\.html$', '\.pdf$']
exclude = ['/print/']
{extra}
"#,
        port = addr.port()
    );
    Ok(sources::parse(&text, Path::new("sources.toml"))?)
}

async fn documents(log: &dyn Log) -> Result<Vec<Envelope>> {
    let mut out = Vec::new();
    for w in log.watermarks(topics::RAW).await? {
        let mut at = w.low;
        while at < w.high {
            let batch = log.fetch(topics::RAW, w.partition, &at, 1000).await?;
            ensure!(!batch.is_empty(), "no records at {at}");
            at = batch.last().map_or(at, |m| m.offset.next());
            for m in batch {
                out.push(serde_json::from_slice(&m.value)?);
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crawls_index_pages_with_pagination_and_cycles_fetching_each_page_once() -> Result<()> {
    let (other, other_hits) = start_other().await?;
    let (addr, hits) = start(other).await?;
    let dir = tempfile::tempdir()?;
    let (ingest, log) = fresh(dir.path()).await?;
    // Depth 8: /deep/8.html is fetched (depth 8) but its links are not read,
    // so the documents of /deep/1..7 are found and /deep/9 never asked for.
    let sources = source(addr, "max_depth = 8\nmax_pages = 100")?;

    let s = ingest.pass(&sources).await?;
    let minutes = INDEX_PAGES * PER_PAGE;
    let deep_docs = 7;
    let expected = (minutes + REPORTS + deep_docs) as u64;
    ensure!(
        s.produced == expected,
        "produced {} of {expected}: {s:?}",
        s.produced
    );
    ensure!(s.dead_letters.is_empty(), "{s:?}");
    ensure!(
        s.dropped.get("robots") == Some(&1),
        "the disallowed link: {s:?}"
    );

    let hits = hits.0.lock().clone();
    for (path, n) in &hits {
        ensure!(*n == 1, "{path} was requested {n} times in one visit");
    }
    let asked: BTreeSet<&str> = hits.keys().map(String::as_str).collect();
    // Index pages, once each, whatever form the links took.
    for page in 2..=INDEX_PAGES {
        ensure!(
            asked.contains(format!("/minutes/?page={page}").as_str()),
            "index page {page}: {asked:?}"
        );
    }
    for path in [
        "/",
        "/minutes/",
        "/reports/",
        "/about.html",
        "/nofollow.html",
        "/robots.txt",
        "/deep/8.html",
    ] {
        ensure!(
            asked.contains(path),
            "{path} was never requested: {asked:?}"
        );
    }
    for path in [
        "/private/secret.html",
        "/nofollow-target.html",
        "/deep/9.html",
        "/print/minutes/",
        "/print/reports/",
    ] {
        ensure!(!asked.contains(path), "{path} was requested");
    }
    ensure!(
        !asked
            .iter()
            .any(|p| p.contains("utm_") || p.contains("PHPSESSID")),
        "a tracking or session form was requested: {asked:?}"
    );
    ensure!(other_hits.0.lock().is_empty(), "another site was crawled");
    // Every request but robots.txt is a page the crawl fetched: documents
    // the crawl found were not fetched again.
    ensure!(
        s.crawled == hits.len() as u64 - 1,
        "crawled {} with {} requests",
        s.crawled,
        hits.len()
    );

    // The documents carry canonical URLs.
    let docs = documents(log.as_ref()).await?;
    ensure!(docs.len() as u64 == expected);
    let urls: BTreeSet<&str> = docs.iter().map(|d| d.url.as_str()).collect();
    ensure!(urls.len() == docs.len(), "a page was produced twice");
    for u in &urls {
        ensure!(
            u.starts_with(&format!("http://127.0.0.1:{}/", addr.port()))
                && !u.contains('#')
                && !u.contains('?'),
            "not canonical: {u}"
        );
    }
    ensure!(
        docs.iter()
            .filter(|d| d.content_type == "application/pdf")
            .count()
            == REPORTS
    );

    // A second visit fetches the indexes again but finds every document
    // unchanged (304).
    let again = ingest.pass(&sources).await?;
    ensure!(
        again.produced == 0 && again.not_modified == expected,
        "{again:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_budget_and_a_depth_limit_bound_a_visit() -> Result<()> {
    let (other, _) = start_other().await?;
    let (addr, hits) = start(other).await?;
    let dir = tempfile::tempdir()?;
    let (ingest, _) = fresh(dir.path()).await?;

    // Six pages: the home page, then breadth first /minutes/, /reports/,
    // /about.html, /deep/1.html, /nofollow.html. The documents those index
    // pages link to are still ingested (fetched outside the crawl), the
    // pages further away are not reached.
    let s = ingest.pass(&source(addr, "max_pages = 6")?).await?;
    ensure!(s.crawled == 6, "{s:?}");
    let expected = (PER_PAGE + REPORTS + 1) as u64;
    ensure!(
        s.produced == expected,
        "produced {} of {expected}: {s:?}",
        s.produced
    );
    {
        let hits = hits.0.lock();
        ensure!(hits.values().all(|n| *n == 1), "{hits:?}");
        ensure!(!hits.contains_key("/minutes/?page=2"), "{hits:?}");
    }

    // Depth 1: the home page's links are followed, theirs are not.
    let dir = tempfile::tempdir()?;
    let (ingest, _) = fresh(dir.path()).await?;
    let s = ingest.pass(&source(addr, "max_depth = 1")?).await?;
    ensure!(s.produced == 0, "no document is one link from home: {s:?}");
    let s = ingest.pass(&source(addr, "max_depth = 2")?).await?;
    ensure!(s.produced == expected, "two links from home: {s:?}");
    Ok(())
}
