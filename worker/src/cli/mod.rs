//! The `ember` command line. Every option is also an environment variable.

pub mod common;
pub mod generate;
pub mod model;

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
    /// Work with model files: import a GGUF, write a manifest.
    #[command(subcommand)]
    Model(model::ModelCommand),
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args).await,
        Command::Model(cmd) => model::run(cmd).await,
    }
}
