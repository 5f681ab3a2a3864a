//! Ember's policy: workers for the backlog at a target per worker, decided every few seconds,
//! up at once, down after a short stabilization window, to zero after an idle cooldown.
//!
//! Why these defaults (a decision every 2 s, 30 s down window, 30 s cooldown) rather than
//! KEDA's (30 s polling, 15 s HPA sync, 300 s window, 300 s cooldown): an Ember worker starts in about a second (BENCHMARKS.md: 0.9 s from
//! process start to the first token with the model fetched from S3), so holding idle
//! workers for minutes to avoid a cold start buys little latency for a lot of cost. Where
//! workers start slowly (an EC2 GPU instance joining an ECS cluster), raise the cooldown.
//! Tuned on the shipped traces (examples/autoscale) with the simulator: a 60-120 s down
//! window cut cold starts on the diurnal trace by half or more but cost 6-12% more
//! worker-seconds for no better p95; a 5 s interval left p95 on the spike 2.5 s worse.

use super::config::PolicyConfig;
use super::policy::{plan, workers_for, Decision, Observation, Policy, Recommendations};

/// See the module docs.
#[derive(Debug, Clone)]
pub struct EmberPolicy {
    cfg: PolicyConfig,
    recs: Recommendations,
    last_demand_at: Option<f64>,
}

impl EmberPolicy {
    /// A policy from a validated configuration ([`PolicyConfig::build`] validates).
    pub fn new(cfg: PolicyConfig) -> Self {
        Self { cfg, recs: Recommendations::default(), last_demand_at: None }
    }
}

impl Policy for EmberPolicy {
    fn name(&self) -> &str {
        "ember"
    }

    fn interval(&self) -> f64 {
        self.cfg.interval
    }

    fn decide(&mut self, obs: &Observation<'_>) -> Decision {
        let c = &self.cfg;
        let now = obs.now;
        let demand = c.demand(&obs.backlog);
        let active = obs.active();
        let activated = demand > u64::try_from(c.activation).unwrap_or(0);
        if demand > 0 && (active > 0 || activated) {
            self.last_demand_at = Some(now);
        }
        let raw = if active == 0 && !activated { 0 } else { workers_for(demand, c.target_backlog) };
        self.recs.push(now, raw, c.scale_up_window.max(c.scale_down_window));
        let mut desired = self.recs.stabilize(now, active, c.scale_up_window, c.scale_down_window);
        let mut reason = format!("backlog {demand} / target {} per worker", c.target_backlog);
        // Never leave queued work without a worker; keep the last one through the cooldown.
        let cooling = self.last_demand_at.is_some_and(|t| now - t < c.idle_cooldown);
        if desired == 0 && ((demand > 0 && (active > 0 || activated)) || (active > 0 && cooling)) {
            desired = 1;
            if demand == 0 {
                reason = format!("idle, cooldown {} s not over", c.idle_cooldown);
            }
        }
        plan(desired.clamp(c.min(), c.max()), obs, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::policy::tests::worker;
    use crate::autoscale::{Backlog, PolicyKind, WorkerState, WorkerView};

    /// Runs a policy against a fake clock, applying its decisions to a list of workers
    /// that are ready at once.
    pub(crate) struct Harness {
        pub policy: Box<dyn Policy>,
        pub workers: Vec<WorkerView>,
        next: u32,
    }

    impl Harness {
        pub(crate) fn new(cfg: PolicyConfig) -> Self {
            let policy = cfg.build().unwrap_or_else(|e| panic!("{e}"));
            Self { policy, workers: Vec::new(), next: 0 }
        }

        pub(crate) fn tick(&mut self, now: f64, visible: u64, in_flight: u64) -> Decision {
            let backlog = Backlog { visible, in_flight, delayed: 0 };
            let d = self.policy.decide(&Observation { now, backlog, workers: &self.workers });
            for _ in 0..d.start {
                self.next += 1;
                self.workers.push(worker(&format!("w{}", self.next), WorkerState::Ready, None, None));
            }
            // Drained workers leave at once here (they held no job in these tests).
            self.workers.retain(|w| !d.drain.contains(&w.id));
            d
        }
    }

    fn cfg() -> PolicyConfig {
        PolicyConfig { target_backlog: 10.0, max_workers: 5, ..PolicyConfig::defaults(PolicyKind::Ember) }
    }

    #[test]
    fn scales_up_at_once_capped_at_max() {
        let mut h = Harness::new(cfg());
        let d = h.tick(0.0, 35, 0);
        assert_eq!((d.desired, d.start), (4, 4));
        assert_eq!(h.tick(5.0, 200, 0).desired, 5, "max 5");
    }

    #[test]
    fn scales_down_after_the_window_and_to_zero_after_the_cooldown() {
        let mut h = Harness::new(cfg());
        h.tick(0.0, 40, 0);
        assert_eq!(h.workers.len(), 4);
        // The backlog shrinks: hold for the 30 s down window.
        assert_eq!(h.tick(5.0, 0, 10).desired, 4);
        assert_eq!(h.tick(29.0, 0, 10).desired, 4);
        assert_eq!(h.tick(36.0, 0, 10).desired, 1);
        // Empty from t=40: one worker stays through the 30 s cooldown, then none.
        assert_eq!(h.tick(40.0, 0, 0).desired, 1);
        assert_eq!(h.tick(65.0, 0, 0).desired, 1);
        let d = h.tick(71.0, 0, 0);
        assert_eq!((d.desired, d.drain.len()), (0, 1));
        assert!(h.workers.is_empty());
    }

    #[test]
    fn activation_threshold_holds_zero_for_a_trickle() {
        let mut h = Harness::new(PolicyConfig { activation: 3, ..cfg() });
        assert_eq!(h.tick(0.0, 3, 0).desired, 0);
        assert_eq!(h.tick(5.0, 4, 0).desired, 1);
        // Once running, the threshold no longer applies.
        assert_eq!(h.tick(10.0, 1, 0).desired, 1);
    }

    #[test]
    fn min_workers_stay_when_idle() {
        let mut h = Harness::new(PolicyConfig { min_workers: 2, ..cfg() });
        assert_eq!(h.tick(0.0, 0, 0).desired, 2);
        assert_eq!(h.tick(1000.0, 0, 0).desired, 2);
    }

    #[test]
    fn delayed_messages_count_only_when_asked() {
        let obs = |p: &mut Box<dyn Policy>| {
            let backlog = Backlog { visible: 0, in_flight: 0, delayed: 30 };
            p.decide(&Observation { now: 0.0, backlog, workers: &[] }).desired
        };
        let mut off = cfg().build().unwrap_or_else(|e| panic!("{e}"));
        let mut on = PolicyConfig { include_delayed: true, ..cfg() }.build().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((obs(&mut off), obs(&mut on)), (0, 3));
    }

    #[test]
    fn draining_picks_the_idle_worker_not_the_busy_one() {
        let mut p = cfg().build().unwrap_or_else(|e| panic!("{e}"));
        let ws =
            [worker("busy", WorkerState::Ready, Some(8), None), worker("idle", WorkerState::Ready, Some(0), Some(0.0))];
        let backlog = Backlog { visible: 0, in_flight: 8, delayed: 0 };
        let d = p.decide(&Observation { now: 100.0, backlog, workers: &ws });
        assert_eq!(d.drain, ["idle"]);
    }
}
