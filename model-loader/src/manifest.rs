//! `ember-manifest.json`: the SHA-256 and size of every file of a model. When a model has one,
//! every byte is checked before the model is built and a mismatch refuses to load.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{LoadError, Result};

pub const MANIFEST_FILE: &str = "ember-manifest.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub sha256: String,
    pub size: u64,
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
        Ok(Self { version: 1, files })
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
}

pub fn digest_bytes(bytes: &[u8]) -> FileDigest {
    FileDigest { sha256: hex::encode(Sha256::digest(bytes)), size: bytes.len() as u64 }
}

pub fn digest_file(path: &Path) -> Result<FileDigest> {
    let mut file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| LoadError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileDigest { sha256: hex::encode(hasher.finalize()), size })
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
