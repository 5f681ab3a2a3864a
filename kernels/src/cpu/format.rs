//! The GGUF 32-element block formats the CPU kernels read, straight from the file's bytes
//! (candle's `QTensor` keeps them as they are in the file, so nothing is copied or repacked),
//! and the portable scalar code that defines what every SIMD path computes.

/// Elements per block, for every format here.
pub const BLOCK: usize = 32;

/// A weight format the CPU kernels multiply. Each block of 32 weights is one f16 scale `d`
/// (Q4_1 adds an f16 offset `m`) and 32 small integer codes `c`: the weight is
/// `d * (c - bias)` (Q4_0, Q5_0, Q8_0) or `d * c + m` (Q4_1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
}

impl Format {
    /// Bytes per block in the GGUF layout.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q8_0 => 34,
        }
    }

    /// What the codes are offset by (the weight is `d * (c - bias)`). Q8_0 codes are signed
    /// already; Q4_1 has its own per-block offset instead.
    pub const fn bias(self) -> i32 {
        match self {
            Format::Q4_0 => 8,
            Format::Q5_0 => 16,
            Format::Q4_1 | Format::Q8_0 => 0,
        }
    }

    /// The format of a candle quantized dtype, if the kernels read it.
    pub fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        match dtype {
            G::Q4_0 => Some(Format::Q4_0),
            G::Q4_1 => Some(Format::Q4_1),
            G::Q5_0 => Some(Format::Q5_0),
            G::Q8_0 => Some(Format::Q8_0),
            _ => None,
        }
    }
}

/// An f16 stored little-endian at `b[0..2]`.
#[inline(always)]
pub fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// The 32 integer codes of one block (`c`, before the bias), in element order.
pub fn codes(format: Format, block: &[u8], out: &mut [i32; BLOCK]) {
    match format {
        Format::Q4_0 | Format::Q4_1 => {
            let qs = &block[format.block_bytes() - 16..];
            for j in 0..16 {
                out[j] = (qs[j] & 0x0F) as i32;
                out[j + 16] = (qs[j] >> 4) as i32;
            }
        }
        Format::Q5_0 => {
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            let qs = &block[6..22];
            for j in 0..16 {
                out[j] = (qs[j] & 0x0F) as i32 | ((((qh >> j) & 1) << 4) as i32);
                out[j + 16] = (qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) << 4) as i32);
            }
        }
        Format::Q8_0 => {
            for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                *o = q as i8 as i32;
            }
        }
    }
}

/// Dequantizes one row of blocks (the plain reference the tests compare against candle's).
pub fn dequantize_row(format: Format, row: &[u8], out: &mut [f32]) {
    let mut c = [0i32; BLOCK];
    for (block, out) in row.chunks_exact(format.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
        codes(format, block, &mut c);
        let d = f16_at(block);
        let m = if format == Format::Q4_1 { f16_at(&block[2..]) } else { 0.0 };
        for (o, &c) in out.iter_mut().zip(&c) {
            *o = d * (c - format.bias()) as f32 + m;
        }
    }
}
