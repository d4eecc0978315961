//! `sift ingest` against a fixture web served by the test on 127.0.0.1: over
//! 200 sources of every kind, in several charsets, with robots.txt rules,
//! slow, missing, failing, looping, oversized, malformed and fake bodies.
//! Counts are exact: documents in `sift.raw`, dead letters by reason, drops.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use parking_lot::Mutex;
use sift::backends::log::Log;
use sift::backends::objects::{ObjectStore, PutMode};
use sift::backends::table::Table;
use sift::config::Config;
use sift::envelope::{headers, topics, Envelope};
use sift::ingest::{sources, Ingest, IngestSummary};

/// Sources of each plain kind, and what each yields.
const PAGE_SOURCES: usize = 120; // 2 pages each
const SITEMAP_SOURCES: usize = 40; // 3 pages each
const RSS_SOURCES: usize = 20; // 2 items each
const ATOM_SOURCES: usize = 10; // 2 entries each
const PDF_SOURCES: usize = 10; // 1 PDF each

struct Web {
    /// Requests per path, to check retries and politeness.
    hits: Mutex<HashMap<String, Vec<Instant>>>,
    flaky: AtomicU32,
}

/// Real, distinct text for page `(n, k)`: a document of the bundled labeled
/// sample, so pages of one source are not near-duplicates of each other.
fn page_text(n: usize, k: usize) -> String {
    static SAMPLE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let sample = SAMPLE.get_or_init(|| {
        sift::sample::bundled()
            .map(|d| {
                d.into_iter()
                    .map(|d| d.text.replace(['<', '>', '&'], " "))
                    .collect()
            })
            .unwrap_or_default()
    });
    let body = sample
        .get((n * 5 + k) % sample.len().max(1))
        .cloned()
        .unwrap_or_default();
    format!("Report {n}-{k}. {body} Café owners and naïve résumé writers were also mentioned.")
}

fn html(title: &str, body: &str, charset_meta: Option<&str>) -> String {
    let meta = charset_meta
        .map(|c| format!("<meta charset=\"{c}\">"))
        .unwrap_or_default();
    format!(
        "<!DOCTYPE html><html><head>{meta}<title>{title}</title><style>p{{color:red}}</style>\
         <script>var tracking = 1;</script></head><body><nav><a href=\"/\">Home</a> | Menu</nav>\
         <main><h1>{title}</h1><p>{body}</p></main><footer>Copyright footer</footer></body></html>"
    )
}

fn respond(status: StatusCode, ct: &str, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ct)
        .body(body.into())
        .unwrap_or_default()
}

/// The page `(n, k)` in the charset its number picks, with the validators its
/// number picks (ETag, Last-Modified, or none).
fn page(n: usize, k: usize, req: &HeaderMap) -> Response {
    let title = format!("Page {n}-{k}");
    let text = page_text(n, k);
    let etag = format!("\"p{n}-{k}\"");
    let lm = "Wed, 21 Oct 2015 07:28:00 GMT";
    match n % 3 {
        0 if req
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v == etag.as_str()) =>
        {
            return respond(StatusCode::NOT_MODIFIED, "text/html", Body::empty())
        }
        1 if req.get(header::IF_MODIFIED_SINCE).is_some_and(|v| v == lm) => {
            return respond(StatusCode::NOT_MODIFIED, "text/html", Body::empty())
        }
        _ => {}
    }
    let (ct, body): (&str, Vec<u8>) = match n % 4 {
        0 => (
            "text/html; charset=utf-8",
            html(&title, &text, None).into_bytes(),
        ),
        1 => {
            // windows-1252, declared only in the document.
            let page = html(&title, &text, Some("windows-1252"));
            let (b, _, _) = encoding_rs::WINDOWS_1252.encode(&page);
            ("text/html", b.into_owned())
        }
        2 => {
            let jp = format!("{text} 日本語の文書です。");
            let page = html(&title, &jp, None);
            let (b, _, _) = encoding_rs::SHIFT_JIS.encode(&page);
            ("text/html; charset=Shift_JIS", b.into_owned())
        }
        _ => {
            let mut b = vec![0xEF, 0xBB, 0xBF];
            b.extend_from_slice(html(&title, &text, None).as_bytes());
            ("text/html", b)
        }
    };
    let mut r = respond(StatusCode::OK, ct, body);
    match n % 3 {
        0 => {
            r.headers_mut().insert(
                header::ETAG,
                etag.parse()
                    .unwrap_or(header::HeaderValue::from_static("x")),
            );
        }
        1 => {
            r.headers_mut()
                .insert(header::LAST_MODIFIED, header::HeaderValue::from_static(lm));
        }
        _ => {}
    }
    r
}

async fn serve(web: Arc<Web>, uri: Uri, req: HeaderMap) -> Response {
    let path = uri.path().to_string();
    web.hits
        .lock()
        .entry(path.clone())
        .or_default()
        .push(Instant::now());
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let base = "http://HOST";
    match parts.as_slice() {
        ["robots.txt"] => respond(
            StatusCode::OK,
            "text/plain",
            "User-agent: *\nDisallow: /private/\n",
        ),
        ["s", n, p] => {
            let Ok(n) = n.parse::<usize>() else {
                return respond(StatusCode::NOT_FOUND, "text/plain", "no");
            };
            if let Some(k) = p.strip_prefix("page").and_then(|p| p.strip_suffix(".html")) {
                return match k.parse() {
                    Ok(k) => page(n, k, &req),
                    Err(_) => respond(StatusCode::NOT_FOUND, "text/plain", "no"),
                };
            }
            match *p {
                "sitemap.xml" => respond(
                    StatusCode::OK,
                    "application/xml",
                    format!(
                        "<?xml version=\"1.0\"?><urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">{}</urlset>",
                        (1..=3)
                            .map(|k| format!("<url><loc>/s/{n}/page{k}.html</loc></url>"))
                            .collect::<String>()
                    ),
                ),
                "feed.rss" => respond(
                    StatusCode::OK,
                    "application/rss+xml",
                    format!(
                        "<?xml version=\"1.0\"?><rss version=\"2.0\"><channel><title>Feed {n}</title>{}</channel></rss>",
                        (1..=2)
                            .map(|k| format!("<item><title>Item {k}</title><link>{base}/s/{n}/page{k}.html</link></item>"))
                            .collect::<String>()
                    ).replace(base, &host(&req)),
                ),
                "feed.atom" => respond(
                    StatusCode::OK,
                    "application/atom+xml",
                    format!(
                        "<?xml version=\"1.0\" encoding=\"utf-8\"?><feed xmlns=\"http://www.w3.org/2005/Atom\"><title>A{n}</title><id>urn:a{n}</id><updated>2024-01-01T00:00:00Z</updated>{}</feed>",
                        (1..=2)
                            .map(|k| format!("<entry><title>E{k}</title><id>urn:a{n}:{k}</id><updated>2024-01-01T00:00:00Z</updated><link rel=\"alternate\" href=\"{base}/s/{n}/page{k}.html\"/></entry>"))
                            .collect::<String>()
                    ).replace(base, &host(&req)),
                ),
                _ => respond(StatusCode::NOT_FOUND, "text/plain", "no"),
            }
        }
        ["pdf", name] => {
            let n: usize = name.trim_end_matches(".pdf").parse().unwrap_or(0);
            let pages: Vec<String> = (1..=3)
                .map(|k| format!("PDF {n} page {k}. {}", page_text(n + 1000, k)))
                .collect();
            let pdf = sift::ingest::extract::build_pdf(&format!("PDF {n}"), &pages);
            respond(StatusCode::OK, "application/pdf", pdf)
        }
        ["private", _] => respond(StatusCode::OK, "text/html", html("Secret", "Should never be fetched.", None)),
        ["slow.html"] => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            respond(StatusCode::OK, "text/html", html("Slow", "Too late.", None))
        }
        ["error.html"] => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "boom"),
        ["flaky.html"] => {
            if web.flaky.fetch_add(1, Ordering::SeqCst) == 0 {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "busy")
            } else {
                respond(StatusCode::OK, "text/html", html("Flaky", "Served on the second try, after a 503.", None))
            }
        }
        ["loop", "a"] => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "/loop/b")
            .body(Body::empty())
            .unwrap_or_default(),
        ["loop", "b"] => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "/loop/a")
            .body(Body::empty())
            .unwrap_or_default(),
        ["big.html"] => {
            // Over 1 MB of real text: extracted, then claim-checked.
            let para: String = (0..25_000)
                .map(|i| format!("Line {i} of a very long public notice. "))
                .collect();
            respond(StatusCode::OK, "text/html", html("Big", &para, None))
        }
        ["huge.bin"] => respond(StatusCode::OK, "text/html", vec![b'a'; 300_000]),
        ["malformed.html"] => respond(
            StatusCode::OK,
            "text/html",
            "<html><head><title>Broken</title><body><div><p>Unclosed paragraph with &amp; entity<div><b>bold <i>text</p></div>",
        ),
        ["fake.pdf"] => respond(StatusCode::OK, "application/pdf", "this is not a PDF at all"),
        ["image.png"] => respond(StatusCode::OK, "image/png", vec![0x89, b'P', b'N', b'G', 0, 0, 0, 0]),
        ["dup-a.html"] | ["dup-b.html"] => respond(
            StatusCode::OK,
            "text/html",
            html("Same", "Two URLs serve exactly this text, so it is ingested once.", None),
        ),
        ["notasitemap.xml"] => respond(StatusCode::OK, "text/html", html("Oops", "Not a sitemap.", None)),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found"),
    }
}

fn host(req: &HeaderMap) -> String {
    format!(
        "http://{}",
        req.get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1")
    )
}

async fn start_web() -> Result<(SocketAddr, Arc<Web>)> {
    let web = Arc::new(Web {
        hits: Mutex::new(HashMap::new()),
        flaky: AtomicU32::new(0),
    });
    let state = web.clone();
    let app =
        axum::Router::new().fallback(move |uri: Uri, h: HeaderMap| serve(state.clone(), uri, h));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, web))
}

/// The sources file for the fixture web, with a `dir` source at `dir`.
fn sources_toml(addr: SocketAddr, dir: &Path) -> String {
    let mut s = String::new();
    let u = |p: &str| format!("http://{addr}{p}");
    for n in 0..PAGE_SOURCES {
        s += &format!(
            "[[source]]\ntag = \"pages-{n}\"\nkind = \"pages\"\nurls = [\"{}\", \"{}\"]\n[source.metadata]\ngroup = \"pages\"\n\n",
            u(&format!("/s/{n}/page1.html")),
            u(&format!("/s/{n}/page2.html"))
        );
    }
    let mut n = PAGE_SOURCES;
    for _ in 0..SITEMAP_SOURCES {
        s += &format!(
            "[[source]]\ntag = \"sitemap-{n}\"\nkind = \"sitemap\"\nurls = [\"{}\"]\n\n",
            u(&format!("/s/{n}/sitemap.xml"))
        );
        n += 1;
    }
    for _ in 0..RSS_SOURCES {
        s += &format!(
            "[[source]]\ntag = \"rss-{n}\"\nkind = \"rss\"\nurls = [\"{}\"]\n\n",
            u(&format!("/s/{n}/feed.rss"))
        );
        n += 1;
    }
    for _ in 0..ATOM_SOURCES {
        s += &format!(
            "[[source]]\ntag = \"atom-{n}\"\nkind = \"atom\"\nurls = [\"{}\"]\n\n",
            u(&format!("/s/{n}/feed.atom"))
        );
        n += 1;
    }
    for p in 0..PDF_SOURCES {
        s += &format!(
            "[[source]]\ntag = \"pdf-{p}\"\nkind = \"pages\"\nurls = [\"{}\"]\n\n",
            u(&format!("/pdf/{p}.pdf"))
        );
    }
    s += &format!(
        "[[source]]\ntag = \"files\"\nkind = \"dir\"\npath = \"{}\"\n\n",
        dir.display()
    );
    s += "[[source]]\ntag = \"bucket\"\nkind = \"prefix\"\nprefix = \"incoming/\"\n\n";
    let one = |tag: &str, path: &str, extra: &str| {
        format!(
            "[[source]]\ntag = \"{tag}\"\nkind = \"pages\"\nurls = [\"{}\"]\n{extra}\n",
            u(path)
        )
    };
    s += &one("robots", "/private/secret.html", "");
    s += &one("slow", "/slow.html", "");
    s += &one("missing", "/missing.html", "");
    s += &one("failing", "/error.html", "");
    s += &one("loop", "/loop/a", "");
    s += &one("huge", "/huge.bin", "max_bytes = 100000");
    s += &one("fake-pdf", "/fake.pdf", "");
    s += &one("image", "/image.png", "");
    s += &one("malformed", "/malformed.html", "");
    s += &one("big", "/big.html", "");
    s += &one("flaky", "/flaky.html", "");
    s += &format!(
        "[[source]]\ntag = \"dup\"\nkind = \"pages\"\nurls = [\"{}\", \"{}\"]\n\n",
        u("/dup-a.html"),
        u("/dup-b.html")
    );
    s += &one(
        "pdf-only",
        "/s/0/page9.html",
        "content_types = [\"application/pdf\"]",
    );
    s += &one("long-only", "/s/1/page9.html", "min_text_chars = 100000");
    s += &format!(
        "[[source]]\ntag = \"patterns\"\nkind = \"pages\"\nurls = [\"{}\", \"{}\"]\nexclude = ['page8']\n\n",
        u("/s/2/page7.html"),
        u("/s/2/page8.html")
    );
    s += &one("bad-sitemap", "/notasitemap.xml", "")
        .replace("kind = \"pages\"", "kind = \"sitemap\"");
    s
}

/// Produced documents expected from the fixture web.
const EXPECTED_DOCS: u64 = (PAGE_SOURCES * 2 + SITEMAP_SOURCES * 3 + RSS_SOURCES * 2 + ATOM_SOURCES * 2 + PDF_SOURCES) as u64
    + 3 // files
    + 2 // bucket
    + 1 // malformed
    + 1 // big
    + 1 // flaky
    + 1 // dup (one of two)
    + 1; // patterns (page7)

fn config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.log.default_partitions = 4;
    c.ingest.per_host_rate = 0.0;
    c.ingest.per_host_concurrency = 16;
    c.ingest.timeout = Duration::from_millis(1500);
    c.ingest.max_attempts = 2;
    c.ingest.retry_backoff = Duration::from_millis(20);
    c
}

struct Backends {
    log: Arc<dyn Log>,
    objects: Arc<dyn ObjectStore>,
    table: Arc<dyn Table>,
}

async fn open(c: &Config) -> Result<Backends> {
    Ok(Backends {
        log: sift::backends::open_log(c).await?,
        objects: sift::backends::open_objects(c).await?,
        table: sift::backends::open_table(c).await?,
    })
}

async fn topic_count(log: &dyn Log, topic: &str) -> Result<u64> {
    Ok(log
        .watermarks(topic)
        .await?
        .iter()
        .map(|w| w.low.until(&w.high))
        .sum())
}

async fn read_topic(log: &dyn Log, topic: &str) -> Result<Vec<sift::backends::log::Message>> {
    let mut out = Vec::new();
    for w in log.watermarks(topic).await? {
        let mut off = w.low;
        while off < w.high {
            let batch = log.fetch(topic, w.partition, &off, 1000).await?;
            ensure!(
                !batch.is_empty(),
                "no records at {topic}/{}@{off}",
                w.partition
            );
            off = batch.last().map_or(off, |m| m.offset.next());
            out.extend(batch);
        }
    }
    Ok(out)
}

fn reasons(dlq: &[sift::backends::log::Message]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for m in dlq {
        let r = m
            .headers
            .iter()
            .find(|(k, _)| k == headers::REASON)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let code = r.split(':').next().unwrap_or_default().to_string();
        *out.entry(code).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingests_a_fixture_web_of_over_200_sources() -> Result<()> {
    let (addr, web) = start_web().await?;
    let tmp = tempfile::tempdir()?;
    let files = tmp.path().join("files");
    std::fs::create_dir_all(files.join("sub"))?;
    std::fs::write(
        files.join("a.html"),
        html("File A", "A local HTML file with enough words in it.", None),
    )?;
    std::fs::write(
        files.join("sub/b.txt"),
        "File B\nA plain text file, read from a folder.",
    )?;
    std::fs::write(
        files.join("c.json"),
        r#"{"title": "File C", "text": "A JSON document with its own text field."}"#,
    )?;
    std::fs::write(files.join(".hidden"), "skipped")?;
    let c = config(&tmp.path().join("data"));
    let sources_path = tmp.path().join("sources.toml");
    std::fs::write(&sources_path, sources_toml(addr, &files))?;
    let srcs = sources::load(&sources_path)?;
    ensure!(srcs.len() >= 200, "{} sources", srcs.len());

    let b = open(&c).await?;
    b.objects
        .put(
            "incoming/x.txt",
            Bytes::from("Object X\nA text document dropped into the bucket."),
            PutMode::Overwrite,
        )
        .await?;
    b.objects
        .put(
            "incoming/y.html",
            Bytes::from(html("Object Y", "An HTML document in the bucket.", None)),
            PutMode::Overwrite,
        )
        .await?;
    let ingest = Ingest::new(b.log.clone(), b.objects.clone(), b.table.clone(), &c).await?;
    let first = ingest.pass(&srcs).await?;

    let want_dead: BTreeMap<String, u64> = [
        ("robots", 1),
        ("timeout", 1),
        ("http_not_found", 1),
        ("http_5xx", 1),
        ("redirect", 1),
        ("too_large", 1),
        ("pdf_broken", 1),
        ("unsupported_type", 1),
        ("bad_sitemap", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    ensure!(
        first.dead_letters == want_dead,
        "dead letters {:?}",
        first.dead_letters
    );
    let want_dropped: BTreeMap<String, u64> = [
        ("duplicate", 1),
        ("content_type", 1),
        ("too_short", 1),
        ("url_pattern", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    ensure!(first.dropped == want_dropped, "dropped {:?}", first.dropped);
    ensure!(
        first.produced == EXPECTED_DOCS,
        "produced {} of {EXPECTED_DOCS}: {first:?}",
        first.produced
    );
    ensure!(first.claim_checked == 1, "{first:?}");
    ensure!(topic_count(b.log.as_ref(), topics::RAW).await? == EXPECTED_DOCS);
    let dlq = read_topic(b.log.as_ref(), topics::DLQ).await?;
    ensure!(reasons(&dlq) == want_dead, "{:?}", reasons(&dlq));
    // Dead letters say where they came from.
    for m in &dlq {
        for h in [headers::SOURCE, headers::URL, headers::STAGE] {
            ensure!(
                m.headers.iter().any(|(k, _)| k == h),
                "dead letter without {h}"
            );
        }
    }
    // robots.txt was honoured: the disallowed page was never requested.
    ensure!(!web.hits.lock().contains_key("/private/secret.html"));
    // The 500 was retried (max_attempts = 2), the 404 was not.
    ensure!(web.hits.lock().get("/error.html").map_or(0, Vec::len) == 2);
    ensure!(web.hits.lock().get("/missing.html").map_or(0, Vec::len) == 1);

    // Envelopes: ids, tags, metadata, extraction in every charset.
    let raw = read_topic(b.log.as_ref(), topics::RAW).await?;
    let envs: Vec<Envelope> = raw
        .iter()
        .map(|m| serde_json::from_slice(&m.value))
        .collect::<Result<_, _>>()?;
    let by_title: HashMap<&str, &Envelope> = envs.iter().map(|e| (e.title.as_str(), e)).collect();
    for (n, k) in [(0, 1), (1, 1), (2, 2), (3, 2)] {
        let e = by_title
            .get(format!("Page {n}-{k}").as_str())
            .context("page missing")?;
        let text = e.text.as_deref().unwrap_or_default();
        ensure!(text.contains(&format!("Report {n}-{k}.")), "{text}");
        ensure!(
            text.contains("Café owners and naïve résumé"),
            "charset of page {n}: {text}"
        );
        ensure!(
            !text.contains("tracking") && !text.contains("Copyright footer"),
            "boilerplate: {text}"
        );
        ensure!(e.source == format!("pages-{n}"));
        ensure!(e.metadata.get("group").and_then(|v| v.as_str()) == Some("pages"));
        ensure!(e.id == sift::envelope::document_id(&e.source, &e.url));
        ensure!(e.content_type == "text/html");
    }
    let jp = by_title.get("Page 2-1").context("page 2-1")?;
    ensure!(jp
        .text
        .as_deref()
        .unwrap_or_default()
        .contains("日本語の文書です"));
    let pdf = by_title.get("PDF 3").context("pdf 3")?;
    ensure!(pdf.content_type == "application/pdf");
    ensure!(pdf
        .text
        .as_deref()
        .unwrap_or_default()
        .contains("PDF 3 page 3"));
    let big = by_title.get("Big").context("big")?;
    ensure!(big.text.is_none());
    let key = sift::envelope::claim_key(big.body_uri.as_deref().unwrap_or_default())
        .context("claim uri")?;
    let (_, body) = b.objects.get(key).await?;
    ensure!(body.len() > 900_000 && String::from_utf8_lossy(&body).contains("Line 24999"));
    ensure!(raw.iter().all(|m| m.value.len() < 1_000_000));
    let feed = envs
        .iter()
        .find(|e| e.source.starts_with("rss-"))
        .context("rss doc")?;
    ensure!(feed.metadata.contains_key("feed_title"));
    ensure!(
        by_title.contains_key("File C")
            && by_title.contains_key("Object Y")
            && by_title.contains_key("Broken")
    );

    // Downstream: every raw document reaches sift.clean and the archive.
    let cleaned = sift::clean::run(
        b.log.clone(),
        b.objects.clone(),
        &c,
        sift::clean::Until::caught_up(),
    )
    .await?;
    ensure!(
        cleaned.produced == EXPECTED_DOCS
            && cleaned.dead_letters.is_empty()
            && cleaned.dropped.is_empty(),
        "{cleaned:?}"
    );
    ensure!(topic_count(b.log.as_ref(), topics::CLEAN).await? == EXPECTED_DOCS);
    let clean_envs: Vec<Envelope> = read_topic(b.log.as_ref(), topics::CLEAN)
        .await?
        .iter()
        .map(|m| serde_json::from_slice(&m.value))
        .collect::<Result<_, _>>()?;
    let jp_clean = clean_envs
        .iter()
        .find(|e| e.title == "Page 2-1")
        .context("clean page 2-1")?;
    ensure!(
        jp_clean.metadata.contains_key("lang"),
        "{:?}",
        jp_clean.metadata
    );
    let archived = sift::archive::run(
        b.log.clone(),
        b.objects.clone(),
        &c,
        sift::archive::Until::caught_up(),
    )
    .await?;
    ensure!(archived.records == EXPECTED_DOCS, "{archived:?}");
    let mut lines = 0;
    for part in b.objects.list("raw/").await? {
        ensure!(
            part.key.contains("/dt=")
                && part.key.contains("/source=")
                && part.key.ends_with(".jsonl.zst"),
            "{}",
            part.key
        );
        let (_, body) = b.objects.get(&part.key).await?;
        let text = zstd::decode_all(&body[..])?;
        lines += text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64;
    }
    ensure!(lines == EXPECTED_DOCS, "{lines} archived lines");
    ensure!(topic_count(b.log.as_ref(), topics::DLQ).await? == want_dead.values().sum::<u64>());

    // A second pass over unchanged sources ingests nothing new: conditional
    // GETs answer 304, and bodies without validators are duplicates by hash.
    let second: IngestSummary = ingest.pass(&srcs).await?;
    ensure!(
        second.produced == 0,
        "second pass produced {}: {second:?}",
        second.produced
    );
    ensure!(
        second.not_modified > 0 && second.dropped.get("duplicate").copied().unwrap_or(0) > 0,
        "{second:?}"
    );
    ensure!(topic_count(b.log.as_ref(), topics::RAW).await? == EXPECTED_DOCS);
    Ok(())
}

/// A source's rate limit spaces its requests to one host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_host_rate_limit_spaces_requests() -> Result<()> {
    let (addr, web) = start_web().await?;
    let tmp = tempfile::tempdir()?;
    let mut c = config(&tmp.path().join("data"));
    c.ingest.per_host_concurrency = 4;
    let urls: Vec<String> = (1..=6)
        .map(|k| format!("\"http://{addr}/s/7/page{k}.html\""))
        .collect();
    let text = format!(
        "[[source]]\ntag = \"polite\"\nkind = \"pages\"\nurls = [{}]\nrate_limit = 5.0\n",
        urls.join(", ")
    );
    let srcs = sources::parse(&text, Path::new("sources.toml"))?;
    let b = open(&c).await?;
    let ingest = Ingest::new(b.log.clone(), b.objects.clone(), b.table.clone(), &c).await?;
    let s = ingest.pass(&srcs).await?;
    ensure!(s.produced == 6, "{s:?}");
    let mut times: Vec<Instant> = web
        .hits
        .lock()
        .iter()
        .filter(|(p, _)| p.starts_with("/s/7/"))
        .flat_map(|(_, t)| t.clone())
        .collect();
    times.sort();
    ensure!(times.len() == 6);
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        // 5 requests/s = one every 200 ms; allow for timer granularity.
        ensure!(gap >= Duration::from_millis(180), "requests {gap:?} apart");
    }
    Ok(())
}

/// `sift ingest --once` as a command: a summary, documents in the log.
#[test]
fn ingest_once_command() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let (addr, _web) = rt.block_on(start_web())?;
    let tmp = tempfile::tempdir()?;
    let sources_path = tmp.path().join("sources.toml");
    std::fs::write(
        &sources_path,
        format!("[[source]]\ntag = \"one\"\nkind = \"sitemap\"\nurls = [\"http://{addr}/s/5/sitemap.xml\"]\n"),
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sift"))
        .args(["ingest", "--once", "--json", "--sources"])
        .arg(&sources_path)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .env("SIFT__TELEMETRY__METRICS_ADDR", "")
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(s["produced"] == 3, "{s}");
    // A bad sources file fails with the source and field named.
    std::fs::write(&sources_path, "[[source]]\ntag = \"x\"\nkind = \"rss\"\n")?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sift"))
        .args(["ingest", "--once", "--sources"])
        .arg(&sources_path)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("source `x` (#1): field `urls`"), "{err}");
    drop(rt);
    Ok(())
}
