//! The Kafka log against a real broker (`SIFT_TEST_KAFKA`, e.g.
//! `127.0.0.1:9092`, started with `scripts/services.sh up kafka`): the log
//! conformance suite, a broker stop and restart in the middle of a run, and
//! what only Kafka has (Java-compatible key partitioning, retention errors).
//!
//! The fault test stops the shared broker, so every test here holds `LOCK`.

#![cfg(feature = "kafka")]

mod conformance;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use sift::backends::log::kafka::KafkaLog;
use sift::backends::log::{Commit, Consumer, Log, LogError, Message, Offset, Position, Record};
use sift::config::KafkaConfig;

use conformance::{service_addr, services, unique};

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn connect(addr: &str) -> Result<KafkaLog> {
    connect_with(addr, &[]).await
}

/// Connects with extra librdkafka `properties`.
async fn connect_with(addr: &str, properties: &[(&str, &str)]) -> Result<KafkaLog> {
    let config = KafkaConfig {
        brokers: addr.to_string(),
        client_id: "sift-test".into(),
        properties: properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    Ok(KafkaLog::connect(&config).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_conformance() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_KAFKA") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let log = connect(&addr).await?;
    conformance::log::check_log(Arc::new(log)).await
}

/// Reads every record of a topic with `fetch`, retrying while the broker
/// recovers (a restarted broker takes a moment to serve every partition).
async fn read_topic(log: &dyn Log, topic: &str, secs: u64) -> Result<Vec<Message>> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match conformance::log::read_all(log, topic).await {
            Ok(all) => return Ok(all),
            Err(e) if Instant::now() < deadline => {
                eprintln!("read_topic: retrying after: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn fault_record(i: u32) -> Record {
    Record::new(format!("key-{}", i % 13), format!("value-{i}"))
        .header("i", i.to_string())
        .header("blob", vec![(i % 251) as u8; (i % 5) as usize])
}

/// Polls until `n` messages arrived or `secs` passed; poll errors (the broker
/// coming back) are reported and retried.
async fn poll_until(c: &mut dyn Consumer, n: usize, secs: u64) -> Vec<Message> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        match c.poll(n - out.len(), Duration::from_millis(500)).await {
            Ok(batch) => out.extend(batch),
            Err(e) => {
                eprintln!("poll: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    out
}

/// Kafka is stopped and started again under a live `KafkaLog`: what was
/// acknowledged before survives, the same client produces and consumes again,
/// and a consumer group resumes from its committed offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_survives_broker_restart() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_KAFKA") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let log = connect(&addr).await?;
    let topic = unique("fault");
    let group = unique("fault-group");
    ensure!(log.create_topic(&topic, 3).await?);

    // Acknowledged before the stop.
    let before: Vec<Record> = (0..300).map(fault_record).collect();
    let positions = log.produce(&topic, before.clone()).await?;
    let acked: BTreeMap<(u32, u64), Record> = positions
        .iter()
        .map(|p| (p.partition, dense(&p.offset)))
        .zip(before)
        .collect();
    ensure!(acked.len() == 300, "two records got the same position");

    // A group consumes and commits part of it.
    let mut c = log.subscribe(&group, &[topic.as_str()]).await?;
    let first = poll_until(c.as_mut(), 120, 60).await;
    ensure!(
        first.len() >= 120,
        "consumed only {} before the stop",
        first.len()
    );
    let commits = Commit::after(&first);
    c.commit(&commits).await?;
    c.close().await?;
    let committed: BTreeMap<u32, u64> = commits
        .iter()
        .map(|c| (c.partition, dense(&c.next_offset)))
        .collect();

    // A member of another group that has read everything and then does not
    // poll through the outage, as a stage backing off does: librdkafka
    // queues an error event for it on every failed connection attempt.
    let idle_group = unique("fault-idle");
    let mut idle = log.subscribe(&idle_group, &[topic.as_str()]).await?;
    let seen = poll_until(idle.as_mut(), 300, 60).await;
    ensure!(
        seen.len() == 300,
        "the idle member read {} of 300",
        seen.len()
    );

    // A second client that gives up on unacknowledged records after 3 s
    // (through `properties`) shows the error side of an outage.
    let impatient = connect_with(&addr, &[("message.timeout.ms", "3000")]).await?;
    impatient
        .produce(&topic, vec![Record::new("warm", "up")])
        .await?;

    // Stop the broker: the impatient client reports the outage.
    services("down", "kafka")?;
    let started = Instant::now();
    match impatient
        .produce(&topic, vec![Record::new("outage", "refused")])
        .await
    {
        Err(LogError::Backend(msg)) => {
            eprintln!(
                "impatient produce failed after {:?}: {msg}",
                started.elapsed()
            );
            ensure!(
                msg.contains(&addr),
                "outage error must name the brokers: {msg}"
            );
        }
        other => bail!("a produce with a 3 s timeout during the outage gave {other:?}"),
    }

    // Bring the broker back from another thread in a few seconds, while the
    // patient client's produce waits.
    let restart = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(3));
        services("up", "kafka")
    });
    let started = Instant::now();
    match log
        .produce(&topic, vec![Record::new("outage", "during")])
        .await
    {
        Ok(p) => eprintln!(
            "produce during the outage waited {:?} and landed at {p:?}",
            started.elapsed()
        ),
        Err(e) => {
            eprintln!(
                "produce during the outage failed after {:?}: {e}",
                started.elapsed()
            );
            let msg = e.to_string();
            ensure!(
                matches!(e, LogError::Backend(_)) && msg.contains(&addr),
                "outage error must be a backend error naming the brokers: {msg}"
            );
        }
    }
    tokio::task::spawn_blocking(move || restart.join())
        .await?
        .map_err(|_| anyhow::anyhow!("restart thread panicked"))??;

    // The same client produces again once the broker is back.
    let deadline = Instant::now() + Duration::from_secs(120);
    let after_positions: Vec<Position> = loop {
        let after: Vec<Record> = (1000..1050).map(fault_record).collect();
        match log.produce(&topic, after).await {
            Ok(p) => break p,
            Err(e) if Instant::now() < deadline => {
                eprintln!("produce after restart: retrying after: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => bail!("producing after the restart never succeeded: {e}"),
        }
    };
    ensure!(after_positions.len() == 50);

    // The idle member, polling again as a stage does (5 s between failed
    // polls), gets the new records promptly: a poll drains the error events
    // queued during the outage instead of returning one per call (which
    // took minutes after a broker restart).
    let back = Instant::now();
    let wanted: BTreeSet<(u32, u64)> = after_positions
        .iter()
        .map(|p| (p.partition, dense(&p.offset)))
        .collect();
    let mut got_after = BTreeSet::new();
    let mut failed_polls = 0;
    while !wanted.is_subset(&got_after) && back.elapsed() < Duration::from_secs(40) {
        match idle.poll(500, Duration::from_secs(1)).await {
            Ok(batch) => got_after.extend(batch.iter().map(|m| (m.partition, dense(&m.offset)))),
            Err(e) => {
                failed_polls += 1;
                eprintln!("idle member's poll failed: {e}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    eprintln!(
        "the idle member had the new records {:?} after they were acknowledged ({failed_polls} failed polls)",
        back.elapsed()
    );
    ensure!(
        wanted.is_subset(&got_after),
        "40 s after the broker was back, the idle member had {} of the 50 new records ({failed_polls} failed polls)",
        wanted.intersection(&got_after).count()
    );
    idle.close().await?;

    // Every record acknowledged before the stop is intact, in place.
    let all = read_topic(&log, &topic, 60).await?;
    let stored: BTreeMap<(u32, u64), &Message> = all
        .iter()
        .map(|m| ((m.partition, dense(&m.offset)), m))
        .collect();
    for ((p, o), r) in &acked {
        let m = stored
            .get(&(*p, *o))
            .with_context(|| format!("acknowledged record {p}/{o} lost"))?;
        ensure!(
            m.key == r.key && m.value == r.value && m.headers == r.headers,
            "record {p}/{o} changed across the restart"
        );
    }
    for p in &after_positions {
        ensure!(
            stored.contains_key(&(p.partition, dense(&p.offset))),
            "post-restart record missing"
        );
    }

    // The group resumes exactly after its commits.
    let reported: BTreeMap<u32, Option<u64>> = log
        .committed(&group, &topic)
        .await?
        .into_iter()
        .map(|(p, o)| (p, o.as_ref().map(dense)))
        .collect();
    for (p, o) in &committed {
        ensure!(
            reported.get(p) == Some(&Some(*o)),
            "commit of partition {p} lost"
        );
    }
    let expected: BTreeSet<(u32, u64)> = stored
        .keys()
        .filter(|(p, o)| *o >= committed.get(p).copied().unwrap_or(0))
        .copied()
        .collect();
    let mut c2 = log.subscribe(&group, &[topic.as_str()]).await?;
    let rest = poll_until(c2.as_mut(), expected.len(), 90).await;
    let got: BTreeSet<(u32, u64)> = rest
        .iter()
        .map(|m| (m.partition, dense(&m.offset)))
        .collect();
    ensure!(
        got == expected,
        "the group resumed with {} records, expected {} (first offsets {:?}, commits {:?})",
        got.len(),
        expected.len(),
        rest.iter().fold(BTreeMap::new(), |mut f, m| {
            f.entry(m.partition).or_insert(m.offset.clone());
            f
        }),
        committed
    );
    c2.commit(&Commit::after(&rest)).await?;
    c2.close().await?;
    Ok(())
}

/// The Java client's key hash (`org.apache.kafka.common.utils.Utils.murmur2`).
fn java_murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// What only the Kafka backend has: partitions agree with the Java client,
/// unkeyed records spread, another group sees keys and headers intact, and
/// Kafka's own errors map onto the log's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_specifics() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_KAFKA") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let log = connect(&addr).await?;
    // Kafka's own test vectors for murmur2.
    ensure!(java_murmur2(b"21") == -973_932_308);
    ensure!(java_murmur2(b"foobar") == -790_332_482);
    ensure!(java_murmur2(b"abc") == 479_470_107);

    let topic = unique("kafka-specific");
    ensure!(log.create_topic(&topic, 6).await?);
    let keyed: Vec<Record> = (0..60u32)
        .map(|i| {
            Record::new(format!("user-{i}"), format!("v{i}"))
                .header("trace", format!("t{i}"))
                .header("trace", "second")
                .header("null-ish", Bytes::new())
        })
        .collect();
    let positions = log.produce(&topic, keyed.clone()).await?;
    for (r, p) in keyed.iter().zip(&positions) {
        let key = r.key.as_deref().context("keyed")?;
        let java = (java_murmur2(key) & 0x7fff_ffff) as u32 % 6;
        ensure!(
            p.partition == java,
            "key {key:?} went to {} but Java puts it in {java}",
            p.partition
        );
    }
    let unkeyed: Vec<Record> = (0..120)
        .map(|i| Record {
            value: Bytes::from(format!("u{i}")),
            ..Record::default()
        })
        .collect();
    let spread: BTreeSet<u32> = log
        .produce(&topic, unkeyed)
        .await?
        .iter()
        .map(|p| p.partition)
        .collect();
    ensure!(
        spread.len() >= 4,
        "120 unkeyed records used only partitions {spread:?}"
    );

    // A second, fresh group reads the whole history with keys and repeated headers.
    let mut c = log
        .subscribe(&unique("kafka-reader"), &[topic.as_str()])
        .await?;
    let all = poll_until(c.as_mut(), 180, 60).await;
    ensure!(all.len() == 180, "fresh group read {} of 180", all.len());
    let by_value: BTreeMap<&[u8], &Message> = all.iter().map(|m| (m.value.as_ref(), m)).collect();
    for r in &keyed {
        let m = by_value
            .get(r.value.as_ref())
            .context("keyed record missing")?;
        ensure!(
            m.key == r.key && m.headers == r.headers,
            "key or headers changed"
        );
    }
    // Committing a partition this member does not own is refused.
    let foreign = Commit {
        topic: topic.clone(),
        partition: 99,
        next_offset: Offset::new(1),
    };
    ensure!(matches!(
        c.commit(&[foreign]).await,
        Err(LogError::NotAssigned { .. })
    ));
    c.close().await?;

    // Kafka's errors, as the log's.
    ensure!(matches!(
        log.subscribe("g", &["no-such-topic-anywhere"]).await,
        Err(LogError::NoSuchTopic(_))
    ));
    ensure!(matches!(
        log.fetch(&topic, 6, &Offset::new(0), 1).await,
        Err(LogError::NoSuchPartition { partitions: 6, .. })
    ));
    ensure!(
        log.list_topics()
            .await?
            .iter()
            .all(|t| !t.name.starts_with("__")),
        "internal topics listed"
    );

    // Records removed below the low watermark (as retention does) are out of range.
    let p = positions[0].partition;
    let w = log.watermarks(&topic).await?[p as usize].clone();
    let low = dense(&w.low);
    ensure!(
        w.low.until(&w.high) >= 3,
        "partition {p} needs a few records"
    );
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &addr)
            .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topic, p as i32, rdkafka::Offset::Offset(low as i64 + 2))?;
    admin
        .delete_records(&tpl, &rdkafka::admin::AdminOptions::new())
        .await?;
    match log.fetch(&topic, p, &w.low, 10).await {
        Err(LogError::OffsetOutOfRange { earliest, .. }) => {
            ensure!(
                earliest == low + 2,
                "earliest {earliest}, expected {}",
                low + 2
            )
        }
        other => bail!("fetch below the low watermark gave {other:?}"),
    }
    let from_new_low = log.fetch(&topic, p, &Offset::new(low + 2), 1).await?;
    ensure!(from_new_low.len() == 1 && from_new_low[0].offset == low + 2);
    Ok(())
}

/// Kafka's offsets, which always fit in 64 bits.
fn dense(offset: &Offset) -> u64 {
    offset.as_u64().expect("Kafka offsets fit in 64 bits")
}
