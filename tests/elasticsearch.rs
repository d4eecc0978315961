//! The search conformance suite and the fault test against a real
//! Elasticsearch-compatible server (OpenSearch in CI), plus what only the
//! Elasticsearch backend does: bulk partial failures and large bulks.
//!
//! Needs `--features elasticsearch` and `SIFT_TEST_ES` (e.g.
//! `http://127.0.0.1:9200`, from `scripts/services.sh env`). Every test holds
//! one lock for its whole run, because the fault test stops the server.
#![cfg(feature = "elasticsearch")]

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use sift::backends::search::elasticsearch::ElasticsearchIndex;
use sift::backends::search::{
    Clause, FieldKind, FieldSpec, IndexSpec, Query, SearchDoc, SearchError, SearchIndex,
};
use sift::config::ElasticsearchConfig;
use tokio::sync::Mutex;

/// Serializes the tests of this file: the fault test takes the server away.
static SERVER: Mutex<()> = Mutex::const_new(());

/// The service name `scripts/services.sh` knows the server by.
const SERVICE: &str = "opensearch";

/// `SIFT_TEST_ES` as a URL (a bare `host:port` is taken as http).
fn base_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

async fn connect(addr: &str) -> Result<ElasticsearchIndex> {
    let config = ElasticsearchConfig {
        url: base_url(addr),
        timeout: Duration::from_secs(30),
        ..ElasticsearchConfig::default()
    };
    Ok(ElasticsearchIndex::connect(&config).await?)
}

fn spec(name: &str) -> IndexSpec {
    IndexSpec {
        name: name.to_owned(),
        source_excludes: Vec::new(),
        fields: vec![
            FieldSpec {
                name: "name".to_owned(),
                kind: FieldKind::Text,
            },
            FieldSpec {
                name: "group".to_owned(),
                kind: FieldKind::Keyword,
            },
            FieldSpec {
                name: "n".to_owned(),
                kind: FieldKind::Integer,
            },
        ],
    }
}

fn doc(id: &str, name: &str, group: &str, n: i64) -> SearchDoc {
    let mut source = Map::new();
    source.insert("name".into(), json!(name));
    source.insert("group".into(), json!(group));
    source.insert("n".into(), json!(n));
    SearchDoc {
        id: id.to_owned(),
        source,
    }
}

fn docs(prefix: &str, count: usize) -> Vec<SearchDoc> {
    (0..count)
        .map(|i| {
            doc(
                &format!("{prefix}-{i:05}"),
                &format!("Person {i}"),
                &format!("g{}", i % 7),
                i as i64,
            )
        })
        .collect()
}

/// Deletes the indexes matching `pattern` (best effort, on success only), so
/// reruns against a persistent server do not pile up shards until the node's
/// shard limit refuses new indexes.
async fn drop_indexes(addr: &str, pattern: &str) {
    use elasticsearch::http::transport::Transport;
    use elasticsearch::indices::{IndicesDeleteParts, IndicesGetParts};
    let outcome: Result<()> = async {
        let client = elasticsearch::Elasticsearch::new(Transport::single_node(&base_url(addr))?);
        let found: Map<String, Value> = client
            .indices()
            .get(IndicesGetParts::Index(&[pattern]))
            .send()
            .await?
            .error_for_status_code()?
            .json()
            .await?;
        let names: Vec<&str> = found.keys().map(String::as_str).collect();
        if !names.is_empty() {
            client
                .indices()
                .delete(IndicesDeleteParts::Index(&names))
                .send()
                .await?
                .error_for_status_code()?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        eprintln!("could not delete the test indexes {pattern}: {e:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elasticsearch_conformance() -> Result<()> {
    let Some(addr) = conformance::service_addr("SIFT_TEST_ES") else {
        return Ok(());
    };
    let _server = SERVER.lock().await;
    let index = connect(&addr).await?;
    conformance::search::check_search(&index).await?;
    // The suite's names end in `-<pid>-<time>-<n>` (conformance::unique).
    let mine = format!("sift-conf-*-{}-*", std::process::id());
    drop_indexes(&addr, &mine).await;
    Ok(())
}

/// Starts the server again when the fault test ends early, so a failure does
/// not leave it down for whatever runs next.
struct RestartOnDrop {
    armed: bool,
}

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = conformance::services("up", SERVICE) {
                eprintln!("could not start {SERVICE} again after a failed fault test: {e:#}");
            }
        }
    }
}

/// Runs `scripts/services.sh VERB opensearch` off the async executor.
async fn services(verb: &'static str) -> Result<()> {
    tokio::task::spawn_blocking(move || conformance::services(verb, SERVICE)).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elasticsearch_survives_a_server_restart() -> Result<()> {
    const BEFORE: usize = 500;
    const AFTER: usize = 100;
    let Some(addr) = conformance::service_addr("SIFT_TEST_ES") else {
        return Ok(());
    };
    let _server = SERVER.lock().await;
    let search = connect(&addr).await?;
    let name = conformance::unique("sift-es-fault");
    search.ensure_index(&spec(&name)).await?;
    let report = search.bulk(&name, docs("before", BEFORE)).await?;
    ensure!(
        report.indexed == BEFORE && report.failed.is_empty(),
        "{report:?}"
    );
    search.refresh(&name).await?;
    ensure!(search.count(&name).await? == BEFORE as u64);

    // The outage: a call fails with an error that names the server.
    let mut restart = RestartOnDrop { armed: true };
    services("down").await.context("stopping the server")?;
    match search.count(&name).await {
        Err(SearchError::Engine(message)) => {
            ensure!(
                message.contains("127.0.0.1:9200") || message.contains(&addr),
                "the error names the server: {message}"
            );
            eprintln!("during the outage: {message}");
        }
        other => bail!("a call during the outage must fail with an Engine error, got {other:?}"),
    }
    let err = search.bulk(&name, docs("during", 3)).await;
    ensure!(
        matches!(err, Err(SearchError::Engine(_))),
        "bulk during the outage: {err:?}"
    );

    // Back again: the same client finds everything and writes again.
    services("up").await.context("starting the server again")?;
    restart.armed = false;
    let count = conformance::eventually(180, || async {
        match search.count(&name).await {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("waiting for the index to recover: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                None
            }
        }
    })
    .await
    .context("the index did not come back within 3 minutes")?;
    ensure!(
        count == BEFORE as u64,
        "every acknowledged document survives the restart: {count}"
    );
    for i in [0, BEFORE / 2, BEFORE - 1] {
        let id = format!("before-{i:05}");
        let got = search
            .get(&name, &id)
            .await?
            .with_context(|| format!("{id} is missing after the restart"))?;
        ensure!(got.source["n"] == json!(i), "{got:?}");
    }
    let report = search.bulk(&name, docs("after", AFTER)).await?;
    ensure!(
        report.indexed == AFTER && report.failed.is_empty(),
        "{report:?}"
    );
    search.refresh(&name).await?;
    ensure!(search.count(&name).await? == (BEFORE + AFTER) as u64);
    let hits = search
        .search(
            &name,
            &Query {
                must: vec![Clause::Term {
                    field: "n".to_owned(),
                    value: json!(7),
                    boost: 1.0,
                }],
                k: 10,
                ..Query::default()
            },
        )
        .await?;
    let ids: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
    ensure!(ids == ["after-00007", "before-00007"], "{ids:?}");
    drop_indexes(&addr, &name).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elasticsearch_bulk_reports_each_failure_and_keeps_the_rest() -> Result<()> {
    let Some(addr) = conformance::service_addr("SIFT_TEST_ES") else {
        return Ok(());
    };
    let _server = SERVER.lock().await;
    let search = connect(&addr).await?;
    let name = conformance::unique("sift-es-partial");
    search.ensure_index(&spec(&name)).await?;

    let mut batch = docs("ok", 20);
    // Refused before sending: they break the spec.
    let mut coerced = doc("string-number", "x", "g", 0);
    coerced.source.insert("n".into(), json!("42"));
    batch.insert(5, coerced);
    batch.insert(10, doc("", "empty id", "g", 0));
    // Refused by the server: `_id` is a metadata field, not allowed in a source.
    let mut metadata = doc("metadata", "x", "g", 0);
    metadata.source.insert("_id".into(), json!("other"));
    batch.push(metadata);
    let report = search.bulk(&name, batch).await?;
    ensure!(report.indexed == 20, "{report:?}");
    let mut failed: Vec<&str> = report.failed.iter().map(|(id, _)| id.as_str()).collect();
    failed.sort_unstable();
    ensure!(
        failed == ["", "metadata", "string-number"],
        "{:?}",
        report.failed
    );
    let server_reason = &report
        .failed
        .iter()
        .find(|(id, _)| id == "metadata")
        .context("metadata failure")?
        .1;
    ensure!(
        server_reason.contains("_id"),
        "the server's reason is passed on: {server_reason}"
    );
    search.refresh(&name).await?;
    ensure!(search.count(&name).await? == 20);
    ensure!(search.get(&name, "metadata").await?.is_none());

    // Fields outside the spec are stored, returned, and not searchable.
    let mut extra = doc("extra", "Extra Person", "g", 1);
    extra.source.insert("note".into(), json!("unindexed words"));
    search.bulk(&name, vec![extra.clone()]).await?;
    search.refresh(&name).await?;
    let got = search.get(&name, "extra").await?.context("extra")?;
    ensure!(got.source == extra.source, "{got:?}");
    let note = search
        .search(
            &name,
            &Query {
                must: vec![Clause::Match {
                    field: "note".to_owned(),
                    text: "unindexed".to_owned(),
                    boost: 1.0,
                }],
                k: 10,
                ..Query::default()
            },
        )
        .await;
    ensure!(
        matches!(note, Err(SearchError::BadField { .. })),
        "{note:?}"
    );

    // Every call on a missing index says so.
    let missing = conformance::unique("sift-es-missing");
    ensure!(matches!(
        search.bulk(&missing, docs("x", 1)).await,
        Err(SearchError::NoSuchIndex(_))
    ));
    ensure!(matches!(
        search.get(&missing, "x").await,
        Err(SearchError::NoSuchIndex(_))
    ));
    ensure!(matches!(
        search.delete(&missing, "x").await,
        Err(SearchError::NoSuchIndex(_))
    ));
    ensure!(matches!(
        search.refresh(&missing).await,
        Err(SearchError::NoSuchIndex(_))
    ));
    ensure!(matches!(
        search.search(&missing, &Query::default()).await,
        Err(SearchError::NoSuchIndex(_))
    ));
    drop_indexes(&addr, &name).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elasticsearch_large_bulk_and_deep_top_k() -> Result<()> {
    const COUNT: usize = 12_000;
    let Some(addr) = conformance::service_addr("SIFT_TEST_ES") else {
        return Ok(());
    };
    let _server = SERVER.lock().await;
    let search = connect(&addr).await?;
    let name = conformance::unique("sift-es-large");
    search.ensure_index(&spec(&name)).await?;
    let report = search.bulk(&name, docs("big", COUNT)).await?;
    ensure!(
        report.indexed == COUNT && report.failed.is_empty(),
        "{} indexed, failures: {:?}",
        report.indexed,
        report.failed.iter().take(5).collect::<Vec<_>>()
    );
    search.refresh(&name).await?;
    ensure!(search.count(&name).await? == COUNT as u64);

    // More than one page (10 000) of hits with equal scores: all of them,
    // each once, ordered by id.
    let all = search
        .search(
            &name,
            &Query {
                filter: vec![Clause::Range {
                    field: "n".to_owned(),
                    gte: Some(0),
                    lte: None,
                }],
                k: COUNT + 10,
                ..Query::default()
            },
        )
        .await?;
    ensure!(all.len() == COUNT, "{} hits", all.len());
    ensure!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "equal scores are ordered by id"
    );
    ensure!(all[0].source.get("n") == Some(&Value::from(0)));
    drop_indexes(&addr, &name).await;
    Ok(())
}

/// What the fake cluster of the retry test saw and answers next.
#[derive(Default)]
struct FakeCluster {
    /// Document ids of each bulk request, in order.
    bulks: parking_lot::Mutex<Vec<Vec<String>>>,
}

/// The fake's bulk endpoint: the first request gets item `b` rejected as
/// overloaded (429), the second is refused whole (503), the rest are accepted.
async fn fake_bulk(
    State(cluster): State<Arc<FakeCluster>>,
    body: String,
) -> (StatusCode, Json<Value>) {
    let ids: Vec<String> = body
        .lines()
        .step_by(2)
        .filter_map(|action| {
            let action: Value = serde_json::from_str(action).ok()?;
            Some(action["index"]["_id"].as_str()?.to_owned())
        })
        .collect();
    let attempt = {
        let mut bulks = cluster.bulks.lock();
        bulks.push(ids.clone());
        bulks.len()
    };
    if attempt == 2 {
        let error = json!({ "error": { "type": "unavailable", "reason": "busy" }, "status": 503 });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(error));
    }
    let items: Vec<Value> = ids
        .iter()
        .map(|id| {
            if attempt == 1 && id == "b" {
                let error =
                    json!({ "type": "es_rejected_execution_exception", "reason": "queue full" });
                json!({ "index": { "status": 429, "error": error } })
            } else {
                json!({ "index": { "status": 201 } })
            }
        })
        .collect();
    (StatusCode::OK, Json(json!({ "items": items })))
}

/// Retries are hard to provoke on a real server, so a fake one on loopback
/// rejects an item and then a whole request; no service is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_retries_overloaded_items_and_unavailable_requests() -> Result<()> {
    let cluster = Arc::new(FakeCluster::default());
    let app = Router::new()
        .route(
            "/",
            get(|| async { Json(json!({ "version": { "number": "7.10.2" } })) }),
        )
        .route(
            "/{index}/_mapping",
            get(|Path(index): Path<String>| async move {
                // What sift's own mapping reads back as (its id field included).
                let properties = json!({
                    "-sift-id": { "type": "keyword" },
                    "name": { "type": "text" },
                    "group": { "type": "keyword" },
                    "n": { "type": "long" },
                });
                Json(json!({ index: { "mappings": { "properties": properties } } }))
            }),
        )
        .route("/{index}/_bulk", post(fake_bulk))
        .with_state(Arc::clone(&cluster));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let search = connect(&format!("http://{addr}")).await?;
    let batch = vec![
        doc("a", "Ann", "g", 1),
        doc("b", "Bob", "g", 2),
        doc("c", "Cy", "g", 3),
    ];
    let report = search.bulk("fake", batch).await?;
    server.abort();
    ensure!(
        report.indexed == 3 && report.failed.is_empty(),
        "{report:?}"
    );
    let bulks = cluster.bulks.lock().clone();
    ensure!(
        bulks == [vec!["a", "b", "c"], vec!["b"], vec!["b"]],
        "the whole batch, then the overloaded item, again after the 503: {bulks:?}"
    );
    Ok(())
}
