//! Trains on a JSON-lines file and prints the figures: the quickest way to
//! try hyper-parameters without the `sift` CLI.
//!
//! `cargo run --release -p sift-training --example train_jsonl -- DATA.jsonl OUT_DIR [EPOCHS] [LIMIT]`

use sift_training::{train, Dataset, Preset, TrainOptions};

// glibc's allocator returns candle's large per-op buffers to the kernel and
// page-faults them back in on every step; mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let data = args
        .get(1)
        .map_or("../shared/data/debtags-dev.jsonl", String::as_str);
    let out = args.get(2).map_or("/tmp/sift-train", String::as_str);
    let mut options = TrainOptions::for_preset(Preset::Tiny);
    if let Some(epochs) = args.get(3) {
        options.max_epochs = epochs.parse()?;
        options.epoch_budget_documents = None;
    }
    if let Ok(percent) = std::env::var("SIFT_FIELD_DROPOUT") {
        options.field_dropout_percent = percent.parse()?;
    }
    let mut documents = Dataset::open(data)?.documents;
    if let Some(limit) = args.get(4) {
        documents.truncate(limit.parse()?);
    }
    if std::env::var("SIFT_NO_NGRAMS").is_ok() {
        options.ngrams = None;
    }
    if std::env::var("SIFT_SOFTMAX").is_ok() {
        options.output = sift_models::Output::Softmax;
    }
    if let Ok(scale) = std::env::var("SIFT_NGRAM_LR_SCALE") {
        options.ngram_learning_rate_scale = scale.parse()?;
    }
    if let Ok(len) = std::env::var("SIFT_MAX_LEN") {
        options.max_len = Some(len.parse()?);
    }
    if let Ok(lr) = std::env::var("SIFT_LR") {
        options.learning_rate = lr.parse()?;
    }
    if let Ok(on) = std::env::var("SIFT_CHAR_GRAMS") {
        if let Some(linear) = &mut options.linear {
            linear.char_grams = on != "0";
        }
    }
    if let Ok(c) = std::env::var("SIFT_LINEAR_C") {
        if let Some(linear) = &mut options.linear {
            linear.c = c.parse()?;
        }
    }
    if std::env::var("SIFT_NO_LINEAR").is_ok() {
        options.linear = None;
    }
    options.progress = std::env::var("SIFT_PROGRESS").is_ok();
    let trained = train(documents, Vec::new(), &options, std::path::Path::new(out))?;
    let m = &trained.metrics;
    println!(
        "P@1 {:.4} hit@5 {:.4} recall@5 {:.4} tokens/s {:.0} wall {:.1}s best epoch {}",
        m.validation.p_at_1,
        m.validation.hit_at_5,
        m.validation.recall_at_5,
        m.tokens_per_second,
        m.wall_seconds,
        m.best_epoch
    );
    let line = |name: &str, f: &sift_training::Figures| {
        println!(
            "{name:<12} P@1 {:.4} hit@5 {:.4} recall@5 {:.4} ({} documents)",
            f.p_at_1, f.hit_at_5, f.recall_at_5, f.documents
        );
    };
    if let Some(t) = &m.transformer {
        line("transformer", t);
    }
    if let Some(b) = &m.baseline {
        line("baseline", &b.validation);
        println!(
            "baseline: {:.1}s, {} features, {} weights",
            b.seconds, b.features, b.weights
        );
    }
    if let Some(t) = &m.tuning {
        line("tuning", t);
    }
    if let Some(s) = &m.seen {
        line("seen", s);
    }
    if let Some(t) = &m.text_alone {
        line("no fields", t);
    }
    if let Some(e) = &m.ensemble {
        println!(
            "ensemble {:?}, linear weight {}, slope {}",
            e.form, e.linear_weight, e.linear_scale
        );
        for p in &e.grid {
            println!(
                "  {:<8} w {:>5} k {:>4}: tuning P@1 {:.4} hit@5 {:.4} recall@5 {:.4} mean {:.4}",
                format!("{:?}", p.form),
                p.linear_weight,
                p.linear_scale,
                p.p_at_1,
                p.hit_at_5,
                p.recall_at_5,
                (p.p_at_1 + p.hit_at_5 + p.recall_at_5) / 3.0
            );
        }
    }
    Ok(())
}
