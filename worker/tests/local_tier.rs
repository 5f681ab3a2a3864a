//! Cold start from S3 (moto on 127.0.0.1) with chunk digests and the local tier, as a user
//! meets it: a flipped byte in any chunk is refused naming the file and the chunk (downloaded,
//! streamed, or cached and changed on disk afterwards); a download cut mid-body resumes, and
//! one that cannot resume fails saying where it stopped; two processes filling one cache both
//! get a good model; a full cache evicts the least recently used model, never one in use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use aws_sdk_s3::primitives::ByteStream;
use ember_engine::{Engine, GenerateRequest, Prompt, SamplingParams};
use ember_model_loader::manifest::{Manifest, CHUNK_SIZE};
use ember_model_loader::{load, DTypeChoice, FetchOptions, LoadError, LoadOptions, Message, ModelRef, StreamWeights};
use ember_tests::{aws_config_for, aws_env, model_path, smollm_hf, test_seed, MotoServer};

const ANSWER: &str = "The capital of France is Paris.";

fn s3_client(aws: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(aws).force_path_style(true).build())
}

/// Copies `files` into a temporary folder and writes a manifest with chunk digests there.
fn with_chunked_manifest(files: &[(&str, PathBuf)]) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for (name, path) in files {
        std::fs::copy(path, dir.path().join(name))?;
    }
    let manifest = Manifest::write_for_dir(dir.path())?;
    let weights = manifest.files.values().find(|d| d.size > CHUNK_SIZE);
    assert!(weights.is_some_and(|d| d.chunking() == Some(CHUNK_SIZE)), "the manifest must have chunk digests");
    Ok(dir)
}

/// The f16 model's folder with a chunked manifest.
fn f16_model() -> anyhow::Result<tempfile::TempDir> {
    let hf = smollm_hf("f16")?;
    let names = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"];
    with_chunked_manifest(&names.map(|n| (n, hf.join(n))))
}

async fn upload(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str, dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let body = ByteStream::from_path(&path).await?;
        s3.put_object().bucket(bucket).key(format!("{prefix}/{name}")).body(body).send().await?;
    }
    Ok(())
}

fn options(aws: &aws_config::SdkConfig, cache: Option<&Path>) -> LoadOptions {
    LoadOptions {
        dtype: DTypeChoice::F16,
        aws: Some(aws.clone()),
        fetch: FetchOptions { cache_dir: cache.map(Path::to_path_buf), progress: false, ..Default::default() },
        ..Default::default()
    }
}

fn answer(engine: &Engine) -> anyhow::Result<String> {
    let req = GenerateRequest {
        allow_special_tokens: false,
        prompt_ids: None,
        prompt: Prompt::Chat(vec![Message::new("user", "What is the capital of France?")]),
        max_tokens: 16,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    Ok(engine.generate(&req)?.text)
}

fn flip(path: &Path, at: u64) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(path)?;
    bytes[at as usize] ^= 0x40;
    std::fs::write(path, bytes)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_any_chunk_is_refused_naming_file_and_chunk() -> anyhow::Result<()> {
    let seed = test_seed("a_flipped_byte_in_any_chunk_is_refused_naming_file_and_chunk");
    let moto = MotoServer::start()?;
    let aws = moto.aws_config().await;
    let s3 = s3_client(&aws);
    s3.create_bucket().bucket("weights").send().await?;
    let model = f16_model()?;
    upload(&s3, "weights", "m", model.path()).await?;
    let reference: ModelRef = "s3://weights/m".parse()?;
    let weights = model.path().join("model.safetensors");
    let size = std::fs::metadata(&weights)?.len();
    let chunks = size.div_ceil(CHUNK_SIZE);

    // Cached and verified; then a byte of a cached chunk changes on disk. The next start sees
    // that the file changed since it was verified, hashes it, drops it and downloads it again.
    let cache = tempfile::tempdir()?;
    let first = load(&reference, &options(&aws, Some(cache.path()))).await?;
    assert!(first.verified);
    assert_eq!(first.timings.fetch.downloaded_bytes, size);
    drop(first);
    let cached = std::fs::read_dir(cache.path())?
        .flatten()
        .map(|e| e.path().join("model.safetensors"))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("no cached model.safetensors"))?;
    let bad_cached = seed % chunks;
    flip(&cached, bad_cached * CHUNK_SIZE + (seed >> 8) % CHUNK_SIZE.min(size - bad_cached * CHUNK_SIZE))?;
    let again = load(&reference, &options(&aws, Some(cache.path()))).await?;
    let f = &again.timings.fetch;
    assert_eq!((f.rehashed_bytes, f.downloaded_bytes, f.cached_bytes), (size, size, 0), "{f:?}");
    assert_eq!(answer(&Engine::new(again))?, ANSWER);
    // And the start after that maps it without hashing.
    let warm = load(&reference, &options(&aws, Some(cache.path()))).await?;
    let f = &warm.timings.fetch;
    assert_eq!((f.rehashed_bytes, f.downloaded_bytes, f.cached_bytes), (0, 0, size), "{f:?}");
    drop(warm);

    // One flipped byte in S3, in a chunk chosen by the seed: refused on the download path and
    // on the streamed path, naming the file and that chunk.
    let bad = (seed / 7) % chunks;
    let at = bad * CHUNK_SIZE + (seed >> 16) % CHUNK_SIZE.min(size - bad * CHUNK_SIZE);
    let mut spoiled = std::fs::read(&weights)?;
    spoiled[at as usize] ^= 0x01;
    s3.put_object().bucket("weights").key("m/model.safetensors").body(ByteStream::from(spoiled)).send().await?;
    for stream in [StreamWeights::Never, StreamWeights::Always] {
        let opts = LoadOptions { stream, ..options(&aws, None) };
        let err = load(&reference, &opts).await.err();
        let text = err.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(
            matches!(&err, Some(LoadError::ChunkMismatch { file, chunk, .. }) if file == "model.safetensors" && *chunk as u64 == bad),
            "{stream:?}: byte {at} is in chunk {bad}: {err:?}"
        );
        assert!(text.contains("`model.safetensors`") && text.contains(&format!("chunk {bad} ")), "{text}");
    }
    // The cache holds the good copy; a changed object in S3 (new ETag) is not served from it.
    let err = load(&reference, &options(&aws, Some(cache.path()))).await.err();
    assert!(matches!(&err, Some(LoadError::ChunkMismatch { .. })), "{err:?}");
    Ok(())
}

/// A TCP proxy in front of moto that cuts ranged GETs of more than 4 MiB (the weights'
/// parts, not the small files): the first `cut_first` such responses are closed after `after`
/// bytes.
struct CuttingProxy {
    port: u16,
    cuts: Arc<AtomicUsize>,
}

/// Whether an HTTP request asks for a byte range longer than 4 MiB.
fn big_range(request: &[u8]) -> bool {
    let text = String::from_utf8_lossy(request).to_ascii_lowercase();
    let Some(at) = text.find("range: bytes=") else { return false };
    let range = text[at + 13..].split("\r\n").next().unwrap_or_default().to_string();
    let mut ends = range.split('-').map(|n| n.trim().parse::<u64>().ok());
    matches!((ends.next().flatten(), ends.next().flatten()), (Some(a), Some(b)) if b - a > 4 << 20)
}

impl CuttingProxy {
    async fn start(upstream: u16, after: u64, cut_first: usize) -> anyhow::Result<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let budget = Arc::new(AtomicU64::new(cut_first as u64));
        let counter = cuts.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (counter, budget) = (counter.clone(), budget.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    // Requests go up unchanged; a large ranged GET marks its response for cutting
                    // (the flag is set before the request is forwarded, so before its response).
                    let marked = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let mark = marked.clone();
                    let up = tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if big_range(&buf[..n]) {
                                mark.store(true, Ordering::SeqCst);
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                    let mut sent = 0u64;
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if marked.load(Ordering::SeqCst) {
                            let room = after.saturating_sub(sent) as usize;
                            if n > room && budget.load(Ordering::SeqCst) > 0 {
                                budget.fetch_sub(1, Ordering::SeqCst);
                                counter.fetch_add(1, Ordering::SeqCst);
                                let _ = cw.write_all(&buf[..room]).await;
                                break; // drop both halves: the client sees the response end early
                            }
                            sent += n as u64;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        Ok(Self { port, cuts })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_cut_mid_body_resumes_and_one_that_cannot_fails_saying_where() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let aws = moto.aws_config().await;
    let s3 = s3_client(&aws);
    s3.create_bucket().bucket("weights").send().await?;
    let model = f16_model()?;
    upload(&s3, "weights", "m", model.path()).await?;
    let reference: ModelRef = "s3://weights/m".parse()?;

    // Three responses cut 1 MiB in: each part resumes from its last byte.
    let proxy = CuttingProxy::start(moto.port, 1 << 20, 3).await?;
    let through = aws_config_for(&format!("http://127.0.0.1:{}", proxy.port)).await;
    let loaded = load(&reference, &options(&through, None)).await?;
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 3, "the proxy must have cut three responses");
    assert!(loaded.verified);
    assert_eq!(answer(&Engine::new(loaded))?, ANSWER);

    // Every response cut before its body: no part can make progress, and the error says so.
    let proxy = CuttingProxy::start(moto.port, 100, usize::MAX).await?;
    let through = aws_config_for(&format!("http://127.0.0.1:{}", proxy.port)).await;
    let err = load(&reference, &options(&through, None)).await.err();
    let text = err.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(text.contains("s3://weights/m/model.safetensors"), "{text}");
    assert!(text.contains("the download stopped at byte"), "{text}");
    Ok(())
}

/// Two `ember generate` processes start the same model on one empty cache at once.
#[tokio::test(flavor = "multi_thread")]
async fn two_processes_filling_one_cache_both_get_a_good_model() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let aws = moto.aws_config().await;
    let s3 = s3_client(&aws);
    s3.create_bucket().bucket("weights").send().await?;
    let model = f16_model()?;
    upload(&s3, "weights", "m", model.path()).await?;
    let cache = tempfile::tempdir()?;
    let spawn = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.args(["generate", "--model", "s3://weights/m", "--dtype", "f16", "--no-progress"])
            .args(["--prompt", "What is the capital of France?", "--max-tokens", "16"])
            .arg("--cache-dir")
            .arg(cache.path())
            .env("EMBER_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in aws_env(&moto.endpoint()) {
            cmd.env(k, v);
        }
        cmd.spawn()
    };
    let (a, b) = (spawn()?, spawn()?);
    for child in [a, b] {
        let out = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ANSWER, "{stderr}");
    }
    // One copy, no partial file left behind.
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.path())?.flatten().map(|e| e.path()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let names: Vec<String> =
        std::fs::read_dir(&entries[0])?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".partial-")), "{names:?}");
    assert!(names.iter().any(|n| n == "model.safetensors"), "{names:?}");
    Ok(())
}

/// Which models (by S3 URL) the cache holds.
fn cached_models(cache: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(cache)?.flatten() {
        let Ok(text) = std::fs::read(entry.path().join("entry.json")) else { continue };
        let record: serde_json::Value = serde_json::from_slice(&text)?;
        out.push(record["origin"].as_str().unwrap_or_default().to_string());
    }
    out.sort();
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_cache_evicts_the_least_recently_used_model_never_one_in_use() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let aws = moto.aws_config().await;
    let s3 = s3_client(&aws);
    s3.create_bucket().bucket("weights").send().await?;
    let gguf = model_path("q4_0.gguf")?;
    let model = with_chunked_manifest(&[("model.gguf", gguf.clone())])?;
    for prefix in ["a", "b", "c"] {
        upload(&s3, "weights", prefix, model.path()).await?;
    }
    let size = std::fs::metadata(&gguf)?.len();
    let cache = tempfile::tempdir()?;
    // Room for one and a half models.
    let opts = LoadOptions {
        dtype: DTypeChoice::Auto,
        fetch: FetchOptions { cache_max_bytes: Some(size * 3 / 2), ..options(&aws, Some(cache.path())).fetch },
        ..options(&aws, None)
    };
    let a = load(&"s3://weights/a".parse()?, &opts).await?;
    // `a` is in use: filling `b` cannot evict it (the cache goes over its limit instead).
    let b = load(&"s3://weights/b".parse()?, &opts).await?;
    assert_eq!(cached_models(cache.path())?, ["s3://weights/a", "s3://weights/b"]);
    // `a` is released and is the least recently used; `b` is still in use. Filling `c`
    // evicts `a` only.
    drop(a);
    let c = load(&"s3://weights/c".parse()?, &opts).await?;
    assert_eq!(cached_models(cache.path())?, ["s3://weights/b", "s3://weights/c"]);
    assert_eq!(answer(&Engine::new(c))?, answer(&Engine::new(b))?);
    Ok(())
}
