//! The simulator: replays a [`Trace`] against workers with a cold start and a batched
//! service rate, under a policy, and reports queue waits, drain time and cost.
//!
//! The worker model is a fluid one, stepped every `dt` seconds: a worker runs up to
//! `concurrency` jobs, which share its aggregate decode rate (tokens/s at n jobs in flight,
//! interpolated from the batching figures). Defaults come from BENCHMARKS.md (2026-11-28,
//! SmolLM2-135M f32 on 2 CPU cores): 0.9 s from process start to the first token with the
//! model fetched from S3; 57.8 / 121.0 / 198.3 / 284.5 tokens/s at 1 / 4 / 8 / 16 jobs in
//! flight, so a 128-token job takes about 5.2 s when 8 share a worker (1.55 jobs/s per
//! worker). Prompt prefill and queue round trips are not modelled (under 0.1 s each there).
//!
//! A draining worker takes no new job, finishes the ones it holds, and exits; after
//! `grace_s` it hands back what is left (the job goes back to the front of the queue and
//! counts as released), as `ember serve` does on SIGTERM.

use std::collections::VecDeque;

use super::config::{ConfigError, PolicyConfig};
use super::policy::{Backlog, Observation, Policy, WorkerState, WorkerView};
use super::trace::Trace;

/// How a simulated worker behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerModel {
    /// Seconds from start to taking the first job.
    pub cold_start_s: f64,
    /// Jobs one worker runs at once (`ember serve --concurrency`).
    pub concurrency: u32,
    /// Aggregate decode tokens/s of one worker at n jobs in flight, by n ascending.
    pub throughput: Vec<(u32, f64)>,
    /// Seconds a draining worker's jobs get before they are handed back.
    pub grace_s: f64,
}

impl Default for WorkerModel {
    fn default() -> Self {
        Self {
            cold_start_s: 0.9,
            concurrency: 8,
            throughput: vec![(1, 57.8), (4, 121.0), (8, 198.3), (16, 284.5)],
            grace_s: 25.0,
        }
    }
}

impl WorkerModel {
    /// Aggregate tokens/s at `n` jobs in flight: linear between the measured points, flat
    /// past the last, proportional below the first.
    pub fn aggregate_tok_s(&self, n: u32) -> f64 {
        let Some(&(n0, r0)) = self.throughput.first() else { return 0.0 };
        if n == 0 {
            return 0.0;
        }
        if n <= n0 {
            return r0 * f64::from(n) / f64::from(n0);
        }
        for w in self.throughput.windows(2) {
            let ((a, ra), (b, rb)) = (w[0], w[1]);
            if n <= b {
                return ra + (rb - ra) * f64::from(n - a) / f64::from(b - a);
            }
        }
        self.throughput.last().map_or(0.0, |&(_, r)| r)
    }
}

/// How the simulation runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Step, seconds.
    pub dt: f64,
    /// Longest run after the trace ends, waiting for the jobs to finish and the workers to go.
    pub tail_s: f64,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self { dt: 0.05, tail_s: 3600.0 }
    }
}

/// What one policy did on one trace.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    /// The trace.
    pub trace: String,
    /// The policy.
    pub policy: String,
    /// Jobs in the trace.
    pub jobs: usize,
    /// Jobs finished.
    pub done: usize,
    /// Seconds from the last arrival to the last job finished (NaN when some never did).
    pub drain_s: f64,
    /// Queue wait percentiles, seconds (arrival to start of work).
    pub wait_p50_s: f64,
    /// 95th percentile.
    pub wait_p95_s: f64,
    /// 99th percentile.
    pub wait_p99_s: f64,
    /// Sum over workers of the time they existed, cold start and draining included: the bill.
    pub worker_seconds: f64,
    /// Workers started.
    pub cold_starts: u32,
    /// Most workers at once.
    pub peak_workers: u32,
    /// Jobs handed back by a draining worker after its grace period (work lost).
    pub released: u32,
}

struct SimWorker {
    id: String,
    state: WorkerState,
    started_at: f64,
    drain_at: f64,
    /// (job index, tokens left)
    jobs: Vec<(usize, f64)>,
    idle_since: Option<f64>,
}

/// Nearest-rank percentile of sorted values (NaN when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Replays `trace` under `policy` and reports.
pub fn simulate(trace: &Trace, policy: &mut dyn Policy, model: &WorkerModel, opts: &SimOptions) -> Report {
    let n = trace.jobs.len();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut waits = vec![f64::NAN; n];
    let mut done_at = vec![f64::NAN; n];
    let mut workers: Vec<SimWorker> = Vec::new();
    let (mut next_job, mut done, mut next_id) = (0usize, 0usize, 0u64);
    let (mut worker_seconds, mut cold_starts, mut peak, mut released) = (0.0, 0u32, 0u32, 0u32);
    let mut next_tick = 0.0;
    let mut step = 0u64;
    let end = trace.duration + opts.tail_s;
    loop {
        let t = step as f64 * opts.dt;
        while next_job < n && trace.jobs[next_job].at <= t {
            queue.push_back(next_job);
            next_job += 1;
        }
        if t + 1e-9 >= next_tick {
            next_tick += policy.interval();
            let views: Vec<WorkerView> = workers
                .iter()
                .map(|w| WorkerView {
                    id: w.id.clone(),
                    state: w.state,
                    busy: Some(w.jobs.len() as u32),
                    idle_since: w.idle_since,
                    started_at: w.started_at,
                })
                .collect();
            let in_flight = workers.iter().map(|w| w.jobs.len() as u64).sum();
            let backlog = Backlog { visible: queue.len() as u64, in_flight, delayed: 0 };
            let d = policy.decide(&Observation { now: t, backlog, workers: &views });
            for w in workers.iter_mut().filter(|w| d.drain.contains(&w.id) && w.state != WorkerState::Draining) {
                w.state = WorkerState::Draining;
                w.drain_at = t;
            }
            for _ in 0..d.start {
                next_id += 1;
                cold_starts += 1;
                workers.push(SimWorker {
                    id: format!("w{next_id}"),
                    state: WorkerState::Starting,
                    started_at: t,
                    drain_at: f64::INFINITY,
                    jobs: Vec::new(),
                    idle_since: None,
                });
            }
        }
        for w in workers.iter_mut().filter(|w| w.state == WorkerState::Starting) {
            if t - w.started_at + 1e-9 >= model.cold_start_s {
                w.state = WorkerState::Ready;
                w.idle_since = Some(t);
            }
        }
        // Receive: the least loaded ready worker takes the oldest job, as long polls spread
        // messages over the workers asking.
        while let Some(&job) = queue.front() {
            let Some(w) = workers
                .iter_mut()
                .filter(|w| w.state == WorkerState::Ready && (w.jobs.len() as u32) < model.concurrency)
                .min_by_key(|w| w.jobs.len())
            else {
                break;
            };
            queue.pop_front();
            waits[job] = t - trace.jobs[job].at;
            w.jobs.push((job, f64::from(trace.jobs[job].tokens)));
            w.idle_since = None;
        }
        // Work.
        for w in workers.iter_mut() {
            let k = w.jobs.len() as u32;
            if k == 0 {
                continue;
            }
            let per_job = model.aggregate_tok_s(k) / f64::from(k) * opts.dt;
            w.jobs.retain_mut(|(job, left)| {
                *left -= per_job;
                if *left <= 1e-9 {
                    done_at[*job] = t + opts.dt;
                    done += 1;
                    false
                } else {
                    true
                }
            });
            if w.jobs.is_empty() {
                w.idle_since = Some(t + opts.dt);
            }
        }
        // Draining workers leave when empty, or hand back their jobs after the grace period.
        workers.retain_mut(|w| {
            if w.state != WorkerState::Draining {
                return true;
            }
            if !w.jobs.is_empty() && t + opts.dt - w.drain_at >= model.grace_s {
                for &(job, _) in w.jobs.iter().rev() {
                    queue.push_front(job);
                    released += 1;
                }
                w.jobs.clear();
            }
            !w.jobs.is_empty()
        });
        worker_seconds += workers.len() as f64 * opts.dt;
        peak = peak.max(workers.len() as u32);
        step += 1;
        let t = step as f64 * opts.dt;
        let finished = next_job == n && done == n && workers.is_empty() && t >= trace.duration;
        if finished || t > end {
            break;
        }
    }
    let mut sorted: Vec<f64> = waits.iter().copied().filter(|w| w.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let last_arrival = trace.jobs.last().map_or(0.0, |j| j.at);
    let last_done = done_at.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Report {
        trace: trace.name.clone(),
        policy: policy.name().to_string(),
        jobs: n,
        done,
        drain_s: if done == n { (last_done - last_arrival).max(0.0) } else { f64::NAN },
        wait_p50_s: percentile(&sorted, 50.0),
        wait_p95_s: percentile(&sorted, 95.0),
        wait_p99_s: percentile(&sorted, 99.0),
        worker_seconds,
        cold_starts,
        peak_workers: peak,
        released,
    }
}

/// Every policy on every trace (trace by trace, policies in the given order).
pub fn compare(
    traces: &[Trace],
    policies: &[PolicyConfig],
    model: &WorkerModel,
    opts: &SimOptions,
) -> Result<Vec<Report>, ConfigError> {
    let mut reports = Vec::new();
    for trace in traces {
        for cfg in policies {
            let mut policy = cfg.build()?;
            reports.push(simulate(trace, policy.as_mut(), model, opts));
        }
    }
    Ok(reports)
}

/// The reports as one Markdown table.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| trace | policy | jobs | done | drain s | wait p50 s | wait p95 s | wait p99 s | worker-s | cold starts | peak workers | released |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in reports {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {} | {} |\n",
            r.trace,
            r.policy,
            r.jobs,
            r.done,
            r.drain_s,
            r.wait_p50_s,
            r.wait_p95_s,
            r.wait_p99_s,
            r.worker_seconds,
            r.cold_starts,
            r.peak_workers,
            r.released
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::trace::TraceJob;
    use crate::autoscale::{PolicyConfig, PolicyKind};

    fn burst(n: usize) -> Trace {
        Trace { name: "burst".into(), jobs: vec![TraceJob { at: 0.0, tokens: 128 }; n], duration: 0.0 }
    }

    fn run(kind: PolicyKind, trace: &Trace) -> Report {
        let cfg = PolicyConfig { target_backlog: 16.0, ..PolicyConfig::defaults(kind) };
        let mut p = cfg.build().unwrap_or_else(|e| panic!("{e}"));
        simulate(trace, p.as_mut(), &WorkerModel::default(), &SimOptions::default())
    }

    #[test]
    fn throughput_interpolates_the_benchmarks() {
        let m = WorkerModel::default();
        assert!((m.aggregate_tok_s(8) - 198.3).abs() < 1e-9);
        assert!((m.aggregate_tok_s(6) - (121.0 + 198.3) / 2.0).abs() < 1e-9);
        assert!((m.aggregate_tok_s(32) - 284.5).abs() < 1e-9);
    }

    #[test]
    fn one_job_on_one_worker_takes_cold_start_plus_service() {
        let r = run(PolicyKind::Ember, &burst(1));
        assert_eq!((r.done, r.cold_starts, r.released), (1, 1, 0));
        // 0.9 s cold start, then 128 tokens at 57.8 tok/s = 2.2 s.
        assert!((r.drain_s - 3.1).abs() < 0.15, "{r:?}");
        assert!((r.wait_p50_s - 0.9).abs() < 0.1, "{r:?}");
        // Ember keeps the worker for the 30 s cooldown (+ decision interval), then drains it.
        assert!(r.worker_seconds > 30.0 && r.worker_seconds < 45.0, "{r:?}");
    }

    #[test]
    fn every_policy_finishes_a_burst_and_scales_to_zero() {
        let trace = burst(200);
        for kind in PolicyKind::ALL {
            let r = run(kind, &trace);
            assert_eq!(r.done, 200, "{r:?}");
            assert!(r.peak_workers >= 1 && r.peak_workers <= 10, "{r:?}");
            assert!(r.drain_s.is_finite(), "{r:?}");
        }
        // Ember starts all it needs at once: 200 / 16 -> 10 (max).
        assert_eq!(run(PolicyKind::Ember, &trace).peak_workers, 10);
    }

    #[test]
    fn the_same_inputs_give_the_same_report() {
        let trace = burst(50);
        assert_eq!(run(PolicyKind::Keda, &trace), run(PolicyKind::Keda, &trace));
    }

    /// The shipped traces (examples/autoscale), every policy with the same limits and target:
    /// Ember's policy must cost less than the KEDA-style one at an equal or better p95 wait.
    /// `cargo test -p ember-orchestrator shipped_traces -- --nocapture` prints the table.
    #[test]
    fn shipped_traces_ember_beats_keda_on_cost_at_equal_or_better_p95() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/autoscale");
        let traces = ["burst", "diurnal", "spike", "idle"]
            .iter()
            .map(|n| Trace::load(&dir.join(format!("{n}.json"))))
            .collect::<Result<Vec<_>, _>>()?;
        let policies: Vec<PolicyConfig> = PolicyKind::ALL
            .iter()
            .map(|&k| PolicyConfig { target_backlog: 8.0, ..PolicyConfig::defaults(k) })
            .collect();
        let reports = compare(&traces, &policies, &WorkerModel::default(), &SimOptions::default())?;
        println!("{}", table(&reports));
        for pair in reports.chunks(PolicyKind::ALL.len()) {
            let (ember, keda) = (&pair[0], &pair[1]);
            assert_eq!((ember.done, keda.done), (ember.jobs, keda.jobs));
            assert!(ember.worker_seconds < keda.worker_seconds, "{ember:?}\n{keda:?}");
            assert!(ember.wait_p95_s <= keda.wait_p95_s + 0.05, "{ember:?}\n{keda:?}");
            assert_eq!(ember.released, 0);
        }
        Ok(())
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 95.0), percentile(&v, 99.0)), (50.0, 95.0, 99.0));
        assert!(percentile(&[], 50.0).is_nan());
    }
}
