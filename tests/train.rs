//! `sift train`, the model registry and `sift classify` on the embedded
//! backends: a tiny model trained on the bundled sample reaches the hit@5
//! this suite asserts; the champion/challenger gate refuses a worse model
//! and promotes a better one; rollback and `--force`; the analysts'
//! feedback read from the table; `sift classify --format json` through the
//! real binary.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use sift::backends::objects::{EmbeddedObjects, ObjectStore};
use sift::backends::table::{EmbeddedTable, RowPut, Table};
use sift::config::Config;
use sift::documents;
use sift::train::registry::Registry;
use sift::train::{self, TrainArgs};

/// What the shipped tiny model (transformer + linear, reading each
/// document's section and package name) must reach on the bundled sample's
/// validation sources (2,129 documents). Measured with this test: P@1
/// 0.898, hit@5 0.976, recall@5 0.782 after 8 epochs (training is
/// deterministic on the CPU); the bars leave room for floating-point
/// differences between machines, not for regressions.
/// Always answering the 5 most frequent labels scores about 0.80 hit@5 and
/// 0.35 P@1 here.
const MIN_HIT_AT_5: f64 = 0.96;
const MIN_P_AT_1: f64 = 0.87;

fn config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.telemetry.metrics_addr = String::new();
    c
}

fn args(data: &[String], epochs: u32) -> TrainArgs {
    TrainArgs {
        data: data.to_vec(),
        epochs: Some(epochs),
        json: true,
        quiet: true,
        ..TrainArgs::default()
    }
}

/// The first `n` bundled documents as a JSON-lines file.
fn small_dataset(dir: &Path, n: usize) -> Result<String> {
    let docs = train::bundled_documents()?;
    let path = dir.join(format!("first-{n}.jsonl"));
    let mut file = std::fs::File::create(&path)?;
    for d in docs.iter().take(n) {
        writeln!(
            file,
            "{}",
            serde_json::json!({"id": d.id, "title": d.title, "text": d.text, "tags": d.tags})
        )?;
    }
    Ok(path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trains_gates_promotes_rolls_back_and_classifies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = config(dir.path());
    let store: Arc<dyn ObjectStore> = Arc::new(EmbeddedObjects::open(&dir.path().join("objects"))?);
    let registry = Registry::new(store.clone(), &config.train.prefix);

    // A weak model first: one epoch on 300 documents. Nothing to beat, so
    // it becomes LATEST.
    let small = small_dataset(dir.path(), 300)?;
    let weak = train::run_once(
        &config,
        &args(std::slice::from_ref(&small), 1),
        store.clone(),
        None,
    )
    .await?;
    ensure!(
        weak.gate.promoted && weak.gate.reason == "first",
        "{:?}",
        weak.gate
    );

    // The tiny model on the bundled sample: it must beat the weak one on
    // the same validation documents and reach the asserted figures.
    let strong = train::run_once(&config, &args(&[], 8), store.clone(), None).await?;
    let m = &strong.metrics.validation;
    println!(
        "tiny on the bundled sample: P@1 {:.4} hit@5 {:.4} recall@5 {:.4}, {} epochs, {:.0} tokens/s",
        m.p_at_1,
        m.hit_at_5,
        m.recall_at_5,
        strong.metrics.epochs.len(),
        strong.metrics.tokens_per_second
    );
    ensure!(
        m.hit_at_5 >= MIN_HIT_AT_5,
        "hit@5 {} < {MIN_HIT_AT_5}",
        m.hit_at_5
    );
    ensure!(m.p_at_1 >= MIN_P_AT_1, "P@1 {} < {MIN_P_AT_1}", m.p_at_1);
    let (champion_version, champion_figure) = strong
        .gate
        .champion
        .clone()
        .context("the weak model was LATEST")?;
    ensure!(champion_version == weak.version);
    ensure!(
        strong.gate.challenger > champion_figure,
        "{:?}",
        strong.gate
    );
    ensure!(
        strong.gate.promoted && strong.gate.reason == "gate",
        "{:?}",
        strong.gate
    );
    for file in sift_training::files::ALL {
        ensure!(strong.dir.join(file).is_file(), "{file} missing");
        ensure!(
            store
                .head(&format!("models/{}/{file}", strong.version))
                .await?
                .is_some(),
            "{file} not published"
        );
    }
    let report = std::fs::read_to_string(strong.dir.join(sift_training::files::REPORT))?;
    ensure!(report.contains("<svg") && report.contains("Worst 20 categories"));

    // Another weak model is refused: LATEST stays.
    let refused = train::run_once(
        &config,
        &args(std::slice::from_ref(&small), 1),
        store.clone(),
        None,
    )
    .await?;
    ensure!(!refused.gate.promoted, "{:?}", refused.gate);
    let latest = registry.latest().await?.context("LATEST")?.0;
    ensure!(latest.version == strong.version);
    ensure!(latest.previous == std::slice::from_ref(&weak.version));

    // --force promotes it anyway; rollback returns to the strong one.
    let mut forced_args = args(&[small], 1);
    forced_args.force = true;
    forced_args.seed = Some(7);
    let forced = train::run_once(&config, &forced_args, store.clone(), None).await?;
    ensure!(forced.gate.promoted && forced.gate.reason == "forced");
    let back = registry.rollback().await?;
    ensure!(back.version == strong.version, "{back:?}");
    ensure!(back.previous == std::slice::from_ref(&weak.version));

    let listed = registry.list().await?;
    ensure!(listed.len() == 4, "{} versions", listed.len());
    ensure!(listed.iter().filter(|v| v.latest).count() == 1);

    // The CLI: classify JSON lines from stdin with LATEST, in input order.
    let docs = train::bundled_documents()?;
    let mut input = String::new();
    for d in docs.iter().take(20) {
        input.push_str(
            &serde_json::json!({"id": d.id, "title": d.title, "text": d.text}).to_string(),
        );
        input.push('\n');
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_sift"))
        .args(["--data-dir"])
        .arg(dir.path())
        .args(["classify", "--format", "json"])
        .env("SIFT__TELEMETRY__METRICS_ADDR", "")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "classify failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(lines.len() == 20);
    let labels: Vec<String> = serde_json::from_str(&std::fs::read_to_string(
        strong.dir.join(sift_training::files::LABELS),
    )?)?;
    for (line, d) in lines.iter().zip(&docs) {
        ensure!(line["id"] == d.id.as_str(), "out of order: {line}");
        let top = line["top5"].as_array().context("top5")?;
        ensure!(top.len() == 5);
        let scores: Vec<f64> = top.iter().filter_map(|s| s["score"].as_f64()).collect();
        ensure!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "not sorted: {line}"
        );
        ensure!(top.iter().all(|s| labels
            .iter()
            .any(|l| Some(l.as_str()) == s["label"].as_str())));
    }

    // Files through the ingest extractor (HTML, PDF), in argument order; a
    // file that cannot be read gets an error line and a failing exit status.
    let editor = docs
        .iter()
        .find(|d| d.tags.iter().any(|t| t == "use::editing"))
        .context("an editor in the sample")?;
    let html = dir.path().join("editor.html");
    std::fs::write(
        &html,
        format!(
            "<html><head><title>{}</title></head><body><p>{}</p></body></html>",
            editor.title, editor.text
        ),
    )?;
    let pdf = dir.path().join("editor.pdf");
    std::fs::write(
        &pdf,
        sift::ingest::extract::pdf::build_pdf(&editor.title, std::slice::from_ref(&editor.text)),
    )?;
    let missing = dir.path().join("missing.pdf");
    let out = Command::new(env!("CARGO_BIN_EXE_sift"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["classify", "--format", "json"])
        .args([&html, &missing, &pdf])
        .env("SIFT__TELEMETRY__METRICS_ADDR", "")
        .output()?;
    ensure!(
        !out.status.success(),
        "a missing file must fail the command"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(lines.len() == 3, "{lines:?}");
    ensure!(lines[0]["id"] == html.display().to_string().as_str());
    ensure!(lines[1]["error"].is_string() && lines[1]["top5"].is_null());
    // The same text as HTML and as PDF scores the same labels.
    let labels_of = |v: &serde_json::Value| -> Vec<String> {
        v["top5"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["label"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    ensure!(labels_of(&lines[0]).len() == 5);
    ensure!(
        labels_of(&lines[0])[0] == labels_of(&lines[2])[0],
        "{lines:?}"
    );
    Ok(())
}

#[tokio::test]
async fn feedback_rows_become_training_documents() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let table = EmbeddedTable::open(&dir.path().join("table"))?;
    table
        .ensure_table(documents::TABLE, &sift::documents::FAMILIES)
        .await?;
    let top5 = serde_json::json!([
        {"label": "role::program", "score": 0.9},
        {"label": "use::editing", "score": 0.5},
        {"label": "works-with::text", "score": 0.3},
        {"label": "interface::commandline", "score": 0.2},
        {"label": "devel::lang:c", "score": 0.1}
    ])
    .to_string();
    let row = |key: &str| {
        RowPut::new(key.to_owned())
            .cell("m", "title", format!("title {key}"))
            .cell("m", "text", format!("text of {key}"))
            .cell("c", documents::categories::TOP5, top5.clone())
    };
    table
        .put(
            documents::TABLE,
            vec![
                row("a-accepted")
                    .cell("r", documents::review::DECISION, "accept")
                    .cell("r", documents::review::LABEL, "use::editing"),
                row("b-chosen")
                    .cell("r", documents::review::DECISION, "choose")
                    .cell("r", documents::review::LABEL, "game::puzzle"),
                // Rejected with the labels shown recorded.
                row("c-rejected")
                    .cell("r", documents::review::DECISION, "reject")
                    .cell(
                        "r",
                        documents::review::REJECTED,
                        r#"["role::program","use::editing"]"#,
                    ),
                // Rejected without them: the row's top 5 is what was shown.
                row("d-rejected").cell("r", documents::review::DECISION, "reject"),
                // Not reviewed, and a decision sift does not know: ignored.
                row("e-unreviewed"),
                row("f-odd").cell("r", documents::review::DECISION, "maybe"),
            ],
        )
        .await?;
    let docs = train::read_feedback(&table).await?;
    let by_id: std::collections::BTreeMap<&str, &sift_training::Document> =
        docs.iter().map(|d| (d.id.as_str(), d)).collect();
    ensure!(by_id.len() == 4, "{:?}", by_id.keys());
    ensure!(
        by_id["a-accepted"].tags == ["use::editing"] && by_id["a-accepted"].rejected.is_empty()
    );
    ensure!(by_id["b-chosen"].tags == ["game::puzzle"]);
    ensure!(by_id["c-rejected"].tags.is_empty());
    ensure!(by_id["c-rejected"].rejected == ["role::program", "use::editing"]);
    ensure!(by_id["d-rejected"].rejected.len() == 5);
    ensure!(by_id["a-accepted"].text == "text of a-accepted");
    Ok(())
}
