//! From a model reference to a built model: resolve, fetch, verify, parse, check, build.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use crate::chat::{ChatTemplate, TokenizerConfig};
use crate::config::{HfConfig, ModelConfig};
use crate::error::{LoadError, Result};
use crate::files::{local_files, FileBytes, ModelFiles};
use crate::gguf::{gguf_byte_bpe, gguf_config, gguf_tokenizer_config};
use crate::model::Model;
use crate::s3::{self, FetchOptions};
use crate::tokenizer::Tokenizer;
use crate::weights::{check_tensors, GgufWeights, SafetensorsWeights, WeightSource};

/// Where a model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A Hugging Face style directory, or a single `.gguf` file.
    Local(PathBuf),
    /// `s3://bucket/prefix` (a folder of files) or `s3://bucket/key.gguf`.
    S3 { bucket: String, prefix: String },
}

impl std::str::FromStr for ModelRef {
    type Err = LoadError;
    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("s3://") {
            let (bucket, prefix) = s3::parse_s3_url(s).ok_or_else(|| LoadError::BadReference(s.into()))?;
            return Ok(Self::S3 { bucket, prefix });
        }
        if s.is_empty() || s.contains("://") {
            return Err(LoadError::BadReference(s.into()));
        }
        Ok(Self::Local(PathBuf::from(s)))
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// The device to run on, as the user asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = LoadError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Ok(Self::Cuda(n)),
                None => Err(LoadError::Device(format!("unknown device `{s}`: use cpu, cuda or cuda:N"))),
            },
        }
    }
}

/// The one place a device is chosen. Asking for CUDA from a build without it is an error
/// that says how to get it, never a panic.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(LoadError::Device(
                    "this ember was built without CUDA support: rebuild with `--features cuda` (see examples/local-gpu), or use --device cpu".into(),
                ));
            }
            check_cuda_device(ordinal)?;
            Device::new_cuda(ordinal)
                .map_err(|e| LoadError::Device(format!("CUDA device {ordinal} is not usable: {e}")))
        }
    }
}

/// Asks the driver, before candle does, whether CUDA device `ordinal` exists, so that a
/// machine without a GPU or a working driver gets a message saying so rather than a failure
/// deep in candle.
#[cfg(feature = "cuda")]
fn check_cuda_device(ordinal: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, CudaContext};
    result::init().map_err(|e| {
        LoadError::Device(format!(
            "the CUDA driver did not start ({e}): check that the NVIDIA driver is installed and the GPU is visible \
             (nvidia-smi; in a container, run it with --gpus all), or use --device cpu"
        ))
    })?;
    let count = CudaContext::device_count()
        .map_err(|e| LoadError::Device(format!("the CUDA driver could not count devices: {e}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(LoadError::Device(format!(
            "CUDA device {ordinal} does not exist: the driver sees {count} (CUDA_VISIBLE_DEVICES={}); use cuda:0..cuda:{}",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into()),
            (count - 1).max(0)
        )));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn check_cuda_device(_ordinal: usize) -> Result<()> {
    Ok(())
}

/// Weight precision for safetensors models; GGUF models keep their quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// Safetensors: bf16 on CUDA; on the CPU the file's dtype where Ember's dense kernel runs
    /// it (x86-64 with AVX2/FMA/F16C: f16/bf16 weights read in place, f32 activations), else
    /// f32. GGUF: keep the file's quantization.
    #[default]
    Auto,
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for DTypeChoice {
    type Err = LoadError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            _ => Err(LoadError::BadConfig(format!("unknown dtype `{s}`: use auto, f32, f16 or bf16"))),
        }
    }
}

impl DTypeChoice {
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            Self::Auto if device.is_cuda() => DType::BF16,
            Self::Auto | Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }
}

/// Everything [`load`] needs besides the reference.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    pub fetch: FetchOptions,
    /// AWS configuration for `s3://` references; required for them.
    pub aws: Option<aws_config::SdkConfig>,
    /// Whether safetensors weights from S3 go straight to the device as they download
    /// ([`crate::s3::fetch_streaming`]) instead of through a whole copy in host memory.
    pub stream: StreamWeights,
    /// Refuse weights without an `ember-manifest.json` ([`LoadError::ManifestRequired`])
    /// instead of loading them unverified. The CLI turns it on by default for `s3://` models,
    /// where the bytes crossed a network and a bucket others can write.
    pub require_manifest: bool,
    /// When not empty, the manifest must be signed by one of these keys
    /// ([`crate::signing`]), and so is required too: every load path refuses an unsigned,
    /// untrusted or altered manifest before any weight is used.
    pub trusted_keys: crate::signing::TrustedKeys,
}

impl LoadOptions {
    /// The AWS configuration an `s3://` model needs.
    fn aws_config(&self) -> Result<&aws_config::SdkConfig> {
        self.aws.as_ref().ok_or_else(|| {
            LoadError::BadConfig(
                "an s3:// model needs AWS configuration (region, credentials, optional --endpoint-url)".into(),
            )
        })
    }
}

/// When to stream weights to the device (see [`LoadOptions::stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamWeights {
    /// For `s3://` safetensors models on CUDA, where there is a host-to-device copy to
    /// overlap with the download. On the CPU the download cache (memory-mapped) is better.
    #[default]
    Auto,
    /// For every `s3://` safetensors model (the tests use it on the CPU).
    Always,
    Never,
}

/// Where the time of a load went: the stages a cold start logs (and emits as metrics in
/// Lambda), so a user sees which link is the bottleneck.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadTimings {
    /// Reference to every byte fetched (and, for S3, verified on the way).
    pub fetch_s: f64,
    /// Verification after the fetch (local models, and S3 files hashed after landing).
    pub verify_s: f64,
    /// Tensors built (and repacked for the CPU kernels), tokenizer and chat template parsed.
    pub build_s: f64,
    /// The fetch, stage by stage, with bytes (zero for local models).
    pub fetch: crate::fetch::FetchStats,
    /// Quantized layers whose tiles were mapped from the local tier instead of made
    /// ([`crate::tiles`]).
    pub tiles_from_cache: usize,
}

/// A model ready to generate with.
pub struct LoadedModel {
    pub name: String,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub verified: bool,
    pub timings: LoadTimings,
    /// Keeps the local tier's copy from eviction while the model is loaded.
    pub cache_pin: Option<crate::tier::Pin>,
    /// Writes the tiles made by this load into the local tier, for the next start.
    tiles_writer: Option<std::thread::JoinHandle<()>>,
}

impl LoadedModel {
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }
}

/// Fetches the files of a model reference.
pub async fn fetch_files(reference: &ModelRef, opts: &LoadOptions) -> Result<ModelFiles> {
    match reference {
        ModelRef::Local(path) => {
            let mut files = local_files(path)?;
            if !opts.trusted_keys.is_empty() {
                files.add_folder_manifest(path)?;
            }
            // Bytes checked against a manifest are copied once checked (see `in_place`).
            files.in_place = files.get(crate::manifest::MANIFEST_FILE).is_none()
                && opts.trusted_keys.is_empty()
                && !opts.require_manifest;
            Ok(files)
        }
        ModelRef::S3 { bucket, prefix } => {
            let sdk = opts.aws_config()?;
            s3::fetch(&s3::client(sdk), bucket, prefix, &opts.fetch).await
        }
    }
}

/// Loads a model: fetch, verify against the manifest, check tensors, build on the device.
pub async fn load(reference: &ModelRef, opts: &LoadOptions) -> Result<LoadedModel> {
    let device = select_device(opts.device)?;
    let t0 = Instant::now();
    let require_manifest = opts.require_manifest || !opts.trusted_keys.is_empty();
    let mut listed = None;
    if let (ModelRef::S3 { bucket, prefix }, true) = (reference, require_manifest) {
        let sdk = opts.aws_config()?;
        listed = Some(
            s3::check_before_download(&s3::client(sdk), bucket, prefix, require_manifest, &opts.trusted_keys).await?,
        );
    }
    if let ModelRef::S3 { bucket, prefix } = reference {
        let wanted = match opts.stream {
            StreamWeights::Always => true,
            StreamWeights::Never => false,
            StreamWeights::Auto => device.is_cuda() && !prefix.ends_with(".gguf"),
        };
        if wanted {
            let sdk = opts.aws_config()?;
            let mut sink = device_sink(&device)?;
            let client = s3::client(sdk);
            let streamed =
                s3::fetch_streaming(&client, bucket, prefix, &opts.fetch, &opts.trusted_keys, sink.as_mut(), listed)
                    .await?;
            if require_manifest && !streamed.verified {
                return Err(LoadError::ManifestRequired(reference.to_string()));
            }
            let fetch_s = t0.elapsed();
            let name = model_name(reference);
            let dtype = opts.dtype;
            return tokio::task::spawn_blocking(move || build_preloaded(name, streamed, dtype, &device, fetch_s))
                .await
                .map_err(|e| LoadError::BadConfig(format!("model build task failed: {e}")))?;
        }
    }
    let mut files = match (reference, listed) {
        (ModelRef::S3 { bucket, prefix }, listed) => {
            let sdk = opts.aws_config()?;
            // Quantized layers are tiled as the GGUF lands where the CPU kernels will run them
            // (`EMBER_TILE_DURING_DOWNLOAD=0` leaves them to the build, to compare).
            let tile_gguf = device.is_cpu()
                && opts.dtype == DTypeChoice::Auto
                && crate::linear::kernels_enabled()
                && std::env::var("EMBER_TILE_DURING_DOWNLOAD").map_or(true, |v| v != "0");
            let fetch = FetchOptions { tile_gguf, ..opts.fetch.clone() };
            s3::fetch_listed(&s3::client(sdk), bucket, prefix, &fetch, listed).await?
        }
        _ => fetch_files(reference, opts).await?,
    };
    let cache_pin = files.pin.take();
    if require_manifest && files.get(crate::manifest::MANIFEST_FILE).is_none() {
        return Err(LoadError::ManifestRequired(reference.to_string()));
    }
    let fetch_s = t0.elapsed();
    let name = model_name(reference);
    let dtype = opts.dtype;
    let trusted = opts.trusted_keys.clone();
    // Hashing and building are CPU-bound: keep them off the async runtime's threads.
    let mut loaded = tokio::task::spawn_blocking(move || build(name, &files, &trusted, dtype, &device, fetch_s))
        .await
        .map_err(|e| LoadError::BadConfig(format!("model build task failed: {e}")))??;
    loaded.cache_pin = cache_pin;
    if let (Some(pin), Some(writer)) = (loaded.cache_pin.as_mut(), loaded.tiles_writer.take()) {
        pin.finish_before_release(writer);
    }
    Ok(loaded)
}

/// Builds a model from fetched files (blocking). GGUF weights stay quantized unless a dtype
/// is asked for explicitly, in which case they are dequantized to it at load.
pub fn build(
    name: String,
    files: &ModelFiles,
    trusted: &crate::signing::TrustedKeys,
    dtype_choice: DTypeChoice,
    device: &Device,
    fetch_s: Duration,
) -> Result<LoadedModel> {
    let t1 = Instant::now();
    let verified = files.verify(trusted)?;
    let mut loaded = assemble(name, files, None, dtype_choice, device, fetch_s, (verified, t1.elapsed()))?;
    loaded.timings.fetch = files.stats.clone();
    Ok(loaded)
}

/// Builds the model from files whose bytes were checked (`verified`, taking `verify_s`), with
/// the safetensors weights read from `files`, or already on the device in `preloaded`.
#[allow(clippy::too_many_arguments)]
fn assemble(
    name: String,
    files: &ModelFiles,
    preloaded: Option<std::collections::HashMap<String, candle_core::Tensor>>,
    dtype_choice: DTypeChoice,
    device: &Device,
    fetch_s: Duration,
    (verified, verify_s): (bool, Duration),
) -> Result<LoadedModel> {
    let dtype = dtype_choice.resolve(device);
    let streamed = preloaded.is_some();
    let t2 = Instant::now();
    let gguf = files.names().find(|n| n.ends_with(".gguf")).map(str::to_string);
    let (mut tiles_writer, mut tiled_from_tier) = (None, 0);
    let (model, tokenizer, tok_cfg) = match gguf {
        Some(gguf_name) => {
            let dequantize = (dtype_choice != DTypeChoice::Auto).then_some(dtype);
            let mut tiled = files.tiled.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
            // The local tier's copy, with the stamp it was verified with: tiles kept beside it by
            // an earlier start are used if they were made from that very copy (`crate::tiles`).
            let cached = files
                .tier_dir
                .as_ref()
                .zip(files.tier_stamps.get(&gguf_name))
                .map(|(d, stamp)| (*stamp, d.join(&gguf_name)))
                .filter(|_| dequantize.is_none() && device.is_cpu() && crate::linear::kernels_enabled());
            let kept = cached.as_ref().and_then(|(stamp, path)| crate::tiles::read(path, *stamp));
            let reused = kept.as_ref().map_or(0, HashMap::len);
            tiled.extend(kept.unwrap_or_default());
            let bytes = files.require(&gguf_name)?;
            let weights = match files.early_header(&gguf_name) {
                Some(header) => GgufWeights::parsed(&gguf_name, bytes, header),
                None => GgufWeights::new(&gguf_name, bytes)?,
            }
            .with_dequantize(dequantize)
            .with_tiled(tiled);
            let cfg = gguf_config(&weights.header)?;
            let tok_cfg = match files.get("tokenizer_config.json") {
                Some(b) => TokenizerConfig::from_json(&String::from_utf8_lossy(b))?,
                None => gguf_tokenizer_config(&weights.header),
            };
            let tokenizer = || match files.get("tokenizer.json") {
                Some(b) => Tokenizer::from_json(b),
                None => files.early_tokenizer().unwrap_or_else(|| gguf_byte_bpe(&weights.header).map(Tokenizer::from)),
            };
            let (model, tokenizer) = beside(tokenizer, || build_model(&weights, &cfg, dtype, device))?;
            // Tiles made now are kept for the next start, written after the load (the folder
            // stays pinned until they are).
            if let (Some((stamp, path)), 0, true) = (cached, reused, files.keep_tiles) {
                let layers = weights.tiled_layers();
                let max = files.tier_max_bytes;
                if !layers.is_empty() {
                    tiles_writer = std::thread::Builder::new()
                        .name("ember-keep-tiles".into())
                        .spawn(move || crate::tiles::write(&path, stamp, &layers, max))
                        .ok();
                }
            }
            tiled_from_tier = reused;
            (model, tokenizer, tok_cfg)
        }
        None => {
            let cfg = HfConfig::from_json(&String::from_utf8_lossy(files.require("config.json")?))?.into_config()?;
            let tokenizer_json = files.require("tokenizer.json")?;
            let tok_cfg = match files.get("tokenizer_config.json") {
                Some(b) => TokenizerConfig::from_json(&String::from_utf8_lossy(b))?,
                None => TokenizerConfig::default(),
            };
            let build = || match preloaded {
                Some(tensors) => build_model(&crate::stream::PreloadedWeights::new(tensors), &cfg, dtype, device),
                None => {
                    let shards: Vec<(&str, &FileBytes)> = files
                        .files
                        .iter()
                        .filter(|(n, _)| n.ends_with(".safetensors"))
                        .map(|(n, b)| (n.as_str(), b))
                        .collect();
                    if shards.is_empty() {
                        return Err(LoadError::MissingFile {
                            model: files.origin.clone(),
                            file: "model.safetensors".into(),
                        });
                    }
                    let weights = if files.in_place {
                        SafetensorsWeights::shared(&shards)?
                    } else {
                        let plain: Vec<(&str, &[u8])> = shards.iter().map(|(n, b)| (*n, &***b)).collect();
                        SafetensorsWeights::new(&plain)?
                    };
                    // `auto` on the CPU keeps a half-precision file's dtype where Ember's dense
                    // kernel runs it: the weights are then read where they landed (no f32
                    // copy, half the memory), and the arithmetic is the f32 path's, on the
                    // same values.
                    let dtype = match (dtype_choice, weights.dtype_of("model.embed_tokens.weight")) {
                        (DTypeChoice::Auto, Some(file)) if device.is_cpu() && crate::linear::dense_kernels_on() => file,
                        _ => dtype,
                    };
                    build_model(&weights, &cfg, dtype, device)
                }
            };
            let (model, tokenizer) = beside(|| files.tokenizer(tokenizer_json), build)?;
            (model, tokenizer, tok_cfg)
        }
    };
    let chat_template = ChatTemplate::new(&tok_cfg)?;
    let timings = LoadTimings {
        fetch_s: fetch_s.as_secs_f64(),
        verify_s: verify_s.as_secs_f64(),
        build_s: t2.elapsed().as_secs_f64(),
        fetch: files.stats.clone(),
        tiles_from_cache: tiled_from_tier,
    };
    tracing::info!(
        model = %name,
        verified,
        streamed,
        fetch_s = timings.fetch_s,
        verify_s = timings.verify_s,
        build_s = timings.build_s,
        tiles_from_cache = tiled_from_tier,
        downloaded_bytes = timings.fetch.downloaded_bytes,
        cached_bytes = timings.fetch.cached_bytes,
        "model loaded"
    );
    Ok(LoadedModel { name, model, tokenizer, chat_template, verified, timings, cache_pin: None, tiles_writer })
}

/// Builds the model here while the tokenizer is parsed on a second thread: parsing a
/// `tokenizer.json` (about 2 MB for Llama-family vocabularies) is CPU work of its own on the
/// cold-start path, and the build does not need it.
fn beside<T: Send>(
    tokenizer: impl FnOnce() -> Result<T> + Send,
    build: impl FnOnce() -> Result<Model>,
) -> Result<(Model, T)> {
    std::thread::scope(|s| {
        let parsing = s.spawn(tokenizer);
        let model = build();
        let tokenizer = parsing.join().map_err(|_| LoadError::BadConfig("the tokenizer parser panicked".into()))?;
        Ok((model?, tokenizer?))
    })
}

/// The sink that puts streamed weights on `device`: pinned buffers and async copies on CUDA.
fn device_sink(device: &Device) -> Result<Box<dyn crate::stream::TensorSink>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return Ok(Box::new(crate::stream::CudaSink::new(device)?));
    }
    Ok(Box::new(crate::stream::HostSink::new(device)))
}

/// Builds a model whose weights [`s3::fetch_streaming`] already put on the device (and
/// verified against the manifest on the way: that hashing ran during the download, so its
/// time is inside `fetch_s`).
fn build_preloaded(
    name: String,
    streamed: s3::Streamed,
    dtype_choice: DTypeChoice,
    device: &Device,
    fetch_s: Duration,
) -> Result<LoadedModel> {
    let verified = (streamed.verified, Duration::ZERO);
    assemble(name, &streamed.files, Some(streamed.tensors), dtype_choice, device, fetch_s, verified)
}

fn build_model(weights: &dyn WeightSource, cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Model> {
    check_tensors(weights, cfg)?;
    Model::load(weights, cfg, dtype, device)
}

/// The model's short name: the last path component, without `.gguf`.
pub fn model_name(reference: &ModelRef) -> String {
    let full = match reference {
        ModelRef::Local(p) => p.to_string_lossy().trim_end_matches('/').to_string(),
        ModelRef::S3 { prefix, bucket } => {
            if prefix.is_empty() {
                bucket.clone()
            } else {
                prefix.clone()
            }
        }
    };
    let last = full.rsplit('/').next().unwrap_or(&full);
    last.trim_end_matches(".gguf").to_string()
}
