//! `ember autoscale --driver local` against moto SQS and S3 with the real small model: a
//! burst of 200 jobs takes the pool from 0 workers to its maximum and back to 0 after the
//! cooldown, every job gets its result, and no job is cut short by a drain.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ember_tests::{aws_config_for, aws_env, smollm_hf, MotoServer};
use serde_json::{json, Value};

const JOBS: usize = 200;
const MAX_WORKERS: u64 = 3;

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// The autoscaler process, stopped with SIGTERM (or killed) when dropped.
struct Autoscaler(Child);

impl Drop for Autoscaler {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ember(env: &[(&'static str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.env_remove("AWS_ENDPOINT_URL").envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    cmd
}

/// Waits for a decision line matching `want`, up to `timeout`; returns every line seen.
fn wait_for(
    lines: &mpsc::Receiver<Value>,
    seen: &mut Vec<Value>,
    timeout: Duration,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let hit = want(&line);
                seen.push(line);
                if hit {
                    return Ok(());
                }
            }
            Err(_) => bail!("no decision with {what} within {timeout:?}; decisions: {seen:#?}"),
        }
    }
}

fn results(endpoint: &str, bucket: &str, prefix: &str) -> anyhow::Result<Vec<Value>> {
    rt()?.block_on(async {
        let conf = aws_config_for(endpoint).await;
        let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());
        let mut out = Vec::new();
        let mut pages = s3.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
        while let Some(page) = pages.next().await {
            for obj in page?.contents() {
                let key = obj.key().context("object without a key")?;
                let body = s3.get_object().bucket(bucket).key(key).send().await?.body.collect().await?;
                out.push(serde_json::from_slice(&body.into_bytes())?);
            }
        }
        Ok(out)
    })
}

/// The final stats line of each pool worker (printed by `ember serve` when it exits).
fn worker_stats(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let mut stats = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "out") {
            let text = std::fs::read_to_string(&path)?;
            let line = text
                .lines()
                .last()
                .with_context(|| format!("{} is empty: the worker did not exit cleanly", path.display()))?;
            stats.push(serde_json::from_str(line).with_context(|| format!("{}: {line}", path.display()))?);
        }
    }
    Ok(stats)
}

#[test]
fn a_burst_scales_the_local_pool_from_zero_to_max_and_back_without_killing_jobs() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let endpoint = moto.endpoint();
    let bucket = "autoscale-results";
    rt()?.block_on(async {
        let conf = aws_config_for(&endpoint).await;
        let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());
        s3.create_bucket().bucket(bucket).send().await
    })?;
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("pool");
    let mut env = aws_env(&endpoint);
    env.extend([
        ("EMBER_SQS_QUEUE", "autoscale".to_string()),
        ("EMBER_CREATE_QUEUES", "true".into()),
        ("EMBER_RESULTS", format!("s3://{bucket}/out")),
        ("EMBER_MODEL", smollm_hf("f32")?.to_string_lossy().into_owned()),
        ("EMBER_NO_PROGRESS", "1".into()),
        ("EMBER_THREADS", "1".into()),
        ("EMBER_LOG", "info".into()),
        ("EMBER_VISIBILITY_TIMEOUT", "30".into()),
    ]);

    let mut child = ember(&env)
        .args(["autoscale", "--driver", "local", "--policy", "ember"])
        .args(["--max-workers", &MAX_WORKERS.to_string(), "--target-backlog", "8"])
        .args(["--interval", "1", "--scale-down-window", "5", "--idle-cooldown", "5"])
        .args(["--pool-log-dir", &logs.to_string_lossy()])
        .args(["--serve-args", "--wait-seconds 1 --concurrency 4 --grace-seconds 60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let autoscaler = Autoscaler(child);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    let mut seen = Vec::new();
    // The queue is empty: no worker.
    wait_for(&lines, &mut seen, Duration::from_secs(60), "0 workers on the empty queue", |d| {
        d["workers"] == 0 && d["desired"] == 0
    })?;

    let file = dir.path().join("burst.jsonl");
    let jobs: Vec<String> = (0..JOBS)
        .map(|i| {
            json!({"custom_id": format!("job-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "default", "messages": [{"role": "user", "content": format!("Count to {i}.")}], "max_tokens": 3}})
            .to_string()
        })
        .collect();
    std::fs::write(&file, jobs.join("\n"))?;
    let out = ember(&env).args(["submit", &file.to_string_lossy(), "--batch-id", "burst"]).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    wait_for(&lines, &mut seen, Duration::from_secs(60), "the maximum of workers", |d| {
        d["workers"].as_u64() == Some(MAX_WORKERS)
    })?;
    assert!(
        seen.iter().all(|d| d["workers"].as_u64().is_some_and(|w| w <= MAX_WORKERS)),
        "more than {MAX_WORKERS} workers: {seen:#?}"
    );
    // Back to zero once the burst is done and the cooldown has passed.
    wait_for(&lines, &mut seen, Duration::from_secs(600), "0 workers after the burst", |d| {
        d["workers"] == 0 && d["draining"] == 0 && d["desired"] == 0 && d["visible"] == 0 && d["in_flight"] == 0
    })?;
    let scaled_down_at = seen.last().and_then(|d| d["t"].as_f64()).unwrap_or_default();
    let last_busy =
        seen.iter().rev().filter(|d| d["visible"] != 0 || d["in_flight"] != 0).find_map(|d| d["t"].as_f64());
    assert!(last_busy.is_some_and(|t| scaled_down_at - t >= 4.0), "scaled to zero before the cooldown: {seen:#?}");

    // Stop the autoscaler: SIGTERM, it exits cleanly.
    Command::new("kill").args(["-TERM", &autoscaler.0.id().to_string()]).status()?;
    let mut autoscaler = autoscaler;
    let status = autoscaler.0.wait()?;
    assert!(status.success(), "autoscaler exited with {status}");

    let results = results(&endpoint, bucket, "out/results/burst/")?;
    assert_eq!(results.len(), JOBS);
    for r in &results {
        let content = &r["response"]["body"]["choices"][0]["message"]["content"];
        assert_eq!(r["response"]["status_code"], 200, "{r}");
        assert!(content.as_str().is_some_and(|c| !c.is_empty()), "{r}");
    }
    // Every worker exited by itself after its SIGTERM (its stats line is there), and no job
    // was cut short: none released by a drain, none retried, each run exactly once.
    let stats = worker_stats(&logs)?;
    assert_eq!(stats.len() as u64, seen.iter().map(|d| d["start"].as_u64().unwrap_or(0)).sum::<u64>(), "{stats:?}");
    assert!(stats.len() as u64 >= MAX_WORKERS);
    let sum = |k: &str| stats.iter().map(|s| s[k].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!((sum("done"), sum("released"), sum("retried"), sum("poisoned")), (JOBS as u64, 0, 0, 0), "{stats:?}");
    assert_eq!(sum("received"), JOBS as u64, "a job was delivered twice: {stats:?}");
    let status: Value = serde_json::from_slice(&ember(&env).args(["status", "--json"]).output()?.stdout)?;
    assert_eq!(status, json!({"visible": 0, "in_flight": 0, "delayed": 0, "dlq": 0}));
    Ok(())
}

#[test]
fn simulate_prints_every_policy_on_every_trace_in_one_table() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/autoscale");
    let out = ember(&[])
        .args(["autoscale", "simulate", "--trace"])
        .arg(dir.join("burst.json"))
        .arg("--trace")
        .arg(dir.join("idle.json"))
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout)?;
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| burst") || l.starts_with("| idle")).collect();
    assert_eq!(rows.len(), 8, "{table}");
    for policy in ["ember", "keda", "runpod-requests", "runpod-delay"] {
        assert_eq!(rows.iter().filter(|r| r.contains(&format!("| {policy} |"))).count(), 2, "{table}");
    }
    Ok(())
}

#[test]
fn bad_configuration_is_a_clear_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let env = [("EMBER_QUEUE_PATH", dir.path().join("q.db").to_string_lossy().into_owned())];
    let cases: [(&[&str], &str); 6] = [
        (&["--min-workers", "5", "--max-workers", "2"], "--min-workers is 5 but --max-workers is 2"),
        (&["--target-backlog", "-4"], "--target-backlog is -4: it must be a number above 0"),
        (&["--max-workers", "-1"], "--max-workers is -1: worker counts cannot be negative"),
        (&["--driver", "kubernetes"], "--driver `kubernetes` is not a driver: use one of dry-run, local, ecs, lambda"),
        (&["--policy", "fastest"], "--policy `fastest` is not a policy"),
        (&["--driver", "ecs"], "--driver ecs needs --ecs-cluster and --ecs-service"),
    ];
    for (args, want) in cases {
        let out = ember(&env).arg("autoscale").args(args).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let out = ember(&env).args(["autoscale", "simulate", "--trace", "/nonexistent.json"]).output()?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading the trace /nonexistent.json"));
    Ok(())
}
