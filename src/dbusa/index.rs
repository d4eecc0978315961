//! The `dbusa` search index: its explicit field layout and the document made
//! of each person. Everything that needs a server plugin elsewhere (phonetic
//! codes, nickname canonical forms, surname keys) is computed here in Rust and
//! indexed as keywords, so the same query runs on the embedded index, on
//! Elasticsearch and on OpenSearch with no plugins.

use serde_json::{json, Map, Value};

use super::names::{canonical_first, normalize, phonetic, surname_key};
use super::person::Person;
use crate::backends::search::{FieldKind, FieldSpec, IndexSpec, SearchDoc};

/// Default index name.
pub const INDEX: &str = "dbusa";

/// Searchable fields: keyword fields for exact, fuzzy and phonetic clauses,
/// one text field with the whole name for full-text matching.
pub const FIELDS: [(&str, FieldKind); 15] = [
    ("first", FieldKind::Keyword),
    ("first_canon", FieldKind::Keyword),
    ("first_dm", FieldKind::Keyword),
    ("first_initial", FieldKind::Keyword),
    ("last", FieldKind::Keyword),
    ("last_dm", FieldKind::Keyword),
    ("name", FieldKind::Text),
    ("city", FieldKind::Keyword),
    ("state", FieldKind::Keyword),
    ("zip", FieldKind::Keyword),
    ("zip3", FieldKind::Keyword),
    ("email", FieldKind::Keyword),
    ("phone", FieldKind::Keyword),
    ("birth_year", FieldKind::Integer),
    ("household", FieldKind::Keyword),
];

/// The layout of a `dbusa` index called `name`.
///
/// Only `person` is stored: the searchable fields are made from it by
/// [`person_doc`] and left out of the stored document, which halves what
/// the index stores per person.
pub fn spec(name: &str) -> IndexSpec {
    IndexSpec {
        name: name.to_owned(),
        source_excludes: FIELDS.iter().map(|(n, _)| (*n).to_owned()).collect(),
        fields: FIELDS
            .iter()
            .map(|(n, k)| FieldSpec {
                name: (*n).to_owned(),
                kind: *k,
            })
            .collect(),
    }
}

/// Digits of a phone number, without a leading US country code.
pub fn phone_digits(phone: &str) -> String {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    match digits.strip_prefix('1') {
        Some(rest) if digits.len() == 11 => rest.to_owned(),
        _ => digits,
    }
}

/// Who lives together: the ZIP code, the street address and the surname,
/// normalised (`55101|12 elm st|okonkwo`); empty without an address.
pub fn household_key(p: &Person) -> String {
    let address = normalize(&p.address);
    if address.is_empty() {
        return String::new();
    }
    let zip: String = p.zip.chars().take(5).collect();
    format!("{zip}|{address}|{}", surname_key(&p.last))
}

/// The search document of one person: the normalised, searchable fields
/// plus the original record under `person` (returned with every hit, for
/// scoring and evidence).
pub fn person_doc(p: &Person) -> SearchDoc {
    let first = normalize(&p.first).replace(' ', "");
    let last = surname_key(&p.last);
    let mut source = Map::new();
    let mut put = |k: &str, v: Value| {
        source.insert(k.to_owned(), v);
    };
    put("first", json!(first));
    put("first_canon", json!(canonical_first(&first)));
    put("first_dm", json!(phonetic(&first)));
    put(
        "first_initial",
        json!(first.chars().next().map(String::from).unwrap_or_default()),
    );
    put("last", json!(last));
    put("last_dm", json!(phonetic(&last)));
    put(
        "name",
        json!(normalize(&format!("{} {} {}", p.first, p.middle, p.last))),
    );
    put("city", json!(normalize(&p.city)));
    put("state", json!(p.state.to_ascii_lowercase()));
    let zip: String = p.zip.chars().take(5).collect();
    put("zip3", json!(zip.chars().take(3).collect::<String>()));
    put("zip", json!(zip));
    put("email", json!(p.email.trim().to_ascii_lowercase()));
    put("phone", json!(phone_digits(&p.phone)));
    put("birth_year", json!(p.birth_year));
    put("household", json!(household_key(p)));
    put("person", serde_json::to_value(p).unwrap_or(Value::Null));
    SearchDoc {
        id: p.dbusa_id.clone(),
        source,
    }
}

/// The person stored in a hit's source by [`person_doc`].
pub fn person_of(source: &Map<String, Value>) -> Option<Person> {
    source
        .get("person")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_person_becomes_a_document_of_normalised_fields() {
        let p = Person {
            dbusa_id: "DB0000000001".into(),
            first: "William".into(),
            middle: "J".into(),
            last: "O'Neil".into(),
            address: "1 Main St".into(),
            city: "Saint Paul".into(),
            state: "MN".into(),
            zip: "55101".into(),
            phone: "651-555-0101".into(),
            email: "Bill@Example.com".into(),
            birth_year: 1970,
        };
        let d = person_doc(&p);
        assert_eq!(d.id, "DB0000000001");
        assert_eq!(d.source["last"], "oneil");
        assert_eq!(d.source["city"], "saint paul");
        assert_eq!(d.source["zip3"], "551");
        assert_eq!(d.source["phone"], "6515550101");
        assert!(d.source["first_canon"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == "william")));
        assert_eq!(person_of(&d.source), Some(p));
        // Every searchable field is in the spec.
        let s = spec(INDEX);
        for k in d.source.keys().filter(|k| *k != "person") {
            assert!(s.kind_of(k).is_some(), "{k} is not in the spec");
        }
    }
}
