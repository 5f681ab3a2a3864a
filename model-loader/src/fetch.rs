//! The download pipeline for weights files: parts fetched in parallel straight into the place
//! the model reads them from, each verified as it lands, with the local tier in front.
//!
//! - **Into place, once.** Each weights file gets one landing area before its first byte
//!   arrives: its file in the local tier (mapped, written through the mapping, renamed into
//!   place when verified), or anonymous memory when there is no cache. Every part writes its
//!   body into its own slice of that area as the bytes come off the connection: no assembly
//!   buffer, no second copy.
//! - **Verified as it lands.** With chunk digests in the manifest, each part is one chunk (or
//!   a quarter of one, for a GGUF file tiled during the download: `TILED_PARTS_PER_CHUNK`).
//!   With BLAKE3 chunk digests each part is hashed as its bytes arrive, while they are still in
//!   cache, as one subtree of its chunk's BLAKE3 tree; once a chunk's parts are in, a pool of
//!   threads (one per core) merges their subtrees and compares (SHA-256 chunks of a version 2
//!   manifest are hashed there whole). Verification runs beside the download instead of after
//!   it, and a bad chunk stops the download and is named.
//!   A file without chunk digests is hashed whole by a thread of its own, in order, as its
//!   parts become contiguous.
//! - **Local tier first.** A file cached and verified before, and unchanged on disk since
//!   ([`crate::tier`]), is mapped and not hashed; a cached file that changed is hashed again
//!   and, if bad, dropped and downloaded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use candle_core::quantized::GgmlDType;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::error::{LoadError, Result};
use crate::files::{FileBytes, ModelFiles};
use crate::manifest::{FileDigest, Manifest, MANIFEST_FILE};
use crate::s3::FetchOptions;
use crate::tier::{Lookup, Tier};

/// One weights object to fetch.
pub struct Remote {
    pub key: String,
    pub name: String,
    pub size: u64,
    pub etag: String,
}

/// What [`fill`] needs: the objects and how to reach them.
pub struct Fill {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    pub objects: Vec<Remote>,
    pub opts: FetchOptions,
    /// The runtime the download's futures run on (driven from [`fill`]'s blocking thread).
    pub runtime: tokio::runtime::Handle,
}

/// Where the bytes of a fetch came from and how long each stage took, for the cold-start
/// breakdown.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FetchStats {
    /// Listing the model's objects.
    pub list_s: f64,
    /// The small files (config, tokenizer, manifest).
    pub small_s: f64,
    /// Weights downloaded, and the wall time of the download (verification included: it runs
    /// beside it).
    pub downloaded_bytes: u64,
    pub download_s: f64,
    /// Verification left after the last byte landed.
    pub verify_tail_s: f64,
    /// GGUF tensors tiled during the download, and the tiling left after the last byte.
    pub tiled_early: usize,
    /// Of those, the tensors tiled where they landed (no memory of their own; `InPlace`).
    pub tiled_in_place: usize,
    pub tile_tail_s: f64,
    /// Weights taken from the local tier without hashing, and with hashing (changed on disk).
    pub cached_bytes: u64,
    pub rehashed_bytes: u64,
    pub cache_s: f64,
}

/// Fetches the weights into `files` (which holds the small files already), verifying every
/// file against the manifest if there is one. Blocking: call from a blocking thread.
pub fn fill(job: Fill, mut files: ModelFiles) -> Result<ModelFiles> {
    let manifest = files.get(MANIFEST_FILE).map(Manifest::from_json).transpose()?;
    if let Some(m) = &manifest {
        for listed in m.files.keys() {
            if files.get(listed).is_none() && !job.objects.iter().any(|o| &o.name == listed) {
                return Err(LoadError::ManifestFileMissing(listed.clone()));
            }
        }
        let unlisted = |n: &str| n == MANIFEST_FILE || n == crate::signing::SIGNATURE_FILE;
        for (name, bytes) in files.files.iter().filter(|(n, _)| !unlisted(n)) {
            m.check_bytes(name, bytes)?;
        }
    }
    let digests: Vec<Option<FileDigest>> = job
        .objects
        .iter()
        .map(|o| manifest.as_ref().map(|m| m.entry(&o.name).cloned()).transpose())
        .collect::<Result<_>>()?;

    let t_cache = Instant::now();
    let tier = job.opts.cache_dir.clone().map(|dir| Tier { dir, max_bytes: job.opts.cache_max_bytes });
    let mut entry = tier.as_ref().map(|t| t.open(&files.origin)).transpose()?;
    let mut stats = FetchStats::default();
    let mut to_fetch = Vec::new();
    for (obj, digest) in job.objects.iter().zip(&digests) {
        let found =
            entry.as_ref().map_or(Lookup::Missing, |e| e.lookup(&obj.name, &obj.etag, obj.size, digest.as_ref()));
        match found {
            Lookup::Verified(path) => {
                files.files.push((obj.name.clone(), FileBytes::map(&path)?));
                stats.cached_bytes += obj.size;
            }
            Lookup::Changed(path) => {
                let bytes = FileBytes::map(&path)?;
                let checked = manifest.as_ref().map_or(Ok(()), |m| m.check_bytes(&obj.name, &bytes));
                stats.rehashed_bytes += obj.size;
                match (checked, entry.as_mut()) {
                    (Ok(()), Some(e)) => {
                        e.commit(&obj.name, &path, &obj.etag, Option::clone(digest))?;
                        files.files.push((obj.name.clone(), bytes));
                    }
                    (Err(err), Some(e)) => {
                        tracing::warn!(file = obj.name, error = %err, "cache: a cached file changed on disk after it was verified; dropping it and downloading it again");
                        drop(bytes);
                        e.drop_file(&obj.name);
                        to_fetch.push((obj, digest));
                    }
                    (result, None) => result?,
                }
            }
            Lookup::Missing => to_fetch.push((obj, digest)),
        }
    }
    if let (Some(t), Some(e)) = (&tier, &entry) {
        // A GGUF file's tiles, kept beside it after the load, take about its size again.
        let tiles: u64 = to_fetch
            .iter()
            .filter(|(o, _)| job.opts.tile_gguf && job.opts.keep_tiles && o.name.ends_with(".gguf"))
            .map(|(o, _)| o.size)
            .sum();
        t.make_room(to_fetch.iter().map(|(o, _)| o.size).sum::<u64>() + tiles, e);
    }
    stats.cache_s = t_cache.elapsed().as_secs_f64();

    let mut landings = Vec::with_capacity(to_fetch.len());
    for (obj, _) in &to_fetch {
        landings.push(match &entry {
            Some(e) => Landing::file(e.partial_path(&obj.name), obj.size)?,
            None => Landing::memory(obj.size)?,
        });
    }
    let t_download = Instant::now();
    let plan: Vec<(&Remote, Option<&FileDigest>)> = to_fetch.iter().map(|(o, d)| (*o, d.as_ref())).collect();
    // A GGUF file without a tokenizer.json beside it holds its tokenizer in its header.
    let tokenizer_slot = files.get("tokenizer.json").is_none().then_some(&files.early_tokenizer);
    let early = Early { tokenizer: tokenizer_slot, header: &files.early_header };
    let (download_s, tail_s, mut tiled) = match download(&job, &plan, &mut landings, manifest.as_ref(), early) {
        Ok(done) => done,
        Err(e) => {
            for landing in landings {
                landing.discard();
            }
            return Err(e);
        }
    };
    stats.downloaded_bytes = to_fetch.iter().map(|(o, _)| o.size).sum();
    stats.download_s = download_s.max(t_download.elapsed().as_secs_f64() - tail_s);
    stats.verify_tail_s = tail_s;
    stats.tiled_early = tiled.layers.len() + tiled.in_place.len();
    stats.tiled_in_place = tiled.in_place.len();
    stats.tile_tail_s = tiled.tail_s;
    let mut layers = tiled.layers;

    for ((obj, digest), landing) in to_fetch.iter().zip(landings) {
        let bytes = match (landing, entry.as_mut()) {
            (Landing::File { map, path }, Some(e)) => {
                let map = map.make_read_only().map_err(|err| LoadError::io(&path, err))?;
                e.commit(&obj.name, &path, &obj.etag, Option::clone(digest))?;
                FileBytes::Mapped(std::sync::Arc::new(map))
            }
            (landing, _) => landing.into_bytes()?,
        };
        // Tiles written over their blocks are read where they are; the blocks are gone, so a
        // layer that cannot be made from them fails the load instead of reading tiles as blocks.
        if let (FileBytes::Mapped(map), true) = (&bytes, obj.name.ends_with(".gguf")) {
            let owner: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = map.clone();
            for (name, dtype, n, k, range) in std::mem::take(&mut tiled.in_place) {
                let layer = ember_kernels::cpu::SharedBytes::new(owner.clone(), range)
                    .and_then(|tiles| ember_kernels::cpu::QuantLinear::from_tiles(dtype, tiles, n, k))
                    .ok_or_else(|| LoadError::BadWeights {
                        file: obj.name.clone(),
                        message: format!("{name}: its tiles, made where it landed, could not be read back"),
                    })?;
                layers.insert(name, layer);
            }
        }
        files.files.push((obj.name.clone(), bytes));
    }
    if let Ok(mut slot) = files.tiled.lock() {
        *slot = layers;
    }
    files.files.sort_by(|a, b| a.0.cmp(&b.0));
    files.verified = Some(manifest.is_some());
    files.tier_dir = entry.as_ref().map(|e| e.dir().to_path_buf());
    if let Some(e) = &entry {
        for obj in &job.objects {
            if let Some(stamp) = e.stamp(&obj.name) {
                files.tier_stamps.insert(obj.name.clone(), stamp);
            }
        }
    }
    files.tier_max_bytes = tier.as_ref().and_then(|t| t.max_bytes);
    files.keep_tiles = job.opts.keep_tiles;
    files.in_place = true;
    files.pin = entry.map(|e| e.pin()).transpose()?;
    files.stats = stats;
    Ok(files)
}

/// Where one file's bytes land.
enum Landing {
    /// A file in the local tier, mapped for writing.
    File {
        map: memmap2::MmapMut,
        path: std::path::PathBuf,
    },
    /// Anonymous memory (no cache).
    Memory(memmap2::MmapMut),
    Empty,
}

impl Landing {
    fn file(path: std::path::PathBuf, size: u64) -> Result<Self> {
        if size == 0 {
            std::fs::write(&path, b"").map_err(|e| LoadError::io(&path, e))?;
            return Ok(Self::Empty);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| LoadError::io(&path, e))?;
        file.set_len(size).map_err(|e| LoadError::io(&path, e))?;
        // SAFETY: the file was just created under a name of this process's own
        // (`*.partial-<pid>`, inside the model's folder, which this process holds the exclusive
        // lock of), so no other process maps or writes it while this mapping lives.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(|e| LoadError::io(&path, e))?;
        Ok(Self::File { map, path })
    }

    fn memory(size: u64) -> Result<Self> {
        if size == 0 {
            return Ok(Self::Empty);
        }
        let map = memmap2::MmapMut::map_anon(size as usize).map_err(|e| LoadError::io("<anonymous memory>", e))?;
        // Fewer page faults while the parts land; advice only, so a refusal changes nothing.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(Self::Memory(map))
    }

    fn is_memory(&self) -> bool {
        matches!(self, Self::Memory(_))
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::File { map, .. } | Self::Memory(map) => map,
            Self::Empty => &mut [],
        }
    }

    fn into_bytes(self) -> Result<FileBytes> {
        match self {
            Self::File { map, path } => {
                Ok(FileBytes::Mapped(std::sync::Arc::new(map.make_read_only().map_err(|e| LoadError::io(&path, e))?)))
            }
            Self::Memory(map) => {
                let map = map.make_read_only().map_err(|e| LoadError::io("<anonymous memory>", e))?;
                Ok(FileBytes::Mapped(std::sync::Arc::new(map)))
            }
            Self::Empty => Ok(FileBytes::Owned(Vec::new())),
        }
    }

    /// Drops a landing whose download failed (deleting its partial file).
    fn discard(self) {
        if let Self::File { map, path } = self {
            drop(map);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Records that a thread finished now (the latest finish wins).
fn note_end(at: &Mutex<Option<Instant>>) {
    if let Ok(mut at) = at.lock() {
        let now = Instant::now();
        *at = Some(at.map_or(now, |t| t.max(now)));
    }
}

/// Work for the hashing threads.
enum Hash<'a> {
    /// Check chunk `index` of `name`, which landed as `pieces` (in order), each hashed as it
    /// landed when `subtrees` has its offset in the chunk, length and hasher (else the pieces
    /// are hashed here).
    Chunk { name: &'a str, index: usize, pieces: Vec<&'a [u8]>, subtrees: Vec<(u64, u64, blake3::Hasher)> },
}

/// Parts per chunk of a GGUF file tiled during the download. Parts in flight share the link and
/// land together, so with one part per chunk a small file (a few chunks, all in flight) lands
/// whole at the very end, and its tiling and hashing wait for the last byte; quarter-chunk
/// parts (4 MiB with 16 MiB chunks) land in waves through the download instead.
const TILED_PARTS_PER_CHUNK: u64 = 4;

/// GGUF layers tiled during a download.
#[derive(Default)]
struct Tiled {
    layers: std::collections::HashMap<String, ember_kernels::cpu::QuantLinear>,
    /// Layers whose tiles were written over their own blocks in the landing: GGUF name,
    /// format, shape and byte range, made into layers once the landing is read-only.
    in_place: Vec<Placed>,
    /// Seconds of tiling left after the last byte landed.
    tail_s: f64,
}

/// A tensor tiled where it landed: GGUF name, format, shape `(n, k)` and byte range.
type Placed = (String, GgmlDType, usize, usize, std::ops::Range<usize>);

/// The landing of a GGUF file tiled in place: its address, shared by the parts the download
/// writes and the tiling that writes tiles over verified tensors.
#[derive(Clone, Copy)]
struct LandingPtr {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is an anonymous mapping owned by the download's landing, which outlives
// every thread of the download (they are scoped); which thread touches which bytes when is
// the protocol of `InPlace`: the download writes each part's bytes, the hashers and the
// header parser read them, and a tensor's bytes are written by the tiling only after every
// reader of them is done.
unsafe impl Send for LandingPtr {}
// SAFETY: as for `Send`: concurrent access is to disjoint bytes, ordered through `InPlace`.
unsafe impl Sync for LandingPtr {}

/// A GGUF file whose quantized tensors are tiled where they landed, each as soon as every
/// chunk it lies in has been verified: the tiles take exactly the blocks' bytes (the 32-weight
/// formats with rows a multiple of 16), so the tiles need no memory of their own. A new process
/// pays for every page of fresh memory it touches (a page fault and zeroing; on a VM whose host
/// backs guest memory lazily, as Firecracker's, a host fault too), and tiles in fresh memory
/// doubled what a GGUF start touched. Only for a landing in anonymous memory (a tier file keeps
/// the file's bytes) with chunk digests (each chunk's readers are done once it is hashed).
///
/// The protocol that keeps every access to the landing apart: a part's bytes are written by
/// its download only; the hashers read a chunk's bytes once all its parts have landed; the
/// header parser reads the first parts, and the plan (which tensors) exists only after it has
/// finished; a tensor is handed to the tiling only when its chunks are all hashed and the plan
/// exists, so no reader of its bytes is left, and only the tiling touches them from then on,
/// each tensor by one thread. The mutex orders each step before the next.
struct InPlace {
    base: LandingPtr,
    chunk: u64,
    state: Mutex<InPlaceState>,
}

#[derive(Default)]
struct InPlaceState {
    hashed: Vec<bool>,
    /// The tensors, once the header has parsed, each with whether it was handed on.
    plan: Option<Vec<(crate::prebuild::Planned, bool)>>,
}

impl InPlace {
    /// Tensors whose chunks are now all hashed and that were not handed on yet.
    fn take_ready(&self, state: &mut InPlaceState) -> Vec<crate::prebuild::Planned> {
        let hashed = &state.hashed;
        let Some(plan) = state.plan.as_mut() else { return Vec::new() };
        let mut ready = Vec::new();
        for (t, handed) in plan.iter_mut().filter(|(_, handed)| !*handed) {
            let (first, last) = (t.start / self.chunk, (t.start + t.len.max(1) - 1) / self.chunk);
            if (first..=last).all(|c| hashed.get(c as usize).copied().unwrap_or(false)) {
                *handed = true;
                ready.push(t.clone());
            }
        }
        ready
    }

    /// Chunk `index` has been hashed (and its pieces dropped): the tensors it completes.
    fn chunk_hashed(&self, index: usize) -> Vec<crate::prebuild::Planned> {
        let Ok(mut state) = self.state.lock() else { return Vec::new() };
        if let Some(h) = state.hashed.get_mut(index) {
            *h = true;
        }
        self.take_ready(&mut state)
    }

    /// The header has parsed: the tensors whose chunks are already hashed.
    fn planned(&self, plan: Vec<crate::prebuild::Planned>) -> Vec<crate::prebuild::Planned> {
        let Ok(mut state) = self.state.lock() else { return Vec::new() };
        state.plan = Some(plan.into_iter().map(|t| (t, false)).collect());
        self.take_ready(&mut state)
    }

    /// Tiles tensor `t` where it lies, one tile of rows at a time
    /// ([`ember_kernels::cpu::QuantLinear::tile_in_place`]); or, where its tiles would not fit,
    /// into a layer of its own. (Every tensor of the plan is read only through its tiled layer
    /// from here on: the embedding table too, whose rows are looked up in its tiles.)
    fn tile(&self, t: &crate::prebuild::Planned) -> TiledOne {
        use ember_kernels::cpu::QuantLinear;
        let (start, len) = (t.start as usize, t.len as usize);
        if start.checked_add(len).is_none_or(|end| end > self.base.len) {
            return TiledOne::None;
        }
        if QuantLinear::tiles_in_place_len(t.dtype, t.n, t.k) != Some(len) {
            // SAFETY: inside the landing (checked above); every chunk holding these bytes has
            // been hashed, so the download, the hashers and the header parser are done with
            // them, and this thread alone was handed the tensor (`InPlace`'s protocol).
            let blocks = unsafe { std::slice::from_raw_parts(self.base.ptr.add(start), len) };
            return QuantLinear::tiled_from_blocks(t.dtype, blocks, t.n, t.k).map_or(TiledOne::None, TiledOne::Owned);
        }
        // SAFETY: as above; and no other reference to these bytes is used again until the
        // landing is made read-only after the download.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.base.ptr.add(start), len) };
        match QuantLinear::tile_in_place(t.dtype, bytes, t.n, t.k) {
            Some(()) => TiledOne::InPlace(start..start + len),
            None => TiledOne::None,
        }
    }
}

/// A landed part handed to the GGUF header parser and tiler: its bytes, or, for an
/// [`InPlace`] file, only their address (see the feeder in [`download`]).
enum FedPart<'a> {
    Slice(&'a [u8]),
    Raw(ConstPtr, usize),
}

/// A part's address, sent to the feeder thread.
#[derive(Clone, Copy)]
struct ConstPtr(*const u8);

// SAFETY: only an address; the feeder makes a slice of it under `InPlace`'s protocol.
unsafe impl Send for ConstPtr {}

/// What tiling one tensor of an [`InPlace`] file made.
enum TiledOne {
    InPlace(std::ops::Range<usize>),
    Owned(ember_kernels::cpu::QuantLinear),
    None,
}

/// Work for the tiling threads.
enum TileWork<'a> {
    /// A tensor whose bytes have landed, tiled into memory of its own.
    Landed(crate::prebuild::Ready<'a>),
    /// A tensor of an [`InPlace`] file whose chunks are verified, tiled where it lies.
    InPlace(crate::prebuild::Planned),
}

/// Where a download leaves what it learns from a GGUF file's header before the last byte: the
/// tokenizer built from it (when there is no `tokenizer.json`), and the header itself.
#[derive(Clone, Copy)]
struct Early<'a> {
    tokenizer: Option<&'a crate::files::PendingTokenizer>,
    header: &'a crate::files::EarlyHeader,
}

/// Downloads every planned file into its landing, verifying on the way (and tiling a GGUF
/// file's tensors, when asked). Returns the seconds until the last byte landed, the
/// verification that ran after it, and the tiles.
fn download(
    job: &Fill,
    plan: &[(&Remote, Option<&FileDigest>)],
    landings: &mut [Landing],
    manifest: Option<&Manifest>,
    early: Early<'_>,
) -> Result<(f64, f64, Tiled)> {
    struct Part<'a> {
        file: usize,
        index: usize,
        start: u64,
        dest: &'a mut [u8],
    }
    let started = Instant::now();
    let tile_file = plan.iter().position(|(o, _)| job.opts.tile_gguf && o.name.ends_with(".gguf"));
    // Tiled where it lands (see `InPlace`), unless `EMBER_TILE_IN_PLACE=0` (to compare).
    let in_place_file = tile_file.filter(|&f| {
        manifest.is_some()
            && landings[f].is_memory()
            && plan[f].1.and_then(FileDigest::chunking).is_some_and(|c| c % TILED_PARTS_PER_CHUNK == 0)
            && std::env::var("EMBER_TILE_IN_PLACE").map_or(true, |v| v != "0")
    });
    let mut in_place: Option<InPlace> = None;
    let mut parts = Vec::new();
    let mut chunked = Vec::with_capacity(plan.len());
    // Per file with chunk digests: parts per chunk, and each chunk's pieces as they land.
    let mut per_chunk = vec![(1u64, 1u64); plan.len()];
    // Per file: whether each part is hashed as it lands (BLAKE3 chunks in parts that are whole
    // subtrees of the chunk's tree; see `manifest::blake3_of_subtrees`).
    let mut hash_landing = vec![false; plan.len()];
    type Landed<'a> = BTreeMap<usize, Vec<(usize, &'a [u8], Option<blake3::Hasher>)>>;
    let mut pieces: Vec<Landed<'_>> = vec![BTreeMap::new(); plan.len()];
    for (file, ((obj, digest), landing)) in plan.iter().zip(landings.iter_mut()).enumerate() {
        let chunk = digest.and_then(FileDigest::chunking);
        chunked.push(chunk.is_some());
        let split = if tile_file == Some(file) && chunk.is_some_and(|c| c % TILED_PARTS_PER_CHUNK == 0) {
            TILED_PARTS_PER_CHUNK
        } else {
            1
        };
        let size = chunk.map_or(job.opts.part_size.max(1) as u64, |c| c / split) as usize;
        per_chunk[file] = (size as u64, split);
        hash_landing[file] = manifest.is_some()
            && digest
                .and_then(FileDigest::chunk_digests)
                .is_some_and(|(_, h, _)| h == crate::manifest::ChunkHash::Blake3)
            && size.is_power_of_two()
            && size >= blake3::CHUNK_LEN;
        let dest = landing.bytes_mut();
        if dest.len() as u64 != obj.size {
            return Err(LoadError::BadConfig(format!("landing for `{}` has the wrong size", obj.name)));
        }
        if in_place_file == Some(file) {
            // Every part is made from one pointer, which the tiling writes through later.
            let base = LandingPtr { ptr: dest.as_mut_ptr(), len: dest.len() };
            let chunk = split * size as u64;
            let hashed = vec![false; (base.len as u64).div_ceil(chunk) as usize];
            in_place = Some(InPlace { base, chunk, state: Mutex::new(InPlaceState { hashed, plan: None }) });
            for (index, start) in (0..base.len).step_by(size.max(1)).enumerate() {
                // SAFETY: `start..start + len` lies inside the landing, and the parts are
                // disjoint; each is written by its own download, as `chunks_mut` would give.
                let dest = unsafe { std::slice::from_raw_parts_mut(base.ptr.add(start), size.min(base.len - start)) };
                parts.push(Part { file, index, start: start as u64, dest });
            }
        } else {
            for (index, dest) in dest.chunks_mut(size).enumerate() {
                parts.push(Part { file, index, start: (index * size) as u64, dest });
            }
        }
    }
    let in_place = in_place.as_ref();
    let in_place_name = in_place_file.map(|f| plan[f].0.name.as_str());
    let placed: Mutex<Vec<Placed>> = Mutex::default();
    let total: u64 = plan.iter().map(|(o, _)| o.size).sum();
    let bar = crate::s3::progress_bar(job.opts.progress, total);
    let failed = AtomicBool::new(false);
    let errors: Mutex<Vec<LoadError>> = Mutex::new(Vec::new());
    let mut landed_s = 0.0;
    let tiles: Mutex<std::collections::HashMap<String, ember_kernels::cpu::QuantLinear>> = Mutex::default();
    // When the last hashing thread and the last tiling thread finished.
    let (hashed_at, tiled_at) = (Mutex::new(None), Mutex::new(None));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Short for tensors gathered across parts (their copies wait in it); long for an in-place
    // file's tensors (names and ranges only), so that a hasher never waits on the tiling.
    let queue = if in_place.is_some() { 4096 } else { cores };
    let (work_tx, work_rx) = mpsc::sync_channel::<TileWork<'_>>(queue);
    let work_rx = Mutex::new(work_rx);
    // The chunk pool's queue: one thread per core takes from it.
    let (pool_tx, pool_rx) = mpsc::channel::<Hash<'_>>();
    let pool_rx = Mutex::new(pool_rx);
    std::thread::scope(|s| {
        // One core is left to the download itself (its copies, TLS and HTTP parsing): one core
        // of BLAKE3 (several GB/s with AVX-512 or AVX2; SHA-256 chunks of a version 2 manifest,
        // about 1.3 GB/s with SHA-NI) keeps up with this machine's loopback download. Once the
        // last byte has landed that core is free, and hashes the chunks still queued.
        let threads = cores.saturating_sub(1).max(1);
        let (rx, failed_ref, errors_ref) = (&pool_rx, &failed, &errors);
        let hashed_at = &hashed_at;
        // A hasher; with a sender, it also hands on the tensors of an in-place file that each
        // chunk it verifies completes.
        let hasher = move |tiling: Option<mpsc::SyncSender<TileWork<'_>>>| loop {
            let next = rx.lock().map_err(|_| ()).and_then(|rx| rx.recv().map_err(|_| ()));
            let Ok(Hash::Chunk { name, index, pieces, subtrees }) = next else {
                note_end(hashed_at);
                return;
            };
            if let (Some(m), false) = (manifest, failed_ref.load(Ordering::Relaxed)) {
                let checked = m.check_chunk_hashed(name, index, &pieces, &subtrees);
                drop((pieces, subtrees));
                match checked {
                    Ok(()) => {
                        if let (Some(ip), Some(tx), true) = (in_place, &tiling, in_place_name == Some(name)) {
                            for t in ip.chunk_hashed(index) {
                                let _ = tx.send(TileWork::InPlace(t));
                            }
                        }
                    }
                    Err(e) => {
                        failed_ref.store(true, Ordering::Relaxed);
                        if let Ok(mut errs) = errors_ref.lock() {
                            errs.push(e);
                        }
                    }
                }
            }
        };
        let hasher_tx = || in_place.map(|_| work_tx.clone());
        for _ in 0..threads {
            let tx = hasher_tx();
            s.spawn(move || hasher(tx));
        }
        // A whole-file hasher per file that has a manifest entry but no chunk digests.
        let mut whole: BTreeMap<usize, mpsc::Sender<&[u8]>> = BTreeMap::new();
        for (file, (obj, digest)) in plan.iter().enumerate() {
            let (Some(m), Some(_), false) = (manifest, digest, chunked[file]) else { continue };
            let (tx, rx) = mpsc::channel::<&[u8]>();
            let (failed, errors) = (&failed, &errors);
            whole.insert(file, tx);
            s.spawn(move || {
                let mut hasher = Sha256::new();
                let mut size = 0u64;
                for bytes in rx {
                    hasher.update(bytes);
                    size += bytes.len() as u64;
                }
                note_end(hashed_at);
                if failed.load(Ordering::Relaxed) || size != obj.size {
                    return; // the download failed: its error is the one to report
                }
                let actual = FileDigest::whole(hex::encode(hasher.finalize()), size);
                if let Err(e) = m.check(&obj.name, &actual) {
                    failed.store(true, Ordering::Relaxed);
                    if let Ok(mut errs) = errors.lock() {
                        errs.push(e);
                    }
                }
            });
        }
        // The GGUF file to tile as it lands (when asked): its parts go to a thread of their
        // own, which takes them in file order.
        let (tile_tx, tile_rx) = mpsc::channel::<(usize, FedPart<'_>)>();
        // That thread finds the tensors each part completes, in file order; tiling them is shared
        // by one thread per core at the lowest priority (`prebuild::lower_priority`), and once
        // the last byte has landed this thread joins in at its own. The queue between them is
        // short, so tensors gathered across parts wait in it a few at a time, not the file.
        let (tiles, tiled_at) = (&tiles, &tiled_at);
        let work_rx = &work_rx;
        let failed_ref = &failed;
        let placed = &placed;
        let tile_one = move |work: TileWork<'_>| {
            // After a failed check the tiles would be thrown away: the queue is only drained.
            if failed_ref.load(Ordering::Relaxed) {
                return;
            }
            let (name, layer) = match work {
                TileWork::Landed(ready) => (ready.name.clone(), ready.tile()),
                TileWork::InPlace(t) => match in_place.map_or(TiledOne::None, |ip| ip.tile(&t)) {
                    TiledOne::InPlace(range) => {
                        if let Ok(mut placed) = placed.lock() {
                            placed.push((t.name, t.dtype, t.n, t.k, range));
                        }
                        return;
                    }
                    TiledOne::Owned(layer) => (t.name, Some(layer)),
                    TiledOne::None => return,
                },
            };
            if let (Some(layer), Ok(mut tiles)) = (layer, tiles.lock()) {
                tiles.insert(name, layer);
            }
        };
        let tile_queued = move || {
            while let Ok(work) = work_rx.lock().map_err(|_| ()).and_then(|rx| rx.recv().map_err(|_| ())) {
                tile_one(work);
            }
            note_end(tiled_at);
        };
        if tile_file.is_some() {
            for _ in 0..cores {
                s.spawn(move || {
                    crate::prebuild::lower_priority();
                    tile_queued();
                });
            }
            let feeder_tx = work_tx.clone();
            s.spawn(move || {
                let work_tx = feeder_tx;
                let mut tiler = match in_place {
                    Some(_) => crate::prebuild::GgufTiler::header_only(),
                    None => crate::prebuild::GgufTiler::default(),
                };
                let (mut next, mut held) = (0usize, BTreeMap::new());
                let mut planned = false;
                for (index, landed) in tile_rx {
                    if planned {
                        continue; // an in-place file's header is in: its bytes are not read here
                    }
                    held.insert(index, landed);
                    while let Some(landed) = held.remove(&next) {
                        let b = match landed {
                            FedPart::Slice(b) => b,
                            // SAFETY: the part has landed (the download is done with it), and no
                            // tensor is tiled in place before the plan below is handed over, so
                            // nothing writes these bytes while they are read here.
                            FedPart::Raw(ptr, len) => unsafe { std::slice::from_raw_parts(ptr.0, len) },
                        };
                        tiler.feed(b, &mut |ready| {
                            let _ = work_tx.send(TileWork::Landed(ready));
                        });
                        next += 1;
                    }
                    if let (Some(ip), Some(plan)) = (in_place, in_place.and_then(|_| tiler.take_plan())) {
                        planned = true;
                        held.clear();
                        for t in ip.planned(plan) {
                            let _ = work_tx.send(TileWork::InPlace(t));
                        }
                    }
                    if let Some(header) = tiler.take_header().map(std::sync::Arc::new) {
                        // The tokenizer needs only the header: built beside the rest of the file.
                        if let Some(slot) = early.tokenizer {
                            let header = header.clone();
                            let building =
                                std::thread::Builder::new().name("ember-tokenizer".into()).spawn(move || {
                                    crate::gguf::gguf_byte_bpe(&header).map(crate::tokenizer::Tokenizer::from)
                                });
                            if let (Ok(handle), Ok(mut slot)) = (building, slot.lock()) {
                                *slot = Some(handle);
                            }
                        }
                        if let (Some(f), Ok(mut slot)) = (tile_file, early.header.lock()) {
                            *slot = Some((plan[f].0.name.clone(), header));
                        }
                    }
                }
            });
        } else {
            drop(tile_rx);
        }
        // The parts of whole-hashed files wait here until they are next in file order.
        let mut waiting: BTreeMap<usize, (usize, BTreeMap<usize, &[u8]>)> = BTreeMap::new();
        let client = &job.client;
        let bucket = job.bucket.as_str();
        let result = job.runtime.block_on(async {
            let (hash_landing, per_chunk) = (&hash_landing, &per_chunk);
            let mut fetches = futures::stream::iter(parts.into_iter().map(|part| async move {
                let key = &plan[part.file].0.key;
                // Hashed as it lands: a subtree of its chunk's tree, at its offset in the chunk.
                let mut hasher = hash_landing[part.file].then(|| {
                    let (size, split) = per_chunk[part.file];
                    let mut h = blake3::Hasher::new();
                    let offset = part.start % (size * split);
                    if offset > 0 {
                        blake3::hazmat::HasherExt::set_input_offset(&mut h, offset);
                    }
                    h
                });
                crate::s3::get_into_hashing(client, bucket, key, part.start, &mut *part.dest, hasher.as_mut()).await?;
                let bytes: &[u8] = part.dest;
                Ok::<_, LoadError>((part.file, part.index, bytes, hasher))
            }))
            .buffer_unordered(job.opts.concurrency.max(1));
            while let Some(landed) = fetches.next().await {
                if failed.load(Ordering::Relaxed) {
                    return Ok(()); // a chunk failed its check: stop downloading
                }
                let (file, index, bytes, hasher) = landed?;
                bar.inc(bytes.len() as u64);
                if tile_file == Some(file) {
                    let landed = match in_place {
                        // Only the address: the bytes may be tiled over before the header
                        // parser gets to them, and it reads them only while it has no plan.
                        Some(_) => FedPart::Raw(ConstPtr(bytes.as_ptr()), bytes.len()),
                        None => FedPart::Slice(bytes),
                    };
                    let _ = tile_tx.send((index, landed));
                }
                if chunked[file] {
                    // A chunk is hashed once all its parts have landed.
                    let (obj, (part, split)) = (plan[file].0, per_chunk[file]);
                    let chunk = index / split as usize;
                    let landed = pieces[file].entry(chunk).or_default();
                    landed.push((index, bytes, hasher));
                    // The chunk's parts: `split`, or fewer in a short last chunk.
                    let chunk_start = chunk as u64 * split * part;
                    if landed.len() as u64 == (obj.size - chunk_start).min(split * part).div_ceil(part) {
                        let mut landed = pieces[file].remove(&chunk).unwrap_or_default();
                        landed.sort_by_key(|(i, _, _)| *i);
                        let name = obj.name.as_str();
                        let mut subtrees = Vec::new();
                        let mut chunk_pieces = Vec::with_capacity(landed.len());
                        for (i, b, h) in landed {
                            if let Some(h) = h {
                                subtrees.push((i as u64 * part - chunk_start, b.len() as u64, h));
                            }
                            chunk_pieces.push(b);
                        }
                        let _ = pool_tx.send(Hash::Chunk { name, index: chunk, pieces: chunk_pieces, subtrees });
                    }
                } else if let Some(tx) = whole.get(&file) {
                    let (next, held) = waiting.entry(file).or_default();
                    held.insert(index, bytes);
                    while let Some(b) = held.remove(next) {
                        let _ = tx.send(b);
                        *next += 1;
                    }
                }
            }
            Ok(())
        });
        landed_s = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        drop(pool_tx);
        for _ in threads..cores {
            let tx = hasher_tx();
            s.spawn(move || hasher(tx));
        }
        // The hashers and the feeder hold the senders the tiling waits on from here.
        drop(work_tx);
        whole.clear();
        drop(tile_tx);
        if tile_file.is_some() {
            tile_queued();
        }
        if let Err(e) = result {
            failed.store(true, Ordering::Relaxed);
            if let Ok(mut errs) = errors.lock() {
                errs.insert(0, e);
            }
        }
    });
    let after = |at: &Mutex<Option<Instant>>| {
        let end = at.lock().ok().and_then(|t| *t).map_or(0.0, |t| t.saturating_duration_since(started).as_secs_f64());
        (end - landed_s).max(0.0)
    };
    let tail_s = after(&hashed_at);
    let tiled = match tile_file {
        Some(_) => Tiled {
            layers: tiles.into_inner().unwrap_or_default(),
            in_place: placed.into_inner().unwrap_or_default(),
            tail_s: after(&tiled_at),
        },
        None => Tiled::default(),
    };
    let mut errors = errors.into_inner().unwrap_or_default();
    // A failed check names the first bad chunk in file order; a download error comes first.
    errors.sort_by_key(|e| match e {
        LoadError::ChunkMismatch { chunk, .. } => *chunk,
        _ => 0,
    });
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok((landed_s, tail_s, tiled)),
    }
}
