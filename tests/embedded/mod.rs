//! Opening the embedded backends of a test's data directory, shared by the
//! integration tests that run stages on them and `sift` processes beside
//! them.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use sift::backends::log::{EmbeddedLog, LogError};
use sift::config::EmbeddedLogConfig;

/// Opens the log under `dir`, waiting up to 10 s for a process that just
/// exited to release its lock (it may hold it for one more sync).
#[allow(dead_code)]
pub fn open_log(dir: &Path) -> Result<Arc<EmbeddedLog>> {
    open_log_with(dir, Default::default())
}

/// [`open_log`] with other log settings.
pub fn open_log_with(dir: &Path, opts: EmbeddedLogConfig) -> Result<Arc<EmbeddedLog>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match EmbeddedLog::open(&dir.join("log"), opts.clone()) {
            Err(LogError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return Ok(Arc::new(other?)),
        }
    }
}

/// Waits until no handle of this process holds the embedded log's lock: the
/// last one may be released by the log's flusher thread a sync after the
/// test dropped it, and a `sift` process started meanwhile finds it in use.
#[allow(dead_code)]
pub fn wait_unlocked(dir: &Path) -> Result<()> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("log").join(".lock"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock.try_lock().is_err() {
        ensure!(Instant::now() < deadline, "the log stayed locked");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The record ingest produces on `sift.raw` for an envelope: keyed by its
/// id, with its raw headers.
#[allow(dead_code)]
pub fn raw_record(env: &sift::envelope::Envelope) -> Result<sift::backends::log::Record> {
    Ok(sift::backends::log::Record {
        key: Some(env.id.clone().into()),
        value: serde_json::to_vec(env)?.into(),
        headers: env.raw_headers(),
    })
}

/// SIGKILLs of a stage's process while it works through `total` records,
/// and how many of them cut the work short.
#[allow(dead_code)]
pub struct Kills {
    total: u64,
    interrupted: u32,
}

#[allow(dead_code)]
impl Kills {
    /// No kills yet, of a stage with `total` records to get through.
    pub fn new(total: usize) -> Self {
        Kills {
            total: total as u64,
            interrupted: 0,
        }
    }

    /// SIGKILLs `child`, which must still be running, waits for it, and
    /// reads how many records `group` has committed on `topic` of the log
    /// under `dir` (printed with `label`); the log is closed again, and its
    /// lock given time to go, before this returns.
    pub async fn kill(
        &mut self,
        child: &mut std::process::Child,
        dir: &Path,
        group: &str,
        topic: &str,
        label: &str,
    ) -> Result<u64> {
        use sift::backends::log::Log;
        ensure!(
            child.try_wait()?.is_none(),
            "{label}: the process exited before it was killed"
        );
        child.kill()?; // SIGKILL
        child.wait()?;
        let log = open_log(dir)?;
        let committed: u64 = log
            .committed(group, topic)
            .await?
            .iter()
            .map(|(_, c)| {
                c.as_ref()
                    .map_or(0, |c| c.as_u64().expect("a dense offset"))
            })
            .sum();
        drop(log);
        std::thread::sleep(Duration::from_millis(300));
        eprintln!("{label}: {committed} of {} committed", self.total);
        if committed < self.total {
            self.interrupted += 1;
        }
        Ok(committed)
    }

    /// At least one kill must have cut the work short for a test to mean anything.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.interrupted > 0,
            "every kill came after the work was done"
        );
        Ok(())
    }
}

/// The value of the first series starting with `series` (name and labels,
/// e.g. `sift_pipeline_documents_total{stage="infer"}`) on the `/metrics`
/// a `sift` process serves on `port`; 0 when it has none yet.
#[allow(dead_code)]
pub fn metric(port: u16, series: &str) -> Result<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Waits, at most `within`, until `series` on `port` is above 0 while
/// `child` keeps running.
#[allow(dead_code)]
pub fn wait_for_metric(
    child: &mut std::process::Child,
    port: u16,
    series: &str,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    while metric(port, series).unwrap_or(0) == 0 {
        ensure!(
            child.try_wait()?.is_none(),
            "the process exited before {series} moved"
        );
        ensure!(
            Instant::now() < deadline,
            "{series} did not move in {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The config of a test on the embedded backends under `dir`, with no
/// `/metrics` server.
#[allow(dead_code)]
pub fn config(dir: &Path) -> sift::config::Config {
    let mut c = sift::config::Config {
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    c.telemetry.metrics_addr = String::new();
    c
}

/// Starts a stage's `sift` command: with `once`, a `--once --json` pass
/// whose summary is read from stdout; else the daemon, stdout discarded.
/// Warnings and errors go to the test's stderr.
#[allow(dead_code)]
pub fn spawn_stage(cmd: &mut std::process::Command, once: bool) -> Result<std::process::Child> {
    use std::process::Stdio;
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if once {
        cmd.arg("--once").arg("--json").stdout(Stdio::piped());
    } else {
        cmd.stdout(Stdio::null());
    }
    Ok(cmd.spawn()?)
}

/// Every record of `topic`, partition by partition in offset order.
#[allow(dead_code)]
pub async fn read_all(
    log: &dyn sift::backends::log::Log,
    topic: &str,
) -> Result<Vec<sift::backends::log::Message>> {
    let mut out = Vec::new();
    for w in log.watermarks(topic).await? {
        let mut at = w.low;
        while at < w.high {
            let got = log.fetch(topic, w.partition, &at, 1000).await?;
            let Some(last) = got.last() else { break };
            at = last.offset.next();
            out.extend(got);
        }
    }
    Ok(out)
}
