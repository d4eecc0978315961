//! HTML to title and main text.
//!
//! The body is decoded ([`super::charset`]: BOM, header charset, `<meta>`
//! declaration in the first bytes, else a `chardetng` guess), parsed by
//! html5ever (through `scraper`), which recovers from any malformed markup the
//! way browsers do, and walked iteratively (deeply nested garbage cannot
//! overflow the stack). Scripts, styles, navigation, banners, footers, forms
//! and the like are dropped; when a `<main>`, `<article>` or `role=main`
//! element holds most of the remaining text, only it is kept. Block elements
//! become paragraph or line breaks, inline elements join words, and all other
//! whitespace collapses to single spaces.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use ego_tree::iter::Edge;
use ego_tree::{NodeId, NodeRef};
use html5ever::driver;
use html5ever::tendril::TendrilSink;
use scraper::node::Element;
use scraper::{Html, HtmlTreeSink, Node};

use super::{charset, nesting, ExtractError, Extracted};

/// How many leading bytes are searched for a `<meta>` charset declaration.
const META_SCAN: usize = 4096;

/// At most this many `<main>`/`<article>` candidates are weighed, so a page of
/// thousands of nested articles stays linear.
const MAX_CANDIDATES: usize = 64;

static META_CHARSET: LazyLock<regex::bytes::Regex> = LazyLock::new(|| {
    regex::bytes::Regex::new(r#"(?i-u)<meta\b[^>]*?\bcharset\s*=\s*["']?\s*([a-z0-9_.:\-]+)"#)
        .expect("the meta charset pattern is a valid regex")
});

/// The encoding a `<meta charset>` or `<meta http-equiv=Content-Type>` in the
/// first bytes of `body` declares, if any and if known.
pub fn meta_charset(body: &[u8]) -> Option<&'static encoding_rs::Encoding> {
    let head = &body[..body.len().min(META_SCAN)];
    let caps = META_CHARSET.captures(head)?;
    let label = std::str::from_utf8(caps.get(1)?.as_bytes()).ok()?;
    charset::for_document_label(label)
}

/// Extracts an HTML body whose header charset (if any) is `header_charset` and
/// whose URL or path is `name` (its top-level domain helps charset guessing).
pub fn extract(
    body: &[u8],
    header_charset: Option<&str>,
    name: &str,
) -> Result<Extracted, ExtractError> {
    let tld = charset::tld_of(name);
    let decoded = charset::decode(body, header_charset, meta_charset(body), tld.as_deref());
    let doc = parse(&decoded.text, super::TIME_BUDGET, super::MAX_NODES)?;
    let (title, text) = title_and_text(&doc);
    Ok(Extracted {
        content_type: super::Kind::Html.content_type(),
        title,
        text,
        pages: None,
        section: section_of(doc.tree.root()),
    })
}

/// Title and main text of an already decoded HTML document.
pub fn extract_str(source: &str) -> Result<(String, String), ExtractError> {
    Ok(title_and_text(&parse(
        source,
        super::TIME_BUDGET,
        super::MAX_NODES,
    )?))
}

/// Bytes fed to the parser between two looks at the clock.
const CHUNK: usize = 16 * 1024;
/// Bytes fed between two counts of the nodes made so far.
const COUNT_EVERY: usize = 128 * 1024;

/// Parses `source` as html5ever does, with its nesting capped
/// ([`nesting::cap_depth`]), fed in chunks so that the time and the number
/// of nodes can be checked on the way.
fn parse(source: &str, budget: Duration, max_nodes: usize) -> Result<Html, ExtractError> {
    let started = Instant::now();
    let capped = nesting::cap_depth(source, nesting::MAX_DEPTH);
    let mut parser =
        driver::parse_document(HtmlTreeSink::new(Html::new_document()), Default::default());
    let (mut at, mut counted) = (0, 0);
    while at < capped.len() {
        let mut end = (at + CHUNK).min(capped.len());
        while !capped.is_char_boundary(end) {
            end += 1;
        }
        parser.process(capped[at..end].into());
        at = end;
        if started.elapsed() > budget {
            return Err(ExtractError::OverBudget(format!(
                "parsing the HTML took over {budget:?} at byte {at} of {}",
                capped.len()
            )));
        }
        if at - counted >= COUNT_EVERY {
            counted = at;
            let nodes = parser.tokenizer.sink.sink.0.borrow().tree.nodes().count();
            if nodes > max_nodes {
                return Err(ExtractError::OverBudget(format!(
                    "the HTML made over {max_nodes} nodes by byte {at} of {}",
                    capped.len()
                )));
            }
        }
    }
    Ok(parser.finish())
}

/// The links of an HTML page, for crawling.
#[derive(Debug, Default, PartialEq)]
pub struct Links {
    /// Every `<a href>` and `<area href>`, resolved against the page's URL
    /// (or its `<base href>`), in document order; unparseable ones left out.
    pub hrefs: Vec<url::Url>,
    /// The page asks robots not to follow its links
    /// (`<meta name="robots" content="nofollow">`, or `none`).
    pub nofollow: bool,
}

/// The links of an HTML body whose header charset (if any) is
/// `header_charset`, fetched from `url`.
pub fn links(
    body: &[u8],
    header_charset: Option<&str>,
    url: &url::Url,
) -> Result<Links, ExtractError> {
    let tld = charset::tld_of(url.as_str());
    let decoded = charset::decode(body, header_charset, meta_charset(body), tld.as_deref());
    let doc = parse(&decoded.text, super::TIME_BUDGET, super::MAX_NODES)?;
    let elements: Vec<&Element> = doc
        .tree
        .root()
        .descendants()
        .filter_map(|n| n.value().as_element())
        .collect();
    let base = elements
        .iter()
        .find(|e| e.name() == "base")
        .and_then(|e| e.attr("href"))
        .and_then(|h| url.join(h.trim()).ok())
        .unwrap_or_else(|| url.clone());
    let nofollow = elements.iter().any(|e| {
        e.name() == "meta"
            && e.attr("name")
                .is_some_and(|n| n.eq_ignore_ascii_case("robots"))
            && e.attr("content").is_some_and(|c| {
                c.split(',')
                    .map(str::trim)
                    .any(|d| d.eq_ignore_ascii_case("nofollow") || d.eq_ignore_ascii_case("none"))
            })
    });
    let hrefs = elements
        .iter()
        .filter(|e| matches!(e.name(), "a" | "area"))
        .filter_map(|e| e.attr("href"))
        .filter_map(|h| base.join(h.trim()).ok())
        .collect();
    Ok(Links { hrefs, nofollow })
}

/// The page's `<meta property="article:section">` (Open Graph's article
/// section; `name=` is accepted too), when it has one.
fn section_of(root: NodeRef<'_, Node>) -> Option<String> {
    root.descendants()
        .filter_map(|node| node.value().as_element())
        .filter(|e| e.name() == "meta")
        .filter(|e| {
            e.attr("property")
                .or_else(|| e.attr("name"))
                .is_some_and(|k| k.eq_ignore_ascii_case("article:section"))
        })
        .find_map(|e| e.attr("content").and_then(super::section_value))
}

fn title_and_text(doc: &Html) -> (String, String) {
    let root = doc.tree.root();
    let title = title_of(root);

    let mut candidates = Vec::new();
    let mut all = TextOut::default();
    walk(root, &mut all, 0, Some(&mut candidates));
    let total = all.visible;
    let best = candidates
        .into_iter()
        .filter_map(|id| doc.tree.get(id))
        .map(|node| {
            let mut out = TextOut::default();
            walk(node, &mut out, 1, None);
            out
        })
        .max_by_key(|out| out.visible);
    let text = match best {
        Some(best) if total > 0 && best.visible * 2 >= total => best.out,
        _ => all.out,
    };
    (title, text)
}

/// `<title>`, else `og:title`, else the first `<h1>`.
fn title_of(root: NodeRef<'_, Node>) -> String {
    let mut og = None;
    let mut h1 = None;
    for node in root.descendants() {
        let Some(e) = node.value().as_element() else {
            continue;
        };
        match e.name() {
            "title" => {
                let t = collapse(&own_text(node));
                if !t.is_empty() {
                    return t;
                }
            }
            "meta" if og.is_none() => {
                let key = e.attr("property").or_else(|| e.attr("name"));
                if key.is_some_and(|k| k.eq_ignore_ascii_case("og:title")) {
                    og = e.attr("content").map(collapse).filter(|t| !t.is_empty());
                }
            }
            "h1" if h1.is_none() => {
                let mut out = TextOut::default();
                walk(node, &mut out, 1, None);
                h1 = Some(collapse(&out.out)).filter(|t| !t.is_empty());
            }
            _ => {}
        }
    }
    og.or(h1).unwrap_or_default()
}

/// All text under `node`, markup ignored.
fn own_text(node: NodeRef<'_, Node>) -> String {
    node.descendants()
        .filter_map(|n| n.value().as_text().map(|t| t.to_string()))
        .collect()
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Text with breaks and spaces decided lazily, so that none leads, trails or
/// doubles up.
#[derive(Default)]
struct TextOut {
    out: String,
    /// Non-whitespace characters written, to weigh candidates.
    visible: usize,
    pending_space: bool,
    /// 0 none, 1 line break, 2 paragraph break.
    pending_break: u8,
}

impl TextOut {
    fn text(&mut self, s: &str, pre: bool) {
        for c in s.chars() {
            if pre && c == '\n' {
                self.brk(1);
            } else if c.is_whitespace() {
                self.pending_space = true;
            } else if c.is_control() || matches!(c, '\u{AD}' | '\u{200B}' | '\u{FEFF}') {
                // Soft hyphens, zero-width spaces and stray controls are invisible.
            } else {
                if !self.out.is_empty() {
                    match self.pending_break {
                        2 => self.out.push_str("\n\n"),
                        1 => self.out.push('\n'),
                        _ if self.pending_space => self.out.push(' '),
                        _ => {}
                    }
                }
                self.pending_break = 0;
                self.pending_space = false;
                self.out.push(c);
                self.visible += 1;
            }
        }
    }

    fn brk(&mut self, level: u8) {
        self.pending_break = self.pending_break.max(level);
    }
}

/// What an element does to the text flow around it.
#[derive(Clone, Copy, PartialEq)]
enum Flow {
    Inline,
    Word,
    Line,
    Paragraph,
}

fn flow(name: &str) -> Flow {
    match name {
        "p" | "div" | "section" | "article" | "main" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6"
        | "ul" | "ol" | "dl" | "table" | "blockquote" | "pre" | "figure" | "address" | "hr"
        | "body" | "html" | "center" | "details" | "fieldset" | "hgroup" | "menu" | "dir"
        | "header" | "footer" | "form" | "legend" => Flow::Paragraph,
        "br" | "li" | "dt" | "dd" | "tr" | "caption" | "figcaption" | "summary" | "option"
        | "textarea" => Flow::Line,
        "td" | "th" | "img" | "input" => Flow::Word,
        _ => Flow::Inline,
    }
}

/// Elements that start a sectioning context: a `<header>` or `<footer>` inside
/// one belongs to that section (an article's byline), not to the page chrome.
fn is_sectioning(e: &Element) -> bool {
    matches!(e.name(), "article" | "main" | "section") || e.attr("role") == Some("main")
}

fn is_candidate(e: &Element) -> bool {
    matches!(e.name(), "article" | "main") || e.attr("role") == Some("main")
}

/// Page chrome and non-text elements whose whole subtree is dropped.
fn is_boilerplate(node: NodeRef<'_, Node>, e: &Element, section_depth: usize) -> bool {
    let drop_by_name = match e.name() {
        "script" | "style" | "noscript" | "template" | "svg" | "math" | "iframe" | "nav"
        | "aside" | "head" | "title" | "object" | "embed" | "canvas" | "audio" | "video"
        | "select" | "button" | "datalist" | "dialog" => true,
        "header" | "footer" => section_depth == 0,
        // ASP.NET-style pages wrap the whole body in one <form>; that one stays.
        "form" => !node.descendants().any(|d| {
            d.value()
                .as_element()
                .is_some_and(|de| matches!(de.name(), "main" | "article" | "h1"))
        }),
        _ => false,
    };
    if drop_by_name {
        return true;
    }
    if let Some(role) = e.attr("role") {
        let role = role.trim().to_ascii_lowercase();
        if matches!(
            role.as_str(),
            "navigation"
                | "banner"
                | "contentinfo"
                | "complementary"
                | "search"
                | "menu"
                | "menubar"
                | "dialog"
                | "alertdialog"
        ) {
            return true;
        }
    }
    if e.attr("hidden").is_some() || e.attr("aria-hidden") == Some("true") {
        return true;
    }
    e.attr("style").is_some_and(|s| {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        s.to_ascii_lowercase().contains("display:none")
    })
}

/// Appends the text under `root` to `out`, skipping boilerplate, and records
/// main-content candidates when asked.
fn walk(
    root: NodeRef<'_, Node>,
    out: &mut TextOut,
    mut section_depth: usize,
    mut candidates: Option<&mut Vec<NodeId>>,
) {
    let mut skip = 0usize;
    let mut pre = 0usize;
    for edge in root.traverse() {
        match edge {
            Edge::Open(node) => match node.value() {
                Node::Text(t) if skip == 0 => out.text(t, pre > 0),
                Node::Element(_) if skip > 0 => skip += 1,
                Node::Element(e) => {
                    if is_boilerplate(node, e, section_depth) {
                        skip = 1;
                        continue;
                    }
                    if is_sectioning(e) {
                        section_depth += 1;
                    }
                    if is_candidate(e) {
                        if let Some(c) = candidates.as_deref_mut() {
                            if c.len() < MAX_CANDIDATES {
                                c.push(node.id());
                            }
                        }
                    }
                    if e.name() == "pre" {
                        pre += 1;
                    }
                    match flow(e.name()) {
                        Flow::Paragraph => out.brk(2),
                        Flow::Line => out.brk(1),
                        Flow::Word => out.pending_space = true,
                        Flow::Inline => {}
                    }
                }
                _ => {}
            },
            Edge::Close(node) => {
                let Some(e) = node.value().as_element() else {
                    continue;
                };
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                if is_sectioning(e) {
                    section_depth = section_depth.saturating_sub(1);
                }
                if e.name() == "pre" {
                    pre = pre.saturating_sub(1);
                }
                match flow(e.name()) {
                    Flow::Paragraph => out.brk(2),
                    Flow::Line if e.name() != "br" => out.brk(1),
                    Flow::Word => out.pending_space = true,
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_against_the_base_and_see_nofollow() -> anyhow::Result<()> {
        let page = url::Url::parse("http://council.example/minutes/index.html")?;
        let l = links(
            br#"<html><head><base href="/archive/2024/"></head><body>
            <a href="jan.html">Jan</a> <a href=" /top.html ">Top</a>
            <map><area href="https://other.example/x"></map>
            <a>no href</a> <a href="http://[bad">bad</a></body></html>"#,
            None,
            &page,
        )?;
        let hrefs: Vec<&str> = l.hrefs.iter().map(url::Url::as_str).collect();
        assert_eq!(
            hrefs,
            [
                "http://council.example/archive/2024/jan.html",
                "http://council.example/top.html",
                "https://other.example/x"
            ]
        );
        assert!(!l.nofollow);
        let l = links(
            br#"<meta name="ROBOTS" content="noindex, NoFollow"><a href="a.html">a</a>"#,
            None,
            &page,
        )?;
        assert!(l.nofollow && l.hrefs.len() == 1);
        Ok(())
    }

    fn ex(html: &str) -> (String, String) {
        extract_str(html).expect("within the budget")
    }

    fn text(html: &str) -> String {
        ex(html).1
    }

    #[test]
    fn blocks_break_inline_joins() {
        assert_eq!(
            text("<div>One</div><div>Two <b>th</b>ree<br>four</div><ul><li>a</li><li>b</li></ul>"),
            "One\n\nTwo three\nfour\n\na\nb"
        );
        assert_eq!(
            text("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>"),
            "a b\nc"
        );
        assert_eq!(text("<pre>x  y\nz</pre>"), "x y\nz");
    }

    #[test]
    fn header_inside_article_is_kept() {
        let html = "<header>Site</header><article><header><h1>Head</h1></header><p>Body text here.</p></article><footer>c</footer>";
        assert_eq!(text(html), "Head\n\nBody text here.");
    }

    #[test]
    fn main_wins_only_with_most_text() {
        let html = "<p>Long intro paragraph outside of the main element, long long long.</p><main>short</main>";
        assert!(text(html).starts_with("Long intro"));
        let html = "<p>Intro.</p><main><p>The main element holds most of the text here.</p></main>";
        assert_eq!(text(html), "The main element holds most of the text here.");
    }

    #[test]
    fn form_wrapping_the_page_stays() {
        let html = "<form><h1>T</h1><p>Body</p></form><form><input> Search</form>";
        assert_eq!(text(html), "T\n\nBody");
    }

    #[test]
    fn titles() {
        assert_eq!(ex("<title> A \n B </title><h1>H</h1>").0, "A B");
        assert_eq!(
            ex("<meta property='og:title' content='OG'><h1>H</h1>").0,
            "OG"
        );
        assert_eq!(ex("<h1>H <i>1</i></h1>").0, "H 1");
        assert_eq!(ex("<p>none</p>").0, "");
    }

    #[test]
    fn section_from_article_section_meta() {
        let section = |html: &str| {
            extract(html.as_bytes(), None, "x.html")
                .map(|x| x.section)
                .ok()
                .flatten()
        };
        assert_eq!(
            section("<meta property='article:section' content=' libs \n devel '><p>x</p>"),
            Some("libs devel".into())
        );
        assert_eq!(
            section("<meta name='ARTICLE:SECTION' content='games'><p>x</p>"),
            Some("games".into())
        );
        assert_eq!(
            section("<meta property='article:section' content=' '><p>x</p>"),
            None
        );
        assert_eq!(
            section("<meta name='description' content='d'><p>x</p>"),
            None
        );
        let long = format!(
            "<meta property='article:section' content='{}'>",
            "a".repeat(500)
        );
        assert_eq!(
            section(&long).map(|s| s.chars().count()),
            Some(super::super::MAX_SECTION_CHARS)
        );
    }

    #[test]
    fn meta_charset_forms() {
        assert_eq!(
            meta_charset(b"<meta charset=\"Shift_JIS\">"),
            Some(encoding_rs::SHIFT_JIS)
        );
        assert_eq!(
            meta_charset(
                b"<META HTTP-EQUIV=\"Content-Type\" CONTENT=\"text/html; charset=euc-jp\">"
            ),
            Some(encoding_rs::EUC_JP)
        );
        assert_eq!(
            meta_charset(b"<meta charset=utf-16>"),
            Some(encoding_rs::UTF_8)
        );
        assert_eq!(meta_charset(b"<p>charset=koi8-r</p>"), None);
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let html = "<div>".repeat(50_000) + "deep" + &"</div>".repeat(50_000);
        assert_eq!(text(&html), "deep");
    }
}
