//! `sift review` in-process on loopback, over HTTP, with an embedded data
//! directory seeded with scored documents: the login wall on every route,
//! decisions in the table and on `sift.feedback`, CSRF, leases, escaping of
//! document text, the queue's refresh, and the statistics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context};
use reqwest::redirect::Policy;
use reqwest::StatusCode;
use scraper::{Html, Selector};
use sift::backends::log::Log;
use sift::backends::table::{RowPut, Table};
use sift::config::Config;
use sift::review::auth::{self, Role};
use sift::review::{Backends, Server};

const PASSWORD: &str = "correct horse battery";
const EVIL_TEXT: &str = "Hello <script>alert('x')</script> and <img src=x onerror=alert(1)> bye";
const EVIL_TITLE: &str = "<b onmouseover=alert(2)>Title</b>";

struct Harness {
    _dir: tempfile::TempDir,
    server: Option<Server>,
    table: Arc<dyn Table>,
    log: Arc<dyn Log>,
    base: String,
}

fn label(i: usize) -> String {
    format!("label-{i:02}")
}

/// Document `i`: source `s{i % 3}`, top 5 of labels i..i+4 with a top-1
/// score growing with i (so the uncertainty order is the id order).
fn doc(i: usize) -> RowPut {
    let top5: Vec<serde_json::Value> = (0..5)
        .map(|k| serde_json::json!({"label": label(i + k), "score": 0.1 + i as f64 / 100.0 - k as f64 / 100.0}))
        .collect();
    let (title, text) = if i == 0 {
        (EVIL_TITLE.to_string(), EVIL_TEXT.to_string())
    } else {
        (
            format!("Document {i}"),
            format!("The text of document {i}."),
        )
    };
    RowPut::new(format!("doc-{i:03}"))
        .cell("m", "source", format!("s{}", i % 3))
        .cell("m", "url", format!("https://example.org/{i}"))
        .cell("m", "title", title)
        .cell("m", "text", text)
        .cell("m", "content_type", "text/html")
        .cell("m", "fetched_at_ms", "1700000000000")
        .cell(
            "c",
            "top5",
            serde_json::to_string(&top5).unwrap_or_default(),
        )
        .cell("c", "model_version", "v1")
        .cell(
            "c",
            "scored_at_ms",
            (1_700_000_000_000i64 + i as i64).to_string(),
        )
}

async fn start(docs: usize, refresh: Duration) -> anyhow::Result<Harness> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.review.queue_refresh = refresh;
    let table = sift::backends::open_table(&config).await?;
    let log = sift::backends::open_log(&config).await?;
    let objects = sift::backends::open_objects(&config).await?;
    table
        .ensure_table("documents", &sift::documents::FAMILIES)
        .await?;
    table.put("documents", (0..docs).map(doc).collect()).await?;
    // A row `sift run` stored but nothing scored: never in the queue.
    table
        .put(
            "documents",
            vec![RowPut::new("unscored").cell("m", "title", "not scored")],
        )
        .await?;
    for user in ["ann", "bob"] {
        auth::add_user(table.as_ref(), user, PASSWORD, Role::Reviewer).await?;
    }
    let server = Server::start(
        &config,
        Backends {
            table: table.clone(),
            log: log.clone(),
            objects: Some(objects),
            cache: None,
        },
        "127.0.0.1:0",
    )
    .await?;
    let base = format!("http://{}", server.addr());
    Ok(Harness {
        _dir: dir,
        server: Some(server),
        table,
        log,
        base,
    })
}

impl Harness {
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.server.take() {
            s.shutdown().await?;
        }
        Ok(())
    }

    fn client(&self) -> anyhow::Result<Client> {
        Ok(Client {
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .timeout(Duration::from_secs(20))
                .build()?,
            base: self.base.clone(),
            cookies: HashMap::new(),
        })
    }

    async fn login(&self, user: &str) -> anyhow::Result<Client> {
        let mut c = self.client()?;
        let page = c.get("/login").await?;
        ensure!(page.status == StatusCode::OK, "login page: {}", page.status);
        let csrf = page.attr("form#login input[name=csrf]", "value")?;
        let r = c
            .post(
                "/login",
                &[
                    ("username", user),
                    ("password", PASSWORD),
                    ("csrf", &csrf),
                    ("next", ""),
                ],
            )
            .await?;
        ensure!(
            r.status == StatusCode::SEE_OTHER && r.location() == "/queue",
            "login: {} {} {}",
            r.status,
            r.location(),
            r.body
        );
        ensure!(c.cookies.contains_key("sift_session"), "no session cookie");
        Ok(c)
    }

    async fn review_cells(&self, id: &str) -> anyhow::Result<HashMap<String, String>> {
        let row = self
            .table
            .get("documents", id.as_bytes(), Some(&["r".to_string()]))
            .await?;
        Ok(row
            .map(|r| {
                r.cells
                    .iter()
                    .map(|c| {
                        (
                            String::from_utf8_lossy(&c.qualifier).into_owned(),
                            String::from_utf8_lossy(&c.value).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn feedback(&self) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
        let mut out = Vec::new();
        for w in self.log.watermarks("sift.feedback").await? {
            for m in self
                .log
                .fetch("sift.feedback", w.partition, &w.low, 1000)
                .await?
            {
                let key =
                    String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
                out.push((key, serde_json::from_slice(&m.value)?));
            }
        }
        Ok(out)
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    cookies: HashMap<String, String>,
}

struct Page {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn select(&self, css: &str) -> anyhow::Result<Vec<String>> {
        let html = Html::parse_document(&self.body);
        let sel = Selector::parse(css).map_err(|e| anyhow!("selector {css}: {e:?}"))?;
        Ok(html
            .select(&sel)
            .map(|e| e.text().collect::<String>())
            .collect())
    }

    fn attr(&self, css: &str, attr: &str) -> anyhow::Result<String> {
        let html = Html::parse_document(&self.body);
        let sel = Selector::parse(css).map_err(|e| anyhow!("selector {css}: {e:?}"))?;
        html.select(&sel)
            .next()
            .and_then(|e| e.value().attr(attr))
            .map(str::to_owned)
            .with_context(|| format!("no {css}[{attr}] in {}", self.body))
    }

    fn attrs(&self, css: &str, attr: &str) -> anyhow::Result<Vec<String>> {
        let html = Html::parse_document(&self.body);
        let sel = Selector::parse(css).map_err(|e| anyhow!("selector {css}: {e:?}"))?;
        Ok(html
            .select(&sel)
            .filter_map(|e| e.value().attr(attr).map(str::to_owned))
            .collect())
    }
}

impl Client {
    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> anyhow::Result<Page> {
        let request = if self.cookies.is_empty() {
            request
        } else {
            request.header("cookie", self.cookie_header())
        };
        let response = request.send().await?;
        for v in response.headers().get_all("set-cookie") {
            let v = v.to_str()?;
            let pair = v.split(';').next().unwrap_or_default();
            let (name, value) = pair.split_once('=').context("a cookie without =")?;
            if value.is_empty() || v.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_string(), value.to_string());
            }
        }
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.text().await?;
        Ok(Page {
            status,
            headers,
            body,
        })
    }

    async fn get(&mut self, path: &str) -> anyhow::Result<Page> {
        let r = self.http.get(format!("{}{path}", self.base));
        self.send(r).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<Page> {
        let r = self.http.post(format!("{}{path}", self.base)).form(form);
        self.send(r).await
    }

    /// Follows `/next` to the document it hands out; returns its id.
    async fn next(&mut self, query: &str) -> anyhow::Result<String> {
        let r = self.get(&format!("/next{query}")).await?;
        ensure!(r.status == StatusCode::SEE_OTHER, "next: {}", r.status);
        let loc = r.location();
        let id = loc
            .strip_prefix("/doc/")
            .with_context(|| format!("next went to {loc}"))?;
        Ok(id.split('?').next().unwrap_or_default().to_string())
    }

    /// Submits one of a document page's forms (`css` selects the form).
    async fn submit(
        &mut self,
        page: &Page,
        css: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Page> {
        let action = page.attr(css, "action")?;
        let html = Html::parse_document(&page.body);
        let sel =
            Selector::parse(&format!("{css} input[type=hidden]")).map_err(|e| anyhow!("{e:?}"))?;
        let mut fields: Vec<(String, String)> = html
            .select(&sel)
            .filter_map(|e| {
                Some((
                    e.value().attr("name")?.to_string(),
                    e.value().attr("value").unwrap_or_default().to_string(),
                ))
            })
            .collect();
        fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let form: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.post(&action, &form).await
    }
}

#[tokio::test]
async fn every_route_sends_a_stranger_to_the_login_page() -> anyhow::Result<()> {
    let h = start(3, Duration::from_secs(60)).await?;
    let mut c = h.client()?;
    let gets = [
        "/",
        "/queue",
        "/queue?source=s1&order=margin",
        "/next",
        "/doc/doc-001",
        "/labels?q=lab",
        "/stats",
        "/identities",
        "/identities/next",
        "/identity/twitter%3Asomeone",
        "/nowhere",
    ];
    for path in gets {
        let r = c.get(path).await?;
        ensure!(
            r.status == StatusCode::SEE_OTHER,
            "GET {path}: {}",
            r.status
        );
        let expected: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("next", path)
            .finish();
        ensure!(
            r.location() == format!("/login?{expected}"),
            "GET {path} went to {}",
            r.location()
        );
    }
    for path in [
        "/doc/doc-001/decide",
        "/doc/doc-001/skip",
        "/identity/twitter%3Asomeone/decide",
        "/identity/twitter%3Asomeone/skip",
        "/logout",
    ] {
        let r = c.post(path, &[("decision", "reject")]).await?;
        ensure!(
            r.status == StatusCode::SEE_OTHER && r.location().starts_with("/login?next="),
            "POST {path}: {} {}",
            r.status,
            r.location()
        );
    }
    ensure!(h.review_cells("doc-001").await?.is_empty());
    // Open to all: the login page, probes and assets.
    let health = c.get("/healthz").await?;
    ensure!(health.status == StatusCode::OK && health.body.trim() == "ok");
    let metrics = c.get("/metrics").await?;
    ensure!(metrics.status == StatusCode::OK);
    ensure!(
        metrics.body.contains("sift_review_page_seconds"),
        "{}",
        metrics.body
    );
    ensure!(c.get("/assets/review.js").await?.status == StatusCode::OK);
    ensure!(c.get("/assets/review.css").await?.status == StatusCode::OK);
    let login = c.get("/login?next=%2Fdoc%2Fdoc-001").await?;
    ensure!(login.status == StatusCode::OK);
    ensure!(login.attr("form#login input[name=next]", "value")? == "/doc/doc-001");
    ensure!(c.cookies.contains_key("sift_login_csrf"));
    // A wrong password is a 401 with the error; the next login goes where asked.
    let csrf = login.attr("form#login input[name=csrf]", "value")?;
    let bad = c
        .post(
            "/login",
            &[
                ("username", "ann"),
                ("password", "nope-nope"),
                ("csrf", &csrf),
                ("next", "/doc/doc-001"),
            ],
        )
        .await?;
    ensure!(bad.status == StatusCode::UNAUTHORIZED, "{}", bad.status);
    ensure!(bad
        .select("#error")?
        .join("")
        .contains("Invalid user name or password"));
    let csrf = bad.attr("form#login input[name=csrf]", "value")?;
    let ok = c
        .post(
            "/login",
            &[
                ("username", "ann"),
                ("password", PASSWORD),
                ("csrf", &csrf),
                ("next", "/doc/doc-001"),
            ],
        )
        .await?;
    ensure!(ok.status == StatusCode::SEE_OTHER && ok.location() == "/doc/doc-001");
    let set_cookie = ok
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ensure!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
    ensure!(c.get("/queue").await?.status == StatusCode::OK);
    h.stop().await
}

#[tokio::test]
async fn decisions_go_to_the_table_and_sift_feedback() -> anyhow::Result<()> {
    let h = start(12, Duration::from_secs(60)).await?;
    let mut ann = h.login("ann").await?;
    let queue = ann.get("/queue").await?;
    ensure!(
        queue.select("#count")? == ["12"],
        "{:?}",
        queue.select("#count")
    );
    ensure!(queue.select("table#queue tr.doc")?.len() == 12);
    ensure!(queue.attr("a#start", "href")? == "/next");
    // Least certain first: doc-000 has the lowest top-1 score.
    let id = ann.next("").await?;
    ensure!(id == "doc-000", "{id}");
    let page = ann.get(&format!("/doc/{id}")).await?;
    ensure!(page.status == StatusCode::OK);
    let labels = page.attrs("ol#top5 li.label", "data-label")?;
    ensure!(
        labels == (0..5).map(label).collect::<Vec<_>>(),
        "{labels:?}"
    );
    ensure!(page.attrs("form.accept", "data-key")? == ["1", "2", "3", "4", "5"]);
    // Accepting a label that is not in the top 5 is refused and stores nothing.
    let refused = ann.submit(&page, "form#choose", &[]).await?;
    ensure!(
        refused.status == StatusCode::BAD_REQUEST,
        "empty choose: {}",
        refused.status
    );
    let r = ann
        .post(
            &format!("/doc/{id}/decide"),
            &[
                ("csrf", &page.attr("form#reject input[name=csrf]", "value")?),
                ("decision", "accept"),
                ("label", "label-09"),
            ],
        )
        .await?;
    ensure!(r.status == StatusCode::BAD_REQUEST, "{}", r.status);
    ensure!(h.review_cells(&id).await?.is_empty());
    // Accept the second label.
    let r = ann
        .submit(&page, "form.accept[data-key=\"2\"]", &[])
        .await?;
    ensure!(
        r.status == StatusCode::SEE_OTHER && r.location() == "/next",
        "{} {}",
        r.status,
        r.location()
    );
    let cells = h.review_cells(&id).await?;
    ensure!(
        cells.get("decision").map(String::as_str) == Some("accept"),
        "{cells:?}"
    );
    ensure!(
        cells.get("label").map(String::as_str) == Some("label-01"),
        "{cells:?}"
    );
    ensure!(
        cells.get("reviewer").map(String::as_str) == Some("ann"),
        "{cells:?}"
    );
    ensure!(
        cells.get("model_version").map(String::as_str) == Some("v1"),
        "{cells:?}"
    );
    ensure!(
        cells
            .get("at_ms")
            .and_then(|t| t.parse::<i64>().ok())
            .is_some(),
        "{cells:?}"
    );
    // It left the queue at once.
    ensure!(ann.get("/queue").await?.select("#count")? == ["11"]);
    // Choose another, known label on the next document.
    let id2 = ann.next("").await?;
    ensure!(id2 == "doc-001", "{id2}");
    let page = ann.get(&format!("/doc/{id2}")).await?;
    let unknown = ann
        .submit(&page, "form#choose", &[("label", "no such label")])
        .await?;
    ensure!(
        unknown.status == StatusCode::BAD_REQUEST,
        "{}",
        unknown.status
    );
    let r = ann
        .submit(&page, "form#choose", &[("label", "label-15")])
        .await?;
    ensure!(r.status == StatusCode::SEE_OTHER, "{} {}", r.status, r.body);
    // Reject the third.
    let id3 = ann.next("").await?;
    let page = ann.get(&format!("/doc/{id3}")).await?;
    let r = ann.submit(&page, "form#reject", &[]).await?;
    ensure!(r.status == StatusCode::SEE_OTHER);
    let cells = h.review_cells(&id3).await?;
    ensure!(cells.get("decision").map(String::as_str) == Some("reject"));
    let rejected: Vec<String> = serde_json::from_str(cells.get("rejected").map_or("", |s| s))?;
    ensure!(
        rejected == (2..7).map(label).collect::<Vec<_>>(),
        "{rejected:?}"
    );
    // One record each on sift.feedback, keyed by the document id.
    let mut records = h.feedback().await?;
    records.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(records.len() == 3, "{records:?}");
    let (key, first) = &records[0];
    ensure!(key == "doc-000");
    ensure!(first["v"] == 1 && first["id"] == "doc-000" && first["decision"] == "accept");
    ensure!(
        first["label"] == "label-01"
            && first["reviewer"] == "ann"
            && first["model_version"] == "v1"
    );
    ensure!(first["rejected"] == serde_json::json!([]));
    ensure!(first["top5"].as_array().map(Vec::len) == Some(5), "{first}");
    ensure!(first["at_ms"].as_i64().is_some());
    ensure!(records[1].1["decision"] == "choose" && records[1].1["label"] == "label-15");
    ensure!(records[2].1["decision"] == "reject" && records[2].1["label"].is_null());
    ensure!(records[2].1["rejected"].as_array().map(Vec::len) == Some(5));
    // The label search.
    let found = ann.get("/labels?q=LABEL-1").await?;
    let found: Vec<String> = serde_json::from_str(&found.body)?;
    ensure!(
        found.len() == 6 && found.iter().all(|l| l.starts_with("label-1")),
        "{found:?}"
    );
    let metrics = ann.get("/metrics").await?.body;
    ensure!(
        metrics.contains("sift_review_decisions_total{decision=\"reject\"}"),
        "{metrics}"
    );
    h.stop().await
}

#[tokio::test]
async fn forged_posts_without_the_token_are_refused() -> anyhow::Result<()> {
    let h = start(3, Duration::from_secs(60)).await?;
    let mut ann = h.login("ann").await?;
    let page = ann.get("/doc/doc-001").await?;
    let token = page.attr("form#reject input[name=csrf]", "value")?;
    for fields in [
        vec![("decision", "reject")],
        vec![("decision", "reject"), ("csrf", "")],
        vec![("decision", "reject"), ("csrf", "0123456789abcdef")],
    ] {
        let r = ann.post("/doc/doc-001/decide", &fields).await?;
        ensure!(
            r.status == StatusCode::FORBIDDEN,
            "{fields:?}: {}",
            r.status
        );
        ensure!(!r.select("#error")?.is_empty(), "{}", r.body);
    }
    // No form at all.
    let bare = ann
        .send(ann.http.post(format!("{}/doc/doc-001/decide", ann.base)))
        .await?;
    ensure!(bare.status == StatusCode::FORBIDDEN, "{}", bare.status);
    ensure!(ann.post("/doc/doc-001/skip", &[]).await?.status == StatusCode::FORBIDDEN);
    ensure!(ann.post("/logout", &[]).await?.status == StatusCode::FORBIDDEN);
    ensure!(h.review_cells("doc-001").await?.is_empty());
    ensure!(h.feedback().await?.is_empty());
    // Another session's token is no good either.
    let mut bob = h.login("bob").await?;
    let r = bob
        .post(
            "/doc/doc-002/decide",
            &[("decision", "reject"), ("csrf", &token)],
        )
        .await?;
    ensure!(r.status == StatusCode::FORBIDDEN, "{}", r.status);
    // A login without the login form's token.
    let mut stranger = h.client()?;
    let r = stranger
        .post("/login", &[("username", "ann"), ("password", PASSWORD)])
        .await?;
    ensure!(r.status == StatusCode::FORBIDDEN, "{}", r.status);
    ensure!(!stranger.cookies.contains_key("sift_session"));
    // The real token works; logging out ends the session.
    let r = ann
        .post(
            "/doc/doc-001/decide",
            &[("decision", "reject"), ("csrf", &token)],
        )
        .await?;
    ensure!(r.status == StatusCode::SEE_OTHER, "{}", r.status);
    let logout = ann.post("/logout", &[("csrf", &token)]).await?;
    ensure!(logout.status == StatusCode::SEE_OTHER && logout.location() == "/login");
    ensure!(ann.get("/queue").await?.status == StatusCode::SEE_OTHER);
    h.stop().await
}

#[tokio::test]
async fn a_leased_document_is_kept_from_other_reviewers() -> anyhow::Result<()> {
    let h = start(6, Duration::from_secs(60)).await?;
    let mut ann = h.login("ann").await?;
    let mut bob = h.login("bob").await?;
    let held = ann.next("").await?;
    ensure!(held == "doc-000");
    let page = ann.get(&format!("/doc/{held}")).await?;
    ensure!(page.status == StatusCode::OK);
    let refused = bob.get(&format!("/doc/{held}")).await?;
    ensure!(refused.status == StatusCode::CONFLICT, "{}", refused.status);
    ensure!(
        refused.select("#leased")?.join("").contains("ann"),
        "{}",
        refused.body
    );
    // /next skips it.
    let other = bob.next("").await?;
    ensure!(other == "doc-001", "{other}");
    // Bob cannot decide on it either.
    let bob_page = bob.get(&format!("/doc/{other}")).await?;
    let token = bob_page.attr("form#reject input[name=csrf]", "value")?;
    let r = bob
        .post(
            &format!("/doc/{held}/decide"),
            &[("decision", "reject"), ("csrf", &token)],
        )
        .await?;
    ensure!(r.status == StatusCode::CONFLICT, "{}", r.status);
    ensure!(h.review_cells(&held).await?.is_empty());
    // Filters: only source s2 (doc-002, doc-005).
    let filtered = ann.next("?source=s2").await?;
    ensure!(filtered == "doc-002", "{filtered}");
    // Ann skips doc-000: bob may have it, and ann's /next moves past it.
    let r = ann.submit(&page, "form#skip", &[]).await?;
    ensure!(r.status == StatusCode::SEE_OTHER && r.location() == "/next");
    ensure!(bob.get(&format!("/doc/{held}")).await?.status == StatusCode::OK);
    let ann_next = ann.next("").await?;
    ensure!(ann_next == "doc-002", "{ann_next}");
    // When nothing is left for her, /next says so on the queue page.
    let q = "?category=label-00";
    let r = ann.get(&format!("/next{q}")).await?;
    ensure!(
        r.status == StatusCode::SEE_OTHER && r.location() == "/queue?category=label-00&empty=1",
        "{}",
        r.location()
    );
    let page = ann.get(r.location()).await?;
    ensure!(!page.select("#empty")?.is_empty());
    h.stop().await
}

#[tokio::test]
async fn document_text_comes_back_escaped() -> anyhow::Result<()> {
    let h = start(2, Duration::from_secs(60)).await?;
    let mut ann = h.login("ann").await?;
    let page = ann.get("/doc/doc-000").await?;
    ensure!(page.status == StatusCode::OK);
    ensure!(!page.body.contains("<script>alert"), "{}", page.body);
    ensure!(!page.body.contains("<img src=x"), "{}", page.body);
    ensure!(!page.body.contains("<b onmouseover"), "{}", page.body);
    ensure!(page.body.contains("&lt;script&gt;"));
    // The browser shows exactly the stored text and title.
    ensure!(
        page.select("#text")? == [EVIL_TEXT],
        "{:?}",
        page.select("#text")
    );
    ensure!(page.select("h1#title")? == [EVIL_TITLE]);
    ensure!(page.select("#source")? == ["s0"]);
    ensure!(page.attr("a#url", "href")? == "https://example.org/0");
    ensure!(page.attr("a#url", "rel")? == "noopener noreferrer nofollow");
    let csp = page
        .headers
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ensure!(csp.contains("script-src 'self'"), "{csp}");
    ensure!(page.headers.get("server-timing").is_some());
    // Also on the queue page.
    let queue = ann.get("/queue").await?;
    ensure!(!queue.body.contains("<b onmouseover"));
    ensure!(queue
        .select("table#queue a.open")?
        .contains(&EVIL_TITLE.to_string()));
    h.stop().await
}

#[tokio::test]
async fn the_queue_follows_the_table_and_stats_count_decisions() -> anyhow::Result<()> {
    let h = start(5, Duration::from_millis(200)).await?;
    let mut ann = h.login("ann").await?;
    let mut bob = h.login("bob").await?;
    for (who, form) in [
        ("ann", "form.accept[data-key=\"1\"]"),
        ("ann", "form#reject"),
        ("bob", "form#reject"),
    ] {
        let client = if who == "ann" { &mut ann } else { &mut bob };
        let id = client.next("").await?;
        let page = client.get(&format!("/doc/{id}")).await?;
        let r = client.submit(&page, form, &[]).await?;
        ensure!(r.status == StatusCode::SEE_OTHER, "{}", r.status);
    }
    // Scored elsewhere meanwhile, and decided elsewhere.
    h.table.put("documents", vec![doc(50), doc(51)]).await?;
    h.table
        .put(
            "documents",
            vec![RowPut::new("doc-004")
                .cell("r", "decision", "choose")
                .cell("r", "label", "label-40")
                .cell("r", "reviewer", "carol")
                .cell("r", "at_ms", sift::now_ms().to_string())
                .cell("r", "model_version", "v1")],
        )
        .await?;
    let mut count = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        count = ann.get("/queue").await?.select("#count")?.join("");
        if count == "3" {
            break;
        }
    }
    ensure!(count == "3", "queue count {count}");
    let queue = ann.get("/queue").await?;
    ensure!(queue.body.contains("Document 50"));
    let stats = ann.get("/stats").await?;
    ensure!(stats.status == StatusCode::OK);
    let cells = |css: &str| stats.select(css);
    let per_reviewer = cells("table#per-reviewer tbody td")?;
    ensure!(
        per_reviewer == ["ann", "2", "bob", "1", "carol", "1"],
        "{per_reviewer:?}"
    );
    let per_day = cells("table#per-day tbody td")?;
    let today = sift::review::pages::time(sift::now_ms())[..10].to_string();
    ensure!(per_day == [today, "4".to_string()], "{per_day:?}");
    let accuracy = cells("table#accuracy tbody td")?;
    // 4 reviewed; the accept took the top label (1 of 4 top 1, 1 of 4 in the top 5).
    ensure!(accuracy == ["v1", "4", "25.0%", "25.0%"], "{accuracy:?}");
    let rejected = cells("table#rejected tbody td")?;
    // doc-001 and doc-002 rejected: labels 01..05 and 02..06; 02-05 twice.
    ensure!(
        rejected.len() == 12
            && rejected[1] == "2"
            && rejected[8] == "label-01"
            && rejected[9] == "1",
        "{rejected:?}"
    );
    h.stop().await
}

#[tokio::test]
async fn tls_serves_https_with_secure_cookies() -> anyhow::Result<()> {
    // A self-signed certificate for localhost and 127.0.0.1, for this test only.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/review");
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.review.tls_cert = fixtures.join("cert.pem").display().to_string();
    config.review.tls_key = fixtures.join("key.pem").display().to_string();
    let table = sift::backends::open_table(&config).await?;
    auth::add_user(table.as_ref(), "ann", PASSWORD, Role::Admin).await?;
    let server = Server::start(
        &config,
        Backends {
            table,
            log: sift::backends::open_log(&config).await?,
            objects: None,
            cache: None,
        },
        "127.0.0.1:0",
    )
    .await?;
    ensure!(
        server.url().starts_with("https://127.0.0.1:"),
        "{}",
        server.url()
    );
    let mut c = Client {
        http: reqwest::Client::builder()
            .redirect(Policy::none())
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(20))
            .build()?,
        base: server.url().trim_end_matches('/').to_string(),
        cookies: HashMap::new(),
    };
    let page = c.get("/login").await?;
    ensure!(page.status == StatusCode::OK);
    let login_cookie = page
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ensure!(login_cookie.contains("Secure"), "{login_cookie}");
    let csrf = page.attr("form#login input[name=csrf]", "value")?;
    let r = c
        .post(
            "/login",
            &[("username", "ann"), ("password", PASSWORD), ("csrf", &csrf)],
        )
        .await?;
    ensure!(r.status == StatusCode::SEE_OTHER, "{}", r.status);
    let session_cookie = r
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ensure!(session_cookie.contains("Secure"), "{session_cookie}");
    let queue = c.get("/queue").await?;
    ensure!(queue.status == StatusCode::OK && queue.select("#empty")?.len() == 1);
    // Plain HTTP to the TLS port gets no page.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/login", server.addr()))
        .send()
        .await;
    ensure!(plain.map_or(true, |r| !r.status().is_success()));
    server.shutdown().await?;
    Ok(())
}

/// A person of the consumer database, for identity decisions.
fn person(id: &str, first: &str, city: &str) -> sift::dbusa::person::Person {
    sift::dbusa::person::Person {
        dbusa_id: id.into(),
        first: first.into(),
        middle: String::new(),
        last: "Okonkwo".into(),
        address: "12 Elm St".into(),
        city: city.into(),
        state: "TX".into(),
        zip: "78701".into(),
        phone: String::new(),
        email: String::new(),
        birth_year: 1980,
    }
}

/// A matcher decision as the daemon's sink writes it.
fn identity_decision(
    handle: &str,
    name: &str,
    reason: sift::matching::matcher::Reason,
    probability: f64,
    candidates: &[(&str, &str)],
) -> sift::matching::sink::Decided {
    use sift::matching::matcher::{CandidateScore, Enriched, Outcome, ProfileIn, Reason};
    let top: Vec<CandidateScore> = candidates
        .iter()
        .enumerate()
        .map(|(i, (id, first))| CandidateScore {
            dbusa_id: (*id).into(),
            score: 30.0 - i as f64,
            evidence: Vec::new(),
            person: Some(person(id, first, "Austin")),
        })
        .collect();
    let matched = reason == Reason::Matched;
    sift::matching::sink::Decided {
        profile: ProfileIn {
            id: Some(format!("p-{handle}")),
            network: "twitter".into(),
            handle: handle.into(),
            name: Some(name.into()),
            location: Some("Austin, TX".into()),
            ..ProfileIn::default()
        },
        outcome: Outcome {
            dbusa_id: matched.then(|| candidates[0].0.to_owned()),
            score: Some(30.0),
            probability: Some(probability),
            runner_up: Some(29.0),
            reason,
            method: "search".into(),
            enrichment: Enriched::NotCalled,
            candidates: top.len(),
            best: Some(candidates[0].0.to_owned()),
            evidence: Vec::new(),
            top,
            candidate_ids: Vec::new(),
        },
        at_ms: 1_700_000_000_000,
    }
}

/// The identity queue over HTTP: only uncertain decisions, least certain
/// first; the profile beside its candidates, escaped; leases; CSRF; a
/// decision rewrites `handles`, `identities` and `sift.matches`, survives
/// the matcher deciding again, and is a label for `sift match fit`.
#[tokio::test]
async fn identity_reviews_decide_who_a_profile_is() -> anyhow::Result<()> {
    use sift::matching::matcher::Reason;
    use sift::matching::sink;
    let h = start(2, Duration::from_millis(200)).await?;
    let cache: Arc<dyn sift::backends::Cache> =
        Arc::new(sift::backends::cache::EmbeddedCache::new(1000));
    const EVIL_NAME: &str = "<script>alert('id')</script> Okonkwo";
    let decisions = vec![
        identity_decision(
            "amb",
            EVIL_NAME,
            Reason::Ambiguous,
            0.97,
            &[("DB0000000001", "Christina"), ("DB0000000002", "Christine")],
        ),
        identity_decision(
            "near",
            "Chris Okonkwo",
            Reason::Matched,
            0.7,
            &[("DB0000000003", "Chris")],
        ),
        identity_decision(
            "sure",
            "Ada Okonkwo",
            Reason::Matched,
            0.999,
            &[("DB0000000004", "Ada")],
        ),
        identity_decision(
            "low",
            "Obi Okonkwo",
            Reason::BelowThreshold,
            0.01,
            &[("DB0000000005", "Obinna")],
        ),
    ];
    sink::ensure_tables(h.table.as_ref()).await?;
    sink::write(&h.table, &cache, &decisions, None).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let mut ann = h.login("ann").await?;
    let mut bob = h.login("bob").await?;
    let list = ann.get("/identities").await?;
    ensure!(list.status == StatusCode::OK, "{}", list.status);
    let rows = list.select("#identities tbody tr td:first-child")?;
    ensure!(rows == ["twitter:amb", "twitter:near"], "{rows:?}");
    let r = ann.get("/identities/next").await?;
    ensure!(
        r.status == StatusCode::SEE_OTHER && r.location() == "/identity/twitter%3Aamb",
        "{} {}",
        r.status,
        r.location()
    );
    let page = ann.get(r.location()).await?;
    ensure!(page.status == StatusCode::OK, "{}", page.body);
    ensure!(page.select("#profile-name")? == [EVIL_NAME]);
    ensure!(
        !page.body.contains("<script>alert"),
        "the name is not escaped"
    );
    let picks = page.attrs("#candidates form.pick input[name=choice]", "value")?;
    ensure!(picks == ["DB0000000001", "DB0000000002"], "{picks:?}");
    ensure!(page.attrs("#candidates form.pick", "data-key")? == ["1", "2"]);
    ensure!(page
        .select("#candidates .person")?
        .join(" ")
        .contains("Christine"));
    // Bob cannot open or decide the profile Ann holds; /next gives him another.
    ensure!(bob.get("/identity/twitter%3Aamb").await?.status == StatusCode::CONFLICT);
    let r = bob.get("/identities/next").await?;
    ensure!(
        r.location() == "/identity/twitter%3Anear",
        "{}",
        r.location()
    );
    // No token, a person who was not a candidate: refused, nothing written.
    let action = page.attr("form#none", "action")?;
    let r = ann.post(&action, &[("choice", "none")]).await?;
    ensure!(r.status == StatusCode::FORBIDDEN, "{}", r.status);
    let token = page.attr("form#none input[name=csrf]", "value")?;
    let r = ann
        .post(&action, &[("choice", "DB0000000009"), ("csrf", &token)])
        .await?;
    ensure!(r.status == StatusCode::BAD_REQUEST, "{}", r.status);
    let cell = |row: &sift::backends::table::Row, q: &str| {
        row.get(sink::HANDLES_FAMILY, q.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let handle = |key: &'static str| {
        let table = h.table.clone();
        async move {
            table
                .get(sink::HANDLES, key.as_bytes(), None)
                .await?
                .context("no handles row")
        }
    };
    ensure!(cell(&handle("twitter:amb").await?, "reviewed_by").is_empty());
    // Ann picks the second sister (key 2).
    let r = ann
        .submit(&page, "#candidates form.pick[data-key=\"2\"]", &[])
        .await?;
    ensure!(
        r.status == StatusCode::SEE_OTHER && r.location() == "/identities/next",
        "{} {}",
        r.status,
        r.body
    );
    let row = handle("twitter:amb").await?;
    ensure!(cell(&row, "dbusa_id") == "DB0000000002");
    ensure!(cell(&row, "reason") == "reviewed");
    ensure!(cell(&row, "reviewed_by") == "ann" && cell(&row, "review") == "DB0000000002");
    let identity = h
        .table
        .get(sink::IDENTITIES, b"DB0000000002", None)
        .await?
        .context("no identities row")?;
    ensure!(
        identity
            .get(sink::IDENTITIES_FAMILY, b"twitter")
            .map(|v| v.as_ref())
            == Some(&b"amb"[..])
    );
    // "None of these" for the profile the matcher had matched: the person
    // no longer holds the handle.
    bob.get("/identities/next").await?;
    let near = bob.get("/identity/twitter%3Anear").await?;
    let r = bob.submit(&near, "form#none", &[]).await?;
    ensure!(r.status == StatusCode::SEE_OTHER, "{} {}", r.status, r.body);
    let row = handle("twitter:near").await?;
    ensure!(cell(&row, "dbusa_id").is_empty() && cell(&row, "review") == "none");
    let former = h.table.get(sink::IDENTITIES, b"DB0000000003", None).await?;
    ensure!(
        former.is_none_or(|r| r.get(sink::IDENTITIES_FAMILY, b"twitter").is_none()),
        "the former match still holds the handle"
    );
    // Both decisions went to sift.matches as reviewed.
    let mut reviewed = 0;
    for w in h.log.watermarks("sift.matches").await? {
        for m in h
            .log
            .fetch("sift.matches", w.partition, &w.low, 100)
            .await?
        {
            let v: serde_json::Value = serde_json::from_slice(&m.value)?;
            if v["reason"] == "reviewed" {
                reviewed += 1;
            }
        }
    }
    ensure!(reviewed == 2, "{reviewed} reviewed records on sift.matches");
    // The matcher deciding the handle again leaves the reviewer's decision.
    sink::write(&h.table, &cache, &decisions[..1], None).await?;
    let row = handle("twitter:amb").await?;
    ensure!(cell(&row, "dbusa_id") == "DB0000000002" && cell(&row, "reason") == "reviewed");
    // The reviews are labels for `sift match fit --reviews`.
    let labels = sift::matching::fit::reviewed_profiles(h.table.as_ref()).await?;
    let mut got: Vec<(String, Option<String>)> = labels
        .iter()
        .map(|p| (p.handle.clone(), p.dbusa_id.clone()))
        .collect();
    got.sort();
    ensure!(
        got == [
            ("amb".to_owned(), Some("DB0000000002".to_owned())),
            ("near".to_owned(), None)
        ],
        "{got:?}"
    );
    // Nothing uncertain is left.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let list = ann.get("/identities").await?;
    ensure!(
        list.select("#identities tbody tr")?.is_empty(),
        "{}",
        list.body
    );
    let r = ann.get("/identities/next").await?;
    ensure!(r.location() == "/identities?empty=1", "{}", r.location());
    h.stop().await
}
