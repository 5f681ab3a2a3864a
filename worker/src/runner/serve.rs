//! The poll loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::heartbeat::Heartbeat;
use super::{Handler, Outcome, Shutdown};
use crate::queue::{MessageId, Queue, ReceiptHandle, ReceiveOptions, ReceivedMessage, MAX_BATCH};
use crate::telemetry::otel::{self, TARGET};
use tracing::Instrument;

/// A finished message to delete, and the span of its job (the delete's parent).
type ToDelete = (ReceiptHandle, MessageId, tracing::Span);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Jobs running at once.
    pub concurrency: usize,
    /// Long-poll wait of each receive.
    pub wait: Duration,
    /// Visibility timeout asked for on receive and renewed by the heartbeat.
    pub visibility: Duration,
    /// After shutdown is triggered, how long in-flight jobs get to finish before they are
    /// released back to the queue.
    pub grace: Duration,
    /// Stop when a receive comes back empty and nothing is running (`ember run`, tests).
    pub exit_when_idle: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            concurrency: 2,
            wait: Duration::from_secs(20),
            visibility: Duration::from_secs(60),
            grace: Duration::from_secs(25),
            exit_when_idle: false,
        }
    }
}

/// Counts of what the loop did.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Deliveries taken from the queue (a redelivered message counts again).
    pub received: AtomicU64,
    pub done: AtomicU64,
    pub poisoned: AtomicU64,
    pub retried: AtomicU64,
    pub released: AtomicU64,
    /// Jobs running now.
    pub running: AtomicU64,
}

impl ServeStats {
    pub fn finished(&self) -> u64 {
        self.done.load(Ordering::Relaxed) + self.poisoned.load(Ordering::Relaxed)
    }
}

/// Receives and runs messages until shutdown (or until idle with `exit_when_idle`).
pub async fn serve(
    queue: Arc<dyn Queue>,
    handler: Arc<dyn Handler>,
    opts: &ServeOptions,
    shutdown: &Shutdown,
    stats: Arc<ServeStats>,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let deleter = Deleter::start(queue.clone());
    // Jobs are told to stop (and release their message) only once the grace period is over,
    // not at the signal: a job that can finish in time finishes.
    let stop_jobs = Shutdown::new();
    let mut running: JoinSet<()> = JoinSet::new();
    while !shutdown.is_triggered() {
        // Only ask for as many messages as there are free slots: a message received and left
        // waiting would sit out its visibility timeout for nothing.
        // Waiting for a free slot must not outlast a shutdown: the grace period starts here.
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.wait() => break,
        };
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        // With nothing running and nothing queued, `--exit-when-idle` is done now rather than
        // after one more long poll.
        while running.try_join_next().is_some() {}
        if opts.exit_when_idle && running.is_empty() && queue_is_drained(queue.as_ref()).await {
            break;
        }
        let receive =
            ReceiveOptions { max_messages: permits.len(), wait: opts.wait, visibility_timeout: Some(opts.visibility) };
        tracing::debug!(max = permits.len(), "waiting for messages");
        let receiving = queue.receive(&receive);
        tokio::pin!(receiving);
        let messages = tokio::select! {
            r = &mut receiving => r,
            _ = shutdown.wait() => {
                if queue.receive_is_cancel_safe() {
                    tracing::info!("shutdown: stopped waiting for messages");
                    break;
                }
                // Dropping a long poll does not stop it in the queue, which would still hand
                // messages to nobody and hide them for the visibility timeout: let it end
                // (within `wait`) and hand back what it got. A second signal exits at once.
                if let Ok(got) = receiving.await {
                    for msg in got {
                        let _ = queue.change_visibility(&msg.receipt, Duration::ZERO).await;
                    }
                }
                break;
            }
        };
        let messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, label = e.label(), "receive failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        stats.received.fetch_add(messages.len() as u64, Ordering::Relaxed);
        for (msg, permit) in messages.into_iter().zip(permits) {
            let (queue, handler, shutdown, stats) = (queue.clone(), handler.clone(), stop_jobs.clone(), stats.clone());
            let (visibility, deletes) = (opts.visibility, deleter.tx.clone());
            running.spawn(async move {
                stats.running.fetch_add(1, Ordering::Relaxed);
                run_one(queue, handler, msg, visibility, &shutdown, &stats, &deletes).await;
                stats.running.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }
    // Shutdown: running jobs get the grace period to finish; then they are told to stop, and
    // release their messages to other workers at once. Whatever has not stopped a few seconds
    // later is abandoned: its message comes back after the visibility timeout.
    if drain(&mut running, opts.grace).await.is_err() {
        tracing::warn!(left = running.len(), "grace period over; releasing the running jobs");
        stop_jobs.trigger();
        if drain(&mut running, Duration::from_secs(5)).await.is_err() {
            tracing::warn!(left = running.len(), "jobs did not stop; abandoning them to the visibility timeout");
            running.abort_all();
            while running.join_next().await.is_some() {}
        }
    }
    deleter.finish().await;
    Ok(())
}

/// Waits up to `within` for every running job to end.
async fn drain(running: &mut JoinSet<()>, within: Duration) -> Result<(), tokio::time::error::Elapsed> {
    tokio::time::timeout(within, async { while running.join_next().await.is_some() {} }).await
}

/// Deletes finished messages in batches: whatever finished while the previous batch request
/// was out goes in the next one, so a busy worker makes one delete request per ten jobs and an
/// idle one deletes at once. A crash before a delete only means a redelivery, which finds the
/// result written and deletes the message then.
struct Deleter {
    tx: mpsc::UnboundedSender<ToDelete>,
    task: tokio::task::JoinHandle<()>,
}

impl Deleter {
    fn start(queue: Arc<dyn Queue>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<ToDelete>();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let receipts: Vec<ReceiptHandle> = batch.iter().map(|(r, ..)| r.clone()).collect();
                let spans: Vec<tracing::Span> = batch
                    .iter()
                    .map(|(.., job)| {
                        tracing::info_span!(target: TARGET, parent: job, "delete",
                            messaging.batch.message_count = receipts.len(), error.type = tracing::field::Empty)
                    })
                    .collect();
                for (((_, id, _), result), span) in batch.iter().zip(queue.delete_batch(&receipts).await).zip(&spans) {
                    if let Err(e) = result {
                        span.record("error.type", e.label());
                        // The result is written: a failed delete only means a redelivery,
                        // which the create-only result write turns into a no-op.
                        tracing::warn!(message_id = %id, error = %e, "could not delete a finished message");
                    }
                }
            }
        });
        Self { tx, task }
    }

    /// Sends what is pending and stops.
    async fn finish(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

/// Nothing visible, hidden or delayed (messages waiting out a retry backoff count as work).
async fn queue_is_drained(queue: &dyn crate::queue::Queue) -> bool {
    match queue.depth().await {
        Ok(d) => d.visible + d.in_flight + d.delayed == 0,
        Err(_) => false,
    }
}

async fn run_one(
    queue: Arc<dyn Queue>,
    handler: Arc<dyn Handler>,
    msg: ReceivedMessage,
    visibility: Duration,
    shutdown: &Shutdown,
    stats: &ServeStats,
    deletes: &mpsc::UnboundedSender<ToDelete>,
) {
    let span = otel::job_span(&msg);
    let outcome = {
        let _heartbeat = Heartbeat::start(queue.clone(), msg.receipt.clone(), visibility);
        handler.handle(&msg, shutdown).instrument(span.clone()).await
    };
    otel::record_outcome(&span, &outcome);
    let settled = match &outcome {
        Outcome::Done | Outcome::Poisoned { .. } => {
            deletes.send((msg.receipt.clone(), msg.id.clone(), span)).map_err(|_| crate::queue::QueueError::Closed)
        }
        Outcome::Retry { after, .. } | Outcome::Rejected { after, .. } => {
            queue.change_visibility(&msg.receipt, *after).await
        }
        Outcome::Released => queue.change_visibility(&msg.receipt, Duration::ZERO).await,
    };
    let counter = match &outcome {
        Outcome::Done => &stats.done,
        Outcome::Poisoned { .. } => &stats.poisoned,
        Outcome::Retry { .. } | Outcome::Rejected { .. } => &stats.retried,
        Outcome::Released => &stats.released,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = settled {
        // The result is already written (or the job will simply run again): a failed delete
        // only means a redelivery, which the create-only result write turns into a no-op.
        tracing::warn!(message_id = %msg.id, error = %e, "could not settle the message");
    }
}
