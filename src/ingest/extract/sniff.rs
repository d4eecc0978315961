//! Deciding which extractor a body goes to.
//!
//! Servers mislabel bodies (PDFs as `application/octet-stream`, HTML as
//! `text/plain`) and files on disk carry no header at all, so the decision
//! weighs, in order: signatures of binary formats (a PNG is never text, a body
//! starting `%PDF-` is a PDF whatever the header says), a specific
//! `Content-Type`, HTML markup at the start of the body, the URL or path
//! extension, JSON punctuation, and finally whether the bytes look like text.

use super::{ExtractError, Kind};

/// How far into the body signatures and markup are looked for.
const PREFIX: usize = 1024;

/// Which extractor `body` goes to, given its `Content-Type` header (if any) and
/// its URL or path `name`; unsupported and binary types are an error.
pub fn sniff(body: &[u8], content_type: Option<&str>, name: &str) -> Result<Kind, ExtractError> {
    if body.trim_ascii().is_empty() {
        return Err(ExtractError::Empty);
    }
    let head = &body[..body.len().min(PREFIX)];
    if memchr_seq(head, b"%PDF-") {
        return Ok(Kind::Pdf);
    }
    if let Some(what) = binary_signature(head) {
        return Err(ExtractError::UnsupportedType(format!(
            "{what} (recognized by its signature)"
        )));
    }
    let prefix = prefix_text(head);
    let mime = content_type.map(mime_of).unwrap_or_default();
    if !is_generic(&mime) {
        return by_mime(&mime, &prefix);
    }
    let ext = extension(name);
    match ext.as_str() {
        "pdf" => return Ok(Kind::Pdf),
        e if BINARY_EXTENSIONS.contains(&e) => {
            return Err(ExtractError::UnsupportedType(format!("a .{e} file")));
        }
        _ => {}
    }
    if starts_like_html(&prefix) {
        return Ok(Kind::Html);
    }
    match ext.as_str() {
        "html" | "htm" | "xhtml" | "shtml" => return Ok(Kind::Html),
        "txt" | "text" | "md" | "markdown" | "rst" | "csv" | "tsv" | "log" => {
            return Ok(Kind::Text);
        }
        "json" => return Ok(Kind::Json),
        _ => {}
    }
    let trimmed = prefix.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return Ok(Kind::Json);
    }
    if looks_binary(head) {
        return Err(ExtractError::UnsupportedType(
            "binary data (no known signature, not text)".into(),
        ));
    }
    if has_html_tags(&prefix) {
        return Ok(Kind::Html);
    }
    Ok(Kind::Text)
}

/// The `charset` parameter of a `Content-Type` value, unquoted.
pub fn charset_param(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|param| {
        let (k, v) = param.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| v.trim().trim_matches(|c| c == '"' || c == '\''))
            .filter(|v| !v.is_empty())
    })
}

/// The lower-cased `type/subtype` of a `Content-Type` value.
pub fn mime_of(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Headers that say nothing about the body.
fn is_generic(mime: &str) -> bool {
    matches!(
        mime,
        "" | "application/octet-stream"
            | "binary/octet-stream"
            | "application/unknown"
            | "unknown/unknown"
            | "application/download"
            | "application/x-download"
            | "application/force-download"
            | "content/unknown"
    )
}

fn by_mime(mime: &str, prefix: &str) -> Result<Kind, ExtractError> {
    match mime {
        "text/html" | "application/xhtml+xml" => Ok(Kind::Html),
        "application/pdf" | "application/x-pdf" | "application/acrobat" => Ok(Kind::Pdf),
        "application/json" | "text/json" | "application/x-json" => Ok(Kind::Json),
        m if m.ends_with("+json") => Ok(Kind::Json),
        // Servers label HTML as text/plain often enough; markup at the start settles it.
        "text/plain" if starts_like_html(prefix) => Ok(Kind::Html),
        "text/xml" | "application/xml" if has_html_root(prefix) => Ok(Kind::Html),
        "text/css" | "text/javascript" | "text/ecmascript" | "text/x-javascript"
        | "text/calendar" | "text/vcard" | "text/x-vcard" | "text/rtf" | "text/xml" => {
            Err(ExtractError::UnsupportedType(mime.to_string()))
        }
        m if m.starts_with("text/") => Ok(Kind::Text),
        m => Err(ExtractError::UnsupportedType(m.to_string())),
    }
}

/// The start of the body as text for looking at markup: decoded by its byte
/// order mark if it has one (so UTF-16 HTML is recognized), else lossily as
/// UTF-8, which keeps the ASCII markup of any ASCII-compatible encoding.
fn prefix_text(head: &[u8]) -> String {
    match encoding_rs::Encoding::for_bom(head) {
        Some((enc, bom)) => enc.decode_without_bom_handling(&head[bom..]).0.into_owned(),
        None => String::from_utf8_lossy(head).into_owned(),
    }
}

/// `<!doctype html`, `<html`, `<head` or `<body` first (after comments or an
/// XML declaration, which may precede an XHTML root).
fn starts_like_html(prefix: &str) -> bool {
    let p = prefix.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    let lower = p.get(..p.len().min(256)).unwrap_or(p).to_ascii_lowercase();
    ["<!doctype html", "<html", "<head", "<body"]
        .iter()
        .any(|m| lower.starts_with(m))
        || ((lower.starts_with("<?xml") || lower.starts_with("<!--")) && has_html_root(prefix))
}

fn has_html_root(prefix: &str) -> bool {
    let lower = prefix.to_ascii_lowercase();
    lower.contains("<html") || lower.contains("<!doctype html")
}

/// Weaker evidence for unlabeled bodies: common tags anywhere near the start.
fn has_html_tags(prefix: &str) -> bool {
    let lower = prefix.to_ascii_lowercase();
    [
        "<p>", "<div", "<br>", "<br/>", "<a href", "<title>", "<table", "<h1",
    ]
    .iter()
    .any(|t| lower.contains(t))
}

/// NUL bytes, or many control characters that text does not contain.
fn looks_binary(head: &[u8]) -> bool {
    if encoding_rs::Encoding::for_bom(head).is_some() {
        return false;
    }
    let controls = head
        .iter()
        .filter(|&&b| matches!(b, 0x00..=0x08 | 0x0E..=0x1A | 0x1C..=0x1F))
        .count();
    head.contains(&0) || controls * 20 > head.len()
}

fn memchr_seq(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A description of the binary format whose signature starts `head`.
fn binary_signature(head: &[u8]) -> Option<&'static str> {
    const SIGS: &[(&[u8], &str)] = &[
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"\xFF\xD8\xFF", "image/jpeg"),
        (b"II*\0", "image/tiff"),
        (b"MM\0*", "image/tiff"),
        (
            b"PK\x03\x04",
            "application/zip (or a zip-based format: docx, xlsx, epub, jar)",
        ),
        (b"PK\x05\x06", "application/zip"),
        (b"\x1F\x8B", "application/gzip (decompress it first)"),
        (b"BZh", "application/x-bzip2"),
        (b"\xFD7zXZ\0", "application/x-xz"),
        (b"\x28\xB5\x2F\xFD", "application/zstd"),
        (b"7z\xBC\xAF\x27\x1C", "application/x-7z-compressed"),
        (b"Rar!\x1A\x07", "application/vnd.rar"),
        (b"\x7FELF", "application/x-executable"),
        (b"%!PS", "application/postscript"),
        (b"ID3", "audio/mpeg"),
        (b"OggS", "audio/ogg"),
        (b"fLaC", "audio/flac"),
        (b"\x1A\x45\xDF\xA3", "video/webm"),
        (
            b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1",
            "application/msword (OLE2 office file)",
        ),
        (b"wOFF", "font/woff"),
        (b"wOF2", "font/woff2"),
        (b"\0asm", "application/wasm"),
        (b"SQLite format 3\0", "application/vnd.sqlite3"),
        (b"{\\rtf", "application/rtf"),
    ];
    if let Some((_, what)) = SIGS.iter().find(|(sig, _)| head.starts_with(sig)) {
        return Some(what);
    }
    if head.len() >= 12 && &head[..4] == b"RIFF" {
        return Some(match &head[8..12] {
            b"WEBP" => "image/webp",
            b"WAVE" => "audio/wav",
            b"AVI " => "video/x-msvideo",
            _ => "a RIFF container",
        });
    }
    if head.len() >= 12 && &head[4..8] == b"ftyp" {
        return Some("video/mp4 (ISO media)");
    }
    None
}

const BINARY_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "gif", "webp", "bmp", "tif", "tiff", "ico", "svg", "zip", "gz", "tgz",
    "bz2", "xz", "zst", "7z", "rar", "tar", "exe", "dll", "so", "bin", "iso", "dmg", "mp3", "mp4",
    "m4a", "wav", "ogg", "flac", "avi", "mov", "mkv", "webm", "doc", "docx", "xls", "xlsx", "ppt",
    "pptx", "odt", "ods", "odp", "epub", "woff", "woff2", "ttf", "otf", "ps", "eps", "rtf", "css",
    "js", "wasm", "jar", "apk", "deb", "rpm",
];

/// The lower-cased extension of the last path segment of a URL or path.
fn extension(name: &str) -> String {
    let path = match url::Url::parse(name) {
        Ok(u) if u.scheme().len() > 1 => u.path().to_string(),
        _ => name.to_string(),
    };
    let last = path.rsplit(['/', '\\']).next().unwrap_or_default();
    match last.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(body: &[u8], ct: Option<&str>, name: &str) -> Result<Kind, &'static str> {
        sniff(body, ct, name).map_err(|e| e.reason())
    }

    #[test]
    fn header_then_markup_then_extension() {
        assert_eq!(
            kind(b"hello", Some("text/html; charset=utf-8"), ""),
            Ok(Kind::Html)
        );
        assert_eq!(
            kind(b"<!DOCTYPE html><p>x", Some("text/plain"), ""),
            Ok(Kind::Html)
        );
        assert_eq!(kind(b"<p>x</p>", Some("text/plain"), ""), Ok(Kind::Text));
        assert_eq!(
            kind(b"{\"a\":1}", Some("application/ld+json"), ""),
            Ok(Kind::Json)
        );
        assert_eq!(kind(b"x", Some("image/png"), ""), Err("unsupported_type"));
        assert_eq!(
            kind(b"x", Some("application/octet-stream"), "a.txt"),
            Ok(Kind::Text)
        );
        assert_eq!(kind(b"  <HTML><body>x", None, "a.txt"), Ok(Kind::Html));
        assert_eq!(kind(b"[1] intro", None, "notes.txt"), Ok(Kind::Text));
        assert_eq!(kind(b"[1, 2]", None, "data"), Ok(Kind::Json));
        assert_eq!(
            kind(b"plain words", None, "https://x.org/a.json?q=1"),
            Ok(Kind::Json)
        );
        assert_eq!(
            kind(b"plain words", None, "https://x.org/page"),
            Ok(Kind::Text)
        );
        assert_eq!(kind(b"intro <div>x</div>", None, ""), Ok(Kind::Html));
        assert_eq!(kind(b"<html>not a pdf", None, "a.pdf"), Ok(Kind::Pdf));
        assert_eq!(kind(b"abc", None, "photo.JPG"), Err("unsupported_type"));
    }

    #[test]
    fn signatures_win() {
        assert_eq!(
            kind(b"junk\n%PDF-1.4\n", Some("text/html"), ""),
            Ok(Kind::Pdf)
        );
        assert_eq!(
            kind(b"\x89PNG\r\n\x1a\n....", Some("text/html"), ""),
            Err("unsupported_type")
        );
        assert_eq!(
            kind(b"PK\x03\x04rest", None, "a.txt"),
            Err("unsupported_type")
        );
        assert_eq!(kind(b"ab\0cd\x01\x02", None, ""), Err("unsupported_type"));
        assert_eq!(kind(b"", None, "a.html"), Err("empty"));
        assert_eq!(kind(b" \n\t", None, "a.html"), Err("empty"));
    }

    #[test]
    fn utf16_html_with_bom() {
        let mut body = vec![0xFF, 0xFE];
        body.extend(
            "<!doctype html><p>x"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        );
        assert_eq!(kind(&body, None, ""), Ok(Kind::Html));
    }

    #[test]
    fn charset_params() {
        assert_eq!(
            charset_param("text/html; charset=\"Shift_JIS\""),
            Some("Shift_JIS")
        );
        assert_eq!(charset_param("text/html;CHARSET=utf-8;q=1"), Some("utf-8"));
        assert_eq!(charset_param("text/html"), None);
        assert_eq!(mime_of(" Text/HTML ; charset=x"), "text/html");
    }
}
