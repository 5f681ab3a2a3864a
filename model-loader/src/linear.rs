//! The model's linear layers: Ember's CPU kernels ([`ember_kernels::cpu`]) for the quantized
//! formats they beat candle on, candle's `QMatMul` for everything else (dense weights, other
//! quantized formats, any GPU). The weight is the same `QTensor` either way: nothing is
//! copied or dequantized.

use std::sync::OnceLock;

use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};
use ember_kernels::cpu::QuantLinear;

use crate::error::Result;

/// One linear layer's weight `(out, in)`, and the code that multiplies by it.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Ember's CPU kernel: Q4_0, Q4_1, Q5_0 and Q8_0 on the CPU.
    Ember(QuantLinear),
    /// Candle's matmul.
    Candle(QMatMul),
}

/// `EMBER_CPU_KERNELS=0` keeps every layer on candle (to compare, or to rule the kernels out).
fn kernels_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("EMBER_CPU_KERNELS").map_or(true, |v| v != "0"))
}

impl Linear {
    /// Picks the kernel for `weight`: Ember's where it takes the format (measured faster than
    /// candle's on every row count, see BENCHMARKS.md), candle's otherwise.
    pub fn new(weight: QMatMul) -> Self {
        if let QMatMul::QTensor(q) = &weight {
            if kernels_enabled() {
                if let Some(ours) = QuantLinear::new(q.clone()) {
                    return Linear::Ember(ours);
                }
            }
        }
        Linear::Candle(weight)
    }

    /// Which kernel runs this layer, for logs and benchmarks.
    pub fn path(&self) -> &'static str {
        match self {
            Linear::Ember(_) => "ember-cpu",
            Linear::Candle(QMatMul::QTensor(_)) => "candle-quantized",
            Linear::Candle(_) => "candle-dense",
        }
    }

    /// `x (b, t, in)` -> `(b, t, out)`. Dense weights are multiplied as `W · xᵀ`: the weight
    /// matrix is the left operand, read in place, where candle's `x · Wᵀ` has the CPU gemm
    /// pack (copy) the whole weight matrix on every call once `x` has more than one row, which
    /// doubles the memory traffic of a batched decode step.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Ember(w) => Ok(w.forward(x)?),
            Linear::Candle(QMatMul::Tensor(weight)) => {
                let (b, t, k) = x.dims3()?;
                let out = weight.dim(0)?;
                let y = weight.matmul(&x.reshape((b * t, k))?.t()?)?;
                Ok(y.t()?.reshape((b, t, out))?)
            }
            Linear::Candle(w) => Ok(w.forward(x)?),
        }
    }
}
