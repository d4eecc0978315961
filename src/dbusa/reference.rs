//! The reference data compiled into the binary (`data/reference/`, see its
//! README): census first and last names with their frequencies, US ZIP codes
//! with city and state, and first-name nicknames.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::OnceLock;

const FIRST_NAMES: &[u8] = include_bytes!("../../data/reference/first_names.tsv.gz");
const LAST_NAMES: &[u8] = include_bytes!("../../data/reference/last_names.tsv.gz");
const ZIPS: &[u8] = include_bytes!("../../data/reference/zips.tsv.gz");
const NICKNAMES: &[u8] = include_bytes!("../../data/reference/nicknames.tsv.gz");

/// A name and its share of the population, percent.
#[derive(Debug, Clone, PartialEq)]
pub struct Weighted {
    /// Upper case, as the census lists it.
    pub name: String,
    /// Percent of the population.
    pub percent: f64,
}

/// A ZIP code and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Zip {
    /// Five digits.
    pub zip: String,
    /// City.
    pub city: String,
    /// Two-letter state.
    pub state: String,
    /// Latitude and longitude of its centre, degrees (0, 0 when unknown).
    pub point: (f64, f64),
}

/// Everything in `data/reference/`, parsed once.
#[derive(Debug)]
pub struct Reference {
    /// Male first names.
    pub male: Vec<Weighted>,
    /// Female first names.
    pub female: Vec<Weighted>,
    /// Surnames.
    pub last: Vec<Weighted>,
    /// Active standard ZIP codes (not PO boxes or single addresses).
    pub zips: Vec<Zip>,
    /// Lower-case first name → its nicknames.
    pub nicknames: BTreeMap<String, Vec<String>>,
}

fn rows(gz: &'static [u8]) -> impl Iterator<Item = Vec<String>> {
    BufReader::new(flate2::read::GzDecoder::new(gz))
        .lines()
        .skip(1)
        .map_while(Result::ok)
        .map(|l| l.split('\t').map(str::to_owned).collect())
}

fn weighted(row: &[String]) -> Option<Weighted> {
    Some(Weighted {
        name: row.first()?.clone(),
        percent: row.get(if row.len() == 4 { 2 } else { 1 })?.parse().ok()?,
    })
}

/// The reference data.
pub fn reference() -> &'static Reference {
    static DATA: OnceLock<Reference> = OnceLock::new();
    DATA.get_or_init(|| {
        let mut male = Vec::new();
        let mut female = Vec::new();
        for row in rows(FIRST_NAMES) {
            let Some(w) = weighted(&row) else { continue };
            match row.get(1).map(String::as_str) {
                Some("M") => male.push(w),
                Some("F") => female.push(w),
                _ => {}
            }
        }
        let last = rows(LAST_NAMES).filter_map(|r| weighted(&r)).collect();
        let zips = rows(ZIPS)
            .filter(|r| r.len() >= 5 && r[1] == "STANDARD" && r[2] == "1")
            .map(|r| Zip {
                zip: r[0].clone(),
                city: r[3].clone(),
                state: r[4].clone(),
                point: (
                    r.get(6).and_then(|v| v.parse().ok()).unwrap_or(0.0),
                    r.get(7).and_then(|v| v.parse().ok()).unwrap_or(0.0),
                ),
            })
            .collect();
        let mut nicknames: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in rows(NICKNAMES) {
            if let [name, nick] = r.as_slice() {
                nicknames
                    .entry(name.clone())
                    .or_default()
                    .push(nick.clone());
            }
        }
        Reference {
            male,
            female,
            last,
            zips,
            nicknames,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_data_is_complete() {
        let r = reference();
        assert_eq!(r.male.len() + r.female.len(), 5494);
        assert_eq!(r.last.len(), 88_799);
        assert_eq!(r.male[0].name, "JAMES");
        assert_eq!(r.last[0].name, "SMITH");
        assert!(r.zips.len() > 25_000, "{}", r.zips.len());
        assert!(r
            .zips
            .iter()
            .all(|z| z.zip.len() == 5 && z.state.len() == 2));
        assert!(r
            .nicknames
            .get("william")
            .is_some_and(|n| n.iter().any(|x| x == "bill")));
    }
}
