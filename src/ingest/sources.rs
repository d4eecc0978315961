//! The sources file (`sources.toml`): every site or folder sift ingests, each
//! with a tag that every document it yields carries.
//!
//! ```toml
//! [defaults]              # optional; any per-source field below except tag/kind/urls/path/prefix
//! poll_interval = "1h"
//!
//! [[source]]
//! tag = "acme-news"       # [a-z0-9._-], unique
//! kind = "rss"            # pages | sitemap | rss | atom | links | dir | prefix
//! urls = ["https://acme.example/feed.xml"]
//! include = ['^https://acme\.example/news/']   # regexes; a URL must match one (if any)
//! exclude = ['\?print=']                       # ... and none of these
//! rate_limit = 1.0        # requests per second to this source's hosts
//! max_bytes = 5_000_000   # largest body fetched
//! min_text_chars = 200    # shorter extracted texts are filtered out
//! content_types = ["text/html", "application/pdf"]   # others are filtered out
//! [source.metadata]       # copied into every document's metadata
//! region = "us"
//!
//! [[source]]              # a site with neither sitemap nor feed: crawl it
//! tag = "council-minutes"
//! kind = "links"
//! urls = ["https://council.example/minutes/"]   # start pages
//! follow = ['/minutes/']  # pages whose links are followed (default: every page of the site)
//! include = ['/minutes/\d{4}-\d{2}-\d{2}\.html$', '\.pdf$']   # which pages are documents
//! max_depth = 3           # links followed this many steps from a start page
//! max_pages = 200         # pages fetched to find links, per visit
//! ```
//!
//! Loading checks everything up front and names the source and field of
//! every problem, so a bad file fails at startup, not an hour into a crawl.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::RegexSet;
use serde::Deserialize;

/// The content types extraction yields, which `content_types` may name.
pub const CONTENT_TYPES: [&str; 4] = [
    "text/html",
    "application/pdf",
    "text/plain",
    "application/json",
];

/// What a source points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A fixed list of page URLs.
    Pages,
    /// Sitemaps (`<urlset>` or `<sitemapindex>`); every `<loc>` is a page.
    Sitemap,
    /// RSS feeds; every item's link is a page.
    Rss,
    /// Atom feeds; every entry's link is a page.
    Atom,
    /// Start pages of a site whose links are followed, within the site.
    Links,
    /// A local directory of files, read recursively.
    Dir,
    /// A key prefix in sift's object store.
    Prefix,
}

impl SourceKind {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Pages => "pages",
            SourceKind::Sitemap => "sitemap",
            SourceKind::Rss => "rss",
            SourceKind::Atom => "atom",
            SourceKind::Links => "links",
            SourceKind::Dir => "dir",
            SourceKind::Prefix => "prefix",
        }
    }

    fn is_web(self) -> bool {
        matches!(
            self,
            SourceKind::Pages
                | SourceKind::Sitemap
                | SourceKind::Rss
                | SourceKind::Atom
                | SourceKind::Links
        )
    }
}

/// Fields a source may set and `[defaults]` may default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
    include: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
    rate_limit: Option<f64>,
    max_bytes: Option<u64>,
    min_text_chars: Option<u32>,
    content_types: Option<Vec<String>>,
    max_urls: Option<u32>,
    follow: Option<Vec<String>>,
    max_depth: Option<u32>,
    max_pages: Option<u32>,
    metadata: Option<BTreeMap<String, toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    tag: String,
    kind: SourceKind,
    #[serde(default)]
    urls: Vec<String>,
    path: Option<PathBuf>,
    prefix: Option<String>,
    #[serde(flatten)]
    settings: Settings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: Settings,
    #[serde(default)]
    source: Vec<RawSource>,
}

/// One source, validated, with defaults applied.
#[derive(Debug, Clone)]
pub struct Source {
    /// Tag attached to every document.
    pub tag: String,
    /// What it points at.
    pub kind: SourceKind,
    /// Page, sitemap or feed URLs (web kinds).
    pub urls: Vec<url::Url>,
    /// Directory (`dir`).
    pub path: Option<PathBuf>,
    /// Object-store key prefix (`prefix`).
    pub prefix: Option<String>,
    /// How often the source is visited again by the daemon.
    pub poll_interval: Duration,
    /// URLs must match one of these, if any are given.
    pub include: Option<RegexSet>,
    /// URLs must match none of these.
    pub exclude: Option<RegexSet>,
    /// Requests per second to this source's hosts; None = the global per-host rate.
    pub rate_limit: Option<f64>,
    /// Largest body fetched; None = `ingest.max_document_bytes`.
    pub max_bytes: Option<u64>,
    /// Extracted texts shorter than this (characters) are filtered out.
    pub min_text_chars: u32,
    /// Content types kept (after extraction: `text/html`, `application/pdf`,
    /// `text/plain`, `application/json`); empty = all.
    pub content_types: Vec<String>,
    /// Most page URLs taken from one sitemap, feed or crawl visit.
    pub max_urls: u32,
    /// `links`: pages whose links are followed must match one of these (if
    /// any are given); `exclude` applies too.
    pub follow: Option<RegexSet>,
    /// `links`: how many links away from a start page a crawl goes.
    pub max_depth: u32,
    /// `links`: most pages fetched to find links, per visit.
    pub max_pages: u32,
    /// Copied into every document's metadata.
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl Source {
    /// Whether a discovered URL passes the include/exclude patterns.
    pub fn wants(&self, url: &str) -> bool {
        self.include.as_ref().is_none_or(|s| s.is_match(url))
            && !self.exclude.as_ref().is_some_and(|s| s.is_match(url))
    }
}

/// A problem in the sources file.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    /// The file could not be read.
    #[error("cannot read the sources file {path}: {source}; create it (see sources.example.toml) or pass --sources")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML, or a field of the wrong type or unknown.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// The parser's message, which gives the line.
        message: String,
    },
    /// A source's field has a bad value.
    #[error("{path}: source `{tag}` (#{index}): field `{field}`: {message}")]
    Field {
        /// File.
        path: PathBuf,
        /// The source's tag (or `?` when it has none).
        tag: String,
        /// 1-based position in the file.
        index: usize,
        /// Field name.
        field: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// Reads and validates a sources file.
pub fn load(path: &Path) -> Result<Vec<Source>, SourcesError> {
    let text = std::fs::read_to_string(path).map_err(|source| SourcesError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates sources-file text; `path` is used in messages and to
/// resolve relative `dir` paths.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Source>, SourcesError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| SourcesError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut tags = HashSet::new();
    let mut out = Vec::with_capacity(raw.source.len());
    for (i, s) in raw.source.into_iter().enumerate() {
        let err = |field: &'static str, message: String| SourcesError::Field {
            path: path.to_path_buf(),
            tag: if s.tag.is_empty() {
                "?".into()
            } else {
                s.tag.clone()
            },
            index: i + 1,
            field,
            message,
        };
        if s.tag.is_empty()
            || s.tag.len() > 64
            || !s
                .tag
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(err(
                "tag",
                "must be 1 to 64 characters of a-z, 0-9, '.', '_' or '-'".into(),
            ));
        }
        if !tags.insert(s.tag.clone()) {
            return Err(err("tag", "another source has the same tag".into()));
        }
        let d = &raw.defaults;
        let st = &s.settings;
        let mut urls = Vec::new();
        if s.kind.is_web() {
            if s.urls.is_empty() {
                return Err(err(
                    "urls",
                    format!("a `{}` source needs at least one URL", s.kind.as_str()),
                ));
            }
            for u in &s.urls {
                let parsed = url::Url::parse(u).map_err(|e| err("urls", format!("`{u}`: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(err(
                        "urls",
                        format!("`{u}`: only http and https URLs are fetched"),
                    ));
                }
                urls.push(parsed);
            }
        } else if !s.urls.is_empty() {
            return Err(err(
                "urls",
                format!("a `{}` source takes no URLs", s.kind.as_str()),
            ));
        }
        let dir = match (s.kind, &s.path) {
            (SourceKind::Dir, Some(p)) => Some(if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }),
            (SourceKind::Dir, None) => {
                return Err(err(
                    "path",
                    "a `dir` source needs the directory to read".into(),
                ))
            }
            (_, Some(_)) => return Err(err("path", "only `dir` sources take a path".into())),
            (_, None) => None,
        };
        let prefix = match (s.kind, &s.prefix) {
            (SourceKind::Prefix, Some(p)) if !p.is_empty() => Some(p.clone()),
            (SourceKind::Prefix, _) => {
                return Err(err(
                    "prefix",
                    "a `prefix` source needs the object-store key prefix to read".into(),
                ))
            }
            (_, Some(_)) => {
                return Err(err("prefix", "only `prefix` sources take a prefix".into()))
            }
            (_, None) => None,
        };
        let poll_interval = st
            .poll_interval
            .or(d.poll_interval)
            .unwrap_or(Duration::from_secs(3600));
        if poll_interval < Duration::from_secs(1) {
            return Err(err("poll_interval", "must be at least 1s".into()));
        }
        let patterns = |field: &'static str, list: &Option<Vec<String>>| match list {
            None => Ok(None),
            Some(l) if l.is_empty() => Ok(None),
            Some(l) => RegexSet::new(l)
                .map(Some)
                .map_err(|e| err(field, format!("not a valid regex: {e}"))),
        };
        let include = patterns(
            "include",
            if st.include.is_some() {
                &st.include
            } else {
                &d.include
            },
        )?;
        let exclude = patterns(
            "exclude",
            if st.exclude.is_some() {
                &st.exclude
            } else {
                &d.exclude
            },
        )?;
        let rate_limit = st.rate_limit.or(d.rate_limit);
        if let Some(r) = rate_limit {
            if !(r.is_finite() && r > 0.0) {
                return Err(err(
                    "rate_limit",
                    format!("{r} is not a positive number of requests per second"),
                ));
            }
        }
        let max_bytes = st.max_bytes.or(d.max_bytes);
        if max_bytes == Some(0) {
            return Err(err("max_bytes", "must be at least 1".into()));
        }
        let content_types = st
            .content_types
            .clone()
            .or_else(|| d.content_types.clone())
            .unwrap_or_default();
        for ct in &content_types {
            if !CONTENT_TYPES.contains(&ct.as_str()) {
                return Err(err(
                    "content_types",
                    format!(
                        "`{ct}` is not one sift extracts; use some of {:?}",
                        CONTENT_TYPES
                    ),
                ));
            }
        }
        let max_urls = st.max_urls.or(d.max_urls).unwrap_or(10_000);
        if max_urls == 0 {
            return Err(err("max_urls", "must be at least 1".into()));
        }
        let crawl_field = |field: &'static str, set: bool| {
            if set && s.kind != SourceKind::Links {
                Err(err(field, "only `links` sources take it".into()))
            } else {
                Ok(())
            }
        };
        crawl_field("follow", st.follow.is_some())?;
        crawl_field("max_depth", st.max_depth.is_some())?;
        crawl_field("max_pages", st.max_pages.is_some())?;
        let follow = patterns(
            "follow",
            if st.follow.is_some() {
                &st.follow
            } else {
                &d.follow
            },
        )?;
        let max_depth = st.max_depth.or(d.max_depth).unwrap_or(3);
        if max_depth > 20 {
            return Err(err("max_depth", format!("{max_depth} is more than 20")));
        }
        let max_pages = st.max_pages.or(d.max_pages).unwrap_or(200);
        if max_pages == 0 {
            return Err(err("max_pages", "must be at least 1".into()));
        }
        let mut metadata = BTreeMap::new();
        for table in [&d.metadata, &st.metadata].into_iter().flatten() {
            for (k, v) in table {
                let v =
                    serde_json::to_value(v).map_err(|e| err("metadata", format!("`{k}`: {e}")))?;
                metadata.insert(k.clone(), v);
            }
        }
        out.push(Source {
            tag: s.tag.clone(),
            kind: s.kind,
            urls,
            path: dir,
            prefix,
            poll_interval,
            include,
            exclude,
            rate_limit,
            max_bytes,
            min_text_chars: st.min_text_chars.or(d.min_text_chars).unwrap_or(0),
            content_types,
            max_urls,
            follow,
            max_depth,
            max_pages,
            metadata,
        });
    }
    if out.is_empty() {
        return Err(SourcesError::Parse {
            path: path.to_path_buf(),
            message: "no [[source]] entries".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Vec<Source>, SourcesError> {
        parse(text, Path::new("/etc/sift/sources.toml"))
    }

    #[test]
    fn defaults_apply_and_sources_override() -> anyhow::Result<()> {
        let s = p(r#"
            [defaults]
            poll_interval = "10m"
            rate_limit = 3.0
            exclude = ['\?print']
            [defaults.metadata]
            region = "us"
            [[source]]
            tag = "a"
            kind = "pages"
            urls = ["https://a.example/x"]
            [[source]]
            tag = "b"
            kind = "dir"
            path = "docs"
            rate_limit = 1.5
            include = ['^file:']
            [source.metadata]
            region = "eu"
            lang = "de"
        "#)?;
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].poll_interval, Duration::from_secs(600));
        assert_eq!(s[0].rate_limit, Some(3.0));
        assert!(!s[0].wants("https://a.example/x?print=1"));
        assert!(s[0].wants("https://a.example/y"));
        assert_eq!(s[0].metadata["region"], "us");
        assert_eq!(s[1].rate_limit, Some(1.5));
        assert_eq!(s[1].path.as_deref(), Some(Path::new("/etc/sift/docs")));
        assert!(!s[1].wants("https://b.example/"));
        assert_eq!(s[1].metadata["region"], "eu");
        assert_eq!(s[1].metadata["lang"], "de");
        Ok(())
    }

    #[test]
    fn the_example_file_is_valid() -> anyhow::Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sources.example.toml");
        let s = load(&path)?;
        let kinds: HashSet<&str> = s.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds.len(), 7, "every kind is shown: {kinds:?}");
        Ok(())
    }

    #[test]
    fn errors_name_the_source_and_field() {
        let cases = [
            (
                r#"[[source]]
                tag = "Bad Tag"
                kind = "pages"
                urls = ["https://x/"]"#,
                "field `tag`",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "pages"
                urls = ["https://x/"]
                [[source]]
                tag = "a"
                kind = "pages"
                urls = ["https://y/"]"#,
                "source `a` (#2): field `tag`: another source",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "rss"
                urls = []"#,
                "source `a` (#1): field `urls`",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "pages"
                urls = ["ftp://x/"]"#,
                "only http and https",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "pages"
                urls = ["https://x/"]
                follow = ["/"]"#,
                "field `follow`: only `links` sources take it",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "links"
                urls = ["https://x/"]
                max_pages = 0"#,
                "field `max_pages`: must be at least 1",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "links"
                urls = []"#,
                "a `links` source needs at least one URL",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "pages"
                urls = ["https://x/"]
                include = ["("]"#,
                "field `include`: not a valid regex",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "dir""#,
                "field `path`",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "pages"
                urls = ["https://x/"]
                rate_limit = -1.0"#,
                "field `rate_limit`",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "pages"
                urls = ["https://x/"]
                content_types = ["image/png"]"#,
                "field `content_types`",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "pages"
                urls = ["https://x/"]
                colour = "red""#,
                "unknown field `colour`",
            ),
            (
                r#"[[source]]
                tag = "a"
                kind = "ftp""#,
                "unknown variant `ftp`",
            ),
            ("", "no [[source]]"),
        ];
        for (text, want) in cases {
            match p(text) {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => assert!(e.to_string().contains(want), "{e} lacks {want}"),
            }
        }
    }
}
