//! The loader's error type: every failure names what was wrong and what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong between a model reference and a built model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model reference `{0}` is not valid: expected a local directory, a `.gguf` file, or `s3://bucket/prefix`")]
    BadReference(String),
    #[error("model path `{}` does not exist: check the path, or fetch the model first", .0.display())]
    NotFound(PathBuf),
    #[error("`{file}` is missing from the model at `{model}`: a model needs config.json, tokenizer.json and model.safetensors (or a sharded index), or one .gguf file")]
    MissingFile { model: String, file: String },
    #[error("S3 bucket `{bucket}` does not exist or is not reachable with these credentials")]
    NoSuchBucket { bucket: String },
    #[error("nothing found in S3 at `s3://{bucket}/{prefix}`: check the bucket and prefix")]
    NoSuchKey { bucket: String, prefix: String },
    #[error(transparent)]
    Aws(#[from] crate::aws::AwsError),
    #[error("S3 request for `s3://{bucket}/{key}` failed: {message}")]
    S3 { bucket: String, key: String, message: String, retryable: bool },
    #[error("I/O error on `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{file}` is not valid JSON: {message}")]
    BadJson { file: String, message: String },
    #[error("unsupported architecture `{0}`: Ember runs Llama and Mistral models (LlamaForCausalLM, MistralForCausalLM, GGUF `llama`)")]
    UnsupportedArchitecture(String),
    #[error("config is not usable: {0}")]
    BadConfig(String),
    #[error("`{file}` failed its checksum: the manifest says sha256 {expected}, the bytes hash to {actual}; the file is corrupt or was changed, fetch it again")]
    ChecksumMismatch { file: String, expected: String, actual: String },
    #[error("`{file}` failed its checksum in chunk {chunk} (bytes {start}..{end}): the manifest says {hash} {expected}, the bytes hash to {actual}; the file is corrupt or was changed, fetch it again")]
    ChunkMismatch {
        file: String,
        chunk: usize,
        start: u64,
        end: u64,
        hash: &'static str,
        expected: String,
        actual: String,
    },
    #[error("`{file}` has {actual} bytes but the manifest says {expected}")]
    SizeMismatch { file: String, expected: u64, actual: u64 },
    #[error("`{}` is a file but not a model: --model takes a model directory (config.json, tokenizer.json, model.safetensors), a .gguf file, or s3://bucket/prefix", .0.display())]
    NotAModel(std::path::PathBuf),
    #[error("`{}` holds several GGUF files ({}): point --model at the one to load", .dir.display(), .files.join(", "))]
    AmbiguousModel { dir: std::path::PathBuf, files: Vec<String> },
    #[error("the manifest lists `{0}`, which is not in the model")]
    ManifestFileMissing(String),
    #[error("the model at `{0}` has no ember-manifest.json, and verified weights are required (--require-manifest, on by default for s3:// models): write one with `ember model manifest DIR` and upload it beside the weights, or pass --require-manifest=false to load unverified weights")]
    ManifestRequired(String),
    #[error("the model at `{0}` has no signature (ember-manifest.json.minisig beside ember-manifest.json), and trusted keys are set (--trusted-key / EMBER_TRUSTED_KEYS): sign the manifest with `ember model sign DIR --key SECRET_KEY` or `minisign -Sm ember-manifest.json`, and put the signature beside it")]
    Unsigned(String),
    #[error("the manifest of the model at `{model}` is signed by key {key_id}, which is not trusted (trusted: {trusted}): load models signed by a trusted key, or add the signer's public key to --trusted-key / EMBER_TRUSTED_KEYS")]
    UntrustedKey { model: String, key_id: String, trusted: String },
    #[error("the manifest of the model at `{model}` does not match its signature by key {key_id}: ember-manifest.json was changed after it was signed; do not load it, and re-sign only a manifest you have checked")]
    SignatureMismatch { model: String, key_id: String },
    #[error(
        "the signature of the model at `{model}` (ember-manifest.json.minisig) is not a minisign signature: {message}"
    )]
    BadSignature { model: String, message: String },
    #[error("trusted key `{key}` is neither a minisign public key (RW...) nor a readable .pub file: {message}")]
    BadTrustedKey { key: String, message: String },
    #[error("signing: {0}")]
    Signing(String),
    #[error("weights file `{file}` is unreadable: {message} (truncated or not a safetensors/GGUF file?)")]
    BadWeights { file: String, message: String },
    #[error("tensor `{name}` is missing from the weights: the checkpoint does not match config.json")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {actual:?}, the architecture needs {expected:?}")]
    BadTensorShape { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("tensor `{name}` has dtype {dtype}, which Ember cannot load")]
    BadTensorDtype { name: String, dtype: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("device: {0}")]
    Device(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl LoadError {
    /// A stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadReference(_) => "bad_reference",
            Self::NotFound(_) => "not_found",
            Self::MissingFile { .. } => "missing_file",
            Self::NoSuchBucket { .. } => "no_such_bucket",
            Self::NoSuchKey { .. } => "no_such_key",
            Self::S3 { .. } | Self::Aws(_) => "s3",
            Self::Io { .. } => "io",
            Self::BadJson { .. } => "bad_json",
            Self::UnsupportedArchitecture(_) => "unsupported_architecture",
            Self::BadConfig(_) => "bad_config",
            Self::ChecksumMismatch { .. } => "checksum_mismatch",
            Self::SizeMismatch { .. } => "size_mismatch",
            Self::ChunkMismatch { .. } => "chunk_mismatch",
            Self::ManifestFileMissing(_) => "manifest_file_missing",
            Self::ManifestRequired(_) => "manifest_required",
            Self::NotAModel(_) => "not_a_model",
            Self::AmbiguousModel { .. } => "ambiguous_model",
            Self::Unsigned(_) => "unsigned",
            Self::UntrustedKey { .. } => "untrusted_key",
            Self::SignatureMismatch { .. } => "signature_mismatch",
            Self::BadSignature { .. } => "bad_signature",
            Self::BadTrustedKey { .. } => "bad_trusted_key",
            Self::Signing(_) => "signing",
            Self::BadWeights { .. } => "bad_weights",
            Self::MissingTensor { .. } => "missing_tensor",
            Self::BadTensorShape { .. } => "bad_tensor_shape",
            Self::BadTensorDtype { .. } => "bad_tensor_dtype",
            Self::Tokenizer(_) => "tokenizer",
            Self::ChatTemplate(_) => "chat_template",
            Self::Device(_) => "device",
            Self::Candle(_) => "candle",
        }
    }

    /// Whether trying again later could succeed (network trouble), as opposed to a model
    /// that is wrong and will stay wrong.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::S3 { retryable, .. } => *retryable,
            Self::Aws(e) => e.is_retryable(),
            Self::Io { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

pub type Result<T, E = LoadError> = std::result::Result<T, E>;
