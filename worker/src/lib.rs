//! Ember's worker: the generation engine and the `ember` command line.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use ember_model_loader::{load, LoadOptions, Message};
//! use ember_worker::engine::{Engine, GenerateRequest, Prompt, SamplingParams};
//! let engine = Engine::new(load(&"/models/smollm2".parse()?, &LoadOptions::default()).await?);
//! let done = engine.generate(&GenerateRequest { allow_special_tokens: false,
//!     prompt: Prompt::Chat(vec![Message::new("user", "What is the capital of France?")]),
//!     max_tokens: 32,
//!     sampling: SamplingParams::default(),
//!     stop: vec![],
//! })?;
//! println!("{}", done.text);
//! # Ok(()) }
//! ```

pub mod autoscale;
pub mod cli;
pub mod engine;
pub mod error;
pub mod job;
pub mod lambda;
pub mod openai;
pub mod pipeline;
pub mod queue;
pub mod runner;
pub mod store;
pub mod telemetry;

pub use error::EngineError;
