//! The known formulas, as policies, so the simulator can compare Ember's policy with them.
//!
//! - [`KedaSqsPolicy`]: KEDA's `aws-sqs-queue` scaler (metric = visible + in-flight
//!   [+ delayed], target `queueLength` per replica, `activationQueueLength`, scale to zero
//!   after `cooldownPeriod` without activity, checked every `pollingInterval` = 30 s) feeding
//!   a Kubernetes HPA (every 15 s: `ceil(metric / target)`, 10% tolerance, scale-up at most
//!   +100% or +4 pods per period, scale-down after a 300 s stabilization window). As KEDA
//!   does it, activation takes the deployment from 0 to 1 replica only; the HPA (which does
//!   not run at 0 replicas) sizes it from its next sync. Both loops run on their own clocks,
//!   offset by `phase` from the caller's: the simulator averages over phases.
//! - [`RunpodRequestCountPolicy`]: RunPod's request-count mode: `ceil((queued + running) /
//!   scaler value)` workers; a worker stops after its idle timeout (default 5 s).
//! - [`RunpodQueueDelayPolicy`]: RunPod's queue-delay mode: the first request starts a worker;
//!   after that a worker is added whenever requests have waited longer than the threshold
//!   (default 4 s); idle workers stop after the idle timeout.

use super::config::PolicyConfig;
use super::policy::{plan, workers_for, Decision, Observation, Policy, Recommendations, WorkerState};

/// KEDA is asked every second and acts when its poll or its HPA sync is due, so that both
/// loops keep their own period and phase whatever the caller's tick.
const KEDA_TICK: f64 = 1.0;
/// The HPA's default tolerance: within 10% of the target, nothing changes.
const HPA_TOLERANCE: f64 = 0.1;

/// See the module docs. `interval` is the HPA sync period (15 s by default).
#[derive(Debug, Clone)]
pub struct KedaSqsPolicy {
    cfg: PolicyConfig,
    recs: Recommendations,
    last_active: Option<f64>,
    next_poll: f64,
    next_sync: f64,
    scaled_to_zero: bool,
}

impl KedaSqsPolicy {
    /// A policy from a validated configuration.
    pub fn new(cfg: PolicyConfig) -> Self {
        let (next_poll, next_sync) = (cfg.phase, cfg.phase);
        Self { cfg, recs: Recommendations::default(), last_active: None, next_poll, next_sync, scaled_to_zero: true }
    }
}

impl Policy for KedaSqsPolicy {
    fn name(&self) -> &str {
        "keda"
    }

    fn interval(&self) -> f64 {
        KEDA_TICK.min(self.cfg.interval)
    }

    fn decide(&mut self, obs: &Observation<'_>) -> Decision {
        let c = &self.cfg;
        let now = obs.now;
        let metric = c.demand(&obs.backlog);
        let active = obs.active();
        // KEDA's own loop: activation (0 -> 1) and scale to zero, on the polling interval.
        if now + 1e-9 >= self.next_poll {
            while self.next_poll <= now + 1e-9 {
                self.next_poll += c.poll_interval;
            }
            let is_active = metric > u64::try_from(c.activation).unwrap_or(0);
            if is_active {
                self.last_active = Some(now);
                if self.scaled_to_zero {
                    self.scaled_to_zero = false;
                    // The HPA sees the new replica from its next sync on.
                    while self.next_sync <= now + 1e-9 {
                        self.next_sync += c.interval;
                    }
                    let reason = format!("keda poll: metric {metric} active, 0 -> 1 replica");
                    return plan(c.min().max(1).min(c.max()), obs, reason);
                }
            } else if c.min() == 0 && self.last_active.is_none_or(|t| now - t >= c.idle_cooldown) {
                self.scaled_to_zero = true;
            }
        }
        if self.scaled_to_zero {
            let reason = format!("inactive for the {} s cooldownPeriod", c.idle_cooldown);
            return plan(c.min(), obs, reason);
        }
        if now + 1e-9 < self.next_sync {
            return plan(active.max(1), obs, "waiting for the next HPA sync");
        }
        while self.next_sync <= now + 1e-9 {
            self.next_sync += c.interval;
        }
        // The HPA, with minReplicas at least 1 while the scaler is active.
        let current = active.max(1);
        let ratio = metric as f64 / (c.target_backlog * f64::from(current));
        let mut rec =
            if (ratio - 1.0).abs() <= HPA_TOLERANCE { current } else { workers_for(metric, c.target_backlog) };
        rec = rec.clamp(c.min().max(1), c.max());
        self.recs.push(now, rec, c.scale_up_window.max(c.scale_down_window));
        let mut desired = self.recs.stabilize(now, current, c.scale_up_window, c.scale_down_window);
        // HPA default scale-up policy: at most double, or +4 pods, per period.
        if c.hpa_rate_limit {
            desired = desired.min(current.saturating_mul(2).max(current + 4));
        }
        desired = desired.clamp(c.min().max(1), c.max());
        plan(desired, obs, format!("hpa: metric {metric} / queueLength {}", c.target_backlog))
    }
}

/// Ids of active workers that have been idle for `timeout` seconds: when workers report
/// their load, each its own idle time; otherwise, all of them once the queue has been empty
/// that long.
fn idle_workers(obs: &Observation<'_>, timeout: f64, empty_since: Option<f64>) -> Vec<String> {
    let queue_idle = empty_since.is_some_and(|t| obs.now - t >= timeout);
    obs.workers
        .iter()
        .filter(|w| w.state == WorkerState::Ready)
        .filter(|w| match w.busy {
            Some(0) => w.idle_since.is_some_and(|t| obs.now - t >= timeout),
            Some(_) => false,
            None => queue_idle,
        })
        .map(|w| w.id.clone())
        .collect()
}

/// Drains up to `surplus` idle workers (never a busy one), keeping `min`.
fn drain_idle(obs: &Observation<'_>, surplus: u32, min: u32, timeout: f64, empty_since: Option<f64>) -> Vec<String> {
    let allowed = surplus.min(obs.active().saturating_sub(min)) as usize;
    idle_workers(obs, timeout, empty_since).into_iter().take(allowed).collect()
}

/// Tracks since when a count has been zero (or non-zero).
fn track(since: &mut Option<f64>, now: f64, condition: bool) {
    if condition {
        since.get_or_insert(now);
    } else {
        *since = None;
    }
}

/// See the module docs. `target_backlog` is the scaler value, `idle_cooldown` the idle
/// timeout.
#[derive(Debug, Clone)]
pub struct RunpodRequestCountPolicy {
    cfg: PolicyConfig,
    empty_since: Option<f64>,
}

impl RunpodRequestCountPolicy {
    /// A policy from a validated configuration.
    pub fn new(cfg: PolicyConfig) -> Self {
        Self { cfg, empty_since: None }
    }
}

impl Policy for RunpodRequestCountPolicy {
    fn name(&self) -> &str {
        "runpod-requests"
    }

    fn interval(&self) -> f64 {
        self.cfg.interval
    }

    fn decide(&mut self, obs: &Observation<'_>) -> Decision {
        let c = &self.cfg;
        let demand = c.demand(&obs.backlog);
        track(&mut self.empty_since, obs.now, demand == 0);
        let want = workers_for(demand, c.target_backlog).clamp(c.min(), c.max());
        let active = obs.active();
        let reason = format!("requests {demand} / scaler value {}", c.target_backlog);
        if want >= active {
            return plan(want, obs, reason);
        }
        let drain = drain_idle(obs, active - want, c.min(), c.idle_cooldown, self.empty_since);
        Decision { desired: active - drain.len() as u32, start: 0, drain, reason }
    }
}

/// See the module docs. `queue_delay` is the threshold, `idle_cooldown` the idle timeout.
#[derive(Debug, Clone)]
pub struct RunpodQueueDelayPolicy {
    cfg: PolicyConfig,
    waiting_since: Option<f64>,
    empty_since: Option<f64>,
}

impl RunpodQueueDelayPolicy {
    /// A policy from a validated configuration.
    pub fn new(cfg: PolicyConfig) -> Self {
        Self { cfg, waiting_since: None, empty_since: None }
    }
}

impl Policy for RunpodQueueDelayPolicy {
    fn name(&self) -> &str {
        "runpod-delay"
    }

    fn interval(&self) -> f64 {
        self.cfg.interval
    }

    fn decide(&mut self, obs: &Observation<'_>) -> Decision {
        let c = &self.cfg;
        let now = obs.now;
        let demand = c.demand(&obs.backlog);
        track(&mut self.waiting_since, now, obs.backlog.visible > 0);
        track(&mut self.empty_since, now, demand == 0);
        let active = obs.active();
        if active < c.min() || (active == 0 && demand > 0) {
            return plan(c.min().max(1).min(c.max()), obs, "first request starts a worker");
        }
        if self.waiting_since.is_some_and(|t| now - t >= c.queue_delay) && active < c.max() {
            // One more worker, then wait another threshold before the next.
            self.waiting_since = Some(now);
            return plan(active + 1, obs, format!("jobs waited over {} s", c.queue_delay));
        }
        let drain = drain_idle(obs, active, c.min(), c.idle_cooldown, self.empty_since);
        let reason = if drain.is_empty() { "steady" } else { "idle timeout" };
        Decision { desired: active - drain.len() as u32, start: 0, drain, reason: reason.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::policy::tests::worker;
    use crate::autoscale::{Backlog, PolicyKind, WorkerView};

    fn run(p: &mut dyn Policy, now: f64, visible: u64, in_flight: u64, ws: &[WorkerView]) -> Decision {
        p.decide(&Observation { now, backlog: Backlog { visible, in_flight, delayed: 0 }, workers: ws })
    }

    fn ready(n: usize) -> Vec<WorkerView> {
        (0..n).map(|i| worker(&format!("w{i}"), WorkerState::Ready, None, None)).collect()
    }

    #[test]
    fn keda_formula_rate_limit_and_slow_scale_down() {
        let mut p = KedaSqsPolicy::new(PolicyConfig { max_workers: 50, ..PolicyConfig::defaults(PolicyKind::Keda) });
        // Activation from zero takes one replica; the HPA sizes it from its next sync:
        // ceil(100 / 5) = 20 limited to max(2x1, 1+4) = 5, then doubling.
        assert_eq!(run(&mut p, 0.0, 100, 0, &[]).desired, 1);
        assert_eq!(run(&mut p, 1.0, 100, 0, &ready(1)).desired, 1, "the HPA waits for its sync");
        assert_eq!(run(&mut p, 15.0, 100, 0, &ready(1)).desired, 5);
        assert_eq!(run(&mut p, 30.0, 100, 0, &ready(5)).desired, 10);
        assert_eq!(run(&mut p, 45.0, 100, 0, &ready(10)).desired, 20);
        // Within 10% of the target: no change.
        assert_eq!(run(&mut p, 60.0, 21, 0, &ready(4)).desired, 4);
        // Backlog gone: the 300 s window holds the highest recent recommendation.
        assert_eq!(run(&mut p, 75.0, 0, 0, &ready(20)).desired, 20);
        assert_eq!(run(&mut p, 300.0, 0, 0, &ready(20)).desired, 20);
        // cooldownPeriod: 300 s after the last active poll (t=60), on a poll.
        assert_eq!(run(&mut p, 330.0, 0, 0, &ready(20)).desired, 20);
        assert_eq!(run(&mut p, 360.0, 0, 0, &ready(20)).desired, 0);
    }

    #[test]
    fn keda_polls_on_its_own_phase() {
        let cfg = PolicyConfig { phase: 12.0, ..PolicyConfig::defaults(PolicyKind::Keda) };
        let mut p = KedaSqsPolicy::new(cfg);
        // Jobs arrive at 0; the first poll is at 12 s.
        assert_eq!(run(&mut p, 0.0, 40, 0, &[]).desired, 0);
        assert_eq!(run(&mut p, 11.0, 40, 0, &[]).desired, 0);
        assert_eq!(run(&mut p, 12.0, 40, 0, &[]).desired, 1);
    }

    #[test]
    fn runpod_request_count_keeps_busy_workers() {
        let cfg = PolicyConfig { max_workers: 10, ..PolicyConfig::defaults(PolicyKind::RunpodRequests) };
        let mut p = RunpodRequestCountPolicy::new(cfg);
        assert_eq!(run(&mut p, 0.0, 10, 0, &[]).desired, 3);
        let ws = [
            worker("busy", WorkerState::Ready, Some(2), None),
            worker("idle-new", WorkerState::Ready, Some(0), Some(8.0)),
            worker("idle-old", WorkerState::Ready, Some(0), Some(1.0)),
        ];
        let d = run(&mut p, 10.0, 0, 2, &ws);
        assert_eq!((d.desired, d.drain), (2, vec!["idle-old".to_string()]));
    }

    #[test]
    fn runpod_queue_delay_adds_one_worker_per_threshold() {
        let mut p = RunpodQueueDelayPolicy::new(PolicyConfig::defaults(PolicyKind::RunpodDelay));
        assert_eq!(run(&mut p, 0.0, 50, 0, &[]).desired, 1);
        assert_eq!(run(&mut p, 1.0, 50, 0, &ready(1)).desired, 1);
        assert_eq!(run(&mut p, 5.0, 50, 0, &ready(1)).desired, 2);
        assert_eq!(run(&mut p, 6.0, 50, 0, &ready(2)).desired, 2);
        assert_eq!(run(&mut p, 9.0, 50, 0, &ready(2)).desired, 3);
        // Empty queue: workers of unknown load go after the idle timeout.
        assert_eq!(run(&mut p, 20.0, 0, 0, &ready(3)).desired, 3);
        assert_eq!(run(&mut p, 25.0, 0, 0, &ready(3)).desired, 0);
    }
}
