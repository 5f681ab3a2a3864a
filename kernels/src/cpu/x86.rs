//! AVX2 (with F16C and FMA) kernels, and the same with the VNNI `vpdpbusd` dot product
//! (AVX-512 VL+VNNI or AVX-VNNI) where the CPU has it. One weight row against up to four
//! activation rows: the weight block is decoded once for all of them.
//!
//! Per block the codes are unsigned bytes (4- or 5-bit, bias subtracted later through the
//! activation sums) or, for Q8_0, signed bytes (made unsigned with the sign trick), so
//! `maddubs` never saturates: 31 * 127 * 2 and 128 * 127 * 2 are below 32767.

use core::arch::x86_64::*;

use super::format::{Format, BLOCK};
use super::q8::Q8Rows;

/// The x86 instruction set levels the kernels have a body for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Avx2,
    /// 256-bit `vpdpbusd` from AVX-512 VL + VNNI (Intel Xeon since Cascade Lake, AMD Zen 4).
    Avx512Vnni,
    /// The same instruction, VEX-encoded (AVX-VNNI: Intel Alder Lake and later).
    AvxVnni,
}

impl Level {
    /// The best level this CPU has, if any.
    pub fn detect() -> Option<Level> {
        if !has(Level::Avx2) {
            None
        } else if has(Level::Avx512Vnni) {
            Some(Level::Avx512Vnni)
        } else if has(Level::AvxVnni) {
            Some(Level::AvxVnni)
        } else {
            Some(Level::Avx2)
        }
    }
}

/// Whether this CPU has every feature the `level` kernels are compiled with.
pub fn has(level: Level) -> bool {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
    avx2 && match level {
        Level::Avx2 => true,
        Level::Avx512Vnni => {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        Level::AvxVnni => is_x86_feature_detected!("avxvnni"),
    }
}

const AVX2: u8 = 0;
const AVX512VNNI: u8 = 1;
const AVXVNNI: u8 = 2;

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY (caller): p points at 2 readable bytes, and F16C is enabled where this inlines.
    unsafe {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// The 32 codes of the block at `blk`, one per byte (signed for Q8_0, unsigned otherwise).
#[inline(always)]
unsafe fn codes(format: Format, blk: *const u8) -> __m256i {
    // SAFETY (caller): blk points at one whole block of `format`.
    unsafe {
        match format {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 => {
                let qs = _mm_loadu_si128(blk.add(format.block_bytes() - 16) as *const __m128i);
                let m = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(qs, m);
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m);
                let nib = _mm256_set_m128i(hi, lo);
                if format != Format::Q5_0 {
                    return nib;
                }
                // Bit j of qh is bit 4 of element j: spread the 32 bits over 32 bytes.
                let qh = u32::from_le_bytes([*blk.add(2), *blk.add(3), *blk.add(4), *blk.add(5)]);
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(qh as i32),
                    _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
                );
                let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
                _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
            }
            Format::Q8_0 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
        }
    }
}

/// Eight i32 partial sums of `codes · q` (their total is the block's exact integer dot).
#[inline(always)]
unsafe fn isum<const L: u8>(format: Format, c: __m256i, q: __m256i) -> __m256i {
    // SAFETY (caller): inlined only into functions compiled with level L's features.
    unsafe {
        let (c, q) = match format {
            Format::Q8_0 => (_mm256_sign_epi8(c, c), _mm256_sign_epi8(q, c)),
            _ => (c, q),
        };
        match L {
            AVX512VNNI => _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, q),
            AVXVNNI => _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), c, q),
            _ => _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), _mm256_set1_epi16(1)),
        }
    }
}

/// The sum of the eight lanes of `v`.
#[inline(always)]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY (caller): inlined only into functions compiled with AVX.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// One weight row against activation rows `r0..r0 + R`.
#[inline(always)]
unsafe fn row_dots_body<const R: usize, const L: u8>(
    format: Format,
    w: &[u8],
    acts: &Q8Rows,
    r0: usize,
    out: &mut [f32],
) {
    let nb = acts.blocks();
    let bb = format.block_bytes();
    assert!(w.len() >= nb * bb && acts.rows >= r0 + R && out.len() >= R);
    let (wp, qp, dp, sp) = (w.as_ptr(), acts.qs.as_ptr(), acts.d.as_ptr(), acts.s.as_ptr());
    // SAFETY: inlined only into functions compiled with AVX2.
    let mut acc = [unsafe { _mm256_setzero_ps() }; R];
    let mut corr = [0f32; R];
    for b in 0..nb {
        // SAFETY: b < nb and w holds nb blocks (asserted above); rows r0..r0+R exist in acts,
        // each nb blocks of 32 codes with one d and one s per block.
        unsafe {
            let blk = wp.add(b * bb);
            let d = f16_at(blk);
            let c = codes(format, blk);
            let cm = match format {
                Format::Q4_1 => f16_at(blk.add(2)),
                _ => -(format.bias() as f32) * d,
            };
            for r in 0..R {
                let i = (r0 + r) * nb + b;
                let q = _mm256_loadu_si256(qp.add(i * BLOCK) as *const __m256i);
                let p = isum::<L>(format, c, q);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * *dp.add(i)), _mm256_cvtepi32_ps(p), acc[r]);
                if format != Format::Q8_0 {
                    corr[r] += cm * *sp.add(i);
                }
            }
        }
    }
    for r in 0..R {
        // SAFETY: plain register arithmetic; the function is only called with AVX enabled.
        out[r] = unsafe { hsum(acc[r]) } + corr[r];
    }
}

macro_rules! dispatch_rows {
    ($name:ident, $level:expr, $features:literal) => {
        /// See `row_dots_body`; `rows.len()` is 1 to 4.
        #[target_feature(enable = $features)]
        unsafe fn $name(format: Format, w: &[u8], acts: &Q8Rows, r0: usize, n_rows: usize, out: &mut [f32]) {
            // SAFETY: this function's target features are the ones the body needs; the caller
            // checked the CPU has them.
            unsafe {
                match n_rows {
                    1 => row_dots_body::<1, $level>(format, w, acts, r0, out),
                    2 => row_dots_body::<2, $level>(format, w, acts, r0, out),
                    3 => row_dots_body::<3, $level>(format, w, acts, r0, out),
                    _ => row_dots_body::<4, $level>(format, w, acts, r0, out),
                }
            }
        }
    };
}

dispatch_rows!(row_dots_avx2, AVX2, "avx2,fma,f16c");
dispatch_rows!(row_dots_avx512vnni, AVX512VNNI, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni");
dispatch_rows!(row_dots_avxvnni, AVXVNNI, "avx2,fma,f16c,avxvnni");

/// `out[i] = w · x_{r0+i}` for `i < n_rows` (1 to 4), at `level`.
///
/// # Safety
/// The CPU must have `level`'s features ([`has`]).
pub unsafe fn row_dots(
    level: Level,
    format: Format,
    w: &[u8],
    acts: &Q8Rows,
    r0: usize,
    n_rows: usize,
    out: &mut [f32],
) {
    debug_assert!((1..=4).contains(&n_rows));
    // SAFETY: the caller guarantees the features of `level`.
    unsafe {
        match level {
            Level::Avx2 => row_dots_avx2(format, w, acts, r0, n_rows, out),
            Level::Avx512Vnni => row_dots_avx512vnni(format, w, acts, r0, n_rows, out),
            Level::AvxVnni => row_dots_avxvnni(format, w, acts, r0, n_rows, out),
        }
    }
}

/// The block's exact integer dot product computed by the SIMD code path (for the tests that
/// hold it bit for bit against the scalar one).
///
/// # Safety
/// As [`row_dots`]; `block` is one whole block, `q` 32 codes.
pub unsafe fn block_isum(level: Level, format: Format, block: &[u8], q: &[i8]) -> i32 {
    assert!(block.len() >= format.block_bytes() && q.len() >= BLOCK);
    macro_rules! one {
        ($name:ident, $level:expr, $features:literal) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(format: Format, block: &[u8], q: &[i8]) -> i32 {
                // SAFETY: lengths asserted by the caller.
                unsafe { total(isum::<$level>(format, codes(format, block.as_ptr()), load(q))) }
            }
        };
    }
    one!(avx2, AVX2, "avx2,fma,f16c");
    one!(avx512vnni, AVX512VNNI, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni");
    one!(avxvnni, AVXVNNI, "avx2,fma,f16c,avxvnni");
    #[inline(always)]
    unsafe fn load(q: &[i8]) -> __m256i {
        // SAFETY (caller): q has 32 bytes.
        unsafe { _mm256_loadu_si256(q.as_ptr() as *const __m256i) }
    }
    #[inline(always)]
    unsafe fn total(v: __m256i) -> i32 {
        let mut lanes = [0i32; 8];
        // SAFETY: lanes is 32 writable bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v) };
        lanes.iter().sum()
    }
    // SAFETY: the caller guarantees the features of `level`; lengths asserted above.
    unsafe {
        match level {
            Level::Avx2 => avx2(format, block, q),
            Level::Avx512Vnni => avx512vnni(format, block, q),
            Level::AvxVnni => avxvnni(format, block, q),
        }
    }
}
