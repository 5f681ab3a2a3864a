//! The GGUF K-quant formats (Q4_K, Q5_K, Q6_K: super-blocks of 256 weights with per-32 or
//! per-16 integer scales), the activations they meet (llama.cpp's Q8_K: 256 values, one f32
//! scale, and the sums of each 16), and the portable kernel that defines what the SIMD one
//! ([`super::ktiled`]) computes.
//!
//! The arithmetic is llama.cpp's `ggml_vec_dot_q{4,5,6}_K_q8_K`: per super-block, the integer
//! sums `Σ_s sc_s Σ c·q` (and `Σ_s m_s Σ q` for the mins) are exact, then one float step
//! `y += (d·d_x)·isum - (dmin·d_x)·msum`, done with fused multiply-adds here so that every
//! path gives the same bits.

use super::format::f16_at;

/// Weights per super-block.
pub const QK_K: usize = 256;

/// A K-quant weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KFormat {
    /// `d`, `dmin` (f16), 8 six-bit scales and mins packed in 12 bytes, 256 four-bit codes:
    /// weight `d·sc_s·c - dmin·m_s` in sub-block `s` of 32.
    Q4K,
    /// Q4_K with a fifth bit per code (32 bytes of high bits).
    Q5K,
    /// 256 six-bit codes (low nibbles, then two high bits each), 16 signed 8-bit scales (one
    /// per 16 weights), `d` (f16) last: weight `d·sc_g·(c - 32)`.
    Q6K,
}

impl KFormat {
    /// Bytes per super-block in the GGUF layout.
    pub const fn block_bytes(self) -> usize {
        match self {
            KFormat::Q4K => 144,
            KFormat::Q5K => 176,
            KFormat::Q6K => 210,
        }
    }

    /// Whether the format has per-sub-block mins (Q4_K, Q5_K).
    pub const fn has_mins(self) -> bool {
        !matches!(self, KFormat::Q6K)
    }

    /// The format of a candle quantized dtype, if the kernels read it.
    pub fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        match dtype {
            G::Q4K => Some(KFormat::Q4K),
            G::Q5K => Some(KFormat::Q5K),
            G::Q6K => Some(KFormat::Q6K),
            _ => None,
        }
    }

    /// Byte offset of `d` in a block.
    pub const fn d_at(self) -> usize {
        match self {
            KFormat::Q6K => 208,
            _ => 0,
        }
    }
}

/// A super-block's integer scales: for Q4_K/Q5_K `sc[0..8]` and `m[0..8]` (six bits each,
/// one per 32 weights); for Q6_K `sc[0..16]` (signed, one per 16 weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scales {
    pub sc: [i32; 16],
    pub m: [i32; 8],
}

/// The scales of one block (llama.cpp's `get_scale_min_k4` for Q4_K/Q5_K).
pub fn scales(format: KFormat, block: &[u8]) -> Scales {
    let mut out = Scales::default();
    match format {
        KFormat::Q4K | KFormat::Q5K => {
            let q = &block[4..16];
            for j in 0..8 {
                let (d, m) = if j < 4 {
                    (q[j] & 63, q[j + 4] & 63)
                } else {
                    ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
                };
                out.sc[j] = d as i32;
                out.m[j] = m as i32;
            }
        }
        KFormat::Q6K => {
            for (o, &s) in out.sc.iter_mut().zip(&block[192..208]) {
                *o = s as i8 as i32;
            }
        }
    }
    out
}

/// The 256 unsigned codes of one block, in element order (Q6_K's before the -32).
pub fn codes(format: KFormat, block: &[u8], out: &mut [i32; QK_K]) {
    match format {
        KFormat::Q4K | KFormat::Q5K => {
            let (qh, qs) = match format {
                KFormat::Q5K => (Some(&block[16..48]), &block[48..176]),
                _ => (None, &block[16..144]),
            };
            // Sub-blocks 2j and 2j+1 are the low and high nibbles of bytes 32j..32j+32; for
            // Q5_K, bit s of qh[l] is the fifth bit of element l of sub-block s.
            for j in 0..4 {
                for l in 0..32 {
                    let b = qs[32 * j + l];
                    let (lo, hi) = ((b & 0xF) as i32, (b >> 4) as i32);
                    let (h0, h1) =
                        qh.map_or((0, 0), |qh| (((qh[l] >> (2 * j)) & 1) as i32, ((qh[l] >> (2 * j + 1)) & 1) as i32));
                    out[64 * j + l] = lo | (h0 << 4);
                    out[64 * j + 32 + l] = hi | (h1 << 4);
                }
            }
        }
        KFormat::Q6K => {
            let (ql, qh) = (&block[..128], &block[128..192]);
            for n in 0..2 {
                let (ql, qh, out) = (&ql[64 * n..], &qh[32 * n..], &mut out[128 * n..]);
                for l in 0..32 {
                    out[l] = (ql[l] & 0xF) as i32 | (((qh[l] & 3) as i32) << 4);
                    out[l + 32] = (ql[l + 32] & 0xF) as i32 | ((((qh[l] >> 2) & 3) as i32) << 4);
                    out[l + 64] = (ql[l] >> 4) as i32 | ((((qh[l] >> 4) & 3) as i32) << 4);
                    out[l + 96] = (ql[l + 32] >> 4) as i32 | ((((qh[l] >> 6) & 3) as i32) << 4);
                }
            }
        }
    }
}

/// Dequantizes one row of blocks, with candle's arithmetic (so the same values).
pub fn dequantize_row(format: KFormat, row: &[u8], out: &mut [f32]) {
    let mut c = [0i32; QK_K];
    for (block, out) in row.chunks_exact(format.block_bytes()).zip(out.chunks_exact_mut(QK_K)) {
        codes(format, block, &mut c);
        let s = scales(format, block);
        let d = f16_at(&block[format.d_at()..]);
        if format.has_mins() {
            let dmin = f16_at(&block[2..]);
            for (i, (o, &c)) in out.iter_mut().zip(&c).enumerate() {
                let (d1, m1) = (d * s.sc[i / 32] as f32, dmin * s.m[i / 32] as f32);
                *o = d1 * c as f32 - m1;
            }
        } else {
            for (i, (o, &c)) in out.iter_mut().zip(&c).enumerate() {
                *o = d * s.sc[i / 16] as f32 * (c - 32) as f32;
            }
        }
    }
}

/// Activation rows quantized to llama.cpp's Q8_K: per 256 values `x ≈ d·q`, `q` in
/// -127..=127, and the integer sum of each 16 codes.
#[derive(Debug, Clone)]
pub struct KRows {
    pub k: usize,
    pub rows: usize,
    pub qs: Vec<i8>,
    /// One per super-block.
    pub d: Vec<f32>,
    /// One per 16 codes.
    pub bsums: Vec<i32>,
}

impl KRows {
    /// Quantizes `x` (`rows * k` values; `k` a multiple of 256) as llama.cpp's
    /// `quantize_row_q8_K_ref` does: the scale comes from the value of largest magnitude,
    /// sign included (`d = max / -127`), rounding to nearest with ties to even.
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        debug_assert!(k.is_multiple_of(QK_K) && x.len() == rows * k);
        let nb = rows * k / QK_K;
        let mut out = KRows { k, rows, qs: vec![0; rows * k], d: vec![0.0; nb], bsums: vec![0; nb * 16] };
        for (b, (xb, qb)) in x.chunks_exact(QK_K).zip(out.qs.chunks_exact_mut(QK_K)).enumerate() {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in xb {
                if v.abs() > amax {
                    (amax, max) = (v.abs(), v);
                }
            }
            if amax == 0.0 {
                continue;
            }
            let iscale = -127.0 / max;
            for (q, &v) in qb.iter_mut().zip(xb) {
                // Ties to even by the 1.5 * 2^23 trick (llama.cpp's `nearest_int`).
                const MAGIC: f32 = 12_582_912.0;
                *q = ((iscale * v + MAGIC) - MAGIC).min(127.0) as i8;
            }
            out.d[b] = 1.0 / iscale;
            for (s, q16) in out.bsums[b * 16..(b + 1) * 16].iter_mut().zip(qb.chunks_exact(16)) {
                *s = q16.iter().map(|&q| q as i32).sum();
            }
        }
        out
    }

    /// Super-blocks per row.
    pub fn blocks(&self) -> usize {
        self.k / QK_K
    }
}

/// The exact integer sums of one weight block against one activation super-block: `isum`
/// (the scaled code products, Q6_K's -32 included) and `msum` (Σ_s m_s · Σ q over sub-block
/// `s`; 0 for Q6_K).
pub fn block_sums(format: KFormat, c: &[i32; QK_K], s: &Scales, q: &[i8], bsums: &[i32]) -> (i32, i32) {
    let dot = |from: usize, len: usize| -> i32 { (from..from + len).map(|i| c[i] * q[i] as i32).sum() };
    if format.has_mins() {
        let isum = (0..8).map(|j| s.sc[j] * dot(32 * j, 32)).sum();
        let msum = (0..8).map(|j| s.m[j] * (bsums[2 * j] + bsums[2 * j + 1])).sum();
        (isum, msum)
    } else {
        ((0..16).map(|g| s.sc[g] * (dot(16 * g, 16) - 32 * bsums[g])).sum(), 0)
    }
}

/// The float step after a super-block's integer sums: the order every path follows.
#[inline(always)]
pub fn accumulate(acc: f32, d: f32, dmin: f32, dx: f32, isum: i32, msum: i32) -> f32 {
    let acc = (d * dx).mul_add(isum as f32, acc);
    (-(dmin * dx)).mul_add(msum as f32, acc)
}

/// `y (m, n) = x · Wᵀ` for `w` holding `n` rows of `k / 256` blocks, portable (every target;
/// the definition the SIMD kernel is tested against).
pub fn matmul_portable(format: KFormat, w: &[u8], n: usize, acts: &KRows, y: &mut [f32]) {
    let (m, nb) = (acts.rows, acts.blocks());
    let bb = format.block_bytes();
    assert!(w.len() == n * nb * bb && y.len() == m * n, "K-quant matmul sizes");
    let out = super::SharedOut(y.as_mut_ptr());
    let rows = |range: std::ops::Range<usize>| {
        let mut c = [0i32; QK_K];
        let mut sums = vec![0f32; m];
        for j in range {
            sums.fill(0.0);
            for b in 0..nb {
                let blk = &w[(j * nb + b) * bb..][..bb];
                codes(format, blk, &mut c);
                let s = scales(format, blk);
                let d = f16_at(&blk[format.d_at()..]);
                let dmin = if format.has_mins() { f16_at(&blk[2..]) } else { 0.0 };
                for (r, sum) in sums.iter_mut().enumerate() {
                    let i = r * nb + b;
                    let (isum, msum) =
                        block_sums(format, &c, &s, &acts.qs[i * QK_K..][..QK_K], &acts.bsums[i * 16..][..16]);
                    *sum = accumulate(*sum, d, dmin, acts.d[i], isum, msum);
                }
            }
            for (r, &sum) in sums.iter().enumerate() {
                // SAFETY: r < m and j < n, so the index is inside y; each j belongs to one
                // range alone, so no two threads write one element.
                unsafe { *out.at(r * n + j) = sum };
            }
        }
    };
    super::by_output_rows(n, n * m * acts.k, rows);
}
