//! Jobs: one line of the OpenAI Batch API input format as the body of a queue message, checked
//! into a [`ValidJob`] before it can reach the engine, and the OpenAI Batch API output line
//! that answers it.
//!
//! Validation happens once, up front, so that a job the engine would refuse never takes a
//! model slot, and so that a refused job is answered with a result that says what to fix
//! instead of disappearing into the dead-letter queue. Every [`JobError`] is terminal: the same
//! bytes fail the same way on every delivery.
//!
//! ```
//! use ember_worker::job::{validate, JobLimits, ResultLine};
//!
//! let limits = JobLimits::new(vec!["smollm2".into()], 2048);
//! let line = br#"{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
//!     "body": {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}}"#;
//! // The caller counts prompt tokens with the model's tokenizer; 3 stands in for it here.
//! let job = validate(line, "0b7e5c1e-6a1f-4d2b-9d5e-3f0c2a1b4c5d", &limits, &|_, _| Ok(vec![1; 3])).expect("valid");
//! assert_eq!(job.result_key, "results/default/q1.json");
//!
//! let refused = validate(b"{not json", "msg-2", &limits, &|_, _| Ok(vec![1; 3])).expect_err("refused");
//! let line = ResultLine::rejected(&refused);
//! assert_eq!(line.error_code(), Some("invalid_json"));
//! ```
//!
//! Decisions, each explained where it is made:
//! - unknown fields: top level ignored, `ember` and `body` refused ([`params`]);
//! - `custom_id` must be usable as it is as an object key component ([`key`]);
//! - the model must be one this worker serves, or `"default"` for the first of them
//!   ([`validate()`]).

mod error;
mod input;
pub mod key;
mod messages;
pub mod output;
pub mod params;
mod validate;

#[cfg(test)]
mod tests;

pub use error::JobError;
pub use key::{
    default_result_key, derived_id, error_result_key, rejected_result_key, DEFAULT_BATCH, MAX_CUSTOM_ID_BYTES,
};
pub use messages::ROLES;
pub use output::{engine_error_answer, error_body, ResultError, ResultLine, ResultResponse};
pub use validate::{
    check_budget, check_prompt_length, validate, validate_api_request, validate_chat_request, ApiRequest,
    PromptEncoder, StreamOptions, DEFAULT_MODEL,
};

use ember_engine::GenerateRequest;

/// The largest job body accepted by default: 256 KiB, Ember's own limit (not a queue's).
/// Queues carry up to 1 MiB (`queue::MAX_BODY_BYTES`), but no context window of the models
/// Ember serves needs that much text (8k tokens are about 32 KB), and refusing by size is
/// instant where tokenizing a megabyte is not.
pub const MAX_JOB_BODY_BYTES: usize = 256 * 1024;

/// What this worker accepts. Built once per process from the loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLimits {
    /// The model names this worker serves; a job's `model` must be one of them (or
    /// [`DEFAULT_MODEL`], which means the first).
    pub models: Vec<String>,
    /// The largest `max_tokens` a job may ask for.
    pub max_tokens_limit: usize,
    /// Used when a job gives no `max_tokens`.
    pub default_max_tokens: usize,
    /// The model's context in tokens; a prompt must leave room for at least one new token.
    pub context_length: usize,
    /// The largest message body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl JobLimits {
    /// Limits for a model with `context_length` tokens of context: any `max_tokens` up to the
    /// context, 512 by default, and bodies up to [`MAX_JOB_BODY_BYTES`].
    pub fn new(models: Vec<String>, context_length: usize) -> Self {
        Self {
            models,
            max_tokens_limit: context_length,
            default_max_tokens: 512.min(context_length),
            context_length,
            max_body_bytes: MAX_JOB_BODY_BYTES,
        }
    }
}

/// A job that passed every rule: the only form in which work reaches the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidJob {
    /// The queue's id for the message; result ids are derived from it so that a redelivered
    /// job writes the same result line.
    pub message_id: String,
    /// The caller's id for the line, echoed in the result.
    pub custom_id: String,
    pub request: GenerateRequest,
    /// The served model's name (`"default"` already resolved).
    pub model: String,
    /// `/v1/chat/completions` (true) or `/v1/completions` (false): decides the result body.
    pub chat: bool,
    /// Where the result line is written.
    pub result_key: String,
    pub batch_id: Option<String>,
    /// The prompt's length as the model sees it, as counted during validation.
    pub prompt_tokens: usize,
}

/// A job that was refused, with what is needed to answer it: the error result still needs an
/// id and a place to go, even when the body was not JSON at all.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedJob {
    pub message_id: String,
    /// The line's `custom_id` when it had a usable string one, the queue message id otherwise.
    pub custom_id: String,
    pub batch_id: Option<String>,
    /// The job's own result key when it got that far, [`key::rejected_result_key`] otherwise.
    pub result_key: String,
    pub error: JobError,
}
