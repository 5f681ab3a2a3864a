//! Ember's generation engine: prompt rendering and tokenizing, prefill then decode with a KV
//! cache, continuous batching, sampling, incremental detokenizing, stop conditions, and the
//! OpenAI-shaped result with usage counts. It sits between the model loader (which builds the
//! model) and the worker (which takes jobs from queues and writes results).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use ember_model_loader::{load, LoadOptions, Message};
//! use ember_engine::{Engine, GenerateRequest, Prompt, SamplingParams};
//! let engine = Engine::new(load(&"/models/smollm2".parse()?, &LoadOptions::default()).await?);
//! let done = engine.generate(&GenerateRequest {
//!     prompt: Prompt::Chat(vec![Message::new("user", "What is the capital of France?")]),
//!     max_tokens: 32,
//!     sampling: SamplingParams::default(),
//!     stop: vec![],
//!     allow_special_tokens: false,
//!     prompt_ids: None,
//! })?;
//! println!("{}", done.text);
//! # Ok(()) }
//! ```

pub mod batch;
mod error;
pub mod sampling;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ember_model_loader::{LoadedModel, Message, SeqCache, Tokenizer};
use serde::{Deserialize, Serialize};

pub use batch::{BatchStats, Batcher, BatcherOptions, Event, Priority, Submit, Ticket};
pub use error::EngineError;
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
    /// The prompt's token ids when the caller already encoded it with [`Engine::encode`]
    /// (job validation does, to count them): the engine then does not render and tokenize the
    /// prompt again. `None`: the engine encodes it.
    #[serde(skip)]
    pub prompt_ids: Option<Vec<u32>>,
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
    /// The tokenizer with special-token matching off: message content that holds special-token
    /// text goes through it. Made on first use: for Hugging Face's tokenizer it is a whole copy
    /// (tens of MB of vocabulary and merges for a 49k-token BPE), which a cold start would
    /// otherwise pay for before its first token, for content that rarely needs it.
    text_tokenizer: std::sync::OnceLock<Tokenizer>,
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
        let special_texts = loaded.tokenizer.special_tokens();
        Self { loaded, eos, text_tokenizer: std::sync::OnceLock::new(), special_texts }
    }

    fn text_tokenizer(&self) -> &Tokenizer {
        self.text_tokenizer.get_or_init(|| self.loaded.tokenizer.with_special_tokens_as_text())
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

    fn tokenize(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, EngineError> {
        // Templates write their special tokens as text; adding them again would double BOS.
        tokenizer.encode(text).map_err(|e| EngineError::Tokenizer(e.to_string()))
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
            ids.extend(self.tokenize(self.text_tokenizer(), content)?);
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
        self.generate_streaming(req, cancel, &mut |_| {})
    }

    /// [`Engine::generate_until`], handing each piece of text to `on_text` as soon as no stop
    /// sequence can cut it (see [`Sequence::take_ready_text`]). The pieces joined are a prefix
    /// of the completion's text; the rest, if any, is known only at the end.
    pub fn generate_streaming(
        &self,
        req: &GenerateRequest,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion, EngineError> {
        let (mut seq, prompt) = Sequence::start(self, req)?;
        if seq.wants_nothing() {
            return Ok(seq.finish(self, 0.0));
        }
        let mut cache = SeqCache::with_reserve(seq.max_len());
        let mut logits = self.loaded.model.forward(prefill_last(self, &prompt, &mut cache)?, &mut cache)?;
        seq.prefilled();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            match seq.step(self, &logits.to_vec1::<f32>()?)? {
                Step::Next(token) => {
                    if let Some(piece) = seq.take_ready_text() {
                        on_text(&piece);
                    }
                    logits = self.loaded.model.forward(&[token], &mut cache)?
                }
                Step::Finished => {
                    let decode_s = seq.decode_s();
                    return Ok(seq.finish(self, decode_s));
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
    text: Detokenizer,
    stop: Vec<String>,
    max_tokens: usize,
    finish: FinishReason,
    started: Instant,
    prefill_s: f64,
    /// Bytes of `text` already handed out by [`Sequence::take_ready_text`].
    streamed: usize,
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
        let prompt = match &req.prompt_ids {
            Some(ids) => ids.clone(),
            None => engine.encode(&req.prompt, req.allow_special_tokens)?,
        };
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
            text: Detokenizer::default(),
            stop: req.stop.clone(),
            max_tokens: req.max_tokens.min(context - prompt.len()),
            finish: FinishReason::Length,
            started: Instant::now(),
            prefill_s: 0.0,
            streamed: 0,
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
    pub fn step(&mut self, engine: &Engine, logits: &[f32]) -> Result<Step, EngineError> {
        let next = self.sampler.sample(logits, &self.seen)?;
        self.accept(engine, next)
    }

    /// The tokens the repetition penalty applies to (prompt and output so far).
    pub fn seen(&self) -> &[u32] {
        &self.seen
    }

    /// This draw's settings for a sampler that runs on the device (the fused CUDA kernel, at
    /// step 0): the same algorithm and RNG as [`Sequence::step`], so the same token.
    pub fn row_params(&self) -> ember_kernels::RowParams {
        self.sampler.row_params()
    }

    /// Takes `next`, the token a device-side sampler picked with [`Sequence::row_params`], and
    /// checks the stop rules.
    pub fn accept_drawn(&mut self, engine: &Engine, next: u32) -> Result<Step, EngineError> {
        self.sampler.drew();
        self.accept(engine, next)
    }

    /// Takes `next` as the sampled token and checks the stop rules. The text grows by the
    /// new token's piece only and only its end is searched for stop strings, so a step costs
    /// the same at token 2,000 as at token 2.
    fn accept(&mut self, engine: &Engine, next: u32) -> Result<Step, EngineError> {
        if engine.eos.contains(&next) {
            self.finish = FinishReason::Stop;
            return Ok(Step::Finished);
        }
        self.out.push(next);
        self.seen.push(next);
        let before = self.text.len();
        self.text.push(&engine.loaded.tokenizer, &self.out)?;
        if let Some(cut) = first_stop_after(self.text.as_str(), before, &self.stop) {
            self.text.truncate(cut);
            self.finish = FinishReason::Stop;
            return Ok(Step::Finished);
        }
        if self.out.len() >= self.max_tokens {
            return Ok(Step::Finished);
        }
        Ok(Step::Next(next))
    }

    /// The text made since the last call that no stop sequence can still cut, for streaming.
    /// A stop found later ends in a later piece, so it starts at most the longest stop's
    /// length less one before the end of the text known now: holding those bytes back means
    /// nothing handed out is ever taken back.
    pub fn take_ready_text(&mut self) -> Option<String> {
        let hold = self.stop.iter().map(String::len).max().unwrap_or(0).saturating_sub(1);
        let text = self.text.as_str();
        let mut end = text.len().saturating_sub(hold);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.streamed {
            return None;
        }
        let piece = text[self.streamed..end].to_string();
        self.streamed = end;
        Some(piece)
    }

    /// Whether the request asked for no tokens at all.
    pub fn wants_nothing(&self) -> bool {
        self.max_tokens == 0
    }

    /// The completion, once [`Step::Finished`] (or at once for `max_tokens` 0).
    pub fn finish(self, engine: &Engine, decode_s: f64) -> Completion {
        let usage = Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.out.len(),
            total_tokens: self.prompt_len + self.out.len(),
        };
        let timings = GenerationTimings { prefill_s: self.prefill_s, decode_s };
        let text = self.text.finish(&engine.loaded.tokenizer, &self.out);
        Completion { text, tokens: self.out, finish_reason: self.finish, usage, timings }
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

/// Byte offset of the earliest stop sequence in `text`, given that none is in its first
/// `before` bytes: only a stop that ends after them can be new, so the search starts at most
/// the longest stop's length less one before that point.
fn first_stop_after(text: &str, before: usize, stops: &[String]) -> Option<usize> {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let mut from = before.saturating_sub(longest.saturating_sub(1)).min(text.len());
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    first_stop(&text[from..], stops).map(|at| from + at)
}

/// Byte offset of the earliest stop sequence in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// Incremental detokenizing, as Hugging Face's `DecodeStream` and TGI do it: each new token's
/// text is the decode of a short window of recent tokens less the decode of the window
/// without the new ones. The window gives a token the context it needs (a SentencePiece
/// space, the rest of a UTF-8 character split across byte tokens); a piece that ends in an
/// incomplete character waits for the next token. The text so far is never decoded again.
#[derive(Debug, Default)]
struct Detokenizer {
    text: String,
    /// Where the window starts: tokens before it are already in `text` and not needed again.
    prefix: usize,
    /// Tokens up to here are in `text`.
    read: usize,
}

impl Detokenizer {
    /// Adds the text of the tokens of `out` not yet read.
    fn push(&mut self, tokenizer: &Tokenizer, out: &[u32]) -> Result<(), EngineError> {
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| EngineError::Tokenizer(e.to_string()));
        let known = decode(&out[self.prefix..self.read])?;
        let window = decode(&out[self.prefix..])?;
        if window.len() > known.len() && !window.ends_with('\u{FFFD}') {
            self.append(&window, known.len());
            self.prefix = self.read;
            self.read = out.len();
        }
        Ok(())
    }

    /// The whole text at the end: what is still waiting (an incomplete character the model
    /// never finished) is added as the decoder renders it.
    fn finish(mut self, tokenizer: &Tokenizer, out: &[u32]) -> String {
        if self.read < out.len() {
            if let (Ok(known), Ok(window)) =
                (tokenizer.decode(&out[self.prefix..self.read], true), tokenizer.decode(&out[self.prefix..], true))
            {
                self.append(&window, known.len());
            }
        }
        self.text
    }

    /// Appends `window` past its first `known` bytes (on a character boundary: a decoder can
    /// render the known tokens differently once more follow them).
    fn append(&mut self, window: &str, known: usize) {
        let mut at = known.min(window.len());
        while !window.is_char_boundary(at) {
            at -= 1;
        }
        self.text.push_str(&window[at..]);
    }

    fn as_str(&self) -> &str {
        &self.text
    }

    fn len(&self) -> usize {
        self.text.len()
    }

    fn truncate(&mut self, at: usize) {
        self.text.truncate(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The incremental text is the whole decode, token by token, on the real tokenizers (the
    /// model's tokenizer.json, and the BPE built from its GGUF file): text with characters
    /// split across byte tokens (accents, CJK, an emoji), special tokens (skipped) and
    /// spaces; and what was streamed so far is always a prefix of the result.
    #[test]
    fn incremental_text_is_the_whole_decode() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let dir = ember_tests::smollm_hf("f32")?;
        let json: Tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))?.into();
        let gguf = std::fs::read(ember_tests::smollm_gguf()?)?;
        let header = ember_model_loader::gguf_header::GgufHeader::read(&gguf)?;
        let bpe: Tokenizer = ember_model_loader::gguf::gguf_byte_bpe(&header)?.into();
        for (tokenizer, text) in [&json, &bpe].into_iter().flat_map(|t| {
            [
                "The capital of France is Paris.",
                "Un café, s'il vous plaît: naïve façade, 日本語のテキスト, and a cup ☕ 🎉!",
                "<|im_start|>assistant\nHello<|im_end|>  two  spaces\n\nand lines",
            ]
            .map(|text| (t, text))
        }) {
            let ids = tokenizer.encode(text)?;
            let mut d = Detokenizer::default();
            let mut streamed = String::new();
            for n in 1..=ids.len() {
                d.push(tokenizer, &ids[..n])?;
                assert!(d.as_str().starts_with(&streamed), "{text:?}: text so far changed");
                streamed = d.as_str().to_string();
            }
            assert_eq!(d.finish(tokenizer, &ids), tokenizer.decode(&ids, true)?, "{tokenizer:?} {text:?}");
        }
        Ok(())
    }

    /// A stop string is found when it ends in the newest piece, however it straddles pieces.
    #[test]
    fn a_stop_across_pieces_is_found_at_its_start() {
        let stops = vec!["END".to_string(), "x".to_string()];
        // "...E" then "ND": only the search window from before the new piece finds it.
        assert_eq!(first_stop_after("abcEND", 4, &stops), Some(3));
        assert_eq!(first_stop_after("abcEN", 4, &stops), None);
        // Multi-byte text before the window start: the start moves back to a char boundary.
        assert_eq!(first_stop_after("ééEND", 5, &stops), Some(4));
    }

    #[test]
    fn earliest_stop_wins() {
        let stops = vec!["b".to_string(), "cd".to_string(), String::new()];
        assert_eq!(first_stop("xxcdb", &stops), Some(2));
        assert_eq!(first_stop("xyz", &stops), None);
    }
}
