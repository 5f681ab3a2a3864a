//! Keeps a message hidden while its job runs longer than a fraction of the visibility
//! timeout, so the queue does not hand it to another worker mid-run.

use std::sync::Arc;
use std::time::Duration;

use crate::queue::{Queue, ReceiptHandle};

/// Extends the message's visibility every `visibility / 3` until dropped.
pub struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub fn start(queue: Arc<dyn Queue>, receipt: ReceiptHandle, visibility: Duration) -> Self {
        let period = (visibility / 3).max(Duration::from_millis(200));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tick.tick().await;
                if let Err(e) = queue.change_visibility(&receipt, visibility).await {
                    // The message may already be deleted or its receipt superseded; the job
                    // goes on and its create-only write keeps a duplicate harmless.
                    tracing::warn!(error = %e, label = e.label(), "visibility heartbeat failed");
                }
            }
        });
        Self { task }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}
