//! `ember autoscale --driver local` against moto SQS and S3 with the real small model: a
//! burst of 200 jobs takes the pool from 0 workers to its maximum and back to 0, with the
//! cold starts Ember's policy predicts, every job gets its result, and no job is cut short by
//! a drain. And `ember autoscale simulate` on the shipped traces and the Azure trace.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ember_tests::{aws_config_for, aws_env, smollm_hf, MotoServer};
use serde_json::{json, Value};

const JOBS: usize = 60;
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
        .args(["--max-workers", &MAX_WORKERS.to_string(), "--interval", "1"])
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
    wait_for(&lines, &mut seen, Duration::from_secs(300), "0 workers on the empty queue", |d| {
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

    wait_for(&lines, &mut seen, Duration::from_secs(300), "the maximum of workers", |d| {
        d["workers"].as_u64() == Some(MAX_WORKERS)
    })?;
    // The prediction: 60 jobs at 8 per worker and about 1.55 jobs/s each (the configured
    // figures: no worker has reported yet) ask for 60 / (8 + 1.55 x 5) -> 3.8 workers or more
    // (the backlog rule; the forecast rule sees 60 arrivals in a second and asks for more
    // still), capped at the maximum and all started at once. The backlog only shrinks from
    // there, so no worker is started again: MAX_WORKERS cold starts in all (checked below).
    let first = seen.iter().find(|d| d["start"].as_u64().is_some_and(|n| n > 0)).context("no start")?;
    assert_eq!(first["start"].as_u64(), Some(MAX_WORKERS), "{first}");
    let why = &first["reason"];
    let wanted =
        why["workers_for_backlog"].as_f64().unwrap_or(0.0).max(why["workers_for_forecast"].as_f64().unwrap_or(0.0));
    assert!(wanted >= MAX_WORKERS as f64, "{why}");
    assert!(
        seen.iter().all(|d| d["workers"].as_u64().is_some_and(|w| w <= MAX_WORKERS)),
        "more than {MAX_WORKERS} workers: {seen:#?}"
    );
    // Back to zero once the burst is done and the ski-rental rule lets the last worker go.
    wait_for(&lines, &mut seen, Duration::from_secs(600), "0 workers after the burst", |d| {
        d["workers"] == 0 && d["draining"] == 0 && d["desired"] == 0 && d["visible"] == 0 && d["in_flight"] == 0
    })?;
    // Ember's decisions explain themselves: a JSON object with the rule that fired.
    let reasons: Vec<&Value> = seen.iter().map(|d| &d["reason"]).filter(|r| r.is_object()).collect();
    assert_eq!(reasons.len(), seen.len(), "a decision without its explanation: {seen:#?}");
    let last_go = reasons.iter().rev().find(|r| r["rule"].as_str().is_some_and(|r| r.starts_with("ski-rental")));
    assert!(last_go.is_some_and(|r| r["rule"] == "ski-rental: let go"), "{reasons:#?}");
    // The workers reported their own figures, and the policy used them.
    assert!(reasons.iter().any(|r| r["figures"] == "reported"), "{reasons:#?}");
    let started: u64 = seen.iter().map(|d| d["start"].as_u64().unwrap_or(0)).sum();
    assert_eq!(started, MAX_WORKERS, "cold starts beyond the predicted {MAX_WORKERS}: {seen:#?}");

    // Stop the autoscaler: SIGTERM, it exits cleanly.
    Command::new("kill").args(["-TERM", &autoscaler.0.id().to_string()]).status()?;
    let mut autoscaler = autoscaler;
    let status = autoscaler.0.wait()?;
    assert!(status.success(), "autoscaler exited with {status}");

    let results = results(&endpoint, bucket, "out/results/burst/")?;
    let ids: std::collections::BTreeSet<&str> = results.iter().filter_map(|r| r["custom_id"].as_str()).collect();
    assert_eq!((results.len(), ids.len()), (JOBS, JOBS), "one result per job");
    for r in &results {
        let content = &r["response"]["body"]["choices"][0]["message"]["content"];
        assert_eq!(r["response"]["status_code"], 200, "{r}");
        assert!(content.as_str().is_some_and(|c| !c.is_empty()), "{r}");
    }
    // Every worker exited by itself after its SIGTERM (its stats line is there), and no job
    // was cut short: none released by a drain, retried or poisoned. How many deliveries it took
    // is not asserted: on a loaded machine SQS (moto here, AWS alike) may hand a message out
    // again, and the create-only result write keeps that harmless; what a user checks is one
    // result per job (above) and an empty queue (below).
    let stats = worker_stats(&logs)?;
    assert_eq!(stats.len() as u64, seen.iter().map(|d| d["start"].as_u64().unwrap_or(0)).sum::<u64>(), "{stats:?}");
    assert!(stats.len() as u64 >= MAX_WORKERS);
    let sum = |k: &str| stats.iter().map(|s| s[k].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!((sum("released"), sum("retried"), sum("poisoned")), (0, 0, 0), "{stats:?}");
    assert!(sum("done") >= JOBS as u64 && sum("received") >= sum("done"), "{stats:?}");
    let status: Value = serde_json::from_slice(&ember(&env).args(["status", "--json"]).output()?.stdout)?;
    assert_eq!(status, json!({"visible": 0, "in_flight": 0, "delayed": 0, "dlq": 0}));
    Ok(())
}

/// The shipped traces, as `--trace examples/autoscale/*.json` hands them (a shell glob gives
/// several values after one `--trace`).
fn shipped_traces() -> anyhow::Result<Vec<std::path::PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/autoscale");
    let mut traces: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .filter(|p| p.as_ref().map_or(true, |p| p.extension().is_some_and(|e| e == "json")))
        .collect::<Result<_, _>>()?;
    traces.sort();
    Ok(traces)
}

#[test]
fn simulate_prints_every_policy_at_defaults_and_tuned_with_the_bound() -> anyhow::Result<()> {
    let traces = shipped_traces()?;
    assert_eq!(traces.len(), 4);
    let out =
        ember(&[]).args(["autoscale", "simulate", "--cold-start-seconds", "1,30", "--trace"]).args(&traces).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout)?;
    for trace in ["burst", "diurnal", "idle", "spike"] {
        for cold in ["1", "30"] {
            let rows: Vec<&str> = table.lines().filter(|l| l.starts_with(&format!("| {trace} | {cold} |"))).collect();
            let labels: Vec<&str> = rows.iter().filter_map(|r| r.split('|').nth(3)).map(str::trim).collect();
            assert_eq!(
                labels,
                [
                    "ember",
                    "keda (defaults)",
                    "keda (tuned)",
                    "runpod-requests (defaults)",
                    "runpod-requests (tuned)",
                    "runpod-delay (defaults)",
                    "runpod-delay (tuned)",
                    "bound (clairvoyant)"
                ],
                "{table}"
            );
        }
    }
    Ok(())
}

/// The simulator's step: waits under it are rounding, so p95 waits within one step are equal.
const STEP_S: f64 = 0.05;

/// One group of `ember autoscale simulate --json`.
fn groups(stdout: &[u8]) -> anyhow::Result<Vec<Value>> {
    String::from_utf8_lossy(stdout).lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// Every trace (the four shipped and, when `../shared/traces` is there, the Azure trace
/// converted by `scripts/azure-trace.py`) at cold starts of 1, 30 and 90 s: prints Ember's
/// standing and checks what BENCHMARKS.md states: every job done by every row, the bound
/// below every row at least as fast as Ember, the targets where they are met, and no peer
/// cheaper at an equal or better p95 on the shipped traces (on the Azure trace one is: KEDA
/// tuned at 90 s, stated there).
#[test]
fn simulate_compares_ember_with_the_peers_and_the_bound_on_every_trace() -> anyhow::Result<()> {
    let mut traces = shipped_traces()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let azure = root.join("../shared/traces/AzureLLMInferenceTrace_conv.csv");
    let dir = tempfile::tempdir()?;
    if azure.exists() {
        let converted = dir.path().join("azure-conv.csv");
        let out =
            Command::new("python3").arg(root.join("scripts/azure-trace.py")).arg(&azure).arg(&converted).output()?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        traces.push(converted);
    } else {
        println!("NOTE: {} not found: the Azure trace was not compared", azure.display());
    }
    let out = ember(&[]).args(["autoscale", "simulate", "--json", "--trace"]).args(&traces).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let groups = groups(&out.stdout)?;
    assert_eq!(groups.len(), traces.len() * 3);
    let mut summary = Vec::new();
    for g in &groups {
        let reports = g["reports"].as_array().context("no reports")?;
        let ember = &reports[0];
        assert_eq!(ember["policy"], "ember");
        for r in reports {
            assert_eq!(r["done"], r["jobs"], "{r}");
        }
        assert_eq!(ember["released"], 0, "{ember}");
        let bound = g["bound"]["worker_seconds"].as_f64().context("no bound")?;
        let p95 = |r: &Value| r["wait_p95_s"].as_f64().unwrap_or(f64::NAN);
        let ws = |r: &Value| r["worker_seconds"].as_f64().unwrap_or(f64::NAN);
        // A lower bound: no row with a p95 at least as good as Ember's beats it.
        for r in reports.iter().filter(|r| p95(r) <= p95(ember)) {
            assert!(ws(r) >= bound - 1e-6, "below the bound {bound}: {r}");
        }
        let best_peer = reports[1..].iter().map(p95).fold(f64::INFINITY, f64::min);
        let (trace, cold) = (g["trace"].as_str().unwrap_or_default(), g["cold_start_s"].as_f64().unwrap_or_default());
        // What BENCHMARKS.md states: within 1.3x of the bound on idle and on burst at 1 s...
        if trace == "idle" || (trace == "burst" && cold == 1.0) {
            assert!(ws(ember) <= 1.3 * bound, "{trace} at {cold} s: {ember} vs the bound {bound}");
        }
        // ...a p95 no worse than the best peer's on the shipped burst, diurnal and idle traces...
        if ["burst", "diurnal", "idle"].contains(&trace) {
            assert!(p95(ember) <= best_peer + STEP_S, "{trace} at {cold} s: {ember}, best peer p95 {best_peer}");
        }
        // ...and on the shipped traces no peer is cheaper at an equal or better p95.
        if trace != "azure-conv" {
            for r in reports[1..].iter().filter(|r| p95(r) <= p95(ember) + STEP_S) {
                assert!(ws(r) >= ws(ember), "{trace} at {cold} s: {r} is cheaper than {ember}");
            }
        }
        summary.push(format!(
            "{} at {} s: ember {:.0} worker-s = {:.2}x the bound, p95 {:.2} s vs best peer {:.2} s",
            g["trace"].as_str().unwrap_or_default(),
            g["cold_start_s"],
            ws(ember),
            ws(ember) / bound,
            p95(ember),
            best_peer
        ));
    }
    println!("{}", summary.join("\n"));
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
