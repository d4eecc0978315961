//! The S3 object store (AWS S3 or any S3-compatible store).
//!
//! Objects map one to one onto S3 objects in one bucket. ETags are S3's own,
//! passed through verbatim (with their quotes) by put, head, get and list, and
//! sent back verbatim in `If-Match`, so an ETag read from any of them can be
//! used for a compare-and-swap. Conditional puts are enforced by S3 itself
//! (`If-None-Match: *`, `If-Match`), never emulated on the client, so they hold
//! between any number of writers.
//!
//! Streamed puts of more than one part use a multipart upload: parts are read
//! from the stream one at a time and a few are uploaded concurrently, so
//! memory stays at a few parts whatever the body's size; the write condition
//! is checked when the upload completes, and an upload that fails is aborted.
//!
//! Server-side encryption ([`PutOptions::encryption`]) is S3's own: SSE-S3
//! sends `x-amz-server-side-encryption: AES256`, SSE-KMS sends `aws:kms` and,
//! when a key is named, `x-amz-server-side-encryption-aws-kms-key-id`, on
//! `PutObject` and on `CreateMultipartUpload` (parts inherit it; only SSE-C,
//! which sift does not use, needs headers on each part). What S3 answers
//! about an object's encryption is reported in [`ObjectMeta::encryption`].
//!
//! Credentials come from the standard AWS chain (environment, profile, web
//! identity, instance metadata); transient failures are retried by the SDK.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
    ServerSideEncryption,
};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use super::{validate_key, Encryption, ObjectError, ObjectMeta, ObjectReader, PutMode, PutOptions};
use crate::config::S3Config;

/// Size of each part of a multipart upload, and the threshold below which a
/// streamed body goes as one `PutObject`. 8 MiB parts allow objects up to
/// 78 GiB (S3 takes at most 10,000 parts).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Most parts S3 accepts in one multipart upload.
const MAX_PARTS: i32 = 10_000;
/// Parts uploaded at the same time; with the part being read, memory use of
/// a streamed put is at most this many parts plus one.
const PARTS_IN_FLIGHT: usize = 4;

/// The object store in an S3 bucket.
///
/// Cloning is cheap; clones share the HTTP client.
#[derive(Clone)]
pub struct S3Objects {
    client: Client,
    bucket: String,
    /// "bucket `b` at <endpoint>", for messages.
    location: String,
}

impl std::fmt::Debug for S3Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Objects")
            .field("location", &self.location)
            .finish()
    }
}

impl S3Objects {
    /// Builds the client and checks that the bucket is reachable, creating it
    /// first when it is missing and `create_bucket` is set.
    pub async fn connect(config: &S3Config) -> Result<Self, ObjectError> {
        if config.bucket.is_empty() {
            return Err(ObjectError::Backend(
                "objects.s3.bucket is empty; name the bucket sift stores objects in".into(),
            ));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()));
        if !config.endpoint.is_empty() {
            loader = loader.endpoint_url(&config.endpoint);
        }
        let shared = loader.load().await;
        let s3_config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.path_style)
            .build();
        let endpoint = if config.endpoint.is_empty() {
            format!("AWS S3 ({})", config.region)
        } else {
            config.endpoint.clone()
        };
        let store = S3Objects {
            client: Client::from_conf(s3_config),
            bucket: config.bucket.clone(),
            location: format!("bucket `{}` at {endpoint}", config.bucket),
        };
        store.check_bucket(config).await?;
        Ok(store)
    }

    /// Fails early, with a message that says what to do, when the bucket is
    /// missing or the store cannot be reached.
    async fn check_bucket(&self, config: &S3Config) -> Result<(), ObjectError> {
        let err = match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        let missing = err.as_service_error().is_some_and(|e| e.is_not_found());
        if !missing {
            return Err(self.failure("HeadBucket", "", err));
        }
        if !config.create_bucket {
            return Err(ObjectError::Backend(format!(
                "{} does not exist; create it, or set objects.s3.create_bucket = true",
                self.location
            )));
        }
        let mut create = self.client.create_bucket().bucket(&self.bucket);
        // us-east-1 is the default location and refuses to be named.
        if config.region != "us-east-1" {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(config.region.as_str()))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, "created the S3 bucket");
                Ok(())
            }
            // Created meanwhile by another sift process.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_bucket_already_owned_by_you()) =>
            {
                Ok(())
            }
            Err(e) => Err(self.failure("CreateBucket", "", e)),
        }
    }

    /// A failure the caller can do nothing about but report.
    fn failure<E>(&self, op: &str, key: &str, err: SdkError<E, HttpResponse>) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let what = if key.is_empty() {
            format!("S3 {op} on {}", self.location)
        } else {
            format!("S3 {op} of `{key}` in {}", self.location)
        };
        let hint = match &err {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                "; check that the object store is running and reachable"
            }
            _ if err.code() == Some("NoSuchBucket") => {
                "; the bucket is gone: create it, or set objects.s3.create_bucket = true and restart"
            }
            _ => "",
        };
        ObjectError::Backend(format!(
            "{what} failed: {}{hint}",
            DisplayErrorContext(&err)
        ))
    }

    /// A failed read: NotFound when the key has no object.
    fn read_failure<E>(&self, op: &str, key: &str, err: SdkError<E, HttpResponse>) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        if status(&err) == Some(404) && err.code() != Some("NoSuchBucket") {
            return ObjectError::NotFound(key.to_string());
        }
        self.failure(op, key, err)
    }

    /// A failed write: PreconditionFailed when S3 refused the write condition.
    fn write_failure<E>(
        &self,
        op: &str,
        key: &str,
        mode: &PutMode,
        err: SdkError<E, HttpResponse>,
    ) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let refused = |detail: String| ObjectError::PreconditionFailed {
            key: key.to_string(),
            detail,
        };
        let code = err.code();
        match (mode, status(&err)) {
            (PutMode::Overwrite, _) => {}
            (PutMode::IfAbsent, Some(412)) => return refused("it already exists".into()),
            (PutMode::IfMatch(etag), Some(412)) => {
                return refused(format!("its ETag is no longer {etag}"))
            }
            // S3 answers If-Match on a missing key with 404 NoSuchKey.
            (PutMode::IfMatch(etag), Some(404)) if code == Some("NoSuchKey") => {
                return refused(format!("it does not exist; expected ETag {etag}"))
            }
            // Another conditional write to the key was in flight.
            (_, Some(409)) if code == Some("ConditionalRequestConflict") => {
                return refused("a concurrent conditional write to it won".into())
            }
            _ => {}
        }
        self.failure(op, key, err)
    }

    /// Uploads the parts of a multipart upload and completes it.
    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        first: Bytes,
        body: &mut ObjectReader,
        mode: &PutMode,
    ) -> Result<ObjectMeta, ObjectError> {
        let mut uploads: JoinSet<Result<CompletedPart, ObjectError>> = JoinSet::new();
        let mut parts = Vec::new();
        let mut size = 0u64;
        let mut number = 0i32;
        let mut next = first;
        while !next.is_empty() {
            number += 1;
            if number > MAX_PARTS {
                return Err(ObjectError::Backend(format!(
                    "object `{key}` is larger than {MAX_PARTS} parts of {} MiB, the most one S3 \
                     upload can take",
                    PART_SIZE >> 20
                )));
            }
            size += next.len() as u64;
            while uploads.len() >= PARTS_IN_FLIGHT {
                parts.push(joined(uploads.join_next().await)?);
            }
            let store = self.clone();
            let (key_owned, upload_id) = (key.to_string(), upload_id.to_string());
            let part = next;
            uploads.spawn(async move {
                let out = store
                    .client
                    .upload_part()
                    .bucket(&store.bucket)
                    .key(&key_owned)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(ByteStream::from(part))
                    .send()
                    .await
                    .map_err(|e| store.failure("UploadPart", &key_owned, e))?;
                Ok(CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag)
                    .build())
            });
            next = read_part(body, key).await?;
        }
        while let Some(done) = uploads.join_next().await {
            parts.push(joined(Some(done))?);
        }
        parts.sort_by_key(|p| p.part_number());

        let mut complete = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        complete = match mode {
            PutMode::Overwrite => complete,
            PutMode::IfAbsent => complete.if_none_match("*"),
            PutMode::IfMatch(etag) => complete.if_match(etag),
        };
        let out = complete
            .send()
            .await
            .map_err(|e| self.write_failure("CompleteMultipartUpload", key, mode, e))?;
        let encryption = encryption_of(out.server_side_encryption(), out.ssekms_key_id());
        self.written(key, size, out.e_tag(), encryption)
    }

    /// Metadata of an object just written. S3 does not return the write time,
    /// so it is this machine's clock; `head` gives S3's.
    fn written(
        &self,
        key: &str,
        size: u64,
        etag: Option<&str>,
        encryption: Option<Encryption>,
    ) -> Result<ObjectMeta, ObjectError> {
        let etag = etag.ok_or_else(|| {
            ObjectError::Backend(format!(
                "S3 write of `{key}` in {} returned no ETag; the store is not S3-compatible \
                 enough for sift",
                self.location
            ))
        })?;
        let modified_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        crate::metrics::global().objects_written_bytes.inc_by(size);
        Ok(ObjectMeta {
            key: key.to_string(),
            size,
            etag: etag.to_string(),
            modified_ms,
            encryption,
        })
    }
}

#[async_trait]
impl super::ObjectStore for S3Objects {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<ObjectMeta, ObjectError> {
        self.put_with(key, body, mode, &PutOptions::default()).await
    }

    async fn put_stream(
        &self,
        key: &str,
        body: ObjectReader,
        mode: PutMode,
    ) -> Result<ObjectMeta, ObjectError> {
        self.put_stream_with(key, body, mode, &PutOptions::default())
            .await
    }

    fn supports_encryption(&self) -> bool {
        true
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        mode: PutMode,
        options: &PutOptions,
    ) -> Result<ObjectMeta, ObjectError> {
        validate_key(key)?;
        let size = body.len() as u64;
        let (sse, kms_key) = sse_headers(options);
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(kms_key)
            .body(ByteStream::from(body));
        let put = match &mode {
            PutMode::Overwrite => put,
            PutMode::IfAbsent => put.if_none_match("*"),
            PutMode::IfMatch(etag) => put.if_match(etag),
        };
        let out = put
            .send()
            .await
            .map_err(|e| self.write_failure("PutObject", key, &mode, e))?;
        let encryption = encryption_of(out.server_side_encryption(), out.ssekms_key_id());
        self.written(key, size, out.e_tag(), encryption)
    }

    async fn put_stream_with(
        &self,
        key: &str,
        mut body: ObjectReader,
        mode: PutMode,
        options: &PutOptions,
    ) -> Result<ObjectMeta, ObjectError> {
        validate_key(key)?;
        let first = read_part(&mut body, key).await?;
        if first.len() < PART_SIZE {
            return self.put_with(key, first, mode, options).await;
        }
        let (sse, kms_key) = sse_headers(options);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(kms_key)
            .send()
            .await
            .map_err(|e| self.failure("CreateMultipartUpload", key, e))?;
        let upload_id = created.upload_id().ok_or_else(|| {
            ObjectError::Backend(format!(
                "S3 CreateMultipartUpload of `{key}` in {} returned no upload id",
                self.location
            ))
        })?;
        let result = self
            .upload_parts(key, upload_id, first, &mut body, &mode)
            .await;
        if result.is_err() {
            // Parts of an unfinished upload are stored (and billed) until aborted.
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await
            {
                tracing::warn!(
                    key,
                    upload_id,
                    error = %DisplayErrorContext(&e),
                    "could not abort a failed multipart upload; its parts stay until a bucket \
                     lifecycle rule removes them"
                );
            }
        }
        result
    }

    async fn get(&self, key: &str) -> Result<(ObjectMeta, Bytes), ObjectError> {
        validate_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.read_failure("GetObject", key, e))?;
        let meta = meta_of(key, out.content_length(), out.e_tag(), out.last_modified()).encrypted(
            encryption_of(out.server_side_encryption(), out.ssekms_key_id()),
        );
        let body = out.body.collect().await.map_err(|e| {
            ObjectError::Backend(format!(
                "S3 GetObject of `{key}` in {}: reading the body failed: {}",
                self.location,
                DisplayErrorContext(&e)
            ))
        })?;
        Ok((meta, body.into_bytes()))
    }

    async fn get_stream(&self, key: &str) -> Result<(ObjectMeta, ObjectReader), ObjectError> {
        validate_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.read_failure("GetObject", key, e))?;
        let meta = meta_of(key, out.content_length(), out.e_tag(), out.last_modified()).encrypted(
            encryption_of(out.server_side_encryption(), out.ssekms_key_id()),
        );
        Ok((meta, Box::new(out.body.into_async_read())))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        validate_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(
                meta_of(key, out.content_length(), out.e_tag(), out.last_modified()).encrypted(
                    encryption_of(out.server_side_encryption(), out.ssekms_key_id()),
                ),
            )),
            // A HEAD response has no body, so a missing bucket cannot be told
            // apart from a missing key here; `connect` checked the bucket.
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.failure("HeadObject", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.failure("ListObjectsV2", prefix, e))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                out.push(meta_of(
                    key,
                    object.size(),
                    object.e_tag(),
                    object.last_modified(),
                ));
            }
        }
        // S3 lists in UTF-8 byte order already; compatible stores may not.
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        validate_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // S3 itself answers 204 for a missing key; some compatible stores 404.
            Err(e) if e.code() == Some("NoSuchKey") => Ok(()),
            Err(e) => Err(self.failure("DeleteObject", key, e)),
        }
    }
}

/// The HTTP status of a failed request, when a response came back.
fn status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

fn meta_of(
    key: &str,
    size: Option<i64>,
    etag: Option<&str>,
    modified: Option<&DateTime>,
) -> ObjectMeta {
    ObjectMeta {
        key: key.to_string(),
        size: size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
        etag: etag.unwrap_or_default().to_string(),
        modified_ms: modified.and_then(|m| m.to_millis().ok()).unwrap_or(0),
        encryption: None,
    }
}

impl ObjectMeta {
    fn encrypted(self, encryption: Option<Encryption>) -> Self {
        ObjectMeta { encryption, ..self }
    }
}

/// The SSE headers of a put: `x-amz-server-side-encryption` and the KMS key id.
fn sse_headers(options: &PutOptions) -> (Option<ServerSideEncryption>, Option<String>) {
    match &options.encryption {
        None => (None, None),
        Some(Encryption::SseS3) => (Some(ServerSideEncryption::Aes256), None),
        Some(Encryption::SseKms { key_id }) => (Some(ServerSideEncryption::AwsKms), key_id.clone()),
    }
}

/// What S3 says about an object's encryption at rest.
fn encryption_of(sse: Option<&ServerSideEncryption>, kms_key: Option<&str>) -> Option<Encryption> {
    match sse? {
        ServerSideEncryption::Aes256 => Some(Encryption::SseS3),
        ServerSideEncryption::AwsKms | ServerSideEncryption::AwsKmsDsse => {
            Some(Encryption::SseKms {
                key_id: kms_key.map(str::to_string),
            })
        }
        // A mode newer than this client knows; reported as unknown.
        _ => None,
    }
}

/// Reads up to one part from `body`; shorter only at the end of the stream.
async fn read_part(body: &mut ObjectReader, key: &str) -> Result<Bytes, ObjectError> {
    let mut buf = Vec::with_capacity(PART_SIZE);
    body.take(PART_SIZE as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|source| ObjectError::Io {
            path: format!("the body streamed to `{key}`"),
            source,
        })?;
    Ok(Bytes::from(buf))
}

/// The outcome of a part upload task.
fn joined(
    done: Option<Result<Result<CompletedPart, ObjectError>, tokio::task::JoinError>>,
) -> Result<CompletedPart, ObjectError> {
    match done {
        Some(Ok(part)) => part,
        Some(Err(e)) => Err(ObjectError::Backend(format!(
            "a part upload task failed: {e}"
        ))),
        None => Err(ObjectError::Backend(
            "a part upload task vanished before it finished".into(),
        )),
    }
}
