//! What `sift run` and `sift bench e2e` share: the backends opened once
//! ([`Shared`]), the world they build ([`prepare`]: the sample web, the
//! training split, the generated consumer database, the enrichment
//! stand-in), the stages they start over it, and how a stage's first pass
//! knows it is done ([`Done`], [`until_drained`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use rand::Rng;
use tokio::sync::watch;

use super::summary::ModelSummary;
use super::web;
use crate::backends::log::{Log, Record};
use crate::backends::objects::ObjectStore;
use crate::backends::search::SearchIndex;
use crate::backends::table::Table;
use crate::config::Config;
use crate::daemon::Until;
use crate::envelope::topics;
use crate::sample::LabeledDoc;

/// The world `sift run` and `sift bench e2e` build: the sample web, the
/// generated consumer database, and whether the model is trained again.
#[derive(Debug, Clone, clap::Args)]
pub struct WorldArgs {
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
}

/// Where `sift run` keeps its generated inputs, under the data dir.
pub const RUN_DIR: &str = "run";

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
pub(super) async fn drained(
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
pub(super) async fn stopped(mut stop: watch::Receiver<bool>) {
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

pub(crate) async fn finish(world: World) {
    if let Some(s) = world.standin {
        s.stop().await;
    }
    world.web.stop().await;
}

pub(super) fn new_password() -> String {
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
    args: &WorldArgs,
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
pub(crate) fn train_args(
    world: &World,
    args: &WorldArgs,
) -> crate::Result<crate::train::TrainArgs> {
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

/// Records that are not profiles, published with the sample's profiles so
/// the summary shows them counted in the dead-letter topic.
pub(super) const MALFORMED_PROFILES: [&[u8]; 3] = [
    b"{\"network\": \"twitter\", \"handle\": ",
    br#"{"v": 2, "network": "twitter", "handle": "from_the_future"}"#,
    br#"{"network": "no such network!", "handle": "x"}"#,
];
