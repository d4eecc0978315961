//! Labeled documents as JSON lines, and the train/validation split.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::Deserialize;

/// What can go wrong reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("reading dataset {path}: {source}")]
    Io {
        /// The file (or `<reader>` for an in-memory source).
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// One line is not a JSON object `{id, title, text, tags[]}`.
    #[error("dataset line {line}: {source}; each line must be a JSON object with id, title, text and tags")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// One labeled document. Fields other than these are ignored, so richer
/// exports can be read as they are.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Document {
    /// Stable identifier; decides the split.
    pub id: String,
    /// Title (may be empty).
    #[serde(default)]
    pub title: String,
    /// Body text.
    pub text: String,
    /// Human-assigned labels.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Labels known to be wrong for this document (an analyst rejected them),
    /// without saying which are right. Trained as negatives for these labels
    /// only.
    #[serde(default)]
    pub rejected: Vec<String>,
}

impl Document {
    /// The text the model sees: title, a newline, then the body.
    pub fn full_text(&self) -> String {
        format!("{}\n{}", self.title, self.text)
    }
}

/// Labeled documents in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    /// The documents.
    pub documents: Vec<Document>,
}

/// Whether a document belongs to the validation split: xxh3 of the id, mod
/// 100, below `validation_percent`. Stable across runs, machines and dataset
/// growth.
pub fn is_validation(id: &str, validation_percent: u8) -> bool {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % 100 < u64::from(validation_percent)
}

impl Dataset {
    /// The usual validation share, in percent.
    pub const DEFAULT_VALIDATION_PERCENT: u8 = 10;

    /// Reads JSON lines from a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::read(BufReader::new(file)).map_err(|e| match e {
            DataError::Io { source, .. } => DataError::Io {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Reads JSON lines; blank lines are skipped.
    pub fn read(reader: impl BufRead) -> Result<Self, DataError> {
        let mut documents = Vec::new();
        for (number, line) in reader.lines().enumerate() {
            let line = line.map_err(|source| DataError::Io {
                path: "<reader>".to_owned(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let document = serde_json::from_str(&line).map_err(|source| DataError::Line {
                line: number + 1,
                source,
            })?;
            documents.push(document);
        }
        Ok(Self { documents })
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.documents.len()
    }

    /// Whether there are no documents.
    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }

    /// Splits into (training, validation) with [`is_validation`], keeping
    /// file order within each part.
    pub fn split(self, validation_percent: u8) -> (Dataset, Dataset) {
        let (validation, training) = self
            .documents
            .into_iter()
            .partition(|d| is_validation(&d.id, validation_percent));
        (
            Dataset {
                documents: training,
            },
            Dataset {
                documents: validation,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"id": "a", "title": "Vim", "text": "text editor", "tags": ["role::program", "use::editing"], "extra": 1}

{"id": "b", "title": "", "text": "library", "tags": []}
"#;

    #[test]
    fn reads_json_lines_ignoring_extra_fields_and_blank_lines() -> anyhow::Result<()> {
        let dataset = Dataset::read(LINES.as_bytes())?;
        assert_eq!(dataset.len(), 2);
        let first = &dataset.documents[0];
        assert_eq!(first.id, "a");
        assert_eq!(first.tags, ["role::program", "use::editing"]);
        assert_eq!(first.full_text(), "Vim\ntext editor");
        assert_eq!(dataset.documents[1].full_text(), "\nlibrary");
        Ok(())
    }

    #[test]
    fn a_bad_line_names_its_number() {
        let input = "{\"id\": \"a\", \"title\": \"\", \"text\": \"x\", \"tags\": []}\n\nnot json\n";
        match Dataset::read(input.as_bytes()) {
            Err(e @ DataError::Line { line: 3, .. }) => {
                assert!(e.to_string().contains("line 3"), "{e}");
            }
            other => panic!("expected an error on line 3, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = Dataset::open("/nonexistent/sift.jsonl").expect_err("no such file");
        assert!(err.to_string().contains("/nonexistent/sift.jsonl"), "{err}");
    }

    #[test]
    fn split_is_stable_and_near_the_asked_fraction() {
        let documents: Vec<Document> = (0..1000)
            .map(|i| Document {
                id: format!("doc-{i}"),
                title: String::new(),
                text: String::new(),
                tags: Vec::new(),
                rejected: Vec::new(),
            })
            .collect();
        let dataset = Dataset { documents };
        let (train, valid) = dataset.clone().split(10);
        assert_eq!(train.len() + valid.len(), 1000);
        assert!((70..=130).contains(&valid.len()), "{}", valid.len());
        let (train2, valid2) = dataset.clone().split(10);
        assert_eq!((train, valid.clone()), (train2, valid2));
        // Recorded values: the split must not change between releases.
        assert!(is_validation("doc-0", 100));
        assert!(!is_validation("doc-0", 0));
        let recorded: Vec<bool> = (0..8)
            .map(|i| is_validation(&format!("doc-{i}"), 10))
            .collect();
        assert_eq!(
            recorded,
            [true, false, false, true, false, false, false, false]
        );
        // Growing the percentage only moves documents into validation.
        let (_, valid20) = dataset.split(20);
        assert!(valid
            .documents
            .iter()
            .all(|d| valid20.documents.iter().any(|e| e.id == d.id)));
    }
}
