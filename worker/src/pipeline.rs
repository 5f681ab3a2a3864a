//! Pipelines on the worker: the orchestrator's hop engine over Ember's own queue, object store
//! and model. Each hop message is one state of one execution; [`HopHandler`] runs it with
//! [`ember_orchestrator::pipeline::process_hop`], which records the transition create-only
//! and sends the next hop(s), so a hop delivered twice, or a worker killed between recording and
//! sending, has one effect. A failed execution is also parked in the pipeline queue's DLQ with
//! its error and cause.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ember_orchestrator::asl::{Resources, StatesError};
use ember_orchestrator::pipeline::{
    process_hop, Env, ExecutionStore, HopMessage, HopSender, Options, SendError, StoreError, TaskContext, TaskFailure,
    TaskRunner, Tools,
};
use serde_json::{json, Value};

use crate::job::{validate_chat_request, JobLimits, DEFAULT_MODEL};
use crate::queue::{OutgoingMessage, Queue, ReceivedMessage};
use crate::runner::jobs::send_to_dlq;
use crate::runner::{retry_backoff, Handler, Outcome, Shutdown};
use crate::store::{ObjectStore, PutOutcome};
use ember_engine::{Batcher, Engine};

/// Where execution records live in the object store: the orchestrator's keys
/// (`executions/{id}/...`) go under it, so records are at `pipelines/executions/{id}/...`.
pub const EXECUTIONS_PREFIX: &str = "pipelines";

/// The worker's object store as an execution store, under [`EXECUTIONS_PREFIX`].
pub struct StoreAdapter(pub Arc<dyn ObjectStore>);

fn store_error(e: crate::store::StoreError) -> StoreError {
    StoreError { label: e.label(), message: e.to_string(), retryable: e.is_retryable() }
}

#[async_trait::async_trait]
impl ExecutionStore for StoreAdapter {
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<bool, StoreError> {
        match self.0.put_if_absent(&format!("{EXECUTIONS_PREFIX}/{key}"), bytes).await.map_err(store_error)? {
            PutOutcome::Created => Ok(true),
            _ => Ok(false),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(&format!("{EXECUTIONS_PREFIX}/{key}")).await.map_err(store_error)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let full = format!("{EXECUTIONS_PREFIX}/{prefix}");
        let keys = self.0.list(&full).await.map_err(store_error)?;
        Ok(keys
            .into_iter()
            .filter_map(|k| k.strip_prefix(&format!("{EXECUTIONS_PREFIX}/")).map(str::to_owned))
            .collect())
    }
}

/// The pipeline queue as the engine's hop sender: JSON bodies, sent in batches of 10, each
/// with its delay.
pub struct QueueSender(pub Arc<dyn Queue>);

#[async_trait::async_trait]
impl HopSender for QueueSender {
    async fn send(&self, hops: Vec<(HopMessage, Duration)>) -> Result<(), SendError> {
        let mut out = Vec::with_capacity(hops.len());
        // The next hops continue the trace of the hop (or the start) that sends them.
        let traceparent = crate::telemetry::otel::traceparent_of(&tracing::Span::current());
        for (hop, delay) in hops {
            let body = serde_json::to_vec(&hop).map_err(|e| SendError { message: e.to_string(), retryable: false })?;
            let delay = (!delay.is_zero()).then_some(delay);
            out.push(OutgoingMessage { body, delay, traceparent: traceparent.clone() });
        }
        for chunk in out.chunks(10) {
            for result in self.0.send_batch(chunk.to_vec()).await {
                result.map_err(|e| SendError { message: e.to_string(), retryable: e.is_retryable() })?;
            }
        }
        Ok(())
    }
}

/// Runs Task states: `ember:generate` on the model, the rest with the [`Tools`].
pub struct ModelRunner {
    engine: Arc<Engine>,
    batcher: Option<Arc<Batcher>>,
    limits: JobLimits,
    tools: Tools,
}

impl ModelRunner {
    pub fn new(engine: Arc<Engine>, batcher: Option<Arc<Batcher>>, tools: Tools) -> Self {
        let limits = JobLimits::new(vec![engine.loaded.name.clone()], engine.context_length());
        Self { engine, batcher, limits, tools }
    }

    /// `Parameters` of an `ember:generate` state are the body of a chat completion request
    /// (messages, max_tokens, temperature, stop, response_format...), checked by the same
    /// rules as a queued job. The result: `{"text", "finish_reason", "usage"}`, plus `"json"`,
    /// the parsed reply, when the request asked for `response_format: {"type": "json_object"}`
    /// and the reply parses. Special-token text in the messages (from a fetched web page, say)
    /// is encoded as plain text unless the Parameters say `"allow_special_tokens": true`.
    async fn generate(&self, input: Value) -> Result<Value, TaskFailure> {
        let wants_json = input.pointer("/response_format/type").and_then(Value::as_str) == Some("json_object");
        let mut body = match input {
            Value::Object(map) => map,
            other => {
                let found = match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Null => "null",
                    _ => "a number or boolean",
                };
                return Err(TaskFailure::new(
                    "Ember.InvalidRequest",
                    format!("the Parameters of an ember:generate state must be an object (a chat completion request), not {found}"),
                ));
            }
        };
        body.remove("response_format");
        let allow_special_tokens = match body.remove("allow_special_tokens") {
            None => false,
            Some(Value::Bool(allow)) => allow,
            Some(_) => {
                return Err(TaskFailure::new("Ember.InvalidRequest", "`allow_special_tokens` must be true or false"))
            }
        };
        body.entry("model").or_insert_with(|| json!(DEFAULT_MODEL));
        let (engine, limits) = (self.engine.clone(), self.limits.clone());
        let (request, _model) = tokio::task::spawn_blocking(move || {
            let encode = |p: &ember_engine::Prompt, allow: bool| engine.encode(p, allow).map_err(|e| e.to_string());
            validate_chat_request(&body, &limits, allow_special_tokens, &encode)
        })
        .await
        .map_err(|e| TaskFailure::new("States.TaskFailed", format!("validation failed: {e}")))?
        .map_err(|e| TaskFailure::new("Ember.InvalidRequest", e.to_string()))?;
        let completion = match &self.batcher {
            Some(b) => b.generate(request, Arc::new(AtomicBool::new(false))).await,
            None => {
                let engine = self.engine.clone();
                tokio::task::spawn_blocking(move || engine.generate(&request))
                    .await
                    .map_err(|e| TaskFailure::new("States.TaskFailed", format!("generation failed: {e}")))?
            }
        }
        .map_err(|e| TaskFailure::new("States.TaskFailed", e.to_string()))?;
        let mut out = json!({
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "usage": {
                "prompt_tokens": completion.usage.prompt_tokens,
                "completion_tokens": completion.usage.completion_tokens,
            },
        });
        if wants_json {
            if let Ok(parsed) = serde_json::from_str::<Value>(completion.text.trim()) {
                out["json"] = parsed;
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl TaskRunner for ModelRunner {
    async fn run(&self, resource: &str, input: Value, ctx: &TaskContext) -> Result<Value, TaskFailure> {
        if resource == "ember:generate" {
            self.generate(input).await
        } else {
            self.tools.run(resource, input, ctx).await
        }
    }

    fn resources(&self) -> Resources {
        self.tools.resources()
    }
}

/// The tools a worker offers: the built-in ones, with `ember:tool:http_get` only when hosts
/// are allowed.
pub fn tools(http_allow: &[String]) -> Tools {
    let tools = Tools::builtin();
    if http_allow.is_empty() {
        tools
    } else {
        tools.with_http_get(http_allow.iter().cloned())
    }
}

/// Runs hop messages from the pipeline queue.
pub struct HopHandler {
    env: Env,
    queue: Arc<dyn Queue>,
    crash_after_record: Option<CrashAfterRecord>,
}

/// A failpoint for crash tests: with `EMBER_FAULT_CRASH_AFTER_RECORD=P` (0 < P <= 1) a worker
/// aborts, with probability P, right after recording a hop's transition and before sending its
/// next hops, the worst moment for exactly-once. Never set it in production.
pub const CRASH_AFTER_RECORD_ENV: &str = "EMBER_FAULT_CRASH_AFTER_RECORD";

/// The seed of the failpoint's draws (a random one, logged, when unset). Which hops crash is
/// a function of the seed and the hop alone, so a crash test run again with the seed its
/// failure printed crashes at the same hops, whichever worker records them and when.
pub const CRASH_SEED_ENV: &str = "EMBER_FAULT_SEED";

/// The failpoint's settings.
#[derive(Debug, Clone, Copy)]
struct CrashAfterRecord {
    rate: f64,
    seed: u64,
}

impl CrashAfterRecord {
    fn from_env() -> Option<Self> {
        let rate = std::env::var(CRASH_AFTER_RECORD_ENV)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|p| *p > 0.0 && *p <= 1.0)?;
        let seed = std::env::var(CRASH_SEED_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
        Some(Self { rate, seed })
    }

    /// Whether recording `hop_id` crashes the worker: FNV-1a of the id, mixed with the seed by
    /// SplitMix64's finaliser, as a fraction of 2^64.
    fn hits(&self, hop_id: &str) -> bool {
        let mut h = 0xcbf2_9ce4_8422_2325_u64;
        for b in hop_id.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut z = h ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64) < self.rate
    }
}

impl HopHandler {
    pub fn new(env: Env, queue: Arc<dyn Queue>) -> Self {
        let crash_after_record = CrashAfterRecord::from_env();
        if let Some(f) = crash_after_record {
            tracing::warn!(
                probability = f.rate,
                seed = f.seed,
                "failpoint on: this worker will crash after recording some hops"
            );
        }
        Self { env, queue, crash_after_record }
    }

    /// The engine's environment for a worker's queue, store and runner.
    pub fn env(queue: Arc<dyn Queue>, store: Arc<dyn ObjectStore>, runner: Arc<dyn TaskRunner>, max_hops: u64) -> Env {
        Env {
            store: Arc::new(StoreAdapter(store)),
            sender: Arc::new(QueueSender(queue)),
            runner,
            options: Options { max_hops, ..Options::default() },
            definitions: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl Handler for HopHandler {
    async fn handle(&self, msg: &ReceivedMessage, shutdown: &Shutdown) -> Outcome {
        let hop: HopMessage = match serde_json::from_slice(&msg.body) {
            Ok(h) => h,
            Err(_) if serde_json::from_slice::<ParkedFailure>(&msg.body).is_ok_and(|p| p.kind == PARKED_FAILURE) => {
                return self.redrive(msg).await
            }
            Err(e) => {
                let reason = format!("not a pipeline hop message: {e}");
                tracing::warn!(message_id = %msg.id, %reason, "refused");
                return self.park(msg, &msg.body, &reason, "pipeline_bad_hop").await;
            }
        };
        let execution = hop.execution.clone();
        let redrive = hop.redrive;
        // Whether this delivery recorded the transition itself (through the failpoint below);
        // process_hop then finds the record, which is not a redelivery.
        let mut recorded_here = false;
        if let Some(failpoint) = self.crash_after_record.filter(|_| hop.not_before.is_none()) {
            // Failpoint for the crash tests: die like a SIGKILL right after the transition is
            // recorded and before any next hop is sent.
            if let Ok((_, false)) = ember_orchestrator::pipeline::record_hop(&self.env, &hop).await {
                recorded_here = true;
                if failpoint.hits(&hop.id()) {
                    tracing::warn!(%execution, hop = %hop.id(), "failpoint: crashing after recording the transition");
                    std::process::abort();
                }
            }
        }
        // Told to stop (the shutdown's grace period is over): drop the hop where it is, as a
        // crash would, and hand the message back. Every effect of a hop is create-only, so its
        // redelivery finishes it; a tool waiting on the network (http_get) does not hold the
        // worker.
        let span = tracing::info_span!(
            target: crate::telemetry::otel::TARGET,
            "hop",
            otel.name = %hop.state,
            ember.pipeline.execution = %execution,
            ember.pipeline.state = %hop.state,
            ember.pipeline.hop = hop.hop,
            ember.pipeline.retry_count = hop.attempt,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let processed = tokio::select! {
            r = tracing::Instrument::instrument(process_hop(&self.env, hop), span.clone()) => r,
            _ = shutdown.wait() => {
                tracing::info!(%execution, "shutdown: hop stopped; its message goes back to the queue");
                return Outcome::Released;
            }
        };
        match processed {
            Ok(mut outcome) => {
                if let Some(Err(err)) = outcome.finished.as_ref().map(|end| &end.result) {
                    span.record("otel.status_code", "error");
                    span.record("error.type", err.error.as_str());
                }
                outcome.duplicate &= !recorded_here;
                if outcome.duplicate {
                    tracing::info!(%execution, hop = %outcome.hop_id, "hop redelivered: its transition was recorded, next hops sent again");
                }
                if let Some(end) = &outcome.finished {
                    if let (Err(err), false) = (&end.result, outcome.duplicate) {
                        let record = json!({"kind": PARKED_FAILURE, "execution": execution, "error": err.error,
                            "cause": err.cause, "redrive_count": redrive});
                        tracing::warn!(%execution, error = %err.error, cause = %err.cause, "execution failed");
                        // The execution is over either way: the message goes once it is parked.
                        if let Outcome::Retry { after, label } =
                            self.park(msg, record.to_string().as_bytes(), &err.error, "pipeline_dlq").await
                        {
                            return Outcome::Retry { after, label };
                        }
                    } else if end.result.is_ok() && !outcome.duplicate {
                        tracing::info!(%execution, "execution succeeded");
                    }
                }
                Outcome::Done
            }
            Err(e) => {
                span.record("otel.status_code", "error");
                span.record("error.type", e.label());
                self.failed(msg, &execution, &e).await
            }
        }
    }
}

/// The `kind` of a failed execution's record in the pipeline DLQ.
const PARKED_FAILURE: &str = "failed_execution";

/// What the pipeline DLQ holds for a failed execution; moved back to the hop queue (`ember
/// dlq redrive`), it redrives that execution.
#[derive(Debug, serde::Deserialize)]
struct ParkedFailure {
    /// [`PARKED_FAILURE`]: only such records redrive (not any body with an `execution`).
    #[serde(default)]
    kind: String,
    execution: String,
    /// The run that failed (0 before any redrive); absent in records of older versions.
    #[serde(default)]
    redrive_count: Option<u32>,
}

impl HopHandler {
    /// A failed execution's record, back from the DLQ: redrive the execution from the state
    /// that failed (once, however often the record is delivered).
    async fn redrive(&self, msg: &ReceivedMessage) -> Outcome {
        let Ok(parked) = serde_json::from_slice::<ParkedFailure>(&msg.body) else { return Outcome::Done };
        let execution = parked.execution.as_str();
        match ember_orchestrator::pipeline::redrive_execution(
            &self.env,
            execution,
            Some(parked.redrive_count.unwrap_or(0)),
        )
        .await
        {
            Ok(r) => {
                tracing::info!(%execution, redrive_count = r.redrive_count, state = %r.state, "execution redriven");
                Outcome::Done
            }
            Err(e) if e.is_retryable() => {
                Outcome::Retry { after: retry_backoff(msg.receive_count), label: e.label().into() }
            }
            // Still running (its failure was never recorded): keep the record where an operator
            // sees it rather than drop the only trace of it.
            Err(e @ ember_orchestrator::pipeline::PipelineError::NotRedrivable(..))
                if e.to_string().contains("RUNNING") =>
            {
                tracing::warn!(%execution, error = %e, "not redriven: parked again");
                self.park(
                    msg,
                    &msg.body,
                    "the execution is still running; it was not redriven",
                    "pipeline_not_redrivable",
                )
                .await
            }
            Err(e) => {
                tracing::warn!(%execution, error = %e, "not redriven");
                Outcome::Done
            }
        }
    }

    /// A hop the engine could not process: retried when that may pass, parked otherwise.
    async fn failed(
        &self,
        msg: &ReceivedMessage,
        execution: &str,
        e: &ember_orchestrator::pipeline::PipelineError,
    ) -> Outcome {
        if e.is_retryable() {
            tracing::warn!(message_id = %msg.id, %execution, error = %e, "hop failed; will retry");
            return Outcome::Retry { after: retry_backoff(msg.receive_count), label: e.label().into() };
        }
        tracing::warn!(message_id = %msg.id, %execution, error = %e, "hop refused");
        // The execution cannot go on: end it as failed, so `describe` says why instead of
        // showing it running forever.
        let mut redrive = 0;
        if let Ok(hop) = serde_json::from_slice::<HopMessage>(&msg.body) {
            redrive = hop.redrive;
            let error = StatesError::runtime(format!("a hop of state '{}' could not be processed: {e}", hop.state));
            match ember_orchestrator::pipeline::fail_execution(&self.env, &hop, error).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%execution, "the refused hop had recorded its transition already: the execution is as recorded")
                }
                Err(fail) => tracing::warn!(%execution, error = %fail, "could not record the execution's failure"),
            }
        }
        let record = json!({"kind": PARKED_FAILURE, "execution": execution, "error": e.label(), "cause": e.to_string(),
                "redrive_count": redrive});
        self.park(msg, record.to_string().as_bytes(), e.label(), e.label()).await
    }
}

impl HopHandler {
    /// Sends `body` to the pipeline DLQ with `reason`: [`Outcome::Poisoned`] with `label` once
    /// it is there, a retry of the message if the DLQ could not take it.
    async fn park(&self, msg: &ReceivedMessage, body: &[u8], reason: &str, label: &str) -> Outcome {
        match send_to_dlq(self.queue.as_ref(), msg, body, reason).await {
            Ok(()) => Outcome::Poisoned { label: label.into() },
            Err(e) => Outcome::Retry { after: retry_backoff(msg.receive_count), label: e.label().into() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CrashAfterRecord;

    #[test]
    fn the_failpoint_picks_hops_by_seed_and_id_alone() {
        let ids: Vec<String> = (0..4000).map(|i| format!("run-{}/Fan/{}", i % 16, i)).collect();
        let picks = |seed| {
            let f = CrashAfterRecord { rate: 0.03, seed };
            ids.iter().filter(|id| f.hits(id)).cloned().collect::<Vec<_>>()
        };
        assert_eq!(picks(7), picks(7), "the same seed picks the same hops");
        assert_ne!(picks(7), picks(8), "another seed picks other hops");
        let n = picks(7).len();
        assert!((60..=180).contains(&n), "{n} of 4000 hops at a rate of 0.03");
        assert!(ids.iter().all(|id| CrashAfterRecord { rate: 1.0, seed: 3 }.hits(id)));
    }
}
