//! Object storage for results and execution state behind one trait, with two
//! implementations: [`s3::S3Store`] and [`local::LocalStore`] (a directory, the default when
//! no AWS is configured).
//!
//! The one write is create-only: the first `put_if_absent` of a key wins and later ones
//! answer [`PutOutcome::AlreadyExists`] without touching it. That is what makes a redelivered
//! job harmless: its second result write does nothing.
//!
//! ```no_run
//! # async fn run() -> Result<(), ember_worker::store::StoreError> {
//! use ember_worker::store::{local::LocalStore, ObjectStore, PutOutcome};
//! let store = LocalStore::new("/tmp/ember-results");
//! match store.put_if_absent("batch-1/job-7.json", b"{}".to_vec()).await? {
//!     PutOutcome::Created => println!("wrote the result"),
//!     PutOutcome::AlreadyExists => println!("an earlier delivery already wrote it"),
//! }
//! # Ok(()) }
//! ```

pub mod local;
pub mod s3;

/// Longest key (the S3 limit).
pub const MAX_KEY_BYTES: usize = 1024;

/// What a create-only write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// The key existed; its content was left as it was.
    AlreadyExists,
}

#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync {
    /// Writes `bytes` under `key` unless the key exists.
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<PutOutcome, StoreError>;

    /// The object's bytes, or `None` when there is no such key.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every key that starts with `prefix` (a plain string prefix, not only whole folders),
    /// sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
}

/// A store operation that failed. `label()` is stable for logs and metrics; `is_retryable()`
/// says whether the same call could succeed later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("{op} {key}: {message}")]
    Io { op: &'static str, key: String, kind: std::io::ErrorKind, message: String },
    #[error("S3 bucket `{0}` does not exist: check the bucket name in --results (EMBER_RESULTS), and that it exists in this account and region (AWS_REGION)")]
    BucketNotFound(String),
    /// Any other failed S3 request, with what to check.
    #[error(transparent)]
    Aws(#[from] ember_model_loader::aws::AwsError),
    #[error("another write of {0} was still in progress; try again")]
    Conflict(String),
}

impl StoreError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidKey { .. } => "store_invalid_key",
            Self::Io { .. } => "store_io",
            Self::BucketNotFound(_) => "store_bucket_not_found",
            Self::Aws(e) => {
                use ember_model_loader::aws::FailureKind as K;
                match e.failure.kind {
                    K::Auth => "store_auth",
                    K::Throttled => "store_throttled",
                    K::Transport => "store_transport",
                    K::Invalid | K::Construction | K::Service => "store_service",
                }
            }
            Self::Conflict(_) => "store_conflict",
        }
    }

    /// Whether the same call could succeed later.
    pub fn is_retryable(&self) -> bool {
        use std::io::ErrorKind as K;
        match self {
            Self::Conflict(_) => true,
            Self::Aws(e) => e.is_retryable(),
            // A full disk or an interrupted call may clear; a permission or path problem will not.
            Self::Io { kind, .. } => !matches!(
                kind,
                K::PermissionDenied | K::ReadOnlyFilesystem | K::InvalidInput | K::NotADirectory | K::Unsupported
            ),
            Self::InvalidKey { .. } | Self::BucketNotFound(_) => false,
        }
    }
}

/// Checks a key the same way for every store, so a key that works locally works on S3 and
/// cannot escape the local root: relative, '/'-separated, no empty, `.` or `..` segments.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason| Err(StoreError::InvalidKey { key: key.to_string(), reason });
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > MAX_KEY_BYTES {
        return bad("longer than 1024 bytes");
    }
    if key.contains(['\\', '\0']) {
        return bad("contains a backslash or a NUL");
    }
    if key.starts_with('/') {
        return bad("starts with '/'");
    }
    for segment in key.split('/') {
        match segment {
            "" => return bad("has an empty path segment ('//' or a trailing '/')"),
            "." | ".." => return bad("has a '.' or '..' segment"),
            s if s.starts_with(local::TEMP_PREFIX) => return bad("uses the local store's temporary-file prefix"),
            _ => {}
        }
    }
    Ok(())
}
