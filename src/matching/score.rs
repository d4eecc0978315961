//! Fellegi-Sunter scoring: each field of a (profile, person) pair is put in
//! a comparison level, each level has a weight log2(m / u), and the pair's
//! score is the sum. `m` is how often the level occurs when the pair is the
//! same person, `u` when it is not; both are estimated from data
//! ([`fit`]: `m` from labelled pairs, `u` from random pairs of people) and
//! saved as a JSON file. A field missing on either side weighs 0.
//!
//! Agreeing on a name is adjusted by that name's frequency: the `u` of an
//! exact first-name or surname match is the share of people with that name
//! (from the census), so "Zabriskie" = "Zabriskie" weighs more than "Smith" =
//! "Smith", and "Ignatius" more than "John".

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::dbusa::generate::Person;
use crate::dbusa::index::phone_digits;
use crate::dbusa::names::{
    first_frequency, nickname_equivalent, normalize, phonetic, surname_frequency, surname_key,
    NameParts, Place,
};

/// The compared fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// First name.
    First,
    /// Surname.
    Last,
    /// City, state, ZIP.
    Location,
    /// Email address.
    Email,
    /// Phone number.
    Phone,
}

impl Field {
    /// Every field, in evidence order.
    pub const ALL: [Field; 5] = [
        Field::First,
        Field::Last,
        Field::Location,
        Field::Email,
        Field::Phone,
    ];

    /// The levels of this field, most similar first (`Missing` excluded).
    pub fn levels(self) -> &'static [Level] {
        use Level::*;
        match self {
            Field::First => &[Exact, Nickname, Jw92, Jw88, Phonetic, Initial, Other],
            Field::Last => &[Exact, Jw92, Jw88, Phonetic, Other],
            Field::Location => &[Zip, CityState, City, State, Other],
            Field::Email | Field::Phone => &[Exact, Other],
        }
    }

    /// The field's name in files and evidence.
    pub fn name(self) -> &'static str {
        match self {
            Field::First => "first",
            Field::Last => "last",
            Field::Location => "location",
            Field::Email => "email",
            Field::Phone => "phone",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Comparison levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Equal after normalisation.
    Exact,
    /// First names equivalent through the nickname table.
    Nickname,
    /// Jaro-Winkler similarity at least 0.92.
    Jw92,
    /// Jaro-Winkler similarity at least 0.88.
    Jw88,
    /// A Double Metaphone code in common.
    Phonetic,
    /// Only the initial is known on one side, and it agrees.
    Initial,
    /// Same five-digit ZIP code.
    Zip,
    /// Same city and state.
    CityState,
    /// Same city; the state is unknown on one side.
    City,
    /// Same state only.
    State,
    /// Known on both sides and different.
    Other,
    /// Unknown on either side; weighs 0.
    Missing,
}

impl Level {
    /// The level's name in files and evidence.
    pub fn name(self) -> &'static str {
        match self {
            Level::Exact => "exact",
            Level::Nickname => "nickname",
            Level::Jw92 => "jw92",
            Level::Jw88 => "jw88",
            Level::Phonetic => "phonetic",
            Level::Initial => "initial",
            Level::Zip => "zip",
            Level::CityState => "city_state",
            Level::City => "city",
            Level::State => "state",
            Level::Other => "other",
            Level::Missing => "missing",
        }
    }
}

/// What is known about a profile, normalised for comparison.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Probe {
    /// Name parts, when the profile (or the enrichment API) gave a usable name.
    pub name: Option<NameParts>,
    /// Place, when a location was given and something in it was recognised.
    pub place: Option<Place>,
    /// Lower-case email.
    pub email: Option<String>,
    /// Phone digits.
    pub phone: Option<String>,
}

impl Probe {
    /// Whether the probe has something a search can use.
    pub fn searchable(&self) -> bool {
        self.name.is_some() || self.email.is_some() || self.phone.is_some()
    }
}

/// A person from the index, normalised once for comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The person as stored.
    pub person: Person,
    first: String,
    last: String,
    city: String,
    state: String,
    email: String,
    phone: String,
}

impl Candidate {
    /// Normalises a person.
    pub fn new(person: Person) -> Self {
        Candidate {
            first: normalize(&person.first).replace(' ', ""),
            last: surname_key(&person.last),
            city: normalize(&person.city),
            state: person.state.to_ascii_lowercase(),
            email: person.email.trim().to_ascii_lowercase(),
            phone: phone_digits(&person.phone),
            person,
        }
    }
}

fn jw_level(a: &str, b: &str) -> Option<Level> {
    let s = strsim::jaro_winkler(a, b);
    if s >= 0.92 {
        Some(Level::Jw92)
    } else if s >= 0.88 {
        Some(Level::Jw88)
    } else {
        None
    }
}

fn phonetic_match(a: &str, b: &str) -> bool {
    let pa = phonetic(a);
    !pa.is_empty() && phonetic(b).iter().any(|c| pa.contains(c))
}

/// The level of the first names `a` (profile) and `b` (person).
pub fn first_level(a: &str, b: &str) -> Level {
    if a.is_empty() || b.is_empty() {
        Level::Missing
    } else if a == b {
        Level::Exact
    } else if nickname_equivalent(a, b) {
        Level::Nickname
    } else if a.len() == 1 || b.len() == 1 {
        if a[..1] == b[..1] {
            Level::Initial
        } else {
            Level::Other
        }
    } else if let Some(l) = jw_level(a, b) {
        l
    } else if phonetic_match(a, b) {
        Level::Phonetic
    } else {
        Level::Other
    }
}

/// The level of the surname keys `a` and `b`.
pub fn last_level(a: &str, b: &str) -> Level {
    if a.is_empty() || b.is_empty() {
        Level::Missing
    } else if a == b {
        Level::Exact
    } else if let Some(l) = jw_level(a, b) {
        l
    } else if phonetic_match(a, b) {
        Level::Phonetic
    } else {
        Level::Other
    }
}

/// The level of a profile's place against a person's.
pub fn location_level(p: Option<&Place>, c: &Candidate) -> Level {
    let Some(p) = p else { return Level::Missing };
    if !p.zip.is_empty() && p.zip == c.person.zip {
        return Level::Zip;
    }
    let city = !p.city.is_empty() && p.city == c.city;
    let state = !p.state.is_empty() && p.state == c.state;
    match (city, state) {
        (true, true) => Level::CityState,
        (true, false) if p.state.is_empty() => Level::City,
        (false, true) => Level::State,
        _ => Level::Other,
    }
}

fn exact_level(a: Option<&str>, b: &str) -> Level {
    match a {
        Some(a) if !a.is_empty() && !b.is_empty() => {
            if a == b {
                Level::Exact
            } else {
                Level::Other
            }
        }
        _ => Level::Missing,
    }
}

/// The comparison vector of a profile and a person.
pub fn compare(probe: &Probe, c: &Candidate) -> [Level; 5] {
    let (first, last) = match &probe.name {
        Some(n) => (
            first_level(&n.first, &c.first),
            last_level(&n.last, &c.last),
        ),
        None => (Level::Missing, Level::Missing),
    };
    [
        first,
        last,
        location_level(probe.place.as_ref(), c),
        exact_level(probe.email.as_deref(), &c.email),
        exact_level(probe.phone.as_deref(), &c.phone),
    ]
}

/// The `m` and `u` probabilities of one level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Probabilities {
    /// P(level | same person).
    pub m: f64,
    /// P(level | different people).
    pub u: f64,
}

/// The model: `m` and `u` per field and level, and the decision rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// File format version.
    pub version: u32,
    /// Per field, per level.
    pub fields: BTreeMap<Field, BTreeMap<Level, Probabilities>>,
    /// Smallest `u` used for a surname's frequency (names the census does not list).
    pub tf_floor: f64,
    /// What the weights were estimated from, for people reading the file.
    pub fitted_on: String,
}

/// Weights fitted on `sift dbusa generate --rows 100000 --profiles 5000
/// --outsiders 1000 --seed 42` (see `sift match fit`); used when
/// `match.weights` names no file.
const BUILT_IN: &str = include_str!("../../data/match/weights.json");

impl Weights {
    /// The weights built into sift.
    pub fn built_in() -> crate::Result<Self> {
        Self::parse(BUILT_IN, "the built-in weights")
    }

    /// Reads a weights file.
    pub fn read(path: &std::path::Path) -> crate::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::Error::io(format!("reading weights {}", path.display()), e))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, what: &str) -> crate::Result<Self> {
        let w: Weights = serde_json::from_str(text)
            .map_err(|e| crate::Error::Invalid(format!("{what} are not a weights file: {e}")))?;
        for field in Field::ALL {
            let levels = w.fields.get(&field).ok_or_else(|| {
                crate::Error::Invalid(format!("{what} have no levels for field `{field}`"))
            })?;
            for level in field.levels() {
                match levels.get(level) {
                    Some(p) if p.m > 0.0 && p.u > 0.0 => {}
                    _ => {
                        return Err(crate::Error::Invalid(format!(
                            "{what}: field `{field}` level `{}` needs m > 0 and u > 0",
                            level.name()
                        )))
                    }
                }
            }
        }
        Ok(w)
    }

    /// The weight (log2 m/u) of `level` of `field`. Names agreeing exactly
    /// use the name's frequency in the population as `u` (term-frequency
    /// adjustment): `value` is the candidate's normalised name.
    pub fn weight(&self, field: Field, level: Level, value: &str) -> f64 {
        if level == Level::Missing {
            return 0.0;
        }
        let Some(p) = self.fields.get(&field).and_then(|l| l.get(&level)) else {
            return 0.0;
        };
        let u = match (field, level) {
            (Field::Last, Level::Exact) => surname_frequency(value).max(self.tf_floor),
            (Field::First, Level::Exact) => first_frequency(value).max(self.tf_floor),
            _ => p.u,
        };
        (p.m / u).log2()
    }

    /// Scores a pair: the total and each field's level and weight.
    pub fn score(&self, probe: &Probe, c: &Candidate) -> Scored {
        let levels = compare(probe, c);
        let mut evidence = Vec::with_capacity(5);
        let mut total = 0.0;
        for (field, level) in Field::ALL.into_iter().zip(levels) {
            let value = match field {
                Field::First => c.first.as_str(),
                _ => c.last.as_str(),
            };
            let weight = self.weight(field, level, value);
            total += weight;
            evidence.push(Evidence {
                field,
                level,
                weight: (weight * 100.0).round() / 100.0,
            });
        }
        Scored {
            score: total,
            evidence,
        }
    }
}

/// One field's part of a score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The field.
    pub field: Field,
    /// Its comparison level.
    pub level: Level,
    /// Its weight, log2 odds (rounded to 0.01).
    pub weight: f64,
}

/// A scored pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Sum of the weights, log2 odds.
    pub score: f64,
    /// Per field.
    pub evidence: Vec<Evidence>,
}

/// Counts of levels, per field, for estimating probabilities.
#[derive(Debug, Clone, Default)]
pub struct LevelCounts {
    counts: BTreeMap<Field, BTreeMap<Level, u64>>,
}

impl LevelCounts {
    /// Counts one comparison vector (missing levels are not counted).
    pub fn add(&mut self, levels: &[Level; 5]) {
        for (field, level) in Field::ALL.into_iter().zip(levels) {
            if *level != Level::Missing {
                *self
                    .counts
                    .entry(field)
                    .or_default()
                    .entry(*level)
                    .or_default() += 1;
            }
        }
    }

    /// How often `level` of `field` was counted.
    pub fn count(&self, field: Field, level: Level) -> u64 {
        self.counts
            .get(&field)
            .and_then(|c| c.get(&level))
            .copied()
            .unwrap_or(0)
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, other: &LevelCounts) {
        for (field, levels) in &other.counts {
            let mine = self.counts.entry(*field).or_default();
            for (level, n) in levels {
                *mine.entry(*level).or_default() += n;
            }
        }
    }

    /// Each level's share of the field's non-missing comparisons, with half
    /// a count added to every level so none is 0.
    pub fn probabilities(&self, field: Field) -> BTreeMap<Level, f64> {
        let levels = field.levels();
        let counts = self.counts.get(&field);
        let count = |l: &Level| counts.and_then(|c| c.get(l)).copied().unwrap_or(0) as f64;
        let total: f64 = levels.iter().map(count).sum::<f64>() + 0.5 * levels.len() as f64;
        levels
            .iter()
            .map(|l| (*l, (count(l) + 0.5) / total))
            .collect()
    }
}

/// Builds weights from `m` counts (pairs known to be the same person) and
/// `u` counts (random pairs of different people).
pub fn weights_from(m: &LevelCounts, u: &LevelCounts, fitted_on: String) -> Weights {
    let fields = Field::ALL
        .into_iter()
        .map(|field| {
            let (pm, pu) = (m.probabilities(field), u.probabilities(field));
            let levels = field
                .levels()
                .iter()
                .map(|l| {
                    // A level never seen on either side has no evidence
                    // either way: weight 0, not the ratio of two smoothings.
                    let unseen = m.count(field, *l) == 0 && u.count(field, *l) == 0;
                    let (pm, pu) = (pm[l], pu[l]);
                    (
                        *l,
                        Probabilities {
                            m: round(if unseen { pu } else { pm }),
                            u: round(pu),
                        },
                    )
                })
                .collect();
            (field, levels)
        })
        .collect();
    Weights {
        version: 1,
        fields,
        tf_floor: 1e-6,
        fitted_on,
    }
}

/// Six significant digits: the file stays readable and diffs stay small.
fn round(x: f64) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    let scale = 10f64.powi(5 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(first: &str, last: &str, city: &str, state: &str) -> Person {
        Person {
            dbusa_id: "DB1".into(),
            first: first.into(),
            middle: String::new(),
            last: last.into(),
            address: String::new(),
            city: city.into(),
            state: state.into(),
            zip: "55101".into(),
            phone: "651-555-0101".into(),
            email: "w@x.com".into(),
            birth_year: 1970,
        }
    }

    #[test]
    fn levels_follow_the_comparison_rules() {
        assert_eq!(first_level("william", "william"), Level::Exact);
        assert_eq!(first_level("bill", "william"), Level::Nickname);
        assert_eq!(first_level("abcdefgh", "abcdefgx"), Level::Jw92);
        assert_eq!(first_level("w", "william"), Level::Initial);
        assert_eq!(first_level("mary", "william"), Level::Other);
        assert_eq!(first_level("", "william"), Level::Missing);
        assert_eq!(last_level("smith", "smith"), Level::Exact);
        assert_eq!(last_level("smiht", "smith"), Level::Jw92);
        assert_eq!(last_level("smith", "schmidt"), Level::Phonetic);
        assert_eq!(last_level("jones", "smith"), Level::Other);
        let c = Candidate::new(person("William", "Smith", "Saint Paul", "MN"));
        let place = |city: &str, state: &str| Place {
            city: city.into(),
            state: state.into(),
            zip: String::new(),
        };
        assert_eq!(
            location_level(Some(&place("saint paul", "mn")), &c),
            Level::CityState
        );
        assert_eq!(
            location_level(Some(&place("saint paul", "")), &c),
            Level::City
        );
        assert_eq!(
            location_level(Some(&place("duluth", "mn")), &c),
            Level::State
        );
        assert_eq!(
            location_level(Some(&place("austin", "tx")), &c),
            Level::Other
        );
        assert_eq!(location_level(None, &c), Level::Missing);
    }

    #[test]
    fn the_built_in_weights_load_and_rank_agreement_above_disagreement() -> anyhow::Result<()> {
        let w = Weights::built_in()?;
        let c = Candidate::new(person("William", "Smith", "Saint Paul", "MN"));
        let probe = |first: &str, last: &str, city: &str| Probe {
            name: Some(NameParts {
                first: first.into(),
                middle: String::new(),
                last: last.into(),
            }),
            place: Some(Place {
                city: city.into(),
                state: "mn".into(),
                zip: String::new(),
            }),
            email: None,
            phone: None,
        };
        let same = w.score(&probe("william", "smith", "saint paul"), &c).score;
        let nick = w.score(&probe("bill", "smith", "saint paul"), &c).score;
        let other = w.score(&probe("mary", "jones", "duluth"), &c).score;
        assert!(same > nick && nick > other, "{same} {nick} {other}");
        assert!(same > 0.0 && other < 0.0);
        // A rare surname weighs more than a common one.
        let rare = Candidate::new(person("William", "Zabriskie", "Saint Paul", "MN"));
        assert!(
            w.score(&probe("william", "zabriskie", "saint paul"), &rare)
                .score
                > same,
            "term frequency"
        );
        Ok(())
    }

    #[test]
    fn probabilities_are_smoothed_shares() {
        let mut counts = LevelCounts::default();
        for _ in 0..9 {
            counts.add(&[
                Level::Exact,
                Level::Exact,
                Level::Missing,
                Level::Missing,
                Level::Missing,
            ]);
        }
        counts.add(&[
            Level::Other,
            Level::Exact,
            Level::Missing,
            Level::Missing,
            Level::Missing,
        ]);
        let p = counts.probabilities(Field::First);
        let sum: f64 = p.values().sum();
        assert!((sum - 1.0).abs() < 1e-9);
        assert!(p[&Level::Exact] > 0.65 && p[&Level::Nickname] > 0.0);
    }
}
