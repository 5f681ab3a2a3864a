//! The CPU reference of fused residual add + RMSNorm against candle's add and `rms_norm`.

use candle_core::{Device, Tensor};
use ember_kernels::norm::{add_rms_norm, NormError};
use rand::{Rng, SeedableRng};

#[test]
fn the_reference_matches_candle_on_random_rows_for_many_seeds() -> Result<(), Box<dyn std::error::Error>> {
    for seed in 0..50u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (rows, hidden) = (rng.random_range(1..9), [64, 576, 1000, 1025, 4096][seed as usize % 5]);
        let scale = [1e-3f32, 1.0, 100.0][rng.random_range(0..3)];
        let mut v = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect() };
        let (x, residual, weight) = (v(rows * hidden), v(rows * hidden), v(hidden));
        let (sum, normed) = add_rms_norm(&x, &residual, &weight, 1e-5)?;

        let t = |d: &[f32], shape: (usize, usize)| Tensor::from_slice(d, shape, &Device::Cpu);
        let want_sum = (t(&x, (rows, hidden))? + t(&residual, (rows, hidden))?)?;
        let want = candle_nn::ops::rms_norm(&want_sum, &Tensor::from_slice(&weight, hidden, &Device::Cpu)?, 1e-5)?;
        assert_eq!(sum, want_sum.flatten_all()?.to_vec1::<f32>()?, "seed {seed}: the sum is exact");
        for (i, (a, b)) in normed.iter().zip(want.flatten_all()?.to_vec1::<f32>()?).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "seed {seed}, element {i}: {a} vs {b}");
        }
    }
    Ok(())
}

#[test]
fn zeros_and_bad_input() -> Result<(), Box<dyn std::error::Error>> {
    // An all-zero row stays zero (eps keeps the division finite).
    let (sum, normed) = add_rms_norm(&[0.0; 4], &[0.0; 4], &[1.0; 4], 1e-6)?;
    assert_eq!((sum, normed), (vec![0.0; 4], vec![0.0; 4]));
    assert!(matches!(add_rms_norm(&[0.0; 5], &[0.0; 5], &[1.0; 4], 1e-6), Err(NormError::Shape { .. })));
    assert!(matches!(add_rms_norm(&[0.0; 4], &[0.0; 4], &[1.0; 4], 0.0), Err(NormError::Eps(_))));
    Ok(())
}

/// The devices the tensor op runs on here: the CPU, and a GPU in a `cuda` build that has one.
fn devices() -> Vec<Device> {
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut all = vec![Device::Cpu];
    #[cfg(feature = "cuda")]
    match ember_kernels::cuda::first_device() {
        Some(dev) => all.push(dev),
        None => eprintln!("CUDA kernel NOT RUN: this machine has no usable CUDA device"),
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("CUDA kernel NOT RUN: built without the `cuda` feature");
    all
}

#[test]
fn the_fused_tensor_op_matches_candle_in_every_dtype_on_every_device() -> Result<(), Box<dyn std::error::Error>> {
    use candle_core::DType;
    for dev in devices() {
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::F16, 2e-3), (DType::BF16, 1.6e-2)] {
            for seed in 0..20u64 {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let (batch, rows, hidden) =
                    (rng.random_range(1..3), rng.random_range(1..9), [64, 576, 1000, 1025, 4096][seed as usize % 5]);
                let mut v = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect() };
                let shape = (batch, rows, hidden);
                let x = Tensor::from_vec(v(batch * rows * hidden), shape, &dev)?.to_dtype(dtype)?;
                let r = Tensor::from_vec(v(batch * rows * hidden), shape, &dev)?.to_dtype(dtype)?;
                let w = Tensor::from_vec(v(hidden), hidden, &dev)?.to_dtype(dtype)?;
                let (sum, normed) = ember_kernels::add_rms_norm_tensors(&x, &r, &w, 1e-5)?;
                let want_sum = (&x + &r)?;
                let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5)?;
                assert_eq!(sum.dims(), want_sum.dims());
                assert_eq!(sum.dtype(), dtype);
                let f = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                assert_eq!(f(&sum)?, f(&want_sum)?, "{dev:?} {dtype:?} seed {seed}: the sum is exact");
                for (i, (a, b)) in f(&normed)?.iter().zip(f(&want)?).enumerate() {
                    assert!(
                        (a - b).abs() <= tol * (1.0 + b.abs()),
                        "{dev:?} {dtype:?} seed {seed}, element {i}: {a} vs {b}"
                    );
                }
            }
        }
        // Mismatched shapes are an error, not a wrong answer.
        let x = Tensor::zeros((2, 8), DType::F32, &dev)?;
        let bad = ember_kernels::add_rms_norm_tensors(&x, &x, &Tensor::ones(4, DType::F32, &dev)?, 1e-5);
        assert!(bad.is_err());
    }
    Ok(())
}
