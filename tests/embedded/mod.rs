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
