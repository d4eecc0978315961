//! The S3 object store against a real S3-compatible server (`SIFT_TEST_S3`,
//! an endpoint URL such as `http://127.0.0.1:5000`, moto's S3 started with
//! `scripts/services.sh up s3`): the object store conformance suite, a server
//! stop and restart in the middle of a run, and what only S3 has (multipart
//! uploads, aborted on failure and conditional on completion; list
//! pagination; ETags passed through verbatim; server-side encryption, and
//! `sift archive` writing encrypted parts).
//!
//! Each test works in a bucket of its own, created by the client. The fault
//! test stops the shared server, so every test here holds `LOCK`.

#![cfg(feature = "s3")]

mod conformance;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use sift::backends::objects::s3::S3Objects;
use sift::backends::objects::{Encryption, ObjectError, ObjectStore, PutMode, PutOptions};
use sift::config::S3Config;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use conformance::{service_addr, services, unique};

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The store in a fresh bucket. moto takes any credentials; the standard
/// chain finds them in the environment.
fn config(endpoint: &str, bucket: &str) -> S3Config {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "sift-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "sift-test");
    }
    S3Config {
        bucket: bucket.to_string(),
        region: "us-east-1".into(),
        endpoint: endpoint.to_string(),
        path_style: true,
        create_bucket: true,
    }
}

async fn connect(endpoint: &str) -> Result<(S3Objects, S3Config)> {
    let config = config(endpoint, &unique("sift-test").to_lowercase());
    Ok((S3Objects::connect(&config).await?, config))
}

/// The SDK client on its own, to look behind the store (multipart uploads).
async fn raw_client(config: &S3Config) -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(config.region.clone()))
        .endpoint_url(&config.endpoint)
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_conformance() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_S3") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let (store, _) = connect(&addr).await?;
    conformance::objects::check_objects(Arc::new(store)).await
}

/// moto stops mid-run: calls fail with an error naming the endpoint, and the
/// same client works again once it is back. moto keeps nothing across a
/// restart, so the bucket is created again before the client is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_fault() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_S3") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let (store, config) = connect(&addr).await?;
    store
        .put("before", Bytes::from_static(b"1"), PutMode::Overwrite)
        .await?;

    services("down", "s3")?;
    let outcome = async {
        let err = match store.get("before").await {
            Err(e) => e,
            Ok(_) => bail!("get answered while the store is down"),
        };
        let ObjectError::Backend(msg) = &err else {
            bail!("expected a backend error while the store is down, got {err:?}");
        };
        eprintln!("while the store is down: {msg}");
        ensure!(
            msg.contains(&addr) && msg.contains("running and reachable"),
            "the error names the endpoint and says what to check: {msg}"
        );
        let err = store
            .put("during", Bytes::from_static(b"x"), PutMode::IfAbsent)
            .await;
        ensure!(
            matches!(err, Err(ObjectError::Backend(_))),
            "put while down: {err:?}"
        );
        ensure!(matches!(store.list("").await, Err(ObjectError::Backend(_))));
        Ok(())
    }
    .await;
    let restarted = services("up", "s3");
    outcome?;
    restarted?;

    // The bucket went with moto's memory; a second client creates it again.
    S3Objects::connect(&config).await?;
    let recovered = conformance::eventually(30, || async {
        store
            .put("after", Bytes::from_static(b"2"), PutMode::IfAbsent)
            .await
            .ok()
    })
    .await;
    recovered.context("the client did not recover after the store restarted")?;
    ensure!(store.get("after").await?.1.as_ref() == b"2");
    ensure!(store.list("").await?.len() == 1);
    store.delete("after").await?;
    Ok(())
}

/// Deterministic content: byte `i` of every generated body.
fn byte_at(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// A body generated on the fly, so the test does not hold it either, that
/// fails with an I/O error after `fail_at` bytes if set.
struct Generated {
    pos: u64,
    len: u64,
    fail_at: Option<u64>,
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.fail_at.is_some_and(|at| self.pos >= at) {
            return Poll::Ready(Err(std::io::Error::other("the source went away")));
        }
        let n = (buf.remaining() as u64)
            .min(self.len - self.pos)
            .min(64 * 1024);
        let start = self.pos;
        let chunk: Vec<u8> = (start..start + n).map(byte_at).collect();
        buf.put_slice(&chunk);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

fn hash_of(len: u64) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut chunk = Vec::with_capacity(1 << 20);
    let mut i = 0;
    while i < len {
        chunk.clear();
        let end = (i + (1 << 20)).min(len);
        chunk.extend((i..end).map(byte_at));
        h.update(&chunk);
        i = end;
    }
    h.finalize()
}

/// A 20 MB streamed put goes as a multipart upload (three parts) and reads
/// back identical; a multipart put honours IfAbsent on completion; a stream
/// that fails half-way leaves no upload behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_multipart() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_S3") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let (store, config) = connect(&addr).await?;
    let len = 20_000_000u64;
    let body = || {
        Box::new(Generated {
            pos: 0,
            len,
            fail_at: None,
        })
    };

    let m = store
        .put_stream("big/body.bin", body(), PutMode::IfAbsent)
        .await?;
    ensure!(m.size == len);
    ensure!(
        m.etag.trim_matches('"').ends_with("-3"),
        "a 20 MB body goes in three 8 MiB parts, ETag {}",
        m.etag
    );
    let head = store.head("big/body.bin").await?.context("head")?;
    ensure!(head.etag == m.etag && head.size == len, "{head:?} vs {m:?}");

    let (got, mut reader) = store.get_stream("big/body.bin").await?;
    ensure!(got.etag == m.etag && got.size == len);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    ensure!(read == len, "read back {read} bytes of {len}");
    ensure!(
        hasher.finalize() == hash_of(len),
        "20 MB body changed in a round trip"
    );

    let again = store
        .put_stream("big/body.bin", body(), PutMode::IfAbsent)
        .await;
    ensure!(
        matches!(again, Err(ObjectError::PreconditionFailed { .. })),
        "a multipart IfAbsent put over an existing object fails, got {again:?}"
    );
    ensure!(store.head("big/body.bin").await?.context("head")?.etag == m.etag);

    let broken = Box::new(Generated {
        pos: 0,
        len,
        fail_at: Some(12_000_000),
    });
    let err = store
        .put_stream("big/broken.bin", broken, PutMode::Overwrite)
        .await;
    ensure!(matches!(err, Err(ObjectError::Io { .. })), "{err:?}");
    ensure!(store.head("big/broken.bin").await?.is_none());
    let uploads = raw_client(&config)
        .await
        .list_multipart_uploads()
        .bucket(&config.bucket)
        .send()
        .await?;
    ensure!(
        uploads.uploads().is_empty(),
        "failed uploads are aborted, found {:?}",
        uploads.uploads()
    );
    store.delete("big/body.bin").await?;
    Ok(())
}

/// More than 1000 keys (S3's page size) list whole and sorted, and an ETag
/// taken from a listing works for a compare-and-swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_list_pagination() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_S3") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let (store, _) = connect(&addr).await?;
    let store = Arc::new(store);
    const KEYS: usize = 1234;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in (worker..KEYS).step_by(16) {
                store
                    .put(
                        &format!("many/{i:05}"),
                        Bytes::from(i.to_string()),
                        PutMode::Overwrite,
                    )
                    .await?;
            }
            Ok::<_, ObjectError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    store
        .put("other/x", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await?;

    let listed = store.list("many/").await?;
    ensure!(listed.len() == KEYS, "listed {} of {KEYS}", listed.len());
    ensure!(listed
        .iter()
        .enumerate()
        .all(|(i, m)| m.key == format!("many/{i:05}")));
    ensure!(store.list("many/01").await?.len() == 234);

    let first = &listed[0];
    let swapped = store
        .put(
            &first.key,
            Bytes::from_static(b"swapped"),
            PutMode::IfMatch(first.etag.clone()),
        )
        .await?;
    ensure!(store.get(&first.key).await?.0.etag == swapped.etag);
    let stale = store
        .put(
            &first.key,
            Bytes::from_static(b"stale"),
            PutMode::IfMatch(first.etag.clone()),
        )
        .await;
    ensure!(matches!(stale, Err(ObjectError::PreconditionFailed { .. })));

    for m in store.list("").await? {
        store.delete(&m.key).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_missing_bucket_is_explained() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_S3") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let mut config = config(&addr, &unique("absent").to_lowercase());
    config.create_bucket = false;
    let err = S3Objects::connect(&config)
        .await
        .err()
        .context("connecting to a missing bucket must fail")?;
    let msg = err.to_string();
    ensure!(
        msg.contains("does not exist") && msg.contains("create_bucket"),
        "{msg}"
    );
    Ok(())
}

/// SSE-S3 and SSE-KMS asked for on put, streamed put and multipart upload
/// are what head and get report afterwards. moto accepts any KMS key id
/// without a KMS key behind it (AWS would need the key to exist and the
/// caller to be allowed to use it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_server_side_encryption() -> Result<()> {
    let Some(addr) = service_addr("SIFT_TEST_S3") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let (store, _) = connect(&addr).await?;
    ensure!(store.supports_encryption());
    let kms = Encryption::SseKms {
        key_id: Some("arn:aws:kms:us-east-1:123456789012:key/sift-test".into()),
    };
    let sse_s3 = PutOptions {
        encryption: Some(Encryption::SseS3),
    };
    let sse_kms = PutOptions {
        encryption: Some(kms.clone()),
    };

    let put = store
        .put_with(
            "enc/s3",
            Bytes::from_static(b"secret"),
            PutMode::Overwrite,
            &sse_s3,
        )
        .await?;
    ensure!(put.encryption == Some(Encryption::SseS3), "put: {put:?}");
    let head = store.head("enc/s3").await?.context("head")?;
    ensure!(head.encryption == Some(Encryption::SseS3), "head: {head:?}");
    let (got, body) = store.get("enc/s3").await?;
    ensure!(got.encryption == Some(Encryption::SseS3) && body.as_ref() == b"secret");

    let put = store
        .put_with(
            "enc/kms",
            Bytes::from_static(b"secret"),
            PutMode::IfAbsent,
            &sse_kms,
        )
        .await?;
    ensure!(put.encryption.as_ref() == Some(&kms), "put: {put:?}");
    let head = store.head("enc/kms").await?.context("head")?;
    ensure!(head.encryption.as_ref() == Some(&kms), "head: {head:?}");
    let (got, _) = store.get_stream("enc/kms").await?;
    ensure!(got.encryption.as_ref() == Some(&kms), "get: {got:?}");

    // A streamed put of three parts: encryption is set on the multipart upload.
    let len = 20_000_000u64;
    let body = Box::new(Generated {
        pos: 0,
        len,
        fail_at: None,
    });
    let put = store
        .put_stream_with("enc/big", body, PutMode::Overwrite, &sse_kms)
        .await?;
    ensure!(put.etag.trim_matches('"').ends_with("-3"), "{put:?}");
    ensure!(
        put.encryption.as_ref() == Some(&kms),
        "multipart put: {put:?}"
    );
    let head = store.head("enc/big").await?.context("head")?;
    ensure!(
        head.encryption.as_ref() == Some(&kms) && head.size == len,
        "head: {head:?}"
    );

    // A small streamed put goes as one PutObject, with the same headers.
    let small = Box::new(Generated {
        pos: 0,
        len: 1000,
        fail_at: None,
    });
    store
        .put_stream_with("enc/small", small, PutMode::Overwrite, &sse_s3)
        .await?;
    let head = store.head("enc/small").await?.context("head")?;
    ensure!(head.encryption == Some(Encryption::SseS3), "head: {head:?}");

    for m in store.list("").await? {
        store.delete(&m.key).await?;
    }
    Ok(())
}

/// `sift archive` on the embedded log and S3 with `encryption = "sse_kms"`:
/// every part is stored with SSE-KMS under the configured key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_archive_parts_are_encrypted() -> Result<()> {
    use sift::backends::log::{EmbeddedLog, Log, Record};
    use sift::envelope::{document_id, topics, Envelope, SCHEMA_VERSION};

    let Some(addr) = service_addr("SIFT_TEST_S3") else {
        return Ok(());
    };
    let _guard = LOCK.lock().await;
    let (store, _) = connect(&addr).await?;
    let dir = tempfile::tempdir()?;
    let log = Arc::new(EmbeddedLog::open(
        &dir.path().join("log"),
        Default::default(),
    )?);
    log.create_topic(topics::RAW, 2).await?;
    let records = (0..40)
        .map(|n| {
            let url = format!("https://example.org/{n}");
            let env = Envelope {
                v: SCHEMA_VERSION,
                id: document_id("src", &url),
                source: ["src", "other src"][n % 2].into(),
                url,
                fetched_at_ms: 1_709_251_200_000 + n as i64 * 3_600_000,
                content_type: "text/plain".into(),
                title: String::new(),
                text: Some(format!("text {n}")),
                body_uri: None,
                metadata: Default::default(),
            };
            Ok(Record::new(env.id.clone(), serde_json::to_vec(&env)?))
        })
        .collect::<Result<Vec<_>>>()?;
    log.produce(topics::RAW, records).await?;

    let mut config = sift::config::Config {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    config.objects.backend = sift::config::ObjectsBackend::S3;
    config.archive.encryption = sift::config::Encryption::SseKms;
    config.archive.kms_key_id = "alias/sift-archive".into();
    let summary = sift::archive::run(
        log.clone(),
        Arc::new(store.clone()),
        &config,
        sift::archive::Until::caught_up(),
    )
    .await?;
    ensure!(summary.records == 40, "{summary:?}");
    let parts = store.list("raw/").await?;
    ensure!(parts.len() as u64 == summary.parts && !parts.is_empty());
    let mut lines = 0;
    for p in &parts {
        ensure!(p.key.contains("/source=src/") || p.key.contains("/source=other%20src/"));
        let head = store.head(&p.key).await?.context("head")?;
        ensure!(
            head.encryption
                == Some(Encryption::SseKms {
                    key_id: Some("alias/sift-archive".into())
                }),
            "{head:?}"
        );
        let (_, body) = store.get(&p.key).await?;
        lines += zstd::decode_all(&body[..])?
            .iter()
            .filter(|b| **b == b'\n')
            .count();
    }
    ensure!(lines == 40);
    for m in store.list("").await? {
        store.delete(&m.key).await?;
    }
    Ok(())
}
