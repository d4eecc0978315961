//! Hashed word n-grams for the model's fastText-style branch.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Hashes the lowercased words of a text and its adjacent word pairs into
/// `buckets` ids. Words are maximal runs of alphanumeric characters. The
/// hash is xxh3, so ids are the same on every run and machine; a bigram is
/// hashed as `"first second"`, which no unigram can equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramHasher {
    buckets: u32,
}

impl NgramHasher {
    /// A hasher into `buckets` ids (`ModelConfig::ngrams.buckets`); at least 1.
    pub fn new(buckets: u32) -> Self {
        Self {
            buckets: buckets.max(1),
        }
    }

    /// Number of buckets.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Bucket ids of all unigrams (in text order) followed by all bigrams;
    /// empty for a text without words.
    pub fn hash(&self, text: &str) -> Vec<u32> {
        gram_hashes(text)
            .into_iter()
            .map(|h| self.bucket_of(h))
            .collect()
    }

    fn bucket_of(&self, hash: u64) -> u32 {
        u32::try_from(hash % u64::from(self.buckets)).expect("a value below a u32 fits in a u32")
    }
}

/// The distinct grams of a text as [`gram_hashes`] sees them (lowercased
/// words and `"first second"` pairs), each with its hash; for explaining a
/// score in words.
pub fn gram_strings(text: &str) -> Vec<(String, u64)> {
    let lowered = text.to_lowercase();
    let words: Vec<&str> = lowered
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let pairs = words.windows(2).map(|w| format!("{} {}", w[0], w[1]));
    for gram in words.iter().map(|w| (*w).to_owned()).chain(pairs) {
        let hash = xxh3_64(gram.as_bytes());
        if seen.insert(hash) {
            out.push((gram, hash));
        }
    }
    out
}

/// The full 64-bit xxh3 hashes of a text's lowercased word unigrams (in text
/// order) followed by its adjacent word pairs. Words are maximal runs of
/// alphanumeric characters; a bigram is hashed as `"first second"`, which no
/// unigram can equal. The n-gram branch folds these into buckets; the linear
/// model keeps them whole as its vocabulary.
pub fn gram_hashes(text: &str) -> Vec<u64> {
    let lowered = text.to_lowercase();
    let words: Vec<&str> = lowered
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut hashes = Vec::with_capacity(words.len() * 2);
    hashes.extend(words.iter().map(|w| xxh3_64(w.as_bytes())));
    let mut pair = String::new();
    for window in words.windows(2) {
        pair.clear();
        pair.push_str(window[0]);
        pair.push(' ');
        pair.push_str(window[1]);
        hashes.push(xxh3_64(pair.as_bytes()));
    }
    hashes
}

/// Seed of the character n-gram hashes, so that no character gram shares a
/// hash with a word gram by construction.
const CHAR_SEED: u64 = 0x63_6861_7273; // "chars"

/// Shortest and longest character n-gram.
pub const CHAR_GRAMS: (usize, usize) = (2, 5);

/// The 64-bit hashes of a text's character n-grams within words, as
/// scikit-learn's `char_wb` analyser makes them: the text lowercased, split
/// on whitespace, each word padded with a space on both sides, and every run
/// of 2 to 5 characters of the padded word (a padded word shorter than n
/// counts once, whole). They see inside package names (`python3-`, `-dev`,
/// `lib…`) and word forms that word grams keep apart.
pub fn char_gram_hashes(text: &str) -> Vec<u64> {
    let lowered = text.to_lowercase();
    let (min_n, max_n) = CHAR_GRAMS;
    let mut hashes = Vec::with_capacity(lowered.len() * (max_n - min_n + 1));
    let mut padded = String::new();
    let mut bounds: Vec<usize> = Vec::new();
    for word in lowered.split_whitespace() {
        padded.clear();
        padded.push(' ');
        padded.push_str(word);
        padded.push(' ');
        bounds.clear();
        bounds.extend(padded.char_indices().map(|(i, _)| i));
        bounds.push(padded.len());
        let chars = bounds.len() - 1;
        for n in min_n..=max_n {
            if chars < n {
                hashes.push(xxh3_64_with_seed(padded.as_bytes(), CHAR_SEED));
                break;
            }
            for start in 0..=chars - n {
                let gram = &padded.as_bytes()[bounds[start]..bounds[start + n]];
                hashes.push(xxh3_64_with_seed(gram, CHAR_SEED));
            }
        }
    }
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unigrams_then_bigrams_lowercased_and_stable() {
        let hasher = NgramHasher::new(1 << 18);
        let ids = hasher.hash("Text editor, text-EDITOR!");
        assert_eq!(ids.len(), 4 + 3);
        assert_eq!(ids[0], ids[2], "case is ignored");
        assert_eq!(ids[4], ids[6], "same bigram, same id");
        assert!(ids.iter().all(|&id| id < 1 << 18));
        // Recorded values: changing them invalidates every trained model.
        assert_eq!(ids, [42513, 134560, 42513, 134560, 143451, 43730, 143451]);
    }

    #[test]
    fn char_grams_follow_char_wb() {
        // " ab " has 3 bigrams, 2 trigrams, 1 four-gram; then 5 > 4 chars:
        // the padded word once more.
        assert_eq!(char_gram_hashes("AB").len(), 3 + 2 + 1 + 1);
        // A one-letter word: " a " gives 2 bigrams, 1 trigram, then itself once.
        assert_eq!(char_gram_hashes("a").len(), 2 + 1 + 1);
        let h = |g: &str| xxh3_64_with_seed(g.as_bytes(), CHAR_SEED);
        let grams = char_gram_hashes("Été");
        assert!(grams.contains(&h(" é")) && grams.contains(&h("été ")));
        // Words are split on whitespace only: the hyphen stays inside.
        assert!(char_gram_hashes("python3-foo").contains(&h("3-f")));
        assert!(char_gram_hashes(" \n\t ").is_empty());
        // Never a word gram's hash.
        assert!(!char_gram_hashes("ab").contains(&xxh3_64(b"ab")));
    }

    #[test]
    fn empty_and_tiny_tables() {
        assert!(NgramHasher::new(10).hash(" ,.; ").is_empty());
        assert_eq!(NgramHasher::new(0).hash("a b c"), [0; 5]);
    }
}
