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

use crate::dbusa::index::phone_digits;
use crate::dbusa::names::{
    city_point, distance_km, first_frequency, nickname_equivalent, normalize, phonetic,
    surname_frequency, surname_key, zip_point, NameParts, Place,
};
use crate::dbusa::person::Person;

/// The compared fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
    /// The handle against the local part of the person's email
    /// (`jdoe84` and `jdoe84@example.com`).
    Handle,
    /// Year-like digits in the handle against the birth year
    /// (`maria1984`, `jsmith84`).
    BirthYear,
}

impl Field {
    /// Every field, in evidence order.
    pub const ALL: [Field; FIELDS] = [
        Field::First,
        Field::Last,
        Field::Location,
        Field::Email,
        Field::Phone,
        Field::Handle,
        Field::BirthYear,
    ];

    /// The levels of this field, most similar first (`Missing` excluded).
    pub fn levels(self) -> &'static [Level] {
        use Level::*;
        match self {
            Field::First => &[Exact, Nickname, Typo, Jw92, Jw88, Phonetic, Initial, Other],
            Field::Last => &[Exact, Jw92, Jw88, Phonetic, Other],
            Field::Location => &[Zip, CityState, City, Nearby, State, Other],
            Field::Email | Field::Phone => &[Exact, Other],
            Field::Handle => &[Exact, Contains, Other],
            Field::BirthYear => &[Exact, TwoDigits, Other],
        }
    }

    /// Chains of levels whose weights must not increase along the chain:
    /// agreeing on more never weighs less than agreeing on less. Location
    /// goes by distance: the ZIP code, the city, another city within 50 km,
    /// the state, another state.
    fn monotone(self) -> &'static [&'static [Level]] {
        use Level::*;
        match self {
            Field::Location => &[&[Zip, CityState, Nearby, State, Other], &[City, Other]],
            Field::First => &[&[Exact, Typo, Other], &[Jw92, Jw88, Other]],
            Field::Last => &[&[Exact, Jw92, Jw88, Other], &[Phonetic, Other]],
            Field::Handle => &[&[Exact, Contains, Other]],
            Field::BirthYear => &[&[Exact, Other], &[TwoDigits, Other]],
            Field::Email | Field::Phone => &[&[Exact, Other]],
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
            Field::Handle => "handle",
            Field::BirthYear => "birth_year",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How many fields are compared.
pub const FIELDS: usize = 7;

/// Comparison levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Equal after normalisation.
    Exact,
    /// First names equivalent through the nickname table.
    Nickname,
    /// One letter replaced, inserted, deleted, or two adjacent letters
    /// swapped (names of four letters or more).
    Typo,
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
    /// Another city within 50 km (in the same state or across its line).
    Nearby,
    /// Same state only.
    State,
    /// The handle contains the email's local part or the other way round
    /// (five characters or more in common).
    Contains,
    /// Two digits in the handle equal the birth year's last two.
    TwoDigits,
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
            Level::Typo => "typo",
            Level::Jw92 => "jw92",
            Level::Jw88 => "jw88",
            Level::Phonetic => "phonetic",
            Level::Initial => "initial",
            Level::Zip => "zip",
            Level::CityState => "city_state",
            Level::City => "city",
            Level::Nearby => "nearby",
            Level::State => "state",
            Level::Contains => "contains",
            Level::TwoDigits => "two_digits",
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
    /// The handle's letters and digits, lower case (empty when unknown).
    pub handle: String,
    /// How common the profile's place is among the people loaded, when
    /// known: agreeing on a city where many of them live says less.
    pub place_share: Option<PlaceShare>,
}

/// The shares of the people loaded who live where a profile says: the `u`
/// of agreeing on that place (term-frequency adjustment, as for names).
/// "Chicago, IL" holds 0.2 % of a generated database against 0.003 % for
/// the median city; one average `u` for every city overstates agreement on
/// a large city by 4 to 5 bits, which is how non-members were matched to
/// namesakes in large cities as the database grew.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PlaceShare {
    /// Share of people with the profile's ZIP code (when it gave one).
    pub zip: Option<f64>,
    /// Share of people in the profile's city in its state.
    pub city_state: Option<f64>,
    /// Share of people in a city of that name, in any state (for a profile
    /// that names no state).
    pub city: Option<f64>,
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
    /// The email's local part, letters and digits only.
    local: String,
    point: Option<(f64, f64)>,
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
            local: person
                .email
                .split_once('@')
                .map(|(local, _)| handle_key(local))
                .unwrap_or_default(),
            point: zip_point(&person.zip),
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

/// Letters and digits of a handle or an email's local part, lower case
/// (`J.Doe_84` → `jdoe84`).
pub fn handle_key(s: &str) -> String {
    s.trim()
        .trim_start_matches('@')
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether `a` and `b` differ by one typing slip: a letter replaced,
/// inserted or deleted, or two neighbours swapped.
fn one_slip(a: &str, b: &str) -> bool {
    a.len().min(b.len()) >= 4 && strsim::osa_distance(a, b) == 1
}

/// The level of the first names `a` (profile) and `b` (person).
pub fn first_level(a: &str, b: &str) -> Level {
    if a.is_empty() || b.is_empty() {
        Level::Missing
    } else if a == b {
        Level::Exact
    } else if nickname_equivalent(a, b) {
        Level::Nickname
    } else if one_slip(a, b) {
        Level::Typo
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
        (false, _) if near(p, c) => Level::Nearby,
        (false, true) => Level::State,
        _ => Level::Other,
    }
}

/// How far another city may be to count as [`Level::Nearby`], km.
pub const NEARBY_KM: f64 = 50.0;

/// Whether the profile's city (with its state) lies within [`NEARBY_KM`]
/// of the person's ZIP code: a move across town or across a state line
/// nearby, not across the country.
fn near(p: &Place, c: &Candidate) -> bool {
    if p.city.is_empty() || p.state.is_empty() {
        return false;
    }
    match (city_point(&p.city, &p.state), c.point) {
        (Some(a), Some(b)) => distance_km(a, b) <= NEARBY_KM,
        _ => false,
    }
}

/// Whether an email's local part is nothing but the person's names (and an
/// initial): `robertwright`, `wright.robert`, `rwright`. A handle that
/// agrees with such a local part agrees with the names, which are scored
/// already; only what is left over (digits, other words) tells people
/// apart.
pub fn name_only(local: &str, first: &str, last: &str) -> bool {
    let mut rest = local.to_owned();
    for name in [last, first] {
        if name.len() >= 2 {
            rest = rest.replacen(name, "", 1);
        }
    }
    rest.is_empty() || (rest.len() == 1 && first.starts_with(rest.as_str()))
}

/// The handle's level against the local part, when what they share says
/// more than the person's names: a handle `howardjeffrey` inside the local
/// part `howardjeffrey47` shares only the names, which are scored already,
/// and every namesake's email would share it too.
fn handle_evidence(handle: &str, local: &str, first: &str, last: &str) -> Level {
    let level = handle_level(handle, local);
    let shared = match level {
        Level::Exact => local,
        Level::Contains if handle.len() < local.len() => handle,
        Level::Contains => local,
        _ => return level,
    };
    if name_only(shared, first, last) {
        Level::Missing
    } else {
        level
    }
}

/// The level of a handle (letters and digits) against the local part of the
/// person's email. One contains the other only where the shorter does not
/// cut a number of the longer: `javierblair85` is not inside
/// `javierblair850`, since 85 is not 850.
pub fn handle_level(handle: &str, local: &str) -> Level {
    if handle.is_empty() || local.is_empty() {
        Level::Missing
    } else if handle == local {
        Level::Exact
    } else if handle.len().min(local.len()) >= 5
        && (contains_whole(handle, local) || contains_whole(local, handle))
    {
        Level::Contains
    } else {
        Level::Other
    }
}

/// Whether `inner` occurs in `outer` with every number whole: where
/// `inner` starts or ends with a digit, the character of `outer` beside it
/// is not a digit.
fn contains_whole(outer: &str, inner: &str) -> bool {
    let digit_at = |s: &str, i: Option<usize>| {
        i.and_then(|i| s.as_bytes().get(i))
            .is_some_and(u8::is_ascii_digit)
    };
    let (starts, ends) = (
        digit_at(inner, Some(0)),
        digit_at(inner, inner.len().checked_sub(1)),
    );
    outer.match_indices(inner).any(|(at, _)| {
        let cuts_before = starts && digit_at(outer, at.checked_sub(1));
        let cuts_after = ends && digit_at(outer, Some(at + inner.len()));
        !(cuts_before || cuts_after)
    })
}

/// The level of the year-like digits in a handle against a birth year: a
/// run of four digits from 1900 to 2029 compares whole, a run of two with
/// the year's last two; other runs say nothing.
pub fn birth_year_level(handle: &str, birth_year: u16) -> Level {
    if birth_year == 0 {
        return Level::Missing;
    }
    let mut level = Level::Missing;
    for run in handle
        .split(|c: char| !c.is_ascii_digit())
        .filter(|r| !r.is_empty())
    {
        let agrees = match run.len() {
            4 => match run.parse::<u16>() {
                Ok(y) if (1900..2030).contains(&y) => y == birth_year,
                _ => continue,
            },
            2 => run.parse::<u16>().is_ok_and(|y| y == birth_year % 100),
            _ => continue,
        };
        if agrees {
            return if run.len() == 4 {
                Level::Exact
            } else {
                Level::TwoDigits
            };
        }
        level = Level::Other;
    }
    level
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
pub fn compare(probe: &Probe, c: &Candidate) -> [Level; FIELDS] {
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
        // A known email is compared whole; its local part against the
        // handle would count the same evidence twice.
        if probe.email.is_some() {
            Level::Missing
        } else {
            handle_evidence(&probe.handle, &c.local, &c.first, &c.last)
        },
        birth_year_level(&probe.handle, c.person.birth_year),
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
    /// Share of profiles whose person is in the database, as fitted: with
    /// the number of people loaded it makes the prior of a pair, so a
    /// match probability means the same at 200,000 and at 30 million.
    #[serde(default = "default_member_share")]
    pub member_share: f64,
    /// What the weights were estimated from, for people reading the file.
    pub fitted_on: String,
}

fn default_member_share() -> f64 {
    0.8
}

/// The log2 prior odds that a given candidate is the profile's person, in a
/// database of `people`: a member's person is one of them.
pub fn prior_bits(member_share: f64, people: u64) -> f64 {
    member_share.clamp(1e-9, 1.0).log2() - (people.max(1) as f64).log2()
}

/// The match probability of a score (log2 Bayes factor) given the prior.
pub fn probability(score: f64, prior_bits: f64) -> f64 {
    1.0 / (1.0 + (-(score + prior_bits)).exp2())
}

/// The score (log2 Bayes factor) at which the match probability is `p`.
pub fn score_for(p: f64, prior_bits: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).log2() - prior_bits
}

/// Weights fitted without labels on `sift dbusa generate --rows 100000
/// --profiles 5000 --outsiders 1000 --housemates 1000 --seed 42`, loaded
/// (`sift match fit`, no `--labels`); used when `match.weights` names no
/// file.
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
        let mut absent = Vec::new();
        for field in Field::ALL {
            for level in field.levels() {
                match w.fields.get(&field).and_then(|l| l.get(level)) {
                    Some(p) if p.m > 0.0 && p.u > 0.0 => {}
                    Some(_) => {
                        return Err(crate::Error::Invalid(format!(
                            "{what}: field `{field}` level `{}` needs m > 0 and u > 0",
                            level.name()
                        )))
                    }
                    None => absent.push(format!("{field} {}", level.name())),
                }
            }
        }
        if !absent.is_empty() {
            // A file fitted before a level existed: that level weighs 0
            // until `sift match fit` is run again.
            tracing::warn!(
                weights = what,
                levels = %absent.join(", "),
                "The weights have no figures for these levels; they weigh 0. Refit with `sift match fit`."
            );
        }
        Ok(w)
    }

    /// The weight (log2 m/u) of `level` of `field`. Names agreeing exactly
    /// use the name's frequency in the population as `u` (term-frequency
    /// adjustment): `value` is the candidate's normalised name.
    pub fn weight(&self, field: Field, level: Level, value: &str) -> f64 {
        self.weight_at(field, level, value, None)
    }

    /// [`Weights::weight`], with agreement on a place weighed by that
    /// place's share of the people loaded, where `place` knows it.
    pub fn weight_at(
        &self,
        field: Field,
        level: Level,
        value: &str,
        place: Option<&PlaceShare>,
    ) -> f64 {
        if level == Level::Missing {
            return 0.0;
        }
        let Some(p) = self.fields.get(&field).and_then(|l| l.get(&level)) else {
            return 0.0;
        };
        let share = |pick: fn(&PlaceShare) -> Option<f64>| {
            place
                .and_then(pick)
                .map_or(p.u, |share| share.max(self.tf_floor))
        };
        let u = match (field, level) {
            (Field::Last, Level::Exact) => surname_frequency(value).max(self.tf_floor),
            (Field::First, Level::Exact) => first_frequency(value).max(self.tf_floor),
            (Field::Location, Level::Zip) => share(|s| s.zip),
            (Field::Location, Level::CityState) => share(|s| s.city_state),
            (Field::Location, Level::City) => share(|s| s.city),
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
            let weight = self.weight_at(field, level, value, probe.place_share.as_ref());
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
    counts: BTreeMap<Field, BTreeMap<Level, f64>>,
}

impl LevelCounts {
    /// Counts one comparison vector (missing levels are not counted).
    pub fn add(&mut self, levels: &[Level; FIELDS]) {
        self.add_weighted(levels, 1.0);
    }

    /// Counts one comparison vector `share` times (expectation-maximisation
    /// counts a pair by its probability of being a match).
    pub fn add_weighted(&mut self, levels: &[Level; FIELDS], share: f64) {
        for (field, level) in Field::ALL.into_iter().zip(levels) {
            if *level != Level::Missing {
                *self
                    .counts
                    .entry(field)
                    .or_default()
                    .entry(*level)
                    .or_default() += share;
            }
        }
    }

    /// How often `level` of `field` was counted.
    pub fn count(&self, field: Field, level: Level) -> f64 {
        self.counts
            .get(&field)
            .and_then(|c| c.get(&level))
            .copied()
            .unwrap_or(0.0)
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
        let count = |l: &Level| counts.and_then(|c| c.get(l)).copied().unwrap_or(0.0);
        let total: f64 = levels.iter().map(count).sum::<f64>() + 0.5 * levels.len() as f64;
        levels
            .iter()
            .map(|l| (*l, (count(l) + 0.5) / total))
            .collect()
    }
}

/// Builds weights from `m` counts (pairs of the same person) and `u`
/// counts (random pairs of different people); `member_share` is the share
/// of profiles whose person is in the database.
pub fn weights_from(
    m: &LevelCounts,
    u: &LevelCounts,
    member_share: f64,
    fitted_on: String,
) -> Weights {
    let fields = Field::ALL
        .into_iter()
        .map(|field| {
            let (pm, pu) = (m.probabilities(field), u.probabilities(field));
            let mut levels: BTreeMap<Level, Probabilities> = field
                .levels()
                .iter()
                .map(|l| {
                    // A level never seen on either side has no evidence
                    // either way: weight 0, not the ratio of two smoothings.
                    let unseen = m.count(field, *l) == 0.0 && u.count(field, *l) == 0.0;
                    let (pm, pu) = (pm[l], pu[l]);
                    (
                        *l,
                        Probabilities {
                            m: if unseen { pu } else { pm },
                            u: pu,
                        },
                    )
                })
                .collect();
            make_monotone(field, &mut levels);
            for p in levels.values_mut() {
                p.m = round(p.m);
                p.u = round(p.u);
            }
            (field, levels)
        })
        .collect();
    Weights {
        version: 2,
        fields,
        tf_floor: 1e-6,
        member_share: round(member_share.clamp(1e-6, 1.0)),
        fitted_on,
    }
}

/// Pools neighbouring levels of each of the field's [`Field::monotone`]
/// chains whose weights go the wrong way (pool-adjacent-violators on
/// m / u): the pooled levels share one weight, their `u` unchanged and
/// their `m` summing as before. A few samples of a rare level cannot make
/// moving within the state cost more than moving out of it.
fn make_monotone(field: Field, levels: &mut BTreeMap<Level, Probabilities>) {
    for _ in 0..8 {
        let mut changed = false;
        for chain in field.monotone() {
            // Blocks of (levels, sum m, sum u), in chain order.
            let mut blocks: Vec<(Vec<Level>, f64, f64)> = Vec::new();
            for l in *chain {
                let Some(p) = levels.get(l) else { continue };
                blocks.push((vec![*l], p.m, p.u));
                while blocks.len() >= 2 {
                    let n = blocks.len();
                    let (a, b) = (&blocks[n - 2], &blocks[n - 1]);
                    if a.1 / a.2 >= b.1 / b.2 * (1.0 - 1e-9) {
                        break;
                    }
                    let Some(b) = blocks.pop() else { break };
                    if let Some(a) = blocks.last_mut() {
                        a.0.extend(b.0);
                        a.1 += b.1;
                        a.2 += b.2;
                    }
                    changed = true;
                }
            }
            for (members, m, u) in blocks {
                for l in members {
                    if let Some(p) = levels.get_mut(&l) {
                        p.m = p.u * m / u;
                    }
                }
            }
        }
        if !changed {
            break;
        }
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
        assert_eq!(first_level("abcdefgh", "abcdefgx"), Level::Typo);
        assert_eq!(first_level("christopher", "christophe"), Level::Typo);
        assert_eq!(first_level("christina", "christine"), Level::Typo);
        assert_eq!(
            first_level("abcdefghij", "abcdefghyx"),
            Level::Jw92,
            "two slips"
        );
        assert_eq!(first_level("w", "william"), Level::Initial);
        assert_eq!(
            first_level("wiliam", "william"),
            Level::Typo,
            "a letter dropped"
        );
        assert_eq!(
            first_level("wlliam", "william"),
            Level::Typo,
            "a letter replaced"
        );
        assert_eq!(
            first_level("wililam", "william"),
            Level::Typo,
            "neighbours swapped"
        );
        assert_ne!(
            first_level("jon", "joan"),
            Level::Typo,
            "short names are not typos"
        );
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
        // Minneapolis is 15 km from Saint Paul; Duluth 220.
        assert_eq!(
            location_level(Some(&place("minneapolis", "mn")), &c),
            Level::Nearby
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
            place_share: None,
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
            handle: String::new(),
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
    fn handles_are_compared_with_the_email_and_the_birth_year() {
        assert_eq!(handle_key("@J.Doe_84"), "jdoe84");
        assert_eq!(handle_level("jdoe84", "jdoe84"), Level::Exact);
        assert_eq!(handle_level("realjdoe84", "jdoe84"), Level::Contains);
        assert_eq!(handle_level("jdoe84real", "jdoe84"), Level::Contains);
        assert_eq!(handle_level("jdoe84", "xjdoe84"), Level::Contains);
        // A number is compared whole: 85 is not 850, 1 is not 1971.
        assert_eq!(
            handle_level("javierblair850", "javierblair85"),
            Level::Other
        );
        assert_eq!(handle_level("allenwhite1971", "allenwhite1"), Level::Other);
        assert_eq!(
            handle_level("roserodriguez8", "roserodriguez82"),
            Level::Other
        );
        assert_eq!(handle_level("7rwright", "17rwright"), Level::Other);
        assert_eq!(handle_level("rwright", "rwright2rw"), Level::Contains);
        assert_eq!(
            handle_level("jdoe", "jdoe84"),
            Level::Other,
            "too short to contain"
        );
        assert_eq!(handle_level("", "jdoe84"), Level::Missing);
        assert_eq!(handle_level("jdoe84", ""), Level::Missing);
        // A local part made of the names alone adds nothing to them.
        assert!(name_only("robertwright", "robert", "wright"));
        assert!(name_only("wrightrobert", "robert", "wright"));
        assert!(name_only("rwright", "robert", "wright"));
        assert!(!name_only("rwright84", "robert", "wright"));
        assert!(!name_only("bobthebuilder", "robert", "wright"));
        // Only what handle and local part share counts: the names alone,
        // inside a longer local part, do not.
        assert_eq!(
            handle_evidence("wrightrobert", "wrightrobert47", "robert", "wright"),
            Level::Missing
        );
        assert_eq!(
            handle_evidence("wrightrobert47x", "wrightrobert47", "robert", "wright"),
            Level::Contains
        );
        assert_eq!(
            handle_evidence("rwright84", "rwright84", "robert", "wright"),
            Level::Exact
        );
        assert_eq!(
            handle_evidence("robertwright", "robertwright", "robert", "wright"),
            Level::Missing
        );
        assert_eq!(
            handle_evidence("bobby", "robertwright", "robert", "wright"),
            Level::Other
        );
        assert_eq!(birth_year_level("maria1984", 1984), Level::Exact);
        assert_eq!(birth_year_level("maria1985", 1984), Level::Other);
        assert_eq!(birth_year_level("jsmith84", 1984), Level::TwoDigits);
        assert_eq!(birth_year_level("jsmith85", 1984), Level::Other);
        assert_eq!(
            birth_year_level("jsmith7", 1984),
            Level::Missing,
            "one digit says nothing"
        );
        assert_eq!(birth_year_level("jsmith123", 1984), Level::Missing);
        assert_eq!(birth_year_level("jsmith", 1984), Level::Missing);
        assert_eq!(
            birth_year_level("x84y1990", 1984),
            Level::TwoDigits,
            "any run agreeing"
        );
    }

    /// Weights out of order (moving within the state costing more than
    /// moving out of it) are pooled until they are monotone, and the pool
    /// keeps the total `m`.
    #[test]
    fn location_weights_fall_with_distance() {
        let mut m = LevelCounts::default();
        let mut u = LevelCounts::default();
        let loc = |l: Level| {
            let mut v = [Level::Missing; FIELDS];
            v[2] = l;
            v
        };
        for (level, nm, nu) in [
            (Level::Zip, 10.0, 1.0),
            (Level::CityState, 500.0, 10.0),
            (Level::City, 100.0, 10.0),
            (Level::Nearby, 5.0, 200.0),
            (Level::State, 20.0, 2000.0),
            (Level::Other, 100.0, 8000.0),
        ] {
            m.add_weighted(&loc(level), nm);
            u.add_weighted(&loc(level), nu);
        }
        let w = weights_from(&m, &u, 0.8, "test".into());
        let weight = |l: Level| w.weight(Field::Location, l, "");
        let chain = [
            Level::Zip,
            Level::CityState,
            Level::Nearby,
            Level::State,
            Level::Other,
        ];
        for pair in chain.windows(2) {
            assert!(
                weight(pair[0]) >= weight(pair[1]) - 1e-3,
                "{:?} {} < {:?} {}",
                pair[0],
                weight(pair[0]),
                pair[1],
                weight(pair[1])
            );
        }
        assert!(weight(Level::City) >= weight(Level::Other) - 1e-3);
        let m_total: f64 = w.fields[&Field::Location].values().map(|p| p.m).sum();
        assert!((m_total - 1.0).abs() < 1e-3, "{m_total}");
    }

    #[test]
    fn the_prior_follows_the_size_of_the_database() {
        // The same score is less sure among more people.
        let small = probability(20.0, prior_bits(0.8, 200_000));
        let large = probability(20.0, prior_bits(0.8, 30_000_000));
        assert!(small > 0.8 && large < 0.05, "{small} {large}");
        for people in [1_000, 200_000, 30_000_000] {
            let prior = prior_bits(0.8, people);
            let needed = score_for(0.9, prior);
            assert!((probability(needed, prior) - 0.9).abs() < 1e-9);
        }
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
            Level::Missing,
            Level::Missing,
        ]);
        let p = counts.probabilities(Field::First);
        let sum: f64 = p.values().sum();
        assert!((sum - 1.0).abs() < 1e-9);
        assert!(p[&Level::Exact] > 0.65 && p[&Level::Nickname] > 0.0);
    }

    proptest::proptest! {
        /// A handle and a local part whose numbers differ never contain
        /// one another, however the digits run on; with the numbers whole,
        /// the longer contains the shorter.
        #[test]
        fn numbers_are_compared_whole(
            name in "[a-z]{5,12}",
            number in "[0-9]{1,4}",
            more in "[0-9]{1,3}",
            before in "[a-z]{0,4}",
            after in "[a-z]{0,4}",
        ) {
            let short = format!("{name}{number}");
            let cut = format!("{before}{name}{number}{more}");
            proptest::prop_assert_eq!(handle_level(&short, &cut), Level::Other);
            proptest::prop_assert_eq!(handle_level(&cut, &short), Level::Other);
            let whole = format!("{before}{name}{number}{after}");
            let expected = if whole == short { Level::Exact } else { Level::Contains };
            proptest::prop_assert_eq!(handle_level(&short, &whole), expected);
        }
    }
}
