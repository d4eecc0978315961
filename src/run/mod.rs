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

mod summary;
pub mod web;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures::TryFutureExt;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backends::log::{Log, Record};
use crate::backends::objects::ObjectStore;
use crate::backends::search::SearchIndex;
use crate::backends::table::Table;
use crate::config::Config;
use crate::daemon::Until;
use crate::envelope::topics;
use crate::sample::LabeledDoc;

pub use summary::{Classification, IdentitySummary, ModelSummary, ReviewLogin, RunSummary};

/// The review UI user `sift run` creates (its password is new every run).
pub const REVIEW_USER: &str = "analyst";
/// Where `sift run` keeps its generated inputs, under the data dir.
pub const RUN_DIR: &str = "run";

/// `sift run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Exit after the first pass's summary, with status 0 only if every stage processed documents.
    #[arg(long, env = "SIFT_RUN_ONCE")]
    pub once: bool,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Sites of the sample web.
    #[arg(long, env = "SIFT_RUN_SITES", default_value_t = 120)]
    pub sites: usize,
    /// Serve only the first N documents of the sample's web share (0 = all of them).
    #[arg(long, env = "SIFT_RUN_DOCUMENTS", default_value_t = 0)]
    pub documents: usize,
    /// Port every sample site listens on, each on its own loopback address (127.0.1.x);
    /// 0 picks a free one. A fixed port keeps URLs, and so document ids, the same across runs.
    #[arg(long, env = "SIFT_RUN_WEB_PORT", default_value_t = 18480)]
    pub web_port: u16,
    /// People in the generated consumer database.
    #[arg(long, env = "SIFT_RUN_PEOPLE", default_value_t = 100_000)]
    pub people: u64,
    /// Generated profiles of people in the database.
    #[arg(long, env = "SIFT_RUN_PROFILES", default_value_t = 5_000)]
    pub profiles: u64,
    /// Generated profiles of people who are not in it.
    #[arg(long, env = "SIFT_RUN_OUTSIDERS", default_value_t = 1_000)]
    pub outsiders: u64,
    /// Seed of the generated database (the built-in match weights were fitted on seed 42).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Train a model even if the registry already has a LATEST one.
    #[arg(long)]
    pub retrain: bool,
    /// Most training epochs (default: the preset's).
    #[arg(long, env = "SIFT_RUN_EPOCHS")]
    pub epochs: Option<u32>,
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

/// Whether a labeled document is one the sample web publishes (a third of
/// them, by a hash of the id); the rest is the training data, so the model
/// never saw the documents the pipeline classifies.
pub fn on_the_web(id: &str) -> bool {
    blake3::hash(format!("sift-run-web:{id}").as_bytes()).as_bytes()[0].is_multiple_of(3)
}

/// The backends every stage shares: the embedded ones are single-process,
/// so one process opens each once.
#[derive(Clone)]
pub struct Shared {
    /// The log.
    pub log: Arc<dyn Log>,
    /// The wide-column table.
    pub table: Arc<dyn Table>,
    /// The object store.
    pub objects: Arc<dyn ObjectStore>,
    /// The search index.
    pub search: Arc<dyn SearchIndex>,
}

impl Shared {
    /// Opens the configured backends.
    pub async fn open(config: &Config) -> crate::Result<Self> {
        Ok(Shared {
            log: crate::backends::open_log(config).await?,
            table: crate::backends::open_table(config).await?,
            objects: crate::backends::open_objects(config).await?,
            search: crate::backends::open_search(config).await?,
        })
    }
}

/// A one-shot flag a stage raises when it has finished its first pass.
#[derive(Clone)]
pub(crate) struct Done(watch::Sender<bool>);

impl Done {
    pub(crate) fn new() -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (Done(tx), rx)
    }

    pub(crate) fn set(&self) {
        self.0.send_replace(true);
    }
}

/// Resolves once `upstream` is set (or its stage is gone) and `group` has
/// committed everything on `topic`, or once `stop` is set.
async fn drained(
    log: Arc<dyn Log>,
    topic: &'static str,
    group: String,
    mut upstream: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let caught_up = async {
        let _ = upstream.wait_for(|d| *d).await;
        loop {
            match crate::stage::standing(log.as_ref(), topic, &group, None).await {
                Ok((0, _)) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, topic, group = %group, "Cannot read the group's standing; asking again.")
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = caught_up => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// Resolves once `stop` is set.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Until `group` has drained `topic` after `upstream` finished, or `stop`.
pub(crate) fn until_drained(
    shared: &Shared,
    topic: &'static str,
    group: &str,
    upstream: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> Until {
    Until::stopped_by(drained(
        shared.log.clone(),
        topic,
        group.to_owned(),
        upstream,
        stop,
    ))
}

/// The clean stage until `until`; raises `done` when it returns.
pub(crate) async fn clean_stage(
    shared: Shared,
    config: Arc<Config>,
    until: Until,
    done: Option<Done>,
) -> crate::Result<crate::clean::CleanSummary> {
    let r = crate::clean::run(shared.log, shared.objects, &config, until).await;
    if let Some(d) = done {
        d.set();
    }
    r
}

/// The infer stage with the registry's model until `until`, starting once
/// `model` is set (at once without one).
pub(crate) async fn infer_stage(
    shared: Shared,
    config: Arc<Config>,
    until: Until,
    model: Option<watch::Receiver<bool>>,
) -> crate::Result<crate::infer::InferSummary> {
    if let Some(mut m) = model {
        let _ = m.wait_for(|d| *d).await;
    }
    let choice = crate::infer::ModelChoice::from_config(&config, None);
    crate::infer::run(
        shared.log,
        shared.table,
        shared.objects,
        &config,
        choice,
        until,
    )
    .await
}

/// Everything `sift run` serves while it runs.
pub(crate) struct World {
    pub(crate) web: web::SampleWeb,
    pub(crate) sources: Vec<crate::ingest::sources::Source>,
    pub(crate) train_file: PathBuf,
    pub(crate) generated: crate::dbusa::generate::Generated,
    pub(crate) standin: Option<crate::matching::standin::StandIn>,
}

/// Runs `sift run`.
pub async fn main(config: &Config, args: RunArgs) -> crate::Result<bool> {
    let started = Instant::now();
    let mut config = config.clone();
    let shared = Shared::open(&config).await?;
    let run_dir = config.data_dir.join(RUN_DIR);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| crate::Error::io(format!("creating {}", run_dir.display()), e))?;

    let world = prepare(&mut config, &args, &run_dir).await?;
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

pub(crate) async fn finish(world: World) {
    if let Some(s) = world.standin {
        s.stop().await;
    }
    world.web.stop().await;
}

fn new_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..16)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Starts the sample web, writes the training split, generates the
/// consumer database, and starts the enrichment stand-in unless a real API
/// key is configured (then `config` keeps the real API).
pub(crate) async fn prepare(
    config: &mut Config,
    args: &RunArgs,
    run_dir: &Path,
) -> crate::Result<World> {
    let docs = crate::sample::bundled()?;
    let (mut web_docs, train_docs): (Vec<LabeledDoc>, Vec<LabeledDoc>) =
        docs.into_iter().partition(|d| on_the_web(&d.id));
    if args.documents > 0 {
        web_docs.truncate(args.documents);
    }
    let train_file = run_dir.join("train.jsonl");
    write_training_split(&train_docs, &train_file)?;

    let web = web::SampleWeb::start(
        &web_docs,
        &web::WebOptions {
            sites: args.sites,
            port: args.web_port,
            broken: true,
        },
    )
    .await?;
    let sources_file = run_dir.join("sources.toml");
    let text = web.sources_toml();
    std::fs::write(&sources_file, &text)
        .map_err(|e| crate::Error::io(format!("writing {}", sources_file.display()), e))?;
    let sources = crate::ingest::sources::parse(&text, &sources_file)
        .map_err(crate::ingest::IngestError::from)?;

    let spec = crate::dbusa::generate::Spec {
        rows: args.people,
        seed: args.seed,
        profiles: args.profiles,
        outsiders: args.outsiders,
        housemates: 0,
        profile_rows: 0,
    };
    let generated = generate(&spec, run_dir)?;

    let standin = if config.enrich.api_key.is_empty() {
        let key = new_password();
        let answers = crate::dbusa::person::read_answers(&generated.enrichment)?;
        let s = crate::matching::standin::start(
            ([127, 0, 0, 1], 0).into(),
            key.clone(),
            answers,
            crate::matching::standin::StandInOptions::default(),
        )
        .await?;
        config.enrich.url = s.url();
        config.enrich.api_key = key;
        Some(s)
    } else {
        None
    };
    Ok(World {
        web,
        sources,
        train_file,
        generated,
        standin,
    })
}

fn write_training_split(docs: &[LabeledDoc], path: &Path) -> crate::Result<()> {
    let mut out = String::new();
    for d in docs {
        let line = serde_json::json!({
            "id": d.id, "title": d.title, "text": d.text, "tags": d.tags,
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    std::fs::write(path, out)
        .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))
}

/// Generates the consumer database once per spec (the generator is
/// deterministic, so a finished directory is reused).
fn generate(
    spec: &crate::dbusa::generate::Spec,
    run_dir: &Path,
) -> crate::Result<crate::dbusa::generate::Generated> {
    let dir = run_dir.join(format!(
        "dbusa-seed{}-{}-{}-{}",
        spec.seed, spec.rows, spec.profiles, spec.outsiders
    ));
    let marker = dir.join("complete.json");
    if let Ok(text) = std::fs::read_to_string(&marker) {
        if let Ok(g) = serde_json::from_str::<crate::dbusa::generate::Generated>(&text) {
            return Ok(g);
        }
    }
    let g = crate::dbusa::generate::generate(spec, &dir)?;
    let text = serde_json::to_string(&g)
        .map_err(|e| crate::Error::Invalid(format!("cannot encode {}: {e}", marker.display())))?;
    std::fs::write(&marker, text)
        .map_err(|e| crate::Error::io(format!("writing {}", marker.display()), e))?;
    Ok(g)
}

/// The `sift train` arguments of the run: its training split, the
/// analysts' decisions, flags from the environment (`SIFT_TRAIN_PRESET`,
/// `SIFT_TRAIN_DEVICE`, …).
pub(crate) fn train_args(world: &World, args: &RunArgs) -> crate::Result<crate::train::TrainArgs> {
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        train: crate::train::TrainArgs,
    }
    let mut argv = vec![
        "train".to_owned(),
        "--quiet".to_owned(),
        "--data".to_owned(),
        world.train_file.display().to_string(),
    ];
    if let Some(e) = args.epochs {
        argv.push("--epochs".into());
        argv.push(e.to_string());
    }
    Wrapper::try_parse_from(argv)
        .map(|w| w.train)
        .map_err(|e| crate::Error::Invalid(format!("the training arguments: {e}")))
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
        let train_args = train_args(world, args)?;
        let retrain = args.retrain;
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

/// Trains on the run's split unless the registry has a LATEST model (and
/// `retrain` is off); either way the model infer will use.
pub(crate) async fn train_or_reuse(
    config: &Config,
    args: &crate::train::TrainArgs,
    objects: Arc<dyn ObjectStore>,
    table: Arc<dyn Table>,
    retrain: bool,
) -> crate::Result<ModelSummary> {
    let failed = |e: &dyn std::fmt::Display| crate::Error::Invalid(format!("training: {e}"));
    let registry = crate::train::registry::Registry::new(objects.clone(), &config.train.prefix);
    if !retrain {
        if let Some((latest, _)) = registry.latest().await.map_err(|e| failed(&e))? {
            let metrics = registry
                .metrics(&latest.version)
                .await
                .map_err(|e| failed(&e))?;
            return Ok(ModelSummary::reused(&latest.version, &metrics));
        }
    }
    let outcome = crate::train::run_once(config, args, objects, Some(table))
        .await
        .map_err(|e| failed(&e))?;
    Ok(ModelSummary::trained(&outcome))
}

/// Loads the generated database into the search index (resuming, or
/// nothing when an earlier run loaded the same file).
pub(crate) async fn load_database(
    config: &Config,
    shared: &Shared,
    generated: &crate::dbusa::generate::Generated,
) -> crate::Result<crate::dbusa::load::LoadSummary> {
    // The demonstration owns its index: one an earlier sift made with other
    // fields is rebuilt rather than refused.
    let index = &config.dbusa.index;
    let recreate = match shared
        .search
        .ensure_index(&crate::dbusa::index::spec(index))
        .await
    {
        Ok(()) => false,
        Err(e @ crate::backends::search::SearchError::SchemaMismatch { .. }) => {
            tracing::warn!(%index, "{e}; rebuilding it");
            true
        }
        Err(e) => return Err(e.into()),
    };
    let options = crate::dbusa::load::LoadOptions {
        progress: false,
        ..crate::dbusa::load::LoadOptions::new(
            config,
            &crate::dbusa::load::LoadArgs {
                file: generated.database.clone(),
                index: None,
                bulk_docs: None,
                workers: None,
                from_scratch: false,
                recreate,
                checkpoint_every: None,
                json: false,
            },
        )
    };
    crate::dbusa::load::load(shared.search.clone(), &options).await
}

/// Publishes the generated profiles to `sift.profiles`, and three malformed
/// records so the dead-letter path shows; returns the profiles (with truth).
pub(crate) async fn publish_profiles(
    config: &Config,
    shared: &Shared,
    generated: &crate::dbusa::generate::Generated,
) -> crate::Result<Vec<crate::dbusa::person::Profile>> {
    let profiles = crate::dbusa::person::read_profiles(&generated.profiles)?;
    crate::matching::daemon::prepare(config, shared.log.as_ref(), shared.table.as_ref()).await?;
    let mut records: Vec<Record> = profiles
        .iter()
        .map(|p| {
            let value = serde_json::to_vec(&crate::matching::matcher::ProfileIn::from(p))
                .unwrap_or_default();
            Record::new(format!("{}:{}", p.network, p.handle), value)
        })
        .collect();
    for bad in MALFORMED_PROFILES {
        records.push(Record::new("sample-malformed", Bytes::from_static(bad)));
    }
    for chunk in records.chunks(1000) {
        shared.log.produce(topics::PROFILES, chunk.to_vec()).await?;
    }
    Ok(profiles)
}

/// The match daemon's parts over the shared backends: the configured
/// matcher and its cache.
pub(crate) async fn matching_parts(
    config: &Config,
    shared: &Shared,
) -> crate::Result<crate::matching::daemon::Parts> {
    let (matcher, cache) =
        crate::matching::matcher_on(config, shared.search.clone(), shared.table.clone()).await?;
    Ok(crate::matching::daemon::Parts {
        log: shared.log.clone(),
        objects: shared.objects.clone(),
        table: shared.table.clone(),
        cache,
        matcher,
    })
}

/// Rebuilds the handle → person cache from `handles`.
pub(crate) async fn refresh_cache(
    config: &Config,
    table: &Arc<dyn Table>,
    cache: &Arc<dyn crate::backends::Cache>,
) -> crate::Result<crate::matching::refresh::Refreshed> {
    let ttl = Some(config.matching.cache_ttl).filter(|d| !d.is_zero());
    crate::matching::refresh::refresh(table, cache, ttl).await
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

/// Records that are not profiles, published with the sample's profiles so
/// the summary shows them counted in the dead-letter topic.
const MALFORMED_PROFILES: [&[u8]; 3] = [
    b"{\"network\": \"twitter\", \"handle\": ",
    br#"{"v": 2, "network": "twitter", "handle": "from_the_future"}"#,
    br#"{"network": "no such network!", "handle": "x"}"#,
];

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
    match train_args(world, args) {
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
