//! Name and place normalisation shared by the loader (what is indexed) and
//! the matcher (what is searched and compared): both sides must reduce
//! "José  O'Neil-Smith" to the same tokens, phonetic codes and canonical
//! first names, or exact clauses silently stop matching.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use rphonetic::DoubleMetaphone;
use unicode_normalization::UnicodeNormalization;

use super::reference::reference;

/// Lower-case ASCII letters of `s` with accents removed; spaces, hyphens and
/// other separators become single spaces; apostrophes and dots vanish
/// (`O'Neil` → `oneil`, `St. John` → `st john`).
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.nfkd() {
        if c.is_ascii_alphanumeric() {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c.to_ascii_lowercase());
        } else if c == '\'' || c == '.' || c == '’' || !c.is_ascii() {
            // Apostrophes and dots join; combining marks (after NFKD) drop.
        } else {
            space = true;
        }
    }
    out
}

/// A surname as one token: normalised with its spaces removed
/// (`Van Der Berg` → `vanderberg`), as the index stores it.
pub fn surname_key(s: &str) -> String {
    normalize(s).replace(' ', "")
}

/// The Double Metaphone codes (primary, and alternate when it differs) of a
/// normalised word; empty for a word with no letters.
pub fn phonetic(word: &str) -> Vec<String> {
    static DM: OnceLock<DoubleMetaphone> = OnceLock::new();
    let dm = DM.get_or_init(|| DoubleMetaphone::new(Some(6)));
    if !word.bytes().any(|b| b.is_ascii_alphabetic()) {
        return Vec::new();
    }
    let r = dm.double_metaphone(word);
    let (p, a) = (r.primary(), r.alternate());
    let mut codes = Vec::with_capacity(2);
    if !p.is_empty() {
        codes.push(p);
    }
    if !a.is_empty() && !codes.contains(&a) {
        codes.push(a);
    }
    codes
}

/// Nickname → the formal names it is short for (`bill` → `william`), and each
/// formal name → itself, built once from the reference nickname table.
fn formal_names() -> &'static HashMap<String, Vec<String>> {
    static MAP: OnceLock<HashMap<String, Vec<String>>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut map: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (formal, nicks) in &reference().nicknames {
            map.entry(formal.clone())
                .or_default()
                .insert(formal.clone());
            for nick in nicks {
                map.entry(normalize(nick))
                    .or_default()
                    .insert(formal.clone());
            }
        }
        map.into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect()
    })
}

/// The canonical forms of a normalised first name: the formal names it may
/// be short for plus itself, sorted (`bill` → `[bill, william]`). Two first
/// names are nickname-equivalent when their canonical sets meet.
pub fn canonical_first(first: &str) -> Vec<String> {
    let mut set: BTreeSet<String> = BTreeSet::new();
    if first.is_empty() {
        return Vec::new();
    }
    set.insert(first.to_owned());
    if let Some(formal) = formal_names().get(first) {
        set.extend(formal.iter().cloned());
    }
    set.into_iter().collect()
}

/// Whether two normalised first names are the same person's by the nickname
/// table (one is a nickname of the other, or both of the same formal name).
pub fn nickname_equivalent(a: &str, b: &str) -> bool {
    if a.is_empty() || b.is_empty() {
        return false;
    }
    let ca = canonical_first(a);
    canonical_first(b).iter().any(|x| ca.contains(x))
}

/// Share of the population with this surname (0 when the census does not
/// list it), for term-frequency adjustment: agreeing on "smith" is weaker
/// evidence than agreeing on "zabriskie".
pub fn surname_frequency(key: &str) -> f64 {
    static MAP: OnceLock<HashMap<String, f64>> = OnceLock::new();
    let map = MAP.get_or_init(|| {
        reference()
            .last
            .iter()
            .map(|w| (surname_key(&w.name), w.percent / 100.0))
            .collect()
    });
    map.get(key).copied().unwrap_or(0.0)
}

/// Share of the population with this normalised first name (0 when the
/// census does not list it): half its share of its sex, summed over both.
pub fn first_frequency(first: &str) -> f64 {
    static MAP: OnceLock<HashMap<String, f64>> = OnceLock::new();
    let map = MAP.get_or_init(|| {
        let mut map: HashMap<String, f64> = HashMap::new();
        let r = reference();
        for w in r.male.iter().chain(&r.female) {
            *map.entry(normalize(&w.name).replace(' ', "")).or_default() += w.percent / 200.0;
        }
        map
    });
    map.get(first).copied().unwrap_or(0.0)
}

/// US state names and their two-letter codes, lower case.
pub const STATES: [(&str, &str); 54] = [
    ("alabama", "al"),
    ("alaska", "ak"),
    ("arizona", "az"),
    ("arkansas", "ar"),
    ("california", "ca"),
    ("colorado", "co"),
    ("connecticut", "ct"),
    ("delaware", "de"),
    ("district of columbia", "dc"),
    ("florida", "fl"),
    ("georgia", "ga"),
    ("hawaii", "hi"),
    ("idaho", "id"),
    ("illinois", "il"),
    ("indiana", "in"),
    ("iowa", "ia"),
    ("kansas", "ks"),
    ("kentucky", "ky"),
    ("louisiana", "la"),
    ("maine", "me"),
    ("maryland", "md"),
    ("massachusetts", "ma"),
    ("michigan", "mi"),
    ("minnesota", "mn"),
    ("mississippi", "ms"),
    ("missouri", "mo"),
    ("montana", "mt"),
    ("nebraska", "ne"),
    ("nevada", "nv"),
    ("new hampshire", "nh"),
    ("new jersey", "nj"),
    ("new mexico", "nm"),
    ("new york", "ny"),
    ("north carolina", "nc"),
    ("north dakota", "nd"),
    ("ohio", "oh"),
    ("oklahoma", "ok"),
    ("oregon", "or"),
    ("pennsylvania", "pa"),
    ("rhode island", "ri"),
    ("south carolina", "sc"),
    ("south dakota", "sd"),
    ("tennessee", "tn"),
    ("texas", "tx"),
    ("utah", "ut"),
    ("vermont", "vt"),
    ("virginia", "va"),
    ("washington", "wa"),
    ("west virginia", "wv"),
    ("wisconsin", "wi"),
    ("wyoming", "wy"),
    ("puerto rico", "pr"),
    ("guam", "gu"),
    ("virgin islands", "vi"),
];

/// The two-letter code of a normalised state name or code, if it is one.
pub fn state_code(s: &str) -> Option<&'static str> {
    STATES
        .iter()
        .find(|(name, code)| *name == s || *code == s)
        .map(|(_, code)| *code)
}

/// A person's name split from a display name: first word, last word, and
/// whatever is between (middle names or initials). Suffixes (jr, sr, ii, iii)
/// and a leading title (mr, mrs, ms, dr) are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NameParts {
    /// Normalised first name.
    pub first: String,
    /// Normalised middle part (may be empty).
    pub middle: String,
    /// Surname key ([`surname_key`]).
    pub last: String,
}

/// Splits a display name (`Dr. Bill J. O'Neil Jr`) into [`NameParts`];
/// `None` when fewer than two name words remain.
pub fn split_name(display: &str) -> Option<NameParts> {
    const TITLES: [&str; 5] = ["mr", "mrs", "ms", "dr", "miss"];
    const SUFFIXES: [&str; 7] = ["jr", "sr", "ii", "iii", "iv", "md", "phd"];
    let norm = normalize(display);
    let mut words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
    while words.len() > 2 && words.first().is_some_and(|w| TITLES.contains(w)) {
        words.remove(0);
    }
    while words.len() > 2 && words.last().is_some_and(|w| SUFFIXES.contains(w)) {
        words.pop();
    }
    if words.len() < 2 {
        return None;
    }
    Some(NameParts {
        first: words[0].to_owned(),
        middle: words[1..words.len() - 1].join(" "),
        last: words[words.len() - 1].to_owned(),
    })
}

/// A place from a free-text location: `Springfield, IL`, `Springfield,
/// Illinois`, `Springfield IL 62701`, `IL`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Place {
    /// Normalised city (may be empty).
    pub city: String,
    /// Two-letter state code, lower case (may be empty).
    pub state: String,
    /// Five-digit ZIP code (may be empty).
    pub zip: String,
}

impl Place {
    /// Whether nothing was recognised.
    pub fn is_empty(&self) -> bool {
        self.city.is_empty() && self.state.is_empty() && self.zip.is_empty()
    }
}

/// Words around a place that are not the place: `Greater Austin Area`,
/// `based in Denver`, `Austin Metro`, `Seattle, WA, United States`.
const PLACE_PREFIXES: [&str; 7] = [
    "the greater ",
    "greater ",
    "based in ",
    "living in ",
    "lives in ",
    "located in ",
    "from ",
];
const PLACE_SUFFIXES: [&str; 8] = [
    " metropolitan area",
    " metro area",
    " bay area",
    " area",
    " metroplex",
    " metro",
    " region",
    " city area",
];
const COUNTRIES: [&str; 5] = [
    "united states of america",
    "united states",
    "usa",
    "us",
    "america",
];

/// One comma-separated part of a location with what is not the place cut
/// away; empty when nothing is left (a bare country).
fn place_part(part: &str) -> String {
    let mut p = normalize(part);
    loop {
        let before = p.len();
        for prefix in PLACE_PREFIXES {
            if let Some(rest) = p.strip_prefix(prefix) {
                p = rest.to_owned();
            }
        }
        for country in COUNTRIES {
            if p == country {
                p.clear();
            } else if let Some(rest) = p.strip_suffix(&format!(" {country}")) {
                p = rest.to_owned();
            }
        }
        for suffix in PLACE_SUFFIXES {
            // "Bay Area" alone names a region, not a city: nothing is left.
            if let Some(rest) = p.strip_suffix(suffix) {
                p = rest.to_owned();
            }
        }
        if p.len() == before {
            return p;
        }
    }
}

/// Parses a free-text location into a [`Place`], however people write it:
/// `Austin, TX`, `austin tx 78701`, `Austin, Texas, United States`,
/// `Greater Austin Area`, `Based in Austin`. Country names and the words
/// around a metro area are dropped.
pub fn parse_location(text: &str) -> Place {
    let mut place = Place::default();
    let raw: Vec<&str> = text
        .split([',', ';', '|', '/', '·', '•', '(', ')'])
        .filter(|p| !place_part(p).is_empty())
        .collect();
    let mut parts: Vec<String> = raw.iter().map(|p| place_part(p)).collect();
    // "Greater New York Area", "New York Metro": a metro area named after
    // its city, even when a state has the same name.
    if let [only] = raw.as_slice() {
        let bare = normalize(only);
        if bare != parts[0]
            && state_code(&parts[0]).is_some()
            && !bare.ends_with(&format!(" {}", parts[0]))
        {
            place.city = parts[0].clone();
            return place;
        }
    }
    // A ZIP code anywhere.
    for part in parts.iter_mut() {
        let words: Vec<&str> = part.split(' ').collect();
        if let Some(z) = words
            .iter()
            .find(|w| w.len() == 5 && w.bytes().all(|b| b.is_ascii_digit()))
        {
            place.zip = (*z).to_owned();
            *part = words
                .iter()
                .filter(|w| *w != z)
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
    parts.retain(|p| !p.is_empty());
    // The state: the last part, or the last word(s) of a single part.
    if let Some(last) = parts.last().cloned() {
        if let Some(code) = state_code(&last) {
            place.state = code.to_owned();
            parts.pop();
        } else if parts.len() == 1 {
            let words: Vec<&str> = last.split(' ').collect();
            for take in [3usize, 2, 1] {
                if words.len() > take {
                    let tail = words[words.len() - take..].join(" ");
                    if let Some(code) = state_code(&tail) {
                        place.state = code.to_owned();
                        parts[0] = words[..words.len() - take].join(" ");
                        break;
                    }
                }
            }
        }
    }
    if let Some(city) = parts.first() {
        place.city = city.clone();
    }
    place
}

/// Where places are: the centre of each ZIP code, and of each city (the
/// mean of its ZIP codes' centres), from the reference data.
struct Points {
    zips: HashMap<String, (f64, f64)>,
    cities: HashMap<(String, String), (f64, f64)>,
}

fn points() -> &'static Points {
    static POINTS: OnceLock<Points> = OnceLock::new();
    POINTS.get_or_init(|| {
        let mut zips = HashMap::new();
        let mut sums: HashMap<(String, String), (f64, f64, f64)> = HashMap::new();
        for z in &reference().zips {
            if z.point == (0.0, 0.0) {
                continue;
            }
            zips.insert(z.zip.clone(), z.point);
            let s = sums
                .entry((normalize(&z.city), z.state.to_ascii_lowercase()))
                .or_default();
            s.0 += z.point.0;
            s.1 += z.point.1;
            s.2 += 1.0;
        }
        let cities = sums
            .into_iter()
            .map(|(k, (lat, lon, n))| (k, (lat / n, lon / n)))
            .collect();
        Points { zips, cities }
    })
}

/// The centre of a ZIP code.
pub fn zip_point(zip: &str) -> Option<(f64, f64)> {
    points().zips.get(zip.get(..5).unwrap_or(zip)).copied()
}

/// The centre of a normalised city in a state (lower-case code).
pub fn city_point(city: &str, state: &str) -> Option<(f64, f64)> {
    points()
        .cities
        .get(&(city.to_owned(), state.to_owned()))
        .copied()
}

/// Great-circle distance between two points, km.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_the_same_way_on_both_sides() {
        assert_eq!(normalize("José  O'Neil-Smith"), "jose oneil smith");
        assert_eq!(surname_key("Van Der Berg"), "vanderberg");
        assert_eq!(surname_key("O’Brien"), "obrien");
        assert_eq!(normalize("  "), "");
    }

    #[test]
    fn phonetic_codes_bring_spellings_together() {
        let smith = phonetic("smith");
        let schmidt = phonetic("schmidt");
        assert!(
            smith.iter().any(|c| schmidt.contains(c)),
            "{smith:?} {schmidt:?}"
        );
        assert!(phonetic("").is_empty());
        assert!(phonetic("123").is_empty());
    }

    #[test]
    fn nicknames_are_equivalent_to_their_formal_names() {
        assert!(nickname_equivalent("bill", "william"));
        assert!(nickname_equivalent("william", "bill"));
        assert!(!nickname_equivalent("bill", "mary"));
        assert!(canonical_first("bill").contains(&"william".to_owned()));
    }

    #[test]
    fn display_names_split() {
        let p = split_name("Dr. Bill J. O'Neil Jr").expect("a name");
        assert_eq!(
            (p.first.as_str(), p.middle.as_str(), p.last.as_str()),
            ("bill", "j", "oneil")
        );
        assert_eq!(split_name("Madonna"), None);
    }

    #[test]
    fn locations_parse() {
        let p = parse_location("Springfield, IL");
        assert_eq!((p.city.as_str(), p.state.as_str()), ("springfield", "il"));
        let p = parse_location("Saint Paul, Minnesota, USA");
        assert_eq!((p.city.as_str(), p.state.as_str()), ("saint paul", "mn"));
        let p = parse_location("Austin TX 78701");
        assert_eq!(
            (p.city.as_str(), p.state.as_str(), p.zip.as_str()),
            ("austin", "tx", "78701")
        );
        let p = parse_location("New York");
        assert_eq!((p.city.as_str(), p.state.as_str()), ("", "ny"));
        assert!(parse_location("").is_empty());
    }

    /// Every way people write a place in a profile, and what it means.
    #[test]
    fn every_way_people_write_a_place() {
        let table = [
            ("Austin, TX", "austin", "tx", ""),
            ("austin, tx", "austin", "tx", ""),
            ("Austin TX", "austin", "tx", ""),
            ("Austin, Texas", "austin", "tx", ""),
            ("Austin Texas", "austin", "tx", ""),
            ("Austin, Texas, United States", "austin", "tx", ""),
            ("Austin, TX, USA", "austin", "tx", ""),
            ("austin texas usa", "austin", "tx", ""),
            ("Austin, TX 78701", "austin", "tx", "78701"),
            ("Austin", "austin", "", ""),
            ("Greater Austin Area", "austin", "", ""),
            ("Greater New York Area", "new york", "", ""),
            ("New York Metro", "new york", "", ""),
            ("Based in Texas", "", "tx", ""),
            ("Texas, United States", "", "tx", ""),
            ("Austin Metro", "austin", "", ""),
            ("Austin, Texas Metropolitan Area", "austin", "tx", ""),
            ("Based in Austin, TX", "austin", "tx", ""),
            ("Austin | Texas", "austin", "tx", ""),
            ("Austin · TX", "austin", "tx", ""),
            ("Austin (TX)", "austin", "tx", ""),
            (
                "Greater Minneapolis-St. Paul Area",
                "minneapolis st paul",
                "",
                "",
            ),
            ("San Francisco Bay Area", "san francisco", "", ""),
            ("Saint Paul, Minnesota, U.S.A.", "saint paul", "mn", ""),
            ("Salt Lake City, UT", "salt lake city", "ut", ""),
            ("Kansas City, Missouri", "kansas city", "mo", ""),
            ("Texas", "", "tx", ""),
            ("United States", "", "", ""),
            ("🌵 Tucson, AZ 🌵", "tucson", "az", ""),
        ];
        for (text, city, state, zip) in table {
            let p = parse_location(text);
            assert_eq!(
                (p.city.as_str(), p.state.as_str(), p.zip.as_str()),
                (city, state, zip),
                "{text}"
            );
        }
    }
}
