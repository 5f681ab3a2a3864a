//! `ember batch status ID` and `ember batch output ID`: the OpenAI Batch API's "retrieve a
//! batch" and "download its output file", for a batch put on the queue with `ember submit`.
//!
//! `submit` records each submission under `batches/{batch_id}/` in the result store: the
//! lines it queued, in order, with the message id and result key of each. A batch's state is
//! then read from the store alone (no queue needed): a line is done when its result or error
//! result exists.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::backends::StoreArgs;
use super::common::AwsArgs;
use super::jobs::read_result;
use crate::job::{error_result_key, rejected_result_key, ResultLine};
use crate::store::{validate_key, ObjectStore, PutOutcome};

#[derive(Debug, clap::Subcommand)]
pub enum BatchCommand {
    /// How far a submitted batch has got: total, completed, failed and pending jobs.
    Status(BatchStatusArgs),
    /// Write a finished batch's output: one OpenAI batch output line per submitted line, in
    /// submission order (failed jobs carry their error).
    Output(BatchOutputArgs),
}

#[derive(Debug, clap::Args)]
pub struct BatchStatusArgs {
    /// The batch id `ember submit` printed (or was given with --batch-id).
    #[arg(env = "EMBER_BATCH_ID")]
    pub batch_id: String,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print one JSON object (shaped like the OpenAI Batch API's batch object).
    #[arg(long, env = "EMBER_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct BatchOutputArgs {
    /// The batch id `ember submit` printed (or was given with --batch-id).
    #[arg(env = "EMBER_BATCH_ID")]
    pub batch_id: String,
    /// Where to write the output JSONL (`-`, the default, for stdout).
    #[arg(long, short, env = "EMBER_OUTPUT", default_value = "-")]
    pub output: PathBuf,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// One `ember submit` of a batch, as recorded in the store.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Submission {
    pub batch_id: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub lines: Vec<SubmittedLine>,
}

/// A queued line: where its answer will be.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SubmittedLine {
    /// Its line number in the input file.
    pub line: usize,
    pub custom_id: Option<String>,
    pub message_id: String,
    /// Its result key, when its ids make a usable one (otherwise the worker answers it under
    /// `_rejected/`, by message id).
    pub result_key: Option<String>,
}

/// Where a submission's record goes: create-only, one object per submission, so that two
/// submits to the same batch id both count.
fn record_key(batch_id: &str) -> String {
    format!("batches/{batch_id}/{}.json", uuid::Uuid::new_v4().simple())
}

/// Records a submission (after its lines were queued).
pub(super) async fn record(store: &dyn ObjectStore, submission: &Submission) -> anyhow::Result<()> {
    let key = record_key(&submission.batch_id);
    match store.put_if_absent(&key, serde_json::to_vec(submission)?).await? {
        PutOutcome::Created => Ok(()),
        PutOutcome::AlreadyExists => anyhow::bail!("the submission record {key} already exists"),
    }
}

/// What became of one submitted line.
enum State {
    Completed(String),
    Failed(String),
    Pending,
}

struct Batch {
    created_at: u64,
    lines: Vec<(SubmittedLine, State)>,
}

impl Batch {
    async fn load(store: &dyn ObjectStore, batch_id: &str) -> anyhow::Result<Self> {
        validate_key(&format!("batches/{batch_id}/x")).map_err(|e| anyhow::anyhow!("batch id {batch_id:?}: {e}"))?;
        let mut submissions = Vec::new();
        for key in store.list(&format!("batches/{batch_id}/")).await? {
            let Some(bytes) = store.get(&key).await? else { continue };
            let s: Submission = serde_json::from_slice(&bytes).with_context(|| format!("reading {key}"))?;
            submissions.push(s);
        }
        if submissions.is_empty() {
            anyhow::bail!(
                "no batch {batch_id:?} in this result store: check the id `ember submit` printed, and that \
                 --results (EMBER_RESULTS) is the one the batch was submitted with"
            );
        }
        submissions.sort_by_key(|s| s.created_at);
        let created_at = submissions[0].created_at;
        let done: HashSet<String> = store.list(&format!("results/{batch_id}/")).await?.into_iter().collect();
        let mut lines = Vec::new();
        for line in submissions.into_iter().flat_map(|s| s.lines) {
            let state = state_of(store, &done, batch_id, &line).await?;
            lines.push((line, state));
        }
        Ok(Self { created_at, lines })
    }

    fn counts(&self) -> (usize, usize, usize) {
        let completed = self.lines.iter().filter(|(_, s)| matches!(s, State::Completed(_))).count();
        let failed = self.lines.iter().filter(|(_, s)| matches!(s, State::Failed(_))).count();
        (completed, failed, self.lines.len() - completed - failed)
    }
}

async fn state_of(
    store: &dyn ObjectStore,
    done: &HashSet<String>,
    batch_id: &str,
    line: &SubmittedLine,
) -> anyhow::Result<State> {
    if let Some(key) = &line.result_key {
        if done.contains(key) {
            return Ok(State::Completed(key.clone()));
        }
        let error = error_result_key(key);
        if done.contains(&error) {
            return Ok(State::Failed(error));
        }
    }
    // Refused by the worker before it had a usable key: under `_rejected/` by message id, in
    // the batch's folder or (when the line named no usable batch) the default one.
    let rejected = rejected_result_key(Some(batch_id), &line.message_id);
    if done.contains(&rejected) {
        return Ok(State::Failed(rejected));
    }
    let rejected = rejected_result_key(None, &line.message_id);
    if store.get(&rejected).await.ok().flatten().is_some() {
        return Ok(State::Failed(rejected));
    }
    Ok(State::Pending)
}

pub async fn run(cmd: BatchCommand) -> anyhow::Result<()> {
    match cmd {
        BatchCommand::Status(args) => status(args).await,
        BatchCommand::Output(args) => output(args).await,
    }
}

async fn status(args: BatchStatusArgs) -> anyhow::Result<()> {
    let store = args.store.open(&args.aws).await?;
    let batch = Batch::load(store.as_ref(), &args.batch_id).await?;
    let (completed, failed, pending) = batch.counts();
    let state = if pending == 0 { "completed" } else { "in_progress" };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "id": args.batch_id,
                "object": "batch",
                "status": state,
                "created_at": batch.created_at,
                "request_counts": {"total": batch.lines.len(), "completed": completed, "failed": failed},
            })
        );
    } else {
        println!(
            "batch      {}\nstatus     {state}\ntotal      {}\ncompleted  {completed}\nfailed     {failed}\npending    {pending}",
            args.batch_id,
            batch.lines.len()
        );
    }
    Ok(())
}

async fn output(args: BatchOutputArgs) -> anyhow::Result<()> {
    let store = args.store.open(&args.aws).await?;
    let batch = Batch::load(store.as_ref(), &args.batch_id).await?;
    let (_, _, pending) = batch.counts();
    if pending > 0 {
        anyhow::bail!(
            "batch {} is in progress: {pending} of {} jobs have no result yet; wait for it (`ember batch status {}`)",
            args.batch_id,
            batch.lines.len(),
            args.batch_id
        );
    }
    let mut out = String::new();
    for (line, state) in &batch.lines {
        let key = match state {
            State::Completed(key) | State::Failed(key) => key,
            State::Pending => continue,
        };
        let result: ResultLine = read_result(store.as_ref(), key)
            .await?
            .with_context(|| format!("line {}: its result {key} is not readable", line.line))?;
        out.push_str(&result.to_json()?);
        out.push('\n');
    }
    if args.output == std::path::Path::new("-") {
        print!("{out}");
    } else {
        std::fs::write(&args.output, out).with_context(|| format!("writing {}", args.output.display()))?;
    }
    Ok(())
}
