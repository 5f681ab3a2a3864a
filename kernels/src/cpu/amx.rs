//! Prefill on Intel AMX tiles for the 32-block formats (Q4_0, Q4_1, Q5_0, Q8_0), on the same
//! tiled weights as the VNNI kernel ([`super::tiled`]): one `tdpbsud` multiplies 16 activation
//! rows by a record's 16 weight rows over its 32 codes (8,192 multiply-adds, where one
//! `vpdpbusd` does 64). llama.cpp's prefill uses the same unit on these CPUs
//! (`tinygemm_kernel_amx`).
//!
//! Per weight tile and group of 16 activation rows, block by block:
//! - tile A: the group's 32 codes per row, read in place from the quantized activations
//!   (signed bytes, one row per activation row, the row stride being `k`);
//! - tile B: the record's codes, whose VNNI layout is already the layout AMX wants for B
//!   (4 consecutive codes of each of the 16 weight rows side by side): read in place for Q8_0,
//!   from the nibbles unpacked once per weight tile otherwise;
//! - tile C = A x B, exact 32-bit sums, stored to memory; the block scales then apply in
//!   AVX-512 with the same operations, in the same order, as the VNNI kernel, so both give the
//!   same floats bit for bit.
//!
//! Four blocks go through four C tiles before any is read back, so the tile unit is busy while
//! the previous results drain (a tile store read back at once, or a tile load of bytes just
//! written, waits for the stores to retire). A tile pass costs about as much for one row as
//! for sixteen: a last group of up to 8 rows goes to the VNNI kernel, a larger one reads zero
//! rows past the end; fewer than 16 rows in all (a decode step, small batches) stay on the
//! VNNI kernel.
//!
//! Rust has no stable AMX intrinsics or target features: the tile instructions are inline
//! assembly and the CPU is checked through CPUID. Linux also wants each process to ask for the
//! tile state once (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which [`available`] does.

use core::arch::asm;
use core::arch::x86_64::*;
use std::sync::OnceLock;

use super::format::{Format, BLOCK};
use super::q8::Q8Rows;
use super::tiled::{avx512, code_bias, record_bytes, Tiled, TILE};

/// Activation rows per AMX group (the rows of tiles A and C).
pub const GROUP: usize = 16;

/// A last group of at most this many rows goes to the VNNI kernel: a tile pass costs about
/// as much for one row as for sixteen, about eight VNNI rows' worth (n 1536, k 576, one
/// thread: 16 rows 65 us on AMX, 16 + 4 rows 95 us with the 4 on VNNI, 16 + 5 rows 125 us
/// with the 5 on AMX; `examples/matmul_speed.rs`).
const VNNI_ROWS: usize = 8;

/// Blocks in flight: C tiles `tmm0..=3`.
const INFLIGHT: usize = 4;

/// Whether this CPU and OS run the AMX kernel (checked once). `EMBER_CPU_AMX=off` turns it
/// off (the VNNI kernel then runs every row count), to compare the two.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("EMBER_CPU_AMX").is_ok_and(|v| v == "off" || v == "0") {
            return false;
        }
        // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
        let leaf7 = __cpuid_count(7, 0);
        let amx = (leaf7.edx >> 24) & 1 == 1 && (leaf7.edx >> 25) & 1 == 1;
        amx && avx512::available() && request_tile_state()
    })
}

/// Whether a matmul of `rows` activation rows goes to AMX: from one group of 16 on one
/// thread, from two groups on more. On this project's 2-vCPU machines the tile unit did not
/// scale to the second thread (a 128-token Q4_0 prefill: 130-138 ms on 1 thread, 126 ms on
/// 2; the VNNI kernel 179-184 and 135-140 ms), so one group's gain over VNNI (about 1.5x on
/// one thread) is not there to take on two. (16-sequence batched decode of the Q4_K_M file
/// at 2 threads: 333 tok/s with AMX, 386 with `EMBER_CPU_AMX=off`, 341 with this rule; the
/// machine's noise is as large.)
pub fn takes(rows: usize) -> bool {
    let min = if candle_core::utils::get_num_threads() > 1 { 2 * GROUP } else { GROUP };
    rows >= min && available()
}

/// Asks Linux for the AMX tile data state for this process (every thread it has or will
/// have). False when refused (an old kernel, or a sandbox that filters the call).
fn request_tile_state() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only changes which register state the kernel
        // lets this process use; it reads and writes none of our memory.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// The tile configuration (palette 1): C in `tmm0..=3` (16 rows of 16 sums), A in
/// `tmm4`/`tmm5` (16 rows of 32 codes), B in `tmm6`/`tmm7` (8 rows of 4 codes x 16).
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new() -> Self {
        let mut c = Config([0; 64]);
        c.0[0] = 1;
        let mut set = |tmm: usize, rows: usize, colsb: usize| {
            c.0[16 + 2 * tmm..18 + 2 * tmm].copy_from_slice(&(colsb as u16).to_le_bytes());
            c.0[48 + tmm] = rows as u8;
        };
        for tmm in 0..INFLIGHT {
            set(tmm, GROUP, 4 * TILE);
        }
        set(4, GROUP, BLOCK);
        set(5, GROUP, BLOCK);
        set(6, BLOCK / 4, 4 * TILE);
        set(7, BLOCK / 4, 4 * TILE);
        c
    }
}

/// `y (m, n) = x · Wᵀ` for a tiled weight: whole groups of 16 activation rows on AMX, the rest
/// on the VNNI kernel. The CPU must have [`available`].
pub fn matmul_q8(w: &Tiled, acts: &Q8Rows, y: &mut [f32]) {
    assert!(acts.k == w.k && y.len() == acts.rows * w.n && available(), "AMX matmul");
    // What each format adds per activation block through its sum (as the VNNI kernel
    // computes it), once here rather than for every weight tile.
    let corr: Vec<f32> = match w.format {
        Format::Q4_1 => acts.s.clone(),
        f => {
            let bias = code_bias(f);
            acts.s.iter().map(|&s| -bias * s).collect()
        }
    };
    // Tile A always reads 16 rows: the last group's missing rows read zeros here (a 17-row
    // prefill's last row costs a partial epilogue, not a pass of the VNNI kernel).
    let padded = acts.rows.next_multiple_of(GROUP) * acts.k;
    let codes: std::borrow::Cow<[i8]> = if padded == acts.qs.len() {
        std::borrow::Cow::Borrowed(&acts.qs)
    } else {
        let mut c = acts.qs.clone();
        c.resize(padded, 0);
        std::borrow::Cow::Owned(c)
    };
    let out = super::SharedOut(y.as_mut_ptr());
    super::by_output_rows(w.n.div_ceil(TILE), w.n * acts.rows * w.k, |tiles| {
        // SAFETY: `available` checked the CPU, and that Linux granted the tile state; each
        // range of tiles is one thread's alone.
        unsafe { run(w, acts, &codes, &corr, tiles, out) }
    });
}

/// The columns of weight tiles `tiles`, every activation row.
///
/// # Safety
/// [`available`] is true; `out` is `y` (`acts.rows * w.n`), and no other thread writes the
/// columns of these tiles.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
unsafe fn run(
    w: &Tiled,
    acts: &Q8Rows,
    codes: &[i8],
    corr: &[f32],
    tiles: std::ops::Range<usize>,
    out: super::SharedOut,
) {
    let (n, m, nb) = (w.n, acts.rows, w.k / BLOCK);
    let rec_bytes = record_bytes(w.format);
    assert!(
        w.data.len() >= n.div_ceil(TILE) * nb * rec_bytes
            && codes.len() == m.next_multiple_of(GROUP) * w.k
            && corr.len() == m * nb
    );
    let config = Config::new();
    // SAFETY: a valid palette-1 configuration (rows <= 16, bytes per row <= 64) in 64 readable
    // bytes; the CPU has AMX (caller).
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
    let mut unpacked = if w.format == Format::Q8_0 { Vec::new() } else { vec![0u8; nb * 8 * 64] };
    let (mut d16, mut d4) = ([[0f32; TILE]; GROUP], [[0f32; TILE]; 4]);
    let mut b_codes: Vec<*const u8> = Vec::with_capacity(nb);
    for t in tiles {
        let rows = TILE.min(n - t * TILE);
        // `d[r][i]` is activation row r0 + r against weight row 16t + i.
        let write = |r0: usize, d: &[[f32; TILE]]| {
            for (r, d) in d.iter().enumerate() {
                // SAFETY: row r0 + r < m, columns 16t..16t + rows < n: this thread's tile.
                unsafe { out.write((r0 + r) * n + t * TILE, &d[..rows]) };
            }
        };
        // SAFETY: tile t's records are inside `w.data` (asserted above).
        let base = unsafe { w.data.as_ptr().add(t * nb * rec_bytes) };
        // Tile B of block b: Q8_0's codes in place, the others' unpacked once for every group.
        // A plain loop, not a closure: a closure is a function of its own, compiled without
        // this function's target features when it is not inlined, and the unpacking then
        // called the AVX-512 intrinsics out of line (about 7% of a 17-token Q4_0 prefill).
        b_codes.clear();
        for b in 0..nb {
            // SAFETY: record b of tile t is inside `w.data`; `unpacked` has 512 bytes per
            // block; AVX-512 BW is enabled.
            unsafe {
                let rec = base.add(b * rec_bytes);
                if w.format == Format::Q8_0 {
                    b_codes.push(rec.add(32));
                    continue;
                }
                let dst = unpacked.as_mut_ptr().add(b * 512);
                for (g, c) in avx512::codes(w.format, rec).iter().enumerate() {
                    _mm512_storeu_si512(dst.add(64 * g) as *mut _, *c);
                }
                b_codes.push(dst as *const u8);
            }
        }
        for r0 in (0..m).step_by(GROUP) {
            let valid = GROUP.min(m - r0);
            if valid <= VNNI_ROWS {
                for r1 in (r0..m).step_by(4) {
                    let nr = 4.min(m - r1);
                    // SAFETY: the CPU has the VNNI kernel's features (`available` checked them).
                    unsafe { avx512::tile_dots(w, acts, t, r1, nr, &mut d4) };
                    write(r1, &d4[..nr]);
                }
                continue;
            }
            // SAFETY: rows r0..r0 + 16 are inside `codes`, r0..r0 + valid inside `acts`; the
            // tiles are configured above.
            unsafe {
                if valid == GROUP {
                    group::<true>(w, acts, codes, corr, base, &b_codes, r0, valid, &mut d16)
                } else {
                    group::<false>(w, acts, codes, corr, base, &b_codes, r0, valid, &mut d16)
                }
            };
            write(r0, &d16[..valid]);
        }
    }
    // SAFETY: hands the tile state back (context switches save less); no tile is read after.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// One weight tile (records at `base`, tile B of block b at `b_codes[b]`) against activation
/// rows `r0..r0 + valid` (tile A reads 16 rows of `codes`): `out[r][i]` is activation row
/// `r0 + r` dotted with weight row `i`. `FULL` is `valid == 16`, whose epilogue the compiler
/// unrolls with the accumulators in registers.
///
/// # Safety
/// The tiles are configured ([`Config`]); `base` holds the tile's `nb` records; `b_codes[b]`
/// points at 512 readable bytes; `codes` has rows `r0..r0 + 16`, `acts` rows `r0..r0 + valid`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn group<const FULL: bool>(
    w: &Tiled,
    acts: &Q8Rows,
    codes: &[i8],
    corr: &[f32],
    base: *const u8,
    b_codes: &[*const u8],
    r0: usize,
    valid: usize,
    out: &mut [[f32; TILE]; GROUP],
) {
    #[repr(C, align(64))]
    struct Sums([[[i32; TILE]; GROUP]; INFLIGHT]);
    let (nb, k) = (w.k / BLOCK, w.k);
    let rec_bytes = record_bytes(w.format);
    let valid = if FULL { GROUP } else { valid };
    assert!(
        b_codes.len() == nb && codes.len() >= (r0 + GROUP) * k && acts.rows >= r0 + valid && corr.len() == acts.d.len()
    );
    let mut sums = Sums([[[0; TILE]; GROUP]; INFLIGHT]);
    // SAFETY: see the function's contract; activation blocks (r0 + r) * nb + b with r < 16 and
    // b < nb are inside `acts` (asserted).
    unsafe {
        let a = |b: usize| codes.as_ptr().add((r0 * nb + b) * BLOCK);
        let c = sums.0.as_mut_ptr() as *mut u8;
        let mut acc = [_mm512_setzero_ps(); GROUP];
        for b0 in (0..nb).step_by(INFLIGHT) {
            let count = INFLIGHT.min(nb - b0);
            if count == INFLIGHT {
                asm!(
                    "tileloadd tmm4, [{a0} + {k}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tilezero tmm0",
                    "tdpbsud tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{a1} + {k}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tilezero tmm1",
                    "tdpbsud tmm1, tmm5, tmm7",
                    "tileloadd tmm4, [{a2} + {k}*1]",
                    "tileloadd tmm6, [{b2} + {s}*1]",
                    "tilezero tmm2",
                    "tdpbsud tmm2, tmm4, tmm6",
                    "tileloadd tmm5, [{a3} + {k}*1]",
                    "tileloadd tmm7, [{b3} + {s}*1]",
                    "tilezero tmm3",
                    "tdpbsud tmm3, tmm5, tmm7",
                    "tilestored [{c0} + {s}*1], tmm0",
                    "tilestored [{c1} + {s}*1], tmm1",
                    "tilestored [{c2} + {s}*1], tmm2",
                    "tilestored [{c3} + {s}*1], tmm3",
                    a0 = in(reg) a(b0), a1 = in(reg) a(b0 + 1), a2 = in(reg) a(b0 + 2), a3 = in(reg) a(b0 + 3),
                    b0 = in(reg) b_codes[b0], b1 = in(reg) b_codes[b0 + 1],
                    b2 = in(reg) b_codes[b0 + 2], b3 = in(reg) b_codes[b0 + 3],
                    c0 = in(reg) c, c1 = in(reg) c.add(1024), c2 = in(reg) c.add(2048), c3 = in(reg) c.add(3072),
                    k = in(reg) k, s = in(reg) 64usize,
                    options(nostack),
                );
            } else {
                for j in 0..count {
                    asm!(
                        "tileloadd tmm4, [{a} + {k}*1]",
                        "tileloadd tmm6, [{b} + {s}*1]",
                        "tilezero tmm0",
                        "tdpbsud tmm0, tmm4, tmm6",
                        "tilestored [{c} + {s}*1], tmm0",
                        a = in(reg) a(b0 + j), b = in(reg) b_codes[b0 + j], c = in(reg) c.add(1024 * j),
                        k = in(reg) k, s = in(reg) 64usize,
                        options(nostack),
                    );
                }
            }
            for (j, sums) in sums.0[..count].iter().enumerate() {
                let b = b0 + j;
                let rec = base.add(b * rec_bytes);
                // The next tile's record, while this one computes: a prefill streams the
                // weights from memory once, and the unit would otherwise wait for them between
                // tiles. (`prefetch` reads 8 KiB past its argument: one tile is 18 records of
                // 288-544 bytes at k = 576.)
                avx512::prefetch(rec.wrapping_add(nb * rec_bytes).wrapping_sub(avx512::PREFETCH), rec_bytes);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
                let mw = _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(32) as *const __m256i));
                for (r, (acc, isum)) in acc.iter_mut().zip(sums).enumerate().take(valid) {
                    let i = (r0 + r) * nb + b;
                    let isum = _mm512_cvtepi32_ps(_mm512_load_si512(isum.as_ptr() as *const _));
                    let da = _mm512_set1_ps(*acts.d.get_unchecked(i));
                    let corr = _mm512_set1_ps(*corr.get_unchecked(i));
                    *acc = avx512::scale_add(w.format, *acc, isum, dw, mw, da, corr);
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), acc);
        }
    }
}
