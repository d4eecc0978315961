//! `sift dbusa load`: the consumer database CSV into the search index.
//!
//! The file is read as a stream (never whole), one chunk of `bulk_docs` rows
//! at a time; each chunk becomes one bulk request of [`person_doc`]
//! documents, with up to `workers` requests in flight. Requests finish out of order, so the loader keeps a
//! contiguous watermark: the byte offset up to which every row has been
//! acknowledged by the index. The watermark goes into a checkpoint,
//! `{data_dir}/dbusa-load/{index}.checkpoint.json`, replaced atomically (temp
//! file, fsync, rename, fsync of the folder) at most every
//! `--checkpoint-every` ([`CHECKPOINT_EVERY`] by default) and at the end.
//! Before each write the index is asked to make what it acknowledged durable
//! ([`SearchIndex::persist`]: the embedded index commits only then during a
//! load), so the watermark never passes a row a crash could take back.
//!
//! A run on the same file (same canonical path, size and hash of its first
//! 64 KiB) continues from the watermark. Rows after it that an earlier run
//! had already sent are sent again; documents are keyed by `dbusa_id`, so
//! they replace themselves and nothing is duplicated. Another file, or
//! `--from-scratch`, starts at the first row; documents of earlier loads stay
//! in the index until it is removed.
//!
//! Rows that cannot be used are not fatal. A row with another number of
//! fields than the header, an empty `dbusa_id`, a field that is not UTF-8 or
//! a `birth_year` that is not a whole number from 0 to 65535 is rejected, and
//! so is a document the index refuses. Each goes, with its line number and
//! the reason, to `{index}.rejects.jsonl` next to the checkpoint, written in
//! file order as the watermark passes it. An empty `birth_year` is accepted
//! as 0: unknown (the person's other fields still serve matching).
//!
//! The index is put in bulk-load mode for the load
//! ([`SearchIndex::begin_bulk_load`]: on Elasticsearch refreshes off and no
//! replicas) and put back afterwards. The settings it had are saved in the
//! checkpoint before they are changed, so a load killed in the middle and
//! resumed puts back the original settings, not the bulk-load ones it finds.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, IsTerminal as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::index::{person_doc, spec};
use super::person::{Person, COLUMNS};
use crate::backends::search::{BulkReport, LoadSettings, SearchDoc, SearchError, SearchIndex};
use crate::config::Config;
use crate::Error;

/// Folder under the data directory for checkpoints, rejects and locks.
pub const STATE_DIR: &str = "dbusa-load";
/// Default shortest time between two checkpoint writes while the watermark
/// moves: what a crash may make the next run send again.
/// Each write also commits the embedded index, whose every commit closes
/// segments that merges then rewrite: at 500 ms a load of a million rows ran
/// 15 % slower than at 5 s (`benches/README.md`).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// Bytes of the start of the file hashed into its identity.
const HEAD_BYTES: u64 = 64 * 1024;
/// Attempts of a whole bulk request after the first one (the Elasticsearch
/// client has already retried passing failures by then), with these delays.
const BULK_RETRY_DELAYS: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
/// Seconds between progress log lines when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// Version of the checkpoint format.
const CHECKPOINT_VERSION: u32 = 1;

/// `sift dbusa load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The consumer database CSV: a header row naming the columns of `sift
    /// dbusa generate` (others are ignored), then one person per row.
    pub file: PathBuf,
    /// Search index to load into [default: `dbusa.index` of the config].
    #[arg(long)]
    pub index: Option<String>,
    /// Documents per bulk request [default: `dbusa.bulk_docs` of the config].
    #[arg(long)]
    pub bulk_docs: Option<u32>,
    /// Bulk requests in flight at once [default: `dbusa.workers` of the config].
    #[arg(long)]
    pub workers: Option<u32>,
    /// Start from the first row even where a checkpoint says where to continue.
    #[arg(long)]
    pub from_scratch: bool,
    /// Delete the index first, then load the file from its first row: the
    /// way to rebuild an index made by an earlier sift with other fields.
    #[arg(long)]
    pub recreate: bool,
    /// Shortest time between two checkpoint writes (0s: after every
    /// acknowledged bulk request); a crash makes the next run send at most
    /// this much work again [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub checkpoint_every: Option<Duration>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What [`load`] does.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// The CSV file.
    pub file: PathBuf,
    /// Search index name.
    pub index: String,
    /// Rows per bulk request.
    pub bulk_docs: usize,
    /// Bulk requests in flight at once.
    pub workers: usize,
    /// Ignore the checkpoint and start from the first row.
    pub from_scratch: bool,
    /// Delete the index before loading (implies `from_scratch`).
    pub recreate: bool,
    /// Shortest time between two checkpoint writes.
    pub checkpoint_every: Duration,
    /// Folder of the checkpoint, the rejects file and the lock
    /// (`{data_dir}/dbusa-load`).
    pub state_dir: PathBuf,
    /// Show progress on stderr: a bar on a terminal, else a log line every few seconds.
    pub progress: bool,
}

impl LoadOptions {
    /// The options of `args`, with the config's values where a flag is absent.
    pub fn new(config: &Config, args: &LoadArgs) -> Self {
        LoadOptions {
            file: args.file.clone(),
            index: args
                .index
                .clone()
                .unwrap_or_else(|| config.dbusa.index.clone()),
            bulk_docs: args.bulk_docs.unwrap_or(config.dbusa.bulk_docs) as usize,
            workers: args.workers.unwrap_or(config.dbusa.workers) as usize,
            from_scratch: args.from_scratch || args.recreate,
            recreate: args.recreate,
            checkpoint_every: args.checkpoint_every.unwrap_or(CHECKPOINT_EVERY),
            state_dir: config.data_dir.join(STATE_DIR),
            progress: true,
        }
    }

    /// Where the checkpoint of this index is kept.
    pub fn checkpoint_path(&self) -> PathBuf {
        checkpoint_path(&self.state_dir, &self.index)
    }

    /// Where the rejected rows of this index are listed.
    pub fn rejects_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.rejects.jsonl", self.index))
    }

    fn lock_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.lock", self.index))
    }
}

/// The checkpoint of the load into `index`, in `state_dir`.
pub fn checkpoint_path(state_dir: &Path, index: &str) -> PathBuf {
    state_dir.join(format!("{index}.checkpoint.json"))
}

/// Which file a checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Canonical path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the first 64 KiB, hex.
    pub head_blake3: String,
}

impl FileIdentity {
    /// The identity of the file at `path`.
    pub fn of(path: &Path) -> crate::Result<Self> {
        let canonical = fs::canonicalize(path)
            .map_err(|e| Error::io(format!("cannot find {}", path.display()), e))?;
        let mut file = File::open(&canonical)
            .map_err(|e| Error::io(format!("cannot open {}", canonical.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot read {}", canonical.display()), e))?
            .len();
        let mut head = Vec::with_capacity(HEAD_BYTES as usize);
        (&mut file)
            .take(HEAD_BYTES)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(format!("cannot read {}", canonical.display()), e))?;
        Ok(FileIdentity {
            path: canonical,
            size,
            head_blake3: blake3::hash(&head).to_hex().to_string(),
        })
    }
}

/// Where a load stands: what survives between runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// Search index loaded into.
    pub index: String,
    /// The input file.
    pub file: FileIdentity,
    /// Byte offset in the file up to which every row has been acknowledged
    /// by the index (or rejected); the next run reads from here.
    pub offset: u64,
    /// Line number of the row at `offset` (1 is the header).
    pub line: u64,
    /// Rows read before `offset` (header excluded).
    pub rows_read: u64,
    /// Documents the index acknowledged, all runs together.
    pub rows_loaded: u64,
    /// Rows rejected before `offset`, all runs together.
    pub rejected: u64,
    /// Length of the rejects file that lists those rejects; a resumed run
    /// cuts it back to this, so no reject is listed twice.
    pub rejects_bytes: u64,
    /// Index settings from before the first run changed them, to put back at the end.
    pub restore: Option<LoadSettings>,
    /// The whole file is loaded and the settings are restored.
    pub complete: bool,
    /// When this checkpoint was written (seconds since the Unix epoch).
    pub updated_unix: u64,
    /// The index held no documents when the load of this file began at its
    /// first row: a row past `sent` was never sent, so it is added as a new
    /// document without looking for an older copy to replace (false in
    /// checkpoints written before this field: every row replaces).
    #[serde(default)]
    pub fresh: bool,
    /// Byte offset up to which rows may have been sent, by any run: past
    /// `offset`, the index may hold some of them.
    #[serde(default)]
    pub sent: u64,
}

impl Checkpoint {
    /// Reads the checkpoint at `path`; None when there is none.
    pub fn read(path: &Path) -> crate::Result<Option<Self>> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::Invalid(format!(
                "the checkpoint {} is not readable ({e}); remove it, or run with \
                 --from-scratch to load the file from its first row",
                path.display()
            ))
        })
    }

    /// Replaces the checkpoint at `path` as a whole: temp file, fsync, rename,
    /// fsync of the folder.
    pub fn write(&mut self, path: &Path) -> crate::Result<()> {
        self.updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Invalid(format!("cannot encode the checkpoint: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        let io = |what: &str, p: &Path, e| Error::io(format!("{what} {}", p.display()), e);
        {
            let mut file = File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
            file.write_all(&json)
                .and_then(|()| file.sync_all())
                .map_err(|e| io("cannot write", &tmp, e))?;
        }
        fs::rename(&tmp, path).map_err(|e| io("cannot replace", path, e))?;
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("cannot sync the folder", dir, e))?;
        }
        Ok(())
    }
}

/// One rejected row, as listed in the rejects file (one JSON object a line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Line of the file where the row starts (1 is the header).
    pub line: u64,
    /// Its `dbusa_id`, when it has one.
    pub dbusa_id: String,
    /// Why it was not loaded.
    pub reason: String,
}

/// What a load did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSummary {
    /// Search index.
    pub index: String,
    /// The input file (canonical path).
    pub file: PathBuf,
    /// The checkpoint said this file was loaded already; nothing was done.
    pub already_loaded: bool,
    /// This run continued an earlier one.
    pub resumed: bool,
    /// Byte offset this run started reading at (0 when it did not resume).
    pub resumed_at_byte: u64,
    /// Line this run started reading at (0 when it did not resume).
    pub resumed_at_line: u64,
    /// Why this run started from the first row although a checkpoint existed.
    pub started_over: Option<String>,
    /// Documents the index acknowledged in this run.
    pub rows_loaded: u64,
    /// Documents the index acknowledged, all runs of this load together.
    pub rows_total: u64,
    /// Rows rejected in this run.
    pub rejected: u64,
    /// Rows rejected, all runs together.
    pub rejected_total: u64,
    /// The list of rejected rows.
    pub rejects_file: PathBuf,
    /// The checkpoint.
    pub checkpoint: PathBuf,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
    /// `rows_loaded / seconds`.
    pub rows_per_sec: f64,
    /// Documents in the index after the closing refresh.
    pub index_count: u64,
    /// Rows per bulk request.
    pub bulk_docs: usize,
    /// Bulk requests in flight at once.
    pub workers: usize,
}

/// Loads `options.file` into the index, continuing an unfinished load of
/// the same file; the library entry of `sift dbusa load`.
pub async fn load(
    search: Arc<dyn SearchIndex>,
    options: &LoadOptions,
) -> crate::Result<LoadSummary> {
    let started = Instant::now();
    if options.bulk_docs == 0 || options.workers == 0 {
        return Err(Error::Invalid(format!(
            "bulk_docs ({}) and workers ({}) must be at least 1; set --bulk-docs and --workers",
            options.bulk_docs, options.workers
        )));
    }
    fs::create_dir_all(&options.state_dir)
        .map_err(|e| Error::io(format!("cannot create {}", options.state_dir.display()), e))?;
    let _lock = lock(&options.lock_path(), &options.index)?;
    let checkpoint_path = options.checkpoint_path();
    let rejects_path = options.rejects_path();
    let identity = FileIdentity::of(&options.file)?;
    let previous = if options.from_scratch {
        // A damaged checkpoint does not stop a load that ignores it.
        Checkpoint::read(&checkpoint_path).unwrap_or(None)
    } else {
        Checkpoint::read(&checkpoint_path)?
    };

    // What to do with the checkpoint.
    let same_file = previous.as_ref().is_some_and(|c| {
        c.version == CHECKPOINT_VERSION && c.file == identity && c.index == options.index
    });
    if options.recreate && search.drop_index(&options.index).await? {
        tracing::info!(index = %options.index, "--recreate: deleted the index");
    }
    // A checkpoint of an index removed since describes documents that are gone.
    let index_count = match search.count(&options.index).await {
        Ok(count) => Some(count),
        Err(SearchError::NoSuchIndex(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if index_count.is_some() {
        // An index made by an earlier sift with other fields is refused
        // before anything is written, with the way out.
        search
            .ensure_index(&spec(&options.index))
            .await
            .map_err(|e| match e {
                SearchError::SchemaMismatch { .. } => Error::Invalid(format!(
                    "{e}. It was made by an earlier sift or by another program; \
                     rebuild it with `sift dbusa load --recreate {}`",
                    options.file.display()
                )),
                other => other.into(),
            })?;
    }
    let mut started_over = None;
    let mut resume = None;
    if let Some(prev) = &previous {
        if options.recreate {
            started_over = Some("--recreate: loading the file into a new index".to_owned());
        } else if options.from_scratch {
            started_over = Some("--from-scratch: loading the file from its first row".to_owned());
        } else if index_count.is_none() {
            started_over = Some(format!(
                "index `{}` does not exist (any more); loading the file from its first row",
                options.index
            ));
        } else if same_file && prev.complete {
            return Ok(LoadSummary {
                index: options.index.clone(),
                file: identity.path,
                already_loaded: true,
                resumed: false,
                resumed_at_byte: 0,
                resumed_at_line: 0,
                started_over: None,
                rows_loaded: 0,
                rows_total: prev.rows_loaded,
                rejected: 0,
                rejected_total: prev.rejected,
                rejects_file: rejects_path,
                checkpoint: checkpoint_path,
                seconds: started.elapsed().as_secs_f64(),
                rows_per_sec: 0.0,
                index_count: index_count.unwrap_or(0),
                bulk_docs: options.bulk_docs,
                workers: options.workers,
            });
        } else if same_file {
            resume = Some(prev.clone());
        } else {
            started_over = Some(format!(
                "{} ({} bytes) is not the file of the checkpoint ({}, {} bytes, {}); \
                 loading it from its first row",
                identity.path.display(),
                identity.size,
                prev.file.path.display(),
                prev.file.size,
                if prev.complete {
                    "loaded"
                } else {
                    "unfinished"
                }
            ));
        }
    }
    // Settings saved by an unfinished earlier load are the index's real ones:
    // what is there now may be that load's bulk-load settings.
    let carried = previous
        .as_ref()
        .filter(|p| !p.complete && p.index == options.index && index_count.is_some())
        .and_then(|p| p.restore.clone());

    // The header is checked before anything is written anywhere.
    let (mut reader, columns) = open_csv(&identity.path)?;
    let header_end = reader.position().clone();

    search.ensure_index(&spec(&options.index)).await?;
    let restore = match carried {
        Some(settings) => settings,
        None => search.bulk_load_settings(&options.index).await?,
    };
    let mut checkpoint = match resume {
        Some(mut prev) => {
            prev.restore = Some(restore.clone());
            prev
        }
        None => Checkpoint {
            version: CHECKPOINT_VERSION,
            index: options.index.clone(),
            file: identity.clone(),
            offset: header_end.byte(),
            line: header_end.line(),
            rows_read: 0,
            rows_loaded: 0,
            rejected: 0,
            rejects_bytes: 0,
            restore: Some(restore.clone()),
            complete: false,
            updated_unix: 0,
            fresh: index_count.unwrap_or(0) == 0,
            sent: header_end.byte(),
        },
    };
    let resumed = checkpoint.offset > header_end.byte();
    if resumed {
        tracing::info!(
            file = %identity.path.display(),
            offset = checkpoint.offset,
            line = checkpoint.line,
            rows_loaded = checkpoint.rows_loaded,
            "resuming an unfinished load"
        );
        let mut at = csv::Position::new();
        at.set_byte(checkpoint.offset)
            .set_line(checkpoint.line)
            .set_record(checkpoint.rows_read + 1);
        reader.seek(at).map_err(|e| {
            Error::Invalid(format!(
                "cannot continue {} at byte {}: {e}; run with --from-scratch",
                identity.path.display(),
                checkpoint.offset
            ))
        })?;
    } else if let Some(reason) = &started_over {
        tracing::info!(file = %identity.path.display(), "{reason}");
    }
    let rejects = RejectsFile::open(&rejects_path, checkpoint.rejects_bytes)?;
    // Saved before the settings change.
    checkpoint.write(&checkpoint_path)?;
    search.begin_bulk_load(&options.index).await?;

    let at_start = checkpoint.clone();
    let progress = Arc::new(Progress {
        offset: AtomicU64::new(checkpoint.offset),
        rows: AtomicU64::new(checkpoint.rows_loaded),
    });
    let ticker = options.progress.then(|| {
        spawn_progress(
            Arc::clone(&progress),
            identity.size,
            checkpoint.offset,
            checkpoint.rows_loaded,
        )
    });
    let run = Run {
        search: Arc::clone(&search),
        options,
        checkpoint_path: &checkpoint_path,
        progress: Arc::clone(&progress),
    };
    let outcome = run
        .pipeline(reader, columns, &mut checkpoint, rejects)
        .await;
    if let Some((handle, bar)) = ticker {
        handle.abort();
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    }
    if let Err(e) = outcome {
        // Leave the index usable; the checkpoint keeps the original settings
        // for the run that finishes the load.
        if let Err(restore_error) = search.end_bulk_load(&options.index, &restore).await {
            tracing::warn!(
                index = %options.index,
                error = %restore_error,
                "could not put the index settings back after the failed load; the next run \
                 puts them back when it ends"
            );
        }
        return Err(e);
    }
    search.end_bulk_load(&options.index, &restore).await?;
    let index_count = search.count(&options.index).await?;
    checkpoint.complete = true;
    checkpoint.write(&checkpoint_path)?;
    let seconds = started.elapsed().as_secs_f64();
    let rows_loaded = checkpoint.rows_loaded - at_start.rows_loaded;
    Ok(LoadSummary {
        index: options.index.clone(),
        file: identity.path,
        already_loaded: false,
        resumed,
        resumed_at_byte: if resumed { at_start.offset } else { 0 },
        resumed_at_line: if resumed { at_start.line } else { 0 },
        started_over,
        rows_loaded,
        rows_total: checkpoint.rows_loaded,
        rejected: checkpoint.rejected - at_start.rejected,
        rejected_total: checkpoint.rejected,
        rejects_file: rejects_path,
        checkpoint: checkpoint_path,
        seconds,
        rows_per_sec: if seconds > 0.0 {
            rows_loaded as f64 / seconds
        } else {
            0.0
        },
        index_count,
        bulk_docs: options.bulk_docs,
        workers: options.workers,
    })
}

/// Takes the lock file of one index's load, so two loads never share a checkpoint.
fn lock(path: &Path, index: &str) -> crate::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Invalid(format!(
            "another `sift dbusa load` into index `{index}` is running (it holds {}); \
             wait for it to finish or stop it",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(Error::io(format!("cannot lock {}", path.display()), e))
        }
    }
}

/// Checks that `path` is a CSV whose header names every column a person
/// needs, without loading anything; [`load`] checks it again.
pub fn check_header(path: &Path) -> crate::Result<()> {
    open_csv(path).map(|_| ())
}

/// Opens the CSV and maps its header to the columns a person needs.
fn open_csv(path: &Path) -> crate::Result<(csv::Reader<File>, Columns)> {
    let file =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .buffer_capacity(256 * 1024)
        .from_reader(file);
    let headers = reader.byte_headers().map_err(|e| {
        Error::Invalid(format!(
            "cannot read the header row of {}: {e}",
            path.display()
        ))
    })?;
    let columns = Columns::from_header(headers).map_err(|detail| {
        Error::Invalid(format!(
            "{} cannot be loaded: {detail}; the file needs a header row naming the columns {}",
            path.display(),
            COLUMNS.join(",")
        ))
    })?;
    Ok((reader, columns))
}

/// Where each column a [`Person`] needs is in a row.
#[derive(Debug, Clone)]
struct Columns {
    /// Field index of each of [`COLUMNS`], in that order.
    at: [usize; COLUMNS.len()],
    /// Fields in the header; every row must have as many.
    width: usize,
}

impl Columns {
    /// Finds every required column by name (trimmed, any case); extra columns are ignored.
    fn from_header(header: &csv::ByteRecord) -> Result<Self, String> {
        let names: Vec<String> = header
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                let name = String::from_utf8_lossy(raw);
                let name = if i == 0 {
                    name.trim_start_matches('\u{feff}')
                } else {
                    &name
                };
                name.trim().to_ascii_lowercase()
            })
            .collect();
        if names.iter().all(String::is_empty) {
            return Err("it is empty or has no header row".to_owned());
        }
        let mut at = [0; COLUMNS.len()];
        let mut missing = Vec::new();
        for (slot, column) in at.iter_mut().zip(COLUMNS) {
            match names.iter().position(|n| n == column) {
                Some(i) => *slot = i,
                None => missing.push(column),
            }
        }
        if !missing.is_empty() {
            return Err(format!(
                "the header row has no column {} (it has {})",
                missing.join(", "),
                names.join(",")
            ));
        }
        Ok(Columns {
            at,
            width: header.len(),
        })
    }

    /// The person in `row`, or why the row cannot be used (its id, if any, and the reason).
    fn person(&self, row: &csv::ByteRecord) -> Result<Person, (String, String)> {
        let field = |k: usize| -> Result<&str, String> {
            let raw = row.get(self.at[k]).unwrap_or_default();
            std::str::from_utf8(raw)
                .map(str::trim)
                .map_err(|_| format!("column {} is not valid UTF-8", COLUMNS[k]))
        };
        let id = row
            .get(self.at[0])
            .map(|raw| String::from_utf8_lossy(raw).trim().to_owned())
            .unwrap_or_default();
        if row.len() != self.width {
            return Err((
                id,
                format!(
                    "the row has {} fields, the header {}",
                    row.len(),
                    self.width
                ),
            ));
        }
        let mut values = [""; COLUMNS.len()];
        for (k, value) in values.iter_mut().enumerate() {
            *value = field(k).map_err(|reason| (id.clone(), reason))?;
        }
        let [dbusa_id, first, middle, last, address, city, state, zip, phone, email, birth_year] =
            values;
        if dbusa_id.is_empty() {
            return Err((id, "dbusa_id is empty".to_owned()));
        }
        let birth_year = if birth_year.is_empty() {
            0
        } else {
            birth_year.parse::<u16>().map_err(|_| {
                (
                    id.clone(),
                    format!("birth_year `{birth_year}` is not a year (a whole number, or empty)"),
                )
            })?
        };
        Ok(Person {
            dbusa_id: dbusa_id.to_owned(),
            first: first.to_owned(),
            middle: middle.to_owned(),
            last: last.to_owned(),
            address: address.to_owned(),
            city: city.to_owned(),
            state: state.to_owned(),
            zip: zip.to_owned(),
            phone: phone.to_owned(),
            email: email.to_owned(),
            birth_year,
        })
    }
}

/// Rows read together: one bulk request.
struct Chunk {
    /// Order in the file.
    seq: u64,
    /// Position of the chunk's first row.
    start: u64,
    /// Usable rows.
    people: Vec<Person>,
    /// Line of each of `people`.
    lines: Vec<u64>,
    /// Rows rejected while reading.
    rejects: Vec<Reject>,
    /// Rows read (usable and rejected).
    rows: u64,
    /// Position right after the chunk's last row.
    end: csv::Position,
}

/// A chunk the index has acknowledged.
struct Done {
    rows: u64,
    loaded: u64,
    rejects: Vec<Reject>,
    end: csv::Position,
}

/// Reads `reader` to the end in chunks of `rows` rows and sends them to the loader.
fn read_chunks(
    mut reader: csv::Reader<File>,
    columns: Columns,
    rows: usize,
    file: &Path,
    chunks: mpsc::Sender<Chunk>,
) -> crate::Result<()> {
    let mut record = csv::ByteRecord::new();
    for seq in 0.. {
        let mut chunk = Chunk {
            seq,
            start: reader.position().byte(),
            people: Vec::with_capacity(rows),
            lines: Vec::with_capacity(rows),
            rejects: Vec::new(),
            rows: 0,
            end: reader.position().clone(),
        };
        let mut at_end = false;
        while chunk.rows < rows as u64 {
            let more = reader.read_byte_record(&mut record).map_err(|e| {
                Error::Invalid(format!(
                    "cannot read {} after line {}: {e}",
                    file.display(),
                    reader.position().line()
                ))
            })?;
            if !more {
                at_end = true;
                break;
            }
            chunk.rows += 1;
            let line = record.position().map_or(0, csv::Position::line);
            match columns.person(&record) {
                Ok(person) => {
                    chunk.people.push(person);
                    chunk.lines.push(line);
                }
                Err((dbusa_id, reason)) => chunk.rejects.push(Reject {
                    line,
                    dbusa_id,
                    reason,
                }),
            }
        }
        chunk.end = reader.position().clone();
        if chunk.rows > 0 && chunks.blocking_send(chunk).is_err() {
            // The loader stopped (an error); it reports why.
            return Ok(());
        }
        if at_end {
            break;
        }
    }
    Ok(())
}

/// Sends one chunk's documents, again with backoff when the whole request
/// fails; the index's per-document refusals become rejects.
async fn index_chunk(
    search: Arc<dyn SearchIndex>,
    index: String,
    chunk: Chunk,
    new_rows: bool,
) -> crate::Result<Done> {
    let Chunk {
        people,
        lines,
        mut rejects,
        rows,
        end,
        ..
    } = chunk;
    let mut loaded = 0;
    if !people.is_empty() {
        let people = Arc::new(people);
        let report = bulk_with_retry(search.as_ref(), &index, &people, &lines, new_rows).await?;
        loaded = report.indexed as u64;
        if !report.failed.is_empty() {
            let line_of: HashMap<&str, u64> = people
                .iter()
                .zip(&lines)
                .map(|(p, &l)| (p.dbusa_id.as_str(), l))
                .collect();
            for (id, reason) in report.failed {
                rejects.push(Reject {
                    line: line_of.get(id.as_str()).copied().unwrap_or(0),
                    dbusa_id: id,
                    reason: format!("the index refused the document: {reason}"),
                });
            }
            rejects.sort_by_key(|r| r.line);
        }
    }
    Ok(Done {
        rows,
        loaded,
        rejects,
        end,
    })
}

async fn documents(people: Arc<Vec<Person>>) -> crate::Result<Vec<SearchDoc>> {
    tokio::task::spawn_blocking(move || people.iter().map(person_doc).collect())
        .await
        .map_err(|e| Error::Invalid(format!("building the documents failed: {e}")))
}

async fn bulk_with_retry(
    search: &dyn SearchIndex,
    index: &str,
    people: &Arc<Vec<Person>>,
    lines: &[u64],
    new_rows: bool,
) -> crate::Result<BulkReport> {
    let mut delays = BULK_RETRY_DELAYS.iter();
    let mut attempt = 1;
    loop {
        let docs = documents(Arc::clone(people)).await?;
        // A retry may find part of the failed attempt in the index.
        let sent = if new_rows && attempt == 1 {
            search.bulk_new(index, docs).await
        } else {
            search.bulk(index, docs).await
        };
        let error = match sent {
            Ok(report) => return Ok(report),
            Err(e) => e,
        };
        let passing = matches!(error, SearchError::Engine(_) | SearchError::Io { .. });
        match delays.next() {
            Some(delay) if passing => {
                tracing::warn!(
                    index,
                    attempt,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    %error,
                    "a bulk request failed; sending it again"
                );
                tokio::time::sleep(*delay).await;
                attempt += 1;
            }
            _ => {
                let first = lines.first().copied().unwrap_or(0);
                let last = lines.last().copied().unwrap_or(0);
                return Err(Error::Invalid(format!(
                    "the bulk request of lines {first}-{last} into index `{index}` failed \
                     {attempt} time(s), the last with: {error}; the checkpoint keeps every row \
                     acknowledged so far, so once the index works again the same command \
                     continues the load"
                )));
            }
        }
    }
}

/// The rejects file, appended to in file order.
struct RejectsFile {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes in the file once `out` is flushed.
    len: u64,
}

impl RejectsFile {
    /// Opens the rejects file, cut back to the `keep` bytes the checkpoint covers.
    fn open(path: &Path, keep: u64) -> crate::Result<Self> {
        let io = |e| Error::io(format!("cannot open {}", path.display()), e);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let have = file.metadata().map_err(io)?.len();
        let len = if have < keep {
            tracing::warn!(
                path = %path.display(),
                "the rejects file is shorter than the checkpoint says; earlier rejects may be missing from it"
            );
            have
        } else {
            keep
        };
        file.set_len(len).map_err(io)?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(len)).map_err(io)?;
        Ok(RejectsFile {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            len,
        })
    }

    fn append(&mut self, reject: &Reject) -> crate::Result<()> {
        let mut line = serde_json::to_vec(reject)
            .map_err(|e| Error::Invalid(format!("cannot encode a reject: {e}")))?;
        line.push(b'\n');
        self.out
            .write_all(&line)
            .map_err(|e| Error::io(format!("cannot write {}", self.path.display()), e))?;
        self.len += line.len() as u64;
        Ok(())
    }

    /// Makes what was appended durable, before a checkpoint counts it.
    fn sync(&mut self) -> crate::Result<()> {
        self.out
            .flush()
            .and_then(|()| self.out.get_ref().sync_data())
            .map_err(|e| Error::io(format!("cannot write {}", self.path.display()), e))
    }
}

/// What the progress display reads.
struct Progress {
    /// The watermark.
    offset: AtomicU64,
    /// Rows loaded, all runs.
    rows: AtomicU64,
}

/// Shows progress on stderr until aborted: a bar on a terminal, else a log line every few seconds.
fn spawn_progress(
    progress: Arc<Progress>,
    size: u64,
    start_offset: u64,
    start_rows: u64,
) -> (tokio::task::JoinHandle<()>, Option<indicatif::ProgressBar>) {
    let started = Instant::now();
    let rate = move |rows: u64| {
        let secs = started.elapsed().as_secs_f64();
        if secs > 0.0 {
            (rows.saturating_sub(start_rows)) as f64 / secs
        } else {
            0.0
        }
    };
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(size);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "loading {bar:30} {binary_bytes}/{binary_total_bytes} {msg} eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar.set_position(start_offset);
        bar.reset_eta();
        let shown = bar.clone();
        let handle = tokio::spawn(async move {
            loop {
                let rows = progress.rows.load(Ordering::Relaxed);
                shown.set_position(progress.offset.load(Ordering::Relaxed));
                shown.set_message(format!("{rows} rows, {:.0} rows/s", rate(rows)));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        (handle, Some(bar))
    } else {
        let handle = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOG_EVERY).await;
                let rows = progress.rows.load(Ordering::Relaxed);
                let offset = progress.offset.load(Ordering::Relaxed);
                let percent = if size > 0 {
                    offset as f64 * 100.0 / size as f64
                } else {
                    100.0
                };
                tracing::info!(
                    rows,
                    rows_per_sec = rate(rows).round(),
                    percent = (percent * 10.0).round() / 10.0,
                    "loading"
                );
            }
        });
        (handle, None)
    }
}

/// One run of the loader.
struct Run<'a> {
    search: Arc<dyn SearchIndex>,
    options: &'a LoadOptions,
    checkpoint_path: &'a Path,
    progress: Arc<Progress>,
}

impl Run<'_> {
    /// Reads, sends and acknowledges every row after the checkpoint's
    /// watermark, moving the watermark (and writing the checkpoint) as
    /// contiguous chunks are acknowledged.
    async fn pipeline(
        &self,
        reader: csv::Reader<File>,
        columns: Columns,
        checkpoint: &mut Checkpoint,
        mut rejects: RejectsFile,
    ) -> crate::Result<()> {
        let workers = self.options.workers;
        let (tx, mut rx) = mpsc::channel(workers);
        let file = self.options.file.clone();
        let bulk_docs = self.options.bulk_docs;
        let reading =
            tokio::task::spawn_blocking(move || read_chunks(reader, columns, bulk_docs, &file, tx));

        let mut in_flight: JoinSet<(u64, crate::Result<Done>)> = JoinSet::new();
        let mut finished: BTreeMap<u64, Done> = BTreeMap::new();
        let mut next = 0u64;
        let mut read_all = false;
        let mut written = Instant::now();
        let mut dirty = false;
        // Rows from here on were never sent: in a fresh load, new documents.
        let replace_until = checkpoint.sent;
        // The checkpoint as last written.
        let mut durable = checkpoint.clone();
        loop {
            if read_all && in_flight.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    let (seq, outcome) = joined.map_err(|e| {
                        Error::Invalid(format!("a bulk request task failed: {e}"))
                    })?;
                    let done = match outcome {
                        Ok(done) => done,
                        Err(e) => {
                            // Keep what was acknowledged before the failure.
                            if let Err(save_error) = self.save(checkpoint, &mut durable, &mut rejects).await {
                                tracing::warn!(error = %save_error, "could not save the checkpoint");
                            }
                            return Err(e);
                        }
                    };
                    finished.insert(seq, done);
                    while let Some(done) = finished.remove(&next) {
                        for reject in &done.rejects {
                            rejects.append(reject)?;
                        }
                        checkpoint.offset = done.end.byte();
                        checkpoint.line = done.end.line();
                        checkpoint.rows_read += done.rows;
                        checkpoint.rows_loaded += done.loaded;
                        checkpoint.rejected += done.rejects.len() as u64;
                        self.progress.offset.store(checkpoint.offset, Ordering::Relaxed);
                        self.progress.rows.store(checkpoint.rows_loaded, Ordering::Relaxed);
                        next += 1;
                        dirty = true;
                    }
                    if dirty && written.elapsed() >= self.options.checkpoint_every {
                        self.save(checkpoint, &mut durable, &mut rejects).await?;
                        written = Instant::now();
                        dirty = false;
                    }
                }
                chunk = rx.recv(), if !read_all && in_flight.len() < workers => {
                    match chunk {
                        Some(chunk) => {
                            let (search, index) = (Arc::clone(&self.search), self.options.index.clone());
                            let seq = chunk.seq;
                            let new_rows = checkpoint.fresh && chunk.start >= replace_until;
                            checkpoint.sent = checkpoint.sent.max(chunk.end.byte());
                            in_flight.spawn(async move {
                                (seq, index_chunk(search, index, chunk, new_rows).await)
                            });
                        }
                        None => read_all = true,
                    }
                }
            }
        }
        // Every chunk read was acknowledged and is saved; a read error then
        // ends the load, and the next run starts at the row that failed.
        let read = reading
            .await
            .map_err(|e| Error::Invalid(format!("reading the file failed: {e}")));
        self.save(checkpoint, &mut durable, &mut rejects).await?;
        read?
    }

    /// Makes the acknowledged rows durable in the index, then records them.
    /// In a fresh load the rows sent so far are recorded first: the commit
    /// may hold some past the watermark, and a run after a crash must
    /// replace those, not add them again.
    async fn save(
        &self,
        checkpoint: &mut Checkpoint,
        durable: &mut Checkpoint,
        rejects: &mut RejectsFile,
    ) -> crate::Result<()> {
        if checkpoint.fresh && checkpoint.sent > durable.sent {
            durable.sent = checkpoint.sent;
            durable.write(self.checkpoint_path)?;
        }
        self.search.persist(&self.options.index).await?;
        rejects.sync()?;
        checkpoint.rejects_bytes = rejects.len;
        checkpoint.write(self.checkpoint_path)?;
        durable.clone_from(checkpoint);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(names: &str) -> csv::ByteRecord {
        csv::ByteRecord::from(names.split(',').collect::<Vec<_>>())
    }

    #[test]
    fn columns_are_found_by_name_in_any_order() {
        let mut names: Vec<&str> = COLUMNS.to_vec();
        names.reverse();
        names.insert(3, "extra");
        let columns = Columns::from_header(&header(&names.join(","))).expect("all columns");
        let mut row: Vec<String> = names.iter().map(|n| format!("v-{n}")).collect();
        let year = names
            .iter()
            .position(|n| *n == "birth_year")
            .expect("there");
        row[year] = "1980".to_owned();
        let person = columns
            .person(&csv::ByteRecord::from(row))
            .expect("a usable row");
        assert_eq!(person.dbusa_id, "v-dbusa_id");
        assert_eq!(person.zip, "v-zip");
        assert_eq!(person.birth_year, 1980);
    }

    #[test]
    fn a_missing_column_is_named() {
        let names: Vec<&str> = COLUMNS.iter().copied().filter(|c| *c != "zip").collect();
        let err = Columns::from_header(&header(&names.join(","))).expect_err("zip is missing");
        assert!(err.contains("zip"), "{err}");
    }

    #[test]
    fn unusable_rows_say_why() {
        let columns = Columns::from_header(&header(&COLUMNS.join(","))).expect("all columns");
        let row = |year: &str, id: &str| {
            let mut fields = vec![id, "Ann", "", "Lee", "1 Main St", "Salem", "OR"];
            fields.extend(["97301", "503-555-0100", "", year]);
            csv::ByteRecord::from(fields)
        };
        assert_eq!(
            columns
                .person(&row("", "DB1"))
                .expect("empty year")
                .birth_year,
            0
        );
        let (id, reason) = columns.person(&row("19x0", "DB1")).expect_err("bad year");
        assert_eq!(id, "DB1");
        assert!(reason.contains("birth_year"), "{reason}");
        let (_, reason) = columns.person(&row("1970", " ")).expect_err("no id");
        assert!(reason.contains("dbusa_id"), "{reason}");
        let short = csv::ByteRecord::from(vec!["DB2", "Ann"]);
        let (id, reason) = columns.person(&short).expect_err("short row");
        assert_eq!(id, "DB2");
        assert!(reason.contains("2 fields"), "{reason}");
    }
}
