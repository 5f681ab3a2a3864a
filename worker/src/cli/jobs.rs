//! `ember submit`, `ember run`, `ember status` and `ember dlq`: putting a batch file on the
//! queue, running it to an output file, and looking at the queues.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::backends::{QueueArgs, StoreArgs};
use super::common::AwsArgs;
use super::serve::{stats_json, Worker, WorkerArgs};
use crate::job::key::component_problem;
use crate::job::{
    default_result_key, derived_id, error_result_key, rejected_result_key, JobError, RejectedJob, ResultLine,
    MAX_JOB_BODY_BYTES,
};
use crate::queue::{DeadLetter, OutgoingMessage, Queue, MAX_BATCH, MAX_BODY_BYTES};
use crate::runner::{serve, ServeStats, Shutdown};
use crate::store::{validate_key, ObjectStore, StoreError};
use crate::telemetry::otel;

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// A JSONL file of OpenAI batch input lines, or `-` for stdin.
    #[arg(env = "EMBER_INPUT")]
    pub file: PathBuf,
    /// Put every job in this batch: results go to results/BATCH_ID/ (default: a new id).
    #[arg(long, env = "EMBER_BATCH_ID")]
    pub batch_id: Option<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// Where the batch's results will go: the submission is recorded there, for `ember batch
    /// status|output`.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Hide the progress bar.
    #[arg(long, env = "EMBER_NO_PROGRESS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_progress: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A JSONL file of OpenAI batch input lines, or `-` for stdin.
    #[arg(env = "EMBER_INPUT")]
    pub file: PathBuf,
    /// The output JSONL, one OpenAI batch output line per input line, in input order
    /// (default: the input's name with `.output.jsonl`; `-` for stdout).
    #[arg(long, short, env = "EMBER_OUTPUT")]
    pub output: Option<PathBuf>,
    /// Batch id (default: a new one): results go to results/BATCH_ID/ in the result store.
    #[arg(long, env = "EMBER_BATCH_ID")]
    pub batch_id: Option<String>,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// Print one JSON object instead of a table.
    #[arg(long, env = "EMBER_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Move every message in the dead-letter queue back to the queue, to run again. With
    /// --pipelines, the pipeline queue's: each failed execution there runs again from the
    /// state that failed (as `ember pipeline redrive`) once a worker (`ember serve
    /// --pipelines`) takes it.
    Redrive {
        #[command(flatten)]
        aws: AwsArgs,
        #[command(flatten)]
        queue: QueueArgs,
        /// Redrive the pipeline queue's dead letters (the queue named by --pipeline-sqs-queue
        /// or --pipeline-queue-path) instead of the jobs queue's.
        #[arg(long, env = "EMBER_DLQ_PIPELINES", value_parser = clap::builder::BoolishValueParser::new())]
        pipelines: bool,
        #[command(flatten)]
        pipeline_queue: super::pipeline::PipelineQueueArgs,
    },
    /// List the jobs in the dead-letter queue, one JSON object a line: message id, custom_id,
    /// batch, why it is there, and whether its owner has an answer (a result or error result).
    List(DeadLetterArgs),
    /// Write an error result for every dead-lettered job that has no answer: a job whose
    /// worker was killed (or timed out) on every allowed delivery reaches the DLQ through the
    /// queue's redrive policy with nobody left to answer it. The jobs stay in the DLQ, so
    /// `ember dlq redrive` can still run them (their result then goes beside the error result).
    Answer(DeadLetterArgs),
}

/// Where `ember dlq list` and `answer` find the dead letters and their jobs' answers.
#[derive(Debug, clap::Args)]
pub struct DeadLetterArgs {
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// The most dead letters `list` and `answer` look at in one run.
const MAX_DEAD_LETTERS: usize = 100_000;

/// One dead-lettered job as `ember dlq list` shows it.
struct DeadJob {
    letter: DeadLetter,
    custom_id: Option<String>,
    batch_id: String,
    /// Where its result and error result go, when its ids make usable keys.
    result_key: Option<String>,
}

impl DeadJob {
    fn new(letter: DeadLetter) -> Self {
        let line = serde_json::from_slice::<Value>(&letter.body).ok();
        let custom_id = line.as_ref().and_then(|l| l.get("custom_id")).and_then(Value::as_str).map(str::to_string);
        let batch_id = line
            .as_ref()
            .and_then(|l| l.get("ember"))
            .and_then(|e| e.get("batch_id"))
            .and_then(Value::as_str)
            .unwrap_or(crate::job::DEFAULT_BATCH)
            .to_string();
        let result_key = custom_id
            .as_deref()
            .filter(|id| !id.is_empty() && component_problem(id).is_none() && component_problem(&batch_id).is_none())
            .map(|id| default_result_key(Some(&batch_id), id))
            .filter(|k| validate_key(k).is_ok());
        Self { letter, custom_id, batch_id, result_key }
    }

    /// Whether the job's owner can read an answer: its result, or its error result.
    async fn answered(&self, store: &dyn ObjectStore) -> anyhow::Result<bool> {
        match &self.result_key {
            Some(key) => Ok(store.get(key).await?.is_some() || store.get(&error_result_key(key)).await?.is_some()),
            // A line without a usable custom_id is refused by validation on its first delivery,
            // which answers it before it is sent to the DLQ with a reason.
            None => Ok(self.letter.reason.is_some()),
        }
    }
}

async fn dead_jobs(aws: &AwsArgs, queue: &QueueArgs) -> anyhow::Result<Vec<DeadJob>> {
    let queue = queue.open_existing(aws).await?;
    Ok(queue.dead_letters(MAX_DEAD_LETTERS).await?.into_iter().map(DeadJob::new).collect())
}

/// One input line, ready to send, or already answered.
struct Line {
    number: usize,
    body: Vec<u8>,
    /// Where its result goes, when the line is JSON with a usable `custom_id`.
    result_key: Option<String>,
    /// The line's answer when it cannot be queued at all (`ember run` only): a duplicate
    /// `custom_id` in the file, a line larger than a queue message, or one whose result this
    /// batch already has.
    answer: Option<ResultLine>,
}

/// What to do with a line that cannot be queued.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BadLines {
    /// Refuse the file before anything is sent (`ember submit`).
    Refuse,
    /// Answer the line with an error line in the output (`ember run`).
    Answer,
}

/// Reads a batch file: skips blank lines and puts each JSON object line in the batch. Lines
/// that are not valid jobs are sent as they are: the worker answers each with an error result
/// that says what is wrong, so nothing in the file is silently dropped. A duplicate
/// `custom_id` (the first line keeps it) and a line larger than a queue message never reach
/// the queue: `bad` says whether they refuse the file or get their error line here.
fn read_lines(file: &Path, batch_id: &str, bad: BadLines) -> anyhow::Result<Vec<Line>> {
    let bytes = if file == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("reading the batch file {}", file.display()))?
    };
    let mut lines = Vec::new();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let number = i + 1;
        // An id for the line's own answer, stable for this batch and line.
        let local_id = format!("{batch_id}-line-{number}");
        // Lines a worker refuses by size but a queue carries are sent, to be answered by the
        // worker like any invalid job; only what the queue cannot carry is stopped here.
        if raw.len() > MAX_BODY_BYTES {
            let error = JobError::BodyTooLarge { bytes: raw.len(), limit: MAX_JOB_BODY_BYTES };
            if bad == BadLines::Refuse {
                anyhow::bail!("{}: line {number}: {error}; nothing was sent", file.display());
            }
            let rejected = local_rejection(&local_id, raw, error);
            lines.push(Line { number, body: Vec::new(), result_key: None, answer: Some(rejected) });
            continue;
        }
        let mut body = raw.to_vec();
        let mut result_key = None;
        let mut answer = None;
        if let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(raw) {
            let custom_id = obj.get("custom_id").and_then(Value::as_str).map(str::to_string);
            let ember = obj.entry("ember").or_insert_with(|| Value::Object(Default::default()));
            let mut batch = None;
            if let Value::Object(ember) = ember {
                let b = ember.entry("batch_id").or_insert_with(|| Value::String(batch_id.to_string()));
                batch = b.as_str().map(str::to_string);
            }
            if let (Some(id), Some(b)) = (&custom_id, &batch) {
                if let Some(first) = seen.insert((b.clone(), id.clone()), number) {
                    if bad == BadLines::Refuse {
                        anyhow::bail!(
                            "{}: lines {first} and {number} both have custom_id {id:?}: give every line its own custom_id; nothing was sent",
                            file.display()
                        );
                    }
                    let error = JobError::DuplicateCustomId { custom_id: id.clone(), batch: b.clone() };
                    answer = Some(local_rejection(&local_id, raw, error));
                }
                // Where the worker will write this line's result, if the id makes a usable key
                // (the worker refuses it otherwise, and its error result is found by id).
                let key = default_result_key(Some(b), id);
                if component_problem(id).is_none() && component_problem(b).is_none() && validate_key(&key).is_ok() {
                    result_key = Some(key);
                }
            }
            body = serde_json::to_vec(&obj)?;
        }
        lines.push(Line { number, body, result_key, answer });
    }
    if lines.is_empty() {
        anyhow::bail!("{} has no jobs: write one OpenAI batch input line per job", file.display());
    }
    Ok(lines)
}

/// The `custom_id` of a line, when it is a JSON object with a string one.
fn custom_id_of(raw: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(raw).ok()?.get("custom_id")?.as_str().map(str::to_string)
}

/// The error line of a line answered without going to the queue.
fn local_rejection(local_id: &str, raw: &[u8], error: JobError) -> ResultLine {
    let custom_id = custom_id_of(raw).unwrap_or_else(|| local_id.to_string());
    ResultLine::rejected(&RejectedJob {
        message_id: local_id.to_string(),
        custom_id,
        batch_id: None,
        result_key: String::new(),
        error,
    })
}

fn bar(len: u64, what: &str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ember_model_loader::progress::add(ProgressBar::new(len));
    if let Ok(style) =
        ProgressStyle::with_template(&format!("{what} {{bar:40}} {{pos}}/{{len}} [{{elapsed}}, eta {{eta}}]"))
    {
        bar.set_style(style);
    }
    bar
}

/// Sends the lines that have no answer yet, in batches of ten; answers each line's message
/// id (in line order; `None` for a line not sent). With `bad` = `Answer`, a line the queue
/// refuses gets its error line and the rest go on; with `Refuse`, any refusal is an error
/// that says which lines were sent.
async fn send_lines(
    queue: &dyn Queue,
    lines: &mut [Line],
    hidden: bool,
    bad: BadLines,
) -> anyhow::Result<Vec<Option<String>>> {
    let progress = bar(lines.len() as u64, "submitting", hidden);
    let mut ids = vec![None; lines.len()];
    let mut failures = Vec::new();
    let todo: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].answer.is_none()).collect();
    for chunk in todo.chunks(MAX_BATCH) {
        // One trace per job, started here or continued from the line's own `traceparent`.
        let spans: Vec<tracing::Span> = chunk.iter().map(|&i| submit_span(&lines[i], queue.system())).collect();
        let batch = chunk
            .iter()
            .zip(&spans)
            .map(|(&i, span)| {
                let traceparent = otel::traceparent_of(span).or_else(|| traceparent_in(&lines[i].body));
                OutgoingMessage::new(lines[i].body.clone()).with_traceparent(traceparent)
            })
            .collect();
        for ((&i, sent), span) in chunk.iter().zip(queue.send_batch(batch).await).zip(&spans) {
            match sent {
                Ok(id) => {
                    span.record("messaging.message.id", id.as_str());
                    ids[i] = Some(id.0)
                }
                Err(e) => {
                    span.record("otel.status_code", "error");
                    span.record("error.type", e.label());
                    failures.push(format!("line {}: {e}", lines[i].number));
                    let local_id = format!("line-{}-not-queued", lines[i].number);
                    let custom_id = custom_id_of(&lines[i].body).unwrap_or_else(|| local_id.clone());
                    let message = format!("the line could not be put on the queue: {e}");
                    lines[i].answer = Some(ResultLine::not_run(&local_id, &custom_id, "not_queued", &message));
                }
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    if !failures.is_empty() && bad == BadLines::Refuse {
        anyhow::bail!(
            "{} of {} lines could not be queued ({} were):\n  {}",
            failures.len(),
            lines.len(),
            ids.iter().flatten().count(),
            failures.join("\n  ")
        );
    }
    for f in &failures {
        tracing::warn!(failure = %f, "line not queued; answered with an error line");
    }
    Ok(ids)
}

/// The span of one line's submission: the root of its job's trace, or a child of the
/// `traceparent` in the line's `ember` metadata.
fn submit_span(line: &Line, system: &'static str) -> tracing::Span {
    let span = tracing::info_span!(
        target: otel::TARGET,
        "submit",
        otel.kind = "producer",
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.message.id = tracing::field::Empty,
        ember.line = line.number,
        ember.custom_id = custom_id_of(&line.body).unwrap_or_default(),
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    otel::continue_from(&span, traceparent_in(&line.body).as_deref());
    span
}

/// The `ember.traceparent` of a line, when it has one.
fn traceparent_in(raw: &[u8]) -> Option<String> {
    let line: Value = serde_json::from_slice(raw).ok()?;
    line.get("ember")?.get(otel::TRACEPARENT)?.as_str().map(str::to_string)
}

fn new_batch_id(given: &Option<String>) -> String {
    given.clone().unwrap_or_else(|| format!("batch_{}", uuid::Uuid::new_v4().simple()))
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let batch_id = new_batch_id(&args.batch_id);
    if let Some(problem) = component_problem(&batch_id) {
        anyhow::bail!("--batch-id {batch_id:?} {problem}: results are stored under it; choose another");
    }
    let mut lines = read_lines(&args.file, &batch_id, BadLines::Refuse)?;
    let (queue, store) = tokio::try_join!(args.queue.open_to_send(&args.aws), args.store.open(&args.aws))?;
    let ids = send_lines(queue.as_ref(), &mut lines, args.no_progress, BadLines::Refuse).await?;
    let submission = super::batch::Submission {
        batch_id: batch_id.clone(),
        created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        lines: lines
            .iter()
            .zip(&ids)
            .filter_map(|(line, id)| {
                Some(super::batch::SubmittedLine {
                    line: line.number,
                    custom_id: custom_id_of(&line.body),
                    message_id: id.clone()?,
                    result_key: line.result_key.clone(),
                })
            })
            .collect(),
    };
    // The jobs are queued whatever happens here: say so rather than fail the submit.
    if let Err(e) = super::batch::record(store.as_ref(), &submission).await {
        tracing::warn!(error = %format!("{e:#}"), "the submission was not recorded: `ember batch status` will not know it");
    }
    println!("{}", serde_json::json!({"batch_id": batch_id, "submitted": ids.iter().flatten().count()}));
    Ok(())
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut opts = args.worker.looping.options(&args.worker.queue, true)?;
    // Short polls: `run` stops as soon as the batch is done, and a shutdown lets the poll in
    // progress end first.
    opts.wait = opts.wait.min(Duration::from_secs(2));
    let output = match &args.output {
        Some(p) => p.clone(),
        None if args.file == Path::new("-") => PathBuf::from("-"),
        None => args.file.with_extension("output.jsonl"),
    };
    let batch_id = new_batch_id(&args.batch_id);
    let mut lines = read_lines(&args.file, &batch_id, BadLines::Answer)?;
    // `run` works a queue of its own, so it runs only its own batch: a shared queue (SQS or
    // the embedded file) may hold other batches' jobs, which are left to the workers serving
    // it. Releasing them after receiving would not leave them untouched: every receive counts
    // toward their maxReceiveCount, and so toward the DLQ.
    if let Some(name) = &args.worker.queue.sqs_queue {
        tracing::warn!(queue = %name, "`ember run` works a private local queue; the SQS queue is not used (`ember submit` puts a batch on it)");
    }
    let private = tempfile::Builder::new().prefix("ember-run-").tempdir().context("creating the run's queue folder")?;
    let mut worker_args = args.worker.clone();
    worker_args.queue.sqs_queue = None;
    worker_args.queue.queue_path = private.path().join("queue.db");
    let worker = Worker::start(&worker_args, false).await?;
    let hidden = args.worker.model.fetch.no_progress;
    // Results already under the batch's prefix (a reused --batch-id) do not count as progress.
    let prefix = format!("results/{batch_id}/");
    let existing: HashSet<String> = worker.store.list(&prefix).await?.into_iter().collect();
    // A line whose custom_id already has its result in this batch (a rerun, or a run that was
    // interrupted) is answered by that result, not run again: results are written once per key.
    for line in lines.iter_mut().filter(|l| l.answer.is_none()) {
        if let Some(key) = line.result_key.as_deref().filter(|k| existing.contains(*k)) {
            line.answer = read_result(worker.store.as_ref(), key).await?;
        }
    }
    let ids = send_lines(worker.queue.as_ref(), &mut lines, hidden, BadLines::Answer).await?;
    let queued = ids.iter().flatten().count();

    // Serve until every line has a result (or the queue is drained: a job the queue gave up
    // on is reported as not finished below).
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let progress = bar(lines.len() as u64, "jobs", hidden);
    let watcher = {
        let (store, shutdown, progress, prefix, n) =
            (worker.store.clone(), shutdown.clone(), progress.clone(), prefix.clone(), queued);
        tokio::spawn(async move {
            loop {
                if let Ok(keys) = store.list(&prefix).await {
                    let new = keys.iter().filter(|k| !existing.contains(*k)).count();
                    progress.set_position(new as u64);
                    if new >= n {
                        shutdown.trigger();
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let stats = Arc::new(ServeStats::default());
    let (started, tokens_before) = (std::time::Instant::now(), crate::telemetry::metrics::tokens_generated());
    serve(worker.queue.clone(), worker.handler.clone(), &opts, &shutdown, stats.clone()).await?;
    let (seconds, tokens) =
        (started.elapsed().as_secs_f64(), crate::telemetry::metrics::tokens_generated() - tokens_before);
    watcher.abort();
    progress.finish_and_clear();
    tracing::info!(stats = %stats_json(&stats), "batch served");

    let results = collect(worker.store.as_ref(), &prefix, &lines, &ids).await?;
    let (mut ok, mut failed, mut missing) = (0, 0, 0);
    let mut out = String::new();
    for line in &results {
        match line {
            Collected::Found(r) if r.is_success() => ok += 1,
            Collected::Found(_) => failed += 1,
            Collected::Missing(_) => missing += 1,
        }
        let line = match line {
            Collected::Found(r) | Collected::Missing(r) => r,
        };
        out.push_str(&line.to_json()?);
        out.push('\n');
    }
    if output == Path::new("-") {
        print!("{out}");
    } else {
        std::fs::write(&output, out).with_context(|| format!("writing {}", output.display()))?;
    }
    eprintln!(
        "{ok} succeeded, {failed} failed{}; {tokens} tokens generated in {seconds:.1} s ({:.1} tokens/s); output: {}",
        if missing > 0 {
            format!(", {missing} not finished (run the file again with --batch-id {batch_id} to retry them)")
        } else {
            String::new()
        },
        tokens as f64 / seconds.max(1e-9),
        output.display()
    );
    if missing > 0 {
        anyhow::bail!("{missing} jobs did not finish");
    }
    Ok(())
}

enum Collected {
    Found(ResultLine),
    Missing(ResultLine),
}

/// The result of each line, in line order, matched by the id every result derives from its
/// queue message id.
async fn collect(
    store: &dyn ObjectStore,
    prefix: &str,
    lines: &[Line],
    ids: &[Option<String>],
) -> anyhow::Result<Vec<Collected>> {
    let mut keys: Vec<String> = store.list(prefix).await?;
    let known: HashSet<String> = keys.iter().cloned().collect();
    let own_keys = lines.iter().filter(|l| l.answer.is_none()).filter_map(|l| l.result_key.as_deref());
    keys.extend(own_keys.flat_map(|k| [k.to_string(), error_result_key(k)]).filter(|k| !known.contains(k)));
    let mut by_id: HashMap<String, ResultLine> = HashMap::new();
    for key in keys {
        if let Some(line) = read_result(store, &key).await? {
            by_id.insert(line.id.clone(), line);
        }
    }
    let mut out = Vec::with_capacity(lines.len());
    for (line, message_id) in lines.iter().zip(ids) {
        let message_id = match (&line.answer, message_id) {
            (Some(answer), _) => {
                out.push(Collected::Found(answer.clone()));
                continue;
            }
            (None, Some(id)) => id,
            (None, None) => {
                out.push(Collected::Missing(ResultLine::not_run(
                    &format!("line-{}", line.number),
                    "",
                    "not_queued",
                    "the line was not queued",
                )));
                continue;
            }
        };
        let id = format!("batch_req_{}", derived_id(message_id));
        let mut found = by_id.remove(&id);
        if found.is_none() {
            // A line the worker could not read at all (not JSON, too large, not UTF-8) cannot
            // name its batch: its error result is under the default batch's _rejected/ folder.
            found = read_result(store, &rejected_result_key(None, message_id)).await?.filter(|r| r.id == id);
        }
        if let (None, Some(key)) = (&found, &line.result_key) {
            // A job whose custom_id already had a result in this batch (a reused batch id) is
            // answered by that result: results are written once per key.
            found = match read_result(store, key).await? {
                Some(r) => Some(r),
                None => read_result(store, &error_result_key(key)).await?,
            };
        }
        out.push(match found {
            Some(r) => Collected::Found(r),
            None => {
                let custom_id = custom_id_of(&line.body).unwrap_or_else(|| message_id.clone());
                Collected::Missing(ResultLine::not_run(
                    message_id,
                    &custom_id,
                    "not_finished",
                    "the job has no result: it failed on every delivery; run the file again with the same --batch-id to retry it",
                ))
            }
        });
    }
    Ok(out)
}

pub(super) async fn read_result(store: &dyn ObjectStore, key: &str) -> anyhow::Result<Option<ResultLine>> {
    let bytes = match store.get(key).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        // A key no job can have (the worker refused the line and answered it elsewhere).
        Err(StoreError::InvalidKey { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match serde_json::from_slice::<ResultLine>(&bytes) {
        Ok(line) => Ok(Some(line)),
        Err(e) => {
            tracing::warn!(key, error = %e, "not a result line; skipped");
            Ok(None)
        }
    }
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let queue = args.queue.open_existing(&args.aws).await?;
    let d = queue.depth().await?;
    let dlq = queue.has_dlq().then_some(d.dlq_visible);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"visible": d.visible, "in_flight": d.in_flight, "delayed": d.delayed, "dlq": dlq})
        );
    } else {
        let dlq = dlq.map_or_else(|| "none (no DLQ)".to_string(), |n| n.to_string());
        println!("visible    {}\nin flight  {}\ndelayed    {}\ndlq        {dlq}", d.visible, d.in_flight, d.delayed);
    }
    if !queue.has_dlq() {
        eprintln!(
            "warning: the queue has no redrive policy, so no dead-letter queue: a job that fails on every delivery \
             is retried until it expires, and `ember serve` refuses it; give it one (infra/ember.yaml, or \
             --create-queues for development)"
        );
    }
    Ok(())
}

pub async fn dlq(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::Redrive { aws, queue, pipelines, pipeline_queue } => {
            let queue = if pipelines {
                QueueArgs {
                    sqs_queue: pipeline_queue.pipeline_sqs_queue,
                    queue_path: pipeline_queue.pipeline_queue_path,
                    ..queue
                }
            } else {
                queue
            };
            let moved = queue.open_existing(&aws).await?.redrive().await?;
            println!("{}", serde_json::json!({"redriven": moved}));
            Ok(())
        }
        DlqCommand::List(DeadLetterArgs { aws, queue, store }) => {
            let store = store.open(&aws).await?;
            for job in dead_jobs(&aws, &queue).await? {
                let answered = job.answered(store.as_ref()).await?;
                println!(
                    "{}",
                    serde_json::json!({
                        "message_id": job.letter.id.as_str(),
                        "custom_id": job.custom_id,
                        "batch_id": job.batch_id,
                        "reason": job.letter.reason.as_deref().unwrap_or(NO_REASON),
                        "answered": answered,
                    })
                );
            }
            Ok(())
        }
        DlqCommand::Answer(DeadLetterArgs { aws, queue, store }) => {
            let store = store.open(&aws).await?;
            let (mut answered, mut already) = (0, 0);
            for job in dead_jobs(&aws, &queue).await? {
                let Some(key) = &job.result_key else { continue };
                if job.answered(store.as_ref()).await? {
                    already += 1;
                    continue;
                }
                let custom_id = job.custom_id.as_deref().unwrap_or_default();
                let line = ResultLine::not_run(job.letter.id.as_str(), custom_id, "dead_lettered", NO_REASON_ANSWER);
                let mut bytes = line.to_json()?.into_bytes();
                bytes.push(b'\n');
                store.put_if_absent(&error_result_key(key), bytes).await?;
                answered += 1;
            }
            println!("{}", serde_json::json!({"answered": answered, "already_answered": already}));
            Ok(())
        }
    }
}

/// The reason shown for a job the queue's redrive policy moved.
const NO_REASON: &str =
    "received maxReceiveCount times without finishing (the worker was killed or timed out on every delivery)";

/// The error message of a dead-lettered job answered by `ember dlq answer`.
const NO_REASON_ANSWER: &str = "the job reached the dead-letter queue without an answer: every allowed delivery ended without a result (the worker was killed, ran out of memory, or the job outran the visibility timeout); find the cause in the worker logs, raise the queue's maxReceiveCount if workers are often replaced, then `ember dlq redrive`";
