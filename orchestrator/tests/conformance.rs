//! Conformance: every definition under `examples/pipelines/conformance/` runs on Ember's
//! interpreter (in process, virtual time) and on moto's Step Functions executor; the final
//! status and output (or error and cause) must be equal.
//!
//! Files per case: `NAME.asl.json` (the definition), `NAME.input.json`, and optionally
//! `NAME.check.json`:
//! - `"shape": ["key", ...]`: output keys whose values are random (UUID, times): compared by
//!   JSON type only (a key starting with `/` is a JSON pointer into the output);
//! - `"error_only": true`: compare the error name, not the cause text (AWS causes name event
//!   ids and embed the input);
//! - `"moto_differs": "why", "aws": {"status": .., "output"|"error"|"cause": ..}`: moto
//!   disagrees with the AWS documentation; Ember is checked against `aws` instead (listed in
//!   `orchestrator/CONFORMANCE.md`).
//! - `"moto_cannot": "why", "aws": {..}, "source": "where"`: moto cannot run the case at all
//!   (JSONata, workflow variables); it runs on Ember only and is compared with `aws`, the
//!   result AWS recorded (`source` names the recording or the AWS doc page). With
//!   `"invalid": "text"` instead of `aws`, Ember must reject the definition with an error
//!   whose message contains `text` (AWS rejects it at CreateStateMachine).
//!
//! A Task with `"Resource": "ember:tool:fail"` stands for a task that fails: on moto it
//! becomes an SQS `sendMessage` to a queue that does not exist (moto runs no Lambda code),
//! which fails with `SQS.SdkClientException` / `The specified queue does not exist.`; on
//! Ember the fail tool is given that same error and cause.
//!
//! Needs `moto_server` (`scripts/install-test-deps.sh` installs it): without it the test
//! fails and says so; it never passes without comparing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use ember_orchestrator::pipeline::{run_to_completion, DriverOptions, ExecutionStatus, Run, Tools};

const FAIL_ERROR: &str = "SQS.SdkClientException";
const FAIL_CAUSE: &str = "The specified queue does not exist.";

struct Case {
    name: String,
    definition: Value,
    input: Value,
    check: Value,
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines/conformance")
}

fn load_cases() -> Vec<Case> {
    let dir = cases_dir();
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("conformance dir")
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".asl.json").map(str::to_string))
        .collect();
    names.sort();
    for name in names {
        let read = |ext: &str| -> Option<Value> {
            let p = dir.join(format!("{name}.{ext}.json"));
            p.exists().then(|| serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap())
        };
        out.push(Case {
            definition: read("asl").unwrap(),
            input: read("input").unwrap_or(json!({})),
            check: read("check").unwrap_or(json!({})),
            name,
        });
    }
    out
}

/// Rewrites every `ember:tool:fail` Task: `moto` gets an SQS sendMessage to a missing queue,
/// Ember gets the error and cause moto produces (as `Arguments` in a JSONata state, which has
/// no `Parameters`).
fn rewrite(v: &mut Value, moto_endpoint: Option<&str>) {
    rewrite_in(v, moto_endpoint, false)
}

fn rewrite_in(v: &mut Value, moto_endpoint: Option<&str>, jsonata: bool) {
    match v {
        Value::Object(m) => {
            let jsonata = match m.get("QueryLanguage").and_then(Value::as_str) {
                Some(ql) => ql == "JSONata",
                None => jsonata,
            };
            if m.get("Type") == Some(&json!("Task")) && m.get("Resource") == Some(&json!("ember:tool:fail")) {
                match moto_endpoint {
                    Some(ep) => {
                        m.insert("Resource".into(), json!("arn:aws:states:::sqs:sendMessage"));
                        m.insert(
                            "Parameters".into(),
                            json!({"QueueUrl": format!("{ep}/123456789012/ember-conformance-missing"), "MessageBody": "x"}),
                        );
                    }
                    None => {
                        let field = if jsonata { "Arguments" } else { "Parameters" };
                        m.insert(field.into(), json!({"Error": FAIL_ERROR, "Cause": FAIL_CAUSE}));
                    }
                }
            }
            for (_, x) in m.iter_mut() {
                rewrite_in(x, moto_endpoint, jsonata);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_in(x, moto_endpoint, jsonata)),
        _ => {}
    }
}

/// The comparable result: status plus output or error (and cause).
fn result(status: &str, output: Option<Value>, error: Option<String>, cause: Option<String>, check: &Value) -> Value {
    let mut output = output;
    if let (Some(out), Some(keys)) = (output.as_mut(), check.get("shape").and_then(Value::as_array)) {
        for k in keys.iter().filter_map(Value::as_str) {
            let v = if k.starts_with('/') { out.pointer_mut(k) } else { out.get_mut(k) };
            if let Some(v) = v {
                *v = json!(format!("<{}>", type_name(v)));
            }
        }
    }
    let error_only = check.get("error_only") == Some(&json!(true));
    match status {
        "SUCCEEDED" => json!({"status": status, "output": output}),
        _ => json!({"status": status, "error": error, "cause": if error_only { json!("<any>") } else { json!(cause) }}),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The result `aws` in the check file describes, in the shape `result` gives.
fn recorded_aws(check: &Value) -> Value {
    let aws = &check["aws"];
    result(
        aws["status"].as_str().unwrap_or("SUCCEEDED"),
        aws.get("output").cloned(),
        aws.get("error").and_then(Value::as_str).map(str::to_string),
        aws.get("cause").and_then(Value::as_str).map(str::to_string),
        check,
    )
}

async fn ember_run(case: &Case) -> Result<Run, String> {
    let mut def = case.definition.clone();
    rewrite(&mut def, None);
    run_to_completion(Tools::builtin(), &def.to_string(), case.input.clone(), DriverOptions::default())
        .await
        .map_err(|e| e.to_string())
}

/// A case moto cannot run: Ember alone, against the recorded AWS answer. `None` when it agrees.
async fn check_without_moto(case: &Case) -> Option<String> {
    let run = ember_run(case).await;
    if let Some(expected) = case.check.get("invalid").and_then(Value::as_str) {
        return match run {
            Err(e) if e.contains(expected) => None,
            Err(e) => Some(format!("rejected, but the message does not name {expected:?}: {e}")),
            Ok(run) => Some(format!("accepted (ran to {:?}); AWS rejects it: {expected}", run.description.status)),
        };
    }
    let ember = match run {
        Ok(run) => ember_result(run, &case.check),
        Err(e) => return Some(format!("Ember rejected the case: {e}")),
    };
    let aws = recorded_aws(&case.check);
    (ember != aws).then(|| format!("\n    aws:   {aws}\n    ember: {ember}"))
}

async fn run_ember(case: &Case) -> Value {
    let run = ember_run(case).await.unwrap_or_else(|e| panic!("{}: Ember rejected the case: {e}", case.name));
    ember_result(run, &case.check)
}

fn ember_result(run: Run, check: &Value) -> Value {
    let d = run.description;
    let status = match d.status {
        ExecutionStatus::Succeeded => "SUCCEEDED",
        ExecutionStatus::Failed => "FAILED",
        ExecutionStatus::Running => "RUNNING",
    };
    result(status, d.output, d.error, d.cause, check)
}

async fn run_moto(
    client: aws_sdk_sfn::Client,
    endpoint: String,
    case_name: String,
    definition: Value,
    input: Value,
    check: Value,
) -> Value {
    let mut def = definition;
    rewrite(&mut def, Some(&endpoint));
    let sm_name: String = format!("c-{case_name}").chars().take(80).collect();
    let arn = client
        .create_state_machine()
        .name(sm_name)
        .definition(def.to_string())
        .role_arn("arn:aws:iam::123456789012:role/ember-conformance")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{case_name}: moto create_state_machine: {e:?}"))
        .state_machine_arn;
    let exec = client
        .start_execution()
        .state_machine_arn(arn)
        .input(input.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{case_name}: moto start_execution: {e:?}"))
        .execution_arn;
    let start = Instant::now();
    loop {
        let d = match client.describe_execution().execution_arn(&exec).send().await {
            Ok(d) => d,
            Err(e) => {
                return json!({"status": "MOTO_ERROR", "detail": format!("{e:?}").chars().take(300).collect::<String>()})
            }
        };
        let status = d.status.as_str().to_string();
        if status != "RUNNING" {
            let output = d.output.as_deref().map(|o| serde_json::from_str(o).unwrap_or(json!(o)));
            return result(&status, output, d.error, d.cause, &check);
        }
        if start.elapsed() > Duration::from_secs(90) {
            return json!({"status": "TIMED_OUT_IN_TEST"});
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn enable_sfn_execution(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"stepfunctions":{"execute_state_machine":true}}"#;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("moto on 127.0.0.1:{port} (to enable Step Functions executions): {e}"));
    let req = format!(
        "POST /moto-api/config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 2") || resp.starts_with("HTTP/1.0 2"), "moto config: {resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ember_matches_step_functions_on_moto() {
    let cases = load_cases();
    assert!(cases.len() >= 40, "only {} conformance cases", cases.len());
    let moto = ember_tests::MotoServer::start().unwrap_or_else(|e| {
        panic!(
            "this test compares with moto's Step Functions, and moto_server did not start: {e:#}. \
             Install it with scripts/install-test-deps.sh (moto[server]==5.2.5), or point MOTO_SERVER at it"
        )
    });
    enable_sfn_execution(moto.port).await;
    let cfg = moto.aws_config().await;
    let client = aws_sdk_sfn::Client::new(&cfg);

    let (without_moto, cases): (Vec<Case>, Vec<Case>) =
        cases.into_iter().partition(|c| c.check.get("moto_cannot").is_some());
    let moto_runs: Vec<_> = cases
        .iter()
        .map(|c| {
            tokio::spawn(run_moto(
                client.clone(),
                moto.endpoint(),
                c.name.clone(),
                c.definition.clone(),
                c.input.clone(),
                c.check.clone(),
            ))
        })
        .collect();
    let mut mismatches = Vec::new();
    let mut moto_diffs = BTreeMap::new();
    for case in &without_moto {
        assert!(
            case.check.get("source").and_then(Value::as_str).is_some_and(|s| !s.is_empty()),
            "{}: a moto_cannot case names the source of its expected answer",
            case.name
        );
        let kind = if case.check.get("invalid").is_some() { "rejected as on AWS" } else { "recorded AWS result" };
        match check_without_moto(case).await {
            None => println!("{:<40} ok  {kind}", case.name),
            Some(why) => {
                println!("{:<40} MISMATCH with the {kind}: {why}", case.name);
                mismatches.push(format!("{} ({kind}): {why}", case.name));
            }
        }
    }
    let aws_agree = without_moto.len() - mismatches.len();
    let mut moto_equal = 0;
    for (case, moto_run) in cases.iter().zip(moto_runs) {
        let ember = run_ember(case).await;
        let moto = moto_run.await.unwrap();
        if let Some(why) = case.check.get("moto_differs") {
            let aws = recorded_aws(&case.check);
            println!("{:<40} moto differs from AWS ({why}): moto {moto}, Ember {ember}", case.name);
            if ember != aws {
                mismatches.push(format!("{}: Ember {ember} but the AWS documentation says {aws}", case.name));
            }
            if moto == aws {
                mismatches.push(format!("{}: marked moto_differs but moto now gives the AWS answer {aws}", case.name));
            }
            moto_diffs.insert(case.name.clone(), why.clone());
            continue;
        }
        if ember == moto {
            moto_equal += 1;
            println!("{:<40} ok  {}", case.name, ember);
        } else {
            println!("{:<40} MISMATCH\n    moto:  {moto}\n    ember: {ember}", case.name);
            mismatches.push(format!("{}:\n    moto:  {moto}\n    ember: {ember}", case.name));
        }
    }
    println!(
        "{} cases: {} compared with moto ({} equal, {} where moto differs from the AWS docs), \
         {} moto cannot run compared with recorded AWS results ({} agree)",
        cases.len() + without_moto.len(),
        cases.len(),
        moto_equal,
        moto_diffs.len(),
        without_moto.len(),
        aws_agree,
    );
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
}
