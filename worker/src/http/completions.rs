//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, submit to the batcher as
//! an interactive request, answer whole or hand over to [`super::stream`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::respond::{engine_error, job_error, json_response};
use super::stream::{stream_response, Head};
use super::{panicked, AppState};
use crate::job::{check_budget, validate_api_request, JobError, MAX_JOB_BODY_BYTES};
use crate::openai::{completion_body, unix_now};
use ember_engine::{EngineError, Priority, Submit};

pub(super) async fn chat(state: State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    complete(state, headers, body, true).await
}

pub(super) async fn text(state: State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    complete(state, headers, body, false).await
}

/// Sets the cancel flag when dropped: the request's handler (or its stream) is gone.
pub(super) struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn complete(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    chat: bool,
) -> Response {
    let ready = match state.ready() {
        Ok(r) => r,
        Err(loading) => return *loading,
    };
    let body = match body {
        Ok(b) => b,
        // Only a body over the read limit, or a connection that broke mid-body, gets here.
        Err(rejection) => {
            let bytes = headers
                .get(axum::http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(super::READ_LIMIT + 1);
            tracing::info!(error = %rejection, "request body not read");
            return job_error(&JobError::BodyTooLarge { bytes, limit: MAX_JOB_BODY_BYTES });
        }
    };
    // Tokenizing a long prompt takes a while: off the async threads.
    let (engine, limits) = (ready.engine.clone(), ready.limits.clone());
    let checked = tokio::task::spawn_blocking(move || {
        let encode = |p: &ember_engine::Prompt, allow: bool| engine.encode(p, allow).map_err(|e| e.to_string());
        validate_api_request(&body, chat, &limits, &encode)
    })
    .await;
    let api = match checked {
        Ok(Ok(api)) => api,
        Ok(Err(e)) => return job_error(&e),
        Err(e) => return panicked(&e),
    };
    if let Err(e) = check_budget(&api.request, api.prompt_tokens, ready.batcher.budget_tokens()) {
        return job_error(&e);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    let submit = Submit {
        priority: Priority::Interactive,
        admit_within: Some(state.opts.admit_within),
        stream: api.stream.is_some(),
        cancel,
    };
    let retry_after_s = state.opts.admit_within.as_secs_f64().ceil() as u64;
    // The batcher's spans (admission, prefill, decode) hang under the span current at submit:
    // the request's, which continues the caller's `traceparent` and stays open until the
    // batcher lets go of the request.
    let span = request_span(chat, &headers);
    let submitted = span.in_scope(|| ready.batcher.submit(api.request, submit));
    let ticket = match submitted {
        Ok(t) => t,
        Err(e) => return engine_error(&e, retry_after_s),
    };
    let id = if chat {
        format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
    } else {
        format!("cmpl-{}", uuid::Uuid::new_v4().simple())
    };
    let created = unix_now();
    match api.stream {
        Some(options) => {
            let head = Head { id, model: api.model, created, chat, include_usage: options.include_usage };
            stream_response(ticket, head, guard, retry_after_s).await
        }
        None => match ticket.done.await {
            Ok(Ok(c)) => json_response(200, completion_body(&id, &api.model, created, chat, &c)),
            Ok(Err(e)) => engine_error(&e, retry_after_s),
            Err(_) => engine_error(&EngineError::Stopped, retry_after_s),
        },
    }
}

/// The server span of one request, continuing the W3C `traceparent` header if there is one
/// (and tracing is on; otherwise a disabled span that costs nothing).
fn request_span(chat: bool, headers: &HeaderMap) -> tracing::Span {
    use crate::telemetry::otel;
    let route = if chat { "/v1/chat/completions" } else { "/v1/completions" };
    let span = tracing::info_span!(
        target: otel::TARGET,
        "request",
        otel.name = format!("POST {route}"),
        otel.kind = "server",
        http.request.method = "POST",
        http.route = route,
    );
    if otel::enabled() {
        let traceparent = headers.get(otel::TRACEPARENT).and_then(|v| v.to_str().ok());
        otel::continue_from(&span, traceparent);
    }
    span
}
