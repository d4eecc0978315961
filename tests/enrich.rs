//! The enrichment client against the local stand-in over real HTTP: found
//! people parsed and cached (the same handle is not paid for twice), queued
//! lookups re-asked, misses cached, 429 and 503 retried with backoff, a wrong
//! key rejected without the key leaking, the client-side rate limit shared
//! by concurrent callers; answers paid once (stored in the table across
//! runs, one call per handle however many lookups are in flight), counted
//! for `sift enrich stats`, and never paid again because the table of
//! answers is down; and the generator's canned answers served back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use sift::backends::cache::EmbeddedCache;
use sift::backends::table::{Delete, EmbeddedTable, Row, RowPut, Scan, Table, TableError};
use sift::backends::Cache;
use sift::config::EnrichConfig;
use sift::dbusa::generate::{generate, Spec};
use sift::dbusa::person::{corruptions, Answer, Profile};
use sift::matching::enrich::{
    AnswerStore, EnrichError, EnrichRequest, EnrichSource, Enricher, Enrichment,
};
use sift::matching::standin::{self, StandIn, StandInOptions};

const KEY: &str = "test-key-5b1d2e";

fn local() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

fn john_doe() -> serde_json::Value {
    json!({
        "fullName": "John Doe", "ageRange": "30-39", "gender": "Male",
        "location": "Saint Paul, Minnesota, United States", "title": null, "organization": null,
        "twitter": "https://twitter.com/jdoe", "linkedin": null, "bio": null, "avatar": null,
        "website": null,
        "details": {
            "name": {"given": "John", "family": "Doe", "full": "John Doe"},
            "age": {"range": {"start": 30, "end": 39}}, "gender": "Male",
            "emails": [{"label": "personal", "value": "john@example.com"}],
            "phones": [{"label": "mobile", "value": "+16515550101"}],
            "profiles": {"twitter": {"username": "jdoe", "service": "twitter", "url": "https://twitter.com/jdoe"}},
            "locations": [{"label": "home", "city": "Saint Paul", "region": "Minnesota",
                "regionCode": "MN", "country": "United States", "countryCode": "US",
                "formatted": "Saint Paul, Minnesota, United States"}],
            "employment": [], "photos": [], "education": [], "urls": [], "interests": []
        },
        "updated": "2026-05-01", "isSensitive": false
    })
}

fn answer(username: &str, statuses: &[u16]) -> Answer {
    Answer {
        service: "twitter".into(),
        username: username.into(),
        emails: vec![format!("{username}@example.com")],
        statuses: statuses.to_vec(),
        person: john_doe(),
    }
}

/// Short waits so the retries and re-asks run in milliseconds.
fn config(url: &str) -> EnrichConfig {
    EnrichConfig {
        url: url.into(),
        api_key: KEY.into(),
        rate_per_minute: 600_000,
        timeout: Duration::from_secs(5),
        max_attempts: 4,
        pending_attempts: 2,
        pending_wait: Duration::from_millis(50),
        ..EnrichConfig::default()
    }
}

async fn serve(answers: Vec<Answer>, options: StandInOptions) -> Result<StandIn> {
    Ok(standin::start(local(), KEY.into(), answers, options).await?)
}

fn fast() -> StandInOptions {
    StandInOptions {
        rate_per_minute: 0,
        retry_after_secs: 0,
    }
}

fn client(config: &EnrichConfig) -> Result<Enricher> {
    let cache: Arc<dyn Cache> = Arc::new(EmbeddedCache::new(1000));
    Enricher::new(config, cache)?.context("a key is set, so enrichment is on")
}

fn twitter(handle: &str) -> EnrichRequest {
    EnrichRequest {
        network: "twitter".into(),
        handle: handle.into(),
        email: None,
        phone: None,
    }
}

#[tokio::test]
async fn a_found_person_is_parsed_and_not_paid_for_twice() -> Result<()> {
    let server = serve(vec![answer("jdoe", &[])], fast()).await?;
    let enricher = client(&config(&server.url()))?;
    let (found, source) = enricher.enrich(&twitter("jdoe")).await?;
    ensure!(source == EnrichSource::Api);
    let Enrichment::Found(p) = found else {
        bail!("expected a person, got {found:?}");
    };
    ensure!(p.full_name.as_deref() == Some("John Doe"), "{p:?}");
    ensure!(p.given.as_deref() == Some("John") && p.family.as_deref() == Some("Doe"));
    ensure!(p.city.as_deref() == Some("Saint Paul") && p.region_code.as_deref() == Some("MN"));
    ensure!(p.location.as_deref() == Some("Saint Paul, Minnesota, United States"));
    ensure!(p.emails == ["john@example.com"] && p.phones == ["+16515550101"]);

    // The same handle, written differently: from the cache.
    let (again, source) = enricher.enrich(&twitter("JDoe")).await?;
    ensure!(source == EnrichSource::Cache);
    ensure!(again == Enrichment::Found(p));
    ensure!(server.requests_for("twitter", "jdoe") == 1);
    ensure!(server.requests() == 1);

    let metrics = sift::metrics::global().render();
    ensure!(
        metrics.contains("sift_enrich_requests_total{status=\"200\"}"),
        "{metrics}"
    );
    ensure!(metrics.contains("sift_enrich_cache_hits_total"));
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_lookup_without_a_known_handle_is_found_by_email() -> Result<()> {
    let server = serve(vec![answer("jdoe", &[])], fast()).await?;
    let enricher = client(&config(&server.url()))?;
    let req = EnrichRequest {
        email: Some("JDOE@example.com".into()),
        ..twitter("someone_else")
    };
    let (found, _) = enricher.enrich(&req).await?;
    ensure!(
        matches!(found, Enrichment::Found(ref p) if p.full_name.as_deref() == Some("John Doe"))
    );
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_queued_lookup_is_asked_again() -> Result<()> {
    let server = serve(
        vec![answer("queued", &[202, 200]), answer("stuck", &[202])],
        fast(),
    )
    .await?;
    let enricher = client(&config(&server.url()))?;

    let (found, source) = enricher.enrich(&twitter("queued")).await?;
    ensure!(matches!(found, Enrichment::Found(_)) && source == EnrichSource::Api);
    ensure!(server.requests_for("twitter", "queued") == 2);

    // Still queued after pending_attempts (2) re-asks: pending, and not cached.
    let (pending, _) = enricher.enrich(&twitter("stuck")).await?;
    ensure!(pending == Enrichment::Pending, "{pending:?}");
    ensure!(server.requests_for("twitter", "stuck") == 3);
    let (pending, source) = enricher.enrich(&twitter("stuck")).await?;
    ensure!(pending == Enrichment::Pending && source == EnrichSource::Api);
    ensure!(server.requests_for("twitter", "stuck") == 6);
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_miss_is_cached() -> Result<()> {
    let server = serve(vec![answer("jdoe", &[])], fast()).await?;
    let enricher = client(&config(&server.url()))?;
    let (missing, source) = enricher.enrich(&twitter("nobody")).await?;
    ensure!(missing == Enrichment::NotFound && source == EnrichSource::Api);
    let (missing, source) = enricher.enrich(&twitter("nobody")).await?;
    ensure!(missing == Enrichment::NotFound && source == EnrichSource::Cache);
    ensure!(server.requests_for("twitter", "nobody") == 1);
    ensure!(server.statuses().get(&404) == Some(&1));
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn rate_limited_and_unavailable_answers_are_retried() -> Result<()> {
    let server = serve(
        vec![answer("busy", &[429, 429, 200]), answer("down", &[503])],
        fast(),
    )
    .await?;
    let enricher = client(&config(&server.url()))?;
    let (found, _) = enricher.enrich(&twitter("busy")).await?;
    ensure!(matches!(found, Enrichment::Found(_)), "{found:?}");
    ensure!(server.requests_for("twitter", "busy") == 3);

    let failed = enricher.enrich(&twitter("down")).await;
    match failed {
        Err(EnrichError::Unavailable(message)) => {
            ensure!(
                message.contains("503") && message.contains("4 attempts"),
                "{message}"
            )
        }
        other => bail!("expected unavailable, got {other:?}"),
    }
    ensure!(
        server.requests_for("twitter", "down") == 4,
        "max_attempts is 4"
    );
    // Nothing is cached for a failure.
    ensure!(enricher.enrich(&twitter("down")).await.is_err());
    ensure!(server.requests_for("twitter", "down") == 8);
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn retry_after_is_honoured() -> Result<()> {
    let server = serve(
        vec![answer("slow", &[429, 200])],
        StandInOptions {
            rate_per_minute: 0,
            retry_after_secs: 1,
        },
    )
    .await?;
    let enricher = client(&config(&server.url()))?;
    let started = Instant::now();
    let (found, _) = enricher.enrich(&twitter("slow")).await?;
    ensure!(matches!(found, Enrichment::Found(_)));
    let took = started.elapsed();
    ensure!(took >= Duration::from_secs(1), "retried after {took:?}");
    ensure!(took < Duration::from_secs(10), "retried after {took:?}");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_wrong_key_is_rejected_without_showing_any_key() -> Result<()> {
    let server = serve(vec![answer("jdoe", &[])], fast()).await?;
    let wrong = "sk_wrong_9f8e7d6c5b4a";
    let enricher = client(&EnrichConfig {
        api_key: wrong.into(),
        ..config(&server.url())
    })?;
    let err = match enricher.enrich(&twitter("jdoe")).await {
        Err(e) => e,
        Ok(answer) => bail!("a wrong key was accepted: {answer:?}"),
    };
    ensure!(
        matches!(err, EnrichError::KeyRefused { status: 401, .. }),
        "{err:?}"
    );
    let shown = format!("{err} {err:?} {enricher:?}");
    ensure!(shown.contains("SIFT__ENRICH__API_KEY"), "{shown}");
    ensure!(!shown.contains(wrong) && !shown.contains(KEY), "{shown}");
    ensure!(server.requests() == 1, "a rejection is not retried");
    ensure!(server.requests_for("twitter", "jdoe") == 0);

    // The right key's client does not show it either.
    let right = client(&config(&server.url()))?;
    ensure!(!format!("{right:?}").contains(KEY));
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_standin_follows_the_api_format() -> Result<()> {
    let server = serve(
        vec![answer("jdoe", &[])],
        StandInOptions {
            rate_per_minute: 60,
            retry_after_secs: 1,
        },
    )
    .await?;
    let url = format!("{}/v3/person.enrich", server.url());
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value, key: &str| {
        http.post(&url)
            .header("Authorization", format!("Bearer {key}"))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
    };
    let r = post(
        json!({"profiles": [{"service": "twitter", "username": "jdoe"}]}),
        "nope",
    )
    .await?;
    ensure!(r.status() == 401);
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
    ensure!(
        body["status"] == 401 && body["message"].is_string(),
        "{body}"
    );

    let r = post(json!({"profiles": []}), KEY).await?;
    ensure!(r.status() == 400);

    // One request a minute (bursts of one): the first is served, the next is 429.
    let r = post(
        json!({"profiles": [{"service": "twitter", "username": "JDOE"}]}),
        KEY,
    )
    .await?;
    ensure!(r.status() == 200);
    let person: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
    ensure!(person == john_doe());
    let r = post(json!({"emails": ["nobody@example.com"]}), KEY).await?;
    ensure!(r.status() == 429);
    ensure!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()) == Some("1"));
    ensure!(server.requests() == 4);
    let statuses = server.statuses();
    ensure!(
        statuses.get(&401) == Some(&1)
            && statuses.get(&400) == Some(&1)
            && statuses.get(&200) == Some(&1)
            && statuses.get(&429) == Some(&1),
        "{statuses:?}"
    );
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_share_the_rate_limit() -> Result<()> {
    let server = serve(Vec::new(), fast()).await?;
    // 120 a minute: one every 500 ms, after a burst of 2 (one second's worth).
    let enricher = Arc::new(client(&EnrichConfig {
        rate_per_minute: 120,
        ..config(&server.url())
    })?);
    let started = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let e = Arc::clone(&enricher);
            tokio::spawn(async move { e.enrich(&twitter(&format!("user{i}"))).await })
        })
        .collect();
    for call in calls {
        let (answer, _) = call.await??;
        ensure!(answer == Enrichment::NotFound);
    }
    let took = started.elapsed();
    // 2 at once, then 4 more 500 ms apart: 2 s.
    ensure!(took >= Duration::from_millis(1900), "6 calls took {took:?}");
    ensure!(took < Duration::from_secs(15), "6 calls took {took:?}");
    ensure!(server.requests() == 6);
    let metrics = sift::metrics::global().render();
    let waited: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sift_enrich_rate_limited_seconds_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("the rate-limit metric")?;
    // The four later callers waited 0.5 + 1 + 1.5 + 2 s between them.
    ensure!(waited >= 4.5, "waited {waited} s in all");
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generators_answers_serve_missing_profiles() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let g = generate(
        &Spec {
            rows: 4_000,
            seed: 11,
            profiles: 800,
            outsiders: 200,
            housemates: 0,
            profile_rows: 0,
        },
        dir.path(),
    )?;
    let answers = sift::dbusa::person::read_answers(&g.enrichment)?;
    ensure!(answers.len() as u64 == g.answer_count && !answers.is_empty());
    let by_key: HashMap<(String, String), &Answer> = answers
        .iter()
        .map(|a| ((a.service.clone(), a.username.to_lowercase()), a))
        .collect();
    ensure!(by_key.len() == answers.len(), "one answer per handle");

    let csv = std::fs::read_to_string(&g.database)?;
    let people: HashMap<&str, Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            (cols[0], cols)
        })
        .collect();
    let profiles: Vec<Profile> = std::fs::read_to_string(&g.profiles)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let (mut missing, mut missing_known, mut outsiders, mut outsiders_known) = (0, 0, 0, 0);
    let mut queued = 0;
    let mut both_missing = None;
    for p in &profiles {
        let known = by_key.get(&(p.network.clone(), p.handle.to_lowercase()));
        queued += known.map_or(0, |a| usize::from(a.statuses == [202, 200]));
        match p.corruption.as_str() {
            corruptions::MISSING_NAME
            | corruptions::MISSING_LOCATION
            | corruptions::BOTH_MISSING => {
                missing += 1;
                missing_known += usize::from(known.is_some());
                if p.corruption == corruptions::BOTH_MISSING
                    && known.is_some()
                    && both_missing.is_none()
                {
                    both_missing = Some(p);
                }
            }
            corruptions::NOT_IN_DB => {
                outsiders += 1;
                outsiders_known += usize::from(known.is_some());
            }
            other => ensure!(known.is_none(), "a `{other}` profile has an answer: {p:?}"),
        }
    }
    let share = missing_known as f64 / missing as f64;
    ensure!(
        (0.75..0.93).contains(&share),
        "{missing_known} of {missing} known"
    );
    let share = outsiders_known as f64 / outsiders as f64;
    ensure!(
        (0.18..0.42).contains(&share),
        "{outsiders_known} of {outsiders} outsiders known"
    );
    ensure!(queued > 0, "no answer is queued first");

    // A profile with neither name nor location: the stand-in gives its person.
    let p = both_missing.context("a both_missing profile with an answer")?;
    let id = p.dbusa_id.as_deref().context("an insider")?;
    let row = people.get(id).context("the profile's person")?;
    let server = serve(answers.clone(), fast()).await?;
    let enricher = client(&config(&server.url()))?;
    let req = EnrichRequest {
        network: p.network.clone(),
        handle: p.handle.clone(),
        email: p.email.clone(),
        phone: None,
    };
    let (found, _) = enricher.enrich(&req).await?;
    let Enrichment::Found(person) = found else {
        bail!("{p:?} was not found: {found:?}");
    };
    let name = format!("{} {}", row[1], row[3]);
    ensure!(
        person.full_name.as_deref() == Some(name.as_str()),
        "{person:?} vs {row:?}"
    );
    ensure!(
        person.city.as_deref() == Some(row[5]) && person.region_code.as_deref() == Some(row[6])
    );
    server.stop().await;
    Ok(())
}

/// A client with a fresh cache over the table of stored answers in `dir`:
/// what a new `sift match` process starts with.
async fn stored_client(config: &EnrichConfig, table: &Arc<EmbeddedTable>) -> Result<Enricher> {
    let store = AnswerStore::open(table.clone()).await?;
    Ok(client(config)?.with_store(store))
}

#[tokio::test]
async fn answers_are_paid_once_across_runs() -> Result<()> {
    let answers: Vec<Answer> = (0..6).map(|i| answer(&format!("user{i}"), &[])).collect();
    let server = serve(answers, fast()).await?;
    let dir = tempfile::tempdir()?;
    let table = Arc::new(EmbeddedTable::open(&dir.path().join("t.redb"))?);
    // Six found, four not found; asked twice each in the first run.
    let handles: Vec<String> = (0..10).map(|i| format!("user{i}")).collect();
    let first = stored_client(&config(&server.url()), &table).await?;
    for round in 0..2 {
        for h in &handles {
            let (_, source) = first.enrich(&twitter(h)).await?;
            ensure!(source.paid() == (round == 0), "{h} round {round}: {source}");
        }
    }
    ensure!(server.requests() == 10, "{} calls", server.requests());
    first.flush_stats("first").await?;

    // A second run, its cache empty: every answer from the table, no call.
    let second = stored_client(&config(&server.url()), &table).await?;
    for h in &handles {
        let (answer, source) = second.enrich(&twitter(h)).await?;
        ensure!(source == EnrichSource::Stored, "{h}: {source}");
        let found = h.trim_start_matches("user").parse::<u32>()? < 6;
        ensure!(
            matches!(answer, Enrichment::Found(_)) == found,
            "{h}: {answer:?}"
        );
        // Then from its own cache.
        let (_, source) = second.enrich(&twitter(h)).await?;
        ensure!(source == EnrichSource::Cache, "{h}: {source}");
    }
    ensure!(
        server.requests() == 10,
        "the second run paid: {} calls",
        server.requests()
    );
    second.flush_stats("second").await?;

    let summary = AnswerStore::open(table.clone()).await?.summary().await?;
    ensure!(
        (summary.found, summary.not_found, summary.stored_calls) == (6, 4, 10),
        "{summary:?}"
    );
    ensure!(summary.instances == 2, "{summary:?}");
    let c = summary.counted;
    ensure!(
        (c.lookups, c.calls, c.cache_hits, c.stored_hits) == (40, 10, 20, 10),
        "{c:?}"
    );
    ensure!(c.hit_rate() == Some(0.75), "{c:?}");

    // An answer older than its time to live is asked again.
    let stale = stored_client(
        &EnrichConfig {
            cache_ttl: Duration::from_millis(1),
            not_found_ttl: Duration::from_millis(1),
            ..config(&server.url())
        },
        &table,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (_, source) = stale.enrich(&twitter("user0")).await?;
    ensure!(source == EnrichSource::Api, "{source}");
    ensure!(server.requests() == 11);
    server.stop().await;
    Ok(())
}

/// The embedded table, with an outage switched on and off: while down every
/// call fails as a gateway that refuses connections does.
struct Outage {
    inner: Arc<EmbeddedTable>,
    down: AtomicBool,
    /// Writes still to refuse while reads work.
    failing_puts: AtomicUsize,
    refused: AtomicUsize,
}

impl Outage {
    fn check(&self) -> Result<(), TableError> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(TableError::Backend("connection refused (an outage)".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Table for Outage {
    async fn ensure_table(&self, table: &str, families: &[&str]) -> Result<(), TableError> {
        self.check()?;
        self.inner.ensure_table(table, families).await
    }
    async fn list_tables(&self) -> Result<Vec<(String, Vec<String>)>, TableError> {
        self.check()?;
        self.inner.list_tables().await
    }
    async fn put(&self, table: &str, rows: Vec<RowPut>) -> Result<(), TableError> {
        self.check()?;
        if self
            .failing_puts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(TableError::Backend("connection refused (writes)".into()));
        }
        self.inner.put(table, rows).await
    }
    async fn get(
        &self,
        table: &str,
        row: &[u8],
        families: Option<&[String]>,
    ) -> Result<Option<Row>, TableError> {
        self.check()?;
        self.inner.get(table, row, families).await
    }
    async fn scan(&self, table: &str, scan: &Scan) -> Result<Vec<Row>, TableError> {
        self.check()?;
        self.inner.scan(table, scan).await
    }
    async fn delete(&self, table: &str, row: &[u8], what: Delete) -> Result<(), TableError> {
        self.check()?;
        self.inner.delete(table, row, what).await
    }
}

/// A table of answers that cannot be read makes the lookup wait (an
/// error the matcher retries), not pay the API again; an answer paid for
/// while the table refuses writes is stored once it is back.
#[tokio::test]
async fn a_table_outage_never_pays_twice() -> Result<()> {
    let server = serve(vec![answer("paid", &[]), answer("later", &[])], fast()).await?;
    let dir = tempfile::tempdir()?;
    let table = Arc::new(Outage {
        inner: Arc::new(EmbeddedTable::open(&dir.path().join("t.redb"))?),
        down: AtomicBool::new(false),
        failing_puts: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
    });
    let config = config(&server.url());
    let fresh = || client(&config);
    let store = AnswerStore::open(table.clone()).await?;
    let first = fresh()?.with_store(store.clone());
    let (_, source) = first.enrich(&twitter("paid")).await?;
    ensure!(source == EnrichSource::Api && server.requests() == 1);

    // A restarted process (empty cache) while the table is down: an error
    // for the caller to retry, and no call.
    table.down.store(true, Ordering::SeqCst);
    let second = fresh()?.with_store(store.clone());
    for _ in 0..3 {
        match second.enrich(&twitter("paid")).await {
            Err(EnrichError::Store(msg)) => ensure!(msg.contains("an outage"), "{msg}"),
            other => bail!("a lookup with the table down gave {other:?}"),
        }
    }
    ensure!(
        server.requests() == 1,
        "paid again: {} calls",
        server.requests()
    );
    table.down.store(false, Ordering::SeqCst);
    let (_, source) = second.enrich(&twitter("paid")).await?;
    ensure!(source == EnrichSource::Stored, "{source}");
    ensure!(server.requests() == 1);

    // The table refuses the write of a new answer (it went down after the
    // read): the write is tried again until the table takes it.
    table.failing_puts.store(3, Ordering::SeqCst);
    let refused = table.refused.load(Ordering::SeqCst);
    let (_, source) = fresh()?
        .with_store(store.clone())
        .enrich(&twitter("later"))
        .await?;
    ensure!(
        table.refused.load(Ordering::SeqCst) == refused + 3,
        "{} writes refused",
        table.refused.load(Ordering::SeqCst) - refused
    );
    ensure!(source == EnrichSource::Api && server.requests() == 2);
    let third = fresh()?.with_store(store);
    let (_, source) = third.enrich(&twitter("later")).await?;
    ensure!(
        source == EnrichSource::Stored,
        "the answer paid during the outage was not stored: {source}"
    );
    ensure!(server.requests() == 2);
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn concurrent_lookups_of_one_handle_pay_once() -> Result<()> {
    // Queued once, then found: the first lookup holds its handle for a
    // re-ask while fifteen others of the same handle arrive.
    let answers: Vec<Answer> = (0..10)
        .map(|i| answer(&format!("user{i}"), &[202, 200]))
        .collect();
    let server = serve(answers, fast()).await?;
    let dir = tempfile::tempdir()?;
    let table = Arc::new(EmbeddedTable::open(&dir.path().join("t.redb"))?);
    let enricher = Arc::new(stored_client(&config(&server.url()), &table).await?);
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..16 {
        for i in 0..10 {
            let enricher = Arc::clone(&enricher);
            // Case differs by round: the same handle however it is written.
            let handle = if round % 2 == 0 {
                format!("user{i}")
            } else {
                format!("USER{i}")
            };
            tasks.spawn(async move { enricher.enrich(&twitter(&handle)).await });
        }
    }
    let mut paid = 0;
    while let Some(done) = tasks.join_next().await {
        let (answer, source) = done??;
        ensure!(matches!(answer, Enrichment::Found(_)), "{answer:?}");
        paid += usize::from(source.paid());
    }
    ensure!(paid == 10, "{paid} lookups paid");
    // Two calls per handle: the queued answer and the re-ask.
    for i in 0..10 {
        let calls = server.requests_for("twitter", &format!("user{i}"));
        ensure!(calls == 2, "user{i}: {calls} calls");
    }
    ensure!(server.requests() == 20, "{} calls", server.requests());
    let stats = enricher.stats();
    ensure!(stats.lookups == 160 && stats.calls == 20, "{stats:?}");
    ensure!(
        stats.joined + stats.cache_hits + stats.stored_hits == 150,
        "{stats:?}"
    );
    server.stop().await;
    Ok(())
}
