#![allow(clippy::unwrap_used)]
//! Exactly-once hops, joins under concurrency, retry timing from history, runaway loops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};

use super::*;

fn env_with(runner: impl TaskRunner + 'static) -> (Env, Arc<MemoryQueue>, Arc<MemoryStore>) {
    let clock = Clock::virtual_at(SystemTime::now());
    let queue = Arc::new(MemoryQueue::new(clock.clone()));
    let store = Arc::new(MemoryStore::new());
    let env = Env {
        store: store.clone(),
        sender: queue.clone(),
        runner: Arc::new(runner),
        options: Options { max_hops: 1000, clock },
        definitions: Default::default(),
    };
    (env, queue, store)
}

async fn drain(env: &Env, queue: &MemoryQueue) {
    while let Some((due, m)) = queue.pop() {
        env.options.clock.advance_to(due);
        process_hop(env, m).await.unwrap();
    }
}

const CHAIN: &str = r#"{"StartAt": "A", "States": {
    "A": {"Type": "Task", "Resource": "ember:tool:count", "Next": "B"},
    "B": {"Type": "Pass", "Result": "done", "End": true}}}"#;

fn counting() -> (Tools, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let tools = Tools::builtin().register("count", move |v: Value| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(v)
        }
    });
    (tools, n)
}

#[tokio::test]
async fn duplicate_delivery_has_one_effect_and_one_next_hop() {
    let (tools, runs) = counting();
    let (env, queue, store) = env_with(tools);
    let id = start_execution(&env, CHAIN, json!({"x": 1}), StartOptions { name: Some("dup") }).await.unwrap();
    let first = queue.drain().pop().unwrap();
    let o1 = process_hop(&env, first.clone()).await.unwrap();
    let o2 = process_hop(&env, first.clone()).await.unwrap();
    assert!(!o1.duplicate && o2.duplicate);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the task ran once");
    let next = queue.drain();
    assert_eq!(next.len(), 2, "the recorded next hop was re-sent");
    assert_eq!(next[0], next[1], "re-sent hops are identical, so consumers dedupe by hop id");
    let transitions = store.list(&hop::transitions_prefix(&id)).await.unwrap();
    assert_eq!(transitions.len(), 1);
    // Both copies of the next hop: one transition, one end.
    for m in next {
        process_hop(&env, m).await.unwrap();
    }
    assert_eq!(store.list(&hop::transitions_prefix(&id)).await.unwrap().len(), 2);
    assert!(queue.is_empty());
    let d = describe(&env, &id).await.unwrap();
    assert_eq!(d.status, ExecutionStatus::Succeeded);
    assert_eq!(d.output, Some(json!("done")));
}

#[tokio::test]
async fn crash_between_record_and_send_resends_on_redelivery() {
    let (tools, runs) = counting();
    let (env, queue, store) = env_with(tools);
    let id = start_execution(&env, CHAIN, json!({}), StartOptions::default()).await.unwrap();
    let first = queue.drain().pop().unwrap();
    // The worker records the transition, then dies before sending.
    let (t, existed) = record_hop(&env, &first).await.unwrap();
    assert!(!existed);
    assert!(queue.is_empty());
    // Redelivery after the visibility timeout.
    let o = process_hop(&env, first).await.unwrap();
    assert!(o.duplicate);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let next = queue.drain();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0], t.sends[0].message);
    assert_eq!(store.list(&hop::transitions_prefix(&id)).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_of_eight_joins_exactly_once_under_concurrency() {
    let branches: Vec<Value> =
        (0..8).map(|i| json!({"StartAt": "B", "States": {"B": {"Type": "Pass", "Result": i, "End": true}}})).collect();
    let def = json!({"StartAt": "P", "States": {"P": {"Type": "Parallel", "Branches": branches, "Next": "Sum"},
        "Sum": {"Type": "Pass", "Parameters": {"n.$": "States.ArrayLength($)"}, "End": true}}})
    .to_string();
    for round in 0..20 {
        let (env, queue, _store) = env_with(Tools::builtin());
        let id = start_execution(&env, &def, json!({}), StartOptions::default()).await.unwrap();
        let fan = queue.drain().pop().unwrap();
        process_hop(&env, fan).await.unwrap();
        let branch_hops = queue.drain();
        assert_eq!(branch_hops.len(), 8);
        // Every branch finishes at the same moment.
        let run_all = |msgs: Vec<HopMessage>| {
            let env = env.clone();
            async move {
                let tasks: Vec<_> = msgs
                    .into_iter()
                    .map(|m| {
                        let env = env.clone();
                        tokio::spawn(async move { process_hop(&env, m).await.unwrap() })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            }
        };
        run_all(branch_hops.clone()).await;
        let joins = queue.drain();
        assert_eq!(joins.len(), 1, "round {round}: the Parallel continues exactly once");
        // All eight delivered again: only the join's owner re-sends it, identical.
        run_all(branch_hops).await;
        let again = queue.drain();
        assert_eq!(again, joins, "round {round}");
        run_all(vec![joins[0].clone(), again[0].clone()]).await;
        let next = queue.drain();
        assert!(
            next.iter().all(|m| m == &next[0] && m.state == "Sum"),
            "round {round}: one next hop (re-sent identically)"
        );
        process_hop(&env, next[0].clone()).await.unwrap();
        drain(&env, &queue).await;
        let d = describe(&env, &id).await.unwrap();
        assert_eq!(d.output, Some(json!({"n": 8})), "round {round}");
    }
}

#[tokio::test]
async fn retry_delays_follow_backoff_capped_by_max_delay() {
    let def = r#"{"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:tool:fail",
        "Parameters": {"Error": "Ember.Flaky", "Cause": "nope"},
        "Retry": [{"ErrorEquals": ["Ember.Flaky"], "IntervalSeconds": 3, "BackoffRate": 2.5, "MaxAttempts": 5, "MaxDelaySeconds": 40}],
        "End": true}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({}), DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.error.as_deref(), Some("Ember.Flaky"));
    let delays: Vec<f64> = run
        .history
        .iter()
        .filter(|e| e.kind == "RetryScheduled")
        .map(|e| e.details["delaySeconds"].as_f64().unwrap())
        .collect();
    let expected: Vec<f64> = (0..5).map(|n| crate::asl::retry::retry_delay_seconds(3.0, 2.5, n, Some(40.0))).collect();
    assert_eq!(expected, vec![3.0, 7.5, 18.75, 40.0, 40.0]);
    assert_eq!(delays, expected);
    // The recorded task attempts are spaced by those delays on the (virtual) clock.
    let starts: Vec<&str> =
        run.history.iter().filter(|e| e.kind == "TaskStarted").map(|e| e.timestamp.as_str()).collect();
    assert_eq!(starts.len(), 6);
    let secs: Vec<f64> = starts.iter().map(|s| crate::asl::timestamp::parse(s).unwrap()).collect();
    for (i, w) in secs.windows(2).enumerate() {
        assert!((w[1] - w[0] - expected[i]).abs() < 0.01, "gap {i}: {} vs {}", w[1] - w[0], expected[i]);
    }
}

#[tokio::test]
async fn full_jitter_stays_within_the_capped_delay() {
    let def = r#"{"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:tool:fail",
        "Retry": [{"ErrorEquals": ["States.ALL"], "IntervalSeconds": 2, "MaxAttempts": 4, "JitterStrategy": "FULL"}],
        "End": true}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({}), DriverOptions::default()).await.unwrap();
    let delays: Vec<f64> = run
        .history
        .iter()
        .filter(|e| e.kind == "RetryScheduled")
        .map(|e| e.details["delaySeconds"].as_f64().unwrap())
        .collect();
    assert_eq!(delays.len(), 4);
    for (n, d) in delays.iter().enumerate() {
        assert!(*d >= 0.0 && *d <= 2.0 * 2f64.powi(n as i32), "{d}");
    }
}

#[tokio::test]
async fn runaway_loop_stops_at_the_hop_limit() {
    let def = r#"{"StartAt": "Inc", "States": {
        "Inc": {"Type": "Pass", "Parameters": {"n.$": "States.MathAdd($.n, 1)"}, "Next": "Again"},
        "Again": {"Type": "Choice", "Choices": [{"Variable": "$.n", "NumericGreaterThan": -1, "Next": "Inc"}], "Default": "End"},
        "End": {"Type": "Succeed"}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({"n": 0}), DriverOptions { max_hops: 50, name: None })
        .await
        .unwrap();
    assert_eq!(run.description.status, ExecutionStatus::Failed);
    assert_eq!(run.description.error.as_deref(), Some("States.Runtime"));
    assert!(run.description.cause.as_deref().unwrap().contains("maximum of 50 hops"));
}

#[tokio::test]
async fn long_wait_redelays_in_steps_of_at_most_900_seconds() {
    let def = r#"{"StartAt": "W", "States": {"W": {"Type": "Wait", "Seconds": 2000, "Next": "D"}, "D": {"Type": "Succeed"}}}"#;
    let (env, queue, _) = env_with(Tools::builtin());
    let id = start_execution(&env, def, json!({"a": 1}), StartOptions::default()).await.unwrap();
    let mut outcomes = Vec::new();
    while let Some((due, m)) = queue.pop() {
        env.options.clock.advance_to(due);
        outcomes.push(process_hop(&env, m).await.unwrap().status);
    }
    assert_eq!(
        outcomes,
        vec![HopStatus::Transitioned, HopStatus::Redelayed, HopStatus::Redelayed, HopStatus::Finished]
    );
    let h = history(&env, &id).await.unwrap();
    let t = |k: &str| crate::asl::timestamp::parse(&h.iter().find(|e| e.kind == k).unwrap().timestamp).unwrap();
    assert!((t("SucceedStateEntered") - t("WaitStateEntered") - 2000.0).abs() < 0.01);
}

#[tokio::test]
async fn start_is_idempotent_by_name() {
    let (env, queue, _) = env_with(Tools::builtin());
    let def = r#"{"StartAt": "A", "States": {"A": {"Type": "Pass", "End": true}}}"#;
    let a = start_execution(&env, def, json!({"k": 1}), StartOptions { name: Some("n1") }).await.unwrap();
    drain(&env, &queue).await;
    let b = start_execution(&env, def, json!({"k": 1}), StartOptions { name: Some("n1") }).await.unwrap();
    assert_eq!(a, b);
    assert!(queue.is_empty(), "a finished execution is not restarted");
    let e = start_execution(&env, def, json!({"k": 2}), StartOptions { name: Some("n1") }).await.unwrap_err();
    assert!(matches!(e, PipelineError::ExecutionAlreadyExists(_)), "{e}");
    let h = history(&env, &a).await.unwrap();
    let kinds: Vec<&str> = h.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["ExecutionStarted", "PassStateEntered", "PassStateExited", "ExecutionSucceeded"]);
    assert_eq!(h.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
}

#[tokio::test]
async fn map_with_concurrency_limit_and_tolerated_failures() {
    let def = r#"{"StartAt": "M", "States": {"M": {"Type": "Map", "ItemsPath": "$.xs", "MaxConcurrency": 2,
        "ToleratedFailureCount": 1,
        "ItemSelector": {"v.$": "$$.Map.Item.Value", "i.$": "$$.Map.Item.Index"},
        "ItemProcessor": {"StartAt": "C", "States": {
            "C": {"Type": "Choice", "Choices": [{"Variable": "$.v", "NumericEquals": 3, "Next": "Bad"}], "Default": "Ok"},
            "Bad": {"Type": "Fail", "Error": "Three", "Cause": "no threes"},
            "Ok": {"Type": "Pass", "Parameters": {"d.$": "States.MathAdd($.v, $.v)"}, "End": true}}},
        "End": true}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({"xs": [1, 2, 3, 4, 5]}), DriverOptions::default())
        .await
        .unwrap();
    assert_eq!(
        run.description.output,
        Some(json!([{"d": 2}, {"d": 4}, {"Error": "Three", "Cause": "no threes"}, {"d": 8}, {"d": 10}]))
    );
    let run =
        run_to_completion(Tools::builtin(), def, json!({"xs": [3, 3, 1]}), DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.error.as_deref(), Some("States.ExceedToleratedFailureThreshold"));
}

/// The same Map with its limits read from the input: the thresholds resolved at the start
/// decide when the items end.
#[tokio::test]
async fn map_limits_from_paths() {
    let def = r#"{"StartAt": "M", "States": {"M": {"Type": "Map", "ItemsPath": "$.xs",
        "MaxConcurrencyPath": "$.limits.k", "ToleratedFailureCountPath": "$.limits.c",
        "ToleratedFailurePercentagePath": "$.limits.p",
        "ItemProcessor": {"StartAt": "C", "States": {
            "C": {"Type": "Choice", "Choices": [{"Variable": "$", "NumericEquals": 3, "Next": "Bad"}], "Default": "Ok"},
            "Bad": {"Type": "Fail", "Error": "Three", "Cause": "no threes"},
            "Ok": {"Type": "Pass", "End": true}}},
        "End": true}}}"#;
    let run = |input: Value| run_to_completion(Tools::builtin(), def, input, DriverOptions::default());
    let ok = run(json!({"xs": [1, 3, 2], "limits": {"k": 1, "c": 1, "p": 100}})).await.unwrap();
    assert_eq!(ok.description.output, Some(json!([1, {"Error": "Three", "Cause": "no threes"}, 2])));
    let over = run(json!({"xs": [1, 3, 3], "limits": {"k": 2, "c": 1, "p": 100}})).await.unwrap();
    assert_eq!(over.description.error.as_deref(), Some("States.ExceedToleratedFailureThreshold"));
    let pct = run(json!({"xs": [1, 3, 2, 2], "limits": {"k": 0, "c": 5, "p": 20}})).await.unwrap();
    assert_eq!(pct.description.error.as_deref(), Some("States.ExceedToleratedFailureThreshold"));
    let bad = run(json!({"xs": [1], "limits": {"k": 1.5, "c": 0, "p": 0}})).await.unwrap();
    assert_eq!(bad.description.error.as_deref(), Some("States.Runtime"));
    assert_eq!(
        bad.description.cause.as_deref(),
        Some("The MaxConcurrencyPath field refers to value \"1.5\" which is not a valid integer: $.limits.k")
    );
}

// Paused time: the timers race on tokio's clock, which jumps ahead whenever every task
// waits, so the outcome does not depend on how busy the machine is and nothing sleeps.
#[tokio::test(start_paused = true)]
async fn task_timeout_and_heartbeat() {
    let tools = Tools::builtin().register("slow", |_v: Value| async {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        Ok(json!(1))
    });
    let def = r#"{"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:tool:slow", "TimeoutSeconds": 1, "End": true,
        "Catch": [{"ErrorEquals": ["States.Timeout"], "Next": "F"}]}, "F": {"Type": "Pass", "End": true}}}"#;
    let run = run_to_completion(tools, def, json!({}), DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.output.unwrap()["Error"], "States.Timeout");
    let kinds: Vec<&str> = run.history.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.contains(&"TaskTimedOut"));
}

#[tokio::test]
async fn a_path_that_matches_nothing_names_the_path() {
    let def = r#"{"StartAt": "A", "States": {"A": {"Type": "Pass", "InputPath": "$.missing.field", "End": true}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({"a": 1}), DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.error.as_deref(), Some("States.Runtime"));
    assert!(run.description.cause.unwrap().contains("$.missing.field"));
}

// Paused time: the timers race on tokio's clock, which jumps ahead whenever every task
// waits, so the outcome does not depend on how busy the machine is and nothing sleeps.
#[tokio::test(start_paused = true)]
async fn heartbeat_timeout_unless_the_task_beats() {
    let def = r#"{"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:tool:quiet",
        "TimeoutSeconds": 10, "HeartbeatSeconds": 1, "End": true}}}"#;
    let tools = Tools::builtin().register("quiet", |_v: Value| async {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        Ok(json!("late"))
    });
    let run = run_to_completion(tools, def, json!({}), DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.error.as_deref(), Some("States.HeartbeatTimeout"));

    // A runner that beats keeps the task alive past HeartbeatSeconds.
    struct Beating;
    #[async_trait::async_trait]
    impl TaskRunner for Beating {
        async fn run(&self, _r: &str, _i: Value, ctx: &TaskContext) -> Result<Value, TaskFailure> {
            for _ in 0..3 {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                ctx.heartbeat();
            }
            Ok(json!("alive"))
        }
        fn resources(&self) -> crate::asl::Resources {
            crate::asl::Resources::with_tools(["quiet"])
        }
    }
    let run = run_to_completion(Beating, def, json!({}), DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.output, Some(json!("alive")));
}

#[tokio::test]
async fn execution_timeout_ends_the_execution() {
    let def = r#"{"TimeoutSeconds": 60, "StartAt": "W", "States": {
        "W": {"Type": "Wait", "Seconds": 120, "Next": "D"}, "D": {"Type": "Succeed"}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({}), DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.error.as_deref(), Some("States.Timeout"));
}

#[tokio::test]
async fn history_is_step_functions_style() {
    let def = r#"{"StartAt": "C", "States": {
        "C": {"Type": "Choice", "Choices": [{"Variable": "$.n", "NumericGreaterThan": 1, "Next": "T"}], "Default": "D"},
        "T": {"Type": "Task", "Resource": "ember:tool:json", "Parameters": {"text": "{\"a\": 1}"}, "ResultPath": "$.parsed", "Next": "D"},
        "D": {"Type": "Succeed"}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({"n": 2}), DriverOptions::default()).await.unwrap();
    let kinds: Vec<&str> = run.history.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ExecutionStarted",
            "ChoiceStateEntered",
            "ChoiceStateExited",
            "TaskStateEntered",
            "TaskScheduled",
            "TaskStarted",
            "TaskSucceeded",
            "TaskStateExited",
            "SucceedStateEntered",
            "SucceedStateExited",
            "ExecutionSucceeded"
        ]
    );
    assert_eq!(run.description.output, Some(json!({"n": 2, "parsed": {"a": 1}})));
    assert!(run.history.iter().all(|e| crate::asl::timestamp::parse(&e.timestamp).is_some()));
}

#[tokio::test]
async fn retry_delays_beyond_900_seconds_redelay() {
    let def = r#"{"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:tool:fail",
        "Retry": [{"ErrorEquals": ["States.ALL"], "IntervalSeconds": 2000, "MaxAttempts": 1}], "End": true}}}"#;
    let (env, queue, _) = env_with(Tools::builtin());
    let id = start_execution(&env, def, json!({}), StartOptions::default()).await.unwrap();
    let mut statuses = Vec::new();
    while let Some((due, m)) = queue.pop() {
        env.options.clock.advance_to(due);
        statuses.push(process_hop(&env, m).await.unwrap().status);
    }
    assert_eq!(statuses, [HopStatus::Transitioned, HopStatus::Redelayed, HopStatus::Redelayed, HopStatus::Finished]);
    let h = history(&env, &id).await.unwrap();
    let starts: Vec<f64> = h
        .iter()
        .filter(|e| e.kind == "TaskStarted")
        .map(|e| crate::asl::timestamp::parse(&e.timestamp).unwrap())
        .collect();
    assert!((starts[1] - starts[0] - 2000.0).abs() < 0.01, "{starts:?}");
}

#[tokio::test]
async fn oversized_output_is_data_limit_exceeded() {
    let tools = Tools::builtin().register("big", |_v: Value| async { Ok(json!("x".repeat(300 * 1024))) });
    let def = r#"{"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:tool:big", "Next": "D",
        "Catch": [{"ErrorEquals": ["States.ALL"], "Next": "D"}]}, "D": {"Type": "Succeed"}}}"#;
    let run = run_to_completion(tools, def, json!({}), DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.error.as_deref(), Some("States.DataLimitExceeded"));
}

/// The definition is parsed once per state machine, not once per hop: two executions of one
/// machine, every hop of each, share one validated definition; another machine adds one.
#[tokio::test]
async fn hops_reuse_one_parsed_definition_per_state_machine() {
    let (tools, runs) = counting();
    let (env, queue, _store) = env_with(tools);
    for name in ["one", "two"] {
        start_execution(&env, CHAIN, json!({"x": 1}), StartOptions { name: Some(name) }).await.unwrap();
    }
    drain(&env, &queue).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2, "both executions ran their task");
    assert_eq!(env.definitions.len(), 1);
    let other = r#"{"StartAt": "P", "States": {"P": {"Type": "Pass", "End": true}}}"#;
    start_execution(&env, other, json!({}), StartOptions { name: Some("three") }).await.unwrap();
    drain(&env, &queue).await;
    assert_eq!(env.definitions.len(), 2);
}

/// Redrive, as Step Functions' RedriveExecution: a failed execution runs again from the state
/// that failed (earlier states are not run again, variables are kept), `describe` follows the
/// new run, `history` holds both, and a redrive record delivered twice redrives once.
#[tokio::test]
async fn a_failed_execution_redrives_from_the_state_that_failed() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (first_runs, f) = {
        let n = Arc::new(AtomicUsize::new(0));
        (n.clone(), n)
    };
    let tools = Tools::builtin()
        .register("first", move |v: Value| {
            let f = f.clone();
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                Ok(v)
            }
        })
        .register("flaky", move |v: Value| {
            let c = c.clone();
            async move {
                match c.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(TaskFailure::new("Flaky.Down", "the service is down")),
                    _ => Ok(json!({"got": v})),
                }
            }
        });
    let (env, queue, _store) = env_with(tools);
    let def = r#"{"StartAt": "First", "States": {
        "First": {"Type": "Task", "Resource": "ember:tool:first", "Assign": {"seen.$": "$.x"}, "Next": "Flaky"},
        "Flaky": {"Type": "Task", "Resource": "ember:tool:flaky", "Parameters": {"x.$": "$seen"}, "End": true}}}"#;
    let id = start_execution(&env, def, json!({"x": 7}), StartOptions { name: Some("rd") }).await.unwrap();
    drain(&env, &queue).await;
    let d = describe(&env, &id).await.unwrap();
    assert_eq!((d.status, d.error.as_deref(), d.redrive_count), (ExecutionStatus::Failed, Some("Flaky.Down"), 0));

    let r = redrive_execution(&env, &id, Some(0)).await.unwrap();
    assert_eq!((r.redrive_count, r.state.as_str()), (1, "Flaky"));
    assert_eq!(describe(&env, &id).await.unwrap().status, ExecutionStatus::Running);
    // The same parked record delivered again before the redriven hop ran: no second
    // redrive; its hop is sent again (a crash may have lost it) and dedupes by its id.
    let r = redrive_execution(&env, &id, Some(0)).await.unwrap();
    assert_eq!(r.redrive_count, 1);
    let hops = queue.drain();
    assert_eq!(hops.len(), 2, "{hops:?}");
    assert_eq!(hops[0].id(), hops[1].id());
    for h in hops {
        process_hop(&env, h).await.unwrap();
    }
    drain(&env, &queue).await;
    // Delivered once more after the redrive ran: nothing is sent.
    redrive_execution(&env, &id, Some(0)).await.unwrap();
    assert!(queue.is_empty());
    let d = describe(&env, &id).await.unwrap();
    assert_eq!(d.status, ExecutionStatus::Succeeded, "{d:?}");
    assert_eq!(d.output, Some(json!({"got": {"x": 7}})), "the variable assigned before the failure is kept");
    assert_eq!(d.redrive_count, 1);
    assert_eq!(first_runs.load(Ordering::SeqCst), 1, "the state before the failure did not run again");
    let kinds: Vec<String> = history(&env, &id).await.unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "ExecutionFailed").count(), 1, "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("ExecutionSucceeded"), "{kinds:?}");
    let e = redrive_execution(&env, &id, None).await.unwrap_err();
    assert!(e.to_string().contains("only a FAILED execution"), "{e}");
}

#[tokio::test]
async fn fail_without_error_or_cause_reports_neither() {
    let def = r#"{"StartAt": "F", "States": {"F": {"Type": "Fail", "Cause": "only a cause"}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({}), DriverOptions::default()).await.unwrap();
    let d = serde_json::to_value(&run.description).unwrap();
    assert_eq!(d["status"], "FAILED", "{d}");
    assert!(d.get("error").is_none(), "DescribeExecution has no error field here: {d}");
    assert_eq!(d["cause"], "only a cause", "{d}");
    let failed = run.history.iter().find(|e| e.kind == "ExecutionFailed").unwrap();
    assert_eq!(failed.details, json!({"cause": "only a cause"}));

    let def = r#"{"StartAt": "F", "States": {"F": {"Type": "Fail"}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({}), DriverOptions::default()).await.unwrap();
    let d = serde_json::to_value(&run.description).unwrap();
    assert!(d.get("error").is_none() && d.get("cause").is_none(), "{d}");
}

/// AWS fails a wait whose delay does not fit a Java int of seconds (about 68 years).
#[tokio::test]
async fn wait_longer_than_aws_schedules_fails() {
    let def = r#"{"StartAt": "W", "States": {"W": {"Type": "Wait", "TimestampPath": "$.t", "End": true}}}"#;
    let run = run_to_completion(Tools::builtin(), def, json!({"t": "9999-01-01T00:00:00Z"}), DriverOptions::default())
        .await
        .unwrap();
    assert_eq!(run.description.error.as_deref(), Some("States.Runtime"));
    assert_eq!(run.description.cause.as_deref(), Some("Wait state delay is too long."));
}

/// The same limit in a JSONata Wait (its Seconds an expression): no overflow, the same error.
#[tokio::test]
async fn a_jsonata_wait_longer_than_aws_schedules_fails() {
    for seconds in ["{% 99999999999 %}", "{% 1e300 %}"] {
        let def = json!({"QueryLanguage": "JSONata", "StartAt": "W",
            "States": {"W": {"Type": "Wait", "Seconds": seconds, "End": true}}});
        let run =
            run_to_completion(Tools::builtin(), &def.to_string(), json!({}), DriverOptions::default()).await.unwrap();
        assert_eq!(run.description.cause.as_deref(), Some("Wait state delay is too long."), "{seconds}");
    }
}

/// A redriven run gets its own TimeoutSeconds, from the redrive: an execution that timed out
/// does not time out again on its first redriven hop.
#[tokio::test]
async fn a_timed_out_execution_redrives_with_a_fresh_timeout() {
    let (env, queue, _store) = env_with(Tools::builtin());
    let def = r#"{"TimeoutSeconds": 10, "StartAt": "W", "States": {
        "W": {"Type": "Wait", "Seconds": 20, "Next": "P"},
        "P": {"Type": "Pass", "Result": "done", "End": true}}}"#;
    let id = start_execution(&env, def, json!({}), StartOptions { name: Some("late") }).await.unwrap();
    drain(&env, &queue).await;
    let d = describe(&env, &id).await.unwrap();
    assert_eq!((d.status, d.error.as_deref()), (ExecutionStatus::Failed, Some("States.Timeout")));
    let r = redrive_execution(&env, &id, None).await.unwrap();
    assert_eq!(r.state, "P");
    drain(&env, &queue).await;
    let d = describe(&env, &id).await.unwrap();
    assert_eq!((d.status, d.output), (ExecutionStatus::Succeeded, Some(json!("done"))), "{:?}", d.error);
}
