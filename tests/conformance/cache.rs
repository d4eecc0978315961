//! Conformance suite for [`Cache`]: the behaviour every cache backend must
//! have, embedded (moka) and real (Redis) alike.
//!
//! Run it on a multi-thread tokio runtime (`#[tokio::test(flavor = "multi_thread")]`):
//! the concurrency checks drive the cache from several OS threads at once, so
//! that a replacement that is not atomic can actually be caught mid-way.
//! Namespaces get a per-run suffix, so the suite can run again against a
//! persistent server.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sift::backends::cache::*;

/// Runs every check against `c`.
pub async fn check_cache(c: &dyn Cache) {
    let suffix = unique_suffix();
    let ns = |name: &str| format!("conf-{name}-{suffix}");
    check_basics(c, &ns("basic")).await;
    check_invalid(c, &ns("invalid")).await;
    check_isolation(c, &ns("iso-a"), &ns("iso-b")).await;
    check_large_value(c, &ns("large")).await;
    check_replace(c, &ns("replace"), &ns("bystander")).await;
    check_ttl(c, &ns("ttl"), &ns("ttl-replace")).await;
    check_replace_is_atomic(c, &ns("atomic")).await;
    check_concurrent_writers(c, &ns("writers")).await;

    // Leave nothing behind on a persistent server.
    let used = [
        "basic",
        "invalid",
        "iso-a",
        "iso-b",
        "large",
        "replace",
        "bystander",
        "ttl",
        "ttl-replace",
        "atomic",
        "writers",
    ];
    for name in used {
        c.replace_namespace(&ns(name), Vec::new(), None)
            .await
            .expect("emptying a namespace");
    }
}

async fn check_basics(c: &dyn Cache, ns: &str) {
    assert_eq!(get(c, ns, "missing").await, None, "a missing key is None");
    set(c, ns, "a", "alpha").await;
    set(c, ns, "b", "beta").await;
    assert_eq!(get(c, ns, "a").await, Some(bytes("alpha")));
    set(c, ns, "a", "alpha2").await;
    assert_eq!(
        get(c, ns, "a").await,
        Some(bytes("alpha2")),
        "set overwrites"
    );

    let keys = strings(&["b", "missing", "a"]);
    let values = c.mget(ns, &keys).await.expect("mget");
    assert_eq!(
        values,
        vec![Some(bytes("beta")), None, Some(bytes("alpha2"))],
        "mget answers in the order asked"
    );
    assert_eq!(c.mget(ns, &[]).await.expect("empty mget"), Vec::new());

    assert!(
        c.delete(ns, "a").await.expect("delete"),
        "deleting a present key"
    );
    assert!(
        !c.delete(ns, "a").await.expect("delete again"),
        "deleting an absent key"
    );
    assert_eq!(get(c, ns, "a").await, None);
    assert_eq!(
        get(c, ns, "b").await,
        Some(bytes("beta")),
        "other keys stay"
    );
}

async fn check_invalid(c: &dyn Cache, ns: &str) {
    let err = c.get("", "k").await;
    assert!(
        matches!(err, Err(CacheError::Invalid { .. })),
        "an empty namespace is invalid, got {err:?}"
    );
    let err = c.set(ns, "", bytes("v"), None).await;
    assert!(
        matches!(err, Err(CacheError::Invalid { .. })),
        "an empty key is invalid, got {err:?}"
    );
}

async fn check_isolation(c: &dyn Cache, a: &str, b: &str) {
    set(c, a, "k", "in a").await;
    set(c, b, "k", "in b").await;
    assert_eq!(get(c, a, "k").await, Some(bytes("in a")));
    assert_eq!(get(c, b, "k").await, Some(bytes("in b")));
    assert!(c.delete(a, "k").await.expect("delete"));
    assert_eq!(get(c, a, "k").await, None);
    assert_eq!(
        get(c, b, "k").await,
        Some(bytes("in b")),
        "deleting in one namespace leaves the other alone"
    );
}

async fn check_large_value(c: &dyn Cache, ns: &str) {
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let big = Bytes::from(big);
    c.set(ns, "big", big.clone(), None).await.expect("set 1 MB");
    assert_eq!(get(c, ns, "big").await, Some(big), "1 MB round-trips");
}

async fn check_replace(c: &dyn Cache, ns: &str, bystander: &str) {
    set(c, ns, "old1", "o1").await;
    set(c, ns, "old2", "o2").await;
    set(c, ns, "kept-name", "old value").await;
    set(c, bystander, "old1", "bystander").await;
    let entries = vec![
        ("new1".to_owned(), bytes("n1")),
        ("new2".to_owned(), bytes("n2")),
        ("kept-name".to_owned(), bytes("new value")),
    ];
    c.replace_namespace(ns, entries, None)
        .await
        .expect("replace_namespace");
    let values = c
        .mget(ns, &strings(&["old1", "old2", "new1", "new2", "kept-name"]))
        .await
        .expect("mget");
    assert_eq!(
        values,
        vec![
            None,
            None,
            Some(bytes("n1")),
            Some(bytes("n2")),
            Some(bytes("new value"))
        ],
        "old keys are gone, new ones are there"
    );
    assert_eq!(c.len(ns).await.expect("len"), 3);
    assert_eq!(
        get(c, bystander, "old1").await,
        Some(bytes("bystander")),
        "other namespaces are untouched"
    );

    c.replace_namespace(ns, Vec::new(), None)
        .await
        .expect("replace with nothing");
    assert_eq!(
        get(c, ns, "new1").await,
        None,
        "replacing with nothing empties"
    );
    assert_eq!(c.len(ns).await.expect("len"), 0);
}

async fn check_ttl(c: &dyn Cache, ns: &str, replaced: &str) {
    let ttl = Some(Duration::from_secs(1));
    c.set(ns, "short", bytes("s"), ttl)
        .await
        .expect("set with ttl");
    set(c, ns, "forever", "f").await;
    c.set(ns, "renewed", bytes("r1"), ttl)
        .await
        .expect("set with ttl");
    set(c, ns, "renewed", "r2").await;
    let entries = vec![("gen".to_owned(), bytes("g"))];
    c.replace_namespace(replaced, entries, ttl)
        .await
        .expect("replace with ttl");
    assert_eq!(
        get(c, ns, "short").await,
        Some(bytes("s")),
        "alive before its TTL"
    );
    assert_eq!(get(c, replaced, "gen").await, Some(bytes("g")));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(c, ns, "short").await, None, "gone after its TTL");
    assert!(
        !c.delete(ns, "short").await.expect("delete expired"),
        "an expired key is not present"
    );
    assert_eq!(
        get(c, ns, "forever").await,
        Some(bytes("f")),
        "no TTL, no expiry"
    );
    assert_eq!(
        get(c, ns, "renewed").await,
        Some(bytes("r2")),
        "a set without TTL replaces the earlier TTL"
    );
    assert_eq!(
        get(c, replaced, "gen").await,
        None,
        "replace_namespace applies its TTL"
    );
}

/// A reader keeps reading every key of a namespace with one `mget` while a
/// writer replaces the namespace generation after generation; every read must
/// see exactly one generation, whole.
async fn check_replace_is_atomic(c: &dyn Cache, ns: &str) {
    const KEYS: usize = 32;
    const GENERATIONS: u64 = 200;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key{i}")).collect();
    let generation = |g: u64| -> Vec<(String, Bytes)> {
        keys.iter()
            .map(|k| (k.clone(), Bytes::from(format!("{g}:{k}"))))
            .collect()
    };
    c.replace_namespace(ns, generation(0), None)
        .await
        .expect("generation 0");

    let done = AtomicBool::new(false);
    let reads = AtomicUsize::new(0);
    let writer = async {
        // Set even if the writer panics, so the reader stops and the panic is reported.
        let _stop = SetOnDrop(&done);
        for g in 1..=GENERATIONS {
            c.replace_namespace(ns, generation(g), None)
                .await
                .expect("replace_namespace");
        }
    };
    let reader = async {
        let mut last_seen = 0;
        loop {
            let finished = done.load(Ordering::SeqCst);
            let values = c.mget(ns, &keys).await.expect("mget");
            let mut seen = None;
            for (key, value) in keys.iter().zip(&values) {
                let value = value.as_ref().unwrap_or_else(|| {
                    panic!("{key} missing in the middle of a replacement: {values:?}")
                });
                let text = std::str::from_utf8(value).expect("utf-8 value");
                let (g, k) = text.split_once(':').expect("generation-tagged value");
                assert_eq!(k, key, "value under the wrong key");
                let g: u64 = g.parse().expect("generation number");
                match seen {
                    None => seen = Some(g),
                    Some(s) => assert_eq!(s, g, "one mget mixed generations: {values:?}"),
                }
            }
            let g = seen.unwrap_or_default();
            assert!(
                g >= last_seen,
                "generations went back from {last_seen} to {g}"
            );
            last_seen = g;
            reads.fetch_add(1, Ordering::Relaxed);
            if finished {
                assert_eq!(last_seen, GENERATIONS, "the last generation stays");
                break;
            }
        }
    };
    in_parallel(vec![Box::pin(writer), Box::pin(reader)]);
    assert!(reads.load(Ordering::Relaxed) > 0);
}

async fn check_concurrent_writers(c: &dyn Cache, ns: &str) {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 50;
    let writer = |w: usize| async move {
        for i in 0..PER_WRITER {
            let key = format!("w{w}-{i}");
            c.set(ns, &key, Bytes::from(key.clone()), None)
                .await
                .expect("concurrent set");
        }
    };
    in_parallel(
        (0..WRITERS)
            .map(|w| Box::pin(writer(w)) as Task<'_>)
            .collect(),
    );
    let keys: Vec<String> = (0..WRITERS)
        .flat_map(|w| (0..PER_WRITER).map(move |i| format!("w{w}-{i}")))
        .collect();
    let values = c.mget(ns, &keys).await.expect("mget");
    for (key, value) in keys.iter().zip(values) {
        assert_eq!(value, Some(Bytes::from(key.clone())), "{key} was written");
    }
    assert_eq!(c.len(ns).await.expect("len"), (WRITERS * PER_WRITER) as u64);
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type Task<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Runs each task on its own OS thread at the same time, and waits for all.
/// A panic in a task is raised again here.
fn in_parallel(tasks: Vec<Task<'_>>) {
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
            let panics: Vec<_> = threads
                .into_iter()
                .filter_map(|thread| thread.join().err())
                .collect();
            if let Some(panic) = panics.into_iter().next() {
                std::panic::resume_unwind(panic);
            }
        });
    });
}

async fn get(c: &dyn Cache, ns: &str, key: &str) -> Option<Bytes> {
    c.get(ns, key).await.expect("get")
}

async fn set(c: &dyn Cache, ns: &str, key: &str, value: &str) {
    c.set(ns, key, bytes(value), None).await.expect("set");
}

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn strings(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}

/// A suffix that differs between runs and between calls in one run.
fn unique_suffix() -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        CALLS.fetch_add(1, Ordering::Relaxed)
    )
}
