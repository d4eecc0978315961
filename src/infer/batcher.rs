//! The dynamic batcher's choice of documents: which waiting documents go
//! into the next forward pass.
//!
//! A batch holds at most `max_docs` documents and `max_tokens` padded
//! tokens (documents × the longest of them). Documents of similar length go
//! together, so little is padded; the oldest waiting document is always in
//! the next batch, so a document of unusual length is never starved by a
//! stream of others. A document longer than `max_tokens` on its own still
//! runs, alone.

use std::time::{Duration, Instant};

/// The batch limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most documents per batch (at least 1).
    pub max_docs: usize,
    /// Most padded tokens per batch.
    pub max_tokens: usize,
    /// How long the oldest document waits for a batch to fill.
    pub max_wait: Duration,
}

/// A document waiting for a batch.
#[derive(Debug)]
pub struct Waiting<T> {
    /// Its token count.
    pub len: usize,
    /// When it was queued.
    pub since: Instant,
    /// Arrival order.
    seq: u64,
    /// The document.
    pub item: T,
}

/// Documents waiting for a batch, kept sorted by length.
#[derive(Debug)]
pub struct Pending<T> {
    waiting: Vec<Waiting<T>>,
    next_seq: u64,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            waiting: Vec::new(),
            next_seq: 0,
        }
    }
}

impl<T> Pending<T> {
    /// Adds a document of `len` tokens, queued at `since`.
    pub fn push(&mut self, len: usize, since: Instant, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let at = self.waiting.partition_point(|w| w.len <= len);
        self.waiting.insert(
            at,
            Waiting {
                len,
                since,
                seq,
                item,
            },
        );
    }

    /// Documents waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// When the oldest waiting document was queued.
    pub fn oldest(&self) -> Option<Instant> {
        self.waiting.iter().map(|w| w.since).min()
    }

    /// Whether what waits could fill a whole batch now.
    pub fn can_fill(&self, limits: &Limits) -> bool {
        let longest = self.waiting.last().map_or(0, |w| w.len.max(1));
        self.waiting.len() >= limits.max_docs.max(1)
            || longest * self.waiting.len() >= limits.max_tokens
    }

    /// Takes the next batch: the oldest document and its nearest neighbours
    /// by length among the oldest [`WINDOW`] batches' worth of documents, as
    /// many as the limits allow. Looking only that far back keeps every
    /// document's wait (and so the lag of the commits, which go in arrival
    /// order) within a few batches however long the queue is. Empty only
    /// when nothing waits.
    pub fn take(&mut self, limits: &Limits) -> Vec<Waiting<T>> {
        if self.waiting.is_empty() {
            return Vec::new();
        }
        let max_docs = limits.max_docs.max(1);
        // Candidates: the `window` oldest, in length order.
        let window = max_docs.saturating_mul(WINDOW);
        let newest_allowed = if self.waiting.len() > window {
            let mut seqs: Vec<u64> = self.waiting.iter().map(|w| w.seq).collect();
            let (_, nth, _) = seqs.select_nth_unstable(window - 1);
            *nth
        } else {
            u64::MAX
        };
        let candidates: Vec<usize> = (0..self.waiting.len())
            .filter(|&i| self.waiting[i].seq <= newest_allowed)
            .collect();
        let Some(oldest) = (0..candidates.len()).min_by_key(|&c| self.waiting[candidates[c]].seq)
        else {
            return Vec::new();
        };
        let len = |c: usize| self.waiting[candidates[c]].len;
        let fits = |lo: usize, hi: usize| {
            // Sorted: the longest of [lo, hi) is the last.
            let n = hi - lo;
            n <= max_docs && len(hi - 1).max(1) * n <= limits.max_tokens
        };
        let (mut lo, mut hi) = (oldest, oldest + 1);
        let target = len(oldest);
        loop {
            let left = (lo > 0 && fits(lo - 1, hi)).then(|| target - len(lo - 1));
            let right = (hi < candidates.len() && fits(lo, hi + 1)).then(|| len(hi) - target);
            match (left, right) {
                (Some(l), Some(r)) if l <= r => lo -= 1,
                (Some(_), None) => lo -= 1,
                (_, Some(_)) => hi += 1,
                (None, None) => break,
            }
        }
        let mut chosen = vec![false; self.waiting.len()];
        for &i in &candidates[lo..hi] {
            chosen[i] = true;
        }
        let mut batch = Vec::with_capacity(hi - lo);
        let mut kept = Vec::with_capacity(self.waiting.len() - (hi - lo));
        for (i, w) in std::mem::take(&mut self.waiting).into_iter().enumerate() {
            if chosen[i] {
                batch.push(w);
            } else {
                kept.push(w);
            }
        }
        self.waiting = kept;
        batch
    }
}

/// How many batches' worth of the oldest documents the next batch is chosen from.
pub const WINDOW: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_docs: usize, max_tokens: usize) -> Limits {
        Limits {
            max_docs,
            max_tokens,
            max_wait: Duration::from_millis(5),
        }
    }

    fn pending(lens: &[usize]) -> Pending<usize> {
        let mut p = Pending::default();
        let now = Instant::now();
        for (i, &len) in lens.iter().enumerate() {
            p.push(len, now, i);
        }
        p
    }

    fn items(batch: &[Waiting<usize>]) -> Vec<usize> {
        let mut v: Vec<usize> = batch.iter().map(|w| w.item).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn groups_similar_lengths_around_the_oldest() {
        // The oldest (item 0) is 10 tokens long; its nearest neighbours by
        // length are 9, 11 and 12, not the 100s.
        let mut p = pending(&[10, 100, 9, 101, 11, 12, 102]);
        let batch = p.take(&limits(4, 10_000));
        assert_eq!(items(&batch), vec![0, 2, 4, 5]);
        assert_eq!(p.len(), 3);
        let batch = p.take(&limits(4, 10_000));
        assert_eq!(items(&batch), vec![1, 3, 6]);
        assert!(p.is_empty());
        assert!(p.take(&limits(4, 10_000)).is_empty());
    }

    #[test]
    fn keeps_padded_tokens_under_the_limit() {
        let mut p = pending(&[50, 50, 50, 60, 60, 70]);
        let l = limits(100, 200);
        let mut seen = 0;
        while !p.is_empty() {
            let batch = p.take(&l);
            let longest = batch.iter().map(|w| w.len).max().unwrap_or(0);
            assert!(longest * batch.len() <= 200, "{longest} × {}", batch.len());
            seen += batch.len();
        }
        assert_eq!(seen, 6);
    }

    #[test]
    fn a_document_over_the_token_limit_runs_alone() {
        let mut p = pending(&[5000, 10, 10]);
        let batch = p.take(&limits(8, 1000));
        assert_eq!(items(&batch), vec![0]);
        assert_eq!(items(&p.take(&limits(8, 1000))), vec![1, 2]);
    }

    #[test]
    fn the_oldest_is_never_starved() {
        // A long document arrives first, then a steady stream of short ones:
        // the long one is in the very next batch.
        let mut p = pending(&[120]);
        let now = Instant::now();
        for i in 1..100 {
            p.push(10, now, i);
        }
        let batch = p.take(&limits(8, 8 * 128));
        assert!(items(&batch).contains(&0));
    }

    #[test]
    fn batches_come_from_the_oldest_few_batches_worth() {
        // 1,000 waiting, lengths all over the place: each batch of 8 is
        // drawn from the 32 oldest still waiting, so the oldest poll's
        // documents are done within a few batches.
        let mut p = Pending::default();
        let now = Instant::now();
        for i in 0..1000usize {
            p.push((i * 7919) % 128 + 1, now, i);
        }
        let l = limits(8, 8 * 128);
        let mut done = std::collections::BTreeSet::new();
        for round in 0..10 {
            let window: Vec<usize> = (0..1000).filter(|i| !done.contains(i)).take(32).collect();
            let batch = p.take(&l);
            assert_eq!(batch.len(), 8);
            for w in &batch {
                assert!(
                    window.contains(&w.item),
                    "round {round}: {} was not among the 32 oldest",
                    w.item
                );
                done.insert(w.item);
            }
        }
        // The first 16 arrivals are all scored within the first 10 batches.
        assert!((0..16).all(|i| done.contains(&i)));
    }

    #[test]
    fn can_fill_by_documents_or_tokens() {
        assert!(!pending(&[10, 10]).can_fill(&limits(4, 1000)));
        assert!(pending(&[10, 10, 10, 10]).can_fill(&limits(4, 1000)));
        assert!(pending(&[600, 600]).can_fill(&limits(4, 1000)));
    }
}
