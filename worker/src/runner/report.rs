//! The worker's report on itself (`ember serve --report-file`): its cold start and, so far,
//! the jobs it finished, the tokens it generated, the seconds it was busy and the tokens/s it
//! sustained while full. The autoscaler reads it (`ember autoscale --driver local` hands each
//! worker a file in its log directory) so that Ember's policy works from measured per-worker
//! figures instead of configured ones.
//!
//! Sampled once a second: a second counts as busy when a job was running at both ends, and as
//! full when all `concurrency` slots were; the full-load rate is the tokens of the jobs that
//! finished during full seconds over those seconds, reported once the worker has been full for
//! [`FULL_REPORT_S`] seconds. The file is replaced atomically (write, then rename), so a reader
//! never sees half of it.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_orchestrator::autoscale::WorkerReport;

use super::{ServeStats, Shutdown};
use crate::telemetry::metrics;

/// Seconds a worker must have been full before it reports its full-load rate.
pub const FULL_REPORT_S: f64 = 5.0;

/// Accumulates the report from samples.
#[derive(Debug, Clone)]
pub struct Reporter {
    report: WorkerReport,
    full_s: f64,
    full_tokens: f64,
    last: Option<(u64, u64)>,
}

impl Reporter {
    /// A report for a worker that took `cold_start_s` to be ready and runs `concurrency` jobs.
    pub fn new(cold_start_s: f64, concurrency: u32) -> Self {
        let report = WorkerReport { cold_start_s, concurrency, ..WorkerReport::default() };
        Self { report, full_s: 0.0, full_tokens: 0.0, last: None }
    }

    /// One sample, `dt` seconds after the previous: jobs running, jobs finished and tokens
    /// generated so far.
    pub fn sample(&mut self, dt: f64, running: u64, done: u64, tokens: u64) -> WorkerReport {
        let was = self.last.replace((running, tokens)).map(|(r, t)| (r, tokens.saturating_sub(t)));
        if let Some((was_running, new_tokens)) = was {
            if was_running > 0 && running > 0 {
                self.report.busy_s += dt;
            }
            let k = u64::from(self.report.concurrency);
            if k > 0 && was_running >= k && running >= k {
                self.full_s += dt;
                self.full_tokens += new_tokens as f64;
                if self.full_s >= FULL_REPORT_S && self.full_tokens > 0.0 {
                    self.report.full_tok_s = Some(self.full_tokens / self.full_s);
                }
            }
        }
        self.report.jobs = done;
        self.report.tokens = tokens;
        self.report
    }
}

fn write(path: &Path, report: &WorkerReport) -> std::io::Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    std::fs::write(&tmp, serde_json::to_vec(report).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// Writes the report to `path` every second until `stop` trips, and once more then (the
/// caller trips it after the last job has settled, so the final report counts every job).
pub async fn report_loop(path: PathBuf, stats: Arc<ServeStats>, mut reporter: Reporter, stop: Shutdown) {
    let mut last = Instant::now();
    let mut stopping = false;
    loop {
        let now = Instant::now();
        let report = reporter.sample(
            now.duration_since(last).as_secs_f64(),
            stats.running.load(Ordering::Relaxed),
            stats.done.load(Ordering::Relaxed),
            metrics::tokens_generated(),
        );
        last = now;
        if let Err(e) = write(&path, &report) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the worker report");
        }
        if stopping {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait() => stopping = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_full_seconds_come_from_consecutive_samples() {
        let mut r = Reporter::new(0.8, 4);
        r.sample(1.0, 0, 0, 0);
        let a = r.sample(1.0, 4, 0, 0);
        assert_eq!((a.busy_s, a.full_tok_s), (0.0, None), "one sample running is not a busy second");
        for k in 1..=6u64 {
            r.sample(1.0, 4, k, k * 100);
        }
        let b = r.sample(1.0, 1, 7, 700);
        assert_eq!((b.jobs, b.tokens, b.busy_s, b.cold_start_s, b.concurrency), (7, 700, 7.0, 0.8, 4));
        // Full for six seconds generating 100 tokens/s.
        assert_eq!(b.full_tok_s, Some(100.0));
    }
}
