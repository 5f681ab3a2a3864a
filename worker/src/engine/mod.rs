//! The generation engine: prompt rendering, prefill then decode with a KV cache, sampling,
//! stop conditions, and the OpenAI-shaped result with usage counts.

pub mod sampling;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ember_model_loader::{LoadedModel, Message, SeqCache};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
pub use sampling::{Sampler, SamplingParams};

/// What to complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// Rendered through the model's chat template.
    Chat(Vec<Message>),
    /// Used as it is.
    Text(String),
}

/// One generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these.
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Where the time of one generation went.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct GenerationTimings {
    pub prefill_s: f64,
    pub decode_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    #[serde(skip)]
    pub timings: GenerationTimings,
}

/// A loaded model and what it needs to turn requests into completions.
pub struct Engine {
    pub loaded: LoadedModel,
    eos: Vec<u32>,
}

impl Engine {
    pub fn new(loaded: LoadedModel) -> Self {
        let mut eos = loaded.config().eos_token_ids.clone();
        // Chat models end a turn with their template's end token even when config.json
        // names another EOS (ChatML's <|im_end|>, Llama 3's <|eot_id|>).
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"] {
            if let Some(id) = loaded.tokenizer.token_to_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Self { loaded, eos }
    }

    pub fn context_length(&self) -> usize {
        self.loaded.config().max_position_embeddings
    }

    /// The token ids of the prompt, as the model sees them.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let text = match prompt {
            Prompt::Chat(messages) if messages.is_empty() => return Err(EngineError::EmptyPrompt),
            Prompt::Chat(messages) => self.loaded.chat_template.render(messages)?,
            Prompt::Text(t) if t.is_empty() => return Err(EngineError::EmptyPrompt),
            Prompt::Text(t) => t.clone(),
        };
        // Templates write their special tokens as text; adding them again would double BOS.
        let enc = self.loaded.tokenizer.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, tokens: &[u32]) -> Result<String, EngineError> {
        self.loaded.tokenizer.decode(tokens, true).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Runs one request to completion.
    pub fn generate(&self, req: &GenerateRequest) -> Result<Completion, EngineError> {
        self.generate_until(req, &AtomicBool::new(false))
    }

    /// Runs one request, giving up with [`EngineError::Cancelled`] once `cancel` is set
    /// (checked between tokens).
    pub fn generate_until(&self, req: &GenerateRequest, cancel: &AtomicBool) -> Result<Completion, EngineError> {
        req.sampling.validate()?;
        let prompt = self.encode_prompt(&req.prompt)?;
        let context = self.context_length();
        if prompt.len() >= context {
            return Err(EngineError::PromptTooLong { prompt_tokens: prompt.len(), context });
        }
        let max_tokens = req.max_tokens.min(context - prompt.len());
        let model = &self.loaded.model;
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut cache = SeqCache::new();
        let mut seen = prompt.clone();
        let mut out: Vec<u32> = Vec::new();
        let mut text = String::new();
        let mut finish = FinishReason::Length;

        let t0 = Instant::now();
        let mut logits = if max_tokens > 0 { Some(model.forward(&prompt, &mut cache)?) } else { None };
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        while let Some(l) = logits.take() {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            let mut l = l.to_vec1::<f32>()?;
            let next = sampler.sample(&mut l, &seen)?;
            if self.eos.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            out.push(next);
            seen.push(next);
            text = self.decode(&out)?;
            if let Some(cut) = first_stop(&text, &req.stop) {
                text.truncate(cut);
                finish = FinishReason::Stop;
                break;
            }
            if out.len() >= max_tokens {
                break;
            }
            logits = Some(model.forward(&[next], &mut cache)?);
        }
        let usage =
            Usage { prompt_tokens: prompt.len(), completion_tokens: out.len(), total_tokens: prompt.len() + out.len() };
        let timings = GenerationTimings { prefill_s, decode_s: t1.elapsed().as_secs_f64() };
        Ok(Completion { text, tokens: out, finish_reason: finish, usage, timings })
    }
}

/// Byte offset of the earliest stop sequence in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_stop_wins() {
        let stops = vec!["b".to_string(), "cd".to_string(), String::new()];
        assert_eq!(first_stop("xxcdb", &stops), Some(2));
        assert_eq!(first_stop("xyz", &stops), None);
    }
}
