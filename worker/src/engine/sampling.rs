//! Choosing the next token from the logits: greedy, or temperature with top-k, top-p and a
//! repetition penalty, drawn from a seeded RNG so a seed reproduces a completion.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use ember_kernels::sampling::{penalized, GREEDY_BELOW};

use crate::error::EngineError;

/// Sampling settings, OpenAI names where OpenAI has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means none; above 1 discourages tokens already seen (prompt and output).
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    /// Each rule is its own error so the message says exactly what to change.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidSampling(m));
        if !self.temperature.is_finite() || !(0.0..=2.0).contains(&self.temperature) {
            return bad(format!("temperature must be between 0 and 2, got {}", self.temperature));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!("repetition_penalty must be positive, got {}", self.repetition_penalty));
        }
        Ok(())
    }

    /// Greedy: temperature below [`GREEDY_BELOW`] (0 included), or top-k 1. The OpenAI API
    /// accepts any temperature in [0, 2], so a tiny one is not refused: it is greedy, the
    /// limit sampling tends to (vLLM draws the line at the same 1e-5). The fused CUDA sampler
    /// follows the same rule (`ember_kernels::sampling`).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW || self.top_k == 1
    }
}

/// A sampler for one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
    device_seed: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let mut rng = match params.seed {
            Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        let device_seed = params.seed.unwrap_or_else(|| rng.random());
        Self { params, rng, device_seed }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed a device-side sampler (counter-based RNG) uses for this sequence: the
    /// request's seed, or a random one.
    pub fn device_seed(&self) -> u64 {
        self.device_seed
    }

    /// Picks the next token. `seen` are the tokens the repetition penalty applies to.
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> Result<u32, EngineError> {
        if let Some((i, v)) = logits.iter().enumerate().find(|(_, l)| !l.is_finite()) {
            return Err(EngineError::NumericalError(format!(
                "the model produced a non-finite logit: {v} at token {i}"
            )));
        }
        if self.params.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, seen, self.params.repetition_penalty);
        }
        if self.params.is_greedy() {
            return Ok(argmax(logits));
        }
        let t = self.params.temperature;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, l)| (i as u32, l / t)).collect();
        // Highest first; ties (-0.0 and +0.0 among them) keep the lower id first so results do
        // not depend on sort order. No NaN is left: the logits are finite and t > 0.
        cand.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0)));
        if !cand.first().is_some_and(|c| c.1.is_finite()) {
            // logit / t overflowed: the limit of sampling as t goes to 0 is greedy.
            return Ok(argmax(logits));
        }
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let max = cand.first().map(|c| c.1).unwrap_or(0.0);
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (p, c) in probs.iter().zip(&cand) {
            acc += p;
            if r < acc {
                return Ok(c.0);
            }
        }
        Ok(cand[probs.len() - 1].0)
    }
}

/// Index of the largest logit, the lowest index on ties (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The CTRL-paper penalty as in transformers: positive logits divided, negative multiplied;
/// a result beyond the f32 range saturates at `±f32::MAX` (as the CUDA sampler does), so a
/// tiny or huge penalty never makes an infinite logit.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        if !done.insert(t) {
            continue;
        }
        if let Some(l) = logits.get_mut(t as usize) {
            *l = penalized(*l, penalty);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed: Some(seed) }
    }

    #[test]
    fn greedy_takes_the_largest_and_the_lowest_on_ties() -> Result<(), EngineError> {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[])?, 1);
        Ok(())
    }

    #[test]
    fn a_seed_reproduces_the_draws() -> Result<(), EngineError> {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| -> Result<Vec<u32>, EngineError> {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..20).map(|_| s.sample(&mut logits.clone(), &[])).collect()
        };
        assert_eq!(draw(7)?, draw(7)?);
        assert_ne!(draw(7)?, draw(8)?);
        Ok(())
    }

    #[test]
    fn top_k_and_top_p_only_draw_from_the_head() -> Result<(), EngineError> {
        let logits = [5.0, 4.9, 0.0, -1.0, -2.0];
        let mut k = Sampler::new(params(1.0, 2, 1.0, 1));
        let mut p = Sampler::new(params(1.0, 0, 0.5, 1));
        for _ in 0..200 {
            assert!(k.sample(&mut logits.clone(), &[])? < 2);
            assert_eq!(p.sample(&mut logits.clone(), &[])?, 0);
        }
        Ok(())
    }

    #[test]
    fn repetition_penalty_matches_transformers() {
        let mut l = [2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0]);
    }

    #[test]
    fn non_finite_logits_are_an_error() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for p in [SamplingParams::default(), params(0.8, 0, 1.0, 1)] {
                let mut s = Sampler::new(p);
                assert!(matches!(s.sample(&mut [0.0, bad], &[]), Err(EngineError::NumericalError(_))), "{bad}");
            }
        }
    }

    /// Issue 20, finding 2: temperature 1e-38 (accepted, as OpenAI accepts 0..2) is greedy,
    /// not the least likely token; so is a tiny penalty's saturated logit.
    #[test]
    fn a_tiny_temperature_or_penalty_gives_the_greedy_token() -> Result<(), EngineError> {
        let logits = [1.0, 5.0, 2.0, -3.0];
        for temperature in [1e-38, 1e-30, 1e-6] {
            assert!(SamplingParams { temperature, ..Default::default() }.validate().is_ok());
            let mut s = Sampler::new(params(temperature, 0, 1.0, 3));
            for _ in 0..20 {
                assert_eq!(s.sample(&mut logits.clone(), &[])?, 1, "temperature {temperature}");
            }
        }
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1e-38, ..params(0.7, 0, 1.0, 3) });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone(), &[2])?, 2);
        }
        Ok(())
    }

    /// Finding 3: -0.0 and +0.0 tie, and a tie goes to the lower id.
    #[test]
    fn minus_zero_and_plus_zero_tie() -> Result<(), EngineError> {
        for l in [[-0.0f32, 0.0], [0.0, -0.0]] {
            assert_eq!(Sampler::new(SamplingParams::default()).sample(&mut l.clone(), &[])?, 0);
            assert_eq!(Sampler::new(params(0.5, 1, 1.0, 1)).sample(&mut l.clone(), &[])?, 0);
            // A tiny top-p keeps the head of the order only: id 0 comes first.
            assert_eq!(Sampler::new(params(1.0, 0, 0.01, 1)).sample(&mut l.clone(), &[])?, 0);
        }
        Ok(())
    }

    #[test]
    fn invalid_settings_are_named() {
        let e = SamplingParams { top_p: 0.0, ..Default::default() }.validate();
        assert!(e.err().is_some_and(|e| e.to_string().contains("top_p")));
        let e = SamplingParams { temperature: -1.0, ..Default::default() }.validate();
        assert!(e.err().is_some_and(|e| e.to_string().contains("temperature")));
    }
}
