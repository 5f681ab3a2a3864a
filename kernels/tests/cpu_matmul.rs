//! Ember's CPU quantized matmul against a plain reference (candle dequantizes the weights,
//! then an f32 matmul), on every code path this CPU has, and the portable path against the
//! SIMD ones. Seeded: the seed is printed, and `EMBER_TEST_SEED=N` replays one.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ember_kernels::cpu::{self, kquant, Format, Isa, KFormat, KRows, Q8Rows, QuantLinear, BLOCK, QK_K};
use rand::{Rng, SeedableRng};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const FORMATS: [(Format, GgmlDType); 4] = [
    (Format::Q4_0, GgmlDType::Q4_0),
    (Format::Q4_1, GgmlDType::Q4_1),
    (Format::Q5_0, GgmlDType::Q5_0),
    (Format::Q8_0, GgmlDType::Q8_0),
];

fn seed() -> u64 {
    let seed = std::env::var("EMBER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
    });
    println!("EMBER_TEST_SEED={seed}");
    seed
}

fn random(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// A random weight matrix quantized by candle, with its dequantized values.
fn weights(rng: &mut impl Rng, dtype: GgmlDType, n: usize, k: usize) -> candle_core::Result<(Arc<QTensor>, Vec<f32>)> {
    let w = Tensor::from_vec(random(rng, n * k, 0.1), (n, k), &Device::Cpu)?;
    let q = QTensor::quantize(&w, dtype)?;
    let deq = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((Arc::new(q), deq))
}

#[test]
fn block_decoding_matches_candle_dequantize() -> TestResult {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    for (format, dtype) in FORMATS {
        let (n, k) = (3, 32 * 5);
        let (q, deq) = weights(&mut rng, dtype, n, k)?;
        let mut ours = vec![0f32; n * k];
        for (row, out) in q.data()?.chunks_exact(k / BLOCK * format.block_bytes()).zip(ours.chunks_exact_mut(k)) {
            cpu::format::dequantize_row(format, row, out);
        }
        assert_eq!(ours, deq, "{format:?}: the block layout is read as candle reads it");
    }
    Ok(())
}

/// `y (m, n)` against the f64 product of the dequantized weights `w (n, k)` and `x (m, k)`, within
/// the bound below: activations quantized to 8 bits per `act_block` values, each off by at
/// most `d / 2` with `d = max|x| of its block / 127`, so `|y - y_ref| <= Σ_i |w_i| * d(i) / 2`;
/// on top of that, f32 rounding of sums of `k` terms in a different order, which
/// `k * 2^-23 * Σ|w_i x_i|` bounds, generously.
fn assert_near_reference(
    w: &[f32],
    x: &[f32],
    (m, n, k): (usize, usize, usize),
    act_block: usize,
    y: &[f32],
    what: &str,
) {
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for j in 0..n {
            let wj = &w[j * k..(j + 1) * k];
            let want: f64 = wj.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mut quant_err = 0f64;
            for (wb, xb) in wj.chunks(act_block).zip(xr.chunks(act_block)) {
                let d = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                quant_err += wb.iter().map(|w| w.abs() as f64).sum::<f64>() * d / 2.0;
            }
            let abs_sum: f64 = wj.iter().zip(xr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let tol = quant_err * 1.001 + k as f64 * f32::EPSILON as f64 * (abs_sum + quant_err) + 1e-30;
            let got = y[r * n + j] as f64;
            assert!((got - want).abs() <= tol, "{what} [{r},{j}]: {got} vs {want} (tol {tol})");
        }
    }
}

/// Every path against the reference on random shapes: odd row counts (not multiples of the
/// 4-row tile), odd output counts, k any multiple of the 32-element block.
///
/// Tolerance, from the format: the weights are exactly the dequantized ones on both sides, so
/// the only approximation is the activation quantization to 8 bits per 32-block
/// ([`assert_near_reference`] gives the bound).
#[test]
fn every_path_matches_dequantize_then_matmul() -> TestResult {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    println!("code paths on this CPU: {:?}", Isa::available());
    for case in 0..40 {
        let (format, dtype) = FORMATS[case % FORMATS.len()];
        let n = rng.random_range(1..70);
        let k = BLOCK * rng.random_range(1..24);
        let m = [1, 2, 3, 4, 5, 7, 9, 16, 17][rng.random_range(0..9)];
        let (q, w) = weights(&mut rng, dtype, n, k)?;
        let x_scale = [1e-3f32, 1.0, 30.0][rng.random_range(0..3)];
        let x = random(&mut rng, m * k, x_scale);
        let bytes = q.data()?;
        for isa in Isa::available() {
            let mut y = vec![0f32; m * n];
            cpu::matmul(isa, format, &bytes, n, &x, m, &mut y);
            let what = format!("seed {seed} case {case} {isa:?} {format:?} m={m} n={n} k={k}");
            assert_near_reference(&w, &x, (m, n, k), BLOCK, &y, &what);
        }
    }
    Ok(())
}

/// The SIMD paths do the same integer arithmetic as the portable one: every block's integer
/// dot product is bit for bit equal, on random block bytes (all code values, all high bits)
/// and activation codes across the whole -127..=127 range. The float sums after it differ
/// only in summation order (eight lanes, then a horizontal add, against one running sum), so
/// whole outputs agree to a few ulps of the sum of absolute terms, checked below.
#[test]
fn simd_paths_agree_with_the_portable_one() -> TestResult {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (format, dtype) in FORMATS {
        for _ in 0..2000 {
            let mut block = vec![0u8; format.block_bytes()];
            rng.fill(&mut block[..]);
            let q: Vec<i8> = (0..BLOCK).map(|_| rng.random_range(-127i8..=127)).collect();
            let want = cpu::scalar::block_isum(format, &block, &q);
            for isa in Isa::available() {
                #[cfg(target_arch = "x86_64")]
                if let Isa::X86(level) = isa {
                    // SAFETY: `Isa::available` lists only levels this CPU has.
                    let got = unsafe { cpu::x86::block_isum(level, format, &block, &q) };
                    assert_eq!(got, want, "seed {seed} {level:?} {format:?} block {block:?} q {q:?}");
                }
                let _ = isa;
            }
        }
        let (n, k, m) = (37, 32 * 13, 11);
        let (q, w) = weights(&mut rng, dtype, n, k)?;
        let x = random(&mut rng, m * k, 2.0);
        let acts = Q8Rows::quantize(&x, m, k);
        let mut base = vec![0f32; m * n];
        cpu::matmul_q8(Isa::Scalar, format, &q.data()?, n, &acts, &mut base);
        for isa in Isa::available() {
            let mut y = vec![0f32; m * n];
            cpu::matmul_q8(isa, format, &q.data()?, n, &acts, &mut y);
            for r in 0..m {
                for j in 0..n {
                    let abs_sum: f32 = (0..k).map(|i| (w[j * k + i] * x[r * k + i]).abs()).sum();
                    let (a, b) = (y[r * n + j], base[r * n + j]);
                    assert!(
                        (a - b).abs() <= 64.0 * f32::EPSILON * (abs_sum + 1e-20),
                        "seed {seed} {isa:?} {format:?}: {a} vs {b}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn quant_linear_takes_batched_shapes_and_declines_what_it_cannot_do() -> TestResult {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let (q, _) = weights(&mut rng, GgmlDType::Q4_1, 40, 96)?;
    let linear = QuantLinear::new(q.clone()).map_err(|_| "Q4_1 is taken")?;
    let x = Tensor::from_vec(random(&mut rng, 2 * 3 * 96, 1.0), (2, 3, 96), &Device::Cpu)?;
    let y = linear.forward(&x)?;
    assert_eq!(y.dims(), &[2, 3, 40]);
    // Row by row gives the same numbers as all rows at once (the tile size does not change them).
    let one = linear.forward(&x.narrow(1, 2, 1)?)?;
    assert_eq!(one.flatten_all()?.to_vec1::<f32>()?, y.narrow(1, 2, 1)?.flatten_all()?.to_vec1::<f32>()?);
    assert!(linear.forward(&Tensor::zeros((1, 95), candle_core::DType::F32, &Device::Cpu)?).is_err());
    // Held by nobody else, the weight is repacked into tiles where the CPU has AVX-512 VNNI:
    // same products up to summation order, same embedding rows exactly.
    let tiled = QuantLinear::new(Arc::new(QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::Q4_1)?))
        .map_err(|_| "Q4_1 is taken")?;
    println!("tiled: {}", tiled.is_tiled());
    let (a, b) = (tiled.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, y.flatten_all()?.to_vec1::<f32>()?);
    for (a, b) in a.iter().zip(&b) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    let ids = Tensor::new(&[3u32, 0, 39], &Device::Cpu)?;
    assert_eq!(
        tiled.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?,
        q.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?
    );
    let (q2k, _) = weights(&mut rng, GgmlDType::Q2K, 4, 256)?;
    assert!(QuantLinear::new(q2k).is_err(), "formats without a kernel stay on candle");
    Ok(())
}

/// The dense kernels (f32, f16, bf16 weights) against candle's f32 matmul of the same weights
/// converted to f32, portable and SIMD. Both sides multiply the exact same f32 values (a
/// half-precision value converts to f32 exactly), so only the summation order differs: the
/// bound is `k * 2^-23 * Σ|w_i x_i|`, the classic worst case of a length-k float sum.
#[test]
fn dense_kernels_match_candle() -> TestResult {
    use candle_core::DType;
    use ember_kernels::cpu::DenseLinear;
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for case in 0..24 {
        let dtype = [DType::F32, DType::F16, DType::BF16][case % 3];
        let (n, k, m) = (rng.random_range(1..50), rng.random_range(1..300), [1, 2, 3, 4, 5, 9, 17][case % 7]);
        let w = Tensor::from_vec(random(&mut rng, n * k, 0.2), (n, k), &Device::Cpu)?.to_dtype(dtype)?;
        let x = Tensor::from_vec(random(&mut rng, m * k, 3.0), (1, m, k), &Device::Cpu)?;
        let w32 = w.to_dtype(DType::F32)?;
        let want = x.broadcast_matmul(&w32.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let abs = x.abs()?.broadcast_matmul(&w32.abs()?.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        for simd in [false, cfg!(target_arch = "x86_64") && DenseLinear::new(&w).is_some()] {
            let Some(layer) = DenseLinear::with_simd(&w, simd) else { continue };
            let got = layer.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            for (i, ((g, w), a)) in got.iter().zip(&want).zip(&abs).enumerate() {
                let tol = 2.0 * k as f32 * f32::EPSILON * a + 1e-30;
                assert!(
                    (g - w).abs() <= tol,
                    "seed {seed} case {case} {dtype:?} simd={simd} m={m} n={n} k={k} [{i}]: {g} vs {w}"
                );
            }
        }
    }
    Ok(())
}

/// The tiled layout (AVX-512 VNNI) holds the file's codes exactly, its SIMD integer dot
/// products equal the portable ones bit for bit (Q8_0's carry the +128 offset, removed later
/// through the activation sums), and whole matmuls meet the same reference bound as above.
#[test]
fn tiled_layout_and_kernel() -> TestResult {
    use ember_kernels::cpu::tiled::{self, Tiled, TILE};
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for case in 0..16 {
        let (format, dtype) = FORMATS[case % FORMATS.len()];
        let (n, k, m) = (rng.random_range(1..60), BLOCK * rng.random_range(1..12), [1, 2, 3, 4, 5, 9, 17][case % 7]);
        let (q, w) = weights(&mut rng, dtype, n, k)?;
        let bytes = q.data()?;
        let t = Tiled::new(format, &bytes, n, k);
        let nb = k / BLOCK;
        let mut c = [0i32; BLOCK];
        for j in 0..n {
            for b in 0..nb {
                cpu::format::codes(format, &bytes[(j * nb + b) * format.block_bytes()..], &mut c);
                assert_eq!(t.codes(j / TILE, b, j % TILE), c, "seed {seed} {format:?} row {j} block {b}");
            }
        }
        let x = random(&mut rng, m * k, 1.0);
        let acts = Q8Rows::quantize(&x, m, k);
        let mut want = vec![0f32; m * n];
        tiled::matmul_q8_scalar(&t, &acts, &mut want);
        let mut base = vec![0f32; m * n];
        cpu::matmul_q8(Isa::Scalar, format, &bytes, n, &acts, &mut base);
        let close = |a: &[f32], b: &[f32], what: &str| {
            for r in 0..m {
                for j in 0..n {
                    let abs_sum: f32 = (0..k).map(|i| (w[j * k + i] * x[r * k + i]).abs()).sum();
                    let (a, b) = (a[r * n + j], b[r * n + j]);
                    assert!(
                        (a - b).abs() <= 64.0 * f32::EPSILON * (abs_sum + 1e-20),
                        "seed {seed} {what} {format:?}: {a} vs {b}"
                    );
                }
            }
        };
        close(&want, &base, "portable tiled vs blocks");
        #[cfg(target_arch = "x86_64")]
        if tiled::avx512::available() {
            for tile in 0..n.div_ceil(TILE) {
                for b in 0..nb {
                    let qa = &acts.qs[b * BLOCK..(b + 1) * BLOCK];
                    // SAFETY: the CPU has the features (checked just above).
                    let got = unsafe { tiled::avx512::record_isums(&t, tile, b, qa) };
                    for (r, got) in got.iter().enumerate().take(n.saturating_sub(tile * TILE).min(TILE)) {
                        let c = t.codes(tile, b, r);
                        let off = if format == Format::Q8_0 { 128 } else { 0 };
                        let exact: i32 = c.iter().zip(qa).map(|(&c, &q)| (c + off) * q as i32).sum();
                        assert_eq!(*got, exact, "seed {seed} {format:?} tile {tile} block {b} row {r}");
                    }
                }
            }
            let mut y = vec![0f32; m * n];
            tiled::matmul_q8(&t, &acts, &mut y);
            close(&y, &want, "AVX-512 tiled vs portable");
        } else {
            println!("AVX-512 VNNI not on this CPU: the tiled SIMD kernel was not tested");
        }
    }
    Ok(())
}

/// The AMX prefill kernel gives the VNNI kernel's floats bit for bit (the same exact integer
/// sums, then the same scale operations in the same order), at row counts around its groups
/// of 16, on weights with a partial last tile.
#[test]
fn amx_kernel_equals_vnni_bit_for_bit() -> TestResult {
    #[cfg(target_arch = "x86_64")]
    {
        use ember_kernels::cpu::{amx, tiled};
        if !amx::available() {
            println!("AMX not on this CPU (or not granted by the OS): the AMX kernel was NOT tested");
            return Ok(());
        }
        let seed = seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (case, m) in [16, 17, 19, 20, 21, 31, 32, 33, 48, 50].into_iter().enumerate() {
            let (format, dtype) = FORMATS[case % FORMATS.len()];
            let (n, k) = (rng.random_range(1..70), BLOCK * rng.random_range(1..20));
            let (q, _) = weights(&mut rng, dtype, n, k)?;
            let t = tiled::Tiled::new(format, &q.data()?, n, k);
            let acts = Q8Rows::quantize(&random(&mut rng, m * k, 1.0), m, k);
            let (mut a, mut v) = (vec![0f32; m * n], vec![0f32; m * n]);
            amx::matmul_q8(&t, &acts, &mut a);
            tiled::matmul_q8_vnni(&t, &acts, &mut v);
            for (i, (a, v)) in a.iter().zip(&v).enumerate() {
                assert_eq!(a.to_bits(), v.to_bits(), "seed {seed} {format:?} n {n} k {k} m {m} at {i}: {a} vs {v}");
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("not x86-64: the AMX kernel was NOT tested");
    Ok(())
}

/// The SIMD activation quantizer gives the portable one's codes and scales bit for bit:
/// random rows, rounding ties (values landing on k + 0.5 after scaling), zero blocks,
/// infinities and NaN.
#[test]
fn activation_quantizer_simd_equals_portable() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let k = 4 * BLOCK;
    for rows in [1, 3, 17] {
        let mut x = random(&mut rng, rows * k, 3.0);
        // Block 0 of row 0: amax 127, so the scale is 1 and every x.5 is a tie.
        for (i, v) in x[..BLOCK].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 - 15.5 };
        }
        x[BLOCK..2 * BLOCK].fill(0.0);
        x[2 * BLOCK + 3] = f32::NAN;
        x[3 * BLOCK + 5] = f32::INFINITY;
        let (fast, slow) = (Q8Rows::quantize(&x, rows, k), Q8Rows::quantize_portable(&x, rows, k));
        assert_eq!(fast.qs, slow.qs, "seed {seed} rows {rows}");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast.d), bits(&slow.d), "seed {seed} rows {rows}");
        assert_eq!(bits(&fast.s), bits(&slow.s), "seed {seed} rows {rows}");
    }
}

/// The SIMD `silu(g) * u` against the portable one (the platform's `exp`): within 8 ulp
/// (the vector `exp` is within 2 ulp of the true value, then an add, a divide and a multiply
/// round once each), at random and extreme inputs; signs, zeros, infinities and NaN as the
/// portable one.
#[test]
fn silu_mul_simd_matches_portable() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut g = random(&mut rng, 1000, 30.0);
    let mut u = random(&mut rng, 1000, 5.0);
    let specials = [0.0, -0.0, 1e-30, -1e-30, 88.0, 89.5, -88.0, -103.0, -120.0, 150.0, f32::INFINITY, f32::NAN];
    g[..specials.len()].copy_from_slice(&specials);
    u[..specials.len()].fill(1.5);
    for n in [1000, 999, 17, 1] {
        let (mut fast, mut slow) = (vec![0f32; n], vec![0f32; n]);
        cpu::act::silu_mul(&g[..n], &u[..n], &mut fast);
        cpu::act::silu_mul_portable(&g[..n], &u[..n], &mut slow);
        for i in 0..n {
            let (a, b) = (fast[i], slow[i]);
            let ok = (a.is_nan() && b.is_nan())
                || a == b
                || (a - b).abs() <= 8.0 * f32::EPSILON * b.abs() + f32::MIN_POSITIVE;
            assert!(ok, "seed {seed}: silu({}) * {} = {a}, portable {b}", g[i], u[i]);
        }
    }
}

const K_FORMATS: [(KFormat, GgmlDType); 3] =
    [(KFormat::Q4K, GgmlDType::Q4K), (KFormat::Q5K, GgmlDType::Q5K), (KFormat::Q6K, GgmlDType::Q6K)];

/// Random block bytes: every code, high bit and scale value occurs. `d` and `dmin` are set to
/// small normal f16 values so that sums stay finite.
fn random_k_blocks(rng: &mut impl Rng, format: KFormat, n: usize, k: usize) -> Vec<u8> {
    let bb = format.block_bytes();
    let mut bytes = vec![0u8; n * k / QK_K * bb];
    rng.fill(&mut bytes[..]);
    for blk in bytes.chunks_exact_mut(bb) {
        for at in if format.has_mins() { vec![0, 2] } else { vec![format.d_at()] } {
            let v = half::f16::from_f32(rng.random_range(1e-4f32..1e-2));
            blk[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    bytes
}

/// The K-quant block layouts are read as candle reads them (the same dequantized values,
/// exactly), and the tiled layout holds the file's codes and scales exactly.
#[test]
fn k_quant_layouts_match_candle() -> TestResult {
    use ember_kernels::cpu::ktiled::{KTiled, TILE};
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (format, dtype) in K_FORMATS {
        let (n, k) = (19, QK_K * 3);
        let (q, deq) = weights(&mut rng, dtype, n, k)?;
        let bytes = q.data()?;
        let mut ours = vec![0f32; n * k];
        for (row, out) in bytes.chunks_exact(k / QK_K * format.block_bytes()).zip(ours.chunks_exact_mut(k)) {
            kquant::dequantize_row(format, row, out);
        }
        assert_eq!(ours, deq, "seed {seed} {format:?}: the block layout is read as candle reads it");
        // Random bytes too (every scale and code value), against the tiled layout.
        let raw = random_k_blocks(&mut rng, format, n, k);
        let t = KTiled::new(format, &raw, n, k);
        let nb = k / QK_K;
        let mut c = [0i32; QK_K];
        for j in 0..n {
            for b in 0..nb {
                let blk = &raw[(j * nb + b) * format.block_bytes()..][..format.block_bytes()];
                kquant::codes(format, blk, &mut c);
                let (tc, ts, _, _) = t.block(j / TILE, b, j % TILE);
                assert_eq!(tc, c, "seed {seed} {format:?} row {j} block {b}: codes");
                assert_eq!(ts, kquant::scales(format, blk), "seed {seed} {format:?} row {j} block {b}: scales");
            }
            let (mut a, mut want) = (vec![0f32; k], vec![0f32; k]);
            t.dequantize_row(j, &mut a);
            kquant::dequantize_row(
                format,
                &raw[j * nb * format.block_bytes()..][..nb * format.block_bytes()],
                &mut want,
            );
            assert_eq!(a, want, "seed {seed} {format:?} row {j}: tiled dequantize");
        }
        let bound = (t.size_in_bytes() as f64) / (raw.len() as f64 * n.div_ceil(TILE) as f64 * TILE as f64 / n as f64);
        assert!(bound <= 1.03, "{format:?}: the tiled layout takes {bound:.3}x the file's bytes");
    }
    Ok(())
}

/// Q8_K activations as llama.cpp makes them: the scale from the signed value of largest
/// magnitude, codes within -127..=127, sums of each 16 codes; dequantized, within half a
/// step of the input.
#[test]
fn k_activations_follow_llama_cpp() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let x = random(&mut rng, 2 * QK_K * 2, 3.0);
    let a = KRows::quantize(&x, 2, QK_K * 2);
    for (b, xb) in x.chunks_exact(QK_K).enumerate() {
        let max = xb.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        assert_eq!(a.d[b], 1.0 / (-127.0 / max));
        for (i, &v) in xb.iter().enumerate() {
            let q = a.qs[b * QK_K + i];
            assert!((-127..=127).contains(&q));
            assert!((a.d[b] * q as f32 - v).abs() <= a.d[b].abs() * 0.5001, "{v} -> {q}");
        }
        for g in 0..16 {
            let sum: i32 = a.qs[b * QK_K + 16 * g..][..16].iter().map(|&q| q as i32).sum();
            assert_eq!(a.bsums[b * 16 + g], sum);
        }
    }
    let zeros = KRows::quantize(&[0.0; QK_K], 1, QK_K);
    assert!(zeros.d[0] == 0.0 && zeros.qs.iter().all(|&q| q == 0));
}

/// K-quant matmuls against the reference (candle dequantizes, f32 matmul), on random shapes,
/// portable and (where the CPU has it) AVX-512 tiled; the two agree bit for bit, since they
/// do the same exact integer sums and then the same fused float steps in the same order.
///
/// Tolerance: as for the 32-blocks above, with the Q8_K step: each activation is off by at
/// most `d / 2`, `d = max|x| / 127` over its 256-block.
#[test]
fn k_quant_kernels_match_dequantize_then_matmul() -> TestResult {
    use ember_kernels::cpu::ktiled::{self, KTiled};
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    #[cfg(target_arch = "x86_64")]
    let simd = ktiled::avx512::available();
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    if !simd {
        println!("AVX-512 VNNI not on this CPU: the K-quant SIMD kernel was not tested");
    }
    for case in 0..24 {
        let (format, dtype) = K_FORMATS[case % K_FORMATS.len()];
        let n = rng.random_range(1..70);
        let k = QK_K * rng.random_range(1..7);
        let m = [1, 2, 3, 4, 5, 7, 9, 16, 17][rng.random_range(0..9)];
        let (q, w) = weights(&mut rng, dtype, n, k)?;
        let x_scale = [1e-3f32, 1.0, 30.0][rng.random_range(0..3)];
        let x = random(&mut rng, m * k, x_scale);
        let acts = KRows::quantize(&x, m, k);
        let bytes = q.data()?;
        let mut y = vec![0f32; m * n];
        kquant::matmul_portable(format, &bytes, n, &acts, &mut y);
        assert_near_reference(
            &w,
            &x,
            (m, n, k),
            QK_K,
            &y,
            &format!("seed {seed} case {case} {format:?} m={m} n={n} k={k}"),
        );
        let t = KTiled::new(format, &bytes, n, k);
        let mut portable_tiled = vec![0f32; m * n];
        ktiled::matmul_portable(&t, &acts, &mut portable_tiled);
        assert_eq!(portable_tiled, y, "seed {seed} case {case} {format:?}: the tiled layout, read portably");
        #[cfg(target_arch = "x86_64")]
        if simd {
            let mut fast = vec![0f32; m * n];
            ktiled::matmul(&t, &acts, &mut fast);
            assert_eq!(fast, y, "seed {seed} case {case} {format:?} m={m} n={n} k={k}: AVX-512 vs portable");
        }
    }
    // Random bytes: every scale, min and code value, signed Q6_K scales included.
    for (format, _) in K_FORMATS {
        let (n, k, m) = (37, QK_K * 2, 6);
        let raw = random_k_blocks(&mut rng, format, n, k);
        let acts = KRows::quantize(&random(&mut rng, m * k, 2.0), m, k);
        let mut y = vec![0f32; m * n];
        kquant::matmul_portable(format, &raw, n, &acts, &mut y);
        #[cfg(target_arch = "x86_64")]
        if simd {
            let mut fast = vec![0f32; m * n];
            ktiled::matmul(&KTiled::new(format, &raw, n, k), &acts, &mut fast);
            assert_eq!(fast, y, "seed {seed} {format:?} random bytes: AVX-512 vs portable");
        }
    }
    Ok(())
}

/// A K-quant `QuantLinear` (tiled where the CPU allows, else declined to candle) gives the
/// same products as the portable kernel on the file's blocks, and the same embedding rows.
#[test]
fn k_quant_linear_layer() -> TestResult {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    for (format, dtype) in K_FORMATS {
        let (q, _) = weights(&mut rng, dtype, 40, QK_K * 2)?;
        let x = Tensor::from_vec(random(&mut rng, 3 * QK_K * 2, 1.0), (1, 3, QK_K * 2), &Device::Cpu)?;
        let ids = Tensor::new(&[3u32, 0, 39], &Device::Cpu)?;
        let want_rows = q.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?;
        let portable = QuantLinear::with_isa(q.clone(), Isa::Scalar).ok_or("the portable path takes K-quants")?;
        let want = portable.forward(&x)?;
        assert_eq!(want.dims(), &[1, 3, 40]);
        drop(portable);
        // Held by nobody else now, so it can be repacked.
        match QuantLinear::new(q) {
            Ok(linear) => {
                println!("{format:?}: {linear:?}");
                assert!(linear.is_tiled(), "a K-quant layer is taken only to be tiled");
                assert_eq!(linear.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
                assert_eq!(linear.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?, want_rows);
            }
            Err(_) => println!("{format:?}: no tiled kernel on this CPU, the layer stays on candle"),
        }
    }
    Ok(())
}

/// A dense layer over borrowed bytes (a memory map, the download's landing area) is the same
/// layer as over a tensor of the same values: the same outputs bit for bit and the same
/// embedding rows; bytes that are not `n * k` aligned values of the dtype are declined.
#[test]
fn dense_layer_over_borrowed_bytes_equals_the_tensor_one() -> TestResult {
    use candle_core::DType;
    use ember_kernels::cpu::{DenseLinear, SharedBytes};
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for case in 0..12 {
        let dtype = [DType::F32, DType::F16, DType::BF16][case % 3];
        let (n, k, m) = (rng.random_range(1..40), rng.random_range(1..200), [1, 3, 4, 17][case % 4]);
        let w = Tensor::from_vec(random(&mut rng, n * k, 0.2), (n, k), &Device::Cpu)?.to_dtype(dtype)?;
        let raw: Vec<u8> = match dtype {
            DType::F32 => w.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => w.flatten_all()?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            _ => w.flatten_all()?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        // Four bytes in front, so the weight's place is aligned for every dtype, and one byte
        // less is not.
        let mut file = vec![0u8; 4];
        file.extend_from_slice(&raw);
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(file);
        let x = Tensor::from_vec(random(&mut rng, m * k, 3.0), (1, m, k), &Device::Cpu)?;
        let ids = Tensor::from_vec(vec![0u32, (n - 1) as u32, (n / 2) as u32], 3, &Device::Cpu)?;
        for simd in [false, cfg!(target_arch = "x86_64") && DenseLinear::new(&w).is_some()] {
            let Some(tensor) = DenseLinear::with_simd(&w, simd) else { continue };
            let bytes = SharedBytes::new(owner.clone(), 4..4 + raw.len()).ok_or("range")?;
            let borrowed = DenseLinear::from_bytes_with_simd(bytes, dtype, n, k, simd).ok_or("declined")?;
            assert!(borrowed.is_borrowed());
            let (a, b) = (tensor.forward(&x)?, borrowed.forward(&x)?);
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?,
                "seed {seed} case {case}"
            );
            let (ea, eb) = (tensor.embedding(&ids)?, borrowed.embedding(&ids)?);
            assert_eq!((ea.dims(), ea.dtype()), (eb.dims(), eb.dtype()));
            let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            assert_eq!(f32s(&ea)?, f32s(&eb)?, "seed {seed} case {case}: embedding");
            assert!(borrowed.embedding(&Tensor::from_vec(vec![n as u32], 1, &Device::Cpu)?).is_err());
            if dtype != DType::F32 || k > 1 {
                let short = SharedBytes::new(owner.clone(), 4..4 + raw.len() - 2).ok_or("range")?;
                assert!(DenseLinear::from_bytes_with_simd(short, dtype, n, k, simd).is_none(), "a short weight");
            }
            let odd = SharedBytes::new(owner.clone(), 3..3 + raw.len()).ok_or("range")?;
            assert!(DenseLinear::from_bytes_with_simd(odd, dtype, n, k, simd).is_none(), "a misaligned weight");
        }
        assert!(SharedBytes::new(owner.clone(), 4..raw.len() + 5).is_none(), "a range past the end");
    }
    Ok(())
}

/// Tiling straight from a file's blocks gives the layer [`QuantLinear::new`] tiles from a
/// `QTensor` of the same blocks: the same outputs bit for bit. Where this CPU has no
/// AVX-512 VNNI tiles, both decline to tile and the test says so.
#[test]
fn tiling_from_file_blocks_equals_tiling_a_qtensor() -> TestResult {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let formats = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K];
    let mut tiled = 0;
    for (case, dtype) in formats.into_iter().enumerate() {
        let block = if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) { QK_K } else { BLOCK };
        let (n, k, m) = (rng.random_range(1..40), block * rng.random_range(1..4), [1, 5, 17][case % 3]);
        let w = Tensor::from_vec(random(&mut rng, n * k, 1.0), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&w, dtype)?;
        let blocks = q.data()?.to_vec();
        let Some(direct) = QuantLinear::tiled_from_blocks(dtype, &blocks, n, k) else {
            let via = QuantLinear::new(Arc::new(q)).ok();
            assert!(via.is_none_or(|l| !l.is_tiled()), "{dtype:?}: new tiles where from_blocks declined");
            continue;
        };
        tiled += 1;
        assert!(direct.is_tiled());
        let via = QuantLinear::new(Arc::new(q)).map_err(|_| "new declined")?;
        let x = Tensor::from_vec(random(&mut rng, m * k, 2.0), (1, m, k), &Device::Cpu)?;
        let (a, b) =
            (via.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, direct.forward(&x)?.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(a, b, "seed {seed} {dtype:?}");
        assert!(QuantLinear::tiled_from_blocks(dtype, &blocks[1..], n, k).is_none(), "short blocks");
    }
    println!("tiled from file blocks on {tiled} of {} formats (0: no AVX-512 VNNI on this CPU)", formats.len());
    Ok(())
}

/// Tiles written over the blocks they come from (what a GGUF download does in memory of its
/// own, `tile_in_place` then `from_tiles`) make the same layer as tiling into new memory, for
/// every 32-weight format with rows a multiple of 16; other row counts and the K-quants, whose
/// tiles would not fit where the blocks were, are declined. Where this CPU has no AVX-512
/// VNNI tiles, everything is declined and the test says so.
#[test]
fn tiles_written_over_their_blocks_equal_tiles_of_their_own() -> TestResult {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut placed = 0;
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4K] {
        let block = if dtype == GgmlDType::Q4K { QK_K } else { BLOCK };
        for n in [16 * rng.random_range(1..4), 16 * rng.random_range(1..4) + rng.random_range(1..16)] {
            let k = block * rng.random_range(1..4);
            let w = Tensor::from_vec(random(&mut rng, n * k, 1.0), (n, k), &Device::Cpu)?;
            let blocks = QTensor::quantize(&w, dtype)?.data()?.to_vec();
            let mut over = blocks.clone();
            let Some(len) = QuantLinear::tiles_in_place_len(dtype, n, k) else {
                assert!(QuantLinear::tile_in_place(dtype, &mut over, n, k).is_none(), "{dtype:?} n {n}");
                assert!(over == blocks, "{dtype:?} n {n}: a declined tile_in_place leaves the blocks");
                assert!(
                    dtype == GgmlDType::Q4K
                        || n % 16 != 0
                        || QuantLinear::tiled_from_blocks(dtype, &blocks, n, k).is_none()
                );
                continue;
            };
            assert_eq!(len, blocks.len(), "{dtype:?}: in place means the blocks' own size");
            assert!(QuantLinear::tile_in_place(dtype, &mut over[1..], n, k).is_none(), "short blocks");
            QuantLinear::tile_in_place(dtype, &mut over, n, k).ok_or("tile_in_place declined")?;
            let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(over);
            let shared = ember_kernels::cpu::SharedBytes::new(owner, 0..len).ok_or("range")?;
            let in_place = QuantLinear::from_tiles(dtype, shared, n, k).ok_or("from_tiles declined")?;
            let own = QuantLinear::tiled_from_blocks(dtype, &blocks, n, k).ok_or("tiled_from_blocks declined")?;
            assert_eq!(in_place.tiles(), own.tiles(), "seed {seed} {dtype:?} n {n} k {k}: the same tiles");
            let x = Tensor::from_vec(random(&mut rng, 3 * k, 2.0), (1, 3, k), &Device::Cpu)?;
            let f = |l: &QuantLinear| l.forward(&x)?.flatten_all()?.to_vec1::<f32>();
            assert_eq!(f(&in_place)?, f(&own)?, "seed {seed} {dtype:?} n {n} k {k}");
            placed += 1;
        }
    }
    println!("tiled in place in {placed} cases (0: no AVX-512 VNNI on this CPU)");
    Ok(())
}
