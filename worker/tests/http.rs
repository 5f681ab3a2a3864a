//! `ember serve --http` against the official `openai` Python client (pinned in
//! scripts/install-test-deps.sh), with the real small model on 127.0.0.1: answers equal to the
//! batch path's, concurrent streams, disconnects, a full batch, bad requests.
//!
//! Each test starts its own server on port 0 and learns the port from the server's first
//! stdout line; it sends nothing before the server's "ready" line, so nothing waits on a clock.

#[path = "support/http_server.rs"]
mod http_server;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use http_server::{model, Server};

const FRANCE: &str = "What is the capital of France?";

/// Runs batch lines through the queue path (`ember run`, one job at a time, so every answer
/// is a single run) and answers the output lines by custom_id.
fn batch_run(lines: &[Value], extra: &[&str]) -> anyhow::Result<std::collections::HashMap<String, Value>> {
    let dir = tempfile::tempdir()?;
    let input: PathBuf = dir.path().join("batch.jsonl");
    std::fs::write(&input, lines.iter().map(|l| format!("{l}\n")).collect::<String>())?;
    let model = model()?;
    let mut args = vec!["run", "batch.jsonl", "--model", &model, "--output", "out.jsonl", "--concurrency", "1"];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(&args)
        .current_dir(dir.path())
        .env("EMBER_LOG", "warn")
        .env_remove("AWS_ENDPOINT_URL")
        .output()?;
    if !out.status.success() {
        bail!("ember run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = std::fs::read_to_string(dir.path().join("out.jsonl"))?;
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            Ok((v["custom_id"].as_str().unwrap_or_default().to_string(), v))
        })
        .collect()
}

fn chat_line(id: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}})
}

fn completion_line(id: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"custom_id": id, "method": "POST", "url": "/v1/completions",
        "body": {"model": "default", "prompt": prompt, "max_tokens": max_tokens}})
}

/// The text of a successful batch output line.
fn batch_text(line: &Value) -> anyhow::Result<String> {
    let body = &line["response"]["body"];
    let choice = &body["choices"][0];
    match choice["message"]["content"].as_str().or_else(|| choice["text"].as_str()) {
        Some(t) => Ok(t.to_string()),
        None => bail!("not a successful output line: {line}"),
    }
}

#[test]
fn answers_equal_the_batch_paths_whole_and_streamed() -> anyhow::Result<()> {
    let completion_prompt = "The three primary colors are";
    let batch = batch_run(&[chat_line("chat", FRANCE, 24), completion_line("text", completion_prompt, 16)], &[])?;
    let server = Server::start(&["--concurrency", "4"])?;

    let chat_batch = &batch["chat"]["response"]["body"];
    for (stream, usage) in [(false, false), (true, false), (true, true)] {
        let got = server
            .client(json!({"op": "chat", "prompt": FRANCE, "max_tokens": 24, "stream": stream, "usage": usage}))?;
        assert_eq!(got["text"].as_str(), Some(batch_text(&batch["chat"])?.as_str()), "stream {stream}: {got}");
        assert_eq!(got["finish_reason"], chat_batch["choices"][0]["finish_reason"], "{got}");
        if stream {
            assert_eq!(got["role"], "assistant", "{got}");
            assert_eq!(got["objects"], json!(["chat.completion.chunk"]), "{got}");
            assert!(got["pieces"].as_u64() > Some(1), "the answer came in one piece: {got}");
        } else {
            assert_eq!(got["object"], "chat.completion");
        }
        if usage || !stream {
            assert_eq!(got["usage"], chat_batch["usage"], "{got}");
        } else {
            assert_eq!(got["usage"], Value::Null, "usage was not asked for: {got}");
        }
    }
    let text_batch = &batch["text"]["response"]["body"];
    for (stream, usage) in [(false, false), (true, true)] {
        let got = server.client(
            json!({"op": "complete", "prompt": completion_prompt, "max_tokens": 16, "stream": stream, "usage": usage}),
        )?;
        assert_eq!(got["text"].as_str(), Some(batch_text(&batch["text"])?.as_str()), "stream {stream}: {got}");
        assert_eq!(got["finish_reason"], text_batch["choices"][0]["finish_reason"], "{got}");
        assert_eq!(got["usage"], text_batch["usage"], "{got}");
    }
    assert_eq!(server.client(json!({"op": "models"}))?, json!(["SmolLM2-135M-Instruct.Q4_1"]));
    let health = server.client(json!({"op": "health"}))?;
    assert_eq!(health["status"], 200, "{health}");
    assert_eq!(health["body"]["batch"]["finished"], 5, "{health}");
    Ok(())
}

#[test]
fn sixteen_concurrent_streams_all_finish_with_their_single_run_answers() -> anyhow::Result<()> {
    let prompts: Vec<String> = (1..=16).map(|i| format!("Write one sentence about the number {i}.")).collect();
    let lines: Vec<Value> = prompts.iter().enumerate().map(|(i, p)| chat_line(&format!("p{i}"), p, 16)).collect();
    let single = batch_run(&lines, &[])?;
    let server = Server::start(&["--concurrency", "16"])?;
    let got = server.client(json!({"op": "concurrent", "prompts": prompts, "max_tokens": 16}))?;
    let got = got.as_array().context("a list of answers")?;
    assert_eq!(got.len(), 16);
    for (i, answer) in got.iter().enumerate() {
        let line = &single[&format!("p{i}")];
        assert_eq!(answer["text"].as_str(), Some(batch_text(line)?.as_str()), "stream {i}: {answer}");
        assert_eq!(answer["usage"], line["response"]["body"]["usage"], "stream {i}: {answer}");
    }
    Ok(())
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_slot() -> anyhow::Result<()> {
    // One slot: the next request can only start once the abandoned stream has left it. The
    // abandoned one would run for 2,000 tokens (greedy, this prompt does not stop early).
    let server = Server::start(&["--concurrency", "1"])?;
    let got = server.client(json!({"op": "disconnect", "prompt": FRANCE, "max_tokens": 2000, "read": 3,
        "next_prompt": "Say hello.", "next_max_tokens": 8}))?;
    assert_eq!(got["read"], 3, "{got}");
    assert!(!got["next"]["text"].as_str().unwrap_or_default().is_empty(), "{got}");
    let health = server.client(json!({"op": "health"}))?;
    assert_eq!(health["body"]["batch"]["cancelled"], 1, "the stream was not cancelled: {health}");
    assert_eq!(health["body"]["batch"]["finished"], 1, "{health}");
    assert_eq!(health["body"]["batch"]["running"], 0, "{health}");
    Ok(())
}

#[test]
fn a_full_batch_answers_429_with_retry_after_then_serves_again() -> anyhow::Result<()> {
    // One slot and no waiting: a request that finds the slot taken is refused at once.
    let server = Server::start(&["--concurrency", "1", "--http-admit-ms", "0"])?;
    let got = server.client(json!({"op": "overload", "prompt": FRANCE, "max_tokens": 200,
        "next_prompt": "Say hello.", "next_max_tokens": 8}))?;
    let refused = &got["refused"];
    assert_eq!(refused["status"], 429, "{got}");
    assert_eq!(refused["body"]["error"]["code"], "overloaded", "{got}");
    assert_eq!(refused["body"]["error"]["type"], "rate_limit_error", "{got}");
    assert_eq!(refused["retry_after"], "1", "{got}");
    // The stream that held the slot ran to its end, and the slot then served the next one.
    assert_eq!(got["held"]["finish_reason"], "length", "{got}");
    assert!(!got["after"]["text"].as_str().unwrap_or_default().is_empty(), "{got}");
    Ok(())
}

#[test]
fn bad_requests_get_the_batch_error_bodies_and_the_server_keeps_serving() -> anyhow::Result<()> {
    let mut unknown = chat_line("unknown", "Hi", 4);
    unknown["body"]["foo"] = json!(1);
    let batch = batch_run(&[unknown], &[])?;
    let server = Server::start(&[])?;
    let got =
        server.client(json!({"op": "errors", "over_context_words": 9000, "prompt": "Say hello.", "max_tokens": 8}))?;

    let malformed = &got["malformed_json"];
    assert_eq!(malformed["status"], 400, "{got}");
    assert_eq!(malformed["body"]["error"]["code"], "invalid_json", "{got}");
    assert_eq!(malformed["body"]["error"]["type"], "invalid_request_error", "{got}");

    // The same body, word for word, as the batch path's error result for the same request.
    let unknown = &got["unknown_field"];
    assert_eq!(unknown["status"], 400, "{got}");
    assert_eq!(unknown["body"], batch["unknown"]["response"]["body"], "{got}");
    assert_eq!(unknown["body"]["error"]["code"], "unknown_parameter", "{got}");
    assert_eq!(unknown["body"]["error"]["param"], "body.foo", "{got}");

    let large = &got["two_mb_body"];
    assert_eq!(large["status"], 413, "{got}");
    assert_eq!(large["body"]["error"]["code"], "body_too_large", "{got}");

    let long = &got["over_context"];
    assert_eq!(long["status"], 400, "{got}");
    assert_eq!(long["body"]["error"]["code"], "context_length_exceeded", "{got}");
    assert!(long["body"]["error"]["message"].as_str().unwrap_or_default().contains("8192"), "{got}");

    assert!(!got["after"]["text"].as_str().unwrap_or_default().is_empty(), "{got}");
    Ok(())
}

#[test]
fn a_served_model_name_and_an_api_key() -> anyhow::Result<()> {
    let server = Server::start(&["--served-model-name", "gpt-4o-mini", "--api-key", "sk-test-key"])?;
    let key = |k: &str| json!({"api_key": k, "model": "gpt-4o-mini"});
    let mut wrong = key("sk-wrong");
    wrong["op"] = json!("refused");
    wrong["prompt"] = json!("Hi");
    wrong["max_tokens"] = json!(4);
    let refused = server.client(wrong)?;
    assert_eq!(refused["status"], 401, "{refused}");
    assert_eq!(refused["body"]["error"]["code"], "invalid_api_key", "{refused}");

    let mut models = key("sk-test-key");
    models["op"] = json!("models");
    assert_eq!(server.client(models)?, json!(["gpt-4o-mini"]));
    let mut chat = key("sk-test-key");
    chat["op"] = json!("chat");
    chat["prompt"] = json!(FRANCE);
    chat["max_tokens"] = json!(8);
    let answer = server.client(chat)?;
    assert_eq!(answer["model"], "gpt-4o-mini", "{answer}");
    // Health needs no key: load balancers probe it.
    assert_eq!(server.client(json!({"op": "health"}))?["status"], 200);

    // Batch files name the same model.
    let mut line = chat_line("named", FRANCE, 8);
    line["body"]["model"] = json!("gpt-4o-mini");
    let batch = batch_run(&[line], &["--served-model-name", "gpt-4o-mini"])?;
    assert_eq!(batch["named"]["response"]["body"]["model"], "gpt-4o-mini", "{:?}", batch["named"]);
    assert_eq!(batch_text(&batch["named"])?, answer["text"].as_str().unwrap_or_default());
    Ok(())
}

/// `ember batch status ID --json` of the batch submitted in `dir`.
fn batch_status(dir: &std::path::Path, batch_id: &str) -> anyhow::Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["batch", "status", batch_id, "--json"])
        .current_dir(dir)
        .env("EMBER_LOG", "warn")
        .env_remove("AWS_ENDPOINT_URL")
        .output()?;
    if !out.status.success() {
        bail!("ember batch status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn queued_jobs_and_http_requests_share_one_model_and_one_batcher() -> anyhow::Result<()> {
    // Six jobs on the embedded queue and four streaming HTTP requests, all for one
    // `ember serve --http` process (a queue worker and the server) with four batch slots.
    let jobs: Vec<Value> = (1..=6)
        .map(|i| {
            chat_line(
                &format!("job{i}"),
                &format!("Name a fruit that starts with the letter {}.", (b'a' + i) as char),
                16,
            )
        })
        .collect();
    let prompts: Vec<String> = (1..=4).map(|i| format!("Write one sentence about the color number {i}.")).collect();
    let http_lines: Vec<Value> =
        prompts.iter().enumerate().map(|(i, p)| chat_line(&format!("http{i}"), p, 16)).collect();
    let single = batch_run(&[jobs.clone(), http_lines].concat(), &[])?;

    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("jobs.jsonl"), jobs.iter().map(|l| format!("{l}\n")).collect::<String>())?;
    let submit = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["submit", "jobs.jsonl", "--batch-id", "mixed"])
        .current_dir(dir.path())
        .env("EMBER_LOG", "warn")
        .env_remove("AWS_ENDPOINT_URL")
        .output()?;
    ensure_ok(&submit, "ember submit")?;
    let model = model()?;
    let server = Server::start_in(dir, &["--model", &model, "--concurrency", "4", "--wait-seconds", "1"])?;

    let got = server.client(json!({"op": "concurrent", "prompts": prompts, "max_tokens": 16}))?;
    let got = got.as_array().context("a list of answers")?;
    assert_eq!(got.len(), prompts.len());
    for (i, answer) in got.iter().enumerate() {
        let line = &single[&format!("http{i}")];
        assert_eq!(answer["text"].as_str(), Some(batch_text(line)?.as_str()), "request {i}: {answer}");
        assert_eq!(answer["usage"], line["response"]["body"]["usage"], "request {i}: {answer}");
    }

    // The queue worker goes on until every job has its result; each poll is one `ember batch
    // status`, and the bound only keeps a broken worker from hanging the test.
    let start = std::time::Instant::now();
    loop {
        let status = batch_status(server.dir(), "mixed")?;
        if status["status"] == "completed" {
            assert_eq!(status["request_counts"], json!({"total": 6, "completed": 6, "failed": 0}), "{status}");
            break;
        }
        if start.elapsed() > std::time::Duration::from_secs(30 * 60) {
            bail!("the batch did not complete: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let output = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["batch", "output", "mixed", "--output", "-"])
        .current_dir(server.dir())
        .env("EMBER_LOG", "warn")
        .env_remove("AWS_ENDPOINT_URL")
        .output()?;
    ensure_ok(&output, "ember batch output")?;
    let lines: Vec<Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), jobs.len());
    for line in &lines {
        let id = line["custom_id"].as_str().context("a custom_id")?;
        assert_eq!(batch_text(line)?, batch_text(&single[id])?, "job {id}: {line}");
    }
    // One batcher ran all ten: the server's health counts the queued jobs too.
    let health = server.client(json!({"op": "health"}))?;
    assert_eq!(health["body"]["batch"]["finished"], 10, "{health}");
    Ok(())
}

fn ensure_ok(out: &std::process::Output, what: &str) -> anyhow::Result<()> {
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
