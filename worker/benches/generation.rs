//! Generation speed and cold start, next to peers measured in the same run.
//!
//!     scripts/fetch-model.sh && scripts/install-peers.sh
//!     cargo bench -p ember-worker --bench generation
//!
//! Prints, for f32, f16 and bf16 weights and the Q8_0, Q4_0, Q4_1 and Q4_K_M GGUF files:
//! Ember's prefill and decode tokens/s beside llama.cpp's (node-llama-cpp) on the same weights
//! and thread count, as ratios, and Ember with every matmul on candle (its CPU kernels off) to
//! show what they change; at 1 thread and at 2 (one child process per thread count, as the
//! thread pools are sized once per process). Then the cold start of `ember generate` (process
//! start to first token, model from S3 on a local SeaweedFS) beside a bare parallel download
//! of the same bytes; then decode tokens/s at 128 and 2,000 generated tokens with the KV cache
//! grown in place and grown by concatenation (before).
//!
//! The files it compares are made on first use next to the shipped Q4_1 file, from the same
//! weights: `ember model quantize f32.gguf q8_0.gguf --type q8_0` (and q4_0, q4_k_m, bf16),
//! `ember model import-gguf ... hf-bf16 --dtype bf16`.
//!
//! Settings (environment): EMBER_BENCH_THREADS (`1,2`), EMBER_BENCH_PROMPT (17 tokens),
//! EMBER_BENCH_GEN (128 tokens), EMBER_BENCH_RUNS (3; the best run counts for both sides, and
//! the two sides' runs alternate),
//! EMBER_BENCH_FORMATS (comma list of row labels, all by default), EMBER_BENCH_SKIP (comma
//! list of `speed`, `cold`, `candle`, `kv`, `synthetic`), EMBER_BENCH_KV_RUNS (1),
//! EMBER_BENCH_COLD_MODELS (comma list of cold-start model keys), EMBER_BENCH_SEED (the
//! synthetic checkpoint's), EMBER_BENCH_LINK_MBIT (cold start over a link of that many Mbit/s
//! instead of the bare loopback: SeaweedFS's S3 replies are shaped with `tc` on `lo`, which
//! needs root; the shaping is removed when the bench ends), EMBER_BENCH_SETTLE_MS (3000: the
//! pause before each measured step of the cold start, so that each pays for fresh memory as a
//! new instance does; see `settle`).
//!
//! The cold start's floor is a bare parallel download of the same bytes in a new process (the
//! bench binary started again), landing in fresh memory and timed from `main`, as Ember's start
//! is; the same download in the bench's own long-running process is printed beside it. The
//! new-process download runs just before and just after each Ember start: "x bare" is the
//! median start over the median of all those downloads, "x bare, paired" the median over runs
//! of each start over the mean of its two neighbours, which follows the host's memory
//! reclaim (it drifts over minutes; see `settle`) where the first does not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ember_model_loader::linear::set_cpu_kernels;
use ember_model_loader::{load, DTypeChoice, LoadOptions, ModelRef, SeqCache};
use ember_tests::{aws_config_for, free_port, model_path};

const PROMPT_TEXT: &str = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by \
the sea, there lived an old fisherman who told stories about the stars, the tides and \
the strange ships that sailed past the harbour at night. ";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[derive(Debug, Clone, Copy)]
struct Speed {
    prefill_tps: f64,
    decode_tps: f64,
}

impl Speed {
    const ZERO: Speed = Speed { prefill_tps: 0.0, decode_tps: 0.0 };

    fn best(self, other: Speed) -> Speed {
        Speed {
            prefill_tps: self.prefill_tps.max(other.prefill_tps),
            decode_tps: self.decode_tps.max(other.decode_tps),
        }
    }
}

/// Ember in this process, the model loaded once: each run prefills P tokens, then decodes G
/// tokens greedily (EOS ignored, as the llama.cpp side does).
struct EmberBench {
    loaded: ember_model_loader::LoadedModel,
    prompt: Vec<u32>,
}

impl EmberBench {
    /// Loads the model and runs once to warm up.
    async fn load(model: &Path, dtype: DTypeChoice, p: usize, g: usize) -> anyhow::Result<Self> {
        let loaded = load(&ModelRef::Local(model.to_path_buf()), &LoadOptions { dtype, ..Default::default() }).await?;
        let text = PROMPT_TEXT.repeat(4);
        let enc = loaded.tokenizer.encode(&text)?;
        let mut prompt = vec![loaded.config().bos_token_id.unwrap_or(1)];
        prompt.extend(enc.iter().take(p.saturating_sub(1)));
        let bench = Self { loaded, prompt };
        bench.run(g)?;
        Ok(bench)
    }

    fn run(&self, g: usize) -> anyhow::Result<Speed> {
        let mut cache = SeqCache::new();
        let t0 = Instant::now();
        let logits = self.loaded.model.forward(&self.prompt, &mut cache)?;
        let mut next = ember_model_loader::model::argmax(&logits)?;
        let prefill = t0.elapsed();
        let t1 = Instant::now();
        for _ in 0..g {
            let logits = self.loaded.model.forward(&[next], &mut cache)?;
            next = ember_model_loader::model::argmax(&logits)?;
        }
        let decode = t1.elapsed();
        Ok(Speed {
            prefill_tps: self.prompt.len() as f64 / prefill.as_secs_f64(),
            decode_tps: g as f64 / decode.as_secs_f64(),
        })
    }
}

/// Ember's best of `runs` (after a warm-up run).
async fn ember_speed(model: &Path, dtype: DTypeChoice, p: usize, g: usize, runs: usize) -> anyhow::Result<Speed> {
    let bench = EmberBench::load(model, dtype, p, g).await?;
    (0..runs).try_fold(Speed::ZERO, |best, _| Ok(best.best(bench.run(g)?)))
}

/// One llama.cpp process through scripts/llamacpp-bench.mjs (it warms up itself).
fn llama_cpp_once(model: &Path, threads: usize, p: usize, g: usize) -> anyhow::Result<Speed> {
    let out = Command::new("node")
        .arg(root().join("scripts/llamacpp-bench.mjs"))
        .args(["--model", &model.to_string_lossy(), "--threads", &threads.to_string()])
        .args(["--prompt-tokens", &p.to_string(), "--gen-tokens", &g.to_string()])
        .output()
        .context("running node (install peers with scripts/install-peers.sh)")?;
    if !out.status.success() {
        bail!("llama.cpp bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(Speed {
        prefill_tps: v["prefill_tps"].as_f64().unwrap_or(0.0),
        decode_tps: v["decode_tps"].as_f64().unwrap_or(0.0),
    })
}

/// Ember and llama.cpp on the same weights, their runs taken in turn (Ember, llama.cpp, Ember,
/// ...), best of `runs` each. This machine's speed drifts by tens of percent over minutes; run
/// all of one engine's runs and then the other's, and the ratio measured the drift as much as
/// the engines (the Q4_0 decode ratio went from 0.93 to 1.48 between two such runs).
async fn ember_and_llama_cpp(
    ember_model: &Path,
    dtype: DTypeChoice,
    peer_model: &Path,
    threads: usize,
    p: usize,
    g: usize,
    runs: usize,
) -> anyhow::Result<(Speed, Speed)> {
    let bench = EmberBench::load(ember_model, dtype, p, g).await?;
    let (mut e, mut l) = (Speed::ZERO, Speed::ZERO);
    for _ in 0..runs {
        e = e.best(bench.run(g)?);
        l = l.best(llama_cpp_once(peer_model, threads, p, g)?);
    }
    Ok((e, l))
}

/// The weights compared: label, Ember's file, its dtype, llama.cpp's file.
const ROWS: [(&str, &str, DTypeChoice, &str); 7] = [
    ("f32", "hf-f32", DTypeChoice::F32, "f32.gguf"),
    ("f16", "hf-f16", DTypeChoice::F16, "f16.gguf"),
    ("bf16", "hf-bf16", DTypeChoice::BF16, "bf16.gguf"),
    ("Q8_0", "q8_0.gguf", DTypeChoice::Auto, "q8_0.gguf"),
    ("Q4_0", "q4_0.gguf", DTypeChoice::Auto, "q4_0.gguf"),
    ("Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf", DTypeChoice::Auto, "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("Q4_K_M", "q4_k_m.gguf", DTypeChoice::Auto, "q4_k_m.gguf"),
];

/// Makes the files of [`ROWS`] that scripts/fetch-model.sh does not, with the `ember` binary.
fn prepare_files() -> anyhow::Result<()> {
    let dir = model_path("f32.gguf")?.parent().map(Path::to_path_buf).context("model directory")?;
    let ember = PathBuf::from(env!("CARGO_BIN_EXE_ember"));
    let run = |args: &[&str], out: &Path| -> anyhow::Result<()> {
        if out.exists() {
            return Ok(());
        }
        let part = out.with_extension("part");
        let mut cmd = Command::new(&ember);
        cmd.args(["model"]).args(&args[..args.len() - 1]).arg(&part).args(&args[args.len() - 1..]);
        let done = cmd.output()?;
        if !done.status.success() {
            bail!("ember model {args:?} failed: {}", String::from_utf8_lossy(&done.stderr));
        }
        std::fs::rename(&part, out)?;
        Ok(())
    };
    let src = dir.join("f32.gguf").to_string_lossy().into_owned();
    for ty in ["q8_0", "q4_0", "q4_k_m", "bf16"] {
        run(&["quantize", &src, &format!("--type={ty}")], &dir.join(format!("{ty}.gguf")))?;
    }
    let q4_1 = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").to_string_lossy().into_owned();
    run(&["import-gguf", &q4_1, "--dtype=bf16"], &dir.join("hf-bf16"))
}

async fn speed_table(threads: usize, p: usize, g: usize, runs: usize, skip: &str) -> anyhow::Result<()> {
    let only = std::env::var("EMBER_BENCH_FORMATS").unwrap_or_default();
    let with_candle = !skip.contains("candle");
    println!("\n## Generation speed: SmolLM2-135M-Instruct, {p}-token prompt, {g} decoded tokens, {threads} thread(s), best of {runs}");
    println!("| weights | Ember file | llama.cpp file | Ember prefill tok/s | llama.cpp prefill tok/s | ratio | Ember decode tok/s | llama.cpp decode tok/s | ratio | candle-only prefill / decode tok/s |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (label, ember_file, dtype, peer_file) in ROWS {
        if !only.is_empty() && !only.split(',').any(|f| f.eq_ignore_ascii_case(label)) {
            continue;
        }
        set_cpu_kernels(true);
        let (e, l) =
            ember_and_llama_cpp(&model_path(ember_file)?, dtype, &model_path(peer_file)?, threads, p, g, runs).await?;
        let candle = if with_candle {
            set_cpu_kernels(false);
            let c = ember_speed(&model_path(ember_file)?, dtype, p, g, runs).await?;
            set_cpu_kernels(true);
            format!("{:.1} / {:.1}", c.prefill_tps, c.decode_tps)
        } else {
            "-".into()
        };
        println!(
            "| {label} | {ember_file} | {peer_file} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} | {candle} |",
            e.prefill_tps,
            l.prefill_tps,
            e.prefill_tps / l.prefill_tps,
            e.decode_tps,
            l.decode_tps,
            e.decode_tps / l.decode_tps
        );
    }
    Ok(())
}

/// SeaweedFS on 127.0.0.1 through scripts/seaweed.sh, stopped when dropped.
struct Seaweed {
    dir: tempfile::TempDir,
    port: u16,
}

impl Seaweed {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let status = Command::new(root().join("scripts/seaweed.sh"))
            .args(["start", &dir.path().to_string_lossy(), &port.to_string()])
            .status()?;
        if !status.success() {
            bail!("SeaweedFS did not start (install it with scripts/install-peers.sh)");
        }
        Ok(Self { dir, port })
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ =
            Command::new(root().join("scripts/seaweed.sh")).args(["stop", &self.dir.path().to_string_lossy()]).status();
    }
}

/// Limits what SeaweedFS's S3 port sends over `lo` to `mbit` Mbit/s (an HTB class with a `u32`
/// filter on the source port, everything else unlimited), as a network link would: on the bare
/// loopback the download, its server and the hashing share this machine's two cores, so the
/// cores are the slowest link; over a link such as S3 from Lambda the network is. Removed on drop.
struct LinkShaper;

impl LinkShaper {
    fn new(port: u16, mbit: u64) -> anyhow::Result<Self> {
        let tc = |args: &str| -> anyhow::Result<()> {
            let out = Command::new("tc").args(args.split_whitespace()).output().context("running tc (iproute2)")?;
            if !out.status.success() {
                bail!(
                    "`tc {args}` failed (EMBER_BENCH_LINK_MBIT needs root and no other qdisc on lo): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        tc("qdisc add dev lo root handle 1: htb default 10 r2q 100000")?;
        let shaper = Self; // from here on, dropping it removes the qdisc
        tc("class add dev lo parent 1: classid 1:10 htb rate 100gbit")?;
        tc(&format!("class add dev lo parent 1: classid 1:20 htb rate {mbit}mbit burst 256k cburst 256k"))?;
        tc(&format!("filter add dev lo protocol ip parent 1: prio 1 u32 match ip sport {port} 0xffff flowid 1:20"))?;
        Ok(shaper)
    }
}

impl Drop for LinkShaper {
    fn drop(&mut self) {
        let _ = Command::new("tc").args(["qdisc", "del", "dev", "lo", "root"]).status();
    }
}

/// A bare parallel download: the same ranged GETs into memory, nothing else.
async fn bare_download(s3: &aws_sdk_s3::Client, bucket: &str, keys: &[(String, u64)]) -> anyhow::Result<Duration> {
    use futures::StreamExt;
    let part = 16u64 << 20;
    let t0 = Instant::now();
    let ranges: Vec<(String, u64, u64)> = keys
        .iter()
        .flat_map(|(k, size)| (0..size.div_ceil(part)).map(move |i| (k.clone(), i * part, ((i + 1) * part).min(*size))))
        .collect();
    let mut total = 0usize;
    let mut stream = futures::stream::iter(ranges.into_iter().map(|(key, a, b)| async move {
        let r = s3.get_object().bucket(bucket).key(key).range(format!("bytes={a}-{}", b - 1)).send().await?;
        anyhow::Ok(r.body.collect().await?.into_bytes().len())
    }))
    .buffer_unordered(8);
    while let Some(n) = stream.next().await {
        total += n?;
    }
    let expected: u64 = keys.iter().map(|(_, s)| s).sum();
    if total as u64 != expected {
        bail!("downloaded {total} bytes, expected {expected}");
    }
    Ok(t0.elapsed())
}

/// Fresh anonymous memory for `len` bytes, made as the loader's landing is (`Landing::memory`
/// in `model-loader/src/fetch.rs`: an anonymous map with huge pages advised).
fn fresh_memory(len: usize) -> anyhow::Result<memmap2::MmapMut> {
    let map = memmap2::MmapMut::map_anon(len.max(1))?;
    // Advice only: a refusal changes nothing.
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}

/// The bare download as a new process does it (the bench binary started again with
/// `EMBER_BENCH_BARE_CHILD=<endpoint>` and `EMBER_BENCH_BARE_KEYS=key=size;...`): its own
/// runtime and S3 client, then the same ranged GETs, each body copied into fresh memory as it
/// arrives, timed from `main` as Ember's `ready_s` is. A process that starts cold pays for
/// fresh memory (page faults; on a VM whose host backs guest memory lazily, host faults too),
/// which a download into a long-running process's reused buffers does not; Ember's start pays
/// it, so its floor should. Prints `bare_s <seconds>`.
fn bare_child(started: Instant, endpoint: &str) -> anyhow::Result<()> {
    use futures::StreamExt;
    let keys = std::env::var("EMBER_BENCH_BARE_KEYS")?
        .split(';')
        .map(|kv| match kv.rsplit_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.parse::<usize>()?)),
            None => bail!("EMBER_BENCH_BARE_KEYS: `{kv}` is not key=size"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let aws = aws_config_for(endpoint).await;
        let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&aws).force_path_style(true).build());
        let mut memory = keys.iter().map(|(_, size)| fresh_memory(*size)).collect::<anyhow::Result<Vec<_>>>()?;
        let part = 16usize << 20;
        let mut parts = Vec::new();
        for ((key, size), mem) in keys.iter().zip(memory.iter_mut()) {
            for (i, dest) in mem[..*size].chunks_mut(part).enumerate() {
                parts.push((key.as_str(), i * part, dest));
            }
        }
        let s3 = &s3;
        let mut stream = futures::stream::iter(parts.into_iter().map(|(key, start, dest)| async move {
            let range = format!("bytes={start}-{}", start + dest.len() - 1);
            let mut body = s3.get_object().bucket("bench").key(key).range(range).send().await?.body;
            let mut at = 0;
            while let Some(bytes) = body.try_next().await? {
                let Some(to) = dest.get_mut(at..at + bytes.len()) else { bail!("{key}: more bytes than asked") };
                to.copy_from_slice(&bytes);
                at += bytes.len();
            }
            if at != dest.len() {
                bail!("{key}: {at} bytes of {} at {start}", dest.len());
            }
            anyhow::Ok(())
        }))
        .buffer_unordered(8);
        while let Some(done) = stream.next().await {
            done?;
        }
        anyhow::Ok(())
    })?;
    println!("bare_s {:.6}", started.elapsed().as_secs_f64());
    Ok(())
}

/// Waits before a measured step of the cold-start table (`EMBER_BENCH_SETTLE_MS`, 3000 by
/// default). On a VM whose host backs guest memory lazily and takes back what the guest frees
/// (Firecracker with free page reporting, as AWS Lambda runs; this machine's `virtio_balloon`),
/// memory freed in the last second or so is still backed and fast to touch, and older memory
/// costs a host fault per page on first touch (the bench prints both rates first, from
/// `fresh_memory_gb_s`; BENCHMARKS.md has this machine's). Without a pause, each step
/// would inherit whatever the step before it freed; with one, each pays for fresh memory as a
/// new instance does.
fn settle() {
    std::thread::sleep(Duration::from_millis(env_usize("EMBER_BENCH_SETTLE_MS", 3000) as u64));
}

/// GB/s of first touches (one write per 4 KiB page) on 512 MiB of fresh anonymous memory
/// after a [`settle`], then on the same amount again just after freeing it: how much a new
/// process pays for fresh memory on this machine.
fn fresh_memory_gb_s() -> anyhow::Result<(f64, f64)> {
    let touch = || -> anyhow::Result<f64> {
        let mut mem = fresh_memory(512 << 20)?;
        let bytes = &mut mem[..];
        let t0 = Instant::now();
        for page in bytes.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&bytes[..]);
        Ok(bytes.len() as f64 / 1e9 / t0.elapsed().as_secs_f64())
    };
    settle();
    Ok((touch()?, touch()?))
}

/// Runs [`bare_child`] and returns its seconds.
fn bare_download_fresh(endpoint: &str, keys: &[(String, u64)]) -> anyhow::Result<f64> {
    let list = keys.iter().map(|(k, s)| format!("{k}={s}")).collect::<Vec<_>>().join(";");
    let out = Command::new(std::env::current_exe()?)
        .env("EMBER_BENCH_BARE_CHILD", endpoint)
        .env("EMBER_BENCH_BARE_KEYS", list)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().find_map(|l| l.strip_prefix("bare_s ")) {
        Some(s) if out.status.success() => Ok(s.trim().parse()?),
        _ => bail!("the bare download child failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A model to start cold: its files (name, path) uploaded to `s3://bench/<key>/`.
struct ColdModel {
    label: String,
    key: String,
    dir: tempfile::TempDir,
    dtype: &'static str,
}

impl ColdModel {
    /// A folder holding `files` and a manifest with chunk digests (what `ember model manifest`
    /// writes).
    fn new(label: &str, key: &str, dtype: &'static str, files: &[(&str, PathBuf)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        for (name, path) in files {
            std::fs::copy(path, dir.path().join(name))?;
        }
        ember_model_loader::manifest::Manifest::write_for_dir(dir.path())?;
        Ok(Self { label: label.into(), key: key.into(), dir, dtype })
    }

    /// A Llama-shaped checkpoint of about 2.1 GB (TinyLlama-1.1B's shape with SmolLM2's
    /// tokenizer and vocabulary) with random f16 weights, made here so nothing large is
    /// committed.
    fn synthetic(seed: u64) -> anyhow::Result<Self> {
        let (h, inter, layers, heads, kv_heads, vocab) = (2048usize, 5632usize, 22usize, 32usize, 4usize, 49152usize);
        let hf = model_path("hf-f16")?;
        let dir = tempfile::tempdir()?;
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(hf.join(name), dir.path().join(name))?;
        }
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"
        });
        std::fs::write(dir.path().join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        let head_dim = h / heads;
        let mut shapes: Vec<(String, Vec<usize>)> =
            vec![("model.embed_tokens.weight".into(), vec![vocab, h]), ("model.norm.weight".into(), vec![h])];
        for i in 0..layers {
            let p = format!("model.layers.{i}");
            shapes.extend([
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv_heads * head_dim, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv_heads * head_dim, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
                (format!("{p}.mlp.gate_proj.weight"), vec![inter, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![inter, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, inter]),
            ]);
        }
        // Small random values (|x| in [2^-8, 2^-3)), or 1.0 for norm scales: finite, so the
        // model runs to a first token.
        let mut state = seed | 1;
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, shape) in &shapes {
            let n: usize = shape.iter().product::<usize>() * 2;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}),
            );
            offset += n;
        }
        let mut head = serde_json::to_vec(&header)?;
        while head.len() % 8 != 0 {
            head.push(b' ');
        }
        let path = dir.path().join("model.safetensors");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        use std::io::Write;
        out.write_all(&(head.len() as u64).to_le_bytes())?;
        out.write_all(&head)?;
        let mut buf = Vec::with_capacity(1 << 20);
        for (name, shape) in &shapes {
            let n: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            for _ in 0..n {
                let bits: u16 = if norm {
                    0x3C00
                } else {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let r = state as u16;
                    (r & 0x83FF) | (((r >> 11) % 5 + 7) << 10)
                };
                buf.extend_from_slice(&bits.to_le_bytes());
                if buf.len() >= 1 << 20 {
                    out.write_all(&buf)?;
                    buf.clear();
                }
            }
        }
        out.write_all(&buf)?;
        out.flush()?;
        drop(out);
        ember_model_loader::manifest::Manifest::write_for_dir(dir.path())?;
        Ok(Self { label: "synthetic Llama 1.1B, f16 safetensors".into(), key: "synthetic".into(), dir, dtype: "f16" })
    }

    /// The same model with a version 2 manifest (SHA-256 chunk digests, as manifests were
    /// before BLAKE3), to show what the hash costs a cold start.
    fn with_sha256_chunks(self) -> anyhow::Result<Self> {
        use ember_model_loader::manifest::{ChunkHash, Manifest, MANIFEST_FILE};
        let path = self.dir.path().join(MANIFEST_FILE);
        let mut manifest = Manifest::from_json(&std::fs::read(&path)?)?;
        manifest.version = 2;
        for (name, digest) in manifest.files.iter_mut() {
            if let Some(size) = digest.chunk_size.filter(|_| !digest.chunks_blake3.is_empty()) {
                let bytes = std::fs::read(self.dir.path().join(name))?;
                digest.chunks = bytes.chunks(size as usize).map(|c| ChunkHash::Sha256.digest(c)).collect();
                digest.chunks_blake3.clear();
            }
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?)?;
        Ok(self)
    }

    fn files(&self) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.dir.path())? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            out.push((name, path));
        }
        Ok(out)
    }
}

/// What one `ember generate` run logged: seconds from process start to model ready and to
/// first token, the prompt's prefill, and the load breakdown.
struct Start {
    ready_s: f64,
    first_token_s: f64,
    prefill_s: f64,
    breakdown: String,
}

fn ember_generate(endpoint: &str, model: &ColdModel, cache: Option<&Path>) -> anyhow::Result<Start> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.args(["generate", "--model", &format!("s3://bench/{}", model.key), "--dtype", model.dtype])
        .args([
            "--max-tokens",
            "1",
            "--prompt",
            "What is the capital of France?",
            "--log-format",
            "json",
            "--no-progress",
        ])
        // `generate` logs warnings only by default; the breakdown is an info line.
        .env("EMBER_LOG", "info")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("EMBER_CACHE_DIR");
    if let Some(dir) = cache {
        cmd.arg("--cache-dir").arg(dir);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("ember generate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut start = Start { ready_s: f64::NAN, first_token_s: f64::NAN, prefill_s: f64::NAN, breakdown: String::new() };
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let num = |k: &str| v.get(k).and_then(|t| t.as_f64());
        match v.get("message").and_then(|m| m.as_str()) {
            Some("cold start") => {
                start.ready_s = num("ready_s").unwrap_or(f64::NAN);
                let keys = [
                    "list_s",
                    "small_files_s",
                    "cache_s",
                    "download_s",
                    "download_mb_s",
                    "verify_after_download_s",
                    "build_s",
                ];
                start.breakdown = keys
                    .iter()
                    .map(|k| format!("{k} {:.3}", num(k).unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>()
                    .join(", ");
            }
            Some("generation finished") => {
                start.first_token_s = num("first_token_s").unwrap_or(f64::NAN);
                let (p, tps) = (num("prompt_tokens").unwrap_or(0.0), num("prefill_tok_s").unwrap_or(f64::NAN));
                start.prefill_s = p / tps;
            }
            _ => {}
        }
    }
    Ok(start)
}

/// Reads every file of a cached model (already in the page cache): the floor a warm start is
/// measured against.
fn read_cached(cache: &Path) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut total = 0usize;
    for entry in std::fs::read_dir(cache)? {
        for file in std::fs::read_dir(entry?.path())? {
            let path = file?.path();
            if path.file_name().is_some_and(|n| n != "lock" && n != "entry.json") {
                total += std::hint::black_box(std::fs::read(&path)?).len();
            }
        }
    }
    if total == 0 {
        bail!("nothing cached in {}", cache.display());
    }
    Ok(t0.elapsed())
}

async fn cold_start(runs: usize) -> anyhow::Result<()> {
    let weed = Seaweed::start()?;
    let endpoint = format!("http://127.0.0.1:{}", weed.port);
    let aws = aws_config_for(&endpoint).await;
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&aws).force_path_style(true).build());
    s3.create_bucket().bucket("bench").send().await?;
    let hf = model_path("hf-f16")?;
    let names = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"];
    let seed = std::env::var("EMBER_BENCH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut models = vec![
        ColdModel::new("SmolLM2 f16 safetensors", "smollm2-f16", "f16", &names.map(|n| (n, hf.join(n))))?,
        ColdModel::new(
            "SmolLM2 f16 safetensors, version 2 manifest (SHA-256 chunks)",
            "smollm2-f16-sha256",
            "f16",
            &names.map(|n| (n, hf.join(n))),
        )?
        .with_sha256_chunks()?,
        ColdModel::new(
            "SmolLM2 Q4_1 GGUF",
            "smollm2-q4_1",
            "auto",
            &[("model.gguf", model_path("SmolLM2-135M-Instruct.Q4_1.gguf")?)],
        )?,
    ];
    let only = std::env::var("EMBER_BENCH_COLD_MODELS").unwrap_or_default();
    let wanted = |key: &str| only.is_empty() || only.split(',').any(|o| key.contains(o));
    if !std::env::var("EMBER_BENCH_SKIP").unwrap_or_default().contains("synthetic") && wanted("synthetic") {
        println!("(making the synthetic checkpoint, seed {seed}: EMBER_BENCH_SEED)");
        models.push(ColdModel::synthetic(seed)?);
    }
    let link = std::env::var("EMBER_BENCH_LINK_MBIT").ok().map(|v| v.parse::<u64>()).transpose()?;
    let _shaper = link.map(|mbit| LinkShaper::new(weed.port, mbit)).transpose()?;
    let over = link.map_or("the bare loopback".to_string(), |m| format!("a {m} Mbit/s link (tc on lo)"));
    let (settled, reused) = fresh_memory_gb_s()?;
    println!(
        "\nFresh memory on this machine: first touches at {settled:.2} GB/s after a pause, {reused:.2} GB/s on memory freed just before (EMBER_BENCH_SETTLE_MS pauses before each step below)"
    );
    println!(
        "\n## Cold start: model from S3 (SeaweedFS on 127.0.0.1, over {over}) to ready and to first token, median of {runs}"
    );
    println!("| model | MB | bare download, new process s (range) | Ember to ready s | x bare | x bare, paired | bare download in the bench's process s | x that | Ember to first token s | prefill s | warm start (local tier) s | page-cache read s | x read | warm to first token s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut breakdowns = Vec::new();
    for model in models.iter().filter(|m| wanted(&m.key)) {
        let mut keys = Vec::new();
        for (name, path) in model.files()? {
            let key = format!("{}/{name}", model.key);
            let body = aws_sdk_s3::primitives::ByteStream::from_path(&path).await?;
            s3.put_object().bucket("bench").key(&key).body(body).send().await?;
            keys.push((key, std::fs::metadata(&path)?.len()));
        }
        let bytes: u64 = keys.iter().map(|(_, s)| s).sum();
        let (mut bare, mut fresh, mut ready, mut first, mut prefill, mut warm, mut read, mut warm_first) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut last, mut last_warm) = (String::new(), String::new());
        let mut paired = vec![];
        for _ in 0..runs {
            settle();
            bare.push(bare_download(&s3, "bench", &keys).await?.as_secs_f64());
            settle();
            let before = bare_download_fresh(&endpoint, &keys)?;
            settle();
            let cold = ember_generate(&endpoint, model, None)?;
            settle();
            let after = bare_download_fresh(&endpoint, &keys)?;
            fresh.extend([before, after]);
            paired.push(cold.ready_s / ((before + after) / 2.0));
            ready.push(cold.ready_s);
            first.push(cold.first_token_s);
            prefill.push(cold.prefill_s);
            last = cold.breakdown;
            let cache = tempfile::tempdir()?;
            ember_generate(&endpoint, model, Some(cache.path()))?; // fills the local tier
            settle();
            let hot = ember_generate(&endpoint, model, Some(cache.path()))?;
            warm.push(hot.ready_s);
            warm_first.push(hot.first_token_s);
            last_warm = hot.breakdown;
            settle();
            read.push(read_cached(cache.path())?.as_secs_f64());
        }
        let (b, r, f, p, w, rd) =
            (median(bare), median(ready), median(first), median(prefill), median(warm), median(read));
        let spread = fresh.iter().copied().fold(f64::INFINITY, f64::min)..fresh.iter().copied().fold(0.0, f64::max);
        let (wf, fr, pr) = (median(warm_first), median(fresh), median(paired));
        println!(
            "| {} | {:.0} | {fr:.3} ({:.3}-{:.3}) | {r:.3} | {:.2} | {pr:.2} | {b:.3} | {:.2} | {f:.3} | {p:.3} | {w:.3} | {rd:.3} | {:.2} | {wf:.3} |",
            model.label,
            bytes as f64 / 1e6,
            spread.start,
            spread.end,
            r / fr,
            r / b,
            w / rd
        );
        breakdowns.push(format!("{}, cold: {last}", model.label));
        breakdowns.push(format!("{}, warm: {last_warm}", model.label));
    }
    println!("\nLast cold run's breakdown (seconds; download_mb_s in MB/s):");
    for b in breakdowns {
        println!("- {b}");
    }
    Ok(())
}

/// Decode speed over long generations, the KV cache that grows in place against the one that
/// grew by concatenation (`SeqCache::concatenating`, Ember's cache before 2026-11-30), same
/// model, same run: one decode step copied the whole cache before, only the new token now.
async fn kv_cache_table(threads: usize, p: usize, runs: usize) -> anyhow::Result<()> {
    let model = model_path("hf-f32")?;
    let loaded = load(&ModelRef::Local(model), &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).await?;
    let enc = loaded.tokenizer.encode(&PROMPT_TEXT.repeat(4))?;
    let prompt: Vec<u32> = enc.iter().copied().take(p).collect();
    let decode_tps = |g: usize, concat: bool| -> anyhow::Result<f64> {
        let mut best = 0f64;
        for _ in 0..runs {
            let mut cache = if concat { SeqCache::concatenating() } else { SeqCache::with_reserve(prompt.len() + g) };
            let mut next = ember_model_loader::model::argmax(&loaded.model.forward(&prompt, &mut cache)?)?;
            let t0 = Instant::now();
            for _ in 0..g {
                next = ember_model_loader::model::argmax(&loaded.model.forward(&[next], &mut cache)?)?;
            }
            best = best.max(g as f64 / t0.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    println!("\n## KV cache: decode tok/s over long generations (f32 SmolLM2, {threads} thread(s), {p}-token prompt, best of {runs})");
    println!("| generated tokens | grown by concatenation (before) | grown in place (now) | ratio |");
    println!("| ---: | ---: | ---: | ---: |");
    for g in [128, 2000] {
        let (before, now) = (decode_tps(g, true)?, decode_tps(g, false)?);
        println!("| {g} | {before:.1} | {now:.1} | {:.2} |", now / before);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    if let Ok(endpoint) = std::env::var("EMBER_BENCH_BARE_CHILD") {
        return bare_child(started, &endpoint);
    }
    let threads = std::env::var("EMBER_BENCH_THREADS").unwrap_or_else(|_| "1,2".into());
    let p = env_usize("EMBER_BENCH_PROMPT", 17);
    let g = env_usize("EMBER_BENCH_GEN", 128);
    let runs = env_usize("EMBER_BENCH_RUNS", 3).max(1);
    let skip = std::env::var("EMBER_BENCH_SKIP").unwrap_or_default();
    let counts: Vec<usize> = threads.split(',').filter_map(|t| t.trim().parse().ok()).collect();
    if !skip.contains("speed") {
        if let [one] = counts.as_slice() {
            // candle sizes its thread pools from this variable: set it before any tensor work.
            std::env::set_var("RAYON_NUM_THREADS", one.to_string());
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(speed_table(*one, p, g, runs, &skip))?;
        } else {
            prepare_files()?;
            // One child per thread count: the pools are sized once per process.
            for &t in &counts {
                let status = Command::new(std::env::current_exe()?)
                    .args(std::env::args().skip(1))
                    .env("EMBER_BENCH_THREADS", t.to_string())
                    .env("EMBER_BENCH_SKIP", format!("{skip},cold,kv"))
                    .status()?;
                if !status.success() {
                    bail!("the {t}-thread bench failed");
                }
            }
        }
    }
    if !skip.contains("cold") {
        std::env::set_var("RAYON_NUM_THREADS", counts.first().copied().unwrap_or(1).to_string());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(cold_start(runs))?;
    }
    if !skip.contains("kv") {
        // The first thread count (candle's pool is sized once per process, so the same as above).
        let t = counts.first().copied().unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(kv_cache_table(t, p, env_usize("EMBER_BENCH_KV_RUNS", 1)))?;
    }
    Ok(())
}
