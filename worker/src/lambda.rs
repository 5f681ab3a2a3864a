//! The Lambda entry point's core: one SQS event in, the records it could not finish out, as
//! the partial batch failures (`batchItemFailures`) of an event source mapping with
//! `ReportBatchItemFailures`. `ember lambda` wraps [`run_batch`] in `lambda_runtime`; nothing
//! here needs a Runtime API, so it runs and is tested without one. Function URL requests, which
//! the same function answers, are [`url`]'s.
//!
//! What becomes of each record:
//! - the handler finished it ([`Outcome::Done`], [`Outcome::Poisoned`]): not reported, so the
//!   event source mapping deletes it;
//! - it could not finish ([`Outcome::Retry`], [`Outcome::Rejected`], [`Outcome::Released`]), or it was never started
//!   because the invocation's deadline was too close: reported, so it comes back after its
//!   visibility timeout, and the queue's redrive policy moves it to the DLQ after
//!   `maxReceiveCount` deliveries. A job that can never succeed is answered with an error
//!   result first ([`DeadLetters::Redrive`](crate::runner::DeadLetters::Redrive)).
//!
//! Records run one at a time, in order. Before each one, a record with less than
//! [`BatchOptions::start_margin`] left before the deadline is not started; and a running
//! generation is cancelled [`BatchOptions::cancel_margin`] before the deadline, so the function
//! answers with its record reported instead of timing out (a timeout fails the whole batch).
//!
//! ```no_run
//! # async fn run(handler: ember_worker::runner::JobHandler) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::SystemTime;
//! use aws_lambda_events::event::sqs::SqsEvent;
//! use ember_worker::lambda::{run_batch, usable_deadline, BatchOptions};
//!
//! let event: SqsEvent = serde_json::from_str(r#"{"Records": [{"messageId": "m1", "body": "{}"}]}"#)?;
//! // Lambda's deadline, in milliseconds since the Unix epoch (`Context::deadline`).
//! let deadline_ms = 1_900_000_000_000;
//! let report = run_batch(&handler, event, usable_deadline(deadline_ms, SystemTime::now()), &BatchOptions::default()).await;
//! println!("{} done, {} to retry", report.done, report.failed());
//! let response = report.into_response()?; // Err when a failure cannot be reported
//! # let _ = response; Ok(()) }
//! ```

pub mod url;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};

use crate::queue::{MessageId, ReceiptHandle, ReceivedMessage};
use crate::runner::{Handler, Outcome, Shutdown};

/// The SQS attribute with the delivery count of a message (1 on the first delivery).
pub const RECEIVE_COUNT_ATTRIBUTE: &str = "ApproximateReceiveCount";
/// The SQS attribute with the send time of a message, in milliseconds since the Unix epoch.
pub const SENT_TIMESTAMP_ATTRIBUTE: &str = "SentTimestamp";

/// How close to the deadline an invocation still works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// A record is not started with less than this left before the deadline: it is reported
    /// as failed instead, for a later invocation.
    pub start_margin: Duration,
    /// A running generation is cancelled this long before the deadline, which leaves the
    /// time to report the batch.
    pub cancel_margin: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self { start_margin: Duration::from_secs(15), cancel_margin: Duration::from_secs(2) }
    }
}

/// What one invocation did with its records.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// The answer to the event source mapping: the ids of the records to deliver again.
    pub response: SqsBatchResponse,
    pub records: usize,
    /// Finished with a result.
    pub done: usize,
    /// Finished with an error result, already handed to the DLQ by the handler.
    pub poisoned: usize,
    /// Answered with an error result and reported, for the redrive policy to move to the DLQ.
    pub rejected: usize,
    /// Reported after a transient failure.
    pub retried: usize,
    /// Stopped before finishing (the deadline came) and reported.
    pub released: usize,
    /// Not started because the deadline was too close, and reported.
    pub skipped: usize,
    /// Failed, but carry no `messageId` to report them by; see [`BatchReport::into_response`].
    pub unreportable: usize,
}

impl BatchReport {
    /// Records reported for another delivery (or that would be, had they an id).
    pub fn failed(&self) -> usize {
        self.rejected + self.retried + self.released + self.skipped
    }

    /// The response for Lambda, or an error when a record that did not finish has no
    /// `messageId`. Such a record cannot be named in `batchItemFailures`, and leaving it out
    /// would have it deleted unanswered; failing the invocation instead makes SQS deliver the
    /// whole batch again, which is safe because finished records are found done and skipped.
    pub fn into_response(self) -> Result<SqsBatchResponse, BatchError> {
        match self.unreportable {
            0 => Ok(self.response),
            count => Err(BatchError::Unreportable { count }),
        }
    }

    fn fail(&mut self, message_id: Option<&str>) {
        match message_id {
            Some(id) => self.response.add_failure(id),
            None => self.unreportable += 1,
        }
    }
}

/// Why an invocation answers with an error instead of a batch response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    #[error(
        "{count} record(s) without a messageId did not finish and cannot be named in batchItemFailures; \
         failing the invocation so that the whole batch is delivered again"
    )]
    Unreportable { count: usize },
}

impl BatchError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unreportable { .. } => "unreportable_record",
        }
    }
}

/// The invocation's deadline (`Context::deadline`, milliseconds since the Unix epoch), or
/// `None` when it has already passed as the invocation starts. Lambda never hands out such
/// an invocation; local Runtime API emulators do: cargo-lambda's sends a fixed 600000
/// (ten minutes after the epoch). Treating that as a deadline would fail every record.
pub fn usable_deadline(deadline_ms: u64, now: SystemTime) -> Option<SystemTime> {
    let deadline = UNIX_EPOCH.checked_add(Duration::from_millis(deadline_ms))?;
    (deadline > now).then_some(deadline)
}

/// The record as the handler takes it. `index` names a record that has no `messageId` (its
/// receipt handle is used if it has one), so that its logs and derived ids stay apart from
/// the other records'.
pub fn received_message(record: SqsMessage, index: usize) -> ReceivedMessage {
    let id = record
        .message_id
        .filter(|id| !id.is_empty())
        .or_else(|| record.receipt_handle.clone().filter(|r| !r.is_empty()))
        .unwrap_or_else(|| format!("record-{index}-without-message-id"));
    let receive_count =
        record.attributes.get(RECEIVE_COUNT_ATTRIBUTE).and_then(|c| c.parse::<u32>().ok()).map_or(1, |c| c.max(1));
    let sent_at = record
        .attributes
        .get(SENT_TIMESTAMP_ATTRIBUTE)
        .and_then(|ms| ms.parse::<u64>().ok())
        .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        .unwrap_or_else(SystemTime::now);
    let traceparent =
        record.message_attributes.get(crate::telemetry::otel::TRACEPARENT).and_then(|a| a.string_value.clone());
    ReceivedMessage {
        id: MessageId(id),
        receipt: ReceiptHandle(record.receipt_handle.unwrap_or_default()),
        body: record.body.unwrap_or_default().into_bytes(),
        receive_count,
        sent_at,
        traceparent,
    }
}

/// Runs the records of one event through `handler`, in order; see the module docs.
pub async fn run_batch<H: Handler + ?Sized>(
    handler: &H,
    event: SqsEvent,
    deadline: Option<SystemTime>,
    opts: &BatchOptions,
) -> BatchReport {
    let shutdown = Shutdown::new();
    let _cancel = deadline.map(|d| CancelTimer::arm(&shutdown, d, opts.cancel_margin));
    let mut report = BatchReport { records: event.records.len(), ..Default::default() };
    for (index, record) in event.records.into_iter().enumerate() {
        let message_id = record.message_id.clone().filter(|id| !id.is_empty());
        if message_id.is_none() {
            tracing::error!(index, "an SQS record has no messageId: its failure cannot be reported alone");
        }
        let left = deadline.map(|d| d.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
        if shutdown.is_triggered() || left.is_some_and(|left| left < opts.start_margin) {
            tracing::info!(
                message_id = message_id.as_deref(),
                left_ms = left.map(|l| l.as_millis() as u64),
                "too close to the deadline to start; reporting the record for another delivery"
            );
            report.skipped += 1;
            report.fail(message_id.as_deref());
            continue;
        }
        let msg = received_message(record, index);
        let span = crate::telemetry::otel::job_span(&msg);
        crate::telemetry::otel::link_job(&span);
        let outcome = tracing::Instrument::instrument(handler.handle(&msg, &shutdown), span.clone()).await;
        crate::telemetry::otel::record_outcome(&span, &outcome);
        match outcome {
            Outcome::Done => report.done += 1,
            Outcome::Poisoned { .. } => report.poisoned += 1,
            Outcome::Rejected { label, .. } => {
                // Answered with an error result; the redrive policy takes it to the DLQ.
                report.rejected += 1;
                tracing::info!(message_id = %msg.id, label = %label, "rejected; reporting the record for the redrive policy");
                report.fail(message_id.as_deref());
            }
            Outcome::Retry { label, .. } => {
                report.retried += 1;
                tracing::info!(message_id = %msg.id, label = %label, "reporting the record for another delivery");
                report.fail(message_id.as_deref());
            }
            Outcome::Released => {
                tracing::info!(message_id = %msg.id, "stopped at the deadline; reporting the record");
                report.released += 1;
                report.fail(message_id.as_deref());
            }
        }
    }
    tracing::info!(
        records = report.records,
        done = report.done + report.poisoned,
        failed = report.failed(),
        rejected = report.rejected,
        retried = report.retried,
        released = report.released,
        skipped = report.skipped,
        unreportable = report.unreportable,
        "invocation done"
    );
    report
}

/// Trips a shutdown `margin` before a deadline; disarmed when dropped.
struct CancelTimer(tokio::task::JoinHandle<()>);

impl CancelTimer {
    fn arm(shutdown: &Shutdown, deadline: SystemTime, margin: Duration) -> Self {
        let wait = deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).saturating_sub(margin);
        let shutdown = shutdown.clone();
        Self(tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            tracing::info!("the invocation's deadline is near: cancelling the running job");
            shutdown.trigger();
        }))
    }
}

impl Drop for CancelTimer {
    fn drop(&mut self) {
        self.0.abort();
    }
}
