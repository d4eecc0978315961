//! Accuracy of matches against the generator's ground truth: precision,
//! recall and F1 overall and per corruption type, the false-match rate on
//! people who are not in the database, and blocking recall (the true person
//! among the candidates). Used by the benchmark and the accuracy test.
//!
//! A profile of someone in the database is a true positive when the
//! matched id is theirs; a false positive (and a false negative) when it is
//! someone else's; a false negative when unmatched. A profile of someone not
//! in the database is a false positive when matched at all.

use std::collections::BTreeMap;

use serde::Serialize;

use super::matcher::{Outcome, Reason};
use crate::dbusa::person::{corruptions, Profile};

/// Counts and rates of one group of profiles.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Accuracy {
    /// Profiles in the group.
    pub profiles: u64,
    /// Matched to the right person.
    pub true_positives: u64,
    /// Matched to a wrong person (or, for outsiders, to anyone).
    pub false_positives: u64,
    /// People in the database left unmatched or matched wrongly.
    pub false_negatives: u64,
    /// True person among the candidates (insiders only).
    pub blocked: u64,
    /// TP / (TP + FP); 1 when nothing was matched.
    pub precision: f64,
    /// TP / insiders; 1 when the group has no insiders.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// blocked / insiders.
    pub blocking_recall: f64,
}

impl Accuracy {
    fn finish(&mut self, insiders: u64) {
        let tp = self.true_positives as f64;
        self.precision = if self.true_positives + self.false_positives == 0 {
            1.0
        } else {
            tp / (tp + self.false_positives as f64)
        };
        self.recall = if insiders == 0 {
            1.0
        } else {
            tp / insiders as f64
        };
        self.blocking_recall = if insiders == 0 {
            1.0
        } else {
            self.blocked as f64 / insiders as f64
        };
        self.f1 = if self.precision + self.recall == 0.0 {
            0.0
        } else {
            2.0 * self.precision * self.recall / (self.precision + self.recall)
        };
    }
}

/// Accuracy overall, per corruption, and on outsiders.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Every profile.
    pub overall: Accuracy,
    /// Profiles that show a name (members and non-members).
    pub name_present: Accuracy,
    /// Per corruption type (outsiders under `not_in_db`).
    pub by_corruption: BTreeMap<String, Accuracy>,
    /// Share of outsiders matched to someone.
    pub false_match_rate: f64,
    /// Unmatched profiles by reason.
    pub reasons: BTreeMap<String, u64>,
    /// Whether candidates were known, so that blocking recall means something.
    pub blocking_measured: bool,
}

/// The group key of profiles that show a name (never a corruption label).
const NAME_PRESENT: &str = "\u{0}name";

/// Scores outcomes against the truth. `candidates[i]` lists the ids the
/// search returned for profile `i` (empty when unknown).
pub fn evaluate(profiles: &[Profile], outcomes: &[Outcome], candidates: &[Vec<String>]) -> Report {
    let mut report = Report {
        blocking_measured: !candidates.is_empty(),
        ..Report::default()
    };
    let mut insiders: BTreeMap<String, u64> = BTreeMap::new();
    let mut outsiders = 0u64;
    let mut outsiders_matched = 0u64;
    for (i, (p, o)) in profiles.iter().zip(outcomes).enumerate() {
        *report
            .reasons
            .entry(o.reason.name().to_owned())
            .or_default() += 1;
        let named = p.name.as_deref().is_some_and(|n| !n.trim().is_empty());
        let groups = [
            Some(p.corruption.as_str()),
            Some(""),
            named.then_some(NAME_PRESENT),
        ];
        for g in groups.into_iter().flatten() {
            let a = match g {
                "" => &mut report.overall,
                NAME_PRESENT => &mut report.name_present,
                g => report.by_corruption.entry(g.to_owned()).or_default(),
            };
            a.profiles += 1;
            match (&p.dbusa_id, &o.dbusa_id) {
                (Some(truth), Some(got)) if truth == got => a.true_positives += 1,
                (Some(_), Some(_)) => {
                    a.false_positives += 1;
                    a.false_negatives += 1;
                }
                (Some(_), None) => a.false_negatives += 1,
                (None, Some(_)) => a.false_positives += 1,
                (None, None) => {}
            }
            if let Some(truth) = &p.dbusa_id {
                if candidates.get(i).is_some_and(|c| c.contains(truth)) {
                    a.blocked += 1;
                }
            }
        }
        match &p.dbusa_id {
            Some(_) => {
                *insiders.entry(p.corruption.clone()).or_default() += 1;
                *insiders.entry(String::new()).or_default() += 1;
                if named {
                    *insiders.entry(NAME_PRESENT.to_owned()).or_default() += 1;
                }
            }
            None => {
                outsiders += 1;
                if o.reason == Reason::Matched {
                    outsiders_matched += 1;
                }
            }
        }
    }
    report
        .overall
        .finish(insiders.get("").copied().unwrap_or(0));
    report
        .name_present
        .finish(insiders.get(NAME_PRESENT).copied().unwrap_or(0));
    for (g, a) in &mut report.by_corruption {
        a.finish(insiders.get(g).copied().unwrap_or(0));
    }
    report.false_match_rate = if outsiders == 0 {
        0.0
    } else {
        outsiders_matched as f64 / outsiders as f64
    };
    report
}

/// The report as a Markdown table.
pub fn table(report: &Report) -> String {
    let mut out = String::from(
        "| profiles | n | precision | recall | F1 | blocking recall |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let row = |name: &str, a: &Accuracy| {
        let blocking = if report.blocking_measured {
            format!("{:.3}", a.blocking_recall)
        } else {
            "n/a".to_owned()
        };
        format!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} | {blocking} |\n",
            a.profiles, a.precision, a.recall, a.f1
        )
    };
    out.push_str(&row("all", &report.overall));
    out.push_str(&row("name present", &report.name_present));
    for c in corruptions::ALL
        .iter()
        .chain([&corruptions::NOT_IN_DB, &corruptions::HOUSEMATE])
    {
        if let Some(a) = report.by_corruption.get(*c) {
            out.push_str(&row(c, a));
        }
    }
    for c in [corruptions::NOT_IN_DB, corruptions::HOUSEMATE] {
        if let Some(a) = report.by_corruption.get(c) {
            out.push_str(&format!(
                "\n{c}: {} of {} matched to someone ({:.4})",
                a.false_positives,
                a.profiles,
                a.false_positives as f64 / a.profiles.max(1) as f64
            ));
        }
    }
    out.push_str(&format!(
        "\nfalse-match rate on people not in the database: {:.4}\n",
        report.false_match_rate
    ));
    out
}
