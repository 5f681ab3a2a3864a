//! The rules, in the order that gives the most useful answer: first whatever names the job
//! (`custom_id`, `ember`), so that every later error is filed under the job's own id and key,
//! then the request, and the prompt's length last because counting tokens is the costliest.

use super::input::{parse_object, Fields};
use super::key::{component_problem, default_result_key, rejected_result_key, store_key_problem};
use super::messages::chat_messages;
use super::params::{check_parameters, generation};
use super::{JobError, JobLimits, RejectedJob, ValidJob};
use ember_engine::{GenerateRequest, Prompt};

/// The model name that means "the first model this worker serves", for job files written
/// without knowing which model will run them. A missing or empty `model` is refused instead:
/// OpenAI requires the field, and its absence more often means a malformed line than a choice.
pub const DEFAULT_MODEL: &str = "default";

/// Encodes a prompt as the model will see it (chat template applied; the flag allows
/// special-token text in chat content, see `GenerateRequest::allow_special_tokens`). The ids
/// are counted against the context and handed to the engine with the job, so the prompt is
/// encoded once. An error (a template that refuses the conversation, say) refuses the job.
pub type PromptEncoder<'a> = &'a dyn Fn(&Prompt, bool) -> Result<Vec<u32>, String>;

/// Checks one queue message body. `message_id` is the queue's id for the message: the result
/// ids derive from it, and a refused job without a usable `custom_id` is answered under it.
/// The refusal is boxed: it is the rare path, and it keeps the `Result` small.
pub fn validate(
    body: &[u8],
    message_id: &str,
    limits: &JobLimits,
    encode: PromptEncoder<'_>,
) -> Result<ValidJob, Box<RejectedJob>> {
    let mut target = Target {
        custom_id: message_id.to_string(),
        batch_id: None,
        result_key: rejected_result_key(None, message_id),
        allow_special_tokens: false,
    };
    let checked = parse_object(body, limits.max_body_bytes).and_then(|line| {
        let top = Fields::new(&line, "");
        identify(&top, message_id, &mut target)?;
        request(&top, limits, target.allow_special_tokens, encode)
    });
    match checked {
        Ok(r) => Ok(ValidJob {
            message_id: message_id.to_string(),
            custom_id: target.custom_id,
            request: r.request,
            model: r.model,
            chat: r.chat,
            result_key: target.result_key,
            batch_id: target.batch_id,
            prompt_tokens: r.prompt_tokens,
        }),
        Err(error) => Err(Box::new(RejectedJob {
            message_id: message_id.to_string(),
            custom_id: target.custom_id,
            batch_id: target.batch_id,
            result_key: target.result_key,
            error,
        })),
    }
}

/// A request the HTTP server takes: the body of a batch line, alone, which may ask for
/// streaming.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub request: GenerateRequest,
    /// The served model's name (`"default"` already resolved).
    pub model: String,
    pub prompt_tokens: usize,
    /// `stream: true`, with whether `stream_options.include_usage` asked for a usage chunk.
    pub stream: Option<StreamOptions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    pub include_usage: bool,
}

/// Checks an HTTP request body by the rules a queued job's body goes through (errors name
/// fields as `body.x`, as in batch error results), plus `stream` and `stream_options`, which
/// only an HTTP request can act on.
pub fn validate_api_request(
    body: &[u8],
    chat: bool,
    limits: &JobLimits,
    encode: PromptEncoder<'_>,
) -> Result<ApiRequest, JobError> {
    let mut map = parse_object(body, limits.max_body_bytes)?;
    let stream = {
        let fields = Fields::new(&map, "body");
        match fields.get("stream") {
            None => None,
            Some(v) if v.as_bool() == Some(false) => None,
            Some(v) if v.as_bool() == Some(true) => {
                let include_usage = match fields.object("stream_options")? {
                    None => false,
                    Some(o) => {
                        let options = Fields::new(o, "body.stream_options");
                        match options.get("include_usage") {
                            None => false,
                            Some(v) => {
                                v.as_bool().ok_or_else(|| options.wrong_type("include_usage", "a boolean", v))?
                            }
                        }
                    }
                };
                Some(StreamOptions { include_usage })
            }
            Some(v) => return Err(fields.wrong_type("stream", "a boolean", v)),
        }
    };
    // Read here; the shared rules refuse `stream: true` for batch lines, which cannot stream.
    map.remove("stream");
    let r = body_request(&Fields::new(&map, "body"), chat, limits, false, encode)?;
    Ok(ApiRequest { request: r.request, model: r.model, prompt_tokens: r.prompt_tokens, stream })
}

/// A request must fit the batch's KV cache budget on its own (prompt and `max_tokens`):
/// otherwise it could never be admitted while anything else runs.
pub fn check_budget(request: &GenerateRequest, prompt_tokens: usize, budget_tokens: usize) -> Result<(), JobError> {
    let tokens = prompt_tokens + request.max_tokens;
    if tokens > budget_tokens {
        return Err(JobError::OverMemoryBudget { tokens, budget: budget_tokens });
    }
    Ok(())
}

/// The model needs one token of room after the prompt, as in the engine.
pub fn check_prompt_length(prompt_tokens: usize, context_length: usize) -> Result<(), JobError> {
    if prompt_tokens >= context_length {
        return Err(JobError::PromptTooLong { prompt_tokens, context: context_length });
    }
    Ok(())
}

/// Who the job is and where its result goes, filled in as far as the line allows.
struct Target {
    custom_id: String,
    batch_id: Option<String>,
    result_key: String,
    allow_special_tokens: bool,
}

fn identify(top: &Fields<'_>, message_id: &str, target: &mut Target) -> Result<(), JobError> {
    // Echo the caller's id in an error result even when it cannot name the result object.
    let custom_id = top.str("custom_id")?.filter(|id| !id.is_empty());
    if let Some(id) = custom_id {
        target.custom_id = id.to_string();
    }
    ember_options(top, message_id, target)?;
    let id = custom_id.ok_or(JobError::MissingCustomId)?;
    if let Some(reason) = component_problem(id) {
        return Err(JobError::InvalidCustomId { reason });
    }
    let key = default_result_key(target.batch_id.as_deref(), id);
    if let Some(reason) = store_key_problem(&key) {
        return Err(JobError::InvalidCustomId { reason: format!("makes the result key {key:?}, which {reason}") });
    }
    target.result_key = key;
    Ok(())
}

/// Reads the `ember` object. The result key is always derived by the worker
/// (`results/{batch_id}/{custom_id}.json`): a job never names an object key itself, so it
/// cannot take another job's result slot or reach a pipeline's execution records, which live
/// outside `results/`.
fn ember_options(top: &Fields<'_>, message_id: &str, target: &mut Target) -> Result<(), JobError> {
    let Some(map) = top.object("ember")? else { return Ok(()) };
    let ember = Fields::new(map, "ember");
    // The batch first, so that any later refusal is filed in the batch's own folder.
    if let Some(batch) = ember.str("batch_id")? {
        if let Some(reason) = component_problem(batch).or_else(|| batch.is_empty().then(|| "is empty".to_string())) {
            return Err(JobError::InvalidBatchId { reason });
        }
        target.batch_id = Some(batch.to_string());
        target.result_key = rejected_result_key(Some(batch), message_id);
    }
    if ember.get("result_key").is_some() {
        return Err(JobError::ResultKeyNotAllowed);
    }
    // `traceparent` is read by `ember submit` (the trace travels as a message attribute); a
    // malformed one only means a new trace, never a refused job.
    let known = |name: &str| matches!(name, "batch_id" | "allow_special_tokens" | "traceparent");
    if let Some((field, _)) = ember.names().find(|(name, _)| !known(name)) {
        return Err(JobError::UnknownEmberField { field: field.to_string() });
    }
    target.allow_special_tokens = match ember.get("allow_special_tokens") {
        None => false,
        Some(v) => v.as_bool().ok_or(JobError::InvalidSpecialTokensOption)?,
    };
    Ok(())
}

/// The checked request of a line.
struct Request {
    request: GenerateRequest,
    model: String,
    chat: bool,
    prompt_tokens: usize,
}

fn request(
    top: &Fields<'_>,
    limits: &JobLimits,
    allow_special_tokens: bool,
    encode: PromptEncoder<'_>,
) -> Result<Request, JobError> {
    let method = top.str("method")?.unwrap_or_default();
    if method != "POST" {
        return Err(JobError::WrongMethod { method: method.to_string() });
    }
    let chat = match top.str("url")?.unwrap_or_default() {
        "/v1/chat/completions" => true,
        "/v1/completions" => false,
        url => return Err(JobError::UnsupportedUrl { url: url.to_string() }),
    };
    let map = top.object("body")?.ok_or(JobError::MissingBody)?;
    body_request(&Fields::new(map, "body"), chat, limits, allow_special_tokens, encode)
}

/// Checks the body of a chat completion request on its own, by the rules a queued job's body
/// goes through: the typed entry point for callers that hold a request rather than a batch
/// line (a pipeline's `ember:generate` step). Answers the request, ready for the engine with
/// its prompt encoded, and the served model's name.
pub fn validate_chat_request(
    body: &serde_json::Map<String, serde_json::Value>,
    limits: &JobLimits,
    allow_special_tokens: bool,
    encode: PromptEncoder<'_>,
) -> Result<(GenerateRequest, String), JobError> {
    let r = body_request(&Fields::new(body, ""), true, limits, allow_special_tokens, encode)?;
    Ok((r.request, r.model))
}

fn body_request(
    body: &Fields<'_>,
    chat: bool,
    limits: &JobLimits,
    allow_special_tokens: bool,
    encode: PromptEncoder<'_>,
) -> Result<Request, JobError> {
    let model = served_model(body.str("model")?, limits)?;
    let prompt = if chat { Prompt::Chat(chat_messages(body)?) } else { Prompt::Text(text_prompt(body)?) };
    check_parameters(body, chat)?;
    let g = generation(body, limits)?;
    let ids = encode(&prompt, allow_special_tokens).map_err(JobError::PromptEncoding)?;
    let prompt_tokens = ids.len();
    check_prompt_length(prompt_tokens, limits.context_length)?;
    let request = GenerateRequest {
        allow_special_tokens,
        prompt_ids: Some(ids),
        prompt,
        max_tokens: g.max_tokens,
        sampling: g.sampling,
        stop: g.stop,
    };
    Ok(Request { request, model, chat, prompt_tokens })
}

/// The served name the job's `model` selects; see [`DEFAULT_MODEL`].
fn served_model(model: Option<&str>, limits: &JobLimits) -> Result<String, JobError> {
    let unknown = |m: &str| JobError::UnknownModel { model: m.to_string(), served: limits.models.clone() };
    match model.unwrap_or_default() {
        "" => Err(JobError::MissingModel { served: limits.models.clone() }),
        m if limits.models.iter().any(|s| s == m) => Ok(m.to_string()),
        DEFAULT_MODEL => limits.models.first().cloned().ok_or_else(|| unknown(DEFAULT_MODEL)),
        m => Err(unknown(m)),
    }
}

/// A completions prompt: one string. OpenAI also takes lists and token ids; one job is one
/// completion here, so a list would need one job per entry.
fn text_prompt(body: &Fields<'_>) -> Result<String, JobError> {
    let prompt = body.str("prompt")?.ok_or(JobError::MissingPrompt)?;
    if prompt.is_empty() {
        return Err(JobError::EmptyPrompt);
    }
    Ok(prompt.to_string())
}
