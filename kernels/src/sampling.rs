//! Fused sampling for a whole batch: repetition penalty, temperature, top-k, top-p and the draw
//! from a seeded counter-based RNG, answering one token id (or one error) per row.
//!
//! This is the CPU reference of the CUDA kernel: the same steps in the same order, with an RNG
//! a GPU thread can reproduce without state (SplitMix64 of the row's seed and the decode
//! step), so both devices pick the same token from the same logits.
//!
//! Rules, in order, per row (a row's error never touches the other rows):
//! 1. any NaN or infinite logit is an error for that row (it means the model's numbers broke);
//!    so are settings outside their ranges ([`check_params`]);
//! 2. the repetition penalty divides positive logits of seen tokens and multiplies negative
//!    ones, once per distinct token (the Hugging Face / CTRL rule); a result beyond the f32
//!    range saturates at `±f32::MAX` instead of becoming infinite;
//! 3. greedy (the largest penalized logit, the lowest id on ties) when the temperature is
//!    below [`GREEDY_BELOW`] or top-k is 1;
//! 4. otherwise logits are divided by the temperature; when the largest quotient is not finite
//!    (a temperature so small that `logit / temperature` overflows f32) the row is greedy as in
//!    rule 3, which is the limit the distribution tends to as the temperature goes to 0;
//! 5. tokens are ordered largest first, the lower id first on ties (`-0.0` and `+0.0` are the
//!    same value), each gets the mass `exp(s - max)` in 32.32 fixed point ([`mass_of`]), the
//!    head is cut to the top k (0: no cut), then to the shortest head whose mass reaches
//!    `top_p` times the kept mass (at least one token);
//! 6. the draw: `r`, 24 random bits from the RNG, and the first token whose cumulative mass
//!    exceeds `floor(r * kept / 2^24)`.
//!
//! The masses are integers so that a sum does not depend on the order it is added in: the sort
//! here, the radix select of [`sample_batch_by_keys`] and the kernel's block-wide atomics all
//! get the same sums from the same `exp` values. (A GPU's `expf` may differ from the CPU's in
//! the last bit, so CPU and GPU can differ only on a draw that lands on a token boundary.)
//!
//! The temperature policy follows the OpenAI API, which accepts any temperature in [0, 2]: no
//! value in that range is refused; below [`GREEDY_BELOW`] (vLLM's threshold for the same
//! purpose) the row is greedy, and rule 4 covers what remains (large logits over a small
//! temperature). A tiny repetition penalty saturates by rule 2, so the seen token it pushes
//! up wins, never a NaN.

/// One row's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowParams {
    /// Below [`GREEDY_BELOW`] (0 included) is greedy.
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

    /// Whether the row is greedy by its settings alone (rule 3).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW || self.top_k == 1
    }
}

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`).
pub const GREEDY_BELOW: f32 = 1e-5;

/// The highest temperature accepted: the top of the OpenAI API's range.
pub const MAX_TEMPERATURE: f32 = 2.0;

/// Bits of one radix digit of the kernel's selections: 1,024 buckets, one per thread.
pub const RADIX_BITS: u32 = 10;

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

/// One row's answer: its token, or the error of that row alone.
pub type RowResult = Result<u32, SampleError>;

/// SplitMix64: a stateless mix of (seed, counter), as a GPU thread computes it.
pub fn splitmix64(seed: u64, counter: u64) -> u64 {
    let mut z = seed.wrapping_add(counter.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 24 random bits of the draw for `seed` at `step`.
pub fn random24(seed: u64, step: u64) -> u64 {
    splitmix64(seed, step) >> 40
}

/// The same draw as a uniform in [0, 1) (exact in f32).
pub fn uniform(seed: u64, step: u64) -> f32 {
    random24(seed, step) as f32 / (1u64 << 24) as f32
}

/// A token's mass, `exp(s - max)` in 32.32 fixed point (truncated): at most 2^32, the largest
/// token's. The kernel computes `(unsigned long long)(expf(s - max) * 4294967296.0f)`.
pub fn mass_of(s: f32, max: f32) -> u64 {
    ((s - max).exp() * 4_294_967_296.0) as u64
}

/// The draw's threshold: `floor(r * total / 2^24)`, always below `total`.
fn draw_target(r: u64, total: u64) -> u64 {
    ((u128::from(r) * u128::from(total)) >> 24) as u64
}

/// Whether a head of mass `cum` reaches `top_p` of `kept` (in f64, where both are exact).
fn reaches(cum: u64, top_p: f32, kept: u64) -> bool {
    cum as f64 >= f64::from(top_p) * kept as f64
}

/// Picks one token per row of `logits` (`rows x vocab`, row-major). `seen[r]` are the tokens
/// the repetition penalty applies to in row `r`; `step` is the decode step (the RNG counter).
/// Only a batch of the wrong shape is an error as a whole; otherwise each row answers alone.
pub fn sample_batch(
    logits: &[f32],
    vocab: usize,
    params: &[RowParams],
    seen: &[&[u32]],
    step: u64,
) -> Result<Vec<RowResult>, SampleError> {
    each_row(logits, vocab, params, seen, |l, p| pick_sorted(l, p, step))
}

/// [`sample_batch`] for one row: the CPU batch path samples each sequence this way, so a seed
/// picks the same tokens on the CPU as the CUDA kernel picks on a GPU.
pub fn sample_row(logits: &[f32], params: &RowParams, seen: &[u32], step: u64) -> RowResult {
    let mut rows = sample_batch(logits, logits.len(), std::slice::from_ref(params), &[seen], step)?;
    rows.pop().unwrap_or(Err(SampleError::Shape { len: logits.len(), rows: 1, vocab: logits.len() }))
}

/// The steps every implementation shares, row by row: the shape is checked for the batch;
/// non-finite logits and the settings per row, and the repetition penalty applied to a copy
/// of the row, which `pick` chooses from.
fn each_row(
    logits: &[f32],
    vocab: usize,
    params: &[RowParams],
    seen: &[&[u32]],
    mut pick: impl FnMut(Vec<f32>, &RowParams) -> u32,
) -> Result<Vec<RowResult>, SampleError> {
    let rows = params.len();
    if vocab == 0 || logits.len() != rows * vocab || seen.len() != rows {
        return Err(SampleError::Shape { len: logits.len(), rows, vocab });
    }
    let mut row = |row: usize, chunk: &[f32], p: &RowParams, seen: &[u32]| -> RowResult {
        if let Some((index, &value)) = chunk.iter().enumerate().find(|(_, l)| !l.is_finite()) {
            return Err(SampleError::NonFinite { row, index, value });
        }
        check_params(row, p)?;
        let mut l = chunk.to_vec();
        penalize(&mut l, p.repetition_penalty, seen);
        Ok(pick(l, p))
    };
    Ok(logits
        .chunks(vocab)
        .zip(params)
        .zip(seen)
        .enumerate()
        .map(|(r, ((chunk, p), seen))| row(r, chunk, p, seen))
        .collect())
}

/// The reference: greedy, or sort, masses, cut to top-k, cut to top-p, draw.
fn pick_sorted(l: Vec<f32>, p: &RowParams, step: u64) -> u32 {
    if p.is_greedy() {
        return argmax(&l);
    }
    let mut cand: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, v)| (i as u32, v / p.temperature)).collect();
    // All values are finite or infinite, never NaN; `partial_cmp` holds -0.0 equal to +0.0.
    cand.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0)));
    let max = cand[0].1;
    if !max.is_finite() {
        return argmax(&l);
    }
    if p.top_k > 0 {
        cand.truncate(p.top_k);
    }
    let masses: Vec<u64> = cand.iter().map(|(_, s)| mass_of(*s, max)).collect();
    let mut keep = masses.len();
    if p.top_p < 1.0 {
        let kept: u64 = masses.iter().sum();
        let mut cum = 0;
        for (i, m) in masses.iter().enumerate() {
            cum += m;
            if reaches(cum, p.top_p, kept) {
                keep = i + 1;
                break;
            }
        }
    }
    let total: u64 = masses[..keep].iter().sum();
    let target = draw_target(random24(p.seed, step), total);
    let mut cum = 0;
    for (i, m) in masses[..keep].iter().enumerate() {
        cum += m;
        if cum > target {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
}

/// Checks one row's settings: Ember's one validator of sampling parameters. The engine runs it
/// when a job is validated, the CUDA wrapper on the host before a launch, and every sampler
/// here before it picks.
pub fn check_params(row: usize, p: &RowParams) -> Result<(), SampleError> {
    let bad = |message: String| Err(SampleError::Params { row, message });
    if !(0.0..=MAX_TEMPERATURE).contains(&p.temperature) {
        return bad(format!("temperature must be between 0 and {MAX_TEMPERATURE}, got {}", p.temperature));
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

/// The penalized value of one logit: positive ones divided, others multiplied, saturating at
/// `±f32::MAX` (rule 2). The kernel's `penalized`.
pub fn penalized(v: f32, penalty: f32) -> f32 {
    let r = if v > 0.0 { v / penalty } else { v * penalty };
    r.clamp(-f32::MAX, f32::MAX)
}

/// Applies [`penalized`] to the seen tokens, once per distinct token, however often it was
/// seen (as transformers does).
fn penalize(l: &mut [f32], penalty: f32, seen: &[u32]) {
    if penalty == 1.0 {
        return;
    }
    for t in distinct(seen) {
        if let Some(v) = l.get_mut(t as usize) {
            *v = penalized(*v, penalty);
        }
    }
}

/// Bits the kernel gives the token id in a key: enough for `vocab - 1` (at least 1).
pub fn id_bits(vocab: usize) -> u32 {
    (usize::BITS - vocab.saturating_sub(1).leading_zeros()).max(1)
}

/// The order key of a value and its token id: the float's order-preserving bits above the
/// inverted id (`id_bits` wide), so a larger key comes first in the reference's order (larger
/// value, then lower id). `-0.0` is keyed as `+0.0`. The CUDA kernel's `key_of`.
pub fn key_of(v: f32, id: u32, id_bits: u32) -> u64 {
    let v = if v == 0.0 { 0.0 } else { v };
    let bits = v.to_bits();
    let bits = if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 };
    let id_mask = (1u64 << id_bits) - 1;
    (u64::from(bits) << id_bits) | (id_mask - u64::from(id))
}

fn value_of(key: u64, id_bits: u32) -> f32 {
    let bits = (key >> id_bits) as u32;
    f32::from_bits(if bits & 0x8000_0000 != 0 { bits & 0x7FFF_FFFF } else { !bits })
}

fn id_of(key: u64, id_bits: u32) -> u32 {
    let id_mask = (1u64 << id_bits) - 1;
    (id_mask - (key & id_mask)) as u32
}

/// What a radix select looks for: the first key, in order (largest first), at which the
/// running count or mass of the keys so far meets the rule.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// The count reaches k: the k-th key.
    CountAtLeast(u64),
    /// The mass reaches `top_p` of the kept mass (`None`: the row's whole mass).
    Reaches { top_p: f32, kept: Option<u64> },
    /// The mass exceeds the draw's target over the kept mass (`None`: the whole mass).
    Exceeds { r: u64, kept: Option<u64> },
}

impl Rule {
    /// Fixes the threshold once the row's total mass is known (after the first digit's pass).
    fn holds(self, total: u64) -> impl Fn(u64, u64) -> bool {
        move |count: u64, mass: u64| match self {
            Rule::CountAtLeast(k) => count >= k,
            Rule::Reaches { top_p, kept } => reaches(mass, top_p, kept.unwrap_or(total)),
            Rule::Exceeds { r, kept } => mass > draw_target(r, kept.unwrap_or(total)),
        }
    }
}

/// One row as the kernel holds it: keys and masses, and the passes made over it so far.
struct Row {
    keys: Vec<u64>,
    masses: Vec<u64>,
    key_bits: u32,
    passes: usize,
}

impl Row {
    /// The first key in order at which `rule` holds, and the mass of the keys down to it.
    /// One pass over the row per digit: a histogram of counts and masses of the keys that
    /// match the digits chosen so far, then a scan over the 1,024 buckets from the top (the
    /// kernel's block-wide scan, one bucket per thread) finds the bucket where the rule starts
    /// to hold. The bucket sums are integer additions, so their order does not matter.
    fn select(&mut self, rule: Rule) -> (u64, u64) {
        let digits = self.key_bits.div_ceil(RADIX_BITS);
        let buckets = 1usize << RADIX_BITS;
        let (mut prefix, mut above_count, mut above_mass) = (0u64, 0u64, 0u64);
        let (mut holds, mut own) = (None, 0);
        for level in 0..digits {
            let shift = RADIX_BITS * (digits - 1 - level);
            let (mut count, mut mass) = (vec![0u64; buckets], vec![0u64; buckets]);
            for (k, m) in self.keys.iter().zip(&self.masses) {
                if level == 0 || k >> (shift + RADIX_BITS) == prefix {
                    let d = ((k >> shift) & (buckets as u64 - 1)) as usize;
                    count[d] += 1;
                    mass[d] += m;
                }
            }
            self.passes += 1;
            let holds = holds.get_or_insert_with(|| rule.holds(mass.iter().sum()));
            // The rule fails on the keys above the candidates and holds once they are all in.
            let (mut c, mut w) = (above_count, above_mass);
            let mut chosen = 0;
            for d in (0..buckets).rev() {
                if holds(c + count[d], w + mass[d]) {
                    chosen = d;
                    break;
                }
                c += count[d];
                w += mass[d];
            }
            (above_count, above_mass, own) = (c, w, mass[chosen]);
            prefix = (prefix << RADIX_BITS) | chosen as u64;
        }
        // Every digit is chosen: `prefix` is one key (keys are distinct: ids are), alone in
        // the last bucket, whose mass is its own.
        (prefix, above_mass + own)
    }
}

/// The algorithm the CUDA kernel runs, step for step, on the CPU: no sort; top-k, top-p and the
/// draw are radix selects over order keys (one pass over the row per 10-bit digit) of a count
/// or a mass. It picks exactly what [`sample_batch`] picks.
pub fn sample_batch_by_keys(
    logits: &[f32],
    vocab: usize,
    params: &[RowParams],
    seen: &[&[u32]],
    step: u64,
) -> Result<Vec<RowResult>, SampleError> {
    each_row(logits, vocab, params, seen, |l, p| pick_by_keys(l, p, step).0)
}

/// [`sample_batch_by_keys`] with the number of passes over the vocabulary each row's pick made
/// (the kernel makes the same passes; its first one also checks that every logit is finite).
pub fn count_passes(
    logits: &[f32],
    vocab: usize,
    params: &[RowParams],
    seen: &[&[u32]],
    step: u64,
) -> Result<Vec<usize>, SampleError> {
    let mut passes = Vec::with_capacity(params.len());
    let picked = each_row(logits, vocab, params, seen, |l, p| {
        let (token, n) = pick_by_keys(l, p, step);
        passes.push(n);
        token
    })?;
    if let Some(Err(e)) = picked.into_iter().find(Result::is_err) {
        return Err(e);
    }
    Ok(passes)
}

/// The kernel's choice and its number of passes over the row: greedy is the largest key, else
/// the radix selects.
fn pick_by_keys(mut l: Vec<f32>, p: &RowParams, step: u64) -> (u32, usize) {
    let bits = id_bits(l.len());
    let key = |(i, v): (usize, &f32)| key_of(*v, i as u32, bits);
    // Pass 1: the largest key of the penalized values and, unless greedy, of the scaled ones.
    let best_v = l.iter().enumerate().map(key).max().unwrap_or(0);
    if p.is_greedy() {
        return (id_of(best_v, bits), 1);
    }
    l.iter_mut().for_each(|v| *v /= p.temperature);
    let keys: Vec<u64> = l.iter().enumerate().map(key).collect();
    let max = value_of(keys.iter().copied().max().unwrap_or(0), bits);
    if !max.is_finite() {
        return (id_of(best_v, bits), 1);
    }
    // The kernel computes the masses in the first select's first pass and keeps them.
    let masses = l.iter().map(|s| mass_of(*s, max)).collect();
    let mut row = Row { keys, masses, key_bits: 32 + bits, passes: 1 };
    let kept_k = (p.top_k > 0 && p.top_k < l.len()).then(|| row.select(Rule::CountAtLeast(p.top_k as u64)).1);
    let kept = if p.top_p < 1.0 { Some(row.select(Rule::Reaches { top_p: p.top_p, kept: kept_k }).1) } else { kept_k };
    let (chosen, _) = row.select(Rule::Exceeds { r: random24(p.seed, step), kept });
    (id_of(chosen, bits), row.passes)
}

/// The largest value's index; the lowest index on ties (`-0.0` equals `+0.0`), as
/// `torch.argmax`. Ember's one argmax: greedy decoding everywhere goes through it.
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in l.iter().enumerate() {
        if *v > l[best] {
            best = i;
        }
    }
    best as u32
}
