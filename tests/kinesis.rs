//! The Kinesis log against a local Kinesis and DynamoDB (kinesalite and
//! dynalite, started by `scripts/services.sh up kinesis`): set
//! SIFT_TEST_KINESIS and SIFT_TEST_DYNAMODB to their URLs.
//!
//! Every test names its streams and lease tables with a prefix of its own
//! and deletes them when done, pass or fail: kinesalite keeps its data
//! between runs and refuses streams beyond its shard limit.
#![cfg(feature = "kinesis")]

mod conformance;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use sift::backends::log::kinesis::leases::{Checkpoint, Lease};
use sift::backends::log::kinesis::table::LeaseTable;
use sift::backends::log::kinesis::KinesisLog;
use sift::backends::log::{Commit, Log, LogError, Offset, Record};
use sift::config::KinesisConfig;

/// Lease duration in the consumer tests: short, so takeovers are quick.
const LEASE_MS: u64 = 3_000;
/// The member process's settings, in its environment.
const MEMBER_ENV: &str = "SIFT_TEST_KINESIS_MEMBER";

fn credentials() {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "sift-test"),
        ("AWS_SECRET_ACCESS_KEY", "sift-test"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
}

/// A Kinesis log whose streams and lease tables carry a prefix of their own.
struct Scratch {
    log: Arc<KinesisLog>,
    config: KinesisConfig,
    dynamodb: aws_sdk_dynamodb::Client,
}

impl Scratch {
    async fn new(prefix: &str) -> Result<Option<Scratch>> {
        let Some(endpoint) = conformance::service_addr("SIFT_TEST_KINESIS") else {
            return Ok(None);
        };
        let Some(dynamodb_endpoint) = conformance::service_addr("SIFT_TEST_DYNAMODB") else {
            return Ok(None);
        };
        credentials();
        let config = KinesisConfig {
            endpoint,
            dynamodb_endpoint: dynamodb_endpoint.clone(),
            stream_prefix: format!("{prefix}-"),
            lease_table_prefix: format!("{prefix}-leases-"),
            lease_duration_ms: LEASE_MS,
            ..KinesisConfig::default()
        };
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(dynamodb_endpoint)
            .load()
            .await;
        Ok(Some(Scratch {
            log: Arc::new(KinesisLog::connect(&config).await?),
            config,
            dynamodb: aws_sdk_dynamodb::Client::new(&shared),
        }))
    }

    /// A group's lease table, if it exists.
    async fn leases(&self, group: &str) -> Result<Vec<Lease>> {
        let name = format!("{}{group}", self.config.lease_table_prefix);
        Ok(
            match LeaseTable::existing(self.dynamodb.clone(), name).await? {
                Some(t) => t.scan().await?,
                None => Vec::new(),
            },
        )
    }

    /// Deletes every stream and lease table this scratch made.
    async fn clean(&self) -> Result<()> {
        for t in self.log.list_topics().await? {
            self.log.delete_topic(&t.name).await?;
        }
        let mut tables = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .dynamodb
                .list_tables()
                .set_exclusive_start_table_name(after.take())
                .limit(100)
                .send()
                .await?;
            tables.extend(page.table_names().iter().cloned());
            match page.last_evaluated_table_name() {
                Some(last) => after = Some(last.to_string()),
                None => break,
            }
        }
        for name in tables {
            if name.starts_with(&self.config.lease_table_prefix) {
                self.dynamodb.delete_table().table_name(name).send().await?;
            }
        }
        Ok(())
    }

    /// Runs a test body, then cleans up whatever it returned.
    async fn run<F, Fut>(prefix: &str, body: F) -> Result<()>
    where
        F: FnOnce(Arc<Scratch>) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let Some(scratch) = Scratch::new(&conformance::unique(prefix)).await? else {
            return Ok(());
        };
        let scratch = Arc::new(scratch);
        let result = body(scratch.clone()).await;
        let cleaned = scratch.clean().await;
        result?;
        cleaned
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_produces_and_reads_as_the_log() -> Result<()> {
    Scratch::run("kin-records", |s| async move {
        let log = s.log.as_ref();
        conformance::log::check_records(log).await?;

        // Sequence numbers are far beyond 64 bits, and travel whole.
        let t = "kin-seq";
        log.create_topic(t, 2).await?;
        let p = log
            .produce(
                t,
                (0..20).map(|i| Record::new(format!("k{i}"), "v")).collect(),
            )
            .await?;
        ensure!(
            p.iter()
                .all(|p| p.offset.as_u64().is_none() && p.offset.to_string().len() > 40),
            "{p:?}"
        );
        // The high watermark is one past the last record, so a reader that
        // committed after it is done.
        let marks = log.watermarks(t).await?;
        let all = conformance::log::read_all(log, t).await?;
        ensure!(all.len() == 20);
        for w in &marks {
            let last = all
                .iter()
                .filter(|m| m.partition == w.partition)
                .map(|m| &m.offset)
                .max();
            ensure!(last.map_or(w.low.clone(), Offset::next) == w.high, "{w:?}");
        }

        // Keyless records spread over the shards; a key too long for a
        // partition key keeps its shard and reads back whole.
        let long_key = "x".repeat(300);
        let p = log
            .produce(
                t,
                (0..40)
                    .map(|i| Record {
                        key: None,
                        value: Bytes::from(format!("{i}")),
                        headers: Vec::new(),
                    })
                    .chain([
                        Record::new(long_key.clone(), "a"),
                        Record::new(long_key.clone(), "b"),
                    ])
                    .collect(),
            )
            .await?;
        let shards: BTreeSet<u32> = p[..40].iter().map(|p| p.partition).collect();
        ensure!(
            shards.len() == 2,
            "40 keyless records went to shards {shards:?}"
        );
        ensure!(p[40].partition == p[41].partition && p[41].offset > p[40].offset);
        let back = log.fetch(t, p[40].partition, &p[40].offset, 2).await?;
        ensure!(back.len() == 2 && back[0].key.as_deref() == Some(long_key.as_bytes()));
        ensure!(back[0].key.is_some() && back[1].value.as_ref() == b"b");

        // A record past Kinesis's 1 MiB, with its key, is refused before sending.
        ensure!(matches!(
            log.produce(t, vec![Record::new("k", vec![0u8; 1024 * 1024])])
                .await,
            Err(LogError::RecordTooLarge { .. })
        ));
        ensure!(matches!(
            log.fetch(t, 7, &Offset::ZERO, 1).await,
            Err(LogError::NoSuchPartition { partitions: 2, .. })
        ));
        ensure!(matches!(
            log.fetch("kin-no-such-stream", 0, &Offset::ZERO, 1).await,
            Err(LogError::NoSuchTopic(_))
        ));
        ensure!(matches!(
            log.subscribe("g", &["kin-no-such-stream"]).await.err(),
            Some(LogError::NoSuchTopic(_))
        ));
        Ok(())
    })
    .await
}

/// Consumer groups: the whole conformance suite (commit and resume, a
/// rebalance as a member joins and leaves, concurrent producers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_consumer_groups_conform() -> Result<()> {
    Scratch::run("kin-groups", |s| async move {
        let log: Arc<dyn Log> = s.log.clone();
        conformance::log::check_log(log.clone()).await?;

        // Resetting a group's checkpoints (`sift topics offsets --reset-to`)
        // writes the lease table; a member then starts there.
        let t = "kin-reset";
        log.create_topic(t, 2).await?;
        let p = log
            .produce(
                t,
                (0..10).map(|i| Record::new(format!("k{i}"), "v")).collect(),
            )
            .await?;
        let g = "kin-reset-group";
        ensure!(log.committed(g, t).await?.iter().all(|(_, c)| c.is_none()));
        let first = &p[0];
        let later: Vec<&sift::backends::log::Position> = p
            .iter()
            .filter(|q| q.partition == first.partition && q.offset > first.offset)
            .collect();
        log.set_committed(
            g,
            &[Commit {
                topic: t.into(),
                partition: first.partition,
                next_offset: first.offset.next(),
            }],
        )
        .await?;
        let committed = log.committed(g, t).await?;
        ensure!(
            committed.contains(&(first.partition, Some(first.offset.next()))),
            "{committed:?}"
        );
        let mut c = log.subscribe(g, &[t]).await?;
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < 9 && Instant::now() < deadline {
            got.extend(c.poll(100, Duration::from_millis(300)).await?);
        }
        c.close().await?;
        ensure!(
            got.len() == 9,
            "after the reset a member read {}",
            got.len()
        );
        ensure!(later.iter().all(|q| got
            .iter()
            .any(|m| m.partition == q.partition && m.offset == q.offset)));
        Ok(())
    })
    .await
}

/// The lease table on a local DynamoDB (dynalite): every write is
/// conditional on the counter, so a member that lost a lease cannot renew,
/// checkpoint or release it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_table_writes_are_conditional() -> Result<()> {
    Scratch::run("kin-table", |s| async move {
        let name = format!("{}g", s.config.lease_table_prefix);
        let table = LeaseTable::open(s.dynamodb.clone(), name.clone()).await?;
        // Opening again finds it.
        let table2 = LeaseTable::open(s.dynamodb.clone(), name).await?;

        let key = "s:shardId-000000000000";
        ensure!(table.create(key, &[]).await?);
        ensure!(!table2.create(key, &[]).await?, "a lease is created once");
        ensure!(
            table
                .create("s:shardId-000000000002", &["s:shardId-000000000000".into()])
                .await?
        );

        // a takes it; b, with the counter it saw before, cannot.
        ensure!(table.take(key, 0, "a").await? == Some(1));
        ensure!(table2.take(key, 0, "b").await?.is_none());
        // Only the owner renews, and only with the current counter.
        ensure!(table2.renew(key, 1, "b").await?.is_none());
        ensure!(table.renew(key, 1, "a").await? == Some(2));
        ensure!(table.renew(key, 1, "a").await?.is_none(), "a stale renewal");
        let seq: Offset = "49590338271490256608559692538361571095921575989136588898".parse()?;
        ensure!(
            table
                .checkpoint(key, 2, "a", &Checkpoint::After(seq.clone()))
                .await?
                == Some(3)
        );
        // b steals it (as the balancer would): a's next write fails.
        ensure!(table2.take(key, 3, "b").await? == Some(4));
        ensure!(table
            .checkpoint(key, 3, "a", &Checkpoint::ShardEnd)
            .await?
            .is_none());
        ensure!(table.release(key, 3, "a").await?.is_none());

        let leases = table.scan().await?;
        ensure!(leases.len() == 2, "{leases:?}");
        let l = &leases[0];
        ensure!(
            l.key == key
                && l.owner.as_deref() == Some("b")
                && l.counter == 4
                && l.checkpoint == Checkpoint::After(seq),
            "{l:?}"
        );
        ensure!(leases[1].parents == vec!["s:shardId-000000000000".to_string()]);
        ensure!(leases[1].owner.is_none() && leases[1].checkpoint == Checkpoint::TrimHorizon);

        // b lets it go; it can then be moved while nobody holds it.
        ensure!(table2.release(key, 4, "b").await? == Some(5));
        ensure!(table.set_checkpoint(key, 5, &Checkpoint::ShardEnd).await? == Some(6));
        let l = &table.scan().await?[0];
        ensure!(
            l.owner.is_none() && l.checkpoint == Checkpoint::ShardEnd,
            "{l:?}"
        );
        Ok(())
    })
    .await
}

/// Records keyed `k0`..`k{keys}`, valued `key:n` with n counting each key's
/// records from `from[key]`.
fn keyed(count: usize, keys: usize, next: &mut BTreeMap<String, u64>) -> Vec<Record> {
    (0..count)
        .map(|i| {
            let key = format!("k{}", i % keys);
            let n = next.entry(key.clone()).or_insert(0);
            let r = Record::new(key.clone(), format!("{key}:{n}"));
            *n += 1;
            r
        })
        .collect()
}

/// One line of a member's sink: partition, offset, key, value.
fn sink_line(m: &sift::backends::log::Message) -> String {
    format!(
        "{} {} {}",
        m.partition,
        m.offset,
        String::from_utf8_lossy(&m.value)
    )
}

/// A member of a group in a process of its own (started by
/// `member_killed_with_sigkill_is_taken_over`): polls, writes each batch to
/// its sink file and syncs it, then commits, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a member process that kinesis_member_killed_with_sigkill_is_taken_over starts"]
async fn kinesis_member() -> Result<()> {
    let settings = std::env::var(MEMBER_ENV).context(MEMBER_ENV)?;
    let [prefix, topic, group, sink]: [&str; 4] = settings
        .split('\t')
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{MEMBER_ENV}: {settings}"))?;
    let s = Scratch::new(prefix).await?.context("services")?;
    let mut c = s.log.subscribe(group, &[topic]).await?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sink)?;
    println!("READY {}", std::process::id());
    loop {
        let batch = c.poll(100, Duration::from_millis(300)).await?;
        if batch.is_empty() {
            continue;
        }
        let mut text = String::new();
        for m in &batch {
            text.push_str(&sink_line(m));
            text.push('\n');
        }
        out.write_all(text.as_bytes())?;
        out.sync_data()?;
        match c.commit(&Commit::after(&batch)).await {
            // What the checkpoints now cover, so the test knows which of
            // this member's records another member may process again.
            Ok(()) => {
                let mut last: BTreeMap<u32, &Offset> = BTreeMap::new();
                for m in &batch {
                    last.insert(m.partition, &m.offset);
                }
                let text: String = last
                    .iter()
                    .map(|(p, o)| format!("{COMMITTED} {p} {o}\n"))
                    .collect();
                out.write_all(text.as_bytes())?;
                out.sync_data()?;
            }
            // Lost to another member: it reads them again from the checkpoint.
            Err(LogError::NotAssigned { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Marks a sink line that says a commit succeeded: `COMMITTED partition offset`.
const COMMITTED: &str = "COMMITTED";

/// Per partition, the highest offset a sink's member committed.
fn read_commits(path: &std::path::Path) -> Result<BTreeMap<u32, Offset>> {
    let mut out: BTreeMap<u32, Offset> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let mut parts = line.split(' ');
        let (Some(COMMITTED), Some(p), Some(o)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(p), Ok(o)) = (p.parse::<u32>(), o.parse::<Offset>()) else {
            continue; // a line cut by the kill
        };
        let e = out.entry(p).or_insert_with(|| o.clone());
        if o > *e {
            *e = o;
        }
    }
    Ok(out)
}

/// (partition, offset) → value, per line of a sink file, in order.
fn read_sink(path: &std::path::Path) -> Result<Vec<(u32, Offset, String)>> {
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if line.starts_with(COMMITTED) {
            continue;
        }
        let mut parts = line.splitn(3, ' ');
        let (Some(p), Some(o), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
            continue; // a line cut by the kill
        };
        out.push((p.parse()?, o.parse()?, v.to_string()));
    }
    Ok(out)
}

/// Each key's values appear in increasing order within one sink.
fn in_key_order(lines: &[(u32, Offset, String)]) -> Result<()> {
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut seen: BTreeSet<(u32, &Offset)> = BTreeSet::new();
    for (p, o, v) in lines {
        // A batch written twice (the sink's write succeeded, the commit was
        // lost with the lease) repeats; order is about first sightings.
        if !seen.insert((*p, o)) {
            continue;
        }
        let (key, n) = v.split_once(':').context("value")?;
        let n: u64 = n.parse()?;
        if let Some(prev) = last.insert(key, n) {
            ensure!(n > prev, "key {key}: {n} after {prev}");
        }
    }
    Ok(())
}

struct Member {
    child: Child,
    pid: u32,
    sink: std::path::PathBuf,
}

fn start_member(
    prefix: &str,
    topic: &str,
    group: &str,
    dir: &std::path::Path,
    name: &str,
) -> Result<Member> {
    let sink = dir.join(format!("{name}.sink"));
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "kinesis_member",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            MEMBER_ENV,
            format!("{prefix}\t{topic}\t{group}\t{}", sink.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    // The harness prints "test kinesis_member ... " before the member's own
    // output, on the same line. Lines are read on a thread, which keeps
    // draining them so the member never blocks on a full pipe.
    let (ready, is_ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("READY ") {
                let _ = ready.send(());
            }
        }
    });
    if is_ready.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        bail!(
            "member {name} was not ready within 60 s: {:?}",
            child.wait()?
        );
    }
    let pid = child.id();
    Ok(Member { child, pid, sink })
}

fn owned_by(leases: &[Lease], pid: u32) -> usize {
    let tag = format!("-{pid}-");
    leases
        .iter()
        .filter(|l| l.owner.as_deref().is_some_and(|o| o.contains(&tag)))
        .count()
}

/// Two member processes share a stream's 4 shards; one is killed with
/// SIGKILL. The other takes its leases once they expire, and between them
/// the sinks hold every record; the only records processed twice are the
/// ones the killed member wrote to its sink after its last checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_member_killed_with_sigkill_is_taken_over() -> Result<()> {
    let prefix = conformance::unique("kin-kill");
    let Some(s) = Scratch::new(&prefix).await? else {
        return Ok(());
    };
    let s = Arc::new(s);
    let dir = tempfile::tempdir()?;
    let result = async {
        let (topic, group) = ("kin-kill", "kin-kill-group");
        s.log.create_topic(topic, 4).await?;
        let mut next = BTreeMap::new();
        let mut produced: BTreeSet<(u32, Offset)> = BTreeSet::new();
        for p in s.log.produce(topic, keyed(1_000, 40, &mut next)).await? {
            produced.insert((p.partition, p.offset));
        }
        let mut a = start_member(&prefix, topic, group, dir.path(), "a")?;
        let mut b = start_member(&prefix, topic, group, dir.path(), "b")?;
        // Both hold leases and the first thousand are processed.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let leases = s.leases(group).await?;
            let done: BTreeSet<(u32, Offset)> = read_sink(&a.sink)?
                .into_iter()
                .chain(read_sink(&b.sink)?)
                .map(|(p, o, _)| (p, o))
                .collect();
            if owned_by(&leases, a.pid) == 2
                && owned_by(&leases, b.pid) == 2
                && produced.is_subset(&done)
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the members never shared the shards: {leases:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // More records arrive, and a is killed in the middle of them.
        let more = s.log.produce(topic, keyed(500, 40, &mut next)).await?;
        produced.extend(more.into_iter().map(|p| (p.partition, p.offset)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.child.kill()?; // SIGKILL
        a.child.wait()?;
        let killed = Instant::now();
        let a_held = owned_by(&s.leases(group).await?, a.pid);
        ensure!(a_held == 2, "a held {a_held} leases when killed");
        let more = s.log.produce(topic, keyed(500, 40, &mut next)).await?;
        produced.extend(more.into_iter().map(|p| (p.partition, p.offset)));
        let takeover = loop {
            let leases = s.leases(group).await?;
            if owned_by(&leases, b.pid) == 4 {
                break killed.elapsed();
            }
            ensure!(
                killed.elapsed() < Duration::from_secs(30),
                "b never took a's leases: {leases:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!(
            "takeover after SIGKILL: {} ms (lease duration {LEASE_MS} ms)",
            takeover.as_millis()
        );
        // Expiry takes a lease duration without renewals, seen on b's own
        // clock: at most a renewal interval (a third) before the kill, and
        // noticed within a round (a third) after.
        ensure!(
            takeover <= Duration::from_millis(LEASE_MS * 5 / 3 + 500),
            "takeover took {takeover:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let (sink_a, sink_b) = loop {
            let (sa, sb) = (read_sink(&a.sink)?, read_sink(&b.sink)?);
            let done: BTreeSet<(u32, Offset)> = sa
                .iter()
                .chain(&sb)
                .map(|(p, o, _)| (*p, o.clone()))
                .collect();
            if produced.is_subset(&done) {
                break (sa, sb);
            }
            ensure!(
                Instant::now() < deadline,
                "{} of {} records never reached a sink",
                produced.difference(&done).count(),
                produced.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        b.child.kill()?;
        b.child.wait()?;
        in_key_order(&sink_a)?;
        in_key_order(&sink_b)?;
        // Twice only what a processed and never committed: after its last
        // checkpoint when killed, or in a batch whose commit failed because
        // b had just taken the lease for balance. Nothing both committed.
        let a_committed = read_commits(&a.sink)?;
        let b_committed = read_commits(&b.sink)?;
        let a_set: BTreeSet<(u32, &Offset)> = sink_a.iter().map(|(p, o, _)| (*p, o)).collect();
        let mut twice = 0;
        for (p, o, _) in &sink_b {
            if a_set.contains(&(*p, o)) {
                twice += 1;
                ensure!(
                    a_committed.get(p).is_none_or(|c| o > c),
                    "record {p}/{o} was processed by b though a had committed past it ({:?})",
                    a_committed.get(p)
                );
            }
        }
        // And the other way: nothing a processed again after b committed it.
        let b_set: BTreeSet<(u32, &Offset)> = sink_b.iter().map(|(p, o, _)| (*p, o)).collect();
        for (p, o, _) in &sink_a {
            ensure!(
                !(b_set.contains(&(*p, o))
                    && a_committed.get(p).is_some_and(|c| o <= c)
                    && b_committed.get(p).is_some_and(|c| o <= c)),
                "record {p}/{o} was processed and committed by both members"
            );
        }
        eprintln!(
            "{} records, {} processed by a, {} by b, {twice} by both (a's work it never committed)",
            produced.len(),
            sink_a.len(),
            sink_b.len()
        );
        Ok(())
    }
    .await;
    let cleaned = s.clean().await;
    result?;
    cleaned
}

/// A stream resharded while two members consume it: shard 0 split, then two
/// of the new shards merged. Every record is read, and each key's records
/// are read in the order they were written (a child only after its parents
/// are done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_reshard_while_consuming_keeps_key_order() -> Result<()> {
    Scratch::run("kin-reshard", |s| async move {
        let log: Arc<dyn Log> = s.log.clone();
        let (topic, group) = ("kin-reshard", "kin-reshard-group");
        log.create_topic(topic, 2).await?;
        let delivered = Arc::new(parking_lot::Mutex::new(Vec::<(u32, Offset, String)>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut members = Vec::new();
        for _ in 0..2 {
            let (log, delivered, stop) = (log.clone(), delivered.clone(), stop.clone());
            members.push(tokio::spawn(async move {
                let mut c = log.subscribe(group, &[topic]).await?;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let batch = c.poll(100, Duration::from_millis(200)).await?;
                    if batch.is_empty() {
                        continue;
                    }
                    delivered.lock().extend(batch.iter().map(|m| {
                        (
                            m.partition,
                            m.offset.clone(),
                            String::from_utf8_lossy(&m.value).into_owned(),
                        )
                    }));
                    match c.commit(&Commit::after(&batch)).await {
                        Ok(()) | Err(LogError::NotAssigned { .. }) => {}
                        Err(e) => return Err(anyhow::Error::from(e)),
                    }
                }
                c.close().await?;
                Ok::<_, anyhow::Error>(())
            }));
        }
        let kinesis = s.log.clone();
        let mut next = BTreeMap::new();
        let mut produced: BTreeSet<(u32, Offset)> = BTreeSet::new();
        for round in 0..30 {
            for p in log.produce(topic, keyed(60, 30, &mut next)).await? {
                produced.insert((p.partition, p.offset));
            }
            match round {
                8 => kinesis.split_shard(topic, 0).await?,
                // Shard 0 split into 2 (its lower half) and 3 (its upper
                // half), which borders shard 1.
                18 => kinesis.merge_shards(topic, 3, 1).await?,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(
            log.list_topics()
                .await?
                .iter()
                .any(|t| t.name == topic && t.partitions == 5),
            "{:?}",
            log.list_topics().await?
        );
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let got: BTreeSet<(u32, Offset)> = delivered
                .lock()
                .iter()
                .map(|(p, o, _)| (*p, o.clone()))
                .collect();
            if produced.is_subset(&got) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{} of {} records never delivered; leases {:?}",
                produced.difference(&got).count(),
                produced.len(),
                s.leases(group).await?
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for m in members {
            m.await??;
        }
        let delivered = delivered.lock().clone();
        in_key_order(&delivered)?;
        // Every record of every key, and per key in the order written.
        let per_key: BTreeSet<&str> = delivered
            .iter()
            .filter_map(|(_, _, v)| v.split_once(':').map(|(k, _)| k))
            .collect();
        ensure!(per_key.len() == 30);
        let leases = s.leases(group).await?;
        let ended = leases
            .iter()
            .filter(|l| l.checkpoint == Checkpoint::ShardEnd)
            .count();
        ensure!(
            ended == 3,
            "shards 0, 1 and 3 were closed and read to their ends: {leases:?}"
        );
        eprintln!(
            "resharded while consuming: {} records, {} deliveries",
            produced.len(),
            delivered.len()
        );
        Ok(())
    })
    .await
}

/// `sift run --once`, the README's first command, with the log on the local
/// Kinesis and every other role on the real services, from the config that
/// `scripts/services-config.sh --log kinesis` prints: every stage processes
/// the reduced sample, and the malformed inputs are dead letters by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sift_run_once_with_kinesis_as_the_log() -> Result<()> {
    for var in [
        "SIFT_TEST_S3",
        "SIFT_TEST_HBASE",
        "SIFT_TEST_ES",
        "SIFT_TEST_REDIS",
    ] {
        if conformance::service_addr(var).is_none() {
            return Ok(());
        }
    }
    Scratch::run("kin-run", |s| async move {
        let dir = tempfile::tempdir()?;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = Command::new("bash")
            .arg(root.join("scripts/services-config.sh"))
            .args(["--log", "kinesis"])
            .env("SIFT_KINESIS_PREFIX", &s.config.stream_prefix)
            .output()?;
        ensure!(
            config.status.success(),
            "{}",
            String::from_utf8_lossy(&config.stderr)
        );
        let path = dir.path().join("sift.toml");
        std::fs::write(&path, &config.stdout)?;
        let port = std::net::TcpListener::bind("127.0.1.1:0")?
            .local_addr()?
            .port()
            .to_string();
        let out = Command::new(env!("CARGO_BIN_EXE_sift"))
            .arg("--config")
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path())
            .args([
                "run",
                "--once",
                "--json",
                "--sites",
                "100",
                "--documents",
                "240",
            ])
            .args([
                "--people",
                "5000",
                "--epochs=2",
                "--profiles",
                "300",
                "--outsiders",
                "60",
            ])
            .args(["--web-port", &port])
            .env("RUST_LOG", "warn")
            .env("SIFT__TELEMETRY__METRICS_ADDR", "")
            .env("SIFT__REVIEW__LISTEN", "127.0.0.1:0")
            .current_dir(dir.path())
            .output()?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let summary: serde_json::Value = serde_json::from_str(&stdout)
            .with_context(|| format!("the summary is not JSON:\n{stdout}\nstderr:\n{stderr}"))?;
        ensure!(
            out.status.success(),
            "sift run --once failed:\n{summary:#}\n{stderr}"
        );
        ensure!(summary["every_stage_processed"] == true, "{summary:#}");
        for (stage, field, want) in [
            ("ingest", "produced", 240),
            ("clean", "produced", 240),
            ("infer", "scored", 240),
            ("archive", "records", 240),
        ] {
            ensure!(
                summary[stage][field] == want,
                "{stage}: {:#}",
                summary[stage]
            );
        }
        for reason in ["bad_json", "schema_version", "bad_profile"] {
            ensure!(
                summary["dead_letters"]["match"][reason] == 1,
                "{:#}",
                summary["dead_letters"]
            );
        }
        let accuracy = &summary["identity"]["accuracy"];
        ensure!(
            accuracy["profiles"] == 360 && accuracy["decided"] == 360,
            "{accuracy:#}"
        );
        // The stages' consumer groups kept their checkpoints in lease tables.
        for group in ["sift-clean", "sift-archive", "sift-infer", "sift-match"] {
            ensure!(
                !s.leases(group).await?.is_empty(),
                "group {group} has no leases"
            );
        }
        Ok(())
    })
    .await
}
