//! The CPU reference of fused residual add + RMSNorm against candle's add and `rms_norm`.

use candle_core::{Device, Tensor};
use ember_kernels::norm::{add_rms_norm, NormError};
use rand::{Rng, SeedableRng};

#[test]
fn the_reference_matches_candle_on_random_rows_for_many_seeds() -> Result<(), Box<dyn std::error::Error>> {
    for seed in 0..50u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (rows, hidden) = (rng.random_range(1..9), [64, 576, 1000][rng.random_range(0..3)]);
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
