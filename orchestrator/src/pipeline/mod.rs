//! Pipelines: ASL state machines run as hops over a queue, one state per message, with the
//! execution recorded in a create-only object store so every hop has exactly one effect.
//!
//! The worker provides an [`ExecutionStore`] (its object store), a [`HopSender`] (its
//! queue) and a [`TaskRunner`] (its LLM plus [`Tools`]), then calls [`start_execution`]
//! and, for each received message, [`process_hop`]. [`run_to_completion`] does the same in
//! process for tests.
//!
//! # Worker contract
//!
//! - Build an [`Env`]: `store` = the worker's object store behind [`ExecutionStore`]
//!   (`put_if_absent` answers `true` when it created the key), `sender` = a [`HopSender`] that
//!   sends each `(HopMessage, delay)` as one queue message with the JSON body
//!   `serde_json::to_string(&msg)` and `DelaySeconds = ceil(delay)` (never above 900; a FIFO
//!   queue may use [`HopMessage::id`] as the deduplication id), `runner` = a [`TaskRunner`]
//!   handling `ember:generate` and delegating `ember:tool:*` to [`Tools`] (whose
//!   [`TaskRunner::resources`] it extends).
//! - `ember pipeline validate FILE`: [`crate::asl::validate()`] with the runner's resources;
//!   print every [`crate::asl::Diagnostic`] (errors fail, warnings do not).
//! - `ember pipeline start FILE --input JSON [--name N]`: [`start_execution`] (sends hop 0).
//! - On each received message: parse the body as [`HopMessage`], call [`process_hop`], then
//!   delete the message. `Ok(outcome)` with `outcome.finished` holding an `Err` (and
//!   `!outcome.duplicate`) is a failed execution: send it to the pipeline DLQ with its error
//!   and cause. `Err(e)`: leave the message for redelivery when `e.is_retryable()`, else DLQ.
//!   Redelivery is always safe: a recorded hop is not run again, only its next hops re-sent.
//! - `ember pipeline describe ID` / `history ID`: [`describe`] / [`history`] (both `Serialize`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ember_orchestrator::pipeline::{run_to_completion, ExecutionStatus, Tools};
//! let def = r#"{"StartAt": "Hi", "States": {"Hi": {"Type": "Pass",
//!     "Parameters": {"greeting.$": "States.Format('hello {}', $.who)"}, "End": true}}}"#;
//! let run = run_to_completion(Tools::builtin(), def, serde_json::json!({"who": "Ada"}), Default::default()).await?;
//! assert_eq!(run.description.status, ExecutionStatus::Succeeded);
//! assert_eq!(run.description.output, Some(serde_json::json!({"greeting": "hello Ada"})));
//! # Ok(()) }
//! ```

mod driver;
mod engine;
mod hop;
mod http;
mod process;
mod queue;
mod store;
mod tools;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use driver::{run_to_completion, DriverOptions, Run};
pub use engine::MAX_QUEUE_DELAY_SECONDS;
pub use hop::{BranchResult, ExecutionEnd, Frame, HopMessage, Outgoing, RecordedEvent, Transition};
pub use http::HttpGet;
pub use process::{
    describe, fail_execution, history, process_hop, record_hop, redrive_execution, start_execution, Description,
    ExecutionStatus, HistoryEvent, HopOutcome, HopStatus, Redrive, StartOptions,
};
pub use queue::{Clock, HopSender, MemoryQueue, SendError};
pub use store::{ExecutionStore, MemoryStore, StoreError};
pub use tools::{TaskContext, TaskFailure, TaskRunner, ToolFn, Tools, WithGenerate, TOOL_UNAVAILABLE};

/// Default maximum hops along one path of an execution.
pub const DEFAULT_MAX_HOPS: u64 = 1000;

/// Engine options.
#[derive(Debug, Clone)]
pub struct Options {
    /// An execution path longer than this fails with `States.Runtime` (stops runaway loops).
    pub max_hops: u64,
    /// The clock (system, or virtual in the in-process driver).
    pub clock: Clock,
}

impl Default for Options {
    fn default() -> Self {
        Self { max_hops: DEFAULT_MAX_HOPS, clock: Clock::system() }
    }
}

/// What the engine works with: the worker's store, queue and task runner.
#[derive(Clone)]
pub struct Env {
    /// Execution records.
    pub store: Arc<dyn ExecutionStore>,
    /// Where next hops go.
    pub sender: Arc<dyn HopSender>,
    /// Runs Task states.
    pub runner: Arc<dyn TaskRunner>,
    /// Limits and clock.
    pub options: Options,
    /// Definitions already validated, so a hop does not parse and check its whole state
    /// machine again.
    pub definitions: Arc<DefinitionCache>,
}

/// Validated state machines by definition text (with the runner's resources, fixed for an
/// [`Env`]): every hop of an execution, and every execution of one machine, reuse one parse.
/// Holds at most [`DefinitionCache::CAPACITY`] definitions; when full it starts over, which
/// only costs a parse each.
#[derive(Default)]
pub struct DefinitionCache {
    parsed: std::sync::Mutex<std::collections::HashMap<String, Arc<crate::asl::Definition>>>,
}

impl DefinitionCache {
    pub const CAPACITY: usize = 256;

    /// The validated `definition`, parsed now or earlier.
    pub fn get(
        &self,
        definition: &str,
        resources: &crate::asl::Resources,
    ) -> Result<Arc<crate::asl::Definition>, crate::asl::InvalidDefinition> {
        let cached = self.parsed.lock().unwrap_or_else(|p| p.into_inner()).get(definition).cloned();
        if let Some(def) = cached {
            return Ok(def);
        }
        let def = Arc::new(crate::asl::validate(definition, resources)?);
        let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if parsed.len() >= Self::CAPACITY {
            parsed.clear();
        }
        parsed.insert(definition.to_string(), def.clone());
        Ok(def)
    }

    /// How many definitions are held.
    pub fn len(&self) -> usize {
        self.parsed.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A pipeline operation that failed (not an execution failure: those are recorded).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The definition does not validate.
    #[error(transparent)]
    InvalidDefinition(#[from] crate::asl::InvalidDefinition),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sending hops failed.
    #[error(transparent)]
    Send(#[from] SendError),
    /// A name was reused with a different definition or input.
    #[error("ExecutionAlreadyExists: execution '{0}' already exists with a different definition or input")]
    ExecutionAlreadyExists(String),
    /// No execution with this id.
    #[error("ExecutionDoesNotExist: no execution '{0}'")]
    ExecutionNotFound(String),
    /// Bad execution name.
    #[error("InvalidName: '{0}' (1-80 characters of letters, digits, '-' and '_')")]
    InvalidName(String),
    /// Only a failed execution can be redriven.
    #[error("ExecutionNotRedrivable: execution '{0}' is {1}; only a FAILED execution can be redriven")]
    NotRedrivable(String, String),
    /// A stored record could not be read back.
    #[error("corrupt execution record: {0}")]
    Corrupt(String),
}

impl PipelineError {
    /// Stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidDefinition(_) => "pipeline_invalid_definition",
            Self::Store(e) => e.label,
            Self::Send(_) => "pipeline_send",
            Self::ExecutionAlreadyExists(_) => "pipeline_execution_exists",
            Self::ExecutionNotFound(_) => "pipeline_execution_not_found",
            Self::InvalidName(_) => "pipeline_invalid_name",
            Self::NotRedrivable(..) => "pipeline_not_redrivable",
            Self::Corrupt(_) => "pipeline_corrupt",
        }
    }

    /// Whether redelivering the message could succeed (store or queue trouble).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.retryable,
            Self::Send(e) => e.retryable,
            _ => false,
        }
    }
}
