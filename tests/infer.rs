//! `sift infer` on the embedded backends: N documents in → exactly N rows
//! with 5 labels each and N records in `sift.categorized`; malformed
//! records in `sift.dlq` with their reasons; a 100,000-word document cut and
//! scored; re-processing rewrites the same rows; a promotion mid-run
//! swaps the model between batches with nothing lost; SIGKILLs of the real
//! binary leave exactly N complete rows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use sift::backends::log::{Log, Record};
use sift::backends::objects::{EmbeddedObjects, ObjectStore};
use sift::backends::table::{EmbeddedTable, Row, Scan, Table};
use sift::documents::{self, categories};
use sift::envelope::{self, topics, Envelope, SCHEMA_VERSION};
use sift::infer::{self, Categorized, InferSummary, ModelChoice, Until};
use sift::train::registry::Registry;
use sift::train::{self, TrainArgs};
use tokio::sync::OnceCell;

mod embedded;
use embedded::{config, open_log, read_all, spawn_stage, wait_for_metric, Kills};

/// Two tiny models (different seeds), trained once for the whole file.
struct Models {
    a: (String, PathBuf),
    b: (String, PathBuf),
}

static MODELS: OnceCell<Models> = OnceCell::const_new();

fn train_args(seed: u64) -> TrainArgs {
    TrainArgs {
        epochs: Some(1),
        seed: Some(seed),
        force: true,
        no_feedback: true,
        json: true,
        quiet: true,
        ..TrainArgs::default()
    }
}

async fn models() -> Result<&'static Models> {
    MODELS
        .get_or_try_init(|| async {
            // Kept for the life of the test process.
            let dir = tempfile::tempdir()?.keep();
            let config = config(&dir);
            let store: Arc<dyn ObjectStore> =
                Arc::new(EmbeddedObjects::open(&dir.join("objects"))?);
            let a = train::run_once(&config, &train_args(1), store.clone(), None).await?;
            let b = train::run_once(&config, &train_args(2), store, None).await?;
            ensure!(a.version != b.version);
            Ok(Models {
                a: (a.version, a.dir),
                b: (b.version, b.dir),
            })
        })
        .await
}

/// Publishes `model` to the registry in `store` and makes it LATEST.
async fn promote(store: Arc<dyn ObjectStore>, model: &(String, PathBuf)) -> Result<()> {
    let registry = Registry::new(store, "models");
    registry.publish(&model.1, &model.0).await?;
    registry
        .promote_if(&model.0, |_| Some("test".into()))
        .await?
        .context("not promoted")?;
    Ok(())
}

fn envelope_of(i: usize, title: &str, text: &str) -> Envelope {
    let url = format!("https://site{}.example.com/doc/{i}", i % 7);
    Envelope {
        v: SCHEMA_VERSION,
        id: envelope::document_id(&format!("site{}", i % 7), &url),
        source: format!("site{}", i % 7),
        url,
        fetched_at_ms: 1_700_000_000_000,
        content_type: "text/html".into(),
        title: title.into(),
        text: Some(text.into()),
        body_uri: None,
        metadata: BTreeMap::new(),
    }
}

/// `n` clean envelopes made from the bundled sample, numbered from `from`.
fn documents(from: usize, n: usize) -> Result<Vec<Envelope>> {
    let sample = train::bundled_documents()?;
    Ok((from..from + n)
        .map(|i| {
            let d = &sample[i % sample.len()];
            envelope_of(i, &d.title, &d.text)
        })
        .collect())
}

async fn produce(log: &dyn Log, envs: &[Envelope]) -> Result<BTreeSet<String>> {
    for chunk in envs.chunks(500) {
        log.produce(
            topics::CLEAN,
            chunk.iter().map(infer::clean_record).collect(),
        )
        .await?;
    }
    Ok(envs.iter().map(|e| e.id.clone()).collect())
}

async fn rows(table: &dyn Table) -> Result<Vec<Row>> {
    Ok(table.scan(documents::TABLE, &Scan::default()).await?)
}

fn cell(row: &Row, family: &str, qualifier: &str) -> String {
    row.get(family, qualifier.as_bytes())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// Every row is complete: 5 labels, best first, a model version, a time, its metadata.
fn check_complete(row: &Row) -> Result<()> {
    let key = String::from_utf8_lossy(&row.key).into_owned();
    let top = infer::top5_of(row).with_context(|| format!("{key}: no c:top5"))?;
    ensure!(top.len() == 5, "{key}: {} labels", top.len());
    ensure!(
        top.windows(2).all(|w| w[0].score >= w[1].score),
        "{key}: not best first"
    );
    ensure!(
        !cell(row, documents::CATEGORIES, categories::MODEL_VERSION).is_empty(),
        "{key}: no model version"
    );
    ensure!(
        cell(row, documents::CATEGORIES, categories::SCORED_AT_MS).parse::<i64>()? > 0,
        "{key}: no scored-at"
    );
    ensure!(
        !cell(row, documents::META, "url").is_empty(),
        "{key}: no m:url"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_every_document_once_and_dead_letters_the_malformed() -> Result<()> {
    let models = models().await?;
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.infer.max_batch_docs = 16;
    let log: Arc<dyn Log> = open_log(dir.path())?;
    let table: Arc<dyn Table> = Arc::new(EmbeddedTable::open(&dir.path().join("table.redb"))?);
    let objects: Arc<dyn ObjectStore> =
        Arc::new(EmbeddedObjects::open(&dir.path().join("objects"))?);
    promote(objects.clone(), &models.a).await?;
    log.create_topic(topics::CLEAN, 4).await?;

    const N: usize = 300;
    let mut envs = documents(0, N - 1)?;
    // A document of 100,000 words: cut to the model's length, scored.
    let huge: String = (0..100_000)
        .map(|i| ["package", "library", "network", "editor", "kernel"][i % 5])
        .collect::<Vec<_>>()
        .join(" ");
    envs.push(envelope_of(N - 1, "A very long manual", &huge));
    let ids = produce(log.as_ref(), &envs).await?;
    ensure!(ids.len() == N);

    // Malformed records, each with a known reason.
    let mut empty = envelope_of(10_000, "", "   ");
    empty.title = " ".into();
    let mut no_id = envelope_of(10_001, "Title", "Some text");
    no_id.id = String::new();
    let mut newer = envelope_of(10_002, "Title", "Some text");
    newer.v = 99;
    let mut missing = envelope_of(10_003, "Title", "unused");
    missing.text = None;
    missing.body_uri = Some(envelope::claim_uri("claims/none/clean-0.txt"));
    log.produce(
        topics::CLEAN,
        vec![
            Record::new("junk", "{not json"),
            infer::clean_record(&empty),
            infer::clean_record(&no_id),
            infer::clean_record(&newer),
            infer::clean_record(&missing),
        ],
    )
    .await?;

    let s: InferSummary = infer::run(
        log.clone(),
        table.clone(),
        objects.clone(),
        &cfg,
        ModelChoice::Latest,
        Until::caught_up(),
    )
    .await?;
    println!("{} scored, {:.0} docs/s", s.scored, s.docs_per_second);
    ensure!(s.consumed == N as u64 + 5, "{s:?}");
    ensure!(s.scored == N as u64, "{s:?}");
    let expected: BTreeMap<String, u64> = [
        "bad_json",
        "empty_text",
        "bad_id",
        "schema_version",
        "claim_missing",
    ]
    .iter()
    .map(|r| (r.to_string(), 1))
    .collect();
    ensure!(s.dead_letters == expected, "{:?}", s.dead_letters);

    let all = rows(table.as_ref()).await?;
    ensure!(all.len() == N, "{} rows", all.len());
    let keys: BTreeSet<String> = all
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    ensure!(keys == ids);
    for row in &all {
        check_complete(row)?;
        ensure!(cell(row, documents::CATEGORIES, categories::MODEL_VERSION) == models.a.0);
    }
    let long = all
        .iter()
        .find(|r| cell(r, documents::META, "title") == "A very long manual")
        .context("the long document's row")?;
    ensure!(cell(long, documents::META, "text").len() <= cfg.infer.store_text_bytes as usize);

    let categorized = read_all(log.as_ref(), topics::CATEGORIZED).await?;
    ensure!(categorized.len() == N, "{} categorized", categorized.len());
    let cat_ids: BTreeSet<String> = categorized
        .iter()
        .map(|m| -> Result<String> {
            let c: Categorized = serde_json::from_slice(&m.value)?;
            ensure!(c.top5.len() == 5 && c.model_version == models.a.0);
            ensure!(m.key.as_deref() == Some(c.id.as_bytes()));
            Ok(c.id)
        })
        .collect::<Result<_>>()?;
    ensure!(cat_ids == ids);

    let dead = read_all(log.as_ref(), topics::DLQ).await?;
    let reasons: BTreeMap<String, u64> = dead.iter().fold(BTreeMap::new(), |mut acc, m| {
        let r = m
            .header(envelope::headers::REASON)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let code = r.split(':').next().unwrap_or_default().to_owned();
        *acc.entry(code).or_default() += 1;
        acc
    });
    ensure!(reasons == expected, "{reasons:?}");

    // Re-processing the same documents rewrites the same rows.
    produce(log.as_ref(), &envs[..50]).await?;
    let again = infer::run(
        log.clone(),
        table.clone(),
        objects,
        &cfg,
        ModelChoice::Latest,
        Until::caught_up(),
    )
    .await?;
    ensure!(again.scored == 50, "{again:?}");
    ensure!(rows(table.as_ref()).await?.len() == N);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_mid_run_swaps_the_model_without_losing_documents() -> Result<()> {
    let models = models().await?;
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.infer.model_poll = Duration::from_millis(100);
    let log: Arc<dyn Log> = open_log(dir.path())?;
    let table: Arc<dyn Table> = Arc::new(EmbeddedTable::open(&dir.path().join("table.redb"))?);
    let objects: Arc<dyn ObjectStore> =
        Arc::new(EmbeddedObjects::open(&dir.path().join("objects"))?);
    promote(objects.clone(), &models.a).await?;
    log.create_topic(topics::CLEAN, 4).await?;

    table
        .ensure_table(documents::TABLE, &sift::documents::FAMILIES)
        .await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = {
        let (log, table, objects, cfg) = (log.clone(), table.clone(), objects.clone(), cfg.clone());
        tokio::spawn(async move {
            infer::run(
                log,
                table,
                objects,
                &cfg,
                ModelChoice::Latest,
                Until::stopped_by(async {
                    let _ = stop_rx.await;
                }),
            )
            .await
        })
    };
    let wait_rows = |n: usize| {
        let table = table.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let got = rows(table.as_ref()).await?.len();
                if got >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                ensure!(Instant::now() < deadline, "{got} of {n} rows");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // Wave 1 with model A; then B is promoted while the daemon runs, and
    // wave 2 keeps coming while it loads.
    let first = produce(log.as_ref(), &documents(0, 200)?).await?;
    wait_rows(200).await?;
    // A model that cannot load: reported, and A keeps scoring.
    let broken_dir = dir.path().join("broken");
    std::fs::create_dir_all(&broken_dir)?;
    for file in sift_training::files::ALL {
        std::fs::copy(models.a.1.join(file), broken_dir.join(file))?;
    }
    std::fs::write(
        broken_dir.join(sift_training::files::MODEL),
        b"not safetensors",
    )?;
    let broken = ("broken-model".to_string(), broken_dir);
    let failed_before = load_failures();
    promote(objects.clone(), &broken).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while load_failures() == failed_before {
        ensure!(
            Instant::now() < deadline,
            "the broken model was never tried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during_broken = produce(log.as_ref(), &documents(500, 100)?).await?;
    wait_rows(300).await?;
    promote(objects.clone(), &models.b).await?;
    let mut second = BTreeSet::new();
    for k in 0..10 {
        second.extend(produce(log.as_ref(), &documents(200 + k * 20, 20)?).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_rows(500).await?;
    // Wave 3, well after the swap.
    let third = produce(log.as_ref(), &documents(400, 100)?).await?;
    wait_rows(600).await?;
    let _ = stop_tx.send(());
    let s = daemon.await??;
    println!("scored by model: {:?}", s.by_model);

    let all = rows(table.as_ref()).await?;
    ensure!(all.len() == 600, "{} rows", all.len());
    let version: BTreeMap<String, String> = all
        .iter()
        .map(|r| {
            (
                String::from_utf8_lossy(&r.key).into_owned(),
                cell(r, documents::CATEGORIES, categories::MODEL_VERSION),
            )
        })
        .collect();
    for row in &all {
        check_complete(row)?;
    }
    ensure!(first.iter().all(|id| version[id] == models.a.0));
    ensure!(during_broken.iter().all(|id| version[id] == models.a.0));
    ensure!(third.iter().all(|id| version[id] == models.b.0));
    ensure!(second
        .iter()
        .all(|id| version[id] == models.a.0 || version[id] == models.b.0));
    // Nothing scored twice: each document has one record.
    let categorized = read_all(log.as_ref(), topics::CATEGORIZED).await?;
    ensure!(categorized.len() == 600, "{}", categorized.len());
    ensure!(
        s.by_model.get(&models.b.0).copied().unwrap_or(0) >= 100,
        "{s:?}"
    );
    Ok(())
}

/// Writes an analyst's decision on row `id` (the champion's top 5 reviewed).
async fn decide(table: &dyn Table, id: &str, label: &str, champion: &str) -> Result<()> {
    use sift::backends::table::RowPut;
    let row = RowPut::new(id.to_owned())
        .cell(documents::REVIEW, documents::review::DECISION, "choose")
        .cell(
            documents::REVIEW,
            documents::review::LABEL,
            label.to_owned(),
        )
        .cell(documents::REVIEW, documents::review::REVIEWER, "ann")
        .cell(documents::REVIEW, documents::review::AT_MS, "1700000000000")
        .cell(
            documents::REVIEW,
            documents::review::MODEL_VERSION,
            champion.to_owned(),
        );
    table.put(documents::TABLE, vec![row]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_scores_every_document_and_live_evidence_decides_its_promotion() -> Result<()> {
    use sift::train::models::{self, ModelsCommand};
    let models = models().await?;
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.infer.shadow_model = "challenger".into();
    // Live evidence is judged on top 1 here.
    cfg.train.gate_metric = "p_at_1".into();
    let log: Arc<dyn Log> = open_log(dir.path())?;
    let objects: Arc<dyn ObjectStore> =
        Arc::new(EmbeddedObjects::open(&dir.path().join("objects"))?);
    // LATEST, a refused challenger (newer), and an older version the
    // challenger rule must pass over.
    let champion = "20260101-000000-aaaaaa";
    let challenger = "20260102-000000-bbbbbb";
    promote(objects.clone(), &(champion.to_owned(), models.a.1.clone())).await?;
    let registry = Registry::new(objects.clone(), "models");
    // The challenger is model B's transformer alone: both models share the
    // deterministic linear half, which makes their combined top 1 agree
    // too often to tell them apart on a few documents.
    let alone = dir.path().join("b-alone");
    std::fs::create_dir_all(&alone)?;
    for file in sift_training::files::ALL {
        std::fs::copy(models.b.1.join(file), alone.join(file))?;
    }
    std::fs::write(
        alone.join(sift_training::files::ENSEMBLE),
        r#"{"linear_weight": 0.0}"#,
    )?;
    registry.publish(&alone, challenger).await?;
    registry
        .publish(&models.b.1, "20251231-000000-cccccc")
        .await?;
    ensure!(registry.challenger().await?.as_deref() == Some(challenger));
    log.create_topic(topics::CLEAN, 4).await?;
    let ids = produce(log.as_ref(), &documents(0, 120)?).await?;

    let disagree = {
        let table: Arc<dyn Table> = Arc::new(EmbeddedTable::open(&dir.path().join("table.redb"))?);
        let s = infer::run(
            log.clone(),
            table.clone(),
            objects.clone(),
            &cfg,
            ModelChoice::Latest,
            Until::caught_up(),
        )
        .await?;
        ensure!(s.scored == 120, "{s:?}");
        let all = rows(table.as_ref()).await?;
        ensure!(all.len() == 120);
        // Every document carries the champion's scores for analysts and the
        // shadow's beside them, and the words behind each of the 5.
        let mut disagree = Vec::new();
        for row in &all {
            check_complete(row)?;
            ensure!(cell(row, documents::CATEGORIES, categories::MODEL_VERSION) == champion);
            ensure!(cell(row, documents::CATEGORIES, categories::SHADOW_VERSION) == challenger);
            let theirs: Vec<serde_json::Value> =
                serde_json::from_str(&cell(row, documents::CATEGORIES, categories::SHADOW_TOP5))?;
            ensure!(theirs.len() == 5);
            let why: Vec<Vec<String>> =
                serde_json::from_str(&cell(row, documents::CATEGORIES, categories::WHY))?;
            ensure!(why.len() == 5, "{why:?}");
            let ours = infer::top5_of(row).context("top5")?;
            let shadow_first = theirs[0]["label"].as_str().unwrap_or_default().to_owned();
            if ours[0].label != shadow_first {
                disagree.push((
                    String::from_utf8_lossy(&row.key).into_owned(),
                    ours[0].label.clone(),
                    shadow_first,
                ));
            }
        }
        ensure!(
            disagree.len() >= 10,
            "the two models disagree on only {} documents: no evidence to test with",
            disagree.len()
        );
        ensure!(ids.len() == 120);

        // Decisions that side with the champion: the shadow is behind.
        for (id, ours, _) in disagree.iter().take(10) {
            decide(table.as_ref(), id, ours, champion).await?;
        }
        disagree
    };
    let promote_live = |min: u64| ModelsCommand::Promote {
        model_version: challenger.to_owned(),
        force: false,
        data: Vec::new(),
        live_min: Some(min),
    };
    let refused = models::main(&cfg, promote_live(20)).await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("only 10 reviewed")),
        "{refused:?}"
    );
    let behind = models::main(&cfg, promote_live(5)).await;
    ensure!(
        behind
            .as_ref()
            .is_err_and(|e| e.to_string().contains("not ahead")),
        "{behind:?}"
    );
    ensure!(registry.latest().await?.context("LATEST")?.0.version == champion);

    // The analysts side with the shadow on the same documents: promoted.
    {
        let table = EmbeddedTable::open(&dir.path().join("table.redb"))?;
        for (id, _, theirs) in disagree.iter().take(10) {
            decide(&table, id, theirs, champion).await?;
        }
    }
    models::main(&cfg, promote_live(10)).await?;
    let latest = registry.latest().await?.context("LATEST")?.0;
    ensure!(
        latest.version == challenger && latest.reason == "live",
        "{latest:?}"
    );
    Ok(())
}

/// Failed model loads counted in this process's metrics.
fn load_failures() -> u64 {
    let text = sift::metrics::global().render();
    text.lines()
        .find(|l| l.starts_with("sift_infer_model_loads_total{outcome=\"failed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Documents `sift infer` has written, on its `/metrics`.
const SCORED: &str = "sift_pipeline_documents_total{stage=\"infer\"}";

/// `sift infer` as a child process on the test's data dir.
fn sift_infer(dir: &Path, once: bool) -> Result<std::process::Child> {
    sift_infer_with(dir, once, "")
}

/// The same, serving `/metrics` on `metrics_addr` (empty: none).
fn sift_infer_with(dir: &Path, once: bool, metrics_addr: &str) -> Result<std::process::Child> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sift"));
    cmd.arg("--data-dir")
        .arg(dir)
        .arg("infer")
        .env("SIFT__TELEMETRY__METRICS_ADDR", metrics_addr)
        .env("SIFT__INFER__POLL_RECORDS", "64")
        .env("SIFT__INFER__MAX_BATCH_DOCS", "16")
        .env("SIFT__INFER__WRITE_ROWS", "32");
    spawn_stage(&mut cmd, once)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_document_survives_sigkill() -> Result<()> {
    const N: usize = 2500;
    let models = models().await?;
    let dir = tempfile::tempdir()?;
    let ids = {
        let log = open_log(dir.path())?;
        log.create_topic(topics::CLEAN, 4).await?;
        let objects: Arc<dyn ObjectStore> =
            Arc::new(EmbeddedObjects::open(&dir.path().join("objects"))?);
        promote(objects, &models.a).await?;
        produce(log.as_ref(), &documents(0, N)?).await?
    };
    std::thread::sleep(Duration::from_millis(300));

    // SIGTERM: the documents in flight are written and committed before the
    // daemon exits, so every committed record has its row and no row lacks
    // its commit.
    // It must have written rows before the signal: wait for its /metrics to say so.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = sift_infer_with(dir.path(), false, &format!("127.0.0.1:{port}"))?;
    wait_for_metric(&mut child, port, SCORED, Duration::from_secs(120))?;
    let pid = i32::try_from(child.id())?;
    // SAFETY: sending a signal to our own child process.
    #[allow(unsafe_code)]
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    ensure!(sent == 0, "kill failed");
    let status = child.wait()?;
    ensure!(status.success(), "sift infer after SIGTERM: {status}");
    {
        let log = open_log(dir.path())?;
        let committed: u64 = log
            .committed("sift-infer", topics::CLEAN)
            .await?
            .iter()
            .map(|(_, c)| {
                c.as_ref()
                    .map_or(0, |c| c.as_u64().expect("a dense offset"))
            })
            .sum();
        let table = EmbeddedTable::open(&dir.path().join("table.redb"))?;
        let stored = rows(&table).await?.len() as u64;
        eprintln!("SIGTERM: {committed} committed, {stored} rows");
        ensure!(committed > 0, "nothing was scored before SIGTERM");
        ensure!(
            committed == stored,
            "{committed} committed but {stored} rows"
        );
    }
    std::thread::sleep(Duration::from_millis(300));

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut killed = Kills::new(N);
    for k in 0..4 {
        // Killed at a random moment after it has started writing rows.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = sift_infer_with(dir.path(), false, &format!("127.0.0.1:{port}"))?;
        wait_for_metric(&mut child, port, SCORED, Duration::from_secs(120))?;
        let after = Duration::from_millis(rng.random_range(0..400));
        std::thread::sleep(after);
        let label = format!("kill {k} after {after:?}");
        killed
            .kill(&mut child, dir.path(), "sift-infer", topics::CLEAN, &label)
            .await?;
    }
    killed.check()?;

    let out = sift_infer(dir.path(), true)?.wait_with_output()?;
    ensure!(
        out.status.success(),
        "sift infer --once failed: {}",
        out.status
    );
    let summary: InferSummary = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    ensure!(summary.dead_letters.is_empty(), "{summary:?}");

    let table = EmbeddedTable::open(&dir.path().join("table.redb"))?;
    let all = rows(&table).await?;
    ensure!(all.len() == N, "{} rows", all.len());
    let keys: BTreeSet<String> = all
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    ensure!(keys == ids);
    for row in &all {
        check_complete(row)?;
    }
    let log = open_log(dir.path())?;
    let committed = log.committed("sift-infer", topics::CLEAN).await?;
    for w in log.watermarks(topics::CLEAN).await? {
        ensure!(
            committed.contains(&(w.partition, Some(w.high))),
            "{committed:?}"
        );
    }
    // At least once: every document has a record, some perhaps two.
    let categorized: BTreeSet<Vec<u8>> = read_all(log.as_ref(), topics::CATEGORIZED)
        .await?
        .into_iter()
        .filter_map(|m| m.key.map(|k| k.to_vec()))
        .collect();
    ensure!(categorized.len() == N);
    Ok(())
}
