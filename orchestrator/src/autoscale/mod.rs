//! Queue-driven autoscaling: how many workers should run, which ones to drain, and a
//! simulator to compare policies on arrival traces.
//!
//! Everything here is pure and deterministic: a [`Policy`] sees an [`Observation`] (the
//! time on the caller's clock, the queue's backlog, the workers) and answers a [`Decision`]
//! (the desired count, how many to start, which to drain). A [`Driver`] turns decisions
//! into processes, ECS tasks or Lambda concurrency; the [`DryRunDriver`] only prints them.
//!
//! Draining, not killing: a worker asked to stop takes no new jobs, finishes (or, after its
//! grace period, hands back) the jobs it holds, then exits. Policies drain idle workers first.
//!
//! ```
//! use ember_orchestrator::autoscale::{Backlog, Observation, Policy, PolicyConfig, PolicyKind};
//! let mut policy = PolicyConfig::defaults(PolicyKind::Ember).build().expect("valid defaults");
//! let obs = Observation { now: 0.0, backlog: Backlog { visible: 40, in_flight: 0, delayed: 0 }, workers: &[] };
//! let decision = policy.decide(&obs);
//! assert_eq!(decision.start, decision.desired);
//! assert!(decision.desired >= 1);
//! ```

pub mod bound;
mod config;
mod driver;
mod ember;
mod known;
mod policy;
pub mod sim;
pub mod trace;

pub use config::{ConfigError, DriverKind, PolicyConfig, PolicyKind};
pub use driver::{Driver, DriverError, DryRunDriver};
pub use ember::{EmberPolicy, WorkerFigures};
pub use known::{KedaSqsPolicy, RunpodQueueDelayPolicy, RunpodRequestCountPolicy};
pub use policy::{plan, Backlog, Decision, Observation, Policy, WorkerReport, WorkerState, WorkerView};
