//! `sift models list|show|promote|rollback`: the registry by hand.

use clap::Subcommand;
use sift_training::{Document, ModelMetrics, Part};

use super::registry::{Registry, RegistryError};
use super::{gate_metric, model_cache, read_dataset, split_plan, TrainCommandError};
use crate::config::Config;

/// `sift models` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ModelsCommand {
    /// Every version in the registry with its validation figures; `*` marks LATEST.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A version's figures, its worst categories and where its report is (default: LATEST).
    Show {
        /// Version (default: LATEST).
        #[arg(value_name = "VERSION")]
        model_version: Option<String>,
        /// Print metrics.json as it is.
        #[arg(long)]
        json: bool,
    },
    /// Point LATEST at a version if it beats LATEST on the same validation documents.
    Promote {
        /// The version.
        #[arg(value_name = "VERSION")]
        model_version: String,
        /// Promote whatever the figures say.
        #[arg(long)]
        force: bool,
        /// Score both models on this dataset's validation split (repeatable; same forms as
        /// `sift train --data`). Without it, the two models' stored figures are compared, which
        /// needs both to have been validated on the same documents.
        #[arg(long = "data", value_delimiter = ',')]
        data: Vec<String>,
        /// Decide on live evidence instead: at least this many analysts' decisions on
        /// documents LATEST scored and VERSION scored in the shadow (`infer.shadow_model`),
        /// with VERSION ahead on them (top 1 for the p_at_1 gate, top 5 for the others).
        #[arg(long, value_name = "N")]
        live_min: Option<u64>,
    },
    /// Point LATEST back at the version it replaced.
    Rollback,
}

fn one_line(m: &ModelMetrics) -> String {
    format!(
        "P@1 {:.3}  hit@5 {:.3}  recall@5 {:.3}  {:>6} train / {:>5} val docs  {}",
        m.validation.p_at_1,
        m.validation.hit_at_5,
        m.validation.recall_at_5,
        m.train_documents,
        m.validation_documents,
        m.preset
    )
}

/// What the documents table holds on LATEST against a shadow version.
async fn live_evidence(
    config: &Config,
    champion: &str,
    shadow: &str,
) -> Result<crate::documents::LiveEvidence, TrainCommandError> {
    let table = crate::backends::open_table(config).await?;
    table
        .ensure_table(crate::documents::TABLE, &crate::documents::FAMILIES)
        .await?;
    let mut evidence = crate::documents::LiveEvidence {
        champion: champion.to_owned(),
        shadow: shadow.to_owned(),
        ..Default::default()
    };
    crate::backends::table::scan_pages(
        table.as_ref(),
        crate::documents::TABLE,
        Some(&[crate::documents::CATEGORIES, crate::documents::REVIEW]),
        1000,
        |row| {
            if let Some(o) = crate::documents::live_observation(row) {
                if o.champion == champion && o.shadow == shadow {
                    let ours: Vec<&str> = o.champion_top5.iter().map(String::as_str).collect();
                    let theirs: Vec<&str> = o.shadow_top5.iter().map(String::as_str).collect();
                    evidence.add(&o.label, &ours, &theirs);
                }
            }
        },
    )
    .await?;
    Ok(evidence)
}

/// Runs a `sift models` subcommand.
pub async fn main(config: &Config, command: ModelsCommand) -> Result<(), TrainCommandError> {
    let store = crate::backends::open_objects(config).await?;
    let registry = Registry::new(store.clone(), &config.train.prefix);
    match command {
        ModelsCommand::List { json } => {
            let versions = registry.list().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&versions).unwrap_or_default()
                );
                return Ok(());
            }
            if versions.is_empty() {
                println!("no models yet: run `sift train`");
            }
            for v in versions {
                let mark = if v.latest { "*" } else { " " };
                println!("{mark} {}  {}", v.version, one_line(&v.metrics));
            }
        }
        ModelsCommand::Show {
            model_version,
            json,
        } => {
            let version = match model_version {
                Some(v) => v,
                None => {
                    registry
                        .latest()
                        .await?
                        .ok_or(RegistryError::NoLatest)?
                        .0
                        .version
                }
            };
            let dir = registry.fetch(&version, &model_cache(config)).await?;
            let metrics = registry.metrics(&version).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&metrics).unwrap_or_default()
                );
                return Ok(());
            }
            let latest = registry.latest().await?.map(|(l, _)| l);
            println!(
                "{version}{}",
                match &latest {
                    Some(l) if l.version == version =>
                        format!("  (LATEST since {}, {})", l.promoted_at_ms, l.reason),
                    _ => String::new(),
                }
            );
            println!("  {}", one_line(&metrics));
            println!(
                "  trained {} epoch(s), best {}{}, {:.0} tokens/s on {}, {:.0} s, loss {}, seed {}",
                metrics.epochs.len(),
                metrics.best_epoch,
                if metrics.stopped_early {
                    " (stopped early)"
                } else {
                    ""
                },
                metrics.tokens_per_second,
                metrics.device,
                metrics.wall_seconds,
                metrics.loss,
                metrics.seed
            );
            let mut worst: Vec<_> = metrics
                .validation
                .per_label
                .iter()
                .filter(|l| l.support >= 3)
                .collect();
            worst.sort_by(|a, b| a.f1.total_cmp(&b.f1).then(b.support.cmp(&a.support)));
            println!("  worst categories (support >= 3):");
            for l in worst.iter().take(10) {
                println!(
                    "    F1 {:.2}  P {:.2}  R {:.2}  support {:>4}  {}",
                    l.f1, l.precision, l.recall, l.support, l.label
                );
            }
            println!("  files   {}", dir.display());
            println!(
                "  report  {}",
                dir.join(sift_training::files::REPORT).display()
            );
        }
        ModelsCommand::Promote {
            model_version: version,
            force,
            data,
            live_min,
        } => {
            let metric = gate_metric(config)?;
            let challenger = registry.metrics(&version).await?;
            let current = registry.latest().await?.map(|(l, _)| l);
            let reason = match (&current, force) {
                (_, true) => "forced".to_owned(),
                (None, false) => "manual".to_owned(),
                (Some(l), false) if l.version == version => {
                    println!("{version} is already LATEST");
                    return Ok(());
                }
                (Some(l), false) if live_min.is_some() => {
                    let needed = live_min.unwrap_or_default();
                    let evidence = live_evidence(config, &l.version, &version).await?;
                    let ((c1, s1), (c5, s5)) = (evidence.top1_shares(), evidence.top5_shares());
                    let (ours, theirs, figure) = match metric {
                        sift_training::Metric::PAt1 => (s1, c1, "top 1"),
                        sift_training::Metric::Mean => {
                            ((s1 + s5) / 2.0, (c1 + c5) / 2.0, "mean of top 1 and top 5")
                        }
                        _ => (s5, c5, "top 5"),
                    };
                    println!(
                        "live evidence: {} decisions; {figure}: {version} {ours:.4} vs LATEST {} {theirs:.4} \
                         (top 1 {s1:.4} vs {c1:.4}, top 5 {s5:.4} vs {c5:.4})",
                        evidence.reviewed, l.version
                    );
                    if evidence.reviewed < needed {
                        return Err(TrainCommandError::Invalid(format!(
                            "only {} reviewed documents carry both LATEST's and {version}'s shadow \
                             scores; --live-min asks for {needed}. Keep {version} in the shadow \
                             (infer.shadow_model) until analysts have reviewed more",
                            evidence.reviewed
                        )));
                    }
                    if ours <= theirs {
                        return Err(TrainCommandError::Invalid(format!(
                            "{version} is not ahead of LATEST on the analysts' decisions; not \
                             promoted (--force overrides)"
                        )));
                    }
                    "live".to_owned()
                }
                (Some(l), false) => {
                    let (ours, theirs, basis) = if data.is_empty() {
                        let champion = registry.metrics(&l.version).await?;
                        if champion.validation_fingerprint.is_empty()
                            || champion.validation_fingerprint != challenger.validation_fingerprint
                        {
                            return Err(TrainCommandError::Invalid(format!(
                                "{version} and LATEST ({}) were validated on different documents, so \
                                 their stored figures do not compare; pass --data to score both on \
                                 the same documents, or --force",
                                l.version
                            )));
                        }
                        (
                            metric.of(&challenger.validation),
                            metric.of(&champion.validation),
                            "their stored validation figures".to_owned(),
                        )
                    } else {
                        let mut documents: Vec<Document> = Vec::new();
                        for spec in &data {
                            documents.extend(read_dataset(spec, store.as_ref()).await?);
                        }
                        let plan = split_plan(config);
                        let validation: Vec<Document> = documents
                            .into_iter()
                            .filter(|d| plan.part(d) == Part::Validation)
                            .collect();
                        let cache = model_cache(config);
                        let ours_dir = registry.fetch(&version, &cache).await?;
                        let theirs_dir = registry.fetch(&l.version, &cache).await?;
                        let n = validation.len();
                        (
                            super::score(ours_dir, validation.clone(), metric).await?,
                            super::score(theirs_dir, validation, metric).await?,
                            format!("{n} validation documents"),
                        )
                    };
                    println!(
                        "{} on {basis}: {version} {ours:.4} vs LATEST {} {theirs:.4}",
                        metric.name(),
                        l.version
                    );
                    if ours <= theirs {
                        return Err(TrainCommandError::Invalid(format!(
                            "{version} does not beat LATEST; not promoted (--force overrides)"
                        )));
                    }
                    "manual".to_owned()
                }
            };
            let expected = current.map(|l| l.version);
            let written = registry
                .promote_over(&version, expected.as_deref(), &reason)
                .await?;
            match written {
                Some(l) => println!("LATEST -> {} ({})", l.version, l.reason),
                None => {
                    return Err(TrainCommandError::Invalid(
                        "LATEST changed while comparing; run the command again".into(),
                    ))
                }
            }
        }
        ModelsCommand::Rollback => {
            let latest = registry.rollback().await?;
            println!("LATEST -> {} ({})", latest.version, latest.reason);
        }
    }
    Ok(())
}
