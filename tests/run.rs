//! `sift run --once`, the README's first command, on a reduced sample: every
//! stage must process documents, the summary must say so and be right about
//! what landed in the stores, a second run must replay the same documents
//! onto the same rows with the model it trained the first time, and a run
//! where a stage gets nothing must exit non-zero. Then the inspection
//! commands on what the run left behind.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn sift(data: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_sift"))
        .args(args)
        .env("SIFT_DATA_DIR", data)
        .env_remove("SIFT_CONFIG")
        .env("RUST_LOG", "warn")
        // Free ports for everything the run serves, so tests can run side by side.
        .env("SIFT__TELEMETRY__METRICS_ADDR", "")
        .env("SIFT__REVIEW__LISTEN", "127.0.0.1:0")
        .current_dir(data)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The reduced sample: 100 sites (the minimum the run is meant to show),
/// 240 documents, 5,000 people, 2 epochs.
const REDUCED: [&str; 10] = [
    "run",
    "--once",
    "--json",
    "--sites",
    "100",
    "--documents",
    "240",
    "--people",
    "5000",
    "--epochs=2",
];

/// 300 profiles of people in the database and 60 of people who are not.
const PROFILES: [&str; 4] = ["--profiles", "300", "--outsiders", "60"];

/// A port free on the sample web's first address. Runs in one data dir use
/// the same one, so their URLs, and so their document ids, are the same.
fn web_port() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.1.1:0")?;
    Ok(listener.local_addr()?.port().to_string())
}

fn run(data: &Path, port: &str, extra: &[&str]) -> Result<(bool, Value, String)> {
    let mut args: Vec<&str> = REDUCED.to_vec();
    args.extend_from_slice(&["--web-port", port]);
    args.extend_from_slice(extra);
    let (ok, out, err) = sift(data, &args)?;
    let summary: Value = serde_json::from_str(&out)
        .with_context(|| format!("the summary is not JSON:\n{out}\nstderr:\n{err}"))?;
    Ok((ok, summary, err))
}

fn stage<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["stages"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["stage"] == name))
        .unwrap_or(&Value::Null)
}

fn rows(data: &Path, table: &str) -> Result<Vec<Value>> {
    let (ok, out, err) = sift(data, &["table", "scan", table, "-n", "0", "--json"])?;
    ensure!(ok, "{err}");
    Ok(out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

fn has_top5(row: &Value) -> bool {
    row["cells"].as_array().is_some_and(|cells| {
        cells
            .iter()
            .any(|c| c["family"] == "c" && c["qualifier"] == "top5")
    })
}

#[test]
fn run_once_processes_every_stage_then_replays_onto_the_same_rows() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let port = web_port()?;

    let (ok, s, err) = run(data, &port, &PROFILES)?;
    ensure!(ok, "sift run --once failed:\n{s:#}\n{err}");
    ensure!(s["every_stage_processed"] == true, "{s:#}");
    ensure!(s["sites"] == 100 && s["served"] == 240, "{s:#}");
    for name in [
        "ingest",
        "clean",
        "archive",
        "train",
        "infer",
        "dbusa load",
        "match",
        "cache refresh",
    ] {
        ensure!(
            stage(&s, name)["output"].as_u64().unwrap_or(0) > 0,
            "stage {name} put out nothing: {s:#}"
        );
    }
    // Every labeled document on the web arrives, is cleaned and scored.
    ensure!(s["ingest"]["produced"] == 240, "{:#}", s["ingest"]);
    ensure!(s["clean"]["produced"] == 240, "{:#}", s["clean"]);
    ensure!(s["infer"]["scored"] == 240, "{:#}", s["infer"]);
    ensure!(s["archive"]["records"] == 240, "{:#}", s["archive"]);
    ensure!(s["classification"]["documents"] == 240, "{s:#}");
    // The web's deliberately broken items and the malformed profiles are
    // dead letters, by reason.
    let dlq = &s["dead_letters"];
    ensure!(
        dlq["ingest"].as_object().is_some_and(|m| m.len() >= 3),
        "{dlq:#}"
    );
    for reason in ["bad_json", "schema_version", "bad_profile"] {
        ensure!(dlq["match"][reason] == 1, "{dlq:#}");
    }
    // A model was trained on the other share of the sample and is LATEST.
    ensure!(
        s["model"]["trained"] == true && s["model"]["latest"] == true,
        "{:#}",
        s["model"]
    );
    let version = s["model"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(s["infer"]["by_model"][&version] == 240, "{:#}", s["infer"]);
    // Matching against the generated truth.
    let a = &s["identity"]["accuracy"];
    ensure!(a["profiles"] == 360 && a["decided"] == 360, "{a:#}");
    ensure!(
        a["precision"].as_f64().unwrap_or(0.0) >= 0.9 && a["recall"].as_f64().unwrap_or(0.0) >= 0.8,
        "{a:#}"
    );
    ensure!(s["review"]["answered"] == true, "{:#}", s["review"]);
    ensure!(
        s["review"]["user"] == "analyst"
            && s["review"]["password"]
                .as_str()
                .is_some_and(|p| p.len() >= 12),
        "{:#}",
        s["review"]
    );

    // The stores hold what the summary says.
    let documents = rows(data, "documents")?;
    let scored: BTreeSet<&str> = documents
        .iter()
        .filter(|r| has_top5(r))
        .filter_map(|r| r["key"].as_str())
        .collect();
    ensure!(scored.len() == 240, "{} scored rows", scored.len());
    let handles = rows(data, "handles")?;
    ensure!(handles.len() == 360, "{} handles rows", handles.len());

    // Again in the same data dir: the model is reused, the web replayed,
    // and the same documents land on the same rows.
    let (ok, again, err) = run(data, &port, &PROFILES)?;
    ensure!(ok, "second run failed:\n{again:#}\n{err}");
    ensure!(
        again["model"]["trained"] == false && again["model"]["version"] == version.as_str(),
        "{:#}",
        again["model"]
    );
    ensure!(again["ingest"]["produced"] == 240, "{:#}", again["ingest"]);
    ensure!(again["infer"]["scored"] == 240, "{:#}", again["infer"]);
    let documents = rows(data, "documents")?;
    let scored_again: BTreeSet<&str> = documents
        .iter()
        .filter(|r| has_top5(r))
        .filter_map(|r| r["key"].as_str())
        .collect();
    ensure!(scored_again == scored, "the rows changed on replay");

    // A run in which a stage gets nothing exits non-zero and says which.
    let (ok, idle, _) = run(data, &port, &["--profiles", "0", "--outsiders", "0"])?;
    ensure!(!ok, "a run whose match stage decided nothing must fail");
    ensure!(
        idle["idle_stages"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "match")),
        "{idle:#}"
    );

    inspect(data)
}

/// The inspection commands on what the runs left behind.
fn inspect(data: &Path) -> Result<()> {
    let (ok, out, err) = sift(data, &["topics", "list", "--json"])?;
    ensure!(ok, "{err}");
    let topics: Value = serde_json::from_str(&out)?;
    for name in [
        "sift.raw",
        "sift.clean",
        "sift.categorized",
        "sift.dlq",
        "sift.profiles",
        "sift.matches",
    ] {
        ensure!(
            topics.as_array().is_some_and(|a| a
                .iter()
                .any(|t| t["name"] == name && t["stored"].as_u64().unwrap_or(0) > 0)),
            "{name} missing or empty: {topics:#}"
        );
    }

    let (ok, out, err) = sift(data, &["topics", "tail", "sift.raw", "-p", "0", "-n", "2"])?;
    ensure!(ok, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        lines.len() == 2 && lines[0]["offset"] == 0 && lines[1]["offset"] == 1,
        "{out}"
    );
    let id = lines[0]["key"].as_str().unwrap_or_default().to_string();
    ensure!(
        lines[0]["value"]["id"] == id.as_str() && lines[0]["headers"]["sift-schema"] == "1",
        "{out}"
    );

    let (ok, out, err) = sift(data, &["table", "get", "documents", &id])?;
    ensure!(ok, "{err}");
    ensure!(
        out.starts_with(&id) && out.contains("m:title") && out.contains("c:top5"),
        "{out}"
    );
    let (ok, _, err) = sift(data, &["table", "get", "documents", "no-such-row"])?;
    ensure!(!ok && err.contains("no row"), "{err}");

    let (ok, out, err) = sift(data, &["objects", "ls", "raw/"])?;
    ensure!(ok && out.contains(".jsonl.zst"), "{out}{err}");
    std::fs::write(data.join("body.txt"), "hello objects")?;
    let (ok, _, err) = sift(data, &["objects", "put", "a/b/body.txt", "body.txt"])?;
    ensure!(ok, "{err}");
    let (ok, out, _) = sift(data, &["objects", "get", "a/b/body.txt"])?;
    ensure!(ok && out == "hello objects", "{out}");
    let (ok, _, err) = sift(
        data,
        &["objects", "put", "a/b/body.txt", "body.txt", "--if-absent"],
    )?;
    ensure!(!ok && err.contains("changed concurrently"), "{err}");
    Ok(())
}
