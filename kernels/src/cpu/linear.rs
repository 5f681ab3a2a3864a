//! The kernels as candle-tensor layers: [`QuantLinear`] for GGUF block formats, [`DenseLinear`]
//! for f32/f16/bf16 weights.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

use super::kquant::{self, KFormat, KRows, QK_K};
use super::ktiled::KTiled;
use super::tiled::Tiled;
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
        #[cfg(target_arch = "x86_64")]
        let tiles = isa != Isa::Scalar && super::tiled::avx512::available() && Arc::strong_count(&weight) == 1;
        #[cfg(not(target_arch = "x86_64"))]
        let tiles = false;
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
                    let tiled = match out.kind {
                        Kind::Block(f) => Weight::Tiled(Arc::new(Tiled::new(f, &bytes, out.n, out.k))),
                        Kind::Super(f) => Weight::KTiled(Arc::new(KTiled::new(f, &bytes, out.n, out.k))),
                    };
                    drop(bytes);
                    out.weight = tiled;
                }
            }
        }
        Ok(out)
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
        let (dims, x, m) = input_rows(x, self.k, "QuantLinear")?;
        let mut y = vec![0f32; m * self.n];
        let (n, k) = (self.n, self.k);
        match (&self.weight, self.kind) {
            (Weight::Blocks(q), Kind::Block(f)) => {
                let bytes = q.data()?;
                with_f32(&x, |x| matmul(self.isa, f, &bytes, n, x, m, &mut y))?;
            }
            (Weight::Blocks(q), Kind::Super(f)) => {
                let bytes = q.data()?;
                with_f32(&x, |x| kquant::matmul_portable(f, &bytes, n, &KRows::quantize(x, m, k), &mut y))?;
            }
            #[cfg(target_arch = "x86_64")]
            (Weight::Tiled(t), _) => with_f32(&x, |x| super::tiled::matmul_q8(t, &Q8Rows::quantize(x, m, k), &mut y))?,
            #[cfg(target_arch = "x86_64")]
            (Weight::KTiled(t), _) => with_f32(&x, |x| super::ktiled::matmul(t, &KRows::quantize(x, m, k), &mut y))?,
            #[cfg(not(target_arch = "x86_64"))]
            (Weight::Tiled(_) | Weight::KTiled(_), _) => {
                candle_core::bail!("tiled weights on a target without the tiled kernel")
            }
        }
        output(dims, n, y)
    }
}

/// A linear layer with a dense CPU weight `(n, k)` in f32, f16 or bf16, multiplied in place by
/// Ember's FMA kernel (x86-64 with AVX2, FMA and F16C only: elsewhere [`DenseLinear::new`]
/// declines and candle keeps the layer). Holds the weight tensor itself: no copy.
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight: Tensor,
    n: usize,
    k: usize,
    simd: bool,
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
        Some(Self { weight: weight.contiguous().ok()?, n, k, simd })
    }

    /// The weight tensor, as given (no copy was made).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Rows `ids` of the weight, `(ids..., k)`, as candle's dense embedding.
    pub fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.k);
        self.weight.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
    }

    /// `x (..., k)` -> `(..., n)` in `x`'s dtype; the sums are f32 whatever the dtypes.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (dims, x, m) = input_rows(x, self.k, "DenseLinear")?;
        let mut y = vec![0f32; m * self.n];
        let (n, k, simd) = (self.n, self.k, self.simd);
        with_f32(&x, |x| -> candle_core::Result<()> {
            let (storage, layout) = self.weight.storage_and_layout();
            let Some((a, b)) = layout.contiguous_offsets() else {
                candle_core::bail!("DenseLinear: weight is not contiguous");
            };
            match &*storage {
                Storage::Cpu(CpuStorage::F32(w)) => dense_matmul::<f32>(simd, &w[a..b], n, k, x, m, &mut y),
                Storage::Cpu(CpuStorage::F16(w)) => dense_matmul::<f16>(simd, &w[a..b], n, k, x, m, &mut y),
                Storage::Cpu(CpuStorage::BF16(w)) => dense_matmul::<bf16>(simd, &w[a..b], n, k, x, m, &mut y),
                _ => candle_core::bail!("DenseLinear: weight is not f32/f16/bf16 on the CPU"),
            }
            Ok(())
        })??;
        output(dims, n, y)?.to_dtype(dtype)
    }
}
