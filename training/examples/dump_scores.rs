//! Writes, for the tuning and validation parts of a dataset, every label's
//! transformer probability and the decision values of two linear models
//! trained here on the training part as `sift train` trains them (word
//! grams alone: `s`; with character grams: `c`), as JSON lines: for
//! studying how to combine them outside the training run. Each document
//! twice: as the models read it, and without its fields (part `…Bare`).
//!
//! `cargo run --release -p sift-training --example dump_scores -- MODEL_DIR DATA.jsonl OUT.jsonl`

use std::io::Write;

use candle_core::{DType, Device};
use rayon::prelude::*;
use sift_training::linear::LinearExample;
use sift_training::{
    drops_fields, model_text, Dataset, LinearModel, LinearOptions, Part, Predictor, SplitPlan,
    TrainOptions,
};

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
    let plan = SplitPlan::default();
    let documents = Dataset::open(data)?.documents;
    let dropout = TrainOptions::for_preset(sift_training::Preset::Tiny).field_dropout_percent;

    // The training part's texts and labels, as the training run reads them.
    let mut texts = Vec::new();
    let mut positives = Vec::new();
    let mut rejected = Vec::new();
    for doc in documents.iter().filter(|d| plan.part(d) == Part::Train) {
        let (p, r) = (labels.indices(&doc.tags), labels.indices(&doc.rejected));
        if p.is_empty() && r.is_empty() {
            continue;
        }
        let text = if drops_fields(doc, dropout) {
            doc.text_alone()
        } else {
            doc.full_text()
        };
        texts.push(model_text(&text).to_owned());
        positives.push(p);
        rejected.push(r);
    }
    let examples: Vec<LinearExample<'_>> = texts
        .iter()
        .zip(&positives)
        .zip(&rejected)
        .map(|((text, labels), rejected)| LinearExample {
            text,
            labels,
            rejected,
        })
        .collect();
    let words = LinearModel::train(
        &examples,
        labels.len(),
        &LinearOptions {
            char_grams: false,
            ..LinearOptions::default()
        },
    );
    eprintln!("word grams trained on {} documents", examples.len());
    let chars = LinearModel::train(
        &examples,
        labels.len(),
        &LinearOptions {
            char_grams: true,
            ..LinearOptions::default()
        },
    );
    eprintln!("character grams trained");

    let held: Vec<_> = documents
        .iter()
        .filter(|d| matches!(plan.part(d), Part::Tuning | Part::Validation) && !d.tags.is_empty())
        .collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    for doc in held {
        let part = plan.part(doc);
        // Each document as the model reads it, then (as part
        // "<Part>Bare") without its section and page name.
        for (text, bare) in [(doc.full_text(), ""), (doc.text_alone(), "Bare")] {
            let encoded = predictor.encode(&text)?;
            let top = predictor.predict_encoded(&[&encoded], labels.len())?;
            let mut p = vec![0f32; labels.len()];
            for &(i, score) in &top[0] {
                p[i as usize] = score;
            }
            let [s, c]: [Vec<f32>; 2] = [&words, &chars]
                .par_iter()
                .map(|m| m.scores(model_text(&text)))
                .collect::<Vec<_>>()
                .try_into()
                .expect("two models");
            writeln!(
                file,
                "{}",
                serde_json::json!({"part": format!("{part:?}{bare}"), "tags": doc.tags, "p": p, "s": s, "c": c})
            )?;
        }
    }
    std::fs::write(
        format!("{out}.labels.json"),
        serde_json::to_string(labels.names())?,
    )?;
    Ok(())
}
