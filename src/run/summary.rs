//! What `sift run`'s first pass did, measured from the stages' own
//! summaries and from what landed in the tables, and how it is printed.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::archive::ArchiveSummary;
use crate::backends::table::Table;
use crate::clean::CleanSummary;
use crate::dbusa::load::LoadSummary;
use crate::dbusa::person::Profile;
use crate::documents;
use crate::envelope::Stage;
use crate::infer::InferSummary;
use crate::ingest::IngestSummary;
use crate::matching::daemon::MatchSummary;
use crate::matching::refresh::Refreshed;

/// The model the pass classified with.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// Its version in the registry.
    pub version: String,
    /// Trained in this pass (false: LATEST of an earlier run).
    pub trained: bool,
    /// Preset.
    pub preset: String,
    /// On its validation split.
    pub p_at_1: f64,
    /// On its validation split.
    pub hit_at_5: f64,
    /// On its validation split.
    pub recall_at_5: f64,
    /// Training documents.
    pub train_documents: u64,
    /// Validation documents.
    pub validation_documents: u64,
    /// Analysts' decisions trained on.
    pub feedback_documents: u64,
    /// The epoch kept.
    pub best_epoch: u32,
    /// Epochs trained.
    pub epochs: usize,
    /// Whether it became LATEST (always true when reused).
    pub latest: bool,
    /// The gate's reason, when trained.
    pub gate: String,
    /// Seconds spent training (0 when reused).
    pub seconds: f64,
}

impl ModelSummary {
    /// A model trained in this pass.
    pub fn trained(o: &crate::train::TrainOutcome) -> Self {
        let m = &o.metrics;
        ModelSummary {
            version: o.version.clone(),
            trained: true,
            preset: m.preset.clone(),
            p_at_1: m.validation.p_at_1,
            hit_at_5: m.validation.hit_at_5,
            recall_at_5: m.validation.recall_at_5,
            train_documents: m.train_documents,
            validation_documents: m.validation_documents,
            feedback_documents: o.feedback_documents,
            best_epoch: m.best_epoch,
            epochs: m.epochs.len(),
            latest: o.gate.promoted,
            gate: o.gate.reason.clone(),
            seconds: o.seconds,
        }
    }

    /// LATEST of an earlier run, reused.
    pub fn reused(version: &str, m: &sift_training::ModelMetrics) -> Self {
        ModelSummary {
            version: version.to_owned(),
            trained: false,
            preset: m.preset.clone(),
            p_at_1: m.validation.p_at_1,
            hit_at_5: m.validation.hit_at_5,
            recall_at_5: m.validation.recall_at_5,
            train_documents: m.train_documents,
            validation_documents: m.validation_documents,
            feedback_documents: m.feedback_documents,
            best_epoch: m.best_epoch,
            epochs: m.epochs.len(),
            latest: true,
            gate: "reused LATEST (--retrain trains a new one)".into(),
            seconds: 0.0,
        }
    }
}

/// How the stored top 5 of the web's documents compare with their labels
/// (documents the model was not trained on).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Classification {
    /// Served documents with a top 5 in the table.
    pub documents: u64,
    /// Top-1 label is one of the document's labels.
    pub p_at_1: f64,
    /// One of the document's labels is in the top 5.
    pub hit_at_5: f64,
}

/// Reads the `documents` rows of the served URLs and scores their top 5.
pub async fn classification(
    table: &dyn Table,
    tags_by_url: &HashMap<&str, &[String]>,
) -> crate::Result<Classification> {
    table
        .ensure_table(documents::TABLE, &documents::FAMILIES)
        .await?;
    let (mut n, mut top1, mut hit5) = (0u64, 0u64, 0u64);
    crate::backends::table::scan_pages(
        table,
        documents::TABLE,
        Some(&[documents::META, documents::CATEGORIES]),
        5_000,
        |row| {
            let Some(tags) = row
                .get(documents::META, b"url")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|url| tags_by_url.get(url))
            else {
                return;
            };
            let Some(top) = row
                .get(
                    documents::CATEGORIES,
                    documents::categories::TOP5.as_bytes(),
                )
                .and_then(|v| serde_json::from_slice::<Vec<serde_json::Value>>(v).ok())
            else {
                return;
            };
            let labels: Vec<&str> = top.iter().filter_map(|s| s["label"].as_str()).collect();
            n += 1;
            if labels.first().is_some_and(|l| tags.iter().any(|t| t == l)) {
                top1 += 1;
            }
            if labels.iter().any(|l| tags.iter().any(|t| t == l)) {
                hit5 += 1;
            }
        },
    )
    .await?;
    let rate = |k: u64| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    Ok(Classification {
        documents: n,
        p_at_1: rate(top1),
        hit_at_5: rate(hit5),
    })
}

/// The match decisions in `handles` scored on the generated truth.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MatchAccuracy {
    /// Profiles published.
    pub profiles: u64,
    /// Of those, people in the database.
    pub in_database: u64,
    /// Profiles with a decision row in `handles`.
    pub decided: u64,
    /// Matched to a person.
    pub matched: u64,
    /// Matched to the right person.
    pub correct: u64,
    /// correct / matched.
    pub precision: f64,
    /// correct / in_database.
    pub recall: f64,
    /// Share of the people not in the database matched to someone.
    pub false_match_rate: f64,
}

/// Reads each profile's row of `handles` and compares it with the truth.
pub async fn match_accuracy(
    table: &dyn Table,
    profiles: &[Profile],
) -> crate::Result<MatchAccuracy> {
    use crate::matching::sink;
    let mut decisions: HashMap<Vec<u8>, Option<String>> = HashMap::new();
    crate::backends::table::scan_pages(
        table,
        sink::HANDLES,
        Some(&[sink::HANDLES_FAMILY]),
        10_000,
        |r| {
            let id = r
                .get(sink::HANDLES_FAMILY, sink::columns::DBUSA_ID.as_bytes())
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .filter(|v| !v.is_empty());
            decisions.insert(r.key.to_vec(), id);
        },
    )
    .await?;
    let mut a = MatchAccuracy::default();
    let (mut outsiders, mut outsiders_matched) = (0u64, 0u64);
    for p in profiles {
        a.profiles += 1;
        if p.dbusa_id.is_some() {
            a.in_database += 1;
        } else {
            outsiders += 1;
        }
        let (network, handle) = crate::matching::matcher::ProfileIn::from(p).key();
        let Some(decision) = decisions.get(format!("{network}:{handle}").as_bytes()) else {
            continue;
        };
        a.decided += 1;
        if let Some(got) = decision {
            a.matched += 1;
            match &p.dbusa_id {
                Some(truth) if truth == got => a.correct += 1,
                Some(_) => {}
                None => outsiders_matched += 1,
            }
        }
    }
    let rate = |k: u64, n: u64| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    a.precision = rate(a.correct, a.matched);
    a.recall = rate(a.correct, a.in_database);
    a.false_match_rate = rate(outsiders_matched, outsiders);
    Ok(a)
}

/// The identity side of the pass.
#[derive(Debug, Clone, Serialize)]
pub struct IdentitySummary {
    /// People in the generated database.
    pub people: u64,
    /// Its load into the search index.
    pub load: LoadSummary,
    /// Profiles published to `sift.profiles`.
    pub profiles_published: u64,
    /// Malformed records published with them.
    pub malformed_published: u64,
    /// The match daemon's pass.
    pub matched: MatchSummary,
    /// The cache refresh after it.
    pub cache: Refreshed,
    /// Decisions against the truth.
    pub accuracy: MatchAccuracy,
    /// Wall time of this side, seconds.
    pub seconds: f64,
}

/// The review UI's first login.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewLogin {
    /// Where it answers.
    pub url: String,
    /// User name.
    pub user: String,
    /// Password (new every run).
    pub password: String,
}

/// The review UI, logged in to and asked for its queue.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewCheck {
    /// The login.
    #[serde(flatten)]
    pub login: ReviewLogin,
    /// Whether the login worked and `/queue` answered 200.
    pub answered: bool,
    /// What went wrong otherwise.
    pub error: Option<String>,
}

impl ReviewCheck {
    /// Logs in and opens the queue.
    pub async fn probe(login: &ReviewLogin) -> Self {
        let result = async {
            let base = login.url.trim_end_matches('/');
            let client =
                crate::review::client::Client::login(base, &login.user, &login.password, 1).await?;
            client.status("/queue").await
        }
        .await;
        let (answered, error) = match result {
            Ok(200) => (true, None),
            Ok(status) => (false, Some(format!("/queue answered HTTP {status}"))),
            Err(e) => (false, Some(e.to_string())),
        };
        ReviewCheck {
            login: login.clone(),
            answered,
            error,
        }
    }
}

/// One line of the per-stage table.
#[derive(Debug, Clone, Serialize)]
pub struct StageLine {
    /// Stage.
    pub stage: String,
    /// What it took in.
    pub input: u64,
    /// What it put out.
    pub output: u64,
    /// Dead letters it wrote.
    pub dead_letters: u64,
    /// In words.
    pub note: String,
}

/// Everything the first pass did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Wall time from start to summary, seconds.
    pub seconds: f64,
    /// Sites of the sample web.
    pub sites: u64,
    /// Labeled documents it serves.
    pub served: u64,
    /// HTTP requests the sample web answered.
    pub web_requests: u64,
    /// Per stage.
    pub stages: Vec<StageLine>,
    /// Dead letters by stage, then reason.
    pub dead_letters: BTreeMap<String, BTreeMap<String, u64>>,
    /// Ingest.
    pub ingest: IngestSummary,
    /// Clean.
    pub clean: CleanSummary,
    /// Archive.
    pub archive: ArchiveSummary,
    /// The model.
    pub model: ModelSummary,
    /// Inference.
    pub infer: InferSummary,
    /// Identity matching.
    pub identity: IdentitySummary,
    /// The web's documents' top 5 against their labels.
    pub classification: Classification,
    /// The review UI.
    pub review: Option<ReviewCheck>,
    /// Every stage processed documents (the exit status of `--once`).
    pub every_stage_processed: bool,
    /// Stages that did not.
    pub idle_stages: Vec<String>,
}

impl RunSummary {
    /// Fills the stage table, the dead letters and the verdict.
    pub fn finish(&mut self) {
        let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
        let words = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (i, c, a, f, id) = (
            &self.ingest,
            &self.clean,
            &self.archive,
            &self.infer,
            &self.identity,
        );
        let decided = sum(&id.matched.decided);
        let matched = id.matched.decided.get("matched").copied().unwrap_or(0);
        self.stages = vec![
            StageLine {
                stage: Stage::Ingest.name().into(),
                input: i.fetched,
                output: i.produced,
                dead_letters: sum(&i.dead_letters),
                note: format!(
                    "{} sources, {} pages found, {} unchanged{}",
                    i.sources,
                    i.discovered,
                    i.not_modified,
                    if i.dropped.is_empty() {
                        String::new()
                    } else {
                        format!(", dropped {}", words(&i.dropped))
                    }
                ),
            },
            StageLine {
                stage: Stage::Clean.name().into(),
                input: c.consumed,
                output: c.produced,
                dead_letters: sum(&c.dead_letters),
                note: if c.dropped.is_empty() {
                    "nothing dropped".into()
                } else {
                    format!("dropped {}", words(&c.dropped))
                },
            },
            StageLine {
                stage: Stage::Archive.name().into(),
                input: a.records,
                output: a.parts,
                dead_letters: sum(&a.dead_letters),
                note: format!(
                    "parts; {:.1} MB of JSON lines in {:.1} MB of zstd",
                    a.bytes_in as f64 / 1e6,
                    a.bytes_out as f64 / 1e6
                ),
            },
            StageLine {
                stage: "train".into(),
                input: self.model.train_documents + self.model.validation_documents,
                output: u64::from(self.model.trained || !self.model.version.is_empty()),
                dead_letters: 0,
                note: format!(
                    "{} `{}` {}",
                    if self.model.trained {
                        "trained"
                    } else {
                        "reused"
                    },
                    self.model.preset,
                    self.model.version
                ),
            },
            StageLine {
                stage: Stage::Infer.name().into(),
                input: f.consumed,
                output: f.scored,
                dead_letters: sum(&f.dead_letters),
                note: format!(
                    "{} forward passes; sift.clean → table p50 {:.0} ms, p99 {:.0} ms",
                    f.batches,
                    f.latency_p50_seconds * 1e3,
                    f.latency_p99_seconds * 1e3
                ),
            },
            StageLine {
                stage: "dbusa load".into(),
                input: id.people,
                output: id.load.index_count,
                dead_letters: 0,
                note: if id.load.already_loaded {
                    "already loaded by an earlier run".into()
                } else {
                    format!(
                        "{} rows/s, {} rejected",
                        id.load.rows_per_sec.round(),
                        id.load.rejected
                    )
                },
            },
            StageLine {
                stage: Stage::Match.name().into(),
                input: id.matched.consumed,
                output: decided,
                dead_letters: sum(&id.matched.dead_letters),
                note: format!("{matched} matched; {}", words(&id.matched.decided)),
            },
            StageLine {
                stage: "cache refresh".into(),
                input: id.cache.rows,
                output: sum(&id.cache.entries),
                dead_letters: 0,
                note: "handle → person entries".into(),
            },
        ];
        let mut dlq: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (stage, m) in [
            (Stage::Ingest.name(), &i.dead_letters),
            (Stage::Clean.name(), &c.dead_letters),
            (Stage::Archive.name(), &a.dead_letters),
            (Stage::Infer.name(), &f.dead_letters),
            (Stage::Match.name(), &id.matched.dead_letters),
        ] {
            if !m.is_empty() {
                super::merge(dlq.entry(stage.into()).or_default(), m);
            }
        }
        self.dead_letters = dlq;
        self.idle_stages = self
            .stages
            .iter()
            .filter(|s| s.output == 0)
            .map(|s| s.stage.clone())
            .collect();
        if !self.review.as_ref().is_some_and(|r| r.answered) {
            self.idle_stages.push("review".into());
        }
        self.every_stage_processed = self.idle_stages.is_empty();
    }

    /// Prints the summary, as a table or as JSON.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string_pretty(self).unwrap_or_default());
            return;
        }
        println!(
            "first pass finished in {:.1} s: {} labeled documents on {} sites ({} requests)",
            self.seconds, self.served, self.sites, self.web_requests
        );
        println!();
        println!("  {:<14} {:>8} {:>8} {:>5}  ", "stage", "in", "out", "dlq");
        for s in &self.stages {
            println!(
                "  {:<14} {:>8} {:>8} {:>5}  {}",
                s.stage, s.input, s.output, s.dead_letters, s.note
            );
        }
        println!();
        if self.dead_letters.is_empty() {
            println!("dead letters: none");
        } else {
            println!("dead letters (sift.dlq; `sift topics tail sift.dlq` shows them):");
            for (stage, reasons) in &self.dead_letters {
                for (reason, n) in reasons {
                    println!("  {stage:<8} {reason:<24} {n:>6}");
                }
            }
        }
        let m = &self.model;
        println!();
        println!(
            "model {} ({}, {}): validation P@1 {:.3}, hit@5 {:.3}, recall@5 {:.3} on {} documents ({} trained on, {} analysts' decisions)",
            m.version,
            m.preset,
            if m.trained { format!("trained in {:.0} s", m.seconds) } else { "reused".into() },
            m.p_at_1,
            m.hit_at_5,
            m.recall_at_5,
            m.validation_documents,
            m.train_documents,
            m.feedback_documents
        );
        let c = &self.classification;
        println!(
            "classified web documents (never trained on): P@1 {:.3}, hit@5 {:.3} on {} documents",
            c.p_at_1, c.hit_at_5, c.documents
        );
        let a = &self.identity.accuracy;
        println!(
            "identity matching on the generated truth: precision {:.3}, recall {:.3}, false matches {:.1}% of {} outsiders ({} of {} profiles matched)",
            a.precision,
            a.recall,
            a.false_match_rate * 100.0,
            a.profiles - a.in_database,
            a.matched,
            a.profiles
        );
        println!();
        match &self.review {
            Some(r) if r.answered => println!(
                "review UI: {}  (user {}, password {})",
                r.login.url, r.login.user, r.login.password
            ),
            Some(r) => println!(
                "review UI: {} did not answer: {}",
                r.login.url,
                r.error.as_deref().unwrap_or("unknown")
            ),
            None => println!("review UI: not started"),
        }
        if self.every_stage_processed {
            println!("every stage processed documents");
        } else {
            println!(
                "stages that processed nothing: {}",
                self.idle_stages.join(", ")
            );
        }
    }
}
