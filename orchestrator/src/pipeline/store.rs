//! Where executions live: a create-only object store (the worker's `ObjectStore` on S3 or
//! the embedded store implements this), and an in-memory one for tests and the in-process
//! driver.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A store operation that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("execution store: {label}: {message}")]
pub struct StoreError {
    /// Stable label for logs and metrics (e.g. `store_io`).
    pub label: &'static str,
    /// What happened.
    pub message: String,
    /// Whether the same call could succeed later (decides redelivery versus the DLQ).
    pub retryable: bool,
}

/// Create-only object storage for executions (mirrors the worker's `ObjectStore`).
#[async_trait::async_trait]
pub trait ExecutionStore: Send + Sync {
    /// Writes `bytes` under `key` unless it exists; `true` when this call created it.
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<bool, StoreError>;
    /// The object, or `None`.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key starting with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
}

/// An [`ExecutionStore`] in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many objects it holds (for tests).
    pub fn len(&self) -> usize {
        self.objects.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn poisoned() -> StoreError {
    StoreError { label: "store_poisoned", message: "the in-memory store lock was poisoned".into(), retryable: false }
}

#[async_trait::async_trait]
impl ExecutionStore for MemoryStore {
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<bool, StoreError> {
        let mut m = self.objects.lock().map_err(|_| poisoned())?;
        if m.contains_key(key) {
            return Ok(false);
        }
        m.insert(key.to_string(), bytes);
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.objects.lock().map_err(|_| poisoned())?.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let m = self.objects.lock().map_err(|_| poisoned())?;
        Ok(m.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, _)| k.clone()).collect())
    }
}
