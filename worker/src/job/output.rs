//! OpenAI Batch API output lines, one per job, so tools written for OpenAI batch output files
//! read Ember's results.
//!
//! The shapes follow what OpenAI writes:
//! - success: `response` is `{status_code: 200, request_id, body}` with the `chat.completion`
//!   or `text_completion` object as `body`, and `error` is null;
//! - a request refused with an HTTP error (every [`JobError`](super::JobError), and an engine
//!   error about the request): `response` is `{status_code: 400, request_id, body: {"error":
//!   {message, type, param, code}}}` and `error` is null, which is what OpenAI writes to its
//!   error file for a refused request (500 and `server_error` for a failure on Ember's side);
//! - a job that got no HTTP answer at all (OpenAI's `batch_expired`, Ember's give-up after too
//!   many deliveries): `response` is null and `error` is `{code, message}`.
//!
//! Every id derives from the queue message id and `created` is a parameter, so a redelivered
//! job writes a byte-identical line when it gets the same `created` (the message's send time
//! is a good choice) and the same completion (greedy or seeded).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::key::derived_id;
use super::{RejectedJob, ValidJob};
use crate::openai::completion_body;
use ember_engine::Completion;
use ember_engine::EngineError;

/// One line of a batch output file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultLine {
    /// `batch_req_` and the id derived from the queue message id.
    pub id: String,
    pub custom_id: String,
    pub response: Option<ResultResponse>,
    pub error: Option<ResultError>,
}

/// The HTTP answer the request would have had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultResponse {
    pub status_code: u16,
    pub request_id: String,
    pub body: Value,
}

/// Why a job got no HTTP answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultError {
    pub code: String,
    pub message: String,
}

impl ResultLine {
    /// The completion of a job; `created` becomes the body's `created` (Unix seconds).
    pub fn success(job: &ValidJob, created: u64, completion: &Completion) -> Self {
        let suffix = derived_id(&job.message_id);
        let body_id = if job.chat { format!("chatcmpl-{suffix}") } else { format!("cmpl-{suffix}") };
        let body = completion_body(&body_id, &job.model, created, job.chat, completion);
        Self::answered(&job.message_id, &job.custom_id, 200, body)
    }

    /// The answer to a job that failed validation: a 400 with the rule's label as `code`.
    pub fn rejected(job: &RejectedJob) -> Self {
        let e = &job.error;
        let body = error_body(&e.to_string(), "invalid_request_error", e.param(), e.label());
        Self::answered(&job.message_id, &job.custom_id, 400, body)
    }

    /// The answer to a valid job the engine failed on for good: 400 when the engine refused the
    /// request itself, 500 otherwise.
    pub fn failed(job: &ValidJob, error: &EngineError) -> Self {
        let (status, body) = engine_error_answer(error);
        Self::answered(&job.message_id, &job.custom_id, status, body)
    }

    /// A job that got no HTTP answer, such as one given up after too many deliveries.
    pub fn not_run(message_id: &str, custom_id: &str, code: &str, message: &str) -> Self {
        Self {
            id: format!("batch_req_{}", derived_id(message_id)),
            custom_id: custom_id.to_string(),
            response: None,
            error: Some(ResultError { code: code.to_string(), message: message.to_string() }),
        }
    }

    fn answered(message_id: &str, custom_id: &str, status_code: u16, body: Value) -> Self {
        let suffix = derived_id(message_id);
        Self {
            id: format!("batch_req_{suffix}"),
            custom_id: custom_id.to_string(),
            response: Some(ResultResponse { status_code, request_id: format!("req_{suffix}"), body }),
            error: None,
        }
    }

    pub fn is_success(&self) -> bool {
        self.error.is_none() && self.response.as_ref().is_some_and(|r| r.status_code == 200)
    }

    /// The error's code wherever the line carries it (`error.code`, or the OpenAI error body's
    /// `code`), so callers need not know which kind of failure it was.
    pub fn error_code(&self) -> Option<&str> {
        if let Some(e) = &self.error {
            return Some(&e.code);
        }
        let r = self.response.as_ref().filter(|r| r.status_code != 200)?;
        r.body.get("error")?.get("code")?.as_str()
    }

    /// The line as compact JSON, without the trailing newline. Fields come out in a fixed
    /// order, so the same line always gives the same bytes.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

/// The HTTP status and OpenAI error body for an engine error: 400 when the engine refused
/// the request itself, 429 when it had no room for it, 500 otherwise.
pub fn engine_error_answer(error: &EngineError) -> (u16, Value) {
    let (status, kind) = match error {
        EngineError::InvalidSampling(_) | EngineError::PromptTooLong { .. } | EngineError::EmptyPrompt => {
            (400, "invalid_request_error")
        }
        EngineError::Overloaded { .. } => (429, "rate_limit_error"),
        _ => (500, "server_error"),
    };
    (status, error_body(&error.to_string(), kind, None, error.label()))
}

/// An OpenAI API error body.
pub fn error_body(message: &str, kind: &str, param: Option<String>, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{key::rejected_result_key, JobError};
    use ember_engine::{FinishReason, GenerateRequest, Prompt, SamplingParams, Usage};

    const MSG: &str = "0b7e5c1e-6a1f-4d2b-9d5e-3f0c2a1b4c5d";

    fn job(chat: bool) -> ValidJob {
        ValidJob {
            message_id: MSG.into(),
            custom_id: "q1".into(),
            request: GenerateRequest {
                allow_special_tokens: false,
                prompt_ids: None,
                prompt: Prompt::Text("Hi".into()),
                max_tokens: 4,
                sampling: SamplingParams::default(),
                stop: vec![],
            },
            model: "smollm2".into(),
            chat,
            result_key: "results/default/q1.json".into(),
            batch_id: None,
            prompt_tokens: 1,
        }
    }

    fn completion() -> Completion {
        Completion {
            text: "Paris".into(),
            tokens: vec![7],
            finish_reason: FinishReason::Stop,
            usage: Usage { prompt_tokens: 5, completion_tokens: 1, total_tokens: 6 },
            timings: Default::default(),
        }
    }

    #[test]
    fn a_success_line_has_openais_fields_and_round_trips() -> Result<(), serde_json::Error> {
        let line = ResultLine::success(&job(true), 1_700_000_000, &completion());
        let text = line.to_json()?;
        let v: Value = serde_json::from_str(&text)?;
        assert_eq!(v["id"], "batch_req_0b7e5c1e6a1f4d2b9d5e3f0c2a1b4c5d");
        assert_eq!(v["custom_id"], "q1");
        assert_eq!(v["error"], Value::Null);
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["request_id"], "req_0b7e5c1e6a1f4d2b9d5e3f0c2a1b4c5d");
        let body = &v["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["id"], "chatcmpl-0b7e5c1e6a1f4d2b9d5e3f0c2a1b4c5d");
        assert_eq!(body["created"], 1_700_000_000);
        assert_eq!(body["model"], "smollm2");
        assert_eq!(body["choices"][0]["message"]["content"], "Paris");
        assert_eq!(body["usage"]["total_tokens"], 6);
        assert_eq!(serde_json::from_str::<ResultLine>(&text)?, line);
        assert!(line.is_success() && line.error_code().is_none());
        // A redelivery with the same `created` writes the same bytes.
        assert_eq!(ResultLine::success(&job(true), 1_700_000_000, &completion()).to_json()?, text);
        let text_line = ResultLine::success(&job(false), 1, &completion());
        assert_eq!(text_line.response.map(|r| r.body["object"].clone()), Some(json!("text_completion")));
        Ok(())
    }

    #[test]
    fn a_rejected_line_is_an_openai_400() -> Result<(), serde_json::Error> {
        let rejected = RejectedJob {
            message_id: MSG.into(),
            custom_id: MSG.into(),
            batch_id: None,
            result_key: rejected_result_key(None, MSG),
            error: JobError::EmptyMessages,
        };
        let line = ResultLine::rejected(&rejected);
        let v: Value = serde_json::from_str(&line.to_json()?)?;
        assert_eq!(v["error"], Value::Null);
        assert_eq!(v["response"]["status_code"], 400);
        let err = &v["response"]["body"]["error"];
        assert_eq!(err["type"], "invalid_request_error");
        assert_eq!(err["code"], "empty_messages");
        assert_eq!(err["param"], "body.messages");
        assert_eq!(err["message"], JobError::EmptyMessages.to_string());
        assert_eq!(serde_json::from_value::<ResultLine>(v)?, line);
        assert!(!line.is_success());
        assert_eq!(line.error_code(), Some("empty_messages"));
        Ok(())
    }

    #[test]
    fn engine_failures_and_lines_never_run() -> Result<(), serde_json::Error> {
        let bad = ResultLine::failed(&job(true), &EngineError::NumericalError("NaN".into()));
        assert_eq!(bad.response.as_ref().map(|r| r.status_code), Some(500));
        assert_eq!(bad.error_code(), Some("numerical_error"));
        let gone = ResultLine::not_run(MSG, "q1", "max_receives", "gave up after 5 deliveries");
        let v: Value = serde_json::from_str(&gone.to_json()?)?;
        assert_eq!(v["response"], Value::Null);
        assert_eq!(v["error"]["code"], "max_receives");
        assert_eq!(gone.error_code(), Some("max_receives"));
        Ok(())
    }
}
