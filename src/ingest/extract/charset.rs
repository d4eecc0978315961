//! Charset detection and decoding for the HTML and plain-text extractors.
//!
//! The order follows the WHATWG encoding sniffing algorithm: a byte order mark
//! wins, then the `charset` of the `Content-Type` header, then a charset the
//! document declares itself (`<meta charset>` for HTML), and only then a guess
//! by `chardetng` from the bytes. Decoding goes through `encoding_rs`, which
//! replaces malformed sequences instead of failing, so any input decodes.

use encoding_rs::{Encoding, UTF_16BE, UTF_16LE, UTF_8, WINDOWS_1252, X_USER_DEFINED};

/// Where the encoding used for a body came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A byte order mark at the start of the body.
    Bom,
    /// The `charset` parameter of the `Content-Type` header.
    Header,
    /// A declaration inside the document (`<meta charset>`).
    Document,
    /// `chardetng`'s guess (or valid UTF-8, which needs no guessing).
    Detected,
}

/// A decoded body and how its encoding was chosen.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The body as text, byte order mark removed.
    pub text: String,
    /// The encoding it was decoded with.
    pub encoding: &'static Encoding,
    /// Why that encoding.
    pub source: Source,
}

/// How many bytes `chardetng` looks at; enough to tell encodings apart, and it
/// keeps guessing cheap on large bodies.
const DETECT_BYTES: usize = 64 * 1024;

/// The encoding an HTTP or `<meta>` charset label names, per the WHATWG label
/// table (so `iso-8859-1` is windows-1252, `sjis` is Shift_JIS, …).
pub fn for_label(label: &str) -> Option<&'static Encoding> {
    let label = label.trim().trim_matches(|c| c == '"' || c == '\'');
    Encoding::for_label(label.as_bytes())
}

/// The top-level domain of `name` when it is a URL, in the form `chardetng`
/// accepts (lower-case ASCII, no dots); `None` for paths.
pub fn tld_of(name: &str) -> Option<String> {
    let url = url::Url::parse(name).ok()?;
    let host = url.host_str()?;
    let tld = host.trim_end_matches('.').rsplit('.').next()?;
    let ok = !tld.is_empty() && tld.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    ok.then(|| tld.to_ascii_lowercase())
}

/// Guesses the encoding of unlabeled bytes: valid UTF-8 (allowing a sequence
/// cut off at the very end, as a size limit may leave it) is UTF-8; anything
/// else is up to `chardetng`, helped by the site's top-level domain.
pub fn detect(body: &[u8], tld: Option<&str>) -> &'static Encoding {
    let sample = &body[..body.len().min(DETECT_BYTES)];
    match std::str::from_utf8(sample) {
        Ok(_) => return UTF_8,
        Err(e) if e.error_len().is_none() => return UTF_8,
        Err(_) => {}
    }
    let mut detector = chardetng::EncodingDetector::new(chardetng::Iso2022JpDetection::Allow);
    detector.feed(sample, sample.len() == body.len());
    detector.guess(tld.map(str::as_bytes), chardetng::Utf8Detection::Allow)
}

/// Decodes `body`: byte order mark, else `header` (the `Content-Type` charset
/// label), else `declared` (found in the document by the caller), else a guess.
/// An unknown header label is ignored rather than trusted.
pub fn decode(
    body: &[u8],
    header: Option<&str>,
    declared: Option<&'static Encoding>,
    tld: Option<&str>,
) -> Decoded {
    if let Some((encoding, bom_len)) = Encoding::for_bom(body) {
        let (text, _) = encoding.decode_without_bom_handling(&body[bom_len..]);
        return Decoded {
            text: text.into_owned(),
            encoding,
            source: Source::Bom,
        };
    }
    let (encoding, source) = if let Some(e) = header.and_then(for_label) {
        (e, Source::Header)
    } else if let Some(e) = declared {
        (e, Source::Document)
    } else {
        (detect(body, tld), Source::Detected)
    };
    let (text, _) = encoding.decode_without_bom_handling(body);
    Decoded {
        text: text.into_owned(),
        encoding,
        source,
    }
}

/// What a charset declared inside an HTML document means: a document cannot be
/// UTF-16 if its declaration was readable as ASCII, so those labels mean UTF-8,
/// and `x-user-defined` means windows-1252 (both per the HTML standard).
pub fn for_document_label(label: &str) -> Option<&'static Encoding> {
    let e = for_label(label)?;
    Some(if e == UTF_16BE || e == UTF_16LE {
        UTF_8
    } else if e == X_USER_DEFINED {
        WINDOWS_1252
    } else {
        e
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bom_beats_header() {
        let d = decode(b"\xEF\xBB\xBFcaf\xC3\xA9", Some("iso-8859-1"), None, None);
        assert_eq!((d.text.as_str(), d.source), ("café", Source::Bom));
        let d = decode(b"\xFF\xFEh\0i\0", None, None, None);
        assert_eq!(d.text, "hi");
    }

    #[test]
    fn header_then_declared_then_detected() {
        let d = decode(b"caf\xE9", Some("latin1"), Some(UTF_8), None);
        assert_eq!((d.text.as_str(), d.source), ("café", Source::Header));
        let d = decode(
            b"caf\xE9",
            Some("no-such-charset"),
            Some(WINDOWS_1252),
            None,
        );
        assert_eq!((d.text.as_str(), d.source), ("café", Source::Document));
        let d = decode("café".as_bytes(), None, None, None);
        assert_eq!((d.text.as_str(), d.source), ("café", Source::Detected));
    }

    #[test]
    fn tld_is_safe_for_chardetng() {
        assert_eq!(tld_of("https://www.Example.JP/a").as_deref(), Some("jp"));
        assert_eq!(tld_of("/tmp/a.html"), None);
        assert_eq!(tld_of("http://127.0.0.1/"), Some("1".into()));
        let _ = detect(b"\xE9t\xE9", tld_of("http://example.fr/").as_deref());
    }

    #[test]
    fn document_labels() {
        assert_eq!(for_document_label("utf-16"), Some(UTF_8));
        assert_eq!(for_document_label("x-user-defined"), Some(WINDOWS_1252));
        assert_eq!(for_document_label("bogus"), None);
    }
}
