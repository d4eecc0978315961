//! `sift log check [--repair]`: an fsck for the embedded log.
//!
//! Reads every segment frame by frame (ignoring the index files), compares
//! the index files with what it read, and reads every partition's
//! reservation and every group's offsets file. It reports each problem with
//! its topic, partition and offsets. With `--repair` (which takes the log's
//! lock, so no stage may be running) it moves damaged ranges to quarantine
//! files as a writer's recovery does, rewrites stale index files, continues
//! a partition whose end was lost above every offset that may have been
//! given out, and sets an unreadable offsets file aside (its group then
//! starts again from the earliest record: records are read again, none is
//! skipped).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::embedded::{
    committed_floors, read_reserved, sync_dir, write_reserved, Reservation, OFFSETS_DIR,
    RESERVED_FILE, TOPIC_META,
};
use super::segment::{self, Segment};
use super::LogError;

/// One thing wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// Topic, where it concerns one.
    pub topic: Option<String>,
    /// Partition, where it concerns one.
    pub partition: Option<u32>,
    /// Offsets it concerns (`a..b`, `a..` when open-ended).
    pub offsets: Option<String>,
    /// What is wrong.
    pub what: String,
    /// What `--repair` did about it; None when nothing was done.
    pub repaired: Option<String>,
}

/// What a check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The log folder.
    pub dir: PathBuf,
    /// Topics read.
    pub topics: usize,
    /// Partitions read.
    pub partitions: usize,
    /// Segment files read.
    pub segments: usize,
    /// Intact records read.
    pub records: u64,
    /// Group offsets files read.
    pub groups: usize,
    /// Quarantine files already there (from earlier repairs).
    pub quarantined: Vec<PathBuf>,
    /// Problems, in the order found.
    pub problems: Vec<Problem>,
}

impl Report {
    /// Problems `--repair` did not fix.
    pub fn unrepaired(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.repaired.is_none())
            .count()
    }
}

/// Checks the embedded log in `dir`; with `repair`, repairs what it can.
pub fn check(dir: &Path, repair: bool) -> Result<Report, LogError> {
    let mut report = Report {
        dir: dir.to_path_buf(),
        ..Report::default()
    };
    if !dir.is_dir() {
        return Ok(report);
    }
    let _lock = if repair {
        let path = dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LogError::io(&path, e))?;
        if lock.try_lock().is_err() {
            return Err(LogError::Locked {
                path: dir.display().to_string(),
            });
        }
        Some(lock)
    } else {
        None
    };
    let floors = committed_floors(dir);
    let mut ends: BTreeMap<(String, u32), (u64, u64)> = BTreeMap::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LogError::io(dir, e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        if name.starts_with('.') || name.starts_with('~') {
            continue;
        }
        if name.contains('~') {
            report.problems.push(Problem {
                file: path.clone(),
                topic: None,
                partition: None,
                offsets: None,
                what: "a topic creation that did not finish (no records were ever in it)".into(),
                repaired: repair.then(|| {
                    let _ = std::fs::remove_dir_all(&path);
                    "removed".to_owned()
                }),
            });
            continue;
        }
        report.topics += 1;
        let partitions = match topic_partitions(&path) {
            Ok(n) => n,
            Err(what) => {
                report.problems.push(Problem {
                    file: path.join(TOPIC_META),
                    topic: Some(name.clone()),
                    partition: None,
                    offsets: None,
                    what,
                    repaired: None,
                });
                continue;
            }
        };
        for id in 0..partitions {
            let pdir = path.join(id.to_string());
            let floor = floors.get(&(name.clone(), id)).copied().unwrap_or(0);
            let (low, high) = check_partition(&pdir, &name, id, floor, repair, &mut report)?;
            ends.insert((name.clone(), id), (low, high));
            report.partitions += 1;
        }
    }
    check_groups(dir, &ends, repair, &mut report)?;
    Ok(report)
}

fn topic_partitions(path: &Path) -> Result<u32, String> {
    let meta = path.join(TOPIC_META);
    let bytes = std::fs::read(&meta).map_err(|e| format!("cannot read {TOPIC_META}: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{TOPIC_META} is not JSON: {e}"))?;
    value
        .get("partitions")
        .and_then(serde_json::Value::as_u64)
        .filter(|n| *n > 0)
        .map(|n| n as u32)
        .ok_or_else(|| format!("{TOPIC_META} names no partition count"))
}

/// Checks one partition; returns its stored offsets (low, high) as a
/// writer would see them after the check (and the repair).
fn check_partition(
    dir: &Path,
    topic: &str,
    id: u32,
    committed: u64,
    repair: bool,
    report: &mut Report,
) -> Result<(u64, u64), LogError> {
    let problem = |file: &Path, offsets: Option<String>, what: String| Problem {
        file: file.to_path_buf(),
        topic: Some(topic.to_owned()),
        partition: Some(id),
        offsets,
        what,
        repaired: None,
    };
    let mut bases = Vec::new();
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) => {
            report.problems.push(problem(
                dir,
                None,
                format!("cannot read the partition folder: {e}"),
            ));
            return Ok((0, 0));
        }
    };
    for entry in listing.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(base) = stem.parse::<u64>() {
                bases.push(base);
            }
        } else if segment::is_quarantine(&name) {
            report.quarantined.push(entry.path());
        }
    }
    bases.sort_unstable();
    let (mut low, mut high) = (bases.first().copied().unwrap_or(0), 0);
    let mut lost_tail = false;
    let mut previous_next = None;
    for (i, base) in bases.iter().copied().enumerate() {
        let active = i + 1 == bases.len();
        let path = segment::segment_path(dir, base);
        report.segments += 1;
        let found = segment::inspect(&path, base)?;
        report.records += found.records;
        if let Some(prev) = previous_next {
            if base < prev {
                report.problems.push(problem(
                    &path,
                    Some(format!("{base}..{prev}")),
                    format!(
                        "starts at offset {base}, below the end {prev} of the segment before it"
                    ),
                ));
            }
        }
        for d in &found.damage {
            let mut p = problem(
                &path,
                Some(d.offsets()),
                format!(
                    "{} bytes at byte {} unreadable: {}",
                    d.bytes, d.position, d.detail
                ),
            );
            if repair {
                p.repaired = Some(format!(
                    "moved to {}",
                    segment::quarantine_path(&path, d.position).display()
                ));
            }
            report.problems.push(p);
        }
        let sealed_stale = !active && found.stale_index && found.damage.is_empty();
        if sealed_stale {
            let mut p = problem(
                &segment::index_path(&path),
                None,
                "the index file does not describe the segment".to_owned(),
            );
            if repair {
                p.repaired = Some("rewritten".to_owned());
            }
            report.problems.push(p);
        }
        if repair && !found.damage.is_empty() {
            let opened = segment::quarantine(&path, base)?;
            if !active {
                opened.segment.seal()?;
            }
        } else if repair && sealed_stale {
            let _ = std::fs::remove_file(segment::index_path(&path));
            let opened = segment::Segment::open(&path, base, false, segment::Repair::Refuse)?;
            opened.segment.seal()?;
        }
        lost_tail = active && found.lost_tail;
        previous_next = Some(found.next);
        high = found.next;
        if i == 0 {
            low = base;
        }
    }
    let stored = read_reserved(dir);
    let reserved = stored.map_or(0, |r| r.reserved).max(high);
    if let Some(closed_at) = stored.and_then(|r| r.closed_at).filter(|c| *c > high) {
        let mut p = problem(
            &dir.join(RESERVED_FILE),
            Some(format!("{high}..{closed_at}")),
            format!(
                "{} records missing at the end: the log was closed with offsets up to {}",
                closed_at - high,
                closed_at - 1
            ),
        );
        if repair {
            p.repaired = Some("noted".to_owned());
        }
        report.problems.push(p);
        lost_tail = true;
    }
    if stored.is_none() && !bases.is_empty() {
        let mut p = problem(
            &dir.join(RESERVED_FILE),
            None,
            "the offset reservation is missing or unreadable".to_owned(),
        );
        if repair {
            let r = Reservation {
                reserved,
                closed_at: None,
            };
            write_reserved(dir, r, true)?;
            p.repaired = Some(format!("written as {reserved}"));
        }
        report.problems.push(p);
    }
    if lost_tail {
        let floor = reserved.max(committed);
        if repair && floor > high {
            // As a writer's recovery does: new records get offsets above any
            // the lost tail may have given out.
            let path = segment::segment_path(dir, *bases.last().unwrap_or(&0));
            let opened = Segment::open(
                &path,
                *bases.last().unwrap_or(&0),
                false,
                segment::Repair::Refuse,
            )?;
            opened.segment.seal()?;
            Segment::create(dir, floor)?;
            let r = Reservation {
                reserved: floor,
                closed_at: Some(floor),
            };
            write_reserved(dir, r, true)?;
            sync_dir(dir)?;
            if let Some(p) = report.problems.iter_mut().rev().find(|p| {
                p.partition == Some(id) && p.topic.as_deref() == Some(topic) && p.offsets.is_some()
            }) {
                p.repaired = Some(format!(
                    "{}; new records continue at offset {floor}",
                    p.repaired.clone().unwrap_or_default()
                ));
            }
            high = floor;
        }
    }
    Ok((low, high))
}

/// Reads every group's offsets file; an unreadable one is set aside with
/// `--repair`, and a committed offset beyond a partition's end is reported.
fn check_groups(
    dir: &Path,
    ends: &BTreeMap<(String, u32), (u64, u64)>,
    repair: bool,
    report: &mut Report,
) -> Result<(), LogError> {
    let folder = dir.join(OFFSETS_DIR);
    let Ok(listing) = std::fs::read_dir(&folder) else {
        return Ok(());
    };
    let mut files: Vec<PathBuf> = listing
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        report.groups += 1;
        let group = file
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let parsed = std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<BTreeMap<String, BTreeMap<u32, u64>>>(&b)
                    .map_err(|e| format!("not an offsets file ({} bytes): {e}", b.len()))
            });
        let stored = match parsed {
            Ok(s) => s,
            Err(why) => {
                let mut p = Problem {
                    file: file.clone(),
                    topic: None,
                    partition: None,
                    offsets: None,
                    what: format!("group `{group}`: {why}"),
                    repaired: None,
                };
                if repair {
                    let aside = file.with_extension("json.quarantine");
                    std::fs::rename(&file, &aside).map_err(|e| LogError::io(&file, e))?;
                    sync_dir(&folder)?;
                    p.repaired = Some(format!(
                        "set aside as {}; the group starts again from the earliest records",
                        aside.display()
                    ));
                }
                report.problems.push(p);
                continue;
            }
        };
        for (topic, parts) in stored {
            for (partition, offset) in parts {
                let Some(&(_, high)) = ends.get(&(topic.clone(), partition)) else {
                    continue;
                };
                if offset > high {
                    report.problems.push(Problem {
                        file: file.clone(),
                        topic: Some(topic.clone()),
                        partition: Some(partition),
                        offsets: Some(format!("{high}..{offset}")),
                        what: format!(
                            "group `{group}` has committed offset {offset}, beyond the end {high}; \
                             see `sift topics offsets {group} --topic {topic} --reset-to …`"
                        ),
                        repaired: None,
                    });
                }
            }
        }
    }
    Ok(())
}
