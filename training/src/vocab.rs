//! A WordPiece vocabulary learned by byte-pair-style merges, deterministic:
//! the same corpus gives the same vocabulary, ids included, in every run.
//! (The `tokenizers` trainer iterates randomly seeded hash maps, so its
//! vocabularies differ from run to run, and so would every model.)
//!
//! Words are split into characters, the first as is and the rest with the
//! `##` continuation prefix; the most frequent adjacent pair is merged
//! repeatedly (ties: the pair whose symbols were created first) until the
//! vocabulary is full or no pair occurs twice.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

/// Prefix of a piece that continues a word.
pub const CONTINUATION: &str = "##";

/// Learns up to `size` pieces (alphabet included) from word counts; returns
/// them in id order (the caller puts special tokens first).
pub fn learn(word_counts: &BTreeMap<String, u64>, size: usize) -> Vec<String> {
    let mut symbols: Vec<String> = Vec::new();
    let mut ids: HashMap<String, u32> = HashMap::new();
    let intern = |s: String, symbols: &mut Vec<String>, ids: &mut HashMap<String, u32>| -> u32 {
        *ids.entry(s.clone()).or_insert_with(|| {
            symbols.push(s);
            (symbols.len() - 1) as u32
        })
    };

    // Alphabet in a fixed order: initial characters, then continuations,
    // each sorted.
    let mut initials: Vec<char> = Vec::new();
    let mut continuations: Vec<char> = Vec::new();
    for word in word_counts.keys() {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            initials.push(first);
        }
        continuations.extend(chars);
    }
    initials.sort_unstable();
    initials.dedup();
    continuations.sort_unstable();
    continuations.dedup();
    for c in &initials {
        intern(c.to_string(), &mut symbols, &mut ids);
    }
    for c in &continuations {
        intern(format!("{CONTINUATION}{c}"), &mut symbols, &mut ids);
    }

    let mut words: Vec<(Vec<u32>, i64)> = word_counts
        .iter()
        .filter(|(w, _)| !w.is_empty())
        .map(|(word, &count)| {
            let pieces = word
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    let s = if i == 0 {
                        c.to_string()
                    } else {
                        format!("{CONTINUATION}{c}")
                    };
                    ids[&s]
                })
                .collect();
            (pieces, count as i64)
        })
        .collect();

    let mut counts: HashMap<(u32, u32), i64> = HashMap::new();
    let mut places: HashMap<(u32, u32), HashSet<usize>> = HashMap::new();
    for (w, (pieces, count)) in words.iter().enumerate() {
        for pair in pieces.windows(2) {
            let key = (pair[0], pair[1]);
            *counts.entry(key).or_default() += count;
            places.entry(key).or_default().insert(w);
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<(u32, u32)>)> =
        counts.iter().map(|(&k, &c)| (c, Reverse(k))).collect();

    while symbols.len() < size {
        let Some((count, Reverse(pair))) = heap.pop() else {
            break;
        };
        if counts.get(&pair).copied() != Some(count) {
            continue; // stale entry
        }
        if count < 2 {
            break;
        }
        let right = &symbols[pair.1 as usize];
        let merged = format!(
            "{}{}",
            symbols[pair.0 as usize],
            right.strip_prefix(CONTINUATION).unwrap_or(right)
        );
        let new = intern(merged, &mut symbols, &mut ids);
        let mut touched: Vec<usize> = places
            .remove(&pair)
            .unwrap_or_default()
            .into_iter()
            .collect();
        touched.sort_unstable();
        counts.remove(&pair);
        let mut changed: HashSet<(u32, u32)> = HashSet::new();
        for w in touched {
            let (pieces, count) = &mut words[w];
            let count = *count;
            // Remove this word's old pairs, merge, add the new pairs.
            for p in pieces.windows(2) {
                let key = (p[0], p[1]);
                if key != pair {
                    if let Some(c) = counts.get_mut(&key) {
                        *c -= count;
                        changed.insert(key);
                    }
                }
            }
            let mut merged_pieces = Vec::with_capacity(pieces.len());
            let mut i = 0;
            while i < pieces.len() {
                if i + 1 < pieces.len() && (pieces[i], pieces[i + 1]) == pair {
                    merged_pieces.push(new);
                    i += 2;
                } else {
                    merged_pieces.push(pieces[i]);
                    i += 1;
                }
            }
            *pieces = merged_pieces;
            for p in pieces.windows(2) {
                let key = (p[0], p[1]);
                *counts.entry(key).or_default() += count;
                places.entry(key).or_default().insert(w);
                changed.insert(key);
            }
        }
        let mut changed: Vec<(u32, u32)> = changed.into_iter().collect();
        changed.sort_unstable();
        for key in changed {
            match counts.get(&key).copied() {
                Some(c) if c > 0 => heap.push((c, Reverse(key))),
                _ => {
                    counts.remove(&key);
                }
            }
        }
    }
    symbols.truncate(size);
    symbols
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(words: &[(&str, u64)]) -> BTreeMap<String, u64> {
        words.iter().map(|&(w, c)| (w.to_owned(), c)).collect()
    }

    #[test]
    fn merges_frequent_pairs_into_pieces() {
        let vocab = learn(&counts(&[("editor", 5), ("edit", 3), ("text", 4)]), 40);
        assert_eq!(vocab[0], "e"); // initials sorted first
        assert!(vocab.contains(&"edit".to_owned()), "{vocab:?}");
        assert!(vocab.contains(&"##or".to_owned()) || vocab.contains(&"editor".to_owned()));
        assert!(vocab.iter().all(|p| !p.is_empty()));
        let unique: HashSet<&String> = vocab.iter().collect();
        assert_eq!(unique.len(), vocab.len());
    }

    #[test]
    fn is_deterministic_and_respects_the_size() {
        let words = counts(&[
            ("alpha", 3),
            ("alphabet", 2),
            ("beta", 4),
            ("bet", 2),
            ("zeta", 1),
        ]);
        let a = learn(&words, 30);
        let b = learn(&words, 30);
        assert_eq!(a, b);
        assert!(a.len() <= 30);
        // Nothing occurs twice in a single rare word: only the alphabet.
        let only = learn(&counts(&[("xyz", 1)]), 100);
        assert_eq!(only, ["x", "##y", "##z"]);
    }
}
