//! The labeled sample bundled into the binary: 2,129 Debian package
//! descriptions with their human-assigned debtags (see `data/sample/README.md`).
//! It feeds the main job and the tests, so neither needs files beside the binary.

use std::io::BufRead;

use serde::Deserialize;

const SAMPLE_GZ: &[u8] = include_bytes!("../data/sample/debtags-sample.jsonl.gz");

/// One labeled document.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LabeledDoc {
    /// Document id (the Debian package name).
    pub id: String,
    /// Where it came from (the Debian source package).
    pub source: String,
    /// Title (the package's short description).
    pub title: String,
    /// Text (the long description).
    pub text: String,
    /// Debian archive section.
    #[serde(default)]
    pub section: String,
    /// Category labels.
    pub tags: Vec<String>,
}

/// The bundled sample, in file order.
pub fn bundled() -> crate::Result<Vec<LabeledDoc>> {
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(SAMPLE_GZ));
    let mut docs = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| crate::Error::io("reading the bundled sample", e))?;
        let doc = serde_json::from_str(&line)
            .map_err(|e| crate::Error::Invalid(format!("bundled sample line {}: {e}", i + 1)))?;
        docs.push(doc);
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bundled_sample_loads_whole() -> anyhow::Result<()> {
        let docs = super::bundled()?;
        assert_eq!(docs.len(), 2129);
        assert!(docs.iter().all(|d| !d.id.is_empty() && !d.tags.is_empty()));
        Ok(())
    }
}
