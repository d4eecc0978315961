//! `sift clean` on the embedded backends: what each kind of raw record
//! becomes, group members sharing the work, shutdown, and at-least-once
//! delivery through SIGKILLs of the real binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use sift::backends::log::{Log, Message, Offset, Record};
use sift::backends::objects::{EmbeddedObjects, ObjectStore, PutMode};
use sift::clean::language::LanguageDetector;
use sift::clean::{self, CleanSummary, Until};
use sift::envelope::{self, headers, topics, Envelope, SCHEMA_VERSION};

mod embedded;
use embedded::{config, open_log, read_all, spawn_stage, Kills};

fn open_objects(dir: &Path) -> Result<Arc<EmbeddedObjects>> {
    Ok(Arc::new(EmbeddedObjects::open(&dir.join("objects"))?))
}

fn envelope(source: &str, path: &str, title: &str, text: Option<&str>) -> Envelope {
    let url = format!("https://{source}.example.com{path}");
    Envelope {
        v: SCHEMA_VERSION,
        id: envelope::document_id(source, &url),
        source: source.into(),
        url,
        fetched_at_ms: 1_700_000_000_000,
        content_type: "text/html".into(),
        title: title.into(),
        text: text.map(str::to_string),
        body_uri: None,
        metadata: BTreeMap::new(),
    }
}

fn record(env: &Envelope) -> Result<Record> {
    embedded::raw_record(env)
}

fn header<'a>(m: &'a Message, name: &str) -> &'a str {
    m.header(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

const NEWS: &str = "The city council met on Tuesday evening to discuss the new budget \
    for public libraries, road repairs and the summer festival. Several residents \
    spoke about the closing of the old swimming pool, and the mayor promised a \
    decision before the end of the month after the engineers deliver their report.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleans_every_kind_of_record() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.clean.languages = vec!["eng".into()];
    cfg.ingest.claim_check_bytes = 3000;
    let log = open_log(dir.path())?;
    let objects = open_objects(dir.path())?;
    // One partition, so the near-duplicate window sees the records in this order.
    log.create_topic(topics::RAW, 1).await?;

    let plain_text = "The river flooded the lower town after three days of heavy rain, \
        and the council opened the school gym as a shelter for families.";
    let plain = envelope("test", "/plain", "Flood  in\tthe town", Some(plain_text));
    let nfkc = envelope(
        "test",
        "/nfkc",
        "Ｑｕａｒｔｅｒｌｙ ﬁnancial report",
        Some("The ﬁrm's ﬂagship store reported revenue of １２３ million dollars in the third quarter, up from last year."),
    );
    let control = envelope(
        "test",
        "/control",
        "Notice",
        Some("  Line one of the notice\u{7} is here.\r\n\r\n\r\n\tThe second  paragraph\u{0} follows\u{200b} after the break.\u{c}"),
    );
    let mut wrong_version = envelope("test", "/v2", "Future", Some(plain_text));
    wrong_version.v = 2;
    let claim_text = "Claim-checked bodies are fetched from the object store before they are \
        cleaned, like this one about the harbour cranes that were repainted in spring.  ";
    let mut claimed = envelope("test", "/claimed", "Cranes", None);
    let claim_key = format!("claims/{}/raw.txt", claimed.id);
    objects
        .put(&claim_key, Bytes::from(claim_text), PutMode::Overwrite)
        .await?;
    claimed.body_uri = Some(envelope::claim_uri(&claim_key));
    let mut missing = envelope("test", "/missing", "Missing", None);
    missing.body_uri = Some(envelope::claim_uri("claims/nothing/raw.txt"));
    let mut bad_claim = envelope("test", "/bad-claim", "Bad claim", None);
    bad_claim.body_uri = Some("https://elsewhere.example.com/body.txt".into());
    let short = envelope("test", "/short", "Short", Some("Too short."));
    let empty = envelope("test", "/empty", "Empty", Some(""));
    let a1 = envelope("a", "/one", "Council", Some(NEWS));
    // Same words, other case, punctuation and spacing: distance 0.
    let dup_text = NEWS.replace(", ", " -- ").replace("The city", "THE CITY  ");
    let a2 = envelope("a", "/two", "Council (copy)", Some(&dup_text));
    let b1 = envelope("b", "/one", "Council", Some(&dup_text));
    let updated_text = format!("{NEWS} Updated on Wednesday.");
    let a1_updated = envelope("a", "/one", "Council", Some(&updated_text));
    let french = envelope(
        "test",
        "/fr",
        "Conseil",
        Some("Le conseil municipal s'est réuni mardi soir pour discuter du nouveau budget des bibliothèques publiques et de la réparation des routes."),
    );
    let long_text: String = (0..40)
        .map(|i| format!("Sentence number {i} says that the harbour museum will open a new hall about fishing boats and their crews."))
        .collect::<Vec<_>>()
        .join(" ");
    let long = envelope("long", "/long", "Museum", Some(&long_text));

    let bad_json = Record::new("bad-json", "{\"v\": 1, \"id\": ").header(headers::SOURCE, "test");
    let records = vec![
        record(&plain)?,
        record(&nfkc)?,
        record(&control)?,
        bad_json.clone(),
        record(&wrong_version)?,
        record(&claimed)?,
        record(&missing)?,
        record(&bad_claim)?,
        record(&short)?,
        record(&empty)?,
        record(&a1)?,
        record(&a2)?,
        record(&b1)?,
        record(&a1_updated)?,
        record(&french)?,
        record(&long)?,
    ];
    log.produce(topics::RAW, records).await?;

    let s = clean::run(log.clone(), objects.clone(), &cfg, Until::caught_up()).await?;
    assert_eq!(s.consumed, 16, "{s:?}");
    assert_eq!(s.produced, 8, "{s:?}");
    assert_eq!(s.claim_checked, 1, "{s:?}");
    assert_eq!(
        s.dead_letters,
        counts(&[
            ("bad_claim", 1),
            ("bad_json", 1),
            ("claim_missing", 1),
            ("schema_version", 1),
            ("too_short", 2),
        ])
    );
    assert_eq!(s.dropped, counts(&[("language", 1), ("near_duplicate", 1)]));

    // sift.clean: keyed by id, headers set, metadata filled in.
    let out = read_all(log.as_ref(), topics::CLEAN).await?;
    assert_eq!(out.len(), 8);
    let mut by_id: BTreeMap<String, Vec<Envelope>> = BTreeMap::new();
    for m in &out {
        let env: Envelope = serde_json::from_slice(&m.value)?;
        assert_eq!(m.key.as_deref(), Some(env.id.as_bytes()));
        assert_eq!(header(m, headers::SOURCE), env.source);
        assert_eq!(header(m, headers::CONTENT_TYPE), "text/html");
        assert_eq!(header(m, headers::SCHEMA), SCHEMA_VERSION.to_string());
        assert_eq!(env.metadata["lang"], "eng", "{env:?}");
        // The default (fast) detector gives no confidence.
        assert!(!env.metadata.contains_key("lang_confidence"), "{env:?}");
        by_id.entry(env.id.clone()).or_default().push(env);
    }
    let one = |e: &Envelope| -> Result<Envelope> {
        let got = by_id.get(&e.id).context("not in sift.clean")?;
        ensure!(got.len() == 1, "{} copies of {}", got.len(), e.url);
        Ok(got[0].clone())
    };
    let text_of = |e: &Envelope| e.text.clone().unwrap_or_default();

    let got = one(&plain)?;
    assert_eq!(text_of(&got), plain_text);
    assert_eq!(got.title, "Flood in the town");
    assert_eq!(got.url, plain.url);
    assert_eq!(got.fetched_at_ms, plain.fetched_at_ms);
    assert_eq!(
        got.metadata["simhash"],
        format!("{:016x}", clean::simhash::simhash(plain_text))
    );
    let got = one(&nfkc)?;
    assert_eq!(got.title, "Quarterly financial report");
    assert_eq!(
        text_of(&got),
        "The firm's flagship store reported revenue of 123 million dollars in the third quarter, up from last year."
    );
    assert_eq!(
        text_of(&one(&control)?),
        "Line one of the notice is here.\n\nThe second paragraph follows after the break."
    );
    let got = one(&claimed)?;
    assert_eq!(text_of(&got), claim_text.trim());
    assert_eq!(got.body_uri, None);
    // The near-duplicate from another source is kept.
    assert_eq!(
        text_of(&one(&b1)?),
        dup_text.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    // a1 and its update (same id) are both kept, in order; a2 is not.
    let versions = &by_id[&a1.id];
    assert_eq!(versions.len(), 2);
    assert_eq!(
        text_of(&versions[0]),
        NEWS.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    assert_eq!(
        text_of(&versions[1]),
        updated_text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    for absent in [
        &a2,
        &french,
        &short,
        &empty,
        &missing,
        &bad_claim,
        &wrong_version,
    ] {
        assert!(!by_id.contains_key(&absent.id), "{}", absent.url);
    }
    // The long text went to the object store.
    let got = one(&long)?;
    assert_eq!(got.text, None);
    let uri = got.body_uri.context("a claim check")?;
    let key = envelope::claim_key(&uri).context("an objects: URI")?;
    assert!(
        key.starts_with(&format!("claims/{}/clean-", long.id)),
        "{key}"
    );
    assert!(key.ends_with(".txt"), "{key}");
    assert_eq!(objects.get(key).await?.1, Bytes::from(long_text.clone()));

    // sift.dlq: the originals, unchanged, with stage and reason.
    let dead = read_all(log.as_ref(), topics::DLQ).await?;
    assert_eq!(dead.len(), 6);
    let mut reasons = BTreeMap::new();
    for m in &dead {
        assert_eq!(header(m, headers::STAGE), "clean");
        let reason = header(m, headers::REASON);
        let code = reason.split(':').next().unwrap_or("");
        *reasons.entry(code.to_string()).or_insert(0u64) += 1;
        if code == "bad_json" {
            assert_eq!(m.value, bad_json.value);
            assert_eq!(m.key, bad_json.key);
        } else {
            let env: Envelope = serde_json::from_slice(&m.value)?;
            assert_eq!(m.key.as_deref(), Some(env.id.as_bytes()));
        }
    }
    assert_eq!(reasons, s.dead_letters);

    // Everything is committed: a second pass has nothing to do.
    let again = clean::run(log.clone(), objects.clone(), &cfg, Until::caught_up()).await?;
    assert_eq!(again.consumed, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_unknown_languages_in_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.clean.languages = vec!["en".into()];
    let err = clean::run(
        open_log(dir.path())?,
        open_objects(dir.path())?,
        &cfg,
        Until::caught_up(),
    )
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        err.contains("clean.languages") && err.contains("`en`"),
        "{err}"
    );
    // The message lists what the configured detector returns.
    assert!(
        err.contains("fast") && err.contains("deu, eng, fra"),
        "{err}"
    );

    // A language only the broad detector tells.
    cfg.clean.languages = vec!["pol".into()];
    let err = clean::run(
        open_log(dir.path())?,
        open_objects(dir.path())?,
        &cfg,
        Until::caught_up(),
    )
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("`pol`") && err.contains("broad"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broad_language_detector() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.clean.language_detector = LanguageDetector::Broad;
    // Polish is beyond the fast detector's 16 languages.
    cfg.clean.languages = vec!["pol".into(), "eng".into()];
    let log = open_log(dir.path())?;
    let objects = open_objects(dir.path())?;
    log.create_topic(topics::RAW, 1).await?;
    let polish_text = "Rada miejska zebrała się we wtorek wieczorem, aby omówić nowy budżet \
        bibliotek publicznych, naprawy dróg i letni festiwal.";
    let polish = envelope("test", "/pl", "Rada", Some(polish_text));
    let english = envelope("test", "/en", "Council", Some(NEWS));
    let german = envelope(
        "test",
        "/de",
        "Rat",
        Some("Der Stadtrat hat sich am Dienstagabend getroffen, um über den neuen Haushalt der öffentlichen Bibliotheken zu sprechen."),
    );
    log.produce(
        topics::RAW,
        vec![record(&polish)?, record(&english)?, record(&german)?],
    )
    .await?;

    let s = clean::run(log.clone(), objects.clone(), &cfg, Until::caught_up()).await?;
    assert_eq!(s.consumed, 3, "{s:?}");
    assert_eq!(s.produced, 2, "{s:?}");
    assert_eq!(s.dropped, counts(&[("language", 1)]));
    let mut langs = BTreeMap::new();
    for m in read_all(log.as_ref(), topics::CLEAN).await? {
        let env: Envelope = serde_json::from_slice(&m.value)?;
        let confidence = env.metadata["lang_confidence"]
            .as_f64()
            .context("lang_confidence is a number")?;
        assert!((0.0..=1.0).contains(&confidence), "{env:?}");
        langs.insert(env.url.clone(), env.metadata["lang"].clone());
    }
    assert_eq!(langs[&polish.url], "pol", "{langs:?}");
    assert_eq!(langs[&english.url], "eng", "{langs:?}");
    Ok(())
}

const WORDS: &[&str] = &[
    "river", "council", "budget", "harbour", "museum", "library", "station", "engineer", "summer",
    "festival", "report", "market", "bridge", "school", "village", "garden", "weather", "railway",
    "factory", "doctor", "teacher", "farmer", "island", "mountain", "window", "theatre", "concert",
    "journal", "letter", "visitor", "question", "answer", "morning", "evening", "winter", "autumn",
    "spring", "castle", "tower", "square", "street", "church", "hospital", "airport", "harvest",
    "planet", "ocean", "forest", "desert", "valley", "meadow", "orchard", "kitchen", "bakery",
    "painter", "writer", "sailor", "soldier", "captain", "student", "the", "a", "of", "and",
    "with", "near", "after", "before", "under", "over", "new", "old", "small", "large", "quiet",
    "busy",
];

/// A text of random words: any two are far apart in SimHash.
fn random_text(rng: &mut impl Rng, words: usize) -> String {
    let mut t: Vec<&str> = (0..words)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect();
    t.push("end.");
    t.join(" ")
}

async fn produce_random(
    log: &dyn Log,
    n: usize,
    seed: u64,
    words: usize,
) -> Result<BTreeSet<String>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ids = BTreeSet::new();
    let mut records = Vec::new();
    for i in 0..n {
        let text = random_text(&mut rng, words);
        let env = envelope(
            &format!("site{}", i % 3),
            &format!("/{seed}/{i}"),
            "Page",
            Some(&text),
        );
        ids.insert(env.id.clone());
        records.push(record(&env)?);
        if records.len() == 500 {
            log.produce(topics::RAW, std::mem::take(&mut records))
                .await?;
        }
    }
    log.produce(topics::RAW, records).await?;
    Ok(ids)
}

async fn clean_ids(log: &dyn Log) -> Result<BTreeSet<String>> {
    Ok(read_all(log, topics::CLEAN)
        .await?
        .iter()
        .map(|m| String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_share_the_work() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config(dir.path());
    cfg.clean.batch_size = 25;
    let log = open_log(dir.path())?;
    let objects = open_objects(dir.path())?;
    log.create_topic(topics::RAW, 4).await?;
    let ids = produce_random(log.as_ref(), 1000, 1, 40).await?;
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let (log, objects, cfg) = (log.clone(), objects.clone(), cfg.clone());
            tokio::spawn(async move { clean::run(log, objects, &cfg, Until::caught_up()).await })
        })
        .collect();
    let mut consumed = 0;
    for r in runs {
        let s = tokio::time::timeout(Duration::from_secs(120), r).await???;
        assert!(s.dead_letters.is_empty() && s.dropped.is_empty(), "{s:?}");
        consumed += s.consumed;
    }
    // Records of a batch that lost its partition in a rebalance come again.
    assert!(consumed >= 1000, "{consumed}");
    assert_eq!(clean_ids(log.as_ref()).await?, ids);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_and_commits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path());
    let log = open_log(dir.path())?;
    let objects = open_objects(dir.path())?;
    log.create_topic(topics::RAW, 2).await?;
    let first = produce_random(log.as_ref(), 300, 2, 30).await?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = {
        let (log, objects, cfg) = (log.clone(), objects.clone(), cfg.clone());
        tokio::spawn(async move {
            let until = Until::stopped_by(async {
                let _ = rx.await;
            });
            clean::run(log, objects, &cfg, until).await
        })
    };
    // Wait until the daemon has committed everything, then stop it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed: u64 = log
            .committed(&cfg.clean.group, topics::RAW)
            .await?
            .iter()
            .map(|(_, c)| {
                c.as_ref()
                    .map_or(0, |c| c.as_u64().expect("a dense offset"))
            })
            .sum();
        if committed == 300 {
            break;
        }
        ensure!(Instant::now() < deadline, "only {committed} committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tx.send(());
    let s: CleanSummary = tokio::time::timeout(Duration::from_secs(10), daemon).await???;
    assert_eq!(s.consumed, 300);
    assert_eq!(s.produced, 300);
    // A later run continues after the commit.
    let second = produce_random(log.as_ref(), 50, 3, 30).await?;
    let s = clean::run(log.clone(), objects, &cfg, Until::caught_up()).await?;
    assert_eq!(s.consumed, 50);
    let all: BTreeSet<String> = first.union(&second).cloned().collect();
    assert_eq!(clean_ids(log.as_ref()).await?, all);
    Ok(())
}

/// `sift clean` as a child process on the test's data dir.
fn sift_clean(dir: &Path, once: bool) -> Result<std::process::Child> {
    let config_file = dir.join("sift.toml");
    if !config_file.exists() {
        std::fs::write(&config_file, "")?;
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sift"));
    cmd.arg("--config")
        .arg(&config_file)
        .arg("--data-dir")
        .arg(dir)
        .arg("clean")
        .env("SIFT__TELEMETRY__METRICS_ADDR", "")
        .env("SIFT__CLEAN__BATCH_SIZE", "20");
    spawn_stage(&mut cmd, once)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_survives_sigkill() -> Result<()> {
    const RECORDS: usize = 3000;
    let dir = tempfile::tempdir()?;
    let ids = {
        let log = open_log(dir.path())?;
        log.create_topic(topics::RAW, 4).await?;
        produce_random(log.as_ref(), RECORDS, 4, 800).await?
    };
    // The test's log handle is gone; let its background flusher let go of the lock.
    std::thread::sleep(Duration::from_millis(300));

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let kills = rng.random_range(3..=5);
    let mut killed = Kills::new(RECORDS);
    for k in 0..kills {
        let mut child = sift_clean(dir.path(), false)?;
        let after = Duration::from_millis(rng.random_range(60..400));
        std::thread::sleep(after);
        let label = format!("kill {k} after {after:?}");
        killed
            .kill(&mut child, dir.path(), "sift-clean", topics::RAW, &label)
            .await?;
    }
    killed.check()?;

    let child = sift_clean(dir.path(), true)?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "sift clean --once failed: {}",
        out.status
    );
    let summary: CleanSummary = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    assert!(
        summary.dead_letters.is_empty() && summary.dropped.is_empty(),
        "{summary:?}"
    );

    let log = open_log(dir.path())?;
    assert_eq!(clean_ids(log.as_ref()).await?, ids);
    let committed: Vec<(u32, Option<Offset>)> = log.committed("sift-clean", topics::RAW).await?;
    let marks = log.watermarks(topics::RAW).await?;
    for w in marks {
        assert!(
            committed.contains(&(w.partition, Some(w.high))),
            "{committed:?}"
        );
    }
    let dead = read_all(log.as_ref(), topics::DLQ).await?;
    assert!(dead.is_empty(), "{} dead letters", dead.len());
    Ok(())
}
