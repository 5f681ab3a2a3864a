//! Responses: JSON bodies and the OpenAI error bodies shared with batch error results.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::job::{engine_error_answer, error_body, JobError};
use ember_engine::EngineError;

pub(crate) fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// A refused request: the batch error result's body and status (413 for a body too large).
pub(super) fn job_error(e: &JobError) -> Response {
    json_response(e.http_status(), error_body(&e.to_string(), "invalid_request_error", e.param(), e.label()))
}

/// An engine error; a 429 says when to come back.
pub(super) fn engine_error(e: &EngineError, retry_after_s: u64) -> Response {
    let (status, body) = engine_error_answer(e);
    let mut response = json_response(status, body);
    if status == 429 {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s.max(1)));
    }
    response
}

pub(super) fn server_error(message: &str) -> Response {
    json_response(500, error_body(message, "server_error", None, "server_error"))
}
