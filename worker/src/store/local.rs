//! The local-directory store: one file per key under a root directory.
//!
//! A create-only write puts the bytes in a temporary file in the key's directory, fsyncs
//! it, then `hard_link`s it to the key's name: `link(2)` fails atomically when the name
//! exists, so of two concurrent writers (threads or processes) exactly one wins and a reader
//! never sees a half-written file. Unlike `rename`, it never replaces an existing file. The
//! directory is fsynced after a link, so a written result survives power loss; parent
//! directories created on the way are not.
//!
//! Limits: the file system must support hard links; a key cannot also be a folder of other
//! keys (`a` and `a/b`), which S3 allows. A process killed between writing and linking leaves
//! a `.ember-tmp-*` file behind; such files are never listed or read as keys.

use std::fs;
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::{validate_key, ObjectStore, PutOutcome, StoreError};

/// Name prefix of temporary files; keys may not use it.
pub(crate) const TEMP_PREFIX: &str = ".ember-tmp-";

/// A store in a local directory (created on first write).
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> Result<T, StoreError> + Send + 'static,
    {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || f(&root)).await.map_err(|e| StoreError::Io {
            op: "run",
            key: String::new(),
            kind: ErrorKind::Other,
            message: format!("the blocking file task failed: {e}"),
        })?
    }
}

#[async_trait::async_trait]
impl ObjectStore for LocalStore {
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<PutOutcome, StoreError> {
        validate_key(key)?;
        let key = key.to_string();
        self.blocking(move |root| put(root, &key, &bytes)).await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        validate_key(key)?;
        let key = key.to_string();
        self.blocking(move |root| match fs::read(root.join(&key)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory | ErrorKind::IsADirectory) => {
                Ok(None)
            }
            Err(e) => Err(io_error("read", &key, e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        if prefix.contains(['\\', '\0']) || prefix.starts_with('/') || prefix.split('/').any(|s| s == "..") {
            return Err(StoreError::InvalidKey { key: prefix.to_string(), reason: "not a valid key prefix" });
        }
        let prefix = prefix.to_string();
        self.blocking(move |root| list(root, &prefix)).await
    }
}

fn put(root: &Path, key: &str, bytes: &[u8]) -> Result<PutOutcome, StoreError> {
    let path = root.join(key);
    // Cheap answer for the common redelivery case; the link below still decides races.
    if path.is_file() {
        return Ok(PutOutcome::AlreadyExists);
    }
    if path.is_dir() {
        return Err(StoreError::InvalidKey { key: key.to_string(), reason: "is a folder of other keys" });
    }
    let dir = path.parent().unwrap_or(root);
    fs::create_dir_all(dir).map_err(|e| io_error("create directory for", key, e))?;
    let temp = dir.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4()));
    let linked = write_and_link(&temp, &path, bytes);
    if let Err(e) = fs::remove_file(&temp) {
        if e.kind() != ErrorKind::NotFound {
            tracing::warn!(path = %temp.display(), error = %e, "could not remove a temporary file");
        }
    }
    let outcome = linked.map_err(|e| io_error("write", key, e))?;
    if outcome == PutOutcome::Created {
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("sync directory of", key, e))?;
    }
    Ok(outcome)
}

fn write_and_link(temp: &Path, path: &Path, bytes: &[u8]) -> io::Result<PutOutcome> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).open(temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    match fs::hard_link(temp, path) {
        Ok(()) => Ok(PutOutcome::Created),
        Err(e) if e.kind() == ErrorKind::AlreadyExists && path.is_file() => Ok(PutOutcome::AlreadyExists),
        Err(e) => Err(e),
    }
}

/// Walks the deepest directory the prefix names completely, without following symlinks.
fn list(root: &Path, prefix: &str) -> Result<Vec<String>, StoreError> {
    let base = prefix.rfind('/').map_or("", |i| &prefix[..i]);
    let mut keys = Vec::new();
    let mut pending = vec![(root.join(base), base.to_string())];
    while let Some((dir, rel)) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => continue,
            Err(e) => return Err(io_error("list", &rel, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", &rel, e))?;
            // Names that are not UTF-8 cannot be keys: skip them.
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let kind = entry.file_type().map_err(|e| io_error("list", &key, e))?;
            if kind.is_dir() {
                // Only descend where keys with the prefix can be.
                if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                    pending.push((entry.path(), key));
                }
            } else if kind.is_file() && key.starts_with(prefix) {
                keys.push(key);
            }
        }
    }
    keys.sort();
    Ok(keys)
}

fn io_error(op: &'static str, key: &str, e: io::Error) -> StoreError {
    StoreError::Io { op, key: key.to_string(), kind: e.kind(), message: e.to_string() }
}
