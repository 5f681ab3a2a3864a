//! Fused sampling against a plain candle implementation of the same math, on random logits
//! with many seeds, and its edge cases. Every test runs on each implementation present: the
//! CPU reference (a sort), the CUDA kernel's algorithm on the CPU (bisections over order keys),
//! and, in a `cuda` build on a machine with a GPU, the CUDA kernel itself.

use candle_core::{DType, Device, Tensor, D};
use ember_kernels::sampling::{sample_batch, sample_batch_by_keys, uniform, RowParams, SampleError};
use rand::{Rng, SeedableRng};

type Sampler = Box<dyn Fn(&[f32], usize, &[RowParams], &[&[u32]], u64) -> Result<Vec<u32>, SampleError>>;

/// The implementations to test, by name.
fn samplers() -> Vec<(&'static str, Sampler)> {
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut all: Vec<(&'static str, Sampler)> =
        vec![("cpu reference", Box::new(sample_batch)), ("kernel algorithm on cpu", Box::new(sample_batch_by_keys))];
    #[cfg(feature = "cuda")]
    match ember_kernels::cuda::first_device() {
        Some(dev) => all.push((
            "cuda kernel",
            Box::new(move |logits, vocab, params, seen, step| {
                let t = Tensor::from_slice(logits, (params.len(), logits.len() / vocab.max(1)), &dev)
                    .map_err(|e| SampleError::Device(e.to_string()))?;
                ember_kernels::cuda::sample_batch_cuda(&t, params, seen, step)
            }),
        )),
        None => eprintln!("CUDA kernel NOT RUN: this machine has no usable CUDA device"),
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("CUDA kernel NOT RUN: built without the `cuda` feature");
    all
}

/// The same rules written with candle tensor ops. Answers the token, or None when the draw
/// falls within float noise of a boundary between two tokens (the two sides may round
/// differently there).
fn candle_sample(logits: &[f32], p: &RowParams, seen: &[u32], step: u64) -> candle_core::Result<Option<u32>> {
    let dev = Device::Cpu;
    let v = logits.len();
    let mut l = Tensor::new(logits, &dev)?;
    if p.repetition_penalty != 1.0 {
        let mut mask = vec![0u8; v];
        for &t in seen {
            mask[t as usize] = 1;
        }
        let mask = Tensor::new(mask, &dev)?;
        let positive = l.gt(0.0)?;
        let penalized =
            positive.where_cond(&(&l / p.repetition_penalty as f64)?, &(&l * p.repetition_penalty as f64)?)?;
        l = mask.where_cond(&penalized, &l)?;
    }
    if p.temperature == 0.0 || p.top_k == 1 {
        return Ok(Some(l.argmax(D::Minus1)?.to_scalar::<u32>()?));
    }
    let scaled = (l / p.temperature as f64)?;
    let order = scaled.arg_sort_last_dim(false)?;
    let mut sorted = scaled.gather(&order, 0)?;
    let mut ids = order;
    if p.top_k > 0 && p.top_k < v {
        sorted = sorted.narrow(0, 0, p.top_k)?;
        ids = ids.narrow(0, 0, p.top_k)?;
    }
    let max = sorted.max(0)?;
    let exp = sorted.broadcast_sub(&max)?.exp()?;
    let probs = exp.broadcast_div(&exp.sum_all()?)?;
    let cum: Vec<f32> = probs.cumsum(0)?.to_vec1()?;
    let keep =
        if p.top_p < 1.0 { cum.iter().position(|c| *c >= p.top_p).map_or(cum.len(), |i| i + 1) } else { cum.len() };
    let total = cum[keep - 1];
    let target = uniform(p.seed, step) * total;
    if cum[..keep].iter().any(|c| (c - target).abs() < 1e-5)
        || (p.top_p < 1.0 && cum.iter().any(|c| (c - p.top_p).abs() < 1e-5))
    {
        return Ok(None);
    }
    let pick = cum[..keep].iter().position(|c| *c > target).unwrap_or(keep - 1);
    let ids: Vec<u32> = ids.to_dtype(DType::U32)?.to_vec1()?;
    Ok(Some(ids[pick]))
}

#[test]
fn every_implementation_matches_candle_on_random_logits_for_many_seeds() -> Result<(), Box<dyn std::error::Error>> {
    for (name, sample) in samplers() {
        matches_candle(name, &sample)?;
    }
    Ok(())
}

fn matches_candle(name: &str, sample_batch: &Sampler) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (rows, vocab) = (8, 300);
    let (mut compared, mut skipped) = (0, 0);
    for case in 0..200u64 {
        let logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-8.0f32..8.0)).collect();
        let params: Vec<RowParams> = (0..rows)
            .map(|_| RowParams {
                temperature: [0.0, 0.3, 0.7, 1.0, 1.6][rng.random_range(0..5)],
                top_k: [0, 1, 5, 40, 1000][rng.random_range(0..5)],
                top_p: [1.0, 0.95, 0.5, 0.1][rng.random_range(0..4)],
                repetition_penalty: [1.0, 1.3, 0.8][rng.random_range(0..3)],
                seed: rng.random(),
            })
            .collect();
        let seen: Vec<Vec<u32>> =
            (0..rows).map(|_| (0..10).map(|_| rng.random_range(0..vocab as u32)).collect()).collect();
        let seen_refs: Vec<&[u32]> = seen.iter().map(Vec::as_slice).collect();
        let got = sample_batch(&logits, vocab, &params, &seen_refs, case)?;
        for r in 0..rows {
            match candle_sample(&logits[r * vocab..(r + 1) * vocab], &params[r], &seen[r], case)? {
                Some(want) => {
                    assert_eq!(got[r], want, "{name}: case {case}, row {r}, {:?}", params[r]);
                    compared += 1;
                }
                None => skipped += 1,
            }
        }
    }
    assert!(compared > 1500 && skipped < 20, "{name}: compared {compared}, skipped {skipped} at float boundaries");
    Ok(())
}

#[test]
fn edge_cases_on_every_implementation() -> Result<(), Box<dyn std::error::Error>> {
    for (name, sample) in samplers() {
        eprintln!("edge cases: {name}");
        edge_cases(&sample)?;
    }
    Ok(())
}

fn edge_cases(sample_batch: &Sampler) -> Result<(), Box<dyn std::error::Error>> {
    let logits = [0.5f32, 3.0, -1.0, 3.0, 2.9];
    let greedy = RowParams::greedy();
    // Temperature 0 and top-k 1 are greedy; ties go to the lowest id.
    assert_eq!(sample_batch(&logits, 5, &[greedy], &[&[]], 0)?, [1]);
    let top1 = RowParams { temperature: 1.5, top_k: 1, seed: 9, ..greedy };
    assert_eq!(sample_batch(&logits, 5, &[top1], &[&[]], 3)?, [1]);
    // All logits equal: greedy takes id 0; sampling is uniform over the vocabulary.
    let flat = [1.25f32; 64];
    assert_eq!(sample_batch(&flat, 64, &[greedy], &[&[]], 0)?, [0]);
    let mut counts = [0usize; 64];
    for step in 0..6400 {
        let p = RowParams { temperature: 1.0, seed: 5, ..greedy };
        counts[sample_batch(&flat, 64, &[p], &[&[]], step)?[0] as usize] += 1;
    }
    assert!(counts.iter().all(|c| (50..=150).contains(c)), "{counts:?}");
    // top-p 1 keeps every token: the draw can reach the least likely one.
    let spread = [2.0f32, 1.0, 0.0, -1.0];
    let mut seen_last = false;
    for step in 0..2000 {
        let p = RowParams { temperature: 1.0, top_p: 1.0, seed: 11, ..greedy };
        seen_last |= sample_batch(&spread, 4, &[p], &[&[]], step)?[0] == 3;
    }
    assert!(seen_last);
    // A tiny top-p keeps only the head.
    for step in 0..200 {
        let p = RowParams { temperature: 1.0, top_p: 0.01, seed: 11, ..greedy };
        assert_eq!(sample_batch(&spread, 4, &[p], &[&[]], step)?, [0]);
    }
    // The same seed and step give the same token; the repetition penalty moves greedy off a seen token.
    let p = RowParams { temperature: 0.8, top_k: 3, seed: 42, ..greedy };
    assert_eq!(sample_batch(&logits, 5, &[p], &[&[]], 17)?, sample_batch(&logits, 5, &[p], &[&[]], 17)?);
    let penalized = RowParams { repetition_penalty: 2.0, ..greedy };
    assert_eq!(sample_batch(&logits, 5, &[penalized], &[&[1, 3]], 0)?, [4]);
    // Non-finite logits and bad shapes are errors that say where.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let l = [0.0, bad, 1.0];
        assert!(matches!(
            sample_batch(&l, 3, &[greedy], &[&[]], 0),
            Err(SampleError::NonFinite { row: 0, index: 1, .. })
        ));
    }
    assert!(matches!(sample_batch(&logits, 4, &[greedy], &[&[]], 0), Err(SampleError::Shape { .. })));
    let no_p = RowParams { top_p: 0.0, temperature: 1.0, ..greedy };
    assert!(matches!(sample_batch(&logits, 5, &[no_p], &[&[]], 0), Err(SampleError::Params { .. })));
    Ok(())
}
