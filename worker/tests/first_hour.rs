//! What a new user meets in a first hour with AWS configured wrong, through the real `ember`
//! binary: missing credentials and a missing results bucket are named at startup, before the
//! model loads, with what to check; a queue without a DLQ is reported, not refused, by
//! `status`; `ember run` leaves other batches' jobs on a shared queue alone. SQS and S3 are
//! moto on 127.0.0.1.

use std::path::Path;
use std::process::{Command, Output};

use ember_tests::{aws_env, smollm_hf, MotoServer};
use serde_json::{json, Value};

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// `ember` in `dir`, logging at info (so a model load would show), with `env` on top of a
/// clean AWS environment.
fn ember(dir: &Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.current_dir(dir)
        .args(args)
        .env("EMBER_LOG", "info")
        .env("EMBER_NO_PROGRESS", "1")
        .env("EMBER_THREADS", "1")
        .env_remove("RUST_BACKTRACE");
    for var in [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "EMBER_SQS_QUEUE",
        "EMBER_RESULTS",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    Ok(cmd.output()?)
}

/// Runs a command that must fail with exit 1 and a clean message; returns its stderr.
fn fails(dir: &Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<String> {
    let out = ember(dir, args, env)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit 1, stderr: {stderr}");
    for dump in ["panicked", "DispatchFailure", "ServiceError", "<?xml", "ProviderChainError"] {
        assert!(!stderr.contains(dump), "an SDK dump or panic ({dump}):\n{stderr}");
    }
    Ok(stderr)
}

fn model() -> anyhow::Result<String> {
    Ok(smollm_hf("f32")?.to_string_lossy().into_owned())
}

#[test]
fn missing_credentials_are_named_at_startup_with_what_to_set() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let dir = tempfile::tempdir()?;
    // Everything but credentials; IMDS off, so the credential chain ends at once and offline.
    let env: Vec<(&str, String)> = aws_env(&moto.endpoint())
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .collect();
    assert!(env.contains(&("AWS_EC2_METADATA_DISABLED", "true".into())));
    let model = model()?;
    let serve = ["serve", "--model", &model, "--sqs-queue", "jobs", "--results", "s3://results/ember"];
    let err = fails(dir.path(), &serve, &env)?;
    assert!(err.contains("no AWS credentials were found"), "{err}");
    assert!(err.contains("SQS queue `jobs`") || err.contains("S3 bucket `results`"), "the resource is named: {err}");
    assert!(err.contains("set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), "{err}");
    assert!(err.contains("AWS_ENDPOINT_URL"), "{err}");
    assert!(!err.contains("model loaded"), "the model loaded before the check:\n{err}");

    // The embedded queue with S3 results: the bucket check finds it.
    let serve = ["serve", "--model", &model, "--results", "s3://results/ember"];
    let err = fails(dir.path(), &serve, &env)?;
    assert!(err.contains("ListObjectsV2 on S3 bucket `results` failed") && err.contains("no AWS credentials"), "{err}");
    assert!(!err.contains("model loaded"), "{err}");

    let err = fails(dir.path(), &["status", "--sqs-queue", "jobs"], &env)?;
    assert!(err.contains("GetQueueUrl on SQS queue `jobs` failed") && err.contains("AWS_PROFILE"), "{err}");
    Ok(())
}

#[test]
fn a_missing_results_bucket_stops_serve_before_the_model_loads() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let dir = tempfile::tempdir()?;
    let env = aws_env(&moto.endpoint());
    let model = model()?;
    // A job waiting: before, serve loaded the model, failed every result write, and exited 0.
    std::fs::write(dir.path().join("b.jsonl"), job("q1", "Hi").to_string())?;
    let out = ember(dir.path(), &["submit", "b.jsonl", "--sqs-queue", "jobs", "--create-queues"], &env)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let serve = ["serve", "--model", &model, "--sqs-queue", "jobs", "--results", "s3://no-such-bucket/ember"];
    let err = fails(dir.path(), &[&serve[..], &["--exit-when-idle"]].concat(), &env)?;
    assert!(err.contains("S3 bucket `no-such-bucket` does not exist"), "{err}");
    assert!(err.contains("check the bucket name in --results"), "{err}");
    assert!(!err.contains("model loaded"), "the model loaded before the check:\n{err}");

    // The job is still there for a worker with the right bucket.
    let status = ember(dir.path(), &["status", "--sqs-queue", "jobs", "--json"], &env)?;
    let status: Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(status, json!({"visible": 1, "in_flight": 0, "delayed": 0, "dlq": 0}));
    Ok(())
}

#[test]
fn status_reports_a_queue_without_a_dlq_and_workers_refuse_it() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let dir = tempfile::tempdir()?;
    let env = aws_env(&moto.endpoint());
    rt()?.block_on(async {
        let sqs = aws_sdk_sqs::Client::new(&moto.aws_config().await);
        sqs.create_queue().queue_name("plain").send().await
    })?;
    std::fs::write(dir.path().join("b.jsonl"), [job("a", "Hi"), job("b", "Hi")].map(|j| j.to_string()).join("\n"))?;
    let out = ember(dir.path(), &["submit", "b.jsonl", "--sqs-queue", "plain"], &env)?;
    assert!(out.status.success(), "submit needs no DLQ: {}", String::from_utf8_lossy(&out.stderr));

    let out = ember(dir.path(), &["status", "--sqs-queue", "plain", "--json"], &env)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let status: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status, json!({"visible": 2, "in_flight": 0, "delayed": 0, "dlq": null}));
    assert!(stderr.contains("warning: the queue has no redrive policy, so no dead-letter queue"), "{stderr}");

    let out = ember(dir.path(), &["status", "--sqs-queue", "plain"], &env)?;
    assert!(String::from_utf8(out.stdout)?.contains("dlq        none (no DLQ)"));

    // A worker dead-letters jobs that fail for good: it refuses the queue, before loading.
    let err = fails(dir.path(), &["serve", "--model", &model()?, "--sqs-queue", "plain"], &env)?;
    assert!(err.contains("SQS queue `plain` has no redrive policy, so no dead-letter queue"), "{err}");
    assert!(!err.contains("model loaded"), "{err}");
    let err = fails(dir.path(), &["dlq", "redrive", "--sqs-queue", "plain"], &env)?;
    assert!(err.contains("has no redrive policy"), "{err}");
    Ok(())
}

fn job(custom_id: &str, prompt: &str) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}})
}

#[test]
fn run_leaves_other_batches_on_a_shared_queue_untouched() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model()?;
    let none = [];
    std::fs::write(dir.path().join("theirs.jsonl"), job("theirs", "Hi").to_string())?;
    let out = ember(dir.path(), &["submit", "theirs.jsonl", "--batch-id", "theirs"], &none)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    std::fs::write(
        dir.path().join("mine.jsonl"),
        [job("m1", "Hi"), job("m2", "Hello")].map(|j| j.to_string()).join("\n"),
    )?;
    let out = ember(dir.path(), &["run", "mine.jsonl", "--model", &model, "--batch-id", "mine"], &none)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("2 succeeded, 0 failed"), "{stderr}");
    let output = std::fs::read_to_string(dir.path().join("mine.output.jsonl"))?;
    let ids: Vec<String> = output
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).map(|v| v["custom_id"].as_str().unwrap_or_default().to_string()))
        .collect::<Result<_, _>>()?;
    assert_eq!(ids, ["m1", "m2"]);

    // The other batch's job is still queued, and has no result.
    let status = ember(dir.path(), &["status", "--json"], &none)?;
    let status: Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(status, json!({"visible": 1, "in_flight": 0, "delayed": 0, "dlq": 0}));
    assert!(!dir.path().join(".ember/results/theirs").exists(), "run answered another batch's job");
    assert!(dir.path().join(".ember/results/mine/m1.json").is_file());
    Ok(())
}

/// What a terminal shows for `bytes` (carriage return, line feed, erase-line, cursor up/down;
/// colours ignored), every line that scrolled by included.
fn screen(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<Vec<char>> = vec![Vec::new()];
    let (mut row, mut col) = (0usize, 0usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => {
                row += 1;
                col = 0;
                if lines.len() <= row {
                    lines.push(Vec::new());
                }
            }
            '\r' => col = 0,
            '\u{1b}' if chars.peek() == Some(&'[') => {
                chars.next();
                let mut params = String::new();
                let mut last = ' ';
                for p in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&p) {
                        last = p;
                        break;
                    }
                    params.push(p);
                }
                let n: usize = params.trim_start_matches('?').parse().unwrap_or(0);
                let line = &mut lines[row];
                match last {
                    'K' if n == 2 => line.clear(),
                    'K' if n == 0 => line.truncate(col),
                    'A' => row = row.saturating_sub(n.max(1)),
                    'B' => row = (row + n.max(1)).min(lines.len() - 1),
                    'J' => {
                        line.truncate(col);
                        lines.truncate(row + 1);
                    }
                    _ => {}
                }
            }
            c if c.is_control() => {}
            c => {
                let line = &mut lines[row];
                if line.len() <= col {
                    line.resize(col + 1, ' ');
                }
                line[col] = c;
                col += 1;
            }
        }
    }
    lines.into_iter().map(|l| l.into_iter().collect::<String>().trim_end().to_string()).collect()
}

/// On a terminal (a pty from `script`), log lines written while the jobs bar is shown start
/// lines of their own instead of landing inside the bar; without `EMBER_LOG`, `run` shows
/// warnings, not info lines.
#[test]
fn log_lines_do_not_tear_the_progress_bar_and_run_logs_warnings_by_default() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model()?;
    let mut lines = Vec::new();
    for i in 0..3 {
        lines.push(job(&format!("ok{i}"), "Hi").to_string());
        // A refused job logs a warning while the bar is up.
        lines.push(
            json!({"custom_id": format!("bad{i}"), "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "default", "messages": []}})
            .to_string(),
        );
    }
    std::fs::write(dir.path().join("b.jsonl"), lines.join("\n"))?;
    let ember = env!("CARGO_BIN_EXE_ember");
    let command = format!("'{ember}' run b.jsonl --model '{model}' --concurrency 1 --batch-id tty");
    let out = Command::new("script")
        .current_dir(dir.path())
        .args(["-qec", &command, "/dev/null"])
        .env("EMBER_LOG", "info")
        .env("EMBER_THREADS", "1")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("EMBER_NO_PROGRESS")
        .output()?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{raw}");
    let bar_at = raw.find("jobs ").ok_or_else(|| anyhow::anyhow!("no jobs bar was drawn:\n{raw}"))?;
    assert!(raw[bar_at..].contains("job refused"), "no warning came while the bar was up:\n{raw}");
    let shown = screen(out.stdout.as_slice());
    for line in &shown {
        if [" INFO ", " WARN ", " ERROR "].iter().any(|level| line.contains(level)) {
            assert!(line.starts_with("20"), "a log line landed inside the progress bar: {line:?}\n{shown:#?}");
        }
    }
    assert!(shown.iter().any(|l| l.contains("3 succeeded, 3 failed")), "{shown:#?}");

    // The default level: warnings, no info lines.
    let out = Command::new(ember)
        .current_dir(dir.path())
        .args(["run", "b.jsonl", "--model", &model, "--batch-id", "quiet", "--no-progress"])
        .env("EMBER_THREADS", "1")
        .env_remove("EMBER_LOG")
        .env_remove("AWS_ENDPOINT_URL")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(" WARN ") && stderr.contains("job refused"), "{stderr}");
    assert!(!stderr.contains(" INFO "), "info lines by default:\n{stderr}");
    Ok(())
}

/// After `submit`, `batch status` follows the batch from the result store and `batch output`
/// writes its output lines in submission order once it is done.
#[test]
fn batch_status_and_output_follow_a_submitted_batch() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let none = [];
    let bad = json!({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "default", "messages": []}});
    let lines = [job("q2", "Hi"), bad, job("q1", "Hello")].map(|j| j.to_string()).join("\n");
    std::fs::write(dir.path().join("b.jsonl"), lines)?;
    let out = ember(dir.path(), &["submit", "b.jsonl", "--batch-id", "nightly"], &none)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let status =
        |args: &[&str]| -> anyhow::Result<Output> { ember(dir.path(), &[&["batch", "status"], args].concat(), &none) };
    let out = status(&["nightly", "--json"])?;
    let got: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(got["status"], "in_progress", "{got}");
    assert_eq!(got["request_counts"], json!({"total": 3, "completed": 0, "failed": 0}));
    let err = fails(dir.path(), &["batch", "output", "nightly"], &none)?;
    assert!(err.contains("batch nightly is in progress: 3 of 3 jobs have no result yet"), "{err}");

    let out = ember(dir.path(), &["serve", "--model", &model()?, "--exit-when-idle", "--wait-seconds", "1"], &none)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&status(&["nightly", "--json"])?.stdout)?;
    assert_eq!(
        (got["status"].clone(), got["request_counts"].clone()),
        (json!("completed"), json!({"total": 3, "completed": 2, "failed": 1}))
    );
    let table = String::from_utf8(status(&["nightly"])?.stdout)?;
    assert!(table.contains("status     completed") && table.contains("failed     1"), "{table}");

    let out = ember(dir.path(), &["batch", "output", "nightly", "--output", "nightly.jsonl"], &none)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read_to_string(dir.path().join("nightly.jsonl"))?;
    let lines: Vec<Value> = written.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let ids: Vec<&str> = lines.iter().filter_map(|l| l["custom_id"].as_str()).collect();
    assert_eq!(ids, ["q2", "bad", "q1"]);
    assert_eq!(lines[0]["response"]["status_code"], 200);
    assert_eq!(lines[1]["response"]["status_code"], 400);

    let err = fails(dir.path(), &["batch", "status", "nigthly"], &none)?;
    assert!(err.contains("no batch \"nigthly\" in this result store"), "{err}");
    Ok(())
}

/// `--region` and `--profile` choose where and as whom (moto keeps queues per region).
#[test]
fn region_and_profile_options_choose_the_aws_account_and_region() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let dir = tempfile::tempdir()?;
    rt()?.block_on(async {
        let conf = aws_sdk_sqs::config::Builder::from(&moto.aws_config().await)
            .region(aws_sdk_sqs::config::Region::new("eu-west-1"))
            .build();
        aws_sdk_sqs::Client::from_conf(conf).create_queue().queue_name("regional").send().await
    })?;
    let env = aws_env(&moto.endpoint());
    let err = fails(dir.path(), &["status", "--sqs-queue", "regional"], &env)?;
    assert!(err.contains("SQS queue `regional` does not exist"), "us-east-1 has no such queue: {err}");
    let out = ember(dir.path(), &["status", "--sqs-queue", "regional", "--region", "eu-west-1", "--json"], &env)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Credentials and region from a named profile only.
    let credentials = dir.path().join("credentials");
    std::fs::write(&credentials, "[moto]\naws_access_key_id = test\naws_secret_access_key = test\n")?;
    let config = dir.path().join("config");
    std::fs::write(&config, "[profile moto]\nregion = eu-west-1\n")?;
    let env: Vec<(&str, String)> = env
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET") && *k != "AWS_REGION")
        .map(|(k, v)| match k {
            "AWS_SHARED_CREDENTIALS_FILE" => (k, credentials.to_string_lossy().into_owned()),
            "AWS_CONFIG_FILE" => (k, config.to_string_lossy().into_owned()),
            _ => (k, v),
        })
        .collect();
    let err = fails(dir.path(), &["status", "--sqs-queue", "regional"], &env)?;
    assert!(err.contains("no AWS credentials were found"), "{err}");
    let out = ember(dir.path(), &["status", "--sqs-queue", "regional", "--profile", "moto", "--json"], &env)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status["visible"], 0);
    Ok(())
}
