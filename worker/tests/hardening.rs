//! What one job (or one line) can do to others, through the real `ember` binary with the real
//! model: a job cannot take another's result slot or reach pipeline records, every line of a
//! batch file gets an output line, a duplicate `custom_id` is refused with an answer, a job
//! killed on every delivery still ends with an error result its owner can read, and text from
//! a job cannot forge a log line. SQS and S3 are moto on 127.0.0.1.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ember_tests::{aws_config_for, aws_env, smollm_hf, MotoServer};
use ember_worker::job::ResultLine;
use serde_json::{json, Value};

/// The tests start model-loading processes: one at a time on the shared 2-core machines.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn job(custom_id: &str, prompt: &str) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": 6}})
}

/// Where `ember` keeps its queue and results in one test.
struct Env {
    vars: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
    /// moto (SQS + S3) when the test runs against it.
    moto: Option<(MotoServer, String)>,
}

const BUCKET: &str = "ember-results";

impl Env {
    fn embedded() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let vars = vec![
            ("EMBER_QUEUE_PATH", dir.path().join("queue.db").to_string_lossy().into_owned()),
            ("EMBER_RESULTS", dir.path().join("results").to_string_lossy().into_owned()),
        ];
        Ok(Self { vars, dir, moto: None })
    }

    fn sqs() -> anyhow::Result<Self> {
        let moto = MotoServer::start()?;
        let endpoint = moto.endpoint();
        rt()?.block_on(async {
            let s3 = s3_client(&endpoint).await;
            s3.create_bucket().bucket(BUCKET).send().await
        })?;
        let mut vars = aws_env(&endpoint);
        vars.push(("EMBER_SQS_QUEUE", "jobs".into()));
        vars.push(("EMBER_CREATE_QUEUES", "true".into()));
        vars.push(("EMBER_RESULTS", format!("s3://{BUCKET}/out")));
        Ok(Self { vars, dir: tempfile::tempdir()?, moto: Some((moto, endpoint)) })
    }

    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("EMBER_LOG", "info")
            .env("EMBER_NO_PROGRESS", "1")
            .env("EMBER_THREADS", "1")
            .env("EMBER_MODEL", smollm_hf("f32")?)
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("RUST_BACKTRACE");
        cmd.envs(self.vars.iter().map(|(k, v)| (*k, v.as_str())));
        Ok(cmd)
    }

    fn ember(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = self.command(args)?.output()?;
        if !out.status.success() {
            bail!("ember {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(out)
    }

    fn write_lines(&self, name: &str, lines: &[Vec<u8>]) -> anyhow::Result<String> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, lines.join(&b'\n'))?;
        Ok(path.to_string_lossy().into_owned())
    }

    fn submit(&self, name: &str, lines: &[Value], batch: &str) -> anyhow::Result<()> {
        let lines: Vec<Vec<u8>> = lines.iter().map(|l| l.to_string().into_bytes()).collect();
        let file = self.write_lines(name, &lines)?;
        self.ember(&["submit", &file, "--batch-id", batch])?;
        Ok(())
    }

    fn serve_until_idle(&self) -> anyhow::Result<Output> {
        self.ember(&["serve", "--exit-when-idle", "--wait-seconds", "1", "--concurrency", "1"])
    }

    fn status(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_slice(&self.ember(&["status", "--json"])?.stdout)?)
    }

    /// An object of the result store (`out/` in the bucket, or the results folder).
    fn object(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match &self.moto {
            Some((_, endpoint)) => rt()?.block_on(async {
                let s3 = s3_client(endpoint).await;
                match s3.get_object().bucket(BUCKET).key(format!("out/{key}")).send().await {
                    Ok(o) => Ok(Some(o.body.collect().await?.into_bytes().to_vec())),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }),
            None => {
                let path = self.dir.path().join("results").join(key);
                Ok(path.exists().then(|| std::fs::read(&path)).transpose()?)
            }
        }
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let (_, endpoint) = self.moto.as_ref().context("put_object needs moto")?;
        rt()?.block_on(async {
            let s3 = s3_client(endpoint).await;
            s3.put_object().bucket(BUCKET).key(format!("out/{key}")).body(bytes.to_vec().into()).send().await
        })?;
        Ok(())
    }

    /// Every result line under `prefix` of the result store, by key.
    fn results_under(&self, prefix: &str) -> anyhow::Result<Vec<(String, ResultLine)>> {
        let keys: Vec<String> = match &self.moto {
            Some((_, endpoint)) => rt()?.block_on(async {
                let s3 = s3_client(endpoint).await;
                let listed = s3.list_objects_v2().bucket(BUCKET).prefix(format!("out/{prefix}")).send().await?;
                Ok::<_, anyhow::Error>(
                    listed
                        .contents()
                        .iter()
                        .filter_map(|o| o.key().and_then(|k| k.strip_prefix("out/")).map(str::to_string))
                        .collect(),
                )
            })?,
            None => {
                let dir = self.dir.path().join("results").join(prefix);
                let mut keys = Vec::new();
                if dir.exists() {
                    for entry in std::fs::read_dir(&dir)? {
                        let name = entry?.file_name().to_string_lossy().into_owned();
                        if name.ends_with(".json") {
                            keys.push(format!("{prefix}{name}"));
                        }
                    }
                }
                keys
            }
        };
        let mut out = Vec::new();
        for key in keys {
            let bytes = self.object(&key)?.with_context(|| format!("{key} listed but missing"))?;
            out.push((key.clone(), serde_json::from_slice(&bytes).with_context(|| format!("parsing {key}"))?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let conf = aws_config_for(endpoint).await;
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build())
}

fn text(line: &ResultLine) -> Option<String> {
    let r = line.response.as_ref().filter(|r| r.status_code == 200)?;
    r.body["choices"][0]["message"]["content"].as_str().map(str::to_string)
}

#[test]
fn a_squatting_job_cannot_change_another_jobs_answer_or_a_pipeline_record() -> anyhow::Result<()> {
    let _g = heavy();
    let env = Env::sqs()?;
    // A pipeline execution record in the same results prefix, as `ember serve --pipelines`
    // writes them.
    let record_key = "pipelines/executions/e1/hops/000000.json";
    let record = br#"{"state": "Ask", "status": "SUCCEEDED"}"#;
    env.put_object(record_key, record)?;

    env.submit("victim.jsonl", &[job("q1", "What is the capital of France?")], "b1")?;
    env.serve_until_idle()?;
    let victim = env.object("results/b1/q1.json")?.context("the victim's result was not written")?;
    let victim_line: ResultLine = serde_json::from_slice(&victim)?;
    assert!(text(&victim_line).is_some_and(|t| t.contains("Paris")), "{victim_line:?}");

    let mut squat_key = job("s2", "Say: you have been hacked.");
    squat_key["ember"] = json!({"result_key": "results/b1/q1.json"});
    let mut squat_record = job("s3", "Say: you have been hacked.");
    squat_record["ember"] = json!({"result_key": record_key});
    let squatters = [job("q1", "Say: you have been hacked."), squat_key, squat_record];
    env.submit("squat.jsonl", &squatters, "b1")?;
    env.serve_until_idle()?;

    assert_eq!(env.object("results/b1/q1.json")?.as_deref(), Some(victim.as_slice()), "the victim's answer changed");
    assert_eq!(env.object(record_key)?.as_deref(), Some(&record[..]), "a pipeline record changed");
    let refused = env.results_under("results/b1/_rejected/")?;
    let mut codes: Vec<(String, String)> =
        refused.iter().map(|(_, l)| (l.custom_id.clone(), l.error_code().unwrap_or_default().to_string())).collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            ("q1".into(), "duplicate_custom_id".into()),
            ("s2".into(), "result_key_not_allowed".into()),
            ("s3".into(), "result_key_not_allowed".into())
        ]
    );
    let results: Vec<String> =
        env.results_under("results/b1/")?.into_iter().map(|(k, _)| k).filter(|k| !k.contains("/_")).collect();
    assert_eq!(results, ["results/b1/q1.json"], "only the victim's result is a result");
    assert_eq!(env.status()?, json!({"visible": 0, "in_flight": 0, "delayed": 0, "dlq": 3}));
    Ok(())
}

#[test]
fn run_answers_every_line_whatever_is_wrong_with_it_and_leaves_nothing_queued() -> anyhow::Result<()> {
    let _g = heavy();
    let env = Env::embedded()?;
    let mut bad_batch = job("bad-batch", "Hi");
    bad_batch["ember"] = json!({"batch_id": "a/b"});
    let huge = format!("{{\"custom_id\": \"huge\", \"padding\": \"{}\"}}", "x".repeat(5 << 20));
    let mut lines: Vec<Vec<u8>> = vec![job("ok-1", "What is the capital of France?").to_string().into_bytes()];
    for id in ["a..b", "back\\slash", "nul\u{0}byte", &"x".repeat(1100), ".ember-tmp-x"] {
        lines.push(job(id, "Hi").to_string().into_bytes());
    }
    lines.push(bad_batch.to_string().into_bytes());
    lines.push(job("ok-1", "What is the capital of Italy?").to_string().into_bytes());
    lines.push(huge.into_bytes());
    let file = env.write_lines("batch.jsonl", &lines)?;
    let out = env.command(&["run", &file, "--output", "out.jsonl"])?.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let output = std::fs::read_to_string(env.dir.path().join("out.jsonl"))?;
    let results: Vec<ResultLine> = output.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(results.len(), lines.len(), "one output line per input line:\n{output}");
    assert!(text(&results[0]).is_some_and(|t| t.contains("Paris")), "{:?}", results[0]);
    let codes: Vec<&str> = results[1..].iter().map(|r| r.error_code().unwrap_or("none")).collect();
    assert_eq!(
        codes,
        [
            "invalid_custom_id",
            "invalid_custom_id",
            "invalid_custom_id",
            "invalid_custom_id",
            "invalid_custom_id",
            "invalid_batch_id",
            "duplicate_custom_id",
            "body_too_large"
        ]
    );
    assert_eq!(results[7].custom_id, "ok-1");
    // Nothing left for the next run in this folder: the refused lines were answered on the
    // run's own queue, and the shared queue was never created.
    assert!(!env.dir.path().join("queue.db").exists(), "run used the shared queue");
    Ok(())
}

#[test]
fn a_duplicate_custom_id_in_another_message_gets_an_error_result_and_the_first_keeps_its_answer() -> anyhow::Result<()>
{
    let _g = heavy();
    let env = Env::embedded()?;
    env.submit("first.jsonl", &[job("q1", "What is the capital of France?")], "b1")?;
    env.submit("second.jsonl", &[job("q1", "What is the capital of Italy?")], "b1")?;
    let served = env.serve_until_idle()?;

    let first: ResultLine = serde_json::from_slice(&env.object("results/b1/q1.json")?.context("no result for q1")?)?;
    assert!(text(&first).is_some_and(|t| t.contains("Paris")), "the first message must win: {first:?}");
    let refused = env.results_under("results/b1/_rejected/")?;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].1.error_code(), Some("duplicate_custom_id"));
    assert_eq!(refused[0].1.custom_id, "q1");
    assert_eq!(env.status()?, json!({"visible": 0, "in_flight": 0, "delayed": 0, "dlq": 1}));
    // The worker's stats count it as refused, not done.
    let stats: Value = serde_json::from_slice(&served.stdout)?;
    assert_eq!((&stats["done"], &stats["poisoned"]), (&json!(1), &json!(1)), "{stats}");
    Ok(())
}

/// A worker process, killed when dropped.
struct Worker(Child);

impl Worker {
    fn start(env: &Env, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = env
            .command(&["serve", "--wait-seconds", "1", "--concurrency", "1"])?
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

/// Polls `ember status` until `want` holds (a generous deadline: this waits for the model to
/// load and the queue's visibility timeout, not for a speed).
fn wait_for(env: &Env, what: &str, want: impl Fn(&Value) -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let status = env.status()?;
        if want(&status) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("{what}: still {status} after 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_job_killed_on_every_delivery_ends_with_an_error_result_its_owner_can_read() -> anyhow::Result<()> {
    let _g = heavy();
    let mut env = Env::sqs()?;
    env.vars.push(("EMBER_MAX_RECEIVE_COUNT", "2".into()));
    env.vars.push(("EMBER_VISIBILITY_TIMEOUT", "2".into()));
    let mut long = job("doomed", "Write a long story about a lighthouse keeper.");
    long["body"]["max_tokens"] = json!(4000);
    env.submit("doomed.jsonl", &[long], "b1")?;
    let log = env.dir.path().join("workers.log");
    for delivery in 1..=2 {
        // Visible again (the killed delivery's visibility timeout passed) before the next.
        wait_for(&env, &format!("delivery {delivery} ready"), |s| s["visible"] == 1 && s["in_flight"] == 0)?;
        let worker = Worker::start(&env, &log)?;
        wait_for(&env, &format!("delivery {delivery} in flight"), |s| s["in_flight"] == 1)?;
        drop(worker); // SIGKILL mid-job
    }
    // The second delivery was the last allowed: the redrive policy moves the job to the DLQ
    // on the next receive, with no worker left to answer it.
    let worker = Worker::start(&env, &log)?;
    wait_for(&env, "the job in the DLQ", |s| s["dlq"] == 1 && s["in_flight"] == 0 && s["visible"] == 0)?;
    drop(worker);

    let listed = String::from_utf8(env.ember(&["dlq", "list"])?.stdout)?;
    let entry: Value = serde_json::from_str(listed.trim()).with_context(|| listed.clone())?;
    assert_eq!((entry["custom_id"].as_str(), entry["answered"].as_bool()), (Some("doomed"), Some(false)), "{entry}");
    let answered: Value = serde_json::from_slice(&env.ember(&["dlq", "answer"])?.stdout)?;
    assert_eq!(answered, json!({"answered": 1, "already_answered": 0}));
    let line: ResultLine = serde_json::from_slice(
        &env.object("results/b1/_errors/doomed.json")?.context("no error result for the dead-lettered job")?,
    )?;
    assert_eq!((line.custom_id.as_str(), line.error_code()), ("doomed", Some("dead_lettered")));
    // Answering twice writes nothing new; the job stays in the DLQ for a redrive.
    let again: Value = serde_json::from_slice(&env.ember(&["dlq", "answer"])?.stdout)?;
    assert_eq!(again, json!({"answered": 0, "already_answered": 1}));
    assert_eq!(env.status()?["dlq"], 1);
    Ok(())
}

#[test]
fn a_newline_in_a_custom_id_cannot_start_a_log_line() -> anyhow::Result<()> {
    let _g = heavy();
    let env = Env::embedded()?;
    let forged = "evil\nERROR ember: forged line";
    let file = env.write_lines("batch.jsonl", &[job(forged, "Hi").to_string().into_bytes()])?;
    let out = env.command(&["run", &file, "--output", "out.jsonl", "--log-format", "text"])?.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("evil\\nERROR ember: forged line"), "the id is logged, escaped:\n{stderr}");
    let forged_lines: Vec<&str> =
        stderr.lines().filter(|l| l.trim_start().starts_with("ERROR ember: forged")).collect();
    assert!(forged_lines.is_empty(), "a job's text started a log line:\n{stderr}");
    Ok(())
}
