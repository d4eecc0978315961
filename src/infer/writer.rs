//! The writer of `sift infer`: each scored document's row (`m`: the cleaned
//! metadata and text; `c`: top 5, model version, the words that weighed
//! most, scored-at) to the table in batches of `write_rows`, the same
//! document to `sift.categorized` keyed by its id, and dead letters; then
//! it tells the poller which documents are durable.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::backends::log::{Log, Record};
use crate::backends::objects::ObjectStore;
use crate::backends::table::{RowPut, Table};
use crate::dlq::{self};
use crate::documents::{categories, CATEGORIES};
use crate::envelope::{headers, topics, SCHEMA_VERSION};
use crate::stage::{dead_letter, retry, Rejection, Stop};

use super::{Categorized, Doc, Done, Outcome, Scoring, Settings, HEALTH, STAGE};

/// `text` cut to at most `max` bytes at a character boundary.
pub(super) fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The row and the `sift.categorized` record of a scored document.
pub(super) fn outputs(doc: &Doc, s: &Scoring, store_text_bytes: usize) -> (RowPut, Record) {
    let mut env = doc.env.clone();
    if let Some(text) = env.text.take() {
        env.text = Some(cut(&text, store_text_bytes).to_owned());
    }
    let top5 = serde_json::to_string(&s.top).unwrap_or_else(|_| "[]".into());
    let why = serde_json::to_string(&s.why).unwrap_or_else(|_| "[]".into());
    let mut row = crate::documents::row_of(&env)
        .cell(CATEGORIES, categories::TOP5, top5)
        .cell(CATEGORIES, categories::WHY, why)
        .cell(CATEGORIES, categories::MODEL_VERSION, s.version.to_string())
        .cell(
            CATEGORIES,
            categories::SCORED_AT_MS,
            s.scored_at_ms.to_string(),
        );
    if let Some((version, top)) = &s.shadow {
        row = row
            .cell(
                CATEGORIES,
                categories::SHADOW_TOP5,
                serde_json::to_string(top).unwrap_or_else(|_| "[]".into()),
            )
            .cell(CATEGORIES, categories::SHADOW_VERSION, version.to_string());
    }
    let value = Categorized {
        v: SCHEMA_VERSION,
        id: env.id.clone(),
        source: env.source.clone(),
        url: env.url.clone(),
        title: env.title.clone(),
        top5: s.top.clone(),
        model_version: s.version.to_string(),
        scored_at_ms: s.scored_at_ms,
    };
    let record = Record::new(
        env.id.clone(),
        serde_json::to_vec(&value).unwrap_or_default(),
    )
    .header(headers::SOURCE, env.source.clone())
    .header(headers::SCHEMA, SCHEMA_VERSION.to_string());
    (row, record)
}

/// The writer: rows to the table, records to `sift.categorized`, dead
/// letters to `sift.dlq`; reports each write to the poller once all are
/// acknowledged. Gives up (returns) only when shutdown was asked for while a
/// backend failed; what it held is then redelivered to the next run.
pub(super) async fn write_loop(
    table: Arc<dyn Table>,
    log: Arc<dyn Log>,
    objects: Arc<dyn ObjectStore>,
    mut rx: mpsc::Receiver<Vec<Outcome>>,
    done: mpsc::UnboundedSender<Done>,
    settings: Settings,
    stop: Stop,
) {
    let metrics = crate::metrics::global();
    while let Some(first) = rx.recv().await {
        let mut outcomes = first;
        let mut batches = 1;
        while outcomes.len() < settings.write_rows {
            match rx.try_recv() {
                Ok(more) => {
                    outcomes.extend(more);
                    batches += 1;
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut rows = Vec::with_capacity(outcomes.len());
        let mut records = Vec::with_capacity(outcomes.len());
        let mut dead = Vec::new();
        let mut report = Done {
            batches,
            ..Done::default()
        };
        for o in &outcomes {
            *report.units.entry(o.doc.unit).or_default() += 1;
            match &o.result {
                Ok(s) => {
                    let (row, record) = outputs(&o.doc, s, settings.store_text_bytes);
                    rows.push(row);
                    records.push(record);
                    *report.by_model.entry(s.version.to_string()).or_default() += 1;
                }
                Err(r) => {
                    dead.push(dead_letter(
                        STAGE,
                        &o.doc.message,
                        Rejection::new(r.reason, r.detail.clone()),
                    ));
                    report.dead.push(r.reason);
                }
            }
        }
        let table_write = retry(&stop, &HEALTH, "write rows to the documents table", || {
            table.put(crate::documents::TABLE, rows.clone())
        });
        let produce = retry(&stop, &HEALTH, "produce to sift.categorized", || {
            log.produce(topics::CATEGORIZED, records.clone())
        });
        let dead_letters = async {
            dead.is_empty()
                || retry(&stop, &HEALTH, "send dead letters to sift.dlq", || {
                    dlq::send(log.as_ref(), objects.as_ref(), &dead)
                })
                .await
        };
        let (a, b, c) = tokio::join!(table_write, produce, dead_letters);
        if !(a && b && c) {
            tracing::warn!(
                documents = outcomes.len(),
                "Stopped while a backend failed; these documents were not committed and will be scored again."
            );
            return;
        }
        let now = crate::now_ms();
        for o in &outcomes {
            if o.result.is_ok() {
                let seconds = (now - o.doc.message.timestamp_ms).max(0) as f64 / 1e3;
                metrics.infer_latency_seconds.observe(seconds);
                report.latencies.push(seconds);
            }
        }
        metrics.infer_stage("write", started.elapsed().as_secs_f64());
        metrics.stage(STAGE, rows.len() as u64);
        if done.send(report).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::log::{Message, Offset};
    use crate::envelope::Envelope;
    use bytes::Bytes;
    use proptest::prelude::*;
    use sift_training::Scored;

    proptest! {
        #[test]
        fn a_stored_text_is_cut_at_a_character_boundary(text in "\\PC{0,40}", max in 0usize..200) {
            let kept = cut(&text, max);
            prop_assert!(text.starts_with(kept));
            prop_assert!(kept.len() <= max || kept == text);
            if text.len() > max {
                // At most the bytes of one character are dropped below the limit.
                prop_assert!(kept.len() + 4 > max);
            } else {
                prop_assert_eq!(kept, text.as_str());
            }
        }
    }

    fn doc(text: &str) -> Doc {
        let env = Envelope {
            v: SCHEMA_VERSION,
            id: "d1".into(),
            source: "site".into(),
            url: "http://site/a".into(),
            fetched_at_ms: 7,
            content_type: "text/html".into(),
            title: "A title".into(),
            text: Some(text.into()),
            body_uri: None,
            metadata: Default::default(),
        };
        Doc {
            unit: 0,
            message: Message {
                topic: topics::CLEAN.into(),
                partition: 0,
                offset: Offset::ZERO,
                timestamp_ms: 0,
                key: None,
                value: Bytes::new(),
                headers: Vec::new(),
            },
            env,
            encoded: Default::default(),
            generation: 0,
        }
    }

    fn scored(label: &str, score: f32) -> Scored {
        Scored {
            label: label.into(),
            score,
        }
    }

    fn cell<'a>(row: &'a RowPut, qualifier: &str) -> Option<&'a [u8]> {
        row.cells
            .iter()
            .find(|c| c.family == CATEGORIES && c.qualifier == qualifier.as_bytes())
            .map(|c| c.value.as_ref())
    }

    #[test]
    fn the_row_and_the_record_carry_the_same_scores() {
        let s = Scoring {
            version: Arc::from("v7"),
            top: vec![scored("admin", 0.9), scored("devel", 0.4)],
            why: vec![vec!["kernel".into()], vec![]],
            shadow: Some((Arc::from("v8"), vec![scored("devel", 0.8)])),
            scored_at_ms: 1234,
        };
        let text = "é".repeat(10);
        let (row, record) = outputs(&doc(&text), &s, 5);
        let top5: Vec<Scored> =
            serde_json::from_slice(cell(&row, categories::TOP5).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(top5, s.top);
        assert_eq!(cell(&row, categories::MODEL_VERSION), Some(&b"v7"[..]));
        assert_eq!(cell(&row, categories::SHADOW_VERSION), Some(&b"v8"[..]));
        assert_eq!(cell(&row, categories::SCORED_AT_MS), Some(&b"1234"[..]));
        let c: Categorized =
            serde_json::from_slice(&record.value).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.id.as_str(), c.top5, c.model_version.as_str()),
            ("d1", s.top.clone(), "v7")
        );
        assert_eq!(record.key.as_deref(), Some(&b"d1"[..]));
        // The stored text is cut at a character boundary: two 2-byte
        // characters fit in 5 bytes.
        let stored = row
            .cells
            .iter()
            .find(|c| c.value.as_ref() == "éé".as_bytes())
            .map(|c| c.qualifier.clone());
        assert!(stored.is_some(), "the text cut to 4 bytes is in the row");
    }

    #[test]
    fn without_a_shadow_there_are_no_shadow_cells() {
        let s = Scoring {
            version: Arc::from("v1"),
            top: vec![scored("a", 0.5)],
            why: vec![vec![]],
            shadow: None,
            scored_at_ms: 1,
        };
        let (row, _) = outputs(&doc("x"), &s, 100);
        assert_eq!(cell(&row, categories::SHADOW_VERSION), None);
        assert_eq!(cell(&row, categories::SHADOW_TOP5), None);
    }
}
