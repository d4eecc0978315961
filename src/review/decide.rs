//! `POST /doc/{id}/decide` and `POST /doc/{id}/skip`.
//!
//! A decision is checked against the row as stored (an accepted label must
//! be one of its top 5, a chosen one a known label), written to family `r`
//! of `documents`, then produced to `sift.feedback` keyed by the document
//! id. Both writes are idempotent for the same decision, so a reviewer who
//! sees an error submits again.

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};

use crate::backends::log::Record;
use crate::backends::table::RowPut;
use crate::documents::{self, categories, review, Decision, CATEGORIES, REVIEW};
use crate::envelope::{headers, topics};

use super::auth::Session;
use super::queue::{Filters, Review};
use super::{pages, AppState, Reviewer};

/// Version of the `sift.feedback` record.
pub const FEEDBACK_VERSION: u32 = 1;

/// A record on `sift.feedback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    /// Record version ([`FEEDBACK_VERSION`]).
    pub v: u32,
    /// Document id.
    pub id: String,
    /// `accept`, `choose` or `reject`.
    pub decision: String,
    /// The accepted or chosen label; null for a rejection.
    pub label: Option<String>,
    /// The labels rejected (a rejection's top 5; empty otherwise).
    pub rejected: Vec<String>,
    /// Who decided.
    pub reviewer: String,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// The model whose top 5 was reviewed.
    pub model_version: String,
    /// The top 5 shown, as stored in `c:top5`.
    pub top5: serde_json::Value,
}

/// The fields of the decision forms.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct DecideForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    label: String,
    source: Option<String>,
    category: Option<String>,
    order: Option<String>,
}

impl DecideForm {
    fn filters(&self) -> Filters {
        Filters::new(
            self.source.as_deref(),
            self.category.as_deref(),
            self.order.as_deref(),
        )
    }
}

/// 403 for a form without this session's CSRF token.
pub(crate) fn forbidden(session: Option<&Session>) -> Response {
    (
        StatusCode::FORBIDDEN,
        pages::error(
            session,
            "Forbidden",
            "This form's security token is missing or out of date. Reload the page and try again.",
        ),
    )
        .into_response()
}

fn problem(session: &Session, status: StatusCode, title: &str, message: &str) -> Response {
    (status, pages::error(Some(session), title, message)).into_response()
}

#[derive(Deserialize)]
struct Scored {
    label: String,
}

/// `POST /doc/{id}/decide`.
pub(crate) async fn decide(
    State(app): State<AppState>,
    Reviewer(session): Reviewer,
    Path(id): Path<String>,
    form: Result<Form<DecideForm>, FormRejection>,
) -> Response {
    let form = form.map(|f| f.0).unwrap_or_default();
    if !app.auth.csrf_ok(&session, &form.csrf) {
        return forbidden(Some(&session));
    }
    let filters = form.filters();
    let Some(decision) = Decision::parse(&form.decision) else {
        return problem(
            &session,
            StatusCode::BAD_REQUEST,
            "Unknown decision",
            "A decision is accept, choose or reject.",
        );
    };
    if let Some(holder) = app.leases.holder_other_than(&id, &session.user) {
        return (
            StatusCode::CONFLICT,
            pages::leased(&session, &id, &holder, &filters),
        )
            .into_response();
    }
    let families = [CATEGORIES.to_string()];
    let row = match app
        .table
        .get(documents::TABLE, id.as_bytes(), Some(&families))
        .await
    {
        Ok(Some(row)) => row,
        Ok(None) => {
            return problem(
                &session,
                StatusCode::NOT_FOUND,
                "No such document",
                "This document has no top 5 to review.",
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read a document to decide on.");
            return problem(
                &session,
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                "The documents table did not answer; nothing was saved. Submit again in a moment.",
            );
        }
    };
    let top5_json = row
        .get(CATEGORIES, categories::TOP5.as_bytes())
        .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
        .unwrap_or(serde_json::Value::Array(Vec::new()));
    let top5: Vec<String> = serde_json::from_value::<Vec<Scored>>(top5_json.clone())
        .unwrap_or_default()
        .into_iter()
        .take(5)
        .map(|s| s.label)
        .collect();
    let model_version = row
        .get(CATEGORIES, categories::MODEL_VERSION.as_bytes())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    let label = form.label.trim().to_owned();
    let (label, rejected) = match decision {
        Decision::Accept if top5.contains(&label) => (Some(label), Vec::new()),
        Decision::Accept => {
            return problem(
                &session,
                StatusCode::BAD_REQUEST,
                "Not in the top 5",
                "Accept one of the five labels shown; use “Another label” for any other.",
            )
        }
        Decision::Choose if !label.is_empty() && app.labels.contains(&label) => {
            (Some(label), Vec::new())
        }
        Decision::Choose => {
            return problem(
                &session,
                StatusCode::BAD_REQUEST,
                "Unknown label",
                &format!(
                    "“{label}” is not a known label. Pick one of the labels the search offers."
                ),
            )
        }
        Decision::Reject => (None, top5.clone()),
    };
    let at_ms = crate::now_ms();
    let rejected_json = serde_json::to_string(&rejected).unwrap_or_else(|_| "[]".into());
    let put = RowPut::new(id.clone())
        .cell_at(REVIEW, review::DECISION, decision.as_str(), at_ms)
        .cell_at(
            REVIEW,
            review::LABEL,
            label.clone().unwrap_or_default(),
            at_ms,
        )
        .cell_at(REVIEW, review::REJECTED, rejected_json, at_ms)
        .cell_at(REVIEW, review::REVIEWER, session.user.clone(), at_ms)
        .cell_at(REVIEW, review::AT_MS, at_ms.to_string(), at_ms)
        .cell_at(REVIEW, review::MODEL_VERSION, model_version.clone(), at_ms);
    let feedback = Feedback {
        v: FEEDBACK_VERSION,
        id: id.clone(),
        decision: decision.as_str().to_owned(),
        label: label.clone(),
        rejected: rejected.clone(),
        reviewer: session.user.clone(),
        at_ms,
        model_version: model_version.clone(),
        top5: top5_json,
    };
    let record = Record::new(
        id.clone(),
        serde_json::to_vec(&feedback).unwrap_or_default(),
    )
    .header(headers::SCHEMA, FEEDBACK_VERSION.to_string());
    if let Err(e) = app.table.put(documents::TABLE, vec![put]).await {
        tracing::warn!(error = %e, "Cannot store a review decision.");
        return problem(
            &session,
            StatusCode::SERVICE_UNAVAILABLE,
            "Not saved",
            "The decision could not be stored. Submit it again in a moment.",
        );
    }
    if let Err(e) = app.log.produce(topics::FEEDBACK, vec![record]).await {
        tracing::warn!(error = %e, "Cannot produce a review decision to sift.feedback.");
        return problem(
            &session,
            StatusCode::SERVICE_UNAVAILABLE,
            "Not sent",
            "The decision was stored but could not be sent to sift.feedback. Submit it again in a moment.",
        );
    }
    let intern = |s: &str| -> Arc<str> { Arc::from(s) };
    app.queue.decided(
        &id,
        Review {
            decision,
            label: label.as_deref().map(intern),
            rejected: rejected.iter().map(|l| intern(l)).collect(),
            reviewer: intern(&session.user),
            at_ms,
            model_version: intern(&model_version),
        },
    );
    crate::metrics::global().review_decided(decision.as_str());
    tracing::debug!(
        id,
        decision = decision.as_str(),
        reviewer = session.user,
        "Review decision stored."
    );
    app.leases.release(&id, &session.user);
    Redirect::to(&filters.url("/next")).into_response()
}

/// `POST /doc/{id}/skip`.
pub(crate) async fn skip(
    State(app): State<AppState>,
    Reviewer(session): Reviewer,
    Path(id): Path<String>,
    form: Result<Form<DecideForm>, FormRejection>,
) -> Response {
    let form = form.map(|f| f.0).unwrap_or_default();
    if !app.auth.csrf_ok(&session, &form.csrf) {
        return forbidden(Some(&session));
    }
    app.leases.release(&id, &session.user);
    app.leases.skip(&session.id, &id);
    Redirect::to(&form.filters().url("/next")).into_response()
}

/// `GET` of a form's target (after a login that interrupted a POST): back
/// to the document.
pub(crate) async fn back_to_doc(Reviewer(_): Reviewer, Path(id): Path<String>) -> Response {
    Redirect::to(&pages::doc_path(&id)).into_response()
}
