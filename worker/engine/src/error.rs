//! The engine's error type, each error labelled and classed retryable or terminal: the
//! worker's runner uses the class to decide between redelivery and the dead-letter queue.

use ember_model_loader::LoadError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid sampling settings: {0}")]
    InvalidSampling(String),
    #[error("the prompt has {prompt_tokens} tokens but the model's context is {context} tokens: shorten the prompt")]
    PromptTooLong { prompt_tokens: usize, context: usize },
    #[error("the prompt is empty: give at least one message or some prompt text")]
    EmptyPrompt,
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("numerical error: {0}")]
    NumericalError(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("generation was stopped before it finished (worker shutting down)")]
    Cancelled,
    #[error("the generation engine has stopped; the job will run again")]
    Stopped,
    #[error("the server is at capacity: the request waited {waited_ms} ms for room in the batch; retry later")]
    Overloaded { waited_ms: u64 },
    #[error("model execution failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidSampling(_) => "invalid_sampling",
            Self::PromptTooLong { .. } => "prompt_too_long",
            Self::EmptyPrompt => "empty_prompt",
            Self::Tokenizer(_) => "tokenizer",
            Self::NumericalError(_) => "numerical_error",
            Self::Load(e) => e.label(),
            Self::Candle(_) => "model_execution",
            Self::Cancelled => "cancelled",
            Self::Stopped => "engine_stopped",
            Self::Overloaded { .. } => "overloaded",
        }
    }

    /// Whether running the same work again could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Load(e) => e.is_retryable(),
            // Out of memory on a device surfaces as a candle error: worth another try.
            Self::Candle(_) | Self::Cancelled | Self::Stopped | Self::Overloaded { .. } => true,
            _ => false,
        }
    }
}
