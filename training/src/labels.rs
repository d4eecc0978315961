//! The label list: its order is the order of the model's outputs.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use crate::Document;

/// What can go wrong building, reading or writing `labels.json`.
#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    /// The file could not be read or written.
    #[error("labels file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a JSON array of strings.
    #[error("labels file {path}: {source}; expected a JSON array of label names")]
    Json {
        /// The file.
        path: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A label appears twice, so output positions would be ambiguous.
    #[error("label {0:?} is listed twice; each label must appear once")]
    Duplicate(String),
}

/// Label names and their output positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    names: Vec<String>,
    index: HashMap<String, usize>,
}

impl Labels {
    /// Every tag used by `documents`, sorted.
    pub fn from_documents<'a>(documents: impl IntoIterator<Item = &'a Document>) -> Self {
        let names: BTreeSet<&str> = documents
            .into_iter()
            .flat_map(|d| d.tags.iter().map(String::as_str))
            .collect();
        let names: Vec<String> = names.into_iter().map(str::to_owned).collect();
        Self::from_names(names).expect("names from a set are unique")
    }

    /// Labels in the given order (as saved), rejecting duplicates.
    pub fn from_names(names: Vec<String>) -> Result<Self, LabelsError> {
        let mut index = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if index.insert(name.clone(), i).is_some() {
                return Err(LabelsError::Duplicate(name.clone()));
            }
        }
        Ok(Self { names, index })
    }

    /// Reads a `labels.json` array.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LabelsError> {
        let path = path.as_ref();
        let shown = || path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| LabelsError::Io {
            path: shown(),
            source,
        })?;
        let names = serde_json::from_slice(&bytes).map_err(|source| LabelsError::Json {
            path: shown(),
            source,
        })?;
        Self::from_names(names)
    }

    /// Writes `labels.json` (a pretty-printed array).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), LabelsError> {
        let path = path.as_ref();
        let json = serde_json::to_vec_pretty(&self.names).expect("strings always serialise");
        std::fs::write(path, json).map_err(|source| LabelsError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Number of labels (the model's output width).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// All names in output order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Output position of a label.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Name at an output position.
    pub fn name(&self, index: usize) -> Option<&str> {
        self.names.get(index).map(String::as_str)
    }

    /// Sorted, deduplicated positions of `tags`; tags not in the list (e.g.
    /// seen only in validation data) are skipped.
    pub fn indices(&self, tags: &[String]) -> Vec<u32> {
        let set: BTreeSet<u32> = tags
            .iter()
            .filter_map(|t| self.index(t))
            .map(|i| u32::try_from(i).expect("fewer than 2^32 labels"))
            .collect();
        set.into_iter().collect()
    }

    /// 1.0 at the position of each known tag, 0.0 elsewhere.
    pub fn multi_hot(&self, tags: &[String]) -> Vec<f32> {
        let mut vector = vec![0.0; self.len()];
        for i in self.indices(tags) {
            vector[i as usize] = 1.0;
        }
        vector
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(tags: &[&str]) -> Document {
        Document {
            id: "x".into(),
            title: String::new(),
            text: String::new(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            source: String::new(),
            rejected: Vec::new(),
            ..Default::default()
        }
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sorted_set_of_tags_with_lookup_and_multi_hot() {
        let docs = [
            doc(&["use::editing", "role::program"]),
            doc(&["devel::lang", "role::program"]),
        ];
        let labels = Labels::from_documents(&docs);
        assert_eq!(
            labels.names(),
            ["devel::lang", "role::program", "use::editing"]
        );
        assert_eq!(labels.index("role::program"), Some(1));
        assert_eq!(labels.index("missing"), None);
        assert_eq!(labels.name(2), Some("use::editing"));
        let tags = strings(&["use::editing", "unknown", "devel::lang", "use::editing"]);
        assert_eq!(labels.indices(&tags), [0, 2]);
        assert_eq!(labels.multi_hot(&tags), [1.0, 0.0, 1.0]);
    }

    #[test]
    fn saves_and_loads_labels_json_in_order() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("labels.json");
        let labels = Labels::from_names(strings(&["b", "a"]))?;
        labels.save(&path)?;
        let text = std::fs::read_to_string(&path)?;
        assert_eq!(serde_json::from_str::<Vec<String>>(&text)?, ["b", "a"]);
        assert_eq!(Labels::load(&path)?, labels);
        Ok(())
    }

    #[test]
    fn rejects_duplicates_and_bad_files() -> anyhow::Result<()> {
        assert!(matches!(
            Labels::from_names(strings(&["a", "a"])),
            Err(LabelsError::Duplicate(name)) if name == "a"
        ));
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("labels.json");
        std::fs::write(&path, "{\"a\": 1}")?;
        assert!(matches!(Labels::load(&path), Err(LabelsError::Json { .. })));
        Ok(())
    }
}
