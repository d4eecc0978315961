//! The `sift` binary end to end on a temporary data directory.

use std::process::Command;

use anyhow::{ensure, Result};

fn sift(data: &std::path::Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_sift"))
        .args(args)
        .env("SIFT_DATA_DIR", data)
        .env_remove("SIFT_CONFIG")
        .env("RUST_LOG", "warn")
        .current_dir(data)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn run_then_inspect() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let (ok, out, err) = sift(data, &["run", "--limit", "300", "--json"])?;
    ensure!(ok, "sift run failed: {err}");
    let s: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        s["produced"] == 300 && s["stored"] == 300 && s["table_rows"] == 300,
        "{s}"
    );
    ensure!(s["consumed"] == 300, "{s}");

    // A second pass overwrites the same rows: still 300.
    let (ok, out, err) = sift(data, &["run", "--limit", "300", "--json"])?;
    ensure!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(s["table_rows"] == 300 && s["consumed"] == 300, "{s}");

    let (ok, out, err) = sift(data, &["topics", "list", "--json"])?;
    ensure!(ok, "{err}");
    let topics: serde_json::Value = serde_json::from_str(&out)?;
    let raw = topics
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "sift.raw"))
        .cloned();
    ensure!(
        raw.is_some_and(|r| r["stored"] == 600 && r["partitions"] == 4),
        "{topics}"
    );

    let (ok, out, err) = sift(data, &["topics", "tail", "sift.raw", "-p", "0", "-n", "2"])?;
    ensure!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
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

    let (ok, out, err) = sift(data, &["table", "get", "documents", &id, "--family", "m"])?;
    ensure!(ok, "{err}");
    ensure!(
        out.starts_with(&id) && out.contains("m:title") && out.contains("m:url"),
        "{out}"
    );
    let (ok, _, err) = sift(data, &["table", "get", "documents", "no-such-row"])?;
    ensure!(!ok && err.contains("no row"), "{err}");

    let (ok, out, err) = sift(data, &["table", "scan", "documents", "-n", "5", "--json"])?;
    ensure!(ok, "{err}");
    ensure!(out.lines().count() == 5, "{out}");

    std::fs::write(data.join("body.txt"), "hello objects")?;
    let (ok, _, err) = sift(data, &["objects", "put", "a/b/body.txt", "body.txt"])?;
    ensure!(ok, "{err}");
    let (ok, out, _) = sift(data, &["objects", "ls", "a/"])?;
    ensure!(
        ok && out.contains("a/b/body.txt") && out.contains(" 13  "),
        "{out}"
    );
    let (ok, out, _) = sift(data, &["objects", "get", "a/b/body.txt"])?;
    ensure!(ok && out == "hello objects", "{out}");
    let (ok, _, err) = sift(
        data,
        &["objects", "put", "a/b/body.txt", "body.txt", "--if-absent"],
    )?;
    ensure!(!ok && err.contains("changed concurrently"), "{err}");
    Ok(())
}

#[test]
fn config_show_names_origins_and_rejects_typos() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    std::fs::write(
        data.join("sift.toml"),
        "[log.embedded]\nfsync = \"always\"\n",
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_sift"))
        .args(["config", "show"])
        .current_dir(data)
        .env_remove("SIFT_CONFIG")
        .env_remove("SIFT_DATA_DIR")
        .env("SIFT__LOG__DEFAULT_PARTITIONS", "9")
        .env("SIFT__SEARCH__ELASTICSEARCH__PASSWORD", "hunter2-secret")
        .env(
            "SIFT__CACHE__REDIS_URL",
            "redis://:url-secret-42@cache:6379/0",
        )
        .env("SIFT__ENRICH__API_KEY", "key-secret-43")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !text.contains("hunter2-secret") && text.contains("password = \"<redacted>\""),
        "secrets must be redacted: {text}"
    );
    ensure!(
        !text.contains("url-secret-42") && text.contains("redis://:redacted@cache:6379/0"),
        "the password of a URL must be redacted: {text}"
    );
    ensure!(
        !text.contains("key-secret-43"),
        "the enrichment key must be redacted: {text}"
    );
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains("fsync = \"always\"") && text.contains("# file sift.toml"),
        "{text}"
    );
    ensure!(
        text.contains("default_partitions = 9")
            && text.contains("# env SIFT__LOG__DEFAULT_PARTITIONS"),
        "{text}"
    );
    ensure!(
        text.contains("backend = \"embedded\"") && text.contains("# default"),
        "{text}"
    );

    std::fs::write(data.join("sift.toml"), "[log]\nbakend = \"kafka\"\n")?;
    let out = Command::new(env!("CARGO_BIN_EXE_sift"))
        .args(["config", "show"])
        .current_dir(data)
        .env_remove("SIFT_CONFIG")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("unknown field `bakend`"),
        "{err}"
    );

    // A configured backend this build lacks is a clear error naming the
    // feature (only checkable in a build without it).
    #[cfg(not(feature = "kafka"))]
    {
        std::fs::write(data.join("sift.toml"), "[log]\nbackend = \"kafka\"\n")?;
        let out = Command::new(env!("CARGO_BIN_EXE_sift"))
            .args(["topics", "list"])
            .current_dir(data)
            .env_remove("SIFT_CONFIG")
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("--features kafka"),
            "{err}"
        );
    }
    Ok(())
}

/// Every subcommand's `--help` works: clap checks a command's arguments
/// (unique names, valid defaults) only when that command is built.
#[test]
fn every_subcommand_has_help() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ok, top, err) = sift(dir.path(), &["--help"])?;
    ensure!(ok, "{err}");
    let mut commands: Vec<Vec<String>> = Vec::new();
    let names = |help: &str| -> Vec<String> {
        help.split("Commands:")
            .nth(1)
            .unwrap_or_default()
            .split("Options:")
            .next()
            .unwrap_or_default()
            .lines()
            // Command lines are indented two spaces; wrapped descriptions more.
            .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| *w != "help")
            .map(str::to_owned)
            .collect()
    };
    for name in names(&top) {
        commands.push(vec![name]);
    }
    let mut i = 0;
    while i < commands.len() {
        let mut args: Vec<&str> = commands[i].iter().map(String::as_str).collect();
        args.push("--help");
        let (ok, out, err) = sift(dir.path(), &args)?;
        ensure!(ok && out.contains("Usage:"), "{args:?}: {err}");
        let parent = commands[i].clone();
        for sub in names(&out) {
            let mut path = parent.clone();
            path.push(sub);
            commands.push(path);
        }
        i += 1;
    }
    for expected in [
        vec!["train"],
        vec!["classify"],
        vec!["models", "promote"],
        vec!["models", "rollback"],
        vec!["infer"],
        vec!["bench", "model"],
        vec!["bench", "infer"],
    ] {
        ensure!(
            commands.iter().any(|c| c == &expected),
            "{expected:?} not found in {commands:?}"
        );
    }
    Ok(())
}
