//! OpenTelemetry traces: one trace per job, from `ember submit` through the queue, the worker
//! and the batcher to the result write and the delete, exported over OTLP (HTTP/protobuf).
//!
//! Configured by the standard environment: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns it on, `OTEL_SERVICE_NAME` names the service,
//! `OTEL_TRACES_SAMPLER` (and `_ARG`) samples. With no endpoint nothing is installed: the
//! trace spans (target [`TARGET`]) have no subscriber that wants them, so creating one costs
//! a callsite check, and no trace context is read or written.
//!
//! The W3C trace context travels with each message as the `traceparent` message attribute
//! ([`TRACEPARENT`]) on SQS and in the embedded queue; a malformed one starts a new trace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of Ember's trace spans: exported to OpenTelemetry, kept out of the logs.
pub const TARGET: &str = "ember::trace";
/// The message attribute (and `ember` metadata field) that carries the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The instrumentation scope name.
const SCOPE: &str = "ember";

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The provider, for [`flush`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Sends every span that has ended so far, and waits for the exporter. Lambda freezes the
/// environment as soon as an invocation has answered, so the batch exporter's timer would not
/// run until the next invocation (or ever, if the environment is reclaimed): call this at the
/// end of each invocation.
pub async fn flush() {
    let Some(provider) = PROVIDER.get().filter(|_| enabled()).cloned() else { return };
    // force_flush blocks until the exporter task, which runs on this runtime, has sent.
    let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    if let Ok(Err(e)) = flushed {
        tracing::warn!(error = %e, "OpenTelemetry: could not send the invocation's spans");
    }
}

/// Whether traces are exported (an OTLP endpoint was configured).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(
        "OpenTelemetry: the OTLP exporter could not be built from OTEL_EXPORTER_OTLP_* ({0}): check the endpoint URL"
    )]
    Exporter(String),
}

/// The endpoint from the standard environment, if any.
fn endpoint() -> Option<String> {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
}

/// Keeps the exporter alive; [`Tracing::shutdown`] sends what is still buffered.
pub struct Tracing(Option<SdkTracerProvider>);

impl Tracing {
    /// Flushes and stops the exporter (call before the process exits, inside the runtime's
    /// lifetime: the exporter runs on it).
    pub fn shutdown(self) {
        if let Some(provider) = self.0 {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: OpenTelemetry: could not send the last spans: {e}");
            }
        }
    }
}

/// The OpenTelemetry layer for the subscriber when an endpoint is configured, and the guard
/// that flushes it. Must run inside the tokio runtime (the batch exporter is a task on it).
#[allow(clippy::type_complexity)]
pub fn layer<S>() -> Result<(Option<tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>>, Tracing), TraceError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if endpoint().is_none() {
        return Ok((None, Tracing(None)));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| TraceError::Exporter(e.to_string()))?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    // The builder reads OTEL_TRACES_SAMPLER(_ARG) and the resource reads OTEL_SERVICE_NAME
    // and OTEL_RESOURCE_ATTRIBUTES.
    let resource = opentelemetry_sdk::Resource::builder().build();
    let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = PROVIDER.set(provider.clone());
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SCOPE))
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        .with_target(false);
    ENABLED.store(true, Ordering::Relaxed);
    Ok((Some(layer), Tracing(Some(provider))))
}

/// The `traceparent` of `span`, to send with a message; `None` when tracing is off or the
/// span is not sampled into a trace.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the trace context in `traceparent`. A missing or malformed one
/// leaves `span` the root of a new trace.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    let Some(cx) = remote_context(traceparent) else { return };
    let _ = span.set_parent(cx);
}

fn remote_context(traceparent: Option<&str>) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent?.trim().to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The span of one delivery of a job, continuing the trace the message was sent in, with the
/// time it waited on the queue as its first child.
pub fn job_span(msg: &crate::queue::ReceivedMessage) -> tracing::Span {
    let span = tracing::info_span!(
        target: TARGET,
        "job",
        otel.kind = "consumer",
        messaging.operation.type = "process",
        messaging.message.id = %msg.id,
        messaging.message.delivery_count = msg.receive_count,
        ember.outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if enabled() {
        continue_from(&span, msg.traceparent.as_deref());
        queue_wait(&span, msg.sent_at, SystemTime::now());
    }
    span
}

/// Puts what became of the job on its span: retries and failures as errors with their label.
pub fn record_outcome(span: &tracing::Span, outcome: &crate::runner::Outcome) {
    use crate::runner::Outcome;
    if span.is_disabled() {
        return;
    }
    let (name, label) = match outcome {
        Outcome::Done => ("done", None),
        Outcome::Released => ("released", None),
        Outcome::Poisoned { label } => ("dead_lettered", Some(label)),
        Outcome::Retry { label, .. } => ("retry", Some(label)),
        Outcome::Rejected { label, .. } => ("rejected", Some(label)),
    };
    span.record("ember.outcome", name);
    if let Some(label) = label {
        span.record("otel.status_code", "error");
        span.record("error.type", label.as_str());
    }
}

/// Records the time a message spent on the queue, `sent_at` to `received_at`, as a span under
/// `parent` (a span cannot be given past start times through `tracing`).
pub fn queue_wait(parent: &tracing::Span, sent_at: SystemTime, received_at: SystemTime) {
    if !enabled() {
        return;
    }
    let tracer = opentelemetry::global::tracer(SCOPE);
    let mut span = tracer
        .span_builder("queue wait")
        .with_kind(SpanKind::Internal)
        .with_start_time(sent_at.min(received_at))
        .start_with_context(&tracer, &parent.context());
    span.end_with_timestamp(received_at);
}

/// The init span of this process, once [`cold_start`] recorded it: the first Lambda
/// invocation links to it.
static INIT: OnceLock<opentelemetry::trace::SpanContext> = OnceLock::new();

/// The start-up of this process as a trace of its own: an `init` span (`faas.coldstart`)
/// from process start to `ready_at`, and under it the model load's stages with their seconds
/// and bytes (the list, the small files, the local tier, the download with the verification
/// beside it, the verification after its last byte, the checks after the fetch, the build).
/// The loader measures durations, not instants, and runs the stages one after another: they
/// are laid end to end, the build ending at `ready_at`, the fetch's parts from its start.
pub fn cold_start(m: &super::metrics::ColdStart<'_>, ready_at: SystemTime) {
    if !enabled() {
        return;
    }
    use opentelemetry::KeyValue;
    let secs = |s: f64| std::time::Duration::from_secs_f64(s.max(0.0));
    let (t, f) = (m.timings, &m.timings.fetch);
    let started = ready_at.checked_sub(secs(m.ready_s)).unwrap_or(ready_at);
    let tracer = opentelemetry::global::tracer(SCOPE);
    let mut init = tracer
        .span_builder("init")
        .with_kind(SpanKind::Internal)
        .with_start_time(started)
        .with_attributes([
            KeyValue::new("faas.coldstart", true),
            KeyValue::new("gen_ai.request.model", m.model.to_string()),
            KeyValue::new("ember.ready_s", m.ready_s),
        ])
        .start(&tracer);
    let parent = opentelemetry::Context::current().with_remote_span_context(init.span_context().clone());
    let stage = |name: &'static str, start: SystemTime, seconds: f64, bytes: Option<u64>| -> SystemTime {
        let end = start + secs(seconds);
        if seconds > 0.0 {
            let mut attributes = vec![KeyValue::new("ember.seconds", seconds)];
            if let Some(bytes) = bytes {
                attributes.push(KeyValue::new("ember.bytes", bytes as i64));
            }
            let mut span = tracer
                .span_builder(name)
                .with_start_time(start)
                .with_attributes(attributes)
                .start_with_context(&tracer, &parent);
            span.end_with_timestamp(end);
        }
        end
    };
    let build_start = ready_at.checked_sub(secs(t.build_s)).unwrap_or(ready_at);
    let verify_start = build_start.checked_sub(secs(t.verify_s)).unwrap_or(build_start);
    let fetch_start = verify_start.checked_sub(secs(t.fetch_s)).unwrap_or(verify_start).max(started);
    let mut at = fetch_start;
    at = stage("list", at, f.list_s, None);
    at = stage("small files", at, f.small_s, None);
    at = stage("local tier", at, f.cache_s, Some(f.cached_bytes));
    at = stage("download", at, f.download_s, Some(f.downloaded_bytes));
    stage("verify tail", at, f.verify_tail_s, None);
    stage("verify", verify_start, t.verify_s, None);
    stage("build", build_start, t.build_s, None);
    init.end_with_timestamp(ready_at);
    let _ = INIT.set(init.span_context().clone());
}

/// Links `span` to this process's init span ([`cold_start`]): for the first invocation after
/// a cold start. Returns whether there was one.
pub fn link_init(span: &tracing::Span) -> bool {
    match INIT.get() {
        Some(init) if enabled() => {
            span.add_link(init.clone());
            true
        }
        _ => false,
    }
}

/// The span of one Lambda invocation, named by the function (OpenTelemetry's FaaS
/// conventions): `faas.invocation_id`, `faas.trigger` (`pubsub` for an SQS batch, `http` for a
/// function URL request, `other` for a pipeline task), `cloud.resource_id`, the batch's
/// `messaging.batch.message_count` (`records`), and
/// `faas.coldstart` on the first invocation of the process, which links to its init trace
/// ([`cold_start`]). The jobs of an SQS batch each continue their own trace and are linked
/// from it ([`link_job`]).
pub fn invocation_span(
    request_id: &str,
    function_arn: &str,
    trigger: &'static str,
    records: Option<usize>,
) -> tracing::Span {
    static FIRST: AtomicBool = AtomicBool::new(true);
    if !enabled() {
        return tracing::Span::none();
    }
    let coldstart = FIRST.swap(false, Ordering::Relaxed);
    let function = std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "ember".into());
    let span = tracing::info_span!(
        target: TARGET,
        "invocation",
        otel.name = %function,
        otel.kind = "server",
        faas.invocation_id = request_id,
        faas.trigger = trigger,
        faas.coldstart = coldstart,
        cloud.resource_id = function_arn,
        messaging.batch.message_count = records,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    if coldstart {
        link_init(&span);
    }
    span
}

/// Links the current span (an invocation) to the trace `job` continues.
pub fn link_job(job: &tracing::Span) {
    if !enabled() {
        return;
    }
    let cx = job.context();
    let target = cx.span().span_context().clone();
    if target.is_valid() {
        tracing::Span::current().add_link(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_trace_contexts_start_a_new_trace() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(remote_context(Some(good)).is_some());
        for bad in ["", "garbage", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "zz-4bf9-00f0-01"] {
            assert!(remote_context(Some(bad)).is_none(), "{bad}");
        }
        assert!(remote_context(None).is_none());
    }
}
