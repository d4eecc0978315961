//! `sift dbusa generate`: a synthetic consumer database drawn from the
//! census name frequencies and the ZIP code list, and a ground-truth file of
//! social profiles with labelled corruptions, for tests and benchmarks.
//! Production loads the client's real file, which has the same columns.
//!
//! Every person is a pure function of (seed, row number): row `i` draws from
//! its own ChaCha stream, so the output is the same byte for byte for the
//! same seed whatever the thread count, and rows are generated in parallel.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::person::{corruptions, Answer, Person, Profile, COLUMNS, NETWORKS};
use super::reference::{reference, Weighted, Zip};

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
    /// Profiles of people not in the database who live with someone who is
    /// ([`corruptions::HOUSEMATE`]); the enrichment API knows none of them.
    pub housemates: u64,
    /// Draw the profiles' people (and the housemates' members) from the
    /// first this many rows; 0 = all rows. Row `i` is the same person at
    /// every size, so databases of 200,000 and 30 million people with the
    /// same seed and `profile_rows` share their profiles exactly.
    pub profile_rows: u64,
}

/// What was written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generated {
    /// The database CSV.
    pub database: PathBuf,
    /// The profiles with their truth, JSON lines.
    pub profiles: PathBuf,
    /// People written.
    pub rows: u64,
    /// Profiles written (insiders and outsiders).
    pub profile_count: u64,
    /// Canned enrichment API answers for the profiles, JSON lines in the
    /// stand-in's format.
    pub enrichment: PathBuf,
    /// Answers written.
    pub answer_count: u64,
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

/// Every email address given out so far, so that no two people share one:
/// a mail provider gives an address to one person, and the next John Tate
/// who wants `jtate@aol.com` takes `jtate417@aol.com`. Kept as 64-bit
/// hashes (30 million addresses in about 600 MB); a hash that collides
/// only sends one more person to a numbered address.
#[derive(Default)]
struct Emails {
    taken: std::collections::HashSet<u64>,
}

impl Emails {
    fn key(email: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64(email.as_bytes())
    }

    /// Gives `email` to its holder if it is free, else the first free
    /// numbered variant of its local part (numbers drawn from `rng`, from
    /// 1–999 upwards); an empty address stays empty.
    fn claim(&mut self, email: &str, rng: &mut impl Rng) -> String {
        let Some((local, domain)) = email.split_once('@') else {
            return email.to_owned();
        };
        if self.taken.insert(Self::key(email)) {
            return email.to_owned();
        }
        let mut top = 1_000u64;
        loop {
            for _ in 0..8 {
                let candidate = format!("{local}{}@{domain}", rng.random_range(1..top));
                if self.taken.insert(Self::key(&candidate)) {
                    return candidate;
                }
            }
            top = top.saturating_mul(10);
        }
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

    /// Someone who lives with `member` and is not in the database: the
    /// same surname and address, another first name, their own phone,
    /// email and birth year. Drawn from streams 6 and 8.
    fn housemate(&self, k: u64, member: &Person) -> Person {
        let mut rng = self.rng(8, k);
        let names = if rng.random_bool(0.5) {
            &self.male
        } else {
            &self.female
        };
        let first = loop {
            let f = title(names.sample(&mut rng));
            if !f.eq_ignore_ascii_case(&member.first) {
                break f;
            }
        };
        // Everything else from a person of the outsiders' stream, so the
        // phone, email and birth year are a stranger's.
        let mut mate = self.person(6, k);
        mate.dbusa_id = String::new();
        mate.first = first;
        mate.last = member.last.clone();
        mate.address = member.address.clone();
        mate.city = member.city.clone();
        mate.state = member.state.clone();
        mate.zip = member.zip.clone();
        if !mate.email.is_empty() {
            let (f, l) = (mate.first.to_lowercase(), mate.last.to_lowercase());
            let domain = mate.email.split_once('@').map_or("example.com", |(_, d)| d);
            mate.email = format!("{f}.{l}{}@{domain}", rng.random_range(1..100));
        }
        mate
    }

    /// `person` with an email address no one else holds (see [`Emails`]);
    /// the numbers of a numbered address come from `stream`, row `i`.
    fn claimed(&self, emails: &mut Emails, mut person: Person, stream: u64, i: u64) -> Person {
        if !person.email.is_empty() {
            person.email = emails.claim(&person.email, &mut self.rng(stream, i));
        }
        person
    }

    /// A profile of `person`, corrupted as `corruption` says where it can be.
    fn profile(&self, n: u64, person: &Person, corruption: &'static str) -> Profile {
        let mut rng = self.rng(2, n);
        let (f, l) = (person.first.to_lowercase(), person.last.to_lowercase());
        let local = person.email.split_once('@').map(|(l, _)| l.to_owned());
        let handle = match rng.random_range(0..6) {
            0 => format!("{f}{l}"),
            1 => format!(
                "{}{l}{}",
                f.chars().next().unwrap_or('x'),
                person.birth_year % 100
            ),
            2 => format!("{f}_{l}{}", rng.random_range(1..1000)),
            3 => format!("{f}{l}{}", person.birth_year),
            // People reuse their email's local part as a handle.
            4 if local.is_some() => local.clone().unwrap_or_default(),
            _ => format!("{l}.{f}"),
        };
        let mut first = person.first.clone();
        let mut last = person.last.clone();
        let mut location = Some(written_place(&person.city, &person.state, &mut rng));
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
            corruptions::FIRST_TYPO => first = typo(&first, &mut rng),
            corruptions::MOVED_NEARBY => {
                let home = self
                    .zips
                    .iter()
                    .find(|z| z.zip == person.zip)
                    .map(|z| z.point);
                let state: Vec<&Zip> = self
                    .zips
                    .iter()
                    .filter(|z| z.state == person.state && z.city != person.city)
                    .collect();
                let near: Vec<&Zip> = state
                    .iter()
                    .copied()
                    .filter(|z| home.is_some_and(|h| super::names::distance_km(h, z.point) <= 40.0))
                    .collect();
                let pool = if near.is_empty() { &state } else { &near };
                if !pool.is_empty() {
                    let place = pool[rng.random_range(0..pool.len())];
                    location = Some(written_place(&place.city, &place.state, &mut rng));
                }
            }
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
                location = Some(written_place(&place.city, &place.state, &mut rng));
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

/// A place as people write it on a profile: `Austin, TX`, `Austin, Texas`,
/// `Austin TX`, `austin, tx`, `Austin, Texas, United States`, `Greater
/// Austin Area`, or the city alone.
fn written_place(city: &str, state: &str, rng: &mut impl Rng) -> String {
    match rng.random_range(0..7) {
        0 => format!("{city}, {state}"),
        1 => format!("{city}, {}", state_name(state)),
        2 => format!("{city} {state}"),
        3 => format!("{city}, {state}").to_lowercase(),
        4 => format!("{city}, {}, United States", state_name(state)),
        5 => format!("Greater {city} Area"),
        _ => city.to_owned(),
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

/// The year the canned enrichment answers are "as of" (ages are counted to it).
const ANSWERS_YEAR: u16 = 2026;

/// Chance the enrichment API knows a database person whose profile lacks a
/// name or a location.
const KNOWN_INSIDER: f64 = 0.85;
/// Chance a known person's lookup is queued first (`[202, 200]`).
const QUEUED: f64 = 0.10;
/// Chance the API knows someone who is not in the database: their own
/// details, which the matcher must not force onto a database person.
const KNOWN_OUTSIDER: f64 = 0.30;

/// A state's full name as FullContact writes it (`District of Columbia`).
fn state_name(code: &str) -> String {
    let code = code.to_ascii_lowercase();
    match super::names::STATES.iter().find(|(_, c)| *c == code) {
        Some((name, _)) => name
            .split(' ')
            .map(|w| if w == "of" { w.to_owned() } else { title(w) })
            .collect::<Vec<_>>()
            .join(" "),
        None => code.to_ascii_uppercase(),
    }
}

/// `person` as a Person Enrich v3 200 answer for the profile on `network`.
fn api_person(
    person: &Person,
    network: &str,
    handle: &str,
    rng: &mut impl Rng,
) -> serde_json::Value {
    use serde_json::{json, Value};
    let full = format!("{} {}", person.first, person.last);
    let region = state_name(&person.state);
    let formatted = format!("{}, {region}, United States", person.city);
    let age = ANSWERS_YEAR.saturating_sub(person.birth_year);
    let (start, end) = (age / 10 * 10, age / 10 * 10 + 9);
    let url = match network {
        "twitter" => format!("https://twitter.com/{handle}"),
        "instagram" => format!("https://www.instagram.com/{handle}"),
        "facebook" => format!("https://www.facebook.com/{handle}"),
        "linkedin" => format!("https://www.linkedin.com/in/{handle}"),
        _ => format!("https://www.tiktok.com/@{handle}"),
    };
    let emails: Vec<Value> = (!person.email.is_empty())
        .then(|| json!({"label": "personal", "value": person.email}))
        .into_iter()
        .collect();
    let digits: String = person.phone.chars().filter(char::is_ascii_digit).collect();
    let phones: Vec<Value> = rng
        .random_bool(0.5)
        .then(|| json!({"label": "mobile", "value": format!("+1{digits}")}))
        .into_iter()
        .collect();
    let mut profiles = serde_json::Map::new();
    profiles.insert(
        network.to_owned(),
        json!({"username": handle, "service": network, "url": url}),
    );
    json!({
        "fullName": full,
        "ageRange": format!("{start}-{end}"),
        "gender": null,
        "location": formatted,
        "title": null,
        "organization": null,
        "twitter": (network == "twitter").then_some(&url),
        "linkedin": (network == "linkedin").then_some(&url),
        "bio": null,
        "avatar": null,
        "website": null,
        "details": {
            "name": {"given": person.first, "family": person.last, "full": full},
            "age": {"range": {"start": start, "end": end}},
            "gender": null,
            "emails": emails,
            "phones": phones,
            "profiles": profiles,
            "locations": [{
                "label": "home",
                "city": person.city,
                "region": region,
                "regionCode": person.state,
                "country": "United States",
                "countryCode": "US",
                "formatted": formatted,
            }],
            "employment": [],
            "photos": [],
            "education": [],
            "urls": [],
            "interests": [],
        },
        "updated": format!("{ANSWERS_YEAR}-05-01"),
        "isSensitive": false,
    })
}

/// The enrichment API's canned answers for `profiles` (in their order before
/// the shuffle: insiders first, then outsiders, then housemates), each drawn
/// from its own stream 5 so the other files do not change. `people` holds
/// the person behind each insider and outsider, in the same order. A
/// (network, handle) held by more than one profile gets no answer: one
/// handle cannot be two people.
fn enrichment_answers(g: &Generator<'_>, people: &[&Person], profiles: &[Profile]) -> Vec<Answer> {
    let mut holders: HashMap<(&str, String), u32> = HashMap::new();
    for p in profiles {
        *holders
            .entry((p.network.as_str(), p.handle.to_lowercase()))
            .or_default() += 1;
    }
    profiles
        .par_iter()
        .enumerate()
        .filter_map(|(n, p)| {
            let mut rng = g.rng(5, n as u64);
            let insider = p.dbusa_id.is_some();
            let (person, chance) = if insider {
                match p.corruption.as_str() {
                    corruptions::MISSING_NAME
                    | corruptions::MISSING_LOCATION
                    | corruptions::BOTH_MISSING => (people[n], KNOWN_INSIDER),
                    _ => return None,
                }
            } else if p.corruption == corruptions::HOUSEMATE {
                return None;
            } else {
                (people[n], KNOWN_OUTSIDER)
            };
            if !rng.random_bool(chance) {
                return None;
            }
            let statuses = if insider && rng.random_bool(QUEUED) {
                vec![202, 200]
            } else {
                Vec::new()
            };
            let person_json = api_person(person, &p.network, &p.handle, &mut rng);
            let unique = holders
                .get(&(p.network.as_str(), p.handle.to_lowercase()))
                .is_some_and(|&k| k == 1);
            unique.then(|| Answer {
                service: p.network.clone(),
                username: p.handle.clone(),
                emails: (!person.email.is_empty())
                    .then(|| person.email.clone())
                    .into_iter()
                    .collect(),
                statuses,
                person: person_json,
            })
        })
        .collect()
}

/// Writes `out/dbusa.csv`, `out/profiles.jsonl` and `out/enrichment.jsonl`.
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
    // Which people get a profile: distinct rows drawn from the seed.
    let pool = if spec.profile_rows == 0 {
        spec.rows
    } else {
        spec.profile_rows.min(spec.rows)
    };
    if spec.profiles > pool {
        return Err(crate::Error::Invalid(format!(
            "--profiles {} is more than the {pool} rows profiles are drawn from",
            spec.profiles
        )));
    }
    let mut chosen = BTreeSet::new();
    let mut pick = g.rng(3, 0);
    while (chosen.len() as u64) < spec.profiles {
        chosen.insert(pick.random_range(0..pool));
    }

    // No two people share an email address. The people outside the
    // database claim theirs first, then the database's rows in order, so
    // the first rows' addresses (and the profiles drawn from them) are the
    // same at every --rows.
    let mut emails = Emails::default();
    let strangers: Vec<Person> = (0..spec.outsiders)
        .map(|k| g.claimed(&mut emails, g.person(1, k), 9, k))
        .collect();
    let mut pick_member = g.rng(7, 0);
    let mates: Vec<(Person, Person)> = (0..spec.housemates)
        .map(|k| {
            let member = g.person(0, pick_member.random_range(0..pool));
            let mate = g.claimed(&mut emails, g.housemate(k, &member), 10, k);
            (member, mate)
        })
        .collect();
    let mut members: HashMap<u64, Person> = HashMap::with_capacity(chosen.len());
    let mut start = 0;
    while start < spec.rows {
        let end = (start + CHUNK).min(spec.rows);
        let people: Vec<Person> = (start..end)
            .into_par_iter()
            .map(|i| g.person(0, i))
            .collect();
        let mut text = String::with_capacity(people.len() * 128);
        for (i, person) in (start..end).zip(people) {
            let person = g.claimed(&mut emails, person, 11, i);
            text.push_str(&csv_line(&person));
            if chosen.contains(&i) {
                members.insert(i, person);
            }
        }
        db.write_all(text.as_bytes())
            .map_err(|e| io(&database, e))?;
        start = end;
    }
    db.flush().map_err(|e| io(&database, e))?;
    drop(emails);

    let mut profiles: Vec<Profile> = chosen
        .iter()
        .enumerate()
        .map(|(n, row)| {
            let label = corruptions::ALL[n % corruptions::ALL.len()];
            g.profile(n as u64, &members[row], label)
        })
        .collect();
    let insiders = profiles.len() as u64;
    for (k, stranger) in strangers.iter().enumerate() {
        let n = insiders + k as u64;
        let mut p = g.profile(n, stranger, corruptions::NONE);
        p.dbusa_id = None;
        p.corruption = corruptions::NOT_IN_DB.to_owned();
        profiles.push(p);
    }
    for (k, (_, mate)) in mates.iter().enumerate() {
        let n = insiders + spec.outsiders + k as u64;
        let mut p = g.profile(n, mate, corruptions::NONE);
        p.dbusa_id = None;
        p.corruption = corruptions::HOUSEMATE.to_owned();
        profiles.push(p);
    }
    let people: Vec<&Person> = chosen
        .iter()
        .map(|row| &members[row])
        .chain(&strangers)
        .collect();
    let answers = enrichment_answers(&g, &people, &profiles);
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
    let enrichment = out.join("enrichment.jsonl");
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&enrichment).map_err(|e| io(&enrichment, e))?,
    );
    for a in &answers {
        serde_json::to_writer(&mut f, a)
            .map_err(|e| crate::Error::Invalid(format!("writing an enrichment answer: {e}")))?;
        f.write_all(b"\n").map_err(|e| io(&enrichment, e))?;
    }
    f.flush().map_err(|e| io(&enrichment, e))?;
    Ok(Generated {
        database,
        profiles: path,
        rows: spec.rows,
        profile_count: profiles.len() as u64,
        enrichment,
        answer_count: answers.len() as u64,
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
    fn state_names_are_written_as_fullcontact_does() {
        assert_eq!(state_name("MN"), "Minnesota");
        assert_eq!(state_name("dc"), "District of Columbia");
        assert_eq!(state_name("NY"), "New York");
        assert_eq!(state_name("ZZ"), "ZZ");
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let mut s = String::new();
        field(&mut s, "Washington, DC \"x\"");
        assert_eq!(s, "\"Washington, DC \"\"x\"\"\"");
    }
}
