//! PDF to text with `lopdf`, and [`build_pdf`], a small PDF writer for
//! fixtures, tests, benchmarks and the sample web.
//!
//! `lopdf` parses the file, decrypts it when no password is needed, and maps
//! font codes to Unicode (ToUnicode CMaps, standard encodings, Differences).
//! Its own `extract_text` concatenates shown strings and so runs words
//! together whenever a producer positions words separately (as TeX, groff via
//! Ghostscript and most typesetters do). This module instead interprets the
//! page content itself: it tracks the text and graphics matrices and glyph
//! widths, so it knows where each string starts and ends on the page, and puts
//! a space where a gap between two runs is wider than [`SPACE_GAP`] of the font
//! size and a line break where the baseline moves. Text is taken in content
//! stream order, which for nearly all producers is reading order; text in Form
//! XObjects is included. `benches/extract.rs` measures the result against
//! `pdftotext`.
//!
//! Hostile input: streams are decompressed under a size limit, content
//! operators and nested forms are budgeted, a page that fails to decode is
//! skipped, and a panic inside the parser is caught and reported as a broken
//! PDF.

use std::collections::HashMap;
use std::rc::Rc;

use lopdf::content::{Content, Operation};
use lopdf::{dictionary, Dictionary, Document, Encoding, LoadOptions, Object, ObjectId, Stream};

use super::{ExtractError, Extracted, Kind};

/// Largest size any one stream may decompress to.
const MAX_STREAM_BYTES: usize = 64 << 20;
/// Largest total decompressed content (page streams and forms) per page.
const MAX_PAGE_CONTENT_BYTES: usize = 64 << 20;
/// Content operators interpreted per page before the rest is ignored.
const MAX_OPS_PER_PAGE: usize = 4_000_000;
/// Form XObjects nested deeper than this are ignored.
const MAX_FORM_DEPTH: usize = 8;
/// Form XObjects drawn per page before further ones are ignored.
const MAX_FORMS_PER_PAGE: usize = 10_000;
/// Saved graphics states (`q`) kept before further saves are ignored.
const MAX_STATE_DEPTH: usize = 256;

/// A horizontal gap between two runs of text on one line wider than this
/// fraction of the font size is taken as a word space. Kerning moves glyphs by
/// well under a tenth of an em; the narrowest word spaces of justified text are
/// about a sixth.
pub const SPACE_GAP: f64 = 0.15;

/// Extracts the text of every page of a PDF, in page order, and the title of
/// its Info dictionary.
pub fn extract(body: &[u8]) -> Result<Extracted, ExtractError> {
    std::panic::catch_unwind(|| extract_inner(body)).unwrap_or_else(|_| {
        Err(ExtractError::PdfBroken(
            "the PDF parser crashed on this file".into(),
        ))
    })
}

fn extract_inner(body: &[u8]) -> Result<Extracted, ExtractError> {
    let started = std::time::Instant::now();
    let options = LoadOptions {
        max_decompressed_size: Some(MAX_STREAM_BYTES),
        ..LoadOptions::default()
    };
    let mut doc = match Document::load_mem_with_options(body, options) {
        Ok(doc) => doc,
        Err(lopdf::Error::InvalidPassword) | Err(lopdf::Error::Decryption(_)) => {
            return Err(ExtractError::PdfEncrypted)
        }
        Err(_) if contains(body, b"/Encrypt") => return Err(ExtractError::PdfEncrypted),
        Err(e) => return Err(ExtractError::PdfBroken(e.to_string())),
    };
    // lopdf decrypts documents that open with the empty user password (most
    // "protected" PDFs only restrict printing or copying); the trailer keeps
    // /Encrypt only when a real password is needed.
    if doc.trailer.has(b"Encrypt") {
        return Err(ExtractError::PdfEncrypted);
    }
    let page_ids: Vec<ObjectId> = doc.get_pages().into_values().collect();
    if page_ids.is_empty() {
        return Err(ExtractError::PdfBroken("it has no pages".into()));
    }
    prepare_fonts(&mut doc);
    let doc = doc;
    let title = info_title(&doc);
    let mut fonts = FontCache::default();
    let mut texts = Vec::new();
    let mut unreadable = 0usize;
    for (n, &id) in page_ids.iter().enumerate() {
        if started.elapsed() > super::TIME_BUDGET {
            return Err(ExtractError::OverBudget(format!(
                "reading the PDF took over {:?} by page {n} of {}",
                super::TIME_BUDGET,
                page_ids.len()
            )));
        }
        match page_text(&doc, id, &mut fonts) {
            Some(t) if !t.is_empty() => texts.push(t),
            Some(_) => {}
            None => unreadable += 1,
        }
    }
    if texts.is_empty() {
        // No text and damaged pages: a truncated or corrupt file, not a scan.
        return Err(if unreadable > 0 {
            ExtractError::PdfBroken(format!(
                "{unreadable} of its {} page(s) could not be read and the rest hold no text",
                page_ids.len()
            ))
        } else {
            ExtractError::PdfNoText {
                pages: page_ids.len(),
            }
        });
    }
    Ok(Extracted {
        content_type: Kind::Pdf.content_type(),
        title,
        text: texts.join("\n\n"),
        pages: Some(page_ids.len()),
        section: None,
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn deref<'a>(doc: &'a Document, o: &'a Object) -> &'a Object {
    doc.dereference(o).map_or(o, |(_, o)| o)
}

fn float(o: &Object) -> Option<f64> {
    o.as_float().ok().map(f64::from).filter(|v| v.is_finite())
}

/// The Info dictionary's `/Title`, whitespace collapsed.
fn info_title(doc: &Document) -> String {
    doc.trailer
        .get_deref(b"Info", doc)
        .and_then(Object::as_dict)
        .and_then(|info| info.get_deref(b"Title", doc))
        .and_then(lopdf::decode_text_string)
        .map(|t| {
            t.split(|c: char| c.is_whitespace() || c.is_control())
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Key under which [`prepare_fonts`] links a font to a copy of itself without
/// `/Encoding`, which makes lopdf decode through the font's ToUnicode CMap.
const TO_UNICODE_TWIN: &[u8] = b"SiftToUnicodeTwin";

/// Readies font dictionaries for decoding: lopdf decodes with `/Encoding`
/// whenever a font has one, but `/ToUnicode` is the more faithful map (it is
/// what the producer says the glyphs mean), so each font that has both gets a
/// twin without `/Encoding`; and fonts that omit the required `/Type /Font`
/// get it, as lopdf refuses them otherwise.
fn prepare_fonts(doc: &mut Document) {
    let mut twins = Vec::new();
    for (id, object) in doc.objects.iter_mut() {
        let Object::Dictionary(d) = object else {
            continue;
        };
        let subtype = d.get(b"Subtype").and_then(Object::as_name).ok();
        let font_subtype = matches!(
            subtype,
            Some(b"Type1" | b"TrueType" | b"Type0" | b"Type3" | b"MMType1")
        );
        if !d.has(b"Type")
            && font_subtype
            && (d.has(b"BaseFont") || d.has(b"FontDescriptor") || d.has(b"Widths"))
        {
            d.set("Type", Object::Name(b"Font".to_vec()));
        }
        if d.has_type(b"Font") && d.has(b"ToUnicode") && d.has(b"Encoding") {
            twins.push(*id);
        }
    }
    for id in twins {
        let Some(Object::Dictionary(d)) = doc.objects.get(&id) else {
            continue;
        };
        let mut twin = d.clone();
        twin.remove(b"Encoding");
        let Ok(twin_id) = doc.try_add_object(twin) else {
            return;
        };
        if let Some(Object::Dictionary(d)) = doc.objects.get_mut(&id) {
            d.set(TO_UNICODE_TWIN, Object::Reference(twin_id));
        }
    }
}

/// How a font's codes become text.
enum Decoder<'a> {
    /// One-byte codes: the text of each of the 256 codes (empty if unknown).
    Table(Vec<String>),
    /// Two-byte codes of a composite (Type0) font, through its CMap.
    Composite(Encoding<'a>),
    /// Codes this extractor cannot map to text.
    Unknown { two_byte: bool },
}

/// Glyph advance widths, in glyph units (1/1000 em except for Type3 fonts).
enum Widths {
    /// `/FirstChar` and `/Widths` of a simple font.
    Table {
        first: i64,
        widths: Vec<f64>,
        missing: f64,
    },
    /// `/DW` and sorted `/W` ranges of a CID font.
    Cid {
        default: f64,
        ranges: Vec<(u32, u32, f64)>,
    },
    /// Metrics of a standard font without `/Widths`: codes 32..=126, else `other`.
    Standard {
        ascii: &'static [u16; 95],
        other: f64,
    },
    /// One width for every glyph (Courier, or nothing known).
    Fixed(f64),
}

impl Widths {
    fn get(&self, code: u32) -> f64 {
        match self {
            Widths::Table {
                first,
                widths,
                missing,
            } => usize::try_from(i64::from(code) - first)
                .ok()
                .and_then(|i| widths.get(i).copied())
                .unwrap_or(*missing),
            Widths::Cid { default, ranges } => {
                let i = ranges.partition_point(|&(lo, _, _)| lo <= code);
                match i.checked_sub(1).map(|i| ranges[i]) {
                    Some((lo, hi, w)) if lo <= code && code <= hi => w,
                    _ => *default,
                }
            }
            Widths::Standard { ascii, other } => {
                if (32..=126).contains(&code) {
                    f64::from(ascii[(code - 32) as usize])
                } else {
                    *other
                }
            }
            Widths::Fixed(w) => *w,
        }
    }
}

struct Font<'a> {
    decoder: Decoder<'a>,
    widths: Widths,
    /// Glyph units to text space units (1/1000 except for Type3 fonts).
    scale: f64,
}

impl<'a> Font<'a> {
    fn load(doc: &'a Document, dict: &'a Dictionary) -> Font<'a> {
        let subtype = dict
            .get(b"Subtype")
            .and_then(Object::as_name)
            .unwrap_or(b"");
        let twin = dict
            .get(TO_UNICODE_TWIN)
            .and_then(Object::as_reference)
            .and_then(|id| doc.get_dictionary(id))
            .ok();
        let encoding_of =
            |d: &'a Dictionary| d.get_font_encoding_with_limit(doc, MAX_STREAM_BYTES).ok();
        if subtype == b"Type0" {
            let decoder = match twin.and_then(encoding_of).or_else(|| encoding_of(dict)) {
                // A one-byte map on a composite font is lopdf's fallback for a
                // font it could not map (glyph ids without ToUnicode).
                Some(Encoding::OneByteEncoding(_)) | None => Decoder::Unknown { two_byte: true },
                Some(e) => Decoder::Composite(e),
            };
            return Font {
                decoder,
                widths: cid_widths(doc, dict),
                scale: 0.001,
            };
        }
        let preferred = twin.and_then(encoding_of);
        let base = encoding_of(dict);
        let pick = |e: &Option<Encoding<'a>>, b: u8| {
            e.as_ref()
                .and_then(|e| e.bytes_to_string(&[b]).ok())
                .filter(|s| !s.is_empty() && !s.contains('\u{FFFD}'))
        };
        let table: Vec<String> = (0..=255u8)
            .map(|b| {
                pick(&preferred, b)
                    .or_else(|| pick(&base, b))
                    .unwrap_or_default()
            })
            .collect();
        let decoder = if preferred.is_none() && base.is_none() {
            Decoder::Unknown { two_byte: false }
        } else {
            Decoder::Table(table)
        };
        let scale = if subtype == b"Type3" {
            dict.get_deref(b"FontMatrix", doc)
                .and_then(Object::as_array)
                .ok()
                .and_then(|m| m.first())
                .and_then(float)
                .filter(|s| *s != 0.0)
                .unwrap_or(0.001)
        } else {
            0.001
        };
        Font {
            decoder,
            widths: simple_widths(doc, dict),
            scale,
        }
    }

    fn two_byte(&self) -> bool {
        matches!(
            self.decoder,
            Decoder::Composite(_) | Decoder::Unknown { two_byte: true }
        )
    }
}

fn simple_widths(doc: &Document, dict: &Dictionary) -> Widths {
    if let Ok(list) = dict.get_deref(b"Widths", doc).and_then(Object::as_array) {
        let first = dict
            .get_deref(b"FirstChar", doc)
            .and_then(Object::as_i64)
            .unwrap_or(0);
        let missing = dict
            .get_deref(b"FontDescriptor", doc)
            .and_then(Object::as_dict)
            .and_then(|fd| fd.get_deref(b"MissingWidth", doc))
            .ok()
            .and_then(float)
            .unwrap_or(0.0);
        let widths = list
            .iter()
            .map(|w| float(deref(doc, w)).unwrap_or(missing))
            .collect();
        return Widths::Table {
            first,
            widths,
            missing,
        };
    }
    let base = dict
        .get(b"BaseFont")
        .and_then(Object::as_name)
        .map(|n| String::from_utf8_lossy(n).to_ascii_lowercase())
        .unwrap_or_default();
    if base.contains("courier") || base.contains("mono") {
        Widths::Fixed(600.0)
    } else if base.contains("times") || base.contains("serif") && !base.contains("sans") {
        Widths::Standard {
            ascii: &TIMES_ROMAN,
            other: 500.0,
        }
    } else if base.contains("symbol") || base.contains("dingbats") {
        Widths::Fixed(600.0)
    } else {
        Widths::Standard {
            ascii: &HELVETICA,
            other: 556.0,
        }
    }
}

fn cid_widths(doc: &Document, dict: &Dictionary) -> Widths {
    let descendant = dict
        .get_deref(b"DescendantFonts", doc)
        .and_then(Object::as_array)
        .ok()
        .and_then(|a| a.first())
        .and_then(|d| deref(doc, d).as_dict().ok());
    let Some(cid) = descendant else {
        return Widths::Fixed(1000.0);
    };
    let default = cid
        .get_deref(b"DW", doc)
        .ok()
        .and_then(float)
        .unwrap_or(1000.0);
    let mut ranges = Vec::new();
    if let Ok(w) = cid.get_deref(b"W", doc).and_then(Object::as_array) {
        let mut i = 0;
        while i < w.len() {
            let Some(start) = deref(doc, &w[i])
                .as_i64()
                .ok()
                .and_then(|c| u32::try_from(c).ok())
            else {
                break;
            };
            match w.get(i + 1).map(|o| deref(doc, o)) {
                Some(Object::Array(list)) => {
                    for (k, v) in list.iter().enumerate() {
                        let code = start.saturating_add(u32::try_from(k).unwrap_or(u32::MAX));
                        ranges.push((code, code, float(deref(doc, v)).unwrap_or(default)));
                    }
                    i += 2;
                }
                Some(end) => {
                    let end = end.as_i64().ok().and_then(|c| u32::try_from(c).ok());
                    let width = w.get(i + 2).and_then(|o| float(deref(doc, o)));
                    let (Some(end), Some(width)) = (end, width) else {
                        break;
                    };
                    ranges.push((start, end.max(start), width));
                    i += 3;
                }
                None => break,
            }
        }
    }
    ranges.sort_by_key(|&(lo, _, _)| lo);
    Widths::Cid { default, ranges }
}

/// Fonts already loaded, by the address of their dictionary in the document
/// (stable: the document is not modified while pages are read).
#[derive(Default)]
struct FontCache<'a> {
    fonts: HashMap<usize, Rc<Font<'a>>>,
}

/// Row-vector affine matrix `[a b c d e f]`, as PDF writes them.
type Matrix = [f64; 6];

const IDENTITY: Matrix = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];

/// `m1 × m2`: apply `m1`, then `m2`.
fn mul(m1: &Matrix, m2: &Matrix) -> Matrix {
    [
        m1[0] * m2[0] + m1[1] * m2[2],
        m1[0] * m2[1] + m1[1] * m2[3],
        m1[2] * m2[0] + m1[3] * m2[2],
        m1[2] * m2[1] + m1[3] * m2[3],
        m1[4] * m2[0] + m1[5] * m2[2] + m2[4],
        m1[4] * m2[1] + m1[5] * m2[3] + m2[5],
    ]
}

fn translate(tx: f64, ty: f64) -> Matrix {
    [1.0, 0.0, 0.0, 1.0, tx, ty]
}

fn matrix_of(operands: &[Object]) -> Option<Matrix> {
    let v: Vec<f64> = operands.iter().filter_map(float).collect();
    <[f64; 6]>::try_from(v).ok()
}

/// Graphics state that matters for text.
#[derive(Clone)]
struct GState<'a> {
    ctm: Matrix,
    font: Option<Rc<Font<'a>>>,
    size: f64,
    char_spacing: f64,
    word_spacing: f64,
    h_scale: f64,
    leading: f64,
    rise: f64,
}

impl Default for GState<'_> {
    fn default() -> Self {
        GState {
            ctm: IDENTITY,
            font: None,
            size: 0.0,
            char_spacing: 0.0,
            word_spacing: 0.0,
            h_scale: 1.0,
            leading: 0.0,
            rise: 0.0,
        }
    }
}

/// Where the last run of text ended, in device space.
#[derive(Clone, Copy)]
struct Last {
    x_end: f64,
    y: f64,
    size: f64,
}

/// Page text being assembled from positioned runs.
#[derive(Default)]
struct Emit {
    out: String,
    last: Option<Last>,
}

impl Emit {
    fn run(&mut self, raw: &str, x0: f64, y0: f64, x1: f64, size: f64) {
        let cleaned;
        let text = if raw.chars().all(is_plain) {
            raw
        } else {
            cleaned = clean(raw);
            cleaned.as_str()
        };
        let same_line = |last: &Last| (y0 - last.y).abs() <= 0.5 * size.max(last.size);
        if text.is_empty() {
            if let Some(last) = self.last.as_mut().filter(|l| same_line(l)) {
                last.x_end = x1;
            }
            return;
        }
        if let Some(last) = self.last {
            let em = size.max(last.size).max(1e-6);
            if !same_line(&last) {
                let trimmed = self.out.trim_end_matches(' ').len();
                self.out.truncate(trimmed);
                self.out
                    .push_str(if last.y - y0 > 1.8 * em { "\n\n" } else { "\n" });
            } else {
                let gap = x0 - last.x_end;
                let spaced = self.out.ends_with(char::is_whitespace)
                    || text.starts_with(char::is_whitespace);
                if !spaced && (gap > SPACE_GAP * em || gap < -em) {
                    self.out.push(' ');
                }
            }
        }
        self.out.push_str(text);
        self.last = Some(Last {
            x_end: x1,
            y: y0,
            size,
        });
    }

    /// The page's text: spaces collapsed, lines trimmed, at most one blank
    /// line, and words hyphenated across a line break joined again
    /// (`inter-` + `face` → `interface`), as `pdftotext` does.
    fn finish(self) -> String {
        let mut out = String::with_capacity(self.out.len());
        let mut blank = 0;
        for line in self.out.lines() {
            let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
            if line.is_empty() {
                blank += 1;
                continue;
            }
            if !out.is_empty() {
                if blank == 0 && hyphenated(&out, &line) {
                    out.pop();
                } else {
                    out.push_str(if blank > 0 { "\n\n" } else { "\n" });
                }
            }
            blank = 0;
            out.push_str(&line);
        }
        out
    }
}

/// Whether `before` ends in a word broken by a hyphen that `next` continues
/// (a letter, the hyphen, a line break, a letter: `pdftotext`'s rule too).
fn hyphenated(before: &str, next: &str) -> bool {
    let mut tail = before.chars().rev();
    tail.next() == Some('-')
        && tail.next().is_some_and(char::is_alphabetic)
        && next.chars().next().is_some_and(char::is_alphabetic)
}

/// Characters [`clean`] keeps as they are.
fn is_plain(c: char) -> bool {
    !(c.is_control()
        || matches!(
            c,
            '\u{FB00}'..='\u{FB06}' | '\u{FFFD}' | '\u{FEFF}' | '\u{AD}'
        ))
}

/// Drops what is not text (controls, replacement characters) and spells out
/// typographic ligatures (ﬁ → fi), as search and classification want words.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\u{FB00}' => out.push_str("ff"),
            '\u{FB01}' => out.push_str("fi"),
            '\u{FB02}' => out.push_str("fl"),
            '\u{FB03}' => out.push_str("ffi"),
            '\u{FB04}' => out.push_str("ffl"),
            '\u{FB05}' | '\u{FB06}' => out.push_str("st"),
            '\u{FFFD}' | '\u{FEFF}' | '\u{AD}' => {}
            '\t' | '\n' | '\r' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The text of one page; `None` when the page or its content is missing or
/// cannot be decoded.
fn page_text<'a>(
    doc: &'a Document,
    page_id: ObjectId,
    fonts: &mut FontCache<'a>,
) -> Option<String> {
    doc.get_dictionary(page_id).ok()?;
    let streams = doc.get_page_contents(page_id);
    let loadable = |id: &ObjectId| doc.get_object(*id).and_then(Object::as_stream).is_ok();
    if !streams.is_empty() && !streams.iter().any(loadable) {
        return None;
    }
    let content = doc
        .get_page_content_with_limit(page_id, MAX_PAGE_CONTENT_BYTES)
        .ok()?;
    let (direct, ids) = doc.get_page_resources(page_id).ok()?;
    let resources: Vec<&Dictionary> = direct
        .into_iter()
        .chain(ids.iter().filter_map(|id| doc.get_dictionary(*id).ok()))
        .collect();
    let mut page = PageReader {
        doc,
        fonts,
        emit: Emit::default(),
        ops: 0,
        forms: 0,
        content_bytes: content.len(),
    };
    page.run(&content, &resources, GState::default(), 0);
    Some(page.emit.finish())
}

struct PageReader<'a, 'c> {
    doc: &'a Document,
    fonts: &'c mut FontCache<'a>,
    emit: Emit,
    ops: usize,
    forms: usize,
    content_bytes: usize,
}

impl<'a> PageReader<'a, '_> {
    /// The entry `name` of resource category `category` (`Font`, `XObject`).
    fn resource(
        &self,
        resources: &[&'a Dictionary],
        category: &[u8],
        name: &[u8],
    ) -> Option<&'a Object> {
        let doc = self.doc;
        resources.iter().find_map(|r| {
            r.get_deref(category, doc)
                .and_then(Object::as_dict)
                .and_then(|c| c.get_deref(name, doc))
                .ok()
        })
    }

    fn font(&mut self, resources: &[&'a Dictionary], name: &[u8]) -> Option<Rc<Font<'a>>> {
        let dict = self.resource(resources, b"Font", name)?.as_dict().ok()?;
        let key = std::ptr::from_ref(dict) as usize;
        let doc = self.doc;
        Some(Rc::clone(
            self.fonts
                .fonts
                .entry(key)
                .or_insert_with(|| Rc::new(Font::load(doc, dict))),
        ))
    }

    fn run(
        &mut self,
        content: &[u8],
        resources: &[&'a Dictionary],
        start: GState<'a>,
        depth: usize,
    ) {
        let mut gs = start;
        let mut saved: Vec<GState<'a>> = Vec::new();
        let mut tm = IDENTITY;
        let mut tlm = IDENTITY;
        for op in Content::decode_iter(content) {
            let Ok(op) = op else { break };
            self.ops += 1;
            if self.ops > MAX_OPS_PER_PAGE {
                break;
            }
            let num = |i: usize| op.operands.get(i).and_then(float).unwrap_or(0.0);
            match op.operator.as_str() {
                "q" if saved.len() < MAX_STATE_DEPTH => saved.push(gs.clone()),
                "Q" => {
                    if let Some(s) = saved.pop() {
                        gs = s;
                    }
                }
                "cm" => {
                    if let Some(m) = matrix_of(&op.operands) {
                        gs.ctm = mul(&m, &gs.ctm);
                    }
                }
                "BT" => {
                    tm = IDENTITY;
                    tlm = IDENTITY;
                }
                "Tc" => gs.char_spacing = num(0),
                "Tw" => gs.word_spacing = num(0),
                "Tz" => gs.h_scale = num(0) / 100.0,
                "TL" => gs.leading = num(0),
                "Ts" => gs.rise = num(0),
                "Tf" => {
                    gs.size = num(1);
                    gs.font = op
                        .operands
                        .first()
                        .and_then(|o| o.as_name().ok())
                        .and_then(|n| self.font(resources, n));
                }
                "Td" | "TD" => {
                    if op.operator == "TD" {
                        gs.leading = -num(1);
                    }
                    tlm = mul(&translate(num(0), num(1)), &tlm);
                    tm = tlm;
                }
                "Tm" => {
                    if let Some(m) = matrix_of(&op.operands) {
                        tlm = m;
                        tm = m;
                    }
                }
                "T*" => {
                    tlm = mul(&translate(0.0, -gs.leading), &tlm);
                    tm = tlm;
                }
                "Tj" => self.show(op.operands.first(), &gs, &mut tm),
                "'" => {
                    tlm = mul(&translate(0.0, -gs.leading), &tlm);
                    tm = tlm;
                    self.show(op.operands.first(), &gs, &mut tm);
                }
                "\"" => {
                    gs.word_spacing = num(0);
                    gs.char_spacing = num(1);
                    tlm = mul(&translate(0.0, -gs.leading), &tlm);
                    tm = tlm;
                    self.show(op.operands.get(2), &gs, &mut tm);
                }
                "TJ" => {
                    let Some(Object::Array(items)) = op.operands.first() else {
                        continue;
                    };
                    for item in items {
                        match item {
                            Object::String(..) => self.show(Some(item), &gs, &mut tm),
                            other => {
                                if let Some(n) = float(other) {
                                    let tx = -n / 1000.0 * gs.size * gs.h_scale;
                                    tm = mul(&translate(tx, 0.0), &tm);
                                }
                            }
                        }
                    }
                }
                "Do" => self.form(&op, resources, &gs, depth),
                _ => {}
            }
        }
    }

    /// Shows one string operand glyph by glyph: each glyph's text goes to
    /// [`Emit`] with where it starts and ends on the page, and the text matrix
    /// advances by its width plus character and word spacing. Going glyph by
    /// glyph catches producers that draw word spaces as character spacing
    /// (Ghostscript does) rather than as gaps between strings.
    fn show(&mut self, operand: Option<&Object>, gs: &GState<'a>, tm: &mut Matrix) {
        let (Some(Object::String(bytes, _)), Some(font)) = (operand, gs.font.as_ref()) else {
            return;
        };
        let m = mul(tm, &gs.ctm);
        let size = (gs.size * m[2].hypot(m[3])).abs();
        // Device position of the glyph origin `a` text-space units along the line.
        let at = |a: f64| {
            (
                a * m[0] + gs.rise * m[2] + m[4],
                a * m[1] + gs.rise * m[3] + m[5],
            )
        };
        let step = if font.two_byte() { 2 } else { 1 };
        let mut a = 0.0;
        let mut buf = String::new();
        for chunk in bytes.chunks(step) {
            let code = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
            let w = font.widths.get(code) * font.scale * gs.size;
            let text: &str = match &font.decoder {
                Decoder::Table(t) => &t[usize::from(chunk[0])],
                Decoder::Composite(e) => {
                    buf.clear();
                    if e.write_to_string(chunk, &mut buf).is_err() {
                        buf.clear();
                    }
                    &buf
                }
                Decoder::Unknown { .. } => "",
            };
            // A space glyph is not taken at its word: producers shrink or
            // stretch it with word spacing (Ghostscript even draws unrelated
            // glyphs in one string with negative spacing), so whether a word
            // ends is decided by the gap to the next glyph. Only a space whose
            // width is unknown is trusted.
            if !(w > 0.0 && !text.is_empty() && text.chars().all(char::is_whitespace)) {
                let (x0, y0) = at(a);
                let (x1, _) = at(a + w * gs.h_scale);
                self.emit.run(text, x0, y0, x1, size);
            }
            let mut tx = w + gs.char_spacing;
            if chunk.len() == 1 && code == 32 {
                tx += gs.word_spacing;
            }
            a += tx * gs.h_scale;
        }
        *tm = mul(&translate(a, 0.0), tm);
    }

    /// Draws a Form XObject (`Do`), whose content may hold text.
    fn form(
        &mut self,
        op: &Operation,
        resources: &[&'a Dictionary],
        gs: &GState<'a>,
        depth: usize,
    ) {
        if depth >= MAX_FORM_DEPTH || self.forms >= MAX_FORMS_PER_PAGE {
            return;
        }
        let Some(name) = op.operands.first().and_then(|o| o.as_name().ok()) else {
            return;
        };
        let Some(Object::Stream(stream)) = self.resource(resources, b"XObject", name) else {
            return;
        };
        if stream.dict.get(b"Subtype").and_then(Object::as_name).ok() != Some(b"Form") {
            return;
        }
        self.forms += 1;
        let budget = MAX_PAGE_CONTENT_BYTES.saturating_sub(self.content_bytes);
        let Ok(content) = stream.decompressed_content_with_limit(budget) else {
            return;
        };
        self.content_bytes += content.len();
        let mut inner = gs.clone();
        if let Some(m) = stream
            .dict
            .get(b"Matrix")
            .and_then(Object::as_array)
            .ok()
            .and_then(|a| matrix_of(a))
        {
            inner.ctm = mul(&m, &gs.ctm);
        }
        let own: Vec<&'a Dictionary> = stream
            .dict
            .get_deref(b"Resources", self.doc)
            .and_then(Object::as_dict)
            .ok()
            .into_iter()
            .collect();
        let inner_resources: &[&'a Dictionary] = if own.is_empty() { resources } else { &own };
        self.run(&content, inner_resources, inner, depth + 1);
    }
}

// ---------------------------------------------------------------------------
// Writing PDFs.

const PAGE_WIDTH: f64 = 612.0;
const PAGE_HEIGHT: f64 = 792.0;
const MARGIN: f64 = 72.0;
const FONT_SIZE: f64 = 11.0;
const LEADING: f64 = 14.0;
/// Lines that fit between the top and bottom margins.
const LINES_PER_PAGE: usize = ((PAGE_HEIGHT - 2.0 * MARGIN) / LEADING) as usize;

/// Writes a PDF (US Letter, Helvetica 11 pt, WinAnsi encoding, compressed
/// content streams, the title in the Info dictionary) with `pages[i]` starting
/// page `i + 1`. Lines wrap at the margins and `\n` breaks a line; text that
/// does not fit on its page continues on further pages, so the PDF may have
/// more pages than `pages` has items (never fewer; at least one). Characters
/// WinAnsi lacks become `?`. [`extract`] gives the text back with paragraphs
/// as written and wrapped lines broken where they wrapped.
pub fn build_pdf(title: &str, pages: &[String]) -> Vec<u8> {
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font",
        "Subtype" => "Type1",
        "BaseFont" => "Helvetica",
        "Encoding" => "WinAnsiEncoding",
    });
    let resources_id = doc.add_object(dictionary! {
        "Font" => dictionary! { "F1" => font_id },
    });
    let none = [String::new()];
    let pages = if pages.is_empty() { &none[..] } else { pages };
    let mut kids: Vec<Object> = Vec::new();
    for text in pages {
        let lines = wrap(text);
        let chunks: Vec<&[Vec<u8>]> = if lines.is_empty() {
            vec![&[]]
        } else {
            lines.chunks(LINES_PER_PAGE).collect()
        };
        for chunk in chunks {
            let mut ops = vec![
                Operation::new("BT", vec![]),
                Operation::new("Tf", vec!["F1".into(), FONT_SIZE.into()]),
                Operation::new("TL", vec![LEADING.into()]),
                Operation::new(
                    "Td",
                    vec![MARGIN.into(), (PAGE_HEIGHT - MARGIN - FONT_SIZE).into()],
                ),
            ];
            for (i, line) in chunk.iter().enumerate() {
                if i > 0 {
                    ops.push(Operation::new("T*", vec![]));
                }
                if !line.is_empty() {
                    ops.push(Operation::new(
                        "Tj",
                        vec![Object::string_literal(line.clone())],
                    ));
                }
            }
            ops.push(Operation::new("ET", vec![]));
            let content = Content { operations: ops }
                .encode()
                .expect("encoding numbers, names and strings into memory cannot fail");
            let content_id = doc.add_object(Stream::new(dictionary! {}, content));
            let page_id = doc.add_object(dictionary! {
                "Type" => "Page",
                "Parent" => pages_id,
                "Contents" => content_id,
                "Resources" => resources_id,
                "MediaBox" => vec![0.into(), 0.into(), PAGE_WIDTH.into(), PAGE_HEIGHT.into()],
            });
            kids.push(page_id.into());
        }
    }
    let count = i64::try_from(kids.len()).unwrap_or(i64::MAX);
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! { "Type" => "Pages", "Kids" => kids, "Count" => count }),
    );
    let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    let info_id = doc.add_object(dictionary! {
        "Title" => lopdf::text_string(title),
        "Producer" => Object::string_literal("sift build_pdf (lopdf)"),
    });
    doc.trailer.set("Root", catalog_id);
    doc.trailer.set("Info", info_id);
    doc.compress();
    let mut out = Vec::new();
    doc.save_to(&mut out)
        .expect("writing a PDF into memory cannot fail");
    out
}

/// Helvetica advance widths of the WinAnsi code, in 1/1000 em.
fn helvetica_width(b: u8) -> f64 {
    match b {
        32..=126 => f64::from(HELVETICA[usize::from(b - 32)]),
        _ => 556.0,
    }
}

/// The WinAnsi (windows-1252) code of `c`, or `?`.
fn win_ansi(c: char) -> u8 {
    const HIGH: [char; 32] = [
        '€', '\0', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\0', 'Ž', '\0', '\0',
        '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\0', 'ž', 'Ÿ',
    ];
    match u32::from(c) {
        0x20..=0x7E | 0xA0..=0xFF => u8::try_from(u32::from(c)).unwrap_or(b'?'),
        _ => HIGH
            .iter()
            .position(|&h| h == c && h != '\0')
            .and_then(|i| u8::try_from(0x80 + i).ok())
            .unwrap_or(b'?'),
    }
}

/// Lines of WinAnsi bytes that fit between the margins, words kept whole
/// unless one alone is wider than a line.
fn wrap(text: &str) -> Vec<Vec<u8>> {
    let max = (PAGE_WIDTH - 2.0 * MARGIN) * 1000.0 / FONT_SIZE;
    let space = helvetica_width(b' ');
    let width = |w: &[u8]| w.iter().map(|&b| helvetica_width(b)).sum::<f64>();
    let mut lines = Vec::new();
    for para in text.split('\n') {
        let mut line: Vec<u8> = Vec::new();
        let mut used = 0.0;
        for word in para.split_whitespace() {
            let mut word: Vec<u8> = word.chars().map(win_ansi).collect();
            let mut w = width(&word);
            if !line.is_empty() && used + space + w <= max {
                line.push(b' ');
                line.extend_from_slice(&word);
                used += space + w;
                continue;
            }
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            }
            while w > max && word.len() > 1 {
                let mut cut = 0;
                let mut acc = 0.0;
                while cut < word.len() && acc + helvetica_width(word[cut]) <= max {
                    acc += helvetica_width(word[cut]);
                    cut += 1;
                }
                let rest = word.split_off(cut.max(1));
                lines.push(std::mem::replace(&mut word, rest));
                w = width(&word);
            }
            used = w;
            line = word;
        }
        lines.push(line);
    }
    while lines.last().is_some_and(Vec::is_empty) {
        lines.pop();
    }
    lines
}

/// Helvetica widths of codes 32..=126 (Adobe AFM), 1/1000 em.
const HELVETICA: [u16; 95] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278,
    278, // space../
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556, // 0..?
    1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778, // @..O
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556, // P.._
    333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556, // `..o
    556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584, // p..~
];

/// Times-Roman widths of codes 32..=126 (Adobe AFM), 1/1000 em.
const TIMES_ROMAN: [u16; 95] = [
    250, 333, 408, 500, 500, 833, 778, 180, 333, 333, 500, 564, 250, 333, 250,
    278, // space../
    500, 500, 500, 500, 500, 500, 500, 500, 500, 500, 278, 278, 564, 564, 564, 444, // 0..?
    921, 722, 667, 667, 722, 611, 556, 722, 722, 333, 389, 722, 611, 889, 722, 722, // @..O
    556, 722, 667, 556, 611, 722, 722, 944, 722, 722, 611, 333, 278, 333, 469, 500, // P.._
    333, 444, 500, 444, 500, 444, 333, 500, 500, 278, 278, 500, 278, 778, 500, 500, // `..o
    500, 500, 333, 389, 278, 500, 500, 722, 500, 500, 444, 480, 200, 480, 541, // p..~
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_compose() {
        let m = mul(&translate(10.0, 0.0), &[2.0, 0.0, 0.0, 2.0, 5.0, 5.0]);
        assert_eq!(m, [2.0, 0.0, 0.0, 2.0, 25.0, 5.0]);
    }

    #[test]
    fn wrap_keeps_words_and_breaks_long_ones() {
        let text = "word ".repeat(200);
        let lines = wrap(&text);
        assert!(lines.len() > 5);
        let max = (PAGE_WIDTH - 2.0 * MARGIN) * 1000.0 / FONT_SIZE;
        for l in &lines {
            assert!(l.iter().map(|&b| helvetica_width(b)).sum::<f64>() <= max);
            assert!(!l.starts_with(b" ") && !l.ends_with(b" "));
        }
        let long = "x".repeat(500);
        assert_eq!(wrap(&long).concat(), long.as_bytes());
        assert_eq!(wrap("a\n\nb"), vec![b"a".to_vec(), vec![], b"b".to_vec()]);
    }

    #[test]
    fn win_ansi_codes() {
        assert_eq!(win_ansi('A'), b'A');
        assert_eq!(win_ansi('é'), 0xE9);
        assert_eq!(win_ansi('€'), 0x80);
        assert_eq!(win_ansi('—'), 0x97);
        assert_eq!(win_ansi('日'), b'?');
    }

    #[test]
    fn runs_get_spaces_and_breaks_from_positions() {
        let mut e = Emit::default();
        e.run("Hel", 0.0, 700.0, 15.0, 10.0);
        e.run("lo", 15.2, 700.0, 25.0, 10.0);
        e.run("world", 28.0, 700.0, 50.0, 10.0);
        e.run("next", 0.0, 688.0, 20.0, 10.0);
        e.run("para", 0.0, 650.0, 20.0, 10.0);
        assert_eq!(e.finish(), "Hello world\nnext\n\npara");
    }
}
