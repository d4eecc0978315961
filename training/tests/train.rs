//! The training loop on a small synthetic corpus: every weight moves
//! (including the n-gram table trained on the host), the same seed gives the
//! same model bit for bit, the loop learns a separable task, the files a
//! model is made of load back into a predictor that scores as the loop's own
//! evaluation did, and analysts' feedback is folded in as documented.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use sift_training::{
    files, merge_feedback, train, BatchLimits, Document, Predictor, Preset, TrainOptions,
};

/// Documents whose words say their label: `topic-k` docs use words from
/// vocabulary block k, so the task is learnable in a few epochs.
fn corpus(n: usize) -> Vec<Document> {
    let blocks = [
        ["editor", "text", "vim", "emacs", "syntax", "buffer"],
        [
            "python", "module", "library", "binding", "import", "package",
        ],
        ["game", "puzzle", "arcade", "player", "level", "score"],
        ["network", "server", "socket", "http", "proxy", "client"],
    ];
    (0..n)
        .map(|i| {
            let k = i % blocks.len();
            let words: Vec<&str> = (0..12).map(|j| blocks[k][(i * 7 + j * 5) % 6]).collect();
            let mut tags = vec![format!("topic::{k}")];
            if i % 3 == 0 {
                tags.push("common::all".to_owned());
            }
            Document {
                id: format!("doc-{i:04}"),
                title: format!("{} {}", words[0], words[1]),
                text: words.join(" "),
                tags,
                source: String::new(),
                rejected: Vec::new(),
                ..Default::default()
            }
        })
        .collect()
}

fn options(epochs: u32) -> TrainOptions {
    let mut o = TrainOptions::for_preset(Preset::Tiny);
    o.max_epochs = epochs;
    o.epoch_budget_documents = None;
    o.patience = epochs;
    o.vocab_size = 300;
    o.max_len = Some(32);
    o.ngrams = Some(sift_models::NgramConfig {
        buckets: 4096,
        dim: 16,
    });
    o.split.validation_percent = 20;
    o.learning_rate = 3e-3;
    o.batch = BatchLimits {
        max_batch_tokens: 1024,
        max_batch_docs: 16,
    };
    o
}

fn weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn init_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    // Zero epochs is not allowed; the initial weights are the seeded init,
    // which a fresh VarMap reproduces.
    let config =
        sift_models::ModelConfig::from_json(&std::fs::read_to_string(dir.join(files::CONFIG))?)?;
    let varmap = candle_nn::VarMap::new();
    sift_models::Classifier::new(
        &config,
        sift_models::seeded_var_builder(&varmap, options(1).seed, DType::F32, &Device::Cpu),
    )?;
    let path = dir.join("init.safetensors");
    varmap.save(&path)?;
    weights(&path)
}

#[test]
fn every_weight_moves_and_the_task_is_learned() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let trained = train(corpus(240), Vec::new(), &options(6), dir.path())?;
    let after = weights(&dir.path().join(files::MODEL))?;
    let before = init_weights(dir.path())?;
    ensure!(before.len() == after.len());
    for (name, initial) in &before {
        let diff = (initial - &after[name])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        ensure!(diff > 0.0, "{name} never changed: no gradient reached it");
    }
    let m = &trained.metrics.validation;
    ensure!(m.p_at_1 > 0.9, "P@1 {} on a separable task", m.p_at_1);
    ensure!(m.hit_at_5 == 1.0, "hit@5 {}", m.hit_at_5);
    ensure!(trained.metrics.epochs.len() == 6);
    ensure!(trained.metrics.steps.len() > 6);

    // The saved files score as the loop's own evaluation did.
    let predictor = Predictor::load(dir.path(), &Device::Cpu, DType::F32)?;
    let validation: Vec<Document> = corpus(240)
        .into_iter()
        .filter(|d| sift_training::is_validation(&d.id, 20))
        .collect();
    let again = predictor.evaluate(&validation, options(1).batch)?;
    ensure!(
        (again.hit_at_5 - m.hit_at_5).abs() < 1e-9 && (again.p_at_1 - m.p_at_1).abs() < 1e-9,
        "loaded {again:?} vs trained {m:?}"
    );
    let doc = &validation[0];
    let prediction = predictor.predict(&[doc.full_text().as_str()], 5, options(1).batch)?;
    ensure!(prediction[0].top.len() == 5);
    ensure!(doc.tags.contains(&prediction[0].top[0].label));
    // A very long document is cut, not refused.
    let long = "editor ".repeat(100_000);
    let scored = predictor.predict(&[long.as_str()], 5, options(1).batch)?;
    // The editor topic is among its 5 (the linear half also weighs the
    // frequent `common::all`, which has no words of its own).
    ensure!(
        scored[0].top.len() == 5 && scored[0].top.iter().any(|s| s.label == "topic::0"),
        "{:?}",
        scored[0].top
    );
    Ok(())
}

#[test]
fn the_same_seed_gives_the_same_model() -> Result<()> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    train(corpus(120), Vec::new(), &options(2), a.path())?;
    train(corpus(120), Vec::new(), &options(2), b.path())?;
    for file in [files::MODEL, files::TOKENIZER, files::LABELS, files::CONFIG] {
        ensure!(
            std::fs::read(a.path().join(file))? == std::fs::read(b.path().join(file))?,
            "{file} differs between two runs with the same seed"
        );
    }
    let mut other = options(2);
    other.seed = 43;
    let c = tempfile::tempdir()?;
    train(corpus(120), Vec::new(), &other, c.path())?;
    ensure!(
        std::fs::read(a.path().join(files::MODEL))? != std::fs::read(c.path().join(files::MODEL))?
    );
    Ok(())
}

#[test]
fn feedback_amends_and_extends_the_dataset() -> Result<()> {
    let mut docs = corpus(4);
    let doc = |id: &str, tags: &[&str], rejected: &[&str]| Document {
        id: id.to_owned(),
        title: String::new(),
        text: "reviewed text".to_owned(),
        source: String::new(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        rejected: rejected.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let touched = merge_feedback(
        &mut docs,
        vec![
            // An analyst adds a label and rejects one the dataset had.
            doc("doc-0000", &["topic::9"], &["common::all"]),
            doc("new-1", &[], &["topic::1", "topic::2"]),
        ],
    );
    ensure!(touched == 2 && docs.len() == 5);
    ensure!(
        docs[0].tags == ["topic::0", "topic::9"],
        "{:?}",
        docs[0].tags
    );
    ensure!(docs[0].rejected == ["common::all"]);
    ensure!(docs[4].id == "new-1" && docs[4].tags.is_empty());

    // A run with rejection-only documents trains (they weigh only their
    // rejected labels) and counts them.
    let dir = tempfile::tempdir()?;
    let feedback: Vec<Document> = (0..20)
        .map(|i| doc(&format!("fb-{i}"), &[], &["topic::1"]))
        .collect();
    let trained = train(corpus(80), feedback, &options(1), dir.path())?;
    ensure!(trained.metrics.feedback_documents == 20);
    Ok(())
}

/// A BERT-layout checkpoint (Hugging Face names, post-norm) with a
/// tokenizer, as the all-MiniLM-L6-v2 files are laid out, but tiny.
fn write_bert_checkpoint(dir: &Path, texts: &[String]) -> Result<()> {
    let tokenizer = sift_training::TextTokenizer::train(texts.iter(), 200, 64)?;
    tokenizer.save(dir.join("tokenizer.json"))?;
    let (vocab, hidden, ff, layers) = (tokenizer.vocab_size(), 32usize, 64usize, 2usize);
    let device = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    // Word embeddings all 0.5: far from any random initialisation, so the
    // test can tell they were loaded.
    tensors.insert(
        "embeddings.word_embeddings.weight".into(),
        Tensor::full(0.5f32, (vocab, hidden), &device)?,
    );
    tensors.insert(
        "embeddings.position_embeddings.weight".into(),
        Tensor::zeros((512, hidden), DType::F32, &device)?,
    );
    tensors.insert(
        "embeddings.token_type_embeddings.weight".into(),
        Tensor::zeros((2, hidden), DType::F32, &device)?,
    );
    let norm = |tensors: &mut HashMap<String, Tensor>, prefix: &str| -> Result<()> {
        tensors.insert(
            format!("{prefix}.weight"),
            Tensor::ones(hidden, DType::F32, &device)?,
        );
        tensors.insert(
            format!("{prefix}.bias"),
            Tensor::zeros(hidden, DType::F32, &device)?,
        );
        Ok(())
    };
    norm(&mut tensors, "embeddings.LayerNorm")?;
    let dense = |tensors: &mut HashMap<String, Tensor>,
                 prefix: String,
                 out: usize,
                 inp: usize,
                 seed: f64|
     -> Result<()> {
        let weight = (Tensor::arange(0f32, (out * inp) as f32, &device)?
            .reshape((out, inp))?
            .affine(0.001, seed)?
            .sin()?
            * 0.05)?;
        tensors.insert(format!("{prefix}.weight"), weight);
        tensors.insert(
            format!("{prefix}.bias"),
            Tensor::zeros(out, DType::F32, &device)?,
        );
        Ok(())
    };
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for (i, name) in ["query", "key", "value"].iter().enumerate() {
            dense(
                &mut tensors,
                format!("{p}.attention.self.{name}"),
                hidden,
                hidden,
                i as f64,
            )?;
        }
        dense(
            &mut tensors,
            format!("{p}.attention.output.dense"),
            hidden,
            hidden,
            3.0,
        )?;
        norm(&mut tensors, &format!("{p}.attention.output.LayerNorm"))?;
        dense(
            &mut tensors,
            format!("{p}.intermediate.dense"),
            ff,
            hidden,
            4.0,
        )?;
        dense(&mut tensors, format!("{p}.output.dense"), hidden, ff, 5.0)?;
        norm(&mut tensors, &format!("{p}.output.LayerNorm"))?;
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": 2, "intermediate_size": ff, "max_position_embeddings": 512,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(())
}

#[test]
fn starts_from_a_pretrained_bert_checkpoint() -> Result<()> {
    let docs = corpus(120);
    let texts: Vec<String> = docs.iter().map(Document::full_text).collect();
    let bert = tempfile::tempdir()?;
    write_bert_checkpoint(bert.path(), &texts)?;
    let mut o = options(1);
    o.pretrained = Some(sift_training::Pretrained {
        dir: bert.path().to_path_buf(),
    });
    o.learning_rate = 1e-4;
    let out = tempfile::tempdir()?;
    let trained = train(docs, Vec::new(), &o, out.path())?;
    ensure!(trained.metrics.preset == "pretrained");
    let config = sift_models::ModelConfig::from_json(&std::fs::read_to_string(
        out.path().join(files::CONFIG),
    )?)?;
    ensure!(config.norm == sift_models::Norm::Post && config.hidden == 32 && config.layers == 2);
    // The checkpoint's tokenizer is used as it is (same vocabulary).
    let ours = sift_training::TextTokenizer::load(out.path().join(files::TOKENIZER), 32)?;
    let theirs = sift_training::TextTokenizer::load(bert.path().join("tokenizer.json"), 32)?;
    ensure!(ours.vocab_size() == theirs.vocab_size());
    ensure!(ours.encode(&texts[0])? == theirs.encode(&texts[0])?);
    // Fine-tuned from the checkpoint, not from a fresh initialisation.
    let saved = weights(&out.path().join(files::MODEL))?;
    let tokens = saved["embeddings.tokens.weight"]
        .mean_all()?
        .to_scalar::<f32>()?;
    ensure!(
        (tokens - 0.5).abs() < 0.05,
        "token embeddings mean {tokens}"
    );
    Predictor::load(out.path(), &Device::Cpu, DType::F32)?;
    Ok(())
}

#[test]
fn starts_from_a_bf16_checkpoint() -> Result<()> {
    // Published checkpoints often come in half precision; they train in f32.
    let docs = corpus(120);
    let texts: Vec<String> = docs.iter().map(Document::full_text).collect();
    let bert = tempfile::tempdir()?;
    write_bert_checkpoint(bert.path(), &texts)?;
    let path = bert.path().join("model.safetensors");
    let halved: HashMap<String, Tensor> = weights(&path)?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::BF16)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&halved, &path)?;
    let mut o = options(1);
    o.pretrained = Some(sift_training::Pretrained {
        dir: bert.path().to_path_buf(),
    });
    o.learning_rate = 1e-4;
    let out = tempfile::tempdir()?;
    train(docs, Vec::new(), &o, out.path())?;
    let saved = weights(&out.path().join(files::MODEL))?;
    ensure!(saved["embeddings.tokens.weight"].dtype() == DType::F32);
    let tokens = saved["embeddings.tokens.weight"]
        .mean_all()?
        .to_scalar::<f32>()?;
    ensure!(
        (tokens - 0.5).abs() < 0.05,
        "token embeddings mean {tokens}"
    );
    Ok(())
}
