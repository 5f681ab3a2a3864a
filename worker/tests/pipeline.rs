//! Pipelines end to end with the real `ember` binary and the real small model: an execution
//! on SQS and S3 (moto on 127.0.0.1) that asks the model, routes on its answer and fans out;
//! a failed execution in the pipeline DLQ; idempotent starts; and workers killed with SIGKILL
//! in the middle of executions with Parallel and Map joins, after which every execution has
//! finished exactly once with the right output.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;
use ember_tests::{aws_config_for, aws_env, smollm_hf, MotoServer};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// `ember` with the test's environment.
fn ember_cmd(env: &[(&'static str, String)], args: &[&str]) -> anyhow::Result<Command> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.args(args)
        .env("EMBER_NO_PROGRESS", "1")
        .env("EMBER_LOG", "info")
        .env("EMBER_MODEL", smollm_hf("f32")?)
        .env_remove("AWS_ENDPOINT_URL")
        .envs(env.iter().cloned());
    Ok(cmd)
}

fn ember(env: &[(&'static str, String)], args: &[&str]) -> anyhow::Result<Output> {
    Ok(ember_cmd(env, args)?.output()?)
}

fn ok(out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!("ember failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn describe(env: &[(&'static str, String)], id: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&ok(ember(env, &["pipeline", "describe", id])?)?)?)
}

fn history(env: &[(&'static str, String)], id: &str) -> anyhow::Result<Vec<Value>> {
    ok(ember(env, &["pipeline", "history", id])?)?.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

const ASK: &str = r#"{"StartAt": "Ask", "States": {
  "Ask": {"Type": "Task", "Resource": "ember:generate",
          "Parameters": {"messages": [{"role": "user", "content.$": "$.question"}], "max_tokens": 16, "temperature": 0},
          "ResultSelector": {"answer.$": "$.text", "tokens.$": "$.usage.completion_tokens"}, "ResultPath": "$.model", "Next": "Check"},
  "Check": {"Type": "Choice", "Choices": [{"Variable": "$.model.answer", "StringMatches": "*Paris*", "Next": "Fan"}], "Default": "Wrong"},
  "Fan": {"Type": "Parallel", "ResultPath": "$.fan", "Next": "Done", "Branches": [
      {"StartAt": "A", "States": {"A": {"Type": "Pass", "Result": "a", "End": true}}},
      {"StartAt": "B", "States": {"B": {"Type": "Pass", "Parameters": {"len.$": "States.ArrayLength($.model.answer_words)"}, "End": true}}}]},
  "Done": {"Type": "Succeed"},
  "Wrong": {"Type": "Fail", "Error": "Agent.Wrong", "Cause": "the model did not say Paris"}}}"#;

#[test]
fn a_pipeline_on_sqs_asks_the_model_routes_and_fails_into_the_dlq() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let endpoint = moto.endpoint();
    rt()?.block_on(async {
        let conf = aws_config_for(&endpoint).await;
        let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());
        s3.create_bucket().bucket("results").send().await
    })?;
    let mut env = aws_env(&endpoint);
    env.extend([
        ("EMBER_SQS_QUEUE", "jobs".to_string()),
        ("EMBER_PIPELINE_SQS_QUEUE", "hops".to_string()),
        ("EMBER_CREATE_QUEUES", "true".to_string()),
        ("EMBER_RESULTS", "s3://results/out".to_string()),
    ]);
    let dir = tempfile::tempdir()?;
    // The B branch reads a path that is not there: this definition fails with States.Runtime
    // naming the path. Fixed, it succeeds.
    let broken = dir.path().join("broken.asl.json");
    std::fs::write(&broken, ASK)?;
    let fixed = dir.path().join("ask.asl.json");
    std::fs::write(
        &fixed,
        ASK.replace("States.ArrayLength($.model.answer_words)", "States.MathAdd($.model.tokens, 1)"),
    )?;
    let question = json!({"question": "What is the capital of France?"}).to_string();
    let start = |file: &Path, name: &str, input: &str| {
        ember(&env, &["pipeline", "start", &file.to_string_lossy(), "--name", name, "--input", input])
    };
    assert_eq!(ok(start(&fixed, "paris", &question)?)?.trim(), "paris");
    // Idempotent by name; a different input under the same name is refused.
    assert_eq!(ok(start(&fixed, "paris", &question)?)?.trim(), "paris");
    let again = start(&fixed, "paris", r#"{"question": "other"}"#)?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("ExecutionAlreadyExists"));
    assert_eq!(ok(start(&broken, "broken", &question)?)?.trim(), "broken");
    // A bad definition never starts: every problem with its location.
    let bad = dir.path().join("bad.asl.json");
    std::fs::write(
        &bad,
        r#"{"StartAt": "X", "States": {"X": {"Type": "Task", "Resource": "arn:aws:lambda:x", "Next": "Y"}}}"#,
    )?;
    let refused = start(&bad, "bad", "{}")?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("/States/X/Next") && err.contains("/States/X/Resource"), "{err}");

    ok(ember(&env, &["serve", "--pipelines", "--exit-when-idle", "--wait-seconds", "1"])?)?;

    let d = describe(&env, "paris")?;
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    assert_eq!(d["output"]["model"]["answer"], "The capital of France is Paris.");
    assert_eq!(d["output"]["fan"], json!(["a", {"len": 8}]), "7 tokens + 1 from the branch");
    let events = history(&env, "paris")?;
    assert_eq!(events.first().map(|e| e["type"].clone()), Some(json!("ExecutionStarted")));
    assert_eq!(events.last().map(|e| e["type"].clone()), Some(json!("ExecutionSucceeded")));
    assert!(events.iter().any(|e| e["type"] == "TaskSucceeded" && e["details"]["resource"] == "ember:generate"));

    let d = describe(&env, "broken")?;
    assert_eq!(d["status"], "FAILED", "{d}");
    assert_eq!(d["error"], "States.Runtime");
    assert!(d["cause"].as_str().unwrap_or_default().contains("$.model.answer_words"), "{d}");
    // The failed execution is parked in the pipeline queue's DLQ, once.
    let hop_env: Vec<_> = env
        .iter()
        .map(|(k, v)| if *k == "EMBER_SQS_QUEUE" { (*k, "hops".to_string()) } else { (*k, v.clone()) })
        .collect();
    let status: Value = serde_json::from_str(&ok(ember(&hop_env, &["status", "--json"])?)?)?;
    assert_eq!(status, json!({"visible": 0, "in_flight": 0, "delayed": 0, "dlq": 1}));
    Ok(())
}

/// A chain with a wait, a Parallel of 8 and a Map of 5: many hops, joins, and time for kills.
const FAN: &str = r#"{"StartAt": "P0", "States": {
  "P0": {"Type": "Pass", "Parameters": {"n.$": "$.n", "steps": 0}, "Next": "P1"},
  "P1": {"Type": "Pass", "Parameters": {"n.$": "$.n", "steps.$": "States.MathAdd($.steps, 1)"}, "Next": "P2"},
  "P2": {"Type": "Pass", "Parameters": {"n.$": "$.n", "steps.$": "States.MathAdd($.steps, 1)"}, "Next": "P3"},
  "P3": {"Type": "Pass", "Parameters": {"n.$": "$.n", "steps.$": "States.MathAdd($.steps, 1)"}, "Next": "Nap"},
  "Nap": {"Type": "Wait", "Seconds": 1, "Next": "Fan"},
  "Fan": {"Type": "Parallel", "ResultPath": "$.fan", "Next": "AfterFan", "Branches": [
    {"StartAt": "B0", "States": {"B0": {"Type": "Pass", "Parameters": {"b": 0, "n.$": "$.n"}, "End": true}}},
    {"StartAt": "B1", "States": {"B1": {"Type": "Pass", "Parameters": {"b": 1, "n.$": "$.n"}, "End": true}}},
    {"StartAt": "B2", "States": {"B2": {"Type": "Pass", "Parameters": {"b": 2, "n.$": "$.n"}, "End": true}}},
    {"StartAt": "B3", "States": {"B3": {"Type": "Pass", "Parameters": {"b": 3, "n.$": "$.n"}, "End": true}}},
    {"StartAt": "B4", "States": {"B4": {"Type": "Pass", "Parameters": {"b": 4, "n.$": "$.n"}, "End": true}}},
    {"StartAt": "B5", "States": {"B5": {"Type": "Pass", "Parameters": {"b": 5, "n.$": "$.n"}, "End": true}}},
    {"StartAt": "B6", "States": {"B6": {"Type": "Pass", "Parameters": {"b": 6, "n.$": "$.n"}, "End": true}}},
    {"StartAt": "B7", "States": {"B7": {"Type": "Pass", "Parameters": {"b": 7, "n.$": "$.n"}, "End": true}}}]},
  "AfterFan": {"Type": "Pass", "Parameters": {"n.$": "$.n", "steps.$": "$.steps", "branches.$": "States.ArrayLength($.fan)", "items": [1, 2, 3, 4, 5]}, "Next": "Each"},
  "Each": {"Type": "Map", "ItemsPath": "$.items", "MaxConcurrency": 0, "ResultPath": "$.squares",
    "ItemSelector": {"x.$": "$$.Map.Item.Value", "n.$": "$.n"},
    "ItemProcessor": {"StartAt": "Sq", "States": {"Sq": {"Type": "Pass", "Parameters": {"v.$": "States.MathAdd($.x, $.n)"}, "End": true}}},
    "Next": "Nap2"},
  "Nap2": {"Type": "Wait", "Seconds": 1, "Next": "End"},
  "End": {"Type": "Pass", "Parameters": {"n.$": "$.n", "steps.$": "$.steps", "branches.$": "$.branches", "squares.$": "$.squares[*].v"}, "End": true}}}"#;

struct Worker(Child);

impl Worker {
    fn start(env: &[(&'static str, String)], log: &Path, seed: u64) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = ember_cmd(env, &["serve", "--pipelines", "--wait-seconds", "1", "--concurrency", "4"])?
            .env("EMBER_VISIBILITY_TIMEOUT", "3")
            // Besides the SIGKILLs from outside, each worker dies on its own right after
            // recording a transition and before sending the next hop, now and then.
            .env(ember_worker::pipeline::CRASH_AFTER_RECORD_ENV, "0.03")
            // Which hops crash follows from the seed alone, the same in every worker.
            .env(ember_worker::pipeline::CRASH_SEED_ENV, seed.to_string())
            .env("EMBER_MAX_RECEIVE_COUNT", "1000")
            .env("EMBER_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Self(child))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn killed_pipeline_workers_finish_every_execution_exactly_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let env = vec![
        ("EMBER_QUEUE_PATH", dir.path().join("queue.db").to_string_lossy().into_owned()),
        ("EMBER_PIPELINE_QUEUE_PATH", dir.path().join("hops.db").to_string_lossy().into_owned()),
        ("EMBER_RESULTS", dir.path().join("results").to_string_lossy().into_owned()),
    ];
    let def = dir.path().join("fan.asl.json");
    std::fs::write(&def, FAN)?;
    let n_exec = 16;
    for n in 0..n_exec {
        let input = json!({"n": n * 10}).to_string();
        ok(ember(
            &env,
            &["pipeline", "start", &def.to_string_lossy(), "--name", &format!("run-{n}"), "--input", &input],
        )?)?;
    }
    let logs: Vec<_> = (0..3).map(|i| dir.path().join(format!("worker-{i}.log"))).collect();
    let seed = ember_tests::test_seed("pipeline crash test");
    let mut workers = logs.iter().map(|l| Worker::start(&env, l, seed)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    // The first kill waits until every worker runs its hop handler (it says so at start), not
    // for a time; each later one a seeded random while.
    for log in &logs {
        while !std::fs::read_to_string(log).unwrap_or_default().contains("failpoint on") {
            if started.elapsed() > Duration::from_secs(300) {
                bail!("{} did not start its hop handler within 5 minutes", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Kills that landed while executions were running, as `describe` showed just before.
    let mut kills = 0;
    loop {
        let finished = (0..n_exec)
            .map(|n| describe(&env, &format!("run-{n}")))
            .collect::<anyhow::Result<Vec<_>>>()?
            .iter()
            .filter(|d| d["status"] != "RUNNING")
            .count();
        if finished == n_exec as usize {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{finished} of {n_exec} executions finished after 10 minutes ({kills} kills, seed {seed})");
        }
        let victim = rng.random_range(0..workers.len());
        workers[victim] = Worker::start(&env, &logs[victim], seed)?; // the old one is killed on drop
        kills += 1;
        // Workers that crashed at the failpoint are started again.
        for (w, log) in workers.iter_mut().zip(&logs) {
            if w.0.try_wait()?.is_some() {
                *w = Worker::start(&env, log, seed)?;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(100..800)));
    }
    drop(workers);
    // Every kill came after `describe` showed executions running. The loop's first turn comes
    // right after the workers are ready, when none of the executions can have finished: each
    // spends 2 s in its Wait states alone.
    assert!(kills >= 1, "no kill happened before the executions finished (seed {seed})");
    // Hops a killed worker held come back after the visibility timeout: one more worker runs
    // them (as duplicates, which must change nothing) until the queue is empty.
    ok(ember_cmd(&env, &["serve", "--pipelines", "--exit-when-idle", "--wait-seconds", "1"])?
        .env("EMBER_VISIBILITY_TIMEOUT", "3")
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&logs[0])?)
        .output()?)?;
    for n in 0..n_exec {
        let id = format!("run-{n}");
        let d = describe(&env, &id)?;
        let squares: Vec<i64> = (1..=5).map(|x| x + n * 10).collect();
        assert_eq!(d["status"], "SUCCEEDED", "{d}");
        assert_eq!(d["output"], json!({"n": n * 10, "steps": 3, "branches": 8, "squares": squares}), "{id}");
        let events = history(&env, &id)?;
        let count = |kind: &str, name: &str| {
            events.iter().filter(|e| e["type"] == kind && (name.is_empty() || e["details"]["name"] == name)).count()
        };
        // Each join continued once, whatever was killed and redelivered.
        assert_eq!(count("PassStateEntered", "AfterFan"), 1, "{id}: the Parallel continued more than once");
        assert_eq!(count("PassStateEntered", "End"), 1, "{id}: the Map continued more than once");
        assert_eq!(count("ExecutionSucceeded", ""), 1, "{id}");
    }
    let hop_env: Vec<_> = env
        .iter()
        .map(|(k, v)| {
            if *k == "EMBER_QUEUE_PATH" {
                (*k, dir.path().join("hops.db").to_string_lossy().into_owned())
            } else {
                (*k, v.clone())
            }
        })
        .collect();
    let status: Value = serde_json::from_str(&ok(ember(&hop_env, &["status", "--json"])?)?)?;
    assert_eq!(status, json!({"visible": 0, "in_flight": 0, "delayed": 0, "dlq": 0}), "after {kills} kills");
    let in_logs = |what: &str| -> usize {
        logs.iter().map(|l| std::fs::read_to_string(l).map(|t| t.matches(what).count()).unwrap_or(0)).sum()
    };
    let (crashes, redelivered) = (in_logs("failpoint: crashing"), in_logs("hop redelivered"));
    assert!(crashes >= 1, "no worker crashed between recording a transition and sending its next hop (seed {seed})");
    assert!(
        redelivered >= crashes,
        "{crashes} crashes after recording, but only {redelivered} recorded hops redelivered"
    );
    eprintln!(
        "pipeline crash test: {kills} kills, {crashes} crashes after recording, {redelivered} recorded hops redelivered, \
         {n_exec} executions, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The shipped examples on the real small model: the agent loop answers in JSON and its answer
/// is taken (the JSONPath agent and its JSONata twin alike); the summarizer maps over documents
/// with the model and joins the summaries.
#[test]
fn the_example_pipelines_run_on_the_small_model() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let env = vec![
        ("EMBER_QUEUE_PATH", dir.path().join("queue.db").to_string_lossy().into_owned()),
        ("EMBER_PIPELINE_QUEUE_PATH", dir.path().join("hops.db").to_string_lossy().into_owned()),
        ("EMBER_RESULTS", dir.path().join("results").to_string_lossy().into_owned()),
        // The agent's http_get may only reach this machine (nothing here needs it).
        ("EMBER_HTTP_ALLOW", "127.0.0.1".to_string()),
    ];
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines");
    let agent = examples.join("agent.asl.json");
    let input = json!({"question": "What is the capital of France?", "max_iterations": 3}).to_string();
    ok(ember(&env, &["pipeline", "start", &agent.to_string_lossy(), "--name", "agent", "--input", &input])?)?;
    let twin = examples.join("agent.jsonata.asl.json");
    ok(ember(&env, &["pipeline", "start", &twin.to_string_lossy(), "--name", "agent-jsonata", "--input", &input])?)?;
    let docs = json!({"documents": [
        {"title": "Paris", "text": "Paris is the capital and largest city of France, on the Seine."},
        {"title": "Rome", "text": "Rome is the capital city of Italy, founded, says the legend, in 753 BC."},
        {"title": "Oslo", "text": "Oslo is the capital of Norway, at the head of the Oslofjord."}
    ]})
    .to_string();
    let summarize = examples.join("summarize.asl.json");
    ok(ember(&env, &["pipeline", "start", &summarize.to_string_lossy(), "--name", "sum", "--input", &docs])?)?;
    ok(ember(&env, &["serve", "--pipelines", "--exit-when-idle", "--wait-seconds", "1"])?)?;

    let d = describe(&env, "agent")?;
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    assert!(d["output"]["answer"].as_str().unwrap_or_default().contains("Paris"), "{d}");
    // Greedy decoding and the same prompts: the twin answers exactly as the JSONPath agent.
    let twin = describe(&env, "agent-jsonata")?;
    assert_eq!(twin["status"], "SUCCEEDED", "{twin}");
    assert_eq!(twin["output"], d["output"], "the JSONata twin answers as the JSONPath agent");
    let d = describe(&env, "sum")?;
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    let generated = history(&env, "sum")?
        .iter()
        .filter(|e| e["type"] == "TaskSucceeded" && e["details"]["resource"] == "ember:generate")
        .count();
    assert_eq!(generated, 4, "three summaries and the join");
    eprintln!("summarize output: {}", d["output"]);
    // The execution's records are where the docs say: pipelines/executions/{id}/ in the store.
    let records = dir.path().join("results/pipelines/executions");
    let ids: Vec<String> = std::fs::read_dir(&records)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(ids.len(), 3, "one record folder per execution under {}: {ids:?}", records.display());
    assert!(ids.iter().all(|id| records.join(id).join("meta.json").is_file()), "{ids:?}");
    Ok(())
}

/// A pipeline started where `http_get` is offered, worked by a worker started without
/// `--http-allow`: its Task fails with `Ember.ToolUnavailable` (a hop is not refused and left
/// running), `describe` reports the execution FAILED with that error and a cause saying what to
/// do, and the failed execution is parked in the pipeline DLQ. `ember dlq redrive --pipelines`
/// then runs it again from that Task on a worker that offers the tool: it succeeds, with a
/// redrive count of 1.
#[test]
fn a_task_whose_tool_the_worker_lacks_fails_visibly_and_redrives_from_the_dlq() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello");
        }
    });
    let dir = tempfile::tempdir()?;
    let hops = dir.path().join("hops.db").to_string_lossy().into_owned();
    let env = vec![
        ("EMBER_QUEUE_PATH", dir.path().join("queue.db").to_string_lossy().into_owned()),
        ("EMBER_PIPELINE_QUEUE_PATH", hops.clone()),
        ("EMBER_RESULTS", dir.path().join("results").to_string_lossy().into_owned()),
    ];
    let def = dir.path().join("fetch.asl.json");
    let fetch = json!({"StartAt": "Fetch", "States": {"Fetch": {"Type": "Task", "Resource": "ember:tool:http_get",
        "Parameters": {"url": format!("http://127.0.0.1:{port}/page")}, "ResultSelector": {"body.$": "$.body"}, "End": true}}});
    std::fs::write(&def, fetch.to_string())?;
    let mut allowed = env.clone();
    allowed.push(("EMBER_HTTP_ALLOW", format!("127.0.0.1:{port}")));
    ok(ember(&allowed, &["pipeline", "start", &def.to_string_lossy(), "--name", "fetch"])?)?;
    let serve = ["serve", "--pipelines", "--exit-when-idle", "--wait-seconds", "1"];
    ok(ember_cmd(&env, &serve)?.env_remove("EMBER_HTTP_ALLOW").output()?)?;
    let d = describe(&env, "fetch")?;
    assert_eq!(d["status"], "FAILED", "{d}");
    assert_eq!(d["error"], "Ember.ToolUnavailable", "{d}");
    assert!(d["cause"].as_str().unwrap_or_default().contains("--http-allow"), "{d}");
    let status: Value = serde_json::from_str(&ok(ember(&env, &["status", "--queue-path", &hops, "--json"])?)?)?;
    assert_eq!(status["dlq"], 1, "the failed execution is parked in the pipeline DLQ: {status}");
    assert_eq!(status["visible"], 0, "{status}");

    let moved: Value = serde_json::from_str(&ok(ember(&env, &["dlq", "redrive", "--pipelines"])?)?)?;
    assert_eq!(moved["redriven"], 1, "{moved}");
    ok(ember(&allowed, &serve)?)?;
    let d = describe(&env, "fetch")?;
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    assert_eq!(d["output"], json!({"body": "hello"}), "{d}");
    assert_eq!(d["redrive_count"], 1, "{d}");
    let status: Value = serde_json::from_str(&ok(ember(&env, &["status", "--queue-path", &hops, "--json"])?)?)?;
    assert_eq!((status["dlq"].as_u64(), status["visible"].as_u64()), (Some(0), Some(0)), "{status}");
    Ok(())
}

/// An `http_get` hop whose server drips its body (one byte every 200 ms, 10 minutes in all)
/// does not hold a worker that is shutting down: after the grace period the hop is dropped
/// (every effect of a hop is create-only, as after a crash), its message goes back to the
/// queue, and the worker exits while the server is still dripping.
#[test]
fn a_dripping_http_get_does_not_hold_a_shutting_down_worker() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (events, seen) = std::sync::mpsc::channel::<&'static str>();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else { return };
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = events.send("connected");
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3000\r\n\r\n");
        for _ in 0..3000 {
            if s.write_all(b"x").and_then(|()| s.flush()).is_err() {
                let _ = events.send("client gone");
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = events.send("finished dripping");
    });

    let dir = tempfile::tempdir()?;
    let env = vec![
        ("EMBER_QUEUE_PATH", dir.path().join("queue.db").to_string_lossy().into_owned()),
        ("EMBER_PIPELINE_QUEUE_PATH", dir.path().join("hops.db").to_string_lossy().into_owned()),
        ("EMBER_RESULTS", dir.path().join("results").to_string_lossy().into_owned()),
        ("EMBER_HTTP_ALLOW", format!("127.0.0.1:{port}")),
    ];
    let def = dir.path().join("fetch.asl.json");
    let fetch = json!({"StartAt": "Fetch", "States": {"Fetch": {"Type": "Task", "Resource": "ember:tool:http_get",
        "Parameters": {"url": format!("http://127.0.0.1:{port}/slow")}, "End": true}}});
    std::fs::write(&def, fetch.to_string())?;
    ok(ember(&env, &["pipeline", "start", &def.to_string_lossy(), "--name", "drip"])?)?;
    let mut worker = ember_cmd(&env, &["serve", "--pipelines", "--grace-seconds", "1", "--wait-seconds", "1"])?
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let connected = seen.recv_timeout(Duration::from_secs(300));
    if connected != Ok("connected") {
        let _ = worker.kill();
        bail!("the hop never reached the server: {connected:?}");
    }
    Command::new("kill").args(["-TERM", &worker.id().to_string()]).status()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = worker.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = worker.kill();
            bail!("the worker did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut e) = worker.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "{status}: {stderr}");
    // The worker let go of the connection while the server still had minutes of body to send.
    assert_eq!(seen.recv_timeout(Duration::from_secs(60)), Ok("client gone"), "{stderr}");
    assert!(stderr.contains("hop stopped"), "{stderr}");
    // The execution is not failed by the shutdown: it is still running, its hop back on the queue.
    assert_eq!(describe(&env, "drip")?["status"], "RUNNING");
    Ok(())
}
