//! `sift bench review`: the review server's document page under load.
//!
//! Fills an embedded table in a temporary directory with `--docs` scored
//! documents (half of them reviewed, `--text-bytes` of text each), times
//! the queue's first build (scan of `m`, `c`, `r`) and a rebuild (scan of
//! `c`, `r`), starts the server in-process on loopback, logs in and fetches
//! `GET /doc/{id}` for random documents from `--concurrency` connections.
//! Reports the server's own time per request (its `Server-Timing` header)
//! and the time the client saw, p50/p99, and requests per second; then the
//! server time of the pages that walk the whole queue (`/queue`, `/next`,
//! `/stats`). The background rebuild keeps running meanwhile, as in
//! production.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::backends::log::EmbeddedLog;
use crate::backends::table::{EmbeddedTable, RowPut, Table};
use crate::config::Config;
use crate::review::client::Client;
use crate::review::{auth, queue, Backends, Server};

/// `sift bench review`.
#[derive(Debug, Clone, Args)]
pub struct ReviewBenchArgs {
    /// Documents in the table; half of them carry a review decision.
    #[arg(long, default_value_t = 100_000)]
    pub docs: usize,
    /// Document pages requested (after 100 warm-up requests).
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Bytes of text per document.
    #[arg(long, default_value_t = 4000)]
    pub text_bytes: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Percentiles of one set of timings, ms.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Requests timed.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

impl Timings {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if ms.is_empty() {
                0.0
            } else {
                ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1]
            }
        };
        Timings {
            count: ms.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// What `sift bench review` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewBench {
    /// Documents in the table.
    pub docs: usize,
    /// Of which reviewed.
    pub reviewed: usize,
    /// Text bytes per document.
    pub text_bytes: usize,
    /// Seconds to write the table.
    pub fill_seconds: f64,
    /// Seconds of the queue's first build (families m, c, r).
    pub queue_build_seconds: f64,
    /// Seconds of a rebuild (families c, r).
    pub queue_rebuild_seconds: f64,
    /// Requests in flight.
    pub concurrency: usize,
    /// `GET /doc/{id}`: server time (Server-Timing).
    pub doc_server: Timings,
    /// `GET /doc/{id}`: time the client saw.
    pub doc_client: Timings,
    /// Document pages per second.
    pub doc_requests_per_second: f64,
    /// `GET /queue` server time.
    pub queue_server: Timings,
    /// `GET /next` server time.
    pub next_server: Timings,
    /// `GET /stats` server time.
    pub stats_server: Timings,
}

const LABELS: usize = 250;
const WORDS: [&str; 16] = [
    "report", "market", "policy", "energy", "health", "court", "budget", "river", "school",
    "council", "trade", "museum", "league", "vaccine", "harbor", "tariff",
];

fn bench_error(message: impl std::fmt::Display) -> crate::Error {
    crate::Error::Invalid(format!("sift bench review: {message}"))
}

fn row(i: usize, rng: &mut ChaCha8Rng, text_bytes: usize, reviewed: bool) -> RowPut {
    let id = format!(
        "{:032x}",
        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    );
    let mut scores: Vec<f64> = (0..5).map(|_| rng.random::<f64>()).collect();
    scores.sort_by(|a, b| b.total_cmp(a));
    let first = rng.random_range(0..LABELS);
    let labels: Vec<String> = (0..5)
        .map(|k| format!("category-{:03}", (first + k * 37) % LABELS))
        .collect();
    let top5: Vec<serde_json::Value> = labels
        .iter()
        .zip(&scores)
        .map(|(l, s)| serde_json::json!({"label": l, "score": s}))
        .collect();
    let mut text = String::with_capacity(text_bytes + 16);
    while text.len() < text_bytes {
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        text.push(if rng.random_range(0..12) == 0 {
            '\n'
        } else {
            ' '
        });
    }
    let now = crate::now_ms();
    let mut put = RowPut::new(id)
        .cell("m", "source", format!("source-{:02}", i % 40))
        .cell(
            "m",
            "url",
            format!("https://source-{:02}.example.org/{i}", i % 40),
        )
        .cell(
            "m",
            "title",
            format!("Document {i}: {}", WORDS[i % WORDS.len()]),
        )
        .cell("m", "text", text)
        .cell("m", "content_type", "text/html")
        .cell("m", "fetched_at_ms", now.to_string())
        .cell(
            "c",
            "top5",
            serde_json::to_string(&top5).unwrap_or_default(),
        )
        .cell("c", "model_version", "bench-v1")
        .cell("c", "scored_at_ms", (now - i as i64).to_string());
    if reviewed {
        put = put
            .cell("r", "decision", "accept")
            .cell("r", "label", labels[rng.random_range(0..5)].clone())
            .cell("r", "rejected", "[]")
            .cell("r", "reviewer", format!("analyst-{}", i % 7))
            .cell(
                "r",
                "at_ms",
                (now - (i as i64 % 30) * 86_400_000).to_string(),
            )
            .cell("r", "model_version", "bench-v1");
    }
    put
}

async fn fill(table: &dyn Table, args: &ReviewBenchArgs) -> crate::Result<()> {
    table
        .ensure_table(crate::documents::TABLE, &crate::documents::FAMILIES)
        .await?;
    let bar = indicatif::ProgressBar::new(args.docs as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("filling the table {bar:40} {pos}/{len} documents")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut batch = Vec::with_capacity(1000);
    for i in 0..args.docs {
        batch.push(row(i, &mut rng, args.text_bytes, i % 2 == 1));
        if batch.len() == 1000 || i + 1 == args.docs {
            let n = batch.len() as u64;
            table
                .put(crate::documents::TABLE, std::mem::take(&mut batch))
                .await?;
            bar.inc(n);
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// The review UI under load: a logged-in client and its timings.
struct Timed {
    client: Client,
}

impl Timed {
    /// GETs every path (200 expected), `concurrency` at a time.
    async fn fetch(&self, paths: &[String], concurrency: usize) -> Vec<crate::Result<(f64, f64)>> {
        futures::stream::iter(paths)
            .map(|p| self.time(p, reqwest::StatusCode::OK))
            .buffer_unordered(concurrency)
            .collect()
            .await
    }

    /// Server times of `n` requests of `path`, one at a time.
    async fn sample(
        &self,
        path: &str,
        expect: reqwest::StatusCode,
        n: usize,
    ) -> crate::Result<Timings> {
        let mut ms = Vec::with_capacity(n);
        for _ in 0..n {
            ms.push(self.time(path, expect).await?.0);
        }
        Ok(Timings::of(ms))
    }

    /// GETs `path`; returns (server ms from Server-Timing, client ms).
    async fn time(&self, path: &str, expect: reqwest::StatusCode) -> crate::Result<(f64, f64)> {
        let started = Instant::now();
        let response = self.client.get(path).await.map_err(bench_error)?;
        let status = response.status();
        let server = response
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("dur=").nth(1))
            .and_then(|v| v.parse::<f64>().ok());
        response.bytes().await.map_err(bench_error)?;
        let client = started.elapsed().as_secs_f64() * 1e3;
        if status != expect {
            return Err(bench_error(format!(
                "GET {path} answered {status}, not {expect}"
            )));
        }
        let server = server.ok_or_else(|| bench_error("no Server-Timing header"))?;
        Ok((server, client))
    }
}

/// Runs `sift bench review`.
pub async fn main(config: &Config, args: ReviewBenchArgs) -> crate::Result<()> {
    if args.docs == 0 || args.requests == 0 || args.concurrency == 0 {
        return Err(bench_error(
            "--docs, --requests and --concurrency must be at least 1",
        ));
    }
    let dir =
        tempfile::tempdir().map_err(|e| crate::Error::io("creating a temporary directory", e))?;
    let table: Arc<dyn Table> = Arc::new(EmbeddedTable::open(&dir.path().join("table.redb"))?);
    let log = Arc::new(EmbeddedLog::open(
        &dir.path().join("log"),
        config.log.embedded.clone(),
    )?);
    eprintln!(
        "sift bench review: {} documents ({} bytes of text each, half reviewed) in {}",
        args.docs,
        args.text_bytes,
        dir.path().display()
    );
    let started = Instant::now();
    fill(table.as_ref(), &args).await?;
    let fill_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let snapshot = queue::build(table.as_ref(), None).await?;
    let queue_build_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let rebuilt = queue::build(table.as_ref(), Some(&snapshot)).await?;
    let queue_rebuild_seconds = started.elapsed().as_secs_f64();
    if rebuilt.docs().len() != args.docs {
        return Err(bench_error(format!(
            "the queue holds {} documents, not {}",
            rebuilt.docs().len(),
            args.docs
        )));
    }
    let ids: Vec<String> = snapshot.docs().iter().map(|d| d.id.to_string()).collect();
    drop((snapshot, rebuilt));

    let password = "bench-password";
    auth::add_user(table.as_ref(), "bench", password, auth::Role::Reviewer).await?;
    let mut server_config = config.clone();
    server_config.data_dir = dir.path().to_path_buf();
    server_config.review.tls_cert.clear();
    server_config.review.tls_key.clear();
    server_config.review.labels.clear();
    let server = Server::start(
        &server_config,
        Backends {
            table: table.clone(),
            log,
            objects: None,
            cache: None,
        },
        "127.0.0.1:0",
    )
    .await?;
    let base = format!("http://{}", server.addr());
    let client = Timed {
        client: Client::login(&base, "bench", password, args.concurrency).await?,
    };

    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let paths: Vec<String> = (0..args.requests + 100)
        .map(|_| crate::review::pages::doc_path(&ids[rng.random_range(0..ids.len())]))
        .collect();
    let (warm, timed) = paths.split_at(100);
    for r in client.fetch(warm, args.concurrency).await {
        r?;
    }
    let started = Instant::now();
    let results = client.fetch(timed, args.concurrency).await;
    let seconds = started.elapsed().as_secs_f64();
    let mut server_ms = Vec::with_capacity(results.len());
    let mut client_ms = Vec::with_capacity(results.len());
    for r in results {
        let (s, c) = r?;
        server_ms.push(s);
        client_ms.push(c);
    }
    let queue_server = client.sample("/queue", reqwest::StatusCode::OK, 50).await?;
    let next_server = client
        .sample("/next?order=margin", reqwest::StatusCode::SEE_OTHER, 50)
        .await?;
    let stats_server = client.sample("/stats", reqwest::StatusCode::OK, 20).await?;
    server.shutdown().await?;

    let result = ReviewBench {
        docs: args.docs,
        reviewed: args.docs / 2,
        text_bytes: args.text_bytes,
        fill_seconds,
        queue_build_seconds,
        queue_rebuild_seconds,
        concurrency: args.concurrency,
        doc_server: Timings::of(server_ms),
        doc_client: Timings::of(client_ms),
        doc_requests_per_second: args.requests as f64 / seconds,
        queue_server,
        next_server,
        stats_server,
    };
    println!(
        "{} documents ({} reviewed, {} B of text): table filled in {:.1} s; queue built in {:.2} s, rebuilt in {:.2} s",
        result.docs,
        result.reviewed,
        result.text_bytes,
        result.fill_seconds,
        result.queue_build_seconds,
        result.queue_rebuild_seconds
    );
    println!(
        "GET /doc/{{id}} x {} at concurrency {}: {:.0} requests/s",
        args.requests, result.concurrency, result.doc_requests_per_second
    );
    println!(
        "  server time  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        result.doc_server.p50_ms, result.doc_server.p99_ms, result.doc_server.max_ms
    );
    println!(
        "  client time  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        result.doc_client.p50_ms, result.doc_client.p99_ms, result.doc_client.max_ms
    );
    for (name, t) in [
        ("GET /queue", &result.queue_server),
        ("GET /next", &result.next_server),
        ("GET /stats", &result.stats_server),
    ] {
        println!(
            "{name:<11} server time p50 {:.2} ms  p99 {:.2} ms ({} requests, one at a time)",
            t.p50_ms, t.p99_ms, t.count
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&result).map_err(bench_error)?;
        std::fs::write(path, json)
            .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
    }
    Ok(())
}
