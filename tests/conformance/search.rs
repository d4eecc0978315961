//! Conformance suite for [`SearchIndex`]: the behaviour every search backend
//! must have, embedded (tantivy) and real (Elasticsearch) alike.
//!
//! Scores are engine-specific, so only their order is checked. Index names get
//! a per-run suffix, so the suite can run again against a persistent server.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use sift::backends::search::*;

/// Runs every check against `s`.
pub async fn check_search(s: &dyn SearchIndex) {
    let suffix = unique_suffix();
    check_index_lifecycle(s, &suffix).await;
    check_documents_and_queries(s, &suffix).await;
    check_concurrent_writers(s, &suffix).await;
}

/// A person as the suite indexes it; the model the expected answers come from.
#[derive(Clone, Debug)]
struct Person {
    first: String,
    last: String,
    city: String,
    state: String,
    zip: String,
    birth_year: i64,
}

impl Person {
    fn source(&self) -> Map<String, Value> {
        let value = json!({
            "first": self.first,
            "last": self.last,
            "city": self.city,
            "state": self.state,
            "zip": self.zip,
            "birth_year": self.birth_year,
            "note": "not searchable, returned as stored",
        });
        match value {
            Value::Object(map) => map,
            _ => unreachable!("json! of an object literal is an object"),
        }
    }

    fn doc(&self, id: &str) -> SearchDoc {
        SearchDoc {
            id: id.to_owned(),
            source: self.source(),
        }
    }

    /// Whether a full-text match of `text` on `city` hits, with simple
    /// whitespace tokens (the suite only uses plain words).
    fn city_matches(&self, text: &str) -> bool {
        let city = self.city.to_lowercase();
        let city_tokens: Vec<&str> = city.split_whitespace().collect();
        text.to_lowercase()
            .split_whitespace()
            .any(|t| city_tokens.contains(&t))
    }
}

fn person_spec(name: &str) -> IndexSpec {
    let field = |name: &str, kind| FieldSpec {
        name: name.to_owned(),
        kind,
    };
    IndexSpec {
        name: name.to_owned(),
        fields: vec![
            field("first", FieldKind::Text),
            field("last", FieldKind::Text),
            field("city", FieldKind::Text),
            field("state", FieldKind::Keyword),
            field("zip", FieldKind::Keyword),
            field("birth_year", FieldKind::Integer),
        ],
    }
}

/// 200 generated people (`p000`..`p199`) plus a few with names that specific checks rely on.
fn people() -> Vec<(String, Person)> {
    const FIRST: [&str; 10] = [
        "James",
        "Mary",
        "John",
        "Patricia",
        "Robert",
        "Jennifer",
        "Michael",
        "Linda",
        "William",
        "Elizabeth",
    ];
    const LAST: [&str; 20] = [
        "Smith", "Jones", "Brown", "Miller", "Davis", "Garcia", "Wilson", "Moore", "Taylor",
        "Clark", "Lewis", "Walker", "Hall", "Young", "Allen", "King", "Wright", "Scott", "Green",
        "Baker",
    ];
    const CITY: [&str; 10] = [
        "Springfield",
        "Riverside",
        "Franklin",
        "Lake Heights",
        "Bristol",
        "North Springfield",
        "Fairview",
        "Salem",
        "Madison",
        "Georgetown",
    ];
    const STATE: [&str; 5] = ["IL", "CA", "TX", "NY", "OH"];
    const ZIP: [&str; 6] = ["62701", "90210", "73301", "10001", "43004", "62702"];
    let person = |first: &str, last: &str, city: &str, state: &str, zip: &str, year: i64| Person {
        first: first.to_owned(),
        last: last.to_owned(),
        city: city.to_owned(),
        state: state.to_owned(),
        zip: zip.to_owned(),
        birth_year: year,
    };
    let mut all: Vec<(String, Person)> = (0..200usize)
        .map(|i| {
            let p = person(
                FIRST[i % 10],
                LAST[(i / 10) % 20],
                CITY[(i / 3) % 10],
                STATE[i % 5],
                ZIP[i % 6],
                1940 + ((i * 7) % 70) as i64,
            );
            (format!("p{i:03}"), p)
        })
        .collect();
    all.push((
        "fz1".to_owned(),
        person("Margaret", "Fitzgerald", "Dublin", "OH", "43017", 1975),
    ));
    all.push((
        "top1".to_owned(),
        person("Zelda", "Quinn", "Springfield Heights", "IL", "62701", 1990),
    ));
    all
}

async fn check_index_lifecycle(s: &dyn SearchIndex, suffix: &str) {
    let name = format!("sift-conf-life-{suffix}");
    let spec = person_spec(&name);
    s.ensure_index(&spec).await.expect("creating an index");
    s.ensure_index(&spec)
        .await
        .expect("ensure_index is idempotent");

    let mut reordered = spec.clone();
    reordered.fields.reverse();
    s.ensure_index(&reordered)
        .await
        .expect("field order does not matter");

    let mut different = spec.clone();
    different.fields[0].kind = FieldKind::Keyword;
    let err = s.ensure_index(&different).await;
    assert!(
        matches!(err, Err(SearchError::SchemaMismatch { .. })),
        "changing a field's kind must be a SchemaMismatch, got {err:?}"
    );
    let mut extra = spec.clone();
    extra.fields.push(FieldSpec {
        name: "email".to_owned(),
        kind: FieldKind::Keyword,
    });
    let err = s.ensure_index(&extra).await;
    assert!(
        matches!(err, Err(SearchError::SchemaMismatch { .. })),
        "adding a field must be a SchemaMismatch, got {err:?}"
    );

    let err = s.ensure_index(&person_spec("Not A Valid Name!")).await;
    assert!(
        matches!(err, Err(SearchError::InvalidName(_))),
        "an invalid name must be rejected, got {err:?}"
    );
    let err = s.count(&format!("sift-conf-missing-{suffix}")).await;
    assert!(
        matches!(err, Err(SearchError::NoSuchIndex(_))),
        "a missing index must be NoSuchIndex, got {err:?}"
    );
}

async fn check_documents_and_queries(s: &dyn SearchIndex, suffix: &str) {
    let name = format!("sift-conf-people-{suffix}");
    let index = name.as_str();
    s.ensure_index(&person_spec(index))
        .await
        .expect("creating the people index");

    // Bulk: good documents are indexed, badly typed ones are reported.
    let mut model: HashMap<String, Person> = people().into_iter().collect();
    let mut docs: Vec<SearchDoc> = people().iter().map(|(id, p)| p.doc(id)).collect();
    let mut bad_year = model["p001"].source();
    bad_year.insert("birth_year".to_owned(), json!("not-a-year"));
    docs.insert(
        50,
        SearchDoc {
            id: "bad-year".to_owned(),
            source: bad_year,
        },
    );
    let mut bad_city = model["p002"].source();
    bad_city.insert("city".to_owned(), json!({ "name": "Springfield" }));
    docs.push(SearchDoc {
        id: "bad-city".to_owned(),
        source: bad_city,
    });
    let report = s.bulk(index, docs).await.expect("bulk indexing");
    assert_eq!(report.indexed, model.len(), "documents indexed: {report:?}");
    let failed: BTreeSet<&str> = report.failed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        failed,
        BTreeSet::from(["bad-city", "bad-year"]),
        "badly typed documents are reported: {report:?}"
    );
    assert!(
        report.failed.iter().all(|(_, reason)| !reason.is_empty()),
        "each failure says why: {report:?}"
    );
    s.refresh(index).await.expect("refresh");
    assert_eq!(count(s, index).await, model.len() as u64);

    // Get by id returns the source as sent, extra fields included.
    let got = s
        .get(index, "p007")
        .await
        .expect("get")
        .expect("p007 exists");
    assert_eq!(got.id, "p007");
    assert_eq!(got.source, model["p007"].source());
    assert_eq!(s.get(index, "no-such-id").await.expect("get missing"), None);
    assert_eq!(
        s.get(index, "bad-year").await.expect("get failed doc"),
        None
    );

    // Indexing an id again replaces the document.
    let mut moved = model["p007"].clone();
    moved.city = "Newtown".to_owned();
    let report = s
        .bulk(index, vec![moved.doc("p007")])
        .await
        .expect("re-indexing p007");
    assert_eq!(report.indexed, 1);
    model.insert("p007".to_owned(), moved);
    s.refresh(index).await.expect("refresh");
    assert_eq!(
        count(s, index).await,
        model.len() as u64,
        "upsert keeps the count"
    );
    let got = s
        .get(index, "p007")
        .await
        .expect("get")
        .expect("p007 exists");
    assert_eq!(got.source["city"], json!("Newtown"));
    let newtown = search(s, index, query(vec![term("city", json!("newtown"))], 10)).await;
    assert_eq!(ids(&newtown), vec!["p007"], "the new value is searchable");

    // Delete.
    s.delete(index, "p008").await.expect("delete");
    s.delete(index, "never-existed")
        .await
        .expect("deleting a missing id is not an error");
    model.remove("p008");
    s.refresh(index).await.expect("refresh");
    assert_eq!(s.get(index, "p008").await.expect("get deleted"), None);
    assert_eq!(count(s, index).await, model.len() as u64);

    let all = model.len();
    let expect = |pred: &dyn Fn(&Person) -> bool| -> BTreeSet<String> {
        model
            .iter()
            .filter(|(_, p)| pred(p))
            .map(|(id, _)| id.clone())
            .collect()
    };

    // Exact terms: keyword values are case-sensitive; integers match exactly.
    let il = search(s, index, query(vec![term("state", json!("IL"))], all)).await;
    assert_eq!(id_set(&il), expect(&|p| p.state == "IL"));
    let lower = search(s, index, query(vec![term("state", json!("il"))], all)).await;
    assert!(
        lower.is_empty(),
        "keyword terms are exact: {:?}",
        ids(&lower)
    );
    let year = search(s, index, query(vec![term("birth_year", json!(1975))], all)).await;
    assert_eq!(id_set(&year), expect(&|p| p.birth_year == 1975));
    assert!(!year.is_empty());

    // Fuzzy: one substitution, one transposition, and not three edits.
    let fuzzy = |value: &str, max_edits: u8| {
        query(
            vec![Clause::Fuzzy {
                field: "last".to_owned(),
                value: value.to_owned(),
                max_edits,
                boost: 1.0,
            }],
            all,
        )
    };
    let typo = search(s, index, fuzzy("fitzgerold", 1)).await;
    assert!(
        ids(&typo).contains(&"fz1"),
        "one edit away: {:?}",
        ids(&typo)
    );
    let swapped = search(s, index, fuzzy("fitzgreald", 1)).await;
    assert!(
        ids(&swapped).contains(&"fz1"),
        "a transposition is one edit: {:?}",
        ids(&swapped)
    );
    let far = search(s, index, fuzzy("fatzgaralt", 2)).await;
    assert!(
        !ids(&far).contains(&"fz1"),
        "three edits away must not match with max_edits 2: {:?}",
        ids(&far)
    );

    // Full-text match: any token, case-insensitive.
    let text = "SPRINGFIELD heights";
    let matched = search(s, index, query(vec![match_text("city", text)], all)).await;
    assert_eq!(id_set(&matched), expect(&|p| p.city_matches(text)));
    assert_eq!(
        matched.first().map(|h| h.id.as_str()),
        Some("top1"),
        "the only city with both tokens ranks first"
    );

    // A filter restricts the hits and leaves the order of the rest alone.
    let base = query(vec![match_text("city", "springfield")], all);
    let unfiltered = search(s, index, base.clone()).await;
    let mut filtered_query = base;
    filtered_query.filter = vec![term("state", json!("IL"))];
    let filtered = search(s, index, filtered_query).await;
    let expected: Vec<&str> = unfiltered
        .iter()
        .filter(|h| model[&h.id].state == "IL")
        .map(|h| h.id.as_str())
        .collect();
    assert!(
        !expected.is_empty() && expected.len() < unfiltered.len(),
        "the filter must keep some hits and drop others: {:?}",
        ids(&unfiltered)
    );
    assert_eq!(
        ids(&filtered),
        expected,
        "filter keeps the unfiltered order"
    );
    // A filter alone matches without needing a scored clause.
    let only_filter = Query {
        filter: vec![term("state", json!("TX"))],
        k: all,
        ..Query::default()
    };
    let tx = search(s, index, only_filter).await;
    assert_eq!(id_set(&tx), expect(&|p| p.state == "TX"));

    // Ranges are inclusive at both ends; either end may be open.
    let range = |gte, lte| Clause::Range {
        field: "birth_year".to_owned(),
        gte,
        lte,
    };
    let eighties = search(s, index, query(vec![range(Some(1980), Some(1989))], all)).await;
    assert_eq!(
        id_set(&eighties),
        expect(&|p| (1980..=1989).contains(&p.birth_year))
    );
    let late = search(s, index, query(vec![range(Some(2000), None)], all)).await;
    assert_eq!(id_set(&late), expect(&|p| p.birth_year >= 2000));
    let early = search(s, index, query(vec![range(None, Some(1945))], all)).await;
    assert_eq!(id_set(&early), expect(&|p| p.birth_year <= 1945));
    assert!(!late.is_empty() && !early.is_empty());

    // min_should_match.
    let should = vec![
        term("state", json!("IL")),
        term("zip", json!("62701")),
        match_text("city", "springfield"),
    ];
    let two_of_three = Query {
        should: should.clone(),
        min_should_match: 2,
        k: all,
        ..Query::default()
    };
    let hits = search(s, index, two_of_three).await;
    let matches_count = |p: &Person| {
        usize::from(p.state == "IL")
            + usize::from(p.zip == "62701")
            + usize::from(p.city_matches("springfield"))
    };
    assert_eq!(id_set(&hits), expect(&|p| matches_count(p) >= 2));
    let any = Query {
        should,
        k: all,
        ..Query::default()
    };
    let hits = search(s, index, any).await;
    assert_eq!(
        id_set(&hits),
        expect(&|p| matches_count(p) >= 1),
        "with only should clauses, one must match"
    );

    // Top-k: k is respected, scores descend, more matching clauses rank higher.
    let clauses = vec![
        term("first", json!("zelda")),
        term("state", json!("IL")),
        term("zip", json!("62701")),
    ];
    let matched_clauses = |p: &Person| {
        usize::from(p.first == "Zelda")
            + usize::from(p.state == "IL")
            + usize::from(p.zip == "62701")
    };
    let top = search(
        s,
        index,
        Query {
            should: clauses,
            k: 10,
            ..Query::default()
        },
    )
    .await;
    assert_eq!(top.len(), 10, "k limits the hits");
    assert_eq!(
        top[0].id, "top1",
        "the doc matching every clause ranks first"
    );
    assert_descending(&top);
    let counts: Vec<usize> = top.iter().map(|h| matched_clauses(&model[&h.id])).collect();
    assert!(
        counts.windows(2).all(|w| w[0] >= w[1]),
        "docs matching more should clauses rank above those matching fewer: {counts:?} for {:?}",
        ids(&top)
    );
    assert!(counts.contains(&2) && counts.contains(&1), "{counts:?}");
    let three = search(s, index, query(vec![term("state", json!("IL"))], 3)).await;
    assert_eq!(three.len(), 3);

    // Boost: a boosted clause outranks an unboosted one.
    let boosted = Query {
        should: vec![
            term("state", json!("IL")),
            Clause::Term {
                field: "state".to_owned(),
                value: json!("TX"),
                boost: 10.0,
            },
        ],
        k: all,
        ..Query::default()
    };
    let hits = search(s, index, boosted).await;
    let states: Vec<&str> = hits.iter().map(|h| model[&h.id].state.as_str()).collect();
    let first_il = states.iter().position(|s| *s == "IL").expect("IL hits");
    assert!(
        states[..first_il].iter().all(|s| *s == "TX")
            && states[first_il..].iter().all(|s| *s == "IL"),
        "boosted TX hits come before IL hits: {states:?}"
    );

    // Hits carry the stored source.
    let hit = &search(s, index, query(vec![term("zip", json!("43017"))], 1)).await[0];
    assert_eq!(hit.id, "fz1");
    assert_eq!(hit.source, model["fz1"].source());

    // Queries on unknown fields or with wrong types are refused.
    for bad in [
        query(vec![term("no_such_field", json!("x"))], 10),
        query(vec![term("birth_year", json!("nineteen"))], 10),
        query(
            vec![Clause::Range {
                field: "state".to_owned(),
                gte: Some(1),
                lte: None,
            }],
            10,
        ),
    ] {
        let err = s.search(index, &bad).await;
        assert!(
            matches!(err, Err(SearchError::BadField { .. })),
            "{bad:?} must be BadField, got {err:?}"
        );
    }
}

async fn check_concurrent_writers(s: &dyn SearchIndex, suffix: &str) {
    let name = format!("sift-conf-conc-{suffix}");
    let index = name.as_str();
    s.ensure_index(&person_spec(index))
        .await
        .expect("creating the concurrency index");
    let template = people()[0].1.clone();
    let writer = |w: usize| {
        let template = template.clone();
        async move {
            for batch in 0..5 {
                let docs = (0..10)
                    .map(|j| template.doc(&format!("w{w}-{batch}-{j}")))
                    .collect();
                let report = s.bulk(index, docs).await.expect("concurrent bulk");
                assert_eq!(report.indexed, 10, "{report:?}");
            }
        }
    };
    tokio::join!(writer(0), writer(1), writer(2), writer(3));
    s.refresh(index).await.expect("refresh");
    assert_eq!(count(s, index).await, 4 * 5 * 10);
    for w in 0..4 {
        for batch in 0..5 {
            for j in 0..10 {
                let id = format!("w{w}-{batch}-{j}");
                assert!(
                    s.get(index, &id).await.expect("get").is_some(),
                    "{id} is present"
                );
            }
        }
    }
}

fn term(field: &str, value: Value) -> Clause {
    Clause::Term {
        field: field.to_owned(),
        value,
        boost: 1.0,
    }
}

fn match_text(field: &str, text: &str) -> Clause {
    Clause::Match {
        field: field.to_owned(),
        text: text.to_owned(),
        boost: 1.0,
    }
}

fn query(must: Vec<Clause>, k: usize) -> Query {
    Query {
        must,
        k,
        ..Query::default()
    }
}

async fn search(s: &dyn SearchIndex, index: &str, q: Query) -> Vec<Hit> {
    s.search(index, &q)
        .await
        .unwrap_or_else(|e| panic!("search {q:?} failed: {e}"))
}

async fn count(s: &dyn SearchIndex, index: &str) -> u64 {
    s.count(index).await.expect("count")
}

fn ids(hits: &[Hit]) -> Vec<&str> {
    hits.iter().map(|h| h.id.as_str()).collect()
}

fn id_set(hits: &[Hit]) -> BTreeSet<String> {
    let set: BTreeSet<String> = hits.iter().map(|h| h.id.clone()).collect();
    assert_eq!(set.len(), hits.len(), "no id is returned twice");
    set
}

fn assert_descending(hits: &[Hit]) {
    assert!(
        hits.windows(2).all(|w| w[0].score >= w[1].score),
        "scores descend: {:?}",
        hits.iter().map(|h| (&h.id, h.score)).collect::<Vec<_>>()
    );
}

/// A suffix that differs between runs and between calls in one run.
fn unique_suffix() -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        CALLS.fetch_add(1, Ordering::Relaxed)
    )
}
