//! The consumer database's own records and their files: a person (one row
//! of the database CSV, [`COLUMNS`]), a social profile with the truth about
//! it (JSON lines), and what the enrichment API answers about a profile's
//! person (JSON lines, read by the local stand-in). `sift dbusa load` and
//! the matcher read them; the generator (`generate.rs`) writes them.

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// One letter of the first name replaced, inserted or deleted.
    pub const FIRST_TYPO: &str = "first_typo";
    /// The location is another city of the same state, within 40 km where
    /// there is one.
    pub const MOVED_NEARBY: &str = "moved_nearby";
    /// A person who is not in the database.
    pub const NOT_IN_DB: &str = "not_in_db";
    /// A person who is not in the database but lives with someone who is:
    /// the same surname and address, another first name, their own phone,
    /// email and birth year. Real consumer databases hold one adult of many
    /// households, so these are the hardest non-members.
    pub const HOUSEMATE: &str = "housemate";
    /// Every label given to people in the database.
    pub const ALL: [&str; 10] = [
        NONE,
        NICKNAME,
        TYPO,
        TRANSPOSED,
        MOVED,
        MISSING_NAME,
        MISSING_LOCATION,
        BOTH_MISSING,
        FIRST_TYPO,
        MOVED_NEARBY,
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

/// One canned answer: one line of the answers file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The network (`twitter`, `instagram`, ...), as requests name it.
    pub service: String,
    /// The handle; matched without regard to case.
    pub username: String,
    /// Emails that find this answer too (a request without a known profile).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<String>,
    /// Statuses served to repeated requests of this answer, in order; the last
    /// one repeats. Empty means always 200.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<u16>,
    /// The body of a 200 answer: a person as the API describes one.
    pub person: Value,
}

/// Reads every person of a database CSV.
pub fn read_people(path: &Path) -> crate::Result<Vec<Person>> {
    let mut reader = csv::Reader::from_path(path)
        .map_err(|e| crate::Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let mut people = Vec::new();
    for (i, row) in reader.deserialize::<Person>().enumerate() {
        people.push(row.map_err(|e| {
            crate::Error::Invalid(format!("{} row {}: {e}", path.display(), i + 2))
        })?);
    }
    Ok(people)
}

/// Reads labelled profiles (JSON lines).
pub fn read_profiles(path: &Path) -> crate::Result<Vec<Profile>> {
    let file = std::fs::File::open(path)
        .map_err(|e| crate::Error::io(format!("opening {}", path.display()), e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| crate::Error::io(format!("reading {}", path.display()), e))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| {
            crate::Error::Invalid(format!("{} line {}: {e}", path.display(), i + 1))
        })?);
    }
    Ok(out)
}

/// Reads an answers file: one [`Answer`] as JSON per line, blank lines skipped.
pub fn read_answers(path: impl AsRef<Path>) -> crate::Result<Vec<Answer>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::Error::io(format!("reading the answers file {}", path.display()), e))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line).map_err(|e| {
                crate::Error::Invalid(format!(
                    "line {} of {} is not a stand-in answer ({e}); each line needs service, username and person",
                    n + 1,
                    path.display()
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_with_defaults_and_report_bad_lines() -> crate::Result<()> {
        let dir = tempfile::tempdir().map_err(|e| crate::Error::io("tempdir", e))?;
        let path = dir.path().join("answers.jsonl");
        std::fs::write(
            &path,
            "{\"service\":\"twitter\",\"username\":\"jdoe\",\"person\":{\"fullName\":\"John Doe\"}}\n\n\
             {\"service\":\"tiktok\",\"username\":\"x\",\"emails\":[\"x@y.z\"],\"statuses\":[202,200],\"person\":{}}\n",
        )
        .map_err(|e| crate::Error::io("write", e))?;
        let answers = read_answers(&path)?;
        assert_eq!(answers.len(), 2);
        assert!(answers[0].emails.is_empty() && answers[0].statuses.is_empty());
        assert_eq!(answers[1].statuses, [202, 200]);
        // Defaults are left out when written back.
        let line =
            serde_json::to_string(&answers[0]).map_err(|e| crate::Error::Invalid(e.to_string()))?;
        assert!(!line.contains("statuses") && !line.contains("emails"));

        std::fs::write(&path, "{\"service\":\"twitter\"}\n")
            .map_err(|e| crate::Error::io("write", e))?;
        let err = read_answers(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("line 1"), "{err}");
        Ok(())
    }
}
