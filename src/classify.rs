//! `sift classify`: the top categories of documents given on the command
//! line (HTML, PDF, text or JSON files, through the ingest extractor) or as
//! JSON lines `{id, title, text, section?, url?}` on stdin (the dataset's
//! format), with the registry's LATEST model or a model directory. The
//! model reads what training read: the section and the page's name (the
//! URL's last segment, else a string id) before the title and text.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use sift_training::{BatchLimits, Predictor, Scored};

use crate::config::Config;
use crate::device::DeviceArg;
use crate::train::registry::Registry;
use crate::train::{model_cache, TrainCommandError};

/// Output format.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Format {
    /// A header line per document, then one line per label.
    #[default]
    Text,
    /// One JSON object per line: `{"id": ..., "top5": [{"label": ..., "score": ...}, ...]}`.
    Json,
}

/// `sift classify`.
#[derive(Debug, Clone, Args)]
pub struct ClassifyArgs {
    /// HTML, PDF, text or JSON files. Without files (or with `-`), JSON lines
    /// `{id, title, text, section?, url?}` are read from stdin.
    pub files: Vec<PathBuf>,
    /// A model directory (model.safetensors, config.json, tokenizer.json, labels.json) instead
    /// of the registry's LATEST.
    #[arg(long, env = "SIFT_MODEL")]
    pub model: Option<PathBuf>,
    /// A registry version instead of LATEST.
    #[arg(
        long = "model-version",
        value_name = "VERSION",
        conflicts_with = "model"
    )]
    pub model_version: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// How many labels to print per document.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

/// A stdin line.
#[derive(Debug, Deserialize)]
struct InputLine {
    id: serde_json::Value,
    #[serde(default)]
    title: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    section: String,
    #[serde(default)]
    url: String,
}

/// One output line in JSON.
#[derive(Debug, Serialize)]
struct OutputLine<'a> {
    id: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    top5: Option<&'a [Scored]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// A document to score, or why it cannot be.
struct Input {
    id: serde_json::Value,
    text: Result<String, String>,
}

const LIMITS: BatchLimits = BatchLimits {
    max_batch_tokens: 8192,
    max_batch_docs: 64,
};

/// Documents scored per chunk of stdin: output starts before input ends.
const CHUNK: usize = 512;

/// Finds the model directory: `--model`, or a registry version (LATEST by
/// default) fetched into the local cache.
pub async fn resolve_model(
    config: &Config,
    model: Option<&Path>,
    version: Option<&str>,
) -> Result<(PathBuf, String), TrainCommandError> {
    if let Some(dir) = model {
        return Ok((dir.to_path_buf(), dir.display().to_string()));
    }
    let store = crate::backends::open_objects(config).await?;
    let registry = Registry::new(store, &config.train.prefix);
    let version = match version {
        Some(v) => v.to_owned(),
        None => {
            registry
                .latest()
                .await?
                .ok_or(crate::train::registry::RegistryError::NoLatest)?
                .0
                .version
        }
    };
    let dir = registry.fetch(&version, &model_cache(config)).await?;
    Ok((dir, version))
}

fn write_results(
    out: &mut impl Write,
    inputs: &[Input],
    predictor: &Predictor,
    top: usize,
    format: Format,
) -> Result<usize, TrainCommandError> {
    let texts: Vec<&str> = inputs
        .iter()
        .filter_map(|i| i.text.as_deref().ok())
        .collect();
    let mut predictions = predictor.predict(&texts, top, LIMITS)?.into_iter();
    let mut failed = 0;
    let io = |e: std::io::Error| crate::Error::io("writing to stdout", e);
    for input in inputs {
        let shown_id = match &input.id {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match &input.text {
            Ok(_) => {
                let prediction = predictions
                    .next()
                    .expect("one prediction per scorable input, in order");
                match format {
                    Format::Json => {
                        let line = OutputLine {
                            id: &input.id,
                            top5: Some(&prediction.top),
                            error: None,
                        };
                        writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default())
                            .map_err(io)?;
                    }
                    Format::Text => {
                        writeln!(out, "{shown_id}").map_err(io)?;
                        for s in &prediction.top {
                            writeln!(out, "  {:.3}  {}", s.score, s.label).map_err(io)?;
                        }
                    }
                }
            }
            Err(reason) => {
                failed += 1;
                match format {
                    Format::Json => {
                        let line = OutputLine {
                            id: &input.id,
                            top5: None,
                            error: Some(reason),
                        };
                        writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default())
                            .map_err(io)?;
                    }
                    Format::Text => eprintln!("sift: {shown_id}: {reason}"),
                }
            }
        }
    }
    out.flush().map_err(io)?;
    Ok(failed)
}

fn file_input(path: &Path) -> Input {
    let id = serde_json::Value::String(path.display().to_string());
    let text = std::fs::read(path)
        .map_err(|e| format!("cannot read the file: {e}"))
        .and_then(|body| {
            crate::ingest::extract::extract(&body, None, &path.to_string_lossy())
                .map_err(|e| e.to_string())
        })
        .map(|x| {
            let name = sift_training::page_name(&path.to_string_lossy());
            let fields = sift_training::Fields {
                section: x.section.as_deref().unwrap_or_default(),
                name: &name,
            };
            sift_training::model_input(&x.title, &x.text, &fields)
        });
    Input { id, text }
}

fn line_input(number: usize, line: &str) -> Input {
    match serde_json::from_str::<InputLine>(line) {
        Ok(doc) => {
            let as_document = sift_training::Document {
                id: doc.id.as_str().unwrap_or_default().to_owned(),
                title: doc.title,
                text: doc.text,
                section: doc.section,
                url: doc.url,
                ..Default::default()
            };
            Input {
                id: doc.id,
                text: Ok(as_document.full_text()),
            }
        }
        Err(e) => Input {
            id: serde_json::Value::String(format!("line {number}")),
            text: Err(format!("not a JSON object with `id`, `title`, `text`: {e}")),
        },
    }
}

/// `sift classify`. Fails (after printing everything else) if any input
/// could not be read.
pub async fn main(config: &Config, args: ClassifyArgs) -> Result<(), TrainCommandError> {
    let (dir, shown) =
        resolve_model(config, args.model.as_deref(), args.model_version.as_deref()).await?;
    let device = crate::device::device(args.device)?;
    let dtype = if device.is_cpu() {
        candle_core::DType::F32
    } else {
        candle_core::DType::BF16
    };
    let predictor = Predictor::load(&dir, &device, dtype)?;
    tracing::debug!(model = %shown, "Loaded the model.");
    let top = args.top.max(1);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let from_stdin = args.files.is_empty() || args.files.iter().any(|f| f.as_os_str() == "-");
    let mut failed = 0;
    let files: Vec<&PathBuf> = args.files.iter().filter(|f| f.as_os_str() != "-").collect();
    for chunk in files.chunks(CHUNK) {
        let inputs: Vec<Input> = chunk.iter().map(|p| file_input(p)).collect();
        failed += write_results(&mut out, &inputs, &predictor, top, args.format)?;
    }
    if from_stdin {
        let stdin = std::io::stdin();
        let mut inputs = Vec::with_capacity(CHUNK);
        for (i, line) in stdin.lock().lines().enumerate() {
            let line = line.map_err(|e| crate::Error::io("reading stdin", e))?;
            if line.trim().is_empty() {
                continue;
            }
            inputs.push(line_input(i + 1, &line));
            if inputs.len() == CHUNK {
                failed += write_results(&mut out, &inputs, &predictor, top, args.format)?;
                inputs.clear();
            }
        }
        failed += write_results(&mut out, &inputs, &predictor, top, args.format)?;
    }
    if failed > 0 {
        return Err(TrainCommandError::Invalid(format!(
            "{failed} input(s) could not be classified (see above)"
        )));
    }
    Ok(())
}
