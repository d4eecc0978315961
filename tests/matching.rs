//! Identity matching end to end on embedded backends:
//!
//! - accuracy on a generated 100,000-person database with 5,000 profiles of
//!   its people and 1,000 of strangers, through the binary (`sift dbusa
//!   load`, `sift match --input/--output`) with the enrichment stand-in:
//!   precision and recall floors per corruption type, set from measurement
//!   (a seed the built-in weights were not fitted on);
//! - the daemon: every profile of `sift.profiles` decided and written to the
//!   cache, `handles`, `identities` and `sift.matches`, malformed records in
//!   `sift.dlq` with their reasons, offsets committed, re-processing rewriting
//!   the same rows;
//! - SIGKILLs of the daemon at random moments lose no profile;
//! - `sift cache refresh` swaps each namespace whole under concurrent reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use sift::backends::cache::{Cache, EmbeddedCache};
use sift::backends::log::{Log, Record};
use sift::backends::objects::{EmbeddedObjects, ObjectStore};
use sift::backends::search::{EmbeddedSearch, SearchIndex};
use sift::backends::table::{EmbeddedTable, RowPut, Scan, Table};
use sift::daemon::Until;
use sift::dbusa::generate::{generate, Spec};
use sift::dbusa::person::{read_people, read_profiles, Profile};
use sift::envelope::topics;
use sift::matching::daemon::{self, Parts};
use sift::matching::evaluate::{evaluate, table};
use sift::matching::matcher::{Outcome, ProfileIn, Reason};
use sift::matching::sink::{self, HANDLES, HANDLES_FAMILY, IDENTITIES, IDENTITIES_FAMILY};

mod embedded;
use embedded::{config, open_log, read_all, wait_for_metric, Kills};

fn sift() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sift"));
    c.env("RUST_LOG", "warn").stdin(Stdio::null());
    c
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::inherit()).output()?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Floors of precision and recall per corruption type, measured with the
/// built-in weights (fitted without labels on seed 42), threshold 0.5 and
/// margin 2 on seed 7 with 1,000 strangers and 1,000 housemates (`sift
/// bench match`): precision 1.000 in every group; recall none 1.000,
/// nickname 0.994, typo 0.986, transposed 1.000, moved_city 0.930,
/// missing_name 0.900, missing_location 0.988, both_missing 0.856,
/// first_typo 0.994, moved_nearby 0.970; overall F1 0.977, name present
/// 0.987; strangers and housemates matched 1.6 % each. The floors leave
/// about two points.
const FLOORS: [(&str, f64, f64); 10] = [
    ("none", 0.99, 0.97),
    ("nickname", 0.99, 0.96),
    ("typo", 0.99, 0.96),
    ("transposed", 0.99, 0.96),
    ("moved_city", 0.98, 0.89),
    ("missing_name", 0.98, 0.87),
    ("missing_location", 0.99, 0.96),
    ("both_missing", 0.98, 0.83),
    ("first_typo", 0.99, 0.97),
    ("moved_nearby", 0.97, 0.93),
];

#[test]
fn matching_meets_its_accuracy_floors_on_a_generated_database() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("gen");
    let sift_dir = dir.path().join("sift");
    run_ok(
        sift()
            .args([
                "dbusa",
                "generate",
                "--rows",
                "100000",
                "--profiles",
                "5000",
            ])
            .args(["--outsiders", "1000", "--housemates", "1000"])
            .args(["--seed", "7", "--out"])
            .arg(&data),
    )?;
    run_ok(
        sift()
            .arg("--data-dir")
            .arg(&sift_dir)
            .args(["dbusa", "load"])
            .arg(data.join("dbusa.csv")),
    )?;
    // The enrichment stand-in, serving the generator's canned answers.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = sift()
        .args([
            "enrich",
            "standin",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--answers")
        .arg(data.join("enrichment.jsonl"))
        .args(["--api-key", "test-key"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "the stand-in did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = dir.path().join("matches.jsonl");
    let match_run = |key: &str, output: &Path| {
        let mut cmd = sift();
        cmd.arg("--data-dir")
            .arg(&sift_dir)
            .env("SIFT__ENRICH__URL", format!("http://127.0.0.1:{port}"))
            .env("SIFT__ENRICH__API_KEY", key)
            .env("SIFT__ENRICH__RATE_PER_MINUTE", "600000")
            .env("SIFT__ENRICH__PENDING_WAIT", "50ms")
            .env("SIFT__ENRICH__MAX_ATTEMPTS", "2")
            .args(["match", "--input"])
            .arg(data.join("profiles.jsonl"))
            .arg("--output")
            .arg(output);
        cmd
    };
    let stats = || -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&run_ok(
            sift()
                .arg("--data-dir")
                .arg(&sift_dir)
                .args(["enrich", "stats", "--json"]),
        )?)?)
    };
    // A refused key stops the matcher with an error that says so.
    let refused = match_run("wrong-key", &dir.path().join("refused.jsonl"))
        .stderr(Stdio::piped())
        .output()?;
    let matched = run_ok(&mut match_run("test-key", &out));
    let after_first = stats();
    // The second run, with the API gone: every answer it needs was paid
    // for by the first and stored, so it decides the same without a call.
    server.kill()?;
    server.wait()?;
    matched?;
    ensure!(!refused.status.success(), "a refused key exited 0");
    let said = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        said.contains("refused the key") && !said.contains("wrong-key"),
        "{said}"
    );
    ensure!(
        !dir.path().join("refused.jsonl").exists(),
        "a refused run wrote output"
    );
    let again = dir.path().join("again.jsonl");
    run_ok(&mut match_run("test-key", &again))?;
    let decisions = |path: &Path| -> Result<Vec<(String, String, String, String)>> {
        std::fs::read_to_string(path)?
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)?;
                let field = |k: &str| v[k].to_string();
                Ok((
                    field("id"),
                    field("dbusa_id"),
                    field("reason"),
                    field("score"),
                ))
            })
            .collect()
    };
    let (first_run, second_run) = (decisions(&out)?, decisions(&again)?);
    ensure!(first_run.len() == second_run.len());
    for (a, b) in first_run.iter().zip(&second_run) {
        ensure!(
            a == b,
            "decided differently without the API: {a:?} then {b:?}"
        );
    }
    let (first, second) = (after_first?, stats()?);
    let paid = first["summary"]["counted"]["calls"].as_u64().unwrap_or(0);
    let stored = first["summary"]["found"].as_u64().unwrap_or(0)
        + first["summary"]["not_found"].as_u64().unwrap_or(0);
    ensure!(paid > 0 && stored > 0, "{first}");
    ensure!(
        second["summary"]["counted"]["calls"].as_u64() == Some(paid),
        "the second run paid: {second}"
    );
    ensure!(
        second["summary"]["counted"]["stored_hits"].as_u64() >= Some(stored),
        "{second}"
    );
    let profiles = read_profiles(&data.join("profiles.jsonl"))?;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(lines.len() == profiles.len(), "one output line per profile");
    let mut outcomes = Vec::with_capacity(lines.len());
    for (p, l) in profiles.iter().zip(&lines) {
        ensure!(l["id"] == p.id.as_str(), "output out of order at {}", p.id);
        ensure!(
            l.get("evidence").is_some() && l.get("score").is_some() && l.get("reason").is_some()
        );
        let o: Outcome = serde_json::from_value(l.clone()).context("an output line")?;
        if o.dbusa_id.is_some() {
            ensure!(o.reason == Reason::Matched && o.evidence.len() == 7);
        }
        // The decision explains itself: the best candidates with their
        // scores and levels, best first; the decided one among them with
        // its own score (a relative ranked above it is shown, not chosen).
        ensure!(
            o.top.len() >= o.candidates.min(3) && o.top.len() <= 3,
            "{}: {:?}",
            p.id,
            o.top
        );
        if let Some(first) = o.top.first() {
            ensure!(o.score.is_some_and(|s| first.score >= s));
            if let Some(shown) = o.top.iter().find(|c| Some(&c.dbusa_id) == o.best.as_ref()) {
                ensure!(Some(shown.score) == o.score && shown.evidence == o.evidence);
            }
            ensure!(o.top.windows(2).all(|w| w[0].score >= w[1].score));
        }
        outcomes.push(o);
    }
    let report = evaluate(&profiles, &outcomes, &[]);
    eprintln!("{}", table(&report));
    for (corruption, precision, recall) in FLOORS {
        let a = report
            .by_corruption
            .get(corruption)
            .with_context(|| format!("no {corruption} profiles"))?;
        ensure!(
            a.precision >= precision && a.recall >= recall,
            "{corruption}: precision {:.3} (floor {precision}), recall {:.3} (floor {recall})",
            a.precision,
            a.recall
        );
    }
    ensure!(report.overall.f1 >= 0.96, "F1 {:.3}", report.overall.f1);
    ensure!(
        report.name_present.f1 >= 0.97,
        "name-present F1 {:.3}",
        report.name_present.f1
    );
    // Strangers and the housemates of members alike: at most 3 % matched.
    ensure!(
        report.false_match_rate <= 0.03,
        "false-match rate {:.3}",
        report.false_match_rate
    );
    // Strangers whom the enrichment API knows must not be matched by it alone.
    ensure!(report.reasons.contains_key("enrichment_not_found"));

    // Weights fitted without labels decide close to weights fitted with
    // them, on the same database, here without enrichment (measured on seed
    // 7: 0.892 and 0.903; with enrichment on seed 2026 the gap is under
    // 0.01, see the README); the unlabelled fit is deterministic.
    let fit = |out: &Path, labels: bool| -> Result<String> {
        let mut cmd = sift();
        cmd.arg("--data-dir")
            .arg(&sift_dir)
            .args(["match", "fit", "--db"])
            .arg(data.join("dbusa.csv"))
            .arg("--profiles")
            .arg(data.join("profiles.jsonl"))
            .arg("--out")
            .arg(out);
        if labels {
            cmd.arg("--labels");
        }
        run_ok(&mut cmd)
    };
    let (unlabelled, again, labelled) = (
        dir.path().join("em.json"),
        dir.path().join("em-again.json"),
        dir.path().join("labels.json"),
    );
    let said = fit(&unlabelled, false)?;
    ensure!(said.contains("expectation-maximisation"), "{said}");
    fit(&again, false)?;
    fit(&labelled, true)?;
    ensure!(
        std::fs::read(&unlabelled)? == std::fs::read(&again)?,
        "two unlabelled fits differ"
    );
    let f1_with = |weights: &Path| -> Result<f64> {
        let out = weights.with_extension("jsonl");
        run_ok(
            sift()
                .arg("--data-dir")
                .arg(&sift_dir)
                .env("SIFT__MATCH__WEIGHTS", weights)
                .args(["match", "--input"])
                .arg(data.join("profiles.jsonl"))
                .arg("--output")
                .arg(&out),
        )?;
        let outcomes: Vec<Outcome> = std::fs::read_to_string(&out)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        Ok(evaluate(&profiles, &outcomes, &[]).overall.f1)
    };
    let (without, with) = (f1_with(&unlabelled)?, f1_with(&labelled)?);
    eprintln!("F1 without enrichment: weights fitted without labels {without:.4}, with {with:.4}");
    ensure!(
        (without - with).abs() <= 0.02,
        "unlabelled {without:.4} vs labelled {with:.4}"
    );
    Ok(())
}

/// A small database in an embedded index, and its generated profiles.
async fn small_world(
    dir: &Path,
    rows: u64,
    profiles: u64,
) -> Result<(Arc<dyn SearchIndex>, Vec<Profile>)> {
    let data = dir.join("gen");
    generate(
        &Spec {
            rows,
            seed: 11,
            profiles,
            outsiders: profiles / 5,
            housemates: 0,
            profile_rows: 0,
        },
        &data,
    )?;
    let search: Arc<dyn SearchIndex> = Arc::new(EmbeddedSearch::open(&dir.join("search"))?);
    search
        .ensure_index(&sift::dbusa::index::spec("dbusa"))
        .await?;
    let docs = read_people(&data.join("dbusa.csv"))?
        .iter()
        .map(sift::dbusa::index::person_doc)
        .collect();
    let report = search.bulk("dbusa", docs).await?;
    ensure!(report.failed.is_empty());
    Ok((search, read_profiles(&data.join("profiles.jsonl"))?))
}

fn profile_records(profiles: &[Profile]) -> Vec<Record> {
    profiles
        .iter()
        .map(|p| {
            let v = serde_json::to_vec(&ProfileIn::from(p)).unwrap_or_default();
            Record::new(format!("{}:{}", p.network, p.handle), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_writes_every_output_and_dead_letters_bad_records() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (search, profiles) = small_world(dir.path(), 5_000, 300).await?;
    let config = config(dir.path());
    let log = open_log(dir.path())?;
    let table: Arc<dyn Table> = Arc::new(EmbeddedTable::open(&dir.path().join("table.redb"))?);
    log.create_topic(topics::PROFILES, 4).await?;
    let mut records = profile_records(&profiles);
    let bad: [(&[u8], &str); 4] = [
        (b"not json", "bad_json"),
        (br#"{"network":"twitter"}"#, "bad_json"),
        (
            br#"{"v":2,"network":"twitter","handle":"x"}"#,
            "schema_version",
        ),
        (br#"{"network":"Twit ter!","handle":"x"}"#, "bad_profile"),
    ];
    for (value, _) in bad {
        records.push(Record::new("bad", Bytes::from_static(value)));
    }
    log.produce(topics::PROFILES, records).await?;
    let valid: BTreeSet<String> = profiles
        .iter()
        .map(|p| format!("{}:{}", p.network, p.handle.to_lowercase()))
        .collect();

    let (matcher, _) =
        sift::matching::matcher_on(&config, search.clone(), table.clone() as Arc<dyn Table>)
            .await?;
    let cache: Arc<dyn Cache> = Arc::new(EmbeddedCache::new(100_000));
    let objects: Arc<dyn ObjectStore> =
        Arc::new(EmbeddedObjects::open(&dir.path().join("objects"))?);
    let parts = || Parts {
        log: log.clone() as Arc<dyn Log>,
        objects: objects.clone(),
        table: table.clone(),
        cache: cache.clone(),
        matcher: matcher.clone(),
    };
    let counted = |reason: &str| {
        let line = format!("sift_pipeline_dead_letters_total{{reason=\"{reason}\"}} ");
        sift::metrics::global()
            .render()
            .lines()
            .find_map(|l| {
                l.strip_prefix(&line)
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let before = counted("bad_profile");
    let summary = daemon::run(parts(), &config, Until::caught_up()).await?;
    ensure!(summary.consumed == profiles.len() as u64 + 4, "{summary:?}");
    // Each dead letter is counted once, where it is sent.
    ensure!(
        counted("bad_profile") == before + 1,
        "one bad profile counted {} times",
        counted("bad_profile") - before
    );
    let mut want_dead = BTreeMap::new();
    for (_, reason) in bad {
        *want_dead.entry(reason.to_owned()).or_insert(0u64) += 1;
    }
    ensure!(
        summary.dead_letters == want_dead,
        "{:?}",
        summary.dead_letters
    );
    ensure!(
        summary.decided.get("matched").copied().unwrap_or(0) > 200,
        "{:?}",
        summary.decided
    );

    // Every valid profile has its handles row, its sift.matches record, and,
    // when matched, its identity column and cache entry.
    let rows = table.scan(HANDLES, &Scan::default()).await?;
    let keys: BTreeSet<String> = rows
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    ensure!(
        keys == valid,
        "{} handles rows for {} profiles",
        keys.len(),
        valid.len()
    );
    let matches = read_all(log.as_ref(), topics::MATCHES).await?;
    ensure!(
        matches.len() == profiles.len(),
        "{} matches records",
        matches.len()
    );
    let mut matched = 0;
    for r in &rows {
        let key = String::from_utf8_lossy(&r.key).into_owned();
        let (network, handle) = key.split_once(':').context("row key")?;
        let id = r.get(HANDLES_FAMILY, b"dbusa_id").context("dbusa_id")?;
        ensure!(
            r.get(HANDLES_FAMILY, b"reason").is_some()
                && r.get(HANDLES_FAMILY, b"matched_at_ms").is_some()
        );
        let cached = cache.get(&sink::namespace(network), handle).await?;
        if id.is_empty() {
            ensure!(cached.is_none(), "unmatched {key} is cached");
            continue;
        }
        matched += 1;
        ensure!(cached.as_ref() == Some(id), "cache for {key}");
        // A match is explained by its candidates, the winner first.
        let top: Vec<sift::matching::matcher::CandidateScore> = serde_json::from_slice(
            r.get(HANDLES_FAMILY, b"top")
                .context("the top candidates")?,
        )?;
        ensure!(top.first().map(|c| c.dbusa_id.as_bytes()) == Some(id.as_ref()));
        let identity = table
            .get(IDENTITIES, id, None)
            .await?
            .context("identity row")?;
        ensure!(
            identity
                .get(IDENTITIES_FAMILY, network.as_bytes())
                .map(|h| h.as_ref())
                == Some(handle.as_bytes()),
            "identity of {key}"
        );
    }
    ensure!(matched > 200);
    let dlq = read_all(log.as_ref(), topics::DLQ).await?;
    ensure!(dlq.len() == 4);
    let committed: u64 = log
        .committed(&config.matching.group, topics::PROFILES)
        .await?
        .iter()
        .map(|(_, c)| {
            c.as_ref()
                .map_or(0, |c| c.as_u64().expect("a dense offset"))
        })
        .sum();
    ensure!(
        committed == profiles.len() as u64 + 4,
        "committed {committed}"
    );

    // Re-processing (another group) rewrites the same rows.
    let mut again = config.clone();
    again.matching.group = "again".into();
    daemon::run(parts(), &again, Until::caught_up()).await?;
    let rows2 = table.scan(HANDLES, &Scan::default()).await?;
    ensure!(rows2.len() == rows.len());
    let ids = |rows: &[sift::backends::table::Row]| -> Vec<Option<Bytes>> {
        rows.iter()
            .map(|r| r.get(HANDLES_FAMILY, b"dbusa_id").cloned())
            .collect()
    };
    ensure!(ids(&rows) == ids(&rows2), "re-processing changed decisions");
    Ok(())
}

/// Profiles `sift match` has decided, on its `/metrics`.
const DECIDED: &str = "sift_pipeline_documents_total{stage=\"match\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_profile_is_lost_when_the_daemon_is_killed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let profiles = {
        let (search, profiles) = small_world(dir.path(), 5_000, 2_000).await?;
        drop(search);
        let log = open_log(dir.path())?;
        log.create_topic(topics::PROFILES, 4).await?;
        log.produce(topics::PROFILES, profile_records(&profiles))
            .await?;
        profiles
    };
    std::thread::sleep(Duration::from_millis(300));
    let daemon = |port: u16, once: bool| -> Result<std::process::Child> {
        let mut c = sift();
        c.arg("--data-dir")
            .arg(dir.path())
            .arg("match")
            .env("SIFT__TELEMETRY__METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("SIFT__MATCH__POLL_RECORDS", "50")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if once {
            c.arg("--once");
        }
        Ok(c.spawn()?)
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut killed = Kills::new(profiles.len());
    for k in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = daemon(port, false)?;
        wait_for_metric(&mut child, port, DECIDED, Duration::from_secs(120))
            .with_context(|| format!("before kill {k}"))?;
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        let label = format!("kill {k}");
        killed
            .kill(
                &mut child,
                dir.path(),
                "sift-match",
                topics::PROFILES,
                &label,
            )
            .await?;
    }
    killed.check()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let status = daemon(port, true)?.wait()?;
    ensure!(status.success(), "the last run: {status}");
    let table = EmbeddedTable::open(&dir.path().join("table.redb"))?;
    let rows = table.scan(HANDLES, &Scan::default()).await?;
    let want: BTreeSet<String> = profiles
        .iter()
        .map(|p| format!("{}:{}", p.network, p.handle.to_lowercase()))
        .collect();
    let got: BTreeSet<String> = rows
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    ensure!(
        got == want,
        "{} handles rows, {} profiles",
        got.len(),
        want.len()
    );
    let log = open_log(dir.path())?;
    let matches = read_all(log.as_ref(), topics::MATCHES).await?;
    let keys: BTreeSet<String> = matches
        .iter()
        .filter_map(|m| {
            m.key
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned())
        })
        .collect();
    ensure!(keys == want, "sift.matches lacks some profiles");
    Ok(())
}

/// Checks that every read of all `n` keys sees one generation whole.
async fn refresh_is_atomic(
    table: Arc<dyn Table>,
    cache: Arc<dyn Cache>,
    network: &str,
) -> Result<()> {
    const N: usize = 2_000;
    table.ensure_table(HANDLES, &[HANDLES_FAMILY]).await?;
    let write = |generation: &'static str| {
        let table = table.clone();
        let network = network.to_owned();
        async move {
            let rows: Vec<RowPut> = (0..N)
                .map(|i| {
                    RowPut::new(format!("{network}:h{i:05}")).cell(
                        HANDLES_FAMILY,
                        "dbusa_id",
                        format!("{generation}{i:05}"),
                    )
                })
                .collect();
            table.put(HANDLES, rows).await
        }
    };
    write("A").await?;
    sift::matching::refresh::refresh(&table, &cache, None).await?;
    let keys: Vec<String> = (0..N).map(|i| format!("h{i:05}")).collect();
    let ns = sift::matching::sink::namespace(network);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (cache, keys, ns, stop, reads) = (
            cache.clone(),
            keys.clone(),
            ns.clone(),
            stop.clone(),
            reads.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let values = cache.mget(&ns, &keys).await?;
                let gens: BTreeSet<u8> = values
                    .iter()
                    .map(|v| v.as_ref().map_or(b'-', |v| v[0]))
                    .collect();
                ensure!(gens.len() == 1, "a read saw a mix of generations: {gens:?}");
                seen.extend(gens);
                reads.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(seen)
        }));
    }
    for generation in ["B", "A", "B"] {
        write(generation).await?;
        sift::matching::refresh::refresh(&table, &cache, None).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = BTreeSet::new();
    for r in readers {
        seen.extend(r.await??);
    }
    ensure!(reads.load(Ordering::Relaxed) > 3, "too few reads to tell");
    ensure!(!seen.contains(&b'-'), "a read found a key missing");
    let last = cache.get(&ns, "h00000").await?;
    ensure!(
        last.as_deref() == Some(&b"B00000"[..]),
        "the last refresh is what readers see"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_refresh_swaps_a_namespace_whole_under_concurrent_reads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let table: Arc<dyn Table> = Arc::new(EmbeddedTable::open(&dir.path().join("table.redb"))?);
    refresh_is_atomic(table, Arc::new(EmbeddedCache::new(1_000_000)), "twitter").await
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_refresh_into_redis_swaps_a_namespace_whole() -> Result<()> {
    let Some(url) = std::env::var("SIFT_TEST_REDIS")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        ensure!(
            std::env::var("SIFT_TEST_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "SIFT_TEST_REDIS is not set but services are required"
        );
        eprintln!("skipped: SIFT_TEST_REDIS is not set");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let table: Arc<dyn Table> = Arc::new(EmbeddedTable::open(&dir.path().join("table.redb"))?);
    let cache = sift::backends::cache::redis::RedisCache::connect(&url).await?;
    let network = format!("net{}", rand::random::<u32>());
    refresh_is_atomic(table, Arc::new(cache), &network).await
}

/// The variable's value, or None (with a SKIPPED line) when unset; unset
/// fails instead when `SIFT_TEST_REQUIRE_SERVICES` is set.
#[cfg(feature = "elasticsearch")]
fn service(var: &str) -> Result<Option<String>> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_owned())),
        _ => {
            ensure!(
                std::env::var_os("SIFT_TEST_REQUIRE_SERVICES").is_none(),
                "{var} is unset but SIFT_TEST_REQUIRE_SERVICES demands every real backend"
            );
            eprintln!("SKIPPED: {var} is unset, so this real-backend test did not run");
            Ok(None)
        }
    }
}

/// The same people in OpenSearch/Elasticsearch and in the embedded index:
/// the blocking query and the scores give the same decisions on both.
#[cfg(feature = "elasticsearch")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_on_elasticsearch_decides_like_the_embedded_index() -> Result<()> {
    use sift::backends::search::elasticsearch::ElasticsearchIndex;
    let Some(url) = service("SIFT_TEST_ES")? else {
        return Ok(());
    };
    let url = if url.contains("://") {
        url
    } else {
        format!("http://{url}")
    };
    let dir = tempfile::tempdir()?;
    let (embedded, profiles) = small_world(dir.path(), 5_000, 400).await?;
    let es = ElasticsearchIndex::connect(&sift::config::ElasticsearchConfig {
        url,
        ..Default::default()
    })
    .await?;
    let index = format!("dbusa-match-{}", rand::random::<u32>());
    es.ensure_index(&sift::dbusa::index::spec(&index)).await?;
    let docs = read_people(&dir.path().join("gen/dbusa.csv"))?
        .iter()
        .map(sift::dbusa::index::person_doc)
        .collect();
    let report = es.bulk(&index, docs).await?;
    ensure!(
        report.failed.is_empty(),
        "{:?}",
        &report.failed[..report.failed.len().min(3)]
    );
    es.refresh(&index).await?;
    let mut es_config = config(dir.path());
    es_config.dbusa.index = index;
    // Enrichment is off here, so the table is never written.
    let answers: Arc<dyn Table> = Arc::new(EmbeddedTable::open(&dir.path().join("answers.redb"))?);
    let (on_es, _) = sift::matching::matcher_on(&es_config, Arc::new(es), answers.clone()).await?;
    let (on_embedded, _) =
        sift::matching::matcher_on(&config(dir.path()), embedded, answers).await?;
    let inputs: Vec<_> = profiles.iter().map(ProfileIn::from).collect();
    let mut same = 0;
    let mut outcomes = Vec::new();
    for p in &inputs {
        let (a, b) = (
            on_es.match_profile(p).await?,
            on_embedded.match_profile(p).await?,
        );
        if a.dbusa_id == b.dbusa_id {
            same += 1;
        }
        outcomes.push(a);
    }
    let agree = same as f64 / inputs.len() as f64;
    let report = evaluate(&profiles, &outcomes, &[]);
    eprintln!(
        "elasticsearch: {} decisions of {} agree with the embedded index\n{}",
        same,
        inputs.len(),
        table(&report)
    );
    ensure!(
        agree >= 0.98,
        "only {same} of {} decisions agree",
        inputs.len()
    );
    ensure!(
        report.overall.precision >= 0.98 && report.overall.recall >= 0.70,
        "{:?}",
        report.overall
    );
    Ok(())
}
