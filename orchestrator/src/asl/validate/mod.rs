//! Parsing and validation of an ASL document. Every problem is reported, each with the JSON
//! location it is about (`/States/Foo/Next`), so a user can fix them all in one pass.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

mod fields;
mod graph;
mod query;
mod variables;

use super::choice;
use super::definition::*;
use super::path;
use graph::unknown_targets;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Severity {
    /// The definition cannot run.
    Error,
    /// The definition runs, but probably not as intended.
    Warning,
}

/// One finding, at a JSON pointer into the document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// JSON pointer (`/States/Foo/Next`), or `line L column C` for invalid JSON.
    pub location: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}: {}", if self.location.is_empty() { "/" } else { &self.location }, self.message)
    }
}

/// A definition that failed validation: every diagnostic (errors and warnings).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid state machine definition:\n{}", .0.iter().map(|d| format!("  {d}")).collect::<Vec<_>>().join("\n"))]
pub struct InvalidDefinition(pub Vec<Diagnostic>);

/// A definition that passed validation: the only input the interpreter accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    /// The parsed machine.
    pub machine: StateMachine,
    /// Findings that do not stop it from running (e.g. a cycle with no exit).
    pub warnings: Vec<Diagnostic>,
}

/// Which Task resources exist: `ember:generate` always, `ember:tool:NAME` for these names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// Registered tool names (without the `ember:tool:` prefix).
    pub tools: BTreeSet<String>,
    /// Accept every `ember:tool:NAME` (a worker running the hops of an execution validated
    /// when it started: a tool it lacks fails that Task, visibly, instead of the hop).
    pub any_tool: bool,
}

impl Resources {
    /// The resources for a set of tool names.
    pub fn with_tools<I: IntoIterator<Item = S>, S: Into<String>>(tools: I) -> Self {
        Self { tools: tools.into_iter().map(Into::into).collect(), any_tool: false }
    }

    /// These resources, accepting any `ember:tool:NAME` as well.
    pub fn with_any_tool(mut self) -> Self {
        self.any_tool = true;
        self
    }

    /// Whether `resource` may be used in a Task.
    pub fn allows(&self, resource: &str) -> bool {
        resource == "ember:generate"
            || resource
                .strip_prefix("ember:tool:")
                .is_some_and(|n| self.tools.contains(n) || (self.any_tool && !n.is_empty()))
    }
}

/// Parses and validates an ASL document (JSONPath query language).
pub fn validate(source: &str, resources: &Resources) -> Result<Definition, InvalidDefinition> {
    let doc: Value = serde_json::from_str(source).map_err(|e| {
        InvalidDefinition(vec![Diagnostic {
            severity: Severity::Error,
            location: format!("line {} column {}", e.line(), e.column()),
            message: format!("invalid JSON: {e}"),
        }])
    })?;
    validate_value(&doc, resources)
}

/// Like [`validate`] for an already parsed document.
pub fn validate_value(doc: &Value, resources: &Resources) -> Result<Definition, InvalidDefinition> {
    let mut v = Validator { resources, diags: Vec::new(), ql: QueryLanguage::JsonPath };
    let machine = v.machine(doc, "", true);
    unknown_targets(doc, "", &mut v.diags);
    if let Some(m) = &machine {
        variables::check(doc, m.query_language, &mut v.diags);
    }
    let has_error = v.diags.iter().any(|d| d.severity == Severity::Error);
    match machine {
        Some(machine) if !has_error => Ok(Definition { machine, warnings: v.diags }),
        _ => Err(InvalidDefinition(v.diags)),
    }
}

struct Validator<'a> {
    resources: &'a Resources,
    diags: Vec<Diagnostic>,
    /// The query language of the machine being read (states inherit it).
    ql: QueryLanguage,
}

fn esc(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

const TOP_FIELDS: &[&str] = &["StartAt", "States", "Comment", "Version", "TimeoutSeconds", "QueryLanguage"];
const BRANCH_FIELDS: &[&str] = &["StartAt", "States", "Comment", "ProcessorConfig"];

fn allowed_fields(ty: &str) -> Option<&'static [&'static str]> {
    Some(match ty {
        "Pass" => &[
            "Type",
            "Comment",
            "InputPath",
            "OutputPath",
            "Next",
            "End",
            "Parameters",
            "Result",
            "ResultPath",
            "QueryLanguage",
        ],
        "Task" => &[
            "Type",
            "Comment",
            "Resource",
            "InputPath",
            "OutputPath",
            "Next",
            "End",
            "Parameters",
            "ResultSelector",
            "ResultPath",
            "Retry",
            "Catch",
            "TimeoutSeconds",
            "TimeoutSecondsPath",
            "HeartbeatSeconds",
            "HeartbeatSecondsPath",
            "QueryLanguage",
        ],
        "Choice" => &["Type", "Comment", "InputPath", "OutputPath", "Choices", "Default", "QueryLanguage"],
        "Wait" => &[
            "Type",
            "Comment",
            "InputPath",
            "OutputPath",
            "Next",
            "End",
            "Seconds",
            "Timestamp",
            "SecondsPath",
            "TimestampPath",
            "QueryLanguage",
        ],
        "Succeed" => &["Type", "Comment", "InputPath", "OutputPath", "QueryLanguage"],
        "Fail" => &["Type", "Comment", "Error", "Cause", "ErrorPath", "CausePath", "QueryLanguage"],
        "Parallel" => &[
            "Type",
            "Comment",
            "Branches",
            "InputPath",
            "OutputPath",
            "Next",
            "End",
            "Parameters",
            "ResultSelector",
            "ResultPath",
            "Retry",
            "Catch",
            "QueryLanguage",
        ],
        "Map" => &[
            "Type",
            "Comment",
            "ItemProcessor",
            "Iterator",
            "ItemsPath",
            "ItemSelector",
            "Parameters",
            "MaxConcurrency",
            "MaxConcurrencyPath",
            "ToleratedFailurePercentage",
            "ToleratedFailurePercentagePath",
            "ToleratedFailureCount",
            "ToleratedFailureCountPath",
            "InputPath",
            "OutputPath",
            "Next",
            "End",
            "ResultSelector",
            "ResultPath",
            "Retry",
            "Catch",
            "Label",
            "QueryLanguage",
        ],
        _ => return None,
    })
}

impl Validator<'_> {
    fn err(&mut self, loc: impl Into<String>, msg: impl Into<String>) {
        self.diags.push(Diagnostic { severity: Severity::Error, location: loc.into(), message: msg.into() });
    }
    fn warn(&mut self, loc: impl Into<String>, msg: impl Into<String>) {
        self.diags.push(Diagnostic { severity: Severity::Warning, location: loc.into(), message: msg.into() });
    }

    fn machine(&mut self, doc: &Value, at: &str, top: bool) -> Option<StateMachine> {
        let Some(obj) = doc.as_object() else {
            self.err(at, "a state machine must be a JSON object");
            return None;
        };
        for k in obj.keys() {
            let ok = if top { TOP_FIELDS } else { BRANCH_FIELDS };
            if !ok.contains(&k.as_str()) {
                self.err(format!("{at}/{}", esc(k)), format!("unknown field '{k}' here (allowed: {})", ok.join(", ")));
            }
        }
        if let Some(q) = obj.get("QueryLanguage") {
            match q.as_str() {
                Some("JSONPath") => self.ql = QueryLanguage::JsonPath,
                Some("JSONata") => self.ql = QueryLanguage::JsonAta,
                _ => self.err(
                    format!("{at}/QueryLanguage"),
                    format!("QueryLanguage must be \"JSONPath\" or \"JSONata\", not {q}"),
                ),
            }
        }
        let timeout_seconds = match obj.get("TimeoutSeconds") {
            None => None,
            Some(v) => match v.as_u64().filter(|n| *n > 0) {
                Some(n) => Some(n),
                None => {
                    self.err(format!("{at}/TimeoutSeconds"), "TimeoutSeconds must be a positive integer");
                    None
                }
            },
        };
        let start_at = obj.get("StartAt").and_then(Value::as_str).map(str::to_string);
        if start_at.is_none() {
            self.err(format!("{at}/StartAt"), "StartAt is required and must be a string naming a state");
        }
        let Some(states_v) = obj.get("States").and_then(Value::as_object).filter(|m| !m.is_empty()) else {
            self.err(format!("{at}/States"), "States is required and must be a non-empty object");
            return None;
        };
        let mut states = BTreeMap::new();
        for (name, sv) in states_v {
            let sat = format!("{at}/States/{}", esc(name));
            if name.is_empty() || name.chars().count() > 80 {
                self.err(&sat, "a state name must be 1 to 80 characters long");
            }
            if let Some(s) = self.state(sv, &sat) {
                states.insert(name.clone(), s);
            }
        }
        let start_at = start_at?;
        if !states_v.contains_key(&start_at) {
            self.err(format!("{at}/StartAt"), format!("StartAt names '{start_at}', which is not a state"));
        }
        self.graph(&start_at, states_v, at);
        Some(StateMachine { start_at, states, timeout_seconds, query_language: self.ql })
    }

    pub(super) fn path_field(&mut self, obj: &Map<String, Value>, key: &str, at: &str, reference: bool) -> PathField {
        match obj.get(key) {
            None => PathField::Default,
            Some(Value::Null) => PathField::Null,
            Some(Value::String(p)) => {
                let r = if reference { path::parse_reference(p).map(|_| ()) } else { path::check_path(p) };
                if let Err(e) = r {
                    self.err(format!("{at}/{key}"), e);
                }
                if p.starts_with("$$") && reference {
                    self.err(format!("{at}/{key}"), format!("{key} cannot write to the context object"));
                }
                PathField::Path(p.clone())
            }
            Some(_) => {
                self.err(format!("{at}/{key}"), format!("{key} must be a path string or null"));
                PathField::Default
            }
        }
    }

    pub(super) fn template(&mut self, obj: &Map<String, Value>, key: &str, at: &str) -> Option<Value> {
        let v = obj.get(key)?;
        let mut problems = Vec::new();
        path::check_template(v, &format!("{at}/{key}"), &mut problems);
        for (l, m) in problems {
            self.err(l, m);
        }
        Some(v.clone())
    }

    pub(super) fn number_source(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        at: &str,
        min: f64,
    ) -> Option<NumberSource> {
        let pkey = format!("{key}Path");
        match (obj.get(key), obj.get(&pkey)) {
            (Some(_), Some(_)) => {
                self.err(format!("{at}/{pkey}"), format!("give {key} or {pkey}, not both"));
                None
            }
            (Some(v), None) => match v.as_f64().filter(|n| *n >= min && n.fract() == 0.0) {
                Some(n) => Some(NumberSource::Value(n)),
                None => {
                    self.err(format!("{at}/{key}"), format!("{key} must be an integer >= {min}"));
                    None
                }
            },
            (None, Some(p)) => match p.as_str() {
                Some(p) => {
                    if let Err(e) = path::check_path(p) {
                        self.err(format!("{at}/{pkey}"), e);
                    }
                    Some(NumberSource::Path(p.to_string()))
                }
                None => {
                    self.err(format!("{at}/{pkey}"), format!("{pkey} must be a path string"));
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn state(&mut self, v: &Value, at: &str) -> Option<State> {
        let Some(obj) = v.as_object() else {
            self.err(at, "a state must be a JSON object");
            return None;
        };
        let Some(ty) = obj.get("Type").and_then(Value::as_str) else {
            self.err(
                format!("{at}/Type"),
                "Type is required (Pass, Task, Choice, Wait, Succeed, Fail, Parallel or Map)",
            );
            return None;
        };
        let Some(allowed) = allowed_fields(ty) else {
            self.err(format!("{at}/Type"), format!("unknown state type '{ty}'"));
            return None;
        };
        let before = self.diags.len();
        let ql = self.state_query_language(obj, at);
        self.check_fields(obj, at, ty, allowed, ql);
        let flows = !matches!(ty, "Choice" | "Succeed" | "Fail");
        let next = obj.get("Next");
        let end = obj.get("End");
        let next = if flows {
            match (next, end) {
                (Some(Value::String(n)), None) => Some(n.clone()),
                (None, Some(Value::Bool(true))) => None,
                (Some(_), Some(_)) => {
                    self.err(format!("{at}/End"), "give Next or End: true, not both");
                    None
                }
                (Some(_), None) => {
                    self.err(format!("{at}/Next"), "Next must be a state name");
                    None
                }
                _ => {
                    self.err(at.to_string(), format!("a {ty} state needs Next or End: true"));
                    None
                }
            }
        } else {
            None
        };
        if ql == QueryLanguage::JsonAta {
            return self.jsonata_state(obj, at, ty, next, before);
        }
        let mut state = State {
            kind: Kind::Succeed,
            input_path: self.path_field(obj, "InputPath", at, false),
            output_path: self.path_field(obj, "OutputPath", at, false),
            result_path: self.path_field(obj, "ResultPath", at, true),
            parameters: self.template(obj, "Parameters", at),
            result_selector: self.template(obj, "ResultSelector", at),
            next,
            retry: self.retriers(obj, at),
            catch: self.catchers(obj, at, ql),
            query_language: ql,
            arguments: None,
            output: None,
            assign: self.assign(obj, at, ql),
        };
        state.kind = match ty {
            "Pass" => Kind::Pass { result: obj.get("Result").cloned() },
            "Task" => {
                let resource = self.task_resource(obj, at);
                let timeout = self.number_source(obj, "TimeoutSeconds", at, 1.0);
                let heartbeat = self.number_source(obj, "HeartbeatSeconds", at, 1.0);
                if let (Some(NumberSource::Value(t)), Some(NumberSource::Value(h))) = (&timeout, &heartbeat) {
                    if h >= t {
                        self.err(
                            format!("{at}/HeartbeatSeconds"),
                            "HeartbeatSeconds must be smaller than TimeoutSeconds",
                        );
                    }
                }
                Kind::Task { resource, timeout, heartbeat }
            }
            "Choice" => self.choice(obj, at, |v, r, rat| {
                let mut problems = Vec::new();
                let rule = choice::parse_rule(r, rat, true, &mut problems);
                for (l, m) in problems {
                    v.err(l, m);
                }
                let assign = r.as_object().and_then(|o| v.assign(o, rat, ql));
                let next = r.get("Next").and_then(Value::as_str)?;
                Some(ChoiceRule { rule: rule?, next: next.to_string(), assign, output: None })
            }),
            "Wait" => {
                let given: Vec<&str> = ["Seconds", "Timestamp", "SecondsPath", "TimestampPath"]
                    .into_iter()
                    .filter(|k| obj.contains_key(*k))
                    .collect();
                if given.len() != 1 {
                    self.err(at.to_string(), format!("a Wait state needs exactly one of Seconds, Timestamp, SecondsPath, TimestampPath (found {given:?})"));
                }
                if let Some(ts) = obj.get("Timestamp") {
                    match ts.as_str() {
                        Some(s) if super::timestamp::parse(s).is_some() => {
                            Kind::Wait(WaitFor::Timestamp(s.to_string()))
                        }
                        _ => {
                            self.err(
                                format!("{at}/Timestamp"),
                                "Timestamp must be an RFC 3339 time like 2026-01-01T00:00:00Z",
                            );
                            Kind::Wait(WaitFor::Seconds(NumberSource::Value(0.0)))
                        }
                    }
                } else if let Some(p) = obj.get("TimestampPath") {
                    let p = p.as_str().unwrap_or("$").to_string();
                    if let Err(e) = path::check_path(&p) {
                        self.err(format!("{at}/TimestampPath"), e);
                    }
                    Kind::Wait(WaitFor::TimestampPath(p))
                } else {
                    Kind::Wait(WaitFor::Seconds(
                        self.number_source(obj, "Seconds", at, 0.0).unwrap_or(NumberSource::Value(0.0)),
                    ))
                }
            }
            "Succeed" => Kind::Succeed,
            "Fail" => {
                let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
                for (a, b) in [("Error", "ErrorPath"), ("Cause", "CausePath")] {
                    if obj.contains_key(a) && obj.contains_key(b) {
                        self.err(format!("{at}/{b}"), format!("give {a} or {b}, not both"));
                    }
                    if let Some(p) = s(b) {
                        let r = if p.starts_with('$') {
                            path::check_path(&p)
                        } else {
                            super::intrinsics::parse(&p).map(|_| ())
                        };
                        if let Err(e) = r {
                            self.err(format!("{at}/{b}"), e);
                        }
                    }
                }
                Kind::Fail {
                    error: s("Error"),
                    error_path: s("ErrorPath"),
                    cause: s("Cause"),
                    cause_path: s("CausePath"),
                }
            }
            "Parallel" => Kind::Parallel { branches: self.branches(obj, at) },
            "Map" => self.map(obj, at, &mut state)?,
            _ => return None,
        };
        if !matches!(ty, "Task" | "Parallel" | "Map") && (obj.contains_key("Retry") || obj.contains_key("Catch")) {
            // already reported as not allowed
        }
        if self.diags[before..].iter().any(|d| d.severity == Severity::Error) {
            return None;
        }
        Some(state)
    }

    fn task_resource(&mut self, obj: &Map<String, Value>, at: &str) -> String {
        let resource = obj.get("Resource").and_then(Value::as_str).unwrap_or_default().to_string();
        if resource.is_empty() {
            self.err(format!("{at}/Resource"), "a Task needs a Resource");
        } else if !self.resources.allows(&resource) {
            let tools: Vec<String> = self.resources.tools.iter().map(|t| format!("ember:tool:{t}")).collect();
            let hint = if resource == "ember:tool:http_get" {
                "; http_get is offered only with --http-allow HOSTS (EMBER_HTTP_ALLOW), the hosts it may reach"
            } else {
                ""
            };
            self.err(
                format!("{at}/Resource"),
                format!(
                    "unknown Task resource '{resource}': use ember:generate or a registered tool ({}){hint}",
                    tools.join(", ")
                ),
            );
        }
        resource
    }

    /// A Choice state: its `Choices` (each read by `rule`, with its JSON location) and
    /// `Default`.
    fn choice(
        &mut self,
        obj: &Map<String, Value>,
        at: &str,
        mut rule: impl FnMut(&mut Self, &Value, &str) -> Option<ChoiceRule>,
    ) -> Kind {
        let mut choices = Vec::new();
        match obj.get("Choices").and_then(Value::as_array).filter(|a| !a.is_empty()) {
            Some(rules) => {
                for (i, r) in rules.iter().enumerate() {
                    if let Some(c) = rule(self, r, &format!("{at}/Choices/{i}")) {
                        choices.push(c);
                    }
                }
            }
            None => self.err(format!("{at}/Choices"), "Choices must be a non-empty array of rules"),
        }
        let default = obj.get("Default").and_then(Value::as_str).map(str::to_string);
        Kind::Choice { choices, default }
    }

    fn branches(&mut self, obj: &Map<String, Value>, at: &str) -> Vec<StateMachine> {
        let mut branches = Vec::new();
        match obj.get("Branches").and_then(Value::as_array).filter(|a| !a.is_empty()) {
            Some(bs) => {
                for (i, b) in bs.iter().enumerate() {
                    if let Some(m) = self.machine(b, &format!("{at}/Branches/{i}"), false) {
                        branches.push(m);
                    }
                }
            }
            None => self.err(format!("{at}/Branches"), "Branches must be a non-empty array of state machines"),
        }
        branches
    }
}
