//! Aggregate decode throughput with several jobs sharing each step, next to llama.cpp with
//! the same number of parallel sequences, in one run:
//!
//!     scripts/fetch-model.sh && scripts/install-peers.sh
//!     cargo bench -p ember-worker --bench batching
//!
//! For N in 1, 4, 8, 16: N sequences each prefill a P-token prompt, then G greedy decode steps
//! run for all of them together (Ember: `Model::forward_batch`, the step the batcher runs;
//! llama.cpp: one context with N sequences, through node-llama-cpp). Decode tokens/s is N*G
//! over the wall time of the decode phase. Ember's single-job baseline is the unbatched
//! `Model::forward` loop a job without batching runs. Then peak memory: 16 jobs through the
//! batcher, the KV cache they reserved, and the budget the worker computed.
//!
//! Settings (environment): EMBER_BENCH_THREADS (2), EMBER_BENCH_PROMPT (17),
//! EMBER_BENCH_GEN (64), EMBER_BENCH_RUNS (2, best counts), EMBER_BENCH_MODEL (f32: hf-f32 and
//! f32.gguf; or f16; or a quantized file both load: q8_0, q4_0, q4_k_m, made by
//! `scripts/fetch-model.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ember_engine::{batch::kv_bytes_per_token, Batcher, BatcherOptions, Engine, GenerateRequest, Prompt};
use ember_model_loader::{load, LoadOptions, SeqCache};
use ember_tests::model_path;

const TEXT: &str = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by \
the sea, there lived an old fisherman who told stories about the stars, the tides and the strange ships. ";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn prompt(engine: &Engine, p: usize) -> anyhow::Result<Vec<u32>> {
    let enc = engine.loaded.tokenizer.encode(&TEXT.repeat(4))?;
    let mut tokens = vec![engine.loaded.config().bos_token_id.unwrap_or(1)];
    tokens.extend(enc.iter().take(p.saturating_sub(1)));
    Ok(tokens)
}

/// Decode tokens/s of `n` sequences stepping together (EOS ignored, as on the llama.cpp side).
fn ember_batched(engine: &Engine, n: usize, p: usize, g: usize) -> anyhow::Result<f64> {
    let model = &engine.loaded.model;
    let prompt = prompt(engine, p)?;
    let mut caches: Vec<SeqCache> = (0..n).map(|_| SeqCache::new()).collect();
    let mut next = Vec::with_capacity(n);
    for cache in &mut caches {
        next.push(ember_model_loader::model::argmax(&model.forward(&prompt, cache)?)?);
    }
    let start = Instant::now();
    for _ in 0..g {
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let logits = model.forward_batch(&next, &mut refs)?;
        next = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    }
    Ok((n * g) as f64 / start.elapsed().as_secs_f64())
}

/// The unbatched loop: one sequence, `Model::forward` per token.
fn ember_single(engine: &Engine, p: usize, g: usize) -> anyhow::Result<f64> {
    let model = &engine.loaded.model;
    let mut cache = SeqCache::new();
    let mut next = ember_model_loader::model::argmax(&model.forward(&prompt(engine, p)?, &mut cache)?)?;
    let start = Instant::now();
    for _ in 0..g {
        next = ember_model_loader::model::argmax(&model.forward(&[next], &mut cache)?)?;
    }
    Ok(g as f64 / start.elapsed().as_secs_f64())
}

fn llama_cpp(gguf: &Path, threads: usize, n: usize, p: usize, g: usize) -> anyhow::Result<f64> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("node")
        .arg(root.join("scripts/llamacpp-bench.mjs"))
        .args(["--model", &gguf.to_string_lossy(), "--threads", &threads.to_string(), "--parallel", &n.to_string()])
        .args(["--prompt-tokens", &p.to_string(), "--gen-tokens", &g.to_string()])
        .output()
        .context("running node (install peers with scripts/install-peers.sh)")?;
    if !out.status.success() {
        anyhow::bail!("llama.cpp bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["decode_tps"].as_f64().context("no decode_tps in the llama.cpp output")
}

/// Resident set size of this process (VmRSS), in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

fn main() -> anyhow::Result<()> {
    let threads = env_usize("EMBER_BENCH_THREADS", 2);
    ember_worker::telemetry::set_thread_count(Some(threads));
    let (p, g, runs) =
        (env_usize("EMBER_BENCH_PROMPT", 17), env_usize("EMBER_BENCH_GEN", 64), env_usize("EMBER_BENCH_RUNS", 2));
    let dtype = std::env::var("EMBER_BENCH_MODEL").unwrap_or_else(|_| "f32".into());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // Dense weights: Ember loads the safetensors, llama.cpp the GGUF of the same weights. A
    // quantized file (q8_0, q4_k_m, ...): both load the same GGUF.
    let gguf = model_path(&format!("{dtype}.gguf"))?;
    let dir = if dtype.starts_with('q') { gguf.clone() } else { model_path(&format!("hf-{dtype}"))? };
    let engine = Arc::new(Engine::new(rt.block_on(load(&dir.to_string_lossy().parse()?, &LoadOptions::default()))?));
    let best = |f: &dyn Fn() -> anyhow::Result<f64>| -> anyhow::Result<f64> {
        let mut b: f64 = 0.0;
        for _ in 0..runs.max(1) {
            b = b.max(f()?);
        }
        Ok(b)
    };
    let _ = ember_single(&engine, p, 4)?; // warm-up
    let single = best(&|| ember_single(&engine, p, g))?;
    println!("\n## Batched decode, SmolLM2-135M {dtype}, {threads} threads, prompt {p}, {g} tokens per sequence, best of {runs}");
    println!("Ember single job (unbatched loop): {single:.1} tok/s\n");
    println!("| jobs | Ember tok/s | x single job | llama.cpp tok/s | Ember / llama.cpp |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for n in [1, 4, 8, 16] {
        let ours = best(&|| ember_batched(&engine, n, p, g))?;
        let theirs = best(&|| llama_cpp(&gguf, threads, n, p, g))?;
        println!("| {n} | {ours:.1} | {:.2} | {theirs:.1} | {:.2} |", ours / single, ours / theirs);
    }

    // Memory: 16 jobs through the batcher with the budget the worker computes; resident memory
    // sampled every 5 ms while they run.
    let before = rss();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let opts = BatcherOptions::new(16, None);
    let batcher = Arc::new(Batcher::start(engine.clone(), opts)?);
    let total_tokens: usize = rt.block_on(async {
        let runs = (0..16).map(|i| {
            let req = GenerateRequest {
                allow_special_tokens: false,
                prompt_ids: None,
                prompt: Prompt::Text(format!("{i}. {}", &TEXT[..60])),
                max_tokens: 256,
                sampling: Default::default(),
                stop: vec![],
            };
            batcher.generate(req, Arc::new(AtomicBool::new(false)))
        });
        futures::future::join_all(runs)
            .await
            .into_iter()
            .map(|r| r.map(|c| c.usage.total_tokens))
            .sum::<Result<usize, _>>()
    })?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    let grew = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(before);
    let kv = total_tokens as u64 * kv_bytes_per_token(&engine);
    let mib = |b: u64| b as f64 / 1048576.0;
    println!("\n## Memory at 16 jobs (batcher; up to 256 tokens each)");
    println!("| KV budget the worker computed | KV cache of the 16 jobs at their longest | peak resident growth during the run |");
    println!("| ---: | ---: | ---: |");
    println!("| {:.0} MiB | {:.1} MiB | {:.1} MiB |", mib(batcher.options().kv_budget_bytes), mib(kv), mib(grew));
    Ok(())
}
