//! One sampler on every device: a seeded sampled job picks, through the CPU batch path, exactly
//! the tokens the CUDA kernel's algorithm picks from the same logits. The kernel's algorithm is
//! run here through its CPU implementation, `sample_batch_by_keys` (the radix selects the
//! kernel makes, step for step), since no GPU is lent to this project; the kernel itself is
//! checked against that implementation on a GPU by `kernels/tests/sampling.rs`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ember_engine::{prefill_last, Batcher, BatcherOptions, Engine, GenerateRequest, Prompt, SamplingParams};
use ember_kernels::sampling::{sample_batch_by_keys, splitmix64, RowParams};
use ember_model_loader::{load, DTypeChoice, LoadOptions, Message, SeqCache};
use ember_tests::{smollm_hf, test_seed};

const PROMPTS: [&str; 4] = [
    "Write a short poem about the sea.",
    "Tell me a story about a dragon.",
    "List some colours you like.",
    "Describe your favourite meal.",
];

fn request(prompt: &str, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(vec![Message::new("user", prompt)]),
        max_tokens: 24,
        // Every rule of the sampler at work: temperature, top-k, top-p and the penalty.
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed: Some(seed),
        },
        stop: vec![],
        allow_special_tokens: false,
        prompt_ids: None,
    }
}

/// The tokens the kernel's algorithm picks when `tokens` are fed back one at a time: at each
/// step the draw's settings are those a GPU batch gets (`Sequence::row_params`: the job's seed
/// mixed with the number of tokens drawn, at kernel step 0). Stops at the first token the
/// kernel would not pick, so the two lists differ from there.
fn kernel_picks(engine: &Engine, req: &GenerateRequest, tokens: &[u32]) -> anyhow::Result<Vec<u32>> {
    let prompt = engine.encode(&req.prompt, false)?;
    let mut cache = SeqCache::new();
    let mut logits = engine.loaded.model.forward(prefill_last(engine, &prompt, &mut cache)?, &mut cache)?;
    let mut seen = prompt.clone();
    let p = &req.sampling;
    let mut picks = Vec::new();
    for (drawn, &token) in tokens.iter().enumerate() {
        let row = logits.to_vec1::<f32>()?;
        let params = RowParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: splitmix64(p.seed.unwrap_or_default(), drawn as u64),
        };
        let pick = sample_batch_by_keys(&row, row.len(), &[params], &[&seen], 0)?.remove(0)?;
        picks.push(pick);
        if pick != token {
            break;
        }
        seen.push(token);
        logits = engine.loaded.model.forward(&[token], &mut cache)?;
    }
    Ok(picks)
}

#[test]
fn a_seeded_job_picks_the_kernels_tokens_through_the_cpu_batch_path() -> anyhow::Result<()> {
    let seed = test_seed("a_seeded_job_picks_the_kernels_tokens_through_the_cpu_batch_path");
    let engine = Arc::new(Engine::new(tokio::runtime::Runtime::new()?.block_on(load(
        &smollm_hf("f32")?.to_string_lossy().parse()?,
        &LoadOptions { dtype: DTypeChoice::F32, ..LoadOptions::default() },
    ))?));
    let requests: Vec<GenerateRequest> =
        PROMPTS.iter().enumerate().map(|(i, p)| request(p, seed.wrapping_add(i as u64))).collect();
    // The four jobs share the batcher's decode steps, as queued jobs do.
    let batcher = Arc::new(Batcher::start(engine.clone(), BatcherOptions::new(8, None))?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let completions = rt.block_on(async {
        let tasks: Vec<_> = requests
            .iter()
            .cloned()
            .map(|req| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.generate(req, Arc::new(AtomicBool::new(false))).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await??);
        }
        anyhow::Ok(out)
    })?;
    for (req, done) in requests.iter().zip(&completions) {
        assert!(!done.tokens.is_empty(), "no tokens for {:?} (seed {seed})", req.prompt);
        let kernel = kernel_picks(&engine, req, &done.tokens)?;
        assert_eq!(kernel, done.tokens, "CPU batch path vs the kernel's algorithm (seed {seed})");
    }
    // The draws are really random: the same prompt under other seeds gives other answers.
    let again: Vec<Vec<u32>> = (1..=3)
        .map(|k| Ok(engine.generate(&request(PROMPTS[0], seed.wrapping_add(1000 * k)))?.tokens))
        .collect::<anyhow::Result<_>>()?;
    assert!(again.iter().any(|t| *t != completions[0].tokens), "three other seeds gave the same tokens (seed {seed})");
    Ok(())
}
