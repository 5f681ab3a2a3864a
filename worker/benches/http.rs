//! The HTTP API's streaming next to the queue path, in one run, on one model and one batcher:
//!
//!     scripts/fetch-model.sh
//!     cargo bench -p ember-worker --bench http
//!
//! At 1, 8 and 16 concurrent requests (the same chat prompts, greedy, `max_tokens` 64):
//! - HTTP: `stream: true` requests to the in-process server on 127.0.0.1 (the code `ember serve
//!   --http` runs), read as a client reads them; time to first token (the first content
//!   chunk) and aggregate completion tokens/s over the wall time of the round;
//! - queue: the same jobs through the embedded queue, the job runner (validate, generate,
//!   write the result, delete) and the same batcher; tokens/s over the wall time until the
//!   last result is written, and the time to the first result.
//!
//! Prints a table and the streaming overhead: HTTP wall time over queue wall time, less one.
//! Settings (environment): EMBER_BENCH_RUNS (3, the median counts), EMBER_BENCH_MAX_TOKENS (64).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ember_engine::{Batcher, BatcherOptions, Engine};
use ember_model_loader::{load, LoadOptions};
use ember_tests::smollm_gguf;
use ember_worker::http::{HttpOptions, HttpServer};
use ember_worker::queue::embedded::{EmbeddedOptions, EmbeddedQueue};
use ember_worker::queue::{OutgoingMessage, Queue};
use ember_worker::runner::{serve, DeadLetters, JobHandler, ServeOptions, ServeStats, Shutdown};
use ember_worker::store::local::LocalStore;
use ember_worker::store::ObjectStore;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};

const PROMPTS: [&str; 16] = [
    "Write one sentence about the sea.",
    "List three colours.",
    "Name a planet and say one thing about it.",
    "Describe a cat in a few words.",
    "Who wrote Hamlet?",
    "Give me a synonym for happy.",
    "Translate 'hello' to Spanish and French.",
    "What is the boiling point of water?",
    "Say something kind.",
    "What do bees make?",
    "Count from one to five.",
    "What is the opposite of cold?",
    "Name a fruit that is yellow.",
    "Why is the sky blue?",
    "What is the capital of France?",
    "Write a haiku about rain.",
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn body(i: usize, max_tokens: usize) -> Value {
    json!({"model": "default", "messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
        "max_tokens": max_tokens})
}

/// One streamed request: seconds to the first content chunk, and the completion tokens.
async fn stream_one(addr: std::net::SocketAddr, i: usize, max_tokens: usize) -> anyhow::Result<(f64, u64)> {
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut b = body(i, max_tokens);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let req = hyper::Request::post("/v1/chat/completions")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(b.to_string())))?;
    let mut resp = sender.send_request(req).await?;
    if resp.status() != 200 {
        bail!("status {}", resp.status());
    }
    let (mut first, mut tokens, mut pending) = (None, None, String::new());
    while let Some(frame) = resp.body_mut().frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.push_str(std::str::from_utf8(&data)?);
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(payload) = event.trim().strip_prefix("data: ") else { continue };
            if payload == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(payload)?;
            if first.is_none() && chunk["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                first = Some(start.elapsed().as_secs_f64());
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n);
            }
        }
    }
    Ok((first.context("no content chunk")?, tokens.context("no usage chunk")?))
}

struct Round {
    /// Mean time to first token (HTTP) or to the first result (queue), seconds.
    first_s: f64,
    tokens: u64,
    wall_s: f64,
}

async fn http_round(addr: std::net::SocketAddr, streams: usize, max_tokens: usize) -> anyhow::Result<Round> {
    let start = Instant::now();
    let runs = (0..streams).map(|i| tokio::spawn(stream_one(addr, i, max_tokens)));
    let mut results = Vec::new();
    for r in futures::future::join_all(runs).await {
        results.push(r??);
    }
    let wall_s = start.elapsed().as_secs_f64();
    let first_s = results.iter().map(|r| r.0).sum::<f64>() / streams as f64;
    Ok(Round { first_s, tokens: results.iter().map(|r| r.1).sum(), wall_s })
}

async fn queue_round(
    queue: Arc<dyn Queue>,
    handler: Arc<JobHandler>,
    store: &LocalStore,
    jobs: usize,
    max_tokens: usize,
    batch: &str,
) -> anyhow::Result<Round> {
    let lines: Vec<OutgoingMessage> = (0..jobs)
        .map(|i| {
            let line = json!({"custom_id": format!("j{i}"), "method": "POST", "url": "/v1/chat/completions",
                "ember": {"batch_id": batch}, "body": body(i, max_tokens)});
            OutgoingMessage::new(line.to_string())
        })
        .collect();
    let stats = Arc::new(ServeStats::default());
    let shutdown = Shutdown::new();
    let opts = ServeOptions {
        concurrency: jobs,
        wait: Duration::from_millis(200),
        visibility: Duration::from_secs(300),
        grace: Duration::from_secs(10),
        exit_when_idle: false,
    };
    let start = Instant::now();
    for r in queue.send_batch(lines).await {
        r?;
    }
    let task = {
        let (queue, stats, shutdown) = (queue.clone(), stats.clone(), shutdown.clone());
        tokio::spawn(async move { serve(queue, handler, &opts, &shutdown, stats).await })
    };
    let mut first_s = None;
    // Polling is fine in a benchmark: 2 ms is small next to a round.
    while stats.done.load(Ordering::Relaxed) < jobs as u64 {
        if first_s.is_none() && stats.done.load(Ordering::Relaxed) > 0 {
            first_s = Some(start.elapsed().as_secs_f64());
        }
        if task.is_finished() {
            bail!("the worker stopped after {} of {jobs} jobs", stats.done.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let wall_s = start.elapsed().as_secs_f64();
    shutdown.trigger();
    task.await??;
    let mut tokens = 0;
    for i in 0..jobs {
        let bytes = store.get(&format!("results/{batch}/j{i}.json")).await?.context("a result is missing")?;
        let line: Value = serde_json::from_slice(&bytes)?;
        tokens += line["response"]["body"]["usage"]["completion_tokens"].as_u64().context("no usage")?;
    }
    Ok(Round { first_s: first_s.unwrap_or(wall_s), tokens, wall_s })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    ember_worker::telemetry::set_thread_count(None);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let (runs, max_tokens) = (env_usize("EMBER_BENCH_RUNS", 3), env_usize("EMBER_BENCH_MAX_TOKENS", 64));
    let engine =
        Arc::new(Engine::new(load(&smollm_gguf()?.to_string_lossy().parse()?, &LoadOptions::default()).await?));
    // One batcher for both paths, as in `ember serve --http`.
    let batcher = Arc::new(Batcher::start(engine.clone(), BatcherOptions::new(16, None))?);
    let server =
        HttpServer::bind("127.0.0.1:0".parse()?, HttpOptions { api_key: None, admit_within: Duration::from_secs(600) })
            .await?;
    let addr = server.local_addr()?;
    server.readiness().set(engine.clone(), batcher.clone());
    let stop = Shutdown::new();
    let http = tokio::spawn(server.serve(stop.clone()));

    let dir = tempfile::tempdir()?;
    let queue: Arc<dyn Queue> = Arc::new(
        EmbeddedQueue::open(
            dir.path().join("queue.db"),
            EmbeddedOptions { name: "bench".into(), ..EmbeddedOptions::default() },
        )
        .await?,
    );
    let store = LocalStore::new(dir.path().join("results"));
    let handler = Arc::new(
        JobHandler::new(engine, Arc::new(store.clone()), DeadLetters::Queue(queue.clone()), 3).with_batcher(batcher),
    );
    // Warm up both paths once.
    http_round(addr, 1, 8).await?;
    queue_round(queue.clone(), handler.clone(), &store, 1, 8, "warmup").await?;

    println!("\n## HTTP streaming next to the queue path: SmolLM2-135M Q4_1, chat prompts, greedy, max_tokens {max_tokens}, median of {runs}");
    println!("| concurrent | HTTP time to first token | HTTP tok/s | queue time to first result | queue tok/s | streaming overhead |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for concurrent in [1, 8, 16] {
        let (mut h_first, mut h_rate, mut q_first, mut q_rate, mut overhead) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            // Alternate which path goes first, so drift on a shared machine hits both.
            let batch = format!("c{concurrent}r{run}");
            let (h, q) = if run % 2 == 0 {
                let h = http_round(addr, concurrent, max_tokens).await?;
                (h, queue_round(queue.clone(), handler.clone(), &store, concurrent, max_tokens, &batch).await?)
            } else {
                let q = queue_round(queue.clone(), handler.clone(), &store, concurrent, max_tokens, &batch).await?;
                (http_round(addr, concurrent, max_tokens).await?, q)
            };
            if h.tokens != q.tokens {
                bail!("the paths made different numbers of tokens: HTTP {} vs queue {}", h.tokens, q.tokens);
            }
            eprintln!(
                "{concurrent} concurrent, run {run}: HTTP {:.3}s first, {:.2}s wall; queue {:.3}s first, {:.2}s wall; {} tokens",
                h.first_s, h.wall_s, q.first_s, q.wall_s, h.tokens
            );
            h_first.push(h.first_s);
            h_rate.push(h.tokens as f64 / h.wall_s);
            q_first.push(q.first_s);
            q_rate.push(q.tokens as f64 / q.wall_s);
            overhead.push(h.wall_s / q.wall_s - 1.0);
        }
        println!(
            "| {concurrent} | {:.0} ms | {:.1} | {:.0} ms | {:.1} | {:+.1}% |",
            median(h_first) * 1e3,
            median(h_rate),
            median(q_first) * 1e3,
            median(q_rate),
            median(overhead) * 100.0
        );
    }
    stop.trigger();
    http.await??;
    Ok(())
}
