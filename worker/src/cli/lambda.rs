//! `ember lambda`: the AWS Lambda entry point for SQS events. The model loads once per
//! container, before the first event; every invocation then runs its records through the
//! shared [`JobHandler`] with [`run_batch`] and answers with the records to deliver again.
//!
//! It also answers pipeline task events, `{"task": "ember:generate" | "ember:tool:NAME",
//! "input": ...}`, which pipelines exported with `ember pipeline export` send from AWS Step
//! Functions: the answer is the task's result, exactly what Ember's own hop would get; a failed
//! task fails the invocation with the task's error name as `errorType`, so the state's `Retry`
//! and `Catch` match it as they would in Ember.
//!
//! And it answers Lambda function URL requests (`requestContext.http`) with the HTTP server's
//! routes ([`crate::lambda::url`]): `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models`, `GET /health`, streamed with `--url-streaming` (the URL's `InvokeMode`
//! `RESPONSE_STREAM`). One handler takes every event as JSON and dispatches on its shape;
//! `lambda_runtime` lets each invocation answer either way, so SQS batches and tasks answer
//! buffered JSON as before while URL requests stream. Jobs, tasks and URL requests share the
//! one model and the one continuous batcher.
//!
//! Needs `AWS_LAMBDA_RUNTIME_API` (set by Lambda, or by a local emulator such as
//! `cargo lambda watch`). The event source mapping must have `ReportBatchItemFailures`, and
//! the queue a redrive policy whose `maxReceiveCount` is `--max-receive-count`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use ember_engine::Batcher;
use ember_orchestrator::pipeline::{TaskContext, TaskRunner};
use lambda_runtime::{service_fn, Diagnostic, FunctionResponse, LambdaEvent};
use serde_json::Value;

use super::backends::StoreArgs;
use super::common::{AwsArgs, ModelArgs};
use super::serve::{load_engine, BatchArgs};
use crate::http::{ready_routes, HttpOptions};
use crate::lambda::url::{is_url_request, UrlAnswer, UrlMode, UrlRoutes};
use crate::lambda::{run_batch, usable_deadline, BatchOptions};
use crate::pipeline::ModelRunner;
use crate::runner::{DeadLetters, JobHandler};
use crate::telemetry::otel;

#[derive(Debug, clap::Args)]
pub struct LambdaArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Milliseconds before the invocation's deadline after which no further record is
    /// started; the rest are reported for another delivery. Leave room for one job.
    #[arg(long, env = "EMBER_DEADLINE_MARGIN_MS", default_value_t = 15_000)]
    pub deadline_margin_ms: u64,
    /// Milliseconds before the deadline at which a running generation is cancelled and its
    /// record reported, so that the function answers instead of timing out.
    #[arg(long, env = "EMBER_CANCEL_MARGIN_MS", default_value_t = 2_000)]
    pub cancel_margin_ms: u64,
    /// The source queue's `maxReceiveCount`: on the last delivery a job that keeps failing
    /// gets an error result before the redrive policy moves it to the DLQ.
    #[arg(long, env = "EMBER_MAX_RECEIVE_COUNT", default_value_t = 3)]
    pub max_receive_count: u32,
    /// Hosts `ember:tool:http_get` may reach in pipeline task events (comma-separated).
    #[arg(long, env = "EMBER_HTTP_ALLOW", value_delimiter = ',')]
    pub http_allow: Vec<String>,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Answer function URL requests as streamed responses (the URL's InvokeMode
    /// RESPONSE_STREAM), so that `"stream": true` answers arrive token by token; without it,
    /// whole (InvokeMode BUFFERED). It must match the URL's InvokeMode.
    #[arg(long, env = "EMBER_URL_STREAMING", value_parser = clap::builder::BoolishValueParser::new())]
    pub url_streaming: bool,
    #[command(flatten)]
    pub admit: super::http::AdmitArgs,
}

impl LambdaArgs {
    fn batch_options(&self) -> anyhow::Result<BatchOptions> {
        if self.cancel_margin_ms >= self.deadline_margin_ms {
            anyhow::bail!(
                "--cancel-margin-ms ({}) must be less than --deadline-margin-ms ({}): a job started just \
                 inside the deadline margin would be cancelled before it could run",
                self.cancel_margin_ms,
                self.deadline_margin_ms
            );
        }
        Ok(BatchOptions {
            start_margin: Duration::from_millis(self.deadline_margin_ms),
            cancel_margin: Duration::from_millis(self.cancel_margin_ms),
        })
    }
}

pub async fn run(args: LambdaArgs) -> anyhow::Result<()> {
    let opts = args.batch_options()?;
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_none() {
        anyhow::bail!(
            "AWS_LAMBDA_RUNTIME_API is not set: `ember lambda` runs inside AWS Lambda or under a local Runtime \
             API (`cargo lambda watch`); to poll SQS from a machine, use `ember serve`"
        );
    }
    // The runtime crate panics on these (Lambda always sets them); say which is missing.
    let missing: Vec<&str> =
        ["AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_LAMBDA_FUNCTION_VERSION"]
            .into_iter()
            .filter(|v| std::env::var_os(v).is_none())
            .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "{} not set: AWS Lambda (and `cargo lambda watch`) set them for the function; a hand-made Runtime API \
             setup must set them too",
            missing.join(", ")
        );
    }
    if std::env::var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").is_ok_and(|m| m.parse::<i32>().is_err()) {
        anyhow::bail!("AWS_LAMBDA_FUNCTION_MEMORY_SIZE must be a number of megabytes");
    }
    // Open the store first: a typo in the bucket should not cost a model load.
    let store = args.store.open(&args.aws).await?;
    let engine = Arc::new(load_engine(&args.model, &args.aws).await?);
    let model = engine.loaded.name.clone();
    let batch = args.batch.batcher_options(true).ok_or_else(|| anyhow::anyhow!("no batcher options"))?;
    let batcher = Arc::new(Batcher::start(engine.clone(), batch)?);
    let tasks =
        Arc::new(ModelRunner::new(engine.clone(), Some(batcher.clone()), crate::pipeline::tools(&args.http_allow)));
    let http = HttpOptions { api_key: None, admit_within: args.admit.admit_within() };
    let mode = if args.url_streaming { UrlMode::Streamed } else { UrlMode::Buffered };
    let urls = Arc::new(UrlRoutes::new(ready_routes(engine.clone(), batcher.clone(), http), mode));
    let handler =
        Arc::new(JobHandler::new(engine, store, DeadLetters::Redrive, args.max_receive_count).with_batcher(batcher));
    let handlers = Handlers { jobs: handler, tasks, urls };
    tracing::info!(model = %model, results = %args.store.results, url_answers = ?mode, "ready for SQS events");
    lambda_runtime::run(service_fn(move |event| invocation(handlers.clone(), event, opts)))
        .await
        .map_err(|e| anyhow::anyhow!("the Lambda runtime stopped: {e}"))
}

/// What answers each kind of event.
#[derive(Clone)]
struct Handlers {
    jobs: Arc<JobHandler>,
    tasks: Arc<ModelRunner>,
    urls: Arc<UrlRoutes>,
}

/// One invocation: a function URL request, an SQS batch through [`run_batch`], or one
/// pipeline task.
async fn invocation(
    handlers: Handlers,
    event: LambdaEvent<Value>,
    opts: BatchOptions,
) -> Result<UrlAnswer, Diagnostic> {
    use tracing::Instrument;
    let LambdaEvent { payload, context } = event;
    let trigger = match () {
        _ if is_url_request(&payload) => "http",
        _ if payload.get("task").is_some() => "other",
        _ => "pubsub",
    };
    let records = payload.get("Records").and_then(Value::as_array).map(Vec::len);
    let span = otel::invocation_span(&context.request_id, &context.invoked_function_arn, trigger, records);
    let answer = async {
        if trigger == "http" {
            // Answer a cancel margin before the deadline, as a batch's generations stop then.
            let cut = usable_deadline(context.deadline, std::time::SystemTime::now())
                .and_then(|d| d.duration_since(std::time::SystemTime::now()).ok())
                .map(|left| tokio::time::Instant::now() + left.saturating_sub(opts.cancel_margin));
            return handlers.urls.answer(payload, cut).await.map_err(|e| {
                tracing::warn!(label = e.label(), error = %e, "function URL request not answered");
                Diagnostic { error_type: e.label().into(), error_message: e.to_string() }
            });
        }
        buffered_invocation(&handlers, payload, &context, opts).await.map(FunctionResponse::BufferedResponse)
    }
    .instrument(span.clone())
    .await;
    if let Err(e) = &answer {
        span.record("otel.status_code", "error");
        span.record("error.type", e.error_type.as_str());
    }
    // The invocation's span ends here; a streamed answer's generation goes on and is sent
    // with the next flush.
    drop(span);
    otel::flush().await;
    answer
}

async fn buffered_invocation(
    handlers: &Handlers,
    payload: Value,
    context: &lambda_runtime::Context,
    opts: BatchOptions,
) -> Result<Value, Diagnostic> {
    if let Some(resource) = payload.get("task").and_then(Value::as_str) {
        let input = payload.get("input").cloned().unwrap_or(Value::Null);
        let ctx = TaskContext::new("step-functions", resource, &context.request_id, 0);
        return handlers.tasks.run(resource, input, &ctx).await.map_err(|f| {
            tracing::warn!(task = resource, error = %f.error, cause = %f.cause, "task failed");
            Diagnostic { error_type: f.error, error_message: f.cause }
        });
    }
    let sqs: SqsEvent = serde_json::from_value(payload).map_err(|e| Diagnostic {
        error_type: "Ember.UnknownEvent".into(),
        error_message: format!(
            "the event is neither an SQS batch (Records), a pipeline task ({{\"task\", \"input\"}}) nor a \
             function URL request (requestContext.http): {e}"
        ),
    })?;
    let deadline = usable_deadline(context.deadline, SystemTime::now());
    if deadline.is_none() {
        tracing::warn!(
            deadline_ms = context.deadline,
            "the invocation's deadline has already passed as it starts (a local emulator's placeholder?): \
             running without a deadline"
        );
    }
    let report = run_batch(handlers.jobs.as_ref(), sqs, deadline, &opts).await;
    let response: SqsBatchResponse = report.into_response().map_err(|e| {
        tracing::error!(label = e.label(), error = %e, "failing the invocation");
        Diagnostic { error_type: e.label().into(), error_message: e.to_string() }
    })?;
    serde_json::to_value(response)
        .map_err(|e| Diagnostic { error_type: "Ember.Internal".into(), error_message: e.to_string() })
}
