//! `sift match`: social profiles to people in the consumer database.
//!
//! - [`matcher`]: one profile to at most one person: enrichment first when
//!   the profile lacks a usable name or location, one blocking query
//!   ([`block`]), Fellegi-Sunter scores ([`score`]), threshold and margin.
//! - [`enrich`]: the FullContact Person Enrich v3 client, with a client-side
//!   rate limit and a cache; [`standin`] is a local server that follows the
//!   same API, for tests and benchmarks.
//! - [`daemon`]: the consumer group on `sift.profiles`; [`sink`] writes its
//!   decisions to the cache, the `handles` and `identities` tables and
//!   `sift.matches`.
//! - Batch mode ([`batch`]): the same matcher over a CSV or JSON-lines file.
//! - [`fit`]: the weights from labelled profiles; [`evaluate`]: accuracy
//!   against the generator's truth.
//! - [`refresh`]: `sift cache refresh`, each network's cache namespace
//!   rebuilt from `handles` and swapped in atomically.

pub mod block;
pub mod daemon;
pub mod enrich;
pub mod enrich_cli;
pub mod evaluate;
pub mod fit;
pub mod matcher;
pub mod refresh;
pub mod score;
pub mod sink;
pub mod standin;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures::StreamExt;

use crate::backends::search::SearchError;
use crate::backends::{Cache, SearchIndex, Table};
use crate::config::Config;
use crate::daemon::Until;
use matcher::{Matcher, Outcome, ProfileIn, Rules};
use score::Weights;

/// `sift match`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MatchArgs {
    /// Other actions than matching.
    #[command(subcommand)]
    pub command: Option<MatchCommand>,
    /// Daemon: exit once the group has caught up with the end of `sift.profiles` as it was at start.
    #[arg(long, env = "SIFT_MATCH_ONCE")]
    pub once: bool,
    /// Batch mode: match the profiles of this file (CSV with a header, or JSON lines:
    /// id, network, handle, name, location, optional email and phone) instead of the topic.
    #[arg(long, requires = "output")]
    pub input: Option<PathBuf>,
    /// Batch mode: write one JSON line per input profile here, in input order.
    #[arg(long, requires = "input")]
    pub output: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `sift match` subcommands.
#[derive(Debug, Subcommand)]
pub enum MatchCommand {
    /// Estimate the field weights, without labels from the loaded database's candidate pairs (or with `--labels`), and write them as JSON.
    Fit(fit::FitArgs),
}

/// `sift cache`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Rebuild each network's handle → person namespace from the `handles` table, atomically.
    Refresh(RefreshArgs),
}

/// `sift cache refresh`.
#[derive(Debug, Args)]
pub struct RefreshArgs {
    /// Refresh again at this interval (e.g. `10m`) until stopped; once if absent.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
}

/// The weights `match.weights` names, or the built-in ones.
pub fn weights(config: &Config) -> crate::Result<Weights> {
    if config.matching.weights.is_empty() {
        Weights::built_in()
    } else {
        Weights::read(Path::new(&config.matching.weights))
    }
}

/// Builds the matcher the configuration describes, with its cache; `table`
/// keeps the enrichment answers paid for.
pub async fn matcher(
    config: &Config,
    table: Arc<dyn Table>,
) -> crate::Result<(Arc<Matcher>, Arc<dyn Cache>)> {
    let search: Arc<dyn SearchIndex> = crate::backends::open_search(config).await?;
    matcher_on(config, search, table).await
}

/// Builds the matcher the configuration describes over an open search index
/// and table.
pub async fn matcher_on(
    config: &Config,
    search: Arc<dyn SearchIndex>,
    table: Arc<dyn Table>,
) -> crate::Result<(Arc<Matcher>, Arc<dyn Cache>)> {
    let index = config.dbusa.index.clone();
    let people = match search.count(&index).await {
        Ok(0) => {
            tracing::warn!(index = %index, "The consumer database index is empty; nothing can match.");
            0
        }
        Ok(n) => n,
        Err(SearchError::NoSuchIndex(_)) => {
            return Err(crate::Error::Invalid(format!(
                "the search index `{index}` does not exist: load the consumer database first \
                 with `sift dbusa load FILE.csv`"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let cache = crate::backends::open_cache(config).await?;
    let mut enricher = enrich::Enricher::new(&config.enrich, cache.clone())
        .map_err(|e| crate::Error::Invalid(format!("the enrichment client: {e}")))?;
    match enricher.take() {
        None => tracing::info!("Enrichment is off (enrich.api_key is empty)."),
        Some(client) => {
            // Answers paid for are kept in the table, so a restart, another
            // instance or tomorrow's run does not pay for them again.
            let store = enrich::AnswerStore::open(table).await?;
            enricher = Some(client.with_store(store));
        }
    }
    let m = &config.matching;
    let rules = Rules {
        index,
        candidates: m.candidates as usize,
        threshold: m.threshold,
        margin: m.margin,
        people,
    };
    let matcher = Matcher::new(search, weights(config)?, rules, enricher);
    tracing::info!(
        people,
        threshold = m.threshold,
        score_needed = format!("{:.2}", matcher.threshold_bits()),
        "A match needs this probability; with this many people loaded, that is this score (log2)."
    );
    Ok((Arc::new(matcher), cache))
}

/// Runs `sift match`.
pub async fn main(config: &Config, args: MatchArgs) -> crate::Result<()> {
    if let Some(MatchCommand::Fit(a)) = &args.command {
        return fit::main(config, a).await;
    }
    if let (Some(input), Some(output)) = (&args.input, &args.output) {
        let table = crate::backends::open_table(config).await?;
        let (matcher, _) = matcher(config, table).await?;
        let s = batch(
            &matcher,
            input,
            output,
            config.matching.concurrency.max(1) as usize,
        )
        .await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        } else {
            println!(
                "matched {} of {} profiles in {:.1} s ({:.0} profiles/s); wrote {}",
                s.reasons.get("matched").copied().unwrap_or(0),
                s.profiles,
                s.seconds,
                s.profiles as f64 / s.seconds.max(1e-9),
                output.display()
            );
            println!("  by reason: {:?}", s.reasons);
        }
        return Ok(());
    }
    let table = crate::backends::open_table(config).await?;
    let (matcher, cache) = matcher(config, table.clone()).await?;
    let log = crate::backends::open_log(config).await?;
    let objects = crate::backends::open_objects(config).await?;
    crate::daemon::serve_metrics(config, daemon::health()).await?;
    let until = if args.once {
        Until::caught_up().or_stopped_by(crate::daemon::shutdown_signal())
    } else {
        Until::stopped_by(crate::daemon::shutdown_signal())
    };
    let parts = daemon::Parts {
        log,
        objects,
        table,
        cache,
        matcher,
    };
    let s = daemon::run(parts, config, until).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    } else {
        println!(
            "match finished in {:.2} s ({:.0} profiles/s)",
            s.seconds, s.profiles_per_second
        );
        println!("  consumed from sift.profiles {:>8}", s.consumed);
        println!("  decided                     {:?}", s.decided);
        println!("  dead letters                {:?}", s.dead_letters);
    }
    Ok(())
}

/// Runs `sift cache refresh`.
pub async fn cache_main(config: &Config, command: CacheCommand) -> crate::Result<()> {
    let CacheCommand::Refresh(args) = command;
    if config.cache.backend == crate::config::CacheBackend::Embedded {
        tracing::warn!(
            "cache.backend is embedded: the cache lives in this process only, so this refresh \
             is seen by no other process; configure Redis for a shared cache"
        );
    }
    let table = crate::backends::open_table(config).await?;
    let cache = crate::backends::open_cache(config).await?;
    let ttl = Some(config.matching.cache_ttl).filter(|d| !d.is_zero());
    loop {
        let r = refresh::refresh(&table, &cache, ttl).await?;
        println!(
            "refreshed from {} handles in {:.2} s: {:?}",
            r.rows, r.seconds, r.entries
        );
        let Some(every) = args.every else {
            return Ok(());
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::daemon::shutdown_signal() => return Ok(()),
        }
    }
}

/// What a batch run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BatchSummary {
    /// Profiles read.
    pub profiles: u64,
    /// Decisions by reason (`invalid_input` for lines that are not profiles).
    pub reasons: std::collections::BTreeMap<String, u64>,
    /// Seconds.
    pub seconds: f64,
}

/// One line of batch output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchLine {
    /// The input profile's id.
    pub id: Option<String>,
    /// The decision, or why the line is not a profile.
    #[serde(flatten)]
    pub result: BatchResult,
}

/// A decision, or an input error.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum BatchResult {
    /// Decided.
    Decided(Box<Outcome>),
    /// Not a profile.
    Invalid {
        /// Always null.
        dbusa_id: Option<String>,
        /// Always null.
        score: Option<f64>,
        /// `invalid_input`.
        reason: &'static str,
        /// What is wrong.
        error: String,
    },
}

/// A profile read from a batch file, or the line's id (if any) and what is wrong with it.
type InputLine = Result<ProfileIn, (Option<String>, String)>;

/// Runs `f` over `items`, up to `concurrency` at once, and returns the
/// results in input order. Unlike an ordered buffer, a slow item (an
/// enrichment lookup the API queued) does not stop the others from starting.
pub async fn unordered_map<T, R, F, Fut>(items: Vec<T>, concurrency: usize, f: F) -> Vec<R>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    let mut out: Vec<(usize, R)> = futures::stream::iter(items.into_iter().enumerate())
        .map(|(i, item)| {
            let fut = f(item);
            async move { (i, fut.await) }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// Profiles read and matched together in batch mode.
const BATCH_CHUNK: usize = 4096;

/// Reads profiles from a CSV (by header) or JSON-lines file, lazily.
fn read_input(path: &Path) -> crate::Result<Box<dyn Iterator<Item = InputLine> + Send>> {
    let file = std::fs::File::open(path)
        .map_err(|e| crate::Error::io(format!("opening {}", path.display()), e))?;
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if is_csv {
        let reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
        let iter = reader
            .into_deserialize::<ProfileIn>()
            .map(|r| r.map_err(|e| (None, format!("not a profile row: {e}"))));
        return Ok(Box::new(iter));
    }
    let iter = std::io::BufReader::new(file)
        .lines()
        .filter(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|l| {
            let line = l.map_err(|e| (None, format!("cannot read the line: {e}")))?;
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| (None, format!("not JSON: {e}")))?;
            let id = value.get("id").and_then(|v| v.as_str()).map(str::to_owned);
            serde_json::from_value::<ProfileIn>(value)
                .map_err(|e| (id, format!("not a profile: {e}")))
        });
    Ok(Box::new(iter))
}

/// Batch mode: matches every profile of `input` through `matcher` and
/// writes one JSON line per input profile to `output`, in input order.
pub async fn batch(
    matcher: &Arc<Matcher>,
    input: &Path,
    output: &Path,
    concurrency: usize,
) -> crate::Result<BatchSummary> {
    let started = std::time::Instant::now();
    let profiles = read_input(input)?;
    let tmp = output.with_extension("partial");
    let file = std::fs::File::create(&tmp)
        .map_err(|e| crate::Error::io(format!("creating {}", tmp.display()), e))?;
    let mut out = std::io::BufWriter::new(file);
    let mut summary = BatchSummary::default();
    let mut profiles = profiles.peekable();
    while profiles.peek().is_some() {
        let chunk: Vec<InputLine> = profiles.by_ref().take(BATCH_CHUNK).collect();
        let lines = unordered_map(chunk, concurrency, |p| {
            let matcher = matcher.clone();
            async move { batch_line(&matcher, p).await }
        })
        .await;
        for line in lines {
            let line = line?;
            summary.profiles += 1;
            let reason = match &line.result {
                BatchResult::Decided(o) => o.reason.name(),
                BatchResult::Invalid { reason, .. } => reason,
            };
            *summary.reasons.entry(reason.to_owned()).or_default() += 1;
            serde_json::to_writer(&mut out, &line)
                .map_err(|e| crate::Error::Invalid(format!("writing a match: {e}")))?;
            out.write_all(b"\n")
                .map_err(|e| crate::Error::io(format!("writing {}", tmp.display()), e))?;
        }
    }
    out.flush()
        .map_err(|e| crate::Error::io(format!("writing {}", tmp.display()), e))?;
    drop(out);
    std::fs::rename(&tmp, output).map_err(|e| {
        crate::Error::io(
            format!("renaming {} to {}", tmp.display(), output.display()),
            e,
        )
    })?;
    summary.seconds = started.elapsed().as_secs_f64();
    matcher.flush_enrich_stats().await;
    Ok(summary)
}

/// One batch input line's output.
async fn batch_line(matcher: &Matcher, p: InputLine) -> crate::Result<BatchLine> {
    let invalid = |id, error| BatchLine {
        id,
        result: BatchResult::Invalid {
            dbusa_id: None,
            score: None,
            reason: "invalid_input",
            error,
        },
    };
    let p = match p {
        Err((id, error)) => return Ok(invalid(id, error)),
        Ok(p) => p,
    };
    if let Err(error) = p.validate() {
        return Ok(invalid(p.id, error));
    }
    let o = matcher.match_profile(&p).await?;
    Ok(BatchLine {
        id: p.id,
        result: BatchResult::Decided(Box::new(o)),
    })
}

impl From<matcher::MatchError> for crate::Error {
    fn from(e: matcher::MatchError) -> Self {
        match e {
            matcher::MatchError::Search(s) => crate::Error::Search(s),
            e @ matcher::MatchError::EnrichmentKey(_) => crate::Error::Invalid(e.to_string()),
            matcher::MatchError::EnrichmentStore(e) => e.into(),
        }
    }
}
