//! `sift bench match`: identity matching over a generated data set
//! (`sift dbusa generate`), on the configured search index (load it first
//! with `sift dbusa load DIR/dbusa.csv`), with the enrichment stand-in
//! serving `DIR/enrichment.jsonl`.
//!
//! Reports accuracy against the truth (precision, recall, F1 overall and
//! per corruption, false-match rate on people not in the database, blocking
//! recall), profiles/s and the p50/p99 time per profile at each concurrency,
//! and a sweep of threshold and margin.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use crate::config::Config;
use crate::dbusa::person::read_profiles;
use crate::matching::evaluate::{evaluate, table, Report};
use crate::matching::matcher::ProfileIn;
use crate::matching::matcher::{decide, Matcher, Outcome, Reason};
use crate::matching::standin;

/// `sift bench match`.
#[derive(Debug, Clone, Args)]
pub struct MatchBenchArgs {
    /// Directory written by `sift dbusa generate` (profiles.jsonl, enrichment.jsonl).
    #[arg(long)]
    pub data: PathBuf,
    /// Profiles matched at once; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub concurrency: Vec<usize>,
    /// Use only the first N profiles (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Client-side enrichment rate limit during the benchmark, per minute
    /// (the stand-in costs nothing; the production default is 6,000).
    #[arg(long, default_value_t = 6_000_000)]
    pub enrich_rate_per_minute: u32,
    /// Wait before asking again after a 202 (queued) answer; default `enrich.pending_wait`.
    /// `0s` measures the matcher without the API's queueing delay.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub pending_wait: Option<std::time::Duration>,
    /// Write the results here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One concurrency's speed.
#[derive(Debug, Clone, Serialize)]
pub struct SpeedRow {
    /// Profiles in flight.
    pub concurrency: usize,
    /// Profiles matched.
    pub profiles: usize,
    /// Profiles per second.
    pub profiles_per_second: f64,
    /// Median time per profile, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// One point of the threshold sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// Threshold (match probability).
    pub threshold: f64,
    /// The score it takes in this database (log2 Bayes factor).
    pub threshold_bits: f64,
    /// Margin.
    pub margin: f64,
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F1.
    pub f1: f64,
    /// False-match rate on outsiders.
    pub false_match_rate: f64,
}

/// Everything the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct MatchBench {
    /// Search backend.
    pub backend: String,
    /// People in the index.
    pub people: u64,
    /// Accuracy at the configured threshold and margin.
    pub accuracy: Report,
    /// Threshold used (match probability).
    pub threshold: f64,
    /// The score it takes in this database (log2 Bayes factor).
    pub threshold_bits: f64,
    /// Margin used.
    pub margin: f64,
    /// Speed per concurrency.
    pub speed: Vec<SpeedRow>,
    /// F1 over thresholds and margins.
    pub sweep: Vec<SweepPoint>,
    /// Enrichment requests the stand-in served in the last run.
    pub enrichment_requests: u64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// Runs `sift bench match`.
pub async fn main(config: &Config, args: MatchBenchArgs) -> crate::Result<()> {
    let mut profiles = read_profiles(&args.data.join("profiles.jsonl"))?;
    if args.limit > 0 {
        profiles.truncate(args.limit);
    }
    let answers_path = args.data.join("enrichment.jsonl");
    let answers = if answers_path.exists() {
        crate::dbusa::person::read_answers(&answers_path)?
    } else {
        Vec::new()
    };
    let key = "bench-key".to_owned();
    let mut config = config.clone();
    config.enrich.api_key = key.clone();
    config.enrich.rate_per_minute = args.enrich_rate_per_minute;
    if let Some(wait) = args.pending_wait {
        config.enrich.pending_wait = wait;
    }
    let mut enrichment_requests = 0;
    let search = crate::backends::open_search(&config).await?;
    let people = search.count(&config.dbusa.index).await?;
    let inputs: Vec<_> = profiles.iter().map(ProfileIn::from).collect();
    let mut speed = Vec::new();
    let mut last: Vec<Outcome> = Vec::new();
    let mut prior_bits = 0.0;
    let mut threshold_bits = 0.0;
    for &concurrency in &args.concurrency {
        // A fresh stand-in (its 202-then-200 scripts start over) and a fresh
        // matcher (and enrichment cache) per run, so every run pays for the same calls.
        let server = standin::start(
            "127.0.0.1:0"
                .parse()
                .map_err(|e| crate::Error::Invalid(format!("{e}")))?,
            key.clone(),
            answers.clone(),
            standin::StandInOptions::default(),
        )
        .await?;
        config.enrich.url = server.url();
        // A fresh table of stored answers too: nothing carried over.
        let answers_dir =
            tempfile::tempdir().map_err(|e| crate::Error::io("creating a scratch directory", e))?;
        let table = Arc::new(crate::backends::table::EmbeddedTable::open(
            &answers_dir.path().join("enrichment.redb"),
        )?);
        let (matcher, _) = crate::matching::matcher_on(&config, search.clone(), table).await?;
        prior_bits = matcher.prior_bits();
        threshold_bits = matcher.threshold_bits();
        let started = Instant::now();
        let results: Vec<crate::Result<(Outcome, f64)>> =
            crate::matching::unordered_map(inputs.iter().collect(), concurrency, |p| {
                let matcher: Arc<Matcher> = matcher.clone();
                async move {
                    let t = Instant::now();
                    let o = matcher.match_profile(p).await?;
                    Ok((o, t.elapsed().as_secs_f64() * 1000.0))
                }
            })
            .await;
        let seconds = started.elapsed().as_secs_f64();
        enrichment_requests = server.requests();
        server.stop().await;
        let mut outcomes = Vec::with_capacity(results.len());
        let mut times = Vec::with_capacity(results.len());
        for r in results {
            let (o, ms) = r?;
            outcomes.push(o);
            times.push(ms);
        }
        times.sort_by(f64::total_cmp);
        let row = SpeedRow {
            concurrency,
            profiles: outcomes.len(),
            profiles_per_second: outcomes.len() as f64 / seconds.max(1e-9),
            p50_ms: percentile(&times, 0.5),
            p99_ms: percentile(&times, 0.99),
        };
        eprintln!(
            "concurrency {:>3}: {:>7.0} profiles/s, p50 {:.2} ms, p99 {:.2} ms",
            row.concurrency, row.profiles_per_second, row.p50_ms, row.p99_ms
        );
        speed.push(row);
        last = outcomes;
    }
    let candidates: Vec<Vec<String>> = last.iter().map(|o| o.candidate_ids.clone()).collect();
    let accuracy = evaluate(&profiles, &last, &candidates);
    let mut sweep = Vec::new();
    const PROBABILITIES: [f64; 17] = [
        0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99,
        0.999,
    ];
    for threshold in PROBABILITIES {
        let bits = crate::matching::score::score_for(threshold, prior_bits);
        for m in 0..=8 {
            let margin = m as f64 * 0.5;
            let decided: Vec<Outcome> = last
                .iter()
                .map(|o| {
                    let mut o = o.clone();
                    // A relative is set aside by its first name, whatever
                    // the threshold; the rest are decided again.
                    if o.reason == Reason::Relative {
                        return o;
                    }
                    if let (Some(score), Some(best)) = (o.score, o.best.clone()) {
                        o.reason = decide(score, o.runner_up, bits, margin);
                        o.dbusa_id = (o.reason == Reason::Matched).then_some(best);
                    }
                    o
                })
                .collect();
            let r = evaluate(&profiles, &decided, &candidates);
            sweep.push(SweepPoint {
                threshold,
                threshold_bits: (bits * 100.0).round() / 100.0,
                margin,
                precision: r.overall.precision,
                recall: r.overall.recall,
                f1: r.overall.f1,
                false_match_rate: r.false_match_rate,
            });
        }
    }
    let bench = MatchBench {
        backend: format!("{:?}", config.search.backend).to_lowercase(),
        people,
        accuracy,
        threshold: config.matching.threshold,
        threshold_bits,
        margin: config.matching.margin,
        speed,
        sweep,
        enrichment_requests,
    };
    println!(
        "{} profiles against {} people ({} index), threshold {} (score {:.2}) margin {}:\n",
        profiles.len(),
        bench.people,
        bench.backend,
        bench.threshold,
        bench.threshold_bits,
        bench.margin
    );
    println!("{}", table(&bench.accuracy));
    println!("unmatched by reason: {:?}", bench.accuracy.reasons);
    let mut best: Vec<&SweepPoint> = bench.sweep.iter().collect();
    best.sort_by(|a, b| b.f1.total_cmp(&a.f1));
    println!("\nbest threshold/margin by F1:");
    for p in best.iter().take(5) {
        println!(
            "  threshold {:>5.3} (score {:>5.2}) margin {:>3.1}: precision {:.4} recall {:.4} F1 {:.4} false-match rate {:.4}",
            p.threshold, p.threshold_bits, p.margin, p.precision, p.recall, p.f1, p.false_match_rate
        );
    }
    println!("\n| concurrency | profiles/s | p50 ms | p99 ms |\n|---:|---:|---:|---:|");
    for r in &bench.speed {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} |",
            r.concurrency, r.profiles_per_second, r.p50_ms, r.p99_ms
        );
    }
    println!("enrichment requests served: {}", bench.enrichment_requests);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&bench)
            .map_err(|e| crate::Error::Invalid(format!("cannot write the results: {e}")))?;
        std::fs::write(path, text)
            .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
    }
    Ok(())
}
