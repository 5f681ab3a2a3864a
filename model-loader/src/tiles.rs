//! Tiled weights kept in the local tier beside the GGUF file they were made from, so the next
//! start maps them instead of tiling again.
//!
//! Tiling a GGUF file for Ember's CPU kernels ([`ember_kernels::cpu::QuantLinear`]) writes as
//! many bytes as the file holds; on a warm start, with the file itself only mapped, it is most
//! of the time to ready. After a start that tiled, the tiles are written to
//! `<file>.tiles` (a header, then each tensor's tiles, 64-byte aligned) and the tiles file's
//! identity on disk to `<file>.tiles.stamp`, both by rename.
//!
//! A later start uses them only if all of these hold, and tiles the file again otherwise:
//! - the GGUF file they were made from is the tier's verified copy, unchanged on disk since
//!   (its [`Stamp`] as recorded in the tiles' header: the tier checked the same stamp against
//!   the one it recorded at verification);
//! - the tiles file is unchanged since it was written (its stamp, in the `.stamp` file, which
//!   the kernel's change time makes impossible to forge from user space, see [`crate::tier`]);
//! - the layout version is this build's ([`ember_kernels::cpu::TILED_LAYOUT_VERSION`]), and
//!   every tensor's bytes are the size its shape tiles to.
//!
//! So the tiles are derived from verified bytes by this code, and unchanged since: they need
//! no hash of their own.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use ember_kernels::cpu::{QuantLinear, SharedBytes, TILED_LAYOUT_VERSION};
use serde::{Deserialize, Serialize};

use crate::tier::Stamp;

const MAGIC: &[u8; 8] = b"EMBTILES";
/// The magic, the header's length and the data's start (both u64, little-endian).
const PREAMBLE: u64 = 24;
const ALIGN: u64 = 64;

#[derive(Serialize, Deserialize)]
struct Header {
    layout: u32,
    /// The GGUF file's stamp when the tiles were made from it.
    source: Stamp,
    tensors: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    /// GGUF tensor name.
    name: String,
    dtype: String,
    n: usize,
    k: usize,
    /// Offset from the start of the data, and length.
    offset: u64,
    len: u64,
}

fn tiles_path(gguf: &Path) -> PathBuf {
    let mut p = gguf.as_os_str().to_owned();
    p.push(".tiles");
    PathBuf::from(p)
}

fn stamp_path(gguf: &Path) -> PathBuf {
    let mut p = gguf.as_os_str().to_owned();
    p.push(".tiles.stamp");
    PathBuf::from(p)
}

fn dtype_name(d: GgmlDType) -> Option<&'static str> {
    use GgmlDType::*;
    Some(match d {
        Q4_0 => "q4_0",
        Q4_1 => "q4_1",
        Q5_0 => "q5_0",
        Q8_0 => "q8_0",
        Q4K => "q4_k",
        Q5K => "q5_k",
        Q6K => "q6_k",
        _ => return None,
    })
}

fn dtype_of(name: &str) -> Option<GgmlDType> {
    use GgmlDType::*;
    [Q4_0, Q4_1, Q5_0, Q8_0, Q4K, Q5K, Q6K].into_iter().find(|d| dtype_name(*d) == Some(name))
}

/// The layers kept beside `gguf` (a file in the local tier, whose current stamp is `source`),
/// by GGUF tensor name; None when there are none, or they cannot be trusted or used here.
pub fn read(gguf: &Path, source: Stamp) -> Option<HashMap<String, QuantLinear>> {
    let path = tiles_path(gguf);
    let recorded: Stamp = serde_json::from_slice(&std::fs::read(stamp_path(gguf)).ok()?).ok()?;
    let file = std::fs::File::open(&path).ok()?;
    if Stamp::of(&file.metadata().ok()?) != recorded {
        tracing::info!(file = %path.display(), "cache: tiles changed on disk since they were written; tiling again");
        return None;
    }
    // SAFETY: the tiles file is replaced only by rename, never written in place (see
    // `write`), and its stamp was just checked unchanged since it was written.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.ok()?);
    let bytes: &[u8] = &map;
    if bytes.get(..8)? != MAGIC {
        return None;
    }
    let header_len = usize::try_from(u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?)).ok()?;
    let data_start = usize::try_from(u64::from_le_bytes(bytes.get(16..24)?.try_into().ok()?)).ok()?;
    let header: Header = serde_json::from_slice(bytes.get(24..24usize.checked_add(header_len)?)?).ok()?;
    if header.layout != TILED_LAYOUT_VERSION || header.source != source {
        return None;
    }
    let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = map.clone();
    let mut layers = HashMap::with_capacity(header.tensors.len());
    for t in header.tensors {
        let start = data_start.checked_add(usize::try_from(t.offset).ok()?)?;
        let range = start..start.checked_add(usize::try_from(t.len).ok()?)?;
        let tiles = SharedBytes::new(owner.clone(), range)?;
        layers.insert(t.name, QuantLinear::from_tiles(dtype_of(&t.dtype)?, tiles, t.n, t.k)?);
    }
    Some(layers)
}

/// Writes `layers` (GGUF name, format, tiled layer) beside `gguf`, whose stamp is `source`:
/// under temporary names, then renamed into place, the stamp last. Nothing is written when the
/// cache (`gguf`'s folder's parent) would then hold more than `max_bytes`. Errors are logged,
/// not returned: the tiles are an optimization, and the next start tiles again without them.
pub fn write(gguf: &Path, source: Stamp, layers: &[(String, GgmlDType, QuantLinear)], max_bytes: Option<u64>) {
    let size: u64 = layers.iter().filter_map(|(_, _, l)| l.tiles()).map(|t| t.len() as u64).sum();
    let root = gguf.parent().and_then(Path::parent);
    if let (Some(max), Some(root)) = (max_bytes, root) {
        let held = crate::tier::total_size(root);
        if held + size > max {
            tracing::info!(file = %gguf.display(), bytes = size, held, max_bytes = max, "cache: no room for the tiled weights under the cache limit; the next start tiles again");
            return;
        }
    }
    if let Err(e) = try_write(gguf, source, layers) {
        tracing::warn!(file = %gguf.display(), error = %e, "cache: could not keep the tiled weights for the next start");
    }
}

fn try_write(gguf: &Path, source: Stamp, layers: &[(String, GgmlDType, QuantLinear)]) -> std::io::Result<()> {
    let mut tensors = Vec::with_capacity(layers.len());
    let mut parts = Vec::with_capacity(layers.len());
    let mut at = 0u64;
    for (name, dtype, layer) in layers {
        let (Some(tiles), Some(dtype)) = (layer.tiles(), dtype_name(*dtype)) else { continue };
        let (n, k) = layer.shape();
        at = at.div_ceil(ALIGN) * ALIGN;
        tensors.push(Entry { name: name.clone(), dtype: dtype.into(), n, k, offset: at, len: tiles.len() as u64 });
        parts.push((at, tiles));
        at += tiles.len() as u64;
    }
    if tensors.is_empty() {
        return Ok(());
    }
    let header = serde_json::to_vec(&Header { layout: TILED_LAYOUT_VERSION, source, tensors })?;
    let data_start = (PREAMBLE + header.len() as u64).div_ceil(ALIGN) * ALIGN;
    let (path, tmp) = (tiles_path(gguf), partial(&tiles_path(gguf)));
    let written = (|| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        out.write_all(MAGIC)?;
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&data_start.to_le_bytes())?;
        out.write_all(&header)?;
        let mut pos = PREAMBLE + header.len() as u64;
        for (offset, tiles) in &parts {
            let to = data_start + offset;
            out.write_all(&vec![0u8; (to - pos) as usize])?;
            out.write_all(tiles)?;
            pos = to + tiles.len() as u64;
        }
        out.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    let stamp = serde_json::to_vec(&Stamp::of(&std::fs::metadata(&path)?))?;
    let (stamp_to, stamp_tmp) = (stamp_path(gguf), partial(&stamp_path(gguf)));
    std::fs::write(&stamp_tmp, stamp)?;
    std::fs::rename(&stamp_tmp, stamp_to)
}

/// A temporary name beside `path`, unique to this write: processes in different containers
/// sharing a cache volume can have the same pid, and two of them can hold the folder's shared
/// lock at once.
fn partial(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".partial-{}-{nanos:x}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::Relaxed)));
    PathBuf::from(p)
}

/// Deletes the tiles kept beside `gguf` (the file itself is being dropped or replaced).
pub fn remove(gguf: &Path) {
    let _ = std::fs::remove_file(stamp_path(gguf));
    let _ = std::fs::remove_file(tiles_path(gguf));
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn layer(dtype: GgmlDType, n: usize, k: usize, scale: f64) -> anyhow::Result<Option<QuantLinear>> {
        let w = Tensor::arange(0f32, (n * k) as f32, &Device::Cpu)?.reshape((n, k))?.affine(scale, -1.0)?;
        let q = QTensor::quantize(&w, dtype)?;
        Ok(QuantLinear::tiled_from_blocks(dtype, &q.data()?, n, k))
    }

    fn out(l: &QuantLinear) -> anyhow::Result<Vec<f32>> {
        let k = l.shape().1;
        let x = Tensor::arange(0f32, (2 * k) as f32, &Device::Cpu)?.reshape((1, 2, k))?.affine(0.01, -0.5)?;
        Ok(l.forward(&x)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Tiles written beside a file come back equal, and only while the file and the tiles are
    /// both as they were: a rewritten source, a tiles file changed in place, or a missing
    /// stamp each make the next start tile again.
    #[test]
    fn kept_tiles_come_back_only_while_source_and_tiles_are_unchanged() -> anyhow::Result<()> {
        let (Some(a), Some(b)) = (layer(GgmlDType::Q4_1, 48, 64, 0.001)?, layer(GgmlDType::Q6K, 16, 256, -0.0005)?)
        else {
            println!("no tiled kernels on this CPU: nothing is tiled, nothing to keep");
            return Ok(());
        };
        let dir = tempfile::tempdir()?;
        let gguf = dir.path().join("model.gguf");
        std::fs::write(&gguf, b"the verified file")?;
        let source = Stamp::of(&std::fs::metadata(&gguf)?);
        let layers =
            vec![("blk.0.a".to_string(), GgmlDType::Q4_1, a.clone()), ("blk.0.b".into(), GgmlDType::Q6K, b.clone())];
        write(&gguf, source, &layers, None);
        let back = read(&gguf, source).ok_or_else(|| anyhow::anyhow!("tiles not read back"))?;
        assert_eq!(back.len(), 2);
        assert_eq!(out(&back["blk.0.a"])?, out(&a)?);
        assert_eq!(out(&back["blk.0.b"])?, out(&b)?);

        // The source is another file now (same name): its stamp differs.
        std::fs::write(&gguf, b"a different file")?;
        assert!(read(&gguf, Stamp::of(&std::fs::metadata(&gguf)?)).is_none(), "tiles of a replaced source");

        // The tiles file changed in place after it was written (a byte added: the size changes
        // too, so this holds on kernels whose change times are coarser than the test).
        write(&gguf, source, &layers, None);
        assert!(read(&gguf, source).is_some());
        std::fs::OpenOptions::new().append(true).open(tiles_path(&gguf))?.write_all(&[0])?;
        assert!(read(&gguf, source).is_none(), "tiles changed on disk");

        // No room under the cache limit: nothing written.
        remove(&gguf);
        write(&gguf, source, &layers, Some(1024));
        assert!(!tiles_path(&gguf).exists(), "tiles over the cache limit");

        // No stamp: never trusted.
        write(&gguf, source, &layers, None);
        std::fs::remove_file(stamp_path(&gguf))?;
        assert!(read(&gguf, source).is_none(), "tiles without their stamp");
        remove(&gguf);
        assert!(!tiles_path(&gguf).exists());
        Ok(())
    }
}
