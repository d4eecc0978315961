//! Every metric sift exports, in one place, and the small HTTP server each
//! daemon runs for `/metrics` (Prometheus text format) and `/healthz`.
//!
//! Names follow `sift_<component>_<name>_<unit>`; counters get `_total` from
//! the encoder. Labels are bounded (stage names, reasons), never ids.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::envelope::Stage;

/// Label of per-stage counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// Pipeline stage.
    pub stage: String,
}

/// Label of dead-letter counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why the record was rejected (a short fixed code).
    pub reason: String,
}

/// Label of fetch counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// What came of a fetch (`ok`, `not_modified`, `robots`, `error`, ...).
    pub outcome: String,
}

/// Label of documents a stage dropped on purpose (not errors).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabel {
    /// Pipeline stage.
    pub stage: String,
    /// Why (`duplicate`, `near_duplicate`, `filtered`, ...).
    pub reason: String,
}

/// sift's metrics.
pub struct Metrics {
    registry: Registry,
    /// Records appended to the embedded log.
    pub log_produced_records: Counter,
    /// Bytes (framed) appended to the embedded log.
    pub log_produced_bytes: Counter,
    /// Records delivered to embedded consumers.
    pub log_consumed_records: Counter,
    /// Torn tails cut off log segments during recovery.
    pub log_torn_tails: Counter,
    /// Damaged byte ranges of the embedded log moved to quarantine files.
    pub log_quarantined_ranges: Counter,
    /// Bytes moved to quarantine files.
    pub log_quarantined_bytes: Counter,
    /// Consumer positions reset by `log.on_offset_out_of_range`.
    pub log_offset_resets: Counter,
    /// Kafka group members replaced because they failed every poll (or
    /// failed fatally) while the cluster answered.
    pub log_consumer_rejoins: Counter,
    /// Records Kinesis refused for throughput (`ProvisionedThroughputExceeded`)
    /// and sent again after a backoff.
    pub log_throttled_records: Counter,
    /// Bytes written to the embedded object store.
    pub objects_written_bytes: Counter,
    /// Cells written to the embedded table.
    pub table_cells_written: Counter,
    /// Documents through each pipeline stage.
    pub documents: Family<StageLabel, Counter>,
    /// Records sent to the dead-letter topic, by reason.
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Documents a stage dropped on purpose, by stage and reason.
    pub dropped: Family<DropLabel, Counter>,
    /// HTTP fetches by outcome.
    pub fetches: Family<OutcomeLabel, Counter>,
    /// Body bytes fetched.
    pub fetched_bytes: Counter,
    /// Records between a consumer group's position and the end of its topic.
    pub consumer_lag: Family<StageLabel, Gauge>,
    /// Uncompressed bytes of each uploaded archive part.
    pub archive_part_bytes: Histogram,
    /// Records in each uploaded archive part.
    pub archive_part_records: Histogram,
    /// Training runs by outcome (`promoted`, `kept`, `failed`).
    pub train_runs: Family<OutcomeLabel, Counter>,
    /// Validation hit@5 of the last trained model, per mille.
    pub train_last_hit_at_5: Gauge,
    /// Unix time (s) the last training run finished.
    pub train_last_finished: Gauge,
    /// Documents waiting in `sift infer`'s batcher queue.
    pub infer_queue_depth: Gauge,
    /// Documents between `sift infer`'s poll and commit.
    pub infer_in_flight: Gauge,
    /// Documents per forward pass.
    pub infer_batch_docs: Histogram,
    /// Padded tokens (documents × the longest) per forward pass.
    pub infer_batch_padded_tokens: Histogram,
    /// Seconds per stage: `tokenize` (a poll's documents), `queue` (a
    /// document's wait for a batch), `forward` (a batch), `write` (a write to
    /// the table and `sift.categorized`).
    pub infer_stage_seconds: Family<StageLabel, Histogram, fn() -> Histogram>,
    /// Seconds from a record's arrival in `sift.clean` to its row being written.
    pub infer_latency_seconds: Histogram,
    /// Documents scored per second, over the last few seconds.
    pub infer_docs_per_second: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Model loads by outcome (`ok`, `failed`).
    pub infer_model_loads: Family<OutcomeLabel, Counter>,
    /// 1 for the model version `sift infer` scores with.
    pub infer_model: Family<VersionLabel, Gauge>,
    /// 1 when `sift infer` has a model and its backends answer.
    pub infer_ready: Gauge,
    /// Requests to the enrichment API by HTTP status (`error`: no answer).
    pub enrich_requests: Family<StatusLabel, Counter>,
    /// Enrichment lookups answered from the cache.
    pub enrich_cache_hits: Counter,
    /// Seconds enrichment lookups waited on the client-side rate limit.
    pub enrich_rate_limited_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Profiles `sift match` decided, by reason (`matched`, `below_threshold`, ...).
    pub match_profiles: Family<ReasonLabel, Counter>,
    /// Candidates the blocking query returned per profile.
    pub match_candidates: Histogram,
    /// Seconds to match one profile (enrichment, search and scoring).
    pub match_seconds: Histogram,
    /// Entries written by the last cache refresh, per network.
    pub cache_refresh_entries: Family<StageLabel, Gauge>,
    /// Review decisions by kind (`accept`, `choose`, `reject`).
    pub review_decisions: Family<DecisionLabel, Counter>,
    /// Seconds the review server spent on a request, by page.
    pub review_page_seconds: Family<PageLabel, Histogram, fn() -> Histogram>,
    /// Review logins by outcome (`ok`, `invalid`, `rate_limited`, `error`,
    /// `forbidden`: the login form's CSRF token was missing or wrong).
    pub review_logins: Family<OutcomeLabel, Counter>,
    /// Documents waiting for review (scored, not decided).
    pub review_queue_documents: Gauge,
    /// Seconds to rebuild the review queue from the table.
    pub review_queue_refresh_seconds: Histogram,
}

/// Label of the review decision counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// `accept`, `choose` or `reject`.
    pub decision: String,
}

/// Label of the review server's request timings.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PageLabel {
    /// Route (`doc`, `queue`, `next`, `decide`, ...), never an id.
    pub page: String,
}

/// Label of the enrichment request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status of the answer, or `error` when none came.
    pub status: String,
}

/// Label of the model version gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// Registry version.
    pub version: String,
}

fn stage_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            log_produced_records: Counter::default(),
            log_produced_bytes: Counter::default(),
            log_consumed_records: Counter::default(),
            log_torn_tails: Counter::default(),
            log_quarantined_ranges: Counter::default(),
            log_quarantined_bytes: Counter::default(),
            log_offset_resets: Counter::default(),
            log_consumer_rejoins: Counter::default(),
            log_throttled_records: Counter::default(),
            objects_written_bytes: Counter::default(),
            table_cells_written: Counter::default(),
            documents: Family::default(),
            dead_letters: Family::default(),
            dropped: Family::default(),
            fetches: Family::default(),
            fetched_bytes: Counter::default(),
            consumer_lag: Family::default(),
            archive_part_bytes: Histogram::new(exponential_buckets(1024.0, 4.0, 12)),
            archive_part_records: Histogram::new(exponential_buckets(1.0, 4.0, 12)),
            train_runs: Family::default(),
            train_last_hit_at_5: Gauge::default(),
            train_last_finished: Gauge::default(),
            infer_queue_depth: Gauge::default(),
            infer_in_flight: Gauge::default(),
            infer_batch_docs: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            infer_batch_padded_tokens: Histogram::new(exponential_buckets(64.0, 2.0, 12)),
            infer_stage_seconds: Family::new_with_constructor(stage_seconds),
            infer_latency_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            infer_docs_per_second: Gauge::default(),
            infer_model_loads: Family::default(),
            infer_model: Family::default(),
            infer_ready: Gauge::default(),
            enrich_requests: Family::default(),
            enrich_cache_hits: Counter::default(),
            enrich_rate_limited_seconds: Counter::default(),
            match_profiles: Family::default(),
            match_candidates: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            match_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            cache_refresh_entries: Family::default(),
            review_decisions: Family::default(),
            review_page_seconds: Family::new_with_constructor(stage_seconds),
            review_logins: Family::default(),
            review_queue_documents: Gauge::default(),
            review_queue_refresh_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            registry: Registry::default(),
        };
        registry.register(
            "sift_log_produced_records",
            "Records appended to the embedded log",
            m.log_produced_records.clone(),
        );
        registry.register(
            "sift_log_throttled_records",
            "Records Kinesis refused for throughput and sent again after a backoff",
            m.log_throttled_records.clone(),
        );
        registry.register(
            "sift_log_produced_bytes",
            "Framed bytes appended to the embedded log",
            m.log_produced_bytes.clone(),
        );
        registry.register(
            "sift_log_consumed_records",
            "Records delivered to embedded log consumers",
            m.log_consumed_records.clone(),
        );
        registry.register(
            "sift_log_torn_tails",
            "Torn segment tails cut off during log recovery",
            m.log_torn_tails.clone(),
        );
        registry.register(
            "sift_log_quarantined_ranges",
            "Damaged byte ranges of the embedded log moved to quarantine files",
            m.log_quarantined_ranges.clone(),
        );
        registry.register(
            "sift_log_quarantined_bytes",
            "Bytes of the embedded log moved to quarantine files",
            m.log_quarantined_bytes.clone(),
        );
        registry.register(
            "sift_log_offset_resets",
            "Consumer positions reset because they lay outside the stored offsets",
            m.log_offset_resets.clone(),
        );
        registry.register(
            "sift_log_consumer_rejoins",
            "Kafka group members replaced by fresh ones because they failed every poll while the cluster answered",
            m.log_consumer_rejoins.clone(),
        );
        registry.register(
            "sift_objects_written_bytes",
            "Bytes written to the embedded object store",
            m.objects_written_bytes.clone(),
        );
        registry.register(
            "sift_table_cells_written",
            "Cells written to the embedded table",
            m.table_cells_written.clone(),
        );
        registry.register(
            "sift_pipeline_documents",
            "Documents through each pipeline stage",
            m.documents.clone(),
        );
        registry.register(
            "sift_pipeline_dead_letters",
            "Records sent to the dead-letter topic, by reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "sift_pipeline_dropped",
            "Documents a stage dropped on purpose, by stage and reason",
            m.dropped.clone(),
        );
        registry.register(
            "sift_ingest_fetches",
            "HTTP fetches by outcome",
            m.fetches.clone(),
        );
        registry.register(
            "sift_ingest_fetched_bytes",
            "Body bytes fetched",
            m.fetched_bytes.clone(),
        );
        registry.register(
            "sift_consumer_lag_records",
            "Records between a stage's consumer position and the end of its topic",
            m.consumer_lag.clone(),
        );
        registry.register(
            "sift_archive_part_bytes",
            "Uncompressed bytes of each uploaded archive part",
            m.archive_part_bytes.clone(),
        );
        registry.register(
            "sift_archive_part_records",
            "Records in each uploaded archive part",
            m.archive_part_records.clone(),
        );
        registry.register(
            "sift_train_runs",
            "Training runs by outcome (promoted, kept, failed)",
            m.train_runs.clone(),
        );
        registry.register(
            "sift_train_last_hit_at_5_permille",
            "Validation hit@5 of the last trained model, per mille",
            m.train_last_hit_at_5.clone(),
        );
        registry.register(
            "sift_train_last_finished_seconds",
            "Unix time the last training run finished",
            m.train_last_finished.clone(),
        );
        registry.register(
            "sift_infer_queue_depth_documents",
            "Documents waiting in the batcher queue",
            m.infer_queue_depth.clone(),
        );
        registry.register(
            "sift_infer_in_flight_documents",
            "Documents between the poll and the commit",
            m.infer_in_flight.clone(),
        );
        registry.register(
            "sift_infer_batch_documents",
            "Documents per forward pass",
            m.infer_batch_docs.clone(),
        );
        registry.register(
            "sift_infer_batch_padded_tokens",
            "Padded tokens (documents x the longest) per forward pass",
            m.infer_batch_padded_tokens.clone(),
        );
        registry.register(
            "sift_infer_stage_seconds",
            "Seconds per stage: tokenize (a poll), queue (a document's wait), forward (a batch), write (a table write and produce)",
            m.infer_stage_seconds.clone(),
        );
        registry.register(
            "sift_infer_latency_seconds",
            "Seconds from a record's arrival in sift.clean to its row in the documents table",
            m.infer_latency_seconds.clone(),
        );
        registry.register(
            "sift_infer_documents_per_second",
            "Documents scored per second over the last few seconds",
            m.infer_docs_per_second.clone(),
        );
        registry.register(
            "sift_infer_model_loads",
            "Model loads by outcome (ok, failed)",
            m.infer_model_loads.clone(),
        );
        registry.register(
            "sift_infer_model",
            "1 for the model version sift infer scores with",
            m.infer_model.clone(),
        );
        registry.register(
            "sift_infer_ready",
            "1 when sift infer has a model and its backends answer",
            m.infer_ready.clone(),
        );
        registry.register(
            "sift_enrich_requests",
            "Requests to the enrichment API by HTTP status (error: no answer)",
            m.enrich_requests.clone(),
        );
        registry.register(
            "sift_enrich_cache_hits",
            "Enrichment lookups answered from the cache",
            m.enrich_cache_hits.clone(),
        );
        registry.register(
            "sift_enrich_rate_limited_seconds",
            "Seconds enrichment lookups waited on the client-side rate limit",
            m.enrich_rate_limited_seconds.clone(),
        );
        registry.register(
            "sift_match_profiles",
            "Profiles sift match decided, by reason",
            m.match_profiles.clone(),
        );
        registry.register(
            "sift_match_candidates",
            "Candidates the blocking query returned per profile",
            m.match_candidates.clone(),
        );
        registry.register(
            "sift_match_seconds",
            "Seconds to match one profile (enrichment, search, scoring)",
            m.match_seconds.clone(),
        );
        registry.register(
            "sift_cache_refresh_entries",
            "Entries written by the last cache refresh, per network (stage label)",
            m.cache_refresh_entries.clone(),
        );
        registry.register(
            "sift_review_decisions",
            "Review decisions by kind (accept, choose, reject)",
            m.review_decisions.clone(),
        );
        registry.register(
            "sift_review_page_seconds",
            "Seconds the review server spent on a request, by page",
            m.review_page_seconds.clone(),
        );
        registry.register(
            "sift_review_logins",
            "Review logins by outcome (ok, invalid, rate_limited, error, forbidden)",
            m.review_logins.clone(),
        );
        registry.register(
            "sift_review_queue_documents",
            "Documents waiting for review (scored, not decided)",
            m.review_queue_documents.clone(),
        );
        registry.register(
            "sift_review_queue_refresh_seconds",
            "Seconds to rebuild the review queue from the documents table",
            m.review_queue_refresh_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records that `sift infer` now scores with `version` instead of `old`.
    pub fn infer_model_loaded(&self, old: Option<&str>, version: &str) {
        if let Some(old) = old {
            self.infer_model.remove(&VersionLabel {
                version: old.to_string(),
            });
        }
        self.infer_model
            .get_or_create(&VersionLabel {
                version: version.to_string(),
            })
            .set(1);
        self.infer_model_loads
            .get_or_create(&OutcomeLabel {
                outcome: "ok".into(),
            })
            .inc();
    }

    /// Counts a profile `sift match` decided.
    pub fn match_decided(&self, reason: &str) {
        self.match_profiles
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Observes the candidates of one profile.
    pub fn match_candidates(&self, n: usize) {
        self.match_candidates.observe(n as f64);
    }

    /// Observes the time to match one profile.
    pub fn match_seconds(&self, seconds: f64) {
        self.match_seconds.observe(seconds);
    }

    /// Counts a model that failed to load.
    pub fn infer_model_load_failed(&self) {
        self.infer_model_loads
            .get_or_create(&OutcomeLabel {
                outcome: "failed".into(),
            })
            .inc();
    }

    /// Observes `seconds` of an infer stage.
    pub fn infer_stage(&self, stage: &str, seconds: f64) {
        self.infer_stage_seconds
            .get_or_create(&StageLabel {
                stage: stage.to_string(),
            })
            .observe(seconds);
    }

    /// Counts a document a stage dropped on purpose.
    pub fn drop(&self, stage: Stage, reason: &str) {
        self.dropped
            .get_or_create(&DropLabel {
                stage: stage.name().to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a fetch outcome.
    pub fn fetch(&self, outcome: &str) {
        self.fetches
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Sets a stage's consumer lag.
    pub fn lag(&self, stage: Stage, records: i64) {
        self.consumer_lag
            .get_or_create(&StageLabel {
                stage: stage.name().to_string(),
            })
            .set(records);
    }

    /// Counts documents through a stage.
    pub fn stage(&self, stage: Stage, n: u64) {
        self.documents
            .get_or_create(&StageLabel {
                stage: stage.name().to_string(),
            })
            .inc_by(n);
    }

    /// Counts a request to the enrichment API by its answer's status.
    pub fn enrich_request(&self, status: &str) {
        self.enrich_requests
            .get_or_create(&StatusLabel {
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts an enrichment lookup answered from the cache.
    pub fn enrich_cache_hit(&self) {
        self.enrich_cache_hits.inc();
    }

    /// Adds time an enrichment lookup waited on the client-side rate limit.
    pub fn enrich_rate_limited(&self, seconds: f64) {
        self.enrich_rate_limited_seconds.inc_by(seconds);
    }

    /// Counts a review decision.
    pub fn review_decided(&self, decision: &str) {
        self.review_decisions
            .get_or_create(&DecisionLabel {
                decision: decision.to_string(),
            })
            .inc();
    }

    /// Observes the time the review server spent on a page.
    pub fn review_page(&self, page: &str, seconds: f64) {
        self.review_page_seconds
            .get_or_create(&PageLabel {
                page: page.to_string(),
            })
            .observe(seconds);
    }

    /// Counts a review login attempt by outcome.
    pub fn review_login(&self, outcome: &str) {
        self.review_logins
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a dead letter.
    pub fn dead_letter(&self, reason: &str) {
        self.dead_letters
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Reports whether a daemon is healthy; `/healthz` answers 503 when it is not.
pub type Health = Arc<dyn Fn() -> bool + Send + Sync>;

/// Starts serving `/metrics` and `/healthz` on `addr` in the background and
/// returns the bound address (useful with port 0).
pub async fn serve(addr: &str, health: Health) -> std::io::Result<SocketAddr> {
    serve_probes(addr, health.clone(), health).await
}

/// Serves `/metrics`, `/healthz` (the process works) and `/readyz` (it can
/// take work: for `sift infer`, a model is loaded) on `addr`.
pub async fn serve_probes(
    addr: &str,
    health: Health,
    ready: Health,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler).with_state(health))
        .route("/readyz", get(health_handler).with_state(ready));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "The metrics server stopped.");
        }
    });
    tracing::info!(addr = %bound, "Serving /metrics and /healthz.");
    Ok(bound)
}

async fn metrics_handler() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        global().render(),
    )
}

/// The last failure a stage retried, for `/healthz` to say why it fails.
static LAST_FAILURE: parking_lot::Mutex<Option<String>> = parking_lot::Mutex::new(None);

/// Records what last failed (a stage's backoff calls this before it waits).
pub fn note_failure(what: String) {
    *LAST_FAILURE.lock() = Some(what);
}

async fn health_handler(State(health): State<Health>) -> impl IntoResponse {
    if health() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        let why = LAST_FAILURE
            .lock()
            .clone()
            .unwrap_or_else(|| "too many failures in a row".to_owned());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        )
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn serves_metrics_and_health() -> anyhow::Result<()> {
        global().stage(Stage::Log, 3);
        global().dead_letter("bad_json");
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = healthy.clone();
        let addr = serve(
            "127.0.0.1:0",
            Arc::new(move || h.load(std::sync::atomic::Ordering::Relaxed)),
        )
        .await?;
        let body = http_get(addr, "/metrics").await?;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(
            body.contains("sift_pipeline_documents_total{stage=\"log\"} 3"),
            "{body}"
        );
        assert!(
            body.contains("sift_pipeline_dead_letters_total{reason=\"bad_json\"} 1"),
            "{body}"
        );
        assert!(body.contains("sift_log_produced_records_total"), "{body}");
        assert!(http_get(addr, "/healthz")
            .await?
            .starts_with("HTTP/1.1 200"));
        healthy.store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(http_get(addr, "/healthz")
            .await?
            .starts_with("HTTP/1.1 503"));
        Ok(())
    }

    #[tokio::test]
    async fn readiness_is_apart_from_health() -> anyhow::Result<()> {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ready.clone();
        let addr = serve_probes(
            "127.0.0.1:0",
            Arc::new(|| true),
            Arc::new(move || r.load(std::sync::atomic::Ordering::Relaxed)),
        )
        .await?;
        assert!(http_get(addr, "/healthz")
            .await?
            .starts_with("HTTP/1.1 200"));
        assert!(http_get(addr, "/readyz").await?.starts_with("HTTP/1.1 503"));
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(http_get(addr, "/readyz").await?.starts_with("HTTP/1.1 200"));
        global().infer_stage("forward", 0.01);
        let body = http_get(addr, "/metrics").await?;
        assert!(
            body.contains("sift_infer_stage_seconds_count{stage=\"forward\"}"),
            "{body}"
        );
        Ok(())
    }
}
