//! Ember's worker: jobs, queues, result stores, the job runner, the Lambda handler, the
//! autoscaling drivers and the `ember` command line. The generation engine is the
//! `ember-engine` crate; the worker reaches it only through that crate's public API.

pub mod autoscale;
pub mod cli;
pub mod http;
pub mod job;
pub mod lambda;
pub mod openai;
pub mod pipeline;
pub mod queue;
pub mod runner;
pub mod store;
pub mod telemetry;
