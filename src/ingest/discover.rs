//! Finding the pages of a source: `<loc>`s of sitemaps (and sitemap
//! indexes), links of RSS and Atom items, files of a directory, and the
//! canonical form of a link a crawl follows.

use std::path::{Path, PathBuf};

use quick_xml::events::Event;

/// What a sitemap lists.
#[derive(Debug, Default, PartialEq)]
pub struct Sitemap {
    /// Page URLs (`<urlset><url><loc>`).
    pub pages: Vec<String>,
    /// Child sitemaps (`<sitemapindex><sitemap><loc>`).
    pub sitemaps: Vec<String>,
}

/// Why a sitemap or feed could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// Not well-formed XML, or not a sitemap.
    #[error("not a sitemap: {0}")]
    Sitemap(String),
    /// Not an RSS or Atom feed.
    #[error("not an RSS or Atom feed: {0}")]
    Feed(String),
    /// A directory could not be read.
    #[error("cannot read {path}: {source}")]
    Dir {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Parses a sitemap or sitemap index (gzip-compressed or not).
pub fn sitemap(body: &[u8]) -> Result<Sitemap, DiscoverError> {
    let unzipped;
    let body = if body.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out)
            .map_err(|e| DiscoverError::Sitemap(format!("bad gzip: {e}")))?;
        unzipped = out;
        &unzipped[..]
    } else {
        body
    };
    let mut reader = quick_xml::Reader::from_reader(body);
    let mut buf = Vec::new();
    let mut out = Sitemap::default();
    // Element names from the root down to the current one.
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut loc = String::new();
    let mut root = None;
    loop {
        let event = reader.read_event_into(&mut buf).map_err(|e| {
            DiscoverError::Sitemap(format!("at byte {}: {e}", reader.buffer_position()))
        })?;
        match event {
            Event::Start(e) => {
                let name = e.local_name().as_ref().as_bytes().to_vec();
                if root.is_none() {
                    root = Some(name.clone());
                }
                if name == b"loc" {
                    loc.clear();
                }
                path.push(name);
            }
            Event::End(_) => {
                if path.last().is_some_and(|n| n == b"loc") {
                    let parent = path.len().checked_sub(2).map(|i| path[i].as_slice());
                    let l = loc.trim().to_string();
                    if !l.is_empty() {
                        match parent {
                            Some(b"url") => out.pages.push(l),
                            Some(b"sitemap") => out.sitemaps.push(l),
                            _ => {}
                        }
                    }
                }
                path.pop();
            }
            Event::Text(t) if path.last().is_some_and(|n| n == b"loc") => {
                loc.push_str(&t.xml10_content());
            }
            Event::CData(t) if path.last().is_some_and(|n| n == b"loc") => {
                loc.push_str(&t);
            }
            Event::GeneralRef(r) if path.last().is_some_and(|n| n == b"loc") => {
                if let Ok(Some(c)) = r.resolve_char_ref() {
                    loc.push(c);
                } else {
                    loc.push_str(match r.into_inner().as_ref() {
                        "amp" => "&",
                        "lt" => "<",
                        "gt" => ">",
                        "quot" => "\"",
                        "apos" => "'",
                        _ => "",
                    });
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    match root.as_deref() {
        Some(b"urlset") | Some(b"sitemapindex") => Ok(out),
        Some(other) => Err(DiscoverError::Sitemap(format!(
            "the root element is <{}>, not <urlset> or <sitemapindex>",
            String::from_utf8_lossy(other)
        ))),
        None => Err(DiscoverError::Sitemap("no XML elements".into())),
    }
}

/// An item of a feed.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedItem {
    /// The page it links to.
    pub url: String,
    /// Its title in the feed.
    pub title: Option<String>,
    /// When it was published, as RFC 3339.
    pub published: Option<String>,
    /// Its first category (RSS `<category>`, Atom `<category term>`): the
    /// section the site filed it under.
    pub section: Option<String>,
}

/// Parses an RSS or Atom feed into the pages its items link to.
pub fn feed(body: &[u8]) -> Result<Vec<FeedItem>, DiscoverError> {
    let parsed = feed_rs::parser::parse(body).map_err(|e| DiscoverError::Feed(e.to_string()))?;
    Ok(parsed
        .entries
        .into_iter()
        .filter_map(|e| {
            let link = e
                .links
                .iter()
                .find(|l| l.rel.as_deref().is_none_or(|r| r == "alternate"))
                .or(e.links.first())?;
            Some(FeedItem {
                url: link.href.clone(),
                title: e.title.map(|t| t.content),
                published: e.published.or(e.updated).map(|d| d.to_rfc3339()),
                section: e.categories.iter().find_map(|c| {
                    super::extract::section_value(c.label.as_deref().unwrap_or(&c.term))
                }),
            })
        })
        .collect())
}

/// Every regular file under `dir`, recursively, sorted, skipping hidden ones.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, DiscoverError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| DiscoverError::Dir {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| DiscoverError::Dir {
                path: d.clone(),
                source,
            })?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let kind = entry.file_type().map_err(|source| DiscoverError::Dir {
                path: path.clone(),
                source,
            })?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Query parameters that track visitors or sessions and never change what a
/// page is: dropped from links, so one page is fetched once.
const TRACKING_PARAMS: [&str; 9] = [
    "gclid",
    "fbclid",
    "msclkid",
    "mc_cid",
    "mc_eid",
    "sessionid",
    "jsessionid",
    "phpsessid",
    "sid",
];

/// The canonical form of a link a crawl found, or None when it is not a web
/// page (`mailto:`, `javascript:`, ...): http(s) only, host lower-cased and
/// default port dropped (the `url` crate does both), no fragment, no
/// `;jsessionid=` path parameter, no tracking or session query parameters
/// (`utm_*` and [`TRACKING_PARAMS`]), the rest of the query sorted, and an
/// empty query removed.
pub fn canonical_link(link: &url::Url) -> Option<url::Url> {
    if !matches!(link.scheme(), "http" | "https") || link.host_str().is_none() {
        return None;
    }
    let mut u = link.clone();
    u.set_fragment(None);
    let path = u.path().to_string();
    if let Some(at) = path.to_ascii_lowercase().find(";jsessionid=") {
        u.set_path(&path[..at]);
    }
    let mut pairs: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| {
            let k = k.to_ascii_lowercase();
            !k.starts_with("utm_") && !TRACKING_PARAMS.contains(&k.as_str())
        })
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.is_empty() {
        u.set_query(None);
    } else {
        pairs.sort();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    Some(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sitemaps_and_indexes() -> anyhow::Result<()> {
        let s = sitemap(
            br#"<?xml version="1.0" encoding="UTF-8"?>
<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
  <url><loc>https://a.example/x?p=1&amp;q=2</loc><lastmod>2024-01-01</lastmod></url>
  <url><loc> https://a.example/y </loc></url>
  <url><loc><![CDATA[https://a.example/z]]></loc></url>
</urlset>"#,
        )?;
        assert_eq!(
            s.pages,
            [
                "https://a.example/x?p=1&q=2",
                "https://a.example/y",
                "https://a.example/z"
            ]
        );
        let i = sitemap(
            br#"<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
  <sitemap><loc>https://a.example/s1.xml</loc></sitemap></sitemapindex>"#,
        )?;
        assert_eq!(i.sitemaps, ["https://a.example/s1.xml"]);
        assert!(i.pages.is_empty());
        assert!(sitemap(b"<html><body>no</body></html>").is_err());
        assert!(sitemap(b"plain text, no elements").is_err());
        Ok(())
    }

    #[test]
    fn rss_and_atom() -> anyhow::Result<()> {
        let rss = feed(
            br#"<?xml version="1.0"?><rss version="2.0"><channel><title>c</title>
<item><title>One</title><link>https://a.example/1</link><pubDate>Mon, 01 Jan 2024 00:00:00 GMT</pubDate><category> Science </category><category>Space</category></item>
<item><title>Two</title><link>https://a.example/2</link></item></channel></rss>"#,
        )?;
        assert_eq!(rss.len(), 2);
        assert_eq!(rss[0].url, "https://a.example/1");
        assert_eq!(rss[0].title.as_deref(), Some("One"));
        assert!(rss[0].published.is_some());
        assert_eq!(rss[0].section.as_deref(), Some("Science"));
        assert_eq!(rss[1].section, None);
        let atom = feed(
            br#"<?xml version="1.0" encoding="utf-8"?><feed xmlns="http://www.w3.org/2005/Atom">
<title>t</title><id>urn:x</id><updated>2024-01-01T00:00:00Z</updated>
<entry><title>E</title><id>urn:e</id><updated>2024-01-01T00:00:00Z</updated>
<category term="sports" label="Sport"/>
<link rel="alternate" href="https://b.example/e"/></entry></feed>"#,
        )?;
        assert_eq!(atom.len(), 1);
        assert_eq!(atom[0].url, "https://b.example/e");
        assert_eq!(atom[0].section.as_deref(), Some("Sport"));
        assert!(feed(b"<html></html>").is_err());
        Ok(())
    }

    #[test]
    fn canonical_links() -> anyhow::Result<()> {
        let c = |u: &str| -> anyhow::Result<Option<String>> {
            Ok(canonical_link(&url::Url::parse(u)?).map(|u| u.to_string()))
        };
        assert_eq!(
            c("HTTP://Council.Example:80/minutes/?b=2&utm_source=x&a=1#top")?.as_deref(),
            Some("http://council.example/minutes/?a=1&b=2")
        );
        assert_eq!(
            c("https://a.example/x;jsessionid=ABC123?PHPSESSID=9")?.as_deref(),
            Some("https://a.example/x")
        );
        assert_eq!(
            c("https://a.example/a/../b/./c.pdf?")?.as_deref(),
            Some("https://a.example/b/c.pdf")
        );
        assert_eq!(c("mailto:clerk@council.example")?, None);
        assert_eq!(c("javascript:void(0)")?, None);
        assert_eq!(c("ftp://a.example/f")?, None);
        Ok(())
    }

    proptest::proptest! {
        /// Canonical is a fixed point; fragments, tracking parameters and
        /// the order of the others never make two forms of one page.
        #[test]
        fn canonical_is_stable_under_what_does_not_change_a_page(
            path in "(/[a-z0-9]{1,6}){0,3}/?",
            params in proptest::collection::btree_map("[a-z]{1,4}", "[a-z0-9]{0,3}", 0..4),
            fragment in proptest::option::of("[a-z]{1,5}"),
            tracking in proptest::option::of("[a-z0-9]{1,5}"),
            shuffle in proptest::bool::ANY,
        ) {
            let mut pairs: Vec<(String, String)> = params.into_iter().collect();
            let plain = {
                let mut u = url::Url::parse(&format!("http://A.example{path}")).expect("a valid URL");
                if !pairs.is_empty() {
                    u.query_pairs_mut().extend_pairs(pairs.iter());
                }
                u
            };
            if shuffle {
                pairs.reverse();
            }
            let mut noisy = url::Url::parse(&format!("http://a.EXAMPLE:80{path}")).expect("a valid URL");
            {
                let mut q = noisy.query_pairs_mut();
                if let Some(t) = &tracking {
                    q.append_pair("utm_campaign", t);
                    q.append_pair("gclid", t);
                }
                q.extend_pairs(pairs.iter());
            }
            if noisy.query() == Some("") {
                noisy.set_query(None);
            }
            noisy.set_fragment(fragment.as_deref());
            let a = canonical_link(&plain).expect("an http URL");
            let b = canonical_link(&noisy).expect("an http URL");
            proptest::prop_assert_eq!(&a, &b);
            proptest::prop_assert_eq!(canonical_link(&a), Some(a.clone()));
            proptest::prop_assert!(a.fragment().is_none());
        }
    }
}
