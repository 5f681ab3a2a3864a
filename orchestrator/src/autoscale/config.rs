//! Policy and driver configuration, validated once: a bad value is an error that names the
//! option and says what to do, never a panic or a silently clamped number.

use std::fmt;
use std::str::FromStr;

use super::ember::EmberPolicy;
use super::known::{KedaSqsPolicy, RunpodQueueDelayPolicy, RunpodRequestCountPolicy};
use super::policy::Policy;

/// Which scaling policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Ember's own: cold-start-aware and anticipating (forecast arrivals, a p95 wait target,
    /// the ski-rental rule for idle workers); see [`super::EmberPolicy`].
    Ember,
    /// KEDA's `aws-sqs-queue` scaler feeding a Kubernetes HPA, with their documented defaults.
    Keda,
    /// RunPod serverless, "request count" mode.
    RunpodRequests,
    /// RunPod serverless, "queue delay" mode.
    RunpodDelay,
}

impl PolicyKind {
    /// Every kind, in table order.
    pub const ALL: [PolicyKind; 4] = [Self::Ember, Self::Keda, Self::RunpodRequests, Self::RunpodDelay];

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ember => "ember",
            Self::Keda => "keda",
            Self::RunpodRequests => "runpod-requests",
            Self::RunpodDelay => "runpod-delay",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ConfigError::UnknownPolicy(s.to_string()))
    }
}

/// Which driver applies decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// Print decisions, change nothing.
    DryRun,
    /// A local pool of `ember serve` processes.
    Local,
    /// An ECS service's desired count.
    Ecs,
    /// A Lambda SQS event source mapping's maximum concurrency.
    Lambda,
}

impl DriverKind {
    /// Every kind.
    pub const ALL: [DriverKind; 4] = [Self::DryRun, Self::Local, Self::Ecs, Self::Lambda];

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DryRun => "dry-run",
            Self::Local => "local",
            Self::Ecs => "ecs",
            Self::Lambda => "lambda",
        }
    }
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DriverKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ConfigError::UnknownDriver(s.to_string()))
    }
}

/// A bad autoscaling setting. Messages name the option (as on the command line) and say
/// what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// `--policy` names no policy.
    #[error("--policy `{0}` is not a policy: use one of ember, keda, runpod-requests, runpod-delay")]
    UnknownPolicy(String),
    /// `--driver` names no driver.
    #[error("--driver `{0}` is not a driver: use one of dry-run, local, ecs, lambda")]
    UnknownDriver(String),
    /// A worker count below zero.
    #[error("{field} is {value}: worker counts cannot be negative, use 0 or more")]
    NegativeWorkers {
        /// The option.
        field: &'static str,
        /// What was given.
        value: i64,
    },
    /// `--min-workers` above `--max-workers`.
    #[error("--min-workers is {min} but --max-workers is {max}: raise --max-workers or lower --min-workers")]
    MinAboveMax {
        /// `--min-workers`.
        min: i64,
        /// `--max-workers`.
        max: i64,
    },
    /// `--max-workers 0` would never run a job.
    #[error("--max-workers is 0: no job would ever run, allow at least 1 worker")]
    MaxZero,
    /// A value that must be above zero.
    #[error("{field} is {value}: it must be a number above 0 ({hint})")]
    NotPositive {
        /// The option.
        field: &'static str,
        /// What was given.
        value: f64,
        /// What the option means.
        hint: &'static str,
    },
    /// A duration below zero.
    #[error("{field} is {value}: a duration in seconds cannot be negative, use 0 or more")]
    NegativeSeconds {
        /// The option.
        field: &'static str,
        /// What was given.
        value: f64,
    },
}

impl ConfigError {
    /// Stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownPolicy(_) => "autoscale_unknown_policy",
            Self::UnknownDriver(_) => "autoscale_unknown_driver",
            Self::NegativeWorkers { .. } => "autoscale_negative_workers",
            Self::MinAboveMax { .. } => "autoscale_min_above_max",
            Self::MaxZero => "autoscale_max_zero",
            Self::NotPositive { .. } => "autoscale_not_positive",
            Self::NegativeSeconds { .. } => "autoscale_negative_seconds",
        }
    }
}

/// Settings of one policy. [`PolicyConfig::defaults`] gives each policy's documented
/// defaults; callers override fields and [`PolicyConfig::build`] validates them.
///
/// Counts are `i64` and durations `f64` so that a negative value reaches validation and gets
/// a message naming the option, rather than a parse error about digits.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// Which policy.
    pub kind: PolicyKind,
    /// Fewest workers (0 allows scale to zero).
    pub min_workers: i64,
    /// Most workers.
    pub max_workers: i64,
    /// Queued jobs one worker should carry (KEDA `queueLength`, RunPod request-count
    /// scaler value). Not used by runpod-delay.
    pub target_backlog: f64,
    /// From zero workers, start only when the backlog is above this (KEDA
    /// `activationQueueLength`).
    pub activation: i64,
    /// Count in-flight messages as backlog (KEDA `scaleOnInFlight`).
    pub include_in_flight: bool,
    /// Count delayed messages as backlog (KEDA `scaleOnDelayed`).
    pub include_delayed: bool,
    /// Scale-up stabilization window, seconds.
    pub scale_up_window: f64,
    /// Scale-down stabilization window, seconds.
    pub scale_down_window: f64,
    /// Seconds without any backlog before the last worker goes (KEDA `cooldownPeriod`;
    /// RunPod's per-worker idle timeout).
    pub idle_cooldown: f64,
    /// runpod-delay: seconds a job may wait in the queue before a worker is added.
    pub queue_delay: f64,
    /// Seconds between decisions (for keda: the HPA sync period, 15 s; KEDA's own 30 s
    /// `pollingInterval` governs activation and scale to zero).
    pub interval: f64,
    /// keda: KEDA's `pollingInterval` (30 s), which governs activation and scale to zero.
    pub poll_interval: f64,
    /// keda: the HPA's default scale-up limit (at most double, or +4 pods, per period).
    pub hpa_rate_limit: bool,
    /// Seconds of the first decision after the start of the caller's clock: where a periodic
    /// loop (KEDA's poll, the HPA sync) happens to fall against the arrivals. The simulator
    /// averages KEDA over several phases rather than letting a poll land just as a burst
    /// arrives.
    pub phase: f64,
    /// ember: the p95 queue wait to aim for, seconds (`--target-wait`).
    pub target_wait: f64,
    /// ember: a worker's cold start, seconds, until a worker reports its own.
    pub cold_start: f64,
    /// ember: a busy worker's aggregate tokens/s, until workers report theirs.
    pub worker_tok_s: f64,
    /// ember: tokens a job generates, until workers report theirs.
    pub job_tokens: f64,
}

impl PolicyConfig {
    /// The documented defaults of `kind` with at most 10 workers. Ember: decisions every second
    /// (a burst's jobs wait out the time to the next decision as well as the cold start: at 2 s
    /// the spike's p95 wait was 0.8-1 s longer at every cold start, and the Azure trace's 0.26 s
    /// instead of 0.05 s at a 1 s cold start; RunPod decides every second too),
    /// a 5 s p95 wait target (on the shipped traces 10 s saved 3-9% of worker-seconds on the
    /// bursts but let the p95 wait of the spike and the Azure trace rise by up to half), and until workers report their own figures 8 jobs per worker
    /// (`ember serve`'s default concurrency), a 0.9 s cold start, 198.3 tokens/s per busy worker
    /// and 128 tokens per job (BENCHMARKS.md). KEDA: queueLength 5, pollingInterval 30 s,
    /// cooldownPeriod 300 s; its HPA syncs every 15 s, scales down after a 300 s window and up by
    /// at most double or +4 pods per sync. RunPod: scaler value 4, idle timeout 5 s, queue
    /// delay 4 s.
    pub fn defaults(kind: PolicyKind) -> Self {
        let base = Self {
            kind,
            min_workers: 0,
            max_workers: 10,
            target_backlog: 8.0,
            activation: 0,
            include_in_flight: true,
            include_delayed: false,
            scale_up_window: 0.0,
            scale_down_window: 30.0,
            idle_cooldown: 30.0,
            queue_delay: 4.0,
            interval: 2.0,
            poll_interval: 30.0,
            hpa_rate_limit: true,
            phase: 0.0,
            target_wait: 5.0,
            cold_start: 0.9,
            worker_tok_s: 198.3,
            job_tokens: 128.0,
        };
        match kind {
            PolicyKind::Ember => Self { interval: 1.0, ..base },
            PolicyKind::Keda => {
                Self { target_backlog: 5.0, scale_down_window: 300.0, idle_cooldown: 300.0, interval: 15.0, ..base }
            }
            PolicyKind::RunpodRequests => {
                Self { target_backlog: 4.0, scale_down_window: 0.0, idle_cooldown: 5.0, interval: 1.0, ..base }
            }
            PolicyKind::RunpodDelay => Self { scale_down_window: 0.0, idle_cooldown: 5.0, interval: 1.0, ..base },
        }
    }

    /// `kind` as a careful operator would set it up for workers that start in `cold_start`
    /// seconds and run `concurrency` jobs each, without looking at the trace (one setting per
    /// cold start, the same for every trace):
    /// - every peer's per-worker target is the worker's measured concurrency (KEDA `queueLength`
    ///   and RunPod's scaler value: one worker per `concurrency` jobs);
    /// - idle workers are kept for the break-even time of the ski-rental problem, the larger of
    ///   the default and the cold start (keeping a worker idle for as long as a restart costs is
    ///   the classic 2-competitive rule);
    /// - KEDA polls every 5 s instead of 30, its HPA scales down after the same break-even
    ///   window (at least 30 s) and scales up without the default rate limit;
    /// - RunPod's queue-delay mode adds a worker after 2 s instead of 4.
    ///
    /// Ember has no tuned variant: its per-worker figures are measured and its one setting is
    /// the user's `--target-wait`.
    pub fn tuned(kind: PolicyKind, cold_start: f64, concurrency: u32) -> Self {
        let d = Self::defaults(kind);
        let hold = |default: f64| default.max(cold_start);
        let per_worker = f64::from(concurrency.max(1));
        match kind {
            PolicyKind::Ember => d,
            PolicyKind::Keda => Self {
                target_backlog: per_worker,
                poll_interval: 5.0,
                scale_down_window: hold(30.0),
                idle_cooldown: hold(30.0),
                hpa_rate_limit: false,
                ..d
            },
            PolicyKind::RunpodRequests => {
                Self { target_backlog: per_worker, idle_cooldown: hold(d.idle_cooldown), ..d }
            }
            PolicyKind::RunpodDelay => Self { queue_delay: 2.0, idle_cooldown: hold(d.idle_cooldown), ..d },
        }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [("--min-workers", self.min_workers), ("--max-workers", self.max_workers)] {
            if value < 0 {
                return Err(ConfigError::NegativeWorkers { field, value });
            }
        }
        if self.activation < 0 {
            return Err(ConfigError::NegativeWorkers { field: "--activation", value: self.activation });
        }
        if self.max_workers == 0 {
            return Err(ConfigError::MaxZero);
        }
        if self.min_workers > self.max_workers {
            return Err(ConfigError::MinAboveMax { min: self.min_workers, max: self.max_workers });
        }
        let positive = [
            ("--target-backlog", self.target_backlog, "queued jobs per worker"),
            ("--interval", self.interval, "seconds between decisions"),
            ("--queue-delay", self.queue_delay, "seconds a job may wait before runpod-delay adds a worker"),
            ("--poll-interval", self.poll_interval, "seconds between KEDA's polls"),
            ("--target-wait", self.target_wait, "the p95 queue wait to aim for, seconds"),
            ("--worker-tok-s", self.worker_tok_s, "a busy worker's tokens/s until workers report theirs"),
            ("--job-tokens", self.job_tokens, "tokens per job until workers report theirs"),
        ];
        for (field, value, hint) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::NotPositive { field, value, hint });
            }
        }
        let durations = [
            ("--scale-up-window", self.scale_up_window),
            ("--scale-down-window", self.scale_down_window),
            ("--idle-cooldown", self.idle_cooldown),
            ("--cold-start", self.cold_start),
            ("--phase", self.phase),
        ];
        for (field, value) in durations {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ConfigError::NegativeSeconds { field, value });
            }
        }
        Ok(())
    }

    /// `min_workers` after validation.
    pub(crate) fn min(&self) -> u32 {
        u32::try_from(self.min_workers).unwrap_or(0)
    }

    /// `max_workers` after validation.
    pub(crate) fn max(&self) -> u32 {
        u32::try_from(self.max_workers).unwrap_or(u32::MAX)
    }

    /// Validates and builds the policy.
    pub fn build(&self) -> Result<Box<dyn Policy>, ConfigError> {
        self.validate()?;
        let cfg = self.clone();
        Ok(match self.kind {
            PolicyKind::Ember => Box::new(EmberPolicy::new(cfg)),
            PolicyKind::Keda => Box::new(KedaSqsPolicy::new(cfg)),
            PolicyKind::RunpodRequests => Box::new(RunpodRequestCountPolicy::new(cfg)),
            PolicyKind::RunpodDelay => Box::new(RunpodQueueDelayPolicy::new(cfg)),
        })
    }

    /// The backlog this policy counts.
    pub(crate) fn demand(&self, b: &super::Backlog) -> u64 {
        b.visible
            + if self.include_in_flight { b.in_flight } else { 0 }
            + if self.include_delayed { b.delayed } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut PolicyConfig)) -> Result<(), ConfigError> {
        let mut c = PolicyConfig::defaults(PolicyKind::Ember);
        f(&mut c);
        c.build().map(|_| ())
    }

    #[test]
    fn defaults_are_valid() {
        for kind in PolicyKind::ALL {
            assert!(PolicyConfig::defaults(kind).build().is_ok(), "{kind}");
        }
    }

    #[test]
    fn bad_values_name_the_option_and_the_fix() {
        let e = with(|c| {
            c.min_workers = 5;
            c.max_workers = 2;
        })
        .err();
        assert_eq!(e, Some(ConfigError::MinAboveMax { min: 5, max: 2 }));
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("--min-workers is 5") && msg.contains("raise --max-workers"), "{msg}");

        let e = with(|c| c.target_backlog = -3.0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("--target-backlog is -3") && e.contains("above 0"), "{e}");
        let e = with(|c| c.target_backlog = 0.0).err().map(|e| e.label());
        assert_eq!(e, Some("autoscale_not_positive"));
        let e = with(|c| c.min_workers = -1).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("--min-workers is -1"), "{e}");
        assert_eq!(with(|c| c.max_workers = 0).err(), Some(ConfigError::MaxZero));
        let e = with(|c| c.scale_down_window = -1.0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("--scale-down-window"), "{e}");
        assert!(with(|c| c.interval = f64::NAN).is_err());
    }

    #[test]
    fn unknown_names_list_the_choices() {
        let e = "kubernetes".parse::<DriverKind>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("--driver `kubernetes`") && e.contains("dry-run, local, ecs, lambda"), "{e}");
        let e = "fastest".parse::<PolicyKind>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("--policy `fastest`") && e.contains("runpod-delay"), "{e}");
        assert_eq!("KEDA".parse::<PolicyKind>().ok(), Some(PolicyKind::Keda));
        assert_eq!("dry-run".parse::<DriverKind>().ok(), Some(DriverKind::DryRun));
    }
}
