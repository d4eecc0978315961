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

/// A reader that goes away (`sift … | head`, `| true`) ends the command
/// quietly, as other command-line tools end: no panic, no error message, the
/// status a shell gives a tool ended by SIGPIPE.
#[test]
fn a_closed_pipe_ends_a_command_quietly() -> Result<()> {
    use std::process::Stdio;
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    std::fs::write(data.join("page.html"), "<p>hello</p>".repeat(2_000))?;
    for args in [
        &["topics", "create", "sift.example"][..],
        &["objects", "put", "raw/a.html", "page.html"],
        &["objects", "put", "raw/b.html", "page.html"],
    ] {
        let (ok, _, err) = sift(data, args)?;
        ensure!(ok, "{args:?}: {err}");
    }
    for args in [
        &["config", "show"][..],
        &["topics", "list"],
        &["objects", "ls", "raw/"],
        &["objects", "get", "raw/a.html"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sift"))
            .args(args)
            .env("SIFT_DATA_DIR", data)
            .env_remove("SIFT_CONFIG")
            .env("RUST_LOG", "warn")
            .current_dir(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // The reader is gone before the command writes a line.
        drop(child.stdout.take());
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(141) || out.status.success(),
            "{args:?} on a closed pipe exited {:?}: {err}",
            out.status
        );
        ensure!(
            !err.contains("panicked") && !err.contains("error"),
            "{args:?} on a closed pipe was not quiet: {err}"
        );
    }
    Ok(())
}
