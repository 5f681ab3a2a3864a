//! `ember submit`, `ember run`, `ember status` and `ember dlq`: putting a batch file on the
//! queue, running it to an output file, and looking at the queues.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::backends::QueueArgs;
use super::common::AwsArgs;
use super::serve::{stats_json, Worker, WorkerArgs};
use crate::job::{default_result_key, derived_id, error_result_key, rejected_result_key, ResultLine};
use crate::queue::{OutgoingMessage, Queue, MAX_BATCH};
use crate::runner::{serve, ServeStats, Shutdown};
use crate::store::ObjectStore;

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
    /// Move every message in the dead-letter queue back to the queue, to run again.
    Redrive {
        #[command(flatten)]
        aws: AwsArgs,
        #[command(flatten)]
        queue: QueueArgs,
    },
}

/// One input line, ready to send.
struct Line {
    number: usize,
    body: Vec<u8>,
    /// Where its result goes, when the line is JSON with a `custom_id` or a `result_key`.
    result_key: Option<String>,
}

/// Reads a batch file: skips blank lines, puts each JSON object line in the batch, and refuses
/// duplicate `custom_id`s (their results would overwrite each other) before anything is sent.
/// Lines that are not valid jobs are sent as they are: the worker answers each with an error
/// result that says what is wrong, so nothing in the file is silently dropped.
fn read_lines(file: &Path, batch_id: &str) -> anyhow::Result<Vec<Line>> {
    let bytes = if file == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("reading the batch file {}", file.display()))?
    };
    let mut lines = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let number = i + 1;
        let mut body = raw.to_vec();
        let mut result_key = None;
        if let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(raw) {
            if let Some(Value::String(id)) = obj.get("custom_id") {
                if let Some(first) = seen.insert(id.clone(), number) {
                    anyhow::bail!(
                        "{}: lines {first} and {number} both have custom_id {id:?}: give every line its own custom_id",
                        file.display()
                    );
                }
            }
            let custom_id = obj.get("custom_id").and_then(Value::as_str).map(str::to_string);
            let ember = obj.entry("ember").or_insert_with(|| Value::Object(Default::default()));
            if let Value::Object(ember) = ember {
                let batch = ember.entry("batch_id").or_insert_with(|| Value::String(batch_id.to_string()));
                let batch = batch.as_str().map(str::to_string);
                // Where the worker will write this line's result (if the line is valid).
                result_key = match (ember.get("result_key").and_then(Value::as_str), custom_id) {
                    (Some(key), _) => Some(key.to_string()),
                    (None, Some(id)) => Some(default_result_key(batch.as_deref(), &id)),
                    (None, None) => None,
                };
            }
            body = serde_json::to_vec(&obj)?;
        }
        lines.push(Line { number, body, result_key });
    }
    if lines.is_empty() {
        anyhow::bail!("{} has no jobs: write one OpenAI batch input line per job", file.display());
    }
    Ok(lines)
}

fn bar(len: u64, what: &str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template(&format!("{what} {{bar:40}} {{pos}}/{{len}} [{{elapsed}}, eta {{eta}}]"))
    {
        bar.set_style(style);
    }
    bar
}

/// Sends the lines in batches of ten; answers each line's message id (in line order).
async fn send_lines(queue: &dyn Queue, lines: &[Line], hidden: bool) -> anyhow::Result<Vec<String>> {
    let progress = bar(lines.len() as u64, "submitting", hidden);
    let mut ids = Vec::with_capacity(lines.len());
    let mut failures = Vec::new();
    for chunk in lines.chunks(MAX_BATCH) {
        let batch = chunk.iter().map(|l| OutgoingMessage::new(l.body.clone())).collect();
        for (line, sent) in chunk.iter().zip(queue.send_batch(batch).await) {
            match sent {
                Ok(id) => ids.push(id.0),
                Err(e) => failures.push(format!("line {}: {e}", line.number)),
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    if !failures.is_empty() {
        anyhow::bail!(
            "{} of {} lines could not be queued ({} were):\n  {}",
            failures.len(),
            lines.len(),
            ids.len(),
            failures.join("\n  ")
        );
    }
    Ok(ids)
}

fn new_batch_id(given: &Option<String>) -> String {
    given.clone().unwrap_or_else(|| format!("batch_{}", uuid::Uuid::new_v4().simple()))
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let batch_id = new_batch_id(&args.batch_id);
    let lines = read_lines(&args.file, &batch_id)?;
    let queue = args.queue.open(&args.aws).await?;
    let ids = send_lines(queue.as_ref(), &lines, args.no_progress).await?;
    println!("{}", serde_json::json!({"batch_id": batch_id, "submitted": ids.len()}));
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
    let lines = read_lines(&args.file, &batch_id)?;
    let worker = Worker::start(&args.worker).await?;
    let hidden = args.worker.model.fetch.no_progress;
    // Results already under the batch's prefix (a reused --batch-id) do not count as progress.
    let prefix = format!("results/{batch_id}/");
    let existing: HashSet<String> = worker.store.list(&prefix).await?.into_iter().collect();
    let ids = send_lines(worker.queue.as_ref(), &lines, hidden).await?;

    // Serve until every line has a result (or the queue is drained: a job the queue gave up
    // on is reported as not finished below).
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let progress = bar(lines.len() as u64, "jobs", hidden);
    let watcher = {
        let (store, shutdown, progress, prefix, n) =
            (worker.store.clone(), shutdown.clone(), progress.clone(), prefix.clone(), lines.len());
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
    serve(worker.queue.clone(), worker.handler.clone(), &opts, &shutdown, stats.clone()).await?;
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
        "{ok} succeeded, {failed} failed{} ; output: {}",
        if missing > 0 { format!(", {missing} not finished (see `ember status`)") } else { String::new() },
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
    ids: &[String],
) -> anyhow::Result<Vec<Collected>> {
    let mut keys: Vec<String> = store.list(prefix).await?;
    let known: HashSet<String> = keys.iter().cloned().collect();
    let own_keys = lines.iter().filter_map(|l| l.result_key.as_deref());
    keys.extend(own_keys.flat_map(|k| [k.to_string(), error_result_key(k)]).filter(|k| !known.contains(k)));
    let mut by_id: HashMap<String, ResultLine> = HashMap::new();
    for key in keys {
        if let Some(line) = read_result(store, &key).await? {
            by_id.insert(line.id.clone(), line);
        }
    }
    let mut out = Vec::with_capacity(lines.len());
    for (line, message_id) in lines.iter().zip(ids) {
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
                let custom_id = serde_json::from_slice::<Value>(&line.body)
                    .ok()
                    .and_then(|v| v.get("custom_id").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| message_id.clone());
                Collected::Missing(ResultLine::not_run(
                    message_id,
                    &custom_id,
                    "not_finished",
                    "the job has no result: it is still queued or in the dead-letter queue (see `ember status`)",
                ))
            }
        });
    }
    Ok(out)
}

async fn read_result(store: &dyn ObjectStore, key: &str) -> anyhow::Result<Option<ResultLine>> {
    let Some(bytes) = store.get(key).await? else { return Ok(None) };
    match serde_json::from_slice::<ResultLine>(&bytes) {
        Ok(line) => Ok(Some(line)),
        Err(e) => {
            tracing::warn!(key, error = %e, "not a result line; skipped");
            Ok(None)
        }
    }
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let queue = args.queue.open(&args.aws).await?;
    let d = queue.depth().await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"visible": d.visible, "in_flight": d.in_flight, "delayed": d.delayed, "dlq": d.dlq_visible})
        );
    } else {
        println!(
            "visible    {}\nin flight  {}\ndelayed    {}\ndlq        {}",
            d.visible, d.in_flight, d.delayed, d.dlq_visible
        );
    }
    Ok(())
}

pub async fn dlq(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::Redrive { aws, queue } => {
            let moved = queue.open(&aws).await?.redrive().await?;
            println!("{}", serde_json::json!({"redriven": moved}));
            Ok(())
        }
    }
}
