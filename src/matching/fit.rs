//! `sift match fit`: estimates the Fellegi-Sunter weights from labelled
//! profiles. `m` (how often each comparison level occurs for the same
//! person) comes from each labelled profile against its true person; `u`
//! (how often it occurs for different people) from the same profiles
//! against people drawn at random from the database. Nothing needs the
//! search index, so fitting takes seconds.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::matcher::{probe_of, ProfileIn};
use super::score::{compare, weights_from, Candidate, LevelCounts, Weights};
use crate::dbusa::generate::{Person, Profile};

/// `sift match fit` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct FitArgs {
    /// The database CSV (`sift dbusa generate` writes `dbusa.csv`).
    #[arg(long)]
    pub db: PathBuf,
    /// Labelled profiles, JSON lines with `dbusa_id` (`profiles.jsonl`).
    #[arg(long)]
    pub profiles: PathBuf,
    /// Random non-matching people compared with each profile, for `u`.
    #[arg(long, default_value_t = 200)]
    pub pairs_per_profile: usize,
    /// Seed of the random pairs.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to write the weights (JSON).
    #[arg(long, short)]
    pub out: PathBuf,
}

/// Reads every person of a database CSV.
pub fn read_people(path: &Path) -> crate::Result<Vec<Person>> {
    let mut reader = csv::Reader::from_path(path)
        .map_err(|e| crate::Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let mut people = Vec::new();
    for (i, row) in reader.deserialize::<Person>().enumerate() {
        people.push(row.map_err(|e| {
            crate::Error::Invalid(format!("{} row {}: {e}", path.display(), i + 2))
        })?);
    }
    Ok(people)
}

/// Reads labelled profiles (JSON lines).
pub fn read_profiles(path: &Path) -> crate::Result<Vec<Profile>> {
    let file = std::fs::File::open(path)
        .map_err(|e| crate::Error::io(format!("opening {}", path.display()), e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| crate::Error::io(format!("reading {}", path.display()), e))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| {
            crate::Error::Invalid(format!("{} line {}: {e}", path.display(), i + 1))
        })?);
    }
    Ok(out)
}

/// What a labelled profile says, as the matcher sees it.
pub fn profile_in(p: &Profile) -> ProfileIn {
    ProfileIn {
        id: Some(p.id.clone()),
        network: p.network.clone(),
        handle: p.handle.clone(),
        name: p.name.clone(),
        location: p.location.clone(),
        email: p.email.clone(),
        phone: None,
    }
}

/// Estimates weights from `people` and labelled `profiles`.
pub fn fit(
    people: &[Person],
    profiles: &[Profile],
    pairs_per_profile: usize,
    seed: u64,
) -> Weights {
    let by_id: HashMap<&str, &Person> = people.iter().map(|p| (p.dbusa_id.as_str(), p)).collect();
    let chunks: Vec<(LevelCounts, LevelCounts, u64)> = profiles
        .par_iter()
        .enumerate()
        .map(|(i, profile)| {
            let probe = probe_of(&profile_in(profile));
            let mut m = LevelCounts::default();
            let mut u = LevelCounts::default();
            let truth = profile.dbusa_id.as_deref();
            if let Some(person) = truth.and_then(|id| by_id.get(id)) {
                m.add(&compare(&probe, &Candidate::new((*person).clone())));
            }
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            let mut drawn = 0;
            while drawn < pairs_per_profile && people.len() > 1 {
                let other = &people[rng.random_range(0..people.len())];
                if Some(other.dbusa_id.as_str()) == truth {
                    continue;
                }
                u.add(&compare(&probe, &Candidate::new(other.clone())));
                drawn += 1;
            }
            (m, u, drawn as u64)
        })
        .collect();
    let mut m = LevelCounts::default();
    let mut u = LevelCounts::default();
    let mut pairs = 0;
    for (cm, cu, n) in chunks {
        m.merge(&cm);
        u.merge(&cu);
        pairs += n;
    }
    let labelled = profiles.iter().filter(|p| p.dbusa_id.is_some()).count();
    weights_from(
        &m,
        &u,
        format!(
            "{labelled} labelled profiles against their people (m) and {pairs} random pairs (u), \
             {} people in the database",
            people.len()
        ),
    )
}

/// Runs `sift match fit`.
pub fn main(args: &FitArgs) -> crate::Result<()> {
    let started = std::time::Instant::now();
    let people = read_people(&args.db)?;
    let profiles = read_profiles(&args.profiles)?;
    let weights = fit(&people, &profiles, args.pairs_per_profile, args.seed);
    let text = serde_json::to_string_pretty(&weights)
        .map_err(|e| crate::Error::Invalid(format!("cannot write the weights: {e}")))?;
    std::fs::write(&args.out, text + "\n")
        .map_err(|e| crate::Error::io(format!("writing {}", args.out.display()), e))?;
    println!(
        "fitted on {} in {:.1} s; wrote {}",
        weights.fitted_on,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    for (field, levels) in &weights.fields {
        let parts: Vec<String> = levels
            .iter()
            .map(|(l, p)| format!("{} {:+.2}", l.name(), (p.m / p.u).log2()))
            .collect();
        println!("  {field:<9} {}", parts.join("  "));
    }
    Ok(())
}
