//! The review UI's only script and stylesheet, compiled into the binary and
//! served under `/assets/` (the pages allow scripts from this server only).
//!
//! Keys on a document's page: `1`–`5` accept that label, `r` rejects all
//! five, `n` skips, `/` focuses the label search. On a profile's page:
//! `1`–`3` pick that person, `0` none of these, `n` skips. Keys typed into a field,
//! or with Ctrl, Alt or Meta held, are left alone.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Where the script is served.
pub const JS_PATH: &str = "/assets/review.js";
/// Where the stylesheet is served.
pub const CSS_PATH: &str = "/assets/review.css";

/// The script.
pub const JS: &str = r#""use strict";
(function () {
  function typing(el) {
    if (!el) return false;
    var tag = el.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || el.isContentEditable;
  }
  function submit(form) {
    if (!form) return false;
    if (form.dataset.sent) return true;
    form.dataset.sent = "1";
    if (form.requestSubmit) form.requestSubmit(); else form.submit();
    return true;
  }
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.altKey || e.metaKey || e.isComposing || typing(e.target)) return;
    var done = false;
    if (document.getElementById("candidates")) {
      if (e.key >= "1" && e.key <= "9") {
        done = submit(document.querySelector('form.pick[data-key="' + e.key + '"]'));
      } else if (e.key === "0") {
        done = submit(document.getElementById("none"));
      } else if (e.key === "n") {
        done = submit(document.getElementById("skip"));
      }
      if (done) e.preventDefault();
      return;
    }
    if (!document.getElementById("top5")) return;
    if (e.key >= "1" && e.key <= "5") {
      done = submit(document.querySelector('form.accept[data-key="' + e.key + '"]'));
    } else if (e.key === "r") {
      done = submit(document.getElementById("reject"));
    } else if (e.key === "n") {
      done = submit(document.getElementById("skip"));
    } else if (e.key === "/") {
      var search = document.getElementById("label-search");
      if (search) { search.focus(); search.select(); done = true; }
    }
    if (done) e.preventDefault();
  });
  document.addEventListener("DOMContentLoaded", function () {
    var search = document.getElementById("label-search");
    var list = document.getElementById("labels");
    if (!search || !list) return;
    var timer = null, asked = null;
    function fill(labels) {
      while (list.firstChild) list.removeChild(list.firstChild);
      labels.forEach(function (found) {
        var option = document.createElement("option");
        option.value = found.label;
        if (found.name) option.label = found.name + (found.description ? " - " + found.description : "");
        list.appendChild(option);
      });
    }
    function ask() {
      var q = search.value;
      if (q === asked) return;
      asked = q;
      fetch("/labels?detail=1&q=" + encodeURIComponent(q), { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : []; })
        .then(function (labels) { if (asked === q) fill(labels); })
        .catch(function () {});
    }
    search.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(ask, 120);
    });
    search.addEventListener("focus", ask);
  });
})();
"#;

/// The stylesheet.
pub const CSS: &str = r#":root { font-family: system-ui, sans-serif; color: #1d1d1f; background: #fafafa; }
body { margin: 0; }
main { max-width: 72rem; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
#nav { display: flex; gap: 1.25rem; align-items: center; padding: .6rem 1.5rem; background: #20232a; }
#nav a { color: #fff; text-decoration: none; font-weight: 600; }
#nav a[aria-current="page"] { text-decoration: underline; }
#nav .who { margin-left: auto; color: #c8ccd4; }
#nav form { margin: 0; }
#error, #leased { color: #a40000; background: #fde8e8; padding: .6rem .8rem; border-radius: 4px; }
#login { display: grid; gap: .8rem; max-width: 20rem; }
#login label { display: grid; gap: .25rem; }
#filters { display: flex; flex-wrap: wrap; gap: 1rem; align-items: end; margin-bottom: 1rem; }
table { border-collapse: collapse; width: 100%; margin-bottom: 1.5rem; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #e2e2e2; vertical-align: top; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
#candidates form { margin: 0; }
#candidates td.level-exact, #candidates td.level-zip, #candidates td.level-city_state { background: #e3f4e1; }
#candidates td.level-other { background: #fbe3e1; }
#candidates td.level-missing { color: #999; }
#candidates small { color: #666; }
#top5 { list-style: none; padding: 0; display: grid; gap: .35rem; }
#top5 li { display: grid; grid-template-columns: minmax(14rem, 26rem) 4rem 1fr; gap: .75rem; align-items: center; }
#top5 form { margin: 0; }
#top5 button { width: 100%; text-align: left; }
.track { display: block; background: #e8e8e8; height: .7rem; border-radius: 3px; }
span.bar { display: block; background: #3b73d9; height: 100%; border-radius: 3px; }
.score { font-variant-numeric: tabular-nums; text-align: right; }
svg.chart { display: block; max-width: 100%; height: auto; margin: .5rem 0 1rem; }
svg.chart text { font-size: 11px; fill: #333; }
svg.chart .grid { stroke: #e8e8e8; } svg.chart .axis { stroke: #888; }
#top5 .description, #top5 .why { grid-column: 1 / -1; margin: 0 0 .2rem 2.2rem; font-size: .85rem; color: #555; }
.cat-name { font-weight: 600; }
#top5 .name { color: #666; font-size: .85em; }
.facet { font-style: italic; }
mark.why { border-radius: 2px; padding: 0 1px; color: inherit; }
mark.why-1 { background: #ffe08a; } mark.why-2 { background: #b9e3ff; } mark.why-3 { background: #c9f2c0; }
mark.why-4 { background: #f6c6e6; } mark.why-5 { background: #e2d4ff; }
.actions { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; margin: 1rem 0; }
.actions form { margin: 0; }
kbd { font-family: ui-monospace, monospace; border: 1px solid #aaa; border-radius: 3px; padding: 0 .3rem; background: #fff; color: #333; }
#text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-serif, Georgia, serif; line-height: 1.5; background: #fff; padding: 1rem; border: 1px solid #e2e2e2; max-height: 70vh; overflow: auto; }
#decided { background: #fff6d5; padding: .5rem .8rem; border-radius: 4px; }
.note { color: #555; font-size: .9rem; }
"#;

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// `GET /assets/review.js`.
pub async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

/// `GET /assets/review.css`.
pub async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}
