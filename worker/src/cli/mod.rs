//! The `ember` command line. Every option is also an environment variable.

pub mod autoscale;
pub mod backends;
pub mod batch;
pub mod common;
pub mod generate;
pub mod http;
pub mod jobs;
pub mod lambda;
pub mod model;
pub mod pipeline;
pub mod serve;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "ember",
    version,
    about = "Serverless LLM inference worker: Llama and Mistral from S3 or disk, on CUDA or the CPU"
)]
pub struct Cli {
    /// Log format on stderr (default: json in AWS Lambda, text elsewhere).
    #[arg(long, env = "EMBER_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// CPU threads for model execution (default: all cores).
    #[arg(long, env = "EMBER_THREADS", global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a completion for one prompt and print it.
    Generate(generate::GenerateArgs),
    /// Work with model files: import a GGUF, write, sign and verify a manifest.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Run jobs from the queue until stopped (SIGTERM/SIGINT finish or release running jobs).
    Serve(serve::ServeArgs),
    /// Put a JSONL batch file (OpenAI batch input lines) on the queue.
    Submit(jobs::SubmitArgs),
    /// A submitted batch: its status, and its output once done (as the OpenAI Batch API).
    #[command(subcommand)]
    Batch(batch::BatchCommand),
    /// Run a JSONL batch file to an output JSONL: submit, serve until done, collect.
    Run(jobs::RunArgs),
    /// Queue depths: visible, in flight, delayed, dead-lettered.
    Status(jobs::StatusArgs),
    /// Work with the dead-letter queue.
    #[command(subcommand)]
    Dlq(jobs::DlqCommand),
    /// Run as an AWS Lambda function on SQS events (the model loads once per container).
    Lambda(lambda::LambdaArgs),
    /// Step-Functions-style pipelines (Amazon States Language): validate, start, describe,
    /// history, export. `ember serve --pipelines` runs their hops.
    #[command(subcommand)]
    Pipeline(pipeline::PipelineCommand),
    /// Scale workers on the queue's backlog (a local pool, an ECS service, a Lambda mapping),
    /// or compare scaling policies on arrival traces (`simulate`).
    Autoscale(Box<autoscale::AutoscaleArgs>),
}

impl Command {
    /// The log level when `EMBER_LOG` is unset. Services (`serve`, `lambda`, `autoscale`) log
    /// at info: their logs are what an operator reads (per-job metrics, the cold start,
    /// CloudWatch EMF). Commands a person runs and waits for log warnings and errors only, as
    /// cargo and the AWS CLI do: their answer is on stdout, their progress on a bar.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Self::Serve(_) | Self::Lambda(_) | Self::Autoscale(_) => "info",
            _ => "warn",
        }
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args).await,
        Command::Model(cmd) => model::run(cmd).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Submit(args) => jobs::submit(args).await,
        Command::Run(args) => jobs::run(args).await,
        Command::Batch(cmd) => batch::run(cmd).await,
        Command::Status(args) => jobs::status(args).await,
        Command::Dlq(cmd) => jobs::dlq(cmd).await,
        Command::Lambda(args) => lambda::run(args).await,
        Command::Pipeline(cmd) => pipeline::run(cmd).await,
        Command::Autoscale(args) => autoscale::run(*args).await,
    }
}
