//! `sift bench feedback`: does the review loop teach the model? Analysts
//! are simulated, day by day, on labelled documents whose labels the model
//! never saw:
//!
//! 1. The data is split by source: a fixed **test** set (the validation
//!    part), a **seed** set the first model is trained on, and a **pool**
//!    that plays the unreviewed queue (its labels hidden from the model).
//! 2. Each day K documents of the pool are reviewed, in one of three
//!    orders: `uncertainty` (the review queue's default: lowest top-1 score
//!    first), `random`, or none at all (`none`: the model is never given a
//!    decision). The simulated analyst answers from the document's true
//!    tags: accepts the best-ranked right label among the 5, chooses a
//!    right one through the search when none of the 5 is right, and rejects
//!    the 5 when the document has no label the model knows.
//! 3. The model is retrained on the seed plus every decision so far, as
//!    `sift train` folds in feedback, and P@1 and hit@5 on the test set are
//!    recorded.
//!
//! The model retrained is the linear half of the shipped model (TF-IDF +
//! linear SVM): it retrains in seconds, so a month of days fits in minutes
//! on two cores; the transformer learns from the same decisions in the
//! daily run.
//!
//! It prints a table per day, how many reviews buy one point of hit@5 in
//! each order, and writes the curves as an SVG plot (`--plot`) and JSON
//! (`--output`).

use std::path::PathBuf;

use clap::Args;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use sift_training::metrics::{top_k, Evaluator, TOP_K};
use sift_training::{
    merge_feedback, Dataset, Document, Labels, LinearModel, LinearOptions, Part, SplitPlan,
};

use crate::train::TrainCommandError;

/// `sift bench feedback`.
#[derive(Debug, Clone, Args)]
pub struct FeedbackBenchArgs {
    /// Labelled JSON lines `{id, source, title, text, tags}`; default the bundled sample.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Simulated days.
    #[arg(long, default_value_t = 10)]
    pub days: u32,
    /// Documents reviewed per day.
    #[arg(long, default_value_t = 200)]
    pub per_day: usize,
    /// Share of the non-test documents the first model is trained on, percent.
    #[arg(long, default_value_t = 15)]
    pub seed_percent: u8,
    /// Seed of the random order and the seed/pool split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write the curves as an SVG plot here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// How the day's documents are picked from the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Lowest top-1 score first, as the review queue orders.
    Uncertainty,
    /// A seeded random order.
    Random,
    /// No reviews: the seed model every day.
    None,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Uncertainty => "uncertainty",
            Strategy::Random => "random",
            Strategy::None => "none",
        }
    }
}

/// One day of one strategy.
#[derive(Debug, Clone, Serialize)]
pub struct Day {
    /// 0 = the seed model.
    pub day: u32,
    /// Decisions so far.
    pub reviews: usize,
    /// Of today's: accepted one of the 5, chose another, rejected.
    pub accepted: usize,
    /// Chose a label through the search.
    pub chosen: usize,
    /// Rejected all 5.
    pub rejected: usize,
    /// Test P@1.
    pub p_at_1: f64,
    /// Test hit@5.
    pub hit_at_5: f64,
}

/// Everything the bench measured.
#[derive(Debug, Clone, Serialize)]
pub struct FeedbackReport {
    /// Documents in the seed, pool and test sets.
    pub seed_documents: usize,
    /// The simulated queue.
    pub pool_documents: usize,
    /// The fixed test set.
    pub test_documents: usize,
    /// Per strategy, per day.
    pub curves: Vec<(Strategy, Vec<Day>)>,
    /// Per strategy: reviews per point (0.01) of hit@5 gained by the last day.
    pub reviews_per_point: Vec<(Strategy, Option<f64>)>,
}

fn figures(model: &LinearModel, test: &[Document], labels: &Labels) -> (f64, f64) {
    use rayon::prelude::*;
    let rows: Vec<Vec<(u32, f32)>> = test
        .par_iter()
        .map(|d| top_k(&model.scores(&d.full_text()), TOP_K))
        .collect();
    let mut evaluator = Evaluator::new(labels.len());
    for (top, d) in rows.iter().zip(test) {
        let mut truth: Vec<u32> = labels.indices(&d.tags);
        truth.sort_unstable();
        evaluator.add(top, &truth);
    }
    let m = evaluator.finish(labels);
    (m.p_at_1, m.hit_at_5)
}

fn train(documents: &[Document], labels: &Labels) -> LinearModel {
    let texts: Vec<String> = documents.iter().map(Document::full_text).collect();
    let positives: Vec<Vec<u32>> = documents.iter().map(|d| labels.indices(&d.tags)).collect();
    let rejected: Vec<Vec<u32>> = documents
        .iter()
        .map(|d| labels.indices(&d.rejected))
        .collect();
    let examples: Vec<sift_training::linear::LinearExample<'_>> = texts
        .iter()
        .zip(positives.iter().zip(&rejected))
        .filter(|(_, (p, r))| !p.is_empty() || !r.is_empty())
        .map(
            |(text, (labels, rejected))| sift_training::linear::LinearExample {
                text,
                labels,
                rejected,
            },
        )
        .collect();
    // Word grams alone: retrained every simulated day, where character
    // grams would cost about 90 s each on the full set.
    let options = LinearOptions {
        char_grams: false,
        ..LinearOptions::default()
    };
    LinearModel::train(&examples, labels.len(), &options)
}

/// The simulated analyst's decision on a document given the model's top 5.
fn decide(doc: &Document, top: &[(u32, f32)], labels: &Labels) -> (Document, usize) {
    let known: Vec<u32> = labels.indices(&doc.tags);
    let mut decision = Document {
        id: doc.id.clone(),
        title: doc.title.clone(),
        text: doc.text.clone(),
        source: doc.source.clone(),
        tags: Vec::new(),
        rejected: Vec::new(),
        section: doc.section.clone(),
        url: doc.url.clone(),
    };
    if let Some(&(hit, _)) = top.iter().find(|(p, _)| known.contains(p)) {
        decision.tags = vec![labels.name(hit as usize).unwrap_or_default().to_owned()];
        (decision, 0)
    } else if let Some(&first) = known.first() {
        decision.tags = vec![labels.name(first as usize).unwrap_or_default().to_owned()];
        (decision, 1)
    } else {
        decision.rejected = top
            .iter()
            .filter_map(|&(p, _)| labels.name(p as usize).map(str::to_owned))
            .collect();
        (decision, 2)
    }
}

fn simulate(
    strategy: Strategy,
    seed_set: &[Document],
    pool: &[Document],
    test: &[Document],
    labels: &Labels,
    args: &FeedbackBenchArgs,
) -> Vec<Day> {
    use rayon::prelude::*;
    let mut model = train(seed_set, labels);
    let (p, h) = figures(&model, test, labels);
    let mut days = vec![Day {
        day: 0,
        reviews: 0,
        accepted: 0,
        chosen: 0,
        rejected: 0,
        p_at_1: p,
        hit_at_5: h,
    }];
    let mut waiting: Vec<usize> = (0..pool.len()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    waiting.shuffle(&mut rng);
    let mut feedback: Vec<Document> = Vec::new();
    for day in 1..=args.days {
        let mut counts = [0usize; 3];
        if strategy != Strategy::None && !waiting.is_empty() {
            // Score the queue with today's model.
            let tops: Vec<Vec<(u32, f32)>> = waiting
                .par_iter()
                .map(|&i| top_k(&model.scores(&pool[i].full_text()), TOP_K))
                .collect();
            let mut order: Vec<usize> = (0..waiting.len()).collect();
            if strategy == Strategy::Uncertainty {
                order.sort_by(|&a, &b| {
                    let sa = tops[a].first().map_or(f32::NEG_INFINITY, |t| t.1);
                    let sb = tops[b].first().map_or(f32::NEG_INFINITY, |t| t.1);
                    sa.total_cmp(&sb).then(a.cmp(&b))
                });
            }
            let picked: Vec<usize> = order.into_iter().take(args.per_day).collect();
            for &at in &picked {
                let (decision, kind) = decide(&pool[waiting[at]], &tops[at], labels);
                counts[kind] += 1;
                feedback.push(decision);
            }
            let mut taken: Vec<usize> = picked;
            taken.sort_unstable();
            for at in taken.into_iter().rev() {
                waiting.remove(at);
            }
            let mut documents = seed_set.to_vec();
            merge_feedback(&mut documents, feedback.clone());
            model = train(&documents, labels);
        }
        let (p, h) = figures(&model, test, labels);
        eprintln!(
            "{:<11} day {day:>2}: {:>5} reviews  P@1 {p:.4}  hit@5 {h:.4}",
            strategy.name(),
            feedback.len()
        );
        days.push(Day {
            day,
            reviews: feedback.len(),
            accepted: counts[0],
            chosen: counts[1],
            rejected: counts[2],
            p_at_1: p,
            hit_at_5: h,
        });
    }
    days
}

/// Runs the simulation for the three orders.
pub fn run(args: &FeedbackBenchArgs) -> Result<FeedbackReport, TrainCommandError> {
    let documents = match &args.data {
        Some(path) => {
            Dataset::open(path)
                .map_err(|e| TrainCommandError::Invalid(e.to_string()))?
                .documents
        }
        None => crate::train::bundled_documents()?,
    };
    let labels = Labels::from_documents(&documents);
    let plan = SplitPlan {
        validation_percent: 10,
        tuning_percent: 0,
        seen_percent: 0,
    };
    let (test, rest): (Vec<Document>, Vec<Document>) = documents
        .into_iter()
        .partition(|d| plan.part(d) == Part::Validation);
    let test: Vec<Document> = test.into_iter().filter(|d| !d.tags.is_empty()).collect();
    let mut rest = rest;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
    rest.shuffle(&mut rng);
    let seed_count = rest.len() * usize::from(args.seed_percent.min(100)) / 100;
    let pool = rest.split_off(seed_count);
    let seed_set = rest;
    if seed_set.is_empty() || pool.is_empty() || test.is_empty() {
        return Err(TrainCommandError::Invalid(format!(
            "{} seed, {} pool and {} test documents; each needs some (more data, or another \
             --seed-percent)",
            seed_set.len(),
            pool.len(),
            test.len()
        )));
    }
    eprintln!(
        "{} seed, {} pool (the queue), {} test documents; {} days of {} reviews",
        seed_set.len(),
        pool.len(),
        test.len(),
        args.days,
        args.per_day
    );
    let mut curves = Vec::new();
    for strategy in [Strategy::Uncertainty, Strategy::Random, Strategy::None] {
        curves.push((
            strategy,
            simulate(strategy, &seed_set, &pool, &test, &labels, args),
        ));
    }
    let reviews_per_point = curves
        .iter()
        .map(|(s, days)| {
            let (first, last) = (days.first(), days.last());
            let per_point = match (first, last) {
                (Some(f), Some(l)) if l.hit_at_5 > f.hit_at_5 && l.reviews > 0 => {
                    Some(l.reviews as f64 / ((l.hit_at_5 - f.hit_at_5) * 100.0))
                }
                _ => None,
            };
            (*s, per_point)
        })
        .collect();
    Ok(FeedbackReport {
        seed_documents: seed_set.len(),
        pool_documents: pool.len(),
        test_documents: test.len(),
        curves,
        reviews_per_point,
    })
}

/// The curves as a standalone SVG: hit@5 by day per order above, P@1
/// below, each on an axis fitted to its values.
pub fn plot(report: &FeedbackReport) -> String {
    use crate::review::charts::{lines_in, Series};
    let days: Vec<String> = report
        .curves
        .first()
        .map(|(_, d)| d.iter().map(|d| format!("day {}", d.day)).collect())
        .unwrap_or_default();
    let panel = |id: &str, title: &str, figure: fn(&Day) -> f64| {
        let series: Vec<Series> = report
            .curves
            .iter()
            .map(|(strategy, curve)| Series {
                name: strategy.name().to_owned(),
                points: curve
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (i, figure(d)))
                    .collect(),
            })
            .collect();
        let values = report.curves.iter().flat_map(|(_, c)| c.iter().map(figure));
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let pad = ((hi - lo) * 0.1).max(0.002);
        lines_in(id, title, &days, &series, (lo - pad, hi + pad)).into_string()
    };
    let hit = panel(
        "feedback-hit",
        "Test hit@5 by day of simulated reviews",
        |d| d.hit_at_5,
    );
    let p1 = panel("feedback-p1", "Test P@1 by day of simulated reviews", |d| {
        d.p_at_1
    });
    // Two panels stacked in one standalone file, with their own text style.
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" font-family=\"sans-serif\" font-size=\"11\" \
         viewBox=\"0 0 720 640\" width=\"720\" height=\"640\">\
         <text x=\"48\" y=\"14\" font-size=\"13\">hit@5 on the test set</text>\
         <g transform=\"translate(0,20)\">{}</g>\
         <text x=\"48\" y=\"334\" font-size=\"13\">P@1 on the test set</text>\
         <g transform=\"translate(0,340)\">{}</g></svg>",
        hit.replacen("<svg ", "<svg width=\"720\" height=\"300\" ", 1),
        p1.replacen("<svg ", "<svg width=\"720\" height=\"300\" ", 1)
    )
}

/// `sift bench feedback`.
pub fn main(args: FeedbackBenchArgs) -> Result<(), TrainCommandError> {
    let report = run(&args)?;
    println!("order        day  reviews   P@1     hit@5");
    for (strategy, days) in &report.curves {
        for d in days {
            println!(
                "{:<12} {:>3}  {:>7}  {:.4}  {:.4}",
                strategy.name(),
                d.day,
                d.reviews,
                d.p_at_1,
                d.hit_at_5
            );
        }
    }
    for (strategy, per_point) in &report.reviews_per_point {
        match per_point {
            Some(n) => println!("{}: {n:.0} reviews per point of hit@5", strategy.name()),
            None => println!("{}: no gain in hit@5", strategy.name()),
        }
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot(&report))
            .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
    }
    if let Some(path) = &args.output {
        let json = serde_json::to_vec_pretty(&report).expect("plain data serialises");
        std::fs::write(path, json)
            .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
    }
    Ok(())
}
