//! `sift match fit`: estimates the Fellegi-Sunter weights, with no labels
//! by default.
//!
//! - `u` (how often each comparison level occurs for different people)
//!   comes from the profiles against people drawn at random from the
//!   database (a reservoir sample of the CSV, so 30 million rows stream
//!   through in bounded memory).
//! - `m` (how often it occurs for the same person) comes, without labels,
//!   from expectation-maximisation over the candidate pairs the blocking
//!   query returns for a sample of profiles: each pair is a match with some
//!   probability, and the two classes' level shares and the share of
//!   matches are estimated together until they settle. With `--labels`, `m`
//!   comes from each labelled profile against its true person instead.
//! - The prior, the share of profiles whose person is in the database, comes
//!   from the same data (the expected matches per profile, or the labels),
//!   and with the number of people loaded it turns scores into match
//!   probabilities.
//!
//! Everything is seeded and summed in a fixed order, so a fit is
//! deterministic.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::matcher::{first_name_contradicts, probe_of, ProfileIn};
use super::score::{
    compare, weights_from, Candidate, Evidence, Field, Level, LevelCounts, Weights, FIELDS,
};
use crate::backends::SearchIndex;
use crate::config::Config;
use crate::dbusa::index::person_of;
use crate::dbusa::person::{read_profiles, Person, Profile};

/// `sift match fit` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct FitArgs {
    /// The database CSV (`sift dbusa generate` writes `dbusa.csv`): people
    /// drawn at random from it give `u`.
    #[arg(long)]
    pub db: PathBuf,
    /// Profiles, JSON lines (`profiles.jsonl`); labels (`dbusa_id`) are
    /// read only with `--labels`.
    #[arg(long)]
    pub profiles: PathBuf,
    /// Fit `m` from the labels (`dbusa_id`) instead of from the candidate
    /// pairs of the loaded database.
    #[arg(long)]
    pub labels: bool,
    /// Add the identity reviews (rows of `handles` a reviewer decided) to
    /// the labelled profiles; implies `--labels`.
    #[arg(long)]
    pub reviews: bool,
    /// Profiles whose candidate pairs the unlabelled fit reads.
    #[arg(long, default_value_t = 3000)]
    pub sample: usize,
    /// People drawn at random from the database for `u`.
    #[arg(long, default_value_t = 20_000)]
    pub random_people: usize,
    /// Random people compared with each profile, for `u`.
    #[arg(long, default_value_t = 200)]
    pub pairs_per_profile: usize,
    /// Seed of the random draws.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to write the weights (JSON).
    #[arg(long, short)]
    pub out: PathBuf,
}

/// People of a database CSV drawn at random (a seeded reservoir of `k`),
/// plus every person whose id is in `wanted`, read in one pass.
pub fn sample_people(
    path: &Path,
    k: usize,
    wanted: &HashSet<String>,
    seed: u64,
) -> crate::Result<(Vec<Person>, HashMap<String, Person>, u64)> {
    let mut reader = csv::Reader::from_path(path)
        .map_err(|e| crate::Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7265_7365_7276);
    let mut sample = Vec::with_capacity(k);
    let mut found = HashMap::new();
    let mut seen = 0u64;
    for (i, row) in reader.deserialize::<Person>().enumerate() {
        let person = row
            .map_err(|e| crate::Error::Invalid(format!("{} row {}: {e}", path.display(), i + 2)))?;
        seen += 1;
        if wanted.contains(&person.dbusa_id) {
            found.insert(person.dbusa_id.clone(), person.clone());
        }
        if sample.len() < k {
            sample.push(person);
        } else {
            let j = rng.random_range(0..seen);
            if (j as usize) < k {
                sample[j as usize] = person;
            }
        }
    }
    Ok((sample, found, seen))
}

/// `u` counts: each profile against `pairs` people drawn from `people`
/// (never its labelled person).
fn random_pairs(
    profiles: &[Profile],
    people: &[Person],
    pairs: usize,
    seed: u64,
) -> (LevelCounts, u64) {
    let chunks: Vec<(LevelCounts, u64)> = profiles
        .par_iter()
        .enumerate()
        .map(|(i, profile)| {
            let probe = probe_of(&ProfileIn::from(profile));
            let mut u = LevelCounts::default();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            let truth = profile.dbusa_id.as_deref();
            let mut drawn = 0;
            let mut tries = 0;
            while drawn < pairs && people.len() > 1 && tries < pairs * 4 {
                tries += 1;
                let other = &people[rng.random_range(0..people.len())];
                if Some(other.dbusa_id.as_str()) == truth {
                    continue;
                }
                u.add(&compare(&probe, &Candidate::new(other.clone())));
                drawn += 1;
            }
            (u, drawn as u64)
        })
        .collect();
    let mut u = LevelCounts::default();
    let mut n = 0;
    for (c, k) in chunks {
        u.merge(&c);
        n += k;
    }
    (u, n)
}

/// Estimates weights from labelled `profiles`: `m` from each against its
/// person (`truth`, by id), `u` from random people.
pub fn fit_labelled(
    truth: &HashMap<String, Person>,
    random: &[Person],
    people: u64,
    profiles: &[Profile],
    pairs_per_profile: usize,
    seed: u64,
) -> Weights {
    let mut m = LevelCounts::default();
    let mut labelled = 0;
    for profile in profiles {
        let Some(person) = profile.dbusa_id.as_deref().and_then(|id| truth.get(id)) else {
            continue;
        };
        labelled += 1;
        m.add(&compare(
            &probe_of(&ProfileIn::from(profile)),
            &Candidate::new(person.clone()),
        ));
    }
    let (u, pairs) = random_pairs(profiles, random, pairs_per_profile, seed);
    // The prior applies to profiles that reach the search: the share of
    // those whose person is in the database (as the unlabelled fit counts).
    let searchable: Vec<&Profile> = profiles
        .iter()
        .filter(|p| probe_of(&ProfileIn::from(*p)).searchable())
        .collect();
    let share = searchable.iter().filter(|p| p.dbusa_id.is_some()).count() as f64
        / searchable.len().max(1) as f64;
    weights_from(
        &m,
        &u,
        share,
        format!(
            "{labelled} labelled profiles of {} against their people (m) and {pairs} random pairs (u), \
             {people} people in the database",
            profiles.len()
        ),
    )
}

/// One candidate pair of the unlabelled fit.
type Pair = [Level; FIELDS];

/// The candidate pairs of each profile: its blocking query's hits compared
/// with it, less those the matcher sets aside as relatives. Profiles with
/// nothing to search for give none.
pub async fn candidate_pairs(
    search: Arc<dyn SearchIndex>,
    index: &str,
    profiles: &[Profile],
    candidates: usize,
) -> crate::Result<Vec<Vec<Pair>>> {
    let results = super::unordered_map(profiles.iter().collect(), 8, |p| {
        let search = search.clone();
        async move {
            let probe = probe_of(&ProfileIn::from(p));
            let Some(query) = super::block::query(&probe, candidates) else {
                return Ok(Vec::new());
            };
            let hits = search.search(index, &query).await?;
            Ok::<_, crate::Error>(
                hits.iter()
                    .filter_map(|h| person_of(&h.source))
                    .filter_map(|person| {
                        let levels = compare(&probe, &Candidate::new(person.clone()));
                        let evidence: Vec<Evidence> = Field::ALL
                            .into_iter()
                            .zip(levels)
                            .map(|(field, level)| Evidence {
                                field,
                                level,
                                weight: 0.0,
                            })
                            .collect();
                        // The matcher never takes a candidate whose full
                        // first name contradicts the profile's (a
                        // relative); neither can the match class here, or
                        // the housemates of members would teach it that a
                        // different first name is how a person looks.
                        (!first_name_contradicts(&probe, &person, &evidence)).then_some(levels)
                    })
                    .collect(),
            )
        }
    })
    .await;
    results.into_iter().collect()
}

/// What expectation-maximisation settled on.
#[derive(Debug, Clone)]
pub struct EmFit {
    /// Expected level counts of the matching pairs.
    pub m: LevelCounts,
    /// Share of candidate pairs that match.
    pub lambda: f64,
    /// Expected matches per profile with candidates.
    pub matches_per_profile: f64,
    /// Iterations run.
    pub iterations: usize,
}

/// A starting `m` that only says "more similar is likelier for the same
/// person": each level of a field half as likely as the one before it.
fn starting_m() -> HashMap<(Field, Level), f64> {
    let mut m = HashMap::new();
    for field in Field::ALL {
        let levels = field.levels();
        let total: f64 = (0..levels.len()).map(|i| 0.5f64.powi(i as i32)).sum();
        for (i, l) in levels.iter().enumerate() {
            m.insert((field, *l), 0.5f64.powi(i as i32) / total);
        }
    }
    m
}

fn shares(counts: &LevelCounts) -> HashMap<(Field, Level), f64> {
    let mut out = HashMap::new();
    for field in Field::ALL {
        for (l, p) in counts.probabilities(field) {
            out.insert((field, l), p);
        }
    }
    out
}

/// Expectation-maximisation over candidate pairs, with the structure a
/// profile's candidates have: either none of them is the profile's person
/// (probability 1 - pi), or exactly one is, any of them a priori. Each
/// pair's level vector has likelihood `m` under "this is the person" and
/// `u` under "someone else the search returned"; the E-step gives each
/// candidate its probability of being the one, the M-step re-estimates `m`,
/// the candidates' `u` and `pi`, until `pi` moves less than 1e-7 (at most
/// `max_iterations`). Namesakes and relatives come in numbers for every
/// profile; the match class can take only one of them per profile, so it
/// learns what sets the person apart rather than what the search shares.
/// `u_random` starts the non-match class.
pub fn em(pairs: &[Vec<Pair>], u_random: &LevelCounts, max_iterations: usize) -> EmFit {
    let profiles: Vec<&Vec<Pair>> = pairs.iter().filter(|p| !p.is_empty()).collect();
    let mut m = starting_m();
    let mut u = shares(u_random);
    let mut pi: f64 = 0.5;
    let mut m_counts = LevelCounts::default();
    let mut iterations = 0;
    let log_ratio =
        |levels: &Pair, m: &HashMap<(Field, Level), f64>, u: &HashMap<(Field, Level), f64>| {
            let mut r = 0.0;
            for (field, level) in Field::ALL.into_iter().zip(levels.iter()) {
                if *level == Level::Missing {
                    continue;
                }
                r += m.get(&(field, *level)).copied().unwrap_or(1e-9).ln()
                    - u.get(&(field, *level)).copied().unwrap_or(1e-9).ln();
            }
            r
        };
    let mut expected = 0.0;
    for it in 0..max_iterations {
        iterations = it + 1;
        let posteriors: Vec<Vec<f64>> = profiles
            .par_iter()
            .map(|candidates| {
                let n = candidates.len() as f64;
                let logs: Vec<f64> = candidates.iter().map(|c| log_ratio(c, &m, &u)).collect();
                // P(j) = (pi/n) r_j / ((1 - pi) + (pi/n) sum r_k), in logs.
                let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let scale = (pi / n).ln();
                let none = (1.0 - pi).ln() - top - scale;
                let sum: f64 = logs.iter().map(|l| (l - top).exp()).sum::<f64>() + none.exp();
                logs.iter().map(|l| (l - top).exp() / sum).collect()
            })
            .collect();
        m_counts = LevelCounts::default();
        let mut u_counts = LevelCounts::default();
        let mut total = 0.0;
        for (candidates, ps) in profiles.iter().zip(&posteriors) {
            for (levels, p) in candidates.iter().zip(ps) {
                m_counts.add_weighted(levels, *p);
                u_counts.add_weighted(levels, 1.0 - p);
                total += p;
            }
        }
        expected = total;
        let next = (total / profiles.len().max(1) as f64).clamp(1e-6, 1.0 - 1e-6);
        m = shares(&m_counts);
        u = shares(&u_counts);
        let settled = (next - pi).abs() < 1e-7;
        pi = next;
        if settled {
            break;
        }
    }
    EmFit {
        matches_per_profile: expected / profiles.len().max(1) as f64,
        m: m_counts,
        lambda: expected / pairs.iter().map(Vec::len).sum::<usize>().max(1) as f64,
        iterations,
    }
}

/// The profiles a reviewer decided, from `handles`, labelled with the
/// reviewer's choice (`dbusa_id` None for "none of these").
pub async fn reviewed_profiles(table: &dyn crate::backends::Table) -> crate::Result<Vec<Profile>> {
    use super::sink::{columns, HANDLES, HANDLES_FAMILY};
    let mut out = Vec::new();
    let families = [HANDLES_FAMILY];
    let scanned =
        crate::backends::table::scan_pages(table, HANDLES, Some(&families), 2_000, |row| {
            let cell = |q: &str| {
                row.get(HANDLES_FAMILY, q.as_bytes())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let (Some(choice), Some(profile)) = (
                cell(columns::REVIEW),
                row.get(HANDLES_FAMILY, columns::PROFILE.as_bytes())
                    .and_then(|v| serde_json::from_slice::<ProfileIn>(v).ok()),
            ) else {
                return;
            };
            out.push(Profile {
                id: profile
                    .id
                    .clone()
                    .unwrap_or_else(|| String::from_utf8_lossy(&row.key).into_owned()),
                network: profile.network,
                handle: profile.handle,
                name: profile.name,
                location: profile.location,
                email: profile.email,
                dbusa_id: (choice != "none").then_some(choice),
                corruption: "reviewed".to_owned(),
            });
        })
        .await;
    match scanned {
        Ok(()) | Err(crate::backends::table::TableError::NoSuchTable(_)) => Ok(out),
        Err(e) => Err(e.into()),
    }
}

/// Runs `sift match fit`.
pub async fn main(config: &Config, args: &FitArgs) -> crate::Result<()> {
    let started = std::time::Instant::now();
    let mut profiles = read_profiles(&args.profiles)?;
    let labelled = args.labels || args.reviews;
    if args.reviews {
        let table = crate::backends::open_table(config).await?;
        let reviewed = reviewed_profiles(table.as_ref()).await?;
        println!("{} identity reviews read as labels", reviewed.len());
        profiles.extend(reviewed);
    }
    let wanted: HashSet<String> = if labelled {
        profiles.iter().filter_map(|p| p.dbusa_id.clone()).collect()
    } else {
        HashSet::new()
    };
    let (random, truth, people) = sample_people(&args.db, args.random_people, &wanted, args.seed)?;
    let weights = if labelled {
        fit_labelled(
            &truth,
            &random,
            people,
            &profiles,
            args.pairs_per_profile,
            args.seed,
        )
    } else {
        // A seeded sample of the profiles, in file order; labels unread.
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        let mut picked: Vec<usize> = (0..profiles.len()).collect();
        for i in 0..picked.len().min(args.sample) {
            let j = rng.random_range(i..picked.len());
            picked.swap(i, j);
        }
        picked.truncate(args.sample);
        picked.sort_unstable();
        let sample: Vec<Profile> = picked
            .iter()
            .map(|&i| Profile {
                dbusa_id: None,
                corruption: String::new(),
                ..profiles[i].clone()
            })
            .collect();
        let search = crate::backends::open_search(config).await?;
        let index = &config.dbusa.index;
        let loaded = search.count(index).await?;
        let pairs = candidate_pairs(
            search,
            index,
            &sample,
            config.matching.candidates.max(1) as usize,
        )
        .await?;
        let (u, random_pairs_n) = random_pairs(&sample, &random, args.pairs_per_profile, args.seed);
        let fit = em(&pairs, &u, 200);
        let n_pairs: usize = pairs.iter().map(Vec::len).sum();
        weights_from(
            &fit.m,
            &u,
            fit.matches_per_profile.min(1.0),
            format!(
                "no labels: expectation-maximisation over {n_pairs} candidate pairs of {} profiles \
                 ({} iterations, {:.3} expected matches per profile) (m), {random_pairs_n} random \
                 pairs (u), {loaded} people in the index, {people} in the CSV",
                sample.len(),
                fit.iterations,
                fit.matches_per_profile
            ),
        )
    };
    let text = serde_json::to_string_pretty(&weights)
        .map_err(|e| crate::Error::Invalid(format!("cannot write the weights: {e}")))?;
    std::fs::write(&args.out, text + "\n")
        .map_err(|e| crate::Error::io(format!("writing {}", args.out.display()), e))?;
    println!(
        "fitted on {} in {:.1} s; member share {:.3}; wrote {}",
        weights.fitted_on,
        started.elapsed().as_secs_f64(),
        weights.member_share,
        args.out.display()
    );
    for (field, levels) in &weights.fields {
        let parts: Vec<String> = levels
            .iter()
            .map(|(l, p)| format!("{} {:+.2}", l.name(), (p.m / p.u).log2()))
            .collect();
        println!("  {field:<10} {}", parts.join("  "));
    }
    Ok(())
}
