//! Conformance suite of the `Log` trait.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use sift::backends::log::{
    Commit, Consumer, Log, LogError, Message, Offset, Record, TopicPartition,
};

use super::unique;

const PARTITIONS: u32 = 4;

/// Runs every check.
pub async fn check_log(log: Arc<dyn Log>) -> Result<()> {
    check_records(log.as_ref()).await?;
    commit_and_resume(log.as_ref())
        .await
        .context("commit and resume")?;
    rebalance(log.as_ref()).await.context("rebalance")?;
    concurrent_producers(log.clone())
        .await
        .context("concurrent producers")?;
    Ok(())
}

/// The checks of topics, producing and fetching, without consumer groups.
pub async fn check_records(log: &dyn Log) -> Result<()> {
    topics(log).await.context("topics")?;
    ordering_and_headers(log)
        .await
        .context("ordering and headers")?;
    large_records(log).await.context("large records")?;
    Ok(())
}

async fn new_topic(log: &dyn Log, name: &str) -> Result<String> {
    let t = unique(name);
    ensure!(
        log.create_topic(&t, PARTITIONS).await?,
        "create_topic returned false for a new topic"
    );
    Ok(t)
}

async fn topics(log: &dyn Log) -> Result<()> {
    let t = new_topic(log, "conf-topics").await?;
    ensure!(
        !log.create_topic(&t, PARTITIONS).await?,
        "second create must report existing"
    );
    let list = log.list_topics().await?;
    let info = list
        .iter()
        .find(|i| i.name == t)
        .context("new topic not listed")?;
    ensure!(info.partitions == PARTITIONS);
    let names: Vec<&String> = list.iter().map(|i| &i.name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    ensure!(names == sorted, "list_topics must be sorted");
    ensure!(matches!(
        log.create_topic("bad/name", 1).await,
        Err(LogError::InvalidName { .. })
    ));
    ensure!(matches!(
        log.produce("no-such-topic-anywhere", vec![Record::new("k", "v")])
            .await,
        Err(LogError::NoSuchTopic(_))
    ));
    let marks = log.watermarks(&t).await?;
    ensure!(marks.len() == PARTITIONS as usize && marks.iter().all(|w| w.low == w.high));
    Ok(())
}

/// Every record of `topic`, partition by partition, by fetches from the
/// low to the high watermark.
pub async fn read_all(log: &dyn Log, topic: &str) -> Result<Vec<Message>> {
    let mut all = Vec::new();
    for w in log.watermarks(topic).await? {
        let mut pos = w.low;
        while pos < w.high {
            let batch = log.fetch(topic, w.partition, &pos, 1000).await?;
            ensure!(
                !batch.is_empty(),
                "fetch returned nothing below the high watermark"
            );
            pos = batch.last().map_or(pos, |m| m.offset.next());
            all.extend(batch);
        }
    }
    Ok(all)
}

async fn ordering_and_headers(log: &dyn Log) -> Result<()> {
    let t = new_topic(log, "conf-order").await?;
    let mut records = Vec::new();
    for seq in 0..100u32 {
        for key in 0..10u32 {
            records.push(
                Record::new(format!("key-{key}"), format!("{key}:{seq}"))
                    .header("seq", seq.to_string())
                    .header("empty", Bytes::new()),
            );
        }
    }
    // Produce in several batches so ordering spans calls.
    let mut positions = Vec::new();
    for chunk in records.chunks(137) {
        let p = log.produce(&t, chunk.to_vec()).await?;
        ensure!(p.len() == chunk.len(), "one position per record");
        positions.extend(p);
    }
    // Same key -> same partition; offsets increase within a partition.
    let mut key_partition: BTreeMap<String, u32> = BTreeMap::new();
    let mut last: BTreeMap<u32, Offset> = BTreeMap::new();
    for (r, p) in records.iter().zip(&positions) {
        let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
        let e = key_partition.entry(key.clone()).or_insert(p.partition);
        ensure!(*e == p.partition, "key {key} moved partition");
        if let Some(prev) = last.insert(p.partition, p.offset.clone()) {
            ensure!(p.offset > prev, "offsets must increase within a partition");
        }
    }
    ensure!(
        key_partition.values().collect::<BTreeSet<_>>().len() > 1,
        "10 keys all hashed to one partition"
    );
    let marks = log.watermarks(&t).await?;
    ensure!(marks.iter().all(|w| w.low <= w.high));
    ensure!(
        log.fetch(&t, 0, &marks[0].high, 10).await?.is_empty(),
        "fetch at high must be empty"
    );

    let all = read_all(log, &t).await?;
    ensure!(all.len() == 1000, "read back {} of 1000", all.len());
    let mut next_seq: BTreeMap<String, u32> = BTreeMap::new();
    for m in &all {
        let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
        let value = String::from_utf8_lossy(&m.value).into_owned();
        let (k, seq) = value.split_once(':').context("value format")?;
        ensure!(format!("key-{k}") == key, "value/key mismatch");
        let seq: u32 = seq.parse()?;
        let expected = next_seq.entry(key.clone()).or_insert(0);
        ensure!(
            seq == *expected,
            "key {key}: got seq {seq}, expected {expected}"
        );
        *expected += 1;
        ensure!(m.header("seq").map(|h| h.as_ref()) == Some(seq.to_string().as_bytes()));
        ensure!(
            m.header("empty").is_some_and(|h| h.is_empty()),
            "empty header lost"
        );
        ensure!(m.topic == t && m.timestamp_ms > 0);
    }
    // Fetch from the middle of a partition starts exactly there, and from
    // just after a record, at the next one (offsets need not be dense).
    let w = marks
        .iter()
        .find(|w| all.iter().filter(|m| m.partition == w.partition).count() > 10)
        .context("a partition with records")?;
    let head = log.fetch(&t, w.partition, &w.low, 10).await?;
    ensure!(head.len() == 10, "{} records from the start", head.len());
    let mid = log.fetch(&t, w.partition, &head[7].offset, 3).await?;
    ensure!(
        mid.len() == 3 && mid[0].offset == head[7].offset && mid[2].offset == head[9].offset,
        "fetch from the 8th record: {:?}",
        mid.iter().map(|m| &m.offset).collect::<Vec<_>>()
    );
    let after = log
        .fetch(&t, w.partition, &head[7].offset.next(), 1)
        .await?;
    ensure!(after.len() == 1 && after[0].offset == head[8].offset);
    Ok(())
}

async fn large_records(log: &dyn Log) -> Result<()> {
    let t = new_topic(log, "conf-large").await?;
    // A 1 MB message (values up to just under the 1 MiB frame limit pass).
    let value: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let p = log
        .produce(&t, vec![Record::new("big", value.clone())])
        .await?;
    let got = log.fetch(&t, p[0].partition, &p[0].offset, 1).await?;
    ensure!(
        got.len() == 1 && got[0].value.as_ref() == value.as_slice(),
        "1 MB record corrupted"
    );
    let too_big = vec![0u8; 2 * 1024 * 1024];
    ensure!(
        matches!(
            log.produce(&t, vec![Record::new("huge", too_big)]).await,
            Err(LogError::RecordTooLarge { .. })
        ),
        "a 2 MiB record must be refused"
    );
    Ok(())
}

async fn poll_n(c: &mut dyn Consumer, n: usize, secs: u64) -> Result<Vec<Message>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut out = Vec::new();
    while out.len() < n && std::time::Instant::now() < deadline {
        out.extend(c.poll(n - out.len(), Duration::from_millis(500)).await?);
    }
    Ok(out)
}

async fn commit_and_resume(log: &dyn Log) -> Result<()> {
    let t = new_topic(log, "conf-resume").await?;
    let g = unique("conf-group");
    let records: Vec<Record> = (0..200)
        .map(|i| Record::new(format!("k{i}"), format!("v{i}")))
        .collect();
    log.produce(&t, records).await?;
    ensure!(log
        .committed(&g, &t)
        .await?
        .iter()
        .all(|(_, c)| c.is_none()));

    let mut c = log.subscribe(&g, &[t.as_str()]).await?;
    let first = poll_n(c.as_mut(), 200, 30).await?;
    ensure!(
        first.len() == 200,
        "one member must get every partition: got {}",
        first.len()
    );
    let assigned: BTreeSet<u32> = c.assignment().iter().map(|tp| tp.partition).collect();
    ensure!(
        assigned.len() == PARTITIONS as usize,
        "sole member must own all partitions"
    );
    // Commit only the first half of each partition.
    let mut by_part: BTreeMap<u32, Vec<&Message>> = BTreeMap::new();
    for m in &first {
        by_part.entry(m.partition).or_default().push(m);
    }
    let mut expected_rest = BTreeSet::new();
    let mut commits = Vec::new();
    for (p, ms) in &by_part {
        let half = ms.len() / 2;
        commits.push(Commit {
            topic: t.clone(),
            partition: *p,
            next_offset: ms[half].offset.clone(),
        });
        for m in &ms[half..] {
            expected_rest.insert((m.partition, m.offset.clone()));
        }
    }
    c.commit(&commits).await?;
    c.close().await?;
    let committed = log.committed(&g, &t).await?;
    for cm in &commits {
        ensure!(
            committed
                .iter()
                .any(|(p, o)| *p == cm.partition && o.as_ref() == Some(&cm.next_offset)),
            "committed offsets not reported"
        );
    }
    // A new member resumes from the committed offsets: exactly the uncommitted half.
    let mut c2 = log.subscribe(&g, &[t.as_str()]).await?;
    let rest = poll_n(c2.as_mut(), expected_rest.len(), 30).await?;
    let got: BTreeSet<(u32, Offset)> = rest
        .iter()
        .map(|m| (m.partition, m.offset.clone()))
        .collect();
    ensure!(
        got == expected_rest,
        "resume delivered {} records, expected {}",
        got.len(),
        expected_rest.len()
    );
    ensure!(
        c2.poll(10, Duration::from_millis(300)).await?.is_empty(),
        "nothing beyond the end"
    );
    c2.commit(&Commit::after(&rest)).await?;
    c2.close().await?;
    Ok(())
}

fn owned(c: &dyn Consumer) -> BTreeSet<u32> {
    c.assignment().iter().map(|tp| tp.partition).collect()
}

async fn rebalance(log: &dyn Log) -> Result<()> {
    let t = new_topic(log, "conf-rebalance").await?;
    let g = unique("conf-rebalance-group");
    let all: BTreeSet<u32> = (0..PARTITIONS).collect();
    let mut a = log.subscribe(&g, &[t.as_str()]).await?;
    let mut settled = false;
    for _ in 0..60 {
        a.poll(10, Duration::from_millis(500)).await?;
        if owned(a.as_ref()) == all {
            settled = true;
            break;
        }
    }
    ensure!(settled, "single member never owned all partitions");

    // A second member joins: the partitions are split, disjoint, complete
    // and balanced. Balanced matters where leases move one at a time
    // (Kinesis takes one lease per round from the busier member): a split
    // of 3 and 1 is still moving, and a commit of a partition that moves
    // next is refused as a rebalance.
    let mut b = log.subscribe(&g, &[t.as_str()]).await?;
    let mut split = false;
    for _ in 0..120 {
        a.poll(10, Duration::from_millis(250)).await?;
        b.poll(10, Duration::from_millis(250)).await?;
        let (oa, ob) = (owned(a.as_ref()), owned(b.as_ref()));
        if !oa.is_empty()
            && !ob.is_empty()
            && oa.len().abs_diff(ob.len()) <= 1
            && oa.is_disjoint(&ob)
            && oa.union(&ob).cloned().collect::<BTreeSet<_>>() == all
        {
            split = true;
            break;
        }
    }
    ensure!(
        split,
        "partitions were not split between two members: a={:?} b={:?}",
        owned(a.as_ref()),
        owned(b.as_ref())
    );

    // Both consume a fresh batch; together they see each record exactly once.
    let records: Vec<Record> = (0..400)
        .map(|i| Record::new(format!("r{i}"), format!("{i}")))
        .collect();
    log.produce(&t, records).await?;
    let mut seen: BTreeMap<(u32, Offset), usize> = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 400 && std::time::Instant::now() < deadline {
        for c in [&mut a, &mut b] {
            let batch = c.poll(100, Duration::from_millis(200)).await?;
            let mine = owned(c.as_ref());
            for m in &batch {
                ensure!(
                    mine.contains(&m.partition),
                    "got a record of a partition not assigned"
                );
                *seen.entry((m.partition, m.offset.clone())).or_default() += 1;
            }
            if !batch.is_empty() {
                c.commit(&Commit::after(&batch)).await?;
            }
        }
    }
    ensure!(
        seen.len() == 400,
        "two members consumed {} of 400",
        seen.len()
    );
    ensure!(
        seen.values().all(|n| *n == 1),
        "a record was delivered twice without a rebalance"
    );

    // b leaves: a takes over every partition and gets what b never committed.
    let b_parts = owned(b.as_ref());
    b.close().await?;
    let more: Vec<Record> = (0..100)
        .map(|i| Record::new(format!("s{i}"), format!("{i}")))
        .collect();
    let positions = log.produce(&t, more).await?;
    let expect: BTreeSet<(u32, Offset)> = positions
        .iter()
        .map(|p| (p.partition, p.offset.clone()))
        .collect();
    ensure!(
        positions.iter().any(|p| b_parts.contains(&p.partition)),
        "test needs records on b's partitions"
    );
    let mut got = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (got.len() < expect.len() || owned(a.as_ref()) != all)
        && std::time::Instant::now() < deadline
    {
        for m in a.poll(200, Duration::from_millis(300)).await? {
            got.insert((m.partition, m.offset));
        }
    }
    ensure!(
        owned(a.as_ref()) == all,
        "remaining member did not take over all partitions"
    );
    ensure!(
        expect.is_subset(&got),
        "after takeover a got {} of {} new records",
        expect.intersection(&got).count(),
        expect.len()
    );
    a.close().await?;
    let _ = TopicPartition {
        topic: t,
        partition: 0,
    };
    Ok(())
}

async fn concurrent_producers(log: Arc<dyn Log>) -> Result<()> {
    let t = new_topic(log.as_ref(), "conf-concurrent").await?;
    let mut tasks = Vec::new();
    for w in 0..4u32 {
        let log = log.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for batch in 0..10u32 {
                let records: Vec<Record> = (0..50u32)
                    .map(|i| Record::new(format!("w{w}-{}", i % 7), format!("{w}:{batch}:{i}")))
                    .collect();
                positions.extend(log.produce(&t, records).await?);
            }
            Ok::<_, LogError>(positions)
        }));
    }
    let mut unique_positions = HashSet::new();
    for task in tasks {
        for p in task.await?? {
            ensure!(
                unique_positions.insert((p.partition, p.offset)),
                "two records got the same offset"
            );
        }
    }
    ensure!(unique_positions.len() == 2000);
    let all = read_all(log.as_ref(), &t).await?;
    let values: HashSet<Bytes> = all.into_iter().map(|m| m.value).collect();
    ensure!(
        values.len() == 2000,
        "read back {} distinct of 2000",
        values.len()
    );
    Ok(())
}
