//! Criterion benchmarks of inference: the model's forward pass through
//! `Predictor::predict_encoded` at batch sizes 1, 8, 32 and 128, and
//! `sift infer` end to end on embedded backends (512 documents through
//! `sift.clean` → table + `sift.categorized`, batch limit 32).
//!
//! The model is the `tiny` preset trained for one epoch on the bundled
//! sample in the setup (its weights do not change the cost). The `base`
//! preset and the batch limits are measured end to end by
//! `sift bench infer` (see benches/README.md).
//!
//! `cargo bench --bench infer`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sift::backends::log::{EmbeddedLog, Log};
use sift::backends::objects::{EmbeddedObjects, ObjectStore};
use sift::backends::table::{EmbeddedTable, Table};
use sift::config::Config;
use sift::envelope::{self, topics, Envelope, SCHEMA_VERSION};
use sift::infer::{self, ModelChoice, Until};
use sift::train::{self, TrainArgs};
use sift_training::{Encoded, Predictor};

fn train_tiny(dir: &std::path::Path, rt: &tokio::runtime::Runtime) -> std::path::PathBuf {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    config.telemetry.metrics_addr = String::new();
    let args = TrainArgs {
        epochs: Some(1),
        force: true,
        no_feedback: true,
        json: true,
        quiet: true,
        ..TrainArgs::default()
    };
    let store: Arc<dyn ObjectStore> =
        Arc::new(EmbeddedObjects::open(&dir.join("objects")).expect("object store"));
    rt.block_on(train::run_once(&config, &args, store, None))
        .expect("training the tiny model")
        .dir
}

fn envelopes(n: usize, salt: u64) -> Vec<Envelope> {
    let docs = train::bundled_documents().expect("bundled sample");
    (0..n)
        .map(|i| {
            let d = &docs[i % docs.len()];
            let url = format!("https://bench.example.com/{salt}/{i}");
            Envelope {
                v: SCHEMA_VERSION,
                id: envelope::document_id("bench", &url),
                source: "bench".into(),
                url,
                fetched_at_ms: 0,
                content_type: "text/plain".into(),
                title: d.title.clone(),
                text: Some(d.text.clone()),
                body_uri: None,
                metadata: BTreeMap::new(),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let models = tempfile::tempdir().expect("tempdir");
    let model_dir = train_tiny(models.path(), &rt);

    let predictor = Predictor::load(
        &model_dir,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .expect("model");
    let docs = train::bundled_documents().expect("bundled sample");
    let encoded: Vec<Encoded> = docs
        .iter()
        .take(512)
        .map(|d| predictor.encode(&d.full_text()).expect("encode"))
        .collect();
    let mut group = c.benchmark_group("predict_encoded/tiny");
    for batch in [1usize, 8, 32, 128] {
        let refs: Vec<&Encoded> = encoded.iter().take(batch).collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &refs, |b, refs| {
            b.iter(|| predictor.predict_encoded(refs, 5).expect("scores"))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("sift_infer/tiny");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    const DOCS: usize = 512;
    group.throughput(Throughput::Elements(DOCS as u64));
    group.bench_function("512_docs_batch_32", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut cfg = Config {
                    data_dir: dir.path().to_path_buf(),
                    ..Config::default()
                };
                cfg.telemetry.metrics_addr = String::new();
                cfg.infer.max_batch_docs = 32;
                let log: Arc<dyn Log> = Arc::new(
                    EmbeddedLog::open(&dir.path().join("log"), cfg.log.embedded.clone())
                        .expect("log"),
                );
                let table: Arc<dyn Table> =
                    Arc::new(EmbeddedTable::open(&dir.path().join("table.redb")).expect("table"));
                let objects: Arc<dyn ObjectStore> =
                    Arc::new(EmbeddedObjects::open(&dir.path().join("objects")).expect("objects"));
                let records = envelopes(DOCS, i).iter().map(infer::clean_record).collect();
                rt.block_on(async {
                    log.create_topic(topics::CLEAN, 4).await.expect("topic");
                    log.produce(topics::CLEAN, records).await.expect("produce");
                });
                let started = Instant::now();
                let s = rt
                    .block_on(infer::run(
                        log,
                        table,
                        objects,
                        &cfg,
                        ModelChoice::Dir(model_dir.clone()),
                        Until::caught_up(),
                    ))
                    .expect("infer");
                assert_eq!(s.scored, DOCS as u64);
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
