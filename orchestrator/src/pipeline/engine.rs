//! Runs one state of one hop and decides what comes next. Everything here is a function of
//! the message, the stored execution and the task's result, so the record it produces can
//! be written create-only and replayed.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::hop::*;
use super::tools::{run_task, TaskContext};
use super::{Env, PipelineError};
use crate::asl::choice::Rule;
use crate::asl::definition::{Kind, MapLimitPaths, NumberSource, QueryLanguage, State, StateMachine, WaitFor};
use crate::asl::jsonata::{self, Bindings};
use crate::asl::path::{self, Scope};
use crate::asl::{choice, names, path_numbers, retry, timestamp, StatesError};

/// Longest queue delay (SQS `DelaySeconds` maximum); longer waits re-delay.
pub const MAX_QUEUE_DELAY_SECONDS: f64 = 900.0;

/// Largest hop message: Step Functions' limit on the data a state passes on (256 KiB, beyond
/// which an execution fails with `States.DataLimitExceeded`). A hop message this size also
/// fits in one SQS message (1 MiB), with room to spare.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

enum Step {
    Next { state: String, output: Value, delay: f64, not_before: Option<String> },
    End { output: Value },
    FanOut { fan: FanOut, sends: Vec<Outgoing> },
}

/// The machine a scope runs in (top level, a Parallel branch, a Map item processor).
pub(crate) fn machine_for<'m>(top: &'m StateMachine, scope: &[Frame]) -> Result<&'m StateMachine, PipelineError> {
    let mut m = top;
    for f in scope {
        m = match m.state(&f.state).map(|s| &s.kind) {
            Some(Kind::Parallel { branches }) => branches
                .get(f.index)
                .ok_or_else(|| PipelineError::Corrupt(format!("no branch {} in {}", f.index, f.state)))?,
            Some(Kind::Map { processor, .. }) => processor,
            _ => {
                return Err(PipelineError::Corrupt(format!(
                    "scope names '{}', which is not a Parallel or Map state",
                    f.state
                )))
            }
        };
    }
    Ok(m)
}

pub(crate) struct HopRun<'a> {
    pub env: &'a Env,
    pub meta: &'a ExecutionMeta,
    pub top: &'a StateMachine,
    pub msg: &'a HopMessage,
    pub now_ms: u64,
    pub events: Vec<RecordedEvent>,
    /// The variables after this state's `Assign` (`None`: unchanged), for the next hop.
    pub assigned: Option<Map<String, Value>>,
    /// When this run of the execution started (its start, or its latest redrive's).
    pub run_start_ms: u64,
}

/// Largest value one variable may hold, and all of one `Assign` together (Step Functions'
/// limits).
const MAX_VARIABLE_BYTES: usize = 256 * 1024;

fn ts(ms: u64) -> String {
    timestamp::format(UNIX_EPOCH + Duration::from_millis(ms))
}

impl HopRun<'_> {
    /// A JSONPath scope over `input` with this hop's variables.
    fn scope<'s>(&'s self, input: &'s Value, context: &'s Value) -> Scope<'s> {
        Scope { input, context, vars: Some(&self.msg.vars) }
    }

    /// JSONata bindings: `$states` and this hop's variables.
    fn bindings<'s>(&'s self, states: &'s Value) -> Bindings<'s> {
        Bindings { states, vars: &self.msg.vars }
    }

    /// Sets variables: the values are computed from the variables as they were when the
    /// state was entered (all of one Assign, and the state's Output, see the old values).
    fn set_variables(&mut self, values: Value) -> Result<(), StatesError> {
        let Value::Object(values) = values else { return Ok(()) };
        let total = serde_json::to_vec(&values).map(|b| b.len()).unwrap_or(0);
        if total > MAX_VARIABLE_BYTES {
            return Err(StatesError::new(
                names::DATA_LIMIT_EXCEEDED,
                format!("The variables assigned by state '{}' total {total} bytes, more than the limit of {MAX_VARIABLE_BYTES}", self.msg.state),
            ));
        }
        let mut vars = self.msg.vars.clone();
        vars.extend(values);
        self.assigned = Some(vars);
        Ok(())
    }

    /// JSONPath `Assign`: `.$` keys read `data` (the state's result, or its input for states
    /// without one), `$$` and the variables.
    fn assign_jsonpath(&mut self, assign: &Option<Value>, data: &Value, ctx: &Value) -> Result<(), StatesError> {
        let Some(a) = assign else { return Ok(()) };
        let values = path::eval_template(a, &self.scope(data, ctx))?;
        self.set_variables(values)
    }

    /// JSONata `Assign` and `Output` of a state, both evaluated against the variables as they
    /// were when it was entered. `Output` defaults to `default` (the result, or the input).
    fn assign_and_output(
        &mut self,
        assign: &Option<Value>,
        output: &Option<Value>,
        states: &Value,
        default: Value,
    ) -> Result<Value, StatesError> {
        let values = assign.as_ref().map(|a| jsonata::eval_template(a, "Assign", self.bindings(states))).transpose()?;
        let out = match output {
            Some(o) => jsonata::eval_template(o, "Output", self.bindings(states))?,
            None => default,
        };
        if let Some(v) = values {
            self.set_variables(v)?;
        }
        Ok(out)
    }

    fn event(&mut self, kind: &str, details: Value) {
        self.events.push(RecordedEvent { kind: kind.to_string(), timestamp: ts(self.now_ms), details });
    }

    fn context(&self, state: &State) -> Value {
        let mut c = json!({
            "Execution": {
                "Id": self.meta.id,
                "Input": self.meta.input,
                "Name": self.meta.name,
                "StartTime": self.meta.start_time,
                "RoleArn": "arn:ember:iam::role/ember-pipelines",
                "RedriveCount": self.msg.redrive,
            },
            "State": {
                "Name": self.msg.state,
                "EnteredTime": self.msg.entered_time.clone().unwrap_or_else(|| ts(self.now_ms)),
            },
            "StateMachine": {"Id": self.meta.state_machine_id, "Name": self.meta.state_machine_id},
        });
        // Only states that can retry have a retry count (recorded on AWS: a Task's context
        // has State.RetryCount, a Pass's has none).
        if matches!(state.kind, Kind::Task { .. } | Kind::Parallel { .. } | Kind::Map { .. }) {
            c["State"]["RetryCount"] = json!(self.msg.attempt);
        }
        if matches!(state.kind, Kind::Task { .. }) {
            c["Task"] = json!({"Token": self.msg.id()});
        }
        c
    }

    /// Builds the transition for this hop (running the task if it is a Task state).
    pub async fn transition(mut self) -> Result<Transition, PipelineError> {
        let machine = machine_for(self.top, &self.msg.scope)?;
        let state = machine
            .state(&self.msg.state)
            .ok_or_else(|| PipelineError::Corrupt(format!("no state '{}' in this scope", self.msg.state)))?;
        // A redrive continues the hop count and gets a fresh allowance, as it gets a fresh
        // TimeoutSeconds.
        let max = self.env.options.max_hops.saturating_mul(u64::from(self.msg.redrive) + 1);
        let deadline = self.top.timeout_seconds.map(|t| self.run_start_ms + t * 1000);
        // Execution-wide limits end the execution: no Retry or Catch applies.
        let mut fatal = false;
        let step = if self.msg.hop > max {
            fatal = true;
            Err(StatesError::runtime(format!(
                "The execution exceeded the maximum of {max} hops (state '{}'); a loop without an exit?",
                self.msg.state
            )))
        } else if deadline.is_some_and(|d| self.now_ms > d) {
            fatal = true;
            Err(StatesError::new(
                names::TIMEOUT,
                format!("The execution ran longer than its TimeoutSeconds ({})", self.top.timeout_seconds.unwrap_or(0)),
            ))
        } else {
            if self.msg.attempt == 0 && self.msg.join.is_none() {
                self.event(
                    &format!("{}StateEntered", state.type_name()),
                    json!({"name": self.msg.state, "input": self.msg.input}),
                );
            }
            self.run_state(state).await
        };
        let mut t = Transition {
            message: self.msg.clone(),
            events: Vec::new(),
            sends: Vec::new(),
            branch_done: None,
            end: None,
            fan_out: None,
            time_ms: self.now_ms,
        };
        match step {
            Ok(Step::Next { state: next, output, delay, not_before }) => {
                self.event(
                    &format!("{}StateExited", state.type_name()),
                    json!({"name": self.msg.state, "output": output}),
                );
                t.sends.push(Outgoing { message: self.next_message(&next, output), delay_seconds: delay });
                if let Some(nb) = not_before {
                    t.sends[0].message.not_before = Some(nb);
                }
            }
            Ok(Step::End { output }) => {
                self.event(
                    &format!("{}StateExited", state.type_name()),
                    json!({"name": self.msg.state, "output": output}),
                );
                self.terminal(&mut t, Ok(output)).await?;
            }
            Ok(Step::FanOut { fan, sends }) => {
                t.fan_out = Some(fan);
                t.sends = sends;
            }
            Err(e) if fatal => self.terminal(&mut t, Err(e)).await?,
            Err(e) => self.handle_error(state, e, &mut t).await?,
        }
        // A hop's data must stay within Step Functions' payload limit.
        if let Some(big) = t
            .sends
            .iter()
            .map(|o| serde_json::to_vec(&o.message).map(|b| b.len()).unwrap_or(0))
            .find(|n| *n > MAX_PAYLOAD_BYTES)
        {
            t.sends.clear();
            self.terminal(
                &mut t,
                Err(StatesError::new(
                    names::DATA_LIMIT_EXCEEDED,
                    format!("The state/task '{}' returned a result with a size exceeding the maximum number of bytes service limit ({big} > {MAX_PAYLOAD_BYTES})", self.msg.state),
                )),
            )
            .await?;
        }
        t.events = self.events;
        Ok(t)
    }

    fn next_message(&self, state: &str, input: Value) -> HopMessage {
        HopMessage {
            execution: self.msg.execution.clone(),
            state: state.to_string(),
            input,
            hop: self.msg.hop + 1,
            attempt: 0,
            retries: Vec::new(),
            scope: self.msg.scope.clone(),
            entered_time: None,
            not_before: None,
            join: None,
            vars: self.assigned.clone().unwrap_or_else(|| self.msg.vars.clone()),
            redrive: self.msg.redrive,
        }
    }

    async fn terminal(&mut self, t: &mut Transition, result: Result<Value, StatesError>) -> Result<(), PipelineError> {
        if self.msg.scope.is_empty() {
            match &result {
                Ok(o) => self.event("ExecutionSucceeded", json!({"output": o})),
                Err(e) => self.event("ExecutionFailed", e.details()),
            }
            t.end = Some(ExecutionEnd { result, stop_time: ts(self.now_ms) });
            return Ok(());
        }
        t.branch_done = Some(BranchResult { result, last_hop: self.msg.hop });
        // A Map with MaxConcurrency: this item's end starts item index + MaxConcurrency.
        let Some(frame) = self.msg.scope.last() else { return Ok(()) };
        let parent = &self.msg.scope[..self.msg.scope.len() - 1];
        let fan = super::process::load_transition(self.env, &self.msg.records(), parent, frame.hop).await?;
        if let Some(f) = fan.fan_out {
            let next = frame.index + f.max_concurrency;
            if f.max_concurrency > 0 && next < f.count {
                let input = f.pending.get(next - f.max_concurrency).cloned().unwrap_or(Value::Null);
                let machine = machine_for(self.top, &self.msg.scope)?;
                let mut scope = self.msg.scope.clone();
                if let Some(last) = scope.last_mut() {
                    last.index = next;
                }
                let message =
                    branch_start(self.msg, scope, frame.hop + 1, &machine.start_at, input, fan.message.vars.clone());
                t.sends.push(Outgoing { message, delay_seconds: 0.0 });
            }
        }
        Ok(())
    }

    async fn handle_error(&mut self, state: &State, e: StatesError, t: &mut Transition) -> Result<(), PipelineError> {
        if !e.is_terminal() {
            if let Some((i, r)) =
                state.retry.iter().enumerate().find(|(_, r)| r.error_equals.iter().any(|n| e.matches(n)))
            {
                let used = self.msg.retries.get(i).copied().unwrap_or(0);
                if used < r.max_attempts {
                    let sample: f64 = rand::random();
                    let delay = retry::jittered_delay(r, used, sample);
                    let mut m = self.msg.clone();
                    m.hop += 1;
                    m.attempt += 1;
                    m.join = None;
                    if m.retries.len() <= i {
                        m.retries.resize(i + 1, 0);
                    }
                    m.retries[i] += 1;
                    m.entered_time = Some(self.msg.entered_time.clone().unwrap_or_else(|| ts(self.now_ms)));
                    self.event(
                        "RetryScheduled",
                        json!({"name": self.msg.state, "error": e.error, "cause": e.cause, "retrier": i, "retryCount": used + 1, "delaySeconds": delay}),
                    );
                    if delay > MAX_QUEUE_DELAY_SECONDS {
                        m.not_before = Some(ts(self.now_ms + (delay * 1000.0).round() as u64));
                    }
                    t.sends.push(Outgoing { message: m, delay_seconds: delay.min(MAX_QUEUE_DELAY_SECONDS) });
                    return Ok(());
                }
            }
            if let Some(c) = state.catch.iter().find(|c| c.error_equals.iter().any(|n| e.matches(n))) {
                let err_obj = json!({"Error": e.error, "Cause": e.cause});
                let ctx = self.context(state);
                // Whatever the failed state assigned is dropped; the catcher's Assign applies.
                self.assigned = None;
                let caught = match state.query_language {
                    QueryLanguage::JsonPath => self
                        .assign_jsonpath(&c.assign, &err_obj, &ctx)
                        .and_then(|_| path::apply_result_path(&self.msg.input, err_obj, c.result_path.get())),
                    QueryLanguage::JsonAta => {
                        let states = json!({"input": self.msg.input, "context": ctx, "errorOutput": err_obj});
                        self.assign_and_output(&c.assign, &c.output, &states, err_obj.clone())
                    }
                };
                match caught {
                    Ok(output) => {
                        self.event(
                            &format!("{}StateExited", state.type_name()),
                            json!({"name": self.msg.state, "output": output, "caught": e.error}),
                        );
                        t.sends.push(Outgoing { message: self.next_message(&c.next, output), delay_seconds: 0.0 });
                        return Ok(());
                    }
                    Err(e2) => return self.terminal(t, Err(e2)).await,
                }
            }
        }
        self.terminal(t, Err(e)).await
    }

    fn effective_input(&self, state: &State, ctx: &Value) -> Result<Value, StatesError> {
        let scope = self.scope(&self.msg.input, ctx);
        match state.input_path.get() {
            None => Ok(json!({})),
            Some(p) => path::query(p, &scope),
        }
    }

    fn output(&self, state: &State, raw: &Value, result: Value, ctx: &Value) -> Result<Value, StatesError> {
        let combined = path::apply_result_path(raw, result, state.result_path.get())?;
        match state.output_path.get() {
            None => Ok(json!({})),
            Some(p) => path::query(p, &self.scope(&combined, ctx)),
        }
    }

    fn flow(&self, state: &State, output: Value) -> Step {
        match &state.next {
            Some(n) => Step::Next { state: n.clone(), output, delay: 0.0, not_before: None },
            None => Step::End { output },
        }
    }

    fn number(&self, src: &NumberSource, input: &Value, ctx: &Value, what: &str) -> Result<f64, StatesError> {
        match src {
            NumberSource::Value(v) => Ok(*v),
            NumberSource::Path(p) => {
                let v = path::query(p, &self.scope(input, ctx))?;
                v.as_f64().filter(|n| *n >= 0.0).ok_or_else(|| {
                    StatesError::runtime(format!("{what} path '{p}' must point to a non-negative number, found {v}"))
                })
            }
            NumberSource::Expr(e) => {
                let field = what.strip_suffix("Path").unwrap_or(what);
                let states = json!({"input": self.msg.input, "context": ctx});
                let v = jsonata::evaluate(e, field, self.bindings(&states))?;
                v.as_f64().filter(|n| *n >= 0.0 && n.fract() == 0.0).ok_or_else(|| {
                    StatesError::new(
                        names::QUERY_EVALUATION_ERROR,
                        format!("The JSONata expression '{e}' specified for the field '{field}' must give a non-negative integer, found {v}"),
                    )
                })
            }
        }
    }

    async fn run_state(&mut self, state: &State) -> Result<Step, StatesError> {
        let ctx = self.context(state);
        let raw = self.msg.input.clone();
        if let Some(fan_hop) = self.msg.join {
            return self.join(state, fan_hop, &raw, &ctx).await;
        }
        if state.query_language == QueryLanguage::JsonAta {
            return self.run_jsonata(state, &ctx).await;
        }
        match &state.kind {
            Kind::Pass { result } => {
                let eff = self.effective_input(state, &ctx)?;
                let res = match (&state.parameters, result) {
                    (Some(p), _) => path::eval_template(p, &self.scope(&eff, &ctx))?,
                    (None, Some(r)) => r.clone(),
                    (None, None) => eff,
                };
                self.assign_jsonpath(&state.assign, &res, &ctx)?;
                Ok(self.flow(state, self.output(state, &raw, res, &ctx)?))
            }
            Kind::Task { resource, timeout, heartbeat } => {
                let eff = self.effective_input(state, &ctx)?;
                let params = match &state.parameters {
                    Some(p) => path::eval_template(p, &self.scope(&eff, &ctx))?,
                    None => eff,
                };
                let result = self.call_task(resource, params, timeout, heartbeat, &ctx).await?;
                self.assign_jsonpath(&state.assign, &result, &ctx)?;
                let selected = match &state.result_selector {
                    Some(sel) => path::eval_template(sel, &self.scope(&result, &ctx))?,
                    None => result,
                };
                Ok(self.flow(state, self.output(state, &raw, selected, &ctx)?))
            }
            Kind::Choice { choices, default } => {
                let eff = self.effective_input(state, &ctx)?;
                let mut matched = None;
                for c in choices {
                    if choice::eval(&c.rule, &self.scope(&eff, &ctx))? {
                        matched = Some(c);
                        break;
                    }
                }
                let next = match (matched, default) {
                    (Some(c), _) => {
                        self.assign_jsonpath(&c.assign, &eff, &ctx)?;
                        c.next.clone()
                    }
                    (None, Some(d)) => {
                        self.assign_jsonpath(&state.assign, &eff, &ctx)?;
                        d.clone()
                    }
                    (None, None) => return Err(self.no_choice_matched()),
                };
                let output = match state.output_path.get() {
                    None => json!({}),
                    Some(p) => path::query(p, &self.scope(&eff, &ctx))?,
                };
                Ok(Step::Next { state: next, output, delay: 0.0, not_before: None })
            }
            Kind::Wait(w) => {
                let eff = self.effective_input(state, &ctx)?;
                let now_s = self.now_ms as f64 / 1000.0;
                let scope = self.scope(&eff, &ctx);
                let seconds = match w {
                    WaitFor::Seconds(NumberSource::Value(v)) => *v,
                    WaitFor::Seconds(NumberSource::Path(p)) => match path::query_opt(p, &scope)? {
                        Some(v) => path_numbers::wait_seconds(&v, p)?,
                        None => return Err(path_numbers::wait_seconds_missing(p)),
                    },
                    WaitFor::Seconds(NumberSource::Expr(_)) | WaitFor::TimestampExpr(_) => {
                        return Err(StatesError::runtime("a JSONata expression in a JSONPath Wait state"))
                    }
                    WaitFor::Timestamp(t) => (timestamp::parse(t).unwrap_or(now_s) - now_s).max(0.0),
                    WaitFor::TimestampPath(p) => {
                        let v = path::query(p, &scope)?;
                        let t = v.as_str().and_then(timestamp::parse).ok_or_else(|| {
                            let shown = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                            StatesError::runtime(format!("The TimestampPath parameter does not reference a valid ISO-8601 extended offset date-time format string: {p} == {shown}"))
                        })?;
                        (t - now_s).max(0.0)
                    }
                };
                let seconds = path_numbers::check_wait_length(seconds)?;
                let output = match state.output_path.get() {
                    None => json!({}),
                    Some(p) => path::query(p, &self.scope(&eff, &ctx))?,
                };
                self.assign_jsonpath(&state.assign, &eff, &ctx)?;
                Ok(self.wait_step(state, seconds, output))
            }
            Kind::Succeed => {
                let eff = self.effective_input(state, &ctx)?;
                let output = match state.output_path.get() {
                    None => json!({}),
                    Some(p) => path::query(p, &self.scope(&eff, &ctx))?,
                };
                Ok(Step::End { output })
            }
            Kind::Fail { error, error_path, cause, cause_path } => {
                let scope = self.scope(&raw, &ctx);
                let eval = |lit: &Option<String>,
                            p: &Option<String>,
                            field: &str|
                 -> Result<Option<String>, StatesError> {
                    match (lit, p) {
                        (Some(l), _) => Ok(Some(l.clone())),
                        (None, Some(p)) => {
                            let v = path::eval_expression(p, field, &scope)?;
                            v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| {
                                StatesError::runtime(format!("The {field} '{p}' must resolve to a string, found {v}"))
                            })
                        }
                        (None, None) => Ok(None),
                    }
                };
                let error = eval(error, error_path, "ErrorPath")?;
                let cause = eval(cause, cause_path, "CausePath")?;
                // Without Error or Cause the execution ends with none: an empty string, which
                // DescribeExecution and the ExecutionFailed event leave out, as AWS does.
                Err(StatesError::new(error.unwrap_or_default(), cause.unwrap_or_default()))
            }
            Kind::Parallel { branches } => {
                let eff = self.effective_input(state, &ctx)?;
                let input = match &state.parameters {
                    Some(p) => path::eval_template(p, &self.scope(&eff, &ctx))?,
                    None => eff,
                };
                Ok(self.fan_out_branches(branches, input))
            }
            Kind::Map {
                processor,
                items_path,
                item_selector,
                max_concurrency,
                tolerated_percentage,
                tolerated_count,
                limit_paths,
                ..
            } => {
                let eff = self.effective_input(state, &ctx)?;
                let scope = self.scope(&eff, &ctx);
                let literal = (*max_concurrency, *tolerated_percentage, *tolerated_count);
                let limits = map_limits(literal, limit_paths, |p, _| Ok((path::query(p, &scope)?, p.to_string())))?;
                let items = path::query(items_path, &scope)?;
                let Value::Array(items) = items else {
                    return Err(StatesError::runtime(format!(
                        "Map ItemsPath '{items_path}' must point to an array, found {items}"
                    )));
                };
                let mut inputs = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    inputs.push(match item_selector {
                        Some(sel) => {
                            let c = item_context(&ctx, i, item);
                            path::eval_template(sel, &self.scope(&eff, &c))?
                        }
                        None => item.clone(),
                    });
                }
                self.start_map(state, &processor.start_at, limits, inputs, &raw, &ctx)
            }
        }
    }

    /// Runs a Task's resource with its timeouts, recording the task events.
    async fn call_task(
        &mut self,
        resource: &str,
        params: Value,
        timeout: &Option<NumberSource>,
        heartbeat: &Option<NumberSource>,
        ctx: &Value,
    ) -> Result<Value, StatesError> {
        let raw = self.msg.input.clone();
        let timeout = timeout.as_ref().map(|t| self.number(t, &raw, ctx, "TimeoutSecondsPath")).transpose()?;
        let heartbeat = heartbeat.as_ref().map(|t| self.number(t, &raw, ctx, "HeartbeatSecondsPath")).transpose()?;
        self.event("TaskScheduled", json!({"resource": resource, "parameters": params, "timeoutInSeconds": timeout, "heartbeatInSeconds": heartbeat}));
        let tctx = TaskContext::new(&self.msg.execution, &self.msg.state, &self.msg.id(), self.msg.attempt);
        self.event("TaskStarted", json!({"resource": resource}));
        let result = run_task(self.env.runner.as_ref(), resource, params, &tctx, timeout, heartbeat).await;
        let result = match result {
            Ok(v) => v,
            Err(e) => {
                let kind = if e.error == names::TIMEOUT || e.error == names::HEARTBEAT_TIMEOUT {
                    "TaskTimedOut"
                } else {
                    "TaskFailed"
                };
                self.event(kind, json!({"resource": resource, "error": e.error, "cause": e.cause}));
                return Err(StatesError::new(e.error, e.cause));
            }
        };
        self.event("TaskSucceeded", json!({"resource": resource, "output": result}));
        Ok(result)
    }

    /// Runs a JSONata state: `Arguments` and `Output` with `$states`, `Assign`, `Condition`,
    /// `Items`/`ItemSelector`, and expressions in the number, time and Fail fields.
    async fn run_jsonata(&mut self, state: &State, ctx: &Value) -> Result<Step, StatesError> {
        let input = self.msg.input.clone();
        let states = json!({"input": input, "context": ctx});
        let arguments = |run: &Self| match &state.arguments {
            Some(a) => jsonata::eval_template(a, "Arguments", run.bindings(&states)),
            None => Ok(input.clone()),
        };
        match &state.kind {
            Kind::Pass { .. } => {
                let output = self.assign_and_output(&state.assign, &state.output, &states, input.clone())?;
                Ok(self.flow(state, output))
            }
            Kind::Task { resource, timeout, heartbeat } => {
                let params = arguments(self)?;
                let result = self.call_task(resource, params, timeout, heartbeat, ctx).await?;
                let states = json!({"input": input, "context": ctx, "result": result});
                let output = self.assign_and_output(&state.assign, &state.output, &states, result)?;
                Ok(self.flow(state, output))
            }
            Kind::Choice { choices, default } => {
                for c in choices {
                    let holds = match &c.rule {
                        Rule::Condition(Value::Bool(b)) => *b,
                        Rule::Condition(cond) => {
                            match jsonata::eval_template(cond, "Condition", self.bindings(&states))? {
                                Value::Bool(b) => b,
                                other => {
                                    return Err(StatesError::new(
                                        names::QUERY_EVALUATION_ERROR,
                                        format!(
                                        "The Condition field of state '{}' must give a boolean, but it gave {other}",
                                        self.msg.state
                                    ),
                                    ))
                                }
                            }
                        }
                        _ => false,
                    };
                    if holds {
                        let output = self.assign_and_output(&c.assign, &c.output, &states, input.clone())?;
                        return Ok(Step::Next { state: c.next.clone(), output, delay: 0.0, not_before: None });
                    }
                }
                let Some(next) = default else { return Err(self.no_choice_matched()) };
                let output = self.assign_and_output(&state.assign, &state.output, &states, input.clone())?;
                Ok(Step::Next { state: next.clone(), output, delay: 0.0, not_before: None })
            }
            Kind::Wait(w) => {
                let now_s = self.now_ms as f64 / 1000.0;
                let seconds = match w {
                    WaitFor::Seconds(s) => self.number(s, &input, ctx, "Seconds")?,
                    WaitFor::Timestamp(t) => (timestamp::parse(t).unwrap_or(now_s) - now_s).max(0.0),
                    WaitFor::TimestampExpr(e) => {
                        let v = jsonata::evaluate(e, "Timestamp", self.bindings(&states))?;
                        let t = v.as_str().and_then(timestamp::parse).ok_or_else(|| {
                            StatesError::new(
                                names::QUERY_EVALUATION_ERROR,
                                format!("The JSONata expression '{e}' specified for the field 'Timestamp' must give an ISO-8601 extended offset date-time string, but it gave {v}"),
                            )
                        })?;
                        (t - now_s).max(0.0)
                    }
                    WaitFor::TimestampPath(_) => return Err(StatesError::runtime("TimestampPath in a JSONata state")),
                };
                let seconds = path_numbers::check_wait_length(seconds)?;
                let output = self.assign_and_output(&state.assign, &state.output, &states, input.clone())?;
                Ok(self.wait_step(state, seconds, output))
            }
            Kind::Succeed => {
                let output = self.assign_and_output(&None, &state.output, &states, input.clone())?;
                Ok(Step::End { output })
            }
            Kind::Fail { error, cause, .. } => {
                let text = |field: &str, v: &Option<String>| -> Result<String, StatesError> {
                    let Some(v) = v else { return Ok(String::new()) };
                    match jsonata::eval_template(&Value::String(v.clone()), field, self.bindings(&states))? {
                        Value::String(s) => Ok(s),
                        other => Err(StatesError::new(
                            names::QUERY_EVALUATION_ERROR,
                            format!(
                                "The {field} field of state '{}' must give a string, but it gave {other}",
                                self.msg.state
                            ),
                        )),
                    }
                };
                let (error, cause) = (text("Error", error)?, text("Cause", cause)?);
                Err(StatesError::new(error, cause))
            }
            Kind::Parallel { branches } => {
                let input = arguments(self)?;
                Ok(self.fan_out_branches(branches, input))
            }
            Kind::Map {
                processor,
                items,
                item_selector,
                max_concurrency,
                tolerated_percentage,
                tolerated_count,
                limit_paths,
                ..
            } => {
                // JSONata limits are `{% %}` expressions, kept where JSONPath keeps its paths.
                let literal = (*max_concurrency, *tolerated_percentage, *tolerated_count);
                let limits = map_limits(literal, limit_paths, |e, field| {
                    let v = jsonata::eval_template(&Value::String(e.to_string()), field, self.bindings(&states))?;
                    Ok((v, field.to_string()))
                })?;
                let list = match items {
                    Some(i) => jsonata::eval_template(i, "Items", self.bindings(&states))?,
                    None => input.clone(),
                };
                let Value::Array(list) = list else {
                    return Err(StatesError::new(
                        names::QUERY_EVALUATION_ERROR,
                        format!("The Items of Map state '{}' must be an array, but they are {list}", self.msg.state),
                    ));
                };
                let mut inputs = Vec::with_capacity(list.len());
                for (i, item) in list.into_iter().enumerate() {
                    inputs.push(match item_selector {
                        Some(sel) => {
                            let item_states = json!({"input": input, "context": item_context(ctx, i, &item)});
                            jsonata::eval_template(sel, "ItemSelector", self.bindings(&item_states))?
                        }
                        None => item,
                    });
                }
                self.start_map(state, &processor.start_at, limits, inputs, &input, ctx)
            }
        }
    }

    /// Starts a Parallel's branches, each with `input`.
    fn fan_out_branches(&mut self, branches: &[StateMachine], input: Value) -> Step {
        self.event("ParallelStateStarted", json!({"name": self.msg.state, "branches": branches.len()}));
        let sends = branches
            .iter()
            .enumerate()
            .map(|(i, b)| Outgoing { message: self.branch_message(i, &b.start_at, input.clone()), delay_seconds: 0.0 })
            .collect();
        let fan = FanOut {
            count: branches.len(),
            pending: Vec::new(),
            max_concurrency: 0,
            tolerated_percentage: None,
            tolerated_count: None,
        };
        Step::FanOut { fan, sends }
    }

    /// A Wait's next step: the next hop delayed by `seconds` (re-delayed past the queue's
    /// longest delay), or the end now if the Wait ends its machine.
    fn wait_step(&mut self, state: &State, seconds: f64, output: Value) -> Step {
        let until_ms = self.now_ms + (seconds * 1000.0).round() as u64;
        self.event("WaitScheduled", json!({"name": self.msg.state, "seconds": seconds, "until": ts(until_ms)}));
        let (delay, not_before) = if seconds > MAX_QUEUE_DELAY_SECONDS {
            (MAX_QUEUE_DELAY_SECONDS, Some(ts(until_ms)))
        } else {
            (seconds, None)
        };
        match &state.next {
            Some(n) => Step::Next { state: n.clone(), output, delay, not_before },
            // A Wait that ends its machine: its end takes effect now; there is no next hop to delay.
            None => Step::End { output },
        }
    }

    /// Starts a Map on its item inputs (an empty Map ends at once with `[]`).
    fn start_map(
        &mut self,
        state: &State,
        start: &str,
        limits: (u64, Option<f64>, Option<u64>),
        inputs: Vec<Value>,
        raw: &Value,
        ctx: &Value,
    ) -> Result<Step, StatesError> {
        self.event("MapStateStarted", json!({"name": self.msg.state, "length": inputs.len()}));
        if inputs.is_empty() {
            return self.after_join(state, Vec::new(), raw, ctx);
        }
        Ok(self.fan_out_items(start, limits, inputs))
    }

    /// Starts a Map's items: all of them, or the first `MaxConcurrency` (0 = no limit) with
    /// the rest kept for each finishing item to start the next. `limits`: MaxConcurrency and
    /// the tolerated failure percentage and count, as resolved when the Map started.
    fn fan_out_items(&self, start: &str, limits: (u64, Option<f64>, Option<u64>), inputs: Vec<Value>) -> Step {
        let (max_concurrency, tolerated_percentage, tolerated_count) = limits;
        let k = usize::try_from(max_concurrency).unwrap_or(usize::MAX).min(inputs.len());
        let first = if k == 0 { inputs.len() } else { k };
        let pending = if k == 0 { Vec::new() } else { inputs[first..].to_vec() };
        let sends = inputs
            .iter()
            .take(first)
            .enumerate()
            .map(|(i, v)| Outgoing { message: self.branch_message(i, start, v.clone()), delay_seconds: 0.0 })
            .collect();
        let fan = FanOut { count: inputs.len(), pending, max_concurrency: k, tolerated_percentage, tolerated_count };
        Step::FanOut { fan, sends }
    }

    fn no_choice_matched(&self) -> StatesError {
        StatesError::new(
            names::NO_CHOICE_MATCHED,
            format!("No Matches! (state '{}' has no matching rule and no Default)", self.msg.state),
        )
    }

    fn branch_message(&self, index: usize, start: &str, input: Value) -> HopMessage {
        let mut scope = self.msg.scope.clone();
        scope.push(Frame { state: self.msg.state.clone(), hop: self.msg.hop, index });
        branch_start(self.msg, scope, self.msg.hop + 1, start, input, self.msg.vars.clone())
    }

    async fn join(&mut self, state: &State, fan_hop: u64, raw: &Value, ctx: &Value) -> Result<Step, StatesError> {
        let storage = |e: PipelineError| StatesError::runtime(format!("could not read the branch results: {e}"));
        let marker = super::process::load_join(self.env, &self.msg.records(), &self.msg.scope, fan_hop)
            .await
            .map_err(storage)?;
        let kind = state.type_name();
        if let Some(f) = marker.and_then(|m| m.failure) {
            self.event(
                &format!("{kind}StateFailed"),
                json!({"name": self.msg.state, "error": f.error, "cause": f.cause}),
            );
            return Err(f);
        }
        let results = super::process::load_results(self.env, &self.msg.records(), &self.msg.scope, fan_hop)
            .await
            .map_err(storage)?;
        let outputs = results
            .into_iter()
            .map(|r| match r.result {
                Ok(v) => v,
                Err(e) => json!({"Error": e.error, "Cause": e.cause}),
            })
            .collect();
        self.event(&format!("{kind}StateSucceeded"), json!({"name": self.msg.state}));
        self.after_join(state, outputs, raw, ctx)
    }

    fn after_join(
        &mut self,
        state: &State,
        outputs: Vec<Value>,
        raw: &Value,
        ctx: &Value,
    ) -> Result<Step, StatesError> {
        let result = Value::Array(outputs);
        if state.query_language == QueryLanguage::JsonAta {
            let states = json!({"input": raw, "context": ctx, "result": result});
            let output = self.assign_and_output(&state.assign, &state.output, &states, result)?;
            return Ok(self.flow(state, output));
        }
        self.assign_jsonpath(&state.assign, &result, ctx)?;
        let selected = match &state.result_selector {
            Some(sel) => path::eval_template(sel, &self.scope(&result, ctx))?,
            None => result,
        };
        Ok(self.flow(state, self.output(state, raw, selected, ctx)?))
    }
}

/// The context object of Map item `index` (`$$.Map.Item`).
fn item_context(ctx: &Value, index: usize, item: &Value) -> Value {
    let mut c = ctx.clone();
    c["Map"] = json!({"Item": {"Index": index, "Value": item}});
    c
}

/// A Map's MaxConcurrency and tolerated failure percentage and count: the literals, or the
/// values their `*Path` (JSONPath) or expression (JSONata) gives through `read(source,
/// field)`, which answers the value and how to name where it came from in an error.
fn map_limits(
    literal: (u64, Option<f64>, Option<u64>),
    from: &MapLimitPaths,
    mut read: impl FnMut(&str, &str) -> Result<(Value, String), StatesError>,
) -> Result<(u64, Option<f64>, Option<u64>), StatesError> {
    let (mut max_concurrency, mut tolerated_percentage, mut tolerated_count) = literal;
    if let Some(p) = &from.max_concurrency {
        let (v, at) = read(p, "MaxConcurrency")?;
        max_concurrency = path_numbers::max_concurrency(&v, &at)?;
    }
    if let Some(p) = &from.tolerated_percentage {
        let (v, at) = read(p, "ToleratedFailurePercentage")?;
        tolerated_percentage = Some(path_numbers::tolerated_percentage(&v, &at)?);
    }
    if let Some(p) = &from.tolerated_count {
        let (v, at) = read(p, "ToleratedFailureCount")?;
        tolerated_count = Some(path_numbers::tolerated_count(&v, &at)?);
    }
    Ok((max_concurrency, tolerated_percentage, tolerated_count))
}

/// The first hop of a Parallel branch or a Map item: state `start` of the branch at `scope`
/// (of the execution and redrive of `from`, the fan-out's hop).
fn branch_start(
    from: &HopMessage,
    scope: Vec<Frame>,
    hop: u64,
    start: &str,
    input: Value,
    vars: Map<String, Value>,
) -> HopMessage {
    HopMessage {
        execution: from.execution.clone(),
        state: start.to_string(),
        input,
        hop,
        attempt: 0,
        retries: Vec::new(),
        scope,
        entered_time: None,
        not_before: None,
        join: None,
        vars,
        redrive: from.redrive,
    }
}
