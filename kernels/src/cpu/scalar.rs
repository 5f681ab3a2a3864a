//! The portable kernel: correct on every target (aarch64 included), and the definition the
//! SIMD paths are tested against.

use super::format::{codes, f16_at, Format, BLOCK};
use super::q8::Q8Rows;

/// Integer dot product of one weight block's codes with one activation block (exact).
pub fn block_isum(format: Format, block: &[u8], q: &[i8]) -> i32 {
    let mut c = [0i32; BLOCK];
    codes(format, block, &mut c);
    c.iter().zip(q).map(|(&c, &q)| c * q as i32).sum()
}

/// `out[r] = Σ_k w[k] * x_r[k]` for one weight row `w` (GGUF blocks) and activation rows
/// `rows` of `acts`.
pub fn row_dots(format: Format, w: &[u8], acts: &Q8Rows, rows: std::ops::Range<usize>, out: &mut [f32]) {
    let nb = acts.blocks();
    let bb = format.block_bytes();
    for (r, o) in rows.zip(out.iter_mut()) {
        let mut sum = 0f32;
        for b in 0..nb {
            let blk = &w[b * bb..(b + 1) * bb];
            let i = r * nb + b;
            let isum = block_isum(format, blk, &acts.qs[i * BLOCK..(i + 1) * BLOCK]);
            let d = f16_at(blk);
            let corr = match format {
                Format::Q4_1 => f16_at(&blk[2..]),
                _ => -(format.bias() as f32) * d,
            };
            sum += d * acts.d[i] * isum as f32 + corr * acts.s[i];
        }
        *o = sum;
    }
}
