//! The job queue behind one trait, with two implementations of the same semantics:
//! [`sqs::SqsQueue`] (AWS SQS with a dead-letter queue through a redrive policy) and
//! [`embedded::EmbeddedQueue`] (one SQLite file, the default when no AWS is configured).
//!
//! Both give at-least-once delivery: a received message stays hidden for the visibility
//! timeout and comes back, with a higher receive count, unless it is deleted; a message
//! received more than `maxReceiveCount` times goes to the dead-letter queue (DLQ). Workers
//! therefore make their effects idempotent (create-only result writes) rather than trust the
//! queue to deliver once.
//!
//! ```no_run
//! # async fn run() -> Result<(), ember_worker::queue::QueueError> {
//! use std::{sync::Arc, time::Duration};
//! use ember_worker::queue::{embedded::{EmbeddedOptions, EmbeddedQueue}, Queue, ReceiveOptions};
//! let queue: Arc<dyn Queue> =
//!     Arc::new(EmbeddedQueue::open("/tmp/ember-queue.db", EmbeddedOptions::default()).await?);
//! queue.send(br#"{"custom_id":"1"}"#.to_vec(), None).await?;
//! for msg in queue.receive(&ReceiveOptions::long_poll(Duration::from_secs(20))).await? {
//!     // ... run the job, write its result create-only ...
//!     queue.delete(&msg.receipt).await?;
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

pub mod embedded;
pub mod sqs;

/// Most messages one receive, batch send or batch delete request handles (the SQS limit).
pub const MAX_BATCH: usize = 10;
/// Longest long poll (the SQS limit).
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// Longest per-message delay (the SQS limit).
pub const MAX_DELAY: Duration = Duration::from_secs(900);
/// Longest visibility timeout (the SQS limit).
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);
/// Largest message body: the SQS limit ([`ember_model_loader::aws::SQS_MAX_MESSAGE_BYTES`]),
/// which the embedded queue keeps too.
pub const MAX_BODY_BYTES: usize = ember_model_loader::aws::SQS_MAX_MESSAGE_BYTES;
/// Name of the string attribute that carries the reason on a message sent to the DLQ.
pub const DLQ_REASON_ATTRIBUTE: &str = "ember-reason";

/// A queue's id for one message; stable across redeliveries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId(pub String);

/// The handle for one delivery of a message: deleting or hiding a message needs the handle of
/// its latest delivery, so a worker that lost a message to a redelivery cannot touch it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReceiptHandle(pub String);

impl MessageId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ReceiptHandle {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One delivery of a message.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub id: MessageId,
    pub receipt: ReceiptHandle,
    pub body: Vec<u8>,
    /// 1 on the first delivery (approximate on SQS).
    pub receive_count: u32,
    /// When the message was first sent; the queue wait of a job is measured from here.
    pub sent_at: SystemTime,
    /// The W3C trace context it was sent with (the `traceparent` message attribute).
    pub traceparent: Option<String>,
}

/// A message waiting in the dead-letter queue, as `ember dlq list` shows it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: MessageId,
    pub body: Vec<u8>,
    /// Why it is there: the reason a worker gave with [`Queue::send_to_dlq`], `None` when the
    /// queue's redrive policy moved it (received `maxReceiveCount` times, never finished).
    pub reason: Option<String>,
}

/// A message to send in a batch.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub body: Vec<u8>,
    /// Hidden for this long after sending (at most [`MAX_DELAY`]).
    pub delay: Option<Duration>,
    /// The W3C trace context to send with it (see [`crate::telemetry::otel`]).
    pub traceparent: Option<String>,
}

impl OutgoingMessage {
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        Self { body: body.into(), delay: None, traceparent: None }
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }
}

/// How to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// 1 to [`MAX_BATCH`].
    pub max_messages: usize,
    /// Long-poll wait: return as soon as a message is visible, or empty after this long.
    pub wait: Duration,
    /// Hide the received messages for this long; `None` keeps the queue's default.
    pub visibility_timeout: Option<Duration>,
}

impl ReceiveOptions {
    /// Up to [`MAX_BATCH`] messages, waiting up to `wait`, with the queue's visibility timeout.
    pub fn long_poll(wait: Duration) -> Self {
        Self { max_messages: MAX_BATCH, wait, visibility_timeout: None }
    }
}

/// Approximate message counts (exact on the embedded queue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Ready to be received.
    pub visible: u64,
    /// Received and hidden by their visibility timeout.
    pub in_flight: u64,
    /// Sent with a delay that has not passed.
    pub delayed: u64,
    /// Waiting in the dead-letter queue.
    pub dlq_visible: u64,
}

/// A job queue with SQS semantics; see the module docs.
///
/// Batch methods answer per entry, in input order, so that one bad entry (or one failed
/// request of several) does not hide what happened to the others.
#[async_trait::async_trait]
pub trait Queue: Send + Sync {
    /// Sends one message, hidden for `delay` first.
    async fn send(&self, body: Vec<u8>, delay: Option<Duration>) -> Result<MessageId, QueueError>;
    /// The messaging system, as OpenTelemetry's `messaging.system` names it.
    fn system(&self) -> &'static str {
        "aws_sqs"
    }

    /// Sends messages, [`MAX_BATCH`] per request.
    async fn send_batch(&self, messages: Vec<OutgoingMessage>) -> Vec<Result<MessageId, QueueError>>;

    /// Receives up to `max_messages`, long-polling up to `wait`; empty when none came.
    /// Dropping the future once the request is out may leave messages hidden until their
    /// visibility timeout, as with SQS: they are redelivered, not lost.
    async fn receive(&self, opts: &ReceiveOptions) -> Result<Vec<ReceivedMessage>, QueueError>;

    /// Deletes the delivered messages, [`MAX_BATCH`] per request. A handle whose message was
    /// since redelivered deletes nothing and still answers `Ok`, as SQS does.
    async fn delete_batch(&self, receipts: &[ReceiptHandle]) -> Vec<Result<(), QueueError>>;

    /// Hides a delivered message for `timeout` from now: the heartbeat of a long job, or
    /// `Duration::ZERO` to hand it back at once.
    async fn change_visibility(&self, receipt: &ReceiptHandle, timeout: Duration) -> Result<(), QueueError>;

    /// Puts a body straight into the dead-letter queue with a reason (a terminal error: no
    /// point in waiting for `maxReceiveCount` deliveries), in the trace the job was in
    /// (`traceparent`), which a redrive carries back. The caller then deletes the original.
    async fn send_to_dlq(
        &self,
        body: Vec<u8>,
        reason: &str,
        traceparent: Option<&str>,
    ) -> Result<MessageId, QueueError>;

    /// Message counts of the queue and its DLQ.
    async fn depth(&self) -> Result<QueueDepth, QueueError>;

    /// Moves every message in the DLQ back to the queue, with a fresh receive count; returns
    /// how many moved.
    async fn redrive(&self) -> Result<u64, QueueError>;

    /// Every message in the DLQ, left there (at most `max`).
    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError>;

    /// Whether the queue has a dead-letter queue (an SQS queue without a redrive policy has
    /// none: its DLQ operations answer [`QueueError::NoDlq`]).
    fn has_dlq(&self) -> bool {
        true
    }

    /// Whether a receive in progress may be dropped at shutdown without hiding messages from
    /// other workers: true where the long poll is a local wait between short attempts (the
    /// embedded queue), false where the request is out with a server that will hand messages
    /// to a connection nobody reads (SQS).
    fn receive_is_cancel_safe(&self) -> bool {
        false
    }

    /// Deletes one delivered message.
    async fn delete(&self, receipt: &ReceiptHandle) -> Result<(), QueueError> {
        let mut results = self.delete_batch(std::slice::from_ref(receipt)).await;
        results.pop().unwrap_or(Ok(()))
    }
}

/// A queue operation that failed. `label()` is stable for logs and metrics; `is_retryable()`
/// says whether the same call could succeed later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error(
        "the message body is not UTF-8 (valid up to byte {valid_up_to}): SQS carries only text, send text or base64"
    )]
    BodyNotUtf8 { valid_up_to: usize },
    #[error("the message body was refused: {0}")]
    BodyInvalid(String),
    #[error("the message body is {size} bytes, over the limit of {max}")]
    BodyTooLarge { size: usize, max: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the receipt handle is no longer valid (the message was deleted or delivered again): {0}")]
    ReceiptInvalid(String),
    #[error("SQS queue `{0}` does not exist: check the queue name and the region (AWS_REGION), or create it (--create-queues for development)")]
    QueueNotFound(String),
    #[error("SQS queue `{0}` has no redrive policy, so no dead-letter queue: give it one (infra/ember.yaml, or --create-queues for development) so that jobs failing for good are parked, not retried forever")]
    NoDlq(String),
    /// Any other failed SQS request, with what to check.
    #[error(transparent)]
    Aws(#[from] ember_model_loader::aws::AwsError),
    #[error("the queue's answer is missing {0}")]
    MalformedResponse(String),
    #[error("the queue file is busy (locked by another process): {0}")]
    Busy(String),
    #[error("queue database: {0}")]
    Database(String),
    #[error("the queue's worker thread has stopped")]
    Closed,
}

impl QueueError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::BodyNotUtf8 { .. } => "queue_body_not_utf8",
            Self::BodyInvalid(_) => "queue_body_invalid",
            Self::BodyTooLarge { .. } => "queue_body_too_large",
            Self::InvalidArgument(_) => "queue_invalid_argument",
            Self::ReceiptInvalid(_) => "queue_receipt_invalid",
            Self::QueueNotFound(_) => "queue_not_found",
            Self::NoDlq(_) => "queue_no_dlq",
            Self::Aws(e) => {
                use ember_model_loader::aws::FailureKind as K;
                match e.failure.kind {
                    K::Auth => "queue_auth",
                    K::Throttled => "queue_throttled",
                    K::Transport => "queue_transport",
                    K::Invalid | K::Construction => "queue_invalid_argument",
                    K::Service => "queue_service",
                }
            }
            Self::MalformedResponse(_) => "queue_malformed_response",
            Self::Busy(_) => "queue_busy",
            Self::Database(_) => "queue_database",
            Self::Closed => "queue_closed",
        }
    }

    /// Whether the same call could succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Busy(_) => true,
            Self::Aws(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Checks the arguments both implementations share, so that a job that queues locally also
/// queues on SQS.
pub(crate) fn check_receive(opts: &ReceiveOptions) -> Result<(), QueueError> {
    if opts.max_messages == 0 || opts.max_messages > MAX_BATCH {
        return Err(QueueError::InvalidArgument(format!(
            "max_messages must be 1 to {MAX_BATCH}, not {}",
            opts.max_messages
        )));
    }
    if opts.wait > MAX_WAIT {
        return Err(QueueError::InvalidArgument(format!("wait must be at most {MAX_WAIT:?}, not {:?}", opts.wait)));
    }
    match opts.visibility_timeout {
        Some(v) => check_visibility(v),
        None => Ok(()),
    }
}

pub(crate) fn check_visibility(timeout: Duration) -> Result<(), QueueError> {
    if timeout > MAX_VISIBILITY {
        return Err(QueueError::InvalidArgument(format!(
            "visibility timeout must be at most {MAX_VISIBILITY:?}, not {timeout:?}"
        )));
    }
    Ok(())
}

pub(crate) fn check_delay(delay: Option<Duration>) -> Result<(), QueueError> {
    match delay {
        Some(d) if d > MAX_DELAY => {
            Err(QueueError::InvalidArgument(format!("delay must be at most {MAX_DELAY:?}, not {d:?}")))
        }
        _ => Ok(()),
    }
}

pub(crate) fn check_size(body: &[u8], max: usize) -> Result<(), QueueError> {
    if body.len() > max {
        return Err(QueueError::BodyTooLarge { size: body.len(), max });
    }
    Ok(())
}

/// Turns a body into the text SQS can carry, or says why it cannot: UTF-8, not empty, only
/// the characters SQS allows, at most [`MAX_BODY_BYTES`].
pub fn sqs_text(body: Vec<u8>) -> Result<String, QueueError> {
    check_size(&body, MAX_BODY_BYTES)?;
    let text =
        String::from_utf8(body).map_err(|e| QueueError::BodyNotUtf8 { valid_up_to: e.utf8_error().valid_up_to() })?;
    if text.is_empty() {
        return Err(QueueError::BodyInvalid("SQS messages cannot be empty".into()));
    }
    if let Some((at, c)) = text.char_indices().find(|&(_, c)| !sqs_allows(c)) {
        return Err(QueueError::BodyInvalid(format!(
            "character U+{:04X} at byte {at} is not allowed in an SQS message",
            u32::from(c)
        )));
    }
    Ok(text)
}

/// The characters SQS accepts in bodies and attribute values.
pub(crate) fn sqs_allows(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}
