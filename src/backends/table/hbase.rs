//! The table on HBase, through its Thrift1 gateway (`hbase thrift start`:
//! binary protocol, buffered transport).
//!
//! A generated Thrift client is a blocking, stateful object that one caller
//! uses at a time, so this backend keeps a small pool of them: a call waits
//! (asynchronously) for one of `pool_size` slots, takes an idle connection or
//! opens a new one, and runs on a blocking thread. A connection that failed at
//! the transport level is dropped, never put back: its stream may be half-read.
//! When the gateway restarts, every idle connection is dead, so a transport
//! failure on a reused connection is retried once on a fresh one; a timeout is
//! not retried, so a call never waits much longer than `timeout`.
//!
//! Mapping the trait onto HBase:
//! - families are created with one version, so a cell has one value and the
//!   highest timestamp wins, whatever order writes arrive in;
//! - a put validates everything first (table, families, keys), then writes
//!   with `mutateRowsTs`, one call per distinct timestamp; cells without one
//!   share a client-side "now" taken once per batch. HBase is atomic per row
//!   and per call only: a batch that fails on the server part-way (server
//!   down) may be partly written. Writes are idempotent, so the caller's
//!   retry of the whole batch completes it;
//! - the Thrift1 gateway has no call to alter a table, so `ensure_table` adds
//!   a missing family to an existing table through HBase's Thrift2 gateway
//!   (`admin_address`), whose `addColumnFamily` is one hand-encoded call (see
//!   `add_family`). Without one it says which shell command does it.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hbase_thrift::hbase::{
    AlreadyExists, BatchMutation, ColumnDescriptor, HbaseSyncClient, IOError, IllegalArgument,
    Mutation, THbaseSyncClient, TRowResult, TScan,
};
use parking_lot::{Mutex, RwLock};
use thrift::protocol::{TBinaryInputProtocol, TBinaryOutputProtocol};
use thrift::transport::{TBufferedReadTransport, TBufferedWriteTransport};
use thrift::{ApplicationErrorKind, TransportErrorKind};
use tokio::sync::Semaphore;

use super::{validate_name, Cell, Delete, Row, RowPut, Scan, TableError};
use crate::config::HbaseConfig;

/// Rows asked of the gateway per `scannerGetList`, and of the region server per
/// RPC: large enough to amortise round trips, small enough that a page of
/// multi-megabyte documents stays a modest message.
const SCAN_PAGE: usize = 256;

/// HBase's limit on a row key (`Short.MAX_VALUE`).
const MAX_ROW_KEY: usize = i16::MAX as usize;

type Client = HbaseSyncClient<
    TBinaryInputProtocol<TBufferedReadTransport<Socket>>,
    TBinaryOutputProtocol<TBufferedWriteTransport<Socket>>,
>;

/// One half of a gateway connection. A socket read timeout surfaces on Linux
/// as `WouldBlock`, which Thrift reports as an unknown transport error; this
/// turns it back into `TimedOut`, so a slow gateway is told apart from a dead
/// one (and not retried).
struct Socket(TcpStream);

fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "no answer within the timeout")
    } else {
        e
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(timed_out)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(timed_out)
    }
}

/// Why a gateway call did not return a value.
#[derive(Debug)]
enum Failure {
    /// No connection to the gateway could be opened.
    Connect(io::Error),
    /// A call failed (an HBase exception, or the connection broke).
    Call(thrift::Error),
}

impl From<thrift::Error> for Failure {
    fn from(e: thrift::Error) -> Self {
        Failure::Call(e)
    }
}

/// Whether the connection that produced `e` can be used again. HBase's declared
/// exceptions and the gateway's own failures arrive as complete replies; an I/O
/// or protocol error, or a reply out of sequence, may leave the stream
/// mid-message.
fn connection_ok(e: &thrift::Error) -> bool {
    match e {
        thrift::Error::User(_) => true,
        thrift::Error::Application(a) => !matches!(
            a.kind,
            ApplicationErrorKind::BadSequenceId
                | ApplicationErrorKind::WrongMethodName
                | ApplicationErrorKind::InvalidMessageType
                | ApplicationErrorKind::ProtocolError
        ),
        thrift::Error::Transport(_) | thrift::Error::Protocol(_) => false,
    }
}

/// Whether a call that failed with `e` on a connection taken from the pool is
/// worth one more try on a new connection: the connection was found dead
/// (most likely the gateway restarted since it was last used). A timeout is
/// not retried, so a call fails within about one `timeout`.
fn dead_connection(e: &thrift::Error) -> bool {
    match e {
        thrift::Error::Transport(t) => t.kind != TransportErrorKind::TimedOut,
        thrift::Error::Protocol(_) => true,
        thrift::Error::User(_) | thrift::Error::Application(_) => false,
    }
}

/// HBase's message of a declared exception, if `e` is one.
fn hbase_message(e: &thrift::Error) -> Option<&str> {
    let thrift::Error::User(u) = e else {
        return None;
    };
    if let Some(io) = u.downcast_ref::<IOError>() {
        io.message.as_deref()
    } else if let Some(ia) = u.downcast_ref::<IllegalArgument>() {
        ia.message.as_deref()
    } else if let Some(ae) = u.downcast_ref::<AlreadyExists>() {
        ae.message.as_deref()
    } else {
        None
    }
}

fn is_already_exists(e: &thrift::Error) -> bool {
    matches!(e, thrift::Error::User(u) if u.is::<AlreadyExists>())
}

/// The gateway sends Java stack traces: keep the first line (the exception and
/// its message), which is what a reader can act on.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default().trim();
    let mut out: String = line.chars().take(500).collect();
    if out.len() < line.len() {
        out.push('…');
    }
    out
}

/// A TCP connection to `address` with `timeout` on connect, read and write.
fn open_stream(address: &str, timeout: Duration) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = address.to_socket_addrs()?.collect();
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        "the address resolves to no IP address",
    );
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = timed_out(e),
        }
    }
    Err(last)
}

/// Adds `family` (one version) to `table` through the Thrift2 gateway at
/// `address`: `THBaseService.addColumnFamily(TTableName, TColumnFamilyDescriptor)
/// throws (1: TIOError)`, encoded by hand because the generated crate is
/// Thrift1 only. Blocking. HBase answers once the table is altered.
fn add_family(address: &str, timeout: Duration, table: &str, family: &str) -> thrift::Result<()> {
    use thrift::protocol::{
        TFieldIdentifier, TInputProtocol, TMessageIdentifier, TMessageType, TOutputProtocol,
        TStructIdentifier, TType,
    };
    let stream = open_stream(address, timeout)?;
    let mut o = TBinaryOutputProtocol::new(
        TBufferedWriteTransport::new(Socket(stream.try_clone()?)),
        true,
    );
    let mut i = TBinaryInputProtocol::new(TBufferedReadTransport::new(Socket(stream)), true);
    let field = |name: &str, ty, id| TFieldIdentifier::new(name, ty, id);
    o.write_message_begin(&TMessageIdentifier::new(
        "addColumnFamily",
        TMessageType::Call,
        1,
    ))?;
    o.write_struct_begin(&TStructIdentifier::new("addColumnFamily_args"))?;
    o.write_field_begin(&field("tableName", TType::Struct, 1))?;
    o.write_struct_begin(&TStructIdentifier::new("TTableName"))?;
    o.write_field_begin(&field("qualifier", TType::String, 2))?;
    o.write_bytes(table.as_bytes())?;
    o.write_field_end()?;
    o.write_field_stop()?;
    o.write_struct_end()?;
    o.write_field_end()?;
    o.write_field_begin(&field("column", TType::Struct, 2))?;
    o.write_struct_begin(&TStructIdentifier::new("TColumnFamilyDescriptor"))?;
    o.write_field_begin(&field("name", TType::String, 1))?;
    o.write_bytes(family.as_bytes())?;
    o.write_field_end()?;
    o.write_field_begin(&field("maxVersions", TType::I32, 10))?;
    o.write_i32(1)?;
    o.write_field_end()?;
    o.write_field_stop()?;
    o.write_struct_end()?;
    o.write_field_end()?;
    o.write_field_stop()?;
    o.write_struct_end()?;
    o.write_message_end()?;
    o.flush()?;

    let message = i.read_message_begin()?;
    if message.message_type == TMessageType::Exception {
        let e = thrift::Error::read_application_error_from_in_protocol(&mut i)?;
        i.read_message_end()?;
        return Err(thrift::Error::Application(e));
    }
    // addColumnFamily_result: void on success, or field 1, a TIOError
    // {1: optional string message, 2: optional bool canRetry}.
    let mut failure: Option<String> = None;
    i.read_struct_begin()?;
    loop {
        let f = i.read_field_begin()?;
        if f.field_type == TType::Stop {
            break;
        }
        if f.id == Some(1) && f.field_type == TType::Struct {
            let mut message = String::from("HBase gave no message");
            i.read_struct_begin()?;
            loop {
                let g = i.read_field_begin()?;
                if g.field_type == TType::Stop {
                    break;
                }
                if g.id == Some(1) && g.field_type == TType::String {
                    message = i.read_string()?;
                } else {
                    i.skip(g.field_type)?;
                }
                i.read_field_end()?;
            }
            i.read_struct_end()?;
            failure = Some(message);
        } else {
            i.skip(f.field_type)?;
        }
        i.read_field_end()?;
    }
    i.read_struct_end()?;
    i.read_message_end()?;
    match failure {
        None => Ok(()),
        Some(m) => Err(thrift::Error::User(Box::new(IOError {
            message: Some(m),
            can_retry: None,
        }))),
    }
}

/// `family:qualifier`, the gateway's column name.
fn column(family: &str, qualifier: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(family.len() + 1 + qualifier.len());
    c.extend_from_slice(family.as_bytes());
    c.push(b':');
    c.extend_from_slice(qualifier);
    c
}

/// Family names from `getColumnDescriptors`, which spells them `name:`.
fn family_names(descriptors: BTreeMap<Vec<u8>, ColumnDescriptor>) -> Vec<String> {
    let mut out: Vec<String> = descriptors
        .into_keys()
        .map(|k| {
            let name = k.strip_suffix(b":").unwrap_or(&k);
            String::from_utf8_lossy(name).into_owned()
        })
        .collect();
    out.sort();
    out
}

/// A family as sift creates it: one version (the trait keeps one value per
/// cell), block cache and row bloom filter on as in HBase's own defaults
/// (Thrift's struct defaults would turn the block cache off), kept forever.
fn descriptor(family: &str) -> ColumnDescriptor {
    ColumnDescriptor {
        name: Some(family.as_bytes().to_vec()),
        max_versions: Some(1),
        compression: Some("NONE".into()),
        in_memory: Some(false),
        bloom_filter_type: Some("ROW".into()),
        bloom_filter_vector_size: Some(0),
        bloom_filter_nb_hashes: Some(0),
        block_cache_enabled: Some(true),
        time_to_live: Some(i32::MAX),
    }
}

/// A gateway row as the trait's `Row`, cells sorted by family then qualifier.
fn to_row(r: TRowResult) -> Result<Row, TableError> {
    let key = r.row.ok_or_else(|| {
        TableError::Backend("the HBase gateway returned a row without a key".into())
    })?;
    let columns: Vec<(Vec<u8>, hbase_thrift::hbase::TCell)> = match (r.columns, r.sorted_columns) {
        (Some(map), _) => map.into_iter().collect(),
        (None, Some(list)) => list
            .into_iter()
            .filter_map(|c| Some((c.column_name?, c.cell?)))
            .collect(),
        (None, None) => Vec::new(),
    };
    let mut cells = Vec::with_capacity(columns.len());
    for (name, cell) in columns {
        let Some(colon) = name.iter().position(|&b| b == b':') else {
            return Err(TableError::Backend(format!(
                "the HBase gateway returned a column without a family: `{}`",
                String::from_utf8_lossy(&name)
            )));
        };
        cells.push(Cell {
            family: String::from_utf8_lossy(&name[..colon]).into_owned(),
            qualifier: Bytes::copy_from_slice(&name[colon + 1..]),
            value: Bytes::from(cell.value.unwrap_or_default()),
            timestamp_ms: cell.timestamp.unwrap_or_default(),
        });
    }
    cells.sort_by(|a, b| (&a.family, &a.qualifier).cmp(&(&b.family, &b.qualifier)));
    Ok(Row {
        key: Bytes::from(key),
        cells,
    })
}

fn invalid_qualifier() -> TableError {
    TableError::Invalid {
        what: "column qualifier",
        value: String::new(),
        reason: "the HBase Thrift1 gateway reads `family:` as the whole family, so qualifiers may not be empty",
    }
}

/// What `ensure_table` found or did on the gateway.
enum Ensured {
    /// The table existed, with these families.
    Existed(Vec<String>),
    /// This call created it.
    Created,
    /// It is missing and no family was given to create it with.
    NeedsFamilies,
}

/// The table on HBase. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct HbaseTable {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HbaseTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbaseTable")
            .field("address", &self.inner.address)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

struct Inner {
    address: String,
    /// The Thrift2 gateway that adds families; empty = none.
    admin_address: String,
    timeout: Duration,
    /// One permit per connection the pool may have open.
    slots: Arc<Semaphore>,
    /// Connections not in use; never more than `slots` allows.
    idle: Mutex<Vec<Client>>,
    /// Families of the tables seen so far, so a put is validated without a
    /// round trip. Families are only ever added, so a stale entry is refreshed
    /// when a write names a family it lacks.
    families: RwLock<HashMap<String, Vec<String>>>,
}

impl HbaseTable {
    /// Checks the settings and that the gateway answers (`getTableNames`), so a
    /// wrong address fails at startup rather than on the first write.
    pub async fn connect(config: &HbaseConfig) -> Result<Self, TableError> {
        if config.pool_size == 0 {
            return Err(TableError::Invalid {
                what: "table.hbase.pool_size",
                value: "0".into(),
                reason: "at least one connection is needed",
            });
        }
        if config.timeout.is_zero() {
            return Err(TableError::Invalid {
                what: "table.hbase.timeout",
                value: "0s".into(),
                reason: "a call needs some time to answer",
            });
        }
        let table = HbaseTable {
            inner: Arc::new(Inner {
                address: config.address.clone(),
                admin_address: config.admin_address.clone(),
                timeout: config.timeout,
                slots: Arc::new(Semaphore::new(config.pool_size as usize)),
                idle: Mutex::new(Vec::new()),
                families: RwLock::new(HashMap::new()),
            }),
        };
        table
            .call("", "connecting", |c| c.get_table_names())
            .await?;
        tracing::info!(address = %config.address, pool_size = config.pool_size, "Connected to the HBase Thrift gateway.");
        Ok(table)
    }

    /// Runs `f` on a pooled connection on a blocking thread, and maps its
    /// failure to a `TableError` about `table` and `what` it was doing. `f` may
    /// run twice (see the module doc), so it must be idempotent.
    async fn call<T, F>(&self, table: &str, what: &'static str, f: F) -> Result<T, TableError>
    where
        T: Send + 'static,
        F: FnMut(&mut Client) -> thrift::Result<T> + Send + 'static,
    {
        let permit = self
            .inner
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TableError::Backend("the HBase connection pool is closed".into()))?;
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || {
            let result = inner.run(f);
            drop(permit);
            result
        })
        .await
        .map_err(|e| TableError::Backend(format!("an HBase worker thread failed: {e}")))?;
        result.map_err(|e| self.inner.error(table, what, e))
    }

    /// The families of `table`, from the cache or the gateway.
    async fn families(&self, table: &str) -> Result<Vec<String>, TableError> {
        if let Some(f) = self.inner.families.read().get(table) {
            return Ok(f.clone());
        }
        self.refresh_families(table).await
    }

    /// The families of `table` from the gateway; NoSuchTable if it is missing.
    async fn refresh_families(&self, table: &str) -> Result<Vec<String>, TableError> {
        if validate_name("table name", table).is_err() {
            // HBase could not have created it.
            return Err(TableError::NoSuchTable(table.to_string()));
        }
        let name = table.as_bytes().to_vec();
        let found = self
            .call(table, "reading the column families", move |c| {
                match c.get_column_descriptors(name.clone()) {
                    Ok(d) => Ok(Some(family_names(d))),
                    // Ask whether the table exists rather than parse the
                    // exception text, whose form differs between versions.
                    Err(e) if connection_ok(&e) => {
                        if c.get_table_names()?.contains(&name) {
                            Err(e)
                        } else {
                            Ok(None)
                        }
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        let mut cache = self.inner.families.write();
        match found {
            Some(f) => {
                cache.insert(table.to_string(), f.clone());
                Ok(f)
            }
            None => {
                cache.remove(table);
                Err(TableError::NoSuchTable(table.to_string()))
            }
        }
    }

    /// The families of `table`, re-read from the gateway if one of `names` is
    /// not among the cached ones (an operator may have added it since).
    async fn families_with(&self, table: &str, names: &[&str]) -> Result<Vec<String>, TableError> {
        let known = self.families(table).await?;
        if names.iter().all(|n| known.iter().any(|k| k == n)) {
            return Ok(known);
        }
        self.refresh_families(table).await
    }

    /// `wanted` narrowed to families the table has: asking HBase for a family
    /// it lacks is an error, while the trait treats it as having no cells.
    async fn known_families(
        &self,
        table: &str,
        wanted: Option<&[String]>,
    ) -> Result<Option<Vec<String>>, TableError> {
        let names: Vec<&str> = wanted
            .unwrap_or_default()
            .iter()
            .map(String::as_str)
            .collect();
        let known = self.families_with(table, &names).await?;
        Ok(wanted.map(|w| {
            w.iter()
                .filter(|f| known.contains(f))
                .cloned()
                .collect::<Vec<_>>()
        }))
    }
}

impl Inner {
    fn connect(&self) -> Result<Client, io::Error> {
        let stream = open_stream(&self.address, self.timeout)?;
        let read = Socket(stream.try_clone()?);
        let write = Socket(stream);
        Ok(HbaseSyncClient::new(
            TBinaryInputProtocol::new(TBufferedReadTransport::new(read), true),
            TBinaryOutputProtocol::new(TBufferedWriteTransport::new(write), true),
        ))
    }

    /// Checks out a connection, runs `f`, and checks the connection back in
    /// unless it broke. Blocking.
    fn run<T>(&self, mut f: impl FnMut(&mut Client) -> thrift::Result<T>) -> Result<T, Failure> {
        let pooled = self.idle.lock().pop();
        let reused = pooled.is_some();
        let mut client = match pooled {
            Some(c) => c,
            None => self.connect().map_err(Failure::Connect)?,
        };
        match f(&mut client) {
            Ok(v) => {
                self.idle.lock().push(client);
                Ok(v)
            }
            Err(e) if connection_ok(&e) => {
                self.idle.lock().push(client);
                Err(e.into())
            }
            Err(e) => {
                drop(client);
                if dead_connection(&e) {
                    // The gateway went away or restarted: the other idle
                    // connections are most likely dead too.
                    self.idle.lock().clear();
                }
                if !reused || !dead_connection(&e) {
                    return Err(e.into());
                }
                tracing::debug!(error = %e, "A pooled HBase connection was dead; retrying on a new one.");
                let mut client = self.connect().map_err(Failure::Connect)?;
                let result = f(&mut client);
                if result.as_ref().err().is_none_or(connection_ok) {
                    self.idle.lock().push(client);
                }
                result.map_err(Failure::Call)
            }
        }
    }

    /// The `TableError` for a failed call: what went wrong and what to do.
    fn error(&self, table: &str, what: &str, e: Failure) -> TableError {
        let address = &self.address;
        let doing = if table.is_empty() {
            what.to_string()
        } else {
            format!("{what} on table `{table}`")
        };
        let e = match e {
            Failure::Connect(e) => {
                return TableError::Backend(format!(
                    "cannot connect to the HBase Thrift gateway at {address} ({doing}): {e}; \
                     check that HBase and its Thrift server (`hbase thrift start`) are running, \
                     or fix table.hbase.address"
                ))
            }
            Failure::Call(e) => e,
        };
        if let Some(message) = hbase_message(&e) {
            if message.contains("TableNotFoundException") {
                self.families.write().remove(table);
                return TableError::NoSuchTable(table.to_string());
            }
            if message.contains("NoSuchColumnFamilyException") {
                // The table changed under the cache; the next call re-reads it.
                self.families.write().remove(table);
            }
            return TableError::Backend(format!("HBase failed {doing}: {}", first_line(message)));
        }
        match &e {
            thrift::Error::Transport(t) if t.kind == TransportErrorKind::TimedOut => {
                TableError::Backend(format!(
                    "the HBase Thrift gateway at {address} did not answer within {} ({doing}); \
                     HBase may be down or overloaded: check it, or raise table.hbase.timeout",
                    humantime::format_duration(self.timeout)
                ))
            }
            thrift::Error::Transport(_) | thrift::Error::Protocol(_) => {
                TableError::Backend(format!(
                    "lost the connection to the HBase Thrift gateway at {address} ({doing}): \
                     {e}; check that HBase and its Thrift server are running with the binary \
                     protocol and buffered transport"
                ))
            }
            thrift::Error::Application(a) => TableError::Backend(format!(
                "the HBase Thrift gateway at {address} failed {doing}: {}; see the gateway's log",
                a.message
            )),
            thrift::Error::User(u) => TableError::Backend(format!("HBase failed {doing}: {u}")),
        }
    }
}

#[async_trait]
impl super::Table for HbaseTable {
    async fn ensure_table(&self, table: &str, families: &[&str]) -> Result<(), TableError> {
        validate_name("table name", table)?;
        for f in families {
            validate_name("column family", f)?;
        }
        let name = table.as_bytes().to_vec();
        let wanted: Vec<String> = families.iter().map(|f| f.to_string()).collect();
        let create: Vec<ColumnDescriptor> = wanted.iter().map(|f| descriptor(f)).collect();
        let outcome = self
            .call(table, "creating the table", move |c| {
                if c.get_table_names()?.contains(&name) {
                    let have = family_names(c.get_column_descriptors(name.clone())?);
                    return Ok(Ensured::Existed(have));
                }
                if create.is_empty() {
                    return Ok(Ensured::NeedsFamilies);
                }
                match c.create_table(name.clone(), create.clone()) {
                    Ok(()) => Ok(Ensured::Created),
                    // Another process created it meanwhile.
                    Err(e) if is_already_exists(&e) => Ok(Ensured::Existed(family_names(
                        c.get_column_descriptors(name.clone())?,
                    ))),
                    Err(e) => Err(e),
                }
            })
            .await?;
        let have = match outcome {
            Ensured::Existed(have) => have,
            Ensured::Created => {
                tracing::info!(table, families = %wanted.join(","), "Created HBase table.");
                let mut sorted = wanted;
                sorted.sort();
                sorted.dedup();
                self.inner
                    .families
                    .write()
                    .insert(table.to_string(), sorted);
                return Ok(());
            }
            Ensured::NeedsFamilies => {
                return Err(TableError::Invalid {
                    what: "column families",
                    value: String::new(),
                    reason: "an HBase table is created with at least one column family",
                })
            }
        };
        self.inner
            .families
            .write()
            .insert(table.to_string(), have.clone());
        let missing: Vec<&String> = wanted.iter().filter(|f| !have.contains(f)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let shell: Vec<String> = missing
            .iter()
            .map(|f| format!("{{NAME => '{f}', VERSIONS => 1}}"))
            .collect();
        let shell = format!("alter '{table}', {}", shell.join(", "));
        let admin = self.inner.admin_address.clone();
        if admin.is_empty() {
            return Err(TableError::Backend(format!(
                "HBase table `{table}` lacks the column families {missing:?} (it has {have:?}); the \
                 Thrift1 gateway cannot alter a table and no Thrift2 gateway is configured \
                 (table.hbase.admin_address); add them with the HBase shell: {shell}"
            )));
        }
        let timeout = self.inner.timeout;
        let owned_table = table.to_string();
        let to_add: Vec<String> = missing.into_iter().cloned().collect();
        let added = to_add.clone();
        let result = tokio::task::spawn_blocking(move || {
            for family in &to_add {
                match add_family(&admin, timeout, &owned_table, family) {
                    Ok(()) => {}
                    // Another process added it meanwhile.
                    Err(e)
                        if hbase_message(&e)
                            .is_some_and(|m| m.contains("InvalidFamilyOperationException")) => {}
                    Err(e) => return Err((family.clone(), e)),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| TableError::Backend(format!("an HBase worker thread failed: {e}")))?;
        if let Err((family, e)) = result {
            let why = match &e {
                thrift::Error::User(_) => hbase_message(&e).map(first_line).unwrap_or_default(),
                other => other.to_string(),
            };
            return Err(TableError::Backend(format!(
                "adding column family `{family}` to HBase table `{table}` through the Thrift2 \
                 gateway at {} (table.hbase.admin_address) failed: {why}; check that it runs, or \
                 add the families with the HBase shell: {shell}",
                self.inner.admin_address
            )));
        }
        tracing::info!(table, families = %added.join(","), "Added column families to HBase table.");
        self.refresh_families(table).await?;
        Ok(())
    }

    async fn list_tables(&self) -> Result<Vec<(String, Vec<String>)>, TableError> {
        let tables = self
            .call("", "listing tables", |c| {
                let mut out = Vec::new();
                for name in c.get_table_names()? {
                    match c.get_column_descriptors(name.clone()) {
                        Ok(d) => {
                            out.push((String::from_utf8_lossy(&name).into_owned(), family_names(d)))
                        }
                        // Dropped between the two calls: it no longer exists.
                        Err(e)
                            if hbase_message(&e)
                                .is_some_and(|m| m.contains("TableNotFoundException")) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
            .await?;
        let mut cache = self.inner.families.write();
        for (name, fams) in &tables {
            cache.insert(name.clone(), fams.clone());
        }
        let mut tables = tables;
        tables.sort();
        Ok(tables)
    }

    async fn put(&self, table: &str, rows: Vec<RowPut>) -> Result<(), TableError> {
        for r in &rows {
            if r.row.is_empty() || r.row.len() > MAX_ROW_KEY {
                return Err(TableError::Invalid {
                    what: "row key",
                    value: String::from_utf8_lossy(&r.row[..r.row.len().min(64)]).into_owned(),
                    reason: "row keys are 1 to 32767 bytes",
                });
            }
            for c in &r.cells {
                if c.qualifier.is_empty() {
                    return Err(invalid_qualifier());
                }
                if let Some(ts @ ..0) = c.timestamp_ms {
                    return Err(TableError::Invalid {
                        what: "timestamp",
                        value: ts.to_string(),
                        reason: "HBase timestamps are milliseconds since 1970, not negative",
                    });
                }
            }
        }
        let mut named: Vec<&str> = rows
            .iter()
            .flat_map(|r| r.cells.iter().map(|c| c.family.as_str()))
            .collect();
        named.sort_unstable();
        named.dedup();
        let known = self.families_with(table, &named).await?;
        if let Some(family) = named.iter().find(|f| !known.iter().any(|k| k == *f)) {
            return Err(TableError::NoSuchFamily {
                table: table.to_string(),
                family: family.to_string(),
                known: known.join(", "),
            });
        }
        // timestamp → row → (family, qualifier) → value. Within a batch a later
        // write of the same cell and timestamp wins, as in the embedded table.
        let now = crate::now_ms();
        let mut groups: BTreeMap<i64, BTreeMap<Bytes, BTreeMap<(String, Bytes), Bytes>>> =
            BTreeMap::new();
        for r in rows {
            for c in r.cells {
                groups
                    .entry(c.timestamp_ms.unwrap_or(now))
                    .or_default()
                    .entry(r.row.clone())
                    .or_default()
                    .insert((c.family, c.qualifier), c.value);
            }
        }
        let batches: Vec<(i64, Vec<BatchMutation>)> = groups
            .into_iter()
            .map(|(ts, rows)| {
                let batch = rows
                    .into_iter()
                    .map(|(row, cells)| BatchMutation {
                        row: Some(row.to_vec()),
                        mutations: Some(
                            cells
                                .into_iter()
                                .map(|((family, qualifier), value)| Mutation {
                                    is_delete: Some(false),
                                    column: Some(column(&family, &qualifier)),
                                    value: Some(value.to_vec()),
                                    write_to_w_a_l: Some(true),
                                })
                                .collect(),
                        ),
                    })
                    .collect();
                (ts, batch)
            })
            .collect();
        if batches.is_empty() {
            return Ok(());
        }
        let name = table.as_bytes().to_vec();
        self.call(table, "writing rows", move |c| {
            for (ts, batch) in &batches {
                c.mutate_rows_ts(name.clone(), batch.clone(), *ts, BTreeMap::new())?;
            }
            Ok(())
        })
        .await
    }

    async fn get(
        &self,
        table: &str,
        row: &[u8],
        families: Option<&[String]>,
    ) -> Result<Option<Row>, TableError> {
        let families = self.known_families(table, families).await?;
        if row.is_empty() || families.as_ref().is_some_and(Vec::is_empty) {
            return Ok(None);
        }
        let (name, key) = (table.as_bytes().to_vec(), row.to_vec());
        let columns: Vec<Vec<u8>> = families
            .unwrap_or_default()
            .into_iter()
            .map(String::into_bytes)
            .collect();
        let found = self
            .call(table, "reading a row", move |c| {
                c.get_row_with_columns(name.clone(), key.clone(), columns.clone(), BTreeMap::new())
            })
            .await?;
        match found.into_iter().next() {
            Some(r) => {
                let row = to_row(r)?;
                Ok((!row.cells.is_empty()).then_some(row))
            }
            None => Ok(None),
        }
    }

    async fn scan(&self, table: &str, scan: &Scan) -> Result<Vec<Row>, TableError> {
        let families = self.known_families(table, scan.families.as_deref()).await?;
        let Some((lower, upper)) = super::scan_range(scan) else {
            return Ok(Vec::new());
        };
        if families.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let limit = scan.limit;
        let page = if limit > 0 {
            limit.min(SCAN_PAGE)
        } else {
            SCAN_PAGE
        };
        // Every field spelled out: `TScan::default()` sets them all, and the
        // gateway reads a set timestamp of 0 as "only cells older than 0" and
        // an empty filter string as a syntax error.
        let tscan = TScan {
            start_row: (!lower.is_empty()).then_some(lower),
            stop_row: upper,
            timestamp: None,
            columns: families.map(|f| f.into_iter().map(String::into_bytes).collect()),
            caching: Some(page as i32),
            filter_string: None,
            // Unset, so that a wide row is never split over several results.
            batch_size: None,
            sort_columns: None,
            reversed: None,
            cache_blocks: None,
        };
        let name = table.as_bytes().to_vec();
        let results = self
            .call(table, "scanning", move |c| {
                let id = c.scanner_open_with_scan(name.clone(), tscan.clone(), BTreeMap::new())?;
                let read = read_scanner(c, id, limit, page);
                // Close on every path: an open scanner holds region server
                // resources until its lease expires.
                let closed = c.scanner_close(id);
                match (read, closed) {
                    (Ok(rows), Ok(())) => Ok(rows),
                    // Every row was read and the connection is sound: the
                    // scanner is gone or will expire on the gateway.
                    (Ok(rows), Err(e)) if connection_ok(&e) => {
                        tracing::warn!(error = %e, "Closing an HBase scanner failed after reading it to the end.");
                        Ok(rows)
                    }
                    (Ok(_), Err(e)) => Err(e),
                    (Err(e), Ok(())) => Err(e),
                    (Err(read), Err(close)) => {
                        tracing::warn!(error = %close, "Closing an HBase scanner failed after reading from it failed.");
                        // Report the failure that decides whether the
                        // connection can be reused.
                        if connection_ok(&read) && !connection_ok(&close) {
                            Err(close)
                        } else {
                            Err(read)
                        }
                    }
                }
            })
            .await?;
        let mut rows: Vec<Row> = Vec::with_capacity(results.len());
        for r in results {
            let row = to_row(r)?;
            // A wide row may come in parts; they arrive one after another.
            match rows.last_mut() {
                Some(last) if last.key == row.key => {
                    last.cells.extend(row.cells);
                    last.cells
                        .sort_by(|a, b| (&a.family, &a.qualifier).cmp(&(&b.family, &b.qualifier)));
                }
                _ if row.cells.is_empty() => {}
                _ => rows.push(row),
            }
        }
        Ok(rows)
    }

    async fn delete(&self, table: &str, row: &[u8], what: Delete) -> Result<(), TableError> {
        let named: Vec<&str> = match &what {
            Delete::Row => Vec::new(),
            Delete::Families(f) => f.iter().map(String::as_str).collect(),
            Delete::Cells(c) => c.iter().map(|(f, _)| f.as_str()).collect(),
        };
        let known = self.families_with(table, &named).await?;
        if row.is_empty() {
            return Ok(());
        }
        let (name, key) = (table.as_bytes().to_vec(), row.to_vec());
        // Families the table lacks hold no cells: there is nothing to delete.
        let columns: Vec<Vec<u8>> = match what {
            Delete::Row => {
                return self
                    .call(table, "deleting a row", move |c| {
                        c.delete_all_row(name.clone(), key.clone(), BTreeMap::new())
                    })
                    .await;
            }
            Delete::Families(f) => f
                .into_iter()
                .filter(|f| known.contains(f))
                .map(String::into_bytes)
                .collect(),
            Delete::Cells(cells) => {
                if cells.iter().any(|(_, q)| q.is_empty()) {
                    return Err(invalid_qualifier());
                }
                cells
                    .into_iter()
                    .filter(|(f, _)| known.contains(f))
                    .map(|(f, q)| column(&f, &q))
                    .collect()
            }
        };
        if columns.is_empty() {
            return Ok(());
        }
        let mutations: Vec<Mutation> = columns
            .into_iter()
            .map(|column| Mutation {
                is_delete: Some(true),
                column: Some(column),
                value: None,
                write_to_w_a_l: Some(true),
            })
            .collect();
        self.call(table, "deleting cells", move |c| {
            c.mutate_row(
                name.clone(),
                key.clone(),
                mutations.clone(),
                BTreeMap::new(),
            )
        })
        .await
    }
}

/// Reads a scanner to its end or `limit` rows (0 = no limit).
fn read_scanner(
    c: &mut Client,
    id: i32,
    limit: usize,
    page: usize,
) -> thrift::Result<Vec<TRowResult>> {
    let mut out = Vec::new();
    loop {
        let want = if limit > 0 {
            (limit - out.len()).min(page)
        } else {
            page
        };
        if want == 0 {
            return Ok(out);
        }
        let batch = c.scanner_get_list(id, want as i32)?;
        if batch.is_empty() {
            return Ok(out);
        }
        out.extend(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let s = |start: Option<&str>, stop: Option<&str>, prefix: Option<&str>| Scan {
            start: start.map(|s| Bytes::copy_from_slice(s.as_bytes())),
            stop: stop.map(|s| Bytes::copy_from_slice(s.as_bytes())),
            prefix: prefix.map(|s| Bytes::copy_from_slice(s.as_bytes())),
            ..Scan::default()
        };
        assert_eq!(
            super::super::scan_range(&s(None, None, Some("doc-"))),
            Some((b"doc-".to_vec(), Some(b"doc.".to_vec())))
        );
        assert_eq!(
            super::super::scan_range(&s(Some("doc-095"), None, Some("doc-"))),
            Some((b"doc-095".to_vec(), Some(b"doc.".to_vec())))
        );
        assert_eq!(
            super::super::scan_range(&s(Some("z"), Some("a"), None)),
            None
        );
        assert_eq!(
            super::super::scan_range(&s(None, None, None)),
            Some((Vec::new(), None))
        );
        assert_eq!(super::super::prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(super::super::prefix_end(b"\xff"), None);
    }

    #[test]
    fn rows_sort_cells_by_family_then_qualifier() {
        let cell = |v: &str| hbase_thrift::hbase::TCell {
            value: Some(v.as_bytes().to_vec()),
            timestamp: Some(1),
        };
        // Byte order of `family:qualifier` would put `a-:x` before `a:y`.
        let columns: BTreeMap<Vec<u8>, _> = [
            (b"a-:x".to_vec(), cell("1")),
            (b"a:y".to_vec(), cell("2")),
            (b"a:b:c".to_vec(), cell("3")),
        ]
        .into_iter()
        .collect();
        let row = to_row(TRowResult {
            row: Some(b"k".to_vec()),
            columns: Some(columns),
            sorted_columns: None,
        })
        .expect("a well-formed row");
        let names: Vec<(&str, &[u8])> = row
            .cells
            .iter()
            .map(|c| (c.family.as_str(), c.qualifier.as_ref()))
            .collect();
        assert_eq!(
            names,
            vec![("a", b"b:c".as_slice()), ("a", b"y"), ("a-", b"x")]
        );
    }
}
