//! `sift dbusa load` through the binary: a load SIGKILLed at two moments
//! leaves in the index every row its checkpoint counts, and run again
//! continues from its checkpoint and ends with every row in the index
//! exactly once; broken rows are listed with their line numbers while
//! the good ones load; a file without a required column loads nothing; a
//! load into real OpenSearch (when `SIFT_TEST_ES` is set) leaves the index
//! settings as it found them.

mod conformance;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sift::backends::search::{EmbeddedSearch, SearchError, SearchIndex};
use sift::dbusa::index::person_of;
use sift::dbusa::load::{checkpoint_path, Checkpoint, LoadSummary, Reject, STATE_DIR};
use sift::dbusa::person::Person;

const ROWS: usize = 30_000;
/// Small bulk requests, each checkpointed, so that a load takes a few
/// seconds and the kills land in the middle of it.
const BULK_DOCS: &str = "300";

/// `sift --data-dir DIR ARGS…`, logging warnings only.
fn sift(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sift"));
    cmd.arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn summary(out: &Output) -> Result<LoadSummary> {
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("not a summary: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A child process that is killed if the test ends early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The rows of a generated file: each person with the byte offset its row starts at.
fn rows_of(file: &Path) -> Result<Vec<(u64, Person)>> {
    let mut reader = csv::Reader::from_path(file)?;
    let mut rows = Vec::new();
    for person in reader.deserialize::<Person>() {
        let person = person?;
        rows.push(person);
    }
    // Offsets in a second pass: `deserialize` does not expose positions.
    let mut reader = csv::Reader::from_path(file)?;
    let mut record = csv::ByteRecord::new();
    let mut offsets = Vec::with_capacity(rows.len());
    while reader.read_byte_record(&mut record)? {
        offsets.push(record.position().context("a position")?.byte());
    }
    ensure!(offsets.len() == rows.len());
    Ok(offsets.into_iter().zip(rows).collect())
}

fn read_checkpoint(dir: &Path, index: &str) -> Result<Option<Checkpoint>> {
    Ok(Checkpoint::read(&checkpoint_path(
        &dir.join(STATE_DIR),
        index,
    ))?)
}

/// Starts a load into `dbusa` and SIGKILLs it once its checkpoint counts at
/// least `rows` loaded rows; returns the checkpoint the kill left.
fn load_and_kill(dir: &Path, file: &Path, rows: u64) -> Result<Checkpoint> {
    let before = read_checkpoint(dir, "dbusa")?.map_or(0, |c| c.rows_loaded);
    let mut child = Running(
        sift(dir)
            .args(["dbusa", "load", "--bulk-docs", BULK_DOCS, "--workers", "2"])
            .args(["--checkpoint-every", "0s"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        ensure!(
            child.0.try_wait()?.is_none(),
            "the load ended before {rows} rows were checkpointed; make the load slower"
        );
        ensure!(
            Instant::now() < deadline,
            "the checkpoint did not reach {rows} rows in 60 s"
        );
        // Read while the loader may be replacing it: always whole, never torn.
        if let Some(c) = read_checkpoint(dir, "dbusa")? {
            ensure!(
                c.rows_loaded >= before,
                "the checkpoint went back from {before} to {} rows: the load restarted",
                c.rows_loaded
            );
            if c.rows_loaded >= rows {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.0.kill()?; // SIGKILL
    child.0.wait()?;
    let left = read_checkpoint(dir, "dbusa")?.context("a checkpoint after the kill")?;
    ensure!(
        !left.complete,
        "the load was complete when killed: {left:?}"
    );
    ensure!(left.rows_loaded < ROWS as u64, "{left:?}");
    Ok(left)
}

/// What a killed load's checkpoint counts as loaded is in the index: the
/// embedded index commits during a load only when the loader asks it to,
/// and the loader writes the watermark only after that.
fn every_row_before_the_watermark_is_there(
    dir: &Path,
    rows: &[(u64, Person)],
    left: &Checkpoint,
) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let search = EmbeddedSearch::open(&dir.join("search"))?;
        let before: Vec<&Person> = rows
            .iter()
            .take_while(|(offset, _)| *offset < left.offset)
            .map(|(_, p)| p)
            .collect();
        ensure!(
            before.len() as u64 == left.rows_loaded,
            "{} rows lie before the watermark, the checkpoint counts {}",
            before.len(),
            left.rows_loaded
        );
        let count = search.count("dbusa").await?;
        ensure!(
            count >= left.rows_loaded,
            "the index holds {count} documents after the kill; the checkpoint counts {} loaded",
            left.rows_loaded
        );
        for (i, person) in before.iter().enumerate() {
            ensure!(
                search.get("dbusa", &person.dbusa_id).await?.is_some(),
                "row {i} ({}) is before the watermark but not in the index after the kill",
                person.dbusa_id
            );
        }
        Ok(())
    })
}

#[test]
fn a_killed_load_resumes_and_ends_with_every_row_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let generated = data.join("generated");
    run(sift(data)
        .args(["dbusa", "generate", "--rows", &ROWS.to_string()])
        .args(["--profiles", "10", "--outsiders", "0", "--out"])
        .arg(&generated))?;
    let file = generated.join("dbusa.csv");
    let rows = rows_of(&file)?;
    ensure!(rows.len() == ROWS);

    let first = load_and_kill(data, &file, 3_000)?;
    every_row_before_the_watermark_is_there(data, &rows, &first)?;
    let second = load_and_kill(data, &file, first.rows_loaded + 9_000)?;
    every_row_before_the_watermark_is_there(data, &rows, &second)?;
    eprintln!(
        "killed at {} and {} rows checkpointed (bytes {} and {})",
        first.rows_loaded, second.rows_loaded, first.offset, second.offset
    );
    ensure!(
        second.offset > first.offset,
        "the second run did not move the watermark: {first:?} then {second:?}"
    );

    let out = run(sift(data)
        .args([
            "dbusa",
            "load",
            "--bulk-docs",
            BULK_DOCS,
            "--checkpoint-every",
            "0s",
            "--workers",
            "2",
            "--json",
        ])
        .arg(&file)
        .stderr(Stdio::inherit()))?;
    let s = summary(&out)?;
    ensure!(s.resumed, "the third run did not resume: {s:?}");
    ensure!(
        s.resumed_at_byte == second.offset && s.resumed_at_byte > 0,
        "resumed at byte {}, the checkpoint said {}",
        s.resumed_at_byte,
        second.offset
    );
    ensure!(
        s.rows_loaded == ROWS as u64 - second.rows_loaded,
        "this run loaded {} rows; {} were left after the watermark",
        s.rows_loaded,
        ROWS as u64 - second.rows_loaded
    );
    ensure!(
        s.rows_total == ROWS as u64 && s.rejected_total == 0,
        "{s:?}"
    );
    ensure!(
        s.index_count == ROWS as u64,
        "the index holds {} documents for {ROWS} rows",
        s.index_count
    );
    let done = read_checkpoint(data, "dbusa")?.context("the checkpoint")?;
    ensure!(done.complete, "{done:?}");

    // Every row is in the index, as written in the file; with the count
    // equal to the rows, none is there twice.
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let search = EmbeddedSearch::open(&data.join("search"))?;
        ensure!(search.count("dbusa").await? == ROWS as u64);
        let near = |offset: u64| {
            let at = rows.iter().position(|(o, _)| *o == offset);
            at.map(|i| i.saturating_sub(3)..(i + 3).min(ROWS))
        };
        let mut detailed: Vec<usize> = vec![0, 1, ROWS - 1];
        for c in [&first, &second] {
            let around = near(c.offset)
                .with_context(|| format!("the watermark {} is not the start of a row", c.offset))?;
            detailed.extend(around);
        }
        for i in detailed {
            let (_, person) = &rows[i];
            let doc = search
                .get("dbusa", &person.dbusa_id)
                .await?
                .with_context(|| format!("row {i} ({}) is missing", person.dbusa_id))?;
            ensure!(
                person_of(&doc.source).as_ref() == Some(person),
                "row {i} is stored as {:?}",
                doc.source
            );
        }
        for (i, (_, person)) in rows.iter().enumerate() {
            ensure!(
                search.get("dbusa", &person.dbusa_id).await?.is_some(),
                "row {i} ({}) is missing",
                person.dbusa_id
            );
        }
        Ok(())
    })?;

    // The same file again: nothing to do.
    let out = run(sift(data).args(["dbusa", "load"]).arg(&file))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("already loaded; --from-scratch to reload"),
        "{text}"
    );
    Ok(())
}

/// The columns in another order than the generator's, plus one the loader ignores.
const HEADER: &str =
    "dbusa_id,last,first,middle,address,city,state,zip,phone,email,birth_year,source";

fn row(id: &str, last: &str, year: &str) -> String {
    format!("{id},{last},Ann,,1 Main St,Salem,OR,97301,503-555-0100,ann@example.com,{year},x\n")
}

#[test]
fn broken_rows_are_listed_and_the_good_ones_load() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let file = data.join("people.csv");
    let mut text: Vec<u8> = Vec::new();
    text.extend(format!("{HEADER}\n").as_bytes()); // line 1
    text.extend(row("P1", "Lee", "1970").as_bytes()); // 2
    text.extend(row("P2", "Kim", "1981").as_bytes()); // 3
    text.extend(b"P3,Short,Ann,,1 Main St\n"); // 4: too few fields
    text.extend(row("P4", "Ortiz", "").as_bytes()); // 5: no birth year, loaded as 0
    text.extend(row("", "Noid", "1960").as_bytes()); // 6: empty id
    text.extend(row("P6", "Brown", "19x5").as_bytes()); // 7: birth year not a number
    text.extend(row("P7", "\"Two\nLines\"", "1990").as_bytes()); // 8-9: a quoted newline
    text.extend(b"P8,Bad,Ann,,1 Main St,Sal\xffem,OR,97301,503-555-0100,,1970,x\n"); // 10: not UTF-8
    text.extend(row("P9", "Last", "2001").as_bytes()); // 11
    std::fs::write(&file, &text)?;

    let out = run(sift(data)
        .args(["dbusa", "load", "--index", "people", "--json"])
        .arg(&file))?;
    let s = summary(&out)?;
    ensure!(
        s.rows_loaded == 5 && s.rejected == 4 && s.index_count == 5,
        "{s:?}"
    );
    ensure!(!s.resumed && s.started_over.is_none(), "{s:?}");
    let listed = std::fs::read_to_string(&s.rejects_file)?;
    let rejects: Vec<Reject> = listed
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| listed.clone())?;
    let lines: Vec<u64> = rejects.iter().map(|r| r.line).collect();
    ensure!(lines == [4, 6, 7, 10], "rejected lines {lines:?}: {listed}");
    for (reject, word) in rejects
        .iter()
        .zip(["fields", "dbusa_id", "birth_year", "UTF-8"])
    {
        ensure!(
            reject.reason.contains(word),
            "{reject:?} should mention {word}"
        );
    }
    ensure!(rejects[2].dbusa_id == "P6", "{:?}", rejects[2]);

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let search = EmbeddedSearch::open(&data.join("search"))?;
        for id in ["P1", "P2", "P4", "P7", "P9"] {
            ensure!(search.get("people", id).await?.is_some(), "{id} is missing");
        }
        let p4 = search.get("people", "P4").await?.context("P4")?;
        ensure!(p4.source["person"]["birth_year"] == 0, "{:?}", p4.source);
        let p7 = search.get("people", "P7").await?.context("P7")?;
        ensure!(
            p7.source["person"]["last"] == "Two\nLines",
            "{:?}",
            p7.source
        );
        Ok(())
    })?;

    // Another file into the same index starts over, and says so; its
    // rejects replace the first file's.
    let other = data.join("more.csv");
    std::fs::write(
        &other,
        format!(
            "{HEADER}\n{}{}",
            row("Q1", "Moss", "1950"),
            row("", "X", "1")
        ),
    )?;
    let out = run(sift(data)
        .args(["dbusa", "load", "--index", "people", "--json"])
        .arg(&other))?;
    let s = summary(&out)?;
    ensure!(
        s.started_over
            .as_deref()
            .is_some_and(|r| r.contains("not the file")),
        "{s:?}"
    );
    ensure!(
        s.rows_loaded == 1 && s.rejected_total == 1 && s.index_count == 6,
        "{s:?}"
    );
    let listed = std::fs::read_to_string(&s.rejects_file)?;
    ensure!(
        listed.lines().count() == 1 && listed.contains("\"line\":3"),
        "{listed}"
    );
    Ok(())
}

#[test]
fn a_file_without_a_required_column_loads_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let file = data.join("nozip.csv");
    std::fs::write(
        &file,
        "dbusa_id,first,middle,last,address,city,state,phone,email,birth_year\n\
         P1,Ann,,Lee,1 Main St,Salem,OR,503-555-0100,,1970\n",
    )?;
    let out = sift(data).args(["dbusa", "load"]).arg(&file).output()?;
    ensure!(
        !out.status.success(),
        "a load without a zip column succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("no column zip"), "{err}");
    ensure!(
        read_checkpoint(data, "dbusa")?.is_none(),
        "a checkpoint was written"
    );
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let search = EmbeddedSearch::open(&data.join("search"))?;
        let count = search.count("dbusa").await;
        ensure!(
            matches!(count, Err(SearchError::NoSuchIndex(_))),
            "the index was created: {count:?}"
        );
        Ok(())
    })
}

/// A load into real OpenSearch: every row arrives, and the index settings the
/// load changed are back to what they were before it. Needs `--features
/// elasticsearch` (as in tests/elasticsearch.rs).
#[cfg(feature = "elasticsearch")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_into_opensearch_restores_the_index_settings() -> Result<()> {
    let Some(addr) = conformance::service_addr("SIFT_TEST_ES") else {
        return Ok(());
    };
    let url = if addr.contains("://") {
        addr.clone()
    } else {
        format!("http://{addr}")
    };
    let url = url.trim_end_matches('/').to_owned();
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_path_buf();
    let index = conformance::unique("sift-load-test");
    let generated = data.join("generated");
    run(sift(&data)
        .args(["dbusa", "generate", "--rows", "5000", "--profiles", "10"])
        .args(["--outsiders", "0", "--out"])
        .arg(&generated))?;
    let file = generated.join("dbusa.csv");

    // The index made beforehand, with settings other than the defaults.
    let http = reqwest::Client::new();
    create_index(&url, &index).await?;
    http.put(format!("{url}/{index}/_settings"))
        .json(
            &serde_json::json!({ "index": { "refresh_interval": "3s", "number_of_replicas": 0 } }),
        )
        .send()
        .await?
        .error_for_status()?;
    let settings = || async {
        let reply: serde_json::Value = http
            .get(format!("{url}/{index}/_settings?flat_settings=true"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let settings = reply
            .as_object()
            .and_then(|o| o.values().next())
            .map(|entry| entry["settings"].clone())
            .context("no settings in the reply")?;
        anyhow::Ok(settings)
    };
    let before = settings().await?;
    ensure!(before["index.refresh_interval"] == "3s", "{before}");

    let load = sift(&data)
        .args([
            "dbusa",
            "load",
            "--index",
            &index,
            "--bulk-docs",
            "1000",
            "--json",
        ])
        .arg(&file)
        .env("SIFT__SEARCH__BACKEND", "elasticsearch")
        .env("SIFT__SEARCH__ELASTICSEARCH__URL", &url)
        .output()?;
    ensure!(
        load.status.success(),
        "the load failed: {}",
        String::from_utf8_lossy(&load.stderr)
    );
    let s = summary(&load)?;
    ensure!(
        s.rows_total == 5000 && s.index_count == 5000 && s.rejected_total == 0,
        "{s:?}"
    );
    let after = settings().await?;
    ensure!(
        after == before,
        "the settings before the load were {before}, after it {after}"
    );
    http.delete(format!("{url}/{index}"))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// Creates a `dbusa` index called `index` through sift's own client.
#[cfg(feature = "elasticsearch")]
async fn create_index(url: &str, index: &str) -> Result<()> {
    use sift::backends::search::elasticsearch::ElasticsearchIndex;
    let config = sift::config::ElasticsearchConfig {
        url: url.to_owned(),
        ..sift::config::ElasticsearchConfig::default()
    };
    let es = ElasticsearchIndex::connect(&config).await?;
    es.ensure_index(&sift::dbusa::index::spec(index)).await?;
    Ok(())
}

/// An index an earlier sift made with other fields (here without
/// `household`) is refused before anything is written, with the way out;
/// `--recreate` rebuilds it with today's fields and every row.
#[test]
fn an_index_with_older_fields_is_refused_then_rebuilt() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let file = data.join("people.csv");
    std::fs::write(
        &file,
        format!(
            "{HEADER}\n{}{}",
            row("P1", "Lee", "1970"),
            row("P2", "Kim", "1981")
        ),
    )?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let search = EmbeddedSearch::open(&data.join("search"))?;
        let mut old = sift::dbusa::index::spec("dbusa");
        old.fields.retain(|f| f.name != "household");
        old.source_excludes.retain(|name| name != "household");
        ensure!(old.fields.len() + 1 == sift::dbusa::index::spec("dbusa").fields.len());
        search.ensure_index(&old).await?;
        Ok(())
    })?;

    let out = sift(data).args(["dbusa", "load"]).arg(&file).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the load into the old index succeeded"
    );
    ensure!(
        err.contains("household") && err.contains("--recreate"),
        "the refusal should name the missing field and the way out: {err}"
    );
    ensure!(
        read_checkpoint(data, "dbusa")?.is_none(),
        "a checkpoint was written"
    );

    let out = run(sift(data)
        .args(["dbusa", "load", "--recreate", "--json"])
        .arg(&file))?;
    let s = summary(&out)?;
    ensure!(s.rows_loaded == 2 && s.index_count == 2, "{s:?}");
    runtime.block_on(async {
        let search = EmbeddedSearch::open(&data.join("search"))?;
        search
            .ensure_index(&sift::dbusa::index::spec("dbusa"))
            .await
            .context("the rebuilt index has today's fields")?;
        let p1 = search.get("dbusa", "P1").await?.context("P1")?;
        let person = person_of(&p1.source).context("P1 stores its person")?;
        let household = sift::dbusa::index::household_key(&person);
        let query = sift::backends::search::Query {
            must: vec![sift::backends::search::Clause::Term {
                field: "household".to_owned(),
                value: serde_json::json!(household),
                boost: 1.0,
            }],
            k: 5,
            ..Default::default()
        };
        let hits = search.search("dbusa", &query).await?;
        ensure!(
            hits.iter().any(|h| h.id == "P1"),
            "the rebuilt index finds P1 by its household {household}: {hits:?}"
        );
        Ok(())
    })
}

/// The embedded index, dying right after the `crash_at`-th commit of a
/// load: the commit is on disk, the loader never hears of it, and every
/// later write fails without reaching the index, as in a process killed
/// between committing and writing its checkpoint.
struct DiesAfterCommit {
    inner: EmbeddedSearch,
    crash_at: u32,
    persists: std::sync::atomic::AtomicU32,
}

impl DiesAfterCommit {
    fn dead(&self) -> bool {
        self.persists.load(std::sync::atomic::Ordering::SeqCst) >= self.crash_at
    }

    fn gone() -> SearchError {
        SearchError::Engine("the process died after its commit".to_owned())
    }
}

#[async_trait::async_trait]
impl SearchIndex for DiesAfterCommit {
    async fn ensure_index(
        &self,
        spec: &sift::backends::search::IndexSpec,
    ) -> Result<(), SearchError> {
        self.inner.ensure_index(spec).await
    }
    async fn drop_index(&self, index: &str) -> Result<bool, SearchError> {
        self.inner.drop_index(index).await
    }
    async fn bulk(
        &self,
        index: &str,
        docs: Vec<sift::backends::search::SearchDoc>,
    ) -> Result<sift::backends::search::BulkReport, SearchError> {
        if self.dead() {
            return Err(Self::gone());
        }
        self.inner.bulk(index, docs).await
    }
    async fn bulk_new(
        &self,
        index: &str,
        docs: Vec<sift::backends::search::SearchDoc>,
    ) -> Result<sift::backends::search::BulkReport, SearchError> {
        if self.dead() {
            return Err(Self::gone());
        }
        self.inner.bulk_new(index, docs).await
    }
    async fn delete(&self, index: &str, id: &str) -> Result<(), SearchError> {
        self.inner.delete(index, id).await
    }
    async fn refresh(&self, index: &str) -> Result<(), SearchError> {
        self.inner.refresh(index).await
    }
    async fn get(
        &self,
        index: &str,
        id: &str,
    ) -> Result<Option<sift::backends::search::SearchDoc>, SearchError> {
        self.inner.get(index, id).await
    }
    async fn count(&self, index: &str) -> Result<u64, SearchError> {
        self.inner.count(index).await
    }
    async fn count_matching(
        &self,
        index: &str,
        query: &sift::backends::search::Query,
    ) -> Result<u64, SearchError> {
        self.inner.count_matching(index, query).await
    }
    async fn search(
        &self,
        index: &str,
        query: &sift::backends::search::Query,
    ) -> Result<Vec<sift::backends::search::Hit>, SearchError> {
        self.inner.search(index, query).await
    }
    async fn begin_bulk_load(
        &self,
        index: &str,
    ) -> Result<sift::backends::search::LoadSettings, SearchError> {
        self.inner.begin_bulk_load(index).await
    }
    async fn persist(&self, index: &str) -> Result<(), SearchError> {
        if self.dead() {
            return Err(Self::gone());
        }
        if self.persists.load(std::sync::atomic::Ordering::SeqCst) + 1 == self.crash_at {
            // A slow last commit: the requests in flight add their rows to it.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.inner.persist(index).await?;
        self.persists
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.dead() {
            return Err(Self::gone());
        }
        Ok(())
    }
    async fn end_bulk_load(
        &self,
        index: &str,
        _restore: &sift::backends::search::LoadSettings,
    ) -> Result<(), SearchError> {
        if self.dead() {
            return Err(Self::gone());
        }
        self.inner.end_bulk_load(index, _restore).await
    }
}

/// A load into an empty index adds rows it never sent as new documents
/// (no lookup of an older copy). Killed right after a commit that holds
/// rows past its watermark, the next run must still replace those rows,
/// not add them a second time.
#[test]
fn a_load_killed_between_commit_and_checkpoint_adds_no_row_twice() -> Result<()> {
    use sift::dbusa::load::{load, LoadOptions};
    use std::sync::Arc;

    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let generated = data.join("generated");
    run(sift(data)
        .args(["dbusa", "generate", "--rows", "20000"])
        .args(["--profiles", "10", "--outsiders", "0", "--out"])
        .arg(&generated))?;
    let file = generated.join("dbusa.csv");
    let options = LoadOptions {
        file: file.clone(),
        index: "dbusa".to_owned(),
        bulk_docs: 250,
        workers: 3,
        from_scratch: false,
        recreate: false,
        checkpoint_every: Duration::ZERO,
        state_dir: data.join(STATE_DIR),
        progress: false,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for crash_at in [4, 9] {
        let dying = Arc::new(DiesAfterCommit {
            inner: reopen(&runtime, data)?,
            crash_at,
            persists: std::sync::atomic::AtomicU32::new(0),
        });
        let outcome = runtime.block_on(load(Arc::clone(&dying) as Arc<dyn SearchIndex>, &options));
        ensure!(outcome.is_err(), "the load outlived its crash: {outcome:?}");
        drop(dying);
        let left = read_checkpoint(data, "dbusa")?.context("a checkpoint")?;
        ensure!(left.fresh && !left.complete, "{left:?}");
    }
    let search: Arc<dyn SearchIndex> = Arc::new(reopen(&runtime, data)?);
    let s = runtime.block_on(load(Arc::clone(&search), &options))?;
    ensure!(s.resumed && s.rows_total == 20_000, "{s:?}");
    ensure!(
        s.index_count == 20_000,
        "the index holds {} documents for 20,000 rows: rows committed past the watermark \
         were added again",
        s.index_count
    );
    Ok(())
}

/// The embedded index in `dir`, opened once the writer of a crashed load
/// (still held by its last running request) lets go of it.
fn reopen(runtime: &tokio::runtime::Runtime, dir: &Path) -> Result<EmbeddedSearch> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let search = EmbeddedSearch::open(&dir.join("search"))?;
        match runtime.block_on(search.count("dbusa")) {
            Ok(_) | Err(SearchError::NoSuchIndex(_)) => return Ok(search),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the crashed load's writer: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
