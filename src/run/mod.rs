//! `sift run`: the whole pipeline in one process, on whatever backends the
//! configuration names (the embedded ones by default).
//!
//! With no arguments it brings its own world: a web of sites on loopback
//! made from the labeled sample compiled into the binary ([`web`]), and a
//! generated consumer database with social profiles and their truth. The
//! first pass then runs every stage the way the daemons do, each on its own
//! consumer group, as soon as its input arrives:
//!
//! ```text
//! sample web ─ ingest ─ sift.raw ─┬─ clean ─ sift.clean ─ infer ─ documents (m, c)
//!                                 └─ archive ─ objects raw/dt=…      ▲
//! labeled split ─ train ─ models/LATEST ─────────────────────────────┘
//! generated DB USA ─ dbusa load ─ search index ─ match ◀─ sift.profiles
//!                                                  └─ handles, identities, cache, sift.matches
//! review UI ◀─ documents
//! ```
//!
//! A stage stops for the first pass once the stage before it has finished
//! and its own group has committed everything on its input topic, so the
//! pass ends with every document through every stage. The summary says
//! what each stage did; then, unless `--once`, every stage keeps running as
//! a daemon (ingest visits the sites again, training runs again after
//! `--train-every`) until Ctrl-C.

pub mod stages;
mod summary;
pub mod web;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryFutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backends::table::Table;
use crate::config::Config;
use crate::daemon::Until;
use crate::envelope::topics;

use stages::{
    clean_stage, drained, finish, infer_stage, load_database, matching_parts, new_password,
    prepare, publish_profiles, refresh_cache, stopped, train_args, train_or_reuse, until_drained,
    Done, Shared, World, WorldArgs, MALFORMED_PROFILES, RUN_DIR,
};
pub use summary::{Classification, IdentitySummary, ModelSummary, ReviewLogin, RunSummary};

/// The review UI user `sift run` creates (its password is new every run).
pub const REVIEW_USER: &str = "analyst";

/// `sift run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Exit after the first pass's summary, with status 0 only if every stage processed documents.
    #[arg(long, env = "SIFT_RUN_ONCE")]
    pub once: bool,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The sample web, the generated database and the model.
    #[command(flatten)]
    pub world: WorldArgs,
    /// Address of the review UI (default `review.listen`).
    #[arg(long, env = "SIFT_REVIEW_LISTEN")]
    pub listen: Option<String>,
    /// After the first pass: how often the handle → person cache is rebuilt.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub cache_refresh: Duration,
    /// After the first pass: how often the model is trained again.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub train_every: Duration,
}

/// Runs `sift run`.
pub async fn main(config: &Config, args: RunArgs) -> crate::Result<bool> {
    let started = Instant::now();
    let mut config = config.clone();
    let shared = Shared::open(&config).await?;
    let run_dir = config.data_dir.join(RUN_DIR);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| crate::Error::io(format!("creating {}", run_dir.display()), e))?;

    let world = prepare(&mut config, &args.world, &run_dir).await?;
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        crate::daemon::shutdown_signal().await;
        stop_tx.send_replace(true);
    });
    crate::daemon::serve_metrics(&config, Arc::new(|| true)).await?;

    // The review UI answers from the start; its first login is new every run.
    let password = new_password();
    set_login(shared.table.as_ref(), &password).await?;
    let listen = args
        .listen
        .clone()
        .unwrap_or_else(|| config.review.listen.clone());
    let review = crate::review::Server::start(
        &config,
        crate::review::Backends {
            table: shared.table.clone(),
            log: shared.log.clone(),
            objects: Some(shared.objects.clone()),
            cache: None,
        },
        &listen,
    )
    .await?;
    let login = ReviewLogin {
        url: review.url(),
        user: REVIEW_USER.into(),
        password,
    };
    if !args.json {
        eprintln!(
            "sift: {} sites on {}…, {} people, review UI at {} — first pass running",
            world.web.sites(),
            world.web.site_url(0),
            world.generated.rows,
            login.url
        );
    }

    let pass = first_pass(&config, &args, &shared, &world, stop.clone()).await;
    let mut summary = match pass {
        Ok(s) => s,
        Err(e) => {
            let _ = review.shutdown().await;
            return Err(e);
        }
    };
    summary.review = Some(summary::ReviewCheck::probe(&login).await);
    summary.web_requests = world.web.requests();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.finish();
    summary.print(args.json);
    let ok = summary.every_stage_processed;

    if args.once || *stop.borrow() {
        review.shutdown().await?;
        finish(world).await;
        return Ok(ok);
    }
    if !args.json {
        eprintln!(
            "sift: every stage keeps running (ingest every {}, training every {}, cache every {}); Ctrl-C stops",
            humantime::format_duration(world.sources.first().map_or(Duration::ZERO, |s| s.poll_interval)),
            humantime::format_duration(args.train_every),
            humantime::format_duration(args.cache_refresh),
        );
    }
    let daemons = daemons(&config, &args, &shared, &world, stop.clone());
    // Ingest runs on this task (its visits borrow the sources) until Ctrl-C.
    match crate::ingest::Ingest::new(
        shared.log.clone(),
        shared.objects.clone(),
        shared.table.clone(),
        &config,
    )
    .await
    {
        Ok(ingest) => crate::ingest::serve(&ingest, &world.sources, stopped(stop.clone())).await,
        Err(e) => {
            tracing::error!(stage = "ingest", error = %e, "A stage failed.");
            stopped(stop).await;
        }
    }
    for (name, task) in daemons {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(stage = name, error = %e, "A stage failed."),
            Err(e) => tracing::error!(stage = name, error = %e, "A stage panicked."),
        }
    }
    review.shutdown().await?;
    finish(world).await;
    Ok(ok)
}

/// Creates the run's review user, or gives it the new password.
async fn set_login(table: &dyn Table, password: &str) -> crate::Result<()> {
    use crate::review::auth;
    let exists = auth::list_users(table)
        .await?
        .iter()
        .any(|(name, _)| name == REVIEW_USER);
    if exists {
        auth::set_password(table, REVIEW_USER, password).await
    } else {
        auth::add_user(table, REVIEW_USER, password, auth::Role::Admin).await
    }
}

type Task<T> = JoinHandle<crate::Result<T>>;

async fn joined<T>(name: &str, task: Task<T>) -> crate::Result<T> {
    task.await
        .map_err(|e| crate::Error::Invalid(format!("the {name} stage panicked: {e}")))?
}

/// The first pass: every stage once over the sample, concurrently where the
/// data allows.
async fn first_pass(
    config: &Config,
    args: &RunArgs,
    shared: &Shared,
    world: &World,
    stop: watch::Receiver<bool>,
) -> crate::Result<RunSummary> {
    let config = Arc::new(config.clone());

    // ingest → sift.raw
    let ingest = crate::ingest::Ingest::new(
        shared.log.clone(),
        shared.objects.clone(),
        shared.table.clone(),
        &config,
    )
    .await?;
    let prefixes = web::url_prefixes();
    let forgotten = ingest.forget(&prefixes).await?;
    if forgotten > 0 {
        tracing::info!(
            urls = forgotten,
            "Forgot what earlier runs fetched from the sample web, to replay it."
        );
    }
    // Not spawned: the pass borrows the sources; it runs on this task
    // alongside the others below.
    let (ingest_done, ingest_rx) = Done::new();
    let ingest_pass = async {
        let r = ingest.pass(&world.sources).await;
        ingest_done.set();
        r
    };

    // sift.raw → clean → sift.clean
    let (clean_done, clean_rx) = Done::new();
    let clean_task = tokio::spawn(clean_stage(
        shared.clone(),
        config.clone(),
        until_drained(
            shared,
            topics::RAW,
            &config.clean.group,
            ingest_rx.clone(),
            stop.clone(),
        ),
        Some(clean_done),
    ));

    // sift.raw → archive (off the latency path: it starts once ingest is done)
    let archive_task: Task<crate::archive::ArchiveSummary> = tokio::spawn({
        let (log, objects, config) = (shared.log.clone(), shared.objects.clone(), config.clone());
        let mut ingest_rx = ingest_rx.clone();
        let stop = stop.clone();
        async move {
            let _ = ingest_rx.wait_for(|d| *d).await;
            let until = Until::caught_up().or_stopped_by(stopped(stop));
            crate::archive::run(log, objects, &config, until).await
        }
    });

    // training split → model registry
    let (model_ready, model_rx) = Done::new();
    let train_task: Task<ModelSummary> = tokio::spawn({
        let (objects, table, config) =
            (shared.objects.clone(), shared.table.clone(), config.clone());
        let train_args = train_args(world, &args.world)?;
        let retrain = args.world.retrain;
        async move {
            let r = train_or_reuse(&config, &train_args, objects, table, retrain).await;
            model_ready.set();
            r
        }
    });

    // sift.clean → infer → documents
    let infer_task = tokio::spawn(infer_stage(
        shared.clone(),
        config.clone(),
        until_drained(
            shared,
            topics::CLEAN,
            &config.infer.group,
            clean_rx,
            stop.clone(),
        ),
        Some(model_rx),
    ));

    // generated DB USA → index; profiles → match → handles, identities, cache
    let identity_task: Task<IdentitySummary> = tokio::spawn({
        let (shared, config) = (shared.clone(), config.clone());
        let generated = world.generated.clone();
        let stop = stop.clone();
        async move { identity(&config, &shared, &generated, stop).await }
    });

    let ingest_summary = ingest_pass.await?;
    let clean = joined("clean", clean_task).await?;
    let archive = joined("archive", archive_task).await?;
    let model = joined("train", train_task).await?;
    let infer = joined("infer", infer_task).await?;
    let identity = joined("match", identity_task).await?;
    let tags_by_url: HashMap<&str, &[String]> = world
        .web
        .served()
        .iter()
        .map(|s| (s.url.as_str(), s.tags.as_slice()))
        .collect();
    let classification = summary::classification(shared.table.as_ref(), &tags_by_url).await?;
    Ok(RunSummary {
        seconds: 0.0,
        sites: world.web.sites() as u64,
        served: world.web.served().len() as u64,
        web_requests: 0,
        stages: Vec::new(),
        dead_letters: BTreeMap::new(),
        ingest: ingest_summary,
        clean,
        archive,
        model,
        // Per-document latencies are in the percentiles already.
        infer: crate::infer::InferSummary {
            latencies: Vec::new(),
            ..infer
        },
        identity,
        classification,
        review: None,
        every_stage_processed: false,
        idle_stages: Vec::new(),
    })
}

/// The identity side of the pass: load the generated database, publish its
/// profiles, match them, refresh the cache, and score the decisions on the
/// truth.
async fn identity(
    config: &Config,
    shared: &Shared,
    generated: &crate::dbusa::generate::Generated,
    stop: watch::Receiver<bool>,
) -> crate::Result<IdentitySummary> {
    let started = Instant::now();
    let load = load_database(config, shared, generated).await?;
    let (produced, produced_rx) = Done::new();
    let profiles = publish_profiles(config, shared, generated).await?;
    produced.set();
    let until = Until::stopped_by(drained(
        shared.log.clone(),
        topics::PROFILES,
        config.matching.group.clone(),
        produced_rx,
        stop,
    ));
    let parts = matching_parts(config, shared).await?;
    let cache = parts.cache.clone();
    let matched = crate::matching::daemon::run(parts, config, until).await?;
    let refreshed = refresh_cache(config, &shared.table, &cache).await?;
    let accuracy = summary::match_accuracy(shared.table.as_ref(), &profiles).await?;
    Ok(IdentitySummary {
        people: generated.rows,
        load,
        profiles_published: profiles.len() as u64,
        malformed_published: MALFORMED_PROFILES.len() as u64,
        matched,
        cache: refreshed,
        accuracy,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// After the first pass: every stage as a daemon until `stop`.
fn daemons(
    config: &Config,
    args: &RunArgs,
    shared: &Shared,
    world: &World,
    stop: watch::Receiver<bool>,
) -> Vec<(&'static str, Task<()>)> {
    let config = Arc::new(config.clone());
    let mut tasks: Vec<(&'static str, Task<()>)> = Vec::new();
    let until = || Until::stopped_by(stopped(stop.clone()));
    tasks.push((
        "clean",
        tokio::spawn(clean_stage(shared.clone(), config.clone(), until(), None).map_ok(drop)),
    ));
    tasks.push(("archive", {
        let (log, objects, config) = (shared.log.clone(), shared.objects.clone(), config.clone());
        let until = until();
        tokio::spawn(async move {
            crate::archive::run(log, objects, &config, until)
                .await
                .map(drop)
        })
    }));
    tasks.push((
        "infer",
        tokio::spawn(infer_stage(shared.clone(), config.clone(), until(), None).map_ok(drop)),
    ));
    tasks.push(("match+cache", {
        let (shared, config) = (shared.clone(), config.clone());
        let every = args.cache_refresh;
        let stop = stop.clone();
        tokio::spawn(async move { match_daemon(&config, &shared, every, stop).await })
    }));
    match train_args(world, &args.world) {
        Ok(train_args) => tasks.push(("train", {
            let (objects, table, config) = (
                shared.objects.clone(),
                shared.table.clone(),
                config.clone(),
            );
            let every = args.train_every;
            let mut stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.wait_for(|s| *s) => return Ok(()),
                    }
                    match crate::train::run_once(&config, &train_args, objects.clone(), Some(table.clone())).await {
                        Ok(o) => tracing::info!(version = %o.version, promoted = o.gate.promoted, "Trained a model."),
                        Err(e) => tracing::error!(error = %e, "Training failed; the next run is at the usual time."),
                    }
                }
            })
        })),
        Err(e) => tracing::error!(error = %e, "Training will not run again."),
    }
    tasks
}

/// The match daemon with its cache refreshed every `every`.
async fn match_daemon(
    config: &Config,
    shared: &Shared,
    every: Duration,
    stop: watch::Receiver<bool>,
) -> crate::Result<()> {
    let parts = matching_parts(config, shared).await?;
    let refresher = {
        let cache = parts.cache.clone();
        let mut stop = stop.clone();
        async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                if let Err(e) = refresh_cache(config, &shared.table, &cache).await {
                    tracing::error!(error = %e, "Cache refresh failed; trying again at the usual time.");
                }
            }
        }
    };
    let until = Until::stopped_by(stopped(stop));
    let (r, ()) = tokio::join!(
        crate::matching::daemon::run(parts, config, until),
        refresher
    );
    r.map(drop)
}

/// Counts per reason, merged.
pub(crate) fn merge(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}
