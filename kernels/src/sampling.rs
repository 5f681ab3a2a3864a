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
    #[error("CUDA: {0}")]
    Device(String),
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
    each_row(logits, vocab, params, seen, |l, p| pick_sorted(l, p, step))
}

/// The steps every implementation shares, row by row: the shape, non-finite logits and the
/// settings are checked and the repetition penalty applied to a copy of the row, which `pick`
/// chooses from.
fn each_row(
    logits: &[f32],
    vocab: usize,
    params: &[RowParams],
    seen: &[&[u32]],
    mut pick: impl FnMut(Vec<f32>, &RowParams) -> u32,
) -> Result<Vec<u32>, SampleError> {
    let rows = params.len();
    if vocab == 0 || logits.len() != rows * vocab || seen.len() != rows {
        return Err(SampleError::Shape { len: logits.len(), rows, vocab });
    }
    let mut out = Vec::with_capacity(rows);
    for (row, ((chunk, p), seen)) in logits.chunks(vocab).zip(params).zip(seen).enumerate() {
        if let Some((index, &value)) = chunk.iter().enumerate().find(|(_, l)| !l.is_finite()) {
            return Err(SampleError::NonFinite { row, index, value });
        }
        check_params(row, p)?;
        let mut l = chunk.to_vec();
        penalize(&mut l, p.repetition_penalty, seen);
        out.push(pick(l, p));
    }
    Ok(out)
}

/// The reference: greedy, or sort, cut to top-k, softmax, cut to top-p, draw.
fn pick_sorted(l: Vec<f32>, p: &RowParams, step: u64) -> u32 {
    if p.temperature == 0.0 || p.top_k == 1 {
        return argmax(&l);
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
            return cand[i].0;
        }
    }
    cand[keep - 1].0
}

/// Checks one row's settings; the CUDA wrapper runs it on the host before a launch.
pub fn check_params(row: usize, p: &RowParams) -> Result<(), SampleError> {
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
    Ok(())
}

/// The distinct tokens of `seen` in first-seen order: the penalty applies once per token.
pub fn distinct(seen: &[u32]) -> Vec<u32> {
    let mut done = std::collections::HashSet::with_capacity(seen.len());
    seen.iter().copied().filter(|t| done.insert(*t)).collect()
}

/// Divides positive logits of seen tokens by the penalty and multiplies negative ones, once
/// per distinct token, however often it was seen (as transformers does).
fn penalize(l: &mut [f32], penalty: f32, seen: &[u32]) {
    if penalty == 1.0 {
        return;
    }
    for t in distinct(seen) {
        if let Some(v) = l.get_mut(t as usize) {
            *v = if *v > 0.0 { *v / penalty } else { *v * penalty };
        }
    }
}

/// The order key of a finite value and its token id: the float's order-preserving bits above
/// the inverted id, so a larger key comes first in the reference's sort (larger value, then
/// lower id). The CUDA kernel's `key_of`.
pub fn key_of(v: f32, id: u32) -> u64 {
    let bits = v.to_bits();
    let bits = if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 };
    (u64::from(bits) << 32) | u64::from(u32::MAX - id)
}

fn value_of(key: u64) -> f32 {
    let bits = (key >> 32) as u32;
    f32::from_bits(if bits & 0x8000_0000 != 0 { bits & 0x7FFF_FFFF } else { !bits })
}

fn id_of(key: u64) -> u32 {
    u32::MAX - (key & 0xFFFF_FFFF) as u32
}

/// The largest bound in `lo..=hi` for which `holds` is true, given that it holds at `lo` and,
/// once false, stays false for larger bounds.
fn bisect(mut lo: u64, mut hi: u64, mut holds: impl FnMut(u64) -> bool) -> u64 {
    while lo < hi {
        let mid = lo + (hi - lo) / 2 + 1;
        if holds(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// The algorithm the CUDA kernel runs, step for step, on the CPU: no sort; top-k, top-p and the
/// draw are bisections over order keys of a count or a probability mass, each of which a GPU
/// block computes as one reduction over the row. It must pick what [`sample_batch`] picks
/// (up to float rounding of the sums, which only matters for a draw at a bucket boundary).
pub fn sample_batch_by_keys(
    logits: &[f32],
    vocab: usize,
    params: &[RowParams],
    seen: &[&[u32]],
    step: u64,
) -> Result<Vec<u32>, SampleError> {
    each_row(logits, vocab, params, seen, |l, p| pick_by_keys(l, p, step))
}

/// The kernel's choice: greedy is the largest key, else the bisections.
fn pick_by_keys(mut l: Vec<f32>, p: &RowParams, step: u64) -> u32 {
    let vocab = l.len();
    let key = |(i, v): (usize, &f32)| key_of(*v, i as u32);
    if p.temperature == 0.0 || p.top_k == 1 {
        return l.iter().enumerate().map(key).max().map_or(0, id_of);
    }
    l.iter_mut().for_each(|v| *v /= p.temperature);
    let keys: Vec<u64> = l.iter().enumerate().map(key).collect();
    let best = keys.iter().copied().max().unwrap_or(0);
    let max = value_of(best);
    let mass_ge =
        |bound: u64| -> f32 { keys.iter().zip(&l).filter(|(k, _)| **k >= bound).map(|(_, s)| (s - max).exp()).sum() };
    let kth = if p.top_k > 0 && p.top_k < vocab {
        bisect(0, best, |b| keys.iter().filter(|k| **k >= b).count() >= p.top_k)
    } else {
        0
    };
    let kept_k = mass_ge(kth);
    let cut = if p.top_p < 1.0 { bisect(kth, best, |b| mass_ge(b) >= p.top_p * kept_k) } else { kth };
    let target = uniform(p.seed, step) * mass_ge(cut);
    let chosen = bisect(cut, best, |b| mass_ge(b) > target);
    // `chosen` is always a key: every step of mass_ge ends at one.
    keys.iter().copied().filter(|k| *k >= chosen).min().map_or(0, id_of)
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
