//! The generation parameters of a request body, and what becomes of the ones Ember does not
//! implement.
//!
//! The policy on fields Ember does not read:
//! - body fields it does not know are refused, as OpenAI refuses them: a typo such as
//!   `max_token` ignored in silence would give a result that looks right and is not;
//! - OpenAI parameters Ember does not implement are accepted only at the value that turns them
//!   off (`n: 1`, `stream: false`, `logprobs: false`, `presence_penalty: 0`, ...), where ignoring
//!   them changes nothing, and refused otherwise rather than answered differently than asked;
//! - parameters that do not change the completion (`user`, `metadata`, `store`, ...) are ignored;
//! - `null` means absent for every parameter, as in the OpenAI API;
//! - unknown top-level fields of the line, beside `custom_id`, `method`, `url`, `body`, `ember`,
//!   are ignored: they are the submitter's annotations, not request parameters.
//!
//! One difference from OpenAI on purpose: without `temperature` Ember decodes greedily
//! (OpenAI's default is 1), so a job gives the same answer on every run and every redelivery.

use serde_json::Value;

use super::input::{kind, Fields};
use super::{JobError, JobLimits};
use ember_engine::EngineError;
use ember_engine::SamplingParams;

/// OpenAI's limit on stop sequences.
pub const MAX_STOP_SEQUENCES: usize = 4;

/// Body fields the rules read, on both endpoints (besides `messages` or `prompt`).
pub const USED: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "top_k",
    "repetition_penalty",
];

/// Body fields that do not change the completion.
pub const IGNORED: &[&str] =
    &["user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls", "top_logprobs"];

/// The checked `max_tokens`, sampling settings and stop sequences of a body.
pub(crate) struct Generation {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

/// Refuses unknown body fields and unimplemented parameters that are switched on.
pub(crate) fn check_parameters(body: &Fields<'_>, chat: bool) -> Result<(), JobError> {
    let prompt_field = if chat { "messages" } else { "prompt" };
    for (name, value) in body.names() {
        if name == prompt_field || USED.contains(&name) || IGNORED.contains(&name) {
            continue;
        }
        match is_off(name, value) {
            Some(true) => {}
            Some(false) => {
                return Err(JobError::UnsupportedParameter { param: name.to_string(), value: short_json(value) })
            }
            None => return Err(JobError::UnknownParameter { param: name.to_string() }),
        }
    }
    Ok(())
}

/// Whether an OpenAI parameter Ember does not implement has the value that turns it off;
/// `None` for a name that is not such a parameter.
fn is_off(name: &str, v: &Value) -> Option<bool> {
    let off = match name {
        "n" | "best_of" => v.as_u64() == Some(1),
        "stream" | "echo" => v.as_bool() == Some(false),
        // A boolean on chat, a count on completions.
        "logprobs" => v.as_bool() == Some(false) || v.as_u64() == Some(0),
        "presence_penalty" | "frequency_penalty" => v.as_f64() == Some(0.0),
        "logit_bias" => v.as_object().is_some_and(|m| m.is_empty()),
        "tools" | "functions" => v.as_array().is_some_and(|a| a.is_empty()),
        "tool_choice" | "function_call" => matches!(v.as_str(), Some("none" | "auto")),
        "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
        "suffix" => v.as_str().is_some_and(str::is_empty),
        _ => return None,
    };
    Some(off)
}

/// A value as compact JSON, cut short enough for an error message.
fn short_json(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

pub(crate) fn generation(body: &Fields<'_>, limits: &JobLimits) -> Result<Generation, JobError> {
    Ok(Generation { max_tokens: max_tokens(body, limits)?, sampling: sampling(body)?, stop: stop(body)? })
}

/// `max_completion_tokens` is OpenAI's current name and `max_tokens` the older one; either is
/// accepted, both only when they agree.
fn max_tokens(body: &Fields<'_>, limits: &JobLimits) -> Result<usize, JobError> {
    let (field, value) = match (body.int("max_tokens")?, body.int("max_completion_tokens")?) {
        (Some(old), Some(new)) if old != new => {
            return Err(JobError::ConflictingMaxTokens { max_tokens: old, max_completion_tokens: new })
        }
        (_, Some(new)) => ("max_completion_tokens", new),
        (Some(old), None) => ("max_tokens", old),
        (None, None) => return Ok(limits.default_max_tokens.min(limits.max_tokens_limit)),
    };
    if value <= 0 {
        return Err(JobError::MaxTokensNotPositive { field, value: i64::try_from(value).unwrap_or(i64::MIN) });
    }
    match usize::try_from(value) {
        Ok(n) if n <= limits.max_tokens_limit => Ok(n),
        _ => Err(JobError::MaxTokensOverLimit {
            field,
            value: u64::try_from(value).unwrap_or(u64::MAX),
            limit: limits.max_tokens_limit,
        }),
    }
}

/// Each setting is checked alone with [`SamplingParams::validate`], so the engine's rules
/// apply and each gets its own error.
fn sampling(body: &Fields<'_>) -> Result<SamplingParams, JobError> {
    let d = SamplingParams::default();
    let temperature = body.float("temperature")?.unwrap_or(d.temperature);
    check(SamplingParams { temperature, ..SamplingParams::default() }, JobError::Temperature)?;
    let top_p = body.float("top_p")?.unwrap_or(d.top_p);
    check(SamplingParams { top_p, ..SamplingParams::default() }, JobError::TopP)?;
    let repetition_penalty = body.float("repetition_penalty")?.unwrap_or(d.repetition_penalty);
    check(SamplingParams { repetition_penalty, ..SamplingParams::default() }, JobError::RepetitionPenalty)?;
    let top_k = body.uint("top_k")?.map_or(d.top_k, |k| usize::try_from(k).unwrap_or(usize::MAX));
    Ok(SamplingParams { temperature, top_p, top_k, repetition_penalty, seed: seed(body)? })
}

fn check(params: SamplingParams, wrap: fn(String) -> JobError) -> Result<(), JobError> {
    params.validate().map_err(|e| match e {
        EngineError::InvalidSampling(m) => wrap(m),
        other => wrap(other.to_string()),
    })
}

/// OpenAI seeds are signed 64-bit; a negative one keeps its bits, so it still picks one
/// fixed stream of draws.
fn seed(body: &Fields<'_>) -> Result<Option<u64>, JobError> {
    let Some(v) = body.get("seed") else { return Ok(None) };
    let seed = v.as_u64().or_else(|| v.as_i64().map(|i| i as u64));
    seed.map(Some).ok_or_else(|| body.wrong_type("seed", "an integer", v))
}

/// A string or a list of at most four strings.
fn stop(body: &Fields<'_>) -> Result<Vec<String>, JobError> {
    match body.get("stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(list)) if list.len() > MAX_STOP_SEQUENCES => {
            Err(JobError::TooManyStops { count: list.len() })
        }
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_string).ok_or_else(|| JobError::WrongType {
                    field: format!("body.stop[{i}]"),
                    expected: "a string",
                    found: kind(v),
                })
            })
            .collect(),
        Some(other) => Err(body.wrong_type("stop", "a string or a list of up to 4 strings", other)),
    }
}
