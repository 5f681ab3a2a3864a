//! The kernels as candle-tensor layers: [`QuantLinear`] for GGUF block formats, [`DenseLinear`]
//! for f32/f16/bf16 weights.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

use super::{dense_matmul, matmul, Format, Isa, BLOCK};

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

/// A linear layer whose weight is a CPU `QTensor` in one of the [`Format`]s, multiplied by
/// Ember's kernels. Holds the `QTensor` itself (shared with candle where the model uses it for
/// embeddings too), so no bytes are copied.
#[derive(Clone)]
pub struct QuantLinear {
    weight: Arc<QTensor>,
    format: Format,
    n: usize,
    k: usize,
    isa: Isa,
}

impl std::fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantLinear({:?}, {}x{}, {:?})", self.format, self.n, self.k, self.isa)
    }
}

impl QuantLinear {
    /// None when the kernels do not take this tensor (not on the CPU, another format, not 2-D,
    /// rows not whole blocks): the caller keeps candle's matmul for it.
    pub fn new(weight: Arc<QTensor>) -> Option<Self> {
        Self::with_isa(weight, Isa::detect())
    }

    /// [`QuantLinear::new`] on a chosen code path (it must be in [`Isa::available`]).
    pub fn with_isa(weight: Arc<QTensor>, isa: Isa) -> Option<Self> {
        let format = Format::of(weight.dtype())?;
        let (n, k) = weight.shape().dims2().ok()?;
        if !weight.device().is_cpu() || k == 0 || !k.is_multiple_of(BLOCK) || !Isa::available().contains(&isa) {
            return None;
        }
        Some(Self { weight, format, n, k, isa })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// `x (..., k)` -> `(..., n)`, f32 (activations in another float dtype are converted).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (dims, x, m) = input_rows(x, self.k, "QuantLinear")?;
        let bytes = self.weight.data()?;
        let mut y = vec![0f32; m * self.n];
        with_f32(&x, |x| matmul(self.isa, self.format, &bytes, self.n, self.k, x, m, &mut y))?;
        output(dims, self.n, y)
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
        #[cfg(target_arch = "x86_64")]
        let simd = super::dense::x86::available() && Isa::detect() != Isa::Scalar;
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        if !simd {
            return None;
        }
        Self::with_simd(weight, simd)
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
