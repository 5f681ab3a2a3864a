//! K-quant weights repacked once at load into tiles of 16 rows for the AVX-512 VNNI kernel,
//! as [`super::tiled`] does for the 32-blocks: per tile and super-block, the 16 rows' scales
//! side by side (so they apply as 16-lane vectors), then per sub-block of 32 the codes in the
//! interleaved layout where one 64-byte vector holds 4 consecutive codes of each of the 16
//! rows and one `vpdpbusd` advances all 16 rows.
//!
//! Per tile and super-block:
//! - `d`, 16 f16 (32 bytes); Q4_K/Q5_K: `dmin`, 16 f16 (32 bytes);
//! - Q4_K/Q5_K: `sc[s][r]` then `m[s][r]`, one byte each (2 x 128 bytes, the file's 6-bit
//!   fields unpacked); Q6_K: `sc[g][r]`, 16 signed bytes per row (256 bytes);
//! - per sub-block `s` of 32 codes: the high bits (Q5_K: bit 4, one 64-byte plane; Q6_K: bits
//!   4 and 5, two planes; in plane `p`, bit `g` of byte `4r + i` is that bit of code `4g + i`
//!   of row `r`), then 4 x 64 bytes of nibbles (vector `j`, byte `4r + i`: code `4j + i` of row
//!   `r` in the low nibble, code `4(j + 4) + i` in the high).
//!
//! Bytes against the file's: Q6_K exactly the same, Q5_K 1.023x and Q4_K 1.028x (the unpacked
//! scales).

use super::format::f16_at;
use super::kquant::{self, KFormat, KRows, Scales, QK_K};

/// Rows per tile: the same tiles as the 32-block kernel's.
pub use super::tiled::TILE;

/// A K-quant weight matrix in the tiled layout.
#[derive(Debug, Clone)]
pub struct KTiled {
    pub format: KFormat,
    pub n: usize,
    pub k: usize,
    data: super::TileBytes,
}

/// Bytes before the first sub-block in a record.
const fn header_bytes(format: KFormat) -> usize {
    match format {
        KFormat::Q6K => 32 + 256,
        _ => 64 + 256,
    }
}

/// Bytes of one sub-block of 32 codes for 16 rows: high-bit planes, then nibbles.
const fn sub_bytes(format: KFormat) -> usize {
    planes(format) * 64 + 256
}

const fn planes(format: KFormat) -> usize {
    match format {
        KFormat::Q4K => 0,
        KFormat::Q5K => 1,
        KFormat::Q6K => 2,
    }
}

/// Bytes of one tile's record for one super-block.
pub const fn record_bytes(format: KFormat) -> usize {
    header_bytes(format) + 8 * sub_bytes(format)
}

impl KTiled {
    /// Repacks `n` rows of `k / 256` GGUF blocks of `format`.
    pub fn new(format: KFormat, blocks: &[u8], n: usize, k: usize) -> Self {
        let nb = k / QK_K;
        let bb = format.block_bytes();
        assert!(k.is_multiple_of(QK_K) && blocks.len() == n * nb * bb, "K tiled sizes");
        let rec = record_bytes(format);
        let mut data = vec![0u8; n.div_ceil(TILE) * nb * rec];
        let mut c = [0i32; QK_K];
        for row in 0..n {
            let (t, r) = (row / TILE, row % TILE);
            for b in 0..nb {
                let blk = &blocks[(row * nb + b) * bb..][..bb];
                let out = &mut data[(t * nb + b) * rec..][..rec];
                let d_at = format.d_at();
                out[2 * r..2 * r + 2].copy_from_slice(&blk[d_at..d_at + 2]);
                let s = kquant::scales(format, blk);
                if format.has_mins() {
                    out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
                    for j in 0..8 {
                        out[64 + 16 * j + r] = s.sc[j] as u8;
                        out[192 + 16 * j + r] = s.m[j] as u8;
                    }
                } else {
                    for g in 0..16 {
                        out[32 + 16 * g + r] = s.sc[g] as i8 as u8;
                    }
                }
                kquant::codes(format, blk, &mut c);
                for sub in 0..8 {
                    let at = header_bytes(format) + sub * sub_bytes(format);
                    let c = &c[32 * sub..32 * sub + 32];
                    for p in 0..planes(format) {
                        for g in 0..8 {
                            for i in 0..4 {
                                out[at + 64 * p + 4 * r + i] |= (((c[4 * g + i] >> (4 + p)) & 1) as u8) << g;
                            }
                        }
                    }
                    let qs = at + 64 * planes(format);
                    for j in 0..4 {
                        for i in 0..4 {
                            let lo = (c[4 * j + i] & 0x0F) as u8;
                            let hi = (c[4 * (j + 4) + i] & 0x0F) as u8;
                            out[qs + 64 * j + 4 * r + i] = lo | (hi << 4);
                        }
                    }
                }
            }
        }
        KTiled { format, n, k, data: super::TileBytes::Owned(data) }
    }

    /// Tiles made before (by [`KTiled::new`] on an earlier start, then kept), read in place;
    /// None when `bytes` is not the size `n` rows of `k` weights tile to.
    pub fn from_shared(format: KFormat, bytes: super::SharedBytes, n: usize, k: usize) -> Option<Self> {
        let size = n.div_ceil(TILE).checked_mul(k / QK_K)?.checked_mul(record_bytes(format))?;
        (k.is_multiple_of(QK_K) && bytes.bytes().len() == size).then_some(KTiled {
            format,
            n,
            k,
            data: super::TileBytes::Shared(bytes),
        })
    }

    /// The tiled bytes, to keep for a later start.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    fn record(&self, tile: usize, b: usize) -> &[u8] {
        let rec = record_bytes(self.format);
        &self.data[(tile * (self.k / QK_K) + b) * rec..][..rec]
    }

    /// Row `r` of `tile`, super-block `b`: its 256 codes, scales, `d` and `dmin` (0 for
    /// Q6_K), read back from the layout (the portable reading, for the tests and embeddings).
    pub fn block(&self, tile: usize, b: usize, r: usize) -> ([i32; QK_K], Scales, f32, f32) {
        let (f, rec) = (self.format, self.record(tile, b));
        let mut s = Scales::default();
        let d = f16_at(&rec[2 * r..]);
        let mut dmin = 0.0;
        if f.has_mins() {
            dmin = f16_at(&rec[32 + 2 * r..]);
            for j in 0..8 {
                s.sc[j] = rec[64 + 16 * j + r] as i32;
                s.m[j] = rec[192 + 16 * j + r] as i32;
            }
        } else {
            for g in 0..16 {
                s.sc[g] = rec[32 + 16 * g + r] as i8 as i32;
            }
        }
        let mut c = [0i32; QK_K];
        for sub in 0..8 {
            let at = header_bytes(f) + sub * sub_bytes(f);
            let qs = at + 64 * planes(f);
            let c = &mut c[32 * sub..32 * sub + 32];
            for j in 0..4 {
                for i in 0..4 {
                    let v = rec[qs + 64 * j + 4 * r + i];
                    c[4 * j + i] = (v & 0x0F) as i32;
                    c[4 * (j + 4) + i] = (v >> 4) as i32;
                }
            }
            for p in 0..planes(f) {
                for g in 0..8 {
                    for i in 0..4 {
                        c[4 * g + i] |= (((rec[at + 64 * p + 4 * r + i] >> g) & 1) as i32) << (4 + p);
                    }
                }
            }
        }
        (c, s, d, dmin)
    }

    /// Dequantizes row `j` into `out` (`k` values), with [`kquant::dequantize_row`]'s
    /// arithmetic, so the same values.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (t, r) = (j / TILE, j % TILE);
        for (b, out) in out.chunks_exact_mut(QK_K).enumerate().take(self.k / QK_K) {
            let (c, s, d, dmin) = self.block(t, b, r);
            for (i, (o, &c)) in out.iter_mut().zip(&c).enumerate() {
                *o = if self.format.has_mins() {
                    d * s.sc[i / 32] as f32 * c as f32 - dmin * s.m[i / 32] as f32
                } else {
                    d * s.sc[i / 16] as f32 * (c - 32) as f32
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use core::arch::x86_64::*;

    use super::{header_bytes, planes, record_bytes, sub_bytes, KTiled, TILE};
    use crate::cpu::kquant::{KFormat, KRows, QK_K};

    /// Whether this CPU runs the kernel (the same features as [`crate::cpu::tiled`]'s).
    pub fn available() -> bool {
        crate::cpu::tiled::avx512::available()
    }

    /// The eight code vectors of one sub-block at `at` (unsigned bytes, high bits added).
    #[inline(always)]
    unsafe fn codes(format: KFormat, at: *const u8) -> [__m512i; 8] {
        // SAFETY (caller): `at` points at one whole sub-block of `format`; AVX-512 BW is on.
        unsafe {
            let mut c = [_mm512_setzero_si512(); 8];
            let qs = at.add(64 * planes(format));
            let m = _mm512_set1_epi8(0x0F);
            for j in 0..4 {
                let v = _mm512_loadu_si512(qs.add(64 * j) as *const _);
                c[j] = _mm512_and_si512(v, m);
                c[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
            }
            for p in 0..planes(format) {
                let hb = _mm512_loadu_si512(at.add(64 * p) as *const _);
                let target = 4 + p as i32;
                let bit = _mm512_set1_epi8((1i32 << target) as i8);
                for (g, c) in c.iter_mut().enumerate() {
                    // Bit g of each byte moves to bit `target`; the shifts are per 16-bit
                    // lane, and the mask drops what crosses from the neighbouring byte.
                    let g = g as i32;
                    let moved = if g <= target {
                        _mm512_sllv_epi16(hb, _mm512_set1_epi16((target - g) as i16))
                    } else {
                        _mm512_srlv_epi16(hb, _mm512_set1_epi16((g - target) as i16))
                    };
                    *c = _mm512_or_si512(*c, _mm512_and_si512(moved, bit));
                }
            }
            c
        }
    }

    /// Sixteen rows' integer dot products of code vectors `c[from..from + len]` with the
    /// activation codes at `q` (4 per vector).
    #[inline(always)]
    unsafe fn dots(c: &[__m512i; 8], from: usize, len: usize, q: *const i8) -> __m512i {
        // SAFETY (caller): q points at 4 * len readable codes; AVX-512 VNNI is enabled.
        unsafe {
            let bc = |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(q.add(4 * g) as *const i32));
            let (mut a, mut b) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for g in (0..len).step_by(2) {
                a = _mm512_dpbusd_epi32(a, c[from + g], bc(g));
                b = _mm512_dpbusd_epi32(b, c[from + g + 1], bc(g + 1));
            }
            _mm512_add_epi32(a, b)
        }
    }

    /// 16 bytes at `p` widened to 16 lanes of i32 (signed or not).
    #[inline(always)]
    unsafe fn lanes(p: *const u8, signed: bool) -> __m512i {
        // SAFETY (caller): p points at 16 readable bytes; AVX-512 F is enabled.
        unsafe {
            let v = _mm_loadu_si128(p as *const __m128i);
            if signed {
                _mm512_cvtepi8_epi32(v)
            } else {
                _mm512_cvtepu8_epi32(v)
            }
        }
    }

    #[inline(always)]
    unsafe fn body<const R: usize>(w: &KTiled, acts: &KRows, tile: usize, r0: usize, out: &mut [[f32; TILE]; 4]) {
        let (f, nb) = (w.format, w.k / QK_K);
        let rec_bytes = record_bytes(f);
        assert!(acts.k == w.k && acts.rows >= r0 + R && w.data.len() >= (tile + 1) * nb * rec_bytes);
        // SAFETY: records stay below (tile + 1) * nb, activation blocks below (r0 + R) * nb
        // (both asserted); AVX-512 F/BW/VNNI, F16C and FMA are enabled where this inlines.
        unsafe {
            let base = w.data.as_ptr().add(tile * nb * rec_bytes);
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                let rec = base.add(b * rec_bytes);
                crate::cpu::tiled::avx512::prefetch(rec, rec_bytes);
                let mut isum = [_mm512_setzero_si512(); R];
                let mut msum = [_mm512_setzero_si512(); R];
                for s in 0..8 {
                    let c = codes(f, rec.add(header_bytes(f) + s * sub_bytes(f)));
                    for (r, isum) in isum.iter_mut().enumerate() {
                        let i = (r0 + r) * nb + b;
                        let q = acts.qs.as_ptr().add(i * QK_K + 32 * s);
                        let bs = acts.bsums.as_ptr().add(i * 16 + 2 * s);
                        if f.has_mins() {
                            let p = _mm512_mullo_epi32(dots(&c, 0, 8, q), lanes(rec.add(64 + 16 * s), false));
                            *isum = _mm512_add_epi32(*isum, p);
                        } else {
                            let lo = _mm512_sub_epi32(dots(&c, 0, 4, q), _mm512_set1_epi32(32 * *bs));
                            let hi = _mm512_sub_epi32(dots(&c, 4, 4, q.add(16)), _mm512_set1_epi32(32 * *bs.add(1)));
                            let lo = _mm512_mullo_epi32(lo, lanes(rec.add(32 + 16 * 2 * s), true));
                            let hi = _mm512_mullo_epi32(hi, lanes(rec.add(32 + 16 * (2 * s + 1)), true));
                            *isum = _mm512_add_epi32(*isum, _mm512_add_epi32(lo, hi));
                        }
                    }
                }
                if f.has_mins() {
                    for s in 0..8 {
                        let mins = lanes(rec.add(192 + 16 * s), false);
                        for (r, msum) in msum.iter_mut().enumerate() {
                            let bs = acts.bsums.as_ptr().add(((r0 + r) * nb + b) * 16 + 2 * s);
                            let q = _mm512_set1_epi32(*bs + *bs.add(1));
                            *msum = _mm512_add_epi32(*msum, _mm512_mullo_epi32(mins, q));
                        }
                    }
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
                let dminw = if f.has_mins() {
                    _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(32) as *const __m256i))
                } else {
                    _mm512_setzero_ps()
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let dx = _mm512_set1_ps(*acts.d.get_unchecked((r0 + r) * nb + b));
                    // The order of `kquant::accumulate`: the same bits as the portable path.
                    *acc = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(isum[r]), *acc);
                    *acc = _mm512_fnmadd_ps(_mm512_mul_ps(dminw, dx), _mm512_cvtepi32_ps(msum[r]), *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out[r].as_mut_ptr(), *acc);
            }
        }
    }

    /// `out[r][i]` = row `16 * tile + i` of `w` dotted with activation row `r0 + r`, for
    /// `r < n_rows` (1 to 4).
    ///
    /// # Safety
    /// The CPU has the features of [`available`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
    pub unsafe fn tile_dots(
        w: &KTiled,
        acts: &KRows,
        tile: usize,
        r0: usize,
        n_rows: usize,
        out: &mut [[f32; TILE]; 4],
    ) {
        // SAFETY: this function enables the features the body needs.
        unsafe {
            match n_rows {
                1 => body::<1>(w, acts, tile, r0, out),
                2 => body::<2>(w, acts, tile, r0, out),
                3 => body::<3>(w, acts, tile, r0, out),
                _ => body::<4>(w, acts, tile, r0, out),
            }
        }
    }
}

/// `y (m, n) = x · Wᵀ` for a tiled `w`, with the AVX-512 VNNI kernel (the CPU must have it:
/// [`avx512::available`]), split over the thread pool by tiles.
#[cfg(target_arch = "x86_64")]
pub fn matmul(w: &KTiled, acts: &KRows, y: &mut [f32]) {
    assert!(acts.k == w.k && avx512::available(), "K tiled matmul");
    // SAFETY: the CPU's features were checked above.
    super::tiled::by_tiles(w.n, acts.rows, w.k, y, |t, r0, nr, dots| unsafe {
        avx512::tile_dots(w, acts, t, r0, nr, dots)
    });
}

/// Portable reading of the tiled layout with the arithmetic of [`kquant::matmul_portable`]
/// (tests: the layout loses nothing).
pub fn matmul_portable(w: &KTiled, acts: &KRows, y: &mut [f32]) {
    let (m, n, nb) = (acts.rows, w.n, w.k / QK_K);
    for j in 0..n {
        for r in 0..m {
            let mut sum = 0f32;
            for b in 0..nb {
                let (c, s, d, dmin) = w.block(j / TILE, b, j % TILE);
                let i = r * nb + b;
                let (isum, msum) =
                    kquant::block_sums(w.format, &c, &s, &acts.qs[i * QK_K..][..QK_K], &acts.bsums[i * 16..][..16]);
                sum = kquant::accumulate(sum, d, dmin, acts.d[i], isum, msum);
            }
            y[r * n + j] = sum;
        }
    }
}
