//! Weights repacked once at load into tiles of 16 rows for the AVX-512 VNNI kernel: per tile
//! and block, the 16 rows' scales side by side, then their codes interleaved so that one
//! 64-byte vector holds 4 consecutive codes of each of the 16 rows. One `vpdpbusd` then
//! multiplies those by 4 activation codes broadcast to every lane: 16 output rows advance
//! together, with no horizontal sums, and scales apply as 16-lane vectors. The layout takes
//! exactly the bytes of the GGUF blocks (rows padded to a multiple of 16 with zeros).
//!
//! Per tile and block, for `F`:
//! - every format: `d`, 16 f16 (32 bytes);
//! - Q4_1: `m`, 16 f16 (32 bytes);
//! - Q5_0: the codes' fifth bits, 64 bytes: bit `g` of byte `4r + i` is that of code `4g + i`
//!   of row `r`;
//! - Q4_0/Q4_1/Q5_0: 4 x 64 bytes of nibbles: vector `j`, byte `4r + i` holds code `4j + i`
//!   of row `r` (low nibble) and code `4(j + 4) + i` (high nibble);
//! - Q8_0: 8 x 64 bytes: vector `g`, byte `4r + i` is code `4g + i` of row `r` plus 128
//!   (unsigned for `vpdpbusd`; the 128 comes off through the activation sums, exactly).

use super::format::{codes, Format, BLOCK};
use super::q8::Q8Rows;

/// Rows per tile.
pub const TILE: usize = 16;

/// A weight matrix in the tiled layout.
#[derive(Debug, Clone)]
pub struct Tiled {
    pub format: Format,
    pub n: usize,
    pub k: usize,
    pub(crate) data: super::TileBytes,
}

/// Bytes of one tile's record for one block.
pub const fn record_bytes(format: Format) -> usize {
    match format {
        Format::Q4_0 => 32 + 256,
        Format::Q4_1 => 64 + 256,
        Format::Q5_0 => 32 + 64 + 256,
        Format::Q8_0 => 32 + 512,
    }
}

impl Tiled {
    /// Repacks `n` rows of `k / 32` GGUF blocks of `format`.
    pub fn new(format: Format, blocks: &[u8], n: usize, k: usize) -> Self {
        let mut data = vec![0u8; Self::len(format, n, k)];
        Self::fill(format, blocks, n, k, &mut data);
        Tiled { format, n, k, data: super::TileBytes::Owned(data) }
    }

    /// Bytes the tiles of `n` rows of `k / 32` blocks take (the blocks' own size when `n` is a
    /// multiple of [`TILE`]).
    pub fn len(format: Format, n: usize, k: usize) -> usize {
        n.div_ceil(TILE) * (k / BLOCK) * record_bytes(format)
    }

    /// Writes the tiles of `blocks` into `data` ([`Tiled::len`] bytes, zeroed).
    pub fn fill(format: Format, blocks: &[u8], n: usize, k: usize, data: &mut [u8]) {
        let nb = k / BLOCK;
        let bb = format.block_bytes();
        assert!(k.is_multiple_of(BLOCK) && blocks.len() == n * nb * bb, "tiled sizes");
        assert_eq!(data.len(), Self::len(format, n, k), "tiled output size");
        let rec = record_bytes(format);
        let mut c = [0i32; BLOCK];
        for row in 0..n {
            let (t, r) = (row / TILE, row % TILE);
            for b in 0..nb {
                let blk = &blocks[(row * nb + b) * bb..][..bb];
                let out = &mut data[(t * nb + b) * rec..][..rec];
                out[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                let mut at = 32;
                if format == Format::Q4_1 {
                    out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
                    at = 64;
                }
                match format {
                    // Codes 4j + i and 16 + 4j + i are the low and high nibbles of file byte
                    // 4j + i, which is then already the tile's byte: a copy, 4 bytes at a time.
                    Format::Q4_0 | Format::Q4_1 => {
                        let qs = &blk[bb - 16..];
                        for j in 0..4 {
                            out[at + 64 * j + 4 * r..][..4].copy_from_slice(&qs[4 * j..4 * j + 4]);
                        }
                    }
                    // Code + 128 as a byte is the code's byte with its top bit flipped.
                    Format::Q8_0 => {
                        for g in 0..8 {
                            for i in 0..4 {
                                out[at + 64 * g + 4 * r + i] = blk[2 + 4 * g + i] ^ 0x80;
                            }
                        }
                    }
                    Format::Q5_0 => {
                        codes(format, blk, &mut c);
                        for g in 0..8 {
                            for i in 0..4 {
                                out[at + 4 * r + i] |= (((c[4 * g + i] >> 4) & 1) as u8) << g;
                            }
                        }
                        for j in 0..4 {
                            for i in 0..4 {
                                let lo = (c[4 * j + i] & 0x0F) as u8;
                                let hi = (c[4 * (j + 4) + i] & 0x0F) as u8;
                                out[at + 64 + 64 * j + 4 * r + i] = lo | (hi << 4);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Tiles made before (by [`Tiled::new`] on an earlier start, then kept), read in place;
    /// None when `bytes` is not the size `n` rows of `k` weights tile to.
    pub fn from_shared(format: Format, bytes: super::SharedBytes, n: usize, k: usize) -> Option<Self> {
        let size = n.div_ceil(TILE).checked_mul(k / BLOCK)?.checked_mul(record_bytes(format))?;
        (k.is_multiple_of(BLOCK) && bytes.bytes().len() == size).then_some(Tiled {
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
        let nb = self.k / BLOCK;
        let rec = record_bytes(self.format);
        &self.data[(tile * nb + b) * rec..][..rec]
    }

    /// Dequantizes row `j` into `out` (`k` values): the same arithmetic as
    /// [`super::format::dequantize_row`] on the file's blocks, so the same values.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (t, r) = (j / TILE, j % TILE);
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate().take(self.k / BLOCK) {
            let rec = self.record(t, b);
            let d = super::format::f16_at(&rec[2 * r..]);
            let m = if self.format == Format::Q4_1 { super::format::f16_at(&rec[32 + 2 * r..]) } else { 0.0 };
            for (o, c) in out.iter_mut().zip(self.codes(t, b, r)) {
                *o = d * (c - self.format.bias()) as f32 + m;
            }
        }
    }

    /// The integer codes (bias included, as in the file) of row `r` of `tile`, block `b`:
    /// the portable reading of the layout, for the tests.
    pub fn codes(&self, tile: usize, b: usize, r: usize) -> [i32; BLOCK] {
        let rec = self.record(tile, b);
        let mut c = [0i32; BLOCK];
        let at = if self.format == Format::Q4_1 { 64 } else { 32 };
        match self.format {
            Format::Q8_0 => {
                for g in 0..8 {
                    for i in 0..4 {
                        c[4 * g + i] = rec[at + 64 * g + 4 * r + i] as i32 - 128;
                    }
                }
            }
            _ => {
                let qs = if self.format == Format::Q5_0 { at + 64 } else { at };
                for j in 0..4 {
                    for i in 0..4 {
                        let v = rec[qs + 64 * j + 4 * r + i];
                        c[4 * j + i] = (v & 0x0F) as i32;
                        c[4 * (j + 4) + i] = (v >> 4) as i32;
                    }
                }
                if self.format == Format::Q5_0 {
                    for g in 0..8 {
                        for i in 0..4 {
                            c[4 * g + i] |= (((rec[at + 4 * r + i] >> g) & 1) as i32) << 4;
                        }
                    }
                }
            }
        }
        c
    }
}

/// What the tiled codes are offset by: the format's bias, and Q8_0's +128 (stored unsigned
/// for `vpdpbusd`); it comes off through the activation block sums.
pub(crate) const fn code_bias(format: Format) -> f32 {
    match format {
        Format::Q4_0 => 8.0,
        Format::Q5_0 => 16.0,
        Format::Q8_0 => 128.0,
        Format::Q4_1 => 0.0,
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use core::arch::x86_64::*;

    use super::{code_bias, record_bytes, Tiled, TILE};
    use crate::cpu::format::{Format, BLOCK};
    use crate::cpu::q8::Q8Rows;

    /// How far ahead of the record being read the kernels ask for the weights, in bytes. A
    /// decode step streams every weight once from memory, in record order; the hardware
    /// prefetcher alone left one core at about 9 GB/s on Q4_0 (n = 196,608, k = 576, one row,
    /// `examples/matmul_speed.rs`), and asking 8 KiB ahead took the same matmul from 3.7-6.9 ms
    /// to 3.1-3.9 ms (best of 4, on a shared machine); 16 KiB was no better.
    pub(crate) const PREFETCH: usize = 8192;

    /// Prefetches the `bytes` at `PREFETCH` past `rec`.
    #[inline(always)]
    pub(crate) unsafe fn prefetch(rec: *const u8, bytes: usize) {
        // SAFETY (caller): SSE is enabled (every x86-64). A prefetch never faults, and
        // `wrapping_add` makes no claim that the address is inside the allocation.
        unsafe {
            let mut off = 0;
            while off < bytes {
                _mm_prefetch::<_MM_HINT_T0>(rec.wrapping_add(PREFETCH + off) as *const i8);
                off += 64;
            }
        }
    }

    /// Whether this CPU runs the tiled kernel.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
    }

    /// The eight code vectors of a record (unsigned bytes; Q8_0's carry +128).
    #[inline(always)]
    pub(crate) unsafe fn codes(format: Format, rec: *const u8) -> [__m512i; 8] {
        // SAFETY (caller): rec points at one whole record of `format`; AVX-512 BW is enabled.
        unsafe {
            let mut c = [_mm512_setzero_si512(); 8];
            let at = if format == Format::Q4_1 { 64 } else { 32 };
            if format == Format::Q8_0 {
                for (g, c) in c.iter_mut().enumerate() {
                    *c = _mm512_loadu_si512(rec.add(at + 64 * g) as *const _);
                }
                return c;
            }
            let qs = if format == Format::Q5_0 { at + 64 } else { at };
            let m = _mm512_set1_epi8(0x0F);
            for j in 0..4 {
                let v = _mm512_loadu_si512(rec.add(qs + 64 * j) as *const _);
                c[j] = _mm512_and_si512(v, m);
                c[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
            }
            if format == Format::Q5_0 {
                let hb = _mm512_loadu_si512(rec.add(at) as *const _);
                let bit4 = _mm512_set1_epi8(0x10);
                // Bit g of each byte moves to bit 4 (shifts are per 16-bit lane: the mask
                // drops what crosses from the neighbouring byte).
                c[0] = _mm512_or_si512(c[0], _mm512_and_si512(_mm512_slli_epi16(hb, 4), bit4));
                c[1] = _mm512_or_si512(c[1], _mm512_and_si512(_mm512_slli_epi16(hb, 3), bit4));
                c[2] = _mm512_or_si512(c[2], _mm512_and_si512(_mm512_slli_epi16(hb, 2), bit4));
                c[3] = _mm512_or_si512(c[3], _mm512_and_si512(_mm512_slli_epi16(hb, 1), bit4));
                c[4] = _mm512_or_si512(c[4], _mm512_and_si512(hb, bit4));
                c[5] = _mm512_or_si512(c[5], _mm512_and_si512(_mm512_srli_epi16(hb, 1), bit4));
                c[6] = _mm512_or_si512(c[6], _mm512_and_si512(_mm512_srli_epi16(hb, 2), bit4));
                c[7] = _mm512_or_si512(c[7], _mm512_and_si512(_mm512_srli_epi16(hb, 3), bit4));
            }
            c
        }
    }

    /// Sixteen rows' exact integer dot products with 32 activation codes at `q`.
    #[inline(always)]
    unsafe fn isums(c: &[__m512i; 8], q: *const i8) -> __m512i {
        // SAFETY (caller): q points at 32 readable codes; AVX-512 VNNI is enabled.
        unsafe {
            let bc = |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(q.add(4 * g) as *const i32));
            let mut a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], bc(0));
            let mut b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[1], bc(1));
            a = _mm512_dpbusd_epi32(a, c[2], bc(2));
            b = _mm512_dpbusd_epi32(b, c[3], bc(3));
            a = _mm512_dpbusd_epi32(a, c[4], bc(4));
            b = _mm512_dpbusd_epi32(b, c[5], bc(5));
            a = _mm512_dpbusd_epi32(a, c[6], bc(6));
            b = _mm512_dpbusd_epi32(b, c[7], bc(7));
            _mm512_add_epi32(a, b)
        }
    }

    #[inline(always)]
    unsafe fn body<const R: usize>(w: &Tiled, acts: &Q8Rows, tile: usize, r0: usize, out: &mut [[f32; TILE]; 4]) {
        let nb = w.k / BLOCK;
        let rec_bytes = record_bytes(w.format);
        assert!(acts.k == w.k && acts.rows >= r0 + R && w.data.len() >= (tile + 1) * nb * rec_bytes);
        let bias = code_bias(w.format);
        // SAFETY: the record index stays below (tile + 1) * nb, the activation blocks below
        // (r0 + R) * nb (both asserted); AVX-512 F/BW/VNNI, F16C and FMA are enabled where
        // this inlines.
        unsafe {
            let base = w.data.as_ptr().add(tile * nb * rec_bytes);
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                let rec = base.add(b * rec_bytes);
                prefetch(rec, rec_bytes);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
                let c = codes(w.format, rec);
                let mw = _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(32) as *const __m256i));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let i = (r0 + r) * nb + b;
                    let isum = _mm512_cvtepi32_ps(isums(&c, acts.qs.as_ptr().add(i * BLOCK)));
                    let da = _mm512_set1_ps(*acts.d.get_unchecked(i));
                    let sa = *acts.s.get_unchecked(i);
                    let corr = _mm512_set1_ps(if w.format == Format::Q4_1 { sa } else { -bias * sa });
                    *acc = scale_add(w.format, *acc, isum, dw, mw, da, corr);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out[r].as_mut_ptr(), *acc);
            }
        }
    }

    /// One block's exact sums `isum` scaled into `acc`: `acc + dw * (isum * da + corr)`, or for
    /// Q4_1 `acc + dw * (isum * da) + mw * corr`, where `corr` is what the block sum adds
    /// (`-bias * s`, or Q4_1's `s`). The one definition of this step for the VNNI and AMX
    /// kernels, which is why their floats agree bit for bit.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn scale_add(
        format: Format,
        acc: __m512,
        isum: __m512,
        dw: __m512,
        mw: __m512,
        da: __m512,
        corr: __m512,
    ) -> __m512 {
        // SAFETY (caller): AVX-512 F and FMA are enabled.
        unsafe {
            if format == Format::Q4_1 {
                _mm512_fmadd_ps(mw, corr, _mm512_fmadd_ps(dw, _mm512_mul_ps(isum, da), acc))
            } else {
                _mm512_fmadd_ps(dw, _mm512_fmadd_ps(isum, da, corr), acc)
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
        w: &Tiled,
        acts: &Q8Rows,
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

    /// The 16 exact integer dot products of one record with 32 activation codes (tests).
    ///
    /// # Safety
    /// As [`tile_dots`]; `q` has 32 codes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
    pub unsafe fn record_isums(w: &Tiled, tile: usize, b: usize, q: &[i8]) -> [i32; TILE] {
        assert!(q.len() >= BLOCK);
        let rec = w.record(tile, b);
        let mut out = [0i32; TILE];
        // SAFETY: rec is a whole record and q has 32 codes (asserted).
        unsafe {
            let v = isums(&codes(w.format, rec.as_ptr()), q.as_ptr());
            _mm512_storeu_si512(out.as_mut_ptr() as *mut _, v);
        }
        out
    }
}

/// `y (m, n) = x · Wᵀ` for a tiled `w`, with the AVX-512 VNNI kernel (the CPU must have it:
/// [`avx512::available`]), split over the thread pool by tiles.
#[cfg(target_arch = "x86_64")]
pub fn matmul_q8(w: &Tiled, acts: &Q8Rows, y: &mut [f32]) {
    if super::amx::takes(acts.rows) {
        return super::amx::matmul_q8(w, acts, y);
    }
    matmul_q8_vnni(w, acts, y)
}

/// [`matmul_q8`] on the AVX-512 VNNI kernel alone, whatever the row count (tests, benches).
#[cfg(target_arch = "x86_64")]
pub fn matmul_q8_vnni(w: &Tiled, acts: &Q8Rows, y: &mut [f32]) {
    assert!(acts.k == w.k && avx512::available(), "tiled matmul");
    // SAFETY: the CPU's features were checked above.
    by_tiles(w.n, acts.rows, w.k, y, |t, r0, nr, dots| unsafe { avx512::tile_dots(w, acts, t, r0, nr, dots) });
}

/// Fills `y (m, n)` tile by tile, split over the thread pool: `dots(tile, r0, rows, out)` puts
/// the dot products of the tile's 16 weight rows with activation rows `r0..r0 + rows` (1 to 4)
/// in `out[r][i]`. The driver of every tiled kernel (this one and [`super::ktiled`]).
pub(crate) fn by_tiles(
    n: usize,
    m: usize,
    k: usize,
    y: &mut [f32],
    dots: impl Fn(usize, usize, usize, &mut [[f32; TILE]; 4]) + Sync,
) {
    assert!(y.len() == m * n, "tiled matmul output");
    let out = super::SharedOut(y.as_mut_ptr());
    let tiles = |range: std::ops::Range<usize>| {
        let mut d = [[0f32; TILE]; 4];
        for t in range {
            let rows = TILE.min(n - t * TILE);
            for r0 in (0..m).step_by(4) {
                let nr = 4.min(m - r0);
                dots(t, r0, nr, &mut d);
                for (r, d) in d[..nr].iter().enumerate() {
                    // SAFETY: row r0 + r < m, columns 16t..16t + rows < n; tile t is this
                    // thread's alone, so no other thread writes these columns.
                    unsafe { out.write((r0 + r) * n + t * TILE, &d[..rows]) };
                }
            }
        }
    };
    super::by_output_rows(n.div_ceil(TILE), n * m * k, tiles);
}

/// Portable reference of [`matmul_q8`] on the tiled layout (tests).
pub fn matmul_q8_scalar(w: &Tiled, acts: &Q8Rows, y: &mut [f32]) {
    let (m, n, nb) = (acts.rows, w.n, w.k / BLOCK);
    for j in 0..n {
        let (t, r) = (j / TILE, j % TILE);
        for row in 0..m {
            let mut sum = 0f32;
            for b in 0..nb {
                let rec = w.record(t, b);
                let c = w.codes(t, b, r);
                let i = row * nb + b;
                let isum: i32 = c.iter().zip(&acts.qs[i * BLOCK..(i + 1) * BLOCK]).map(|(&c, &q)| c * q as i32).sum();
                let d = super::format::f16_at(&rec[2 * r..]);
                let corr = match w.format {
                    Format::Q4_1 => super::format::f16_at(&rec[32 + 2 * r..]),
                    f => -(f.bias() as f32) * d,
                };
                sum += d * acts.d[i] * isum as f32 + corr * acts.s[i];
            }
            y[row * n + j] = sum;
        }
    }
}
