//! int8 inference against f32 on the bundled sample: a `tiny` model trained
//! on it (fixed seed, a few epochs) scores every document in f32 and with
//! each int8 kernel this CPU runs; the int8 top 5 must be the f32 top 5
//! (as a set) for at least 99% of the documents, the first label the same
//! for 99%, and validation P@1 within 0.005 of f32's.

use std::collections::HashSet;

use anyhow::{ensure, Result};
use candle_core::{DType, Device};
use sift_models::Int8Kernel;
use sift_training::{train, Arithmetic, Document, Predictor, Preset, TrainOptions};

fn options() -> TrainOptions {
    let mut o = TrainOptions::for_preset(Preset::Tiny);
    o.max_epochs = 3;
    o.patience = 3;
    o.epoch_budget_documents = None;
    o
}

/// Top-5 label sets of `docs` under `predictor`.
fn tops(predictor: &Predictor, docs: &[Document]) -> Result<Vec<Vec<String>>> {
    let texts: Vec<String> = docs.iter().map(Document::full_text).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    Ok(predictor
        .predict(&texts, 5, options().batch)?
        .into_iter()
        .map(|p| p.top.into_iter().map(|s| s.label).collect())
        .collect())
}

#[test]
fn int8_keeps_the_f32_top_5_on_the_bundled_sample() -> Result<()> {
    let docs = sift::train::bundled_documents()?;
    let dir = tempfile::tempdir()?;
    let o = options();
    train(docs.clone(), Vec::new(), &o, dir.path())?;
    let validation: Vec<Document> = docs
        .iter()
        .filter(|d| sift_training::is_validation(d.group(), o.split.validation_percent))
        .cloned()
        .collect();
    ensure!(
        validation.len() > 100,
        "{} validation documents",
        validation.len()
    );

    let f32 = Predictor::load(dir.path(), &Device::Cpu, DType::F32)?;
    let reference = tops(&f32, &docs)?;
    let f32_p1 = f32.evaluate(&validation, o.batch)?.p_at_1;

    let mut ran = 0;
    for kernel in [Int8Kernel::Vnni512, Int8Kernel::Avx2, Int8Kernel::Portable] {
        if !kernel.supported() {
            eprintln!(
                "this CPU cannot run the {} kernel; not checked",
                kernel.name()
            );
            continue;
        }
        ran += 1;
        let int8 = Predictor::load_as(dir.path(), &Device::Cpu, Arithmetic::Int8(Some(kernel)))?;
        ensure!(int8.int8_kernel() == Some(kernel));
        // The portable kernel is plain loops: a few hundred documents.
        let n = if kernel == Int8Kernel::Portable {
            300
        } else {
            docs.len()
        };
        let got = tops(&int8, &docs[..n])?;
        let (mut same_set, mut same_first) = (0, 0);
        for (a, b) in reference.iter().zip(&got) {
            let (sa, sb): (HashSet<_>, HashSet<_>) = (a.iter().collect(), b.iter().collect());
            same_set += usize::from(sa == sb);
            same_first += usize::from(a.first() == b.first());
        }
        let (set_share, first_share) = (same_set as f64 / n as f64, same_first as f64 / n as f64);
        eprintln!(
            "{}: same top-5 set {set_share:.4}, same top 1 {first_share:.4} of {n}",
            kernel.name()
        );
        ensure!(
            set_share >= 0.99,
            "{}: the same top 5 for {set_share:.4}",
            kernel.name()
        );
        ensure!(
            first_share >= 0.99,
            "{}: the same top 1 for {first_share:.4}",
            kernel.name()
        );
        if kernel != Int8Kernel::Portable {
            let p1 = int8.evaluate(&validation, o.batch)?.p_at_1;
            eprintln!(
                "{}: validation P@1 {p1:.4} (f32 {f32_p1:.4})",
                kernel.name()
            );
            ensure!(
                (p1 - f32_p1).abs() <= 0.005,
                "{}: P@1 {p1} against f32 {f32_p1}",
                kernel.name()
            );
        }
    }
    ensure!(ran >= 1, "the portable kernel runs everywhere");
    // Without a kernel named, the CPU's best.
    let best = Predictor::load_as(dir.path(), &Device::Cpu, Arithmetic::Int8(None))?;
    ensure!(best.int8_kernel() == Some(Int8Kernel::detect()));
    Ok(())
}
