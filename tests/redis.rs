//! The Redis cache against a real server (`SIFT_TEST_REDIS`, e.g.
//! `redis://127.0.0.1:6379`, started with `scripts/services.sh up redis`): the
//! cache conformance suite, a server stop and restart in the middle of a run,
//! and what only the Redis layout has (generations deleted after a
//! replacement, native TTLs, leftovers of a crashed replacement swept, `len`
//! without scanning).
//!
//! The fault test stops the shared server, so every test here holds `LOCK`.

#![cfg(feature = "redis")]

mod conformance;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use sift::backends::cache::redis::RedisCache;
use sift::backends::cache::{Cache, CacheError};

use conformance::{service_addr, services, unique};

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A plain connection, to look at the keys the cache leaves in Redis.
async fn raw(addr: &str) -> Result<::redis::aio::MultiplexedConnection> {
    Ok(::redis::Client::open(addr)?
        .get_multiplexed_async_connection()
        .await?)
}

/// Every key matching `pattern`.
async fn keys(
    conn: &mut ::redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>> {
    Ok(::redis::cmd("KEYS").arg(pattern).query_async(conn).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_conformance() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_REDIS") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let cache = RedisCache::connect(&addr).await?;
    conformance::cache::check_cache(&cache).await
}

/// Redis stops mid-run: every call fails with an error naming the server,
/// and the same client works again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_fault() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_REDIS") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let cache = RedisCache::connect(&addr).await?;
    let ns = unique("fault");
    cache
        .set(&ns, "before", Bytes::from_static(b"1"), None)
        .await?;

    services("down", "redis")?;
    let outcome = async {
        for attempt in 0..3 {
            let err = match cache.get(&ns, "before").await {
                Err(e) => e,
                Ok(v) => bail!("get {attempt} while Redis is down answered {v:?}"),
            };
            let CacheError::Backend(msg) = &err else {
                bail!("expected a backend error while Redis is down, got {err:?}");
            };
            eprintln!("while Redis is down: {msg}");
            ensure!(
                msg.contains("127.0.0.1:6379") || msg.contains(&addr),
                "the error names the server: {msg}"
            );
        }
        let err = cache
            .replace_namespace(&ns, vec![("k".into(), Bytes::from_static(b"v"))], None)
            .await;
        ensure!(
            matches!(err, Err(CacheError::Backend(_))),
            "replace while down: {err:?}"
        );
        ensure!(matches!(cache.len(&ns).await, Err(CacheError::Backend(_))));
        Ok(())
    }
    .await;
    // Restart from another thread while this one keeps calling the client.
    let restart = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(2));
        services("up", "redis")
    });
    let recovered = conformance::eventually(60, || async {
        cache
            .set(&ns, "after", Bytes::from_static(b"2"), None)
            .await
            .ok()
    })
    .await;
    restart
        .join()
        .map_err(|_| anyhow::anyhow!("the restart thread panicked"))??;
    outcome?;
    recovered.context("the client did not recover within 60 s of Redis restarting")?;

    // Fully usable again, scripts included (a restarted server has lost them).
    ensure!(cache.get(&ns, "after").await?.as_deref() == Some(&b"2"[..]));
    cache
        .replace_namespace(&ns, vec![("k".into(), Bytes::from_static(b"v"))], None)
        .await?;
    ensure!(cache.len(&ns).await? == 1);
    cache.replace_namespace(&ns, Vec::new(), None).await?;
    Ok(())
}

/// A replacement deletes the generation it displaced, keeps entries native
/// Redis keys with native TTLs, and writes big namespaces in chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_generations() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_REDIS") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let cache = RedisCache::connect(&addr).await?;
    let mut conn = raw(&addr).await?;
    let ns = unique("gens");
    let tag = format!("sift:{{{ns}}}");

    cache.set(&ns, "a", Bytes::from_static(b"1"), None).await?;
    ensure!(
        keys(&mut conn, &format!("{tag}:g0:k:*")).await? == [format!("{tag}:g0:k:a")],
        "an entry is a plain key in generation 0 before any replacement"
    );

    // 25,000 entries span many pipelined chunks; a repeated key counts once.
    let mut entries: Vec<(String, Bytes)> = (0..25_000)
        .map(|i| (format!("key{i}"), Bytes::from(format!("value{i}"))))
        .collect();
    entries.push(("key7".into(), Bytes::from_static(b"last wins")));
    let started = Instant::now();
    cache
        .replace_namespace(&ns, entries, Some(Duration::from_secs(3600)))
        .await?;
    eprintln!("replacing with 25,000 entries took {:?}", started.elapsed());
    ensure!(cache.len(&ns).await? == 25_000);
    let asked: Vec<String> = ["key0", "key7", "key24999", "a", "key25000"]
        .iter()
        .map(|k| (*k).to_owned())
        .collect();
    let got = cache.mget(&ns, &asked).await?;
    ensure!(
        got == [
            Some(Bytes::from_static(b"value0")),
            Some(Bytes::from_static(b"last wins")),
            Some(Bytes::from_static(b"value24999")),
            None,
            None
        ],
        "{got:?}"
    );
    ensure!(
        keys(&mut conn, &format!("{tag}:g0:*")).await?.is_empty(),
        "the displaced generation is deleted"
    );
    let current: String = ::redis::cmd("GET")
        .arg(format!("{tag}:ptr"))
        .query_async(&mut conn)
        .await?;
    let pttl: i64 = ::redis::cmd("PTTL")
        .arg(format!("{tag}:g{current}:k:key0"))
        .query_async(&mut conn)
        .await?;
    ensure!(
        pttl > 3_500_000 && pttl <= 3_600_000,
        "entries carry the replacement's TTL natively, PTTL {pttl}"
    );
    let listed: Vec<String> = ::redis::cmd("SMEMBERS")
        .arg(format!("{tag}:gens"))
        .query_async(&mut conn)
        .await?;
    ensure!(
        listed.is_empty(),
        "no generation left to delete: {listed:?}"
    );

    cache.replace_namespace(&ns, Vec::new(), None).await?;
    ensure!(cache.len(&ns).await? == 0);
    ensure!(
        keys(&mut conn, &format!("{tag}:g{current}:*"))
            .await?
            .is_empty(),
        "emptying deletes the 25,000 entries"
    );
    Ok(())
}

/// A replacement that died half-way leaves a generation with no build
/// lease; the next replacement of the namespace deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_sweeps_abandoned_generations() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_REDIS") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let cache = RedisCache::connect(&addr).await?;
    let mut conn = raw(&addr).await?;
    let ns = unique("sweep");
    let tag = format!("sift:{{{ns}}}");

    // What a crashed replacement leaves: listed, entries written, lease gone.
    ::redis::pipe()
        .cmd("SADD")
        .arg(format!("{tag}:gens"))
        .arg(4242)
        .cmd("SET")
        .arg(format!("{tag}:g4242:k:x"))
        .arg("half-built")
        .cmd("SET")
        .arg(format!("{tag}:g4242:n"))
        .arg(1)
        .exec_async(&mut conn)
        .await?;
    // A replacement in progress elsewhere: its lease is live, so it stays.
    ::redis::pipe()
        .cmd("SADD")
        .arg(format!("{tag}:gens"))
        .arg(4343)
        .cmd("SET")
        .arg(format!("{tag}:g4343:lease"))
        .arg(1)
        .arg("PX")
        .arg(60_000)
        .cmd("SET")
        .arg(format!("{tag}:g4343:k:y"))
        .arg("building")
        .exec_async(&mut conn)
        .await?;

    ensure!(
        cache.get(&ns, "x").await?.is_none(),
        "an unfinished generation is invisible"
    );
    cache
        .replace_namespace(&ns, vec![("z".into(), Bytes::from_static(b"1"))], None)
        .await?;
    ensure!(
        keys(&mut conn, &format!("{tag}:g4242:*")).await?.is_empty(),
        "the abandoned generation is swept"
    );
    ensure!(
        keys(&mut conn, &format!("{tag}:g4343:*")).await?.len() == 2,
        "a generation still being built is left alone"
    );
    let listed: Vec<String> = ::redis::cmd("SMEMBERS")
        .arg(format!("{tag}:gens"))
        .query_async(&mut conn)
        .await?;
    ensure!(listed == ["4343"], "{listed:?}");

    // Clean up the simulated builder too.
    ::redis::cmd("DEL")
        .arg(format!("{tag}:g4343:lease"))
        .exec_async(&mut conn)
        .await?;
    cache.replace_namespace(&ns, Vec::new(), None).await?;
    ensure!(keys(&mut conn, &format!("{tag}:g*")).await?.len() == 1); // the count `n`
    Ok(())
}

/// `len` follows expiry without scanning: entries with a TTL stop counting
/// within a second or so of expiring, renewed and deleted ones count right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_len_follows_expiry() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_REDIS") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let cache = RedisCache::connect(&addr).await?;
    let ns = unique("len");
    let short = Some(Duration::from_millis(500));
    for k in ["s1", "s2", "s3"] {
        cache.set(&ns, k, Bytes::from_static(b"v"), short).await?;
    }
    cache.set(&ns, "s3", Bytes::from_static(b"v"), None).await?; // made permanent
    cache
        .set(
            &ns,
            "long",
            Bytes::from_static(b"v"),
            Some(Duration::from_secs(600)),
        )
        .await?;
    cache
        .set(&ns, "forever", Bytes::from_static(b"v"), None)
        .await?;
    ensure!(cache.delete(&ns, "long").await?);
    ensure!(cache.len(&ns).await? == 4, "s1 s2 s3 forever");

    let settled = conformance::eventually(5, || async {
        matches!(cache.len(&ns).await, Ok(2)).then_some(())
    })
    .await;
    ensure!(
        settled.is_some(),
        "after s1 and s2 expire, len is 2, got {:?}",
        cache.len(&ns).await
    );
    // An expired key written again counts once more.
    cache.set(&ns, "s1", Bytes::from_static(b"v"), None).await?;
    ensure!(cache.len(&ns).await? == 3);
    ensure!(!cache.delete(&ns, "s2").await?, "s2 has expired");
    ensure!(cache.len(&ns).await? == 3);
    cache.replace_namespace(&ns, Vec::new(), None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_connect_errors_name_the_server() -> Result<()> {
    // Nothing listens on port 1; no server is needed.
    let err = RedisCache::connect("redis://:secret@127.0.0.1:1/0")
        .await
        .err()
        .context("connecting to a closed port must fail")?;
    let msg = err.to_string();
    ensure!(msg.contains("127.0.0.1:1"), "{msg}");
    ensure!(!msg.contains("secret"), "the password is not shown: {msg}");
    let err = RedisCache::connect("not a url")
        .await
        .err()
        .context("bad URL")?;
    ensure!(err.to_string().contains("invalid Redis URL"), "{err}");
    Ok(())
}
