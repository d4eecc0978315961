//! Conformance suite of the `Cache` trait: the behaviour every cache backend
//! must have, embedded (moka) and real (Redis) alike.
//!
//! Run it on a multi-thread tokio runtime (`#[tokio::test(flavor = "multi_thread")]`):
//! the concurrency checks drive the cache from several OS threads at once, so
//! that a replacement that is not atomic can actually be caught mid-way.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use sift::backends::cache::*;

use super::unique;

/// Runs every check, then empties the namespaces it used.
pub async fn check_cache(c: &dyn Cache) -> Result<()> {
    let run = unique("conf");
    let ns = |name: &str| format!("{run}-{name}");
    basics(c, &ns("basic")).await.context("basics")?;
    invalid(c, &ns("invalid")).await.context("invalid names")?;
    isolation(c, &ns("iso-a"), &ns("iso-b"))
        .await
        .context("namespace isolation")?;
    large_value(c, &ns("large")).await.context("large value")?;
    replace(c, &ns("replace"), &ns("bystander"))
        .await
        .context("replace_namespace")?;
    ttl(c, &ns("ttl"), &ns("ttl-replace"))
        .await
        .context("TTL expiry")?;
    replace_is_atomic(c, &ns("atomic"))
        .await
        .context("replace_namespace under concurrent reads")?;
    concurrent_writers(c, &ns("writers"))
        .await
        .context("concurrent writers")?;

    // Leave nothing behind on a persistent server.
    for name in [
        "basic",
        "iso-a",
        "iso-b",
        "large",
        "replace",
        "bystander",
        "ttl",
        "ttl-replace",
        "atomic",
        "writers",
    ] {
        c.replace_namespace(&ns(name), Vec::new(), None)
            .await
            .context("emptying a namespace")?;
    }
    Ok(())
}

async fn basics(c: &dyn Cache, ns: &str) -> Result<()> {
    ensure!(
        c.get(ns, "missing").await?.is_none(),
        "a missing key is None"
    );
    set(c, ns, "a", "alpha").await?;
    set(c, ns, "b", "beta").await?;
    expect(c, ns, "a", Some("alpha")).await?;
    set(c, ns, "a", "alpha2").await?;
    expect(c, ns, "a", Some("alpha2"))
        .await
        .context("set overwrites")?;

    let values = c.mget(ns, &strings(&["b", "missing", "a"])).await?;
    ensure!(
        values == [Some(bytes("beta")), None, Some(bytes("alpha2"))],
        "mget answers in the order asked: {values:?}"
    );
    ensure!(c.mget(ns, &[]).await?.is_empty(), "an empty mget");

    ensure!(c.delete(ns, "a").await?, "deleting a present key is true");
    ensure!(!c.delete(ns, "a").await?, "deleting an absent key is false");
    expect(c, ns, "a", None).await?;
    expect(c, ns, "b", Some("beta"))
        .await
        .context("other keys stay")?;
    Ok(())
}

async fn invalid(c: &dyn Cache, ns: &str) -> Result<()> {
    let err = c.get("", "k").await;
    ensure!(
        matches!(err, Err(CacheError::Invalid { .. })),
        "an empty namespace is invalid, got {err:?}"
    );
    let err = c.set(ns, "", bytes("v"), None).await;
    ensure!(
        matches!(err, Err(CacheError::Invalid { .. })),
        "an empty key is invalid, got {err:?}"
    );
    Ok(())
}

async fn isolation(c: &dyn Cache, a: &str, b: &str) -> Result<()> {
    set(c, a, "k", "in a").await?;
    set(c, b, "k", "in b").await?;
    expect(c, a, "k", Some("in a")).await?;
    expect(c, b, "k", Some("in b")).await?;
    ensure!(c.delete(a, "k").await?);
    expect(c, a, "k", None).await?;
    expect(c, b, "k", Some("in b"))
        .await
        .context("deleting in one namespace leaves the other alone")?;
    Ok(())
}

async fn large_value(c: &dyn Cache, ns: &str) -> Result<()> {
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let big = Bytes::from(big);
    c.set(ns, "big", big.clone(), None).await?;
    let got = c.get(ns, "big").await?.context("1 MB value missing")?;
    ensure!(got == big, "1 MB value came back different");
    Ok(())
}

async fn replace(c: &dyn Cache, ns: &str, bystander: &str) -> Result<()> {
    set(c, ns, "old1", "o1").await?;
    set(c, ns, "old2", "o2").await?;
    set(c, ns, "kept-name", "old value").await?;
    set(c, bystander, "old1", "bystander").await?;
    let entries = vec![
        ("new1".to_owned(), bytes("n1")),
        ("new2".to_owned(), bytes("n2")),
        ("kept-name".to_owned(), bytes("new value")),
    ];
    c.replace_namespace(ns, entries, None).await?;
    let values = c
        .mget(ns, &strings(&["old1", "old2", "new1", "new2", "kept-name"]))
        .await?;
    let expected = [
        None,
        None,
        Some(bytes("n1")),
        Some(bytes("n2")),
        Some(bytes("new value")),
    ];
    ensure!(
        values == expected,
        "old keys are gone, new ones are there: {values:?}"
    );
    let len = c.len(ns).await?;
    ensure!(len == 3, "len after replacing with 3 entries is {len}");
    expect(c, bystander, "old1", Some("bystander"))
        .await
        .context("other namespaces are untouched")?;

    c.replace_namespace(ns, Vec::new(), None).await?;
    expect(c, ns, "new1", None)
        .await
        .context("replacing with nothing empties")?;
    let len = c.len(ns).await?;
    ensure!(len == 0, "len of an emptied namespace is {len}");
    Ok(())
}

async fn ttl(c: &dyn Cache, ns: &str, replaced: &str) -> Result<()> {
    let ttl = Some(Duration::from_secs(1));
    c.set(ns, "short", bytes("s"), ttl).await?;
    set(c, ns, "forever", "f").await?;
    c.set(ns, "renewed", bytes("r1"), ttl).await?;
    set(c, ns, "renewed", "r2").await?;
    let entries = vec![("gen".to_owned(), bytes("g"))];
    c.replace_namespace(replaced, entries, ttl).await?;
    expect(c, ns, "short", Some("s"))
        .await
        .context("alive before its TTL")?;
    expect(c, replaced, "gen", Some("g")).await?;

    tokio::time::sleep(Duration::from_millis(1500)).await;
    expect(c, ns, "short", None)
        .await
        .context("gone after its TTL")?;
    ensure!(
        !c.delete(ns, "short").await?,
        "an expired key is not present"
    );
    expect(c, ns, "forever", Some("f"))
        .await
        .context("no TTL, no expiry")?;
    expect(c, ns, "renewed", Some("r2"))
        .await
        .context("a set without TTL drops the earlier TTL")?;
    expect(c, replaced, "gen", None)
        .await
        .context("replace_namespace applies its TTL")?;
    Ok(())
}

/// A reader keeps reading every key of a namespace with one `mget` while a
/// writer replaces the namespace generation after generation; every read must
/// see exactly one generation, whole, and never an older one than before.
async fn replace_is_atomic(c: &dyn Cache, ns: &str) -> Result<()> {
    const KEYS: usize = 32;
    const GENERATIONS: u64 = 200;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key{i}")).collect();
    let generation = |g: u64| -> Vec<(String, Bytes)> {
        keys.iter()
            .map(|k| (k.clone(), Bytes::from(format!("{g}:{k}"))))
            .collect()
    };
    c.replace_namespace(ns, generation(0), None).await?;

    let done = AtomicBool::new(false);
    let reads = AtomicUsize::new(0);
    let writer = async {
        // Set however the writer ends, so the reader always stops.
        let _stop = SetOnDrop(&done);
        for g in 1..=GENERATIONS {
            c.replace_namespace(ns, generation(g), None).await?;
        }
        Ok(())
    };
    let reader = async {
        let mut last_seen = 0;
        loop {
            let finished = done.load(Ordering::SeqCst);
            let values = c.mget(ns, &keys).await?;
            let mut seen = None;
            for (key, value) in keys.iter().zip(&values) {
                let value = value
                    .as_ref()
                    .with_context(|| format!("{key} missing during a replacement: {values:?}"))?;
                let text = std::str::from_utf8(value)?;
                let (g, k) = text.split_once(':').context("generation-tagged value")?;
                ensure!(k == key, "{key} holds the value of {k}");
                let g: u64 = g.parse()?;
                ensure!(
                    seen.is_none_or(|s| s == g),
                    "one mget mixed generations: {values:?}"
                );
                seen = Some(g);
            }
            let g = seen.unwrap_or_default();
            ensure!(
                g >= last_seen,
                "generations went back from {last_seen} to {g}"
            );
            last_seen = g;
            reads.fetch_add(1, Ordering::Relaxed);
            if finished {
                ensure!(
                    last_seen == GENERATIONS,
                    "the last generation stays, saw {last_seen}"
                );
                return Ok(());
            }
        }
    };
    in_parallel(vec![Box::pin(writer), Box::pin(reader)])?;
    ensure!(reads.load(Ordering::Relaxed) > 0);
    Ok(())
}

async fn concurrent_writers(c: &dyn Cache, ns: &str) -> Result<()> {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 50;
    let writer = |w: usize| async move {
        for i in 0..PER_WRITER {
            let key = format!("w{w}-{i}");
            c.set(ns, &key, Bytes::from(key.clone()), None).await?;
        }
        Ok(())
    };
    in_parallel(
        (0..WRITERS)
            .map(|w| Box::pin(writer(w)) as Task<'_>)
            .collect(),
    )?;
    let keys: Vec<String> = (0..WRITERS)
        .flat_map(|w| (0..PER_WRITER).map(move |i| format!("w{w}-{i}")))
        .collect();
    let values = c.mget(ns, &keys).await?;
    for (key, value) in keys.iter().zip(values) {
        ensure!(
            value.as_deref() == Some(key.as_bytes()),
            "{key} holds {value:?}"
        );
    }
    let len = c.len(ns).await?;
    ensure!(
        len == (WRITERS * PER_WRITER) as u64,
        "len is {len}, expected {}",
        WRITERS * PER_WRITER
    );
    Ok(())
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type Task<'a> = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

/// Runs each task on its own OS thread at the same time and waits for all;
/// the first error (or panic) is passed on.
fn in_parallel(tasks: Vec<Task<'_>>) -> Result<()> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let threads: Vec<_> = tasks
                .into_iter()
                .map(|task| {
                    let handle = handle.clone();
                    scope.spawn(move || handle.block_on(task))
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
            for result in results {
                match result {
                    Ok(outcome) => outcome?,
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            Ok(())
        })
    })
}

async fn set(c: &dyn Cache, ns: &str, key: &str, value: &str) -> Result<()> {
    c.set(ns, key, bytes(value), None)
        .await
        .with_context(|| format!("set {ns}/{key}"))
}

/// The value under `key` is `expected`.
async fn expect(c: &dyn Cache, ns: &str, key: &str, expected: Option<&str>) -> Result<()> {
    let got = c.get(ns, key).await?;
    ensure!(
        got.as_deref() == expected.map(str::as_bytes),
        "{ns}/{key} holds {got:?}, expected {expected:?}"
    );
    Ok(())
}

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn strings(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}
