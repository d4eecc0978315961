//! Near-duplicate detection: a 64-bit SimHash over word shingles, and a
//! per-source window of recent SimHashes searched by Hamming distance.
//!
//! Words are maximal runs of letters and digits, lowercased; in scripts
//! written without spaces (Han, kana, Thai) each character is a word. Every
//! run of [`SHINGLE_WORDS`] consecutive words is hashed with XXH3, a fixed,
//! documented algorithm, so a SimHash is the same in every process and every
//! version of sift and can be stored.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64;

/// Words per shingle.
pub const SHINGLE_WORDS: usize = 3;

/// The SimHash of a text (0 for a text without words).
pub fn simhash(text: &str) -> u64 {
    let mut acc = Accumulator::default();
    let mut last = [0u64; SHINGLE_WORDS];
    let mut words = 0usize;
    for_each_word(text, |h| {
        last.rotate_left(1);
        last[SHINGLE_WORDS - 1] = h;
        words += 1;
        if words >= SHINGLE_WORDS {
            acc.add(shingle(&last));
        }
    });
    if (1..SHINGLE_WORDS).contains(&words) {
        acc.add(shingle(&last[SHINGLE_WORDS - words..]));
    }
    acc.finish()
}

/// Bits in which two SimHashes differ.
pub fn distance(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

fn shingle(words: &[u64]) -> u64 {
    let mut bytes = [0u8; 8 * SHINGLE_WORDS];
    for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    xxh3_64(&bytes[..8 * words.len()])
}

/// Characters of scripts written without spaces between words.
fn unspaced(c: char) -> bool {
    matches!(c,
        '\u{0e00}'..='\u{0e7f}'   // Thai
        | '\u{0e80}'..='\u{0eff}' // Lao
        | '\u{3040}'..='\u{30ff}' // Hiragana, Katakana
        | '\u{3400}'..='\u{4dbf}' // CJK extension A
        | '\u{4e00}'..='\u{9fff}' // CJK unified ideographs
        | '\u{f900}'..='\u{faff}' // CJK compatibility ideographs
        | '\u{20000}'..='\u{2ffff}')
}

/// Calls `f` with the XXH3 hash of each lowercased word, in order.
fn for_each_word(text: &str, mut f: impl FnMut(u64)) {
    let bytes = text.as_bytes();
    let mut word: Vec<u8> = Vec::with_capacity(64);
    let mut utf8 = [0u8; 4];
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_alphanumeric() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
                i += 1;
            }
            // `| 0x20` lowercases ASCII letters and leaves digits as they are.
            word.extend(bytes[start..i].iter().map(|b| b | 0x20));
            continue;
        }
        if b < 0x80 {
            i += 1;
            if !word.is_empty() {
                f(xxh3_64(&word));
                word.clear();
            }
            continue;
        }
        let Some(c) = text[i..].chars().next() else {
            break;
        };
        i += c.len_utf8();
        if !c.is_alphanumeric() {
            if !word.is_empty() {
                f(xxh3_64(&word));
                word.clear();
            }
        } else if unspaced(c) {
            if !word.is_empty() {
                f(xxh3_64(&word));
                word.clear();
            }
            f(xxh3_64(c.encode_utf8(&mut utf8).as_bytes()));
        } else {
            for l in c.to_lowercase() {
                word.extend_from_slice(l.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    if !word.is_empty() {
        f(xxh3_64(&word));
    }
}

/// `SPREAD[b]` has byte `k` set to bit `k` of `b`: adding it to a `u64`
/// counts the set bits of a byte in eight 8-bit lanes at once.
const SPREAD: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 8 {
            t[b] |= (((b >> k) & 1) as u64) << (8 * k);
            k += 1;
        }
        b += 1;
    }
    t
};

/// Counts, for each of the 64 bit positions, how many shingle hashes have it set.
struct Accumulator {
    /// Byte `j` of the hashes, counted per bit in 8-bit lanes; flushed before they overflow.
    lanes: [u64; 8],
    pending: u32,
    ones: [u32; 64],
    total: u32,
}

impl Default for Accumulator {
    fn default() -> Self {
        Accumulator {
            lanes: [0; 8],
            pending: 0,
            ones: [0; 64],
            total: 0,
        }
    }
}

impl Accumulator {
    fn add(&mut self, h: u64) {
        for (j, lane) in self.lanes.iter_mut().enumerate() {
            *lane += SPREAD[((h >> (8 * j)) & 0xff) as usize];
        }
        self.pending += 1;
        self.total += 1;
        if self.pending == 255 {
            self.flush();
        }
    }

    fn flush(&mut self) {
        for (j, lane) in self.lanes.iter_mut().enumerate() {
            for k in 0..8 {
                self.ones[8 * j + k] += ((*lane >> (8 * k)) & 0xff) as u32;
            }
            *lane = 0;
        }
        self.pending = 0;
    }

    /// Bit `i` is set when more than half the shingles have it set.
    fn finish(mut self) -> u64 {
        self.flush();
        self.ones
            .iter()
            .enumerate()
            .fold(0u64, |h, (i, &n)| h | (u64::from(2 * n > self.total) << i))
    }
}

/// What a near-duplicate check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    /// The SimHash of the earlier document.
    pub simhash: u64,
    /// Bits in which it differs.
    pub distance: u32,
}

/// The last SimHashes of every source, in this process's memory.
///
/// Memory: about 120 bytes per remembered document with thresholds under
/// 16 bits (40 above), so `window` documents per source times the number
/// of sources, e.g. about 1.2 MB per source with the default 10,000.
pub struct NearDuplicates {
    bits: u32,
    window: usize,
    sources: HashMap<String, Window>,
}

impl NearDuplicates {
    /// Documents within `bits` of one of the last `window` documents kept
    /// from their source are near-duplicates; 0 for either turns the check off.
    pub fn new(bits: u32, window: usize) -> Self {
        NearDuplicates {
            bits: bits.min(64),
            window,
            sources: HashMap::new(),
        }
    }

    /// Whether the check is on.
    pub fn enabled(&self) -> bool {
        self.bits > 0 && self.window > 0
    }

    /// Checks document `id` of `source` against the source's window, ignoring
    /// an earlier version of the same document. Without a match the document
    /// is remembered (its earlier version no longer counts) and None is returned.
    pub fn check(&mut self, source: &str, id: &str, simhash: u64) -> Option<Match> {
        if !self.enabled() {
            return None;
        }
        let (bits, window) = (self.bits, self.window);
        let w = match self.sources.get_mut(source) {
            Some(w) => w,
            None => self
                .sources
                .entry(source.to_string())
                .or_insert_with(|| Window::new(bits, window)),
        };
        let id = xxh3_64(id.as_bytes());
        if let Some(m) = w.find(id, simhash) {
            return Some(m);
        }
        w.insert(id, simhash);
        None
    }

    /// Documents remembered for a source (their latest versions).
    pub fn len(&self, source: &str) -> usize {
        self.sources.get(source).map_or(0, |w| w.by_id.len())
    }
}

/// No slot.
const NONE: u32 = u32::MAX;

/// One remembered document version.
#[derive(Clone, Copy)]
struct Slot {
    /// XXH3 of the document id.
    id: u64,
    simhash: u64,
    /// Insertion number; the slot is `seq % capacity`.
    seq: u64,
}

/// One source's last `capacity` kept documents, in a ring.
///
/// With a threshold of `bits`, two hashes within it agree exactly on at
/// least one of `bits + 1` disjoint blocks of bits (pigeonhole). So each
/// block value points at the slot of the newest entry that has it, each
/// entry at the slot of the next older one with the same value, and a
/// lookup walks only the entries that share a block with the new hash. A
/// walk ends where a slot holds an entry newer than the one before it: the
/// ring has overwritten the linked entry, and everything after it is older
/// still. Thresholds of 16 and more (blocks too narrow to be selective)
/// scan the ring instead.
struct Window {
    bits: u32,
    capacity: usize,
    blocks: usize,
    next_seq: u64,
    /// Grows up to `capacity`, then is overwritten oldest first.
    ring: Vec<Slot>,
    /// Per slot and block: the slot of the next older entry with the same block value.
    links: Vec<u32>,
    /// Per block: block value -> the slot of the newest entry with it
    /// (removed when that entry is overwritten, so always current).
    heads: Vec<HashMap<u32, u32>>,
    /// Document id -> its latest entry (seq); older versions no longer count.
    by_id: HashMap<u64, u64>,
}

impl Window {
    fn new(bits: u32, capacity: usize) -> Self {
        // bits >= 1 here, so there are at least 2 blocks of at most 32 bits.
        let blocks = if bits < 16 { bits as usize + 1 } else { 0 };
        Window {
            bits,
            // Slots are u32, NONE excluded.
            capacity: capacity.min(NONE as usize),
            blocks,
            next_seq: 0,
            ring: Vec::new(),
            links: Vec::new(),
            heads: vec![HashMap::new(); blocks],
            by_id: HashMap::new(),
        }
    }

    fn block(&self, simhash: u64, b: usize) -> u32 {
        let start = 64 * b / self.blocks;
        let end = 64 * (b + 1) / self.blocks;
        ((simhash >> start) & (u64::MAX >> (64 - (end - start)))) as u32
    }

    /// Whether an entry is its document's latest version.
    fn latest(&self, s: &Slot) -> bool {
        self.by_id.get(&s.id) == Some(&s.seq)
    }

    fn find(&self, id: u64, simhash: u64) -> Option<Match> {
        let hit = |s: &Slot| {
            let d = distance(s.simhash, simhash);
            (s.id != id && d <= self.bits && self.latest(s)).then_some(Match {
                simhash: s.simhash,
                distance: d,
            })
        };
        if self.blocks == 0 {
            return self.ring.iter().find_map(hit);
        }
        for b in 0..self.blocks {
            let mut slot = self.heads[b]
                .get(&self.block(simhash, b))
                .copied()
                .unwrap_or(NONE);
            let mut newer = u64::MAX;
            while let Some(s) = self.ring.get(slot as usize) {
                if s.seq >= newer {
                    break;
                }
                if let Some(m) = hit(s) {
                    return Some(m);
                }
                newer = s.seq;
                slot = self.links[slot as usize * self.blocks + b];
            }
        }
        None
    }

    fn insert(&mut self, id: u64, simhash: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let i = (seq % self.capacity as u64) as usize;
        let slot = Slot { id, simhash, seq };
        if i < self.ring.len() {
            // Overwrite the oldest entry, forgetting it.
            let old = self.ring[i];
            if self.latest(&old) {
                self.by_id.remove(&old.id);
            }
            for b in 0..self.blocks {
                let key = self.block(old.simhash, b);
                if self.heads[b].get(&key) == Some(&(i as u32)) {
                    self.heads[b].remove(&key);
                }
            }
            self.ring[i] = slot;
        } else {
            self.ring.push(slot);
            self.links.resize(self.ring.len() * self.blocks, NONE);
        }
        self.by_id.insert(id, seq);
        for b in 0..self.blocks {
            let key = self.block(simhash, b);
            let older = self.heads[b].insert(key, i as u32).unwrap_or(NONE);
            self.links[i * self.blocks + b] = older;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    const TEXT: &str = "The quick brown fox jumps over the lazy dog while the cat \
        watches from the warm windowsill, wondering why anyone would run so far \
        on such a hot afternoon when the shade of the old oak tree is right there \
        and the water bowl is full.";

    #[test]
    fn simhash_is_stable() {
        // Recorded values: a change here changes every stored SimHash.
        assert_eq!(simhash(""), 0);
        assert_eq!(format!("{:016x}", simhash(TEXT)), "791430364cf94ab0");
        assert_eq!(format!("{:016x}", simhash("one two")), "5f395e118ac51e56");
    }

    #[test]
    fn accumulator_matches_a_plain_count() {
        for n in [1u64, 2, 254, 255, 256, 511, 1000] {
            let mut acc = Accumulator::default();
            let mut counts = [0i64; 64];
            for i in 0..n {
                let h = spread(i * 31 + n);
                acc.add(h);
                for (bit, c) in counts.iter_mut().enumerate() {
                    *c += if h >> bit & 1 == 1 { 1 } else { -1 };
                }
            }
            let expect = (0..64).fold(0u64, |h, bit| h | (u64::from(counts[bit] > 0) << bit));
            assert_eq!(acc.finish(), expect, "{n} hashes");
        }
    }

    #[test]
    fn case_punctuation_and_spacing_do_not_matter() {
        let shouted = TEXT.to_uppercase().replace(", ", " -- ").replace(' ', "  ");
        assert_eq!(simhash(TEXT), simhash(&shouted));
    }

    #[test]
    fn small_edits_are_near_large_ones_far() {
        let edited = TEXT.replace("hot afternoon", "warm afternoon");
        let d = distance(simhash(TEXT), simhash(&edited));
        assert!(d <= 8, "{d}");
        let other = "Completely unrelated words about compilers, registers, \
            instruction scheduling and the many ways a loop can be unrolled by hand.";
        let d = distance(simhash(TEXT), simhash(other));
        assert!(d >= 16, "{d}");
    }

    #[test]
    fn unspaced_scripts_shingle_by_character() {
        let a = simhash("東京都は日本の首都であり人口が最も多い都市です");
        let b = simhash("東京都は日本の首都であり人口が最も多い都市です。");
        let c = simhash("大阪は関西地方の経済の中心で食べ物が有名な町です");
        assert_eq!(a, b);
        assert!(distance(a, c) > 8);
    }

    fn spread(i: u64) -> u64 {
        xxh3_64(&i.to_le_bytes())
    }

    #[test]
    fn window_per_source_ignores_same_id_and_evicts() {
        let mut nd = NearDuplicates::new(3, 4);
        let h = spread(1);
        assert_eq!(nd.check("a", "doc1", h), None);
        // Two bits away, another id: a near-duplicate.
        let m = nd.check("a", "doc2", h ^ 0b101);
        assert_eq!(
            m,
            Some(Match {
                simhash: h,
                distance: 2
            })
        );
        // Four bits away: not.
        assert_eq!(nd.check("a", "doc3", h ^ 0b1111), None);
        // Same text in another source: not.
        assert_eq!(nd.check("b", "doc2", h ^ 0b101), None);
        // The same document again (an update): kept, and its entry replaced.
        assert_eq!(nd.check("a", "doc1", h ^ (1 << 40)), None);
        assert_eq!(nd.len("a"), 2);
        // Four more distinct documents push doc1 and doc3 out of the window.
        for i in 10..14 {
            assert_eq!(nd.check("a", &format!("doc{i}"), spread(i)), None);
        }
        assert_eq!(nd.len("a"), 4);
        assert_eq!(nd.check("a", "doc2", h ^ 0b101), None);
    }

    #[test]
    fn indexed_and_scanned_windows_agree() {
        // A model: the last `capacity` kept versions, of which only each document's
        // latest counts. Many re-fetched ids exercise replacement and overwriting.
        for (bits, capacity) in [(1, 50), (3, 50), (3, 1), (3, 2), (7, 50), (20, 50)] {
            let mut nd = NearDuplicates::new(bits, capacity);
            let mut model: VecDeque<(String, u64)> = VecDeque::new();
            for i in 0..3000u64 {
                let id = format!("d{}", spread(i) % 120);
                let base = spread(spread(i) % 200);
                let h = base ^ (1 << (spread(i + 7) % 64)) ^ (1 << (spread(i + 9) % 64));
                let expect = model.iter().enumerate().any(|(k, (other, o))| {
                    let latest = !model.iter().skip(k + 1).any(|(later, _)| later == other);
                    *other != id && latest && distance(*o, h) <= bits
                });
                let got = nd.check("s", &id, h).is_some();
                assert_eq!(got, expect, "bits {bits} step {i}");
                if !got {
                    model.push_back((id, h));
                    if model.len() > capacity {
                        model.pop_front();
                    }
                }
                let ids: std::collections::HashSet<&String> =
                    model.iter().map(|(d, _)| d).collect();
                assert_eq!(nd.len("s"), ids.len(), "bits {bits} step {i}");
            }
        }
        assert!(!NearDuplicates::new(0, 10).enabled());
        assert!(!NearDuplicates::new(3, 0).enabled());
    }
}
