//! Two `sift ingest` daemons on one sources file, as a consumer group on
//! `sift.sources`: eight sites on eight loopback addresses, each with a
//! sitemap source and a pages source. Each page is fetched once, every site
//! by one instance only (so per-site politeness holds across instances),
//! both instances get sites, and when one stops the other takes its sites
//! over on their schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use parking_lot::Mutex;
use sift::config::Config;
use sift::envelope::topics;
use sift::ingest::{serve_group, sources, Ingest};

const SITES: usize = 8;
/// Pages a site's sitemap lists, and pages its `pages` source names.
const MAPPED: usize = 3;
const LISTED: usize = 2;

/// (site, path, user agent) of every request, in order.
type Hits = Arc<Mutex<Vec<(usize, String, String)>>>;

fn page(site: usize, k: usize) -> String {
    format!(
        "<html><head><title>Site {site} page {k}</title></head><body><p>Notice {k} of site {site}: \
         the committee met on day {} and agreed {} items about the water supply of district {}.</p></body></html>",
        site * 10 + k,
        k + 2,
        site + 100 * k
    )
}

async fn start_site(site: usize, hits: Hits) -> Result<SocketAddr> {
    let app = axum::Router::new().fallback(move |uri: Uri, req: HeaderMap| {
        let hits = hits.clone();
        async move {
            let ua = req
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            hits.lock().push((site, uri.path().to_string(), ua));
            let (status, ct, body) = match uri.path() {
                "/robots.txt" => (StatusCode::OK, "text/plain", String::new()),
                "/sitemap.xml" => (
                    StatusCode::OK,
                    "application/xml",
                    format!(
                        "<?xml version=\"1.0\"?><urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">{}</urlset>",
                        (1..=MAPPED).map(|k| format!("<url><loc>/p{k}.html</loc></url>")).collect::<String>()
                    ),
                ),
                p => match p.strip_prefix("/p").and_then(|p| p.strip_suffix(".html")).and_then(|k| k.parse().ok()) {
                    Some(k) if (1..=MAPPED + LISTED).contains(&k) => (StatusCode::OK, "text/html", page(site, k)),
                    _ => (StatusCode::NOT_FOUND, "text/plain", "no".to_string()),
                },
            };
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, ct)
                .body(axum::body::Body::from(body))
                .unwrap_or_default()
        }
    });
    // One loopback address per site: one host per site.
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.{}:0", site + 2)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

fn config(dir: &Path, agent: &str) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.log.default_partitions = 4;
    c.ingest.per_host_rate = 0.0;
    c.ingest.user_agent = agent.into();
    c.ingest.timeout = Duration::from_secs(5);
    c.ingest.max_attempts = 1;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingest_daemons_on_one_sources_file_fetch_each_page_once() -> Result<()> {
    let hits: Hits = Arc::default();
    let mut text = String::from("[defaults]\npoll_interval = \"5s\"\n");
    for site in 0..SITES {
        let addr = start_site(site, hits.clone()).await?;
        let pages: Vec<String> = (MAPPED + 1..=MAPPED + LISTED)
            .map(|k| format!("\"http://{addr}/p{k}.html\""))
            .collect();
        text.push_str(&format!(
            "[[source]]\ntag = \"site-{site}-map\"\nkind = \"sitemap\"\nurls = [\"http://{addr}/sitemap.xml\"]\n\
             [[source]]\ntag = \"site-{site}-pages\"\nkind = \"pages\"\nurls = [{}]\n",
            pages.join(", ")
        ));
    }
    let sources = Arc::new(sources::parse(&text, Path::new("sources.toml"))?);
    let dir = tempfile::tempdir()?;
    let base = config(dir.path(), "sift-a");
    let log = sift::backends::open_log(&base).await?;
    let objects = sift::backends::open_objects(&base).await?;
    let table = sift::backends::open_table(&base).await?;
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for agent in ["sift-a", "sift-b"] {
        let c = config(dir.path(), agent);
        let ingest = Arc::new(Ingest::new(log.clone(), objects.clone(), table.clone(), &c).await?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sources = sources.clone();
        tasks.push(tokio::spawn(async move {
            serve_group(&ingest, &sources, "sift-ingest", async {
                let _ = stopped.await;
            })
            .await
        }));
        stops.push(stop);
    }

    // The first visits: every page once.
    let documents = SITES * (MAPPED + LISTED);
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        let produced: u64 = log
            .watermarks(topics::RAW)
            .await?
            .iter()
            .map(|w| w.low.until(&w.high))
            .sum();
        if produced >= documents as u64 {
            break hits.lock().clone();
        }
        ensure!(
            Instant::now() < deadline,
            "{produced} of {documents} documents after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut per_page: BTreeMap<(usize, &str), u32> = BTreeMap::new();
    let mut agents_of: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
    for (site, path, ua) in &first {
        if path != "/robots.txt" {
            *per_page.entry((*site, path)).or_default() += 1;
        }
        agents_of.entry(*site).or_default().insert(ua.as_str());
    }
    ensure!(
        per_page.len() == SITES * (MAPPED + LISTED + 1),
        "{per_page:?}"
    );
    ensure!(
        per_page.values().all(|n| *n == 1),
        "a page was fetched twice: {per_page:?}"
    );
    // One instance per site, robots.txt included.
    ensure!(
        agents_of.values().all(|a| a.len() == 1),
        "a site was visited by both: {agents_of:?}"
    );
    let b_sites: BTreeSet<usize> = agents_of
        .iter()
        .filter(|(_, a)| a.contains("sift-b"))
        .map(|(s, _)| *s)
        .collect();
    ensure!(
        !b_sites.is_empty() && b_sites.len() < SITES,
        "the sites were not shared: {agents_of:?}"
    );

    // b stops: a takes its sites over and visits them on their schedule
    // (5 s after b's visit), alone.
    let stop_b = stops.pop().expect("b");
    let _ = stop_b.send(());
    tasks.pop().expect("b").await??;
    let stopped_at = hits.lock().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after: Vec<(usize, String, String)> = hits.lock()[stopped_at..].to_vec();
        ensure!(
            after.iter().all(|(_, _, ua)| ua == "sift-a"),
            "b fetched after it stopped"
        );
        let taken: BTreeSet<usize> = after
            .iter()
            .filter(|(s, p, _)| b_sites.contains(s) && p.ends_with(".html"))
            .map(|(s, _, _)| *s)
            .collect();
        if taken == b_sites {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "a took over only {taken:?} of {b_sites:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stops.pop().expect("a").send(());
    tasks.pop().expect("a").await??;
    Ok(())
}
