//! Conformance suite of the `ObjectStore` trait.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use sift::backends::objects::{ObjectError, ObjectStore, PutMode};
use tokio::io::AsyncReadExt;

use super::unique;

/// Runs every check.
pub async fn check_objects(store: Arc<dyn ObjectStore>) -> Result<()> {
    let p = unique("conf");
    basics(store.as_ref(), &p).await.context("basics")?;
    listing(store.as_ref(), &p).await.context("listing")?;
    conditional(store.as_ref(), &p)
        .await
        .context("conditional puts")?;
    cas_counter(store.clone(), &p)
        .await
        .context("compare-and-swap under contention")?;
    large_streams(store.as_ref(), &p)
        .await
        .context("large streamed objects")?;
    Ok(())
}

async fn basics(s: &dyn ObjectStore, p: &str) -> Result<()> {
    let key = format!("{p}/basic/hello.txt");
    ensure!(s.head(&key).await?.is_none());
    ensure!(matches!(s.get(&key).await, Err(ObjectError::NotFound(_))));
    let m1 = s
        .put(&key, Bytes::from_static(b"hello"), PutMode::Overwrite)
        .await?;
    ensure!(m1.size == 5 && m1.key == key);
    let (m, body) = s.get(&key).await?;
    ensure!(body.as_ref() == b"hello" && m.etag == m1.etag);
    let head = s.head(&key).await?.context("head after put")?;
    ensure!(head.etag == m1.etag && head.size == 5);
    let m2 = s
        .put(
            &key,
            Bytes::from_static(b"hello, again"),
            PutMode::Overwrite,
        )
        .await?;
    ensure!(
        m2.etag != m1.etag,
        "ETag must change when the object changes"
    );
    ensure!(s.get(&key).await?.1.as_ref() == b"hello, again");
    let empty = format!("{p}/basic/empty");
    s.put(&empty, Bytes::new(), PutMode::Overwrite).await?;
    ensure!(s.get(&empty).await?.1.is_empty());
    s.delete(&key).await?;
    ensure!(s.head(&key).await?.is_none());
    s.delete(&key).await?; // deleting again is fine
    s.delete(&empty).await?;
    for bad in ["", "/abs", "a/../b", "a//b", "trailing/"] {
        ensure!(
            matches!(
                s.put(bad, Bytes::new(), PutMode::Overwrite).await,
                Err(ObjectError::InvalidKey { .. })
            ),
            "key {bad:?} must be refused"
        );
    }
    Ok(())
}

async fn listing(s: &dyn ObjectStore, p: &str) -> Result<()> {
    let keys = [
        "raw/dt=2026-11-24/source=a/part-0.jsonl.gz",
        "raw/dt=2026-11-25/source=a/part-0.jsonl.gz",
        "raw/dt=2026-11-25/source=b/part-0.jsonl.gz",
        "raw/dt=2026-11-25/source=b/part-1.jsonl.gz",
        "models/v1/model.safetensors",
    ];
    for k in keys {
        s.put(
            &format!("{p}/{k}"),
            Bytes::from(k.to_string()),
            PutMode::Overwrite,
        )
        .await?;
    }
    let all = s.list(&format!("{p}/")).await?;
    let got: Vec<&str> = all.iter().map(|m| m.key.as_str()).collect();
    let mut want: Vec<String> = keys.iter().map(|k| format!("{p}/{k}")).collect();
    want.sort();
    ensure!(got == want, "list all: {got:?}");
    // A prefix that ends inside a path segment.
    let day = s.list(&format!("{p}/raw/dt=2026-11-2")).await?;
    ensure!(day.len() == 4);
    let b = s.list(&format!("{p}/raw/dt=2026-11-25/source=b")).await?;
    ensure!(
        b.len() == 2
            && b[0].key.ends_with("part-0.jsonl.gz")
            && b[1].key.ends_with("part-1.jsonl.gz")
    );
    ensure!(b.iter().all(|m| m.size > 0 && !m.etag.is_empty()));
    ensure!(s.list(&format!("{p}/nothing-here/")).await?.is_empty());
    for k in keys {
        s.delete(&format!("{p}/{k}")).await?;
    }
    ensure!(
        s.list(&format!("{p}/raw/")).await?.is_empty(),
        "deleted objects still listed"
    );
    Ok(())
}

async fn conditional(s: &dyn ObjectStore, p: &str) -> Result<()> {
    let key = format!("{p}/models/LATEST");
    let m1 = s
        .put(&key, Bytes::from_static(b"v1"), PutMode::IfAbsent)
        .await?;
    ensure!(
        matches!(
            s.put(&key, Bytes::from_static(b"v1b"), PutMode::IfAbsent)
                .await,
            Err(ObjectError::PreconditionFailed { .. })
        ),
        "IfAbsent must fail when the object exists"
    );
    let m2 = s
        .put(
            &key,
            Bytes::from_static(b"v2"),
            PutMode::IfMatch(m1.etag.clone()),
        )
        .await?;
    ensure!(
        matches!(
            s.put(
                &key,
                Bytes::from_static(b"v3"),
                PutMode::IfMatch(m1.etag.clone())
            )
            .await,
            Err(ObjectError::PreconditionFailed { .. })
        ),
        "IfMatch with a stale ETag must fail"
    );
    ensure!(
        s.get(&key).await?.1.as_ref() == b"v2",
        "a failed conditional put changed the object"
    );
    ensure!(
        matches!(
            s.put(
                &format!("{p}/models/NONE"),
                Bytes::new(),
                PutMode::IfMatch(m2.etag.clone())
            )
            .await,
            Err(ObjectError::PreconditionFailed { .. })
        ),
        "IfMatch on a missing object must fail"
    );
    s.delete(&key).await?;
    Ok(())
}

async fn cas_counter(store: Arc<dyn ObjectStore>, p: &str) -> Result<()> {
    let key = format!("{p}/counter");
    store
        .put(&key, Bytes::from_static(b"0"), PutMode::IfAbsent)
        .await?;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = store.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u32;
            for _ in 0..10 {
                loop {
                    let (m, body) = store.get(&key).await?;
                    let n: u64 = String::from_utf8_lossy(&body).parse().unwrap_or(u64::MAX);
                    match store
                        .put(
                            &key,
                            Bytes::from((n + 1).to_string()),
                            PutMode::IfMatch(m.etag),
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(ObjectError::PreconditionFailed { .. }) => conflicts += 1,
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok::<_, ObjectError>(conflicts)
        }));
    }
    for t in tasks {
        t.await??;
    }
    let (_, body) = store.get(&key).await?;
    ensure!(
        body.as_ref() == b"60",
        "60 CAS increments left {:?}: an update was lost",
        String::from_utf8_lossy(&body)
    );
    store.delete(&key).await?;
    Ok(())
}

async fn large_streams(s: &dyn ObjectStore, p: &str) -> Result<()> {
    let key = format!("{p}/large/body.bin");
    let data: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let reader = std::io::Cursor::new(data.clone());
    let m = s
        .put_stream(&key, Box::new(reader), PutMode::Overwrite)
        .await?;
    ensure!(m.size == data.len() as u64);
    let (m2, mut r) = s.get_stream(&key).await?;
    ensure!(m2.size == data.len() as u64);
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    ensure!(
        back == data,
        "5 MB object corrupted in a streamed round trip"
    );
    let (_, whole) = s.get(&key).await?;
    ensure!(whole.as_ref() == data.as_slice());
    s.delete(&key).await?;
    Ok(())
}
