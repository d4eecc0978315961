//! Blocking: one search query per profile that brings the right person among
//! the top k candidates, whatever is wrong with the profile. Every clause is
//! optional (`should`), so a typo in the surname, a nickname, or a move to
//! another state removes some evidence without excluding the person:
//!
//! - surname: exact (boost 4), fuzzy within 1-2 edits (2), Double Metaphone (2);
//! - first name: exact (2), canonical form through the nickname table (2),
//!   Double Metaphone (1), fuzzy (1), initial (0.5);
//! - place: ZIP (2), city (1.5), state (1);
//! - email and phone: exact (6 each; rarely shared by two people).
//!
//! The state is a scoring clause rather than a filter: a filter would drop
//! every person whose profile shows the city they moved to.

use serde_json::json;

use super::score::Probe;
use crate::backends::search::{Clause, Query};
use crate::dbusa::names::{canonical_first, phonetic};

fn term(field: &str, value: &str, boost: f32) -> Clause {
    Clause::Term {
        field: field.to_owned(),
        value: json!(value),
        boost,
    }
}

fn fuzzy(field: &str, value: &str, max_edits: u8, boost: f32) -> Clause {
    Clause::Fuzzy {
        field: field.to_owned(),
        value: value.to_owned(),
        max_edits,
        boost,
    }
}

/// Edits a fuzzy clause allows for a word of this length (as Elasticsearch's
/// `AUTO`: 0 up to 2 letters, 1 up to 5, else 2).
fn edits(word: &str) -> u8 {
    match word.chars().count() {
        0..=2 => 0,
        3..=5 => 1,
        _ => 2,
    }
}

/// The blocking query of a probe, returning the top `k`; None when the
/// probe has nothing a search can use (no name, email or phone).
pub fn query(probe: &Probe, k: usize) -> Option<Query> {
    if !probe.searchable() {
        return None;
    }
    let mut should = Vec::new();
    if let Some(n) = &probe.name {
        should.push(term("last", &n.last, 4.0));
        if edits(&n.last) > 0 {
            should.push(fuzzy("last", &n.last, edits(&n.last), 2.0));
        }
        for code in phonetic(&n.last) {
            should.push(term("last_dm", &code, 2.0));
        }
        if n.first.chars().count() > 1 {
            should.push(term("first", &n.first, 2.0));
            for c in canonical_first(&n.first) {
                if c != n.first {
                    should.push(term("first_canon", &c, 2.0));
                }
            }
            for code in phonetic(&n.first) {
                should.push(term("first_dm", &code, 1.0));
            }
            if edits(&n.first) > 0 {
                should.push(fuzzy("first", &n.first, edits(&n.first), 1.0));
            }
        }
        if let Some(initial) = n.first.chars().next() {
            should.push(term("first_initial", &initial.to_string(), 0.5));
        }
    }
    if let Some(p) = &probe.place {
        if !p.zip.is_empty() {
            should.push(term("zip", &p.zip, 2.0));
        }
        if !p.city.is_empty() {
            should.push(term("city", &p.city, 1.5));
        }
        if !p.state.is_empty() {
            should.push(term("state", &p.state, 1.0));
        }
    }
    if let Some(e) = &probe.email {
        should.push(term("email", e, 6.0));
    }
    if let Some(p) = &probe.phone {
        should.push(term("phone", p, 6.0));
    }
    Some(Query {
        should,
        min_should_match: 1,
        k,
        ..Query::default()
    })
}
