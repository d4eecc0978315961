//! Labeled documents as JSON lines, and the train/validation split.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
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
    /// Where the document comes from (a site, or a Debian source package):
    /// documents of one source are near-copies of each other, so the split
    /// keeps each source on one side. Empty when unknown.
    #[serde(default)]
    pub source: String,
    /// Labels known to be wrong for this document (an analyst rejected them),
    /// without saying which are right. Trained as negatives for these labels
    /// only.
    #[serde(default)]
    pub rejected: Vec<String>,
    /// The section the site filed it under (a Debian archive section, a
    /// news site's `article:section`). Empty when unknown.
    #[serde(default)]
    pub section: String,
    /// Where it was fetched from; its last path segment names the page.
    /// Empty for datasets, whose id is the page's name.
    #[serde(default)]
    pub url: String,
}

impl Document {
    /// The text the model sees: the line of its fields ([`crate::model_input`]),
    /// the title, a newline, then the body.
    pub fn full_text(&self) -> String {
        let name = self.name();
        let fields = crate::Fields {
            section: &self.section,
            name: &name,
        };
        crate::model_input(&self.title, &self.text, &fields)
    }

    /// The same text without the fields line: what a model must still
    /// score well when a site says nothing about its pages.
    pub fn text_alone(&self) -> String {
        crate::model_input(&self.title, &self.text, &crate::Fields::default())
    }

    /// Its page's name: the last path segment of its URL, else its id.
    pub fn name(&self) -> std::borrow::Cow<'_, str> {
        if self.url.is_empty() {
            std::borrow::Cow::Borrowed(&self.id)
        } else {
            std::borrow::Cow::Owned(crate::page_name(&self.url))
        }
    }

    /// Whether it says anything about itself besides its words.
    pub fn has_fields(&self) -> bool {
        !self.section.trim().is_empty() || !self.name().trim().is_empty()
    }

    /// What decides the document's side of the split: its source when it
    /// has one, else its id.
    pub fn group(&self) -> &str {
        if self.source.is_empty() {
            &self.id
        } else {
            &self.source
        }
    }
}

/// The four parts of a dataset. Validation and tuning hold whole sources
/// (groups), so they measure what a model does on sites and packages it
/// never saw; a document id split lets sibling documents of one source sit
/// on both sides and flatters every figure (by 0.02 to 0.03 on debtags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Trained on.
    Train,
    /// Sources held out to choose things: the best epoch, early stopping,
    /// the ensemble's weight. Never reported as the model's figures.
    Tuning,
    /// Sources held out and only ever reported: the headline figures and
    /// the registry's gate.
    Validation,
    /// Documents of training sources held out by id: the figure an id split
    /// would report, kept to show how much it overstates.
    Seen,
}

/// How a dataset is split into [`Part`]s, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPlan {
    /// Share of groups (sources) in [`Part::Validation`].
    pub validation_percent: u8,
    /// Share of groups in [`Part::Tuning`].
    pub tuning_percent: u8,
    /// Share of the remaining documents, by id, in [`Part::Seen`].
    pub seen_percent: u8,
}

impl Default for SplitPlan {
    fn default() -> Self {
        Self {
            validation_percent: Dataset::DEFAULT_VALIDATION_PERCENT,
            tuning_percent: 5,
            seen_percent: 3,
        }
    }
}

/// Seed of the id hash that picks [`Part::Seen`], so it is independent of
/// the group hash.
const SEEN_SEED: u64 = 0x5eed;

impl SplitPlan {
    /// The part `document` belongs to: stable across runs, machines and
    /// dataset growth (a hash of its group, then of its id).
    pub fn part(&self, document: &Document) -> Part {
        let bucket = xxhash_rust::xxh3::xxh3_64(document.group().as_bytes()) % 100;
        let validation = u64::from(self.validation_percent);
        if bucket < validation {
            Part::Validation
        } else if bucket < validation + u64::from(self.tuning_percent) {
            Part::Tuning
        } else if xxhash_rust::xxh3::xxh3_64_with_seed(document.id.as_bytes(), SEEN_SEED) % 100
            < u64::from(self.seen_percent)
        {
            Part::Seen
        } else {
            Part::Train
        }
    }
}

/// Labeled documents in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    /// The documents.
    pub documents: Vec<Document>,
}

/// Whether a group key (a document's [`Document::group`]) falls in the
/// validation split: xxh3 of the key, mod 100, below `validation_percent`.
/// Stable across runs, machines and dataset growth.
pub fn is_validation(group: &str, validation_percent: u8) -> bool {
    xxhash_rust::xxh3::xxh3_64(group.as_bytes()) % 100 < u64::from(validation_percent)
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

    /// Splits into (training, validation) by group with [`is_validation`],
    /// keeping file order within each part.
    pub fn split(self, validation_percent: u8) -> (Dataset, Dataset) {
        let (validation, training) = self
            .documents
            .into_iter()
            .partition(|d| is_validation(d.group(), validation_percent));
        (
            Dataset {
                documents: training,
            },
            Dataset {
                documents: validation,
            },
        )
    }

    /// Splits into the four [`Part`]s of `plan`, keeping file order within
    /// each: (train, tuning, validation, seen).
    pub fn split_parts(self, plan: &SplitPlan) -> [Dataset; 4] {
        let mut parts: [Dataset; 4] = Default::default();
        for document in self.documents {
            let at = match plan.part(&document) {
                Part::Train => 0,
                Part::Tuning => 1,
                Part::Validation => 2,
                Part::Seen => 3,
            };
            parts[at].documents.push(document);
        }
        parts
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
        assert_eq!(first.full_text(), "page a\nVim\ntext editor");
        assert_eq!(first.text_alone(), "Vim\ntext editor");
        assert_eq!(dataset.documents[1].full_text(), "page b\n\nlibrary");
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
                source: String::new(),
                rejected: Vec::new(),
                ..Default::default()
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

    #[test]
    fn parts_keep_each_source_on_one_side() {
        // 400 sources of 1 to 9 documents each, some without a source.
        let mut documents = Vec::new();
        for source in 0..400 {
            for copy in 0..(source % 9 + 1) {
                documents.push(Document {
                    id: format!("pkg-{source}-{copy}"),
                    title: String::new(),
                    text: String::new(),
                    tags: vec!["t".into()],
                    source: if source % 10 == 0 {
                        String::new()
                    } else {
                        format!("src-{source}")
                    },
                    rejected: Vec::new(),
                    ..Default::default()
                });
            }
        }
        let total = documents.len();
        let plan = SplitPlan::default();
        let [train, tuning, validation, seen] = Dataset {
            documents: documents.clone(),
        }
        .split_parts(&plan);
        assert_eq!(
            train.len() + tuning.len() + validation.len() + seen.len(),
            total
        );
        let sources = |d: &Dataset| -> std::collections::HashSet<String> {
            d.documents
                .iter()
                .filter(|d| !d.source.is_empty())
                .map(|d| d.source.clone())
                .collect()
        };
        let (tr, tu, va, se) = (
            sources(&train),
            sources(&tuning),
            sources(&validation),
            sources(&seen),
        );
        assert!(tr.is_disjoint(&va) && tr.is_disjoint(&tu) && tu.is_disjoint(&va));
        assert!(se.is_disjoint(&va) && se.is_disjoint(&tu));
        // Seen documents come from training sources only.
        assert!(se.iter().all(|s| tr.contains(s)
            || documents.iter().filter(|d| &d.source == s).count()
                == seen.documents.iter().filter(|d| &d.source == s).count()));
        // Groups land near the asked shares (400 groups: wide bounds).
        let groups = |d: &Dataset| {
            d.documents
                .iter()
                .map(|d| d.group().to_owned())
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        assert!(
            (20..=65).contains(&groups(&validation)),
            "{}",
            groups(&validation)
        );
        assert!((6..=40).contains(&groups(&tuning)), "{}", groups(&tuning));
        // Stable: the same plan gives the same parts.
        let again = Dataset { documents }.split_parts(&plan);
        assert_eq!(again[2], validation);
        assert_eq!(again[1], tuning);
    }
}
