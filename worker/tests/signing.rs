//! Signed weights with the real `minisign` tool (scripts/install-test-deps.sh installs it): a
//! model minisign signed is loaded by Ember, a signature Ember made verifies with `minisign -V`,
//! and an unsigned model, a wrong key, a manifest edited after signing and a weight byte flipped
//! after signing are each refused with their own error, from a local folder, a lone GGUF file,
//! and S3 (moto on 127.0.0.1: downloaded, cached and streamed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Context;
use aws_sdk_s3::primitives::ByteStream;
use ember_model_loader::manifest::{Manifest, MANIFEST_FILE};
use ember_model_loader::signing::SIGNATURE_FILE;
use ember_model_loader::{load, FetchOptions, LoadError, LoadOptions, ModelRef, StreamWeights, TrustedKeys};
use ember_tests::{aws_env, smollm_gguf, smollm_hf, MotoServer};

/// The `minisign` tool (`MINISIGN`, or from PATH), with a clear error when it is missing.
fn minisign(args: &[&str], stdin: &str) -> anyhow::Result<Output> {
    use std::io::Write;
    let bin = std::env::var("MINISIGN").unwrap_or_else(|_| "minisign".into());
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("starting `{bin}` ({e}): run scripts/install-test-deps.sh (Debian package minisign)")
        })?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

fn ember(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.args(args).env("EMBER_LOG", "warn").env_remove("AWS_ENDPOINT_URL").env_remove("EMBER_TRUSTED_KEYS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

fn ok(out: &Output) -> anyhow::Result<String> {
    anyhow::ensure!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A key pair made by the minisign tool without a password: (secret key path, public key path).
fn minisign_keypair(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (sk, pk) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    ok(&minisign(&["-G", "-W", "-s", path(&sk), "-p", path(&pk)], "")?)?;
    Ok((sk, pk))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// The f16 model folder, copied (so its bytes can be changed) with a fresh manifest.
fn model_copy(into: &Path) -> anyhow::Result<PathBuf> {
    let dir = into.join("smollm2");
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(smollm_hf("f16")?)? {
        let from = entry?.path();
        if let Some(name) = from.file_name() {
            std::fs::copy(&from, dir.join(name))?;
        }
    }
    Manifest::write_for_dir(&dir)?;
    Ok(dir)
}

fn flip_byte(file: &Path, at_fraction: f64) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(file)?;
    let at = ((bytes.len() as f64) * at_fraction) as usize;
    bytes[at] ^= 0x40;
    std::fs::write(file, bytes)?;
    Ok(())
}

fn trusting(keys: &[&Path]) -> anyhow::Result<LoadOptions> {
    let specs: Vec<&str> = keys.iter().map(|p| path(p)).collect();
    Ok(LoadOptions { trusted_keys: TrustedKeys::parse(&specs)?, ..Default::default() })
}

async fn refused(reference: &ModelRef, opts: &LoadOptions) -> LoadError {
    match load(reference, opts).await {
        Ok(_) => panic!("{reference} loaded, but it had to be refused"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn minisign_and_ember_signatures_interoperate_and_each_tampering_has_its_own_error() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = model_copy(tmp.path())?;
    let manifest = dir.join(MANIFEST_FILE);
    let (sk, pk) = minisign_keypair(tmp.path(), "publisher")?;
    let (_, other_pk) = minisign_keypair(tmp.path(), "someone-else")?;

    // Signed by the minisign tool, loaded by Ember: the whole CLI path, with the key as a .pub
    // file, and through the environment as the key string.
    ok(&minisign(&["-S", "-s", path(&sk), "-m", path(&manifest)], "")?)?;
    let question = ["generate", "--model", path(&dir), "--prompt", "What is the capital of France?"];
    let out = ember(&[&question[..], &["--trusted-key", path(&pk)]].concat(), &[])?;
    assert_eq!(ok(&out)?, "The capital of France is Paris.\n");
    let key_string = std::fs::read_to_string(&pk)?.lines().nth(1).unwrap_or_default().to_string();
    let both = format!("{},{key_string}", path(&other_pk));
    let out = ember(&["model", "verify", path(&dir)], &[("EMBER_TRUSTED_KEYS", both)])?;
    assert!(ok(&out)?.contains("verified"));

    // Signed by Ember (with a password-protected key from minisign), verified by minisign.
    let (enc_sk, enc_pk) = (tmp.path().join("enc.key"), tmp.path().join("enc.pub"));
    ok(&minisign(&["-G", "-s", path(&enc_sk), "-p", path(&enc_pk)], "pw\npw\n")?)?;
    let out =
        ember(&["model", "sign", path(&dir), "--key", path(&enc_sk)], &[("EMBER_SIGNING_KEY_PASSWORD", "pw".into())])?;
    ok(&out)?;
    ok(&minisign(&["-V", "-p", path(&enc_pk), "-m", path(&manifest)], "")?)?;
    // And with a key Ember made.
    let ember_sk = tmp.path().join("ember.key");
    ok(&ember(&["model", "keygen", "--key", path(&ember_sk)], &[])?)?;
    ok(&ember(&["model", "sign", path(&dir), "--key", path(&ember_sk)], &[])?)?;
    let ember_pk = tmp.path().join("ember.key.pub");
    ok(&minisign(&["-V", "-p", path(&ember_pk), "-m", path(&manifest)], "")?)?;
    let local = ModelRef::Local(dir.clone());
    assert!(load(&local, &trusting(&[&ember_pk])?).await?.verified);

    // Signed by a key that is not trusted.
    let err = refused(&local, &trusting(&[&pk, &other_pk])?).await;
    assert!(matches!(err, LoadError::UntrustedKey { .. }), "{err}");

    // Unsigned.
    std::fs::rename(dir.join(SIGNATURE_FILE), tmp.path().join("kept.minisig"))?;
    let err = refused(&local, &trusting(&[&ember_pk])?).await;
    assert!(matches!(err, LoadError::Unsigned(_)), "{err}");
    std::fs::rename(tmp.path().join("kept.minisig"), dir.join(SIGNATURE_FILE))?;

    // A weight byte flipped after signing: the signed manifest's digest catches it.
    let weights = dir.join("model.safetensors");
    flip_byte(&weights, 0.5)?;
    let err = refused(&local, &trusting(&[&ember_pk])?).await;
    assert!(
        matches!(&err, LoadError::ChecksumMismatch { file, .. } | LoadError::ChunkMismatch { file, .. } if file == "model.safetensors"),
        "{err}"
    );

    // ... and the manifest rewritten to match it (what someone who can write the bucket does):
    // the signature no longer holds. The CLI refuses it with the message and prints nothing.
    Manifest::write_for_dir(&dir)?;
    let err = refused(&local, &trusting(&[&ember_pk])?).await;
    assert!(matches!(err, LoadError::SignatureMismatch { .. }), "{err}");
    let out = ember(&[&question[..], &["--trusted-key", path(&ember_pk)]].concat(), &[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "a refused model answered: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("changed after it was signed"), "{stderr}");
    let out = ember(&["model", "verify", path(&dir), "--trusted-key", path(&ember_pk)], &[])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("changed after it was signed"));
    Ok(())
}

/// A lone GGUF file in a signed folder is vouched for by the folder's manifest.
#[tokio::test(flavor = "multi_thread")]
async fn a_lone_gguf_file_is_checked_against_its_folders_signed_manifest() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("gguf");
    std::fs::create_dir_all(&dir)?;
    let gguf = dir.join("smollm2.gguf");
    std::fs::copy(smollm_gguf()?, &gguf)?;
    Manifest::write_for_dir(&dir)?;
    let (sk, pk) = minisign_keypair(tmp.path(), "publisher")?;
    ok(&minisign(&["-S", "-s", path(&sk), "-m", path(&dir.join(MANIFEST_FILE))], "")?)?;
    let reference = ModelRef::Local(gguf.clone());
    assert!(load(&reference, &trusting(&[&pk])?).await?.verified);

    flip_byte(&gguf, 0.9)?;
    let err = refused(&reference, &trusting(&[&pk])?).await;
    assert!(
        matches!(&err, LoadError::ChecksumMismatch { file, .. } | LoadError::ChunkMismatch { file, .. } if file == "smollm2.gguf"),
        "{err}"
    );
    std::fs::remove_file(dir.join(SIGNATURE_FILE))?;
    let err = refused(&reference, &trusting(&[&pk])?).await;
    assert!(matches!(err, LoadError::Unsigned(_)), "{err}");
    Ok(())
}

async fn upload(s3: &aws_sdk_s3::Client, dir: &Path, name: &str) -> anyhow::Result<()> {
    s3.put_object()
        .bucket("weights")
        .key(format!("smollm2/{name}"))
        .body(ByteStream::from_path(dir.join(name)).await?)
        .send()
        .await?;
    Ok(())
}

/// Whether any weights were downloaded into the cache.
/// The local tier's copy of `name` (one entry folder per model, named by a hash), finished or
/// partial.
fn cached_file(cache: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(cache).ok()?;
    entries.flatten().find_map(|entry| {
        let files = std::fs::read_dir(entry.path()).ok()?;
        files.flatten().map(|f| f.path()).find(|f| f.file_name().is_some_and(|n| n.to_string_lossy().starts_with(name)))
    })
}

/// Whether any weights landed in the local tier.
fn cached_weights(cache: &Path) -> bool {
    cached_file(cache, "model.safetensors").is_some()
}

fn empty(dir: &Path) -> anyhow::Result<()> {
    std::fs::remove_dir_all(dir)?;
    std::fs::create_dir_all(dir)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_models_are_refused_unsigned_untrusted_or_altered_before_their_weights_are_used() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = model_copy(tmp.path())?;
    let (sk, pk) = minisign_keypair(tmp.path(), "publisher")?;
    let (_, other_pk) = minisign_keypair(tmp.path(), "someone-else")?;
    ok(&minisign(&["-S", "-s", path(&sk), "-m", path(&dir.join(MANIFEST_FILE))], "")?)?;

    let moto = MotoServer::start()?;
    let aws = moto.aws_config().await;
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&aws).force_path_style(true).build());
    s3.create_bucket().bucket("weights").send().await?;
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", MANIFEST_FILE] {
        upload(&s3, &dir, name).await?;
    }
    let reference: ModelRef = "s3://weights/smollm2".parse()?;
    let cache = tempfile::tempdir()?;
    let opts = |keys: &[&Path], stream: StreamWeights| -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions {
            aws: Some(aws.clone()),
            stream,
            fetch: FetchOptions {
                part_size: 32 << 20,
                concurrency: 4,
                cache_dir: Some(cache.path().to_path_buf()),
                cache_max_bytes: None,
                progress: false,
                ..Default::default()
            },
            ..trusting(keys)?
        })
    };

    // Unsigned: refused after one LIST, before any weight is downloaded.
    let err = refused(&reference, &opts(&[&pk], StreamWeights::Never)?).await;
    assert!(matches!(err, LoadError::Unsigned(_)), "{err}");
    assert!(!cached_weights(cache.path()), "weights were downloaded for an unsigned model");

    // Signed, but not by a trusted key: refused before the weights too, downloaded or streamed.
    upload(&s3, &dir, SIGNATURE_FILE).await?;
    for stream in [StreamWeights::Never, StreamWeights::Always] {
        let err = refused(&reference, &opts(&[&other_pk], stream)?).await;
        assert!(matches!(err, LoadError::UntrustedKey { .. }), "{err}");
    }
    assert!(!cached_weights(cache.path()), "weights were downloaded for an untrusted model");

    // Signed by a trusted key: downloaded (into the cache), and streamed.
    assert!(load(&reference, &opts(&[&other_pk, &pk], StreamWeights::Never)?).await?.verified);
    assert!(cached_weights(cache.path()));
    assert!(load(&reference, &opts(&[&pk], StreamWeights::Always)?).await?.verified);

    // The local tier is checked as strictly: a cached weight changed on disk after it was
    // verified is hashed again against the signed manifest (always read from the bucket), found
    // wrong, dropped and downloaded again; what loads is the signed bytes.
    let cached = cached_file(cache.path(), "model.safetensors").context("no cached weights")?;
    flip_byte(&cached, 0.25)?;
    assert!(load(&reference, &opts(&[&pk], StreamWeights::Never)?).await?.verified);
    assert!(std::fs::read(&cached)? == std::fs::read(dir.join("model.safetensors"))?, "the cache kept changed bytes");
    empty(cache.path())?;

    // A weight byte flipped in the bucket after signing: the digest catches it on both paths.
    flip_byte(&dir.join("model.safetensors"), 0.75)?;
    upload(&s3, &dir, "model.safetensors").await?;
    for stream in [StreamWeights::Never, StreamWeights::Always] {
        let err = refused(&reference, &opts(&[&pk], stream)?).await;
        assert!(
            matches!(&err, LoadError::ChecksumMismatch { file, .. } | LoadError::ChunkMismatch { file, .. } if file == "model.safetensors"),
            "{err}"
        );
    }

    // The manifest rewritten in the bucket to match: refused before the weights are fetched.
    empty(cache.path())?;
    Manifest::write_for_dir(&dir)?;
    upload(&s3, &dir, MANIFEST_FILE).await?;
    let err = refused(&reference, &opts(&[&pk], StreamWeights::Never)?).await;
    assert!(matches!(err, LoadError::SignatureMismatch { .. }), "{err}");
    assert!(!cached_weights(cache.path()), "weights were downloaded for an altered manifest");

    // The CLI says so and answers nothing.
    let mut env = aws_env(&moto.endpoint());
    env.push(("EMBER_TRUSTED_KEYS", path(&pk).to_string()));
    let out = ember(&["generate", "--model", "s3://weights/smollm2", "--no-progress", "--prompt", "Hi"], &env)?;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("changed after it was signed"));
    Ok(())
}
