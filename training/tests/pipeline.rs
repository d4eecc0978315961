//! From JSON lines to the classifier's logits: the data side's outputs have
//! the shapes and types `sift_models::Classifier::forward` expects.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sift_models::{seeded_var_builder, Classifier, ModelConfig, NgramBatch};
use sift_training::{
    plan_batches, Batch, BatchLimits, Dataset, Example, Labels, NgramHasher, TextTokenizer,
};

const DATA: &str = r#"{"id": "vim", "title": "Vim", "text": "Highly configurable text editor", "tags": ["role::program", "use::editing"]}
{"id": "emacs", "title": "Emacs", "text": "Extensible, customizable text editor", "tags": ["role::program", "use::editing"]}
{"id": "lxml", "title": "python3-lxml", "text": "Pythonic binding for the libxml2 and libxslt libraries", "tags": ["devel::lang:python", "role::shared-lib"]}
{"id": "bs4", "title": "python3-bs4", "text": "Error-tolerant HTML parser for Python", "tags": ["devel::lang:python", "role::shared-lib", "works-with::html"]}
{"id": "tidy", "title": "tidy", "text": "HTML syntax checker and reformatter", "tags": ["role::program", "works-with::html"]}
"#;

#[test]
fn batches_feed_the_classifier() -> anyhow::Result<()> {
    let dataset = Dataset::read(DATA.as_bytes())?;
    let (train, _validation) = dataset.split(0);
    let labels = Labels::from_documents(&train.documents);
    let texts: Vec<String> = train.documents.iter().map(|d| d.full_text()).collect();
    let tokenizer = TextTokenizer::train(texts.iter(), 120, 12)?;
    let hasher = NgramHasher::new(1000);
    let examples: Vec<Example> = train
        .documents
        .iter()
        .zip(&texts)
        .map(|(d, text)| {
            Ok(Example {
                ids: tokenizer.encode(text)?,
                ngrams: hasher.hash(text),
                labels: labels.indices(&d.tags),
                rejected: labels.indices(&d.rejected),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let limits = BatchLimits {
        max_batch_tokens: 24,
        max_batch_docs: 2,
    };

    let device = Device::Cpu;
    let mut config = ModelConfig::tiny(tokenizer.vocab_size(), labels.len()).with_ngrams(1000, 8);
    config.max_len = tokenizer.max_len();
    let varmap = VarMap::new();
    let model = Classifier::new(&config, seeded_var_builder(&varmap, 1, DType::F32, &device))?;
    let mut rows = 0;
    for indices in plan_batches(&lengths, limits, 3) {
        let batch = Batch::collate(&examples, &indices, labels.len());
        let ids = Tensor::from_vec(batch.ids, (batch.docs, batch.width), &device)?;
        let mask = Tensor::from_vec(batch.mask, (batch.docs, batch.width), &device)?;
        let ngrams = NgramBatch::from_lists(&batch.ngrams, &device)?;
        let targets = Tensor::from_vec(batch.targets, (batch.docs, batch.num_labels), &device)?;
        let logits = model.forward(&ids, &mask, Some(&ngrams), false)?;
        assert_eq!(logits.dims(), targets.dims());
        rows += batch.docs;
    }
    assert_eq!(rows, 5);
    Ok(())
}
