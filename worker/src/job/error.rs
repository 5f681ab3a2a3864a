//! Why a job was refused: one variant per rule, each message saying what to change.
//!
//! All of them are terminal. They depend only on the message body and on this worker's fixed
//! limits, so a redelivery would fail the same way; the job gets an error result and goes to
//! the dead-letter queue instead of being retried.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Error)]
pub enum JobError {
    #[error("the message body is {bytes} bytes, over the {limit}-byte limit: shorten the prompt")]
    BodyTooLarge { bytes: usize, limit: usize },
    #[error(
        "the message body is not UTF-8: the bytes at offset {at} are not valid UTF-8; send JSON text encoded as UTF-8"
    )]
    NotUtf8 { at: usize },
    #[error("the message body is not valid JSON: {message}")]
    NotJson { line: usize, column: usize, message: String },
    #[error("the message body is {found}, not a JSON object: send one OpenAI batch input line, {{\"custom_id\", \"method\", \"url\", \"body\"}}")]
    NotAnObject { found: &'static str },
    #[error("`{field}` must be {expected}, got {found}")]
    WrongType { field: String, expected: &'static str, found: &'static str },
    #[error("`custom_id` is missing or empty: give every line a unique custom_id, it is how results are matched to requests")]
    MissingCustomId,
    #[error("`custom_id` {reason}: it names the result object, so keep it to letters, digits, '-', '_' and '.'")]
    InvalidCustomId { reason: String },
    #[error("`ember.batch_id` {reason}: it names the results folder, so keep it to letters, digits, '-', '_' and '.'")]
    InvalidBatchId { reason: String },
    #[error("`ember.result_key` is not accepted: a job's result always goes to results/{{batch_id}}/{{custom_id}}.json, so that no job can write where another job's result (or a pipeline's record) belongs; remove it and choose `custom_id` and `ember.batch_id` instead")]
    ResultKeyNotAllowed,
    #[error("`ember.{field}` is not an Ember option: the `ember` object takes `batch_id`, `allow_special_tokens` and `traceparent`")]
    UnknownEmberField { field: String },
    #[error("`ember.allow_special_tokens` must be true or false")]
    InvalidSpecialTokensOption,
    #[error("`custom_id` {custom_id:?} was already used by another job of batch {batch:?}, which was answered first: give every job of a batch its own custom_id")]
    DuplicateCustomId { custom_id: String, batch: String },
    #[error("`method` is {method:?}: batch lines must use \"POST\"")]
    WrongMethod { method: String },
    #[error("`url` is {url:?}: Ember serves \"/v1/chat/completions\" and \"/v1/completions\"")]
    UnsupportedUrl { url: String },
    #[error("`body` is missing: put the request (model, messages or prompt, max_tokens...) in a `body` object")]
    MissingBody,
    #[error("`body.model` is missing or empty: name one of the served models ({}) or \"default\"", .served.join(", "))]
    MissingModel { served: Vec<String> },
    #[error("model {model:?} is not served by this worker: use one of {} or \"default\"", .served.join(", "))]
    UnknownModel { model: String, served: Vec<String> },
    #[error("`body.{param}` is not a parameter Ember knows: remove it (check its spelling)")]
    UnknownParameter { param: String },
    #[error("`body.{param}` = {value} is not supported: Ember returns one plain-text completion per job, without streaming, logprobs, penalties or tools; remove it or set its default")]
    UnsupportedParameter { param: String, value: String },
    #[error("`body.messages` is missing: a /v1/chat/completions job needs a list of {{role, content}} messages (send a plain `prompt` to /v1/completions)")]
    MissingMessages,
    #[error("`body.messages` is empty: give at least one message")]
    EmptyMessages,
    #[error("`body.messages[{index}].role` is {role:?}: use system, developer, user or assistant")]
    UnknownRole { index: usize, role: String },
    #[error("`body.messages[{index}].content` has no text: give every message some content")]
    EmptyContent { index: usize },
    #[error("`body.messages[{index}].content` has a part of type {part_type:?}: Ember reads only {{\"type\": \"text\"}} parts")]
    UnsupportedContentPart { index: usize, part_type: String },
    #[error("`body.prompt` is missing: a /v1/completions job needs a prompt string (send chat `messages` to /v1/chat/completions)")]
    MissingPrompt,
    #[error("`body.prompt` is empty: give some prompt text")]
    EmptyPrompt,
    #[error("`body.{field}` is {value}: ask for at least 1 token")]
    MaxTokensNotPositive { field: &'static str, value: i64 },
    #[error("`body.{field}` is {value}, over this worker's limit of {limit}: ask for at most {limit} tokens")]
    MaxTokensOverLimit { field: &'static str, value: u64, limit: usize },
    #[error("`body.max_tokens` ({max_tokens}) and `body.max_completion_tokens` ({max_completion_tokens}) disagree: give only one")]
    ConflictingMaxTokens { max_tokens: i128, max_completion_tokens: i128 },
    #[error("`body.temperature`: {0}")]
    Temperature(String),
    #[error("`body.top_p`: {0}")]
    TopP(String),
    #[error("`body.repetition_penalty`: {0}")]
    RepetitionPenalty(String),
    #[error("`body.stop` has {count} sequences: give at most 4")]
    TooManyStops { count: usize },
    #[error("the prompt could not be turned into tokens: {0}")]
    PromptEncoding(String),
    #[error("the prompt is {prompt_tokens} tokens but the model's context is {context} tokens: shorten the prompt to under {context} tokens")]
    PromptTooLong { prompt_tokens: usize, context: usize },
    #[error("the prompt and max_tokens need {tokens} tokens of KV cache, more than this server's whole budget of {budget}: lower max_tokens or shorten the prompt")]
    OverMemoryBudget { tokens: usize, budget: usize },
}

impl JobError {
    /// A stable name for logs, metrics and the `code` of the error result.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::NotUtf8 { .. } => "not_utf8",
            Self::NotJson { .. } => "invalid_json",
            Self::NotAnObject { .. } => "not_an_object",
            Self::WrongType { .. } => "invalid_type",
            Self::MissingCustomId => "missing_custom_id",
            Self::InvalidCustomId { .. } => "invalid_custom_id",
            Self::InvalidBatchId { .. } => "invalid_batch_id",
            Self::ResultKeyNotAllowed => "result_key_not_allowed",
            Self::InvalidSpecialTokensOption => "invalid_ember_option",
            Self::DuplicateCustomId { .. } => "duplicate_custom_id",
            Self::UnknownEmberField { .. } => "unknown_ember_field",
            Self::WrongMethod { .. } => "unsupported_method",
            Self::UnsupportedUrl { .. } => "unsupported_url",
            Self::MissingBody => "missing_body",
            Self::MissingModel { .. } => "missing_model",
            Self::UnknownModel { .. } => "model_not_found",
            Self::UnknownParameter { .. } => "unknown_parameter",
            Self::UnsupportedParameter { .. } => "unsupported_parameter",
            Self::MissingMessages => "missing_messages",
            Self::EmptyMessages => "empty_messages",
            Self::UnknownRole { .. } => "unknown_role",
            Self::EmptyContent { .. } => "empty_content",
            Self::UnsupportedContentPart { .. } => "unsupported_content_part",
            Self::MissingPrompt => "missing_prompt",
            Self::EmptyPrompt => "empty_prompt",
            Self::MaxTokensNotPositive { .. } => "max_tokens_not_positive",
            Self::MaxTokensOverLimit { .. } => "max_tokens_over_limit",
            Self::ConflictingMaxTokens { .. } => "conflicting_max_tokens",
            Self::Temperature(_) => "invalid_temperature",
            Self::TopP(_) => "invalid_top_p",
            Self::RepetitionPenalty(_) => "invalid_repetition_penalty",
            Self::TooManyStops { .. } => "too_many_stop_sequences",
            Self::PromptEncoding(_) => "prompt_encoding",
            Self::PromptTooLong { .. } => "context_length_exceeded",
            Self::OverMemoryBudget { .. } => "kv_budget_exceeded",
        }
    }

    /// The HTTP status of the answer: 413 for a body over the size limit, 400 otherwise.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::BodyTooLarge { .. } => 413,
            _ => 400,
        }
    }

    /// Never: see the module docs. Kept as a method so callers treat every error the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }

    /// The request parameter at fault, for the `param` of an OpenAI error body.
    pub fn param(&self) -> Option<String> {
        let fixed = |p: &str| Some(p.to_string());
        match self {
            Self::WrongType { field, .. } => Some(field.clone()),
            Self::UnknownParameter { param } | Self::UnsupportedParameter { param, .. } => {
                Some(format!("body.{param}"))
            }
            Self::MaxTokensNotPositive { field, .. } | Self::MaxTokensOverLimit { field, .. } => {
                Some(format!("body.{field}"))
            }
            Self::UnknownRole { index, .. } => Some(format!("body.messages[{index}].role")),
            Self::EmptyContent { index } | Self::UnsupportedContentPart { index, .. } => {
                Some(format!("body.messages[{index}].content"))
            }
            Self::MissingCustomId | Self::InvalidCustomId { .. } => fixed("custom_id"),
            Self::InvalidBatchId { .. } => fixed("ember.batch_id"),
            Self::ResultKeyNotAllowed => fixed("ember.result_key"),
            Self::InvalidSpecialTokensOption => fixed("ember.allow_special_tokens"),
            Self::DuplicateCustomId { .. } => fixed("custom_id"),
            Self::UnknownEmberField { field } => Some(format!("ember.{field}")),
            Self::WrongMethod { .. } => fixed("method"),
            Self::UnsupportedUrl { .. } => fixed("url"),
            Self::MissingBody => fixed("body"),
            Self::MissingModel { .. } | Self::UnknownModel { .. } => fixed("body.model"),
            Self::MissingMessages | Self::EmptyMessages => fixed("body.messages"),
            Self::MissingPrompt | Self::EmptyPrompt => fixed("body.prompt"),
            Self::ConflictingMaxTokens { .. } => fixed("body.max_tokens"),
            Self::Temperature(_) => fixed("body.temperature"),
            Self::TopP(_) => fixed("body.top_p"),
            Self::RepetitionPenalty(_) => fixed("body.repetition_penalty"),
            Self::TooManyStops { .. } => fixed("body.stop"),
            // Whole-body faults, and the prompt length, which is messages or prompt.
            Self::BodyTooLarge { .. }
            | Self::NotUtf8 { .. }
            | Self::NotJson { .. }
            | Self::NotAnObject { .. }
            | Self::PromptEncoding(_)
            | Self::PromptTooLong { .. }
            | Self::OverMemoryBudget { .. } => None,
        }
    }
}
