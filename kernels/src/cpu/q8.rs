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
    /// Quantizes `x` (`rows * k` values, row-major; `k` a multiple of 32). With AVX-512 where
    /// the CPU has it (a prefill quantizes its activations for every matmul, and the plain loop
    /// took about 1.6 ns a value, 4 ms of a 17-token prefill of SmolLM2), the same operations
    /// on 16 lanes, so the same integers and scales bit for bit (tested).
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: the CPU has the features (just checked).
            return unsafe { avx512::quantize(x, rows, k) };
        }
        Self::quantize_portable(x, rows, k)
    }

    /// [`Q8Rows::quantize`] in plain Rust, whatever the CPU (the reference of the AVX-512 one).
    pub fn quantize_portable(x: &[f32], rows: usize, k: usize) -> Self {
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    use super::{Q8Rows, BLOCK};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// # Safety
    /// The CPU has AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize(x: &[f32], rows: usize, k: usize) -> Q8Rows {
        assert!(k.is_multiple_of(BLOCK) && x.len() == rows * k, "quantize sizes");
        let nb = rows * k / BLOCK;
        let mut out = Q8Rows { k, rows, qs: vec![0; rows * k], d: vec![0.0; nb], s: vec![0.0; nb] };
        for (b, (xb, qb)) in x.chunks_exact(BLOCK).zip(out.qs.chunks_exact_mut(BLOCK)).enumerate() {
            // SAFETY: xb has 32 values and qb 32 codes (exact chunks); the features are enabled.
            unsafe {
                let v = [_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))];
                let abs = |v: __m512| _mm512_andnot_ps(_mm512_set1_ps(-0.0), v);
                // MAXPS returns its second operand when either is NaN: NaN lanes are skipped,
                // as `f32::max` skips them in the portable fold.
                let amax =
                    _mm512_reduce_max_ps(_mm512_max_ps(abs(v[0]), _mm512_max_ps(abs(v[1]), _mm512_setzero_ps())));
                let d = amax / 127.0;
                let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
                const MAGIC: f32 = 12_582_912.0;
                let magic = _mm512_set1_ps(MAGIC);
                let mut sum = _mm512_setzero_si512();
                for (h, v) in v.into_iter().enumerate() {
                    let r = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v, id), magic), magic);
                    // A NaN (a NaN value, or an infinite one times a zero inverse scale)
                    // becomes 0, as `NaN as i8` does.
                    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(r, r);
                    let r = _mm512_max_ps(_mm512_min_ps(r, _mm512_set1_ps(127.0)), _mm512_set1_ps(-127.0));
                    let r = _mm512_maskz_cvtps_epi32(ordered, r);
                    sum = _mm512_add_epi32(sum, r);
                    _mm_storeu_si128(qb.as_mut_ptr().add(16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(r));
                }
                out.d[b] = d;
                out.s[b] = d * _mm512_reduce_add_epi32(sum) as f32;
            }
        }
        out
    }
}
