//! What-if runs behind BENCHMARKS.md's autoscaling section (issue 17, round 6):
//!
//! - `rate`: Ember's forecast rule (the slots held when a worker started now is ready, plus
//!   `z` standard deviations) fed the trace's true arrival rate (its jobs in a window around
//!   that time) instead of a measured one, for a sweep of `z` and two windows: what knowing the
//!   rate would buy;
//! - `reserve`: Ember at its defaults with a floor of 0-4 workers (a warm reserve held through
//!   the trace), and the p95 wait it buys;
//! - `bound`: the clairvoyant bound's parts at the given p95 waits.
//!
//! ```text
//! cargo run -p ember-orchestrator --release --example autoscale_probe -- rate TRACE COLD_START_S [WAIT_S]
//! cargo run -p ember-orchestrator --release --example autoscale_probe -- reserve TRACE COLD_START_S
//! cargo run -p ember-orchestrator --release --example autoscale_probe -- bound TRACE COLD_START_S WAIT_S...
//! ```

use std::path::Path;

use ember_orchestrator::autoscale::bound::lower_bound;
use ember_orchestrator::autoscale::sim::{simulate, SimOptions, WorkerModel};
use ember_orchestrator::autoscale::trace::Trace;
use ember_orchestrator::autoscale::{plan, Decision, Observation, Policy, PolicyConfig, PolicyKind, WorkerState};

/// Slots per worker, as the simulator's default worker model.
const SLOTS: f64 = 8.0;

/// Ember's forecast rule, fed the true arrival rate (jobs of the trace in a window centred on
/// the time a worker started now would be ready).
struct RateKnowing {
    at: Vec<f64>,
    cold: f64,
    z: f64,
    window: f64,
    job_s: f64,
}

impl RateKnowing {
    fn rate(&self, t: f64) -> f64 {
        let lo = self.at.partition_point(|&a| a < t - self.window / 2.0);
        let hi = self.at.partition_point(|&a| a < t + self.window / 2.0);
        (hi - lo) as f64 / self.window
    }
}

impl Policy for RateKnowing {
    fn name(&self) -> &str {
        "rate-knowing"
    }

    fn interval(&self) -> f64 {
        1.0
    }

    fn decide(&mut self, obs: &Observation<'_>) -> Decision {
        let h = self.cold + 1.0;
        let lambda = self.rate(obs.now + h);
        let a = lambda * self.job_s;
        let p = 1.0 - (-h / self.job_s).exp();
        let x = obs.backlog.in_flight as f64;
        let mean = x * (1.0 - p) + a * p;
        let sd = (x * p * (1.0 - p) + a * p).sqrt();
        let mut n = if mean < 1e-3 { 0.0 } else { ((mean + self.z * sd) / SLOTS).ceil() };
        let queued = obs.backlog.visible as f64;
        if queued > 0.0 {
            n = n.max(((queued + x) / SLOTS).ceil());
        }
        // Keep one worker while the rate says a job comes within a cold start.
        if n < 1.0 && lambda * self.cold >= 1.0 {
            n = 1.0;
        }
        let active = obs.active();
        let busy =
            obs.workers.iter().filter(|w| w.state == WorkerState::Ready && w.busy.is_some_and(|b| b > 0)).count();
        let mut desired = (n as u32).min(10);
        if obs.backlog.visible > 0 {
            desired = desired.max(active);
        }
        desired = desired.max(busy as u32);
        plan(desired.min(10), obs, "rate")
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, path, cold, rest @ ..] = args.as_slice() else {
        return Err("usage: autoscale_probe rate|reserve|bound TRACE COLD_START_S [WAIT_S...]".into());
    };
    let trace = Trace::load(Path::new(path))?;
    let model = WorkerModel { cold_start_s: cold.parse()?, ..WorkerModel::default() };
    let opts = SimOptions::default();
    match mode.as_str() {
        "rate" => {
            let wait: f64 = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(0.05);
            let at: Vec<f64> = trace.jobs.iter().map(|j| j.at).collect();
            // A job's time at full load, from the trace's mean size.
            let mean_tokens = trace.jobs.iter().map(|j| f64::from(j.tokens)).sum::<f64>() / at.len().max(1) as f64;
            let job_s = mean_tokens * f64::from(model.concurrency) / model.aggregate_tok_s(model.concurrency);
            for window in [60.0, 300.0] {
                for z in [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0] {
                    let mut p = RateKnowing { at: at.clone(), cold: model.cold_start_s, z, window, job_s };
                    let r = simulate(&trace, &mut p, &model, &opts);
                    let b = lower_bound(&trace, &model, r.wait_p95_s.max(wait));
                    println!(
                        "window {window} z {z}: {:.0} worker-s, p95 {:.2} p99 {:.2}, fill {:.2}, idle {:.0}, starting {:.0}, cold starts {}, done {}/{} -> {:.2}x bound({:.2})",
                        r.worker_seconds, r.wait_p95_s, r.wait_p99_s, r.busy_fill, r.idle_s, r.starting_s, r.cold_starts, r.done, r.jobs,
                        r.worker_seconds / b.worker_seconds, b.wait_p95_s
                    );
                }
            }
        }
        "reserve" => {
            for min in 0..=4 {
                let cfg =
                    PolicyConfig { min_workers: min, max_workers: 10, ..PolicyConfig::defaults(PolicyKind::Ember) };
                let mut p = cfg.build()?;
                // A floor of workers never lets the pool empty: stop 30 s after the trace.
                let r = simulate(&trace, p.as_mut(), &model, &SimOptions { tail_s: 30.0, ..opts.clone() });
                let b = lower_bound(&trace, &model, r.wait_p95_s);
                println!(
                    "min workers {min}: {:.0} worker-s, p50 {:.2} p95 {:.2} p99 {:.2}, {:.2}x bound at that p95",
                    r.worker_seconds,
                    r.wait_p50_s,
                    r.wait_p95_s,
                    r.wait_p99_s,
                    r.worker_seconds / b.worker_seconds
                );
            }
        }
        "bound" => {
            for w in rest {
                let b = lower_bound(&trace, &model, w.parse()?);
                println!("{b:?}");
            }
        }
        _ => return Err("mode: rate, reserve or bound".into()),
    }
    Ok(())
}
