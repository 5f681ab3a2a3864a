//! An ECS service's desired count as the worker count.
//!
//! ECS picks which tasks to stop when the count goes down and sends them SIGTERM, then
//! SIGKILL after the container's `stopTimeout` (at most 120 s on EC2): `ember serve` then
//! finishes or hands back its jobs, so set `stopTimeout` above `--grace-seconds` (the
//! template in infra/ does). The drain list of a decision is therefore only advice here.

use ember_orchestrator::autoscale::{Decision, Driver, DriverError, WorkerState, WorkerView};

use super::api_error;

/// See the module docs.
pub struct EcsService {
    client: aws_sdk_ecs::Client,
    cluster: String,
    service: String,
}

impl EcsService {
    /// The driver for one service.
    pub fn new(client: aws_sdk_ecs::Client, cluster: String, service: String) -> Self {
        Self { client, cluster, service }
    }

    fn resource(&self) -> String {
        format!("ECS service `{}` in cluster `{}`", self.service, self.cluster)
    }

    async fn counts(&self) -> Result<(i32, i32, i32), DriverError> {
        let out = self
            .client
            .describe_services()
            .cluster(&self.cluster)
            .services(&self.service)
            .send()
            .await
            .map_err(|e| api_error("ecs:DescribeServices", self.resource(), e))?;
        let s = out.services().first().ok_or_else(|| {
            DriverError::Config(format!(
                "ECS service `{}` not found in cluster `{}`: check --ecs-cluster and --ecs-service",
                self.service, self.cluster
            ))
        })?;
        Ok((s.desired_count(), s.running_count(), s.pending_count()))
    }
}

#[async_trait::async_trait]
impl Driver for EcsService {
    fn name(&self) -> &'static str {
        "ecs"
    }

    async fn workers(&mut self, _now: f64) -> Result<Vec<WorkerView>, DriverError> {
        let (desired, running, pending) = self.counts().await?;
        // Tasks above the desired count are being stopped by ECS: draining.
        let draining = (running + pending - desired).max(0);
        let view =
            |id: String, state| WorkerView { id, state, busy: None, idle_since: None, started_at: 0.0, report: None };
        let mut out: Vec<WorkerView> =
            (0..pending).map(|i| view(format!("pending-{i}"), WorkerState::Starting)).collect();
        out.extend((0..running).map(|i| view(format!("task-{i}"), WorkerState::Ready)));
        for w in out.iter_mut().rev().take(draining as usize) {
            w.state = WorkerState::Draining;
        }
        Ok(out)
    }

    async fn apply(&mut self, decision: &Decision, _now: f64) -> Result<(), DriverError> {
        let (desired, _, _) = self.counts().await?;
        let want = i32::try_from(decision.desired).unwrap_or(i32::MAX);
        if want != desired {
            self.client
                .update_service()
                .cluster(&self.cluster)
                .service(&self.service)
                .desired_count(want)
                .send()
                .await
                .map_err(|e| api_error("ecs:UpdateService", self.resource(), e))?;
            tracing::info!(service = %self.service, from = desired, to = want, "ECS desired count");
        }
        Ok(())
    }
}
