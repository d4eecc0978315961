//! The embedded table: a `redb` database file. Each sift table is a redb table
//! mapping the row key to the row's encoded cells; a batch put is one redb
//! write transaction, committed with fsync before `put` returns.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use parking_lot::RwLock;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{validate_name, Cell, Delete, Row, RowPut, Scan, TableError};

const META: TableDefinition<&str, &str> = TableDefinition::new("~meta");

fn data_def(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

fn storage(e: impl std::fmt::Display) -> TableError {
    TableError::Storage(e.to_string())
}

/// The embedded table store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedTable {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Table name to its families, mirrored from `~meta`.
    families: RwLock<HashMap<String, Vec<String>>>,
}

impl EmbeddedTable {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Self, TableError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(storage)?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => TableError::Locked {
                path: path.display().to_string(),
            },
            e => TableError::Storage(format!("opening {}: {e}", path.display())),
        })?;
        let mut families = HashMap::new();
        let txn = db.begin_read().map_err(storage)?;
        match txn.open_table(META) {
            Ok(meta) => {
                for entry in meta.iter().map_err(storage)? {
                    let (k, v) = entry.map_err(storage)?;
                    families.insert(
                        k.value().to_string(),
                        v.value().split(',').map(str::to_string).collect(),
                    );
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(storage(e)),
        }
        drop(txn);
        Ok(EmbeddedTable {
            inner: Arc::new(Inner {
                db,
                families: RwLock::new(families),
            }),
        })
    }
}

fn encode_row(cells: &[Cell]) -> Vec<u8> {
    let size: usize = cells
        .iter()
        .map(|c| 2 + c.family.len() + 4 + c.qualifier.len() + 8 + 4 + c.value.len())
        .sum();
    let mut buf = Vec::with_capacity(4 + size);
    buf.extend_from_slice(&(cells.len() as u32).to_be_bytes());
    for c in cells {
        buf.extend_from_slice(&(c.family.len() as u16).to_be_bytes());
        buf.extend_from_slice(c.family.as_bytes());
        buf.extend_from_slice(&(c.qualifier.len() as u32).to_be_bytes());
        buf.extend_from_slice(&c.qualifier);
        buf.extend_from_slice(&c.timestamp_ms.to_be_bytes());
        buf.extend_from_slice(&(c.value.len() as u32).to_be_bytes());
        buf.extend_from_slice(&c.value);
    }
    buf
}

fn decode_row(mut b: &[u8]) -> Result<Vec<Cell>, TableError> {
    let bad = || TableError::Storage("a stored row is malformed".into());
    let take = |b: &mut &[u8], n: usize| -> Result<Bytes, TableError> {
        if b.len() < n {
            return Err(bad());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(Bytes::copy_from_slice(head))
    };
    if b.len() < 4 {
        return Err(bad());
    }
    let count = b.get_u32() as usize;
    let mut cells = Vec::with_capacity(count);
    for _ in 0..count {
        if b.len() < 2 {
            return Err(bad());
        }
        let n = b.get_u16() as usize;
        let family = String::from_utf8_lossy(&take(&mut b, n)?).into_owned();
        if b.len() < 4 {
            return Err(bad());
        }
        let n = b.get_u32() as usize;
        let qualifier = take(&mut b, n)?;
        if b.len() < 12 {
            return Err(bad());
        }
        let timestamp_ms = b.get_i64();
        let n = b.get_u32() as usize;
        let value = take(&mut b, n)?;
        cells.push(Cell {
            family,
            qualifier,
            value,
            timestamp_ms,
        });
    }
    Ok(cells)
}

fn keep_families(cells: Vec<Cell>, families: Option<&[String]>) -> Vec<Cell> {
    match families {
        None => cells,
        Some(f) => cells
            .into_iter()
            .filter(|c| f.contains(&c.family))
            .collect(),
    }
}

impl Inner {
    fn check_table(&self, table: &str) -> Result<Vec<String>, TableError> {
        self.families
            .read()
            .get(table)
            .cloned()
            .ok_or_else(|| TableError::NoSuchTable(table.to_string()))
    }

    fn ensure_table(&self, table: &str, families: &[&str]) -> Result<(), TableError> {
        validate_name("table name", table)?;
        for f in families {
            validate_name("column family", f)?;
        }
        let mut known = self.families.write();
        let mut all: Vec<String> = known.get(table).cloned().unwrap_or_default();
        let before = all.len();
        let existed = known.contains_key(table);
        for f in families {
            if !all.iter().any(|k| k == f) {
                all.push(f.to_string());
            }
        }
        if existed && all.len() == before {
            return Ok(());
        }
        all.sort();
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert(table, all.join(",").as_str())
                .map_err(storage)?;
            txn.open_table(data_def(table)).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        tracing::info!(table, families = %all.join(","), "Created or extended table.");
        known.insert(table.to_string(), all);
        Ok(())
    }

    fn put(&self, table: &str, rows: Vec<RowPut>) -> Result<(), TableError> {
        let families = self.check_table(table)?;
        let mut cells_written = 0u64;
        for r in &rows {
            if r.row.is_empty() {
                return Err(TableError::Invalid {
                    what: "row key",
                    value: String::new(),
                    reason: "row keys may not be empty",
                });
            }
            for c in &r.cells {
                if !families.contains(&c.family) {
                    return Err(TableError::NoSuchFamily {
                        table: table.to_string(),
                        family: c.family.clone(),
                        known: families.join(", "),
                    });
                }
            }
        }
        let now = crate::now_ms();
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut t = txn.open_table(data_def(table)).map_err(storage)?;
            for r in rows {
                if r.cells.is_empty() {
                    continue;
                }
                let mut cells = match t.get(r.row.as_ref()).map_err(storage)? {
                    Some(v) => decode_row(v.value())?,
                    None => Vec::new(),
                };
                for c in r.cells {
                    let ts = c.timestamp_ms.unwrap_or(now);
                    cells_written += 1;
                    let found = cells.binary_search_by(|e| {
                        (e.family.as_str(), e.qualifier.as_ref())
                            .cmp(&(c.family.as_str(), c.qualifier.as_ref()))
                    });
                    let new = Cell {
                        family: c.family,
                        qualifier: c.qualifier,
                        value: c.value,
                        timestamp_ms: ts,
                    };
                    match found {
                        Ok(i) if cells[i].timestamp_ms > ts => {}
                        Ok(i) => cells[i] = new,
                        Err(i) => cells.insert(i, new),
                    }
                }
                t.insert(r.row.as_ref(), encode_row(&cells).as_slice())
                    .map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        crate::metrics::global()
            .table_cells_written
            .inc_by(cells_written);
        Ok(())
    }

    fn get(
        &self,
        table: &str,
        row: &[u8],
        families: Option<&[String]>,
    ) -> Result<Option<Row>, TableError> {
        self.check_table(table)?;
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(data_def(table)).map_err(storage)?;
        let Some(v) = t.get(row).map_err(storage)? else {
            return Ok(None);
        };
        let cells = keep_families(decode_row(v.value())?, families);
        Ok((!cells.is_empty()).then(|| Row {
            key: Bytes::copy_from_slice(row),
            cells,
        }))
    }

    fn scan(&self, table: &str, scan: &Scan) -> Result<Vec<Row>, TableError> {
        self.check_table(table)?;
        let Some((lower, upper)) = super::scan_range(scan) else {
            return Ok(Vec::new());
        };
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(data_def(table)).map_err(storage)?;
        let range = (
            Bound::Included(lower.as_slice()),
            match &upper {
                Some(u) => Bound::Excluded(u.as_slice()),
                None => Bound::Unbounded,
            },
        );
        let mut out = Vec::new();
        for entry in t.range::<&[u8]>(range).map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            let cells = keep_families(decode_row(v.value())?, scan.families.as_deref());
            if cells.is_empty() {
                continue;
            }
            out.push(Row {
                key: Bytes::copy_from_slice(k.value()),
                cells,
            });
            if scan.limit > 0 && out.len() >= scan.limit {
                break;
            }
        }
        Ok(out)
    }

    fn delete(&self, table: &str, row: &[u8], what: Delete) -> Result<(), TableError> {
        self.check_table(table)?;
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut t = txn.open_table(data_def(table)).map_err(storage)?;
            let existing = match t.get(row).map_err(storage)? {
                Some(v) => decode_row(v.value())?,
                None => return Ok(()),
            };
            let kept: Vec<Cell> = match what {
                Delete::Row => Vec::new(),
                Delete::Families(f) => existing
                    .into_iter()
                    .filter(|c| !f.contains(&c.family))
                    .collect(),
                Delete::Cells(cs) => existing
                    .into_iter()
                    .filter(|c| !cs.iter().any(|(f, q)| *f == c.family && *q == c.qualifier))
                    .collect(),
            };
            if kept.is_empty() {
                t.remove(row).map_err(storage)?;
            } else {
                t.insert(row, encode_row(&kept).as_slice())
                    .map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TableError> + Send + 'static,
) -> Result<T, TableError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TableError::Storage(format!("table worker failed: {e}")))?
}

#[async_trait]
impl super::Table for EmbeddedTable {
    async fn ensure_table(&self, table: &str, families: &[&str]) -> Result<(), TableError> {
        let inner = self.inner.clone();
        let table = table.to_string();
        let families: Vec<String> = families.iter().map(|f| f.to_string()).collect();
        blocking(move || {
            let f: Vec<&str> = families.iter().map(String::as_str).collect();
            inner.ensure_table(&table, &f)
        })
        .await
    }

    async fn list_tables(&self) -> Result<Vec<(String, Vec<String>)>, TableError> {
        let mut out: Vec<(String, Vec<String>)> = self
            .inner
            .families
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn put(&self, table: &str, rows: Vec<RowPut>) -> Result<(), TableError> {
        let inner = self.inner.clone();
        let table = table.to_string();
        blocking(move || inner.put(&table, rows)).await
    }

    async fn get(
        &self,
        table: &str,
        row: &[u8],
        families: Option<&[String]>,
    ) -> Result<Option<Row>, TableError> {
        let inner = self.inner.clone();
        let (table, row) = (table.to_string(), row.to_vec());
        let families = families.map(<[String]>::to_vec);
        blocking(move || inner.get(&table, &row, families.as_deref())).await
    }

    async fn scan(&self, table: &str, scan: &Scan) -> Result<Vec<Row>, TableError> {
        let inner = self.inner.clone();
        let (table, scan) = (table.to_string(), scan.clone());
        blocking(move || inner.scan(&table, &scan)).await
    }

    async fn delete(&self, table: &str, row: &[u8], what: Delete) -> Result<(), TableError> {
        let inner = self.inner.clone();
        let (table, row) = (table.to_string(), row.to_vec());
        blocking(move || inner.delete(&table, &row, what)).await
    }
}
