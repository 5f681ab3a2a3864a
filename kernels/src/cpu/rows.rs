//! Row-wise work between the matmuls of a CPU forward pass, on plain f32 rows: the residual
//! add and RMSNorm fused in one pass, without the tensor a separate op allocates for each.

/// `x += delta` (when given), then `out = x / sqrt(mean(x²) + eps) * weight`, row by row
/// (`weight.len()` values a row): candle's `rms_norm` to the bit (each row's squares summed in
/// f32 in index order), which the model's candle path runs. Other orders were tried and
/// moved greedy answers on quantized files: activations are rounded to 8-bit codes before
/// each matmul, so a last-bit difference can move a code, and at a near tie the token (16
/// lanes of f32 sums flipped the Q4_1 file's 8th token; llama.cpp's f64 sum flipped two of
/// the Q4_K_M file's ten steps to near ties the other way).
pub fn add_rms_norm(x: &mut [f32], delta: Option<&[f32]>, weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    assert!(n > 0 && x.len().is_multiple_of(n) && out.len() == x.len(), "add_rms_norm shapes");
    if let Some(delta) = delta {
        assert!(delta.len() == x.len(), "add_rms_norm shapes");
        for (x, d) in x.iter_mut().zip(delta) {
            *x += d;
        }
    }
    // Eight rows at a time: each row's sum stays in index order, and the eight chains of
    // dependent adds run side by side (one row alone waits on each add's latency).
    const GROUP: usize = 8;
    for (rows, outs) in x.chunks(GROUP * n).zip(out.chunks_mut(GROUP * n)) {
        let count = rows.len() / n;
        let mut sums = [0f32; GROUP];
        for i in 0..n {
            for (r, sum) in sums.iter_mut().enumerate().take(count) {
                let v = rows[r * n + i];
                *sum += v * v;
            }
        }
        for (r, sum) in sums.iter().enumerate().take(count) {
            let m = (sum / n as f32 + eps).sqrt();
            let (row, out) = (&rows[r * n..(r + 1) * n], &mut outs[r * n..(r + 1) * n]);
            for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
                *o = v / m * w;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_rms_norm_equals_candle_add_then_norm() {
        let (rows, n) = (11, 37);
        let x: Vec<f32> = (0..rows * n).map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0).collect();
        let d: Vec<f32> = (0..rows * n).map(|i| ((i * 104_729) % 97) as f32 / 40.0 - 1.2).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 / n as f32).collect();
        let dev = candle_core::Device::Cpu;
        let t = |v: &[f32], shape: (usize, usize)| candle_core::Tensor::from_slice(v, shape, &dev).expect("tensor");
        let sum = (t(&x, (rows, n)) + t(&d, (rows, n))).expect("add");
        let want: Vec<f32> = candle_nn::ops::rms_norm(&sum, &t(&w, (1, n)).flatten_all().expect("w"), 1e-5)
            .and_then(|t| t.flatten_all()?.to_vec1())
            .expect("candle rms_norm");
        let (mut got_x, mut got) = (x.clone(), vec![0f32; x.len()]);
        add_rms_norm(&mut got_x, Some(&d), &w, 1e-5, &mut got);
        assert_eq!(got_x, sum.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("sum"));
        assert_eq!(got, want, "candle's rms_norm to the bit");
    }
}
