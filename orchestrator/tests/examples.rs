//! Every definition under `examples/pipelines/` validates, and the agent and summarize
//! examples run end to end with a stand-in for the model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use ember_orchestrator::asl::{validate, Resources};
use ember_orchestrator::pipeline::{
    run_to_completion, DriverOptions, ExecutionStatus, TaskFailure, Tools, WithGenerate,
};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines")
}

fn asl_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            asl_files(&p, out);
        } else if p.to_string_lossy().ends_with(".asl.json") {
            out.push(p);
        }
    }
}

#[test]
fn every_example_validates() {
    let mut files = Vec::new();
    asl_files(&examples(), &mut files);
    assert!(files.len() >= 42, "found only {}", files.len());
    let resources = Resources::with_tools(["json", "http_get", "fail"]);
    for f in files {
        // Conformance cases of definitions AWS rejects must be rejected (the conformance test
        // checks that): every other example validates.
        let check = f.to_string_lossy().replace(".asl.json", ".check.json");
        let check: Value = std::fs::read_to_string(&check).map_or(Value::Null, |c| serde_json::from_str(&c).unwrap());
        if check.get("invalid").is_some() {
            continue;
        }
        let src = std::fs::read_to_string(&f).unwrap();
        if let Err(e) = validate(&src, &resources) {
            panic!("{}: {e}", f.display());
        }
    }
}

fn read(name: &str) -> String {
    std::fs::read_to_string(examples().join(name)).unwrap()
}

/// The agent example and its JSONata twin (variables instead of a carried state object).
const AGENTS: [&str; 2] = ["agent.asl.json", "agent.jsonata.asl.json"];

#[tokio::test]
async fn agent_calls_a_tool_then_answers() {
    for file in AGENTS {
        agent_calls_a_tool_then_answers_in(file).await;
    }
}

async fn agent_calls_a_tool_then_answers_in(file: &str) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let generate = move |req: Value| -> Result<Value, TaskFailure> {
        let n = c.fetch_add(1, Ordering::SeqCst);
        let user = req["messages"].as_array().and_then(|m| m.last()).unwrap()["content"].as_str().unwrap().to_string();
        let text = match n {
            0 => "Let me look: {\"tool\": \"http_get\", \"url\": \"http://docs.local/paris\"}".to_string(),
            1 => "not json at all".to_string(),
            _ => {
                assert!(user.contains("Paris is the capital"), "the tool result went back in: {user}");
                "{\"answer\": \"Paris\"}".to_string()
            }
        };
        Ok(json!({"text": text}))
    };
    let tools = Tools::builtin().register("http_get", |v: Value| async move {
        assert_eq!(v["url"], "http://docs.local/paris");
        Ok(json!({"status": 200, "body": "Paris is the capital of France."}))
    });
    let runner = WithGenerate { tools, generate };
    let input = json!({"question": "What is the capital of France?", "max_iterations": 5});
    let run = run_to_completion(runner, &read(file), input, DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.status, ExecutionStatus::Succeeded, "{file}: {:?}", run.description);
    assert_eq!(run.description.output, Some(json!({"answer": "Paris", "iterations": 3})), "{file}");
}

#[tokio::test]
async fn agent_stops_at_its_iteration_limit() {
    for file in AGENTS {
        agent_stops_at_its_iteration_limit_in(file).await;
    }
}

async fn agent_stops_at_its_iteration_limit_in(file: &str) {
    let runner = WithGenerate {
        tools: Tools::builtin().register("http_get", |_v: Value| async { Ok(json!({"status": 404, "body": ""})) }),
        generate: |_req: Value| -> Result<Value, TaskFailure> {
            Ok(json!({"text": "{\"tool\": \"http_get\", \"url\": \"http://x/\"}"}))
        },
    };
    let input = json!({"question": "?", "max_iterations": 3});
    let run = run_to_completion(runner, &read(file), input, DriverOptions::default()).await.unwrap();
    assert_eq!(run.description.error.as_deref(), Some("Agent.IterationLimit"), "{file}");
    assert_eq!(run.description.cause.as_deref(), Some("no answer after 3 iterations"), "{file}");
}

#[tokio::test]
async fn summarize_maps_then_joins() {
    let generate = |req: Value| -> Result<Value, TaskFailure> {
        let user = req["messages"].as_array().and_then(|m| m.last()).unwrap()["content"].as_str().unwrap();
        Ok(json!({"text": format!("summary of {}", user.lines().next().unwrap_or(""))}))
    };
    let runner =
        WithGenerate { tools: Tools::builtin().register("http_get", |v: Value| async move { Ok(v) }), generate };
    let docs: Vec<Value> = (0..6).map(|i| json!({"title": format!("doc{i}"), "text": "body"})).collect();
    let run =
        run_to_completion(runner, &read("summarize.asl.json"), json!({"documents": docs}), DriverOptions::default())
            .await
            .unwrap();
    let out = run.description.output.expect("succeeded");
    assert_eq!(out["count"], 6);
    assert_eq!(out["documents"][5], json!({"index": 5, "title": "doc5", "summary": "summary of doc5"}));
    assert!(out["summary"].as_str().unwrap().starts_with("summary of [\"summary of doc0\""), "{out}");
}
