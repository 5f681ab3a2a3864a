//! The [`Handler`] that runs inference jobs: validate the message, generate, write the
//! OpenAI batch output line create-only, and decide what becomes of the message.
//!
//! Every path ends in one of two states a crash cannot break:
//! - the result object exists (written once, create-only) and the message is deleted, or
//! - the message is left on the queue (or released) and will run again.
//!
//! A crash between the write and the delete only means a redelivery, and a redelivered job
//! whose result exists is deleted without running again. A job that can never succeed (a
//! [`JobError`], or a terminal engine error) gets an error result and
//! goes to the dead-letter queue with the error's label as the reason.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{retry_backoff, Handler, Outcome, Shutdown};
use crate::job::{
    derived_id, error_result_key, rejected_result_key, validate, JobError, JobLimits, RejectedJob, ResultLine,
    ValidJob, DEFAULT_BATCH,
};
use crate::queue::{Queue, ReceivedMessage};
use crate::store::{ObjectStore, PutOutcome};
use crate::telemetry::metrics;
use crate::telemetry::otel::TARGET;
use ember_engine::EngineError;
use ember_engine::{Batcher, Engine};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Where jobs that fail for good are sent.
#[derive(Clone)]
pub enum DeadLetters {
    /// Straight into this queue's DLQ, and the message is deleted (`ember serve`).
    Queue(Arc<dyn Queue>),
    /// Left to the source queue's redrive policy: the message is reported as failed until it
    /// has been received `maxReceiveCount` times (Lambda, where the event source mapping
    /// deletes what the function reports done and nothing else).
    Redrive,
}

pub struct JobHandler {
    engine: Arc<Engine>,
    store: Arc<dyn ObjectStore>,
    dead_letters: DeadLetters,
    limits: JobLimits,
    /// Deliveries after which a transient failure is treated as final: the job gets an error
    /// result before the queue moves it to the DLQ, so it is never dropped without an answer.
    max_receive_count: u32,
    /// Runs generations in a shared batch when set; one blocking generation per job otherwise.
    batcher: Option<Arc<Batcher>>,
}

impl JobHandler {
    pub fn new(
        engine: Arc<Engine>,
        store: Arc<dyn ObjectStore>,
        dead_letters: DeadLetters,
        max_receive_count: u32,
    ) -> Self {
        let limits = JobLimits::new(vec![engine.loaded.name.clone()], engine.context_length());
        Self { engine, store, dead_letters, limits, max_receive_count: max_receive_count.max(1), batcher: None }
    }

    /// Runs generations through `batcher` (continuous batching across jobs).
    pub fn with_batcher(mut self, batcher: Arc<Batcher>) -> Self {
        self.batcher = Some(batcher);
        self
    }

    pub fn limits(&self) -> &JobLimits {
        &self.limits
    }

    /// Validates on a blocking thread: counting the tokens of a large prompt takes a while.
    async fn check(&self, msg: &ReceivedMessage) -> Result<Result<ValidJob, Box<RejectedJob>>, Outcome> {
        let (engine, limits, body, id) =
            (self.engine.clone(), self.limits.clone(), msg.body.clone(), msg.id.as_str().to_string());
        let span = tracing::info_span!(target: TARGET, "validation", error.type = tracing::field::Empty);
        let checked = tokio::task::spawn_blocking(move || {
            let encode = |p: &ember_engine::Prompt, allow: bool| engine.encode(p, allow).map_err(|e| e.to_string());
            validate(&body, &id, &limits, &encode)
        })
        .instrument(span.clone())
        .await;
        if let Ok(Err(rejected)) = &checked {
            span.record("error.type", rejected.error.label());
        }
        match checked {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::error!(message_id = %msg.id, error = %e, "validation panicked");
                let id = msg.id.as_str();
                let line =
                    ResultLine::not_run(id, id, "validation_panicked", &format!("the worker failed on this job: {e}"));
                Err(self
                    .retry_or_give_up(msg, &crate::job::rejected_result_key(None, id), &line, "validation_panicked")
                    .await)
            }
        }
    }

    /// A failure that may pass: retry, unless this was the last delivery the queue allows, in
    /// which case the job gets its error result and goes to the dead letters now rather than
    /// reach them later without an answer.
    async fn retry_or_give_up(&self, msg: &ReceivedMessage, key: &str, line: &ResultLine, label: &str) -> Outcome {
        if msg.receive_count >= self.max_receive_count {
            return self.fail_for_good(msg, key, line, label).await;
        }
        Outcome::Retry { after: retry_backoff(msg.receive_count), label: label.into() }
    }

    /// Writes an error result (under `_errors/`, beside where the result would go), then parks
    /// the job with the dead letters.
    async fn fail_for_good(&self, msg: &ReceivedMessage, key: &str, line: &ResultLine, label: &str) -> Outcome {
        if let Err(outcome) = self.write(msg, &error_result_key(key), line).await {
            return outcome;
        }
        match &self.dead_letters {
            DeadLetters::Queue(queue) => match send_to_dlq(queue.as_ref(), msg, &msg.body, label).await {
                Ok(_) => Outcome::Poisoned { label: label.to_string() },
                Err(e) => {
                    tracing::warn!(message_id = %msg.id, error = %e, "could not send to the DLQ; will retry");
                    Outcome::Retry { after: retry_backoff(msg.receive_count), label: e.label().into() }
                }
            },
            // Failing the record until the redrive policy moves it: the error result is
            // already written, so later deliveries only re-check and fail fast.
            DeadLetters::Redrive => {
                Outcome::Rejected { after: retry_backoff(msg.receive_count), label: label.to_string() }
            }
        }
    }

    /// Create-only write of a result line; an existing result counts as written.
    /// Answers whether this call created it.
    async fn write(&self, msg: &ReceivedMessage, key: &str, line: &ResultLine) -> Result<bool, Outcome> {
        let mut bytes = match line.to_json() {
            Ok(text) => text.into_bytes(),
            Err(e) => {
                tracing::error!(message_id = %msg.id, error = %e, "could not serialize the result");
                return Err(Outcome::Retry { after: retry_backoff(msg.receive_count), label: "serialize".into() });
            }
        };
        bytes.push(b'\n');
        let span = tracing::info_span!(target: TARGET, "result write", ember.result_key = key);
        match self.store.put_if_absent(key, bytes).instrument(span).await {
            Ok(PutOutcome::Created) => Ok(true),
            Ok(PutOutcome::AlreadyExists) => {
                tracing::info!(message_id = %msg.id, key, "result already written by an earlier delivery");
                Ok(false)
            }
            Err(e) => {
                tracing::warn!(message_id = %msg.id, key, error = %e, "could not write the result; will retry");
                Err(Outcome::Retry { after: retry_backoff(msg.receive_count), label: e.label().into() })
            }
        }
    }

    async fn run(&self, msg: &ReceivedMessage, job: ValidJob, shutdown: &Shutdown) -> Outcome {
        // A redelivery looks at the job's result slot first: it finds its own result and stops,
        // or another message's (a duplicate custom_id) and is refused without running. A first
        // delivery skips the read: a duplicate is then found by the create-only write below.
        let slot = if msg.receive_count > 1 { self.slot_owner(msg, &job).await } else { Ok(Slot::Free) };
        match slot {
            Ok(Slot::Free) => {}
            Ok(Slot::Ours) => {
                tracing::info!(message_id = %msg.id, key = %job.result_key, "already done; deleting the message");
                return Outcome::Done;
            }
            Ok(Slot::Taken) => return self.refuse_duplicate(msg, &job).await,
            Err(outcome) => return outcome,
        }
        let queue_wait_s = msg.sent_at.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let span = generation_span(&job);
        let generated = self.generate(msg, &job, shutdown).instrument(span.clone()).await;
        let generated = match generated {
            Ok(g) => g,
            Err(outcome) => return outcome,
        };
        match &generated {
            _ if span.is_disabled() => {}
            Ok(c) => {
                span.record("gen_ai.usage.input_tokens", c.usage.prompt_tokens);
                span.record("gen_ai.usage.output_tokens", c.usage.completion_tokens);
                // An array in the GenAI conventions (one reason per choice): `tracing` fields
                // are scalars, so it is set on the OpenTelemetry span directly.
                let reason = opentelemetry::StringValue::from(format!("{:?}", c.finish_reason).to_lowercase());
                span.set_attribute(
                    "gen_ai.response.finish_reasons",
                    opentelemetry::Value::Array(opentelemetry::Array::String(vec![reason])),
                );
            }
            Err(e) => {
                span.record("otel.status_code", "error");
                span.record("error.type", e.label());
            }
        }
        drop(span);
        let completion = match generated {
            Ok(c) => c,
            // Released on its last allowed delivery, the job would next be moved to the DLQ by
            // the queue's redrive policy with nobody to answer it: answer it now.
            Err(EngineError::Cancelled) if msg.receive_count >= self.max_receive_count => {
                let message = format!(
                    "the worker shut down during the job's last allowed delivery ({} of {}); run it again with `ember dlq redrive`",
                    msg.receive_count, self.max_receive_count
                );
                let line = ResultLine::not_run(&job.message_id, &job.custom_id, "shutdown_on_last_delivery", &message);
                return self.fail_for_good(msg, &job.result_key, &line, "shutdown_on_last_delivery").await;
            }
            Err(EngineError::Cancelled) => return Outcome::Released,
            Err(e) if e.is_retryable() && msg.receive_count < self.max_receive_count => {
                tracing::warn!(message_id = %msg.id, error = %e, label = e.label(), "generation failed; will retry");
                return Outcome::Retry { after: retry_backoff(msg.receive_count), label: e.label().into() };
            }
            Err(e) => {
                tracing::warn!(message_id = %msg.id, error = %e, label = e.label(), "job failed for good");
                let line = ResultLine::failed(&job, &e);
                return self.fail_for_good(msg, &job.result_key, &line, e.label()).await;
            }
        };
        let line = ResultLine::success(&job, unix_secs(msg.sent_at), &completion);
        match self.write(msg, &job.result_key, &line).await {
            Ok(true) => {}
            // The key was taken: by an earlier delivery of this message, or by another message
            // with the same custom_id (a duplicate).
            Ok(false) => {
                return match self.slot_owner(msg, &job).await {
                    Ok(Slot::Taken) => self.refuse_duplicate(msg, &job).await,
                    Ok(_) => Outcome::Done,
                    Err(outcome) => outcome,
                }
            }
            Err(outcome) => return outcome,
        }
        metrics::job(&metrics::JobMetrics {
            message_id: msg.id.as_str(),
            custom_id: &job.custom_id,
            model: &job.model,
            queue_wait_s,
            generation_s: completion.timings.prefill_s + completion.timings.decode_s,
            prefill_s: completion.timings.prefill_s,
            prompt_tokens: completion.usage.prompt_tokens,
            completion_tokens: completion.usage.completion_tokens,
            receive_count: msg.receive_count,
        });
        Outcome::Done
    }
}

/// The generation span, named and described by the GenAI semantic conventions.
fn generation_span(job: &ValidJob) -> tracing::Span {
    let operation = if job.chat { "chat" } else { "text_completion" };
    tracing::info_span!(
        target: TARGET,
        "generate",
        otel.name = %format!("{operation} {}", job.model),
        gen_ai.operation.name = operation,
        gen_ai.provider.name = "ember",
        gen_ai.request.model = %job.model,
        gen_ai.request.max_tokens = job.request.max_tokens,
        gen_ai.request.temperature = f64::from(job.request.sampling.temperature),
        gen_ai.request.top_p = f64::from(job.request.sampling.top_p),
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// Who holds a job's result key.
enum Slot {
    Free,
    /// A result of this message (an earlier delivery of it).
    Ours,
    /// A result of another message: a duplicate `custom_id` in the batch.
    Taken,
}

impl JobHandler {
    /// Runs the generation: in the shared batch, or alone on a blocking thread. `Err` is the
    /// outcome of a generation that panicked.
    async fn generate(
        &self,
        msg: &ReceivedMessage,
        job: &ValidJob,
        shutdown: &Shutdown,
    ) -> Result<Result<ember_engine::Completion, EngineError>, Outcome> {
        Ok(match &self.batcher {
            Some(batcher) => batcher.generate(job.request.clone(), shutdown.cancel_flag()).await,
            None => {
                let (engine, request, stop) = (self.engine.clone(), job.request.clone(), shutdown.clone());
                match tokio::task::spawn_blocking(move || engine.generate_until(&request, stop.flag())).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(message_id = %msg.id, error = %e, "generation panicked");
                        let message = format!("the worker failed on this job: {e}");
                        let line =
                            ResultLine::not_run(&job.message_id, &job.custom_id, "generation_panicked", &message);
                        return Err(self.retry_or_give_up(msg, &job.result_key, &line, "generation_panicked").await);
                    }
                }
            }
        })
    }

    async fn slot_owner(&self, msg: &ReceivedMessage, job: &ValidJob) -> Result<Slot, Outcome> {
        match self.store.get(&job.result_key).await {
            Ok(None) => Ok(Slot::Free),
            Ok(Some(bytes)) => {
                let own_id = format!("batch_req_{}", derived_id(&job.message_id));
                match serde_json::from_slice::<ResultLine>(&bytes) {
                    Ok(line) if line.id != own_id => Ok(Slot::Taken),
                    Ok(_) => Ok(Slot::Ours),
                    // Not a result line Ember wrote: never overwrite it, and do not answer
                    // this job with it either.
                    Err(_) => Ok(Slot::Taken),
                }
            }
            Err(e) => {
                tracing::warn!(message_id = %msg.id, error = %e, "could not check for an earlier result; will retry");
                Err(Outcome::Retry { after: retry_backoff(msg.receive_count), label: e.label().into() })
            }
        }
    }

    /// The first job with a custom_id keeps its result; this one gets an error result in its
    /// own `_rejected/` slot (keyed by its message id) and goes to the dead letters, like any
    /// refused job.
    async fn refuse_duplicate(&self, msg: &ReceivedMessage, job: &ValidJob) -> Outcome {
        let batch = job.batch_id.clone().unwrap_or_else(|| DEFAULT_BATCH.to_string());
        let rejected = RejectedJob {
            message_id: job.message_id.clone(),
            custom_id: job.custom_id.clone(),
            batch_id: job.batch_id.clone(),
            result_key: rejected_result_key(job.batch_id.as_deref(), &job.message_id),
            error: JobError::DuplicateCustomId { custom_id: job.custom_id.clone(), batch },
        };
        let label = rejected.error.label();
        tracing::warn!(message_id = %msg.id, custom_id = ?job.custom_id, label, "job refused: duplicate custom_id");
        self.fail_for_good(msg, &rejected.result_key, &ResultLine::rejected(&rejected), label).await
    }
}

#[async_trait::async_trait]
impl Handler for JobHandler {
    async fn handle(&self, msg: &ReceivedMessage, shutdown: &Shutdown) -> Outcome {
        match self.check(msg).await {
            Err(outcome) => outcome,
            Ok(Ok(job)) => self.run(msg, job, shutdown).await,
            Ok(Err(rejected)) => {
                let label = rejected.error.label();
                tracing::warn!(message_id = %msg.id, custom_id = %rejected.custom_id, label, error = %rejected.error,
                    "job refused");
                let line = ResultLine::rejected(&rejected);
                self.fail_for_good(msg, &rejected.result_key, &line, label).await
            }
        }
    }
}

/// Sends the body as it is, in the trace `msg` came with (a redriven job stays in it); a
/// queue that carries only text (SQS) gets it with the invalid UTF-8 sequences replaced (the
/// error result already names the offset).
pub(crate) async fn send_to_dlq(
    queue: &dyn Queue,
    msg: &ReceivedMessage,
    body: &[u8],
    label: &str,
) -> Result<(), crate::queue::QueueError> {
    let trace = msg.traceparent.as_deref();
    match queue.send_to_dlq(body.to_vec(), label, trace).await {
        Err(crate::queue::QueueError::BodyNotUtf8 { .. }) => {
            queue.send_to_dlq(String::from_utf8_lossy(body).into_owned().into_bytes(), label, trace).await.map(|_| ())
        }
        other => other.map(|_| ()),
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}
