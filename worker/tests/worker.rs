//! The queue worker end to end, with the real `ember` binary, the real small model, and real
//! queues: SQS and S3 on moto (127.0.0.1), and the embedded SQLite queue with a local result
//! directory. Expected answers come from the engine run in this process on the same model, so
//! a result that went to the wrong job, or was cut or duplicated, does not match.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ember_engine::{Engine, GenerateRequest, Prompt, SamplingParams};
use ember_model_loader::{load, LoadOptions, Message};
use ember_tests::{aws_config_for, aws_env, smollm_hf, test_seed, MotoServer};
use ember_worker::job::ResultLine;
use ember_worker::store::{local::LocalStore, s3::S3Store, ObjectStore};
use rand::Rng;
use serde_json::{json, Value};

/// These tests start several model-loading processes each: run them one at a time on the
/// shared 2-core machines.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn model() -> anyhow::Result<String> {
    Ok(smollm_hf("f32")?.to_string_lossy().into_owned())
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// The greedy answers of the engine in this process: what every worker must reproduce.
fn expected(prompts: &[String], max_tokens: usize) -> anyhow::Result<Vec<String>> {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    let engine = match ENGINE.get() {
        Some(e) => e,
        None => {
            let loaded = rt()?.block_on(load(&model()?.parse()?, &LoadOptions::default()))?;
            ENGINE.get_or_init(|| Engine::new(loaded))
        }
    };
    prompts
        .iter()
        .map(|p| {
            let req = GenerateRequest {
                allow_special_tokens: false,
                prompt_ids: None,
                prompt: Prompt::Chat(vec![Message::new("user", p)]),
                max_tokens,
                sampling: SamplingParams::default(),
                stop: vec![],
            };
            Ok(engine.generate(&req)?.text)
        })
        .collect()
}

fn job(custom_id: &str, prompt: &str, max_tokens: usize) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}})
    .to_string()
}

const COUNTRIES: [&str; 25] = [
    "France",
    "Germany",
    "Italy",
    "Spain",
    "Japan",
    "China",
    "India",
    "Brazil",
    "Canada",
    "Mexico",
    "Egypt",
    "Kenya",
    "Peru",
    "Chile",
    "Norway",
    "Sweden",
    "Poland",
    "Greece",
    "Turkey",
    "Iran",
    "Vietnam",
    "Cuba",
    "Ireland",
    "Portugal",
    "Australia",
];

/// `n` different prompts.
fn prompts(n: usize) -> Vec<String> {
    let forms = ["What is the capital of {}?", "Name a famous dish from {}.", "What language is spoken in {}?"];
    (0..n).map(|i| forms[(i / COUNTRIES.len()) % forms.len()].replace("{}", COUNTRIES[i % COUNTRIES.len()])).collect()
}

/// The poison jobs of the issue, each with the error code its result must carry.
fn poison_jobs(non_utf8: bool) -> Vec<(Vec<u8>, &'static str)> {
    let mut jobs = vec![
        (b"{\"custom_id\": \"broken\", \"method\": ".to_vec(), "invalid_json"),
        (
            json!({"custom_id": "unknown-model", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]}})
            .to_string()
            .into_bytes(),
            "model_not_found",
        ),
        (
            json!({"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "default", "messages": []}})
            .to_string()
            .into_bytes(),
            "empty_messages",
        ),
        (
            json!({"custom_id": "negative", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": -5}})
            .to_string()
            .into_bytes(),
            "max_tokens_not_positive",
        ),
        (job("huge", &"lorem ipsum ".repeat(1_000_000 / 12), 4).into_bytes(), "body_too_large"),
        (job("too-long", &"hello ".repeat(9000), 4).into_bytes(), "context_length_exceeded"),
    ];
    if non_utf8 {
        let mut bytes = job("latin1", "caf\u{e9}", 4).into_bytes();
        // The UTF-8 'é' (C3 A9) becomes Latin-1 (E9): not UTF-8 any more.
        if let Some(at) = bytes.windows(2).position(|w| w == [0xC3, 0xA9]) {
            bytes.splice(at..at + 2, [0xE9]);
        }
        jobs.push((bytes, "not_utf8"));
    }
    jobs
}

/// The queue and store a test runs against, as `ember` environment variables.
enum Backend {
    Sqs { _moto: MotoServer, endpoint: String, bucket: String, queue: String },
    Embedded { dir: tempfile::TempDir },
}

impl Backend {
    fn sqs(queue: &str) -> anyhow::Result<Self> {
        let moto = MotoServer::start()?;
        let endpoint = moto.endpoint();
        let bucket = "ember-results".to_string();
        rt()?.block_on(async {
            let conf = aws_config_for(&endpoint).await;
            let s3 =
                aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());
            s3.create_bucket().bucket(&bucket).send().await
        })?;
        Ok(Self::Sqs { _moto: moto, endpoint, bucket, queue: queue.into() })
    }

    fn embedded() -> anyhow::Result<Self> {
        Ok(Self::Embedded { dir: tempfile::tempdir()? })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Sqs { endpoint, bucket, queue, .. } => {
                let mut env = aws_env(endpoint);
                env.push(("EMBER_SQS_QUEUE", queue.clone()));
                env.push(("EMBER_CREATE_QUEUES", "true".into()));
                env.push(("EMBER_RESULTS", format!("s3://{bucket}/out")));
                env
            }
            Self::Embedded { dir } => vec![
                ("EMBER_QUEUE_PATH", dir.path().join("queue.db").to_string_lossy().into_owned()),
                ("EMBER_RESULTS", dir.path().join("results").to_string_lossy().into_owned()),
            ],
        }
    }

    fn store(&self) -> anyhow::Result<Box<dyn ObjectStore>> {
        Ok(match self {
            Self::Sqs { endpoint, bucket, .. } => {
                let conf = rt()?.block_on(aws_config_for(endpoint));
                let s3 = aws_sdk_s3::Client::from_conf(
                    aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build(),
                );
                Box::new(S3Store::new(s3, bucket.clone(), "out"))
            }
            Self::Embedded { dir } => Box::new(LocalStore::new(dir.path().join("results"))),
        })
    }

    /// Every result of a batch, by key.
    fn results(&self, batch: &str) -> anyhow::Result<BTreeMap<String, ResultLine>> {
        let store = self.store()?;
        rt()?.block_on(async {
            let mut out = BTreeMap::new();
            // A line the worker could not read at all (not JSON, too large, not UTF-8) cannot
            // name its batch: its error result goes to the default batch's _rejected/ folder.
            let mut keys = store.list(&format!("results/{batch}/")).await?;
            keys.extend(store.list("results/default/_rejected/").await?);
            for key in keys {
                let bytes = store.get(&key).await?.with_context(|| format!("{key} listed but missing"))?;
                out.insert(key.clone(), serde_json::from_slice(&bytes).with_context(|| format!("parsing {key}"))?);
            }
            Ok(out)
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.args(args).env("EMBER_LOG", "info").env("EMBER_NO_PROGRESS", "1").env_remove("AWS_ENDPOINT_URL");
        cmd.envs(self.env());
        if let Ok(m) = model() {
            cmd.env("EMBER_MODEL", m);
        }
        cmd
    }

    fn ember(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = self.command(args).output()?;
        if !out.status.success() {
            bail!("ember {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out)
    }

    fn submit(&self, lines: &[Vec<u8>], batch: &str, dir: &Path) -> anyhow::Result<()> {
        let file = dir.join(format!("{batch}.jsonl"));
        std::fs::write(&file, lines.join(&b'\n'))?;
        self.ember(&["submit", &file.to_string_lossy(), "--batch-id", batch])?;
        Ok(())
    }

    fn status(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_slice(&self.ember(&["status", "--json"])?.stdout)?)
    }
}

/// The success text of a result line.
fn answer(line: &ResultLine) -> Option<String> {
    let r = line.response.as_ref().filter(|r| r.status_code == 200)?;
    r.body["choices"][0]["message"]["content"].as_str().map(str::to_string)
}

fn check_answers(results: &BTreeMap<String, ResultLine>, batch: &str, ps: &[String], want: &[String]) {
    for (i, (p, w)) in ps.iter().zip(want).enumerate() {
        let key = format!("results/{batch}/job-{i}.json");
        let line = results.get(&key).unwrap_or_else(|| panic!("no result for job-{i} ({p})"));
        assert_eq!(line.custom_id, format!("job-{i}"));
        assert_eq!(answer(line).as_deref(), Some(w.as_str()), "job-{i}: {p}");
    }
}

fn fifty_jobs(backend: &Backend) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ps = prompts(50);
    let want = expected(&ps, 10)?;
    let lines: Vec<Vec<u8>> =
        ps.iter().enumerate().map(|(i, p)| job(&format!("job-{i}"), p, 10).into_bytes()).collect();
    backend.submit(&lines, "fifty", dir.path())?;
    let out = backend.ember(&["serve", "--exit-when-idle", "--wait-seconds", "1"])?;
    let stats: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(stats["done"], 50, "{stats}");
    let results = backend.results("fifty")?;
    assert_eq!(results.len(), 50);
    check_answers(&results, "fifty", &ps, &want);
    assert!(answer(&results["results/fifty/job-0.json"]).is_some_and(|a| a.contains("Paris")));
    let usage = &results["results/fifty/job-0.json"].response.as_ref().map(|r| r.body["usage"].clone());
    assert!(usage.as_ref().is_some_and(|u| u["completion_tokens"].as_u64().is_some_and(|n| n > 0)));
    let status = backend.status()?;
    assert_eq!(status, json!({"visible": 0, "in_flight": 0, "delayed": 0, "dlq": 0}));
    Ok(())
}

#[test]
fn fifty_jobs_through_sqs() -> anyhow::Result<()> {
    let _g = heavy();
    fifty_jobs(&Backend::sqs("fifty")?)
}

fn poison(backend: &Backend, non_utf8: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ps = prompts(3);
    let want = expected(&ps, 8)?;
    let poison = poison_jobs(non_utf8);
    // Valid and poison jobs interleaved, so they share receive batches.
    let mut lines = Vec::new();
    for (i, (bad, _)) in poison.iter().enumerate() {
        if i < ps.len() {
            lines.push(job(&format!("job-{i}"), &ps[i], 8).into_bytes());
        }
        lines.push(bad.clone());
    }
    backend.submit(&lines, "poison", dir.path())?;
    let out = backend.ember(&["serve", "--exit-when-idle", "--wait-seconds", "1", "--concurrency", "4"])?;
    let stats: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(stats["done"], 3, "{stats}");
    assert_eq!(stats["poisoned"], poison.len(), "{stats}");

    let results = backend.results("poison")?;
    assert_eq!(results.len(), 3 + poison.len(), "{:?}", results.keys());
    check_answers(&results, "poison", &ps, &want);
    let mut codes: Vec<&str> = results.values().filter_map(ResultLine::error_code).collect();
    let mut want_codes: Vec<&str> = poison.iter().map(|(_, c)| *c).collect();
    codes.sort_unstable();
    want_codes.sort_unstable();
    assert_eq!(codes, want_codes);
    // A refused job without a readable custom_id is answered under its message id.
    assert!(results.keys().any(|k| k.starts_with("results/default/_rejected/")));
    let status = backend.status()?;
    assert_eq!(status["dlq"], poison.len(), "{status}");
    assert_eq!((status["visible"].clone(), status["in_flight"].clone()), (json!(0), json!(0)));

    // Redrive puts them back; they fail again the same way and return to the DLQ, with the
    // error results already there and not written twice.
    let moved: Value = serde_json::from_slice(&backend.ember(&["dlq", "redrive"])?.stdout)?;
    assert_eq!(moved["redriven"], poison.len());
    assert_eq!(backend.status()?["dlq"], 0);
    let out = backend.ember(&["serve", "--exit-when-idle", "--wait-seconds", "1"])?;
    let stats: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(stats["poisoned"], poison.len(), "{stats}");
    let again = backend.results("poison")?;
    for (key, line) in &results {
        assert_eq!(again.get(key), Some(line), "{key} changed");
    }
    // Redriven messages are new messages (new ids, as on SQS): only the lines that could not
    // be read, and so are filed under their message id, get a second error result.
    let unreadable = results.keys().filter(|k| k.contains("/_rejected/")).count();
    assert_eq!(again.len(), results.len() + unreadable);
    assert_eq!(backend.status()?["dlq"], poison.len());
    Ok(())
}

#[test]
fn poison_jobs_get_error_results_and_go_to_the_dlq_embedded() -> anyhow::Result<()> {
    let _g = heavy();
    poison(&Backend::embedded()?, true)
}

#[test]
fn poison_jobs_get_error_results_and_go_to_the_dlq_sqs() -> anyhow::Result<()> {
    let _g = heavy();
    poison(&Backend::sqs("poison")?, false)
}

#[test]
fn a_non_utf8_line_cannot_go_to_sqs_and_submit_says_which() -> anyhow::Result<()> {
    let _g = heavy();
    let backend = Backend::sqs("text-only")?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("jobs.jsonl");
    let bad = poison_jobs(true).pop().map(|(b, _)| b).unwrap_or_default();
    std::fs::write(&file, [job("ok", "Hi", 2).into_bytes(), bad].join(&b'\n'))?;
    let out = backend.command(&["submit", &file.to_string_lossy()]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 2") && stderr.contains("not UTF-8"), "{stderr}");
    Ok(())
}

/// A worker process whose output goes to a log file, killed when dropped.
struct Worker {
    child: Child,
}

impl Worker {
    fn start(backend: &Backend, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = backend
            .command(&["serve", "--wait-seconds", "1", "--concurrency", "2", "--grace-seconds", "5"])
            .env("EMBER_VISIBILITY_TIMEOUT", "3")
            .env("EMBER_MAX_RECEIVE_COUNT", CRASH_MAX_RECEIVE_COUNT)
            .env("EMBER_THREADS", "1")
            .env("EMBER_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Self { child })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the graceful exit.
    fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("worker exited with {status} after SIGTERM");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("worker did not stop within 60 s of SIGTERM")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deliveries allowed in the crash test: low enough that a job can be killed on every one of
/// them and reach the DLQ with no answer, which `ember dlq answer` must then give it.
const CRASH_MAX_RECEIVE_COUNT: &str = "4";

/// Three workers on one queue, killed with SIGKILL at random moments and restarted, until the
/// queue is drained; then every job must have exactly one answer: its result, an error result,
/// or (killed on every delivery) the one `ember dlq answer` writes.
///
/// `EMBER_TEST_KILL_JOBS` sets the job count (40 by default, which on a 2-core Zen 1 took
/// 51 kills in 76 s; the nightly-sized run is 1000),
/// `EMBER_TEST_SEED` the seed of the kill schedule (printed, so a failure can be replayed).
fn crash_safety(backend: &Backend) -> anyhow::Result<()> {
    use rand::SeedableRng;
    let dir = tempfile::tempdir()?;
    let n: usize = std::env::var("EMBER_TEST_KILL_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let seed = test_seed(&format!("crash test ({n} jobs)"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ps = prompts(n);
    // The distinct prompts' answers, computed once each.
    let distinct: Vec<String> = ps.iter().take(COUNTRIES.len() * 3).cloned().collect();
    let distinct_want = expected(&distinct, 4)?;
    let want: Vec<String> = (0..n).map(|i| distinct_want[i % distinct.len()].clone()).collect();
    let poison: Vec<(Vec<u8>, &str)> = poison_jobs(false).into_iter().take(3).collect();
    let mut lines: Vec<Vec<u8>> =
        ps.iter().enumerate().map(|(i, p)| job(&format!("job-{i}"), p, 4).into_bytes()).collect();
    lines.extend(poison.iter().map(|(b, _)| b.clone()));
    backend.submit(&lines, "crash", dir.path())?;

    let logs: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("worker-{i}.log"))).collect();
    let mut workers = logs.iter().map(|l| Worker::start(backend, l)).collect::<anyhow::Result<Vec<_>>>()?;
    let (mut kills, start) = (0, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..2500)));
        let status = backend.status()?;
        let pending = ["visible", "in_flight", "delayed"].iter().map(|k| status[k].as_u64().unwrap_or(0)).sum::<u64>();
        // Drained: every job is deleted (its answer written) or in the DLQ.
        if pending == 0 {
            break;
        }
        if start.elapsed() > Duration::from_secs(60 * (15 + n as u64 / 50)) {
            bail!("queue not drained ({status}) after {kills} kills (seed {seed})");
        }
        let victim = rng.random_range(0..workers.len());
        workers[victim].kill();
        kills += 1;
        workers[victim] = Worker::start(backend, &logs[victim])?;
    }
    for w in workers {
        w.stop()?;
    }
    // Jobs killed on every allowed delivery sit in the DLQ with no answer until this.
    let listed = String::from_utf8(backend.ember(&["dlq", "list"])?.stdout)?;
    let unanswered_before = listed.lines().filter(|l| l.contains("\"answered\":false")).count();
    backend.ember(&["dlq", "answer"])?;
    let listed = String::from_utf8(backend.ember(&["dlq", "list"])?.stdout)?;
    let dlq_no_answer = listed.lines().filter(|l| l.contains("\"answered\":false")).count();

    let results = backend.results("crash")?;
    let mut answers: HashMap<String, Vec<&ResultLine>> = HashMap::new();
    for line in results.values() {
        answers.entry(line.custom_id.clone()).or_default().push(line);
    }
    let lost: Vec<usize> = (0..n).filter(|i| !answers.contains_key(&format!("job-{i}"))).collect();
    let dead_lettered = (0..n).filter(|i| {
        answers.get(&format!("job-{i}")).is_some_and(|ls| ls.iter().any(|l| l.error_code() == Some("dead_lettered")))
    });
    let dead_lettered: Vec<usize> = dead_lettered.collect();
    // No result was written twice: across every process that ever ran, each job was
    // reported done (its result created) at most once.
    let mut written: HashMap<String, usize> = HashMap::new();
    for log in &logs {
        for line in std::fs::read_to_string(log)?.lines() {
            // A process killed mid-write can leave a cut last line: skip what does not parse.
            let Ok(event) = serde_json::from_str::<Value>(line) else { continue };
            if event["message"] == "job done" {
                let id = event["custom_id"].as_str().unwrap_or_default().to_string();
                *written.entry(id).or_default() += 1;
            }
        }
    }
    let duplicated: Vec<_> = written.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "crash test (seed {seed}): {n} jobs, {kills} kills, {:.0} s; lost {}, duplicated {}, dead-lettered {} \
         ({unanswered_before} without an answer before `ember dlq answer`, {dlq_no_answer} after)",
        start.elapsed().as_secs_f64(),
        lost.len(),
        duplicated.len(),
        dead_lettered.len(),
    );
    assert!(lost.is_empty(), "jobs with no answer: {lost:?} (seed {seed})");
    assert!(duplicated.is_empty(), "results created more than once: {duplicated:?} (seed {seed})");
    assert_eq!(dlq_no_answer, 0, "dead-lettered jobs without an answer (seed {seed})");
    assert!(!written.is_empty(), "no `job done` lines in the logs");
    // Every job that was not dead-lettered has the engine's answer, once.
    for (i, (p, w)) in ps.iter().zip(&want).enumerate() {
        if dead_lettered.contains(&i) {
            continue;
        }
        let key = format!("results/crash/job-{i}.json");
        let line = results.get(&key).unwrap_or_else(|| panic!("no result for job-{i} ({p}), seed {seed}"));
        assert_eq!(answer(line).as_deref(), Some(w.as_str()), "job-{i}: {p}");
    }
    let poisoned = results.values().filter(|r| r.error_code().is_some_and(|c| c != "dead_lettered")).count();
    assert_eq!(poisoned, poison.len());
    // Drained; the DLQ holds the poison jobs, the dead-lettered ones, and any job whose last
    // allowed delivery wrote its result and was killed before deleting the message (answered,
    // so `dlq list` shows it answered).
    let status = backend.status()?;
    assert_eq!((&status["visible"], &status["in_flight"], &status["delayed"]), (&json!(0), &json!(0), &json!(0)));
    let dlq = status["dlq"].as_u64().unwrap_or(0) as usize;
    assert_eq!(dlq, listed.lines().count(), "`ember dlq list` shows every dead letter: {listed}");
    assert!(dlq >= poison.len() + dead_lettered.len(), "{status} after {kills} kills (seed {seed})");
    Ok(())
}

#[test]
fn killed_workers_lose_no_job_and_duplicate_none_sqs() -> anyhow::Result<()> {
    let _g = heavy();
    crash_safety(&Backend::sqs("crash")?)
}

#[test]
fn killed_workers_lose_no_job_and_duplicate_none_embedded() -> anyhow::Result<()> {
    let _g = heavy();
    crash_safety(&Backend::embedded()?)
}

#[test]
fn a_job_longer_than_the_visibility_timeout_is_not_redelivered() -> anyhow::Result<()> {
    let _g = heavy();
    let backend = Backend::sqs("long")?;
    let dir = tempfile::tempdir()?;
    // A plain completion that counts on and on, far longer than the watch below on any CPU.
    let line = json!({"custom_id": "long", "method": "POST", "url": "/v1/completions",
        "body": {"model": "default", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 5000}});
    backend.submit(&[line.to_string().into_bytes()], "long", dir.path())?;
    let visibility = Duration::from_secs(2);
    let serve = Serve::start(
        backend
            .command(&["serve", "--wait-seconds", "1", "--concurrency", "2", "--grace-seconds", "1"])
            .env("EMBER_VISIBILITY_TIMEOUT", visibility.as_secs().to_string())
            .env("EMBER_THREADS", "1"),
        dir.path(),
    )?;
    // Watch the queue while the job runs: once received, the message stays hidden (in flight,
    // never visible) until it has been running for three visibility timeouts. What is waited
    // for is the queue's state, polled; a slow machine only makes the watch start later.
    let watch = Instant::now();
    let mut hidden_since: Option<Instant> = None;
    loop {
        let status = backend.status()?;
        let (visible, in_flight) = (status["visible"].as_u64(), status["in_flight"].as_u64());
        match (hidden_since, visible, in_flight) {
            (None, Some(1), Some(0)) => {} // not received yet
            (_, Some(0), Some(1)) => {
                if hidden_since.get_or_insert_with(Instant::now).elapsed() > 3 * visibility {
                    break;
                }
            }
            (Some(since), Some(0), Some(0)) => {
                bail!("the job finished {:?} after it was received; make it longer", since.elapsed())
            }
            _ => bail!("the message of the running job is visible or gone: {status}"),
        }
        if watch.elapsed() > Duration::from_secs(300) {
            bail!("the job was not received within 5 minutes: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Stopped now, the job is released: it was received once, and never again while it ran,
    // although a worker with a free slot polled every second.
    serve.signal("TERM")?;
    let stats = serve.wait(Duration::from_secs(300))?;
    assert_eq!(stats["received"], 1, "{stats}");
    assert_eq!((stats["done"].clone(), stats["released"].clone()), (json!(0), json!(1)), "{stats}");
    Ok(())
}

#[test]
fn run_answers_a_batch_file_in_input_order_on_the_embedded_default() -> anyhow::Result<()> {
    let _g = heavy();
    let dir = tempfile::tempdir()?;
    let ps = prompts(3);
    let want = expected(&ps, 8)?;
    let mut lines: Vec<String> = ps.iter().enumerate().map(|(i, p)| job(&format!("job-{i}"), p, 8)).collect();
    lines.insert(1, "{\"custom_id\": \"bad\", \"body\": 5}".into());
    let input = dir.path().join("batch.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n")?;
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .current_dir(dir.path())
        .args(["run", "batch.jsonl", "--model", &model()?])
        .env("EMBER_NO_PROGRESS", "1")
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 succeeded, 1 failed"));
    let output = std::fs::read_to_string(dir.path().join("batch.output.jsonl"))?;
    let got: Vec<ResultLine> = output.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let ids: Vec<&str> = got.iter().map(|l| l.custom_id.as_str()).collect();
    assert_eq!(ids, ["job-0", "bad", "job-1", "job-2"]);
    for (line, w) in [&got[0], &got[2], &got[3]].into_iter().zip(&want) {
        assert_eq!(answer(line).as_deref(), Some(w.as_str()));
    }
    assert_eq!(got[1].error_code(), Some("unsupported_method"));
    // Results live under .ember/ in the working directory; `run` worked a private queue, not
    // the shared .ember/queue.db.
    assert!(dir.path().join(".ember/results").is_dir());
    assert!(!dir.path().join(".ember/queue.db").exists());

    // The same file again under the same batch id: every line is answered by the result its
    // custom_id already has (results are written once per key), nothing is left queued.
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_ember"))
            .current_dir(dir.path())
            .args(["run", "batch.jsonl", "--model", &model()?, "--batch-id", "again", "-o", "again.jsonl"])
            .env("EMBER_NO_PROGRESS", "1")
            .output()?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Results land in .ember/results/{batch_id}/ (not .ember/results/results/).
    assert!(dir.path().join(".ember/results/again/job-0.json").is_file(), "results are not in .ember/results/again/");
    let again = std::fs::read_to_string(dir.path().join("again.jsonl"))?;
    let again: Vec<ResultLine> = again.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let answers = |lines: &[ResultLine]| lines.iter().map(|l| (l.custom_id.clone(), answer(l))).collect::<Vec<_>>();
    assert_eq!(answers(&again), answers(&got));
    assert!(!dir.path().join(".ember/queue.db").exists(), "run left a shared queue behind");
    Ok(())
}

/// `ember serve` with its stdout and stderr in files (a pipe nobody reads would block it), for
/// tests that signal it and then read what it printed.
struct Serve {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Serve {
    fn start(cmd: &mut Command, dir: &Path) -> anyhow::Result<Self> {
        let (stdout, stderr) = (dir.join("serve.stdout"), dir.join("serve.stderr"));
        let child = cmd.stdout(std::fs::File::create(&stdout)?).stderr(std::fs::File::create(&stderr)?).spawn()?;
        Ok(Self { child, stdout, stderr })
    }

    /// Waits until stderr holds `count` lines containing `needle` (polled; the five-minute
    /// limit only guards against a hang).
    fn wait_for_log(&mut self, needle: &str, count: usize) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.stderr)?;
            if log.lines().filter(|l| l.contains(needle)).count() >= count {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("serve exited ({status}) before logging {needle:?} {count} times:\n{log}");
            }
            if start.elapsed() > Duration::from_secs(300) {
                bail!("serve did not log {needle:?} {count} times within 5 minutes:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status()?;
        Ok(())
    }

    /// Waits for a successful exit (killing it after `hang_guard`); answers its final counts
    /// (stdout).
    fn wait(mut self, hang_guard: Duration) -> anyhow::Result<Value> {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if start.elapsed() > hang_guard {
                let _ = self.child.kill();
                bail!("serve did not exit within {hang_guard:?}:\n{}", std::fs::read_to_string(&self.stderr)?);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !status.success() {
            bail!("serve exited with {status}:\n{}", std::fs::read_to_string(&self.stderr)?);
        }
        Ok(serde_json::from_slice(&std::fs::read(&self.stdout)?)?)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ember serve` on one counting job and sends SIGTERM once the job is running; answers
/// the worker's final counts.
fn sigterm_during_a_job(backend: &Backend, max_tokens: usize, grace: &str) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let batch = format!("term{max_tokens}");
    let line = json!({"custom_id": "count", "method": "POST", "url": "/v1/completions",
        "body": {"model": "default", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": max_tokens}});
    backend.submit(&[line.to_string().into_bytes()], &batch, dir.path())?;
    let mut serve = Serve::start(
        backend
            .command(&["serve", "--wait-seconds", "1", "--concurrency", "2", "--grace-seconds", grace])
            .env("EMBER_VISIBILITY_TIMEOUT", "60")
            .env("EMBER_LOG", "info,ember_worker::runner::serve=debug"),
        dir.path(),
    )?;
    // With a second slot free, serve polls again once it has handed the message to a job:
    // its second "waiting for messages" means the job is running.
    serve.wait_for_log("waiting for messages", 2)?;
    serve.signal("TERM")?;
    // Minutes: a hang guard, not a bound on how fast the job stops.
    serve.wait(Duration::from_secs(300))
}

#[test]
fn sigterm_finishes_a_job_within_the_grace_period_or_releases_it() -> anyhow::Result<()> {
    let _g = heavy();
    let backend = Backend::embedded()?;
    // A short job finishes within a generous grace period: its result is written.
    let stats = sigterm_during_a_job(&backend, 24, "60")?;
    assert_eq!((stats["done"].clone(), stats["released"].clone()), (json!(1), json!(0)), "{stats}");
    assert!(backend.results("term24")?.contains_key("results/term24/count.json"));

    // A long job outlives a 1 s grace period: it is stopped and handed back at once, visible
    // to other workers without waiting out the 60 s visibility timeout.
    let stats = sigterm_during_a_job(&backend, 5000, "1")?;
    assert_eq!((stats["done"].clone(), stats["released"].clone()), (json!(0), json!(1)), "{stats}");
    assert_eq!(backend.status()?["visible"], 1);
    assert!(backend.results("term5000")?.is_empty());
    Ok(())
}

#[test]
fn a_failed_job_can_be_fixed_redriven_and_answered() -> anyhow::Result<()> {
    let _g = heavy();
    let backend = Backend::embedded()?;
    let dir = tempfile::tempdir()?;
    // The job asks for a model this worker does not serve: an error result, and the DLQ.
    let line = json!({"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "other-model", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                 "max_tokens": 12}});
    backend.submit(&[line.to_string().into_bytes()], "fix", dir.path())?;
    backend.ember(&["serve", "--exit-when-idle", "--wait-seconds", "1"])?;
    let results = backend.results("fix")?;
    assert_eq!(results["results/fix/_errors/q.json"].error_code(), Some("model_not_found"));
    assert_eq!(backend.status()?["dlq"], 1);

    // The fix: a worker that serves that model (the same weights under that name). Redriven,
    // the job runs again and gets its answer beside the earlier error.
    let served = dir.path().join("other-model");
    std::os::unix::fs::symlink(smollm_hf("f32")?, &served)?;
    backend.ember(&["dlq", "redrive"])?;
    let out =
        backend.command(&["serve", "--exit-when-idle", "--wait-seconds", "1"]).env("EMBER_MODEL", &served).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let results = backend.results("fix")?;
    assert_eq!(answer(&results["results/fix/q.json"]).as_deref(), Some("The capital of France is Paris."));
    assert_eq!(backend.status()?, json!({"visible": 0, "in_flight": 0, "delayed": 0, "dlq": 0}));
    Ok(())
}
