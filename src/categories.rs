//! What each category means, for people: a name and a description per tag,
//! compiled in from `data/reference/categories.tsv.gz` (Debian's debtags
//! vocabulary, extracted by `scripts/category-vocabulary.py`).
//!
//! The review UI shows them beside each of the top 5 and matches the label
//! search against their words, so an analyst can find `works-with::image`
//! by typing "pictures" or "bitmap". A label outside the vocabulary (a
//! deployment's own categories) has no description and is shown as it is.

use std::collections::HashMap;
use std::io::BufRead;
use std::sync::OnceLock;

const CATEGORIES_GZ: &[u8] = include_bytes!("../data/reference/categories.tsv.gz");

/// One category's words for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Category {
    /// The tag, e.g. `use::editing`.
    pub tag: String,
    /// The facet's name, e.g. `Purpose`.
    pub facet_name: String,
    /// One line, e.g. `Editing`.
    pub name: String,
    /// A paragraph or two; may be empty.
    pub description: String,
    /// Lowercased words of the tag and name, which rank first in search.
    name_words: Vec<String>,
    /// Lowercased words of the tag, names and description, for search.
    words: Vec<String>,
}

/// Lowercased alphanumeric words of `text`.
fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Category {
    /// How well `query_words` match this category: 0 when one of them is
    /// not a prefix of any of its words; otherwise higher for matches in
    /// the tag and name than in the description.
    pub fn matches(&self, query_words: &[String]) -> u32 {
        let mut score = 0;
        for q in query_words {
            if self.name_words.iter().any(|w| w.starts_with(q.as_str())) {
                score += 3;
            } else if self.words.iter().any(|w| w.starts_with(q.as_str())) {
                score += 1;
            } else {
                return 0;
            }
        }
        score
    }
}

/// The compiled-in vocabulary, by tag.
pub fn all() -> &'static HashMap<String, Category> {
    static CATALOGUE: OnceLock<HashMap<String, Category>> = OnceLock::new();
    CATALOGUE.get_or_init(|| {
        let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(CATEGORIES_GZ));
        let mut out = HashMap::new();
        // The file is written by our own script and checked by a test: a
        // line that does not parse is skipped rather than taking the UI down.
        for line in reader.lines().skip(1).map_while(Result::ok) {
            let fields: Vec<&str> = line.split('\t').collect();
            let [tag, _facet, facet_name, name, description] = fields[..] else {
                continue;
            };
            out.insert(
                tag.to_owned(),
                Category {
                    tag: tag.to_owned(),
                    facet_name: facet_name.to_owned(),
                    name: name.to_owned(),
                    description: description.to_owned(),
                    name_words: words(&format!("{tag} {name}")),
                    words: words(&format!("{tag} {facet_name} {name} {description}")),
                },
            );
        }
        out
    })
}

/// The category of `tag`, if the vocabulary has it.
pub fn get(tag: &str) -> Option<&'static Category> {
    all().get(tag)
}

/// The query's words, for [`Category::matches`].
pub fn query_words(query: &str) -> Vec<String> {
    words(query)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_debtags_category_of_the_sample_has_a_name_and_description() -> anyhow::Result<()> {
        assert_eq!(all().len(), 642);
        let sample = crate::sample::bundled()?;
        let mut tags: Vec<&str> = sample
            .iter()
            .flat_map(|d| d.tags.iter().map(String::as_str))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        assert!(tags.len() > 100);
        for tag in tags {
            let c = get(tag).ok_or_else(|| anyhow::anyhow!("{tag} has no description"))?;
            assert!(!c.name.is_empty(), "{tag}");
        }
        let editing = get("use::editing").ok_or_else(|| anyhow::anyhow!("use::editing"))?;
        assert_eq!(editing.name, "Editing");
        Ok(())
    }

    #[test]
    fn search_finds_categories_by_the_words_of_their_descriptions() -> anyhow::Result<()> {
        let smtp = get("protocol::smtp").ok_or_else(|| anyhow::anyhow!("smtp"))?;
        let q = |s: &str| smtp.matches(&query_words(s));
        assert!(q("smtp") > 0);
        assert!(q("emai") > 0, "{:?}", smtp.description);
        assert!(q("mail transfer") > 0);
        assert!(
            q("smtp") > q("emails"),
            "name matches rank above description matches"
        );
        assert_eq!(q("spreadsheet"), 0);
        assert_eq!(q("email spreadsheet"), 0, "every word must match");
        let ssl = get("protocol::ssl").ok_or_else(|| anyhow::anyhow!("ssl"))?;
        assert!(
            ssl.description.starts_with("Secure Socket Layer"),
            "{}",
            ssl.description
        );
        Ok(())
    }
}
