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

    /// How far ahead of the weights being read the row kernel asks for them, in bytes.
    const PREFETCH: usize = 8192;

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
                // The weights are one stream through the matrix (its rows are contiguous):
                // ask for them 8 KiB ahead, as the tiled kernels do; past the end the address
                // is never read (a prefetch does not fault).
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH / size_of::<T>()) as *const i8);
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

    /// The prefill kernel: a block of up to 4 activation rows by 4 weight rows, 16 values of
    /// `k` per step in AVX-512 registers, so each loaded (and converted) weight vector meets 4
    /// activation rows and each activation vector 4 weight rows: 16 FMAs per 8 loads, where
    /// [`row_dots`] does 4 per 5. The 16 lanes of each sum add up once at the end.
    pub mod avx512 {
        use core::arch::x86_64::*;

        use half::{bf16, f16};

        /// Weight rows per block.
        pub const NR: usize = 4;
        /// Activation rows per block.
        pub const MR: usize = 4;

        /// Sixteen weights at `p` as f32, the lanes outside `mask` zero.
        pub trait Load16: crate::cpu::dense::Element {
            /// # Safety
            /// The lanes of `mask` are readable at `p`; AVX-512 F/BW/VL and F16C are enabled
            /// where it inlines.
            unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512;
        }

        impl Load16 for f32 {
            // `inline` with the features (not `inline(always)`, which cannot have them): the
            // intrinsics then inline here, and this into the kernel, which has them too.
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
            unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512 {
                // SAFETY: see the trait.
                unsafe { _mm512_maskz_loadu_ps(mask, p) }
            }
        }

        impl Load16 for f16 {
            // `inline` with the features (not `inline(always)`, which cannot have them): the
            // intrinsics then inline here, and this into the kernel, which has them too.
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
            unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512 {
                // SAFETY: see the trait (a masked-off lane reads nothing and converts 0).
                unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)) }
            }
        }

        impl Load16 for bf16 {
            // `inline` with the features (not `inline(always)`, which cannot have them): the
            // intrinsics then inline here, and this into the kernel, which has them too.
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
            unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512 {
                // SAFETY: see the trait. bf16 is the top half of an f32: widen and shift.
                unsafe {
                    let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                }
            }
        }

        pub fn available() -> bool {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
        }

        #[inline(always)]
        unsafe fn body<T: Load16, const R: usize>(
            w: [*const T; NR],
            next: Option<[*const T; NR]>,
            x: *const f32,
            k: usize,
            out: &mut [[f32; NR]; MR],
        ) {
            // SAFETY (caller): each of the NR weight pointers has k readable elements, and x
            // has R rows of k; the features are enabled. A prefetch never faults.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); NR]; R];
                let mut i = 0;
                while i < k {
                    if let Some(next) = next {
                        for p in next {
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i) as *const i8);
                        }
                    }
                    let mask: __mmask16 = if k - i >= 16 { 0xffff } else { (1u16 << (k - i)) - 1 };
                    let mut wv = [_mm512_setzero_ps(); NR];
                    for (v, p) in wv.iter_mut().zip(w) {
                        *v = T::load16(p.add(i), mask);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm512_maskz_loadu_ps(mask, x.add(r * k + i));
                        for (acc, wv) in acc.iter_mut().zip(&wv) {
                            *acc = _mm512_fmadd_ps(*wv, xv, *acc);
                        }
                    }
                    i += 16;
                }
                for (out, acc) in out.iter_mut().zip(&acc) {
                    for (o, acc) in out.iter_mut().zip(acc) {
                        *o = _mm512_reduce_add_ps(*acc);
                    }
                }
            }
        }

        /// `out[r][j]` = weight row `j0 + j` of `w` (`n` rows of `k`) dotted with activation
        /// row `r0 + r` of `x`, for `r < rows` (1 to 4) and `j < 4` (rows past `n` repeat
        /// the last one: their sums are to be dropped). With `prefetch`, the next block's
        /// weight rows are asked for on the way: a prefill streams each weight once from
        /// memory, in rows too short (1-3 KB) for the hardware prefetcher to follow four of
        /// them at once.
        ///
        /// # Safety
        /// The CPU has [`available`]'s features; `w` has `n * k` and `x` `(r0 + rows) * k`
        /// elements; `j0 < n`.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn block_dots<T: Load16>(
            w: &[T],
            n: usize,
            k: usize,
            j0: usize,
            x: &[f32],
            r0: usize,
            rows: usize,
            prefetch: bool,
            out: &mut [[f32; NR]; MR],
        ) {
            assert!(w.len() == n * k && j0 < n && x.len() >= (r0 + rows) * k && (1..=MR).contains(&rows));
            let wp: [*const T; NR] = std::array::from_fn(|j| {
                // SAFETY: min(j0 + j, n - 1) < n rows of k.
                unsafe { w.as_ptr().add((j0 + j).min(n - 1) * k) }
            });
            let next = prefetch.then(|| wp.map(|p| p.wrapping_add(NR * k)));
            // SAFETY: rows r0..r0 + rows of x exist (asserted); the features are enabled.
            unsafe {
                let xp = x.as_ptr().add(r0 * k);
                match rows {
                    1 => body::<T, 1>(wp, next, xp, k, out),
                    2 => body::<T, 2>(wp, next, xp, k, out),
                    3 => body::<T, 3>(wp, next, xp, k, out),
                    _ => body::<T, 4>(wp, next, xp, k, out),
                }
            }
        }
    }
}
