//! `ember lambda`: the AWS Lambda entry point for SQS events. The model loads once per
//! container, before the first event; every invocation then runs its records through the
//! shared [`JobHandler`] with [`run_batch`] and answers with the records to deliver again.
//!
//! Needs `AWS_LAMBDA_RUNTIME_API` (set by Lambda, or by a local emulator such as
//! `cargo lambda watch`). The event source mapping must have `ReportBatchItemFailures`, and
//! the queue a redrive policy whose `maxReceiveCount` is `--max-receive-count`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{service_fn, LambdaEvent};

use super::backends::StoreArgs;
use super::common::{AwsArgs, ModelArgs};
use super::serve::load_engine;
use crate::lambda::{run_batch, usable_deadline, BatchOptions};
use crate::runner::{DeadLetters, JobHandler};

#[derive(Debug, clap::Args)]
pub struct LambdaArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Milliseconds before the invocation's deadline after which no further record is
    /// started; the rest are reported for another delivery. Leave room for one job.
    #[arg(long, env = "EMBER_DEADLINE_MARGIN_MS", default_value_t = 15_000)]
    pub deadline_margin_ms: u64,
    /// Milliseconds before the deadline at which a running generation is cancelled and its
    /// record reported, so that the function answers instead of timing out.
    #[arg(long, env = "EMBER_CANCEL_MARGIN_MS", default_value_t = 2_000)]
    pub cancel_margin_ms: u64,
    /// The source queue's `maxReceiveCount`: on the last delivery a job that keeps failing
    /// gets an error result before the redrive policy moves it to the DLQ.
    #[arg(long, env = "EMBER_MAX_RECEIVE_COUNT", default_value_t = 3)]
    pub max_receive_count: u32,
}

impl LambdaArgs {
    fn batch_options(&self) -> anyhow::Result<BatchOptions> {
        if self.cancel_margin_ms >= self.deadline_margin_ms {
            anyhow::bail!(
                "--cancel-margin-ms ({}) must be less than --deadline-margin-ms ({}): a job started just \
                 inside the deadline margin would be cancelled before it could run",
                self.cancel_margin_ms,
                self.deadline_margin_ms
            );
        }
        Ok(BatchOptions {
            start_margin: Duration::from_millis(self.deadline_margin_ms),
            cancel_margin: Duration::from_millis(self.cancel_margin_ms),
        })
    }
}

pub async fn run(args: LambdaArgs) -> anyhow::Result<()> {
    let opts = args.batch_options()?;
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_none() {
        anyhow::bail!(
            "AWS_LAMBDA_RUNTIME_API is not set: `ember lambda` runs inside AWS Lambda or under a local Runtime \
             API (`cargo lambda watch`); to poll SQS from a machine, use `ember serve`"
        );
    }
    // Open the store first: a typo in the bucket should not cost a model load.
    let store = args.store.open(&args.aws).await?;
    let engine = Arc::new(load_engine(&args.model, &args.aws).await?);
    let model = engine.loaded.name.clone();
    let handler = Arc::new(JobHandler::new(engine, store, DeadLetters::Redrive, args.max_receive_count));
    tracing::info!(model = %model, results = %args.store.results, "ready for SQS events");
    lambda_runtime::run(service_fn(move |event| invocation(handler.clone(), event, opts)))
        .await
        .map_err(|e| anyhow::anyhow!("the Lambda runtime stopped: {e}"))
}

/// One invocation: the thin layer between `lambda_runtime` and [`run_batch`].
async fn invocation(
    handler: Arc<JobHandler>,
    event: LambdaEvent<SqsEvent>,
    opts: BatchOptions,
) -> Result<SqsBatchResponse, lambda_runtime::Error> {
    let LambdaEvent { payload, context } = event;
    let deadline = usable_deadline(context.deadline, SystemTime::now());
    if deadline.is_none() {
        tracing::warn!(
            deadline_ms = context.deadline,
            "the invocation's deadline has already passed as it starts (a local emulator's placeholder?): \
             running without a deadline"
        );
    }
    let report = run_batch(handler.as_ref(), payload, deadline, &opts).await;
    report.into_response().map_err(|e| {
        tracing::error!(label = e.label(), error = %e, "failing the invocation");
        e.into()
    })
}
