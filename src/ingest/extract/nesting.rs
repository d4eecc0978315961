//! Caps how deeply HTML elements nest before html5ever sees them.
//!
//! html5ever follows the HTML standard's tree construction, which looks
//! through the stack of open elements for each start tag (is there a `<p>`
//! in button scope?). On a page of N unclosed `<div>`s that is N²: 3.3 MB of
//! nested `<div>`s took 272 s of CPU. Browsers bound it by capping the tree
//! depth (Chromium at 512); here a linear pass over the markup drops the
//! start tags that would open an element deeper than [`MAX_DEPTH`], and the
//! end tags that would close one. Text is never dropped, so the extracted
//! text is the same words; only structure that deep is flattened.
//!
//! The standard's "active formatting elements" are the other way to make
//! html5ever work N² (and take N² memory): formatting elements (`<b>`, `<a>`,
//! `<font>`, …) left open are re-created in every later block, so 300
//! unclosed `<b id=…>` before 20,000 short `<div>`s made 240 KB of markup
//! into 6 million elements and 1.3 GB. The pass keeps at most
//! [`MAX_FORMATTING`] formatting elements open at once and drops further
//! ones with their end tags; they style text, they do not hold any, so the
//! extracted text is the same.
//!
//! The pass reads tags as the tokenizer would in the common cases: comments,
//! `<!…>` and `<?…>` declarations, quoted attribute values that contain `>`,
//! self-closing and void elements, and the raw-text contents of `<script>`,
//! `<style>`, `<textarea>`, `<title>`, `<xmp>`, `<iframe>`, `<noembed>`,
//! `<noframes>` and `<plaintext>`. Where it reads a tag differently from
//! html5ever, the only effect is a different flattening of very deep markup.

use std::borrow::Cow;

/// Deepest element nesting kept.
pub const MAX_DEPTH: usize = 512;

/// Most formatting elements left open at once.
pub const MAX_FORMATTING: usize = 12;

/// The HTML standard's formatting elements.
fn is_formatting(name: &[u8]) -> bool {
    matches!(
        name,
        b"a" | b"b"
            | b"big"
            | b"code"
            | b"em"
            | b"font"
            | b"i"
            | b"nobr"
            | b"s"
            | b"small"
            | b"strike"
            | b"strong"
            | b"tt"
            | b"u"
    )
}

/// Elements that never have content.
fn is_void(name: &[u8]) -> bool {
    matches!(
        name,
        b"area"
            | b"base"
            | b"br"
            | b"col"
            | b"embed"
            | b"hr"
            | b"img"
            | b"input"
            | b"link"
            | b"meta"
            | b"param"
            | b"source"
            | b"track"
            | b"wbr"
            | b"basefont"
            | b"bgsound"
            | b"frame"
            | b"keygen"
    )
}

/// Elements whose contents are text up to their end tag.
fn is_raw_text(name: &[u8]) -> bool {
    matches!(
        name,
        b"script"
            | b"style"
            | b"textarea"
            | b"title"
            | b"xmp"
            | b"iframe"
            | b"noembed"
            | b"noframes"
            | b"plaintext"
    )
}

/// One tag: where it ends (after `>`), its lower-case name, whether it is
/// an end tag and whether it closes itself (`/>`).
struct Tag {
    end: usize,
    name: Vec<u8>,
    closing: bool,
    self_closing: bool,
}

/// Reads the tag starting at `at` (`bytes[at] == b'<'`), if it is one.
fn tag_at(bytes: &[u8], at: usize) -> Option<Tag> {
    let mut i = at + 1;
    let closing = bytes.get(i) == Some(&b'/');
    if closing {
        i += 1;
    }
    let start = i;
    while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
        i += 1;
    }
    if i == start || !bytes[start].is_ascii_alphabetic() {
        return None;
    }
    let name = bytes[start..i].to_ascii_lowercase();
    // Attributes, with quoted values that may hold `>`.
    let mut quote = None;
    let mut last = 0u8;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'>' => {
                return Some(Tag {
                    end: i + 1,
                    name,
                    closing,
                    self_closing: last == b'/',
                })
            }
            None => {}
        }
        if !b.is_ascii_whitespace() {
            last = b;
        }
        i += 1;
    }
    None
}

/// Where the construct starting at `at` (`<!`, `<?`) ends.
fn declaration_end(bytes: &[u8], at: usize) -> usize {
    let rest = &bytes[at..];
    let close: &[u8] = if rest.starts_with(b"<!--") {
        b"-->"
    } else {
        b">"
    };
    let from = if close == b"-->" { 4 } else { 2 };
    find(&rest[from.min(rest.len())..], close).map_or(bytes.len(), |p| at + from + p + close.len())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where the raw text of `name` ends: at its end tag, or the end.
fn raw_text_end(bytes: &[u8], from: usize, name: &[u8]) -> usize {
    if name == b"plaintext" {
        return bytes.len();
    }
    let mut i = from;
    while let Some(p) = memchr_lt(&bytes[i..]) {
        let at = i + p;
        let rest = &bytes[at..];
        if rest.len() >= 2 + name.len()
            && rest[1] == b'/'
            && rest[2..2 + name.len()].eq_ignore_ascii_case(name)
        {
            return at;
        }
        i = at + 1;
    }
    bytes.len()
}

fn memchr_lt(hay: &[u8]) -> Option<usize> {
    hay.iter().position(|b| *b == b'<')
}

/// `html` with the tags that would nest elements deeper than `max_depth`
/// left out; borrowed, unchanged, when nothing nests that deep.
pub fn cap_depth(html: &str, max_depth: usize) -> Cow<'_, str> {
    let bytes = html.as_bytes();
    // Open elements by name, only as far as the cap: beyond it, a count.
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut over = 0usize;
    let mut cut: Vec<(usize, usize)> = Vec::new();
    // Formatting elements open, and end tags still to drop, by name.
    let mut formatting = 0usize;
    let mut dropped: std::collections::HashMap<Vec<u8>, usize> = Default::default();
    let mut i = 0;
    while let Some(p) = memchr_lt(&bytes[i..]) {
        let at = i + p;
        match bytes.get(at + 1) {
            Some(b'!') | Some(b'?') => {
                i = declaration_end(bytes, at);
                continue;
            }
            _ => {}
        }
        let Some(tag) = tag_at(bytes, at) else {
            i = at + 1;
            continue;
        };
        i = tag.end;
        let styles = is_formatting(&tag.name);
        if tag.closing && styles {
            if let Some(n) = dropped.get_mut(&tag.name).filter(|n| **n > 0) {
                *n -= 1;
                cut.push((at, tag.end));
                continue;
            }
            formatting = formatting.saturating_sub(1);
        }
        if !tag.closing && styles && !tag.self_closing {
            if formatting >= MAX_FORMATTING {
                *dropped.entry(tag.name).or_default() += 1;
                cut.push((at, tag.end));
                continue;
            }
            formatting += 1;
        }
        if tag.closing {
            if over > 0 {
                over -= 1;
                cut.push((at, tag.end));
            } else if let Some(pos) = stack.iter().rposition(|n| *n == tag.name) {
                stack.truncate(pos);
            }
            continue;
        }
        if is_raw_text(&tag.name) {
            i = raw_text_end(bytes, tag.end, &tag.name);
        }
        if tag.self_closing || is_void(&tag.name) {
            continue;
        }
        if stack.len() >= max_depth {
            over += 1;
            cut.push((at, tag.end));
        } else {
            stack.push(tag.name);
        }
    }
    if cut.is_empty() {
        return Cow::Borrowed(html);
    }
    let mut out = String::with_capacity(html.len());
    let mut from = 0;
    for (a, b) in cut {
        out.push_str(&html[from..a]);
        from = b;
    }
    out.push_str(&html[from..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shallow_markup_is_left_as_it_is() {
        let html = "<html><body><div><p>a <b>b</b></p><br><img src=x><p>c</div></body></html>";
        assert!(matches!(cap_depth(html, 8), Cow::Borrowed(_)));
    }

    #[test]
    fn deep_markup_is_flattened_and_keeps_its_text() {
        let n = 100;
        let html = format!("{}x{}", "<div>".repeat(n), "</div>".repeat(n));
        let capped = cap_depth(&html, 10);
        assert_eq!(
            capped,
            format!("{}x{}", "<div>".repeat(10), "</div>".repeat(10))
        );
        let with_text: String =
            (0..n).map(|i| format!("<div>w{i} ")).collect::<String>() + &"</div>".repeat(n);
        let capped = cap_depth(&with_text, 10);
        for i in 0..n {
            assert!(capped.contains(&format!("w{i} ")), "word {i} was lost");
        }
    }

    #[test]
    fn formatting_elements_left_open_are_capped_with_their_end_tags() {
        let html: String = (0..100)
            .map(|i| format!("<b id={i}>w{i} "))
            .collect::<String>()
            + "<div>x</div>"
            + &"</b>".repeat(100);
        let capped = cap_depth(&html, MAX_DEPTH);
        assert_eq!(capped.matches("<b ").count(), MAX_FORMATTING);
        assert_eq!(capped.matches("</b>").count(), MAX_FORMATTING);
        for i in 0..100 {
            assert!(capped.contains(&format!("w{i} ")), "word {i} was lost");
        }
    }

    #[test]
    fn scripts_comments_and_quoted_attributes_are_not_tags() {
        let html = "<div title='a > b'><script>if (a<b) { x = '<div><div>'; }</script>\
                    <!-- <div><div><div> --><div>t</div></div>";
        assert!(matches!(cap_depth(html, 2), Cow::Borrowed(_)));
    }
}
