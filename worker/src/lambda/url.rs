//! Lambda function URL requests (`LambdaFunctionUrlRequest`), answered by the HTTP server's own
//! routes ([`crate::http::ready_routes`]): the same validation, error bodies, OpenAI objects and
//! batcher as `ember serve --http`, with no second implementation. The event becomes an
//! `http::Request`, the routes answer it, and the answer goes back to Lambda in one of two ways,
//! which must match the function URL's `InvokeMode`:
//! - [`UrlMode::Streamed`] (`RESPONSE_STREAM`): a streamed response, the status and headers in
//!   the metadata prelude, then the body as it is made, so server-sent events reach the client
//!   token by token;
//! - [`UrlMode::Buffered`] (`BUFFERED`, the default): the whole answer as a
//!   `LambdaFunctionUrlResponse` (`statusCode`, `headers`, `body`, `isBase64Encoded`). A stream
//!   (`"stream": true`) still works, arriving all at once.
//!
//! The event cannot tell which invoke mode the URL has, hence the choice is an option
//! (`ember lambda --url-streaming`). An API Gateway HTTP API (payload format 2.0) sends the
//! same event shape and is answered the same way, buffered.
//!
//! ```no_run
//! # async fn run(engine: std::sync::Arc<ember_engine::Engine>, batcher: std::sync::Arc<ember_engine::Batcher>) -> Result<(), Box<dyn std::error::Error>> {
//! use ember_worker::http::{ready_routes, HttpOptions};
//! use ember_worker::lambda::url::{is_url_request, UrlMode, UrlRoutes};
//!
//! let opts = HttpOptions { api_key: None, admit_within: std::time::Duration::from_secs(30) };
//! let urls = UrlRoutes::new(ready_routes(engine, batcher, opts), UrlMode::Streamed);
//! let event = serde_json::json!({"rawPath": "/health", "headers": {}, "isBase64Encoded": false,
//!     "requestContext": {"timeEpoch": 0, "http": {"method": "GET", "path": "/health"}}});
//! assert!(is_url_request(&event));
//! let answer = urls.answer(event, None).await?; // a lambda_runtime::FunctionResponse
//! # let _ = answer; Ok(()) }
//! ```

use aws_lambda_events::event::lambda_function_urls::{LambdaFunctionUrlRequest, LambdaFunctionUrlResponse};
use axum::body::{Body, BodyDataStream};
use axum::http::{header, HeaderMap, Method, Request, Uri};
use axum::response::Response;
use axum::Router;
use base64::Engine as _;
use lambda_runtime::{FunctionResponse, MetadataPrelude, StreamResponse};
use serde_json::Value;
use tower::ServiceExt;

/// How answers go back to Lambda; it must match the function URL's `InvokeMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlMode {
    Buffered,
    Streamed,
}

/// A streamed answer's body.
pub type AnswerStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<bytes::Bytes, axum::Error>> + Send>>;

/// What the handler answers a function URL request with: a JSON response object, or a stream.
pub type UrlAnswer = FunctionResponse<Value, AnswerStream>;

/// What a request that reached the invocation's deadline is answered with: a 504 before any
/// of the answer was sent, or this event at the end of a stream already under way.
fn deadline_message() -> String {
    "the answer was not done by the function's deadline (its timeout, less a margin to answer \
     in): ask for fewer tokens (max_tokens), or raise the function's timeout"
        .to_string()
}

/// Why a function URL event got no HTTP answer; the invocation fails with it.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("the event looks like a function URL request (requestContext.http) but is not one: {0}")]
    Event(#[source] serde_json::Error),
    #[error("the function URL request has no usable method: {0:?}")]
    Method(Option<String>),
    #[error("the function URL request's path {0:?} is not a URI path")]
    Path(String),
    #[error("the function URL request's body is marked base64 but is not: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("the function URL request could not be built: {0}")]
    Request(#[from] axum::http::Error),
    #[error("the answer's body could not be read: {0}")]
    Body(#[from] axum::Error),
    #[error("the answer could not be encoded: {0}")]
    Encode(#[source] serde_json::Error),
}

impl UrlError {
    /// A stable label, the `errorType` of the failed invocation.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Event(_) | Self::Method(_) | Self::Path(_) | Self::Base64(_) | Self::Request(_) => {
                "Ember.BadUrlEvent"
            }
            Self::Body(_) | Self::Encode(_) => "Ember.Internal",
        }
    }
}

/// An HTTP request event: a function URL's, or an API Gateway HTTP API's (the same shape).
/// SQS batches have `Records` and pipeline tasks `task`, never `requestContext.http`.
pub fn is_url_request(event: &Value) -> bool {
    event.pointer("/requestContext/http/method").is_some_and(Value::is_string)
}

/// The HTTP server's routes, answering function URL events.
#[derive(Clone)]
pub struct UrlRoutes {
    routes: Router,
    mode: UrlMode,
}

impl UrlRoutes {
    pub fn new(routes: Router, mode: UrlMode) -> Self {
        Self { routes, mode }
    }

    pub fn mode(&self) -> UrlMode {
        self.mode
    }

    /// Answers one function URL event, by `cut` at the latest (the invocation's deadline less
    /// a margin; None: no limit). A request still unanswered then gets a 504 with an OpenAI
    /// error body, and a stream under way gets an error event and ends, where Lambda would
    /// otherwise kill the invocation and the client see a bare 502. Dropping a streamed answer
    /// before its end (the client went away, or the cut) drops the request's batcher ticket,
    /// which frees its batch slot.
    pub async fn answer(&self, event: Value, cut: Option<tokio::time::Instant>) -> Result<UrlAnswer, UrlError> {
        let event: LambdaFunctionUrlRequest = serde_json::from_value(event).map_err(UrlError::Event)?;
        let late = || {
            tracing::warn!(mode = ?self.mode, "function URL request cut at the invocation's deadline");
            let body = crate::job::error_body(&deadline_message(), "server_error", None, "timeout");
            crate::http::json_response(504, body)
        };
        let response = match http_request(event) {
            Ok(request) => match until(cut, self.routes.clone().oneshot(request)).await {
                Some(Ok(r)) => r,
                Some(Err(never)) => match never {},
                None => late(),
            },
            // A request the function URL passed on that is not valid HTTP (a body marked
            // base64 that is not, an unknown method, a path that is no URI) is the client's
            // error: answered 400 as a server answers it, not a failed invocation, which the
            // function URL turns into a 502 with no body.
            Err(e @ (UrlError::Method(_) | UrlError::Path(_) | UrlError::Base64(_) | UrlError::Request(_))) => {
                tracing::warn!(error = %e, "function URL request refused");
                let body = crate::job::error_body(&e.to_string(), "invalid_request_error", None, "bad_request");
                crate::http::json_response(400, body)
            }
            Err(e) => return Err(e),
        };
        tracing::info!(status = response.status().as_u16(), mode = ?self.mode, "function URL request answered");
        match self.mode {
            UrlMode::Streamed => Ok(FunctionResponse::StreamingResponse(streamed(response, cut))),
            UrlMode::Buffered => match until(cut, buffered(response)).await {
                Some(out) => Ok(FunctionResponse::BufferedResponse(out?)),
                None => Ok(FunctionResponse::BufferedResponse(buffered(late()).await?)),
            },
        }
    }
}

/// `work`'s output, unless `cut` comes first.
async fn until<F: std::future::Future>(cut: Option<tokio::time::Instant>, work: F) -> Option<F::Output> {
    match cut {
        Some(at) => tokio::time::timeout_at(at, work).await.ok(),
        None => Some(work.await),
    }
}

/// The event as the request the routes take.
pub fn http_request(event: LambdaFunctionUrlRequest) -> Result<Request<Body>, UrlError> {
    let http = &event.request_context.http;
    let method = http
        .method
        .as_deref()
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or_else(|| UrlError::Method(http.method.clone()))?;
    let path = event.raw_path.clone().or_else(|| http.path.clone()).unwrap_or_else(|| "/".to_string());
    let target = match event.raw_query_string.as_deref().filter(|q| !q.is_empty()) {
        Some(query) => format!("{path}?{query}"),
        None => path.clone(),
    };
    let uri: Uri = target.parse().map_err(|_| UrlError::Path(path))?;
    let body = match event.body {
        None => Vec::new(),
        Some(b) if event.is_base64_encoded => base64::engine::general_purpose::STANDARD.decode(b)?,
        Some(b) => b.into_bytes(),
    };
    let mut request = Request::builder().method(method).uri(uri).body(Body::from(body))?;
    *request.headers_mut() = event.headers;
    // Function URLs (payload format 2.0) take the request's cookies out of its headers.
    let cookies = event.cookies.unwrap_or_default().join("; ");
    if let (false, Ok(value)) = (cookies.is_empty(), axum::http::HeaderValue::from_str(&cookies)) {
        request.headers_mut().insert(header::COOKIE, value);
    }
    // The body is whole here, whatever the client's framing was.
    request.headers_mut().remove(header::TRANSFER_ENCODING);
    Ok(request)
}

/// The answer as a stream: status and headers first (the metadata prelude), then the body as
/// it is made, up to `cut`: a body still going then gets a server-sent error event (the shape
/// OpenAI's streams use for errors) and ends, without the `[DONE]` a finished stream has.
pub fn streamed(response: Response, cut: Option<tokio::time::Instant>) -> StreamResponse<AnswerStream> {
    use futures::StreamExt;
    let (parts, body) = response.into_parts();
    let mut headers = parts.headers;
    // Lambda frames a streamed body itself.
    headers.remove(header::CONTENT_LENGTH);
    let prelude = MetadataPrelude { status_code: parts.status, headers, cookies: Vec::new() };
    let Some(at) = cut else {
        return StreamResponse { metadata_prelude: prelude, stream: Box::pin(body.into_data_stream()) };
    };
    // State: the body, until it ends or is cut (then None).
    let stream = futures::stream::unfold(Some(body.into_data_stream()), move |state| async move {
        let mut body: BodyDataStream = state?;
        tokio::select! {
            // What the body has ready goes out first, even once the cut is past.
            biased;
            item = body.next() => item.map(|item| (item, Some(body))),
            _ = tokio::time::sleep_until(at) => {
                tracing::warn!("function URL stream cut at the invocation's deadline");
                let error = crate::job::error_body(&deadline_message(), "server_error", None, "timeout");
                Some((Ok(bytes::Bytes::from(format!("data: {error}\n\n"))), None))
            }
        }
    });
    StreamResponse { metadata_prelude: prelude, stream: Box::pin(stream) }
}

/// The whole answer, as a `LambdaFunctionUrlResponse` object.
pub async fn buffered(response: Response) -> Result<Value, UrlError> {
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await?;
    let mut out = LambdaFunctionUrlResponse::default();
    out.status_code = i64::from(parts.status.as_u16());
    out.headers = single_valued(&parts.headers);
    (out.body, out.is_base64_encoded) = match String::from_utf8(bytes.to_vec()) {
        Ok(text) => (Some(text), false),
        Err(_) => (Some(base64::engine::general_purpose::STANDARD.encode(&bytes)), true),
    };
    serde_json::to_value(out).map_err(UrlError::Encode)
}

/// The response object has one value per header name: repeated ones are joined with commas,
/// as HTTP allows.
fn single_valued(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in headers.keys() {
        let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
        if let Ok(value) = axum::http::HeaderValue::from_bytes(&values.join(&b", "[..])) {
            out.insert(name.clone(), value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn event_json(method: &str, body: Option<&str>, base64: bool) -> Value {
        let mut e = json!({"rawPath": "/v1/chat/completions", "rawQueryString": "a=1",
            "headers": {"content-type": "application/json"}, "isBase64Encoded": base64,
            "requestContext": {"timeEpoch": 0, "http": {"method": method, "path": "/v1/chat/completions"}}});
        if let Some(b) = body {
            e["body"] = json!(b);
        }
        e
    }

    fn event(method: &str, body: Option<&str>, base64: bool) -> Result<LambdaFunctionUrlRequest, serde_json::Error> {
        serde_json::from_value(event_json(method, body, base64))
    }

    #[tokio::test]
    async fn events_become_requests() -> TestResult {
        let r = http_request(event("POST", Some("{\"a\":1}"), false)?)?;
        assert_eq!((r.method(), r.uri().path(), r.uri().query()), (&Method::POST, "/v1/chat/completions", Some("a=1")));
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert!(!r.headers().contains_key(header::COOKIE));
        let mut with_cookies = event_json("GET", None, false);
        with_cookies["cookies"] = json!(["a=1", "b=2"]);
        let r = http_request(serde_json::from_value(with_cookies)?)?;
        assert_eq!(r.headers()[header::COOKIE], "a=1; b=2");
        let body = axum::body::to_bytes(http_request(event("POST", Some("eyJhIjoxfQ=="), true)?)?.into_body(), 64);
        assert_eq!(body.await?, "{\"a\":1}");
        assert!(matches!(http_request(event("POST", Some("not base64!"), true)?), Err(UrlError::Base64(_))));
        assert!(matches!(http_request(event("", None, false)?), Err(UrlError::Method(_))));
        Ok(())
    }

    #[tokio::test]
    async fn a_malformed_request_is_answered_400_not_failed() -> TestResult {
        let routes = UrlRoutes::new(Router::new(), UrlMode::Buffered);
        let answer = routes.answer(event_json("POST", Some("not base64!"), true), None).await?;
        let FunctionResponse::BufferedResponse(out) = answer else {
            return Err("expected a buffered answer".into());
        };
        assert_eq!(out["statusCode"], 400);
        let body: Value = serde_json::from_str(out["body"].as_str().ok_or("no body")?)?;
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("base64")), "{body}");
        Ok(())
    }

    /// A request still unanswered at the cut gets a 504 with an OpenAI error body, in either
    /// mode, instead of running into Lambda's timeout (a bare 502). Time is paused: the cut
    /// comes when nothing else can happen, whatever the machine's speed.
    #[tokio::test(start_paused = true)]
    async fn a_request_unanswered_at_the_deadline_gets_a_504() -> TestResult {
        let never = axum::routing::post(std::future::pending::<&'static str>);
        for mode in [UrlMode::Buffered, UrlMode::Streamed] {
            let routes = UrlRoutes::new(Router::new().route("/v1/chat/completions", never.clone()), mode);
            let cut = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            let answer = routes.answer(event_json("POST", Some("{}"), false), Some(cut)).await?;
            let (status, body) = match answer {
                FunctionResponse::BufferedResponse(out) => {
                    (out["statusCode"].clone(), out["body"].as_str().unwrap_or("").to_string())
                }
                FunctionResponse::StreamingResponse(s) => {
                    let chunks: Vec<_> = futures::StreamExt::collect::<Vec<_>>(s.stream).await;
                    let text: String = chunks
                        .into_iter()
                        .map(|c| c.map(|b| String::from_utf8_lossy(&b).into_owned()))
                        .collect::<Result<_, _>>()?;
                    (json!(s.metadata_prelude.status_code.as_u16()), text)
                }
            };
            assert_eq!(status, 504, "{mode:?}");
            let body: Value = serde_json::from_str(&body)?;
            assert_eq!(body["error"]["code"], "timeout", "{mode:?}");
            assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("max_tokens")), "{body}");
        }
        Ok(())
    }

    /// A stream under way at the cut ends with an error event after what was already sent,
    /// and without `[DONE]`; a stream that ends before the cut is left as it is.
    #[tokio::test(start_paused = true)]
    async fn a_stream_under_way_at_the_deadline_ends_with_an_error_event() -> TestResult {
        use futures::StreamExt;
        fn first() -> impl futures::Stream<Item = Result<&'static str, std::convert::Infallible>> + Send {
            futures::stream::iter([Ok("data: {\"n\":1}\n\n")])
        }
        let routes = |body: fn() -> Body| {
            let handler = axum::routing::post(move || async move { body() });
            UrlRoutes::new(Router::new().route("/v1/chat/completions", handler), UrlMode::Streamed)
        };
        let read = |answer: UrlAnswer| async move {
            let FunctionResponse::StreamingResponse(s) = answer else { return Err("not a stream".to_string()) };
            let chunks: Vec<_> = s.stream.collect().await;
            chunks
                .into_iter()
                .map(|c| c.map(|b| String::from_utf8_lossy(&b).into_owned()).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()
        };
        let cut = || Some(tokio::time::Instant::now() + std::time::Duration::from_secs(5));

        let stalls = routes(|| Body::from_stream(first().chain(futures::stream::pending())));
        let chunks = read(stalls.answer(event_json("POST", Some("{}"), false), cut()).await?).await?;
        assert_eq!(chunks.len(), 2, "{chunks:?}");
        assert_eq!(chunks[0], "data: {\"n\":1}\n\n");
        let event: Value = serde_json::from_str(chunks[1].trim().trim_start_matches("data: "))?;
        assert_eq!(event["error"]["code"], "timeout");

        let ends = routes(|| Body::from_stream(first()));
        let chunks = read(ends.answer(event_json("POST", Some("{}"), false), cut()).await?).await?;
        assert_eq!(chunks, ["data: {\"n\":1}\n\n"]);
        Ok(())
    }

    #[test]
    fn only_http_events_are_url_requests() {
        assert!(is_url_request(&json!({"requestContext": {"http": {"method": "GET"}}})));
        assert!(!is_url_request(&json!({"Records": []})));
        assert!(!is_url_request(&json!({"task": "ember:generate", "input": {}})));
    }

    #[tokio::test]
    async fn buffered_answers_are_response_objects() -> TestResult {
        let mut response = Response::new(Body::from("{\"ok\":true}"));
        response.headers_mut().append("x-a", "1".parse()?);
        response.headers_mut().append("x-a", "2".parse()?);
        let out = buffered(response).await?;
        assert_eq!(out["statusCode"], 200);
        assert_eq!(out["body"], "{\"ok\":true}");
        assert_eq!(out["isBase64Encoded"], false);
        assert_eq!(out["headers"]["x-a"], "1, 2");
        let binary = buffered(Response::new(Body::from(vec![0xff, 0xfe]))).await?;
        assert_eq!((binary["body"].as_str(), &binary["isBase64Encoded"]), (Some("//4="), &json!(true)));
        Ok(())
    }
}
