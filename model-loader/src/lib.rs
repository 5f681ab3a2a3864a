//! Model loading for Ember: model references (a local directory, a `.gguf` file,
//! `s3://bucket/prefix`), fetching (parallel ranged GETs into place, progress, a local tier of verified copies, SHA-256
//! manifest), parsing config, tokenizer and chat template, and building one Llama/Mistral
//! model for every weight format on the chosen device.
//!
//! ```no_run
//! # async fn run() -> Result<(), ember_model_loader::LoadError> {
//! use ember_model_loader::{load, LoadOptions, ModelRef};
//! let reference: ModelRef = "/models/smollm2-135m".parse()?;
//! let loaded = load(&reference, &LoadOptions::default()).await?;
//! println!("{} layers", loaded.config().num_hidden_layers);
//! # Ok(()) }
//! ```

pub mod aws;
pub mod bpe;
pub mod chat;
pub mod config;
pub mod error;
pub mod fetch;
pub mod files;
pub mod gguf;
pub mod gguf_header;
pub mod linear;
pub mod loader;
pub mod manifest;
pub mod model;
pub mod prebuild;
pub mod progress;
pub mod quantize;
pub mod s3;
pub mod signing;
pub mod staging;
pub mod stream;
pub mod tier;
pub mod tiles;
pub mod tokenizer;
pub mod weights;

pub use chat::{ChatTemplate, Message};
pub use config::{Architecture, ModelConfig};
pub use error::LoadError;
pub use loader::{load, select_device, DTypeChoice, DeviceChoice, LoadOptions, LoadedModel, ModelRef, StreamWeights};
pub use model::{Model, SeqCache};
pub use s3::FetchOptions;
pub use signing::TrustedKeys;
pub use tokenizer::Tokenizer;
