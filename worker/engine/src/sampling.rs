//! Choosing the next token from the logits: greedy, or temperature with top-k, top-p and a
//! repetition penalty, drawn from a seeded counter-based RNG so a seed reproduces a completion.
//!
//! There is one sampling algorithm in Ember, `ember_kernels::sampling`: the CUDA kernel runs it
//! on a GPU and its CPU implementation runs here, with the same RNG (SplitMix64 of the
//! sequence's seed and the number of tokens it has sampled), so a seeded job picks the same
//! tokens on either device and in any batch.

use serde::{Deserialize, Serialize};

use ember_kernels::sampling::{check_params, sample_row, splitmix64, RowParams, SampleError, GREEDY_BELOW};

use crate::EngineError;

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
    /// The kernel's validator ([`check_params`]), the only one: each rule is its own error so
    /// the message says exactly what to change.
    pub fn validate(&self) -> Result<(), EngineError> {
        check_params(0, &self.row(0)).map_err(sample_error)
    }

    /// Greedy: temperature below [`GREEDY_BELOW`] (0 included), or top-k 1. The OpenAI API
    /// accepts any temperature in [0, 2], so a tiny one is not refused: it is greedy, the
    /// limit sampling tends to (vLLM draws the line at the same 1e-5).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW || self.top_k == 1
    }

    fn row(&self, seed: u64) -> RowParams {
        RowParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed,
        }
    }
}

/// A sampler for one sequence.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    /// Tokens sampled so far: the RNG's counter.
    drawn: u64,
}

impl Sampler {
    /// A sampler with the request's seed, or a random one.
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self { params, seed, drawn: 0 }
    }

    /// This draw's settings for the kernel's sampler, on either device: the sequence's seed is
    /// mixed with the number of tokens sampled so far, so each draw is new and a sequence's
    /// draws do not depend on which batch it ran in. Pass step 0 with them.
    pub fn row_params(&self) -> RowParams {
        self.params.row(splitmix64(self.seed, self.drawn))
    }

    /// Counts a token picked with [`Sampler::row_params`] (by a device-side sampler).
    pub fn drew(&mut self) {
        self.drawn += 1;
    }

    /// Picks the next token on the CPU. `seen` are the tokens the repetition penalty applies
    /// to.
    pub fn sample(&mut self, logits: &[f32], seen: &[u32]) -> Result<u32, EngineError> {
        let token = sample_row(logits, &self.row_params(), seen, 0).map_err(sample_error)?;
        self.drew();
        Ok(token)
    }
}

/// A sampler's error for one row, as the engine's.
pub fn sample_error(e: SampleError) -> EngineError {
    match e {
        SampleError::Params { message, .. } => EngineError::InvalidSampling(message),
        other => EngineError::NumericalError(other.to_string()),
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
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[])?, 1);
        Ok(())
    }

    #[test]
    fn a_seed_reproduces_the_draws() -> Result<(), EngineError> {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| -> Result<Vec<u32>, EngineError> {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..20).map(|_| s.sample(&logits.clone(), &[])).collect()
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
            assert!(k.sample(&logits.clone(), &[])? < 2);
            assert_eq!(p.sample(&logits.clone(), &[])?, 0);
        }
        Ok(())
    }

    #[test]
    fn repetition_penalty_matches_transformers() -> Result<(), EngineError> {
        // Greedy after the penalty: 2.0 / 2 = 1.0 loses to the unpenalized 1.5.
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() });
        assert_eq!(s.sample(&[2.0, -2.0, 1.5], &[0, 1, 1])?, 2);
        assert_eq!(s.sample(&[2.0, -2.0, 0.9], &[0, 1, 1])?, 0);
        Ok(())
    }

    #[test]
    fn non_finite_logits_are_an_error() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for p in [SamplingParams::default(), params(0.8, 0, 1.0, 1)] {
                let mut s = Sampler::new(p);
                assert!(matches!(s.sample(&[0.0, bad], &[]), Err(EngineError::NumericalError(_))), "{bad}");
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
                assert_eq!(s.sample(&logits.clone(), &[])?, 1, "temperature {temperature}");
            }
        }
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1e-38, ..params(0.7, 0, 1.0, 3) });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits.clone(), &[2])?, 2);
        }
        Ok(())
    }

    /// Finding 3: -0.0 and +0.0 tie, and a tie goes to the lower id.
    #[test]
    fn minus_zero_and_plus_zero_tie() -> Result<(), EngineError> {
        for l in [[-0.0f32, 0.0], [0.0, -0.0]] {
            assert_eq!(Sampler::new(SamplingParams::default()).sample(&l.clone(), &[])?, 0);
            assert_eq!(Sampler::new(params(0.5, 1, 1.0, 1)).sample(&l.clone(), &[])?, 0);
            // A tiny top-p keeps the head of the order only: id 0 comes first.
            assert_eq!(Sampler::new(params(1.0, 0, 0.01, 1)).sample(&l.clone(), &[])?, 0);
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
