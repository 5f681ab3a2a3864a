//! `ember-manifest.json`: the SHA-256 and size of every file of a model, and for files larger
//! than one chunk the SHA-256 of every [`CHUNK_SIZE`] piece. When a model has one, every byte is
//! checked before the model is built and a mismatch refuses to load.
//!
//! Why chunks: SHA-256 of one large file is one core's work (about 2 GB/s here), slower than a
//! parallel download. Chunk digests let a download verify each piece as it lands, in parallel,
//! and name the piece that is wrong. A manifest written before chunks (no `chunks` field) still
//! works: its files are verified whole.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{LoadError, Result};

pub const MANIFEST_FILE: &str = "ember-manifest.json";

/// The chunk size `ember model manifest` writes: one ranged GET each, 16 MiB as S3's own
/// guidance for parallel ranged GETs suggests (8-16 MB).
pub const CHUNK_SIZE: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub sha256: String,
    pub size: u64,
    /// The size of each piece in `chunks` (the last one may be shorter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
    /// SHA-256 of each `chunk_size` piece of the file, in order; empty for files of one chunk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
}

impl FileDigest {
    /// The chunk size when the chunk digests are present and cover the file exactly.
    pub fn chunking(&self) -> Option<u64> {
        let size = self.chunk_size.filter(|&c| c > 0)?;
        (!self.chunks.is_empty() && self.chunks.len() as u64 == self.size.div_ceil(size)).then_some(size)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub files: BTreeMap<String, FileDigest>,
}

impl Manifest {
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| LoadError::BadJson { file: MANIFEST_FILE.into(), message: e.to_string() })
    }

    /// Hashes every regular file directly in `dir` (the manifest itself excepted).
    pub fn for_dir(dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| LoadError::io(dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // The signature signs the manifest, so the manifest cannot list it.
            if !path.is_file()
                || name == MANIFEST_FILE
                || name == crate::signing::SIGNATURE_FILE
                || name.starts_with('.')
            {
                continue;
            }
            files.insert(name, digest_file(&path)?);
        }
        Ok(Self { version: 2, files })
    }

    /// Writes `ember-manifest.json` into `dir` and returns it.
    pub fn write_for_dir(dir: &Path) -> Result<Self> {
        let manifest = Self::for_dir(dir)?;
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| LoadError::BadJson { file: MANIFEST_FILE.into(), message: e.to_string() })?;
        std::fs::write(&path, text + "\n").map_err(|e| LoadError::io(path, e))?;
        Ok(manifest)
    }

    /// Checks one file's digest against the manifest. Files the manifest does not list are
    /// refused too: an unlisted weights file is as untrusted as a changed one.
    pub fn check(&self, name: &str, actual: &FileDigest) -> Result<()> {
        let Some(expected) = self.files.get(name) else {
            return Err(LoadError::ChecksumMismatch {
                file: name.into(),
                expected: "<not listed in the manifest>".into(),
                actual: actual.sha256.clone(),
            });
        };
        if expected.size != actual.size {
            return Err(LoadError::SizeMismatch { file: name.into(), expected: expected.size, actual: actual.size });
        }
        if !expected.sha256.eq_ignore_ascii_case(&actual.sha256) {
            return Err(LoadError::ChecksumMismatch {
                file: name.into(),
                expected: expected.sha256.clone(),
                actual: actual.sha256.clone(),
            });
        }
        Ok(())
    }

    /// The listed digest of `name`, or the error for a file the manifest does not list.
    pub fn entry(&self, name: &str) -> Result<&FileDigest> {
        self.files.get(name).ok_or_else(|| LoadError::ChecksumMismatch {
            file: name.into(),
            expected: "<not listed in the manifest>".into(),
            actual: "<not hashed>".into(),
        })
    }

    /// Checks chunk `index` of `name` (the bytes at `index * chunk_size`), naming the chunk and
    /// its byte range on a mismatch.
    pub fn check_chunk(&self, name: &str, index: usize, bytes: &[u8]) -> Result<()> {
        let entry = self.entry(name)?;
        let (Some(chunk), Some(expected)) = (entry.chunking(), entry.chunks.get(index)) else {
            return Err(LoadError::BadConfig(format!("the manifest has no chunk {index} for `{name}`")));
        };
        let actual = hex::encode(Sha256::digest(bytes));
        if !expected.eq_ignore_ascii_case(&actual) {
            let start = index as u64 * chunk;
            return Err(LoadError::ChunkMismatch {
                file: name.into(),
                chunk: index,
                start,
                end: start + bytes.len() as u64,
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Checks every byte of `name` against the manifest: chunk by chunk (in parallel, naming
    /// the first bad chunk) when it has chunk digests, else the whole file.
    pub fn check_bytes(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let entry = self.entry(name)?;
        if entry.size != bytes.len() as u64 {
            return Err(LoadError::SizeMismatch {
                file: name.into(),
                expected: entry.size,
                actual: bytes.len() as u64,
            });
        }
        let Some(chunk) = entry.chunking() else {
            return self.check(name, &digest_bytes(bytes));
        };
        let pieces: Vec<(usize, &[u8])> = bytes.chunks(chunk as usize).enumerate().collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(pieces.len()).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let pieces = &pieces;
                    s.spawn(move || {
                        pieces.iter().skip(t).step_by(threads).try_for_each(|(i, b)| self.check_chunk(name, *i, b))
                    })
                })
                .collect();
            let mut results: Vec<Result<()>> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(LoadError::BadConfig("a checksum thread panicked".into()))))
                .collect();
            // Name the first bad chunk in file order, whichever thread found it.
            results.sort_by_key(|r| match r {
                Err(LoadError::ChunkMismatch { chunk, .. }) => *chunk,
                Err(_) => 0,
                Ok(()) => usize::MAX,
            });
            results.into_iter().next().unwrap_or(Ok(()))
        })
    }
}

/// The digest of `bytes`, with chunk digests when it is larger than one chunk.
pub fn digest_bytes(bytes: &[u8]) -> FileDigest {
    let (sha256, chunks) = std::thread::scope(|s| {
        let whole = s.spawn(|| hex::encode(Sha256::digest(bytes)));
        let chunks: Vec<String> = if bytes.len() as u64 > CHUNK_SIZE {
            bytes.chunks(CHUNK_SIZE as usize).map(|c| hex::encode(Sha256::digest(c))).collect()
        } else {
            Vec::new()
        };
        (whole.join().unwrap_or_default(), chunks)
    });
    let chunk_size = (!chunks.is_empty()).then_some(CHUNK_SIZE);
    FileDigest { sha256, size: bytes.len() as u64, chunk_size, chunks }
}

pub fn digest_file(path: &Path) -> Result<FileDigest> {
    Ok(digest_bytes(&crate::files::FileBytes::map(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_byte_is_refused_naming_the_file() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| LoadError::io("tmp", e))?;
        std::fs::write(dir.path().join("a.bin"), b"hello").map_err(|e| LoadError::io("a", e))?;
        let m = Manifest::write_for_dir(dir.path())?;
        assert!(m.check("a.bin", &digest_bytes(b"hello")).is_ok());
        let err = m.check("a.bin", &digest_bytes(b"hellp")).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("`a.bin` failed its checksum")));
        let err = m.check("b.bin", &digest_bytes(b"x"));
        assert!(matches!(err, Err(LoadError::ChecksumMismatch { file, .. }) if file == "b.bin"));
        Ok(())
    }
}
