//! Ingest throughput from a loopback web into the embedded log.
//!
//! `cargo bench --bench ingest` serves ~5 KB HTML pages and ~200 KB PDFs
//! (text from the labeled sample, PDFs made with the ingest PDF writer) on
//! 127.0.0.1, runs one `Ingest::pass` over them with politeness limits lifted
//! (one host stands in for hundreds), and prints documents/s and MB/s for
//! each. Extraction and the log's writes are in the figures; TLS and real
//! network latency are not. `SIFT_BENCH_HTML` / `SIFT_BENCH_PDF` change the
//! document counts (default 6,000 and 100).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use sift::config::Config;
use sift::ingest::{sources, Ingest};

const SOURCES: usize = 100;

fn corpus() -> Vec<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/debtags-dev.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .collect()
}

/// About `size` bytes of real text starting at document `i`.
fn text_of(corpus: &[String], i: usize, size: usize) -> String {
    let mut out = format!("Document {i}. ");
    let mut j = i;
    while out.len() < size {
        out.push_str(&corpus[j % corpus.len()]);
        out.push(' ');
        j += 7;
    }
    out.truncate(
        out.char_indices()
            .take_while(|(p, _)| *p < size)
            .last()
            .map_or(0, |(p, _)| p),
    );
    out
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let html_docs = env_count("SIFT_BENCH_HTML", 6000);
    let pdf_docs = env_count("SIFT_BENCH_PDF", 100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    let corpus = corpus();
    eprintln!("preparing {html_docs} HTML pages and {pdf_docs} PDFs ...");
    let pages: Arc<Vec<Bytes>> = Arc::new(
        (0..html_docs)
            .map(|i| {
                let body = text_of(&corpus, i, 4600);
                Bytes::from(format!(
                    "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Doc {i}</title>\
                     <script>var x = 1;</script></head><body><nav>Home | About</nav><main><h1>Doc {i}</h1>\
                     <p>{body}</p></main><footer>footer</footer></body></html>"
                ))
            })
            .collect(),
    );
    let pdfs: Arc<Vec<Bytes>> = Arc::new(
        (0..pdf_docs)
            .map(|i| {
                let text = text_of(&corpus, i * 13, 290_000);
                let chunks: Vec<String> = text
                    .as_bytes()
                    .chunks(3000)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect();
                Bytes::from(sift::ingest::extract::build_pdf(
                    &format!("PDF {i}"),
                    &chunks,
                ))
            })
            .collect(),
    );
    let pdf_bytes: usize = pdfs.iter().map(Bytes::len).sum();
    let html_bytes: usize = pages.iter().map(Bytes::len).sum();
    let (p2, f2) = (pages.clone(), pdfs.clone());
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let (pages, pdfs) = (p2.clone(), f2.clone());
        async move {
            let path = uri.path();
            let pick = |prefix: &str, ext: &str, list: &Vec<Bytes>| {
                path.strip_prefix(prefix)
                    .and_then(|p| p.strip_suffix(ext))
                    .and_then(|n| n.parse::<usize>().ok())
                    .and_then(|n| list.get(n).cloned())
            };
            let (ct, body) = if let Some(b) = pick("/h/", ".html", &pages) {
                ("text/html; charset=utf-8", b)
            } else if let Some(b) = pick("/p/", ".pdf", &pdfs) {
                ("application/pdf", b)
            } else {
                return Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(axum::body::Body::empty())
                    .unwrap_or_default();
            };
            Response::builder()
                .header(header::CONTENT_TYPE, ct)
                .body(axum::body::Body::from(body))
                .unwrap_or_default()
        }
    });
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    });

    let run = |kind: &str, prefix: &str, ext: &str, n: usize| -> (f64, u64) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut c = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        c.ingest.per_host_rate = 0.0;
        c.ingest.per_host_concurrency = 64;
        c.ingest.max_concurrency = 64;
        c.ingest.timeout = Duration::from_secs(60);
        let per = n.div_ceil(SOURCES);
        let mut toml = String::new();
        for s in 0..SOURCES {
            let urls: Vec<String> = (s * per..((s + 1) * per).min(n))
                .map(|i| format!("\"http://{addr}{prefix}{i}{ext}\""))
                .collect();
            if urls.is_empty() {
                continue;
            }
            toml += &format!(
                "[[source]]\ntag = \"{kind}-{s}\"\nkind = \"pages\"\nurls = [{}]\n\n",
                urls.join(",")
            );
        }
        let srcs = sources::parse(&toml, std::path::Path::new("bench.toml")).expect("sources");
        rt.block_on(async {
            let log = sift::backends::open_log(&c).await.expect("log");
            let objects = sift::backends::open_objects(&c).await.expect("objects");
            let table = sift::backends::open_table(&c).await.expect("table");
            let ingest = Ingest::new(log, objects, table, &c).await.expect("ingest");
            let t = Instant::now();
            let s = ingest.pass(&srcs).await.expect("pass");
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(s.produced as usize, n, "{s:?}");
            (secs, s.produced)
        })
    };
    let (hs, hn) = run("html", "/h/", ".html", html_docs);
    let (ps, pn) = run("pdf", "/p/", ".pdf", pdf_docs);
    println!(
        "ingest from loopback into the embedded log ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<28} {:>8} {:>10} {:>12} {:>10}",
        "case", "docs", "seconds", "docs/s", "MB/s"
    );
    println!(
        "{:<28} {:>8} {:>10.2} {:>12.0} {:>10.1}",
        format!(
            "HTML, {:.1} KB each",
            html_bytes as f64 / html_docs as f64 / 1024.0
        ),
        hn,
        hs,
        hn as f64 / hs,
        html_bytes as f64 / hs / 1e6
    );
    println!(
        "{:<28} {:>8} {:>10.2} {:>12.1} {:>10.1}",
        format!(
            "PDF, {:.0} KB each",
            pdf_bytes as f64 / pdf_docs as f64 / 1024.0
        ),
        pn,
        ps,
        pn as f64 / ps,
        pdf_bytes as f64 / ps / 1e6
    );
}
