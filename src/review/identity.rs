//! The identity queue: `sift match` decisions a person should look at.
//! A decision is uncertain when the best two candidates were too close to
//! tell apart (`ambiguous`) or when the best candidate's match probability
//! lies between [`LOW`] and [`HIGH`], matched or not. The reviewer sees the
//! profile beside its top candidates with the per-field evidence and picks
//! the person or "none of these" (keys `1`–`3`, `0`, `n` to skip).
//!
//! A decision rewrites the handle's row of `handles` (person, reason
//! `reviewed`, who and when), the person's row of `identities` and the
//! cache through the matcher's own sink, and goes to `sift.matches`. The
//! matcher does not overwrite a reviewed row, and `sift match fit
//! --reviews` reads the reviewed rows as labels.
//!
//! The queue is rebuilt from `handles` with the document queue, every
//! `review.queue_refresh`.

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use parking_lot::RwLock;
use serde::Deserialize;

use crate::backends::table::{Row, RowPut, Table};
use crate::dbusa::person::Person;
use crate::matching::matcher::{CandidateScore, Outcome, ProfileIn, Reason};
use crate::matching::score::Level;
use crate::matching::sink::{self, columns, Decided, HANDLES, HANDLES_FAMILY};

use super::auth::Session;
use super::pages::{self, encode_segment, layout, Nav};
use super::{AppState, Reviewer};

/// Below this match probability an unmatched decision is certain enough.
pub const LOW: f64 = 0.05;
/// Above this a match is certain enough.
pub const HIGH: f64 = 0.95;
/// Rows read per scan of `handles`.
const PAGE: usize = 2_000;
/// Rows the queue page lists.
const LISTED: usize = 200;

/// One decision of the matcher, as stored in `handles`.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Row key, `network:handle`.
    pub row: String,
    /// The profile as matched.
    pub profile: ProfileIn,
    /// The matcher's reason.
    pub reason: String,
    /// The best candidate's match probability.
    pub probability: Option<f64>,
    /// The matched person, if any.
    pub dbusa_id: Option<String>,
    /// The best candidates, best first.
    pub top: Vec<CandidateScore>,
    /// Who reviewed it, if anyone.
    pub reviewed_by: Option<String>,
    /// What they chose (a person's id or `none`).
    pub review: Option<String>,
}

fn text(row: &Row, qualifier: &str) -> Option<String> {
    row.get(HANDLES_FAMILY, qualifier.as_bytes())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .filter(|v| !v.is_empty())
}

impl Item {
    /// The decision stored in a `handles` row; None for rows written before
    /// the profile was stored with them.
    pub fn of(row: &Row) -> Option<Item> {
        let profile: ProfileIn = row
            .get(HANDLES_FAMILY, columns::PROFILE.as_bytes())
            .and_then(|v| serde_json::from_slice(v).ok())?;
        Some(Item {
            row: String::from_utf8_lossy(&row.key).into_owned(),
            profile,
            reason: text(row, columns::REASON).unwrap_or_default(),
            probability: text(row, columns::PROBABILITY).and_then(|p| p.parse().ok()),
            dbusa_id: text(row, columns::DBUSA_ID),
            top: row
                .get(HANDLES_FAMILY, columns::TOP.as_bytes())
                .and_then(|v| serde_json::from_slice(v).ok())
                .unwrap_or_default(),
            reviewed_by: text(row, columns::REVIEWED_BY),
            review: text(row, columns::REVIEW),
        })
    }

    /// Whether a person should look at it: not reviewed yet, with
    /// candidates, and either ambiguous or with a probability between
    /// [`LOW`] and [`HIGH`].
    pub fn uncertain(&self) -> bool {
        if self.reviewed_by.is_some() || self.top.is_empty() {
            return false;
        }
        self.reason == Reason::Ambiguous.name()
            || ((self.reason == Reason::Matched.name()
                || self.reason == Reason::BelowThreshold.name())
                && self.probability.is_some_and(|p| (LOW..=HIGH).contains(&p)))
    }

    /// How far from a coin toss the decision was: the queue shows the least
    /// certain first (ambiguous ones count as a coin toss).
    fn certainty(&self) -> f64 {
        if self.reason == Reason::Ambiguous.name() {
            0.0
        } else {
            self.probability.map_or(0.5, |p| (p - 0.5).abs())
        }
    }
}

/// The uncertain decisions, least certain first (then by row key).
#[derive(Debug, Default)]
pub struct IdentityQueue {
    items: RwLock<Arc<Vec<Item>>>,
}

impl IdentityQueue {
    /// Reads `handles` and keeps the uncertain decisions. A missing table
    /// is an empty queue.
    pub async fn build(table: &dyn Table) -> crate::Result<Vec<Item>> {
        let mut items = Vec::new();
        let families = [HANDLES_FAMILY];
        let scanned =
            crate::backends::table::scan_pages(table, HANDLES, Some(&families), PAGE, |row| {
                if let Some(item) = Item::of(row).filter(Item::uncertain) {
                    items.push(item);
                }
            })
            .await;
        match scanned {
            Ok(()) => {}
            Err(crate::backends::table::TableError::NoSuchTable(_)) => {}
            Err(e) => return Err(e.into()),
        }
        items.sort_by(|a, b| {
            a.certainty()
                .total_cmp(&b.certainty())
                .then_with(|| a.row.cmp(&b.row))
        });
        Ok(items)
    }

    /// Replaces the queue.
    pub fn replace(&self, items: Vec<Item>) {
        *self.items.write() = Arc::new(items);
    }

    /// The queue now.
    pub fn items(&self) -> Arc<Vec<Item>> {
        self.items.read().clone()
    }

    /// Drops a decided row.
    pub fn decided(&self, row: &str) {
        let mut items = self.items.write();
        if items.iter().any(|i| i.row == row) {
            *items = Arc::new(items.iter().filter(|i| i.row != row).cloned().collect());
        }
    }
}

/// The lease key of a handle's row (apart from document ids).
fn lease_key(row: &str) -> String {
    format!("identity:{row}")
}

/// The page of a handle's row.
pub fn identity_path(row: &str) -> String {
    format!("/identity/{}", encode_segment(row))
}

/// `GET /identities`: the queue.
pub(crate) async fn list(State(app): State<AppState>, Reviewer(session): Reviewer) -> Response {
    let items = app.identities.items();
    layout(
        "Identities",
        Some(&session),
        Nav::Identities,
        html! {
            h1 { "Identities to review" }
            p #identity-count {
                (items.len()) " uncertain " (if items.len() == 1 { "decision" } else { "decisions" })
                " (ambiguous, or a match probability between " (LOW) " and " (HIGH) "), least certain first."
            }
            p { a #identity-next href="/identities/next" { "Start reviewing" } }
            table #identities {
                thead { tr { th { "Profile" } th { "Name" } th { "Location" } th { "Decision" } th { "Probability" } } }
                tbody {
                    @for item in items.iter().take(LISTED) {
                        tr {
                            td { a href=(identity_path(&item.row)) { (item.row) } }
                            td { (item.profile.name.as_deref().unwrap_or("")) }
                            td { (item.profile.location.as_deref().unwrap_or("")) }
                            td { (item.reason) }
                            td { (item.probability.map(|p| format!("{p:.3}")).unwrap_or_default()) }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

/// `GET /identities/next`: the least certain decision nobody holds and the
/// reviewer has not skipped.
pub(crate) async fn next(State(app): State<AppState>, Reviewer(session): Reviewer) -> Response {
    let items = app.identities.items();
    let found = items.iter().find(|i| {
        let key = lease_key(&i.row);
        !app.leases.skipped(&session.id, &key) && app.leases.take(&key, &session.user).is_ok()
    });
    match found {
        Some(item) => Redirect::to(&identity_path(&item.row)).into_response(),
        None => Redirect::to("/identities?empty=1").into_response(),
    }
}

async fn read(app: &AppState, row: &str) -> Result<Option<Item>, crate::Error> {
    let families = [HANDLES_FAMILY.to_string()];
    Ok(app
        .table
        .get(HANDLES, row.as_bytes(), Some(&families))
        .await?
        .as_ref()
        .and_then(Item::of))
}

fn problem(session: &Session, status: StatusCode, title: &str, message: &str) -> Response {
    (status, pages::error(Some(session), title, message)).into_response()
}

/// `GET /identity/{row}`: the profile beside its candidates.
pub(crate) async fn page(
    State(app): State<AppState>,
    Reviewer(session): Reviewer,
    Path(row): Path<String>,
) -> Response {
    if let Some(holder) = app
        .leases
        .holder_other_than(&lease_key(&row), &session.user)
    {
        return problem(
            &session,
            StatusCode::CONFLICT,
            "Profile in review",
            &format!("{holder} is reviewing this profile. It comes back to the queue when they decide, skip it, or their lease expires."),
        );
    }
    match read(&app, &row).await {
        Ok(Some(item)) => {
            let _ = app.leases.take(&lease_key(&row), &session.user);
            page_markup(&session, &item).into_response()
        }
        Ok(None) => problem(
            &session,
            StatusCode::NOT_FOUND,
            "No such profile",
            "No decision is stored for this profile.",
        ),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read a handle to review.");
            problem(
                &session,
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                "The handles table did not answer. Reload in a moment.",
            )
        }
    }
}

fn level_of(c: &CandidateScore, field: crate::matching::score::Field) -> (Level, f64) {
    c.evidence
        .iter()
        .find(|e| e.field == field)
        .map_or((Level::Missing, 0.0), |e| (e.level, e.weight))
}

fn place(p: &Person) -> String {
    let mut s = String::new();
    for part in [&p.address, &p.city, &p.state, &p.zip] {
        if !part.is_empty() {
            if !s.is_empty() {
                s.push_str(", ");
            }
            s.push_str(part);
        }
    }
    s
}

fn page_markup(session: &Session, item: &Item) -> Markup {
    use crate::matching::score::Field;
    let decide = format!("{}/decide", identity_path(&item.row));
    let skip = format!("{}/skip", identity_path(&item.row));
    let p = &item.profile;
    layout(
        &item.row,
        Some(session),
        Nav::Identities,
        html! {
            article #identity data-row=(item.row) {
                h1 { "Who is " span #handle { "@" (p.handle) } " on " (p.network) "?" }
                dl #profile .meta {
                    dt { "Name" } dd #profile-name { (p.name.as_deref().unwrap_or("(none)")) }
                    dt { "Location" } dd #profile-location { (p.location.as_deref().unwrap_or("(none)")) }
                    dt { "Email" } dd #profile-email { (p.email.as_deref().unwrap_or("(none)")) }
                    dt { "Matcher" } dd #matcher-decision {
                        (item.reason)
                        @if let Some(prob) = item.probability { ", probability " (format!("{prob:.3}")) }
                        @if let Some(id) = &item.dbusa_id { ", matched " code { (id) } }
                    }
                }
                @if let Some(by) = &item.reviewed_by {
                    p #decided { "Already reviewed by " (by) ": " (item.review.as_deref().unwrap_or("")) ". A new decision replaces it." }
                }
                table #candidates {
                    thead {
                        tr {
                            th { "Pick" } th { "Person" } th { "Lives at" } th { "Email" } th { "Born" } th { "Score" }
                            @for f in Field::ALL { th { (f.name()) } }
                        }
                    }
                    tbody {
                        @for (i, c) in item.top.iter().enumerate() {
                            tr .candidate data-id=(c.dbusa_id) {
                                td {
                                    form .pick method="post" action=(decide) data-key=(i + 1) {
                                        input type="hidden" name="csrf" value=(session.csrf);
                                        input type="hidden" name="choice" value=(c.dbusa_id);
                                        button type="submit" title=(format!("This person (key {})", i + 1)) { kbd { (i + 1) } " This person" }
                                    }
                                }
                                @match &c.person {
                                    Some(person) => {
                                        td .person { (person.first) " " (person.middle) " " (person.last) br; code { (c.dbusa_id) } }
                                        td { (place(person)) }
                                        td { (person.email) }
                                        td { (person.birth_year) }
                                    },
                                    None => { td .person { code { (c.dbusa_id) } } td {} td {} td {} },
                                }
                                td .score { (format!("{:.2}", c.score)) }
                                @for f in Field::ALL {
                                    @let (level, weight) = level_of(c, f);
                                    td class=(format!("level level-{}", level.name())) title=(format!("{weight:+.2}")) {
                                        (level.name()) @if level != Level::Missing { " " small { (format!("{weight:+.1}")) } }
                                    }
                                }
                            }
                        }
                    }
                }
                div .actions {
                    form #none method="post" action=(decide) {
                        input type="hidden" name="csrf" value=(session.csrf);
                        input type="hidden" name="choice" value="none";
                        button type="submit" title="None of these (key 0)" { kbd { "0" } " None of these" }
                    }
                    form #skip method="post" action=(skip) {
                        input type="hidden" name="csrf" value=(session.csrf);
                        button type="submit" title="Decide later (key n)" { kbd { "n" } " Skip" }
                    }
                }
            }
        },
    )
}

/// The fields of the identity forms.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct IdentityForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    choice: String,
}

/// `POST /identity/{row}/decide`: the person (one of the candidates shown)
/// or `none`.
pub(crate) async fn decide(
    State(app): State<AppState>,
    Reviewer(session): Reviewer,
    Path(row): Path<String>,
    form: Result<Form<IdentityForm>, FormRejection>,
) -> Response {
    let form = form.map(|f| f.0).unwrap_or_default();
    if !app.auth.csrf_ok(&session, &form.csrf) {
        return super::decide::forbidden(Some(&session));
    }
    if let Some(holder) = app
        .leases
        .holder_other_than(&lease_key(&row), &session.user)
    {
        return problem(
            &session,
            StatusCode::CONFLICT,
            "Profile in review",
            &format!("{holder} is reviewing this profile; nothing was saved."),
        );
    }
    let item = match read(&app, &row).await {
        Ok(Some(item)) => item,
        Ok(None) => {
            return problem(
                &session,
                StatusCode::NOT_FOUND,
                "No such profile",
                "No decision is stored for this profile.",
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read a handle to decide on.");
            return problem(
                &session,
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                "The handles table did not answer; nothing was saved. Submit again in a moment.",
            );
        }
    };
    let choice = form.choice.trim();
    let chosen = match choice {
        "none" => None,
        id if item.top.iter().any(|c| c.dbusa_id == id) => Some(id.to_owned()),
        _ => {
            return problem(
                &session,
                StatusCode::BAD_REQUEST,
                "Not a candidate",
                "Pick one of the people shown, or none of these.",
            )
        }
    };
    let at_ms = crate::now_ms();
    let best = chosen
        .as_deref()
        .and_then(|id| item.top.iter().find(|c| c.dbusa_id == id))
        .or(item.top.first());
    let outcome = Outcome {
        dbusa_id: chosen.clone(),
        score: best.map(|c| c.score),
        probability: item.probability,
        runner_up: None,
        reason: Reason::Reviewed,
        method: "review".to_owned(),
        enrichment: crate::matching::matcher::Enriched::NotCalled,
        candidates: item.top.len(),
        best: best.map(|c| c.dbusa_id.clone()),
        evidence: best.map(|c| c.evidence.clone()).unwrap_or_default(),
        top: item.top.clone(),
        candidate_ids: Vec::new(),
    };
    let decided = Decided {
        profile: item.profile.clone(),
        outcome,
        at_ms,
    };
    let review = RowPut::new(item.row.clone())
        .cell(HANDLES_FAMILY, columns::REVIEWED_BY, session.user.clone())
        .cell(HANDLES_FAMILY, columns::REVIEWED_AT, at_ms.to_string())
        .cell(
            HANDLES_FAMILY,
            columns::REVIEW,
            chosen.clone().unwrap_or_else(|| "none".to_owned()),
        );
    let written = async {
        sink::write(&app.table, &app.cache, std::slice::from_ref(&decided), None).await?;
        app.table.put(HANDLES, vec![review]).await?;
        app.log
            .produce(crate::envelope::topics::MATCHES, vec![decided.record()])
            .await?;
        Ok::<_, crate::Error>(())
    };
    if let Err(e) = written.await {
        tracing::warn!(error = %e, "Cannot store an identity decision.");
        return problem(
            &session,
            StatusCode::SERVICE_UNAVAILABLE,
            "Not saved",
            "The decision could not be stored. Submit it again in a moment.",
        );
    }
    app.identities.decided(&item.row);
    app.leases.release(&lease_key(&item.row), &session.user);
    crate::metrics::global().review_decided(if chosen.is_some() {
        "identity_person"
    } else {
        "identity_none"
    });
    tracing::debug!(
        row = item.row,
        choice,
        reviewer = session.user,
        "Identity decision stored."
    );
    Redirect::to("/identities/next").into_response()
}

/// `POST /identity/{row}/skip`.
pub(crate) async fn skip(
    State(app): State<AppState>,
    Reviewer(session): Reviewer,
    Path(row): Path<String>,
    form: Result<Form<IdentityForm>, FormRejection>,
) -> Response {
    let form = form.map(|f| f.0).unwrap_or_default();
    if !app.auth.csrf_ok(&session, &form.csrf) {
        return super::decide::forbidden(Some(&session));
    }
    let key = lease_key(&row);
    app.leases.release(&key, &session.user);
    app.leases.skip(&session.id, &key);
    Redirect::to("/identities/next").into_response()
}

/// `GET` of a form's target: back to the profile.
pub(crate) async fn back(Reviewer(_): Reviewer, Path(row): Path<String>) -> Response {
    Redirect::to(&identity_path(&row)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(reason: &str, probability: Option<f64>) -> Item {
        Item {
            row: "twitter:x".into(),
            profile: ProfileIn::default(),
            reason: reason.into(),
            probability,
            dbusa_id: None,
            top: vec![CandidateScore {
                dbusa_id: "DB1".into(),
                score: 20.0,
                evidence: Vec::new(),
                person: None,
            }],
            reviewed_by: None,
            review: None,
        }
    }

    #[test]
    fn uncertain_decisions_are_ambiguous_or_near_the_threshold() {
        assert!(item("ambiguous", Some(0.999)).uncertain());
        assert!(item("matched", Some(0.7)).uncertain());
        assert!(item("below_threshold", Some(0.2)).uncertain());
        assert!(!item("matched", Some(0.99)).uncertain());
        assert!(!item("below_threshold", Some(0.01)).uncertain());
        assert!(!item("relative", Some(0.5)).uncertain());
        let mut reviewed = item("ambiguous", None);
        reviewed.reviewed_by = Some("alice".into());
        assert!(!reviewed.uncertain());
        let mut empty = item("ambiguous", None);
        empty.top.clear();
        assert!(!empty.uncertain(), "nothing to pick from");
    }
}
