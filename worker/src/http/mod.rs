//! The OpenAI-compatible HTTP server of `ember serve --http`: `POST /v1/chat/completions` and
//! `POST /v1/completions` (streamed as server-sent events, or whole), `GET /v1/models` and
//! `GET /health`, on the process's one model and one continuous batcher.
//!
//! Requests go through the same validation as queued jobs ([`crate::job`]) and get the same
//! OpenAI error bodies. They wait in the batcher ahead of queued jobs (without pushing out a
//! running one), for at most [`HttpOptions::admit_within`], then get a 429. A client that
//! disconnects drops its ticket, which frees its batch slot at the next step.
//!
//! The server listens before the model is loaded, so that `/health` can say it is loading
//! (503) rather than refuse connections; [`Readiness::set`] makes it ready.

mod auth;
mod completions;
mod respond;
mod stream;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use crate::job::{JobLimits, MAX_JOB_BODY_BYTES};
use crate::openai::{models_body, unix_now};
use crate::runner::Shutdown;
use ember_engine::{Batcher, Engine};
pub(crate) use respond::json_response;
use respond::server_error;

/// How the server answers.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Requests must carry `Authorization: Bearer <key>` when set (`/health` excepted).
    pub api_key: Option<String>,
    /// How long a request may wait for room in the batch before it is answered 429.
    pub admit_within: Duration,
}

/// What the routes need once the model is loaded.
struct Ready {
    engine: Arc<Engine>,
    batcher: Arc<Batcher>,
    limits: JobLimits,
}

#[derive(Clone)]
struct AppState {
    ready: Arc<OnceLock<Ready>>,
    opts: Arc<HttpOptions>,
}

/// Makes a listening server ready to answer, once the model is loaded.
#[derive(Clone)]
pub struct Readiness(Arc<OnceLock<Ready>>);

impl Readiness {
    /// The model and the batcher the routes use; the first call wins.
    pub fn set(&self, engine: Arc<Engine>, batcher: Arc<Batcher>) {
        let limits = JobLimits::new(vec![engine.loaded.name.clone()], engine.context_length());
        let _ = self.0.set(Ready { engine, batcher, limits });
    }
}

/// A bound listener with its routes, not serving yet.
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    state: AppState,
}

/// Bodies are read up to this size, so that one over the job limit (checked by validation,
/// with its own error) is read whole and answered, rather than cut off mid-upload (which a
/// client sees as a reset connection, not an answer).
const READ_LIMIT: usize = 16 * MAX_JOB_BODY_BYTES;

impl HttpServer {
    pub async fn bind(addr: SocketAddr, opts: HttpOptions) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Ok(Self { listener, state: AppState { ready: Arc::new(OnceLock::new()), opts: Arc::new(opts) } })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn readiness(&self) -> Readiness {
        Readiness(self.state.ready.clone())
    }

    /// Serves until `shutdown`, then lets open requests finish.
    pub async fn serve(self, shutdown: Shutdown) -> std::io::Result<()> {
        let app = routes(self.state);
        axum::serve(self.listener, app).with_graceful_shutdown(async move { shutdown.wait().await }).await
    }
}

/// The routes, ready at once, for a caller that hands them requests itself rather than
/// through a listener: the Lambda entry point answers function URL requests with them
/// ([`crate::lambda::url`]), so those get exactly the server's answers.
pub fn ready_routes(engine: Arc<Engine>, batcher: Arc<Batcher>, opts: HttpOptions) -> Router {
    let state = AppState { ready: Arc::new(OnceLock::new()), opts: Arc::new(opts) };
    Readiness(state.ready.clone()).set(engine, batcher);
    routes(state)
}

fn routes(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::text))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(READ_LIMIT))
        .with_state(state)
}

impl AppState {
    fn ready(&self) -> Result<&Ready, Box<Response>> {
        self.ready.get().ok_or_else(|| {
            Box::new(json_response(
                503,
                crate::job::error_body(
                    "the model is still loading: retry when GET /health answers 200",
                    "server_error",
                    None,
                    "model_loading",
                ),
            ))
        })
    }
}

async fn health(State(state): State<AppState>) -> Response {
    match state.ready.get() {
        None => json_response(503, json!({"status": "loading"})),
        Some(r) => {
            let batch: serde_json::Map<String, serde_json::Value> =
                r.batcher.stats().snapshot().iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            json_response(200, json!({"status": "ok", "model": r.engine.loaded.name, "batch": batch}))
        }
    }
}

async fn models(State(state): State<AppState>) -> Response {
    match state.ready() {
        Ok(r) => json_response(200, models_body(&r.limits.models, unix_now())),
        Err(loading) => *loading,
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let message = format!(
        "there is no route {}: Ember serves POST /v1/chat/completions, POST /v1/completions, GET /v1/models and GET /health",
        uri.path()
    );
    json_response(404, crate::job::error_body(&message, "invalid_request_error", None, "not_found"))
}

/// For the rare failure of a task the server spawned.
fn panicked(e: &tokio::task::JoinError) -> Response {
    tracing::error!(error = %e, "an HTTP request's task failed");
    server_error(&format!("the server failed on this request: {e}"))
}
