//! The review UI's HTML. Documents are untrusted web content: every value
//! goes through maud's escaping (never `PreEscaped`), and a document's URL
//! becomes a link only when it is `http` or `https`.

use std::time::{Duration, UNIX_EPOCH};

use maud::{html, Markup, DOCTYPE};

use super::auth::Session;
use super::charts;
use super::queue::{Doc, Filters, Order};
use super::stats::Stats;

/// Which page the navigation bar marks as current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// The queue and documents.
    Queue,
    /// Statistics.
    Stats,
    /// The identity queue and profiles.
    Identities,
    /// Neither.
    None,
}

/// A whole page: head, navigation bar (when logged in) and `body`.
pub fn layout(title: &str, session: Option<&Session>, nav: Nav, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · sift review" }
                link rel="stylesheet" href=(super::assets::CSS_PATH);
                script src=(super::assets::JS_PATH) defer {}
            }
            body {
                @if let Some(s) = session {
                    nav #nav {
                        a #nav-queue href="/queue" aria-current=[(nav == Nav::Queue).then_some("page")] { "Queue" }
                        a #nav-identities href="/identities" aria-current=[(nav == Nav::Identities).then_some("page")] { "Identities" }
                        a #nav-stats href="/stats" aria-current=[(nav == Nav::Stats).then_some("page")] { "Stats" }
                        span .who { (s.user) " (" (s.role.as_str()) ")" }
                        form #logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// `GET /login`, and the answers to a failed login.
pub fn login(csrf: &str, next: &str, user: &str, error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        Nav::None,
        html! {
            h1 { "sift review" }
            @if let Some(e) = error {
                p #error role="alert" { (e) }
            }
            form #login method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(next);
                label { "User name " input name="username" autocomplete="username" required value=(user) autofocus; }
                label { "Password " input name="password" type="password" autocomplete="current-password" required; }
                button type="submit" { "Log in" }
            }
        },
    )
}

/// A page that only says what went wrong.
pub fn error(session: Option<&Session>, title: &str, message: &str) -> Markup {
    layout(
        title,
        session,
        Nav::None,
        html! {
            h1 { (title) }
            p #error role="alert" { (message) }
            p { a href="/queue" { "Back to the queue" } }
        },
    )
}

/// The 409 page of a document another reviewer holds.
pub fn leased(session: &Session, id: &str, holder: &str, filters: &Filters) -> Markup {
    layout(
        "Document in review",
        Some(session),
        Nav::Queue,
        html! {
            h1 { "Document in review" }
            p #leased role="alert" {
                "Document " code { (id) } " is being reviewed by " strong { (holder) }
                ". It comes back to the queue when they decide, skip it, or their lease expires."
            }
            p { a #next href=(filters.url("/next")) { "Next document" } " · " a href=(filters.url("/queue")) { "Queue" } }
        },
    )
}

fn filter_form(
    filters: &Filters,
    sources: &[std::sync::Arc<str>],
    labels: &[std::sync::Arc<str>],
) -> Markup {
    html! {
        form #filters method="get" action="/queue" {
            label { "Source "
                select name="source" {
                    option value="" { "any" }
                    @for s in sources {
                        option value=(s) selected[filters.source.as_deref() == Some(&**s)] { (s) }
                    }
                }
            }
            label { "Category "
                select name="category" {
                    option value="" { "any" }
                    @for l in labels {
                        option value=(l) selected[filters.category.as_deref() == Some(&**l)] { (l) }
                    }
                }
            }
            label { "Order "
                select name="order" {
                    @for o in Order::ALL {
                        option value=(o.as_str()) selected[filters.order == o] {
                            (match o {
                                Order::Uncertainty => "least certain first",
                                Order::Margin => "smallest margin first",
                                Order::Newest => "newest first",
                            })
                        }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
    }
}

/// What the queue page shows.
pub struct QueueView<'a> {
    /// The filters in force.
    pub filters: &'a Filters,
    /// Documents waiting that match them.
    pub count: usize,
    /// The first of them.
    pub docs: &'a [Doc],
    /// Every source, for the filter.
    pub sources: &'a [std::sync::Arc<str>],
    /// Every label, for the filter.
    pub labels: &'a [std::sync::Arc<str>],
    /// `/next` found nothing left.
    pub exhausted: bool,
}

/// `GET /queue`.
pub fn queue(session: &Session, v: &QueueView<'_>) -> Markup {
    layout(
        "Queue",
        Some(session),
        Nav::Queue,
        html! {
            h1 { "Queue" }
            (filter_form(v.filters, v.sources, v.labels))
            p {
                span #count { (v.count) } " documents waiting"
                @if v.count > v.docs.len() { " (the first " (v.docs.len()) " shown)" }
                " · " a #start href=(v.filters.url("/next")) { "Start reviewing" }
            }
            @if v.count == 0 || v.exhausted {
                p #empty {
                    @if v.count == 0 { "Nothing to review with these filters." }
                    @else { "Every waiting document is being reviewed by someone else or was skipped by you." }
                }
            }
            @if !v.docs.is_empty() {
                table #queue {
                    thead { tr { th { "Title" } th { "Source" } th { "Top label" } th .num { "Score" } } }
                    tbody {
                        @for d in v.docs {
                            tr .doc data-id=(d.id) {
                                td {
                                    a .open href=(v.filters.url(&doc_path(&d.id))) {
                                        @if d.title.trim().is_empty() { "(untitled) " code { (d.id) } } @else { (d.title) }
                                    }
                                }
                                td .source { (d.source) }
                                td .label { (d.top5.first().map(|(l, _)| &**l).unwrap_or("")) }
                                td .num { (format!("{:.3}", d.top1())) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// The path of a document's page (the id percent-encoded).
pub fn doc_path(id: &str) -> String {
    format!("/doc/{}", encode_segment(id))
}

/// Percent-encodes a path segment.
pub fn encode_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// A stored decision shown on a document's page.
pub struct ShownReview {
    /// `accept`, `choose` or `reject`.
    pub decision: String,
    /// The label, if any.
    pub label: String,
    /// Who.
    pub reviewer: String,
}

/// What the document page shows, read from one row.
pub struct DocView {
    /// Row key.
    pub id: String,
    /// Title.
    pub title: String,
    /// Source tag.
    pub source: String,
    /// Original URL.
    pub url: String,
    /// `content_type`.
    pub content_type: String,
    /// When fetched, ms since the epoch.
    pub fetched_at_ms: Option<i64>,
    /// The text, if stored in the row.
    pub text: Option<String>,
    /// Model of the top 5.
    pub model_version: String,
    /// Labels and scores, best first.
    pub top5: Vec<(String, f32)>,
    /// Per label of `top5`, the words that weighed most for it (may be
    /// shorter than `top5`, or empty, for rows scored before it was kept).
    pub why: Vec<Vec<String>>,
    /// A decision already stored.
    pub review: Option<ShownReview>,
}

/// A time as `2026-11-26 04:15:00 UTC`.
pub fn time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
        .replace('Z', " UTC")
}

/// The URL as a link target, if it is a web address.
fn safe_href(url: &str) -> Option<&str> {
    let lower = url
        .trim_start()
        .get(..8)
        .unwrap_or(url)
        .to_ascii_lowercase();
    (lower.starts_with("http://") || lower.starts_with("https://")).then_some(url)
}

fn hidden_filters(filters: &Filters) -> Markup {
    html! {
        @if let Some(s) = &filters.source { input type="hidden" name="source" value=(s); }
        @if let Some(c) = &filters.category { input type="hidden" name="category" value=(c); }
        input type="hidden" name="order" value=(filters.order.as_str());
    }
}

/// `GET /doc/{id}`.
pub fn doc(session: &Session, d: &DocView, filters: &Filters) -> Markup {
    let decide = format!("{}/decide", doc_path(&d.id));
    let skip = format!("{}/skip", doc_path(&d.id));
    let is_pdf = d.content_type.contains("pdf");
    let title = if d.title.trim().is_empty() {
        "(untitled)"
    } else {
        d.title.as_str()
    };
    layout(
        title,
        Some(session),
        Nav::Queue,
        html! {
            article #doc data-id=(d.id) {
                h1 #title { (title) }
                dl .meta {
                    dt { "Source" } dd #source { (d.source) }
                    dt { "URL" } dd {
                        @match safe_href(&d.url) {
                            Some(href) => a #url href=(href) rel="noopener noreferrer nofollow" target="_blank" { (d.url) },
                            None => span #url { (d.url) },
                        }
                    }
                    dt { "Fetched" } dd #fetched-at { (d.fetched_at_ms.map(time).unwrap_or_default()) }
                    dt { "Model" } dd #model-version { (d.model_version) }
                }
                @if let Some(r) = &d.review {
                    p #decided { "Already decided: " (r.decision) @if !r.label.is_empty() { " " strong { (r.label) } } " by " (r.reviewer) ". A new decision replaces it." }
                }
                section #decide {
                    ol #top5 {
                        @for (i, (label, score)) in d.top5.iter().enumerate() {
                            @let category = crate::categories::get(label);
                            li .label data-label=(label) data-rank=(i + 1) {
                                form .accept method="post" action=(decide) data-key=(i + 1) {
                                    input type="hidden" name="csrf" value=(session.csrf);
                                    input type="hidden" name="decision" value="accept";
                                    input type="hidden" name="label" value=(label);
                                    (hidden_filters(filters))
                                    button type="submit" title=(format!("Accept (key {})", i + 1)) {
                                        kbd { (i + 1) } " "
                                        @if let Some(c) = category {
                                            span .cat-name title=(c.facet_name) { (c.name) } " "
                                        }
                                        span .name { (label) }
                                    }
                                }
                                span .score { (format!("{score:.3}")) }
                                span .track { span .bar style=(format!("width: {:.1}%", (score.clamp(0.0, 1.0) * 100.0))) {} }
                                @if let Some(c) = category.filter(|c| !c.description.is_empty()) {
                                    p .description {
                                        @if !c.facet_name.is_empty() { span .facet { (c.facet_name) } ": " }
                                        (c.description)
                                    }
                                }
                                @if let Some(words) = d.why.get(i).filter(|w| !w.is_empty()) {
                                    p .why {
                                        "Weighed most: "
                                        @for w in words { mark class=(format!("why why-{}", i + 1)) { (w) } " " }
                                    }
                                }
                            }
                        }
                    }
                    div .actions {
                        form #reject method="post" action=(decide) {
                            input type="hidden" name="csrf" value=(session.csrf);
                            input type="hidden" name="decision" value="reject";
                            (hidden_filters(filters))
                            button type="submit" title="None of the 5 (key r)" { kbd { "r" } " Reject all 5" }
                        }
                        form #skip method="post" action=(skip) {
                            input type="hidden" name="csrf" value=(session.csrf);
                            (hidden_filters(filters))
                            button type="submit" title="Decide later (key n)" { kbd { "n" } " Skip" }
                        }
                        form #choose method="post" action=(decide) {
                            input type="hidden" name="csrf" value=(session.csrf);
                            input type="hidden" name="decision" value="choose";
                            (hidden_filters(filters))
                            label { kbd { "/" } " Another label "
                                input #label-search type="search" name="label" list="labels" autocomplete="off" required placeholder="search labels";
                            }
                            datalist #labels {}
                            button type="submit" { "Choose" }
                        }
                    }
                }
                section #body {
                    @match (&d.text, is_pdf) {
                        (Some(text), false) => pre #text { (highlighted(text, &d.why)) },
                        (Some(text), true) => {
                            p { "Extracted from a PDF; " @if let Some(href) = safe_href(&d.url) { a href=(href) rel="noopener noreferrer nofollow" target="_blank" { "open the original" } } @else { "the original is at the URL above" } "." }
                            pre #text { (highlighted(text, &d.why)) }
                        },
                        (None, _) => div #text {
                            "The text is not stored in the table. "
                            @if let Some(href) = safe_href(&d.url) { a href=(href) rel="noopener noreferrer nofollow" target="_blank" { "Open the original" } }
                        },
                    }
                }
            }
        },
    )
}

/// `text` with every word that weighed for one of the top 5 marked with
/// that label's rank (the first label that lists it); a word pair marks
/// both its words. Everything else is escaped text.
fn highlighted(text: &str, why: &[Vec<String>]) -> Markup {
    let mut rank_of: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, grams) in why.iter().enumerate() {
        for gram in grams {
            for word in gram.split(' ') {
                rank_of.entry(word.to_lowercase()).or_insert(i + 1);
            }
        }
    }
    if rank_of.is_empty() {
        return html! { (text) };
    }
    // Alternating runs: non-word text, then a word (alphanumeric run).
    let mut pieces: Vec<(&str, Option<usize>)> = Vec::new();
    let mut start = 0;
    let mut in_word = false;
    for (at, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
    {
        let is_word = at < text.len() && c.is_alphanumeric();
        if is_word != in_word {
            let piece = &text[start..at];
            if !piece.is_empty() {
                let rank = if in_word {
                    rank_of.get(&piece.to_lowercase()).copied()
                } else {
                    None
                };
                pieces.push((piece, rank));
            }
            start = at;
            in_word = is_word;
        }
    }
    if start < text.len() {
        pieces.push((&text[start..], None));
    }
    html! {
        @for (piece, rank) in pieces {
            @match rank {
                Some(r) => mark class=(format!("why why-{r}")) { (piece) },
                None => (piece),
            }
        }
    }
}

/// `GET /stats`.
pub fn stats(session: &Session, s: &Stats) -> Markup {
    let pct = |n: u64, d: u64| {
        if d == 0 {
            "–".to_string()
        } else {
            format!("{:.1}%", 100.0 * n as f64 / d as f64)
        }
    };
    layout(
        "Statistics",
        Some(session),
        Nav::Stats,
        html! {
            h1 { "Statistics" }
            p { (s.reviewed) " documents reviewed, " (s.waiting) " waiting." }
            h2 { "Reviews per day (UTC)" }
            (charts::bars("chart-per-day", "Reviews per day", &s.per_day.iter().rev().map(|(d, n)| (d.clone(), *n as f64)).collect::<Vec<_>>()))
            table #per-day {
                thead { tr { th { "Date" } th .num { "Reviews" } } }
                tbody { @for (day, n) in &s.per_day { tr { td { (day) } td .num { (n) } } } }
            }
            h2 { "Reviews per reviewer" }
            table #per-reviewer {
                thead { tr { th { "Reviewer" } th .num { "Reviews" } } }
                tbody { @for (who, n) in &s.per_reviewer { tr { td { (who) } td .num { (n) } } } }
            }
            h2 { "Model accuracy on reviewed documents" }
            p .note { "The right label is the accepted or chosen one; a rejection means it was not in the top 5. Top 1 counts only documents still scored by the model that was reviewed." }
            table #accuracy {
                thead { tr { th { "Model version" } th .num { "Reviewed" } th .num { "Right label was top 1" } th .num { "In top 5" } } }
                tbody {
                    @for a in &s.accuracy {
                        tr {
                            td { (a.model_version) }
                            td .num { (a.reviewed) }
                            td .num { (pct(a.top1, a.top1_known)) }
                            td .num { (pct(a.in_top5, a.reviewed)) }
                        }
                    }
                }
            }
            h2 { "Accuracy per model version over time" }
            p .note { "Share of each day's decisions on a version's top 5 that accepted one of the 5." }
            (accuracy_chart(s))
            h2 { "Champion and shadow on the analysts' decisions" }
            @if s.shadow.is_empty() {
                p .note #shadow-none { "No reviewed document has shadow scores yet. Set infer.shadow_model to score every document with a second model as well." }
            } @else {
                p .note { "Decisions that name the right label (accepted or chosen), on documents whose reviewed top 5 is the champion's. Analysts saw the champion's 5, which favours its top 5; top 1 is the fair comparison." }
                table #shadow {
                    thead { tr { th { "Champion" } th { "Shadow" } th .num { "Decisions" } th .num { "Champion top 1" } th .num { "Shadow top 1" } th .num { "Champion top 5" } th .num { "Shadow top 5" } } }
                    tbody {
                        @for e in &s.shadow {
                            tr {
                                td { (e.champion) } td { (e.shadow) } td .num { (e.reviewed) }
                                td .num { (pct(e.champion_top1, e.reviewed)) } td .num { (pct(e.shadow_top1, e.reviewed)) }
                                td .num { (pct(e.champion_top5, e.reviewed)) } td .num { (pct(e.shadow_top5, e.reviewed)) }
                            }
                        }
                    }
                }
                @for (k, e) in s.shadow.iter().enumerate() {
                    h3 { "Top 1 per category: " (e.champion) " against " (e.shadow) }
                    (shadow_chart(k, e))
                }
            }
            h2 { "Most rejected categories" }
            (charts::hbars("chart-rejected", "Most rejected categories", &s.rejected.iter().map(|(l, n)| (l.clone(), *n as f64)).collect::<Vec<_>>()))
            table #rejected {
                thead { tr { th { "Category" } th .num { "Rejected" } } }
                tbody { @for (label, n) in &s.rejected { tr { td { (label) } td .num { (n) } } } }
            }
        },
    )
}

/// One line per model version: the share of its reviewed documents that
/// accepted one of its 5, by day.
fn accuracy_chart(s: &Stats) -> Markup {
    let mut days: Vec<String> = s
        .accuracy_by_day
        .iter()
        .flat_map(|(_, d)| d.iter().map(|a| a.day.clone()))
        .collect();
    days.sort();
    days.dedup();
    let series: Vec<charts::Series> = s
        .accuracy_by_day
        .iter()
        .map(|(version, by_day)| charts::Series {
            name: version.clone(),
            points: by_day
                .iter()
                .filter_map(|a| {
                    let i = days.binary_search(&a.day).ok()?;
                    Some((i, a.accepted as f64 / a.reviewed.max(1) as f64))
                })
                .collect(),
        })
        .collect();
    charts::lines(
        "chart-accuracy",
        "Accuracy per model version",
        &days,
        &series,
    )
}

/// Per category (the most decided 20): champion and shadow top-1 shares.
fn shadow_chart(k: usize, e: &crate::documents::LiveEvidence) -> Markup {
    let mut labels: Vec<(&String, &(u64, u64, u64))> = e.per_label.iter().collect();
    labels.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(b.0)));
    labels.truncate(20);
    let names: Vec<String> = labels
        .iter()
        .map(|(l, (n, _, _))| format!("{l} ({n})"))
        .collect();
    let share = |x: u64, n: u64| x as f64 / n.max(1) as f64;
    let series = vec![
        charts::Series {
            name: format!("champion {}", e.champion),
            points: labels
                .iter()
                .enumerate()
                .map(|(i, (_, (n, c, _)))| (i, share(*c, *n)))
                .collect(),
        },
        charts::Series {
            name: format!("shadow {}", e.shadow),
            points: labels
                .iter()
                .enumerate()
                .map(|(i, (_, (n, _, sh)))| (i, share(*sh, *n)))
                .collect(),
        },
    ];
    charts::grouped(
        &format!("chart-shadow-{k}"),
        "Top 1 per category",
        &names,
        &series,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::review::auth::Role;

    #[test]
    fn document_text_and_metadata_are_escaped() {
        let s = Session {
            id: "s".into(),
            user: "ann".into(),
            role: Role::Reviewer,
            csrf: "t".into(),
        };
        let d = DocView {
            id: "x\"><script>".into(),
            title: "<script>alert(1)</script>".into(),
            source: "<b>src</b>".into(),
            url: "javascript:alert(1)".into(),
            content_type: "text/html".into(),
            fetched_at_ms: Some(0),
            text: Some("<img src=x onerror=alert(1)>".into()),
            model_version: "v".into(),
            top5: vec![("a\"b<".into(), 0.5)],
            why: vec![vec!["img".into(), "<b>".into()]],
            review: None,
        };
        let page = doc(&s, &d, &Filters::default()).into_string();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<img src=x"), "{page}");
        assert!(!page.contains("<b>src"), "{page}");
        assert!(!page.contains("href=\"javascript:"), "{page}");
        // The text stays escaped around the highlighted word, and the
        // words shown for a label are escaped too.
        assert!(
            page.contains("&lt;<mark class=\"why why-1\">img</mark> src=x onerror=alert(1)&gt;"),
            "{page}"
        );
        assert!(
            page.contains("<mark class=\"why why-1\">&lt;b&gt;</mark>"),
            "{page}"
        );
        assert!(page.contains("data-label=\"a&quot;b&lt;\""), "{page}");
        let plain = DocView {
            why: Vec::new(),
            ..d
        };
        let page = doc(&s, &plain, &Filters::default()).into_string();
        assert!(
            page.contains("&lt;img src=x onerror=alert(1)&gt;") && !page.contains("<mark"),
            "{page}"
        );
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(doc_path("a b/c"), "/doc/a%20b%2Fc");
    }
}
