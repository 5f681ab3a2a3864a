//! Options shared by the subcommands that load a model.

use std::path::PathBuf;

use aws_config::BehaviorVersion;
use ember_model_loader::{DTypeChoice, DeviceChoice, FetchOptions, LoadOptions, ModelRef, StreamWeights, TrustedKeys};

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// The model: a local directory, a .gguf file, or s3://bucket/prefix.
    #[arg(long, env = "EMBER_MODEL")]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "EMBER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weight precision for safetensors models: auto (on CUDA bf16; on the CPU the file's own
    /// dtype where Ember's dense kernel runs it, read in place, else f32), f32, f16, bf16.
    #[arg(long, env = "EMBER_DTYPE", default_value = "auto", value_parser = ["auto", "f32", "f16", "bf16"])]
    pub dtype: String,
    /// Refuse weights that have no ember-manifest.json (SHA-256 of every file) instead of
    /// loading them unverified: true or false. Default: true for s3:// models, false for local
    /// ones.
    #[arg(long, env = "EMBER_REQUIRE_MANIFEST", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub require_manifest: Option<bool>,
    /// The name the model is served as: what jobs and HTTP requests put in `model` (besides
    /// "default") and what answers carry (default: the model's own name). For clients that
    /// send a name of their own, such as `gpt-4o-mini`.
    #[arg(long, env = "EMBER_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    #[command(flatten)]
    pub trust: TrustArgs,
    #[command(flatten)]
    pub fetch: FetchArgs,
}

/// Which keys a model's manifest must be signed by.
#[derive(Debug, Clone, clap::Args)]
pub struct TrustArgs {
    /// Load only models whose ember-manifest.json is signed (ember-manifest.json.minisig) by
    /// one of these minisign public keys: the key string (RW...) or the path of a .pub file.
    /// Repeat the option, or separate keys with commas in the variable.
    #[arg(long = "trusted-key", env = "EMBER_TRUSTED_KEYS", value_delimiter = ',')]
    pub trusted_keys: Vec<String>,
}

impl TrustArgs {
    pub fn keys(&self) -> anyhow::Result<TrustedKeys> {
        Ok(TrustedKeys::parse(&self.trusted_keys)?)
    }
}

/// Where AWS is: the standard environment (region, credentials), plus an endpoint override
/// for S3/SQS-compatible local servers.
#[derive(Debug, Clone, clap::Args)]
pub struct AwsArgs {
    /// S3/SQS-compatible endpoint (for example a local server); AWS's own when unset.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// AWS region (default: the profile's region, else us-east-1).
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Named profile from ~/.aws/config and ~/.aws/credentials (default: the standard chain:
    /// environment keys, the default profile, the instance or task role).
    #[arg(long, env = "AWS_PROFILE")]
    pub profile: Option<String>,
}

impl AwsArgs {
    /// AWS configuration from the standard environment, with the region, profile and
    /// endpoint given.
    pub async fn config(&self) -> aws_config::SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(profile) = &self.profile {
            loader = loader.profile_name(profile);
        }
        loader = match &self.region {
            Some(region) => loader.region(aws_config::Region::new(region.clone())),
            None => {
                let mut chain = aws_config::meta::region::RegionProviderChain::first_try(None);
                if let Some(profile) = &self.profile {
                    chain = chain.or_else(
                        aws_config::profile::ProfileFileRegionProvider::builder().profile_name(profile).build(),
                    );
                }
                loader.region(chain.or_default_provider().or_else("us-east-1"))
            }
        };
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        loader.load().await
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct FetchArgs {
    /// The local tier: a folder where verified copies of s3:// models are kept, so the next
    /// start maps them instead of downloading (none when unset; /tmp/ember-cache in Lambda).
    #[arg(long, env = "EMBER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The most MiB of model files the cache keeps; least recently used models not in use are
    /// deleted to make room (no limit when unset; 90% of /tmp in Lambda).
    #[arg(long, env = "EMBER_CACHE_MAX_MB")]
    pub cache_max_mb: Option<u64>,
    /// Size of each ranged GET, in MiB.
    #[arg(long, env = "EMBER_PART_SIZE_MB", default_value_t = 16)]
    pub part_size_mb: usize,
    /// Ranged GETs in flight at once.
    #[arg(long, env = "EMBER_FETCH_CONCURRENCY", default_value_t = 8)]
    pub fetch_concurrency: usize,
    /// Hide the download progress bar.
    #[arg(long, env = "EMBER_NO_PROGRESS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_progress: bool,
    /// Stream s3:// safetensors weights to the device as they download (pinned buffers and
    /// async copies on CUDA; no whole copy in host memory): auto (on CUDA), always, never.
    #[arg(long, env = "EMBER_STREAM_WEIGHTS", default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub stream_weights: String,
}

impl ModelArgs {
    /// Loads the model, under `--served-model-name` when given.
    pub async fn load(&self, aws: &AwsArgs) -> anyhow::Result<ember_model_loader::LoadedModel> {
        let reference = self.reference()?;
        let opts = self.load_options(aws).await?;
        let mut loaded = ember_model_loader::load(&reference, &opts).await?;
        if let Some(name) = self.served_model_name.as_ref().filter(|n| !n.is_empty()) {
            loaded.name = name.clone();
        }
        Ok(loaded)
    }

    pub fn reference(&self) -> anyhow::Result<ModelRef> {
        Ok(self.model.parse()?)
    }

    pub async fn load_options(&self, aws: &AwsArgs) -> anyhow::Result<LoadOptions> {
        let reference = self.reference()?;
        let (aws, remote) = match reference {
            ModelRef::S3 { .. } => (Some(aws.config().await), true),
            ModelRef::Local(_) => (None, false),
        };
        Ok(LoadOptions {
            device: self.device.parse::<DeviceChoice>()?,
            dtype: self.dtype.parse::<DTypeChoice>()?,
            fetch: self.fetch.options(),
            aws,
            stream: match self.fetch.stream_weights.as_str() {
                "always" => StreamWeights::Always,
                "never" => StreamWeights::Never,
                _ => StreamWeights::Auto,
            },
            require_manifest: self.require_manifest.unwrap_or(remote),
            trusted_keys: self.trust.keys()?,
        })
    }
}

impl FetchArgs {
    pub fn options(&self) -> FetchOptions {
        FetchOptions {
            part_size: self.part_size_mb.max(1) << 20,
            concurrency: self.fetch_concurrency.max(1),
            cache_dir: self.cache_dir.clone().or_else(|| in_lambda().then(|| PathBuf::from(LAMBDA_CACHE_DIR))),
            cache_max_bytes: self.cache_max_mb.map(|mb| mb << 20).or_else(|| {
                // Lambda's /tmp is the function's ephemeral storage (512 MB to 10 GB); leave
                // a tenth of it for everything else.
                in_lambda().then(|| fs_size(std::path::Path::new("/tmp")).map(|b| b / 10 * 9)).flatten()
            }),
            progress: !self.no_progress,
            // The loader decides: it knows where the model runs.
            tile_gguf: false,
            // A Lambda sandbox's /tmp starts empty and is rarely loaded from twice: tiles kept
            // there would only take space from the cache.
            keep_tiles: !in_lambda(),
        }
    }
}

/// Where the local tier lives in Lambda when `--cache-dir` is not given: the only writable
/// disk there, kept between invocations of one execution environment.
const LAMBDA_CACHE_DIR: &str = "/tmp/ember-cache";

fn in_lambda() -> bool {
    crate::telemetry::in_lambda()
}

/// The size of the file system holding `path`.
fn fs_size(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory the size
    // of a statvfs, which statvfs fills on success (and only then is it read).
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // The fields are 32-bit on some targets.
    #[allow(clippy::unnecessary_cast)]
    let bytes = st.f_blocks as u64 * st.f_frsize as u64;
    Some(bytes)
}
