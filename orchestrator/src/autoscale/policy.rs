//! The types every policy shares: what it sees, what it answers, and how a desired count
//! becomes workers to start or drain.

use std::collections::VecDeque;

use serde::Serialize;

/// Message counts of the jobs queue (SQS `ApproximateNumberOfMessages*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Backlog {
    /// Ready to be received.
    pub visible: u64,
    /// Received by a worker and not yet deleted: running (or about to be retried).
    pub in_flight: u64,
    /// Sent with a delay (retries with backoff, pipeline hops) that has not passed.
    pub delayed: u64,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Started, still loading the model (a cold start): no jobs yet.
    Starting,
    /// Taking jobs.
    Ready,
    /// Asked to stop: takes no new jobs, finishes or hands back the ones it holds, then exits.
    Draining,
}

/// One worker as the driver sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerView {
    /// The driver's id for it (a pool index, a task ARN).
    pub id: String,
    /// Its state.
    pub state: WorkerState,
    /// Jobs it is running, when the driver knows (the simulator does; a process pool does not).
    pub busy: Option<u32>,
    /// Since when (caller's clock, seconds) it has had no job, when the driver knows.
    pub idle_since: Option<f64>,
    /// When it was started (caller's clock, seconds).
    pub started_at: f64,
    /// What the worker measured about itself and reported, once it has (see [`WorkerReport`]).
    pub report: Option<WorkerReport>,
}

/// What a worker measured about itself: its cold start and, cumulatively, the jobs it
/// finished, the tokens it generated and the seconds it had at least one job. Workers publish
/// it (`ember serve --report-file`; the simulator's workers report the same figures), so the
/// policy's per-worker numbers are measured, not configured by hand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct WorkerReport {
    /// Seconds from process start to taking the first job.
    pub cold_start_s: f64,
    /// Jobs finished so far.
    pub jobs: u64,
    /// Tokens generated so far.
    pub tokens: u64,
    /// Seconds with at least one job in flight so far.
    pub busy_s: f64,
    /// Jobs it runs at once.
    pub concurrency: u32,
    /// Aggregate tokens/s measured while it ran `concurrency` jobs at once (None until it
    /// has been full for a while).
    #[serde(default)]
    pub full_tok_s: Option<f64>,
}

impl WorkerView {
    /// Starting or ready: counted as capacity.
    pub fn is_active(&self) -> bool {
        self.state != WorkerState::Draining
    }
}

/// What a policy sees at one tick.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Seconds on the caller's clock (a fake clock in tests and the simulator); only
    /// differences matter.
    pub now: f64,
    /// The jobs queue.
    pub backlog: Backlog,
    /// Every worker not yet exited, draining ones included.
    pub workers: &'a [WorkerView],
}

impl Observation<'_> {
    /// Workers that count as capacity (starting or ready).
    pub fn active(&self) -> u32 {
        u32::try_from(self.workers.iter().filter(|w| w.is_active()).count()).unwrap_or(u32::MAX)
    }
}

/// A policy's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Workers that should be starting or ready after this decision.
    pub desired: u32,
    /// New workers to start.
    pub start: u32,
    /// Ids of workers to drain (idle ones first).
    pub drain: Vec<String>,
    /// Why, in a few words (for the decision log).
    pub reason: String,
}

/// A scaling policy. `decide` is called every [`Policy::interval`] seconds of the caller's
/// clock; the policy keeps whatever history it needs (stabilization windows, cooldowns).
pub trait Policy: Send {
    /// Short name for tables and logs.
    fn name(&self) -> &str;
    /// Seconds between decisions.
    fn interval(&self) -> f64;
    /// The decision for this observation.
    fn decide(&mut self, obs: &Observation<'_>) -> Decision;
}

/// Turns a desired count into workers to start or drain. Workers to drain are chosen so
/// that no running job is disturbed when avoidable and capacity stays where it is ready:
/// workers still starting first (they hold no job, and an idle ready worker can take the next
/// job at once where a starting one would make it wait out the rest of a cold start; a
/// Kubernetes ReplicaSet also deletes not-ready pods before ready ones), then idle workers
/// (the longest idle first), then workers whose load is unknown (the youngest first), then
/// the least busy.
pub fn plan(desired: u32, obs: &Observation<'_>, reason: impl Into<String>) -> Decision {
    let active = obs.active();
    let mut decision = Decision { desired, start: 0, drain: Vec::new(), reason: reason.into() };
    if desired > active {
        decision.start = desired - active;
    } else if desired < active {
        let mut candidates: Vec<&WorkerView> = obs.workers.iter().filter(|w| w.is_active()).collect();
        candidates.sort_by(|a, b| drain_rank(a).partial_cmp(&drain_rank(b)).unwrap_or(std::cmp::Ordering::Equal));
        decision.drain = candidates.iter().take((active - desired) as usize).map(|w| w.id.clone()).collect();
    }
    decision
}

/// Lower drains first.
fn drain_rank(w: &WorkerView) -> (u8, f64) {
    match (w.state, w.busy) {
        (WorkerState::Starting, _) => (0, -w.started_at),
        (WorkerState::Ready, Some(0)) => (1, w.idle_since.unwrap_or(0.0)),
        (_, None) => (2, -w.started_at),
        (_, Some(n)) => (3, f64::from(n)),
    }
}

/// Recent recommendations, for stabilization windows: scaling up follows the lowest
/// recommendation of the up window, scaling down the highest of the down window (the
/// Kubernetes HPA rule), so one noisy sample moves nothing.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recommendations {
    samples: VecDeque<(f64, u32)>,
}

impl Recommendations {
    /// Records `value` at `now` and forgets what is older than `keep` seconds.
    pub(crate) fn push(&mut self, now: f64, value: u32, keep: f64) {
        self.samples.push_back((now, value));
        while self.samples.front().is_some_and(|(t, _)| now - t > keep) {
            self.samples.pop_front();
        }
    }

    fn within(&self, now: f64, window: f64) -> impl Iterator<Item = u32> + '_ {
        self.samples.iter().filter(move |(t, _)| now - t <= window).map(|(_, v)| *v)
    }

    /// The count after stabilization: up to the lowest recommendation of the up window,
    /// down to the highest of the down window, otherwise unchanged.
    pub(crate) fn stabilize(&self, now: f64, current: u32, up_window: f64, down_window: f64) -> u32 {
        let lo = self.within(now, up_window).min().unwrap_or(current);
        let hi = self.within(now, down_window).max().unwrap_or(current);
        if current < lo {
            lo
        } else if current > hi {
            hi
        } else {
            current
        }
    }
}

/// Workers for `demand` jobs at `per_worker` jobs each (rounded up; 0 for no demand).
pub(crate) fn workers_for(demand: u64, per_worker: f64) -> u32 {
    if demand == 0 {
        return 0;
    }
    let n = (demand as f64 / per_worker).ceil();
    if n >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        n as u32
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn worker(id: &str, state: WorkerState, busy: Option<u32>, idle_since: Option<f64>) -> WorkerView {
        WorkerView { id: id.into(), state, busy, idle_since, started_at: 0.0, report: None }
    }

    #[test]
    fn plan_starts_the_difference() {
        let ws = [worker("a", WorkerState::Ready, Some(3), None), worker("b", WorkerState::Draining, Some(1), None)];
        let obs = Observation { now: 0.0, backlog: Backlog::default(), workers: &ws };
        let d = plan(3, &obs, "x");
        assert_eq!((d.start, d.drain.len()), (2, 0), "a draining worker is not capacity");
    }

    #[test]
    fn plan_drains_starting_workers_first_then_idle_and_busy_last() {
        let ws = [
            worker("busy", WorkerState::Ready, Some(5), None),
            worker("idle-late", WorkerState::Ready, Some(0), Some(9.0)),
            worker("light", WorkerState::Ready, Some(1), None),
            worker("idle-early", WorkerState::Ready, Some(0), Some(2.0)),
            worker("starting", WorkerState::Starting, None, None),
        ];
        let obs = Observation { now: 10.0, backlog: Backlog::default(), workers: &ws };
        assert_eq!(plan(1, &obs, "x").drain, ["starting", "idle-early", "idle-late", "light"]);
        assert_eq!(plan(4, &obs, "x").drain, ["starting"]);
        assert_eq!(plan(3, &obs, "x").drain, ["starting", "idle-early"]);
    }

    #[test]
    fn stabilization_follows_the_window_extremes() {
        let mut r = Recommendations::default();
        r.push(0.0, 10, 100.0);
        r.push(5.0, 2, 100.0);
        // Down window 30 s: 10 was recommended 5 s ago, so stay at 10.
        assert_eq!(r.stabilize(5.0, 10, 0.0, 30.0), 10);
        r.push(40.0, 2, 100.0);
        assert_eq!(r.stabilize(40.0, 10, 0.0, 30.0), 2);
        // Up window 0: follow at once.
        r.push(41.0, 7, 100.0);
        assert_eq!(r.stabilize(41.0, 2, 0.0, 30.0), 7);
    }

    #[test]
    fn workers_for_rounds_up() {
        assert_eq!(workers_for(0, 5.0), 0);
        assert_eq!(workers_for(1, 5.0), 1);
        assert_eq!(workers_for(10, 5.0), 2);
        assert_eq!(workers_for(11, 5.0), 3);
    }
}
