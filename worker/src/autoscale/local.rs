//! A local pool of `ember serve` processes: the same binary (`std::env::current_exe`),
//! started with the autoscaler's queue settings, drained with SIGTERM.
//!
//! `ember serve` on SIGTERM stops receiving, gives running jobs `--grace-seconds` to finish,
//! and hands back (visibility 0) what is left, so a drained worker never loses a job; a
//! worker that has not exited `stop_timeout` after SIGTERM when the autoscaler itself stops
//! gets SIGKILL (its messages come back after their visibility timeout).
//!
//! The pool cannot see how busy each process is, so the policy drains the youngest first.
//!
//! With a log directory, each worker also writes what it measured about itself (its cold start,
//! jobs, tokens and busy seconds: `ember serve --report-file`) to `worker-N.report.json` there,
//! and the pool hands those reports to the policy, which uses them instead of its configured
//! per-worker figures.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use ember_orchestrator::autoscale::{Decision, Driver, DriverError, WorkerReport, WorkerState, WorkerView};
use tokio::process::{Child, Command};

/// How pool workers are started.
#[derive(Debug, Clone)]
pub struct LocalPoolOptions {
    /// The `ember` binary.
    pub exe: PathBuf,
    /// Arguments after `serve`.
    pub serve_args: Vec<String>,
    /// Environment set on each worker (on top of the autoscaler's own).
    pub env: Vec<(String, String)>,
    /// Each worker's stdout (its final stats line) and stderr (its log) go to
    /// `worker-N.out` / `worker-N.log` here; without it they are the autoscaler's own.
    pub log_dir: Option<PathBuf>,
    /// How long to wait for drained workers when the autoscaler stops.
    pub stop_timeout: Duration,
}

struct PoolWorker {
    id: String,
    child: Child,
    started_at: f64,
    draining: bool,
    report_path: Option<PathBuf>,
}

/// A worker's last report, when it has written one (a missing or half-written file is no
/// report yet: the worker rewrites it after every job).
fn read_report(path: &Option<PathBuf>) -> Option<WorkerReport> {
    let text = std::fs::read(path.as_ref()?).ok()?;
    serde_json::from_slice(&text).ok()
}

/// See the module docs.
pub struct LocalPool {
    opts: LocalPoolOptions,
    workers: Vec<PoolWorker>,
    next: u64,
}

impl LocalPool {
    /// An empty pool.
    pub fn new(opts: LocalPoolOptions) -> Self {
        Self { opts, workers: Vec::new(), next: 0 }
    }

    fn spawn(&mut self, now: f64) -> Result<(), DriverError> {
        self.next += 1;
        let id = format!("worker-{}", self.next);
        let mut cmd = Command::new(&self.opts.exe);
        cmd.arg("serve").args(&self.opts.serve_args).stdin(Stdio::null());
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let report_path = self.opts.log_dir.as_ref().map(|dir| dir.join(format!("{id}.report.json")));
        if let Some(path) = &report_path {
            cmd.env("EMBER_WORKER_REPORT", path);
        }
        if let Some(dir) = &self.opts.log_dir {
            let open = |ext: &str| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("{id}.{ext}")))
                    .map_err(|e| DriverError::Start(format!("opening the log of {id} in {}: {e}", dir.display())))
            };
            cmd.stdout(open("out")?).stderr(open("log")?);
        }
        let child =
            cmd.spawn().map_err(|e| DriverError::Start(format!("running {} serve: {e}", self.opts.exe.display())))?;
        tracing::info!(worker = %id, pid = child.id(), "started a worker");
        self.workers.push(PoolWorker { id, child, started_at: now, draining: false, report_path });
        Ok(())
    }

    /// Reaps exited workers.
    fn reap(&mut self) {
        self.workers.retain_mut(|w| match w.child.try_wait() {
            Ok(Some(status)) => {
                if !status.success() {
                    tracing::warn!(worker = %w.id, %status, "worker exited with an error");
                } else {
                    tracing::info!(worker = %w.id, "worker exited");
                }
                false
            }
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(worker = %w.id, error = %e, "could not check the worker");
                true
            }
        });
    }
}

/// Sends SIGTERM: `ember serve` finishes or hands back its jobs, then exits.
fn terminate(w: &PoolWorker) -> Result<(), DriverError> {
    let Some(pid) = w.child.id() else { return Ok(()) };
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| DriverError::Drain { id: w.id.clone(), message: format!("pid {pid} out of range") })?;
    // SAFETY: kill(2) with a pid this pool spawned and has not reaped (`id()` is `None` once
    // it is), so the pid cannot have been reused by another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        let message = std::io::Error::last_os_error().to_string();
        return Err(DriverError::Drain { id: w.id.clone(), message });
    }
    Ok(())
}

#[async_trait::async_trait]
impl Driver for LocalPool {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn workers(&mut self, _now: f64) -> Result<Vec<WorkerView>, DriverError> {
        self.reap();
        Ok(self
            .workers
            .iter()
            .map(|w| WorkerView {
                id: w.id.clone(),
                state: if w.draining { WorkerState::Draining } else { WorkerState::Ready },
                busy: None,
                idle_since: None,
                started_at: w.started_at,
                report: read_report(&w.report_path),
            })
            .collect())
    }

    async fn apply(&mut self, decision: &Decision, now: f64) -> Result<(), DriverError> {
        for w in self.workers.iter_mut().filter(|w| !w.draining && decision.drain.contains(&w.id)) {
            terminate(w)?;
            w.draining = true;
            tracing::info!(worker = %w.id, "draining a worker (SIGTERM)");
        }
        for _ in 0..decision.start {
            self.spawn(now)?;
        }
        Ok(())
    }

    async fn shutdown(&mut self) -> Result<(), DriverError> {
        for w in self.workers.iter_mut().filter(|w| !w.draining) {
            terminate(w)?;
            w.draining = true;
        }
        let deadline = tokio::time::Instant::now() + self.opts.stop_timeout;
        for w in &mut self.workers {
            match tokio::time::timeout_at(deadline, w.child.wait()).await {
                Ok(Ok(status)) => tracing::info!(worker = %w.id, %status, "worker stopped"),
                Ok(Err(e)) => tracing::warn!(worker = %w.id, error = %e, "waiting for the worker"),
                Err(_) => {
                    tracing::warn!(worker = %w.id, "worker still running after the stop timeout: SIGKILL");
                    let _ = w.child.kill().await;
                }
            }
        }
        self.workers.clear();
        Ok(())
    }
}
