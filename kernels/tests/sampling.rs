//! Fused sampling against a plain candle implementation of the same math, on random logits
//! with many seeds, and its edge cases. Every test runs on each implementation present: the
//! CPU reference (a sort), the CUDA kernel's algorithm on the CPU (bisections over order keys),
//! and, in a `cuda` build on a machine with a GPU, the CUDA kernel itself.

use candle_core::{DType, Device, Tensor, D};
use ember_kernels::sampling::{
    count_passes, key_of, sample_batch, sample_batch_by_keys, uniform, RowParams, RowResult, SampleError,
};
use rand::{Rng, SeedableRng};

type Sampler = Box<dyn Fn(&[f32], usize, &[RowParams], &[&[u32]], u64) -> Result<Vec<RowResult>, SampleError>>;

/// The vocabularies of Llama 3 (128,256) and SmolLM2 (49,152): rows far wider than a block
/// of 1,024 threads, so every grid-stride loop of the kernel goes round many times.
const REAL_VOCABS: [usize; 2] = [128_256, 49_152];

/// Every row's token, or the first row's error.
fn all_ok(rows: Vec<RowResult>) -> Result<Vec<u32>, SampleError> {
    rows.into_iter().collect()
}

/// Realistic logits: a spread like a language model's (most tokens far below a few likely
/// ones), from a seeded RNG.
fn model_like_logits(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let base = rng.random_range(-12.0f32..2.0);
            if rng.random_range(0..1000) == 0 {
                base + rng.random_range(5.0f32..14.0)
            } else {
                base
            }
        })
        .collect()
}

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
                if logits.len() != params.len() * vocab {
                    return Err(SampleError::Shape { len: logits.len(), rows: params.len(), vocab });
                }
                let t = Tensor::from_slice(logits, (params.len(), vocab), &dev)
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
    if p.is_greedy() {
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
        let got = all_ok(sample_batch(&logits, vocab, &params, &seen_refs, case)?)?;
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

fn edge_cases(per_row: &Sampler) -> Result<(), Box<dyn std::error::Error>> {
    let sample_batch =
        |l: &[f32], v: usize, p: &[RowParams], s: &[&[u32]], step: u64| -> Result<Vec<u32>, SampleError> {
            all_ok(per_row(l, v, p, s, step)?)
        };
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
    // Non-finite logits and bad settings are that row's error, saying where; a bad shape is
    // the batch's.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let l = [0.0, bad, 1.0];
        let got = per_row(&l, 3, &[greedy], &[&[]], 0)?;
        assert!(matches!(got[..], [Err(SampleError::NonFinite { row: 0, index: 1, .. })]), "{got:?}");
    }
    assert!(matches!(per_row(&logits, 4, &[greedy], &[&[]], 0), Err(SampleError::Shape { .. })));
    let no_p = RowParams { top_p: 0.0, temperature: 1.0, ..greedy };
    assert!(matches!(per_row(&logits, 5, &[no_p], &[&[]], 0)?[..], [Err(SampleError::Params { row: 0, .. })]));
    Ok(())
}

/// Finding 1 of issue 20: one row with a non-finite logit (or bad settings) is that row's
/// error; the other rows of the batch are answered, each with the token it gets alone.
#[test]
fn one_bad_row_in_a_batch_of_8_leaves_the_other_7_answered() -> Result<(), Box<dyn std::error::Error>> {
    let seed = 20;
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vocab = 49_152;
    let mut logits = model_like_logits(&mut rng, 8 * vocab);
    logits[3 * vocab + 1234] = f32::NAN;
    logits[6 * vocab + 7] = f32::INFINITY;
    let mut params: Vec<RowParams> =
        (0..8).map(|r| RowParams { temperature: 0.9, top_k: 50, top_p: 0.9, seed: r, ..RowParams::greedy() }).collect();
    params[0] = RowParams::greedy();
    let seen: Vec<&[u32]> = vec![&[1, 2, 3]; 8];
    for (name, sample) in samplers() {
        let got = sample(&logits, vocab, &params, &seen, 5)?;
        assert_eq!(got.len(), 8, "{name}");
        for (r, row) in got.iter().enumerate() {
            match r {
                3 => assert!(matches!(row, Err(SampleError::NonFinite { row: 3, index: 1234, .. })), "{name}: {row:?}"),
                6 => assert!(matches!(row, Err(SampleError::NonFinite { row: 6, index: 7, .. })), "{name}: {row:?}"),
                _ => {
                    let alone = sample(&logits[r * vocab..(r + 1) * vocab], vocab, &params[r..=r], &seen[r..=r], 5)?;
                    assert_eq!(row.as_ref().ok(), alone[0].as_ref().ok(), "{name}: row {r}");
                    assert!(row.is_ok(), "{name}: row {r} {row:?}");
                }
            }
        }
    }
    Ok(())
}

/// Finding 2: a temperature so small that logit / temperature overflows f32 is greedy (it was
/// the least likely kept token: every mass was NaN); so are temperatures below 1e-5. A tiny
/// repetition penalty saturates instead of making an infinite logit, so the seen token it
/// pushes up wins.
#[test]
fn a_tiny_temperature_or_penalty_gives_the_greedy_token() -> Result<(), Box<dyn std::error::Error>> {
    let greedy = RowParams::greedy();
    let logits = [1.0f32, 5.0, 2.0, -3.0];
    for (name, sample) in samplers() {
        for temperature in [1e-38, 1e-30, 1e-6, 9.9e-6] {
            for (top_k, top_p) in [(0, 1.0), (3, 0.9), (0, 0.5)] {
                let p = RowParams { temperature, top_k, top_p, seed: 3, ..greedy };
                for step in 0..20 {
                    assert_eq!(all_ok(sample(&logits, 4, &[p], &[&[]], step)?)?, [1], "{name}: {p:?} step {step}");
                }
            }
        }
        // Penalty 1e-38 on seen token 2 (positive): 2 / 1e-38 overflows; it saturates and wins.
        let p = RowParams { temperature: 0.7, repetition_penalty: 1e-38, seed: 1, ..greedy };
        for step in 0..20 {
            assert_eq!(all_ok(sample(&logits, 4, &[p], &[&[2]], step)?)?, [2], "{name}: step {step}");
        }
        let p = RowParams { temperature: 1e-38, repetition_penalty: 1e-38, ..greedy };
        assert_eq!(all_ok(sample(&logits, 4, &[p], &[&[2]], 0)?)?, [2], "{name}");
        // A huge penalty on a negative seen logit saturates at -f32::MAX: never drawn, no NaN.
        let p = RowParams { temperature: 1.0, repetition_penalty: 1e38, seed: 4, ..greedy };
        for step in 0..50 {
            assert_ne!(all_ok(sample(&logits, 4, &[p], &[&[3]], step)?)?, [3], "{name}: step {step}");
        }
    }
    // At a real vocabulary size, temperature 1e-38 is the argmax.
    let mut rng = rand::rngs::StdRng::seed_from_u64(38);
    let vocab = REAL_VOCABS[0];
    let logits = model_like_logits(&mut rng, vocab);
    let want = all_ok(sample_batch(&logits, vocab, &[greedy], &[&[]], 0)?)?;
    for (name, sample) in samplers() {
        let p = RowParams { temperature: 1e-38, top_k: 40, top_p: 0.95, seed: 9, ..greedy };
        assert_eq!(all_ok(sample(&logits, vocab, &[p], &[&[]], 1)?)?, want, "{name}");
    }
    Ok(())
}

/// Finding 3: -0.0 and +0.0 are the same value, so greedy takes the lower id either way.
#[test]
fn minus_zero_and_plus_zero_tie_and_greedy_picks_id_0() -> Result<(), Box<dyn std::error::Error>> {
    assert!(key_of(-0.0, 0, 1) > key_of(0.0, 1, 1), "-0.0 at id 0 ranks first");
    let greedy = RowParams::greedy();
    let top1 = RowParams { temperature: 0.8, top_k: 1, ..greedy };
    for (name, sample) in samplers() {
        for l in [[-0.0f32, 0.0], [0.0, -0.0]] {
            for p in [greedy, top1] {
                assert_eq!(all_ok(sample(&l, 2, &[p], &[&[]], 0)?)?, [0], "{name}: {l:?} {p:?}");
            }
        }
        // With a temperature the two are equally likely.
        let p = RowParams { temperature: 1.0, seed: 8, ..greedy };
        let ones = (0..400).map(|s| sample(&[-0.0, 0.0], 2, &[p], &[&[]], s)).collect::<Result<Vec<_>, _>>()?;
        let ones = ones.into_iter().filter(|r| r.first() == Some(&Ok(1))).count();
        assert!((150..=250).contains(&ones), "{name}: id 1 drawn {ones} times of 400");
    }
    Ok(())
}

/// The kernel's algorithm (radix selects) picks exactly what the reference (a sort) picks, at
/// real vocabulary sizes: their masses are integers, so no sum depends on its order.
#[test]
fn every_implementation_equals_the_reference_at_real_vocabulary_sizes() -> Result<(), Box<dyn std::error::Error>> {
    let seed = 128_256;
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rows = 8;
    for vocab in REAL_VOCABS {
        for case in 0..6u64 {
            let logits = model_like_logits(&mut rng, rows * vocab);
            let params: Vec<RowParams> = (0..rows)
                .map(|_| RowParams {
                    temperature: [0.0, 0.3, 0.7, 1.0, 1.6, 2.0][rng.random_range(0..6)],
                    top_k: [0, 1, 5, 40, 1000, 200_000][rng.random_range(0..6)],
                    top_p: [1.0, 0.95, 0.5, 0.1][rng.random_range(0..4)],
                    repetition_penalty: [1.0, 1.3, 0.8][rng.random_range(0..3)],
                    seed: rng.random(),
                })
                .collect();
            let seen: Vec<Vec<u32>> =
                (0..rows).map(|_| (0..64).map(|_| rng.random_range(0..vocab as u32)).collect()).collect();
            let seen: Vec<&[u32]> = seen.iter().map(Vec::as_slice).collect();
            let want = all_ok(sample_batch(&logits, vocab, &params, &seen, case)?)?;
            for (name, sample) in samplers() {
                let got = all_ok(sample(&logits, vocab, &params, &seen, case)?)?;
                if name == "cuda kernel" {
                    // The GPU's expf may differ from the CPU's in the last bit: a draw on a
                    // token boundary may go either way, nothing else.
                    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                    assert!(differ <= 1, "{name}: vocab {vocab} case {case}: {got:?} vs {want:?}");
                } else {
                    assert_eq!(got, want, "{name}: vocab {vocab} case {case}, {params:?}");
                }
            }
        }
    }
    Ok(())
}

/// Finding 7: the kernel's algorithm makes at most 16 passes over a 128,256-token row (the
/// bisections made up to about 200). Counted on the CPU, where it runs step for step.
#[test]
fn at_most_16_passes_per_row_at_vocab_128256() -> Result<(), Box<dyn std::error::Error>> {
    let vocab = REAL_VOCABS[0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let logits = model_like_logits(&mut rng, vocab);
    let g = RowParams::greedy();
    let cases = [
        ("greedy", g),
        ("temperature", RowParams { temperature: 0.8, ..g }),
        ("top-k", RowParams { temperature: 0.8, top_k: 40, ..g }),
        ("top-p", RowParams { temperature: 0.8, top_p: 0.9, ..g }),
        ("top-k + top-p", RowParams { temperature: 0.8, top_k: 40, top_p: 0.9, repetition_penalty: 1.2, ..g }),
    ];
    for (name, p) in cases {
        let passes = count_passes(&logits, vocab, &[p], &[&[5, 6]], 0)?;
        eprintln!("vocab {vocab}, {name}: {} passes over the row", passes[0]);
        assert!(passes[0] <= 16, "{name}: {passes:?}");
    }
    let worst = count_passes(&logits, vocab, &[cases[4].1], &[&[]], 0)?;
    assert_eq!(worst, [16], "1 pass for the max, then 5 digits for each of top-k, top-p and the draw");
    Ok(())
}
