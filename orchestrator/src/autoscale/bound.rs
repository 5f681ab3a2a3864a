//! A clairvoyant lower bound on worker-seconds: no policy, even one that knows every arrival
//! in advance, runs a trace on the simulator's workers ([`WorkerModel`]) for fewer
//! worker-seconds while keeping the p95 queue wait at or under a given `W`.
//!
//! # The argument
//!
//! Let `N(t)` be the workers that exist at time `t` (starting, ready or draining); the bill is
//! `∫ N dt`. What every schedule must obey on this worker model:
//!
//! 1. A worker serves nothing during its first `c` seconds (the cold start).
//! 2. A ready worker generates at most `R_max` tokens/s, the highest aggregate rate at any
//!    number of jobs up to its concurrency `K`.
//! 3. A job in service progresses at between `r_min` and `r_max` tokens/s (the per-job rates
//!    `R(k) / k` at the least and most sharing), so job `j` with `x_j` tokens is in service for
//!    at least `d_j = x_j / r_max` and at most `e_j = x_j / r_min` seconds.
//! 4. p95 wait `<= W` means at least `ceil(0.95 n)` jobs start within `W` of their arrival
//!    (the nearest-rank percentile the simulator reports): at most `m = n - ceil(0.95 n)` jobs
//!    are late. An on-time job `j` arriving at `a_j` is in service for `d_j` seconds somewhere
//!    in `[a_j, a_j + W + d_j]` (its *window*), and all its service lies in
//!    `[a_j, a_j + W + e_j]`.
//!
//! Pick jobs whose windows do not overlap, in order (greedily by arrival). Between two picked
//! jobs `i` and `k` lies the gap `G = a_k - (a_i + W + d_i)`, which is inside the stretch from
//! the end of `i`'s first `d_i` seconds of service to `k`'s start. In that gap either a worker
//! exists throughout (`G` worker-seconds), or at some moment none does, and then the worker
//! that starts `k` was started after that moment and spent its cold start (`c`) before `k`'s
//! start: at least `min(G, c)` worker-seconds either way. So each picked job gives a *segment*
//! `[a_i, a_k)` costing at least `d_i + min(G, c)` worker-seconds: one worker serving, then
//! one worker waiting or starting. These pieces are disjoint in time (or, for cold starts, are
//! worker-seconds of a starting worker, which serves nothing).
//!
//! Elsewhere the tokens bound holds: the tokens served outside the chosen segments need at
//! least `tokens / R_max` seconds of ready workers there (2). The tokens served inside the
//! chosen segments are at most those of the jobs whose service can reach into them (4), plus
//! the `m` largest jobs (late ones can be served anywhere).
//!
//! The bound adds the two: for the segments where "one worker must be there" says more than
//! the tokens do (sparse arrivals, where batching is impossible) it counts the segment cost;
//! for the rest it counts the tokens at the best rate. Late jobs can break their own segment,
//! so the `m` largest segment costs among the chosen are taken off. The first worker's cold
//! start comes before any service, in none of these pieces, and is added.
//!
//! What it leaves out (so the bound is lower than what is reachable, never higher): a
//! clairvoyant policy starts workers exactly `c` before they are needed, never holds a worker
//! longer than the pieces above, and runs every busy worker at its best rate.

use serde::Serialize;

use super::sim::WorkerModel;
use super::trace::Trace;

/// The bound for one trace, worker model and p95 wait.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bound {
    /// The p95 wait the bound allows, seconds.
    pub wait_p95_s: f64,
    /// No policy uses fewer worker-seconds at that p95.
    pub worker_seconds: f64,
    /// The part from segments where at least one worker must exist.
    pub presence_s: f64,
    /// The part from tokens at the best rate.
    pub tokens_s: f64,
}

/// Per-job service rates, tokens/s: (slowest, fastest) over 1..=concurrency jobs in flight,
/// and the best aggregate rate of a worker.
fn rates(model: &WorkerModel) -> (f64, f64, f64) {
    let (mut r_min, mut r_max, mut agg_max) = (f64::INFINITY, 0.0f64, 0.0f64);
    for k in 1..=model.concurrency.max(1) {
        let agg = model.aggregate_tok_s(k);
        let per_job = agg / f64::from(k);
        r_min = r_min.min(per_job);
        r_max = r_max.max(per_job);
        agg_max = agg_max.max(agg);
    }
    (r_min, r_max, agg_max)
}

/// The lower bound at p95 wait `wait_p95` (see the module docs).
pub fn lower_bound(trace: &Trace, model: &WorkerModel, wait_p95: f64) -> Bound {
    let w = wait_p95.max(0.0);
    let c = model.cold_start_s;
    let jobs = &trace.jobs;
    let n = jobs.len();
    let empty = Bound { wait_p95_s: w, worker_seconds: 0.0, presence_s: 0.0, tokens_s: 0.0 };
    let (r_min, r_max, agg_max) = rates(model);
    if n == 0 || !(r_min > 0.0 && agg_max > 0.0) {
        return empty;
    }
    let late = n - (0.95 * n as f64).ceil() as usize;
    let d = |j: usize| f64::from(jobs[j].tokens) / r_max;
    let e = |j: usize| f64::from(jobs[j].tokens) / r_min;
    let total_tokens: f64 = jobs.iter().map(|j| f64::from(j.tokens)).sum();

    // Picked jobs: windows [a, a + W + d) that do not overlap, greedily by arrival.
    let mut picked: Vec<usize> = Vec::new();
    let mut free_from = f64::NEG_INFINITY;
    for (j, job) in jobs.iter().enumerate() {
        if job.at >= free_from {
            picked.push(j);
            free_from = job.at + w + d(j);
        }
    }
    // Segment k = [a_k, a_{k+1}) and what one-worker-present says about it.
    let segments: Vec<(f64, f64, f64)> = picked
        .iter()
        .enumerate()
        .map(|(k, &j)| {
            let start = jobs[j].at;
            let end = picked.get(k + 1).map_or(f64::INFINITY, |&next| jobs[next].at);
            let gap = end - (start + w + d(j));
            let cost = d(j) + if gap.is_finite() { gap.clamp(0.0, c) } else { 0.0 };
            (start, end, cost)
        })
        .collect();
    // Tokens that could be served in each segment: jobs whose service span reaches into it.
    let mut reach = vec![0.0; segments.len()];
    let segment_of = |t: f64| segments.partition_point(|s| s.0 <= t).saturating_sub(1);
    let spans: Vec<(usize, usize)> =
        (0..n).map(|j| (segment_of(jobs[j].at), segment_of(jobs[j].at + w + e(j)))).collect();
    for (j, &(first, last)) in spans.iter().enumerate() {
        for r in &mut reach[first..=last] {
            *r += f64::from(jobs[j].tokens);
        }
    }
    let chosen: Vec<bool> = segments.iter().zip(&reach).map(|(s, r)| s.2 > r / agg_max).collect();
    if !chosen.iter().any(|ch| *ch) {
        let tokens = total_tokens / agg_max + c;
        return Bound { wait_p95_s: w, worker_seconds: tokens, presence_s: 0.0, tokens_s: tokens };
    }
    let mut costs: Vec<f64> = segments.iter().zip(&chosen).filter(|(_, ch)| **ch).map(|(s, _)| s.2).collect();
    costs.sort_by(|a, b| b.total_cmp(a));
    let presence: f64 = costs.iter().skip(late).sum();
    let in_chosen: f64 = spans
        .iter()
        .enumerate()
        .filter(|(_, &(first, last))| chosen[first..=last].iter().any(|ch| *ch))
        .map(|(j, _)| f64::from(jobs[j].tokens))
        .sum();
    let mut sizes: Vec<f64> = jobs.iter().map(|j| f64::from(j.tokens)).collect();
    sizes.sort_by(|a, b| b.total_cmp(a));
    let late_tokens: f64 = sizes.iter().take(late).sum();
    // The first worker's cold start comes before any service and is in no piece above.
    let tokens = (total_tokens - in_chosen - late_tokens).max(0.0) / agg_max + c;
    Bound { wait_p95_s: w, worker_seconds: presence + tokens, presence_s: presence, tokens_s: tokens }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::trace::TraceJob;

    fn trace(at: &[f64]) -> Trace {
        let jobs: Vec<TraceJob> = at.iter().map(|&at| TraceJob { at, tokens: 128 }).collect();
        Trace { name: "t".into(), duration: at.last().copied().unwrap_or(0.0), jobs }
    }

    fn model(cold_start_s: f64) -> WorkerModel {
        WorkerModel { cold_start_s, ..WorkerModel::default() }
    }

    #[test]
    fn sparse_jobs_cost_a_cold_start_or_the_gap_each() {
        // Jobs 1000 s apart: each needs its service alone (128 / 57.8 = 2.2 s) and a cold
        // start (or the gap, if shorter) before it.
        let b = lower_bound(&trace(&[0.0, 1000.0, 2000.0]), &model(30.0), 0.0);
        let d = 128.0 / 57.8;
        assert!((b.worker_seconds - (3.0 * d + 3.0 * 30.0)).abs() < 1e-6, "{b:?}");
    }

    #[test]
    fn a_burst_costs_its_tokens_at_the_best_rate_plus_one_cold_start() {
        let b = lower_bound(&trace(&[0.0; 200]), &model(1.0), 10.0);
        // One segment (every window overlaps the first), outweighed by its tokens.
        let want = 200.0 * 128.0 / 198.3 + 1.0;
        assert!((b.worker_seconds - want).abs() < 1e-6, "{b:?}");
    }
}
