//! The S3 store: keys live under an optional prefix in one bucket.
//!
//! Create-only writes are S3 conditional writes: `PutObject` with `If-None-Match: *` answers
//! 412 PreconditionFailed when the key exists, which is [`PutOutcome::AlreadyExists`]. A 409
//! ConditionalRequestConflict means another conditional write of the same key is in flight;
//! it is not yet known whether that one will land, so the put is retried a few times (then it
//! meets the 412, or wins if the other write failed) and otherwise fails with the retryable
//! [`StoreError::Conflict`]. Reading a 409 as "already exists" could lose a result whose
//! other writer then crashed.

use std::time::Duration;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use ember_model_loader::aws::{causes, AwsError, Failure, FailureKind};

use super::{validate_key, ObjectStore, PutOutcome, StoreError};

const CONFLICT_ATTEMPTS: u32 = 4;

/// A store in an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or ends with '/'.
    prefix: String,
}

impl S3Store {
    /// A store over `bucket`, keys under `prefix` (a folder; "" for the whole bucket).
    pub fn new(client: Client, bucket: impl Into<String>, prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        Self { client, bucket: bucket.into(), prefix }
    }

    /// A client for `config`, with path-style addressing when an endpoint is set: local
    /// S3-compatible servers (moto, SeaweedFS) serve buckets as paths, not host names.
    pub fn from_config(config: &aws_config::SdkConfig, bucket: impl Into<String>, prefix: &str) -> Self {
        Self::new(ember_model_loader::aws::s3_client(config), bucket, prefix)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Checks that the bucket exists and the credentials reach it, so that a typo or missing
    /// credentials stop a worker at startup, not after the model loaded. A one-key listing
    /// under the prefix rather than `HeadBucket`: a role allowed `s3:ListBucket` only under
    /// its prefix (infra/ember.yaml's) may list there but not head the bucket.
    pub async fn check(&self) -> Result<(), StoreError> {
        let listed = self.client.list_objects_v2().bucket(&self.bucket).prefix(&self.prefix).max_keys(1).send().await;
        match listed {
            Ok(_) => Ok(()),
            Err(e) => Err(self.sdk_error("ListObjectsV2", e)),
        }
    }

    fn sdk_error<E>(&self, op: &'static str, err: SdkError<E>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let err = AwsError::new(op, format!("S3 bucket `{}`", self.bucket), &err);
        if err.failure.code == "NoSuchBucket" {
            StoreError::BucketNotFound(self.bucket.clone())
        } else {
            StoreError::Aws(err)
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for S3Store {
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<PutOutcome, StoreError> {
        validate_key(key)?;
        let full = format!("{}{key}", self.prefix);
        let bytes = bytes::Bytes::from(bytes);
        for attempt in 1..=CONFLICT_ATTEMPTS {
            let put = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .body(ByteStream::from(bytes.clone()))
                .if_none_match("*")
                .send()
                .await;
            let err = match put {
                Ok(_) => return Ok(PutOutcome::Created),
                Err(e) => e,
            };
            let (code, status) = (err.code().unwrap_or_default().to_string(), status(&err));
            if status == Some(412) || code == "PreconditionFailed" {
                return Ok(PutOutcome::AlreadyExists);
            }
            if status == Some(409) || code == "ConditionalRequestConflict" {
                tracing::debug!(key = %full, attempt, "conditional write conflict, retrying");
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                continue;
            }
            return Err(self.sdk_error("PutObject", err));
        }
        Err(StoreError::Conflict(full))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        validate_key(key)?;
        let got = self.client.get_object().bucket(&self.bucket).key(format!("{}{key}", self.prefix)).send().await;
        let out = match got {
            Ok(out) => out,
            Err(e) if e.code() == Some("NoSuchKey") || (e.code().is_none() && status(&e) == Some(404)) => {
                return Ok(None)
            }
            Err(e) => return Err(self.sdk_error("GetObject", e)),
        };
        let body = out.body.collect().await.map_err(|e| {
            let failure = Failure {
                kind: FailureKind::Transport,
                code: String::new(),
                message: format!("reading the body: {}", causes(&e)),
                status: None,
            };
            StoreError::Aws(AwsError {
                op: "GetObject",
                resource: format!("s3://{}/{}{key}", self.bucket, self.prefix),
                failure,
            })
        })?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{prefix}", self.prefix))
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.sdk_error("ListObjectsV2", e))?;
            for object in page.contents.unwrap_or_default() {
                if let Some(key) = object.key.as_deref().and_then(|k| k.strip_prefix(&self.prefix)) {
                    keys.push(key.to_string());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}

fn status<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}
