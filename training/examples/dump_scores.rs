//! Writes, for the tuning and validation parts of a dataset, every label's
//! transformer probability and linear decision value, as JSON lines: for
//! studying how to combine the two outside the training run. Each document
//! twice: as the models read it, and without its fields (part `…Bare`).
//!
//! `cargo run -p sift-training --example dump_scores -- MODEL_DIR DATA.jsonl OUT.jsonl`

use std::io::Write;

use candle_core::{DType, Device};
use sift_training::{Dataset, LinearModel, Part, Predictor, SplitPlan};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (model, data, out) = (&args[1], &args[2], &args[3]);
    let dir = std::path::Path::new(model);
    // The transformer alone: a copy of the model whose combination weight is 0.
    let alone = tempfile::tempdir()?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        std::fs::copy(entry.path(), alone.path().join(entry.file_name()))?;
    }
    std::fs::write(
        alone.path().join(sift_training::files::ENSEMBLE),
        r#"{"linear_weight": 0.0}"#,
    )?;
    let predictor = Predictor::load(alone.path(), &Device::Cpu, DType::F32)?;
    let labels = predictor.labels().clone();
    let linear = LinearModel::load(&dir.join(sift_training::files::LINEAR), labels.len())?;
    let plan = SplitPlan::default();
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    for doc in Dataset::open(data)?.documents {
        let part = plan.part(&doc);
        if !matches!(part, Part::Tuning | Part::Validation) || doc.tags.is_empty() {
            continue;
        }
        // Each document as the model reads it, then (as part
        // "<Part>Bare") without its section and page name.
        for (text, bare) in [(doc.full_text(), ""), (doc.text_alone(), "Bare")] {
            let encoded = predictor.encode(&text)?;
            let top = predictor.predict_encoded(&[&encoded], labels.len())?;
            let mut p = vec![0f32; labels.len()];
            for &(i, score) in &top[0] {
                p[i as usize] = score;
            }
            let s = linear.scores(sift_training::model_text(&text));
            writeln!(
                file,
                "{}",
                serde_json::json!({"part": format!("{part:?}{bare}"), "tags": doc.tags, "p": p, "s": s})
            )?;
        }
    }
    std::fs::write(
        format!("{out}.labels.json"),
        serde_json::to_string(labels.names())?,
    )?;
    Ok(())
}
