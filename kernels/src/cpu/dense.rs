//! `y = x · Wᵀ` for dense f32, f16 and bf16 weights, read in place (no f32 copy of a half
//! precision matrix): each weight row is converted eight values at a time in registers (F16C
//! `vcvtph2ps`, or a 16-bit shift for bf16) and multiplied into up to four activation rows
//! with FMA, accumulating in f32. x86-64 with AVX2+FMA+F16C; elsewhere the caller keeps
//! candle's matmul, and [`row_dots_scalar`] is the portable definition the tests use.

use half::{bf16, f16};

/// A dense weight element type.
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Element for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Activation rows decoded together against one weight row.
pub const ROW_TILE: usize = 4;

/// `out[r] = w · x_r` for the rows `x[r0..r0+n]` (each `w.len()` long), portable.
pub fn row_dots_scalar<T: Element>(w: &[T], x: &[f32], r0: usize, n_rows: usize, out: &mut [f32]) {
    let k = w.len();
    for r in 0..n_rows {
        let xr = &x[(r0 + r) * k..(r0 + r + 1) * k];
        out[r] = w.iter().zip(xr).map(|(&w, &x)| w.to_f32() * x).sum();
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use core::arch::x86_64::*;

    use half::{bf16, f16};

    /// Eight weights at `p` as f32.
    pub trait Load8: super::Element {
        /// # Safety
        /// `p` points at 8 readable elements; AVX2, FMA and F16C are enabled where it inlines.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: see the trait.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Load8 for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: see the trait.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
    }

    impl Load8 for bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            // SAFETY: see the trait. bf16 is the top half of an f32: widen and shift.
            unsafe {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
        }
    }

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    use crate::cpu::x86::hsum;

    #[inline(always)]
    unsafe fn body<T: Load8, const R: usize>(w: &[T], x: &[f32], r0: usize, out: &mut [f32]) {
        let k = w.len();
        assert!(x.len() >= (r0 + R) * k && out.len() >= R);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        // Two independent sums per row hide the FMA latency when there is one row.
        // SAFETY: AVX is enabled where this inlines (the callers below).
        let mut acc = [[unsafe { _mm256_setzero_ps() }; 2]; R];
        let mut i = 0;
        // SAFETY: i + 16 <= k, so 16 weights and 16 values of each row r0..r0+R (asserted to
        // exist above) are readable.
        unsafe {
            while i + 16 <= k {
                let w0 = T::load8(wp.add(i));
                let w1 = T::load8(wp.add(i + 8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xr = xp.add((r0 + r) * k + i);
                    acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[0]);
                    acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), acc[1]);
                }
                i += 16;
            }
        }
        for r in 0..R {
            // SAFETY: AVX is enabled where this inlines; the tail reads stay below k.
            let mut s = unsafe { hsum(_mm256_add_ps(acc[r][0], acc[r][1])) };
            for j in i..k {
                s += w[j].to_f32() * x[(r0 + r) * k + j];
            }
            out[r] = s;
        }
    }

    /// `out[r] = w · x_r` for `x[r0..r0 + n_rows]`, `n_rows` 1 to 4.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C ([`available`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dots<T: Load8>(w: &[T], x: &[f32], r0: usize, n_rows: usize, out: &mut [f32]) {
        // SAFETY: this function enables the features the body needs.
        unsafe {
            match n_rows {
                1 => body::<T, 1>(w, x, r0, out),
                2 => body::<T, 2>(w, x, r0, out),
                3 => body::<T, 3>(w, x, r0, out),
                _ => body::<T, 4>(w, x, r0, out),
            }
        }
    }
}
