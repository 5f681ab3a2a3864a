//! OpenTelemetry traces read back from a real trace backend (Arize Phoenix on 127.0.0.1, which
//! scripts/install-test-deps.sh installs): jobs submitted through SQS (moto) and run by two
//! workers each appear as one trace, submit -> job -> its stages, with the right parents; a
//! job whose `traceparent` is given continues that trace, and one whose `traceparent` is
//! malformed still runs, in a new trace. Each worker's start-up is a trace of its own, the
//! load's stages under `init`.

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use ember_tests::{aws_config_for, aws_env, smollm_gguf, MotoServer, PhoenixServer};

const GIVEN_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const GIVEN_PARENT: &str = "00f067aa0ba902b7";

fn ember(env: &[(&'static str, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.args(args).env("EMBER_LOG", "warn").env("EMBER_NO_PROGRESS", "1").env_remove("AWS_ENDPOINT_URL");
    cmd.envs(env.iter().cloned());
    cmd
}

fn job_line(custom_id: &str, traceparent: Option<&str>) -> String {
    let mut line = json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "default", "messages": [{"role": "user", "content": format!("Say {custom_id}.")}],
                 "max_tokens": 4}});
    if let Some(t) = traceparent {
        line["ember"] = json!({ "traceparent": t });
    }
    line.to_string()
}

fn attr<'a>(span: &'a Value, name: &str) -> Option<&'a str> {
    span["attributes"][name].as_str()
}

/// Splits off the workers' start-up traces (rooted at `init`), checking each: the root marks
/// the cold start and names the model, and the load's stages hang under it with their
/// seconds. Returns the other spans and how many start-up traces there were.
fn without_init_traces(spans: Vec<Value>) -> anyhow::Result<(Vec<Value>, usize)> {
    let init_traces: HashSet<String> = spans
        .iter()
        .filter(|s| s["name"] == "init")
        .filter_map(|s| s["context"]["trace_id"].as_str().map(str::to_string))
        .collect();
    let (init, rest): (Vec<Value>, Vec<Value>) =
        spans.into_iter().partition(|s| s["context"]["trace_id"].as_str().is_some_and(|t| init_traces.contains(t)));
    for trace in &init_traces {
        let spans: Vec<&Value> = init.iter().filter(|s| s["context"]["trace_id"] == trace.as_str()).collect();
        let root = spans.iter().find(|s| s["name"] == "init").ok_or_else(|| anyhow::anyhow!("no init span"))?;
        assert_eq!(root["parent_id"], Value::Null, "init is the root of its trace");
        assert!(!root["attributes"]["faas.coldstart"].is_null(), "{root}");
        assert!(attr(root, "gen_ai.request.model").is_some_and(|m| !m.is_empty()), "{root}");
        let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
        assert!(names.contains(&"build"), "the load's stages are under init: {names:?}");
        for stage in spans.iter().filter(|s| s["name"] != "init") {
            assert_eq!(stage["parent_id"], root["context"]["span_id"], "{stage}");
            assert!(!stage["attributes"]["ember.seconds"].is_null(), "{stage}");
        }
    }
    Ok((rest, init_traces.len()))
}

/// Waits (polling the backend, not a clock) until it holds at least `want` spans besides the
/// start-up traces of `workers` workers, and answers those spans (see [`without_init_traces`]).
fn spans_when_all_arrived(phoenix: &PhoenixServer, want: usize, workers: usize) -> anyhow::Result<Vec<Value>> {
    let start = Instant::now();
    loop {
        let (spans, starts) = without_init_traces(phoenix.spans()?)?;
        if (spans.len() >= want && starts >= workers) || start.elapsed() > Duration::from_secs(120) {
            assert_eq!(starts, workers, "each worker's start-up is a trace");
            return Ok(spans);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Environment variables for `ember`.
type Env = Vec<(&'static str, String)>;

/// Phoenix, moto with the results bucket, and the environment of a traced worker on them
/// (queues created on first use, the GGUF model, OTLP to Phoenix), with `queues` added.
fn traced_workers(queues: &[(&'static str, &str)]) -> anyhow::Result<(PhoenixServer, MotoServer, Env)> {
    let phoenix = PhoenixServer::start()?;
    let moto = MotoServer::start()?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let conf = aws_config_for(&moto.endpoint()).await;
        let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());
        s3.create_bucket().bucket("ember-results").send().await
    })?;
    let mut env = aws_env(&moto.endpoint());
    env.extend(queues.iter().map(|(k, v)| (*k, v.to_string())));
    env.extend([
        ("EMBER_CREATE_QUEUES", "true".into()),
        ("EMBER_RESULTS", "s3://ember-results/out".into()),
        ("EMBER_MODEL", smollm_gguf()?.to_string_lossy().into_owned()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", phoenix.otlp_endpoint()),
    ]);
    Ok((phoenix, moto, env))
}

#[test]
fn jobs_through_sqs_on_two_workers_are_one_trace_each_with_the_right_parents() -> anyhow::Result<()> {
    let (phoenix, _moto, env) = traced_workers(&[("EMBER_SQS_QUEUE", "traced")])?;

    let dir = tempfile::tempdir()?;
    let given = format!("00-{GIVEN_TRACE}-{GIVEN_PARENT}-01");
    let mut lines: Vec<String> = (0..4).map(|i| job_line(&format!("job-{i}"), None)).collect();
    lines.push(job_line("continued", Some(&given)));
    lines.push(job_line("malformed", Some("00-not-a-trace-context")));
    let file = dir.path().join("batch.jsonl");
    std::fs::write(&file, lines.join("\n"))?;
    let out = ember(&env, &["submit", &file.to_string_lossy(), "--batch-id", "traced"])
        .env("OTEL_SERVICE_NAME", "ember-submit")
        .output()?;
    anyhow::ensure!(out.status.success(), "submit: {}", String::from_utf8_lossy(&out.stderr));

    let workers: Vec<_> = (1..=2)
        .map(|n| {
            ember(&env, &["serve", "--exit-when-idle", "--wait-seconds", "1", "--concurrency", "2"])
                .env("OTEL_SERVICE_NAME", format!("ember-worker-{n}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut done = 0;
    for w in workers {
        let out = w.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "serve: {}", String::from_utf8_lossy(&out.stderr));
        let stats: Value = serde_json::from_slice(&out.stdout)?;
        done += stats["done"].as_u64().unwrap_or(0);
    }
    assert_eq!(done, lines.len() as u64, "every job runs, the malformed trace context too");

    // Per job: submit, job, queue wait, validation, the generation, batcher admission,
    // prefill, decode, result write, delete.
    let stages = 10;
    let spans = spans_when_all_arrived(&phoenix, lines.len() * stages, 2)?;
    let mut traces: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for s in &spans {
        traces.entry(s["context"]["trace_id"].as_str().unwrap_or_default().to_string()).or_default().push(s);
    }
    let mut seen_jobs = HashSet::new();
    for (trace, spans) in &traces {
        let one = |name: &str| -> anyhow::Result<&Value> {
            let found: Vec<_> = spans.iter().filter(|s| s["name"] == name).collect();
            anyhow::ensure!(found.len() == 1, "trace {trace}: {} spans named {name:?}", found.len());
            Ok(found[0])
        };
        let id = |s: &Value| s["context"]["span_id"].as_str().unwrap_or_default().to_string();
        let parent = |s: &Value| s["parent_id"].as_str().map(str::to_string);
        assert_eq!(spans.len(), stages, "trace {trace}: {:?}", spans.iter().map(|s| &s["name"]).collect::<Vec<_>>());

        let submit = one("submit")?;
        assert_eq!(attr(submit, "messaging.system"), Some("aws_sqs"), "the queue is SQS (moto)");
        let custom_id = attr(submit, "ember.custom_id").unwrap_or_default().to_string();
        match custom_id.as_str() {
            "continued" => {
                assert_eq!(trace, GIVEN_TRACE);
                assert_eq!(parent(submit).as_deref(), Some(GIVEN_PARENT));
            }
            _ => {
                assert_ne!(trace, GIVEN_TRACE);
                assert_eq!(parent(submit), None, "{custom_id}: submit starts the trace");
            }
        }
        let job = one("job")?;
        assert_eq!(parent(job), Some(id(submit)));
        assert_eq!(attr(job, "messaging.message.id"), attr(submit, "messaging.message.id"));
        assert_eq!(attr(job, "ember.outcome"), Some("done"));
        let generation = spans
            .iter()
            .find(|s| s["name"].as_str().is_some_and(|n| n.starts_with("chat ")))
            .ok_or_else(|| anyhow::anyhow!("trace {trace} has no generation span"))?;
        assert_eq!(attr(generation, "gen_ai.operation.name"), Some("chat"));
        assert_eq!(attr(generation, "gen_ai.request.max_tokens"), Some("4"));
        assert!(attr(generation, "gen_ai.usage.input_tokens").is_some());
        assert!(attr(generation, "gen_ai.usage.output_tokens").is_some());
        // An array of reasons, one per choice.
        let reasons = &generation["attributes"]["gen_ai.response.finish_reasons"];
        let reasons: Value = match reasons.as_str() {
            Some(text) => serde_json::from_str(text).unwrap_or(Value::Null),
            None => reasons.clone(),
        };
        assert!(reasons == json!(["length"]) || reasons == json!(["stop"]), "{generation}");
        for name in ["queue wait", "validation", "result write", "delete"] {
            assert_eq!(parent(one(name)?), Some(id(job)), "{name} is a child of the job");
        }
        assert_eq!(parent(generation), Some(id(job)));
        for name in ["batcher admission", "prefill", "decode"] {
            assert_eq!(parent(one(name)?), Some(id(generation)), "{name} is a child of the generation");
        }
        seen_jobs.insert(custom_id);
    }
    let want: HashSet<String> =
        (0..4).map(|i| format!("job-{i}")).chain(["continued".into(), "malformed".into()]).collect();
    assert_eq!(seen_jobs, want, "one trace per job");
    Ok(())
}

/// Three states, the middle one a Parallel of two branches, run by two workers as six hop
/// messages (Prepare, Fan, Left, Right, Fan again for the join, Done): one trace for the
/// execution, each hop a span named by its state under the delivery that ran it, each delivery
/// a child of the hop (or the start) that sent it.
const FAN: &str = r#"{"StartAt": "Prepare", "States": {
  "Prepare": {"Type": "Pass", "Result": {"n": 1}, "Next": "Fan"},
  "Fan": {"Type": "Parallel", "ResultPath": "$.fan", "Next": "Done", "Branches": [
      {"StartAt": "Left", "States": {"Left": {"Type": "Pass", "Result": "l", "End": true}}},
      {"StartAt": "Right", "States": {"Right": {"Type": "Pass", "Result": "r", "End": true}}}]},
  "Done": {"Type": "Succeed"}}}"#;

#[test]
fn a_parallel_pipeline_on_two_workers_is_one_trace_of_its_hops() -> anyhow::Result<()> {
    let (phoenix, _moto, env) = traced_workers(&[("EMBER_SQS_QUEUE", "jobs"), ("EMBER_PIPELINE_SQS_QUEUE", "hops")])?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("fan.asl.json");
    std::fs::write(&file, FAN)?;
    let out =
        ember(&env, &["pipeline", "start", &file.to_string_lossy(), "--name", "fan", "--input", "{}"]).output()?;
    anyhow::ensure!(out.status.success(), "start: {}", String::from_utf8_lossy(&out.stderr));
    let workers: Vec<_> = (1..=2)
        .map(|_| {
            ember(&env, &["serve", "--pipelines", "--exit-when-idle", "--wait-seconds", "1"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for w in workers {
        let out = w.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "serve: {}", String::from_utf8_lossy(&out.stderr));
    }

    // The start, and per hop message: the delivery, its queue wait, the hop, the delete.
    let spans = spans_when_all_arrived(&phoenix, 1 + 6 * 4, 2)?;
    let traces: HashSet<&str> = spans.iter().filter_map(|s| s["context"]["trace_id"].as_str()).collect();
    assert_eq!(traces.len(), 1, "one trace for the execution: {traces:?}");
    let by_id: BTreeMap<&str, &Value> =
        spans.iter().filter_map(|s| Some((s["context"]["span_id"].as_str()?, s))).collect();
    let parent_of = |s: &Value| s["parent_id"].as_str().and_then(|p| by_id.get(p).copied());
    let start: Vec<_> = spans.iter().filter(|s| s["name"] == "pipeline start").collect();
    assert_eq!(start.len(), 1);
    assert_eq!(start[0]["parent_id"], Value::Null, "the start is the root");
    let hops: Vec<&Value> = spans.iter().filter(|s| attr(s, "ember.pipeline.state").is_some()).collect();
    let mut states: Vec<&str> = hops.iter().filter_map(|s| s["name"].as_str()).collect();
    states.sort_unstable();
    assert_eq!(states, ["Done", "Fan", "Fan", "Left", "Prepare", "Right"]);
    let mut fan_senders = Vec::new();
    for hop in &hops {
        let name = hop["name"].as_str().unwrap_or_default();
        assert_eq!(attr(hop, "ember.pipeline.state"), Some(name));
        assert_eq!(attr(hop, "ember.pipeline.execution"), Some("fan"));
        let delivery = parent_of(hop).ok_or_else(|| anyhow::anyhow!("{name} has no parent"))?;
        assert_eq!(delivery["name"], "job", "{name} runs inside a delivery");
        let sender = parent_of(delivery).ok_or_else(|| anyhow::anyhow!("{name}'s delivery has no parent"))?;
        let sender_name = sender["name"].as_str().unwrap_or_default();
        let want = match name {
            "Prepare" => "pipeline start",
            "Left" | "Right" | "Done" => "Fan",
            // Entered from Prepare, and again for the join by whichever branch ended last.
            _ => {
                fan_senders.push(sender_name);
                sender_name
            }
        };
        assert_eq!(sender_name, want, "{name} was sent by {want}");
    }
    fan_senders.sort_unstable();
    assert!(matches!(fan_senders[..], ["Left", "Prepare"] | ["Prepare", "Right"]), "Fan was sent by {fan_senders:?}");
    Ok(())
}

/// An HTTP request to `ember serve --http` with a `traceparent` header continues that trace:
/// the request's server span, and under it the batcher's admission, prefill and decode (before,
/// each of those was a trace of its own).
#[test]
fn an_http_request_continues_its_traceparent_with_the_batchers_spans_under_it() -> anyhow::Result<()> {
    const TRACE: &str = "5b8efff798038103d269b633813fc60c";
    let phoenix = PhoenixServer::start()?;
    let port = ember_tests::free_port()?;
    let env = [
        ("EMBER_MODEL", smollm_gguf()?.to_string_lossy().into_owned()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", phoenix.otlp_endpoint()),
    ];
    let mut server = ember(&env, &["serve", "--http-only", "--http", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> anyhow::Result<()> {
        let start = Instant::now();
        while !ember_tests::http_get(port, "/health").is_ok_and(|(status, _)| status == 200) {
            anyhow::ensure!(server.try_wait()?.is_none(), "the server exited");
            anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "the server never became ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        let body = json!({"model": "default", "max_tokens": 4, "stream": true,
            "messages": [{"role": "user", "content": "Say hi."}]});
        let traceparent = format!("00-{TRACE}-a3ce929d0e0e4736-01");
        let (status, answer) = ember_tests::http_request(
            port,
            "POST",
            "/v1/chat/completions",
            &[("traceparent", &traceparent)],
            &body.to_string(),
        )?;
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains("[DONE]"), "{answer}");

        let start = Instant::now();
        let spans = loop {
            let spans: Vec<Value> =
                phoenix.spans()?.into_iter().filter(|s| s["context"]["trace_id"] == TRACE).collect();
            if spans.len() >= 4 || start.elapsed() > Duration::from_secs(120) {
                break spans;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let named = |name: &str| spans.iter().find(|s| s["name"] == name);
        let request =
            named("POST /v1/chat/completions").ok_or_else(|| anyhow::anyhow!("no request span: {spans:#?}"))?;
        assert_eq!(request["parent_id"], "a3ce929d0e0e4736", "the request continues the caller's span");
        for name in ["batcher admission", "prefill", "decode"] {
            let span = named(name).ok_or_else(|| anyhow::anyhow!("no {name} span in the trace: {spans:#?}"))?;
            assert_eq!(span["parent_id"], request["context"]["span_id"], "{name} is under the request");
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}
