//! The parsed state machine. Every state keeps the fields of its type; [`super::validate()`]
//! builds it and reports every problem, so only a valid definition reaches the interpreter.

use std::collections::BTreeMap;

use serde_json::Value;

use super::choice::Rule;

/// How a state's fields select and transform data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueryLanguage {
    /// `InputPath`, `Parameters`, `ResultSelector`, `ResultPath`, `OutputPath`, `.$` keys,
    /// intrinsic functions (the default).
    #[default]
    JsonPath,
    /// `Arguments` and `Output` with `{% %}` JSONata expressions, `$states`.
    JsonAta,
}

impl QueryLanguage {
    /// The name used in definitions (`JSONPath`, `JSONata`).
    pub fn name(self) -> &'static str {
        match self {
            QueryLanguage::JsonPath => "JSONPath",
            QueryLanguage::JsonAta => "JSONata",
        }
    }
}

/// A whole state machine (or a Parallel branch, or a Map item processor).
#[derive(Debug, Clone, PartialEq)]
pub struct StateMachine {
    /// The first state.
    pub start_at: String,
    /// The states by name.
    pub states: BTreeMap<String, State>,
    /// `TimeoutSeconds` of the whole machine, if given.
    pub timeout_seconds: Option<u64>,
    /// `QueryLanguage` (a branch has its enclosing machine's); states may override it.
    pub query_language: QueryLanguage,
}

impl StateMachine {
    /// The state called `name`.
    pub fn state(&self, name: &str) -> Option<&State> {
        self.states.get(name)
    }
}

/// A path field that may be absent (default `$`), null (discard) or a path.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum PathField {
    /// Not given: `$`.
    #[default]
    Default,
    /// JSON `null`.
    Null,
    /// A path.
    Path(String),
}

impl PathField {
    /// The path to use, `None` for null.
    pub fn get(&self) -> Option<&str> {
        match self {
            PathField::Default => Some("$"),
            PathField::Null => None,
            PathField::Path(p) => Some(p),
        }
    }
}

/// A number given literally or through a path (`TimeoutSeconds` / `TimeoutSecondsPath`...).
#[derive(Debug, Clone, PartialEq)]
pub enum NumberSource {
    /// A literal.
    Value(f64),
    /// A path into the effective input.
    Path(String),
    /// A JSONata expression (`{% %}`, JSONata states).
    Expr(String),
}

/// One `Retry` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrier {
    /// Error names this retrier handles.
    pub error_equals: Vec<String>,
    /// First delay in seconds (default 1).
    pub interval_seconds: f64,
    /// Retries before giving up (default 3).
    pub max_attempts: u32,
    /// Multiplier per retry (default 2.0).
    pub backoff_rate: f64,
    /// Cap on the delay.
    pub max_delay_seconds: Option<f64>,
    /// `FULL` picks a random delay in `[0, delay]`.
    pub jitter_full: bool,
}

/// One `Catch` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Catcher {
    /// Error names this catcher handles.
    pub error_equals: Vec<String>,
    /// State to go to.
    pub next: String,
    /// Where the error object goes in the state's input (default `$`; JSONPath).
    pub result_path: PathField,
    /// `Assign`: variables set when this catcher handles an error.
    pub assign: Option<Value>,
    /// `Output` (JSONata): the state's output when caught (default `$states.errorOutput`).
    pub output: Option<Value>,
}

/// One Choice rule with where it leads.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceRule {
    /// The test.
    pub rule: Rule,
    /// `Next`.
    pub next: String,
    /// `Assign` when this rule matches.
    pub assign: Option<Value>,
    /// `Output` (JSONata) when this rule matches.
    pub output: Option<Value>,
}

/// How a Wait state waits.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitFor {
    /// A number of seconds.
    Seconds(NumberSource),
    /// Until a timestamp.
    Timestamp(String),
    /// Until the timestamp found at a path.
    TimestampPath(String),
    /// Until the timestamp a JSONata expression gives.
    TimestampExpr(String),
}

/// What a state does.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `Pass`.
    Pass {
        /// `Result`, the state's fixed result.
        result: Option<Value>,
    },
    /// `Task`.
    Task {
        /// The resource (`ember:generate`, `ember:tool:NAME`).
        resource: String,
        /// `TimeoutSeconds` / `TimeoutSecondsPath`.
        timeout: Option<NumberSource>,
        /// `HeartbeatSeconds` / `HeartbeatSecondsPath`.
        heartbeat: Option<NumberSource>,
    },
    /// `Choice`.
    Choice {
        /// The rules with their Next.
        choices: Vec<ChoiceRule>,
        /// `Default`.
        default: Option<String>,
    },
    /// `Wait`.
    Wait(WaitFor),
    /// `Succeed`.
    Succeed,
    /// `Fail`.
    Fail {
        /// `Error`.
        error: Option<String>,
        /// `ErrorPath` (a path or an intrinsic).
        error_path: Option<String>,
        /// `Cause`.
        cause: Option<String>,
        /// `CausePath` (a path or an intrinsic).
        cause_path: Option<String>,
    },
    /// `Parallel`.
    Parallel {
        /// `Branches`.
        branches: Vec<StateMachine>,
    },
    /// `Map` (inline).
    Map {
        /// `ItemProcessor` (or the legacy `Iterator`).
        processor: Box<StateMachine>,
        /// `ItemsPath` (default `$`; JSONPath).
        items_path: String,
        /// `Items` (JSONata): an array or an expression giving one (default `$states.input`).
        items: Option<Value>,
        /// `ItemSelector` (or the legacy `Parameters`).
        item_selector: Option<Value>,
        /// `MaxConcurrency`, 0 = unlimited.
        max_concurrency: u64,
        /// `ToleratedFailurePercentage`.
        tolerated_percentage: Option<f64>,
        /// `ToleratedFailureCount`.
        tolerated_count: Option<u64>,
        /// `MaxConcurrencyPath`, `ToleratedFailurePercentagePath`, `ToleratedFailureCountPath`:
        /// read from the effective input when the Map starts.
        limit_paths: MapLimitPaths,
    },
}

/// The Map fields that take their value from a path (each excludes its literal field).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MapLimitPaths {
    /// `MaxConcurrencyPath`.
    pub max_concurrency: Option<String>,
    /// `ToleratedFailurePercentagePath`.
    pub tolerated_percentage: Option<String>,
    /// `ToleratedFailureCountPath`.
    pub tolerated_count: Option<String>,
}

/// One state with the data-flow fields every type may use (unused ones stay default).
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// What it does.
    pub kind: Kind,
    /// `InputPath`.
    pub input_path: PathField,
    /// `OutputPath`.
    pub output_path: PathField,
    /// `ResultPath`.
    pub result_path: PathField,
    /// `Parameters` (not for Map, where it is the legacy ItemSelector).
    pub parameters: Option<Value>,
    /// `ResultSelector`.
    pub result_selector: Option<Value>,
    /// `Next`, `None` when the state ends its machine.
    pub next: Option<String>,
    /// `Retry`.
    pub retry: Vec<Retrier>,
    /// `Catch`.
    pub catch: Vec<Catcher>,
    /// The state's query language (its own `QueryLanguage` or its machine's).
    pub query_language: QueryLanguage,
    /// `Arguments` (JSONata): the task's or branches' input (default `$states.input`).
    pub arguments: Option<Value>,
    /// `Output` (JSONata): the state's output (default: the result, or the input for states
    /// without one).
    pub output: Option<Value>,
    /// `Assign`: workflow variables set when the state succeeds.
    pub assign: Option<Value>,
}

impl State {
    /// The Step Functions type name.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Pass { .. } => "Pass",
            Kind::Task { .. } => "Task",
            Kind::Choice { .. } => "Choice",
            Kind::Wait(_) => "Wait",
            Kind::Succeed => "Succeed",
            Kind::Fail { .. } => "Fail",
            Kind::Parallel { .. } => "Parallel",
            Kind::Map { .. } => "Map",
        }
    }
}
