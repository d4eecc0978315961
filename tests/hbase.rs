//! The table on a real HBase through its Thrift1 gateway (`SIFT_TEST_HBASE`,
//! e.g. `127.0.0.1:9090`; `scripts/services.sh up hbase`): the conformance
//! suite, a gateway outage in the middle of a run, and what only this backend
//! has (scanner paging, the connection pool, timeouts, its limits).
//!
//! The outage test stops HBase, so every test that talks to it holds `LOCK`.
#![cfg(feature = "hbase")]

mod conformance;

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use sift::backends::table::{hbase::HbaseTable, Delete, RowPut, Scan, Table, TableError};
use sift::config::HbaseConfig;

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(address: &str, pool_size: u32, timeout: Duration) -> HbaseConfig {
    HbaseConfig {
        address: address.to_string(),
        admin_address: std::env::var("SIFT_TEST_HBASE_ADMIN").unwrap_or_default(),
        pool_size,
        timeout,
    }
}

async fn connect(address: &str) -> Result<HbaseTable> {
    Ok(HbaseTable::connect(&config(address, 4, Duration::from_secs(20))).await?)
}

fn table_name(prefix: &str) -> String {
    conformance::unique(prefix).replace('-', "_")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hbase_conformance() -> Result<()> {
    let Some(addr) = conformance::service_addr("SIFT_TEST_HBASE") else {
        return Ok(());
    };
    let _serial = LOCK.lock().await;
    conformance::table::check_table(Arc::new(connect(&addr).await?)).await
}

/// HBase (master and gateway) stops after rows were acknowledged: calls fail
/// with a clear error, and once it is back the same client object reads every
/// acknowledged row and writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hbase_outage_and_recovery() -> Result<()> {
    let Some(addr) = conformance::service_addr("SIFT_TEST_HBASE") else {
        return Ok(());
    };
    let _serial = LOCK.lock().await;
    let timeout = Duration::from_secs(15);
    let t = HbaseTable::connect(&config(&addr, 4, timeout)).await?;
    let name = table_name("fault");
    t.ensure_table(&name, &["m"]).await?;
    let rows = |range: std::ops::Range<u32>| -> Vec<RowPut> {
        range
            .map(|i| RowPut::new(format!("row-{i:05}")).cell("m", "v", format!("value {i}")))
            .collect()
    };
    for start in (0..1000).step_by(250) {
        t.put(&name, rows(start..start + 250)).await?;
    }

    conformance::services("down", "hbase")?;
    let began = Instant::now();
    let outage = t.get(&name, b"row-00001", None).await;
    let waited = began.elapsed();
    match &outage {
        Err(TableError::Backend(msg)) => {
            eprintln!("during the outage, after {waited:?}: {msg}");
            ensure!(msg.contains(&addr), "the error names the gateway: {msg}")
        }
        other => anyhow::bail!("a read during the outage returned {other:?}"),
    }
    ensure!(
        waited < timeout + Duration::from_secs(5),
        "the failing call took {waited:?}, more than the {timeout:?} timeout"
    );
    ensure!(matches!(
        t.put(&name, rows(1000..1001)).await,
        Err(TableError::Backend(_))
    ));

    // Start it again from another thread while this one keeps calling.
    let up = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(3));
        conformance::services("up", "hbase")
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let prefix = Scan {
        prefix: Some(Bytes::from_static(b"row-")),
        ..Scan::default()
    };
    let back = loop {
        match t.scan(&name, &prefix).await {
            Ok(rows) => break Ok(rows),
            Err(e) if Instant::now() > deadline => break Err(e),
            Err(e) => {
                ensure!(
                    matches!(e, TableError::Backend(_)),
                    "unexpected error {e:?}"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    up.join()
        .map_err(|_| anyhow::anyhow!("the thread starting HBase panicked"))??;
    let back = back.context("HBase did not come back within 5 minutes")?;
    ensure!(
        back.len() == 1000,
        "{} of 1000 acknowledged rows after the restart",
        back.len()
    );
    for (i, row) in back.iter().enumerate() {
        ensure!(row.key.as_ref() == format!("row-{i:05}").as_bytes());
        ensure!(row.get("m", b"v").map(|v| v.as_ref()) == Some(format!("value {i}").as_bytes()));
    }
    t.put(&name, rows(1000..1100)).await?;
    let row = t
        .get(&name, b"row-01099", None)
        .await?
        .context("a write after the restart")?;
    ensure!(row.get("m", b"v").map(|v| v.as_ref()) == Some(b"value 1099".as_slice()));
    Ok(())
}

/// More rows than one scanner page (256), with and without a limit that falls
/// inside a later page, and a scan that stops part-way through a page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hbase_scans_span_scanner_pages() -> Result<()> {
    let Some(addr) = conformance::service_addr("SIFT_TEST_HBASE") else {
        return Ok(());
    };
    let _serial = LOCK.lock().await;
    let t = connect(&addr).await?;
    let name = table_name("pages");
    t.ensure_table(&name, &["m", "c"]).await?;
    let rows: Vec<RowPut> = (0..1200u32)
        .map(|i| {
            RowPut::new(format!("k{i:05}"))
                .cell("m", "a", i.to_string())
                .cell("c", "b", "x")
        })
        .collect();
    t.put(&name, rows).await?;
    let all = t.scan(&name, &Scan::default()).await?;
    ensure!(all.len() == 1200, "full scan: {}", all.len());
    ensure!(all.windows(2).all(|w| w[0].key < w[1].key));
    ensure!(all.iter().all(|r| r.cells.len() == 2));
    let limited = t
        .scan(
            &name,
            &Scan {
                limit: 700,
                families: Some(vec!["m".into()]),
                ..Scan::default()
            },
        )
        .await?;
    ensure!(limited.len() == 700 && limited[699].key.as_ref() == b"k00699");
    ensure!(limited
        .iter()
        .all(|r| r.cells.len() == 1 && r.cells[0].family == "m"));
    let range = t
        .scan(
            &name,
            &Scan {
                start: Some("k00250".into()),
                stop: Some("k00800".into()),
                ..Scan::default()
            },
        )
        .await?;
    ensure!(range.len() == 550 && range[0].key.as_ref() == b"k00250");
    Ok(())
}

/// Many more concurrent callers than connections: they queue for the pool and
/// all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hbase_pool_under_concurrency() -> Result<()> {
    let Some(addr) = conformance::service_addr("SIFT_TEST_HBASE") else {
        return Ok(());
    };
    let _serial = LOCK.lock().await;
    let t = Arc::new(HbaseTable::connect(&config(&addr, 2, Duration::from_secs(20))).await?);
    let name = table_name("pool");
    t.ensure_table(&name, &["m"]).await?;
    let mut tasks = Vec::new();
    for w in 0..16u32 {
        let (t, name) = (t.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..10u32 {
                let key = format!("w{w:02}-{i:02}");
                t.put(
                    &name,
                    vec![RowPut::new(key.clone()).cell("m", "v", key.clone())],
                )
                .await?;
                let row = t.get(&name, key.as_bytes(), None).await?;
                ensure!(
                    row.as_ref()
                        .and_then(|r| r.get("m", b"v"))
                        .map(|v| v.as_ref())
                        == Some(key.as_bytes()),
                    "read back {key}"
                );
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rows = t.scan(&name, &Scan::default()).await?;
    ensure!(rows.len() == 160, "{} of 160 rows", rows.len());
    Ok(())
}

/// What this backend reports where HBase differs from the embedded table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hbase_errors_and_limits() -> Result<()> {
    let Some(addr) = conformance::service_addr("SIFT_TEST_HBASE") else {
        return Ok(());
    };
    let _serial = LOCK.lock().await;
    let t = connect(&addr).await?;
    let missing = table_name("missing");
    ensure!(matches!(
        t.get(&missing, b"r", None).await,
        Err(TableError::NoSuchTable(n)) if n == missing
    ));
    ensure!(matches!(
        t.put(&missing, vec![RowPut::new("r").cell("m", "q", "v")])
            .await,
        Err(TableError::NoSuchTable(_))
    ));
    ensure!(matches!(
        t.scan(&missing, &Scan::default()).await,
        Err(TableError::NoSuchTable(_))
    ));
    ensure!(matches!(
        t.delete(&missing, b"r", Delete::Row).await,
        Err(TableError::NoSuchTable(_))
    ));

    let name = table_name("limits");
    t.ensure_table(&name, &["m"]).await?;
    // A batch that fails validation writes nothing, not even its valid rows.
    let bad = vec![
        RowPut::new("ok").cell("m", "q", "v"),
        RowPut::new("bad").cell("nope", "q", "v"),
    ];
    ensure!(matches!(
        t.put(&name, bad).await,
        Err(TableError::NoSuchFamily { .. })
    ));
    ensure!(t.get(&name, b"ok", None).await?.is_none());
    // `m:` would mean the whole family to the gateway.
    ensure!(matches!(
        t.put(&name, vec![RowPut::new("r").cell("m", "", "v")])
            .await,
        Err(TableError::Invalid { .. })
    ));
    // Asking for a family the table lacks finds no cells, as in the embedded table.
    t.put(&name, vec![RowPut::new("r").cell("m", "q", "v")])
        .await?;
    ensure!(t
        .get(&name, b"r", Some(&["zz".to_string()]))
        .await?
        .is_none());
    // Mixed timestamps in one batch, and the newest version wins.
    t.put(
        &name,
        vec![
            RowPut::new("ts")
                .cell_at("m", "a", "new", 2_000)
                .cell_at("m", "b", "only", 1_000),
            RowPut::new("ts").cell_at("m", "a", "old", 1_500),
        ],
    )
    .await?;
    let row = t.get(&name, b"ts", None).await?.context("ts row")?;
    ensure!(row.get("m", b"a").map(|v| v.as_ref()) == Some(b"new".as_slice()));
    ensure!(row.cells.iter().map(|c| c.timestamp_ms).collect::<Vec<_>>() == vec![2_000, 1_000]);

    // Adding a family goes through the Thrift2 gateway. Without one configured
    // the error gives the shell command; with one that is down, it names the
    // setting. Neither changes the table.
    let mut no_admin = config(&addr, 2, Duration::from_secs(20));
    no_admin.admin_address = String::new();
    match HbaseTable::connect(&no_admin)
        .await?
        .ensure_table(&name, &["m", "extra"])
        .await
    {
        Err(TableError::Backend(msg)) => ensure!(msg.contains("alter '"), "{msg}"),
        other => anyhow::bail!("adding a family without Thrift2 returned {other:?}"),
    }
    let mut dead_admin = no_admin.clone();
    dead_admin.admin_address = "127.0.0.1:1".into();
    match HbaseTable::connect(&dead_admin)
        .await?
        .ensure_table(&name, &["m", "extra"])
        .await
    {
        Err(TableError::Backend(msg)) => ensure!(msg.contains("admin_address"), "{msg}"),
        other => anyhow::bail!("adding a family through a dead Thrift2 returned {other:?}"),
    }
    if std::env::var("SIFT_TEST_HBASE_ADMIN").is_ok_and(|a| !a.is_empty()) {
        // A client that cached the families before the change still writes
        // to the new family once another client added it.
        let other = connect(&addr).await?;
        other
            .put(&name, vec![RowPut::new("x").cell("m", "a", "1")])
            .await?;
        t.ensure_table(&name, &["m", "extra"]).await?;
        t.ensure_table(&name, &["extra", "m"])
            .await
            .context("idempotent")?;
        other
            .put(&name, vec![RowPut::new("x").cell("extra", "q", "v")])
            .await
            .context("a stale client writes to the added family")?;
        let row = t.get(&name, b"x", None).await?.context("x row")?;
        ensure!(row.get("extra", b"q").map(|v| v.as_ref()) == Some(b"v".as_slice()));
        let listed = t.list_tables().await?;
        let fams = &listed.iter().find(|(n, _)| *n == name).context("listed")?.1;
        ensure!(
            fams == &vec!["extra".to_string(), "m".to_string()],
            "{fams:?}"
        );
    }
    Ok(())
}

/// A gateway that accepts connections but never answers: the call fails with
/// a timeout error, in about the configured time. Needs no HBase.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hbase_timeout_on_a_silent_gateway() -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        // Hold each connection open, reading and never replying.
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    let timeout = Duration::from_millis(500);
    let began = Instant::now();
    let result = HbaseTable::connect(&config(&addr, 1, timeout)).await;
    let waited = began.elapsed();
    match result {
        Err(TableError::Backend(msg)) => {
            ensure!(msg.contains("did not answer within"), "{msg}")
        }
        other => anyhow::bail!("a silent gateway gave {other:?}"),
    }
    ensure!(waited < Duration::from_secs(3), "took {waited:?}");

    // Nothing listening: a clear error at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    match HbaseTable::connect(&config(&closed.to_string(), 1, timeout)).await {
        Err(TableError::Backend(msg)) => ensure!(msg.contains("cannot connect"), "{msg}"),
        other => anyhow::bail!("a closed port gave {other:?}"),
    }
    Ok(())
}
