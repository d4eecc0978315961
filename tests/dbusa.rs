//! `sift dbusa generate`: the same seed gives the same files byte for byte,
//! another seed other files; the database follows the census frequencies;
//! every profile's truth points at a real row, with every corruption label
//! present, and outsiders point nowhere.

use std::collections::{BTreeMap, HashMap};

use anyhow::{ensure, Context, Result};
use sift::dbusa::generate::{corruptions, generate, Profile, Spec, COLUMNS};

fn spec(seed: u64) -> Spec {
    Spec {
        rows: 20_000,
        seed,
        profiles: 800,
        outsiders: 200,
    }
}

#[test]
fn the_same_seed_gives_the_same_files() -> Result<()> {
    let (a, b, c) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let ga = generate(&spec(7), a.path())?;
    generate(&spec(7), b.path())?;
    generate(&spec(8), c.path())?;
    for file in ["dbusa.csv", "profiles.jsonl", "enrichment.jsonl"] {
        let (x, y, z) = (
            std::fs::read(a.path().join(file))?,
            std::fs::read(b.path().join(file))?,
            std::fs::read(c.path().join(file))?,
        );
        ensure!(x == y, "{file} differs for the same seed");
        ensure!(x != z, "{file} is the same for another seed");
    }
    ensure!(ga.rows == 20_000 && ga.profile_count == 1_000);
    Ok(())
}

#[test]
fn rows_follow_the_census_and_profiles_point_at_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    generate(&spec(1), dir.path())?;
    let csv = std::fs::read_to_string(dir.path().join("dbusa.csv"))?;
    let mut lines = csv.lines();
    ensure!(lines.next() == Some(COLUMNS.join(",").as_str()));
    let mut people: HashMap<String, Vec<String>> = HashMap::new();
    let mut surnames: BTreeMap<String, u32> = BTreeMap::new();
    for line in lines {
        let cols: Vec<String> = line.split(',').map(str::to_owned).collect();
        ensure!(cols.len() == COLUMNS.len(), "{line}");
        ensure!(cols[7].len() == 5 && cols[6].len() == 2, "{line}");
        *surnames.entry(cols[3].clone()).or_default() += 1;
        people.insert(cols[0].clone(), cols);
    }
    ensure!(people.len() == 20_000, "{} distinct ids", people.len());
    // Smith is 1.006% of the census list: about 200 of 20,000.
    let smith = surnames.get("Smith").copied().unwrap_or(0);
    ensure!((120..300).contains(&smith), "{smith} Smiths");
    let top = surnames
        .iter()
        .max_by_key(|(_, n)| **n)
        .context("surnames")?;
    ensure!(top.0 == "Smith", "most common surname {top:?}");

    let mut labels: BTreeMap<String, u32> = BTreeMap::new();
    for line in std::fs::read_to_string(dir.path().join("profiles.jsonl"))?.lines() {
        let p: Profile = serde_json::from_str(line)?;
        *labels.entry(p.corruption.clone()).or_default() += 1;
        match &p.dbusa_id {
            None => ensure!(p.corruption == corruptions::NOT_IN_DB),
            Some(id) => {
                let person = people
                    .get(id)
                    .with_context(|| format!("{id} not in the database"))?;
                let full = format!("{} {}", person[1], person[3]);
                let place = format!("{}, {}", person[5], person[6]);
                match p.corruption.as_str() {
                    corruptions::NONE => {
                        ensure!(p.name.as_deref() == Some(full.as_str()), "{p:?}");
                        ensure!(p.location.as_deref() == Some(place.as_str()), "{p:?}");
                    }
                    corruptions::NICKNAME | corruptions::TYPO | corruptions::TRANSPOSED => {
                        ensure!(
                            p.name.is_some() && p.name.as_deref() != Some(full.as_str()),
                            "{p:?}"
                        );
                    }
                    corruptions::MISSING_NAME => ensure!(p.name.is_none() && p.location.is_some()),
                    corruptions::MISSING_LOCATION => {
                        ensure!(p.name.is_some() && p.location.is_none())
                    }
                    corruptions::BOTH_MISSING => ensure!(p.name.is_none() && p.location.is_none()),
                    _ => {}
                }
            }
        }
    }
    for label in corruptions::ALL.iter().chain([&corruptions::NOT_IN_DB]) {
        ensure!(labels.get(*label).copied().unwrap_or(0) >= 50, "{labels:?}");
    }
    Ok(())
}
