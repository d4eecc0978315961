//! `sift run`: the pipeline as far as it exists, on whatever backends the
//! configuration names. It pushes the bundled labeled sample through the log
//! into the `documents` table the way the daemons will: envelopes keyed by
//! document id on `sift.raw`, a consumer group that writes each batch to the
//! table and commits only after the write, and malformed records to
//! `sift.dlq` with their reason.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::backends::log::{Commit, Log, Record};
use crate::backends::table::{RowPut, Scan, Table};
use crate::envelope::{self, headers, topics, Envelope, SCHEMA_VERSION};
use crate::sample::LabeledDoc;

/// The table analysts review, and its column families.
pub const DOCUMENTS_TABLE: &str = "documents";
/// `m` metadata, `c` categories, `r` review decision.
pub const DOCUMENT_FAMILIES: [&str; 3] = ["m", "c", "r"];
/// Consumer group of the stage that stores documents.
pub const STORE_GROUP: &str = "sift-store";

/// What one pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Documents produced to `sift.raw` in this pass.
    pub produced: u64,
    /// Records consumed from `sift.raw` (includes leftovers of an earlier, interrupted pass).
    pub consumed: u64,
    /// Rows written to the `documents` table.
    pub stored: u64,
    /// Records sent to `sift.dlq`, by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// Rows in the `documents` table afterwards.
    pub table_rows: u64,
    /// Partitions of `sift.raw`.
    pub partitions: u32,
    /// Wall time of the pass, seconds.
    pub seconds: f64,
}

/// Turns a labeled sample document into an envelope.
pub fn envelope_of(doc: &LabeledDoc, fetched_at_ms: i64) -> Envelope {
    let url = format!("https://packages.debian.org/sid/{}", doc.id);
    let mut metadata = BTreeMap::new();
    metadata.insert("tags".into(), serde_json::json!(doc.tags));
    metadata.insert("section".into(), serde_json::json!(doc.section));
    Envelope {
        v: SCHEMA_VERSION,
        id: envelope::document_id("debtags", &url),
        source: "debtags".into(),
        url,
        fetched_at_ms,
        content_type: "text/plain".into(),
        title: doc.title.clone(),
        text: Some(doc.text.clone()),
        body_uri: None,
        metadata,
    }
}

/// The table row for an envelope (family `m`).
pub fn row_of(env: &Envelope) -> RowPut {
    let mut row = RowPut::new(env.id.clone())
        .cell("m", "source", env.source.clone())
        .cell("m", "url", env.url.clone())
        .cell("m", "title", env.title.clone())
        .cell("m", "content_type", env.content_type.clone())
        .cell("m", "fetched_at_ms", env.fetched_at_ms.to_string());
    if let Some(text) = &env.text {
        row = row.cell("m", "text", text.clone());
    }
    if let Some(uri) = &env.body_uri {
        row = row.cell("m", "body_uri", uri.clone());
    }
    if !env.metadata.is_empty() {
        row = row.cell(
            "m",
            "metadata",
            serde_json::to_string(&env.metadata).unwrap_or_default(),
        );
    }
    row
}

/// Runs one pass: produce `docs`, then store everything the group has not yet stored.
pub async fn run_once(
    log: Arc<dyn Log>,
    table: Arc<dyn Table>,
    docs: &[LabeledDoc],
    partitions: u32,
) -> crate::Result<Summary> {
    let started = Instant::now();
    let metrics = crate::metrics::global();
    log.create_topic(topics::RAW, partitions).await?;
    log.create_topic(topics::DLQ, 1).await?;
    table
        .ensure_table(DOCUMENTS_TABLE, &DOCUMENT_FAMILIES)
        .await?;
    let mut summary = Summary {
        partitions: log
            .list_topics()
            .await?
            .iter()
            .find(|t| t.name == topics::RAW)
            .map_or(partitions, |t| t.partitions),
        ..Summary::default()
    };

    let now = crate::now_ms();
    for chunk in docs.chunks(500) {
        let records: Vec<Record> = chunk
            .iter()
            .map(|d| {
                let env = envelope_of(d, now);
                let value = serde_json::to_vec(&env).unwrap_or_default();
                Record::new(env.id.clone(), value)
                    .header(headers::SOURCE, env.source.clone())
                    .header(headers::CONTENT_TYPE, env.content_type.clone())
                    .header(headers::SCHEMA, SCHEMA_VERSION.to_string())
            })
            .collect();
        summary.produced += log.produce(topics::RAW, records).await?.len() as u64;
    }
    metrics.stage("ingest", summary.produced);
    tracing::info!(
        documents = summary.produced,
        topic = topics::RAW,
        "Produced the sample."
    );

    // Store until the group has committed everything produced so far.
    let targets = log.watermarks(topics::RAW).await?;
    let mut consumer = log.subscribe(STORE_GROUP, &[topics::RAW]).await?;
    loop {
        let committed = log.committed(STORE_GROUP, topics::RAW).await?;
        let done = targets.iter().all(|w| {
            committed
                .iter()
                .find(|(p, _)| *p == w.partition)
                .and_then(|(_, c)| *c)
                .unwrap_or(w.low)
                >= w.high
        });
        if done {
            break;
        }
        let batch = consumer.poll(1000, Duration::from_millis(500)).await?;
        if batch.is_empty() {
            continue;
        }
        summary.consumed += batch.len() as u64;
        let mut rows = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        for m in &batch {
            match serde_json::from_slice::<Envelope>(&m.value) {
                Ok(env) if env.v == SCHEMA_VERSION => rows.push(row_of(&env)),
                Ok(env) => dead.push((
                    m,
                    "schema_version",
                    format!("envelope version {} is not {SCHEMA_VERSION}", env.v),
                )),
                Err(e) => dead.push((m, "bad_json", format!("not an envelope: {e}"))),
            }
        }
        if !dead.is_empty() {
            let records = dead
                .iter()
                .map(|(m, code, detail)| {
                    *summary.dead_letters.entry(code.to_string()).or_default() += 1;
                    metrics.dead_letter(code);
                    tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset, reason = code, %detail, "Sent a record to the dead-letter topic.");
                    let mut r = Record {
                        key: m.key.clone(),
                        value: m.value.clone(),
                        headers: m.headers.clone(),
                    };
                    r.headers.push((headers::REASON.into(), Bytes::from(format!("{code}: {detail}"))));
                    r
                })
                .collect();
            log.produce(topics::DLQ, records).await?;
        }
        summary.stored += rows.len() as u64;
        table.put(DOCUMENTS_TABLE, rows).await?;
        match consumer.commit(&Commit::after(&batch)).await {
            Ok(()) => {}
            // The batch is stored; a rebalance means it may be delivered again,
            // and storing it again is idempotent.
            Err(crate::backends::log::LogError::NotAssigned { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    consumer.close().await?;
    metrics.stage("store", summary.stored);
    summary.table_rows = table
        .scan(
            DOCUMENTS_TABLE,
            &Scan {
                families: Some(vec!["m".into()]),
                ..Scan::default()
            },
        )
        .await?
        .len() as u64;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
