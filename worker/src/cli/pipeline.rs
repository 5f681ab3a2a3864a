//! `ember pipeline`: Step-Functions-style pipelines (Amazon States Language, JSONPath) run as
//! hops over Ember's own queue. `ember serve --pipelines` works the hops.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_orchestrator::asl::{validate, Severity};
use ember_orchestrator::pipeline::{describe, history, start_execution, Env, Options, StartOptions, TaskRunner, Tools};

use super::backends::{QueueArgs, StoreArgs};
use super::common::AwsArgs;
use crate::pipeline::{tools, HopHandler, StoreAdapter};
use crate::queue::Queue;

/// Where pipeline hops are queued: a queue of their own, beside the jobs queue.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineQueueArgs {
    /// SQS queue for pipeline hops (its dead letters go to NAME-dlq); the embedded queue at
    /// --pipeline-queue-path when unset.
    #[arg(long, env = "EMBER_PIPELINE_SQS_QUEUE")]
    pub pipeline_sqs_queue: Option<String>,
    /// The embedded pipeline queue's SQLite file (when no SQS queue is given).
    #[arg(long, env = "EMBER_PIPELINE_QUEUE_PATH", default_value = ".ember/pipeline-queue.db")]
    pub pipeline_queue_path: PathBuf,
}

impl PipelineQueueArgs {
    /// Opens the pipeline queue with the jobs queue's settings (creation, visibility, receives).
    pub async fn open(&self, base: &QueueArgs, aws: &AwsArgs) -> anyhow::Result<Arc<dyn Queue>> {
        let args = QueueArgs {
            sqs_queue: self.pipeline_sqs_queue.clone(),
            queue_path: self.pipeline_queue_path.clone(),
            ..base.clone()
        };
        args.open(aws).await
    }
}

/// What Task states may use besides `ember:generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct ToolArgs {
    /// Hosts `ember:tool:http_get` may reach (comma-separated); the tool is not offered when
    /// empty.
    #[arg(long, env = "EMBER_HTTP_ALLOW", value_delimiter = ',')]
    pub http_allow: Vec<String>,
    /// Hops one execution path may take before it fails with States.Runtime (stops runaway
    /// agent loops).
    #[arg(long, env = "EMBER_MAX_HOPS", default_value_t = ember_orchestrator::pipeline::DEFAULT_MAX_HOPS)]
    pub max_hops: u64,
}

#[derive(Debug, clap::Subcommand)]
pub enum PipelineCommand {
    /// Check a definition: every problem with its JSON location; warnings too.
    Validate {
        /// The ASL definition (JSON).
        file: PathBuf,
        #[command(flatten)]
        tools: ToolArgs,
    },
    /// Start an execution (idempotent by --name, like StartExecution). Prints its id.
    Start(StartArgs),
    /// An execution's status, and its output or error.
    Describe(ReadArgs),
    /// An execution's events, Step Functions style, one JSON object per line.
    History(ReadArgs),
    /// Run a failed execution again from the state that failed (like RedriveExecution): the
    /// states that succeeded are not run again; `ember serve --pipelines` works the hops.
    Redrive(RedriveArgs),
    /// Rewrite a definition's Ember tasks into Lambda invocations of the Ember function, to run
    /// the same pipeline on AWS Step Functions.
    Export {
        /// The ASL definition (JSON).
        file: PathBuf,
        /// The Ember Lambda function's ARN.
        #[arg(long, env = "EMBER_FUNCTION_ARN")]
        function_arn: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The ASL definition (JSON).
    pub file: PathBuf,
    /// The execution's input (JSON).
    #[arg(long, env = "EMBER_PIPELINE_INPUT", default_value = "{}")]
    pub input: String,
    /// Execution name: the same name with the same input is the same execution.
    #[arg(long, env = "EMBER_PIPELINE_NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub at: ExecutionArgs,
    #[command(flatten)]
    pub tools: ToolArgs,
}

#[derive(Debug, clap::Args)]
pub struct RedriveArgs {
    /// The failed execution's id.
    pub id: String,
    #[command(flatten)]
    pub at: ExecutionArgs,
}

/// Where executions are kept and their hops go: the commands that send hops.
#[derive(Debug, clap::Args)]
pub struct ExecutionArgs {
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub pipeline_queue: PipelineQueueArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

impl ExecutionArgs {
    /// The pipeline environment: the store, the pipeline queue, `tools`.
    async fn env(&self, tools: Tools, max_hops: u64) -> anyhow::Result<Env> {
        let (queue, store) =
            tokio::try_join!(self.pipeline_queue.open(&self.queue, &self.aws), self.store.open(&self.aws))?;
        Ok(HopHandler::env(queue, store, Arc::new(tools), max_hops))
    }
}

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// The execution id (as `ember pipeline start` printed it).
    pub id: String,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

fn read_definition(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("cannot read the definition {}: {e}", file.display()))
}

pub async fn run(cmd: PipelineCommand) -> anyhow::Result<()> {
    match cmd {
        PipelineCommand::Validate { file, tools: t } => {
            let source = read_definition(&file)?;
            let def = validate(&source, &tools(&t.http_allow).resources())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for w in def.warnings.iter().filter(|d| d.severity == Severity::Warning) {
                eprintln!("{}: {w}", file.display());
            }
            println!("{}: valid ({} states)", file.display(), def.machine.states.len());
            Ok(())
        }
        PipelineCommand::Start(args) => {
            let source = read_definition(&args.file)?;
            let input: serde_json::Value = serde_json::from_str(&args.input).map_err(|e| {
                anyhow::anyhow!("--input is not JSON ({e}); give an object like '{{\"question\": \"...\"}}'")
            })?;
            let env = args.at.env(tools(&args.tools.http_allow), args.tools.max_hops).await?;
            // The root of the execution's trace: every hop continues it.
            let span = tracing::info_span!(target: crate::telemetry::otel::TARGET, "pipeline start",
                otel.kind = "producer", ember.pipeline.definition = %args.file.display());
            let id = tracing::Instrument::instrument(
                start_execution(&env, &source, input, StartOptions { name: args.name.as_deref() }),
                span,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
            println!("{id}");
            Ok(())
        }
        PipelineCommand::Describe(args) => {
            let env = read_env(&args).await?;
            let d = describe(&env, &args.id).await?;
            println!("{}", serde_json::to_string_pretty(&d)?);
            Ok(())
        }
        PipelineCommand::Redrive(args) => {
            let env = args.at.env(tools(&[]), ember_orchestrator::pipeline::DEFAULT_MAX_HOPS).await?;
            let r = ember_orchestrator::pipeline::redrive_execution(&env, &args.id, None).await?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        PipelineCommand::History(args) => {
            let env = read_env(&args).await?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for event in history(&env, &args.id).await? {
                writeln!(out, "{}", serde_json::to_string(&event)?)?;
            }
            Ok(())
        }
        PipelineCommand::Export { file, function_arn } => {
            let source = read_definition(&file)?;
            let doc: serde_json::Value =
                serde_json::from_str(&source).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", file.display()))?;
            let out = ember_orchestrator::export::export_for_step_functions(&doc, &function_arn)?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}

/// An environment for reading executions: the store is all it uses.
async fn read_env(args: &ReadArgs) -> anyhow::Result<Env> {
    struct NoSend;
    #[async_trait::async_trait]
    impl ember_orchestrator::pipeline::HopSender for NoSend {
        async fn send(
            &self,
            _: Vec<(ember_orchestrator::pipeline::HopMessage, std::time::Duration)>,
        ) -> Result<(), ember_orchestrator::pipeline::SendError> {
            Err(ember_orchestrator::pipeline::SendError { message: "read-only".into(), retryable: false })
        }
    }
    Ok(Env {
        store: Arc::new(StoreAdapter(args.store.open(&args.aws).await?)),
        sender: Arc::new(NoSend),
        runner: Arc::new(tools(&[])),
        options: Options::default(),
        definitions: Default::default(),
    })
}
