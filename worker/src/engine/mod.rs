//! The generation engine: prompt rendering, prefill then decode with a KV cache, sampling,
//! stop conditions, and the OpenAI-shaped result with usage counts.

pub mod batch;
pub mod sampling;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ember_model_loader::{LoadedModel, Message, SeqCache};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
pub use batch::{Batcher, BatcherOptions};
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
    /// Whether special-token text typed into chat message content (`<|im_start|>`, say) is
    /// encoded as the special token. Off by default, as in Hugging Face's
    /// `split_special_tokens` and llama.cpp's `parse_special = false` for user text: otherwise a
    /// user (or a web page an agent fetched) could forge turns of the conversation. The chat
    /// template's own special tokens are always special; `/v1/completions` prompts are raw
    /// model input and keep their special tokens.
    #[serde(default)]
    pub allow_special_tokens: bool,
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
    /// The tokenizer with special-token matching off: message content goes through it.
    text_tokenizer: tokenizers::Tokenizer,
    /// The text of every special token, to tell whether content needs `text_tokenizer`.
    special_texts: Vec<String>,
}

/// Marks where a message's content sits in a rendered template: private-use characters, which
/// no template writes.
const CONTENT_OPEN: char = '\u{F8FE}';
const CONTENT_CLOSE: char = '\u{F8FF}';

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
        let mut text_tokenizer = loaded.tokenizer.clone();
        text_tokenizer.set_encode_special_tokens(true);
        let special_texts = loaded
            .tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        Self { loaded, eos, text_tokenizer, special_texts }
    }

    pub fn context_length(&self) -> usize {
        self.loaded.config().max_position_embeddings
    }

    /// The token ids of the prompt, as the model sees them, with special-token text in chat
    /// content encoded as plain text (see [`GenerateRequest::allow_special_tokens`]).
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        self.encode(prompt, false)
    }

    /// [`Engine::encode_prompt`], or with special tokens in chat content honoured.
    pub fn encode(&self, prompt: &Prompt, allow_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        let text = match prompt {
            Prompt::Chat(messages) if messages.is_empty() => return Err(EngineError::EmptyPrompt),
            Prompt::Chat(messages) if !allow_special_tokens && self.has_special_text(messages) => {
                return self.encode_chat_content_as_text(messages);
            }
            Prompt::Chat(messages) => self.loaded.chat_template.render(messages)?,
            Prompt::Text(t) if t.is_empty() => return Err(EngineError::EmptyPrompt),
            Prompt::Text(t) => t.clone(),
        };
        self.tokenize(&self.loaded.tokenizer, &text)
    }

    fn tokenize(&self, tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>, EngineError> {
        // Templates write their special tokens as text; adding them again would double BOS.
        let enc = tokenizer.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    fn has_special_text(&self, messages: &[Message]) -> bool {
        messages.iter().any(|m| self.special_texts.iter().any(|s| m.content.contains(s.as_str())))
    }

    /// Renders the template with a marker in place of each message's content, then encodes
    /// the template's text with special tokens and each content with them off. Used only when
    /// some content holds special-token text, so ordinary prompts tokenize exactly as the
    /// whole rendered string does.
    fn encode_chat_content_as_text(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message::new(&m.role, &format!("{CONTENT_OPEN}{i}{CONTENT_CLOSE}")))
            .collect();
        let rendered = self.loaded.chat_template.render(&marked)?;
        let mut ids = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(open) = rest.find(CONTENT_OPEN) {
            ids.extend(self.tokenize(&self.loaded.tokenizer, &rest[..open])?);
            let after = &rest[open + CONTENT_OPEN.len_utf8()..];
            let close = after
                .find(CONTENT_CLOSE)
                .ok_or_else(|| EngineError::Tokenizer("the chat template cut a message's content marker".into()))?;
            let index: usize = after[..close]
                .parse()
                .map_err(|_| EngineError::Tokenizer("the chat template changed a message's content marker".into()))?;
            let content = messages.get(index).map(|m| m.content.as_str()).unwrap_or_default();
            ids.extend(self.tokenize(&self.text_tokenizer, content)?);
            rest = &after[close + CONTENT_CLOSE.len_utf8()..];
        }
        ids.extend(self.tokenize(&self.loaded.tokenizer, rest)?);
        Ok(ids)
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
        let (mut seq, prompt) = Sequence::start(self, req)?;
        if seq.wants_nothing() {
            return Ok(seq.finish(0.0));
        }
        let mut cache = SeqCache::new();
        let mut logits = self.loaded.model.forward(prefill_last(self, &prompt, &mut cache)?, &mut cache)?;
        seq.prefilled();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            match seq.step(self, &mut logits.to_vec1::<f32>()?)? {
                Step::Next(token) => logits = self.loaded.model.forward(&[token], &mut cache)?,
                Step::Finished => {
                    let decode_s = seq.decode_s();
                    return Ok(seq.finish(decode_s));
                }
            }
        }
    }
}

/// The state of one generation between forward passes: what was sampled so far and whether it
/// should stop. The single-sequence loop above and the batcher both drive it, so a job's
/// tokens depend only on its logits, not on which loop ran it.
pub struct Sequence {
    sampler: Sampler,
    seen: Vec<u32>,
    prompt_len: usize,
    out: Vec<u32>,
    text: String,
    stop: Vec<String>,
    max_tokens: usize,
    finish: FinishReason,
    started: Instant,
    prefill_s: f64,
}

/// What a sequence needs next.
pub enum Step {
    /// Feed this token and call [`Sequence::step`] with the logits that follow it.
    Next(u32),
    Finished,
}

impl Sequence {
    /// Checks the request and renders its prompt; answers the prompt tokens to prefill.
    pub fn start(engine: &Engine, req: &GenerateRequest) -> Result<(Self, Vec<u32>), EngineError> {
        req.sampling.validate()?;
        let prompt = engine.encode(&req.prompt, req.allow_special_tokens)?;
        let context = engine.context_length();
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() >= context {
            return Err(EngineError::PromptTooLong { prompt_tokens: prompt.len(), context });
        }
        let seq = Self {
            sampler: Sampler::new(req.sampling.clone()),
            seen: prompt.clone(),
            prompt_len: prompt.len(),
            out: Vec::new(),
            text: String::new(),
            stop: req.stop.clone(),
            max_tokens: req.max_tokens.min(context - prompt.len()),
            finish: FinishReason::Length,
            started: Instant::now(),
            prefill_s: 0.0,
        };
        Ok((seq, prompt))
    }

    /// The most tokens this sequence can hold in the KV cache (prompt and completion).
    pub fn max_len(&self) -> usize {
        self.prompt_len + self.max_tokens
    }

    /// Marks the end of the prefill, for the timings.
    pub fn prefilled(&mut self) {
        self.prefill_s = self.started.elapsed().as_secs_f64();
    }

    /// Samples from the logits that follow the last token fed, and checks the stop rules.
    pub fn step(&mut self, engine: &Engine, logits: &mut [f32]) -> Result<Step, EngineError> {
        let next = self.sampler.sample(logits, &self.seen)?;
        self.accept(engine, next)
    }

    /// The tokens the repetition penalty applies to (prompt and output so far).
    pub fn seen(&self) -> &[u32] {
        &self.seen
    }

    /// This step's settings for the fused CUDA sampler (`ember_kernels::cuda`): the row's RNG
    /// seed is mixed with the number of tokens sampled so far, so each step draws anew and a
    /// sequence's draws do not depend on which batch it ran in.
    #[cfg(feature = "cuda")]
    pub fn row_params(&self) -> ember_kernels::RowParams {
        let p = self.sampler.params();
        ember_kernels::RowParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: ember_kernels::sampling::splitmix64(self.sampler.device_seed(), self.out.len() as u64),
        }
    }

    /// Takes `next` as the sampled token (from [`Sequence::step`], or from a sampler that ran
    /// on the device) and checks the stop rules.
    pub fn accept(&mut self, engine: &Engine, next: u32) -> Result<Step, EngineError> {
        if engine.eos.contains(&next) {
            self.finish = FinishReason::Stop;
            return Ok(Step::Finished);
        }
        self.out.push(next);
        self.seen.push(next);
        self.text = engine.decode(&self.out)?;
        if let Some(cut) = first_stop(&self.text, &self.stop) {
            self.text.truncate(cut);
            self.finish = FinishReason::Stop;
            return Ok(Step::Finished);
        }
        if self.out.len() >= self.max_tokens {
            return Ok(Step::Finished);
        }
        Ok(Step::Next(next))
    }

    /// Whether the request asked for no tokens at all.
    pub fn wants_nothing(&self) -> bool {
        self.max_tokens == 0
    }

    /// The completion, once [`Step::Finished`] (or at once for `max_tokens` 0).
    pub fn finish(self, decode_s: f64) -> Completion {
        let usage = Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.out.len(),
            total_tokens: self.prompt_len + self.out.len(),
        };
        let timings = GenerationTimings { prefill_s: self.prefill_s, decode_s };
        Completion { text: self.text, tokens: self.out, finish_reason: self.finish, usage, timings }
    }

    /// Seconds since the sequence started, less its prefill.
    pub fn decode_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64() - self.prefill_s
    }
}

/// Prompts longer than this are prefilled in pieces of this size: attention scores of a whole
/// 8k-token prompt at once would take gigabytes.
pub const PREFILL_CHUNK: usize = 512;

/// For a prompt longer than [`PREFILL_CHUNK`], runs all of it but the tail through the model in
/// chunks (their logits are not needed) and answers the tail to run next; a shorter prompt is
/// answered whole. The single-sequence loop and the batcher both split prompts this way, so a
/// sequence gets the same numbers whichever runs it.
pub fn prefill_last<'a>(engine: &Engine, prompt: &'a [u32], cache: &mut SeqCache) -> Result<&'a [u32], EngineError> {
    if prompt.len() <= PREFILL_CHUNK {
        return Ok(prompt);
    }
    let split = prompt.len() - 1;
    for chunk in prompt[..split].chunks(PREFILL_CHUNK) {
        engine.loaded.model.forward(chunk, cache)?;
    }
    Ok(&prompt[split..])
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
