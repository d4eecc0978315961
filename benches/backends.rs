//! Throughput of the embedded backends.
//!
//! `cargo bench --bench backends` prints, for each case, time per iteration
//! and throughput (records/s or cells/s; MB/s where bytes are the point).
//! Log cases use 1 KB records and `fsync = "interval"`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sift::backends::log::{EmbeddedLog, Log, Record};
use sift::backends::table::{EmbeddedTable, RowPut, Scan, Table};
use sift::config::EmbeddedLogConfig;

const RECORD: usize = 1024;
const PRODUCE_BATCH: usize = 1000;
const CONSUME_RECORDS: u64 = 100_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

fn records(n: usize, salt: usize) -> Vec<Record> {
    let value = Bytes::from(vec![b'x'; RECORD]);
    (0..n)
        .map(|i| Record::new(format!("key-{}", (i + salt) % 1024), value.clone()))
        .collect()
}

fn log_benches(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let log =
        Arc::new(EmbeddedLog::open(dir.path(), EmbeddedLogConfig::default()).expect("log opens"));
    rt.block_on(log.create_topic("bench", 4)).expect("topic");

    let mut g = c.benchmark_group("log");
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(PRODUCE_BATCH as u64));
    let mut salt = 0;
    g.bench_function("produce 1000 x 1KB (records/s)", |b| {
        b.iter_batched(
            || {
                salt += 1;
                records(PRODUCE_BATCH, salt)
            },
            |recs| rt.block_on(log.produce("bench", recs)).expect("produce"),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Bytes((PRODUCE_BATCH * RECORD) as u64));
    g.bench_function("produce 1000 x 1KB (bytes/s)", |b| {
        b.iter_batched(
            || {
                salt += 1;
                records(PRODUCE_BATCH, salt)
            },
            |recs| rt.block_on(log.produce("bench", recs)).expect("produce"),
            BatchSize::SmallInput,
        )
    });

    // Consume: a fresh group reads CONSUME_RECORDS records from the start.
    rt.block_on(log.create_topic("consume", 4)).expect("topic");
    for i in 0..(CONSUME_RECORDS as usize / PRODUCE_BATCH) {
        rt.block_on(log.produce("consume", records(PRODUCE_BATCH, i)))
            .expect("produce");
    }
    let mut group = 0;
    let mut consume = |log: &Arc<EmbeddedLog>| {
        group += 1;
        rt.block_on(async {
            let mut c = log
                .subscribe(&format!("bench-{group}"), &["consume"])
                .await
                .expect("subscribe");
            let mut n = 0u64;
            while n < CONSUME_RECORDS {
                n += c
                    .poll(10_000, Duration::from_secs(1))
                    .await
                    .expect("poll")
                    .len() as u64;
            }
            n
        })
    };
    g.sample_size(10);
    g.throughput(Throughput::Elements(CONSUME_RECORDS));
    g.bench_function("consume 100k x 1KB (records/s)", |b| {
        b.iter(|| consume(&log))
    });
    g.throughput(Throughput::Bytes(CONSUME_RECORDS * RECORD as u64));
    g.bench_function("consume 100k x 1KB (bytes/s)", |b| b.iter(|| consume(&log)));
    g.finish();
}

fn table_benches(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let table = EmbeddedTable::open(&dir.path().join("t.redb")).expect("table opens");
    rt.block_on(table.ensure_table("bench", &["m", "c"]))
        .expect("table");
    let value = Bytes::from(vec![b'v'; 100]);
    let mut next = 0u64;
    let mut g = c.benchmark_group("table");
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("put 1000 rows x 10 cells (cells/s)", |b| {
        b.iter_batched(
            || {
                let rows: Vec<RowPut> = (0..1000)
                    .map(|_| {
                        next += 1;
                        let mut r = RowPut::new(format!(
                            "row-{:012}",
                            next.wrapping_mul(2_654_435_761) % 1_000_000_007
                        ));
                        for q in 0..10 {
                            r = r.cell(
                                if q < 5 { "m" } else { "c" },
                                format!("q{q}"),
                                value.clone(),
                            );
                        }
                        r
                    })
                    .collect();
                rows
            },
            |rows| rt.block_on(table.put("bench", rows)).expect("put"),
            BatchSize::SmallInput,
        )
    });
    let keys: Vec<Bytes> = rt
        .block_on(table.scan(
            "bench",
            &Scan {
                limit: 10_000,
                ..Scan::default()
            },
        ))
        .expect("scan")
        .into_iter()
        .map(|r| r.key)
        .collect();
    g.throughput(Throughput::Elements(1000));
    let mut i = 0;
    g.bench_function("get 1000 rows one by one (rows/s)", |b| {
        b.iter(|| {
            rt.block_on(async {
                for _ in 0..1000 {
                    i = (i + 7919) % keys.len();
                    table
                        .get("bench", &keys[i], None)
                        .await
                        .expect("get")
                        .expect("row exists");
                }
            })
        })
    });
    g.bench_function("scan 1000 rows (rows/s)", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            let rows = rt
                .block_on(table.scan(
                    "bench",
                    &Scan {
                        start: Some(keys[i].clone()),
                        limit: 1000,
                        ..Scan::default()
                    },
                ))
                .expect("scan");
            assert!(!rows.is_empty());
        })
    });
    g.finish();
}

criterion_group!(benches, log_benches, table_benches);
criterion_main!(benches);
