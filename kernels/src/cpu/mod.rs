//! CPU matmul kernels for GGUF block-quantized weights: `y = x · Wᵀ` with `W` kept as the
//! file's blocks (no dequantized copy, nothing repacked: resident weight memory is the file's).
//!
//! The llama.cpp approach: the activation rows are quantized once per matmul to 8-bit blocks
//! ([`Q8Rows`]), and each weight block meets them in integer dot products (AVX2 `maddubs`, or
//! VNNI `vpdpbusd` where the CPU has it), scaled by the two block scales. One weight row is
//! decoded once for up to four activation rows, so a prefill decodes each weight block
//! `rows / 4` times, not `rows` times. Work is split by output rows (weight rows) over candle's
//! own thread pool, so `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS` mean the same here as for
//! candle's ops.
//!
//! ```no_run
//! # fn main() -> candle_core::Result<()> {
//! use std::sync::Arc;
//! use candle_core::quantized::{GgmlDType, QTensor};
//! use candle_core::{Device, Tensor};
//! use ember_kernels::cpu::QuantLinear;
//!
//! let w = Tensor::randn(0f32, 1.0, (64, 128), &Device::Cpu)?;
//! let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1)?);
//! let Ok(linear) = QuantLinear::new(q) else { panic!("a CPU Q4_1 tensor, k a multiple of 32") };
//! let y = linear.forward(&Tensor::randn(0f32, 1.0, (1, 3, 128), &Device::Cpu)?)?; // (1, 3, 64)
//! # Ok(()) }
//! ```

pub mod act;
#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod dense;
pub mod format;
pub mod kquant;
pub mod ktiled;
mod linear;
pub mod q8;
pub mod rows;
pub mod scalar;
pub mod tiled;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use std::sync::OnceLock;

pub use format::{Format, BLOCK};
pub use kquant::{KFormat, KRows, QK_K};
pub use linear::{DenseLinear, Kind, QuantLinear, SharedBytes};
pub use q8::Q8Rows;

/// Version of the tiled layouts ([`tiled`], [`ktiled`]): tiles stored on disk by an earlier
/// build are read only if they carry this number. Bump it with any change to either layout.
pub const TILED_LAYOUT_VERSION: u32 = 1;

/// The bytes of a tiled weight: made at load, or read where they are mapped (tiles kept on
/// disk from an earlier start).
#[derive(Debug, Clone)]
pub(crate) enum TileBytes {
    Owned(Vec<u8>),
    Shared(SharedBytes),
}

impl std::ops::Deref for TileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Shared(s) => s.bytes(),
        }
    }
}

/// Which code path runs the dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust ([`scalar`]); every target.
    Scalar,
    #[cfg(target_arch = "x86_64")]
    X86(x86::Level),
}

impl Isa {
    /// The best path this CPU has (detected once). `EMBER_CPU_ISA=scalar` forces the portable
    /// one, to compare or to rule the SIMD code out.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var("EMBER_CPU_ISA").is_ok_and(|v| v == "scalar") {
                return Isa::Scalar;
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(level) = x86::Level::detect() {
                return Isa::X86(level);
            }
            Isa::Scalar
        })
    }

    /// Every path this CPU can run, the portable one first (for the tests).
    pub fn available() -> Vec<Isa> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut out = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        for level in [x86::Level::Avx2, x86::Level::Avx512Vnni, x86::Level::AvxVnni] {
            if x86::has(level) {
                out.push(Isa::X86(level));
            }
        }
        out
    }
}

/// Activation rows decoded together against one weight row.
const ROW_TILE: usize = 4;

/// `y (m, n) = x (m, k) · Wᵀ` where `w` holds `n` rows of `k / 32` blocks of `format` and
/// `x` holds `m` rows. Panics if the lengths do not fit those sizes (callers check them:
/// [`QuantLinear`]).
pub fn matmul(isa: Isa, format: Format, w: &[u8], n: usize, x: &[f32], m: usize, y: &mut [f32]) {
    let Some(k) = x.len().checked_div(m) else { return };
    let acts = Q8Rows::quantize(x, m, k);
    matmul_q8(isa, format, w, n, &acts, y)
}

/// [`matmul`] with the activations already quantized.
pub fn matmul_q8(isa: Isa, format: Format, w: &[u8], n: usize, acts: &Q8Rows, y: &mut [f32]) {
    let (m, k) = (acts.rows, acts.k);
    let row_bytes = k / BLOCK * format.block_bytes();
    assert!(k.is_multiple_of(BLOCK) && w.len() == n * row_bytes && y.len() == m * n, "matmul sizes");
    if let Isa::X86(level) = isa {
        assert!(x86::has(level), "{level:?} kernels on a CPU without them");
    }
    let out = SharedOut(y.as_mut_ptr());
    let rows = |range: std::ops::Range<usize>| {
        let mut dots = [0f32; ROW_TILE];
        for j in range {
            let wr = &w[j * row_bytes..(j + 1) * row_bytes];
            for r0 in (0..m).step_by(ROW_TILE) {
                let t = ROW_TILE.min(m - r0);
                match isa {
                    Isa::Scalar => scalar::row_dots(format, wr, acts, r0..r0 + t, &mut dots),
                    // SAFETY: the level's features were checked against this CPU above.
                    #[cfg(target_arch = "x86_64")]
                    Isa::X86(level) => unsafe { x86::row_dots(level, format, wr, acts, r0, t, &mut dots) },
                }
                for (r, d) in dots[..t].iter().enumerate() {
                    // SAFETY: (r0 + r) < m and j < n, so the index is inside y; each j (output
                    // column) belongs to exactly one range, so no two threads write one element.
                    unsafe { *out.at((r0 + r) * n + j) = *d };
                }
            }
        }
    };
    by_output_rows(n, n * m * k, rows);
}

/// `y (m, n) = x (m, k) · Wᵀ` for a dense weight `w` (`n * k` values of f32, f16 or bf16),
/// with the SIMD kernel when `simd` (the CPU must have [`dense::x86::available`]) or the
/// portable one.
pub fn dense_matmul<T: DenseElement>(simd: bool, w: &[T], n: usize, k: usize, x: &[f32], m: usize, y: &mut [f32]) {
    assert!(w.len() == n * k && x.len() == m * k && y.len() == m * n, "matmul sizes");
    #[cfg(target_arch = "x86_64")]
    assert!(!simd || dense::x86::available(), "SIMD kernels on a CPU without them");
    #[cfg(not(target_arch = "x86_64"))]
    assert!(!simd, "no SIMD dense kernels on this target");
    #[cfg(target_arch = "x86_64")]
    if simd && m >= DENSE_BLOCK_MIN_ROWS && dense::x86::avx512::available() {
        return dense_matmul_blocked(w, n, k, x, m, y);
    }
    let out = SharedOut(y.as_mut_ptr());
    let rows = |range: std::ops::Range<usize>| {
        let mut dots = [0f32; dense::ROW_TILE];
        for j in range {
            let wr = &w[j * k..(j + 1) * k];
            for r0 in (0..m).step_by(dense::ROW_TILE) {
                let t = dense::ROW_TILE.min(m - r0);
                if simd {
                    // SAFETY: the features were checked against this CPU above.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        dense::x86::row_dots(wr, x, r0, t, &mut dots)
                    };
                } else {
                    dense::row_dots_scalar(wr, x, r0, t, &mut dots);
                }
                for (r, d) in dots[..t].iter().enumerate() {
                    // SAFETY: as in `matmul_q8`: in bounds, and column j is this thread's alone.
                    unsafe { *out.at((r0 + r) * n + j) = *d };
                }
            }
        }
    };
    by_output_rows(n, n * m * k, rows);
}

/// From this many activation rows on, dense weights go through the blocked AVX-512 kernel
/// ([`dense::x86::avx512`]): each weight vector then serves four rows. Below it the row
/// kernel, which a decode step's weight streaming bounds anyway.
pub const DENSE_BLOCK_MIN_ROWS: usize = 4;

/// [`dense_matmul`] on the blocked AVX-512 kernel (the CPU must have it), split over the
/// thread pool by blocks of 4 weight rows.
#[cfg(target_arch = "x86_64")]
fn dense_matmul_blocked<T: DenseElement>(w: &[T], n: usize, k: usize, x: &[f32], m: usize, y: &mut [f32]) {
    use dense::x86::avx512::{block_dots, MR, NR};
    let out = SharedOut(y.as_mut_ptr());
    let blocks = |range: std::ops::Range<usize>| {
        let mut d = [[0f32; NR]; MR];
        for b in range {
            let j0 = b * NR;
            for r0 in (0..m).step_by(MR) {
                let rows = MR.min(m - r0);
                // SAFETY: the caller checked the CPU's features; w is n * k, x is m * k.
                unsafe { block_dots(w, n, k, j0, x, r0, rows, r0 == 0, &mut d) };
                for (r, d) in d[..rows].iter().enumerate() {
                    for (j, v) in d.iter().enumerate().take(n - j0) {
                        // SAFETY: row r0 + r < m, column j0 + j < n; the block is this
                        // thread's alone.
                        unsafe { *out.at((r0 + r) * n + j0 + j) = *v };
                    }
                }
            }
        }
    };
    by_output_rows(n.div_ceil(NR), n * m * k, blocks);
}

/// Runs `rows` over the output rows (or row tiles) `0..n`, split across candle's thread pool, or on this
/// thread when the product is small (`work` multiply-adds): waking the pool costs a few
/// microseconds per dispatch.
pub(crate) fn by_output_rows(n: usize, work: usize, rows: impl Fn(std::ops::Range<usize>) + Sync) {
    if work < 1 << 16 {
        rows(0..n);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(n, rows);
    }
}

/// A dense weight element the kernels read: f32, f16 or bf16.
#[cfg(target_arch = "x86_64")]
pub trait DenseElement: dense::x86::Load8 + dense::x86::avx512::Load16 {}
#[cfg(target_arch = "x86_64")]
impl<T: dense::x86::Load8 + dense::x86::avx512::Load16> DenseElement for T {}
/// A dense weight element the kernels read: f32, f16 or bf16.
#[cfg(not(target_arch = "x86_64"))]
pub trait DenseElement: dense::Element {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: dense::Element> DenseElement for T {}

/// The output buffer, written by several threads at disjoint indices.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used in `matmul_q8` and `dense_matmul`, where each thread writes its own
// output columns.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}
impl SharedOut {
    /// # Safety
    /// `i` is inside the buffer and no other thread touches element `i`.
    unsafe fn at(self, i: usize) -> *mut f32 {
        // SAFETY: see the function's contract.
        unsafe { self.0.add(i) }
    }

    /// Copies `values` to elements `i..i + values.len()`: one copy of a tile's row of sums,
    /// which the compiler makes vector moves (element by element, writing the sums out had
    /// been about 6% of a 17-token AMX prefill).
    ///
    /// # Safety
    /// The elements are inside the buffer and no other thread touches them.
    unsafe fn write(self, i: usize, values: &[f32]) {
        // SAFETY: see the function's contract; `values` is a separate slice, so the two do
        // not overlap. A whole tile's row (16 values) is copied as a fixed-size array, which
        // compiles to one vector store, where a copy of a run-time length calls `memcpy`
        // (10,000 calls a decode step).
        unsafe {
            if let Ok(row) = <&[f32; 16]>::try_from(values) {
                std::ptr::write_unaligned(self.0.add(i) as *mut [f32; 16], *row);
            } else {
                std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(i), values.len());
            }
        }
    }
}
