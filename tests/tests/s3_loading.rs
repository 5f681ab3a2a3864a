//! Loading the real model from S3 (moto on 127.0.0.1): same answer as from disk, a corrupted
//! byte refused by the manifest, a warm start served from the local tier; and the streaming
//! path CUDA uses (weights to the device as the parts arrive), run here with its CPU sink.

use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;
use ember_engine::{Engine, GenerateRequest, Prompt, SamplingParams};
use ember_model_loader::manifest::{Manifest, MANIFEST_FILE};
use ember_model_loader::{load, DTypeChoice, FetchOptions, LoadError, LoadOptions, Message, ModelRef, StreamWeights};
use ember_tests::{smollm_hf, MotoServer};

async fn upload_dir(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str, dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        s3.put_object()
            .bucket(bucket)
            .key(format!("{prefix}/{name}"))
            .body(ByteStream::from_path(&path).await?)
            .send()
            .await?;
    }
    Ok(())
}

/// moto on 127.0.0.1 with the f16 model uploaded to s3://weights/smollm2 (with its manifest):
/// the server (keep it alive), its AWS configuration, an S3 client and the model's local folder.
async fn model_in_moto() -> anyhow::Result<(MotoServer, aws_config::SdkConfig, aws_sdk_s3::Client, std::path::PathBuf)>
{
    let moto = MotoServer::start()?;
    let aws = moto.aws_config().await;
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&aws).force_path_style(true).build());
    s3.create_bucket().bucket("weights").send().await?;
    let dir = smollm_hf("f16")?;
    upload_dir(&s3, "weights", "smollm2", &dir).await?;
    Ok((moto, aws, s3, dir))
}

/// The load failed on `model.safetensors`' byte `at`: in the chunk that holds it when the
/// model's manifest has chunk digests (`ember model import-gguf` writes them), else the file.
fn assert_refused_at(err: &Option<LoadError>, dir: &Path, at: u64) -> anyhow::Result<()> {
    let manifest = Manifest::from_json(&std::fs::read(dir.join(MANIFEST_FILE))?)?;
    match (manifest.entry("model.safetensors")?.chunking(), err) {
        (Some(size), Some(LoadError::ChunkMismatch { file, chunk, start, end, .. })) => {
            assert_eq!(file, "model.safetensors");
            assert_eq!(*chunk as u64, at / size, "the flipped byte {at} is in chunk {}", at / size);
            assert!((*start..*end).contains(&at), "{err:?}");
        }
        (None, Some(LoadError::ChecksumMismatch { file, .. })) => assert_eq!(file, "model.safetensors"),
        (chunking, _) => panic!("byte {at} flipped (chunk size {chunking:?}): expected its refusal, got {err:?}"),
    }
    Ok(())
}

fn options(aws: aws_config::SdkConfig, cache: Option<&Path>) -> LoadOptions {
    LoadOptions {
        dtype: DTypeChoice::F16,
        aws: Some(aws),
        // Small parts so the model arrives in many parallel ranged GETs.
        fetch: FetchOptions {
            part_size: 8 << 20,
            concurrency: 8,
            cache_dir: cache.map(Path::to_path_buf),
            progress: false,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn answer(engine: &Engine) -> anyhow::Result<String> {
    let req = GenerateRequest {
        allow_special_tokens: false,
        prompt_ids: None,
        prompt: Prompt::Chat(vec![Message::new("user", "What is the capital of France?")]),
        max_tokens: 32,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    Ok(engine.generate(&req)?.text)
}

#[tokio::test(flavor = "multi_thread")]
async fn model_from_s3_matches_disk_and_is_verified() -> anyhow::Result<()> {
    let (_moto, aws, s3, dir) = model_in_moto().await?;

    let cache = tempfile::tempdir()?;
    let reference: ModelRef = "s3://weights/smollm2".parse()?;
    let loaded = load(&reference, &options(aws.clone(), Some(cache.path()))).await?;
    assert!(loaded.verified, "the manifest was uploaded, so every file must be verified");
    let from_s3 = answer(&Engine::new(loaded))?;
    let from_disk = answer(&Engine::new(
        load(&ModelRef::Local(dir.clone()), &LoadOptions { dtype: DTypeChoice::F16, ..Default::default() }).await?,
    ))?;
    assert_eq!(from_s3, "The capital of France is Paris.");
    assert_eq!(from_s3, from_disk);

    // A warm start maps the local tier's verified copy: nothing downloaded, nothing hashed.
    let warm = load(&reference, &options(aws.clone(), Some(cache.path()))).await?;
    let weights_size = std::fs::metadata(dir.join("model.safetensors"))?.len();
    assert_eq!((warm.timings.fetch.downloaded_bytes, warm.timings.fetch.cached_bytes), (0, weights_size));
    assert_eq!(warm.timings.fetch.rehashed_bytes, 0);
    assert_eq!(answer(&Engine::new(warm))?, from_disk);

    // One flipped byte in S3 itself is refused, naming the file.
    let mut weights = std::fs::read(dir.join("model.safetensors"))?;
    let middle = weights.len() / 2;
    weights[middle] ^= 0x40;
    s3.put_object().bucket("weights").key("smollm2/model.safetensors").body(ByteStream::from(weights)).send().await?;
    let err = load(&reference, &options(aws.clone(), None)).await.err();
    let text = err.as_ref().map(ToString::to_string).unwrap_or_default();
    assert_refused_at(&err, &dir, middle as u64)?;
    assert!(text.contains("model.safetensors"), "{text}");

    // Missing bucket and missing prefix are named.
    let err = load(&"s3://no-such-bucket/x".parse()?, &options(aws.clone(), None)).await.err();
    assert!(matches!(&err, Some(LoadError::NoSuchBucket { bucket }) if bucket == "no-such-bucket"), "{err:?}");
    let err = load(&"s3://weights/nothing-here".parse()?, &options(aws, None)).await.err();
    assert!(matches!(&err, Some(LoadError::NoSuchKey { .. })), "{err:?}");
    Ok(())
}

/// The path S3 models take to a GPU: each weights file's parts are fetched in parallel,
/// consumed in order, hashed on the way and routed to their tensors as they arrive (on CUDA
/// through pinned buffers and async copies; here through the CPU sink). Same answer as from
/// disk, and a flipped byte still refuses the load.
#[tokio::test(flavor = "multi_thread")]
async fn weights_streamed_to_the_device_answer_the_same_and_are_verified() -> anyhow::Result<()> {
    let (_moto, aws, s3, dir) = model_in_moto().await?;
    let reference: ModelRef = "s3://weights/smollm2".parse()?;
    // 3 MB parts: tensors straddle part boundaries, and the header arrives in the first part.
    let streaming = |aws: aws_config::SdkConfig| LoadOptions {
        stream: StreamWeights::Always,
        fetch: FetchOptions {
            part_size: 3 << 20,
            concurrency: 4,
            cache_dir: None,
            progress: false,
            ..Default::default()
        },
        ..options(aws, None)
    };
    let loaded = load(&reference, &streaming(aws.clone())).await?;
    assert!(loaded.verified, "the manifest was uploaded, so the streamed bytes must be verified");
    assert_eq!(answer(&Engine::new(loaded))?, "The capital of France is Paris.");

    let mut weights = std::fs::read(dir.join("model.safetensors"))?;
    let near_end = weights.len() - 1000;
    weights[near_end] ^= 0x40;
    s3.put_object().bucket("weights").key("smollm2/model.safetensors").body(ByteStream::from(weights)).send().await?;
    let err = load(&reference, &streaming(aws)).await.err();
    assert_refused_at(&err, &dir, near_end as u64)?;
    Ok(())
}

/// A GGUF model from S3 on the CPU has its quantized layers tiled for Ember's kernels while
/// the file downloads (in 16 MiB chunks, which the token table straddles), and answers exactly as
/// the same file loaded from disk; a flipped byte still refuses the load, tiles or not.
#[tokio::test(flavor = "multi_thread")]
async fn gguf_tiled_while_downloading_answers_as_from_disk() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let aws = moto.aws_config().await;
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&aws).force_path_style(true).build());
    s3.create_bucket().bucket("weights").send().await?;
    let dir = tempfile::tempdir()?;
    std::fs::copy(ember_tests::smollm_gguf()?, dir.path().join("model.gguf"))?;
    ember_model_loader::manifest::Manifest::write_for_dir(dir.path())?;
    upload_dir(&s3, "weights", "q4", dir.path()).await?;
    let opts = LoadOptions {
        aws: Some(aws.clone()),
        fetch: FetchOptions { progress: false, ..Default::default() },
        ..Default::default()
    };
    let reference: ModelRef = "s3://weights/q4".parse()?;
    let loaded = load(&reference, &opts).await?;
    assert!(loaded.verified);
    let tiled = loaded.timings.fetch.tiled_early;
    if ember_kernels::cpu::QuantLinear::tiled_from_blocks(
        candle_core::quantized::GgmlDType::Q8_0,
        &[0; 34 * 16],
        16,
        32,
    )
    .is_some()
    {
        // SmolLM2: 30 layers of 7 matrices, and the token table the head shares.
        assert_eq!(tiled, 30 * 7 + 1, "layers tiled during the download");
        // With no local tier, every one of them is tiled over its own verified blocks.
        assert_eq!(loaded.timings.fetch.tiled_in_place, tiled, "layers tiled where they landed");
    } else {
        println!("no tiled kernels on this CPU: nothing tiled during the download ({tiled})");
    }
    let from_s3 = answer(&Engine::new(loaded))?;
    let local = LoadOptions::default();
    let from_disk = answer(&Engine::new(load(&ModelRef::Local(dir.path().join("model.gguf")), &local).await?))?;
    assert_eq!(from_s3, from_disk);

    // With the local tier: the first start keeps its tiles there, the next maps them (no
    // tiling) and answers the same.
    let cache = tempfile::tempdir()?;
    let cached = LoadOptions {
        fetch: FetchOptions { cache_dir: Some(cache.path().into()), ..opts.fetch.clone() },
        ..opts.clone()
    };
    let first = load(&reference, &cached).await?;
    assert_eq!(first.timings.tiles_from_cache, 0);
    drop(first); // its tiles are written by the time its hold on the folder is let go
    let warm = load(&reference, &cached).await?;
    assert_eq!(warm.timings.fetch.downloaded_bytes, 0);
    assert_eq!(warm.timings.tiles_from_cache, tiled, "every layer tiled during the download is kept");
    assert_eq!(answer(&Engine::new(warm))?, from_disk);

    // Two GGUF files under one prefix: which to load is the user's call, not a guess.
    let gguf = ember_tests::smollm_gguf()?;
    for key in ["two/a.gguf", "two/b.gguf"] {
        s3.put_object().bucket("weights").key(key).body(ByteStream::from_path(&gguf).await?).send().await?;
    }
    let two = LoadOptions { require_manifest: false, ..opts.clone() };
    let err = load(&"s3://weights/two".parse()?, &two).await.err();
    assert!(matches!(&err, Some(LoadError::AmbiguousModel { files, .. }) if files.len() == 2), "{err:?}");

    let mut bytes = std::fs::read(dir.path().join("model.gguf"))?;
    let bytes_len = bytes.len() as u64;
    let at = bytes.len() * 3 / 4;
    bytes[at] ^= 0x01;
    s3.put_object().bucket("weights").key("q4/model.gguf").body(ByteStream::from(bytes)).send().await?;
    // Named by its whole 16 MiB chunk, though a tiled GGUF file arrives in quarter-chunk parts.
    let err = load(&reference, &opts).await.err();
    let at = at as u64;
    let chunk_size = ember_model_loader::manifest::CHUNK_SIZE;
    assert!(
        matches!(&err, Some(LoadError::ChunkMismatch { file, chunk, start, end, .. })
            if file == "model.gguf" && *chunk as u64 == at / chunk_size && (*start..*end).contains(&at)
                && *end - *start == chunk_size.min(bytes_len - *start)),
        "{err:?}"
    );
    Ok(())
}
