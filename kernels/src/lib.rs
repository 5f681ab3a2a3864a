//! Ember's custom kernels. Each has a CPU reference implementation here, in plain Rust, that
//! defines what the CUDA version (behind the `cuda` feature) must compute; the tests run the
//! reference against a plain candle implementation of the same math. [`cpu`] holds the CPU
//! matmul kernels for GGUF block formats and half-precision weights (SIMD with runtime
//! detection, and a portable path), which the model uses where they beat candle.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod norm;
pub mod sampling;

pub use norm::{add_rms_norm, add_rms_norm_tensors, NormError};
pub use sampling::{sample_batch, sample_batch_by_keys, RowParams, RowResult, SampleError};
