//! The Kinesis log against a local Kinesis (kinesalite, started by
//! `scripts/services.sh up kinesis`): set SIFT_TEST_KINESIS to its URL.
#![cfg(feature = "kinesis")]

mod conformance;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use sift::backends::log::kinesis::KinesisLog;
use sift::backends::log::{Log, LogError, Offset, Record};
use sift::config::KinesisConfig;

async fn connect() -> Result<Option<KinesisLog>> {
    let Some(endpoint) = conformance::service_addr("SIFT_TEST_KINESIS") else {
        return Ok(None);
    };
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "sift-test"),
        ("AWS_SECRET_ACCESS_KEY", "sift-test"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    let config = KinesisConfig {
        endpoint,
        ..KinesisConfig::default()
    };
    Ok(Some(KinesisLog::connect(&config).await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_produces_and_reads_as_the_log() -> Result<()> {
    let Some(log) = connect().await? else {
        return Ok(());
    };
    conformance::log::check_records(&log).await?;

    // Sequence numbers are far beyond 64 bits, and travel whole.
    let t = format!("kin-seq-{}", std::process::id());
    log.create_topic(&t, 2).await?;
    let p = log
        .produce(
            &t,
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
    let marks = log.watermarks(&t).await?;
    let all = conformance::log::read_all(&log, &t).await?;
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
            &t,
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
    let shards: std::collections::BTreeSet<u32> = p[..40].iter().map(|p| p.partition).collect();
    ensure!(
        shards.len() == 2,
        "40 keyless records went to shards {shards:?}"
    );
    ensure!(p[40].partition == p[41].partition && p[41].offset > p[40].offset);
    let back = log.fetch(&t, p[40].partition, &p[40].offset, 2).await?;
    ensure!(back.len() == 2 && back[0].key.as_deref() == Some(long_key.as_bytes()));
    ensure!(back[0].key.is_some() && back[1].value.as_ref() == b"b");

    // A record past Kinesis's 1 MiB, with its key, is refused before sending.
    ensure!(matches!(
        log.produce(&t, vec![Record::new("k", vec![0u8; 1024 * 1024])])
            .await,
        Err(LogError::RecordTooLarge { .. })
    ));
    ensure!(matches!(
        log.fetch(&t, 7, &Offset::ZERO, 1).await,
        Err(LogError::NoSuchPartition { partitions: 2, .. })
    ));
    ensure!(matches!(
        log.fetch("kin-no-such-stream", 0, &Offset::ZERO, 1).await,
        Err(LogError::NoSuchTopic(_))
    ));

    // Consumer groups are not there yet, and say so.
    let refused = log
        .subscribe("g", &[t.as_str()])
        .await
        .err()
        .context("subscribe")?;
    ensure!(refused.to_string().contains("not built yet"), "{refused}");
    Ok(())
}

/// The lease table on a local DynamoDB (dynalite): every write is
/// conditional on the counter, so a member that lost a lease cannot renew,
/// checkpoint or release it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_table_writes_are_conditional() -> Result<()> {
    use sift::backends::log::kinesis::leases::Checkpoint;
    use sift::backends::log::kinesis::table::LeaseTable;
    let Some(endpoint) = conformance::service_addr("SIFT_TEST_DYNAMODB") else {
        return Ok(());
    };
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "sift-test"),
        ("AWS_SECRET_ACCESS_KEY", "sift-test"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .load()
        .await;
    let name = format!("sift-leases-test-{}", std::process::id());
    let table = LeaseTable::open(aws_sdk_dynamodb::Client::new(&shared), name.clone()).await?;
    // Opening again finds it.
    let table2 = LeaseTable::open(aws_sdk_dynamodb::Client::new(&shared), name).await?;

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
}
