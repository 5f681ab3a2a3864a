//! The bytes of a model's files, wherever they came from: memory-mapped from a local
//! directory or the download cache, or held in memory after a download.

use std::path::Path;

use crate::error::{LoadError, Result};
use crate::manifest::{Manifest, MANIFEST_FILE};
use crate::signing::{TrustedKeys, SIGNATURE_FILE};

/// One file's bytes.
pub enum FileBytes {
    Owned(Vec<u8>),
    /// Shared, so the model's weights can keep reading them after the files are dropped
    /// ([`FileBytes::shared`]).
    Mapped(std::sync::Arc<memmap2::Mmap>),
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
        // SAFETY: the map is read-only, and Rust code only ever sees it as `&[u8]` of plain
        // bytes, which any content is valid for. It rests on files not being written in place
        // while mapped: the local tier replaces its files only by rename; a local model folder
        // is the user's, and the README asks them to replace weights in use by `mv`, never by
        // writing into them (a truncated file would fault on access). Where a local folder's
        // bytes are verified (a manifest, trusted keys), layers copy them once they are
        // (`ModelFiles::in_place`), so a later write cannot change verified weights.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        Ok(Self::Mapped(std::sync::Arc::new(map)))
    }

    /// The mapping behind these bytes, for a weight that reads them in place (None for bytes
    /// held in a `Vec`).
    pub fn shared(&self) -> Option<std::sync::Arc<memmap2::Mmap>> {
        match self {
            Self::Owned(_) => None,
            Self::Mapped(m) => Some(m.clone()),
        }
    }
}

/// A tokenizer being built on a thread of its own during the download.
pub type PendingTokenizer = std::sync::Mutex<Option<std::thread::JoinHandle<Result<crate::tokenizer::Tokenizer>>>>;

/// A GGUF file's header parsed during its download: the file's name and its header.
pub type EarlyHeader = std::sync::Mutex<Option<(String, std::sync::Arc<crate::gguf_header::GgufHeader>)>>;

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
    /// One `.gguf` file taken out of a folder: a manifest here is the folder's, so only the
    /// files read from it must match, not every file it lists.
    pub lone_file: bool,
    /// `tokenizer.json` being parsed on a thread of its own while the weights download (see
    /// [`ModelFiles::parse_tokenizer_early`]).
    pub early_tokenizer: PendingTokenizer,
    /// A GGUF file's header as the download parsed it from the file's first parts (which the
    /// download then verified in place, with the rest: a load whose check fails never uses
    /// it), so the build does not parse it again.
    pub early_header: EarlyHeader,
    /// Whether layers may keep reading the weights files' mappings for the model's life
    /// instead of copying them at the build: set for the download's landing and the local tier
    /// (files Ember alone writes, by rename), and for a local folder only when nothing in it is
    /// verified (no manifest, no trusted keys: a write after a check would reach the model).
    pub in_place: bool,
    /// The local tier's folder for this model, when the weights files are its verified copies,
    /// and each weights file's stamp there when it was verified.
    pub tier_dir: Option<std::path::PathBuf>,
    pub tier_stamps: std::collections::HashMap<String, crate::tier::Stamp>,
    /// The local tier's size limit (to keep tiles only where they fit), and whether to keep
    /// tiles there at all ([`crate::s3::FetchOptions::keep_tiles`]).
    pub tier_max_bytes: Option<u64>,
    pub keep_tiles: bool,
    /// GGUF layers tiled while the file downloaded ([`crate::prebuild`]), by GGUF tensor name.
    pub tiled: std::sync::Mutex<std::collections::HashMap<String, ember_kernels::cpu::QuantLinear>>,
}

impl ModelFiles {
    /// Starts parsing `tokenizer.json` (about 2 MB of JSON for Llama-family vocabularies, tens
    /// of milliseconds of CPU) on a thread of its own, so it is done by the time the weights
    /// have downloaded instead of after. The parse reads bytes not yet checked against the
    /// manifest; its result is used only once the load has checked them.
    pub fn parse_tokenizer_early(&self) {
        let Some(bytes) = self.get("tokenizer.json").map(<[u8]>::to_vec) else { return };
        let parsing = std::thread::Builder::new()
            .name("ember-tokenizer".into())
            .spawn(move || crate::tokenizer::Tokenizer::from_json(&bytes));
        if let (Ok(handle), Ok(mut slot)) = (parsing, self.early_tokenizer.lock()) {
            *slot = Some(handle);
        }
    }

    /// The tokenizer parsed by [`ModelFiles::parse_tokenizer_early`], else parsed now from
    /// `bytes`.
    pub fn tokenizer(&self, bytes: &[u8]) -> Result<crate::tokenizer::Tokenizer> {
        self.early_tokenizer().unwrap_or_else(|| crate::tokenizer::Tokenizer::from_json(bytes))
    }

    /// The tokenizer built during the download (from `tokenizer.json`, or a GGUF header), if
    /// one was.
    pub fn early_tokenizer(&self) -> Option<Result<crate::tokenizer::Tokenizer>> {
        let early = self.early_tokenizer.lock().ok().and_then(|mut slot| slot.take())?;
        Some(early.join().unwrap_or_else(|_| Err(LoadError::BadConfig("the tokenizer parser panicked".into()))))
    }

    /// The header of GGUF file `name` parsed during its download, if it was.
    pub fn early_header(&self, name: &str) -> Option<std::sync::Arc<crate::gguf_header::GgufHeader>> {
        let mut slot = self.early_header.lock().ok()?;
        match slot.take() {
            Some((file, header)) if file == name => Some(header),
            other => {
                *slot = other;
                None
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.files.iter().find(|(n, _)| n == name).map(|(_, b)| &**b)
    }

    pub fn require(&self, name: &str) -> Result<&[u8]> {
        self.get(name).ok_or_else(|| LoadError::MissingFile { model: self.origin.clone(), file: name.into() })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|(n, _)| n.as_str())
    }

    /// Checks the manifest's signature when keys are trusted (before anything else is
    /// read), then every file against `ember-manifest.json` when there is one, hashing
    /// files in parallel. Returns whether a manifest was found.
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<bool> {
        self.verify_signature(trusted)?;
        if let Some(done) = self.verified {
            return Ok(done);
        }
        let Some(bytes) = self.get(MANIFEST_FILE) else {
            return Ok(false);
        };
        let manifest = Manifest::from_json(bytes)?;
        for listed in manifest.files.keys() {
            // A lone GGUF file still needs the tokenizer files its manifest lists: without
            // them it would quietly fall back to the tokenizer inside the GGUF.
            let needed = !self.lone_file || matches!(listed.as_str(), "tokenizer.json" | "tokenizer_config.json");
            if needed && self.get(listed).is_none() {
                return Err(LoadError::ManifestFileMissing(listed.clone()));
            }
        }
        let to_check: Vec<&(String, FileBytes)> =
            self.files.iter().filter(|(n, _)| n != MANIFEST_FILE && n != SIGNATURE_FILE).collect();
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

    /// With trusted keys: the manifest must be there and signed by one of them.
    pub fn verify_signature(&self, trusted: &TrustedKeys) -> Result<()> {
        if trusted.is_empty() {
            return Ok(());
        }
        let manifest = self.get(MANIFEST_FILE).ok_or_else(|| LoadError::ManifestRequired(self.origin.clone()))?;
        let signer = trusted.verify(&self.origin, manifest, self.get(SIGNATURE_FILE))?;
        tracing::info!(model = %self.origin, key_id = %signer, "manifest signature verified");
        Ok(())
    }

    /// For a lone `.gguf` file: takes the manifest and its signature from the file's folder,
    /// so a signed folder vouches for the file.
    pub fn add_folder_manifest(&mut self, gguf: &Path) -> Result<()> {
        let Some(dir) = gguf.parent().filter(|_| self.lone_file) else { return Ok(()) };
        for name in [MANIFEST_FILE, SIGNATURE_FILE] {
            let p = dir.join(name);
            if p.is_file() && self.get(name).is_none() {
                self.files.push((name.into(), FileBytes::map(&p)?));
            }
        }
        Ok(())
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
            | SIGNATURE_FILE
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
        files.lone_file = true;
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
