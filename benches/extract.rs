//! Extraction throughput, and PDF text quality against `pdftotext`.
//!
//! `cargo bench --bench extract` prints two tables:
//!
//! * HTML: documents/s and MB/s for ~5 KB pages (article paragraphs from
//!   `../shared/data/debtags-dev.jsonl` inside header, navigation, scripts
//!   and footer; every fourth page windows-1252 without a charset label, so
//!   detection runs too).
//! * PDF: ~200 KB PDFs holding those texts, made three ways: by
//!   `build_pdf` (lopdf), by groff + Ghostscript (`ps2pdf`), and by cairo
//!   (`pdftocairo -pdf` of the lopdf file). For each: pages/s and docs/s of
//!   sift's extractor, of lopdf's own `Document::extract_text`, and of
//!   Debian's `pdftotext` run as one subprocess per file; and the fraction of
//!   `pdftotext`'s words each recovers (multiset overlap of
//!   whitespace-separated words), plus the reverse fraction for sift (its
//!   words that `pdftotext` also has), so spurious splits show up too.
//!
//! Tools it needs for the comparison (skipped with a note when missing):
//! `apt-get install poppler-utils ghostscript groff-base`.
//! Everything is single-threaded; each timing repeats its corpus for at least
//! `MIN_SECONDS`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sift::ingest::extract::{build_pdf, extract};

const MIN_SECONDS: f64 = 2.0;
const HTML_PAGES: usize = 200;
const HTML_TARGET_BYTES: usize = 5 * 1024;
const PDF_DOCS: usize = 6;
const PDF_TARGET_BYTES: usize = 200 * 1024;

struct Doc {
    title: String,
    text: String,
}

fn load_docs() -> Result<Vec<Doc>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/debtags-dev.jsonl");
    let data = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (JSON lines {{id,title,text,tags}})",
            path.display()
        )
    })?;
    let mut docs = Vec::new();
    for line in data.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let text = v["text"].as_str().unwrap_or_default().trim().to_string();
        if text.is_empty() {
            continue;
        }
        docs.push(Doc {
            title: v["title"].as_str().unwrap_or_default().to_string(),
            text,
        });
    }
    if docs.is_empty() {
        bail!("{} holds no documents", path.display());
    }
    Ok(docs)
}

/// Runs `f` over `items` repeatedly for at least `MIN_SECONDS`; returns
/// (passes over the corpus, seconds).
fn time_passes<T>(items: &[T], mut f: impl FnMut(&T)) -> (f64, f64) {
    let start = Instant::now();
    let mut passes = 0u32;
    loop {
        for item in items {
            f(item);
        }
        passes += 1;
        if start.elapsed().as_secs_f64() >= MIN_SECONDS {
            break;
        }
    }
    (f64::from(passes), start.elapsed().as_secs_f64())
}

// ------------------------------------------------------------------ HTML

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html_pages(docs: &[Doc]) -> Vec<Vec<u8>> {
    let chrome_top = r#"<header class="site"><a href="/"><img src="/logo.png" alt="Packages"></a>
<form action="/search"><input name="q" placeholder="Search"><button>Go</button></form></header>
<nav><ul><li><a href="/">Home</a></li><li><a href="/sections">Sections</a></li><li><a href="/about">About</a></li><li><a href="/help">Help</a></li></ul></nav>
<script>window.dataLayer=window.dataLayer||[];function gtag(){dataLayer.push(arguments)}gtag('js',new Date());</script>"#;
    let chrome_bottom = r#"<aside><h3>Related</h3><ul><li><a href="/a">Another package</a></li><li><a href="/b">Yet another</a></li></ul></aside>
<footer><p>&copy; 2024 Package index &middot; <a href="/privacy">Privacy</a> &middot; <a href="/terms">Terms</a></p></footer>"#;
    let mut pages = Vec::new();
    let mut next = docs.iter().cycle();
    for i in 0..HTML_PAGES {
        let Some(first) = next.next() else { break };
        let mut article = format!("<h1>{}</h1>\n", escape(&first.title));
        let mut d = first;
        while article.len() + chrome_top.len() + chrome_bottom.len() + 300 < HTML_TARGET_BYTES {
            for para in d.text.split("\n\n") {
                article.push_str(&format!("<p>{}</p>\n", escape(para)));
            }
            let Some(n) = next.next() else { break };
            d = n;
        }
        let legacy = i % 4 == 3;
        let meta = if legacy {
            ""
        } else {
            "<meta charset=\"utf-8\">"
        };
        let page = format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head>{meta}<title>{}</title>\n<style>body{{font:16px sans-serif}}</style></head>\n<body>{chrome_top}\n<main><article>{article}</article></main>\n{chrome_bottom}</body></html>\n",
            escape(&first.title)
        );
        pages.push(if legacy {
            encoding_rs::WINDOWS_1252.encode(&page).0.into_owned()
        } else {
            page.into_bytes()
        });
    }
    pages
}

fn bench_html(docs: &[Doc]) -> Result<()> {
    let pages = html_pages(docs);
    let bytes: usize = pages.iter().map(Vec::len).sum();
    let mut chars = 0usize;
    for p in &pages {
        chars += extract(p, Some("text/html"), "https://packages.example.org/p")?
            .text
            .len();
    }
    let (passes, secs) = time_passes(&pages, |p| {
        let x = extract(p, Some("text/html"), "https://packages.example.org/p");
        std::hint::black_box(x.is_ok());
    });
    let docs_s = passes * pages.len() as f64 / secs;
    println!("HTML extraction (scraper/html5ever, charset detection, boilerplate removal)");
    println!(
        "  {:>5} pages, avg {:.1} KB in, {:.1} KB text out:  {:>9.0} docs/s  {:>7.1} MB/s",
        pages.len(),
        bytes as f64 / pages.len() as f64 / 1024.0,
        chars as f64 / pages.len() as f64 / 1024.0,
        docs_s,
        docs_s * bytes as f64 / pages.len() as f64 / 1e6
    );
    println!();
    Ok(())
}

// ------------------------------------------------------------------ PDF corpora

struct Corpus {
    name: &'static str,
    files: Vec<PathBuf>,
    bodies: Vec<Vec<u8>>,
}

/// Texts of about `PDF_TARGET_BYTES` once written by `build_pdf`: documents
/// concatenated (title line, text, blank line) until the estimate is reached.
fn pdf_texts(docs: &[Doc]) -> Vec<(String, String)> {
    // Probe how many bytes of PDF a byte of this text makes.
    let probe: String = docs
        .iter()
        .take(200)
        .map(|d| format!("{}\n{}\n\n", d.title, d.text))
        .collect();
    let ratio = build_pdf("probe", std::slice::from_ref(&probe)).len() as f64 / probe.len() as f64;
    let target_chars = (PDF_TARGET_BYTES as f64 / ratio) as usize;
    let mut out = Vec::new();
    let mut next = docs.iter().skip(1000).cycle();
    for i in 0..PDF_DOCS {
        let mut text = String::new();
        while text.len() < target_chars {
            let Some(d) = next.next() else { break };
            text.push_str(&format!("{}\n{}\n\n", d.title, d.text));
        }
        out.push((format!("Debtags sample {}", i + 1), text));
    }
    out
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// groff source for `text`: paragraphs filled and justified, Times 11 pt.
fn troff_source(title: &str, text: &str) -> String {
    let mut s = format!(
        "\\X'ps: exec [/Title ({}) /DOCINFO pdfmark'\n.ll 6.5i\n.po 1i\n.ps 11\n.vs 13\n",
        title.replace(['(', ')', '\\'], "")
    );
    for para in text.split("\n\n").filter(|p| !p.trim().is_empty()) {
        for line in para.lines() {
            let line = line.replace('\\', "\\e");
            // A leading . or ' would be a request; \& makes it text.
            if line.starts_with(['.', '\'']) {
                s.push_str("\\&");
            }
            s.push_str(&line);
            s.push('\n');
        }
        s.push_str(".sp\n");
    }
    s
}

fn run_tool(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn make_corpora(dir: &Path, docs: &[Doc]) -> Result<Vec<Corpus>> {
    let texts = pdf_texts(docs);
    let mut lopdf = Corpus {
        name: "lopdf (build_pdf)",
        files: Vec::new(),
        bodies: Vec::new(),
    };
    for (i, (title, text)) in texts.iter().enumerate() {
        let body = build_pdf(title, std::slice::from_ref(text));
        let path = dir.join(format!("lopdf-{i}.pdf"));
        std::fs::write(&path, &body)?;
        lopdf.files.push(path);
        lopdf.bodies.push(body);
    }
    let mut corpora = vec![];
    if have("groff") && have("ps2pdf") {
        let mut gs = Corpus {
            name: "groff + Ghostscript",
            files: Vec::new(),
            bodies: Vec::new(),
        };
        for (i, (title, text)) in texts.iter().enumerate() {
            let tr = dir.join(format!("gs-{i}.tr"));
            let ps = dir.join(format!("gs-{i}.ps"));
            let pdf = dir.join(format!("gs-{i}.pdf"));
            std::fs::write(&tr, troff_source(title, text))?;
            let postscript = run_tool(
                Command::new("groff")
                    .args(["-Kutf8", "-Tps", "-Ww"])
                    .arg(&tr),
            )?;
            std::fs::write(&ps, postscript)?;
            run_tool(Command::new("ps2pdf").arg(&ps).arg(&pdf))?;
            gs.bodies.push(std::fs::read(&pdf)?);
            gs.files.push(pdf);
        }
        corpora.push(gs);
    } else {
        println!(
            "(skipping the groff + Ghostscript corpus: `apt-get install groff-base ghostscript`)"
        );
    }
    if have("pdftocairo") {
        let mut cairo = Corpus {
            name: "cairo (pdftocairo)",
            files: Vec::new(),
            bodies: Vec::new(),
        };
        for (i, src) in lopdf.files.iter().enumerate() {
            let pdf = dir.join(format!("cairo-{i}.pdf"));
            run_tool(Command::new("pdftocairo").arg("-pdf").arg(src).arg(&pdf))?;
            cairo.bodies.push(std::fs::read(&pdf)?);
            cairo.files.push(pdf);
        }
        corpora.push(cairo);
    }
    corpora.insert(0, lopdf);
    Ok(corpora)
}

fn word_counts(text: &str) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for w in text.split_whitespace() {
        *m.entry(w).or_insert(0) += 1;
    }
    m
}

/// Multiset overlap of words: the fraction of `reference`'s words that `got` has.
fn recall(got: &str, reference: &str) -> f64 {
    let g = word_counts(got);
    let r = word_counts(reference);
    let total: usize = r.values().sum();
    let hit: usize = r
        .iter()
        .map(|(w, n)| (*n).min(g.get(w).copied().unwrap_or(0)))
        .sum();
    if total == 0 {
        return 1.0;
    }
    hit as f64 / total as f64
}

fn lopdf_builtin(body: &[u8]) -> String {
    let Ok(doc) = lopdf::Document::load_mem(body) else {
        return String::new();
    };
    let pages: Vec<u32> = doc.get_pages().keys().copied().collect();
    doc.extract_text(&pages).unwrap_or_default()
}

fn pdftotext(path: &Path) -> Result<String> {
    let out = run_tool(
        Command::new("pdftotext")
            .args(["-q", "-enc", "UTF-8"])
            .arg(path)
            .arg("-"),
    )?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

struct Row {
    name: &'static str,
    docs: usize,
    pages: usize,
    avg_kb: f64,
    sift_pages_s: f64,
    builtin_pages_s: f64,
    poppler_pages_s: Option<f64>,
    sift_recall: Option<f64>,
    builtin_recall: Option<f64>,
    sift_precision: Option<f64>,
}

fn bench_corpus(c: &Corpus, poppler: bool) -> Result<Row> {
    let mut pages = 0usize;
    let mut sift_texts = Vec::new();
    for b in &c.bodies {
        let x = extract(b, Some("application/pdf"), "x.pdf")
            .with_context(|| format!("{}: sift cannot extract a file", c.name))?;
        pages += x.pages.unwrap_or(0);
        sift_texts.push(x.text);
    }
    let docs = c.bodies.len() as f64;
    let (passes, secs) = time_passes(&c.bodies, |b| {
        std::hint::black_box(extract(b, Some("application/pdf"), "x.pdf").is_ok());
    });
    let sift_pages_s = passes * pages as f64 / secs;
    let (passes, secs) = time_passes(&c.bodies, |b| {
        std::hint::black_box(lopdf_builtin(b).len());
    });
    let builtin_pages_s = passes * pages as f64 / secs;
    let builtin_texts: Vec<String> = c.bodies.iter().map(|b| lopdf_builtin(b)).collect();

    let (mut poppler_pages_s, mut sift_recall, mut builtin_recall, mut sift_precision) =
        (None, None, None, None);
    if poppler {
        let mut reference = Vec::new();
        for f in &c.files {
            reference.push(pdftotext(f)?);
        }
        let (passes, secs) = time_passes(&c.files, |f| {
            std::hint::black_box(pdftotext(f).map(|t| t.len()).unwrap_or(0));
        });
        poppler_pages_s = Some(passes * pages as f64 / secs);
        let mean = |xs: Vec<f64>| xs.iter().sum::<f64>() / xs.len() as f64;
        sift_recall = Some(mean(
            sift_texts
                .iter()
                .zip(&reference)
                .map(|(s, r)| recall(s, r))
                .collect(),
        ));
        builtin_recall = Some(mean(
            builtin_texts
                .iter()
                .zip(&reference)
                .map(|(s, r)| recall(s, r))
                .collect(),
        ));
        sift_precision = Some(mean(
            sift_texts
                .iter()
                .zip(&reference)
                .map(|(s, r)| recall(r, s))
                .collect(),
        ));
    }
    Ok(Row {
        name: c.name,
        docs: c.bodies.len(),
        pages,
        avg_kb: c.bodies.iter().map(Vec::len).sum::<usize>() as f64 / docs / 1024.0,
        sift_pages_s,
        builtin_pages_s,
        poppler_pages_s,
        sift_recall,
        builtin_recall,
        sift_precision,
    })
}

fn main() -> Result<()> {
    let started = Instant::now();
    let docs = load_docs()?;
    println!(
        "sift extract benchmark: {} source documents, single thread\n",
        docs.len()
    );
    bench_html(&docs)?;

    let dir = tempfile::tempdir()?;
    let corpora = make_corpora(dir.path(), &docs)?;
    let poppler = have("pdftotext");
    if !poppler {
        println!(
            "pdftotext not found: the comparison columns stay empty. Install it with `apt-get install poppler-utils`."
        );
    }
    let mut rows = Vec::new();
    for c in &corpora {
        rows.push(bench_corpus(c, poppler)?);
    }
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    println!(
        "PDF extraction (pages/s and docs/s; word recall = share of pdftotext's words recovered)"
    );
    println!(
        "{:<20} {:>4} {:>6} {:>7} | {:>9} {:>7} | {:>9} {:>7} | {:>9} {:>7} | {:>8} {:>8} {:>9}",
        "corpus",
        "docs",
        "pages",
        "avg KB",
        "sift p/s",
        "docs/s",
        "lopdf p/s",
        "docs/s",
        "pdftotext",
        "docs/s",
        "sift rec",
        "lopdf rec",
        "sift prec"
    );
    for r in &rows {
        let per_doc = r.pages as f64 / r.docs as f64;
        println!(
            "{:<20} {:>4} {:>6} {:>7.0} | {:>9.0} {:>7.1} | {:>9.0} {:>7.1} | {:>9} {:>7} | {:>8} {:>8} {:>9}",
            r.name,
            r.docs,
            r.pages,
            r.avg_kb,
            r.sift_pages_s,
            r.sift_pages_s / per_doc,
            r.builtin_pages_s,
            r.builtin_pages_s / per_doc,
            num(r.poppler_pages_s),
            num(r.poppler_pages_s.map(|p| p / per_doc)),
            pct(r.sift_recall),
            pct(r.builtin_recall),
            pct(r.sift_precision),
        );
    }
    println!(
        "\nsift = sift::ingest::extract (lopdf parsing + positioned text); lopdf = lopdf's Document::extract_text;\n\
         pdftotext = poppler-utils, one subprocess per file. sift prec = share of sift's words that pdftotext also has.\n\
         finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    std::io::stdout().flush()?;
    Ok(())
}
