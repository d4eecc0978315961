//! Conformance suite of the `SearchIndex` trait: the behaviour every search
//! backend must have, embedded (tantivy) and real (Elasticsearch) alike.
//!
//! Scores are engine-specific, so only their order is checked.

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use sift::backends::search::*;

use super::unique;

/// Runs every check.
pub async fn check_search(s: &dyn SearchIndex) -> Result<()> {
    index_lifecycle(s).await.context("index lifecycle")?;
    documents_and_queries(s)
        .await
        .context("documents and queries")?;
    concurrent_writers(s).await.context("concurrent writers")?;
    bulk_load(s).await.context("bulk load")?;
    Ok(())
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
        let mut source = Map::new();
        source.insert("first".into(), json!(self.first));
        source.insert("last".into(), json!(self.last));
        source.insert("city".into(), json!(self.city));
        source.insert("state".into(), json!(self.state));
        source.insert("zip".into(), json!(self.zip));
        source.insert("birth_year".into(), json!(self.birth_year));
        source.insert("note".into(), json!("not searchable, returned as stored"));
        source
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
        source_excludes: Vec::new(),
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

/// 200 generated people (`p000`..`p199`) plus two whose names specific checks rely on.
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

async fn index_lifecycle(s: &dyn SearchIndex) -> Result<()> {
    let name = unique("sift-conf-life");
    let spec = person_spec(&name);
    s.ensure_index(&spec).await.context("creating an index")?;
    s.ensure_index(&spec)
        .await
        .context("ensure_index must be idempotent")?;
    let mut reordered = spec.clone();
    reordered.fields.reverse();
    s.ensure_index(&reordered)
        .await
        .context("the order of fields must not matter")?;

    let mut different = spec.clone();
    different.fields[0].kind = FieldKind::Keyword;
    let err = s.ensure_index(&different).await;
    ensure!(
        matches!(err, Err(SearchError::SchemaMismatch { .. })),
        "changing a field's kind must be a SchemaMismatch, got {err:?}"
    );
    let mut extra = spec.clone();
    extra.fields.push(FieldSpec {
        name: "email".to_owned(),
        kind: FieldKind::Keyword,
    });
    let err = s.ensure_index(&extra).await;
    ensure!(
        matches!(err, Err(SearchError::SchemaMismatch { .. })),
        "adding a field must be a SchemaMismatch, got {err:?}"
    );

    // Dropping rebuilds: the documents go with the index, the new fields hold.
    let doc = SearchDoc {
        id: "p1".to_owned(),
        source: json!({ "first": "Ada", "last": "Lovelace" })
            .as_object()
            .cloned()
            .context("an object")?,
    };
    s.bulk(&name, vec![doc]).await?;
    s.refresh(&name).await?;
    ensure!(s.count(&name).await? == 1, "one document before the drop");
    ensure!(
        s.drop_index(&name).await?,
        "dropping an index that exists says so"
    );
    let err = s.count(&name).await;
    ensure!(
        matches!(err, Err(SearchError::NoSuchIndex(_))),
        "a dropped index must be gone, got {err:?}"
    );
    ensure!(
        !s.drop_index(&name).await?,
        "dropping it again is false, not an error"
    );
    s.ensure_index(&extra)
        .await
        .context("after a drop, the index is made with the new fields")?;
    ensure!(s.count(&name).await? == 0, "the rebuilt index starts empty");
    ensure!(s.drop_index(&name).await?);

    let err = s.ensure_index(&person_spec("Not A Valid Name!")).await;
    ensure!(
        matches!(err, Err(SearchError::InvalidName(_))),
        "an invalid name must be rejected, got {err:?}"
    );
    let err = s.count(&unique("sift-conf-missing")).await;
    ensure!(
        matches!(err, Err(SearchError::NoSuchIndex(_))),
        "a missing index must be NoSuchIndex, got {err:?}"
    );
    Ok(())
}

async fn documents_and_queries(s: &dyn SearchIndex) -> Result<()> {
    let name = unique("sift-conf-people");
    let index = name.as_str();
    s.ensure_index(&person_spec(index)).await?;

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
    let report = s.bulk(index, docs).await.context("bulk indexing")?;
    ensure!(
        report.indexed == model.len(),
        "{} documents should be indexed: {report:?}",
        model.len()
    );
    let failed: BTreeSet<&str> = report.failed.iter().map(|(id, _)| id.as_str()).collect();
    ensure!(
        failed == BTreeSet::from(["bad-city", "bad-year"]),
        "the badly typed documents, and only they, are reported: {report:?}"
    );
    ensure!(
        report.failed.iter().all(|(_, reason)| !reason.is_empty()),
        "each failure says why: {report:?}"
    );
    s.refresh(index).await?;
    expect_count(s, index, model.len()).await?;

    // Get by id returns the source as sent, extra fields included.
    let got = s.get(index, "p007").await?.context("p007 must exist")?;
    ensure!(got.id == "p007", "get returned {got:?}");
    ensure!(
        got.source == model["p007"].source(),
        "get returns the source as sent: {got:?}"
    );
    ensure!(s.get(index, "no-such-id").await?.is_none());
    ensure!(
        s.get(index, "bad-year").await?.is_none(),
        "a rejected document is not stored"
    );

    // Indexing an id again replaces the document.
    let mut moved = model["p007"].clone();
    moved.city = "Newtown".to_owned();
    let report = s.bulk(index, vec![moved.doc("p007")]).await?;
    ensure!(report.indexed == 1, "re-indexing p007: {report:?}");
    model.insert("p007".to_owned(), moved);
    s.refresh(index).await?;
    expect_count(s, index, model.len())
        .await
        .context("an upsert keeps the count")?;
    let got = s.get(index, "p007").await?.context("p007 must exist")?;
    ensure!(
        got.source["city"] == json!("Newtown"),
        "get returns the new value: {got:?}"
    );
    let newtown = search(s, index, query(vec![term("city", json!("newtown"))], 10)).await?;
    ensure!(
        ids(&newtown) == ["p007"],
        "the new value is searchable: {:?}",
        ids(&newtown)
    );

    // Delete.
    s.delete(index, "p008").await?;
    s.delete(index, "never-existed")
        .await
        .context("deleting a missing id is not an error")?;
    model.remove("p008");
    s.refresh(index).await?;
    ensure!(s.get(index, "p008").await?.is_none(), "p008 was deleted");
    expect_count(s, index, model.len()).await?;

    let all = model.len();
    let expect = |pred: &dyn Fn(&Person) -> bool| -> BTreeSet<String> {
        model
            .iter()
            .filter(|(_, p)| pred(p))
            .map(|(id, _)| id.clone())
            .collect()
    };

    // Exact terms: keyword values are case-sensitive; integers match exactly.
    let il = search(s, index, query(vec![term("state", json!("IL"))], all)).await?;
    same_ids(&il, &expect(&|p| p.state == "IL")).context("term on a keyword")?;
    let lower = search(s, index, query(vec![term("state", json!("il"))], all)).await?;
    ensure!(
        lower.is_empty(),
        "keyword terms are exact: {:?}",
        ids(&lower)
    );
    let year = search(s, index, query(vec![term("birth_year", json!(1975))], all)).await?;
    ensure!(!year.is_empty());
    same_ids(&year, &expect(&|p| p.birth_year == 1975)).context("term on an integer")?;

    // Counting what a query matches: exact, after upserts and deletes, and
    // the same documents a search without a limit returns.
    let counted: Vec<(&str, Query, BTreeSet<String>)> = vec![
        ("everything", Query::default(), expect(&|_| true)),
        (
            "a keyword term",
            query(vec![term("state", json!("IL"))], 0),
            expect(&|p| p.state == "IL"),
        ),
        (
            "two filters",
            Query {
                filter: vec![term("state", json!("TX")), term("zip", json!("73301"))],
                ..Query::default()
            },
            expect(&|p| p.state == "TX" && p.zip == "73301"),
        ),
        (
            "a text token and an integer range",
            Query {
                must: vec![match_text("city", "springfield")],
                filter: vec![Clause::Range {
                    field: "birth_year".to_owned(),
                    gte: Some(1950),
                    lte: Some(1980),
                }],
                ..Query::default()
            },
            expect(&|p| p.city_matches("springfield") && (1950..=1980).contains(&p.birth_year)),
        ),
        (
            "the replaced value",
            query(vec![term("city", json!("newtown"))], 0),
            expect(&|p| p.city == "Newtown"),
        ),
        (
            "more should clauses required than given",
            Query {
                should: vec![term("state", json!("IL"))],
                min_should_match: 2,
                ..Query::default()
            },
            BTreeSet::new(),
        ),
    ];
    for (what, q, expected) in counted {
        let n = s.count_matching(index, &q).await.context(what)?;
        ensure!(
            n == expected.len() as u64,
            "{what}: count_matching says {n}, the model {}",
            expected.len()
        );
        let hits = search(s, index, Query { k: all + 10, ..q }).await?;
        same_ids(&hits, &expected).with_context(|| format!("{what}: the search"))?;
    }

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
    let typo = search(s, index, fuzzy("fitzgerold", 1)).await?;
    ensure!(
        ids(&typo).contains(&"fz1"),
        "one edit away must match: {:?}",
        ids(&typo)
    );
    let swapped = search(s, index, fuzzy("fitzgreald", 1)).await?;
    ensure!(
        ids(&swapped).contains(&"fz1"),
        "a transposition is one edit: {:?}",
        ids(&swapped)
    );
    let far = search(s, index, fuzzy("fatzgaralt", 2)).await?;
    ensure!(
        !ids(&far).contains(&"fz1"),
        "three edits away must not match with max_edits 2: {:?}",
        ids(&far)
    );

    // Full-text match: any token, case-insensitive.
    let text = "SPRINGFIELD heights";
    let matched = search(s, index, query(vec![match_text("city", text)], all)).await?;
    same_ids(&matched, &expect(&|p| p.city_matches(text))).context("match")?;
    ensure!(
        matched.first().map(|h| h.id.as_str()) == Some("top1"),
        "the only city with both tokens ranks first: {:?}",
        ids(&matched)
    );

    // A filter restricts the hits and leaves the order of the rest alone.
    let base = query(vec![match_text("city", "springfield")], all);
    let unfiltered = search(s, index, base.clone()).await?;
    let mut filtered_query = base;
    filtered_query.filter = vec![term("state", json!("IL"))];
    let filtered = search(s, index, filtered_query).await?;
    let expected: Vec<&str> = unfiltered
        .iter()
        .filter(|h| model[&h.id].state == "IL")
        .map(|h| h.id.as_str())
        .collect();
    ensure!(
        !expected.is_empty() && expected.len() < unfiltered.len(),
        "the filter must keep some hits and drop others: {:?}",
        ids(&unfiltered)
    );
    ensure!(
        ids(&filtered) == expected,
        "a filter keeps the unfiltered order: got {:?}, expected {expected:?}",
        ids(&filtered)
    );
    // A filter alone matches without a scored clause.
    let only_filter = Query {
        filter: vec![term("state", json!("TX"))],
        k: all,
        ..Query::default()
    };
    let tx = search(s, index, only_filter).await?;
    same_ids(&tx, &expect(&|p| p.state == "TX")).context("filter only")?;

    // Ranges are inclusive at both ends; either end may be open.
    let range = |gte, lte| Clause::Range {
        field: "birth_year".to_owned(),
        gte,
        lte,
    };
    let eighties = search(s, index, query(vec![range(Some(1980), Some(1989))], all)).await?;
    same_ids(
        &eighties,
        &expect(&|p| (1980..=1989).contains(&p.birth_year)),
    )
    .context("closed range")?;
    let late = search(s, index, query(vec![range(Some(2000), None)], all)).await?;
    ensure!(!late.is_empty());
    same_ids(&late, &expect(&|p| p.birth_year >= 2000)).context("range without upper bound")?;
    let early = search(s, index, query(vec![range(None, Some(1945))], all)).await?;
    ensure!(!early.is_empty());
    same_ids(&early, &expect(&|p| p.birth_year <= 1945)).context("range without lower bound")?;

    // min_should_match.
    let should = vec![
        term("state", json!("IL")),
        term("zip", json!("62701")),
        match_text("city", "springfield"),
    ];
    let matching = |p: &Person| {
        usize::from(p.state == "IL")
            + usize::from(p.zip == "62701")
            + usize::from(p.city_matches("springfield"))
    };
    let two_of_three = Query {
        should: should.clone(),
        min_should_match: 2,
        k: all,
        ..Query::default()
    };
    let hits = search(s, index, two_of_three).await?;
    same_ids(&hits, &expect(&|p| matching(p) >= 2)).context("min_should_match 2")?;
    let any = Query {
        should,
        k: all,
        ..Query::default()
    };
    let hits = search(s, index, any).await?;
    same_ids(&hits, &expect(&|p| matching(p) >= 1))
        .context("with only should clauses, one must match")?;

    // Top-k: k is respected, scores descend, more matching clauses rank higher.
    let matched_clauses = |p: &Person| {
        usize::from(p.first == "Zelda")
            + usize::from(p.state == "IL")
            + usize::from(p.zip == "62701")
    };
    let ranked = Query {
        should: vec![
            term("first", json!("zelda")),
            term("state", json!("IL")),
            term("zip", json!("62701")),
        ],
        k: 10,
        ..Query::default()
    };
    let top = search(s, index, ranked).await?;
    ensure!(top.len() == 10, "k limits the hits: {:?}", ids(&top));
    ensure!(
        top[0].id == "top1",
        "the doc matching every clause ranks first: {:?}",
        ids(&top)
    );
    ensure!(
        top.windows(2).all(|w| w[0].score >= w[1].score),
        "scores descend: {:?}",
        top.iter().map(|h| (&h.id, h.score)).collect::<Vec<_>>()
    );
    let counts: Vec<usize> = top.iter().map(|h| matched_clauses(&model[&h.id])).collect();
    ensure!(
        counts.windows(2).all(|w| w[0] >= w[1]) && counts.contains(&2) && counts.contains(&1),
        "docs matching more should clauses rank above those matching fewer: \
         {counts:?} for {:?}",
        ids(&top)
    );
    let three = search(s, index, query(vec![term("state", json!("IL"))], 3)).await?;
    ensure!(three.len() == 3, "k = 3 gave {:?}", ids(&three));

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
    let hits = search(s, index, boosted).await?;
    let states: Vec<&str> = hits.iter().map(|h| model[&h.id].state.as_str()).collect();
    let first_il = states.iter().position(|s| *s == "IL").context("IL hits")?;
    ensure!(
        first_il > 0
            && states[..first_il].iter().all(|s| *s == "TX")
            && states[first_il..].iter().all(|s| *s == "IL"),
        "boosted TX hits come before IL hits: {states:?}"
    );

    // Hits carry the stored source.
    let hits = search(s, index, query(vec![term("zip", json!("43017"))], 1)).await?;
    let Some(hit) = hits.first() else {
        bail!("zip 43017 found nothing");
    };
    ensure!(
        hit.id == "fz1" && hit.source == model["fz1"].source(),
        "hit {hit:?}"
    );

    // Queries on unknown fields or with wrong types are refused.
    let wrong_kind = Clause::Range {
        field: "state".to_owned(),
        gte: Some(1),
        lte: None,
    };
    for bad in [
        query(vec![term("no_such_field", json!("x"))], 10),
        query(vec![term("birth_year", json!("nineteen"))], 10),
        query(vec![wrong_kind], 10),
    ] {
        let err = s.search(index, &bad).await;
        ensure!(
            matches!(err, Err(SearchError::BadField { .. })),
            "{bad:?} must be BadField, got {err:?}"
        );
    }
    Ok(())
}

async fn concurrent_writers(s: &dyn SearchIndex) -> Result<()> {
    const WRITERS: usize = 4;
    const BATCHES: usize = 5;
    const PER_BATCH: usize = 10;
    let name = unique("sift-conf-conc");
    let index = name.as_str();
    s.ensure_index(&person_spec(index)).await?;
    let template = people()[0].1.clone();
    let writer = |w: usize| {
        let template = template.clone();
        async move {
            for batch in 0..BATCHES {
                let docs = (0..PER_BATCH)
                    .map(|j| template.doc(&format!("w{w}-{batch}-{j}")))
                    .collect();
                let report = s.bulk(index, docs).await?;
                ensure!(report.indexed == PER_BATCH, "{report:?}");
            }
            Ok(())
        }
    };
    let results = tokio::join!(writer(0), writer(1), writer(2), writer(3));
    for result in [results.0, results.1, results.2, results.3] {
        result?;
    }
    s.refresh(index).await?;
    expect_count(s, index, WRITERS * BATCHES * PER_BATCH).await?;
    for w in 0..WRITERS {
        for batch in 0..BATCHES {
            for j in 0..PER_BATCH {
                let id = format!("w{w}-{batch}-{j}");
                ensure!(s.get(index, &id).await?.is_some(), "{id} is missing");
            }
        }
    }
    Ok(())
}

/// begin → bulk → end: the documents are all there afterwards, and the
/// settings a bulk load changes are back to what they were (on backends
/// without such settings, both are the default).
async fn bulk_load(s: &dyn SearchIndex) -> Result<()> {
    let name = unique("sift-conf-load");
    let index = name.as_str();
    // `zip` is searchable but not stored.
    let mut spec = person_spec(index);
    spec.source_excludes = vec!["zip".to_owned()];
    s.ensure_index(&spec).await?;
    // Settings other than the defaults, where the backend has them, so that
    // putting back the defaults would be caught.
    let custom = LoadSettings {
        refresh_interval: Some("7s".to_owned()),
        number_of_replicas: Some(0),
    };
    s.end_bulk_load(index, &custom)
        .await
        .context("setting the index's settings")?;
    let before = s.bulk_load_settings(index).await?;
    ensure!(
        before == custom || before == LoadSettings::default(),
        "settings read back are those set, or none on a backend without them: {before:?}"
    );

    let restore = s.begin_bulk_load(index).await?;
    ensure!(
        restore == before,
        "begin_bulk_load returns the settings it found: {restore:?}, expected {before:?}"
    );
    let model: HashMap<String, Person> = people().into_iter().collect();
    let docs: Vec<SearchDoc> = people().iter().map(|(id, p)| p.doc(id)).collect();
    // New documents, persisted half way, then replacements of some of them.
    for (i, batch) in docs.chunks(37).enumerate() {
        let report = s.bulk_new(index, batch.to_vec()).await?;
        ensure!(
            report.indexed == batch.len() && report.failed.is_empty(),
            "{report:?}"
        );
        if i == 2 {
            s.persist(index).await.context("persisting during a load")?;
        }
    }
    let again = s.bulk(index, docs[..50].to_vec()).await?;
    ensure!(again.indexed == 50, "{again:?}");
    s.persist(index).await?;
    s.end_bulk_load(index, &restore).await?;
    expect_count(s, index, model.len()).await?;
    let (zip_id, zip_person) = model.iter().next().context("a person")?;
    let hits = search(
        s,
        index,
        query(vec![term("zip", json!(zip_person.zip))], 1000),
    )
    .await?;
    let found = hits.iter().find(|h| &h.id == zip_id).with_context(|| {
        format!("{zip_id} is not found by its zip code, which is indexed but not stored")
    })?;
    ensure!(
        !found.source.contains_key("zip")
            && found.source.get("last") == Some(&json!(zip_person.last)),
        "the stored document leaves out `zip` and keeps the rest: {:?}",
        found.source
    );
    let expected: BTreeSet<String> = model
        .iter()
        .filter(|(_, p)| p.state == "TX")
        .map(|(id, _)| id.clone())
        .collect();
    let hits = search(s, index, query(vec![term("state", json!("TX"))], 1000)).await?;
    same_ids(&hits, &expected).context("a search after the load sees every document")?;
    let after = s.bulk_load_settings(index).await?;
    ensure!(
        after == before,
        "the settings after the load are {after:?}, before it {before:?}"
    );

    // A resumed load begins again on an index left in bulk-load mode and
    // restores the settings saved by the first run, not those it finds.
    s.begin_bulk_load(index).await?;
    s.bulk(index, vec![model["p003"].doc("p003")]).await?;
    s.begin_bulk_load(index).await?;
    s.end_bulk_load(index, &restore).await?;
    let after = s.bulk_load_settings(index).await?;
    ensure!(
        after == before,
        "after a second begin the settings are {after:?}, expected {before:?}"
    );
    expect_count(s, index, model.len()).await?;

    let missing = unique("sift-conf-missing");
    let err = s.begin_bulk_load(&missing).await;
    ensure!(
        matches!(err, Err(SearchError::NoSuchIndex(_))),
        "a bulk load of a missing index must be NoSuchIndex, got {err:?}"
    );
    Ok(())
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

async fn search(s: &dyn SearchIndex, index: &str, q: Query) -> Result<Vec<Hit>> {
    s.search(index, &q)
        .await
        .with_context(|| format!("search {q:?}"))
}

async fn expect_count(s: &dyn SearchIndex, index: &str, expected: usize) -> Result<()> {
    let count = s.count(index).await?;
    ensure!(
        count == expected as u64,
        "count is {count}, expected {expected}"
    );
    Ok(())
}

fn ids(hits: &[Hit]) -> Vec<&str> {
    hits.iter().map(|h| h.id.as_str()).collect()
}

/// The hits are exactly `expected`, each once.
fn same_ids(hits: &[Hit], expected: &BTreeSet<String>) -> Result<()> {
    let got: BTreeSet<String> = hits.iter().map(|h| h.id.clone()).collect();
    ensure!(got.len() == hits.len(), "an id came twice: {:?}", ids(hits));
    let missing: Vec<_> = expected.difference(&got).collect();
    let extra: Vec<_> = got.difference(expected).collect();
    ensure!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {extra:?}"
    );
    Ok(())
}
