//! `sift cache refresh`: rebuilds each network's cache namespace from the
//! `handles` table. The table is read in pages; each network's entries are
//! then swapped in with one `replace_namespace`, so a reader sees the old
//! namespace whole or the new one whole, never a half-built one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::sink::{columns, namespace, HANDLES, HANDLES_FAMILY};
use crate::backends::{Cache, Table};

/// Rows read per scan page.
const PAGE: usize = 10_000;

/// What a refresh did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Refreshed {
    /// Rows of `handles` read.
    pub rows: u64,
    /// Entries written, per network.
    pub entries: BTreeMap<String, u64>,
    /// Seconds.
    pub seconds: f64,
}

/// Rebuilds every network's namespace from `handles`. Networks whose
/// handles are all unmatched get an empty namespace.
pub async fn refresh(
    table: &Arc<dyn Table>,
    cache: &Arc<dyn Cache>,
    ttl: Option<Duration>,
) -> crate::Result<Refreshed> {
    let started = Instant::now();
    table.ensure_table(HANDLES, &[HANDLES_FAMILY]).await?;
    let mut by_network: BTreeMap<String, Vec<(String, Bytes)>> = BTreeMap::new();
    let mut rows = 0u64;
    crate::backends::table::scan_pages(
        table.as_ref(),
        HANDLES,
        Some(&[HANDLES_FAMILY]),
        PAGE,
        |row| {
            rows += 1;
            let key = String::from_utf8_lossy(&row.key);
            let Some((network, handle)) = key.split_once(':') else {
                return;
            };
            let entries = by_network.entry(network.to_owned()).or_default();
            if let Some(id) = row
                .get(HANDLES_FAMILY, columns::DBUSA_ID.as_bytes())
                .filter(|v| !v.is_empty())
            {
                entries.push((handle.to_owned(), id.clone()));
            }
        },
    )
    .await?;
    let metrics = crate::metrics::global();
    let mut entries = BTreeMap::new();
    for (network, list) in by_network {
        let n = list.len() as u64;
        cache
            .replace_namespace(&namespace(&network), list, ttl)
            .await?;
        metrics
            .cache_refresh_entries
            .get_or_create(&crate::metrics::StageLabel {
                stage: network.clone(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        entries.insert(network, n);
    }
    Ok(Refreshed {
        rows,
        entries,
        seconds: started.elapsed().as_secs_f64(),
    })
}
