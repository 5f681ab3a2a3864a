//! `ember lambda`, the AWS Lambda entry point, with real parts only:
//! - under cargo-lambda's local Runtime API (`cargo lambda watch`, which builds and runs the
//!   `ember` binary with the `lambda` subcommand), results in S3 on a moto server, the real
//!   small model: an SQS event of good and bad jobs answers with exactly the bad records in
//!   `batchItemFailures`, the good ones' results and the bad ones' error results are in the
//!   bucket, and a second invocation reuses the loaded model;
//! - the batch function itself with the real job handler and model: the deadline cancels a
//!   running generation and leaves the rest of the batch unstarted, all of it reported; a
//!   record that cannot be reported fails the invocation;
//! - function URL requests under cargo-lambda's function URL endpoint (`/lambda-url/ember/...`),
//!   which passes a streamed response on as it comes: with `EMBER_URL_STREAMING`, the official
//!   `openai` client reads streamed and whole answers equal to the SQS path's in the same
//!   function, and bad requests get the statuses and bodies `ember serve --http` gives them.
//!
//! cargo-lambda comes from `pip install cargo-lambda==1.9.2` (scripts/install-test-deps.sh);
//! it is found through `CARGO_LAMBDA`, on PATH, or in Python's scripts directory.

#[path = "support/http_server.rs"]
mod http_server;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use ember_engine::Engine;
use ember_model_loader::{load, LoadOptions};
use ember_tests::{aws_env, free_port, smollm_hf, MotoServer};
use ember_worker::job::{derived_id, ResultLine};
use ember_worker::lambda::{received_message, run_batch, usable_deadline, BatchError, BatchOptions};
use ember_worker::runner::{DeadLetters, JobHandler};
use ember_worker::store::local::LocalStore;
use ember_worker::store::s3::S3Store;
use ember_worker::store::ObjectStore;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

/// The records of `fixtures/sqs-event.json`: (messageId, custom_id, error code if refused).
const FIXTURE: [(&str, &str, Option<&str>); 6] = [
    ("5a0c4f9e-1d2b-4c3a-9e8f-000000000001", "paris", None),
    ("5a0c4f9e-1d2b-4c3a-9e8f-000000000002", "broken", Some("invalid_json")),
    ("5a0c4f9e-1d2b-4c3a-9e8f-000000000003", "unknown-model", Some("model_not_found")),
    ("5a0c4f9e-1d2b-4c3a-9e8f-000000000004", "story", None),
    ("5a0c4f9e-1d2b-4c3a-9e8f-000000000005", "no-messages", Some("empty_messages")),
    ("5a0c4f9e-1d2b-4c3a-9e8f-000000000006", "negative-max-tokens", Some("max_tokens_not_positive")),
];
/// `SentTimestamp` of every fixture record, in milliseconds: 2026-01-01T00:00:00Z.
const FIXTURE_SENT_MS: u64 = 1_767_225_600_000;
const PARIS: &str = "The capital of France is Paris.";
const FRANCE: &str = "What is the capital of France?";

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sqs-event.json")
}

fn fixture() -> Result<SqsEvent> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixture_path())?)?)
}

/// The key of a job's result: its `custom_id`'s (under `_errors/` for an error result), or the
/// `_rejected/` one when the body could not be read far enough to find the `custom_id`.
fn result_key(message_id: &str, custom_id: &str, code: Option<&str>) -> String {
    match code {
        Some("invalid_json") => format!("results/default/_rejected/{}.json", derived_id(message_id)),
        Some(_) => format!("results/default/_errors/{custom_id}.json"),
        None => format!("results/default/{custom_id}.json"),
    }
}

fn chat_job(custom_id: &str, content: &str, max_tokens: i64) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}})
    .to_string()
}

/// The event in `path` as SQS delivers it the `receive_count`th time.
fn redelivered(path: &Path, receive_count: u32) -> Result<Value> {
    let mut event: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    for record in event["Records"].as_array_mut().into_iter().flatten() {
        record["attributes"]["ApproximateReceiveCount"] = json!(receive_count.to_string());
    }
    Ok(event)
}

fn event(records: Value) -> Result<SqsEvent> {
    Ok(serde_json::from_value(json!({ "Records": records }))?)
}

/// The real model, loaded once for the in-process tests of this binary.
async fn engine() -> Result<Arc<Engine>> {
    static ENGINE: OnceCell<Arc<Engine>> = OnceCell::const_new();
    let engine = ENGINE
        .get_or_try_init(|| async {
            let loaded = load(&smollm_hf("f32")?.to_string_lossy().parse()?, &LoadOptions::default()).await?;
            anyhow::Ok(Arc::new(Engine::new(loaded)))
        })
        .await?;
    Ok(engine.clone())
}

async fn local_handler(dir: &Path) -> Result<JobHandler> {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir));
    Ok(JobHandler::new(engine().await?, store, DeadLetters::Redrive, 3))
}

#[test]
fn records_become_received_messages() -> Result<()> {
    let first = fixture()?.records.into_iter().next().context("the fixture has records")?;
    let body = first.body.clone().unwrap_or_default();
    let msg = received_message(first, 0);
    assert_eq!(msg.id.as_str(), FIXTURE[0].0);
    assert_eq!(msg.receipt.as_str(), "AQEB-receipt-1");
    assert_eq!(msg.body, body.into_bytes());
    assert_eq!(msg.receive_count, 1);
    assert_eq!(msg.sent_at, UNIX_EPOCH + Duration::from_millis(FIXTURE_SENT_MS));

    let redelivered: SqsMessage = serde_json::from_value(json!({"messageId": "m", "body": "x",
        "attributes": {"ApproximateReceiveCount": "3", "SentTimestamp": "1000"}}))?;
    let msg = received_message(redelivered, 0);
    assert_eq!((msg.receive_count, msg.sent_at), (3, UNIX_EPOCH + Duration::from_secs(1)));

    // Missing or unreadable attributes: a first delivery, sent now; no messageId: the receipt
    // handle, or else a name from the record's place in the batch.
    let before = SystemTime::now();
    let bare: SqsMessage = serde_json::from_value(json!({"receiptHandle": "r-9", "body": "x",
        "attributes": {"ApproximateReceiveCount": "many", "SentTimestamp": "yesterday"}}))?;
    let msg = received_message(bare, 4);
    assert_eq!((msg.id.as_str(), msg.receive_count), ("r-9", 1));
    assert!(msg.sent_at >= before && msg.sent_at <= SystemTime::now());
    let empty: SqsMessage = serde_json::from_value(json!({}))?;
    let msg = received_message(empty, 4);
    assert_eq!(msg.id.as_str(), "record-4-without-message-id");
    assert!(msg.body.is_empty() && msg.receipt.as_str().is_empty());
    Ok(())
}

#[test]
fn a_deadline_already_past_is_no_deadline() {
    let now = SystemTime::now();
    let now_ms = now.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default();
    // cargo-lambda's emulator sends 600000 (1970-01-01T00:10:00Z) with every invocation.
    assert_eq!(usable_deadline(600_000, now), None);
    assert_eq!(usable_deadline(now_ms.saturating_sub(1), now), None);
    assert_eq!(usable_deadline(now_ms + 60_000, now), Some(UNIX_EPOCH + Duration::from_millis(now_ms + 60_000)));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_deadline_cancels_the_running_job_and_reports_the_rest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let handler = local_handler(dir.path()).await?;
    // A completion that counts on and on: no end of text to finish it before it is cancelled.
    let long = json!({"custom_id": "count", "method": "POST", "url": "/v1/completions",
        "body": {"model": "default", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 4000}})
    .to_string();
    let batch = event(json!([
        {"messageId": "long", "body": long},
        {"messageId": "paris", "body": chat_job("paris", "What is the capital of France?", 12)},
    ]))?;
    // The first job starts (60 s left, over the 30 s start margin, which leaves a loaded
    // machine 30 s to get there) and is cancelled 58 s before the deadline, 2 s in; the
    // second is then not started: the deadline is near. 58 s is ample to answer in once
    // cancelled.
    let opts = BatchOptions { start_margin: Duration::from_secs(30), cancel_margin: Duration::from_secs(58) };
    let deadline = SystemTime::now() + Duration::from_secs(60);
    let report = run_batch(&handler, batch, Some(deadline), &opts).await;
    let answered = SystemTime::now();

    // Started (released, not skipped), stopped, and both records handed back for another
    // delivery.
    assert_eq!((report.records, report.done, report.released, report.skipped), (2, 0, 1, 1), "{report:?}");
    let failed: Vec<&str> = report.response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
    assert_eq!(failed, ["long", "paris"]);
    assert!(answered < deadline, "answered after the invocation's deadline");
    let store = LocalStore::new(dir.path());
    assert_eq!(store.list("").await?, Vec::<String>::new(), "no result for an unfinished job");
    assert!(report.into_response().is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_without_a_message_id_fails_the_invocation() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let handler = local_handler(dir.path()).await?;
    let batch = event(json!([
        {"body": "{not json"},
        {"messageId": "m-2", "body": chat_job("empty", "", 4)},
    ]))?;
    let report = run_batch(&handler, batch, None, &BatchOptions::default()).await;
    assert_eq!((report.rejected, report.unreportable), (2, 1), "{report:?}");
    let failed: Vec<&str> = report.response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
    assert_eq!(failed, ["m-2"]);
    // Both were answered with error results before being reported.
    let store = LocalStore::new(dir.path());
    assert_eq!(store.list("").await?.len(), 2);
    match report.into_response() {
        Err(BatchError::Unreportable { count: 1 }) => Ok(()),
        other => bail!("expected the invocation to fail, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cargo_lambda_runs_a_batch_and_reports_the_bad_records() -> Result<()> {
    let moto = MotoServer::start()?;
    let aws = moto.aws_config().await;
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&aws).force_path_style(true).build());
    s3.create_bucket().bucket("ember-results").send().await?;
    let model = smollm_hf("f32")?;

    let logs = tempfile::tempdir()?;
    let mut envs = aws_env(&moto.endpoint());
    envs.push(("EMBER_MODEL", model.to_string_lossy().into_owned()));
    envs.push(("EMBER_RESULTS", "s3://ember-results/lambda-test".into()));
    let watch = Watch::start(&envs, logs.path())?;
    let response = watch.invoke(&fixture_path(), Duration::from_secs(40 * 60))?;
    let failed: Vec<&str> = response["batchItemFailures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["itemIdentifier"].as_str())
        .collect();
    let bad: Vec<&str> = FIXTURE.iter().filter(|(_, _, code)| code.is_some()).map(|(id, _, _)| *id).collect();
    assert_eq!(failed, bad, "{response}\n{}", watch.log_tail());

    let store = S3Store::from_config(&aws, "ember-results", "lambda-test");
    for (message_id, custom_id, code) in FIXTURE {
        let key = result_key(message_id, custom_id, code);
        let bytes = store.get(&key).await?.with_context(|| format!("no result at {key}\n{}", watch.log_tail()))?;
        let line: ResultLine = serde_json::from_slice(&bytes)?;
        let response = line.response.as_ref().context("an HTTP answer")?;
        match code {
            None => {
                assert!(line.is_success(), "{line:?}");
                assert_eq!(line.custom_id, custom_id);
            }
            Some(code) => {
                assert_eq!(response.status_code, 400, "{line:?}");
                assert_eq!(line.error_code(), Some(code), "{line:?}");
            }
        }
    }
    let paris: ResultLine =
        serde_json::from_slice(&store.get("results/default/paris.json").await?.unwrap_or_default())?;
    let body = paris.response.map(|r| r.body).unwrap_or_default();
    assert_eq!(body["choices"][0]["message"]["content"], PARIS, "{body}");
    assert_eq!(body["created"], FIXTURE_SENT_MS / 1000, "created is the message's send time");
    let story: ResultLine =
        serde_json::from_slice(&store.get("results/default/story.json").await?.unwrap_or_default())?;
    let body = story.response.map(|r| r.body).unwrap_or_default();
    assert_eq!(body["object"], "text_completion", "{body}");
    assert!(body["usage"]["completion_tokens"].as_u64().is_some_and(|n| (1..=6).contains(&n)), "{body}");

    // The same batch delivered again: the good jobs are found done and their results left as
    // they were, the bad ones are reported again, and the container keeps its model.
    let paris_bytes = store.get("results/default/paris.json").await?;
    let redelivery = logs.path().join("redelivery.json");
    std::fs::write(&redelivery, serde_json::to_vec(&redelivered(&fixture_path(), 2)?)?)?;
    let again = watch.invoke(&redelivery, Duration::from_secs(10 * 60))?;
    assert_eq!(again, response);
    assert_eq!(store.get("results/default/paris.json").await?, paris_bytes);
    assert_eq!(store.list("").await?.len(), FIXTURE.len(), "one result per job");

    // Pipeline task events, as an exported pipeline sends them from Step Functions: the answer
    // is the task's result; a failed task fails the invocation with its error name.
    let task = logs.path().join("task.json");
    std::fs::write(&task, r#"{"task": "ember:tool:json", "input": {"text": "Sure: {\"tool\": \"x\", \"n\": 2}"}}"#)?;
    assert_eq!(watch.invoke(&task, Duration::from_secs(60))?, json!({"tool": "x", "n": 2}));
    std::fs::write(
        &task,
        json!({"task": "ember:generate", "input": {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}})
            .to_string(),
    )?;
    let generated = watch.invoke(&task, Duration::from_secs(10 * 60))?;
    assert_eq!(generated["text"], PARIS, "{generated}");
    assert_eq!(generated["finish_reason"], "stop");
    std::fs::write(&task, r#"{"task": "ember:tool:fail", "input": {"Error": "Agent.Gave Up", "Cause": "no answer"}}"#)?;
    let failed = watch.invoke(&task, Duration::from_secs(60)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(failed.contains("Agent.Gave Up") && failed.contains("no answer"), "{failed}");

    let log = watch.log();
    assert_eq!(log.matches("ready for SQS events").count(), 1, "{}", watch.log_tail());
    assert_eq!(log.matches("cold start").count(), 1, "{}", watch.log_tail());
    // The init's cold-start breakdown, stage by stage, in the logs and as EMF metrics.
    for stage in [
        "\"list_s\"",
        "\"downloaded_bytes\"",
        "\"build_s\"",
        "\"ready_s\"",
        "ColdStartBuild",
        "ColdStartDownloadedBytes",
    ] {
        assert!(log.contains(stage), "no {stage} in the logs: {}", watch.log_tail());
    }
    Ok(())
}

#[test]
fn cargo_lambda_streams_function_url_answers_equal_to_the_batch_paths() -> Result<()> {
    let model = http_server::model()?;
    let dir = tempfile::tempdir()?;
    let results = dir.path().join("results");
    let envs = [
        ("EMBER_MODEL", model),
        ("EMBER_RESULTS", results.to_string_lossy().into_owned()),
        ("EMBER_URL_STREAMING", "true".to_string()),
        ("EMBER_CONCURRENCY", "4".to_string()),
    ];
    let watch = Watch::start(&envs, dir.path())?;

    // The batch path first, in the same function: an SQS event with a chat and a completion job.
    let completion_prompt = "The three primary colors are";
    let jobs = dir.path().join("jobs.json");
    let text_job = json!({"custom_id": "text", "method": "POST", "url": "/v1/completions",
        "body": {"model": "default", "prompt": completion_prompt, "max_tokens": 16}});
    std::fs::write(
        &jobs,
        json!({"Records": [
            {"messageId": "m-chat", "body": chat_job("chat", FRANCE, 24)},
            {"messageId": "m-text", "body": text_job.to_string()},
        ]})
        .to_string(),
    )?;
    let response = watch.invoke_function("ember", &jobs, Duration::from_secs(40 * 60))?;
    assert_eq!(response["batchItemFailures"], json!([]), "{response}\n{}", watch.log_tail());
    let store = LocalStore::new(&results);
    let batch_body = |id: &str| -> Result<Value> {
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let bytes = rt.block_on(store.get(&format!("results/default/{id}.json")))?.context("no result")?;
        let line: ResultLine = serde_json::from_slice(&bytes)?;
        line.response.map(|r| r.body).context("no response in the result")
    };
    let (chat_batch, text_batch) = (batch_body("chat")?, batch_body("text")?);
    let chat_text = chat_batch["choices"][0]["message"]["content"].as_str().context("chat text")?;
    assert!(!chat_text.is_empty(), "{chat_batch}");

    // Then the function URL, through cargo-lambda's function URL endpoint, with the official
    // OpenAI client (it reads the server-sent events as they come).
    let base = format!("http://127.0.0.1:{}/lambda-url/ember", watch.port);
    let url = |mut spec: Value| -> Result<Value> {
        spec["base_url"] = json!(base);
        http_server::client(&spec).with_context(|| watch.log_tail())
    };
    for (stream, usage) in [(false, false), (true, false), (true, true)] {
        let got = url(json!({"op": "chat", "prompt": FRANCE, "max_tokens": 24, "stream": stream, "usage": usage}))?;
        assert_eq!(got["text"], chat_text, "stream {stream}: {got}");
        assert_eq!(got["finish_reason"], chat_batch["choices"][0]["finish_reason"], "{got}");
        if stream {
            assert_eq!(got["objects"], json!(["chat.completion.chunk"]), "{got}");
            assert!(got["pieces"].as_u64() > Some(1), "the answer came in one piece: {got}");
        }
        if usage || !stream {
            assert_eq!(got["usage"], chat_batch["usage"], "{got}");
        }
    }
    let got =
        url(json!({"op": "complete", "prompt": completion_prompt, "max_tokens": 16, "stream": true, "usage": true}))?;
    assert_eq!(got["text"], text_batch["choices"][0]["text"], "{got}");
    assert_eq!(got["usage"], text_batch["usage"], "{got}");

    // As raw events: the function answered in streaming mode (cargo-lambda passes the stream
    // on, and says so in this header, only when the function streamed).
    let sse = url(json!({"op": "sse", "prompt": FRANCE, "max_tokens": 24}))?;
    assert_eq!(sse["status"], 200, "{sse}");
    assert_eq!(sse["headers"]["content-type"], "text/event-stream", "{sse}");
    assert_eq!(sse["headers"]["lambda-runtime-function-response-mode"], "streaming", "{sse}");
    let events: Vec<&str> = sse["events"].as_array().context("events")?.iter().filter_map(Value::as_str).collect();
    assert!(events.len() > 3, "{sse}");
    assert_eq!(events.last(), Some(&"[DONE]"), "{sse}");

    assert_eq!(url(json!({"op": "models"}))?, json!(["SmolLM2-135M-Instruct.Q4_1"]));
    let health = url(json!({"op": "health"}))?;
    assert_eq!((&health["status"], &health["body"]["status"]), (&json!(200), &json!("ok")), "{health}");

    // Bad requests: the same statuses and bodies as `ember serve --http`, and the function
    // keeps answering.
    let errors = json!({"op": "errors", "over_context_words": 9000, "prompt": "Say hello.", "max_tokens": 8});
    let from_lambda = url(errors.clone())?;
    let server = http_server::Server::start(&[])?;
    let from_server = server.client(errors)?;
    for case in ["malformed_json", "unknown_field", "two_mb_body", "over_context"] {
        assert!(from_lambda[case]["status"].as_u64().is_some_and(|s| (400..500).contains(&s)), "{from_lambda}");
        assert_eq!(from_lambda[case]["status"], from_server[case]["status"], "{case}");
        assert_eq!(from_lambda[case]["body"], from_server[case]["body"], "{case}");
    }
    assert_eq!(from_lambda["after"]["text"], from_server["after"]["text"]);

    // One container, one model: loaded once for jobs and URL requests alike.
    assert_eq!(watch.log().matches("cold start").count(), 1, "{}", watch.log_tail());
    Ok(())
}

/// `cargo lambda watch` serving `ember lambda` from this package, stopped with everything it
/// started when dropped.
struct Watch {
    child: Child,
    cargo_lambda: PathBuf,
    port: u16,
    log: PathBuf,
    /// An environment variable only the processes of this watch carry, to find and stop the
    /// function process even when it is not in the watch's process group.
    marker: String,
}

impl Watch {
    /// Serves `ember lambda` with `envs` (EMBER_MODEL, EMBER_RESULTS, ...) on top of the
    /// test's environment.
    fn start(envs: &[(&str, String)], log_dir: &Path) -> Result<Self> {
        let cargo_lambda = cargo_lambda()?;
        let port = free_port()?;
        let log = log_dir.join("watch.log");
        let out = File::create(&log)?;
        let marker = format!("{}-{}", std::process::id(), port);
        let mut cmd = Command::new(&cargo_lambda);
        // `cargo lambda watch` is `cargo-lambda lambda watch`; arguments after `--` go to the
        // function's binary, the only one of this package: `ember lambda`. Changes made to the
        // sources while the test runs must not restart the function. The watch builds that
        // binary with `cargo run`; with tokio's `test-util` (which the tests' dev-dependencies
        // turn on) its features are the test build's, so it reuses that build instead of
        // compiling tokio, the AWS SDK and the worker again (7 min of a cold CI run on Zen 4).
        cmd.args(["lambda", "watch", "--ignore-changes", "--invoke-address", "127.0.0.1", "--invoke-port"])
            .arg(port.to_string())
            .args(["--features", "tokio/test-util", "--", "lambda"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(envs.iter().map(|(k, v)| (*k, v)))
            .env("EMBER_NO_PROGRESS", "true")
            .env("EMBER_LOG", "info")
            .env("EMBER_TEST_WATCH", &marker)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().with_context(|| format!("starting {}", cargo_lambda.display()))?;
        let mut watch = Self { child, cargo_lambda, port, log, marker };
        watch.wait_listening(Duration::from_secs(120))?;
        Ok(watch)
    }

    fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                bail!("cargo lambda watch exited early ({status})\n{}", self.log_tail());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("cargo lambda watch did not listen on port {} within {timeout:?}\n{}", self.port, self.log_tail())
    }

    /// Sends the event in `data_file` and returns the function's answer. The first invocation
    /// builds and starts the function: cargo may wait for the build lock, so `timeout` is long.
    fn invoke(&self, data_file: &Path, timeout: Duration) -> Result<Value> {
        self.invoke_function("_", data_file, timeout)
    }

    /// As [`Watch::invoke`], through the function named `function`: cargo-lambda runs one
    /// instance per name, `_` (its default) apart from `ember` (the one the function URL
    /// endpoint `/lambda-url/ember/...` reaches).
    fn invoke_function(&self, function: &str, data_file: &Path, timeout: Duration) -> Result<Value> {
        let mut invoke = Command::new(&self.cargo_lambda)
            .args(["lambda", "invoke", function, "--invoke-address", "127.0.0.1", "--invoke-port"])
            .arg(self.port.to_string())
            .arg("--data-file")
            .arg(data_file)
            .args(["--output-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let start = Instant::now();
        let status: ExitStatus = loop {
            if let Some(status) = invoke.try_wait()? {
                break status;
            }
            // cargo-lambda keeps the invocation waiting when the function exits (a failed
            // build, a bad option, a failed model load): give up as soon as it says so.
            let died = self.log().lines().any(|l| l.contains("command exited code=") || l.contains("command killed"));
            if died || start.elapsed() > timeout {
                let _ = invoke.kill();
                let _ = invoke.wait();
                let why =
                    if died { "the function exited".to_string() } else { format!("no answer within {timeout:?}") };
                bail!("{why}\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let Output { stdout, stderr, .. } = invoke.wait_with_output()?;
        ensure!(
            status.success(),
            "cargo lambda invoke failed ({status}): {}{}\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr),
            self.log_tail()
        );
        serde_json::from_slice(&stdout).with_context(|| {
            format!("the answer is not JSON: {}\n{}", String::from_utf8_lossy(&stdout), self.log_tail())
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!("--- cargo lambda watch, last lines ---\n{}", lines[lines.len().saturating_sub(60)..].join("\n"))
    }

    /// Processes that carry this watch's marker in their environment (Linux).
    fn marked_processes(&self) -> Vec<u32> {
        let needle = format!("EMBER_TEST_WATCH={}", self.marker);
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
            })
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SIGTERM first, so that cargo-lambda stops its function; then SIGKILL whatever of
        // ours is left: the process group, and any marked process outside it.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.marked_processes() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

/// `CARGO_LAMBDA`, `cargo-lambda` on PATH, or in Python's scripts directory (where pip puts it).
fn cargo_lambda() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CARGO_LAMBDA") {
        return Ok(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("cargo-lambda")).collect::<Vec<_>>())
        .unwrap_or_default();
    let scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("cargo-lambda"));
    on_path.into_iter().chain(scripts).find(|p| p.is_file()).context(
        "cargo-lambda not found (CARGO_LAMBDA, PATH, python3's scripts directory): \
         run scripts/install-test-deps.sh (pip install cargo-lambda==1.9.2)",
    )
}

/// Traces from `ember lambda` under cargo-lambda, read back from a real trace backend (Arize
/// Phoenix on 127.0.0.1): the start-up is an `init` trace with the load's stages; each
/// invocation is a span named by the function with the FaaS attributes (`faas.coldstart` on
/// the first only) and its batch's size; each job continues the trace its message carried; and
/// the spans are sent at the end of each invocation, not on the exporter's timer.
#[test]
fn cargo_lambda_traces_the_init_and_each_invocation() -> Result<()> {
    const GIVEN_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let phoenix = ember_tests::PhoenixServer::start()?;
    let dir = tempfile::tempdir()?;
    let envs = [
        ("EMBER_MODEL", smollm_hf("f32")?.to_string_lossy().into_owned()),
        ("EMBER_RESULTS", dir.path().join("results").to_string_lossy().into_owned()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", phoenix.otlp_endpoint()),
        ("OTEL_SERVICE_NAME", "ember-lambda".to_string()),
        // An hour between the exporter's own sends: what reaches the backend in this test was
        // sent by the flush at the end of each invocation (Lambda freezes the environment
        // after answering, so the exporter's timer cannot be relied on).
        ("OTEL_BSP_SCHEDULE_DELAY", "3600000".to_string()),
    ];
    let watch = Watch::start(&envs, dir.path())?;
    for (n, traceparent) in [(1, format!("00-{GIVEN_TRACE}-b7ad6b7169203331-01")), (2, "not-a-context".into())] {
        let event = dir.path().join(format!("event-{n}.json"));
        let attributes = json!({"traceparent": {"stringValue": traceparent, "dataType": "String"}});
        let record = json!({"messageId": format!("m-{n}"), "body": chat_job(&format!("traced-{n}"), FRANCE, 4),
            "messageAttributes": attributes});
        std::fs::write(&event, json!({ "Records": [record] }).to_string())?;
        let response = watch.invoke(&event, Duration::from_secs(40 * 60))?;
        assert_eq!(response["batchItemFailures"], json!([]), "{response}\n{}", watch.log_tail());
    }

    // Poll the backend (not a clock) until the init trace, both invocations and both jobs are in.
    let start = Instant::now();
    let spans = loop {
        let spans = phoenix.spans()?;
        let named = |name: &str| spans.iter().filter(|s| s["name"] == name).count();
        let invocations = spans.iter().filter(|s| !s["attributes"]["faas.invocation_id"].is_null()).count();
        if (named("init") == 1 && invocations == 2 && named("job") == 2) || start.elapsed() > Duration::from_secs(120) {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let trace_of = |s: &Value| s["context"]["trace_id"].as_str().unwrap_or_default().to_string();
    let id_of = |s: &Value| s["context"]["span_id"].as_str().unwrap_or_default().to_string();
    let init: Vec<&Value> = spans.iter().filter(|s| s["name"] == "init").collect();
    assert_eq!(init.len(), 1, "one start-up: {spans:#?}");
    let init = init[0];
    let stages: Vec<&str> = spans
        .iter()
        .filter(|s| s["parent_id"].as_str() == Some(&id_of(init)))
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(stages.contains(&"build"), "the load's stages under init: {stages:?}");

    let mut invocations: Vec<&Value> =
        spans.iter().filter(|s| !s["attributes"]["faas.invocation_id"].is_null()).collect();
    invocations.sort_by_key(|s| s["start_time"].as_str().unwrap_or_default().to_string());
    assert_eq!(invocations.len(), 2, "{spans:#?}");
    let jobs: Vec<&Value> = spans.iter().filter(|s| s["name"] == "job").collect();
    assert_eq!(jobs.len(), 2, "{spans:#?}");
    let continued = jobs.iter().filter(|j| trace_of(j) == GIVEN_TRACE).count();
    assert_eq!(continued, 1, "the job with a traceparent continues its trace; the malformed one starts a new one");
    for (n, invocation) in invocations.iter().enumerate() {
        let attrs = &invocation["attributes"];
        assert_eq!(attrs["faas.trigger"], "pubsub", "{invocation}");
        let coldstart =
            attrs["faas.coldstart"].as_bool().or_else(|| attrs["faas.coldstart"].as_str().map(|s| s == "true"));
        assert_eq!(coldstart, Some(n == 0), "faas.coldstart on the first invocation only: {invocation}");
        assert_eq!(invocation["parent_id"], Value::Null, "{invocation}");
        assert_eq!(invocation["name"], "_", "named by the function (cargo-lambda's default name): {invocation}");
        assert_eq!(attrs["messaging.batch.message_count"].to_string().trim_matches('"'), "1", "{invocation}");
        // The links to the init and the jobs' traces are sent too (OTLP span links), but
        // Phoenix's REST API does not return links, so they are not checked here.
    }
    Ok(())
}
