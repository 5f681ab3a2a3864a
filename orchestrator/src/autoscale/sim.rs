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
//!
//! Simulated workers report what they measure ([`WorkerReport`]: their cold start, jobs,
//! tokens, busy seconds and the tokens/s they sustained while full) as `ember serve
//! --report-file` does, so policies that use reports see measured figures here too.
//!
//! [`compare`] runs every row (a policy at its defaults, or tuned) on every trace and cold
//! start, and ends each group with the clairvoyant [`lower_bound`] at Ember's p95 wait.

use std::collections::VecDeque;

use super::bound::{lower_bound, Bound};
use super::config::{ConfigError, PolicyConfig, PolicyKind};
use super::policy::{Backlog, Observation, Policy, WorkerReport, WorkerState, WorkerView};
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
    /// Where the bill went: worker-seconds spent starting (cold starts).
    pub starting_s: f64,
    /// Worker-seconds ready with no job.
    pub idle_s: f64,
    /// Worker-seconds ready with at least one job.
    pub busy_s: f64,
    /// Worker-seconds draining.
    pub draining_s: f64,
    /// Jobs in flight over slots, averaged over the busy worker-seconds (1.0: every busy
    /// worker full, at its best tokens/s).
    pub busy_fill: f64,
    /// Workers started (a mean when the row averages several phases).
    pub cold_starts: f64,
    /// The workers' cold start, seconds.
    pub cold_start_s: f64,
    /// Worker-seconds over the clairvoyant bound at this row's own p95 wait ([`compare`]
    /// fills it in; 0 from [`simulate`] alone).
    pub over_bound: f64,
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
    report: WorkerReport,
    full_s: f64,
    full_tokens: f64,
}

/// Seconds a worker must have been full before it reports its full-load rate.
const FULL_REPORT_S: f64 = 5.0;

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
    let (mut starting_s, mut idle_s, mut busy_s, mut draining_s, mut slot_s) = (0.0, 0.0, 0.0, 0.0, 0.0);
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
                    report: (w.state != WorkerState::Starting).then_some(w.report),
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
                    report: WorkerReport {
                        cold_start_s: model.cold_start_s,
                        concurrency: model.concurrency,
                        ..WorkerReport::default()
                    },
                    full_s: 0.0,
                    full_tokens: 0.0,
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
            w.report.busy_s += opts.dt;
            if k >= model.concurrency {
                w.full_s += opts.dt;
                w.full_tokens += per_job * f64::from(k);
                if w.full_s >= FULL_REPORT_S {
                    w.report.full_tok_s = Some(w.full_tokens / w.full_s);
                }
            }
            let report = &mut w.report;
            w.jobs.retain_mut(|(job, left)| {
                *left -= per_job;
                if *left <= 1e-9 {
                    done_at[*job] = t + opts.dt;
                    done += 1;
                    report.jobs += 1;
                    report.tokens += u64::from(trace.jobs[*job].tokens);
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
        for w in &workers {
            match (w.state, w.jobs.len()) {
                (WorkerState::Starting, _) => starting_s += opts.dt,
                (WorkerState::Draining, _) => draining_s += opts.dt,
                (WorkerState::Ready, 0) => idle_s += opts.dt,
                (WorkerState::Ready, k) => {
                    busy_s += opts.dt;
                    slot_s += k as f64 / f64::from(model.concurrency.max(1)) * opts.dt;
                }
            }
        }
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
        starting_s,
        idle_s,
        busy_s,
        draining_s,
        busy_fill: if busy_s > 0.0 { slot_s / busy_s } else { 0.0 },
        cold_starts: f64::from(cold_starts),
        cold_start_s: model.cold_start_s,
        over_bound: 0.0,
        peak_workers: peak,
        released,
    }
}

/// One row of a comparison: a policy at one setting, run at each of `phases` (seconds
/// between the start of the trace and the policy's first periodic action) and averaged.
#[derive(Debug, Clone)]
pub struct Row {
    /// Its name in the table.
    pub label: String,
    /// The setting.
    pub config: PolicyConfig,
    /// Phases to average over (`[0.0]` for policies that act on every tick).
    pub phases: Vec<f64>,
}

impl Row {
    /// `kind` at its documented defaults.
    pub fn defaults(kind: PolicyKind) -> Self {
        Self::new(kind, "defaults", PolicyConfig::defaults(kind))
    }

    /// `kind` as a careful operator would tune it for `model` ([`PolicyConfig::tuned`]).
    pub fn tuned(kind: PolicyKind, model: &WorkerModel) -> Self {
        Self::new(kind, "tuned", PolicyConfig::tuned(kind, model.cold_start_s, model.concurrency))
    }

    /// A row for `config`. KEDA's poll and HPA sync are periodic: where they fall against the
    /// arrivals matters (a poll landing just as a burst arrives is luck), so its row is the
    /// mean over six phases spread across one polling interval.
    pub fn new(kind: PolicyKind, variant: &str, config: PolicyConfig) -> Self {
        let phases = if kind == PolicyKind::Keda {
            (0..6).map(|k| f64::from(k) * config.poll_interval / 6.0).collect()
        } else {
            vec![0.0]
        };
        let label = if kind == PolicyKind::Ember { kind.to_string() } else { format!("{kind} ({variant})") };
        Self { label, config, phases }
    }
}

/// The rows of the standard comparison for `kinds`: Ember once (it has no tuned variant: its
/// per-worker figures are measured), every peer at its defaults and tuned for `model`.
pub fn standard_rows(kinds: &[PolicyKind], model: &WorkerModel) -> Vec<Row> {
    let mut rows = Vec::new();
    for &kind in kinds {
        rows.push(Row::defaults(kind));
        if kind != PolicyKind::Ember {
            rows.push(Row::tuned(kind, model));
        }
    }
    rows
}

/// What every row did on one trace at one cold start, and the bound.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Group {
    /// The trace.
    pub trace: String,
    /// The workers' cold start, seconds.
    pub cold_start_s: f64,
    /// One report per row, in row order.
    pub reports: Vec<Report>,
    /// The clairvoyant bound at Ember's p95 wait (the best p95 of the rows without an Ember row).
    pub bound: Bound,
}

/// The mean of the phase runs of one row.
fn average(label: &str, runs: &[Report]) -> Option<Report> {
    let first = runs.first()?;
    let n = runs.len() as f64;
    let mean = |f: fn(&Report) -> f64| runs.iter().map(f).sum::<f64>() / n;
    Some(Report {
        policy: label.to_string(),
        done: runs.iter().map(|r| r.done).min().unwrap_or(0),
        drain_s: mean(|r| r.drain_s),
        wait_p50_s: mean(|r| r.wait_p50_s),
        wait_p95_s: mean(|r| r.wait_p95_s),
        wait_p99_s: mean(|r| r.wait_p99_s),
        worker_seconds: mean(|r| r.worker_seconds),
        starting_s: mean(|r| r.starting_s),
        idle_s: mean(|r| r.idle_s),
        busy_s: mean(|r| r.busy_s),
        draining_s: mean(|r| r.draining_s),
        busy_fill: mean(|r| r.busy_fill),
        cold_starts: mean(|r| r.cold_starts),
        peak_workers: runs.iter().map(|r| r.peak_workers).max().unwrap_or(0),
        released: runs.iter().map(|r| r.released).max().unwrap_or(0),
        ..first.clone()
    })
}

/// Every row on every trace at every cold start in `cold_starts` (rows built by `rows` for
/// each worker model, so tuned settings can follow the cold start).
pub fn compare(
    traces: &[Trace],
    cold_starts: &[f64],
    base: &WorkerModel,
    rows: impl Fn(&WorkerModel) -> Vec<Row>,
    opts: &SimOptions,
) -> Result<Vec<Group>, ConfigError> {
    let mut groups = Vec::new();
    for trace in traces {
        for &cold_start_s in cold_starts {
            let model = WorkerModel { cold_start_s, ..base.clone() };
            let mut reports = Vec::new();
            for row in rows(&model) {
                let mut runs = Vec::new();
                for &phase in &row.phases {
                    let mut policy = PolicyConfig { phase, ..row.config.clone() }.build()?;
                    runs.push(simulate(trace, policy.as_mut(), &model, opts));
                }
                if let Some(mut r) = average(&row.label, &runs) {
                    r.over_bound = r.worker_seconds / lower_bound(trace, &model, r.wait_p95_s).worker_seconds;
                    reports.push(r);
                }
            }
            let at = reports
                .iter()
                .find(|r| r.policy == PolicyKind::Ember.as_str())
                .map(|r| r.wait_p95_s)
                .unwrap_or_else(|| reports.iter().map(|r| r.wait_p95_s).fold(f64::INFINITY, f64::min));
            let bound = lower_bound(trace, &model, if at.is_finite() { at } else { 0.0 });
            groups.push(Group { trace: trace.name.clone(), cold_start_s, reports, bound });
        }
    }
    Ok(groups)
}

/// The groups as one Markdown table; each group ends with its bound.
pub fn table(groups: &[Group]) -> String {
    let mut out = String::from(
        "| trace | cold start s | policy | jobs | done | wait p50 s | wait p95 s | wait p99 s | worker-s | x bound | cold starts | peak workers | released |\n\
         | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for g in groups {
        for r in &g.reports {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.1} | {} | {} |\n",
                r.trace,
                g.cold_start_s,
                r.policy,
                r.jobs,
                r.done,
                r.wait_p50_s,
                r.wait_p95_s,
                r.wait_p99_s,
                r.worker_seconds,
                r.over_bound,
                r.cold_starts,
                r.peak_workers,
                r.released
            ));
        }
        out.push_str(&format!(
            "| {} | {} | bound (clairvoyant) | | | | <= {:.2} | | {:.0} | 1.00 | | | |\n",
            g.trace, g.cold_start_s, g.bound.wait_p95_s, g.bound.worker_seconds
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
        let mut p = PolicyConfig::defaults(kind).build().unwrap_or_else(|e| panic!("{e}"));
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
        assert_eq!((r.done, r.cold_starts, r.released), (1, 1.0, 0));
        // 0.9 s cold start, then 128 tokens at 57.8 tok/s = 2.2 s.
        assert!((r.drain_s - 3.1).abs() < 0.15, "{r:?}");
        assert!((r.wait_p50_s - 0.9).abs() < 0.1, "{r:?}");
        // A 0.9 s cold start costs less than waiting idle for a next job: the worker goes at
        // the first decision after the job (decisions every second).
        assert!(r.worker_seconds < 3.1 + 1.1, "{r:?}");
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
    }

    #[test]
    fn the_same_inputs_give_the_same_report() {
        let trace = burst(50);
        assert_eq!(run(PolicyKind::Keda, &trace), run(PolicyKind::Keda, &trace));
        assert_eq!(run(PolicyKind::Ember, &trace), run(PolicyKind::Ember, &trace));
    }

    /// The shipped traces at 1, 30 and 90 s cold starts: every row finishes every job, and
    /// the bound is a lower bound (no row at least as fast as Ember at p95 uses fewer
    /// worker-seconds, and no row beats the bound at its own p95). `EMBER_EXTRA_TRACE` adds
    /// a trace (the converted Azure trace). `cargo test -p ember-orchestrator shipped_traces -- --nocapture`
    /// prints the table.
    #[test]
    fn shipped_traces_every_row_finishes_and_none_beats_the_bound() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/autoscale");
        let mut traces = ["burst", "diurnal", "spike", "idle"]
            .iter()
            .map(|n| Trace::load(&dir.join(format!("{n}.json"))))
            .collect::<Result<Vec<_>, _>>()?;
        if let Ok(path) = std::env::var("EMBER_EXTRA_TRACE") {
            traces.push(Trace::load(std::path::Path::new(&path))?);
        }
        let kinds = PolicyKind::ALL;
        let groups = compare(
            &traces,
            &[1.0, 30.0, 90.0],
            &WorkerModel::default(),
            |m| standard_rows(&kinds, m),
            &SimOptions::default(),
        )?;
        println!("{}", table(&groups));
        for g in &groups {
            let ember = &g.reports[0];
            for r in &g.reports {
                assert_eq!(r.done, r.jobs, "{r:?}");
                if r.wait_p95_s <= ember.wait_p95_s {
                    assert!(r.worker_seconds >= g.bound.worker_seconds, "{r:?} below {:?}", g.bound);
                }
                // And every row against the bound at its own p95.
                assert!(r.over_bound >= 1.0, "{r:?} below the bound at its own p95");
            }
            assert_eq!(ember.released, 0, "{ember:?}");
        }
        Ok(())
    }

    #[test]
    fn the_standard_rows_are_ember_and_each_peer_at_defaults_and_tuned() {
        let model = WorkerModel { cold_start_s: 90.0, ..WorkerModel::default() };
        let rows = standard_rows(&PolicyKind::ALL, &model);
        let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "ember",
                "keda (defaults)",
                "keda (tuned)",
                "runpod-requests (defaults)",
                "runpod-requests (tuned)",
                "runpod-delay (defaults)",
                "runpod-delay (tuned)"
            ]
        );
        // KEDA at its documented defaults, averaged over six phases of its 30 s poll.
        let keda = &rows[1];
        assert_eq!((keda.config.target_backlog, keda.config.poll_interval), (5.0, 30.0));
        assert_eq!(keda.phases, [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]);
        // Tuned for a 90 s cold start: one worker per 8 jobs, idle workers kept 90 s.
        let tuned = &rows[4].config;
        assert_eq!((tuned.target_backlog, tuned.idle_cooldown), (8.0, 90.0));
        assert_eq!(rows[0].phases, [0.0]);
    }

    #[test]
    fn a_keda_row_is_the_mean_of_its_phases() -> Result<(), ConfigError> {
        let trace = burst(100);
        let row = Row::defaults(PolicyKind::Keda);
        let groups = compare(
            std::slice::from_ref(&trace),
            &[1.0],
            &WorkerModel::default(),
            |_| vec![row.clone()],
            &SimOptions::default(),
        )?;
        let mut sum = 0.0;
        for &phase in &row.phases {
            let mut p = PolicyConfig { phase, ..row.config.clone() }.build()?;
            let model = WorkerModel { cold_start_s: 1.0, ..WorkerModel::default() };
            sum += simulate(&trace, p.as_mut(), &model, &SimOptions::default()).worker_seconds;
        }
        let mean = sum / row.phases.len() as f64;
        assert!((groups[0].reports[0].worker_seconds - mean).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 95.0), percentile(&v, 99.0)), (50.0, 95.0, 99.0));
        assert!(percentile(&[], 50.0).is_nan());
    }
}
