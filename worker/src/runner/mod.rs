//! The poll loop that turns queue messages into results: receive, run each message through a
//! [`Handler`] with a visibility heartbeat, then delete, re-hide or release it according to
//! the handler's [`Outcome`]. Used by `ember serve`, `ember run` and (one batch at a time)
//! the Lambda entry point.

pub mod heartbeat;
pub mod jobs;
pub mod report;
pub mod serve;
pub mod shutdown;

use std::time::Duration;

use crate::queue::ReceivedMessage;
pub use jobs::{DeadLetters, JobHandler};
pub use serve::{serve, ServeOptions, ServeStats};
pub use shutdown::Shutdown;

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The result is written: delete the message.
    Done,
    /// A terminal error: the handler wrote an error result and sent the job to the DLQ;
    /// delete the message.
    Poisoned { label: String },
    /// A transient error: leave the message to come back after `after` (redrive moves it to
    /// the DLQ once it has failed `maxReceiveCount` times).
    Retry { after: Duration, label: String },
    /// A terminal error with [`DeadLetters::Redrive`]: the handler wrote an error result and
    /// leaves the message to fail until the queue's redrive policy moves it to the DLQ; hide
    /// it for `after` meanwhile.
    Rejected { after: Duration, label: String },
    /// Stopped before finishing (shutdown): release the message for another worker now.
    Released,
}

/// Runs one message. Implementations make their effects idempotent (create-only writes),
/// because a message can be delivered more than once.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, msg: &ReceivedMessage, shutdown: &Shutdown) -> Outcome;
}

/// Backoff before a transient failure is retried: 2^(receives-1) seconds, capped.
pub fn retry_backoff(receive_count: u32) -> Duration {
    let exp = receive_count.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(retry_backoff(1), Duration::from_secs(1));
        assert_eq!(retry_backoff(3), Duration::from_secs(4));
        assert_eq!(retry_backoff(50), Duration::from_secs(60));
    }
}
