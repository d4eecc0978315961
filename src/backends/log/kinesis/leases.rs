//! Which shard leases a member of a consumer group takes: the rules, apart
//! from DynamoDB, so they can be tested on their own.
//!
//! A group keeps one lease per shard in its lease table, as the Kinesis
//! Client Library does: the lease's owner (a member), a counter its owner
//! raises on every renewal, and a checkpoint (the last record processed, or
//! `SHARD_END` once a closed shard is done). Every write is conditional on
//! the counter the writer last saw, so two members can never both believe
//! they hold a lease: the second write fails.
//!
//! The lease table of group `G` is `log.kinesis.lease_table_prefix` + `G`,
//! one item per shard, with KCL 2.x's attribute names:
//!
//! | attribute | type | what |
//! | --- | --- | --- |
//! | `leaseKey` | S, hash key | `STREAM:shardId-…` (one group may read several streams, as in KCL's multi-stream mode) |
//! | `leaseOwner` | S | the member holding it; absent when free |
//! | `leaseCounter` | N | raised by every write; each write is conditional on it |
//! | `checkpoint` | S | the last sequence number processed, `TRIM_HORIZON` or `SHARD_END` |
//! | `checkpointSubSequenceNumber` | N | always 0 (sift does not aggregate records) |
//! | `ownerSwitchesSinceCheckpoint` | N | takes since the last checkpoint |
//! | `parentShardId` | SS | the shards this one was split or merged from; absent for a stream's first shards |
//!
//! A member does not trust clocks across machines. It notes, on its own
//! clock, when it last saw each lease's counter change; a lease whose counter
//! has not moved for `lease_duration` is expired, its owner presumed dead.
//!
//! Each round, [`plan`] says what to take:
//! - leases nobody holds, and expired ones;
//! - only leases of shards that may be read: a child shard (from a split or
//!   a merge) once every parent's lease is at `SHARD_END` (or gone), so a
//!   key's records are read in order across a reshard;
//! - up to a fair share: the readable leases divided among the live owners,
//!   rounded up;
//! - when nothing is free and this member holds less than its share, one
//!   lease stolen from the member that holds the most, if that one holds
//!   more than its share (or exactly its share, when this member is short
//!   by more than one). One per round, so members converge without trading
//!   leases back and forth.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::super::Offset;

/// Where a lease's shard has been processed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    /// Nothing yet: read from the oldest record kept.
    TrimHorizon,
    /// Every record up to this sequence number is processed.
    After(Offset),
    /// The shard is closed (split or merged) and every record of it is processed.
    ShardEnd,
}

impl Checkpoint {
    /// As the lease table stores it (KCL's strings).
    pub fn to_table(&self) -> String {
        match self {
            Checkpoint::TrimHorizon => "TRIM_HORIZON".into(),
            Checkpoint::After(seq) => seq.to_string(),
            Checkpoint::ShardEnd => "SHARD_END".into(),
        }
    }

    /// From the lease table; None for what is not a checkpoint.
    pub fn from_table(s: &str) -> Option<Checkpoint> {
        match s {
            "TRIM_HORIZON" => Some(Checkpoint::TrimHorizon),
            "SHARD_END" => Some(Checkpoint::ShardEnd),
            _ => s.parse().ok().map(Checkpoint::After),
        }
    }
}

/// One lease as last read from the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// `stream:shardId`.
    pub key: String,
    /// The member holding it, if any.
    pub owner: Option<String>,
    /// Raised by every write; the condition of the next one.
    pub counter: u64,
    /// How far the shard is processed.
    pub checkpoint: Checkpoint,
    /// Keys of the parent shards' leases (none for a stream's first shards).
    pub parents: Vec<String>,
}

/// A lease with when this member saw its counter change.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The lease.
    pub lease: Lease,
    /// On this member's clock.
    pub changed_at: Instant,
}

/// What one round of lease taking decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Take a lease nobody holds, or whose owner stopped renewing it;
    /// conditional on the counter seen.
    Free {
        /// Lease key.
        key: String,
        /// Counter the take is conditional on.
        counter: u64,
    },
    /// Take a lease from a live member that holds more than its share.
    Steal {
        /// Lease key.
        key: String,
        /// Counter the take is conditional on.
        counter: u64,
        /// Its owner now.
        from: String,
    },
}

/// Whether a lease's owner has stopped renewing it (or it has none).
pub fn expired(s: &Seen, now: Instant, duration: Duration) -> bool {
    s.lease.owner.is_none() || now.saturating_duration_since(s.changed_at) >= duration
}

/// Whether a lease's shard may be read: not finished, and every parent
/// finished (a parent whose lease is gone counts as finished: its records
/// are past retention or were processed and cleaned up).
pub fn readable(lease: &Lease, by_key: &BTreeMap<&str, &Lease>) -> bool {
    lease.checkpoint != Checkpoint::ShardEnd
        && lease.parents.iter().all(|p| {
            by_key
                .get(p.as_str())
                .is_none_or(|parent| parent.checkpoint == Checkpoint::ShardEnd)
        })
}

/// The leases member `me` should take this round.
pub fn plan(me: &str, leases: &[Seen], now: Instant, duration: Duration) -> Vec<Take> {
    let by_key: BTreeMap<&str, &Lease> = leases
        .iter()
        .map(|s| (s.lease.key.as_str(), &s.lease))
        .collect();
    let candidates: Vec<&Seen> = leases
        .iter()
        .filter(|s| readable(&s.lease, &by_key))
        .collect();
    if candidates.is_empty() {
        return Vec::new();
    }
    // Live owners and what each holds, this member included.
    let mut held: BTreeMap<&str, Vec<&Seen>> = BTreeMap::new();
    held.insert(me, Vec::new());
    for s in &candidates {
        if let Some(owner) = &s.lease.owner {
            if !expired(s, now, duration) {
                held.entry(owner.as_str()).or_default().push(s);
            }
        }
    }
    let target = candidates.len().div_ceil(held.len());
    let mine = held.get(me).map_or(0, Vec::len);
    if mine >= target {
        return Vec::new();
    }
    let want = target - mine;
    // Free leases, starting at a place that depends on the member, so that
    // members starting together do not all race for the same lease.
    let free: Vec<&Seen> = candidates
        .iter()
        .copied()
        .filter(|s| s.lease.owner.as_deref() != Some(me) && expired(s, now, duration))
        .collect();
    if !free.is_empty() {
        let start = (xxhash_rust::xxh3::xxh3_64(me.as_bytes()) % free.len() as u64) as usize;
        return free
            .iter()
            .cycle()
            .skip(start)
            .take(want.min(free.len()))
            .map(|s| Take::Free {
                key: s.lease.key.clone(),
                counter: s.lease.counter,
            })
            .collect();
    }
    // Nothing free: steal one from the most loaded member, if it holds more
    // than its share (ties: the smallest name, for a stable choice).
    let Some((owner, leases)) = held
        .iter()
        .filter(|(o, _)| **o != me)
        .max_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| b.0.cmp(a.0)))
    else {
        return Vec::new();
    };
    // As the Kinesis Client Library does: steal from a member above its
    // share, or from one at its share when this member needs more than one
    // (else 40 leases among 6 members, a share of 7, could rest at 7, 7, 7,
    // 7, 7 and 5).
    if leases.len() < target || (leases.len() == target && want < 2) {
        return Vec::new();
    }
    let victim = leases
        .iter()
        .max_by(|a, b| a.lease.key.cmp(&b.lease.key))
        .expect("a member holding more than its share holds some");
    vec![Take::Steal {
        key: victim.lease.key.clone(),
        counter: victim.lease.counter,
        from: (*owner).to_string(),
    }]
}

/// The keys of the unfinished leases that may not be read yet: their shards
/// wait on a parent still being read.
pub fn waiting_on_parents(leases: &[Lease]) -> BTreeSet<String> {
    let by_key: BTreeMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
    leases
        .iter()
        .filter(|l| l.checkpoint != Checkpoint::ShardEnd && !readable(l, &by_key))
        .map(|l| l.key.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    const DURATION: Duration = Duration::from_secs(10);

    /// A lease table with conditional writes, and members that renew, take
    /// and steal on their own clocks, some of them dying.
    struct World {
        table: BTreeMap<String, Lease>,
        /// Per member: when it saw each lease's counter change, and the counter.
        seen: BTreeMap<String, BTreeMap<String, (u64, Instant)>>,
        alive: BTreeSet<String>,
        now: Instant,
    }

    impl World {
        fn new(shards: usize, members: usize) -> World {
            let table = (0..shards)
                .map(|i| {
                    let key = format!("s:{i}");
                    (
                        key.clone(),
                        Lease {
                            key,
                            owner: None,
                            counter: 0,
                            checkpoint: Checkpoint::TrimHorizon,
                            parents: Vec::new(),
                        },
                    )
                })
                .collect();
            let alive: BTreeSet<String> = (0..members).map(|m| format!("m{m}")).collect();
            World {
                table,
                seen: alive.iter().map(|m| (m.clone(), BTreeMap::new())).collect(),
                alive,
                now: Instant::now(),
            }
        }

        /// A conditional write: applies only if the counter is unchanged.
        fn write(&mut self, key: &str, counter: u64, owner: Option<&str>) -> bool {
            let Some(l) = self.table.get_mut(key) else {
                return false;
            };
            if l.counter != counter {
                return false;
            }
            l.counter += 1;
            l.owner = owner.map(str::to_string);
            true
        }

        /// One member's round: renew what it holds, read the table, take.
        fn round(&mut self, me: &str) {
            let mine: Vec<(String, u64)> = self
                .table
                .values()
                .filter(|l| l.owner.as_deref() == Some(me))
                .map(|l| (l.key.clone(), l.counter))
                .collect();
            for (key, counter) in mine {
                self.write(&key, counter, Some(me));
            }
            let now = self.now;
            let seen = self.seen.entry(me.to_string()).or_default();
            let leases: Vec<Seen> = self
                .table
                .values()
                .map(|l| {
                    let e = seen.entry(l.key.clone()).or_insert((l.counter, now));
                    if e.0 != l.counter {
                        *e = (l.counter, now);
                    }
                    Seen {
                        lease: l.clone(),
                        changed_at: e.1,
                    }
                })
                .collect();
            for take in plan(me, &leases, now, DURATION) {
                let (Take::Free { key, counter } | Take::Steal { key, counter, .. }) = take;
                self.write(&key, counter, Some(me));
            }
        }

        fn held_by(&self, m: &str) -> usize {
            self.table
                .values()
                .filter(|l| l.owner.as_deref() == Some(m))
                .count()
        }
    }

    proptest! {
        /// Members that keep running end with every lease held and shares
        /// that differ by at most one; a member killed has its leases taken
        /// over within two lease durations.
        #[test]
        fn leases_spread_evenly_and_outlive_members(shards in 1usize..40, members in 1usize..7, seed in any::<u64>()) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut w = World::new(shards, members);
            // Rounds in a random order, every member about every 3 s.
            for _ in 0..60 {
                w.now += Duration::from_secs(1);
                let names: Vec<String> = w.alive.iter().cloned().collect();
                for m in names {
                    if rng.random_bool(0.4) {
                        w.round(&m);
                    }
                }
            }
            for _ in 0..20 {
                w.now += Duration::from_secs(1);
                let names: Vec<String> = w.alive.iter().cloned().collect();
                for m in names {
                    w.round(&m);
                }
            }
            let counts: Vec<usize> = w.alive.iter().map(|m| w.held_by(m)).collect();
            prop_assert!(w.table.values().all(|l| l.owner.is_some()), "{:?}", w.table);
            prop_assert!(counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0) <= 1, "{counts:?}");
            if members > 1 {
                // kill -9 one member: it stops renewing.
                let dead = w.alive.iter().next().cloned().unwrap_or_default();
                w.alive.remove(&dead);
                for _ in 0..(2 * DURATION.as_secs() + 2) {
                    w.now += Duration::from_secs(1);
                    let names: Vec<String> = w.alive.iter().cloned().collect();
                    for m in names {
                        w.round(&m);
                    }
                }
                prop_assert_eq!(w.held_by(&dead), 0, "{:?}", w.table);
                let counts: Vec<usize> = w.alive.iter().map(|m| w.held_by(m)).collect();
                prop_assert!(counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0) <= 1, "{counts:?}");
            }
        }
    }

    fn lease(key: &str, owner: Option<&str>, checkpoint: Checkpoint, parents: &[&str]) -> Seen {
        Seen {
            lease: Lease {
                key: key.into(),
                owner: owner.map(str::to_string),
                counter: 7,
                checkpoint,
                parents: parents.iter().map(|p| p.to_string()).collect(),
            },
            changed_at: Instant::now(),
        }
    }

    #[test]
    fn children_wait_for_their_parents() {
        let now = Instant::now();
        let mut leases = vec![
            lease("s:0", Some("a"), Checkpoint::After(Offset::new(5)), &[]),
            lease("s:1", None, Checkpoint::TrimHorizon, &["s:0"]),
            lease("s:2", None, Checkpoint::TrimHorizon, &["s:0"]),
        ];
        // The parent is still being read: neither child may be taken.
        assert!(plan("b", &leases, now, DURATION).is_empty());
        assert_eq!(
            waiting_on_parents(&leases.iter().map(|s| s.lease.clone()).collect::<Vec<_>>()),
            BTreeSet::from(["s:1".to_string(), "s:2".to_string()])
        );
        // Done with the parent: the children are free, one each.
        leases[0].lease.checkpoint = Checkpoint::ShardEnd;
        let a = plan("a", &leases, now, DURATION);
        assert_eq!(a.len(), 2, "{a:?}");
        leases[1].lease.owner = Some("a".into());
        let b = plan("b", &leases, now, DURATION);
        assert_eq!(
            b,
            vec![Take::Free {
                key: "s:2".into(),
                counter: 7
            }]
        );
        // A merge: the child waits for both parents.
        let merge = vec![
            lease("s:3", None, Checkpoint::ShardEnd, &[]),
            lease("s:4", Some("a"), Checkpoint::TrimHorizon, &[]),
            lease("s:5", None, Checkpoint::TrimHorizon, &["s:3", "s:4"]),
        ];
        assert!(plan("b", &merge, now, DURATION).is_empty());
    }

    #[test]
    fn steals_one_at_a_time_from_the_most_loaded() {
        let now = Instant::now();
        let leases: Vec<Seen> = (0..6)
            .map(|i| lease(&format!("s:{i}"), Some("a"), Checkpoint::TrimHorizon, &[]))
            .collect();
        // b joins: share 3, a holds 6: b steals one per round.
        let b = plan("b", &leases, now, DURATION);
        assert!(
            matches!(&b[..], [Take::Steal { from, .. }] if from == "a"),
            "{b:?}"
        );
        // An expired owner's leases are free, not stolen.
        let later = Instant::now() + DURATION;
        let c = plan("c", &leases, later, DURATION);
        assert_eq!(c.len(), 6);
        assert!(c.iter().all(|t| matches!(t, Take::Free { .. })));
    }

    #[test]
    fn checkpoints_read_back_from_the_table() {
        for c in [
            Checkpoint::TrimHorizon,
            Checkpoint::ShardEnd,
            Checkpoint::After(
                "49590338271490256608559692538361571095921575989136588898"
                    .parse()
                    .expect("digits"),
            ),
        ] {
            assert_eq!(Checkpoint::from_table(&c.to_table()), Some(c));
        }
        assert_eq!(Checkpoint::from_table("LATEST"), None);
    }
}
