//! `sift dbusa generate`: a synthetic consumer database drawn from the
//! census name frequencies and the ZIP code list, and a ground-truth file of
//! social profiles with labelled corruptions, for tests and benchmarks.
//! Production loads the client's real file, which has the same columns.
//!
//! Every person is a pure function of (seed, row number): row `i` draws from
//! its own ChaCha stream, so the output is the same byte for byte for the
//! same seed whatever the thread count, and rows are generated in parallel.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::reference::{reference, Weighted, Zip};

/// Columns of the database CSV, in order.
pub const COLUMNS: [&str; 11] = [
    "dbusa_id",
    "first",
    "middle",
    "last",
    "address",
    "city",
    "state",
    "zip",
    "phone",
    "email",
    "birth_year",
];

/// Social networks profiles come from.
pub const NETWORKS: [&str; 5] = ["twitter", "instagram", "facebook", "linkedin", "tiktok"];

/// What was done to a profile relative to its person (the ground-truth label).
pub mod corruptions {
    /// Name and location as in the database.
    pub const NONE: &str = "none";
    /// The first name replaced by a nickname (William → Bill).
    pub const NICKNAME: &str = "nickname";
    /// One letter of the surname replaced, inserted or deleted.
    pub const TYPO: &str = "typo";
    /// Two adjacent letters of the surname swapped.
    pub const TRANSPOSED: &str = "transposed";
    /// The location is another city than the database's.
    pub const MOVED: &str = "moved_city";
    /// No name on the profile.
    pub const MISSING_NAME: &str = "missing_name";
    /// No location on the profile.
    pub const MISSING_LOCATION: &str = "missing_location";
    /// Neither name nor location (only the handle, perhaps an email).
    pub const BOTH_MISSING: &str = "both_missing";
    /// A person who is not in the database.
    pub const NOT_IN_DB: &str = "not_in_db";
    /// Every label given to people in the database.
    pub const ALL: [&str; 8] = [
        NONE,
        NICKNAME,
        TYPO,
        TRANSPOSED,
        MOVED,
        MISSING_NAME,
        MISSING_LOCATION,
        BOTH_MISSING,
    ];
}

/// One person of the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    /// `DB` and 10 digits.
    pub dbusa_id: String,
    /// First name.
    pub first: String,
    /// Middle name or initial (may be empty).
    pub middle: String,
    /// Surname.
    pub last: String,
    /// Street address.
    pub address: String,
    /// City.
    pub city: String,
    /// Two-letter state.
    pub state: String,
    /// Five-digit ZIP code.
    pub zip: String,
    /// `NPA-NXX-XXXX`.
    pub phone: String,
    /// Email address (may be empty).
    pub email: String,
    /// Year of birth.
    pub birth_year: u16,
}

/// A social profile and the truth about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Profile id in the file.
    pub id: String,
    /// Network.
    pub network: String,
    /// Handle on that network.
    pub handle: String,
    /// Display name, when the profile shows one.
    pub name: Option<String>,
    /// Free-text location, when shown (`City, ST`).
    pub location: Option<String>,
    /// Email, when known.
    pub email: Option<String>,
    /// The person's database id; None for someone not in the database.
    pub dbusa_id: Option<String>,
    /// What was done to name and location ([`corruptions`]).
    pub corruption: String,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Spec {
    /// People in the database.
    pub rows: u64,
    /// Seed.
    pub seed: u64,
    /// Profiles of people in the database.
    pub profiles: u64,
    /// Profiles of people not in the database.
    pub outsiders: u64,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    /// The database CSV.
    pub database: PathBuf,
    /// The profiles with their truth, JSON lines.
    pub profiles: PathBuf,
    /// People written.
    pub rows: u64,
    /// Profiles written (insiders and outsiders).
    pub profile_count: u64,
}

/// Cumulative weights for sampling by frequency.
struct Sampler<'a> {
    items: &'a [Weighted],
    cumulative: Vec<f64>,
}

impl<'a> Sampler<'a> {
    fn new(items: &'a [Weighted]) -> Self {
        let mut total = 0.0;
        let cumulative = items
            .iter()
            .map(|w| {
                total += w.percent.max(0.0005);
                total
            })
            .collect();
        Sampler { items, cumulative }
    }

    fn sample(&self, rng: &mut impl Rng) -> &'a str {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let x = rng.random_range(0.0..total);
        let at = self.cumulative.partition_point(|&c| c <= x);
        &self.items[at.min(self.items.len() - 1)].name
    }
}

const STREETS: [&str; 40] = [
    "Main",
    "Oak",
    "Pine",
    "Maple",
    "Cedar",
    "Elm",
    "Washington",
    "Lake",
    "Hill",
    "Park",
    "Walnut",
    "Spring",
    "North",
    "Ridge",
    "Lincoln",
    "Church",
    "Willow",
    "Mill",
    "Sunset",
    "Railroad",
    "Jackson",
    "Cherry",
    "Highland",
    "Johnson",
    "Franklin",
    "Center",
    "River",
    "Chestnut",
    "Adams",
    "Jefferson",
    "Meadow",
    "Forest",
    "Madison",
    "Hickory",
    "Dogwood",
    "Lakeview",
    "Valley",
    "Broad",
    "Market",
    "Prospect",
];
const SUFFIXES: [&str; 9] = ["St", "Ave", "Rd", "Ln", "Dr", "Ct", "Blvd", "Way", "Pl"];
const DOMAINS: [&str; 6] = [
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "aol.com",
    "icloud.com",
    "hotmail.com",
];

/// Census names are upper case; people write them capitalised.
fn title(name: &str) -> String {
    let lower = name.to_lowercase();
    let mut chars = lower.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The generator's state: the reference data prepared for sampling.
struct Generator<'a> {
    seed: u64,
    male: Sampler<'a>,
    female: Sampler<'a>,
    last: Sampler<'a>,
    zips: &'a [Zip],
}

impl<'a> Generator<'a> {
    fn new(seed: u64) -> Self {
        let r = reference();
        Generator {
            seed,
            male: Sampler::new(&r.male),
            female: Sampler::new(&r.female),
            last: Sampler::new(&r.last),
            zips: &r.zips,
        }
    }

    /// The random stream of row `i` of `stream` (0: the database, 1: outsiders, 2: profiles).
    fn rng(&self, stream: u64, i: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (stream << 56));
        rng.set_stream(i);
        rng
    }

    fn person(&self, stream: u64, i: u64) -> Person {
        let mut rng = self.rng(stream, i);
        let names = if rng.random_bool(0.5) {
            &self.male
        } else {
            &self.female
        };
        let first = title(names.sample(&mut rng));
        let middle = match rng.random_range(0..4) {
            0 => String::new(),
            1 => names.sample(&mut rng).chars().take(1).collect(),
            _ => title(names.sample(&mut rng)),
        };
        let last = title(self.last.sample(&mut rng));
        let place = &self.zips[rng.random_range(0..self.zips.len())];
        let address = format!(
            "{} {} {}",
            rng.random_range(1..10_000),
            STREETS[rng.random_range(0..STREETS.len())],
            SUFFIXES[rng.random_range(0..SUFFIXES.len())]
        );
        let area = loop {
            let a = rng.random_range(201..990);
            if a % 100 != 11 {
                break a;
            }
        };
        let phone = format!(
            "{area}-{}-{:04}",
            rng.random_range(200..1000),
            rng.random_range(0..10_000)
        );
        let birth_year = rng.random_range(1930..2007);
        let email = if rng.random_bool(0.8) {
            let (f, l) = (first.to_lowercase(), last.to_lowercase());
            let local = match rng.random_range(0..4) {
                0 => format!("{f}.{l}"),
                1 => format!("{f}{l}{}", birth_year % 100),
                2 => format!("{}{l}", f.chars().next().unwrap_or('x')),
                _ => format!("{l}.{f}{}", rng.random_range(1..100)),
            };
            format!("{local}@{}", DOMAINS[rng.random_range(0..DOMAINS.len())])
        } else {
            String::new()
        };
        Person {
            dbusa_id: format!("DB{:010}", i + 1),
            first,
            middle,
            last,
            address,
            city: place.city.clone(),
            state: place.state.clone(),
            zip: place.zip.clone(),
            phone,
            email,
            birth_year,
        }
    }

    /// A profile of `person`, corrupted as `corruption` says where it can be.
    fn profile(&self, n: u64, person: &Person, corruption: &'static str) -> Profile {
        let mut rng = self.rng(2, n);
        let (f, l) = (person.first.to_lowercase(), person.last.to_lowercase());
        let handle = match rng.random_range(0..4) {
            0 => format!("{f}{l}"),
            1 => format!(
                "{}{l}{}",
                f.chars().next().unwrap_or('x'),
                person.birth_year % 100
            ),
            2 => format!("{f}_{l}{}", rng.random_range(1..1000)),
            _ => format!("{l}.{f}"),
        };
        let mut first = person.first.clone();
        let mut last = person.last.clone();
        let mut location = Some(format!("{}, {}", person.city, person.state));
        let mut label = corruption;
        match corruption {
            corruptions::NICKNAME => match reference().nicknames.get(&f) {
                Some(nicks) if !nicks.is_empty() => {
                    first = title(&nicks[rng.random_range(0..nicks.len())]);
                }
                _ => {
                    last = typo(&last, &mut rng);
                    label = corruptions::TYPO;
                }
            },
            corruptions::TYPO => last = typo(&last, &mut rng),
            corruptions::TRANSPOSED => {
                let chars: Vec<char> = last.chars().collect();
                // Positions after the first letter whose neighbour differs.
                let places: Vec<usize> = (1..chars.len().saturating_sub(1))
                    .filter(|&i| !chars[i].eq_ignore_ascii_case(&chars[i + 1]))
                    .collect();
                if !places.is_empty() {
                    let at = places[rng.random_range(0..places.len())];
                    let mut swapped = chars.clone();
                    swapped.swap(at, at + 1);
                    last = swapped.into_iter().collect();
                } else {
                    last = typo(&last, &mut rng);
                    label = corruptions::TYPO;
                }
            }
            corruptions::MOVED => {
                let place = &self.zips[rng.random_range(0..self.zips.len())];
                location = Some(format!("{}, {}", place.city, place.state));
            }
            _ => {}
        }
        let name = Some(format!("{first} {last}"));
        let (name, location) = match corruption {
            corruptions::MISSING_NAME => (None, location),
            corruptions::MISSING_LOCATION => (name, None),
            corruptions::BOTH_MISSING => (None, None),
            _ => (name, location),
        };
        let email =
            (!person.email.is_empty() && rng.random_bool(0.3)).then(|| person.email.clone());
        Profile {
            id: format!("p{:08}", n + 1),
            network: NETWORKS[rng.random_range(0..NETWORKS.len())].to_owned(),
            handle,
            name,
            location,
            email,
            dbusa_id: Some(person.dbusa_id.clone()),
            corruption: label.to_owned(),
        }
    }
}

/// One letter of `s` (after the first) replaced, inserted or deleted.
fn typo(s: &str, rng: &mut impl Rng) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    if chars.len() < 2 {
        chars.push('e');
        return chars.into_iter().collect();
    }
    let at = rng.random_range(1..chars.len());
    let letter = (b'a' + rng.random_range(0..26u8)) as char;
    match rng.random_range(0..3) {
        0 if chars[at] != letter => chars[at] = letter,
        1 => chars.insert(at, letter),
        _ if chars.len() > 3 => {
            chars.remove(at);
        }
        _ => chars.insert(at, letter),
    }
    chars.into_iter().collect()
}

/// A CSV field, quoted when it needs to be.
fn field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

fn csv_line(p: &Person) -> String {
    let mut line = String::with_capacity(128);
    let birth = p.birth_year.to_string();
    let values = [
        &p.dbusa_id,
        &p.first,
        &p.middle,
        &p.last,
        &p.address,
        &p.city,
        &p.state,
        &p.zip,
        &p.phone,
        &p.email,
        &birth,
    ];
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        field(&mut line, v);
    }
    line.push('\n');
    line
}

/// Rows generated per parallel chunk.
const CHUNK: u64 = 50_000;

/// Writes `out/dbusa.csv` and `out/profiles.jsonl`.
pub fn generate(spec: &Spec, out: &Path) -> crate::Result<Generated> {
    let io =
        |what: &Path, e: std::io::Error| crate::Error::io(format!("writing {}", what.display()), e);
    if spec.rows == 0 || spec.profiles > spec.rows {
        return Err(crate::Error::Invalid(format!(
            "sift dbusa generate needs --rows ≥ 1 and --profiles ≤ --rows (got {} and {})",
            spec.rows, spec.profiles
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let g = Generator::new(spec.seed);
    let database = out.join("dbusa.csv");
    let mut db =
        std::io::BufWriter::new(std::fs::File::create(&database).map_err(|e| io(&database, e))?);
    db.write_all(COLUMNS.join(",").as_bytes())
        .and_then(|_| db.write_all(b"\n"))
        .map_err(|e| io(&database, e))?;
    let mut start = 0;
    while start < spec.rows {
        let end = (start + CHUNK).min(spec.rows);
        let text: String = (start..end)
            .into_par_iter()
            .map(|i| csv_line(&g.person(0, i)))
            .collect();
        db.write_all(text.as_bytes())
            .map_err(|e| io(&database, e))?;
        start = end;
    }
    db.flush().map_err(|e| io(&database, e))?;

    // Which people get a profile: distinct rows drawn from the seed.
    let mut chosen = BTreeSet::new();
    let mut pick = g.rng(3, 0);
    while (chosen.len() as u64) < spec.profiles {
        chosen.insert(pick.random_range(0..spec.rows));
    }
    let mut profiles: Vec<Profile> = chosen
        .iter()
        .enumerate()
        .map(|(n, &row)| {
            let label = corruptions::ALL[n % corruptions::ALL.len()];
            g.profile(n as u64, &g.person(0, row), label)
        })
        .collect();
    let insiders = profiles.len() as u64;
    for k in 0..spec.outsiders {
        let n = insiders + k;
        let stranger = g.person(1, k);
        let mut p = g.profile(n, &stranger, corruptions::NONE);
        p.dbusa_id = None;
        p.corruption = corruptions::NOT_IN_DB.to_owned();
        profiles.push(p);
    }
    // Interleave insiders and outsiders so a prefix of the file is a fair sample.
    let mut order = g.rng(4, 0);
    for i in (1..profiles.len()).rev() {
        profiles.swap(i, order.random_range(0..=i));
    }
    let path = out.join("profiles.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| io(&path, e))?);
    for p in &profiles {
        serde_json::to_writer(&mut f, p)
            .map_err(|e| crate::Error::Invalid(format!("writing a profile: {e}")))?;
        f.write_all(b"\n").map_err(|e| io(&path, e))?;
    }
    f.flush().map_err(|e| io(&path, e))?;
    Ok(Generated {
        database,
        profiles: path,
        rows: spec.rows,
        profile_count: profiles.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_change_the_name() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for name in ["Smith", "Li", "O"] {
            for _ in 0..50 {
                assert_ne!(typo(name, &mut rng), name);
            }
        }
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let mut s = String::new();
        field(&mut s, "Washington, DC \"x\"");
        assert_eq!(s, "\"Washington, DC \"\"x\"\"\"");
    }
}
