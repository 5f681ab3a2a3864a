//! The hop message and the records an execution leaves in the store, with their keys.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::asl::StatesError;

/// Where a hop runs when it is inside a Parallel branch or a Map item: the Parallel/Map
/// state, the hop that fanned out, and the branch or item index. Outermost first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// The Parallel or Map state's name (in the enclosing machine).
    pub state: String,
    /// The hop number of the fan-out in the enclosing scope.
    pub hop: u64,
    /// Branch index (Parallel) or item index (Map).
    pub index: usize,
}

/// One queue message: run `state` of `execution` with `input`.
///
/// `hop` counts the transitions from the start along this path (branch hops continue from
/// the fan-out); with `scope` it names the transition record, so a redelivered message finds
/// the record and only re-sends what it recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopMessage {
    /// Execution id.
    pub execution: String,
    /// State to run.
    pub state: String,
    /// The state's raw input.
    pub input: Value,
    /// Transition number along this path, 0 for the first state.
    pub hop: u64,
    /// Retries of this state so far (`$$.State.RetryCount`).
    #[serde(default)]
    pub attempt: u32,
    /// Retries used per Retry entry (index = retrier).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retries: Vec<u32>,
    /// Branch / Map item coordinates, outermost first; empty at the top level.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scope: Vec<Frame>,
    /// When the state was first entered (kept across retries), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entered_time: Option<String>,
    /// Do not run before this time (RFC 3339): a Wait longer than one queue delay re-delays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// `Some(fan-out hop)` when this hop resumes a Parallel/Map after its branches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<u64>,
    /// The workflow variables this state sees (`Assign` of earlier states; in a branch, the
    /// enclosing scope's too).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub vars: Map<String, Value>,
    /// How many times the execution was redriven when this hop was sent: a redriven
    /// execution records its hops afresh, under `r{n}/` of the execution's records.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redrive: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl HopMessage {
    /// A stable id for the hop (what consumers dedupe on): execution, redrive, scope and hop
    /// number.
    pub fn id(&self) -> String {
        format!("{}/{}", self.records(), transition_suffix(&self.scope, self.hop))
    }

    /// The id under which this hop's records (transitions, branch results, joins, the end)
    /// are kept: the execution's, or its redrive's.
    pub fn records(&self) -> String {
        records_id(&self.execution, self.redrive)
    }
}

/// The records id of redrive `n` of `execution` (the execution's own for 0).
pub fn records_id(execution: &str, redrive: u32) -> String {
    if redrive == 0 {
        execution.to_string()
    } else {
        format!("{execution}/r{redrive}")
    }
}

/// One history event as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Step Functions event type (`PassStateEntered`, `TaskFailed`...).
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339 time.
    pub timestamp: String,
    /// Event details (name, input, output, error, cause...).
    pub details: Value,
}

/// A message to send, with its delay in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The hop.
    pub message: HopMessage,
    /// Delay in seconds (at most 900).
    pub delay_seconds: f64,
}

/// How a branch (or Map item) ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BranchResult {
    /// The branch's output, or its error.
    pub result: Result<Value, StatesError>,
    /// The hop number of its last transition.
    pub last_hop: u64,
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionEnd {
    /// The output, or the error.
    pub result: Result<Value, StatesError>,
    /// RFC 3339 stop time.
    pub stop_time: String,
}

/// A fan-out (Parallel or Map) recorded by the hop that started it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanOut {
    /// Number of branches / items.
    pub count: usize,
    /// Inputs of the items not started yet (Map with MaxConcurrency), by index.
    #[serde(default)]
    pub pending: Vec<Value>,
    /// How many run at once (0 = all).
    pub max_concurrency: usize,
    /// A Map's `ToleratedFailurePercentage` as resolved when it started (literal or path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerated_percentage: Option<f64>,
    /// A Map's `ToleratedFailureCount` as resolved when it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerated_count: Option<u64>,
}

/// The record of one transition: what happened and what it sends. Written create-only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The message that caused it.
    pub message: HopMessage,
    /// Events, in order.
    pub events: Vec<RecordedEvent>,
    /// Hops to send next.
    pub sends: Vec<Outgoing>,
    /// Set when a branch or Map item ended here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_done: Option<BranchResult>,
    /// Set when the execution ended here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<ExecutionEnd>,
    /// Set when this hop fanned out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<FanOut>,
    /// Milliseconds since the epoch when recorded (orders the history).
    pub time_ms: u64,
}

/// The execution's start record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionMeta {
    /// Execution id.
    pub id: String,
    /// Execution name.
    pub name: String,
    /// The definition as given.
    pub definition: String,
    /// State machine id (a hash of the definition).
    pub state_machine_id: String,
    /// The input.
    pub input: Value,
    /// RFC 3339 start time.
    pub start_time: String,
    /// Start time in ms since the epoch.
    pub start_ms: u64,
}

/// Key prefix of everything an execution stores, relative to the execution store (the
/// worker's store puts it under `pipelines/`, so records land in
/// `pipelines/executions/{execution}/`).
pub fn execution_prefix(execution: &str) -> String {
    format!("executions/{execution}/")
}

fn scope_key(scope: &[Frame]) -> String {
    scope.iter().map(|f| format!("b{:010}-{:06}/", f.hop, f.index)).collect()
}

fn transition_suffix(scope: &[Frame], hop: u64) -> String {
    format!("{}{hop:010}", scope_key(scope))
}

/// The start record's key.
pub fn meta_key(execution: &str) -> String {
    format!("{}meta.json", execution_prefix(execution))
}

/// The end record's key.
pub fn end_key(execution: &str) -> String {
    format!("{}end.json", execution_prefix(execution))
}

/// The key of redrive `n`'s start marker (`executions/{id}/r{n}/start.json`).
pub fn redrive_key(execution: &str, n: u32) -> String {
    format!("{}start.json", execution_prefix(&records_id(execution, n)))
}

/// Prefix of all transition records.
pub fn transitions_prefix(execution: &str) -> String {
    format!("{}t/", execution_prefix(execution))
}

/// A transition record's key.
pub fn transition_key(execution: &str, scope: &[Frame], hop: u64) -> String {
    format!("{}{}.json", transitions_prefix(execution), transition_suffix(scope, hop))
}

/// Prefix of a fan-out's branch results (`scope` is the fan-out's own scope).
pub fn results_prefix(execution: &str, scope: &[Frame], fan_hop: u64) -> String {
    format!("{}r/{}/", execution_prefix(execution), transition_suffix(scope, fan_hop))
}

/// A branch result's key.
///
/// The name carries the index, whether it failed and its last hop, so a completing branch
/// decides about the join from one listing instead of reading every result.
pub fn result_key(execution: &str, scope: &[Frame], fan_hop: u64, index: usize, done: &BranchResult) -> String {
    let status = if done.result.is_ok() { "ok" } else { "err" };
    format!("{}{index:06}.{status}.{:010}.json", results_prefix(execution, scope, fan_hop), done.last_hop)
}

/// What a result key says: `(index, succeeded, last hop)`.
pub fn parse_result_key(key: &str) -> Option<(usize, bool, u64)> {
    let name = key.rsplit('/').next()?.strip_suffix(".json")?;
    let mut parts = name.split('.');
    let index = parts.next()?.parse().ok()?;
    let ok = match parts.next()? {
        "ok" => true,
        "err" => false,
        _ => return None,
    };
    Some((index, ok, parts.next()?.parse().ok()?))
}

/// A fan-out's join marker key.
pub fn join_key(execution: &str, scope: &[Frame], fan_hop: u64) -> String {
    format!("{}j/{}.json", execution_prefix(execution), transition_suffix(scope, fan_hop))
}
