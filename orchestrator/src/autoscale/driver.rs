//! Drivers turn decisions into workers. One trait for all of them: a local process pool,
//! an ECS service, a Lambda event source mapping (in `ember-worker`, which has the AWS
//! clients and the binary), and the [`DryRunDriver`] here, which only prints.

use std::io::Write;

use super::policy::{Decision, WorkerState, WorkerView};

/// A driver operation that failed. `label()` is stable for logs and metrics;
/// `is_retryable()` says whether the next tick may succeed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A worker could not be started.
    #[error("starting a worker: {0}")]
    Start(String),
    /// A worker could not be told to drain.
    #[error("draining worker {id}: {message}")]
    Drain {
        /// The worker.
        id: String,
        /// What went wrong.
        message: String,
    },
    /// The cloud API refused or failed.
    #[error("{op}: {message}")]
    Api {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        message: String,
        /// Whether trying again later may work (throttling, 5xx, network).
        retryable: bool,
    },
    /// The driver is not set up right (a missing option, a resource that does not exist).
    #[error("{0}")]
    Config(String),
    /// Writing the decision log failed.
    #[error("writing the decision log: {0}")]
    Io(#[from] std::io::Error),
}

impl DriverError {
    /// Stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Start(_) => "driver_start",
            Self::Drain { .. } => "driver_drain",
            Self::Api { .. } => "driver_api",
            Self::Config(_) => "driver_config",
            Self::Io(_) => "driver_io",
        }
    }

    /// Whether the next tick may succeed where this one failed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api { retryable, .. } => *retryable,
            Self::Start(_) | Self::Drain { .. } | Self::Io(_) => true,
            Self::Config(_) => false,
        }
    }
}

/// Runs workers as decided. `now` is the caller's clock, in seconds.
#[async_trait::async_trait]
pub trait Driver: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// The workers now (exited ones are gone; draining ones stay until they exit).
    async fn workers(&mut self, now: f64) -> Result<Vec<WorkerView>, DriverError>;

    /// Starts and drains workers as decided.
    async fn apply(&mut self, decision: &Decision, now: f64) -> Result<(), DriverError>;

    /// The autoscaler is stopping: drain what this driver owns and wait for it (a local pool
    /// stops its processes; cloud drivers leave the service as it is).
    async fn shutdown(&mut self) -> Result<(), DriverError> {
        Ok(())
    }
}

/// Prints each decision as one JSON line and keeps an imaginary pool that follows them
/// (started workers are ready at once, drained ones leave at once).
pub struct DryRunDriver<W: Write + Send> {
    out: W,
    workers: Vec<WorkerView>,
    next: u64,
}

impl<W: Write + Send> DryRunDriver<W> {
    /// A dry run writing to `out`.
    pub fn new(out: W) -> Self {
        Self { out, workers: Vec::new(), next: 0 }
    }

    /// The writer (the tests read what was printed).
    pub fn into_inner(self) -> W {
        self.out
    }
}

#[async_trait::async_trait]
impl<W: Write + Send> Driver for DryRunDriver<W> {
    fn name(&self) -> &'static str {
        "dry-run"
    }

    async fn workers(&mut self, _now: f64) -> Result<Vec<WorkerView>, DriverError> {
        Ok(self.workers.clone())
    }

    async fn apply(&mut self, decision: &Decision, now: f64) -> Result<(), DriverError> {
        self.workers.retain(|w| !decision.drain.contains(&w.id));
        for _ in 0..decision.start {
            self.next += 1;
            let id = format!("dry-{}", self.next);
            self.workers.push(WorkerView {
                id,
                state: WorkerState::Ready,
                busy: None,
                idle_since: None,
                started_at: now,
                report: None,
            });
        }
        let line = serde_json::json!({"driver": "dry-run", "t": now, "decision": decision});
        writeln!(self.out, "{line}")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        // The dry run never awaits anything: one poll finishes it.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    #[test]
    fn dry_run_prints_and_follows_decisions() -> Result<(), DriverError> {
        let mut d = DryRunDriver::new(Vec::new());
        let up = Decision { desired: 2, start: 2, drain: vec![], reason: "r".into() };
        block_on(d.apply(&up, 1.0))?;
        assert_eq!(block_on(d.workers(1.0))?.len(), 2);
        let down = Decision { desired: 1, start: 0, drain: vec!["dry-1".into()], reason: "r".into() };
        block_on(d.apply(&down, 2.0))?;
        let ws = block_on(d.workers(2.0))?;
        assert_eq!(ws.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["dry-2"]);
        let out = String::from_utf8_lossy(&d.into_inner()).into_owned();
        assert_eq!(out.lines().count(), 2);
        let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or_default())
            .map_err(|e| DriverError::Config(e.to_string()))?;
        assert_eq!(first["decision"]["start"], 2);
        Ok(())
    }
}
