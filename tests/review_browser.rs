//! `sift review` in a real browser: the binary serves ~30 seeded documents,
//! two reviewers are added with `sift review user add`, and headless Chromium
//! (`tests/browser/review.mjs`, playwright-core) logs in, reviews with the
//! keyboard, chooses a label through the search box, meets another
//! reviewer's lease, renders a document full of markup inert and has forged
//! POSTs refused. Afterwards the decisions it reports are checked in the
//! `documents` table (family `r`) and in `sift.feedback`, and nothing else
//! was written.
//!
//! Needs Debian's Chromium and `tests/browser/node_modules`
//! (`scripts/browser-setup.sh` installs both). Without them the test prints
//! `SKIPPED`, unless `CI` or `SIFT_TEST_REQUIRE_BROWSER` is set: then it
//! fails. Screenshots land in `<target dir>/browser-artifacts/`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use sift::backends::log::{EmbeddedLog, Log};
use sift::backends::table::{EmbeddedTable, RowPut, Scan, Table};
use sift::config::EmbeddedLogConfig;
use sift::documents::{self, categories, review, CATEGORIES, META, REVIEW};
use sift::envelope::document_id;

const FEEDBACK_TOPIC: &str = sift::envelope::topics::FEEDBACK;
const MODEL_VERSION: &str = "20250301-120000-browser";
const ALICE: (&str, &str) = ("alice", "alice-correct-horse-7");
const BOB: (&str, &str) = ("bob", "bob-battery-staple-9");
/// Every document but the last: 10 labels, five consecutive ones each.
const LABELS: [&str; 10] = [
    "debian::admin",
    "use::browsing",
    "use::editing",
    "implemented-in::python",
    "implemented-in::rust",
    "role::program",
    "interface::commandline",
    "interface::x11",
    "network::client",
    "use::gameplaying",
];
const SOURCES: [&str; 3] = ["debian-wiki", "arch-wiki", "askubuntu"];
/// Markup that must stay text wherever a page shows it.
const SCRIPT: &str = "<script>window.__pwned=1</script>";
const IMG: &str = "<img src=x onerror=\"window.__pwned=2\">";
/// A label only the markup document has: the one chosen through search.
const CHOOSE_LABEL: &str = "works-with::image";
/// A label carrying markup, to be rendered as text by the search box.
const MARKUP_LABEL: &str = "debian::admin\"><img src=x onerror=\"window.__pwned=4\">";

/// One seeded document, as `seed.json` gives it to the browser script.
struct Seeded {
    id: String,
    source: String,
    url: String,
    title: String,
    text: String,
    fetched_at_ms: i64,
    top5: Vec<(String, f64)>,
    /// Per label, the words that weighed most (`c:why`).
    why: Vec<Vec<String>>,
}

/// Words of every non-markup document's text, handed out as the words
/// that weighed for its labels.
const WHY_WORDS: [&str; 4] = ["install", "configure", "package", "read"];
/// The shadow model that scored every document a second time.
const SHADOW_VERSION: &str = "20250302-120000-shadow";

/// 30 documents in queue order (lowest top-1 score first); the last one, the
/// most certain, carries the markup.
fn seed_documents() -> Vec<Seeded> {
    let n = 30;
    (0..n)
        .map(|i| {
            let source = SOURCES[i % SOURCES.len()].to_string();
            let markup = i == n - 1;
            let url = if markup {
                format!("https://{source}.example.org/page?a=\"><script>window.__pwned=3</script>")
            } else {
                format!("https://{source}.example.org/page/{i}")
            };
            let top1 = if markup { 0.97 } else { 0.2 + 0.025 * i as f64 };
            let labels: Vec<String> = if markup {
                vec![
                    "use::browsing".into(),
                    MARKUP_LABEL.into(),
                    CHOOSE_LABEL.into(),
                    "role::program".into(),
                    "network::client".into(),
                ]
            } else {
                (0..5)
                    .map(|k| LABELS[(i + k) % LABELS.len()].to_string())
                    .collect()
            };
            let top5 = labels
                .into_iter()
                .zip([1.0, 0.5, 0.3, 0.2, 0.1])
                .map(|(l, f)| (l, (top1 * f * 10_000.0_f64).round() / 10_000.0))
                .collect();
            let (title, text) = if markup {
                (
                    format!("Release notes {SCRIPT} and {IMG}"),
                    format!("Before\n{SCRIPT}\n{IMG}\nafter: 1 < 2 && 3 > 2"),
                )
            } else {
                (
                    format!("Package guide number {i}"),
                    format!(
                        "How to install and configure package {i}.\n\n\
                         Run `apt-get install pkg{i}` and read /usr/share/doc/pkg{i}."
                    ),
                )
            };
            // The markup document keeps none, so its page shows none.
            let why = if markup {
                Vec::new()
            } else {
                (0..5)
                    .map(|k| vec![WHY_WORDS[(i + k) % WHY_WORDS.len()].to_owned()])
                    .collect()
            };
            Seeded {
                id: document_id(&source, &url),
                source,
                url,
                title,
                text,
                fetched_at_ms: 1_740_000_000_000 + 60_000 * i as i64,
                top5,
                why,
            }
        })
        .collect()
}

async fn seed_table(dir: &Path, docs: &[Seeded]) -> Result<()> {
    let table = EmbeddedTable::open(&dir.join("table.redb"))?;
    table
        .ensure_table(documents::TABLE, &[META, CATEGORIES, REVIEW])
        .await?;
    let rows = docs
        .iter()
        .map(|d| {
            let top5: Vec<Value> = d
                .top5
                .iter()
                .map(|(l, s)| json!({"label": l, "score": s}))
                .collect();
            // The shadow ranks the champion's 5 the other way round.
            let shadow = Value::from(top5.iter().rev().cloned().collect::<Vec<_>>()).to_string();
            RowPut::new(d.id.clone())
                .cell(META, "source", d.source.clone())
                .cell(META, "url", d.url.clone())
                .cell(META, "title", d.title.clone())
                .cell(META, "text", d.text.clone())
                .cell(META, "content_type", "text/html")
                .cell(META, "fetched_at_ms", d.fetched_at_ms.to_string())
                .cell(CATEGORIES, categories::TOP5, Value::from(top5).to_string())
                .cell(CATEGORIES, categories::MODEL_VERSION, MODEL_VERSION)
                .cell(CATEGORIES, categories::WHY, json!(d.why).to_string())
                .cell(CATEGORIES, categories::SHADOW_TOP5, shadow)
                .cell(CATEGORIES, categories::SHADOW_VERSION, SHADOW_VERSION)
                .cell(
                    CATEGORIES,
                    categories::SCORED_AT_MS,
                    (d.fetched_at_ms + 1_000).to_string(),
                )
        })
        .collect();
    table.put(documents::TABLE, rows).await?;
    seed_identities(std::sync::Arc::new(table)).await
}

/// Uncertain identity decisions, least certain first, as `seed.json` gives
/// them to the script: the handle's row, the profile's name, the
/// candidates shown and the key the script presses.
fn identities_seed() -> Vec<(&'static str, &'static str, Vec<&'static str>, &'static str)> {
    vec![
        (
            "twitter:sisters",
            "<img src=x onerror=\"window.__pwned=5\"> Okonkwo",
            vec!["DB0000000001", "DB0000000002"],
            "2",
        ),
        ("twitter:chris", "Chris Okonkwo", vec!["DB0000000003"], "0"),
    ]
}

/// Writes [`identities_seed`] to `handles` through the matcher's sink.
async fn seed_identities(table: std::sync::Arc<EmbeddedTable>) -> Result<()> {
    use sift::matching::matcher::{CandidateScore, Enriched, Outcome, ProfileIn, Reason};
    use sift::matching::score::{Evidence, Field, Level};
    use sift::matching::sink;
    let table: std::sync::Arc<dyn Table> = table;
    sink::ensure_tables(table.as_ref()).await?;
    let cache: std::sync::Arc<dyn sift::backends::Cache> =
        std::sync::Arc::new(sift::backends::cache::EmbeddedCache::new(100));
    let decided: Vec<sink::Decided> = identities_seed()
        .into_iter()
        .enumerate()
        .map(|(n, (row, name, candidates, _))| {
            let handle = row.split_once(':').map_or(row, |(_, h)| h);
            let top: Vec<CandidateScore> = candidates
                .iter()
                .enumerate()
                .map(|(i, id)| CandidateScore {
                    dbusa_id: (*id).into(),
                    score: 25.0 - i as f64,
                    evidence: [
                        (
                            Field::First,
                            if i == 0 { Level::Typo } else { Level::Jw92 },
                            6.5 - i as f64,
                        ),
                        (Field::Last, Level::Exact, 12.0),
                        (Field::Location, Level::CityState, 12.6),
                    ]
                    .into_iter()
                    .map(|(field, level, weight)| Evidence {
                        field,
                        level,
                        weight,
                    })
                    .collect(),
                    person: Some(sift::dbusa::person::Person {
                        dbusa_id: (*id).into(),
                        first: ["Christina", "Christine", "Christopher"][i + n * 2 % 3].into(),
                        middle: String::new(),
                        last: "Okonkwo".into(),
                        address: "12 Elm St".into(),
                        city: "Austin".into(),
                        state: "TX".into(),
                        zip: "78701".into(),
                        phone: String::new(),
                        email: String::new(),
                        birth_year: 1980,
                    }),
                })
                .collect();
            let (reason, probability) = if n == 0 {
                (Reason::Ambiguous, 0.9)
            } else {
                (Reason::Matched, 0.8)
            };
            sink::Decided {
                profile: ProfileIn {
                    id: None,
                    network: "twitter".into(),
                    handle: handle.into(),
                    name: Some(name.into()),
                    location: Some("Austin, TX".into()),
                    ..ProfileIn::default()
                },
                outcome: Outcome {
                    dbusa_id: (reason == Reason::Matched).then(|| candidates[0].to_owned()),
                    score: Some(25.0),
                    probability: Some(probability),
                    runner_up: None,
                    reason,
                    method: "search".into(),
                    enrichment: Enriched::NotCalled,
                    candidates: top.len(),
                    best: Some(candidates[0].to_owned()),
                    evidence: Vec::new(),
                    top,
                    candidate_ids: Vec::new(),
                },
                at_ms: 1_700_000_000_000,
            }
        })
        .collect();
    sink::write(&table, &cache, &decided, None).await?;
    Ok(())
}

/// `sift --data-dir DIR …`, quiet, without a password in its environment.
fn sift(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sift"));
    // In the data dir, so that no ./sift.toml of the checkout is picked up.
    cmd.current_dir(dir)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .env("SIFT__TELEMETRY__METRICS_ADDR", "")
        .env_remove("SIFT_CONFIG")
        .env_remove("SIFT_REVIEW_PASSWORD");
    cmd
}

fn add_user(dir: &Path, name: &str, password: &str) -> Result<()> {
    let mut child = sift(dir)
        .args([
            "review",
            "user",
            "add",
            name,
            "--role",
            "reviewer",
            "--password-stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("the child's stdin")?
        .write_all(format!("{password}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "sift review user add {name} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The review server; killed if the test ends early.
struct Server {
    child: Child,
    stderr: PathBuf,
}

impl Server {
    fn start(dir: &Path, port: u16) -> Result<Self> {
        let stderr = dir.join("review.stderr");
        let mut child = sift(dir)
            .args(["review", "--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut server = Server { child, stderr };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let want = format!("review UI at http://127.0.0.1:{port}/");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.trim() == want => break,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "sift review exited before printing `{want}`: {}",
                        server.stderr_text()
                    )
                }
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("sift review exited ({status}): {}", server.stderr_text());
            }
            ensure!(
                Instant::now() < deadline,
                "sift review did not print `{want}` within 30 s: {}",
                server.stderr_text()
            );
        }
        std::net::TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("sift review said it listens on {port}, but it does not"))?;
        Ok(server)
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Ctrl-C, as an operator stops it; it must exit within 10 s.
    fn interrupt(mut self) -> Result<()> {
        // `Child::kill` only sends SIGKILL, and the crate denies `unsafe`.
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        ensure!(sent.success(), "could not send SIGINT to sift review");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(
                    status.success(),
                    "sift review exited with {status} on Ctrl-C: {}",
                    self.stderr_text()
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "sift review was still running 10 s after Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The browser script's limit: it takes about 10 s.
const SCRIPT_LIMIT: Duration = Duration::from_secs(180);

/// Runs the script with its output in files under `dir`; the exit status,
/// or None when it ran past [`SCRIPT_LIMIT`] and was killed, and its output.
fn run_script(cmd: &mut Command, dir: &Path) -> Result<(Option<ExitStatus>, String)> {
    let (out, err) = (dir.join("script.stdout"), dir.join("script.stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .context("starting node")?;
    let deadline = Instant::now() + SCRIPT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = format!(
        "{}{}",
        std::fs::read_to_string(&out)?,
        std::fs::read_to_string(&err)?
    );
    Ok((status, output))
}

/// What the browser script reports it did.
#[derive(Deserialize)]
struct Report {
    decisions: Vec<Made>,
    #[serde(default)]
    identities: Vec<IdentityMade>,
    skipped: Vec<String>,
    refused: Vec<String>,
    timings: Vec<Timing>,
}

#[derive(Deserialize, Debug)]
struct IdentityMade {
    row: String,
    choice: String,
}

#[derive(Deserialize, Debug)]
struct Made {
    id: String,
    key: String,
    decision: String,
    label: Option<String>,
    rejected: Vec<String>,
    reviewer: String,
}

#[derive(Deserialize)]
struct Timing {
    step: String,
    ms: u64,
}

/// Where screenshots are kept: `browser-artifacts` in the cargo target dir.
fn artifacts_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("browser-artifacts")
}

/// The checkout: tests/browser lives here.
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The browser and the script's packages, or why the test cannot run.
fn browser_prerequisites() -> std::result::Result<PathBuf, String> {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return Err(format!("{} is missing", chromium.display()));
    }
    let modules = repo_root().join("tests/browser/node_modules/playwright-core");
    if !modules.exists() {
        return Err(format!("{} is missing", modules.display()));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is not on PATH".into());
    }
    Ok(chromium)
}

/// CI (and scripts/test.sh) must run the test, never skip it.
fn required() -> bool {
    ["CI", "SIFT_TEST_REQUIRE_BROWSER"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

#[test]
fn review_ui_in_headless_chromium() -> Result<()> {
    let chromium = match browser_prerequisites() {
        Ok(c) => c,
        Err(why) if required() => bail!(
            "the browser test cannot run: {why}. Run scripts/browser-setup.sh \
             (it installs Debian's chromium and tests/browser's node_modules)"
        ),
        Err(why) => {
            eprintln!(
                "SKIPPED: {why}, so the review UI's browser test did not run \
                 (scripts/browser-setup.sh installs what it needs)"
            );
            return Ok(());
        }
    };
    let started = Instant::now();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir)?;
    let artifacts = artifacts_dir();
    if artifacts.exists() {
        std::fs::remove_dir_all(&artifacts)?;
    }
    std::fs::create_dir_all(&artifacts)?;

    let docs = seed_documents();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(seed_table(&dir, &docs))?;
    let seed = json!({
        "documents": docs.iter().map(|d| json!({
            "id": d.id, "source": d.source, "url": d.url, "title": d.title,
            "fetched_at_ms": d.fetched_at_ms,
            "top5": d.top5.iter().map(|(l, s)| json!({"label": l, "score": s})).collect::<Vec<_>>(),
            "why": d.why,
        })).collect::<Vec<_>>(),
        // What each seeded label means, from the compiled-in vocabulary.
        "categories": docs.iter().flat_map(|d| d.top5.iter().map(|(l, _)| l.clone()))
            .filter_map(|l| sift::categories::get(&l).map(|c| (l, json!({"name": c.name, "description": c.description}))))
            .collect::<serde_json::Map<String, Value>>(),
        "description_query": "executable",
        "description_label": "role::program",
        "shadow_version": SHADOW_VERSION,
        "xss_id": docs.last().context("seeded documents")?.id,
        "category_filter": "use::browsing",
        "choose_label": CHOOSE_LABEL,
        "choose_query": "with::ima",
        "markup_query": "onerror",
        "model_version": MODEL_VERSION,
        "identities": identities_seed().iter().map(|(row, name, candidates, key)| json!({
            "row": row, "name": name, "candidates": candidates, "key": key,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        artifacts.join("seed.json"),
        serde_json::to_vec_pretty(&seed)?,
    )?;
    add_user(&dir, ALICE.0, ALICE.1)?;
    add_user(&dir, BOB.0, BOB.1)?;
    let setup = started.elapsed();

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server = Server::start(&dir, port)?;
    let browser_started = Instant::now();
    let (status, script_output) = run_script(
        Command::new("node")
            .arg(repo_root().join("tests/browser/review.mjs"))
            .args(["--url", &format!("http://127.0.0.1:{port}")])
            .arg("--artifacts")
            .arg(&artifacts)
            .env("CHROMIUM", &chromium)
            .env("REVIEW_ALICE_USER", ALICE.0)
            .env("REVIEW_ALICE_PASSWORD", ALICE.1)
            .env("REVIEW_BOB_USER", BOB.0)
            .env("REVIEW_BOB_PASSWORD", BOB.1)
            .current_dir(repo_root()),
        tmp.path(),
    )?;
    let browser_time = browser_started.elapsed();
    print!("{script_output}");
    ensure!(
        status.is_some_and(|s| s.success()),
        "tests/browser/review.mjs {}; screenshots and the page in {}:\n{script_output}\n\
         sift review's log:\n{}",
        status.map_or_else(
            || format!("was killed after {} s", SCRIPT_LIMIT.as_secs()),
            |s| format!("failed ({s})")
        ),
        artifacts.display(),
        server.stderr_text()
    );
    server.interrupt()?;

    let report: Report = serde_json::from_slice(&std::fs::read(artifacts.join("decisions.json"))?)
        .context("decisions.json from the browser script")?;
    for t in &report.timings {
        println!("{:>6} ms  {}", t.ms, t.step);
    }
    ensure!(
        report.decisions.len() >= 11,
        "the script reports {} decisions, expected 10 by keyboard and 1 by search",
        report.decisions.len()
    );
    let kinds: BTreeSet<&str> = report
        .decisions
        .iter()
        .map(|d| d.decision.as_str())
        .collect();
    ensure!(
        kinds == BTreeSet::from(["accept", "choose", "reject"]),
        "the script made decisions of kinds {kinds:?}, expected accept, choose and reject"
    );
    let by_id: BTreeMap<&str, &Seeded> = docs.iter().map(|d| (d.id.as_str(), d)).collect();
    let decided: BTreeMap<&str, &Made> = report
        .decisions
        .iter()
        .map(|d| (d.id.as_str(), d))
        .collect();
    ensure!(
        decided.len() == report.decisions.len(),
        "a document was decided twice: {:?}",
        report.decisions
    );
    for id in report.skipped.iter().chain(&report.refused) {
        ensure!(
            !decided.contains_key(id.as_str()),
            "{id} was both decided and skipped or refused"
        );
    }

    rt.block_on(check_table(&dir, &by_id, &decided))?;
    rt.block_on(check_identities(&dir, &report.identities))?;
    let sent = rt.block_on(check_feedback(&dir, &by_id, &decided))?;
    println!(
        "{} decisions in `r` and {sent} records in {FEEDBACK_TOPIC}, as the browser made them",
        decided.len()
    );

    for shot in ["queue.png", "document.png"] {
        let meta = std::fs::metadata(artifacts.join(shot))
            .with_context(|| format!("screenshot {shot} in {}", artifacts.display()))?;
        ensure!(
            meta.len() > 10_000,
            "screenshot {shot} is only {} bytes",
            meta.len()
        );
    }
    println!(
        "setup {:.1} s, browser script {:.1} s, total {:.1} s; screenshots in {}",
        setup.as_secs_f64(),
        browser_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        artifacts.display()
    );
    Ok(())
}

/// Every seeded identity was decided as the script reports, by alice, in
/// `handles`.
async fn check_identities(dir: &Path, made: &[IdentityMade]) -> Result<()> {
    use sift::matching::sink::{columns, HANDLES, HANDLES_FAMILY};
    let seeded = identities_seed();
    ensure!(
        made.len() == seeded.len(),
        "the script decided {} identities, expected {}",
        made.len(),
        seeded.len()
    );
    let table = EmbeddedTable::open(&dir.join("table.redb"))?;
    for (m, (row, _, candidates, key)) in made.iter().zip(&seeded) {
        ensure!(m.row == *row, "decided {} where {row} was expected", m.row);
        let expected = if *key == "0" {
            "none".to_owned()
        } else {
            candidates[key.parse::<usize>()? - 1].to_owned()
        };
        ensure!(m.choice == expected, "{row}: the script chose {}", m.choice);
        let stored = table
            .get(HANDLES, row.as_bytes(), None)
            .await?
            .with_context(|| format!("no handles row {row}"))?;
        let cell = |q: &str| {
            stored
                .get(HANDLES_FAMILY, q.as_bytes())
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        ensure!(
            cell(columns::REVIEW) == expected
                && cell(columns::REVIEWED_BY) == ALICE.0
                && cell(columns::REASON) == "reviewed",
            "{row}: handles holds review {:?} by {:?}, reason {:?}",
            cell(columns::REVIEW),
            cell(columns::REVIEWED_BY),
            cell(columns::REASON)
        );
        let person = if expected == "none" {
            String::new()
        } else {
            expected
        };
        ensure!(
            cell(columns::DBUSA_ID) == person,
            "{row}: dbusa_id {:?}",
            cell(columns::DBUSA_ID)
        );
    }
    Ok(())
}

/// Family `r` holds exactly the decisions the browser made, nothing for the
/// documents it skipped, refused or only looked at.
async fn check_table(
    dir: &Path,
    docs: &BTreeMap<&str, &Seeded>,
    decided: &BTreeMap<&str, &Made>,
) -> Result<()> {
    let table = EmbeddedTable::open(&dir.join("table.redb"))?;
    let rows = table.scan(documents::TABLE, &Scan::default()).await?;
    ensure!(
        rows.len() == docs.len(),
        "{} rows, expected {}",
        rows.len(),
        docs.len()
    );
    let text = |row: &sift::backends::table::Row, q: &str| {
        row.get(REVIEW, q.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    for row in &rows {
        let id = String::from_utf8_lossy(&row.key).into_owned();
        let has_r = row.cells.iter().any(|c| c.family == REVIEW);
        let Some(made) = decided.get(id.as_str()) else {
            ensure!(
                !has_r,
                "{id} was not decided in the browser but has `r` cells: {row:?}"
            );
            continue;
        };
        let seed = docs.get(id.as_str()).context("a seeded row")?;
        let what = format!("{id} (key {})", made.key);
        ensure!(
            text(row, review::DECISION).as_deref() == Some(made.decision.as_str()),
            "{what}: r:decision is {:?}, expected {}",
            text(row, review::DECISION),
            made.decision
        );
        ensure!(
            text(row, review::REVIEWER).as_deref() == Some(made.reviewer.as_str()),
            "{what}: r:reviewer is {:?}, expected {}",
            text(row, review::REVIEWER),
            made.reviewer
        );
        ensure!(
            text(row, review::MODEL_VERSION).as_deref() == Some(MODEL_VERSION),
            "{what}: r:model_version is {:?}, expected {MODEL_VERSION}",
            text(row, review::MODEL_VERSION)
        );
        let at: i64 = text(row, review::AT_MS)
            .context("r:at_ms")?
            .parse()
            .with_context(|| format!("{what}: r:at_ms is not a number"))?;
        ensure!(
            at > 1_740_000_000_000,
            "{what}: r:at_ms {at} is not a recent time"
        );
        match made.decision.as_str() {
            "reject" => {
                let rejected: Vec<String> =
                    serde_json::from_str(&text(row, review::REJECTED).context("r:rejected")?)?;
                let top5: Vec<String> = seed.top5.iter().map(|(l, _)| l.clone()).collect();
                ensure!(
                    rejected == top5 && rejected == made.rejected,
                    "{what}: r:rejected is {rejected:?}, expected the top 5 {top5:?}"
                );
                let label = text(row, review::LABEL).unwrap_or_default();
                ensure!(
                    label.is_empty(),
                    "{what}: a rejection stored label {label:?}"
                );
            }
            _ => {
                ensure!(
                    text(row, review::LABEL) == made.label,
                    "{what}: r:label is {:?}, expected {:?}",
                    text(row, review::LABEL),
                    made.label
                );
            }
        }
    }
    Ok(())
}

/// `sift.feedback` holds one record per decision, keyed by document id;
/// returns how many it holds.
async fn check_feedback(
    dir: &Path,
    docs: &BTreeMap<&str, &Seeded>,
    decided: &BTreeMap<&str, &Made>,
) -> Result<usize> {
    let log = EmbeddedLog::open(&dir.join("log"), EmbeddedLogConfig::default())?;
    let mut records: BTreeMap<String, Value> = BTreeMap::new();
    for w in log.watermarks(FEEDBACK_TOPIC).await? {
        let mut offset = w.low;
        while offset < w.high {
            let batch = log.fetch(FEEDBACK_TOPIC, w.partition, &offset, 500).await?;
            ensure!(
                !batch.is_empty(),
                "{FEEDBACK_TOPIC} stops before its high watermark"
            );
            for m in batch {
                offset = m.offset.next();
                let value: Value = serde_json::from_slice(&m.value)
                    .with_context(|| format!("a {FEEDBACK_TOPIC} record is not JSON"))?;
                let key =
                    String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
                ensure!(
                    value["id"] == key.as_str(),
                    "a {FEEDBACK_TOPIC} record keyed {key} is about {}",
                    value["id"]
                );
                ensure!(
                    records.insert(key.clone(), value).is_none(),
                    "{FEEDBACK_TOPIC} has two records for {key}"
                );
            }
        }
    }
    let ids: BTreeSet<&str> = records.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = decided.keys().copied().collect();
    ensure!(
        ids == want,
        "{FEEDBACK_TOPIC} has records for {ids:?}, expected exactly the decided {want:?}"
    );
    for (id, made) in decided {
        let r = &records[*id];
        let seed = docs.get(id).context("a seeded document")?;
        let top5: Vec<&str> = seed.top5.iter().map(|(l, _)| l.as_str()).collect();
        let sent_top5: Vec<&str> = r["top5"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["label"].as_str()).collect())
            .unwrap_or_default();
        ensure!(
            r["v"] == 1
                && r["decision"] == made.decision.as_str()
                && r["reviewer"] == made.reviewer.as_str()
                && r["model_version"] == MODEL_VERSION
                && r["at_ms"].as_i64().is_some_and(|t| t > 1_740_000_000_000)
                && sent_top5 == top5,
            "{FEEDBACK_TOPIC} record for {id} is {r}, expected {made:?} with the seeded top 5"
        );
        match made.decision.as_str() {
            "reject" => ensure!(
                r["rejected"] == json!(top5) && (r["label"].is_null() || r["label"] == ""),
                "{FEEDBACK_TOPIC} rejection of {id} is {r}, expected rejected = {top5:?}"
            ),
            _ => ensure!(
                r["label"].as_str() == made.label.as_deref(),
                "{FEEDBACK_TOPIC} record for {id} has label {}, expected {:?}",
                r["label"],
                made.label
            ),
        }
    }
    Ok(records.len())
}
