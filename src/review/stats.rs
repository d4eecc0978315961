//! `GET /stats`: reviews per day and per reviewer, how often the model's
//! top 1 and top 5 held the label the analysts settled on (per model
//! version), and the categories rejected most. Computed from the queue's
//! snapshot and this server's decisions since, so it costs no table read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::documents::Decision;

use super::queue::Queue;

/// One model version's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accuracy {
    /// `r:model_version`.
    pub model_version: String,
    /// Decisions on its top 5.
    pub reviewed: u64,
    /// Of those whose document still carries that model's top 5: how many.
    pub top1_known: u64,
    /// ... and how many had the accepted label first.
    pub top1: u64,
    /// Decisions that accepted one of the 5.
    pub in_top5: u64,
}

/// One day of one model version's reviews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayAccuracy {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Decisions on its top 5 that day.
    pub reviewed: u64,
    /// Of those, accepted one of the 5.
    pub accepted: u64,
}

/// Everything `/stats` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Documents with a decision.
    pub reviewed: u64,
    /// Documents waiting.
    pub waiting: u64,
    /// `YYYY-MM-DD` (UTC) → decisions, newest day first.
    pub per_day: Vec<(String, u64)>,
    /// Reviewer → decisions, most first.
    pub per_reviewer: Vec<(String, u64)>,
    /// Per model version, newest version first.
    pub accuracy: Vec<Accuracy>,
    /// Most rejected labels (at most 20), most first.
    pub rejected: Vec<(String, u64)>,
    /// Per model version, its days (oldest first).
    pub accuracy_by_day: Vec<(String, Vec<DayAccuracy>)>,
    /// Champion against shadow on the labelled decisions, per pair.
    pub shadow: Vec<crate::documents::LiveEvidence>,
}

/// How many rejected categories the page lists.
const REJECTED_SHOWN: usize = 20;

const DAY_MS: i64 = 86_400_000;

/// `YYYY-MM-DD` of day `n` since the epoch (UTC).
fn date(n: i64) -> String {
    let mut s = super::pages::time(n * DAY_MS);
    s.truncate(10);
    s
}

fn most_first(counts: HashMap<Arc<str>, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = counts
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// Computes the statistics.
pub fn compute(queue: &Queue) -> Stats {
    let mut reviewed = 0u64;
    let mut per_day: BTreeMap<i64, u64> = BTreeMap::new();
    let mut per_reviewer: HashMap<Arc<str>, u64> = HashMap::new();
    let mut accuracy: BTreeMap<Arc<str>, Accuracy> = BTreeMap::new();
    let mut rejected: HashMap<Arc<str>, u64> = HashMap::new();
    let mut by_day: BTreeMap<Arc<str>, BTreeMap<i64, (u64, u64)>> = BTreeMap::new();
    let mut shadow: BTreeMap<(Arc<str>, Arc<str>), crate::documents::LiveEvidence> =
        BTreeMap::new();
    queue.for_each_reviewed(|doc, r| {
        let day = by_day
            .entry(r.model_version.clone())
            .or_default()
            .entry(r.at_ms.div_euclid(DAY_MS))
            .or_default();
        day.0 += 1;
        day.1 += u64::from(r.decision == Decision::Accept);
        if let (Some(sh), Some(label)) = (&doc.shadow, &r.label) {
            if doc.model_version == r.model_version {
                let e = shadow
                    .entry((r.model_version.clone(), sh.version.clone()))
                    .or_insert_with(|| crate::documents::LiveEvidence {
                        champion: r.model_version.to_string(),
                        shadow: sh.version.to_string(),
                        ..Default::default()
                    });
                let champion: Vec<&str> = doc.top5.iter().map(|(l, _)| &**l).collect();
                let theirs: Vec<&str> = sh.labels.iter().map(|l| &**l).collect();
                e.add(label, &champion, &theirs);
            }
        }
        reviewed += 1;
        *per_day.entry(r.at_ms.div_euclid(DAY_MS)).or_default() += 1;
        *per_reviewer.entry(r.reviewer.clone()).or_default() += 1;
        let a = accuracy
            .entry(r.model_version.clone())
            .or_insert_with(|| Accuracy {
                model_version: r.model_version.to_string(),
                reviewed: 0,
                top1_known: 0,
                top1: 0,
                in_top5: 0,
            });
        a.reviewed += 1;
        if r.decision == Decision::Accept {
            a.in_top5 += 1;
        }
        if doc.model_version == r.model_version {
            a.top1_known += 1;
            let first = doc.top5.first().map(|(l, _)| l);
            if r.decision == Decision::Accept && first.is_some() && first == r.label.as_ref() {
                a.top1 += 1;
            }
        }
        if r.decision == Decision::Reject {
            for l in &r.rejected {
                *rejected.entry(l.clone()).or_default() += 1;
            }
        }
    });
    let total = queue.snapshot().docs().len() as u64;
    let mut rejected = most_first(rejected);
    rejected.truncate(REJECTED_SHOWN);
    Stats {
        reviewed,
        waiting: total.saturating_sub(reviewed),
        per_day: per_day
            .into_iter()
            .rev()
            .map(|(d, n)| (date(d), n))
            .collect(),
        per_reviewer: most_first(per_reviewer),
        accuracy: accuracy.into_values().rev().collect(),
        rejected,
        accuracy_by_day: by_day
            .into_iter()
            .map(|(v, days)| {
                (
                    v.to_string(),
                    days.into_iter()
                        .map(|(d, (reviewed, accepted))| DayAccuracy {
                            day: date(d),
                            reviewed,
                            accepted,
                        })
                        .collect(),
                )
            })
            .collect(),
        shadow: shadow.into_values().collect(),
    }
}
