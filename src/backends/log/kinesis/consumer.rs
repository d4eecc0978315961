//! A member of a consumer group on Kinesis: leases in DynamoDB, as the
//! Kinesis Client Library keeps them, and one shard iterator per lease held.
//!
//! Each member runs a coordinator in the background, every third of the
//! lease duration:
//! 1. it adds a lease for every shard of the group's streams that has none,
//!    parents before children, so a child never looks parentless;
//! 2. it renews the leases it holds (a renewal that fails means another
//!    member took the lease: it is dropped at once);
//! 3. it reads the table, notes on its own clock when each lease's counter
//!    last changed, and takes what [`plan`] says: free and expired leases up
//!    to a fair share, or one lease stolen from the most loaded member.
//!
//! `poll` reads the shards of the leases held, from their checkpoints, and
//! stops reading a lease the moment it is lost or has gone unrenewed for a
//! lease duration (the table could not be reached: another member may have
//! it by now). `commit` writes the checkpoint, conditional on the lease's
//! counter: a member that lost a lease cannot move its checkpoint, and gets
//! [`LogError::NotAssigned`]. A stage commits only after its sink's durable
//! write, so the checkpoint never runs ahead of the sink.
//!
//! A closed shard (split or merged) that has been read to its end and whose
//! records are all committed gets the checkpoint `SHARD_END`, and its lease
//! is let go: from then on its children may be read, so a key's records are
//! read in order across a reshard.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_kinesis::types::Shard;
use tokio::sync::{watch, Mutex};

use super::leases::{plan, Checkpoint, Lease, Seen, Take};
use super::table::LeaseTable;
use super::{decode, shard_start, KinesisLog};
use crate::backends::log::{Commit, Consumer, LogError, Message, Offset, TopicPartition};

/// Shortest wait before reading again a shard that had nothing new: Kinesis
/// allows five `GetRecords` calls per shard per second, shared by every
/// reader of the stream.
const IDLE_READ: Duration = Duration::from_millis(250);
/// Wait after Kinesis refused a read for throughput.
const THROTTLED_READ: Duration = Duration::from_secs(1);
/// Most records one `GetRecords` call returns.
const GET_RECORDS: usize = 10_000;

/// The lease key of a shard: `stream:shardId`.
pub fn lease_key(stream: &str, shard_id: &str) -> String {
    format!("{stream}:{shard_id}")
}

/// Where a checkpoint says reading resumes in a shard starting at `start`.
pub fn resume_at(checkpoint: &Checkpoint, start: &Offset) -> Option<Offset> {
    match checkpoint {
        Checkpoint::TrimHorizon => Some(start.clone()),
        Checkpoint::After(seq) => Some(seq.next().max(start.clone())),
        Checkpoint::ShardEnd => None,
    }
}

/// The checkpoint that says everything before `next` is processed, in a
/// shard starting at `start`.
pub fn checkpoint_before(next: &Offset, start: &Offset) -> Checkpoint {
    match next.prev() {
        Some(last) if next > start => Checkpoint::After(last),
        _ => Checkpoint::TrimHorizon,
    }
}

/// A lease this member holds.
#[derive(Debug, Clone)]
struct Held {
    topic: String,
    partition: u32,
    shard_id: String,
    /// The shard's first sequence number.
    start: Offset,
    counter: u64,
    checkpoint: Checkpoint,
    /// When the table last accepted a write of this member's to it.
    written: Instant,
}

/// What the coordinator and the poller share.
#[derive(Debug, Default)]
struct Coordination {
    /// By lease key.
    held: BTreeMap<String, Held>,
}

/// One shard being read.
#[derive(Debug)]
struct Reader {
    key: String,
    topic: String,
    stream: String,
    partition: u32,
    shard_id: String,
    start: Offset,
    iterator: Option<String>,
    /// Where to open an iterator when there is none: after the last record
    /// delivered, or the checkpoint.
    from: Offset,
    /// The shard is closed and read to its end.
    ended: bool,
    /// The last record delivered, if any.
    delivered: Option<Offset>,
    /// The next offset committed through this member, if any.
    committed: Option<Offset>,
    /// Not before then.
    next_read: Instant,
}

/// A member of a consumer group on Kinesis.
pub struct KinesisConsumer {
    log: KinesisLog,
    table: LeaseTable,
    group: String,
    me: String,
    duration: Duration,
    state: Arc<Mutex<Coordination>>,
    readers: Vec<Reader>,
    /// Where the next poll starts reading, so every shard gets its turn.
    turn: usize,
    stop: watch::Sender<bool>,
    coordinator: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for KinesisConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KinesisConsumer")
            .field("group", &self.group)
            .field("member", &self.me)
            .finish()
    }
}

impl Drop for KinesisConsumer {
    fn drop(&mut self) {
        // Dropped without close: stop renewing, so the leases expire and
        // the rest of the group takes them.
        if let Some(c) = self.coordinator.take() {
            c.abort();
        }
    }
}

impl KinesisLog {
    /// The lease table of a group, created on first use.
    pub(super) async fn lease_table(&self, group: &str) -> Result<LeaseTable, LogError> {
        LeaseTable::open(self.dynamodb.clone(), self.lease_table_name(group)).await
    }

    pub(super) fn lease_table_name(&self, group: &str) -> String {
        format!("{}{group}", self.config.lease_table_prefix)
    }

    /// Adds a lease for each shard of `topic` that has none, parents first;
    /// returns the shards.
    pub(super) async fn ensure_leases(
        &self,
        table: &LeaseTable,
        topic: &str,
        known: &mut BTreeSet<String>,
    ) -> Result<Vec<(u32, Shard)>, LogError> {
        let stream = self.stream(topic)?;
        let shards = self.shards(topic).await?;
        let listed: BTreeSet<&str> = shards.iter().map(|(_, s)| s.shard_id()).collect();
        // Shard numbers grow with every split and merge, so a parent comes
        // before its children.
        for (_, shard) in &shards {
            let key = lease_key(&stream, shard.shard_id());
            if known.contains(&key) {
                continue;
            }
            // A parent no longer listed is past retention: nothing to wait for.
            let parents: Vec<String> = [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
                .into_iter()
                .flatten()
                .filter(|p| listed.contains(p))
                .map(|p| lease_key(&stream, p))
                .collect();
            table.create(&key, &parents).await?;
            known.insert(key);
        }
        Ok(shards)
    }

    /// Joins `group` on `topics` as a new member.
    pub(super) async fn join(
        &self,
        group: &str,
        topics: &[&str],
    ) -> Result<KinesisConsumer, LogError> {
        let table = self.lease_table(group).await?;
        let mut streams = Vec::new();
        let mut known = BTreeSet::new();
        for topic in topics {
            // Every topic must exist, as on the other logs.
            self.ensure_leases(&table, topic, &mut known).await?;
            streams.push((topic.to_string(), self.stream(topic)?));
        }
        let me = format!(
            "{}-{}-{:016x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "sift".into()),
            std::process::id(),
            rand::random::<u64>()
        );
        let duration = Duration::from_millis(self.config.lease_duration_ms.max(100));
        let state = Arc::new(Mutex::new(Coordination::default()));
        let (stop, stopped) = watch::channel(false);
        let mut coordinator = Coordinator {
            log: self.clone(),
            table: table.clone(),
            me: me.clone(),
            streams,
            state: state.clone(),
            duration,
            seen: BTreeMap::new(),
            known,
        };
        // The first round runs before subscribe returns, so a lone member
        // owns its shards from its first poll.
        if let Err(e) = coordinator.round().await {
            tracing::warn!(group, error = %e, "Kinesis consumer: the first lease round failed; retrying in the background.");
        }
        let task = tokio::spawn(coordinator.run(stopped));
        tracing::info!(group, member = %me, table = %self.lease_table_name(group), "Joined a Kinesis consumer group.");
        Ok(KinesisConsumer {
            log: self.clone(),
            table,
            group: group.to_string(),
            me,
            duration,
            state,
            readers: Vec::new(),
            turn: 0,
            stop,
            coordinator: Some(task),
        })
    }

    /// A group's checkpoints on `topic`, as next offsets.
    pub(super) async fn group_committed(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(u32, Option<Offset>)>, LogError> {
        let stream = self.stream(topic)?;
        let shards = self.shards(topic).await?;
        let leases: BTreeMap<String, Lease> = match LeaseTable::existing(
            self.dynamodb.clone(),
            self.lease_table_name(group),
        )
        .await?
        {
            Some(table) => table
                .scan()
                .await?
                .into_iter()
                .map(|l| (l.key.clone(), l))
                .collect(),
            None => BTreeMap::new(),
        };
        let mut out = Vec::with_capacity(shards.len());
        for (partition, shard) in &shards {
            let committed = match leases
                .get(&lease_key(&stream, shard.shard_id()))
                .map(|l| &l.checkpoint)
            {
                None | Some(Checkpoint::TrimHorizon) => None,
                Some(Checkpoint::After(seq)) => Some(seq.next()),
                // Done: everything the shard holds.
                Some(Checkpoint::ShardEnd) => Some(self.end_of(&stream, shard).await?),
            };
            out.push((*partition, committed));
        }
        Ok(out)
    }

    /// Moves a group's checkpoints while none of its members runs.
    pub(super) async fn group_set_committed(
        &self,
        group: &str,
        commits: &[Commit],
    ) -> Result<(), LogError> {
        let table = self.lease_table(group).await?;
        let mut by_topic: BTreeMap<&str, Vec<&Commit>> = BTreeMap::new();
        for c in commits {
            by_topic.entry(c.topic.as_str()).or_default().push(c);
        }
        for (topic, commits) in by_topic {
            let stream = self.stream(topic)?;
            let shards = self
                .ensure_leases(&table, topic, &mut BTreeSet::new())
                .await?;
            let leases: BTreeMap<String, Lease> = table
                .scan()
                .await?
                .into_iter()
                .map(|l| (l.key.clone(), l))
                .collect();
            for c in commits {
                let Some((_, shard)) = shards.iter().find(|(p, _)| *p == c.partition) else {
                    return Err(LogError::NoSuchPartition {
                        topic: topic.to_string(),
                        partition: c.partition,
                        partitions: shards.len() as u32,
                    });
                };
                let key = lease_key(&stream, shard.shard_id());
                let lease = leases.get(&key).ok_or_else(|| {
                    LogError::Backend(format!("lease {key} vanished while it was being set"))
                })?;
                let checkpoint = checkpoint_before(&c.next_offset, &shard_start(shard)?);
                if table
                    .set_checkpoint(&key, lease.counter, &checkpoint)
                    .await?
                    .is_none()
                {
                    return Err(LogError::Backend(format!(
                        "group `{group}`: lease {key} changed while its checkpoint was being set; \
                         is a member of the group running?"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The background half of a member.
struct Coordinator {
    log: KinesisLog,
    table: LeaseTable,
    me: String,
    /// (topic, stream) the group reads.
    streams: Vec<(String, String)>,
    state: Arc<Mutex<Coordination>>,
    duration: Duration,
    /// Per lease: the counter last seen and when it changed, on this clock.
    seen: BTreeMap<String, (u64, Instant)>,
    /// Leases known to exist.
    known: BTreeSet<String>,
}

impl Coordinator {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let every = (self.duration / 3).max(Duration::from_millis(30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stopped.changed() => return,
            }
            if let Err(e) = self.round().await {
                tracing::warn!(member = %self.me, error = %e, "Kinesis consumer: a lease round failed; retrying.");
            }
        }
    }

    async fn round(&mut self) -> Result<(), LogError> {
        // 1. New shards (a stream's first, or a reshard's children) get leases.
        let mut shards: BTreeMap<String, (String, u32, String, Offset)> = BTreeMap::new();
        for (topic, stream) in &self.streams {
            let listed = match self
                .log
                .ensure_leases(&self.table, topic, &mut self.known)
                .await
            {
                Ok(listed) => listed,
                // Deleted under us: nothing to read there.
                Err(LogError::NoSuchTopic(_)) => continue,
                Err(e) => return Err(e),
            };
            for (partition, shard) in listed {
                shards.insert(
                    lease_key(stream, shard.shard_id()),
                    (
                        topic.clone(),
                        partition,
                        shard.shard_id().to_string(),
                        shard_start(&shard)?,
                    ),
                );
            }
        }

        // 2. Renew what this member holds; a failed renewal is a lost lease.
        let keys: Vec<String> = self.state.lock().await.held.keys().cloned().collect();
        for key in keys {
            let mut state = self.state.lock().await;
            let Some(held) = state.held.get(&key) else {
                continue;
            };
            match self.table.renew(&key, held.counter, &self.me).await? {
                Some(counter) => {
                    let held = state.held.get_mut(&key).expect("held under the lock");
                    held.counter = counter;
                    held.written = Instant::now();
                }
                None => {
                    tracing::info!(member = %self.me, lease = %key, "Kinesis consumer: lost a lease to another member.");
                    state.held.remove(&key);
                }
            }
        }

        // 3. Read the table, and take what the plan says.
        let leases: Vec<Lease> = self
            .table
            .scan()
            .await?
            .into_iter()
            .filter(|l| shards.contains_key(&l.key))
            .collect();
        let now = Instant::now();
        let mut current: Vec<Seen> = Vec::with_capacity(leases.len());
        for lease in &leases {
            let seen = self
                .seen
                .entry(lease.key.clone())
                .or_insert((lease.counter, now));
            if seen.0 != lease.counter {
                *seen = (lease.counter, now);
            }
            current.push(Seen {
                lease: lease.clone(),
                changed_at: seen.1,
            });
        }
        {
            // A lease the table says someone else owns is lost.
            let mut state = self.state.lock().await;
            state.held.retain(|key, _| {
                leases
                    .iter()
                    .any(|l| l.key == *key && l.owner.as_deref() == Some(self.me.as_str()))
            });
        }
        for take in plan(&self.me, &current, now, self.duration) {
            let (key, counter, from) = match take {
                Take::Free { key, counter } => (key, counter, None),
                Take::Steal { key, counter, from } => (key, counter, Some(from)),
            };
            let Some(lease) = leases.iter().find(|l| l.key == key) else {
                continue;
            };
            let Some((topic, partition, shard_id, start)) = shards.get(&key) else {
                continue;
            };
            let mut state = self.state.lock().await;
            if let Some(counter) = self.table.take(&key, counter, &self.me).await? {
                tracing::info!(member = %self.me, lease = %key, from = from.as_deref().unwrap_or("nobody live"), "Kinesis consumer: took a lease.");
                self.seen.insert(key.clone(), (counter, Instant::now()));
                state.held.insert(
                    key,
                    Held {
                        topic: topic.clone(),
                        partition: *partition,
                        shard_id: shard_id.clone(),
                        start: start.clone(),
                        counter,
                        checkpoint: lease.checkpoint.clone(),
                        written: Instant::now(),
                    },
                );
            }
        }
        Ok(())
    }
}

/// How one `GetRecords` call ended.
enum Read {
    Records(Vec<Message>, Option<String>),
    /// The iterator is too old (five minutes): open another.
    Expired,
    Throttled,
}

impl KinesisConsumer {
    /// Makes the readers follow the leases held; finished shards get
    /// `SHARD_END` and are let go.
    async fn sync(&mut self) -> Result<(), LogError> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        // Unrenewed for a lease duration: another member may hold it now.
        state.held.retain(|key, h| {
            let fresh = now.saturating_duration_since(h.written) < self.duration;
            if !fresh {
                tracing::warn!(member = %self.me, lease = %key, "Kinesis consumer: a lease went unrenewed for its whole duration; reading stops.");
            }
            fresh
        });
        self.readers.retain(|r| state.held.contains_key(&r.key));
        for (key, held) in &state.held {
            if self.readers.iter().any(|r| r.key == *key) {
                continue;
            }
            let Some(from) = resume_at(&held.checkpoint, &held.start) else {
                continue;
            };
            self.readers.push(Reader {
                key: key.clone(),
                topic: held.topic.clone(),
                stream: self.log.stream(&held.topic)?,
                partition: held.partition,
                shard_id: held.shard_id.clone(),
                start: held.start.clone(),
                iterator: None,
                from,
                ended: false,
                delivered: None,
                committed: None,
                next_read: now,
            });
        }
        self.readers
            .sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));

        // Closed shards read to the end with everything delivered committed.
        let finished: Vec<String> = self
            .readers
            .iter()
            .filter(|r| {
                r.ended
                    && match (&r.delivered, &r.committed) {
                        (None, _) => true,
                        (Some(last), Some(next)) => next > last,
                        (Some(_), None) => false,
                    }
            })
            .map(|r| r.key.clone())
            .collect();
        for key in finished {
            self.readers.retain(|r| r.key != key);
            let Some(held) = state.held.remove(&key) else {
                continue;
            };
            let done = self
                .table
                .checkpoint(&key, held.counter, &self.me, &Checkpoint::ShardEnd)
                .await?;
            if let Some(counter) = done {
                tracing::info!(member = %self.me, lease = %key, "Kinesis consumer: a closed shard is done (SHARD_END); its children may be read.");
                self.table.release(&key, counter, &self.me).await?;
            }
        }
        Ok(())
    }

    async fn read_one(&self, reader: &Reader, max: usize) -> Result<Read, LogError> {
        let Some(iterator) = reader.iterator.clone() else {
            return Ok(Read::Expired);
        };
        let out = self
            .log
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(max.min(GET_RECORDS) as i32)
            .send()
            .await;
        let page = match out {
            Ok(page) => page,
            Err(e) => {
                let service = e.as_service_error();
                if service.is_some_and(|s| s.is_expired_iterator_exception()) {
                    return Ok(Read::Expired);
                }
                if service.is_some_and(|s| s.is_provisioned_throughput_exceeded_exception()) {
                    return Ok(Read::Throttled);
                }
                return Err(self.log.error(
                    &format!(
                        "reading shard {} of stream {}",
                        reader.shard_id, reader.stream
                    ),
                    e,
                ));
            }
        };
        let mut messages = Vec::with_capacity(page.records().len());
        for r in page.records() {
            messages.push(decode(&reader.topic, reader.partition, r)?);
        }
        Ok(Read::Records(
            messages,
            page.next_shard_iterator().map(str::to_owned),
        ))
    }
}

#[async_trait]
impl Consumer for KinesisConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Message>, LogError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.sync().await?;
            let mut out: Vec<Message> = Vec::new();
            let count = self.readers.len();
            for i in 0..count {
                if out.len() >= max {
                    break;
                }
                let at = (self.turn + i) % count;
                let now = Instant::now();
                let reader = &self.readers[at];
                if reader.ended || reader.next_read > now {
                    continue;
                }
                if reader.iterator.is_none() {
                    let iterator = self
                        .log
                        .iterator_from(
                            &reader.stream,
                            &reader.shard_id,
                            &reader.start,
                            &reader.from,
                        )
                        .await?;
                    let reader = &mut self.readers[at];
                    match iterator {
                        Some(it) => reader.iterator = Some(it),
                        None => {
                            reader.ended = true;
                            continue;
                        }
                    }
                }
                let read = self.read_one(&self.readers[at], max - out.len()).await?;
                let reader = &mut self.readers[at];
                match read {
                    Read::Records(messages, next) => {
                        if let Some(last) = messages.last() {
                            self.log.saw(&reader.stream, &reader.shard_id, &last.offset);
                            reader.from = last.offset.next();
                            reader.delivered = Some(last.offset.clone());
                        }
                        reader.next_read = if messages.is_empty() {
                            now + IDLE_READ
                        } else {
                            now
                        };
                        reader.ended = next.is_none();
                        reader.iterator = next;
                        out.extend(messages);
                    }
                    Read::Expired => reader.iterator = None,
                    Read::Throttled => reader.next_read = now + THROTTLED_READ,
                }
            }
            if count > 0 {
                self.turn = (self.turn + 1) % count;
            }
            let now = Instant::now();
            if !out.is_empty() || now >= deadline {
                return Ok(out);
            }
            let wake = self
                .readers
                .iter()
                .filter(|r| !r.ended)
                .map(|r| r.next_read)
                .min()
                .unwrap_or(now + IDLE_READ)
                .max(now + Duration::from_millis(10))
                .min(deadline);
            tokio::time::sleep_until(wake.into()).await;
        }
    }

    async fn commit(&mut self, commits: &[Commit]) -> Result<(), LogError> {
        for c in commits {
            let not_assigned = || LogError::NotAssigned {
                group: self.group.clone(),
                topic: c.topic.clone(),
                partition: c.partition,
            };
            let Some(at) = self
                .readers
                .iter()
                .position(|r| r.topic == c.topic && r.partition == c.partition)
            else {
                return Err(not_assigned());
            };
            let key = self.readers[at].key.clone();
            let mut state = self.state.lock().await;
            let Some(held) = state.held.get(&key) else {
                return Err(not_assigned());
            };
            let checkpoint = checkpoint_before(&c.next_offset, &held.start);
            if checkpoint != held.checkpoint {
                match self
                    .table
                    .checkpoint(&key, held.counter, &self.me, &checkpoint)
                    .await?
                {
                    Some(counter) => {
                        let held = state.held.get_mut(&key).expect("held under the lock");
                        held.counter = counter;
                        held.checkpoint = checkpoint;
                        held.written = Instant::now();
                    }
                    None => {
                        state.held.remove(&key);
                        return Err(not_assigned());
                    }
                }
            }
            self.readers[at].committed = Some(c.next_offset.clone());
        }
        Ok(())
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.readers
            .iter()
            .map(|r| TopicPartition {
                topic: r.topic.clone(),
                partition: r.partition,
            })
            .collect()
    }

    async fn close(mut self: Box<Self>) -> Result<(), LogError> {
        let _ = self.stop.send(true);
        if let Some(c) = self.coordinator.take() {
            let _ = c.await;
        }
        // Let every lease go, so the rest of the group takes them at once.
        let held = std::mem::take(&mut self.state.lock().await.held);
        for (key, h) in held {
            self.table.release(&key, h.counter, &self.me).await?;
        }
        tracing::info!(group = %self.group, member = %self.me, "Left a Kinesis consumer group.");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Committing `next` and resuming from the checkpoint reads from
        /// `next` again, whatever the shard's start.
        #[test]
        fn checkpoints_resume_where_committed(start in 0u64..1_000_000, ahead in 0u64..1_000_000) {
            let start = Offset::new(start);
            let next = Offset::new(start.as_u64().unwrap_or(0) + ahead);
            let cp = checkpoint_before(&next, &start);
            prop_assert_eq!(resume_at(&cp, &start), Some(next.clone()));
            prop_assert_eq!(cp == Checkpoint::TrimHorizon, next == start);
        }
    }

    #[test]
    fn keys_name_their_shard() {
        assert_eq!(
            lease_key("s", "shardId-000000000007"),
            "s:shardId-000000000007"
        );
    }
}
