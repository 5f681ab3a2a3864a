//! The bytes of a model's files, wherever they came from: memory-mapped from a local
//! directory or the download cache, or held in memory after a download.

use std::path::Path;

use crate::error::{LoadError, Result};
use crate::manifest::{Manifest, MANIFEST_FILE};

/// One file's bytes.
pub enum FileBytes {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Mapped(m) => m,
        }
    }
}

impl FileBytes {
    pub fn map(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
        // SAFETY: the map is read-only and model files are never written in place: the cache
        // replaces files by rename, so a concurrent writer cannot change mapped bytes. When
        // a manifest exists the bytes are also verified before use.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        Ok(Self::Mapped(map))
    }
}

/// The files of one model, by name relative to the model's root.
#[derive(Default)]
pub struct ModelFiles {
    /// Where they came from, for error messages.
    pub origin: String,
    pub files: Vec<(String, FileBytes)>,
    /// Set when the fetch already verified every file (`Some(true)`) or found no manifest to
    /// verify against (`Some(false)`); None when [`ModelFiles::verify`] still has to.
    pub verified: Option<bool>,
    /// Holds the local tier's copy of this model while it is in use.
    pub pin: Option<crate::tier::Pin>,
    /// Where the bytes came from and how long each stage took.
    pub stats: crate::fetch::FetchStats,
}

impl ModelFiles {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.files.iter().find(|(n, _)| n == name).map(|(_, b)| &**b)
    }

    pub fn require(&self, name: &str) -> Result<&[u8]> {
        self.get(name).ok_or_else(|| LoadError::MissingFile { model: self.origin.clone(), file: name.into() })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|(n, _)| n.as_str())
    }

    /// Verifies every file against `ember-manifest.json` when there is one, hashing files in
    /// parallel. Returns whether a manifest was found.
    pub fn verify(&self) -> Result<bool> {
        if let Some(done) = self.verified {
            return Ok(done);
        }
        let Some(bytes) = self.get(MANIFEST_FILE) else {
            return Ok(false);
        };
        let manifest = Manifest::from_json(bytes)?;
        for listed in manifest.files.keys() {
            if self.get(listed).is_none() {
                return Err(LoadError::ManifestFileMissing(listed.clone()));
            }
        }
        let to_check: Vec<&(String, FileBytes)> = self.files.iter().filter(|(n, _)| n != MANIFEST_FILE).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = to_check
                .iter()
                .map(|(name, bytes)| {
                    let manifest = &manifest;
                    s.spawn(move || manifest.check_bytes(name, bytes))
                })
                .collect();
            let mut first_err = None;
            for h in handles {
                let r = h.join().unwrap_or_else(|_| Err(LoadError::BadConfig("a checksum thread panicked".into())));
                if let (Err(e), None) = (r, &first_err) {
                    first_err = Some(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })?;
        Ok(true)
    }
}

/// The files Ember reads from a model directory or prefix.
pub fn is_model_file(name: &str) -> bool {
    matches!(
        name,
        "config.json"
            | "tokenizer.json"
            | "tokenizer_config.json"
            | "generation_config.json"
            | "model.safetensors.index.json"
            | MANIFEST_FILE
    ) || name.ends_with(".safetensors")
        || name.ends_with(".gguf")
}

/// Maps the model files of a local directory, or one `.gguf` file (with a tokenizer.json,
/// tokenizer_config.json and manifest next to it, if present).
pub fn local_files(path: &Path) -> Result<ModelFiles> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    let mut files = ModelFiles { origin: path.display().to_string(), ..Default::default() };
    if path.is_file() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !name.ends_with(".gguf") {
            return Err(LoadError::NotAModel(path.to_path_buf()));
        }
        files.files.push((name, FileBytes::map(path)?));
        // A manifest beside a lone GGUF file usually describes the whole folder; only use
        // the tokenizer files that sit with it.
        if let Some(dir) = path.parent() {
            for side in ["tokenizer.json", "tokenizer_config.json"] {
                let p = dir.join(side);
                if p.is_file() {
                    files.files.push((side.into(), FileBytes::map(&p)?));
                }
            }
        }
        return Ok(files);
    }
    let entries = std::fs::read_dir(path).map_err(|e| LoadError::io(path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LoadError::io(path, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && is_model_file(&name) {
            files.files.push((name, FileBytes::map(&entry.path())?));
        }
    }
    files.files.sort_by(|a, b| a.0.cmp(&b.0));
    let ggufs: Vec<&str> = files.files.iter().map(|(n, _)| n.as_str()).filter(|n| n.ends_with(".gguf")).collect();
    if ggufs.len() > 1 {
        return Err(LoadError::AmbiguousModel {
            dir: path.to_path_buf(),
            files: ggufs.iter().map(|n| n.to_string()).collect(),
        });
    }
    Ok(files)
}
