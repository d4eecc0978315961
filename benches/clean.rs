//! Throughput of `sift clean`'s library loop on the embedded backends.
//!
//! `cargo bench --bench clean` builds ~50,000 raw envelopes of ~5 KB of real
//! text (Debian package descriptions from `../shared/data/debtags-dev.jsonl`,
//! several per document; the bundled sample when that file is absent),
//! produces them to `sift.raw`, and times `sift::clean::run` until the group
//! has caught up. It prints documents/s and MB/s of the whole loop (poll,
//! parse, normalize, language, SimHash, produce, commit), and single-thread
//! costs of each step to show where the time goes. `SIFT_BENCH_DOCS` changes
//! the number of documents; `SIFT_BENCH_LANGUAGE_DETECTOR=broad` times the
//! loop with the broad (whatlang) detector instead of the default fast one.
//! The target is 20,000 documents/s on 2 cores.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use sift::backends::log::{EmbeddedLog, Log, Record};
use sift::backends::objects::EmbeddedObjects;
use sift::clean::language::LanguageDetector;
use sift::clean::{self, normalize, simhash, Until};
use sift::config::{Config, EmbeddedLogConfig};
use sift::envelope::{self, headers, topics, Envelope, SCHEMA_VERSION};

const TARGET_BYTES: usize = 5 * 1024;
const SOURCES: usize = 20;
const RUNS: usize = 2;

#[derive(serde::Deserialize)]
struct Doc {
    title: String,
    text: String,
}

fn corpus() -> Result<Vec<Doc>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/debtags-dev.jsonl");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let docs = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str)
                .collect::<Result<Vec<Doc>, _>>()
                .with_context(|| format!("reading {}", path.display()))?;
            println!("corpus: {} documents from {}", docs.len(), path.display());
            Ok(docs)
        }
        Err(_) => {
            let docs: Vec<Doc> = sift::sample::bundled()?
                .into_iter()
                .map(|d| Doc {
                    title: d.title,
                    text: d.text,
                })
                .collect();
            println!(
                "corpus: {} documents of the bundled sample ({} not found)",
                docs.len(),
                path.display()
            );
            Ok(docs)
        }
    }
}

/// Documents of ~5 KB: descriptions picked at random (seeded) and joined as paragraphs.
fn envelopes(corpus: &[Doc], n: usize) -> Vec<Envelope> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    (0..n)
        .map(|i| {
            let first = &corpus[rng.random_range(0..corpus.len())];
            let mut text = first.text.clone();
            while text.len() < TARGET_BYTES {
                text.push_str("\n\n");
                text.push_str(&corpus[rng.random_range(0..corpus.len())].text);
            }
            let source = format!("site{}", i % SOURCES);
            let url = format!("https://{source}.example.com/doc/{i}");
            Envelope {
                v: SCHEMA_VERSION,
                id: envelope::document_id(&source, &url),
                source,
                url,
                fetched_at_ms: 1_700_000_000_000,
                content_type: "text/html".into(),
                title: first.title.clone(),
                text: Some(text),
                body_uri: None,
                metadata: BTreeMap::new(),
            }
        })
        .collect()
}

fn per_doc_costs(envs: &[Envelope]) {
    let sample: Vec<&str> = envs
        .iter()
        .take(2000)
        .filter_map(|e| e.text.as_deref())
        .collect();
    let values: Vec<Vec<u8>> = envs
        .iter()
        .take(2000)
        .map(|e| serde_json::to_vec(e).unwrap_or_default())
        .collect();
    let n = sample.len() as f64;
    let time = |name: &str, f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        println!(
            "  {name:<28} {:>7.1} µs/doc",
            t.elapsed().as_secs_f64() * 1e6 / n
        );
    };
    println!("single-thread cost per document:");
    time("parse envelope (serde_json)", &mut || {
        for v in &values {
            std::hint::black_box(serde_json::from_slice::<Envelope>(v).ok());
        }
    });
    let normalized: Vec<String> = sample.iter().map(|t| normalize::text(t).text).collect();
    time("normalize", &mut || {
        for t in &sample {
            std::hint::black_box(normalize::text(t));
        }
    });
    time("language (fast, whichlang)", &mut || {
        for t in &normalized {
            std::hint::black_box(LanguageDetector::Fast.detect(t));
        }
    });
    time("language (broad, whatlang)", &mut || {
        for t in &normalized {
            std::hint::black_box(LanguageDetector::Broad.detect(t));
        }
    });
    time("simhash", &mut || {
        for t in &normalized {
            std::hint::black_box(simhash::simhash(t));
        }
    });
    time("serialize envelope", &mut || {
        for e in envs.iter().take(2000) {
            std::hint::black_box(serde_json::to_vec(e).ok());
        }
    });
}

/// CPU seconds (user + system) this process has used, where Linux tells.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Clock ticks are 1/100 s on Linux.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn main() -> Result<()> {
    let n: usize = std::env::var("SIFT_BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let detector: LanguageDetector = match std::env::var("SIFT_BENCH_LANGUAGE_DETECTOR") {
        Ok(name) => {
            serde_json::from_value(serde_json::Value::String(name.clone())).with_context(|| {
                format!("SIFT_BENCH_LANGUAGE_DETECTOR={name}: expected \"fast\" or \"broad\"")
            })?
        }
        Err(_) => LanguageDetector::default(),
    };
    let corpus = corpus()?;
    let envs = envelopes(&corpus, n);
    let bytes: usize = envs
        .iter()
        .map(|e| e.text.as_ref().map_or(0, String::len))
        .sum();
    println!(
        "{} documents, {:.1} KB of text on average, {} sources, {} threads",
        envs.len(),
        bytes as f64 / envs.len() as f64 / 1024.0,
        SOURCES,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    per_doc_costs(&envs);

    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let log = Arc::new(EmbeddedLog::open(
            &dir.path().join("log"),
            EmbeddedLogConfig::default(),
        )?);
        let objects = Arc::new(EmbeddedObjects::open(&dir.path().join("objects"))?);
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        config.clean.language_detector = detector;
        log.create_topic(topics::RAW, config.log.default_partitions)
            .await?;
        let t = Instant::now();
        for chunk in envs.chunks(1000) {
            let records = chunk
                .iter()
                .map(|e| {
                    Ok(Record::new(e.id.clone(), serde_json::to_vec(e)?)
                        .header(headers::SOURCE, e.source.clone())
                        .header(headers::CONTENT_TYPE, e.content_type.clone())
                        .header(headers::SCHEMA, SCHEMA_VERSION.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            log.produce(topics::RAW, records).await?;
        }
        println!(
            "produced to sift.raw in {:.2} s (not timed below)",
            t.elapsed().as_secs_f64()
        );
        drop(envs);
        let mut best = 0f64;
        for run in 0..RUNS {
            // A fresh group each run reads everything again.
            config.clean.group = format!("bench-{run}");
            let cpu_before = cpu_seconds();
            let s = clean::run(log.clone(), objects.clone(), &config, Until::caught_up()).await?;
            let mb = bytes as f64 / 1e6 / s.seconds;
            println!(
                "run {run}: {} consumed, {} produced, dropped {:?}, dead letters {:?} in {:.2} s: {:.0} docs/s, {:.0} MB/s of text",
                s.consumed, s.produced, s.dropped, s.dead_letters, s.seconds, s.docs_per_second, mb
            );
            if let (Some(a), Some(b)) = (cpu_before, cpu_seconds()) {
                let per_doc = (b - a) / s.consumed.max(1) as f64;
                println!(
                    "       CPU {:.2} s = {:.0} µs/doc, {:.2} cores busy; at most {:.0} docs/s on 2 idle cores",
                    b - a,
                    per_doc * 1e6,
                    (b - a) / s.seconds,
                    2.0 / per_doc
                );
            }
            best = best.max(s.docs_per_second);
        }
        println!(
            "sift clean (library loop, embedded log, {} language detector): {best:.0} documents/s (target 20000)",
            detector.name()
        );
        anyhow::Ok(())
    })
}
