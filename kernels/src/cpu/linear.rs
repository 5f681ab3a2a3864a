//! The kernels as candle-tensor layers: [`QuantLinear`] for GGUF block formats, [`DenseLinear`]
//! for f32/f16/bf16 weights.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

use super::kquant::{self, KFormat, KRows, QK_K};
use super::ktiled::KTiled;
use super::tiled::{Tiled, TILE};
use super::{dense_matmul, matmul, Format, Isa, Q8Rows, BLOCK};

/// `x (..., k)` as f32 row-major values, and the number of rows.
fn input_rows(x: &Tensor, k: usize, what: &str) -> candle_core::Result<(Vec<usize>, Tensor, usize)> {
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        candle_core::bail!("{what}: input {dims:?} does not end in k = {k}");
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let m = x.elem_count() / k;
    Ok((dims, x, m))
}

/// Runs `f` on the f32 values of a contiguous CPU tensor.
fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!("input is not f32 on the CPU");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("input is not contiguous");
    };
    Ok(f(&data[start..end]))
}

fn output(mut dims: Vec<usize>, n: usize, y: Vec<f32>) -> candle_core::Result<Tensor> {
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(y, dims, &Device::Cpu)
}

/// A linear layer whose weight is a CPU `QTensor` in one of the [`Format`]s or
/// [`KFormat`]s, multiplied by Ember's kernels. On a CPU with AVX-512 VNNI the weight is
/// repacked once into the tiled layout ([`super::tiled`], [`super::ktiled`]: the file's bytes,
/// within 3%) when nothing else holds the tensor; otherwise (a head tied to the embedding
/// table, or another CPU) the kernels read the `QTensor`'s own blocks, so no bytes are ever
/// held twice. K-quants are taken only where they can be tiled (or the portable path is
/// forced): in place, candle's AVX2 K-quant kernels are as good as a block-by-block one.
#[derive(Clone)]
pub struct QuantLinear {
    weight: Weight,
    kind: Kind,
    n: usize,
    k: usize,
    isa: Isa,
}

/// The weight format a [`QuantLinear`] multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 32-weight blocks.
    Block(Format),
    /// 256-weight super-blocks.
    Super(KFormat),
}

impl Kind {
    fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        Format::of(dtype).map(Kind::Block).or_else(|| KFormat::of(dtype).map(Kind::Super))
    }

    /// Weights per block: `k` must be a multiple.
    fn block(self) -> usize {
        match self {
            Kind::Block(_) => BLOCK,
            Kind::Super(_) => QK_K,
        }
    }
}

#[derive(Clone)]
enum Weight {
    Blocks(Arc<QTensor>),
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Tiled(Arc<Tiled>),
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    KTiled(Arc<KTiled>),
}

impl std::fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layout = match self.weight {
            Weight::Blocks(_) => "blocks",
            Weight::Tiled(_) | Weight::KTiled(_) => "tiled",
        };
        write!(f, "QuantLinear({:?} {layout}, {}x{}, {:?})", self.kind, self.n, self.k, self.isa)
    }
}

/// Whether the tiled kernels run on this CPU on `isa` (AVX-512 VNNI, not the portable path).
fn runs_tiles(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa != Isa::Scalar && super::tiled::avx512::available();
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// `n` rows of `k` weights of `kind`, as GGUF blocks, repacked into the tiled layout.
#[cfg(target_arch = "x86_64")]
fn tile(kind: Kind, blocks: &[u8], n: usize, k: usize) -> Weight {
    match kind {
        Kind::Block(f) => Weight::Tiled(Arc::new(Tiled::new(f, blocks, n, k))),
        Kind::Super(f) => Weight::KTiled(Arc::new(KTiled::new(f, blocks, n, k))),
    }
}

impl QuantLinear {
    /// Gives the tensor back when the kernels do not take it (not on the CPU, another
    /// format, not 2-D, rows not whole blocks): the caller keeps candle's matmul for it.
    pub fn new(weight: Arc<QTensor>) -> Result<Self, Arc<QTensor>> {
        let isa = Isa::detect();
        // Without SIMD kernels (aarch64, old x86) candle's own (NEON) kernels are the better
        // choice; the portable path runs when asked for (`EMBER_CPU_ISA=scalar`) and in tests.
        let forced = std::env::var("EMBER_CPU_ISA").is_ok_and(|v| v == "scalar");
        if !Self::takes(&weight, isa) || (isa == Isa::Scalar && !forced) {
            return Err(weight);
        }
        let tiles = runs_tiles(isa) && Arc::strong_count(&weight) == 1;
        if matches!(Kind::of(weight.dtype()), Some(Kind::Super(_))) && !tiles && !forced {
            return Err(weight);
        }
        let Some(mut out) = Self::with_isa(weight.clone(), isa) else { return Err(weight) };
        drop(weight);
        #[cfg(target_arch = "x86_64")]
        if tiles {
            // `tiles` checked that no one else holds the tensor: a second copy would double its
            // memory.
            if let Weight::Blocks(q) = &out.weight {
                if let Ok(bytes) = q.data() {
                    let tiled = tile(out.kind, &bytes, out.n, out.k);
                    drop(bytes);
                    out.weight = tiled;
                }
            }
        }
        Ok(out)
    }

    /// The layer [`QuantLinear::new`] would make by tiling, built straight from the weight's
    /// blocks as a GGUF file holds them (`n` rows of `k` weights): the tiles are the only copy,
    /// where going through a `QTensor` writes the bytes twice more first. None where `new`
    /// would not tile (another CPU, another format, `EMBER_CPU_ISA=scalar`, or `blocks` not
    /// `n * k` weights' worth): the caller then builds the `QTensor`.
    pub fn tiled_from_blocks(
        dtype: candle_core::quantized::GgmlDType,
        blocks: &[u8],
        n: usize,
        k: usize,
    ) -> Option<Self> {
        let kind = Kind::of(dtype)?;
        let isa = Isa::detect();
        if !runs_tiles(isa) || n == 0 || k == 0 || !k.is_multiple_of(kind.block()) {
            return None;
        }
        let size = n.checked_mul(k)? / dtype.block_size() * dtype.type_size();
        if blocks.len() != size {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        return Some(Self { weight: tile(kind, blocks, n, k), kind, n, k, isa });
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// The bytes [`QuantLinear::tile_in_place`] rewrites for `n` rows of `k` weights of `dtype`, when
    /// this CPU runs tiles and they take exactly the bytes of the GGUF blocks (the 32-weight
    /// formats with `n` a multiple of 16): the tiles can then replace the blocks where they
    /// lie. None otherwise (K-quants, whose tiles are laid out differently, included).
    pub fn tiles_in_place_len(dtype: candle_core::quantized::GgmlDType, n: usize, k: usize) -> Option<usize> {
        Self::in_place(dtype, n, k).map(|(_, len)| len)
    }

    /// The format and byte length of [`QuantLinear::tiles_in_place_len`].
    fn in_place(dtype: candle_core::quantized::GgmlDType, n: usize, k: usize) -> Option<(Format, usize)> {
        let Some(Kind::Block(f)) = Kind::of(dtype) else { return None };
        if !runs_tiles(Isa::detect()) || n == 0 || k == 0 || !k.is_multiple_of(BLOCK) {
            return None;
        }
        let blocks = n.checked_mul(k)? / dtype.block_size() * dtype.type_size();
        (Tiled::len(f, n, k) == blocks).then_some((f, blocks))
    }

    /// Rewrites `bytes`, the GGUF blocks of `n` rows of `k` weights of `dtype`, into the tiles
    /// [`QuantLinear::tiled_from_blocks`] would make ([`QuantLinear::tiles_in_place_len`]
    /// bytes), for [`QuantLinear::from_tiles`] to read where they are. The tile of rows
    /// `16t..16t + 16` takes exactly those rows' block bytes, so the rewrite goes one tile at a
    /// time through a scratch of one tile (a few KB, in cache): no memory beyond it is touched,
    /// where a scratch of the whole tensor would be fresh memory for a new process (and one
    /// more pass over the tensor). None (and `bytes` untouched) where that length is None or
    /// differs.
    pub fn tile_in_place(dtype: candle_core::quantized::GgmlDType, bytes: &mut [u8], n: usize, k: usize) -> Option<()> {
        let (f, len) = Self::in_place(dtype, n, k)?;
        if bytes.len() != len {
            return None;
        }
        let group = Tiled::len(f, TILE, k);
        let mut scratch = vec![0u8; group];
        for rows in bytes.chunks_exact_mut(group) {
            scratch.fill(0);
            Tiled::fill(f, rows, TILE, k, &mut scratch);
            rows.copy_from_slice(&scratch);
        }
        Some(())
    }

    /// The tiles of a layer that has them (see [`QuantLinear::is_tiled`]), to keep for a later
    /// start ([`QuantLinear::from_tiles`]).
    pub fn tiles(&self) -> Option<&[u8]> {
        match &self.weight {
            Weight::Blocks(_) => None,
            Weight::Tiled(t) => Some(t.bytes()),
            Weight::KTiled(t) => Some(t.bytes()),
        }
    }

    /// A layer over tiles kept from an earlier start ([`QuantLinear::tiles`], same
    /// [`super::TILED_LAYOUT_VERSION`]), read where they are mapped. None where this CPU does
    /// not run tiles, or the bytes are not the size the weight tiles to.
    pub fn from_tiles(
        dtype: candle_core::quantized::GgmlDType,
        tiles: SharedBytes,
        n: usize,
        k: usize,
    ) -> Option<Self> {
        let kind = Kind::of(dtype)?;
        let isa = Isa::detect();
        if !runs_tiles(isa) {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let weight = match kind {
                Kind::Block(f) => Weight::Tiled(Arc::new(Tiled::from_shared(f, tiles, n, k)?)),
                Kind::Super(f) => Weight::KTiled(Arc::new(KTiled::from_shared(f, tiles, n, k)?)),
            };
            Some(Self { weight, kind, n, k, isa })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (kind, tiles, n, k);
            None
        }
    }

    /// Whether the kernels on `isa` take this tensor.
    pub fn takes(weight: &QTensor, isa: Isa) -> bool {
        let Ok((_, k)) = weight.shape().dims2() else { return false };
        let Some(kind) = Kind::of(weight.dtype()) else { return false };
        weight.device().is_cpu() && k > 0 && k.is_multiple_of(kind.block()) && Isa::available().contains(&isa)
    }

    /// A layer on a chosen code path (it must be in [`Isa::available`]), reading the
    /// `QTensor`'s blocks in place (K-quants: with the portable kernel).
    pub fn with_isa(weight: Arc<QTensor>, isa: Isa) -> Option<Self> {
        if !Self::takes(&weight, isa) {
            return None;
        }
        let kind = Kind::of(weight.dtype())?;
        let (n, k) = weight.shape().dims2().ok()?;
        Some(Self { weight: Weight::Blocks(weight), kind, n, k, isa })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The [`Kind`] a layer of GGUF format `dtype` has (None for formats the kernels do not
    /// take).
    pub fn tiled_kind(dtype: candle_core::quantized::GgmlDType) -> Option<Kind> {
        Kind::of(dtype)
    }

    /// The weight's `(n, k)`: output rows and input width.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Whether the weight was repacked into tiles.
    pub fn is_tiled(&self) -> bool {
        !matches!(self.weight, Weight::Blocks(_))
    }

    /// Bytes the weight holds in memory, in whichever layout.
    pub fn size_in_bytes(&self) -> usize {
        match &self.weight {
            Weight::Blocks(q) => q.storage_size_in_bytes(),
            Weight::Tiled(t) => t.size_in_bytes(),
            Weight::KTiled(t) => t.size_in_bytes(),
        }
    }

    /// Rows `ids` of the weight, dequantized to f32: `(ids..., k)`. For a weight that is also
    /// the token embedding table (a tied head), so the table is held once.
    pub fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let row: &dyn Fn(usize, &mut [f32]) = match &self.weight {
            Weight::Blocks(q) => return q.embedding(ids),
            Weight::Tiled(t) => &|j, out| t.dequantize_row(j, out),
            Weight::KTiled(t) => &|j, out| t.dequantize_row(j, out),
        };
        let mut dims = ids.dims().to_vec();
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        let mut out = vec![0f32; ids.len() * self.k];
        for (&id, out) in ids.iter().zip(out.chunks_exact_mut(self.k)) {
            if id as usize >= self.n {
                candle_core::bail!("embedding: id {id} is out of range (0..{})", self.n);
            }
            row(id as usize, out);
        }
        dims.push(self.k);
        Tensor::from_vec(out, dims, &Device::Cpu)
    }

    /// `x (..., k)` -> `(..., n)`, f32 (activations in another float dtype are converted).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut ys = Self::forward_shared(&[self], x)?;
        ys.pop().ok_or_else(|| candle_core::Error::Msg("QuantLinear: no output".into()))
    }

    /// Several layers of the same input width on one input (a layer's q, k and v, or the
    /// MLP's gate and up): [`QuantLinear::forward`] of each, with the input converted once
    /// and quantized once per activation format the layers read, where each layer alone
    /// quantized it again (a 17-token SmolLM2 prefill quantizes its activations 211 times,
    /// about 4% of its time on one thread).
    pub fn forward_shared(layers: &[&QuantLinear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let Some(first) = layers.first() else {
            return Ok(Vec::new());
        };
        let dims = x.dims().to_vec();
        let (_, x, m) = input_rows(x, first.k, "QuantLinear")?;
        let ys = with_f32(&x, |x| Self::forward_slice(layers, x, m))??;
        layers.iter().zip(ys).map(|(l, y)| output(dims.clone(), l.n, y)).collect()
    }

    /// [`QuantLinear::forward_shared`] on `m` rows of plain values (`x`: `m x k`, row-major),
    /// answering each layer's `m x n` values.
    pub fn forward_slice(layers: &[&QuantLinear], x: &[f32], m: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        let Some(first) = layers.first() else {
            return Ok(Vec::new());
        };
        let k = first.k;
        if layers.iter().any(|l| l.k != k) || x.len() != m * k {
            candle_core::bail!("QuantLinear: {} values are not {m} rows of every layer's input width {k}", x.len());
        }
        {
            let mut q8: Option<Q8Rows> = None;
            let mut krows: Option<KRows> = None;
            let mut ys = Vec::with_capacity(layers.len());
            for layer in layers {
                let n = layer.n;
                let mut y = vec![0f32; m * n];
                match (&layer.weight, layer.kind) {
                    (Weight::Blocks(q), Kind::Block(f)) => matmul(layer.isa, f, &q.data()?, n, x, m, &mut y),
                    (Weight::Blocks(q), Kind::Super(f)) => {
                        let acts = krows.get_or_insert_with(|| KRows::quantize(x, m, k));
                        kquant::matmul_portable(f, &q.data()?, n, acts, &mut y)
                    }
                    #[cfg(target_arch = "x86_64")]
                    (Weight::Tiled(t), _) => {
                        super::tiled::matmul_q8(t, q8.get_or_insert_with(|| Q8Rows::quantize(x, m, k)), &mut y)
                    }
                    #[cfg(target_arch = "x86_64")]
                    (Weight::KTiled(t), _) => {
                        super::ktiled::matmul(t, krows.get_or_insert_with(|| KRows::quantize(x, m, k)), &mut y)
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    (Weight::Tiled(_) | Weight::KTiled(_), _) => {
                        candle_core::bail!("tiled weights on a target without the tiled kernel")
                    }
                }
                ys.push(y);
            }
            Ok(ys)
        }
    }
}

/// Bytes owned by something else (a memory-mapped file, the download's landing area) and
/// kept alive by whoever holds this: a weight read where its bytes landed, never copied.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: std::ops::Range<usize>,
}

impl SharedBytes {
    /// Bytes `range` of `owner`; None when the range is not inside it.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: std::ops::Range<usize>) -> Option<Self> {
        (range.start <= range.end && range.end <= (*owner).as_ref().len()).then_some(Self { owner, range })
    }

    pub fn bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({:?})", self.range)
    }
}

/// Where a [`DenseLinear`] weight lives.
#[derive(Debug, Clone)]
enum Dense {
    Tensor(Tensor),
    /// Row-major `(n, k)` values of the layer's dtype, checked aligned for it.
    Bytes(SharedBytes),
}

/// A linear layer with a dense CPU weight `(n, k)` in f32, f16 or bf16, multiplied in place by
/// Ember's FMA kernel (x86-64 with AVX2, FMA and F16C only: elsewhere [`DenseLinear::new`]
/// declines and candle keeps the layer). Holds the weight tensor itself, or the bytes it was
/// loaded from ([`DenseLinear::from_bytes`]): no copy either way.
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight: Dense,
    dtype: DType,
    n: usize,
    k: usize,
    simd: bool,
}

/// `bytes` as values of `T`; None when misaligned or not a whole number of values.
fn values<T: bytemuck::Pod>(bytes: &[u8]) -> Option<&[T]> {
    bytemuck::try_cast_slice(bytes).ok()
}

impl DenseLinear {
    /// None when the kernel does not take this weight (not 2-D on the CPU in f32/f16/bf16, or
    /// no SIMD kernel on this CPU).
    pub fn new(weight: &Tensor) -> Option<Self> {
        if !Self::available() {
            return None;
        }
        Self::with_simd(weight, true)
    }

    /// Whether [`DenseLinear::new`] takes dense CPU weights on this CPU (its SIMD kernel runs
    /// here, and `EMBER_CPU_ISA=scalar` does not rule it out).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return super::dense::x86::available() && Isa::detect() != Isa::Scalar;
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// [`DenseLinear::new`] with the portable kernel (`simd` false) or the SIMD one (the CPU
    /// must have it), for the tests.
    pub fn with_simd(weight: &Tensor, simd: bool) -> Option<Self> {
        let (n, k) = weight.dims2().ok()?;
        if !weight.device().is_cpu() || !matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return None;
        }
        Some(Self { weight: Dense::Tensor(weight.contiguous().ok()?), dtype: weight.dtype(), n, k, simd })
    }

    /// A layer reading its `(n, k)` weight of `dtype` straight from `bytes` (row-major, as a
    /// safetensors file holds it): a model loaded from a memory map or the download's landing
    /// area holds its weights once, where they landed. None where [`DenseLinear::new`] would
    /// decline, or when the bytes are not `n * k` aligned values of `dtype`.
    pub fn from_bytes(bytes: SharedBytes, dtype: DType, n: usize, k: usize) -> Option<Self> {
        if !Self::available() {
            return None;
        }
        Self::from_bytes_with_simd(bytes, dtype, n, k, true)
    }

    /// [`DenseLinear::from_bytes`] on a chosen kernel, for the tests.
    pub fn from_bytes_with_simd(bytes: SharedBytes, dtype: DType, n: usize, k: usize, simd: bool) -> Option<Self> {
        let len = n.checked_mul(k)?;
        let fits = match dtype {
            DType::F32 => values::<f32>(bytes.bytes()).map(<[f32]>::len),
            DType::F16 => values::<f16>(bytes.bytes()).map(<[f16]>::len),
            DType::BF16 => values::<bf16>(bytes.bytes()).map(<[bf16]>::len),
            _ => None,
        };
        (fits == Some(len)).then_some(Self { weight: Dense::Bytes(bytes), dtype, n, k, simd })
    }

    /// Whether the weight is read from borrowed bytes ([`DenseLinear::from_bytes`]).
    pub fn is_borrowed(&self) -> bool {
        matches!(self.weight, Dense::Bytes(_))
    }

    /// Runs `f` on the weight's values, whichever dtype and home they have.
    fn with_weight<R>(&self, f: impl FnOnce(WeightValues<'_>) -> R) -> candle_core::Result<R> {
        match &self.weight {
            Dense::Tensor(t) => {
                let (storage, layout) = t.storage_and_layout();
                let Some((a, b)) = layout.contiguous_offsets() else {
                    candle_core::bail!("DenseLinear: weight is not contiguous");
                };
                Ok(match &*storage {
                    Storage::Cpu(CpuStorage::F32(w)) => f(WeightValues::F32(&w[a..b])),
                    Storage::Cpu(CpuStorage::F16(w)) => f(WeightValues::F16(&w[a..b])),
                    Storage::Cpu(CpuStorage::BF16(w)) => f(WeightValues::BF16(&w[a..b])),
                    _ => candle_core::bail!("DenseLinear: weight is not f32/f16/bf16 on the CPU"),
                })
            }
            Dense::Bytes(bytes) => {
                let b = bytes.bytes();
                // `from_bytes_with_simd` checked that the bytes cast to `n * k` values.
                let cast = match self.dtype {
                    DType::F32 => values(b).map(WeightValues::F32),
                    DType::F16 => values(b).map(WeightValues::F16),
                    DType::BF16 => values(b).map(WeightValues::BF16),
                    _ => None,
                };
                match cast {
                    Some(w) => Ok(f(w)),
                    None => candle_core::bail!("DenseLinear: weight bytes are not {:?} values", self.dtype),
                }
            }
        }
    }

    /// Rows `ids` of the weight, `(ids..., k)`, in the weight's dtype, as candle's dense
    /// embedding.
    pub fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.k);
        if let Dense::Tensor(t) = &self.weight {
            return t.index_select(&ids.flatten_all()?, 0)?.reshape(dims);
        }
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.n) {
            candle_core::bail!("embedding: id {id} is out of range (0..{})", self.n);
        }
        let k = self.k;
        fn gather<T: candle_core::WithDType>(
            w: &[T],
            ids: &[u32],
            k: usize,
            dims: Vec<usize>,
        ) -> candle_core::Result<Tensor> {
            let rows: Vec<T> = ids.iter().flat_map(|&id| &w[id as usize * k..(id as usize + 1) * k]).copied().collect();
            Tensor::from_vec(rows, dims, &Device::Cpu)
        }
        self.with_weight(|w| match w {
            WeightValues::F32(w) => gather(w, &ids, k, dims),
            WeightValues::F16(w) => gather(w, &ids, k, dims),
            WeightValues::BF16(w) => gather(w, &ids, k, dims),
        })?
    }

    /// `x (..., k)` -> `(..., n)` in `x`'s dtype; the sums are f32 whatever the dtypes.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (dims, x, m) = input_rows(x, self.k, "DenseLinear")?;
        let y = with_f32(&x, |x| self.forward_slice(x, m))??;
        output(dims, self.n, y)?.to_dtype(dtype)
    }

    /// `m` rows of plain values (`x`: `m x k`) -> `m x n`.
    pub fn forward_slice(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        if x.len() != m * self.k {
            candle_core::bail!("DenseLinear: {} values are not {m} rows of {}", x.len(), self.k);
        }
        let mut y = vec![0f32; m * self.n];
        let (n, k, simd) = (self.n, self.k, self.simd);
        self.with_weight(|w| match w {
            WeightValues::F32(w) => dense_matmul::<f32>(simd, w, n, k, x, m, &mut y),
            WeightValues::F16(w) => dense_matmul::<f16>(simd, w, n, k, x, m, &mut y),
            WeightValues::BF16(w) => dense_matmul::<bf16>(simd, w, n, k, x, m, &mut y),
        })?;
        Ok(y)
    }
}

/// A dense weight's values.
enum WeightValues<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}
