//! Fetching a model from S3: one listing, then parallel ranged GETs of every file into
//! memory, with a progress bar and a local cache keyed by ETag and size so a warm start
//! downloads nothing.

use std::path::{Path, PathBuf};
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
    /// Where downloaded files are kept for the next start; None disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self { part_size: 16 << 20, concurrency: 8, cache_dir: None, progress: true }
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

struct Object {
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

/// Whether the model at `prefix` has an `ember-manifest.json` beside its files: one LIST
/// request, so a model that must be verified is refused before any weight is downloaded. A
/// `.gguf` key on its own has no place for a manifest (put it in a folder with one).
pub async fn has_manifest(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Result<bool> {
    let objects = list(client, bucket, prefix).await?;
    Ok(objects.iter().any(|o| o.name == crate::manifest::MANIFEST_FILE))
}

fn cache_paths(dir: &Path, bucket: &str, key: &str) -> (PathBuf, PathBuf) {
    let file = dir.join(bucket).join(key);
    let tag = dir.join(bucket).join(format!("{key}.ember-etag"));
    (file, tag)
}

fn cache_tag(obj: &Object) -> String {
    format!("{} {}", obj.etag, obj.size)
}

fn cached(dir: &Path, bucket: &str, obj: &Object) -> Option<FileBytes> {
    let (file, tag) = cache_paths(dir, bucket, &obj.key);
    let stored = std::fs::read_to_string(&tag).ok()?;
    if stored.trim() != cache_tag(obj) || obj.etag.is_empty() {
        return None;
    }
    let bytes = FileBytes::map(&file).ok()?;
    (bytes.len() as u64 == obj.size).then_some(bytes)
}

/// Writes to a temporary name and renames, so a reader never maps a half-written file.
fn store(dir: &Path, bucket: &str, obj: &Object, bytes: &[u8]) -> std::io::Result<()> {
    let (file, tag) = cache_paths(dir, bucket, &obj.key);
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = file.with_extension(format!("part-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &file)?;
    std::fs::write(tag, cache_tag(obj))
}

/// One ranged GET, `[start, end)`, checked for length.
async fn get_range(client: &aws_sdk_s3::Client, bucket: &str, key: &str, start: u64, end: u64) -> Result<bytes::Bytes> {
    if end <= start {
        return Ok(bytes::Bytes::new()); // an empty file: S3 refuses a range of nothing
    }
    let resp = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .range(format!("bytes={}-{}", start, end - 1))
        .send()
        .await
        .map_err(|e| s3_error("GetObject", bucket, key, e))?;
    let body = resp.body.collect().await.map_err(|e| LoadError::S3 {
        bucket: bucket.into(),
        key: key.into(),
        message: format!("reading the body: {e}"),
        retryable: true,
    })?;
    let bytes = body.into_bytes();
    if bytes.len() as u64 != end - start {
        return Err(LoadError::S3 {
            bucket: bucket.into(),
            key: key.into(),
            message: format!("asked for {} bytes at {start}, got {}", end - start, bytes.len()),
            retryable: true,
        });
    }
    Ok(bytes)
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
    sink: &mut dyn crate::stream::TensorSink,
) -> Result<Streamed> {
    use sha2::Digest;

    use crate::manifest::{digest_bytes, FileDigest, Manifest, MANIFEST_FILE};
    use crate::stream::{Offset, SafetensorsStream};

    let started = Instant::now();
    let objects = list(client, bucket, prefix).await?;
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
    let mut files = ModelFiles { origin: format!("s3://{bucket}/{prefix}"), files: Vec::new() };
    for (o, b) in small.iter().zip(small_bytes) {
        files.files.push((o.name.clone(), FileBytes::Owned(b.to_vec())));
    }
    files.files.sort_by(|a, b| a.0.cmp(&b.0));
    let manifest = files.get(MANIFEST_FILE).map(Manifest::from_json).transpose()?;
    if let Some(m) = &manifest {
        for listed in m.files.keys() {
            if files.get(listed).is_none() && !weights.iter().any(|w| &w.name == listed) {
                return Err(LoadError::ManifestFileMissing(listed.clone()));
            }
        }
        for (name, bytes) in files.files.iter().filter(|(n, _)| n != MANIFEST_FILE) {
            m.check(name, &digest_bytes(bytes))?;
        }
    }
    let total: u64 = weights.iter().map(|o| o.size).sum();
    let bar = progress_bar(opts.progress, total);
    let part = opts.part_size.max(1) as u64;
    let mut base = 0;
    for obj in &weights {
        let mut parser = SafetensorsStream::new(&obj.name);
        let mut hasher = sha2::Sha256::new();
        let ranges: Vec<(u64, u64)> =
            (0..obj.size.div_ceil(part)).map(|p| (p * part, ((p + 1) * part).min(obj.size))).collect();
        let mut parts = futures::stream::iter(
            ranges.into_iter().map(|(start, end)| get_range(client, bucket, &obj.key, start, end)),
        )
        .buffered(opts.concurrency.max(1));
        while let Some(bytes) = parts.next().await {
            let bytes = bytes?;
            hasher.update(&bytes);
            parser.feed(&bytes, &mut Offset { sink: &mut *sink, base })?;
            bar.inc(bytes.len() as u64);
        }
        parser.finish()?;
        base += parser.tensor_count();
        if let Some(m) = &manifest {
            m.check(&obj.name, &FileDigest { sha256: hex::encode(hasher.finalize()), size: obj.size })?;
        }
    }
    bar.finish_and_clear();
    let tensors = sink.finish()?;
    log_download(bucket, prefix, total, started, "model streamed to the device");
    Ok(Streamed { files, tensors, verified: manifest.is_some() })
}

/// Downloads (or takes from the cache) every model file under `s3://bucket/prefix`.
pub async fn fetch(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str, opts: &FetchOptions) -> Result<ModelFiles> {
    let started = Instant::now();
    let objects = list(client, bucket, prefix).await?;
    let mut files = ModelFiles { origin: format!("s3://{bucket}/{prefix}"), files: Vec::new() };
    let mut to_fetch = Vec::new();
    for obj in objects {
        match opts.cache_dir.as_deref().and_then(|d| cached(d, bucket, &obj)) {
            Some(bytes) => files.files.push((obj.name.clone(), bytes)),
            None => to_fetch.push(obj),
        }
    }
    let total: u64 = to_fetch.iter().map(|o| o.size).sum();
    let bar = progress_bar(opts.progress, total);
    let part = opts.part_size.max(1) as u64;
    let ranges: Vec<(usize, u64, u64)> = to_fetch
        .iter()
        .enumerate()
        .flat_map(|(i, o)| (0..o.size.div_ceil(part)).map(move |p| (i, p * part, ((p + 1) * part).min(o.size))))
        .collect();
    let mut buffers: Vec<Vec<u8>> = to_fetch.iter().map(|o| vec![0u8; o.size as usize]).collect();
    let mut parts = futures::stream::iter(ranges.into_iter().map(|(i, start, end)| {
        let key = &to_fetch[i].key;
        async move { Ok::<_, LoadError>((i, start, end, get_range(client, bucket, key, start, end).await?)) }
    }))
    .buffer_unordered(opts.concurrency.max(1));
    while let Some(res) = parts.next().await {
        let (i, start, end, bytes) = res?;
        buffers[i][start as usize..end as usize].copy_from_slice(&bytes);
        bar.inc(bytes.len() as u64);
    }
    drop(parts);
    bar.finish_and_clear();
    log_download(bucket, prefix, total, started, "model downloaded");
    for (obj, buf) in to_fetch.iter().zip(buffers) {
        if let Some(dir) = &opts.cache_dir {
            if let Err(e) = store(dir, bucket, obj, &buf) {
                tracing::warn!(key = obj.key, error = %e, "could not write the download cache");
            }
        }
        files.files.push((obj.name.clone(), FileBytes::Owned(buf)));
    }
    files.files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
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
