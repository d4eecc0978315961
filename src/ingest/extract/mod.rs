//! Text extraction: HTML, PDF, plain text and JSON bodies to a title and text.
//! `sift ingest` and `sift extract` share this one code path.
//!
//! [`extract`] first decides what a body is ([`sniff()`]: binary signatures, the
//! `Content-Type` header, markup at the start of the body, the URL or path
//! extension), then hands it to one extractor: [`html`] (html5ever through
//! `scraper`, with charset detection and boilerplate removal), [`pdf`]
//! (`lopdf`, with its own text positioning to put spaces and line breaks where
//! the page shows them), or [`text`] (plain text and JSON passthrough).
//! Every failure is an [`ExtractError`] whose [`reason`](ExtractError::reason)
//! is a short fixed code for metrics and the dead-letter topic.

pub mod charset;
pub mod html;
pub mod nesting;
pub mod pdf;
pub mod sniff;
pub mod text;

use std::io::Write;

pub use pdf::build_pdf;
pub use sniff::sniff;

/// Which extractor a body goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HTML or XHTML.
    Html,
    /// PDF.
    Pdf,
    /// Plain text.
    Text,
    /// JSON.
    Json,
}

impl Kind {
    /// The normalized content type this kind is reported as.
    pub fn content_type(self) -> &'static str {
        match self {
            Kind::Html => "text/html",
            Kind::Pdf => "application/pdf",
            Kind::Text => "text/plain",
            Kind::Json => "application/json",
        }
    }
}

/// What extraction yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The normalized content type (`text/html`, `application/pdf`, `text/plain`, `application/json`).
    pub content_type: &'static str,
    /// Title, possibly empty.
    pub title: String,
    /// Main text.
    pub text: String,
    /// Number of pages, for PDFs; `None` for the other kinds.
    pub pages: Option<usize>,
    /// The section the site filed the page under (HTML `article:section`,
    /// JSON `section`), when it says; the model reads it.
    pub section: Option<String>,
}

/// Longest section kept, in characters: a label, not a text.
pub const MAX_SECTION_CHARS: usize = 80;

/// A section as the model gets it: whitespace collapsed, at most
/// [`MAX_SECTION_CHARS`]; None when blank.
pub fn section_value(raw: &str) -> Option<String> {
    let collapsed = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut: String = collapsed.chars().take(MAX_SECTION_CHARS).collect();
    (!cut.is_empty()).then_some(cut)
}

/// Why a body could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// Nothing to extract.
    #[error("the body is empty")]
    Empty,
    /// Images, archives, office files, executables and anything else that is not
    /// HTML, PDF, plain text or JSON.
    #[error("unsupported content type: {0}; sift extracts HTML, PDF, plain text and JSON only")]
    UnsupportedType(String),
    /// The PDF needs a password to open.
    #[error("the PDF is encrypted and needs a password to open; sift cannot read it")]
    PdfEncrypted,
    /// The body claims to be a PDF but cannot be parsed as one.
    #[error("the PDF is broken or not really a PDF: {0}")]
    PdfBroken(String),
    /// The PDF parses but holds no text (typically scanned pages, which need OCR).
    #[error("the PDF has {pages} page(s) but no extractable text (scanned pages need OCR first)")]
    PdfNoText {
        /// Pages the PDF has.
        pages: usize,
    },
    /// The body is labeled or looks like JSON but does not parse.
    #[error("invalid JSON: {0}")]
    BadJson(String),
    /// The JSON parses but has no text to take.
    #[error("the JSON has no non-empty string `text`, `body` or `content` field at the top level")]
    JsonNoText,
    /// Extraction went over its time or memory budget ([`TIME_BUDGET`],
    /// [`MAX_NODES`]): a hostile or broken document, not worth more.
    #[error("extraction stopped: {0}")]
    OverBudget(String),
}

/// Longest an extraction may run; a document over it is refused
/// ([`ExtractError::OverBudget`]) and goes to the dead-letter topic.
pub const TIME_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// Most nodes an HTML document may become (about 300 bytes each): a page of
/// a few MB has a few hundred thousand; markup that makes the parser create
/// far more than it holds (formatting elements reconstructed again and
/// again) is refused before it takes the memory.
pub const MAX_NODES: usize = 1_000_000;

impl ExtractError {
    /// A short fixed code for metrics and the dead-letter topic.
    pub fn reason(&self) -> &'static str {
        match self {
            ExtractError::Empty => "empty",
            ExtractError::UnsupportedType(_) => "unsupported_type",
            ExtractError::PdfEncrypted => "pdf_encrypted",
            ExtractError::PdfBroken(_) => "pdf_broken",
            ExtractError::PdfNoText { .. } => "pdf_no_text",
            ExtractError::BadJson(_) => "bad_json",
            ExtractError::JsonNoText => "json_no_text",
            ExtractError::OverBudget(_) => "over_budget",
        }
    }
}

/// Extracts `body`, whose `Content-Type` header (if any) is `content_type` and
/// whose URL or path is `name` (its extension helps when the header is absent).
pub fn extract(
    body: &[u8],
    content_type: Option<&str>,
    name: &str,
) -> Result<Extracted, ExtractError> {
    let kind = sniff(body, content_type, name)?;
    let header_charset = content_type.and_then(sniff::charset_param);
    match kind {
        Kind::Html => html::extract(body, header_charset, name),
        Kind::Pdf => pdf::extract(body),
        Kind::Text => Ok(text::extract_text(body, header_charset, name)),
        Kind::Json => text::extract_json(body, header_charset),
    }
}

/// The links of a fetched page, if it is HTML (anything else has none to
/// follow).
pub fn links(
    body: &[u8],
    content_type: Option<&str>,
    url: &url::Url,
) -> Result<Option<html::Links>, ExtractError> {
    match sniff(body, content_type, url.as_str()) {
        Ok(Kind::Html) => {
            html::links(body, content_type.and_then(sniff::charset_param), url).map(Some)
        }
        _ => Ok(None),
    }
}

/// `sift extract` flags.
#[derive(Debug, clap::Args)]
pub struct ExtractArgs {
    /// HTML, PDF, text or JSON files.
    #[arg(required = true)]
    pub files: Vec<std::path::PathBuf>,
}

/// Runs `sift extract`: prints each file's header line, title and text; a file
/// that cannot be read or extracted is reported on stderr and the others still
/// run, and the command fails at the end if any did.
pub fn main(args: ExtractArgs) -> crate::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = 0usize;
    for (i, path) in args.files.iter().enumerate() {
        let shown = path.display();
        let body = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("sift: {shown}: cannot read the file: {e}");
                failed += 1;
                continue;
            }
        };
        let x = match extract(&body, None, &path.to_string_lossy()) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("sift: {shown}: {e}");
                failed += 1;
                continue;
            }
        };
        let pages = match x.pages {
            Some(1) => ", 1 page".to_string(),
            Some(n) => format!(", {n} pages"),
            None => String::new(),
        };
        let chars = x.text.chars().count();
        let sep = if i > 0 { "\n" } else { "" };
        let section = x
            .section
            .as_deref()
            .map(|s| format!("Section: {s}\n"))
            .unwrap_or_default();
        writeln!(
            out,
            "{sep}== {shown} ({}{pages}, {chars} chars)\nTitle: {}\n{section}\n{}",
            x.content_type, x.title, x.text
        )
        .and_then(|()| out.flush())
        .map_err(|e| crate::Error::io("writing the extracted text to stdout", e))?;
    }
    if failed > 0 {
        return Err(crate::Error::Invalid(format!(
            "{failed} of {} file(s) could not be extracted (see the messages above)",
            args.files.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_codes() {
        let all = [
            ExtractError::Empty,
            ExtractError::UnsupportedType("image/png".into()),
            ExtractError::PdfEncrypted,
            ExtractError::PdfBroken("x".into()),
            ExtractError::PdfNoText { pages: 1 },
            ExtractError::BadJson("x".into()),
            ExtractError::JsonNoText,
            ExtractError::OverBudget("x".into()),
        ];
        let mut reasons: Vec<_> = all.iter().map(ExtractError::reason).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), all.len());
        assert!(reasons
            .iter()
            .all(|r| r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    }

    #[test]
    fn dispatches_by_kind() {
        let x = extract(b"<p>Hi <b>there</b></p>", Some("text/html"), "").expect("html");
        assert_eq!((x.content_type, x.text.as_str()), ("text/html", "Hi there"));
        let x = extract(b"Hello\nworld", None, "a.txt").expect("text");
        assert_eq!((x.content_type, x.title.as_str()), ("text/plain", "Hello"));
        let x = extract(br#"{"text":"t"}"#, None, "").expect("json");
        assert_eq!(x.content_type, "application/json");
        let e = extract(b"\x89PNG\r\n\x1a\n", None, "").expect_err("png");
        assert_eq!(e.reason(), "unsupported_type");
        let e = extract(b"", None, "x.html").expect_err("empty");
        assert_eq!(e.reason(), "empty");
    }
}
