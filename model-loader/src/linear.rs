//! The model's linear layers: Ember's CPU kernels ([`ember_kernels::cpu`]) for the quantized
//! formats they beat candle on, candle's `QMatMul` for everything else (dense weights, other
//! quantized formats, any GPU). The weight is the same `QTensor` either way: nothing is
//! copied or dequantized.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};
use ember_kernels::cpu::{DenseLinear, QuantLinear};

use crate::error::Result;

/// One linear layer's weight `(out, in)`, and the code that multiplies by it.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Ember's CPU kernel: Q4_0, Q4_1, Q5_0 and Q8_0 on the CPU (any target); Q4_K, Q5_K and
    /// Q6_K where the AVX-512 VNNI tiles take them.
    Ember(QuantLinear),
    /// Ember's CPU kernel for dense f16/bf16 weights (x86-64 with AVX2).
    EmberDense(DenseLinear),
    /// Candle's matmul.
    Candle(QMatMul),
}

/// 0: not set (read `EMBER_CPU_KERNELS`), 1: on, 2: off.
static KERNELS: AtomicU8 = AtomicU8::new(0);

/// Whether models loaded from now on use Ember's CPU kernels where they can (the default;
/// `EMBER_CPU_KERNELS=0` turns them off). Off keeps every layer on candle: to compare the two,
/// or to rule the kernels out.
pub fn set_cpu_kernels(on: bool) {
    KERNELS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether f16/bf16 weights on the CPU go through Ember's dense kernel, which takes f32
/// activations (and sums in f32) whatever the weights' dtype.
pub fn dense_kernels_on() -> bool {
    kernels_enabled() && DenseLinear::available()
}

pub(crate) fn kernels_enabled() -> bool {
    match KERNELS.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => std::env::var("EMBER_CPU_KERNELS").map_or(true, |v| v != "0"),
    }
}

/// `x (b, t, k)` times a dense `weight (out, k)`, as `W · xᵀ`: the weight is the left operand,
/// read in place, where candle's `x · Wᵀ` has the CPU gemm pack (copy) the whole weight matrix
/// on every call once `x` has more than one row, which doubles the memory traffic of a
/// batched decode step.
fn gemm(weight: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (b, t, k) = x.dims3()?;
    let out = weight.dim(0)?;
    let y = weight.matmul(&x.reshape((b * t, k))?.t()?)?;
    Ok(y.t()?.reshape((b, t, out))?)
}

impl Linear {
    /// Picks the kernel for `weight`: Ember's where it takes the format (measured faster than
    /// candle's on every row count, see BENCHMARKS.md), candle's otherwise.
    pub fn new(weight: QMatMul) -> Self {
        if !kernels_enabled() {
            return Linear::Candle(weight);
        }
        match weight {
            // Moved in, not cloned: a tensor held by the layer alone can be repacked in place.
            QMatMul::QTensor(q) => match QuantLinear::new(q) {
                Ok(ours) => Linear::Ember(ours),
                Err(q) => Linear::Candle(QMatMul::QTensor(q)),
            },
            // f32, f16 and bf16 to the kernel at every row count: its blocked AVX-512 path
            // beats candle's f32 gemm at 17, 64 and 200 rows on one thread (91-98 ms against
            // 132-135 ms for a 17-token SmolLM2 prefill; `forward_speed` example), and candle
            // has no native half-precision arithmetic on the CPU.
            QMatMul::Tensor(t) => match DenseLinear::new(&t) {
                Some(ours) => Linear::EmberDense(ours),
                None => Linear::Candle(QMatMul::Tensor(t)),
            },
            other => Linear::Candle(other),
        }
    }

    /// Which kernel runs this layer, for logs and benchmarks.
    pub fn path(&self) -> &'static str {
        match self {
            Linear::Ember(_) => "ember-cpu",
            Linear::EmberDense(w) if w.is_borrowed() => "ember-cpu-dense-in-place",
            Linear::EmberDense(_) => "ember-cpu-dense",
            Linear::Candle(QMatMul::QTensor(_)) => "candle-quantized",
            Linear::Candle(_) => "candle-dense",
        }
    }

    /// Rows `ids` of the weight as embeddings `(ids..., in)`: the token table, which a tied
    /// head shares with the output layer (held once, in whichever layout the kernel uses).
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Ember(w) => w.embedding(ids)?,
            Linear::EmberDense(w) => w.embedding(ids)?,
            Linear::Candle(w) => w.embedding(ids)?,
        })
    }

    /// The layers as Ember's quantized layers, when every one of them is: those share one
    /// quantization of their input.
    fn all_quant<'a>(layers: &[&'a Linear]) -> Option<Vec<&'a QuantLinear>> {
        layers
            .iter()
            .map(|l| match l {
                Linear::Ember(w) => Some(w),
                _ => None,
            })
            .collect()
    }

    /// Several layers on one input `x (b, t, in)`: each layer's `(b, t, out)`. Layers all on
    /// Ember's quantized kernels share one quantization of `x`
    /// ([`QuantLinear::forward_shared`]); otherwise each runs alone.
    pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        if let Some(quant) = Self::all_quant(layers) {
            return Ok(QuantLinear::forward_shared(&quant, x)?);
        }
        layers.iter().map(|l| l.forward(x)).collect()
    }

    /// Several layers on `m` rows of plain f32 values (`x`: `m x in`), each answering
    /// `m x out`: the CPU forward pass, which keeps its activations as plain rows. Layers all
    /// on Ember's quantized kernels share one quantization of `x`.
    pub fn forward_slice(layers: &[&Linear], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        if let Some(quant) = Self::all_quant(layers) {
            return Ok(QuantLinear::forward_slice(&quant, x, m)?);
        }
        layers
            .iter()
            .map(|l| match l {
                Linear::Ember(w) => Ok(QuantLinear::forward_slice(&[w], x, m)?.pop().unwrap_or_default()),
                Linear::EmberDense(w) => Ok(w.forward_slice(x, m)?),
                Linear::Candle(_) => {
                    let k = x.len().checked_div(m).unwrap_or(0);
                    let t = Tensor::from_slice(x, (1, m, k), &candle_core::Device::Cpu)?;
                    Ok(l.forward(&t)?.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
                }
            })
            .collect()
    }

    /// `x (b, t, in)` -> `(b, t, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Ember(w) => Ok(w.forward(x)?),
            Linear::EmberDense(w) => Ok(w.forward(x)?),
            Linear::Candle(QMatMul::Tensor(weight)) => gemm(weight, x),
            Linear::Candle(w) => Ok(w.forward(x)?),
        }
    }
}
