//! Times one quantized matmul shape on every code path (GMAC/s), to see where a model's time
//! goes: `cargo run --release -p ember-kernels --example matmul_speed -- q4_1 1536 576 1`.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ember_kernels::cpu::{self, Format, Isa};

/// Times `f` (one matmul of `n * k * m` multiply-adds) and prints its rate.
fn time(
    what: &str,
    n: usize,
    k: usize,
    m: usize,
    mut f: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let iters = (2e9 / (n * k * m) as f64).ceil() as usize;
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    let s = t0.elapsed().as_secs_f64() / iters as f64;
    println!("{what} n={n} k={k} m={m}: {:.1} us, {:.2} GMAC/s", s * 1e6, (n * k * m) as f64 / s / 1e9);
    Ok(())
}

/// The K-quant kernels (tiled AVX-512, portable) against candle's on one shape.
fn k_quant(
    (format, dtype): (cpu::KFormat, GgmlDType),
    n: usize,
    k: usize,
    m: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
    let q = QTensor::quantize(&w, dtype)?;
    let bytes = q.data()?.to_vec();
    let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; m * n];
    #[cfg(target_arch = "x86_64")]
    if cpu::ktiled::avx512::available() {
        let t = cpu::ktiled::KTiled::new(format, &bytes, n, k);
        time(&format!("tiled AVX-512 {format:?}"), n, k, m, || {
            cpu::ktiled::matmul(&t, &cpu::KRows::quantize(&x, m, k), &mut y);
            Ok(())
        })?;
    }
    time(&format!("portable {format:?}"), n, k, m, || {
        cpu::kquant::matmul_portable(format, &bytes, n, &cpu::KRows::quantize(&x, m, k), &mut y);
        Ok(())
    })?;
    let qm = candle_core::quantized::QMatMul::from_qtensor(q)?;
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
    time(&format!("candle {format:?}"), n, k, m, || {
        candle_core::Module::forward(&qm, &xt)?;
        Ok(())
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let name = args.first().map(String::as_str).unwrap_or("q4_1");
    #[cfg(target_arch = "x86_64")]
    if name == "model" {
        return match args.get(1).map(String::as_str) {
            Some("q4_0") => model_stream(Format::Q4_0, GgmlDType::Q4_0),
            Some("q4_1") => model_stream(Format::Q4_1, GgmlDType::Q4_1),
            _ => model_stream(Format::Q8_0, GgmlDType::Q8_0),
        };
    }
    if let Some(kf) = match name {
        "q4_k" => Some((cpu::KFormat::Q4K, GgmlDType::Q4K)),
        "q5_k" => Some((cpu::KFormat::Q5K, GgmlDType::Q5K)),
        "q6_k" => Some((cpu::KFormat::Q6K, GgmlDType::Q6K)),
        _ => None,
    } {
        return k_quant(kf, arg(1, 576), arg(2, 1536), arg(3, 1));
    }
    let (format, dtype) = match name {
        "q4_0" => (Format::Q4_0, GgmlDType::Q4_0),
        "q5_0" => (Format::Q5_0, GgmlDType::Q5_0),
        "q8_0" => (Format::Q8_0, GgmlDType::Q8_0),
        _ => (Format::Q4_1, GgmlDType::Q4_1),
    };
    let (n, k, m) = (arg(1, 1536), arg(2, 576), arg(3, 1));
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
    let q = QTensor::quantize(&w, dtype)?;
    let bytes = q.data()?;
    let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; m * n];
    for isa in Isa::available() {
        let iters = (2e9 / (n * k * m) as f64).ceil() as usize;
        let t0 = Instant::now();
        for _ in 0..iters {
            cpu::matmul(isa, format, &bytes, n, &x, m, &mut y);
        }
        let s = t0.elapsed().as_secs_f64() / iters as f64;
        println!("{isa:?} {format:?} n={n} k={k} m={m}: {:.1} us, {:.2} GMAC/s", s * 1e6, (n * k * m) as f64 / s / 1e9);
    }
    #[cfg(target_arch = "x86_64")]
    if cpu::tiled::avx512::available() {
        let t = cpu::tiled::Tiled::new(format, &bytes, n, k);
        time(&format!("tiled AVX-512 VNNI {format:?}"), n, k, m, || {
            cpu::tiled::matmul_q8_vnni(&t, &cpu::Q8Rows::quantize(&x, m, k), &mut y);
            Ok(())
        })?;
        if cpu::amx::available() && m >= cpu::amx::GROUP {
            time(&format!("tiled AMX {format:?}"), n, k, m, || {
                cpu::amx::matmul_q8(&t, &cpu::Q8Rows::quantize(&x, m, k), &mut y);
                Ok(())
            })?;
        } else {
            println!("AMX: not on this CPU, or fewer than {} rows", cpu::amx::GROUP);
        }
    }
    drop(bytes);
    let qm = candle_core::quantized::QMatMul::from_qtensor(q)?;
    let xt = Tensor::from_vec(x, (m, k), &Device::Cpu)?;
    let t0 = Instant::now();
    let iters = (2e9 / (n * k * m) as f64).ceil() as usize;
    for _ in 0..iters {
        candle_core::Module::forward(&qm, &xt)?;
    }
    let s = t0.elapsed().as_secs_f64() / iters as f64;
    println!("candle {format:?}: {:.1} us, {:.2} GMAC/s", s * 1e6, (n * k * m) as f64 / s / 1e9);
    Ok(())
}

/// Decode through a SmolLM2-135M-shaped stack of tiled matrices (30 layers, a Q8_0 head), m = 1,
/// one thread's worth of the per-token weight stream: `matmul_speed model q8_0`.
#[cfg(target_arch = "x86_64")]
pub fn model_stream(format: Format, dtype: GgmlDType) -> Result<(), Box<dyn std::error::Error>> {
    let shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    let mut mats = Vec::new();
    let mut proto = Vec::new();
    for &(n, k) in &shapes {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        proto.push((n, k, QTensor::quantize(&w, dtype)?.data()?.to_vec()));
    }
    for _ in 0..30 {
        for (n, k, b) in &proto {
            mats.push(cpu::tiled::Tiled::new(format, b, *n, *k));
        }
    }
    // The head in Q8_0, as in the GGUF files of every 32-block format here.
    let w = Tensor::randn(0f32, 1.0, (49152, 576), &Device::Cpu)?;
    mats.push(cpu::tiled::Tiled::new(Format::Q8_0, &QTensor::quantize(&w, GgmlDType::Q8_0)?.data()?, 49152, 576));
    let bytes: usize = mats.iter().map(|m| m.size_in_bytes()).sum();
    let x: Vec<f32> = (0..1536).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; 49152];
    let (mut best, mut total) = (f64::MAX, 0.0);
    for _ in 0..50 {
        let t0 = Instant::now();
        for m in &mats {
            let a = cpu::Q8Rows::quantize(&x[..m.k], 1, m.k);
            cpu::tiled::matmul_q8_vnni(m, &a, &mut y[..m.n]);
        }
        best = best.min(t0.elapsed().as_secs_f64());
        total += t0.elapsed().as_secs_f64();
    }
    println!(
        "{format:?} model stream: best {:.2} ms a token ({:.2} GB/s), mean {:.2} ms ({} MB)",
        best * 1e3,
        bytes as f64 / best / 1e9,
        total / 50.0 * 1e3,
        bytes >> 20
    );
    Ok(())
}
