//! Plain text and JSON passthrough.
//!
//! Plain text is decoded (BOM, header charset, else a guess; never a panic on
//! bytes that are not UTF-8) and line endings normalized; its title is the
//! first line when that is short. JSON is an object with a string `text` (or
//! `body`, or `content`) field and an optional string `title`, as crawlers and
//! APIs that already extracted a page hand it over.

use super::{charset, ExtractError, Extracted, Kind};

/// A first line longer than this is text, not a title.
const MAX_TITLE_CHARS: usize = 200;

/// Extracts a plain-text body.
pub fn extract_text(body: &[u8], header_charset: Option<&str>, name: &str) -> Extracted {
    let tld = charset::tld_of(name);
    let decoded = charset::decode(body, header_charset, None, tld.as_deref());
    let text = normalize(&decoded.text);
    let title = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .filter(|l| l.chars().count() <= MAX_TITLE_CHARS)
        .unwrap_or_default()
        .to_string();
    Extracted {
        content_type: Kind::Text.content_type(),
        title,
        text,
        pages: None,
        section: None,
    }
}

/// `\r\n` and lone `\r` to `\n`, NULs and other invisible controls dropped,
/// trailing spaces cut from lines, leading and trailing whitespace trimmed.
fn normalize(s: &str) -> String {
    let unified = s.replace("\r\n", "\n").replace('\r', "\n");
    let cleaned: String = unified
        .chars()
        .filter(|&c| !c.is_control() || c == '\n' || c == '\t')
        .collect();
    let lines: Vec<&str> = cleaned.lines().map(str::trim_end).collect();
    lines.join("\n").trim().to_string()
}

/// Extracts a JSON body: `{"title": …, "text": …}` (or `body` / `content`).
pub fn extract_json(body: &[u8], header_charset: Option<&str>) -> Result<Extracted, ExtractError> {
    // JSON is UTF-8 by definition, but a BOM or an explicit charset is honoured.
    let decoded = charset::decode(body, header_charset, Some(encoding_rs::UTF_8), None);
    let value: serde_json::Value =
        serde_json::from_str(&decoded.text).map_err(|e| ExtractError::BadJson(e.to_string()))?;
    let obj = value.as_object().ok_or(ExtractError::JsonNoText)?;
    let text = ["text", "body", "content"]
        .iter()
        .filter_map(|k| obj.get(*k).and_then(serde_json::Value::as_str))
        .map(normalize)
        .find(|t| !t.is_empty())
        .ok_or(ExtractError::JsonNoText)?;
    let title = obj
        .get("title")
        .and_then(serde_json::Value::as_str)
        .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let section = obj
        .get("section")
        .and_then(serde_json::Value::as_str)
        .and_then(super::section_value);
    Ok(Extracted {
        content_type: Kind::Json.content_type(),
        title,
        text,
        pages: None,
        section,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_title_and_newlines() {
        let x = extract_text(b"\r\n  Title line  \r\nbody\rmore  \n\n", None, "");
        assert_eq!(
            (x.title.as_str(), x.text.as_str()),
            ("Title line", "Title line\nbody\nmore")
        );
        let long = "x".repeat(201);
        assert_eq!(extract_text(long.as_bytes(), None, "").title, "");
    }

    #[test]
    fn text_in_latin1_decodes() {
        let x = extract_text(
            b"Caf\xE9 cr\xE8me \xE0 la fran\xE7aise, d\xE9j\xE0 vu",
            None,
            "",
        );
        assert_eq!(x.text, "Café crème à la française, déjà vu");
    }

    #[test]
    fn json_fields() {
        let x = extract_json(br#"{"title":"T","body":"B","text":""}"#, None).expect("ok");
        assert_eq!((x.title.as_str(), x.text.as_str()), ("T", "B"));
        let e = extract_json(br#"{"title":"T"}"#, None).expect_err("no text");
        assert_eq!(e.reason(), "json_no_text");
        let e = extract_json(br#"["text"]"#, None).expect_err("array");
        assert_eq!(e.reason(), "json_no_text");
        let e = extract_json(br#"{"text": "#, None).expect_err("bad");
        assert_eq!(e.reason(), "bad_json");
    }
}
