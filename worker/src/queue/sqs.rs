//! The SQS queue: a standard queue and its dead-letter queue, tied by a redrive policy.
//!
//! SQS message bodies are text (UTF-8, and only the characters SQS allows: tab, newline,
//! carriage return and U+0020 upward, without surrogates and U+FFFE/U+FFFF). A body that is
//! not is refused by `send` with [`QueueError::BodyNotUtf8`] or [`QueueError::BodyInvalid`]
//! before any request, instead of being mangled; callers that must carry bytes encode them
//! (base64) first. So every body received from SQS is valid UTF-8.
//!
//! Redrive copies the DLQ's messages back (receive, send, delete) rather than use
//! `StartMessageMoveTask`, which moto does not implement: the moved messages get new ids and
//! a fresh receive count.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, DeleteMessageBatchRequestEntry, Message, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use ember_model_loader::aws::{AwsError, Failure};

use super::{
    check_delay, check_receive, check_visibility, sqs_allows, sqs_text, DeadLetter, MessageId, OutgoingMessage, Queue,
    QueueDepth, QueueError, ReceiptHandle, ReceiveOptions, ReceivedMessage, DLQ_REASON_ATTRIBUTE, MAX_BATCH,
    MAX_BODY_BYTES,
};
use crate::telemetry::otel::TRACEPARENT;

/// Longest reason kept on a message sent to the DLQ (it counts against the message size).
const MAX_REASON_CHARS: usize = 1024;
/// DLQ messages are kept the longest SQS allows (14 days), so poison jobs can be inspected.
const DLQ_RETENTION_SECS: &str = "1209600";

/// A queue pair on SQS.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: Client,
    url: String,
    /// `None` for a queue opened with [`SqsQueue::inspect`] that has no redrive policy.
    dlq_url: Option<String>,
}

/// What [`SqsQueue::ensure`] creates: `<name>` with a redrive policy to `<name>-dlq`.
#[derive(Debug, Clone)]
pub struct SqsQueueSetup {
    pub name: String,
    pub visibility_timeout: Duration,
    /// Deliveries before SQS moves a message to the DLQ.
    pub max_receive_count: u32,
}

impl SqsQueue {
    /// A queue pair whose URLs are known.
    pub fn new(client: Client, url: impl Into<String>, dlq_url: impl Into<String>) -> Self {
        Self { client, url: url.into(), dlq_url: Some(dlq_url.into()) }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The DLQ's URL; `None` when the queue has no redrive policy (see [`SqsQueue::inspect`]).
    pub fn dlq_url(&self) -> Option<&str> {
        self.dlq_url.as_deref()
    }

    fn dlq(&self) -> Result<&str, QueueError> {
        self.dlq_url.as_deref().ok_or_else(|| QueueError::NoDlq(queue_name(&self.url).to_string()))
    }

    /// Creates the queue pair of `setup` or, when it exists, sets its visibility timeout and
    /// redrive policy to `setup`'s values.
    pub async fn ensure(client: Client, setup: &SqsQueueSetup) -> Result<Self, QueueError> {
        check_visibility(setup.visibility_timeout)?;
        let dlq_url = get_or_create(
            &client,
            &format!("{}-dlq", setup.name),
            vec![(QueueAttributeName::MessageRetentionPeriod, DLQ_RETENTION_SECS.to_string())],
        )
        .await?;
        let dlq_arn = queue_attribute(&client, &dlq_url, QueueAttributeName::QueueArn)
            .await?
            .ok_or_else(|| QueueError::MalformedResponse("the DLQ's QueueArn".into()))?;
        let policy = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": setup.max_receive_count,
        });
        let attributes = vec![
            (QueueAttributeName::VisibilityTimeout, ceil_secs(setup.visibility_timeout).to_string()),
            (QueueAttributeName::RedrivePolicy, policy.to_string()),
        ];
        let url = get_or_create(&client, &setup.name, attributes).await?;
        Ok(Self::new(client, url, dlq_url))
    }

    /// Looks up an existing queue by name and finds its DLQ through its redrive policy: what a
    /// worker needs, since it dead-letters jobs that fail for good. A queue without a redrive
    /// policy is [`QueueError::NoDlq`].
    pub async fn open(client: Client, name: &str) -> Result<Self, QueueError> {
        let queue = Self::inspect(client, name).await?;
        queue.dlq()?;
        Ok(queue)
    }

    /// Looks up an existing queue by name, and its DLQ when it has a redrive policy: for
    /// commands that only look at the queue or add to it (`status`, `submit`), which work on a
    /// queue without a DLQ. Its DLQ operations answer [`QueueError::NoDlq`].
    pub async fn inspect(client: Client, name: &str) -> Result<Self, QueueError> {
        let url = queue_url(&client, name, None).await?;
        let Some(policy) = queue_attribute(&client, &url, QueueAttributeName::RedrivePolicy).await? else {
            return Ok(Self { client, url, dlq_url: None });
        };
        let arn = serde_json::from_str::<serde_json::Value>(&policy)
            .ok()
            .and_then(|v| v.get("deadLetterTargetArn")?.as_str().map(str::to_owned))
            .ok_or_else(|| QueueError::MalformedResponse(format!("deadLetterTargetArn in {policy}")))?;
        // arn:aws:sqs:<region>:<account>:<name>
        let parts: Vec<&str> = arn.split(':').collect();
        let (Some(account), Some(dlq_name)) = (parts.get(4), parts.get(5)) else {
            return Err(QueueError::MalformedResponse(format!("a queue ARN, got {arn}")));
        };
        let dlq_url = queue_url(&client, dlq_name, Some(account)).await?;
        Ok(Self::new(client, url, dlq_url))
    }

    async fn send_one(
        &self,
        url: &str,
        body: Vec<u8>,
        delay: Option<Duration>,
        reason: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<MessageId, QueueError> {
        check_delay(delay)?;
        let reason = reason.map(|r| MessageAttributeValue::builder().data_type("String").string_value(clean_reason(r)));
        let reason = reason.map(|r| r.build()).transpose().map_err(|e| QueueError::InvalidArgument(e.to_string()))?;
        let mut attributes = trace_attribute(traceparent.map(str::to_string)).unwrap_or_default();
        if let Some(r) = reason {
            attributes.insert(DLQ_REASON_ATTRIBUTE.to_string(), r);
        }
        let out = self
            .client
            .send_message()
            .queue_url(url)
            .message_body(sqs_text(body)?)
            .set_delay_seconds(delay.map(ceil_secs))
            .set_message_attributes((!attributes.is_empty()).then_some(attributes))
            .send()
            .await
            .map_err(|e| sdk_error("SendMessage", url, e))?;
        out.message_id.map(MessageId).ok_or_else(|| QueueError::MalformedResponse("MessageId".into()))
    }

    async fn send_batch_to(&self, url: &str, messages: Vec<OutgoingMessage>) -> Vec<Result<MessageId, QueueError>> {
        let mut results: Vec<Option<Result<MessageId, QueueError>>> = vec![None; messages.len()];
        let mut chunk: Vec<SendMessageBatchRequestEntry> = Vec::new();
        let mut chunk_bytes = 0;
        for (i, m) in messages.into_iter().enumerate() {
            let body = match check_delay(m.delay).and_then(|()| sqs_text(m.body)) {
                Ok(body) => body,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            // A batch request is limited in entries and in total body size alike.
            if chunk.len() == MAX_BATCH || chunk_bytes + body.len() > MAX_BODY_BYTES {
                self.send_chunk(url, std::mem::take(&mut chunk), &mut results).await;
                chunk_bytes = 0;
            }
            chunk_bytes += body.len();
            let entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(body)
                .set_delay_seconds(m.delay.map(ceil_secs))
                .set_message_attributes(trace_attribute(m.traceparent))
                .build();
            match entry {
                Ok(entry) => chunk.push(entry),
                Err(e) => results[i] = Some(Err(QueueError::InvalidArgument(e.to_string()))),
            }
        }
        self.send_chunk(url, chunk, &mut results).await;
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(QueueError::MalformedResponse("an answer for a batch entry".into()))))
            .collect()
    }

    async fn send_chunk(
        &self,
        url: &str,
        chunk: Vec<SendMessageBatchRequestEntry>,
        results: &mut [Option<Result<MessageId, QueueError>>],
    ) {
        if chunk.is_empty() {
            return;
        }
        let indices: Vec<usize> = chunk.iter().filter_map(|e| e.id().parse().ok()).collect();
        let sent = self.client.send_message_batch().queue_url(url).set_entries(Some(chunk)).send().await;
        let out = match sent {
            Ok(out) => out,
            Err(e) => {
                let e = sdk_error("SendMessageBatch", url, e);
                for i in indices {
                    results[i] = Some(Err(e.clone()));
                }
                return;
            }
        };
        for ok in out.successful() {
            if let Some(slot) = ok.id().parse::<usize>().ok().and_then(|i| results.get_mut(i)) {
                *slot = Some(Ok(MessageId(ok.message_id().to_string())));
            }
        }
        for failed in out.failed() {
            if let Some(slot) = failed.id().parse::<usize>().ok().and_then(|i| results.get_mut(i)) {
                *slot = Some(Err(entry_error("SendMessageBatch", url, failed)));
            }
        }
    }

    async fn receive_from(&self, url: &str, opts: &ReceiveOptions) -> Result<Vec<ReceivedMessage>, QueueError> {
        check_receive(opts)?;
        let out = self
            .client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(opts.max_messages as i32)
            .wait_time_seconds(ceil_secs(opts.wait))
            .set_visibility_timeout(opts.visibility_timeout.map(ceil_secs))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names(TRACEPARENT)
            .send()
            .await
            .map_err(|e| sdk_error("ReceiveMessage", url, e))?;
        out.messages.unwrap_or_default().into_iter().map(received).collect()
    }

    async fn delete_batch_from(&self, url: &str, receipts: &[ReceiptHandle]) -> Vec<Result<(), QueueError>> {
        let mut results = Vec::with_capacity(receipts.len());
        for chunk in receipts.chunks(MAX_BATCH) {
            let mut answers: Vec<Result<(), QueueError>> = vec![Ok(()); chunk.len()];
            let entries: Result<Vec<_>, _> = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(r.as_str()).build()
                })
                .collect();
            let sent = match entries {
                Ok(entries) => self
                    .client
                    .delete_message_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| sdk_error("DeleteMessageBatch", url, e)),
                Err(e) => Err(QueueError::InvalidArgument(e.to_string())),
            };
            match sent {
                Ok(out) => {
                    for failed in out.failed() {
                        if let Some(slot) = failed.id().parse::<usize>().ok().and_then(|i| answers.get_mut(i)) {
                            *slot = Err(entry_error("DeleteMessageBatch", url, failed));
                        }
                    }
                }
                Err(e) => answers.iter_mut().for_each(|a| *a = Err(e.clone())),
            }
            results.extend(answers);
        }
        results
    }

    async fn visible_count(&self, url: &str, names: &[QueueAttributeName]) -> Result<Vec<u64>, QueueError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| sdk_error("GetQueueAttributes", url, e))?;
        let attrs = out.attributes.unwrap_or_default();
        Ok(names.iter().map(|n| attrs.get(n).and_then(|v| v.parse().ok()).unwrap_or(0)).collect())
    }
}

#[async_trait::async_trait]
impl Queue for SqsQueue {
    async fn send(&self, body: Vec<u8>, delay: Option<Duration>) -> Result<MessageId, QueueError> {
        self.send_one(&self.url, body, delay, None, None).await
    }

    async fn send_batch(&self, messages: Vec<OutgoingMessage>) -> Vec<Result<MessageId, QueueError>> {
        self.send_batch_to(&self.url, messages).await
    }

    async fn receive(&self, opts: &ReceiveOptions) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.receive_from(&self.url, opts).await
    }

    async fn delete_batch(&self, receipts: &[ReceiptHandle]) -> Vec<Result<(), QueueError>> {
        self.delete_batch_from(&self.url, receipts).await
    }

    async fn change_visibility(&self, receipt: &ReceiptHandle, timeout: Duration) -> Result<(), QueueError> {
        check_visibility(timeout)?;
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt.as_str())
            .visibility_timeout(ceil_secs(timeout))
            .send()
            .await
            .map_err(|e| sdk_error("ChangeMessageVisibility", &self.url, e))?;
        Ok(())
    }

    async fn send_to_dlq(
        &self,
        body: Vec<u8>,
        reason: &str,
        traceparent: Option<&str>,
    ) -> Result<MessageId, QueueError> {
        self.send_one(self.dlq()?, body, None, Some(reason), traceparent).await
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        use QueueAttributeName as A;
        let main = [
            A::ApproximateNumberOfMessages,
            A::ApproximateNumberOfMessagesNotVisible,
            A::ApproximateNumberOfMessagesDelayed,
        ];
        let dlq = async {
            match &self.dlq_url {
                Some(url) => Ok(self.visible_count(url, &[A::ApproximateNumberOfMessages]).await?[0]),
                None => Ok(0),
            }
        };
        let (main, dlq) = tokio::try_join!(self.visible_count(&self.url, &main), dlq)?;
        Ok(QueueDepth { visible: main[0], in_flight: main[1], delayed: main[2], dlq_visible: dlq })
    }

    fn has_dlq(&self) -> bool {
        self.dlq_url.is_some()
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        // SQS cannot peek: receive until the DLQ is empty (each receive hides what it got for
        // a minute, so nothing comes twice), then make every message visible again.
        let dlq_url = self.dlq()?;
        let mut out = Vec::new();
        let mut receipts = Vec::new();
        let result = async {
            while out.len() < max {
                let got = self
                    .client
                    .receive_message()
                    .queue_url(dlq_url)
                    .max_number_of_messages(MAX_BATCH.min(max - out.len()) as i32)
                    .wait_time_seconds(1)
                    .visibility_timeout(60)
                    .message_attribute_names(DLQ_REASON_ATTRIBUTE)
                    .send()
                    .await
                    .map_err(|e| sdk_error("ReceiveMessage", dlq_url, e))?;
                let messages = got.messages.unwrap_or_default();
                if messages.is_empty() {
                    break;
                }
                for m in messages {
                    let reason = m
                        .message_attributes
                        .as_ref()
                        .and_then(|a| a.get(DLQ_REASON_ATTRIBUTE))
                        .and_then(|v| v.string_value.clone());
                    let id = m.message_id.ok_or_else(|| QueueError::MalformedResponse("MessageId".into()))?;
                    if let Some(r) = m.receipt_handle {
                        receipts.push(ReceiptHandle(r));
                    }
                    out.push(DeadLetter { id: MessageId(id), body: m.body.unwrap_or_default().into_bytes(), reason });
                }
            }
            Ok::<_, QueueError>(())
        }
        .await;
        for r in &receipts {
            let visible = self
                .client
                .change_message_visibility()
                .queue_url(dlq_url)
                .receipt_handle(r.as_str())
                .visibility_timeout(0)
                .send()
                .await;
            if let Err(e) = visible {
                tracing::warn!(error = %sdk_error("ChangeMessageVisibility", dlq_url, e), "a dead letter stays hidden for a minute");
            }
        }
        result.map(|()| out)
    }

    async fn redrive(&self) -> Result<u64, QueueError> {
        // A 1 s long poll (not a short poll, which samples only some SQS servers) tells an
        // empty DLQ from a quiet moment.
        let opts = ReceiveOptions {
            max_messages: MAX_BATCH,
            wait: Duration::from_secs(1),
            visibility_timeout: Some(Duration::from_secs(60)),
        };
        let dlq_url = self.dlq()?;
        let mut moved = 0;
        loop {
            let batch = self.receive_from(dlq_url, &opts).await?;
            if batch.is_empty() {
                return Ok(moved);
            }
            // A redriven job stays in its trace.
            let bodies = batch
                .iter()
                .map(|m| OutgoingMessage::new(m.body.clone()).with_traceparent(m.traceparent.clone()))
                .collect();
            let sent = self.send_batch_to(&self.url, bodies).await;
            let mut done = Vec::new();
            let mut first_error = None;
            for (msg, result) in batch.into_iter().zip(sent) {
                match result {
                    Ok(_) => done.push(msg.receipt),
                    Err(e) => first_error = first_error.or(Some(e)),
                }
            }
            // A message sent but not deleted from the DLQ would come back there as a duplicate:
            // report the delete failure rather than count it as moved.
            for result in self.delete_batch_from(dlq_url, &done).await {
                result?;
                moved += 1;
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
    }
}

/// A reason SQS will take: allowed characters only, not empty, not too long.
fn clean_reason(reason: &str) -> String {
    let clean: String = reason.chars().map(|c| if sqs_allows(c) { c } else { '?' }).take(MAX_REASON_CHARS).collect();
    if clean.trim().is_empty() {
        "unspecified".into()
    } else {
        clean
    }
}

/// The `traceparent` message attribute; a value SQS would refuse is left out (the job still
/// runs, in a new trace).
fn trace_attribute(traceparent: Option<String>) -> Option<HashMap<String, MessageAttributeValue>> {
    let value = traceparent.filter(|t| !t.is_empty() && t.len() <= 256 && t.chars().all(sqs_allows))?;
    let attribute = MessageAttributeValue::builder().data_type("String").string_value(value).build().ok()?;
    Some(HashMap::from([(TRACEPARENT.to_string(), attribute)]))
}

fn received(m: Message) -> Result<ReceivedMessage, QueueError> {
    let traceparent = m
        .message_attributes
        .as_ref()
        .and_then(|a| a.get(TRACEPARENT))
        .and_then(|v| v.string_value().map(str::to_string));
    let attrs = m.attributes.unwrap_or_default();
    let number = |name: MessageSystemAttributeName| attrs.get(&name).and_then(|v| v.parse::<u64>().ok());
    Ok(ReceivedMessage {
        id: MessageId(m.message_id.ok_or_else(|| QueueError::MalformedResponse("MessageId".into()))?),
        receipt: ReceiptHandle(m.receipt_handle.ok_or_else(|| QueueError::MalformedResponse("ReceiptHandle".into()))?),
        body: m.body.unwrap_or_default().into_bytes(),
        // Both attributes were asked for; should a proxy drop them, guess rather than fail
        // the whole batch.
        receive_count: number(MessageSystemAttributeName::ApproximateReceiveCount)
            .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        sent_at: number(MessageSystemAttributeName::SentTimestamp)
            .map_or_else(SystemTime::now, |ms| UNIX_EPOCH + Duration::from_millis(ms)),
        traceparent,
    })
}

async fn queue_url(client: &Client, name: &str, owner: Option<&str>) -> Result<String, QueueError> {
    let out = client
        .get_queue_url()
        .queue_name(name)
        .set_queue_owner_aws_account_id(owner.map(str::to_owned))
        .send()
        .await
        .map_err(|e| sdk_error("GetQueueUrl", name, e))?;
    out.queue_url.ok_or_else(|| QueueError::MalformedResponse("QueueUrl".into()))
}

async fn queue_attribute(client: &Client, url: &str, name: QueueAttributeName) -> Result<Option<String>, QueueError> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(name.clone())
        .send()
        .await
        .map_err(|e| sdk_error("GetQueueAttributes", url, e))?;
    Ok(out.attributes.unwrap_or_default().remove(&name))
}

/// The URL of queue `name`, created with `attributes` if missing, or updated to them.
async fn get_or_create(
    client: &Client,
    name: &str,
    attributes: Vec<(QueueAttributeName, String)>,
) -> Result<String, QueueError> {
    let attributes: HashMap<_, _> = attributes.into_iter().collect();
    match queue_url(client, name, None).await {
        Ok(url) => {
            client
                .set_queue_attributes()
                .queue_url(&url)
                .set_attributes(Some(attributes))
                .send()
                .await
                .map_err(|e| sdk_error("SetQueueAttributes", &url, e))?;
            Ok(url)
        }
        // Two processes creating the same queue with the same attributes both succeed.
        Err(QueueError::QueueNotFound(_)) => client
            .create_queue()
            .queue_name(name)
            .set_attributes(Some(attributes))
            .send()
            .await
            .map_err(|e| sdk_error("CreateQueue", name, e))?
            .queue_url
            .ok_or_else(|| QueueError::MalformedResponse("QueueUrl".into())),
        Err(e) => Err(e),
    }
}

/// The error of one failed entry of a batch request.
fn entry_error(op: &'static str, queue: &str, failed: &BatchResultErrorEntry) -> QueueError {
    let status = if failed.sender_fault() { 400 } else { 500 };
    let code = failed.code();
    let failure = Failure {
        kind: ember_model_loader::aws::kind_of(code, Some(status)),
        code: code.to_string(),
        message: failed.message().unwrap_or_default().to_string(),
        status: Some(status),
    };
    from_code(AwsError { op, resource: format!("SQS queue `{}`", queue_name(queue)), failure }, queue)
}

/// SQS takes whole seconds; round up so that a delay or timeout is never shorter than asked.
fn ceil_secs(d: Duration) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

fn sdk_error<E>(op: &'static str, queue: &str, err: SdkError<E>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    from_code(AwsError::new(op, format!("SQS queue `{}`", queue_name(queue)), &err), queue)
}

/// A queue's name from its URL (`https://sqs.../123456789012/jobs` is `jobs`), or the name itself.
fn queue_name(url_or_name: &str) -> &str {
    url_or_name.rsplit('/').next().unwrap_or(url_or_name)
}

/// An SQS error by its code (query-protocol codes carry an `AWS.SimpleQueueService.`
/// prefix, JSON-protocol ones do not), on top of the shared classification.
fn from_code(err: AwsError, queue: &str) -> QueueError {
    let message = err.failure.message.clone();
    match err.failure.short_code() {
        "NonExistentQueue" | "QueueDoesNotExist" => QueueError::QueueNotFound(queue_name(queue).to_string()),
        "ReceiptHandleIsInvalid" | "MessageNotInflight" | "InvalidIdFormat" => QueueError::ReceiptInvalid(message),
        "InvalidParameterValue" if message.contains("ReceiptHandle") => QueueError::ReceiptInvalid(message),
        "InvalidMessageContents" | "MessageTooLong" | "BatchRequestTooLong" => QueueError::BodyInvalid(message),
        _ => QueueError::Aws(err),
    }
}
