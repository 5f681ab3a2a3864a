//! Fetching a model from S3: one listing, then parallel ranged GETs of every file into
//! memory, with a progress bar and a local cache keyed by ETag and size so a warm start
//! downloads nothing.

use std::path::PathBuf;
use std::time::Instant;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use futures::StreamExt;

use crate::error::{LoadError, Result};
use crate::files::{is_model_file, FileBytes, ModelFiles};

/// How to download.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Bytes per ranged GET.
    pub part_size: usize,
    /// Ranged GETs in flight at once, across all files.
    pub concurrency: usize,
    /// The local tier: where verified copies are kept for the next start ([`crate::tier`]);
    /// None disables it.
    pub cache_dir: Option<PathBuf>,
    /// The most bytes of model files the local tier holds; None for no limit.
    pub cache_max_bytes: Option<u64>,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
    /// Tile a GGUF file's quantized tensors for Ember's CPU kernels while it downloads
    /// ([`crate::prebuild`]): set by the loader when the model will run them.
    pub tile_gguf: bool,
    /// Keep a GGUF model's tiles in the local tier for the next start ([`crate::tiles`]).
    pub keep_tiles: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            part_size: 16 << 20,
            concurrency: 8,
            cache_dir: None,
            cache_max_bytes: None,
            progress: true,
            tile_gguf: false,
            keep_tiles: true,
        }
    }
}

/// An S3 client for an SDK config ([`crate::aws::s3_client`]).
pub fn client(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    crate::aws::s3_client(sdk)
}

/// Splits `s3://bucket/prefix` into its parts.
pub fn parse_s3_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return None;
    }
    Some((bucket.to_string(), prefix.trim_end_matches('/').to_string()))
}

fn s3_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    op: &'static str,
    bucket: &str,
    key: &str,
    err: SdkError<E>,
) -> LoadError {
    let err = crate::aws::AwsError::new(op, format!("s3://{bucket}/{key}"), &err);
    if err.failure.code == "NoSuchBucket" {
        return LoadError::NoSuchBucket { bucket: bucket.into() };
    }
    LoadError::Aws(err)
}

/// One model file under the prefix, as the LIST answered it.
#[derive(Debug, Clone)]
pub struct Object {
    key: String,
    name: String,
    size: u64,
    etag: String,
}

async fn list(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Result<Vec<Object>> {
    // A `.gguf` key is one object; anything else is a folder-like prefix.
    let list_prefix =
        if prefix.is_empty() || prefix.ends_with(".gguf") { prefix.to_string() } else { format!("{prefix}/") };
    let pages: Vec<_> = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix(&list_prefix)
        .into_paginator()
        .send()
        .try_collect()
        .await
        .map_err(|e| s3_error("ListObjectsV2", bucket, prefix, e))?;
    let mut out = Vec::new();
    for page in pages {
        for obj in page.contents() {
            let Some(key) = obj.key() else { continue };
            let name = key.strip_prefix(&list_prefix).unwrap_or(key);
            let name = if name.is_empty() { key.rsplit('/').next().unwrap_or(key) } else { name };
            if name.contains('/') || !is_model_file(name) {
                continue;
            }
            out.push(Object {
                key: key.to_string(),
                name: name.to_string(),
                size: obj.size().unwrap_or(0).max(0) as u64,
                etag: obj.e_tag().unwrap_or("").trim_matches('"').to_string(),
            });
        }
    }
    if out.is_empty() {
        return Err(LoadError::NoSuchKey { bucket: bucket.into(), prefix: prefix.into() });
    }
    Ok(out)
}

/// Refuses, before any weight is downloaded, a model that would be refused after it: one
/// without a manifest when a manifest is required, and with trusted keys, one whose manifest
/// is unsigned or not validly signed by a trusted key. One LIST, and with keys two small GETs.
/// The manifest that is downloaded with the weights is checked again: it could change between.
/// A `.gguf` key on its own has no place for a manifest (put it in a folder with one).
/// Answers the listing, which the download then uses instead of listing again (a LIST is a
/// round trip on the cold-start path).
pub async fn check_before_download(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    require_manifest: bool,
    trusted: &crate::signing::TrustedKeys,
) -> Result<Vec<Object>> {
    use crate::manifest::MANIFEST_FILE;
    use crate::signing::SIGNATURE_FILE;

    let model = format!("s3://{bucket}/{prefix}");
    let objects = list(client, bucket, prefix).await?;
    let find = |name: &str| objects.iter().find(|o| o.name == name);
    let Some(manifest) = find(MANIFEST_FILE) else {
        if require_manifest || !trusted.is_empty() {
            return Err(LoadError::ManifestRequired(model));
        }
        return Ok(objects);
    };
    if trusted.is_empty() {
        return Ok(objects);
    }
    let Some(signature) = find(SIGNATURE_FILE) else {
        return Err(LoadError::Unsigned(model));
    };
    let (manifest, signature) = futures::future::try_join(
        get_range(client, bucket, &manifest.key, 0, manifest.size),
        get_range(client, bucket, &signature.key, 0, signature.size),
    )
    .await?;
    trusted.verify(&model, &manifest, Some(&signature))?;
    Ok(objects)
}

/// The objects of `listed`, or a fresh LIST when there is none.
async fn listing(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    listed: Option<Vec<Object>>,
) -> Result<Vec<Object>> {
    match listed {
        Some(objects) => Ok(objects),
        None => list(client, bucket, prefix).await,
    }
}

/// The bytes `[start, end)` of an object, in parallel with nothing: one ranged GET (resumed
/// if the connection drops, see [`get_into`]).
async fn get_range(client: &aws_sdk_s3::Client, bucket: &str, key: &str, start: u64, end: u64) -> Result<bytes::Bytes> {
    let mut buf = vec![0u8; end.saturating_sub(start) as usize];
    get_into(client, bucket, key, start, &mut buf).await?;
    Ok(bytes::Bytes::from(buf))
}

/// Logs how much came down and how fast.
fn log_download(bucket: &str, prefix: &str, total: u64, started: Instant, what: &'static str) {
    let secs = started.elapsed().as_secs_f64();
    let mb_per_s = total as f64 / 1e6 / secs.max(1e-9);
    tracing::info!(bucket, prefix, bytes = total, seconds = secs, mb_per_s, "{what}");
}

/// What [`fetch_streaming`] answers.
pub struct Streamed {
    /// The small files (config, tokenizer, manifest), in memory.
    pub files: ModelFiles,
    /// The weights, on the sink's device.
    pub tensors: std::collections::HashMap<String, candle_core::Tensor>,
    /// Whether a manifest was there and every file matched it.
    pub verified: bool,
}

/// Downloads `s3://bucket/prefix` with the safetensors weights going straight into `sink` as
/// their bytes arrive (see [`crate::stream`]): parts are fetched `concurrency` at a time but
/// consumed in order, hashed for the manifest on the way, so nothing waits for a whole file
/// and no whole weights file is ever in host memory. A file that does not match the manifest
/// is refused before any model is built from it. GGUF models are not streamed.
pub async fn fetch_streaming(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    opts: &FetchOptions,
    trusted: &crate::signing::TrustedKeys,
    sink: &mut dyn crate::stream::TensorSink,
    listed: Option<Vec<Object>>,
) -> Result<Streamed> {
    use sha2::Digest;

    use crate::manifest::{FileDigest, Manifest, MANIFEST_FILE};
    use crate::stream::{Offset, SafetensorsStream};

    let started = Instant::now();
    let objects = listing(client, bucket, prefix, listed).await?;
    let (mut weights, small): (Vec<Object>, Vec<Object>) =
        objects.into_iter().partition(|o| o.name.ends_with(".safetensors"));
    if weights.is_empty() {
        return Err(LoadError::BadConfig(format!(
            "s3://{bucket}/{prefix} has no .safetensors weights to stream to the device (GGUF models load through host memory)"
        )));
    }
    weights.sort_by(|a, b| a.name.cmp(&b.name));
    let small_bytes =
        futures::future::try_join_all(small.iter().map(|o| get_range(client, bucket, &o.key, 0, o.size))).await?;
    let mut files = ModelFiles { origin: format!("s3://{bucket}/{prefix}"), ..Default::default() };
    for (o, b) in small.iter().zip(small_bytes) {
        files.files.push((o.name.clone(), FileBytes::Owned(b.to_vec())));
    }
    files.files.sort_by(|a, b| a.0.cmp(&b.0));
    // The weights go to the device as they arrive: the signature is checked before the first.
    files.verify_signature(trusted)?;
    let manifest = files.get(MANIFEST_FILE).map(Manifest::from_json).transpose()?;
    if let Some(m) = &manifest {
        for listed in m.files.keys() {
            if files.get(listed).is_none() && !weights.iter().any(|w| &w.name == listed) {
                return Err(LoadError::ManifestFileMissing(listed.clone()));
            }
        }
        let unlisted = |n: &str| n == MANIFEST_FILE || n == crate::signing::SIGNATURE_FILE;
        for (name, bytes) in files.files.iter().filter(|(n, _)| !unlisted(n)) {
            m.check_bytes(name, bytes)?;
        }
    }
    let total: u64 = weights.iter().map(|o| o.size).sum();
    let bar = progress_bar(opts.progress, total);
    let mut base = 0;
    for obj in &weights {
        let mut parser = SafetensorsStream::new(&obj.name);
        let mut hasher = sha2::Sha256::new();
        // With chunk digests each part is one chunk, checked before it reaches the device.
        let chunked = manifest.as_ref().and_then(|m| m.files.get(&obj.name)).and_then(FileDigest::chunking);
        let part = chunked.unwrap_or(opts.part_size.max(1) as u64);
        let ranges: Vec<(u64, u64)> =
            (0..obj.size.div_ceil(part)).map(|p| (p * part, ((p + 1) * part).min(obj.size))).collect();
        let mut parts = futures::stream::iter(
            ranges.into_iter().map(|(start, end)| get_range(client, bucket, &obj.key, start, end)),
        )
        .buffered(opts.concurrency.max(1));
        let mut index = 0;
        while let Some(bytes) = parts.next().await {
            let bytes = bytes?;
            match (&manifest, chunked) {
                (Some(m), Some(_)) => m.check_chunk(&obj.name, index, &bytes)?,
                _ => hasher.update(&bytes),
            }
            index += 1;
            parser.feed(&bytes, &mut Offset { sink: &mut *sink, base })?;
            bar.inc(bytes.len() as u64);
        }
        parser.finish()?;
        base += parser.tensor_count();
        if let (Some(m), None) = (&manifest, chunked) {
            let digest = FileDigest::whole(hex::encode(hasher.finalize()), obj.size);
            m.check(&obj.name, &digest)?;
        }
    }
    bar.finish_and_clear();
    let tensors = sink.finish()?;
    log_download(bucket, prefix, total, started, "model streamed to the device");
    Ok(Streamed { files, tensors, verified: manifest.is_some() })
}

/// Downloads (or takes from the local tier) every model file under `s3://bucket/prefix`: see
/// [`crate::fetch`].
pub async fn fetch(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str, opts: &FetchOptions) -> Result<ModelFiles> {
    fetch_listed(client, bucket, prefix, opts, None).await
}

/// [`fetch`] with the objects already listed (by [`check_before_download`]), or listing them.
pub async fn fetch_listed(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    opts: &FetchOptions,
    listed: Option<Vec<Object>>,
) -> Result<ModelFiles> {
    let started = Instant::now();
    let objects = listing(client, bucket, prefix, listed).await?;
    let list_s = started.elapsed().as_secs_f64();
    let (large, small): (Vec<Object>, Vec<Object>) = objects.into_iter().partition(|o| is_weights(&o.name));
    let ggufs: Vec<String> = large.iter().filter(|o| o.name.ends_with(".gguf")).map(|o| o.name.clone()).collect();
    if ggufs.len() > 1 {
        return Err(LoadError::AmbiguousModel { dir: format!("s3://{bucket}/{prefix}").into(), files: ggufs });
    }
    let small_bytes =
        futures::future::try_join_all(small.iter().map(|o| get_range(client, bucket, &o.key, 0, o.size))).await?;
    let mut files = ModelFiles { origin: format!("s3://{bucket}/{prefix}"), ..Default::default() };
    for (o, b) in small.iter().zip(small_bytes) {
        files.files.push((o.name.clone(), FileBytes::Owned(b.to_vec())));
    }
    let small_s = started.elapsed().as_secs_f64() - list_s;
    if large.iter().any(|o| o.name.ends_with(".safetensors")) {
        files.parse_tokenizer_early();
    }
    let job = crate::fetch::Fill {
        client: client.clone(),
        bucket: bucket.to_string(),
        objects: large
            .into_iter()
            .map(|o| crate::fetch::Remote { key: o.key, name: o.name, size: o.size, etag: o.etag })
            .collect(),
        opts: opts.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let mut filled = tokio::task::spawn_blocking(move || crate::fetch::fill(job, files))
        .await
        .map_err(|e| LoadError::BadConfig(format!("the download task failed: {e}")))??;
    filled.stats.list_s = list_s;
    filled.stats.small_s = small_s;
    let stats = &filled.stats;
    let total = stats.downloaded_bytes;
    if total > 0 {
        log_download(bucket, prefix, total, started, "model downloaded");
    }
    Ok(filled)
}

/// Weights files: the large ones, fetched into place in parallel parts.
fn is_weights(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".gguf")
}

/// Writes the object's bytes `[start, start + dest.len())` into `dest` as they arrive, one
/// copy from the network buffers. A connection that drops mid-body resumes from the last byte
/// written, up to [`RESUME_ATTEMPTS`] times without progress; then the error says where it
/// stopped.
pub(crate) async fn get_into(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    start: u64,
    dest: &mut [u8],
) -> Result<()> {
    get_into_hashing(client, bucket, key, start, dest, None).await
}

/// How many landed bytes [`get_into_hashing`] lets wait before it hashes them: enough for
/// BLAKE3's widest SIMD path (16 chunks of 1 KiB), few enough to be still in the core's cache.
const HASH_STEP: usize = 64 << 10;

/// [`get_into`] that also feeds every byte, in order, to `hasher` as it lands, while the bytes
/// are still in cache: hashing then costs no second pass over memory, and the part's digest is
/// ready with its last byte.
pub(crate) async fn get_into_hashing(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    start: u64,
    dest: &mut [u8],
    mut hasher: Option<&mut blake3::Hasher>,
) -> Result<()> {
    let mut at = 0usize;
    let mut hashed = 0usize;
    let mut failures = 0;
    while at < dest.len() {
        let (written, outcome) =
            get_some(client, bucket, key, start, dest, at, &mut hashed, hasher.as_deref_mut()).await;
        at += written;
        match outcome {
            Ok(()) if at == dest.len() => break,
            Ok(()) => {}
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => {
                if written > 0 {
                    failures = 0;
                }
                failures += 1;
                if failures > RESUME_ATTEMPTS {
                    return Err(LoadError::S3 {
                        bucket: bucket.into(),
                        key: key.into(),
                        message: format!(
                            "the download stopped at byte {} of the part at {start} ({} bytes) after {RESUME_ATTEMPTS} attempts to resume: {e}",
                            start + at as u64,
                            dest.len()
                        ),
                        retryable: true,
                    });
                }
                tracing::warn!(bucket, key, at = start + at as u64, error = %e, "download interrupted; resuming from the last byte received");
            }
        }
    }
    if let Some(h) = hasher {
        h.update(&dest[hashed..]);
    }
    Ok(())
}

/// Tries to resume a part this many times in a row without receiving a byte.
const RESUME_ATTEMPTS: u32 = 3;

/// One ranged GET into `part[from..]` (the object's bytes from `part_start + from`): how many
/// bytes landed, and how it ended (a body shorter than asked is a retryable error). With a
/// hasher, `part[*hashed..]` is hashed whenever [`HASH_STEP`] bytes wait.
#[allow(clippy::too_many_arguments)]
async fn get_some(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    part_start: u64,
    part: &mut [u8],
    from: usize,
    hashed: &mut usize,
    mut hasher: Option<&mut blake3::Hasher>,
) -> (usize, Result<()>) {
    let start = part_start + from as u64;
    let (before, dest) = part.split_at_mut(from);
    let end = start + dest.len() as u64;
    let resp =
        match client.get_object().bucket(bucket).key(key).range(format!("bytes={}-{}", start, end - 1)).send().await {
            Ok(r) => r,
            Err(e) => return (0, Err(s3_error("GetObject", bucket, key, e))),
        };
    let mut body = resp.body;
    let mut at = 0usize;
    loop {
        match body.try_next().await {
            Ok(Some(bytes)) => {
                let Some(slot) = dest.get_mut(at..at + bytes.len()) else {
                    let message = format!("asked for {} bytes at {start}, got more", dest.len());
                    return (
                        at,
                        Err(LoadError::S3 { bucket: bucket.into(), key: key.into(), message, retryable: false }),
                    );
                };
                slot.copy_from_slice(&bytes);
                at += bytes.len();
                if let Some(h) = hasher.as_deref_mut() {
                    // Bytes before `from` landed in an earlier GET of this part.
                    let waiting = from + at - *hashed;
                    if waiting >= HASH_STEP {
                        let first = hashed.saturating_sub(from);
                        if *hashed < from {
                            h.update(&before[*hashed..]);
                        }
                        h.update(&dest[first..at]);
                        *hashed = from + at;
                    }
                }
            }
            Ok(None) if at == dest.len() => return (at, Ok(())),
            Ok(None) => {
                let message = format!("the body ended after {at} of {} bytes", dest.len());
                return (at, Err(LoadError::S3 { bucket: bucket.into(), key: key.into(), message, retryable: true }));
            }
            Err(e) => {
                let message = format!("reading the body: {e}");
                return (at, Err(LoadError::S3 { bucket: bucket.into(), key: key.into(), message, retryable: true }));
            }
        }
    }
}

pub(crate) fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    if !enabled || total == 0 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = crate::progress::add(indicatif::ProgressBar::new(total));
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("downloading model");
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_urls() {
        assert_eq!(parse_s3_url("s3://b/models/x/"), Some(("b".into(), "models/x".into())));
        assert_eq!(parse_s3_url("s3://b"), Some(("b".into(), "".into())));
        assert_eq!(parse_s3_url("s3:///x"), None);
        assert_eq!(parse_s3_url("/tmp/x"), None);
    }
}
