//! The autoscaler's loop and its drivers: a local pool of `ember serve` processes
//! ([`local::LocalPool`]), an ECS service's desired count ([`ecs::EcsService`]) and a
//! Lambda event source mapping's maximum concurrency ([`lambda::LambdaMapping`]). The
//! policies, the dry-run driver and the simulator are in `ember_orchestrator::autoscale`.
//!
//! Every tick: read the queue's depth, ask the driver for its workers, let the policy
//! decide, apply the decision, and print it as one JSON line when it changes anything.

pub mod ecs;
pub mod lambda;
pub mod local;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use ember_orchestrator::autoscale::{Backlog, Decision, Driver, DriverError, Observation, Policy, WorkerState};

use crate::queue::Queue;
use crate::runner::Shutdown;

/// One tick's record, as printed.
fn record(now: f64, backlog: &Backlog, active: u32, draining: usize, d: &Decision) -> serde_json::Value {
    serde_json::json!({
        "t": (now * 1000.0).round() / 1000.0,
        "visible": backlog.visible,
        "in_flight": backlog.in_flight,
        "delayed": backlog.delayed,
        "workers": active,
        "draining": draining,
        "desired": d.desired,
        "start": d.start,
        "drain": d.drain,
        // Ember's policy explains itself as a JSON object (the rule, the forecast, the costs):
        // nested as an object so that the line stays readable and queryable.
        "reason": serde_json::from_str::<serde_json::Value>(&d.reason)
            .ok()
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::Value::String(d.reason.clone())),
    })
}

/// Runs the loop until `shutdown` trips, then lets the driver stop what it owns. Decisions
/// that change something (and the first one) go to `out` as JSON lines.
///
/// A failed queue read or a retryable driver error skips the tick (logged); a driver error
/// that cannot succeed later (bad configuration) ends the loop.
pub async fn run_loop(
    queue: Arc<dyn Queue>,
    policy: &mut dyn Policy,
    driver: &mut dyn Driver,
    shutdown: &Shutdown,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let clock = Instant::now();
    let interval = Duration::from_secs_f64(policy.interval());
    let mut last: Option<(u32, usize, u32)> = None;
    let result = loop {
        let now = clock.elapsed().as_secs_f64();
        match tick(&*queue, policy, driver, now).await {
            Ok(Some((backlog, active, draining, decision))) => {
                let key = (active, draining, decision.desired);
                if last != Some(key) || decision.start > 0 || !decision.drain.is_empty() {
                    writeln!(out, "{}", record(now, &backlog, active, draining, &decision))?;
                    out.flush()?;
                }
                last = Some(key);
            }
            Ok(None) => {}
            Err(e) if e.is_retryable() => tracing::warn!(error = %e, label = e.label(), "autoscale tick failed"),
            Err(e) => break Err(anyhow::Error::new(e)),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait() => break Ok(()),
        }
    };
    tracing::info!(driver = driver.name(), "autoscaler stopping");
    driver.shutdown().await?;
    result
}

type Tick = (Backlog, u32, usize, Decision);

async fn tick(
    queue: &dyn Queue,
    policy: &mut dyn Policy,
    driver: &mut dyn Driver,
    now: f64,
) -> Result<Option<Tick>, DriverError> {
    let depth = match queue.depth().await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, label = e.label(), "reading the queue depth failed; skipping this tick");
            return Ok(None);
        }
    };
    let backlog = Backlog { visible: depth.visible, in_flight: depth.in_flight, delayed: depth.delayed };
    let workers = driver.workers(now).await?;
    let decision = policy.decide(&Observation { now, backlog, workers: &workers });
    let active = workers.iter().filter(|w| w.is_active()).count() as u32;
    let draining = workers.iter().filter(|w| w.state == WorkerState::Draining).count();
    driver.apply(&decision, now).await?;
    Ok(Some((backlog, active, draining, decision)))
}

/// An AWS SDK error as a driver error, saying what to check ([`ember_model_loader::aws::AwsError`]): throttling, 5xx and network failures are retryable
/// (the shared classification, `ember_model_loader::aws`).
pub(crate) fn api_error<E>(op: &'static str, resource: String, err: SdkError<E>) -> DriverError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    let e = ember_model_loader::aws::AwsError::new(op, resource, &err);
    let message = format!("on {}: {}; {}", e.resource, e.failure.describe(), e.hint());
    DriverError::Api { op, message, retryable: e.is_retryable() }
}
