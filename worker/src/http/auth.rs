//! Optional bearer-token auth, as the OpenAI API does it: `Authorization: Bearer <key>`.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use super::respond::json_response;
use super::AppState;
use crate::job::error_body;

pub(super) async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
            let message = "a valid API key is required: send `Authorization: Bearer <key>` with the key the server \
                           was started with (--api-key / EMBER_API_KEY)";
            return json_response(401, error_body(message, "invalid_request_error", None, "invalid_api_key"));
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference, so the time taken does not tell how
/// much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_compare_whole() {
        assert!(super::same(b"sk-test", b"sk-test"));
        assert!(!super::same(b"sk-test", b"sk-tesT"));
        assert!(!super::same(b"sk-test", b"sk-test2"));
        assert!(!super::same(b"", b"x"));
    }
}
