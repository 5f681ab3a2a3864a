//! The `ember` binary: the answer on stdout, and for bad input a clear message and a
//! non-zero exit, never a panic.

use std::process::{Command, Output};

use ember_tests::{aws_env, smollm_gguf, smollm_hf, MotoServer};

fn ember(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.args(args).env("EMBER_LOG", "warn").env_remove("AWS_ENDPOINT_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

/// Runs a command that must fail cleanly and returns its stderr.
fn fails(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<String> {
    let out = ember(args, env)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit 1, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(stderr)
}

#[test]
fn generate_prints_the_answer_and_the_openai_object() -> anyhow::Result<()> {
    let gguf = smollm_hf("f32")?;
    let model = gguf.to_str().unwrap_or_default();
    let out = ember(&["generate", "--model", model, "--prompt", "What is the capital of France?"], &[])?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout)?, "The capital of France is Paris.\n");

    let out = ember(&["generate", "--model", model, "--prompt", "What is the capital of France?", "--json"], &[])?;
    let body: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "The capital of France is Paris.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 37);
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(body["usage"]["total_tokens"], 44);
    Ok(())
}

/// The text comes out while the model is still generating: the first bytes are read while a
/// 2,000-token answer is far from done, and the process is then stopped by the test, not by
/// finishing.
#[test]
fn generate_prints_tokens_as_they_are_made() -> anyhow::Result<()> {
    use std::io::Read;
    let model = smollm_gguf()?.to_string_lossy().into_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["generate", "--model", &model, "--prompt", "What is the capital of France?", "--max-tokens", "2000"])
        .env("EMBER_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut first = [0u8; 64];
    let n = stdout.read(&mut first)?;
    let still_running = child.try_wait()?.is_none();
    child.kill()?;
    let status = child.wait()?;
    assert!(n > 0, "nothing printed");
    assert!(still_running && status.code().is_none(), "the answer came only at the end ({status})");
    // Greedy: the same start as the whole answer (this quantized model's own).
    assert!("L'Étoile, la Marseillaise".as_bytes().starts_with(&first[..n.min(10)]), "{:?}", &first[..n]);
    Ok(())
}

#[test]
fn options_are_environment_variables_too() -> anyhow::Result<()> {
    let model = smollm_gguf()?.to_string_lossy().into_owned();
    let out = ember(
        &["generate"],
        &[
            ("EMBER_MODEL", model),
            ("EMBER_PROMPT", "What is the capital of France?".into()),
            ("EMBER_DTYPE", "f32".into()),
        ],
    )?;
    assert_eq!(String::from_utf8(out.stdout)?, "The capital of France is Paris.\n");
    Ok(())
}

#[test]
fn a_nonexistent_path_is_named() -> anyhow::Result<()> {
    let err = fails(&["generate", "--model", "/no/such/model", "--prompt", "hi"], &[])?;
    assert!(err.contains("`/no/such/model` does not exist"), "{err}");
    Ok(())
}

#[test]
fn an_unsupported_architecture_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hf = smollm_hf("f32")?;
    let config = std::fs::read_to_string(hf.join("config.json"))?.replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(dir.path().join("config.json"), config)?;
    std::fs::copy(hf.join("tokenizer.json"), dir.path().join("tokenizer.json"))?;
    let err = fails(&["generate", "--model", &dir.path().to_string_lossy(), "--prompt", "hi"], &[])?;
    assert!(err.contains("unsupported architecture `GPT2LMHeadModel`"), "{err}");
    Ok(())
}

#[test]
fn a_truncated_safetensors_file_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hf = smollm_hf("f16")?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(hf.join(f), dir.path().join(f))?;
    }
    // The header survives, the tensor data does not: what an interrupted copy leaves.
    let weights = std::fs::read(hf.join("model.safetensors"))?;
    std::fs::write(dir.path().join("model.safetensors"), &weights[..weights.len() / 3])?;
    let err = fails(&["generate", "--model", &dir.path().to_string_lossy(), "--prompt", "hi"], &[])?;
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    Ok(())
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() -> anyhow::Result<()> {
    let model = smollm_gguf()?.to_string_lossy().into_owned();
    let prompt = "hello ".repeat(9000);
    let err = fails(&["generate", "--model", &model, "--raw", "--prompt", &prompt], &[])?;
    assert!(err.contains("context is 8192 tokens") && err.contains("shorten the prompt"), "{err}");
    Ok(())
}

#[test]
fn cuda_on_a_cpu_build_says_how_to_get_it() -> anyhow::Result<()> {
    let model = smollm_gguf()?.to_string_lossy().into_owned();
    let out = ember(&["generate", "--model", &model, "--prompt", "hi", "--device", "cuda"], &[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "cuda") {
        // With CUDA compiled in, no driver here must still be an error, not a panic.
        assert!(!stderr.contains("panicked"), "{stderr}");
        return Ok(());
    }
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("built without CUDA support") && stderr.contains("--features cuda"), "{stderr}");
    Ok(())
}

#[test]
fn bad_sampling_settings_fail_before_loading() -> anyhow::Result<()> {
    let err = fails(&["generate", "--model", "/no/such/model", "--prompt", "hi", "--top-p", "0"], &[])?;
    assert!(err.contains("top_p must be in (0, 1]"), "{err}");
    Ok(())
}

#[test]
fn missing_bucket_and_key_on_s3_are_named() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let env = aws_env(&moto.endpoint());
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
    let err = fails(&["generate", "--model", "s3://no-such-bucket/m", "--prompt", "hi"], &env)?;
    assert!(err.contains("S3 bucket `no-such-bucket` does not exist"), "{err}");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let aws = moto.aws_config().await;
        let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&aws).force_path_style(true).build());
        s3.create_bucket().bucket("weights").send().await
    })?;
    let err = fails(&["generate", "--model", "s3://weights/absent", "--prompt", "hi"], &env)?;
    assert!(err.contains("nothing found in S3 at `s3://weights/absent`"), "{err}");
    Ok(())
}

#[test]
fn import_gguf_writes_a_loadable_verified_directory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out_dir = dir.path().join("hf");
    let gguf = smollm_gguf()?.to_string_lossy().into_owned();
    let out = ember(&["model", "import-gguf", &gguf, &out_dir.to_string_lossy(), "--dtype", "f16"], &[])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "ember-manifest.json"] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
        // Readable by other users (a container's worker user, a shared cache).
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(out_dir.join(f))?.permissions());
        assert_eq!(mode & 0o044, 0o044, "{f} has mode {mode:o}");
    }
    let out = ember(
        &[
            "generate",
            "--model",
            &out_dir.to_string_lossy(),
            "--dtype",
            "f16",
            "--prompt",
            "What is the capital of France?",
        ],
        &[],
    )?;
    assert_eq!(String::from_utf8(out.stdout)?, "The capital of France is Paris.\n");
    // `ember model manifest` rewrites the same manifest.
    let before = std::fs::read(out_dir.join("ember-manifest.json"))?;
    let out = ember(&["model", "manifest", &out_dir.to_string_lossy()], &[])?;
    assert!(out.status.success());
    assert_eq!(std::fs::read(out_dir.join("ember-manifest.json"))?, before);
    Ok(())
}

/// `--require-manifest` refuses unverified weights before loading them; it is on by default
/// for s3:// models and off for local ones, and `--require-manifest=false` turns it off.
#[test]
fn unverified_weights_are_refused_when_a_manifest_is_required() -> anyhow::Result<()> {
    // The converted model without its ember-manifest.json (links to the real files).
    let source = smollm_hf("f32")?;
    let dir = tempfile::tempdir()?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::os::unix::fs::symlink(source.join(f), dir.path().join(f))?;
    }
    let model = dir.path().to_string_lossy().into_owned();
    let err = fails(&["generate", "--model", &model, "--prompt", "hi", "--require-manifest"], &[])?;
    assert!(err.contains("has no ember-manifest.json"), "{err}");
    assert!(err.contains("ember model manifest DIR"), "the message says what to do: {err}");
    let out = ember(&["generate", "--model", &model, "--prompt", "What is the capital of France?"], &[])?;
    assert_eq!(String::from_utf8(out.stdout)?, "The capital of France is Paris.\n", "local default: not required");

    // On S3 it is required by default, and checked with one listing, before any download.
    let moto = MotoServer::start()?;
    let env: Vec<(&str, String)> = aws_env(&moto.endpoint()).iter().map(|(k, v)| (*k, v.clone())).collect();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let aws = moto.aws_config().await;
        let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&aws).force_path_style(true).build());
        s3.create_bucket().bucket("weights").send().await?;
        let config = std::fs::read(source.join("config.json"))?;
        s3.put_object().bucket("weights").key("m/config.json").body(config.into()).send().await?;
        anyhow::Ok(())
    })?;
    let err = fails(&["generate", "--model", "s3://weights/m", "--prompt", "hi"], &env)?;
    assert!(err.contains("`s3://weights/m` has no ember-manifest.json"), "{err}");
    let err = fails(&["generate", "--model", "s3://weights/m", "--prompt", "hi", "--require-manifest=false"], &env)?;
    assert!(!err.contains("ember-manifest.json"), "not required any more, so it fails further on: {err}");
    assert!(err.contains("tokenizer.json"), "{err}");
    Ok(())
}

/// Inputs a new user gets wrong are named in the error, before any model is loaded.
#[test]
fn mistaken_inputs_are_named_before_any_work() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A batch file given as the model.
    let batch = dir.path().join("batch.jsonl");
    std::fs::write(&batch, "{}\n")?;
    let err = fails(&["generate", "--model", &batch.to_string_lossy(), "--prompt", "hi"], &[])?;
    assert!(err.contains("is a file but not a model"), "{err}");
    assert!(!err.contains("config.json` is missing"), "{err}");

    // A folder with several GGUF files: which one is not guessed.
    let gguf = smollm_gguf()?;
    let several = dir.path().join("ggufs");
    std::fs::create_dir(&several)?;
    for name in ["a.gguf", "b.gguf", "c.gguf"] {
        std::os::unix::fs::symlink(&gguf, several.join(name))?;
    }
    let err = fails(&["generate", "--model", &several.to_string_lossy(), "--prompt", "hi"], &[])?;
    assert!(err.contains("several GGUF files (a.gguf, b.gguf, c.gguf)"), "{err}");

    // A negative temperature is a value, refused by the rule it breaks.
    let model = gguf.to_string_lossy().into_owned();
    let err = fails(&["generate", "--model", &model, "--prompt", "hi", "--temperature", "-1"], &[])?;
    assert!(err.contains("temperature"), "{err}");
    assert!(!err.contains("unexpected argument"), "{err}");

    // An unknown dtype names the choices.
    let out = ember(&["generate", "--model", &model, "--prompt", "hi", "--dtype", "f8"], &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("invalid value 'f8'") && err.contains("bf16"), "{err}");
    assert!(!err.contains("config is not usable"), "{err}");

    // A mistyped s3 URL is not a local folder named `s3:`.
    let err = fails_in(dir.path(), &["dlq", "list", "--results", "s3:/typo/x"], &[])?;
    assert!(err.contains("looks like a URL"), "{err}");
    assert!(!dir.path().join("s3:").exists(), "a folder named s3: was created");

    // A mistyped queue path is not a new empty queue.
    let typo = dir.path().join("qeueu.db");
    let err = fails(&["status", "--queue-path", &typo.to_string_lossy()], &[])?;
    assert!(err.contains("there is no queue at"), "{err}");
    assert!(!typo.exists(), "the mistyped queue file was created");

    // `ember lambda` outside a complete Lambda environment: an error, not a panic.
    let err = fails(
        &["lambda", "--model", &model],
        &[("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9".into()), ("AWS_LAMBDA_FUNCTION_NAME", "ember".into())],
    )?;
    assert!(err.contains("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"), "{err}");
    Ok(())
}

/// Runs a command in `dir` that must fail cleanly and returns its stderr.
fn fails_in(dir: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.current_dir(dir).args(args).env("EMBER_LOG", "warn").env_remove("AWS_ENDPOINT_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit 1, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(stderr)
}

/// An idle `ember serve` on the embedded queue stops at once on SIGINT: the signal interrupts
/// its long poll (it used to wait the poll out, up to 20 s). The time is printed, not bounded.
#[test]
fn sigint_stops_an_idle_serve_at_once() -> anyhow::Result<()> {
    use std::io::{BufRead, Read};
    let dir = tempfile::tempdir()?;
    let model = smollm_hf("f32")?.to_string_lossy().into_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .current_dir(dir.path())
        .args(["serve", "--model", &model])
        .env("EMBER_LOG", "info,ember_worker::runner::serve=debug")
        .env_remove("AWS_ENDPOINT_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Signal once it is in its long poll, as it says on stderr.
    let mut stderr = std::io::BufReader::new(child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?);
    let mut line = String::new();
    loop {
        line.clear();
        if stderr.read_line(&mut line)? == 0 {
            anyhow::bail!("serve exited before it polled");
        }
        if line.contains("waiting for messages") {
            break;
        }
    }
    let sent = std::time::Instant::now();
    Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
    let mut rest = String::new();
    stderr.read_to_string(&mut rest)?;
    let status = child.wait()?;
    eprintln!("idle serve stopped {:?} after SIGINT", sent.elapsed());
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.contains("shutdown: stopped waiting for messages"), "the long poll was waited out:\n{rest}");
    Ok(())
}
