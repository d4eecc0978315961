//! The `sift` command line: one subcommand per daemon or tool.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};

use sift::backends::log::{Log, Offset};
use sift::backends::{self, objects::PutMode, table::Scan};
use sift::config::{self, Loaded, Sources};

// candle allocates a fresh buffer for every tensor operation; glibc's
// allocator hands large ones back to the kernel and faults them in again on
// the next step, which halved training speed. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sift: ingest, clean, classify and review documents; link social profiles to people.
#[derive(Parser)]
#[command(version, propagate_version = true, max_term_width = 100)]
struct Cli {
    /// Config file (TOML). Without it, ./sift.toml is used if present, else built-in defaults.
    #[arg(long, global = true, env = "SIFT_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for every embedded backend's files (overrides `data_dir` in the config).
    #[arg(long, global = true, env = "SIFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole pipeline in one process on a bundled sample web and a generated database.
    Run(sift::run::RunArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect and manage log topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Check the embedded log's files, and repair what can be repaired.
    #[command(subcommand)]
    Log(sift::logcmd::LogCommand),
    /// Inspect the wide-column table.
    #[command(subcommand)]
    Table(TableCommand),
    /// Inspect and manage the object store.
    #[command(subcommand)]
    Objects(ObjectsCommand),
    /// Fetch every source in the sources file, extract text, and produce documents to `sift.raw`.
    Ingest(sift::ingest::IngestArgs),
    /// Normalize, language-tag and de-duplicate `sift.raw` into `sift.clean`.
    Clean(sift::clean::CleanArgs),
    /// Archive `sift.raw` to the object store as zstd JSON lines by date and source.
    Archive(sift::archive::ArchiveArgs),
    /// Print the title and text the ingest extractor gets from HTML, PDF or text files.
    Extract(sift::ingest::extract::ExtractArgs),
    /// Train the category model, publish it to the registry, and promote it if it beats LATEST.
    Train(sift::train::TrainArgs),
    /// List, inspect, promote and roll back models in the registry.
    #[command(subcommand)]
    Models(sift::train::models::ModelsCommand),
    /// Print the top categories of files or of JSON lines on stdin.
    Classify(sift::classify::ClassifyArgs),
    /// Score `sift.clean` with the model: top 5 categories to the documents table and `sift.categorized`.
    Infer(sift::infer::InferArgs),
    /// The consumer database: generate a synthetic one with profiles and their truth.
    #[command(subcommand)]
    Dbusa(sift::dbusa::DbusaCommand),
    /// Benchmarks that need the whole binary: the model alone, the inference daemon end to end.
    #[command(subcommand)]
    Bench(sift::bench::BenchCommand),
    /// Link social profiles (`sift.profiles`, or a file with --input) to people in the consumer database.
    Match(sift::matching::MatchArgs),
    /// The handle → person cache: rebuild it from the `handles` table.
    #[command(subcommand)]
    Cache(sift::matching::CacheCommand),
    /// The enrichment API: look a handle up, or serve the local stand-in.
    #[command(subcommand)]
    Enrich(sift::matching::enrich_cli::EnrichCommand),
    /// The analysts' review UI: pick one of the top 5, choose another label, or reject.
    Review(sift::review::ReviewArgs),
    /// The dead-letter topic: counts by stage and reason, the latest letters; replay their originals once the cause is fixed.
    #[command(subcommand)]
    Dlq(sift::dlq::replay::DlqCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration, each value with where it came from.
    Show {
        /// Print JSON (values and origins) instead of annotated TOML.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum From {
    /// The earliest stored record.
    Beginning,
    /// Only records produced from now on.
    End,
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// List topics with partitions and stored offsets.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Partitions, offsets, segments, quarantine files and damage of the log.
    Describe {
        /// Only this topic.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A consumer group's committed offsets beside what each partition holds;
    /// move them with --reset-to.
    Offsets {
        /// Consumer group (e.g. sift-infer).
        group: String,
        /// Only this topic (needed with --reset-to).
        #[arg(long)]
        topic: Option<String>,
        /// Move the group: `earliest`, `latest` or an offset (no member of the
        /// group may be running).
        #[arg(long)]
        reset_to: Option<sift::logcmd::ResetTo>,
    },
    /// Create a topic (no-op if it exists).
    Create {
        /// Topic name.
        name: String,
        /// Partitions (default: log.default_partitions).
        #[arg(long, short)]
        partitions: Option<u32>,
    },
    /// Print records of a topic as JSON lines.
    Tail {
        /// Topic name.
        name: String,
        /// Only this partition (default: all).
        #[arg(long, short)]
        partition: Option<u32>,
        /// Where to start.
        #[arg(
            long,
            value_enum,
            default_value = "beginning",
            conflicts_with = "offset"
        )]
        from: From,
        /// Start at this offset in every partition read.
        #[arg(long)]
        offset: Option<Offset>,
        /// Stop after this many records (0 = no limit).
        #[arg(long, short = 'n', default_value_t = 20)]
        max: usize,
        /// Keep waiting for new records.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum TableCommand {
    /// List tables and their column families.
    List,
    /// Print one row.
    Get {
        /// Table name.
        table: String,
        /// Row key.
        row: String,
        /// Only these column families.
        #[arg(long = "family", short)]
        families: Vec<String>,
        /// Print whole values instead of the first 120 characters.
        #[arg(long)]
        full: bool,
    },
    /// Print rows in key order.
    Scan {
        /// Table name.
        table: String,
        /// Only rows whose key starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// First row key (inclusive).
        #[arg(long)]
        start: Option<String>,
        /// Row key to stop before.
        #[arg(long)]
        stop: Option<String>,
        /// Only these column families.
        #[arg(long = "family", short)]
        families: Vec<String>,
        /// At most this many rows (0 = all).
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// Print whole values instead of the first 120 characters.
        #[arg(long)]
        full: bool,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ObjectsCommand {
    /// List objects under a prefix.
    Ls {
        /// Key prefix (default: everything).
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Write an object's body to stdout or a file.
    Get {
        /// Object key.
        key: String,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Store a file as an object.
    Put {
        /// Object key.
        key: String,
        /// File to upload.
        file: PathBuf,
        /// Fail if the object exists.
        #[arg(long)]
        if_absent: bool,
    },
    /// Delete an object.
    Rm {
        /// Object key.
        key: String,
    },
}

/// Exit status of a command whose reader went away, as a shell reports a
/// tool ended by SIGPIPE (128 + 13): `sift topics list | head` ends quietly.
const CLOSED_PIPE: u8 = 141;

/// `println!` panics when stdout is a closed pipe; end the process quietly
/// instead, as other command-line tools do. Every other panic is reported as
/// before.
fn quiet_on_closed_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(i32::from(CLOSED_PIPE));
        }
        report(info);
    }));
}

/// True when `e` comes from writing to a reader that went away.
fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> std::process::ExitCode {
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    let loaded = match config::load(&Sources::from_cli(cli.config.clone(), cli.data_dir.clone())) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    sift::telemetry::init(loaded.config.telemetry.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, loaded)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if is_closed_pipe(&e) => std::process::ExitCode::from(CLOSED_PIPE),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: most of sift's errors already
/// put their source in their own message.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

async fn dispatch(command: Command, loaded: Loaded) -> anyhow::Result<()> {
    let config = &loaded.config;
    match command {
        Command::Run(args) => {
            if sift::run::main(config, args).await? {
                Ok(())
            } else {
                bail!("a stage processed nothing in the first pass (see the summary)")
            }
        }
        Command::Config(ConfigCommand::Show { json }) => {
            if json {
                let origins: serde_json::Map<String, serde_json::Value> = loaded
                    .origins
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string().into()))
                    .collect();
                let out = serde_json::json!({ "config": loaded.redacted(), "origins": origins });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", loaded.render());
            }
            Ok(())
        }
        Command::Topics(cmd) => topics(config, cmd).await,
        Command::Log(cmd) => sift::logcmd::log_command(config, cmd),
        Command::Table(cmd) => table(config, cmd).await,
        Command::Objects(cmd) => objects(config, cmd).await,
        Command::Ingest(args) => Ok(sift::ingest::main(config, args).await?),
        Command::Clean(args) => Ok(sift::clean::main(config, args).await?),
        Command::Archive(args) => Ok(sift::archive::main(config, args).await?),
        Command::Extract(args) => Ok(sift::ingest::extract::main(args)?),
        Command::Train(args) => Ok(sift::train::main(config, args).await?),
        Command::Models(command) => Ok(sift::train::models::main(config, command).await?),
        Command::Classify(args) => Ok(sift::classify::main(config, args).await?),
        Command::Infer(args) => Ok(sift::infer::main(config, args).await?),
        Command::Dbusa(command) => Ok(sift::dbusa::main(config.clone(), command).await?),
        Command::Bench(command) => Ok(sift::bench::main(config, command).await?),
        Command::Match(args) => Ok(sift::matching::main(config, args).await?),
        Command::Cache(command) => Ok(sift::matching::cache_main(config, command).await?),
        Command::Enrich(command) => {
            Ok(sift::matching::enrich_cli::main(config.clone(), command).await?)
        }
        Command::Review(args) => Ok(sift::review::main(config, args).await?),
        Command::Dlq(command) => Ok(sift::dlq::replay::main(config, command).await?),
    }
}

fn text(b: &Bytes, full: bool) -> String {
    let s = String::from_utf8_lossy(b);
    if full || s.chars().count() <= 120 {
        s.replace('\n', "\\n")
    } else {
        let cut: String = s.chars().take(120).collect();
        format!("{}… ({} bytes)", cut.replace('\n', "\\n"), b.len())
    }
}

async fn topics(config: &config::Config, cmd: TopicsCommand) -> anyhow::Result<()> {
    match &cmd {
        TopicsCommand::Describe { name, json } => {
            return sift::logcmd::describe(config, name.as_deref(), *json).await;
        }
        TopicsCommand::Offsets {
            group,
            topic,
            reset_to,
        } => return sift::logcmd::offsets(config, group, topic.as_deref(), reset_to.clone()).await,
        _ => {}
    }
    // Reading commands change nothing, and run beside the daemons; following
    // a topic needs the records other processes append, so it opens the log
    // as its owner.
    let reads_only = match &cmd {
        TopicsCommand::List { .. } => true,
        TopicsCommand::Tail { follow, .. } => !follow,
        _ => false,
    };
    let log = if reads_only {
        backends::open_log_read_only(config).await?
    } else {
        backends::open_log(config).await?
    };
    match cmd {
        TopicsCommand::Describe { .. } | TopicsCommand::Offsets { .. } => Ok(()),
        TopicsCommand::List { json } => {
            let mut rows = Vec::new();
            for t in log.list_topics().await? {
                let marks = log.watermarks(&t.name).await?;
                let (mut stored, mut next) = (0u64, 0u64);
                for w in &marks {
                    stored = stored
                        .saturating_add(log.count(&t.name, w.partition, &w.low, &w.high).await?);
                    next = next.saturating_add(
                        log.count(&t.name, w.partition, &Offset::ZERO, &w.high)
                            .await?,
                    );
                }
                rows.push(serde_json::json!({
                    "name": t.name, "partitions": t.partitions, "stored": stored, "produced": next,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<32} {:>10} {:>12} {:>12}",
                    "TOPIC", "PARTITIONS", "STORED", "PRODUCED"
                );
                for r in rows {
                    println!(
                        "{:<32} {:>10} {:>12} {:>12}",
                        r["name"].as_str().unwrap_or_default(),
                        r["partitions"],
                        r["stored"],
                        r["produced"]
                    );
                }
            }
            Ok(())
        }
        TopicsCommand::Create { name, partitions } => {
            let n = partitions.unwrap_or(config.log.default_partitions);
            if log.create_topic(&name, n).await? {
                println!("created topic {name} with {n} partitions");
            } else {
                println!("topic {name} already exists");
            }
            Ok(())
        }
        TopicsCommand::Tail {
            name,
            partition,
            from,
            offset,
            max,
            follow,
        } => tail(log.as_ref(), &name, partition, from, offset, max, follow).await,
    }
}

async fn tail(
    log: &dyn Log,
    name: &str,
    partition: Option<u32>,
    from: From,
    offset: Option<Offset>,
    max: usize,
    follow: bool,
) -> anyhow::Result<()> {
    let marks = log.watermarks(name).await?;
    let mut positions: Vec<(u32, Offset)> = marks
        .iter()
        .filter(|w| partition.is_none_or(|p| p == w.partition))
        .map(|w| {
            let start = match (&offset, from) {
                (Some(o), _) => o.clone().max(w.low.clone()),
                (None, From::Beginning) => w.low.clone(),
                (None, From::End) => w.high.clone(),
            };
            (w.partition, start)
        })
        .collect();
    if positions.is_empty() {
        bail!("topic {name} has no partition {}", partition.unwrap_or(0));
    }
    let mut printed = 0usize;
    let stdout = std::io::stdout();
    loop {
        let mut any = false;
        for (p, pos) in positions.iter_mut() {
            let want = if max == 0 {
                1000
            } else {
                (max - printed).min(1000)
            };
            if want == 0 {
                return Ok(());
            }
            let batch = log.fetch(name, *p, pos, want).await?;
            let mut out = stdout.lock();
            for m in &batch {
                let headers: serde_json::Map<String, serde_json::Value> = m
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into()))
                    .collect();
                let value = serde_json::from_slice::<serde_json::Value>(&m.value)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&m.value).into());
                let line = serde_json::json!({
                    "partition": m.partition, "offset": m.offset, "timestamp_ms": m.timestamp_ms,
                    "key": m.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
                    "headers": headers, "value": value,
                });
                writeln!(out, "{line}")?;
                *pos = m.offset.next();
                printed += 1;
                any = true;
            }
        }
        if max > 0 && printed >= max {
            return Ok(());
        }
        if !any {
            if !follow {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn table(config: &config::Config, cmd: TableCommand) -> anyhow::Result<()> {
    let table = backends::open_table(config).await?;
    let print_row = |row: &sift::backends::table::Row, full: bool| {
        println!("{}", String::from_utf8_lossy(&row.key));
        for c in &row.cells {
            println!(
                "  {}:{} @{} = {}",
                c.family,
                String::from_utf8_lossy(&c.qualifier),
                c.timestamp_ms,
                text(&c.value, full)
            );
        }
    };
    match cmd {
        TableCommand::List => {
            for (name, families) in table.list_tables().await? {
                println!("{name}  families: {}", families.join(", "));
            }
            Ok(())
        }
        TableCommand::Get {
            table: name,
            row,
            families,
            full,
        } => {
            let fams = (!families.is_empty()).then_some(families);
            match table.get(&name, row.as_bytes(), fams.as_deref()).await? {
                Some(r) => {
                    print_row(&r, full);
                    Ok(())
                }
                None => bail!("no row `{row}` in table {name}"),
            }
        }
        TableCommand::Scan {
            table: name,
            prefix,
            start,
            stop,
            families,
            limit,
            full,
            json,
        } => {
            let scan = Scan {
                start: start.map(Bytes::from),
                stop: stop.map(Bytes::from),
                prefix: prefix.map(Bytes::from),
                families: (!families.is_empty()).then_some(families),
                limit,
            };
            let rows = table.scan(&name, &scan).await?;
            for r in &rows {
                if json {
                    println!("{}", serde_json::to_string(r)?);
                } else {
                    print_row(r, full);
                }
            }
            if !json {
                eprintln!("({} rows)", rows.len());
            }
            Ok(())
        }
    }
}

async fn objects(config: &config::Config, cmd: ObjectsCommand) -> anyhow::Result<()> {
    let store = backends::open_objects(config).await?;
    match cmd {
        ObjectsCommand::Ls { prefix } => {
            let list = store.list(&prefix).await?;
            for m in &list {
                println!("{:>12}  {}  {}", m.size, m.etag, m.key);
            }
            eprintln!("({} objects)", list.len());
            Ok(())
        }
        ObjectsCommand::Get { key, output } => {
            let (_, mut reader) = store.get_stream(&key).await?;
            match output {
                Some(path) => {
                    let mut f = tokio::fs::File::create(&path)
                        .await
                        .with_context(|| format!("creating {}", path.display()))?;
                    tokio::io::copy(&mut reader, &mut f).await?;
                }
                None => {
                    let mut out = tokio::io::stdout();
                    tokio::io::copy(&mut reader, &mut out).await?;
                }
            }
            Ok(())
        }
        ObjectsCommand::Put {
            key,
            file,
            if_absent,
        } => {
            let f = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("opening {}", file.display()))?;
            let mode = if if_absent {
                PutMode::IfAbsent
            } else {
                PutMode::Overwrite
            };
            let m = store.put_stream(&key, Box::new(f), mode).await?;
            println!("stored {} ({} bytes, ETag {})", m.key, m.size, m.etag);
            Ok(())
        }
        ObjectsCommand::Rm { key } => {
            store.delete(&key).await?;
            println!("deleted {key}");
            Ok(())
        }
    }
}
