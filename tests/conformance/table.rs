//! Conformance suite of the `Table` trait.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use sift::backends::table::{Delete, RowPut, Scan, Table, TableError};

use super::unique;

/// Runs every check.
pub async fn check_table(t: Arc<dyn Table>) -> Result<()> {
    let name = unique("conf").replace('-', "_");
    t.ensure_table(&name, &["m", "c"]).await?;
    t.ensure_table(&name, &["m", "c"])
        .await
        .context("ensure_table must be idempotent")?;
    t.ensure_table(&name, &["m", "c", "r"])
        .await
        .context("adding a family")?;
    let listed = t.list_tables().await?;
    let fams = &listed
        .iter()
        .find(|(n, _)| *n == name)
        .context("table not listed")?
        .1;
    ensure!(
        ["c", "m", "r"].iter().all(|f| fams.iter().any(|x| x == f)),
        "families {fams:?}"
    );
    errors(t.as_ref(), &name).await.context("errors")?;
    rows_and_scans(t.as_ref(), &name)
        .await
        .context("rows and scans")?;
    versions(t.as_ref(), &name).await.context("versions")?;
    deletes(t.as_ref(), &name).await.context("deletes")?;
    large_values(t.as_ref(), &name)
        .await
        .context("large values")?;
    concurrent_writers(t.clone(), &name)
        .await
        .context("concurrent writers")?;
    Ok(())
}

async fn errors(t: &dyn Table, name: &str) -> Result<()> {
    ensure!(matches!(
        t.put(name, vec![RowPut::new("r").cell("nope", "q", "v")])
            .await,
        Err(TableError::NoSuchFamily { .. })
    ));
    ensure!(t.get(name, b"never-written", None).await?.is_none());
    ensure!(matches!(
        t.ensure_table("bad name!", &["m"]).await,
        Err(TableError::Invalid { .. })
    ));
    Ok(())
}

async fn rows_and_scans(t: &dyn Table, name: &str) -> Result<()> {
    let rows: Vec<RowPut> = (0..100)
        .map(|i| {
            RowPut::new(format!("doc-{i:03}"))
                .cell("m", "title", format!("title {i}"))
                .cell("m", "source", if i % 2 == 0 { "even" } else { "odd" })
                .cell("c", "label1", format!("cat{}", i % 7))
        })
        .collect();
    t.put(name, rows).await?;
    // Binary keys sort bytewise.
    t.put(
        name,
        vec![
            RowPut::new(Bytes::from_static(b"bin\x00a")).cell("m", "k", "1"),
            RowPut::new(Bytes::from_static(b"bin\xffz")).cell("m", "k", "2"),
            RowPut::new(Bytes::from_static(b"bin\x7f")).cell("m", "k", "3"),
        ],
    )
    .await?;

    let row = t
        .get(name, b"doc-042", None)
        .await?
        .context("row doc-042")?;
    ensure!(row.get("m", b"title").map(|v| v.as_ref()) == Some(b"title 42".as_slice()));
    ensure!(row.get("c", b"label1").map(|v| v.as_ref()) == Some(b"cat0".as_slice()));
    ensure!(row.cells.len() == 3);
    let cells: Vec<(String, Bytes)> = row
        .cells
        .iter()
        .map(|c| (c.family.clone(), c.qualifier.clone()))
        .collect();
    let mut sorted = cells.clone();
    sorted.sort();
    ensure!(
        cells == sorted,
        "cells must be sorted by family then qualifier"
    );
    let only_c = t
        .get(name, b"doc-042", Some(&["c".to_string()]))
        .await?
        .context("family filter")?;
    ensure!(only_c.cells.len() == 1 && only_c.cells[0].family == "c");
    ensure!(
        t.get(name, b"doc-042", Some(&["r".to_string()]))
            .await?
            .is_none(),
        "no cells in r"
    );

    let prefix = t
        .scan(
            name,
            &Scan {
                prefix: Some("doc-0".into()),
                ..Scan::default()
            },
        )
        .await?;
    ensure!(prefix.len() == 100, "prefix scan: {}", prefix.len());
    ensure!(
        prefix.windows(2).all(|w| w[0].key < w[1].key),
        "scan must be in key order"
    );
    let range = t
        .scan(
            name,
            &Scan {
                start: Some("doc-010".into()),
                stop: Some("doc-020".into()),
                ..Scan::default()
            },
        )
        .await?;
    ensure!(
        range.len() == 10
            && range[0].key.as_ref() == b"doc-010"
            && range[9].key.as_ref() == b"doc-019"
    );
    let limited = t
        .scan(
            name,
            &Scan {
                prefix: Some("doc-".into()),
                start: Some("doc-095".into()),
                limit: 3,
                ..Scan::default()
            },
        )
        .await?;
    ensure!(limited.len() == 3 && limited[0].key.as_ref() == b"doc-095");
    let fam = t
        .scan(
            name,
            &Scan {
                prefix: Some("doc-00".into()),
                families: Some(vec!["c".into()]),
                ..Scan::default()
            },
        )
        .await?;
    ensure!(
        fam.len() == 10
            && fam
                .iter()
                .all(|r| r.cells.len() == 1 && r.cells[0].family == "c")
    );
    let bin = t
        .scan(
            name,
            &Scan {
                prefix: Some(Bytes::from_static(b"bin")),
                ..Scan::default()
            },
        )
        .await?;
    let keys: Vec<&[u8]> = bin.iter().map(|r| r.key.as_ref()).collect();
    ensure!(
        keys == vec![b"bin\x00a".as_slice(), b"bin\x7f", b"bin\xffz"],
        "binary key order {keys:?}"
    );
    let empty = t
        .scan(
            name,
            &Scan {
                start: Some("z".into()),
                stop: Some("a".into()),
                ..Scan::default()
            },
        )
        .await?;
    ensure!(empty.is_empty(), "inverted range must be empty");
    Ok(())
}

async fn versions(t: &dyn Table, name: &str) -> Result<()> {
    t.put(
        name,
        vec![RowPut::new("ver").cell_at("m", "q", "at-100", 100)],
    )
    .await?;
    t.put(
        name,
        vec![RowPut::new("ver").cell_at("m", "q", "at-50", 50)],
    )
    .await?;
    let row = t.get(name, b"ver", None).await?.context("ver")?;
    ensure!(
        row.get("m", b"q").map(|v| v.as_ref()) == Some(b"at-100".as_slice()),
        "an older write must not win"
    );
    ensure!(row.cells[0].timestamp_ms == 100);
    t.put(
        name,
        vec![RowPut::new("ver").cell_at("m", "q", "at-200", 200)],
    )
    .await?;
    let row = t.get(name, b"ver", None).await?.context("ver")?;
    ensure!(row.get("m", b"q").map(|v| v.as_ref()) == Some(b"at-200".as_slice()));
    // Idempotence: the same write twice leaves the same row.
    let put = RowPut::new("idem")
        .cell_at("m", "a", "1", 300)
        .cell_at("c", "b", "2", 300);
    t.put(name, vec![put.clone()]).await?;
    let first = t.get(name, b"idem", None).await?;
    t.put(name, vec![put]).await?;
    ensure!(
        first == t.get(name, b"idem", None).await?,
        "replaying a write changed the row"
    );
    Ok(())
}

async fn deletes(t: &dyn Table, name: &str) -> Result<()> {
    t.put(
        name,
        vec![RowPut::new("del")
            .cell("m", "a", "1")
            .cell("m", "b", "2")
            .cell("c", "x", "3")],
    )
    .await?;
    t.delete(
        name,
        b"del",
        Delete::Cells(vec![("m".into(), Bytes::from_static(b"a"))]),
    )
    .await?;
    let row = t.get(name, b"del", None).await?.context("del")?;
    ensure!(row.get("m", b"a").is_none() && row.get("m", b"b").is_some() && row.cells.len() == 2);
    t.delete(name, b"del", Delete::Families(vec!["c".into()]))
        .await?;
    let row = t.get(name, b"del", None).await?.context("del")?;
    ensure!(row.cells.len() == 1 && row.cells[0].family == "m");
    t.delete(name, b"del", Delete::Row).await?;
    ensure!(t.get(name, b"del", None).await?.is_none());
    t.delete(name, b"del", Delete::Row)
        .await
        .context("deleting a missing row")?;
    Ok(())
}

async fn large_values(t: &dyn Table, name: &str) -> Result<()> {
    let value: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    t.put(
        name,
        vec![RowPut::new("large").cell("m", "body", value.clone())],
    )
    .await?;
    let row = t.get(name, b"large", None).await?.context("large")?;
    ensure!(
        row.get("m", b"body").map(|v| v.as_ref()) == Some(value.as_slice()),
        "2 MB value corrupted"
    );
    Ok(())
}

async fn concurrent_writers(t: Arc<dyn Table>, name: &str) -> Result<()> {
    let mut tasks = Vec::new();
    for w in 0..4u32 {
        let t = t.clone();
        let name = name.to_string();
        tasks.push(tokio::spawn(async move {
            for batch in 0..5u32 {
                let rows: Vec<RowPut> = (0..50u32)
                    .map(|i| {
                        let n = batch * 50 + i;
                        RowPut::new(format!("cw-{w}-{n:04}")).cell("m", "v", n.to_string())
                    })
                    .chain(std::iter::once(RowPut::new("cw-shared").cell(
                        "m",
                        format!("w{w}-b{batch}"),
                        "x",
                    )))
                    .collect();
                t.put(&name, rows).await?;
            }
            Ok::<_, TableError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rows = t
        .scan(
            name,
            &Scan {
                prefix: Some("cw-".into()),
                ..Scan::default()
            },
        )
        .await?;
    ensure!(
        rows.len() == 4 * 250 + 1,
        "expected 1001 rows, got {}",
        rows.len()
    );
    let shared = t
        .get(name, b"cw-shared", None)
        .await?
        .context("shared row")?;
    ensure!(
        shared.cells.len() == 20,
        "shared row has {} of 20 cells: a concurrent write was lost",
        shared.cells.len()
    );
    Ok(())
}
