//! The conformance suites on the embedded backends, and the properties only
//! the embedded implementations have (recovery, retention, locking).

mod conformance;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use sift::backends::cache::EmbeddedCache;
use sift::backends::log::{EmbeddedLog, Log, LogError, Offset, Record};
use sift::backends::objects::EmbeddedObjects;
use sift::backends::search::{
    EmbeddedSearch, FieldKind, FieldSpec, IndexSpec, SearchDoc, SearchError, SearchIndex,
};
use sift::backends::table::EmbeddedTable;
use sift::config::{EmbeddedLogConfig, FsyncPolicy};

fn log_opts() -> EmbeddedLogConfig {
    EmbeddedLogConfig::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_log_conformance() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Small segments so the suite crosses segment boundaries.
    let opts = EmbeddedLogConfig {
        segment_bytes: 64 * 1024,
        ..log_opts()
    };
    conformance::log::check_log(Arc::new(EmbeddedLog::open(dir.path(), opts)?)).await
}

/// `log.topic_prefix`: the same suite through the prefix, and what one
/// namespace creates is invisible from another and from none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefixed_log_conforms_and_keeps_to_its_namespace() -> Result<()> {
    use sift::backends::log::prefixed::PrefixedLog;
    use sift::backends::log::{Log, Record};
    let dir = tempfile::tempdir()?;
    let inner: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path(), log_opts())?);
    conformance::log::check_log(Arc::new(PrefixedLog::new(inner.clone(), "run-a."))).await?;
    let a = PrefixedLog::new(inner.clone(), "ns-a.");
    let b = PrefixedLog::new(inner.clone(), "ns-b.");
    a.create_topic("sift.raw", 2).await?;
    a.produce("sift.raw", vec![Record::new("k", "v")]).await?;
    anyhow::ensure!(a.list_topics().await?.iter().any(|t| t.name == "sift.raw"));
    anyhow::ensure!(b.list_topics().await?.is_empty());
    anyhow::ensure!(inner
        .list_topics()
        .await?
        .iter()
        .any(|t| t.name == "ns-a.sift.raw"));
    anyhow::ensure!(!inner
        .list_topics()
        .await?
        .iter()
        .any(|t| t.name == "sift.raw"));
    let mut c = a.subscribe("sift-clean", &["sift.raw"]).await?;
    let got = c.poll(10, std::time::Duration::from_secs(5)).await?;
    anyhow::ensure!(got.len() == 1 && got[0].topic == "sift.raw", "{got:?}");
    c.commit(&sift::backends::log::Commit::after(&got)).await?;
    anyhow::ensure!(c.assignment().iter().all(|tp| tp.topic == "sift.raw"));
    c.close().await?;
    anyhow::ensure!(inner
        .committed("ns-a.sift-clean", "ns-a.sift.raw")
        .await?
        .iter()
        .any(|(_, o)| o.is_some()));
    anyhow::ensure!(
        b.committed("sift-clean", "sift.raw").await.is_err()
            || b.committed("sift-clean", "sift.raw")
                .await?
                .iter()
                .all(|(_, o)| o.is_none())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_log_conformance_fsync_always() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = EmbeddedLogConfig {
        fsync: FsyncPolicy::Always,
        ..log_opts()
    };
    conformance::log::check_log(Arc::new(EmbeddedLog::open(dir.path(), opts)?)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_objects_conformance() -> Result<()> {
    let dir = tempfile::tempdir()?;
    conformance::objects::check_objects(Arc::new(EmbeddedObjects::open(dir.path())?)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_table_conformance() -> Result<()> {
    let dir = tempfile::tempdir()?;
    conformance::table::check_table(Arc::new(EmbeddedTable::open(&dir.path().join("t.redb"))?))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_search_conformance() -> Result<()> {
    let dir = tempfile::tempdir()?;
    conformance::search::check_search(&EmbeddedSearch::open(dir.path())?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_cache_conformance() -> Result<()> {
    conformance::cache::check_cache(&EmbeddedCache::new(100_000)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_survives_reopen_and_cuts_torn_tail() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = EmbeddedLogConfig {
        segment_bytes: 4096,
        ..log_opts()
    };
    {
        let log = EmbeddedLog::open(dir.path(), opts.clone())?;
        log.create_topic("t", 1).await?;
        for chunk in (0..300).collect::<Vec<_>>().chunks(20) {
            let records: Vec<Record> = chunk
                .iter()
                .map(|i| Record::new("k", format!("value-{i:05}")))
                .collect();
            log.produce("t", records).await?;
        }
        // A second open of the same directory is refused while this one lives.
        ensure!(matches!(
            EmbeddedLog::open(dir.path(), opts.clone()),
            Err(LogError::Locked { .. })
        ));
    }
    // Simulate a crash in the middle of a write: garbage after the last frame.
    let pdir = dir.path().join("t").join("0");
    let mut segs: Vec<_> = std::fs::read_dir(&pdir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    ensure!(
        segs.len() > 1,
        "the test needs several segments, got {}",
        segs.len()
    );
    let active = segs.last().context("active segment")?;
    let good_len = std::fs::metadata(active)?.len();
    std::fs::OpenOptions::new()
        .append(true)
        .open(active)?
        .write_all(&[0, 0, 1, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])?;

    let log = EmbeddedLog::open(dir.path(), opts.clone())?;
    ensure!(
        std::fs::metadata(active)?.len() == good_len,
        "torn tail was not cut"
    );
    // Nothing is deleted: the torn bytes are in a quarantine file.
    let quarantined: Vec<_> = std::fs::read_dir(active.parent().context("dir")?)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".quarantine"))
        .collect();
    ensure!(quarantined.len() == 1, "{quarantined:?}");
    ensure!(std::fs::read(quarantined[0].path())? == [0, 0, 1, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
    let w = log.watermarks("t").await?;
    ensure!(
        w[0].low == 0 && w[0].high >= 300,
        "watermarks after recovery: {w:?}"
    );
    // A lost tail may have held offsets a consumer read: new records get
    // offsets above any that may have been given out.
    let p = log.produce("t", vec![Record::new("k", "after")]).await?;
    ensure!(p[0].offset >= 300, "offsets must never be given out twice");
    let after = p[0].offset.clone();
    let mut all = Vec::new();
    let mut pos = Offset::ZERO;
    while pos <= after {
        let b = log.fetch("t", 0, &pos, 1000).await?;
        ensure!(!b.is_empty());
        pos = b.last().map_or(pos, |m| m.offset.next());
        all.extend(b);
    }
    ensure!(all.len() == 301, "{} records read", all.len());
    for (i, m) in all.iter().enumerate().take(300) {
        ensure!(m.offset == i as u64 && m.value == format!("value-{i:05}").as_bytes());
    }
    ensure!(all[300].value.as_ref() == b"after");

    // A corrupt sealed segment is reported, not silently skipped.
    drop(log);
    let first = &segs[0];
    let mut bytes = std::fs::read(first)?;
    bytes[20] ^= 0xff;
    std::fs::write(first, &bytes)?;
    std::fs::remove_file(first.with_extension("idx"))?;
    ensure!(matches!(
        EmbeddedLog::open(dir.path(), opts),
        Err(LogError::Corrupt { .. })
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_retention_by_size_and_age() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = EmbeddedLogConfig {
        segment_bytes: 8 * 1024,
        retention_bytes: 32 * 1024,
        ..log_opts()
    };
    let log = EmbeddedLog::open(dir.path(), opts)?;
    log.create_topic("r", 1).await?;
    let mut consumer = log.subscribe("slow", &["r"]).await?;
    for _ in 0..20 {
        let records: Vec<Record> = (0..20)
            .map(|i| Record::new("k", vec![b'x'; 400 + i]))
            .collect();
        log.produce("r", records).await?;
    }
    log.enforce_retention();
    let w = log.watermarks("r").await?[0].clone();
    ensure!(
        w.high == 400 && w.low > 0,
        "size retention removed nothing: {w:?}"
    );
    let on_disk: u64 = std::fs::read_dir(dir.path().join("r").join("0"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    ensure!(
        on_disk <= 32 * 1024 + 8 * 1024 + 1024,
        "{on_disk} bytes kept"
    );
    ensure!(matches!(
        log.fetch("r", 0, &Offset::new(0), 1).await,
        Err(LogError::OffsetOutOfRange { .. })
    ));
    // A consumer whose position was deleted continues from the earliest stored.
    let got = consumer.poll(1000, Duration::from_secs(2)).await?;
    ensure!(
        got.first().map(|m| &m.offset) == Some(&w.low),
        "consumer did not resume at low watermark"
    );
    drop(consumer);
    drop(log);

    let dir2 = tempfile::tempdir()?;
    let opts = EmbeddedLogConfig {
        segment_bytes: 4 * 1024,
        retention_age: Duration::from_millis(300),
        ..log_opts()
    };
    let log = EmbeddedLog::open(dir2.path(), opts)?;
    log.create_topic("a", 1).await?;
    for _ in 0..5 {
        log.produce(
            "a",
            (0..10).map(|_| Record::new("k", vec![b'y'; 500])).collect(),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    log.produce("a", vec![Record::new("k", "fresh")]).await?;
    log.enforce_retention();
    let w = log.watermarks("a").await?[0].clone();
    ensure!(w.low > 0 && w.high == 51, "age retention: {w:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_reopen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let log = EmbeddedLog::open(dir.path(), log_opts())?;
        log.create_topic("c", 2).await?;
        log.produce(
            "c",
            (0..10).map(|i| Record::new(format!("k{i}"), "v")).collect(),
        )
        .await?;
        let mut c = log.subscribe("g", &["c"]).await?;
        let got = c.poll(100, Duration::from_secs(2)).await?;
        ensure!(got.len() == 10);
        c.commit(&sift::backends::log::Commit::after(&got)).await?;
    }
    let log = EmbeddedLog::open(dir.path(), log_opts())?;
    let committed = log.committed("g", "c").await?;
    let total: u64 = committed
        .iter()
        .map(|(_, o)| {
            o.as_ref()
                .map_or(0, |o| o.as_u64().expect("a dense offset"))
        })
        .sum();
    ensure!(total == 10, "committed offsets after reopen: {committed:?}");
    let mut c = log.subscribe("g", &["c"]).await?;
    ensure!(
        c.poll(100, Duration::from_millis(300)).await?.is_empty(),
        "redelivered committed records"
    );
    // Commits from a member that missed a rebalance are refused.
    let mut other = log.subscribe("g", &["c"]).await?;
    let _ = other.poll(1, Duration::from_millis(10)).await?;
    let stale = c
        .commit(&[sift::backends::log::Commit {
            topic: "c".into(),
            partition: 0,
            next_offset: Offset::ZERO,
        }])
        .await;
    ensure!(
        matches!(stale, Err(LogError::NotAssigned { .. })),
        "stale commit accepted: {stale:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_keys_spread_over_partitions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = EmbeddedLog::open(dir.path(), log_opts())?;
    log.create_topic("n", 4).await?;
    let p = log
        .produce(
            "n",
            (0..40)
                .map(|_| Record {
                    value: "v".into(),
                    ..Record::default()
                })
                .collect(),
        )
        .await?;
    let mut per = [0; 4];
    for x in p {
        per[x.partition as usize] += 1;
    }
    ensure!(per == [10, 10, 10, 10], "round-robin spread: {per:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_search_keeps_documents_across_reopen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = IndexSpec {
        name: "people".to_owned(),
        source_excludes: Vec::new(),
        fields: vec![
            FieldSpec {
                name: "name".to_owned(),
                kind: FieldKind::Text,
            },
            FieldSpec {
                name: "year".to_owned(),
                kind: FieldKind::Integer,
            },
        ],
    };
    let doc = |id: &str, name: &str, year: i64| {
        let source = json!({ "name": name, "year": year });
        SearchDoc {
            id: id.to_owned(),
            source: source.as_object().cloned().unwrap_or_default(),
        }
    };
    {
        let search = EmbeddedSearch::open(dir.path())?;
        search.ensure_index(&spec).await?;
        let report = search
            .bulk(
                "people",
                vec![
                    doc("a", "Ada Lovelace", 1815),
                    doc("b", "Alan Turing", 1912),
                ],
            )
            .await?;
        ensure!(report.indexed == 2, "{report:?}");
        search.delete("people", "a").await?;
        search
            .bulk("people", vec![doc("c", "Grace Hopper", 1906)])
            .await?;
    }

    // No refresh and no ensure_index: what bulk and delete returned from is on disk.
    let search = EmbeddedSearch::open(dir.path())?;
    ensure!(search.count("people").await? == 2, "count after reopen");
    ensure!(search.get("people", "a").await?.is_none(), "a was deleted");
    let turing = search.get("people", "b").await?.context("b kept")?;
    ensure!(turing == doc("b", "Alan Turing", 1912), "{turing:?}");
    search
        .ensure_index(&spec)
        .await
        .context("the same spec after reopening")?;
    let mut changed = spec.clone();
    changed.fields[1].kind = FieldKind::Keyword;
    ensure!(matches!(
        search.ensure_index(&changed).await,
        Err(SearchError::SchemaMismatch { .. })
    ));
    Ok(())
}

/// During a bulk load the embedded index commits only when asked to
/// persist: what it acknowledged after the last `persist` is gone after a
/// crash (the process ends without `end_bulk_load`), what it persisted is
/// there; a field left out of stored documents is still found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_bulk_load_keeps_what_was_persisted() -> Result<()> {
    use sift::backends::search::{Clause, Query};
    let dir = tempfile::tempdir()?;
    let spec = IndexSpec {
        name: "people".to_owned(),
        source_excludes: vec!["key".to_owned()],
        fields: vec![
            FieldSpec {
                name: "name".to_owned(),
                kind: FieldKind::Text,
            },
            FieldSpec {
                name: "key".to_owned(),
                kind: FieldKind::Keyword,
            },
        ],
    };
    let doc = |id: &str, name: &str| {
        let source = json!({ "name": name, "key": name.to_lowercase() });
        SearchDoc {
            id: id.to_owned(),
            source: source.as_object().cloned().unwrap_or_default(),
        }
    };
    {
        let search = EmbeddedSearch::open(dir.path())?;
        search.ensure_index(&spec).await?;
        search.begin_bulk_load("people").await?;
        let report = search
            .bulk_new("people", vec![doc("a", "Ada"), doc("b", "Alan")])
            .await?;
        ensure!(report.indexed == 2, "{report:?}");
        search.persist("people").await?;
        search.bulk_new("people", vec![doc("c", "Grace")]).await?;
        search.bulk("people", vec![doc("a", "Ada King")]).await?;
        // Killed here: no persist, no end_bulk_load.
    }
    let search = EmbeddedSearch::open(dir.path())?;
    ensure!(
        search.count("people").await? == 2,
        "only a and b were persisted"
    );
    ensure!(
        search.get("people", "c").await?.is_none(),
        "c was never persisted"
    );
    let ada = search.get("people", "a").await?.context("a persisted")?;
    ensure!(
        ada.source.get("name") == Some(&json!("Ada")) && !ada.source.contains_key("key"),
        "a is stored without its excluded field, as first sent: {ada:?}"
    );
    let by_key = Query {
        must: vec![Clause::Term {
            field: "key".to_owned(),
            value: json!("alan"),
            boost: 1.0,
        }],
        k: 5,
        ..Query::default()
    };
    let hits = search.search("people", &by_key).await?;
    ensure!(
        hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>() == ["b"],
        "the excluded field is searchable: {hits:?}"
    );
    // The run after the crash sends a and c again: a replaces itself.
    search.begin_bulk_load("people").await?;
    search
        .bulk("people", vec![doc("a", "Ada King"), doc("c", "Grace")])
        .await?;
    search
        .end_bulk_load("people", &sift::backends::search::LoadSettings::default())
        .await?;
    ensure!(search.count("people").await? == 3, "a, b and c once each");
    let ada = search.get("people", "a").await?.context("a")?;
    ensure!(
        ada.source.get("name") == Some(&json!("Ada King")),
        "{ada:?}"
    );
    let mut wrong = spec.clone();
    wrong.name = "other".to_owned();
    wrong.source_excludes = vec!["age".to_owned()];
    ensure!(
        matches!(
            search.ensure_index(&wrong).await,
            Err(SearchError::BadField { .. })
        ),
        "an excluded field that is not a field is refused"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_search_breaks_ties_by_id() -> Result<()> {
    use sift::backends::search::{Clause, Query};
    let dir = tempfile::tempdir()?;
    let search = EmbeddedSearch::open(dir.path())?;
    let spec = IndexSpec {
        name: "ties".to_owned(),
        source_excludes: Vec::new(),
        fields: vec![FieldSpec {
            name: "tag".to_owned(),
            kind: FieldKind::Keyword,
        }],
    };
    search.ensure_index(&spec).await?;
    // Written in descending id order, one segment per batch.
    for batch in (0..5).rev() {
        let docs = (0..4)
            .rev()
            .map(|j| SearchDoc {
                id: format!("d{batch}{j}"),
                source: json!({ "tag": "same" })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        search.bulk("ties", docs).await?;
    }
    let query = Query {
        must: vec![Clause::Term {
            field: "tag".to_owned(),
            value: json!("same"),
            boost: 1.0,
        }],
        k: 7,
        ..Query::default()
    };
    let hits = search.search("ties", &query).await?;
    let ids: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
    ensure!(
        ids == ["d00", "d01", "d02", "d03", "d10", "d11", "d12"],
        "{ids:?}"
    );
    Ok(())
}
