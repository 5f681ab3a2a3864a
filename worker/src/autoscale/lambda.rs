//! A Lambda SQS event source mapping's `ScalingConfig.MaximumConcurrency` as the worker
//! count: Lambda then runs at most that many concurrent invocations of the Ember function
//! on the queue.
//!
//! Lambda's bounds: MaximumConcurrency is 2 to 1000, so a desired count of 1 becomes 2, and
//! 0 disables the mapping (in-flight invocations finish; nothing new is polled). Lambda
//! already scales with the queue inside that cap; this driver moves the cap.

use ember_orchestrator::autoscale::{Decision, Driver, DriverError, WorkerState, WorkerView};

use super::api_error;

/// Lambda's limits on `MaximumConcurrency`.
const MIN_CONCURRENCY: i32 = 2;
const MAX_CONCURRENCY: i32 = 1000;

/// See the module docs.
pub struct LambdaMapping {
    client: aws_sdk_lambda::Client,
    uuid: String,
}

impl LambdaMapping {
    /// The driver for one event source mapping (its UUID).
    pub fn new(client: aws_sdk_lambda::Client, uuid: String) -> Self {
        Self { client, uuid }
    }

    fn resource(&self) -> String {
        format!("Lambda event source mapping `{}`", self.uuid)
    }

    /// (enabled, maximum concurrency)
    async fn current(&self) -> Result<(bool, i32), DriverError> {
        let m = self
            .client
            .get_event_source_mapping()
            .uuid(&self.uuid)
            .send()
            .await
            .map_err(|e| api_error("lambda:GetEventSourceMapping", self.resource(), e))?;
        let enabled = matches!(m.state(), Some("Enabled" | "Enabling" | "Creating" | "Updating"));
        let max = m.scaling_config().and_then(|c| c.maximum_concurrency()).unwrap_or(MAX_CONCURRENCY);
        Ok((enabled, max))
    }
}

/// The mapping settings for a desired count: `None` disables it.
pub fn concurrency_for(desired: u32) -> Option<i32> {
    (desired > 0).then(|| i32::try_from(desired).unwrap_or(MAX_CONCURRENCY).clamp(MIN_CONCURRENCY, MAX_CONCURRENCY))
}

#[async_trait::async_trait]
impl Driver for LambdaMapping {
    fn name(&self) -> &'static str {
        "lambda"
    }

    async fn workers(&mut self, _now: f64) -> Result<Vec<WorkerView>, DriverError> {
        let (enabled, max) = self.current().await?;
        let n = if enabled { max } else { 0 };
        Ok((0..n)
            .map(|i| WorkerView {
                id: format!("slot-{i}"),
                state: WorkerState::Ready,
                busy: None,
                idle_since: None,
                started_at: 0.0,
                report: None,
            })
            .collect())
    }

    async fn apply(&mut self, decision: &Decision, _now: f64) -> Result<(), DriverError> {
        let (enabled, max) = self.current().await?;
        let want = concurrency_for(decision.desired);
        if want == (if enabled { Some(max) } else { None }) {
            return Ok(());
        }
        let mut req = self.client.update_event_source_mapping().uuid(&self.uuid).enabled(want.is_some());
        if let Some(c) = want {
            req = req.scaling_config(aws_sdk_lambda::types::ScalingConfig::builder().maximum_concurrency(c).build());
        }
        req.send().await.map_err(|e| api_error("lambda:UpdateEventSourceMapping", self.resource(), e))?;
        tracing::info!(mapping = %self.uuid, ?want, "Lambda event source mapping concurrency");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_respects_lambda_bounds() {
        assert_eq!(concurrency_for(0), None);
        assert_eq!(concurrency_for(1), Some(2));
        assert_eq!(concurrency_for(50), Some(50));
        assert_eq!(concurrency_for(5000), Some(1000));
    }
}
