//! The embedded log under damage, through the `sift` binary: a torn tail, a
//! flipped byte in the active segment and in a sealed one, an unreadable
//! offsets file and a committed offset beyond the end. In every case no
//! record is skipped silently: it is read, or it is in a quarantine file
//! and reported (log, metric, `sift topics describe`, `sift log check`, a
//! dead letter); read-only commands change no file; and a one-pass run
//! that cannot go on exits non-zero with the fix instead of hanging.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sift::backends::log::{EmbeddedLog, Log, Offset, Record};
use sift::envelope::{self, headers, topics, Envelope, SCHEMA_VERSION};

mod embedded;
use embedded::{open_log_with, wait_unlocked};

/// `sift --data-dir DIR ARGS…` with small clean batches and no metrics server.
fn sift(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    Ok(command(dir, args, env)?.output()?)
}

/// The command [`sift`] runs.
fn command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Command> {
    let config = dir.join("sift.toml");
    if !config.exists() {
        std::fs::write(&config, "")?;
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sift"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("SIFT__TELEMETRY__METRICS_ADDR", "")
        .env("SIFT__CLEAN__BATCH_SIZE", "20")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `sift clean --once --json`: its summary's `consumed`.
fn clean_once(dir: &Path, env: &[(&str, &str)]) -> Result<u64> {
    let out = sift(dir, &["clean", "--once", "--json"], env)?;
    ensure!(
        out.status.success(),
        "sift clean --once failed: {}",
        text(&out)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    summary["consumed"].as_u64().context("consumed")
}

/// Produces `n` raw documents numbered from `from` to a one-partition
/// `sift.raw`, 10 a call; returns their ids.
async fn produce(dir: &Path, from: usize, n: usize) -> Result<BTreeSet<String>> {
    produce_in(dir, from, n, Default::default()).await
}

/// [`produce`] through a log opened with `opts` (a small `segment_bytes`
/// makes sealed segments).
async fn produce_in(
    dir: &Path,
    from: usize,
    n: usize,
    opts: sift::config::EmbeddedLogConfig,
) -> Result<BTreeSet<String>> {
    let log = open_log_with(dir, opts)?;
    log.create_topic(topics::RAW, 1).await?;
    let mut ids = BTreeSet::new();
    let mut records = Vec::new();
    for i in from..from + n {
        let url = format!("https://site.example.com/page/{i}");
        let env = Envelope {
            v: SCHEMA_VERSION,
            id: envelope::document_id("site", &url),
            source: "site".into(),
            url,
            fetched_at_ms: 1_700_000_000_000,
            content_type: "text/html".into(),
            title: format!("Page {i}"),
            text: Some(format!(
                "Page number {i} tells a story of its own about ships, harbours and \
                 the people who sail between them, word {i} after word {}.",
                i * 7
            )),
            body_uri: None,
            metadata: BTreeMap::new(),
        };
        ids.insert(env.id.clone());
        records.push(embedded::raw_record(&env)?);
        if records.len() == 10 {
            log.produce(topics::RAW, std::mem::take(&mut records))
                .await?;
        }
    }
    log.produce(topics::RAW, records).await?;
    drop(log);
    wait_unlocked(dir)?;
    Ok(ids)
}

/// Keys of every record of `topic`, read without changing a file.
async fn keys(dir: &Path, topic: &str) -> Result<Vec<String>> {
    let log = EmbeddedLog::open_read_only(&dir.join("log"), Default::default())?;
    let mut out = Vec::new();
    for w in log.watermarks(topic).await? {
        let mut at = w.low;
        loop {
            let batch = log.fetch(topic, w.partition, &at, 1000).await?;
            let Some(last) = batch.last() else { break };
            at = last.offset.next();
            out.extend(batch.iter().map(|m| {
                String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned()
            }));
        }
    }
    Ok(out)
}

/// The segment files of `sift.raw` partition 0, oldest first.
fn segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.join("log").join(topics::RAW).join("0"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segs.sort();
    Ok(segs)
}

/// Every file under the log folder with its bytes.
fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.join("log")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != ".lock") {
                out.insert(p.clone(), std::fs::read(&p)?);
            }
        }
    }
    Ok(out)
}

fn flip(path: &Path, at: u64) -> Result<()> {
    let mut bytes = std::fs::read(path)?;
    bytes[at as usize] ^= 0x5a;
    std::fs::write(path, bytes)?;
    Ok(())
}

fn quarantine_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(
        std::fs::read_dir(dir.join("log").join(topics::RAW).join("0"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".quarantine"))
            .collect(),
    )
}

/// 5 bytes cut from the end of a segment whose last record was consumed and
/// committed: the next records get offsets above it, so the consumer reads
/// every one of them (before, one of 60 vanished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_tail_skips_no_new_record() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    produce(d, 0, 100).await?;
    ensure!(clean_once(d, &[])? == 100);
    let seg = segments(d)?.pop().context("a segment")?;
    let len = std::fs::metadata(&seg)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)?
        .set_len(len - 5)?;

    // A reading command notices and changes nothing.
    let before = snapshot(d)?;
    let out = sift(d, &["topics", "describe", topics::RAW], &[])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("DAMAGED"),
        "{}",
        text(&out)
    );
    ensure!(
        snapshot(d)? == before,
        "sift topics describe changed the log"
    );

    // The writer's recovery quarantines the torn record; 60 new ones all arrive.
    ensure!(clean_once(d, &[])? == 0);
    ensure!(
        quarantine_files(d)?.len() == 1,
        "{:?}",
        quarantine_files(d)?
    );
    let fresh = produce(d, 1000, 60).await?;
    ensure!(clean_once(d, &[])? == 60, "a new record was skipped");
    let cleaned: BTreeSet<String> = keys(d, topics::CLEAN).await?.into_iter().collect();
    ensure!(
        fresh.is_subset(&cleaned),
        "not every new record was cleaned"
    );

    let out = sift(d, &["log", "check"], &[])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("quarantined earlier"),
        "{}",
        text(&out)
    );
    Ok(())
}

/// A flipped byte in the middle of the active segment: read-only commands
/// change nothing (before, `sift topics list` cut the file and deleted 94
/// intact records); `sift log check` reports it and exits non-zero;
/// `--repair` moves the one bad record aside and keeps every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_loses_one_record_and_deletes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let ids = produce(d, 0, 200).await?;
    let seg = segments(d)?.pop().context("a segment")?;
    let len = std::fs::metadata(&seg)?.len();
    flip(&seg, len / 2)?;

    let before = snapshot(d)?;
    for args in [
        &["topics", "list"][..],
        &["topics", "describe"],
        &["topics", "tail", topics::RAW, "-n", "1000"],
        &["dlq", "list"],
        &["topics", "offsets", "sift-clean"],
    ] {
        let out = sift(d, args, &[])?;
        ensure!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let out = sift(d, &["log", "check"], &[])?;
    ensure!(!out.status.success(), "log check passed a damaged log");
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        report.contains("sift.raw/0") && report.contains("PROBLEM"),
        "{}",
        text(&out)
    );
    ensure!(snapshot(d)? == before, "a reading command changed the log");

    let out = sift(d, &["log", "check", "--repair"], &[])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(quarantine_files(d)?.len() == 1);
    let kept = keys(d, topics::RAW).await?;
    ensure!(kept.len() == 199, "{} of 200 records kept", kept.len());
    ensure!(kept.iter().all(|k| ids.contains(k)));
    let out = sift(d, &["log", "check"], &[])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(clean_once(d, &[])? == 199);
    Ok(())
}

/// A flipped byte in a sealed segment, found when read: with
/// `log.on_corruption = "fail"` a one-pass run exits non-zero and names the
/// fix (before, it retried forever); with `"skip"` the range is quarantined,
/// a dead letter names its offsets, and every other record is cleaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_in_a_sealed_segment_fails_or_is_dead_lettered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::write(
        d.join("sift.toml"),
        "[log.embedded]\nsegment_bytes = 8192\n",
    )?;
    let small = sift::config::EmbeddedLogConfig {
        segment_bytes: 8192,
        ..Default::default()
    };
    let ids = produce_in(d, 0, 200, small).await?;
    let segs = segments(d)?;
    ensure!(segs.len() > 2, "{} segments", segs.len());
    flip(&segs[0], 300)?;

    let started = Instant::now();
    let out = sift(d, &["clean", "--once", "--json"], &[])?;
    ensure!(
        !out.status.success(),
        "a corrupt record was passed over: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("corrupt") && err.contains("sift log check --repair"),
        "{}",
        text(&out)
    );
    ensure!(
        started.elapsed() < Duration::from_secs(120),
        "gave up only after {:?}",
        started.elapsed()
    );

    let skip = [("SIFT__LOG__ON_CORRUPTION", "skip")];
    let consumed = clean_once(d, &skip)?;
    let cleaned: BTreeSet<String> = keys(d, topics::CLEAN).await?.into_iter().collect();
    let missing: Vec<&String> = ids.difference(&cleaned).collect();
    ensure!(
        missing.len() == 1 && consumed == 199,
        "consumed {consumed}, missing {missing:?}"
    );
    let out = sift(d, &["dlq", "list", "--json"], &[])?;
    ensure!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    ensure!(
        listing.contains("log_corruption") && listing.contains("sift.raw/0: offsets"),
        "no dead letter names the quarantined range: {listing}"
    );
    ensure!(quarantine_files(d)?.len() == 1);
    Ok(())
}

/// An empty offsets file (left by a crash on a file system that lost its
/// contents): a one-pass run exits non-zero naming it (before, it hung);
/// `sift log check` names it; `--repair` sets it aside, and the group reads
/// everything again rather than skip anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_offsets_file_stops_a_run_until_repaired() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    produce(d, 0, 50).await?;
    ensure!(clean_once(d, &[])? == 50);
    let offsets = d.join("log").join("~offsets").join("sift-clean.json");
    std::fs::write(&offsets, b"")?;

    let out = sift(d, &["clean", "--once", "--json"], &[])?;
    ensure!(!out.status.success(), "{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("sift-clean.json"),
        "{}",
        text(&out)
    );
    let out = sift(d, &["log", "check"], &[])?;
    ensure!(!out.status.success(), "{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("group `sift-clean`"),
        "{}",
        text(&out)
    );
    let out = sift(d, &["log", "check", "--repair"], &[])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(clean_once(d, &[])? == 50, "the group did not start again");
    Ok(())
}

/// A committed offset beyond the end: `fail` stops the run and names `sift
/// topics offsets`; the command shows it and moves the group; `earliest`
/// reads everything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_offset_beyond_the_end_is_never_skipped_silently() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    produce(d, 0, 50).await?;
    ensure!(clean_once(d, &[])? == 50);
    let offsets = d.join("log").join("~offsets").join("sift-clean.json");
    std::fs::write(&offsets, br#"{"sift.raw":{"0":500}}"#)?;
    produce(d, 100, 10).await?;

    let out = sift(d, &["clean", "--once", "--json"], &[])?;
    ensure!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("beyond its end") && err.contains("sift topics offsets sift-clean"),
        "{}",
        text(&out)
    );
    let out = sift(d, &["topics", "offsets", "sift-clean"], &[])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("BEYOND END"),
        "{}",
        text(&out)
    );
    let out = sift(
        d,
        &[
            "topics",
            "offsets",
            "sift-clean",
            "--topic",
            topics::RAW,
            "--reset-to",
            "50",
        ],
        &[],
    )?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        clean_once(d, &[])? == 10,
        "the 10 new records were not read"
    );

    std::fs::write(&offsets, br#"{"sift.raw":{"0":900}}"#)?;
    let earliest = [("SIFT__LOG__ON_OFFSET_OUT_OF_RANGE", "earliest")];
    ensure!(clean_once(d, &earliest)? == 60);
    Ok(())
}

/// A bad record near the log's 1 MB is too large to carry beside its dead
/// letter's headers: its value is claim-checked in the object store, the
/// letter names where, and `sift dlq replay` brings the record back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_bad_record_is_replayed_from_its_claim_check() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let value: Vec<u8> = (0..1_040_000u32).map(|i| b'a' + (i % 23) as u8).collect();
    {
        let log = open_log_with(d, Default::default())?;
        log.create_topic(topics::RAW, 1).await?;
        log.produce(
            topics::RAW,
            vec![Record::new("huge", value.clone()).header(headers::SOURCE, "site")],
        )
        .await?;
    }
    wait_unlocked(d)?;
    ensure!(clean_once(d, &[])? == 1);

    let out = sift(d, &["dlq", "list", "--json"], &[])?;
    ensure!(out.status.success(), "{}", text(&out));
    let listing: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    let letter = &listing["latest"][0];
    ensure!(letter["reason"] == "bad_json", "{listing:#}");
    let at = letter["original_at"].as_str().context("no original_at")?;
    ensure!(at.starts_with("objects:dlq/clean/"), "{at}");
    ensure!(letter["replay_to"] == topics::RAW, "{listing:#}");

    let out = sift(d, &["dlq", "replay", "--json"], &[])?;
    ensure!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    ensure!(summary["replayed"][topics::RAW] == 1, "{summary:#}");

    let log = EmbeddedLog::open_read_only(&d.join("log"), Default::default())?;
    let back = log.fetch(topics::RAW, 0, &Offset::new(1), 10).await?;
    ensure!(back.len() == 1, "{} records after the original", back.len());
    ensure!(back[0].key.as_deref() == Some(&b"huge"[..]));
    ensure!(
        back[0].value.as_ref() == value.as_slice(),
        "the value came back changed"
    );
    ensure!(back[0].header(headers::SOURCE).map(|v| v.as_ref()) == Some(&b"site"[..]));
    ensure!(back[0].header(headers::REPLAY).map(|v| v.as_ref()) == Some(&b"dlq:clean"[..]));
    Ok(())
}

/// A small tmpfs mounted over a temporary directory, unmounted on drop;
/// None where this machine does not let the test mount one.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(bytes: u64) -> Result<Option<SmallFs>> {
        let dir = tempfile::tempdir()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(Some(SmallFs { dir })),
            _ => Ok(None),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes a file until the disk is full, then gives back `keep` bytes.
fn fill(path: &Path, keep: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let block = vec![0u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    f.set_len(written.saturating_sub(keep))?;
    f.sync_all()?;
    Ok(())
}

/// A full disk, with a real write error from the kernel, two ways: on a
/// small tmpfs (ENOSPC), where this machine lets the test mount one; else
/// under a file size limit (`RLIMIT_FSIZE`, EFBIG), which needs no
/// privilege. A one-pass run stops with the error (exit 1, after its
/// bounded retries) and commits nothing it did not store; once there is
/// room, the next run delivers every document. Delivery is at least once: a
/// produce that failed on one partition after another took it is produced
/// again, so a record may be there twice, never missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_a_run_and_loses_nothing() -> Result<()> {
    full_disk(None).await.context("under a file size limit")?;
    match SmallFs::mount(32 << 20)? {
        Some(small) => full_disk(Some(small)).await.context("on a full tmpfs"),
        None => {
            eprintln!("no tmpfs case: this machine does not let the test mount one");
            Ok(())
        }
    }
}

async fn full_disk(small: Option<SmallFs>) -> Result<()> {
    let plain = tempfile::tempdir()?;
    let d = small.as_ref().map_or(plain.path(), SmallFs::path);
    // Every document is kept: the near-duplicate filter is off.
    let env = [("SIFT__CLEAN__NEAR_DUPLICATE_BITS", "0")];
    let mut ids = produce(d, 0, 100).await?;
    ensure!(clean_once(d, &env)? == 100);
    ids.extend(produce(d, 1000, 400).await?);
    // Room for some of the new documents, not all.
    let room = 48 * 1024;
    let mut cmd = command(d, &["clean", "--once", "--json"], &env)?;
    let filler = d.join("filler");
    let want = match &small {
        Some(_) => {
            fill(&filler, room)?;
            "No space left on device"
        }
        None => {
            let limit = largest_file(&d.join("log").join(topics::CLEAN))? + room;
            limit_file_size(&mut cmd, limit);
            "File too large"
        }
    };
    let out = cmd.output()?;
    ensure!(
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains(want)
            && String::from_utf8_lossy(&out.stderr).contains("gave up"),
        "not a clean stop on a full disk: {}",
        text(&out)
    );
    // The failed appends were taken back: no torn tail to quarantine.
    let out = sift(d, &["log", "check"], &[])?;
    ensure!(out.status.success(), "after the failure: {}", text(&out));
    let _ = std::fs::remove_file(&filler);
    let out = sift(d, &["clean", "--once", "--json"], &env)?;
    ensure!(out.status.success(), "{}", text(&out));
    let got = keys(d, topics::CLEAN).await?;
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    ensure!(
        unique == ids,
        "{} of {} documents cleaned ({} records)",
        unique.len(),
        ids.len(),
        got.len()
    );
    let out = sift(d, &["log", "check"], &[])?;
    ensure!(out.status.success(), "{}", text(&out));
    Ok(())
}

/// The size of the largest file under `dir`.
fn largest_file(dir: &Path) -> Result<u64> {
    let mut largest = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        largest = largest.max(if m.is_dir() {
            largest_file(&e.path())?
        } else {
            m.len()
        });
    }
    Ok(largest)
}

/// Runs `cmd` under a file size limit, with SIGXFSZ ignored so a write past
/// it fails with EFBIG instead of killing the process.
#[allow(unsafe_code)]
fn limit_file_size(cmd: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let l = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
