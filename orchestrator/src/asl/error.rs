//! The one runtime error shape of a state machine: a Step Functions error name and a cause.

use serde::{Deserialize, Serialize};

/// Error names defined by the States Language (`States.*`).
pub mod names {
    /// Matches every error name except `States.Runtime` and `States.DataLimitExceeded`.
    pub const ALL: &str = "States.ALL";
    /// A task ran longer than `TimeoutSeconds`.
    pub const TIMEOUT: &str = "States.Timeout";
    /// A task sent no heartbeat for longer than `HeartbeatSeconds`.
    pub const HEARTBEAT_TIMEOUT: &str = "States.HeartbeatTimeout";
    /// A task failed (matches every task failure except `States.Timeout`).
    pub const TASK_FAILED: &str = "States.TaskFailed";
    /// The interpreter could not process the data (bad path, bad intrinsic argument...).
    /// Neither retried nor caught.
    pub const RUNTIME: &str = "States.Runtime";
    /// A Parallel or Map branch failed.
    pub const BRANCH_FAILED: &str = "States.BranchFailed";
    /// `ResultPath` cannot be applied to the state's input.
    pub const RESULT_PATH_MATCH_FAILURE: &str = "States.ResultPathMatchFailure";
    /// A `.$` field of `Parameters` could not be resolved.
    pub const PARAMETER_PATH_FAILURE: &str = "States.ParameterPathFailure";
    /// An intrinsic function call failed.
    pub const INTRINSIC_FAILURE: &str = "States.IntrinsicFailure";
    /// More Map items failed than the tolerated threshold allows.
    pub const EXCEED_TOLERATED_FAILURE_THRESHOLD: &str = "States.ExceedToleratedFailureThreshold";
    /// A Choice state had no matching rule and no Default.
    pub const NO_CHOICE_MATCHED: &str = "States.NoChoiceMatched";
    /// A value exceeded a size limit. Never retried nor caught.
    pub const DATA_LIMIT_EXCEEDED: &str = "States.DataLimitExceeded";
    /// A JSONata expression failed or evaluated to nothing (undefined).
    pub const QUERY_EVALUATION_ERROR: &str = "States.QueryEvaluationError";
    /// The caller lacks permission.
    pub const PERMISSIONS: &str = "States.Permissions";
}

/// A failure as Step Functions reports it: an error name and a human cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{error}: {cause}")]
pub struct StatesError {
    /// The error name (`States.Runtime`, `Ember.InvalidJson`, a user's Fail `Error`...).
    pub error: String,
    /// Free text explaining the failure.
    pub cause: String,
}

impl StatesError {
    /// Any error name with a cause.
    pub fn new(error: impl Into<String>, cause: impl Into<String>) -> Self {
        Self { error: error.into(), cause: cause.into() }
    }

    /// A `States.Runtime` error.
    pub fn runtime(cause: impl Into<String>) -> Self {
        Self::new(names::RUNTIME, cause)
    }

    /// The `{"error", "cause"}` of a failure event, leaving out an empty one (a Fail state
    /// without `Error` or `Cause` has none).
    pub fn details(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in [("error", &self.error), ("cause", &self.cause)] {
            if !v.is_empty() {
                m.insert(k.to_string(), serde_json::Value::String(v.clone()));
            }
        }
        serde_json::Value::Object(m)
    }

    /// Errors that neither Retry nor Catch may handle.
    pub fn is_terminal(&self) -> bool {
        self.error == names::RUNTIME || self.error == names::DATA_LIMIT_EXCEEDED
    }

    /// Whether an `ErrorEquals` entry matches this error.
    pub fn matches(&self, name: &str) -> bool {
        if self.is_terminal() {
            return false;
        }
        match name {
            names::ALL => true,
            names::TASK_FAILED => {
                self.error == names::TASK_FAILED
                    || !self.error.starts_with("States.")
                    || self.error == names::HEARTBEAT_TIMEOUT
            }
            _ => self.error == name,
        }
    }
}
