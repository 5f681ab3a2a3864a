//! Activations quantized once per matmul to 8-bit blocks of 32 (llama.cpp's q8_0/q8_1), so
//! the weight blocks meet them in integer dot products.

use super::format::BLOCK;

/// `rows` activation rows of `k` values, each block of 32 stored as `x ≈ d * q` with
/// `q` in -127..=127, plus `s = d * Σq` per block (what the formats with an offset need).
#[derive(Debug, Clone)]
pub struct Q8Rows {
    pub k: usize,
    pub rows: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
}

impl Q8Rows {
    /// Quantizes `x` (`rows * k` values, row-major; `k` a multiple of 32). Plain scalar code
    /// whatever the CPU: it is O(k) per row against O(k * n) for the matmul, and one
    /// definition keeps every SIMD path on the same integers.
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        debug_assert!(k.is_multiple_of(BLOCK) && x.len() == rows * k);
        let nb = rows * k / BLOCK;
        let mut out = Q8Rows { k, rows, qs: vec![0; rows * k], d: vec![0.0; nb], s: vec![0.0; nb] };
        for (b, (xb, qb)) in x.chunks_exact(BLOCK).zip(out.qs.chunks_exact_mut(BLOCK)).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                // Round to nearest, ties to even, by adding and removing 1.5 * 2^23 (exact for
                // |v| < 2^22; here |v| <= 127): `round_ties_even` is a libm call on baseline
                // x86-64, and this loop then vectorizes. The clamp only guards -128, which the
                // signed-byte tricks of the dot products must never see.
                const MAGIC: f32 = 12_582_912.0;
                let r = ((v * id + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
                *q = r;
                sum += r as i32;
            }
            out.d[b] = d;
            out.s[b] = d * sum as f32;
        }
        out
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.k / BLOCK
    }
}
