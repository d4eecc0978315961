//! Text normalization: Unicode NFKC, control and invisible format characters
//! removed, whitespace collapsed, at most one blank line between paragraphs.
//!
//! NFKC folds the compatibility forms extraction leaves behind (ligatures
//! such as `ﬁ`, fullwidth letters and digits, non-breaking spaces), so that
//! the same words compare, hash and tokenize the same downstream.

use std::borrow::Cow;

use unicode_normalization::{is_nfkc_quick, IsNormalized, UnicodeNormalization};

/// A normalized text and its length in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The text.
    pub text: String,
    /// Its length in characters (`chars().count()`).
    pub chars: usize,
}

/// Normalizes a document text: paragraphs (separated by blank lines) and line
/// breaks are kept, at most one blank line in a row; other whitespace runs
/// become one space; lines and the whole text are trimmed.
pub fn text(raw: &str) -> Normalized {
    collapse(&nfkc(raw), true)
}

/// Normalizes a title: as [`text`], but on one line.
pub fn title(raw: &str) -> String {
    collapse(&nfkc(raw), false).text
}

/// NFKC, skipping the work for text that is already normalized (ASCII always is).
fn nfkc(raw: &str) -> Cow<'_, str> {
    if raw.is_ascii() || is_nfkc_quick(raw.chars()) == IsNormalized::Yes {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(raw.nfkc().collect())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Printed as it is.
    Keep,
    /// Horizontal whitespace.
    Space,
    /// A line break; 2 = a paragraph break.
    Break(u8),
    /// Removed.
    Drop,
}

/// Classes of the ASCII characters, so the common case is one table lookup.
const ASCII: [Class; 128] = {
    let mut t = [Class::Keep; 128];
    let mut i = 0;
    while i < 0x20 {
        t[i] = Class::Drop;
        i += 1;
    }
    t[0x7f] = Class::Drop;
    t[b'\t' as usize] = Class::Space;
    t[b' ' as usize] = Class::Space;
    t[b'\n' as usize] = Class::Break(1);
    t[b'\r' as usize] = Class::Break(1);
    t[0x0b] = Class::Break(1); // vertical tab
    t[0x0c] = Class::Break(1); // form feed
    t
};

fn classify(c: char) -> Class {
    if c.is_ascii() {
        return ASCII[c as usize];
    }
    match c {
        '\u{85}' | '\u{2028}' => Class::Break(1),
        '\u{2029}' => Class::Break(2),
        // Invisible format characters that only get in the way of matching
        // words: soft hyphen, zero-width space, direction marks and
        // embeddings, word joiner and invisible operators, BOM. Zero-width
        // (non-)joiners stay: some scripts and emoji need them.
        '\u{ad}'
        | '\u{180e}'
        | '\u{200b}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{feff}' => Class::Drop,
        c if c.is_whitespace() => Class::Space,
        c if c.is_control() => Class::Drop,
        _ => Class::Keep,
    }
}

/// Builds the output: separators are written only before the next kept
/// character, so lines and the text come out trimmed.
struct Writer {
    out: String,
    chars: usize,
    paragraphs: bool,
    /// Whitespace seen since the last kept character.
    space: bool,
    /// Line breaks seen since the last kept character (at most 2 matter).
    breaks: u8,
    /// The last character was `\r`, so a `\n` now is part of the same break.
    prev_cr: bool,
}

impl Writer {
    fn separate(&mut self) {
        if !self.out.is_empty() {
            if self.paragraphs && self.breaks >= 2 {
                self.out.push_str("\n\n");
                self.chars += 2;
            } else if self.paragraphs && self.breaks == 1 {
                self.out.push('\n');
                self.chars += 1;
            } else if self.breaks > 0 || self.space {
                self.out.push(' ');
                self.chars += 1;
            }
        }
        self.space = false;
        self.breaks = 0;
        self.prev_cr = false;
    }

    fn keep_str(&mut self, s: &str, chars: usize) {
        self.separate();
        self.out.push_str(s);
        self.chars += chars;
    }

    fn keep_char(&mut self, c: char) {
        self.separate();
        self.out.push(c);
        self.chars += 1;
    }

    fn gap(&mut self, class: Class, c: char) {
        match class {
            Class::Break(n) => {
                if !(self.prev_cr && c == '\n') {
                    self.breaks = self.breaks.saturating_add(n).min(2);
                }
                self.prev_cr = c == '\r';
            }
            Class::Space => {
                self.space = true;
                self.prev_cr = false;
            }
            Class::Drop | Class::Keep => {}
        }
    }
}

fn ascii_kept(b: u8) -> bool {
    b < 0x80 && ASCII[b as usize] == Class::Keep
}

/// One pass over the bytes: runs of printable ASCII, single spaces between
/// them included, are copied as slices; anything else goes char by char.
fn collapse(s: &str, paragraphs: bool) -> Normalized {
    let bytes = s.as_bytes();
    let mut w = Writer {
        out: String::with_capacity(s.len()),
        chars: 0,
        paragraphs,
        space: false,
        breaks: 0,
        prev_cr: false,
    };
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x80 {
            if ascii_kept(b) {
                let start = i;
                i += 1;
                loop {
                    match bytes.get(i) {
                        Some(&d) if ascii_kept(d) => i += 1,
                        Some(b' ') if bytes.get(i + 1).is_some_and(|&d| ascii_kept(d)) => i += 2,
                        _ => break,
                    }
                }
                w.keep_str(&s[start..i], i - start);
            } else {
                w.gap(ASCII[b as usize], b as char);
                i += 1;
            }
            continue;
        }
        let Some(c) = s[i..].chars().next() else {
            break;
        };
        i += c.len_utf8();
        match classify(c) {
            Class::Keep => w.keep_char(c),
            class => w.gap(class, c),
        }
    }
    Normalized {
        text: w.out,
        chars: w.chars,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfkc_folds_compatibility_forms() {
        assert_eq!(
            text("ﬁnance ＲＥＰＯＲＴ １２３").text,
            "finance REPORT 123"
        );
        assert_eq!(title("Ｃａｆé\u{a0}ﬂow"), "Café flow");
        // Decomposed accents are composed.
        assert_eq!(text("Cafe\u{301}").text, "Café");
    }

    #[test]
    fn control_characters_and_whitespace() {
        let n = text("  Hello\u{7}  wor\u{200b}ld\t!\r\n\r\n\r\n\r\n  Second \u{0} line \n third\u{2029}fourth  ");
        assert_eq!(n.text, "Hello world !\n\nSecond line\nthird\n\nfourth");
        assert_eq!(n.chars, n.text.chars().count());
        assert_eq!(text("a\r\nb\rc").text, "a\nb\nc");
        assert_eq!(
            title(" A\n\n title \t with\r\nbreaks "),
            "A title with breaks"
        );
    }

    #[test]
    fn empty_and_blank() {
        assert_eq!(text("").chars, 0);
        assert_eq!(text(" \n\t\u{feff}\u{0} \n").text, "");
        assert_eq!(text("é").chars, 1);
    }
}
