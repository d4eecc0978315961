//! Injected disk failures, for the tests of the embedded log under a disk
//! that fails: a write that stops part-way with ENOSPC, a sync that fails
//! with EIO. A test arms a failure for files under one directory, so tests
//! running side by side do not see each other's; the armed failures are
//! spent by the next matching calls. With nothing armed each call costs one
//! relaxed atomic load.
//!
//! The log's own writes go through [`write_all_at`] and [`sync_data`]:
//! segment appends, the reservation file, the group offsets file and the
//! background syncs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// Which call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// A write: half of it reaches the file, then ENOSPC.
    Write,
    /// A sync: EIO.
    Sync,
}

struct Armed {
    under: PathBuf,
    op: DiskOp,
    left: u32,
}

static ANY: AtomicBool = AtomicBool::new(false);
static ARMED: Mutex<Vec<Armed>> = Mutex::new(Vec::new());

/// Makes the next `count` calls of kind `op` on files under `under` fail.
pub fn inject(under: &Path, op: DiskOp, count: u32) {
    let mut armed = ARMED.lock();
    armed.push(Armed {
        under: under.to_path_buf(),
        op,
        left: count,
    });
    ANY.store(true, Ordering::Release);
}

/// Disarms every failure under `under`; returns how many were not spent.
pub fn clear(under: &Path) -> u32 {
    let mut armed = ARMED.lock();
    let left = armed
        .iter()
        .filter(|a| a.under.starts_with(under))
        .map(|a| a.left)
        .sum();
    armed.retain(|a| !a.under.starts_with(under));
    ANY.store(!armed.is_empty(), Ordering::Release);
    left
}

/// Whether a call of kind `op` on `path` is to fail (and spends it).
fn fails(path: &Path, op: DiskOp) -> bool {
    if !ANY.load(Ordering::Acquire) {
        return false;
    }
    let mut armed = ARMED.lock();
    let Some(i) = armed
        .iter()
        .position(|a| a.op == op && a.left > 0 && path.starts_with(&a.under))
    else {
        return false;
    };
    armed[i].left -= 1;
    if armed[i].left == 0 {
        armed.remove(i);
        ANY.store(!armed.is_empty(), Ordering::Release);
    }
    true
}

/// `file.write_all_at(buf, pos)`, or half of it and ENOSPC when armed.
pub(super) fn write_all_at(file: &File, path: &Path, buf: &[u8], pos: u64) -> std::io::Result<()> {
    if fails(path, DiskOp::Write) {
        file.write_all_at(&buf[..buf.len() / 2], pos)?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "no space left on device (injected)",
        ));
    }
    file.write_all_at(buf, pos)
}

/// `file.sync_data()`, or EIO when armed.
pub(super) fn sync_data(file: &File, path: &Path) -> std::io::Result<()> {
    if fails(path, DiskOp::Sync) {
        return Err(std::io::Error::other(
            "input/output error on sync (injected)",
        ));
    }
    file.sync_data()
}
