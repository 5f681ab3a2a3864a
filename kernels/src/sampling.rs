//! Fused sampling for a whole batch: repetition penalty, temperature, top-k, top-p and the draw
//! from a seeded counter-based RNG, answering only the chosen token ids.
//!
//! This is the CPU reference of the CUDA kernel: the same steps in the same order, with an RNG
//! a GPU thread can reproduce without state (SplitMix64 of the row's seed and the decode
//! step), so both devices pick the same token from the same logits.
//!
//! Rules, in order, per row:
//! 1. any NaN or infinite logit is an error (it means the model's numbers broke);
//! 2. the repetition penalty divides positive logits of seen tokens and multiplies negative
//!    ones, once per distinct token (the Hugging Face / CTRL rule);
//! 3. temperature 0 or top-k 1 is greedy: the largest logit, the lowest id on ties;
//! 4. otherwise logits are divided by the temperature, sorted (largest first, lower id first
//!    on ties), cut to the top k (0: no cut), turned into probabilities with a softmax, and
//!    cut to the shortest head whose probability reaches top-p (at least one token);
//! 5. the draw: u in [0, 1) from the RNG, the first token whose cumulative probability
//!    exceeds u times the kept total.

/// One row's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// 1 is none.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl RowParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    #[error("row {row}: logit {index} is {value}: the model produced a non-finite number")]
    NonFinite { row: usize, index: usize, value: f32 },
    #[error("logits have {len} values, not rows x vocab = {rows} x {vocab}")]
    Shape { len: usize, rows: usize, vocab: usize },
    #[error("row {row}: {message}")]
    Params { row: usize, message: String },
}

/// SplitMix64: a stateless mix of (seed, counter), as a GPU thread computes it.
pub fn splitmix64(seed: u64, counter: u64) -> u64 {
    let mut z = seed.wrapping_add(counter.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) for `seed` at `step`, from the top 24 bits (exact in f32).
pub fn uniform(seed: u64, step: u64) -> f32 {
    (splitmix64(seed, step) >> 40) as f32 / (1u64 << 24) as f32
}

/// Picks one token per row of `logits` (`rows x vocab`, row-major). `seen[r]` are the tokens
/// the repetition penalty applies to in row `r`; `step` is the decode step (the RNG counter).
pub fn sample_batch(
    logits: &[f32],
    vocab: usize,
    params: &[RowParams],
    seen: &[&[u32]],
    step: u64,
) -> Result<Vec<u32>, SampleError> {
    let rows = params.len();
    if vocab == 0 || logits.len() != rows * vocab || seen.len() != rows {
        return Err(SampleError::Shape { len: logits.len(), rows, vocab });
    }
    let mut out = Vec::with_capacity(rows);
    for (row, ((chunk, p), seen)) in logits.chunks(vocab).zip(params).zip(seen).enumerate() {
        out.push(sample_row(row, chunk, p, seen, step)?);
    }
    Ok(out)
}

fn sample_row(row: usize, logits: &[f32], p: &RowParams, seen: &[u32], step: u64) -> Result<u32, SampleError> {
    if let Some((index, &value)) = logits.iter().enumerate().find(|(_, l)| !l.is_finite()) {
        return Err(SampleError::NonFinite { row, index, value });
    }
    let bad = |message: String| Err(SampleError::Params { row, message });
    if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
        return bad(format!("temperature must be finite and at least 0, got {}", p.temperature));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return bad(format!("top_p must be in (0, 1], got {}", p.top_p));
    }
    if !(p.repetition_penalty > 0.0 && p.repetition_penalty.is_finite()) {
        return bad(format!("repetition_penalty must be positive, got {}", p.repetition_penalty));
    }
    let mut l = logits.to_vec();
    if p.repetition_penalty != 1.0 {
        // Once per distinct token, however often it was seen (as transformers does).
        let mut done = vec![false; l.len()];
        for &t in seen {
            let t = t as usize;
            if t < l.len() && !done[t] {
                done[t] = true;
                l[t] = if l[t] > 0.0 { l[t] / p.repetition_penalty } else { l[t] * p.repetition_penalty };
            }
        }
    }
    if p.temperature == 0.0 || p.top_k == 1 {
        return Ok(argmax(&l));
    }
    let mut cand: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, v)| (i as u32, v / p.temperature)).collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        cand.truncate(p.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f32> = cand.iter().map(|(_, v)| (v - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= sum);
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    let total: f32 = probs[..keep].iter().sum();
    let target = uniform(p.seed, step) * total;
    let mut acc = 0.0;
    for (i, q) in probs[..keep].iter().enumerate() {
        acc += q;
        if acc > target {
            return Ok(cand[i].0);
        }
    }
    Ok(cand[keep - 1].0)
}

/// The largest value's index; the lowest index on ties.
fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in l.iter().enumerate() {
        if *v > l[best] {
            best = i;
        }
    }
    best as u32
}
