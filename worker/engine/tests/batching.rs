//! Continuous batching gives every job exactly the greedy tokens it gets alone, whatever else
//! shares its decode steps, on the real small model.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ember_engine::EngineError;
use ember_engine::{Batcher, BatcherOptions, Engine, GenerateRequest, Prompt, SamplingParams};
use ember_model_loader::{load, DTypeChoice, LoadOptions, Message};
use ember_tests::{smollm_gguf, smollm_hf};

const PROMPTS: [&str; 16] = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "What is 2 + 2?",
    "Name a planet.",
    "Describe a cat in five words.",
    "Who wrote Hamlet?",
    "Give me a synonym for happy.",
    "Translate 'hello' to Spanish.",
    "What is the boiling point of water in Celsius? Answer briefly, then explain why altitude changes it.",
    "Say something kind.",
    "What do bees make?",
    "Count from one to five.",
    "What is the opposite of cold?",
    "Name a fruit that is yellow.",
    "Why is the sky blue? Give a short answer.",
];

fn request(i: usize) -> GenerateRequest {
    let prompt = if i % 5 == 4 {
        // Some plain completions too: different prompt lengths and no chat template.
        Prompt::Text(format!("Once upon a time, {}", PROMPTS[i].to_lowercase()))
    } else {
        Prompt::Chat(vec![Message::new("user", PROMPTS[i])])
    };
    GenerateRequest {
        allow_special_tokens: false,
        prompt_ids: None,
        prompt,
        max_tokens: 6 + 5 * (i % 7),
        sampling: SamplingParams::default(),
        stop: vec![],
    }
}

fn batched_equals_alone(engine: Engine) -> anyhow::Result<()> {
    let engine = Arc::new(engine);
    let alone: Vec<Vec<u32>> =
        (0..PROMPTS.len()).map(|i| Ok(engine.generate(&request(i))?.tokens)).collect::<Result<_, EngineError>>()?;
    let batcher = Arc::new(Batcher::start(engine.clone(), BatcherOptions::new(16, None))?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let together: Vec<Vec<u32>> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..PROMPTS.len() {
            let batcher = batcher.clone();
            tasks.push(tokio::spawn(async move {
                // Staggered: jobs join while others are mid-decode.
                tokio::time::sleep(Duration::from_millis(40 * (i % 4) as u64)).await;
                batcher.generate(request(i), Arc::new(AtomicBool::new(false))).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await??.tokens);
        }
        anyhow::Ok(out)
    })?;
    // (A job may end at once with EOS; most must have something to compare.)
    assert!(alone.iter().filter(|t| t.len() > 3).count() >= 12, "too few jobs generated text: {alone:?}");
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "job {i} ({}) differs between alone and batched", PROMPTS[i]);
    }
    Ok(())
}

#[test]
fn sixteen_batched_jobs_match_their_single_runs_f32() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let model = rt.block_on(load(&smollm_hf("f32")?.to_string_lossy().parse()?, &LoadOptions::default()))?;
    batched_equals_alone(Engine::new(model))
}

#[test]
fn sixteen_batched_jobs_match_their_single_runs_q4_1_gguf() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let opts = LoadOptions { dtype: DTypeChoice::Auto, ..Default::default() };
    let model = rt.block_on(load(&smollm_gguf()?.to_string_lossy().parse()?, &opts))?;
    batched_equals_alone(Engine::new(model))
}

/// A completion that counts on and on: no end of text before `max_tokens`.
fn counting(max_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt: Prompt::Text("1, 2, 3, 4, 5, 6, 7, 8,".into()), max_tokens, ..request(0) }
}

#[test]
fn a_cancelled_job_leaves_the_batch_and_the_others_finish() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let model = rt.block_on(load(&smollm_hf("f32")?.to_string_lossy().parse()?, &LoadOptions::default()))?;
    let engine = Arc::new(Engine::new(model));
    let batcher = Batcher::start(engine.clone(), BatcherOptions::new(4, None))?;
    let (short_alone, medium_alone) = (engine.generate(&request(0))?.tokens, engine.generate(&counting(40))?.tokens);
    let cancel = Arc::new(AtomicBool::new(false));
    // Three jobs share the batch; the long one is cancelled when the short one is answered,
    // an event rather than a time: the long one is then mid-decode (4,000 counting tokens) and
    // the medium one still has most of its 40 to go.
    let (long, short, medium) = rt.block_on(async {
        let short = async {
            let answer = batcher.generate(request(0), Arc::new(AtomicBool::new(false))).await;
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            answer
        };
        tokio::join!(
            batcher.generate(counting(4000), cancel.clone()),
            short,
            batcher.generate(counting(40), Arc::new(AtomicBool::new(false)))
        )
    });
    assert!(matches!(long, Err(EngineError::Cancelled)), "{long:?}");
    assert_eq!(short?.tokens, short_alone);
    assert_eq!(medium?.tokens, medium_alone);
    Ok(())
}

#[test]
fn a_tight_kv_budget_queues_jobs_instead_of_failing_them() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let model = rt.block_on(load(&smollm_hf("f32")?.to_string_lossy().parse()?, &LoadOptions::default()))?;
    let engine = Arc::new(Engine::new(model));
    // Room for about one job at a time (a chat prompt here is ~40 tokens, plus max_tokens).
    let per_token = ember_engine::batch::kv_bytes_per_token(&engine);
    let batcher = Arc::new(Batcher::start(engine.clone(), BatcherOptions::new(8, Some(per_token * 60)))?);
    assert_eq!(batcher.budget_tokens(), 60);
    let alone: Vec<Vec<u32>> =
        (0..4).map(|i| Ok(engine.generate(&request(i))?.tokens)).collect::<Result<_, EngineError>>()?;
    let together = rt.block_on(async {
        let runs = (0..4).map(|i| batcher.generate(request(i), Arc::new(AtomicBool::new(false))));
        futures::future::join_all(runs).await
    });
    for (a, b) in alone.iter().zip(together) {
        assert_eq!(a, &b?.tokens);
    }
    Ok(())
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_with_the_same_answer_alone_and_batched() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let model = rt.block_on(load(&smollm_hf("f32")?.to_string_lossy().parse()?, &LoadOptions::default()))?;
    let engine = Arc::new(Engine::new(model));
    // About 1400 tokens: prefilled in chunks of 512, then the tail.
    let long = GenerateRequest {
        allow_special_tokens: false,
        prompt_ids: None,
        prompt: Prompt::Text(format!("{} The story so far, in one sentence:", PROMPTS.join(" ").repeat(12))),
        max_tokens: 8,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    let alone = engine.generate(&long)?;
    assert!(alone.usage.prompt_tokens > 2 * ember_engine::PREFILL_CHUNK, "{:?}", alone.usage);
    let short_alone = engine.generate(&request(1))?.tokens;
    let batcher = Batcher::start(engine.clone(), BatcherOptions::new(4, None))?;
    let (a, b) = rt.block_on(async {
        tokio::join!(
            batcher.generate(request(1), Arc::new(AtomicBool::new(false))),
            batcher.generate(long.clone(), Arc::new(AtomicBool::new(false)))
        )
    });
    assert_eq!(a?.tokens, short_alone);
    assert_eq!(b?.tokens, alone.tokens);
    Ok(())
}

/// In `text`, the first word (with its leading space) that comes again: that word with the
/// word after its first use, and with the word after its second (" la Marseillaise," and " la
/// femme," in "L'Étoile, la Marseillaise, la femme, ..."), when those two differ.
fn repeat_and_stop(text: &str) -> Option<(String, String)> {
    let starts: Vec<usize> = text.match_indices(' ').map(|(i, _)| i).chain([text.len()]).collect();
    let word = |n: usize| &text[starts[n]..starts[n + 1]];
    for a in 0..starts.len() - 1 {
        for b in a + 1..starts.len() - 2 {
            if word(a) == word(b) && a + 1 < b && word(a + 1) != word(b + 1) {
                return Some((text[starts[a]..starts[a + 2]].to_string(), text[starts[b]..starts[b + 2]].to_string()));
            }
        }
    }
    None
}

/// Collects a followed request's text events until it leaves the batch.
async fn streamed_text(events: &mut tokio::sync::mpsc::UnboundedReceiver<ember_engine::Event>) -> String {
    let mut text = String::new();
    while let Some(e) = events.recv().await {
        if let ember_engine::Event::Text(piece) = e {
            text.push_str(&piece);
        }
    }
    text
}

/// With one slot taken, an interactive request that arrives after a batch job is admitted
/// first (the batch job's admission is only sent after the interactive answer), the running job
/// is not pushed out, a request that may not wait is refused at once, and streamed text adds
/// up to the answer, never past a stop sequence.
#[test]
fn interactive_requests_go_first_and_stream_their_text() -> anyhow::Result<()> {
    use ember_engine::{Event, Priority, Submit};
    let rt = tokio::runtime::Runtime::new()?;
    let opts = LoadOptions { dtype: DTypeChoice::Auto, ..LoadOptions::default() };
    let model = rt.block_on(load(&smollm_gguf()?.to_string_lossy().parse()?, &opts))?;
    let engine = Arc::new(Engine::new(model));
    // The stop begins like text that comes before it, which streaming must hold back and then
    // let go: taken from this model's own greedy answer on this CPU ("L'Étoile, la Marseillaise,
    // la femme, ..." with AVX-512, "L'Étoile, la Marseur, la France, ..." with AVX2; the
    // Q4_1 test in tests/tests/generation.rs says why they differ), as the first repeated word
    // and the word after its repeat (" la femme,"; `held` is " la Marseillaise,").
    let free = engine.generate(&GenerateRequest { max_tokens: 30, ..request(0) })?;
    let (held, stop) =
        repeat_and_stop(&free.text).ok_or_else(|| anyhow::anyhow!("no repeated word to stop at in {:?}", free.text))?;
    println!("answer {:?}: stop at {stop:?}, held back first at {held:?}", free.text);
    let stopped = GenerateRequest { stop: vec![stop.clone()], max_tokens: 30, ..request(0) };
    let (running_alone, stopped_alone) = (engine.generate(&counting(60))?, engine.generate(&stopped)?);
    let batcher = Batcher::start(engine.clone(), BatcherOptions::new(1, None))?;
    let follow = |priority, admit_within| Submit { priority, admit_within, stream: true, ..Submit::default() };
    rt.block_on(async {
        let mut running = batcher.submit(counting(60), follow(Priority::Batch, None))?;
        assert_eq!(running.events.recv().await, Some(Event::Admitted));
        let mut batch = batcher.submit(request(1), follow(Priority::Batch, None))?;
        let mut interactive = batcher.submit(stopped.clone(), follow(Priority::Interactive, None))?;
        let impatient = batcher.submit(request(2), follow(Priority::Interactive, Some(Duration::ZERO)))?;
        assert!(matches!(impatient.done.await?, Err(EngineError::Overloaded { .. })));

        assert_eq!(batch.events.recv().await, Some(Event::Admitted));
        let answered = interactive.done.try_recv();
        assert!(matches!(answered, Ok(Ok(_))), "the batch job was admitted before the interactive one: {answered:?}");
        let interactive_text = streamed_text(&mut interactive.events).await;
        let answer = answered.map_err(|e| anyhow::anyhow!("{e}"))??;
        assert_eq!(answer.tokens, stopped_alone.tokens);
        assert!(
            answer.text.starts_with(&interactive_text),
            "{interactive_text:?} is not a prefix of {:?}",
            answer.text
        );
        assert_eq!(answer.finish_reason, ember_engine::FinishReason::Stop, "{:?}", answer.text);
        assert!(interactive_text.contains(&held), "{interactive_text:?}");
        assert!(!answer.text.contains(&stop), "{:?}", answer.text);

        let running_text = streamed_text(&mut running.events).await;
        let done = running.done.await??;
        assert_eq!(done.tokens, running_alone.tokens, "the running job was disturbed");
        // Every piece but the last token's, which comes with the answer.
        assert!(done.text.starts_with(&running_text) && running_text.len() > done.text.len() / 2, "{running_text:?}");
        batch.done.await??;
        anyhow::Ok(())
    })?;
    assert_eq!(batcher.stats().overloaded.load(std::sync::atomic::Ordering::Relaxed), 1);
    Ok(())
}
