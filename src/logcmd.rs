//! The log commands that look after the log itself: `sift topics describe`,
//! `sift topics offsets` and `sift log check`.
//!
//! Reading commands open the embedded log read-only
//! ([`crate::backends::open_log_read_only`]), so they never change a file,
//! damaged ones included, and run beside the daemons.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::backends::log::{check, Commit, EmbeddedLog, Offset};
use crate::config::{Config, LogBackend};

/// `sift log …`.
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Check every segment, index, reservation and offsets file of the
    /// embedded log; exits non-zero when anything is wrong.
    Check {
        /// Move damaged ranges to quarantine files, rewrite stale indexes,
        /// set unreadable offsets files aside (stop the stages first).
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where `--reset-to` moves a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetTo {
    /// Each partition's earliest stored offset.
    Earliest,
    /// Each partition's end.
    Latest,
    /// This offset in every partition named.
    Offset(Offset),
}

impl std::str::FromStr for ResetTo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "earliest" => Ok(ResetTo::Earliest),
            "latest" => Ok(ResetTo::Latest),
            n => n
                .parse()
                .map(ResetTo::Offset)
                .map_err(|_| format!("`{s}` is not earliest, latest or an offset")),
        }
    }
}

fn embedded_dir(config: &Config, what: &str) -> anyhow::Result<PathBuf> {
    if config.log.backend != LogBackend::Embedded {
        bail!("{what} is for the embedded log; this configuration uses another log backend");
    }
    Ok(config.data_dir.join("log"))
}

/// `sift log check [--repair]`; an error when problems remain.
pub fn log_command(config: &Config, cmd: LogCommand) -> anyhow::Result<()> {
    let LogCommand::Check { repair, json } = cmd;
    let dir = embedded_dir(config, "`sift log check`")?;
    let report = check::check(&dir, repair)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: {} topics, {} partitions, {} segments, {} records, {} groups",
            report.dir.display(),
            report.topics,
            report.partitions,
            report.segments,
            report.records,
            report.groups
        );
        for q in &report.quarantined {
            println!("quarantined earlier: {}", q.display());
        }
        for p in &report.problems {
            let place = match (&p.topic, p.partition) {
                (Some(t), Some(n)) => format!("{t}/{n} "),
                (Some(t), None) => format!("{t} "),
                _ => String::new(),
            };
            let offsets = p
                .offsets
                .as_ref()
                .map_or(String::new(), |o| format!("offsets {o}: "));
            println!("PROBLEM {place}{offsets}{} ({})", p.what, p.file.display());
            if let Some(r) = &p.repaired {
                println!("  repaired: {r}");
            }
        }
        if report.problems.is_empty() {
            println!("no problems");
        }
    }
    let left = report.unrepaired();
    if left > 0 {
        bail!(
            "{left} problem(s) in the log{}",
            if repair {
                " that --repair cannot fix"
            } else {
                "; `sift log check --repair` fixes what it can (stop the stages first)"
            }
        );
    }
    Ok(())
}

/// `sift topics describe [TOPIC]`: partitions, offsets, segments, and the
/// quarantine files and damage of the embedded log.
pub async fn describe(config: &Config, topic: Option<&str>, json: bool) -> anyhow::Result<()> {
    if config.log.backend != LogBackend::Embedded {
        let log = crate::backends::open_log_read_only(config).await?;
        let mut rows = Vec::new();
        for t in log.list_topics().await? {
            if topic.is_some_and(|name| name != t.name) {
                continue;
            }
            for w in log.watermarks(&t.name).await? {
                rows.push(serde_json::json!({
                    "topic": t.name, "partition": w.partition, "low": w.low, "high": w.high,
                }));
            }
        }
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let log =
        EmbeddedLog::open_read_only(&config.data_dir.join("log"), config.log.embedded.clone())?;
    let reports: Vec<_> = log
        .describe()?
        .into_iter()
        .filter(|r| topic.is_none_or(|t| t == r.topic))
        .collect();
    if let Some(t) = topic {
        if reports.is_empty() {
            bail!("topic `{t}` does not exist");
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    println!(
        "{:<28} {:>4} {:>12} {:>12} {:>12} {:>5} {:>12}",
        "TOPIC", "PART", "LOW", "HIGH", "RESERVED", "SEGS", "BYTES"
    );
    for r in &reports {
        println!(
            "{:<28} {:>4} {:>12} {:>12} {:>12} {:>5} {:>12}",
            r.topic, r.partition, r.low, r.high, r.reserved, r.segments, r.bytes
        );
        for (file, bytes) in &r.quarantined {
            println!("  quarantined: {} ({bytes} bytes)", file.display());
        }
        for d in r
            .damaged
            .iter()
            .filter(|d| d.quarantine.is_none() && d.bytes == 0)
        {
            println!("  MISSING: offsets {}: {}", d.offsets(), d.detail);
        }
        for d in r
            .damaged
            .iter()
            .filter(|d| d.quarantine.is_none() && d.bytes > 0)
        {
            println!(
                "  DAMAGED (not repaired): {} at byte {}, {} bytes, offsets {}: {}; \
                 `sift log check --repair` moves it to a quarantine file",
                d.segment.display(),
                d.position,
                d.bytes,
                d.offsets(),
                d.detail
            );
        }
    }
    Ok(())
}

/// `sift topics offsets GROUP [--topic T] [--reset-to …]`: a group's
/// committed offsets beside each partition's stored range; with
/// `--reset-to`, moves them (no member of the group may be running).
pub async fn offsets(
    config: &Config,
    group: &str,
    topic: Option<&str>,
    reset_to: Option<ResetTo>,
) -> anyhow::Result<()> {
    let log = match reset_to {
        Some(_) => crate::backends::open_log(config).await?,
        None => crate::backends::open_log_read_only(config).await?,
    };
    let topics: Vec<String> = match topic {
        Some(t) => vec![t.to_owned()],
        None => log
            .list_topics()
            .await?
            .into_iter()
            .map(|t| t.name)
            .collect(),
    };
    let mut commits = Vec::new();
    println!(
        "{:<28} {:>4} {:>12} {:>12} {:>12} {:>10}",
        "TOPIC", "PART", "LOW", "HIGH", "COMMITTED", "LAG"
    );
    for t in &topics {
        let marks = log.watermarks(t).await?;
        let committed = log.committed(group, t).await?;
        for w in &marks {
            let c = committed
                .iter()
                .find(|(p, _)| *p == w.partition)
                .and_then(|(_, c)| c.clone());
            if reset_to.is_none() && c.is_none() && topic.is_none() {
                continue;
            }
            let lag = match &c {
                Some(c) if *c > w.high => format!("BEYOND END by {}", w.high.until(c)),
                Some(c) if *c < w.low => format!("BELOW START by {}", c.until(&w.low)),
                Some(c) => log.count(t, w.partition, c, &w.high).await?.to_string(),
                None => "-".to_owned(),
            };
            println!(
                "{:<28} {:>4} {:>12} {:>12} {:>12} {:>10}",
                t,
                w.partition,
                w.low,
                w.high,
                c.map_or("-".to_owned(), |c| c.to_string()),
                lag
            );
            if let Some(to) = &reset_to {
                let next_offset = match to {
                    ResetTo::Earliest => w.low.clone(),
                    ResetTo::Latest => w.high.clone(),
                    ResetTo::Offset(o) => o.clone().clamp(w.low.clone(), w.high.clone()),
                };
                commits.push(Commit {
                    topic: t.clone(),
                    partition: w.partition,
                    next_offset,
                });
            }
        }
    }
    if reset_to.is_some() {
        if topic.is_none() {
            bail!("--reset-to needs --topic: name the topic whose offsets to move");
        }
        log.set_committed(group, &commits)
            .await
            .with_context(|| format!("moving group `{group}`"))?;
        for c in &commits {
            println!(
                "group {group}: {}/{} now at {}",
                c.topic, c.partition, c.next_offset
            );
        }
    }
    Ok(())
}
