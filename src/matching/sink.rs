//! Where a decision goes: the cache (namespace `handles.{network}`, key the
//! handle, value the person's id), the table `handles` (row
//! `network:handle`, family `m`), the table `identities` (row the person's
//! id, family `h`, one column per network holding the handle) and the topic
//! `sift.matches`. Every write is keyed, so writing a decision again
//! (after a crash, before the commit) rewrites the same cells.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::matcher::{Outcome, ProfileIn};
use crate::backends::log::Record;
use crate::backends::table::{Delete, RowPut};
use crate::backends::{Cache, Table};

/// Table of handles: row `network:handle`.
pub const HANDLES: &str = "handles";
/// Family of [`HANDLES`].
pub const HANDLES_FAMILY: &str = "m";
/// Table of identities: row dbusa id.
pub const IDENTITIES: &str = "identities";
/// Family of [`IDENTITIES`]: one column per network.
pub const IDENTITIES_FAMILY: &str = "h";

/// Columns of a `handles` row.
pub mod columns {
    /// The matched person's id (empty when unmatched).
    pub const DBUSA_ID: &str = "dbusa_id";
    /// Score of the best candidate.
    pub const SCORE: &str = "score";
    /// `search` or `enrichment+search`.
    pub const METHOD: &str = "method";
    /// Why matched or not.
    pub const REASON: &str = "reason";
    /// Milliseconds since the Unix epoch.
    pub const MATCHED_AT: &str = "matched_at_ms";
    /// Per-field evidence, JSON.
    pub const EVIDENCE: &str = "evidence";
    /// The best candidates with their scores and levels, JSON (absent when
    /// the search returned none).
    pub const TOP: &str = "top";
    /// The profile's id in its source, when it had one.
    pub const PROFILE_ID: &str = "profile_id";
    /// The profile as matched (network, handle, name, location, email,
    /// phone), JSON: what a reviewer sees, and a label for `sift match fit`
    /// once reviewed.
    pub const PROFILE: &str = "profile";
    /// The best candidate's match probability.
    pub const PROBABILITY: &str = "probability";
    /// Who reviewed the decision (absent until someone does). A reviewed
    /// row is the reviewer's: the matcher does not overwrite it.
    pub const REVIEWED_BY: &str = "reviewed_by";
    /// When, ms since the Unix epoch.
    pub const REVIEWED_AT: &str = "reviewed_at_ms";
    /// What the reviewer chose: a person's id, or `none`.
    pub const REVIEW: &str = "review";
}

/// Creates the tables decisions are written to (`handles`, `identities`).
pub async fn ensure_tables(table: &dyn Table) -> crate::Result<()> {
    table.ensure_table(HANDLES, &[HANDLES_FAMILY]).await?;
    table.ensure_table(IDENTITIES, &[IDENTITIES_FAMILY]).await?;
    Ok(())
}

/// The cache namespace of a network.
pub fn namespace(network: &str) -> String {
    format!("handles.{network}")
}

/// The row key of a handle.
pub fn handle_row(network: &str, handle: &str) -> String {
    format!("{network}:{handle}")
}

/// A record of `sift.matches`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchRecord {
    /// Schema version.
    pub v: u32,
    /// The profile's id, when it had one.
    pub id: Option<String>,
    /// Network (lower case).
    pub network: String,
    /// Handle (lower case, no `@`).
    pub handle: String,
    /// The decision.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// When it was decided, ms since the Unix epoch.
    pub matched_at_ms: i64,
}

/// A decision ready to write.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The profile.
    pub profile: ProfileIn,
    /// Its outcome.
    pub outcome: Outcome,
    /// When.
    pub at_ms: i64,
}

impl Decided {
    /// The `sift.matches` record.
    pub fn record(&self) -> Record {
        let (network, handle) = self.profile.key();
        let value = MatchRecord {
            v: 1,
            id: self.profile.id.clone(),
            network: network.clone(),
            handle: handle.clone(),
            outcome: self.outcome.clone(),
            matched_at_ms: self.at_ms,
        };
        Record::new(
            handle_row(&network, &handle),
            serde_json::to_vec(&value).unwrap_or_default(),
        )
    }

    /// The `handles` row.
    pub fn handle_row(&self) -> RowPut {
        let (network, handle) = self.profile.key();
        let o = &self.outcome;
        let f = HANDLES_FAMILY;
        let mut row = RowPut::new(handle_row(&network, &handle))
            .cell(f, columns::DBUSA_ID, o.dbusa_id.clone().unwrap_or_default())
            .cell(f, columns::REASON, o.reason.name())
            .cell(f, columns::METHOD, o.method.clone())
            .cell(f, columns::MATCHED_AT, self.at_ms.to_string())
            .cell(
                f,
                columns::SCORE,
                o.score.map(|s| s.to_string()).unwrap_or_default(),
            )
            .cell(
                f,
                columns::EVIDENCE,
                serde_json::to_vec(&o.evidence).unwrap_or_default(),
            );
        if !o.top.is_empty() {
            row = row.cell(
                f,
                columns::TOP,
                serde_json::to_vec(&o.top).unwrap_or_default(),
            );
        }
        if let Some(id) = &self.profile.id {
            row = row.cell(f, columns::PROFILE_ID, id.clone());
        }
        if let Some(p) = o.probability {
            row = row.cell(f, columns::PROBABILITY, p.to_string());
        }
        row.cell(
            f,
            columns::PROFILE,
            serde_json::to_vec(&self.profile).unwrap_or_default(),
        )
    }
}

/// Writes decisions to the tables and the cache (the caller produces the
/// records). A handle that moves to another person is removed from the
/// old person's identity row first.
pub async fn write(
    table: &Arc<dyn Table>,
    cache: &Arc<dyn Cache>,
    decided: &[Decided],
    cache_ttl: Option<std::time::Duration>,
) -> crate::Result<()> {
    let mut handles = Vec::with_capacity(decided.len());
    let mut identities = Vec::new();
    for d in decided {
        let (network, handle) = d.profile.key();
        let row = handle_row(&network, &handle);
        let stored = table.get(HANDLES, row.as_bytes(), None).await?;
        let reviewed = stored.as_ref().is_some_and(|r| {
            r.get(HANDLES_FAMILY, columns::REVIEWED_BY.as_bytes())
                .is_some()
        });
        if reviewed && d.outcome.reason != super::matcher::Reason::Reviewed {
            // A person decided this handle; the machine does not overrule them.
            tracing::debug!(row, "Kept the reviewed decision of a handle matched again.");
            continue;
        }
        let previous = stored
            .and_then(|r| r.get(HANDLES_FAMILY, columns::DBUSA_ID.as_bytes()).cloned())
            .filter(|v| !v.is_empty());
        if let Some(prev) = previous {
            if d.outcome.dbusa_id.as_deref().map(str::as_bytes) != Some(prev.as_ref()) {
                // Only if that person's column still names this handle.
                let holds = table
                    .get(IDENTITIES, &prev, None)
                    .await?
                    .and_then(|r| r.get(IDENTITIES_FAMILY, network.as_bytes()).cloned())
                    .is_some_and(|h| h.as_ref() == handle.as_bytes());
                if holds {
                    table
                        .delete(
                            IDENTITIES,
                            &prev,
                            Delete::Cells(vec![(
                                IDENTITIES_FAMILY.to_owned(),
                                Bytes::from(network.clone()),
                            )]),
                        )
                        .await?;
                }
                if d.outcome.dbusa_id.is_none() {
                    cache.delete(&namespace(&network), &handle).await?;
                }
            }
        }
        handles.push(d.handle_row());
        if let Some(id) = &d.outcome.dbusa_id {
            identities.push(RowPut::new(id.clone()).cell(
                IDENTITIES_FAMILY,
                network.clone(),
                handle.clone(),
            ));
        }
    }
    let written: std::collections::HashSet<Bytes> = handles.iter().map(|h| h.row.clone()).collect();
    table.put(HANDLES, handles).await?;
    if !identities.is_empty() {
        table.put(IDENTITIES, identities).await?;
    }
    for d in decided {
        if let Some(id) = &d.outcome.dbusa_id {
            let (network, handle) = d.profile.key();
            let row = handle_row(&network, &handle);
            if !written.contains(row.as_bytes()) {
                continue;
            }
            cache
                .set(
                    &namespace(&network),
                    &handle,
                    Bytes::from(id.clone()),
                    cache_ttl,
                )
                .await?;
        }
    }
    Ok(())
}
