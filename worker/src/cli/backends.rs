//! Choosing the queue and the result store: SQS and S3 when configured, otherwise the
//! embedded defaults (a SQLite queue file and a local directory under `.ember/`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::common::AwsArgs;
use crate::queue::embedded::{EmbeddedOptions, EmbeddedQueue};
use crate::queue::sqs::{SqsQueue, SqsQueueSetup};
use crate::queue::Queue;
use crate::store::local::LocalStore;
use crate::store::s3::S3Store;
use crate::store::ObjectStore;

#[derive(Debug, Clone, clap::Args)]
pub struct QueueArgs {
    /// SQS queue name: jobs come from SQS (its DLQ is found through the redrive policy).
    /// Without it, the embedded queue file is used.
    #[arg(long, env = "EMBER_SQS_QUEUE")]
    pub sqs_queue: Option<String>,
    /// Create the SQS queue and its `-dlq` if missing, with the visibility timeout and
    /// max receive count below (for development; deploy queues with infra/ templates).
    #[arg(long, env = "EMBER_CREATE_QUEUES", value_parser = clap::builder::BoolishValueParser::new())]
    pub create_queues: bool,
    /// The embedded queue's file (used when no SQS queue is given).
    #[arg(long, env = "EMBER_QUEUE_PATH", default_value = ".ember/queue.db")]
    pub queue_path: PathBuf,
    /// Seconds a received job stays hidden; a heartbeat extends it while the job runs.
    #[arg(long, env = "EMBER_VISIBILITY_TIMEOUT", default_value_t = 60)]
    pub visibility_timeout: u64,
    /// Deliveries before a failing job goes to the dead-letter queue (embedded queue and
    /// --create-queues).
    #[arg(long, env = "EMBER_MAX_RECEIVE_COUNT", default_value_t = 3)]
    pub max_receive_count: u32,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Where results go: s3://bucket/prefix, or a local directory. Job results are written
    /// under `results/{batch_id}/` in it and pipeline records under `pipelines/`, so the
    /// default puts results in .ember/results/{batch_id}/.
    #[arg(long, env = "EMBER_RESULTS", default_value = ".ember")]
    pub results: String,
}

impl QueueArgs {
    /// The queue, for commands that only look at it (`status`, `dlq`): an embedded queue file
    /// that does not exist is an error (a mistyped path), not a new empty queue. An SQS queue
    /// without a redrive policy opens (with no DLQ: [`Queue::has_dlq`]).
    pub async fn open_existing(&self, aws: &AwsArgs) -> anyhow::Result<Arc<dyn Queue>> {
        if self.sqs_queue.is_none() && !self.queue_path.exists() {
            anyhow::bail!(
                "there is no queue at {}: nothing was submitted there. Check --queue-path (EMBER_QUEUE_PATH), \
                 or give --sqs-queue for SQS",
                self.queue_path.display()
            );
        }
        self.open_with(aws, Dlq::Optional).await
    }

    /// The queue, for commands that add to it (`submit`): an SQS queue without a DLQ is fine.
    pub async fn open_to_send(&self, aws: &AwsArgs) -> anyhow::Result<Arc<dyn Queue>> {
        self.open_with(aws, Dlq::Optional).await
    }

    pub fn visibility(&self) -> Duration {
        Duration::from_secs(self.visibility_timeout.max(1))
    }

    /// The queue a worker takes jobs from: an SQS queue must have a DLQ (through its redrive
    /// policy), since a worker dead-letters the jobs that fail for good.
    pub async fn open(&self, aws: &AwsArgs) -> anyhow::Result<Arc<dyn Queue>> {
        self.open_with(aws, Dlq::Required).await
    }

    async fn open_with(&self, aws: &AwsArgs, dlq: Dlq) -> anyhow::Result<Arc<dyn Queue>> {
        match &self.sqs_queue {
            Some(name) => {
                let client = aws_sdk_sqs::Client::new(&aws.config().await);
                let queue = if self.create_queues {
                    let setup = SqsQueueSetup {
                        name: name.clone(),
                        visibility_timeout: self.visibility(),
                        max_receive_count: self.max_receive_count,
                    };
                    SqsQueue::ensure(client, &setup).await?
                } else if dlq == Dlq::Required {
                    SqsQueue::open(client, name).await?
                } else {
                    SqsQueue::inspect(client, name).await?
                };
                Ok(Arc::new(queue))
            }
            None => {
                if let Some(dir) = self.queue_path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let opts = EmbeddedOptions {
                    visibility_timeout: self.visibility(),
                    max_receive_count: self.max_receive_count,
                    ..Default::default()
                };
                Ok(Arc::new(EmbeddedQueue::open(&self.queue_path, opts).await?))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dlq {
    Required,
    Optional,
}

/// `scheme:...` (`s3:/bucket`, `s3//bucket`, `https://...`): a mistyped URL, which would
/// otherwise become a local folder named `s3:`.
fn looks_like_a_url(value: &str) -> bool {
    if value.contains("://") || value.starts_with("s3/") {
        return true;
    }
    match value.split_once(':') {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        }
        None => false,
    }
}

impl StoreArgs {
    pub async fn open(&self, aws: &AwsArgs) -> anyhow::Result<Arc<dyn ObjectStore>> {
        match ember_model_loader::s3::parse_s3_url(&self.results) {
            Some((bucket, prefix)) => {
                let store = S3Store::from_config(&aws.config().await, bucket, &prefix);
                store.check().await?;
                Ok(Arc::new(store))
            }
            None if looks_like_a_url(&self.results) => {
                anyhow::bail!(
                    "--results `{}` looks like a URL but is not s3://bucket/prefix: fix the URL, or give a local \
                     directory (./{} if a folder of that name is really meant)",
                    self.results,
                    self.results
                )
            }
            None => {
                std::fs::create_dir_all(&self.results)?;
                Ok(Arc::new(LocalStore::new(&self.results)))
            }
        }
    }
}
