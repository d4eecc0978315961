//! The Grafana dashboard (`deploy/grafana/sift.json`) and the Prometheus
//! alerting rules (`deploy/prometheus/sift-alerts.yml`) against what the
//! daemons export: every metric name they query must be one sift serves on
//! `/metrics` (with the suffix its type gets), every label they select on
//! one that metric carries, and the dashboard must be a well-formed Grafana
//! dashboard (the fields Grafana needs to load it, panels of types it ships,
//! a grid without overlaps). `promtool check rules` and `promtool test rules`
//! run in `scripts/monitoring-check.sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use sift::metrics::{
    global, DecisionLabel, DropLabel, OutcomeLabel, PageLabel, ReasonLabel, StageLabel,
    StatusLabel, VersionLabel,
};

/// Metrics the dashboard and rules may use that sift does not export:
/// Prometheus's own `up`, and kube-state-metrics' view of the training
/// CronJob (too short-lived to be scraped itself).
const EXTERNAL: [&str; 3] = [
    "up",
    "kube_job_status_failed",
    "kube_cronjob_status_last_successful_time",
];

/// Labels Prometheus adds to every scraped series (deploy/prometheus/prometheus.yml).
const TARGET_LABELS: [&str; 3] = ["job", "instance", "component"];

fn read(path: &str) -> Result<String> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).with_context(|| full.display().to_string())
}

/// Every series name sift exports, with the label keys each carries: the
/// registry rendered after one series of every labelled family is created.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let m = global();
    let stage = || StageLabel {
        stage: "clean".into(),
    };
    let outcome = || OutcomeLabel {
        outcome: "ok".into(),
    };
    m.documents.get_or_create(&stage()).inc();
    m.consumer_lag.get_or_create(&stage()).set(1);
    m.infer_stage_seconds.get_or_create(&stage()).observe(0.1);
    m.cache_refresh_entries.get_or_create(&stage()).set(1);
    m.dead_letters
        .get_or_create(&ReasonLabel {
            reason: "bad_json".into(),
        })
        .inc();
    m.match_profiles
        .get_or_create(&ReasonLabel {
            reason: "matched".into(),
        })
        .inc();
    m.dropped
        .get_or_create(&DropLabel {
            stage: "clean".into(),
            reason: "too_short".into(),
        })
        .inc();
    m.fetches.get_or_create(&outcome()).inc();
    m.train_runs.get_or_create(&outcome()).inc();
    m.infer_model_loads.get_or_create(&outcome()).inc();
    m.review_logins.get_or_create(&outcome()).inc();
    m.infer_model
        .get_or_create(&VersionLabel {
            version: "v".into(),
        })
        .set(1);
    m.enrich_requests
        .get_or_create(&StatusLabel {
            status: "200".into(),
        })
        .inc();
    m.review_decisions
        .get_or_create(&DecisionLabel {
            decision: "accept".into(),
        })
        .inc();
    m.review_page_seconds
        .get_or_create(&PageLabel {
            page: "queue".into(),
        })
        .observe(0.01);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in m.render().lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let labels = out.entry(name.to_string()).or_default();
        if let (Some(open), Some(close)) = (line.find('{'), line.find('}')) {
            for pair in line[open + 1..close].split(',') {
                if let Some((k, _)) = pair.split_once('=') {
                    if k != "le" {
                        labels.insert(k.trim().to_string());
                    }
                }
            }
        }
    }
    out
}

/// Every `name{matchers}` and bare `name` in a PromQL text (or a YAML file
/// of them; names in comments and annotations are checked too).
fn selectors(text: &str) -> Vec<(String, Vec<String>)> {
    let re = regex::Regex::new(r"\b((?:sift|kube)_[a-z0-9_]+|up)\b(\{([^}]*)\})?").expect("regex");
    re.captures_iter(text)
        .map(|c| {
            let keys = c
                .get(3)
                .map(|m| {
                    m.as_str()
                        .split(',')
                        .filter_map(|p| {
                            let k: String = p
                                .trim()
                                .chars()
                                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                                .collect();
                            (!k.is_empty()).then_some(k)
                        })
                        .collect()
                })
                .unwrap_or_default();
            (c[1].to_string(), keys)
        })
        .collect()
}

fn check_names(
    what: &str,
    text: &str,
    exported: &BTreeMap<String, BTreeSet<String>>,
) -> Result<usize> {
    let mut checked = 0;
    for (name, keys) in selectors(text) {
        if EXTERNAL.contains(&name.as_str()) {
            continue;
        }
        let Some(labels) = exported.get(&name) else {
            bail!(
                "{what} uses {name}, which sift does not export; it exports {:?}",
                exported.keys()
            );
        };
        for k in &keys {
            ensure!(
                labels.contains(k) || TARGET_LABELS.contains(&k.as_str()),
                "{what} selects {name} by label `{k}`, which it does not carry ({labels:?})"
            );
        }
        checked += 1;
    }
    Ok(checked)
}

#[test]
fn the_rules_query_only_what_sift_exports() -> Result<()> {
    let exported = exported();
    ensure!(
        exported.contains_key("sift_pipeline_documents_total"),
        "{exported:?}"
    );
    ensure!(
        exported.contains_key("sift_infer_latency_seconds_bucket"),
        "{exported:?}"
    );
    let rules = read("deploy/prometheus/sift-alerts.yml")?;
    let n = check_names("sift-alerts.yml", &rules, &exported)?;
    ensure!(n >= 24, "only {n} metric uses found in the rules");
    // The rules' tests feed the same names.
    let tests = read("deploy/prometheus/tests/sift-alerts.test.yml")?;
    check_names("sift-alerts.test.yml", &tests, &exported)?;
    Ok(())
}

#[test]
fn the_dashboard_queries_only_what_sift_exports() -> Result<()> {
    let exported = exported();
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/sift.json")?)?;
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("expr")?;
            check_names(&format!("panel `{}`", panel["title"]), expr, &exported)?;
            used.extend(selectors(expr).into_iter().map(|(n, _)| n));
        }
    }
    // What operators look for first: throughput, lag per group, dead letters
    // by reason, batch sizes and latencies, model version, match outcomes,
    // review decisions.
    for name in [
        "sift_pipeline_documents_total",
        "sift_consumer_lag_records",
        "sift_pipeline_dead_letters_total",
        "sift_infer_batch_documents_bucket",
        "sift_infer_latency_seconds_bucket",
        "sift_infer_model",
        "sift_match_profiles_total",
        "sift_review_decisions_total",
    ] {
        ensure!(used.contains(name), "the dashboard shows nothing of {name}");
    }
    Ok(())
}

/// Panel types Grafana 10 and 11 ship.
const PANEL_TYPES: [&str; 9] = [
    "row",
    "timeseries",
    "stat",
    "gauge",
    "bargauge",
    "barchart",
    "table",
    "text",
    "state-timeline",
];

#[test]
fn the_dashboard_is_a_grafana_dashboard() -> Result<()> {
    let d: Value = serde_json::from_str(&read("deploy/grafana/sift.json")?)?;
    ensure!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");
    ensure!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40),
        "uid: at most 40 characters"
    );
    ensure!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    ensure!(
        d["time"]["from"].is_string() && d["time"]["to"].is_string(),
        "time"
    );
    let vars = d["templating"]["list"]
        .as_array()
        .context("templating.list")?;
    ensure!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type datasource (prometheus)"
    );
    let panels = d["panels"].as_array().context("panels")?;
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for p in panels {
        let title = p["title"].as_str().context("every panel has a title")?;
        let id = p["id"].as_u64().with_context(|| format!("{title}: id"))?;
        ensure!(ids.insert(id), "{title}: id {id} is not unique");
        let kind = p["type"]
            .as_str()
            .with_context(|| format!("{title}: type"))?;
        ensure!(
            PANEL_TYPES.contains(&kind),
            "{title}: unknown panel type {kind}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().context("gridPos.x")?,
            g["y"].as_u64().context("gridPos.y")?,
            g["w"].as_u64().context("gridPos.w")?,
            g["h"].as_u64().context("gridPos.h")?,
        );
        ensure!(
            w > 0 && h > 0 && x + w <= 24,
            "{title}: gridPos {g} leaves the 24 columns"
        );
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.to_string()) {
                    bail!("{title} overlaps {other} at column {cx}, row {cy}");
                }
            }
        }
        if kind == "row" {
            continue;
        }
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "{title}: its datasource must be the `datasource` variable"
        );
        ensure!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title}: say what the panel shows"
        );
        let targets = p["targets"]
            .as_array()
            .with_context(|| format!("{title}: targets"))?;
        ensure!(!targets.is_empty(), "{title}: no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            let r = t["refId"]
                .as_str()
                .with_context(|| format!("{title}: refId"))?;
            ensure!(refs.insert(r), "{title}: refId {r} twice");
            let expr = t["expr"]
                .as_str()
                .with_context(|| format!("{title}: expr"))?;
            ensure!(
                expr.matches('(').count() == expr.matches(')').count()
                    && expr.matches('{').count() == expr.matches('}').count(),
                "{title}: unbalanced brackets in {expr}"
            );
        }
    }
    Ok(())
}
