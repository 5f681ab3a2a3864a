//! Attention on the CPU over plain f32 rows: the rotary embedding applied in place to the
//! projections' outputs, the new keys and values written into the sequence's cache, and each
//! query row's scores, softmax and weighted sum of values, in one pass per head and row.
//!
//! Through candle the same step took about 25 ops per layer (transposes to a head-major
//! layout and back, the cache's `slice_set`, a batched gemm for the scores and one for the
//! values, the mask, the softmax), each allocating its output: about 3 ms of a 17-token
//! SmolLM2 prefill, which does not shrink with threads, against 12-19 ms for every matmul of
//! the pass. Here the rows stay in the projections' layout (`rows x heads x head_dim`), the
//! only buffers are the cache and the output, and the heads and rows split over the thread
//! pool.
//!
//! The arithmetic is written once (`attend_body`), with 16 lanes of partial sums in a fixed
//! order: the AVX-512 build of it (runtime-detected) and the portable one give the same
//! floats bit for bit (tested), as Rust never fuses a multiply and an add on its own.

/// The rotary embedding's tables: row `p` of `cos` and `sin` (`half` values each) holds the
/// angles of position `p`.
#[derive(Debug, Clone, Copy)]
pub struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// Pairs are neighbours (`2i`, `2i + 1`; GGUF's order) instead of halves (`i`,
    /// `i + head_dim / 2`; Hugging Face's).
    pub interleaved: bool,
}

impl Rope<'_> {
    /// Rotates each of the `heads` heads of `head_dim` values in each row of `x`
    /// (`rows x heads x head_dim`), row `r` at position `positions[r]`; the same products and
    /// sums, in the same order, as candle's `rope` and `rope_i`.
    pub fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize]) {
        let half = head_dim / 2;
        assert!(x.len() == positions.len() * heads * head_dim, "rope: rows");
        for (row, &p) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
            let (cos, sin) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (i1, i2) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                    let (a, b) = (head[i1], head[i2]);
                    head[i1] = a * cos[i] - b * sin[i];
                    head[i2] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

/// One layer's cached keys and values for one sequence, f32, token by token in the
/// projections' layout (`tokens x kv_heads x head_dim`): appending a step is one copy of its
/// rows, and a buffer that grows copies only the tokens it holds (never zeroes room ahead).
#[derive(Debug, Default)]
pub struct KvLayer {
    k: Vec<f32>,
    v: Vec<f32>,
    heads: usize,
    head_dim: usize,
}

impl KvLayer {
    pub fn new(heads: usize, head_dim: usize) -> Self {
        Self { heads, head_dim, ..Self::default() }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.k.len() / (self.heads * self.head_dim).max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.k.is_empty()
    }

    /// Appends `t` tokens' keys and values (`t x heads x head_dim`, the projections' layout).
    /// When they do not fit, the buffers grow to `grown` tokens (at least what they must
    /// hold).
    pub fn append(&mut self, k: &[f32], v: &[f32], grown: usize) {
        let row = self.heads * self.head_dim;
        assert!(row > 0 && k.len().is_multiple_of(row) && v.len() == k.len(), "kv append");
        let need = self.k.len() + k.len();
        if need > self.k.capacity() {
            let want = (grown * row).max(need);
            self.k.reserve_exact(want - self.k.len());
            self.v.reserve_exact(want - self.v.len());
        }
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
    }

    /// Key and value `head_dim` values of token `j`, head `g`.
    #[inline(always)]
    fn at(&self, j: usize, g: usize) -> (&[f32], &[f32]) {
        let at = (j * self.heads + g) * self.head_dim;
        (&self.k[at..at + self.head_dim], &self.v[at..at + self.head_dim])
    }
}

/// Causal attention of `t` query rows `q` (`t x heads x head_dim`) at positions
/// `start..start + t` over the `start + t` tokens of `kv` (whose `heads` are the
/// key/value heads; query head `h` reads key/value head `h / (heads / kv_heads)`), each row
/// seeing at most the last `window` tokens when the model has a sliding window. Scores are
/// scaled by `1 / sqrt(head_dim)`; writes `out` (`t x heads x head_dim`).
pub fn attend(q: &[f32], kv: &KvLayer, start: usize, heads: usize, window: Option<usize>, out: &mut [f32]) {
    let d = kv.head_dim;
    let t = q.len() / (heads * d);
    assert!(
        q.len() == t * heads * d
            && out.len() == q.len()
            && kv.heads > 0
            && heads.is_multiple_of(kv.heads)
            && start + t == kv.len(),
        "attention shapes"
    );
    let o = super::SharedOut(out.as_mut_ptr());
    let job = Job { q, kv, start, heads, window, out: o };
    let work = heads * t * (start + t) * d;
    super::by_output_rows(heads * t, work, |items| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F (just checked); each item (head, row) writes only
            // its own `head_dim` outputs, and `by_output_rows` hands each item to one thread.
            unsafe { attend_avx512(&job, items) };
            return;
        }
        // SAFETY: as above.
        unsafe { attend_body(&job, items) };
    });
}

/// [`attend`] on the portable build of the arithmetic, on this thread (tests).
pub fn attend_portable(q: &[f32], kv: &KvLayer, start: usize, heads: usize, window: Option<usize>, out: &mut [f32]) {
    let t = q.len() / (heads * kv.head_dim);
    assert!(out.len() == q.len() && start + t == kv.len(), "attention shapes");
    let job = Job { q, kv, start, heads, window, out: super::SharedOut(out.as_mut_ptr()) };
    // SAFETY: one thread writes every item's outputs, inside `out`.
    unsafe { attend_body(&job, 0..heads * t) };
}

struct Job<'a> {
    q: &'a [f32],
    kv: &'a KvLayer,
    start: usize,
    heads: usize,
    window: Option<usize>,
    out: super::SharedOut,
}

/// # Safety
/// The CPU has AVX-512 F; as [`attend_body`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(job: &Job, items: std::ops::Range<usize>) {
    // SAFETY: the caller's contract.
    unsafe { attend_body(job, items) }
}

/// Items `items` of a [`Job`]: item `i` is query head `i % heads` of row `i / heads`.
///
/// # Safety
/// `job.out` has `q.len()` floats, and no other thread writes the outputs of these items.
#[inline(always)]
unsafe fn attend_body(job: &Job, items: std::ops::Range<usize>) {
    let (kv, d, heads) = (job.kv, job.kv.head_dim, job.heads);
    let group = heads / kv.heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut scores = Vec::new();
    let mut acc = vec![0f32; d];
    for item in items {
        let (row, head) = (item / heads, item % heads);
        let pos = job.start + row;
        let first = job.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let g = head / group;
        let q = &job.q[(row * heads + head) * d..][..d];
        // Plain loops, not iterator adaptors: a closure is a function of its own, which may
        // not be inlined here and then runs without this function's target features.
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in first..=pos {
            let s = dot(q, kv.at(j, g).0) * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (i, j) in (first..=pos).enumerate() {
            let p = scores[i] / sum;
            // Zipped, not indexed: indexing both left a bounds check in the loop, which the
            // compiler then kept scalar (7% of a decode step).
            for (a, v) in acc.iter_mut().zip(kv.at(j, g).1) {
                *a += p * v;
            }
        }
        // SAFETY: the caller's contract: item (row, head)'s outputs are this thread's.
        unsafe { job.out.write((row * heads + head) * d, &acc) };
    }
}

/// `a · b` with 16 lanes of partial sums, added up in a fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ta.iter().zip(tb).enumerate() {
        lanes[l] += x * y;
    }
    // Pairwise, so the compiler keeps the lanes in registers.
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            lanes[l] += lanes[l + w];
        }
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain reference: for each head and row, scores over the visible keys, softmax in
    /// f64, weighted values.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        start: usize,
        heads: usize,
        kv_heads: usize,
        d: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        // keys[g] and values[g] are (tokens x d) for kv head g.
        let t = q.len() / (heads * d);
        let mut out = vec![0f32; q.len()];
        for row in 0..t {
            let pos = start + row;
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let qv = &q[(row * heads + h) * d..][..d];
                let s: Vec<f64> = (first..=pos)
                    .map(|j| {
                        qv.iter().zip(&keys[g][j * d..(j + 1) * d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (i, j) in (first..=pos).enumerate() {
                    for c in 0..d {
                        out[(row * heads + h) * d + c] += (e[i] / sum * values[g][j * d + c] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    /// A small deterministic generator (the values only need to be varied, not random).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn attention_over_the_cache_equals_the_reference_alone_and_in_pieces() {
        // Odd head sizes and counts, grouped heads, a window, a cache that grows.
        for (heads, kv_heads, d, window) in
            [(9, 3, 64, None), (4, 4, 24, None), (6, 2, 40, Some(5)), (2, 1, 17, Some(3))]
        {
            let total = 23;
            let k_rows = values(total * kv_heads * d, 1);
            let v_rows = values(total * kv_heads * d, 2);
            let q_rows = values(total * heads * d, 3);
            let keys: Vec<Vec<f32>> = (0..kv_heads)
                .map(|g| (0..total).flat_map(|j| k_rows[(j * kv_heads + g) * d..][..d].to_vec()).collect())
                .collect();
            let vals: Vec<Vec<f32>> = (0..kv_heads)
                .map(|g| (0..total).flat_map(|j| v_rows[(j * kv_heads + g) * d..][..d].to_vec()).collect())
                .collect();
            let want = reference(&q_rows, &keys, &vals, 0, heads, kv_heads, d, window);
            // The prompt in one piece, then as a 7-token prefill and single-token steps.
            for pieces in [vec![total], [vec![7], vec![1; total - 7]].concat()] {
                let mut kv = KvLayer::new(kv_heads, d);
                let (mut len, mut got) = (0, Vec::new());
                for t in pieces {
                    let (kr, vr) = (
                        &k_rows[len * kv_heads * d..(len + t) * kv_heads * d],
                        &v_rows[len * kv_heads * d..(len + t) * kv_heads * d],
                    );
                    kv.append(kr, vr, (2 * kv.len()).max(4));
                    let q = &q_rows[len * heads * d..(len + t) * heads * d];
                    let mut out = vec![0f32; q.len()];
                    attend(q, &kv, len, heads, window, &mut out);
                    let mut portable = vec![0f32; q.len()];
                    attend_portable(q, &kv, len, heads, window, &mut portable);
                    assert_eq!(out, portable, "SIMD and portable builds differ");
                    got.extend(out);
                    len += t;
                }
                // f32 sums over at most 23 tokens of values in [-1, 1] against f64: a few
                // ulp of the largest value in the sums, far below 1e-5.
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "heads {heads}/{kv_heads} d {d} window {window:?}: value {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn rope_rotates_halves_and_neighbours_as_candle_does() {
        let (heads, d, half) = (3, 8, 4);
        let positions = [0usize, 2, 5];
        let cos: Vec<f32> = (0..6 * half).map(|i| ((i as f32) * 0.1).cos()).collect();
        let sin: Vec<f32> = (0..6 * half).map(|i| ((i as f32) * 0.1).sin()).collect();
        let x = values(positions.len() * heads * d, 7);
        let dev = candle_core::Device::Cpu;
        // candle wants (batch, heads, t, d) and the rows' own cos/sin.
        let xt = candle_core::Tensor::from_vec(x.clone(), (1, 3, heads, d), &dev)
            .and_then(|t| t.transpose(1, 2)?.contiguous())
            .expect("tensor");
        let pick = |tab: &[f32]| -> Vec<f32> {
            positions.iter().flat_map(|&p| tab[p * half..(p + 1) * half].to_vec()).collect()
        };
        let c = candle_core::Tensor::from_vec(pick(&cos), (3, half), &dev).expect("cos");
        let s = candle_core::Tensor::from_vec(pick(&sin), (3, half), &dev).expect("sin");
        for interleaved in [false, true] {
            let want = if interleaved {
                candle_nn::rotary_emb::rope_i(&xt, &c, &s)
            } else {
                candle_nn::rotary_emb::rope(&xt, &c, &s)
            };
            let want: Vec<f32> =
                want.and_then(|t| t.transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1()).expect("candle rope");
            let mut got = x.clone();
            Rope { cos: &cos, sin: &sin, interleaved }.apply(&mut got, heads, d, &positions);
            assert_eq!(got, want, "interleaved {interleaved}");
        }
    }
}
