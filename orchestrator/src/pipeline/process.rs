//! Processing a hop with exactly-once effect, starting executions, and reading them back.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::engine::HopRun;
use super::hop::*;
use super::{Env, PipelineError};
use crate::asl::{self, names, timestamp, StatesError};

/// What processing one hop did.
#[derive(Debug, Clone, PartialEq)]
pub struct HopOutcome {
    /// The hop's id (execution, scope, hop number).
    pub hop_id: String,
    /// What happened.
    pub status: HopStatus,
    /// Hops sent.
    pub sent: usize,
    /// Set when the execution ended at this hop. On a failed end the worker sends the
    /// execution to the pipeline DLQ with `error` and `cause` (once: skip when `duplicate`).
    pub finished: Option<ExecutionEnd>,
    /// The transition was already recorded by an earlier delivery; nothing was re-run, the
    /// recorded next hops were sent again.
    pub duplicate: bool,
}

/// The kind of result of one hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopStatus {
    /// Recorded a transition and sent the next hop(s).
    Transitioned,
    /// A Wait longer than one queue delay: the message was sent again, nothing recorded.
    Redelayed,
    /// The hop belongs to a Parallel/Map that already failed: dropped.
    Dropped,
    /// The execution ended.
    Finished,
}

fn now_ms(env: &Env) -> u64 {
    env.options.clock.now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

async fn get_json<T: for<'de> Deserialize<'de>>(env: &Env, key: &str) -> Result<Option<T>, PipelineError> {
    match env.store.get(key).await? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| PipelineError::Corrupt(format!("{key}: {e}"))),
    }
}

async fn put_json<T: Serialize>(env: &Env, key: &str, v: &T) -> Result<bool, PipelineError> {
    let bytes = serde_json::to_vec(v).map_err(|e| PipelineError::Corrupt(format!("{key}: {e}")))?;
    Ok(env.store.put_if_absent(key, bytes).await?)
}

async fn load_meta(env: &Env, execution: &str) -> Result<ExecutionMeta, PipelineError> {
    get_json(env, &meta_key(execution)).await?.ok_or_else(|| PipelineError::ExecutionNotFound(execution.to_string()))
}

pub(crate) async fn load_transition(
    env: &Env,
    execution: &str,
    scope: &[Frame],
    hop: u64,
) -> Result<Transition, PipelineError> {
    let key = transition_key(execution, scope, hop);
    get_json(env, &key).await?.ok_or_else(|| PipelineError::Corrupt(format!("missing transition record {key}")))
}

pub(crate) async fn load_join(
    env: &Env,
    execution: &str,
    scope: &[Frame],
    fan_hop: u64,
) -> Result<Option<JoinRecord>, PipelineError> {
    get_json(env, &join_key(execution, scope, fan_hop)).await
}

pub(crate) async fn load_results(
    env: &Env,
    execution: &str,
    scope: &[Frame],
    fan_hop: u64,
) -> Result<Vec<BranchResult>, PipelineError> {
    let mut out = Vec::new();
    for key in env.store.list(&results_prefix(execution, scope, fan_hop)).await? {
        if let Some(r) = get_json::<BranchResult>(env, &key).await? {
            out.push(r);
        }
    }
    Ok(out)
}

/// The join marker with the continuation its owner sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JoinRecord {
    pub owner: usize,
    pub failure: Option<StatesError>,
    pub message: HopMessage,
}

/// The resources a hop is validated with: the runner's, and any tool. The definition was
/// checked against the starting worker's tools; a worker without one of them (say, started
/// without `--http-allow`) fails that Task with `Ember.ToolUnavailable`, which Retry and Catch
/// see and `describe` reports, instead of refusing the hop and leaving the execution running.
fn hop_resources(env: &Env) -> asl::Resources {
    env.runner.resources().with_any_tool()
}

/// Records the transition of `msg` without sending anything (the first half of
/// [`process_hop`]). Returns the record and whether it already existed. A worker killed right
/// after this call leaves a record whose next hops a redelivery sends.
pub async fn record_hop(env: &Env, msg: &HopMessage) -> Result<(Transition, bool), PipelineError> {
    let key = transition_key(&msg.records(), &msg.scope, msg.hop);
    if let Some(t) = get_json::<Transition>(env, &key).await? {
        return Ok((t, true));
    }
    let meta = load_meta(env, &msg.execution).await?;
    let def = env.definitions.get(&meta.definition, &hop_resources(env))?;
    // A redriven run has its own TimeoutSeconds, from when it was redriven.
    let run_start_ms = match msg.redrive {
        0 => meta.start_ms,
        n => get_json::<Value>(env, &redrive_key(&msg.execution, n))
            .await?
            .and_then(|m| m["start_ms"].as_u64())
            .unwrap_or(meta.start_ms),
    };
    let run = HopRun {
        env,
        meta: &meta,
        top: &def.machine,
        msg,
        now_ms: now_ms(env),
        events: Vec::new(),
        assigned: None,
        run_start_ms,
    };
    let t = run.transition().await?;
    if put_json(env, &key, &t).await? {
        Ok((t, false))
    } else {
        // A concurrent delivery recorded first: its record is the one that counts.
        let t = get_json(env, &key).await?.ok_or_else(|| PipelineError::Corrupt(format!("{key} vanished")))?;
        Ok((t, true))
    }
}

/// Processes one hop message: runs its state once (a redelivered hop only re-sends what was
/// recorded), records the transition create-only, performs the branch join if this ends a
/// branch, and sends the next hop(s).
pub async fn process_hop(env: &Env, msg: HopMessage) -> Result<HopOutcome, PipelineError> {
    let hop_id = msg.id();
    if let Some(nb) = msg.not_before.as_deref().and_then(timestamp::parse) {
        let remaining = nb - now_ms(env) as f64 / 1000.0;
        if remaining > 0.0 {
            let delay = remaining.min(super::engine::MAX_QUEUE_DELAY_SECONDS);
            env.sender.send(vec![(msg, Duration::from_secs_f64(delay))]).await?;
            return Ok(HopOutcome { hop_id, status: HopStatus::Redelayed, sent: 1, finished: None, duplicate: false });
        }
    }
    // Hops of a Parallel/Map that already failed stop here.
    for i in 0..msg.scope.len() {
        if let Some(j) = load_join(env, &msg.records(), &msg.scope[..i], msg.scope[i].hop).await? {
            if j.failure.is_some()
                && get_json::<Transition>(env, &transition_key(&msg.records(), &msg.scope, msg.hop)).await?.is_none()
            {
                return Ok(HopOutcome {
                    hop_id,
                    status: HopStatus::Dropped,
                    sent: 0,
                    finished: None,
                    duplicate: false,
                });
            }
        }
    }
    let (t, duplicate) = record_hop(env, &msg).await?;
    let mut sends: Vec<Outgoing> = t.sends.clone();
    if let Some(end) = &t.end {
        put_json(env, &end_key(&msg.records()), end).await?;
    }
    if let Some(done) = &t.branch_done {
        sends.extend(branch_done(env, &t.message, done).await?);
    }
    if duplicate {
        // A redelivered hop re-sends only the successors not recorded yet: one that is
        // recorded was received and processed, and its own redelivery (if it crashed) sends
        // its successors. Without this a duplicate would replay to the end of its branch.
        let mut fresh = Vec::with_capacity(sends.len());
        for o in sends {
            let key = transition_key(&o.message.records(), &o.message.scope, o.message.hop);
            if get_json::<Transition>(env, &key).await?.is_none() {
                fresh.push(o);
            }
        }
        sends = fresh;
    }
    let sent = sends.len();
    if !sends.is_empty() {
        env.sender
            .send(
                sends
                    .into_iter()
                    .map(|o| (o.message, Duration::from_secs_f64(o.delay_seconds.clamp(0.0, 900.0))))
                    .collect(),
            )
            .await?;
    }
    let status = if t.end.is_some() { HopStatus::Finished } else { HopStatus::Transitioned };
    Ok(HopOutcome { hop_id, status, sent, finished: t.end, duplicate })
}

/// A branch (or Map item) ended: store its result, and if that completes (or fails) the
/// fan-out, create the join marker; only its creator sends the continuation.
async fn branch_done(env: &Env, msg: &HopMessage, done: &BranchResult) -> Result<Vec<Outgoing>, PipelineError> {
    let Some(frame) = msg.scope.last() else { return Ok(Vec::new()) };
    let parent = &msg.scope[..msg.scope.len() - 1];
    let records = msg.records();
    let exec = &records;
    put_json(env, &result_key(exec, parent, frame.hop, frame.index, done), done).await?;
    let jkey = join_key(exec, parent, frame.hop);
    if let Some(j) = get_json::<JoinRecord>(env, &jkey).await? {
        // Only the creator re-sends (it may have died before sending the first time).
        return Ok(if j.owner == frame.index {
            vec![Outgoing { message: j.message, delay_seconds: 0.0 }]
        } else {
            Vec::new()
        });
    }
    let fan_rec = load_transition(env, exec, parent, frame.hop).await?;
    let count = fan_rec.fan_out.as_ref().map(|f| f.count).unwrap_or(0);
    let listed = env.store.list(&results_prefix(exec, parent, frame.hop)).await?;
    let results: Vec<(usize, bool, u64, &String)> =
        listed.iter().filter_map(|k| parse_result_key(k).map(|(i, ok, h)| (i, ok, h, k))).collect();
    let meta = load_meta(env, &msg.execution).await?;
    let def = env.definitions.get(&meta.definition, &hop_resources(env))?;
    let machine = super::engine::machine_for(&def.machine, parent)?;
    let failures: Vec<&String> = results.iter().filter(|r| !r.1).map(|r| r.3).collect();
    // The thresholds the Map resolved when it started (they may come from paths).
    let fan = fan_rec.fan_out.as_ref();
    let tolerated = match machine.state(&frame.state).map(|s| &s.kind) {
        Some(asl::Kind::Map { tolerated_percentage, tolerated_count, .. }) => Some((
            fan.and_then(|f| f.tolerated_percentage).or(*tolerated_percentage),
            fan.and_then(|f| f.tolerated_count).or(*tolerated_count),
        )),
        _ => None,
    };
    let failure = match tolerated {
        Some((tolerated_percentage, tolerated_count))
            if tolerated_percentage.is_some() || tolerated_count.is_some() =>
        {
            let f = failures.len();
            let over_count = tolerated_count.is_some_and(|c| f as u64 > c);
            let over_pct = tolerated_percentage.is_some_and(|p| (f as f64) * 100.0 / (count.max(1) as f64) > p);
            (over_count || over_pct).then(|| {
                StatesError::new(
                    names::EXCEED_TOLERATED_FAILURE_THRESHOLD,
                    "The specified tolerated failure threshold was exceeded",
                )
            })
        }
        _ => match (done.result.as_ref().err(), failures.first()) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(key)) => get_json::<BranchResult>(env, key).await?.and_then(|r| r.result.err()),
            (None, None) => None,
        },
    };
    if failure.is_none() && results.len() < count {
        return Ok(Vec::new());
    }
    let hop =
        if failure.is_some() { done.last_hop } else { results.iter().map(|r| r.2).max().unwrap_or(done.last_hop) } + 1;
    let fm = &fan_rec.message;
    let message = HopMessage {
        execution: msg.execution.clone(),
        state: frame.state.clone(),
        input: fm.input.clone(),
        hop,
        attempt: fm.attempt,
        retries: fm.retries.clone(),
        scope: parent.to_vec(),
        entered_time: fm.entered_time.clone(),
        not_before: None,
        join: Some(frame.hop),
        vars: fm.vars.clone(),
        redrive: fm.redrive,
    };
    let rec = JoinRecord { owner: frame.index, failure, message };
    if put_json(env, &jkey, &rec).await? {
        return Ok(vec![Outgoing { message: rec.message, delay_seconds: 0.0 }]);
    }
    let j: Option<JoinRecord> = get_json(env, &jkey).await?;
    Ok(match j {
        Some(j) if j.owner == frame.index => vec![Outgoing { message: j.message, delay_seconds: 0.0 }],
        _ => Vec::new(),
    })
}

/// Ends an execution one of whose hops cannot be processed at all (its records cannot be
/// read, its definition does not validate here): records an `ExecutionFailed` event at the
/// hop's transition and the end, both create-only, so `describe` reports FAILED with the error
/// and cause instead of RUNNING forever. Whatever the execution recorded first wins. Returns
/// whether this call ended it.
pub async fn fail_execution(env: &Env, msg: &HopMessage, error: StatesError) -> Result<bool, PipelineError> {
    let now = now_ms(env);
    let stop_time = timestamp::format(UNIX_EPOCH + Duration::from_millis(now));
    let end = ExecutionEnd { result: Err(error.clone()), stop_time: stop_time.clone() };
    let t = Transition {
        message: msg.clone(),
        events: vec![RecordedEvent {
            kind: "ExecutionFailed".into(),
            timestamp: stop_time,
            details: json!({"error": error.error, "cause": error.cause}),
        }],
        sends: Vec::new(),
        branch_done: None,
        end: Some(end.clone()),
        fan_out: None,
        time_ms: now,
    };
    if !put_json(env, &transition_key(&msg.records(), &msg.scope, msg.hop), &t).await? {
        return Ok(false);
    }
    put_json(env, &end_key(&msg.records()), &end).await
}

/// What [`redrive_execution`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Redrive {
    /// The execution.
    pub execution: String,
    /// Its redrive count now.
    pub redrive_count: u32,
    /// The state it runs again from.
    pub state: String,
}

/// Redrives a failed execution, as Step Functions' RedriveExecution: it runs again from the
/// state that failed (a failed Parallel or Map runs again whole), with that state's input and
/// the variables it saw; what succeeded before is not run again. Its hops are recorded afresh
/// under the redrive's records, so `describe` follows the new run and `history` shows both.
///
/// `failure`: the redrive count of the failure being redriven (a parked record says which),
/// so a record delivered twice redrives once; `None` redrives the current failure. A redrive
/// whose first hop may not have gone out (a crash right after its marker) is sent again.
pub async fn redrive_execution(env: &Env, execution: &str, failure: Option<u32>) -> Result<Redrive, PipelineError> {
    let d = describe(env, execution).await?;
    let current = d.redrive_count;
    let already = failure.is_some_and(|f| f < current);
    if current > 0 && (already || d.status == ExecutionStatus::Running) {
        let marker: Option<Value> = get_json(env, &redrive_key(execution, current)).await?;
        let hop = marker.and_then(|m| serde_json::from_value::<HopMessage>(m["hop"].clone()).ok());
        let Some(hop) = hop else {
            return Err(PipelineError::Corrupt(format!("redrive {current} of {execution} has no hop")));
        };
        let redriven = Redrive { execution: execution.to_string(), redrive_count: current, state: hop.state.clone() };
        // A redrive whose first hop was never recorded (a crash right after its marker): send
        // that hop again, whoever asks.
        if d.status == ExecutionStatus::Running && env.store.list(&transitions_prefix(&hop.records())).await?.is_empty()
        {
            env.sender.send(vec![(hop, Duration::ZERO)]).await?;
            return Ok(redriven);
        }
        // The failure this record is about was redriven already.
        if already {
            return Ok(redriven);
        }
    }
    let last = records_id(execution, current);
    let mut failed: Option<HopMessage> = None;
    // The transition that recorded the run's end (several branches may each have tried).
    let end: Option<ExecutionEnd> = get_json(env, &end_key(&last)).await?;
    for key in env.store.list(&transitions_prefix(&last)).await? {
        if let Some(t) = get_json::<Transition>(env, &key).await? {
            if end.is_some() && t.end == end && matches!(t.end, Some(ExecutionEnd { result: Err(_), .. })) {
                failed = Some(t.message);
                break;
            }
        }
    }
    let Some(mut hop) = failed.filter(|_| d.status == ExecutionStatus::Failed) else {
        return Err(PipelineError::NotRedrivable(execution.to_string(), format!("{:?}", d.status).to_uppercase()));
    };
    // A failure recorded inside a branch (a hop that could not be processed) reruns the
    // top-level Parallel or Map around it.
    if let Some(outer) = hop.scope.first().cloned() {
        hop = load_transition(env, &last, &[], outer.hop).await?.message;
    }
    let n = current + 1;
    hop.redrive = n;
    hop.join = None;
    hop.attempt = 0;
    hop.retries.clear();
    hop.entered_time = None;
    hop.not_before = None;
    let marker = json!({"from_state": hop.state, "hop": hop, "start_ms": now_ms(env)});
    put_json(env, &redrive_key(execution, n), &marker).await?;
    let state = hop.state.clone();
    env.sender.send(vec![(hop, Duration::ZERO)]).await?;
    Ok(Redrive { execution: execution.to_string(), redrive_count: n, state })
}

/// Options of [`start_execution`].
#[derive(Debug, Clone, Default)]
pub struct StartOptions<'a> {
    /// Execution name: the same name with the same definition and input gives the same
    /// execution; with a different one it is `ExecutionAlreadyExists`. Random when `None`.
    pub name: Option<&'a str>,
}

/// Validates `definition`, stores the execution and sends its first hop. Returns the
/// execution id. Idempotent by name, like StartExecution.
pub async fn start_execution(
    env: &Env,
    definition: &str,
    input: Value,
    opts: StartOptions<'_>,
) -> Result<String, PipelineError> {
    let def = env.definitions.get(definition, &env.runner.resources())?;
    let name = match opts.name {
        Some(n) => {
            if n.is_empty() || n.len() > 80 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(PipelineError::InvalidName(n.to_string()));
            }
            n.to_string()
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    let now = now_ms(env);
    let sm_id = {
        use sha2::Digest;
        format!("sm-{}", &hex::encode(sha2::Sha256::digest(definition.as_bytes()))[..16])
    };
    let meta = ExecutionMeta {
        id: name.clone(),
        name: name.clone(),
        definition: definition.to_string(),
        state_machine_id: sm_id,
        input: input.clone(),
        start_time: timestamp::format(UNIX_EPOCH + Duration::from_millis(now)),
        start_ms: now,
    };
    if !put_json(env, &meta_key(&name), &meta).await? {
        let existing = load_meta(env, &name).await?;
        if existing.input != input || existing.definition != definition {
            return Err(PipelineError::ExecutionAlreadyExists(name));
        }
        if get_json::<Transition>(env, &transition_key(&name, &[], 0)).await?.is_some() {
            return Ok(name);
        }
    }
    let first = HopMessage {
        execution: name.clone(),
        state: def.machine.start_at.clone(),
        input,
        hop: 0,
        attempt: 0,
        retries: Vec::new(),
        scope: Vec::new(),
        entered_time: None,
        not_before: None,
        join: None,
        vars: Default::default(),
        redrive: 0,
    };
    env.sender.send(vec![(first, Duration::ZERO)]).await?;
    Ok(name)
}

/// Status of an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecutionStatus {
    /// Not ended yet.
    Running,
    /// Ended with an output.
    Succeeded,
    /// Ended with an error.
    Failed,
}

/// What `describe` reports (like DescribeExecution).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Description {
    /// Execution id.
    pub id: String,
    /// Execution name.
    pub name: String,
    /// Status.
    pub status: ExecutionStatus,
    /// Input.
    pub input: Value,
    /// Output when it succeeded.
    pub output: Option<Value>,
    /// Error name when it failed; left out when there is none (a Fail state without
    /// `Error`), as DescribeExecution does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Cause when it failed; left out when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// RFC 3339.
    pub start_time: String,
    /// RFC 3339, when ended.
    pub stop_time: Option<String>,
    /// How many times it was redriven (Step Functions' `redriveCount`).
    pub redrive_count: u32,
}

/// The number of times `execution` was redriven (its redrive markers, 1, 2, ...).
async fn redrive_count(env: &Env, execution: &str) -> Result<u32, PipelineError> {
    let mut n = 0;
    while env.store.get(&redrive_key(execution, n + 1)).await?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// Describes an execution (after a redrive, its latest run).
pub async fn describe(env: &Env, execution: &str) -> Result<Description, PipelineError> {
    let meta = load_meta(env, execution).await?;
    let redrives = redrive_count(env, execution).await?;
    let end: Option<ExecutionEnd> = get_json(env, &end_key(&records_id(execution, redrives))).await?;
    let mut d = Description {
        id: meta.id,
        name: meta.name,
        status: ExecutionStatus::Running,
        input: meta.input,
        output: None,
        error: None,
        cause: None,
        start_time: meta.start_time,
        stop_time: None,
        redrive_count: redrives,
    };
    if let Some(end) = end {
        d.stop_time = Some(end.stop_time);
        match end.result {
            Ok(o) => {
                d.status = ExecutionStatus::Succeeded;
                d.output = Some(o);
            }
            Err(e) => {
                d.status = ExecutionStatus::Failed;
                // A Fail state without Error or Cause: AWS's DescribeExecution has neither
                // field (LocalStack's recording `test_state_fail_empty`: ExecutionFailed `{}`).
                d.error = Some(e.error).filter(|s| !s.is_empty());
                d.cause = Some(e.cause).filter(|s| !s.is_empty());
            }
        }
    }
    Ok(d)
}

/// One history event (like GetExecutionHistory).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEvent {
    /// 1-based, in order.
    pub id: u64,
    /// Step Functions event type (`ExecutionStarted`, `PassStateEntered`, ...; Ember adds
    /// `RetryScheduled` and `WaitScheduled` with the delay chosen).
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339.
    pub timestamp: String,
    /// Hop id of the transition that recorded it.
    pub hop_id: String,
    /// Details.
    pub details: Value,
}

/// The execution's events in order (by record time, then hop).
pub async fn history(env: &Env, execution: &str) -> Result<Vec<HistoryEvent>, PipelineError> {
    let meta = load_meta(env, execution).await?;
    let mut recs: Vec<Transition> = Vec::new();
    let redrives = redrive_count(env, execution).await?;
    for n in 0..=redrives {
        for key in env.store.list(&transitions_prefix(&records_id(execution, n))).await? {
            if let Some(t) = get_json::<Transition>(env, &key).await? {
                recs.push(t);
            }
        }
    }
    recs.sort_by(|a, b| {
        (a.message.redrive, a.time_ms, a.message.hop, a.message.scope.len()).cmp(&(
            b.message.redrive,
            b.time_ms,
            b.message.hop,
            b.message.scope.len(),
        ))
    });
    let mut out = vec![HistoryEvent {
        id: 1,
        kind: "ExecutionStarted".into(),
        timestamp: meta.start_time.clone(),
        hop_id: format!("{execution}/start"),
        details: json!({"input": meta.input, "name": meta.name}),
    }];
    for t in recs {
        let hop_id = t.message.id();
        for e in t.events {
            out.push(HistoryEvent {
                id: out.len() as u64 + 1,
                kind: e.kind,
                timestamp: e.timestamp,
                hop_id: hop_id.clone(),
                details: e.details,
            });
        }
    }
    Ok(out)
}
