//! One profile to (at most) one person: enrichment when the profile lacks a
//! usable name or location, one blocking query, Fellegi-Sunter scores for
//! the candidates, and the decision (threshold and margin). The daemon and
//! the batch mode both call [`Matcher::match_profile`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::block;
use super::enrich::{EnrichError, EnrichRequest, EnrichSource, Enricher, Enrichment};
use super::score::{
    handle_key, prior_bits, probability, score_for, Candidate, Evidence, PlaceShare, Probe, Weights,
};
use crate::backends::search::{Clause, Query, SearchError, SearchIndex};
use crate::dbusa::index::{household_key, person_of, phone_digits};
use crate::dbusa::names::{normalize, parse_location, split_name, NameParts, Place};
use crate::dbusa::person::{Person, Profile};

/// A profile to match: what a social network shows about an account.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileIn {
    /// The caller's id for the profile (echoed in the output).
    #[serde(default)]
    pub id: Option<String>,
    /// Network (`twitter`, `instagram`, ...).
    pub network: String,
    /// Handle on that network.
    pub handle: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Free-text location.
    #[serde(default)]
    pub location: Option<String>,
    /// Email, when known.
    #[serde(default)]
    pub email: Option<String>,
    /// Phone, when known.
    #[serde(default)]
    pub phone: Option<String>,
}

impl From<&Profile> for ProfileIn {
    /// What a labelled profile says, as the matcher sees it.
    fn from(p: &Profile) -> Self {
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
}

impl ProfileIn {
    /// Network and handle as keys use them: lower case, trimmed, `@` dropped.
    pub fn key(&self) -> (String, String) {
        (
            self.network.trim().to_ascii_lowercase(),
            self.handle.trim().trim_start_matches('@').to_lowercase(),
        )
    }

    /// Checks what every profile needs; the reason names the problem.
    pub fn validate(&self) -> Result<(), String> {
        let (network, handle) = self.key();
        if network.is_empty() || handle.is_empty() {
            return Err("a profile needs a network and a handle".into());
        }
        if network.len() > 64
            || !network
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "network `{}` must be 1-64 characters of a-z, 0-9, `_` and `-`",
                self.network.chars().take(80).collect::<String>()
            ));
        }
        if handle.len() > 256 || handle.chars().any(|c| c.is_control() || c == ':') {
            return Err(
                "a handle must be at most 256 bytes with no control characters or `:`".into(),
            );
        }
        Ok(())
    }
}

/// Why a profile was or was not matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The best candidate cleared the threshold and the margin.
    Matched,
    /// The search found no one.
    NoCandidates,
    /// The best candidate scored below the threshold.
    BelowThreshold,
    /// The best two candidates were too close to tell apart.
    Ambiguous,
    /// No usable name, email or phone, and the enrichment API did not know the handle.
    EnrichmentNotFound,
    /// No usable name, email or phone, and the enrichment API queued the lookup.
    EnrichmentPending,
    /// No usable name, email or phone, and the enrichment API failed or refused.
    EnrichmentUnavailable,
    /// No usable name, email or phone, and enrichment is off.
    NoUsableFields,
    /// The best candidate cleared the threshold on surname and place, but
    /// the full first names disagree and no email or phone ties them: a
    /// relative in the household (or a namesake's sibling), not the person.
    Relative,
    /// A reviewer decided (the person, or none of the candidates).
    Reviewed,
}

impl Reason {
    /// The reason's name (metric label, output field).
    pub fn name(self) -> &'static str {
        match self {
            Reason::Matched => "matched",
            Reason::NoCandidates => "no_candidates",
            Reason::BelowThreshold => "below_threshold",
            Reason::Ambiguous => "ambiguous",
            Reason::EnrichmentNotFound => "enrichment_not_found",
            Reason::EnrichmentPending => "enrichment_pending",
            Reason::EnrichmentUnavailable => "enrichment_unavailable",
            Reason::NoUsableFields => "no_usable_fields",
            Reason::Relative => "relative",
            Reason::Reviewed => "reviewed",
        }
    }
}

/// What the enrichment API did for a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enriched {
    /// Not called (the profile had a name and a location, or enrichment is off).
    NotCalled,
    /// Found the person; fields the profile lacked were filled.
    Found,
    /// Answered from the cache: found.
    FoundCached,
    /// Did not know the handle.
    NotFound,
    /// Queued the lookup.
    Pending,
    /// Failed or refused.
    Failed,
}

/// The outcome of matching one profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The person, when matched.
    pub dbusa_id: Option<String>,
    /// Score of the best candidate (log2 Bayes factor), when there was one.
    pub score: Option<f64>,
    /// Its match probability: the score with the prior of a database of
    /// this size (rounded to 0.0001).
    #[serde(default)]
    pub probability: Option<f64>,
    /// Score of the runner-up.
    pub runner_up: Option<f64>,
    /// Why.
    pub reason: Reason,
    /// `search`, or `enrichment+search` when enrichment supplied fields.
    pub method: String,
    /// What the enrichment API did.
    pub enrichment: Enriched,
    /// Candidates the search returned.
    pub candidates: usize,
    /// The best candidate's id, matched or not (for review).
    pub best: Option<String>,
    /// Per-field levels and weights of the best candidate.
    pub evidence: Vec<Evidence>,
    /// The best [`TOP_CANDIDATES`] candidates with their scores and levels,
    /// best first: why the winner won, or why no one did (a tie, a
    /// relative just below).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<CandidateScore>,
    /// Ids of every candidate, best first (for measuring blocking; not written out).
    #[serde(skip)]
    pub candidate_ids: Vec<String>,
}

/// Candidates an [`Outcome`] explains.
pub const TOP_CANDIDATES: usize = 3;

/// One candidate as the decision saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateScore {
    /// The person's id.
    pub dbusa_id: String,
    /// Sum of the weights, log2 odds (rounded to 0.01).
    pub score: f64,
    /// Per field.
    pub evidence: Vec<Evidence>,
    /// The person as stored, so a reviewer sees what was compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<Person>,
}

/// A failure that stops a profile from being decided now; the caller retries.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    /// The search index failed.
    #[error("searching the consumer database: {0}")]
    Search(#[from] SearchError),
    /// The enrichment API refused the key: every lookup would fail alike.
    #[error("{0}")]
    EnrichmentKey(super::enrich::EnrichError),
    /// The table of enrichment answers failed: the profile waits for it.
    #[error("{0}")]
    EnrichmentStore(super::enrich::EnrichError),
}

/// Matches profiles. Cheap to share: every part is behind an `Arc` or immutable.
pub struct Matcher {
    search: Arc<dyn SearchIndex>,
    index: String,
    weights: Weights,
    candidates: usize,
    threshold: f64,
    prior_bits: f64,
    threshold_bits: f64,
    margin: f64,
    enricher: Option<Enricher>,
    /// People in the index, for the shares of places.
    people: u64,
    /// People per place (ZIP, city in a state, city name), counted in the
    /// index once per place and kept.
    place_counts: std::sync::Mutex<HashMap<PlaceKey, u64>>,
}

/// A place whose people the matcher counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PlaceKey {
    Zip(String),
    CityState(String, String),
    City(String),
}

/// Places counted before the cache starts over (a database holds about
/// 40,000 ZIP codes and 30,000 cities).
const PLACES_KEPT: usize = 200_000;

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matcher")
            .field("index", &self.index)
            .field("candidates", &self.candidates)
            .field("threshold", &self.threshold)
            .field("threshold_bits", &self.threshold_bits)
            .field("margin", &self.margin)
            .field("enrichment", &self.enricher.is_some())
            .finish_non_exhaustive()
    }
}

/// How a [`Matcher`] decides.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Search index of the consumer database.
    pub index: String,
    /// Candidates per profile.
    pub candidates: usize,
    /// Accept at or above this match probability...
    pub threshold: f64,
    /// ... when the runner-up is at least this much lower (log2).
    pub margin: f64,
    /// People in the index: with the weights' member share, the prior.
    pub people: u64,
}

impl Matcher {
    /// A matcher over `search` with these weights and rules; `enricher` is
    /// None when enrichment is off.
    pub fn new(
        search: Arc<dyn SearchIndex>,
        weights: Weights,
        rules: Rules,
        enricher: Option<Enricher>,
    ) -> Self {
        let prior = prior_bits(weights.member_share, rules.people);
        Matcher {
            search,
            index: rules.index,
            candidates: rules.candidates.max(1),
            threshold: rules.threshold,
            prior_bits: prior,
            threshold_bits: score_for(rules.threshold, prior),
            margin: rules.margin,
            weights,
            enricher,
            people: rules.people.max(1),
            place_counts: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The people of the index living where `place` says, as shares: the
    /// `u` of agreeing on that place.
    pub async fn place_share(&self, place: &Place) -> Result<PlaceShare, SearchError> {
        let filter = |key: &PlaceKey| -> Vec<Clause> {
            let term = |field: &str, value: &str| Clause::Term {
                field: field.to_owned(),
                value: serde_json::json!(value),
                boost: 1.0,
            };
            match key {
                PlaceKey::Zip(zip) => vec![term("zip", zip)],
                PlaceKey::CityState(city, state) => vec![term("city", city), term("state", state)],
                PlaceKey::City(city) => vec![term("city", city)],
            }
        };
        let mut share = PlaceShare::default();
        let keys = [
            (!place.zip.is_empty()).then(|| PlaceKey::Zip(place.zip.clone())),
            (!place.city.is_empty() && !place.state.is_empty())
                .then(|| PlaceKey::CityState(place.city.clone(), place.state.clone())),
            (!place.city.is_empty() && place.state.is_empty())
                .then(|| PlaceKey::City(place.city.clone())),
        ];
        for key in keys.into_iter().flatten() {
            let known = self
                .place_counts
                .lock()
                .ok()
                .and_then(|c| c.get(&key).copied());
            let count = match known {
                Some(n) => n,
                None => {
                    let query = Query {
                        filter: filter(&key),
                        ..Query::default()
                    };
                    let n = self.search.count_matching(&self.index, &query).await?;
                    if let Ok(mut counts) = self.place_counts.lock() {
                        if counts.len() >= PLACES_KEPT {
                            counts.clear();
                        }
                        counts.insert(key.clone(), n);
                    }
                    n
                }
            };
            let part = Some(count as f64 / self.people as f64);
            match key {
                PlaceKey::Zip(_) => share.zip = part,
                PlaceKey::CityState(..) => share.city_state = part,
                PlaceKey::City(_) => share.city = part,
            }
        }
        Ok(share)
    }

    /// The score (log2 Bayes factor) a candidate needs: the probability
    /// threshold under the prior of this database's size.
    pub fn threshold_bits(&self) -> f64 {
        self.threshold_bits
    }

    /// The log2 prior odds of a pair in this database.
    pub fn prior_bits(&self) -> f64 {
        self.prior_bits
    }

    /// Writes the enrichment client's counters to the table of answers (for
    /// `sift enrich stats`); a failure is logged, never fatal.
    pub async fn flush_enrich_stats(&self) {
        if let Some(enricher) = &self.enricher {
            if let Err(e) = enricher.flush_stats(super::enrich::instance()).await {
                tracing::warn!(error = %e, "Could not write the enrichment counters.");
            }
        }
    }

    /// The weights in use.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Matches one profile.
    pub async fn match_profile(&self, p: &ProfileIn) -> Result<Outcome, MatchError> {
        let started = Instant::now();
        let outcome = self.decide_profile(p).await;
        crate::metrics::global().match_seconds(started.elapsed().as_secs_f64());
        outcome
    }

    async fn decide_profile(&self, p: &ProfileIn) -> Result<Outcome, MatchError> {
        let mut probe = probe_of(p);
        let lacking = probe.name.is_none() || probe.place.is_none();
        let mut enriched = Enriched::NotCalled;
        let mut method = "search";
        if lacking {
            if let Some(enricher) = &self.enricher {
                let (network, handle) = p.key();
                let request = EnrichRequest {
                    network,
                    handle,
                    email: probe.email.clone(),
                    phone: probe.phone.clone(),
                };
                enriched = match enricher.enrich(&request).await {
                    Ok((Enrichment::Found(person), source)) => {
                        if fill(&mut probe, &person) {
                            method = "enrichment+search";
                        }
                        match source {
                            EnrichSource::Cache | EnrichSource::Stored => Enriched::FoundCached,
                            EnrichSource::Api => Enriched::Found,
                        }
                    }
                    Ok((Enrichment::NotFound, _)) => Enriched::NotFound,
                    Ok((Enrichment::Pending, _)) => Enriched::Pending,
                    Err(e @ EnrichError::KeyRefused { .. }) => {
                        return Err(MatchError::EnrichmentKey(e))
                    }
                    Err(e @ EnrichError::Store(_)) => return Err(MatchError::EnrichmentStore(e)),
                    Err(e) => {
                        log_enrich_error(&e);
                        Enriched::Failed
                    }
                };
            }
        }
        let unmatched = |reason: Reason| Outcome {
            dbusa_id: None,
            score: None,
            probability: None,
            runner_up: None,
            reason,
            method: method.to_owned(),
            enrichment: enriched,
            candidates: 0,
            best: None,
            evidence: Vec::new(),
            top: Vec::new(),
            candidate_ids: Vec::new(),
        };
        if let Some(place) = &probe.place {
            probe.place_share = Some(self.place_share(place).await?);
        }
        let Some(query) = block::query(&probe, self.candidates) else {
            return Ok(unmatched(match enriched {
                Enriched::NotFound => Reason::EnrichmentNotFound,
                Enriched::Pending => Reason::EnrichmentPending,
                Enriched::Failed => Reason::EnrichmentUnavailable,
                _ => Reason::NoUsableFields,
            }));
        };
        let hits = self.search.search(&self.index, &query).await?;
        let metrics = crate::metrics::global();
        metrics.match_candidates(hits.len());
        let mut scored: Vec<Scoring> = hits
            .iter()
            .filter_map(|h| person_of(&h.source))
            .map(|person| self.scoring(&probe, person))
            .collect();
        if scored.is_empty() {
            return Ok(unmatched(Reason::NoCandidates));
        }
        sort_scored(&mut scored);
        let candidates = scored.len();
        let candidate_ids: Vec<String> = scored.iter().map(|s| s.id().to_owned()).collect();
        let mut choice = self.choose(&scored);
        // A near first name (a typo, a sound-alike, an initial) decided the
        // match: the others of the person's household, from the index, may
        // fit the profile as well, and then no one can tell which it is.
        if choice.reason == Reason::Matched && near_first(&scored[choice.best].scored) {
            let household = household_key(&scored[choice.best].candidate.person);
            if !household.is_empty() {
                let query = Query {
                    should: vec![Clause::Term {
                        field: "household".to_owned(),
                        value: serde_json::json!(household),
                        boost: 1.0,
                    }],
                    min_should_match: 1,
                    k: 20,
                    ..Query::default()
                };
                let known: std::collections::HashSet<String> =
                    candidate_ids.iter().cloned().collect();
                let before = scored.len();
                for person in self
                    .search
                    .search(&self.index, &query)
                    .await?
                    .iter()
                    .filter_map(|h| person_of(&h.source))
                {
                    if !known.contains(&person.dbusa_id) {
                        scored.push(self.scoring(&probe, person));
                    }
                }
                if scored.len() > before {
                    sort_scored(&mut scored);
                    choice = self.choose(&scored);
                }
                if choice.reason == Reason::Matched {
                    let chosen = &scored[choice.best];
                    let rank = |s: &Scoring| first_rank(&s.scored);
                    if scored.iter().any(|s| {
                        s.id() != chosen.id()
                            && household_key(&s.candidate.person) == household
                            && rank(s) <= rank(chosen)
                    }) {
                        choice.reason = Reason::Ambiguous;
                    }
                }
            }
        }
        let top: Vec<CandidateScore> = scored
            .iter()
            .take(TOP_CANDIDATES)
            .map(|s| CandidateScore {
                dbusa_id: s.id().to_owned(),
                score: round2(s.scored.score),
                evidence: s.scored.evidence.clone(),
                person: Some(s.candidate.person.clone()),
            })
            .collect();
        let Choice {
            reason,
            best,
            runner_up,
        } = choice;
        let best = &scored[best];
        let best_id = best.id().to_owned();
        Ok(Outcome {
            dbusa_id: (reason == Reason::Matched).then(|| best_id.clone()),
            score: Some(round2(best.scored.score)),
            probability: Some(
                (probability(best.scored.score, self.prior_bits) * 1e4).round() / 1e4,
            ),
            runner_up: runner_up.map(round2),
            reason,
            method: method.to_owned(),
            enrichment: enriched,
            candidates,
            best: Some(best_id),
            evidence: best.scored.evidence.clone(),
            top,
            candidate_ids,
        })
    }

    fn scoring(&self, probe: &Probe, person: Person) -> Scoring {
        let candidate = Candidate::new(person);
        let scored = self.weights.score(probe, &candidate);
        let other = first_name_contradicts(probe, &candidate.person, &scored.evidence);
        Scoring {
            candidate,
            scored,
            other,
        }
    }

    /// The decision among scored candidates, best first. Candidates whose
    /// full first name contradicts the profile's are someone else; the
    /// decision is among the others.
    fn choose(&self, scored: &[Scoring]) -> Choice {
        let top = &scored[0];
        let mut people = scored.iter().enumerate().filter(|(_, s)| !s.other);
        let chosen = people.next();
        let runner_up = people.next().map(|(_, s)| s.scored.score);
        let (reason, best) = match chosen {
            Some((i, s)) => {
                let reason = decide(s.scored.score, runner_up, self.threshold_bits, self.margin);
                if reason != Reason::Matched && top.scored.score >= self.threshold_bits && i != 0 {
                    (Reason::Relative, 0)
                } else {
                    (reason, i)
                }
            }
            None if top.scored.score >= self.threshold_bits => (Reason::Relative, 0),
            None => (Reason::BelowThreshold, 0),
        };
        Choice {
            reason,
            best,
            runner_up,
        }
    }
}

/// A candidate as scored for one profile.
struct Scoring {
    candidate: Candidate,
    scored: super::score::Scored,
    /// Whose full first name contradicts the profile's.
    other: bool,
}

impl Scoring {
    fn id(&self) -> &str {
        &self.candidate.person.dbusa_id
    }
}

/// Best score first; ties by id, so decisions do not depend on the order
/// of the hits.
fn sort_scored(scored: &mut [Scoring]) {
    scored.sort_by(|a, b| {
        b.scored
            .score
            .total_cmp(&a.scored.score)
            .then_with(|| a.id().cmp(b.id()))
    });
}

/// A decision: the reason, the index of the candidate it is about, and the
/// runner-up's score.
struct Choice {
    reason: Reason,
    best: usize,
    runner_up: Option<f64>,
}

/// The first-name level of a scored pair.
fn first_of(s: &super::score::Scored) -> super::score::Level {
    use super::score::{Field, Level};
    s.evidence
        .iter()
        .find(|e| e.field == Field::First)
        .map_or(Level::Missing, |e| e.level)
}

/// Whether the first names only nearly agree: a typo, a similar spelling,
/// a sound-alike or an initial.
fn near_first(s: &super::score::Scored) -> bool {
    use super::score::Level;
    matches!(
        first_of(s),
        Level::Typo | Level::Jw92 | Level::Jw88 | Level::Phonetic | Level::Initial
    )
}

/// How well the first names agree, 0 best (the order of the field's levels).
fn first_rank(s: &super::score::Scored) -> usize {
    use super::score::Field;
    let level = first_of(s);
    Field::First
        .levels()
        .iter()
        .position(|l| *l == level)
        .unwrap_or(usize::MAX)
}

/// Whether `person` is someone other than the profile's person though
/// surname and place may agree: both full first names are known and
/// disagree (not a nickname, typo or sound-alike: level `other`), the
/// profile's first name is not the person's middle name (people go by
/// either), and no exact email or phone ties the two.
pub fn first_name_contradicts(probe: &Probe, person: &Person, evidence: &[Evidence]) -> bool {
    use super::score::{Field, Level};
    let level = |f: Field| evidence.iter().find(|e| e.field == f).map(|e| e.level);
    if level(Field::First) != Some(Level::Other)
        || level(Field::Email) == Some(Level::Exact)
        || level(Field::Phone) == Some(Level::Exact)
    {
        return false;
    }
    let Some(name) = &probe.name else {
        return false;
    };
    if name.first.len() < 2 {
        return false;
    }
    // People go by their middle name: the profile's first name may be the
    // person's middle name, or the person's first the profile's middle.
    let goes_by_middle = normalize(&person.middle)
        .split(' ')
        .any(|m| !m.is_empty() && m == name.first);
    let first = normalize(&person.first);
    let middle_is_first = name.middle.split(' ').any(|m| !m.is_empty() && m == first);
    !goes_by_middle && !middle_is_first
}

/// The decision rule: matched when the best score clears `threshold` and
/// the runner-up (if any) is at least `margin` below it.
pub fn decide(best: f64, runner_up: Option<f64>, threshold: f64, margin: f64) -> Reason {
    if best < threshold {
        Reason::BelowThreshold
    } else if runner_up.is_some_and(|r| best - r < margin) {
        Reason::Ambiguous
    } else {
        Reason::Matched
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn log_enrich_error(e: &EnrichError) {
    tracing::warn!(error = %e, "The enrichment API failed; matching with what the profile has.");
}

/// What a profile says, normalised.
pub fn probe_of(p: &ProfileIn) -> Probe {
    let place = p
        .location
        .as_deref()
        .map(parse_location)
        .filter(|pl| !pl.is_empty());
    let email = p
        .email
        .as_deref()
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| e.contains('@'));
    let phone = p
        .phone
        .as_deref()
        .map(phone_digits)
        .filter(|d| d.len() == 10);
    Probe {
        name: p.name.as_deref().and_then(split_name),
        place,
        email,
        phone,
        handle: handle_key(&p.handle),
        place_share: None,
    }
}

/// Fills what the probe lacks from an enriched person; true if anything was filled.
fn fill(probe: &mut Probe, person: &super::enrich::EnrichedPerson) -> bool {
    let mut filled = false;
    if probe.name.is_none() {
        let name = match (&person.given, &person.family) {
            (Some(g), Some(f)) if !g.trim().is_empty() && !f.trim().is_empty() => {
                let (first, last) = (normalize(g), crate::dbusa::names::surname_key(f));
                Some(NameParts {
                    first: first.split(' ').next().unwrap_or_default().to_owned(),
                    middle: String::new(),
                    last,
                })
            }
            _ => person.full_name.as_deref().and_then(split_name),
        };
        if name.is_some() {
            probe.name = name;
            filled = true;
        }
    }
    if probe.place.is_none() {
        let place = match (&person.city, &person.region_code) {
            (Some(c), Some(r)) if !c.trim().is_empty() => Place {
                city: normalize(c),
                state: r.trim().to_ascii_lowercase(),
                zip: String::new(),
            },
            _ => person
                .location
                .as_deref()
                .map(parse_location)
                .unwrap_or_default(),
        };
        if !place.is_empty() {
            probe.place = Some(place);
            filled = true;
        }
    }
    if probe.email.is_none() {
        if let Some(e) = person.emails.iter().find(|e| e.contains('@')) {
            probe.email = Some(e.trim().to_ascii_lowercase());
            filled = true;
        }
    }
    if probe.phone.is_none() {
        if let Some(d) = person
            .phones
            .iter()
            .map(|p| phone_digits(p))
            .find(|d| d.len() == 10)
        {
            probe.phone = Some(d);
            filled = true;
        }
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::super::score::{Field, Level};
    use super::*;
    use anyhow::Context;
    use Person;

    fn member(first: &str, middle: &str, email: &str) -> Person {
        Person {
            dbusa_id: "DB0000000001".into(),
            first: first.into(),
            middle: middle.into(),
            last: "Okonkwo".into(),
            address: "12 Elm St".into(),
            city: "Austin".into(),
            state: "TX".into(),
            zip: "78701".into(),
            phone: "512-555-0101".into(),
            email: email.into(),
            birth_year: 1980,
        }
    }

    fn profile(name: &str, email: Option<&str>) -> ProfileIn {
        ProfileIn {
            id: None,
            network: "twitter".into(),
            handle: "someone".into(),
            name: Some(name.into()),
            location: Some("Greater Austin Area".into()),
            email: email.map(str::to_owned),
            phone: None,
        }
    }

    /// Scores `name` against the member and says whether the member is
    /// ruled out as someone else, with the total score.
    fn relative(name: &str, email: Option<&str>, person: &Person) -> anyhow::Result<(bool, f64)> {
        let probe = probe_of(&profile(name, email));
        let scored = Weights::built_in()?.score(&probe, &Candidate::new(person.clone()));
        Ok((
            first_name_contradicts(&probe, person, &scored.evidence),
            scored.score,
        ))
    }

    /// The household case: a housemate with the member's rare surname and
    /// place, another first name. The surname and place alone clear the
    /// threshold; the first name says it is someone else.
    #[test]
    fn a_housemate_is_not_the_member() -> anyhow::Result<()> {
        let person = member("Chinedu", "", "chinedu.okonkwo@example.com");
        let (other, score) = relative("Adaeze Okonkwo", None, &person)?;
        assert!(other, "a housemate taken for the member (score {score})");
        // The member, as people write them: exactly, by a nickname-free
        // typo of the surname, by the middle name they go by, or with their
        // email.
        assert!(!relative("Chinedu Okonkwo", None, &person)?.0);
        assert!(!relative("Chinedu Okonkwu", None, &person)?.0);
        let goes_by_middle = member("Samuel", "Chinedu", "");
        assert!(!relative("Chinedu Okonkwo", None, &goes_by_middle)?.0);
        // A member whose middle name repeats the first is no one's middle
        // name match: a housemate is still a housemate.
        let james_james = member("James", "James", "");
        assert!(relative("Leslie Okonkwo", None, &james_james)?.0);
        assert!(
            !relative(
                "Adaeze Okonkwo",
                Some("chinedu.okonkwo@example.com"),
                &person
            )?
            .0,
            "an exact email ties the profile to the member"
        );
        let william = member("William", "", "");
        assert!(!relative("Bill Okonkwo", None, &william)?.0, "a nickname");
        assert!(!relative("W. Okonkwo", None, &william)?.0, "an initial");
        Ok(())
    }

    /// An embedded index `dbusa` holding `people`; the directory lives as
    /// long as the guard.
    async fn indexed(
        people: &[Person],
    ) -> anyhow::Result<(
        tempfile::TempDir,
        Arc<crate::backends::search::EmbeddedSearch>,
    )> {
        let dir = tempfile::tempdir()?;
        let search = Arc::new(crate::backends::search::EmbeddedSearch::open(dir.path())?);
        search
            .ensure_index(&crate::dbusa::index::spec("dbusa"))
            .await?;
        let docs = people.iter().map(crate::dbusa::index::person_doc).collect();
        search.bulk("dbusa", docs).await?;
        search.refresh("dbusa").await?;
        Ok((dir, search))
    }

    /// Agreeing on a place weighs by how many of the people loaded live
    /// there: a city holding most of them says little, a small town much.
    #[tokio::test]
    async fn places_weigh_by_how_many_people_live_there() -> anyhow::Result<()> {
        let at = |i: usize, first: &str, city: &str, state: &str, zip: &str| Person {
            dbusa_id: format!("DB{i:010}"),
            last: format!("Family{i}"),
            city: city.into(),
            state: state.into(),
            zip: zip.into(),
            ..member(first, "", "")
        };
        let mut people: Vec<Person> = (0..30)
            .map(|i| at(i, "John", "Chicago", "IL", "60601"))
            .collect();
        people.push(at(30, "John", "Ada", "OK", "74820"));
        people.push(at(31, "John", "Springfield", "IL", "62701"));
        people.push(at(32, "John", "Springfield", "MO", "65801"));
        let (_dir, search) = indexed(&people).await?;
        let index = "dbusa";
        let rules = Rules {
            index: index.into(),
            candidates: 5,
            threshold: 0.5,
            margin: 2.0,
            people: 33,
        };
        let matcher = Matcher::new(search, Weights::built_in()?, rules, None);
        let place = |location: &str| parse_location(location);
        let chicago = matcher.place_share(&place("Chicago, IL")).await?;
        assert_eq!(chicago.city_state, Some(30.0 / 33.0));
        assert_eq!((chicago.city, chicago.zip), (None, None));
        let ada = matcher.place_share(&place("Ada, OK")).await?;
        assert_eq!(ada.city_state, Some(1.0 / 33.0));
        // A city named without its state: every state's city of that name.
        let springfield = matcher.place_share(&place("Springfield")).await?;
        assert_eq!(springfield.city, Some(2.0 / 33.0), "{springfield:?}");
        let nowhere = matcher.place_share(&place("Tulsa, OK")).await?;
        assert_eq!(nowhere.city_state, Some(0.0));
        // Asked again, the same shares (from the counts kept).
        assert_eq!(matcher.place_share(&place("Chicago, IL")).await?, chicago);

        let weights = Weights::built_in()?;
        let location = |share: &PlaceShare| {
            weights.weight_at(Field::Location, Level::CityState, "", Some(share))
        };
        let average = weights.weight(Field::Location, Level::CityState, "");
        assert!(location(&ada) > location(&chicago) + 4.0);
        assert!(
            location(&chicago) < average,
            "{} against {average}",
            location(&chicago)
        );
        // Decided through the matcher: the same name and town, scored with
        // the town's share.
        let outcome = matcher
            .match_profile(&ProfileIn {
                location: Some("Ada, OK".into()),
                ..profile("John Family30", None)
            })
            .await?;
        let evidence = outcome
            .evidence
            .iter()
            .find(|e| e.field == Field::Location)
            .context("location evidence")?;
        assert_eq!(evidence.level, Level::CityState);
        assert!(
            (evidence.weight - location(&ada)).abs() < 0.01,
            "{outcome:?}"
        );
        Ok(())
    }

    /// The household in the index: two sisters who are both members, a
    /// sister who is not, and a namesake of one of them in another state.
    /// A profile with a member's full name is that member; a name that
    /// fits both sisters equally is not decided; the sister who is not a
    /// member is nobody's match.
    #[tokio::test]
    async fn the_household_decides_who_a_near_name_is() -> anyhow::Result<()> {
        let mut people = vec![
            Person {
                dbusa_id: "DB0000000001".into(),
                ..member("Christina", "", "")
            },
            Person {
                dbusa_id: "DB0000000002".into(),
                phone: "512-555-0199".into(),
                birth_year: 1983,
                ..member("Christine", "", "")
            },
            Person {
                dbusa_id: "DB0000000003".into(),
                address: "9 Oak Ave".into(),
                city: "Tulsa".into(),
                state: "OK".into(),
                zip: "74103".into(),
                phone: "918-555-0101".into(),
                ..member("Christina", "", "")
            },
        ];
        // Strangers with other surnames, so the index is not all family.
        for i in 4..40 {
            people.push(Person {
                dbusa_id: format!("DB{i:010}"),
                last: format!("Stranger{i}"),
                ..member("John", "", "")
            });
        }
        let (_dir, search) = indexed(&people).await?;
        let index = "dbusa";
        // One candidate per search: what the household adds comes from the
        // household lookup alone.
        let rules = Rules {
            index: index.into(),
            candidates: 1,
            threshold: 0.5,
            margin: 2.0,
            people: 200_000,
        };
        let matcher = Matcher::new(search, Weights::built_in()?, rules, None);
        let decide = |name: &'static str| {
            let p = ProfileIn {
                location: Some("Austin, TX".into()),
                ..profile(name, None)
            };
            let matcher = &matcher;
            async move { matcher.match_profile(&p).await }
        };
        let exact = decide("Christine Okonkwo").await?;
        assert_eq!(exact.dbusa_id.as_deref(), Some("DB0000000002"), "{exact:?}");
        let exact = decide("Christina Okonkwo").await?;
        assert_eq!(exact.dbusa_id.as_deref(), Some("DB0000000001"), "{exact:?}");
        // One letter from each sister: either could have written it. The
        // search returned one sister; her household brings the other.
        let near = decide("Christin Okonkwo").await?;
        assert!(near.dbusa_id.is_none(), "{near:?}");
        assert_eq!(near.reason, Reason::Ambiguous, "{near:?}");
        assert_eq!(near.candidates, 1);
        assert!(near.top.len() == 2, "{near:?}");
        // The sister who is not in the database.
        let housemate = decide("Adaeze Okonkwo").await?;
        assert!(housemate.dbusa_id.is_none(), "{housemate:?}");
        assert!(
            matches!(housemate.reason, Reason::Relative | Reason::BelowThreshold),
            "{housemate:?}"
        );
        Ok(())
    }
}
