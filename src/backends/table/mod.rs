//! The wide-column table, in HBase's model: table → row key → `family:qualifier`
//! → value with a timestamp. sift keeps one version per cell: a write with an
//! older timestamp than the stored cell is ignored, as HBase would return the
//! newer one, so replaying a write is idempotent.
//!
//! Production uses HBase through its Thrift gateway; the embedded default is a
//! `redb` database file.

pub mod embedded;
#[cfg(feature = "hbase")]
pub mod hbase;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

pub use embedded::EmbeddedTable;

/// Errors of the table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The table has not been created.
    #[error("table `{0}` does not exist; it is created with its column families on first use by the daemon that owns it")]
    NoSuchTable(String),
    /// A write names a column family the table lacks.
    #[error("table `{table}` has no column family `{family}` (it has: {known})")]
    NoSuchFamily {
        /// Table.
        table: String,
        /// Family asked for.
        family: String,
        /// Families the table has.
        known: String,
    },
    /// A table, family or row name is not usable.
    #[error("invalid {what} `{value}`: {reason}")]
    Invalid {
        /// What kind of name.
        what: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// Another process has the embedded table open.
    #[error("the table store at {path} is in use by another sift process; stop it or use another --data-dir")]
    Locked {
        /// Database file.
        path: String,
    },
    /// The storage engine failed.
    #[error("table storage error: {0}")]
    Storage(String),
    /// The table server failed or could not be reached.
    #[error("table backend error: {0}")]
    Backend(String),
    /// The backend was configured but this build lacks its feature.
    #[error("table backend `{backend}` is not available in this build: rebuild sift with `--features {feature}`")]
    FeatureDisabled {
        /// Configured backend.
        backend: &'static str,
        /// Cargo feature that provides it.
        feature: &'static str,
    },
}

/// One cell to write.
#[derive(Debug, Clone, PartialEq)]
pub struct CellPut {
    /// Column family (must exist in the table).
    pub family: String,
    /// Column qualifier.
    pub qualifier: Bytes,
    /// Value.
    pub value: Bytes,
    /// Version timestamp in ms; None = now.
    pub timestamp_ms: Option<i64>,
}

/// Cells to write to one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPut {
    /// Row key.
    pub row: Bytes,
    /// Cells.
    pub cells: Vec<CellPut>,
}

impl RowPut {
    /// An empty put for `row`.
    pub fn new(row: impl Into<Bytes>) -> Self {
        RowPut {
            row: row.into(),
            cells: Vec::new(),
        }
    }

    /// Adds a cell stamped now.
    pub fn cell(
        mut self,
        family: &str,
        qualifier: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Self {
        self.cells.push(CellPut {
            family: family.to_string(),
            qualifier: qualifier.into(),
            value: value.into(),
            timestamp_ms: None,
        });
        self
    }

    /// Adds a cell with an explicit version timestamp.
    pub fn cell_at(
        mut self,
        family: &str,
        qualifier: impl Into<Bytes>,
        value: impl Into<Bytes>,
        timestamp_ms: i64,
    ) -> Self {
        self.cells.push(CellPut {
            family: family.to_string(),
            qualifier: qualifier.into(),
            value: value.into(),
            timestamp_ms: Some(timestamp_ms),
        });
        self
    }
}

/// A stored cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// Column family.
    pub family: String,
    /// Column qualifier.
    #[serde(serialize_with = "lossy")]
    pub qualifier: Bytes,
    /// Value.
    #[serde(serialize_with = "lossy")]
    pub value: Bytes,
    /// Version timestamp, ms since the Unix epoch.
    pub timestamp_ms: i64,
}

/// A row: its key and its cells sorted by family, then qualifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Row key.
    #[serde(serialize_with = "lossy")]
    pub key: Bytes,
    /// Cells.
    pub cells: Vec<Cell>,
}

impl Row {
    /// The value of `family:qualifier`, if present.
    pub fn get(&self, family: &str, qualifier: &[u8]) -> Option<&Bytes> {
        self.cells
            .iter()
            .find(|c| c.family == family && c.qualifier == qualifier)
            .map(|c| &c.value)
    }
}

fn lossy<S: serde::Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

/// Which rows a scan returns: `start <= key < stop`, keys starting with
/// `prefix`, at most `limit`, in key order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    /// First row key (inclusive); None = from the beginning (or the prefix).
    pub start: Option<Bytes>,
    /// Row key to stop before (exclusive); None = to the end (of the prefix).
    pub stop: Option<Bytes>,
    /// Only rows whose key starts with this.
    pub prefix: Option<Bytes>,
    /// Only these families; None = all.
    pub families: Option<Vec<String>>,
    /// At most this many rows; 0 = no limit.
    pub limit: usize,
}

/// Which cells a delete removes.
#[derive(Debug, Clone, PartialEq)]
pub enum Delete {
    /// The whole row.
    Row,
    /// Every cell of these families.
    Families(Vec<String>),
    /// These `(family, qualifier)` cells.
    Cells(Vec<(String, Bytes)>),
}

/// A wide-column table backend.
#[async_trait]
pub trait Table: Send + Sync + 'static {
    /// Creates a table with these column families if missing, and adds missing families.
    async fn ensure_table(&self, table: &str, families: &[&str]) -> Result<(), TableError>;
    /// Tables and their families, sorted.
    async fn list_tables(&self) -> Result<Vec<(String, Vec<String>)>, TableError>;
    /// Writes cells to many rows in one batch: all of it or, on error, none of it.
    async fn put(&self, table: &str, rows: Vec<RowPut>) -> Result<(), TableError>;
    /// One row, optionally only some families; None if it has no cells.
    async fn get(
        &self,
        table: &str,
        row: &[u8],
        families: Option<&[String]>,
    ) -> Result<Option<Row>, TableError>;
    /// Rows in key order within a range or prefix.
    async fn scan(&self, table: &str, scan: &Scan) -> Result<Vec<Row>, TableError>;
    /// Deletes a row or some of its cells.
    async fn delete(&self, table: &str, row: &[u8], what: Delete) -> Result<(), TableError>;
}

/// Reads every row of `table` (only `families`; all when None) in key
/// order, `page` rows per scan, calling `each` on every row.
pub async fn scan_pages(
    store: &dyn Table,
    table: &str,
    families: Option<&[&str]>,
    page: usize,
    mut each: impl FnMut(&Row),
) -> Result<(), TableError> {
    let page = page.max(1);
    let families: Option<Vec<String>> =
        families.map(|f| f.iter().map(|s| (*s).to_owned()).collect());
    let mut start: Option<Bytes> = None;
    loop {
        let rows = store
            .scan(
                table,
                &Scan {
                    start: start.clone(),
                    families: families.clone(),
                    limit: page,
                    ..Scan::default()
                },
            )
            .await?;
        rows.iter().for_each(&mut each);
        match rows.last() {
            // The next key after `last`: the same bytes and a zero byte.
            Some(last) if rows.len() == page => {
                let mut next = last.key.to_vec();
                next.push(0);
                start = Some(Bytes::from(next));
            }
            _ => return Ok(()),
        }
    }
}

/// Checks a table or family name (HBase's rules, narrowed to what both backends accept).
pub fn validate_name(what: &'static str, name: &str) -> Result<(), TableError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(TableError::Invalid {
            what,
            value: name.to_string(),
            reason:
                "use 1-200 characters of a-z, A-Z, 0-9, `_`, `-` and `.`, not starting with `.`",
        })
    }
}

/// The smallest key greater than every key starting with `prefix`, if any.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The key range `[lower, upper)` a scan covers, or None when it is empty.
pub(crate) fn scan_range(scan: &Scan) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let mut lower: Vec<u8> = scan.start.as_deref().unwrap_or_default().to_vec();
    let mut upper: Option<Vec<u8>> = scan.stop.as_ref().map(|s| s.to_vec());
    if let Some(p) = &scan.prefix {
        if p.as_ref() > lower.as_slice() {
            lower = p.to_vec();
        }
        if let Some(end) = prefix_end(p) {
            upper = Some(match upper {
                Some(u) if u < end => u,
                _ => end,
            });
        }
    }
    match &upper {
        Some(u) if *u <= lower => None,
        _ => Some((lower, upper)),
    }
}
